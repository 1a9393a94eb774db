"""The paper's tables from cells, beside its published numbers: Markdown, CSV and LaTeX.

Layout as Tables 1-3: rows grouped by classifier (linear head, stacked DeiT-B) x foundation,
one column per dataset (the paper's four, in its order, then any others), each cell
"mean ± std (paper x.xxx, Δ +0.012)". A table is made for each foundation state (frozen,
unfrozen) and resolution that has runs of the four main protocols. A cell is compared with
the paper's cell of the same state, classifier, foundation, dataset and resolution, and only
when mfjax's headline metric is the paper's metric for that dataset. Tables at the main
resolution (224 when there are runs at 224) fall back to the paper's 224 px numbers, said in
the caption; tables at other resolutions also show the gain in points over the main
resolution, as the paper's Table 3. Blank cells have no run; nothing is filled in.
"""
import csv
import io
import math

from mfjax.report import paper
from mfjax.report.results import ReportError

MAIN_PROTOCOLS = {"frozen_linear": ("frozen", "linear"), "frozen_deit": ("frozen", "deit"),
                  "unfrozen_linear": ("unfrozen", "linear"), "unfrozen_deit": ("unfrozen", "deit")}
PAPER_TABLE = {("frozen", 224): "Table 1", ("unfrozen", 224): "Table 2", ("unfrozen", 1024): "Table 3"}
VARIANT_MARK = "†"
TASK_MARK = "‡"


def fmt(value, digits: int = 3, sign: bool = False) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def main_resolution(cells) -> int | None:
  """224 if any main-protocol run is at 224, else the most common resolution among them."""
  resolutions = [c.resolution for c in cells if c.protocol in MAIN_PROTOCOLS]
  if not resolutions:
    return None
  return 224 if 224 in resolutions else max(set(resolutions), key=lambda r: (resolutions.count(r), -r))


def ordered_datasets(names) -> list[str]:
  """The given dataset names, the paper's four first in its order, then the others sorted."""
  names = set(names)
  return [d for d in paper.DATASETS if d in names] + sorted(names - set(paper.DATASETS))


def dataset_columns(cells) -> list[str]:
  """Table columns: always the paper's four datasets (blank without runs), then any others."""
  return list(paper.DATASETS) + ordered_datasets(c.dataset for c in cells if c.dataset not in paper.DATASETS)


def column_title(dataset: str, metric: str | None = None) -> str:
  return paper.DATASET_TITLES.get(dataset) or (f"{dataset}, {metric}" if metric else dataset)


def model_order(model: str) -> tuple:
  """The paper's foundation order; DINOv2 variants follow DINOv2 by size; other models after, by name."""
  key = paper.foundation_of(model)
  if key:
    return (paper.FOUNDATION_ORDER.index(key), 0, model)
  if model in paper.VARIANT_TITLES:
    return (paper.FOUNDATION_ORDER.index("dinov2"), 1 + "sblg".index(model[len("dinov2_vit")]), model)
  return (len(paper.FOUNDATION_ORDER), 0, model)


def paper_cell(cell, state: str, resolution: int, classifier: str) -> dict | None:
  foundation = paper.foundation_of(cell.model)
  if foundation is None or paper.SAME_METRIC.get(cell.metric) != paper.METRICS.get(cell.dataset):
    return None
  return paper.lookup(state, resolution, classifier, foundation, cell.dataset)


def comparison_tables(cells) -> list[dict]:
  """Every (state, resolution) table of the four main protocols, main resolution first."""
  main = main_resolution(cells)
  if main is None:
    return []
  columns = dataset_columns(cells)
  metrics = {c.dataset: c.metric for c in cells}
  published = {(r["foundation_state"], r["resolution"]) for r in paper.published()}
  at_main = {(c.model, c.dataset, c.protocol, c.setting): c for c in cells
             if c.protocol in MAIN_PROTOCOLS and c.resolution == main}
  keys = sorted({(MAIN_PROTOCOLS[c.protocol][0], c.resolution) for c in cells if c.protocol in MAIN_PROTOCOLS},
                key=lambda k: (k[1] != main, k[1], k[0] != "frozen"))
  tables = []
  for state, resolution in keys:
    paper_resolution = resolution if (state, resolution) in published else (224 if resolution == main else None)
    rows, variants, ran_at, other_tasks = {}, set(), {}, set()
    for c in cells:
      if c.protocol not in MAIN_PROTOCOLS or c.resolution != resolution or MAIN_PROTOCOLS[c.protocol][0] != state:
        continue
      if c.run_resolution != resolution:
        ran_at[paper.title_of(c.model)] = c.run_resolution
      classifier = MAIN_PROTOCOLS[c.protocol][1]
      entry = {"mean": c.mean, "std": c.std, "n": c.n, "lr": c.lr, "metric": c.metric,
               "gain": None, "paper_mean": None, "paper_std": None, "delta": None, "other_task": c.other_task}
      if resolution != main and (c.model, c.dataset, c.protocol, c.setting) in at_main:
        entry["gain"] = 100 * (c.mean - at_main[(c.model, c.dataset, c.protocol, c.setting)].mean)
      published_cell = paper_cell(c, state, paper_resolution, classifier) if paper_resolution else None
      if published_cell:
        entry.update(paper_mean=published_cell["mean"], paper_std=published_cell["std"],
                     delta=None if c.other_task else c.mean - published_cell["mean"])
      if c.other_task:
        other_tasks.add(c.other_task)
      rows.setdefault((classifier, c.model, c.setting), {})[c.dataset] = entry
      if c.variant:
        variants.add((classifier, c.model, c.setting))
    ordered = sorted(rows, key=lambda k: (k[0] != "linear", model_order(k[1]), k[2]))
    table_name = PAPER_TABLE.get((state, paper_resolution))
    title = f"{state.capitalize()} foundations at {resolution} px"
    caption = ["Test score in each column's metric: mean ± std over seeds at the learning rate with the best "
               "mean validation score."]
    if table_name:
      title += f" (paper {table_name})"
    if paper_resolution and paper_resolution != resolution:
      caption.append(f"The paper's values are at {paper_resolution} px; these runs are at {resolution} px.")
    for foundation, run_resolution in sorted(ran_at.items()):
      caption.append(f"{foundation} ran at {run_resolution} px, a multiple of its patch size.")
    if paper_resolution is None:
      caption.append(f"The paper has no {state} results at {resolution} px.")
    if resolution != main:
      caption.append(f"pts: the gain in points (x100) over the same cell at {main} px.")
    if variants:
      caption.append(f"{VARIANT_MARK} not the paper's weights: a randomly initialized foundation or stacked DeiT-B "
                     "(no model.checkpoint / head.checkpoint), or a changed architecture (overrides, or a checkpoint "
                     "of another network).")
    if other_tasks:
      caption.append(f"{TASK_MARK} not the paper's task or labels, so no Δ: {'; '.join(sorted(other_tasks))}.")
    if any(setting for _, _, setting in ordered):
      caption.append("(field=value): cells of one foundation and protocol whose configs differ beyond lr and seed, "
                     "labelled by the fields that differ.")
    caption.append("Δ = mfjax − paper. Blank: no run.")
    tables.append({
        "name": f"{state}_{resolution}", "title": title, "caption": " ".join(caption), "state": state,
        "resolution": resolution, "main_resolution": main, "paper_resolution": paper_resolution,
        "columns": columns, "column_titles": [column_title(d, metrics.get(d)) for d in columns],
        "rows": [{"classifier": cls, "model": model, "setting": setting, "cells": rows[(cls, model, setting)],
                  "foundation": paper.title_of(model) + (f" ({setting})" if setting else "")
                  + (f" {VARIANT_MARK}" if (cls, model, setting) in variants else "")}
                 for cls, model, setting in ordered]})
  return tables


def cell_text(entry: dict | None) -> str:
  if entry is None:
    return ""
  text = fmt(entry["mean"]) + (f" ± {fmt(entry['std'])}" if entry["n"] > 1 else " (1 seed)")
  if entry["gain"] is not None:
    text += f" [{fmt(entry['gain'], 1, sign=True)} pts]"
  if entry["other_task"]:
    text += f" {TASK_MARK}"
  if entry["paper_mean"] is not None:
    text += f" (paper {fmt(entry['paper_mean'])}" + (")" if entry["delta"] is None else
                                                       f", Δ {fmt(entry['delta'], sign=True)})")
  return text


def grouped_rows(table):
  """(classifier label or "", row) with the label only on each group's first row."""
  previous = None
  for row in table["rows"]:
    label = paper.CLASSIFIERS[row["classifier"]] if row["classifier"] != previous else ""
    previous = row["classifier"]
    yield label, row


def to_markdown(table: dict) -> str:
  header = ["Classifier", "Foundation"] + table["column_titles"]
  lines = [f"**{table['title']}.** {table['caption']}", "", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for label, row in grouped_rows(table):
    cells = [cell_text(row["cells"].get(d)) for d in table["columns"]]
    lines.append("| " + " | ".join([label, row["foundation"]] + cells) + " |")
  return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["state", "resolution", "classifier", "model", "foundation", "dataset", "metric", "mean", "std",
                   "n_seeds", "lr", f"gain_points_vs_{table['main_resolution']}px", "paper_resolution",
                   "paper_mean", "paper_std", "delta", "setting"])
  for row in table["rows"]:
    for dataset in table["columns"]:
      e = row["cells"].get(dataset)
      if e is None:
        continue
      writer.writerow([table["state"], table["resolution"], row["classifier"], row["model"],
                       paper.foundation_of(row["model"]) or "", dataset, e["metric"], _num(e["mean"]),
                       _num(e["std"]), e["n"], repr(e["lr"]), _num(e["gain"]),
                       table["paper_resolution"] if e["paper_mean"] is not None else "",
                       _num(e["paper_mean"]), _num(e["paper_std"]), _num(e["delta"]), row["setting"]])
  return out.getvalue()


def _num(value) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return ""
  return f"{float(value):.10g}"


LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                 "κ": r"$\kappa$", "±": r"$\pm$", "Δ": r"$\Delta$", "−": "-", "†": r"$^\dagger$",
                 "‡": r"$^\ddagger$"}


def latex_escape(text: str) -> str:
  return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_cell(entry: dict | None) -> str:
  if entry is None:
    return ""
  text = fmt(entry["mean"]) + (rf" $\pm$ {fmt(entry['std'])}" if entry["n"] > 1 else r"\textsuperscript{1}")
  if entry["gain"] is not None:
    text += f" ({fmt(entry['gain'], 1, sign=True)} pts)"
  if entry["other_task"]:
    text += r"$^\ddagger$"
  if entry["paper_mean"] is not None:
    delta = "" if entry["delta"] is None else f", {fmt(entry['delta'], sign=True)}"
    text += rf" {{\scriptsize[{fmt(entry['paper_mean'])}{delta}]}}"
  return text


def to_latex(table: dict) -> str:
  """A booktabs table; each cell "mean ± std [paper, Δ]"; ¹ marks a single seed."""
  columns = len(table["columns"])
  lines = [r"% needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering", r"\small",
           rf"\caption{{{latex_escape(table['title'])}. {latex_escape(table['caption'])} "
           r"Brackets: [paper, $\Delta$]; \textsuperscript{1}: one seed.}",
           rf"\label{{tab:{table['name']}}}",
           r"\begin{tabular}{ll" + "c" * columns + "}", r"\toprule",
           " & ".join(["Classifier", "Foundation"] + [latex_escape(t) for t in table["column_titles"]]) + r" \\",
           r"\midrule"]
  first = True
  for label, row in grouped_rows(table):
    if label and not first:
      lines.append(r"\midrule")
    first = False
    cells = [_latex_cell(row["cells"].get(d)) for d in table["columns"]]
    lines.append(" & ".join([latex_escape(label), latex_escape(row["foundation"])] + cells) + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- every cell


CELL_FIELDS = ("model", "dataset", "protocol", "head", "resolution", "unfreeze_from", "keep_blocks", "trained",
               "metric", "variant", "other_task", "setting")


def all_cells_rows(cells) -> list[dict]:
  """One row per cell with every field: the data behind every table and plot."""
  rows = []
  for c in cells:
    row = {k: getattr(c, k) for k in CELL_FIELDS}
    row.update(foundation=paper.foundation_of(c.model) or "", n_seeds=c.n, mean=c.mean, std=c.std, lr=c.lr,
               val_mean=float(c.val.mean()) if c.n else float("nan"),
               iterations_to_best=float(c.iterations_to_best.mean()),
               test_images_per_second=float(c.images_per_second.mean()),
               params_total=c.params_total, params_trained=c.params_trained,
               lr_search="; ".join(f"{lr!r}: {fmt(v)} ({n} seeds)" for lr, (v, n) in c.lr_scores.items()))
    rows.append(row)
  return rows


def segmentation_rows(runs: list[dict]) -> list[dict]:
  """One row per segmentation run with its validation means, per-class Dice ("dice:NAME") and
  MedDINOv3's published Dice where it has one (paper.meddinov3_published), grouped by setup
  (everything but the fold); after a setup with two or more numbered folds, a row with their mean.
  The same fold of one setup twice is an error naming both files."""
  groups: dict[tuple, list[dict]] = {}
  for run in runs:
    groups.setdefault(run["setup"], []).append(run)
  rows = []
  for folds in groups.values():
    seen = {}
    for run in sorted(folds, key=lambda r: (not r["fold"].isdigit(), r["fold"].zfill(4))):
      if run["fold"] in seen:
        raise ReportError(f"{run['file']} and {seen[run['fold']]}: the same segmentation setup and fold twice")
      seen[run["fold"]] = run["file"]
      row = {k: run[k] for k in ("dataset", "model", "backbone", "fold", "epochs", "cases", "dice", "hd95", "nsd")}
      row["published_dice"] = paper.meddinov3_published(run["dataset"], run["model"], run["backbone"])
      row.update({f"dice:{name}": value for name, value in run["dice_per_class"].items()})
      rows.append(row)
    numbered = [r for r in rows[len(rows) - len(folds):] if r["fold"].isdigit()]
    if len(numbered) >= 2:
      first = numbered[0]
      mean = {"dataset": first["dataset"], "model": first["model"], "backbone": first["backbone"],
              "fold": "mean of " + ",".join(r["fold"] for r in numbered), "epochs": first["epochs"],
              "cases": sum(r["cases"] for r in numbered), "published_dice": first["published_dice"]}
      for key in dict.fromkeys(k for r in numbered for k in r if k in ("dice", "hd95", "nsd") or k.startswith("dice:")):
        values = [r[key] for r in numbered if key in r and not math.isnan(r[key])]
        mean[key] = sum(values) / len(values) if values else float("nan")
      rows.append(mean)
  return rows


def rows_to_csv(rows: list[dict]) -> str:
  out = io.StringIO()
  if rows:
    fields = list(dict.fromkeys(k for row in rows for k in row))  # rows may differ (classes per dataset)
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (_num(v) if isinstance(v, float) else ("" if v is None else v)) for k, v in row.items()})
  return out.getvalue()

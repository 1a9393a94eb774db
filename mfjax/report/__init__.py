"""`mfjax report RUNS_DIR`: the reproduction beside the paper's published numbers.

  import mfjax.report
  written = mfjax.report.build("runs/", "runs/report")

reads every `result.json` (training runs), `knn.json` and `cka_*.json` below RUNS_DIR and writes
  report.md, report.html      the page that ties everything together
  tables/*.md|csv|tex         Tables 1-3 layout (frozen/unfrozen x resolution), every cell, k-NN, timing
  plots/*.png                 relative gain (Fig. 1), k-NN (Fig. 2), timing (Fig. 3), progressive freezing
                              (Fig. 4), decapitation (Fig. 5), model size (Fig. 6), resolution, CKA (Figs. 7, 8, A.1)
The files an earlier report wrote in the same folder (listed in its .mfjax_report.json) are replaced;
a file of the same name as one the report writes that no earlier report recorded is the user's, and the
report stops with an error naming it rather than overwrite it; other files are left alone.
"""
import json
import os
import shutil
import tempfile

from mfjax.report import page, paper, plots, results, tables
from mfjax.report.results import ReportError

__all__ = ["build", "ReportError", "paper", "results", "tables", "plots", "page"]

MANIFEST = ".mfjax_report.json"  # the files a report wrote: the next one in the folder may replace them
PAGES = ("report.md", "report.html")
MOST_NAMED = 10


def _previous_outputs(out_dir: str) -> set[str]:
  """The files (relative to out_dir) that an earlier report wrote here, as its manifest lists them;
  none without a manifest, as then every file in the folder may be the user's."""
  manifest = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(manifest):
    return set()
  try:
    with open(manifest, encoding="utf-8") as f:
      listed = json.load(f)
  except (OSError, ValueError) as e:
    raise ReportError(f"{manifest} is not readable as JSON ({e}); delete it and the report files it listed") from None
  if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
    raise ReportError(f"{manifest} is not a list of file names")
  outputs = {os.path.normpath(p) for p in listed}
  outside = sorted(p for p in outputs if os.path.isabs(p) or p.split(os.sep)[0] == "..")
  if outside:
    raise ReportError(f"{manifest} lists files outside {out_dir}: {outside}")
  # A manifest from before the page was listed in it: the page is written with every report.
  return outputs | set(PAGES)


def _install(stage: str, out_dir: str, written: list[str], previous: set[str]) -> None:
  """Move the files written in `stage` to out_dir, replacing only what an earlier report wrote (and removing
  its files this one does not write). A file of the same name that no report recorded is the user's: refused."""
  clashes = sorted(p for p in written if p not in previous and os.path.lexists(os.path.join(out_dir, p)))
  if clashes:
    named = ", ".join(clashes[:MOST_NAMED]) + (f" and {len(clashes) - MOST_NAMED} more" if len(clashes) > MOST_NAMED
                                                else "")
    raise ReportError(f"{out_dir} holds {named}, which this report would overwrite, but no earlier report there "
                      f"recorded them in its {MANIFEST}: move or delete them, or choose another --out")
  manifest = os.path.join(out_dir, MANIFEST)
  _write(manifest, json.dumps(sorted(previous | set(written)), indent=1))  # all of them ours, should this stop
  for path in sorted(previous - set(written)):
    if os.path.isfile(os.path.join(out_dir, path)):
      os.remove(os.path.join(out_dir, path))
  for path in written:
    os.makedirs(os.path.dirname(os.path.join(out_dir, path)), exist_ok=True)
    os.replace(os.path.join(stage, path), os.path.join(out_dir, path))
  _write(manifest, json.dumps(sorted(written), indent=1))


def _write(path: str, text: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


def build(runs_dir: str, out_dir: str | None = None) -> dict:
  """Write the report; returns {"markdown", "html", "tables": [...], "plots": [...], "notes": [...]}."""
  runs_dir = os.path.abspath(os.path.expanduser(runs_dir))
  if not os.path.isdir(runs_dir):
    raise ReportError(f"runs folder {runs_dir} does not exist")
  out_dir = os.path.abspath(os.path.expanduser(out_dir or os.path.join(runs_dir, "report")))
  found = results.read_results(runs_dir, exclude=out_dir)
  cells = results.load_cells(runs_dir, found=found)
  knn = results.load_knn(runs_dir, exclude=out_dir)
  cka = results.load_cka(runs_dir, exclude=out_dir)
  segment_runs = results.load_segment_runs(runs_dir, found=found)
  pretrain_runs = results.load_pretrain_runs(runs_dir, found=found)
  if not (cells or knn or cka or segment_runs or pretrain_runs):
    raise ReportError(f"no result.json, knn.json or cka_*.json below {runs_dir}")
  previous = _previous_outputs(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=".mfjax_report-", dir=out_dir)  # nothing in out_dir changes until all is written
  try:
    written = _write_into(stage, runs_dir, out_dir, found, cells, knn, cka, segment_runs, pretrain_runs)
    _install(stage, out_dir, written["files"], previous)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  final = lambda relative: os.path.join(out_dir, relative)
  return {"markdown": final(PAGES[0]), "html": final(PAGES[1]), "tables": [final(p) for p in written["tables"]],
          "plots": [final(p) for p in written["plots"]], "notes": written["notes"]}


def _write_into(stage, runs_dir, out_dir, found, cells, knn, cka, segment_runs, pretrain_runs) -> dict:
  """Write the page, tables and plots into `stage`; {"files", "tables", "plots"} (relative paths), "notes"."""
  table_dir, plot_dir = os.path.join(stage, "tables"), os.path.join(stage, "plots")
  notes, written_tables = [], []

  def rel(path):
    return os.path.relpath(path, stage)

  def save_table(name: str, text: str) -> str:
    written_tables.append(_write(os.path.join(table_dir, name), text))
    return written_tables[-1]

  table_blocks = []
  for table in tables.comparison_tables(cells):
    paths = [save_table(f"{table['name']}.{ext}", render(table))
             for ext, render in (("md", tables.to_markdown), ("csv", tables.to_csv), ("tex", tables.to_latex))]
    header = ["Classifier", "Foundation"] + table["column_titles"]
    rows = [[label, row["foundation"]] + [tables.cell_text(row["cells"].get(d)) for d in table["columns"]]
            for label, row in tables.grouped_rows(table)]
    table_blocks += [("heading", 3, table["title"]), ("text", table["caption"]), ("table", header, rows),
                     ("links", [(os.path.basename(p), rel(p)) for p in paths])]

  variants = [c for c in cells if c.variant]
  if variants:
    notes.append(f"{len(variants)} of {len(cells)} cells do not use the paper's weights: a randomly initialized "
                 "foundation or stacked DeiT-B (no model.checkpoint / head.checkpoint in the config) or a changed "
                 "architecture (model/head overrides, or a checkpoint whose model.json records another network), "
                 f"e.g. {variants[0].model} on {variants[0].dataset} "
                 f"({variants[0].protocol}). Their numbers say nothing about the pretrained models; tables mark them "
                 f"{tables.VARIANT_MARK}.")
  other_tasks = sorted(({c.other_task for c in cells} | {r["other_task"] for r in knn}) - {""})
  if other_tasks:
    notes.append(f"Some runs are not the paper's task or labels, so their published numbers are no reference: "
                 f"{'; '.join(other_tasks)}. Tables and the k-NN plot mark them {tables.TASK_MARK}, and the tables "
                 "give no Δ; the relative gain chart still draws the paper's gains beside them.")
  diverged = [path for path, data in found["classification"] if data.get("status") == "diverged"]
  if diverged:
    notes.append(f"{len(diverged)} training run(s) diverged (a non-finite loss; `mfjax sweep` records them with "
                 f"status \"diverged\"), e.g. {os.path.relpath(diverged[0], out_dir)}. A learning rate with a "
                 "diverged seed is not selected for its cell, unless every learning rate of the cell diverged (the "
                 "cell then shows n/a).")
  short = [c for c in cells if c.n < max(n for _, n in c.lr_scores.values())]
  if short:
    notes.append(f"{len(short)} cell(s) show fewer seeds at their selected learning rate than another learning "
                 f"rate has, e.g. {short[0].model} on {short[0].dataset} ({short[0].protocol}): lr {short[0].lr:g} "
                 f"with {short[0].n} seed(s). Unfinished runs, or runs in another folder?")
  plotted = results.plotted_cells(cells, notes)
  gain_rows = plots.relative_gains(plotted, notes)
  timing_rows = plots.timing_rows(plotted, notes)
  figures = [plots.relative_gain(gain_rows, plot_dir, notes), *plots.knn(knn, plot_dir, notes),
             plots.timing(timing_rows, plot_dir, notes), *plots.progressive(plotted, plot_dir, notes),
             plots.decapitation(plotted, plot_dir, notes), plots.model_size(plotted, plot_dir, notes),
             plots.resolution(plotted, plot_dir, notes), *(plots.cka_heatmap(r, plot_dir, notes) for r in cka),
             plots.cka_diagonals(cka, plot_dir, notes), plots.segmentation_dice(segment_runs, plot_dir, notes)]
  figures = [f for f in figures if f]

  knn_rows = [{"label": r["label"], "variant": r["variant"], "model": r["model"], "dataset": r["dataset"],
               "setting": r["setting"], "other_task": r["other_task"], "resolution": r["resolution"],
               "metric": r["metric"], "k": k, "headline": v, "file": r["file"]}
              for r in knn for k, v in r["scores"].items()]
  cell_rows = tables.all_cells_rows(cells)
  segment_rows = tables.segmentation_rows(segment_runs)
  pretrain_rows = [{k: r[k] for k in ("model", "start", "steps", "batch", "volumes", "gram", "loss", "backbone")}
                   for r in pretrain_runs]
  data_links = [(name, rel(save_table(name, tables.rows_to_csv(rows))))
                for name, rows in (("all_cells.csv", cell_rows), ("relative_gain.csv", gain_rows),
                                   ("timing.csv", timing_rows), ("knn.csv", knn_rows),
                                   ("segmentation.csv", segment_rows), ("pretraining.csv", pretrain_rows)) if rows]

  blocks = [("heading", 1, "mfjax report"),
            ("text", f"Runs folder: {runs_dir}. {sum(c.n for c in cells)} training runs selected into "
                     f"{len(cells)} cells (from every result.json below it), {len(knn)} k-NN results, "
                     f"{len(cka)} CKA matrices, {len(segment_runs)} segmentation and {len(pretrain_runs)} "
                     "pretraining runs. Each cell shows the test score at the learning rate with the "
                     "best mean validation score, as mean ± std over its seeds; paper values are from "
                     "Huix et al., WACV 2024.")]
  if notes:
    blocks += [("heading", 2, "Notes"), ("items", notes)]
  if table_blocks:
    blocks += [("heading", 2, "Tables")] + table_blocks
  if figures:
    blocks += [("heading", 2, "Figures")]
    blocks += [("image", rel(f["file"]), f["title"], f["caption"]) for f in figures]
  if cell_rows:
    columns = ["model", "dataset", "protocol", "resolution", "unfreeze_from", "keep_blocks", "trained", "n_seeds",
               "lr", "mean", "std"] + (["setting"] if any(c.setting for c in cells) else [])
    blocks += [("heading", 2, "Every cell"),
               ("text", "Every cell found (everything a run's config fixes except lr and seed), with its selected "
                        "lr; all_cells.csv adds the lr search, timing and parameter counts."),
               ("table", columns, [[_show(row[c], c) for c in columns] for row in cell_rows])]
  if segment_rows:
    columns = ["dataset", "model", "backbone", "fold", "epochs", "cases", "dice", "hd95", "nsd"]
    text = ("Validation of each run: MedDINOv3's Dice (per case and class, classes absent from a case skipped, "
            "mean over cases then classes), HD95 in mm and NSD at the run's tolerance as MONAI computes them. "
            "Where several folds of one setup are present, a row gives their mean. segmentation.csv adds the "
            "Dice of each class.")
    if any(row["published_dice"] is not None for row in segment_rows):
      columns.append("published_dice")
      text += (" published_dice is MedDINOv3's AMOS22 mean Dice for the same network and weights (its Tables 1 "
               "and 3: 0.8481 from the original DINOv3 ViT-B/16, 0.8551 from MedDINOv3's), reached with the "
               "full recipe (1000 epochs x 250 iterations) on its own split, with CT-3M pretraining that saw "
               "AMOS22's test images: a guide to how far a run is from the paper, not a matched cell.")
    blocks += [("heading", 2, "MedDINOv3 segmentation (mfjax segment)"), ("text", text),
               ("table", columns, [[_show(row[c], c) for c in columns] for row in segment_rows])]
  if pretrain_rows:
    columns = ["model", "start", "steps", "batch", "volumes", "gram", "loss", "backbone"]
    blocks += [("heading", 2, "MedDINOv3 pretraining (mfjax pretrain)"),
               ("text", "Each pretraining run: where it started, its length, whether Gram anchoring was on, the "
                        "final total loss and its exported backbone."),
               ("table", columns, [[_show(row[c], c) for c in columns] for row in pretrain_rows])]
  if data_links:
    blocks += [("heading", 2, "Data"), ("links", data_links)]

  _write(os.path.join(stage, PAGES[0]), page.markdown(blocks))
  _write(os.path.join(stage, PAGES[1]), page.html(blocks, "mfjax report"))
  tables_written, plots_written = [rel(p) for p in written_tables], [rel(f["file"]) for f in figures]
  return {"files": list(PAGES) + tables_written + plots_written, "tables": tables_written, "plots": plots_written,
          "notes": notes}


def _show(value, column: str) -> str:
  if value is None:
    return ""
  if column == "lr":
    return f"{value:g}"
  if column == "published_dice":  # as printed: percent with two decimals
    return tables.fmt(value, 4)
  if isinstance(value, float):
    return tables.fmt(value)
  return str(value)

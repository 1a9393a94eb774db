"""PNG plots of every study, drawn with matplotlib's object API (no pyplot state, no backend switch).

Each function takes cells (or k-NN / CKA results), writes one PNG and returns
{"file", "title", "caption"} for the report page, or None when there is nothing to draw; what
it could not draw is said in `notes`. Colours are the Okabe-Ito palette (colourblind-safe)
with a fixed colour and marker per foundation in every plot.
"""
import math
import os
import re

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mfjax.report import paper
from mfjax.report.tables import (MAIN_PROTOCOLS, TASK_MARK, VARIANT_MARK, column_title, main_resolution, model_order,
                                 ordered_datasets)

OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "grey": "#999999"}
FOUNDATION_STYLE = {
    "imnet1k_sup": (OKABE_ITO["black"], "o"), "dinov1": (OKABE_ITO["sky"], "s"), "dinov2": (OKABE_ITO["blue"], "D"),
    "sam": (OKABE_ITO["vermillion"], "^"), "seem": (OKABE_ITO["orange"], "v"), "openclip": (OKABE_ITO["green"], "P"),
    "blip": (OKABE_ITO["purple"], "X"), "resnet152": (OKABE_ITO["grey"], "h"),
}
# Models the paper does not have: Paul Tol's muted palette (also colourblind-safe), then repeats.
EXTRA_COLOURS = ("#882255", "#44AA99", "#332288", "#999933", "#AA4499", "#117733", "#88CCEE", "#DDCC77")
EXTRA_MARKERS = ("*", "p", "d", "<", ">", "8", "H", "1")
# Frozen: blues, unfrozen: oranges; linear head light, stacked DeiT-B dark.
PROTOCOL_STYLE = {"frozen_linear": (OKABE_ITO["sky"], "frozen, linear"),
                  "frozen_deit": (OKABE_ITO["blue"], "frozen, DeiT-B"),
                  "unfrozen_linear": (OKABE_ITO["orange"], "unfrozen, linear"),
                  "unfrozen_deit": (OKABE_ITO["vermillion"], "unfrozen, DeiT-B")}
PROTOCOL_LINES = {"frozen_linear": ":", "frozen_deit": "-.", "unfrozen_linear": "-", "unfrozen_deit": "--"}
DPI = 150


def model_styles(models) -> dict:
  """model -> (colour, marker): the paper's foundations fixed, the others in sorted order."""
  styles, extra = {}, 0
  for model in sorted(set(models), key=model_order):
    key = paper.foundation_of(model)
    if key:
      styles[model] = FOUNDATION_STYLE[key]
    else:
      styles[model] = (EXTRA_COLOURS[extra % len(EXTRA_COLOURS)], EXTRA_MARKERS[extra % len(EXTRA_MARKERS)])
      extra += 1
  return styles


def _grid(n: int, width: float = 4.2, height: float = 3.4, columns: int = 4, **kwargs):
  cols = min(n, columns)
  rows = math.ceil(n / cols)
  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False, **kwargs).ravel()
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, axes[:n]


def _save(fig, out_dir: str, name: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name + ".png")
  # "tight" grows the canvas to hold every title and label: a one-dataset figure is narrower
  # than its suptitle.
  fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
  return path


def _metric_label(cells, dataset: str) -> str:
  metrics = sorted({c.metric for c in cells if c.dataset == dataset})
  return "test " + " / ".join(m.replace("_", " ") for m in metrics)


def _datasets(cells) -> list[str]:
  return ordered_datasets(c.dataset for c in cells)


def _legend_below(fig, handles, labels):
  """A legend under the panels, with as many columns as fit the figure's width."""
  if handles:
    longest = max(len(label) for label in labels)
    fit = max(1, int(fig.get_figwidth() / (0.6 + 0.075 * longest)))
    fig.legend(handles, labels, loc="outside lower center", ncols=min(fit, len(labels)), frameon=False)


# ----------------------------------------------------------------------------- Fig. 1


def relative_gains(cells, notes: list) -> list[dict]:
  """Relative gain (%) of each foundation x protocol over ImNet-1k-Sup fine-tuned with a linear head.

  mfjax's gains (source "mfjax") use the baseline run on the same dataset at the main resolution;
  the paper's (source "paper") come from its Tables 1-2, for the datasets that have mfjax runs.
  """
  main = main_resolution(cells)
  if main is None:
    return []
  cells = [c for c in cells if c.protocol in MAIN_PROTOCOLS and c.resolution == main]
  datasets = _datasets(cells)
  baseline = {c.dataset: c for c in cells if c.model == paper.BASELINE_MODEL and c.protocol == "unfrozen_linear"}
  rows = []
  unscored = sorted(d for d, c in baseline.items() if not np.isfinite(c.mean))
  if unscored:
    notes.append(f"Relative gain chart: the {paper.BASELINE_MODEL} unfrozen_linear baseline has no finite score on "
                 f"{', '.join(unscored)} (every learning rate diverged?); only the paper's gains are drawn there.")
  zero = sorted(d for d, c in baseline.items() if c.mean == 0)
  if zero:  # a gain relative to 0 is undefined (a kappa of 0: chance agreement)
    notes.append(f"Relative gain chart: the {paper.BASELINE_MODEL} unfrozen_linear baseline scores exactly 0 on "
                 f"{', '.join(zero)}, against which no relative gain exists; only the paper's gains are drawn there.")
    unscored = sorted(unscored + zero)
  baseline = {d: c for d, c in baseline.items() if np.isfinite(c.mean) and c.mean != 0}
  for c in cells:
    if c.dataset in baseline and c is not baseline[c.dataset]:
      base = baseline[c.dataset].mean
      rows.append({"source": "mfjax", "dataset": c.dataset, "protocol": c.protocol, "model": c.model,
                   "resolution": main, "gain_percent": 100 * (c.mean - base) / base})
  missing = [d for d in datasets if d not in baseline and d not in unscored]
  if missing:
    notes.append(f"Relative gain chart: no {paper.BASELINE_MODEL} unfrozen_linear run (the ImNet-1k-Sup baseline) "
                 f"at {main} px on {', '.join(missing)}; only the paper's gains are drawn there.")
  published = [r for r in paper.published() if r["table"] in ("table1", "table2")]
  paper_base = {r["dataset"]: r["mean"] for r in published
                if r["table"] == "table2" and r["classifier"] == "linear" and r["foundation"] == "imnet1k_sup"}
  by_foundation = {v: k for k, v in paper.FOUNDATIONS.items()}
  for r in published:
    protocol = f"{r['foundation_state']}_{'deit' if r['classifier'] == 'deit_b' else 'linear'}"
    if r["dataset"] in datasets and not (protocol == "unfrozen_linear" and r["foundation"] == "imnet1k_sup"):
      base = paper_base[r["dataset"]]
      rows.append({"source": "paper", "dataset": r["dataset"], "protocol": protocol,
                   "model": by_foundation[r["foundation"]], "resolution": 224,
                   "gain_percent": 100 * (r["mean"] - base) / base})
  return rows


def relative_gain(rows: list[dict], out_dir: str, notes: list) -> dict | None:
  """Fig. 1 from `relative_gains` rows: one panel per dataset, mfjax filled, paper open."""
  if not rows:
    return None
  ours = {(r["protocol"], r["model"], r["dataset"]): r["gain_percent"] for r in rows if r["source"] == "mfjax"}
  theirs = {(r["protocol"], r["model"], r["dataset"]): r["gain_percent"] for r in rows if r["source"] == "paper"}
  main = next((r["resolution"] for r in rows if r["source"] == "mfjax"), 224)
  datasets = ordered_datasets(r["dataset"] for r in rows)
  baseline = {r["dataset"] for r in rows if r["source"] == "mfjax"}
  combos = sorted({k[:2] for k in (*ours, *theirs)},
                  key=lambda k: (list(MAIN_PROTOCOLS).index(k[0]), model_order(k[1])))
  combos.reverse()  # first combo at the top
  fig, axes = _grid(len(datasets), width=3.6, height=0.26 * len(combos) + 1.6, sharey=True)
  y = np.arange(len(combos))
  for ax, dataset in zip(axes, datasets):
    ax.axvline(0, color="0.3", lw=1)
    for i, (protocol, model) in enumerate(combos):
      colour = PROTOCOL_STYLE[protocol][0]
      mine, published_gain = ours.get((protocol, model, dataset)), theirs.get((protocol, model, dataset))
      if mine is not None and published_gain is not None:
        ax.plot([mine, published_gain], [i, i], color="0.75", lw=1, zorder=1)
      if published_gain is not None:
        ax.plot(published_gain, i, marker="o", mfc="white", mec=colour, mew=1.6, ms=7, ls="", zorder=2)
      if mine is not None:
        ax.plot(mine, i, marker="o", color=colour, ms=7, ls="", zorder=3)
    ax.set_title(column_title(dataset) + ("" if dataset in baseline else "\n(no baseline run: paper only)"),
                 fontsize=10)
    ax.set_xlabel("relative gain over ImNet-1k-Sup (%)")
    ax.grid(axis="x", alpha=0.3)
  for ax in axes:
    for i in range(1, len(combos)):
      if combos[i][0] != combos[i - 1][0]:
        ax.axhline(i - 0.5, color="0.6", lw=0.8, ls="--")
  axes[0].set_yticks(y, [f"{paper.title_of(m)} · {PROTOCOL_STYLE[p][1]}" for p, m in combos], fontsize=8)
  axes[0].set_ylim(-0.7, len(combos) - 0.3)
  handles = [axes[0].plot([], [], marker="o", color=PROTOCOL_STYLE[p][0], ls="", ms=7)[0] for p in MAIN_PROTOCOLS]
  labels = [PROTOCOL_STYLE[p][1] for p in MAIN_PROTOCOLS]
  handles += [axes[0].plot([], [], marker="o", color="0.2", ls="", ms=7)[0],
              axes[0].plot([], [], marker="o", mfc="white", mec="0.2", mew=1.6, ls="", ms=7)[0]]
  labels += ["mfjax (filled)", "paper (open)"]
  _legend_below(fig, handles, labels)
  resolution_note = "" if main == 224 else f" (mfjax at {main} px, paper at 224 px)"
  fig.suptitle(f"Gain over fine-tuned ImNet-1k-Sup\nwith a linear head (paper Fig. 1){resolution_note}")
  return {"file": _save(fig, out_dir, "relative_gain"), "title": "Relative gain over the ImageNet baseline",
          "caption": "100 × (score − baseline) / baseline, the baseline being ImNet-1k-Sup (DeiT-B, supervised "
                     "on ImageNet-1k) fine-tuned with a linear head on the same dataset. Filled: mfjax; open: the "
                     "paper's Tables 1-2; a grey line joins the two."}


# ----------------------------------------------------------------------------- cell studies


def _line_panels(groups: dict, cells: list, styles: dict, xlabel: str, title: str, out_dir: str, name: str,
                 rows_title: dict | None = None, xticks=None) -> str:
  """groups: {(row, dataset): {series_key: [(x, mean, std)]}}; series_key = (model, linestyle, label).

  One column of panels per dataset of `cells`, one row per key of rows_title (or a single row).
  """
  datasets = _datasets(cells)
  present = {r for r, _ in groups}
  row_keys = [r for r in rows_title if r in present] if rows_title else [None]
  fig, axes = _grid(len(row_keys) * len(datasets), columns=len(datasets))
  axes = np.asarray(axes).reshape(len(row_keys), len(datasets))
  seen = {}
  for i, row in enumerate(row_keys):
    for j, dataset in enumerate(datasets):
      ax = axes[i, j]
      series = groups.get((row, dataset), {})
      for (model, linestyle, label), points in sorted(series.items(), key=lambda kv: (model_order(kv[0][0]),
                                                                                       kv[0][2])):
        points = sorted(points)
        xs, means, stds = (np.array(v, float) for v in zip(*points))
        colour, marker = styles[model]
        line = ax.errorbar(xs, means, yerr=np.nan_to_num(stds), color=colour, marker=marker, ls=linestyle,
                           capsize=3, ms=6, lw=1.6)
        seen.setdefault(label, line)
      if not series:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="0.5")
      heading = column_title(dataset)
      if rows_title:
        heading = f"{heading}: {rows_title[row]}"
      ax.set_title(heading, fontsize=10)
      ax.set_xlabel(xlabel)
      ax.set_ylabel(_metric_label(cells, dataset))
      ax.grid(alpha=0.3)
      if xticks:
        ax.set_xticks(*xticks(dataset))
      else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  _legend_below(fig, list(seen.values()), list(seen))
  fig.suptitle(title)
  return _save(fig, out_dir, name)


def progressive(cells, out_dir: str, notes: list) -> list[dict]:
  """Fig. 4: test score against the first trained block (earlier blocks frozen), per dataset."""
  cells = [c for c in cells if c.protocol == "progressive"]
  figures = []
  for head in sorted({c.head for c in cells}):
    chosen = [c for c in cells if c.head == head]
    groups = {}
    for c in chosen:
      label = paper.title_of(c.model) + ("" if c.resolution == 224 else f" @{c.resolution}px")
      groups.setdefault((None, c.dataset), {}).setdefault((c.model, "-", label), []).append(
          (c.unfreeze_from, c.mean, c.std))
    head_name = paper.CLASSIFIERS.get(head, head)
    path = _line_panels(groups, chosen, model_styles(c.model for c in chosen),
                        "blocks kept frozen (training starts at this block)",
                        f"Progressive freezing, {head_name} head (paper Fig. 4)", out_dir, f"progressive_{head}")
    figures.append({"file": path, "title": f"Progressive freezing ({head_name} head)",
                    "caption": "Blocks before x stay frozen (with the embeddings, final norm and projection); "
                               "blocks from x on train. x = 0 trains every block. Error bars: std over seeds."})
  return figures


def decapitation(cells, out_dir: str, notes: list) -> dict | None:
  """Fig. 5: test score against the number of foundation blocks kept under the DeiT-B head."""
  cells = [c for c in cells if c.protocol == "decapitation"]
  if not cells:
    return None
  groups = {}
  for c in cells:
    label = paper.title_of(c.model) + ("" if c.resolution == 224 else f" @{c.resolution}px")
    groups.setdefault((c.trained, c.dataset), {}).setdefault((c.model, "-", label), []).append(
        (c.keep_blocks, c.mean, c.std))
  path = _line_panels(groups, cells, model_styles(c.model for c in cells),
                      "foundation blocks kept", "Decapitated foundations + DeiT-B (paper Fig. 5)",
                      out_dir, "decapitation", rows_title={True: "foundation trained", False: "foundation frozen"})
  return {"file": path, "title": "Decapitation",
          "caption": "Only the first x blocks (stages) of the foundation feed the stacked DeiT-B classifier, "
                     "the kept blocks trained with it or frozen (one row each). Error bars: std over seeds."}


def _dinov2_size(model: str) -> tuple[int, bool] | None:
  """(0..3 for ViT-S/B/L/g, with registers) for a DINOv2 model name, else None."""
  match = re.fullmatch(r"dinov2_vit([sblg])14(_reg4)?", model)
  return ("sblg".index(match[1]), bool(match[2])) if match else None


def _count(n: int) -> str:
  return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def model_size(cells, out_dir: str, notes: list) -> dict | None:
  """Fig. 6: DINOv2 ViT-S/B/L/g, one line per protocol (and resolution, registers), per dataset."""
  series = {}
  for c in cells:
    size = _dinov2_size(c.model)
    if size and c.protocol in MAIN_PROTOCOLS:
      series.setdefault((c.dataset, c.protocol, c.resolution, size[1]), []).append((size[0], c))
  single = sorted({f"{key[1]} on {key[0]}" for key, points in series.items() if len(points) == 1})
  series = {key: points for key, points in series.items() if len(points) > 1}  # one cell per size
  if single and series:
    notes.append(f"Model-size plot: one DINOv2 size only, not drawn: {', '.join(single)}.")
  if not series:
    return None
  datasets = ordered_datasets(key[0] for key in series)
  fig, axes = _grid(len(datasets))
  seen = {}
  for ax, dataset in zip(axes, datasets):
    ticks = {}
    for (_, protocol, res, registers), points in sorted(item for item in series.items() if item[0][0] == dataset):
      points.sort(key=lambda p: p[0])
      colour, name = PROTOCOL_STYLE.get(protocol, (OKABE_ITO["grey"], protocol))
      line = ax.errorbar([p[0] for p in points], [c.mean for _, c in points],
                         yerr=np.nan_to_num([c.std for _, c in points]), color=colour, marker="o",
                         ls="--" if registers else "-", capsize=3, lw=1.6)
      seen.setdefault(name + ("" if res == 224 else f" @{res}px") + (" (registers)" if registers else ""), line)
      for size, c in points:
        ticks.setdefault(size, paper.SIZES["sblg"[size]] + (f"\n{_count(c.params_total)}" if c.params_total else ""))
    ax.set_xticks(sorted(ticks), [ticks[t] for t in sorted(ticks)])
    ax.set_xlabel("DINOv2 size (parameters in total)")
    ax.set_title(column_title(dataset), fontsize=10)
    ax.set_ylabel(_metric_label(cells, dataset))
    ax.grid(alpha=0.3)
  _legend_below(fig, list(seen.values()), list(seen))
  fig.suptitle("DINOv2 model size (paper Fig. 6)")
  return {"file": _save(fig, out_dir, "model_size"), "title": "Model size",
          "caption": "DINOv2 ViT-S/B/L/g, with the parameter count of each trained model (foundation and head). "
                     "Error bars: std over seeds."}


def resolution(cells, out_dir: str, notes: list) -> dict | None:
  """Table 3 as a plot: test score against input resolution, per (model, protocol)."""
  cells = [c for c in cells if c.protocol in MAIN_PROTOCOLS]
  counts = {}
  for c in cells:
    counts.setdefault((c.model, c.dataset, c.protocol), set()).add(c.resolution)
  cells = [c for c in cells if len(counts[(c.model, c.dataset, c.protocol)]) > 1]
  if not cells:
    return None
  groups = {}
  for c in cells:
    label = f"{paper.title_of(c.model)} · {PROTOCOL_STYLE[c.protocol][1]}"
    groups.setdefault((None, c.dataset), {}).setdefault((c.model, PROTOCOL_LINES[c.protocol], label), []).append(
        (c.resolution, c.mean, c.std))

  def ticks(dataset):
    values = sorted({c.resolution for c in cells if c.dataset == dataset})
    return values, [str(v) for v in values]

  path = _line_panels(groups, cells, model_styles(c.model for c in cells), "input resolution (px)",
                      "Input resolution (paper Table 3)", out_dir, "resolution", xticks=ticks)
  return {"file": path, "title": "Resolution",
          "caption": "Test score at each trained resolution; line style = protocol. Error bars: std over seeds."}


# ----------------------------------------------------------------------------- Fig. 3


def timing_rows(cells, notes: list) -> list[dict]:
  """Per main-protocol cell: iterations to the best epoch and time per test image, relative to the
  ImNet-1k-Sup baseline (deit_base_patch16) on the same dataset and resolution with the same
  protocol, or else with the linear head and the same foundation state."""
  cells = [c for c in cells if c.protocol in MAIN_PROTOCOLS]
  index = {(c.model, c.dataset, c.resolution, c.protocol): c for c in cells}
  rows, missing = [], set()
  for c in cells:
    state = MAIN_PROTOCOLS[c.protocol][0]
    base = (index.get((paper.BASELINE_MODEL, c.dataset, c.resolution, c.protocol))
            or index.get((paper.BASELINE_MODEL, c.dataset, c.resolution, f"{state}_linear")))
    if base is None:
      missing.add((c.dataset, c.resolution, state))
      continue
    iterations, base_iterations = np.nanmean(c.iterations_to_best), np.nanmean(base.iterations_to_best)
    speed, base_speed = np.nanmean(c.images_per_second), np.nanmean(base.images_per_second)
    rows.append({"model": c.model, "dataset": c.dataset, "resolution": c.resolution, "protocol": c.protocol,
                 "baseline_protocol": base.protocol, "iterations_to_best": float(iterations),
                 "baseline_iterations_to_best": float(base_iterations),
                 "train_time_ratio": float(iterations / base_iterations) if base_iterations > 0 else float("nan"),
                 "test_images_per_second": float(speed), "baseline_test_images_per_second": float(base_speed),
                 "inference_time_ratio": float(base_speed / speed) if speed > 0 else float("nan")})
  for dataset, res, state in sorted(missing):
    notes.append(f"Timing: no {paper.BASELINE_MODEL} {state} run on {dataset} at {res} px to compare with.")
  return rows


DATASET_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")


def timing(rows: list[dict], out_dir: str, notes: list) -> dict | None:
  if not rows:
    return None
  panels = [("Train time: unfrozen", "train_time_ratio", lambda r: r["protocol"].startswith("unfrozen")),
            ("Train time: frozen", "train_time_ratio", lambda r: r["protocol"].startswith("frozen")),
            ("Inference time", "inference_time_ratio", lambda r: True)]
  panels = [p for p in panels if any(p[2](r) for r in rows)]
  combos = sorted({(r["model"], MAIN_PROTOCOLS[r["protocol"]][1]) for r in rows},
                  key=lambda k: (k[1] != "linear", model_order(k[0])))[::-1]
  datasets = ordered_datasets(r["dataset"] for r in rows)
  marker_of = {d: DATASET_MARKERS[i % len(DATASET_MARKERS)] for i, d in enumerate(datasets)}
  styles = model_styles(r["model"] for r in rows)
  fig, axes = _grid(len(panels), width=4.6, height=0.34 * len(combos) + 2.0, sharey=True)
  y = {combo: i for i, combo in enumerate(combos)}
  for ax, (title, key, keep) in zip(axes, panels):
    ax.axvline(1, color="0.3", lw=1)
    right = 1.3
    for combo in combos:
      chosen = [r for r in rows if keep(r) and (r["model"], MAIN_PROTOCOLS[r["protocol"]][1]) == combo
                and math.isfinite(r[key])]
      if not chosen:
        continue
      values = [r[key] for r in chosen]
      colour = styles[combo[0]][0]
      ax.barh(y[combo], np.mean(values), color=colour, alpha=0.35 if combo[1] == "linear" else 0.6,
              edgecolor=colour, height=0.7)
      for r in chosen:
        ax.plot(r[key], y[combo], marker=marker_of[r["dataset"]], mfc="white", mec="0.15", ls="", ms=5)
      ax.text(max(values + [np.mean(values)]), y[combo], f"  {np.mean(values):.2f}×", va="center", fontsize=8)
      right = max(right, max(values) * 1.25)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("relative to ImNet-1k-Sup (1 = same)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlim(0, right)
  axes[0].set_yticks(list(y.values()), [f"{paper.title_of(m)} · {paper.CLASSIFIERS[h]}" for m, h in combos],
                     fontsize=8)
  handles = [axes[0].plot([], [], marker=marker_of[d], mfc="white", mec="0.15", ls="", ms=6)[0] for d in datasets]
  _legend_below(fig, handles, [column_title(d).split(",")[0] for d in datasets])
  fig.suptitle("Training and inference time relative to ImNet-1k-Sup (paper Fig. 3)")
  return {"file": _save(fig, out_dir, "timing"), "title": "Training and inference time",
          "caption": "Train time = iterations until the best validation epoch; inference time = seconds per "
                     "test image; both divided by ImNet-1k-Sup's on the same dataset and protocol (its linear-"
                     "head run where it has no stacked one). Bars: mean over datasets; markers: each dataset."}


# ----------------------------------------------------------------------------- k-NN (Fig. 2)


def default_k(result: dict) -> int:
  """k = 200 (the paper's) when evaluated, else the evaluated k nearest to it."""
  return min(result["scores"], key=lambda k: (abs(k - 200), k))


def knn(results: list[dict], out_dir: str, notes: list) -> list[dict]:
  if not results:
    return []
  datasets = ordered_datasets(r["dataset"] for r in results)
  styles = model_styles(r["model"] for r in results)
  # One row per model and resolution: results at another resolution than 224 px say theirs.
  results = [dict(r, display=r["display"] + ("" if r["resolution"] == 224 else f" @ {r['resolution']} px"))
             for r in results]
  missing = [f"{r['display']} on {r['dataset']}" for r in results if not np.isfinite(r["scores"][default_k(r)])]
  if missing:
    notes.append(f"k-NN plot: no finite score for {', '.join(missing)} (left blank).")
  labels = sorted({r["display"] for r in results}, key=lambda l: (model_order(next(
      r["model"] for r in results if r["display"] == l)), l))[::-1]
  fig, axes = _grid(len(datasets), width=3.8, height=0.32 * len(labels) + 1.8, sharey=True)
  y = {label: i for i, label in enumerate(labels)}
  ks = set()
  for ax, dataset in zip(axes, datasets):
    for r in results:
      if r["dataset"] != dataset:
        continue
      k = default_k(r)
      ks.add(k)
      value = r["scores"][k]
      if not np.isfinite(value):
        continue
      colour, marker = styles[r["model"]]
      ax.hlines(y[r["display"]], 0, value, color=colour, lw=2, alpha=0.5)
      ax.plot(value, y[r["display"]], marker=marker, color=colour, ms=8, ls="")
      ax.text(value, y[r["display"]], f"  {value:.3f}" + ("" if k == 200 else f" (k={k})"), va="center", fontsize=8)
    metrics = {r["metric"] for r in results if r["dataset"] == dataset} - {""}
    ax.set_title(column_title(dataset), fontsize=10)
    ax.set_xlabel("k-NN " + (" / ".join(sorted(metrics)).replace("_", " ") if metrics else "headline"))
    finite = [r["scores"][default_k(r)] for r in results if r["dataset"] == dataset]
    finite = [v for v in finite if np.isfinite(v)] or [0.0]
    low = min(finite)
    ax.set_xlim(low - 0.15 if low < 0 else max(0.0, low - 0.15), 1.08)  # a negative kappa stays in view
    ax.grid(axis="x", alpha=0.3)
  axes[0].set_yticks(list(y.values()), list(y), fontsize=8)
  temperatures = ", ".join(f"{t:g}" for t in sorted({r["temperature"] for r in results}))
  if "," in temperatures:
    notes.append(f"k-NN results at different temperatures ({temperatures}) are drawn side by side; the paper's "
                 "is 0.1.")
  fig.suptitle("k-NN on frozen features (paper Fig. 2): "
               + ("k = 200" if ks == {200} else f"k = {', '.join(map(str, sorted(ks)))}") + f", T = {temperatures}")
  figures = [{"file": _save(fig, out_dir, "knn"), "title": "k-NN evaluation",
              "caption": f"Weighted k-NN (cosine similarity, weights exp(sim/T), T = {temperatures}) of each model's "
                         "pooled feature; "
                         "bank = training split under eval transforms, queries = test split."
                         + (f" {VARIANT_MARK}: random weights (no model.checkpoint) or a changed architecture."
                            if any(r["variant"] for r in results) else "")
                         + (f" {TASK_MARK}: not the paper's task or labels (the dataset's build options in brackets)."
                            if any(r["other_task"] for r in results) else "")}]
  if any(len(r["scores"]) > 1 for r in results):
    fig, axes = _grid(len(datasets))
    seen = {}
    for ax, dataset in zip(axes, datasets):
      for r in sorted((r for r in results if r["dataset"] == dataset), key=lambda r: model_order(r["model"])):
        colour, marker = styles[r["model"]]
        label = r["display"]
        line, = ax.plot(list(r["scores"]), list(r["scores"].values()), color=colour, marker=marker, lw=1.6)
        seen.setdefault(label, line)
      ks_here = sorted({k for r in results if r["dataset"] == dataset for k in r["scores"]})
      ax.set_xscale("log")
      ax.set_xticks(ks_here, [str(k) for k in ks_here])
      ax.minorticks_off()
      ax.set_xlabel("k (neighbours, log scale)")
      metrics = {r["metric"] for r in results if r["dataset"] == dataset} - {""}
      ax.set_ylabel("k-NN " + (" / ".join(sorted(metrics)).replace("_", " ") if metrics else "headline"))
      ax.set_title(column_title(dataset), fontsize=10)
      ax.grid(alpha=0.3)
    _legend_below(fig, list(seen.values()), list(seen))
    fig.suptitle("k-NN score against k")
    figures.append({"file": _save(fig, out_dir, "knn_vs_k"), "title": "k-NN against k",
                    "caption": "The same evaluation for every k evaluated."})
  return figures


# ----------------------------------------------------------------------------- CKA (Figs. 7, 8, A.1)


CKA_AXES = {"layers": ("pretrained layer", "fine-tuned layer"), "foundations": ("foundation", "foundation"),
            "stacked": ("DeiT-B head layer, before", "DeiT-B head layer, after")}
CKA_FIGURE = {"layers": "Fig. 7", "foundations": "Fig. 8", "stacked": "Fig. A.1"}


def _thin_ticks(labels, most=16):
  step = max(1, math.ceil(len(labels) / most))
  positions = list(range(0, len(labels), step))
  return positions, [labels[i] for i in positions]


def cka_title(result: dict) -> str:
  model = paper.title_of(result["model"]) if result.get("model") else result["name"]
  where = f" on {column_title(result['dataset']).split(',')[0]}" if result.get("dataset") else ""
  if result["kind"] == "layers":
    return f"{model}: pretrained vs fine-tuned{where}"
  if result["kind"] == "stacked":
    return f"DeiT-B head on {model}: before vs after fine-tuning{where}"
  return f"Last-layer CKA between foundations{where}"


def cka_heatmap(result: dict, out_dir: str, notes: list) -> dict:
  matrix = result["matrix"]
  rows, cols = len(result["rows"]), len(result["cols"])
  side = max(3.6, min(9.0, 0.42 * max(rows, cols) + 2.2))
  fig = Figure(figsize=(side * max(1.0, cols / max(rows, 1)) ** 0.5 + 1.0, side), layout="constrained")
  ax = fig.subplots()
  image = ax.imshow(np.ma.masked_invalid(matrix), origin="lower", cmap="magma", vmin=0.0, vmax=1.0,
                    aspect="auto")
  fig.colorbar(image, ax=ax, label="linear CKA", shrink=0.85)
  if max(rows, cols) <= 16:
    size = 8 if max(rows, cols) <= 12 else 6
    for i in range(rows):
      for j in range(cols):
        v = matrix[i, j]
        text = "n/a" if not np.isfinite(v) else f"{v:.2f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=size,
                color="black" if np.isfinite(v) and v > 0.6 else "white")
  row_axis, col_axis = CKA_AXES[result["kind"]]
  ax.set_ylabel(result.get("row_axis", row_axis))
  ax.set_xlabel(result.get("col_axis", col_axis))
  ax.set_yticks(*_thin_ticks(result["rows"]))
  positions, labels = _thin_ticks(result["cols"])
  ax.set_xticks(positions, labels, rotation=45 if max(map(len, labels), default=0) > 3 else 0, ha="right"
                if max(map(len, labels), default=0) > 3 else "center")
  title = result.get("title") or cka_title(result)
  ax.set_title(title, fontsize=10)
  if np.isnan(matrix).any():
    notes.append(f"CKA {result['file']}: {int(np.isnan(matrix).sum())} entries are undefined (a constant "
                 "representation); drawn blank.")
  return {"file": _save(fig, out_dir, f"cka_{result['name']}"), "title": title,
          "caption": f"Linear CKA ({CKA_FIGURE[result['kind']]} in the paper); 1 = the same representation up to "
                     f"rotation and scale. Source: {result['file']}."}


def cka_diagonals(results: list[dict], out_dir: str, notes: list) -> dict | None:
  """CKA of each layer with itself before and after fine-tuning, one line per "layers" heatmap."""
  square = [r for r in results if r["kind"] in ("layers", "stacked") and r["matrix"].shape[0] == r["matrix"].shape[1]]
  if not square:
    return None
  fig = Figure(figsize=(8, 4.2 + 0.2 * len(square)), layout="constrained")
  ax = fig.subplots()
  styles = model_styles(r.get("model", r["name"]) for r in square)
  for r in square:
    colour, marker = styles[r.get("model", r["name"])]
    label = r.get("title") or cka_title(r)
    ax.plot(np.arange(len(r["rows"])), np.diag(r["matrix"]), marker=marker, color=colour, lw=1.6,
            ls="-" if r["kind"] == "layers" else "--", label=label)
  ax.set_xlabel("layer index")
  ax.set_ylabel("CKA(layer before, same layer after)")
  ax.set_ylim(0, 1.05)
  ax.grid(alpha=0.3)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  _legend_below(fig, *ax.get_legend_handles_labels())
  ax.set_title("How much each layer changed in fine-tuning (1 = unchanged)", fontsize=10)
  return {"file": _save(fig, out_dir, "cka_diagonals"), "title": "Layer change in fine-tuning",
          "caption": "The diagonal of each square CKA heatmap: a layer compared with itself before and after "
                     "fine-tuning (solid: foundation layers; dashed: stacked DeiT-B layers)."}


# ----------------------------------------------------------------------------- segmentation


def _setup_label(run: dict) -> str:
  backbone = run["backbone"]
  short = backbone if backbone == "random init" else os.path.basename(os.path.normpath(backbone))
  return f"{run['model']} · {short}"


def segmentation_bars(runs: list[dict]) -> dict:
  """{dataset: (classes, {setup label: (per-class mean over folds, (folds, classes) values)})} of
  `mfjax segment` runs (results.load_segment_runs). A setup is everything but the fold; labels
  are "model · backbone", numbered where two setups would share one, and the same across
  datasets. A class absent from a fold's validation cases (NaN) does not count in that fold."""
  labels = {}
  for run in runs:
    key = run["setup"][1:]  # a run's setup starts with its dataset
    if key not in labels:
      base = _setup_label(run)
      taken = sum(1 for label in labels.values() if label == base or label.startswith(base + " #"))
      labels[key] = base if not taken else f"{base} #{taken + 1}"
  out = {}
  for dataset in sorted({r["dataset"] for r in runs}):
    setups: dict[tuple, list[dict]] = {}
    for run in runs:
      if run["dataset"] == dataset:
        setups.setdefault(run["setup"][1:], []).append(run)
    classes = list(dict.fromkeys(c for folds in setups.values() for r in folds for c in r["dice_per_class"]))
    bars = {}
    for key, folds in setups.items():
      values = np.array([[r["dice_per_class"].get(c, np.nan) for c in classes] for r in folds])
      present = ~np.isnan(values)
      means = np.where(present.any(0), np.nansum(values, 0) / np.maximum(present.sum(0), 1), np.nan)
      bars[labels[key]] = (means, values)
    out[dataset] = (classes, bars)
  return out


def segmentation_dice(runs: list[dict], out_dir: str, notes: list) -> dict | None:
  """Validation Dice per class of `mfjax segment` runs: a panel per dataset, a bar per setup at
  each class (segmentation_bars), a dot per fold."""
  panels = segmentation_bars([r for r in runs if r["dice_per_class"]])
  if not panels:
    return None
  every_label = list(dict.fromkeys(label for _, bars in panels.values() for label in bars))
  colours = {label: EXTRA_COLOURS[i % len(EXTRA_COLOURS)] for i, label in enumerate(every_label)}
  fig, axes = _grid(len(panels), width=5.2, height=3.6, columns=2)
  for ax, (dataset, (classes, bars)) in zip(axes, panels.items()):
    width = 0.8 / len(bars)
    for i, (label, (means, values)) in enumerate(bars.items()):
      x = np.arange(len(classes)) + (i - (len(bars) - 1) / 2) * width
      ax.bar(x, np.nan_to_num(means), width=width * 0.92, color=colours[label], alpha=0.55,
             edgecolor=colours[label], label=label)
      for row in values:
        ax.plot(x, row, ls="", marker="o", ms=3.5, mfc="white", mec="0.15")
    missing = [c for j, c in enumerate(classes) if all(np.isnan(means[j]) for means, _ in bars.values())]
    if missing:
      notes.append(f"Segmentation, {dataset}: no validation case has {', '.join(missing)}; no Dice to plot.")
    many = len(classes) > 6
    ax.set_xticks(np.arange(len(classes)), classes, rotation=30 if many else 0, ha="right" if many else "center",
                  fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("validation Dice")
    ax.set_title(dataset, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
  handles = {}
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, handle)
  _legend_below(fig, list(handles.values()), list(handles))
  fig.suptitle("MedDINOv3 segmentation: validation Dice per class")
  return {"file": _save(fig, out_dir, "segmentation_dice"), "title": "Segmentation: Dice per class",
          "caption": "One bar per setup (model · backbone; everything but the fold): the mean over its folds of "
                     "MedDINOv3's per-class Dice; dots: each fold. A class absent from a fold's validation "
                     "cases does not count in that fold."}

"""`mfjax report RUNS_DIR`: the reproduction beside the paper's published numbers.

  import mfjax.report
  written = mfjax.report.build("runs/", "runs/report")

reads every `result.json` (training runs), `knn.json` and `cka_*.json` below RUNS_DIR and writes
  report.md, report.html      the page that ties everything together
  tables/*.md|csv|tex         Tables 1-3 layout (frozen/unfrozen x resolution), every cell, k-NN, timing
  plots/*.png                 relative gain (Fig. 1), k-NN (Fig. 2), timing (Fig. 3), progressive freezing
                              (Fig. 4), decapitation (Fig. 5), model size (Fig. 6), resolution, CKA (Figs. 7, 8, A.1)
The tables/ and plots/ files of an earlier report in the same folder are replaced.
"""
import glob
import os

from mfjax.report import page, paper, plots, results, tables
from mfjax.report.results import ReportError

__all__ = ["build", "ReportError", "paper", "results", "tables", "plots", "page"]

OUTPUT_PATTERNS = (("tables", ("*.md", "*.csv", "*.tex")), ("plots", ("*.png",)))


def _clear_previous(out_dir: str) -> None:
  for folder, patterns in OUTPUT_PATTERNS:
    for pattern in patterns:
      for path in glob.glob(os.path.join(glob.escape(os.path.join(out_dir, folder)), pattern)):
        os.remove(path)


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
  cells = results.load_cells(runs_dir, exclude=out_dir)
  knn = results.load_knn(runs_dir, exclude=out_dir)
  cka = results.load_cka(runs_dir, exclude=out_dir)
  if not (cells or knn or cka):
    raise ReportError(f"no result.json, knn.json or cka_*.json below {runs_dir}")
  _clear_previous(out_dir)
  table_dir, plot_dir = os.path.join(out_dir, "tables"), os.path.join(out_dir, "plots")
  notes, written_tables, figures = [], [], []

  def rel(path):
    return os.path.relpath(path, out_dir)

  blocks = [("heading", 1, "mfjax report"),
            ("text", f"Runs folder: {runs_dir}. {sum(c.n for c in cells)} training runs selected into "
                     f"{len(cells)} cells (from every result.json below it), {len(knn)} k-NN results, "
                     f"{len(cka)} CKA matrices. Each cell shows the test score at the learning rate with the "
                     "best mean validation score, as mean ± std over its seeds; paper values are from "
                     "Huix et al., WACV 2024.")]

  comparison = tables.comparison_tables(cells)
  if comparison:
    blocks.append(("heading", 2, "Tables"))
  for table in comparison:
    paths = [_write(os.path.join(table_dir, f"{table['name']}.{ext}"), render(table))
             for ext, render in (("md", tables.to_markdown), ("csv", tables.to_csv), ("tex", tables.to_latex))]
    written_tables += paths
    header = ["Classifier", "Foundation"] + table["column_titles"]
    rows = [[label, row["foundation"]] + [tables.cell_text(row["cells"].get(d)) for d in table["columns"]]
            for label, row in tables.grouped_rows(table)]
    blocks += [("heading", 3, table["title"]), ("text", table["caption"]), ("table", header, rows),
               ("links", [(os.path.basename(p), rel(p)) for p in paths])]

  figures_blocks = []
  gain_rows = plots.relative_gains(cells, notes)
  gain = plots.relative_gain(gain_rows, plot_dir, notes)
  figures += [gain] if gain else []
  figures += plots.knn(knn, plot_dir, notes)
  timing_rows = plots.timing_rows(cells, notes)
  for figure in [plots.timing(timing_rows, plot_dir, notes), *plots.progressive(cells, plot_dir, notes),
                 plots.decapitation(cells, plot_dir, notes), plots.model_size(cells, plot_dir, notes),
                 plots.resolution(cells, plot_dir, notes)]:
    if figure:
      figures.append(figure)
  for result in cka:
    figures.append(plots.cka_heatmap(result, plot_dir, notes))
  diagonals = plots.cka_diagonals(cka, plot_dir, notes)
  if diagonals:
    figures.append(diagonals)
  for figure in figures:
    figures_blocks.append(("image", rel(figure["file"]), figure["title"], figure["caption"]))
  if figures_blocks:
    blocks += [("heading", 2, "Figures")] + figures_blocks

  data_links = []
  if cells:
    rows = tables.all_cells_rows(cells)
    data_links.append(("all_cells.csv", rel(_write(os.path.join(table_dir, "all_cells.csv"), tables.rows_to_csv(rows)))))
    written_tables.append(os.path.join(table_dir, "all_cells.csv"))
  if gain_rows:
    data_links.append(("relative_gain.csv", rel(_write(os.path.join(table_dir, "relative_gain.csv"),
                                                        tables.rows_to_csv(gain_rows)))))
    written_tables.append(os.path.join(table_dir, "relative_gain.csv"))
  if timing_rows:
    data_links.append(("timing.csv", rel(_write(os.path.join(table_dir, "timing.csv"),
                                                 tables.rows_to_csv(timing_rows)))))
    written_tables.append(os.path.join(table_dir, "timing.csv"))
  if knn:
    knn_rows = [{"label": r["label"], "model": r["model"], "dataset": r["dataset"], "resolution": r["resolution"],
                 "metric": r["metric"], "k": k, "headline": v, "file": r["file"]}
                for r in knn for k, v in r["scores"].items()]
    data_links.append(("knn.csv", rel(_write(os.path.join(table_dir, "knn.csv"), tables.rows_to_csv(knn_rows)))))
    written_tables.append(os.path.join(table_dir, "knn.csv"))
  if cells:
    blocks += [("heading", 2, "Every cell"),
               ("text", "Every (model, dataset, protocol, resolution, ...) cell found, with the learning-rate "
                        "search behind it (mean validation score per lr); the data behind every table and plot.")]
    columns = ["model", "dataset", "protocol", "resolution", "unfreeze_from", "keep_blocks", "trained", "n_seeds",
               "lr", "mean", "std"]
    blocks.append(("table", columns, [[_show(row[c], c) for c in columns] for row in rows]))
  if data_links:
    blocks.append(("links", data_links))
  if notes:
    blocks += [("heading", 2, "Notes"), ("items", notes)]

  markdown_path = _write(os.path.join(out_dir, "report.md"), page.markdown(blocks))
  html_path = _write(os.path.join(out_dir, "report.html"), page.html(blocks, "mfjax report"))
  return {"markdown": markdown_path, "html": html_path, "tables": written_tables,
          "plots": [f["file"] for f in figures], "notes": notes}


def _show(value, column: str) -> str:
  if value is None:
    return ""
  if column == "lr":
    return f"{value:g}"
  if isinstance(value, float):
    return tables.fmt(value)
  return str(value)

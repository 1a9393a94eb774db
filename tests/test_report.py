"""mfjax report: fabricated run results -> tables with hand-computed mean ± std and paper deltas,
the paper's numbers as data, bad input, and the whole `mfjax report` command with its plots."""
import csv
import io
import json
import math
import os

import numpy as np
import pytest

from configs import paper as paper_config
from mfjax import cli, report
from mfjax.evals import cka as cka_lib
from mfjax.evals import knn as knn_lib
from mfjax.report import ReportError, paper, plots, results, tables

HEADLINE = {"aptos2019": "quadratic_kappa", "cbis_ddsm": "roc_auc", "isic2019": "macro_recall",
            "chexpert": "mean_auc"}


def write_run(root, model, dataset, protocol, lr, seed, test, val, *, res=224, folder=None, iterations=1000,
              speed=100.0, params=86_000_000, metric=None, pretrained=True, data=None, **protocol_fields):
  """A result.json as mfjax.train.fit writes it, with the config from configs/paper.py; pretrained
  runs name converted checkpoints for the foundation and the stacked DeiT-B."""
  config = paper_config.get_config(f"model={model},dataset={dataset},protocol={protocol},res={res},lr={lr},"
                                   f"seed={seed}").to_dict()
  if pretrained:
    config["model"]["checkpoint"] = f"/ckpt/{model}"
    config["head"]["checkpoint"] = "/ckpt/deit_base_patch16"
  for key, value in protocol_fields.items():
    config["protocol"][key] = value
  config["data"].update(data or {})
  metric = metric or HEADLINE[dataset]
  result = {"config": config, "model": model, "dataset": dataset, "protocol": protocol, "headline_metric": metric,
            "best_epoch": 7, "iterations_to_best": iterations, "val": {metric: val, "headline": val},
            "test": {metric: test, "headline": test}, "params_total": params, "params_trained": params,
            "train_seconds": 10.0, "test_seconds": 1.0, "test_images_per_second": speed, "wall_seconds": 12.0,
            "devices": 1, "device_kind": "cpu"}
  folder = folder or os.path.join(root, f"{model}-{dataset}-{protocol}-{res}-{sorted(protocol_fields.items())}",
                                  f"lr{lr}", f"seed{seed}")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "result.json"), "w") as f:
    json.dump(result, f)
  return os.path.join(folder, "result.json")


def write_cell(root, model, dataset, protocol, tests_by_lr: dict, vals_by_lr: dict, **kw):
  for lr, tests in tests_by_lr.items():
    for seed, (t, v) in enumerate(zip(tests, vals_by_lr[lr])):
      write_run(root, model, dataset, protocol, lr, seed, t, v, **kw)


def sample_std(values):
  mean = sum(values) / len(values)
  return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ----------------------------------------------------------------------------- the paper's numbers


def test_published_numbers_are_consistent():
  rows = paper.published()
  assert len(rows) == 148
  by = {(r["table"], r["classifier"], r["foundation"], r["dataset"]): r for r in rows}
  for table, n_rows in (("table1", 13), ("table2", 13), ("table3", 5), ("tableB1", 3), ("tableB2", 3)):
    assert sum(r["table"] == table for r in rows) == 4 * n_rows
  for r in rows:
    assert r["metric"] == paper.METRICS[r["dataset"]]
    assert 0.4 < r["mean"] < 1.0
  # Tables B.1/B.2 repeat Table 1/2's ResNet152 and DINOv2 rows.
  for b_table, table in (("tableB1", "table1"), ("tableB2", "table2")):
    for foundation in ("resnet152", "dinov2"):
      for dataset in paper.DATASETS:
        b, t = by[(b_table, "linear", foundation, dataset)], by[(table, "linear", foundation, dataset)]
        assert (b["mean"], b["std"]) == (t["mean"], t["std"])
  # Table 3's printed gains are Table 3 minus Table 2 in points; see paper.TABLE3_PRINTED_GAIN for the exceptions.
  for foundation, gains in paper.TABLE3_PRINTED_GAIN.items():
    for dataset, printed in zip(paper.DATASETS, gains):
      classifier = "deit_b" if foundation == "blip" else "linear"
      gain = 100 * (by[("table3", "linear", foundation, dataset)]["mean"]
                    - by[("table2", classifier, foundation, dataset)]["mean"])
      if (foundation, dataset) == ("seem", "cbis_ddsm"):
        assert round(gain, 1) == 0.9 and printed == 0.2
      else:
        assert round(gain, 1) == printed, (foundation, dataset)
  assert paper.lookup("frozen", 224, "deit", "dinov2", "isic2019")["mean"] == 0.790
  assert paper.lookup("unfrozen", 224, "linear", "imnet1k_sup", "chexpert")["std"] == 0.002
  assert paper.lookup("frozen", 224, "deit", "dinov1", "isic2019") is None  # the paper has no such row


# ----------------------------------------------------------------------------- tables


@pytest.fixture
def grid(tmp_path):
  root = str(tmp_path / "runs")
  # DINOv2, unfrozen linear, APTOS: lr 1e-4 has the best mean validation score (0.87 vs 0.86).
  write_cell(root, "dinov2_vitb14", "aptos2019", "unfrozen_linear",
             {1e-5: [0.99, 0.99, 0.99], 1e-4: [0.90, 0.91, 0.93]},
             {1e-5: [0.86, 0.85, 0.87], 1e-4: [0.88, 0.86, 0.87]})
  # DINOv2, frozen DeiT-B, ISIC; CheXpert with mfjax's mean_auc headline (the paper's mean ROC-AUC).
  write_cell(root, "dinov2_vitb14", "isic2019", "frozen_deit", {1e-4: [0.70, 0.74]}, {1e-4: [0.7, 0.7]})
  write_cell(root, "dinov2_vitb14", "chexpert", "unfrozen_linear", {1e-4: [0.80, 0.81]}, {1e-4: [0.8, 0.8]})
  # ImNet-1k-Sup baseline, one seed.
  write_cell(root, "deit_base_patch16", "aptos2019", "unfrozen_linear", {3e-5: [0.88]}, {3e-5: [0.8]})
  # A model the paper does not have, and a CBIS-DDSM task scored differently from the paper.
  write_cell(root, "dinov2_vitl14", "aptos2019", "unfrozen_linear", {1e-4: [0.95, 0.97]}, {1e-4: [0.9, 0.9]})
  write_cell(root, "blip_vitb16", "cbis_ddsm", "unfrozen_deit", {1e-4: [0.60, 0.64]}, {1e-4: [0.6, 0.6]},
             metric="macro_recall")
  return root


def test_runs_with_and_without_tables_resized_at_load_are_not_one_cell(tmp_path):
  root = str(tmp_path / "runs")
  first = write_run(root, "sam_vitb", "aptos2019", "unfrozen_linear", 1e-4, 0, 0.8, 0.8)
  second = write_run(root, "sam_vitb", "aptos2019", "unfrozen_linear", 1e-4, 1, 0.8, 0.8)
  # A diverged run of the cell records the same (before, it left the field out and broke the report).
  diverged = write_run(root, "sam_vitb", "aptos2019", "unfrozen_linear", 1e-3, 0, None, None)
  data = json.loads(open(diverged).read())
  open(diverged, "w").write(json.dumps(dict(data, status="diverged", resized_at_load=True)))
  data = json.loads(open(first).read())
  open(first, "w").write(json.dumps(dict(data, resized_at_load=True)))
  # `second` does not record it: worked out from its config (switch on, SAM at 224 px).
  [cell] = results.load_cells(root)
  assert cell.n == 2
  data = json.loads(open(second).read())
  del data["config"]["model"]["resize_at_load"]  # a run from before the switch
  open(second, "w").write(json.dumps(data))
  cells = {c.setting: c for c in results.load_cells(root)}
  assert sorted(cells) == ["resized_at_load=false", "resized_at_load=true"]
  assert cells["resized_at_load=false"].files == (second,) and cells["resized_at_load=true"].files == (first,)


def test_a_different_task_or_labels_gets_no_delta(tmp_path):
  root = str(tmp_path / "runs")
  lists = {"options": {"layout": "lists", "split": "official"}}
  write_cell(root, "dinov2_vitb14", "cbis_ddsm", "unfrozen_linear", {1e-4: [0.80]}, {1e-4: [0.8]}, data=lists)
  resplit = {"data": {"name": "cbis_ddsm", "options": {"layout": "lists"}}}
  assert "the lists re-split (the paper: split=official" in results.task_differences(resplit)
  write_cell(root, "sam_vitb", "cbis_ddsm", "unfrozen_linear", {1e-4: [0.70]}, {1e-4: [0.7]})  # layout cbis
  write_cell(root, "dinov2_vitb14", "chexpert", "unfrozen_linear", {1e-4: [0.80]}, {1e-4: [0.8]},
             data={"uncertainty": "ignore"})
  write_cell(root, "sam_vitb", "chexpert", "unfrozen_linear", {1e-4: [0.75]}, {1e-4: [0.7]},
             data={"options": {"split": "official", "views": "frontal"}})
  cells = results.load_cells(root)
  table = _table(tables.comparison_tables(cells), "unfrozen_224")
  rows = {r["model"]: r["cells"] for r in table["rows"]}
  assert rows["dinov2_vitb14"]["cbis_ddsm"]["delta"] == pytest.approx(0.80 - rows["dinov2_vitb14"]["cbis_ddsm"]
                                                                       ["paper_mean"])
  for model, dataset in (("sam_vitb", "cbis_ddsm"), ("dinov2_vitb14", "chexpert"), ("sam_vitb", "chexpert")):
    entry = rows[model][dataset]
    assert entry["delta"] is None and entry["paper_mean"] is not None
    assert tables.cell_text(entry) == f"{entry['mean']:.3f} (1 seed) ‡ (paper {entry['paper_mean']:.3f})"
  assert "cbis_ddsm layout=cbis, task=benign_malignant (the paper: its DDSM lists, normal vs abnormal)" \
      in table["caption"]
  assert ("chexpert views=frontal (the paper: all); chexpert split=official, tested on valid.csv"
          in table["caption"]) and "chexpert uncertainty=ignore (the paper: zeros)" in table["caption"]
  assert r"0.700\textsuperscript{1}$^\ddagger$ {\scriptsize[" in tables.to_latex(table)
  assert {r["other_task"] != "" for r in tables.all_cells_rows(cells)} == {True, False}


def _table(tables_list, name):
  return next(t for t in tables_list if t["name"] == name)


def test_tables_match_hand_computed_values(grid):
  cells = results.load_cells(grid)
  dinov2 = next(c for c in cells if c.model == "dinov2_vitb14" and c.dataset == "aptos2019")
  assert dinov2.lr == 1e-4 and dinov2.n == 3
  assert dinov2.lr_scores[1e-5] == (pytest.approx(0.86), 3)
  assert dinov2.mean == pytest.approx((0.90 + 0.91 + 0.93) / 3)
  assert dinov2.std == pytest.approx(sample_std([0.90, 0.91, 0.93]))

  built = tables.comparison_tables(cells)
  assert [t["name"] for t in built] == ["frozen_224", "unfrozen_224"]
  unfrozen = _table(built, "unfrozen_224")
  assert unfrozen["columns"][:4] == ["aptos2019", "cbis_ddsm", "isic2019", "chexpert"]
  rows = {(r["classifier"], r["model"]): r for r in unfrozen["rows"]}
  # Linear rows first in the paper's order (ImNet-1k-Sup before DINOv2), then models the paper lacks.
  assert [k for k in rows] == [("linear", "deit_base_patch16"), ("linear", "dinov2_vitb14"),
                               ("linear", "dinov2_vitl14"), ("deit", "blip_vitb16")]
  entry = rows[("linear", "dinov2_vitb14")]["cells"]["aptos2019"]
  mean, std = (0.90 + 0.91 + 0.93) / 3, sample_std([0.90, 0.91, 0.93])
  assert entry["paper_mean"] == 0.909 and entry["paper_std"] == 0.009
  assert entry["delta"] == pytest.approx(mean - 0.909)
  assert tables.cell_text(entry) == f"{mean:.3f} ± {std:.3f} (paper 0.909, Δ {mean - 0.909:+.3f})"
  assert tables.cell_text(entry) == "0.913 ± 0.015 (paper 0.909, Δ +0.004)"
  chexpert = rows[("linear", "dinov2_vitb14")]["cells"]["chexpert"]
  assert chexpert["paper_mean"] == 0.812 and chexpert["delta"] == pytest.approx(0.805 - 0.812)
  assert "isic2019" not in rows[("linear", "dinov2_vitb14")]["cells"]  # no run: blank
  assert tables.cell_text(rows[("linear", "deit_base_patch16")]["cells"]["aptos2019"]) == \
      "0.880 (1 seed) (paper 0.904, Δ -0.024)"
  assert rows[("linear", "dinov2_vitl14")]["cells"]["aptos2019"]["paper_mean"] is None
  blip = rows[("deit", "blip_vitb16")]["cells"]["cbis_ddsm"]
  assert blip["paper_mean"] is None  # macro recall is not the paper's DDSM metric

  markdown = tables.to_markdown(unfrozen)
  lines = markdown.splitlines()
  assert "| Classifier | Foundation | APTOS2019, κ | DDSM, AUC | ISIC2019, Rec. | CheXpert, AUC |" in lines
  assert lines[4].startswith("| Linear | ImNet-1k-Sup | 0.880 (1 seed) (paper 0.904, Δ -0.024) |")
  assert "|  | DINOv2 | 0.913 ± 0.015 (paper 0.909, Δ +0.004) |  |  | 0.805 ± 0.007 (paper 0.812, Δ -0.007) |" \
      in lines
  assert "| DeiT-B | BLIP |  | 0.620 ± 0.028 ‡ |  |  |" in lines  # CBIS's benign/malignant: not the paper's task

  frozen_rows = list(csv.DictReader(io.StringIO(tables.to_csv(_table(built, "frozen_224")))))
  assert len(frozen_rows) == 1
  row = frozen_rows[0]
  assert (row["classifier"], row["foundation"], row["dataset"]) == ("deit", "dinov2", "isic2019")
  assert float(row["mean"]) == pytest.approx(0.72) and float(row["std"]) == pytest.approx(sample_std([0.70, 0.74]))
  assert float(row["paper_mean"]) == 0.790 and float(row["delta"]) == pytest.approx(0.72 - 0.790)

  latex = tables.to_latex(unfrozen)
  assert r"0.913 $\pm$ 0.015 {\scriptsize[0.909, +0.004]}" in latex
  assert r"APTOS2019, $\kappa$" in latex and "DINOv2 ViT-L/14" in latex
  assert tables.latex_escape("dinov3_vitb16 & 50% {x}") == r"dinov3\_vitb16 \& 50\% \{x\}"
  assert latex.count(r"\\") == 1 + len(unfrozen["rows"])


def test_resolution_table_gain_and_table3(tmp_path):
  # DINOv2 runs the paper's 1024 px at 1022, the largest multiple of its 14-px patches (configs/sweeps/resolution.py).
  root = str(tmp_path / "all")
  write_cell(root, "dinov2_vitb14", "isic2019", "unfrozen_linear", {1e-4: [0.85, 0.86]}, {1e-4: [0.8, 0.8]})
  write_cell(root, "dinov2_vitb14", "isic2019", "unfrozen_linear", {1e-4: [0.89, 0.90]}, {1e-4: [0.8, 0.8]},
             res=1022)
  write_cell(root, "sam_vitb", "isic2019", "unfrozen_linear", {1e-4: [0.80, 0.81]}, {1e-4: [0.8, 0.8]}, res=1024)
  built = tables.comparison_tables(results.load_cells(root))
  assert [t["name"] for t in built] == ["unfrozen_224", "unfrozen_1024"]
  entry = built[1]["rows"][1]["cells"]["isic2019"]
  assert built[1]["rows"][1]["model"] == "dinov2_vitb14"
  assert entry["gain"] == pytest.approx(100 * (0.895 - 0.855))
  assert entry["paper_mean"] == 0.895 and entry["delta"] == pytest.approx(0.0)
  assert tables.cell_text(entry) == "0.895 ± 0.007 [+4.0 pts] (paper 0.895, Δ +0.000)"
  assert built[1]["rows"][0]["cells"]["isic2019"]["paper_mean"] == 0.804  # SAM, at 1024
  assert "Table 3" in built[1]["title"] and "DINOv2 ran at 1022 px" in built[1]["caption"]
  assert results.nominal_resolution("dinov2_vitb14", 518) == 518
  assert results.nominal_resolution("deit_base_patch16", 1022) == 1022

  # The resolution sweep's own folder: Table 3 alone, compared and named as Table 3.
  only = str(tmp_path / "res1024")
  write_cell(only, "dinov2_vitb14", "isic2019", "unfrozen_linear", {1e-4: [0.89, 0.90]}, {1e-4: [0.8, 0.8]},
             res=1022)
  (table,) = tables.comparison_tables(results.load_cells(only))
  assert table["name"] == "unfrozen_1024" and table["title"].endswith("(paper Table 3)")
  assert table["rows"][0]["cells"]["isic2019"]["paper_mean"] == 0.895


def test_main_resolution_other_than_224_compares_with_224_and_says_so(tmp_path):
  root = str(tmp_path)
  write_cell(root, "dinov2_vitb14", "aptos2019", "frozen_linear", {1e-3: [0.5, 0.6]}, {1e-3: [0.5, 0.5]}, res=32)
  (table,) = tables.comparison_tables(results.load_cells(root))
  assert table["paper_resolution"] == 224 and "paper's values are at 224 px" in table["caption"]
  assert table["rows"][0]["cells"]["aptos2019"]["paper_mean"] == 0.881


def test_runs_of_one_slot_with_other_configs_beyond_lr_and_seed_are_separate_cells(tmp_path):
  root = str(tmp_path)
  paths = [write_run(root, "dinov2_vitb14", "aptos2019", "unfrozen_linear", 1e-4, seed, 0.9, 0.9) for seed in (0, 1)]
  with open(paths[1]) as f:
    data = json.load(f)
  data["config"]["data"]["added_by_a_newer_mfjax"] = True  # one-sided: the older run predates the field
  with open(paths[1], "w") as f:
    json.dump(data, f)
  (cell,) = results.load_cells(root)
  assert cell.n == 2
  data["config"]["optim"]["weight_decay"] = 0.05
  with open(paths[1], "w") as f:
    json.dump(data, f)
  cells = results.load_cells(root)
  assert [(c.setting, c.files) for c in cells] == [("optim.weight_decay=0.05", (paths[1],)),
                                                   ("optim.weight_decay=1e-05", (paths[0],))]
  # Free-form dicts compare whole: dataset options (or model overrides) set on one run and not the other.
  data["config"]["optim"]["weight_decay"] = 1e-5
  for section, field, value in (("data", "options", {"layout": "lists"}), ("model", "overrides", {"depth": 6})):
    data["config"][section][field] = value
    with open(paths[1], "w") as f:
      json.dump(data, f)
    assert [c.setting for c in results.load_cells(root)] == [f"{section}.{field}={json.dumps(value)}",
                                                             f"{section}.{field}={{}}"]
    data["config"][section][field] = {}


def test_lr_selection_skips_non_finite_validation(tmp_path):
  root = str(tmp_path)
  write_cell(root, "sam_vitb", "aptos2019", "frozen_linear", {1e-3: [0.1, 0.1], 1e-4: [0.7, 0.8]},
             {1e-3: [float("nan"), 0.99], 1e-4: [0.5, 0.6]})
  (cell,) = results.load_cells(root)
  assert cell.lr == 1e-4 and cell.mean == pytest.approx(0.75)
  assert math.isnan(cell.lr_scores[1e-3][0])


def test_progressive_and_decapitation_are_separate_cells(tmp_path):
  root = str(tmp_path)
  for k in (0, 4, 8):
    write_cell(root, "dinov2_vitb14", "aptos2019", "progressive", {1e-4: [0.9 - k / 100]}, {1e-4: [0.5]},
               unfreeze_from=k)
  for trained in (False, True):
    write_cell(root, "dinov2_vitb14", "aptos2019", "decapitation", {1e-4: [0.8]}, {1e-4: [0.5]}, keep_blocks=5,
               decapitation_trained=trained)
  cells = results.load_cells(root)
  assert sorted(c.unfreeze_from for c in cells if c.protocol == "progressive") == [0, 4, 8]
  assert sorted(c.trained for c in cells if c.protocol == "decapitation") == [False, True]
  assert {c.state for c in cells} == {"partial", "frozen", "unfrozen"}
  assert tables.comparison_tables(cells) == []  # studies are plotted, not tabled


def test_timing_and_relative_gain_numbers(tmp_path):
  root = str(tmp_path)
  write_cell(root, "deit_base_patch16", "aptos2019", "unfrozen_linear", {1e-4: [0.80, 0.84]}, {1e-4: [0.5, 0.5]},
             iterations=1000, speed=200.0)
  write_cell(root, "dinov2_vitb14", "aptos2019", "unfrozen_linear", {1e-4: [0.90, 0.86]}, {1e-4: [0.5, 0.5]},
             iterations=500, speed=100.0)
  write_cell(root, "dinov2_vitb14", "aptos2019", "unfrozen_deit", {1e-4: [0.85]}, {1e-4: [0.5]},
             iterations=3000, speed=50.0)
  cells = results.load_cells(root)
  notes = []
  rows = {(r["model"], r["protocol"]): r for r in plots.timing_rows(cells, notes)}
  assert rows[("dinov2_vitb14", "unfrozen_linear")]["train_time_ratio"] == pytest.approx(0.5)
  assert rows[("dinov2_vitb14", "unfrozen_linear")]["inference_time_ratio"] == pytest.approx(2.0)
  # No stacked baseline run: the linear-head baseline of the same foundation state stands in.
  assert rows[("dinov2_vitb14", "unfrozen_deit")]["baseline_protocol"] == "unfrozen_linear"
  assert rows[("dinov2_vitb14", "unfrozen_deit")]["train_time_ratio"] == pytest.approx(3.0)
  assert rows[("deit_base_patch16", "unfrozen_linear")]["train_time_ratio"] == 1.0
  gains = {(r["source"], r["model"], r["protocol"]): r["gain_percent"] for r in plots.relative_gains(cells, notes)}
  assert gains[("mfjax", "dinov2_vitb14", "unfrozen_linear")] == pytest.approx(100 * (0.88 - 0.82) / 0.82)
  assert gains[("paper", "dinov2_vitb14", "unfrozen_linear")] == pytest.approx(100 * (0.909 - 0.904) / 0.904)
  assert gains[("paper", "sam_vitb", "frozen_deit")] == pytest.approx(100 * (0.890 - 0.904) / 0.904)
  assert ("mfjax", "deit_base_patch16", "unfrozen_linear") not in gains
  assert not notes


# ----------------------------------------------------------------------------- bad input


def test_a_run_without_a_newer_field_never_joins_two_settings_into_one_cell(tmp_path):
  """Run a predates data.norm (no difference to either), b and c differ in it: b and c stay apart."""
  root = str(tmp_path / "runs")
  paths = {name: write_run(root, "deit_base_patch16", "aptos2019", "frozen_linear", 1e-4, seed, 0.8, 0.9,
                           folder=f"{root}/{name}", data=data)
           for seed, (name, data) in enumerate((("a", None), ("b", {"norm": "dataset"}), ("c", {"norm": "model"})))}
  with open(paths["a"]) as f:
    older = json.load(f)
  del older["config"]["data"]["norm"]
  with open(paths["a"], "w") as f:
    json.dump(older, f)
  cells = results.load_cells(root)
  assert len(cells) == 2 and not any({paths["b"], paths["c"]} <= set(c.files) for c in cells)


def test_runs_with_other_epochs_or_batch_size_are_labelled_cells_not_an_error(tmp_path, capsys):
  root = str(tmp_path / "runs")
  first = write_run(root, "deit_base_patch16", "aptos2019", "frozen_linear", 1e-4, 0, 0.8, 0.9, folder=f"{root}/a")
  second = write_run(root, "deit_base_patch16", "aptos2019", "frozen_linear", 1e-4, 1, 0.6, 0.9, folder=f"{root}/b")
  with open(second) as f:
    data = json.load(f)
  data["config"].update(epochs=2, batch_size=8)
  with open(second, "w") as f:
    json.dump(data, f)
  cells = results.load_cells(root)
  assert [(c.setting, c.files) for c in cells] == [("batch_size=64, epochs=100", (first,)),
                                                   ("batch_size=8, epochs=2", (second,))]
  assert cli.main(["report", root, "--out", str(tmp_path / "out")]) == 0
  assert "2 cells share their model, dataset, protocol and resolution with another cell" in capsys.readouterr().out
  markdown = (tmp_path / "out" / "tables" / "frozen_224.md").read_text()
  assert "| Linear | ImNet-1k-Sup (batch_size=64, epochs=100) | 0.800 (1 seed) (paper" in markdown
  assert "|  | ImNet-1k-Sup (batch_size=8, epochs=2) | 0.600 (1 seed) (paper" in markdown
  with open(tmp_path / "out" / "tables" / "all_cells.csv") as f:
    assert [row["setting"] for row in csv.DictReader(f)] == ["batch_size=64, epochs=100", "batch_size=8, epochs=2"]
  # Where a run read its data and checkpoints from and how it was run do not split a cell ...
  data["config"].update(epochs=100, batch_size=64)
  data["config"]["data"]["manual_dir"] = "/elsewhere"
  data["config"]["model"]["checkpoint"] = "/other/machine/ckpt"
  data["config"]["mesh"]["data"] = 8
  with open(second, "w") as f:
    json.dump(data, f)
  (cell,) = results.load_cells(root)
  assert cell.n == 2
  # ... but a random initialization is not the pretrained model.
  data["config"]["model"]["checkpoint"] = ""
  with open(second, "w") as f:
    json.dump(data, f)
  assert [c.setting for c in results.load_cells(root)] == ["model.checkpoint=false", "model.checkpoint=true"]


def test_random_weights_and_changed_architectures_are_marked(tmp_path, capsys):
  root = str(tmp_path / "runs")
  write_cell(root, "dinov2_vitb14", "aptos2019", "frozen_linear", {1e-4: [0.5]}, {1e-4: [0.5]}, pretrained=False)
  write_cell(root, "dino_vitb16", "aptos2019", "frozen_linear", {1e-4: [0.6]}, {1e-4: [0.5]})
  path = write_run(root, "sam_vitb", "aptos2019", "frozen_linear", 1e-4, 0, 0.7, 0.5)
  with open(path) as f:
    data = json.load(f)
  data["config"]["model"]["overrides"] = {"depth": 2}
  with open(path, "w") as f:
    json.dump(data, f)
  (table,) = tables.comparison_tables(results.load_cells(root))
  assert [r["foundation"] for r in table["rows"]] == ["DINOv1", "SAM †", "DINOv2 †"]
  assert "† not the paper's weights" in table["caption"]
  assert cli.main(["report", root]) == 0
  assert "note: 2 of 3 cells do not use the paper's weights" in capsys.readouterr().out


def test_a_checkpoint_of_another_architecture_is_marked_and_kept_apart(tmp_path):
  """A converted 2-block, width-128 DeiT used as the paper's DeiT-B: its model.json's overrides make it another
  network, whether the run's result.json records them or (an older run) its checkpoint still holds them."""
  root = str(tmp_path / "runs")
  paper_size = {"patch_size": 16, "width": 768, "depth": 12, "heads": 12, "mlp_hidden": 3072,
                "native_resolution": [224, 224], "layerscale": False, "posemb": "size", "ln_eps": 1e-12,
                "pooled": "first_patch"}  # a readout as BLIP's paper checkpoint records it: the same network
  small = dict(paper_size, depth=2, width=128, heads=2, mlp_hidden=512)
  for seed, (overrides, test) in enumerate(((paper_size, 0.8), (small, 0.5))):
    path = write_run(root, "deit_base_patch16", "aptos2019", "frozen_linear", 1e-4, seed, test, 0.5)
    with open(path) as f:
      data = json.load(f)
    data["checkpoints"] = {"model": {"name": "deit_base_patch16", "overrides": overrides}}
    with open(path, "w") as f:
      json.dump(data, f)
  cells = {c.mean: c for c in results.load_cells(root)}
  assert not cells[0.8].variant and cells[0.5].variant
  assert cells[0.5].setting == 'checkpoint_changes=["model: depth=2", "model: heads=2", "model: mlp_hidden=512", ' \
      '"model: width=128"]'
  (table,) = tables.comparison_tables(list(cells.values()))
  assert {r["foundation"] for r in table["rows"]} == {"ImNet-1k-Sup (checkpoint_changes=[])",
                                                     f"ImNet-1k-Sup ({cells[0.5].setting}) †"}
  # A run from before result.json recorded them: read from its checkpoint's model.json, where it still is.
  old = str(tmp_path / "old")
  path = write_run(old, "deit_base_patch16", "aptos2019", "frozen_linear", 1e-4, 0, 0.5, 0.5)
  with open(path) as f:
    data = json.load(f)
  checkpoint = tmp_path / "ckpt" / "deit_small"
  checkpoint.mkdir(parents=True)
  (checkpoint / "model.json").write_text(json.dumps({"name": "deit_base_patch16", "overrides": small}))
  data["config"]["model"]["checkpoint"] = str(checkpoint)
  with open(path, "w") as f:
    json.dump(data, f)
  (cell,) = results.load_cells(old)
  assert cell.variant
  (checkpoint / "model.json").unlink()  # not there: taken for the paper's model
  (cell,) = results.load_cells(old)
  assert not cell.variant
  # k-NN results record their checkpoint's model.json too.
  assert results.architecture_changes({"name": "deit_base_patch16", "overrides": small}, "deit_base_patch16")
  assert results.architecture_changes({"name": "dino_vitb16", "overrides": {}}, "deit_base_patch16") == [
      "model dino_vitb16"]


def test_duplicate_run_is_an_error(tmp_path):
  root = str(tmp_path)
  write_run(root, "dinov2_vitb14", "aptos2019", "unfrozen_linear", 1e-4, 0, 0.9, 0.9, folder=f"{root}/a")
  write_run(root, "dinov2_vitb14", "aptos2019", "unfrozen_linear", 1e-4, 0, 0.9, 0.9, folder=f"{root}/copy")
  with pytest.raises(ReportError, match="same run"):
    results.load_cells(root)


@pytest.mark.parametrize("damage, message", [
    (lambda d: "{not json", "not readable as JSON"),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "test"}), "missing key 'test'"),
    (lambda d: json.dumps(dict(d, test={"accuracy": 0.5})), "missing key 'test.headline'"),
    (lambda d: json.dumps(dict(d, val={"headline": "high"})), "val.headline is 'high'"),
    (lambda d: json.dumps(dict(d, model="sam_vitb")), "disagree with its config"),
])
def test_bad_result_file_names_the_file(tmp_path, damage, message):
  path = write_run(str(tmp_path), "dinov2_vitb14", "aptos2019", "unfrozen_linear", 1e-4, 0, 0.9, 0.9)
  with open(path) as f:
    data = json.load(f)
  with open(path, "w") as f:
    f.write(damage(data))
  with pytest.raises(ReportError, match=message) as error:
    results.load_cells(str(tmp_path))
  assert path in str(error.value)


def test_knn_of_random_weights_is_marked_and_kept_apart_from_the_pretrained(tmp_path):
  per_k = {200: {"headline": 0.5}}
  for folder, checkpoint in (("pretrained", "/ckpt/dinov2_vitb14"), ("random", "")):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "knn.json").write_text(json.dumps(knn_lib.result_json(
        model="dinov2_vitb14", dataset="aptos2019", resolution=224, headline_metric="quadratic_kappa",
        results=per_k, checkpoint=checkpoint, overrides={})))
  found = {r["display"]: r["variant"] for r in results.load_knn(str(tmp_path))}
  assert found == {"DINOv2": False, "DINOv2 †": True}
  figures = plots.knn(results.load_knn(str(tmp_path)), str(tmp_path / "plots"), [])
  assert "† : random weights" not in figures[0]["caption"] and "†: random weights" in figures[0]["caption"]
  assert "T = 0.1)" in figures[0]["caption"]
  # `mfjax knn --temperature` is recorded, shown, and a mix of temperatures is pointed out.
  (tmp_path / "random" / "knn.json").write_text(json.dumps(knn_lib.result_json(
      model="dinov2_vitb14", dataset="aptos2019", resolution=224, headline_metric="quadratic_kappa",
      results=per_k, checkpoint="", overrides={}, temperature=0.07)))
  notes = []
  figures = plots.knn(results.load_knn(str(tmp_path)), str(tmp_path / "plots"), notes)
  assert "T = 0.07, 0.1)" in figures[0]["caption"] and "different temperatures (0.07, 0.1)" in notes[0]


def test_knn_on_another_view_or_labels_is_its_own_result_marked_as_not_the_papers_task(tmp_path):
  for folder, data in (("all", {"options": {}, "uncertainty": "zeros"}),
                       ("frontal", {"options": {"views": "frontal"}, "uncertainty": "zeros"}),
                       ("ones", {"options": {"views": "all"}, "uncertainty": "ones"}), ("old", None)):
    (tmp_path / folder).mkdir()
    extra = {"data": data} if data else {}  # "old": a knn.json from before the options were recorded
    model = "dinov2_vitb14" if folder == "old" else "resnet50"
    (tmp_path / folder / "knn.json").write_text(json.dumps(knn_lib.result_json(
        model=model, dataset="chexpert", resolution=32, headline_metric="mean_auc",
        results={200: {"headline": 0.6}}, checkpoint="", overrides={}, **extra)))
  found = {os.path.basename(os.path.dirname(r["file"])): r for r in results.load_knn(str(tmp_path))}
  assert {k: r["display"] for k, r in found.items()} == {
      "all": "resnet50 †", "frontal": "resnet50 † ‡ (views=frontal)",
      "ones": "resnet50 † ‡ (views=all, uncertainty=ones)", "old": "DINOv2 †"}
  assert found["frontal"]["other_task"] == "chexpert views=frontal (the paper: all)"
  assert found["all"]["other_task"] == found["old"]["other_task"] == ""
  notes = []
  figure = plots.knn(list(found.values()), str(tmp_path / "plots"), notes)[0]
  assert "‡: not the paper's task or labels" in figure["caption"]
  assert cli.main(["report", str(tmp_path)]) == 0
  with open(tmp_path / "report" / "tables" / "knn.csv") as f:
    rows = {row["file"]: row for row in csv.DictReader(f)}
  assert rows[found["frontal"]["file"]]["setting"] == "views=frontal"
  assert "chexpert views=frontal (the paper: all)" in (tmp_path / "report" / "report.md").read_text()
  # A DDSM knn.json from before the options were recorded is taken as the paper's task, as on CheXpert.
  (tmp_path / "old_ddsm").mkdir()
  (tmp_path / "old_ddsm" / "knn.json").write_text(json.dumps(knn_lib.result_json(
      model="resnet50", dataset="cbis_ddsm", resolution=32, headline_metric="auc", results={200: {"headline": 0.6}},
      checkpoint="", overrides={})))
  old_ddsm, = [r for r in results.load_knn(str(tmp_path)) if "old_ddsm" in r["file"]]
  assert old_ddsm["other_task"] == "" and "‡" not in old_ddsm["display"]


def test_knn_plot_keeps_resolutions_apart_and_names_missing_scores(tmp_path, monkeypatch):
  for folder, resolution, score in (("a", 224, 0.7), ("b", 448, 0.8), ("c", 224, float("nan"))):
    (tmp_path / folder).mkdir()
    model = "sam_vitb" if folder == "c" else "dinov2_vitb14"
    (tmp_path / folder / "knn.json").write_text(json.dumps(knn_lib.result_json(
        model=model, dataset="aptos2019", resolution=resolution, headline_metric="quadratic_kappa",
        results={200: {"headline": score}}, checkpoint="/ck", overrides={})))
  import matplotlib.axes
  rows = []
  monkeypatch.setattr(matplotlib.axes.Axes, "set_yticks", lambda self, ticks, labels=None, **kw: rows.append(
      list(labels or [])))
  notes = []
  plots.knn(results.load_knn(str(tmp_path)), str(tmp_path / "plots"), notes)
  assert {"DINOv2", "DINOv2 @ 448 px", "SAM"} <= set(rows[0])
  assert "no finite score for SAM on aptos2019" in notes[0]


def test_a_baseline_without_a_score_is_named_not_dropped_silently(tmp_path):
  root = str(tmp_path / "runs")
  write_cell(root, "deit_base_patch16", "aptos2019", "unfrozen_linear", {1e-4: [None]}, {1e-4: [None]})
  write_cell(root, "dinov2_vitb14", "aptos2019", "unfrozen_linear", {1e-4: [0.9]}, {1e-4: [0.9]})
  notes = []
  rows = plots.relative_gains(results.load_cells(root), notes)
  assert not [r for r in rows if r["source"] == "mfjax"]
  assert any("baseline has no finite score on aptos2019" in n for n in notes), notes
  assert not any("no deit_base_patch16 unfrozen_linear run" in n for n in notes)
  # A baseline scoring exactly 0 (a kappa at chance, as the demo's random models can) has no relative gain.
  zero = str(tmp_path / "zero")
  write_cell(zero, "deit_base_patch16", "aptos2019", "unfrozen_linear", {1e-4: [0.0]}, {1e-4: [0.0]})
  write_cell(zero, "dinov2_vitb14", "aptos2019", "unfrozen_linear", {1e-4: [0.9]}, {1e-4: [0.9]})
  notes = []
  rows = plots.relative_gains(results.load_cells(zero), notes)
  assert not [r for r in rows if r["source"] == "mfjax"]
  assert any("baseline scores exactly 0 on aptos2019" in n for n in notes), notes
  assert not any("no deit_base_patch16 unfrozen_linear run" in n for n in notes)


def test_bad_knn_and_cka_files_name_the_file(tmp_path):
  knn_path = tmp_path / "a" / "knn.json"
  knn_path.parent.mkdir()
  knn_path.write_text(json.dumps({"model": "dino_vitb16", "dataset": "aptos2019", "resolution": 224,
                                  "k": {"twenty": {"headline": 0.5}}}))
  with pytest.raises(ReportError, match=f"{knn_path}: k 'twenty' is not an integer"):
    results.load_knn(str(tmp_path))
  knn_path.unlink()
  cka_path = tmp_path / "a" / "cka_x.json"
  cka_path.write_text(json.dumps({"kind": "layers", "rows": ["0", "1"], "cols": ["0"], "matrix": [[1.0]]}))
  with pytest.raises(ReportError, match=f"{cka_path}: matrix is \\(1, 1\\) but there are 2 row"):
    results.load_cka(str(tmp_path))
  cka_path.write_text(json.dumps({"kind": "heatmap", "rows": [], "cols": [], "matrix": []}))
  with pytest.raises(ReportError, match="kind 'heatmap' is not one of"):
    results.load_cka(str(tmp_path))


def test_cli_errors_on_an_empty_runs_folder(tmp_path, capsys):
  assert cli.main(["report", str(tmp_path)]) == 2
  assert "no result.json, knn.json or cka_*.json below" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the whole command


def fabricate_study(root):
  """A small but complete runs folder: every protocol, study, k-NN and CKA kind."""
  rng = np.random.default_rng(0)
  datasets = ("aptos2019", "isic2019")
  models = ("deit_base_patch16", "dinov2_vitb14", "sam_vitb", "seem_focalt")
  for dataset in datasets:
    for model in models:
      for protocol in ("frozen_linear", "frozen_deit", "unfrozen_linear", "unfrozen_deit"):
        state, classifier = tables.MAIN_PROTOCOLS[protocol]
        base = paper.lookup(state, 224, classifier, paper.foundation_of(model), dataset)
        mean = base["mean"] if base else 0.82
        write_cell(root, model, dataset, protocol, {1e-4: mean + rng.normal(0, 0.01, 3)}, {1e-4: [0.5] * 3},
                   iterations=int(rng.integers(500, 3000)), speed=float(rng.uniform(50, 300)))
    for shift, model in enumerate(("dinov2_vitb14", "sam_vitb")):
      for k in (0, 4, 8, 12):
        write_cell(root, model, dataset, "progressive", {1e-4: [0.85 - k / (60 + 40 * shift), 0.84 - k / 60]},
                   {1e-4: [0.5, 0.5]}, unfreeze_from=k, head="linear")
        write_cell(root, model, dataset, "decapitation", {1e-4: [0.7 + k / 60 - shift / 20]}, {1e-4: [0.5]},
                   keep_blocks=k or 1, decapitation_trained=True)
        write_cell(root, model, dataset, "decapitation", {1e-4: [0.75 - abs(k - 5 - shift) / 50]}, {1e-4: [0.5]},
                   keep_blocks=k or 1, decapitation_trained=False)
    for size, params in zip("slg", (22e6, 304e6, 1.1e9)):
      write_cell(root, f"dinov2_vit{size}14", dataset, "unfrozen_linear", {1e-4: [0.8 + params / 1e10] * 2},
                 {1e-4: [0.5, 0.5]}, params=int(params))
    write_cell(root, "dinov2_vitb14", dataset, "unfrozen_linear", {1e-4: [0.9, 0.91]}, {1e-4: [0.5, 0.5]}, res=448)
  for dataset in datasets:
    for model in models:
      folder = os.path.join(root, "knn", model, dataset)
      os.makedirs(folder)
      per_k = {k: {"headline": float(0.6 + rng.uniform(0, 0.2) - 0.02 * math.log(k))} for k in (10, 20, 50, 200)}
      with open(os.path.join(folder, "knn.json"), "w") as f:
        json.dump(knn_lib.result_json(model=model, dataset=dataset, resolution=224,
                                      headline_metric=HEADLINE[dataset], results=per_k), f)
  layers = [f"block {i}" for i in range(12)]
  decay = np.exp(-np.abs(np.subtract.outer(np.arange(12), np.arange(12))) / 3)
  for low, model in ((0.6, "dinov2_vitb14"), (0.3, "deit_base_patch16")):
    with open(os.path.join(root, f"cka_{model}_aptos2019.json"), "w") as f:
      json.dump(cka_lib.result_json("layers", layers, layers, decay * np.linspace(1, low, 12)[None, :],
                                    model=model, dataset="aptos2019"), f)
  names = [paper.title_of(m) for m in models]
  with open(os.path.join(root, "cka_foundations_isic2019.json"), "w") as f:
    json.dump(cka_lib.result_json("foundations", names, names, np.eye(4) * 0.5 + 0.5, dataset="isic2019"), f)
  with open(os.path.join(root, "cka_stacked_dinov2.json"), "w") as f:
    json.dump(cka_lib.result_json("stacked", layers, layers, decay * np.linspace(0.9, 0.2, 12)[None, :],
                                  model="dinov2_vitb14"), f)


EXPECTED_PLOTS = ("relative_gain", "knn", "knn_vs_k", "timing", "progressive_linear", "decapitation", "model_size",
                  "resolution", "cka_dinov2_vitb14_aptos2019", "cka_deit_base_patch16_aptos2019",
                  "cka_foundations_isic2019", "cka_stacked_dinov2", "cka_diagonals")


def test_report_command_writes_tables_plots_and_page(tmp_path, capsys):
  root = str(tmp_path / "runs")
  fabricate_study(root)
  out = str(tmp_path / "out")
  os.makedirs(os.path.join(out, "plots"))
  with open(os.path.join(out, "plots", "mine.png"), "wb") as f:  # the user's own file: left alone
    f.write(b"mine")
  assert cli.main(["report", root, "--out", out]) == 0
  # A plot an earlier report wrote (its manifest lists it) and this one does not is removed.
  manifest = os.path.join(out, report.MANIFEST)
  with open(manifest) as f:
    listed = json.load(f)
  assert "plots/mine.png" not in listed and all(os.path.isfile(os.path.join(out, p)) for p in listed)
  with open(manifest, "w") as f:
    json.dump(listed + ["plots/stale.png"], f)
  with open(os.path.join(out, "plots", "stale.png"), "wb") as f:
    f.write(b"old")
  capsys.readouterr()
  assert cli.main(["report", root, "--out", out]) == 0
  printed = capsys.readouterr().out
  assert open(os.path.join(out, "plots", "mine.png"), "rb").read() == b"mine"
  assert os.path.join(out, "report.md") in printed
  for name in EXPECTED_PLOTS:
    path = os.path.join(out, "plots", name + ".png")
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  assert not os.path.exists(os.path.join(out, "plots", "stale.png"))
  for name in ("frozen_224", "unfrozen_224", "unfrozen_448"):
    for ext in ("md", "csv", "tex"):
      assert os.path.getsize(os.path.join(out, "tables", f"{name}.{ext}")) > 0
  for name in ("all_cells", "timing", "knn", "relative_gain"):
    assert os.path.getsize(os.path.join(out, "tables", f"{name}.csv")) > 0
  with open(os.path.join(out, "report.md")) as f:
    markdown = f.read()
  for name in EXPECTED_PLOTS:
    assert f"(plots/{name}.png)" in markdown
  assert "| Linear | DINOv2 |" in markdown and "(paper 0.909, Δ" in markdown
  with open(os.path.join(out, "report.html")) as f:
    html = f.read()
  assert html.count("<img ") == len(EXPECTED_PLOTS) and "<table>" in html
  # The CheXpert and DDSM columns stay blank: no runs there.
  with open(os.path.join(out, "tables", "unfrozen_224.csv")) as f:
    assert {row["dataset"] for row in csv.DictReader(f)} == {"aptos2019", "isic2019"}


def test_report_never_overwrites_or_deletes_a_file_no_report_recorded(tmp_path):
  root = str(tmp_path / "runs")
  write_cell(root, "dinov2_vitb14", "aptos2019", "frozen_linear", {1e-3: [0.7]}, {1e-3: [0.7]})
  thesis = tmp_path / "thesis"
  (thesis / "tables").mkdir(parents=True)
  (thesis / "plots").mkdir()
  mine = {"tables/chapter2_results.md": "x", "plots/my_figure.png": "x", "report.md": "# notes"}
  for name, text in mine.items():
    (thesis / name).write_text(text)
  with pytest.raises(ReportError, match=r"holds report.md, which this report would overwrite") as error:
    report.build(root, str(thesis))
  assert report.MANIFEST in str(error.value)
  assert {name: (thesis / name).read_text() for name in mine} == mine
  assert sorted(os.listdir(thesis / "tables")) == ["chapter2_results.md"] and not (thesis / report.MANIFEST).exists()
  (thesis / "report.md").rename(thesis / "notes.md")
  report.build(root, str(thesis))
  assert (thesis / "tables" / "frozen_224.md").exists() and (thesis / "report.md").read_text() != "# notes"
  # A folder the report wrote is updated; a file of the user's named as a table this report adds is refused.
  (thesis / "tables" / "unfrozen_224.md").write_text("mine")
  write_cell(root, "dinov2_vitb14", "aptos2019", "unfrozen_linear", {1e-3: [0.8]}, {1e-3: [0.8]})
  with pytest.raises(ReportError, match=r"holds tables/unfrozen_224.md, which"):
    report.build(root, str(thesis))
  (thesis / "tables" / "unfrozen_224.md").unlink()
  report.build(root, str(thesis))
  for name, text in (("tables/chapter2_results.md", "x"), ("plots/my_figure.png", "x"), ("notes.md", "# notes")):
    assert (thesis / name).read_text() == text
  assert (thesis / "tables" / "unfrozen_224.md").read_text() != "mine"
  assert not [name for name in os.listdir(thesis) if name.startswith(".mfjax_report-")]  # no staging left


# ----------------------------------------------------------------------------- MedDINOv3 runs


def write_segment_run(root, fold, dice, *, backbone="", seed=0, folder=None):
  """A result.json as `mfjax segment` writes it (config from configs/segment.py)."""
  from configs import segment as segment_config
  config = segment_config.get_config(f"raw=/data/Dataset219_AMOS,fold={fold}").to_dict()
  config["model"]["checkpoint"], config["seed"] = backbone, seed
  val = {"cases": 4, "dice": dice, "mean_dice": float(np.mean(list(dice.values()))), "mean_hd95": 5.0 + fold,
         "mean_nsd": 0.8}
  folder = folder or os.path.join(root, f"seg_{os.path.basename(backbone) or 'random'}_{seed}_fold{fold}")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "result.json"), "w") as f:
    json.dump({"config": config, "model": config["model"]["name"], "dataset": "Dataset219_AMOS", "fold": str(fold),
               "val": val}, f)
  return os.path.join(folder, "result.json")


def test_meddinov3_published_dice_is_found_for_amos_runs_from_dinov3_weights_only():
  from mfjax.report import paper
  assert paper.meddinov3_published("Dataset218_AMOS2022_postChallenge_task1", "dinov3_vitb16", "/ckpt/d3") == 0.8481
  assert paper.meddinov3_published("amos22", "meddinov3_vitb16", "/ckpt/md3") == 0.8551
  assert paper.meddinov3_published("Dataset218_AMOS2022", "meddinov3_vitb16", "random init") is None
  assert paper.meddinov3_published("Dataset003_Liver", "meddinov3_vitb16", "/ckpt/md3") is None
  assert paper.meddinov3_published("Dataset218_AMOS2022", "dinov3_vitl16", "/ckpt/d3l") is None


def test_report_tabulates_segmentation_folds_and_pretraining_runs(tmp_path, monkeypatch):
  from configs import pretrain as pretrain_config
  write_run(str(tmp_path), "dinov2_vitb14", "aptos2019", "frozen_linear", 1e-3, 0, 0.7, 0.71)
  write_segment_run(tmp_path, 0, {"liver": 0.9, "spleen": 0.7}, backbone="/ckpt/meddinov3")
  write_segment_run(tmp_path, 1, {"liver": 0.8, "spleen": 0.5}, backbone="/ckpt/meddinov3")
  write_segment_run(tmp_path, 0, {"liver": 0.6, "spleen": 0.4})          # random init: its own setup
  write_segment_run(tmp_path, 0, {"liver": 0.5, "spleen": 0.3}, seed=1)  # another seed: its own setup
  pre = tmp_path / "pretrain"
  pre.mkdir()
  (pre / "result.json").write_text(json.dumps({
      "config": pretrain_config.get_config().to_dict(), "model": "meddinov3_vitb16", "steps": 125000, "volumes": 10,
      "backbone": str(pre / "backbone"), "final": {"train/loss": 3.25}}))
  reads = []
  monkeypatch.setattr(results, "_read_json", lambda path, read=results._read_json: reads.append(path) or read(path))
  written = cli.main(["report", str(tmp_path)])
  assert written == 0
  assert len(reads) == len(set(reads)) == 6  # each result.json once, whatever wrote it
  rows = list(csv.DictReader(open(tmp_path / "report" / "tables" / "segmentation.csv")))
  assert [(r["backbone"], r["fold"]) for r in rows] == [
      ("/ckpt/meddinov3", "0"), ("/ckpt/meddinov3", "1"), ("/ckpt/meddinov3", "mean of 0,1"),
      ("random init", "0"), ("random init", "0")]
  mean = rows[2]
  assert float(mean["dice"]) == pytest.approx((0.8 + 0.65) / 2) and float(mean["hd95"]) == pytest.approx(5.5)
  assert float(mean["dice:spleen"]) == pytest.approx(0.6) and mean["cases"] == "8"
  # MedDINOv3's published AMOS22 Dice sits next to the runs from its weights, not next to random init.
  assert [r["published_dice"] for r in rows] == ["0.8551"] * 3 + [""] * 2
  (pretrained,) = csv.DictReader(open(tmp_path / "report" / "tables" / "pretraining.csv"))
  assert (pretrained["steps"], pretrained["loss"], pretrained["gram"]) == ("125000", "3.25", "False")
  page = (tmp_path / "report" / "report.md").read_text()
  assert "## MedDINOv3 segmentation (mfjax segment)" in page and "## MedDINOv3 pretraining" in page
  assert "| published_dice |" in page and "| 0.8551 |" in page and "AMOS22's test images" in page
  assert "plots/segmentation_dice.png" in page and (tmp_path / "report" / "plots" / "segmentation_dice.png").exists()
  ((classes, bars),) = plots.segmentation_bars(results.load_segment_runs(str(tmp_path))).values()
  assert classes == ["liver", "spleen"] and list(bars) == [
      "meddinov3_vitb16 · meddinov3", "meddinov3_vitb16 · random init", "meddinov3_vitb16 · random init #2"]
  np.testing.assert_allclose(bars["meddinov3_vitb16 · meddinov3"][0], [0.85, 0.6])
  np.testing.assert_allclose(bars["meddinov3_vitb16 · random init #2"][1], [[0.5, 0.3]])
  assert "1 training runs selected into 1 cells" in page and "4 segmentation and 1 pretraining runs" in page
  # The same setup and fold twice (a copied run) is an error naming both files.
  write_segment_run(tmp_path, 1, {"liver": 0.8, "spleen": 0.5}, backbone="/ckpt/meddinov3",
                    folder=str(tmp_path / "copy"))
  with pytest.raises(ReportError, match="the same segmentation setup and fold twice") as error:
    report.build(str(tmp_path))
  assert "copy/result.json" in str(error.value) and "seg_meddinov3_0_fold1/result.json" in str(error.value)


def test_exit_status_tells_a_mistake_from_a_failure_worth_retrying(tmp_path, monkeypatch, capsys):
  """2: a mistake the error names (launchers do not start the command again); 1: an error that
  starting again may clear (launch/gpu.sh local --max-restarts retries it)."""
  from mfjax.config import ConfigError, RunStopped
  for error, status in ((ConfigError("bad key"), 2), (FileNotFoundError("no such file: x"), 2),
                        (TimeoutError("the bucket timed out"), 1), (RunStopped("process 0 could not write x"), 1)):
    def fail(*args, error=error):
      raise error
    monkeypatch.setattr(report, "build", fail)
    assert cli.main(["report", str(tmp_path)]) == status, error
    assert str(error) in capsys.readouterr().err

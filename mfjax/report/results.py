"""Reading a runs folder: training runs grouped into cells, k-NN results, CKA matrices, and the
MedDINOv3 segmentation and pretraining runs (`mfjax segment`, `mfjax pretrain`) as their own rows.

A cell is everything a run's config fixes except the learning rate and the seed. Runs are
found by globbing `**/result.json` and grouped by their config, never by folder names; runs of
one (model, dataset, protocol, ...) slot whose configs differ otherwise (epochs, batch size) are
cells of their own, labelled by the fields that differ. Per
cell, the learning rate with the best mean validation headline over its seeds is selected
(the smaller lr on a tie); the test headlines of that learning rate's seeds give mean ± std
(sample std, ddof=1; one seed has no std).
"""
import dataclasses
import glob
import json
import math
import os
import re

import numpy as np

from mfjax.config import DataError
from mfjax.report import paper

# Config fields that do not change what a run measures (where and how fast it ran). Checkpoint
# paths differ between machines; the cell only requires that all or none of its runs have one.
# Fields that change how a run ran, not what it scores (model.freeze_unused: whether SAM's neck, which no
# output depends on, trained).
OPERATIONAL_FIELDS = ("seed", "optim.lr", "mesh", "sharding_rules", "min_fsdp_mb", "log_every_steps",
                      "checkpoint_every_steps", "data.num_workers", "data.manual_dir", "data.data_dir",
                      "model.freeze_unused")
CHECKPOINT_FIELDS = ("model.checkpoint", "head.checkpoint")
RESULT_KEYS = ("config", "model", "dataset", "protocol", "headline_metric", "val", "test")


class ReportError(DataError):
  """Bad or inconsistent input in a runs folder; the message names the file."""


@dataclasses.dataclass
class Cell:
  """One (model, dataset, protocol, ...) cell with the selected learning rate's seeds."""
  model: str
  dataset: str
  protocol: str
  head: str                    # linear | deit
  resolution: int              # the paper's resolution the cell stands for (see nominal_resolution)
  unfreeze_from: int | None    # progressive only
  keep_blocks: int | None      # decapitation only
  trained: bool | None         # decapitation only: the foundation was trained
  metric: str                  # the dataset's headline metric
  variant: bool                # random initialization or changed architecture: not the paper's model
  other_task: str              # how the task or labels differ from the paper's ("" when they don't)
  lr: float
  seeds: tuple
  test: np.ndarray             # test headline per seed of the selected lr
  val: np.ndarray              # validation headline per seed of the selected lr
  lr_scores: dict              # lr -> (mean validation headline, number of seeds)
  iterations_to_best: np.ndarray
  images_per_second: np.ndarray
  params_total: int | None
  params_trained: int | None
  files: tuple
  run_resolution: int          # what the runs' inputs were: 1022 for DINOv2's 1024
  setting: str = ""            # how its config differs from other cells of the same slot ("" when none do)

  @property
  def state(self) -> str:
    """frozen | unfrozen | partial: how much of the foundation trained."""
    if self.protocol.startswith("frozen") or (self.protocol == "decapitation" and not self.trained):
      return "frozen"
    if self.protocol.startswith("unfrozen") or self.protocol == "decapitation":
      return "unfrozen"
    return "partial"

  @property
  def n(self) -> int:
    return len(self.test)

  @property
  def mean(self) -> float:
    return float(np.mean(self.test))

  @property
  def std(self) -> float:
    return float(np.std(self.test, ddof=1)) if self.n > 1 else float("nan")


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ReportError(f"{path}: not readable as JSON ({e})") from None
  if not isinstance(data, dict):
    raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def _get(data: dict, dotted: str, path: str):
  node = data
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      raise ReportError(f"{path}: missing key {dotted!r}")
    node = node[part]
  return node


def _number(value, what: str, path: str) -> float:
  if value is None:
    return float("nan")
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ReportError(f"{path}: {what} is {value!r}, not a number")
  return float(value)


def _flatten(config: dict, prefix: str = "") -> dict:
  """Dotted fields -> JSON. A free-form dict (model/head `overrides`, data `options`) stays one field,
  so that `{}` and `{"layout": "lists"}` differ even though only one of them has a `layout` field."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value and not key.endswith(("overrides", "options")):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = json.dumps(value, sort_keys=True)
  return flat


def _measured(flat: dict) -> dict:
  """The fields that must agree between the runs of one cell; of a checkpoint path only whether it is set."""
  out = {}
  for key, value in flat.items():
    if any(key == f or key.startswith(f + ".") for f in OPERATIONAL_FIELDS):
      continue
    out[key] = json.dumps(bool(json.loads(value))) if key in CHECKPOINT_FIELDS else value
  return out


# Constructor fields that change how a model computes or runs, or which of its outputs is read, not which network
# it is; converters record some of them (a DINOv2 checkpoint's position-embedding resize, SAM's relative-position
# resize, BLIP's pooled token: the paper's first patch with --pooled first_patch).
NUMERICS_FIELDS = ("posemb", "rel_pos_resize", "attn_impl", "attn_query_chunk", "global_query_chunk_rows", "remat",
                   "remat_policy", "scan_blocks", "dtype", "drop_path", "rope_dtype", "rope_periods", "ln_eps",
                   "pooled", "tokens")
PAPER_HEAD = "deit_base_patch16"


def architecture_changes(meta: dict | None, expected: str) -> list[str]:
  """How a checkpoint's model.json ({"name", "overrides"}) differs from the registered model `expected`:
  another model, or overrides that change the network ("depth=2"); [] when unknown (None)."""
  from mfjax import models
  if not meta:
    return []
  if meta.get("name") != expected:
    return [f"model {meta.get('name')}"]
  registered = models.create(expected) if expected in models.NAMES else None
  changes = []
  for field, value in sorted((meta.get("overrides") or {}).items()):
    if field in NUMERICS_FIELDS:
      continue
    if field == "native_resolution" and isinstance(value, int):
      value = (value, value)
    if _as_tuples(value) != _as_tuples(getattr(registered, field, None)):
      changes.append(f"{field}={json.dumps(value)}")
  return changes


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoint_models_of(data: dict, config: dict) -> dict:
  """The checkpoints' model.json as the result records them, or (results from before) as the checkpoints
  still at their paths hold them; a checkpoint not there is taken for the paper's model."""
  if isinstance(data.get("checkpoints"), dict):
    return data["checkpoints"]
  found = {}
  for section in ("model", "head"):
    path = os.path.expanduser(str(config.get(section, {}).get("checkpoint") or ""))
    if path and os.path.isfile(os.path.join(path, "model.json")):
      found[section] = _read_json(os.path.join(path, "model.json"))
  return found


def checkpoint_changes(config: dict, head: str, checkpoints: dict) -> list[str]:
  """How the checkpoints a run loaded differ from the paper's models, e.g. ["model: depth=2"]."""
  changes = [f"model: {c}" for c in architecture_changes(checkpoints.get("model"), config["model"]["name"])]
  if head == "deit":
    changes += [f"head: {c}" for c in architecture_changes(checkpoints.get("head"), PAPER_HEAD)]
  return changes


def not_the_papers_weights(config: dict, head: str, checkpoints: dict | None = None) -> bool:
  """Random foundation (or stacked DeiT-B) weights, or a changed architecture: model/head overrides, or a
  checkpoint whose model.json records one (`checkpoints`: {"model"/"head": {"name", "overrides"}})."""
  model, head_config = config.get("model", {}), config.get("head", {})
  return (not model.get("checkpoint") or bool(model.get("overrides"))
          or bool(checkpoint_changes(config, head, checkpoints or {}))
          or (head == "deit" and (not head_config.get("checkpoint") or bool(head_config.get("overrides")))))


def task_differences(config: dict) -> str:
  """How a run's task or labels differ from the paper's for the same dataset name; "" when they don't.
  The paper's DDSM is its own image lists as given (normal vs abnormal); its CheXpert is train.csv only, every
  view, uncertain labels as 0. A published number for another task is no reference for a run."""
  data = config.get("data", {})
  name, options = data.get("name"), data.get("options") or {}
  differences = []
  if name == "cbis_ddsm":
    layout, task = options.get("layout", "cbis"), options.get("task")
    if layout != "lists":
      differences.append(f"layout={layout}, task={task or 'benign_malignant'} (the paper: its DDSM lists, "
                         "normal vs abnormal)")
    else:
      if task not in (None, "normal_abnormal"):
        differences.append(f"task={task} (the paper: normal vs abnormal)")
      if options.get("split", "seeded") != "official":
        differences.append("layout=lists, split=seeded: the lists re-split (the paper: split=official, "
                           "the lists as given)")
  if name == "chexpert":
    if data.get("uncertainty", "zeros") != "zeros":
      differences.append(f"uncertainty={data['uncertainty']} (the paper: zeros)")
    if options.get("views", "all") != "all":
      differences.append(f"views={options['views']} (the paper: all)")
    if options.get("split") == "official":
      differences.append("split=official, tested on valid.csv (the paper: a split of train.csv)")
  return "; ".join(f"{name} {d}" for d in differences)


def data_setting(data_config: dict) -> str:
  """A data section's build options that differ from a plain build, as "views=frontal, uncertainty=ones"."""
  options = dict(sorted((data_config.get("options") or {}).items()))
  if data_config.get("uncertainty", "zeros") != "zeros":
    options["uncertainty"] = data_config["uncertainty"]
  return ", ".join(f"{k}={v}" for k, v in options.items())


def resized_at_load_of(config: dict) -> bool:
  """Whether a run whose result.json does not say resized its position tables at load: the switch
  was on (runs from before it existed did not resize), for a model the switch acts on, at another
  resolution than the model's registered one."""
  import ml_collections
  from mfjax import models
  from mfjax.train import build
  name = config.get("model", {}).get("name", "")
  if name not in models.NAMES or "resolution" not in config.get("data", {}):
    return False
  return build.load_resolution(ml_collections.ConfigDict(config), name, models.create(name)) is not None


def head_of(protocol: str, config_head: str) -> str:
  if protocol.endswith("_linear"):
    return "linear"
  if protocol.endswith("_deit") or protocol == "decapitation":
    return "deit"
  return config_head


def read_run(path: str, data: dict | None = None) -> dict:
  """One result.json (read here unless given), checked, reduced to what the report uses."""
  data = _read_json(path) if data is None else data
  for key in RESULT_KEYS:
    _get(data, key, path)
  config = data["config"]
  protocol = _get(config, "protocol.name", path)
  run = {
      "file": path,
      "model": _get(config, "model.name", path),
      "dataset": _get(config, "data.name", path),
      "protocol": protocol,
      "head": head_of(protocol, config.get("protocol", {}).get("head", "linear")),
      "run_resolution": int(_get(config, "data.resolution", path)),
      "unfreeze_from": int(_get(config, "protocol.unfreeze_from", path)) if protocol == "progressive" else None,
      "keep_blocks": int(_get(config, "protocol.keep_blocks", path)) if protocol == "decapitation" else None,
      "trained": bool(_get(config, "protocol.decapitation_trained", path)) if protocol == "decapitation" else None,
      "lr": _number(_get(config, "optim.lr", path), "config.optim.lr", path),
      "seed": _get(config, "seed", path),
      "metric": data["headline_metric"],
      "val": _number(_get(data, "val.headline", path), "val.headline", path),
      "test": _number(_get(data, "test.headline", path), "test.headline", path),
      "iterations_to_best": _number(data.get("iterations_to_best"), "iterations_to_best", path),
      "images_per_second": _number(data.get("test_images_per_second"), "test_images_per_second", path),
      "params_total": data.get("params_total"),
      "params_trained": data.get("params_trained"),
      "measured_config": _measured(_flatten(config)),
  }
  # Whether position tables were resized at load is what matters, not the switch (which most models
  # ignore). Results written before result.json recorded it: worked out from the config.
  run["measured_config"].pop("model.resize_at_load", None)
  resized = data["resized_at_load"] if "resized_at_load" in data else resized_at_load_of(config)
  run["measured_config"]["resized_at_load"] = json.dumps(bool(resized))
  run["resolution"] = nominal_resolution(run["model"], run["run_resolution"])
  checkpoints = checkpoint_models_of(data, config)
  # A converted checkpoint of another size is another model: a cell of its own, and not the paper's.
  run["measured_config"]["checkpoint_changes"] = json.dumps(checkpoint_changes(config, run["head"], checkpoints))
  run["variant"] = not_the_papers_weights(config, run["head"], checkpoints)
  run["other_task"] = task_differences(config)
  if run["model"] != data["model"] or run["dataset"] != data["dataset"]:
    raise ReportError(f"{path}: model/dataset {data['model']}/{data['dataset']} disagree with its config "
                      f"{run['model']}/{run['dataset']}")
  return run


def patch_size_of(model: str) -> int | None:
  """The patch size in an mfjax ViT name (deit_base_patch16, dinov2_vitb14_reg4, dinov3_vitb16); None
  for the others (sam_vitb, the convolutional families)."""
  match = re.search(r"(?:patch|_vit[a-z]+)(\d+)", model)
  return int(match.group(1)) if match else None


def nominal_resolution(model: str, resolution: int) -> int:
  """The paper's resolution that a run at `resolution` stands for: a ViT runs at the paper's R rounded
  down to its patch size (DINOv2, 14-px patches: 1022 for 1024), which is the paper's R here."""
  patch = patch_size_of(model)
  for paper_resolution in sorted({row["resolution"] for row in paper.published()}):
    if patch and resolution != paper_resolution and paper_resolution // patch * patch == resolution:
      return paper_resolution
  return resolution


SLOT = ("model", "dataset", "protocol", "head", "resolution", "unfreeze_from", "keep_blocks", "trained")


def config_differences(a: dict, b: dict) -> list[str]:
  """The measured config fields two runs set differently. A field only one run has was added to the config by
  a newer mfjax (with its old behaviour as default): not a difference."""
  return sorted(k for k in set(a) & set(b) if a[k] != b[k])


def settings_of(groups: list[list[dict]]) -> list[str]:
  """Labels that tell apart the groups of runs of one slot whose configs differ: "field=value, ..." over the
  fields that differ between any two groups; "" for a slot with one config."""
  if len(groups) == 1:
    return [""]
  configs = [g[0]["measured_config"] for g in groups]
  fields = sorted({f for i, a in enumerate(configs) for b in configs[i + 1:] for f in config_differences(a, b)})
  return [", ".join(f"{f}={c.get(f, '(absent)')}" for f in fields) for c in configs]


def group_cells(runs: list[dict]) -> list[Cell]:
  """Runs -> cells: group by slot and config beyond lr and seed, select the lr, aggregate seeds. Runs of one
  slot whose configs differ (other epochs, say) are separate cells, each with a `setting` label."""
  by_slot = {}
  for run in runs:
    by_slot.setdefault(tuple(run[k] for k in SLOT), []).append(run)
  cells = []
  for slot, members in by_slot.items():
    groups = []
    for run in members:
      # Against every member: a run without a field newer runs set may not join two settings into one cell.
      group = next((g for g in groups if not any(config_differences(m["measured_config"], run["measured_config"])
                                                 for m in g)), None)
      if group is None:
        groups.append([run])
      else:
        group.append(run)
    for group, setting in zip(groups, settings_of(groups)):
      cells.append(_cell(slot, group, setting))
  return sorted(cells, key=lambda c: tuple((getattr(c, k) is not None, getattr(c, k) or 0) for k in SLOT)
                + (c.setting,))


def _cell(slot: tuple, members: list[dict], setting: str) -> Cell:
  """The cell of runs that share one config beyond lr and seed."""
  first = members[0]
  seen = {}
  for run in members:
    key = (run["lr"], json.dumps(run["seed"]))
    if key in seen:
      raise ReportError(f"{seen[key]} and {run['file']} are the same run (lr {run['lr']}, seed {run['seed']})")
    seen[key] = run["file"]
  metrics = {run["metric"] for run in members}
  if len(metrics) > 1:
    raise ReportError(f"runs of {first['model']}/{first['dataset']} report different headline metrics "
                      f"{sorted(metrics)}: {[r['file'] for r in members]}")
  by_lr = {}
  for run in members:
    by_lr.setdefault(run["lr"], []).append(run)
  lr_scores = {lr: (float(np.mean([r["val"] for r in rs])), len(rs)) for lr, rs in sorted(by_lr.items())}
  finite = {lr: score for lr, (score, _) in lr_scores.items() if math.isfinite(score)}
  best_lr = max(finite, key=lambda lr: (finite[lr], -lr)) if finite else min(lr_scores)
  chosen = sorted(by_lr[best_lr], key=lambda r: json.dumps(r["seed"]))
  return Cell(
      **{k: v for k, v in zip(SLOT, slot)}, metric=first["metric"], variant=first["variant"],
      other_task=first["other_task"], lr=best_lr,
      seeds=tuple(r["seed"] for r in chosen), test=np.array([r["test"] for r in chosen]),
      val=np.array([r["val"] for r in chosen]), lr_scores=lr_scores,
      iterations_to_best=np.array([r["iterations_to_best"] for r in chosen]),
      images_per_second=np.array([r["images_per_second"] for r in chosen]),
      params_total=first["params_total"], params_trained=first["params_trained"],
      files=tuple(r["file"] for r in chosen), run_resolution=first["run_resolution"], setting=setting)


def plotted_cells(cells: list[Cell], notes: list) -> list[Cell]:
  """The cells the plots draw, which tell cells apart by slot only: of a slot split into settings, the one with
  the most seeds (the first label on a tie). A note names the settings left out."""
  by_slot = {}
  for c in cells:
    by_slot.setdefault(tuple(getattr(c, k) for k in SLOT), []).append(c)
  split = [group for group in by_slot.values() if len(group) > 1]
  if split:
    kept = {id(min(group, key=lambda c: (-c.n, c.setting))) for group in split}
    example = split[0]
    shown = next(c for c in example if id(c) in kept)
    notes.append(f"{sum(map(len, split))} cells share their model, dataset, protocol and resolution with another "
                 "cell but not the rest of their config (beyond lr and seed): each is a cell of its own, labelled "
                 f"by the fields that differ, e.g. {example[0].model} on {example[0].dataset} "
                 f"({example[0].protocol}): {' | '.join(c.setting for c in example)}. The plots draw one cell of "
                 f"each, the one with the most seeds (here {shown.setting}); the tables and all_cells.csv have "
                 "every cell.")
    dropped = {id(c) for group in split for c in group} - kept
    return [c for c in cells if id(c) not in dropped]
  return cells


def find(runs_dir: str, pattern: str, exclude: str | None = None) -> list[str]:
  paths = sorted(glob.glob(os.path.join(glob.escape(runs_dir), "**", pattern), recursive=True))
  if exclude:
    exclude = os.path.abspath(exclude) + os.sep
    paths = [p for p in paths if not os.path.abspath(p).startswith(exclude)]
  return paths


def run_kind(data: dict) -> str:
  """What wrote a result.json, told by its config: "segmentation", "pretraining" or "classification"."""
  config = data.get("config")
  if isinstance(config, dict) and "iters_per_epoch" in config:
    return "segmentation"
  if isinstance(config, dict) and "masking" in config and "heads" in config:
    return "pretraining"
  return "classification"


def read_results(runs_dir: str, exclude: str | None = None) -> dict[str, list[tuple[str, dict]]]:
  """Every result.json below `runs_dir`, each read once: {kind (see run_kind): [(path, data), ...]}."""
  found = {"classification": [], "segmentation": [], "pretraining": []}
  for path in find(runs_dir, "result.json", exclude):
    data = _read_json(path)
    found[run_kind(data)].append((path, data))
  return found


def load_cells(runs_dir: str, exclude: str | None = None, found: dict | None = None) -> list[Cell]:
  found = found or read_results(runs_dir, exclude)
  return group_cells([read_run(path, data) for path, data in found["classification"]])


SEGMENT_SETUP_FIELDS = ("seed", "batch_size", "iters_per_epoch", "data.patch", "data.spacing", "model.overrides",
                        "model.interaction_indices", "optim.lr_backbone", "optim.lr_decoder")


def read_segment_run(path: str, data: dict | None = None) -> dict:
  """One `mfjax segment` result.json: its setup and the validation means (NaN without validation)."""
  data = _read_json(path) if data is None else data
  config = _get(data, "config", path)
  val = data.get("val", {})
  mean = lambda metric: _number(val.get(f"mean_{metric}"), f"val.mean_{metric}", path)
  run = {"dataset": str(_get(data, "dataset", path)), "model": str(_get(config, "model.name", path)),
         "backbone": _get(config, "model.checkpoint", path) or "random init",
         "fold": str(_get(data, "fold", path)), "epochs": int(_get(config, "epochs", path))}
  # What a fold ensemble shares: everything that changes the result except the fold.
  run["setup"] = (run["dataset"], run["model"], run["backbone"], run["epochs"]) + tuple(
      json.dumps(_get(config, key, path)) for key in SEGMENT_SETUP_FIELDS)
  return {**run, "cases": val.get("cases", 0),
          "dice": mean("dice"), "hd95": mean("hd95"), "nsd": mean("nsd"),
          "dice_per_class": {str(k): _number(v, f"val.dice.{k}", path) for k, v in val.get("dice", {}).items()},
          "file": path}


def read_pretrain_run(path: str, data: dict | None = None) -> dict:
  """One `mfjax pretrain` result.json: its setup and final losses."""
  data = _read_json(path) if data is None else data
  config = _get(data, "config", path)
  model, gram = _get(config, "model", path), _get(config, "gram", path)
  final = data.get("final") or {}
  return {"model": str(_get(data, "model", path)), "steps": int(_get(data, "steps", path)),
          "batch": int(_get(config, "batch_size", path)), "volumes": int(data.get("volumes", 0)),
          "start": model.get("checkpoint") or model.get("init_from_run") or "random init",
          "gram": bool(gram.get("weight")) or bool(gram.get("weight_schedule", {}).get("enabled")),
          "loss": _number(final.get("train/loss"), "final.train/loss", path),
          "backbone": str(_get(data, "backbone", path)), "file": path}


def load_segment_runs(runs_dir: str, exclude: str | None = None, found: dict | None = None) -> list[dict]:
  found = found or read_results(runs_dir, exclude)
  runs = [read_segment_run(path, data) for path, data in found["segmentation"]]
  return sorted(runs, key=lambda r: (r["dataset"], r["model"], r["backbone"], r["fold"]))


def load_pretrain_runs(runs_dir: str, exclude: str | None = None, found: dict | None = None) -> list[dict]:
  found = found or read_results(runs_dir, exclude)
  return [read_pretrain_run(path, data) for path, data in found["pretraining"]]


def read_knn(path: str) -> dict:
  """One knn.json: {"model", "dataset", "resolution", "k": {"200": {"headline": ...}, ...}}."""
  data = _read_json(path)
  for key in ("model", "dataset", "resolution", "k"):
    _get(data, key, path)
  if not isinstance(data["k"], dict) or not data["k"]:
    raise ReportError(f"{path}: 'k' must map each k to its metrics")
  scores = {}
  for k, values in data["k"].items():
    try:
      k_int = int(k)
    except ValueError:
      raise ReportError(f"{path}: k {k!r} is not an integer") from None
    scores[k_int] = _number(_get(values, "headline", path) if isinstance(values, dict) else None,
                            f"k[{k}].headline", path)
  label = data.get("label") or data["model"]
  # Written since knn.json records its weights: no checkpoint is a random foundation, as in the tables' †.
  variant = (("checkpoint" in data and not data["checkpoint"]) or bool(data.get("overrides"))
             or bool(architecture_changes((data.get("checkpoints") or {}).get("model"), data["model"])))
  # Written since knn.json records the dataset's build options; before, the paper's are assumed.
  data_config = data.get("data") or {}
  if not isinstance(data_config, dict) or not isinstance(data_config.get("options", {}), dict):
    raise ReportError(f"{path}: 'data' must be {{\"options\": {{...}}, \"uncertainty\": ...}}, got {data_config!r}")
  other_task = task_differences({"data": {**data_config, "name": data["dataset"]}}) if "data" in data else ""
  setting = data_setting(data_config)
  display = (paper.title_of(label) + (" †" if variant else "") + (" ‡" if other_task else "")
             + (f" ({setting})" if setting else ""))
  return {"file": path, "model": data["model"], "label": label, "variant": variant, "other_task": other_task,
          "display": display, "setting": setting,
          "dataset": data["dataset"], "resolution": int(data["resolution"]),
          "temperature": _number(data.get("temperature", 0.1), "temperature", path),  # 0.1: the paper's
          "metric": data.get("headline_metric", ""), "scores": dict(sorted(scores.items()))}


def load_knn(runs_dir: str, exclude: str | None = None) -> list[dict]:
  results, seen = [], {}
  for path in find(runs_dir, "knn.json", exclude):
    result = read_knn(path)
    key = (result["display"], result["dataset"], result["resolution"])
    if key in seen:
      raise ReportError(f"{seen[key]} and {path} both hold k-NN results of {key[0]} on {key[1]} at {key[2]} px; "
                        "give one a distinct \"label\" or remove it")
    seen[key] = path
    results.append(result)
  return results


def read_cka(path: str) -> dict:
  """One cka_<name>.json: {"kind", "rows", "cols", "matrix"} (+ optional title/axis names)."""
  from mfjax.evals.cka import KINDS
  data = _read_json(path)
  for key in ("kind", "rows", "cols", "matrix"):
    _get(data, key, path)
  if data["kind"] not in KINDS:
    raise ReportError(f"{path}: kind {data['kind']!r} is not one of {KINDS}")
  try:
    matrix = np.array([[np.nan if v is None else v for v in row] for row in data["matrix"]], np.float64)
  except (TypeError, ValueError):
    raise ReportError(f"{path}: 'matrix' is not a rectangular list of numbers") from None
  if matrix.shape != (len(data["rows"]), len(data["cols"])):
    raise ReportError(f"{path}: matrix is {matrix.shape} but there are {len(data['rows'])} row and "
                      f"{len(data['cols'])} column labels")
  name = os.path.basename(path)[len("cka_"):-len(".json")]
  return dict(data, file=path, name=name, matrix=matrix)


def load_cka(runs_dir: str, exclude: str | None = None) -> list[dict]:
  """Every cka_*.json; each gets a unique "name" for its plot (the file's, or its path's when two share one)."""
  results = [read_cka(p) for p in find(runs_dir, "cka_*.json", exclude)]
  counts = {}
  for r in results:
    counts[r["name"]] = counts.get(r["name"], 0) + 1
  for r in results:
    if counts[r["name"]] > 1:
      folder = os.path.relpath(os.path.dirname(r["file"]), runs_dir)
      r["name"] = folder.replace(os.sep, "_").replace(".", "_") + "_" + r["name"]
  return results

"""Model registry: `create(name, **overrides)`, `NAMES`, and `save`/`load` of converted models.

Each family module defines `MODELS = {name: constructor kwargs}` and a Linen `Model` class with
  - a `native_resolution: tuple[int, int]` field (the input size its checkpoint was trained at),
  - `token_grid(image_size) -> (rows, cols)` of the `tokens` it returns for that input size,
  - `apply(variables, images, train=False, return_blocks=False)` on NHWC float images, returning
    {"pooled": (B, F), "tokens": (B, rows*cols, D)} plus "blocks" (every block's or stage's
    output, float32) when asked.
"""
import dataclasses
import importlib
import json
import os
import shutil
import tempfile
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mfjax import parallel
from mfjax.config import ConfigError

FAMILIES = ("vit", "sam", "dinov3", "focalnet", "resnet")

_MODULES = {family: importlib.import_module(f"mfjax.models.{family}") for family in FAMILIES}
REGISTRY: dict[str, tuple[str, dict]] = {
    name: (family, dict(kwargs)) for family, mod in _MODULES.items() for name, kwargs in mod.MODELS.items()}
NAMES = tuple(sorted(REGISTRY))

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


def family_of(name: str) -> str:
  if name not in REGISTRY:
    raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(NAMES)}")
  return REGISTRY[name][0]


def create(name: str, **overrides):
  """The Linen module registered as `name`, with constructor fields replaced by `overrides`."""
  family = family_of(name)
  model_cls = _MODULES[family].Model
  fields = {f.name for f in dataclasses.fields(model_cls)} - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"unknown option(s) {unknown} for model {name!r}; valid: {sorted(fields)}")
  # JSON turns tuples into lists; module fields must stay hashable.
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  return model_cls(**{**REGISTRY[name][1], **overrides})


def at_resolution(name: str, module, variables: dict, resolution: tuple[int, int]) -> dict:
  """`variables` of model `name` (`module`) with its position tables resized once to `resolution`
  (the family's `at_resolution`); the module to run them is `module` with
  `native_resolution=resolution`. The forward pass at `resolution` is unchanged; training then
  updates the resized tables, as the paper's code does for SAM and OpenCLIP."""
  family = family_of(name)
  resize = getattr(_MODULES[family], "at_resolution", None)
  if resize is None:
    raise ConfigError(f"model {name!r} ({family}) has no position tables to resize at load")
  return {**variables, "params": resize(module, variables["params"], tuple(resolution))}


def native_resolution(module) -> tuple[int, int]:
  """The input size (H, W) at which `module` was trained and stores its position embedding."""
  return tuple(module.native_resolution)


def init_params(module, rng=None, image_size=None):
  """Random parameters (float32) for `module`, e.g. for a from-scratch baseline or tests."""
  image_size = image_size or native_resolution(module)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  images = jnp.zeros((1, *image_size, 3), jnp.float32)
  return module.init(rng, images)


def abstract_variables(module, image_size=None):
  """Shapes and dtypes of `module.init`'s variables, computed without allocating them."""
  image_size = image_size or native_resolution(module)
  images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), images)


def is_remote(path) -> bool:
  return "://" in str(path)


def save(out_dir: str, name: str, variables: dict, overrides: dict | None = None,
         provenance: dict | None = None) -> str:
  """Write `variables` (an orbax checkpoint) and `model.json` to `out_dir` (local, or gs:// and
  other paths orbax and etils can write).

  A local model saved by one process is first written to a sibling temporary folder that is renamed
  at the end, so an interrupted or failed save leaves no partial model behind. Object stores have no
  folder rename, and the processes of a job cannot share one temporary name: there `model.json` is
  written last, so a folder without it is not a model (`read_model_json`), and a later save to it
  (a resumed run's export) writes it again.

  In a multi-process job every process calls `save` with the same arguments, at the same point:
  orbax numbers its saves with a per-process counter that keys its cross-process signals, so a save
  made by one process alone would leave the counters out of step and the job's next checkpoint
  waiting for a signal that never comes. Process 0 writes; `variables` must be the same on each.
  """
  import orbax.checkpoint as ocp
  from etils import epath
  family_of(name)
  meta = {"name": name, "overrides": overrides or {}, "provenance": provenance or {}}
  host = jax.tree_util.tree_map(np.asarray, variables)

  def write(folder: str) -> None:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(epath.Path(folder) / PARAMS_DIR, host)
    parallel.on_process_zero(f"write {MODEL_JSON}", (epath.Path(folder) / MODEL_JSON).write_text,
                             json.dumps(meta, indent=2, sort_keys=True))

  if is_remote(out_dir) or jax.process_count() > 1:
    # No per-process temporary folder (each process would name its own): orbax writes the params
    # folder atomically, and model.json comes last.
    out = epath.Path(out_dir if is_remote(out_dir) else os.path.abspath(os.path.expanduser(str(out_dir))))
    if (out / MODEL_JSON).exists():
      raise FileExistsError(f"{out_dir} holds a model already; choose a new --out folder")
    if (out / PARAMS_DIR).exists():  # a save killed before its model.json: not a model, written again
      parallel.on_process_zero(f"remove the unfinished save {out / PARAMS_DIR}", (out / PARAMS_DIR).rmtree)
    write(str(out))
    return str(out_dir)
  out_dir = os.path.abspath(os.path.expanduser(str(out_dir)))
  found = os.listdir(out_dir) if os.path.isdir(out_dir) else []
  if found and all(name.startswith(PARAMS_DIR) for name in found):  # a job's save killed before its model.json
    shutil.rmtree(out_dir)
  elif found:
    raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --out folder")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
  try:
    write(tmp)
    if os.path.exists(out_dir):
      os.rmdir(out_dir)
    os.rename(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return out_dir


def _model_path(model_dir) -> str:
  return str(model_dir) if is_remote(model_dir) else os.path.abspath(os.path.expanduser(str(model_dir)))


def _corrected_overrides(meta: dict, model_dir) -> dict:
  """model.json's overrides, with what an older converter recorded wrongly set right (with a warning)."""
  overrides = dict(meta["overrides"])
  # DINOv2 hub files with registers were recorded with the '(g + 0.1) / M' resize of the models
  # without; their hub models resize with F.interpolate(size=grid, antialias=True).
  if meta["name"].startswith("dinov2_") and "_reg" in meta["name"] and overrides.get("posemb") == "dino_offset":
    warnings.warn(f"{model_dir}: model.json records posemb 'dino_offset' for {meta['name']}, which an older "
                  "converter wrote for DINOv2 hub files with registers; their hub models resize with "
                  "'size_antialias', which is used instead (features at other resolutions than the native one "
                  "differ from those of earlier runs). Convert the checkpoint again to record it.")
    overrides["posemb"] = "size_antialias"
  return overrides


def read_model_json(model_dir: str) -> dict[str, Any]:
  """model.json of a converted model: name, overrides (older converters' known mistakes corrected,
  with a warning) and provenance."""
  from etils import epath
  path = epath.Path(_model_path(model_dir)) / MODEL_JSON
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {model_dir} is not a converted mfjax model "
                            "(run `python -m convert FAMILY --checkpoint ... --out DIR` first)")
  try:
    meta = json.loads(path.read_text())
    if not isinstance(meta.get("name"), str) or not isinstance(meta.get("overrides", {}), dict):
      raise ValueError("no model name, or overrides that are not a mapping")
  except (ValueError, AttributeError) as e:
    raise ConfigError(f"{path} is damaged ({e}): convert the checkpoint again") from None
  meta.setdefault("overrides", {})
  meta["overrides"] = _corrected_overrides(meta, model_dir)
  return meta


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:limit] if text else ''}"


def _check_stored(stored, target, params_dir, meta) -> None:
  """The tensors in `params_dir` (orbax's metadata) against the module model.json describes: every
  missing, unexpected or differently shaped one named in one error."""
  def shapes(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  have, want = shapes(stored), shapes(target)
  problems = [f"missing {k} (the model has it, the files do not)" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: {have[k]} in the files vs {want[k]} in the model" for k in sorted(set(have) & set(want))
               if have[k] != want[k]]
  if problems:
    shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
    raise ConfigError(f"{params_dir} does not hold the {meta['name']} that model.json describes (overrides "
                      f"{meta['overrides']}); convert the checkpoint again:\n  " + "\n  ".join(shown))


def load(model_dir: str):
  """`(module, variables)` of a model written by `save` (e.g. by `python -m convert`)."""
  import orbax.checkpoint as ocp
  from etils import epath
  meta = read_model_json(model_dir)
  module = create(meta["name"], **meta["overrides"])
  target = abstract_variables(module)
  params_dir = epath.Path(_model_path(model_dir)) / PARAMS_DIR
  with ocp.StandardCheckpointer() as ckptr:
    try:
      metadata = ckptr.metadata(params_dir)
      stored = getattr(metadata, "item_metadata", metadata)  # an older orbax may give the tree itself
    except Exception as e:  # orbax's errors for a missing or damaged folder are long and vary by case
      why = "check the path and access" if is_remote(model_dir) else "convert the checkpoint again"
      raise ConfigError(f"{params_dir} cannot be read as a converted model's parameters ({_first_line(e)}); "
                        f"{why}") from e
    _check_stored(stored, target, params_dir, meta)
    try:
      variables = ckptr.restore(params_dir, target)
    except Exception as e:
      why = ("a network or permission error, or a file missing or damaged" if is_remote(model_dir) else
             "a file is missing or damaged: convert the checkpoint again")
      raise ConfigError(f"{params_dir}: its tensors cannot be read ({_first_line(e)}); {why}") from e
  return module, variables

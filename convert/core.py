"""Reading released checkpoints and strict, all-problems-at-once key accounting.

torch is imported here only to read `.pth` files, with `weights_only=True`: a checkpoint
that needs arbitrary unpickling is refused.
"""
import fnmatch
import json
import os
import re
from typing import Any, Callable, Iterable

import numpy as np

from mfjax.config import DataError


class ConversionError(DataError):
  """A checkpoint that cannot be converted; the message lists every problem found."""


# ----------------------------------------------------------------------------- reading


def is_hub_id(path: str) -> bool:
  return (not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None
          and not path.endswith((".pth", ".pt", ".bin", ".safetensors")))


# The weights of a Hugging Face model folder, safetensors first: one file or the shards its index lists.
HF_WEIGHTS = (("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
              ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"))


def fetch_hub(repo_id: str, fmt: str = "auto", original_files: tuple[str, ...] = ()) -> str:
  """Download from the Hugging Face Hub config.json and the model's HF weights (safetensors, else
  pytorch_model.bin), or, with fmt 'original' or when the repo has no HF weights, the first of a
  family's `original_files` it holds. Offline machines get a plain error."""
  try:
    import huggingface_hub
  except ImportError as e:
    raise ConversionError(f"{repo_id!r} looks like a Hugging Face Hub id, but huggingface_hub is "
                          "not installed (pip install 'mfjax[hub]'), and no such local path exists") from e
  groups = [] if fmt == "original" and original_files else [["config.json", *names] for names in HF_WEIGHTS]
  groups += [[name] for name in original_files]
  for patterns in groups:
    try:
      folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:  # network errors come in many types
      raise ConversionError(
          f"no local file or folder {repo_id!r} exists, and it could not be fetched as a Hugging Face Hub id "
          f"({type(e).__name__}: {e}). Check the path; or this machine may be offline: download the folder "
          "elsewhere and pass its local path to --checkpoint.") from e
    present = os.listdir(folder) if os.path.isdir(folder) else []
    if any(fnmatch.filter(present, p) for p in patterns if p != "config.json"):
      return folder
  wanted = [p for patterns in groups for p in patterns if p != "config.json"]
  raise ConversionError(f"the Hugging Face Hub repo {repo_id!r} holds none of {wanted}")


def to_numpy(value) -> np.ndarray:
  """A torch tensor or array as a NumPy array; bfloat16/float16 are widened to float32."""
  if hasattr(value, "detach"):
    import torch
    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _safe_globals() -> list:
  """Data, not code, that the weights-only unpickler refuses unless allowed: NumPy's array, scalar and
  dtype reconstructors (nnU-Net's checkpoint_final.pth logs its Dice as np.float64) and
  argparse.Namespace (DINO's full checkpoints keep their command line as 'args')."""
  import argparse
  import numpy.dtypes
  try:
    from numpy._core.multiarray import _reconstruct, scalar
  except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct, scalar
  dtypes = [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
  # A file pickled under the other NumPy major names the same functions by their other module.
  other = [(fn, f"numpy.{module}.multiarray.{fn.__name__}") for fn in (_reconstruct, scalar)
           for module in ("core", "_core") if f"numpy.{module}.multiarray" != fn.__module__]
  return [_reconstruct, scalar, *other, np.ndarray, np.dtype, *dtypes, argparse.Namespace]


def _unpickling_reason(e: Exception) -> str:
  """The sentence of torch's weights-only error that names the refused global, else its first one."""
  lines = [line.strip() for line in str(e).splitlines()] or [""]
  line = next((line for line in lines if "GLOBAL " in line), lines[0])
  return line.removeprefix("WeightsUnpickler error: ").split(". ")[0].rstrip(".")


def _load_torch(path: str):
  import pickle
  try:
    import torch
  except ImportError:
    raise ConversionError(f"{path}: reading a PyTorch checkpoint needs torch: pip install -e '.[torch]' "
                          "(or convert a .safetensors file, which does not)") from None
  try:
    with torch.serialization.safe_globals(_safe_globals()):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ConversionError(
        f"{path}: refused to unpickle. This file needs arbitrary Python objects to load "
        f"(weights_only=True rejected it: {_unpickling_reason(e)}). mfjax never runs code "
        "from a checkpoint; re-save it as a plain state dict of tensors or as safetensors.") from e
  except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  import ml_dtypes  # a JAX dependency; importing it teaches NumPy bfloat16 and the float8 types
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  narrow = {np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)}
  try:
    state = load_file(path)
  except TypeError as e:  # a dtype NumPy does not know even with ml_dtypes
    raise ConversionError(f"{path}: holds a tensor dtype that cannot be read as a NumPy array: {e}") from e
  except (SafetensorError, OSError, ValueError) as e:
    raise ConversionError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
  return {k: v.astype(np.float32) if v.dtype in narrow else v for k, v in state.items()}


def read_file(path: str) -> Any:
  """The object stored in a checkpoint file: usually a (nested) dict of tensors."""
  if not os.path.exists(path):
    raise ConversionError(f"checkpoint {path} does not exist")
  with open(path, "rb") as f:
    head = f.read(512)
  if path.endswith(".safetensors"):
    if _not_weights(head):
      raise ConversionError(f"{path}: {_not_weights(head)}, not a safetensors file")
    return _load_safetensors(path)
  what = _not_a_torch_file(head)
  if what == "safetensors":  # a safetensors file under a torch name: read as what it is
    return _load_safetensors(path)
  if what:
    raise ConversionError(f"{path}: {what}, not a PyTorch checkpoint")
  return _load_torch(path)


def _not_weights(head: bytes) -> str:
  """What the first bytes of a weights file show it is when a download or clone went wrong; "" otherwise."""
  text = head.lstrip().lower()
  if text.startswith(b"version https://git-lfs"):
    return "a Git LFS pointer file (the repository was cloned without its large files: run `git lfs pull`)"
  if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
    return "an HTML or XML page (a failed download, an error or login page?)"
  if not head:
    return "an empty file"
  return ""


def _not_a_torch_file(head: bytes) -> str:
  """What the first bytes of a file named as a torch checkpoint show it is, when it is not one
  (a zip archive, torch's format since 1.6, or a pickle); "" when it may be one."""
  if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
    return ""
  if len(head) >= 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 100_000_000:
    return "safetensors"
  return _not_weights(head) or f"neither a zip archive nor a pickle (it starts with {head[:16]!r})"


def hf_weight_files(folder: str) -> list[str]:
  """The weight files of a Hugging Face model folder: model.safetensors or the shards its index
  lists, else pytorch_model.bin or its shards. Other files beside them (an OpenCLIP Hub repo's
  open_clip_model.safetensors) belong to another format and are not read."""
  for single, index, _ in HF_WEIGHTS:
    if os.path.exists(os.path.join(folder, single)):
      return [single]
    index_path = os.path.join(folder, index)
    if os.path.exists(index_path):
      with open(index_path) as f:
        try:
          return sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
          raise ConversionError(f"{index_path}: not a weight index with a 'weight_map' ({e})") from e
  return []


def read_hf_folder(folder: str) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict, config.json) of a Hugging Face model folder."""
  cfg_path = os.path.join(folder, "config.json")
  with open(cfg_path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{cfg_path}: not valid JSON: {e}") from e
  files = hf_weight_files(folder)
  if not files:
    raise ConversionError(f"{folder}: has config.json but no model.safetensors or pytorch_model.bin "
                          "(nor a sharded index of either)")
  state = {}
  for name in files:
    state.update(flatten_state_dict(read_file(os.path.join(folder, name))))
  return state, config


def read_checkpoint(path: str, fmt: str = "auto", original_files: tuple[str, ...] = ()) -> tuple[Any, dict | None, str]:
  """(raw object, HF config or None, resolved path) for a file, a folder or a Hub id.

  A folder is read as a Hugging Face model (config.json + `hf_weight_files`) unless `fmt` is
  'original' or it has no HF weights: then the first of `original_files` it holds (names a family's
  own library writes beside them, e.g. OpenCLIP's open_clip_model.safetensors) is read as a file.
  """
  if is_hub_id(path):
    path = fetch_hub(path, fmt, original_files)
  if os.path.isdir(path):
    own = next((os.path.join(path, f) for f in original_files if os.path.exists(os.path.join(path, f))), None)
    has_config = os.path.exists(os.path.join(path, "config.json"))
    if own and (fmt == "original" or not (has_config and hf_weight_files(path))):
      return read_file(own), None, own
    if not has_config:
      also = f", or a folder holding one of {list(original_files)}" if original_files else ""
      raise ConversionError(f"{path} is a folder without config.json: give the checkpoint file, "
                            f"or a Hugging Face model folder (config.json + model.safetensors){also}")
    state, config = read_hf_folder(path)
    return state, config, path
  return read_file(path), None, path


# Prefixes that wrappers put before every key: DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def flatten_state_dict(obj) -> dict[str, np.ndarray]:
  """Tensors of a nested dict as {'a.b.c': array}; non-tensor leaves (epoch, args) dropped, and a
  wrapper prefix that every key carries (`module.`, `_orig_mod.`) removed, with a note."""
  state = _flatten(obj)
  removed = ""
  while state and (prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)):
    state = {k[len(prefix):]: v for k, v in state.items()}
    removed += prefix
  if removed:
    print(f"note: every key started with {removed!r} (a DistributedDataParallel or torch.compile "
          "wrapper); it is removed")
  return state


def _flatten(obj, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  if isinstance(obj, dict):
    for k, v in obj.items():
      out.update(_flatten(v, f"{prefix}{k}."))
  elif hasattr(obj, "shape"):
    out[prefix[:-1]] = to_numpy(obj)
  return out


def unwrap(obj, keys: Iterable[str]) -> Any:
  """Descend into the first of `keys` found in a wrapper dict ({'model': ...}, {'teacher': ...})."""
  for key in keys:
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      return obj[key]
  return obj


# ------------------------------------------------------------------- strict key accounting


def _flatten_tree(tree, prefix=()) -> dict[tuple, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten_tree(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _unflatten(flat: dict[tuple, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


class Conversion:
  """Maps source tensors to target leaves, recording every problem and raising them together.

  `target` is the abstract variable tree of the Flax module (e.g. `models.abstract_variables`),
  so every shape is checked and every leaf must be filled. Target paths are '/'-joined,
  starting with the collection: 'params/blocks_0/attn/qkv/kernel'.
  """

  def __init__(self, state_dict: dict[str, np.ndarray], target, source: str = "checkpoint"):
    self.state = state_dict
    self.source = source
    self.expected = {"/".join(p): tuple(v.shape) for p, v in _flatten_tree(target).items()}
    self.out: dict[str, np.ndarray] = {}
    self.used: set[str] = set()
    self.ignored: set[str] = set()
    self.missing: list[str] = []
    self.misshaped: list[str] = []
    self.unknown_targets: list[str] = []

  def has(self, key: str) -> bool:
    return key in self.state

  def take(self, key: str) -> np.ndarray | None:
    """The source tensor `key`, marked as used; None (and recorded) when missing."""
    if key not in self.state:
      self.missing.append(key)
      return None
    self.used.add(key)
    return self.state[key]

  def put(self, target: str, value: np.ndarray | None, from_key: str = "") -> None:
    """Set target leaf `target`; None (a missing source) is skipped, already recorded."""
    if value is None:
      return
    if target not in self.expected:
      self.unknown_targets.append(f"{target} (from {from_key})")
      return
    value = np.asarray(value)
    if tuple(value.shape) != self.expected[target]:
      self.misshaped.append(f"{from_key or '?'} -> {target}: got {tuple(value.shape)}, "
                            f"expected {self.expected[target]}")
      return
    self.out[target] = value.astype(np.float32) if value.dtype.kind == "f" else value

  def map(self, target: str, key: str, fn: Callable[[np.ndarray], np.ndarray] | None = None):
    value = self.take(key)
    if value is None:
      return
    label = f"{key} {tuple(value.shape)}"
    if fn is not None:
      try:
        value = fn(value)
      except (ValueError, TypeError) as e:  # reshape of a wrongly shaped tensor
        self.misshaped.append(f"{label} -> {target}: {e}")
        return
    self.put(target, value, label)

  def ignore(self, pattern: str) -> None:
    """Explicitly ignore source keys matching the regex `pattern` (fully)."""
    rx = re.compile(pattern)
    self.ignored.update(k for k in self.state if rx.fullmatch(k))

  def finish(self) -> dict:
    """The nested variables, or ConversionError listing every problem."""
    unexpected = sorted(set(self.state) - self.used - self.ignored)
    unfilled = sorted(set(self.expected) - set(self.out))
    problems = []
    if self.missing:
      problems.append(f"missing in {self.source} ({len(self.missing)}):\n  " + "\n  ".join(self.missing))
    if unexpected:
      problems.append(f"unexpected keys in {self.source} ({len(unexpected)}):\n  " + "\n  ".join(unexpected))
    if self.misshaped:
      problems.append(f"mis-shaped ({len(self.misshaped)}):\n  " + "\n  ".join(self.misshaped))
    if self.unknown_targets:
      problems.append("converter bug, unknown target parameters:\n  " + "\n  ".join(self.unknown_targets))
    # Unfilled leaves are only news when no source key was missing or mis-shaped.
    if unfilled and not (self.missing or self.misshaped):
      problems.append(f"parameters left unfilled ({len(unfilled)}):\n  " + "\n  ".join(unfilled))
    if problems:
      raise ConversionError(f"cannot convert {self.source}:\n" + "\n".join(problems))
    return _unflatten({tuple(k.split("/")): v for k, v in self.out.items()})


# -------------------------------------------------------------- torch -> flax layouts


def linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> flax Dense kernel (in, out)."""
  return np.ascontiguousarray(w.T)


def conv(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (out, in, kh, kw) -> flax Conv kernel (kh, kw, in, out)."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))

"""Weighted k-NN evaluation of frozen features, as the paper's `trainer.py::knn_predict`.

Features are L2-normalized; the similarity is their dot product (cosine). Each query takes its
k most similar bank examples, weighs neighbour j by exp(sim_j / T) (T = 0.1, k = 200 in the
paper), normalizes the weights to sum to 1 over the k neighbours, and scores class c by the
weighted mean of the neighbours' label vectors: for single-label data (one-hot labels) that
is the per-class weighted vote normalized to probabilities; for multi-label data (multi-hot
labels) it is the paper's L1-normalized weighted mean of the label vectors.

The bank is the training split under the eval transforms. Both the similarity search and the
vote run in chunks of queries, so a 200k-example bank needs memory for the bank plus one
(chunk x bank) similarity block. Several k share one top-k search.

`FeatureCache` stores extracted features once per (model, checkpoint, dataset, split,
resolution, transform) so that a k sweep or a second evaluation does not run the model again.
"""
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mfjax import parallel
from mfjax.config import RunStopped
from mfjax.evals import metrics as metrics_lib

log = logging.getLogger("mfjax")
K = 200
TEMPERATURE = 0.1
# Elements of one (query chunk x bank) similarity block: 2**26 float32 = 256 MiB.
SIMILARITY_BLOCK = 2 ** 26


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """x / max(||x||, 1e-12) per row, as torch.nn.functional.normalize (a zero row stays zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_features(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be (N, D), got shape {x.shape}")
  if not x.shape[0]:
    raise ValueError(f"{name} is empty")
  bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
  if bad.size:
    raise ValueError(f"{name} has non-finite values in {bad.size} rows, first rows {bad[:5].tolist()}")
  return x


def label_targets(labels, num_classes: int, multi_label: bool, name: str = "bank_labels") -> np.ndarray:
  """(N, C) float32 label vectors: one-hot of class ids, or the multi-hot rows as given (0/1)."""
  labels = np.asarray(labels)
  if multi_label:
    if labels.ndim != 2 or labels.shape[1] != num_classes:
      raise ValueError(f"{name} must be (N, {num_classes}) multi-hot for multi-label data, got {labels.shape}")
    values = np.unique(labels)
    if not np.all(np.isin(values, (0, 1))):
      raise ValueError(f"{name} must hold 0/1 values, got {values.tolist()}")
    return labels.astype(np.float32)
  if labels.ndim != 1:
    raise ValueError(f"{name} must be (N,) class ids for single-label data, got {labels.shape}")
  if labels.size and not np.all(np.equal(np.mod(labels, 1), 0)):
    raise ValueError(f"{name} must hold integer class ids")
  labels = labels.astype(np.int64)
  outside = np.unique(labels[(labels < 0) | (labels >= num_classes)])
  if outside.size:
    raise ValueError(f"{name} has class ids {outside.tolist()} outside 0..{num_classes - 1}")
  return np.eye(num_classes, dtype=np.float32)[labels]


@jax.jit(static_argnames="k")
def _top_k_block(bank, queries, k):
  similarity = jnp.dot(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(similarity, k)


def nearest_neighbours(bank_features, query_features, k: int,
                       block_elements: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Cosine similarities (N, k) and bank indices (N, k) of each query's k nearest, most similar first.

  Queries are searched in blocks of block_elements // bank_size rows (default SIMILARITY_BLOCK).
  """
  bank = l2_normalize(_check_features(bank_features, "bank_features"))
  queries = l2_normalize(_check_features(query_features, "query_features"))
  if bank.shape[1] != queries.shape[1]:
    raise ValueError(f"bank features have {bank.shape[1]} dimensions, query features {queries.shape[1]}")
  if not 1 <= k <= len(bank):
    raise ValueError(f"k={k} must be between 1 and the bank size {len(bank)}")
  rows = int(max(1, min(len(queries), (block_elements or SIMILARITY_BLOCK) // len(bank))))
  bank = jnp.asarray(bank)
  sims, indices = [], []
  for start in range(0, len(queries), rows):
    block = queries[start:start + rows]
    padded = np.pad(block, ((0, rows - len(block)), (0, 0)))  # one shape, one compilation
    s, i = _top_k_block(bank, jnp.asarray(padded), k)
    sims.append(np.asarray(s)[:len(block)])
    indices.append(np.asarray(i)[:len(block)])
  return np.concatenate(sims), np.concatenate(indices)


def vote(similarities, indices, bank_targets, k: int, temperature: float = TEMPERATURE,
         rows_per_chunk: int = 4096) -> np.ndarray:
  """Scores (N, C): the exp(sim/T)-weighted mean of the first k neighbours' label vectors.

  `similarities`/`indices` are sorted most similar first (as `nearest_neighbours` returns
  them). Weights are shifted by each row's top similarity before exp, which leaves the
  normalized weights unchanged and cannot overflow for small T.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  if not 1 <= k <= similarities.shape[1]:
    raise ValueError(f"k={k} must be between 1 and the {similarities.shape[1]} neighbours searched")
  scores = np.empty((len(similarities), bank_targets.shape[1]), np.float64)
  for start in range(0, len(similarities), rows_per_chunk):
    s = similarities[start:start + rows_per_chunk, :k].astype(np.float64)
    weights = np.exp((s - s[:, :1]) / temperature)
    weights /= weights.sum(axis=1, keepdims=True)
    neighbour_targets = bank_targets[indices[start:start + rows_per_chunk, :k]]  # (n, k, C)
    scores[start:start + rows_per_chunk] = np.einsum("nk,nkc->nc", weights, neighbour_targets)
  return scores


def knn_predict(bank_features, bank_labels, query_features, *, k: int = K, temperature: float = TEMPERATURE,
                num_classes: int, multi_label: bool = False) -> np.ndarray:
  """Class scores (N_query, C) in [0, 1]; rows sum to 1 for single-label data.

  bank_features (N_bank, D) and query_features (N_query, D): raw features (normalized here).
  bank_labels: (N_bank,) class ids, or (N_bank, C) 0/1 rows when multi_label.
  """
  return knn_predict_many(bank_features, bank_labels, query_features, ks=(k,), temperature=temperature,
                          num_classes=num_classes, multi_label=multi_label)[k]


def knn_predict_many(bank_features, bank_labels, query_features, *, ks: Sequence[int] = (K,),
                     temperature: float = TEMPERATURE, num_classes: int,
                     multi_label: bool = False) -> dict[int, np.ndarray]:
  """{k: scores} for every k in `ks` from one search for the max(ks) nearest neighbours."""
  ks = sorted({int(k) for k in ks})
  if not ks:
    raise ValueError("ks is empty")
  targets = label_targets(bank_labels, num_classes, multi_label)
  if len(targets) != len(bank_features):
    raise ValueError(f"{len(bank_features)} bank features but {len(targets)} bank labels")
  sims, indices = nearest_neighbours(bank_features, query_features, ks[-1])
  return {k: vote(sims, indices, targets, k, temperature) for k in ks}


def knn_evaluate(bank_features, bank_labels, query_features, query_labels, *, ks: Sequence[int] = (K,),
                 temperature: float = TEMPERATURE, num_classes: int, multi_label: bool, headline: str,
                 mask=None) -> dict[str, dict]:
  """{str(k): metrics} with `mfjax.evals.metrics.evaluate` on the k-NN scores of each k.

  query_labels: (N,) class ids or (N, C) multi-hot; mask: (N, C) multi-label score mask.
  """
  query_labels = np.asarray(query_labels)
  if len(query_labels) != len(query_features):
    raise ValueError(f"{len(query_features)} query features but {len(query_labels)} query labels")
  scores = knn_predict_many(bank_features, bank_labels, query_features, ks=ks, temperature=temperature,
                            num_classes=num_classes, multi_label=multi_label)
  return {str(k): metrics_lib.evaluate(s, query_labels, multi_label=multi_label, headline=headline, mask=mask)
          for k, s in scores.items()}


def result_json(*, model: str, dataset: str, resolution: int, headline_metric: str, results: dict,
                temperature: float = TEMPERATURE, **extra) -> dict:
  """The content of RUN_DIR/knn.json that `mfjax report` reads.

  `results` is `knn_evaluate`'s output. `extra` may carry e.g. "label" (the name the report
  shows, default the model), "checkpoint", "overrides", "data" (the dataset's build options as the
  config's data section has them: {"options": {...}, "uncertainty": ...}), "bank_size", "query_split".
  """
  for k, values in results.items():
    if "headline" not in values:
      raise ValueError(f"results for k={k} have no 'headline'")
  return {"model": model, "dataset": dataset, "resolution": int(resolution), "headline_metric": headline_metric,
          "temperature": float(temperature), "k": {str(k): v for k, v in results.items()}, **extra}


# ----------------------------------------------------------------------------- feature cache


class CacheError(RunStopped):
  pass


def fingerprint(path: str) -> dict:
  """What identifies a checkpoint for a cache key: absolute path, total bytes, newest mtime.

  A folder (an orbax checkpoint) counts all its files. "" (random initialization) is {"path": ""}.
  """
  if not path:
    return {"path": ""}
  if "://" in path:  # an object store (gs://): no cheap listing with sizes; a converted model's metadata
    return _remote_fingerprint(path)
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if os.path.isfile(path):
    stat = os.stat(path)
    return {"path": path, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "files": 1}
  total, newest, count = 0, 0, 0
  for folder, _, files in os.walk(path):
    for name in files:
      stat = os.stat(os.path.join(folder, name))
      total, newest, count = total + stat.st_size, max(newest, stat.st_mtime_ns), count + 1
  return {"path": path, "bytes": total, "mtime_ns": newest, "files": count}


def _remote_fingerprint(path: str) -> dict:
  """A converted model folder on an object store, identified by its model.json and the save times
  orbax records in its parameters' metadata (a new save in place gives new times)."""
  from etils import epath
  from mfjax import models
  folder = epath.Path(path)
  if not (folder / models.MODEL_JSON).exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist (no {models.MODEL_JSON})")
  saved = folder / models.PARAMS_DIR / "_CHECKPOINT_METADATA"
  return {"path": path, "model_json": (folder / models.MODEL_JSON).read_text(),
          "saved": saved.read_text() if saved.exists() else None}


def cache_listing(root: str, unused_days: float | None = None, max_gb: float | None = None,
                  prune: bool = False, now: float | None = None) -> str:
  """`mfjax cache`: a table of the cache's entries; with `unused_days` / `max_gb`, which go (entries
  unused for that many days, then the least recently used until the rest fit in max_gb) and, with
  `prune`, deletes them and the leftovers of killed writes."""
  cache = FeatureCache(root)
  now = time.time() if now is None else now
  entries = cache.entries()
  going = {e["path"] for e in entries if unused_days is not None and now - e["last_used"] > unused_days * 86400}
  if max_gb is not None:
    kept = sum(e["bytes"] for e in entries if e["path"] not in going)
    for e in entries:  # least recently used first
      if kept <= max_gb * 1e9:
        break
      if e["path"] not in going:
        going.add(e["path"])
        kept -= e["bytes"]
  leftovers = cache.leftovers(now=now)
  if not entries and not leftovers:
    return f"feature cache {cache.root}: no entries"
  verb = "deleted" if prune else "would delete"
  size = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
  lines = [f"feature cache {cache.root}: {len(entries)} entries, {size(sum(e['bytes'] for e in entries))}", "",
           "| entry | model | dataset | split | res | weights | MB | last used (UTC) |" + (" |" if going else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|" if going else "")]
  for e in entries:
    key = e["key"] or {}
    checkpoint = key.get("checkpoint", "?")
    weights = (checkpoint.get("path") or "random init") if isinstance(checkpoint, dict) else str(checkpoint)
    cells = [os.path.basename(e["path"])[:-4], key.get("model", "unreadable key"),
             dataset_of(str(key.get("dataset", "?"))), key.get("split", "?"),
             str(key.get("resolution", "?")), weights, f"{e['bytes'] / 1e6:.1f}",
             time.strftime("%Y-%m-%d %H:%M", time.gmtime(e["last_used"]))]
    if going:
      cells.append(verb if e["path"] in going else "")
    lines.append("| " + " | ".join(cells) + " |")
  freed = sum(e["bytes"] for e in entries if e["path"] in going)
  if going or leftovers:
    lines += ["", f"{verb}: {len(going)} entries ({size(freed)})"
              + (f" and {len(leftovers)} files left by killed writes" if leftovers else "")]
  if prune:
    for e in entries:
      if e["path"] in going:
        cache.delete(e)
    for path in leftovers:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
  elif going or leftovers:
    lines.append("(add --prune to delete them)")
  return "\n".join(lines)


def dataset_of(path: str) -> str:
  """The dataset a cache key's path names: a built dataset's DATA_DIR/<name>/<build config>/<version> as
  <name>/<build config> (the config tells the options apart, e.g. CheXpert's views); another path's last part."""
  parts = path.rstrip("/").split("/")
  if len(parts) >= 3 and re.fullmatch(r"\d+\.\d+\.\d+", parts[-1]):
    return f"{parts[-3]}/{parts[-2]}"
  return parts[-1]


ENTRY_NAME = re.compile(r"[0-9a-f]{24}\.(npz|json)")  # FeatureCache.path's names
TMP_NAME = re.compile(r"tmp\w+\.tmp")  # tempfile.mkstemp's, in FeatureCache._write_atomically


class FeatureCache:
  """Arrays computed once per key, stored as ROOT/<hash>.npz with the key beside it in <hash>.json.

  A key is a JSON-able dict, e.g. {"model": "dinov2_vitb14", "checkpoint": fingerprint(ckpt),
  "dataset": ds.path, "split": "train", "resolution": 224, "transform": "eval"}. Entries are
  written atomically, so an interrupted computation leaves no entry behind.
  """

  def __init__(self, root: str):
    if "://" in str(root):
      raise CacheError(f"feature cache {root}: the cache is a local folder (every process reads its entries "
                       "often); set data.feature_cache / --cache-dir to a local path")
    self.root = os.path.abspath(os.path.expanduser(root))

  def path(self, key: dict) -> str:
    try:
      text = json.dumps(key, sort_keys=True)
    except TypeError as e:
      raise TypeError(f"feature cache key must be JSON-serializable: {e}") from None
    return os.path.join(self.root, hashlib.sha256(text.encode()).hexdigest()[:24] + ".npz")

  def get(self, key: dict) -> dict[str, np.ndarray] | None:
    path = self.path(key)
    if not os.path.exists(path):
      return None
    key_path = path[:-4] + ".json"
    try:
      with open(key_path) as f:
        stored = json.load(f)
    except FileNotFoundError:  # pruned (`mfjax cache --prune`) since it was listed: computed again
      return None
    except (OSError, ValueError) as e:
      raise CacheError(f"feature cache entry {key_path} is unreadable ({e}); delete {path} and its "
                       ".json to recompute") from None
    if stored != json.loads(json.dumps(key)):
      raise CacheError(f"feature cache entry {path} belongs to key {stored}, not {key}")
    try:
      with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
      return None
    except Exception as e:  # noqa: BLE001 - any failure to read means a corrupt file
      raise CacheError(f"feature cache file {path} is corrupt ({type(e).__name__}: {e}); delete it to "
                       "recompute") from None
    with contextlib.suppress(OSError):  # when it was last used, for `mfjax cache --unused-days`
      os.utime(key_path)
    return arrays

  def put(self, key: dict, arrays: dict) -> str:
    if not isinstance(arrays, dict) or not arrays:
      raise TypeError(f"features to cache must be a non-empty dict of arrays, got {type(arrays).__name__}")
    arrays = {str(name): np.asarray(value) for name, value in arrays.items()}
    objects = [name for name, value in arrays.items() if value.dtype == object]
    if objects:
      raise TypeError(f"features {objects} are not numeric arrays")
    path = self.path(key)
    os.makedirs(self.root, exist_ok=True)
    # Each file appears whole or not at all (processes sharing a file system write the same entry).
    self._write_atomically(path[:-4] + ".json", lambda f: f.write(json.dumps(key, indent=2, sort_keys=True).encode()))
    self._write_atomically(path, lambda f: np.savez(f, **arrays))
    return path

  def _write_atomically(self, path: str, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        write(f)
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise

  def entries(self) -> list[dict]:
    """Every entry, least recently used first: {"path", "key" (None when its .json is unreadable),
    "bytes" (both files), "last_used" (written or last read, seconds since the epoch)}. Only files
    named as this cache names them count: a --cache folder holding other files keeps them."""
    if not os.path.isdir(self.root):
      return []
    out = []
    for name in os.listdir(self.root):
      if not ENTRY_NAME.fullmatch(name) or not name.endswith(".npz"):
        continue
      path = os.path.join(self.root, name)
      key_path = path[:-4] + ".json"
      try:
        with open(key_path) as f:
          key = json.load(f)
      except (OSError, ValueError):
        key = None
      stats = []
      for p in (path, key_path):
        with contextlib.suppress(FileNotFoundError):  # written or pruned meanwhile
          stats.append(os.stat(p))
      if stats:
        out.append({"path": path, "key": key if isinstance(key, dict) else None,
                    "bytes": sum(st.st_size for st in stats), "last_used": max(st.st_mtime for st in stats)})
    return sorted(out, key=lambda e: e["last_used"])

  def leftovers(self, older_than_s: float = 86400.0, now: float | None = None) -> list[str]:
    """Files no entry needs, older than `older_than_s`: a write killed midway (tmp*.tmp), a key file
    whose arrays are gone. Younger ones may be a write in progress."""
    if not os.path.isdir(self.root):
      return []
    names = set(os.listdir(self.root))
    now = time.time() if now is None else now
    orphan = lambda n: ENTRY_NAME.fullmatch(n) and n.endswith(".json") and n[:-5] + ".npz" not in names
    found = [os.path.join(self.root, n) for n in names if TMP_NAME.fullmatch(n) or orphan(n)]
    old = []
    for path in found:
      with contextlib.suppress(FileNotFoundError):
        if now - os.path.getmtime(path) > older_than_s:
          old.append(path)
    return sorted(old)

  def delete(self, entry: dict) -> None:
    for path in (entry["path"], entry["path"][:-4] + ".json"):
      with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

  def get_or_compute(self, key: dict, compute_fn: Callable[[], dict]) -> dict[str, np.ndarray]:
    """The cached arrays for `key`, or compute_fn()'s (stored, then returned as computed).

    In a multi-process job compute_fn runs collectives, so every process must take the same
    branch: all compute when the entry is missing from any process's cache (a host-local cache
    on a replaced host), and an unreadable entry on any process stops all of them. An entry that
    cannot be stored (a full disk) is a warning: the run goes on with the arrays it computed."""
    try:
      cached, problem = self.get(key), None
    except CacheError as e:
      cached, problem = None, e
    codes = parallel.gathered(2 if problem else 0 if cached is not None else 1)
    if (codes == 2).any():
      if problem:
        raise problem
      raise CacheError(f"the feature cache entry {self.path(key)} is unreadable on process(es) "
                       f"{np.flatnonzero(codes == 2).tolist()}: see their error")
    if (codes == 0).all():
      return cached
    arrays = compute_fn()
    try:
      self.put(key, arrays)
    except OSError as e:
      log.warning("feature cache %s: cannot store this entry (%s); going on without it", self.root, e)
    return {str(name): np.asarray(value) for name, value in arrays.items()}

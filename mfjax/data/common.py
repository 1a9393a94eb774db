"""What every dataset builder shares: option checking, CSV reading with line numbers,
image verification, split assignment, and the tfds builder that writes array_record.

A dataset module (aptos2019.py, ...) is a recipe: plain functions and constants that say
where its files are and what its labels mean. The tfds `Builder` here runs any recipe:

  NAME        the dataset's name (and tfds builder name)
  LAYOUT      the expected folder layout, shown in errors and in the README
  DEFAULTS    the dataset's own build options and their defaults
  check(opts, manual_dir) raise DataError for a bad option value (common ones are checked
              here); may fill in defaults that depend on the files (csv_images' classes)
  source_dir(manual_dir, opts) -> the download's folder: manual_dir, or the folder below it where the
              recipe finds its files. The build reads it and records its files relative to it, so that a
              download given as itself or as its parent is one source.
  spec(opts)  -> Spec: classes, multi-label or not, headline metric, normalization, channels
  describe(opts) -> short human-readable part of the tfds config name
  features(opts) -> dict of extra tfds features stored with each image
  read(manual_dir, opts) -> (rows, source_files): one `Row` per example, after every CSV
              problem has been raised; images are not opened yet.

A build then: verifies every image (missing/unreadable: error, or skipped and recorded when
`skip_bad_images=True`), measures pixel statistics, assigns splits (official or seeded),
refuses an empty split, and writes each split. Rows of one group (a patient) never straddle a
seeded split; an official split is kept as published, and groups it puts in two splits are logged
and recorded. Building the same files with the same
options twice gives identical records.
"""
import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Iterable

import numpy as np
import tensorflow_datasets as tfds

from mfjax.config import DataError
from mfjax.data import images, splits

VERSION = "1.0.0"  # a dataset's build version; a recipe whose records change sets its own (its builds move)

COMMON_DEFAULTS = {
    "split": "seeded",          # seeded | official
    "seed": 0,
    "fractions": (0.8, 0.1, 0.1),
    "skip_bad_images": False,
    "store_size": None,         # None keeps original files; N stores the shorter side at <= N px
}
# Options that only change how fast a build runs, never what it writes.
RUNTIME_OPTIONS = {"num_threads": 8}


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a trainer needs to know about a dataset."""
  name: str
  class_names: tuple[str, ...]
  multi_label: bool
  headline_metric: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  channels: int

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


@dataclasses.dataclass
class Row:
  """One example as read from the source CSVs, before its image is opened."""
  id: str                         # unique within the dataset; the record key
  image: str                      # absolute path of the image file
  where: str                      # "file, line L, column 'C'" for error messages
  label: int | None = None        # multi-class
  labels: np.ndarray | None = None  # multi-label, int8 codes (1, 0, -1 uncertain, -2 blank)
  group: str | None = None        # rows sharing a group never straddle two seeded splits
  official: str | None = None     # train | validation | test from an official split
  features: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- options


def resolve_options(recipe, options: dict, manual_dir: str) -> dict:
  """Defaults filled in, unknown keys and bad values rejected, tuples normalised."""
  defaults = {**COMMON_DEFAULTS, **recipe.DEFAULTS, **RUNTIME_OPTIONS}
  unknown = sorted(set(options) - set(defaults))
  if unknown:
    raise DataError(f"{recipe.NAME}: unknown option(s) {unknown}; valid options are {sorted(defaults)}")
  opts = {**defaults, **options}
  if opts["split"] not in ("seeded", "official"):
    raise DataError(f"{recipe.NAME}: split={opts['split']!r}; valid values are 'seeded', 'official'")
  if not isinstance(opts["seed"], int) or isinstance(opts["seed"], bool) or opts["seed"] < 0:
    raise DataError(f"{recipe.NAME}: seed={opts['seed']!r} must be a non-negative int")
  try:
    opts["fractions"] = splits.check_fractions(opts["fractions"])
  except (TypeError, ValueError) as e:
    raise DataError(f"{recipe.NAME}: fractions={opts['fractions']!r}: {e}") from None
  if not isinstance(opts["skip_bad_images"], bool):
    raise DataError(f"{recipe.NAME}: skip_bad_images={opts['skip_bad_images']!r} must be True or False")
  size = opts["store_size"]
  if size is not None and (not isinstance(size, int) or size < 16):
    raise DataError(f"{recipe.NAME}: store_size={size!r} must be None or an int >= 16")
  if not isinstance(opts["num_threads"], int) or opts["num_threads"] < 1:
    raise DataError(f"{recipe.NAME}: num_threads={opts['num_threads']!r} must be an int >= 1")
  recipe.check(opts, manual_dir)
  return opts


def record_options(opts: dict) -> dict:
  """The options that decide what is written (all but the runtime ones), JSON-ready."""
  return json.loads(json.dumps({k: v for k, v in sorted(opts.items()) if k not in RUNTIME_OPTIONS}))


ABSENT = "absent"  # the digest of an optional source file that was not there: adding it later changes the build


def source_digest(path: str) -> str:
  return sha256_file(path) if os.path.isfile(path) else ABSENT


def config_name(recipe, opts: dict) -> str:
  digest = hashlib.sha256(json.dumps(record_options(opts), sort_keys=True).encode()).hexdigest()[:8]
  split = "official" if opts["split"] == "official" else f"seeded{opts['seed']}"
  parts = [recipe.describe(opts), split, digest]
  return "-".join(p for p in parts if p)


# ----------------------------------------------------------------------------- files and CSVs


def find_file(manual_dir: str, candidates: Iterable[str], what: str, layout: str, columns: Iterable[str] = ()) -> str:
  """First existing `manual_dir/c` or `manual_dir/<one subfolder>/c` among candidates; with `columns`,
  the first CSV whose header has them (a parent folder of several datasets holds several train.csv),
  else the first found, whose reader then names the columns it lacks."""
  candidates, columns = list(candidates), list(columns)
  found = []

  def fits(path):
    found.append(path)
    try:
      with open(path, newline="", encoding="utf-8-sig") as f:
        header = [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
      return False
    return all(c in header for c in columns)

  subfolders = sorted(os.listdir(manual_dir)) if os.path.isdir(manual_dir) else []
  for folder in [""] + subfolders:
    for c in candidates:
      path = os.path.join(manual_dir, folder, c) if folder else os.path.join(manual_dir, c)
      if os.path.isfile(path) and fits(path):
        return path
  if found:
    return found[0]
  raise DataError(f"{what} not found in manual_dir {manual_dir!r} (looked for {candidates}, also one "
                  f"folder down). Expected layout:\n{layout}")


def where(path: str, line: int, column: str | None = None) -> str:
  return f"{path}, line {line}" + (f", column {column!r}" if column else "")


def read_csv(path: str, required: Iterable[str]) -> tuple[list[str], list[tuple[int, dict]]]:
  """(header, [(line_number, row_dict)]); a missing column or a ragged row is an error."""
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None:
        raise DataError(f"{path} is empty; expected a header with columns {list(required)}")
      header = [h.strip() for h in header]
      missing = [c for c in required if c not in header]
      if missing:
        raise DataError(f"{path} is missing required column(s) {missing}; its columns are {header}")
      rows = []
      while True:
        line = reader.line_num + 1  # where the row starts: a quoted cell may span lines
        values = next(reader, None)
        if values is None:
          break
        if not values or (len(values) == 1 and not values[0].strip()):
          continue  # blank line
        if len(values) != len(header):
          raise DataError(f"{where(path, line)}: {len(values)} fields, the header has {len(header)}")
        rows.append((line, dict(zip(header, (v.strip() for v in values)))))
  except (UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{path} cannot be read as CSV: {e}") from e
  return header, rows


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


# ----------------------------------------------------------------------------- build steps


def _verify(row: Row, channels: int):
  """(problem, (pixel stats, sha256 of the file)): problem None for a usable image."""
  try:
    with open(row.image, "rb") as f:
      data = f.read()
    return None, (images.pixel_stats(images.decode(data, channels, row.image)), hashlib.sha256(data).hexdigest())
  except FileNotFoundError:
    return "missing", None
  except Exception as e:  # any decoder failure means the file is unreadable; it is reported
    return f"unreadable ({type(e).__name__}: {e})", None


def verify_images(name: str, rows: list[Row], channels: int, skip_bad: bool, num_threads: int):
  """Decode every image once. Returns (good rows, their (pixel stats, file digest), skipped records)."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    results = list(pool.map(lambda r: _verify(r, channels), rows))
  bad = [(row, problem) for row, (problem, _) in zip(rows, results) if problem]
  if bad and not skip_bad:
    listing = "\n".join(f"  {row.image}: {problem} (from {row.where})" for row, problem in bad[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    raise DataError(f"{name}: {len(bad)} image(s) cannot be used:\n{listing}{more}\n"
                    "Fix the files, or build with skip_bad_images=True to leave them out (they are "
                    "then listed in the dataset's metadata).")
  skipped = [{"id": row.id, "image": row.image, "source": row.where, "problem": problem}
             for row, problem in bad]
  good = [(row, stats) for row, (problem, stats) in zip(rows, results) if not problem]
  return [r for r, _ in good], [s for _, s in good], skipped


def assign_splits(name: str, rows: list[Row], opts: dict, num_classes: int) -> dict[str, list[Row]]:
  """{split: rows}; official splits where the rows carry one and the options ask for it."""
  fractions = opts["fractions"]
  if opts["split"] == "official":
    if all(r.official is None for r in rows):
      raise DataError(f"{name} has no official split; use split='seeded'")
    fixed = {s: [r for r in rows if r.official == s] for s in splits.SPLITS}
    rest = [r for r in rows if r.official is None]
    # Splits the official release lacks are carved out of the rest, in proportion.
    open_splits = [i for i, s in enumerate(splits.SPLITS) if not fixed[s]]
    if rest and not open_splits:
      raise DataError(f"{name}: {len(rest)} rows have no official split although all three exist: give them "
                      "one, or use split='seeded'")
    if rest:
      share = np.array([fractions[i] for i in open_splits])
      where_to = _seeded(rest, share / share.sum(), opts["seed"], num_classes)
      for k, i in enumerate(open_splits):
        fixed[splits.SPLITS[i]] = [r for r, s in zip(rest, where_to) if s == k]
    assigned = fixed
  else:
    where_to = _seeded(rows, fractions, opts["seed"], num_classes)
    assigned = {s: [r for r, k in zip(rows, where_to) if k == i] for i, s in enumerate(splits.SPLITS)}
  empty = [s for s, rs in assigned.items() if not rs]
  if empty:
    sizes = {s: len(rs) for s, rs in assigned.items()}
    raise DataError(f"{name}: split(s) {empty} would be empty (sizes {sizes} from {len(rows)} usable "
                    f"rows, split={opts['split']!r}, fractions={opts['fractions']}); the dataset is too "
                    "small for this split")
  return assigned


def groups_in_two_splits(assigned: dict[str, list[Row]]) -> dict[str, list[str]]:
  splits_of = {}
  for s, rs in assigned.items():
    for r in rs:
      if r.group is not None and s not in splits_of.setdefault(r.group, []):
        splits_of[r.group].append(s)
  return {g: ss for g, ss in sorted(splits_of.items()) if len(ss) > 1}


def image_sizes(rows: list[Row], manual_dir: str) -> str:
  """A digest of every listed image file's path and size (-1: missing), checked when a build is
  reused: an image replaced, removed or restored since (a corrupt one fixed, say) changes it. A
  replacement of the same byte size goes unseen (rebuild with overwrite=True)."""
  h = hashlib.sha256()
  inside = os.path.join(manual_dir, "")
  for path in sorted({r.image for r in rows}):
    try:
      size = os.stat(path).st_size
    except OSError:
      size = -1
    name = os.path.relpath(path, manual_dir) if path.startswith(inside) else path  # manual_dir may move
    h.update(f"{name}\0{size}\n".encode())
  return h.hexdigest()[:16]


def holds_sources_only(manual_dir: str, sources: dict[str, str]) -> bool:
  """Whether `manual_dir` holds no file (hidden ones aside) but the recorded source files of a
  build: a copy of a download's CSVs, made to reuse the build where the images are not (the
  workers of a TPU pod). Stops at the first other file, so a whole download costs little."""
  for folder, subfolders, files in os.walk(manual_dir):
    subfolders[:] = [d for d in subfolders if not d.startswith(".")]
    for name in files:
      if not name.startswith(".") and os.path.relpath(os.path.join(folder, name), manual_dir) not in sources:
        return False
  return True


def content_id(assigned: dict[str, list[Row]], digest_of: dict[str, str]) -> str:
  """A digest of every example: split, id, image file digest, labels and features."""
  content = hashlib.sha256()
  for split, rows in assigned.items():
    for r in rows:
      labels = None if r.labels is None else r.labels.tolist()
      content.update(json.dumps([split, r.id, digest_of[r.id], r.label, labels, r.features], sort_keys=True,
                                default=str).encode())
  return content.hexdigest()[:16]


def _seeded(rows: list[Row], fractions, seed: int, num_classes: int) -> np.ndarray:
  if rows[0].labels is not None:
    counts = np.stack([(r.labels == 1).astype(np.int64) for r in rows])
  else:
    counts = np.zeros((len(rows), num_classes), np.int64)
    counts[np.arange(len(rows)), [r.label for r in rows]] = 1
  groups = [r.group if r.group is not None else f"id:{r.id}" for r in rows]
  return splits.assign(groups, counts, fractions, seed)


def class_counts(rows: list[Row], num_classes: int) -> list[int]:
  if rows and rows[0].labels is not None:
    return np.sum([(r.labels == 1) for r in rows], axis=0).astype(int).tolist()
  return np.bincount([r.label for r in rows], minlength=num_classes).tolist()


# ----------------------------------------------------------------------------- tfds builder


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """These datasets are never in tfds's public GCS bucket. tfds looks there for every builder
  without prepared files, and leaves an empty temporary folder behind each time."""

  def initialize_from_bucket(self):
    pass


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Runs a recipe (see module docstring). Subclassed once per dataset for its tfds name."""

  VERSION = tfds.core.Version(VERSION)
  recipe: Any = None
  # Nothing is downloaded, so there is no checksums file next to the code to look up (tfds's
  # lookup also needs the undeclared `importlib_resources` package for installed modules).
  code_path = None

  def __init__(self, *, manual_dir: str, options: dict, data_dir: str):
    self._manual_dir = os.path.abspath(manual_dir)
    self.source_dir = self.recipe.source_dir(self._manual_dir, options)
    self._opts = options
    self._spec = self.recipe.spec(options)
    config = tfds.core.BuilderConfig(name=config_name(self.recipe, options),
                                     description=json.dumps(record_options(options), sort_keys=True))
    super().__init__(data_dir=data_dir, config=config, file_format="array_record")

  def _info(self):
    channels = self._spec.channels
    label = ({"labels": tfds.features.Tensor(shape=(self._spec.num_classes,), dtype=np.int8)}
             if self._spec.multi_label else {"label": tfds.features.ClassLabel(names=self._spec.class_names)})
    return _LocalDatasetInfo(
        builder=self,
        description=self.recipe.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, channels), dtype=np.uint8),
            "id": tfds.features.Text(),
            **label,
            **self.recipe.features(self._opts),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # manual download only; the manual dir was given at construction
    name, opts, spec = self.recipe.NAME, self._opts, self._spec
    rows, sources = self.recipe.read(self.source_dir, opts)
    seen = {}
    for r in rows:
      if r.id in seen:
        raise DataError(f"{name}: duplicate example id {r.id!r} at {r.where} and {seen[r.id]}")
      seen[r.id] = r.where
    num_read, listed_images = len(rows), image_sizes(rows, self.source_dir)
    rows, stats, skipped = verify_images(name, rows, spec.channels, opts["skip_bad_images"],
                                         opts["num_threads"])
    if not rows:
      files = ", ".join(sorted(set(sources)))
      raise DataError(f"{name}: no usable examples in {self.source_dir} ({num_read} read from {files}, "
                      f"{len(skipped)} skipped as missing or unreadable; options {record_options(opts)})")
    if skipped:
      logging.warning("%s: skipped %d unreadable or missing image(s): %s", name, len(skipped),
                      ", ".join(s["image"] for s in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    assigned = assign_splits(name, rows, opts, spec.num_classes)
    stats_of = {r.id: s for r, (s, _) in zip(rows, stats)}
    digest_of = {r.id: d for r, (_, d) in zip(rows, stats)}
    straddling = groups_in_two_splits(assigned)
    if straddling:  # only an official split can do this; it is the release's, kept as published
      logging.warning("%s: the official split puts %d group(s) in two splits (kept as published; listed in the "
                      "metadata as groups_in_two_splits): %s", name, len(straddling),
                      ", ".join(f"{g} ({'/'.join(s)})" for g, s in list(straddling.items())[:10]))
    train_stats = np.mean([stats_of[r.id] for r in assigned["train"]], axis=0)
    self.info.metadata.update({
        "mfjax_version": str(self.VERSION),
        # What the records hold: a rebuild from other images under the same CSVs is another build to caches
        # and runs; the same files give the same id.
        "build_id": content_id(assigned, digest_of),
        "options": record_options(opts),
        "manual_dir": self._manual_dir,
        "source_dir": self.source_dir,  # what "sources" and "image_sizes" name files relative to
        "sources": {os.path.relpath(p, self.source_dir): source_digest(p) for p in sorted(set(sources))},
        "image_sizes": listed_images,
        "spec": dataclasses.asdict(self._spec),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "split_sizes": {s: len(rs) for s, rs in assigned.items()},
        "groups_in_two_splits": straddling,
        "class_counts": {s: class_counts(rs, spec.num_classes) for s, rs in assigned.items()},
        "measured_train_mean": train_stats[0].tolist(),
        "measured_train_std": np.sqrt(np.maximum(train_stats[1] - train_stats[0] ** 2, 0)).tolist(),
    })
    return {s: self._generate_examples(rs) for s, rs in assigned.items()}

  def _generate_examples(self, rows):
    channels, size = self._spec.channels, self._opts["store_size"]
    chunk = 64
    with concurrent.futures.ThreadPoolExecutor(self._opts["num_threads"]) as pool:
      for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        encoded = pool.map(lambda r: images.storage_bytes(r.image, channels, size), part)
        for row, data in zip(part, encoded):
          example = {"image": data, "id": row.id, **row.features}
          if row.labels is not None:
            example["labels"] = row.labels.astype(np.int8)
          else:
            example["label"] = row.label
          yield row.id, example

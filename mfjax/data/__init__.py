"""Medical image datasets: tfds builders (manual download -> array_record) and grain loaders.

    import mfjax.data

    ds = mfjax.data.build("aptos2019", manual_dir="~/Downloads/aptos2019-blindness-detection",
                          data_dir="~/mfjax_data")      # reused when already built
    ds.spec.num_classes, ds.spec.headline_metric        # 5, "quadratic_kappa"
    ds.spec.mean, ds.spec.std, ds.spec.channels         # the paper's normalization, 3
    ds.split_sizes                                      # {"train": ..., "validation": ..., "test": ...}
    ds.skipped                                          # images left out (skip_bad_images=True only)

    train = mfjax.data.make_loader(ds, "train", batch_size=64, train=True, seed=0, num_epochs=100)
    it = iter(train)
    batch = next(it)              # {"image": (64, 224, 224, 3) float32, "label", "index", "valid"}
    state = it.get_state()        # resume later with a fresh iterator's set_state(state)
    scores = mfjax.data.make_eval_loader(ds, "test", batch_size=64)   # every example once, padded
    arrays = mfjax.data.global_batch(batch, mesh)  # multi-host: jax.Arrays of the global batch

Datasets (`DATASETS`): aptos2019, isic2019, chexpert, cbis_ddsm, csv_images. Each module's
docstring and `LAYOUT` say what folder layout it reads and which options it takes; the
common options are split ('seeded' | 'official'), seed, fractions, skip_bad_images,
store_size and num_threads (see `common.py`). `info(name, **options)` gives a dataset's
Spec without building it (not for csv_images, whose classes come from your CSV).

Built datasets live in `data_dir/<name>/<config>/<version>/` (1.0.0; CBIS-DDSM 1.1.0) as tfds array_record files with
a `metadata.json` holding the options, source-file hashes, split sizes, class counts,
measured pixel statistics and every skipped image. They are read with tfds's data source
(`tfds.builder_from_directory(path).as_data_source`), which needs no TensorFlow.
"""
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import tensorflow_datasets as tfds

from mfjax.data import aptos2019, cbis_ddsm, chexpert, common, csv_images, isic2019
from mfjax.data.common import DataError, Spec
from mfjax.data.pipeline import (global_batch, label_policy, make_array_loader, make_eval_loader, make_loader,
                                 steps_per_epoch)
from mfjax.data.splits import SPLITS

DATASETS = {m.NAME: m for m in (aptos2019, isic2019, chexpert, cbis_ddsm, csv_images)}


class Aptos2019(common.Builder):
  __doc__ = aptos2019.__doc__
  recipe = aptos2019
  MANUAL_DOWNLOAD_INSTRUCTIONS = aptos2019.LAYOUT


class Isic2019(common.Builder):
  __doc__ = isic2019.__doc__
  recipe = isic2019
  MANUAL_DOWNLOAD_INSTRUCTIONS = isic2019.LAYOUT


class Chexpert(common.Builder):
  __doc__ = chexpert.__doc__
  recipe = chexpert
  MANUAL_DOWNLOAD_INSTRUCTIONS = chexpert.LAYOUT


class CbisDdsm(common.Builder):
  __doc__ = cbis_ddsm.__doc__
  VERSION = tfds.core.Version(cbis_ddsm.VERSION)
  recipe = cbis_ddsm
  MANUAL_DOWNLOAD_INSTRUCTIONS = cbis_ddsm.LAYOUT


class CsvImages(common.Builder):
  __doc__ = csv_images.__doc__
  recipe = csv_images
  MANUAL_DOWNLOAD_INSTRUCTIONS = csv_images.LAYOUT


BUILDERS = {b.recipe.NAME: b for b in (Aptos2019, Isic2019, Chexpert, CbisDdsm, CsvImages)}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A built dataset: where it is, what it holds, and its splits as random-access sources."""
  name: str
  path: str
  spec: Spec
  split_sizes: dict[str, int]
  metadata: dict[str, Any]

  @property
  def options(self) -> dict:
    return self.metadata["options"]

  @property
  def skipped(self) -> list[dict]:
    return self.metadata["skipped"]

  @property
  def fingerprint(self) -> str:
    """What a cache or a run must change with when the dataset is rebuilt in place: its sources,
    options and splits, its build version, and the build itself (images may change under the same CSVs)."""
    content = {k: self.metadata.get(k) for k in ("sources", "options", "split_sizes", "class_counts", "skipped",
                                                 "mfjax_version", "build_id")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

  def source(self, split: str):
    """Random-access records of `split`; "image" stays encoded bytes (decoded by the loader)."""
    if split not in self.split_sizes:
      raise DataError(f"{self.name} has no split {split!r}; its splits are {list(self.split_sizes)}")
    builder = tfds.builder_from_directory(self.path)
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def _recipe(name: str):
  if name not in DATASETS:
    raise DataError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
  return DATASETS[name]


def info(name: str, **options) -> Spec:
  """Spec (classes, multi-label, headline metric, normalization, channels) without building."""
  recipe = _recipe(name)
  if recipe is csv_images:
    raise DataError("csv_images classes and statistics come from your CSV: use build(...).spec")
  return recipe.spec(common.resolve_options(recipe, options, manual_dir=""))


def load(path: str) -> Dataset:
  """An already built dataset from its directory (data_dir/<name>/<config>/<version>)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise DataError(f"{path} is not a built dataset (no dataset_info.json); build it with mfjax.data.build")
  builder = tfds.builder_from_directory(path)
  metadata = dict(builder.info.metadata or {})
  if "spec" not in metadata:
    raise DataError(f"{path} was not built by mfjax.data (no 'spec' in metadata.json)")
  spec = dict(metadata["spec"])
  if spec["mean"] is None:
    spec["mean"], spec["std"] = metadata["measured_train_mean"], metadata["measured_train_std"]
  spec = Spec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
  sizes = {s: builder.info.splits[s].num_examples for s in SPLITS}
  return Dataset(name=builder.name, path=path, spec=spec, split_sizes=sizes, metadata=metadata)


def build(name: str, manual_dir: str, data_dir: str, *, overwrite: bool = False, **options) -> Dataset:
  """Build `name` from its original download in `manual_dir` into `data_dir`, or reuse it.

  A dataset already built with the same options is reused when the source CSVs/lists it was
  built from, and the sizes of the image files they list, are unchanged; if they changed, or it
  was built from another folder whose files differ, this raises unless overwrite=True (rebuild;
  the old build is replaced only once the new one is complete). A download given as its own
  folder or as its parent is the same source. A `manual_dir` holding only those source files (a
  copy of the CSVs where the images are not, as on a TPU pod's workers) reuses the build on the CSVs.
  Options: the common ones (split, seed, fractions, skip_bad_images, store_size, num_threads)
  and the dataset's own (see its module). Raises DataError on any bad input.
  """
  recipe = _recipe(name)
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  if not os.path.isdir(manual_dir):
    raise DataError(f"{name}: manual_dir {manual_dir!r} is not a folder. Expected layout:\n{recipe.LAYOUT}")
  opts = common.resolve_options(recipe, options, manual_dir)
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  builder = BUILDERS[name](manual_dir=manual_dir, options=opts, data_dir=data_dir)
  path = builder.data_dir
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    built = load(path)
    if overwrite:
      return _rebuild(builder, manual_dir, opts)
    _check_reusable(recipe, built, manual_dir, builder.source_dir, opts)
    return built
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=builder.source_dir))
  except OSError:  # another process (every process of a multi-host job, say) finished the same build first
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
      raise
    logging.getLogger("mfjax").warning("%s: %s was built meanwhile by another process; using it", name, path)
  return load(path)


def _recorded_base(metadata: dict, manual_dir: str, source_dir: str) -> tuple[str, str, bool]:
  """(the folder here that a build's recorded source names are relative to, the folder it was built from,
  whether that is this download). Builds record them relative to their source_dir; older ones (no
  "source_dir") relative to the manual_dir they were given, which was that folder or its parent."""
  same = lambda a, b: os.path.realpath(a) == os.path.realpath(b)
  if "source_dir" in metadata:
    return source_dir, metadata["source_dir"], same(metadata["source_dir"], source_dir)
  for here in (source_dir, os.path.dirname(source_dir), manual_dir):
    if same(metadata["manual_dir"], here):
      return here, metadata["manual_dir"], True
  return manual_dir, metadata["manual_dir"], False


def _check_reusable(recipe, built: Dataset, manual_dir: str, source_dir: str, opts: dict) -> None:
  """Raise unless `built` holds what `source_dir` holds now: the same source files, and the images they
  list of the same sizes."""
  name, path = recipe.NAME, built.path
  base, made_from, same_folder = _recorded_base(built.metadata, manual_dir, source_dir)
  changed = [f for f, digest in built.metadata["sources"].items()
             if common.source_digest(os.path.join(base, f)) != digest]  # gone, changed, or added
  if changed and same_folder:
    raise DataError(f"{name}: {path} was built from source files that have changed, are gone or were added in "
                    f"{base}: {changed}; pass overwrite=True to rebuild it")
  if changed:
    raise DataError(f"{name}: {path} was built from another folder, {made_from}; the source files {changed} differ "
                    f"in {source_dir} (changed, gone or added). To keep both, build this one in another data_dir; "
                    f"overwrite=True replaces the build of {made_from}")
  if "image_sizes" not in built.metadata:
    return  # built before image sizes were recorded: not checked
  if common.holds_sources_only(base, built.metadata["sources"]):
    logging.getLogger("mfjax").info("%s: %s holds only the source files %s was built from, unchanged; reused "
                                    "without checking the images", name, base, path)
    return
  logging.disable(logging.WARNING)  # the source's warnings were given when it was built
  try:
    rows, _ = recipe.read(source_dir, opts)
  finally:
    logging.disable(logging.NOTSET)
  if common.image_sizes(rows, base) != built.metadata["image_sizes"]:
    raise DataError(f"{name}: image files the source CSVs list in {base} were replaced, removed or "
                    f"added since {path} was built (their sizes differ); pass overwrite=True (`python -m "
                    f"mfjax.data {name} ... --overwrite`) to rebuild it")


def _rebuild(builder, manual_dir: str, opts: dict) -> Dataset:
  """Build anew beside the build at `builder.data_dir`, and put the new one in its place only once it is
  complete: a rebuild that fails leaves the old build as it was."""
  path = builder.data_dir
  staging = tempfile.mkdtemp(prefix=f".{builder.name}-rebuild-", dir=builder.data_dir_root)
  try:
    fresh = type(builder)(manual_dir=manual_dir, options=opts, data_dir=staging)
    fresh.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=fresh.source_dir))
    replaced = os.path.join(staging, "replaced")
    os.rename(path, replaced)
    try:
      os.rename(fresh.data_dir, path)
    except BaseException:  # the old build goes back where it was
      os.rename(replaced, path)
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return load(path)


__all__ = ["DATASETS", "SPLITS", "DataError", "Dataset", "Spec", "build", "global_batch", "info",
           "label_policy", "load", "make_array_loader", "make_eval_loader", "make_loader", "steps_per_epoch"]

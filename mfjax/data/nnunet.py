"""nnU-Net raw datasets for 2-D (slice) segmentation: read, plan, preprocess, sample.

The raw layout is nnU-Net v2's (the MSD v1 `dataset.json` with a "training" list works too):
  DatasetXXX_Name/dataset.json     channel_names {"0": "CT"}, labels {"background": 0, ...},
                                   numTraining, file_ending ".nii.gz"
  DatasetXXX_Name/imagesTr/CASE_0000.nii.gz,  labelsTr/CASE.nii.gz   (imagesTs/ optional)

`preprocess(raw, out_dir)` does what nnU-Net's 2-D configuration does before training, once, in
its order. First its fingerprint, over every case:
  - each case cropped to the bounding box of its nonzero voxels (holes filled); label 0 outside
    that region becomes -1 (nnU-Net's crop_to_nonzero), which the loss treats as background;
  - foreground intensities sampled (up to 10000 per case, seeded) for CT's statistics, and the
    size left by cropping (for use_mask_for_norm);
  - the slicing axis: the canonical axis of largest median spacing (nnU-Net's transpose_forward;
    axial for CT and most MR), and the target spacing: the median in-plane spacing of the
    training cases (slices keep their own). Volumes are then read in that layout (`voxel_layout`).
Then each case (prepare_case), written as (Z, X, Y, C) float32 images (C input channels:
CASE_0000, CASE_0001, ... files) and (Z, X, Y) int16 labels, .npy (one slice is contiguous;
read memory-mapped):
  - cropped again, and each channel normalised by its name, as nnU-Net's: CT: clip to the
    foreground 0.5 / 99.5 percentiles, then the foreground mean and std (CTNormalization); noNorm,
    rescale_to_0_1 and rgb_to_0_1 as named; any other name: z-score per case, over the nonzero
    region only (and 0 outside it) when cropping shrank the median case below 3/4 of its size
    (nnU-Net's use_mask_for_norm, e.g. skull-stripped brain MRI), else over the case;
  - resampled in-plane to the target spacing: the image by cubic spline clipped to the slice's
    range, or to the volume's when it is not anisotropic (skimage's resize, as nnU-Net calls it
    in its two cases), the labels as nnU-Net's
    resize_segmentation (order 1 per label value, the largest wins; computed from each pixel's
    four neighbours);
  - up to 1000 sampled voxel positions per foreground class and case, for oversampling.
`SliceSampler` draws training patches: a case, a slice, a patch (the last round(B·p) of
each batch centred on a foreground voxel of a random present class, like nnU-Net's
oversample_foreground_percent), with nnU-Net-style 2-D augmentation when asked.
Folds are nnU-Net's: KFold(5, shuffle, random_state=12345) over the sorted case ids, or the
dataset's own splits_final.json.
Region-based datasets (nnU-Net's: labels such as {"whole tumor": [1, 2, 3], "tumor core": [2, 3]}
with "regions_class_order", as KiTS23) are predicted and scored per region (`targets`).
"""
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
import threading

import numpy as np

from mfjax.config import DataError
from mfjax.data import volumes

log = logging.getLogger("mfjax")
# np.load parses a .npy header with ast.literal_eval, which CPython 3.11.7 can fail from several threads
# at once ("SystemError: AST constructor recursion depth mismatch"): the sampler's threads open files one at a time.
_NPY_OPEN = threading.Lock()

DATASET_JSON = "dataset.json"
PLANS_JSON = "plans.json"
SPLITS_JSON = "splits_final.json"
FG_SAMPLES_PER_CASE = 10000
LOCATIONS_PER_CLASS = 1000
NONZERO_LABEL = -1  # nnU-Net's label of background voxels outside the nonzero region
# What the preprocessed arrays mean; a folder written by another version is refused, not misread.
# 2: cropped to the nonzero region, labels int16 with NONZERO_LABEL; 3: images stored normalised (nnU-Net's
# order: normalise, then resample), labels resampled as nnU-Net's resize_segmentation; 4: that resampling as
# batchgenerators 0.25.5 does it (the largest resampled label mask wins, not the last to reach 0.5); 5: the
# foreground intensities behind the CT statistics drawn as nnU-Net does (10000 a case, with replacement).
PREPROCESSING_VERSION = 5
ANISOTROPY_THRESHOLD = 3  # nnU-Net's: above it a volume is resampled slice by slice
MASK_FOR_NORM_BELOW = 0.75  # nnU-Net: z-score within the nonzero region when cropping leaves less
# nnU-Net's normalization by channel name (casefolded); any other name (MRI, T2, ADC, ...): z-score.
NORMALIZATIONS = {"ct": "CTNormalization", "nonorm": "NoNormalization", "zscore": "ZScoreNormalization",
                  "rescale_to_0_1": "RescaleTo01Normalization", "rgb_to_0_1": "RGBTo01Normalization"}


# dataset.json keys of nnU-Net v1 and v2 (those mfjax reads, and the descriptive ones it does not).
DATASET_JSON_KEYS = {"channel_names", "modality", "labels", "regions_class_order", "numTraining", "numTest",
                     "file_ending", "dataset", "training", "test", "overwrite_image_reader_writer", "name",
                     "description", "reference", "licence", "license", "release", "tensorImageSize", "converted_by",
                     "relabel", "citation", "author"}


class DatasetError(DataError):
  pass


@dataclasses.dataclass
class RawDataset:
  root: str
  name: str
  modality: str                      # the first channel's name, e.g. "CT" or "MRI"
  labels: dict[int, str]             # label value -> name, background 0 included ("label N" in a region dataset)
  cases: dict[str, tuple[str, str]]  # case id -> (image path of channel 0, label path)
  file_ending: str
  regions: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # name -> label values
  regions_class_order: tuple[int, ...] = ()  # the label value each region's prediction is written as
  ignore_label: int | None = None   # nnU-Net's "ignore": unannotated voxels, left out of loss and scores
  channels: tuple[str, ...] = ()    # every input channel's name, in order ("T2", "ADC"; one for CT)
  channel_files: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # case -> a path per channel

  @property
  def num_classes(self) -> int:
    return max(self.labels) + 1


def read_raw(root: str) -> RawDataset:
  """The training cases of an nnU-Net raw dataset folder, with every file checked to exist."""
  root = os.path.abspath(os.path.expanduser(str(root)))
  path = os.path.join(root, DATASET_JSON)
  if not os.path.exists(path):
    raise DatasetError(f"{path} not found: {root} is not an nnU-Net raw dataset folder")
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(meta, dict):
    raise DatasetError(f"{path}: must hold a JSON object ({{\"channel_names\": ..., \"labels\": ...}}), "
                       f"not a {type(meta).__name__}")
  unknown = sorted(set(meta) - DATASET_JSON_KEYS)
  if unknown:  # a misspelt optional key ("region_class_order") would otherwise be ignored without a word
    log.warning("%s: key(s) %s are not nnU-Net's (a typo?); they are ignored", path, unknown)
  names = _channel_names(meta, path)
  modality = names[0]
  labels, regions, order, ignore = _parse_labels(meta.get("labels"), meta.get("regions_class_order"), path)
  file_ending = meta.get("file_ending", ".nii.gz")
  if file_ending not in volumes.NIFTI_ENDINGS:
    raise DatasetError(f"{path}: file_ending {file_ending!r} is not supported; mfjax reads NIfTI "
                       f"({', '.join(volumes.NIFTI_ENDINGS)})")
  in_root = lambda p: os.path.normpath(p if os.path.isabs(p) else os.path.join(root, p))
  if "dataset" in meta:  # nnU-Net v2's explicit lists: {case: {"images": [a file per channel], "label": file}}
    cases, channel_files = {}, {}
    if not isinstance(meta["dataset"], dict):
      raise DatasetError(f"{path}: 'dataset' must map each case to {{\"images\": [...], \"label\": ...}}")
    for case, item in meta["dataset"].items():
      if not isinstance(item, dict) or not isinstance(item.get("images"), list) or "label" not in item:
        raise DatasetError(f"{path}: dataset[{case!r}] must be {{\"images\": [...], \"label\": ...}}")
      if len(item["images"]) != len(names):
        raise DatasetError(f"{path}: dataset[{case!r}] lists {len(item['images'])} image(s) for {len(names)} channels")
      channel_files[case] = tuple(in_root(p) for p in item["images"])
      cases[case] = (channel_files[case][0], in_root(item["label"]))
  elif "training" in meta:
    # v1: explicit pairs. The Decathlon's files are the listed ones (one 4-D image holds every channel);
    # an nnU-Net v1 Task's are CASE_0000.nii.gz ... beside the listed CASE.nii.gz.
    cases, channel_files = {}, {}
    if not isinstance(meta["training"], list):
      raise DatasetError(f"{path}: 'training' must be a list of {{\"image\": ..., \"label\": ...}}")
    for i, item in enumerate(meta["training"]):
      if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(item.get("label"), str):
        raise DatasetError(f"{path}: training[{i}] must be {{\"image\": file, \"label\": file}}, not {item!r}")
      image, label = (in_root(item[k]) for k in ("image", "label"))
      case = volumes.strip_ending(os.path.basename(image))
      stem = os.path.join(os.path.dirname(image), case)
      if not os.path.exists(image) and os.path.exists(f"{stem}_0000{file_ending}"):
        channel_files[case] = tuple(f"{stem}_{k:04d}{file_ending}" for k in range(len(names)))
      elif len(names) > 1:
        raise DatasetError(f"{path}: an MSD (v1) dataset with {len(names)} channels stores them in one 4-D image; "
                           "convert it to nnU-Net v2's layout first (nnUNetv2_convert_MSD_dataset)")
      else:
        channel_files[case] = (image,)
      cases[case] = (channel_files[case][0], label)
  else:
    images_dir = os.path.join(root, "imagesTr")
    if not os.path.isdir(images_dir):
      raise DatasetError(f"{images_dir} not found")
    suffix = "_0000" + file_ending
    ids = [f[: -len(suffix)] for f in sorted(os.listdir(images_dir)) if f.endswith(suffix)]
    cases = {case: (os.path.join(images_dir, case + suffix), os.path.join(root, "labelsTr", case + file_ending))
             for case in ids}
    channel_files = {case: tuple(os.path.join(images_dir, f"{case}_{k:04d}{file_ending}") for k in range(len(names)))
                     for case in ids}
  missing = [p for case, (_, label) in cases.items() for p in (*channel_files[case], label) if not os.path.exists(p)]
  if missing:
    raise DatasetError(f"{root}: {len(missing)} file(s) listed or implied are missing: {', '.join(missing[:10])}")
  if not cases:
    raise DatasetError(f"{root}: no training cases (expected imagesTr/CASE_0000{file_ending})")
  expected = meta.get("numTraining")
  if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
    raise DatasetError(f"{path}: numTraining must be a whole number, not {expected!r}")
  if expected is not None and expected != len(cases):
    raise DatasetError(f"{path}: numTraining is {expected} but {len(cases)} training cases were found")
  name = meta.get("name") or os.path.basename(root)
  return RawDataset(root, str(name), modality, labels, dict(sorted(cases.items())), file_ending, regions, order,
                    ignore, names, channel_files)


def _channel_names(meta: dict, path: str) -> tuple[str, ...]:
  """Every input channel's name, in order, from a dataset.json's channel_names (v2) or modality (v1)."""
  channels = meta.get("channel_names", meta.get("modality"))
  if not isinstance(channels, dict) or not channels:
    raise DatasetError(f"{path}: needs 'channel_names' (nnU-Net v2) or 'modality' (v1), e.g. {{\"0\": \"CT\"}}")
  if {str(k) for k in channels} != {str(k) for k in range(len(channels))}:
    raise DatasetError(f"{path}: channel keys {sorted(channels)} must be \"0\", \"1\", ... in order")
  return tuple(str(channels[k]) for k in sorted(channels, key=int))


def _parse_labels(labels, regions_class_order, path):
  """(label value -> name, region name -> label values, regions_class_order, ignore label or None)
  of dataset.json.

  nnU-Net v2 region-based labels ({"background": 0, "whole tumor": [1, 2, 3], "enhancing": 3})
  are detected by any list value; they need "regions_class_order", one label value per region.
  nnU-Net v2's "ignore" label (sparse annotation) must be one integer, above every other value."""
  if not isinstance(labels, dict) or not labels:
    raise DatasetError(f"{path}: needs a 'labels' mapping, e.g. {{\"background\": 0, \"liver\": 1}}")
  labels = dict(labels)
  ignore = labels.pop("ignore", None)
  if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int)):
    raise DatasetError(f"{path}: the 'ignore' label must be one integer label value, not {ignore!r}")
  # nnU-Net's LabelManager: a list of one value is that value; only longer lists are regions.
  labels = {k: v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v for k, v in labels.items()}
  region_based = any(isinstance(v, (list, tuple)) for v in labels.values())
  parsed = _parse_regions(labels, regions_class_order, path) if region_based else _parse_plain_labels(labels, path)
  highest = max(parsed[0])
  if ignore is not None and not region_based and ignore != highest + 1:
    raise DatasetError(f"{path}: the 'ignore' label is {ignore}; nnU-Net needs it right after the highest "
                       f"label value {highest} (label values are consecutive), i.e. {highest + 1}")
  if ignore is not None and ignore <= highest:
    raise DatasetError(f"{path}: the 'ignore' label {ignore} must be above every other label value "
                       f"(the highest is {highest})")
  return (*parsed, ignore)


def _parse_plain_labels(labels, path):
  out = {}
  for key, value in labels.items():
    # v2 maps name -> id (nnU-Net takes int() of it, so "1" too); v1 id -> name.
    v2 = isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit() and not key.strip().isdigit())
    name, ident = (key, value) if v2 else (value, key)
    try:
      out[int(ident)] = str(name)
    except ValueError as e:
      raise DatasetError(f"{path}: label {key!r}: {value!r} is not a class id") from e
  if 0 not in out:
    raise DatasetError(f"{path}: labels must include background as 0; got {labels}")
  if sorted(out) != list(range(len(out))):
    raise DatasetError(f"{path}: label values {sorted(out)} are not consecutive from 0 (nnU-Net requires it)")
  return dict(sorted(out.items())), {}, ()


def _parse_regions(labels, regions_class_order, path):
  if labels.get("background") != 0:
    raise DatasetError(f"{path}: labels must include background as 0; got {labels}")
  regions = {}
  for name, value in labels.items():
    if name == "background":
      continue
    ids = value if isinstance(value, (list, tuple)) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
      raise DatasetError(f"{path}: region {name!r}: {value!r} is not a list of positive label values")
    regions[str(name)] = tuple(ids)
  if not isinstance(regions_class_order, (list, tuple)) or len(regions_class_order) != len(regions) or not all(
      isinstance(i, int) and i > 0 for i in regions_class_order):
    raise DatasetError(f"{path}: region-based labels {list(regions)} need 'regions_class_order', one positive "
                       f"label value per region (nnU-Net's); got {regions_class_order!r}")
  values = sorted({i for ids in regions.values() for i in ids} | set(regions_class_order))
  return {0: "background", **{v: f"label {v}" for v in values}}, regions, tuple(regions_class_order)


# ----------------------------------------------------------- plans of a model trained by nnU-Net

# nnU-Net's readers of NIfTI, and whether they reorient to RAS+ before making the (z, y, x) array.
NNUNET_READERS = {"SimpleITKIO": False, "NibabelIO": False, "NibabelIOWithReorient": True}
# The resampling mfjax reproduces: nnU-Net's default for images (cubic in-plane) and for the
# logits it resizes back to the input's grid (linear).
NNUNET_RESAMPLING = {"resampling_fn_data": ("resample_data_or_seg_to_shape", 3),
                     "resampling_fn_probabilities": ("resample_data_or_seg_to_shape", 1)}


def nnunet_configuration(plans: dict, name: str, path: str) -> dict:
  """plans["configurations"][name] with what it `inherits_from` filled in (nnU-Net's PlansManager)."""
  configurations = plans.get("configurations")
  if not isinstance(configurations, dict) or name not in configurations:
    raise DatasetError(f"{path}: no configuration {name!r} (it has {sorted(configurations or {})})")
  config, seen = dict(configurations[name]), [name]
  while "inherits_from" in config:
    parent = config.pop("inherits_from")
    if parent in seen or parent not in configurations:
      raise DatasetError(f"{path}: configuration {seen[-1]!r} inherits from {parent!r}, "
                         + ("a cycle" if parent in seen else "which is not in the plans"))
    seen.append(parent)
    config = {**configurations[parent], **config}
  return config


def plans_from_nnunet(plans: dict, dataset: dict, configuration: str, plans_path: str, dataset_path: str) -> dict:
  """mfjax's plans (what `prediction_slices` and `predict_folder` read) for a 2-D configuration of
  an nnU-Net plans.json and its dataset.json: the same normalisation and foreground intensities,
  target spacing, labels, and the voxel layout its reader and transpose_forward gave the network.
  Anything mfjax would do differently (a 3-D configuration, another reader or resampling) is an
  error naming the field."""
  config = nnunet_configuration(plans, configuration, plans_path)
  patch = config.get("patch_size")
  if not isinstance(patch, list) or len(patch) != 2:
    raise DatasetError(f"{plans_path}: configuration {configuration!r} has patch_size {patch}: mfjax predicts with "
                       "2-D configurations (a 2-D patch, e.g. nnU-Net's '2d')")
  reader = plans.get("image_reader_writer", "SimpleITKIO")
  if reader not in NNUNET_READERS:
    raise DatasetError(f"{plans_path}: image_reader_writer {reader!r}: mfjax reads NIfTI as "
                       f"{', '.join(NNUNET_READERS)} do")
  for field, (function, order) in NNUNET_RESAMPLING.items():
    kwargs = config.get(field + "_kwargs", {})
    if (config.get(field, function), kwargs.get("order", order), kwargs.get("order_z", 0),
        kwargs.get("force_separate_z")) != (function, order, 0, None):
      raise DatasetError(f"{plans_path}: {configuration}.{field} is {config.get(field)} {kwargs}; mfjax resamples as "
                         f"nnU-Net's default ({function}, order {order}, order_z 0, force_separate_z None)")
  names = list(_channel_names(dataset, dataset_path))
  schemes = list(config.get("normalization_schemes", []))
  unknown = [s for s in schemes if s not in NORMALIZATIONS.values()]
  if len(schemes) != len(names) or unknown:
    raise DatasetError(f"{plans_path}: {configuration}.normalization_schemes {schemes}: expected one of "
                       f"{sorted(NORMALIZATIONS.values())} per channel ({len(names)})")
  properties = plans.get("foreground_intensity_properties_per_channel", {})
  missing = [str(c) for c in range(len(names)) if str(c) not in properties]
  if missing:
    raise DatasetError(f"{plans_path}: foreground_intensity_properties_per_channel lacks channel(s) {missing}")
  wanted = ("mean", "std", "percentile_00_5", "percentile_99_5")
  lacking = {c: [k for k in wanted if k not in properties[str(c)]] for c in range(len(names))}
  if any(lacking.values()):
    raise DatasetError(f"{plans_path}: foreground_intensity_properties_per_channel lacks "
                       + "; ".join(f"channel {c}: {', '.join(ks)}" for c, ks in lacking.items() if ks))
  transpose = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
  if sorted(transpose) != [0, 1, 2]:
    raise DatasetError(f"{plans_path}: transpose_forward {transpose} is not a permutation of the three axes")
  spacing = [float(v) for v in config.get("spacing", [])][-2:]
  if len(spacing) != 2 or min(spacing) <= 0:
    raise DatasetError(f"{plans_path}: configuration {configuration!r} has spacing {config.get('spacing')}")
  labels, regions, order, ignore = _parse_labels(dataset.get("labels"), dataset.get("regions_class_order"),
                                                 dataset_path)
  return {"name": plans.get("dataset_name", os.path.basename(os.path.dirname(plans_path))), "modality": names[0],
          "channel_names": names, "normalization": schemes, "labels": {str(k): v for k, v in labels.items()},
          "target_spacing_xy": spacing,
          **({"regions": [[k, list(v)] for k, v in regions.items()], "regions_class_order": list(order)}
             if regions else {}),
          **({"ignore_label": ignore} if ignore is not None else {}),
          "intensity": [{k: float(properties[str(c)][k]) for k in wanted} for c in range(len(names))],
          "use_mask_for_norm": [bool(v) for v in config.get("use_mask_for_norm", [False] * len(names))],
          "reader": reader, "voxel_order": "canonical" if NNUNET_READERS[reader] else "file",
          "transpose_forward": transpose,
          "patch_size": [int(p) for p in patch], "cases": {}}


# ------------------------------------------------------------------------------- folds


def kfold_splits(case_ids, folds: int = 5, seed: int = 12345) -> list[dict]:
  """nnU-Net's default split: sklearn KFold(folds, shuffle=True, random_state=seed) on sorted ids."""
  keys = np.sort(np.asarray(list(case_ids)))
  if len(keys) < folds:
    raise DatasetError(f"{len(keys)} cases cannot be split into {folds} folds")
  order = np.arange(len(keys))
  np.random.RandomState(seed).shuffle(order)
  sizes = np.full(folds, len(keys) // folds)
  sizes[: len(keys) % folds] += 1
  splits, start = [], 0
  for size in sizes:
    val = np.sort(order[start:start + size])
    train = np.setdiff1d(np.arange(len(keys)), val)
    splits.append({"train": keys[train].tolist(), "val": keys[val].tolist()})
    start += size
  return splits


def split_file(raw: RawDataset) -> tuple[str | None, list | None]:
  """(path, folds) of the dataset's splits_final.json: the raw folder's, else nnU-Net's own place,
  $nnUNet_preprocessed/<dataset folder>/; (None, None) without one (nnU-Net's KFold then)."""
  places = [os.path.join(raw.root, SPLITS_JSON)]
  if os.environ.get("nnUNet_preprocessed"):
    places.append(os.path.join(os.environ["nnUNet_preprocessed"], os.path.basename(raw.root), SPLITS_JSON))
  found = []
  for path in places:
    if os.path.exists(path):
      try:
        with open(path) as f:
          found.append((path, json.load(f)))
      except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable splits file ({e})") from None
  if not found:
    log.info("%s: no %s in %s; nnU-Net's 5-fold split (KFold, seed 12345)", raw.root, SPLITS_JSON,
             " or ".join(places))
    return None, None
  for path, folds in found:
    if not isinstance(folds, list) or not all(
        isinstance(fold, dict) and all(isinstance(fold.get(k), list) for k in ("train", "val")) for fold in folds):
      raise DatasetError(f"{path}: must be a list of folds, each {{\"train\": [case, ...], \"val\": [case, ...]}}")
  if len(found) > 1 and found[0][1] != found[1][1]:
    log.warning("%s and %s differ; using the first", found[0][0], found[1][0])
  log.info("folds from %s", found[0][0])
  return found[0]


def fold_cases(raw: RawDataset, fold: int | str) -> tuple[list[str], list[str]]:
  """(train ids, validation ids) of `fold` (0..4, or "all": train on everything, no validation)."""
  if fold == "all":
    return list(raw.cases), []
  splits_path, splits = split_file(raw)
  if splits is None:
    splits = kfold_splits(raw.cases)
  try:
    fold = int(fold)
  except ValueError:
    raise DatasetError(f"data.fold={fold!r}: a fold number 0..{len(splits) - 1} or 'all'") from None
  if not 0 <= fold < len(splits):
    raise DatasetError(f"fold {fold} does not exist: valid 0..{len(splits) - 1} or 'all'")
  unknown = sorted(set(splits[fold]["train"] + splits[fold]["val"]) - set(raw.cases))
  if unknown:
    raise DatasetError(f"{splits_path}: fold {fold} names cases that are not in the dataset: {unknown[:10]}")
  return list(splits[fold]["train"]), list(splits[fold]["val"])


# ------------------------------------------------------------------------------- preprocess


def resample_inplane(volume: np.ndarray, shape_xy: tuple[int, int], clip_per_slice: bool = True) -> np.ndarray:
  """(X, Y, Z) image -> (X', Y', Z), slice by slice, as nnU-Net resamples data (skimage's resize:
  cubic spline, edge mode, no anti-aliasing, clipped to the input's range). nnU-Net clips each
  slice to its own range when it resamples an anisotropic volume slice by slice, and the whole
  volume to its range otherwise (`clip_per_slice` False; slices keep their z, so the 3-D spline
  gives each slice what the 2-D one does)."""
  from scipy import ndimage
  if tuple(volume.shape[:2]) == tuple(shape_xy):
    return volume
  zoom = (shape_xy[0] / volume.shape[0], shape_xy[1] / volume.shape[1])
  out = np.empty((*shape_xy, volume.shape[2]), volume.dtype)
  for k in range(volume.shape[2]):
    plane = volume[:, :, k]
    resampled = ndimage.zoom(plane, zoom, order=3, mode="nearest", grid_mode=True)
    out[:, :, k] = np.clip(resampled, plane.min(), plane.max()) if clip_per_slice else resampled
  return out if clip_per_slice else np.clip(out, volume.min(), volume.max())


def resamples_slice_by_slice(spacing, target_spacing_xy) -> bool:
  """nnU-Net's get_do_separate_z: a volume whose largest spacing is over 3x its smallest, before or
  after resampling, is resampled slice by slice (mfjax keeps each case's slices, as nnU-Net's 2-D
  configuration does)."""
  anisotropic = lambda s: max(s) / min(s) > ANISOTROPY_THRESHOLD
  return anisotropic(list(spacing)) or anisotropic([*target_spacing_xy, spacing[2]])


def resample_labels_inplane(labels: np.ndarray, shape_xy: tuple[int, int]) -> np.ndarray:
  """(X, Y, Z) labels -> (X', Y', Z), as nnU-Net's resize_segmentation with its default order 1
  (batchgenerators 0.25.5): each label value's mask resampled linearly (skimage's resize: edge
  mode, no anti-aliasing), and each pixel takes the value of the largest; a tie goes to the
  nearest-neighbour value if it is among the tied, else to the smallest. Computed at once from
  each output pixel's four bilinear neighbours: where they agree that is the label, elsewhere each
  neighbour value's summed weight is its score."""
  from scipy import ndimage
  if tuple(labels.shape[:2]) == tuple(shape_xy):
    return labels
  (x0, x1, wx), (y0, y1, wy) = _linear_taps(labels.shape[0], shape_xy[0]), _linear_taps(labels.shape[1], shape_xy[1])
  rows0, rows1 = labels[x0], labels[x1]
  corners = [rows0[:, y0], rows0[:, y1], rows1[:, y0], rows1[:, y1]]
  out = corners[0].copy()
  mixed = np.nonzero((corners[0] != corners[1]) | (corners[0] != corners[2]) | (corners[0] != corners[3]))
  if mixed[0].size:
    fx, fy = wx[mixed[0]], wy[mixed[1]]
    weights = [(1 - fx) * (1 - fy), (1 - fx) * fy, fx * (1 - fy), fx * fy]
    values = [corner[mixed] for corner in corners]
    score = lambda label: sum(np.where(value == label, w, 0.0) for value, w in zip(values, weights))
    scores = [score(value) for value in values]
    top = np.maximum.reduce(scores)
    lowest_top = np.minimum.reduce([np.where(s == top, value, np.iinfo(labels.dtype).max)
                                    for s, value in zip(scores, values)])
    zoom = (shape_xy[0] / labels.shape[0], shape_xy[1] / labels.shape[1], 1.0)
    nearest = ndimage.zoom(labels, zoom[:labels.ndim], order=0, mode="nearest", grid_mode=True)[mixed]
    out[mixed] = np.where(score(nearest) == top, nearest, lowest_top)
  return out


def _linear_taps(n_in: int, n_out: int):
  """(lower index, upper index, upper weight) of each of `n_out` points resampled linearly from
  `n_in`, as scipy's zoom with grid_mode=True and mode "nearest" (skimage's resize) places them."""
  x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
  lower = np.minimum(np.floor(x).astype(np.intp), max(n_in - 2, 0))
  return lower, np.minimum(lower + 1, n_in - 1), x - lower


def target_shape(shape_xy, spacing_xy, target_spacing_xy) -> tuple[int, int]:
  return tuple(int(round(s * sp / t)) for s, sp, t in zip(shape_xy, spacing_xy, target_spacing_xy))


def axial_slices(volume: np.ndarray, spacing, target_spacing_xy, labels: bool = False) -> np.ndarray:
  """(X, Y, Z[, C]) at `spacing` -> (Z, X', Y'[, C]) resampled in-plane to `target_spacing_xy`
  (resample_inplane, or resample_labels_inplane for `labels`), one contiguous slice after another
  (along the volume's last axis: Z, or the slicing axis its `voxel_layout` put last)."""
  if volume.ndim == 4:
    return np.stack([axial_slices(volume[..., c], spacing, target_spacing_xy, labels)
                     for c in range(volume.shape[3])], axis=-1)
  shape_xy = target_shape(volume.shape[:2], spacing[:2], target_spacing_xy)
  resampled = (resample_labels_inplane(volume, shape_xy) if labels else
               resample_inplane(volume, shape_xy, resamples_slice_by_slice(spacing, target_spacing_xy)))
  return np.ascontiguousarray(resampled.transpose(2, 0, 1))


def crop_to_nonzero(image: np.ndarray, labels: np.ndarray | None = None):
  """nnU-Net's crop_to_nonzero: (image, labels, bbox) cropped to the bounding box [[lo, hi]] * 3 of
  the voxels nonzero in any channel of the (X, Y, Z[, C]) image, holes filled (the whole volume
  when it is all zero). The returned int16 labels hold NONZERO_LABEL where the label was 0 outside
  that region (without `labels`: 0 inside, NONZERO_LABEL outside)."""
  from scipy import ndimage
  nonzero = image != 0
  mask = ndimage.binary_fill_holes(nonzero.any(axis=-1) if image.ndim == 4 else nonzero)
  if not mask.any():
    mask[...] = True
  bbox = [[int(where.min()), int(where.max()) + 1] for where in (np.flatnonzero(mask.any(axis=tuple(
      a for a in range(3) if a != axis))) for axis in range(3))]
  crop = tuple(slice(lo, hi) for lo, hi in bbox)
  mask = mask[crop]
  if labels is None:
    return image[crop], np.where(mask, 0, NONZERO_LABEL).astype(np.int16), bbox
  labels = labels[crop].astype(np.int16)
  labels[(labels == 0) & ~mask] = NONZERO_LABEL
  return image[crop], labels, bbox


def uncrop(cropped: np.ndarray, bbox, shape) -> np.ndarray:
  """`cropped` placed at `bbox` (crop_to_nonzero's) in zeros of `shape`: a prediction on the
  original grid, background outside the cropped region."""
  out = np.zeros(shape, cropped.dtype)
  out[tuple(slice(lo, hi) for lo, hi in bbox)] = cropped
  return out


def normalization_of(channel_name: str) -> str:
  return NORMALIZATIONS.get(str(channel_name).casefold(), "ZScoreNormalization")


def check_intensities(image: np.ndarray, channel_name: str, path: str):
  """nnU-Net's rgb_to_0_1 takes 8-bit values; anything else in such a channel is an error naming the file."""
  if normalization_of(channel_name) == "RGBTo01Normalization" and (image.min() < 0 or image.max() > 255):
    raise DatasetError(f"{path}: channel {channel_name!r} (nnU-Net's RGBTo01Normalization) needs values in 0..255, "
                       f"found [{image.min():g}, {image.max():g}]")


def slice_axis_of(spacing) -> int:
  """The canonical axis mfjax's own runs slice along, from the median (X, Y, Z) spacing of the
  training cases: the one of largest spacing, as nnU-Net's transpose_forward picks it, with ties
  (isotropic data) going to Z, then Y. nnU-Net takes the median and the first maximum over the
  file's own axes (k, j, i); the two agree when the files are stored with their slices along k,
  as CT and most MR are (an isotropic volume stored, say, coronal-first is sliced coronally by
  nnU-Net and axially here)."""
  spacing = [float(v) for v in spacing]
  return max((2, 1, 0), key=lambda axis: (spacing[axis], axis))


def voxel_layout(plans: dict) -> tuple[bool, tuple[int, int, int] | None]:
  """How the volumes of `plans` are laid out: (canonical, axes). mfjax's own runs read every volume
  in canonical RAS+ order and slice it along its `slice_axis` (`slice_axis_of`; plans without one:
  Z, the axial slices): (True, None) for Z, else axes putting that axis last with the other two in
  their order (e.g. (1, 2, 0): sagittal slices of (Y, Z)). A network imported from
  nnU-Net saw the slices its reader and `transpose_forward` made: the file's own voxel order
  (SimpleITKIO, NibabelIO; canonical for NibabelIOWithReorient) as a (z, y, x) array, transposed,
  sliced along the first axis. `axes` makes (rows, columns, slices) of that from the (i, j, k)
  order read here."""
  if "transpose_forward" not in plans:
    axis = int(plans.get("slice_axis", 2))
    return True, None if axis == 2 else (*(a for a in range(3) if a != axis), axis)
  t = [int(a) for a in plans["transpose_forward"]]
  return plans.get("voxel_order") != "file", (2 - t[1], 2 - t[2], 2 - t[0])


def reader_of(plans: dict, requested: str | None = None) -> str:
  """The nnU-Net reader whose array order and properties a prediction's probabilities are saved in:
  an imported run's own (`requested` must agree); for mfjax's runs `requested`, by default
  SimpleITKIO (nnU-Net's default): the reader of the nnU-Net model they are to be ensembled with."""
  if requested is not None and requested not in NNUNET_READERS:
    raise DatasetError(f"reader {requested!r}: saved probabilities follow one of {', '.join(NNUNET_READERS)}")
  if "transpose_forward" not in plans:
    return requested or "SimpleITKIO"
  reader = plans.get("reader")
  if reader is None and "imported_from" in plans:  # imported before the plans named it
    try:
      with open(os.path.join(plans["imported_from"]["folder"], "plans.json")) as f:
        reader = json.load(f).get("image_reader_writer", "SimpleITKIO")
    except (OSError, json.JSONDecodeError):
      pass
  reader = reader or ("NibabelIOWithReorient" if plans.get("voxel_order") != "file" else "SimpleITKIO")
  if requested is not None and requested != reader:
    raise DatasetError(f"reader {requested!r}: the run was imported from an nnU-Net model that reads with {reader}, "
                       "and its probabilities follow that")
  return reader


def file_order(volume: np.ndarray, image_path: str, layout) -> np.ndarray:
  """An (X, Y, Z, ...) array on the grid of `image_path` read in `layout` (`read_channels`) in the
  file's own voxel order (i, j, k, ...): the slicing axis put back, and mfjax's canonical order undone."""
  import nibabel as nib
  canonical, axes = layout
  rest = tuple(range(3, volume.ndim))
  if axes is not None:
    volume = volume.transpose(*np.argsort(axes), *rest)
  if canonical:
    ornt = nib.orientations.io_orientation(volumes.file_affine(image_path))
    volume = nib.orientations.apply_orientation(volume, nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), ornt))
  return volume


def reader_array(volume: np.ndarray, image_path: str, layout, reader: str) -> np.ndarray:
  """An (X, Y, Z, ...) array on the grid of `image_path` read in `layout` (`read_channels`) as
  nnU-Net's `reader` holds it: the (k, j, i, ...) array of the file's voxel order (SimpleITKIO,
  NibabelIO) or of its closest canonical one (NibabelIOWithReorient)."""
  canonical, axes = layout
  rest = tuple(range(3, volume.ndim))
  if not NNUNET_READERS[reader]:
    volume = file_order(volume, image_path, layout)
  elif not canonical:
    raise ValueError(f"{reader} reads canonical voxel order, but the layout is file order")
  elif axes is not None:
    volume = volume.transpose(*np.argsort(axes), *rest)
  return volume.transpose(2, 1, 0, *rest)


def reader_properties(image_path: str, reader: str) -> dict:
  """What nnU-Net's `reader`.read_images gives for the geometry of `image_path` (its export writes
  with them): SimpleITK's spacing, origin and direction, or nibabel's affines; and 'spacing' in
  the order of its array."""
  import nibabel as nib
  if reader == "SimpleITKIO":
    try:
      import SimpleITK as sitk
    except ImportError as e:
      raise DatasetError("saving probabilities as nnU-Net's SimpleITKIO does needs SimpleITK "
                         "(pip install SimpleITK; nnU-Net installs it)") from e
    info = sitk.ImageFileReader()
    info.SetFileName(str(image_path))
    info.ReadImageInformation()
    spacing = info.GetSpacing()
    return {"sitk_stuff": {"spacing": spacing, "origin": info.GetOrigin(), "direction": info.GetDirection()},
            "spacing": [abs(float(s)) for s in spacing[::-1]]}
  image = nib.load(str(image_path))
  stuff = {"original_affine": image.affine}
  if NNUNET_READERS[reader]:
    image = image.as_reoriented(nib.orientations.io_orientation(image.affine))
    stuff["reoriented_affine"] = image.affine
  return {"nibabel_stuff": stuff, "spacing": [float(z) for z in image.header.get_zooms()[:3][::-1]]}


def read_channels(paths, channel_names, layout=(True, None)) -> tuple[np.ndarray, np.ndarray]:
  """(X, Y, Z, C) float32 of a case's channel files (one per channel, on one grid), spacing of the
  first; in `layout` (`voxel_layout`)."""
  canonical, axes = layout
  arrays, spacings = [], []
  for path, name in zip(paths, channel_names):
    image, spacing = volumes.read_volume(path, canonical)
    if axes is not None:
      image, spacing = image.transpose(axes), spacing[list(axes)]
    check_intensities(image, name, path)
    if arrays and image.shape != arrays[0].shape:
      raise DatasetError(f"{path}: shape {image.shape} differs from channel 0's {arrays[0].shape} ({paths[0]})")
    arrays.append(image)
    spacings.append(spacing)
  return np.stack(arrays, axis=-1), spacings[0]


def read_labels_in(path: str, layout) -> np.ndarray:
  """A label map read as `read_channels` reads its image in an mfjax run's canonical `layout`."""
  canonical, axes = layout
  labels, _ = volumes.read_labels(path)
  if not canonical:
    raise ValueError("mfjax's own runs read their label maps in canonical order")
  return labels if axes is None else labels.transpose(axes)


def intensity_stats(image: np.ndarray, labels: np.ndarray) -> list[dict]:
  """Per channel of a cropped (..., C) case: mean, std, min and max, and mean and std over its
  nonzero region (labels >= 0)."""
  inside = labels >= 0
  out = []
  for c in range(image.shape[-1]):
    channel = image[..., c]
    within = channel[inside]
    out.append({"mean": float(channel.mean()), "std": float(channel.std()), "min": float(channel.min()),
                "max": float(channel.max()), "mean_nonzero": float(within.mean()) if within.size else 0.0,
                "std_nonzero": float(within.std()) if within.size else 1.0})
  return out


def channel_names(plans: dict) -> list[str]:
  return list(plans.get("channel_names") or [plans["modality"]])


def prediction_slices(image: np.ndarray, spacing, plans: dict):
  """A new (X, Y, Z[, C]) volume (read_channels checked its intensities) prepared as its training
  cases were (prepare_case): (normalised (Z, X', Y', C) slices, bbox of crop_to_nonzero, the
  cropped in-plane shape the predicted labels return to)."""
  slices, _, bbox = prepare_case(image[..., None] if image.ndim == 3 else image, None, spacing, plans)
  return slices, bbox, tuple(hi - lo for lo, hi in bbox[:2])


def prepare_case(image: np.ndarray, labels: np.ndarray | None, spacing, plans: dict):
  """nnU-Net's preprocessing of one (X, Y, Z, C) case, in its order: crop to the nonzero region,
  normalise each channel (`plans`' normalization, intensity and use_mask_for_norm; per-case
  statistics from the cropped volume), resample in-plane to plans' target_spacing_xy. Returns
  ((Z, X', Y', C) float32 slices, (Z, X', Y') int16 labels, -1 outside the nonzero region, bbox)."""
  image, labels, bbox = crop_to_nonzero(image, labels)
  image = normalize(image, plans, intensity_stats(image, labels), labels)
  return (axial_slices(image, spacing, plans["target_spacing_xy"]),
          axial_slices(labels, spacing, plans["target_spacing_xy"], labels=True), bbox)


def verify_geometry(raw: RawDataset, tolerance_mm: float = 1e-3) -> list[str]:
  """One line per training case whose label map's grid (shape, spacing, orientation) is not its
  image's, read from the headers alone, every case at once. A label map whose origin alone differs
  is taken voxel for voxel, with a warning, as nnU-Net's dataset integrity check does (LiTS has such
  headers); voxels are paired in canonical order, so only the grid's placement is ignored."""
  problems, shifted = [], []
  for case, (_, label_path) in raw.cases.items():
    label_shape, label_affine = volumes.canonical_geometry(label_path)
    for image_path in raw.channel_files[case]:
      kind, message = _grid_problem(image_path, label_path, label_shape, label_affine, tolerance_mm)
      (problems if kind == "error" else shifted if kind == "origin" else []).append(message)
  if shifted:
    log.warning("%d label map(s) lie on their image's grid but at another origin; taken voxel for voxel, as "
                "nnU-Net does (check an overlay):\n  %s", len(shifted), "\n  ".join(shifted[:10]))
  return problems


def _grid_problem(image_path, label_path, label_shape, label_affine, tolerance_mm):
  image_shape, image_affine = volumes.canonical_geometry(image_path)
  if image_shape != label_shape:
    return "error", f"{label_path}: shape {label_shape} differs from its image's {image_shape} ({image_path})"
  if not np.allclose(image_affine[:3, :3], label_affine[:3, :3], atol=tolerance_mm):
    worst = float(np.abs(image_affine[:3, :3] - label_affine[:3, :3]).max())
    return "error", (f"{label_path}: its voxel spacing or orientation differs from its image's by up to "
                     f"{worst:.4g} ({image_path})")
  if not np.allclose(image_affine[:3, 3], label_affine[:3, 3], atol=tolerance_mm):
    offset = float(np.abs(image_affine[:3, 3] - label_affine[:3, 3]).max())
    if _file_axes(label_path) != _file_axes(image_path):  # a flipped or permuted file: pairing would mirror it
      return "error", (f"{label_path}: stored in another axis order or direction than its image ({image_path}) "
                       f"and {offset:.4g} mm off its grid")
    return "origin", f"{label_path}: origin {offset:.4g} mm from its image's ({image_path})"
  return None, None


def _file_axes(path: str) -> list:
  """The file's axis codes (which world axis, which direction each voxel axis runs)."""
  import nibabel as nib
  return nib.orientations.io_orientation(volumes.file_affine(path)).tolist()


def _fingerprint(raw: RawDataset) -> dict:
  return {case: [os.path.getsize(p) for p in (*raw.channel_files[case], label)]
          for case, (_, label) in raw.cases.items()}


def foreground_sample(foreground: np.ndarray, index: int) -> np.ndarray:
  """FG_SAMPLES_PER_CASE rows of a case's (n, C) foreground intensities, drawn with replacement as
  nnU-Net draws them (a case with little foreground weighs as much as any other), seeded by the
  case's index. Drawn from the sorted rows: the same voxels in another order (a volume stored
  transposed) give the same sample."""
  if not len(foreground):
    return np.zeros((0, foreground.shape[-1]), np.float32)
  ordered = foreground[np.lexsort(foreground.T[::-1])]
  rng = np.random.default_rng([12345, index])
  return ordered[rng.choice(len(ordered), FG_SAMPLES_PER_CASE, replace=True)]


def preprocess(raw: RawDataset, out_dir: str, spacing_xy=None, progress: bool = True) -> dict:
  """Write the preprocessed cases and plans.json to `out_dir` (reused when up to date); the plans.

  `spacing_xy`: the in-plane target spacing (mm); None: the median of the training cases'. A
  finer one than the data's upsamples, as MedDINOv3's 2d_896 configuration does."""
  out_dir = os.path.abspath(os.path.expanduser(str(out_dir)))
  os.makedirs(out_dir, exist_ok=True)
  plans_path = os.path.join(out_dir, PLANS_JSON)
  fingerprint = {"files": _fingerprint(raw), "spacing_xy": None if spacing_xy is None else list(map(float, spacing_xy)),
                 **({"regions": [[k, list(v)] for k, v in raw.regions.items()]} if raw.regions else {}),
                 **({"ignore_label": raw.ignore_label} if raw.ignore_label is not None else {}),
                 "preprocessing": PREPROCESSING_VERSION}
  if os.path.exists(plans_path):
    with open(plans_path) as f:
      plans = json.load(f)
    if plans.get("fingerprint") == fingerprint and plans.get("dataset_root") == raw.root:
      edited = [f"{what} {old} -> {new}" for what, old, new in (
          ("channel_names", plans.get("channel_names"), list(raw.channels)),
          ("labels", plans.get("labels"), {str(k): v for k, v in raw.labels.items()}),
          ("regions_class_order", plans.get("regions_class_order"),
           list(raw.regions_class_order) if raw.regions else None))
          if old != new and (old is not None or what == "regions_class_order")]  # older plans may lack a key
      if edited:  # channel names choose the normalisation; label names name the results
        raise DatasetError(f"{out_dir} was preprocessed before {raw.root}/dataset.json changed ({'; '.join(edited)}); "
                           "delete it or choose a new preprocessed folder to preprocess again")
      return plans
    raise DatasetError(f"{out_dir} holds preprocessed data of another dataset, an older version of it or an "
                       "older mfjax's preprocessing; choose a new preprocessed folder or delete it")

  problems = verify_geometry(raw)
  if problems:
    raise DatasetError(f"{raw.root}: {len(problems)} case(s) whose label map does not lie on its image's voxel "
                       "grid (nothing was preprocessed):\n  " + "\n  ".join(problems[:20])
                       + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
  spacings = np.stack([volumes.read_spacing(image) for image, _ in raw.cases.values()])
  slice_axis = slice_axis_of(np.median(spacings, axis=0))
  layout = voxel_layout({"slice_axis": slice_axis})
  in_plane = [a for a in range(3) if a != slice_axis]
  target_xy = (np.median(spacings[:, in_plane], axis=0) if spacing_xy is None
               else np.asarray(spacing_xy, np.float64))
  from tqdm.auto import tqdm
  # 1. nnU-Net's fingerprint: each case cropped, its foreground intensities sampled, its size kept.
  cases, fg_values, keys, reused = {}, [], {}, 0
  for i, (case, (image_path, label_path)) in enumerate(tqdm(raw.cases.items(), desc=f"fingerprint {raw.name}",
                                                           unit="case", disable=not progress)):
    # A case finished by an earlier, interrupted run (same files, options and position) is kept.
    keys[case] = {"image": image_path, "label": label_path, "sizes": fingerprint["files"][case], "index": i,
                  "regions": fingerprint.get("regions"), "ignore_label": raw.ignore_label,
                  "preprocessing": PREPROCESSING_VERSION, "slice_axis": slice_axis}
    done_path = os.path.join(out_dir, case + FINGERPRINT_DONE_SUFFIX)
    done = _read_json_or_none(done_path)
    if done is not None and done.get("key") == keys[case]:
      cases[case] = done["case"]
      fg_values.append(np.load(os.path.join(out_dir, case + "_fg.npy")))
      reused += 1
      continue
    image, labels, spacing = _read_case(raw, case, layout)
    shape_before_cropping = list(image.shape[:3])
    image, labels, bbox = crop_to_nonzero(image, labels)
    # nnU-Net's fingerprint counts ignored voxels as foreground too
    fg_values.append(foreground_sample(image[labels > 0], i))
    cases[case] = {"image": image_path, "label": label_path, "spacing": spacing.tolist(),
                   "shape_before_cropping": shape_before_cropping, "bbox": bbox,  # (X, Y, Z) of the volume
                   "relative_size_after_cropping": float(np.prod([hi - lo for lo, hi in bbox]) /
                                                         np.prod(shape_before_cropping))}
    np.save(os.path.join(out_dir, case + "_fg.npy"), fg_values[-1])
    _write_json_atomically(done_path, {"key": keys[case], "case": cases[case]})  # last: the case is complete
  fg = np.concatenate(fg_values)
  if not fg.size:
    raise DatasetError(f"{raw.root}: no training case has any foreground voxel")
  relative_size = float(np.median([c["relative_size_after_cropping"] for c in cases.values()]))
  normalization = [normalization_of(name) for name in raw.channels]
  plans = {"dataset_root": raw.root, "name": raw.name, "modality": raw.modality, "channel_names": list(raw.channels),
           "normalization": normalization,
           "labels": {str(k): v for k, v in raw.labels.items()}, "target_spacing_xy": target_xy.tolist(),
           "slice_axis": slice_axis,
           **({"regions": [[k, list(v)] for k, v in raw.regions.items()],
               "regions_class_order": list(raw.regions_class_order)} if raw.regions else {}),
           **({"ignore_label": raw.ignore_label} if raw.ignore_label is not None else {}),
           "intensity": [{"mean": float(v.mean()), "std": float(v.std()),
                          "percentile_00_5": float(np.percentile(v, 0.5)),
                          "percentile_99_5": float(np.percentile(v, 99.5))} for v in fg.T],
           "median_relative_size_after_cropping": relative_size,
           "use_mask_for_norm": [scheme == "ZScoreNormalization" and relative_size < MASK_FOR_NORM_BELOW
                                 for scheme in normalization],
           "cases": cases, "fingerprint": fingerprint}

  # 2. Each case cropped, normalised and resampled (prepare_case), as nnU-Net's preprocessor does.
  recipe = {k: plans[k] for k in ("target_spacing_xy", "normalization", "intensity", "use_mask_for_norm")}
  for i, case in enumerate(tqdm(raw.cases, desc=f"preprocess {raw.name}", unit="case", disable=not progress)):
    done_path = os.path.join(out_dir, case + CASE_DONE_SUFFIX)
    done_key = {**keys[case], **recipe}
    done = _read_json_or_none(done_path)
    if done is not None and done.get("key") == done_key:
      cases[case].update(done["case"])
      reused += 1
      continue
    image, labels, spacing = _read_case(raw, case, layout)
    image, labels, _ = prepare_case(image, labels, spacing, plans)
    np.save(os.path.join(out_dir, case + ".npy"), image)
    np.save(os.path.join(out_dir, case + "_seg.npy"), labels)
    np.save(os.path.join(out_dir, case + "_locations.npy"),
            _class_locations(labels, np.random.default_rng([12345, i, 1]), list(raw.regions.values()),
                             raw.ignore_label))
    cases[case]["shape"] = list(labels.shape)  # of the (Z, X, Y) arrays
    _write_json_atomically(done_path, {"key": done_key, "case": {"shape": cases[case]["shape"]}})
  if reused:
    log.info("preprocess %s: %d of %d steps (fingerprint and arrays per case) were already done by an interrupted "
             "run and are reused", raw.name, reused, 2 * len(raw.cases))
  _write_json_atomically(plans_path, plans)  # plans.json last: its presence means every case is written
  return plans


def _read_case(raw: RawDataset, case: str, layout=(True, None)):
  """(X, Y, Z, C) image, (X, Y, Z) labels (checked against dataset.json's) and spacing of a
  training case, in `layout` (`voxel_layout`)."""
  label_path = raw.cases[case][1]
  image, spacing = read_channels(raw.channel_files[case], raw.channels, layout)
  labels = read_labels_in(label_path, layout)  # on its image's grid: verify_geometry checked the headers
  unknown = sorted(set(np.unique(labels).tolist()) - set(raw.labels) - {raw.ignore_label})
  if unknown:
    raise DatasetError(f"{label_path}: label values {unknown} are not in dataset.json's labels {raw.labels}"
                       + (f" or its ignore label {raw.ignore_label}" if raw.ignore_label is not None else ""))
  return image, labels, spacing


FINGERPRINT_DONE_SUFFIX = "_fingerprint.json"  # written last for each case's fingerprint
CASE_DONE_SUFFIX = "_case.json"  # written last for each preprocessed case


def _write_json_atomically(path: str, data: dict):
  with open(path + ".tmp", "w") as f:
    json.dump(data, f, indent=1)
  os.replace(path + ".tmp", path)


def _read_json_or_none(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


ANNOTATED = -1  # the "class" of _class_locations' rows that sample annotated voxels (ignore label)


def _class_locations(labels: np.ndarray, rng, regions=(), ignore_label: int | None = None) -> np.ndarray:
  """(N, 4) int32 rows (class, z, x, y) of (Z, X, Y) labels: up to LOCATIONS_PER_CLASS sampled
  voxels per present class; with `regions` (lists of label values), per present region, whose
  "class" is its position + 1 (nnU-Net samples regions' foreground so). With an `ignore_label`,
  also rows of class ANNOTATED: voxels of any label but it, background included (nnU-Net centres
  its non-foreground patches there, so that sparse annotations are not mostly missed)."""
  rows = []
  masks = (((i + 1, np.isin(labels, ids)) for i, ids in enumerate(regions)) if regions
           else ((c, labels == c) for c in np.unique(labels) if c > 0 and c != ignore_label))  # one at a time
  if ignore_label is not None:
    masks = itertools.chain(masks, [(ANNOTATED, labels != ignore_label)])
  for c, mask in masks:
    if not mask.any():
      continue
    where = _sample_voxels(mask, rng)
    rows.append(np.column_stack([np.full(len(where), c), where]))
  return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def _sample_voxels(mask: np.ndarray, rng) -> np.ndarray:
  """(n, ndim) coordinates of up to LOCATIONS_PER_CLASS distinct voxels of `mask`, in index order.
  A dense mask (the annotated voxels of a CT) is sampled by drawing voxels and keeping those in
  it: an index list of all of them would take gigabytes."""
  count = int(np.count_nonzero(mask))
  n = min(LOCATIONS_PER_CLASS, count)
  if count * 8 < mask.size:
    picked = np.flatnonzero(mask)[rng.choice(count, n, replace=False)]
  else:
    flat, picked = mask.reshape(-1), np.zeros(0, np.int64)
    while len(picked) < n:
      draw = rng.integers(0, mask.size, 4 * n)
      picked = np.unique(np.concatenate([picked, draw[flat[draw]]]))
    picked = rng.choice(picked, n, replace=False)
  return np.column_stack(np.unravel_index(np.sort(picked), mask.shape))


def targets(plans: dict) -> dict[int, tuple[int, ...]]:
  """What the network predicts and what is scored, {output channel: label values}: each foreground
  class alone (channel = class id, background is channel 0), or each region (channel = position + 1
  here; the network has no background channel then)."""
  if plans.get("regions"):
    return {i + 1: tuple(ids) for i, (_, ids) in enumerate(plans["regions"])}
  return {int(c): (int(c),) for c in plans["labels"] if int(c)}


def target_names(plans: dict) -> dict[int, str]:
  if plans.get("regions"):
    return {i + 1: name for i, (name, _) in enumerate(plans["regions"])}
  return {int(c): name for c, name in plans["labels"].items() if int(c)}


def num_outputs(plans: dict) -> int:
  """The network's output channels: the classes with background, or one per region."""
  return len(plans["regions"]) if plans.get("regions") else len(plans["labels"])


def _per_channel(value, n: int) -> list:
  """A plans field per channel (plans written before channels were lists hold one value)."""
  return list(value) if isinstance(value, list) else [value] * n


def normalize(image: np.ndarray, plans: dict, case_intensity: list, labels: np.ndarray | None = None) -> np.ndarray:
  """(..., C) float32: each channel by nnU-Net's normalization of its name (normalization_of): CT:
  clip to the foreground 0.5 / 99.5 percentiles, then (x - mean) / std; noNorm: as is;
  rescale_to_0_1: the case's min..max to 0..1; rgb_to_0_1: / 255; anything else: z-score with the
  case's own statistics (`case_intensity`, intensity_stats), with plans' use_mask_for_norm over its
  nonzero region (`labels` >= 0) and 0 outside it."""
  names = channel_names(plans)
  schemes = _per_channel(plans.get("normalization") or [normalization_of(n) for n in names], len(names))
  dataset = _per_channel(plans["intensity"], len(names))
  use_mask = _per_channel(plans.get("use_mask_for_norm", False), len(names))
  out = np.empty(image.shape, np.float32)
  for c, scheme in enumerate(schemes):
    out[..., c] = _normalize_channel(image[..., c], scheme, dataset[c], case_intensity[c], use_mask[c], labels)
  return out


def _normalize_channel(image, scheme: str, dataset: dict, case: dict, use_mask: bool, labels):
  if scheme == "CTNormalization":
    image = np.clip(image, dataset["percentile_00_5"], dataset["percentile_99_5"])
    return (image - dataset["mean"]) / max(dataset["std"], 1e-8)
  if scheme == "NoNormalization":
    return image
  if scheme == "RescaleTo01Normalization":
    return (image - case["min"]) / max(case["max"] - case["min"], 1e-8)
  if scheme == "RGBTo01Normalization":
    return np.asarray(image, np.float32) / np.float32(255.0)
  if use_mask:
    if labels is None:
      raise ValueError("normalize: use_mask_for_norm needs the labels that mark the nonzero region")
    return np.where(labels >= 0, (image - case["mean_nonzero"]) / max(case["std_nonzero"], 1e-8), 0.0)
  return (image - case["mean"]) / max(case["std"], 1e-8)


# ------------------------------------------------------------------------------- sampling


class SliceSampler:
  """Training patches (image (H, W, C) float32 normalised, label (H, W) int32) from preprocessed cases.

  Sample `index` of step `step` depends only on (seed, step, index): a resumed run draws the same
  patches, each process draws only its own rows of the global batch, and `workers` threads cut
  them in parallel with the same result (SciPy's resampling releases the GIL: a 512-px patch
  takes about 17 ms of one core).
  """

  def __init__(self, out_dir: str, plans: dict, case_ids, patch: tuple[int, int], batch_size: int,
               foreground_fraction: float = 0.33, augment: bool = True, seed: int = 0, workers: int = 0):
    self.out_dir, self.plans, self.cases = out_dir, plans, list(case_ids)
    if not self.cases:
      raise DatasetError("no training cases to sample from")
    self.patch, self.batch_size, self.augment, self.seed = tuple(patch), batch_size, augment, seed
    self.num_foreground = int(round(batch_size * foreground_fraction))
    self._locations = {}
    self._pool = concurrent.futures.ThreadPoolExecutor(workers) if workers else None

  def arrays(self, case: str):
    """(image, labels, locations, foreground classes in locations, rows of annotated voxels) of a case.

    The volumes are memory-mapped anew on every call and released with the sample: a map keeps a
    file handle open, and cached maps of every case drawn ran past the usual limit of 1024 open
    files after some 330 cases. The small location tables are kept in memory."""
    def load(suffix, **kw):
      with _NPY_OPEN:
        return np.load(os.path.join(self.out_dir, case + suffix), **kw)

    if case not in self._locations:
      locations = load("_locations.npy")
      classes = np.unique(locations[:, 0])
      self._locations[case] = (locations, classes[classes > 0], locations[locations[:, 0] == ANNOTATED])
    return (load(".npy", mmap_mode="r"), load("_seg.npy", mmap_mode="r"), *self._locations[case])

  def sample(self, step: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, step, index])
    case = self.cases[rng.integers(len(self.cases))]
    image, labels, locations, foreground, annotated = self.arrays(case)
    if index >= self.batch_size - self.num_foreground and len(foreground):
      rows = locations[locations[:, 0] == foreground[rng.integers(len(foreground))]]
      _, z, cx, cy = rows[rng.integers(len(rows))]
      center = self._center_on(cx, cy)
    elif len(annotated):  # with an ignore label: any annotated voxel, as nnU-Net does
      _, z, cx, cy = annotated[rng.integers(len(annotated))]
      center = self._center_on(cx, cy)
    else:
      z = rng.integers(image.shape[0])
      # the patch's lower corner anywhere it overlaps the slice, padding where the slice is small
      lo = np.minimum(0, np.array(image.shape[1:3]) - self.patch)
      hi = np.maximum(0, np.array(image.shape[1:3]) - self.patch)
      center = np.array([rng.integers(l, h + 1) for l, h in zip(lo, hi)]) + np.array(self.patch) / 2
    return augment_patch(np.asarray(image[z]), np.asarray(labels[z]), center, self.patch, rng, self.augment,
                         _per_channel(self.plans.get("use_mask_for_norm", False), image.shape[-1]))

  def _center_on(self, cx, cy) -> np.ndarray:
    """The center of the patch whose lower corner is voxel - patch // 2, as nnU-Net cuts it: the
    patch stays on the voxel grid (an even patch centred on the voxel would fall between voxels)."""
    patch = np.array(self.patch)
    return np.array([cx, cy], np.float64) - patch // 2 + patch / 2

  def batch(self, step: int, rows: range | None = None) -> dict:
    """Rows `rows` (default all) of the global batch of `step`."""
    rows = range(self.batch_size) if rows is None else rows
    cut = lambda i: self.sample(step, i)
    samples = list(self._pool.map(cut, rows) if self._pool else map(cut, rows))
    return {"image": np.stack([s[0] for s in samples]), "label": np.stack([s[1] for s in samples])}


def augment_patch(image, labels, center, patch, rng, augment: bool, mask_outside=False):
  """Cut a `patch` around `center` of one (H, W, C) slice, with nnU-Net v2's default 2-D
  augmentation when asked, in its order: rotation (p 0.2, any angle; 15 degrees at most when one side of
  the patch is over 1.5 times the other) and scaling (p 0.2, 0.7-1.4, sampling that much wider)
  in one resampling (image linear, labels nearest; outside the slice image 0, labels -1 as nnU-Net
  pads them), Gaussian noise (p 0.1), blur (p 0.2, then each channel p 0.5, sigma 0.5-1 per axis),
  brightness (p 0.15), contrast (p 0.15), low resolution (p 0.25, then each channel p 0.5: nearest
  down to 0.5-1x, linear back up), gamma (inverted p 0.1, then p 0.3) and mirroring per axis
  (p 0.5). Each channel draws its own factors, as nnU-Net's (unsynchronised) transforms do, and
  multipliers and gammas are drawn as its BGContrast. Then the channels `mask_outside` names (a
  flag per channel, or one for all: use_mask_for_norm) are 0 where the labels are negative, and
  negative labels become background. Not done: elastic deformation (off in nnU-Net's defaults)."""
  from scipy import ndimage
  image = image[..., None] if image.ndim == 2 else image
  patch = np.asarray(patch)
  offsets = np.stack(np.meshgrid(*(np.arange(p) - (p - 1) / 2 for p in patch), indexing="ij"), axis=0)
  if augment:
    # nnU-Net turns an elongated 2-D patch (longest side over 1.5x the shortest) by 15 degrees at most
    max_angle = np.pi / 12 if max(patch) / min(patch) > 1.5 else np.pi
    angle = rng.uniform(-max_angle, max_angle) if rng.random() < 0.2 else 0.0
    scale = rng.uniform(0.7, 1.4) if rng.random() < 0.2 else 1.0  # as nnU-Net: above 1, objects shrink
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    offsets = np.einsum("ij,jhw->ihw", rot, offsets)
  coords = offsets + (np.asarray(center, np.float64) - 0.5)[:, None, None]
  image = np.stack([ndimage.map_coordinates(image[..., c], coords, order=1, mode="constant", cval=0.0)
                    for c in range(image.shape[-1])], axis=-1).astype(np.float32)
  labels = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=NONZERO_LABEL).astype(np.int32)
  if augment:
    image = _augment_intensities(image, rng)
    for axis in (0, 1):
      if rng.random() < 0.5:
        image, labels = np.flip(image, axis), np.flip(labels, axis)
  masked = np.asarray(_per_channel(mask_outside, image.shape[-1]), bool)
  image = np.where((labels < 0)[..., None] & masked, np.float32(0), image)
  return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(np.maximum(labels, 0))


def _bg_contrast(rng, lo: float, hi: float) -> float:
  """batchgenerators' BGContrast: below 1 or above it with even odds, then uniform on that side."""
  return rng.uniform(lo, 1.0) if rng.random() < 0.5 and lo < 1 else rng.uniform(max(lo, 1.0), hi)


def _augment_intensities(image, rng):
  """nnU-Net v2's intensity transforms on an (H, W, C) patch (see augment_patch)."""
  from scipy import ndimage
  image = np.array(image, np.float32)
  channels = range(image.shape[-1])
  if rng.random() < 0.1:  # one variance for all channels (synchronize_channels=True)
    # batchgenerators calls it a variance but draws with it as the standard deviation, as done here
    image += rng.normal(0.0, rng.uniform(0, 0.1), image.shape).astype(np.float32)
  if rng.random() < 0.2:
    for c in channels:
      if rng.random() < 0.5:  # torch's reflect padding is scipy's "mirror"; the kernel about 6 sigma wide
        image[..., c] = ndimage.gaussian_filter(image[..., c], rng.uniform(0.5, 1.0, size=2), mode="mirror",
                                                truncate=3.0)
  if rng.random() < 0.15:
    for c in channels:
      image[..., c] *= np.float32(_bg_contrast(rng, 0.75, 1.25))
  if rng.random() < 0.15:
    for c in channels:
      x = image[..., c]
      mean, lo, hi = x.mean(), x.min(), x.max()
      image[..., c] = np.clip((x - mean) * np.float32(_bg_contrast(rng, 0.75, 1.25)) + mean, lo, hi)
  if rng.random() < 0.25:
    for c in channels:
      if rng.random() < 0.5:
        image[..., c] = _simulate_low_resolution(image[..., c], rng.uniform(0.5, 1.0))
  for invert, p in ((True, 0.1), (False, 0.3)):
    if rng.random() < p:
      for c in channels:
        x, gamma = image[..., c], _bg_contrast(rng, 0.7, 1.5)
        image[..., c] = -_gamma(-x, gamma) if invert else _gamma(x, gamma)
  return image


def _simulate_low_resolution(image, scale: float):
  """torch's interpolate down to round(scale x shape) with 'nearest-exact', then back up 'bilinear'
  (align_corners False), as batchgenerators' SimulateLowResolutionTransform."""
  from scipy import ndimage
  shape = np.array(image.shape)
  small = np.maximum(np.round(shape * scale).astype(int), 1)
  rows, cols = (np.minimum(np.floor((np.arange(n) + 0.5) * (s / n)).astype(int), s - 1) for n, s in zip(small, shape))
  down = image[rows][:, cols]
  up = np.meshgrid(*(np.maximum((np.arange(s) + 0.5) * (n / s) - 0.5, 0.0) for n, s in zip(small, shape)),
                   indexing="ij")
  return ndimage.map_coordinates(down, up, order=1, mode="nearest").astype(np.float32)


def _gamma(image, gamma):
  """batchgenerators' gamma: on the [0, 1]-scaled patch, mean and std restored afterwards."""
  mean, std, lo = image.mean(), image.std(), image.min()
  span = image.max() - lo
  out = ((image - lo) / (span + 1e-7)) ** gamma * span + lo
  return ((out - out.mean()) / (out.std() + 1e-8) * std + mean).astype(np.float32)

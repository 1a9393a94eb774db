"""Segmentation evaluation as nnU-Net does it: sliding-window 2-D inference stitched into volumes,
and per-case, per-class 3-D Dice.

Sliding window (nnU-Net's predict_sliding_window_return_logits, per axial slice): slices smaller
than the patch are padded with zeros around them (pad_nd_image: the odd pixel after); tiles start
at nnU-Net's `compute_steps_for_sliding_window` positions (step 0.5 of the patch); each tile's
logits are weighted by a Gaussian (sigma = patch / 8, peak normalised to 1) and the sum is divided
by the summed weights; with `mirror`, logits are averaged over the flips of each tile (every
combination of the mirroring axes, nnU-Net's inference_allowed_mirroring_axes: both in-plane axes
with `True`). The logits are resampled (linearly) to the original slice size and the argmax is
the prediction.

Dice (MedDINOv3's compute_metrics): per case and foreground class, 2|P∩G| / (|P| + |G|); a class
absent from the case's ground truth is skipped for that case. Mean over cases per class, then
over classes. HD95 and NSD as MONAI computes them (MedDINOv3 reports them with MONAI's
`compute_hausdorff_distance(percentile=95)` and `compute_surface_dice` at 1 mm): surfaces are
the voxels a 6-neighbour erosion removes, distances are Euclidean in mm between the two surfaces;
HD95 is the larger of the two directed 95th percentiles, NSD the share of both surfaces within
the tolerance of the other. As in MONAI, a class the prediction misses has NSD 0 but HD95 NaN,
so it drops out of the mean HD95: `summarize` counts those cases ("hd95_missed").
"""
import itertools
import warnings
from typing import Callable

import numpy as np


def window_starts(size: int, patch: int, step: float = 0.5) -> list[int]:
  """nnU-Net's tile positions along one axis of length `size` >= `patch`."""
  if size <= patch:
    return [0]
  num = int(np.ceil((size - patch) / (patch * step))) + 1
  actual = (size - patch) / (num - 1)
  return [int(np.round(actual * i)) for i in range(num)]


def gaussian_weights(patch: tuple[int, int], sigma_scale: float = 1 / 8) -> np.ndarray:
  from scipy import ndimage
  impulse = np.zeros(patch, np.float32)
  impulse[tuple(p // 2 for p in patch)] = 1
  weights = ndimage.gaussian_filter(impulse, [p * sigma_scale for p in patch], mode="constant", cval=0)
  weights = weights / weights.max()
  weights[weights == 0] = weights[weights > 0].min()
  return weights.astype(np.float32)


def mirror_flips(mirror) -> list[tuple[int, ...]]:
  """The flips (axes of a (B, H, W, C) batch) whose logits are averaged: none, and every combination
  of the mirroring axes (0: rows, 1: columns; `True` is both, `False` none), as nnU-Net's
  _internal_maybe_mirror_and_predict."""
  axes = (0, 1) if mirror is True else tuple(mirror) if mirror else ()
  if any(a not in (0, 1) for a in axes):
    raise ValueError(f"mirroring axes {axes}: a 2-D slice has axes 0 and 1")
  return [()] + [tuple(a + 1 for a in combo) for n in range(1, len(axes) + 1)
                 for combo in itertools.combinations(axes, n)]


def weighted_tile_logits(logits_of: Callable, images, weights, mirror):
  """The flip-averaged logits of a batch of tiles times the Gaussian `weights` (H, W), in JAX: what
  `predict_slices` does per tile, for a jitted predictor that runs it on the device (one call
  and one transfer per batch instead of one per flip, and no per-tile work on the host)."""
  import jax.numpy as jnp
  flips = mirror_flips(mirror)
  total = 0
  for axes in flips:
    total = total + (jnp.flip(logits_of(jnp.flip(images, axes)), axes) if axes else logits_of(images))
  return total / len(flips) * weights[None, :, :, None]


def predict_slices(predict_logits: Callable, slices: np.ndarray, patch: tuple[int, int], num_classes: int,
                   batch_size: int = 8, step: float = 0.5, mirror=False, weighted: bool = False) -> np.ndarray:
  """(Z, X, Y[, channels]) normalised slices -> (Z, C, X, Y) float32 logits.

  `predict_logits(images (B, H, W, channels) float32) -> (B, H, W, C)`; B is always `batch_size` (the
  last batch is padded), so a jitted function compiles once. With `weighted`, it returns the
  tiles' flip-averaged, Gaussian-weighted logits itself (`weighted_tile_logits`), and `mirror`
  is its business."""
  slices = slices[..., None] if slices.ndim == 3 else slices
  z, sx, sy, channels = slices.shape
  px, py = patch
  (ax, bx), (ay, by) = [(d // 2, d - d // 2) for d in (max(px - sx, 0), max(py - sy, 0))]
  padded = np.pad(slices, ((0, 0), (ax, bx), (ay, by), (0, 0)))
  weights = gaussian_weights(patch)
  tiles = [(k, i, j) for k in range(z) for i in window_starts(padded.shape[1], px, step)
           for j in window_starts(padded.shape[2], py, step)]
  logits = np.zeros((z, padded.shape[1], padded.shape[2], num_classes), np.float32)
  norm = np.zeros(padded.shape[:3], np.float32)
  flips = [()] if weighted else mirror_flips(mirror)
  for start in range(0, len(tiles), batch_size):
    chunk = tiles[start:start + batch_size]
    batch = np.zeros((batch_size, px, py, channels), np.float32)
    for n, (k, i, j) in enumerate(chunk):
      batch[n] = padded[k, i:i + px, j:j + py]
    out = 0
    for axes in flips:
      flipped = np.flip(batch, axes) if axes else batch
      pred = np.asarray(predict_logits(flipped), np.float32)
      out = out + (np.flip(pred, axes) if axes else pred)
    if not weighted:
      out = out / len(flips) * weights[None, ..., None]
    for n, (k, i, j) in enumerate(chunk):
      logits[k, i:i + px, j:j + py] += out[n]
      norm[k, i:i + px, j:j + py] += weights
  logits = logits / norm[..., None]
  return logits[:, ax:ax + sx, ay:ay + sy].transpose(0, 3, 1, 2)


def logits_at_shape(logits: np.ndarray, shape_xy: tuple[int, int]) -> np.ndarray:
  """(Z, C, X', Y') logits resampled slice by slice to (Z, C, *shape_xy), linearly, as nnU-Net's
  resampling_fn_probabilities resizes them back to the input's grid."""
  from scipy import ndimage
  zoom = (shape_xy[0] / logits.shape[2], shape_xy[1] / logits.shape[3])
  if zoom == (1.0, 1.0):
    return logits
  return np.stack([ndimage.zoom(s, (1.0, *zoom), order=1, mode="nearest", grid_mode=True) for s in logits])


def labels_of_logits(logits: np.ndarray, regions_class_order=()) -> np.ndarray:
  """(Z, C, X, Y) logits -> (X, Y, Z) uint8 labels: the argmax, or, for region logits, nnU-Net's
  conversion: each region whose sigmoid exceeds 0.5 is written as its `regions_class_order`
  value, later regions over earlier ones."""
  if not regions_class_order:
    return logits.argmax(1).astype(np.uint8).transpose(1, 2, 0)
  labels = np.zeros((logits.shape[0], *logits.shape[2:]), np.uint8)
  for c, value in enumerate(regions_class_order):
    labels[logits[:, c] > 0] = value
  return labels.transpose(1, 2, 0)


def probabilities_of_logits(logits: np.ndarray, regions: bool) -> np.ndarray:
  """(Z, C, X, Y) logits -> float32 probabilities: softmax over the classes, or each region's
  sigmoid (nnU-Net's inference nonlinearity)."""
  from scipy import special
  logits = logits.astype(np.float32, copy=False)
  return special.expit(logits) if regions else special.softmax(logits, axis=1)


def labels_at_shape(logits: np.ndarray, shape_xy: tuple[int, int], regions_class_order=()) -> np.ndarray:
  """(Z, C, X', Y') logits -> (X, Y, Z) uint8 labels after resampling each slice to `shape_xy`
  (`logits_at_shape`, `labels_of_logits`)."""
  return labels_of_logits(logits_at_shape(logits, shape_xy), regions_class_order)


def labels_in_chunks(logits_of: Callable, slices: np.ndarray, shape_xy: tuple[int, int], regions_class_order=(),
                     chunk: int = 8, probabilities: np.ndarray | None = None) -> np.ndarray:
  """(X, Y, Z) uint8 labels of (Z, X', Y') slices, `chunk` slices at a time: `logits_of(slices)`
  gives their (z, C, X', Y') logits (`predict_slices`, or several runs' mean). Slices are
  predicted independently, so the labels equal the whole volume's at once; only one chunk's
  logits are held (a whole CT's would be Z·C·X'·Y' floats: 8 GiB for 500 slices of 512² and
  16 classes). `probabilities`: an (X, Y, Z, C) float32 array to fill with the softmax (or the
  regions' sigmoids) of the resampled logits, for nnU-Net's --save_probabilities."""
  z = slices.shape[0]
  out = np.empty((*shape_xy, z), np.uint8)
  for start in range(0, z, chunk):
    logits = logits_at_shape(logits_of(slices[start:start + chunk]), shape_xy)
    out[:, :, start:start + chunk] = labels_of_logits(logits, regions_class_order)
    if probabilities is not None:
      probabilities[:, :, start:start + chunk] = probabilities_of_logits(
          logits, bool(regions_class_order)).transpose(2, 3, 0, 1)
  return out


def _targets(classes) -> dict[int, tuple[int, ...]]:
  """{key: label values}: a list of classes is {c: (c,)}; a dict (regions, `nnunet.targets`) as it is."""
  if isinstance(classes, dict):
    return {int(k): tuple(v) for k, v in classes.items()}
  return {int(c): (int(c),) for c in classes}


def _mask(labels: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
  return labels == values[0] if len(values) == 1 else np.isin(labels, values)


def _scored(prediction: np.ndarray, truth: np.ndarray, ignore_label: int | None) -> np.ndarray:
  """`prediction` with what it says at voxels `truth` labels `ignore_label` taken out (set to
  background), as nnU-Net's evaluation leaves them out of TP, FP and FN."""
  if ignore_label is None:
    return prediction
  return np.where(truth == ignore_label, 0, prediction)


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, classes, ignore_label: int | None = None
                   ) -> dict[int, float]:
  """{class: Dice} of one case; NaN where the class is absent from `truth`. `classes`: class ids,
  or {key: label values} for regions (a region is the union of its values). Voxels of `truth`
  labelled `ignore_label` are not scored."""
  prediction = _scored(prediction, truth, ignore_label)
  out = {}
  for c, values in _targets(classes).items():
    p, t = _mask(prediction, values), _mask(truth, values)
    n_true = int(t.sum())
    out[c] = float("nan") if n_true == 0 else 2.0 * float((p & t).sum()) / (float(p.sum()) + n_true)
  return out


def surface_distances(prediction: np.ndarray, truth: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
  """(distances from each predicted surface voxel to the true surface, and the reverse), in the
  units of `spacing`, for two boolean volumes; computed on their joint bounding box (+1 voxel)."""
  from scipy import ndimage
  both = prediction | truth
  if not both.any():
    return np.zeros(0), np.zeros(0)
  box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(both))
  pred, true = prediction[box], truth[box]
  pred_surface = pred ^ ndimage.binary_erosion(pred)
  true_surface = true ^ ndimage.binary_erosion(true)

  def to(surface_from, surface_to):
    if not surface_to.any():
      return np.full(int(surface_from.sum()), np.inf)
    return ndimage.distance_transform_edt(~surface_to, sampling=spacing)[surface_from]
  return to(pred_surface, true_surface), to(true_surface, pred_surface)


def surface_metrics(prediction: np.ndarray, truth: np.ndarray, classes, spacing, tolerance: float = 1.0,
                    ignore_label: int | None = None) -> dict:
  """{"hd95": {class: mm}, "nsd": {class: share}} of one case; NaN where the class is absent from
  `truth` (as Dice), and HD95 NaN where the prediction lacks it (MONAI's result). The prediction
  at voxels of `truth` labelled `ignore_label` is left out, as in dice_per_class."""
  prediction = _scored(prediction, truth, ignore_label)
  out = {"hd95": {}, "nsd": {}}
  for c, values in _targets(classes).items():
    p, t = _mask(prediction, values), _mask(truth, values)
    if not t.any():
      out["hd95"][c] = out["nsd"][c] = float("nan")
      continue
    to_true, to_pred = surface_distances(p, t, spacing)
    out["hd95"][c] = float("nan") if not p.any() else float(max(np.percentile(to_true, 95),
                                                                np.percentile(to_pred, 95)))
    within = int((to_true <= tolerance).sum() + (to_pred <= tolerance).sum())
    out["nsd"][c] = within / (len(to_true) + len(to_pred))
  return out


def summarize(per_case: dict[str, dict[str, dict[int, float]]], class_names: dict[int, str]) -> dict:
  """Per metric ("dice", and "hd95" / "nsd" when measured): the mean per class over the cases where
  it is defined (the class present in the truth; for HD95 also predicted), and the mean over
  classes ("mean_dice", ...); "hd95_missed": per class, the cases present in the truth but not
  predicted, which HD95 leaves out."""
  metrics = sorted({m for case in per_case.values() for m in case}, key=["dice", "hd95", "nsd"].index)
  out = {"cases": len(per_case)}
  for metric in metrics:
    per_class = {}
    for c, name in class_names.items():
      values = [case[metric][c] for case in per_case.values() if not np.isnan(case[metric].get(c, np.nan))]
      per_class[name] = float(np.mean(values)) if values else float("nan")
    present = [v for v in per_class.values() if not np.isnan(v)]
    out[metric] = per_class
    out[f"mean_{metric}"] = float(np.mean(present)) if present else float("nan")
  if "hd95" in metrics:
    out["hd95_missed"] = {name: sum(1 for case in per_case.values() if np.isnan(case["hd95"].get(c, np.nan))
                                    and not np.isnan(case["dice"].get(c, np.nan)))
                          for c, name in class_names.items()}
  return out


# ------------------------------------------------------------------ nnU-Net's postprocessing


def keep_largest_component(labels: np.ndarray, targets, background: int = 0) -> np.ndarray:
  """nnU-Net's remove_all_but_largest_component_from_segmentation: the union of `targets` (label
  values, or tuples of them for regions) keeps only its largest connected component (full
  connectivity, as skimage's default; components tied for largest all stay); the rest becomes
  `background`. Returns a copy."""
  from scipy import ndimage
  mask = np.zeros(labels.shape, bool)
  for target in targets:
    mask |= _mask(labels, tuple(np.atleast_1d(target).tolist()))
  components, n = ndimage.label(mask, structure=np.ones((3,) * labels.ndim, bool))
  out = labels.copy()
  if n > 1:
    sizes = np.bincount(components.ravel())[1:]
    out[mask & ~np.isin(components, np.flatnonzero(sizes == sizes.max()) + 1)] = background
  return out


def apply_postprocessing(labels: np.ndarray, steps) -> np.ndarray:
  """`labels` after each step of `determine_postprocessing` in turn (a step: the targets whose union
  keeps only its largest component)."""
  for targets in steps:
    labels = keep_largest_component(labels, targets)
  return labels


def nnunet_dice(prediction: np.ndarray, truth: np.ndarray, values: tuple[int, ...], ignore_label=None) -> float:
  """nnU-Net's Dice (evaluate_predictions): 2TP / (2TP + FP + FN), NaN only where the class is in
  neither; a class predicted but absent from the truth scores 0 (MedDINOv3's `dice_per_class` skips it)."""
  prediction = _scored(prediction, truth, ignore_label)
  p, t = _mask(prediction, values), _mask(truth, values)
  tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
  return float("nan") if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def determine_postprocessing(cases, targets: dict, foreground_labels, ignore_label=None, log=print,
                             progress: bool = False, one_pass: bool | None = None) -> dict:
  """nnU-Net's determine_postprocessing on validation predictions: `cases` is a list of
  (load the prediction, load the reference) callables, `targets` {name: label values} (classes,
  or regions), `foreground_labels` the label values. First: keeping only the largest component
  of all foreground together, accepted when it raises the mean Dice over targets and lowers none;
  then, if there are several targets, each target's largest component in turn, accepted when it
  raises that target's mean Dice. Dice is nnU-Net's (nnunet_dice), averaged over cases ignoring NaN.

  The cases are read one at a time, so they need not fit in memory together: once for the first
  step, and once more for all targets' steps with plain labels (`one_pass` None or True), where a
  target's step changes no other target's Dice. Regions overlap, so each of their steps reads the
  cases again, as nnU-Net does. Returns {"steps": [[targets...], ...], "before": ..., "after": ...,
  "cases": n}."""
  from tqdm.auto import tqdm
  if not cases:
    raise ValueError("determine_postprocessing: no cases")
  names = list(targets)
  plain = all(len(targets[n]) == 1 for n in names)
  one_pass = plain if one_pass is None else one_pass
  if one_pass and not plain:
    raise ValueError("determine_postprocessing: one_pass needs plain labels; regions overlap")

  def dice(prediction, truth, name):
    return nnunet_dice(prediction, truth, tuple(targets[name]), ignore_label)

  def summary(means) -> dict:
    return {"foreground_mean": float(np.mean(means)), "mean": dict(zip(names, map(float, means)))}

  def mean_dice(score) -> dict:
    """{key: means over cases} of score(prediction, truth) = {key: [Dice, ...]}, reading each case once."""
    rows = {}
    for load_prediction, load_truth in tqdm(cases, desc="postprocessing", unit="case", disable=not progress,
                                            leave=False):
      for key, values in score(load_prediction(), load_truth()).items():
        rows.setdefault(key, []).append(values)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)   # a target absent from every case: NaN
      return {key: np.nanmean(np.array(values, np.float64), axis=0) for key, values in rows.items()}

  def after(prediction, truth, steps) -> list:
    prediction = apply_postprocessing(prediction, steps)
    return [dice(prediction, truth, n) for n in names]

  candidate = [[int(v)] for v in foreground_labels]
  first = mean_dice(lambda prediction, truth: {"before": after(prediction, truth, []),
                                               "trial": after(prediction, truth, [candidate])})
  steps, before, trial = [], summary(first["before"]), summary(first["trial"])
  current = before
  if trial["foreground_mean"] > current["foreground_mean"] and not any(
      trial["mean"][n] < current["mean"][n] for n in names):  # defensive, as nnU-Net: no target may get worse
    log(f"keeping only the largest foreground component raises the mean Dice "
        f"{current['foreground_mean']:.5f} -> {trial['foreground_mean']:.5f}: applied")
    steps, current = [candidate], trial
  else:
    log("keeping only the largest foreground component does not improve the Dice: not applied")
  if len(names) < 2:
    return {"steps": steps, "before": before, "after": current, "cases": len(cases)}
  if one_pass:   # each target's Dice with its own step, after the first step's outcome
    def each_target(prediction, truth, prefix=tuple(steps)):
      prediction = apply_postprocessing(prediction, prefix)
      # rows as long as `after`'s, so that a mean is summed in the same order: an unchanged Dice compares equal
      return {n: [dice(keep_largest_component(prediction, [targets[n]]), truth, n) if m == n else np.nan
                  for m in names] for n in names}
    own = mean_dice(each_target)
  for i, name in enumerate(names):
    step = [list(targets[name])]
    if one_pass:
      trial = summary([own[name][i] if n == name else current["mean"][n] for n in names])
    else:
      trial = summary(mean_dice(lambda prediction, truth: {"after": after(prediction, truth, steps + [step])})["after"])
    if trial["mean"][name] > current["mean"][name]:
      log(f"keeping only the largest component of {name} raises its Dice "
          f"{current['mean'][name]:.5f} -> {trial['mean'][name]:.5f}: applied")
      steps, current = steps + [step], trial
    else:
      log(f"keeping only the largest component of {name} does not improve its Dice "
          f"({current['mean'][name]:.5f} -> {trial['mean'][name]:.5f}): not applied")
  return {"steps": steps, "before": before, "after": current, "cases": len(cases)}

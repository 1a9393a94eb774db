"""iBOT masks as DINOv2/DINOv3 draw them (`data/masking.py`, `data/collate.py`), in NumPy.

Of the 2B global crops of a batch, int(2B * probability) are masked. The i-th masked crop gets
exactly int(N * r_i) of its N patches, r = linspace(min_ratio, max_ratio, n_masked + 1)[1:], drawn
as rectangles (at least `min_patches`, aspect ratio log-uniform in [min_aspect, 1 / min_aspect],
at most `max_fraction` * N new patches each, ten tries per rectangle) and topped up with random
patches when the rectangles stop fitting. The list of masks, unmasked ones included, is then
shuffled across crops. The total number of masked patches depends only on B and N, so the
masked-patch arrays the train step gathers have a static shape.
"""
import math

import numpy as np


def _add_block(mask: np.ndarray, rng: np.random.Generator, max_patches: int, min_patches: int,
               log_aspect: tuple[float, float]) -> int:
  """Mask one random rectangle that adds 1..max_patches new patches; the number added (0: ten misses)."""
  height, width = mask.shape
  for _ in range(10):
    target_area = min_patches + (max_patches - min_patches) * rng.random()  # random.uniform: max may be < min
    aspect = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(target_area * aspect)))
    w = int(round(math.sqrt(target_area / aspect)))
    if w < width and h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      window = mask[top:top + h, left:left + w]
      added = h * w - int(window.sum())
      if 0 < added <= max_patches:
        window[...] = True
        return added
  return 0


def block_mask(rng: np.random.Generator, grid: tuple[int, int], n_masked: int, min_patches: int = 4,
               min_aspect: float = 0.3, max_fraction: float = 0.5) -> np.ndarray:
  """(rows, cols) bool mask with exactly `n_masked` patches set."""
  mask = np.zeros(grid, bool)
  max_block = max_fraction * grid[0] * grid[1]
  log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
  count = 0
  while count < n_masked:
    added = _add_block(mask, rng, min(n_masked - count, max_block), min_patches, log_aspect)
    if added == 0:
      break
    count += added
  if count < n_masked:
    free = np.flatnonzero(~mask.reshape(-1))
    mask.reshape(-1)[rng.choice(free, n_masked - count, replace=False)] = True
  return mask


def masked_counts(n_crops: int, n_patches: int, probability: float = 0.5,
                  ratio: tuple[float, float] = (0.1, 0.5)) -> list[int]:
  """How many patches each masked crop gets, before shuffling (the unmasked crops get none)."""
  n_masked_crops = int(n_crops * probability)
  ratios = np.linspace(ratio[0], ratio[1], n_masked_crops + 1)[1:]
  return [int(n_patches * r) for r in ratios]


def collate_masks(rng: np.random.Generator, n_crops: int, grid: tuple[int, int], probability: float = 0.5,
                  ratio: tuple[float, float] = (0.1, 0.5), min_patches: int = 4, min_aspect: float = 0.3,
                  max_fraction: float = 0.5) -> dict:
  """Masks of a batch's `n_crops` global crops (crop-major) and the masked-patch gather arrays.

    masks    (n_crops, rows * cols) bool
    indices  (M,) int32 positions of the masked patches in the flattened (n_crops * N) tokens
    weights  (M,) float32 1 / (masked patches in that patch's crop), iBOT's per-image normalisation
  """
  n_patches = grid[0] * grid[1]
  counts = masked_counts(n_crops, n_patches, probability, ratio)
  masks = [block_mask(rng, grid, n, min_patches, min_aspect, max_fraction).reshape(-1) for n in counts]
  masks += [np.zeros(n_patches, bool)] * (n_crops - len(counts))
  masks = np.stack([masks[i] for i in rng.permutation(n_crops)])
  per_crop = np.maximum(masks.sum(axis=1, keepdims=True), 1)
  weights = np.broadcast_to(1.0 / per_crop, masks.shape)[masks]
  return {"masks": masks, "indices": np.flatnonzero(masks).astype(np.int32), "weights": weights.astype(np.float32)}

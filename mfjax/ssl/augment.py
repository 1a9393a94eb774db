"""Multi-crop of one CT slice for DINO/iBOT pretraining, and MedDINOv3's CT input normalisation.

A slice in Hounsfield units is clipped to [-1000, 1000] and mapped to [0, 1] (the intensity space
DINOv2's photometric augmentations assume). Each crop then follows DINOv2's
`DataAugmentationDINO`:
  geometry    RandomResizedCrop (bicubic, PIL's on a float image; ratio 3/4..4/3),
              RandomHorizontalFlip(0.5); globals at scale (0.32, 1), locals at (0.05, 0.32)
  photometry  ColorJitter with p=0.8 (brightness 0.4, contrast 0.4, in random order), then
              global 1: GaussianBlur p=1.0; global 2: GaussianBlur p=0.1 and RandomSolarize
              (threshold 128/255) p=0.2; locals: GaussianBlur p=0.5 (kernel 9, sigma in [0.1, 2])
and is normalised as MedDINOv3's demo does: back to HU, (x - 65.1084) / 178.0166, three channels.

Dropped for a one-channel image: ColorJitter's saturation (0.2) and hue (0.1) shifts and
RandomGrayscale (p=0.2) leave a grey image unchanged, so they are not drawn at all.

Gram crops (optional), as DINOv3's `DataAugmentationDINO`: each global box is cut at the larger of
the global and Gram sizes. With `gram_distortions`, its photometric augmentation is drawn once at that
size, and the result is resized to the global crop and to the Gram crop (the Gram teacher sees the
student's image). Without, the Gram crop is the undistorted cut resized, and the global crop is resized
before its photometric augmentation. `flips=False` turns every horizontal flip off (DINOv3's
`horizontal_flips`, off in its ViT-7B Gram and high-resolution stages).
"""

import numpy as np
import PIL.Image

from mfjax.data.transforms import random_resized_crop_box

HU_RANGE = (-1000.0, 1000.0)
CT_MEAN, CT_STD = 65.1084, 178.0166
GLOBAL_SCALE = (0.32, 1.0)
LOCAL_SCALE = (0.05, 0.32)
JITTER_P, BRIGHTNESS, CONTRAST = 0.8, 0.4, 0.4
BLUR_KERNEL, BLUR_SIGMA = 9, (0.1, 2.0)
SOLARIZE_THRESHOLD = 128 / 255
# (blur probability, solarize probability) per crop kind, as DINOv2's global_transfo1/2 and local_transfo.
PHOTOMETRY = {"global1": (1.0, 0.0), "global2": (0.1, 0.2), "local": (0.5, 0.0)}


def window(slice_hu: np.ndarray) -> np.ndarray:
  """HU clipped to [-1000, 1000] and mapped to [0, 1]."""
  lo, hi = HU_RANGE
  return ((np.clip(slice_hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalize(unit: np.ndarray) -> np.ndarray:
  """(H, W) in [0, 1] -> (H, W, 3): back to clipped HU, then (x - 65.1084) / 178.0166."""
  lo, hi = HU_RANGE
  hu = unit * (hi - lo) + lo
  return np.repeat(((hu - CT_MEAN) / CT_STD)[..., None], 3, axis=-1).astype(np.float32)


def normalize_ct(slice_hu: np.ndarray) -> np.ndarray:
  """MedDINOv3's inference input: clip HU to [-1000, 1000], standardise, repeat to 3 channels."""
  return normalize(window(slice_hu))


def crop_resize(unit: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool) -> np.ndarray:
  top, left, h, w = box
  image = PIL.Image.fromarray(unit, mode="F").resize((size, size), PIL.Image.BICUBIC,
                                                     box=(left, top, left + w, top + h))
  out = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
  return out[:, ::-1] if flip else out


def gaussian_blur(unit: np.ndarray, sigma: float) -> np.ndarray:
  """torchvision GaussianBlur(kernel 9): separable, reflect padding."""
  half = (BLUR_KERNEL - 1) / 2
  x = np.linspace(-half, half, BLUR_KERNEL)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  kernel /= kernel.sum()
  pad = BLUR_KERNEL // 2
  padded = np.pad(unit, pad, mode="reflect")
  rows = sum(kernel[i] * padded[i:i + unit.shape[0], :] for i in range(BLUR_KERNEL))
  return sum(kernel[j] * rows[:, j:j + unit.shape[1]] for j in range(BLUR_KERNEL)).astype(np.float32)


def photometric(unit: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
  blur_p, solarize_p = PHOTOMETRY[kind]
  if rng.random() < JITTER_P:
    brightness = rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)
    contrast = rng.uniform(1 - CONTRAST, 1 + CONTRAST)
    for op in rng.permutation(2):
      if op == 0:
        unit = np.clip(unit * brightness, 0.0, 1.0)
      else:
        unit = np.clip((unit - unit.mean()) * contrast + unit.mean(), 0.0, 1.0)
  if rng.random() < blur_p:
    unit = gaussian_blur(unit, rng.uniform(*BLUR_SIGMA))
  if rng.random() < solarize_p:
    unit = np.where(unit >= SOLARIZE_THRESHOLD, 1.0 - unit, unit)
  return unit.astype(np.float32)


def resize(unit: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize of a square crop; none at its own size (as torchvision's Resize)."""
  return unit if unit.shape[0] == size else crop_resize(unit, (0, 0, *unit.shape), size, False)


def multi_crop(slice_hu: np.ndarray, rng: np.random.Generator, global_size: int, local_size: int, n_local: int,
               global_scale=GLOBAL_SCALE, local_scale=LOCAL_SCALE, gram_size: int = 0,
               gram_distortions: bool = True, flips: bool = True) -> dict:
  """{"global": (2, G, G, 3), "local": (n_local, L, L, 3)[, "gram": (2, S, S, 3)]} float32 of one slice."""
  unit = window(slice_hu)
  height, width = unit.shape
  out = {"global": [], "local": [], "gram": []}
  cut_size = max(global_size, gram_size)
  for kind in ("global1", "global2"):
    box = random_resized_crop_box(rng, width, height, global_scale)
    cut = crop_resize(unit, box, cut_size, flips and bool(rng.random() < 0.5))
    if gram_size and gram_distortions:  # one draw, shared by the student's crop and the Gram teacher's
      distorted = photometric(cut, rng, kind)
      out["global"].append(normalize(resize(distorted, global_size)))
      out["gram"].append(normalize(resize(distorted, gram_size)))
    else:
      out["global"].append(normalize(photometric(resize(cut, global_size), rng, kind)))
      if gram_size:
        out["gram"].append(normalize(resize(cut, gram_size)))
  for _ in range(n_local):
    box = random_resized_crop_box(rng, width, height, local_scale)
    flip = flips and bool(rng.random() < 0.5)
    out["local"].append(normalize(photometric(crop_resize(unit, box, local_size, flip), rng, "local")))
  return {k: np.stack(v) for k, v in out.items() if v}

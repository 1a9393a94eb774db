"""The paper's image transforms on the host, in PIL and NumPy, with torchvision's semantics.

eval:  Resize((S, S)) -> CenterCrop(R) -> ToTensor -> Normalize
train: Resize((S, S)) -> CenterCrop(R) -> RandomResizedCrop(R, scale=(0.8, 1.2)) ->
       RandomVerticalFlip -> RandomHorizontalFlip ->
       RandomApply(ColorJitter(0.2, 0.2, 0.1, 0.1), p=0.8) -> ToTensor -> Normalize

R is the resolution (224 in the paper, 1024 in its resolution study) and S = round(R * 256 /
224), the paper's 256/224 ratio. Resize is to a square, as the paper's `Resize((256, 256))`.
Every step calls the same PIL operation torchvision applies to PIL images (bilinear resize
with PIL's antialiasing, ImageEnhance for brightness/contrast/saturation, an HSV shift for
hue), so eval outputs equal torchvision's. Randomness comes from a NumPy Generator: the
same generator state gives the same augmentation.

Grayscale images are transformed in one channel (hue and saturation leave them unchanged,
as in torchvision) and, by default, repeated to three channels after normalization.
"""
import math

import numpy as np
import PIL.Image
import PIL.ImageEnhance

PAPER_RESOLUTION, PAPER_RESIZE = 224, 256
RRC_SCALE = (0.8, 1.2)
RRC_RATIO = (3 / 4, 4 / 3)
JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.1, "hue": 0.1}
JITTER_P = 0.8


def resize_size(resolution: int) -> int:
  return int(round(resolution * PAPER_RESIZE / PAPER_RESOLUTION))


def resize(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
  return image.resize((size, size), PIL.Image.BILINEAR)


def center_crop(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
  w, h = image.size
  if w < size or h < size:
    raise ValueError(f"center_crop({size}) of a {w}x{h} image; resize first")
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale=RRC_SCALE, ratio=RRC_RATIO) -> tuple[int, int, int, int]:
  """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws them.

  Ten tries at an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; a
  box that does not fit (scale > 1 often does not) is redrawn; after ten misses, the
  largest centred box with an aspect ratio inside `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image, rng, size: int, scale=RRC_SCALE, ratio=RRC_RATIO):
  top, left, h, w = random_resized_crop_box(rng, image.size[0], image.size[1], scale, ratio)
  return image.crop((left, top, left + w, top + h)).resize((size, size), PIL.Image.BILINEAR)


def adjust_hue(image: PIL.Image.Image, factor: float) -> PIL.Image.Image:
  if image.mode != "RGB":
    return image
  h, s, v = image.convert("HSV").split()
  shift = int(factor * 255) % 256  # truncation toward zero, wrapped, as torchvision's uint8 cast
  h = PIL.Image.fromarray((np.asarray(h, np.uint8) + np.uint8(shift)).astype(np.uint8), "L")
  return PIL.Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(image, rng, brightness=JITTER["brightness"], contrast=JITTER["contrast"],
                 saturation=JITTER["saturation"], hue=JITTER["hue"]):
  """torchvision ColorJitter: the four adjustments in a random order, each factor uniform."""
  order = rng.permutation(4)
  factors = (rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
             rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
             rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
             rng.uniform(-hue, hue))
  for i in order:
    if i == 0:
      image = PIL.ImageEnhance.Brightness(image).enhance(factors[0])
    elif i == 1:
      image = PIL.ImageEnhance.Contrast(image).enhance(factors[1])
    elif i == 2:
      image = PIL.ImageEnhance.Color(image).enhance(factors[2])
    else:
      image = adjust_hue(image, factors[3])
  return image


def to_array(image: PIL.Image.Image, mean, std, gray_to_rgb: bool = True) -> np.ndarray:
  """ToTensor + Normalize, channels last: (H, W, C) float32.

  A one-channel image with one-value mean/std is normalized then repeated to three
  channels (if gray_to_rgb); with three-value mean/std it is repeated first.
  """
  x = np.asarray(image, np.float32) / np.float32(255)
  if x.ndim == 2:
    x = x[:, :, None]
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if x.shape[-1] == 1 and (len(mean) == 3 or len(std) == 3):
    x = np.repeat(x, 3, axis=-1)
  x = (x - mean) / std
  if gray_to_rgb and x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


def eval_image(image, resolution: int, mean, std, gray_to_rgb: bool = True) -> np.ndarray:
  image = center_crop(resize(image, resize_size(resolution)), resolution)
  return to_array(image, mean, std, gray_to_rgb)


def train_image(image, rng: np.random.Generator, resolution: int, mean, std,
                gray_to_rgb: bool = True) -> np.ndarray:
  image = center_crop(resize(image, resize_size(resolution)), resolution)
  image = random_resized_crop(image, rng, resolution)
  if rng.random() < 0.5:
    image = image.transpose(PIL.Image.FLIP_TOP_BOTTOM)
  if rng.random() < 0.5:
    image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
  if rng.random() < JITTER_P:
    image = color_jitter(image, rng)
  return to_array(image, mean, std, gray_to_rgb)

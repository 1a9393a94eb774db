"""Reading image files (PNG, JPEG, DICOM, 16-bit) as 8-bit L or RGB, and what gets stored.

A dataset keeps the original file bytes when they already are an 8-bit PNG or JPEG in the
dataset's channel layout, so building copies rather than re-encodes. Anything else (DICOM,
16-bit PNG, palette, RGBA, CMYK, a colour file in a grayscale dataset, or any image when the
build asks for smaller stored images) is converted and stored as PNG (JPEG sources: JPEG,
quality 95). High-bit-depth pixels are mapped to 0..255 by the image's own min and max;
DICOM MONOCHROME1 is inverted so that bright always means dense.
"""
import io

import numpy as np
import PIL.Image

MODES = {1: "L", 3: "RGB"}
STATS_SIZE = 256  # normalization statistics are measured on images resized like the paper's


def is_dicom(path: str, head: bytes) -> bool:
  return path.lower().endswith((".dcm", ".dicom")) or head[128:132] == b"DICM"


def _to_uint8(array: np.ndarray) -> np.ndarray:
  if array.dtype == np.uint8:
    return array
  array = array.astype(np.float64)
  lo, hi = float(array.min()), float(array.max())
  if hi <= lo:
    return np.zeros(array.shape, np.uint8)
  return np.round((array - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _read_dicom(data: bytes) -> PIL.Image.Image:
  import pydicom
  ds = pydicom.dcmread(io.BytesIO(data))
  if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
    raise ValueError(f"DICOM has {ds.NumberOfFrames} frames; one image per file is expected")
  try:
    array = ds.pixel_array
  except Exception as e:  # pydicom raises several types for missing pixel-data handlers
    raise ValueError(f"cannot decode DICOM pixel data ({type(e).__name__}: {e}); compressed "
                     "transfer syntaxes need `pip install pylibjpeg pylibjpeg-libjpeg`") from e
  array = _to_uint8(array)
  if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
    array = 255 - array
  if array.ndim == 2:
    return PIL.Image.fromarray(array, "L")
  if array.ndim == 3 and array.shape[-1] == 3:
    return PIL.Image.fromarray(array, "RGB")
  raise ValueError(f"DICOM pixel array has shape {array.shape}; expected (H, W) or (H, W, 3)")


def decode(data: bytes, channels: int, path: str = "", draft_size: int | None = None) -> PIL.Image.Image:
  """Fully decoded 8-bit image in mode L (channels=1) or RGB (channels=3).

  draft_size: let a JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding, keeping both sides
  at least `draft_size` (much faster for large files; pixels differ slightly from a full
  decode followed by a resize).
  """
  if is_dicom(path, data[:132]):
    image = _read_dicom(data)
  else:
    image = PIL.Image.open(io.BytesIO(data))
    if draft_size is not None and image.format == "JPEG":
      image.draft(MODES[channels], (draft_size, draft_size))
    image.load()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
      image = PIL.Image.fromarray(_to_uint8(np.asarray(image)), "L")
  mode = MODES[channels]
  if image.mode != mode:
    image = image.convert("RGBA").convert(mode) if image.mode in ("P", "PA") else image.convert(mode)
  return image


def load(path: str, channels: int) -> PIL.Image.Image:
  with open(path, "rb") as f:
    return decode(f.read(), channels, path)


def pixel_stats(image: PIL.Image.Image) -> np.ndarray:
  """Per-channel (mean, mean of squares) in [0, 1] at the paper's 256x256 input size."""
  small = np.asarray(image.resize((STATS_SIZE, STATS_SIZE), PIL.Image.BILINEAR), np.float64) / 255.0
  small = small.reshape(-1, 1 if small.ndim == 2 else small.shape[-1])
  return np.stack([small.mean(axis=0), (small ** 2).mean(axis=0)])


def shrink(image: PIL.Image.Image, shorter_side: int | None) -> PIL.Image.Image:
  """Downscale (bilinear, antialiased) so the shorter side is `shorter_side`; never enlarge."""
  if shorter_side is None or min(image.size) <= shorter_side:
    return image
  w, h = image.size
  scale = shorter_side / min(w, h)
  size = (max(shorter_side, round(w * scale)), max(shorter_side, round(h * scale)))
  return image.resize(size, PIL.Image.BILINEAR)


def storage_bytes(path: str, channels: int, shorter_side: int | None = None) -> bytes:
  """The bytes a dataset stores for this file (see module docstring)."""
  with open(path, "rb") as f:
    data = f.read()
  source_format = None
  if not is_dicom(path, data[:132]):
    with PIL.Image.open(io.BytesIO(data)) as header:
      source_format = header.format
      fits = (source_format in ("PNG", "JPEG") and header.mode == MODES[channels]
              and (shorter_side is None or min(header.size) <= shorter_side))
    if fits:
      return data
  image = shrink(decode(data, channels, path), shorter_side)
  out = io.BytesIO()
  if source_format == "JPEG":
    image.save(out, format="JPEG", quality=95)
  else:
    image.save(out, format="PNG")
  return out.getvalue()

"""Position-embedding and relative-position-table resampling with PyTorch's arithmetic (1e-12 in
float64; float32 rounds differently, by a few 1e-6).

`torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` has two kernels:
without antialias it is the Keys cubic with A = -0.75 and clamped borders (OpenCV style);
with antialias it is Pillow's filter with A = -0.5 whose support widens when shrinking.
`jax.image.resize` is neither, so both are written here as (out, in) weight matrices built
in float64 with NumPy at trace time and applied separably with one einsum per axis.

`scale_factor` follows torch: the output size is int(in * scale) and the source coordinate
uses 1 / scale rather than in / out, which is what DINO's "+0.1" kludge relies on.
"""
import math

import jax.numpy as jnp
import numpy as np

# How each source model resizes its absolute position embedding to a new token grid.
#   size            F.interpolate(size=grid)                        HF ViT/DeiT, HF Dinov2, HF CLIP, BLIP
#   size_antialias  F.interpolate(size=grid, antialias=True)        timm, open_clip, SAM, DINOv2 with registers
#                                                                   (torch hub and HF Dinov2WithRegisters)
#   dino_offset     F.interpolate(scale_factor=(g + 0.1) / M)       DINOv1, DINOv2 torch hub without registers
#   deit_sqrt       F.interpolate(scale_factor=sqrt(n_new / n_old)) the paper's DeiT head (square grids)
#   fixed           no resizing: the input must give the native grid
POSEMB_METHODS = ("size", "size_antialias", "dino_offset", "deit_sqrt", "fixed")


def _scale(in_size, out_size, scale_factor, dt):
  # area_pixel_compute_scale: 1/scale_factor in double then cast, else in/out in the op's dtype.
  return dt(1.0 / scale_factor) if scale_factor else dt(in_size) / dt(out_size)


def _keys_cubic(x, a, dt):
  """The Keys cubic, written as Pillow/torch's antialiased filter writes it."""
  x = np.abs(x).astype(dt)
  a = dt(a)
  return np.where(
      x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
      np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, dt(0))).astype(dt)


def bicubic_weights(in_size: int, out_size: int, scale_factor: float | None = None,
                    dtype=np.float32) -> np.ndarray:
  """(out, in) weights of torch's bicubic (antialias=False, align_corners=False) on one axis.

  Computed in `dtype` with torch's own operation order, as its CPU kernel does.
  """
  dt = np.dtype(dtype).type
  scale = _scale(in_size, out_size, scale_factor, dt)
  a = dt(-0.75)
  near = lambda x: ((a + dt(2)) * x - (a + dt(3))) * x * x + dt(1)       # |x| <= 1
  far = lambda x: ((a * x - dt(5) * a) * x + dt(8) * a) * x - dt(4) * a  # 1 < |x| < 2
  src = scale * (np.arange(out_size).astype(dt) + dt(0.5)) - dt(0.5)
  base = np.floor(src)
  t = np.clip(src - base, 0, 1).astype(dt)
  one_minus_t = dt(1) - t
  weights = np.zeros((out_size, in_size), dt)
  rows = np.arange(out_size)
  for tap, w in enumerate((far(t + dt(1)), near(t), near(one_minus_t), far(one_minus_t + dt(1)))):
    idx = np.clip(base - 1 + tap, 0, in_size - 1).astype(int)  # taps base-1 .. base+2, clamped
    np.add.at(weights, (rows, idx), w)
  return weights


def antialiased_bicubic_weights(in_size: int, out_size: int, scale_factor: float | None = None,
                                dtype=np.float32) -> np.ndarray:
  """(out, in) weights of torch's bicubic with antialias=True (Pillow's filter, A = -0.5).

  Like torch, an axis whose size does not change is left untouched, whatever the scale.
  """
  dt = np.dtype(dtype).type
  if in_size == out_size:
    return np.eye(in_size, dtype=dt)
  scale = _scale(in_size, out_size, scale_factor, dt)
  support = dt(2.0) * scale if scale >= 1.0 else dt(2.0)
  invscale = dt(1.0) / scale if scale >= 1.0 else dt(1.0)
  weights = np.zeros((out_size, in_size), dt)
  for i in range(out_size):
    center = scale * (dt(i) + dt(0.5))
    lo = max(int(center - support + dt(0.5)), 0)  # C++ truncation toward zero, as torch does
    hi = min(int(center + support + dt(0.5)), in_size)
    w = _keys_cubic((np.arange(lo, hi).astype(dt) - center + dt(0.5)) * invscale, -0.5, dt)
    total = w.sum(dtype=dt)
    weights[i, lo:hi] = w / total if total != 0 else w
  return weights


def interpolate(grid, size=None, scale_factor=None, antialias=False):
  """`F.interpolate(mode='bicubic', align_corners=False)` on a (..., H, W, C) array.

  Give exactly one of `size` (h, w) or `scale_factor` (a float or an (sh, sw) pair).
  A NumPy array is resized on the host in its own dtype (float64 in, float64 out); any other
  array with jax.numpy in float32, traceable and differentiable.
  """
  in_h, in_w = grid.shape[-3], grid.shape[-2]
  if (size is None) == (scale_factor is None):
    raise ValueError("give exactly one of size or scale_factor")
  if scale_factor is not None:
    sh, sw = (scale_factor, scale_factor) if np.isscalar(scale_factor) else scale_factor
    size = (int(in_h * float(sh)), int(in_w * float(sw)))
    scales = (float(sh), float(sw))
  else:
    scales = (None, None)
  out_h, out_w = size
  if (out_h, out_w) == (in_h, in_w) and scales == (None, None):
    return grid
  weights = antialiased_bicubic_weights if antialias else bicubic_weights
  on_host = isinstance(grid, np.ndarray)
  dtype = grid.dtype if on_host and grid.dtype == np.float64 else np.float32
  wh = weights(in_h, out_h, scales[0], dtype)
  ww = weights(in_w, out_w, scales[1], dtype)
  if on_host:
    out = np.einsum("oh,...hwc->...owc", wh, grid.astype(dtype))
    return np.einsum("pw,...owc->...opc", ww, out).astype(grid.dtype)
  out = jnp.einsum("oh,...hwc->...owc", wh, grid.astype(jnp.float32), precision="highest")
  out = jnp.einsum("pw,...owc->...opc", ww, out, precision="highest")
  return out.astype(grid.dtype)


def resample_grid(grid, new_grid: tuple[int, int], method: str):
  """Resize a (H, W, C) position-embedding grid to `new_grid` the way `method`'s source does."""
  old = tuple(grid.shape[:2])
  new_grid = tuple(int(g) for g in new_grid)
  if method not in POSEMB_METHODS:
    raise ValueError(f"unknown position-embedding method {method!r}; valid: {POSEMB_METHODS}")
  if new_grid == old and method not in ("dino_offset",):
    return grid
  if method == "fixed":
    raise ValueError(f"this model's position embedding is fixed at a {old[0]}x{old[1]} token grid "
                     f"(the source slices it, never resizes it); got a {new_grid[0]}x{new_grid[1]} grid. "
                     "Convert with a resizing method (e.g. posemb='size') to use other resolutions.")
  if method == "size":
    return interpolate(grid, size=new_grid)
  if method == "size_antialias":
    return interpolate(grid, size=new_grid, antialias=True)
  if method == "dino_offset":
    if new_grid == old:
      return grid  # the sources skip interpolation when the grid is unchanged
    out = interpolate(grid, scale_factor=((new_grid[0] + 0.1) / old[0], (new_grid[1] + 0.1) / old[1]))
  else:  # deit_sqrt
    if old[0] != old[1] or new_grid[0] != new_grid[1]:
      raise ValueError(f"deit_sqrt resizing needs square grids; got {old} -> {new_grid}")
    s = math.sqrt(new_grid[0] * new_grid[1] / (old[0] * old[1]))
    out = interpolate(grid, scale_factor=s)
  if tuple(out.shape[:2]) != new_grid:
    raise ValueError(f"{method} resizing of a {old} grid gives {tuple(out.shape[:2])}, not {new_grid} "
                     "(the source model fails the same way at this resolution)")
  return out


def resample_rel_pos_nearest(table, new_len: int):
  """`F.interpolate(table.T[None], size=new_len)` (mode 'nearest'), as used on SAM's rel-pos tables."""
  old = table.shape[0]
  if old == new_len:
    return table
  # torch 'nearest': src = floor(dst * (in / out)), computed in float32.
  idx = np.minimum(np.floor(np.arange(new_len, dtype=np.float32) * np.float32(old / new_len)), old - 1)
  return table[idx.astype(int)]


def resample_rel_pos_linear(table, new_len: int):
  """segment_anything's `get_rel_pos` fallback: F.interpolate(mode='linear') to `new_len`.

  Source positions follow torch's kernel for float32 tables: a float32 scale, and
  scale * (i + 0.5) - 0.5 rounded once to float32 (its fused multiply-add).
  """
  old = table.shape[0]
  if old == new_len:
    return table
  # torch's float32 kernel: the scale in float32, the source coordinate rounded to float32 once.
  f32 = np.float32
  scale = np.float64(f32(old) / f32(new_len))
  src = np.maximum(f32(scale * (np.arange(new_len) + 0.5) - 0.5), f32(0))
  lo = np.minimum(np.floor(src).astype(int), old - 1)
  hi = np.minimum(lo + 1, old - 1)
  frac = np.clip(src - lo, 0, 1).astype(f32)
  w = np.zeros((new_len, old))
  np.add.at(w, (np.arange(new_len), lo), 1 - frac)
  np.add.at(w, (np.arange(new_len), hi), frac)
  return jnp.einsum("no,oc->nc", jnp.asarray(w, jnp.float32), jnp.asarray(table, jnp.float32),
                    precision="highest").astype(table.dtype)

"""posemb matches torch.nn.functional.interpolate(mode='bicubic', align_corners=False)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfjax.models import posemb


def cases(n=30, seed=0):
  """Random (in grid, out size or scale factor, antialias) triples: up and down, square and not."""
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    h, w = (int(v) for v in rng.integers(2, 40, 2))
    if len(out) % 4 == 0:
      h = w  # some square grids
    aa = bool(len(out) % 2)
    if len(out) % 3 == 0:
      sf = (float(rng.uniform(0.3, 3)), float(rng.uniform(0.3, 3)))
      if int(h * sf[0]) < 2 or int(w * sf[1]) < 2:
        continue
      out.append(((h, w), {"scale_factor": sf}, aa))
    else:
      out.append(((h, w), {"size": tuple(int(v) for v in rng.integers(2, 70, 2))}, aa))
  return out


def torch_interp(x, kw, aa):
  t = torch.from_numpy(x).permute(2, 0, 1)[None]
  return F.interpolate(t, mode="bicubic", align_corners=False, antialias=aa, **kw)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("grid,kw,aa", cases())
def test_matches_torch(grid, kw, aa):
  rng = np.random.default_rng(abs(hash((grid, aa))) % 2**32)
  x64 = rng.standard_normal((*grid, 6))
  # float64: the kernel itself is exact (any difference would be a different formula).
  ref = torch_interp(x64, kw, aa)
  assert np.abs(posemb.interpolate(x64, antialias=aa, **kw) - ref).max() <= 1e-12
  # float32 at position-embedding scale, on the host and traced in JAX: within 1e-6.
  x32 = (x64 * 0.05).astype(np.float32)
  ref = torch_interp(x32, kw, aa)
  assert np.abs(posemb.interpolate(x32, antialias=aa, **kw) - ref).max() <= 1e-6
  traced = jax.jit(lambda g: posemb.interpolate(g, antialias=aa, **kw))(jnp.asarray(x32))
  assert np.abs(np.asarray(traced) - ref).max() <= 1e-6


def test_differentiable():
  grad = jax.grad(lambda g: posemb.resample_grid(g, (20, 12), "size_antialias").sum())(jnp.ones((14, 14, 3)))
  assert grad.shape == (14, 14, 3) and np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).sum()) > 0


@pytest.mark.parametrize("method,new", [("dino_offset", (16, 16)), ("dino_offset", (37, 20)),
                                        ("deit_sqrt", (7, 7)), ("deit_sqrt", (64, 64))])
def test_source_formulas(method, new):
  x = (np.random.default_rng(1).standard_normal((14, 14, 4)) * 0.05).astype(np.float32)
  t = torch.from_numpy(x).permute(2, 0, 1)[None]
  if method == "dino_offset":
    ref = F.interpolate(t, scale_factor=((new[0] + 0.1) / 14, (new[1] + 0.1) / 14), mode="bicubic")
  else:
    ref = F.interpolate(t, scale_factor=float(np.sqrt(new[0] * new[1] / 196)), mode="bicubic",
                        align_corners=False, recompute_scale_factor=False)
  got = posemb.resample_grid(jnp.asarray(x), new, method)
  assert got.shape[:2] == new
  assert np.abs(np.asarray(got) - ref[0].permute(1, 2, 0).numpy()).max() <= 1e-6


def test_fixed_and_unknown_methods_refuse():
  with pytest.raises(ValueError, match="fixed at a 14x14"):
    posemb.resample_grid(jnp.zeros((14, 14, 2)), (24, 24), "fixed")
  with pytest.raises(ValueError, match="valid:"):
    posemb.resample_grid(jnp.zeros((14, 14, 2)), (24, 24), "bilinear")
  with pytest.raises(ValueError, match="square"):
    posemb.resample_grid(jnp.zeros((14, 14, 2)), (24, 20), "deit_sqrt")


@pytest.mark.parametrize("old,new", [(27, 13), (27, 63), (127, 27), (27, 27)])
def test_rel_pos_tables(old, new):
  table = np.random.default_rng(old + new).standard_normal((old, 8)).astype(np.float32) * 0.05
  t = torch.from_numpy(table).T[None]
  nearest = F.interpolate(t, size=new, mode="nearest")[0].T.numpy()
  np.testing.assert_array_equal(np.asarray(posemb.resample_rel_pos_nearest(table, new)), nearest)
  linear = F.interpolate(t, size=new, mode="linear")[0].T.numpy()
  assert np.abs(np.asarray(posemb.resample_rel_pos_linear(jnp.asarray(table), new)) - linear).max() <= 1e-6

"""Helpers for PyTorch-vs-Flax parity tests: random weights, block hooks, the tolerance check."""
import contextlib

import numpy as np
import torch

from convert.__main__ import run as run_convert  # noqa: F401  (re-exported for tests)

RTOL = 1e-4  # max |delta| <= RTOL * max |ref| (DESIGN.md, "Numerics")


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
  """Perturb every float parameter and buffer so no weight keeps a trivial init (zeros, ones)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for t in list(model.parameters()) + list(model.buffers()):
      if t.dtype.is_floating_point:
        t.add_(torch.randn(t.shape, generator=g) * std)
  return model.eval()


def images(n: int, size, seed: int = 0) -> np.ndarray:
  """NHWC float32 test images, roughly normalized."""
  h, w = (size, size) if isinstance(size, int) else size
  return np.random.default_rng(seed).standard_normal((n, h, w, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@contextlib.contextmanager
def capture_outputs(modules, transform=lambda out: out):
  """Records each module's forward output (after `transform`) into the yielded list."""
  outputs, handles = [], []
  for m in modules:
    handles.append(m.register_forward_hook(lambda _m, _i, out: outputs.append(transform(out))))
  try:
    yield outputs
  finally:
    for h in handles:
      h.remove()


def assert_close(name: str, got, ref, rtol: float = RTOL) -> float:
  got = np.asarray(got, np.float32)
  ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
  assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
  err = float(np.abs(got - ref).max())
  scale = float(np.abs(ref).max())
  assert err <= rtol * scale, f"{name}: max|delta| {err:.3g} > {rtol} x max|ref| {scale:.3g}"
  return err / scale


def assert_outputs_match(got: dict, want: dict, label: str, keys=("pooled", "tokens", "neck"),
                         rtol: float = RTOL) -> float:
  """`got[k]` against `want[k]` for each of `keys` in `want` and for every block's output:
  max |delta| / max |ref| <= rtol. Prints and returns the worst ratio."""
  worst = 0.0
  pairs = [(k, got[k], want[k]) for k in keys if k in want]
  pairs += [(f"block {i}", g, w) for i, (g, w) in enumerate(zip(got["blocks"], want["blocks"], strict=True))]
  for name, g, w in pairs:
    g = np.asarray(g)
    assert g.shape == w.shape, f"{label} {name}: shape {g.shape} vs reference {w.shape}"
    err = float(np.abs(g - w).max() / np.abs(w).max())
    assert err <= rtol, f"{label} {name}: max|delta|/max|ref| = {err:.2e} > {rtol}"
    worst = max(worst, err)
  print(f"{label}: worst relative error {worst:.2e}")
  return worst

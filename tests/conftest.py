"""Test-wide settings: CPU only, exact float32 matmuls in JAX and torch."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
  import torch  # noqa: E402
  torch.set_float32_matmul_precision("highest")
  torch.set_num_threads(max(1, os.cpu_count() or 1))
except ImportError:
  pass

"""Test-wide settings: CPU only, exact float32 matmuls in JAX and torch."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two xdist workers and the subprocesses they start share the cores: OpenMP threads (torch) that
# spin while idle would take them from the other process's XLA threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Compiling dominates the suite: XLA's quickest CPU compile (mfjax.cli.QUICK_COMPILE_FLAGS). Its
# element-wise emitters change how XLA lowers the program (a scatter becomes a loop), not what it
# computes; the benchmarks, which count FLOPs on the compiled program, run without them
# (tests/test_benchmarks.py).
from mfjax.cli import with_quick_compile  # noqa: E402  (imports no JAX)

os.environ["XLA_FLAGS"] = with_quick_compile(os.environ.get("XLA_FLAGS", ""))
# One persistent compilation cache for the suite: the many short training runs (in this process
# and in subprocesses, which inherit the environment) compile the same programs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
  import torch  # noqa: E402
  torch.set_float32_matmul_precision("highest")
  torch.set_num_threads(max(1, os.cpu_count() or 1))
except ImportError:
  pass


import shutil  # noqa: E402

import pytest  # noqa: E402


class _ModuleTempFolders:
  """`tmp_path_factory.mktemp` for module-scoped fixtures, removed once the module's tests are done.

  A pytest session keeps every `mktemp` folder until it ends, and the converted checkpoints of the
  parity modules come to gigabytes; CI's disk does not hold all of them at once.
  """

  def __init__(self, factory):
    self._factory = factory
    self._made = []

  def mktemp(self, name):
    self._made.append(self._factory.mktemp(name))
    return self._made[-1]

  def remove_all(self):
    for path in self._made:
      shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
  folders = _ModuleTempFolders(tmp_path_factory)
  yield folders
  folders.remove_all()

"""Host memory: keep what the process frees for its next use instead of returning it to the kernel.

XLA:CPU allocates all the temporaries of a step as one block (1.67 GB for a ViT-B/16 train step
at batch 8) and frees it when the step ends. glibc returns a block that large to the kernel at
once (munmap), so every step faults the whole block back in, page by page: about 420,000 page
faults and 0.6 s of kernel CPU time per 3.5 s step when the process runs alone, and up to 2.4 s when
another framework in the same process has just touched its own memory (BENCHMARKS.md, "Host
memory"). Torch's own allocations of the same step are small enough that glibc reuses them.

`keep_freed_memory()` tells glibc to serve every thread from its main heap (one arena: the
other arenas hand large blocks to mmap regardless of the settings below), never to use mmap for
large blocks, and never to trim the heap: a freed step's block is reused by the next step at no
cost. The process keeps its peak host memory until it exits, as a training process does with a
caching allocator. It must run before the threads that allocate start (before JAX creates its
CPU client); the mfjax command line and the benchmarks call it first thing.
`MFJAX_KEEP_FREED_MEMORY=0` leaves glibc's defaults, and so does a machine where JAX runs on a GPU
or TPU: the steps' temporaries live on the device there, and one arena would only make the host's
threads (XLA's parallel compile, the data pipeline) queue for it.
"""
import ctypes
import logging
import os
import sys

log = logging.getLogger("mfjax")

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim


def keep_freed_memory() -> bool:
  """Apply SETTINGS through glibc's mallopt; True when they are in force. False off Linux, on a
  C library without mallopt or that refuses a setting (logged), or when MFJAX_KEEP_FREED_MEMORY=0."""
  if (os.environ.get("MFJAX_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux")
      or accelerator_present()):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  for param, value in SETTINGS:
    if mallopt(param, value) != 1:
      log.warning("mallopt(%d, %d) was refused: freed host memory goes back to the kernel", param, value)
      return False
  return True


def accelerator_present() -> bool:
  """Whether JAX will run on a GPU or TPU here, told before JAX is imported: JAX_PLATFORMS when set
  (its first entry), else an NVIDIA or TPU device file."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() not in ("cpu", "")
  return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0"))

"""float32 matmuls on the CPU through MKL, inside XLA's program.

On Intel Xeons XLA:CPU's own float32 GEMMs run at 0.76-0.88x of MKL's on every shape of a ViT-B
step, and its batched attention matmuls at about half of torch's (BENCHMARKS.md, "Why the CPU
train step is below 1.0x on the Intel Xeon"). `matmul` runs op(a) @ op(b) as an XLA FFI custom
call into MKL's sgemm_ / sgemm_batch_ (`cpu_gemm.cc`, compiled on first use with the host's C++
compiler and cached under ~/.cache/mfjax/native or $MFJAX_NATIVE_CACHE), with a custom VJP whose
two gradients are the same call; the operands stay in XLA's buffers, no host copies.
`layers.Dense` and the softmax attention core use it when `enabled_for` says so.

`attention` is softmax(scale q k^T) v fused the same way (a flash-attention style kernel on
MKL's GEMMs: blocks of queries against blocks of keys, an online softmax, the weights recomputed
in the backward pass from the saved log-sum-exp), so the (N, N) weights never exist whole. The
softmax attention core takes it when it has no bias or SAM's decomposed relative-position one
(`layers.DecomposedBias`) and more than `layers.FUSED_MIN_KEYS` keys (`fused_attention_enabled_for`):
at DINOv2's 518 px (1370 tokens) its forward + backward went from 0.67x to 0.95x torch's
scaled_dot_product_attention on a 2-core Xeon, and SAM ViT-B trains at 1024 px at 1.28x
segment_anything (BENCHMARKS.md).

MFJAX_CPU_GEMM picks the path:
  auto  (default) MKL on an Intel CPU when a library is found and the native call builds, on
        a single-device CPU backend; XLA's dots otherwise (on AMD EPYCs XLA's GEMMs are the
        faster ones). Why MKL is not used is logged once.
  mkl   MKL wherever the backend is one CPU device; an error naming the reason when it cannot.
  xla   XLA's dots.
The MKL library is, in this order: $MFJAX_MKL_LIBRARY (any shared library exporting sgemm_ and
sgemm_batch_), the `mkl` wheel's libmkl_rt (`pip install mkl`), torch's libtorch_cpu.so (x86
builds link MKL statically). MKL's threads follow its own settings (MKL_NUM_THREADS; torch's
set_num_threads when the library is torch's).
"""
import ctypes
import functools
import glob
import hashlib
import importlib.util
import logging
import math
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger("mfjax")

MODES = ("auto", "mkl", "xla")
TARGET = "mfjax_cpu_gemm"
ATTENTION_TARGET, ATTENTION_GRAD_TARGET = "mfjax_cpu_attention", "mfjax_cpu_attention_grad"
ATTENTION_BIAS_TARGET, ATTENTION_BIAS_GRAD_TARGET = "mfjax_cpu_attention_bias", "mfjax_cpu_attention_bias_grad"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_gemm.cc")


class Unavailable(RuntimeError):
  """Why the MKL path cannot run in this process."""


def mode() -> str:
  value = os.environ.get("MFJAX_CPU_GEMM", "auto").strip().lower()
  if value not in MODES:
    raise ValueError(f"MFJAX_CPU_GEMM={value!r} is not one of {', '.join(MODES)}")
  return value


@functools.cache
def intel_cpu(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
  try:
    with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
      return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
  except OSError:
    return False


def mkl_library_candidates() -> list[str]:
  """Where an MKL library may be, in the order tried (see the module docstring)."""
  if os.environ.get("MFJAX_MKL_LIBRARY"):
    return [os.environ["MFJAX_MKL_LIBRARY"]]
  candidates = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
  torch_spec = importlib.util.find_spec("torch")
  if torch_spec is not None and torch_spec.submodule_search_locations:
    candidates.append(os.path.join(torch_spec.submodule_search_locations[0], "lib", "libtorch_cpu.so"))
  return candidates


def _blas_functions(path: str):
  try:
    library = ctypes.CDLL(path)
  except OSError as e:
    raise Unavailable(f"MKL library {path} does not load: {e}") from e
  try:
    functions = [library.sgemm_, library.sgemm_batch_]
  except AttributeError as e:
    raise Unavailable(f"{path} exports no sgemm_ / sgemm_batch_ (not an MKL build)") from e
  # MKL's per-thread thread count, for the fused attention's own threads (None: not offered). The
  # C functions are the CamelCase symbols (mkl.h maps its lower-case names to them); the lower-case
  # symbols are the Fortran ones, which take pointers.
  functions += [getattr(library, name, None) for name in ("MKL_Set_Num_Threads_Local", "MKL_Get_Max_Threads")]
  return library, functions


def cache_dir() -> str:
  path = os.path.expanduser(os.environ.get("MFJAX_NATIVE_CACHE", "~/.cache/mfjax/native"))
  try:
    os.makedirs(path, exist_ok=True)
    if os.access(path, os.W_OK):
      return path
  except OSError:
    pass
  # A shared temporary folder: ours only if we own it and nobody else can write to it (a library
  # someone else planted there would run in this process).
  path = os.path.join(tempfile.gettempdir(), f"mfjax-native-{os.getuid()}")
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
  except OSError as e:
    raise Unavailable(f"no writable cache folder for the native build ({e}); set MFJAX_NATIVE_CACHE") from None
  if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
    raise Unavailable(f"{path} is not a private folder of this user (owner, or write access for others); "
                      "set MFJAX_NATIVE_CACHE to a folder of your own")
  return path


def cpu_identity(cpuinfo_path: str = "/proc/cpuinfo") -> bytes:
  """The CPU's model name and instruction-set flags (a build made with -march=native runs only
  on CPUs that have them)."""
  try:
    with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
      lines = [line for line in f if line.startswith(("model name", "flags"))]
  except OSError:
    lines = []
  return "".join(sorted(set(lines))).encode()


def build() -> str:
  """cpu_gemm.cc compiled against this jaxlib's FFI headers; the shared library's path. Built
  once per source, jaxlib, compiler and CPU, written atomically (test workers may build at once)."""
  compiler = shlex.split(os.environ.get("CXX", "")) or [shutil.which("c++") or shutil.which("g++") or ""]
  if not compiler[0]:
    raise Unavailable("no C++ compiler to build mfjax/cpu_gemm.cc (install g++ or set CXX)")
  with open(SOURCE, "rb") as f:
    source = f.read()
  # -march=native: the build is for this CPU (its exp loops vectorise), so the CPU is in the key.
  built_for = f"{jaxlib.__version__} {' '.join(compiler)} libc {platform.libc_ver()[1]}".encode()
  key = hashlib.sha256(source + built_for + cpu_identity()).hexdigest()[:16]
  out = os.path.join(cache_dir(), f"libmfjax_cpu_gemm-{key}.so")
  if os.path.exists(out):
    return out
  partial = f"{out}.{os.getpid()}.{threading.get_ident()}.partial"  # builders in other processes and threads
  command = [*compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fopenmp-simd", "-w",
             f"-I{jax.ffi.include_dir()}", SOURCE, "-o", partial]
  try:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
  except OSError as e:  # CXX names no program, or one that cannot run
    raise Unavailable(f"cannot run the compiler ({' '.join(command[:len(compiler)])}): {e}") from None
  if result.returncode:
    raise Unavailable(f"compiling {SOURCE} failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
  os.replace(partial, out)
  return out


_loaded: dict = {}


def load() -> str:
  """Builds and registers the custom call with the first MKL library that works; the library's
  path. Raises Unavailable naming every reason. Tried once per process (until `reset`): every
  layer asks at trace time."""
  if "outcome" not in _loaded:
    try:
      _loaded["outcome"] = _load()
    except Unavailable as e:
      _loaded["outcome"] = e
    except (OSError, AttributeError, RuntimeError) as e:  # a full disk, a missing symbol, a failed registration
      _loaded["outcome"] = Unavailable(f"loading mfjax/cpu_gemm.cc's library failed: {type(e).__name__}: {e}")
  if isinstance(_loaded["outcome"], Unavailable):
    raise Unavailable(str(_loaded["outcome"]))
  return _loaded["outcome"]


def reset() -> None:
  """Forget `load`'s outcome: the next call looks for the library again (after a change of
  MFJAX_MKL_LIBRARY)."""
  _loaded.pop("outcome", None)


def _load() -> str:
  reasons = []
  for path in mkl_library_candidates():
    try:
      library, functions = _blas_functions(path)
      break
    except Unavailable as e:
      reasons.append(str(e))
  else:
    raise Unavailable("no MKL library: " + ("; ".join(reasons) or
                      "set MFJAX_MKL_LIBRARY, `pip install mkl` or install torch"))
  native = _loaded.get("native")
  if native is None:  # built and registered once per process; `load` again only swaps the library
    built = build()
    try:
      native = ctypes.CDLL(built)
    except OSError as e:  # a cache on a noexec mount, or a library built for another system: built again once
      try:
        os.remove(built)
      except FileNotFoundError:  # another process removed it first
        pass
      try:
        native = ctypes.CDLL(build())
      except OSError as again:
        raise Unavailable(f"cannot load {built} ({e}; built again: {again})") from None
    native.MfjaxCpuGemmSetBlas.argtypes = [ctypes.c_void_p] * 4
    for target, symbol in ((TARGET, native.MfjaxCpuGemm), (ATTENTION_TARGET, native.MfjaxCpuAttention),
                           (ATTENTION_GRAD_TARGET, native.MfjaxCpuAttentionGrad),
                           (ATTENTION_BIAS_TARGET, native.MfjaxCpuAttentionBias),
                           (ATTENTION_BIAS_GRAD_TARGET, native.MfjaxCpuAttentionBiasGrad)):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    _loaded["native"] = native
  native.MfjaxCpuGemmSetBlas(*(ctypes.cast(f, ctypes.c_void_p) if f is not None else None for f in functions))
  _loaded["fused_attention"] = all(f is not None for f in functions)
  _loaded.setdefault("libraries", []).append(library)  # each must outlive the programs that called it
  log.info("CPU float32 GEMMs through MKL from %s", path)
  return path


def decision() -> tuple[bool, str]:
  """(whether float32 CPU matmuls go through MKL in this process, why): MFJAX_CPU_GEMM, the
  backend, its device count, the CPU's vendor and whether MKL loads (see the module docstring)."""
  chosen = mode()
  if jax.default_backend() != "cpu":
    return False, f"the backend is {jax.default_backend()}"
  if chosen == "xla":
    return False, "MFJAX_CPU_GEMM=xla"
  if jax.device_count() > 1:
    if chosen == "mkl":
      raise ValueError(f"MFJAX_CPU_GEMM=mkl runs on a single CPU device; this process has "
                       f"{jax.device_count()} (its custom call has no sharding rule)")
    return False, f"{jax.device_count()} CPU devices (the custom call has no sharding rule)"
  if chosen == "auto" and not intel_cpu():
    return False, "not an Intel CPU (XLA's GEMMs are the faster ones on AMD EPYCs)"
  try:
    return True, f"MKL from {load()}"
  except Unavailable as e:
    if chosen == "mkl":
      raise Unavailable(f"MFJAX_CPU_GEMM=mkl: {e}") from e
    return False, str(e)


@functools.cache
def _log_decision(reason: str) -> None:
  # On an Intel CPU, `auto` wanted MKL: a build or load that failed is a slowdown to be told of.
  wanted = mode() == "auto" and jax.default_backend() == "cpu" and jax.device_count() == 1 and intel_cpu()
  (log.warning if wanted else log.info)("CPU float32 GEMMs through XLA: %s", reason)


def enabled_for(*arrays) -> bool:
  """Whether `matmul` replaces XLA's dot for these operands (decided at trace time): float32 ones
  when `decision` says so. Why not is logged once per reason."""
  if any(a.dtype != jnp.float32 for a in arrays):
    return False
  use, reason = decision()
  if not use and jax.default_backend() == "cpu":
    _log_decision(reason)
  return use


def describe(dtype: str = "float32") -> str:
  """One line for logs and benchmark records: 'mkl (MKL from PATH)' or 'xla (why)', for a model
  computing in `dtype` (only float32 matmuls take MKL)."""
  if jnp.dtype(dtype) != jnp.float32:
    return f"xla ({jnp.dtype(dtype).name} compute)"
  use, reason = decision()
  return f"{'mkl' if use else 'xla'} ({reason})"


def _gemm(a, b, transpose_a: bool, transpose_b: bool):
  if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]:
    raise ValueError(f"cpu_gemm.matmul: operands {a.shape} and {b.shape} need the same batch dimensions")
  m, k = a.shape[-2:][::-1] if transpose_a else a.shape[-2:]
  k_b, n = b.shape[-2:][::-1] if transpose_b else b.shape[-2:]
  if k != k_b:
    raise ValueError(f"cpu_gemm.matmul: contracting sizes differ: {a.shape} (transposed: {transpose_a}) and "
                     f"{b.shape} (transposed: {transpose_b})")
  load()  # registers the custom call, or names why it cannot run here
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32),
                          vmap_method="broadcast_all")
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(a, b, transpose_a: bool = False, transpose_b: bool = False):
  """op(a) @ op(b) over matching leading dimensions, float32, through MKL (`Unavailable` names
  why where it cannot run); op transposes the last two dimensions when its flag is set."""
  return _gemm(a, b, transpose_a, transpose_b)


def _matmul_forward(a, b, transpose_a, transpose_b):
  return matmul(a, b, transpose_a, transpose_b), (a, b)


def _matmul_backward(transpose_a, transpose_b, operands, grad):
  a, b = operands
  grad_a = matmul(b, grad, transpose_b, True) if transpose_a else matmul(grad, b, False, not transpose_b)
  grad_b = matmul(grad, a, True, transpose_a) if transpose_b else matmul(a, grad, not transpose_a, False)
  return grad_a, grad_b


matmul.defvjp(_matmul_forward, _matmul_backward)


def fused_attention_enabled_for(*arrays) -> bool:
  """Whether `attention` replaces the softmax attention core for these operands: `enabled_for`,
  and the MKL library sets thread counts per thread (the fused core runs its own threads)."""
  return enabled_for(*arrays) and _loaded.get("fused_attention", False)


def _check_attention(q, k, v, bias):
  if q.ndim < 3 or not q.ndim == k.ndim == v.ndim or q.shape[:-3] != k.shape[:-3] or k.shape != v.shape \
      or q.shape[-2:] != k.shape[-2:]:
    raise ValueError(f"cpu_gemm.attention: q {q.shape}, k {k.shape}, v {v.shape} are not (..., N_q, heads, "
                     "head_dim) and two (..., N_k, heads, head_dim)")
  if bias:
    rows, cols = bias
    lead = (*q.shape[:-3], q.shape[-2], q.shape[-3])
    if rows.shape[:-1] != lead or cols.shape[:-1] != lead or rows.shape[-1] * cols.shape[-1] != k.shape[-3]:
      raise ValueError(f"cpu_gemm.attention: bias tables {rows.shape} and {cols.shape} are not (..., heads, N_q, "
                       f"key rows) and (..., heads, N_q, key columns) for q {q.shape} and k {k.shape}")


def _attention_forward_call(q, k, v, bias, scale):
  _check_attention(q, k, v, bias)
  load()
  lse = jax.ShapeDtypeStruct((*q.shape[:-3], q.shape[-2], q.shape[-3]), jnp.float32)
  call = jax.ffi.ffi_call(ATTENTION_BIAS_TARGET if bias else ATTENTION_TARGET,
                          (jax.ShapeDtypeStruct(q.shape, jnp.float32), lse), vmap_method="broadcast_all")
  return call(q, k, v, *bias, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_attention(q, k, v, bias, scale):
  return _attention_forward_call(q, k, v, bias, scale)[0]


def _fused_attention_forward(q, k, v, bias, scale):
  out, lse = _attention_forward_call(q, k, v, bias, scale)
  return out, (q, k, v, bias, out, lse)


def _fused_attention_backward(scale, residuals, grad):
  q, k, v, bias, out, lse = residuals
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v, *bias))
  call = jax.ffi.ffi_call(ATTENTION_BIAS_GRAD_TARGET if bias else ATTENTION_GRAD_TARGET, shapes,
                          vmap_method="broadcast_all")
  grad_q, grad_k, grad_v, *grad_bias = call(q, k, v, *bias, out, grad, lse, scale=np.float32(scale))
  return grad_q, grad_k, grad_v, tuple(grad_bias)


_fused_attention.defvjp(_fused_attention_forward, _fused_attention_backward)


def attention(q, k, v, scale: float, bias_rows=None, bias_cols=None):
  """softmax(scale q k^T + bias) v per batch and head on float32 (..., N, heads, head_dim)
  operands, fused: blocks of queries against blocks of keys with an online softmax, so the (N_q,
  N_k) weights are never stored whole; the backward pass recomputes them block by block from the
  saved log-sum-exp (`cpu_gemm.cc`). The optional bias is SAM's decomposed relative-position
  bias for keys on a (rows, columns) grid: bias[..., h, q, key] = bias_rows[..., h, q, key //
  columns] + bias_cols[..., h, q, key % columns], both tables differentiable. Check
  `fused_attention_enabled_for` first."""
  if (bias_rows is None) != (bias_cols is None):
    raise ValueError("cpu_gemm.attention: give both bias tables or neither")
  return _fused_attention(q, k, v, () if bias_rows is None else (bias_rows, bias_cols), scale)


_CUSTOM_CALL = re.compile(r"= f32\[([\d,]*)\][^\n]*? custom-call\([^\n]*?custom_call_target=\"" + TARGET
                          + r"\"[^\n]*?operand_layout_constraints=\{f32\[([\d,]*)\][^\n]*?transpose_a = (true|false)")


_ATTENTION_CALL = re.compile(r"custom_call_target=\"(" + ATTENTION_TARGET + r"(?:_bias)?(?:_grad)?)\", "
                             r"operand_layout_constraints=\{f32\[([\d,]*)\](?:\{[\d,]*\})?, f32\[([\d,]*)\]")


def custom_call_flops(hlo_text: str) -> float:
  """FLOPs of the mfjax_cpu_gemm and fused attention calls in a compiled program's HLO text:
  XLA's cost analysis counts a custom call as nothing. The attention counts what the unfused
  core computes (forward 2, backward 4 matmuls), not the backward's recomputed logits."""
  flops = 0.0
  for out_dims, a_dims, transpose_a in _CUSTOM_CALL.findall(hlo_text):
    out = [int(d) for d in out_dims.split(",") if d]
    a = [int(d) for d in a_dims.split(",") if d]
    contracted = a[-2] if transpose_a == "true" else a[-1]
    flops += 2.0 * contracted * math.prod(out)
  for target, q_dims, k_dims in _ATTENTION_CALL.findall(hlo_text):
    q = [int(d) for d in q_dims.split(",") if d]
    matmuls = 4 if target.endswith("_grad") else 2
    flops += matmuls * 2.0 * math.prod(q) * int(k_dims.split(",")[-3])
  return flops

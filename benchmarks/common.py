"""Plumbing shared by the benchmarks: the machine, interleaved timing, the measured matmul peak,
FLOPs and memory of a compiled step, and the output (a Markdown table row and a JSON line)."""
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from typing import Callable

import numpy as np


KEEP_FREED_MEMORY = False


def prepare_process() -> None:
  """Call before importing jax: JAX must not preallocate the GPU, torch runs in the same process,
  and freed host memory stays in the process (mfjax/hostmem.py) as it does under the mfjax CLI."""
  global KEEP_FREED_MEMORY
  from mfjax import hostmem
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  KEEP_FREED_MEMORY = hostmem.keep_freed_memory()


def parse_args(parser, argv) -> tuple:
  """(args, config overrides): the parser's flags, and the --config.* flags that pass through to
  the trainer's config; any other flag is refused (exit 2) with its name."""
  args, extra = parser.parse_known_args(argv)
  bad = [e for e in extra if not e.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (only --config.* overrides pass through)")
  if hasattr(args, "torch"):
    args.torch_variants = [] if args.torch == "none" else args.torch.split(",")
    for v in args.torch_variants:
      if v not in ("eager", "compile"):
        parser.error(f"--torch: unknown variant {v!r}; valid: eager, compile, none")
  return args, extra


# --config fields that change how JAX computes a step, not what it computes: the torch reference
# runs without them and the ratio still compares the same work.
# The first three also change what XLA counts (remat recomputes, loops count once): train_step
# counts the model's FLOPs on the step compiled without them.
RECOUNTED = ("remat", "query_chunk", "scan_blocks")
RECOUNTED_OFF_CPU = RECOUNTED + ("attn_impl",)  # cuDNN's attention: a library call XLA counts as nothing
HOW_NOT_WHAT = RECOUNTED + ("attn_impl", "optim.mu_dtype", "mesh.")
NUM_BLOCKS = "model.overrides.num_blocks"


def error_text(e: BaseException, when: str = "") -> str:
  """An exception as one short line for a row's errors: its type (and `when`), its first line."""
  first = str(e).splitlines()[0] if str(e) else ""
  return f"{type(e).__name__}{' ' + when if when else ''}: {first}"[:300]


def check_torch_follows(parser, args, follows: tuple = ()) -> None:
  """Refuse a --config override that changes the network or its precision while the torch
  reference runs: torch would do other work and the JAX/torch ratio would compare different
  things. `follows`: the overrides this benchmark applies to the torch reference too."""
  for override in args.config_overrides:
    key = override.split("=", 1)[0][len("--config."):]
    if key == "model.dtype":
      parser.error(f"{override}: use --dtype, which sets the precision of both frameworks")
    if args.torch_variants and key not in follows and not any(f in key for f in HOW_NOT_WHAT):
      parser.error(f"{override}: the torch reference cannot follow it, so JAX / torch would compare different "
                   "work; add --torch none to measure JAX alone")


def torch_matmul_precision(device: str, dtype: str) -> None:
  """Float32 on a GPU: let torch use TF32, as XLA's default precision does for JAX's float32. And
  cuDNN picks its convolution algorithms by timing them, as XLA autotunes its own."""
  import torch
  if device == "cuda":
    torch.backends.cudnn.benchmark = True
  if device == "cuda" and dtype == "float32":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def config_override(overrides: list[str], key: str) -> str | None:
  """The value of `--config.KEY=VALUE` among `overrides` (the last one wins), or None."""
  values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == f"--config.{key}" and "=" in o]
  return values[-1] if values else None


def has_loop(compiled) -> bool:
  """Whether the compiled program holds a while loop: XLA's cost analysis counts a loop body once,
  not once per trip, so its FLOPs are then a lower bound (query chunking, FocalNet's depthwise
  kernel gradient)."""
  return re.search(r"\bwhile\(", compiled.as_text()) is not None


def fmt_mfu(value, exact: bool) -> str:
  """MFU as a percentage; "≥" when the FLOP count is a lower bound (see `has_loop`)."""
  return fmt(value, ".1%") if value is None or exact else "≥" + fmt(value, ".1%")


def cpu_model(cpuinfo: str | None = None) -> str:
  """The CPU's model name, with its family and model numbers when the name alone does not tell
  the generation (a VM's "AMD EPYC" is Zen 2 at family 23, Zen 4 at family 25 model 17): the
  hosts of this project's container changed between runs, and XLA's and torch's kernels differ
  per generation."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      return platform.processor() or platform.machine()
  fields = {}
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  name = fields.get("model name") or platform.processor() or platform.machine()
  if not any(ch.isdigit() for ch in name) and "cpu family" in fields:
    name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
  return name


def environment() -> dict:
  import jax
  import torch
  from mfjax import cpu_gemm
  device = jax.devices()[0]
  env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
         "cpu": cpu_model(), "cpu_count": cpu_cores(), "python": platform.python_version(),
         "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "keep_freed_memory": KEEP_FREED_MEMORY,
         "cpu_gemm": cpu_gemm.describe(), "load_average_start": round(os.getloadavg()[0], 2)}
  env["device"] = (f"{device.device_kind} x{jax.device_count()}" if device.platform != "cpu"
                   else f"CPU {env['cpu']}, {env['cpu_count']} cores")
  return env


def cpu_cores() -> int:
  """The cores this process may use (its affinity mask, which XLA follows; os.cpu_count() counts
  the machine's): torch's threads, so that neither framework is oversubscribed."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def torch_device() -> str:
  """The torch device matching JAX's default backend."""
  import jax
  import torch
  if jax.default_backend() == "gpu":
    if not torch.cuda.is_available():
      raise RuntimeError("JAX runs on the GPU but torch sees no CUDA device: install a CUDA build of torch")
    return "cuda"
  return "cpu"


def torch_sync(device: str) -> None:
  if device == "cuda":
    import torch
    torch.cuda.synchronize()


def interleave(fns: dict[str, Callable[[], None]], rounds: int, calls: dict[str, int],
               busy: dict[str, list[float]] | None = None, errors: dict | None = None) -> dict[str, list[float]]:
  """Seconds per call of each function, timed in turns (A B C A B C ...) so that a change in the
  machine's load hits all of them alike. Each timing runs `calls[name]` calls back to back; each
  function must return only when its work is done. One untimed round comes first: a function's
  first call after the others ran can pay for memory they left behind (a heap grown around their
  blocks, pages to fault in), which its own warm-up did not see. Given a `busy` dict, it also
  gets, per function and timing, the process's CPU seconds per wall second: how many cores the
  work kept busy (on a CPU device; a GPU run counts only the host threads). Given an `errors`
  dict, a function that fails (torch out of memory beside JAX's) is dropped with its error
  there, and the others' timings go on; without one, the error propagates."""
  times = {name: [] for name in fns}
  for round_index in range(rounds + 1):
    for name, fn in fns.items():
      if name not in times:  # failed in an earlier round
        continue
      start, cpu_start = time.perf_counter(), time.process_time()
      try:
        for _ in range(calls[name]):
          fn()
      except Exception as e:  # noqa: BLE001 - reported in the row, the other timings are kept
        if errors is None:
          raise
        errors[name] = error_text(e, "while timing")
        times.pop(name)
        continue
      if round_index:
        wall = time.perf_counter() - start
        times[name].append(wall / calls[name])
        if busy is not None:
          busy.setdefault(name, []).append((time.process_time() - cpu_start) / wall)
  return times


def warm_up(fn: Callable[[], None], steps: int, min_seconds: float, name: str = "") -> int:
  """Run `fn` `steps` times untimed (at least once); return how many calls make one timing of at
  least `min_seconds`, judged from the last warm-up call (1 for slow steps). With `name`, the last
  call's time goes to stderr at once: a run stopped at its time limit (the GPU suite's caps)
  still leaves each side's step time in its log."""
  for _ in range(max(steps, 1)):
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
  if name:
    progress(f"{name}: one call {once:.4f} s after warm-up")
  return max(1, int(np.ceil(min_seconds / max(once, 1e-6))))


def progress(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def summary(seconds: list[float]) -> dict:
  return {"median_s": float(np.median(seconds)), "min_s": float(np.min(seconds)),
          "max_s": float(np.max(seconds)), "timings": len(seconds)}


def matmul_peak_fns(dtype: str = "float32") -> tuple[dict, float]:
  """Two timing functions, a large square matmul in JAX and in torch, and the FLOPs of one call.

  They join the interleaved timings of a benchmark, so the device's matmul rate is measured
  under the same load as the steps; the fastest timing of the two is the denominator of MFU.
  JAX's accumulates in float32 (`preferred_element_type`), the form mfjax's bf16 layers use on
  CPU, where a bf16-result dot runs at about half the rate.
  """
  import jax
  import jax.numpy as jnp
  import torch
  gpu = jax.default_backend() == "gpu"
  n, reps = (8192, 20) if gpu else (2048, 1)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  device = torch_device()
  ta = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
  tb = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))

  def jax_fn():
    for _ in range(reps):
      out = matmul(a, b)
    out.block_until_ready()

  def torch_fn():
    for _ in range(reps):
      torch.matmul(ta, tb)
    torch_sync(device)

  return {"matmul_jax": jax_fn, "matmul_torch": torch_fn}, reps * 2.0 * n ** 3


def matmul_peak(times: dict, flops_per_call: float, dtype: str) -> dict:
  """The device's peak: the fastest timing of either framework's matmul (a peak, not a typical rate)."""
  rates = {k: flops_per_call / float(np.min(times[k])) for k in ("matmul_jax", "matmul_torch") if times.get(k)}
  if not rates:
    raise RuntimeError("neither matmul of the peak measurement ran")
  return {"dtype": dtype, "jax_flops_per_s": rates.get("matmul_jax"), "torch_flops_per_s": rates.get("matmul_torch"),
          "peak_flops_per_s": max(rates.values())}


def time_with_peak(fns: dict, calls: dict, rounds: int, dtype: str, errors: dict | None = None
                   ) -> tuple[dict, dict, dict]:
  """Time `fns` in turns together with a large matmul in each framework (the measured peak, for
  MFU); the matmuls' calls per timing (at least half a second each) are added to `calls`.
  Returns (all timings, median seconds of each of `fns` that ran, the peak)."""
  matmuls, matmul_flops = matmul_peak_fns(dtype)
  for name, fn in matmuls.items():
    calls[name] = warm_up(fn, 2, 0.5)
  times = interleave({**fns, **matmuls}, rounds, calls, errors=errors)
  peak = matmul_peak(times, matmul_flops, dtype)
  median = {name: summary(t)["median_s"] for name, t in times.items() if name in fns and t}
  return times, median, peak


def program_devices(compiled) -> int:
  """How many devices a compiled JAX computation runs on: those its inputs are placed on."""
  import jax
  devices = set()
  for sharding in jax.tree_util.tree_leaves(compiled.input_shardings):
    devices |= set(sharding.device_set)
  return max(1, len(devices))


def counts_lowered() -> bool:
  """Whether FLOPs are counted on the lowered program (GPU, TPU; MFJAX_BENCH_FLOPS=lowered|compiled
  decides): there XLA turns dots into cuBLAS calls whose cost its analysis may count as nothing."""
  import jax
  forced = os.environ.get("MFJAX_BENCH_FLOPS", "")
  return forced in ("lowered", "host") if forced else jax.default_backend() != "cpu"


def cost_flops(compiled, lowered=None) -> float | None:
  """FLOPs of one call of a compiled JAX computation, as XLA counts them, on all its devices
  together. On the CPU, counted on the compiled program: XLA counts one device's share of an
  SPMD-partitioned program (half of the step on a 2-device data-parallel mesh), so the count is
  multiplied by `program_devices`, and it counts a custom call as nothing, so the MKL GEMMs and
  fused attention of `mfjax.cpu_gemm` are added from the program's text. On a GPU or TPU
  (`counts_lowered`), counted on `lowered`, the whole program before XLA partitions it or turns its
  dots into library calls (cuDNN attention is a library call already there: `RECOUNTED_OFF_CPU`)."""
  from mfjax import cpu_gemm
  if lowered is not None and counts_lowered():
    # A backend behind the PJRT C API (the CUDA plugin) has no Lowered.cost_analysis(): None. The
    # host's XLA counts the same program instead (MFJAX_BENCH_FLOPS=host: that way on any backend).
    cost = None if os.environ.get("MFJAX_BENCH_FLOPS") == "host" else lowered.cost_analysis()
    cost = cost or host_cost_analysis(lowered)
    return float(cost["flops"]) if cost and "flops" in cost else None
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  flops = float(cost["flops"]) + cpu_gemm.custom_call_flops(compiled.as_text())
  return flops * program_devices(compiled)


def host_cost_analysis(lowered) -> dict | None:
  """XLA's cost analysis of a lowered program by the CPU backend's compiler library (JAX's own
  Lowered.cost_analysis, for backends that lack it); None, with the reason, where this JAX differs."""
  try:
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    return _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), lowered._lowering.hlo().as_hlo_module())
  except Exception as e:  # private API: a later JAX may move it
    progress(f"no FLOP count: the host's cost analysis failed ({error_text(e)})")
    return None


def mesh_peak(peak: dict, devices: int) -> float:
  """The peak FLOP/s of `devices` devices, from the peak measured on one: accelerators add up;
  CPU devices (--xla_force_host_platform_device_count) share one host's cores, whose peak the
  one-device matmul already measures."""
  import jax
  return peak["peak_flops_per_s"] * (1 if jax.default_backend() == "cpu" else devices)


def jax_memory(compiled) -> dict:
  """XLA's static memory plan of a compiled computation (bytes, per device)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, k + "_in_bytes")) for k in ("argument_size", "output_size", "alias_size", "temp_size")
         if hasattr(m, k + "_in_bytes")}
  if len(out) == 4:
    out["peak_plan"] = out["argument_size"] + out["output_size"] - out["alias_size"] + out["temp_size"]
  return out


def jax_device_peak_bytes() -> int | None:
  """Peak bytes in use on the first device since the process started (GPU/TPU; None on CPU)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def throughput_fields(median: dict, batch: int) -> dict:
  """The rows' images/s of JAX, torch eager and torch.compile (from median seconds per step) and
  JAX's ratio to each torch variant ("n/a" for one that did not run)."""
  img_s = lambda name: batch / median[name] if name in median else None
  ratio = lambda name: fmt(img_s("jax") / img_s(name)) if name in median and "jax" in median else "n/a"
  return {"jax_img_s": fmt(img_s("jax")), "torch_eager_img_s": fmt(img_s("torch_eager")),
          "torch_compile_img_s": fmt(img_s("torch_compile")), "ratio_eager": ratio("torch_eager"),
          "ratio_compile": ratio("torch_compile")}


def jax_stepper(compiled, state, *inputs) -> Callable[[], None]:
  """A no-argument function that runs one compiled train step on the state it returned last
  (the state is donated) and returns when the step is done."""
  import jax
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], *inputs)
    jax.block_until_ready((holder["state"], metrics))
  return step


def jax_peak_memory() -> int | None:
  """The JAX side's peak memory so far: the device's peak on GPU/TPU, the process's peak RSS on CPU."""
  import jax
  return peak_rss_bytes() if jax.default_backend() == "cpu" else jax_device_peak_bytes()


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def gib(n) -> str:
  return "" if n is None else f"{n / 2 ** 30:.2f}"


def fmt(value, spec: str = ".2f") -> str:
  if value is None:
    return "n/a"
  if isinstance(value, str):
    return value
  return format(value, spec)


def with_devices(module: str, devices: int, argv: list[str]) -> bool:
  """Whether this process is the child that runs on `devices` simulated CPU devices: without that
  many devices, `python -m module argv` runs again with
  XLA_FLAGS=--xla_force_host_platform_device_count=`devices`, and this process exits with its status."""
  marker = "MFJAX_SIMULATED_DEVICES_CHILD"
  if os.environ.get(marker) == "1":
    return True
  import jax
  if jax.device_count() >= devices:
    return False
  flag = f"--xla_force_host_platform_device_count={devices}"
  env = {**os.environ, marker: "1", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()}
  sys.exit(subprocess.run([sys.executable, "-m", module, *argv], env=env).returncode)


def emit(rows: dict | list[dict], columns: list[tuple[str, str]], out: str | None) -> None:
  """Print a Markdown table of `row[key]` for (header, key) in `columns`, one line per row, then
  each whole row as a JSON line; append the JSON lines to `out` if given."""
  rows = [rows] if isinstance(rows, dict) else rows
  print()
  print("| " + " | ".join(h for h, _ in columns) + " |")
  print("|" + "---|" * len(columns))
  for row in rows:
    print("| " + " | ".join(str(row.get(k, "")) for _, k in columns) + " |")
  lines = [json.dumps(row, sort_keys=True, default=float) for row in rows]
  print("\n".join(lines), flush=True)
  if out:
    with open(out, "a") as f:
      f.write("".join(line + "\n" for line in lines))

r"""Train-step throughput, compile time, memory and MFU of mfjax next to its PyTorch reference,
measured on the same machine in the same run.

  PYTHONPATH=. python -m benchmarks.train_step --model deit_base_patch16 --protocol unfrozen_linear \
      --res 224 --batch 8 [--dtype bfloat16] [--torch eager,compile] [--config.model.remat=True ...]

JAX: the trainer's own step, `mfjax.train.fit.prepare(config)` on configs/paper.py (AdamW, grad
clipping 1.0, the protocol's frozen/trained split, buffer donation), fed a device-resident random
batch so that the input pipeline is not measured (benchmarks/input_bound.py measures that).
Any `--config.*` flag is passed to the config, e.g. `--config.model.remat=True`.
PyTorch: the reference model of benchmarks/torch_reference.py with the same head and protocol,
cross-entropy, clip_grad_norm_(1.0) and AdamW; eager and, with `--torch eager,compile`,
torch.compile; under bf16 autocast when --dtype bfloat16. On a GPU in float32 both use TF32
matmuls (JAX's default precision there).

Timing: warm-up steps are not timed, nor is a first round in turns; then the variants are timed
in turns (JAX, torch eager, torch.compile, JAX, ...) for --rounds rounds, each timing at least
--min-seconds long, and the median is reported (min and max in the JSON). Reported FLOPs are
XLA's count for the compiled step (`cost_analysis`), cross-checked against 3x the compiled
forward and against torch's FlopCounterMode on the reference step. MFU = step FLOPs / step time
/ the matmul rate measured in this run (the better of a large jnp and torch matmul). JAX runs on
every device of the trainer's mesh and torch on one: on a multi-GPU host set
CUDA_VISIBLE_DEVICES=0 for a one-device comparison. With N devices the step FLOPs are XLA's
per-device count times N and JAX's MFU is against N times the one-device peak (CPU devices
simulated by --xla_force_host_platform_device_count share the host's cores and its peak). Memory: on
GPU the peak device memory of each framework; on CPU XLA's memory plan for the step and each
framework's peak RSS (torch's in a child process, so that the two do not mix).
"""
import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("model", "model"), ("protocol", "protocol"), ("res", "res"),
           ("batch", "batch"), ("dtype", "dtype"), ("JAX devices", "jax_devices"), ("JAX img/s", "jax_img_s"),
           ("torch eager img/s", "torch_eager_img_s"), ("JAX / eager", "ratio_eager"),
           ("torch.compile img/s", "torch_compile_img_s"), ("JAX / compile", "ratio_compile"),
           ("JAX compile s", "jax_compile_s"), ("torch.compile s", "torch_compile_s"),
           ("GFLOP/img", "gflop_per_img"), ("MFU JAX", "mfu_jax"), ("MFU torch", "mfu_torch_eager"),
           ("peak GFLOP/s", "peak_gflop_s"), ("JAX mem GiB", "jax_mem_gib"), ("torch mem GiB", "torch_mem_gib"),
           ("load", "load_average")]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="deit_base_patch16")
  parser.add_argument("--protocol", default="unfrozen_linear")
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--unfreeze-from", type=int, default=None,
                      help="progressive: blocks/stages >= this train (default: the second half)")
  parser.add_argument("--keep-blocks", type=int, default=None,
                      help="decapitation: blocks/stages kept (default: the first half)")
  parser.add_argument("--decapitation-trained", action="store_true")
  parser.add_argument("--torch", default="eager", help="comma list of eager, compile; or none")
  parser.add_argument("--rounds", type=int, default=5, help="timings per variant, taken in turns")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant (torch: at least 2)")
  parser.add_argument("--min-seconds", type=float, default=1.0, help="shortest single timing (steps repeat)")
  parser.add_argument("--no-rss", action="store_true", help="CPU: skip torch's peak RSS child process")
  parser.add_argument("--out", default=None, help="append the JSON row to this file")
  parser.add_argument("--torch-rss-only", action="store_true", help=argparse.SUPPRESS)
  args, extra = common.parse_args(parser, argv)
  args.config_overrides = extra
  common.check_torch_follows(parser, args, follows=(common.NUM_BLOCKS,))
  from mfjax.train import protocols
  half = protocols.block_count(args.model) // 2
  args.unfreeze_from = half if args.unfreeze_from is None else args.unfreeze_from
  args.keep_blocks = half if args.keep_blocks is None else args.keep_blocks
  return args


def protocol_overrides(args) -> list[str]:
  out = [f"--config.model.dtype={args.dtype}"]
  if args.protocol == "progressive":
    out.append(f"--config.protocol.unfreeze_from={args.unfreeze_from}")
  if args.protocol == "decapitation":
    out += [f"--config.protocol.keep_blocks={args.keep_blocks}",
            f"--config.protocol.decapitation_trained={args.decapitation_trained}"]
  return out


def torch_model(args, device):
  import torch
  from benchmarks import torch_reference
  common.torch_matmul_precision(device, args.dtype)
  torch.manual_seed(0)
  num_blocks = common.config_override(args.config_overrides, common.NUM_BLOCKS)
  model, what = torch_reference.classifier(
      args.model, args.res, 5, args.protocol, args.unfreeze_from, args.keep_blocks, args.decapitation_trained,
      num_blocks=int(num_blocks) if num_blocks else None)
  model = model.to(device)
  images = torch.randn(args.batch, 3, args.res, args.res, device=device)
  labels = torch.randint(0, 5, (args.batch,), device=device)
  return model, what, images, labels


def torch_rss_only(args):
  """Child process: peak RSS of the torch eager reference step (CPU)."""
  import torch
  from benchmarks import torch_reference
  torch.set_num_threads(common.cpu_cores())
  model, _, images, labels = torch_model(args, "cpu")
  step, _ = torch_reference.train_step(model, images, labels, "cpu", bf16=args.dtype == "bfloat16")
  step()
  print(json.dumps({"torch_peak_rss": common.peak_rss_bytes()}))


def model_flops(args, run, state, compiled, batch, lr) -> tuple:
  """(step FLOPs, forward FLOPs, whether exact, what was counted). The model's FLOPs: with remat or
  query chunking, those of the same step compiled without them (remat's recomputation is not the
  model's work, and XLA counts a chunking loop's body once); a lower bound where a loop remains.
  `state`: the run's (abstract) train state. Called after the memory is read: the plain step's
  own state would count in the device's peak."""
  from benchmarks import jax_side
  from mfjax.train import fit
  lowered_only = common.counts_lowered()  # a GPU or TPU: no compile needed to count
  recounted = common.RECOUNTED_OFF_CPU if lowered_only else common.RECOUNTED
  how = [o for o in args.config_overrides if any(f in o.split("=", 1)[0] for f in recounted)]
  lowered = None
  if how:
    plain = jax_side.paper_config(args.model, args.protocol, args.res, args.batch, protocol_overrides(args)
                                  + [o for o in args.config_overrides if o not in how])
    run = fit.prepare(plain)
    state = run.state
    lowered = run.train_step.lower(state, batch, lr)
    compiled = None if lowered_only else lowered.compile()
  elif lowered_only:
    lowered = run.train_step.lower(state, batch, lr)
  forward = jax_side.forward_fn(run).lower(state["trainable"], state["frozen"], state["batch_stats"], batch["image"])
  fwd_compiled = None if lowered_only else forward.compile()
  exact = not (common.has_loop(compiled) if compiled is not None else "stablehlo.while" in lowered.as_text())
  return (common.cost_flops(compiled, lowered), common.cost_flops(fwd_compiled, forward), exact,
          "the step without " + ", ".join(how) if how else "the step")


def main(argv=None):
  args = parse_args(argv)
  if args.torch_rss_only:
    return torch_rss_only(args)
  import jax
  import jax.numpy as jnp
  from benchmarks import jax_side
  from mfjax.train import fit

  load_start = os.getloadavg()[0]
  config = jax_side.paper_config(args.model, args.protocol, args.res, args.batch,
                                 protocol_overrides(args) + args.config_overrides)
  run = fit.prepare(config)
  batch = jax_side.random_batch(run, args.batch, args.res)
  lr = jnp.float32(1e-4)
  state = run.state
  t0 = time.perf_counter()
  compiled = run.train_step.lower(state, batch, lr).compile()
  jax_compile_s = time.perf_counter() - t0
  common.progress(f"jax: compiled in {jax_compile_s:.1f} s")
  abstract_state = fit.abstract_of(state)  # the state itself is donated to the steps
  jax_plan = common.jax_memory(compiled)
  sizes = jax_side.state_bytes(state)

  jax_step = common.jax_stepper(compiled, state, batch, lr)
  calls = {"jax": common.warm_up(jax_step, args.warmup, args.min_seconds, "jax")}
  jax_mem = common.jax_peak_memory()

  import torch
  from benchmarks import torch_reference
  device = common.torch_device()
  if device == "cpu":
    torch.set_num_threads(common.cpu_cores())
  env = common.environment()
  fns, compile_seconds, errors, torch_info = {"jax": jax_step}, {}, {}, {}
  torch_flops, torch_mem = None, None
  if args.torch_variants:
    model, what, images, labels = torch_model(args, device)
    torch_info["torch_reference"] = what
    for variant in args.torch_variants:
      name = f"torch_{variant}"
      try:
        step, opt_kind = torch_reference.train_step(model, images, labels, device, bf16=args.dtype == "bfloat16",
                                                    compile_model=variant == "compile")
        torch_info["torch_optimizer"] = opt_kind
        t0 = time.perf_counter()
        if variant == "eager":
          torch_flops = torch_reference.count_flops(step)  # the first (untimed) step, counted
        else:
          step()
        first = time.perf_counter() - t0
        common.progress(f"{name}: first step (with any compile) {first:.1f} s")
        t0 = time.perf_counter()
        calls[name] = common.warm_up(step, max(args.warmup - 1, 1), args.min_seconds, name)
        if device == "cuda" and torch_mem is None:  # the first variant's own peak: each holds its optimizer state
          torch_mem = torch.cuda.max_memory_allocated()
        if variant == "compile":
          compile_seconds["compile"] = first - (time.perf_counter() - t0) / max(args.warmup - 1, 1)
        fns[name] = step
      except Exception as e:  # torch.compile does not work everywhere; report why and go on
        errors[name] = common.error_text(e)
    if device != "cuda" and not args.no_rss and "torch_eager" in fns:
      child = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--torch-rss-only",
                              *(argv if argv is not None else sys.argv[1:])],
                             capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
      if child.returncode == 0:
        torch_mem = json.loads(child.stdout.strip().splitlines()[-1])["torch_peak_rss"]
      else:
        errors["torch_rss"] = child.stderr.strip().splitlines()[-1][:300] if child.stderr.strip() else "failed"

  times, median, peak = common.time_with_peak(fns, calls, args.rounds, args.dtype, errors)
  fns.clear()  # torch's model and optimizer go before a plain step's state may be built for the FLOP count
  model = images = labels = step = None  # noqa: F841  (`step` holds torch's model, optimizer and gradients)
  if device == "cuda":
    import gc
    gc.collect()
    torch.cuda.empty_cache()
  step_flops, fwd_flops, flops_exact, flops_of = model_flops(args, run, abstract_state, compiled, batch, lr)

  jax_devices = common.program_devices(compiled)
  # JAX runs on every device of the mesh, torch on one.
  peaks = {name: common.mesh_peak(peak, jax_devices if name == "jax" else 1) for name in median}
  mfu = lambda name: step_flops / median[name] / peaks[name] if name in median and step_flops else None
  row = {
      "benchmark": "train_step", "device": env["device"], "model": args.model, "protocol": args.protocol,
      "res": args.res, "batch": args.batch, "dtype": args.dtype,
      **common.throughput_fields(median, args.batch),
      "jax_compile_s": common.fmt(jax_compile_s, ".1f"), "torch_compile_s": common.fmt(compile_seconds.get("compile"), ".1f"),
      "gflop_per_img": common.fmt(step_flops / args.batch / 1e9 if step_flops else None, ".1f"),
      "mfu_jax": common.fmt_mfu(mfu("jax"), flops_exact),
      "mfu_torch_eager": common.fmt_mfu(mfu("torch_eager"), flops_exact),
      "mfu_torch_compile": common.fmt_mfu(mfu("torch_compile"), flops_exact),
      "peak_gflop_s": common.fmt(peak["peak_flops_per_s"] / 1e9, ".0f"), "jax_devices": jax_devices,
      "jax_mem_gib": common.gib(jax_mem), "torch_mem_gib": common.gib(torch_mem) or "n/a",
      "jax_mem_kind": "device peak" if jax.default_backend() != "cpu" else "peak RSS",
      "torch_mem_kind": "device peak" if device == "cuda" else "peak RSS",
      "load_average": f"{load_start:.1f}-{os.getloadavg()[0]:.1f}",
      # Everything else, for the JSON record.
      "timings_s": {name: common.summary(t) for name, t in times.items()}, "calls_per_timing": calls,
      "step_flops_xla": step_flops, "forward_flops_xla": fwd_flops, "flops_exact": flops_exact,
      "flops_counted_on": flops_of,
      "step_over_forward_flops": step_flops / fwd_flops if step_flops and fwd_flops else None,
      "step_flops_torch_counter": torch_flops, "matmul_peak": peak, "jax_memory_plan": jax_plan,
      "state_bytes": sizes, "params_trained": run.n_trainable, "params_total": run.n_total,
      "config_overrides": args.config_overrides, "command": "python -m benchmarks.train_step " + " ".join(
          argv if argv is not None else sys.argv[1:]),
      "errors": errors, **torch_info, **env,
  }
  common.emit(row, COLUMNS, args.out)
  return row


if __name__ == "__main__":
  main()

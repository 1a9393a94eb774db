r"""Inference throughput of mfjax next to its PyTorch reference, measured in the same run.

  PYTHONPATH=. python -m benchmarks.inference --model dinov2_vitb14 --res 518 --batch 16 \
      [--dtype bfloat16] [--torch eager,compile]

JAX: the trainer's classifier (built by `fit.prepare` from configs/paper.py) in inference mode,
jitted, on a device-resident random batch. PyTorch: the same reference classifier as
benchmarks/train_step.py in eval() under inference_mode (bf16 autocast with --dtype bfloat16).
Timed in turns with a large matmul in each framework (the measured peak, for MFU); medians.
JAX runs on every device of the mesh, torch on one; FLOPs and MFU count the devices as
benchmarks/train_step.py does.
"""
import argparse
import os
import sys
import time

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("model", "model"), ("res", "res"), ("batch", "batch"), ("dtype", "dtype"),
           ("JAX devices", "jax_devices"), ("JAX img/s", "jax_img_s"), ("torch eager img/s", "torch_eager_img_s"),
           ("JAX / eager", "ratio_eager"),
           ("torch.compile img/s", "torch_compile_img_s"), ("JAX / compile", "ratio_compile"),
           ("JAX compile s", "jax_compile_s"), ("GFLOP/img", "gflop_per_img"), ("MFU JAX", "mfu_jax"),
           ("MFU torch", "mfu_torch_eager"), ("peak GFLOP/s", "peak_gflop_s"), ("JAX mem GiB", "jax_mem_gib"),
           ("torch mem GiB", "torch_mem_gib"), ("load", "load_average")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="deit_base_patch16")
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--torch", default="eager", help="comma list of eager, compile; or none")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--min-seconds", type=float, default=1.0)
  parser.add_argument("--out", default=None)
  args, extra = common.parse_args(parser, argv)
  args.config_overrides = extra
  common.check_torch_follows(parser, args, follows=(common.NUM_BLOCKS,))

  import jax
  from benchmarks import jax_side
  from mfjax.train import fit

  load_start = os.getloadavg()[0]
  config = jax_side.paper_config(args.model, "frozen_linear", args.res, args.batch,
                                 [f"--config.model.dtype={args.dtype}", *extra])
  run = fit.prepare(config)
  images = jax_side.random_batch(run, args.batch, args.res)["image"]
  params = (run.state["trainable"], run.state["frozen"], run.state["batch_stats"])
  forward = jax_side.forward_fn(run)
  t0 = time.perf_counter()
  lowered = forward.lower(*params, images)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops, exact = common.cost_flops(compiled, lowered), not common.has_loop(compiled)
  fns = {"jax": lambda: compiled(*params, images).block_until_ready()}
  calls = {"jax": common.warm_up(fns["jax"], 1, args.min_seconds)}
  jax_mem, torch_mem = common.jax_peak_memory(), None

  import torch
  from benchmarks import torch_reference
  device = common.torch_device()
  if device == "cpu":
    torch.set_num_threads(common.cpu_cores())
  common.torch_matmul_precision(device, args.dtype)
  env = common.environment()
  errors, what = {}, None
  if args.torch_variants:
    torch.manual_seed(0)
    num_blocks = common.config_override(extra, common.NUM_BLOCKS)
    model, what = torch_reference.classifier(args.model, args.res, run.spec.num_classes, "frozen_linear",
                                             num_blocks=int(num_blocks) if num_blocks else None)
    model = model.to(device)
    timages = torch.randn(args.batch, 3, args.res, args.res, device=device)
    for variant in args.torch_variants:
      name = f"torch_{variant}"
      try:
        step = torch_reference.inference_step(model, timages, device, bf16=args.dtype == "bfloat16",
                                              compile_model=variant == "compile")
        calls[name] = common.warm_up(step, 2, args.min_seconds)
        fns[name] = step
        if device == "cuda" and torch_mem is None:
          torch_mem = torch.cuda.max_memory_allocated()
      except Exception as e:  # torch.compile does not work everywhere; report why and go on
        errors[name] = common.error_text(e)

  times, median, peak = common.time_with_peak(fns, calls, args.rounds, args.dtype, errors)
  jax_devices = common.program_devices(compiled)
  # JAX runs on every device of the mesh, torch on one.
  peaks = {name: common.mesh_peak(peak, jax_devices if name == "jax" else 1) for name in median}
  mfu = lambda name: flops / median[name] / peaks[name] if name in median and flops else None
  on_device = jax.default_backend() != "cpu"
  row = {"benchmark": "inference", "device": env["device"], "model": args.model, "res": args.res,
         "batch": args.batch, "dtype": args.dtype, **common.throughput_fields(median, args.batch),
         "jax_compile_s": common.fmt(compile_s, ".1f"),
         "jax_mem_gib": common.gib(jax_mem), "torch_mem_gib": common.gib(torch_mem) or "n/a",
         "jax_mem_kind": "device peak" if on_device else "peak RSS (before torch ran)",
         "gflop_per_img": common.fmt(flops / args.batch / 1e9 if flops else None, ".1f"),
         "mfu_jax": common.fmt_mfu(mfu("jax"), exact), "mfu_torch_eager": common.fmt_mfu(mfu("torch_eager"), exact),
         "mfu_torch_compile": common.fmt_mfu(mfu("torch_compile"), exact), "flops_exact": exact,
         "peak_gflop_s": common.fmt(peak["peak_flops_per_s"] / 1e9, ".0f"), "jax_devices": jax_devices,
         "load_average": f"{load_start:.1f}-{os.getloadavg()[0]:.1f}",
         "timings_s": {name: common.summary(t) for name, t in times.items()}, "calls_per_timing": calls,
         "forward_flops_xla": flops, "matmul_peak": peak, "jax_memory_plan": common.jax_memory(compiled),
         "torch_reference": what, "errors": errors, "config_overrides": extra,
         "command": "python -m benchmarks.inference " + " ".join(argv if argv is not None else sys.argv[1:]),
         **env}
  common.emit(row, COLUMNS, args.out)
  return row


if __name__ == "__main__":
  main()

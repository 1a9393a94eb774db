r"""MedDINOv3 segmentation train step: `mfjax segment`'s own step next to the PyTorch reference
(timm DINOv3 + MedDINOv3's PatchDecode, benchmarks/torch_reference.py), same machine, same run.

  PYTHONPATH=. python -m benchmarks.segment_step --patch 512 --batch 2 [--dtype bfloat16] \
      [--torch eager,compile] [--config.model.remat=True ...]

Both steps: one-channel patches repeated to three, blocks 2/5/8/11 through the final norm,
the 4-stage decoder to full-resolution logits of --classes classes, nnU-Net's Dice + CE, gradient
clipping at 12, AdamW with two learning rates and weight decay on everything. JAX: the state,
step and sharding of `mfjax.train.segment.prepare`; random device-resident batches, so the data
pipeline is not measured. Timing and MFU as in benchmarks/train_step.py (turns, medians, the
matmul peak measured in the same run). Memory: on GPU each framework's device peak; on CPU XLA's
memory plan and the process's peak RSS after JAX's step (torch's is not separated here).
"""
import argparse
import os
import sys
import time

import numpy as np

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("model", "model"), ("patch", "patch"), ("batch", "batch"), ("dtype", "dtype"),
           ("JAX img/s", "jax_img_s"), ("torch eager img/s", "torch_eager_img_s"), ("JAX / eager", "ratio_eager"),
           ("torch.compile img/s", "torch_compile_img_s"), ("JAX / compile", "ratio_compile"),
           ("JAX compile s", "jax_compile_s"), ("GFLOP/img", "gflop_per_img"), ("MFU JAX", "mfu_jax"),
           ("MFU torch", "mfu_torch_eager"), ("JAX devices", "jax_devices"), ("JAX plan GiB", "jax_plan_gib"),
           ("JAX mem GiB", "jax_mem_gib"),
           ("torch mem GiB", "torch_mem_gib"), ("load", "load_average")]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="meddinov3_vitb16", choices=["meddinov3_vitb16", "dinov3_vitb16"])
  parser.add_argument("--patch", type=int, default=512)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--classes", type=int, default=16, help="AMOS22: 15 organs + background")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--torch", default="eager", help="comma list of eager, compile; or none")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--min-seconds", type=float, default=1.0)
  parser.add_argument("--out", default=None, help="append the JSON row to this file")
  args, extra = common.parse_args(parser, argv)
  args.config_overrides = extra
  common.check_torch_follows(parser, args, follows=(common.NUM_BLOCKS, "model.interaction_indices"))
  return args


def main(argv=None):
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import torch
  from benchmarks import jax_side, torch_reference
  from mfjax import parallel
  from mfjax.cli import load_config
  from mfjax.train import segment

  load_start = os.getloadavg()[0]
  config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                    f"segment.py:model={args.model},patch={args.patch},batch={args.batch}"),
                       [f"--config.model.dtype={args.dtype}", *jax_side.MATMUL_AS_TORCH, *args.config_overrides])
  mesh = parallel.make_mesh()
  _, state, train_step = segment.prepare(config, args.classes, mesh)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, args.patch, args.patch, 1)).astype(np.float32)
  labels = rng.integers(0, args.classes, (args.batch, args.patch, args.patch)).astype(np.int32)
  sharding = parallel.batch_sharding(mesh)
  batch = {"image": jax.device_put(images, sharding), "label": jax.device_put(labels, sharding)}
  scale = jnp.float32(1.0)
  t0 = time.perf_counter()
  lowered = train_step.lower(state, batch, scale)
  compiled = lowered.compile()
  jax_compile_s = time.perf_counter() - t0
  common.progress(f"jax: compiled in {jax_compile_s:.1f} s")
  step_flops, plan = common.cost_flops(compiled, lowered), common.jax_memory(compiled)
  flops_exact = not common.has_loop(compiled)
  # Counted on the step as compiled (as lowered on a GPU or TPU): with remat, its recomputation is included
  # (see BENCHMARKS.md).
  jax_step = common.jax_stepper(compiled, state, batch, scale)
  calls = {"jax": common.warm_up(jax_step, args.warmup, args.min_seconds, "jax")}
  jax_mem = common.jax_peak_memory()

  device = common.torch_device()
  if device == "cpu":
    torch.set_num_threads(common.cpu_cores())
  common.torch_matmul_precision(device, args.dtype)
  fns, errors, torch_flops, torch_mem = {"jax": jax_step}, {}, None, None
  if args.torch_variants:
    torch.manual_seed(0)
    # The JAX network's blocks: those the decoder reads, of a backbone cut at num_blocks if given.
    model = torch_reference.Segmenter(args.model, args.classes, indices=tuple(config.model.interaction_indices),
                                      depth=config.model.overrides.get("num_blocks")).to(device)
    t_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    t_labels = torch.from_numpy(labels).long().to(device)
    for variant in args.torch_variants:
      name = f"torch_{variant}"
      try:
        step, _ = torch_reference.train_step(model, t_images, t_labels, device, bf16=args.dtype == "bfloat16",
                                             compile_model=variant == "compile", clip_norm=12.0,
                                             loss_fn=torch_reference.dice_ce_loss,
                                             optimizer=torch_reference.segment_optimizer(model))
        if variant == "eager":
          torch_flops = torch_reference.count_flops(step)
        calls[name] = common.warm_up(step, args.warmup, args.min_seconds, name)
        fns[name] = step
        if device == "cuda" and torch_mem is None:  # the first variant's own peak: each holds its optimizer state
          torch_mem = torch.cuda.max_memory_allocated()
      except Exception as e:  # torch.compile does not work everywhere; report why and go on
        errors[name] = common.error_text(e)

  times, median, peak = common.time_with_peak(fns, calls, args.rounds, args.dtype, errors)
  jax_devices = common.program_devices(compiled)
  # JAX runs on every device of the mesh, torch on one.
  peaks = {name: common.mesh_peak(peak, jax_devices if name == "jax" else 1) for name in median}
  mfu = lambda name: step_flops / median[name] / peaks[name] if name in median and step_flops else None
  env = common.environment()
  row = {
      "benchmark": "segment_step", "device": env["device"], "model": args.model, "patch": args.patch,
      "batch": args.batch, "dtype": args.dtype, "classes": args.classes,
      **common.throughput_fields(median, args.batch),
      "jax_compile_s": common.fmt(jax_compile_s, ".1f"),
      "gflop_per_img": common.fmt(step_flops / args.batch / 1e9 if step_flops else None, ".1f"),
      "mfu_jax": common.fmt_mfu(mfu("jax"), flops_exact),
      "mfu_torch_eager": common.fmt_mfu(mfu("torch_eager"), flops_exact), "jax_devices": jax_devices,
      "flops_exact": flops_exact, "jax_plan_gib": common.gib(plan.get("peak_plan")),
      "jax_mem_gib": common.gib(jax_mem), "torch_mem_gib": common.gib(torch_mem) or "n/a",
      "load_average": f"{load_start:.1f}-{os.getloadavg()[0]:.1f}",
      "timings_s": {name: common.summary(t) for name, t in times.items()}, "calls_per_timing": calls,
      "step_flops_xla": step_flops, "step_flops_torch_counter": torch_flops, "matmul_peak": peak,
      "jax_memory_plan": plan, "config_overrides": args.config_overrides,
      "command": "python -m benchmarks.segment_step " + " ".join(argv if argv is not None else sys.argv[1:]),
      "errors": errors, **env,
  }
  common.emit(row, COLUMNS, args.out)
  return row


if __name__ == "__main__":
  main()

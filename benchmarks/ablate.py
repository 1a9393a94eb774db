r"""What one change does to the JAX train step: several variants of the same cell, timed in turns
in one process next to the torch eager reference, so that every variant sees the same load.

  PYTHONPATH=. python -m benchmarks.ablate --model deit_base_patch16 --res 224 --batch 8 \
      --variant base= \
      --variant attn_xla=--config.model.overrides.attn_impl=xla \
      --variant remat=--config.model.remat=True

A variant is NAME=OVERRIDES, the overrides being --config.* flags separated by spaces (empty: the
config as it is), and optionally the word `no-donation`: the trainer's step jitted again without
donating the train state (what buffer donation saves). Variants that need a different process (XLA_FLAGS, thread counts) are measured
by running benchmarks/train_step.py once per setting: its JAX/torch ratio is taken in one run.
Reports, per variant: median step time, images/s, speed relative to the first variant and to
torch eager (float32, TF32 on a GPU; --torch-dtype bfloat16 for autocast), compile time, XLA's
temp memory for the step, and the loss after two steps from the same initial state, which must
agree across variants that compute the same function. A variant that fails gets a row with its
error; the others are still measured. --compile-only stops after compiling: compile time and
XLA's memory plan (for sizes whose steps would take too long or not fit).
"""
import argparse
import os
import shlex
import sys
import time

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("model", "model"), ("protocol", "protocol"), ("res", "res"),
           ("batch", "batch"), ("variant", "variant"), ("step s", "step_s"), ("img/s", "img_s"),
           ("vs first", "vs_first"), ("vs torch eager", "vs_torch"), ("compile s", "compile_s"),
           ("XLA temp GiB", "temp_gib"), ("XLA peak GiB", "peak_plan_gib"), ("load", "load_average"),
           ("error", "error")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="deit_base_patch16")
  parser.add_argument("--protocol", default="unfrozen_linear")
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--variant", action="append", required=True, help="NAME=--config.a=1 --config.b=2")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--torch-dtype", default="float32", choices=["float32", "bfloat16"],
                      help="the torch eager baseline's precision (bfloat16: autocast; float32 uses TF32 on a GPU)")
  parser.add_argument("--compile-only", action="store_true", help="compile time and memory plan only")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--min-seconds", type=float, default=1.0)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from benchmarks import jax_side
  from mfjax.train import fit

  load_start = os.getloadavg()[0]
  variants = {}
  for spec in args.variant:
    name, eq, overrides = spec.partition("=")
    if not eq or not name:
      parser.error(f"--variant {spec!r}: expected NAME=OVERRIDES")
    if name in variants:
      parser.error(f"--variant {name!r} given twice")
    variants[name] = shlex.split(overrides)
    unknown = [o for o in variants[name] if o != "no-donation" and not o.startswith("--config.")]
    if unknown:
      parser.error(f"--variant {name}: {unknown} are neither --config.* flags nor no-donation")

  fns, calls, info, errors = {}, {}, {}, {}
  for name, overrides in variants.items():
    info[name] = {"overrides": overrides, "memory_plan": {}}
    try:  # one variant that fails (a kernel this jaxlib lacks) must not take the others' figures with it
      config = jax_side.paper_config(args.model, args.protocol, args.res, args.batch,
                                     [o for o in overrides if o != "no-donation"])
      run = fit.prepare(config)
      train_step = jax.jit(run.train_step.__wrapped__) if "no-donation" in overrides else run.train_step
      batch = jax_side.random_batch(run, args.batch, args.res)
      lr = jnp.float32(1e-4)
      t0 = time.perf_counter()
      lowered = train_step.lower(run.state, batch, lr)
      compiled = lowered.compile()
      info[name].update(compile_seconds=time.perf_counter() - t0, memory_plan=common.jax_memory(compiled))
      if args.compile_only:
        info[name]["step_flops_xla"] = common.cost_flops(compiled, lowered)
        continue
      holder = {"state": run.state}

      def step(compiled=compiled, holder=holder, batch=batch, lr=lr):
        holder["state"], metrics = compiled(holder["state"], batch, lr)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

      info[name]["loss_after_2_steps"] = [float(step()["loss"]) for _ in range(2)][-1]
      common.progress(f"{name}: compiled in {info[name]['compile_seconds']:.1f} s")
      calls[name] = common.warm_up(step, 0, args.min_seconds, name)
      fns[name] = step
    except Exception as e:  # noqa: BLE001 - reported in the variant's row
      errors[name] = common.error_text(e)

  import torch
  torch.set_num_threads(common.cpu_cores())
  env = common.environment()
  if not args.no_torch and not args.compile_only:
    from benchmarks import torch_reference
    device = common.torch_device()
    common.torch_matmul_precision(device, args.torch_dtype)
    model, _ = torch_reference.classifier(args.model, args.res, 5, args.protocol)
    model = model.to(device)
    images = torch.randn(args.batch, 3, args.res, args.res, device=device)
    labels = torch.randint(0, 5, (args.batch,), device=device)
    fns["torch_eager"], _ = torch_reference.train_step(model, images, labels, device,
                                                       bf16=args.torch_dtype == "bfloat16")
    calls["torch_eager"] = common.warm_up(fns["torch_eager"], 2, args.min_seconds, "torch_eager")

  times = common.interleave(fns, args.rounds, calls, errors=errors) if fns else {}
  median = {k: common.summary(v)["median_s"] for k, v in times.items()}
  first = next(iter(variants))
  load = f"{load_start:.1f}-{os.getloadavg()[0]:.1f}"
  rows = []
  for name in variants:
    plan = info[name]["memory_plan"]
    row = {"benchmark": "ablate", "device": env["device"], "model": args.model, "protocol": args.protocol,
           "res": args.res, "batch": args.batch, "variant": name,
           "step_s": common.fmt(median.get(name), ".3f"),
           "img_s": common.fmt(args.batch / median[name] if name in median else None),
           "vs_first": common.fmt(median[first] / median[name] if name in median and first in median else None),
           "vs_torch": common.fmt(median["torch_eager"] / median[name]) if "torch_eager" in median else "n/a",
           "compile_s": common.fmt(info[name].get("compile_seconds"), ".1f"),
           "temp_gib": common.gib(plan.get("temp_size")),
           "peak_plan_gib": common.gib(plan.get("peak_plan")),
           "load_average": load, "timings_s": common.summary(times[name]) if name in times else None,
           "torch_eager_timings_s": common.summary(times["torch_eager"]) if "torch_eager" in times else None,
           "torch_dtype": args.torch_dtype, "error": errors.get(name, ""), "torch_error": errors.get("torch_eager", ""),
           **info[name], "command": "python -m benchmarks.ablate " + " ".join(
               shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])), **env}
    rows.append(row)
  common.emit(rows, COLUMNS, args.out)


if __name__ == "__main__":
  main()

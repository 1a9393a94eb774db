r"""Parameter + optimizer memory per device under FSDP, against the ideal (total / devices).

  PYTHONPATH=. python -m benchmarks.fsdp_memory --model dinov2_vitl14 --fsdp 8

Builds the train state through `mfjax.train.fit.prepare` with --config.mesh.fsdp=N
--config.mesh.data=1 (configs/paper.py: the default `(".*", "fsdp")` rule and min_fsdp_mb), then
counts the bytes of every shard on every device. Without N real devices it reruns itself with
XLA_FLAGS=--xla_force_host_platform_device_count=N (simulated CPU devices). With --compile it also
compiles the train step and reports XLA's per-device memory plan for it.
"""
import argparse
import sys
import time

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("model", "model"), ("protocol", "protocol"), ("mesh", "mesh"),
           ("params + opt total GiB", "total_gib"), ("ideal per device GiB", "ideal_gib"),
           ("max per device GiB", "max_gib"), ("max / ideal", "ratio"), ("replicated MiB", "replicated_mib"),
           ("step temp per device GiB", "temp_gib")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="dinov2_vitl14")
  parser.add_argument("--protocol", default="unfrozen_linear")
  parser.add_argument("--fsdp", type=int, default=8)
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--compile", action="store_true", help="also compile the step: XLA's per-device plan")
  parser.add_argument("--out", default=None)
  args, extra = common.parse_args(parser, argv)

  argv = argv if argv is not None else sys.argv[1:]
  simulated = common.with_devices("benchmarks.fsdp_memory", args.fsdp, argv)

  import jax
  import jax.numpy as jnp
  from benchmarks import jax_side
  from mfjax.train import fit

  config = jax_side.paper_config(args.model, args.protocol, args.res, args.batch,
                                 [f"--config.mesh.fsdp={args.fsdp}", "--config.mesh.data=1", *extra])
  run = fit.prepare(config)
  state = {k: run.state[k] for k in ("trainable", "frozen", "batch_stats", "opt")}
  per_device, total, replicated = {}, 0, 0
  for leaf in jax.tree_util.tree_leaves(state):
    total += leaf.nbytes
    if leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) > 1:
      replicated += leaf.nbytes
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  ideal = total / len(per_device)
  worst = max(per_device.values())
  temp = None
  if args.compile:
    batch = jax_side.random_batch(run, args.batch, args.res)
    t0 = time.perf_counter()
    compiled = run.train_step.lower(run.state, batch, jnp.float32(1e-4)).compile()
    temp = common.jax_memory(compiled).get("temp_size")
    compile_s = time.perf_counter() - t0
  env = common.environment()
  row = {"benchmark": "fsdp_memory", "device": env["device"], "model": args.model, "protocol": args.protocol,
         "mesh": "x".join(f"{k}={v}" for k, v in run.mesh.shape.items()),
         "total_gib": common.gib(total), "ideal_gib": common.gib(ideal), "max_gib": common.gib(worst),
         "ratio": f"{worst / ideal:.3f}", "replicated_mib": f"{replicated / 2 ** 20:.1f}",
         "temp_gib": common.gib(temp) or "n/a", "per_device_bytes": sorted(per_device.values()),
         "total_bytes": total, "min_fsdp_mb": config.min_fsdp_mb, "sharding_rules": config.sharding_rules,
         "compile_s": compile_s if args.compile else None, "params_total": run.n_total,
         "simulated_devices": simulated,
         "command": "python -m benchmarks.fsdp_memory " + " ".join(argv),
         **env}
  common.emit(row, COLUMNS, args.out)


if __name__ == "__main__":
  main()

"""Runs a few tiny training steps on given meshes and prints losses and shardings as JSON.

Used by tests/test_train.py in subprocesses, so each can choose its device count (XLA_FLAGS)
or join a multi-process job (MFJAX_COORDINATOR ...) before JAX starts.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from mfjax import data as mdata, parallel  # noqa: E402
from mfjax.cli import load_config  # noqa: E402
from mfjax.train import fit  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--manual")
  p.add_argument("--data")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--mesh", action="append")
  p.add_argument("--sharding-rules", default="[('.*', 'fsdp')]")
  args = p.parse_args()
  parallel.maybe_initialize_distributed()
  for mesh in args.mesh:
    data, fsdp = (int(v) for v in mesh.split(","))
    config = load_config("configs/tiny.py:model=deit_base_patch16,dataset=aptos2019,protocol=unfrozen_deit",
                         [f"--config.data.manual_dir={args.manual}", f"--config.data.data_dir={args.data}",
                          f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                          "--config.min_fsdp_mb=0.004", f"--config.sharding_rules={args.sharding_rules}"])
    run = fit.prepare(config)
    loader = mdata.make_loader(run.dataset, "train", batch_size=config.batch_size, train=True,
                               resolution=config.data.resolution, seed=0)
    it, state, losses = iter(loader), run.state, []
    for _ in range(args.steps):
      batch = mdata.global_batch(next(it), parallel.batch_sharding(run.mesh))
      state, metrics = run.train_step(state, batch, jax.numpy.float32(1e-3))
      losses.append(float(metrics["loss"]))
    leaves = jax.tree_util.tree_leaves_with_path(state["trainable"])
    sharded = {parallel.path_str(p): str(x.sharding.spec) for p, x in leaves if "fsdp" in str(x.sharding.spec)}
    opt_sharded = sum("fsdp" in str(x.sharding.spec) for x in jax.tree_util.tree_leaves(state["opt"]))
    adam = state["opt"][1]
    moments_follow = all(m.sharding.spec == p.sharding.spec for moments in (adam.mu, adam.nu) for m, p in
                         zip(jax.tree_util.tree_leaves(moments), jax.tree_util.tree_leaves(state["trainable"])))
    per_device = {}
    total = replicated = 0
    for _, x in leaves:
      total += x.nbytes
      if not x.sharding.spec or all(s is None for s in x.sharding.spec):
        replicated += x.nbytes
      for shard in x.addressable_shards:
        per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    val = run.evaluate("validation", state)  # a padded last batch, gathered across the processes
    print(json.dumps({"mesh": [data, fsdp], "devices": run.mesh.devices.size, "process": jax.process_index(),
                      "losses": losses, "val": val, "sharded_params": sharded, "sharded_opt": opt_sharded,
                      "moments_follow_params": moments_follow,
                      "bytes_per_device": {"max": max(per_device.values()), "total": total,
                                           "replicated": replicated}}), flush=True)


if __name__ == "__main__":
  main()

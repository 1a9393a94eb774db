r"""Memory per device of one MedDINOv3 pretraining step: iBOT masks in one group over the whole batch
(where each device gathers every masked patch and heads it: mfjax before 2026-12-07) against one
group per device (the default, DINOv3's per-GPU collation).

  PYTHONPATH=. python -m benchmarks.pretrain_memory --devices 8 --batch 16 --global-size 224 --prototypes 65536

Builds the step of configs/pretrain.py (its tiny backbone unless --full: the iBOT head and its
(masked patches, prototypes) outputs are what grows) and reports XLA's per-device memory plan of
each, compiled only. Without that many devices it reruns itself on simulated CPU devices.
"""
import argparse
import dataclasses
import os
import sys
import tempfile

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("backbone", "backbone"), ("batch", "batch"), ("global px", "global_size"),
           ("prototypes", "prototypes"), ("mask groups", "groups"), ("masked patches", "masked"),
           ("step temp per device MiB", "temp_mib")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--global-size", type=int, default=224)
  parser.add_argument("--prototypes", type=int, default=65536)
  parser.add_argument("--full", action="store_true", help="the ViT-B/16 backbone instead of the tiny one")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  argv = argv if argv is not None else sys.argv[1:]

  simulated = common.with_devices("benchmarks.pretrain_memory", args.devices, argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from configs import pretrain as pretrain_config
  from mfjax import parallel
  from mfjax.data import volumes
  from mfjax.ssl import pretrain

  folder = tempfile.mkdtemp(prefix="pretrain_memory_")
  rng = np.random.default_rng(0)
  for i in range(2):  # slices large enough for the global crops
    volumes.write_volume(os.path.join(folder, f"case{i}.nii.gz"),
                         rng.uniform(-1000, 1000, (args.global_size + 64,) * 2 + (4,)).astype(np.float32))
  mesh = parallel.make_mesh()
  env = common.environment()
  rows = []
  for label, group in (("whole batch (before)", 2 * args.batch), ("per device", 0)):
    config = pretrain_config.get_config(f"tiny={not args.full},batch={args.batch},global_size={args.global_size},"
                                        f"local_size={max(16, args.global_size // 7 // 8 * 8)}")
    config.data.folders = folder
    config.heads.ibot_prototypes = args.prototypes
    config.masking.group_crops = group
    networks, _ = pretrain.build_networks(config)
    networks = dataclasses.replace(networks, mask_groups=pretrain.mask_groups(config, mesh.devices.size),
                                   batch_shards=int(mesh.devices.size))
    replicated = parallel.replicated(mesh)
    state = parallel.put_global(pretrain.initial_state(config, networks, None), replicated)
    plan = parallel.put_global(jax.tree_util.tree_map(np.float32, pretrain.parameter_plan(
        state["student"], networks.student.depth, 0.9, 0.2)), replicated)
    pool = pretrain.SlicePool(pretrain.list_volumes(folder), 0, 2, 1)
    batch = pretrain.place_batch(pretrain.make_batch(config, pool, 0, networks, None), mesh)
    sched = jax.tree_util.tree_map(jnp.float32, pretrain.schedules(config, 0))
    compiled = pretrain.jitted_train_step.lower(state, batch, sched, plan, networks=networks, use_gram=False,
                                                state_sharding=replicated).compile()
    temp = common.jax_memory(compiled).get("temp_size")
    rows.append({"benchmark": "pretrain_memory", "device": env["device"], "variant": label,
                 "backbone": config.model.name + ("" if args.full else " (tiny)"), "batch": args.batch,
                 "global_size": args.global_size, "prototypes": args.prototypes, "groups": networks.mask_groups,
                 "masked": int(np.prod(batch["mask_indices"].shape)), "temp_mib": f"{temp / 2 ** 20:.1f}",
                 "temp_bytes": temp, "simulated_devices": simulated,
                 "command": "python -m benchmarks.pretrain_memory " + " ".join(argv), **env})
  common.emit(rows, COLUMNS, args.out)


if __name__ == "__main__":
  main()

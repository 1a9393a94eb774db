"""The JAX side of the benchmarks: the trainer's own train step and forward, built from configs/paper.py.

`prepare` needs a dataset; a tiny synthetic APTOS one is built in a temporary folder (only its
number of classes matters: the benchmarks feed device-resident random batches, so the input
pipeline is not in the measurement).
"""
import os
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_aptos(num_images: int = 40, size: int = 32) -> tuple[str, str]:
  """(manual_dir, data_dir) of a synthetic APTOS, built once into the temporary folder."""
  from mfjax import data as mdata
  from mfjax.data import synthetic
  folder = os.path.join(tempfile.gettempdir(), f"mfjax_benchmark_aptos_{num_images}x{size}")
  manual, data_dir = os.path.join(folder, "download"), os.path.join(folder, "data")
  if not os.path.exists(os.path.join(folder, "built")):
    synthetic.aptos2019(manual, num_images=num_images, size=size)
    mdata.build("aptos2019", manual, data_dir, overwrite=True)
    open(os.path.join(folder, "built"), "w").close()
  return manual, data_dir


# float32 on a GPU: TF32 on both sides (common.torch_matmul_precision lets torch use it), XLA's default.
MATMUL_AS_TORCH = ("--config.model.matmul_precision=default",)


def paper_config(model, protocol, resolution, batch, overrides=(), dataset=(40, 32)):
  """configs/paper.py for one cell, pointed at a synthetic APTOS of `dataset` = (images, size)
  (only its classes matter unless the pipeline is measured), without drop-path, plus --config.*
  overrides."""
  from mfjax.cli import load_config
  manual, data_dir = synthetic_aptos(*dataset)
  arg = f"model={model},dataset=aptos2019,protocol={protocol},res={resolution},batch={batch}"
  # No drop-path (SEEM's 0.3 in its trained protocols): the torch references run without it.
  return load_config(os.path.join(ROOT, "configs", "paper.py") + ":" + arg,
                     [f"--config.data.manual_dir={manual}", f"--config.data.data_dir={data_dir}",
                      "--config.model.drop_path=0.0", *MATMUL_AS_TORCH, *overrides])


def random_batch(run, batch: int, resolution: int, seed: int = 0) -> dict:
  """A device-resident batch of random images and labels, sharded as the trainer shards batches."""
  import jax
  from mfjax import parallel
  rng = np.random.default_rng(seed)
  sharding = parallel.batch_sharding(run.mesh)
  return {"image": jax.device_put(rng.standard_normal((batch, resolution, resolution, 3), np.float32), sharding),
          "label": jax.device_put(rng.integers(0, run.spec.num_classes, batch).astype(np.int32), sharding)}


def forward_fn(run):
  """jit(images -> logits) of the classifier in inference mode, on the run's current parameters."""
  import jax
  from mfjax.train import protocols

  @jax.jit
  def forward(trainable, frozen, stats, images):
    variables = {"params": protocols.merge(trainable, frozen), **({"batch_stats": stats} if stats else {})}
    return run.classifier.apply(variables, images, train=False)["logits"]

  return forward


def state_bytes(state: dict) -> dict:
  """Bytes of the train state: total, and on the most loaded device (parameters + optimizer)."""
  import jax
  total, per_device = 0, {}
  for leaf in jax.tree_util.tree_leaves({k: state[k] for k in ("trainable", "frozen", "batch_stats", "opt")}):
    total += leaf.nbytes
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return {"total": int(total), "max_per_device": int(max(per_device.values())) if per_device else 0,
          "devices": len(per_device)}

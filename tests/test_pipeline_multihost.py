"""Two real JAX processes (2 CPU devices each) read their own shards and assemble one global batch,
also on a mesh whose batch slots alternate between the processes (as on a TPU pod).

The test starts this file twice as a script (`python test_pipeline_multihost.py ROLE ...`);
each process checks its addressable shards of `global_batch` against the batch a single
process reads, so a process that read the wrong rows, or a global batch assembled in the
wrong order, fails.
"""
import sys

import numpy as np

from tests.multiprocess import run_script_twice

GLOBAL_BATCH = 8


def _reference_batches(ds):
  import mfjax.data
  return list(mfjax.data.make_loader(ds, "train", batch_size=GLOBAL_BATCH, train=True, resolution=16, seed=9,
                                     shard_index=0, shard_count=1))


def worker(process_id: int, port: int, dataset_path: str):
  import jax
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  import mfjax.data
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  ds = mfjax.data.load(dataset_path)
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
  local = list(mfjax.data.make_loader(ds, "train", batch_size=GLOBAL_BATCH, train=True, resolution=16, seed=9))
  reference = _reference_batches(ds)
  assert len(local) == len(reference) > 0
  for mine, full in zip(local, reference):
    assert len(mine["index"]) == GLOBAL_BATCH // 2
    arrays = mfjax.data.global_batch(mine, mesh)
    for key, array in arrays.items():
      assert array.shape == full[key].shape, (key, array.shape)
      for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[key][shard.index])
  print(f"process {process_id}: {len(local)} global batches OK", flush=True)
  _interleaved_mesh(process_id, ds, reference)


def _interleaved_mesh(process_id, ds, reference):
  """A mesh whose batch slots alternate between the processes, as a TPU pod's mesh (built from
  the chips' layout) has them: each process fills the rows of its own devices, and the
  segmentation predictor returns every tile in its place."""
  import flax.linen as nn
  import jax
  from jax.experimental import multihost_utils
  import mfjax.data
  from mfjax import parallel
  from mfjax.evals import segmentation
  from mfjax.train import segment
  mine = [[d for d in jax.devices() if d.process_index == p] for p in range(2)]
  mesh = jax.sharding.Mesh(np.array([mine[p][i] for i in range(2) for p in range(2)]).reshape(2, 2),
                           ("data", "fsdp"))
  sharding = parallel.batch_sharding(mesh)
  rows = parallel.process_rows(sharding, GLOBAL_BATCH)
  np.testing.assert_array_equal(rows, [0, 1, 4, 5] if process_id == 0 else [2, 3, 6, 7])
  local = list(mfjax.data.make_loader(ds, "train", batch_size=GLOBAL_BATCH, train=True, resolution=16, seed=9,
                                      sharding=sharding))
  for batch, full in zip(local, reference):
    np.testing.assert_array_equal(batch["index"], full["index"][rows])
    for key, array in mfjax.data.global_batch(batch, sharding).items():
      np.testing.assert_array_equal(np.asarray(multihost_utils.process_allgather(
          array, tiled=True)), full[key], err_msg=key)

  model = nn.Conv(3, (1, 1))
  tiles = np.random.default_rng(0).normal(size=(6, 8, 8, 2)).astype(np.float32)  # padded to 8 rows
  params = model.init(jax.random.PRNGKey(0), tiles[:1])["params"]
  predicted = segment.make_predictor(model, mesh, 6, (8, 8), mirror=True)(params, tiles)
  with jax.default_device(jax.local_devices()[0]):
    expected = segmentation.weighted_tile_logits(lambda x: model.apply({"params": params}, x), jax.numpy.asarray(
        tiles), jax.numpy.asarray(segmentation.gaussian_weights((8, 8))), True)
  np.testing.assert_allclose(predicted, np.asarray(expected), rtol=1e-5, atol=1e-5)
  print(f"process {process_id}: interleaved mesh OK", flush=True)


def test_two_processes_assemble_the_single_process_global_batch(tmp_path):
  import mfjax.data
  from mfjax.data import synthetic
  manual = synthetic.aptos2019(str(tmp_path / "aptos"), num_images=40, size=32)
  ds = mfjax.data.build("aptos2019", manual, str(tmp_path / "tfds"))
  for out in run_script_twice(__file__, ds.path, devices_per_process=2):
    assert "global batches OK" in out and "interleaved mesh OK" in out


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

"""Two real JAX processes (2 CPU devices each) read their own shards and assemble one global batch.

The test starts this file twice as a script (`python test_pipeline_multihost.py ROLE ...`);
each process checks its addressable shards of `global_batch` against the batch a single
process reads, so a process that read the wrong rows, or a global batch assembled in the
wrong order, fails.
"""
import os
import socket
import subprocess
import sys

import numpy as np

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


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_assemble_the_single_process_global_batch(tmp_path):
  import mfjax.data
  from mfjax.data import synthetic
  manual = synthetic.aptos2019(str(tmp_path / "aptos"), num_images=40, size=32)
  ds = mfjax.data.build("aptos2019", manual, str(tmp_path / "tfds"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        os.environ.get("PYTHONPATH", "")])}
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, str(p), str(port), ds.path], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    assert "global batches OK" in out


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

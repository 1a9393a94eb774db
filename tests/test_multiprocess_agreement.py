"""What the processes of a multi-process job must agree on, checked with two real JAX processes
(the test starts this file twice as a script).

- Pretraining's backbone exports between checkpoints. orbax numbers its saves with a per-process
  counter that keys the signals its processes exchange; an export written by process 0 alone put
  it out of step, and the job's next checkpoint waited on a signal that never came (a CI run hung
  for 300 s). Each process exports the teacher and saves a checkpoint three times: the counters
  must agree and every export must hold the teacher.
- A failure in what process 0 does alone (preprocessing, writing a result) stops every process
  instead of leaving the others waiting in the next collective.
- A volume one process could read and another could not (a damaged copy on one host) stops both
  processes in pretraining, instead of each drawing other slices.
"""
import os
import re
import sys

import numpy as np

from tests.multiprocess import run_script_twice


def worker(process_id: int, port: int, workdir: str):
  import jax
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  from etils import epath
  from jax.experimental import multihost_utils
  from orbax.checkpoint._src.futures import synchronization
  from configs import pretrain as pretrain_config
  from mfjax import models, parallel
  from mfjax.ssl import pretrain
  from mfjax.train.checkpoints import RunCheckpoints
  config = pretrain_config.get_config("tiny=true")
  networks, gram_variables = pretrain.build_networks(config)
  mesh = parallel.make_mesh()
  state = parallel.put_global(pretrain.initial_state(config, networks, gram_variables), parallel.replicated(mesh))
  ckpts = RunCheckpoints(workdir)
  for step in (1, 2, 3):
    pretrain.export_backbone(config, state, epath.Path(workdir) / "backbones" / f"step_{step}", workdir, step)
    ckpts.save_latest(step, state, {"step": step})
  ckpts.close()
  counters = np.asarray(multihost_utils.process_allgather(
      np.int32(synchronization.OperationIdGenerator.get_current_operation_id())))
  assert counters[0] == counters[1], f"orbax's save counters differ between the processes: {counters}"
  teacher = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), state["teacher"]["backbone"])
  for step in (1, 2, 3):
    _, variables = models.load(os.path.join(workdir, "backbones", f"step_{step}"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, dict(variables["params"]), teacher)
  print(f"process {process_id}: exports and checkpoints OK", flush=True)
  _failures_on_process_zero(process_id)
  _slice_pool(process_id, workdir)


def _failures_on_process_zero(process_id):
  import pytest
  from mfjax import parallel
  from mfjax.config import RunStopped
  assert parallel.on_process_zero("add", lambda a, b: a + b, 2, 3) == (5 if process_id == 0 else None)
  assert parallel.same_on_every_process(10 + process_id) == 10

  def fails():
    raise OSError(28, "No space left on device")
  expected = OSError if process_id == 0 else RunStopped
  with pytest.raises(expected, match="No space left" if process_id == 0 else "process 0 could not write x.json"):
    parallel.on_process_zero("write x.json", fails)
  print(f"process {process_id}: process 0's failure stops both OK", flush=True)


def _slice_pool(process_id, workdir):
  import pytest
  from jax.experimental import multihost_utils
  from mfjax.data import volumes
  from mfjax.ssl import pretrain
  paths = [os.path.join(workdir, "ct", f"ct{i}.nii.gz") for i in range(3)]
  if process_id == 0:
    for i, path in enumerate(paths):
      volumes.write_volume(path, np.random.default_rng(i).uniform(-1000, 1000, (8, 8, 2 + i)).astype(np.float32))
  multihost_utils.sync_global_devices("volumes written")
  read = pretrain.axial_slices

  def damaged_here(path):  # this host's copy of ct1 is damaged
    if path == paths[1]:
      raise volumes.VolumeError(f"{path}: truncated")
    return read(path)
  if process_id == 1:
    pretrain.axial_slices = damaged_here
  pool = pretrain.SlicePool(paths, seed=0, size=3, new_per_step=1)
  pool.sample(0, np.random.default_rng(7), 16)
  pretrain.check_pools_agree(pool, 4, every=5)  # not a step to compare at: the pools differ, and it says nothing
  pretrain.axial_slices = read
  mine = "none" if process_id == 0 else str([paths[1]])
  with pytest.raises(volumes.VolumeError, match=re.escape(f"step 5: the processes could not read the same volumes "
                                                          f"(this one: {mine})")):
    pretrain.check_pools_agree(pool, 5, every=5)
  # Another list of volumes on one host: refused on both before the run starts.
  from mfjax.config import ConfigError
  pretrain.check_same_volumes(paths, pretrain.check_volumes(paths, progress=False))
  listed = paths if process_id == 0 else paths[:2]
  with pytest.raises(ConfigError, match="the processes see different lists of volumes"):
    pretrain.check_same_volumes(listed, pretrain.check_volumes(listed, progress=False))
  same = pretrain.SlicePool(paths, seed=0, size=3, new_per_step=1)  # the same files on both: no error
  same.sample(0, np.random.default_rng(7), 16)
  pretrain.check_pools_agree(same, 10, every=5)
  print(f"process {process_id}: slice pool OK", flush=True)


def test_two_processes_stay_in_step(tmp_path):
  for out in run_script_twice(__file__, str(tmp_path / "run"), devices_per_process=1):
    for step in ("exports and checkpoints OK", "process 0's failure stops both OK", "slice pool OK"):
      assert step in out, out[-3000:]


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

"""Pretraining's backbone exports between the checkpoints of a two-process job.

orbax numbers its saves with a per-process counter that keys the signals its processes exchange.
An export written by process 0 alone put that counter out of step, and the job's next checkpoint
then waited on a signal that never came, or two processes made the same folder (a CI run hung
for 300 s). The test starts this file twice as a script; each process exports the teacher and
saves a checkpoint three times, then reports orbax's counter: it must be the same on both, and
every export must hold the teacher's parameters.
"""
import os
import socket
import subprocess
import sys

import numpy as np


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


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_exports_keep_the_processes_checkpoints_in_step(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
         "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, str(p), str(port), str(tmp_path / "run")], env=env,
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
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
    assert "exports and checkpoints OK" in out


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

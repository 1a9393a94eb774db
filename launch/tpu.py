r"""Cloud TPU launcher: create a TPU VM or pod slice, ship the code, install mfjax on every worker,
run `mfjax train` / `mfjax sweep` on all workers, stream worker 0's log, delete the TPU.

  launch/tpu.sh --name mfjax-v4 --zone us-central2-b --type v4-32 --spot --watch \
      --stage gs://my-bucket/aptos2019=~/data/aptos2019 -- \
      train --config configs/paper.py:model=dinov2_vitb14,dataset=aptos2019,protocol=unfrozen_linear \
      --config.data.manual_dir=~/data/aptos2019 --workdir gs://my-bucket/runs/dinov2_aptos

The workdir (a sweep's --runs-dir) must be a gs:// path: every worker writes its share of each
orbax checkpoint there, and it outlives the TPU. Starting the same command again (or --watch,
after a spot TPU is preempted) creates the TPU anew and resumes from WORKDIR/checkpoints.

Costs: the TPU is billed from creation until deletion. It is deleted when the run ends, fails or
is interrupted (Ctrl-C), unless --keep; if deleting fails, the command to do it is printed.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

from launch import common
from launch.common import LaunchError

# Workers (TPU VMs) per slice, from Google's documented system architecture
# (cloud.google.com/tpu/docs: "TPU v4", "TPU v5p", "TPU v5e", "TPU v6e", "System architecture"):
#   v2, v3, v4, v5p: the type's number counts TensorCores, 2 per chip; a VM drives 4 chips
#                    (8 TensorCores). v4-32 = 16 chips = 4 workers; v3-32 = 4 workers.
#   v5litepod, v6e:  the number counts chips (1 TensorCore each). Slices of 1, 4 or 8 chips are
#                    one VM; larger slices (16 to 256 chips) are VMs of 4 chips each.
#                    v5litepod-16 = 4 workers.
# JAX sees one device per TensorCore on v2/v3 and one per chip on the others.
# The runtime versions are Google's recommended images for JAX per generation.
GENERATIONS = {
    "v2": dict(counts="cores", devices_per_chip=2, runtime="tpu-ubuntu2204-base"),
    "v3": dict(counts="cores", devices_per_chip=2, runtime="tpu-ubuntu2204-base"),
    "v4": dict(counts="cores", devices_per_chip=1, runtime="tpu-ubuntu2204-base"),
    "v5p": dict(counts="cores", devices_per_chip=1, runtime="v2-alpha-tpuv5"),
    "v5litepod": dict(counts="chips", devices_per_chip=1, runtime="v2-alpha-tpuv5-lite"),
    "v6e": dict(counts="chips", devices_per_chip=1, runtime="v2-alpha-tpuv6e"),
}
ONE_VM_CHIPS = (1, 4, 8)
POD_CHIPS = (16, 32, 64, 128, 256)

# etils.epath (orbax's file layer, and mfjax's for config.json, metrics.jsonl and result.json)
# opens gs:// paths through gcsfs; tensorstore, orbax's array writer, speaks GCS itself.
GCS_PACKAGES = ("gcsfs",)
SOURCE_TARBALL = "mfjax-src.tar.gz"   # in each worker's home folder (--code copy)
COORDINATOR_PORT = 8482               # the port JAX's own Cloud TPU detection uses
SSH_LOST = 255                        # what gcloud ssh returns when the connection drops
NO_EXIT_STATUS = 98                   # the stream's answer when the run died without one
# Whether the pid file names a running mfjax (after a VM restart the pid may be another process's).
RUN_ALIVE = ('run_alive() { p=$(cat ~/mfjax_run/pid 2> /dev/null) && [ -n "$p" ] && '
             'ps -o args= -p "$p" 2> /dev/null | grep -q mfjax.cli; }')
INCOMPLETE = 3                        # our exit status for a run stopped before its end


def slice_shape(accelerator_type: str) -> dict:
  """Workers, chips and JAX devices of a TPU type such as v4-32 or v5litepod-16."""
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
  if not m:
    raise LaunchError(f"--type {accelerator_type!r}: expected v2-N, v3-N, v4-N, v5p-N (N TensorCores) or "
                      f"v5litepod-N, v6e-N (N chips), e.g. v4-32 or v5litepod-16")
  generation, n = m.group(1), int(m.group(2))
  spec = GENERATIONS[generation]
  if spec["counts"] == "cores":
    if n < 8 or n % 8:
      raise LaunchError(f"--type {accelerator_type}: {generation} sizes count TensorCores in multiples of 8 "
                        f"(e.g. {generation}-8, {generation}-32)")
    chips, chips_per_worker = n // 2, 4
  elif n in ONE_VM_CHIPS:
    chips, chips_per_worker = n, n
  elif n in POD_CHIPS:
    chips, chips_per_worker = n, 4
  else:
    raise LaunchError(f"--type {accelerator_type}: {generation} sizes count chips; valid: "
                      f"{', '.join(str(c) for c in ONE_VM_CHIPS + POD_CHIPS)}")
  workers = chips // chips_per_worker
  return dict(generation=generation, chips=chips, workers=workers, chips_per_worker=chips_per_worker,
              devices=chips * spec["devices_per_chip"], runtime=spec["runtime"])


def remote_path(path: str) -> str:
  """A worker path for the remote shell: `~/x` expands to the worker's home, the rest is quoted."""
  if path == "~":
    return '"$HOME"'
  if path.startswith("~/"):
    return '"$HOME"/' + shlex.quote(path[2:])
  return shlex.quote(path)


def stage_pair(text: str) -> tuple[str, str]:
  src, eq, dest = text.partition("=")
  if not eq or not src.startswith("gs://") or not dest:
    raise argparse.ArgumentTypeError(f"{text!r} is not gs://BUCKET/PATH=WORKER_PATH")
  return src.rstrip("/"), dest


class Tpu:
  """The gcloud commands for one TPU (a TPU VM, or a queued resource holding one node)."""

  def __init__(self, args, command: list[str], workdir: str):
    self.args = args
    self.shape = slice_shape(args.type)
    self.runtime = args.runtime_version or self.shape["runtime"]
    self.command = command
    self.workdir = workdir
    self.done_file = common.done_file(command, workdir)
    self.resumes_from = common.resumes_from(command, workdir)
    self.scope = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    self.ready_state = "ACTIVE" if args.queued else "READY"
    self.tarball = os.path.join(tempfile.gettempdir(), f"mfjax-src-{args.name}.tar.gz")

  def gcloud(self, *words: str) -> list[str]:
    return [self.args.gcloud, *words]

  # The resource.

  def create(self) -> list[str]:
    a = self.args
    if a.queued:
      cmd = self.gcloud("compute", "tpus", "queued-resources", "create", a.name, f"--node-id={a.name}",
                        *self.scope, f"--accelerator-type={a.type}", f"--runtime-version={self.runtime}")
      if a.valid_until_duration:
        cmd.append(f"--valid-until-duration={a.valid_until_duration}")
    else:
      cmd = self.gcloud("compute", "tpus", "tpu-vm", "create", a.name, *self.scope,
                        f"--accelerator-type={a.type}", f"--version={self.runtime}")
      if a.preemptible:
        cmd.append("--preemptible")
    if a.spot:
      cmd.append("--spot")
    return cmd + list(a.create_flag)

  def describe(self) -> list[str]:
    if self.args.queued:
      return self.gcloud("compute", "tpus", "queued-resources", "describe", self.args.name, *self.scope,
                         "--format=value(state.state)")
    return self.gcloud("compute", "tpus", "tpu-vm", "describe", self.args.name, *self.scope, "--format=value(state)")

  def delete(self) -> list[str]:
    if self.args.queued:
      return self.gcloud("compute", "tpus", "queued-resources", "delete", self.args.name, *self.scope,
                         "--force", "--quiet")
    return self.gcloud("compute", "tpus", "tpu-vm", "delete", self.args.name, *self.scope, "--quiet")

  def ssh(self, worker: str, script: str) -> list[str]:
    return self.gcloud("compute", "tpus", "tpu-vm", "ssh", self.args.name, *self.scope, f"--worker={worker}",
                       "--quiet", f"--command={script}")

  def exists(self, path: str) -> list[str]:
    return self.gcloud("storage", "ls", path)

  # What runs on the workers.

  def ship(self) -> list[list[str]]:
    """Copy the code to every worker (--code copy), then check it out and install mfjax."""
    a = self.args
    cmds = []
    if a.code == "copy":
      cmds.append(self.gcloud("compute", "tpus", "tpu-vm", "scp", self.tarball, f"{a.name}:{SOURCE_TARBALL}",
                              *self.scope, "--worker=all", "--quiet"))
      # Replace the previous code, but keep the virtualenv and data staged inside the checkout.
      keep = " ".join(f"! -name {shlex.quote(name)}" for name in [".venv", *self.staged_in_checkout()])
      code = ["mkdir -p ~/mfjax",
              f"find ~/mfjax -mindepth 1 -maxdepth 1 {keep} -exec rm -rf {{}} +",
              f"tar -xzf ~/{SOURCE_TARBALL} -C ~/mfjax",
              "cd ~/mfjax"]
    else:
      code = [f"if [ ! -d ~/mfjax/.git ]; then git clone --quiet {shlex.quote(a.repo)} ~/mfjax; fi",
              "cd ~/mfjax",
              "git fetch --quiet origin",
              f"git checkout --quiet --detach {shlex.quote(a.commit)}"]
    packages = " ".join([f'".[{a.extras}]"', *GCS_PACKAGES])
    install = ["if ! command -v uv > /dev/null && [ ! -x ~/.local/bin/uv ]; then "
               "curl -LsSf https://astral.sh/uv/install.sh | sh; fi",
               'export PATH="$HOME/.local/bin:$PATH"',
               f"if [ ! -x .venv/bin/python ]; then uv venv --python {shlex.quote(a.python)} .venv; fi",
               f"uv pip install --python .venv/bin/python -e {packages}"]
    stage = []
    for src, dest in a.stage:
      stage += [f"mkdir -p {remote_path(dest)}",
                f"gcloud storage rsync --recursive {shlex.quote(src)} {remote_path(dest)}"]
    cmds.append(self.ssh("all", "\n".join(["set -euo pipefail", *code, *install, *stage])))
    return cmds

  def staged_in_checkout(self) -> list[str]:
    """Top-level folders of ~/mfjax that --stage fills (a relative PATH lies in the checkout)."""
    names = []
    for _, dest in self.args.stage:
      rel = dest[len("~/mfjax/"):] if dest.startswith("~/mfjax/") else None if dest.startswith(("/", "~")) else dest
      if rel and rel.split("/")[0] not in ("", ".", ".."):
        names.append(rel.split("/")[0])
    return sorted(set(names))

  def start(self, attempt: int) -> list[str]:
    """Start the run on every worker, detached (immune to SIGHUP), so it outlives the ssh session."""
    # A lock (WORKDIR/lock.json) left by a preempted attempt of this TPU's run is taken over at once.
    job = {"MFJAX_JOB_ID": f"tpu:{self.args.project or ''}/{self.args.zone}/{self.args.name}",
           "MFJAX_JOB_ATTEMPT": str(attempt)}
    run = common.shell_line([".venv/bin/python", "-m", "mfjax.cli", *self.command], {**job, **dict(self.args.env)})
    return self.ssh("all", "\n".join([
        "set -eu",
        "cd ~/mfjax",
        "mkdir -p ~/mfjax_run",
        RUN_ALIVE,
        "# an earlier attempt still running here (its worker 0 ended first): it saves and exits before this one;",
        "# one that has not after 5 minutes (stuck in a collective with a lost peer) is killed",
        'if run_alive; then kill -TERM "$(cat ~/mfjax_run/pid)" 2> /dev/null || true; '
        "for _ in $(seq 300); do run_alive || break; sleep 1; done; fi",
        'if run_alive; then kill -KILL "$(cat ~/mfjax_run/pid)" 2> /dev/null || true; '
        "for _ in $(seq 30); do run_alive || break; sleep 1; done; fi",
        "rm -f ~/mfjax_run/pid ~/mfjax_run/exit_code",
        "# MFJAX_COORDINATOR, MFJAX_NUM_PROCESSES, MFJAX_PROCESS_ID from this worker's metadata",
        f"exports=$(.venv/bin/python -m launch.tpu_worker_env --port {COORDINATOR_PORT} "
        f"--expect-workers {self.shape['workers']})",
        'eval "$exports"',
        f'( set +e; trap "" HUP; {run} & echo $! > ~/mfjax_run/pid; wait $!; echo $? > ~/mfjax_run/exit_code.tmp; mv ~/mfjax_run/exit_code.tmp ~/mfjax_run/exit_code ) '
        f"> ~/mfjax_run/attempt-{attempt}.log 2>&1 < /dev/null &"]))

  def stream(self, attempt: int) -> list[str]:
    """Worker 0's log until its run ends; exits with the run's exit status."""
    log = f"attempt-{attempt}.log"
    return self.ssh("0", "\n".join([
        "cd ~/mfjax_run",
        "for _ in $(seq 120); do [ -s pid ] && break; sleep 1; done",
        f"if [ ! -s pid ]; then cat {log}; exit {NO_EXIT_STATUS}; fi",
        RUN_ALIVE,
        f'if run_alive; then tail --pid="$(cat ~/mfjax_run/pid)" -n +1 -F {log}; else cat {log}; fi',
        'for _ in $(seq 10); do [ -s exit_code ] && exit "$(cat exit_code)"; sleep 1; done',
        f"exit {NO_EXIT_STATUS}"]))

  def list_unfinished(self) -> list[str] | None:
    """For a sweep: worker 0 prints the runs without result.json (nothing once it is done)."""
    listing = common.unfinished_listing(self.command)
    if listing is None:
      return None
    return self.ssh("0", "\n".join(["cd ~/mfjax", common.shell_line([".venv/bin/python", "-m", "mfjax.cli", *listing])]))

  def stop(self) -> list[str]:
    """SIGTERM the run on every worker: mfjax saves a checkpoint and exits."""
    return self.ssh("all", 'if [ -s ~/mfjax_run/pid ]; then kill -TERM "$(cat ~/mfjax_run/pid)" 2> /dev/null || true; fi')


# ------------------------------------------------------------------------------- real runs


def pack_worktree(root: str, out_path: str) -> int:
  """Tar the git working tree of `root`: tracked and untracked files, not the ignored ones."""
  try:
    listing = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             check=True, capture_output=True).stdout.decode()
  except (OSError, subprocess.CalledProcessError) as e:
    raise LaunchError(f"--code copy packs the git working tree of {root}, but `git ls-files` failed there "
                      f"({e}); use --code git --repo URL --commit SHA instead") from None
  files = [f for f in listing.split("\0") if f and os.path.isfile(os.path.join(root, f))]
  with tarfile.open(out_path, "w:gz") as tar:
    for f in files:
      tar.add(os.path.join(root, f), arcname=f)
  return len(files)


def state_of(tpu: Tpu, runner: common.Runner) -> str:
  """The TPU's (or queued resource's) state; NOT_FOUND when gcloud says it does not exist; UNKNOWN
  when gcloud cannot tell for 10 polling periods (5 minutes by default), retried with growing
  pauses: a network outage on this machine is not a preemption, and must not delete a running TPU."""
  patience, pause, waited = 10 * tpu.args.poll_seconds, min(2.0, tpu.args.poll_seconds), 0.0
  while True:
    out = runner.run(tpu.describe(), check=False, capture=True)
    if out.returncode == 0 and out.stdout.strip():
      return out.stdout.strip().splitlines()[-1]
    if re.search(r"NOT_FOUND|not found", out.stderr or "", re.IGNORECASE):
      return "NOT_FOUND"
    if waited >= patience:
      return "UNKNOWN"
    time.sleep(pause)
    waited += pause
    pause = min(2 * pause, 60.0)


def create(tpu: Tpu, runner: common.Runner) -> None:
  runner.run(tpu.create())
  if not tpu.args.queued:
    return  # `tpu-vm create` returns once the TPU is READY
  while True:
    state = state_of(tpu, runner)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDING", "SUSPENDED", "NOT_FOUND"):
      raise LaunchError(f"queued resource {tpu.args.name} is {state}; see `gcloud compute tpus queued-resources "
                        f"describe {tpu.args.name} --zone={tpu.args.zone}`")
    runner.note(f"queued resource {tpu.args.name} is {state}; checking again in {tpu.args.poll_seconds} s")
    time.sleep(tpu.args.poll_seconds)


def finished(tpu: Tpu, runner: common.Runner) -> bool:
  """After an exit status 0: did the run end, or was it stopped after a checkpoint (preemption)?"""
  if tpu.done_file:
    return runner.run(tpu.exists(tpu.done_file), check=False, capture=True).returncode == 0
  listing = tpu.list_unfinished()
  if listing:
    out = runner.run(listing, check=False, capture=True)
    return out.returncode == 0 and not out.stdout.strip()
  return True


def follow(tpu: Tpu, runner: common.Runner, attempt: int) -> tuple[str, int]:
  """Stream worker 0 until the run ends: ('done'|'failed'|'preempted'|'interrupted', exit status)."""
  a = tpu.args
  check_startup = tpu.command[0] == "train"
  started = time.time()
  for _ in range(10):  # re-attach after a dropped ssh connection while the TPU stays up
    proc = runner.start(tpu.stream(attempt))
    while True:
      try:
        rc = proc.wait(timeout=a.poll_seconds)
        break
      except subprocess.TimeoutExpired:
        if not check_startup:
          continue
        if runner.run(tpu.exists(f"{tpu.workdir}/config.json"), check=False, capture=True, quiet=True).returncode == 0:
          check_startup = False
        elif time.time() - started > a.startup_timeout:
          proc.terminate()
          runner.run(tpu.stop(), check=False)
          raise LaunchError(
              f"the run has written nothing to {tpu.workdir} in {a.startup_timeout} s (no config.json): check that "
              f"the TPU's service account can write to the bucket, and worker 0's log above "
              f"(every worker's: ~/mfjax_run/attempt-{attempt}.log)")
    if rc == 0 and finished(tpu, runner):
      return "done", 0
    state = state_of(tpu, runner)
    if state == "UNKNOWN":
      runner.note(f"gcloud cannot tell {a.name}'s state (is this machine offline?); the run goes on there: "
                  "attaching again")
      continue
    if state != tpu.ready_state:
      runner.note(f"{a.name} is {state}: preempted or gone")
      return "preempted", rc
    if rc == 0:
      runner.note(f"the run stopped before its end; it resumes from {tpu.resumes_from}")
      return "interrupted", rc
    if rc == NO_EXIT_STATUS:  # its wrapper died with it: the VM restarted (maintenance), not a failure
      runner.note(f"the run on worker 0 ended without an exit status (the VM restarted?); it resumes from "
                  f"{tpu.resumes_from}")
      return "interrupted", rc
    if rc != SSH_LOST:
      return "failed", rc
    runner.note("lost the ssh connection to worker 0 while the TPU is up; attaching again")
  raise LaunchError("lost the ssh connection to worker 0 ten times in a row")


def save_before_leaving(tpu: Tpu, runner: common.Runner, attempt: int) -> None:
  """SIGTERM the run and wait (up to 5 minutes) for it to save its checkpoint and exit."""
  runner.note("asking the run to save a checkpoint before the TPU goes")
  runner.run(tpu.stop(), check=False)
  try:  # the stream ends when the run has exited
    subprocess.run(tpu.stream(attempt), timeout=300, stdout=subprocess.DEVNULL)
  except (subprocess.TimeoutExpired, KeyboardInterrupt):
    pass


def run(tpu: Tpu, runner: common.Runner) -> int:
  a = tpu.args
  runner.require(a.gcloud, "install the Google Cloud CLI (cloud.google.com/sdk) and run `gcloud auth login`, "
                 "or pass --gcloud PATH")
  if a.code == "copy":
    n = pack_worktree(common.ROOT, tpu.tarball)
    runner.note(f"packed {n} files of {common.ROOT} into {tpu.tarball} "
                f"({os.path.getsize(tpu.tarball) / 1e6:.1f} MB)")
  created = not a.reuse
  restarts, attempt = 0, 0
  try:
    if created:
      create(tpu, runner)
    while True:
      try:
        if attempt == 0 or created:
          for cmd in tpu.ship():
            runner.run(cmd)
        attempt += 1
        runner.run(tpu.start(attempt))
        outcome, rc = follow(tpu, runner, attempt)
      except LaunchError:
        if state_of(tpu, runner) in (tpu.ready_state, "UNKNOWN"):
          if attempt:  # the TPU may still run it: it saves a checkpoint before the TPU goes
            save_before_leaving(tpu, runner, attempt)
          raise
        runner.note(f"{a.name} went away during the install or start: preempted")
        outcome, rc = "preempted", 0
      if outcome == "done":
        runner.note(f"finished: results in {tpu.workdir}")
        return 0
      if outcome == "failed":
        runner.note(f"the run failed with exit status {rc}; worker 0's log is above, every worker's in "
                    f"~/mfjax_run/attempt-{attempt}.log")
        return rc
      if not a.watch or restarts >= a.max_restarts:
        runner.note(f"the run is incomplete ({outcome}); run the same command again to resume from "
                    f"{tpu.resumes_from}" + ("" if a.watch else " (--watch does this by itself)"))
        return INCOMPLETE
      restarts += 1
      created = outcome == "preempted"
      runner.note(f"--watch: restart {restarts} of {a.max_restarts}, resuming from {tpu.resumes_from}")
      if created:
        runner.run(tpu.delete(), check=False)
        try:
          create(tpu, runner)
        except LaunchError as e:
          raise LaunchError(f"{e}\nCould not create {a.name} again (no spot capacity?); the same command, later "
                            f"or with --queued, resumes from {tpu.resumes_from}") from None
  except KeyboardInterrupt:
    if attempt:
      save_before_leaving(tpu, runner, attempt)
    return 130
  finally:
    if a.keep:
      runner.note(f"--keep: {a.name} is still running and billed; delete it with: {common.shell_line(tpu.delete())}")
    elif runner.run(tpu.delete(), check=False).returncode != 0:
      runner.note(f"DELETING {a.name} FAILED; it is billed until you delete it: {common.shell_line(tpu.delete())}")
    if a.code == "copy" and os.path.exists(tpu.tarball):
      os.remove(tpu.tarball)


def dry_run(tpu: Tpu, runner: common.Runner) -> int:
  a, shape = tpu.args, tpu.shape
  runner.note(f"{a.type}: {shape['workers']} worker(s) x {shape['chips_per_worker']} chips, "
              f"{shape['devices']} JAX devices; runtime {tpu.runtime}"
              + ("; spot" if a.spot else "; preemptible" if a.preemptible else "; on demand"))
  runner.note(f"{tpu.workdir}: the same command started again resumes from {tpu.resumes_from}")
  if a.reuse:
    runner.note(f"--reuse: {a.name} exists already")
  else:
    runner.run(tpu.create())
    if a.queued:
      runner.note("then, until the queued resource is ACTIVE:")
      runner.run(tpu.describe())
  if a.code == "copy":
    runner.note(f"pack the git working tree of {common.ROOT} (tracked and untracked files, not ignored ones) "
                f"into {tpu.tarball}")
  for cmd in tpu.ship():
    runner.run(cmd)
  runner.run(tpu.start(1))
  runner.run(tpu.stream(1))
  if a.command[0] == "train":
    runner.note(f"while it runs, every {a.poll_seconds} s until it exists (at most {a.startup_timeout} s):")
    runner.run(tpu.exists(f"{tpu.workdir}/config.json"))
  if tpu.done_file:
    runner.note("when it exits 0: finished if this exists, else it was stopped (preempted) after a checkpoint:")
    runner.run(tpu.exists(tpu.done_file))
  elif tpu.list_unfinished():
    runner.note("when it exits 0: finished if this lists no run, else it was stopped (preempted) after a checkpoint:")
    runner.run(tpu.list_unfinished())
  runner.note(f"if it did not finish: preempted unless the state is {tpu.ready_state}:")
  runner.run(tpu.describe())
  if a.watch:
    runner.note(f"--watch, up to {a.max_restarts} times: a preempted TPU is created again and the run resumes "
                f"from {tpu.resumes_from}:")
    runner.run(tpu.delete())
    runner.run(tpu.create())
    for cmd in tpu.ship():
      runner.run(cmd)
    runner.run(tpu.start(2))
    runner.run(tpu.stream(2))
  else:
    runner.note("without --watch a preempted run stops here; the same command resumes it")
  runner.note("at the end, and after a failure or Ctrl-C" + (" (not with --keep):" if a.keep else ":"))
  runner.run(tpu.delete())
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="launch/tpu.sh", description=__doc__, formatter_class=common.HelpFormatter,
                              usage="%(prog)s [flags] -- {train,sweep,eval,pretrain} MFJAX_ARGS ... {--workdir,--runs-dir} gs://...")
  g = p.add_argument_group("the TPU")
  g.add_argument("--name", required=True, help="TPU (and queued resource) name")
  g.add_argument("--zone", required=True, help="zone, e.g. us-central2-b")
  g.add_argument("--project", help="Google Cloud project (default: gcloud's configured project)")
  g.add_argument("--type", required=True, help="accelerator type, e.g. v4-8, v4-32, v5litepod-16, v6e-8")
  g.add_argument("--runtime-version", help="TPU software version (default: the JAX image of the type's "
                 "generation: tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for "
                 "v5litepod, v2-alpha-tpuv6e for v6e)")
  g.add_argument("--spot", action="store_true", help="spot capacity: much cheaper, can be preempted at any time")
  g.add_argument("--preemptible", action="store_true", help="legacy preemptible TPU VM (prefer --spot)")
  g.add_argument("--queued", action="store_true", help="request it as a queued resource and wait until it is "
                 "ACTIVE (needed for large v5e/v5p/v6e slices)")
  g.add_argument("--valid-until-duration", help="with --queued: give up waiting after this long, e.g. 6h (default: wait until it is served)")
  g.add_argument("--create-flag", action="append", default=[], metavar="FLAG",
                 help="extra flag for the gcloud create command, e.g. --create-flag=--network=my-net (repeatable)")
  g.add_argument("--reuse", action="store_true", help="use the existing TPU called --name instead of creating one")
  g.add_argument("--keep", action="store_true", help="do not delete the TPU at the end (it stays billed)")
  g = p.add_argument_group("code and install")
  g.add_argument("--code", choices=["copy", "git"], default="copy",
                 help="copy: send this working tree (git ls-files: tracked and untracked, not ignored); "
                 "git: clone --repo and check out --commit on the workers")
  g.add_argument("--repo", help="with --code git: the repository URL (default: this checkout's origin)")
  g.add_argument("--commit", help="with --code git: the commit to check out (default: this checkout's HEAD)")
  g.add_argument("--python", default="3.12", help="Python version of the workers' virtualenv (made with uv)")
  g.add_argument("--extras", default="tpu", help="mfjax extras to install")
  g = p.add_argument_group("the run")
  g.add_argument("--stage", action="append", type=stage_pair, default=[], metavar="gs://SRC=PATH",
                 help="copy a bucket folder to PATH on every worker before the run (gcloud storage rsync), e.g. the "
                 "built dataset, its download folder's CSV files, converted checkpoints; a relative PATH is in "
                 "the checkout, where the run starts (repeatable)")
  g.add_argument("--env", action="append", type=common.key_value, default=[], metavar="KEY=VALUE",
                 help="environment variable for the run on every worker (repeatable)")
  g.add_argument("--watch", action="store_true", help="when a spot/preemptible TPU is preempted, create it again "
                 "and resume from the last checkpoint")
  g.add_argument("--max-restarts", type=int, default=10, help="with --watch: restarts before giving up")
  g.add_argument("--poll-seconds", type=float, default=30.0, help="how often to check the TPU and the workdir")
  g.add_argument("--startup-timeout", type=float, default=600.0, help="stop if `mfjax train` has written no "
                 "config.json to the workdir after this many seconds (install, data staging and start-up)")
  g = p.add_argument_group("this launcher")
  g.add_argument("--dry-run", action="store_true", help="print the commands (gcloud, ssh and the scripts they "
                 "run on the workers) without running any")
  g.add_argument("--gcloud", default="gcloud", help="the gcloud program")
  return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], str]:
  parser = build_parser()
  if "--" in argv:
    cut = argv.index("--")
    own, rest = argv[:cut], argv[cut + 1:]
  else:
    own, rest = argv, []
  args = parser.parse_args(own)
  command, workdir = common.mfjax_command(rest)
  if command[0] == "segment":
    raise LaunchError("mfjax segment writes its preprocessed volumes and predictions as local files, which a TPU "
                      "pod's gs:// workdir cannot hold: run it with launch/gpu.sh, or on one TPU VM directly")
  if not workdir.startswith("gs://"):
    raise LaunchError(f"{common.RUN_FOLDER_FLAGS[command[0]]} {workdir}: on TPUs it must be a gs:// path. Every "
                      "worker writes its part of each checkpoint there, and it must outlive the TPU, which is "
                      "deleted at the end")
  if args.spot and args.preemptible:
    raise LaunchError("--spot and --preemptible exclude each other (prefer --spot)")
  if args.queued and args.preemptible:
    raise LaunchError("queued resources take --spot, not --preemptible")
  if args.valid_until_duration and not args.queued:
    raise LaunchError("--valid-until-duration needs --queued")
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", args.name):
    raise LaunchError(f"--name {args.name!r}: lowercase letters, digits and hyphens, starting with a letter")
  if not re.fullmatch(r"[a-z0-9_-]+(,[a-z0-9_-]+)*", args.extras):
    raise LaunchError(f"--extras {args.extras!r}: comma-separated extra names, e.g. tpu")
  if args.code == "git":
    args.repo = args.repo or _git("remote", "get-url", "origin", what="--repo")
    args.commit = args.commit or _git("rev-parse", "HEAD", what="--commit")
  elif args.repo or args.commit:
    raise LaunchError("--repo and --commit go with --code git")
  args.command = command
  slice_shape(args.type)
  return args, command, workdir


def _git(*words: str, what: str) -> str:
  out = subprocess.run(["git", "-C", common.ROOT, *words], capture_output=True, text=True)
  if out.returncode != 0 or not out.stdout.strip():
    raise LaunchError(f"--code git: could not read `git {' '.join(words)}` in {common.ROOT}; pass {what}")
  return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, command, workdir = parse(argv)
    tpu = Tpu(args, command, workdir)
    runner = common.Runner(args.dry_run)
    return dry_run(tpu, runner) if args.dry_run else run(tpu, runner)
  except LaunchError as e:
    print(f"launch/tpu.sh: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

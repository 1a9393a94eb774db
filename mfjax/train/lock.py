"""One job at a time in a workdir: WORKDIR/lock.json names the job that trains there.

A second `mfjax train` (segment, pretrain) on a workdir in use is refused with the holder's host,
process, command and start time; two sweeps over one runs folder (on two machines, say) share its
runs, each skipping what the other holds. A lock whose job is gone is taken over with a warning:
- on the same machine (host name, boot and process namespace), when its process no longer runs;
- when it names the same launcher job as ours (MFJAX_JOB_ID, or SLURM_JOB_ID): a requeued job
  starts only after its last attempt ended, on whichever node;
- from anywhere, when it has not been refreshed for STALE_AFTER_S: the holder refreshes it every
  HEARTBEAT_S from a background thread.
A local lock is created atomically (O_EXCL). An object store (gs://) has no exclusive create here:
there the lock is written, read back after a pause, and kept only if it is still ours, which
catches all but near-simultaneous starts.
"""
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

from mfjax.config import RunStopped

log = logging.getLogger("mfjax")
LOCK_FILE = "lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
REMOTE_SETTLE_S = 2.0


class WorkdirBusy(RunStopped):
  """The workdir is in use by another job; the message names it."""


def _machine() -> str:
  """This kernel's boot and process namespace (Linux; "" elsewhere): a pid is checked only where both
  match, not on another machine (or container) that happens to have the same host name."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
  except OSError:
    return ""


def _process_start(pid: int) -> str:
  """The start time of `pid` in clock ticks since boot (Linux), "" where unknown: tells a live
  holder from a later process that reuses its pid."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def _job_id() -> str:
  return os.environ.get("MFJAX_JOB_ID") or os.environ.get("SLURM_JOB_ID") or ""


def _process_running(record: dict) -> bool:
  pid = int(record.get("pid", 0))
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process
  started = record.get("process_start", "")
  return not started or _process_start(pid) in ("", started)


def why_stale(record: dict, now: float | None = None) -> str:
  """Why the job that wrote `record` is gone ("" when it may still be running)."""
  now = time.time() if now is None else now
  same_machine = record.get("host") == socket.gethostname() and record.get("machine", "") == _machine()
  if same_machine and not _process_running(record):
    return f"its process {record.get('pid')} is no longer running"
  if _job_id() and record.get("job") == _job_id():
    return f"it is an earlier attempt of this launcher job ({_job_id()})"
  silent = now - float(record.get("alive", 0))
  if silent > STALE_AFTER_S:
    return f"it has not been refreshed for {silent:.0f} s"
  return ""


def describe(record: dict, now: float | None = None) -> str:
  now = time.time() if now is None else now
  command = " ".join(record.get("command", [])) or "?"
  return (f"host {record.get('host', '?')}, process {record.get('pid', '?')}, started "
          f"{record.get('started_utc', '?')}, refreshed {now - float(record.get('alive', 0)):.0f} s ago: {command}")


class WorkdirLock:
  """Held from `acquire()` to `release()`; refreshed in between by a daemon thread."""

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.remote = "://" in str(workdir)
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None
    self.made_folder = False

  def record(self) -> dict:
    return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "machine": _machine(),
            "process_start": _process_start(os.getpid()), "job": _job_id(),
            "command": ["mfjax", *sys.argv[1:]],
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "alive": time.time()}

  def _read(self) -> dict | None:
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
      if not isinstance(record, dict):
        raise ValueError("not an object")
      return record
    except ValueError:  # a holder killed while writing it: nothing can be running from it
      return {"damaged": text[:200]}

  def _create(self, record: dict) -> bool:
    """Write the lock if there is none; False if another job's is there. Locally the whole file
    appears at once (a hard link of a finished one), so no job ever reads a half-written lock."""
    text = json.dumps(record, indent=2)
    if self.remote:
      if self.path.exists():
        return False
      self.path.write_text(text)
      time.sleep(REMOTE_SETTLE_S)
      return (self._read() or {}).get("token") == self.token
    written = self.path.parent / f".{LOCK_FILE}.{self.token}"
    written.write_text(text)
    try:
      os.link(written, self.path)
      return True
    except FileExistsError:
      return False
    except OSError:  # a file system without hard links: an exclusive create, then the text
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return True
    finally:
      written.unlink(missing_ok=True)

  def acquire(self) -> "WorkdirLock":
    self.made_folder = not self.remote and not self.path.parent.exists()
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._record = self.record()
    for _ in range(3):  # another job may take over the same stale lock at the same moment
      if self._create(self._record):
        self._start_heartbeat()
        return self
      held = self._read()
      if held is None:
        continue  # released meanwhile
      why = "it is damaged" if "damaged" in held else why_stale(held)
      if not why:
        raise WorkdirBusy(f"{self.path.parent} is in use by another job ({describe(held)}). Wait for it to "
                          f"end, or use another --workdir. If that job is gone, its lock is taken over "
                          f"{STALE_AFTER_S:.0f} s after its last refresh, or delete {self.path}")
      log.warning("taking over %s: %s (%s)", self.path, why,
                  held.get("damaged") if "damaged" in held else describe(held))
      self._remove_if(held)
    raise WorkdirBusy(f"{self.path}: other jobs keep taking this workdir; start one job at a time")

  def _remove_if(self, held: dict) -> None:
    """Delete the lock if it is still `held` (not a newer one another job has just written)."""
    if self._read() == held:
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()

  def _write_refresh(self) -> bool:
    current = self._read()
    if current is None or current.get("token") != self.token:
      log.error("%s is no longer this job's lock (now: %s): another job may be writing to this workdir",
                self.path, describe(current) if current and "damaged" not in current else current)
      return False
    self._record["alive"] = time.time()
    partial = self.path.parent / f".{LOCK_FILE}.{self.token}"
    text = json.dumps(self._record, indent=2)
    if self.remote:
      self.path.write_text(text)
    else:
      partial.write_text(text)
      os.replace(partial, self.path)
    return True

  def _start_heartbeat(self) -> None:
    def refresh():
      while not self._stop.wait(HEARTBEAT_S):
        try:
          if not self._write_refresh():
            return
        except OSError as e:  # a full disk or a network blip: the next refresh tries again
          log.warning("could not refresh %s: %s", self.path, e)
    self._thread = threading.Thread(target=refresh, name="mfjax-workdir-lock", daemon=True)
    self._thread.start()

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    current = self._read()
    if current is not None and current.get("token") == self.token:
      self.path.unlink()
    if self.made_folder and not any(self.path.parent.iterdir()):  # a config error before anything was written
      self.path.parent.rmdir()


@contextlib.contextmanager
def holding(workdir):
  """The workdir's lock around the `with` body. In a multi-process job process 0 holds it for all,
  and every process raises WorkdirBusy when it is in use."""
  from mfjax import parallel
  import jax
  lock = WorkdirLock(workdir)

  def try_acquire():
    try:
      lock.acquire()
    except WorkdirBusy as e:
      return e
    return None

  busy = parallel.on_process_zero(f"lock {lock.path.parent}", try_acquire)
  if parallel.same_on_every_process(int(busy is not None)):
    raise busy or WorkdirBusy(f"{lock.path.parent} is in use by another job (process 0's output names it)")
  try:
    yield
  finally:
    if jax.process_index() == 0:
      lock.release()

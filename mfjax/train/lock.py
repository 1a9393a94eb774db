"""One job at a time in a workdir: WORKDIR/lock.json names the job that trains there.

A second `mfjax train` (segment, pretrain) on a workdir in use is refused with the holder's host,
process, command and start time; two sweeps over one runs folder (on two machines, say) share its
runs, each skipping what the other holds. A lock whose job is gone is taken over with a warning:
- on the same machine (host name, boot and process namespace), when its process no longer runs
  (a live one there always keeps it);
- from another machine, when it is an earlier attempt of our launcher job (the same MFJAX_JOB_ID
  or SLURM_JOB_ID with a lower MFJAX_JOB_ATTEMPT or SLURM_RESTART_COUNT): a requeued job starts
  only after its last attempt ended, on whichever node;
- from anywhere, when it has not been refreshed for STALE_AFTER_S: the holder refreshes it every
  HEARTBEAT_S from a background thread.
A job whose lock another job took meanwhile (it was silent that long: suspended, say) stops at its
next checkpoint instead of writing one (`check_still_held`). A local lock appears whole and at once
(a hard link of a written file). An object store (gs://) has no exclusive create here: there the
lock is written, read back after a pause, and kept only if it is still ours, which catches all but
near-simultaneous starts.
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


class WorkdirLost(RunStopped):
  """Another job took this job's lock while it ran (it was silent for STALE_AFTER_S)."""


_HELD: dict = {}  # workdir -> the WorkdirLock this process holds there


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


def _job() -> tuple[str, int]:
  """(launcher job id, attempt): what a requeued job keeps, and what it counts up."""
  if os.environ.get("MFJAX_JOB_ID"):
    return os.environ["MFJAX_JOB_ID"], int(os.environ.get("MFJAX_JOB_ATTEMPT", "0"))
  return os.environ.get("SLURM_JOB_ID", ""), int(os.environ.get("SLURM_RESTART_COUNT", "0"))


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
  if record.get("host") == socket.gethostname() and record.get("machine", "") == _machine():
    return "" if _process_running(record) else f"its process {record.get('pid')} is no longer running"
  job, attempt = _job()
  if job and record.get("job") == job and int(record.get("attempt", 0)) < attempt:
    return f"it is attempt {record.get('attempt', 0)} of this launcher job ({job}), which is at attempt {attempt}"
  silent = now - float(record.get("alive", 0))
  if silent > STALE_AFTER_S:
    return f"it has not been refreshed for {silent:.0f} s"
  return ""


def _parse(text: str) -> dict:
  try:
    record = json.loads(text)
    if isinstance(record, dict):
      return record
  except ValueError:
    pass
  return {"damaged": text[:200]}  # edited by hand, or a disk fault: nothing can be running from it


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
    self.lost = ""  # set by the refresh thread when another job has taken the lock

  def record(self) -> dict:
    job, attempt = _job()
    return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "machine": _machine(),
            "process_start": _process_start(os.getpid()), "job": job, "attempt": attempt,
            "command": ["mfjax", *sys.argv[1:]],
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "alive": time.time()}

  def _read(self) -> dict | None:
    try:
      return _parse(self.path.read_text())
    except FileNotFoundError:
      return None

  def _staged(self, record: dict):
    """`record` written whole beside the lock, to be linked or renamed into place (local workdirs)."""
    staged = self.path.parent / f".{LOCK_FILE}.{self.token}"
    staged.write_text(json.dumps(record, indent=2))
    return staged

  def _create(self, record: dict) -> bool:
    """Write the lock if there is none; False if another job's is there. Locally the whole file
    appears at once (a hard link of a finished one), so no job ever reads a half-written lock."""
    if self.remote:
      if self.path.exists():
        return False
      self.path.write_text(json.dumps(record, indent=2))
      time.sleep(REMOTE_SETTLE_S)
      return (self._read() or {}).get("token") == self.token
    written = self._staged(record)
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
        f.write(json.dumps(record, indent=2))
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
    """Delete the lock if it is still `held`, not a newer one another job has just written. Locally
    it is first renamed away (atomic), and put back if it turns out to be the newer one."""
    if self.remote:
      if self._read() == held:
        with contextlib.suppress(FileNotFoundError):
          self.path.unlink()
      return
    taken = self.path.parent / f".{LOCK_FILE}.{self.token}.stale"
    try:
      os.rename(self.path, taken)
    except FileNotFoundError:
      return
    try:
      with open(taken) as f:
        text = f.read()
      if _parse(text) != held:
        with contextlib.suppress(FileExistsError):
          os.link(taken, self.path)
    finally:
      taken.unlink(missing_ok=True)

  def _write_refresh(self) -> bool:
    current = self._read()
    if current is None or current.get("token") != self.token:
      now_held = describe(current) if current and "damaged" not in current else current
      self.lost = (f"{self.path} was taken by another job ({now_held}) while this one ran: it went "
                   f"unrefreshed for {STALE_AFTER_S:.0f} s (suspended? clocks apart?)")
      log.error("%s; this job stops at its next checkpoint", self.lost)
      return False
    self._record["alive"] = time.time()
    if self.remote:
      self.path.write_text(json.dumps(self._record, indent=2))
    else:
      os.replace(self._staged(self._record), self.path)
    return True

  def _start_heartbeat(self) -> None:
    def refresh():
      while not self._stop.wait(HEARTBEAT_S):
        try:
          if not self._write_refresh():
            return
        except Exception as e:  # noqa: BLE001 - a full disk, a network blip (gcsfs's HttpError): try again
          log.warning("could not refresh %s: %s: %s", self.path, type(e).__name__, e)
    self._thread = threading.Thread(target=refresh, name="mfjax-workdir-lock", daemon=True)
    self._thread.start()

  def release(self) -> None:
    """Stop refreshing and delete the lock (if still ours); a failure here is a warning, not the run's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      current = self._read()
      if current is not None and current.get("token") == self.token:
        self.path.unlink(missing_ok=True)
      if self.made_folder and not any(self.path.parent.iterdir()):  # a config error before anything was written
        self.path.parent.rmdir()
    except Exception as e:  # noqa: BLE001
      log.warning("could not remove %s: %s: %s", self.path, type(e).__name__, e)


def check_still_held(workdir) -> None:
  """Before a checkpoint: every process stops (WorkdirLost) when another job took process 0's lock of
  `workdir` meanwhile, so that two jobs never write one run's checkpoints."""
  from mfjax import parallel
  held = _HELD.get(str(workdir))
  lost = held.lost if held is not None else ""
  if parallel.same_on_every_process(int(bool(lost))):
    raise WorkdirLost(lost or "process 0 lost this workdir's lock to another job (its output says which)")


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
  if jax.process_index() == 0:
    _HELD[str(workdir)] = lock
  try:
    yield
  finally:
    if jax.process_index() == 0:
      _HELD.pop(str(workdir), None)
      lock.release()

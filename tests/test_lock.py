"""One job per workdir (mfjax.train.lock): refusals name the holder; a lock whose job is gone is taken over."""
import json
import logging
import os
import re
import socket
import subprocess
import time

import pytest

from mfjax import cli
from mfjax.train import lock


@pytest.fixture
def live_process():
  """Another process on this host, running until the test ends: a live holder."""
  proc = subprocess.Popen(["sleep", "600"])
  yield proc
  proc.kill()
  proc.wait()


def write_lock(workdir, alive_ago=0.0, **fields):
  record = {"token": "other", "host": socket.gethostname(), "pid": 1, "machine": lock._machine(),
            "process_start": "", "job": "", "command": ["mfjax", "train", "--workdir", str(workdir)],
            "started_utc": "2026-12-07 10:00:00", "alive": time.time() - alive_ago, **fields}
  os.makedirs(workdir, exist_ok=True)
  (workdir / lock.LOCK_FILE).write_text(json.dumps(record))
  return record


def held_by(proc) -> dict:
  return {"pid": proc.pid, "process_start": lock._process_start(proc.pid)}


def test_a_second_job_is_refused_with_the_holders_name_and_the_first_releases(tmp_path):
  first = lock.WorkdirLock(tmp_path / "run").acquire()
  with pytest.raises(lock.WorkdirBusy) as refused:
    lock.WorkdirLock(tmp_path / "run").acquire()
  message = str(refused.value)
  assert f"process {os.getpid()}" in message and socket.gethostname() in message and "mfjax" in message
  assert "refreshed 0 s ago" in message and str(tmp_path / "run" / lock.LOCK_FILE) in message
  first.release()
  assert not (tmp_path / "run" / lock.LOCK_FILE).exists()
  lock.WorkdirLock(tmp_path / "run").acquire().release()
  assert (tmp_path / "run").is_dir() is False  # made for the lock alone, with nothing written in it


def test_a_live_holder_on_this_host_or_a_fresh_one_elsewhere_keeps_the_workdir(tmp_path, live_process, monkeypatch):
  write_lock(tmp_path / "a", **held_by(live_process))
  with pytest.raises(lock.WorkdirBusy, match=f"process {live_process.pid}"):
    lock.WorkdirLock(tmp_path / "a").acquire()
  write_lock(tmp_path / "b", alive_ago=60, host="another-host", pid=live_process.pid)
  with pytest.raises(lock.WorkdirBusy, match="host another-host.*refreshed 60 s ago"):
    lock.WorkdirLock(tmp_path / "b").acquire()
  assert json.loads((tmp_path / "b" / lock.LOCK_FILE).read_text())["token"] == "other"  # left as it was
  # A live process here keeps it even within our launcher job (two `srun` steps of one allocation),
  # and so does the same attempt of our job elsewhere.
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
  monkeypatch.delenv("MFJAX_JOB_ID", raising=False)
  write_lock(tmp_path / "d", job="77", attempt=1, **held_by(live_process))
  write_lock(tmp_path / "e", job="77", attempt=2, host="another-host")
  for name in ("d", "e"):
    with pytest.raises(lock.WorkdirBusy):
      lock.WorkdirLock(tmp_path / name).acquire()
  # The same host name on another machine (or container): its pids mean nothing here.
  ended = subprocess.Popen(["true"])
  ended.wait()
  write_lock(tmp_path / "c", pid=ended.pid, machine="another-boot/pid:[4026531836]")
  with pytest.raises(lock.WorkdirBusy, match=f"process {ended.pid}"):
    lock.WorkdirLock(tmp_path / "c").acquire()


@pytest.mark.parametrize("case,fields,why", [
    ("ended", "dead_pid", "its process .* is no longer running"),
    ("pid reused", {"pid": os.getpid(), "process_start": "1"}, "is no longer running"),
    ("silent elsewhere", {"host": "another-host", "alive_ago": lock.STALE_AFTER_S + 5},
     "has not been refreshed for 30[5-9] s"),
    ("earlier attempt of our launcher job", {"host": "another-host", "job": "slurm-42", "attempt": 0},
     r"attempt 0 of this launcher job \(slurm-42\), which is at attempt 1"),
])
def test_a_lock_whose_job_is_gone_is_taken_over_with_a_warning(tmp_path, monkeypatch, caplog, case, fields, why):
  if fields == "dead_pid":
    ended = subprocess.Popen(["true"])
    ended.wait()
    fields = {"pid": ended.pid}
  monkeypatch.setenv("MFJAX_JOB_ID", "slurm-42")
  monkeypatch.setenv("MFJAX_JOB_ATTEMPT", "1")
  if case != "earlier attempt of our launcher job":
    monkeypatch.delenv("MFJAX_JOB_ID")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
  write_lock(tmp_path, **fields)
  with caplog.at_level(logging.WARNING, logger="mfjax"):
    taken = lock.WorkdirLock(tmp_path).acquire()
  try:
    assert any(r.getMessage().startswith("taking over") and re.search(why, r.getMessage())
               for r in caplog.records), caplog.text
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["token"] == taken.token
  finally:
    taken.release()


def test_a_damaged_lock_is_taken_over(tmp_path, caplog):
  (tmp_path / lock.LOCK_FILE).write_text('{"token": "x", "ho')  # its writer killed mid-write
  with caplog.at_level(logging.WARNING, logger="mfjax"):
    lock.WorkdirLock(tmp_path).acquire().release()
  assert "it is damaged" in caplog.text


def test_the_holder_refreshes_its_lock_and_stops_at_its_next_checkpoint_once_another_job_took_it(
    tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
  with lock.holding(tmp_path):
    held = lock._HELD[str(tmp_path)]
    first = json.loads((tmp_path / lock.LOCK_FILE).read_text())["alive"]
    deadline = time.time() + 10
    while json.loads((tmp_path / lock.LOCK_FILE).read_text())["alive"] == first and time.time() < deadline:
      time.sleep(0.02)
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["alive"] > first
    lock.check_still_held(tmp_path)
    with caplog.at_level(logging.ERROR, logger="mfjax"):
      write_lock(tmp_path, token="a-newer-job", host="another-host")  # it judged ours stale (we were suspended)
      held._thread.join(timeout=10)
    assert not held._thread.is_alive() and "was taken by another job (host another-host" in caplog.text
    with pytest.raises(lock.WorkdirLost, match="taken by another job"):
      lock.check_still_held(tmp_path)
  assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["token"] == "a-newer-job"  # left alone
  assert str(tmp_path) not in lock._HELD


def test_a_finished_run_is_only_read_and_takes_no_lock(tmp_path):
  from mfjax.train import fit
  seen = []
  train = fit.holds_workdir(lambda config, workdir: seen.append(os.listdir(workdir)))
  (tmp_path / "run").mkdir()
  train(None, str(tmp_path / "run"))
  (tmp_path / "run" / "result.json").write_text("{}")
  train(None, str(tmp_path / "run"))
  assert seen == [[lock.LOCK_FILE], ["result.json"]]


def test_train_on_a_busy_workdir_exits_75_having_written_nothing(tmp_path, live_process, capsys):
  workdir = tmp_path / "run"
  write_lock(workdir, **held_by(live_process))
  rc = cli.main(["train", "--config", "configs/tiny.py:model=deit_base_patch16,dataset=aptos2019",
                 "--workdir", str(workdir), "--no-progress"])
  assert rc == cli.WORKDIR_BUSY == 75
  assert "is in use by another job" in capsys.readouterr().err
  assert sorted(os.listdir(workdir)) == [lock.LOCK_FILE]

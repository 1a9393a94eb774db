"""Two real JAX processes on this machine, for the tests of multi-process jobs."""
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def xla_devices(count: int) -> str:
  """XLA_FLAGS for a subprocess with `count` CPU devices, keeping the suite's compile flags (conftest.py)."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()


def run_script_twice(script: str, *args: str, devices_per_process: int, timeout: float = 240) -> list[str]:
  """`python SCRIPT PROCESS_ID PORT ARGS...` as processes 0 and 1 of one job (CPU devices, gloo
  collectives): each one's output. A process that exits non-zero, or a job that runs past `timeout`
  (a hang: both are killed), fails the test with both outputs."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
         "XLA_FLAGS": xla_devices(devices_per_process),
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  port = free_port()
  with tempfile.TemporaryDirectory() as folder:
    logs = [open(os.path.join(folder, f"process_{p}.log"), "w+") for p in range(2)]
    procs = [subprocess.Popen([sys.executable, script, str(p), str(port), *args], env=env, cwd=ROOT,
                              stdout=logs[p], stderr=subprocess.STDOUT, text=True) for p in range(2)]
    deadline = time.time() + timeout
    timed_out = True
    try:
      while time.time() < deadline:
        if all(p.poll() is not None for p in procs):
          timed_out = False
          break
        time.sleep(0.2)
    finally:
      for p in procs:
        p.kill()
        p.wait()
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read())
      log.close()
  report = "".join(f"\n--- process {i} (exit status {p.returncode}):\n{out[-3000:]}"
                   for i, (p, out) in enumerate(zip(procs, outputs)))
  assert not timed_out, f"ran past {timeout} s (a hang?):{report}"
  assert all(p.returncode == 0 for p in procs), report
  return outputs

"""Two real JAX processes on this machine, for the tests of multi-process jobs."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_script_twice(script: str, *args: str, devices_per_process: int, timeout: float = 240) -> list[str]:
  """`python SCRIPT PROCESS_ID PORT ARGS...` as processes 0 and 1 of one job (CPU devices, gloo
  collectives), each with its output; both are killed when either runs past `timeout`. A process
  that exits non-zero fails the test with its output."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  port = free_port()
  procs = [subprocess.Popen([sys.executable, script, str(p), str(port), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs

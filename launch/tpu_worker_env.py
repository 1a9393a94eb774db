"""Run on each worker of a Cloud TPU slice: prints the `export MFJAX_...` lines that make the
workers join one JAX job (mfjax.parallel.maybe_initialize_distributed reads them).

The worker's number and the slice's worker addresses come from the GCE metadata server, the same
keys JAX's own Cloud TPU detection reads (agent-worker-number, worker-network-endpoints). A
single-worker TPU needs nothing and gets no exports.

  exports=$(python -m launch.tpu_worker_env --port 8482 --expect-workers 4) && eval "$exports"
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import urllib.error
import urllib.request


def metadata(key: str) -> str:
  # GCE_METADATA_IP overrides the server, as in JAX (host or host:port).
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  url = f"http://{host}/computeMetadata/v1/instance/attributes/{key}"
  error = None
  for _ in range(6):
    try:
      request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
      with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode().strip()
    except (urllib.error.URLError, OSError) as e:
      error = e
      time.sleep(1)
  raise SystemExit(f"tpu_worker_env: cannot read the TPU metadata {key!r} from {url}: {error}. "
                   "This must run on a Cloud TPU VM.")


def worker_addresses(endpoints: str) -> list[str]:
  """worker-network-endpoints is either `host,host,...` or `name:id:ip,name:id:ip,...`."""
  addresses = []
  for worker in filter(None, endpoints.split(",")):
    parts = worker.split(":")
    if len(parts) == 1:
      addresses.append(parts[0])
    elif len(parts) == 3:
      addresses.append(parts[2])
    else:
      raise SystemExit(f"tpu_worker_env: unexpected worker-network-endpoints entry {worker!r}")
  if not addresses:
    raise SystemExit(f"tpu_worker_env: no workers in worker-network-endpoints {endpoints!r}")
  return addresses


def exports(port: int, expect_workers: int | None = None) -> str:
  addresses = worker_addresses(metadata("worker-network-endpoints"))
  if expect_workers is not None and expect_workers != len(addresses):
    print(f"tpu_worker_env: warning: expected {expect_workers} workers for this TPU type, the metadata lists "
          f"{len(addresses)}; using {len(addresses)}", file=sys.stderr)
  if len(addresses) == 1:
    return ""
  worker = int(metadata("agent-worker-number"))
  values = {"MFJAX_COORDINATOR": f"{addresses[0]}:{port}", "MFJAX_NUM_PROCESSES": str(len(addresses)),
            "MFJAX_PROCESS_ID": str(worker)}
  return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in values.items())


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--port", type=int, default=8482, help="the coordinator's port on worker 0 (default: %(default)s)")
  p.add_argument("--expect-workers", type=int, help="warn if the slice has another number of workers")
  args = p.parse_args(argv)
  text = exports(args.port, args.expect_workers)
  if text:
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())

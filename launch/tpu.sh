#!/usr/bin/env bash
# Cloud TPU launcher (launch/tpu.py); `launch/tpu.sh --help` lists its flags.
# Needs only python3 (standard library) and the Google Cloud CLI on this machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${MFJAX_LAUNCH_PYTHON:-python3}" -m launch.tpu "$@"

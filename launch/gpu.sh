#!/usr/bin/env bash
# GPU launcher (launch/gpu.py): `launch/gpu.sh local|slurm --help` lists its flags.
# Needs only python3 (standard library), and sbatch for the slurm mode.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${MFJAX_LAUNCH_PYTHON:-python3}" -m launch.gpu "$@"

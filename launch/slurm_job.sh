#!/usr/bin/env bash
# One mfjax run on a SLURM allocation: one task per node, each driving all of its node's GPUs.
# launch/gpu.sh slurm submits it with the right flags; by hand (from the mfjax checkout):
#
#   MFJAX_ROOT=$PWD MFJAX_PYTHON=$PWD/.venv/bin/python MFJAX_GPUS_PER_NODE=8 \
#   sbatch --nodes=2 --gpus-per-node=8 --time=24:00:00 launch/slurm_job.sh \
#       train --config configs/paper.py:model=dinov2_vitb14,dataset=aptos2019 --workdir /shared/runs/x
#
# srun starts one process per node; mfjax calls jax.distributed.initialize(), which reads SLURM's
# variables. JAX's SLURM detection would give each process only the GPU numbered SLURM_LOCALID;
# JAX_LOCAL_DEVICE_IDS gives it all of the node's GPUs instead.
#
# Preemption and time limits: SLURM sends SIGTERM to the tasks (--signal=TERM@N: N seconds before
# the time limit); mfjax saves a checkpoint and exits 0 without result.json. This script then
# requeues the job, at most MFJAX_MAX_RESTARTS times, and the requeued job resumes from the
# workdir's checkpoints.
#
# Variables: MFJAX_ROOT (the checkout, on a filesystem every node sees), MFJAX_PYTHON (a Python
# with mfjax's dependencies, default python3), MFJAX_GPUS_PER_NODE (default SLURM_GPUS_ON_NODE),
# MFJAX_MAX_RESTARTS (default 0), MFJAX_DONE_FILE (the file a finished run leaves, e.g.
# WORKDIR/result.json; empty: a sweep is finished when `mfjax sweep ... --list` lists no run,
# anything else when it exits 0), MFJAX_DRY_RUN (print the srun command instead of running it).
#SBATCH --job-name=mfjax
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=TERM@300
set -euo pipefail

: "${MFJAX_ROOT:?set MFJAX_ROOT to the mfjax checkout, on a filesystem every node sees}"
: "${MFJAX_PYTHON:=python3}"
: "${MFJAX_MAX_RESTARTS:=0}"
: "${MFJAX_DONE_FILE:=}"
gpus="${MFJAX_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
if [ "$gpus" -gt 0 ]; then
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi
cd "$MFJAX_ROOT"
# srun no longer inherits sbatch's --cpus-per-task (Slurm 22.05): pass it on, or data loading gets one CPU.
cmd=(srun --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} --kill-on-bad-exit=1
     "$MFJAX_PYTHON" -m mfjax.cli "$@")

if [ -n "${MFJAX_DRY_RUN:-}" ]; then
  printf 'cd %q\n' "$MFJAX_ROOT"
  printf 'JAX_LOCAL_DEVICE_IDS=%s' "${JAX_LOCAL_DEVICE_IDS:-}"  # digits and commas
  printf ' %q' "${cmd[@]}"
  echo
  exit 0
fi

echo "mfjax: job ${SLURM_JOB_ID:-?}, restart ${SLURM_RESTART_COUNT:-0}, nodes ${SLURM_JOB_NODELIST:-?}: ${cmd[*]}"
"${cmd[@]}" &
srun_pid=$!
# On preemption SLURM signals this shell too: keep waiting, so that the tasks (to which srun
# passes the SIGTERM on) can save their checkpoint.
trap 'echo "mfjax: SIGTERM, waiting for the tasks to save a checkpoint"' TERM
rc=0
wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2> /dev/null; do
  rc=0
  wait "$srun_pid" || rc=$?
done

# Did the run end, or was it stopped after a checkpoint (time limit, preemption)? Both exit 0.
finished() {
  [ "$rc" -eq 0 ] || return 1
  if [ -n "$MFJAX_DONE_FILE" ]; then
    case "$MFJAX_DONE_FILE" in
      gs://*)  # a bucket: asked through mfjax's own file system layer (gcsfs), as launch/gpu.py does
        exists=0
        "$MFJAX_PYTHON" -c "import sys; from etils import epath; sys.exit(0 if epath.Path(sys.argv[1]).exists() else 3)" \
          "$MFJAX_DONE_FILE" || exists=$?
        if [ "$exists" -ne 0 ] && [ "$exists" -ne 3 ]; then
          echo "mfjax: cannot tell whether $MFJAX_DONE_FILE exists; install gcsfs (pip install -e '.[gcs]') in $MFJAX_PYTHON" >&2
          exit 2
        fi
        [ "$exists" -eq 0 ] ;;
      *) [ -f "$MFJAX_DONE_FILE" ] ;;
    esac
  elif [ "$1" = sweep ]; then
    # A finished sweep has no run left to list.
    unfinished="$("$MFJAX_PYTHON" -m mfjax.cli "$@" --list)" && [ -z "$unfinished" ]
  fi
}

if finished "$@"; then
  echo "mfjax: finished"
  exit 0
fi
if [ "$rc" -ne 0 ]; then
  echo "mfjax: srun failed with exit status $rc"
  exit "$rc"
fi
restarts="${SLURM_RESTART_COUNT:-0}"
if [ "$restarts" -lt "$MFJAX_MAX_RESTARTS" ]; then
  echo "mfjax: stopped before the end (time limit or preemption) after saving a checkpoint;" \
    "requeueing (restart $((restarts + 1)) of $MFJAX_MAX_RESTARTS)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "mfjax: stopped before the end, and all $MFJAX_MAX_RESTARTS restarts are used;" \
  "submit the same command again to resume from the checkpoint"
exit 3

#!/bin/bash
# Synthetic set generation as a SLURM job array: array task i writes shard group i of N
# (jedi-synth's worker_index / num_workers_total). Submit from the repo root (mkdir -p logs first):
#
#   sbatch --array=0-31 launch/sbatch_synth_array.sh generator=procedural num_sets=100000 \
#       set_size=4 resolution=256 out_dir=data/synth
#
# Arguments are jedi-synth overrides, placed after this script's, so they win.
# N defaults to the array's highest index + 1, which is right for --array=0-(N-1) with or without a
# %limit. To re-run only some tasks of an earlier array, keep N of the original array:
#
#   JEDI_SYNTH_WORKERS=32 sbatch --array=7,19 launch/sbatch_synth_array.sh <same arguments>
#
# (SLURM_ARRAY_TASK_COUNT, jedi-synth's own default, would be 2 there, and shards would be
# split differently.)
#
# Environment (all optional):
#   JEDI_VENV           virtualenv to activate (default: the PATH sbatch exported)
#   JEDI_SYNTH_WORKERS  total number of workers N (see above)
#
#SBATCH --job-name=jedi-synth
#SBATCH --array=0-15
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
##SBATCH --partition=cpu
set -euo pipefail

if [ -n "${JEDI_VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$JEDI_VENV/bin/activate"
fi
if ! command -v jedi-synth >/dev/null; then
  echo "sbatch_synth_array.sh: jedi-synth not on PATH; activate the venv before sbatch or set JEDI_VENV" >&2
  exit 2
fi
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "sbatch_synth_array.sh: not an array task; submit with sbatch --array=0-<N-1>" >&2
  exit 2
fi
if [ -z "${JEDI_SYNTH_WORKERS:-}" ] && [ "${SLURM_ARRAY_TASK_MIN}" != 0 ]; then
  # --array=1-16 would silently never produce worker 0's sets
  echo "sbatch_synth_array.sh: array starts at ${SLURM_ARRAY_TASK_MIN}, not 0; set JEDI_SYNTH_WORKERS" >&2
  exit 2
fi
WORKERS="${JEDI_SYNTH_WORKERS:-$(( SLURM_ARRAY_TASK_MAX + 1 ))}"
if [ "$SLURM_ARRAY_TASK_ID" -ge "$WORKERS" ]; then
  echo "sbatch_synth_array.sh: task ${SLURM_ARRAY_TASK_ID} >= JEDI_SYNTH_WORKERS=${WORKERS}" >&2
  exit 2
fi

export PYTHONUNBUFFERED=1
echo "[sbatch_synth_array] job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}: worker ${SLURM_ARRAY_TASK_ID} of ${WORKERS}"
exec jedi-synth num_workers_total="${WORKERS}" worker_index="${SLURM_ARRAY_TASK_ID}" "$@"

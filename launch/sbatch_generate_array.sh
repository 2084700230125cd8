#!/bin/bash
# jedi-generate as a SLURM job array: array task i takes jobs i, i+N, i+2N, ... of the jobs file
# (--shard-index i --num-shards N), one GPU each, all writing into the same --out. Submit from the
# repo root (mkdir -p logs first):
#
#   sbatch --array=0-7 launch/sbatch_generate_array.sh runs/demo/pipeline --jobs jobs.jsonl --out gen \
#       --check identity,prompt --dino models/dino --clip models/clip --min-identity 0.6 --best-of 4
#
# Arguments are jedi-generate's, placed before this script's sharding flags.
# N defaults to the array's highest index + 1, which is right for --array=0-(N-1) with or without a
# %limit. To re-run only some tasks of an earlier array, keep N of the original array:
#
#   JEDI_GENERATE_SHARDS=8 sbatch --array=3,5 launch/sbatch_generate_array.sh <same arguments>
#
# (SLURM_ARRAY_TASK_COUNT, jedi-generate's own default, would be 2 there, and jobs would be split
# differently.) A requeued or re-run task skips the images it already finished. Each task rewrites
# results.csv and report.html from every record on disk; after the last one, `jedi-generate report
# --out DIR` rebuilds them once more (a task that finished early did not see the others' images).
#
# Environment (all optional):
#   JEDI_VENV             virtualenv to activate (default: the PATH sbatch exported)
#   JEDI_GENERATE_SHARDS  total number of shards N (see above)
#
#SBATCH --job-name=jedi-generate
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
##SBATCH --partition=gpu
set -euo pipefail

if [ -n "${JEDI_VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$JEDI_VENV/bin/activate"
fi
if ! command -v jedi-generate >/dev/null; then
  echo "sbatch_generate_array.sh: jedi-generate not on PATH; activate the venv before sbatch or set JEDI_VENV" >&2
  exit 2
fi
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "sbatch_generate_array.sh: not an array task; submit with sbatch --array=0-<N-1>" >&2
  exit 2
fi
if [ -z "${JEDI_GENERATE_SHARDS:-}" ] && [ "${SLURM_ARRAY_TASK_MIN}" != 0 ]; then
  # --array=1-8 would silently never produce shard 0's images
  echo "sbatch_generate_array.sh: array starts at ${SLURM_ARRAY_TASK_MIN}, not 0; set JEDI_GENERATE_SHARDS" >&2
  exit 2
fi
SHARDS="${JEDI_GENERATE_SHARDS:-$(( SLURM_ARRAY_TASK_MAX + 1 ))}"
if [ "$SLURM_ARRAY_TASK_ID" -ge "$SHARDS" ]; then
  echo "sbatch_generate_array.sh: task ${SLURM_ARRAY_TASK_ID} >= JEDI_GENERATE_SHARDS=${SHARDS}" >&2
  exit 2
fi

export PYTHONUNBUFFERED=1
echo "[sbatch_generate_array] job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}: shard ${SLURM_ARRAY_TASK_ID} of ${SHARDS}"
exec jedi-generate "$@" --no-progress --num-shards "${SHARDS}" --shard-index "${SLURM_ARRAY_TASK_ID}"

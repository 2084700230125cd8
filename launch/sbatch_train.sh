#!/bin/bash
# JeDi training on SLURM, one task per GPU, any number of nodes. Submit from the repo root
# (mkdir -p logs first: SLURM opens the --output file before this script runs):
#
#   sbatch --nodes=4 launch/sbatch_train.sh experiment=sd15_s3 strategy=deepspeed_zero2
#
# Arguments are Hydra overrides for jedi-train; they come after this script's defaults, so they win.
# Header values are defaults too: sbatch command-line options override them (--nodes, --gres,
# --ntasks-per-node, --time, --partition, ...).  CPU-only, e.g. the local test cluster:
#
#   sbatch --gres=none --ntasks-per-node=1 --cpus-per-task=1 launch/sbatch_train.sh \
#       trainer=cpu experiment=demo debug=fast
#
# Environment (all optional):
#   JEDI_VENV        virtualenv to activate (default: use the PATH sbatch exported from the submit shell)
#   JEDI_RUNS        where run dirs go (default: $SLURM_SUBMIT_DIR/runs)
#   JEDI_OUTPUT_DIR  run dir to use instead of $JEDI_RUNS/<job name>-<job id>: set it to continue an
#                    earlier job's run in a new job (it resumes from that dir's checkpoints/last.ckpt)
#   JEDI_TRAINER     trainer config group (default: gpu)
#
# Pre-emption and time limits: SLURM sends SIGUSR1 90 s before the end; Lightning's SLURM plugin then
# writes a checkpoint and runs `scontrol requeue`. The requeued job keeps its job id, hence the same
# run dir, and jedi-train resumes from it. An admin's `scontrol requeue` or a node failure also
# resumes, from the last periodic checkpoint.
#
#SBATCH --job-name=jedi-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=SIGUSR1@90
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Often wanted on real clusters (remove one '#' to enable):
##SBATCH --partition=gpu
##SBATCH --exclusive
##SBATCH --mem=0
#
# Why these:
# - ntasks-per-node = GPUs per node: Lightning's SLURM environment takes ranks from srun's tasks and
#   checks devices x num_nodes == SLURM_NTASKS; trainer.devices/num_nodes below are derived from it.
# - --signal without "B:" goes to the srun tasks, i.e. to the Python processes whose handler acts.
# - --open-mode=append: a requeued job writes to the same log; truncating would erase the first run.
# - cpus-per-task: dataloader workers + the rank's main process.
set -euo pipefail

if [ -n "${JEDI_VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$JEDI_VENV/bin/activate"
fi
if ! command -v jedi-train >/dev/null; then
  echo "sbatch_train.sh: jedi-train not on PATH; activate the venv before sbatch or set JEDI_VENV" >&2
  exit 2
fi

# The run dir must not depend on the clock: every rank (and every requeue) has to find the same one.
# SLURM_JOB_ID survives requeue; ${now:...} in the default run_name does not, and differs across nodes.
RUN_NAME="${SLURM_JOB_NAME:-jedi-train}-${SLURM_JOB_ID}"
OUTPUT_DIR="${JEDI_OUTPUT_DIR:-${JEDI_RUNS:-${SLURM_SUBMIT_DIR:-$PWD}/runs}/$RUN_NAME}"
NNODES="${SLURM_NNODES:-1}"
TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / NNODES ))}"

# unbuffered: a requeue kills the job, and block-buffered lines would be lost from the log
export PYTHONUNBUFFERED=1

echo "[sbatch_train] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}:" \
     "${NNODES} node(s) x ${TASKS_PER_NODE} task(s), run dir ${OUTPUT_DIR}"

# --kill-on-bad-exit: one dead rank ends the step instead of the others hanging in a collective
srun --kill-on-bad-exit=1 jedi-train \
  "trainer=${JEDI_TRAINER:-gpu}" \
  "trainer.num_nodes=${NNODES}" \
  "trainer.devices=${TASKS_PER_NODE}" \
  "run_name=${RUN_NAME}" \
  "paths.output_dir=${OUTPUT_DIR}" \
  "$@"

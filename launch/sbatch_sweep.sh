#!/usr/bin/env bash
# A hyperparameter sweep as a SLURM array job: array task i runs trial i of the sweep on one GPU.
# A hand-written example without preemption handling or input checks: prefer
# `python -m launch.submit` (launch/README.md), which writes a checked, requeueing script.
#
#   sbatch --array=0-3 launch/sbatch_sweep.sh experiments/configs/lenet5_digits.py \
#       experiments/sweeps/lenet5_digits_lr.py workdirs/sweeps/lenet5_digits_lr \
#       --config.num_train_steps=200
#
# --array must cover the sweep's trials (a grid's size, or num_trials for random search); an index
# past the last trial fails with a message. Every task writes only its own trials/<id>/ folder and
# rewrites the shared results table, which a concurrent finish can leave one trial behind: after the
# array ends, rebuild it from the trial folders with the same command plus --max_trials=0 (run on a
# login node: no training). Resubmitting the array resumes each unfinished trial from its own
# checkpoint and skips finished ones.
#SBATCH --job-name=cnnjax-sweep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --requeue
set -euo pipefail

USAGE="usage: sbatch --array=0-N launch/sbatch_sweep.sh CONFIG SWEEP SWEEP_DIR [--config.x=y ...]"
CONFIG=${1:?$USAGE}
SWEEP=${2:?$USAGE}
SWEEP_DIR=${3:?$USAGE}
shift 3
TRIAL=${SLURM_ARRAY_TASK_ID:?"run with sbatch --array=0-N (one task per trial)"}

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-.venv/bin/python}
# srun of SLURM 22.05-23.02 does not inherit sbatch's --cpus-per-task (one CPU per task,
# starving the input pipeline); it reads SRUN_CPUS_PER_TASK instead.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
fi

srun "$PYTHON" -m experiments.sweep --config="$CONFIG" --sweep="$SWEEP" \
  --sweep_dir="$SWEEP_DIR" --trial_index="$TRIAL" "$@"

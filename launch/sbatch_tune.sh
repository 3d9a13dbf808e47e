#!/usr/bin/env bash
# The automated tuning recipe (experiments.tune) as one SLURM job on one GPU.
#
#   sbatch launch/sbatch_tune.sh experiments/configs/lenet5_digits.py \
#       experiments/recipes/lenet5_digits.py workdirs/tune/lenet5_digits [--recipe.max_rounds=4]
#
# Rounds depend on each other (round k+1 is planned from round k's results), so the recipe runs
# its trials one after another in a single task; for one round's trials in parallel, run that
# round's sweep as an array job instead (launch/sbatch_sweep.sh). The job is requeueable:
# resubmitting it (or a requeue after preemption) skips finished rounds and trials and resumes
# the interrupted trial from its checkpoint. Exit status 1 if a trial failed (rerun to retry).
#SBATCH --job-name=cnnjax-tune
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
set -euo pipefail

USAGE="usage: sbatch launch/sbatch_tune.sh CONFIG RECIPE TUNE_DIR [--config.x=y] [--recipe.x=y]"
CONFIG=${1:?$USAGE}
RECIPE=${2:?$USAGE}
TUNE_DIR=${3:?$USAGE}
shift 3

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-.venv/bin/python}
# srun of SLURM 22.05-23.02 does not inherit sbatch's --cpus-per-task (one CPU per task,
# starving the input pipeline); it reads SRUN_CPUS_PER_TASK instead.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
fi

srun "$PYTHON" -m experiments.tune --config="$CONFIG" --recipe="$RECIPE" \
  --tune_dir="$TUNE_DIR" "$@"

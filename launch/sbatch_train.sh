#!/usr/bin/env bash
# Multi-host data-parallel training under SLURM: one process per GPU (8 per node here).
# A hand-written example without preemption handling or input checks: prefer
# `python -m launch.submit` (launch/README.md), which writes a checked, requeueing script.
#
#   sbatch launch/sbatch_train.sh experiments/configs/resnet50_imagenet.py workdirs/resnet50 \
#       --config.data.data_dir=/datasets/tfds
#
# experiments.train calls jax.distributed.initialize() itself in an srun step of SLURM_NTASKS > 1
# (a python run outside srun stays one process, with a warning; JAX reads the
# coordinator address, process count and index from the SLURM environment). Under SLURM JAX gives
# each process only GPU number SLURM_LOCALID, so run one task per GPU (a single task per node would
# use one GPU of eight); don't bind GPUs to tasks (--gpus-per-task) as JAX selects them itself.
# Every process reads its own shard of the data; only process 0 writes metrics, plots, summary.json
# and the checkpoints, into the shared workdir. Resubmitting the same job resumes. Tested without
# SLURM on one machine: tests/train/test_multiprocess.py (see launch/README.md).
#SBATCH --job-name=cnnjax-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
set -euo pipefail

CONFIG=${1:?usage: sbatch launch/sbatch_train.sh CONFIG WORKDIR [--config.field=value ...]}
WORKDIR=${2:?usage: sbatch launch/sbatch_train.sh CONFIG WORKDIR [--config.field=value ...]}
shift 2

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-.venv/bin/python}
# srun of SLURM 22.05-23.02 does not inherit sbatch's --cpus-per-task (one CPU per task,
# starving the input pipeline); it reads SRUN_CPUS_PER_TASK instead.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
fi

srun --kill-on-bad-exit=1 "$PYTHON" -m experiments.train \
  --config="$CONFIG" --workdir="$WORKDIR" "$@"

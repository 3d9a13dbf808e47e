#!/usr/bin/env bash
# A throwaway one-node SLURM on this machine, and the launcher's end-to-end check on it.
#
#   sudo launch/local_slurm.sh start   # install slurm-wlm + munge (Debian), start the daemons
#   launch/local_slurm.sh check        # ~10 min on 2 cores; prints PASS/FAIL per check
#   launch/local_slurm.sh time_limit   # ~7 min: SLURM's own signal before a 3-minute limit
#   sudo launch/local_slurm.sh stop
#
# For a development or CI machine you own (it writes /etc/slurm/slurm.conf and starts root
# daemons), not for a real cluster. `check` submits with `python -m launch.submit`, as a user
# would, LeNet-5 on digits (200 steps):
#   1. a 2-process CPU train job (srun, jax.distributed over SLURM's environment, gloo);
#   2. the same job preempted: USR1 (what SLURM's --signal sends before a time limit) at step 60
#      stops it at a checkpoint and requeues it; the rerun resumes, and its final parameters must
#      equal job 1's bitwise;
#   3. the learning-rate grid as a 2-task array sweep (2 trials per task): all 4 trials complete.
# `time_limit` leaves the signal to SLURM: a job that cannot finish in its 3-minute limit
# (--signal_seconds=90, --max_requeues=1) is stopped and requeued once, then stopped and not
# requeued again.
# Measured 2026-12-02 (slurm-wlm 22.05.8, 2 cores, jax 0.10.2): all three pass (docs in
# launch/README.md, "Tested on a local SLURM").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/cnnjax_local_slurm}

start() {
  command -v slurmctld >/dev/null || apt-get install -y -q slurm-wlm munge >/dev/null
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
  cat >/etc/slurm/slurm.conf <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  chown munge:munge /etc/munge/munge.key /run/munge
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
  sleep 3
  sinfo
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
}

submit() {  # submit <workdir> <launch.submit flags...> -- <overrides>; prints the job id
  local workdir=$1
  shift
  rm -rf "$workdir"
  "$PYTHON" -m launch.submit --workdir="$workdir" --gpus_per_node=0 --cpus_per_task=1 \
    --time=00:30:00 "$@" 2>/dev/null | sed -n 's/^Submitted .* job \([0-9]*\).*/\1/p'
}

wait_for() {  # wait_for <job id>: until it has left the queue
  while squeue -h -j "$1" 2>/dev/null | grep -q .; do sleep 5; done
}

result() {  # result <name> <python expression over json summaries>; PASS or FAIL
  if "$PYTHON" -c "import json, sys; sys.exit(0 if ($2) else 1)"; then
    echo "PASS $1"
  else
    echo "FAIL $1"
    FAILED=1
  fi
}

check() {
  FAILED=0
  local digits=(--config=experiments/configs/lenet5_digits.py)
  local short=(-- --config.num_train_steps=200 --config.eval_every_steps=100)
  local plain preempted sweep
  plain=$(submit "$OUT/train" --entry=train "${digits[@]}" --tasks_per_node=2 "${short[@]}")
  wait_for "$plain"
  preempted=$(submit "$OUT/preempted" --entry=train "${digits[@]}" --tasks_per_node=2 \
    "${short[@]}")
  until grep -qs "step 60/200" "$OUT"/preempted/slurm/*.out; do sleep 2; done
  scancel --signal=USR1 --batch "$preempted"
  wait_for "$preempted"
  sleep 5
  while squeue -h -j "$preempted" 2>/dev/null | grep -q .; do sleep 5; done  # the requeued run
  sweep=$(submit "$OUT/sweep" --entry=sweep "${digits[@]}" \
    --sweep=experiments/sweeps/lenet5_digits_lr.py --trials_per_task=2 "${short[@]}")
  wait_for "$sweep"
  cat "$OUT"/preempted/slurm/events.log
  local s="json.load(open('$OUT/%s/summary.json'))"
  # shellcheck disable=SC2059
  result "2-process train job completed on 2 devices" \
    "$(printf "$s" train)['status'] == 'completed' and $(printf "$s" train)['num_devices'] == 2"
  local events="open('$OUT/preempted/slurm/events.log').read()"
  result "preempted job requeued and resumed" \
    "$(printf "$s" preempted)['resumed_from_step'] > 0 and 'requeued (restart 1' in $events"
  result "events.log does not call the requeued job cancelled" "'not requeued' not in $events"
  "$PYTHON" - "$OUT" <<'EOF' && echo "PASS preempted run's parameters equal the uninterrupted run's bitwise" || { echo "FAIL preempted run's parameters differ"; FAILED=1; }
import sys

import jax
import numpy as np

from cnnjax.train.trained import load_trained

out = sys.argv[1]
a, b = (jax.tree.leaves(load_trained(f"{out}/{name}").variables) for name in ("train", "preempted"))
sys.exit(0 if all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)) else 1)
EOF
  result "array sweep: 4 trials completed" \
    "sum(1 for line in open('$OUT/sweep/results.csv')) == 5"
  return "$FAILED"
}

time_limit() {
  FAILED=0
  local job events
  job=$(submit "$OUT/time_limit" --entry=train --config=experiments/configs/lenet5_digits.py \
    --time=00:03:00 --signal_seconds=90 --max_requeues=1 -- --config.num_train_steps=100000)
  wait_for "$job"
  sleep 5
  wait_for "$job"  # the requeued run
  cat "$OUT"/time_limit/slurm/events.log
  events="open('$OUT/time_limit/slurm/events.log').read()"
  result "SLURM's signal requeued the job once" \
    "$events.count('USR1') == 2 and $events.count('requeued (restart 1 of at most 1)') == 1"
  result "the second signal was not requeued" "'not requeued: already requeued 1' in $events"
  result "the rerun resumed from a checkpoint" \
    "json.load(open('$OUT/time_limit/summary.json'))['resumed_from_step'] > 0"
  return "$FAILED"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  check) check ;;
  time_limit) time_limit ;;
  *) echo "usage: $0 start|check|time_limit|stop" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A throwaway one-node (or two-node) SLURM on this machine, and the launcher's end-to-end checks.
#
#   sudo launch/local_slurm.sh start   # install slurm-wlm + munge (Debian), start the daemons
#   launch/local_slurm.sh check        # ~10 min on 2 cores; prints PASS/FAIL per check
#   launch/local_slurm.sh time_limit   # ~7 min: SLURM's own signal before a 3-minute limit
#   sudo launch/local_slurm.sh start_two_node  # instead of start: node1 and node2 (below)
#   launch/local_slurm.sh two_node     # ~7 min: the multi-node checks
#   sudo launch/local_slurm.sh stop    # either layout; also removes node2's network namespace
#
# For a development or CI machine you own (it writes /etc/slurm/slurm.conf and /etc/hosts, adds
# a network namespace and starts root daemons), not for a real cluster. `check` submits with
# `python -m launch.submit`, as a user would, LeNet-5 on digits (200 steps):
#   1. a 2-process CPU train job (srun, jax.distributed over SLURM's environment, gloo);
#   2. the same job preempted: USR1 (what SLURM's --signal sends before a time limit) at step 60
#      stops it at a checkpoint and requeues it; the rerun resumes, and its final parameters must
#      equal job 1's bitwise;
#   3. the learning-rate grid as a 2-task array sweep (2 trials per task): all 4 trials complete.
# `time_limit` leaves the signal to SLURM: a job that cannot finish in its 3-minute limit
# (--signal_seconds=90, --max_requeues=1) is stopped and requeued once, then stopped and not
# requeued again.
# `two_node` (after start_two_node: two slurmds, node1 and node2, in two network namespaces)
# runs the same training as a 1-node x 2-task job and as a 2-node x 1-task job, checks where the
# 2-node job's tasks ran and which coordinator address they used, then preempts a 2-node job at
# step 60 (USR1, requeue); both 2-node runs must end with the 1-node run's parameters bitwise.
# Measured 2026-12-02 (slurm-wlm 22.05.8, 2 cores, jax 0.10.2): all pass (docs in
# launch/README.md, "On a real (one-node) SLURM" and "On two SLURM nodes (one machine)").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/cnnjax_local_slurm}

write_conf() {  # write_conf <state dir> <slurmd paths' suffix> <node and partition lines>
  mkdir -p /etc/slurm "$1" /var/log/slurm /run/munge
  cat >/etc/slurm/slurm.conf <<EOF
ClusterName=local
SlurmctldHost=$CTLD_HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$1
SlurmdSpoolDir=/var/spool/slurmd$2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd$2.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd$2.pid
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$3
EOF
  chown munge:munge /etc/munge/munge.key /run/munge
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
}

running() {  # running <pid file>: its process is alive
  local pid
  pid=$(cat "$1" 2>/dev/null) && [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

start() {
  command -v slurmctld >/dev/null || apt-get install -y -q slurm-wlm munge >/dev/null
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048))
  mkdir -p /var/spool/slurmd
  CTLD_HOST=$host write_conf /var/spool/slurmctld "" \
    "NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
  running /run/slurmctld.pid || /usr/sbin/slurmctld
  running /run/slurmd.pid || /usr/sbin/slurmd
  sleep 3
  sinfo
}

# Two nodes on one machine: node1 (10.200.0.1) in this network namespace, node2 (10.200.0.2) in
# the namespace $NETNS, joined by a veth pair and named in /etc/hosts. Each slurmd runs in a UTS
# namespace of its own whose hostname is the node's name, so a task's `hostname` says where it
# runs. Both see the whole machine (CPUs=2 each, so a 1-node x 2-task job fits too) and share its
# file system, as a cluster's nodes share /home.
NETNS=cnnjax-node2
HOSTS_TAG="# cnnjax local_slurm two_node"
NODE1=10.200.0.1
NODE2=10.200.0.2

net_up() {  # idempotent
  ip netns list | awk '{print $1}' | grep -qx "$NETNS" || ip netns add "$NETNS"
  ip link show cnnjax-veth1 >/dev/null 2>&1 \
    || ip link add cnnjax-veth1 type veth peer name cnnjax-veth2 netns "$NETNS"
  ip addr replace "$NODE1/24" dev cnnjax-veth1
  ip link set cnnjax-veth1 up
  ip netns exec "$NETNS" ip addr replace "$NODE2/24" dev cnnjax-veth2
  ip netns exec "$NETNS" ip link set cnnjax-veth2 up
  ip netns exec "$NETNS" ip link set lo up
  grep -q "$HOSTS_TAG" /etc/hosts \
    || printf '%s node1 %s\n%s node2 %s\n' "$NODE1" "$HOSTS_TAG" "$NODE2" "$HOSTS_TAG" >>/etc/hosts
}

net_down() {  # idempotent; after node2's slurmd has stopped
  ip link del cnnjax-veth1 2>/dev/null || true  # and its peer
  ip netns del "$NETNS" 2>/dev/null || true
  if grep -q "$HOSTS_TAG" /etc/hosts; then  # rewritten in place: /etc/hosts may be a mount
    local kept
    kept=$(grep -v "$HOSTS_TAG" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
  fi
}

start_two_node() {
  command -v slurmctld >/dev/null || apt-get install -y -q slurm-wlm munge >/dev/null
  stop
  net_up
  local mem=$((($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048) / 2))
  mkdir -p /var/spool/slurmd-node1 /var/spool/slurmd-node2
  CTLD_HOST="$(hostname -s)($NODE1)" write_conf /var/spool/slurmctld-two_node "-%n" \
    "NodeName=node1 NodeAddr=$NODE1 CPUs=2 RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeAddr=$NODE2 CPUs=2 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
  /usr/sbin/slurmctld
  unshare --uts sh -c 'hostname node1 && exec /usr/sbin/slurmd -N node1'
  # nsenter, not `ip netns exec`: that remounts /sys, and slurmd then fails ("No filesystem
  # mounted on /sys/fs/cgroup ... slurmd initialization failed")
  nsenter --net="/run/netns/$NETNS" \
    unshare --uts sh -c 'hostname node2 && exec /usr/sbin/slurmd -N node2'
  for _ in $(seq 30); do
    [[ $(sinfo -h -N -o %T 2>/dev/null | grep -c idle) == 2 ]] && break
    sleep 1
  done
  sinfo -N
}

stop() {  # the daemons of either layout, by their pid files; then node2's namespace
  local pidfile
  for pidfile in /run/slurmd.pid /run/slurmd-node1.pid /run/slurmd-node2.pid /run/slurmctld.pid; do
    if running "$pidfile"; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      while running "$pidfile"; do sleep 1; done
    fi
  done
  net_down
}

need_slurm() {  # need_slurm <command>: the SLURM client commands it uses are on the PATH
  local tool
  for tool in sbatch squeue scancel scontrol; do
    if ! command -v "$tool" >/dev/null; then
      echo "error: local_slurm.sh $1: $tool is not on the PATH; start SLURM first" \
        "(sudo launch/local_slurm.sh start, or start_two_node for two_node)" >&2
      exit 2
    fi
  done
}

submit() {  # submit <workdir> <launch.submit flags...> -- <overrides>; prints the job id
  local workdir=$1 out job
  shift
  rm -rf "$workdir"
  out=$("$PYTHON" -m launch.submit --workdir="$workdir" --gpus_per_node=0 --cpus_per_task=1 \
    --time=00:30:00 "$@" 2>&1) || true
  job=$(sed -n 's/^Submitted .* job \([0-9]*\).*/\1/p' <<<"$out")
  if [[ -z $job ]]; then  # stop here: the checks would wait for a job that never ran
    echo "error: local_slurm.sh: submitting $workdir failed: $(tail -n 1 <<<"$out")" >&2
    exit 1
  fi
  echo "$job"
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
  need_slurm check
  local digits=(--config=experiments/configs/lenet5_digits.py)
  local short=(-- --config.num_train_steps=200 --config.eval_every_steps=100)
  local plain preempted sweep
  plain=$(submit "$OUT/train" --entry=train "${digits[@]}" --tasks_per_node=2 "${short[@]}")
  wait_for "$plain"
  preempted=$(submit "$OUT/preempted" --entry=train "${digits[@]}" --tasks_per_node=2 \
    "${short[@]}")
  wait_log "$OUT/preempted" "step 60/200" "$preempted"
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
  # results.csv has a row per trial whatever its status: count the completed ones.
  result "array sweep: 4 trials completed" \
    "[t['status'] for t in json.load(open('$OUT/sweep/results.json'))['trials']].count('completed') == 4"
  return "$FAILED"
}

time_limit() {
  FAILED=0
  need_slurm time_limit
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

placement() {  # placement <job id> <port>: per task "<procid> <node> <hostname> <net ns> <peers>",
  # peers being the task's connections to <port> (the JAX coordinator's)
  local pid env
  for pid in $(pgrep -f '^[^ ]*python[0-9.]* -m experiments[.]train '); do  # not srun's
    env=$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null) || continue
    grep -qx "SLURM_JOB_ID=$1" <<<"$env" || continue
    printf '%s %s %s %s %s\n' "$(sed -n 's/^SLURM_PROCID=//p' <<<"$env")" \
      "$(sed -n 's/^SLURMD_NODENAME=//p' <<<"$env")" "$(nsenter -u -t "$pid" hostname)" \
      "$(readlink "/proc/$pid/ns/net")" \
      "$(nsenter -n -t "$pid" ss -Htnp state established "( dport = :$2 )" \
        | grep "pid=$pid," | awk '{printf "%s,", $4}' | sed 's/\[::ffff:\([0-9.]*\)\]/\1/g')"
  done | sort
}

wait_log() {  # wait_log <workdir> <text> <job id>: until the job's log has the text; 1 if it ended
  until grep -qs "$2" "$1"/slurm/*.out; do
    if ! squeue -h -j "$3" 2>/dev/null | grep -q .; then
      echo "FAIL job $3 ended before its log showed '$2'; see $1/slurm/" >&2
      return 1
    fi
    sleep 2
  done
}

two_node() {  # after start_two_node
  FAILED=0
  need_slurm two_node
  local digits=(--entry=train --config=experiments/configs/lenet5_digits.py)
  local short=(-- --config.num_train_steps=200 --config.eval_every_steps=100)
  local one two preempted coordinators port
  one=$(submit "$OUT/one_node" "${digits[@]}" --nodes=1 --tasks_per_node=2 "${short[@]}")
  wait_for "$one"
  two=$(submit "$OUT/two_node" "${digits[@]}" --nodes=2 --tasks_per_node=1 "${short[@]}")
  wait_log "$OUT/two_node" "step 20/200" "$two"
  coordinators=$(sed -n 's/.*Connecting to JAX distributed service on \(.*\)$/\1/p' \
    "$OUT"/two_node/slurm/*.out | tr '\n' ' ')
  echo "coordinator address used by each task: $coordinators"
  port=${coordinators% }
  port=${port##*:}
  placement "$two" "$port" | tee "$OUT/two_node.placement"
  wait_for "$two"
  preempted=$(submit "$OUT/two_node_preempted" "${digits[@]}" --nodes=2 --tasks_per_node=1 \
    "${short[@]}")
  wait_log "$OUT/two_node_preempted" "step 60/200" "$preempted"
  scancel --signal=USR1 --batch "$preempted"
  wait_for "$preempted"
  sleep 5
  wait_for "$preempted"  # the requeued run
  cat "$OUT"/two_node_preempted/slurm/events.log
  local s="json.load(open('$OUT/%s/summary.json'))"
  local tasks="[line.split() for line in open('$OUT/two_node.placement')]"
  # shellcheck disable=SC2059
  result "2-node job completed: 2 processes x 1 device" \
    "$(printf "$s" two_node)['status'] == 'completed' \
     and $(printf "$s" two_node)['num_devices'] == 2"
  result "one task on each node (SLURMD_NODENAME, hostname, network namespace)" \
    "[t[:3] for t in $tasks] == [['0', 'node1', 'node1'], ['1', 'node2', 'node2']] \
     and ${tasks}[0][3] != ${tasks}[1][3]"
  result "both tasks used the coordinator node1 (the first node of SLURM_STEP_NODELIST)" \
    "'$coordinators'.split() == ['node1:$port'] * 2"
  result "node2's task is connected to node1's address, $NODE1:$port" \
    "'$NODE1:$port,' in ${tasks}[1][4]"
  # shellcheck disable=SC2059
  result "preempted 2-node job requeued and resumed" \
    "$(printf "$s" two_node_preempted)['resumed_from_step'] > 0 \
     and 'requeued (restart 1' in open('$OUT/two_node_preempted/slurm/events.log').read()"
  "$PYTHON" - "$OUT" <<'EOF' || FAILED=1
import sys

import jax
import numpy as np

from cnnjax.train.trained import load_trained

out = sys.argv[1]
names = ("two_node", "one_node", "two_node_preempted")
ref, *others = (jax.tree.leaves(load_trained(f"{out}/{name}").variables) for name in names)
for name, leaves in zip(names[1:], others, strict=True):
    same = all(np.array_equal(x, y) for x, y in zip(ref, leaves, strict=True))
    print(f"{'PASS' if same else 'FAIL'} 2-node run's parameters vs the {name} run's: "
          f"{'bitwise equal' if same else 'differ'}")
    if not same:
        sys.exit(1)
EOF
  return "$FAILED"
}

case "${1:-}" in
  start) start ;;
  start_two_node) start_two_node ;;
  stop) stop ;;
  check) check ;;
  time_limit) time_limit ;;
  two_node) two_node ;;
  *) echo "usage: $0 start|check|time_limit|start_two_node|two_node|stop" >&2; exit 2 ;;
esac

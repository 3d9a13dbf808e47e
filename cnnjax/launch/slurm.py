"""Render a complete, preemption-safe sbatch script for a validated `JobSpec`.

The script runs the entry point with `srun` (one task per GPU for train, or one task on one node
using them all; one task otherwise; a sweep is an array job, task i runs trial i, or trials i*k ...
i*k+k-1 with `trials_per_task` k), logs to `<workdir>/slurm/`, and survives preemption and time
limits: `--signal=B:USR1@<s>` makes SLURM warn the batch shell `s` seconds ahead, the shell stops
the job step (SIGTERM, SIGKILL after a grace period) and runs `scontrol requeue $JOB_REF` unless
the job was already requeued `max_requeues` times (`JOB_REF` is `<array job>_<task>` in an array
task, so only that task is stopped and requeued; otherwise `$SLURM_JOB_ID`). The requeued job
reruns the same command, which resumes from the newest checkpoint; a step that finished or failed
during the stop is not requeued. A plain SIGTERM (scancel, preemption without the user signal) is
not a graceful stop: SLURM signals srun too, which kills the tasks at once, so the rerun resumes
from the newest periodic checkpoint. Every start, signal and stop is appended to
`<workdir>/slurm/events.log`. Pure functions: nothing is written or submitted here.
"""

from __future__ import annotations

import os
import shlex

from cnnjax.launch.spec import JobSpec

SLURM_DIR = "slurm"  # under the work directory: script, launch record, logs, events
EVENTS_FILE = "events.log"
#: Environment every job gets before `spec.env` (which wins): unbuffered logs, quiet TF (only the
#: input pipeline uses it), JAX's persistent compilation cache so a requeued job skips compiling.
DEFAULT_ENV = (("PYTHONUNBUFFERED", "1"), ("TF_CPP_MIN_LOG_LEVEL", "2"))
CACHE_DIR = "jax_cache"


def slurm_dir(spec: JobSpec) -> str:
    """The job's `slurm` directory under its work directory (script, record, logs, events)."""
    return os.path.join(spec.workdir, SLURM_DIR)


def log_pattern(spec: JobSpec) -> str:
    """Where SLURM writes the job's output: `%x` job name, `%A`/`%a` array job/task, `%j` job."""
    name = "%x-%A_%a.out" if spec.entry == "sweep" else "%x-%j.out"
    return os.path.join(slurm_dir(spec), name)


def array_directive(spec: JobSpec, num_trials: int) -> str:
    """`--array` value: the chosen tasks (default all, `0-(N-1)` for N trials run one to a
    task), `%max_parallel` if set."""
    indices = (spec.array if spec.array is not None
               else f"0-{spec.num_array_tasks(num_trials) - 1}")
    return indices + (f"%{spec.max_parallel}" if spec.max_parallel else "")


def directives(spec: JobSpec, num_trials: int | None = None) -> list[str]:
    """The `#SBATCH` options (without the prefix), in a fixed order."""
    out = [
        f"--job-name={spec.job_name}",
        f"--chdir={spec.submit_dir}",
        f"--output={log_pattern(spec)}",
        "--open-mode=append",  # a requeued run appends to the same log
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={spec.tasks_per_node}",
    ]
    if spec.gpus_per_node:
        out.append(f"--gpus-per-node={spec.gpus_per_node}")
    out.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.mem is not None:
        out.append(f"--mem={spec.mem}")
    out.append(f"--time={spec.time}")
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(spec, name) is not None:
            out.append(f"--{name}={getattr(spec, name)}")
    if spec.entry == "sweep":
        if num_trials is None:
            raise ValueError("launch: num_trials is needed to render a sweep's --array")
        out.append(f"--array={array_directive(spec, num_trials)}")
    out += ["--requeue", f"--signal=B:USR1@{spec.signal_seconds}"]
    return out


def command(spec: JobSpec) -> list[str]:
    """The entry point's command line (each element one argument, unquoted)."""
    entry = spec.entry_point
    args = [spec.python, "-m", entry.module]
    args += [f"--{flag}={path}" for flag, path in spec.files.items()]
    args.append(f"--{entry.dir_flag}={spec.workdir}")
    args += list(spec.overrides)
    return args


def _shell_command(spec: JobSpec) -> str:
    """`srun ... <command>` quoted for bash; a sweep task adds its `--trial_index`."""
    # --cpus-per-task again: srun of SLURM 22.05-23.02 does not inherit sbatch's.
    srun = ["srun", f"--cpus-per-task={spec.cpus_per_task}"]
    if spec.num_tasks > 1:
        srun.append("--kill-on-bad-exit=1")
    args = command(spec)
    head = " ".join(shlex.quote(w) for w in srun + args[:3])  # srun python -m <module>
    words = [head] + [shlex.quote(w) for w in args[3:]]
    if spec.entry == "sweep" and spec.trials_per_task == 1:
        words.append('--trial_index="$SLURM_ARRAY_TASK_ID"')
    elif spec.entry == "sweep":  # task i runs trials i*k ... i*k+k-1
        words += [f'--trial_index="$((SLURM_ARRAY_TASK_ID * {spec.trials_per_task}))"',
                  f"--trial_count={spec.trials_per_task}"]
    return " \\\n    ".join(words)


def environment(spec: JobSpec) -> list[tuple[str, str]]:
    """(name, shell expression) pairs exported before the run, defaults first."""
    cache = shlex.quote(os.path.join(spec.workdir, CACHE_DIR))
    pairs = [(k, shlex.quote(v)) for k, v in DEFAULT_ENV]
    pairs.append(("JAX_COMPILATION_CACHE_DIR", f"${{JAX_COMPILATION_CACHE_DIR:-{cache}}}"))
    pairs += [(k, shlex.quote(v)) for k, v in spec.env]
    return pairs


_PREEMPTION = r"""
# Preemption and time limits: SLURM sends USR1 to this shell SIGNAL_SECONDS s before the end.
# Stop the job step, then requeue this job (same id, same command) unless it was requeued
# MAX_REQUEUES times already, or the step finished or failed by itself during the stop (any exit
# status but 143, the tasks' answer to the TERM, or 137, the KILL after the grace period); the
# rerun resumes from the newest checkpoint in the work directory. The step's tasks get their TERM
# through `scancel --signal=TERM` (every step of the job, not this shell): srun itself answers a
# TERM by SIGKILLing its tasks ("forcing job termination"), which would lose the step in progress.
# For that reason a TERM to the whole job (plain `scancel <job>`, preemption that does not send
# the user signal first) cannot be a graceful stop: SLURM TERMs srun as well, which kills the
# tasks, likely before they checkpoint, and the rerun resumes from the newest periodic checkpoint.
# This shell then only logs it and stops what is left, without requeueing (SLURM requeues the job
# where its preemption mode says so). A graceful stop is `scancel --signal=USR1 --batch <job>`.
# scancel and scontrol get JOB_REF: in an array task `<array job>_<task>`, since a bare array job
# id means every task of the array and one task's SLURM_JOB_ID is that id (the one SLURM
# started last, seen on slurm-wlm 22.05; the others get ids of their own). Events name JOB_REF
# too, the id squeue shows: `4_0`, not task 0's own id 5.
if [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then
  JOB_REF="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:?}"
else
  JOB_REF="${SLURM_JOB_ID:-}"
fi
event() {
  printf '%s job %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${JOB_REF:-?}" "$1" \
    | tee -a "$EVENTS" >&2
}
stop_step() {  # TERM to the tasks, KILL after STOP_GRACE_SECONDS. STOPPED=1 if the signals
  # stopped it (or it had not started), 0 if it ended by itself (STEP_STATUS: its exit status)
  STOPPED=1
  [[ -n "${STEP_PID:-}" ]] || return 0
  if kill -0 "$STEP_PID" 2>/dev/null; then
    scancel --signal=TERM "${JOB_REF:?}" || kill -TERM "$STEP_PID" 2>/dev/null
    local waited=0
    while kill -0 "$STEP_PID" 2>/dev/null && ((waited < STOP_GRACE_SECONDS)); do
      sleep 1
      waited=$((waited + 1))
    done
    kill -KILL "$STEP_PID" 2>/dev/null
  fi
  wait "$STEP_PID" 2>/dev/null
  STEP_STATUS=$?
  ((STEP_STATUS == 143 || STEP_STATUS == 137)) || STOPPED=0
  return 0
}
on_usr1() {
  event "USR1: time limit or preemption ahead; stopping the job step"
  stop_step
  if ((STOPPED == 0)); then
    event "the job step ended by itself (exit status $STEP_STATUS: finished or failed, not \
stopped by the signal); not requeued"
    exit "$STEP_STATUS"
  fi
  if ((RESTARTS >= MAX_REQUEUES)); then
    event "not requeued: already requeued $RESTARTS time(s) (max_requeues=$MAX_REQUEUES); \
resubmit the same job to continue from the newest checkpoint"
    exit 1
  fi
  REQUEUING=1  # SLURM TERMs this shell as it requeues, often before scontrol returns
  if scontrol requeue "${JOB_REF:?}"; then
    requeued
  fi
  REQUEUING=0
  event "scontrol requeue $JOB_REF failed; resubmit the same job to resume"
  exit 1
}
requeued() {  # once, whichever of on_usr1 and SLURM's TERM comes first
  if ((REQUEUED == 0)); then
    REQUEUED=1
    event "requeued (restart $((RESTARTS + 1)) of at most $MAX_REQUEUES); the rerun resumes"
  fi
  exit 0
}
on_term() {
  if ((REQUEUING)); then
    requeued
  fi
  event "TERM (scancel or preemption): stopping the job step; this script does not requeue \
(SLURM does where the job's preemption mode requeues it)"
  stop_step
  exit 143
}
REQUEUING=0
REQUEUED=0
trap on_usr1 USR1
trap on_term TERM
"""


def render(spec: JobSpec, num_trials: int | None = None) -> str:
    """The sbatch script for a validated spec (`validate_spec`); `num_trials` for a sweep."""
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        f"# cnnjax {spec.entry} job, written by `python -m launch.submit` (record: "
        f"{os.path.join(slurm_dir(spec), 'launch.json')}).",
        "# Resubmitting it (or a requeue) reruns the same command, which resumes from the work",
        "# directory; see launch/README.md.",
    ]
    lines += [f"#SBATCH {d}" for d in directives(spec, num_trials)]
    lines += ["set -o pipefail", "", f"cd {q(spec.submit_dir)}"]
    # Most of the warning for the stop (a multi-process run stops at its next log step, then
    # checkpoints), keeping 30 s (or half of a short warning) for the requeue.
    stop_grace = max(1, spec.signal_seconds - min(30, spec.signal_seconds // 2))
    lines += [
        "",
        f"EVENTS={q(os.path.join(slurm_dir(spec), EVENTS_FILE))}",
        f"MAX_REQUEUES={spec.max_requeues}",
        f"STOP_GRACE_SECONDS={stop_grace}",
        "RESTARTS=${SLURM_RESTART_COUNT:-0}",
        'mkdir -p "$(dirname "$EVENTS")"',
    ]
    # The traps come before the site setup: a USR1 during a slow `module load` (preemption can
    # signal at once, and a time limit barely above signal_seconds does) killed this shell,
    # unrequeued, where now it requeues the job once the setup command returns.
    lines += _PREEMPTION.replace("SIGNAL_SECONDS", str(spec.signal_seconds)).splitlines()
    lines.append("")
    # Site setup (`module load ...`) and older virtualenv activate scripts may read unset
    # variables, so `set -u` starts only after them.
    lines += list(spec.setup)
    if spec.venv is not None:
        lines.append(f"source {q(os.path.join(spec.venv, 'bin', 'activate'))}")
    lines.append("set -u")
    lines += [f"export {k}={v}" for k, v in environment(spec)]
    lines += [
        "",
        'event "started on $(hostname) (restart $RESTARTS)"',
        "# In the background so the traps run while it works; `wait` returns when a signal comes.",
        _shell_command(spec) + " &",
        "STEP_PID=$!",
        'wait "$STEP_PID"',
        "STATUS=$?",
        'event "finished with exit status $STATUS"',
        'exit "$STATUS"',
        "",
    ]
    return "\n".join(lines)

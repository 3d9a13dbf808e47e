"""Train and evaluate a CNN from an ml_collections config (the cnnjax experiment entry point).

    python -m experiments.train --config=experiments/configs/lenet5_digits.py \\
        --config.optimizer.learning_rate=0.05 --workdir=workdirs/lenet5

Rerunning the same command resumes from the newest checkpoint in --workdir. In a task of an srun
step with more than one task (or with --distributed; --nodistributed keeps one process)
`jax.distributed.initialize()` connects the processes first;
a process that cannot reach the others within --distributed_timeout seconds exits with a message.
Errors end the process with a one-line message (also written to <workdir>/summary.json).
"""

from __future__ import annotations

import os
import sys
import traceback

# XLA flags and TF's log level must be set before JAX and TF start; user-set values win.
from cnnjax.platform import configure_entry_point

configure_entry_point()

from absl import app, flags, logging  # noqa: E402

from cnnjax.utils.cli import (  # noqa: E402
    define_config_file,
    exit_command,
    exit_on_ctrl_c,
    one_line_errors,
    parse_flags,
    start_command,
)

_CONFIG = define_config_file(
    "config",
    "experiments/configs/lenet5_digits.py",
    "Path to an ml_collections config file.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() (multi-host). Default: automatic in a task of an srun "
    "step with more than one task; --nodistributed runs one process even there.",
)
_DISTRIBUTED_TIMEOUT = flags.DEFINE_float(
    "distributed_timeout",
    300.0,
    "Seconds the processes of a multi-host job wait for each other at start-up; past that the "
    "process exits with a message saying which process or coordinator was missing.",
)
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    start_command(argv)
    import jax

    workdir = _WORKDIR.value
    _start_distributed(workdir)
    summary = _train(workdir)
    from cnnjax.utils.files import retire_error_log

    index = jax.process_index()
    kept = retire_error_log(workdir, "error.log" if index == 0 else f"error.process{index}.log")
    if kept:
        logging.info("An earlier invocation's traceback is kept as %s.", kept)
    if index == 0:
        _print_summary(summary)


def _start_distributed(workdir: str) -> None:
    """Checks --distributed_timeout (in every run, naming the flag; a bad value ends the
    process before anything is written) and connects the processes of a multi-process job; a
    refusal of the job is recorded in the workdir and ends the process."""
    from cnnjax.train import distributed

    with one_line_errors():  # a flag's refusal: no workdir made, no error.startup.log in it
        timeout_s = distributed.check_timeout(_DISTRIBUTED_TIMEOUT.value, "distributed_timeout")
    try:
        # --distributed / --nodistributed decide; else config.distributed=True forces it; else
        # automatic (a task of an srun step with more than one task)
        requested = (_DISTRIBUTED.value if flags.FLAGS["distributed"].present
                     else True if _CONFIG.value.get("distributed") else None)
        if distributed.should_initialize(requested):
            distributed.initialize(
                timeout_s,
                on_timeout=lambda message, pid: _write_startup_error(workdir, message, pid),
            )
        elif requested is None and (tasks := distributed.slurm_tasks()) > 1:
            logging.warning("SLURM_NTASKS=%d outside an srun job step: training as one process "
                            "(launch with srun for a %d-process JAX job).", tasks, tasks)
    except ValueError as err:
        try:
            _write_startup_error(workdir, str(err), None)
        except OSError as log_err:  # a file in the workdir's place: the refusal still one line
            sys.exit(f"error: {err}\n(could not record it in {workdir}: {log_err})")
        sys.exit(f"error: {err}")


def _train(workdir: str) -> dict:
    """`train_and_evaluate` on --config in `workdir` (the devices logged first); returns its
    summary, or exits with a one-line error (an unexpected one's traceback kept in the workdir)."""
    import jax

    from cnnjax.train.loop import TrainingDivergedError, train_and_evaluate
    from cnnjax.utils.lock import DirectoryInUseError

    logging.info(
        "JAX devices: %s (process %d of %d)",
        jax.devices(),
        jax.process_index(),
        jax.process_count(),
    )
    index = jax.process_index()
    try:
        with exit_on_ctrl_c(lambda: _interrupted_message(workdir)):
            return train_and_evaluate(_CONFIG.value, workdir)
    except DirectoryInUseError as err:  # the run holding the workdir keeps its summary.json
        _fail(f"error: {err}")
    except (ValueError, TrainingDivergedError, FileNotFoundError) as err:
        if index != 0:
            _fail(f"error: {err}\n(process {index} of {jax.process_count()}; process 0 writes "
                  "summary.json)")
        _fail_pointing_to_summary(err, workdir, index)
    except Exception as err:  # noqa: BLE001 — unexpected: keep the traceback in the workdir
        _fail_keeping_traceback(err, workdir, index)


def _fail_pointing_to_summary(err: Exception, workdir: str, index: int) -> None:
    """Exits with `err`, pointing to summary.json when it records this error (a refusal leaves
    a finished run's summary.json alone, and notes itself as `refused` in a stopped one's). An
    error it records as a failure after training started (it then names the checkpoint a rerun
    resumes from: not a refusal, e.g. a bad record) keeps its traceback instead."""
    from cnnjax.train.loop import TrainingDivergedError
    from cnnjax.utils.files import read_json

    summary_path = os.path.join(workdir, "summary.json")
    summary = read_json(summary_path)  # a refusal only notes itself in a stopped run's
    summary = summary if isinstance(summary, dict) else {}
    if (not isinstance(err, TrainingDivergedError) and summary.get("status") == "failed"
            and summary.get("message") == str(err) and "resumes_from_step" in summary):
        _fail_keeping_traceback(err, workdir, index)
    recorded = str(err) in (summary.get("message"), (summary.get("refused") or {}).get("message"))
    _fail(f"error: {err}" + (f"\n(details in {summary_path})" if recorded else ""))


def _fail_keeping_traceback(err: Exception, workdir: str, index: int) -> None:
    """Exits with an unexpected `err`, its traceback written to this process's error log in the
    workdir (printed instead when it cannot be written, saying why)."""
    log = os.path.join(workdir, "error.log" if index == 0 else f"error.process{index}.log")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(log, "w") as f:
            f.write(traceback.format_exc())
    except OSError as log_err:  # a full disk, a read-only workdir: say so, traceback here
        traceback.print_exc()
        _fail(f"error: {type(err).__name__}: {err}\n(traceback above: it could not be "
              f"written to {log}: {log_err})")
    _fail(f"error: {type(err).__name__}: {err}\n(traceback in {log})")


def _interrupted_message(workdir: str) -> str:
    """Where a Ctrl-C'd run stopped, as its summary.json records it ('Ctrl-C' when it did not)."""
    from cnnjax.utils.files import read_json

    recorded = read_json(os.path.join(workdir, "summary.json"))
    ours = isinstance(recorded, dict) and recorded.get("error") == "KeyboardInterrupt"
    return (recorded.get("message") if ours else None) or "Ctrl-C"


def _write_startup_error(workdir: str, message: str, process_id: object) -> None:
    """Records why the multi-process job could not start in `<workdir>/error.startup[.N].log`
    (the process has no JAX job, hence no summary.json, yet)."""
    suffix = "" if process_id in (None, 0, "?") else f".process{process_id}"
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"error.startup{suffix}.log"), "w") as f:
        f.write(f"error: {message}\n")


def _fail(message: str) -> None:
    """Exits with status 1 and `message`. In a multi-process job it skips JAX's graceful
    distributed shutdown: that would wait for processes that may be blocked in a collective
    forever; exiting abruptly lets the coordinator stop them (missed heartbeats, ~100 s). One
    process leaves without the background threads a failed save left stuck (`exit_command`)."""
    import jax

    if jax.process_count() == 1:
        exit_command(message)  # leaves without background threads a failed save left stuck
    logging.flush()
    sys.stdout.flush()
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(1)


def _print_summary(summary: dict) -> None:
    """The run's results and where its outputs are (summary's `outputs`: the engine gives a
    finished run's rerun the paths of the workdir it is in now)."""
    final = summary.get("final_eval", {})
    outputs = summary["outputs"]
    rate = summary.get("images_per_sec")  # null: this invocation timed no step
    throughput = "train images/s not measured" if rate is None else f"{rate:,.0f} train images/s"
    start, wall = summary.get("resumed_from_step") or 0, summary["wall_time_s"]
    span = (f"steps {start}->{summary['step']} in {wall:.1f} s, "
            f"{summary.get('total_wall_time_s', wall):.1f} s with the earlier runs" if start
            else f"{summary['step']} steps in {wall:.1f} s")
    lines = [
        f"Finished {summary['model']} on {summary['dataset']}: {span} ({throughput}).",
        "Final eval: "
        + ", ".join(
            f"{k}={v:.4f}" for k, v in final.items() if isinstance(v, float) and k != "num_examples"
        ),
    ]
    if summary.get("best"):
        best = summary["best"]
        lines.append(f"Best eval {best['metric']}={best['value']:.4f} at step {best['step']}.")
    lines += [
        f"Learning curves: {outputs['plot']}",
        f"Checkpoints:     {outputs['checkpoints']}",
        f"Metrics:         {outputs['metrics']} (TensorBoard: {outputs['tensorboard']})",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

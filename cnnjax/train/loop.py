"""`train_and_evaluate(config, workdir)`: the one training loop every cnnjax experiment runs.

`config.task` picks what is trained: "classification" (cross-entropy, top-1/top-5),
"detection" (`cnnjax.data.detection` batches, the detector's own `loss`, mAP over the eval split)
or "segmentation" (`cnnjax.data.segmentation` class maps, per-pixel cross-entropy, mean IoU);
everything else (state, optimizer, checkpoints, resume, logging, divergence) is shared.

Sections: validate the config (before any compilation) -> build data, model, optimizer, state ->
restore the newest checkpoint if the workdir has one (exact resume: state, step and data order),
else warm-start the params and BatchNorm statistics from `config.init_from` if set -> train
with periodic logging, eval and async checkpoints -> final eval, checkpoint, summary.json.
A NaN/inf loss (or one above `config.max_loss`), parameter or BatchNorm statistic stops the run
as "diverged"; SIGTERM (preemption, scancel) stops it between steps as "interrupted" after
checkpointing the current step (`cnnjax.train.preemption`); any failure is recorded in
summary.json before the exception propagates. Process 0 holds `<workdir>/run.lock` for the
whole run (`cnnjax.utils.lock`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import queue
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cnnjax.analysis.confusion import intersection_over_union
from cnnjax.train import config as config_lib
from cnnjax.train import distill as distill_lib
from cnnjax.train import ema as ema_lib
from cnnjax.train import init_from as init_from_lib
from cnnjax.train.checkpoint import (
    CHECKPOINT_DIR,
    STEP_METADATA_FILE,
    Checkpointer,
    quarantine_dir,
    step_folders,
)
from cnnjax.train.logging import (
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    TENSORBOARD_DIR,
    MetricLogger,
    ProgressBar,
)
from cnnjax.train.parallel import AXIS_NAME, DataParallel
from cnnjax.train.preemption import EXIT_CODE, StopRequest, TrainingInterrupted, stop_if_pending
from cnnjax.train.state import TrainState, create_train_state, seed_key, warm_start
from cnnjax.train.step import (
    BATCH_STATS_FINITE,
    PARAMS_FINITE,
    make_detection_steps,
    make_segmentation_steps,
    make_steps,
    proposal_kwargs,
)
from cnnjax.utils.files import atomic_write, read_json, write_json
from cnnjax.utils.lock import directory_lock
from cnnjax.utils.validation import invalid

INIT_FROM_FILE = "init_from.json"  # where a warm-started run came from (kept across resumes)
# What experiments.evaluate, .visualize, .robustness and .rcnn_svm measured of the run's
# checkpoints (named by step only): `restart` removes them with the run they describe.
MEASUREMENT_DIRS = ("eval", "visualize", "robustness", "rcnn_svm")
DIVERGENCE_HINT = "learning rate too high or bad initialization"
BATCH_STATS_HINT = ("activations too large for their dtype (unnormalized or extreme inputs, a "
                    "learning rate too high)")
#: Checkpoint `run_info` key: the train metrics of the steps since the last train log, so a run
#: resumed between two log steps logs the average an uninterrupted run logs.
TRAIN_WINDOW = "train_window"
#: Checkpoint `run_info` and summary.json key: seconds of wall time of all the run's invocations
#: so far (each earlier one up to the checkpoint the next resumed from); summary.json's
#: `wall_time_s` is the last invocation's alone.
TOTAL_WALL_TIME = "total_wall_time_s"
#: Checkpoint `run_info` key: the run's config as config.json holds it, so a workdir whose
#: config.json is lost still refuses a rerun of an incompatible config (and restores the file).
CONFIG_RECORD = "config"
#: Checkpoint `run_info` and summary.json key: the software stacks (`software_stack`) the run
#: trained under, in order, one entry per change (the last one wrote the checkpoint); a resume
#: under another stack rounds floats differently, so it is warned about (summary.json has the
#: list while it holds more than one).
SOFTWARE = "software"
#: The distributions whose versions `software_stack` records, besides Python's.
SOFTWARE_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
#: The largest eval split (this process's padded batches, bytes) the first eval keeps in host
#: memory for the later ones (`_Run.eval_batches`): CIFAR-10's test split at 32x32 fits; larger
#: splits are read again at each eval.
EVAL_CACHE_BYTES = 128 * 2**20


class TrainingDivergedError(RuntimeError):
    """The loss, a parameter or a BatchNorm statistic became NaN or infinite (or the loss rose
    above `max_loss`); `step` is the step it happened at. `what` replaces the default
    "`which` is `loss`" description, and `hint` the likely cause (summary.json's `hint`)."""

    def __init__(self, step: int, loss: float, max_loss: float | None = None,
                 which: str = "loss", what: str | None = None, hint: str = DIVERGENCE_HINT):
        self.step = step
        self.loss = loss
        self.hint = hint
        if what is None:
            what = (
                f"{which} is {loss}"
                if not math.isfinite(loss)
                else (f"{which} is {loss:.6g}, above max_loss={max_loss:g}")
            )
        super().__init__(f"Training diverged at step {step}: {what}; {hint}.")


def train_and_evaluate(config: Any, workdir: str) -> dict:
    """Trains `config.model` on `config.data` in `workdir`, resuming from its checkpoints.

    Returns the summary dict also written to `<workdir>/summary.json`. Raises ValueError for bad
    configs (before compiling), `TrainingDivergedError` on a NaN/inf loss, parameter or BatchNorm
    statistic, and `TrainingInterrupted` (exit code 143 if uncaught) after a SIGTERM, once the
    step it stopped at is checkpointed; in every failing case the status and message are written
    to summary.json first. A workdir another process is training in raises
    `DirectoryInUseError` (a ValueError) and writes nothing there. While it runs, SIGTERM only
    sets a flag (handler installed from the main thread only, the previous one restored
    afterwards); SIGINT raises KeyboardInterrupt as usual.
    """
    started = time.time()
    is_primary = jax.process_index() == 0
    # Process 0 owns the workdir; a busy one is refused before anything (summary.json included)
    # is written, so the run holding it is left alone.
    with directory_lock(workdir, kind="training run", hold=is_primary):
        return _train_and_evaluate(config, workdir, started, is_primary)


def _train_and_evaluate(config: Any, workdir: str, started: float, is_primary: bool) -> dict:
    """`train_and_evaluate` once the workdir is held: runs, and records any failure."""
    run: _Run | None = None
    try:
        with StopRequest() as stop:
            # SIGTERM arrived after the previous run's last step (a sweep's trial): stop before
            # this one trains; its summary.json (a resume's step) stays as it is.
            stop_if_pending()
            run = _Run(config, workdir, started, stop)
            return run.run()
    except TrainingInterrupted:
        raise  # summary.json ("interrupted", with the checkpointed step) is already written
    except TrainingDivergedError as err:
        if is_primary:
            _write_summary(
                workdir,
                {
                    "status": "diverged",
                    "step": err.step,
                    "loss": str(err.loss),
                    "message": str(err),
                    "hint": err.hint,
                    # the last checkpoint, saved before the divergence (None: none yet)
                    "resumes_from_step": _latest_checkpoint_step(workdir),
                    **_wall_times(run, started),
                },
            )
        raise
    except BaseException as err:
        trained = run is not None and run.training_started
        # A refusal before training (a ValueError: an incompatible config, a typo) leaves the
        # summary of the run whose checkpoints the workdir holds (interrupted at step N) alone.
        refused = isinstance(err, ValueError) and _has_checkpoints(workdir)
        if is_primary and refused and not trained:
            _note_refusal(workdir, err)
        if is_primary and (trained or (_completed_summary(workdir) is None and not refused)):
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            _write_summary(
                workdir,
                {
                    "status": status,
                    "error": type(err).__name__,
                    "message": (_interrupt_message(run, workdir)
                                if isinstance(err, KeyboardInterrupt) and not str(err)
                                else str(err)),
                    # the steps trained (a sweep table's), not a checkpoint's; after a failure
                    # in training, also the checkpoint a rerun resumes from (None: none yet)
                    **({"step": run.steps_finished} if run is not None
                       and run.steps_finished is not None else {}),
                    **({"resumes_from_step": _latest_checkpoint_step(workdir)}
                       if trained and not isinstance(err, KeyboardInterrupt) else {}),
                    **_wall_times(run, started),
                },
            )
        raise


def incompatible_saved_fields(workdir: str, config: Any) -> list[tuple[str, Any, Any]]:
    """`(field, saved, new)` for each trajectory-defining field in which `config` differs from
    the config of the checkpoints `workdir` holds (`_saved_config`; [] without checkpoints or
    a record of their config: nothing to compare). Refuses (ValueError) a workdir of converted
    torchvision weights, which `restart` does not empty either."""
    return _fields_differing(workdir, _saved_config(workdir), config)


def _fields_differing(workdir: str, raw: dict | None,
                      config: Any) -> list[tuple[str, Any, Any]]:
    """`incompatible_saved_fields` against `raw`, the saved config `_saved_config` read."""
    if raw is None:
        return []
    if init_from_lib.holds_converted_weights(workdir, raw):  # even with restart=True
        raise ValueError(
            f"workdir: {workdir!r} holds converted torchvision weights (see its "
            "summary.json), not a training run: pass it as --config.init_from.workdir "
            "and train into a new --workdir.")
    saved, current = config_lib.flatten(raw), config_lib.flatten(config)
    return [(n, saved.get(n, "<unset>"), current.get(n, "<unset>"))
            for n in config_lib.incompatible_fields(saved, current)]


def _saved_config(workdir: str) -> dict | None:
    """The config of the run whose checkpoints `workdir` holds: the one its newest checkpoint
    recorded (`CONFIG_RECORD`), else its config.json (checkpoints saved before the config was
    kept in them); None without checkpoints or without either record. The checkpoints' record
    comes first: an edited config.json made the original command look incompatible (and
    `restart` delete the run), and the edit's values resume it."""
    if not _has_checkpoints(workdir):
        return None
    recorded = _checkpoint_config(workdir)
    if recorded is not None:
        return recorded
    saved_path = os.path.join(workdir, CONFIG_FILE)
    saved = read_json(saved_path)
    if isinstance(saved, dict):
        return saved
    if os.path.exists(saved_path):  # cut short, and no checkpoint records the config
        raise ValueError(
            f"workdir: {saved_path!r} is unreadable (not a JSON config) and no checkpoint in "
            f"{os.path.join(workdir, CHECKPOINT_DIR)!r} records the config, so a rerun cannot "
            "be checked against the run's; restore it, or delete it to resume without that check.")
    return None


def _checkpoint_config(workdir: str) -> dict | None:
    """The config the newest checkpoint with a readable record of it saved (read without
    orbax); None when none has one."""
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    for step in reversed(step_folders(ckpt_dir)):
        metadata = read_json(os.path.join(ckpt_dir, str(step), STEP_METADATA_FILE))
        custom = metadata.get("custom_metadata") if isinstance(metadata, dict) else None
        if isinstance(custom, dict) and isinstance(custom.get(CONFIG_RECORD), dict):
            return custom[CONFIG_RECORD]
    return None


def check_workdir_resumes(workdir: str, config: Any) -> None:
    """Refuses (ValueError, as the run itself would at start) a `workdir` holding checkpoints
    of a config incompatible with `config`, unless `config.restart` (which empties it)."""
    differ = incompatible_saved_fields(workdir, config)
    if differ and not config.restart:
        raise ValueError(_incompatible_message(workdir, differ))


def _incompatible_message(workdir: str, differ: list[tuple[str, Any, Any]]) -> str:
    details = ", ".join(f"{n}: {old!r} -> {new!r}" for n, old, new in differ[:8])
    return (f"workdir: {workdir!r} holds checkpoints of an incompatible config ({details}); to "
            "start fresh use a new --workdir, pass --config.restart=True, or delete the workdir.")


def _has_checkpoints(workdir: str) -> bool:
    """Whether `workdir` holds a checkpoint step folder of its own (read without orbax)."""
    return _latest_checkpoint_step(workdir) is not None


def _latest_checkpoint_step(workdir: str) -> int | None:
    """The newest checkpoint step folder of `workdir` (read without orbax), None if none."""
    return max(step_folders(os.path.join(workdir, CHECKPOINT_DIR)), default=None)


def _interrupt_message(run: _Run | None, workdir: str) -> str:
    """summary.json's message for a KeyboardInterrupt (Ctrl-C), which stops at once, without
    a checkpoint of its own: the last finished step and what a rerun resumes from."""
    at = (f" after step {run.steps_finished}"
          if run is not None and run.steps_finished is not None else "")
    latest = _latest_checkpoint_step(workdir)
    resume = (f"resumes from the checkpoint of step {latest}" if latest is not None
              else "starts over (no checkpoint yet)")
    return f"Interrupted (Ctrl-C){at}; rerunning the same command {resume}."


def _wall_times(run: _Run | None, started: float) -> dict:
    """summary.json's `wall_time_s` (this invocation, since `started`) and `TOTAL_WALL_TIME`
    (plus the earlier invocations' time recorded in the checkpoint `run` resumed from)."""
    wall = time.time() - started
    earlier = run.earlier_wall_time_s if run is not None else 0.0
    return {"wall_time_s": wall, TOTAL_WALL_TIME: earlier + wall}


def software_stack(backend: str) -> dict[str, str]:
    """The Python and `SOFTWARE_PACKAGES` versions and the JAX `backend` (cpu/gpu/tpu) this
    process trains with, as JSON strings: a checkpoint keeps them, since another stack may round
    the same steps differently."""
    stack = {"python": platform.python_version()}
    for name in SOFTWARE_PACKAGES:
        try:
            stack[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            stack[name] = "none"
    stack["backend"] = backend
    return stack


def _software_changes(recorded: dict, current: dict) -> list[str]:
    """One "name old -> new" per entry that `recorded` and `current` both hold and that differs
    (a key only one of them has, e.g. one an older cnnjax did not record, is no change)."""
    return [f"{k} {recorded[k]} -> {current[k]}" for k in current
            if k in recorded and str(recorded[k]) != current[k]]


def _earlier_wall_time(run_info: dict) -> float:
    """The run's wall time up to a checkpoint, from its `run_info` (0 for checkpoints written
    before it was recorded, or with an unusable value)."""
    value = run_info.get(TOTAL_WALL_TIME)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) and value >= 0 else 0.0


def evaluate_variables(config: Any, variables: dict) -> dict:
    """The engine's evaluation of a model: `config`'s model with `variables` (`{'params',
    'batch_stats'}`) over `config.data`'s whole eval split, on all devices, padded batches
    masked; the metrics of its task (`config_lib.TASK_METRICS`). Checks the config first;
    writes nothing."""
    run = _Run(config, workdir="", started=time.time())
    run.setup(for_training=False)
    return run.evaluate_variables(variables)


def wrap_steps(config: Any, task: str, model: Any, tx: Any, schedule: Any,
               parallel: DataParallel,
               teacher: distill_lib.Teacher | None = None) -> tuple[Any, Any]:
    """`(p_train, p_eval)`: `task`'s per-device train and eval steps for `model` and `tx` (the
    config's loss options, conv and BatchNorm lowerings, gradient accumulation, weight average,
    mixing), wrapped by `parallel` for all devices and compiled lazily, at their first call; for
    detection `p_eval` returns the detections. With a `teacher` (`config.distill`) the train
    step distills from it: its variables go to the devices once and are passed to every step
    beside the state, outside it (never checkpointed). Shared by the loop and
    `cnnjax.tune.lr_range`."""
    conv_impl = config.conv_impl  # "auto" is resolved per backend by the lowering contexts
    options = {"accum_steps": int(config.get("grad_accum_steps", 1)),
               "ema": config_lib.ema_rule(config),
               "batch_norm_impl": config.get("batch_norm_impl", "auto"),
               "backbone_eval": config.get("freeze") == "backbone_eval"}
    if task == "detection":
        train_step, predict_step = make_detection_steps(
            model, tx, schedule, AXIS_NAME, conv_impl, **options
        )
        return parallel.wrap_train(train_step), parallel.wrap_predict(predict_step)
    if task == "segmentation":
        train_step, eval_step = make_segmentation_steps(
            model, tx, schedule, AXIS_NAME, conv_impl, **options
        )
        return parallel.wrap_train(train_step), parallel.wrap_eval(eval_step)
    train_step, eval_step = make_steps(
        model,
        tx,
        schedule,
        AXIS_NAME,
        float(config.label_smoothing),
        float(config.aux_loss_weight),
        conv_impl,
        mixing=config_lib.mixing_rule(config),
        distill=distill_lib.distill_rule(config) if teacher is not None else None,
        teacher=teacher.model if teacher is not None else None,
        **options,
    )
    if teacher is None:
        return parallel.wrap_train(train_step), parallel.wrap_eval(eval_step)
    p_train = parallel.wrap_train(train_step, replicated_args=1)
    teacher_variables = parallel.replicate(teacher.variables)
    return (lambda state, batch: p_train(state, batch, teacher_variables),
            parallel.wrap_eval(eval_step))


def fresh_state(config: Any, model: Any, tx: Any, image_shape: tuple[int, ...]) -> TrainState:
    """The host (NumPy) state a new run of `config` starts from: `config.seed`'s initial
    variables, `tx`'s initial optimizer state, step 0 and a weight average if `config.ema` keeps
    one (before any checkpoint restore or warm start)."""
    host_state = jax.device_get(
        create_train_state(model, tx, seed_key(config.seed), (1, *image_shape),
                           ema=config_lib.ema_rule(config) is not None)
    )
    return jax.tree.map(np.asarray, host_state)


def _window_to_json(window: list[dict]) -> dict:
    """The train metrics of the steps since the last train log as checkpoint `run_info` (JSON):
    each step's values as floats, with each metric's dtype so a resume averages the same arrays
    (float32 means stay float32 means)."""
    dtypes = {k: str(np.asarray(v).dtype) for w in window for k, v in w.items()}
    return {"dtypes": dtypes, "steps": [{k: float(v) for k, v in w.items()} for w in window]}


def _window_from_json(record: dict | None) -> list[dict]:
    """`_window_to_json`'s record back as per-step metric arrays ([] for none)."""
    if not record:
        return []
    dtypes = record.get("dtypes", {})
    return [{k: np.asarray(v, dtypes.get(k, "float64")) for k, v in w.items()}
            for w in record.get("steps", [])]


def run_outputs(workdir: str) -> dict[str, str]:
    """A run's output files and folders in `workdir`, as absolute paths (summary.json's
    `outputs`)."""
    root = os.path.abspath(workdir)
    return {"workdir": root, "metrics": os.path.join(root, METRICS_FILE),
            "plot": os.path.join(root, PLOT_FILE),
            "checkpoints": os.path.join(root, CHECKPOINT_DIR),
            "tensorboard": os.path.join(root, TENSORBOARD_DIR)}


def _completed_summary(workdir: str) -> dict | None:
    """The workdir's summary.json if it records a completed run, else None."""
    summary = read_json(os.path.join(workdir, SUMMARY_FILE))
    return summary if isinstance(summary, dict) and summary.get("status") == "completed" else None


def _note_refusal(workdir: str, err: ValueError) -> None:
    """Adds `refused` (time, error, message) to the summary.json of an unfinished run whose
    rerun was refused before training, keeping the rest: its "rerun the same command to
    resume" may no longer hold (every checkpoint corrupt), and the reason was written nowhere
    in the workdir. A run that stopped without a summary (killed: SIGKILL, out of memory) gets
    one saying so, with the refusal. The next run's own summary replaces it."""
    path = os.path.join(workdir, SUMMARY_FILE)
    summary = read_json(path)
    if (summary is None and not os.path.exists(path) and not init_from_lib.holds_converted_weights(
            workdir, read_json(os.path.join(workdir, CONFIG_FILE)))):
        summary = {"status": "interrupted",
                   "message": "the run stopped without writing a summary (killed?), and its "
                              "rerun was refused (see refused)",
                   "resumes_from_step": _latest_checkpoint_step(workdir)}
    if not isinstance(summary, dict) or summary.get("status") == "completed":
        return
    summary["refused"] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "error": type(err).__name__, "message": str(err)}
    _write_summary(workdir, summary)


def _write_summary(workdir: str, summary: dict) -> None:
    """Atomically (re)writes `<workdir>/summary.json`, creating the workdir if needed."""
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, SUMMARY_FILE), summary)


def _sync_processes(name: str) -> None:
    """Barrier over all processes of a multi-host job; nothing to do for a single process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _check_same_checkpoints(steps: list[int], directory: str) -> None:
    """Multi-host: all processes must see the same newest checkpoint before restoring (restores
    are collective), else they would hang or train from different states; e.g. a workdir on
    node-local disks, where only process 0's node has the checkpoints."""
    if jax.process_count() == 1:
        return
    newest = np.int32(max(steps, default=-1))
    seen = np.asarray(multihost_utils.process_allgather(newest)).reshape(-1).tolist()
    if len(set(seen)) > 1:
        found = ", ".join(
            f"process {i}: {'none' if s < 0 else s}" for i, s in enumerate(seen)
        )
        raise ValueError(
            f"workdir: the processes see different newest checkpoints in {directory!r} "
            f"({found}); the workdir must be on a file system shared by all processes "
            "(process 0 writes every checkpoint)."
        )


#: A close at the end of a run (input pipeline, metric files, checkpoints) slower than this many
#: seconds is logged with its name. Its first catch (2026-12-05): closing the input pipeline
#: waited for tf.data's autotune thread (11-36 s after some 1,000-step runs, 8.6 s in `make
#: train`), which `cnnjax.data.pipeline` has since turned off.
SLOW_CLOSE_SECONDS = 5.0


@contextlib.contextmanager
def _closing(thing: Any, what: str) -> Iterator[Any]:
    """`contextlib.closing(thing)` that logs a warning naming `what` when `thing.close()` takes
    over `SLOW_CLOSE_SECONDS`, so a slow exit says where its time went."""
    try:
        yield thing
    finally:
        started = time.perf_counter()
        thing.close()
        seconds = time.perf_counter() - started
        if seconds > SLOW_CLOSE_SECONDS:
            logging.warning("Closing %s took %.1f s.", what, seconds)


def _prefetch(iterator: Iterator, transform: Callable[[Any], Any], size: int = 2) -> Iterator:
    """Runs `transform(next(iterator))` (host->device copy) in a background thread, `size` ahead."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    sentinel = object()
    stop = threading.Event()

    def put(item: Any) -> bool:
        """Queues `item` unless the consumer stopped first (then False: the producer ends)."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def producer() -> None:
        try:
            for item in iterator:
                if not put(transform(item)):
                    return
        except BaseException as err:  # noqa: BLE001 — re-raised in the consumer
            put(err)
        put(sentinel)

    thread = threading.Thread(target=producer, name="cnnjax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is sentinel:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # a producer blocked on the full queue sees it within 0.1 s
        thread.join(timeout=5.0)


class _Throughput:
    """Training images/s, excluding the first step (compilation) and paused time (eval, saves)."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.steps = 0
        self.seconds = 0.0
        self._last: float | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.steps += 1
            self.seconds += now - self._last
        self._last = now

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        yield
        if self._last is not None:
            self._last = time.perf_counter()

    def images_per_sec(self) -> float | None:
        """Images/s over the timed steps; None before any step was timed (an invocation's
        first step compiles: reporting 0.0 there read as a stall at every resume)."""
        if self.steps == 0 or self.seconds <= 0:
            return None
        return self.images_per_step * self.steps / self.seconds


class _Run:
    """One invocation of the loop; sections are methods so each reads on its own."""

    def __init__(
        self, config: Any, workdir: str, started: float, stop: StopRequest | None = None
    ):
        self.config = config
        self.workdir = workdir
        self.started = started
        self.stop = stop if stop is not None else StopRequest()  # not entered: never set
        self.is_primary = jax.process_index() == 0
        # False until the first step runs: a failure before it (a bad rerun, a missing dataset,
        # Ctrl-C in setup) leaves a completed run's summary.json as it is; the error still
        # reaches the caller.
        self.training_started = False
        # The last step whose metrics reached the host, checked (a Ctrl-C's summary step);
        # the loop dispatches one step ahead of it.
        self.steps_finished: int | None = None
        self.device_counts: list[int] = []  # the device counts this run trained on, in order
        self.software: list[dict] = []  # the software stacks it trained under, in order
        self.teacher: distill_lib.Teacher | None = None  # config.distill's, loaded by setup
        # config.init_from's (variables, record), read by setup when the run starts fresh
        # (before `restart` empties the workdir), so a refused warm start changes nothing there.
        self.pretrained: tuple[dict, dict] | None = None
        # Wall time of the run's earlier invocations, up to the checkpoint this one resumed from.
        self.earlier_wall_time_s = 0.0
        self._eval_cache: list[dict] | None = None  # the eval split's batches, once read
        # Built by `setup` from `config_lib.check_config`'s `CheckedConfig`:
        self.task: str | None = None  # "classification", "detection" or "segmentation"
        self.pipeline: Any = None  # the task's input module (`config_lib.data_pipeline`)
        self.data_info: Any = None  # the dataset's DatasetInfo (classes, image shape, splits)
        self.num_classes: int | None = None
        self.image_shape: tuple[int, ...] | None = None  # one input image's (H, W, C)
        self.model: Any = None  # the flax module
        self.schedule: Any = None  # the optax learning-rate schedule
        self.tx: Any = None  # the optax optimizer (the backbone frozen with config.freeze)
        self.variable_shapes: Any = None  # the model's variables, abstract (init_from)
        self.parallel: DataParallel | None = None  # replication and sharding over the devices
        self.eval_batch_size: int | None = None  # global eval batch (`config_lib.eval_batch`)
        # Set by `train`:
        self.window: list[dict] = []  # train metrics of the steps since the last train log
        self.last_train: dict = {}  # the last train log's metrics (summary's final_train)
        self.clock: _Throughput | None = None  # this invocation's training images/s

    # ------------------------------------------------------------------------------- setup
    def setup(self, for_training: bool = True) -> None:
        """Every pre-compilation check (`config.check_config`); `for_training`, also the
        teacher, the warm start and the workdir (False: evaluating a finished run writes
        nothing there, nor needs its train split to hold a batch)."""
        checked = config_lib.check_config(self.config, for_training=for_training)
        self.task, self.pipeline = checked.task, checked.pipeline
        self.data_info = checked.data_info
        self.num_classes = self.data_info.num_classes
        self.image_shape = tuple(self.data_info.image_shape)
        self.model, self.schedule, self.tx = checked.model, checked.schedule, checked.tx
        self.variable_shapes = checked.variable_shapes
        self.parallel = DataParallel(self.config.parallel, checked.devices)
        self.eval_batch_size = config_lib.eval_batch(self.config, self.total_devices)
        if for_training:  # the teacher and the warm start are checked (read)
            # Before the workdir; a completed run's rerun is a no-op that needs no teacher (one
            # retrained or deleted since must not fail it).
            if distill_lib.distill_settings(self.config) is not None and not self.completed():
                self.load_teacher()
            if config_lib.init_from_workdir(self.config) is not None and self.starts_fresh():
                self.pretrained = init_from_lib.load_init_from(self.config,
                                                               self.variable_shapes)
            self.prepare_workdir()
            # Multi-host: no process looks for checkpoints before process 0 applied `restart`.
            _sync_processes("cnnjax:workdir_prepared")

    def completed(self) -> bool:
        """Whether the workdir holds this config's run, completed at `num_train_steps`."""
        finished = _completed_summary(self.workdir)
        saved = _saved_config(self.workdir)
        return (finished is not None and finished.get("step") == self.config.num_train_steps
                and saved is not None and not _fields_differing(self.workdir, saved, self.config))

    def starts_fresh(self) -> bool:
        """Whether the run starts at step 0: its workdir holds no checkpoints, or `restart`
        will delete them (`prepare_workdir`: a run of another config)."""
        if not _has_checkpoints(self.workdir):
            return True
        return bool(self.config.restart) and bool(
            _fields_differing(self.workdir, _saved_config(self.workdir), self.config))

    def load_teacher(self) -> None:
        """Reads the distillation teacher (`config.distill`), checked against the data."""
        self.teacher = distill_lib.load_teacher(self.config, self.data_info, self.workdir)

    def check_teacher(self, checkpointer: Checkpointer) -> None:
        """A resume must distill from the teacher it started with (`distill.json`)."""
        distill_lib.check_teacher_record(self.workdir, self.teacher.record,
                                         bool(checkpointer.all_steps()), self.is_primary)

    def prepare_workdir(self) -> None:
        """Refuses checkpoints of an incompatible config (with `restart`: deletes that run and
        starts fresh), saves the config.

        `restart` never discards a run of this same config: a preempted job requeued with the
        same command line (`--config.restart=True` included) resumes instead of starting over;
        delete the workdir to repeat a run from scratch."""
        config, workdir = self.config, self.workdir
        saved_path = os.path.join(workdir, CONFIG_FILE)
        saved = _saved_config(workdir)  # read once: the checkpoints' record, else config.json
        differ = _fields_differing(workdir, saved, config)
        on_disk = read_json(saved_path)
        self._restore_config_json(saved, on_disk)
        resumable = saved is not None and not differ
        if config.restart and saved is None and _has_checkpoints(workdir):
            raise ValueError(
                f"config: restart=True is invalid; {workdir!r} holds checkpoints that record "
                "no config (written before configs were kept with them) and no readable "
                "config.json, so restart cannot tell a requeued run of this config (which must "
                "resume) from another run; drop --config.restart to resume it, or delete the "
                "workdir to start over.")
        if config.restart and resumable:
            logging.info("restart=True: %s holds a run of this same config, which resumes "
                         "(delete the workdir to start it over).", workdir)
        elif config.restart:
            self._empty_for_restart()
        elif differ:
            raise ValueError(_incompatible_message(workdir, differ))
        if resumable and self.completed():
            if self.is_primary and not on_disk:  # lost or cut short: the run's own back
                atomic_write(saved_path, json.dumps(saved, indent=2, sort_keys=True))
            return  # a no-op rerun: config.json keeps the settings the run trained with
        if self.is_primary:
            os.makedirs(workdir, exist_ok=True)
            atomic_write(saved_path, config_lib.to_json(config))

    def _restore_config_json(self, saved: dict | None, on_disk: Any) -> None:
        """Reconciles config.json (`on_disk`, as read) with `saved`, the config of the
        workdir's checkpoints (`_saved_config`): a lost or unreadable one is logged (the
        checkpoints' record stands in), an edited one is rewritten from `saved` (evaluate,
        init_from and sweeps read config.json)."""
        saved_path = os.path.join(self.workdir, CONFIG_FILE)
        if saved is not None and on_disk is None:
            logging.warning("%s holds checkpoints but no readable %s: the config recorded with "
                            "its newest checkpoint stands in for it.", self.workdir, CONFIG_FILE)
        elif saved is not None and isinstance(on_disk, dict) and saved is not on_disk:
            edited = config_lib.incompatible_fields(config_lib.flatten(saved),
                                                    config_lib.flatten(on_disk))
            if edited:
                logging.warning("%s differs from the config its checkpoints recorded in %s "
                                "(edited?): the checkpoints' record is the run's config, and "
                                "%s is restored from it.", saved_path, edited[:8], CONFIG_FILE)
                if self.is_primary:
                    atomic_write(saved_path, json.dumps(saved, indent=2, sort_keys=True))

    def _empty_for_restart(self) -> None:
        """`restart` of a run of another config: process 0 deletes that run's checkpoints
        (the quarantined ones too), logs, measurements, summary and records."""
        if not self.is_primary:
            return
        for name in (CHECKPOINT_DIR, quarantine_dir(CHECKPOINT_DIR), TENSORBOARD_DIR,
                     *MEASUREMENT_DIRS):
            shutil.rmtree(os.path.join(self.workdir, name), ignore_errors=True)
        for name in (METRICS_FILE, PLOT_FILE, SUMMARY_FILE, CONFIG_FILE, INIT_FROM_FILE,
                     distill_lib.DISTILL_FILE):
            path = os.path.join(self.workdir, name)
            if os.path.exists(path):
                os.remove(path)

    # --------------------------------------------------------------------------------- steps
    def steps(self) -> tuple[Any, Any]:
        """`(p_train, p_eval)`: the per-device steps wrapped for all devices (compiled lazily,
        at their first call); for detection `p_eval` returns the detections."""
        return wrap_steps(self.config, self.task, self.model, self.tx, self.schedule,
                          self.parallel, self.teacher)

    # --------------------------------------------------------------------------------- eval
    def eval_batches(self) -> Iterator[dict]:
        """One pass over this process's share of the eval split, padded batches masked.

        The split is read in stored order without augmentation, so every pass yields the same
        batches: a split of at most `EVAL_CACHE_BYTES` is kept in host memory by the first
        complete pass and later evals reuse it (opening the tf.data pipeline again cost ~0.4 s
        per eval on `digits`)."""
        if self._eval_cache is not None:
            return iter(self._eval_cache)
        return self._read_eval_batches()

    def _read_eval_batches(self) -> Iterator[dict]:
        kept: list[dict] | None = []
        size = 0
        for batch in self.pipeline.eval_batches(
            self.config.data,
            global_batch_size=self.eval_batch_size,
            num_devices=self.parallel.local_device_count,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            if kept is not None:
                size += sum(np.asarray(v).nbytes for v in batch.values())
                if size <= EVAL_CACHE_BYTES:
                    kept.append(batch)
                else:
                    kept = None  # too large to keep: read at each eval
            yield batch
        if kept is not None:  # a complete pass
            self._eval_cache = kept

    def _twin_best_metric(self) -> str | None:
        """With a weight average, the metric scoring the other weights than `best_metric`'s
        (`top1` <-> `ema_top1`): the checkpoints keep its best too, which `evaluate --ema`,
        `init_from.ema` and `distill.ema` (or their raw-weight forms) load."""
        best = self.config.best_metric
        if not best or config_lib.ema_rule(self.config) is None:
            return None
        return ema_lib.metric_scoring(best, not best.startswith(ema_lib.METRIC_PREFIX))

    def evaluate(self, state: Any, p_eval: Callable) -> dict:
        """Metrics over the whole eval split; with a weight average (`config.ema`) also its
        metrics, prefixed `ema_`."""
        metrics = self.evaluate_once(state, p_eval)
        if state.ema:
            metrics |= ema_lib.prefixed(self.evaluate_once(ema_lib.averaged(state), p_eval))
        return metrics

    def evaluate_once(self, state: Any, p_eval: Callable) -> dict:
        """Metrics of `state`'s variables over the whole eval split: masked sums over all
        batches, divided once (mAP for detection)."""
        if self.task == "detection":
            return self.evaluate_detection(state, p_eval)
        totals: dict[str, float] = {}
        confusion = None  # segmentation: the pixel confusion matrix, summed
        for batch in self.eval_batches():
            sums = self.parallel.metrics_to_host(p_eval(state, self.parallel.shard_batch(batch)))
            if "confusion" in sums:
                matrix = np.asarray(sums.pop("confusion"), np.float64)
                confusion = matrix if confusion is None else confusion + matrix
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        count = totals.pop("count", 0.0)
        if count <= 0:
            raise ValueError(f"data: eval split of {self.data_info.name!r} yielded no examples.")
        metrics = {name: value / count for name, value in totals.items()}
        if confusion is not None:
            self._check_scored_pixels(confusion)
            metrics |= intersection_over_union(confusion)
        return metrics | {"num_examples": count}

    def _check_scored_pixels(self, confusion: np.ndarray) -> None:
        """Refuses an eval split none of whose pixels is scored (all `IGNORE_LABEL`, e.g.
        outlines only), naming the split: its pixel accuracy and mIoU are undefined."""
        if confusion.sum() > 0:
            return
        from cnnjax.data.segmentation import IGNORE_LABEL

        raise invalid("data", "eval_split", self.pipeline.eval_split_name(self.config.data),
                      f"expected a split of {self.data_info.name!r} with at least one scored "
                      f"pixel, but every pixel of it is the ignore label (IGNORE_LABEL="
                      f"{IGNORE_LABEL}: no class), so its pixel accuracy and mIoU are undefined")

    def evaluate_detection(self, state: Any, p_predict: Callable) -> dict:
        """mAP over the whole eval split: every device's detections and the ground truth go to
        the host (all processes' in a multi-host run); padded examples are masked out."""
        from cnnjax.detection.evaluation import DetectionEvaluator

        evaluator = DetectionEvaluator(self.num_classes)
        for batch in self.eval_batches():
            inputs = self.parallel.shard_batch({"image": batch["image"],
                                                **proposal_kwargs(batch)})
            detections = self.parallel.outputs_to_host(p_predict(state, inputs))
            truth = {k: batch[k] for k in ("boxes", "labels", "box_valid", "mask",
                                           "box_difficult") if k in batch}
            if jax.process_count() > 1:
                detections, truth = multihost_utils.process_allgather((detections, truth))
            evaluator.add(detections, truth["boxes"], truth["labels"], truth["box_valid"],
                          truth["mask"], gt_difficult=truth.get("box_difficult"))
        if evaluator.num_images == 0:
            raise ValueError(f"data: eval split of {self.data_info.name!r} yielded no examples.")
        return evaluator.compute() | {"num_examples": float(evaluator.num_images)}

    def evaluate_variables(self, variables: dict) -> dict:
        """`evaluate` of the model with `variables` (`{'params', 'batch_stats'}`)."""
        host_state = jax.device_get(create_train_state(
            self.model, self.tx, seed_key(self.config.seed), (1, *self.image_shape)))
        host_state = warm_start(jax.tree.map(np.asarray, host_state), variables)
        return self.evaluate(self.parallel.replicate(host_state), self.steps()[1])

    # --------------------------------------------------------------------------------- main
    def run(self) -> dict:
        """Resumes the run from its latest checkpoint (or starts it), trains to
        `num_train_steps` with periodic evals and checkpoints, and returns summary.json."""
        self.setup()
        total_steps = int(self.config.num_train_steps)
        # Any exit closes what was opened: the prefetch thread, the progress bar, the metric
        # files and, last, the checkpoints (waiting for the pending, e.g. the stop step's, save).
        with contextlib.ExitStack() as opened:
            checkpointer = opened.enter_context(_closing(Checkpointer(
                self.workdir,
                keep=self.config.keep_checkpoints,
                best_metric=self.config.best_metric,
                best_mode=self.config.best_mode,
                also_best=self._twin_best_metric(),
                use_async=self.config.async_checkpoints,
            ), "the checkpoints (waiting for the pending save)"))
            _check_same_checkpoints(checkpointer.all_steps(), checkpointer.directory)
            host_state, start_step, resumed_info = self.initial_state(checkpointer)
            finished = _completed_summary(self.workdir) if start_step >= total_steps else None
            if finished is not None and finished.get("step") == total_steps:
                logging.info("%s already completed all %d steps; nothing to do (its "
                             "summary.json is left as it is).", self.workdir, total_steps)
                # where the files are now: summary.json names the first invocation's workdir,
                # which a copied or moved run no longer is
                return finished | {"outputs": run_outputs(self.workdir)}
            if self.teacher is None and distill_lib.distill_settings(self.config) is not None:
                # Skipped as a completed run's (`setup`), yet steps are left (its final
                # checkpoint is gone): read and checked now, never trained without.
                self.load_teacher()
                self.check_teacher(checkpointer)
            if start_step >= total_steps:  # killed after its final save: orbax had not pruned
                checkpointer.prune()
            evals, stopped = self.train(host_state, start_step, resumed_info, checkpointer,
                                        opened)
        if stopped is not None:
            self.interrupted(*stopped, evals, start_step)
        return self.finish(evals, start_step, total_steps)

    def initial_state(self, checkpointer: Checkpointer) -> tuple[TrainState, int, dict]:
        """The host state to train from, its step and its checkpoint's run_info: the run's
        latest checkpoint (a resume), else a fresh state, warm-started from `init_from`'s."""
        config = self.config
        pretrained = self.warm_start_source(checkpointer)
        if self.teacher is not None:
            self.check_teacher(checkpointer)
        host_state = fresh_state(config, self.model, self.tx, self.image_shape)
        try:
            restored = checkpointer.restore_latest(host_state)
        except ValueError as err:
            if not config.restart:
                raise
            raise ValueError(f"{err} (restart=True only empties a workdir whose run has another "
                             "config; delete its checkpoints to start this one over)") from None
        start_step, resumed_info = 0, {}
        if restored is not None:
            host_state, start_step = restored
            resumed_info = checkpointer.run_info(start_step)
            self.warn_if_devices_changed(resumed_info)
            self.warn_if_software_changed(resumed_info)
            self.earlier_wall_time_s = _earlier_wall_time(resumed_info)
            logging.info(
                "Resuming from the checkpoint at step %d in %s%s",
                start_step,
                checkpointer.directory,
                " (init_from is ignored: the run's own checkpoint wins)"
                if config_lib.init_from_workdir(config) is not None
                else "",
            )
        elif pretrained is not None:
            host_state = warm_start(host_state, pretrained[0])
            if self.is_primary:
                write_json(os.path.join(self.workdir, INIT_FROM_FILE), pretrained[1])
        elif config.get("freeze") is not None:  # as init_from's frozen_fresh_modules warning
            logging.warning(
                "freeze=%r without init_from.workdir keeps the whole backbone at its random "
                "initialization: only the head trains, on random features (set "
                "init_from.workdir to probe a trained backbone, or leave freeze unset to train "
                "every layer).", config.get("freeze"))
        if not self.device_counts:  # a new run, or a checkpoint written without run_info
            self.device_counts = [self.total_devices]
        if not self.software:  # a new run, or a checkpoint written before it was recorded
            self.software = [self.current_software()]
        return host_state, start_step, resumed_info

    def warm_start_source(self, checkpointer: Checkpointer) -> tuple[dict, dict] | None:
        """`init_from`'s (variables, record) for a run without checkpoints of its own (its own
        checkpoints win: an exact resume), read by `setup` for a run that starts fresh, else now
        (step folders setup counted that hold no complete checkpoint)."""
        if checkpointer.all_steps():
            return None
        if self.pretrained is None and config_lib.init_from_workdir(self.config) is not None:
            return init_from_lib.load_init_from(self.config, self.variable_shapes)
        return self.pretrained

    def train(self, host_state: TrainState, start_step: int, resumed_info: dict,
              checkpointer: Checkpointer, opened: contextlib.ExitStack
              ) -> tuple[list[dict], tuple[int, str] | None]:
        """The training loop from `start_step`: every eval is logged and every eval or
        checkpoint step saved. Returns the evals so far (earlier invocations' included) and
        the (step, signal) of a SIGTERM stop, if any; what it opens goes on `opened`."""
        config, parallel = self.config, self.parallel
        total_steps = int(config.num_train_steps)
        self.training_started = True
        state = parallel.replicate(host_state)
        logger = opened.enter_context(_closing(MetricLogger(
            self.workdir,
            resume_step=start_step,
            enabled=self.is_primary,
            tensorboard=config.tensorboard,
            score_metric=config_lib.TASK_PLOT_METRIC[self.task],
        ), "the metric files"))
        # Evals before the restored step (from metrics.jsonl) count for best/final metrics.
        evals = [{k: v for k, v in r.items() if k != "split"}
                 for r in logger.records if r["split"] == "eval"]
        p_train, p_eval = self.steps()
        batches = self.pipeline.train_batches(
            config.data,
            global_batch_size=config.global_batch_size,
            num_devices=parallel.local_device_count,
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        device_batches = opened.enter_context(_closing(
            _prefetch(batches, parallel.shard_batch), "the input pipeline"))
        bar = opened.enter_context(_closing(ProgressBar(
            total_steps,
            enabled=self.is_primary and config.progress_bar,
            log_every=config.log_every_steps,
        ), "the progress bar"))
        # The steps since the last train log, continued across a resume from a checkpoint
        # between two log steps (older checkpoints: from the checkpoint's step).
        self.window = _window_from_json(resumed_info.get(TRAIN_WINDOW))
        self.steps_finished = start_step
        # A resumed run's last train record so far (summary.json's `final_train` when it logs
        # none itself, e.g. rerun after dying between the final checkpoint and summary.json).
        self.last_train = next(
            ({k: v for k, v in r.items() if k not in ("step", "split")}
             for r in reversed(logger.records) if r["split"] == "train"), {})
        self.clock = _Throughput(config.global_batch_size)
        pending: tuple[int, Any] | None = None  # (step, device metrics): fetched one step late
        stopped: tuple[int, str] | None = None  # (step, signal) of a SIGTERM stop
        for step in range(start_step, total_steps):
            state, metrics = p_train(state, next(device_batches))
            done = step + 1
            if pending is not None:  # host sync on the previous step keeps one step queued
                self.record(*pending, logger, bar)
            pending = (done, metrics)
            if step == start_step:  # the clock starts once the compiling first step is done;
                # one step late, it started after the second (CPU runs may execute a step
                # inside its call), and the last interval read ~0 s: images/s too high
                self.record(*pending, logger, bar)
                pending = None
            is_eval = done % config.eval_every_steps == 0 or done == total_steps
            is_ckpt = done % config.checkpoint_every_steps == 0 or done == total_steps
            # Every process polls at every step (multi-process: a collective at log steps).
            signal_name = (self.stop.should_stop(done, config.log_every_steps)
                           if done < total_steps else None)
            if signal_name is not None:
                stopped = (done, signal_name)
            if not (is_eval or is_ckpt or stopped):
                continue
            if pending is not None:  # never evaluate or save a diverged state
                self.record(*pending, logger, bar)
            pending = None
            with self.clock.paused():
                metrics_eval = self.log_eval(state, done, p_eval, logger) if is_eval else None
                if metrics_eval is not None:
                    evals.append({"step": done, **metrics_eval})
                # A resume restarts TensorBoard after this checkpoint's step: events still in
                # the writer's buffer when the process dies (SIGKILL, OOM) would never be written.
                logger.flush()
                self.save(checkpointer, done, state, metrics_eval)
            if stopped:
                break
        if pending is not None:
            self.record(*pending, logger, bar)
        return evals, stopped

    def log_eval(self, state: Any, step: int, p_eval: Callable, logger: MetricLogger) -> dict:
        """Evaluates `state` at `step` and logs the metrics (and redraws the plot); a non-finite
        eval loss raises `TrainingDivergedError`, so such a state is never logged nor saved
        (it must never become the "best")."""
        metrics_eval = self.evaluate(state, p_eval)
        eval_loss = metrics_eval.get("loss", 0.0)
        if not math.isfinite(eval_loss):  # this step's update broke the model
            raise TrainingDivergedError(step, eval_loss, which="eval loss")
        logger.write_scalars(step, "eval", metrics_eval)
        logger.plot(background=True)  # drawn while training goes on
        logging.info("eval at step %d: %s", step,
                     {k: round(v, 4) for k, v in metrics_eval.items()})
        return metrics_eval

    def save(self, checkpointer: Checkpointer, step: int, state: Any,
             metrics_eval: dict | None) -> None:
        """Checkpoints `state` at `step` (async when configured) with what a resume needs:
        the device counts, the software stacks, the train-log window and the wall time so
        far."""
        checkpointer.save(step, self.parallel.unreplicate(state), metrics_eval,
                          run_info={"num_devices": self.total_devices,
                                    "device_counts": self.device_counts,
                                    SOFTWARE: self.software,
                                    "process_count": jax.process_count(),
                                    TRAIN_WINDOW: _window_to_json(self.window),
                                    CONFIG_RECORD: json.loads(config_lib.to_json(self.config)),
                                    TOTAL_WALL_TIME: _wall_times(
                                        self, self.started)[TOTAL_WALL_TIME]})

    def finish(self, evals: list[dict], start_step: int, total_steps: int) -> dict:
        """summary.json of a completed run (written by process 0), with the warm-start and
        teacher records (the warm-start one read back from its file, also after a resume)."""
        summary = self.summarize(evals, start_step, total_steps)
        if config_lib.init_from_workdir(self.config) is not None:
            record_path = os.path.join(self.workdir, INIT_FROM_FILE)
            if os.path.exists(record_path):
                record = read_json(record_path)
                if record is not None:
                    summary["init_from"] = record
                else:  # informational only: the trained run must not fail on it
                    message = (f"{record_path} is unreadable (cut short?): summary.json omits "
                               "where the warm start came from.")
                    logging.warning(message)
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
        if self.teacher is not None:
            summary["distill"] = self.teacher.record
        if self.is_primary:
            _write_summary(self.workdir, summary)
        return summary

    @property
    def total_devices(self) -> int:
        return self.parallel.local_device_count * jax.process_count()

    def warn_if_devices_changed(self, run_info: dict) -> None:
        """Resuming on another device count with the same process count continues the same data
        order, but the dropout keys (folded per device), mixup/CutMix pairs and accumulation
        micro-batches (both within a device's batch) and the float summation order follow the
        device count; on another process count the data order changes too (each process
        shuffles its own shard). Either way the run is no longer the one an uninterrupted run
        would have been. Say so in the log, and keep the device counts the run has trained on
        (checkpoint `run_info`, summary.json's `device_counts` while there is more than one),
        through any number of later resumes."""
        counts = [int(n) for n in run_info.get("device_counts") or
                  ([run_info["num_devices"]] if "num_devices" in run_info else [])]
        processes = run_info.get("process_count")  # absent before it was recorded
        same_processes = processes is None or int(processes) == jax.process_count()
        if not same_processes:
            logging.warning(
                "Resuming a checkpoint written by %d processes with %d: each process shuffles "
                "its own shard of the split, so the data order changes from here, and until the "
                "epoch ends some of its examples may repeat and others be skipped; this run will "
                "not equal an uninterrupted one.", int(processes), jax.process_count())
        if counts and counts[-1] != self.total_devices:
            logging.warning(
                "Resuming a checkpoint written on %d devices on %d: %sper-device dropout keys, "
                "mixup/CutMix pairs, accumulation micro-batches and float summation order "
                "change, so this run will not equal an uninterrupted one.",
                counts[-1], self.total_devices,
                "the data order continues, but " if same_processes else "")
            counts.append(self.total_devices)
        self.device_counts = counts

    def current_software(self) -> dict[str, str]:
        """`software_stack` of this process, on the platform of the run's devices."""
        return software_stack(self.parallel.devices[0].platform)

    def warn_if_software_changed(self, run_info: dict) -> None:
        """Resuming under another Python, jax, jaxlib, flax, optax or orbax-checkpoint version or
        JAX backend continues at the same step with the same data, but the compiled steps may
        round floats differently (jax 0.10.2 -> 0.11.2: parameters ~1e-7 apart after 200 lenet5
        steps), so the run is no longer bitwise an uninterrupted one. Say so in the log, and keep
        the stacks the run has trained under (checkpoint `run_info`, summary.json's `software`
        while there is more than one), as `warn_if_devices_changed` keeps the device counts.
        A checkpoint without the record (written before it was kept) resumes silently."""
        stacks = [dict(s) for s in run_info.get(SOFTWARE) or [] if isinstance(s, dict)]
        current = self.current_software()
        changes = _software_changes(stacks[-1], current) if stacks else []
        if changes:
            logging.warning(
                "Resuming a checkpoint written under another software stack (%s): the run "
                "continues, but its result will not be bitwise that of an uninterrupted run "
                "(float rounding may differ).", ", ".join(changes))
            stacks.append(current)
        self.software = stacks

    def interrupted(self, step: int, signal_name: str, evals: list[dict],
                    start_step: int) -> NoReturn:
        """Writes summary.json for a run stopped by `signal_name` after checkpointing `step`, and
        raises `TrainingInterrupted`."""
        err = TrainingInterrupted(step, signal_name)
        logging.warning("%s", err)
        if self.is_primary:
            summary = self.summarize(evals, start_step, step)
            summary.update(
                status="interrupted",
                signal=signal_name,
                checkpoint_step=step,
                exit_code=EXIT_CODE,
                message=str(err),
            )
            _write_summary(self.workdir, summary)
        raise err

    def record(
        self, step: int, device_metrics: Any, logger: MetricLogger, bar: ProgressBar
    ) -> None:
        """Host side of one finished step: divergence check, lr, progress, periodic train log."""
        host = self.parallel.metrics_to_host(device_metrics)
        loss = float(host["loss"])
        max_loss = self.config.get("max_loss")
        if not math.isfinite(loss) or (max_loss is not None and loss > max_loss):
            raise TrainingDivergedError(step, loss, max_loss)
        if float(host.pop(PARAMS_FINITE, 1.0)) < 1.0:  # never save such a state
            raise TrainingDivergedError(  # the step's loss predates the update: finite here
                step, loss, what=("a parameter became non-finite (NaN or inf) after the update, "
                                  f"while the step's loss was {loss:.6g}"))
        if float(host.pop(BATCH_STATS_FINITE, 1.0)) < 1.0:  # nor one that would eval as junk
            raise TrainingDivergedError(
                step, loss, hint=BATCH_STATS_HINT,
                what=("the BatchNorm statistics (batch_stats: running mean/variance) became "
                      f"non-finite (NaN or inf) while the loss was {loss:.6g}"))
        self.steps_finished = step
        self.clock.tick()
        self.window.append(host)
        images_per_sec = self.clock.images_per_sec()
        if not (step % self.config.log_every_steps == 0 or step == self.config.num_train_steps):
            logger.write_learning_rate(step, float(host["learning_rate"]))  # log steps: below
            bar.update(step, loss, images_per_sec)
            return
        train = {k: float(np.mean([w[k] for w in self.window if k in w])) for k in host}
        train["learning_rate"] = float(host["learning_rate"])
        if images_per_sec is not None:  # none measured yet: no figure, not a false 0
            train["images_per_sec"] = images_per_sec
        logger.write_scalars(step, "train", train)
        bar.update(step, loss, images_per_sec, mean_loss=(train["loss"], len(self.window)))
        self.last_train = train
        self.window = []

    def summarize(self, evals: list[dict], start_step: int, total_steps: int) -> dict:
        """summary.json of a run that trained from `start_step` to `total_steps` ("completed";
        an interruption updates it): final and best eval of `evals`, the last train log, this
        invocation's throughput and wall time, the devices and where the outputs are."""
        config = self.config
        key, sign = config.best_metric, (1 if config.best_mode == "max" else -1)
        # Ties go to the later eval: the checkpoint orbax keeps as "best" (and init_from picks).
        best = max(evals, key=lambda r: (sign * r[key], r["step"])) if evals else None
        final = evals[-1] if evals else {}
        return {
            "status": "completed",
            "model": config.model,
            "dataset": self.data_info.name,
            "num_classes": self.num_classes,  # ln(num_classes): a classifier's initial loss
            "step": total_steps,
            "resumed_from_step": start_step,
            "final_eval": {k: v for k, v in final.items() if k != "step"},
            "final_train": self.last_train,
            "best": ({"metric": key, "value": best[key], "step": best["step"]} if best else None),
            # This invocation's wall time and throughput; `total_wall_time_s` adds the earlier
            # invocations' (`TOTAL_WALL_TIME`).
            **_wall_times(self, self.started),
            "images_per_sec": self.clock.images_per_sec(),
            "num_devices": self.total_devices,
            "parallel": config.parallel,
            **({"device_counts": self.device_counts} if len(self.device_counts) > 1 else {}),
            **({SOFTWARE: self.software} if len(self.software) > 1 else {}),
            "outputs": run_outputs(self.workdir),
        }

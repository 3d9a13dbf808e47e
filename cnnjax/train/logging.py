"""Run outputs: metrics.jsonl, TensorBoard events, the learning-curve PNG, a terminal progress bar.

`MetricLogger` writes one JSON object per logged train step and per eval to `metrics.jsonl`, mirrors
the scalars to TensorBoard, and redraws `learning_curves.png` (train/val loss and accuracy against
step) after each eval. On resume it drops records newer than the restored checkpoint, and marks
the TensorBoard restart so TensorBoard drops them too: the files describe exactly one trajectory
(the loop saves the unlogged train window with each checkpoint, so a train line logged right
after a resume averages the same steps as in an uninterrupted run).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
import time
from typing import Any, TextIO

from absl import logging

from cnnjax.utils.files import atomic_write, save_figure

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"  # status, best and final metrics (train_and_evaluate writes it)
CONFIG_FILE = "config.json"  # the run's resolved config
PLOT_FILE = "learning_curves.png"
TENSORBOARD_DIR = "tensorboard"


class QuietLibraries:
    """absl log filter for library chatter a cnnjax command's user cannot act on.

    - orbax: its INFO lines (one per file it touches) and its warning `Given directory is read
      only=<dir>`, which cnnjax causes on purpose: it opens a finished run's checkpoints read-only
      (`load_trained`, a warm start's source), so the warning would only make a user look for a
      fault. orbax's other warnings pass; its errors pass without their tracebacks (a failed
      async save logged four, ~300 lines, before cnnjax re-raised that error in one line).
    - tensorflow-datasets: its INFO lines (`Load dataset info from ...`, `Constructing
      tf.data.Dataset ...`, four per split opened); its warnings pass.
    - JAX: the INFO line saying the TPU backend is absent (`Unable to initialize backend 'tpu'`),
      printed by every command on a machine without TPUs; other backends' lines (a CUDA backend
      that failed to start is worth seeing) pass.
    """

    _EXPECTED_WARNINGS = ("Given directory is read only",)
    _JAX_NO_TPU = "Unable to initialize backend 'tpu'"

    def filter(self, record: Any) -> bool:
        """Whether `record` (a standard-library `LogRecord`) is shown; False drops it."""
        path = record.pathname.replace("\\", "/")
        if "/tensorflow_datasets/" in path:
            return record.levelno >= 30
        if path.endswith("/jax/_src/xla_bridge.py"):
            return record.levelno >= 30 or not str(record.getMessage()).startswith(self._JAX_NO_TPU)
        if "/orbax/" not in path:
            return True
        if record.levelno < 30:
            return False
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            first = (str(error).strip().splitlines() or [""])[0]
            record.msg, record.args = f"{record.getMessage()} ({type(error).__name__}: {first})", ()
            record.exc_info, record.exc_text = None, None
        return not (record.levelno == 30
                    and str(record.getMessage()).startswith(self._EXPECTED_WARNINGS))


def quiet_library_logs() -> None:
    """Installs `QuietLibraries` on absl's handler (entry points call it once in `main`)."""
    logging.get_absl_handler().addFilter(QuietLibraries())


def _to_float(value: Any) -> float:
    return float(value)


class MetricLogger:
    """Writes train/eval scalars of one run under `workdir` (only the primary process writes).

    The learning-curve PNG shows the loss and `score_metric` (per task,
    `config.TASK_PLOT_METRIC`: top-1 accuracy, `map50`, `miou`), each for the splits that
    report it.
    """

    def __init__(
        self, workdir: str, *, resume_step: int = 0, enabled: bool = True, tensorboard: bool = True,
        score_metric: str = "top1",
    ):
        self.workdir = workdir
        self.score_metric = score_metric
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self.plot_path = os.path.join(workdir, PLOT_FILE)
        self.records: list[dict] = []
        self._tb = None
        self._plot_thread: threading.Thread | None = None  # plot(background=True)'s drawing
        self._plot_error: BaseException | None = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        records, cut = _parse_metrics(self.path)
        self.records = [r for r in records if r["step"] <= resume_step]
        if cut is not None and cut <= resume_step:  # not a killed run's last write: lost lines
            logging.warning("%s ends in a record of step %d cut short, though the run resumes "
                            "from step %d: the records from it up to step %d are lost (the "
                            "file was truncated?).", self.path, cut, resume_step, resume_step)
        # Rewrite (atomically): drop records past the checkpoint we resume from.
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        if tensorboard:
            try:
                self._tb = EventFileWriter(os.path.join(workdir, TENSORBOARD_DIR))
            except ImportError as err:  # TensorFlow missing: keep the other outputs
                logging.warning("TensorBoard output disabled: %s", err)
            else:  # TensorBoard drops the older files' events past the restored step
                self._tb.session_start(resume_step + 1)

    def _append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_scalars(self, step: int, split: str, metrics: dict) -> None:
        """Appends `{'step', 'split', **metrics}` to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        values = {k: _to_float(v) for k, v in metrics.items()}
        self._append({"step": int(step), "split": split, **values})
        if self._tb is not None:
            for name, value in values.items():
                self._tb.scalar(f"{split}/{name}", value, int(step))

    def write_learning_rate(self, step: int, lr: float) -> None:
        """Logs a step's learning rate to TensorBoard, for the steps between train logs (a
        train log's `write_scalars` carries it to both files: once per step)."""
        if self.enabled and self._tb is not None:
            self._tb.scalar("train/learning_rate", float(lr), int(step))

    def plot(self, background: bool = False) -> str | None:
        """Redraws the learning-curve PNG from all records; returns its path.

        With `background` (the training loop's, at each eval) the drawing (0.2-0.5 s of
        matplotlib) runs in a thread while the caller goes on, from the records as they are now;
        the next `plot` and `close` wait for it first, so each call still leaves its PNG, in
        order, and a failed drawing raises there."""
        if not self.enabled:
            return None
        self._wait_plot()
        records = list(self.records)  # this call's records: later ones are the next plot's
        if not background:
            return self._draw(records)

        def draw() -> None:
            try:
                self._draw(records)
            except BaseException as err:  # noqa: BLE001 — raised by the next plot / close
                self._plot_error = err

        self._plot_thread = threading.Thread(target=draw, name="cnnjax-plot", daemon=True)
        self._plot_thread.start()
        return self.plot_path

    def _wait_plot(self) -> None:
        """Waits for a background drawing; re-raises its error."""
        thread, self._plot_thread = self._plot_thread, None
        if thread is not None:
            thread.join()
        error, self._plot_error = self._plot_error, None
        if error is not None:
            raise error

    def _draw(self, records: list[dict]) -> str:
        import matplotlib

        matplotlib.use("Agg")
        # The object-oriented Figure, not pyplot's global figure registry: safe in a thread.
        from matplotlib.figure import Figure

        train = [r for r in records if r["split"] == "train"]
        val = [r for r in records if r["split"] == "eval"]
        fig = Figure(figsize=(10, 4))
        ax_loss, ax_acc = fig.subplots(1, 2)
        score = self.score_metric
        # (rows, label, marker style, metric-name prefix): `ema_` metrics are the eval of the
        # weight average (cnnjax.train.ema), drawn when the run keeps one.
        curves = ((train, "train", "-", ""), (val, "val", "o-", ""),
                  (val, "val (EMA)", "s--", "ema_"))
        for rows, label, style, prefix in curves:
            for ax, key in ((ax_loss, prefix + "loss"), (ax_acc, prefix + score)):
                points = [(r["step"], r[key]) for r in rows if key in r]
                if points:
                    ax.plot(*zip(*points, strict=True), style, label=label, markersize=3)
        ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
        if score == "top1":
            ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="Accuracy", ylim=(0, 1))
        else:
            ax_acc.set(xlabel="step", ylabel=score, title=f"Eval {score}", ylim=(0, 1))
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend()
        fig.tight_layout()
        return save_figure(fig, self.plot_path, dpi=100)

    def flush(self) -> None:
        """Flushes TensorBoard's events to disk (each metrics.jsonl record is closed on write)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Closes TensorBoard's file; waits for a background plot (raising its error)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._wait_plot()


class EventFileWriter:
    """Writes TensorBoard scalar event files with TensorFlow's record writer and protos.

    `tf.summary.scalar` needs the separate `tensorboard` package; the event file format is just
    TFRecords of `Event` protos, which TensorFlow core writes, so no extra dependency is needed.
    """

    def __init__(self, logdir: str):
        import socket

        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2
        from tensorflow.core.util import event_pb2

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._writer = tf.io.TFRecordWriter(self.path)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Writes one scalar event, `tag` = `value` at `step`."""
        summary = self._summary_pb2.Summary(
            value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))]
        )
        self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def session_start(self, step: int) -> None:
        """Marks a (re)start at `step`: TensorBoard purges events of step >= `step` read before
        this one (its `purge_orphaned_data`, the only purge rule for `brain.Event:2` files), so
        a resumed run shows one trajectory, as metrics.jsonl does."""
        log = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
        self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), session_log=log))

    def flush(self) -> None:
        """Flushes the events written so far to the file."""
        self._writer.flush()

    def close(self) -> None:
        """Closes the event file; no events can be written after."""
        self._writer.close()


def read_metrics(path: str) -> list[dict]:
    """Parses metrics.jsonl, skipping a torn last line left by a killed process, and any other
    unreadable line with a warning naming it (a resume rewrites the file without it: those
    records were dropped without a word)."""
    return _parse_metrics(path)[0]


def _parse_metrics(path: str) -> tuple[list[dict], int | None]:
    """`read_metrics`' records, and the step its torn last line still names (its start
    `{"step": N,` survived the cut; None when the last line is whole or names none)."""
    if not os.path.exists(path):
        return [], None
    records, torn_step = [], None
    with open(path) as f:
        lines = f.readlines()
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                match = re.match(r'\s*\{\s*"step":\s*(\d+)\s*,', line)
                torn_step = int(match.group(1)) if match else None
            elif line.strip():
                logging.warning("%s: line %d is not a JSON record; it is skipped (a resume "
                                "rewrites the file without it)", path, number)
    return records, torn_step


class ProgressBar:
    """A one-line progress display (steps, loss, images/s, ETA) when `stream` is a terminal.

    Off a terminal it logs a line through absl every `log_every` steps instead; given the train
    log's `mean_loss` (the loss metrics.jsonl records: the mean since the previous log), that
    line shows it, so the log and the metrics file agree at the same step.

    The ETA divides the steps left by the rate since the first update: that step compiled, so
    counting from before it made the first ETAs many times too long (evals and saves still
    count: they are part of the time left). On a terminal, an absl log line first erases the
    bar (the line would be glued to it), and the next update draws it again below.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        log_every: int = 100,
        width: int = 30,
    ):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.width = width
        self._first: tuple[int, float] | None = None  # (step, time) of the first update
        self._last_draw = 0.0
        self._line = ""  # the bar last drawn
        self._shown = False  # whether the stream's current line shows it
        if self.tty:
            logging.get_absl_handler().addFilter(self._clear_for_log)

    def update(self, step: int, loss: float, images_per_sec: float | None,
               mean_loss: tuple[float, int] | None = None) -> None:
        """Shows progress after `step` completed steps (`images_per_sec` None: not measured
        yet, shown as '?'); `mean_loss` `(loss, steps)`: the train log's mean loss over its
        window of `steps` steps, which the line logged off a terminal shows instead of `loss`."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        rate = (step - first_step) / max(now - first_time, 1e-9)
        left = self.total - step
        eta = 0.0 if left <= 0 else left / rate if rate > 0 else math.inf
        loss_text = f"loss {loss:.4f}"
        if mean_loss is not None and not self.tty:
            loss_text = f"mean loss {mean_loss[0]:.4f} over {mean_loss[1]} steps"
        text = (
            f"step {step}/{self.total} | {loss_text} | "
            f"{'?' if images_per_sec is None else format(images_per_sec, ',.0f')} img/s | "
            f"ETA {_format_seconds(eta)}"
        )
        if self.tty:
            if now - self._last_draw < 0.1 and step < self.total and self._shown:
                return
            self._last_draw = now
            filled = int(self.width * step / max(self.total, 1))
            self._line = f"[{'#' * filled}{'.' * (self.width - filled)}] {text}"
            self._draw()
        elif step % self.log_every == 0 or step == self.total:
            logging.info(text)

    def _draw(self) -> None:
        self.stream.write(f"\r{self._line}\033[K")
        self.stream.flush()
        self._shown = True

    def _clear_for_log(self, record: Any) -> bool:
        """absl handler filter: erases the bar before a log line is written; lets it pass."""
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False
        return True

    def close(self) -> None:
        """Ends the terminal's progress line, showing the bar last drawn (nothing to do off a
        terminal)."""
        if self.tty:
            logging.get_absl_handler().removeFilter(self._clear_for_log)
            if self._line:
                if not self._shown:
                    self._draw()
                self.stream.write("\n")
                self.stream.flush()
            self._line, self._shown = "", False


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

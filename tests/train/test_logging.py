"""Run outputs: metrics.jsonl rewriting on resume, TensorBoard events, the progress bar."""

import io
import json
import logging
import os
import re
import sys
import types
from pathlib import Path

import pytest
import tensorflow as tf
from absl import logging as absl_logging

from cnnjax.train import logging as logging_lib
from cnnjax.train.logging import MetricLogger, ProgressBar, QuietLibraries, read_metrics


def test_resume_drops_records_after_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in (10, 20, 30)]
    path.write_text("\n".join(lines) + '\n{"step": 40, "spl')  # killed mid-write
    assert [r["step"] for r in read_metrics(str(path))] == [10, 20, 30]
    logger = MetricLogger(str(tmp_path), resume_step=20, tensorboard=False)
    logger.write_scalars(30, "train", {"loss": 0.5, "top1": 0.9})
    assert [(r["step"], r["loss"]) for r in read_metrics(str(path))] == [
        (10, 0.1),
        (20, 0.05),
        (30, 0.5),
    ]


def test_an_unreadable_middle_line_is_skipped_with_a_warning_naming_it(tmp_path, monkeypatch):
    """A garbled line inside the file was dropped without a word (and a resume rewrote the file
    without it); a torn last line is a killed write, skipped quietly."""
    from cnnjax.train import logging as logging_lib

    warned = []
    monkeypatch.setattr(logging_lib.logging, "warning", lambda *args: warned.append(args))
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "split": "train", "loss": 1.0}) for s in (10, 20)]
    path.write_text(f"{good[0]}\n{{garbled\n{good[1]}\n{{\"step\": 3")
    assert [r["step"] for r in read_metrics(str(path))] == [10, 20]
    assert len(warned) == 1 and warned[0][1:] == (str(path), 2)


@pytest.mark.parametrize("resume_step,warns", [(40, True), (20, True), (30, False)])
def test_a_file_cut_before_the_resumed_step_warns_that_records_are_lost(tmp_path, monkeypatch,
                                                                        resume_step, warns):
    """metrics.jsonl cut inside the record of step 20, resumed from the checkpoint of step 40:
    steps 20-40 vanished without a word, as a killed run's last write does; resumed from step 20
    itself, that step's record is lost as well. A cut at a record past the checkpoint (here step
    40, resumed from 30) is that killed write: no warning."""
    from cnnjax.train import logging as logging_lib

    warned = []
    monkeypatch.setattr(logging_lib.logging, "warning", lambda *args: warned.append(args))
    path = tmp_path / "metrics.jsonl"
    good = json.dumps({"step": 10, "split": "train", "loss": 1.0})
    cut = 20 if warns else 40
    path.write_text(f'{good}\n{{"step": {cut}, "split": "tr')
    MetricLogger(str(tmp_path), resume_step=resume_step, tensorboard=False)
    assert [w[1:3] for w in warned] == ([(str(path), 20)] if warns else [])
    if warns:
        assert "the records from it up to step %d are lost" in warned[0][0]


def test_tensorboard_event_file_is_readable(tmp_path):
    logger = MetricLogger(str(tmp_path))
    logger.write_scalars(5, "eval", {"top1": 0.75})
    logger.write_learning_rate(5, 0.5)
    logger.close()
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    values = {
        (v.tag, e.step): v.simple_value
        for e in tf.compat.v1.train.summary_iterator(str(event_file))
        for v in e.summary.value
    }
    assert values == {("eval/top1", 5): 0.75, ("train/learning_rate", 5): 0.5}


def test_a_resumed_run_marks_its_restart_for_tensorboard(tmp_path):
    """Steps 10-30 logged, then a resume from the step-20 checkpoint logs 30 again: the new
    file opens with SessionLog.START at step 21, so TensorBoard's orphan purge (events of step
    >= 21 read before it are dropped) leaves one value per step, as metrics.jsonl has."""
    import time

    first = MetricLogger(str(tmp_path))
    for step in (10, 20, 30):
        first.write_scalars(step, "train", {"loss": 1.0})
    first.close()
    time.sleep(0.01)  # a later file name: TensorBoard reads files in name order
    resumed = MetricLogger(str(tmp_path), resume_step=20)
    resumed.write_scalars(30, "train", {"loss": 0.5})
    resumed.close()
    seen: list = []  # (tag, step, value) as TensorBoard keeps them, duplicates included
    for event_file in sorted((tmp_path / "tensorboard").iterdir()):
        for e in tf.compat.v1.train.summary_iterator(str(event_file)):
            if e.session_log.status == e.session_log.START:
                assert e.step in (1, 21)  # each logger marks its start
                seen = [x for x in seen if x[1] < e.step]
            seen += [(v.tag, e.step, v.simple_value) for v in e.summary.value]
    assert seen == [("train/loss", 10, 1.0), ("train/loss", 20, 1.0), ("train/loss", 30, 0.5)]


def test_plot_is_written(tmp_path):
    logger = MetricLogger(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        logger.write_scalars(step, "train", {"loss": 1.0 / step, "top1": 0.3 * step})
    logger.write_scalars(3, "eval", {"loss": 0.4, "top1": 0.8})
    path = logger.plot()
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_the_weight_average_when_the_run_keeps_one(tmp_path, monkeypatch):
    from cnnjax.train import logging as logging_lib

    figures = []
    monkeypatch.setattr(logging_lib, "save_figure", lambda fig, path, dpi: figures.append(fig))
    logger = MetricLogger(str(tmp_path), tensorboard=False)
    logger.write_scalars(3, "eval", {"loss": 0.4, "top1": 0.8})
    logger.plot()
    logger.write_scalars(6, "eval", {"loss": 0.3, "top1": 0.9, "ema_loss": 0.2, "ema_top1": 0.95})
    logger.plot()
    labels = [[line.get_label() for line in fig.axes[1].get_lines()] for fig in figures]
    assert labels == [["val"], ["val", "val (EMA)"]]
    assert list(figures[1].axes[1].get_lines()[1].get_ydata()) == [0.95]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_shows_steps_loss_rate_eta():
    stream = _Terminal()
    bar = ProgressBar(100, stream=stream)
    bar.update(100, 0.1234, 2500.0)
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\r[" + "#" * 30 + "]")
    assert "step 100/100 | loss 0.1234 | 2,500 img/s | ETA 0:00:00" in text
    bar = ProgressBar(100, stream=stream)  # live: the step's loss, not the train log's mean
    bar.update(100, 0.5, 2500.0, mean_loss=(0.75, 10))
    bar.close()
    assert "step 100/100 | loss 0.5000 | " in stream.getvalue()


@pytest.mark.parametrize("first_step", [1, 501])  # a fresh run; one resumed at step 500
def test_the_eta_counts_from_the_first_step_done_not_from_its_compilation(monkeypatch, caplog,
                                                                          first_step):
    """An invocation's first step compiles: an ETA counted from before it divided the steps left
    by a rate that included the compilation ('step 8/300 | 3,968 img/s | ETA 0:03:26' with ~5 s
    left), on the terminal and in the lines logged off one."""
    now = [100.0]
    monkeypatch.setattr(logging_lib, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    terminal = _Terminal()
    bars = [ProgressBar(1000, stream=terminal), ProgressBar(1000, stream=io.StringIO(),
                                                            log_every=20)]
    now[0] += 30.0  # the first step compiling
    with caplog.at_level("INFO", logger="absl"):
        for step in range(first_step, first_step + 20):  # then 8 steps/s
            for bar in bars:
                bar.update(step, 0.5, 1000.0)
            now[0] += 0.125
    for bar in bars:
        bar.close()
    last = first_step + 19  # 19 steps in 19 * 0.125 s after the first: 8 steps/s
    eta = logging_lib._format_seconds((1000 - last) / 8)  # 0:02:02, resumed 0:01:00
    assert f"step {last}/1000 | loss 0.5000 | 1,000 img/s | ETA {eta}\033[K\n" in \
        terminal.getvalue()
    assert caplog.records[-1].getMessage() == f"step {last}/1000 | loss 0.5000 | 1,000 img/s | " \
                                              f"ETA {eta}"


def test_a_log_line_on_a_terminal_erases_the_bar_which_is_drawn_again_below(monkeypatch):
    """absl writes to the terminal the bar is on: each line (an eval's) was glued to the stale
    bar ('\\r[...] ... ETA 0:00:15I1206 ... eval at step 100'), and close() left an empty line.
    Now the bar is erased first and drawn again at the next update, and at close."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # absl's stream here (flags not parsed)
    monkeypatch.setattr(logging.root, "handlers", [absl_logging.get_absl_handler()])
    bar = ProgressBar(10)
    bar.update(5, 0.5, 100.0)
    absl_logging.warning("eval at step 5")
    bar.update(6, 0.4, 100.0)  # drawn at once, not 0.1 s later: the bar was erased
    bar.update(10, 0.3, 100.0)
    absl_logging.warning("eval at step 10")
    bar.close()
    absl_logging.warning("after the run")  # the bar is gone: nothing erased before it
    def drawn(step):
        return r"\r\[#+\.*\] step " + str(step) + r"/10 [^\r\n]*\x1b\[K"

    def logged(message):
        return r"W[^\r\n]*\] " + message + r"\n"

    erased = r"\r\x1b\[K"
    expected = (drawn(5) + erased
                + r"(WARNING: Logging before flag parsing goes to stderr\.\n)?"  # absl's, once
                + logged("eval at step 5") + drawn(6) + drawn(10) + erased
                + logged("eval at step 10") + drawn(10) + r"\n" + logged("after the run"))
    assert re.fullmatch(expected, terminal.getvalue()), repr(terminal.getvalue())


def test_progress_bar_shows_an_unmeasured_rate_as_a_question_mark():
    """Before the loop timed a step (the first step of an invocation compiles) it passes None."""
    stream = _Terminal()
    bar = ProgressBar(10, stream=stream)
    bar.update(1, 0.5, None)
    bar.close()
    assert "step 1/10 | loss 0.5000 | ? img/s | ETA " in stream.getvalue()


def test_progress_bar_off_a_terminal_logs_the_final_step_between_log_steps(caplog):
    """10 steps logged every 4: steps 4 and 8, and the last one (10), though 10 is not a
    multiple of 4, so a log file ends with where the run ended."""
    bar = ProgressBar(10, stream=io.StringIO(), log_every=4)
    with caplog.at_level("INFO", logger="absl"):
        for step in range(1, 11):
            bar.update(step, 1.0 / step, 10.0)
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "absl"]
    assert [line.split(" | ")[0] for line in lines] == ["step 4/10", "step 8/10", "step 10/10"]


def test_progress_bar_logs_through_absl_off_a_terminal(caplog):
    """Not a TTY (a log file, a batch job): no bar on the stream, an absl line every log_every."""
    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream, log_every=5)
    with caplog.at_level("INFO", logger="absl"):
        for step in range(1, 11):
            bar.update(step, 1.0 / step, 10.0)
    bar.close()
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "absl"]
    assert len(lines) == 2  # steps 5 and 10 only
    assert lines[0].startswith("step 5/10 | loss 0.2000 | 10 img/s | ETA ")
    assert lines[1].startswith("step 10/10 | loss 0.1000 | 10 img/s | ETA 0:00:00")
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):  # given the train log's mean: that, named
        ProgressBar(10, stream=stream, log_every=5).update(5, 0.2, 10.0, mean_loss=(0.4567, 5))
    assert caplog.records[-1].getMessage().startswith(
        "step 5/10 | mean loss 0.4567 over 5 steps | 10 img/s | ETA ")


def test_disabled_progress_bar_neither_draws_nor_logs(caplog):
    stream = _Terminal()
    bar = ProgressBar(10, stream=stream, enabled=False, log_every=1)
    with caplog.at_level("INFO", logger="absl"):
        bar.update(10, 1.0, 10.0)
    bar.close()
    assert stream.getvalue() == "" and not caplog.records


def test_run_records_are_written_through_utils_files(tmp_path, monkeypatch):
    """summary.json, config.json, metrics.jsonl (rewritten on resume) and the learning-curve PNG
    are all renamed into place by `cnnjax.utils.files`, not by private copies of it."""
    import sys

    from cnnjax.train import loop
    from tests.train import helpers

    helpers.install_fake_pipeline(monkeypatch)
    real_replace, by_files = os.replace, []

    def replace(src, dst):
        if sys._getframe(1).f_globals["__name__"] == "cnnjax.utils.files":
            by_files.append(os.path.basename(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    loop.train_and_evaluate(helpers.tiny_config(), str(tmp_path))
    assert {"summary.json", "config.json", "metrics.jsonl", "learning_curves.png"} <= set(by_files)
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def _record(pathname: str, level: int, msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("absl", level, pathname, 1, msg, args, None)


def test_quiet_libraries_drops_orbax_info_and_its_read_only_warning_but_keeps_other_warnings():
    """cnnjax opens a run's checkpoints read-only on purpose, so orbax's `Given directory is read
    only=<dir>` is expected, not a fault; its other warnings, and other libraries' lines, pass."""
    orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    quiet = QuietLibraries()
    assert not quiet.filter(_record(orbax, logging.WARNING, "Given directory is read only=%s",
                                    "/runs/lenet/checkpoints"))
    assert not quiet.filter(_record(orbax, logging.INFO, "Saving checkpoint at step %d", 4))
    assert quiet.filter(_record(orbax, logging.WARNING, "Waiting for %s to finish", "save"))
    assert quiet.filter(_record(orbax, logging.ERROR, "Given directory is read only=%s", "/x"))
    assert quiet.filter(_record("/repo/cnnjax/train/loop.py", logging.INFO, "step %d", 1))
    assert quiet.filter(_record("/repo/cnnjax/train/loop.py", logging.WARNING,
                                "Given directory is read only=%s", "/x"))


def test_quiet_libraries_keeps_orbax_errors_without_their_tracebacks():
    """A failed async save (a full disk) logged four orbax errors with tracebacks, ~300 lines,
    before cnnjax re-raised the same error in one line."""
    orbax = "/venv/site-packages/orbax/checkpoint/async_checkpointer.py"
    try:
        raise OSError("RESOURCE_EXHAUSTED: No space left on device\n  deep details")
    except OSError:
        record = logging.LogRecord("absl", logging.ERROR, orbax, 1, "Save of step %d failed",
                                   (30,), sys.exc_info())
    assert QuietLibraries().filter(record)
    assert record.exc_info is None and record.exc_text is None
    assert logging.Formatter().format(record) == (
        "Save of step 30 failed (OSError: RESOURCE_EXHAUSTED: No space left on device)")
    other = "/repo/cnnjax/train/loop.py"  # others' tracebacks are theirs to print
    try:
        raise ValueError("x")
    except ValueError:
        mine = logging.LogRecord("absl", logging.ERROR, other, 1, "failed", (), sys.exc_info())
    assert QuietLibraries().filter(mine) and mine.exc_info is not None


def test_quiet_libraries_drops_tfds_info_and_jax_missing_tpu_line_but_keeps_their_warnings():
    """Every command opened each split with four tfds INFO lines and began with JAX's `Unable to
    initialize backend 'tpu'`; a missing CUDA backend and tfds's warnings are worth seeing."""
    tfds = "/venv/site-packages/tensorflow_datasets/core/dataset_info.py"
    bridge = "/venv/site-packages/jax/_src/xla_bridge.py"
    quiet = QuietLibraries()
    assert not quiet.filter(_record(tfds, logging.INFO, "Load dataset info from %s", "/d"))
    assert quiet.filter(_record(tfds, logging.WARNING, "Dataset %s is deprecated", "x"))
    assert not quiet.filter(_record(bridge, logging.INFO,
                                    "Unable to initialize backend 'tpu': INTERNAL: no libtpu"))
    assert quiet.filter(_record(bridge, logging.INFO,
                                "Unable to initialize backend 'cuda': no CUDA-enabled jaxlib"))
    assert quiet.filter(_record(bridge, logging.WARNING, "An NVIDIA GPU may be present"))


class _StartedError(Exception):
    """Stops a command's `main` at its first call."""


@pytest.mark.parametrize("module", ["cnnjax.analysis.effective_receptive_field",
                                    "cnnjax.analysis.summary", "cnnjax.analysis.zoo",
                                    "cnnjax.tune.diagnose", "cnnjax.models.torchvision_weights"])
def test_every_command_begins_with_start_command_so_orbax_info_is_quiet(module, monkeypatch):
    """`start_command` installs `QuietLibraries` (and refuses stray arguments) as the
    experiments' commands do; without it effective_receptive_field --workdir printed ~20 orbax
    INFO lines before its result."""
    import importlib

    from cnnjax.utils import cli

    seen = []

    def start(argv):
        seen.append(argv)
        raise _StartedError

    monkeypatch.setattr(cli, "start_command", start)
    with pytest.raises(_StartedError):
        importlib.import_module(module).main(["prog"])
    assert seen == [["prog"]]


def test_plot_in_background_is_written_and_updated_at_each_eval_in_order(tmp_path, monkeypatch):
    """`plot(background=True)` (the loop's, at each eval) draws off the training thread: every
    call still leaves its own PNG, in call order, each drawn from the records at the call, and
    `close()` waits for the last one."""
    import threading

    from cnnjax.train import logging as logging_lib

    drawn = []  # (thread, val steps on the figure) per saved figure
    real_save = logging_lib.save_figure
    release = threading.Event()

    def slow_save(fig, path, dpi):
        release.wait(10)  # still drawing when the next eval's records arrive
        drawn.append((threading.current_thread(), list(fig.axes[0].get_lines()[-1].get_xdata())))
        return real_save(fig, path, dpi=dpi)

    monkeypatch.setattr(logging_lib, "save_figure", slow_save)
    logger = MetricLogger(str(tmp_path), tensorboard=False)
    logger.write_scalars(3, "eval", {"loss": 0.4, "top1": 0.8})
    assert logger.plot(background=True) == str(tmp_path / "learning_curves.png")
    logger.write_scalars(6, "eval", {"loss": 0.3, "top1": 0.9})  # the caller goes on meanwhile
    assert drawn == []
    release.set()
    logger.plot(background=True)  # waits for the first drawing, then starts its own
    logger.close()  # waits for the last drawing
    assert [steps for _, steps in drawn] == [[3], [3, 6]]
    assert all(thread is not threading.main_thread() for thread, _ in drawn)
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_in_background_reports_a_failed_drawing(tmp_path, monkeypatch):
    from cnnjax.train import logging as logging_lib

    def broken_save(fig, path, dpi):
        raise OSError("disk full")

    monkeypatch.setattr(logging_lib, "save_figure", broken_save)
    logger = MetricLogger(str(tmp_path), tensorboard=False)
    logger.write_scalars(3, "eval", {"loss": 0.4, "top1": 0.8})
    logger.plot(background=True)
    with pytest.raises(OSError, match="disk full"):
        logger.close()


def test_plot_in_background_draws_the_records_of_its_call_not_later_ones(tmp_path, monkeypatch):
    """The drawing thread is held before it draws until the caller has logged the next eval:
    the figure still shows only the evals logged before `plot` (its own copy of the records)."""
    import threading

    from cnnjax.train import logging as logging_lib

    release = threading.Event()
    real_draw = MetricLogger._draw

    def held_draw(self, records):
        release.wait(10)
        return real_draw(self, records)

    drawn = []  # the val steps of each saved figure
    monkeypatch.setattr(MetricLogger, "_draw", held_draw)
    monkeypatch.setattr(logging_lib, "save_figure", lambda fig, path, dpi: drawn.append(
        list(fig.axes[0].get_lines()[-1].get_xdata())))
    logger = MetricLogger(str(tmp_path), tensorboard=False)
    logger.write_scalars(3, "eval", {"loss": 0.4, "top1": 0.8})
    logger.plot(background=True)
    logger.write_scalars(6, "eval", {"loss": 0.3, "top1": 0.9})
    release.set()
    logger.close()
    assert drawn == [[3]]
    assert [r["step"] for r in logger.records] == [3, 6]


def test_a_failed_background_drawing_is_raised_once(tmp_path, monkeypatch):
    """The next `plot` raises the failed drawing's error; `close` after it does not raise it
    again (the run would fail at its end for an error already reported)."""
    from cnnjax.train import logging as logging_lib

    calls = []

    def fails_once(fig, path, dpi):
        calls.append(path)
        if len(calls) == 1:
            raise OSError("disk full")
        return path

    monkeypatch.setattr(logging_lib, "save_figure", fails_once)
    logger = MetricLogger(str(tmp_path), tensorboard=False)
    logger.write_scalars(3, "eval", {"loss": 0.4, "top1": 0.8})
    logger.plot(background=True)
    with pytest.raises(OSError, match="disk full"):
        logger.plot(background=True)
    logger.close()
    assert len(calls) == 1  # the raising plot drew nothing

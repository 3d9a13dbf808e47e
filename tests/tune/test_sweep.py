"""run_sweep with the real engine: ranking, divergence and failures recorded, per-trial resume,
one trial alone (array task), and refusal of a sweep_dir made by a different sweep."""

import contextlib
import csv
import errno
import fcntl
import importlib.util
import json
import os
import re
import threading
import time

import ml_collections
import numpy as np
import pytest

from cnnjax.train import config as config_lib
from cnnjax.train.checkpoint import Checkpointer
from cnnjax.train.logging import read_metrics
from cnnjax.tune import space as sp
from cnnjax.tune import sweep as sw
from cnnjax.utils import files
from cnnjax.utils.lock import directory_lock
from tests.train import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _lenet_digits(**overrides):
    """experiments/configs/lenet5_digits.py cut to 12 steps (evals at 6 and 12)."""
    path = os.path.join(ROOT, "experiments", "configs", "lenet5_digits.py")
    spec = importlib.util.spec_from_file_location("lenet5_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.num_train_steps = 12
    config.global_batch_size = 32
    config.log_every_steps = 6
    config.eval_every_steps = 6
    config.checkpoint_every_steps = 6
    config.schedule.name = "constant"
    config.schedule.warmup_steps = 0
    config.progress_bar = False
    config.tensorboard = False
    config.async_checkpoints = False
    for key, value in overrides.items():
        config[key] = value
    config.lock()
    return config


def _tiny_base(**overrides):
    """The engine's own test model and synthetic data: a trial takes about a second."""
    config = helpers.tiny_config(**overrides)
    config.lock()
    return config


def _quick_base(**overrides):
    """`_tiny_base` evaluated and checkpointed at its last step only, for tests that only need
    trials to run or finish."""
    config = sp.apply_overrides(helpers.at_the_end_only(helpers.tiny_config()), overrides)
    config.lock()
    return config


def _tiny_engine(monkeypatch):
    """The engine's synthetic pipeline and tiny model for this test, and no sweep.png: drawn
    after every trial (about half a second each), it is checked by
    test_lenet_digits_sweep_ranks_trials_and_records_divergence and the figure tests."""
    helpers.install_fake_pipeline(monkeypatch)
    monkeypatch.setattr(sw, "plot_results", lambda *args, **kwargs: None)


def _json(path):
    with open(path) as f:
        return json.load(f)


def _csv_rows(sweep_dir):
    with open(os.path.join(sweep_dir, sw.RESULTS_CSV)) as f:
        return list(csv.DictReader(f))


def _best_from_metrics(workdir, metric="top1"):
    evals = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
             if r["split"] == "eval"]
    return max(r[metric] for r in evals)


def test_lenet_digits_sweep_ranks_trials_and_records_divergence(tmp_path, capsys,
                                                                monkeypatch):
    """Three real LeNet-5/digits trials: a good lr, a far too small one, and lr=1000 which
    diverges; the diverged trial is recorded and the sweep goes on to the next one."""
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.0005, 1000.0, 0.2]})
    # sweep.png is drawn once every trial has finished (twice: after the last trial and at the
    # end); the tables rewritten while trials are pending or running skip it (about half a
    # second each): their figure would show a subset of the same completed trials (pending ones
    # are not drawn).
    plot = sw.plot_results

    def plot_once_finished(rows, *args, **kwargs):
        if all(r["status"] not in ("pending", "incomplete") for r in rows):
            return plot(rows, *args, **kwargs)
        return None

    monkeypatch.setattr(sw, "plot_results", plot_once_finished)
    rows = sw.run_sweep(_lenet_digits(), space, sweep_dir, metric="top1", mode="max")

    by_lr = {r["overrides"]["optimizer.learning_rate"]: r for r in rows}
    diverged = by_lr[1000.0]
    assert diverged["status"] == "diverged" and diverged["rank"] is None
    assert "Training diverged at step" in diverged["reason"]
    assert "learning rate too high" in diverged["reason"]
    assert by_lr[0.2]["status"] == by_lr[0.0005]["status"] == "completed"  # ran after it
    # Ranking: best top-1 first, each value the max over the trial's own metrics.jsonl evals.
    assert [r["overrides"]["optimizer.learning_rate"] for r in rows] == [0.2, 0.0005, 1000.0]
    assert [r["rank"] for r in rows] == [1, 2, None]
    for lr in (0.2, 0.0005):
        workdir = os.path.join(sweep_dir, "trials", sp.trial_id({"optimizer.learning_rate": lr}))
        summary = _json(os.path.join(workdir, "summary.json"))
        assert summary["status"] == "completed" and summary["step"] == 12
        assert by_lr[lr]["best"] == _best_from_metrics(workdir)
        assert by_lr[lr]["final"] == summary["final_eval"]["top1"]
        assert by_lr[lr]["steps"] == 12 and by_lr[lr]["wall_time_s"] > 0
    assert by_lr[0.2]["best"] > by_lr[0.0005]["best"] + 0.2  # 12 steps at 0.2 learn; 5e-4 not

    table = _csv_rows(sweep_dir)
    assert [row["optimizer.learning_rate"] for row in table] == ["0.2", "0.0005", "1000.0"]
    assert [row["status"] for row in table] == ["completed", "completed", "diverged"]
    assert [row["rank"] for row in table] == ["1", "2", ""]
    assert float(table[0]["best_top1"]) == by_lr[0.2]["best"]
    assert _json(os.path.join(sweep_dir, sw.RESULTS_JSON))["trials"] == rows
    saved = _json(os.path.join(sweep_dir, sw.SWEEP_FILE))
    assert saved["space"] == space.describe() | {"parameters": [
        {"field": "optimizer.learning_rate", "distribution": "choice",
         "values": [0.0005, 1000.0, 0.2]}]}
    assert [t["trial_id"] for t in saved["trials"]] == [t.trial_id for t in space.trials]
    assert os.path.getsize(os.path.join(sweep_dir, sw.PLOT_FILE)) > 1000
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    assert re.match(r"1\s+\w{10}\s+0\.2\s+completed", lines[header + 2])
    assert re.match(r"-\s+\w{10}\s+1000\s+diverged", lines[header + 4])


def test_rerun_skips_finished_trials_and_runs_the_rest(tmp_path, monkeypatch):
    """max_trials=1 runs the first trial and leaves the others pending; the rerun runs only
    those, and a third run (or max_trials=0) touches no trial."""
    _tiny_engine(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.01, 0.2]})
    rows = sw.run_sweep(_quick_base(), space, sweep_dir, max_trials=1, verbose=False)
    assert [r["status"] for r in sorted(rows, key=lambda r: r["index"])] == [
        "completed", "pending", "pending"]
    first = sw.trial_workdir(sweep_dir, space.trials[0])
    before = helpers.finished_run_files(first)
    assert [row["status"] for row in _csv_rows(sweep_dir)] == ["completed", "pending", "pending"]

    rows = sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)
    assert all(r["status"] == "completed" for r in rows)
    assert helpers.finished_run_files(first) == before  # not rerun, not even touched
    for trial in space.trials[1:]:
        summary = _json(os.path.join(sw.trial_workdir(sweep_dir, trial), "summary.json"))
        assert summary["status"] == "completed" and summary["resumed_from_step"] == 0
    # A third run trains nothing; max_trials=0 only rebuilds the table.
    states = [helpers.finished_run_files(sw.trial_workdir(sweep_dir, t)) for t in space.trials]
    assert sw.run_sweep(_quick_base(), space, sweep_dir, max_trials=0, verbose=False) == rows
    sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)
    files = helpers.finished_run_files
    assert [files(sw.trial_workdir(sweep_dir, t)) for t in space.trials] == states


def test_a_ctrl_c_while_the_table_shows_a_trial_started_records_it_interrupted(tmp_path,
                                                                               monkeypatch):
    """The results table is rewritten as a trial starts: a Ctrl-C there left its trial.json
    "incomplete" with `started_at` (as a SIGKILLed trial's) and the table saying pending."""
    _tiny_engine(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05]})
    write = sw.write_results

    def interrupted_once_started(*args, **kwargs):
        write(*args, **kwargs)
        if os.path.exists(os.path.join(sw.trial_workdir(sweep_dir, space.trials[0]),
                                       sw.TRIAL_FILE)):
            monkeypatch.setattr(sw, "write_results", write)
            raise KeyboardInterrupt

    monkeypatch.setattr(sw, "write_results", interrupted_once_started)
    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)
    trial = _json(os.path.join(sw.trial_workdir(sweep_dir, space.trials[0]), sw.TRIAL_FILE))
    assert trial["status"] == "interrupted" and "started_at" not in trial
    assert [row["status"] for row in _csv_rows(sweep_dir)] == ["interrupted"]
    rows = sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)
    assert [r["status"] for r in rows] == ["completed"]


def test_interrupted_trial_resumes_from_its_own_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C after the step-4 checkpoint of trial 1: the table says interrupted; the rerun
    skips trial 0 and continues trial 1 from step 4 (the engine's exact resume)."""
    _tiny_engine(monkeypatch)
    from cnnjax.train import loop

    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.02]})
    save = loop.Checkpointer.save
    calls = []

    def save_then_interrupt(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        calls.append(step)
        if calls.count(4) == 2:  # trial 0 saves at 4, 8, 12; trial 1 stops after step 4
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Checkpointer, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(_quick_base(checkpoint_every_steps=4), space, sweep_dir, verbose=False)
    monkeypatch.setattr(loop.Checkpointer, "save", save)
    assert [row["status"] for row in _csv_rows(sweep_dir)] == ["completed", "interrupted"]
    assert _csv_rows(sweep_dir)[1]["steps"] == "4"
    before = helpers.finished_run_files(sw.trial_workdir(sweep_dir, space.trials[0]))

    rows = sw.run_sweep(_quick_base(checkpoint_every_steps=4), space, sweep_dir, verbose=False)
    assert all(r["status"] == "completed" for r in rows)
    assert helpers.finished_run_files(sw.trial_workdir(sweep_dir, space.trials[0])) == before
    resumed = sw.trial_workdir(sweep_dir, space.trials[1])
    summary = _json(os.path.join(resumed, "summary.json"))
    assert summary["resumed_from_step"] == 4 and summary["step"] == 12
    record = _json(os.path.join(resumed, "trial.json"))
    assert record["invocations"] == 2 and record["status"] == "completed"


def test_a_sigterm_stopped_trial_records_the_signal_and_the_checkpointed_step(tmp_path,
                                                                                monkeypatch):
    """SIGTERM in trial 1 (after its step-4 checkpoint): trial.json's reason names
    TrainingInterrupted and the signal, not KeyboardInterrupt, and the table's steps are the
    step the engine stopped at and checkpointed (summary.json), not the last logged one."""
    import signal

    from cnnjax.train import loop
    from cnnjax.train.preemption import TrainingInterrupted

    _tiny_engine(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.02]})
    save = loop.Checkpointer.save
    calls = []

    def save_then_sigterm(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        calls.append(step)
        if calls.count(4) == 2 and calls[-1] == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # the engine stops after its next step

    monkeypatch.setattr(loop.Checkpointer, "save", save_then_sigterm)
    with pytest.raises(TrainingInterrupted):
        sw.run_sweep(_quick_base(checkpoint_every_steps=4), space, sweep_dir, verbose=False)
    workdir = sw.trial_workdir(sweep_dir, space.trials[1])
    summary = _json(os.path.join(workdir, "summary.json"))
    record = _json(os.path.join(workdir, "trial.json"))
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert record["status"] == "interrupted"
    assert record["reason"].startswith(
        f"TrainingInterrupted: Training stopped by SIGTERM at step {summary['step']} ")
    logged = max(r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")))
    assert logged < summary["step"]  # what the table showed before
    row = _csv_rows(sweep_dir)[1]
    assert row["status"] == "interrupted" and row["steps"] == str(summary["step"])


def test_a_sigterm_during_a_trials_final_save_stops_the_sweep_before_the_next_trial(
        tmp_path, monkeypatch):
    """SIGTERM after the engine's last poll (during trial 0's final checkpoint) cannot stop
    that trial, which completes; it used to be dropped with the engine's handler, so the sweep
    trained trial 1 until the cluster's SIGKILL. Now trial 1 is recorded interrupted before it
    trains, the sweep raises TrainingInterrupted (exit 143), and a rerun runs trial 1 only."""
    import signal

    from cnnjax.train import loop
    from cnnjax.train.preemption import TrainingInterrupted

    _tiny_engine(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.02]})
    save = loop.Checkpointer.save
    saved = []

    def save_then_sigterm(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        saved.append(step)
        if step == 12 and saved.count(12) == 1:  # trial 0's final save
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop.Checkpointer, "save", save_then_sigterm)
    with pytest.raises(TrainingInterrupted) as info:
        sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)
    assert info.value.code == 143
    assert saved.count(12) == 1 and max(saved) == 12 and len(saved) == saved.index(12) + 1
    rows = _csv_rows(sweep_dir)
    assert [row["status"] for row in rows] == ["completed", "interrupted"]
    second = sw.trial_workdir(sweep_dir, space.trials[1])
    assert not os.path.exists(os.path.join(second, "checkpoints"))
    record = _json(os.path.join(second, "trial.json"))
    assert record["status"] == "interrupted" and "SIGTERM" in record["reason"]

    rows = sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)  # nothing pending now
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert saved.count(12) == 2

def test_a_sigterm_between_trials_stops_the_sweep_before_the_next_trial(tmp_path,
                                                                        monkeypatch):
    """SIGTERM while the sweep rewrites its table after trial 0, outside any run: the driver
    had no handler then (the default killed it with no record; here a caller's handler took
    the signal and trial 1 trained on). Now trial 1 is recorded interrupted before it trains
    and the sweep raises TrainingInterrupted (exit 143)."""
    import signal

    from cnnjax.train.preemption import TrainingInterrupted

    _tiny_engine(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.02]})
    write_results = sw.write_results
    calls = []

    def write_then_sigterm(*args, **kwargs):
        rows = write_results(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the table after trial 0 ended
            os.kill(os.getpid(), signal.SIGTERM)
        return rows

    monkeypatch.setattr(sw, "write_results", write_then_sigterm)
    with helpers.sigterm_fallback() as caught, pytest.raises(TrainingInterrupted):
        sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)
    assert caught == []
    second = sw.trial_workdir(sweep_dir, space.trials[1])
    assert not os.path.exists(os.path.join(second, "checkpoints"))
    assert [row["status"] for row in _csv_rows(sweep_dir)] == ["completed", "interrupted"]


def test_a_diverged_trial_is_retried_under_another_max_loss(tmp_path):
    """max_loss may change on a rerun (a runtime field); a trial that diverged by the old limit
    was kept as diverged, so one sweep folder mixed two settings."""
    files.write_json(str(tmp_path / "summary.json"), {"status": "diverged", "step": 12})
    files.write_json(str(tmp_path / sw.TRIAL_FILE), {"status": "diverged"})
    files.write_json(str(tmp_path / "config.json"), {"max_loss": 1000.0})
    assert sw.finished_status(str(tmp_path), helpers.tiny_config(max_loss=1000.0)) == "diverged"
    assert sw.finished_status(str(tmp_path), helpers.tiny_config(max_loss=1e30)) is None


def test_a_trial_completed_at_another_step_count_is_not_finished(tmp_path):
    """A summary says "completed" at the step it ran to: a trial whose run stopped at 12 steps is
    not finished under num_train_steps=24 (it resumes to 24), only under 12."""
    files.write_json(str(tmp_path / "summary.json"), {"status": "completed", "step": 12})
    files.write_json(str(tmp_path / sw.TRIAL_FILE), {"status": "completed"})
    assert sw.finished_status(str(tmp_path), helpers.tiny_config(num_train_steps=12)) == "completed"
    assert sw.finished_status(str(tmp_path), helpers.tiny_config(num_train_steps=24)) is None


def test_a_killed_retry_of_a_diverged_trial_is_not_read_as_diverged(tmp_path):
    """summary.json still says "diverged" from the run before, but trial.json says a retry (under
    this very max_loss) started and never recorded its end: the trial runs again, as it is not
    known to diverge under this setting until a run says so."""
    files.write_json(str(tmp_path / "summary.json"), {"status": "diverged", "step": 6})
    files.write_json(str(tmp_path / sw.TRIAL_FILE), {"status": "incomplete",
                                                     "started_at": time.time()})
    files.write_json(str(tmp_path / "config.json"), {"max_loss": 1e30})
    assert sw.finished_status(str(tmp_path), helpers.tiny_config(max_loss=1e30)) is None


def test_a_killed_starts_time_is_counted_on_the_next_start(tmp_path, monkeypatch):
    """SIGKILL skips run_trial's bookkeeping: the next start adds the killed start's time, up
    to the newest file it wrote (not the idle time until the rerun), and a start that recorded
    its own time is not counted twice."""
    trial = sp.grid({"optimizer.learning_rate": [0.05]}).trials[0]
    workdir = str(tmp_path / "trial")
    first = sw.start_trial(trial, workdir)
    assert first["wall_time_s"] == 0.0 and first["invocations"] == 1
    # the killed start wrote metrics for 30 s, then lay dead 1000 s before the rerun (whose lock
    # file, written now, is not the killed start's last write)
    started = first["started_at"] - 1000.0
    files.write_json(os.path.join(workdir, sw.TRIAL_FILE), {**first, "started_at": started})
    metrics = os.path.join(workdir, "metrics.jsonl")
    with open(metrics, "w") as f:
        f.write("{}\n")
    os.utime(metrics, (started + 30.0, started + 30.0))
    with directory_lock(workdir):  # as run_sweep starts it: the lock file is written just now
        second = sw.start_trial(trial, workdir)
    assert second["wall_time_s"] == pytest.approx(30.0)
    assert second["invocations"] == 2 and second["started_at"] >= started

    monkeypatch.setattr(sw, "train_and_evaluate", lambda config, workdir: None)
    done = sw.run_trial(_tiny_base(), workdir, second)
    assert done["status"] == "completed" and "started_at" not in done
    recorded = _json(os.path.join(workdir, sw.TRIAL_FILE))
    assert "started_at" not in recorded and recorded["wall_time_s"] >= 30.0
    os.utime(metrics)  # newer files no longer count: this start's time was recorded
    third = sw.start_trial(trial, workdir)
    assert third["wall_time_s"] == recorded["wall_time_s"] and third["invocations"] == 3


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    _tiny_engine(monkeypatch)
    engine = sw.train_and_evaluate

    def data_lost_in_trial_0(config, workdir):  # passes check_config, fails once it runs
        if config.optimizer.learning_rate == 0.05:
            raise OSError("stand-in: the data disappeared mid-run")
        return engine(config, workdir)

    monkeypatch.setattr(sw, "train_and_evaluate", data_lost_in_trial_0)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.01]})
    rows = sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)
    failed, done = sorted(rows, key=lambda r: r["index"])
    assert failed["status"] == "failed" and done["status"] == "completed"
    assert failed["reason"].startswith("OSError: stand-in: the data disappeared mid-run")
    with open(os.path.join(failed["workdir"], "error.log")) as f:
        assert "Traceback" in f.read()
    assert [r["rank"] for r in rows] == [1, None]
    # A rerun retries the failed trial (failures may be transient) and leaves the other alone.
    before = helpers.finished_run_files(done["workdir"])
    rows = sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)
    assert _json(os.path.join(failed["workdir"], "trial.json"))["invocations"] == 2
    assert helpers.finished_run_files(done["workdir"]) == before
    # Once it completes, the earlier traceback is kept aside, not read as this outcome.
    monkeypatch.setattr(sw, "train_and_evaluate", engine)
    rows = sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)
    assert {r["index"]: r["status"] for r in rows} == {0: "completed", 1: "completed"}
    assert not os.path.exists(os.path.join(failed["workdir"], "error.log"))
    with open(os.path.join(failed["workdir"], "error.previous.log")) as f:
        assert "stand-in: the data disappeared mid-run" in f.read()


def test_a_trial_another_process_is_running_is_skipped_not_run_twice(tmp_path, monkeypatch,
                                                                     capsys):
    _tiny_engine(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.01]})
    busy = sw.trial_workdir(sweep_dir, space.trials[0])
    with helpers.locked_by_another_process(busy):
        rows = sw.run_sweep(_quick_base(), space, sweep_dir, max_trials=1)
    # Not recorded as failed and not counted against max_trials: trial 1 ran instead.
    assert {r["index"]: r["status"] for r in rows} == {0: "pending", 1: "completed"}
    assert sorted(os.listdir(busy)) == ["run.lock"]
    out = capsys.readouterr().out
    assert re.search(r"Trial \S+: skipped, its workdir .* is in use by another run", out)
    assert "--workdir" not in out  # experiments.sweep has no such flag to pass
    # An array task asked for it alone: an error naming the trial, and no --workdir to pass.
    with (helpers.locked_by_another_process(busy),
          pytest.raises(ValueError, match=r"^sweep: trial_index=0 \(trial "
                                          rf"{space.trials[0].trial_id}\): its workdir .* is in "
                                          r"use by another run \(pid .*\); another task or "
                                          r"driver of this sweep is running it: wait for it to "
                                          r"finish or stop it, then rerun\.$")):
        sw.run_sweep(_quick_base(), space, sweep_dir, trial_index=0, verbose=False)
    rows = sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)  # the holder is gone
    assert {r["index"]: r["status"] for r in rows} == {0: "completed", 1: "completed"}


def test_a_trial_another_driver_finished_before_the_lock_is_not_entered(tmp_path, monkeypatch):
    """The finished-check ran before the trial's lock only: a trial another driver finished in
    between was entered again (its trial.json's `invocations` rose, a max_trials slot spent)."""
    _tiny_engine(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05]})
    sw.run_sweep(_quick_base(), space, sweep_dir, verbose=False)
    first = sw.trial_workdir(sweep_dir, space.trials[0])
    before = helpers.finished_run_files(first)
    real, seen = sw.finished_status, set()

    def not_yet_the_first_time(workdir, config):  # finished by another driver after this check
        if workdir not in seen:
            seen.add(workdir)
            return None
        return real(workdir, config)

    monkeypatch.setattr(sw, "finished_status", not_yet_the_first_time)
    monkeypatch.setattr(sw, "_run_and_tabulate",
                        lambda *args: pytest.fail("a finished trial was entered"))
    rows = sw.run_sweep(_quick_base(), space, sweep_dir, max_trials=1, verbose=False)
    assert [r["status"] for r in rows] == ["completed"]
    assert helpers.finished_run_files(first) == before


def test_trial_index_runs_that_trial_alone(tmp_path, monkeypatch):
    _tiny_engine(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.01]})
    rows = sw.run_sweep(_quick_base(), space, sweep_dir, trial_index=1, verbose=False)
    assert {r["index"]: r["status"] for r in rows} == {0: "pending", 1: "completed"}
    assert not os.path.exists(sw.trial_workdir(sweep_dir, space.trials[0]))


def test_trial_count_runs_consecutive_trials_from_trial_index(tmp_path, monkeypatch):
    """An array task running several trials: trials 1 and 2 of 4, then the last trial with a
    count past the end (only the trials that exist)."""
    _tiny_engine(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.01, 0.02, 0.03]})
    rows = sw.run_sweep(_quick_base(), space, sweep_dir, trial_index=1, trial_count=2,
                        verbose=False)
    assert [r["status"] for r in sorted(rows, key=lambda r: r["index"])] == [
        "pending", "completed", "completed", "pending"]
    rows = sw.run_sweep(_quick_base(), space, sweep_dir, trial_index=3, trial_count=2,
                        verbose=False)
    assert {r["index"] for r in rows if r["status"] == "completed"} == {1, 2, 3}


def test_sweep_dir_of_a_different_sweep_is_refused(tmp_path, monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.01]})
    sw.run_sweep(_tiny_base(), space, sweep_dir, max_trials=0, verbose=False)  # sweep.json only
    assert os.path.exists(os.path.join(sweep_dir, sw.SWEEP_FILE))
    other = sp.grid({"optimizer.learning_rate": [0.05, 0.3]})
    with pytest.raises(ValueError, match=re.escape(
            f"sweep: sweep_dir={sweep_dir!r} holds a different search space (parameters["
            "'optimizer.learning_rate'].values: [0.05, 0.01] -> [0.05, 0.3]); ")) as err:
        sw.run_sweep(_tiny_base(), other, sweep_dir, verbose=False)
    assert "to start fresh use a new --sweep_dir or delete this one" in str(err.value)
    base = _tiny_base().unlock()
    base.num_train_steps = 20
    with pytest.raises(ValueError, match=re.escape(
            f"sweep: sweep_dir={sweep_dir!r} was created with a different base config "
            "(num_train_steps: 12 -> 20); to start fresh use a new --sweep_dir")):
        sw.run_sweep(base, space, sweep_dir, verbose=False)
    # Runtime-only fields and the swept field's base value may change; so may the metric.
    base = _tiny_base().unlock()
    base.progress_bar, base.optimizer.learning_rate = True, 0.7
    sw.run_sweep(base, space, sweep_dir, metric="loss", max_trials=0, verbose=False)


def test_an_unreadable_sweep_json_is_refused_naming_the_file(tmp_path, monkeypatch):
    """A sweep.json cut short (a disk error) ended the sweep with JSON's bare "Expecting ...:
    line 83 column 3", naming neither the file nor what to do."""
    helpers.install_fake_pipeline(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.01]})
    sw.run_sweep(_tiny_base(), space, sweep_dir, max_trials=0, verbose=False)
    path = os.path.join(sweep_dir, sw.SWEEP_FILE)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[:len(text) // 2])
    with pytest.raises(ValueError, match=re.escape(
            f"sweep: {path!r} is unreadable (JSONDecodeError: ")) as err:
        sw.run_sweep(_tiny_base(), space, sweep_dir, verbose=False)
    assert "delete it and rerun the sweep's own command" in str(err.value)
    os.remove(path)  # the same sweep's command writes it again
    sw.run_sweep(_tiny_base(), space, sweep_dir, max_trials=0, verbose=False)
    assert files.read_json(path) is not None


def test_a_random_sweep_grows_by_raising_num_trials(tmp_path, monkeypatch):
    """The same seed draws the same first trials whatever num_trials is, so a random sweep asked
    for more trials keeps its finished ones and runs only the new; fewer trials, another seed or
    another space is still a different sweep."""
    _tiny_engine(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    lrs = (sp.log_uniform("optimizer.learning_rate", 0.005, 0.1),)
    small, large = sp.random(lrs, 2, seed=3), sp.random(lrs, 3, seed=3)
    assert large.trials[:2] == small.trials
    sw.run_sweep(_quick_base(), small, sweep_dir, verbose=False)
    started = {t.trial_id: os.path.getmtime(os.path.join(sw.trial_workdir(sweep_dir, t),
                                                         "summary.json"))
               for t in small.trials}
    rows = sw.run_sweep(_quick_base(), large, sweep_dir, verbose=False)
    assert [r["status"] for r in sorted(rows, key=lambda r: r["index"])] == ["completed"] * 3
    for trial in small.trials:  # not rerun
        assert os.path.getmtime(os.path.join(sw.trial_workdir(sweep_dir, trial),
                                             "summary.json")) == started[trial.trial_id]
    assert _json(os.path.join(sweep_dir, sw.SWEEP_FILE))["space"]["num_trials"] == 3
    for other in (sp.random(lrs, 2, seed=3), sp.random(lrs, 4, seed=4)):
        with pytest.raises(ValueError, match="holds a different search space"):
            sw.run_sweep(_quick_base(), other, sweep_dir, max_trials=0, verbose=False)


def test_max_trials_0_refuses_to_grow_a_random_sweep(tmp_path, monkeypatch):
    """max_trials=0 (only rebuild the table) with a larger num_trials wrote the grown space to
    sweep.json, after which the sweep's own command was refused as a shrink; it is refused,
    and sweep.json and the table stay as they were."""
    _tiny_engine(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    lrs = (sp.log_uniform("optimizer.learning_rate", 0.005, 0.1),)
    small, large = sp.random(lrs, 2, seed=3), sp.random(lrs, 3, seed=3)
    rows = sw.run_sweep(_quick_base(), small, sweep_dir, max_trials=0, verbose=False)
    paths = [tmp_path / "sweep" / name for name in (sw.SWEEP_FILE, sw.RESULTS_CSV)]
    before = [path.read_text() for path in paths]
    with pytest.raises(ValueError) as err:
        sw.run_sweep(_quick_base(), large, sweep_dir, max_trials=0, verbose=False)
    assert str(err.value) == (
        f"sweep: max_trials=0 is invalid; with num_trials=3 it would grow the random sweep in "
        f"sweep_dir={sweep_dir!r} from its 2 trials, and max_trials=0 only rebuilds the results "
        "table of the trials it holds: rerun with num_trials=2 to rebuild the table, or with "
        "max_trials unset or >= 1 to grow the sweep to 3 trials.")
    assert [path.read_text() for path in paths] == before
    assert sw.run_sweep(_quick_base(), small, sweep_dir, max_trials=0, verbose=False) == rows
    # A driver that may start trials grows it, as before.
    rows = sw.run_sweep(_quick_base(), large, sweep_dir, max_trials=1, verbose=False)
    assert [r["status"] for r in sorted(rows, key=lambda r: r["index"])] == [
        "completed", "pending", "pending"]
    assert _json(os.path.join(sweep_dir, sw.SWEEP_FILE))["space"]["num_trials"] == 3


def test_a_grid_sweep_dir_resumes_whether_its_file_sets_num_trials_or_not(tmp_path, monkeypatch):
    """Grids now refuse a num_trials other than their size; a sweep dir created before (sweep.json
    of a grid records num_trials=None, whatever the file said) still resumes from a file that
    restates the size or leaves it unset, and one that differs is refused before anything runs."""
    helpers.install_fake_pipeline(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    lrs = (sp.choice("optimizer.learning_rate", (0.05, 0.01)),)
    sw.run_sweep(_tiny_base(), sp.grid(lrs), sweep_dir, max_trials=0, verbose=False)
    saved = _json(os.path.join(sweep_dir, sw.SWEEP_FILE))
    assert saved["space"]["num_trials"] is None
    for extra in ({}, {"num_trials": 2}, {"num_trials": None}):
        space = sp.from_config({"kind": "grid", "seed": 0, "parameters": lrs, **extra})
        sw.run_sweep(_tiny_base(), space, sweep_dir, max_trials=0, verbose=False)
    assert _json(os.path.join(sweep_dir, sw.SWEEP_FILE)) == saved
    with pytest.raises(ValueError, match=r"^sweep: num_trials=1 is invalid; a grid has exactly 2"):
        sp.from_config({"kind": "grid", "num_trials": 1, "parameters": lrs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "accuracy"},
         "sweep: metric='accuracy' is invalid; expected one of ['loss', 'top1', 'top5'] (the "
         "eval metrics of config.task='classification')."),
        ({"metric": "map50"},
         "sweep: metric='map50' is invalid; expected one of ['loss', 'top1', 'top5'] (the "
         "eval metrics of config.task='classification')."),
        ({"mode": "best"}, "sweep: mode='best' is invalid; expected one of ['max', 'min']."),
        # the worst trial would rank first
        ({"metric": "loss", "mode": "max"},
         "sweep: mode='max' is invalid; expected 'min' for metric='loss' (lower is better); "
         "leave mode unset to follow the metric."),
        ({"metric": "top1", "mode": "min"},
         "sweep: mode='min' is invalid; expected 'max' for metric='top1' (higher is better)"),
        ({"trial_index": 2},
         "sweep: trial_index=2 is invalid; expected an integer in [0, 1] (the space has 2 "
         "trials)."),
        ({"max_trials": -1}, "sweep: max_trials=-1 is invalid; expected an integer >= 0 or None."),
        ({"trial_index": 0, "trial_count": 0},
         "sweep: trial_count=0 is invalid; expected an integer >= 1."),
        ({"trial_count": 2},
         "sweep: trial_count=2 is invalid; expected 1 without trial_index (it counts the trials "
         "from trial_index)."),
    ],
)
def test_bad_arguments_fail_before_anything_is_written(tmp_path, kwargs, message):
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.01]})
    with pytest.raises(ValueError, match=re.escape(message)):
        sw.run_sweep(_tiny_base(), space, str(tmp_path / "sweep"), verbose=False, **kwargs)
    assert not os.path.exists(tmp_path / "sweep")


def test_the_metric_is_checked_against_every_trial_not_the_base(tmp_path):
    """A trial that cannot report the ranking metric (ema_top1 without ema.decay) is refused
    by name before anything is written, even when the base reports it; a base without it is
    fine when every trial sets it."""
    base = helpers.tiny_config(**{"ema.decay": 0.5})
    space = sp.grid((sp.choice("ema.decay", (0.9, None)),))
    with pytest.raises(ValueError, match=re.escape(
            f"sweep: trial 1 ({space.trials[1].trial_id}, {{'ema.decay': None}}) would be left "
            "unranked: metric='ema_top1' is invalid; expected one of ['loss', 'top1', 'top5'] "
            "(the eval metrics of config.task='classification' and ema.decay unset")):
        sw.run_sweep(base, space, str(tmp_path / "sweep"), "ema_top1", verbose=False)
    assert not os.path.exists(tmp_path / "sweep")
    every = sp.grid((sp.choice("ema.decay", (0.9, 0.99)),))
    assert sw.check_ranking(helpers.tiny_config(), sp.trial_configs(helpers.tiny_config(), every),
                            "ema_top1", None) == ("ema_top1", "max")
    # the base's best_metric when unset, checked against the trials too
    base.best_metric = "ema_top1"
    with pytest.raises(ValueError, match=r"^sweep: trial 1 .* would be left unranked: "
                                         r"metric='ema_top1' is invalid"):
        sw.check_ranking(base, sp.trial_configs(base, space), None, None)


def test_every_trial_config_is_validated_before_any_trial_runs(tmp_path, monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.0]})
    with pytest.raises(ValueError, match=re.escape(
            f"sweep: trial 1 ({space.trials[1].trial_id}, {{'optimizer.learning_rate': 0.0}}) "
            "has an invalid config: optimizer: learning_rate=0.0 is invalid; expected a positive")):
        sw.run_sweep(_tiny_base(), space, str(tmp_path / "sweep"), verbose=False)
    with pytest.raises(ValueError, match=re.escape(
            "sweep: parameters['optimizer.lr'].field='optimizer.lr' is invalid; the base config "
            "has no such field")):
        sw.run_sweep(_tiny_base(), sp.grid({"optimizer.lr": [0.1]}), str(tmp_path / "sweep"))
    assert not os.path.exists(tmp_path / "sweep")


def test_default_mode_follows_the_metric():
    modes = {m: sw.default_mode(m) for ms in config_lib.TASK_METRICS.values() for m in ms}
    assert modes == {"loss": "min", "top1": "max", "top5": "max", "map50": "max", "map": "max",
                     "coco_map50": "max", "coco_map75": "max", "map50_voc07": "max",
                     "pixel_accuracy": "max",
                     "miou": "max"}


def test_metrics_are_the_tasks():
    detection = config_lib.default_config()
    detection.task = "detection"
    for metric in ("map50", "map", "coco_map50", "coco_map75", "map50_voc07"):
        assert sw.check_metric("sweep", metric, detection) == metric
    with pytest.raises(ValueError, match=re.escape(
            "sweep: metric='top1' is invalid; expected one of ['map50', 'map', 'coco_map50', "
            "'coco_map75', 'map50_voc07'] (the eval metrics of config.task='detection').")):
        sw.check_metric("sweep", "top1", detection)
    detection.best_metric = "coco_map75"
    assert sw.check_metric("sweep", None, detection) == "coco_map75"  # unset: the best_metric
    assert sw.check_metric("sweep", None, config_lib.default_config()) == "top1"
    legacy = ml_collections.ConfigDict({"model": "lenet5"})  # no `task`: classification
    assert sw.task_metrics(legacy) == ("loss", "top1", "top5")
    detection.task = "segmentation"
    assert sw.check_metric("sweep", "miou", detection) == "miou"
    detection.task = "keypoints"
    with pytest.raises(ValueError, match=re.escape(
            "config: task='keypoints' is invalid; expected one of ['classification', "
            "'detection', 'segmentation'].")):
        sw.check_metric("sweep", "map50", detection)


def test_loss_sweep_ranks_lowest_first():
    rows = [
        {"index": 0, "trial_id": "a", "status": "completed", "best": 0.5},
        {"index": 1, "trial_id": "b", "status": "failed", "best": None},
        {"index": 2, "trial_id": "c", "status": "completed", "best": 0.2},
        {"index": 3, "trial_id": "d", "status": "completed", "best": 0.2},
    ]
    ranked = sw.rank_results([dict(r, rank=None) for r in rows], "min")
    assert [(r["trial_id"], r["rank"]) for r in ranked] == [
        ("c", 1), ("d", 2), ("a", 3), ("b", None)]


def test_only_completed_trials_are_ranked_whatever_the_others_logged():
    """A diverged or still-running trial may have logged a better eval than every completed
    one before it stopped: it is listed after the completed ones, by index, without a rank."""
    rows = [
        {"index": 0, "trial_id": "a", "status": "completed", "best": 0.80},
        {"index": 1, "trial_id": "b", "status": "diverged", "best": 0.95},
        {"index": 2, "trial_id": "c", "status": "incomplete", "best": 0.90},
        {"index": 3, "trial_id": "d", "status": "completed", "best": 0.85},
    ]
    ranked = sw.rank_results([dict(r, rank=None) for r in rows], "max")
    assert [(r["trial_id"], r["rank"]) for r in ranked] == [
        ("d", 1), ("a", 2), ("b", None), ("c", None)]


def test_figure_has_a_panel_per_field_log_x_where_values_span_decades():
    space = sp.grid({"optimizer.learning_rate": [0.001, 0.1, 10.0],
                     "model_kwargs.activation": ["tanh", "relu"],
                     "global_batch_size": [32, 64]})
    rows = []
    for i, trial in enumerate(space.trials):
        status = "diverged" if trial.overrides["optimizer.learning_rate"] == 10.0 else "completed"
        rows.append({"index": i, "trial_id": trial.trial_id, "overrides": trial.overrides,
                     "status": status, "best": None if status == "diverged" else 0.1 * i})
    fig = sw.results_figure(rows, space, "top1")
    lr, act, batch = fig.axes
    assert [ax.get_xlabel() for ax in fig.axes] == space.fields
    assert (lr.get_xscale(), act.get_xscale(), batch.get_xscale()) == ("log", "linear", "linear")
    assert [t.get_text() for t in act.get_xticklabels()] == ["tanh", "relu"]
    assert len(lr.collections[0].get_offsets()) == 8  # the 8 completed trials
    assert sorted(line.get_xdata()[0] for line in lr.lines) == [10.0] * 4  # diverged values
    assert lr.get_ylabel() == "best eval top1"
    log_space = sp.random([sp.log_uniform("optimizer.learning_rate", 1e-3, 1e-2)], 2)
    assert sw.results_figure(rows[:0], log_space, "loss").axes[0].get_xscale() == "log"


def test_categories_that_agree_to_4_digits_keep_their_own_labels_and_places():
    """0.99995 and 0.99999 were both labelled "1", and both plotted at the first "1"."""
    space = sp.grid({"ema.decay": [None, 0.99995, 0.99999], "model_kwargs.activation": ["1", 1]})
    rows = [{"rank": i + 1, "index": i, "trial_id": t.trial_id, "overrides": t.overrides,
             "status": "completed", "best": 0.5, "final": 0.5, "steps": 1, "wall_time_s": 1.0}
            for i, t in enumerate(space.trials)]
    decay, activation = sw.results_figure(rows, space, "top1").axes
    assert [t.get_text() for t in decay.get_xticklabels()] == ["None", "0.99995", "0.99999"]
    assert [x for x, _ in decay.collections[0].get_offsets()] == [0, 0, 1, 1, 2, 2]
    assert [t.get_text() for t in activation.get_xticklabels()] == ["'1'", "1"]
    assert [x for x, _ in activation.collections[0].get_offsets()] == [0, 1, 0, 1, 0, 1]
    table = [line.split()[2:4] for line in sw.format_table(rows, space, "top1").splitlines()[2:]]
    assert table == [[d, a] for d in ("None", "0.99995", "0.99999") for a in ("'1'", "1")]
    assert sw._labels([0.1234567, 0.25, 0.1234567]) == ["0.1235", "0.25", "0.1235"]  # 4 suffice


@pytest.mark.parametrize("values", [(0.0186, 0.0343, 0.701), (0.0021, 0.0048)])
def test_log_axis_tick_labels_do_not_overlap(values):
    """A log-uniform lr drawn over less than ~2 decades (0.0186..0.701, a 3-trial random sweep
    of lenet5_digits) got matplotlib's minor-tick labels (2x10^-2, 3x10^-2, ...) in the 4-inch
    panel, printed over each other; within one decade they are the only labels and stay."""
    space = sp.random([sp.log_uniform("optimizer.learning_rate", 1e-3, 1.0)], 3)
    rows = [{"index": i, "trial_id": f"t{i}", "status": "completed", "best": 0.5,
             "overrides": {"optimizer.learning_rate": v}} for i, v in enumerate(values)]
    fig = sw.results_figure(rows, space, "top1")
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    low, high = ax.get_xlim()
    boxes = [label.get_window_extent(renderer)
             for tick in (*ax.xaxis.get_major_ticks(), *ax.xaxis.get_minor_ticks())
             for label in (tick.label1,)
             if label.get_visible() and label.get_text() and low <= tick.get_loc() <= high]
    assert boxes  # the axis is labelled
    overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert not overlaps


def test_trial_recorded_completed_without_a_summary_reads_as_completed(tmp_path):
    # A process killed between trial.json and summary.json (or a stand-in engine) leaves this.
    trial = sp.Trial(0, "t0", {"optimizer.learning_rate": 0.1})
    workdir = sw.trial_workdir(str(tmp_path), trial)
    os.makedirs(workdir)
    files.atomic_write(os.path.join(workdir, sw.TRIAL_FILE),
                       json.dumps({**trial.describe(), "status": "completed", "wall_time_s": 1.0}))
    row = sw.trial_result(str(tmp_path), trial, "top1", "max")
    assert (row["status"], row["final"], row["best"], row["steps"]) == ("completed", None, None, 0)


def _trial_files(tmp_path, started_at, summary, summary_time):
    trial = sp.Trial(0, "t0", {"optimizer.learning_rate": 0.1})
    workdir = sw.trial_workdir(str(tmp_path), trial)
    os.makedirs(workdir, exist_ok=True)
    files.atomic_write(os.path.join(workdir, sw.TRIAL_FILE), json.dumps(
        {**trial.describe(), "status": "incomplete", "wall_time_s": 2.0, "reason": "",
         "started_at": started_at}))
    path = os.path.join(workdir, sw.SUMMARY_FILE)
    files.atomic_write(path, json.dumps(summary))
    os.utime(path, (summary_time, summary_time))
    return trial


def test_a_retried_trial_does_not_read_as_its_previous_attempts_failure(tmp_path):
    """The engine leaves a failed attempt's summary.json; while the retry runs (or after it was
    killed) trial.json's start is newer, so the row is incomplete, not the old failure."""
    now = time.time()
    failed = {"status": "failed", "message": "simulated crash"}
    trial = _trial_files(tmp_path, now, failed, now - 60)
    row = sw.trial_result(str(tmp_path), trial, "top1", "max")
    assert row["status"] == "incomplete"
    trial = _trial_files(tmp_path, now - 60, failed, now)  # this start's own failure
    assert sw.trial_result(str(tmp_path), trial, "top1", "max")["status"] == "failed"


def test_a_trial_killed_after_the_engine_finished_keeps_its_time(tmp_path):
    """Killed between summary.json and trial.json: completed, with the killed start's time."""
    now = time.time()
    trial = _trial_files(tmp_path, now - 30, {"status": "completed", "step": 5}, now - 27)
    row = sw.trial_result(str(tmp_path), trial, "top1", "max")
    assert row["status"] == "completed" and row["wall_time_s"] == pytest.approx(2.0 + 3.0, abs=0.1)


def test_config_changes_names_each_trajectory_field_and_ignores_runtime_ones():
    saved = {"optimizer.learning_rate": 0.1, "seed": 0, "progress_bar": True}
    current = {"optimizer.learning_rate": 0.2, "seed": 0, "progress_bar": False}
    assert sw.config_changes(saved, current) == "optimizer.learning_rate: 0.1 -> 0.2"
    assert sw.config_changes(saved, dict(saved, progress_bar=False)) == ""


def test_two_sweeps_racing_on_a_fresh_sweep_dir_one_wins_the_other_is_refused(tmp_path,
                                                                             monkeypatch):
    """Two drivers of different spaces started together on a new sweep_dir: each checked that
    no sweep.json existed, then each wrote its own, the second overwriting the first's spec while
    the first's trials ran. The check-and-write is atomic now: one writes, the other is refused.
    Driver A is held inside the check (after finding no sweep.json) while B runs its own; the
    outcome is the same whichever reaches the write first."""
    helpers.install_fake_pipeline(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    spaces = {"a": sp.grid({"optimizer.learning_rate": [0.05, 0.01]}),
              "b": sp.grid({"optimizer.learning_rate": [0.05, 0.3]})}
    a_checked, b_checked, release_a = (threading.Event() for _ in range(3))
    check = sw.check_sweep_dir

    def held_check(*args, **kwargs):
        result = check(*args, **kwargs)
        if threading.current_thread().name == "a" and not a_checked.is_set():
            a_checked.set()
            assert release_a.wait(60)
        elif threading.current_thread().name == "b":
            b_checked.set()
        return result

    outcome = {}

    def drive(name):
        try:
            sw.run_sweep(_tiny_base(), spaces[name], sweep_dir, max_trials=0, verbose=False)
            outcome[name] = "ran"
        except Exception as err:  # noqa: BLE001 — asserted below
            outcome[name] = err
        finally:  # an error before the check must not leave the other side waiting
            (a_checked if name == "a" else b_checked).set()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sw, "check_sweep_dir", held_check)
        a = threading.Thread(target=drive, args=("a",), name="a")
        a.start()
        assert a_checked.wait(60)
        b = threading.Thread(target=drive, args=("b",), name="b")
        b.start()
        assert b_checked.wait(60)  # B found no sweep.json either (or waits for A's lock)
        release_a.set()
        a.join(60)
        b.join(60)
    assert sorted(outcome) == ["a", "b"]
    winners = [name for name, result in outcome.items() if result == "ran"]
    assert len(winners) == 1, outcome
    (loser,) = set(outcome) - set(winners)
    assert isinstance(outcome[loser], ValueError), outcome
    message = str(outcome[loser])
    assert message.startswith(f"sweep: sweep_dir={sweep_dir!r} holds a different search space")
    assert "use a new --sweep_dir" in message
    saved = _json(os.path.join(sweep_dir, sw.SWEEP_FILE))
    assert saved["space"] == spaces[winners[0]].describe()


def test_create_new_keeps_a_file_already_there_and_says_so(tmp_path):
    """`_create_new` writes only where no file is: one already there (another driver's
    sweep.json) is kept as it was and reported with False, so the caller checks it."""
    path = str(tmp_path / sw.SWEEP_FILE)
    with open(path, "w") as f:
        f.write('{"theirs": 1}')
    assert sw._create_new(path, '{"ours": 1}') is False
    with open(path) as f:
        assert f.read() == '{"theirs": 1}'
    fresh = str(tmp_path / "new.json")
    assert sw._create_new(fresh, '{"ours": 1}') is True
    with open(fresh) as f:
        assert f.read() == '{"ours": 1}'
    assert sorted(os.listdir(tmp_path)) == sorted([sw.SWEEP_FILE, "new.json"])  # no temporaries


def test_two_sweeps_racing_without_flock_the_second_to_write_is_refused(tmp_path, monkeypatch):
    """On a file system without flock (the locks run unlocked) driver B's sweep.json lands
    between driver A's check that there is none and A's write: the hard link then finds B's
    file, and A checks it (refused: another space) instead of going on with B's sweep.json."""
    helpers.install_fake_pipeline(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    a = sp.grid({"optimizer.learning_rate": [0.05, 0.01]})
    b = sp.grid({"optimizer.learning_rate": [0.05, 0.3]})

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    link = os.link

    def b_writes_first(source, target, *args, **kwargs):
        if os.path.basename(target) == sw.SWEEP_FILE and not os.path.exists(target):
            theirs = sw.check_sweep_dir(sweep_dir, b, _tiny_base(), "top1", "max")
            with open(target, "w") as f:  # B's own, not through this process's temporary (A's)
                json.dump(theirs, f)
        return link(source, target, *args, **kwargs)

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(os, "link", b_writes_first)
    with pytest.raises(ValueError, match=re.escape(
            f"sweep: sweep_dir={sweep_dir!r} holds a different search space (parameters["
            "'optimizer.learning_rate'].values: [0.05, 0.3] -> [0.05, 0.01]); ")):
        sw.run_sweep(_tiny_base(), a, sweep_dir, max_trials=0, verbose=False)
    assert _json(os.path.join(sweep_dir, sw.SWEEP_FILE))["space"] == b.describe()


def test_a_changed_space_is_refused_naming_only_the_fields_that_differ(tmp_path, monkeypatch):
    """The refusal printed both spaces whole as JSON (every parameter, every value) for the user
    to compare by eye; it names each difference, old -> new, and how to go on."""
    helpers.install_fake_pipeline(monkeypatch)
    sweep_dir = str(tmp_path / "sweep")
    params = (sp.choice("optimizer.learning_rate", (0.05, 0.01)),
              sp.choice("optimizer.momentum", (0.0, 0.9)),
              sp.choice("seed", tuple(range(7))))  # more values than a refusal lists whole
    sw.run_sweep(_tiny_base(), sp.grid(params), sweep_dir, max_trials=0, verbose=False)
    fresh = ("; to start fresh use a new --sweep_dir or delete this one; to resume this sweep "
             "run it with its original sweep file and base config (sweep.json in it records "
             "them).")
    head = f"sweep: sweep_dir={sweep_dir!r} holds a different search space ("
    cases = {
        "parameters['optimizer.learning_rate'].values: [0.05, 0.01] -> [0.05, 0.3]":
            sp.grid((sp.choice("optimizer.learning_rate", (0.05, 0.3)), *params[1:])),
        "parameters['optimizer.momentum']: choice [0.0, 0.9] -> <not swept>":
            sp.grid((params[0], params[2])),
        "kind: 'grid' -> 'random'; parameters['optimizer.momentum']: choice [0.0, 0.9] -> "
        "uniform 0.0..0.9; parameters['seed'].values: [0, 1, 2, 3, ..., 6] (7 values) -> "
        "[0, 1, 2, 3, ..., 7] (8 values); parameters['optimizer.nesterov']: <not swept> -> "
        "choice [False, True]":
            sp.random((params[0], sp.uniform("optimizer.momentum", 0.0, 0.9),
                       sp.choice("seed", tuple(range(8))),
                       sp.choice("optimizer.nesterov", (False, True))), 3),
        "parameter order: ['optimizer.learning_rate', 'optimizer.momentum', 'seed'] -> "
        "['optimizer.momentum', 'optimizer.learning_rate', 'seed'] (it orders the trials)":
            sp.grid((params[1], params[0], params[2])),
    }
    for differences, space in cases.items():
        with pytest.raises(ValueError) as err:
            sw.run_sweep(_tiny_base(), space, sweep_dir, max_trials=0, verbose=False)
        assert str(err.value) == head + differences + ")" + fresh
    lrs = (sp.log_uniform("optimizer.learning_rate", 0.005, 0.1),)
    random_dir = str(tmp_path / "random")
    sw.run_sweep(_tiny_base(), sp.random(lrs, 4, seed=3), random_dir, max_trials=0,
                 verbose=False)
    for space, differences in (
            (sp.random(lrs, 3, seed=3), "num_trials: 4 -> 3 (a random sweep may grow, not "
                                        "shrink: run fewer with --max_trials)"),
            (sp.random(lrs, 4, seed=4), "seed: 3 -> 4"),
            (sp.random((sp.log_uniform("optimizer.learning_rate", 0.001, 0.1),), 4, seed=3),
             "parameters['optimizer.learning_rate'].low: 0.005 -> 0.001")):
        with pytest.raises(ValueError) as err:
            sw.run_sweep(_tiny_base(), space, random_dir, max_trials=0, verbose=False)
        assert str(err.value) == (f"sweep: sweep_dir={random_dir!r} holds a different search "
                                  f"space ({differences}){fresh}")



class _StopError(Exception):
    """Ends a command right after it wrote its directory's marker file."""


def _other_commands(monkeypatch, base, directory):
    """`{kind: command}` of a tune and a training run on `directory`, each ending with `_StopError`
    once it has written its marker (tune.json, config.json)."""
    from cnnjax.train import loop
    from cnnjax.tune import recipe as rc
    from cnnjax.utils import lock  # both check their kind in `directory_lock(..., kind=...)`

    def stop(*args, **kwargs):
        raise _StopError

    prepare = loop._Run.prepare_workdir

    def prepare_then_stop(self):
        prepare(self)
        raise _StopError

    monkeypatch.setattr(rc, "run_sweep", stop)  # the tune's first round
    monkeypatch.setattr(loop._Run, "prepare_workdir", prepare_then_stop)
    return {"tune": (lock, lambda: rc.run_tune(base, rc.Recipe(num_lrs=2), directory,
                                               verbose=False)),
            "training run": (lock, lambda: loop.train_and_evaluate(base, directory))}


@pytest.mark.parametrize("other", ["tune", "training run"])
def test_a_sweep_and_another_command_started_together_on_a_new_dir_are_not_both_run(
        tmp_path, monkeypatch, other):
    """Each command checked the directory's kind (`check_directory_kind`) before any lock, so a
    sweep and a tune (or a training run) started together on one new directory both passed the
    check before either wrote its marker, and the directory held sweep.json and tune.json (or
    config.json), their outputs mixed. Each order of events, played out in turn: the command
    that comes second is refused and only the first one's marker is written."""
    helpers.install_fake_pipeline(monkeypatch)
    base = _tiny_base()
    check = files.check_directory_kind
    markers = {"sweep.json", "tune.json", "config.json"}

    def sweep(directory):
        return sw.run_sweep(base, sp.grid({"seed": (0,)}), directory, max_trials=0,
                            verbose=False)

    def then(command, module):
        """`module`'s kind check, with `command` run to its end once the first check passed."""
        ran = []

        def check_then_run(path, kind, flag):
            check(path, kind, flag)
            if not ran:
                ran.append(True)
                with contextlib.suppress(_StopError):
                    command()
        monkeypatch.setattr(module, "check_directory_kind", check_then_run)

    # 1. The other command passed its check, then a whole sweep ran before it went on.
    first = str(tmp_path / "sweep_first")
    module, command = _other_commands(monkeypatch, base, first)[other]
    then(lambda: sweep(first), module)
    with pytest.raises(ValueError, match=rf"it holds a sweep \(sweep.json\), not a {other}"):
        command()
    assert markers & set(os.listdir(first)) == {"sweep.json"}
    monkeypatch.setattr(module, "check_directory_kind", check)

    # 2. The sweep passed its check, then the other command wrote its marker.
    second = str(tmp_path / "other_first")
    module, command = _other_commands(monkeypatch, base, second)[other]
    then(command, sw)
    with pytest.raises(ValueError, match=rf"it holds a {other} \(\w+.json\), not a sweep"):
        sweep(second)
    assert markers & set(os.listdir(second)) == {"tune.json" if other == "tune" else "config.json"}
    monkeypatch.setattr(sw, "check_directory_kind", check)


def test_a_sweep_is_refused_a_dir_another_command_holds_before_its_marker(tmp_path,
                                                                          monkeypatch):
    """A tune, training run, transfer comparison or LR range test holds its directory's
    run.lock from before it writes its marker (tune.json, config.json ...) to its end; the sweep
    checked only the markers, so it took such a directory as new and wrote sweep.json there."""
    helpers.install_fake_pipeline(monkeypatch)
    sweep_dir = str(tmp_path / "shared")
    with (helpers.locked_by_another_process(sweep_dir),
          pytest.raises(ValueError, match=r"sweep_dir: .* is in use by another run")):
        sw.run_sweep(_tiny_base(), sp.grid({"seed": (0,)}), sweep_dir, max_trials=0,
                     verbose=False)
    assert "sweep.json" not in os.listdir(sweep_dir)


def _logged_trial(tmp_path, records, torn="", status="completed"):
    """A trial whose metrics.jsonl holds `records` (then `torn`, a killed write's partial line),
    recorded `status` in trial.json (incomplete: still running since now)."""
    trial = sp.Trial(0, "t0", {"optimizer.learning_rate": 0.1})
    workdir = sw.trial_workdir(str(tmp_path), trial)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + torn)
    files.atomic_write(os.path.join(workdir, sw.TRIAL_FILE), json.dumps(
        {**trial.describe(), "status": status, "wall_time_s": 1.0, "reason": "",
         **({"started_at": time.time()} if status == "incomplete" else {})}))
    return trial, os.path.join(workdir, "metrics.jsonl")


_TRAIN = {"step": 5, "split": "train", "loss": 2.0, "top1": 0.2, "learning_rate": 0.1}


def _eval(step, top1, **fields):
    return {"step": step, "split": "eval", "loss": 1.0, "top1": top1, "num_examples": 100,
            **fields}


@pytest.mark.parametrize("records, message", [
    # One eval logged twice (a concatenated file): it was counted as two evals.
    ([_TRAIN, _eval(5, 0.5), _eval(10, 0.9), _eval(10, 0.6)],
     r"sweep: step=10 is invalid; {path} line 4 \(eval record\) repeats the eval record of "
     r"step 10 at {path} line 3; expected one eval record per step"),
    # A percent: 97.0 ranked this trial above every trial at 0.97.
    ([_TRAIN, _eval(5, 0.5), _eval(10, 97.0)],
     r"sweep: top1=97\.0 is invalid; {path} line 3 \(eval record of step 10\) holds it, "
     r"expected a fraction in \[0, 1\]"),
    # An eval without the loss the others hold.
    ([_TRAIN, _eval(5, 0.5), {"step": 10, "split": "eval", "top1": 0.6, "num_examples": 100}],
     r"sweep: loss='missing' is invalid; {path} line 3 \(eval record of step 10\) lacks it"),
])
def test_a_trials_metrics_the_engine_never_writes_are_refused_not_ranked(tmp_path, records,
                                                                          message):
    trial, path = _logged_trial(tmp_path, records)
    with pytest.raises(ValueError, match="^" + message.format(path=re.escape(path))):
        sw.trial_result(str(tmp_path), trial, "top1", "max")


def test_a_running_trials_torn_last_line_is_skipped_as_before(tmp_path):
    """A trial being written (or killed mid-write) ends in a partial line: its complete records
    are ranked and counted, as the engine's resume keeps them."""
    trial, _ = _logged_trial(tmp_path, [_TRAIN, _eval(5, 0.5), _eval(10, 0.7)],
                             torn='{"step": 15, "split": "eval", "loss": 0.9, "to',
                             status="incomplete")
    row = sw.trial_result(str(tmp_path), trial, "top1", "max")
    assert (row["status"], row["best"], row["best_step"], row["steps"]) == (
        "incomplete", 0.7, 10, 10)


@pytest.mark.parametrize("mode, metric, values", [("max", "top1", (0.9, 0.9, 0.5)),
                                                  ("min", "loss", (0.2, 0.2, 0.5))])
def test_a_trials_best_step_on_tied_evals_is_the_checkpoint_the_engine_keeps(tmp_path, mode,
                                                                            metric, values):
    """Two evals tie for best: the sweep's best_step must name the checkpoint the engine keeps
    as best (orbax's policy in `Checkpointer`), so that loading the trial's best finds it."""
    steps = (10, 20, 30)
    evals = [{**_eval(s, 0.5), metric: v} for s, v in zip(steps, values, strict=True)]
    trial, _ = _logged_trial(tmp_path / "sweep", [_TRAIN, *evals])
    row = sw.trial_result(str(tmp_path / "sweep"), trial, metric, mode)
    # The engine's choice: save a checkpoint per eval, keeping the latest one plus the best.
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), keep=1, best_metric=metric,
                                best_mode=mode, use_async=False)
    for step, value in zip(steps, values, strict=True):
        checkpointer.save(step, {"w": np.full((2,), step, np.float32)}, {metric: value})
    checkpointer.wait()
    kept = checkpointer.all_steps()
    checkpointer.close()
    assert len(kept) == 2 and kept[-1] == 30  # the best (one of the tied two) and the latest
    assert (row["best"], row["best_step"]) == (values[0], kept[0])


def test_detection_and_segmentation_records_rank_on_their_metrics(tmp_path):
    """No top-1 and per-class scores only some evals hold: accepted, ranked by map50."""
    train = {"step": 5, "split": "train", "loss": 3.0, "learning_rate": 0.01}
    evals = [{"step": 5, "split": "eval", "map50": 0.2, "map": 0.1, "num_examples": 50},
             {"step": 10, "split": "eval", "map50": 0.4, "map": 0.2, "num_examples": 50,
              "ap50/square": 0.4}]
    trial, path = _logged_trial(tmp_path / "det", [train, *evals])
    row = sw.trial_result(str(tmp_path / "det"), trial, "map50", "max")
    assert (row["best"], row["best_step"], row["steps"]) == (0.4, 10, 10)
    segment = [{"step": 5, "split": "eval", "loss": 0.8, "miou": 0.3, "pixel_accuracy": 0.7,
                "num_examples": 50, "iou/road": 40.0}]
    trial, path = _logged_trial(tmp_path / "seg", [train, *segment])
    with pytest.raises(ValueError, match=r"^sweep: iou/road=40\.0 is invalid; "
                                         + re.escape(path) + r" line 2 \(eval record of step "
                                         r"5\) holds it, expected a fraction in \[0, 1\]"):
        sw.trial_result(str(tmp_path / "seg"), trial, "miou", "max")


def test_a_swept_field_no_trial_reads_is_refused_before_anything_trains(tmp_path, monkeypatch):
    """A sweep over adam's momentum trained the same network once per value."""
    helpers.install_fake_pipeline(monkeypatch)
    base = helpers.tiny_config()
    base.optimizer.name = "adam"
    space = sp.grid({"optimizer.momentum": [0.5, 0.9]})
    with pytest.raises(ValueError, match=re.escape(
            "sweep: parameters='optimizer.momentum' is invalid; expected a field some trial "
            "reads: optimizer 'adam' does not read it (only 'sgd' and 'rmsprop' do), so every "
            "trial would train alike")):
        sw.run_sweep(base, space, str(tmp_path / "sweep"), verbose=False)
    assert not (tmp_path / "sweep").exists()
    base.schedule.name = "cosine"
    with pytest.raises(ValueError, match=re.escape(
            "schedule.decay_rate' is invalid; expected a field some trial reads: schedule "
            "'cosine' does not read it (only 'exponential' does), so")):
        sw.trial_configs(base, sp.grid({"schedule.decay_rate": [0.5, 0.1]}))
    # read by some trials: allowed (the others repeat a training, which is logged)
    sw.trial_configs(base, sp.grid({"schedule.name": ["cosine", "exponential"],
                                    "schedule.decay_rate": [0.5, 0.1]}))


def test_trials_that_repeat_another_training_are_named_in_a_warning(monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)
    base = helpers.tiny_config()
    space = sp.grid({"optimizer.name": ["sgd", "adam"], "optimizer.b1": [0.8, 0.9],
                     "optimizer.momentum": [0.5, 0.9]})
    warnings = []
    monkeypatch.setattr(sw.logging, "warning", lambda msg, *args: warnings.append(msg % args))
    configs = sw.trial_configs(base, space)
    assert len(configs) == 8
    # sgd ignores b1 (trials 0-3: two trainings), adam ignores momentum (4-7: two)
    assert warnings == [
        "sweep: 4 of 8 trials train the same network as another trial: they differ only in "
        "fields their optimizer/schedule does not read, e.g. trials [0, 2] differ only in "
        "['optimizer.b1'] (optimizer 'sgd' does not read it (only 'adam' and 'adamw' do))."]
    warnings.clear()
    sw.trial_configs(base, sp.grid({"optimizer.name": ["sgd", "adam"]}))
    assert warnings == []


def test_a_sweep_where_no_trial_completed_says_so_and_why_there_is_no_plot(tmp_path,
                                                                           monkeypatch, capsys):
    """Every trial diverged: the sweep printed its table and no "Plot:" line, and said nothing
    about the missing sweep.png or that nothing was ranked (tune stops, saying so)."""
    helpers.install_fake_pipeline(monkeypatch)
    base = helpers.tiny_config(max_loss=1e-6)  # any first loss is "diverged"
    base.lock()
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.05, 0.01]})
    rows = sw.run_sweep(base, space, sweep_dir)
    assert [r["status"] for r in rows] == ["diverged", "diverged"]
    assert not os.path.exists(os.path.join(sweep_dir, sw.PLOT_FILE))
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == ("No trial has completed (2 diverged): nothing is ranked and sweep.png is "
                       "not drawn (it plots the completed trials).")
    assert sw.no_result_error(rows) == (
        "the sweep has no result: none of its 2 trials completed (2 diverged; each one's "
        "reason is in results.csv)")


@pytest.mark.parametrize("statuses,error", [
    (["diverged", "failed"], "none of its 2 trials completed (1 diverged, 1 failed; "),
    (["diverged", "pending"], None),  # the pending one may still complete
    (["diverged", "interrupted"], None),
    (["diverged", "completed"], None),
    ([], None),
])
def test_a_sweep_is_an_error_only_once_every_trial_finished_without_completing(statuses, error):
    rows = [{"status": status} for status in statuses]
    message = sw.no_result_error(rows)
    assert (message is None) if error is None else (error in message)
    assert (sw.no_result_message(rows) is None) == ("completed" in statuses or not statuses)


@pytest.mark.slow
def test_the_sweep_command_exits_1_when_no_trial_completed_but_an_array_task_does_not(tmp_path):
    """Every trial diverged: `experiments.sweep` exited 0, so a script chaining sweeps could not
    tell it had no result. An array task answers for its own trials only: its diverged trial
    is a result, as before."""
    import subprocess
    import sys

    from tests.experiments.test_train import _env

    sweep = tmp_path / "all_diverge.py"
    sweep.write_text(
        "import ml_collections\nfrom cnnjax.tune.space import choice\n\n\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.kind, c.seed, c.metric, c.mode = 'grid', 0, 'top1', 'max'\n"
        "    c.parameters = (choice('optimizer.learning_rate', (0.1, 0.2)),)\n"
        "    return c\n")
    command = [sys.executable, "-m", "experiments.sweep",
               f"--config={os.path.join(ROOT, 'experiments', 'configs', 'lenet5_digits.py')}",
               f"--sweep={sweep}", f"--sweep_dir={tmp_path / 'sweep'}",
               "--config.progress_bar=False", "--config.max_loss=1e-6",
               "--config.num_train_steps=4", "--config.eval_every_steps=4",
               "--config.checkpoint_every_steps=4", "--config.schedule.warmup_steps=0"]
    whole = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert whole.returncode == 1, whole.stderr[-2000:]
    assert "No trial has completed (2 diverged): nothing is ranked" in whole.stdout
    assert whole.stderr.strip().splitlines()[-1] == (
        "error: the sweep has no result: none of its 2 trials completed (2 diverged; each "
        "one's reason is in results.csv)")
    task = subprocess.run(command + ["--trial_index=0"], capture_output=True, text=True,
                          env=_env(), cwd=ROOT)
    assert task.returncode == 0, task.stderr[-2000:]


def _finished_trial(sweep_dir, trial, top1, status):
    """`trial`'s folder as the engine and `start_trial` leave it: one eval, trial.json `status`
    (incomplete: running since now), and a completed summary.json once completed."""
    workdir = sw.trial_workdir(sweep_dir, trial)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(_eval(6, top1)) + "\n")
    files.atomic_write(os.path.join(workdir, sw.TRIAL_FILE), json.dumps(
        {**trial.describe(), "status": status, "wall_time_s": 1.0, "reason": "",
         "started_at": time.time()}))
    if status == "completed":
        files.atomic_write(os.path.join(workdir, sw.SUMMARY_FILE),
                           json.dumps({"status": "completed", "step": 6}))


def test_concurrent_tasks_leave_the_table_of_every_finished_trial(tmp_path, monkeypatch):
    """Array task A reads the trial folders while task B's trial runs; B's trial finishes and B
    writes the full table; A's write came last, so results.json showed B's trial incomplete
    until a manual rebuild. Now the table is read and written under sweep.lock: B waits for A
    and writes last. A is held after its read until B has written (old) or waits for the
    lock (new)."""
    sweep_dir = str(tmp_path / "sweep")
    space = sp.grid({"optimizer.learning_rate": [0.1, 0.2]})
    a_trial, b_trial = space.trials
    _finished_trial(sweep_dir, a_trial, 0.5, "completed")
    _finished_trial(sweep_dir, b_trial, 0.6, "incomplete")
    a_read, b_progressed = threading.Event(), threading.Event()
    trial_result, waiting_lock = sw.trial_result, sw.waiting_lock

    def held_trial_result(directory, trial, *args):
        row = trial_result(directory, trial, *args)
        if threading.current_thread().name == "a" and trial == b_trial:
            a_read.set()
            assert b_progressed.wait(60)
        return row

    def noted_waiting_lock(path):
        if threading.current_thread().name == "b":
            b_progressed.set()  # B is about to wait for the lock A holds
        return waiting_lock(path)

    def task(name):
        try:
            sw.write_results(sweep_dir, space, "top1", "max")
        finally:
            if name == "b":
                b_progressed.set()
            a_read.set()

    monkeypatch.setattr(sw, "trial_result", held_trial_result)
    monkeypatch.setattr(sw, "waiting_lock", noted_waiting_lock)
    a = threading.Thread(target=task, args=("a",), name="a")
    a.start()
    assert a_read.wait(60)
    _finished_trial(sweep_dir, b_trial, 0.6, "completed")  # B's trial ends; B tabulates it
    b = threading.Thread(target=task, args=("b",), name="b")
    b.start()
    a.join(60)
    b.join(60)
    assert not a.is_alive() and not b.is_alive()
    results = _json(os.path.join(sweep_dir, sw.RESULTS_JSON))["trials"]
    assert {r["trial_id"]: r["status"] for r in results} == {
        a_trial.trial_id: "completed", b_trial.trial_id: "completed"}
    assert [r["best"] for r in results] == [0.6, 0.5]
    assert [r["status"] for r in _csv_rows(sweep_dir)] == ["completed", "completed"]


@pytest.mark.parametrize(("override", "sets"), [
    ("optimizer.learning_rate", "that field"),
    ("optimizer", "optimizer.learning_rate"),  # a group holding the swept field
])
def test_an_override_of_a_swept_field_is_refused(override, sets):
    """The trials' values replaced a command line's `--config.<field>` without a word."""
    space = sp.grid((sp.choice("optimizer.learning_rate", (0.05, 0.01)),))
    with pytest.raises(ValueError, match=(
            rf"^--config\.{override} is invalid; the sweep \(--sweep=s\.py\) sets {sets} in "
            r"every trial; drop it \(or remove it from the sweep\)$")):
        sw.check_overrides_not_swept({"seed": 1, override: -1}, space, "--sweep=s.py")
    sw.check_overrides_not_swept({"seed": 1, "optimizer.name": "adam",
                                  "optimizer.learning_rate_x": 1}, space, "--sweep=s.py")

"""`train_and_evaluate` end to end on synthetic data: outputs, exact resume, divergence, workdir."""

import collections
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.train import config as config_lib
from cnnjax.train import loop
from cnnjax.train.checkpoint import Checkpointer
from cnnjax.utils.lock import DirectoryInUseError
from tests.train import helpers


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)


@pytest.fixture(autouse=True)
def no_checkpoint_retry_waits(monkeypatch):
    """Unreadable checkpoints are retried before they are set aside; skip the waits here
    (tests/train/test_checkpoint.py checks them)."""
    from cnnjax.train import checkpoint as checkpoint_lib

    monkeypatch.setattr(checkpoint_lib, "_sleep", lambda seconds: None)


def _final_params(workdir, config):
    """Host params of the newest checkpoint (the final state of a completed run)."""
    from cnnjax.models import create_model
    from cnnjax.train.optim import build_optimizer
    from cnnjax.train.state import create_train_state

    model = create_model(config.model, num_classes=helpers.NUM_CLASSES, axis_name="data")
    template = jax.device_get(
        create_train_state(
            model, build_optimizer(config), jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE)
        )
    )
    checkpointer = Checkpointer(workdir, use_async=False)
    state, step = checkpointer.restore_latest(jax.tree.map(np.asarray, template))
    checkpointer.close()
    return state, step


def _tensorboard_events(logdir):
    """`[(tag, step, value)]` of every scalar event in the run's one event file, in order (a
    record still cut off at the end of the file, as a running writer leaves it, ends the list)."""
    import tensorflow as tf

    (event_file,) = Path(logdir).iterdir()
    events = []
    try:
        for e in tf.compat.v1.train.summary_iterator(str(event_file)):
            events.extend((v.tag, e.step, v.simple_value) for v in e.summary.value)
    except tf.errors.DataLossError:
        pass
    return events


def _tensorboard_scalars(logdir):
    """`{(tag, step): value}` of the event file; raises if a (tag, step) was written twice."""
    events = _tensorboard_events(logdir)
    scalars = {(tag, step): value for tag, step, value in events}
    counts = collections.Counter((tag, step) for tag, step, _ in events)
    twice = sorted(key for key, n in counts.items() if n > 1)
    assert not twice, f"TensorBoard holds these (tag, step) more than once: {twice}"
    return scalars


def test_run_writes_every_output(tmp_path, monkeypatch):
    import threading

    # The newest eval step each time the PNG is redrawn, whether it is a real image then, and
    # whether it was drawn off the training thread (the loop's plot(background=True)).
    plotted_after_eval = []
    original_draw = loop.MetricLogger._draw

    def spy_draw(self, records):
        path = original_draw(self, records)
        evals = [r["step"] for r in records if r["split"] == "eval"]
        plotted_after_eval.append((evals[-1], Path(path).stat().st_size > 1000,
                                   threading.current_thread() is not threading.main_thread()))
        return path

    monkeypatch.setattr(loop.MetricLogger, "_draw", spy_draw)
    config = helpers.tiny_config(tensorboard=True)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["status"] == "completed" and summary["step"] == 12
    assert summary["final_eval"]["num_examples"] == helpers.NUM_EVAL
    assert summary["images_per_sec"] > 0 and summary["wall_time_s"] > 0
    assert json.loads(Path(tmp_path / "summary.json").read_text()) == json.loads(
        json.dumps(summary)
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
    for r in records:
        assert {"loss", "top1", "top5"} <= set(r)
        assert r["top1"] <= r["top5"] <= 1.0
    assert all("learning_rate" in r for r in records if r["split"] == "train")
    # The PNG is redrawn after every eval (not only at the end), each time a real image, in a
    # thread while training goes on; the run returns once the last one is written.
    assert plotted_after_eval == [(6, True, True), (12, True, True)]
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    # summary.json: best by top1 over the evals, final eval = the last one, final train metrics.
    best = max(evals, key=lambda r: (r["top1"], r["step"]))  # ties: the later eval
    assert summary["best"] == {"metric": "top1", "value": best["top1"], "step": best["step"]}
    assert str(best["step"]) in os.listdir(tmp_path / "checkpoints")  # the best is kept on disk
    assert summary["final_eval"] == {k: v for k, v in evals[-1].items() if k not in ("step",
                                                                                  "split")}
    assert set(summary["final_train"]) == {"loss", "top1", "top5", "learning_rate",
                                           "images_per_sec"}
    assert summary["outputs"]["plot"] == str(tmp_path / "learning_curves.png")
    # The learning rate of every step (1..12) reaches TensorBoard, once (at train-log steps too,
    # whose train record also holds it): step s used schedule(s - 1),
    # here cosine decay from 0.05 over 12 steps (float64 reference). optax computes it in float32,
    # so the error is a few ulps of the peak (0.05 * 1.2e-7 = 6e-9), not of each small value.
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    lr = {step: v for (tag, step), v in scalars.items() if tag == "train/learning_rate"}
    assert sorted(lr) == list(range(1, 13))
    for step, value in lr.items():
        expected = 0.05 * 0.5 * (1 + np.cos(np.pi * (step - 1) / 12))
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=2e-8)
    assert scalars[("eval/top1", 12)] == pytest.approx(evals[-1]["top1"])
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tensorboard"))
    assert json.loads(Path(tmp_path / "config.json").read_text())["model"] == helpers.TINY_MODEL
    # keep_checkpoints=3 of the saves at 4, 6 (eval), 8, 12 (eval+final); best top1 kept too.
    assert 12 in Checkpointer(str(tmp_path), use_async=False).all_steps()


def test_tensorboard_holds_every_logged_step_up_to_a_checkpoint_when_it_is_saved(
        tmp_path, monkeypatch):
    """A resume restarts TensorBoard after its checkpoint's step, so the events up to it must be
    on disk when the checkpoint is saved: flushed only at evals, a process killed between a
    periodic save and the next eval lost them for good (metrics.jsonl kept them)."""
    on_disk = {}
    original_save = Checkpointer.save

    def spy_save(self, step, *args, **kwargs):
        on_disk[step] = sorted(s for tag, s, _ in _tensorboard_events(tmp_path / "tensorboard")
                               if tag == "train/loss")
        return original_save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", spy_save)
    loop.train_and_evaluate(helpers.tiny_config(tensorboard=True, eval_every_steps=12),
                            str(tmp_path))
    assert on_disk == {4: [2, 4], 8: [2, 4, 6, 8], 12: [2, 4, 6, 8, 10, 12]}


def test_the_log_line_off_a_terminal_shows_the_loss_metrics_jsonl_records(tmp_path, caplog):
    """Off a terminal the progress line is logged at each train-log step. It gave the last
    step's loss while metrics.jsonl (and TensorBoard) recorded the mean over the steps since the
    previous log, so the two disagreed at the same step (17.67 against 35.79 in a YOLO run)."""
    config = helpers.tiny_config(eval_every_steps=12)
    config.progress_bar = True  # a pytest run is not a terminal: the bar logs through absl
    with caplog.at_level("INFO", logger="absl"):
        loop.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    recorded = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    logged = {}
    for record in caplog.records:
        text = record.getMessage()
        if text.startswith("step ") and "| mean loss " in text:
            step = int(text.split()[1].split("/")[0])
            logged[step] = float(text.split("| mean loss ")[1].split()[0])
    assert sorted(logged) == sorted(recorded) == [2, 4, 6, 8, 10, 12]
    for step, loss in recorded.items():
        assert logged[step] == pytest.approx(loss, abs=1e-4)  # printed with 4 decimals


def test_learns_the_synthetic_task(tmp_path):
    config = helpers.tiny_config(num_train_steps=40, eval_every_steps=40)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["final_eval"]["top1"] > 0.9
    assert summary["num_classes"] == 4  # synthetic: diagnose reads ln(4) as the initial loss


def _records(workdir, split):
    """metrics.jsonl's records of `split` ("train" or "eval"), in order."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def nine_step_run(tmp_path_factory):
    """A 9-step run evaluated every 6 steps and train-logged every 2, so its last step is on
    neither period (`summary`, `workdir`), and the same run logged at every step (`every_step`:
    log_every_steps changes no step, so its per-step records are the first run's steps)."""
    import types

    root = tmp_path_factory.mktemp("nine_step_run")
    config = helpers.tiny_config(num_train_steps=9, eval_every_steps=6, log_every_steps=2)
    with pytest.MonkeyPatch.context() as monkeypatch:
        helpers.install_fake_pipeline(monkeypatch)
        summary = loop.train_and_evaluate(config, str(root / "every_2"))
        config.log_every_steps = 1
        loop.train_and_evaluate(config, str(root / "every_step"))
    return types.SimpleNamespace(summary=summary, workdir=root / "every_2",
                                 every_step=root / "every_step")


def test_the_last_step_is_evaluated_and_train_logged_off_their_periods(nine_step_run):
    """Evals every 6 and train logs every 2 of 9 steps: step 9 is evaluated and logged too, and
    summary.json's final_eval, final_train and best come from those records (not from step 6's
    eval and step 8's train log), with step 9 checkpointed."""
    run = nine_step_run
    evals, train = _records(run.workdir, "eval"), _records(run.workdir, "train")
    assert [r["step"] for r in evals] == [6, 9]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 9]
    summary = run.summary
    assert summary["status"] == "completed" and summary["step"] == 9
    assert summary["final_eval"] == {k: v for k, v in evals[-1].items()
                                     if k not in ("step", "split")}
    assert summary["final_train"] == {k: v for k, v in train[-1].items()
                                      if k not in ("step", "split")}
    best = max(evals, key=lambda r: (r["top1"], r["step"]))  # ties: the later eval
    assert summary["best"] == {"metric": "top1", "value": best["top1"], "step": best["step"]}
    assert "9" in os.listdir(run.workdir / "checkpoints")


def test_a_train_record_averages_the_steps_since_the_previous_one(nine_step_run):
    """Each train record (every 2 steps, and the last step) is the mean of the per-step metrics
    since the previous record: steps 1-2, 3-4, 5-6, 7-8, then 9 alone; never the steps before
    it. Reference: the same run's per-step records, averaged in float64; the loop averages in
    float32, so rtol=1e-6 (a few float32 ulps)."""
    per_step = {r["step"]: r for r in _records(nine_step_run.every_step, "train")}
    assert sorted(per_step) == list(range(1, 10))
    logged = _records(nine_step_run.workdir, "train")
    previous = 0
    for record in logged:
        steps = range(previous + 1, record["step"] + 1)
        for key in ("loss", "top1", "top5"):
            expected = np.mean([per_step[s][key] for s in steps], dtype=np.float64)
            np.testing.assert_allclose(record[key], expected, rtol=1e-6,
                                       err_msg=f"{key} at step {record['step']}")
        previous = record["step"]
    assert previous == 9


@pytest.fixture(scope="module")
def crash_and_resume(tmp_path_factory):
    """One config trained uninterrupted (`reference`) and killed at step 9, after its step-8
    checkpoint, then rerun (`resumed`), shared by the resume tests below: with dropout (its
    per-step keys must continue) and train logs every 3 steps (the crash falls between two).
    `crashed` is the killed run's summary.json, `earlier` the wall time its step-8 checkpoint
    recorded, both read before the rerun."""
    import types

    config = helpers.tiny_config(log_every_steps=3, **{"model_kwargs.dropout_rate": 0.3})
    root = tmp_path_factory.mktemp("crash_and_resume")
    reference, resumed = root / "reference", root / "resumed"
    with pytest.MonkeyPatch.context() as monkeypatch:
        helpers.install_fake_pipeline(monkeypatch)
        reference_summary = loop.train_and_evaluate(config, str(reference))
        helpers.run_until_crash(config, resumed, monkeypatch)
        crashed = json.loads((resumed / "summary.json").read_text())
        checkpoints = Checkpointer(str(resumed))
        try:
            earlier = checkpoints.run_info(8)[loop.TOTAL_WALL_TIME]
        finally:
            checkpoints.close()
        resumed_summary = loop.train_and_evaluate(config, str(resumed))
    return types.SimpleNamespace(config=config, reference=reference, resumed=resumed,
                                 reference_summary=reference_summary, crashed=crashed,
                                 earlier=earlier, resumed_summary=resumed_summary)


def test_exact_resume_after_crash_in_process(crash_and_resume):
    """A run that dies at step 9 (after the step-8 checkpoint) and is rerun ends bitwise equal."""
    run = crash_and_resume
    assert run.crashed["status"] == "failed"
    summary = run.resumed_summary
    assert summary["resumed_from_step"] == 8 and "device_counts" not in summary
    assert loop.SOFTWARE not in summary  # one software stack throughout
    a, _ = _final_params(str(run.reference), run.config)
    b, _ = _final_params(str(run.resumed), run.config)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # metrics.jsonl describes one trajectory: no duplicated steps after the resume.
    lines = (run.resumed / "metrics.jsonl").read_text().splitlines()
    steps = [(r["split"], r["step"]) for r in map(json.loads, lines)]
    assert len(steps) == len(set(steps))


def test_a_resume_between_log_steps_logs_what_an_uninterrupted_run_logs(crash_and_resume):
    """Train logs every 3 steps, checkpoints every 4: a run dying after the step-8 checkpoint
    resumes with steps 7-8 still in its train-log window, so the step-9 record averages steps
    7-9 as the uninterrupted run's does (every train record equal but for images/s)."""
    run = crash_and_resume
    assert run.config.log_every_steps == 3 and run.config.checkpoint_every_steps == 4
    assert run.resumed_summary["resumed_from_step"] == 8

    def train_records(workdir):
        return [{k: v for k, v in r.items() if k != "images_per_sec"}
                for r in _records(workdir, "train")]

    expected = train_records(run.reference)
    assert [r["step"] for r in expected] == [3, 6, 9, 12]
    assert train_records(run.resumed) == expected


def test_the_train_log_window_resumes_in_its_saved_dtypes():
    """A checkpoint's train-log window (run_info JSON: floats) comes back in each metric's
    saved dtype, so a resumed run averages the arrays an uninterrupted one would (float32
    metrics came back float64)."""
    window = [{"loss": np.float32(0.1), "top1": np.float32(0.5), "count": np.float64(1 / 3)},
              {"loss": np.float32(0.2), "top1": np.float32(0.25), "count": np.float64(2 / 3)}]
    saved = json.loads(json.dumps(loop._window_to_json(window)))  # as run_info stores it
    restored = loop._window_from_json(saved)
    assert len(restored) == len(window)
    for got, expected in zip(restored, window, strict=True):
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and got[key] == value, key
    assert loop._window_from_json(None) == [] == loop._window_from_json({})


def test_a_resume_on_another_device_count_is_recorded_and_warned(tmp_path, monkeypatch,
                                                                  caplog):
    """Checkpoints keep the device counts their run trained on; resuming on another one (a
    requeued job on another machine) is allowed, logged as a warning and recorded in
    summary.json, because per-device dropout keys and the like then differ. The record
    survives a second resume on the new count."""
    from cnnjax.train.checkpoint import Checkpointer

    def run_info(step):
        """The device fields of `step`'s run_info (the train-log window has its own test)."""
        checkpoints = Checkpointer(str(tmp_path))
        try:
            info = checkpoints.run_info(step)
        finally:
            checkpoints.close()
        assert loop.TRAIN_WINDOW in info and info["process_count"] == 1
        assert info[loop.CONFIG_RECORD]["model"] == config.model
        assert len(info[loop.SOFTWARE]) == 1  # tests/train/test_software_record.py has its own
        return {k: v for k, v in info.items()
                if k not in (loop.TRAIN_WINDOW, "process_count", loop.TOTAL_WALL_TIME,
                             loop.CONFIG_RECORD, loop.SOFTWARE)}

    config = helpers.tiny_config()
    pipeline = sys.modules["cnnjax.data.pipeline"]
    original, devices = helpers.train_batches, vars(loop._Run)["total_devices"]
    monkeypatch.setattr(loop._Run, "total_devices", property(lambda self: 2))  # "2 devices"
    monkeypatch.setattr(pipeline, "train_batches", helpers.crashing_batches(original, 5))
    with pytest.raises(helpers.SimulatedCrashError):
        loop.train_and_evaluate(config, str(tmp_path))
    assert run_info(4) == {"num_devices": 2, "device_counts": [2]}
    monkeypatch.setattr(loop._Run, "total_devices", devices)
    monkeypatch.setattr(pipeline, "train_batches", helpers.crashing_batches(original, 9))
    with caplog.at_level("WARNING"), pytest.raises(helpers.SimulatedCrashError):
        loop.train_and_evaluate(config, str(tmp_path))
    assert "written on 2 devices on 1" in caplog.text
    assert run_info(8) == {"num_devices": 1, "device_counts": [2, 1]}
    monkeypatch.setattr(pipeline, "train_batches", original)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["resumed_from_step"] == 8
    assert summary["num_devices"] == 1 and summary["device_counts"] == [2, 1]
    assert run_info(12) == {"num_devices": 1, "device_counts": [2, 1]}


@pytest.mark.parametrize("info, warned", [
    ({"process_count": 2, "device_counts": [2]}, ["written by 2 processes with 1",
                                                  "written on 2 devices on 1: per-device"]),
    ({"process_count": 1, "device_counts": [2]}, ["written on 2 devices on 1: the data order "
                                                  "continues, but per-device"]),
    ({"device_counts": [2]}, ["the data order continues"]),  # before process_count was saved
    ({"process_count": 1, "device_counts": [1]}, []),
])
def test_a_resume_on_another_process_count_warns_that_the_data_order_changes(info, warned,
                                                                             caplog):
    """Each process shuffles its own shard of the split, so the data order continues across a
    resume only on the same process count; the device-count warning must not claim otherwise."""
    import types

    run = types.SimpleNamespace(total_devices=1)
    with caplog.at_level("WARNING"):
        loop._Run.warn_if_devices_changed(run, info)
    assert len(caplog.records) == len(warned)
    for record, text in zip(caplog.records, warned, strict=True):
        assert text in record.getMessage()
    assert run.device_counts == ([2, 1] if info["device_counts"] == [2] else [1])


def test_a_run_dying_before_its_summary_is_summarized_fully_by_the_rerun(tmp_path):
    """Killed after the final checkpoint but before summary.json: the rerun trains no step, and
    its summary still holds the run's last train record, not an empty `final_train`."""
    config = helpers.tiny_config()
    first = loop.train_and_evaluate(config, str(tmp_path))
    (tmp_path / "summary.json").unlink()
    again = loop.train_and_evaluate(config, str(tmp_path))
    assert again["resumed_from_step"] == 12 and again["final_train"] == first["final_train"]
    assert again["final_eval"] == first["final_eval"] and again["best"] == first["best"]


def test_divergence_is_reported(tmp_path):
    config = helpers.tiny_config(**{"optimizer.learning_rate": 1e3, "optimizer.momentum": 0.9})
    config.num_train_steps = 30
    with pytest.raises(
        loop.TrainingDivergedError, match="learning rate too high or bad initialization"
    ):
        loop.train_and_evaluate(config, str(tmp_path))
    summary = json.loads(Path(tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["hint"] == "learning rate too high or bad initialization"
    assert 1 <= summary["step"] <= 30
    assert summary["resumes_from_step"] in (None, 4, 8, 12, 16, 20, 24, 28)
    assert f"Training diverged at step {summary['step']}" in summary["message"]


def test_a_loss_equal_to_max_loss_is_not_divergence(tmp_path, nine_step_run):
    """Divergence is a loss above max_loss (config.py, the error's "above max_loss"): a run
    whose highest step loss is exactly max_loss completes. max_loss is the highest of the
    per-step losses the same run recorded before (float32 values, exact in JSON)."""
    losses = [r["loss"] for r in _records(nine_step_run.every_step, "train")]
    config = helpers.tiny_config(num_train_steps=9, eval_every_steps=6, log_every_steps=1,
                                 max_loss=max(losses))
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["status"] == "completed"
    assert [r["loss"] for r in _records(tmp_path, "train")] == losses  # the same steps, bitwise


def test_nan_loss_is_divergence(tmp_path, monkeypatch):
    """A NaN input at step 3 makes the loss NaN: the run stops there, nothing NaN is saved."""
    original = helpers.train_batches

    def poisoned(*args, start_step=0, **kwargs):
        for i, batch in enumerate(original(*args, start_step=start_step, **kwargs)):
            if start_step + i == 2:
                batch = dict(batch, image=batch["image"] * np.nan)
            yield batch

    monkeypatch.setattr(sys.modules["cnnjax.data.pipeline"], "train_batches", poisoned)
    config = helpers.tiny_config(checkpoint_every_steps=2)
    with pytest.raises(loop.TrainingDivergedError, match="diverged at step 3: loss is nan"):
        loop.train_and_evaluate(config, str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the checkpoint before the NaN is the one a rerun continues from (docs/training.md)
    assert (summary["status"], summary["step"], summary["resumes_from_step"]) == ("diverged", 3, 2)
    assert not (tmp_path / "checkpoints" / "4").exists()


@pytest.mark.parametrize("eval_every", [3, 6], ids=["eval_step", "checkpoint_only_step"])
def test_an_update_that_breaks_the_model_is_divergence_not_a_checkpoint(tmp_path, monkeypatch,
                                                                       eval_every):
    """The step-3 update makes the parameters NaN; step 3 saves a checkpoint, with an eval or
    without one. Its train loss predates the update and is finite, but the run must stop there,
    before evaluating, logging or saving a NaN model (as "best" or as the one to resume)."""
    from cnnjax.train import step as step_lib

    original = step_lib._apply_gradients

    def poisoned(state, grads, *args, **kwargs):
        grads = jax.tree.map(lambda g: jax.numpy.where(state.step == 2, jax.numpy.nan, g), grads)
        return original(state, grads, *args, **kwargs)

    monkeypatch.setattr(step_lib, "_apply_gradients", poisoned)
    config = helpers.tiny_config(eval_every_steps=eval_every, checkpoint_every_steps=3,
                                 max_loss=None)
    with pytest.raises(loop.TrainingDivergedError,
                       match=r"diverged at step 3: a parameter became non-finite \(NaN or inf\) "
                             r"after the update, while the step's loss was \d"):
        loop.train_and_evaluate(config, str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert math.isfinite(float(summary["loss"]))  # the step's own (it was recorded as "nan")
    assert not (tmp_path / "checkpoints" / "3").exists()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and not [r for r in records if r["split"] == "eval"]
    assert not [r for r in records if step_lib.PARAMS_FINITE in r]


def test_nonfinite_batchnorm_statistics_are_divergence(tmp_path, monkeypatch):
    """One image of step 3's batch is finite but ~1e20: the BatchNorm batch variance overflows
    float32, so the running variance becomes inf while the normalized activations, the loss
    (~log 4) and the updated parameters stay finite. Unchecked, the run completes and every eval
    after it is junk; it must stop at step 3 as diverged, naming the statistics, before
    evaluating, logging or saving that state."""
    original = helpers.train_batches

    def extreme(*args, start_step=0, **kwargs):
        for i, batch in enumerate(original(*args, start_step=start_step, **kwargs)):
            if start_step + i == 2:
                image = batch["image"].copy()
                image[0, 0] *= 1e20
                batch = dict(batch, image=image)
            yield batch

    monkeypatch.setattr(sys.modules["cnnjax.data.pipeline"], "train_batches", extreme)
    config = helpers.tiny_config(eval_every_steps=4, max_loss=None)
    with pytest.raises(loop.TrainingDivergedError,
                       match=r"diverged at step 3: the BatchNorm statistics \(batch_stats: "
                             r"running mean/variance\) became non-finite \(NaN or inf\) while "
                             r"the loss was 1\.3"):
        loop.train_and_evaluate(config, str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["step"] == 3
    assert summary["hint"] == loop.BATCH_STATS_HINT and "BatchNorm" in summary["message"]
    assert 1.0 < float(summary["loss"]) < 2.0  # the loss itself stayed finite
    assert not (tmp_path / "checkpoints" / "4").exists()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and not [r for r in records if r["split"] == "eval"]
    assert not [r for r in records if loop.BATCH_STATS_FINITE in r]


def test_images_per_sec_is_reported_only_once_a_step_was_timed(tmp_path, monkeypatch):
    """The first step of an invocation compiles, so it is not timed: a train record logged
    before any step was timed (step 1 of a fresh run, the first step after a resume) has no
    `images_per_sec` (it said 0.0, a drop to 0 images/s in the curves at every resume), and
    an invocation that timed no step at all (a resume with one step left) reports null in
    summary.json. Every record after a timed step reports a positive figure."""
    config = helpers.tiny_config(log_every_steps=1, num_train_steps=9)

    def throughput(workdir):
        return {r["step"]: r.get("images_per_sec") for r in _records(workdir, "train")}

    fresh = loop.train_and_evaluate(config, str(tmp_path / "fresh"))
    rates = throughput(tmp_path / "fresh")
    assert sorted(rates) == list(range(1, 10)) and rates[1] is None
    assert all(rates[step] > 0 for step in range(2, 10))
    assert fresh["images_per_sec"] > 0

    resumed = tmp_path / "resumed"
    helpers.run_until_crash(config, resumed, monkeypatch, at_step=8)  # dies after step 8
    summary = loop.train_and_evaluate(config, str(resumed))  # one step left: step 9
    assert summary["resumed_from_step"] == 8
    assert summary["images_per_sec"] is None
    assert json.loads((resumed / "summary.json").read_text())["images_per_sec"] is None
    rates = throughput(resumed)
    assert rates[1] is None and rates[9] is None
    assert all(rates[step] > 0 for step in range(2, 9))
    assert "images_per_sec" not in summary["final_train"]


class _FakeClock:
    """Stands in for `loop`'s `time` module: `time()` (wall times) and `perf_counter()`
    (images/s) read `now`, which only the test advances; the rest is the real module."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def time(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def _fake_clock(monkeypatch, seconds_per_step: float = 1.0) -> _FakeClock:
    """Makes `loop` read a `_FakeClock` that advances `seconds_per_step` as each step's
    metrics reach the host (before `_Run.record` times and logs the step)."""
    clock = _FakeClock()
    record = loop._Run.record

    def timed_record(self, *args):
        clock.now += seconds_per_step
        return record(self, *args)

    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(loop._Run, "record", timed_record)
    return clock


def test_eval_and_save_time_is_not_training_throughput(tmp_path, monkeypatch):
    """images/s counts training steps only: the clock restarts after each eval and save
    (`_Throughput.paused`). Every step takes 1 s of a fake clock, every eval and every save
    100 s, so every record after a timed step, and summary.json, read exactly 16 images/s (the
    batch); counting step 3's eval and save (200 s) read 16*3/203 at step 4."""
    clock = _fake_clock(monkeypatch)
    log_eval, save = loop._Run.log_eval, loop._Run.save

    def slow_eval(self, *args):
        clock.now += 100.0
        return log_eval(self, *args)

    def slow_save(self, *args):
        clock.now += 100.0
        return save(self, *args)

    monkeypatch.setattr(loop._Run, "log_eval", slow_eval)
    monkeypatch.setattr(loop._Run, "save", slow_save)
    config = helpers.tiny_config(eval_every_steps=3)  # evals at 3, 6, 9, 12; saves at 4, 8 too
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert config.global_batch_size == 16
    rates = {r["step"]: r["images_per_sec"] for r in _records(tmp_path, "train")}
    assert rates == dict.fromkeys([2, 4, 6, 8, 10, 12], 16.0)
    assert summary["images_per_sec"] == 16.0


def test_total_wall_time_sums_the_invocations_of_a_resumed_run(tmp_path, monkeypatch,
                                                               crash_and_resume):
    """summary.json's `wall_time_s` is the last invocation's; `total_wall_time_s` adds the
    earlier ones' (carried in the checkpoint's run_info). A checkpoint written before the field
    existed still resumes, its earlier time counted as 0."""
    run = crash_and_resume
    uninterrupted = run.reference_summary
    assert uninterrupted["total_wall_time_s"] == uninterrupted["wall_time_s"] > 0

    crashed = run.crashed
    assert crashed["status"] == "failed"
    # where it stopped and what a rerun resumes from (a failed summary had neither)
    assert (crashed["step"], crashed["resumes_from_step"]) == (8, 8)
    assert crashed["total_wall_time_s"] == crashed["wall_time_s"] > 0
    earlier = run.earlier  # run_info(8)[TOTAL_WALL_TIME] of the killed run's checkpoint
    assert 0 < earlier <= crashed["wall_time_s"]
    summary = run.resumed_summary
    assert summary["resumed_from_step"] == 8
    assert summary["total_wall_time_s"] == pytest.approx(earlier + summary["wall_time_s"])
    assert summary["total_wall_time_s"] > summary["wall_time_s"] > 0

    config = helpers.tiny_config()
    old = tmp_path / "old"  # checkpoints without the field (written by an older cnnjax)
    original_save = Checkpointer.save

    def save_without_total(self, step, state, metrics=None, run_info=None):
        run_info = {k: v for k, v in (run_info or {}).items() if k != loop.TOTAL_WALL_TIME}
        return original_save(self, step, state, metrics, run_info)

    monkeypatch.setattr(Checkpointer, "save", save_without_total)
    helpers.run_until_crash(config, old, monkeypatch)
    monkeypatch.setattr(Checkpointer, "save", original_save)
    summary = loop.train_and_evaluate(config, str(old))
    assert summary["resumed_from_step"] == 8
    assert summary["total_wall_time_s"] == summary["wall_time_s"] > 0


def test_total_wall_time_carries_every_earlier_invocation(tmp_path, monkeypatch):
    """Three invocations (killed after the step-4 and the step-8 checkpoints, then finished):
    each checkpoint's run_info carries the wall time of every invocation before it, not only
    its own invocation's (the step-8 one dropped the first invocation's). A fake clock in which
    every step takes 1 s: 4 s per invocation, so 4 s, 8 s and 12 s in all."""
    _fake_clock(monkeypatch)
    config = helpers.tiny_config()

    def total_wall_time(step):
        checkpoints = Checkpointer(str(tmp_path))
        try:
            return checkpoints.run_info(step)[loop.TOTAL_WALL_TIME]
        finally:
            checkpoints.close()

    helpers.run_until_crash(config, tmp_path, monkeypatch, at_step=5)  # steps 1-4 recorded
    assert total_wall_time(4) == 4.0
    helpers.run_until_crash(config, tmp_path, monkeypatch, at_step=9)  # steps 5-8
    assert total_wall_time(8) == 8.0
    summary = loop.train_and_evaluate(config, str(tmp_path))  # steps 9-12
    assert summary["resumed_from_step"] == 8
    assert (summary["wall_time_s"], summary["total_wall_time_s"]) == (4.0, 12.0)
    assert total_wall_time(12) == 12.0


def test_no_prefetch_thread_outlives_its_run(tmp_path):
    import threading

    for i in range(2):
        loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4), str(tmp_path / str(i)))
    assert not [t for t in threading.enumerate() if "prefetch" in t.name or "producer" in t.name]


def _stored_state(workdir):
    """The newest checkpoint exactly as stored (no template, so no dtype conversion on restore)."""
    import orbax.checkpoint as ocp

    ckpt = os.path.join(workdir, "checkpoints")
    step = max(int(n) for n in os.listdir(ckpt) if n.isdigit())
    return ocp.PyTreeCheckpointer().restore(os.path.join(ckpt, str(step), "default"))


def test_mixed_precision_keeps_float32_params_and_optimizer_state(tmp_path):
    """bfloat16 compute changes the trajectory slightly; everything stored stays float32."""
    overrides = {"num_train_steps": 4, "eval_every_steps": 4, "optimizer.momentum": 0.9}
    summary = loop.train_and_evaluate(
        helpers.tiny_config(compute_dtype="bfloat16", **overrides), str(tmp_path / "bf16")
    )
    assert np.isfinite(summary["final_eval"]["loss"])
    loop.train_and_evaluate(helpers.tiny_config(**overrides), str(tmp_path / "f32"))
    bf16, f32 = _stored_state(str(tmp_path / "bf16")), _stored_state(str(tmp_path / "f32"))
    for part in ("params", "opt_state", "batch_stats"):
        leaves = [np.asarray(x) for x in jax.tree.leaves(bf16[part])]
        floats = {x.dtype for x in leaves if np.issubdtype(x.dtype, np.floating)}
        assert floats == {np.dtype("float32")}, (part, floats)
    assert jax.tree.leaves(bf16["opt_state"])  # momentum buffers exist and were checked
    diffs = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(bf16["params"]), jax.tree.leaves(f32["params"]),
                        strict=True)
    ]
    # The compute really ran in bfloat16 (8-bit mantissa): same start, visibly different result,
    # but still the same training run.
    assert 1e-5 < max(diffs) < 0.05, diffs


def test_shard_map_run(tmp_path):
    summary = loop.train_and_evaluate(helpers.tiny_config(parallel="shard_map"), str(tmp_path))
    assert summary["status"] == "completed" and summary["parallel"] == "shard_map"


@pytest.fixture(scope="module")
def _finished_4_step_run(tmp_path_factory):
    """The workdir of a finished `tiny_config(num_train_steps=4)` run, trained once for the
    tests below that start from one; `finished_run` gives each its own copy."""
    workdir = tmp_path_factory.mktemp("finished_4_step_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        helpers.install_fake_pipeline(monkeypatch)
        loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4), str(workdir))
    return workdir


@pytest.fixture
def finished_run(tmp_path, _finished_4_step_run):
    """`tmp_path` holding a finished `tiny_config(num_train_steps=4)` run (a byte-for-byte copy
    of one trained once per module, mtimes kept); returns its summary.json."""
    shutil.copytree(_finished_4_step_run, tmp_path, dirs_exist_ok=True)
    return json.loads((tmp_path / "summary.json").read_text())


def test_incompatible_workdir_is_refused_and_restart_starts_fresh(tmp_path, finished_run):
    first = finished_run
    recorded = (tmp_path / "summary.json").read_bytes()
    changed = helpers.tiny_config(num_train_steps=4, **{"optimizer.name": "adam"})
    with pytest.raises(ValueError) as err:
        loop.train_and_evaluate(changed, str(tmp_path))
    message = str(err.value)
    assert (
        "holds checkpoints of an incompatible config (optimizer.name: 'sgd' -> 'adam')" in message
    )
    assert "use a new --workdir, pass --config.restart=True, or delete the workdir" in message
    assert (tmp_path / "summary.json").read_bytes() == recorded  # the finished run's record
    # runtime-only fields may change on resume; a finished run is left as it is
    again = helpers.tiny_config(num_train_steps=4, log_every_steps=1)
    rerun = loop.train_and_evaluate(again, str(tmp_path))  # already complete: nothing to train
    assert (tmp_path / "summary.json").read_bytes() == recorded
    # a copy of a run made elsewhere: its files are named where they are now (they were the
    # first invocation's, from summary.json, and experiments.train printed those)
    assert first["outputs"]["workdir"] != str(tmp_path)
    assert rerun == first | {"outputs": {
        "workdir": str(tmp_path), "metrics": str(tmp_path / "metrics.jsonl"),
        "plot": str(tmp_path / "learning_curves.png"),
        "checkpoints": str(tmp_path / "checkpoints"),
        "tensorboard": str(tmp_path / "tensorboard")}}
    changed.restart = True
    summary = loop.train_and_evaluate(changed, str(tmp_path))
    assert summary["resumed_from_step"] == 0 and summary["status"] == "completed"


def test_a_lost_config_json_is_recovered_from_the_checkpoints_not_replaced_by_the_rerun(
        tmp_path, finished_run):
    """config.json lost beside the checkpoints: a rerun with another learning rate resumed the
    run under it and wrote its config.json as the run's, with nothing said. The checkpoints
    record the config: the change is refused by name, the same config resumes and config.json
    is the run's again; restart still discards a run of another config."""
    config = helpers.tiny_config(num_train_steps=4)  # finished_run's
    saved = json.loads((tmp_path / "config.json").read_text())
    for name in ("config.json", "summary.json"):
        (tmp_path / name).unlink()
    lr = config.optimizer.learning_rate
    changed = helpers.tiny_config(num_train_steps=4, **{"optimizer.learning_rate": 2 * lr})
    with pytest.raises(ValueError, match=(r"holds checkpoints of an incompatible config "
                                          rf"\(optimizer.learning_rate: {lr!r} -> {2 * lr!r}")):
        loop.train_and_evaluate(changed, str(tmp_path))
    assert not (tmp_path / "config.json").exists()
    same = helpers.tiny_config(num_train_steps=4, log_every_steps=1)  # a runtime field
    assert loop.train_and_evaluate(same, str(tmp_path))["resumed_from_step"] == 4
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"] == saved["optimizer"]
    (tmp_path / "config.json").unlink()  # a finished run's no-op rerun puts it back too
    assert loop.train_and_evaluate(same, str(tmp_path))["resumed_from_step"] == 4
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"] == saved["optimizer"]
    (tmp_path / "config.json").unlink()
    changed.restart = True
    assert loop.train_and_evaluate(changed, str(tmp_path))["resumed_from_step"] == 0


def test_an_unreadable_config_json_is_replaced_by_the_checkpoints_record(tmp_path,
                                                                         finished_run):
    """A config.json cut short ended every rerun with JSON's bare "Expecting ..." error, naming
    no file; the checkpoints' record of the config now stands in for it, as for a lost one."""
    config = helpers.tiny_config(num_train_steps=4)  # finished_run's
    saved = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(saved[:len(saved) // 2])
    (tmp_path / "summary.json").unlink()
    changed = helpers.tiny_config(num_train_steps=4, **{"optimizer.name": "adam"})
    with pytest.raises(ValueError, match=r"incompatible config \(optimizer.name: 'sgd' -> 'adam'"):
        loop.train_and_evaluate(changed, str(tmp_path))
    assert loop.train_and_evaluate(config, str(tmp_path))["resumed_from_step"] == 4
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(saved)


def test_an_edited_config_json_does_not_override_the_checkpoints_record(tmp_path, caplog,
                                                                        finished_run):
    """config.json edited by hand (learning rate 0.05 -> 0.2) after checkpoints trained at
    0.05: the original command was refused with the values backwards, with restart=True it
    deleted the run, and the edited value resumed it silently. The checkpoints' record wins."""
    config = helpers.tiny_config(num_train_steps=4)  # finished_run's
    lr = config.optimizer.learning_rate
    saved = json.loads((tmp_path / "config.json").read_text())
    edited = json.loads(json.dumps(saved))
    edited["optimizer"]["learning_rate"] = 4 * lr
    (tmp_path / "config.json").write_text(json.dumps(edited))
    (tmp_path / "summary.json").unlink()
    changed = helpers.tiny_config(num_train_steps=4, **{"optimizer.learning_rate": 4 * lr})
    with pytest.raises(ValueError, match=(r"holds checkpoints of an incompatible config "
                                          rf"\(optimizer.learning_rate: {lr!r} -> {4 * lr!r}")):
        loop.train_and_evaluate(changed, str(tmp_path))
    config.restart = True  # a requeued job's command line: resumes, never deletes the run
    with caplog.at_level(logging.WARNING):
        assert loop.train_and_evaluate(config, str(tmp_path))["resumed_from_step"] == 4
    assert "differs from the config its checkpoints recorded in ['optimizer.learning_rate']" in (
        caplog.text)
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"] == saved["optimizer"]
    # a finished run's no-op rerun and a refused one restore it too (other commands read it)
    for refused in (False, True):
        (tmp_path / "config.json").write_text(json.dumps(edited))
        if refused:
            with pytest.raises(ValueError, match="incompatible config"):
                loop.train_and_evaluate(changed, str(tmp_path))
        else:
            assert loop.train_and_evaluate(config, str(tmp_path))["status"] == "completed"
        restored = json.loads((tmp_path / "config.json").read_text())
        assert restored["optimizer"] == saved["optimizer"]


def test_a_config_json_without_checkpoints_is_not_taken_for_an_edit(tmp_path, caplog,
                                                                     monkeypatch):
    """A run killed before its first checkpoint leaves config.json and no checkpoint. Its rerun
    compared config.json with the checkpoints' record, None: every field read as edited, and
    process 0 wrote `null` over config.json until the run saved its config again."""
    config = helpers.tiny_config(num_train_steps=2)
    (tmp_path / "config.json").write_text(json.dumps(json.loads(config.to_json())))
    writes = []
    real_write = loop.atomic_write

    def recording_write(path, text, *args, **kwargs):
        writes.append((path, text))
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(loop, "atomic_write", recording_write)
    with caplog.at_level(logging.WARNING):
        assert loop.train_and_evaluate(config, str(tmp_path))["status"] == "completed"
    assert "differs from the config its checkpoints recorded" not in caplog.text
    assert not [path for path, text in writes
                if path.endswith("config.json") and text.strip() == "null"]


def test_restart_also_empties_what_other_commands_measured_of_the_discarded_run(tmp_path,
                                                                                finished_run):
    """`restart` empties the workdir (docs/training.md): the outputs experiments.evaluate,
    .visualize, .robustness and .rcnn_svm wrote from the discarded run's checkpoints go too.
    They stayed, named by checkpoint step only, so eval/test_step4.json read as the new run's
    step 4, and a robustness rerun of the new run (same settings, same step) reprinted the old
    model's table. The launcher's slurm/ folder (the running job's script and logs) stays, and
    the checkpoints `Checkpointer` quarantined (unreadable) go with the run's own."""
    outputs = ("eval/test_step4.json", "visualize/visualize.json",
               "robustness/robustness.json", "rcnn_svm/results.json", "slurm/job.sbatch",
               "checkpoints_corrupt/2.1700000000/_CHECKPOINT_METADATA")
    for name in outputs:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    changed = helpers.tiny_config(num_train_steps=4, restart=True,
                                  **{"optimizer.name": "adam"})
    assert loop.train_and_evaluate(changed, str(tmp_path))["resumed_from_step"] == 0
    assert [n for n in outputs if (tmp_path / n).exists()] == ["slurm/job.sbatch"]


def test_restart_never_discards_a_run_of_the_same_config(tmp_path, monkeypatch):
    """A job requeued with `--config.restart=True` still on its command line resumes."""
    from cnnjax.train.preemption import StopRequest, TrainingInterrupted

    config = helpers.tiny_config(num_train_steps=8, checkpoint_every_steps=4, restart=True)
    monkeypatch.setattr(StopRequest, "should_stop",
                        lambda self, step, every: "SIGTERM" if step == 4 else None)
    with pytest.raises(TrainingInterrupted):
        loop.train_and_evaluate(config, str(tmp_path))
    monkeypatch.undo()
    helpers.install_fake_pipeline(monkeypatch)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["resumed_from_step"] == 4 and summary["status"] == "completed"


def test_restart_refuses_checkpoints_whose_config_is_unknown(tmp_path):
    """Checkpoints that record no config, beside no config.json (written before configs were
    kept with them): restart emptied the workdir, though the run might be this config's (a
    requeued job). Now it is refused and nothing is deleted; without restart it resumes."""
    config = helpers.tiny_config(num_train_steps=8, checkpoint_every_steps=4, eval_every_steps=8)
    loop.train_and_evaluate(config, str(tmp_path))
    (tmp_path / "config.json").unlink()
    (tmp_path / "summary.json").unlink()
    for step in ("4", "8"):
        path = tmp_path / "checkpoints" / step / loop.STEP_METADATA_FILE
        metadata = json.loads(path.read_text())
        del metadata["custom_metadata"][loop.CONFIG_RECORD]
        path.write_text(json.dumps(metadata))
    config.restart = True
    with pytest.raises(ValueError, match=r"^config: restart=True is invalid; '.*' holds "
                                         r"checkpoints that record no config .* drop "
                                         r"--config.restart to resume it, or delete the "
                                         r"workdir to start over"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]
    config.restart = False
    assert loop.train_and_evaluate(config, str(tmp_path))["resumed_from_step"] == 8


def test_a_rerun_after_the_final_save_prunes_what_orbax_had_not(tmp_path):
    """Killed after its final checkpoint committed but before orbax pruned the older ones (and
    before summary.json), the rerun had nothing to train and kept one checkpoint too many."""
    config = helpers.tiny_config(num_train_steps=8, checkpoint_every_steps=2, eval_every_steps=8,
                                 keep_checkpoints=3)
    loop.train_and_evaluate(config, str(tmp_path))
    assert sorted(map(int, os.listdir(tmp_path / "checkpoints"))) == [4, 6, 8]
    (tmp_path / "summary.json").unlink()
    config.keep_checkpoints = 1  # as if one more than `keep` had been left behind
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 8
    assert os.listdir(tmp_path / "checkpoints") == ["8"]  # the latest, also the best


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_the_throughput_clock_starts_when_the_first_step_is_done(tmp_path, monkeypatch, resumed):
    """The first step's metrics were read one step late, after the second step's call. On CPU a
    call may run its step before returning, so the clock started after step 2, the last
    interval read ~0 s, and a 6-step detector run reported 60 images/s for 48. The first
    step's tick now comes before the second step is dispatched, also for the first step of a
    resumed invocation (step 5 after the step-4 checkpoint), which compiles as step 1 does."""
    config = helpers.tiny_config(num_train_steps=8 if resumed else 4)
    if resumed:
        helpers.run_until_crash(config, tmp_path, monkeypatch, at_step=5)
    events = []
    steps, tick = loop._Run.steps, loop._Throughput.tick

    def recorded_steps(self):
        p_train, p_eval = steps(self)
        return (lambda *args: (events.append("step"), p_train(*args))[1]), p_eval

    monkeypatch.setattr(loop._Run, "steps", recorded_steps)
    monkeypatch.setattr(loop._Throughput, "tick", lambda self: (events.append("tick"),
                                                                tick(self))[1])
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["resumed_from_step"] == (4 if resumed else 0)
    assert events[:3] == ["step", "tick", "step"] and events.count("tick") == 4


def test_a_workdir_another_process_trains_in_is_refused_and_left_untouched(tmp_path):
    running = '{"status": "running"}'  # what the holder's summary might say
    (tmp_path / "summary.json").write_text(running)
    with (helpers.locked_by_another_process(tmp_path),
          pytest.raises(DirectoryInUseError, match="is in use by another run") as err):
        loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4), str(tmp_path))
    assert "pass a different --workdir" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["run.lock", "summary.json"]
    assert (tmp_path / "summary.json").read_text() == running
    # Once the holder is gone the same command runs.
    summary = loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4), str(tmp_path))
    assert summary["status"] == "completed"


# The engine's warning for a garbled checkpoint's metrics file (it is rebuilt from metrics.jsonl).
_METRICS_REWRITTEN = r"metrics file of the checkpoint at step 8 .* is unreadable; it is rewritten"


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path):
    config = helpers.tiny_config(num_train_steps=8, checkpoint_every_steps=4, eval_every_steps=8)
    loop.train_and_evaluate(config, str(tmp_path))
    latest = tmp_path / "checkpoints" / "8"
    for root, _, files in os.walk(latest):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    config.num_train_steps = 8
    # Its metrics file is rewritten from metrics.jsonl, its garbled metadata sets it aside.
    with (pytest.warns(RuntimeWarning, match=_METRICS_REWRITTEN),
          pytest.warns(RuntimeWarning, match="Checkpoint at step 8 .* has a damaged metadata "
                                             "file.*; resuming from step 4")):
        summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["resumed_from_step"] == 4 and summary["status"] == "completed"
    assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == ["8"]


def test_a_failure_before_training_leaves_a_finished_runs_summary(tmp_path, monkeypatch,
                                                                   finished_run):
    """A rerun that dies in setup (here a dataset gone missing) still raises, but the finished
    run's record stays: sweeps and people read it."""
    recorded = (tmp_path / "summary.json").read_bytes()

    def missing(*args, **kwargs):
        raise FileNotFoundError("dataset 'synthetic' is not prepared")

    monkeypatch.setattr(sys.modules["cnnjax.data.pipeline"], "get_dataset_info", missing)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4), str(tmp_path))
    assert (tmp_path / "summary.json").read_bytes() == recorded


def test_a_refused_rerun_leaves_a_stopped_runs_summary(tmp_path, finished_run):
    """A rerun refused before training (here: another learning rate than the checkpoints') used
    to replace an interrupted run's record ("stopped at step N") with its own "failed" one."""
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary.update(status="interrupted", message="Training stopped by SIGTERM at step 4 ...")
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="holds checkpoints of an incompatible config") as err:
        loop.train_and_evaluate(
            helpers.tiny_config(num_train_steps=4, **{"optimizer.learning_rate": 0.5}),
            str(tmp_path))
    # ... but notes the refusal: its "rerun to resume" may not hold (every checkpoint corrupt),
    # and the reason was written nowhere in the workdir
    noted = json.loads((tmp_path / "summary.json").read_text())
    refused = noted.pop("refused")
    assert noted == summary
    assert refused["error"] == "ValueError" and refused["message"] == str(err.value)


def test_a_refused_rerun_of_a_killed_run_writes_why_in_the_workdir(tmp_path, finished_run):
    """A run killed without a summary (SIGKILL, out of memory) whose rerun is refused (every
    checkpoint corrupt, another config): the reason went to the terminal only."""
    (tmp_path / "summary.json").unlink()
    with pytest.raises(ValueError, match="holds checkpoints of an incompatible config") as err:
        loop.train_and_evaluate(
            helpers.tiny_config(num_train_steps=4, **{"optimizer.learning_rate": 0.5}),
            str(tmp_path))
    noted = json.loads((tmp_path / "summary.json").read_text())
    assert noted["status"] == "interrupted" and noted["resumes_from_step"] == 4
    assert noted["message"].startswith("the run stopped without writing a summary (killed?)")
    assert noted["refused"]["message"] == str(err.value)


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("summary", [True, False])  # False: an interrupted conversion
def test_training_into_a_workdir_of_converted_weights_is_refused(tmp_path, restart, summary):
    """A run aimed at a converted-weights workdir listed every config field as "incompatible"
    and, with restart=True, deleted the converted checkpoint."""
    (tmp_path / "checkpoints" / "0").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model": "resnet18", "source": {"weights": "/x.pth"}, "num_classes": 1000,
         "best_metric": None, "best_mode": "max", "model_kwargs": {}}))
    if summary:
        (tmp_path / "summary.json").write_text(json.dumps({"status": "converted", "step": 0}))
    with pytest.raises(ValueError, match=r"^workdir: '.*' holds converted torchvision weights "
                                         r"\(see its summary.json\), not a training run: pass "
                                         r"it as --config.init_from.workdir"):
        loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4, restart=restart),
                                str(tmp_path))
    assert (tmp_path / "checkpoints" / "0").is_dir()
    assert (tmp_path / "summary.json").exists() == summary  # no training run's summary added


def test_ctrl_c_records_where_it_stopped_and_what_a_rerun_resumes_from(tmp_path, monkeypatch):
    """A KeyboardInterrupt left summary.json's message empty ("KeyboardInterrupt", "")."""
    config = helpers.tiny_config(num_train_steps=8, checkpoint_every_steps=2, eval_every_steps=8)
    record = loop._Run.record

    def ctrl_c_after_step_5(self, step, *args):
        if step == 5:
            raise KeyboardInterrupt
        return record(self, step, *args)

    monkeypatch.setattr(loop._Run, "record", ctrl_c_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "KeyboardInterrupt"
    # step 5's metrics never reached the host (the loop had dispatched step 6); the last
    # checkpoint is step 4. A sweep's table takes the step (it said 4 while this said "at 6").
    assert summary["message"] == ("Interrupted (Ctrl-C) after step 4; rerunning the same "
                                  "command resumes from the checkpoint of step 4.")
    assert summary["step"] == 4
    monkeypatch.setattr(loop._Run, "record", record)
    assert loop.train_and_evaluate(config, str(tmp_path))["resumed_from_step"] == 4


def test_a_no_op_rerun_keeps_the_config_the_run_trained_with(tmp_path):
    """A finished run rerun with other runtime fields (eval_every_steps) does nothing, so its
    config.json must still say how it was evaluated and checkpointed."""
    loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4, eval_every_steps=2),
                            str(tmp_path))
    recorded = (tmp_path / "config.json").read_bytes()
    again = loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4, eval_every_steps=4),
                                    str(tmp_path))
    assert again["status"] == "completed"
    assert (tmp_path / "config.json").read_bytes() == recorded


def test_a_failure_between_restore_and_training_closes_the_checkpointer(tmp_path, monkeypatch):
    """Setup after the restore (metric files, input pipeline) may still fail: the async
    checkpoint manager is closed all the same, not left to the interpreter's exit."""
    closed = []
    close = Checkpointer.close
    monkeypatch.setattr(Checkpointer, "close", lambda self: (closed.append(self), close(self))[1])

    def broken(*args, **kwargs):
        raise OSError("metrics.jsonl: read-only file system")

    monkeypatch.setattr(loop, "MetricLogger", broken)
    with pytest.raises(OSError, match="read-only"):
        loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4), str(tmp_path))
    assert len(closed) == 1


def test_restart_with_checkpoints_that_no_longer_restore_says_to_delete_them(tmp_path):
    config = helpers.tiny_config(num_train_steps=8, checkpoint_every_steps=4, eval_every_steps=8)
    loop.train_and_evaluate(config, str(tmp_path))
    for root, _, files in os.walk(tmp_path / "checkpoints"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    config.restart = True
    with (pytest.warns(RuntimeWarning, match=_METRICS_REWRITTEN),
          pytest.warns(RuntimeWarning, match=r"could not be restored"),
          pytest.raises(ValueError, match=r"can be read: their files are damaged or missing .* "
                                          r"\(restart=True only empties a "
                                          r"workdir whose run has another config; delete its "
                                          r"checkpoints to start this one over\)")):
        loop.train_and_evaluate(config, str(tmp_path))


def test_eval_with_the_real_pipeline_counts_every_example_once(tmp_path, monkeypatch):
    """27 eval examples in batches of 8 (last one padded by 5): the run's final eval equals a
    float64 NumPy evaluation of the final params on the 27 examples, unpadded."""
    monkeypatch.undo()  # the real cnnjax.data.pipeline, on its in-memory `fake` dataset
    helpers.register_tiny_model(monkeypatch)  # undo() unregistered it too
    from cnnjax.data import sources
    from cnnjax.data.pipeline import default_data_config, eval_batches
    from cnnjax.models import create_model
    from cnnjax.train import logging as logging_lib

    # TensorFlow (input pipeline, TensorBoard writer) must have GPUs hidden before its first use.
    order = []
    hide = sources.hide_gpus_from_tensorflow
    monkeypatch.setattr(sources, "hide_gpus_from_tensorflow",
                        lambda: (order.append("hide"), hide())[1])
    writer_init = logging_lib.EventFileWriter.__init__
    monkeypatch.setattr(logging_lib.EventFileWriter, "__init__",
                        lambda self, logdir: (order.append("tensorboard"),
                                              writer_init(self, logdir))[1])
    config = helpers.tiny_config(num_train_steps=4, eval_every_steps=4, eval_batch_size=8,
                                 tensorboard=True)
    config.data = default_data_config("fake")
    config.data.fake_image_shape = helpers.IMAGE_SHAPE
    config.data.fake_num_classes = helpers.NUM_CLASSES
    config.data.fake_num_train, config.data.fake_num_eval = 64, 27
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["final_eval"]["num_examples"] == 27
    assert order[0] == "hide" and "tensorboard" in order

    (whole,) = eval_batches(config.data, global_batch_size=27, num_devices=1)  # no padding
    assert whole["mask"].sum() == 27
    state, step = _final_params(str(tmp_path), config)
    assert step == 4
    model = create_model(helpers.TINY_MODEL, num_classes=helpers.NUM_CLASSES)
    logits = np.asarray(model.apply(state.variables(), whole["image"][0]), np.float64)
    labels = whole["label"][0]
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    rank = (logits > logits[np.arange(27), labels][:, None]).sum(-1)
    final = summary["final_eval"]
    np.testing.assert_allclose(final["loss"], -log_p[np.arange(27), labels].mean(), rtol=1e-5)
    np.testing.assert_allclose(final["top1"], (rank < 1).mean(), rtol=1e-12)
    np.testing.assert_allclose(final["top5"], (rank < 5).mean(), rtol=1e-12)


class _ActNet(helpers.TinyNet):
    """The tiny model with an activation field, as the zoo's ResNets and DenseNets have."""

    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = self.act(nn.Conv(4, (3, 3), padding="VALID", dtype=self.dtype, name="conv")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def test_a_function_in_model_kwargs_resumes_and_reloads(tmp_path, monkeypatch):
    """`config.model_kwargs.act = jax.nn.gelu` (experiments/README.md's recipe) was saved as
    "function gelu" and compared as "<function gelu at 0x...>": a rerun of the same config was
    refused as incompatible (restart=True would discard it), and load_trained rebuilt the model
    with act='function gelu'. It is saved and compared by import path now, and imported back."""
    from cnnjax.models import registry
    from cnnjax.train.trained import load_trained
    from cnnjax.utils import callables

    # a registered model with an `act` field, tiny: the act's record is checked, not the
    # network (resnet20_cifar's, the recipe's, cost ~15 s of a cold run compiling it)
    name = "test_tiny_act_cnn"
    monkeypatch.setitem(registry._REGISTRY, name, registry.ModelInfo(
        name, _ActNet, helpers.IMAGE_SHAPE, 3, helpers.NUM_CLASSES, "test-only"))

    def config():
        c = helpers.tiny_config(model=name, num_train_steps=2, global_batch_size=8,
                                eval_every_steps=2, checkpoint_every_steps=2)
        c.model_kwargs = config_lib.model_kwargs_config(c.model)
        c.model_kwargs.act = jax.nn.gelu
        return c

    assert loop.train_and_evaluate(config(), str(tmp_path))["status"] == "completed"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_kwargs"]["act"] == "callable:jax.nn.gelu"
    before = (tmp_path / "summary.json").read_text()
    rerun = config()
    rerun.restart = True  # a requeued job's command line: never starts over
    for again in (config(), rerun):  # a finished run of the same config: nothing changes
        assert loop.train_and_evaluate(again, str(tmp_path))["status"] == "completed"
        assert (tmp_path / "summary.json").read_text() == before
    run = load_trained(str(tmp_path))
    assert run.config.model_kwargs.act is jax.nn.gelu and run.model.act is jax.nn.gelu
    # Not importable by path: refused before anything is built.
    bad = config()
    bad.model_kwargs.act = lambda x: x
    with pytest.raises(ValueError, match=r"^config: model_kwargs.act=<function .*<lambda>.* is "
                                         r"invalid; expected a module-level function or class"):
        config_lib.check_config(bad)
    assert callables.decode(callables.encode({"a": [jax.nn.relu, 1]})) == {"a": [jax.nn.relu, 1]}
    with pytest.raises(ValueError, match=r"'callable:jax.nn.no_such' is invalid; it does not "
                                         r"import here"):
        callables.decode("callable:jax.nn.no_such")


def _count_eval_passes(monkeypatch) -> list:
    """Counts the eval pipelines opened (each call of the pipeline's `eval_batches`)."""
    module = sys.modules["cnnjax.data.pipeline"]
    original, opened = module.eval_batches, []

    def counting(*args, **kwargs):
        opened.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "eval_batches", counting)
    return opened


def test_a_small_eval_split_is_read_once_per_run(tmp_path, monkeypatch):
    """The eval split is deterministic (stored order, no augmentation): a split that fits
    `EVAL_CACHE_BYTES` is read by the first eval and kept, later evals reuse its batches
    (rebuilding the tf.data pipeline cost ~0.4 s per eval in make train). Every eval's metrics
    are bitwise those of a run that reads the split at each eval."""
    config = helpers.tiny_config(eval_every_steps=4)
    opened = _count_eval_passes(monkeypatch)
    loop.train_and_evaluate(config, str(tmp_path / "kept"))
    assert len(opened) == 1
    monkeypatch.setattr(loop, "EVAL_CACHE_BYTES", 0)  # too large to keep: read at each eval
    opened.clear()
    loop.train_and_evaluate(config, str(tmp_path / "read"))
    assert len(opened) == 3

    kept = _records(tmp_path / "kept", "eval")
    assert [r["step"] for r in kept] == [4, 8, 12]
    assert kept == _records(tmp_path / "read", "eval")


def test_a_slow_close_at_the_end_of_a_run_is_logged_with_its_name(monkeypatch, caplog):
    """A close over SLOW_CLOSE_SECONDS names what was closed and its seconds; a quicker one logs
    nothing, and the object is closed either way (a fake clock: nothing sleeps)."""

    class Slow:
        def __init__(self, seconds):
            self.seconds, self.closed = seconds, False

        def close(self):
            clock[0] += self.seconds
            self.closed = True

    clock = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    slow, quick = Slow(loop.SLOW_CLOSE_SECONDS + 2), Slow(loop.SLOW_CLOSE_SECONDS - 1)
    with caplog.at_level("WARNING", logger="absl"):
        with loop._closing(slow, "the slow thing") as entered:
            assert entered is slow
        with loop._closing(quick, "the quick thing"):
            pass
    assert slow.closed and quick.closed
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"Closing the slow thing took {loop.SLOW_CLOSE_SECONDS + 2:.1f} s."]


def test_every_close_at_the_end_of_a_run_is_timed(tmp_path, monkeypatch, caplog):
    """With a threshold below zero every close at the end of a real run is reported: the input
    pipeline, the progress bar, the metric files and the checkpoints each by name."""
    monkeypatch.setattr(loop, "SLOW_CLOSE_SECONDS", -1.0)
    with caplog.at_level("WARNING", logger="absl"):
        loop.train_and_evaluate(helpers.tiny_config(num_train_steps=2), str(tmp_path))
    closed = [r.getMessage().split(" took ")[0] for r in caplog.records
              if r.getMessage().startswith("Closing ")]
    assert closed == ["Closing the progress bar", "Closing the input pipeline",
                      "Closing the metric files",
                      "Closing the checkpoints (waiting for the pending save)"]

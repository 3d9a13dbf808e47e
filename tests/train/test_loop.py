"""`train_and_evaluate` end to end on synthetic data: outputs, exact resume, divergence, workdir."""

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from cnnjax.train import loop
from cnnjax.train.checkpoint import Checkpointer
from tests.train import helpers


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)


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


def test_run_writes_every_output(tmp_path):
    config = helpers.tiny_config(tensorboard=True)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["status"] == "completed" and summary["step"] == 12
    assert summary["final_eval"]["num_examples"] == helpers.NUM_EVAL
    assert summary["images_per_sec"] > 0 and summary["wall_time_s"] > 0
    assert json.loads(Path(tmp_path / "summary.json").read_text())["status"] == "completed"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [6, 12]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert all("learning_rate" in r for r in records if r["split"] == "train")
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tensorboard"))
    assert json.loads(Path(tmp_path / "config.json").read_text())["model"] == helpers.TINY_MODEL
    # keep_checkpoints=3 of the saves at 4, 6 (eval), 8, 12 (eval+final); best top1 kept too.
    assert 12 in Checkpointer(str(tmp_path), use_async=False).all_steps()


def test_learns_the_synthetic_task(tmp_path):
    config = helpers.tiny_config(num_train_steps=40, eval_every_steps=40)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["final_eval"]["top1"] > 0.9


class _CrashError(Exception):
    pass


def test_exact_resume_after_crash_in_process(tmp_path, monkeypatch):
    """A run that dies at step 9 (after the step-8 checkpoint) and is rerun ends bitwise equal."""
    config = helpers.tiny_config(**{"model_kwargs.dropout_rate": 0.3})
    reference = tmp_path / "reference"
    loop.train_and_evaluate(config, str(reference))

    original = helpers.train_batches

    def crashing(*args, start_step=0, **kwargs):
        for i, batch in enumerate(original(*args, start_step=start_step, **kwargs)):
            if start_step + i == 9:
                raise _CrashError("simulated kill")
            yield batch

    monkeypatch.setattr(sys.modules["cnnjax.data.pipeline"], "train_batches", crashing)
    resumed = tmp_path / "resumed"
    with pytest.raises(_CrashError):
        loop.train_and_evaluate(config, str(resumed))
    assert json.loads(Path(resumed / "summary.json").read_text())["status"] == "failed"
    monkeypatch.setattr(sys.modules["cnnjax.data.pipeline"], "train_batches", original)
    summary = loop.train_and_evaluate(config, str(resumed))
    assert summary["resumed_from_step"] == 8
    a, _ = _final_params(str(reference), config)
    b, _ = _final_params(str(resumed), config)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # metrics.jsonl describes one trajectory: no duplicated steps after the resume.
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    steps = [(r["split"], r["step"]) for r in map(json.loads, lines)]
    assert len(steps) == len(set(steps))


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
    assert f"Training diverged at step {summary['step']}" in summary["message"]


def test_nan_loss_is_divergence(tmp_path, monkeypatch):
    """A NaN input at step 3 makes the loss NaN: the run stops there, nothing NaN is saved."""
    original = helpers.train_batches

    def poisoned(*args, start_step=0, **kwargs):
        for i, batch in enumerate(original(*args, start_step=start_step, **kwargs)):
            if start_step + i == 2:
                batch = dict(batch, image=batch["image"] * np.nan)
            yield batch

    monkeypatch.setattr(sys.modules["cnnjax.data.pipeline"], "train_batches", poisoned)
    with pytest.raises(loop.TrainingDivergedError, match="diverged at step 3: loss is nan"):
        loop.train_and_evaluate(helpers.tiny_config(), str(tmp_path))
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"
    assert not (tmp_path / "checkpoints" / "4").exists()


def test_mixed_precision_keeps_float32_params(tmp_path):
    config = helpers.tiny_config(compute_dtype="bfloat16", num_train_steps=4, eval_every_steps=4)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(summary["final_eval"]["loss"])
    state, _ = _final_params(str(tmp_path), helpers.tiny_config())
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}


def test_shard_map_run(tmp_path):
    summary = loop.train_and_evaluate(helpers.tiny_config(parallel="shard_map"), str(tmp_path))
    assert summary["status"] == "completed" and summary["parallel"] == "shard_map"


def test_incompatible_workdir_is_refused_and_restart_starts_fresh(tmp_path):
    loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4), str(tmp_path))
    changed = helpers.tiny_config(num_train_steps=4, **{"optimizer.name": "adam"})
    with pytest.raises(ValueError) as err:
        loop.train_and_evaluate(changed, str(tmp_path))
    message = str(err.value)
    assert (
        "holds checkpoints of an incompatible config (optimizer.name: 'sgd' -> 'adam')" in message
    )
    assert "use a new --workdir, pass --config.restart=True, or delete the workdir" in message
    # runtime-only fields may change on resume
    again = helpers.tiny_config(num_train_steps=4, log_every_steps=1)
    rerun = loop.train_and_evaluate(again, str(tmp_path))  # already complete: nothing to train
    assert rerun["resumed_from_step"] == 4 and rerun["status"] == "completed"
    assert set(rerun["final_eval"]) == {"loss", "top1", "top5", "num_examples"}
    changed.restart = True
    summary = loop.train_and_evaluate(changed, str(tmp_path))
    assert summary["resumed_from_step"] == 0 and summary["status"] == "completed"


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path):
    config = helpers.tiny_config(num_train_steps=8, checkpoint_every_steps=4, eval_every_steps=8)
    loop.train_and_evaluate(config, str(tmp_path))
    latest = tmp_path / "checkpoints" / "8"
    for root, _, files in os.walk(latest):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    config.num_train_steps = 8
    with pytest.warns(RuntimeWarning, match="Checkpoint at step 8 .* could not be restored"):
        summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["resumed_from_step"] == 4 and summary["status"] == "completed"

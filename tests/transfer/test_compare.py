"""run_transfer with the real engine on the engine tests' synthetic data and tiny BatchNorm CNN:
which weights each arm starts from, the results it writes, resume after an interrupted or failed
run, and refusal of bad arguments before anything trains."""

from __future__ import annotations

import csv
import json
import os
import re

import flax.linen as nn
import numpy as np
import pytest
from ml_collections import config_dict

from cnnjax.models import registry
from cnnjax.transfer import compare
from cnnjax.tune import sweep
from tests.train import helpers
from tests.train.test_init_from import TWO_CLASSES, _flat, _install, _stored

BACKBONE = ["bn/bias", "bn/scale", "conv/bias", "conv/kernel"]


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    """The engine tests' synthetic pipeline: `synthetic` (4 classes), `synthetic2` (2)."""
    _install(monkeypatch)


def _source():
    return helpers.tiny_config()  # 12 steps, checkpoints at 4, 8, 12


def _target(**overrides):
    config = helpers.tiny_config(**overrides)
    config.data.name = TWO_CLASSES
    # The fake pipeline ignores it; the real one keeps that many examples per class.
    config.data.train_examples_per_class = config_dict.placeholder(int)
    return config


def _run(tmp_path, **kwargs):
    kwargs = {"budgets": (8,), "verbose": False, **kwargs}
    return compare.run_transfer(kwargs.pop("source", None) or _source(),
                                kwargs.pop("target", None) or _target(),
                                str(tmp_path / "transfer"), **kwargs)


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def initial_states(monkeypatch):
    """Records the host state each run hands to the devices (its state at step 0 / resume)."""
    return helpers.record_initial_states(monkeypatch)


def test_pretrained_arms_start_from_the_source_weights_and_scratch_does_not(
        tmp_path, initial_states):
    # The source keeps its checkpoints at 4, 8, 12 (evals at 6, 12): the arms start from the
    # final one, not an earlier or the best one.
    rows = _run(tmp_path, target=helpers.at_the_end_only(_target()))
    assert [(r["arm"], r["status"]) for r in rows] == [
        ("scratch", "completed"), ("finetune", "completed"), ("linear_probe", "completed")]
    source_dir = os.path.join(tmp_path, "transfer", "trials", "source")
    source_state, scratch, finetune, probe = initial_states  # runs in this order
    stored = _stored(source_dir, 12)  # the source's final checkpoint, read without the engine
    src_params, src_stats = _flat(stored["params"]), _flat(stored["batch_stats"])
    for start in (finetune, probe):
        params = _flat(start.params)
        assert params["head/kernel"].shape == (144, 2)  # the target's own 2-class head
        for name in BACKBONE:
            np.testing.assert_array_equal(params[name], src_params[name], err_msg=name)
        for name, value in src_stats.items():
            np.testing.assert_array_equal(_flat(start.batch_stats)[name], value, err_msg=name)
    # Scratch starts from the same fresh initialization the source started from (same seed),
    # not from what the source learnt.
    for name in BACKBONE:
        np.testing.assert_array_equal(_flat(scratch.params)[name],
                                      _flat(source_state.params)[name], err_msg=name)
        assert not np.array_equal(_flat(scratch.params)[name], src_params[name]), name
    for row in rows:
        summary = _json(os.path.join(row["workdir"], "summary.json"))
        if row["arm"] == "scratch":
            assert "init_from" not in summary
            assert not os.path.exists(os.path.join(row["workdir"], "init_from.json"))
        else:
            assert summary["init_from"]["workdir"] == os.path.abspath(source_dir)
            assert summary["init_from"]["step"] == 12
            assert summary["init_from"]["freeze"] == (
                "backbone" if row["arm"] == "linear_probe" else None)
    # The linear probe trained its head only: its final backbone params are the source's.
    probe_final = _flat(_stored(rows[2]["workdir"], 12)["params"])
    finetune_final = _flat(_stored(rows[1]["workdir"], 12)["params"])
    for name in BACKBONE:
        np.testing.assert_array_equal(probe_final[name], src_params[name], err_msg=name)
    assert not np.array_equal(finetune_final["conv/kernel"], src_params["conv/kernel"])


WRAPPED_MODEL = "test_tiny_wrapped_cnn"


class _Trunk(nn.Module):
    """The tiny model's conv -> BatchNorm -> relu, as one module (`features` conv channels)."""

    features: int
    axis_name: str | None

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(self.features, (3, 3), padding="VALID", name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         axis_name=self.axis_name, name="bn")(x)
        return nn.relu(x)


class _WrappedNet(nn.Module):
    """Another architecture around the tiny model's layers: they sit in `backbone`, and a `neck`
    the tiny model lacks comes between them and the `head`."""

    num_classes: int = helpers.NUM_CLASSES
    dtype: object = None
    axis_name: str | None = None
    features: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = _Trunk(self.features, self.axis_name, name="backbone")(x, train)
        x = nn.relu(nn.Conv(3, (1, 1), name="neck")(x)).reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="head")(x)


@pytest.fixture
def wrapped_model(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, WRAPPED_MODEL, registry.ModelInfo(
        WRAPPED_MODEL, _WrappedNet, helpers.IMAGE_SHAPE, 3, helpers.NUM_CLASSES, "test-only"))


def _wrapped_target(**overrides):
    return _target(**{"model": WRAPPED_MODEL, "init_from.submodule": "backbone", **overrides})


def test_across_architectures_the_source_fills_the_named_submodule(
        tmp_path, initial_states, wrapped_model):
    rows = _run(tmp_path, source=helpers.at_the_end_only(_source()),
                target=helpers.at_the_end_only(_wrapped_target()),
                arms=("scratch", "finetune", "linear_probe"))
    assert [r["status"] for r in rows] == ["completed"] * 3
    _, scratch, finetune, probe = initial_states
    stored = _stored(os.path.join(tmp_path, "transfer", "trials", "source"), 12)
    src_params, src_stats = _flat(stored["params"]), _flat(stored["batch_stats"])
    for start in (finetune, probe):
        params, stats = _flat(start.params), _flat(start.batch_stats)
        for name in BACKBONE:
            np.testing.assert_array_equal(params[f"backbone/{name}"], src_params[name])
        for name, value in src_stats.items():
            np.testing.assert_array_equal(stats[f"backbone/{name}"], value)
        # The modules the source lacks start as the scratch arm's do (same seed, fresh).
        for name in ("neck/kernel", "head/kernel"):
            np.testing.assert_array_equal(params[name], _flat(scratch.params)[name])
    assert not np.array_equal(_flat(scratch.params)["backbone/conv/kernel"],
                              src_params["conv/kernel"])
    with open(os.path.join(tmp_path, "transfer", compare.REPORT_FILE)) as f:
        report = f.read()
    assert (f"Source {helpers.TINY_MODEL} on synthetic; target {WRAPPED_MODEL} on "
            f"{TWO_CLASSES}, warm-started arms load the source into its `backbone`.") in report
    probe_summary = _json(os.path.join(rows[2]["workdir"], "summary.json"))
    assert probe_summary["init_from"]["submodule"] == "backbone"
    assert probe_summary["init_from"]["fresh_modules"] == ["head", "neck"]
    # The probe freezes the backbone: the source has no neck, so it stays random (said).
    assert probe_summary["init_from"]["frozen_fresh_modules"] == ["neck"]


@pytest.mark.parametrize(
    ("target_changes", "message"),
    [
        ({"init_from.submodule": None},
         f"transfer: target.model='{WRAPPED_MODEL}' is invalid; expected the source's model "
         f"'{helpers.TINY_MODEL}' (so that the pretrained weights fit the target network), or "
         "target.init_from.submodule naming the target module they fill"),
        ({"init_from.submodule": "neck"},
         "transfer: the source run's weights cannot warm-start run 8-finetune-s0: init_from: "
         "submodule='neck' is invalid; the new model needs params/neck/bias but the checkpoint "
         "at step 12 of"),
        # Every part of the module differs: the source's architecture, not one to exclude.
        ({"model_kwargs.features": 6},
         f"is invalid; its run (model '{helpers.TINY_MODEL}') does not fit module 'backbone' of "
         f"'{WRAPPED_MODEL}': 2 of the module's parts differ ('bn', 'conv'; first: "
         "params/backbone/bn/bias has shape (4,) in the checkpoint at step 12 of"),
        # Without the default exclude the source's classifier head would be dropped silently.
        ({"init_from.exclude": ()},
         "transfer: the source run's weights cannot warm-start run 8-finetune-s0: init_from: "
         "exclude=() is invalid; the checkpoint at step 12 of"),
    ],
)
def test_a_source_that_cannot_fill_the_target_is_refused_before_it_trains(
        tmp_path, monkeypatch, wrapped_model, target_changes, message):
    monkeypatch.setattr(sweep, "train_and_evaluate", pytest.fail)  # nothing may train
    target = _wrapped_target(**target_changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        _run(tmp_path, target=target, arms=("scratch", "finetune"))
    assert not os.path.exists(tmp_path / "transfer")


def test_an_arm_override_that_changes_the_model_is_checked_too(tmp_path, monkeypatch,
                                                               wrapped_model):
    monkeypatch.setattr(sweep, "train_and_evaluate", pytest.fail)
    with pytest.raises(ValueError, match=re.escape(
            "transfer: the source run's weights cannot warm-start run 8-linear_probe-s0: "
            "init_from: workdir=") + ".*" + re.escape(
            f"does not fit module 'backbone' of '{WRAPPED_MODEL}': 2 of the module's parts "
            "differ ('bn', 'conv'; first: params/backbone/bn/bias has shape (4,)")):
        _run(tmp_path, target=_wrapped_target(**{"model_kwargs.features": 4}),
             arm_overrides={"linear_probe": {"model_kwargs.features": 6}})


@pytest.mark.slow  # 8+ tiny training runs
def test_results_table_plot_and_report(tmp_path, capsys):
    target = _target()
    rows = compare.run_transfer(_source(), target, str(tmp_path / "t"), budgets=(4, None),
                                arms=("scratch", "linear_probe"), seeds=(0, 1))
    assert [(r["budget"], r["arm"], r["seed"]) for r in rows] == [
        (4, "scratch", 0), (4, "scratch", 1), (4, "linear_probe", 0), (4, "linear_probe", 1),
        (None, "scratch", 0), (None, "scratch", 1), (None, "linear_probe", 0),
        (None, "linear_probe", 1)]
    assert {r["trial_id"] for r in rows} >= {"4-scratch-s1", "None-linear_probe-s0"}
    for r in rows:
        summary = _json(os.path.join(r["workdir"], "summary.json"))
        config = _json(os.path.join(r["workdir"], "config.json"))
        assert r["status"] == "completed"
        assert r["num_train"] == (16 if r["budget"] == 4 else helpers.NUM_TRAIN)  # the fake's 4n
        assert r["final"] == summary["final_eval"]["top1"]
        assert (config["seed"], config["data"]["train_examples_per_class"]) == (
            r["seed"], r["budget"])
    out = os.path.join(tmp_path, "t")
    with open(os.path.join(out, compare.RESULTS_CSV)) as f:
        table = list(csv.DictReader(f))
    assert [float(t["final_top1"]) for t in table] == [r["final"] for r in rows]
    results = _json(os.path.join(out, compare.RESULTS_JSON))
    assert results["runs"] == rows and results["source"]["status"] == "completed"
    summary = results["summary"]
    assert [(s["budget"], s["arm"], s["completed"]) for s in summary] == [
        (4, "scratch", 2), (4, "linear_probe", 2), (None, "scratch", 2),
        (None, "linear_probe", 2)]
    for entry in summary:
        finals = [r["final"] for r in rows
                  if (r["budget"], r["arm"]) == (entry["budget"], entry["arm"])]
        assert entry["mean"] == pytest.approx(np.mean(finals), abs=1e-12)
        assert entry["std"] == pytest.approx(np.std(finals, ddof=1), abs=1e-12)
    assert summary[1]["gain_over_scratch"] == pytest.approx(
        summary[1]["mean"] - summary[0]["mean"], abs=1e-12)
    assert summary[0]["gain_over_scratch"] is None
    assert os.path.getsize(os.path.join(out, compare.PLOT_FILE)) > 1000
    with open(os.path.join(out, compare.REPORT_FILE)) as f:
        report = f.read()
    assert ("| budget | examples | from scratch | linear probe (frozen backbone weights, BN "
            "stats adapt) |") in report
    assert f"{summary[1]['mean']:.4f} ± {summary[1]['std']:.4f} " \
           f"({summary[1]['gain_over_scratch']:+.4f})" in report
    assert re.search(r"^- budget 4 \(16 examples\): best arm ", report, re.M)
    assert results["source"]["metric"] == "top1"
    assert (f"Source {helpers.TINY_MODEL} on synthetic; target {helpers.TINY_MODEL} on "
            f"{TWO_CLASSES}.") in report
    assert (f"Source run: completed, final eval top1 {results['source']['final']:.4f} after 12 "
            "steps on 64 training examples.") in report
    printed = capsys.readouterr().out
    assert re.search(r"^budget\s+examples\s+scratch\s+linear_probe$", printed, re.M)


def test_results_figure_has_one_line_per_arm_against_examples():
    table = compare.summarize([
        {"budget": b, "num_train": n, "arm": a, "seed": 0, "status": "completed", "final": f}
        for b, n in ((5, 25), (50, 250)) for a, f in (("scratch", 0.5), ("finetune", 0.9))
    ], "top1")
    fig = compare.results_figure(table, {"final": 0.99, "status": "completed"}, "top1")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "target training examples"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["from scratch", "fine-tune all layers"]
    bars = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar: (data line, caps, bars)
    assert list(bars["from scratch"].get_xdata()) == [25, 250]
    assert list(bars["fine-tune all layers"].get_ydata()) == [0.9, 0.9]


@pytest.mark.parametrize(
    ("budget_field", "budgets", "xs", "scale", "ticks"),
    [
        # Not a data size: every budget trains on the same 717 examples.
        ("num_train_steps", (20, 10), [10, 20], "log", []),
        ("optimizer.learning_rate", (0.0, 0.1), [0.0, 0.1], "linear", []),
        # Two slices of one size: one tick per budget, in run order.
        ("data.train_split", ("train[50:100]", "train[:50]"), [0, 1], "linear",
         ["train[50:100]", "train[:50]"]),
    ],
)
def test_budgets_of_one_size_are_plotted_at_their_own_values(budget_field, budgets, xs, scale,
                                                             ticks):
    """All budgets plotted at x = 717 examples made each arm's line a vertical segment."""
    table = compare.summarize([
        {"budget": b, "num_train": 717, "arm": a, "seed": 0, "status": "completed", "final": f}
        for b, finals in zip(budgets, ((0.8, 0.5), (0.9, 0.7)), strict=True)
        for a, f in zip(("scratch", "finetune"), finals, strict=True)
    ], "top1")
    fig = compare.results_figure(table, {"final": 0.97, "status": "completed"}, "top1",
                                 budget_field)
    (ax,) = fig.axes
    assert ax.get_xlabel() == f"budget: {budget_field}" and ax.get_xscale() == scale
    assert [t.get_text() for t in ax.get_xticklabels()][:len(ticks)] == ticks
    lines = {c.get_label(): c.lines[0] for c in ax.containers}
    finetune = dict(zip(budgets, (0.5, 0.7), strict=True))
    for label, line in lines.items():
        assert list(line.get_xdata()) == xs, label
    assert list(lines["fine-tune all layers"].get_ydata()) == [
        finetune[budgets[x] if ticks else x] for x in xs]


def _report(arms):
    table = compare.summarize([
        {"budget": 5, "num_train": 25, "arm": a, "seed": 0, "status": "completed", "final": 0.5}
        for a in arms], "top1")
    return compare.report_markdown(table, {"final": 0.99, "status": "completed", "steps": 10},
                                   "top1", compare.DEFAULT_BUDGET_FIELD)


def test_the_report_says_the_linear_probe_freezes_only_the_backbone_weights():
    """freeze='backbone' trains in train mode (tests/train/test_init_from.py): the report must
    not call the probe's backbone simply frozen."""
    report = _report(["scratch", "linear_probe"])
    assert "| from scratch | linear probe (frozen backbone weights, BN stats adapt) |" in report
    assert ("Linear probe: the backbone's weights stay fixed, but it trains in train mode "
            "(BatchNorm statistics re-estimated on the target data, dropout on; "
            "docs/training.md, `freeze`).") in report
    assert "Linear probe:" not in _report(["scratch", "finetune"])


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C after the step-4 checkpoint of the fine-tune run: the rerun leaves the source and
    scratch runs alone and continues fine-tuning from step 4 (init_from is then ignored)."""
    from cnnjax.train import loop

    save, calls = loop.Checkpointer.save, []
    # The source saves at step 12 only; the arms at 4, 8 and 12 (one eval, at 12).
    configs = {"source": helpers.at_the_end_only(_source()), "target": _target(eval_every_steps=12)}

    def save_then_interrupt(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        calls.append(step)
        if calls.count(4) == 2:  # scratch, then the fine-tune run save at step 4
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Checkpointer, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, **configs)
    monkeypatch.setattr(loop.Checkpointer, "save", save)
    out = os.path.join(tmp_path, "transfer")
    with open(os.path.join(out, compare.RESULTS_CSV)) as f:
        table = list(csv.DictReader(f))
    assert [(t["arm"], t["status"], t["steps"]) for t in table] == [
        ("scratch", "completed", "12"), ("finetune", "interrupted", "4"),
        ("linear_probe", "pending", "0")]
    finished = {name: helpers.finished_run_files(os.path.join(out, "trials", name))
                for name in ("source", "8-scratch-s0")}

    rows = _run(tmp_path, **configs)
    assert all(r["status"] == "completed" for r in rows)
    files = helpers.finished_run_files
    assert {n: files(os.path.join(out, "trials", n)) for n in finished} == finished
    resumed = _json(os.path.join(out, "trials", "8-finetune-s0", "summary.json"))
    assert resumed["resumed_from_step"] == 4 and resumed["step"] == 12
    assert _json(os.path.join(out, "trials", "8-finetune-s0", "trial.json"))["invocations"] == 2


@pytest.mark.slow  # 3 tiny training runs
def test_a_moved_transfer_dir_resumes_its_warm_started_run(tmp_path, monkeypatch):
    """`mv` of a transfer directory: its fine-tune run's checkpoints recorded the source's old
    absolute path as init_from.workdir, which the engine refused as an incompatible config (the
    run failed); the rerun under the new name resumes it from its step-4 checkpoint."""
    from cnnjax.train import loop

    save, calls = loop.Checkpointer.save, []

    def save_then_interrupt(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        calls.append(step)
        if calls.count(4) == 2:  # the source, then the fine-tune run save at step 4
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Checkpointer, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "old", arms=("finetune",))
    monkeypatch.setattr(loop.Checkpointer, "save", save)
    os.rename(tmp_path / "old", tmp_path / "new")

    rows = _run(tmp_path / "new", arms=("finetune",))
    assert [(r["arm"], r["status"], r["reason"]) for r in rows] == [("finetune", "completed", "")]
    run_dir = os.path.join(tmp_path, "new", "transfer", "trials", "8-finetune-s0")
    resumed = _json(os.path.join(run_dir, "summary.json"))
    assert resumed["resumed_from_step"] == 4 and resumed["step"] == 12
    assert _json(os.path.join(run_dir, "trial.json"))["invocations"] == 2


@pytest.mark.slow  # 8+ tiny training runs
def test_failed_run_is_recorded_the_rest_continue_and_a_rerun_retries_it(tmp_path, monkeypatch):
    real, failed_once = sweep.train_and_evaluate, []

    def fails_once(config, workdir):
        if workdir.endswith("linear_probe-s0") and not failed_once:
            failed_once.append(workdir)
            raise RuntimeError("out of memory (stand-in)")
        return real(config, workdir)

    monkeypatch.setattr(sweep, "train_and_evaluate", fails_once)
    rows = _run(tmp_path, budgets=(4, 8))
    assert [(r["trial_id"], r["status"]) for r in rows] == [
        ("4-scratch-s0", "completed"), ("4-finetune-s0", "completed"),
        ("4-linear_probe-s0", "failed"), ("8-scratch-s0", "completed"),
        ("8-finetune-s0", "completed"), ("8-linear_probe-s0", "completed")]
    assert rows[2]["reason"] == "RuntimeError: out of memory (stand-in)"
    with open(os.path.join(rows[2]["workdir"], "error.log")) as f:
        assert "Traceback" in f.read()
    before = helpers.finished_run_files(rows[1]["workdir"])
    rows = _run(tmp_path, budgets=(4, 8))
    assert all(r["status"] == "completed" for r in rows)
    assert _json(os.path.join(rows[2]["workdir"], "trial.json"))["invocations"] == 2
    assert helpers.finished_run_files(rows[1]["workdir"]) == before


def test_a_sigterm_between_runs_stops_the_comparison_before_the_next_run_trains(tmp_path,
                                                                                monkeypatch):
    """SIGTERM after the source run returned, before the first target run: no run held a
    handler, so the default killed the driver unrecorded (here a caller's handler took it and
    every target run trained). Now the next run is recorded interrupted before it trains."""
    import signal

    from cnnjax.train.preemption import TrainingInterrupted

    real, trained = sweep.train_and_evaluate, []

    def source_then_sigterm(config, workdir):
        trained.append(os.path.basename(workdir))
        summary = real(config, workdir)
        if len(trained) == 1:  # the source
            os.kill(os.getpid(), signal.SIGTERM)
        return summary

    monkeypatch.setattr(sweep, "train_and_evaluate", source_then_sigterm)
    with helpers.sigterm_fallback() as caught, pytest.raises(TrainingInterrupted):
        _run(tmp_path, source=helpers.at_the_end_only(_source()))
    assert caught == [] and len(trained) == 1
    first = _json(str(tmp_path / "transfer" / "trials" / "8-scratch-s0" / "trial.json"))
    assert first["status"] == "interrupted" and "SIGTERM" in first["reason"]


def test_failed_source_marks_the_pretrained_arms_not_run(tmp_path, monkeypatch):
    real = sweep.train_and_evaluate

    def source_fails(config, workdir):
        if workdir.endswith(os.sep + "source"):
            raise RuntimeError("disk full (stand-in)")
        return real(config, workdir)

    monkeypatch.setattr(sweep, "train_and_evaluate", source_fails)
    configs = {"source": helpers.at_the_end_only(_source()),
               "target": helpers.at_the_end_only(_target())}
    rows = _run(tmp_path, **configs)
    assert [(r["arm"], r["status"]) for r in rows] == [
        ("scratch", "completed"), ("finetune", "failed"), ("linear_probe", "failed")]
    assert rows[1]["reason"] == "not run: the source run failed"
    results = _json(os.path.join(tmp_path, "transfer", compare.RESULTS_JSON))
    assert results["source"]["status"] == "failed"
    assert results["source"]["reason"] == "RuntimeError: disk full (stand-in)"
    monkeypatch.setattr(sweep, "train_and_evaluate", real)
    rows = _run(tmp_path, **configs)  # the source is retried, then the arms that need it run
    assert all(r["status"] == "completed" for r in rows)


def test_a_diverged_source_says_to_change_it_not_to_rerun(tmp_path, monkeypatch):
    """A diverged source is final: the old message ("tracebacks in error.log; rerun the command
    to retry them") pointed at a file that does not exist and a rerun that changes nothing."""
    real = sweep.train_and_evaluate

    def source_diverges(config, workdir):
        if workdir.endswith(os.sep + "source"):
            config.optimizer.learning_rate = 1e30
        return real(config, workdir)

    monkeypatch.setattr(sweep, "train_and_evaluate", source_diverges)
    rows = _run(tmp_path, target=helpers.at_the_end_only(_target()))
    assert [(r["arm"], r["status"]) for r in rows] == [
        ("scratch", "completed"), ("finetune", "failed"), ("linear_probe", "failed")]
    source = os.path.join(tmp_path, "transfer", "trials", "source", "summary.json")
    assert _json(source)["status"] == "diverged"
    assert compare.failure_message(rows, str(tmp_path / "transfer")) == (
        f"the source run diverged ({source} says where), so 2 warm-started run(s) did not run, "
        "and a rerun will not retry it: change the source config (e.g. a lower learning rate) "
        "and use a new --transfer_dir")
    assert "rerun the command to retry" in compare.failure_message(
        [{**rows[1], "reason": "RuntimeError: out of memory"}], str(tmp_path / "transfer"))


def test_a_transfer_file_without_optional_fields_takes_the_defaults():
    """transfer_parts read `arms`, `seeds` and `budget_field` as required attributes (an
    AttributeError traceback); a missing required field is named."""
    file = config_dict.ConfigDict({"source": _source(), "target": _target(), "budgets": (8,)})
    source, target, kwargs = compare.transfer_parts(file)
    assert source is file.source and target is file.target
    assert kwargs == {"budgets": (8,), "budget_field": "data.train_examples_per_class",
                      "arms": compare.ARMS, "seeds": (0,), "arm_overrides": None,
                      "metric": None}
    del file["budgets"], file["target"]
    with pytest.raises(ValueError, match=r"^transfer: file='a config without target, budgets' "
                                         r"is invalid; expected the fields \['source', "
                                         r"'target', 'budgets'\]"):
        compare.transfer_parts(file)


def _bad(**changes):
    target = changes.pop("target", None) or _target()
    kwargs = {"budgets": (8,), **changes}
    return target, kwargs


@pytest.mark.parametrize(
    ("target_changes", "kwargs", "message"),
    [
        ({}, {"arms": ("scratch", "probe")},
         "transfer: arms=('scratch', 'probe') is invalid; expected a non-empty list of distinct "
         "arms from ['scratch', 'finetune', 'linear_probe']."),
        ({}, {"arms": ()}, "transfer: arms=() is invalid"),
        ({}, {"seeds": (0, 0)}, "transfer: seeds=(0, 0) is invalid; expected a non-empty list "
                                "of distinct integers >= 0"),
        ({}, {"budgets": ()}, "transfer: budgets=() is invalid; expected a non-empty list of "
                              "values for 'data.train_examples_per_class'."),
        ({}, {"budgets": (4, 4)}, "transfer: budgets=[4, 4] is invalid; expected distinct values"),
        ({}, {"budget_field": "data.examples_per_class"},
         "transfer: budget_field='data.examples_per_class' / budgets=(8,) do not fit the target "
         "config: sweep: parameters['data.examples_per_class'].field="),
        ({}, {"budget_field": "freeze"},
         "transfer: budget_field='freeze' is invalid; the comparison sets it itself; expected "
         "a target field such as 'data.train_examples_per_class' or 'data.train_split'."),
        ({}, {"metric": "acc"}, "transfer: metric='acc' is invalid; expected one of ['loss', "
                                "'top1', 'top5'] (the eval metrics of "
                                "config.task='classification')."),
        ({}, {"metric": "map50"}, "transfer: metric='map50' is invalid; expected one of ['loss', "
                                  "'top1', 'top5'] (the eval metrics of "
                                  "config.task='classification')."),
        ({}, {"arm_overrides": {"finetune": {"freeze": "backbone"}}},
         "transfer: arm_overrides['finetune']='freeze' is invalid; the comparison sets 'freeze' "
         "itself"),
        ({}, {"arm_overrides": {"finetune": {"data.classes": (0, 1)}}},
         "transfer: arm_overrides['finetune']='data.classes' is invalid; every arm trains and "
         "is evaluated on the same data"),
        # A misspelt field or a value of the wrong type in a transfer file was reported as
        # the sweep's parameters, naming neither arm_overrides nor budgets.
        ({}, {"arm_overrides": {"finetune": {"optimizer.lr": 0.005}}},
         "transfer: arm_overrides['finetune'] does not fit the target config: sweep: "
         "parameters['optimizer.lr'].field='optimizer.lr' is invalid; the base config has no "
         "such field"),
        ({}, {"arm_overrides": {"finetune": {"optimizer.learning_rate": "fast"}}},
         "transfer: arm_overrides['finetune'] does not fit the target config: sweep: "
         "parameters['optimizer.learning_rate'] value='fast' is invalid; the base config "
         "refuses it"),
        ({}, {"budgets": ("5",)},
         "transfer: budgets value '5' does not fit the target config's "
         "data.train_examples_per_class: sweep: parameters['data.train_examples_per_class'] "
         "value='5' is invalid; the base config refuses it"),
        ({}, {"arm_overrides": {"probe": {}}},
         "transfer: arm_overrides='probe' is invalid; expected an arm of ['scratch', "
         "'finetune', 'linear_probe']."),
        # A name that is no arm is refused even when it could be one left out by `arms`.
        ({}, {"arms": ("scratch",), "arm_overrides": {"probe": {}}},
         "transfer: arm_overrides='probe' is invalid; expected an arm of ['scratch', "
         "'finetune', 'linear_probe']."),
        ({}, {"arms": ("scratch",),
              "arm_overrides": {"finetune": {"optimizer.lr": 0.005}}},
         "transfer: arm_overrides['finetune'] does not fit the target config: sweep: "
         "parameters['optimizer.lr'].field='optimizer.lr' is invalid"),
        # The source keeps no weight average: every such run would fail once the source trained.
        ({}, {"arm_overrides": {"linear_probe": {"init_from.ema": True}}},
         "transfer: arm_overrides['linear_probe'].init_from.ema=True is invalid; the source "
         "config keeps no weight average (source.ema.decay is None), so its checkpoints hold "
         "none to load; set source.ema.decay (e.g. 0.999) or drop the override."),
        ({}, {"arm_overrides": {"finetune": {"optimizer.learning_rate": 0.0}}},
         "transfer: run 8-finetune-s0 (budgets value 8 for data.train_examples_per_class, arm "
         "'finetune', seed 0) has an invalid config: optimizer: learning_rate=0.0 is invalid"),
        ({"freeze": "backbone"}, {}, "transfer: target.freeze='backbone' is invalid; expected "
                                     "None: each arm sets it"),
        ({"model": "resnet20_cifar"}, {}, "transfer: target.model='resnet20_cifar' is invalid; "
                                          f"expected the source's model '{helpers.TINY_MODEL}' "
                                          "(so that the pretrained weights fit the target "
                                          "network), or target.init_from.submodule"),
        ({"global_batch_size": 128}, {},
         "transfer: global_batch_size=128 is invalid; run 8-scratch-s0 has 32 training "
         "examples; expected a global batch of at most that many (lower it or raise the "
         "budget)."),
        ({}, {"arm_overrides": {"linear_probe": {"global_batch_size": 96}}},
         "transfer: global_batch_size=96 is invalid; run 8-linear_probe-s0 has 32 training "
         "examples"),
        ({"num_train_steps": 5, "schedule.name": "warmup_cosine", "schedule.warmup_steps": 5},
         {}, "transfer: the target config is invalid: schedule: warmup_steps=5 is invalid; "
             "expected 0 <= warmup_steps < num_train_steps=5."),
        ({"schedule.name": "warmup_cosine"},
         {"arm_overrides": {"linear_probe": {"schedule.warmup_steps": 12}}},
         "transfer: run 8-linear_probe-s0 (budgets value 8 for data.train_examples_per_class, "
         "arm 'linear_probe', seed 0) has an invalid config: schedule: warmup_steps=12 is "
         "invalid; expected 0 <= warmup_steps < num_train_steps=12."),
        ({"optimizer.learning_rate": -1.0}, {},
         "transfer: the target config is invalid: optimizer: learning_rate=-1.0 is invalid"),
    ],
)
def test_bad_arguments_fail_before_anything_is_written(tmp_path, target_changes, kwargs,
                                                       message, monkeypatch):
    monkeypatch.setattr(sweep, "train_and_evaluate", pytest.fail)  # nothing may train
    with pytest.raises(ValueError, match=re.escape(message)):
        _run(tmp_path, target=_target(**target_changes), **kwargs)
    assert not os.path.exists(tmp_path / "transfer")


def test_an_ema_override_needs_a_source_that_keeps_an_average_on_the_login_node_too(tmp_path):
    """launch.submit's pre-check (`check_transfer`) refuses what run_transfer does; with a
    source that keeps a weight average the same override is a valid plan."""
    overrides = {"finetune": {"init_from.ema": True}}
    with pytest.raises(ValueError, match=re.escape(
            "transfer: arm_overrides['finetune'].init_from.ema=True is invalid; the source "
            "config keeps no weight average")):
        compare.check_transfer(_source(), _target(), str(tmp_path), budgets=(8,),
                               arm_overrides=overrides)
    source = _source()
    source.ema.decay = 0.9
    configs = compare.check_transfer(source, _target(), str(tmp_path), budgets=(8,),
                                     arm_overrides=overrides)
    assert [c.init_from.ema for c in configs.values()] == [False, False, True, False]
    plan = compare.TransferPlan(source, _target(), str(tmp_path), compare.DEFAULT_BUDGET_FIELD,
                                (8,), compare.ARMS, (0,), overrides, None)
    assert [run["config"].init_from.ema for run in plan.runs] == [False, True, False]


def test_overrides_of_arms_left_out_are_kept_but_not_applied(tmp_path, monkeypatch, caplog):
    """A transfer file's override of an arm that `arms` (e.g. narrowed on the command line)
    leaves out: no run gets it, and transfer.json records it, so the same file with other arms
    resumes the same directory and one with other overrides is refused."""
    def engine_down(config, workdir):
        raise RuntimeError("stand-in: nothing trains")

    monkeypatch.setattr(sweep, "train_and_evaluate", engine_down)
    overrides = {"finetune": {"optimizer.learning_rate": 0.005}}
    with caplog.at_level("INFO"):
        rows = _run(tmp_path, arms=("scratch",), arm_overrides=overrides)
    assert [r["trial_id"] for r in rows] == ["8-scratch-s0"]
    assert ("transfer: arm_overrides of ['finetune'] not applied: arms=['scratch'] does not "
            "run them") in caplog.text
    out = tmp_path / "transfer"
    scratch = _json(out / "trials" / "8-scratch-s0" / "trial.json")
    assert scratch["overrides"] == {"data.train_examples_per_class": 8, "seed": 0}
    assert _json(out / compare.TRANSFER_FILE)["arm_overrides"] == overrides
    rows = _run(tmp_path, arms=("scratch", "finetune"), arm_overrides=overrides)
    finetune = _json(out / "trials" / "8-finetune-s0" / "trial.json")
    assert finetune["overrides"]["optimizer.learning_rate"] == 0.005
    with pytest.raises(ValueError, match=re.escape(
            f"transfer: transfer_dir={str(out)!r} was made with "
            "arm_overrides={'finetune': {'optimizer.learning_rate': 0.005}}, now {}")):
        _run(tmp_path, arms=("scratch",))


def test_a_transfer_dir_another_driver_holds_is_refused_untouched(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "train_and_evaluate", pytest.fail)  # nothing may train
    with (helpers.locked_by_another_process(tmp_path / "transfer"),
          pytest.raises(ValueError, match=r"^transfer_dir: .* is in use by another run .*"
                                          r"pass a different --transfer_dir\.$")):
        _run(tmp_path)
    assert os.listdir(tmp_path / "transfer") == ["run.lock"]


def test_transfer_dir_of_different_configs_is_refused(tmp_path, monkeypatch):
    def engine_down(config, workdir):
        raise RuntimeError("stand-in: nothing trains")

    monkeypatch.setattr(sweep, "train_and_evaluate", engine_down)
    rows = _run(tmp_path)  # every run failed or was not run; transfer.json is written
    assert [r["status"] for r in rows] == ["failed"] * 3
    out = str(tmp_path / "transfer")
    with pytest.raises(ValueError, match=re.escape(
            f"transfer: transfer_dir={out!r} was made with a different target config "
            "(num_train_steps: 12 -> 20); use a new --transfer_dir")):
        _run(tmp_path, target=_target(num_train_steps=20))
    with pytest.raises(ValueError, match=re.escape(
            f"transfer: transfer_dir={out!r} was made with arm_overrides={{}}, now "
            "{'finetune': {'optimizer.learning_rate': 0.01}}")):
        _run(tmp_path, arm_overrides={"finetune": {"optimizer.learning_rate": 0.01}})
    # More budgets, seeds or arms, and runtime-only fields, may change between reruns.
    _run(tmp_path, budgets=(8, 16), seeds=(0, 1), target=_target(progress_bar=True))


def test_budget_slugs_name_directories():
    assert compare.budget_slug(10) == "10"
    assert compare.budget_slug("train[:10%]") == "train_10pct"
    # Slices that share numbers but not positions get different directories.
    slugs = [compare.budget_slug(b) for b in ("train[:10%]", "train[10%:]", "train[:50]",
                                             "train[50:]", "train[-50:]", "train[10%:20%]")]
    assert slugs == ["train_10pct", "train_10pct_to", "train_50", "train_50_to",
                     "train_minus50_to", "train_10pct_to_20pct"]
    assert compare.budget_slug(None) == "None"
    assert compare.budget_slug(0.5) == "0.5"


def test_arm_overrides_apply_to_their_arm_only_and_may_be_nested(tmp_path):
    nested = config_dict.ConfigDict({"finetune": {"optimizer": {"learning_rate": 0.005}},
                                     "linear_probe": {"num_train_steps": 6}})
    for overrides in (nested, {"finetune": {"optimizer.learning_rate": 0.005},
                               "linear_probe": {"num_train_steps": 6}}):
        plan = compare.TransferPlan(_source(), _target(), str(tmp_path),
                                    "data.train_examples_per_class", (3,),
                                    compare.ARMS, (0,), overrides, "top1")
        assert plan.overrides == {"finetune": {"optimizer.learning_rate": 0.005},
                                  "linear_probe": {"num_train_steps": 6}}
        configs = {run["arm"]: run["config"] for run in plan.runs}
        assert [configs[a].optimizer.learning_rate for a in compare.ARMS] == [0.05, 0.005, 0.05]
        assert [configs[a].num_train_steps for a in compare.ARMS] == [12, 12, 6]
        assert [configs[a].freeze for a in compare.ARMS] == [None, None, "backbone"]
        assert configs["scratch"].init_from.workdir is None
        assert configs["finetune"].init_from.workdir == os.path.join(
            os.path.abspath(tmp_path), "trials", "source")


def test_gain_over_scratch_pairs_seeds():
    """A failed scratch seed drops that seed from the gain; the means stay per arm."""
    rows = [{"budget": 5, "num_train": 25, "arm": arm, "seed": seed, "status": status,
             "final": final}
            for arm, seed, status, final in (
                ("scratch", 0, "completed", 0.9), ("scratch", 1, "diverged", None),
                ("finetune", 0, "completed", 0.9), ("finetune", 1, "completed", 0.7))]
    scratch, finetune = compare.summarize(rows, "top1")
    assert finetune["mean"] == pytest.approx(0.8) and scratch["mean"] == pytest.approx(0.9)
    assert finetune["paired_seeds"] == 1 and finetune["gain_over_scratch"] == pytest.approx(0.0)
    assert scratch["gain_over_scratch"] is None


def test_an_unset_metric_takes_the_targets_best_metric_and_its_mode(tmp_path):
    target = _target()
    target.best_metric, target.best_mode = "loss", "min"
    plan = compare.TransferPlan(_source(), target, str(tmp_path), "data.train_examples_per_class",
                                [8], ["scratch"], [0], {}, None)
    assert (plan.metric, plan.mode) == ("loss", "min")


def test_gain_over_scratch_is_positive_when_a_loss_falls():
    """For a loss, lower is better: fine-tuning that cuts it from 1.2 to 0.4 gains +0.8."""
    rows = [{"budget": 5, "num_train": 25, "arm": arm, "seed": 0, "status": "completed",
             "final": final} for arm, final in (("scratch", 1.2), ("finetune", 0.4))]
    _, finetune = compare.summarize(rows, "loss")
    assert finetune["gain_over_scratch"] == pytest.approx(0.8)
    _, finetune = compare.summarize(rows, "ema_loss")
    assert finetune["gain_over_scratch"] == pytest.approx(0.8)


def _finals_rows(finals):
    """summarize's rows, all completed, from `{(budget, num_train, arm): [final per seed]}`."""
    return [{"budget": budget, "num_train": num_train, "arm": arm, "seed": seed,
             "status": "completed", "final": final}
            for (budget, num_train, arm), values in finals.items()
            for seed, final in enumerate(values)]


def test_the_tables_std_is_the_sample_std_over_seeds():
    """The spread over seeds is the sample std, as the report says. Unequal finals: every run
    of `test_results_table_plot_and_report` ends at top-1 1.0, where any std is 0."""
    finals = {(4, 8, "scratch"): [0.6, 0.8, 0.75], (4, 8, "finetune"): [0.9, 0.7]}
    table = compare.summarize(_finals_rows(finals), "top1")
    for entry, values in zip(table, finals.values(), strict=True):
        assert entry["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert entry["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)


def test_each_budgets_gain_is_over_scratch_at_that_budget_seed_by_seed():
    """Two budgets whose scratch runs score differently: every arm's gain is the mean over
    seeds of its final minus scratch's final of the same seed at the same budget."""
    finals = {(4, 8, "scratch"): [0.50, 0.40], (4, 8, "finetune"): [0.70, 0.65],
              (4, 8, "linear_probe"): [0.55, 0.35],
              (None, 64, "scratch"): [0.80, 0.90], (None, 64, "finetune"): [0.85, 0.88],
              (None, 64, "linear_probe"): [0.60, 0.95]}
    table = compare.summarize(_finals_rows(finals), "top1")
    assert [(e["budget"], e["arm"]) for e in table] == [(b, a) for b, _, a in finals]
    for entry in table:
        mine = finals[(entry["budget"], entry["num_train"], entry["arm"])]
        scratch = finals[(entry["budget"], entry["num_train"], "scratch")]
        if entry["arm"] == "scratch":
            assert entry["gain_over_scratch"] is None
            continue
        expected = np.mean([m - s for m, s in zip(mine, scratch, strict=True)])
        assert entry["paired_seeds"] == 2
        assert entry["gain_over_scratch"] == pytest.approx(expected, abs=1e-12), entry


def test_the_report_names_the_arm_with_the_lowest_loss_as_best():
    """For a loss (mode min) the best arm at each budget is the one with the lowest mean."""
    finals = {(4, 8, "scratch"): [1.2, 1.0], (4, 8, "finetune"): [0.4, 0.6],
              (4, 8, "linear_probe"): [0.7, 0.9],
              (None, 64, "scratch"): [0.3, 0.2], (None, 64, "finetune"): [0.5, 0.4],
              (None, 64, "linear_probe"): [0.6, 0.8]}
    table = compare.summarize(_finals_rows(finals), "loss")
    source = {"status": "completed", "final": 1.0, "metric": "loss", "steps": 10,
              "num_train": 64}
    report = compare.report_markdown(table, source, "loss", compare.DEFAULT_BUDGET_FIELD)
    best = [line for line in report.splitlines() if line.startswith("- budget")]
    assert best == [
        "- budget 4 (8 examples): best arm fine-tune all layers (0.5000)",
        "- budget None (64 examples): best arm from scratch (0.2500)"]


def test_a_misspelt_exclude_of_the_target_is_refused_before_the_source_trains(tmp_path,
                                                                               monkeypatch):
    """The engine refuses an init_from.exclude name no module has when a warm-started arm
    starts; the comparison checks it before the source's pretraining, as it does the shapes."""
    monkeypatch.setattr(sweep, "train_and_evaluate", pytest.fail)  # nothing may train
    target = _target(**{"init_from.exclude": ("head", "cnov")})
    with pytest.raises(ValueError, match=re.escape(
            "transfer: the source run's weights cannot warm-start run 8-finetune-s0: init_from: "
            "exclude=('head', 'cnov') is invalid; 'cnov' names no module of model")):
        _run(tmp_path, target=target, arms=("scratch", "finetune"))
    assert not os.path.exists(tmp_path / "transfer")

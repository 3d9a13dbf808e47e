"""`cnnjax.train.trained`: a run's workdir loaded as a model, and evaluated by the engine's eval."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.train import loop, trained
from cnnjax.train.checkpoint import SourceCheckpoints
from cnnjax.train.trained import (
    calibrate_run,
    check_temperature_split,
    classifier_logits,
    evaluate_trained,
    load_trained,
    plot_predictions,
    predictions,
)
from tests.train import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 12-step run (evals at 6 and 12; checkpoints saved at 4, 6, 8, 12 and kept at
    6, 8, 12: the last 3, which hold the best), trained once for the module: the tests only read
    it (those that damage a checkpoint damage a copy; `test_the_best_checkpoint_...` checks that
    evaluating writes nothing there)."""
    workdir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        helpers.install_fake_pipeline(monkeypatch)
        loop.train_and_evaluate(helpers.tiny_config(), str(workdir))
    return workdir


def _evals(workdir):
    return {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text()
                                          .splitlines()) if r["split"] == "eval"}


def _listing(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns)
                  for p in directory.rglob("*"))


def test_the_best_checkpoint_evaluates_to_the_eval_the_run_logged_at_its_step(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    run = load_trained(str(run_dir))
    assert (run.step, run.how) == (summary["best"]["step"], "best")
    before = _listing(run_dir)
    result = evaluate_trained(str(run_dir))
    assert _listing(run_dir) == before  # read only: nothing written, moved or deleted
    logged = _evals(run_dir)[run.step]
    assert (result["step"], result["checkpoint"], result["split"]) == (run.step, "best", "eval")
    for name in ("loss", "top1", "top5", "num_examples"):
        np.testing.assert_allclose(result[name], logged[name], rtol=1e-6, err_msg=name)


def test_a_requested_step_and_apply(run_dir):
    steps = SourceCheckpoints(str(run_dir)).steps
    assert 6 in steps  # an eval step: the logged eval is the reference
    result = evaluate_trained(str(run_dir), step=6)
    assert (result["step"], result["checkpoint"]) == (6, "requested")
    np.testing.assert_allclose(result["top1"], _evals(run_dir)[6]["top1"], rtol=1e-6)
    run = load_trained(str(run_dir), step=6, num_devices=1)
    assert run.config.num_devices == 1
    images = jnp.asarray(np.random.default_rng(0).normal(size=(5, *helpers.IMAGE_SHAPE)),
                         jnp.float32)
    logits = run.apply(images)
    assert logits.shape == (5, helpers.NUM_CLASSES) and bool(jnp.isfinite(logits).all())
    np.testing.assert_array_equal(run.apply(images), logits)  # inference mode: deterministic


def test_predictions_cover_the_split_once_and_agree_with_the_engines_top1(run_dir, tmp_path):
    run = load_trained(str(run_dir))
    seen = list(predictions(run, batch_size=10))  # 27 eval examples: the last batch is padded
    assert [len(b["label"]) for b, _ in seen] == [10, 10, 7]
    assert all(logits.shape == (len(b["label"]), helpers.NUM_CLASSES) for b, logits in seen)
    result = evaluate_trained(str(run_dir))
    plotted = plot_predictions(run, str(tmp_path / "c.png"))
    matrix = np.array(plotted["confusion_matrix"])
    assert matrix.sum() == helpers.NUM_EVAL
    np.testing.assert_allclose(np.trace(matrix) / matrix.sum(), result["top1"], rtol=1e-6)
    assert len(plotted["per_class_top1"]) == helpers.NUM_CLASSES
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_a_class_without_examples_has_no_top1_and_the_record_is_strict_json(run_dir, tmp_path):
    """`per_class_top1` held NaN for a class the split lacks, which `json` writes as a bare
    `NaN` that strict JSON readers refuse; it is None (null), as empty calibration bins are."""
    import json

    run = load_trained(str(run_dir))
    logits = np.eye(helpers.NUM_CLASSES)[[0, 0, 1]] * 5.0  # examples of classes 0 and 1 only
    plotted = plot_predictions(run, str(tmp_path / "c.png"), classified=(logits, [0, 1, 1]))
    assert plotted["per_class_top1"] == [1.0, 0.5] + [None] * (helpers.NUM_CLASSES - 2)
    json.dumps(plotted, allow_nan=False)


def test_a_class_subset_run_reports_its_rows_dataset_labels(run_dir, tmp_path):
    """With `data.classes` the model's class i is dataset label classes[i]: the JSON says so
    (`classes`) and the plot's ticks show those labels (they showed 0..C-1 before)."""
    import dataclasses

    run = load_trained(str(run_dir))
    logits, labels = classifier_logits(run, batch_size=10)
    plain = plot_predictions(run, str(tmp_path / "a.png"), classified=(logits, labels))
    assert plain["classes"] == list(range(helpers.NUM_CLASSES))
    config = run.config.copy_and_resolve_references()
    config.data.classes = tuple(range(7, 7 + helpers.NUM_CLASSES))
    subset = plot_predictions(dataclasses.replace(run, config=config), str(tmp_path / "b.png"),
                              classified=(logits, labels))
    assert subset["classes"] == list(range(7, 7 + helpers.NUM_CLASSES))
    assert subset["confusion_matrix"] == plain["confusion_matrix"]


def test_calibration_shares_one_pass_with_the_confusion_matrix(run_dir, tmp_path, monkeypatch):
    """`classifier_logits` is the logits `predictions` yields; the record's NLL and top-1 are the
    engine's eval loss and top-1 (1e-5: the engine sums float32), and the confusion matrix drawn
    from the shared logits is the one `plot_predictions` computes itself."""
    from cnnjax.analysis import calibration as cal

    run = load_trained(str(run_dir))
    logits, labels = classifier_logits(run, batch_size=10)
    np.testing.assert_array_equal(logits, np.concatenate([o for _, o in predictions(run)]))
    assert labels.shape == (helpers.NUM_EVAL,)
    engine = evaluate_trained(str(run_dir))
    record = calibrate_run(run, logits, labels, n_bins=10)
    np.testing.assert_allclose(record["nll"], engine["loss"], rtol=1e-5)
    np.testing.assert_allclose(record["top1"], engine["top1"], rtol=1e-6)
    assert record["n_bins"] == len(record["bins"]) == 10 and "temperature_scaling" not in record
    assert record["ece"] == cal.expected_calibration_error(logits, labels, 10)
    shared = plot_predictions(run, str(tmp_path / "a.png"), classified=(logits, labels))
    assert shared["confusion_matrix"] == plot_predictions(run, str(tmp_path / "b.png"))[
        "confusion_matrix"]

    # The fake pipeline serves the same examples for any split, all classified correctly here:
    # no temperature minimizes their NLL, which is refused with the split's name.
    with pytest.raises(ValueError, match=r"^evaluate: temperature_split='train' is invalid; no "
                                         r"temperature fits it: fit_temperature: labels='27 "
                                         r"examples all classified correctly' is invalid"):
        calibrate_run(run, logits, labels, temperature_split="train")
    with pytest.raises(ValueError, match=r"^--temperature_split='train' is invalid; no "
                                         r"temperature fits it: "):  # as a command names it
        calibrate_run(run, logits, labels, temperature_split="train", name="--temperature_split")
    # A fitting split with mistakes (some labels moved): T is fitted to it and the evaluated
    # logits are scored at that T.
    real = trained.classifier_logits

    def with_mistakes(run, split=None, batch_size=64):
        fit_logits, fit_labels = real(run, split, batch_size)
        return fit_logits, np.where(np.arange(len(fit_labels)) % 5 == 0, (fit_labels + 1) % 4,
                                    fit_labels)

    monkeypatch.setattr(trained, "classifier_logits", with_mistakes)
    scaled = calibrate_run(run, logits, labels, n_bins=10, temperature_split="train",
                           batch_size=8)["temperature_scaling"]
    fit_logits, fit_labels = with_mistakes(run, "train", batch_size=8)  # as calibrate_run read it
    assert scaled["temperature"] == cal.fit_temperature(fit_logits, fit_labels) > 1
    assert (scaled["split"], scaled["same_split"], scaled["num_fit_examples"]) == (
        "train", False, helpers.NUM_EVAL)
    assert scaled["ece"] == cal.expected_calibration_error(logits, labels, 10,
                                                           scaled["temperature"])
    assert scaled["top1"] == record["top1"] and scaled["fit_nll_after"] < scaled["fit_nll_before"]


def test_the_temperature_split_is_checked_before_anything_compiles(run_dir):
    import ml_collections

    from cnnjax.train.trained import TrainedRun

    run = load_trained(str(run_dir))
    assert check_temperature_split(run, None, None) == (False, [])
    assert check_temperature_split(run, None, "train") == (False, [])
    for fitted, evaluated in ((" eval", None), ("eval", "eval[:50%]"), ("eval[:50%]", None)):
        with pytest.raises(ValueError, match=rf"^evaluate: temperature_split="
                                             rf"{re.escape(repr(fitted))} is invalid; it holds "
                                             r"the evaluated split 'eval.*', so "
                                             r"T would be fitted to the very examples it is "
                                             r"scored on"):
            check_temperature_split(run, evaluated, fitted)
    same, warnings = check_temperature_split(run, "eval", "eval", allow_same_split=True)
    assert same and warnings == ["T is fitted on examples of the evaluated split 'eval': its "
                                 "calibration after scaling is optimistic "
                                 "(allow_same_split=True)"]
    with pytest.raises(ValueError, match=r", or allow_same_split=True for that oracle on "
                                         r"purpose\.$"):
        check_temperature_split(run, None, "eval")
    with pytest.raises(ValueError, match=r"^evaluate: temperature_split='' is invalid; expected "
                                         r"a tfds split"):
        check_temperature_split(run, None, "")
    trained_on_all = TrainedRun(run.workdir, ml_collections.ConfigDict(
        {**run.config.to_dict(), "data": {"name": "synthetic", "train_split": "train"}}),
        run.model, run.variables, run.step, run.how)
    same, warnings = check_temperature_split(trained_on_all, None, "train[90%:]")
    assert not same and len(warnings) == 1 and warnings[0].startswith(
        "evaluate: temperature_split='train[90%:]' shares examples with the run's training split "
        "'train'")
    trained_on_a_slice = TrainedRun(run.workdir, ml_collections.ConfigDict(
        {**run.config.to_dict(), "data": {"name": "synthetic", "train_split": "train[:90%]"}}),
        run.model, run.variables, run.step, run.how)
    assert check_temperature_split(trained_on_a_slice, None, "train")[1][0].startswith(
        "evaluate: temperature_split='train' shares examples with the run's training split "
        "'train[:90%]'")
    assert check_temperature_split(trained_on_a_slice, None, "train[90%:]") == (False, [])
    detector = TrainedRun("w", ml_collections.ConfigDict({"task": "detection"}), model=None,
                          variables={}, step=1, how="best")
    with pytest.raises(ValueError, match=r"^evaluate: temperature_split='train' is invalid; "
                                         r"temperature scaling is for classifiers, and this is a "
                                         r"detection run"):
        check_temperature_split(detector, None, "train")
    with pytest.raises(ValueError, match=r"^classifier_logits: run='w' is invalid; expected a "
                                         r"classifier's run, not a detection run"):
        classifier_logits(detector)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_data_dir_error_is_not_reported_as_the_splits(monkeypatch):
    """check_split rewrote any `data: <field>=... is invalid; <why>` as the split's error:
    `--split='test' is invalid; cnnjax generates 'digits' there on first use, ...`."""
    from cnnjax.train.trained import TrainedRun, check_split
    from experiments.configs import lenet5_digits

    monkeypatch.undo()  # the real data pipeline, not this module's stand-in
    config = lenet5_digits.get_config()
    config.data.data_dir = "/proc/cnnjax_test/t"  # nothing can be created there, even by root
    run = TrainedRun("w", config, model=None, variables={}, step=1, how="best")
    with pytest.raises(ValueError, match=r"^data: data_dir='/proc/cnnjax_test/t' is invalid; "
                                         r"cnnjax generates 'digits' there on first use"):
        check_split(run, "test", "--split")


def test_bad_workdirs_and_steps_are_named(run_dir, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match=r"^load_trained: workdir=.* is invalid; expected the "
                                         r"--workdir of a training run \(no readable config"):
        load_trained(str(empty))
    with pytest.raises(ValueError, match=r"^load_trained: step=5 is invalid; .* has checkpoints "
                                         r"at steps \[.*\]"):
        load_trained(str(run_dir), step=5)
    with pytest.raises(ValueError, match=r"^load_trained: step=0 is invalid"):
        load_trained(str(run_dir), step=0)
    with pytest.raises(ValueError, match=r"num_devices=-1 is invalid"):
        load_trained(str(run_dir), num_devices=-1)
    with pytest.raises(ValueError, match=r"^evaluate: split='' is invalid"):
        evaluate_trained(str(run_dir), split="")
    converted = tmp_path_factory.mktemp("converted")
    (converted / "config.json").write_text(json.dumps({"model": "resnet18"}))
    (converted / "summary.json").write_text(json.dumps({"status": "converted"}))
    with pytest.raises(ValueError, match=r"it holds converted torchvision weights, not a "
                                         r"training run: pass it as --config.init_from.workdir"):
        load_trained(str(converted))


def test_a_run_without_a_weight_average_is_refused_for_python_and_for_the_flag(run_dir):
    """`load_trained(ema=True)` tells a Python caller to pass ema=False; the commands word the
    same refusal for their --ema flag (`flag_message`)."""
    with pytest.raises(trained.NoWeightAverageError) as caught:
        load_trained(str(run_dir), ema=True)
    reason = f"the run in {str(run_dir)!r} kept no weight average (its config.ema.decay is None)"
    assert isinstance(caught.value, ValueError) and str(caught.value) == (
        f"load_trained: ema=True is invalid; {reason}; load its weights with ema=False.")
    assert caught.value.flag_message() == (
        f"--ema is invalid; {reason}; drop --ema to use its trained weights.")


def test_the_command_says_what_is_wrong_in_one_line(tmp_path):
    """Flag errors are one line naming the flag, before the run loads (nothing compiles): the
    workdir holds no run, so each flag's own message is the one printed."""
    from tests.commands import run_commands

    no_run, png_output, no_bins, no_batch, no_split, no_fit_split = run_commands(
        [("experiments.evaluate", f"--workdir={tmp_path}", *flag) for flag in (
            # The plot goes to <output stem>.png: an --output of that name would be
            # overwritten by the JSON, so it is refused before anything loads.
            (), ("--output=results/eval.png",), ("--n_bins=0",), ("--eval_batch_size=0",),
            ("--split= ",), ("--temperature_split=",))],
        # JAX and the engine, imported once (experiments.evaluate imports them only once running)
        preimport=["cnnjax.train.trained"])
    for result in (no_run, png_output, no_bins, no_batch, no_split, no_fit_split):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    # the flag the user typed, not load_trained's argument
    assert no_run.stderr.strip().splitlines()[-1].startswith(
        f"error: --workdir={str(tmp_path)!r} is invalid; expected the --workdir of a training "
        "run")
    assert png_output.stderr.strip().splitlines()[-1] == (
        "error: --output='results/eval.png' is invalid; expected a JSON file path (the plot is "
        "written beside it, with the suffix .png)")
    assert no_bins.stderr.strip().splitlines()[-1] == (
        "error: --n_bins=0 is invalid; expected at least 1 (Guo et al. use 15)")
    # named as the flag (evaluate_run's eval_batch_size was refused only after the run loaded)
    assert no_batch.stderr.strip().splitlines()[-1] == (
        "error: --eval_batch_size=0 is invalid; expected a positive batch size (or leave it out: "
        "the run's eval batch size)")
    # an empty split is refused before the run loads, named as the flag
    for result, flag in ((no_split, "--split=' '"), (no_fit_split, "--temperature_split=''")):
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: {flag} is invalid; expected a tfds split such as 'test'")


def test_a_proposal_trained_detector_refuses_detect_without_proposals():
    """Without its proposals such a detector would silently score dense windows instead."""
    import ml_collections

    from cnnjax.train.trained import TrainedRun

    config = ml_collections.ConfigDict(
        {"data": {"proposals": {"method": "selective_search"}}})
    run = TrainedRun("w", config, model=None, variables={}, step=1, how="best")
    with pytest.raises(ValueError, match=r"TrainedRun.apply: proposals=None is invalid; this "
                                         r"detector was trained on selective_search proposals"):
        run.apply(np.zeros((1, 64, 64, 3)), method="detect")


def test_a_min_mode_run_loads_its_lowest_eval_loss_checkpoint(run_dir, tmp_path):
    """A run with best_metric='loss', best_mode='min' loads its lowest-loss checkpoint (its
    config's mode, not the default 'max'; distillation reads its teacher this way). On a copy of
    the run whose eval records make the lowest-loss, highest-loss and newest steps all differ."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "best_metric": "loss",
                                                  "best_mode": "min"}))
    kept = SourceCheckpoints(str(copy)).steps
    assert len(kept) == 3
    records = [{"split": "eval", "step": step, "loss": loss}
               for step, loss in zip(kept, (0.5, 0.2, 0.3), strict=True)]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = min(records, key=lambda r: r["loss"])["step"]
    run = load_trained(str(copy))
    assert (run.step, run.how) == (expected, "best")


def test_an_unreadable_checkpoint_names_its_step(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    best = load_trained(str(copy)).step
    for root, _, files in os.walk(copy / "checkpoints" / str(best)):
        for name in files:
            (copy / root / name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"^load_trained: step=.* is invalid; the .* "
                                         r"checkpoint of .* could not be read \(.*\); pass "
                                         r"another kept step \(--step=N\)"):
        load_trained(str(copy))


def test_a_config_json_that_is_not_a_training_runs_is_a_named_error(tmp_path):
    """A converted-weights workdir whose summary.json is missing (the converter writes it last,
    so an interrupted conversion lacks it) and a config.json without the training fields are
    refused as ValueErrors naming the workdir, not an AttributeError from deep in the config
    check."""
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "config.json").write_text(json.dumps(
        {"model": "resnet18", "source": {"weights": "/x.pth"}, "num_classes": 1000,
         "best_metric": None, "best_mode": "max", "model_kwargs": {}}))
    with pytest.raises(ValueError, match=r"^load_trained: workdir=.* is invalid; it holds "
                                         r"converted torchvision weights, not a training run"):
        load_trained(str(converted))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps({"model": "resnet18"}))
    with pytest.raises(ValueError, match=r"^load_trained: workdir=.* is invalid; its "
                                         r"config.json is not a complete training config "
                                         r"\(it lacks 'optimizer'\)"):
        load_trained(str(partial))


def test_a_checkpoint_that_lost_its_tree_metadata_is_unreadable_not_empty(run_dir, tmp_path):
    """orbax reads a checkpoint whose default/_METADATA is gone as holding nothing: load_trained
    returned a run with no variables (its apply failed later in flax, 'the collection is
    empty'); it is refused as unreadable, naming the step and what is missing."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    best = load_trained(str(copy)).step
    (copy / "checkpoints" / str(best) / "default" / "_METADATA").unlink()
    with pytest.raises(ValueError, match=rf"^load_trained: step={best} is invalid; the best "
                                         r"checkpoint of .* could not be read \(ValueError: its "
                                         rf"tree metadata \({best}/default/_METADATA\) is "
                                         r"missing"):
        load_trained(str(copy))


def test_a_damaged_checkpoint_leaves_no_closed_loop_tracebacks(run_dir, tmp_path, monkeypatch):
    """`experiments.evaluate` of a run whose best checkpoint has a truncated data file printed
    its one error line followed by bare "Event loop is closed" tracebacks: tensorstore's other
    reads called back into the loop orbax had closed (the engine's own restore and saves drop
    them; the read-only loader did not). Its reason also keeps the start of orbax's message
    without the tensorstore spec that filled the 200 characters."""
    import shutil
    import sys
    import types

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    best = load_trained(str(copy)).step
    (copy / "checkpoints" / str(best) / "default" / "manifest.ocdbt").write_bytes(b"")
    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    with pytest.raises(ValueError, match=r"could not be read \(ValueError: DATA_LOSS: ") as err:
        load_trained(str(copy))
    assert "tensorstore_spec" not in str(err.value)
    sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed")))
    assert [str(e) for e in seen if str(e) == "Event loop is closed"] == []

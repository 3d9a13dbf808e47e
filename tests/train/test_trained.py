"""`cnnjax.train.trained`: a run's workdir loaded as a model, and evaluated by the engine's eval."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.train import loop
from cnnjax.train.checkpoint import SourceCheckpoints
from cnnjax.train.trained import evaluate_trained, load_trained, plot_predictions, predictions
from tests.train import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)


@pytest.fixture
def run_dir(tmp_path):
    """A finished 12-step run (evals at 6 and 12, checkpoints at 4, 6, 8, 12: last 3 + best)."""
    loop.train_and_evaluate(helpers.tiny_config(), str(tmp_path))
    return tmp_path


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


def test_the_command_says_what_is_wrong_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.evaluate",
                             f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: load_trained: workdir={str(tmp_path)!r} is invalid")
    # The plot goes to <output stem>.png: an --output of that name would be overwritten by the
    # JSON, so it is refused before anything loads.
    result = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path}",
                             "--output=results/eval.png"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        "error: --output='results/eval.png' is invalid; expected a JSON file path (the plot is "
        "written beside it, with the suffix .png)")


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

"""`fcn_shapes.py` end to end on a slice of a freshly built `shapes_segmentation`: it trains,
its logged eval equals `evaluate_trained` of its checkpoint (a second pass, other batch size),
and the plot is written (slow: builds the dataset and compiles an FCN)."""

import numpy as np
import pytest

from cnnjax.train import loop
from cnnjax.train.trained import evaluate_trained, load_trained, plot_predictions
from experiments.configs import fcn_shapes


@pytest.mark.slow
def test_fcn_trains_and_evaluates_on_shapes_segmentation(tmp_path):
    config = fcn_shapes.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.train_split, config.data.eval_split = "train[:32]", "test[:20]"
    config.global_batch_size, config.eval_batch_size = 8, 8
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 4
    config.log_every_steps, config.schedule.warmup_steps = 2, 1
    workdir = str(tmp_path / "run")
    summary = loop.train_and_evaluate(config, workdir)
    assert summary["status"] == "completed"
    final = summary["final_eval"]
    assert set(final) >= {"loss", "pixel_accuracy", "miou", "iou/0", "num_examples"}
    again = evaluate_trained(workdir, eval_batch_size=6)
    for name in ("loss", "pixel_accuracy", "miou"):
        np.testing.assert_allclose(again[name], final[name], rtol=1e-5, err_msg=name)
    assert plot_predictions(load_trained(workdir), str(tmp_path / "p.png"), max_images=3) == {
        "plot": str(tmp_path / "p.png")}


@pytest.mark.slow
def test_fcn_backbone_warm_starts_from_a_classifier_checkpoint(tmp_path, monkeypatch):
    """`init_from.submodule='backbone'`: a resnet18 classifier checkpoint (as a converted
    torchvision one) fills the FCN's ResNet trunk; the score/upsampling layers start fresh."""
    import json

    import jax

    from cnnjax.models import create_model
    from cnnjax.train.checkpoint import Checkpointer
    from tests.train.helpers import record_initial_states

    classifier = create_model("resnet18", num_classes=1000)
    variables = classifier.init(jax.random.key(7), np.zeros((1, 64, 64, 3)), train=False)
    source = tmp_path / "resnet18"
    checkpointer = Checkpointer(str(source), use_async=False)
    checkpointer.save(0, {**jax.tree.map(np.asarray, dict(variables)), "step": np.int32(0)})
    checkpointer.close()
    (source / "config.json").write_text(json.dumps({"model": "resnet18"}))

    initial = record_initial_states(monkeypatch)
    config = fcn_shapes.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.train_split, config.data.eval_split = "train[:16]", "test[:8]"
    config.global_batch_size, config.eval_batch_size = 8, 8
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
    config.schedule.warmup_steps = 0
    config.init_from.workdir, config.init_from.submodule = str(source), "backbone"
    summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["status"] == "completed"
    assert summary["init_from"]["fresh_modules"] == [
        "head", "score_pool3", "score_pool4", "upscore2", "upscore_pool4"]
    for collection in ("params", "batch_stats"):
        expected = {k: v for k, v in variables[collection].items() if k != "head"}
        got = getattr(initial[0], collection)["backbone"]
        jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, expected))

"""The engine on selective-search proposals end to end: `fast_rcnn_shapes.py:selective_search` on a
slice of a freshly built `shapes_multi` trains, caches each split's proposals, and the loop's
eval (pmapped, batches of 8) equals the mAP of the same checkpoint's detections computed in
batches of 6 through `trained.predictions` (slow: builds the dataset and compiles a detector)."""

import os

import numpy as np
import pytest

from cnnjax.detection.evaluation import DetectionEvaluator
from cnnjax.train import loop
from cnnjax.train.trained import load_trained, predictions
from experiments.configs import fast_rcnn_shapes


@pytest.mark.slow
def test_training_and_eval_on_selective_search_proposals(tmp_path):
    config = fast_rcnn_shapes.get_config("selective_search")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.train_split, config.data.eval_split = "train[:32]", "test[:20]"
    config.global_batch_size, config.eval_batch_size = 8, 8
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 4
    config.log_every_steps, config.schedule.warmup_steps = 2, 1
    config.model_kwargs.max_detections = 10
    workdir = str(tmp_path / "run")
    summary = loop.train_and_evaluate(config, workdir)
    assert summary["status"] == "completed"
    cached = sorted(os.listdir(tmp_path / "tfds" / "shapes_multi" / "1.0.0" / "proposals"))
    assert [name.split("-", 1)[0] for name in cached] == ["test_20_", "train_32_"]  # + hash
    assert all(name.endswith("-selective_search-fast-x2-max160.npz") for name in cached)

    run = load_trained(workdir, num_devices=1)
    evaluator = DetectionEvaluator(4)
    seen = 0
    for batch, found in predictions(run, batch_size=6):  # other batches, one device
        assert batch["proposal_valid"].any(axis=1).all()  # every scene has its proposals
        evaluator.add(found, batch["boxes"], batch["labels"], batch["box_valid"])
        seen += len(batch["image"])
    assert seen == 20
    metrics = evaluator.compute()
    for name in ("map50", "map"):
        np.testing.assert_allclose(metrics[name], summary["final_eval"][name], atol=1e-6)

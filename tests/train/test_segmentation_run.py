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

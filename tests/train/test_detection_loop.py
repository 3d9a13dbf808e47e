"""`train_and_evaluate` with `config.task="detection"` on in-memory boxes: outputs, mAP over the
whole eval split, exact resume, and the task checks."""

import json
import re
import sys
import types
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from cnnjax.data.proposals import default_proposals_config
from cnnjax.train import loop
from cnnjax.train.checkpoint import Checkpointer
from cnnjax.train.config import default_config, model_kwargs_config
from cnnjax.tune.space import apply_overrides
from tests.train import helpers

SIZE, CLASSES, MAX_BOXES = 16, 3, 2
NUM_TRAIN, NUM_EVAL = 512, 21  # 21: the last eval batch is padded


def _examples(split, n):
    """Images with 1-2 bright 6x6 squares; the class is the colour channel that is lit."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    images = rng.normal(0, 0.1, (n, SIZE, SIZE, 3)).astype(np.float32)
    boxes = np.zeros((n, MAX_BOXES, 4), np.float32)
    labels = np.zeros((n, MAX_BOXES), np.int32)
    valid = np.zeros((n, MAX_BOXES), bool)
    for i in range(n):
        for j in range(rng.integers(1, MAX_BOXES + 1)):
            x, y = 8 * j + rng.integers(0, 3), rng.integers(0, SIZE - 6)
            c = rng.integers(0, CLASSES)
            images[i, y:y + 6, x:x + 6, c] += 1.0
            boxes[i, j], labels[i, j], valid[i, j] = (x, y, x + 6, y + 6), c, True
    return {"image": images, "boxes": boxes, "labels": labels, "box_valid": valid}


def _layout(batch, num_devices):
    return {k: v.reshape(num_devices, -1, *v.shape[1:]) for k, v in batch.items()}


def _train_batches(data_config, *, global_batch_size, num_devices, seed, start_step=0,
                   process_index=0, process_count=1):
    data = _examples("train", NUM_TRAIN)
    step = start_step
    while True:
        idx = np.random.default_rng([seed, step]).choice(NUM_TRAIN, global_batch_size)
        yield _layout({k: v[idx] for k, v in data.items()}, num_devices)
        step += 1


def _eval_batches(data_config, *, global_batch_size, num_devices, process_index=0,
                  process_count=1):
    data = _examples("eval", NUM_EVAL)
    data["mask"] = np.ones(NUM_EVAL, np.float32)
    for start in range(0, NUM_EVAL, global_batch_size):
        batch = {k: v[start:start + global_batch_size] for k, v in data.items()}
        pad = global_batch_size - len(batch["mask"])
        batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                 for k, v in batch.items()}
        yield _layout(batch, num_devices)


def _info(data_config):
    return helpers.DatasetInfo("boxes", CLASSES, (SIZE, SIZE, 3), NUM_TRAIN, NUM_EVAL)


def _install_fake_detection_data(monkeypatch):
    import cnnjax.data

    module = types.ModuleType("cnnjax.data.detection")
    module.get_dataset_info = _info
    module.train_batches = _train_batches
    module.eval_batches = _eval_batches
    module.eval_split_name = lambda data_config: "eval"
    monkeypatch.setitem(sys.modules, "cnnjax.data.detection", module)
    monkeypatch.setattr(cnnjax.data, "detection", module, raising=False)
    helpers.install_fake_pipeline(monkeypatch)  # classification configs: the synthetic set


@pytest.fixture(autouse=True)
def fake_detection_data(monkeypatch):
    _install_fake_detection_data(monkeypatch)


def _config(**overrides):
    config = default_config()
    config.task = "detection"
    config.model = "yolo_v1_small"
    config.model_kwargs = model_kwargs_config(config.model)
    config.model_kwargs.layers = ((8, 3, 1), "M", (16, 3, 1), "M")
    config.model_kwargs.grid_size = 4
    config.model_kwargs.hidden_features = 32
    config.model_kwargs.max_detections = 8
    config.data = ml_collections.ConfigDict({"name": "boxes"})
    config.global_batch_size = 8
    config.num_train_steps = 12
    config.log_every_steps = 2
    config.eval_every_steps = 6
    config.checkpoint_every_steps = 4
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.best_metric = "map50"
    config.max_loss = 1e4
    config.progress_bar = False
    config.tensorboard = False
    config.async_checkpoints = False
    return apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    """One 12-step run of `_config()` (workdir, summary), read by the run checks and as
    test_exact_resume's uninterrupted reference (one training instead of two: CI time)."""
    workdir = tmp_path_factory.mktemp("detection_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _install_fake_detection_data(monkeypatch)
        return workdir, loop.train_and_evaluate(_config(), str(workdir))


def test_detection_run_reports_map_and_its_checkpoint_evaluates_to_it(detection_run):
    tmp_path, summary = detection_run
    assert summary["status"] == "completed" and summary["step"] == 12
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    for r in evals:
        assert r["num_examples"] == NUM_EVAL  # every example once, padding masked out
        assert 0.0 <= r["map"] <= r["coco_map50"] <= 1.0 and 0.0 <= r["map50"] <= 1.0
    trains = [r for r in records if r["split"] == "train"]
    assert all(np.isfinite(r["loss"]) and "learning_rate" in r for r in trains)
    best = max(evals, key=lambda r: (r["map50"], r["step"]))
    assert summary["best"] == {"metric": "map50", "value": best["map50"], "step": best["step"]}
    assert str(best["step"]) in [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    _check_the_trained_detector_evaluates_to_the_map_its_run_logged(tmp_path, summary)


def _check_the_trained_detector_evaluates_to_the_map_its_run_logged(tmp_path, summary):
    """Part of the test above, on its run (one training instead of two: CI time)."""
    from cnnjax.train.trained import evaluate_trained, load_trained

    result = evaluate_trained(str(tmp_path))
    assert (result["step"], result["checkpoint"]) == (summary["best"]["step"], "best")
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (at_best,) = [r for r in logged if r["split"] == "eval" and r["step"] == result["step"]]
    for name in ("map50", "map", "coco_map75", "num_examples"):
        np.testing.assert_allclose(result[name], at_best[name], rtol=1e-6, err_msg=name)
    run = load_trained(str(tmp_path))
    images = np.asarray(_examples("eval", 3)["image"])
    detections = run.apply(images, method="detect")
    assert detections.boxes.shape == (3, 8, 4)  # max_detections=8 per image
    from cnnjax.train.trained import plot_predictions

    assert plot_predictions(run, str(tmp_path / "d.png"), max_images=4) == {
        "plot": str(tmp_path / "d.png")}
    assert (tmp_path / "d.png").stat().st_size > 1000


def _final_params(workdir, config):
    """Host params of the newest checkpoint."""
    from cnnjax.models import create_model
    from cnnjax.train.config import model_kwargs
    from cnnjax.train.optim import build_optimizer
    from cnnjax.train.state import create_train_state

    model = create_model(config.model, num_classes=CLASSES, axis_name="data",
                         **model_kwargs(config))
    template = jax.device_get(create_train_state(model, build_optimizer(config),
                                                 jax.random.PRNGKey(0), (1, SIZE, SIZE, 3)))
    checkpointer = Checkpointer(str(workdir), use_async=False)
    state, _ = checkpointer.restore_latest(jax.tree.map(np.asarray, template))
    checkpointer.close()
    return state.params


def test_exact_resume(tmp_path, monkeypatch, detection_run):
    """A run killed at step 9 and rerun ends as the uninterrupted `detection_run` does: same
    final eval, parameters bitwise, and metrics.jsonl record by record."""
    config = _config()
    reference_dir, reference = detection_run

    helpers.run_until_crash(config, tmp_path / "resumed", monkeypatch,
                            module="cnnjax.data.detection")
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert resumed["resumed_from_step"] == 8
    assert resumed["final_eval"] == reference["final_eval"]
    jax.tree.map(np.testing.assert_array_equal, _final_params(reference_dir, config),
                 _final_params(tmp_path / "resumed", config))

    def records(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "images_per_sec"}
                for x in lines]

    # the same trajectory, step by step
    assert records(tmp_path / "resumed") == records(reference_dir)


def test_the_eval_ignores_difficult_objects(tmp_path, monkeypatch):
    """Eval batches with `box_difficult` (PASCAL VOC's flag): the run's logged mAP is the one
    `DetectionEvaluator` gives with those flags, not the one that counts them as objects."""
    from cnnjax.detection.evaluation import DetectionEvaluator
    from cnnjax.train.trained import load_trained, predictions

    module = sys.modules["cnnjax.data.detection"]

    def with_difficult(*args, **kwargs):
        for batch in _eval_batches(*args, **kwargs):
            difficult = np.zeros(batch["box_valid"].shape, bool)
            every_other = np.arange(difficult.shape[-2]) % 2 == 0
            difficult[..., 0] = batch["box_valid"][..., 0] & every_other
            yield {**batch, "box_difficult": difficult}

    monkeypatch.setattr(module, "eval_batches", with_difficult)
    config = _config(num_train_steps=150, eval_every_steps=150, checkpoint_every_steps=150,
                     log_every_steps=50, global_batch_size=16,
                     **{"model_kwargs.hidden_features": 128, "model_kwargs.grid_size": 2})
    summary = loop.train_and_evaluate(config, str(tmp_path))
    run = load_trained(str(tmp_path), step=150)
    flagged, plain = DetectionEvaluator(CLASSES, 8), DetectionEvaluator(CLASSES, 8)
    for batch, found in predictions(run, batch_size=8):
        truth = (batch["boxes"], batch["labels"], batch["box_valid"])
        flagged.add(found, *truth, gt_difficult=batch["box_difficult"])
        plain.add(found, *truth)
    logged = summary["final_eval"]["map50"]
    assert 0 < logged == pytest.approx(flagged.compute()["map50"], abs=1e-6)
    assert logged != pytest.approx(plain.compute()["map50"], abs=1e-3)


@pytest.mark.slow
def test_detection_learns(tmp_path):
    config = _config(num_train_steps=300, eval_every_steps=300, checkpoint_every_steps=300,
                     global_batch_size=16,
                     **{"model_kwargs.hidden_features": 128, "model_kwargs.grid_size": 2})
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["final_eval"]["map50"] > 0.5


def test_task_and_model_must_agree(tmp_path):
    with pytest.raises(ValueError, match=r"config: model='yolo_v1_small' is invalid; it is a "
                                         r"detection model and config.task='classification'"):
        loop.train_and_evaluate(_config(task="classification", best_metric="top1"),
                                str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"config: best_metric='top1' is invalid; expected one of "
                                         r"\['map50', 'map', 'coco_map50', 'coco_map75', "
                                         r"'map50_voc07'\]"):
        loop.train_and_evaluate(_config(best_metric="top1"), str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"config: task='keypoints' is invalid; expected one "
                                         r"of \['classification', 'detection', 'segmentation'\]"):
        loop.train_and_evaluate(_config(task="keypoints"), str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"config: model='yolo_v1_small' is invalid; it is a "
                                         r"detection model and config.task='segmentation'"):
        loop.train_and_evaluate(_config(task="segmentation", best_metric="miou"),
                                str(tmp_path / "d"))
    assert not Path(tmp_path / "a" / "checkpoints").exists()


def test_external_proposals_need_a_model_that_reads_them(tmp_path):
    config = _config()
    config.data.proposals = default_proposals_config()
    config.data.proposals.method = "selective_search"
    with pytest.raises(ValueError, match=re.escape(
            "config: data.proposals.method='selective_search' is invalid; expected None for "
            "model 'yolo_v1_small', which takes no external proposals (an RPN makes its own; "
            "YOLO predicts boxes from its grid; external proposals feed the R-CNN, SPP-net and "
            "Fast R-CNN models).")):
        loop.train_and_evaluate(config, str(tmp_path))
    assert not Path(tmp_path / "checkpoints").exists()


def _set_saved_task(workdir, task):
    """The run's recorded config (config.json and each checkpoint's record) with `task` set,
    or without it (None: as written before the field existed)."""
    records = [workdir / "config.json"] + sorted((workdir / "checkpoints").glob(
        f"*/{loop.STEP_METADATA_FILE}"))
    for path in records:
        data = json.loads(path.read_text())
        config = data if path.name == "config.json" else data["custom_metadata"][
            loop.CONFIG_RECORD]
        config.pop("task", None)
        if task is not None:
            config["task"] = task
        path.write_text(json.dumps(data))


def test_workdirs_from_before_the_task_field_still_resume(tmp_path):
    """A config written before `task` existed lacks it: it meant classification."""
    loop.train_and_evaluate(helpers.tiny_config(), str(tmp_path))
    _set_saved_task(tmp_path, None)
    summary = loop.train_and_evaluate(helpers.tiny_config(), str(tmp_path))
    assert summary["status"] == "completed" and summary["step"] == 12  # finished: left as is
    _set_saved_task(tmp_path, "detection")  # a real difference is still refused
    with pytest.raises(ValueError, match=r"incompatible config \(task: 'detection' -> "
                                         r"'classification'\)"):
        loop.train_and_evaluate(helpers.tiny_config(), str(tmp_path))

"""R-CNN's SVM + ridge stage (`cnnjax.detection.rcnn_svm`, `rcnn_svm_run`): hard-negative mining
against an independent liblinear fit, label assignment and regression targets against
hand-computed float64 IoUs, ridge against the float64 closed form and sklearn, `region_features`
against the model's own outputs, and the whole stage on a tiny randomly initialised rcnn_small
workdir with in-memory scenes (rerun reuses the cache, changed flags remake what they change)."""

import dataclasses
import json
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.svm import LinearSVC

from cnnjax.detection import rcnn_svm
from cnnjax.detection import rcnn_svm_run as run_lib
from cnnjax.models import create_model
from tests.detection.reference import iou_ref

# ---------------------------------------------------------------------------------- mining


def _separable_set():
    """2-D positives near (3, 0); 2,000 easy negatives near (-5, 0) and 20 hard ones on the line
    x = 1 (between the two): separable, but an SVM that never sees the hard ones cuts them."""
    rng = np.random.default_rng(0)
    positives = rng.normal((3.0, 0.0), 0.3, (50, 2))
    easy = rng.normal((-5.0, 0.0), 0.5, (2000, 2))
    hard = np.stack([np.full(20, 1.0), np.linspace(-3, 3, 20)], axis=1)
    return positives, np.concatenate([easy, hard])


def test_hard_negative_mining_adds_the_margin_violators_and_separates():
    positives, negatives = _separable_set()
    kwargs = dict(c=10.0, positive_weight=1.0, bias_scale=10.0, max_iter=100000)
    w, b, history = rcnn_svm.train_svm_with_hard_negatives(
        positives, negatives, initial_negatives=40, max_rounds=10, seed=3, **kwargs)

    # Round 1, refitted independently with liblinear on the same initial cache.
    cache = np.zeros(len(negatives), bool)
    cache[np.random.default_rng(3).permutation(len(negatives))[:40]] = True
    svm = LinearSVC(C=10.0, loss="hinge", dual=True, class_weight={1: 1.0, -1: 1.0},
                    intercept_scaling=10.0, max_iter=100000, random_state=3)
    svm.fit(np.concatenate([positives, negatives[cache]]),
            np.r_[np.ones(50), -np.ones(40)])
    first = svm.decision_function(negatives)
    violators = (first > -1.0) & ~cache
    assert violators[-20:].sum() >= 10  # the initial SVM missed most hard negatives ...
    assert history[0]["added"] == int(violators.sum()) > 0  # ... and mining added exactly them
    assert history[0]["evicted"] == int(np.sum(cache & (first < -1.2)))
    # The last fit found no new violator: every negative outside its cache is beyond the margin.
    assert history[-1]["added"] == 0 and len(history) >= 2
    scores_neg, scores_pos = negatives @ w + b, positives @ w + b
    assert scores_neg.max() < 0 < scores_pos.min()  # separates the whole set
    assert np.all(scores_neg[-20:] < 0)


def test_mining_that_runs_out_of_rounds_refits_on_the_last_cache():
    positives, negatives = _separable_set()
    _, _, history = rcnn_svm.train_svm_with_hard_negatives(
        positives, negatives, initial_negatives=40, max_rounds=1, seed=3, c=10.0,
        positive_weight=1.0)
    assert len(history) == 2 and history[0]["added"] > 0
    assert history[1]["cache"] == history[0]["cache"] + history[0]["added"] - history[0][
        "evicted"]


# ---------------------------------------------------------------------------------- labels
A, B = (0.0, 0.0, 10.0, 10.0), (20.0, 0.0, 30.0, 10.0)  # class 0, class 1
WINDOWS = np.array([
    (0, 0, 10, 5),    # IoU(A) = 50/100 = 0.5
    (0, 0, 3, 10),    # IoU(A) = 30/100 = 0.3 exactly: not a negative
    (6, 0, 16, 10),   # IoU(A) = 40/160 = 0.25
    (20, 0, 30, 10),  # B itself, as a window
    (21, 0, 30, 10),  # IoU(B) = 90/100 = 0.9
], np.float64)


def test_svm_labels_positives_are_gt_only_negatives_below_0_3():
    boxes = np.concatenate([WINDOWS, [A, B]])
    overlaps = rcnn_svm.class_overlaps(boxes, [A, B, (0, 0, 0, 0)], [0, 1, 3], [1, 1, 0], 2)
    expected = np.array([[iou_ref(box, A), iou_ref(box, B)] for box in boxes])
    np.testing.assert_allclose(overlaps, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(overlaps[:5, 0], [0.5, 0.3, 0.25, 0.0, 0.0], atol=1e-15)
    gt_class = [-1, -1, -1, -1, -1, 0, 1]
    np.testing.assert_array_equal(rcnn_svm.svm_labels(overlaps, gt_class, 0),
                                  [0, 0, -1, -1, -1, 1, -1])
    # B as a window (IoU 1) and at 0.9 are ignored by class 1, never positives; gt A is a
    # negative of class 1.
    np.testing.assert_array_equal(rcnn_svm.svm_labels(overlaps, gt_class, 1),
                                  [-1, -1, -1, 0, 0, -1, 1])
    # Not the paper's rule: regions at IoU >= positive_iou are positives too (0.3 still ignored).
    np.testing.assert_array_equal(rcnn_svm.svm_labels(overlaps, gt_class, 0, positive_iou=0.5),
                                  [1, 0, -1, -1, -1, 1, -1])
    np.testing.assert_array_equal(rcnn_svm.svm_labels(overlaps, gt_class, 1, positive_iou=0.5),
                                  [-1, -1, -1, 1, 1, -1, 1])


def test_regression_targets_select_iou_0_6_and_encode_the_best_gt():
    selected, classes, targets = rcnn_svm.regression_targets(WINDOWS, [A, B], [0, 1], [1, 1])
    np.testing.assert_array_equal(selected, [False, False, False, True, True])
    np.testing.assert_array_equal(classes, [-1, -1, -1, 1, 1])
    # (21, 0, 30, 10) -> B: centre 25.5 -> 25 over width 9; log(10 / 9) in x, 0 in y.
    np.testing.assert_allclose(targets[4], [-0.5 / 9, 0.0, np.log(10 / 9), 0.0], atol=1e-6)
    np.testing.assert_array_equal(targets[:4], 0.0)


# ----------------------------------------------------------------------------------- ridge
def test_ridge_equals_the_float64_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 9))
    y = x @ rng.normal(size=(9, 4)) + rng.normal(0, 0.1, (60, 4)) + 5.0
    lam = 7.5
    w, b = rcnn_svm.fit_ridge(x, y, lam)
    xc, yc = x - x.mean(0), y - y.mean(0)
    closed = np.linalg.inv(xc.T @ xc + lam * np.eye(9)) @ xc.T @ yc
    np.testing.assert_allclose(w, closed, rtol=0, atol=1e-8)
    np.testing.assert_allclose(b, y.mean(0) - x.mean(0) @ closed, rtol=0, atol=1e-8)
    reference = Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(x, y)
    np.testing.assert_allclose(w, reference.coef_.T, rtol=0, atol=1e-8)
    np.testing.assert_allclose(b, reference.intercept_, rtol=0, atol=1e-8)
    # Centred data: exactly (X^T X + lambda I)^-1 X^T y, with a zero intercept.
    w0, b0 = rcnn_svm.fit_ridge(xc, yc, lam)
    np.testing.assert_allclose(w0, np.linalg.inv(xc.T @ xc + lam * np.eye(9)) @ xc.T @ yc,
                               rtol=0, atol=1e-8)
    np.testing.assert_allclose(b0, 0.0, atol=1e-8)


def test_feature_scale_gives_mean_norm_20():
    x = np.random.default_rng(2).normal(size=(30, 5)).astype(np.float32)
    scale = rcnn_svm.feature_scale(x)
    assert np.mean(np.linalg.norm(x.astype(np.float64) * scale, axis=1)) == pytest.approx(20.0)


# ------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("call, message", [
    (lambda: rcnn_svm.train_svm_with_hard_negatives(np.ones((3, 2)), np.ones((4, 3))),
     r"train_svm_with_hard_negatives: negatives.shape=\(4, 3\) is invalid; expected \[n, 2\]"),
    (lambda: rcnn_svm.train_svm_with_hard_negatives(np.ones((3, 2)), np.ones((4, 2)), c=0),
     r"train_svm_with_hard_negatives: c=0 is invalid; expected a positive finite number"),
    (lambda: rcnn_svm.train_svm_with_hard_negatives(np.ones((3, 2)), np.ones((4, 2)),
                                                    easy_threshold=0.0),
     r"easy_threshold=0.0 is invalid; expected a finite number <= hard_threshold=-1.0"),
    (lambda: rcnn_svm.fit_ridge(np.ones((3, 2)), np.ones((3, 4)), -1.0),
     r"fit_ridge: lam=-1.0 is invalid; expected a positive"),
    (lambda: rcnn_svm.fit_ridge(np.ones((3, 2)), np.ones((2, 4)), 1.0),
     r"fit_ridge: y.shape=\(2, 4\) is invalid; expected finite targets with 3 rows"),
    (lambda: rcnn_svm.svm_labels(np.zeros((2, 3)), [-1, -1], 3),
     r"svm_labels: class_id=3 is invalid; expected a class in \[0, 3\)"),
    (lambda: rcnn_svm.svm_labels(np.zeros((2, 3)), [-1, -1], 0, positive_iou=0.2),
     r"svm_labels: positive_iou=0.2 is invalid; expected None or an IoU in \[negative_iou=0.3"),
    (lambda: run_lib.Settings(positive_iou=1.5).check(),
     r"rcnn_svm: positive_iou=1.5 is invalid; expected None or an IoU in \[0.3, 1\]"),
    (lambda: rcnn_svm.class_overlaps(np.zeros((2, 4)), [A], [5], [True], 2),
     r"class_overlaps: gt_labels=\[5\] is invalid; expected classes in \[0, 2\)"),
    (lambda: rcnn_svm.regression_targets(np.zeros((2, 3)), [A], [0], [True]),
     r"regression_targets: boxes.shape=\(2, 3\) is invalid; expected \[n, 4\]"),
    # Inverted boxes, mismatched or float labels and out-of-range classes used to pass silently
    # (IoU 0, no regression pair, a dropped class) or fail inside NumPy with an IndexError.
    (lambda: rcnn_svm.class_overlaps([(10, 0, 0, 10)], [A], [0], [True], 2),
     r"class_overlaps: boxes\[0\]=\[10.0, 0.0, 0.0, 10.0\] is invalid; expected x1 <= x2"),
    (lambda: rcnn_svm.class_overlaps([A], [(10, 0, 0, 10)], [0], [True], 2),
     r"class_overlaps: gt_boxes\[0\]=\[10.0, 0.0, 0.0, 10.0\] is invalid; expected x1 <= x2"),
    (lambda: rcnn_svm.class_overlaps([A], [A], [0.0], [True], 2),
     r"class_overlaps: gt_labels.dtype='float64' is invalid; expected integer class ids"),
    (lambda: rcnn_svm.regression_targets([A], [A, B], [0], [True, True]),
     r"regression_targets: gt_labels.shape=\(1,\) is invalid; expected \(2,\), one per gt box"),
    (lambda: rcnn_svm.regression_targets([A], [A], [0], [True, True]),
     r"regression_targets: gt_valid.shape=\(2,\) is invalid; expected \(1,\), one per gt box"),
    (lambda: rcnn_svm.regression_targets([(5, 5, 0, 0)], [A], [0], [True]),
     r"regression_targets: boxes\[0\]=\[5.0, 5.0, 0.0, 0.0\] is invalid; expected x1 <= x2"),
    (lambda: rcnn_svm.regression_targets([A], [A], [0], [True], min_iou=0.0),
     r"regression_targets: min_iou=0.0 is invalid; expected an IoU in \(0, 1\]"),
    (lambda: rcnn_svm.svm_labels(np.zeros((2, 3)), [-1.0, 0.0], 0),
     r"svm_labels: gt_class.dtype='float64' is invalid; expected integer class ids"),
    (lambda: rcnn_svm.train_box_regressors(np.ones((2, 3)), [0, 2], np.ones((2, 4)), 2),
     r"train_box_regressors: classes=\[0, 2\] is invalid; expected integer classes in \[0, 2\)"),
    (lambda: run_lib.Settings(svm_c=0.0).check(),
     r"rcnn_svm: svm_c=0.0 is invalid; expected a positive"),
    (lambda: run_lib.Settings(train_images=0).check(),
     r"rcnn_svm: train_images=0 is invalid; expected a positive integer"),
    (lambda: run_lib.Settings(ridge_lambda=float("nan")).check(),
     r"rcnn_svm: ridge_lambda=nan is invalid; expected a positive"),
    (lambda: run_lib.run_rcnn_svm("/nonexistent/run"),
     r"rcnn_svm: workdir='/nonexistent/run' is invalid; expected the --workdir of a finished"),
])
def test_bad_arguments_name_the_owner(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------- the model side
TINY = dict(proposal_sizes=(8, 12), proposal_stride=8, warp_size=8, cnn_stages=((4,), (8,)),
            head_features=16, max_detections=20)
SIZE, CLASSES, MAX_BOXES = 32, 2, 2


def test_region_features_match_the_models_outputs():
    model = create_model("rcnn_small", num_classes=CLASSES, **TINY)
    images = jax.random.normal(jax.random.key(0), (2, SIZE, SIZE, 3))
    variables = model.init(jax.random.key(1), images)
    windows, valid = model.apply(variables, images, method="windows")
    assert valid.shape == windows.shape[:2] and bool(valid.all())
    regions = model.apply(variables, images, windows, method="region_features")
    logits, deltas, _ = model.apply(variables, images)
    np.testing.assert_array_equal(regions.logits, logits)
    np.testing.assert_array_equal(regions.deltas, deltas)
    p = windows.shape[1]
    assert regions.pool5.shape == (2, p, 2 * 2 * 8) and regions.fc7.shape == (2, p, 16)
    # fc7 is the head's second Dense after ReLU: the class logits are a Dense of it.
    head = variables["params"]["head"]
    again = regions.fc7 @ head["class_logits"]["kernel"] + head["class_logits"]["bias"]
    np.testing.assert_allclose(again, logits, rtol=1e-5, atol=1e-5)
    assert float(jnp.min(regions.fc7)) >= 0.0


# ------------------------------------------------------------------- the stage end to end
def _scenes(split: str, n: int):
    """Scenes with 1-2 bright 8x8 squares; the class is the lit colour channel."""
    rng = np.random.default_rng(0 if split.startswith("train") else 1)
    images = rng.normal(0, 0.1, (n, SIZE, SIZE, 3)).astype(np.float32)
    boxes = np.zeros((n, MAX_BOXES, 4), np.float32)
    labels = np.zeros((n, MAX_BOXES), np.int32)
    valid = np.zeros((n, MAX_BOXES), bool)
    for i in range(n):
        for j in range(1 + i % 2):
            x, y, c = 16 * j + rng.integers(0, 8), rng.integers(0, SIZE - 8), (i + j) % CLASSES
            images[i, y:y + 8, x:x + 8, c] += 1.0
            boxes[i, j], labels[i, j], valid[i, j] = (x, y, x + 8, y + 8), c, True
    return {"image": images, "boxes": boxes, "labels": labels, "box_valid": valid}


NUM_TRAIN, NUM_EVAL = 12, 5


def _eval_batches(data_config, *, global_batch_size, num_devices, process_index=0,
                  process_count=1):
    """The fake pipeline's stored-order pass over `eval_split` ('train[:n]' or the eval set)."""
    split = data_config.get("eval_split") or "test"
    n = int(split.split(":")[1].rstrip("]")) if split.startswith("train[") else NUM_EVAL
    data = _scenes(split, n)
    data["mask"] = np.ones(n, np.float32)
    if data_config.get("proposals") is not None:  # each scene's gt boxes, shifted, and 2 more
        rows = MAX_BOXES + 3
        data["proposals"] = np.zeros((n, rows, 4), np.float32)
        data["proposals"][:, :MAX_BOXES] = data["boxes"] + 1.0
        data["proposals"][:, MAX_BOXES:MAX_BOXES + 2] = [[0, 0, 16, 16], [8, 4, 30, 28]]
        data["proposal_valid"] = np.zeros((n, rows), bool)
        data["proposal_valid"][:, :MAX_BOXES] = data["box_valid"]
        data["proposal_valid"][:, MAX_BOXES:MAX_BOXES + 2] = True
    for start in range(0, n, global_batch_size):
        batch = {k: v[start:start + global_batch_size] for k, v in data.items()}
        pad = global_batch_size - len(batch["mask"])
        yield {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])[None]
               for k, v in batch.items()}


@pytest.fixture(params=[False, True], ids=["windows", "proposals"])
def tiny_workdir(tmp_path, monkeypatch, request):
    """A randomly initialised rcnn_small saved as a finished run (config.json + checkpoint),
    with the detection data module replaced by in-memory scenes, on its dense windows or on
    per-scene external proposals (`data.proposals`)."""
    import cnnjax.data
    from cnnjax.train.checkpoint import Checkpointer
    from cnnjax.train.config import default_config, model_kwargs_config
    from cnnjax.train.state import init_variables
    from tests.train import helpers

    module = types.ModuleType("cnnjax.data.detection")
    module.get_dataset_info = lambda data_config: helpers.DatasetInfo(
        "boxes", CLASSES, (SIZE, SIZE, 3), NUM_TRAIN, NUM_EVAL)
    module.eval_batches = _eval_batches
    module.eval_split_name = lambda data_config: data_config.get("eval_split") or "test"
    monkeypatch.setitem(sys.modules, "cnnjax.data.detection", module)
    monkeypatch.setattr(cnnjax.data, "detection", module, raising=False)
    helpers.accept_stand_in_data_names(monkeypatch)  # its 'boxes'

    config = default_config()
    config.task, config.model, config.best_metric = "detection", "rcnn_small", "map50"
    config.model_kwargs = model_kwargs_config("rcnn_small")
    for key, value in TINY.items():
        config.model_kwargs[key] = value
    config.data = ml_collections.ConfigDict({"name": "boxes", "train_split": "train",
                                             "eval_split": None})
    if request.param:
        config.data.proposals = {"method": "selective_search"}
    workdir = tmp_path / "run"
    model = create_model("rcnn_small", num_classes=CLASSES, **TINY)
    variables = init_variables(model, jax.random.key(0), (1, SIZE, SIZE, 3))
    checkpointer = Checkpointer(str(workdir), keep=1, best_metric=None, use_async=False)
    checkpointer.save(3, jax.device_get(dict(variables)))
    checkpointer.close()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    return workdir


# the windows case, 15 s, runs with the slow tests: the proposals case exercises the same stage
@pytest.mark.parametrize("tiny_workdir", [pytest.param(False, id="windows",
                                                       marks=pytest.mark.slow),
                                          pytest.param(True, id="proposals")], indirect=True)
def test_stage_end_to_end_and_rerun_reuses_the_cache(tiny_workdir, tmp_path, capsys):
    settings = run_lib.Settings(train_images=8, initial_negatives=50, batch_size=4)
    before = sorted(p.name for p in tiny_workdir.rglob("*"))
    results = run_lib.run_rcnn_svm(str(tiny_workdir), None, settings)
    out = tiny_workdir / "rcnn_svm"
    assert results["checkpoint"] == {"step": 3, "how": "latest"}
    for arm in run_lib.ARMS:
        metrics = results["test"][arm]
        assert metrics["num_examples"] == NUM_EVAL
        assert 0.0 <= metrics["map"] <= 1.0 and 0.0 <= metrics["map50"] <= 1.0
    train = np.load(out / "features_train.npz")
    test = np.load(out / "features_test.npz")
    data_config = json.loads((tiny_workdir / "config.json").read_text())["data"]
    if data_config.get("proposals"):  # 2 per scene + its gt boxes shifted by 1 px
        p, per_train = MAX_BOXES + 3, 8 * 2 + 12
        valid = test["window_valid"]
        assert valid[:, :2].tolist() == [[True, i % 2 == 1] for i in range(NUM_EVAL)]
        assert valid[:, MAX_BOXES:].tolist() == [[True, True, False]] * NUM_EVAL
        np.testing.assert_array_equal(test["windows"][:, 0], test["boxes"][:, 0] + 1.0)
        assert len(train["reg_pool5"]) == 12  # the shifted gt boxes (IoU 49/79 = 0.62 >= 0.6)
    else:
        p = 16 + 16  # 8-px windows at 0, 8, 16, 24 and 12-px ones at 0, 8, 16, 20, squared
        per_train = 8 * p
        assert test["window_valid"].all()
    assert train["fc7"].shape == (per_train + 12, 16)  # 8 scenes' windows + their 12 gt boxes
    assert train["overlaps"].shape == (per_train + 12, CLASSES)
    assert train["reg_pool5"].shape[1] == 2 * 2 * 8
    assert test["fc7"].shape == (NUM_EVAL, p, 16) and test["windows"].shape == (NUM_EVAL, p, 4)
    models = np.load(out / "models.npz")
    assert models["svm_weights"].shape == (CLASSES, 16)
    assert models["ridge_weights"].shape == (CLASSES, 2 * 2 * 8, 4)
    assert results["train"]["positives"] == [8, 4]  # even scenes: class 0; odd: 1 and 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["test"] == results["test"] and saved["reused"] == {
        "train_features": False, "test_features": False, "models": False}
    assert "| softmax head" in (out / "report.md").read_text()
    assert json.loads((out / "status.json").read_text()) == {"status": "completed"}
    # The run itself is untouched (only the new rcnn_svm/ directory was added).
    assert sorted(p.name for p in tiny_workdir.rglob("*") if "rcnn_svm" not in str(p)) == before
    _assert_softmax_arm_is_the_engines_eval(tiny_workdir, results["test"]["softmax"])

    again = run_lib.run_rcnn_svm(str(tiny_workdir), None, settings)
    assert again["reused"] == {"train_features": True, "test_features": True, "models": True}
    assert again["test"] == results["test"]

    capsys.readouterr()
    changed = run_lib.run_rcnn_svm(str(tiny_workdir), str(tmp_path / "elsewhere"), settings)
    assert changed["reused"]["models"] is False  # a new output_dir starts empty
    other = run_lib.run_rcnn_svm(
        str(tiny_workdir), None, run_lib.Settings(train_images=8, initial_negatives=50,
                                                  batch_size=4, svm_c=0.01))
    assert other["reused"] == {"train_features": True, "test_features": True, "models": False}
    assert "svm_c: 0.001 -> 0.01" in capsys.readouterr().out
    assert other["test"]["softmax"] == results["test"]["softmax"]

    with pytest.raises(ValueError, match=r"rcnn_svm: train_images=13 is invalid; expected at "
                                         r"most the 12 train scenes of 'boxes'"):
        run_lib.run_rcnn_svm(str(tiny_workdir), None, run_lib.Settings(train_images=13))
    with pytest.raises(ValueError, match=r"load_trained: step=7 is invalid; .* has checkpoints "
                                         r"at steps \[3\]"):
        run_lib.run_rcnn_svm(str(tiny_workdir), None, run_lib.Settings(step=7))
    # Among the run's own files, or in another command's directory, outputs overwrote them (a
    # sweep's results.json; 0.2 GB of features beside the checkpoints).
    for inside in (tiny_workdir, tiny_workdir / "checkpoints" / "svm"):
        with pytest.raises(ValueError, match=r"output_dir=.* is invalid; it would write among "
                                             r"the run's own files"):
            run_lib.run_rcnn_svm(str(tiny_workdir), str(inside), settings)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text("{}")
    with pytest.raises(ValueError, match=r"output_dir=.* is invalid; it holds a sweep "
                                         r"\(sweep.json\), not a R-CNN SVM stage"):
        run_lib.run_rcnn_svm(str(tiny_workdir), str(tmp_path / "sweep"), settings)
    assert not (tiny_workdir / "results.json").exists()
    empty = tmp_path / "no_checkpoints"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_workdir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"load_trained: workdir='.*no_checkpoints' is invalid; "
                                         r"it has no checkpoints"):
        run_lib.run_rcnn_svm(str(empty))


def test_train_features_leave_out_gt_boxes_without_area(tiny_workdir, monkeypatch):
    """The SVM stage reads the train scenes through the eval pipeline, which keeps boxes without
    area (pycocotools does); each one was an SVM positive (overlap 0, a degenerate crop) where the
    detector's training pipeline drops it."""
    fake = sys.modules["cnnjax.data.detection"]
    original = fake.eval_batches

    def flattened(*args, **kwargs):  # box 0 of every scene: zero width
        for batch in original(*args, **kwargs):
            batch["boxes"][..., 0, 2] = batch["boxes"][..., 0, 0]
            yield batch

    monkeypatch.setattr(fake, "eval_batches", flattened)
    detector = run_lib.restore_detector(str(tiny_workdir))
    train = run_lib.extract_train_features(detector, "train[:4]", 4)
    gt = train["gt_class"] >= 0
    assert int(gt.sum()) == 2  # scenes 1 and 3's second box; the four flattened ones left out
    np.testing.assert_array_equal(train["overlaps"][gt].max(axis=1), [1.0, 1.0])


def test_train_features_leave_out_difficult_gt_boxes(tiny_workdir, monkeypatch):
    """The eval pipeline keeps VOC difficult objects (flagged `box_difficult`); each was an SVM
    positive, a regression target and an overlap that kept regions over it from being negatives,
    where the detector's training (and Fast R-CNN's roidb) leaves it out entirely."""
    fake = sys.modules["cnnjax.data.detection"]
    original = fake.eval_batches

    def flagged(*args, **kwargs):  # box 1 (scenes 1 and 3, class 0): difficult
        for batch in original(*args, **kwargs):
            batch["box_difficult"] = np.zeros_like(batch["box_valid"])
            batch["box_difficult"][..., 1] = batch["box_valid"][..., 1]
            yield batch

    monkeypatch.setattr(fake, "eval_batches", flagged)
    detector = run_lib.restore_detector(str(tiny_workdir))
    train = run_lib.extract_train_features(detector, "train[:4]", 4)
    scenes = list(run_lib._region_batches(detector, "train[:4]", 4))
    assert len(scenes) == 1 and scenes[0][0]["box_difficult"][:, 1].sum() == 2
    batch, _, windows, window_valid = scenes[0]
    assert train["gt_class"][train["gt_class"] >= 0].tolist() == [0, 1, 0, 1]  # box 0 only
    pairs = 0
    for i in range(4):  # float64 IoUs against the scene's one non-difficult box (box 0)
        gt, label = batch["boxes"][i][0], int(batch["labels"][i][0])
        boxes = np.concatenate([windows[i][window_valid[i]], gt[None]])
        want = np.zeros((len(boxes), CLASSES))
        want[:, label] = [iou_ref(b, gt) for b in boxes]
        np.testing.assert_allclose(train["overlaps"][train["image"] == i], want, atol=1e-6)
        pairs += sum(iou_ref(w, gt) >= rcnn_svm.REGRESSION_IOU
                     for w in windows[i][window_valid[i]])
    assert len(train["reg_classes"]) == pairs


def test_train_features_keep_class_ids_past_127(tiny_workdir, monkeypatch):
    """Class ids were stored as int8: class 150 of a 200-class set (the paper's ILSVRC2013)
    wrapped to -106, so it lost its positives and the ridge refused its pairs."""
    fake = sys.modules["cnnjax.data.detection"]
    original = fake.eval_batches

    def shifted(*args, **kwargs):
        for batch in original(*args, **kwargs):
            batch["labels"] = batch["labels"] + 150
            yield batch

    monkeypatch.setattr(fake, "eval_batches", shifted)
    detector = run_lib.restore_detector(str(tiny_workdir))
    detector = dataclasses.replace(
        detector, data_info=detector.data_info._replace(num_classes=200))
    train = run_lib.extract_train_features(detector, "train[:4]", 4)
    assert sorted(set(train["gt_class"][train["gt_class"] >= 0].tolist())) == [150, 151]
    assert set(train["reg_classes"].tolist()) <= {150, 151}
    gt = train["gt_class"] >= 0
    np.testing.assert_array_equal(
        train["overlaps"][gt, train["gt_class"][gt]], 1.0)  # each gt box is its class's positive


# The windows case runs with the slow tests: the refusal reads the selected train scenes' gt
# labels only, which are the same on dense windows and on proposals (the proposals case).
@pytest.mark.parametrize("tiny_workdir", [pytest.param(False, id="windows",
                                                       marks=pytest.mark.slow),
                                          pytest.param(True, id="proposals")], indirect=True)
def test_a_class_without_train_boxes_names_train_images(tiny_workdir, tmp_path):
    """The first train scene holds class 0 only: class 1's SVM would have no positive. It was
    refused after extraction as `train_class_svms: gt_class='class 1'`, naming no flag."""
    settings = run_lib.Settings(train_images=1, initial_negatives=20, batch_size=4)
    with pytest.raises(ValueError, match=r"^rcnn_svm: train_images=1 is invalid; the train "
                                         r"scenes it selects \(.*\) hold no ground-truth box of "
                                         r"class \[1\], so no SVM positive; use more"):
        run_lib.run_rcnn_svm(str(tiny_workdir), str(tmp_path / "one"), settings)
    status = json.loads((tmp_path / "one" / "status.json").read_text())
    assert status["status"] == "failed" and "train_images=1" in status["message"]


def test_no_regression_pair_gives_zero_regressors():
    """Without a window at IoU >= 0.6 in any scene, the ridge stage has no pair; the feature
    scale of its empty matrix raised instead of giving every class the zero regressor."""
    rng = np.random.default_rng(3)
    fc7 = rng.normal(size=(40, 6)).astype(np.float32)
    gt_class = np.full(40, -1, np.int32)
    gt_class[:4] = [0, 1, 0, 1]
    overlaps = np.zeros((40, 2), np.float32)
    overlaps[np.arange(4), gt_class[:4]] = 1.0
    train = {"fc7": fc7, "overlaps": overlaps, "gt_class": gt_class,
             "image": np.repeat(np.arange(4), 10).astype(np.int32),
             "reg_pool5": np.zeros((0, 8), np.float32), "reg_classes": np.zeros(0, np.int32),
             "reg_targets": np.zeros((0, 4), np.float32)}
    models = run_lib.train_models(train, 2, run_lib.Settings(initial_negatives=10))
    assert models["pool5_scale"] == 1.0 and list(models["regression_pairs"]) == [0, 0]
    np.testing.assert_array_equal(models["ridge_weights"], 0.0)
    np.testing.assert_array_equal(models["ridge_bias"], 0.0)


def test_svm_detections_drop_boxes_without_area_after_clipping():
    """A box moved entirely off the image clips to zero width: a sure false positive that the
    SVM arms kept (with its score) where the softmax arm (`detect_from_head`) drops it."""
    scores = np.array([[[2.5], [1.0]]], np.float32)  # [N=1, P=2, C=1]
    boxes = np.array([[[[70.0, 10, 90, 30]], [[5.0, 5, 20, 20]]]], np.float32)
    found = rcnn_svm.detect_with_scores(scores, boxes, (64, 64), 0.5, 4)
    kept = np.asarray(found.valid[0])
    assert kept.sum() == 1
    np.testing.assert_allclose(np.asarray(found.boxes[0][kept]), [[5.0, 5, 20, 20]])
    np.testing.assert_allclose(np.asarray(found.scores[0][kept]), [1.0])


def _assert_softmax_arm_is_the_engines_eval(workdir, arm):
    """`arm`, the stage's softmax-arm metrics on `workdir`, equal the engine's eval of the run."""
    from cnnjax.train.trained import evaluate_trained

    engine = evaluate_trained(str(workdir))
    assert engine["num_examples"] == arm["num_examples"] == NUM_EVAL
    for metric in ("map50", "map"):
        assert engine[metric] == pytest.approx(arm[metric], abs=1e-6)


# The proposals case runs with the slow tests: test_stage_end_to_end_and_rerun_reuses_the_cache
# [proposals] makes the same comparison on its own stage run (the softmax arm does not depend on
# train_images, which only selects the SVMs' train scenes).
@pytest.mark.parametrize("tiny_workdir", [pytest.param(False, id="windows"),
                                          pytest.param(True, id="proposals",
                                                       marks=pytest.mark.slow)], indirect=True)
def test_softmax_arm_is_the_engines_eval(tiny_workdir):
    """The stage's softmax arm (its own feature pass, `detect_from_head` on the cached windows)
    reproduces the engine's eval of the run, on dense windows and on per-scene proposals (which
    the engine's eval must pass to `detect`)."""
    settings = run_lib.Settings(train_images=4, initial_negatives=20, batch_size=4)
    arm = run_lib.run_rcnn_svm(str(tiny_workdir), None, settings)["test"]["softmax"]
    _assert_softmax_arm_is_the_engines_eval(tiny_workdir, arm)

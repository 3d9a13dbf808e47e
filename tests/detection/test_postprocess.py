"""Class-aware NMS with fixed shapes against a float64 greedy loop per class."""

import numpy as np
import pytest

from cnnjax.detection.postprocess import batched_nms
from cnnjax.layers.roi import nms
from tests.detection.reference import iou_ref


def batched_nms_ref(boxes, scores, classes, iou_threshold, k, score_threshold):
    """Greedy NMS run separately per class, merged by decreasing score (ties: lower index)."""
    kept = []
    for c in sorted(set(classes.tolist())):
        members = [i for i in np.argsort(-scores, kind="stable") if classes[i] == c
                   and scores[i] > score_threshold]
        chosen = []
        for i in members:
            if all(iou_ref(boxes[i], boxes[j]) <= iou_threshold for j in chosen):
                chosen.append(i)
        kept += chosen
    kept.sort(key=lambda i: (-scores[i], i))
    return kept[:k]


@pytest.mark.parametrize("seed,k,score_threshold", [(0, 30, 0.0), (1, 5, 0.3), (2, 64, 0.0)])
def test_batched_nms_matches_per_class_loop(seed, k, score_threshold):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 40, (48, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 20, (48, 2))], axis=1).astype(np.float32)
    scores = rng.permutation(48).astype(np.float32) / 48  # distinct scores: a unique order
    classes = rng.integers(0, 3, 48)
    got = batched_nms(boxes, scores, classes, 0.4, k, score_threshold)
    want = batched_nms_ref(boxes.astype(np.float64), scores, classes, 0.4, k, score_threshold)
    n = len(want)
    assert int(got.valid.sum()) == n and not got.valid[n:].any()
    np.testing.assert_array_equal(np.asarray(got.classes[:n]), classes[want])
    np.testing.assert_allclose(np.asarray(got.boxes[:n]), boxes[want], rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(got.scores[:n]), scores[want], rtol=0, atol=0)
    assert not np.asarray(got.boxes[n:]).any() and not np.asarray(got.scores[n:]).any()


def test_other_classes_never_suppress():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    got = batched_nms(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 1, 0]), 0.5, 3)
    np.testing.assert_array_equal(np.asarray(got.valid), [True, True, False])
    np.testing.assert_array_equal(np.asarray(got.classes[:2]), [0, 1])


@pytest.mark.parametrize("call,message", [
    (lambda: batched_nms(np.zeros((2, 3)), np.zeros(2), np.zeros(2, int), 0.5, 2),
     "batched_nms: boxes.shape=(2, 3) is invalid; expected [M, 4]."),
    (lambda: batched_nms(np.zeros((2, 4)), np.zeros(3), np.zeros(2, int), 0.5, 2),
     "batched_nms: scores.shape=(3,) is invalid; expected (2,)."),
    (lambda: batched_nms(np.zeros((2, 4)), np.zeros(2), np.zeros(2, int), True, 2),
     "batched_nms: iou_threshold=True is invalid; expected a number in [0, 1]."),
    (lambda: batched_nms(np.zeros((2, 4)), np.zeros(2), np.zeros(2, int), 0.5, 0),
     "batched_nms: max_detections=0 is invalid; expected a positive integer."),
    # The known leftover: a bool is not a number for nms either.
    (lambda: nms(np.zeros((2, 4)), np.zeros(2), True, 2),
     "nms: iou_threshold=True is invalid; expected a number in [0, 1]."),
    (lambda: nms(np.zeros((2, 4)), np.zeros(2), 0.5, 2, score_threshold=False),
     "nms: score_threshold=False is invalid; expected a number (not NaN)."),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message

"""Class-aware NMS with fixed shapes against a float64 greedy loop per class."""

import jax
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


def test_same_class_iou_is_exact_for_high_classes_and_large_images():
    """Per-class IoUs are those of the boxes themselves: a class offset (torchvision's trick)
    of ~158,000 px for class 79 next to a 1000-px box rounds coordinates to 1/64 px in float32
    and turned this IoU of 0.500375 (> 0.5: suppressed) into one at or below the threshold."""
    boxes = np.array([[10, 10, 12, 12], [10.666, 10, 12.666, 12], [0, 0, 1000, 1000]],
                     np.float32)
    scores, classes = np.array([0.9, 0.8, 0.1], np.float32), np.array([79, 79, 0])
    assert iou_ref(boxes[0].astype(np.float64), boxes[1].astype(np.float64)) > 0.5
    got = batched_nms(boxes, scores, classes, 0.5, 3)
    np.testing.assert_array_equal(np.asarray(got.valid), [True, True, False])
    np.testing.assert_array_equal(np.asarray(got.classes[:2]), [79, 0])


@pytest.mark.parametrize("call,message", [
    (lambda: batched_nms(np.zeros((2, 3)), np.zeros(2), np.zeros(2, int), 0.5, 2),
     "batched_nms: boxes.shape=(2, 3) is invalid; expected [M, 4]."),
    (lambda: batched_nms(np.zeros((2, 4)), np.zeros(3), np.zeros(2, int), 0.5, 2),
     "batched_nms: scores.shape=(3,) is invalid; expected (2,)."),
    (lambda: batched_nms(np.zeros((2, 4)), np.zeros(2), np.zeros(2, int), True, 2),
     "batched_nms: iou_threshold=True is invalid; expected a number in [0, 1]."),
    (lambda: batched_nms(np.zeros((2, 4)), np.zeros(2), np.zeros(2, int), 0.5, 0),
     "batched_nms: max_detections=0 is invalid; expected a positive integer."),
    # A float class was truncated (0.7 -> class 0, suppressing class 0's boxes).
    (lambda: batched_nms(np.zeros((2, 4)), np.zeros(2), np.array([0.7, 0.0]), 0.5, 2),
     "batched_nms: classes.dtype='float64' is invalid; expected an integer array."),
    (lambda: batched_nms(np.zeros((2, 4)), np.zeros(2), np.zeros(2, np.float32), 0.5, 2),
     "batched_nms: classes.dtype='float32' is invalid; expected an integer array."),
    (lambda: batched_nms(np.zeros((2, 4)), np.zeros(2), np.zeros(2, bool), 0.5, 2),
     "batched_nms: classes.dtype='bool' is invalid; expected an integer array."),
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


@pytest.mark.parametrize("dtype", [np.bool_, np.int64, np.int32, np.uint8])
def test_bool_and_integer_scores_are_refused_as_torchvision_refuses_them(dtype):
    """A bool score kept every True box as a score-1 tie and integer scores tied equal ranks;
    torchvision's nms and batched_nms refuse both (float scores only), and so do these, naming
    the dtype given (int64, not the int32 jnp.asarray narrows it to)."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    scores, classes = np.array([1, 0, 1]).astype(dtype), np.array([0, 0, 1])
    for torch_boxes in (torch.from_numpy(boxes), torch.from_numpy(boxes.astype(dtype))):
        with pytest.raises(RuntimeError):
            torchvision.ops.nms(torch_boxes, torch.from_numpy(scores), 0.5)
        with pytest.raises(RuntimeError):
            torchvision.ops.batched_nms(torch_boxes, torch.from_numpy(scores),
                                        torch.from_numpy(classes), 0.5)
    name = np.dtype(dtype).name
    with pytest.raises(ValueError) as err:
        nms(boxes, scores, 0.5, 3)
    assert str(err.value) == (f"nms: scores.dtype='{name}' is invalid; expected a floating-point "
                              "array (e.g. float32 probabilities or logits).")
    with pytest.raises(ValueError) as err:
        batched_nms(boxes, scores, classes, 0.5, 3)
    assert str(err.value) == (f"batched_nms: scores.dtype='{name}' is invalid; expected a "
                              "floating-point array (e.g. float32 probabilities or logits).")


@pytest.mark.parametrize("dtype", [np.float16, np.float64, jax.numpy.bfloat16])
def test_every_float_score_dtype_ranks_as_float32(dtype):
    """Half, bfloat16 and float64 scores are accepted (torchvision's CUDA nms takes half too)
    and keep what float32 scores keep."""
    boxes, scores, classes = _candidates(2)
    want = batched_nms(boxes, scores, classes, 0.4, 64)
    got = batched_nms(boxes, scores.astype(dtype), classes, 0.4, 64)
    np.testing.assert_array_equal(np.asarray(got.boxes), np.asarray(want.boxes))
    np.testing.assert_array_equal(np.asarray(nms(boxes, scores.astype(dtype), 0.4, 64)[0]),
                                  np.asarray(nms(boxes, scores, 0.4, 64)[0]))


def test_float64_scores_rank_in_float64_under_x64():
    """Under x64, float64 scores were cast to float32: 0.5 + 1e-12 tied 0.5 and the lower index
    (the lower score) was kept, where `nms` and torchvision keep the higher; a score just above
    the threshold was dropped as equal to it."""
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9]], np.float64)  # IoU 0.9
    with jax.enable_x64(True):
        scores = np.array([0.5, 0.5 + 1e-12])
        kept = batched_nms(boxes, scores, np.array([0, 0]), 0.5, 2)
        assert kept.scores.dtype == np.float64
        np.testing.assert_array_equal(np.asarray(kept.boxes[0]), boxes[1])
        np.testing.assert_array_equal(np.asarray(kept.valid), [True, False])
        np.testing.assert_array_equal(np.asarray(nms(boxes, scores, 0.5, 2)[0])[:1], [1])
        above = batched_nms(boxes, np.array([0.3 + 1e-12, 0.0]), np.array([0, 1]), 0.5, 2,
                            score_threshold=0.3)
        np.testing.assert_array_equal(np.asarray(above.valid), [True, False])


@pytest.mark.parametrize("score_threshold", [0.5, 0.25, 0.0])
def test_a_score_tied_to_the_threshold_is_dropped_as_tensorflow_drops_it(score_threshold):
    """Candidates are `score > score_threshold`, strictly: a score exactly at the threshold (here
    in each of two classes) is dropped, as tf.image.non_max_suppression drops it (run per class,
    merged by decreasing score)."""
    tf = pytest.importorskip("tensorflow")
    boxes = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10],
                      [0, 40, 10, 50], [20, 40, 30, 50]], np.float32)
    scores = np.array([0.9, 0.6, score_threshold, 0.7, score_threshold, 0.8], np.float32)
    classes = np.array([0, 0, 0, 1, 1, 1])
    kept = []
    for c in (0, 1):
        members = np.flatnonzero(classes == c)
        chosen = tf.image.non_max_suppression(boxes[members][:, [1, 0, 3, 2]], scores[members],
                                              len(members), 0.5, score_threshold).numpy()
        kept += members[chosen].tolist()
    kept.sort(key=lambda i: (-scores[i], i))
    assert kept == [0, 5, 3]  # box 1 suppressed by box 0 (IoU 0.9); boxes 2 and 4 tied, dropped
    got = batched_nms(boxes, scores, classes, 0.5, 6, score_threshold)
    np.testing.assert_array_equal(np.asarray(got.valid), [True] * 3 + [False] * 3)
    np.testing.assert_array_equal(np.asarray(got.boxes[:3]), boxes[kept])
    np.testing.assert_array_equal(np.asarray(got.classes[:3]), classes[kept])


def _candidates(seed, m=20):
    """`2 m` boxes: `m` random ones and a jittered copy of each (same class), distinct scores."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 40, (m, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 20, (m, 2))], axis=1)
    boxes = np.concatenate([boxes, boxes + rng.normal(0, 0.5, boxes.shape)]).astype(np.float32)
    classes = np.tile(rng.integers(0, 3, m), 2)
    return boxes, (rng.permutation(2 * m).astype(np.float32) + 1) / (2 * m), classes


@pytest.mark.parametrize("garbage", [np.nan, np.inf, 1e30])
def test_dropped_rows_may_hold_anything(garbage):
    """Rows at or below `score_threshold` (padding) never change the result, whatever they hold:
    one NaN or huge row used to enter the class offsets and stop every suppression."""
    boxes, scores, classes = _candidates(0)
    pad = np.array([[garbage, -garbage, garbage, garbage], [0, 0, garbage, garbage]], np.float32)
    all_boxes = np.concatenate([boxes, pad])
    all_scores = np.concatenate([scores, np.array([0.05, np.nan], np.float32)])
    all_classes = np.concatenate([classes, [7, -3]])
    want = batched_nms_ref(boxes.astype(np.float64), scores, classes, 0.4, 64, 0.05)
    n = len(want)
    assert n < len(boxes) - 10  # NMS suppresses many (no cap: max_detections > M)
    for call in (batched_nms, jax.jit(batched_nms, static_argnums=(3, 4, 5))):
        got = call(all_boxes, all_scores, all_classes, 0.4, 64, 0.05)
        assert int(got.valid.sum()) == n
        np.testing.assert_array_equal(np.asarray(got.boxes[:n]), boxes[want])
        np.testing.assert_array_equal(np.asarray(got.classes[:n]), classes[want])


def test_torchvision_agrees_when_padding_is_garbage():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    boxes, scores, classes = _candidates(1)
    keep = torchvision.ops.batched_nms(torch.tensor(boxes), torch.tensor(scores),
                                       torch.tensor(classes), 0.4).numpy()
    padded = np.concatenate([boxes, np.full((3, 4), np.nan, np.float32)])
    got = jax.jit(batched_nms, static_argnums=(3, 4, 5))(
        padded, np.concatenate([scores, np.zeros(3, np.float32)]),
        np.concatenate([classes, [0, 1, 2]]), 0.4, 64, 0.0)
    assert int(got.valid.sum()) == len(keep)
    np.testing.assert_array_equal(np.asarray(got.boxes[:len(keep)]), boxes[keep])


def test_non_finite_candidates_are_dropped_under_jit():
    boxes, scores, classes = _candidates(2)
    bad = boxes.copy()
    bad[0] = [np.nan, 0, 1, 1]
    got = jax.jit(batched_nms, static_argnums=(3, 4, 5))(bad, scores, classes, 0.4, 40, 0.0)
    want = batched_nms_ref(boxes[1:].astype(np.float64), scores[1:], classes[1:], 0.4, 40, 0.0)
    assert int(got.valid.sum()) == len(want)
    np.testing.assert_array_equal(np.asarray(got.boxes[:len(want)]), boxes[1:][want])


@pytest.mark.parametrize("box,score,message", [
    ([10, 10, 0, 0], 0.9, "batched_nms: boxes[0]=[10.0, 10.0, 0.0, 0.0] is invalid; expected "
                          "x1 <= x2 and y1 <= y2 (boxes are (x1, y1, x2, y2))."),
    ([np.nan, 0, 1, 1], 0.9, "batched_nms: boxes[0]=[nan, 0.0, 1.0, 1.0] is invalid; expected "
                             "finite coordinates."),
    ([10, 10, 0, 0], 0.0, None),  # not a candidate (score <= 0.0): padding, not checked
])
def test_concrete_candidate_boxes_are_checked_as_nms_does(box, score, message):
    boxes = np.array([box, [0, 0, 5, 5]], np.float32)
    call = lambda: batched_nms(boxes, np.array([score, 0.8]), np.array([0, 0]), 0.5, 2)
    if message is None:
        np.testing.assert_array_equal(np.asarray(call().valid), [True, False])
        return
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        nms(boxes, np.array([score, 0.8]), 0.5, 2)
    assert str(err.value) == message.replace("batched_nms", "nms")


def test_no_candidates_give_all_padding():
    """`M = 0` candidates (e.g. an image given no proposals) is `max_detections` padding rows,
    as `nms` gives, eager, under jit and through the R-CNN family's `detect_from_head`."""
    from cnnjax.models.faster_rcnn import detect_from_head

    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
    for call in (batched_nms, jax.jit(batched_nms, static_argnums=(3, 4, 5))):
        got = call(*empty, 0.5, 3, 0.05)
        assert got.boxes.shape == (3, 4) and got.boxes.dtype == np.float32
        assert got.scores.dtype == np.float32 and got.classes.dtype == np.int32
        assert not np.asarray(got.valid).any()
        assert not np.asarray(got.boxes).any() and not np.asarray(got.scores).any()
        assert not np.asarray(got.classes).any()
    # detect_from_head on proposals [N, 0, 4] (logits [N, 0, C + 1], deltas [N, 0, C + 1, 4]).
    det = detect_from_head(np.zeros((2, 0, 4), np.float32), np.zeros((2, 0, 4, 4), np.float32),
                           np.zeros((2, 0, 4), np.float32), np.zeros((2, 0), bool), (32, 32),
                           0.05, 0.5, 5)
    assert det.boxes.shape == (2, 5, 4) and not np.asarray(det.valid).any()

"""The RPN proposal layer against a float64 NumPy re-implementation of py-faster-rcnn's
proposal_layer steps (decode, clip, min-size filter, top-n, greedy NMS loop, top-n)."""

import math

import jax
import numpy as np
import pytest

from cnnjax.detection.anchors import anchor_grid, generate_anchors
from cnnjax.detection.proposals import rpn_proposals
from tests.detection.reference import iou_ref

CLAMP = math.log(1000.0 / 16)


def _proposals_ref(logits, deltas, anchors, image_size, pre, post, thresh, min_size):
    """Float64 loop version: returns (kept boxes [k, 4], kept logits [k], max IoU margin to the
    threshold seen by NMS, min size margin) so the test can check nothing sits on a boundary."""
    height, width = image_size
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    cx, cy = deltas[:, 0] * aw + ax, deltas[:, 1] * ah + ay
    w = np.exp(np.minimum(deltas[:, 2], CLAMP)) * aw
    h = np.exp(np.minimum(deltas[:, 3], CLAMP)) * ah
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    size_margin = np.min(np.abs(sides - min_size))
    survivors = [i for i in range(len(boxes)) if sides[i] >= min_size]
    survivors.sort(key=lambda i: -logits[i])
    survivors = survivors[:pre]
    kept, iou_margin = [], 1.0
    for i in survivors:
        ious = [iou_ref(boxes[i], boxes[k]) for k in kept]
        iou_margin = min([iou_margin] + [abs(v - thresh) for v in ious])
        if all(v <= thresh for v in ious):
            kept.append(i)
    kept = kept[:post]
    return boxes[kept], logits[kept], iou_margin, size_margin


def _scene(seed, feature=(4, 5), stride=16, delta_scale=0.3):
    rng = np.random.default_rng(seed)
    anchors = np.asarray(anchor_grid(feature, stride,
                                     generate_anchors(stride, (0.5, 1.0, 2.0), (1.0, 2.0))),
                         np.float64)
    logits = rng.normal(size=len(anchors)) * 3  # continuous: no ties
    deltas = rng.normal(scale=delta_scale, size=(len(anchors), 4))
    size = (feature[0] * stride, feature[1] * stride)
    return (logits.astype(np.float32), deltas.astype(np.float32), anchors.astype(np.float32),
            size)


def _check(got, ref_boxes, ref_logits, post):
    count = len(ref_boxes)
    valid = np.asarray(got.valid)
    np.testing.assert_array_equal(valid, np.arange(post) < count)
    np.testing.assert_allclose(np.asarray(got.boxes)[:count], ref_boxes, rtol=0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(got.scores)[:count], 1 / (1 + np.exp(-ref_logits)),
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got.boxes)[count:] == 0)
    assert np.all(np.asarray(got.scores)[count:] == 0)


@pytest.mark.parametrize("seed, pre, post, thresh, min_size", [
    (0, 40, 15, 0.7, 4.0),  # NMS and the top-n cuts both act
    (1, 60, 60, 0.5, 8.0),  # pre_nms_top_n = N; post > survivors: padding
    (2, 100, 10, 0.3, 0.0),  # pre_nms_top_n > N (capped); no size filter
    (3, 20, 30, 0.7, 12.0),  # post > pre: always padded
])
def test_matches_float64_reference(seed, pre, post, thresh, min_size):
    logits, deltas, anchors, size = _scene(seed)
    ref_boxes, ref_logits, iou_margin, size_margin = _proposals_ref(
        logits.astype(np.float64), deltas.astype(np.float64), anchors.astype(np.float64), size,
        pre, post, thresh, min_size)
    # float32 decisions equal float64 ones: no IoU or side within rounding of a threshold.
    assert iou_margin > 1e-4 and (min_size == 0 or size_margin > 1e-3)
    assert len(ref_boxes) > 0
    got = rpn_proposals(logits, deltas, anchors, size, pre_nms_top_n=pre, post_nms_top_n=post,
                        nms_thresh=thresh, min_size=min_size)
    assert got.boxes.shape == (post, 4) and got.scores.shape == (post,)
    _check(got, ref_boxes, ref_logits, post)


def test_min_size_filter_and_padding_when_few_boxes_survive():
    logits, deltas, anchors, size = _scene(4)
    # Shrink all but 3 boxes below the minimum size (exp(-3) x anchors of >= 11 pixels: < 1).
    deltas = deltas.copy()
    deltas[3:, 2:] = -3.0
    got = rpn_proposals(logits, deltas, anchors, size, pre_nms_top_n=30, post_nms_top_n=10,
                        nms_thresh=1.0, min_size=2.0)
    ref_boxes, ref_logits, _, _ = _proposals_ref(
        logits.astype(np.float64), deltas.astype(np.float64), anchors.astype(np.float64), size,
        30, 10, 1.0, 2.0)
    assert len(ref_boxes) == 3  # the 3 large boxes only, even though they may rank low
    _check(got, ref_boxes, ref_logits, 10)
    # The highest-scoring box is small: with the filter off it comes first.
    deltas[int(np.argmax(logits)), 2:] = -3.0
    unfiltered = rpn_proposals(logits, deltas, anchors, size, pre_nms_top_n=30,
                               post_nms_top_n=10, nms_thresh=1.0, min_size=0.0)
    assert np.asarray(unfiltered.valid).all()
    assert float(unfiltered.scores[0]) == pytest.approx(1 / (1 + math.exp(-logits.max())))


def test_overlapping_boxes_hand_case():
    # Three anchors: 0 and 1 overlap with IoU 75 / 125 = 0.6 (10x10 boxes shifted by 2.5 in x),
    # anchor 2 is far away; zero deltas decode to the anchors themselves.
    anchors = np.array([[0, 0, 10, 10], [2.5, 0, 12.5, 10], [30, 30, 40, 40]], np.float32)
    logits = np.array([1.0, 2.0, 0.5], np.float32)
    deltas = np.zeros((3, 4), np.float32)
    got = rpn_proposals(logits, deltas, anchors, (50, 50), pre_nms_top_n=3, post_nms_top_n=4,
                        nms_thresh=0.5, min_size=1.0)
    np.testing.assert_array_equal(np.asarray(got.valid), [True, True, False, False])
    np.testing.assert_allclose(np.asarray(got.boxes)[:2], anchors[[1, 2]])
    kept = rpn_proposals(logits, deltas, anchors, (50, 50), pre_nms_top_n=3, post_nms_top_n=4,
                         nms_thresh=0.7, min_size=1.0)
    np.testing.assert_allclose(np.asarray(kept.boxes)[:3], anchors[[1, 0, 2]])
    # The image is clipped: (50, 8) cuts the far box to nothing in y (< min_size).
    clipped = rpn_proposals(logits, deltas, anchors, (8, 50), pre_nms_top_n=3, post_nms_top_n=4,
                            nms_thresh=0.7, min_size=1.0)
    np.testing.assert_array_equal(np.asarray(clipped.valid), [True, True, False, False])
    np.testing.assert_allclose(np.asarray(clipped.boxes)[:2], [[2.5, 0, 12.5, 8], [0, 0, 10, 8]])


@pytest.mark.parametrize("logits", [[0.0, 0.0], [-0.0, 0.0], [0.0, -0.0]])
def test_tied_logits_keep_the_lower_index(logits):
    """Equal logits, +0.0 and -0.0 included (lax.top_k ranks +0.0 above -0.0): the box of the
    lower index is kept, as py-faster-rcnn's stable argsort and torchvision's nms keep it."""
    anchors = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], np.float32)  # IoU 0.82 > 0.7
    got = rpn_proposals(np.array(logits, np.float32), np.zeros((2, 4), np.float32), anchors,
                        (20, 20), min_size=0.0, post_nms_top_n=2)
    np.testing.assert_array_equal(np.asarray(got.valid), [True, False])
    np.testing.assert_array_equal(np.asarray(got.boxes)[0], anchors[0])


def test_jit_and_vmap_over_images_of_different_sizes():
    scenes = [_scene(seed) for seed in (5, 6)]
    anchors = scenes[0][2]
    logits = np.stack([s[0] for s in scenes])
    deltas = np.stack([s[1] for s in scenes])
    sizes = np.array([[64.0, 80.0], [40.0, 56.0]], np.float32)

    def one(lg, dl, hw):
        return rpn_proposals(lg, dl, anchors, hw, pre_nms_top_n=40, post_nms_top_n=15,
                             nms_thresh=0.7, min_size=4.0)

    batched = jax.jit(jax.vmap(one))(logits, deltas, sizes)
    assert batched.boxes.shape == (2, 15, 4)
    for i in range(2):
        ref_boxes, ref_logits, iou_margin, _ = _proposals_ref(
            logits[i].astype(np.float64), deltas[i].astype(np.float64),
            anchors.astype(np.float64), tuple(sizes[i]), 40, 15, 0.7, 4.0)
        assert iou_margin > 1e-4
        _check(jax.tree.map(lambda x, i=i: x[i], batched), ref_boxes, ref_logits, 15)


@pytest.mark.parametrize("kwargs, message", [
    (dict(anchors=np.zeros((6, 3))), "rpn_proposals: anchors.shape=(6, 3) is invalid; expected "
                                     "[N, 4] boxes"),
    (dict(objectness=np.zeros(5)), "rpn_proposals: objectness.shape=(5,) is invalid; expected "
                                   "(6,), one logit per anchor."),
    (dict(deltas=np.zeros((6, 2))), "rpn_proposals: deltas.shape=(6, 2) is invalid; expected "
                                    "(6, 4)"),
    (dict(objectness=np.zeros(0), deltas=np.zeros((0, 4)), anchors=np.zeros((0, 4))),
     "rpn_proposals: anchors.shape=(0, 4) is invalid; expected at least one anchor."),
    (dict(image_size=(10,)), "rpn_proposals: image_size=(10,) is invalid; expected (height, "
                             "width)"),
    (dict(pre_nms_top_n=0), "rpn_proposals: pre_nms_top_n=0 is invalid; expected a positive "
                            "integer."),
    (dict(post_nms_top_n=2.0), "rpn_proposals: post_nms_top_n=2.0 is invalid"),
    (dict(nms_thresh=1.5), "rpn_proposals: nms_thresh=1.5 is invalid; expected a number in "
                           "[0, 1]."),
    (dict(min_size=-1), "rpn_proposals: min_size=-1 is invalid; expected a finite number >= 0."),
    (dict(min_size=math.inf), "rpn_proposals: min_size=inf is invalid"),
    # Larger than the image: every (clipped) proposal was silently dropped; equal is fine.
    (dict(min_size=33.0, image_size=(48, 32)), "rpn_proposals: min_size=33.0 is invalid; "
     "expected at most 32, the shorter side of the 48x32 (height x width) image: proposals are "
     "clipped to the image, so every one would be dropped."),
    (dict(min_size=33.0, image_size=np.array([48, 32])), "rpn_proposals: min_size=33.0 is "
     "invalid; expected at most 32, the shorter side of the 48x32"),  # concrete array: checked
    (dict(weights=(1, 1, 1)), "rpn_proposals: weights=(1, 1, 1) is invalid; expected four "
                              "positive numbers"),
    (dict(scale_clamp=0), "rpn_proposals: scale_clamp=0 is invalid; expected a positive number"),
    # A degenerate anchor decodes to no box (x2 < x1: every proposal silently invalid) or, with
    # min_size=0, to zero-size "valid" proposals.
    (dict(anchors=np.array([[0, 0, 4, 4]] * 5 + [[8, 0, 4, 4]], float)),
     "rpn_proposals: anchors[5]=[8.0, 0.0, 4.0, 4.0] is invalid; expected a positive finite "
     "width and height (x1 < x2, y1 < y2)."),
    (dict(anchors=np.array([[0, 0, 4, 4]] * 5 + [[4, 0, 4, 4]], float), min_size=0),
     "rpn_proposals: anchors[5]=[4.0, 0.0, 4.0, 4.0] is invalid"),
])
def test_errors(kwargs, message):
    args = dict(objectness=np.zeros(6), deltas=np.zeros((6, 4)),
                anchors=np.tile([0.0, 0.0, 4.0, 4.0], (6, 1)),
                image_size=(32, 32))
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        rpn_proposals(args.pop("objectness"), args.pop("deltas"), args.pop("anchors"),
                      args.pop("image_size"), **args)
    assert message in str(err.value)

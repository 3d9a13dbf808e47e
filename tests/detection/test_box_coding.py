"""Box coding against hand-computed deltas and a float64 NumPy re-implementation of torchvision's
BoxCoder, clip_boxes_to_image and remove_small_boxes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.detection.box_coding import (
    DEFAULT_SCALE_CLAMP,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    min_size_mask,
)

DETECTRON = (10.0, 10.0, 5.0, 5.0)


def _random_boxes(rng, count, extent=200.0, min_side=1.0):
    xy = rng.uniform(-extent / 4, extent, size=(count, 2))
    wh = rng.uniform(min_side, extent / 2, size=(count, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def _encode_ref(boxes, anchors, weights):
    wx, wy, ww, wh = weights
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
    return np.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah,
                     ww * np.log(bw / aw), wh * np.log(bh / ah)], axis=1)


TORCHVISION_CLIP = math.log(1000.0 / 16)


def _decode_ref(deltas, anchors, weights, clip=TORCHVISION_CLIP):
    wx, wy, ww, wh = weights
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    cx = deltas[:, 0] / wx * aw + ax
    cy = deltas[:, 1] / wy * ah + ay
    w = np.exp(np.minimum(deltas[:, 2] / ww, clip)) * aw
    h = np.exp(np.minimum(deltas[:, 3] / wh, clip)) * ah
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def test_encode_hand_values():
    # Anchor centred (5, 10), 10 x 20; box centred (7, 24), 10 x 40.
    anchor, box = [[0.0, 0.0, 10.0, 20.0]], [[2.0, 4.0, 12.0, 44.0]]
    np.testing.assert_allclose(np.asarray(encode_boxes(box, anchor)),
                               [[0.2, 0.7, 0.0, math.log(2)]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(encode_boxes(box, anchor, DETECTRON)),
                               [[2.0, 7.0, 0.0, 5 * math.log(2)]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(decode_boxes([[2.0, 7.0, 0.0, 5 * math.log(2)]],
                                                       anchor, DETECTRON)), box, rtol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), DETECTRON])
def test_encode_decode_match_float64_reference(weights):
    rng = np.random.default_rng(1)
    boxes, anchors = _random_boxes(rng, 300), _random_boxes(rng, 300)
    deltas = _encode_ref(boxes, anchors, weights)
    np.testing.assert_allclose(np.asarray(encode_boxes(boxes.astype(np.float32),
                                                       anchors.astype(np.float32), weights)),
                               deltas, rtol=1e-5, atol=1e-5)
    random_deltas = rng.normal(scale=2.0, size=(300, 4)) * np.asarray(weights)
    expected = _decode_ref(random_deltas, anchors, weights)
    got = decode_boxes(random_deltas.astype(np.float32), anchors.astype(np.float32), weights)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), DETECTRON])
def test_decode_inverts_encode(weights):
    rng = np.random.default_rng(2)
    boxes, anchors = _random_boxes(rng, 200), _random_boxes(rng, 200)
    with jax.enable_x64(True):
        roundtrip = decode_boxes(encode_boxes(boxes, anchors, weights), anchors, weights)
        assert roundtrip.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(roundtrip), boxes, rtol=0, atol=1e-10)
    roundtrip = decode_boxes(encode_boxes(boxes.astype(np.float32), anchors.astype(np.float32),
                                          weights), anchors.astype(np.float32), weights)
    np.testing.assert_allclose(np.asarray(roundtrip), boxes, rtol=0, atol=2e-3)


def test_decode_clamps_scale_like_torchvision():
    anchor = np.array([[0.0, 0.0, 16.0, 8.0]])
    deltas = np.array([[0.0, 0.0, 20.0, -30.0]])  # exp(20) would be 4.9e8 x the anchor width
    got = np.asarray(decode_boxes(deltas, anchor))
    width = 1000.0 / 16 * 16  # clamped at log(1000 / 16): 62.5 x the anchor width
    np.testing.assert_allclose(got[0], [8 - width / 2, 4 - 4 * math.exp(-30), 8 + width / 2,
                                        4 + 4 * math.exp(-30)], rtol=1e-5)
    np.testing.assert_allclose(got, _decode_ref(deltas, anchor, (1, 1, 1, 1)), rtol=1e-5)
    assert math.log(62.5) == pytest.approx(DEFAULT_SCALE_CLAMP)
    unclamped = np.asarray(decode_boxes([[0.0, 0.0, 5.0, 0.0]], anchor, scale_clamp=math.inf))
    assert unclamped[0, 2] - unclamped[0, 0] == pytest.approx(16 * math.exp(5), rel=1e-5)


def test_decode_broadcasts_class_deltas_and_runs_under_jit():
    rng = np.random.default_rng(3)
    proposals = _random_boxes(rng, 5).astype(np.float32)
    deltas = rng.normal(size=(5, 3, 4)).astype(np.float32)
    got = jax.jit(lambda d, a: decode_boxes(d, a, DETECTRON))(deltas, proposals[:, None])
    assert got.shape == (5, 3, 4)
    for c in range(3):
        np.testing.assert_allclose(np.asarray(got[:, c]),
                                   _decode_ref(deltas[:, c].astype(np.float64),
                                               proposals.astype(np.float64), DETECTRON),
                                   rtol=1e-5, atol=1e-3)


def test_clip_boxes():
    boxes = np.array([[-5.0, 3.0, 40.0, 25.0], [10.0, -2.0, 12.0, 50.0]])
    np.testing.assert_array_equal(np.asarray(clip_boxes(boxes, (20, 30))),
                                  [[0, 3, 30, 20], [10, 0, 12, 20]])
    np.testing.assert_array_equal(np.asarray(clip_boxes(boxes, (np.int64(20), np.float32(30)))),
                                  [[0, 3, 30, 20], [10, 0, 12, 20]])
    sizes = np.array([[20.0, 30.0], [100.0, 11.0]], np.float32)
    per_image = jax.jit(jax.vmap(clip_boxes, in_axes=(None, 0)))(boxes.astype(np.float32), sizes)
    np.testing.assert_array_equal(np.asarray(per_image[1]), [[0, 3, 11, 25], [10, 0, 11, 50]])


def test_min_size_mask():
    boxes = np.array([[0, 0, 4, 4], [0, 0, 3.9, 10], [0, 0, 10, 3.9], [5, 5, 5, 5]], np.float32)
    np.testing.assert_array_equal(np.asarray(min_size_mask(boxes, 4)), [True, False, False, False])
    np.testing.assert_array_equal(np.asarray(min_size_mask(boxes, 0)), [True] * 4)


@pytest.mark.parametrize("call, message", [
    (lambda: encode_boxes(np.zeros((3, 3)), np.ones((3, 4))),
     "encode_boxes: boxes.shape=(3, 3) is invalid; expected [..., 4]"),
    (lambda: encode_boxes(np.zeros((3, 4)), np.ones((2, 4))),
     "encode_boxes: boxes.shape=(3, 4) is invalid; expected a shape that broadcasts with "
     "anchors.shape=(2, 4)."),
    (lambda: encode_boxes(np.zeros((3, 4)), np.ones((3, 4)), (1, 1, 1)),
     "encode_boxes: weights=(1, 1, 1) is invalid; expected four positive numbers"),
    (lambda: decode_boxes(np.zeros((3, 4)), np.ones((3, 4)), (10, 10, 0, 5)),
     "decode_boxes: weights=(10, 10, 0, 5) is invalid"),
    (lambda: decode_boxes(np.zeros((3, 4)), np.ones((2, 4))),
     "decode_boxes: deltas.shape=(3, 4) is invalid; expected a shape that broadcasts with "
     "anchors.shape=(2, 4)."),
    (lambda: decode_boxes(np.zeros(4), np.ones(3)),
     "decode_boxes: anchors.shape=(3,) is invalid"),
    (lambda: decode_boxes(np.zeros(4), np.ones(4), scale_clamp=0),
     "decode_boxes: scale_clamp=0 is invalid; expected a positive number"),
    (lambda: clip_boxes(np.zeros((2, 4)), (10,)),
     "clip_boxes: image_size=(10,) is invalid; expected (height, width)"),
    (lambda: clip_boxes(np.zeros((2, 4)), (10, -1)), "clip_boxes: image_size=(10, -1) is invalid"),
    # a concrete [2] array was trusted: (10, 0) clipped every box to zero width silently
    (lambda: clip_boxes(np.zeros((2, 4)), np.array([10.0, 0.0])),
     "clip_boxes: image_size=[10.0, 0.0] is invalid; expected (height, width), two positive "
     "numbers."),
    (lambda: clip_boxes(np.zeros((2, 4)), jnp.array([np.nan, 8.0])),
     "clip_boxes: image_size=[nan, 8.0] is invalid"),
    (lambda: clip_boxes(np.zeros((2, 2)), (10, 10)), "clip_boxes: boxes.shape=(2, 2) is invalid"),
    (lambda: min_size_mask(np.zeros((2, 4)), -1), "min_size_mask: min_size=-1 is invalid; "
                                                  "expected a finite number >= 0."),
])
def test_errors(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


@pytest.mark.parametrize("anchors,message", [
    (np.array([0.0, 0, 0, 5]), "encode_boxes: anchors=[0.0, 0.0, 0.0, 5.0] is invalid; expected "
                               "a positive finite width and height (x1 < x2, y1 < y2)."),
    (np.array([[[0.0, 0, 4, 4], [0, 0, 4, 4]], [[0, 0, 4, 4], [2, 3, 6, 3]]]),
     "encode_boxes: anchors[1, 1]=[2.0, 3.0, 6.0, 3.0] is invalid"),
    (np.array([[1.0, 1, np.nan, 4]]), "encode_boxes: anchors[0]=[1.0, 1.0, nan, 4.0] is invalid"),
    (np.array([[5.0, 0, 1, 4]]), "encode_boxes: anchors[0]=[5.0, 0.0, 1.0, 4.0] is invalid"),
])
def test_encode_refuses_concrete_anchors_without_positive_size(anchors, message):
    """The docstring's contract: a zero-size anchor gave infinite targets (tx = dx / 0)."""
    with pytest.raises(ValueError) as err:
        encode_boxes(np.array([0.0, 0, 5, 5]), anchors)
    assert str(err.value).startswith(message)
    # Traced anchors cannot be checked; the masked callers (padding) still compile.
    out = jax.jit(encode_boxes)(np.array([0.0, 0, 5, 5]), np.array([0.0, 0, 0, 5]))
    assert out.shape == (4,)

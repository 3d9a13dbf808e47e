"""Smooth L1 against py-faster-rcnn's sigma formula and torchvision's beta formula (float64 NumPy),
and the masked mean against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.detection.anchors import anchor_grid, anchors_inside, generate_anchors
from cnnjax.detection.box_coding import encode_boxes
from cnnjax.detection.losses import masked_mean, smooth_l1
from cnnjax.detection.matching import label_anchors, sample_balanced


def _smooth_l1_sigma_ref(x, sigma):
    """py-faster-rcnn's SmoothL1Loss layer: 0.5 (sigma x)^2 if |x| < 1 / sigma^2, else
    |x| - 0.5 / sigma^2."""
    x = np.abs(x)
    return np.where(x < 1.0 / sigma**2, 0.5 * (sigma * x) ** 2, x - 0.5 / sigma**2)


def _smooth_l1_beta_ref(x, beta):
    """torchvision / Fast R-CNN eq. 3 with a threshold beta."""
    x = np.abs(x)
    return np.where(x < beta, 0.5 * x**2 / beta, x - 0.5 * beta)


def test_smooth_l1_matches_references():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(scale=2.0, size=(2, 50, 4))
    x = pred - target
    for beta in (1.0, 1 / 9, 0.25, 3.0):
        got = smooth_l1(pred.astype(np.float32), target.astype(np.float32), beta)
        assert got.shape == (50, 4) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), _smooth_l1_beta_ref(x, beta), rtol=1e-5,
                                   atol=1e-6)
    np.testing.assert_allclose(np.asarray(smooth_l1(pred, target, 1 / 9)),
                               _smooth_l1_sigma_ref(x, 3.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(smooth_l1(pred, target, 0.0)), np.abs(x), rtol=1e-5,
                               atol=1e-6)
    # Hand values at beta = 1: 0.5 * 0.5^2 = 0.125, 2 - 0.5 = 1.5, and the join at |x| = 1.
    np.testing.assert_allclose(np.asarray(smooth_l1(np.array([0.5, -2.0, 1.0]), 0.0)),
                               [0.125, 1.5, 0.5], rtol=1e-7)


def test_smooth_l1_gradient_is_finite_where_masked_out_of_infinite_targets():
    pred = jnp.array([[0.3, -0.2, 0.1, 2.0], [0.5, 0.5, 0.5, 0.5]])
    target = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -jnp.inf, -jnp.inf]])  # padded gt
    mask = jnp.array([True, False])

    def loss(p):
        return masked_mean(smooth_l1(p, target, 1 / 9), mask)

    value, grad = jax.jit(jax.value_and_grad(loss))(pred)
    expected = _smooth_l1_beta_ref(np.asarray(pred[0]) - 0.0, 1 / 9).sum()
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad[1]), 0.0)
    # d/dx of the smooth L1 at beta = 1/9: 9x inside, sign(x) outside.
    np.testing.assert_allclose(np.asarray(grad[0]), [1.0, -1.0, 0.9, 1.0], rtol=1e-6)


def test_masked_mean_matches_numpy():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(30, 4)).astype(np.float32)
    mask = rng.random(30) < 0.4
    np.testing.assert_allclose(float(masked_mean(values, mask)),
                               values[mask].sum(axis=1).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(masked_mean(values[:, 0], mask)), values[mask, 0].mean(),
                               rtol=1e-5)
    full = rng.random((30, 4)) < 0.5
    np.testing.assert_allclose(float(masked_mean(values, full)), values[full].mean(), rtol=1e-5)
    values[~mask] = np.nan
    assert np.isfinite(float(masked_mean(values, mask)))
    assert float(masked_mean(values, np.zeros(30, bool))) == 0.0
    assert float(jax.jit(masked_mean)(values[:, 1], mask)) == pytest.approx(
        float(values[mask, 1].mean()), rel=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_masked_mean_of_half_precision_values_accumulates_in_float32(dtype):
    # 1000 selected rows of 4 x 25 (exact in both dtypes): the float16 sum 100000 > 65504 would
    # overflow to inf. Reference: NumPy float64, exact here (tolerance 0).
    values = np.full((1200, 4), 25.0)
    mask = np.arange(1200) < 1000
    got = masked_mean(jnp.asarray(values, dtype), mask)
    assert got.dtype == jnp.float32
    assert float(got) == values[mask].sum(axis=1).mean() == 100.0


def test_rpn_loss_composes_under_jit_with_padded_gt():
    """The primitives chained as an RPN box loss under one jit (fixed shapes, gt padded with
    zeros): the value matches NumPy on the returned targets and sample, and the gradient is finite
    and nonzero exactly on the sampled positives although padded gt boxes encode to -inf."""
    anchors = anchor_grid((3, 4), 16, generate_anchors(16, (0.5, 1, 2), (1, 2)))
    # Padding first: anchors crossing the image edge match no gt and point at it (index 0).
    gt = np.array([[0, 0, 0, 0], [4, 6, 30, 40], [30, 10, 60, 30]], np.float32)
    gt_valid = np.array([False, True, True])
    pred = np.random.default_rng(2).normal(size=(anchors.shape[0], 4)).astype(np.float32)

    def loss(pred, key):
        out = label_anchors(anchors, gt, gt_valid, 0.7, 0.3,
                            anchor_valid=anchors_inside(anchors, (48, 64)))
        pos, _ = sample_balanced(key, out.labels, 16, 0.5)
        targets = encode_boxes(jnp.asarray(gt)[out.matched_gt], anchors)
        return masked_mean(smooth_l1(pred, targets, 1 / 9), pos), (pos, targets)

    (value, (pos, targets)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        pred, jax.random.key(0))
    pos, targets, grad = np.asarray(pos), np.asarray(targets, np.float64), np.asarray(grad)
    assert 0 < pos.sum() <= 8 and np.all(np.isfinite(targets[pos]))
    assert np.isneginf(targets).any()  # the zero-size padded box's log(w / wa)
    expected = _smooth_l1_beta_ref(pred[pos] - targets[pos], 1 / 9).sum(axis=1).mean()
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad.any(axis=1), pos)


@pytest.mark.parametrize("call, message", [
    (lambda: smooth_l1(np.zeros(3), np.zeros(3), -1.0),
     "smooth_l1: beta=-1.0 is invalid; expected a finite number >= 0."),
    (lambda: smooth_l1(np.zeros(3), np.zeros(4)),
     "smooth_l1: target.shape=(4,) is invalid; expected a shape that broadcasts with "
     "pred.shape=(3,)."),
    (lambda: masked_mean(np.zeros((3, 4)), np.ones(3)),
     "masked_mean: mask.dtype='float64' is invalid; expected a bool array."),
    (lambda: masked_mean(np.zeros((3, 4)), np.ones(4, bool)),
     "masked_mean: mask.shape=(4,) is invalid; expected the leading shape of "
     "values.shape=(3, 4)."),
    (lambda: masked_mean(np.zeros(3), np.ones((3, 1), bool)),
     "masked_mean: mask.shape=(3, 1) is invalid"),
])
def test_errors(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)

"""Detection losses: smooth L1 for box regression and a masked mean over sampled anchors/RoIs."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from cnnjax.utils.validation import check_bool_array, check_number, invalid


def smooth_l1(pred: Any, target: Any, beta: float = 1.0) -> jax.Array:
    """Elementwise smooth L1 (Huber-like) loss of `pred - target`, same shape as the inputs.

    `0.5 x**2 / beta` where `|x| < beta`, else `|x| - 0.5 beta` (Fast R-CNN, Girshick 2015,
    eq. 3 at `beta = 1`; torchvision's `beta`). py-faster-rcnn's `sigma` is `beta = 1 / sigma**2`
    (its RPN uses `sigma = 3`, i.e. `beta = 1/9`). `beta = 0` is plain L1. Written so that
    gradients stay finite (zero) where the loss is masked out of infinite targets (e.g. `tw = -inf`
    from a padded zero-size box).
    """
    owner = "smooth_l1"
    pred = jnp.asarray(pred)
    target = jnp.asarray(target)
    try:
        jnp.broadcast_shapes(pred.shape, target.shape)
    except ValueError:
        raise invalid(owner, "target.shape", tuple(target.shape),
                      f"expected a shape that broadcasts with pred.shape={tuple(pred.shape)}") \
            from None
    width = check_number(owner, "beta", beta, "expected a finite number >= 0", low=0.0,
                         high_open=True)
    return _smooth_l1(pred, target, width)


@partial(jax.jit, static_argnames=("beta",))
def _smooth_l1(pred: jax.Array, target: jax.Array, beta: float) -> jax.Array:
    """`smooth_l1` after validation (`beta` static: 0 selects plain L1)."""
    dtype = jnp.promote_types(jnp.result_type(pred, target), jnp.float32)
    x = jnp.abs(pred.astype(dtype) - target.astype(dtype))
    if beta == 0.0:
        return x
    # Huber form 0.5 q^2 / beta + (|x| - q), q = min(|x|, beta): equal to the piecewise formula,
    # and its gradient never multiplies an infinite |x| by a zero cotangent (no NaN).
    quadratic = jnp.minimum(x, beta)
    return 0.5 * quadratic * quadratic / beta + (x - quadratic)


def masked_mean(values: Any, mask: Any) -> jax.Array:
    """Mean of `values` over the rows selected by `mask`, a scalar; 0 when nothing is selected.

    `mask` is bool with the leading shape of `values` (e.g. `[A]` for `[A]` or `[A, 4]` values);
    trailing axes are summed per row, so `[A, 4]` smooth-L1 terms give the per-box loss summed over
    the 4 coordinates and averaged over the selected boxes, the normalization of torchvision and
    Detectron. Unselected entries do not change the value (even if inf or NaN) and get a zero
    gradient. Accumulated in at least float32 (a float16 sum overflows past 65504), the result
    in that dtype.
    """
    owner = "masked_mean"
    check_bool_array(owner, "mask", mask)
    values = jnp.asarray(values)
    mask = jnp.asarray(mask)
    if mask.ndim > values.ndim or values.shape[:mask.ndim] != mask.shape:
        raise invalid(owner, "mask.shape", tuple(mask.shape),
                      f"expected the leading shape of values.shape={tuple(values.shape)}")
    return _masked_mean(values.astype(jnp.promote_types(values.dtype, jnp.float32)), mask)


@jax.jit
def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """`masked_mean` after validation."""
    expanded = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    total = jnp.sum(jnp.where(expanded, values, 0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(total.dtype)

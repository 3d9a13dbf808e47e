"""Box regression targets: encode boxes as deltas from anchors and decode them back, clip boxes to
the image, and mask out boxes too small to keep.

Boxes are `(x1, y1, x2, y2)` in continuous pixels (as `cnnjax.layers.roi`); widths are `x2 - x1`.
Deltas are `(tx, ty, tw, th)` (R-CNN, Girshick et al. 2014; Faster R-CNN eq. 2), times optional
weights `(wx, wy, ww, wh)`:

    tx = wx (x - xa) / wa    ty = wy (y - ya) / ha    tw = ww log(w / wa)    th = wh log(h / ha)

with `(x, y)` box centres and `(w, h)` sizes; Detectron's box head uses weights `(10, 10, 5, 5)`,
the RPN `(1, 1, 1, 1)`. This is torchvision's `BoxCoder` (no "+1" pixel widths).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from cnnjax.detection.anchors import check_anchor_sizes, image_size_pair
from cnnjax.utils.validation import check_number, invalid

# torchvision's `bbox_xform_clip`: decoded sizes grow at most 1000/16 = 62.5x their anchor's.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def check_box_weights(owner: str, arg: str,
                      weights: Sequence[float]) -> tuple[float, float, float, float]:
    """`weights` as four positive finite floats `(wx, wy, ww, wh)`, else raises."""
    try:
        values = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(0 < w < float("inf") for w in values):
        raise invalid(owner, arg, weights,
                      "expected four positive numbers (wx, wy, ww, wh)")
    return values  # type: ignore[return-value]


def check_scale_clamp(owner: str, scale_clamp: Any) -> float:
    """`scale_clamp` as a positive float (inf: no clamp), else raises."""
    return check_number(owner, "scale_clamp", scale_clamp,
                        "expected a positive number (or inf for no clamp)", low=0.0,
                        low_open=True)


def _boxes(owner: str, arg: str, boxes: Any) -> jax.Array:
    """`boxes` as a floating array `[..., 4]` (at least float32), else raises."""
    boxes = jnp.asarray(boxes)
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise invalid(owner, f"{arg}.shape", tuple(boxes.shape),
                      "expected [..., 4] (x1, y1, x2, y2 or tx, ty, tw, th)")
    return boxes.astype(jnp.promote_types(boxes.dtype, jnp.float32))


def _broadcast(owner: str, a: jax.Array, b: jax.Array, names: tuple[str, str]) -> None:
    """Raises unless the shapes of `a` and `b` broadcast together."""
    try:
        jnp.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise invalid(owner, f"{names[0]}.shape", tuple(a.shape),
                      f"expected a shape that broadcasts with {names[1]}.shape="
                      f"{tuple(b.shape)}") from None


def _centres(boxes: jax.Array) -> tuple[jax.Array, ...]:
    """`(centre x, centre y, width, height)` of `[..., 4]` boxes."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode_boxes(
    boxes: Any, anchors: Any, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> jax.Array:
    """Regression targets `[..., 4]` `(tx, ty, tw, th)` of `boxes` relative to `anchors`.

    `boxes` and `anchors` are `[..., 4]` and broadcast together. Anchors need positive width and
    height (concrete ones are checked: a zero-size anchor would give infinite targets); a box of
    zero width gives `tw = -inf` (padded ground truth: mask it out of the loss).
    """
    owner = "encode_boxes"
    boxes = _boxes(owner, "boxes", boxes)
    anchors = _boxes(owner, "anchors", anchors)
    _broadcast(owner, boxes, anchors, ("boxes", "anchors"))
    wx, wy, ww, wh = check_box_weights(owner, "weights", weights)
    check_anchor_sizes(owner, anchors)
    return _encode(boxes, anchors, (wx, wy, ww, wh))


@jax.jit
def _encode(boxes: jax.Array, anchors: jax.Array, weights: tuple[float, ...]) -> jax.Array:
    """`encode_boxes` after validation."""
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _centres(anchors)
    bx, by, bw, bh = _centres(boxes)
    return jnp.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah,
                      ww * jnp.log(bw / aw), wh * jnp.log(bh / ah)], axis=-1)


def decode_boxes(
    deltas: Any, anchors: Any, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> jax.Array:
    """Boxes `[..., 4]` predicted by `deltas` `(tx, ty, tw, th)` from `anchors`; inverse of
    `encode_boxes`.

    `tw / ww` and `th / wh` are clamped from above at `scale_clamp` (default `log(1000 / 16)`, as
    torchvision) before `exp`, so an untrained head cannot overflow to infinite boxes.
    `deltas` and `anchors` broadcast together (e.g. `[N, C, 4]` class-specific deltas with
    `[N, 1, 4]` proposals).
    """
    owner = "decode_boxes"
    deltas = _boxes(owner, "deltas", deltas)
    anchors = _boxes(owner, "anchors", anchors)
    _broadcast(owner, deltas, anchors, ("deltas", "anchors"))
    weights = check_box_weights(owner, "weights", weights)
    clamp = check_scale_clamp(owner, scale_clamp)
    return _decode(deltas, anchors, weights, clamp)


@jax.jit
def _decode(
    deltas: jax.Array, anchors: jax.Array, weights: tuple[float, ...], clamp: float,
) -> jax.Array:
    """`decode_boxes` after validation."""
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _centres(anchors)
    x = deltas[..., 0] / wx * aw + ax
    y = deltas[..., 1] / wy * ah + ay
    w = jnp.exp(jnp.minimum(deltas[..., 2] / ww, clamp)) * aw
    h = jnp.exp(jnp.minimum(deltas[..., 3] / wh, clamp)) * ah
    return jnp.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], axis=-1)


def clip_boxes(boxes: Any, image_size: Any) -> jax.Array:
    """`boxes` `[..., 4]` with x clipped to `[0, width]` and y to `[0, height]`.

    `image_size` is `(height, width)`: Python numbers, or an array `[2]` (per-image sizes under
    `vmap`, e.g. images of different sizes padded into one batch).
    """
    owner = "clip_boxes"
    boxes = _boxes(owner, "boxes", boxes)
    height, width = image_size_pair(owner, image_size)
    return _clip(boxes, height, width)


@jax.jit
def _clip(boxes: jax.Array, height: Any, width: Any) -> jax.Array:
    """`clip_boxes` after validation."""
    upper = jnp.stack([jnp.asarray(v, boxes.dtype) for v in (width, height, width, height)])
    return jnp.clip(boxes, 0, upper)


def min_size_mask(boxes: Any, min_size: float) -> jax.Array:
    """Mask `[...]` of boxes at least `min_size` pixels wide and high (torchvision's
    `remove_small_boxes` as a fixed-shape mask: combine it with the other validity masks)."""
    owner = "min_size_mask"
    boxes = _boxes(owner, "boxes", boxes)
    size = check_number(owner, "min_size", min_size, "expected a finite number >= 0", low=0.0,
                        high_open=True)
    return _large_enough(boxes, size)


@jax.jit
def _large_enough(boxes: jax.Array, size: float) -> jax.Array:
    """`min_size_mask` after validation."""
    return ((boxes[..., 2] - boxes[..., 0]) >= size) & ((boxes[..., 3] - boxes[..., 1]) >= size)

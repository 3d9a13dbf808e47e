"""Faster R-CNN anchors (Ren et al. 2015): base anchors, their grid over a feature map, and which
anchors lie inside the image.

Boxes are `(x1, y1, x2, y2)` in continuous pixel coordinates, the convention of
`cnnjax.layers.roi` (torchvision's): a box covering pixels 0..15 is `(0, 0, 16, 16)` and its width
is `x2 - x1`. The reference py-faster-rcnn code uses *inclusive* pixel indices instead (that box is
`(0, 0, 15, 15)`, width `x2 - x1 + 1`); its boxes convert to ours by adding 1 to `x2` and `y2`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.layers.roi import indexed
from cnnjax.utils.validation import (
    check_number,
    check_positive_int,
    concrete_value,
    dtype_name,
    invalid,
    to_pair,
)


def _positive_numbers(owner: str, arg: str, values: Any) -> np.ndarray:
    """`values` as a 1-D float64 array of finite numbers > 0 (at least one), else raises; a
    bool or a numeric string is no number here (NumPy would read True and "2" as 1.0 and 2.0)."""
    try:
        array = np.asarray(values, dtype=np.float64)
        items = np.ravel(np.asarray(values, dtype=object))
    except (TypeError, ValueError):
        raise invalid(owner, arg, values, "expected a non-empty sequence of positive numbers") \
            from None
    if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)) \
            or not np.all(array > 0) or isinstance(values, str | bytes) \
            or any(isinstance(v, bool | np.bool_ | str | bytes) for v in items):
        raise invalid(owner, arg, values, "expected a non-empty sequence of positive numbers")
    return array


def check_anchor_settings(
    owner: str, base_size: int, ratios: Any, scales: Any,
    names: tuple[str, str, str] = ("base_size", "ratios", "scales"),
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """`generate_anchors`' checks, errors naming `owner`'s own `names` for the three arguments
    (e.g. a detector's `anchor_ratios`): `(base_size, widths [R], heights [R], scales [S])`."""
    base = check_positive_int(owner, names[0], base_size)
    aspect = _positive_numbers(owner, names[1], ratios)
    factors = _positive_numbers(owner, names[2], scales)
    widths = np.round(np.sqrt(base * base / aspect))
    heights = np.round(widths * aspect)
    if np.any(widths <= 0) or np.any(heights <= 0):
        bad = int(np.flatnonzero((widths <= 0) | (heights <= 0))[0])
        raise invalid(owner, names[1], ratios,
                      f"ratio {aspect[bad]:g} rounds a side of the {base}x{base} base box to 0 "
                      "pixels")
    return base, widths, heights, factors


def generate_anchors(
    base_size: int = 16,
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    scales: Sequence[float] = (8.0, 16.0, 32.0),
) -> np.ndarray:
    """The base anchors of py-faster-rcnn's `generate_anchors`, as `[len(ratios) * len(scales), 4]`.

    Reproduces the reference exactly, rounding included: for each aspect ratio `r = h / w` (outer
    loop) the `base_size x base_size` box gets width `ws = round(sqrt(base_size**2 / r))` and height
    `hs = round(ws * r)` (NumPy's round half to even, as the reference), then for each scale `s`
    (inner loop) the box `s * ws` by `s * hs` centred on the base box's centre. So the defaults give
    9 anchors of roughly 128, 256, 512 pixels per side at ratios 1:2, 1:1, 2:1.

    Returned in continuous `(x1, y1, x2, y2)` (module docstring): the reference's first anchor
    `[-84, -40, 99, 55]` is `[-84, -40, 100, 56]` here. A float64 NumPy array, because anchors are
    compile-time constants; `anchor_grid` turns them into a JAX array.
    """
    base, widths, heights, factors = check_anchor_settings(
        "generate_anchors", base_size, ratios, scales)
    widths = (widths[:, None] * factors[None, :]).reshape(-1)
    heights = (heights[:, None] * factors[None, :]).reshape(-1)
    centre = base / 2.0
    return np.stack([centre - widths / 2, centre - heights / 2,
                     centre + widths / 2, centre + heights / 2], axis=1)


def anchor_grid(
    feature_size: int | Sequence[int], stride: int, base_anchors: Any,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """All anchors of a `feature_size = (H, W)` map of the given stride, as `[H * W * A, 4]`.

    The anchor of cell `(i, j)` and base anchor `a` is `base_anchors[a]` shifted by
    `(j * stride, i * stride)` and sits at row `(i * W + j) * A + a`: rows, then columns, then
    anchors, which is the order of an NHWC head output `[N, H, W, A * k]` reshaped to
    `[N, H * W * A, k]` (py-faster-rcnn's order too). With `generate_anchors(base_size=stride)`
    the anchors of cell `(i, j)` are centred on the cell's centre `((j + .5) s, (i + .5) s)`.
    """
    owner = "anchor_grid"
    height, width = to_pair(owner, "feature_size", feature_size)
    stride = check_positive_int(owner, "stride", stride)
    shape = getattr(base_anchors, "shape", None)
    if shape is None:
        base_anchors = np.asarray(base_anchors, dtype=np.float64)
        shape = base_anchors.shape
    if len(shape) != 2 or shape[1] != 4 or shape[0] == 0:
        raise invalid(owner, "base_anchors.shape", tuple(shape),
                      "expected [A, 4] boxes (x1, y1, x2, y2) with A >= 1")
    check_anchor_sizes(owner, base_anchors, "base_anchors")
    if dtype_name(dtype) not in ("float32", "float64"):  # others wrap or round off pixels
        raise invalid(owner, "dtype", dtype_name(dtype), "expected float32 or float64")
    return _grid(jnp.asarray(base_anchors, dtype=dtype), height, width, stride)


@partial(jax.jit, static_argnames=("height", "width", "stride"))
def _grid(base_anchors: jax.Array, height: int, width: int, stride: int) -> jax.Array:
    """`anchor_grid` after validation (static sizes, so one compilation per map size)."""
    dtype = base_anchors.dtype
    shift_x = jnp.arange(width, dtype=dtype) * stride
    shift_y = jnp.arange(height, dtype=dtype) * stride
    xs, ys = jnp.meshgrid(shift_x, shift_y)  # [H, W] each, rows = y
    shifts = jnp.stack([xs, ys, xs, ys], axis=-1).reshape(height * width, 1, 4)
    return (shifts + base_anchors[None]).reshape(-1, 4)


def check_anchor_sizes(owner: str, anchors: Any, arg: str = "anchors") -> None:
    """When `anchors` `[..., 4]` are concrete, raises (naming `arg`) on the first one without a
    positive finite width and height (it would give infinite or NaN targets, or a grid of them)."""
    values = concrete_value(anchors)
    if values is None:
        return
    values = np.asarray(values, np.float64)
    sizes = values[..., 2:] - values[..., :2]
    bad = ~np.all((sizes > 0) & np.isfinite(sizes), axis=-1)
    if bad.any():
        index = tuple(np.argwhere(bad)[0])
        raise invalid(owner, indexed(arg, index), values[index].tolist(),
                      "expected a positive finite width and height (x1 < x2, y1 < y2)")


def image_size_pair(owner: str, image_size: Any) -> tuple[Any, Any]:
    """`(height, width)` of an image: a pair of positive Python numbers (checked), or an array
    of shape `[2]`: checked the same way when concrete, trusted when traced (e.g. per-image
    sizes under `vmap`)."""
    if hasattr(image_size, "shape"):
        if tuple(image_size.shape) != (2,):
            raise invalid(owner, "image_size.shape", tuple(image_size.shape),
                          "expected (2,): (height, width)")
        values = concrete_value(image_size)
        if values is not None:  # the tuple's rule, on its values (shown as a list)
            _check_positive_pair(owner, values.tolist(), values.tolist())
        return image_size[0], image_size[1]
    try:
        pair = tuple(image_size)
    except TypeError:
        pair = ()
    _check_positive_pair(owner, pair, image_size)
    return pair


def _check_positive_pair(owner: str, pair: Any, shown: Any) -> None:
    """Refuses (naming `image_size`, shown as `shown`) a `pair` that is not two positive finite
    Python numbers: a zero, negative or NaN side would divide into inf / NaN or clip every box
    to nothing."""
    if len(pair) != 2 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < float("inf")
            for v in pair):
        raise invalid(owner, "image_size", shown,
                      "expected (height, width), two positive numbers")


def anchors_inside(boxes: Any, image_size: Any, border: float = 0.0) -> jax.Array:
    """Mask `[K]` of boxes lying inside the `(height, width)` image, `border` pixels allowed.

    True where `x1 >= -border`, `y1 >= -border`, `x2 <= width + border` and
    `y2 <= height + border`: py-faster-rcnn's anchor filter (`allowed_border=0` drops anchors
    crossing the image edge from RPN training), written for continuous coordinates.
    """
    owner = "anchors_inside"
    boxes = jnp.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise invalid(owner, "boxes.shape", tuple(boxes.shape),
                      "expected [K, 4] boxes as (x1, y1, x2, y2)")
    height, width = image_size_pair(owner, image_size)
    margin = check_number(owner, "border", border, "expected a finite number >= 0", low=0.0,
                          high_open=True)
    return _inside(boxes, height, width, margin)


@jax.jit
def _inside(boxes: jax.Array, height: Any, width: Any, border: float) -> jax.Array:
    """`anchors_inside` after validation."""
    return ((boxes[:, 0] >= -border) & (boxes[:, 1] >= -border)
            & (boxes[:, 2] <= width + border) & (boxes[:, 3] <= height + border))

"""Region-of-interest ops for detection heads: RoI max pooling (one level, or SPP-net's
pyramid), RoIAlign, box IoU and NMS.

Conventions (torchvision's): `features` is NHWC `[N, H, W, C]`; `boxes` is `[K, 4]` as
(x1, y1, x2, y2) in *image* coordinates, mapped to the feature map by `spatial_scale` (1/16 for a
stride-16 backbone); `batch_indices` `[K]` names the image each box belongs to. Outputs are
`[K, out_h, out_w, C]`.

Arguments are checked in Python before tracing. Box *values* (x2 < x1, outside the image) and batch
indices are checked only when they are concrete arrays; under `jit` they are traced and the ops
trust them. Concrete boxes must have `0 <= x1 <= x2` and `0 <= y1 <= y2`. No upper bound is
checked: the ops do not know the image size, and a box clipped to the image may reach well past
the `W / spatial_scale` pixels a `W`-cell map covers (AlexNet's 227-px input gives a 13-cell map
at stride 16, 208 px; a 60-px image a 7-cell map at stride 8, 56 px). There, as in torchvision,
RoI pooling clamps its bins to the map and RoIAlign's samples clamp to the last cell (zero beyond
one cell past it). Clip boxes to the image first.

All ops are vectorized (no Python loop over boxes) and have static output shapes, so they run
under `jit` and `vmap`; `nms` returns a fixed number of indices plus a validity mask.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.layers.pooling import check_pyramid_levels
from cnnjax.utils.validation import (
    check_bool,
    check_nhwc_nonempty,
    check_number,
    check_positive_float,
    check_positive_int,
    concrete_value,
    given_dtype,
    invalid,
    to_pair,
)

IntPair = int | Sequence[int]
_HIGHEST = jax.lax.Precision.HIGHEST
# `roi_pool` reduces all of a bin's cells at once up to this many masked values (256 MB in
# float32), and loops over the map's rows and columns above it.
_VECTORIZED_ROI_POOL_ELEMENTS = 2**26


def _no_items(value: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """`value`, or an empty array of `shape` where it is an empty list or tuple: no boxes, which
    `jnp.asarray` would make a float32 array of shape (0,)."""
    return np.zeros(shape, dtype) if isinstance(value, list | tuple) and not value else value


def _check_boxes(owner: str, boxes: Any,
                 inside_image: bool = False) -> tuple[jax.Array, np.ndarray | None]:
    """Checks the `[K, 4]` shape and, when concrete, that x1 <= x2 and y1 <= y2 (with
    `inside_image`, also x1, y1 >= 0: `check_valid_boxes`)."""
    boxes = _no_items(boxes, (0, 4), np.float32)
    values = concrete_value(boxes)
    boxes = jnp.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise invalid(owner, "boxes.shape", tuple(boxes.shape),
                      "expected [K, 4] boxes as (x1, y1, x2, y2)")
    if not jnp.issubdtype(boxes.dtype, jnp.floating):
        boxes = boxes.astype(jnp.float32)
    if values is not None:
        values = values.astype(np.float64)
        check_valid_boxes(owner, "boxes", values, inside_image=inside_image)
    return boxes, values


def check_float_scores(owner: str, scores: Any) -> None:
    """Refuses `scores` given with a bool or integer dtype, naming it: as ranks they tie boxes a
    real score would order (a bool keeps every True box), and torchvision's `nms` and
    `batched_nms` refuse them ("nms_kernel" not implemented for 'Long', 'Bool', ...)."""
    dtype = given_dtype(scores)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise invalid(owner, "scores.dtype", str(dtype),
                      "expected a floating-point array (e.g. float32 probabilities or logits)")


def indexed(arg: str, index: tuple[int, ...]) -> str:
    """`arg[i]` or `arg[i, j]` (`arg` for a single box): one box's name in an error message."""
    return f"{arg}[{', '.join(str(int(i)) for i in index)}]" if index else arg


#: What roi_pool/roi_align ask of a box's near corner (they do not know the image's far edge).
INSIDE_IMAGE = ("boxes must lie inside the image, x1 >= 0 and y1 >= 0 (image pixel coordinates); "
                "clip them to the image first")


def check_valid_boxes(owner: str, arg: str, boxes: Any, valid: Any = None,
                      inside_image: bool = False) -> None:
    """When `boxes` `[..., 4]` (and `valid` `[...]` bool, None: every row) are concrete, raises
    on the first valid box that is not finite or has x2 < x1 or y2 < y1 (with `inside_image`,
    also x1 < 0 or y1 < 0: boxes a model pools with roi_align). Rows not `valid` may hold
    anything (padding); traced inputs are not checked (nothing can raise under jit)."""
    values = concrete_value(boxes)
    mask = None if valid is None else concrete_value(valid)
    if values is None or (valid is not None and mask is None):
        return
    values = np.asarray(values, np.float64)
    mask = np.ones(values.shape[:-1], bool) if mask is None else np.asarray(mask, bool)
    finite = np.all(np.isfinite(values), axis=-1)
    inverted = (values[..., 2] < values[..., 0]) | (values[..., 3] < values[..., 1])
    outside = (values[..., 0] < 0) | (values[..., 1] < 0) if inside_image else np.zeros_like(mask)
    for bad, valid_text in ((mask & ~finite, "expected finite coordinates"),
                            (mask & inverted, "expected x1 <= x2 and y1 <= y2 (boxes are "
                                              "(x1, y1, x2, y2))"),
                            (mask & outside, INSIDE_IMAGE)):
        if bad.any():
            index = tuple(np.argwhere(bad)[0])
            raise invalid(owner, indexed(arg, index), values[index].tolist(), valid_text)


def _check_roi_args(
    owner: str, features: jax.Array, boxes: Any, batch_indices: Any, output_size: IntPair,
    spatial_scale: float,
) -> tuple[jax.Array, jax.Array, tuple[int, int], float, np.ndarray | None]:
    """Shared validation of roi_pool/roi_align arguments (see the module docstring)."""
    check_nhwc_nonempty(owner, features, "features")
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise invalid(owner, "features.dtype", str(features.dtype),
                      "expected a floating-point array")
    # (the image's far edge is unknown here: module docstring)
    boxes, values = _check_boxes(owner, boxes, inside_image=True)
    out = to_pair(owner, "output_size", output_size)
    scale = check_positive_float(owner, "spatial_scale", spatial_scale)
    batch_indices = _no_items(batch_indices, (0,), np.int32)
    indices = concrete_value(batch_indices)
    batch_indices = jnp.asarray(batch_indices)
    if batch_indices.shape != (boxes.shape[0],):
        raise invalid(owner, "batch_indices.shape", tuple(batch_indices.shape),
                      f"expected ({boxes.shape[0]},), one batch index per box")
    if not jnp.issubdtype(batch_indices.dtype, jnp.integer):
        raise invalid(owner, "batch_indices.dtype", str(batch_indices.dtype),
                      "expected an integer array")
    n = features.shape[0]
    if indices is not None:
        bad = np.flatnonzero((indices < 0) | (indices >= n))
        if bad.size:
            i = int(bad[0])
            raise invalid(owner, f"batch_indices[{i}]", int(indices[i]),
                          f"expected 0 <= index < {n} (the batch size of features)")
    return boxes, batch_indices.astype(jnp.int32), out, scale, values


def _round_half_away(x: jax.Array) -> jax.Array:
    """C's `round` (half away from zero), which torchvision's roi_pool uses; jnp.round is even."""
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _box_dtype(features: jax.Array) -> type:
    """The dtype torchvision scales and sizes boxes in, the input's: float64 for float64
    features, else float32 (45 * 0.7 rounds to cell 31 in float64, to 32 in float32)."""
    return np.float64 if features.dtype == np.float64 else np.float32


def _roi_pool_with_argmax(
    features: jax.Array, boxes: jax.Array, batch_indices: jax.Array,
    output_size: tuple[int, int], spatial_scale: float,
) -> tuple[jax.Array, jax.Array]:
    """Each bin's max `[K, out_h, out_w, C]` and where it is: the flat cell `h * W + w` of the
    bin's first maximal cell in row-major order (torchvision's argmax), `H * W` where there is
    none (an empty bin, or a NaN max)."""
    _, h, w, _ = features.shape
    out_h, out_w = output_size
    corners = _round_half_away(boxes.astype(_box_dtype(features)) * spatial_scale
                               ).astype(jnp.int32)
    x1, y1, x2, y2 = (corners[:, i] for i in range(4))

    def bin_masks(start: jax.Array, end: jax.Array, pooled: int, size: int,
                  ) -> tuple[jax.Array, jax.Array]:
        # Bin edges floor(p * len / pooled) and ceil((p + 1) * len / pooled) in exact integer
        # arithmetic (torchvision uses floats, which agree except for rounding at exact edges).
        length = jnp.maximum(end - start + 1, 1)[:, None]
        p = jnp.arange(pooled, dtype=jnp.int32)[None]
        lo = (p * length) // pooled + start[:, None]
        hi = -((-(p + 1) * length) // pooled) + start[:, None]
        lo, hi = jnp.clip(lo, 0, size), jnp.clip(hi, 0, size)
        pos = jnp.arange(size)
        return (pos >= lo[..., None]) & (pos < hi[..., None]), hi <= lo  # [K,P,size], [K,P]

    mask_h, empty_h = bin_masks(y1, y2, out_h, h)
    mask_w, empty_w = bin_masks(x1, x2, out_w, w)
    lowest = jnp.array(-jnp.inf, features.dtype)
    num_boxes, channels = boxes.shape[0], features.shape[3]
    # Separable: each bin's max over its rows for every column (with the first row holding it),
    # then over its columns. The first maximal cell in row-major order is, among the columns
    # whose row max equals the bin's max, the one with the smallest `first row * W + column`.
    if num_boxes * out_h * h * w * channels <= _VECTORIZED_ROI_POOL_ELEMENTS:
        # Small maps: each reduction at once ([K, out_h, H, W, C] masked values; their backward
        # holds as many), 6x faster than the loops below for 1,024 boxes on an 8x8x128 map.
        in_rows = mask_h[:, :, :, None, None]
        values = jnp.where(in_rows, features[batch_indices][:, None], lowest)  # [K,P,H,W,C]
        rows = jnp.max(values, axis=2)  # [K, out_h, W, C]
        row_index = jnp.arange(h)[None, None, :, None, None]
        first_row = jnp.min(jnp.where(in_rows & (values == rows[:, :, None]), row_index, h),
                            axis=2)
        in_columns = mask_w[:, None, :, :, None]  # [K, 1, out_w, W, 1]
        pooled = jnp.max(jnp.where(in_columns, rows[:, :, None], lowest), axis=3)
        column = jnp.arange(w)[None, None, None, :, None]
        key = jnp.where(in_columns & (rows[:, :, None] == pooled[:, :, :, None]),
                        first_row[:, :, None] * w + column, h * w)
        argmax = jnp.min(key, axis=3)
    else:
        # One feature row/column per loop step: memory O(K * out_h * W * C) instead of
        # O(K * out_h * H * W * C) (2 GB for 128 boxes on a 38x50x256 map).
        def max_over_rows(i: jax.Array, carry: tuple[jax.Array, jax.Array],
                          ) -> tuple[jax.Array, jax.Array]:
            rows, first_row = carry  # [K, out_h, W, C]
            line = features[batch_indices, i][:, None]  # [K, 1, W, C]
            in_row = mask_h[:, :, i, None, None]
            takes = in_row & ((first_row == h) | (line > rows))
            return (jnp.maximum(rows, jnp.where(in_row, line, lowest)),
                    jnp.where(takes, i, first_row))

        shape = (num_boxes, out_h, w, channels)
        rows, first_row = jax.lax.fori_loop(
            0, h, max_over_rows, (jnp.full(shape, lowest), jnp.full(shape, h, jnp.int32)))

        def max_over_columns(j: jax.Array, carry: tuple[jax.Array, jax.Array],
                             ) -> tuple[jax.Array, jax.Array]:
            pooled, argmax = carry  # [K, out_h, out_w, C]
            value = rows[:, :, None, j]  # [K, out_h, 1, C]
            candidate = first_row[:, :, None, j] * w + j
            in_column = mask_w[:, None, :, j, None]
            takes = in_column & ((value > pooled) | ((value == pooled) & (candidate < argmax)))
            return (jnp.maximum(pooled, jnp.where(in_column, value, lowest)),
                    jnp.where(takes, candidate, argmax))

        shape = (num_boxes, out_h, out_w, channels)
        pooled, argmax = jax.lax.fori_loop(
            0, w, max_over_columns, (jnp.full(shape, lowest), jnp.full(shape, h * w, jnp.int32)))
    empty = (empty_h[:, :, None] | empty_w[:, None, :])[..., None]
    # (An empty bin's key can pass H * W: its rows are all -inf, "equal" to its -inf max. The
    # loop keeps the key of a finite column seen before a NaN one: a NaN max has no argmax.)
    return (jnp.where(empty, jnp.array(0, features.dtype), pooled),
            jnp.where(empty | jnp.isnan(pooled), h * w, argmax))


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _roi_pool_first_max(features: jax.Array, boxes: jax.Array, batch_indices: jax.Array,
                        output_size: tuple[int, int], spatial_scale: float) -> jax.Array:
    return _roi_pool_with_argmax(features, boxes, batch_indices, output_size, spatial_scale)[0]


@_roi_pool_first_max.defjvp
def _roi_pool_tangent(output_size: tuple[int, int], primals: tuple[Any, ...],
                      tangents: tuple[Any, ...]) -> tuple[jax.Array, jax.Array]:
    """Each bin's tangent is its argmax cell's (torchvision's rule; reverse mode transposes the
    gather into a scatter-add, so tied cells other than the first get no gradient). Boxes have
    no tangent effect: the output is piecewise constant in them."""
    features, boxes, batch_indices, spatial_scale = primals
    pooled, argmax = _roi_pool_with_argmax(features, boxes, batch_indices, output_size,
                                           spatial_scale)
    _, h, w, channels = features.shape
    found = argmax < h * w
    cell = jnp.where(found, argmax, 0)
    image = batch_indices[:, None, None, None]
    # Gathered in at least float32, so that reverse mode's scatter-add (every bin adds its
    # cotangent to its cell) sums in float32: in bfloat16 a cell's sum stalled at 256.
    wide = tangents[0].astype(jnp.promote_types(tangents[0].dtype, jnp.float32))
    picked = wide[image, cell // w, cell % w, jnp.arange(channels)]
    return pooled, jnp.where(found, picked, jnp.zeros_like(picked)).astype(pooled.dtype)


@partial(jax.jit, static_argnames=("output_size",))
def _roi_pool(features: jax.Array, boxes: jax.Array, batch_indices: jax.Array,
              output_size: tuple[int, int], spatial_scale: float) -> jax.Array:
    return _roi_pool_first_max(features, boxes, batch_indices, output_size, spatial_scale)


def roi_pool(
    features: jax.Array, boxes: Any, batch_indices: Any, output_size: IntPair,
    spatial_scale: float = 1.0,
) -> jax.Array:
    """RoI max pooling (Fast R-CNN), with torchvision's quantization.

    Box corners are scaled and rounded (half away from zero) to feature cells; the box spans
    `round(x2) - round(x1) + 1` cells (at least 1), split into `output_size` bins with edges
    `floor(i * len / out)` .. `ceil((i + 1) * len / out)` (exact integer arithmetic), clipped to
    the map. Each bin takes the max over its cells; a bin left empty by clipping outputs 0.
    Forward and gradient are torchvision's: a bin's gradient goes to its first maximal cell in
    row-major order alone, also when the maximum is tied (the zeros after a ReLU); boxes get no
    gradient (the output is piecewise constant in them). One difference: a bin holding a NaN is
    NaN here (a max propagates it), where torchvision's `>` comparison skips it. Box corners are
    scaled in float64 for float64 features and in float32 otherwise, as torchvision computes in
    the input's dtype.
    """
    boxes, batch_indices, out, scale, _ = _check_roi_args(
        "roi_pool", features, boxes, batch_indices, output_size, spatial_scale)
    return _roi_pool(features, boxes, batch_indices, out, scale)


def roi_spatial_pyramid_pool(
    features: jax.Array, boxes: Any, batch_indices: Any, levels: Sequence[int] = (1, 2, 4),
    spatial_scale: float = 1.0,
) -> jax.Array:
    """SPP-net's pooling of each box (He et al., 2014, detection): `[K, C * sum(l * l)]`.

    Level `l` is `roi_pool` of the box into `l x l` bins; each level is flattened in (row,
    column, channel) order and the levels are concatenated, the layout of
    `pooling.spatial_pyramid_pool`. On an `H x W` map this equals `spatial_pyramid_pool(features,
    levels, "max")` for the box `(0, 0, (W - 1)/spatial_scale, (H - 1)/spatial_scale)`, whose
    corners round to the first and the last cell; the image-size box `(0, 0, W/spatial_scale,
    H/spatial_scale)` spans one more (clipped) cell per axis, so its bins differ. Fast R-CNN's
    RoI pooling is the one-level case.
    """
    owner = "roi_spatial_pyramid_pool"
    levels = check_pyramid_levels(owner, levels)
    boxes, batch_indices, _, scale, _ = _check_roi_args(
        owner, features, boxes, batch_indices, levels[0], spatial_scale)
    parts = [_roi_pool(features, boxes, batch_indices, (level, level), scale)
             .reshape(boxes.shape[0], level * level * features.shape[-1])  # 0 boxes too
             for level in levels]
    return jnp.concatenate(parts, axis=1)


def _bilinear_weights(coord: jax.Array, size: int) -> jax.Array:
    """Weights over `size` pixels of torchvision's bilinear sample at `coord` (`[..., size]`).

    Points beyond one pixel outside the map give zero weight; points in [-1, 0] clamp to the first
    pixel and points past the last pixel centre to the last one, as torchvision's kernel does.
    """
    empty = (coord < -1.0) | (coord > size)
    coord = jnp.maximum(coord, 0.0)
    low = jnp.floor(coord).astype(jnp.int32)
    at_edge = low >= size - 1
    low = jnp.where(at_edge, size - 1, low)
    high = jnp.where(at_edge, size - 1, low + 1)
    frac = jnp.where(at_edge, 0.0, coord - low)
    weights = (jax.nn.one_hot(low, size, dtype=coord.dtype) * (1 - frac)[..., None]
               + jax.nn.one_hot(high, size, dtype=coord.dtype) * frac[..., None])
    return jnp.where(empty[..., None], 0.0, weights)


def _host_samples(values: np.ndarray, real: type, scale: float, aligned: bool,
                  output_size: tuple[int, int], sampling_ratio: int, max_sampling_ratio: int | None,
                  grid: int | None = None,
                  ) -> tuple[int, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """RoIAlign's sample grid of boxes as torchvision computes it, in its dtype `real` with one
    IEEE rounding per step (NumPy: no FMA, correctly rounded division): the grid size, the
    per-box sample counts `[K, 2]` (height, width) and the sample coordinates per axis,
    `[K, out_h, grid]` and `[K, out_w, grid]` (slots past a box's count are never read).
    `grid` fixes the grid size of adaptive sampling (traced boxes: `max_sampling_ratio`).

    torchvision places sample `g` of bin `p` at `(start + p * bin) + (g + 0.5) * bin / count`
    and reads it (clamped to the last cell) up to the map's far edge, `W` included, and not past
    it: a sample an ulp from the edge follows that rounding. In the kernel, XLA:CPU divides by
    the output size as a multiply by its rounded reciprocal (10.5 / 7 = 1.5 + 1 ulp in float32)
    and may fuse steps into FMAs, which moved such samples across the edge."""
    scaled = values.astype(real) * real(scale) - real(0.5 if aligned else 0)
    sizes = scaled[:, 3:1:-1] - scaled[:, 1::-1]  # (height, width)
    if not aligned:
        sizes = np.maximum(sizes, real(1))
    pooled = np.array(output_size, real)
    if sampling_ratio > 0:
        grid = sampling_ratio
        counts = np.full(sizes.shape, real(grid))
    else:
        counts = np.ceil(sizes / pooled)
        if grid is None:
            grid = max(int(counts.max(initial=1)), 1)
            if max_sampling_ratio is not None:
                grid = min(grid, max_sampling_ratio)
        counts = np.clip(counts, 0, grid)
    bins = sizes / pooled
    coords = []
    for axis, start in ((0, scaled[:, 1]), (1, scaled[:, 0])):
        p = np.arange(output_size[axis], dtype=real)[None, :, None]
        g = np.arange(grid, dtype=real)[None, None, :] + real(0.5)
        size, count = bins[:, axis, None, None], np.maximum(counts[:, axis, None, None], 1)
        coords.append((start[:, None, None] + p * size) + (g * size) / count)
    return grid, counts, (coords[0], coords[1])


def _traced_host_samples(boxes: jax.Array, spatial_scale: jax.Array, aligned: bool,
                         output_size: tuple[int, int], grid: int, adaptive: bool,
                         ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """`_host_samples` of traced boxes `[K, 4]` (in the compute dtype), through a host callback:
    the per-box counts `[K, 2]` and sample coordinates, torchvision's to the bit."""
    real = np.float64 if boxes.dtype == np.float64 else np.float32
    k = boxes.shape[0]
    shapes = (jax.ShapeDtypeStruct((k, 2), boxes.dtype),
              (jax.ShapeDtypeStruct((k, output_size[0], grid), boxes.dtype),
               jax.ShapeDtypeStruct((k, output_size[1], grid), boxes.dtype)))

    def host(values: np.ndarray, scale: np.ndarray,
             ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite boxes: as the kernel
            _, counts, (ys, xs) = _host_samples(
                np.asarray(values), real, real(np.asarray(scale)), aligned, output_size,
                0 if adaptive else grid, None, grid=grid)
        return counts.astype(real), (ys.astype(real), xs.astype(real))

    out = jax.pure_callback(host, shapes, boxes, spatial_scale, vmap_method="sequential")
    # Inside shard_map the callback's outputs vary over the mesh axes the boxes vary over
    # (`manual_axis_type.varying` on jax 0.10, `vma` on others).
    aval = jax.typeof(boxes)
    manual = getattr(aval, "manual_axis_type", None)
    axes = tuple(manual.varying if manual is not None else getattr(aval, "vma", ()))
    return jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), out) if axes else out


SAMPLE_POSITIONS = ("torchvision", "kernel")


def check_sample_positions(owner: str, arg: str, value: Any) -> str:
    """`value` if it is one of `SAMPLE_POSITIONS` (roi_align's `sample_positions`), else a
    ValueError naming `owner.arg`."""
    if not isinstance(value, str) or value not in SAMPLE_POSITIONS:
        raise invalid(owner, arg, value,
                      "expected 'torchvision' (torchvision's positions, through a host callback "
                      "for traced boxes on CPU) or 'kernel' (computed by XLA on every platform, "
                      "which jax.export can serialize)")
    return value


@partial(jax.jit, static_argnames=("output_size", "grid", "adaptive", "aligned",
                                   "host_positions"))
def _roi_align(features: jax.Array, boxes: jax.Array, batch_indices: jax.Array,
               output_size: tuple[int, int], spatial_scale: float, grid: int, adaptive: bool,
               aligned: bool, counts: np.ndarray | None = None,
               samples: tuple[np.ndarray, np.ndarray] | None = None,
               host_positions: bool = True) -> jax.Array:
    n, h, w, _ = features.shape
    out_h, out_w = output_size
    compute = jnp.promote_types(features.dtype, jnp.float32)
    offset = 0.5 if aligned else 0.0
    scaled = boxes.astype(compute) * spatial_scale - offset

    g = jnp.arange(grid, dtype=compute)[None, None, :]

    # The counts [K] and coordinates [K, pooled, grid] of an axis: differentiable in boxes
    def kernel_samples(start: jax.Array, end: jax.Array, pooled: int,
                       ) -> tuple[jax.Array, jax.Array]:
        length = end - start
        if not aligned:  # Legacy (Detectron) behaviour: force malformed RoIs to be 1x1.
            length = jnp.maximum(length, 1.0)
        bin_size = length / pooled
        if adaptive:
            count = jnp.clip(jnp.ceil(length / pooled), 0, grid)
        else:
            count = jnp.full_like(length, grid)
        step = bin_size / jnp.maximum(count, 1)
        p = jnp.arange(pooled, dtype=compute)[None, :, None]
        return count, (start[:, None, None] + p * bin_size[:, None, None]
                       + (g + 0.5) * step[:, None, None])

    if samples is not None:  # concrete boxes: torchvision's, from the host
        counts = counts.astype(compute)
        samples = tuple(coords.astype(compute) for coords in samples)
    else:
        (count_h, ys), (count_w, xs) = (kernel_samples(scaled[:, 1], scaled[:, 3], out_h),
                                        kernel_samples(scaled[:, 0], scaled[:, 2], out_w))
        counts, samples = jnp.stack([count_h, count_w], axis=1), (ys, xs)
        if boxes.shape[0] and host_positions:
            # On CPU, the values of torchvision's host arithmetic (docstring of roi_align), the
            # kernel's derivatives: host + (kernel - kernel) is the host's value exactly.
            fixed = jax.lax.stop_gradient((boxes.astype(compute), spatial_scale))
            host_counts, host_samples = jax.lax.platform_dependent(
                *fixed, cpu=partial(_traced_host_samples, aligned=aligned,
                                    output_size=output_size, grid=grid, adaptive=adaptive),
                default=lambda *_: jax.lax.stop_gradient((counts, samples)))
            counts = host_counts
            samples = tuple(host + (kernel - jax.lax.stop_gradient(kernel))
                            for host, kernel in zip(host_samples, samples, strict=True))

    def axis_weights(count: jax.Array, coords: jax.Array, size: int,
                     ) -> tuple[jax.Array, jax.Array]:
        weights = _bilinear_weights(coords, size)  # [K, pooled, grid, size]
        used = (g < count[:, None, None])[..., None]
        return jnp.sum(jnp.where(used, weights, 0.0), axis=2), count  # [K, pooled, size], [K]

    weights_h, count_h = axis_weights(counts[:, 0], samples[0], h)
    weights_w, count_w = axis_weights(counts[:, 1], samples[1], w)
    # Select each box's image with a one-hot contraction instead of gathering [K, H, W, C].
    image = jax.nn.one_hot(batch_indices, n, dtype=compute)  # [K, N]
    weights_hn = weights_h[:, :, None, :] * image[:, None, :, None]  # [K, out_h, N, H]

    def contract(by_row: jax.Array, by_column: jax.Array, maps: jax.Array) -> jax.Array:
        rows = jnp.einsum("kpnh,nhwc->kpwc", by_row, maps, precision=_HIGHEST)
        return jnp.einsum("kqw,kpwc->kpqc", by_column, rows, precision=_HIGHEST)

    feats = features.astype(compute)
    finite = jnp.isfinite(feats)
    # Dense weights would spread one NaN/inf (0 * inf) to every output of every image: contract
    # the finite values, then give the outputs that read a non-finite cell its value. Both
    # steps pass the cotangent through unmasked: the op is linear in the features, so their
    # gradient is the bilinear weights whatever they hold (torchvision's).
    out = contract(weights_hn, weights_w, _finite_or_zero(feats))

    def non_finite(out: jax.Array) -> jax.Array:
        reads = (weights_hn > 0).astype(compute), (weights_w > 0).astype(compute)
        nan, pos, neg = (contract(*reads, m.astype(compute)) > 0
                         for m in (jnp.isnan(feats), feats == jnp.inf, feats == -jnp.inf))
        return jnp.where(nan | (pos & neg), jnp.nan,
                         jnp.where(pos, jnp.inf, jnp.where(neg, -jnp.inf, out)))

    out = jax.lax.cond(jnp.all(finite), lambda out: out,
                       lambda out: out + jax.lax.stop_gradient(non_finite(out) - out), out)
    count = jnp.maximum(count_h * count_w, 1.0)
    return (out / count[:, None, None, None]).astype(features.dtype)


@jax.custom_jvp
def _finite_or_zero(x: jax.Array) -> jax.Array:
    """`x` with its NaN/inf entries zeroed, whose derivative is the identity (not zero at
    those entries): what a linear map of `x` computed from it needs for its gradient."""
    return jnp.where(jnp.isfinite(x), x, 0.0)


@_finite_or_zero.defjvp
def _finite_or_zero_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array],
                        ) -> tuple[jax.Array, jax.Array]:
    return _finite_or_zero(primals[0]), tangents[0]


def roi_align(
    features: jax.Array, boxes: Any, batch_indices: Any, output_size: IntPair,
    spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = True,
    max_sampling_ratio: int | None = None, sample_positions: str = "torchvision",
) -> jax.Array:
    """RoIAlign (He et al., Mask R-CNN) with torchvision's semantics.

    Each of the `output_size` bins of a box averages `gh x gw` bilinear samples placed at the
    centres of a regular sub-grid of the bin. `aligned=True` shifts the scaled box by -0.5 so pixel
    centres sit at integer+0.5 (the correct Mask R-CNN mapping); `aligned=False` is the legacy one
    that also forces a minimum box size of 1.

    `sampling_ratio > 0` fixes `gh = gw = sampling_ratio`. `sampling_ratio <= 0` is torchvision's
    adaptive count `gh = ceil(box_h / out_h)` (box size on the feature map), which is data
    dependent; JAX needs a static sample grid, so its size is the largest count over the boxes when
    they are concrete (exact torchvision results), or `max_sampling_ratio` when they are traced
    under jit. Boxes needing more samples than `max_sampling_ratio`, when given, use that many,
    concrete boxes too (so eager and jit agree; torchvision has no cap). Adaptive sampling of
    traced boxes without `max_sampling_ratio` is an error. Boxes get torchvision's per-box counts
    and sample positions exactly (IEEE arithmetic on the host, in float64 for float64 features and
    float32 otherwise, as torchvision computes in the input's dtype): concrete boxes before
    tracing, traced boxes on CPU through a host callback (`jax.pure_callback`; the box gradient
    is the kernel's). A sample exactly on the map's edges (x = -1 or x = W), where torchvision
    switches from a cell's value to 0, depends on that rounding: XLA computing them in the
    kernel (a multiply by a rounded reciprocal for the division, FMAs) moved samples an ulp
    across and changed outputs by up to 2 (75 in 129,600 random boxes and settings). On other
    platforms traced boxes keep the kernel's positions, with those rare ulp differences
    (torchvision's CUDA kernel, compiled with FMAs, differs from its CPU one there too).

    `sample_positions="kernel"` gives traced boxes the kernel's positions on CPU too: no host
    callback, so a function of traced boxes calling roi_align can be serialized by `jax.export`
    (the default's callback cannot: "serialization of host_callbacks is not yet implemented"),
    at the cost of those ulp differences at the map's edges. Concrete boxes get torchvision's
    positions either way (computed before tracing, they are constants of the program).

    Unlike torchvision's `roi_align` (default `aligned=False`), `aligned` defaults to True: pass
    `aligned=False` for code ported from torchvision's default. A NaN or inf reaches only the
    outputs whose samples read it with non-zero weight; torchvision also reads the neighbour
    of a sample that falls exactly on a pixel (weight 0), so a NaN there is NaN in its output
    (0 * NaN) and 0 here. The feature gradient is the bilinear weights whatever the features
    hold, NaN/inf included, as torchvision's.
    """
    owner = "roi_align"
    boxes, batch_indices, out, scale, values = _check_roi_args(
        owner, features, boxes, batch_indices, output_size, spatial_scale)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, numbers.Integral):
        raise invalid(owner, "sampling_ratio", sampling_ratio,
                      "expected an int (> 0 fixed samples per bin side, <= 0 adaptive)")
    sampling_ratio = int(sampling_ratio)  # a NumPy integer too
    aligned = check_bool(owner, "aligned", aligned)
    if max_sampling_ratio is not None:
        check_positive_int(owner, "max_sampling_ratio", max_sampling_ratio)
    check_sample_positions(owner, "sample_positions", sample_positions)
    adaptive = sampling_ratio <= 0
    counts = samples = None
    if values is not None:
        # torchvision's steps in the input's dtype (float64 features: double), each rounded
        grid, counts, samples = _host_samples(values, _box_dtype(features), scale, aligned, out,
                                              sampling_ratio, max_sampling_ratio)
    elif not adaptive:
        grid = sampling_ratio
    elif max_sampling_ratio is not None:
        grid = max_sampling_ratio
    else:
        raise invalid(owner, "sampling_ratio", sampling_ratio,
                      "adaptive sampling (<= 0) needs concrete boxes to size its sample grid; "
                      "with traced boxes (under jit, grad or vmap) pass sampling_ratio > 0 "
                      "or max_sampling_ratio")
    return _roi_align(features, boxes, batch_indices, out, scale, grid, adaptive, aligned,
                      counts, samples, host_positions=sample_positions == "torchvision")


def box_iou(boxes1: Any, boxes2: Any) -> jax.Array:
    """Pairwise IoU `[K1, K2]` of (x1, y1, x2, y2) boxes; 0 where the union is empty."""
    boxes1, _ = _check_boxes("box_iou", boxes1)
    boxes2, _ = _check_boxes("box_iou", boxes2)
    return jax.jit(_box_iou)(boxes1, boxes2)


def _box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    # areas of half-precision boxes overflow (300 x 300 > float16's 65504): at least float32, as
    # torchvision's `_upcast`
    a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    b = b.astype(jnp.promote_types(b.dtype, jnp.float32))

    def area(x: jax.Array) -> jax.Array:
        return jnp.maximum(x[:, 2] - x[:, 0], 0) * jnp.maximum(x[:, 3] - x[:, 1], 0)

    top_left = jnp.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    extent = jnp.maximum(bottom_right - top_left, 0)
    inter = extent[..., 0] * extent[..., 1]
    union = area(a)[:, None] + area(b)[None, :] - inter
    positive = union > 0
    return jnp.where(positive, inter / jnp.where(positive, union, 1), 0.0)


@partial(jax.jit, static_argnames=("max_output_size",))
def greedy_nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float, max_output_size: int,
               score_threshold: float, groups: jax.Array | None = None,
               ) -> tuple[jax.Array, jax.Array]:
    """`nms` without its argument checks, for callers that made their own (`batched_nms`).

    With `groups` (`[K]` ints), boxes of different groups never suppress each other: their IoU
    counts as 0.
    """
    if boxes.shape[0] == 0:
        return jnp.zeros(max_output_size, jnp.int32), jnp.zeros(max_output_size, bool)
    order = jnp.argsort(-scores, stable=True)
    ious = _box_iou(boxes[order], boxes[order])
    if groups is not None:
        ious = jnp.where(groups[order][:, None] == groups[order][None, :], ious, 0.0)
    candidate = scores[order] > score_threshold

    def visit(i: jax.Array, keep: jax.Array) -> jax.Array:
        suppressed = jnp.any(keep & (ious[:, i] > iou_threshold))
        return keep.at[i].set(candidate[i] & ~suppressed)

    keep = jax.lax.fori_loop(0, boxes.shape[0], visit, jnp.zeros(boxes.shape[0], bool))
    rank = jnp.cumsum(keep) - 1
    slot = jnp.where(keep & (rank < max_output_size), rank, max_output_size)
    indices = jnp.zeros(max_output_size, jnp.int32).at[slot].set(order.astype(jnp.int32),
                                                                 mode="drop")
    valid = jnp.arange(max_output_size) < jnp.sum(keep)
    return indices, valid


def _threshold(owner: str, arg: str, value: Any, valid: str, **bounds: float) -> Any:
    """`value` checked by `check_number` if concrete; if traced, only that it is one real number
    (the kernel broadcasts an array against the boxes, silently)."""
    if concrete_value(value) is not None:
        return check_number(owner, arg, value, valid, **bounds)
    if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
        raise invalid(owner, arg, value, f"{valid}; a traced value must be a float scalar, got "
                      f"shape {jnp.shape(value)} {jnp.result_type(value)}")
    return value


def nms(
    boxes: Any, scores: Any, iou_threshold: float, max_output_size: int,
    score_threshold: float = float("-inf"),
) -> tuple[jax.Array, jax.Array]:
    """Greedy non-maximum suppression with static output shapes (jit-able).

    Visits boxes by decreasing score (ties: lower index first), considers only those with
    `score > score_threshold` (never a NaN score: torchvision's `nms` ranks NaN first and keeps
    it, `tf.image.non_max_suppression` drops it, as here), and keeps a box unless its IoU with
    an already kept box exceeds `iou_threshold` (the rule of `tf.image.non_max_suppression`
    and torchvision's `nms`).
    Returns `(indices[max_output_size] int32, valid_mask[max_output_size] bool)`: the kept boxes'
    indices in decreasing-score order, padded with 0 where `valid_mask` is False. Cost O(K^2).
    """
    owner = "nms"
    boxes, _ = _check_boxes(owner, boxes)
    check_float_scores(owner, scores)
    scores = jnp.asarray(scores)
    if scores.shape != (boxes.shape[0],):
        raise invalid(owner, "scores.shape", tuple(scores.shape),
                      f"expected ({boxes.shape[0]},), one score per box")
    # The kernel takes traced thresholds (e.g. vmapped over a sweep of them): their values are
    # checked when concrete, their shape and kind always.
    threshold = _threshold(owner, "iou_threshold", iou_threshold, "expected a number in [0, 1]",
                           low=0.0, high=1.0)
    check_positive_int(owner, "max_output_size", max_output_size)
    floor = _threshold(owner, "score_threshold", score_threshold, "expected a number (not NaN)")
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    return greedy_nms(boxes, scores, threshold, max_output_size, floor)

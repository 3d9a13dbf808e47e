"""Pooling over NHWC maps: max/avg (PyTorch ceil_mode semantics), global, adaptive and SPP.

All functions are pure and jit-able; their hyperparameters and the input shape are checked in
Python before tracing. Windows are reduced with `jax.lax.reduce_window` (as `flax.linen.max_pool`
does), so they differentiate and lower to the XLA pooling ops; on CPU `max_pool2d`'s gradient is
its own tangent rule (`_window_max`: the same values, without XLA:CPU's slow select_and_scatter).
Adaptive max pooling (and so SPP) takes each 2-D bin's maximum and sends the gradient to its
first maximum in row-major order, as PyTorch does (`_first_max_tangent`, on every backend).

Output size (per spatial dimension, input `n`, kernel `k`, stride `s`, padding `p`) follows
PyTorch's `MaxPool2d`/`AvgPool2d`:

    out = floor((n + 2p - k) / s) + 1                      (ceil_mode=False)
    out = ceil((n + 2p - k) / s) + 1, minus 1 if the last window would start in the
          right padding, i.e. at padded index >= n + p     (ceil_mode=True)

With `ceil_mode=True` the last window may run past the padded input; max pooling ignores the
overhang and average pooling does not count it (see `avg_pool2d`).
A kernel larger than the padded input is refused even with `ceil_mode=True`, where PyTorch
returns one window (3x3/2 on 2x2 gives 1x1): deliberate, see GoogLeNetBN's `min_input_size`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.utils.validation import (
    INPUT_TOO_SMALL_HINT,
    check_bool,
    check_choice,
    check_nhwc_nonempty,
    check_positive_ints,
    invalid,
    to_pair,
)

IntPair = int | Sequence[int]


def _lowest(dtype: jnp.dtype) -> np.ndarray:
    """The identity of `max` for `dtype` (-inf for floats), used as the max-pool padding.

    Init values are NumPy constants so `reduce_window` recognises the max/sum monoids even under
    jit, which keeps them differentiable to any order.
    """
    if jnp.issubdtype(dtype, jnp.floating):
        return np.array(-np.inf, dtype)
    if jnp.issubdtype(dtype, jnp.bool_):  # The max of booleans is their logical or.
        return np.array(False)
    return np.array(jnp.iinfo(dtype).min, dtype)


def _zero(dtype: jnp.dtype) -> np.ndarray:
    """The identity of `add` for `dtype`, a NumPy constant for the same reason as `_lowest`."""
    return np.array(0, dtype)


def _sum_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """At least float32 for floating `dtype`, so bfloat16/float16 window sums do not round at
    every addition (PyTorch accumulates them in float32 too); int32 for bool (the average is the
    fraction of True, as `global_avg_pool`'s) and for integers narrower than 32 bits (a uint8
    window of 200s must not wrap around); other dtypes are kept."""
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.promote_types(dtype, jnp.float32)
    if jnp.issubdtype(dtype, jnp.bool_) or (jnp.issubdtype(dtype, jnp.integer)
                                            and jnp.dtype(dtype).itemsize < 4):
        return jnp.dtype(jnp.int32)
    return jnp.dtype(dtype)


def _narrow(y: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`y` back in the input's floating `dtype` after a widened average (integer inputs keep the
    float result of true division, as before)."""
    return y.astype(dtype) if jnp.issubdtype(dtype, jnp.floating) else y


def _window_geometry(
    owner: str, x: jax.Array, kernel_size: IntPair, stride: IntPair | None, padding: IntPair,
    ceil_mode: bool,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validates pooling arguments; returns kernel, stride, padding, output size, right overhang."""
    check_nhwc_nonempty(owner, x)
    kernel = to_pair(owner, "kernel_size", kernel_size)
    strides = kernel if stride is None else to_pair(owner, "stride", stride)
    pads = to_pair(owner, "padding", padding, minimum=0)
    ceil_mode = check_bool(owner, "ceil_mode", ceil_mode)
    if any(2 * p > k for p, k in zip(pads, kernel, strict=True)):
        raise invalid(owner, "padding", padding,
                      f"expected at most half the kernel size {kernel} in each dimension")
    sizes = tuple(x.shape[1:3])
    padded = tuple(n + 2 * p for n, p in zip(sizes, pads, strict=True))
    if any(k > n for k, n in zip(kernel, padded, strict=True)):
        raise invalid(owner, "kernel_size", kernel_size,
                      f"expected at most the padded input size {padded} (input {sizes}, "
                      f"padding {pads}){INPUT_TOO_SMALL_HINT}")
    outs, overhang = [], []
    for n, k, s, p in zip(sizes, kernel, strides, pads, strict=True):
        span = n + 2 * p - k
        out = (span + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (out - 1) * s >= n + p:
            out -= 1
        outs.append(out)
        overhang.append(max((out - 1) * s + k - (n + 2 * p), 0))
    return kernel, strides, pads, tuple(outs), tuple(overhang)  # type: ignore[return-value]


def max_pool2d(
    x: jax.Array, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
    ceil_mode: bool = False,
) -> jax.Array:
    """Max pooling of an NHWC array; `stride` defaults to `kernel_size` (PyTorch semantics).

    Padding never wins the max (it is -inf), and `padding` may be at most half the kernel so every
    window holds at least one real element. AlexNet's overlapping pooling is
    `max_pool2d(x, 3, 2)`; GoogLeNet's is `max_pool2d(x, 3, 2, ceil_mode=True)`.
    """
    kernel, strides, pads, _, extra = _window_geometry(
        "max_pool2d", x, kernel_size, stride, padding, ceil_mode)
    window = ((pads[0], pads[0] + extra[0]), (pads[1], pads[1] + extra[1]))
    if jnp.issubdtype(x.dtype, jnp.floating) and jax.default_backend() == "cpu":
        return _window_max(x, kernel, strides, window)
    return _reduce_window_max(x, kernel, strides, window)


def _reduce_window_max(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int],
                       window: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The windowed max of an NHWC array, padded with -inf by `window` ((top, bottom), (left,
    right)); its gradient is XLA's `select_and_scatter`."""
    return jax.lax.reduce_window(x, _lowest(x.dtype), jax.lax.max, (1, *kernel, 1),
                                 (1, *strides, 1), ((0, 0), *window, (0, 0)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _window_max(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int],
                window: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """`_reduce_window_max` with a tangent rule that transposes into strided pads instead of
    `select_and_scatter`, which XLA:CPU runs ~4x slower than PyTorch's max-pool backward
    (docs/performance.md). The same element of each window receives the gradient: the first
    maximum in row-major window order among the window's real (unpadded) elements, as PyTorch
    and `select_and_scatter` pick, with two exceptions: a window whose maximum is -inf gives it
    to its first real element as PyTorch does (`select_and_scatter` to the -inf padding, so it
    is lost), and a window holding several NaNs to its first NaN (PyTorch: its last)."""
    return _reduce_window_max(x, kernel, strides, window)


@_window_max.defjvp
def _window_max_jvp(kernel: tuple[int, int], strides: tuple[int, int],
                    window: tuple[tuple[int, int], tuple[int, int]], primals: tuple[jax.Array],
                    tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Tangent of each output = the tangent at its window's first maximum. Linear in the
    tangent (masks of the primal, strided slices), so reverse mode transposes each slice into
    a strided pad, elementwise work that XLA fuses with the masks.

    The index of each window's first maximum is computed once into memory (PyTorch also stores
    the argmax): left to fusion, XLA recomputed the first-maximum chain for every tap inside the
    backward's pad fusion, 6x slower (docs/performance.md). Dividing it by a 1 XLA cannot fold
    (`1 + 0 * first`, elementwise; exact, as the indices are small integers) makes it an
    "expensive" value that XLA's fusion pass will not copy into a consumer reading it at several
    positions. `cnnjax.layers.conv_impl.stored_input`, which divides by a scalar 1, is not
    enough here: with it a 3x3/1 pool's gradient on [32, 16, 16, 192] took 257 ms against
    39 ms (session 22), and an optimization barrier does not work either (XLA:CPU removes
    barriers before fusion)."""
    (x,), (t,) = primals, tangents
    y = _reduce_window_max(x, kernel, strides, window)
    config = ((0, 0, 0), (*window[0], 0), (*window[1], 0), (0, 0, 0))
    x_padded = jax.lax.pad(x, _lowest(x.dtype), config)
    t_padded = jax.lax.pad(t, _zero(t.dtype), config)
    n, _, _, c = x.shape
    out_h, out_w = y.shape[1:3]
    taps = [(i, j) for i in range(kernel[0]) for j in range(kernel[1])]
    step = (1, *strides, 1)

    def tap_slice(a: jax.Array, i: int, j: int) -> jax.Array:
        limit = (n, i + (out_h - 1) * strides[0] + 1, j + (out_w - 1) * strides[1] + 1, c)
        return jax.lax.slice(a, (0, i, j, 0), limit, step)

    first = jnp.full(y.shape, -1.0, jnp.float32)  # the tap taking the gradient; -1: none yet
    y_nan = jnp.isnan(y)  # a window holding NaN has max NaN, equal to nothing: its first NaN
    rows = jnp.arange(out_h)[None, :, None, None] * strides[0] - window[0][0]
    cols = jnp.arange(out_w)[None, None, :, None] * strides[1] - window[1][0]
    for k, (i, j) in enumerate(taps):
        tap = tap_slice(x_padded, i, j)
        real = ((rows + i >= 0) & (rows + i < x.shape[1])  # padding equals a -inf maximum
                & (cols + j >= 0) & (cols + j < x.shape[2]))
        hit = ((tap == y) | (y_nan & jnp.isnan(tap))) & real & (first < 0)
        first = jnp.where(hit, jnp.float32(k), first)
    first = first / (1 + 0 * first)
    t_out = jnp.zeros(y.shape, t.dtype)
    for k, (i, j) in enumerate(taps):
        t_out = t_out + jnp.where(first == k, tap_slice(t_padded, i, j), _zero(t.dtype))
    return y, t_out


def _avg_counts(n: int, k: int, s: int, p: int, out: int, count_include_pad: bool) -> np.ndarray:
    """Per-window divisors along one dimension, exactly as PyTorch's avg_pool2d computes them."""
    start = np.arange(out) * s - p
    end = np.minimum(start + k, n + p)
    with_pad = end - start
    without_pad = np.minimum(end, n) - np.maximum(start, 0)
    return with_pad if count_include_pad else without_pad


def avg_pool2d(
    x: jax.Array, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
    ceil_mode: bool = False, count_include_pad: bool = True,
) -> jax.Array:
    """Average pooling of an NHWC array with PyTorch's divisor rules.

    `count_include_pad=True` divides by the window's overlap with the zero-padded input (the
    overhang created by `ceil_mode` is never counted); `False` divides by the number of real
    input elements in the window (TensorFlow's `SAME` average pooling). bfloat16/float16 windows
    are summed in float32 and only the mean is rounded back (as PyTorch does).
    """
    owner = "avg_pool2d"
    kernel, strides, pads, outs, extra = _window_geometry(
        owner, x, kernel_size, stride, padding, ceil_mode)
    count_include_pad = check_bool(owner, "count_include_pad", count_include_pad)
    wide = x.astype(_sum_dtype(x.dtype))
    summed = jax.lax.reduce_window(
        wide, _zero(wide.dtype), jax.lax.add, (1, *kernel, 1), (1, *strides, 1),
        ((0, 0), (pads[0], pads[0] + extra[0]), (pads[1], pads[1] + extra[1]), (0, 0)))
    counts = [
        _avg_counts(n, k, s, p, o, count_include_pad)
        for n, k, s, p, o in zip(x.shape[1:3], kernel, strides, pads, outs, strict=True)
    ]
    # The [H, W] divisor as a product in the graph, not a host array: a NumPy outer product
    # of a 100000-pixel map's counts took 18 GiB during the engine's shape-only size check.
    divisor = (jnp.asarray(counts[0], summed.dtype)[None, :, None, None]
               * jnp.asarray(counts[1], summed.dtype)[None, None, :, None])
    return _narrow(summed / divisor, x.dtype)


def global_avg_pool(x: jax.Array, keepdims: bool = False) -> jax.Array:
    """Mean over height and width: `[N, H, W, C] -> [N, C]` (or `[N, 1, 1, C]` with keepdims)."""
    check_nhwc_nonempty("global_avg_pool", x)
    return jnp.mean(x, axis=(1, 2), keepdims=check_bool("global_avg_pool", "keepdims", keepdims))


def global_max_pool(x: jax.Array, keepdims: bool = False) -> jax.Array:
    """Max over height and width: `[N, H, W, C] -> [N, C]` (or `[N, 1, 1, C]` with keepdims)."""
    check_nhwc_nonempty("global_max_pool", x)
    return jnp.max(x, axis=(1, 2), keepdims=check_bool("global_max_pool", "keepdims", keepdims))


def adaptive_bins(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's adaptive bin edges: bin i is `[floor(i*size/out), ceil((i+1)*size/out))`."""
    i = np.arange(out)
    return (i * size) // out, -((-(i + 1) * size) // out)


def _bin_layout(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices `[out, longest]` of each adaptive bin's elements (clamped past the bin's end) and
    which of them are inside the bin."""
    starts, ends = adaptive_bins(size, out)
    offsets = np.arange(int(np.max(ends - starts)))
    index = np.minimum(starts[:, None] + offsets, ends[:, None] - 1)
    return index, starts[:, None] + offsets < ends[:, None]


def _adaptive_sum_axis(x: jax.Array, axis: int, out: int) -> tuple[jax.Array, np.ndarray]:
    """Sums over PyTorch's adaptive bins along one axis, and each bin's element count; bins are
    intervals, so 2-D bin sums are separable and the average divides once, by the product of
    the counts."""
    size = x.shape[axis]
    if size == out:  # Bins of one element: nothing to add.
        return x, np.ones(out, np.int64)
    if size % out == 0:  # Equal, non-overlapping bins: a window sum with kernel = stride.
        window = [1] * x.ndim
        window[axis] = size // out
        return (jax.lax.reduce_window(x, _zero(x.dtype), jax.lax.add, window, window, "VALID"),
                np.full(out, size // out))
    index, inside = _bin_layout(size, out)
    gathered = jnp.take(x, jnp.asarray(index.reshape(-1)), axis=axis)
    gathered = gathered.reshape(*x.shape[:axis], *index.shape, *x.shape[axis + 1:])
    trailing = (1,) * (x.ndim - axis - 1)
    mask = jnp.asarray(inside.reshape(index.shape + trailing))
    return jnp.sum(jnp.where(mask, gathered, 0), axis=axis + 1), inside.sum(1)


def _adaptive_max(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Max over each 2-D adaptive bin. Bins that divide the input are windows (kernel = stride);
    others are gathered into `[N, out_h, bin_h, out_w, bin_w, C]` blocks, a shorter bin's index
    clamped to its last row / column. A repeat comes after its original in row-major order, so
    it is never a bin's first maximum and never takes the gradient."""
    n, h, w, c = x.shape
    if h % out_h == 0 and w % out_w == 0:
        return _even_bin_max(x, (h // out_h, w // out_w))
    rows, _ = _bin_layout(h, out_h)
    cols, _ = _bin_layout(w, out_w)
    blocks = jnp.take(x, jnp.asarray(rows.reshape(-1)), axis=1)
    blocks = jnp.take(blocks, jnp.asarray(cols.reshape(-1)), axis=2)
    return _block_max(blocks.reshape(n, *rows.shape, *cols.shape, c))


def _first_max_tangent(blocks: jax.Array, y: jax.Array, t: jax.Array) -> jax.Array:
    """The tangent `t` (shaped as `blocks`, `[N, A, bin_h, B, bin_w, C]`) at each bin's first
    maximum `y` in row-major order (a NaN wins, as in the max), as PyTorch's adaptive max
    pooling picks; `jnp.max`'s own rule splits it among ties. Masks and sums only: reverse mode
    needs no select_and_scatter (XLA:CPU's slow max-pool gradient, docs/performance.md)."""
    bin_h, bin_w = blocks.shape[2], blocks.shape[4]
    position = np.arange(bin_h * bin_w).reshape(1, 1, bin_h, 1, bin_w, 1)
    winner = (blocks == y[:, :, None, :, None]) | jnp.isnan(blocks)
    first = jnp.min(jnp.where(winner, position, bin_h * bin_w), axis=(2, 4), keepdims=True)
    return jnp.sum(jnp.where(position == first, t, _zero(t.dtype)), axis=(2, 4))


@jax.custom_jvp
def _block_max(blocks: jax.Array) -> jax.Array:
    """`[N, A, bin_h, B, bin_w, C] -> [N, A, B, C]` maxima; gradient: `_first_max_tangent`."""
    return jnp.max(blocks, axis=(2, 4))


@_block_max.defjvp
def _block_max_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array],
                   ) -> tuple[jax.Array, jax.Array]:
    (blocks,), (t,) = primals, tangents
    y = jnp.max(blocks, axis=(2, 4))
    return y, _first_max_tangent(blocks, y, t)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _even_bin_max(x: jax.Array, bin_size: tuple[int, int]) -> jax.Array:
    """Max over `bin_size` windows tiling the NHWC `x`: XLA's windowed max over rows, then
    columns (3x faster than one 2-D window or a reshape on CPU); gradient: `_first_max_tangent`
    of the windows seen as the blocks of a reshape."""
    (bin_h, bin_w), no_padding = bin_size, ((0, 0), (0, 0))
    rows = _reduce_window_max(x, (bin_h, 1), (bin_h, 1), no_padding)
    return _reduce_window_max(rows, (1, bin_w), (1, bin_w), no_padding)


@_even_bin_max.defjvp
def _even_bin_max_jvp(bin_size: tuple[int, int], primals: tuple[jax.Array],
                      tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    y = _even_bin_max(x, bin_size)
    n, h, w, c = x.shape
    shape = (n, h // bin_size[0], bin_size[0], w // bin_size[1], bin_size[1], c)
    return y, _first_max_tangent(x.reshape(shape), y, t.reshape(shape))


def _adaptive_pool2d(owner: str, x: jax.Array, output_size: IntPair, mode: str) -> jax.Array:
    """Adaptive pooling: 2-D bins for max (`_adaptive_max`); averages sum each axis's bins in
    turn (separable; in `_sum_dtype`) and divide once by the bin sizes, then cast back. Equal
    bins so cost what `avg_pool2d` of the same windows costs (window - 1 adds and one division
    per output; the map itself for 1x1 bins), as XLA and `cnnjax.analysis.summary` count it;
    a division after each axis's sums counted (and computed) one more per intermediate
    element."""
    check_nhwc_nonempty(owner, x)
    out_h, out_w = to_pair(owner, "output_size", output_size)
    if mode == "max":
        return _adaptive_max(x, out_h, out_w)
    if (out_h, out_w) == x.shape[1:3] and jnp.issubdtype(x.dtype, jnp.floating):
        return x  # 1x1 bins, one per pixel: the identity (bins of one pixel repeated are not)
    wide = x.astype(_sum_dtype(x.dtype))
    summed, rows = _adaptive_sum_axis(wide, 1, out_h)
    summed, cols = _adaptive_sum_axis(summed, 2, out_w)
    counts = np.outer(rows, cols)
    if np.all(counts == counts.flat[0]):  # equal bins: avg_pool2d's window sums and division
        return _narrow(summed / np.array(counts.flat[0], summed.dtype), x.dtype)
    return _narrow(summed / jnp.asarray(counts[None, :, :, None], summed.dtype), x.dtype)


def adaptive_avg_pool2d(x: jax.Array, output_size: IntPair) -> jax.Array:
    """Averages over PyTorch's adaptive bins to `[N, out_h, out_w, C]` for any input size.

    When the input size is divisible by the output size this is `avg_pool2d` with
    kernel = stride = size // out (torchvision AlexNet's 6x6 pooling of a 6x6 map is the identity).
    """
    return _adaptive_pool2d("adaptive_avg_pool2d", x, output_size, "avg")


def adaptive_max_pool2d(x: jax.Array, output_size: IntPair) -> jax.Array:
    """Max over PyTorch's adaptive bins to `[N, out_h, out_w, C]` for any input size; the
    gradient goes to each bin's first maximum in row-major order, as in PyTorch (several NaNs
    in a bin: the first NaN, where PyTorch takes the last)."""
    return _adaptive_pool2d("adaptive_max_pool2d", x, output_size, "max")


def spatial_pyramid_pool(
    x: jax.Array, levels: Sequence[int] = (1, 2, 4), mode: str = "max",
) -> jax.Array:
    """Spatial pyramid pooling (He et al., 2014): a fixed-length `[N, C * sum(l*l)]` vector.

    Each level `l` pools the map into an `l x l` grid of adaptive bins (PyTorch's bin edges; for
    sizes divisible by `l` they coincide with the paper's window ceil(a/l), stride floor(a/l)),
    flattens it in (row, column, channel) order, and the levels are concatenated in the given
    order. Any input of at least 1x1 works; a map smaller than a level repeats pixels across bins.
    """
    owner = "spatial_pyramid_pool"
    check_nhwc_nonempty(owner, x)
    check_choice(owner, "mode", mode, ("max", "avg"))
    levels = check_pyramid_levels(owner, levels)
    parts = [_adaptive_pool2d(owner, x, level, mode).reshape(x.shape[0], level * level * x.shape[3])
             for level in levels]  # Explicit sizes: `-1` is ambiguous for an empty batch.
    return jnp.concatenate(parts, axis=1)


def check_pyramid_levels(owner: str, levels: Any) -> tuple[int, ...]:
    """`levels` as a tuple of ints if it is a non-empty sequence of positive ints (NumPy
    integers too), else a ValueError."""
    return check_positive_ints(owner, "levels", levels,
                               "expected a non-empty sequence of positive ints")

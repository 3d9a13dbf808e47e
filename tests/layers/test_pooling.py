"""Pooling checked against TensorFlow's pooling ops and float64 NumPy loop references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.test_util import check_grads

from cnnjax.layers.pooling import (
    adaptive_avg_pool2d,
    adaptive_max_pool2d,
    avg_pool2d,
    global_avg_pool,
    global_max_pool,
    max_pool2d,
    spatial_pyramid_pool,
)
from tests.layers.pool_reference import pool_reference

RTOL, ATOL = 1e-4, 1e-5


def _random(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------- float64 NumPy references
# (pooling: tests/layers/pool_reference.py)


def _adaptive_reference(x, out_size, mode):
    x = np.asarray(x, np.float64)  # a jax array's astype(float64) stays float32 without x64
    n, h, w, c = x.shape
    oh, ow = out_size
    out = np.zeros((n, oh, ow, c))
    for i in range(oh):
        r0, r1 = math.floor(i * h / oh), math.ceil((i + 1) * h / oh)
        for j in range(ow):
            q0, q1 = math.floor(j * w / ow), math.ceil((j + 1) * w / ow)
            window = x[:, r0:r1, q0:q1]
            out[:, i, j] = window.max(axis=(1, 2)) if mode == "max" else window.mean(axis=(1, 2))
    return out


# ---------------------------------------------------------------- TensorFlow comparisons


@pytest.mark.parametrize("kernel,stride", [(3, 2), (2, 2), (3, 1), ((3, 2), (2, 1)), (5, 3)])
def test_valid_pooling_matches_tensorflow(kernel, stride):
    x = _random((2, 13, 11, 3))
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    s = stride if isinstance(stride, tuple) else (stride, stride)
    expected_max = tf.nn.max_pool2d(x, k, s, "VALID").numpy()
    expected_avg = tf.nn.avg_pool2d(x, k, s, "VALID").numpy()
    np.testing.assert_allclose(max_pool2d(x, kernel, stride), expected_max, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(avg_pool2d(x, kernel, stride), expected_avg, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("size,kernel,stride", [(9, 3, 1), (9, 3, 2), (11, 5, 2), (13, 3, 3)])
def test_same_pooling_matches_tensorflow_when_padding_is_symmetric(size, kernel, stride):
    # TF's SAME pads total = max((out - 1) * s + k - n, 0), out = ceil(n / s), the extra pixel at
    # the bottom/right; with symmetric padding k // 2 the two coincide exactly when that total is
    # 2 * (k // 2). TF's SAME average excludes the padding: count_include_pad=False.
    out = -(-size // stride)
    assert max((out - 1) * stride + kernel - size, 0) == 2 * (kernel // 2)
    x = _random((2, size, size, 3), seed=1)
    pad = kernel // 2
    np.testing.assert_allclose(max_pool2d(x, kernel, stride, pad),
                               tf.nn.max_pool2d(x, kernel, stride, "SAME").numpy(),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(avg_pool2d(x, kernel, stride, pad, count_include_pad=False),
                               tf.nn.avg_pool2d(x, kernel, stride, "SAME").numpy(),
                               rtol=RTOL, atol=ATOL)


def test_global_pooling_matches_tensorflow():
    x = _random((2, 7, 9, 5), seed=2)
    np.testing.assert_allclose(global_avg_pool(x), tf.reduce_mean(x, axis=(1, 2)).numpy(),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(global_max_pool(x), tf.reduce_max(x, axis=(1, 2)).numpy(),
                               rtol=RTOL, atol=ATOL)
    assert global_avg_pool(x, keepdims=True).shape == (2, 1, 1, 5)
    assert global_max_pool(x, keepdims=True).shape == (2, 1, 1, 5)


# ---------------------------------------------------------------- ceil_mode / count_include_pad


@pytest.mark.parametrize(
    "size,kernel,stride,padding",
    [(9, 3, 2, 0), (8, 3, 2, 0), (10, 3, 2, 1), (5, 2, 2, 1), (11, 3, 3, 1), (7, 4, 3, 2),
     ((9, 12), (3, 2), (2, 3), (1, 0))],
)
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_pooling_matches_numpy_reference(size, kernel, stride, padding, ceil_mode):
    hw = size if isinstance(size, tuple) else (size, size)
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    x = _random((2, *hw, 3), seed=3)
    args = (pair(kernel), pair(stride), pair(padding), ceil_mode)
    got_max, *got_avg = jax.jit(lambda v: [max_pool2d(v, kernel, stride, padding, ceil_mode)] + [
        avg_pool2d(v, kernel, stride, padding, ceil_mode, count_include_pad=include)
        for include in (True, False)])(x)
    np.testing.assert_allclose(got_max, pool_reference(x, *args, "max"), rtol=RTOL, atol=ATOL)
    for include, got in zip((True, False), got_avg, strict=True):
        expected = pool_reference(x, *args, "avg", count_include_pad=include)
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "size,kernel,stride,padding",
    [(9, 2, 3, 0), (10, 2, 3, 1), (11, 3, 5, 1), (7, 1, 2, 0), (12, 2, 4, 1),
     ((9, 13), (2, 3), (3, 4), (1, 1))],
)
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_stride_larger_than_kernel_matches_torch(size, kernel, stride, padding, ceil_mode):
    """Windows that skip pixels (stride > kernel) against torch.nn.functional's pooling."""
    torch = pytest.importorskip("torch")
    hw = size if isinstance(size, tuple) else (size, size)
    x = _random((2, *hw, 3), seed=5)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    to_nhwc = lambda y: y.numpy().transpose(0, 2, 3, 1)
    want = to_nhwc(torch.nn.functional.max_pool2d(xt, kernel, stride, padding,
                                                  ceil_mode=ceil_mode))
    got = max_pool2d(x, kernel, stride, padding, ceil_mode)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    for include in (True, False):
        want = to_nhwc(torch.nn.functional.avg_pool2d(xt, kernel, stride, padding, ceil_mode,
                                                      count_include_pad=include))
        got = avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad=include)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "size,kernel,stride,padding,floor_out,ceil_out",
    [
        (112, 3, 2, 0, 55, 56),  # GoogLeNet's overlapping 3x3/s2 pooling rounds up.
        (8, 3, 2, 0, 3, 4),
        (5, 2, 2, 1, 3, 3),  # The ceil window would start in the right padding: dropped.
        (55, 3, 2, 0, 27, 27),  # AlexNet's pool1: exact, both modes agree.
    ],
)
def test_output_sizes_by_hand(size, kernel, stride, padding, floor_out, ceil_out):
    x = jnp.zeros((1, size, size, 1))
    assert max_pool2d(x, kernel, stride, padding).shape[1] == floor_out
    assert max_pool2d(x, kernel, stride, padding, ceil_mode=True).shape[1] == ceil_out


def test_count_include_pad_by_hand():
    # 3x3 ones, k=2 s=2 p=1: each corner window holds one real pixel and three padded zeros.
    x = jnp.ones((1, 3, 3, 1))
    np.testing.assert_allclose(avg_pool2d(x, 2, 2, 1)[0, :, :, 0], [[0.25, 0.5], [0.5, 1.0]])
    np.testing.assert_allclose(avg_pool2d(x, 2, 2, 1, count_include_pad=False),
                               np.ones((1, 2, 2, 1)))


def test_max_pool_is_invariant_to_shifts_within_its_window():
    # A single activation peak anywhere inside one 3x3/s3 window gives the same pooled output.
    base = np.zeros((1, 9, 9, 1), np.float32)
    outputs = []
    for dy in range(3):
        for dx in range(3):
            x = base.copy()
            x[0, 3 + dy, 6 + dx, 0] = 1.0
            outputs.append(np.asarray(max_pool2d(x, 3)))
    for out in outputs:
        np.testing.assert_array_equal(out, outputs[0])
    # ...while a shift that crosses into the next window moves the output.
    x = base.copy()
    x[0, 6, 6, 0] = 1.0
    assert not np.array_equal(np.asarray(max_pool2d(x, 3)), outputs[0])


# ---------------------------------------------------------------- adaptive pooling and SPP


@pytest.mark.parametrize("hw,out", [((9, 11), (4, 3)), ((7, 7), (7, 7)), ((13, 13), (6, 6)),
                                    ((5, 3), (7, 2)), ((12, 9), (4, 3))])
def test_adaptive_pooling_matches_numpy_reference(hw, out):
    x = _random((2, *hw, 3), seed=4)
    avg, max_ = jax.jit(lambda v: (adaptive_avg_pool2d(v, out), adaptive_max_pool2d(v, out)))(x)
    np.testing.assert_allclose(avg, _adaptive_reference(x, out, "avg"), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(max_, _adaptive_reference(x, out, "max"), rtol=RTOL, atol=ATOL)


def test_adaptive_pooling_reduces_to_plain_pooling_when_divisible():
    x = _random((2, 12, 18, 3), seed=5)
    np.testing.assert_allclose(adaptive_avg_pool2d(x, (4, 6)), avg_pool2d(x, 3),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(adaptive_max_pool2d(x, (4, 3)), max_pool2d(x, (3, 6)))
    # torchvision AlexNet: AdaptiveAvgPool2d((6, 6)) of its 6x6 map at 224 is the identity.
    six = _random((1, 6, 6, 4), seed=6)
    np.testing.assert_allclose(adaptive_avg_pool2d(six, 6), six, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("hw", [(9, 11), (13, 13), (5, 7)])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spatial_pyramid_pool_fixed_length_and_values(hw, mode):
    channels, levels = 3, (1, 2, 4)
    x = _random((2, *hw, channels), seed=7)
    got = jax.jit(lambda v: spatial_pyramid_pool(v, levels, mode))(x)
    assert got.shape == (2, channels * (1 + 4 + 16))
    expected = np.concatenate(
        [_adaptive_reference(x, (lv, lv), mode).reshape(2, -1) for lv in levels], axis=1)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_spatial_pyramid_pool_matches_paper_windows_when_divisible():
    # He et al.: level n on an a x a map uses window ceil(a/n) and stride floor(a/n).
    x = _random((1, 12, 12, 2), seed=8)
    got = spatial_pyramid_pool(x, levels=(3,), mode="max")
    np.testing.assert_array_equal(got, np.asarray(max_pool2d(x, 4, 4)).reshape(1, -1))


def test_spatial_pyramid_pool_gradients():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(9).normal(size=(1, 7, 5, 2)))
        check_grads(jax.jit(lambda v: spatial_pyramid_pool(v, (1, 2, 3), "avg")), (x,),
                    order=1, modes=("fwd", "rev"))


def test_pooling_jits():
    x = _random((1, 9, 9, 2), seed=10)
    fn = jax.jit(lambda v: avg_pool2d(v, 3, 2, 1, ceil_mode=True, count_include_pad=False))
    expected = pool_reference(x, (3, 3), (2, 2), (1, 1), True, "avg", False)
    np.testing.assert_allclose(fn(x), expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- errors

X = jnp.zeros((1, 5, 5, 2))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: max_pool2d(jnp.zeros((5, 5, 2)), 2),
         "max_pool2d: input.shape=(5, 5, 2) is invalid; expected a rank-4 NHWC array"),
        (lambda: max_pool2d(X, 0),
         "max_pool2d: kernel_size=0 is invalid; expected every entry >= 1"),
        (lambda: max_pool2d(X, 2, stride=0),
         "max_pool2d: stride=0 is invalid; expected every entry >= 1"),
        (lambda: max_pool2d(X, (2, 2, 2)),
         "max_pool2d: kernel_size=(2, 2, 2) is invalid; expected an int or a pair of ints"),
        (lambda: max_pool2d(X, 3, padding=2),
         "max_pool2d: padding=2 is invalid; expected at most half the kernel size (3, 3)"),
        (lambda: avg_pool2d(X, 2, padding=-1),
         "avg_pool2d: padding=-1 is invalid; expected every entry >= 0"),
        (lambda: max_pool2d(X, 6),
         "max_pool2d: kernel_size=6 is invalid; expected at most the padded input size (5, 5)"),
        (lambda: avg_pool2d(X, (2, 8), padding=1),
         "avg_pool2d: kernel_size=(2, 8) is invalid; expected at most the padded input size "
         "(7, 7)"),
        (lambda: max_pool2d(X, 2, ceil_mode="yes"),
         "max_pool2d: ceil_mode='yes' is invalid; expected True or False"),
        (lambda: avg_pool2d(X, 2, count_include_pad=1),
         "avg_pool2d: count_include_pad=1 is invalid; expected True or False"),
        (lambda: global_avg_pool(jnp.zeros((2, 3))),
         "global_avg_pool: input.shape=(2, 3) is invalid"),
        (lambda: global_max_pool(jnp.zeros((2, 3))),
         "global_max_pool: input.shape=(2, 3) is invalid"),
        (lambda: adaptive_avg_pool2d(X, 0),
         "adaptive_avg_pool2d: output_size=0 is invalid; expected every entry >= 1"),
        (lambda: adaptive_max_pool2d(X, (2, -1)),
         "adaptive_max_pool2d: output_size=(2, -1) is invalid; expected every entry >= 1"),
        (lambda: spatial_pyramid_pool(X, mode="sum"),
         "spatial_pyramid_pool: mode='sum' is invalid; expected one of ['max', 'avg']"),
        (lambda: spatial_pyramid_pool(X, levels=()),
         "spatial_pyramid_pool: levels=() is invalid; expected a non-empty sequence of positive"),
        (lambda: spatial_pyramid_pool(X, levels=(1, 0)),
         "spatial_pyramid_pool: levels=(1, 0) is invalid; expected a non-empty sequence"),
        (lambda: spatial_pyramid_pool(X, levels=3),
         "spatial_pyramid_pool: levels=3 is invalid; expected a non-empty sequence"),
        # An empty map has no mean (NaN) or max; padding must not invent one either.
        (lambda: global_avg_pool(jnp.zeros((1, 0, 5, 2))),
         "global_avg_pool: input.shape=(1, 0, 5, 2) is invalid; expected height and width >= 1"),
        (lambda: global_max_pool(jnp.zeros((1, 5, 0, 2))),
         "global_max_pool: input.shape=(1, 5, 0, 2) is invalid; expected height and width >= 1"),
        (lambda: adaptive_avg_pool2d(jnp.zeros((1, 0, 5, 2)), 2),
         "adaptive_avg_pool2d: input.shape=(1, 0, 5, 2) is invalid; expected height and width"),
        (lambda: adaptive_max_pool2d(jnp.zeros((1, 0, 5, 2)), 2),
         "adaptive_max_pool2d: input.shape=(1, 0, 5, 2) is invalid; expected height and width"),
        (lambda: spatial_pyramid_pool(jnp.zeros((1, 0, 0, 2))),
         "spatial_pyramid_pool: input.shape=(1, 0, 0, 2) is invalid; expected height and width"),
        (lambda: max_pool2d(jnp.zeros((1, 0, 5, 2)), 2, padding=1),
         "max_pool2d: input.shape=(1, 0, 5, 2) is invalid; expected height and width >= 1"),
        (lambda: avg_pool2d(jnp.zeros((1, 5, 0, 2)), 2, padding=1),
         "avg_pool2d: input.shape=(1, 5, 0, 2) is invalid; expected height and width >= 1"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(message), str(info.value)


# ---------------------------------------------------------------- low-precision averages

BF16_ROUNDING = 2.0**-8  # Largest relative error of rounding a positive value to bfloat16.


def _bf16_positive(shape, seed):
    """Post-ReLU-like bfloat16 activations and their exact float64 values."""
    x = jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1.0, shape), jnp.bfloat16)
    return x, np.asarray(x, np.float64)


def _assert_bf16_rounding_of(got, exact):
    assert got.dtype == jnp.bfloat16
    relative = np.abs(np.asarray(got, np.float64) - exact) / np.abs(exact)
    assert relative.max() <= BF16_ROUNDING, relative.max()


@pytest.mark.parametrize("kernel,stride,padding,ceil_mode",
                         [(3, 2, 0, False), (5, 3, 2, True), (7, 1, 0, False), (14, 14, 0, False),
                          (3, 2, 1, True)])
def test_bfloat16_avg_pool_only_rounds_the_output(kernel, stride, padding, ceil_mode):
    # Summing 49-196 bfloat16 values in bfloat16 was off by up to 4.6%; in float32 the only
    # error left is rounding the mean to bfloat16 (PyTorch's bf16 avg_pool2d: 0.39%).
    x, exact = _bf16_positive((2, 14, 14, 16), seed=11)
    got = avg_pool2d(x, kernel, stride, padding, ceil_mode)
    _assert_bf16_rounding_of(got, pool_reference(exact, (kernel,) * 2, (stride,) * 2,
                                                  (padding,) * 2, ceil_mode, "avg"))


@pytest.mark.parametrize("out", [1, (7, 2), (4, 3), 5])
def test_bfloat16_adaptive_avg_pool_only_rounds_the_output(out):
    x, exact = _bf16_positive((2, 14, 14, 16), seed=12)
    pair = (out, out) if isinstance(out, int) else out
    _assert_bf16_rounding_of(adaptive_avg_pool2d(x, out), _adaptive_reference(exact, pair, "avg"))
    levels = (1, 3, 5)
    expected = np.concatenate(
        [_adaptive_reference(exact, (lv, lv), "avg").reshape(2, -1) for lv in levels], axis=1)
    _assert_bf16_rounding_of(spatial_pyramid_pool(x, levels, "avg"), expected)


def test_float32_and_integer_averages_keep_their_dtypes():
    x = _random((1, 9, 9, 2), seed=13)
    assert avg_pool2d(x, 3).dtype == jnp.float32
    assert adaptive_avg_pool2d(x, 4).dtype == jnp.float32
    ints = jnp.arange(2 * 4 * 4).reshape(1, 4, 4, 2)
    np.testing.assert_allclose(avg_pool2d(ints, 2),
                               pool_reference(np.asarray(ints), (2, 2), (2, 2), (0, 0), False,
                                               "avg"), rtol=RTOL, atol=ATOL)
    # Narrow integers are summed in int32: a uint8 window of 200s wrapped around to 8.
    for dtype, value in ((np.uint8, 200), (np.int8, -100), (np.int16, 30000)):
        full = jnp.full((1, 4, 4, 1), value, dtype)
        for pooled in jax.jit(lambda v: (avg_pool2d(v, 2), adaptive_avg_pool2d(v, 1),
                                         global_avg_pool(v),
                                         spatial_pyramid_pool(v, (1, 2), "avg")))(full):
            np.testing.assert_array_equal(pooled, np.full(pooled.shape, value, np.float32))


def test_empty_batch_is_still_pooled():
    empty = jnp.zeros((0, 6, 6, 2))
    assert max_pool2d(empty, 2).shape == (0, 3, 3, 2)
    assert global_avg_pool(empty).shape == (0, 2)
    assert spatial_pyramid_pool(empty, (1, 2)).shape == (0, 10)


def test_boolean_maps_pool_like_their_0_1_values():
    # max_pool2d of a mask raised "Invalid integer data type 'b'"; the max of booleans is their
    # logical or (kept bool, as global_max_pool does) and their average the fraction of True.
    mask = np.random.default_rng(14).uniform(size=(2, 9, 11, 3)) > 0.7
    ones = mask.astype(np.float64)
    outs = ((4, 3), (3, 11))
    got, averaged, adaptive, pyramid = jax.jit(lambda m: (
        max_pool2d(m, 3, 2, 1, ceil_mode=True), avg_pool2d(m, 3, 2, 1, count_include_pad=False),
        [(adaptive_max_pool2d(m, out), adaptive_avg_pool2d(m, out)) for out in outs],
        spatial_pyramid_pool(m)))(jnp.asarray(mask))
    assert got.dtype == jnp.bool_
    np.testing.assert_array_equal(
        got, pool_reference(ones, (3, 3), (2, 2), (1, 1), True, "max") > 0)
    np.testing.assert_allclose(averaged, pool_reference(ones, (3, 3), (2, 2), (1, 1), False,
                                                         "avg", False), rtol=RTOL, atol=ATOL)
    for out, (maxed, mean) in zip(outs, adaptive, strict=True):
        assert maxed.dtype == jnp.bool_
        np.testing.assert_array_equal(maxed, _adaptive_reference(ones, out, "max") > 0)
        np.testing.assert_allclose(mean, _adaptive_reference(ones, out, "avg"), rtol=RTOL,
                                   atol=ATOL)
    expected = np.concatenate(
        [_adaptive_reference(ones, (lv, lv), "max").reshape(2, -1) > 0 for lv in (1, 2, 4)], 1)
    np.testing.assert_array_equal(pyramid, expected)


# ------------------------------------------------------------------ max-pool gradient on CPU
# max_pool2d differentiates through a tangent rule (strided slices of the first maximum of each
# window) instead of XLA's select_and_scatter; these pin it to the same gradient.
_GEOMETRIES = [((16, 16), 3, 2, 1, False), ((13, 11), 3, 2, 0, True), ((9, 9), 2, 2, 0, False),
               ((10, 12), (3, 2), (1, 2), (1, 0), False), ((11, 11), 2, 3, 1, True),
               ((7, 7), 3, 1, 1, False)]


def _value_and_pullback(fn, x, cotangent):
    """`fn(x)` and its pullback of `cotangent`, for one jitted program (an eager vjp compiles
    each primitive on its own)."""
    y, pullback = jax.vjp(fn, x)
    return y, pullback(cotangent)[0]


def _select_and_scatter_pool(x, kernel, stride, padding, ceil_mode):
    """max_pool2d's windowed max, differentiated by XLA's own select_and_scatter."""
    from cnnjax.layers import pooling

    kernel, strides, pads, _, extra = pooling._window_geometry(
        "test", x, kernel, stride, padding, ceil_mode)
    window = ((pads[0], pads[0] + extra[0]), (pads[1], pads[1] + extra[1]))
    return pooling._reduce_window_max(x, kernel, strides, window)


@pytest.mark.parametrize("size,kernel,stride,padding,ceil_mode", _GEOMETRIES)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_gradient_equals_select_and_scatter_bitwise(size, kernel, stride, padding,
                                                             ceil_mode, ties):
    """Ties (integer-valued inputs, 5 levels) must send the gradient to the same element: the
    first maximum of the window in row-major order."""
    x = _random((3, *size, 4), seed=11)
    if ties:
        x = np.round(np.clip(x, -1, 1) * 2).astype(np.float32)
    cotangent = _random((3, *max_pool2d(x, kernel, stride, padding, ceil_mode).shape[1:]), 12)

    def loss(pool):
        return lambda v: jnp.sum(pool(v, kernel, stride, padding, ceil_mode) * cotangent)

    got = jax.jit(jax.grad(loss(max_pool2d)))(x)
    want = jax.jit(jax.grad(loss(_select_and_scatter_pool)))(x)
    np.testing.assert_array_equal(got, want)
    assert np.count_nonzero(got) <= cotangent.size  # one element per window at most


def test_max_pool_gradient_leaves_select_and_scatter_out_on_cpu():
    x = _random((2, 8, 8, 3))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(max_pool2d(v, 3, 2, 1))))(x))
    assert "select_and_scatter" not in jaxpr
    plain = str(jax.make_jaxpr(jax.grad(
        lambda v: jnp.sum(_select_and_scatter_pool(v, 3, 2, 1, False))))(x))
    assert "select_and_scatter" in plain  # the check can fail


@pytest.mark.parametrize("size,kernel,stride,padding,ceil_mode", _GEOMETRIES[:3])
def test_max_pool_gradient_matches_torch(size, kernel, stride, padding, ceil_mode):
    """An independent reference: PyTorch's max_pool2d backward (its indices pick the first
    maximum too), on tie-free inputs."""
    torch = pytest.importorskip("torch")
    x = _random((2, *size, 3), seed=13)
    y = jax.eval_shape(lambda v: max_pool2d(v, kernel, stride, padding, ceil_mode), x)
    cotangent = _random(y.shape, seed=14)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, kernel, stride, padding, ceil_mode=ceil_mode)
    (yt * torch.from_numpy(cotangent.transpose(0, 3, 1, 2).copy())).sum().backward()
    got = jax.jit(jax.grad(lambda v: jnp.sum(max_pool2d(v, kernel, stride, padding, ceil_mode)
                                             * cotangent)))(x)
    np.testing.assert_array_equal(got, xt.grad.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("size,kernel,stride,padding,ceil_mode", _GEOMETRIES)
def test_a_window_whose_maximum_is_minus_inf_gives_its_gradient_to_a_real_element(
        size, kernel, stride, padding, ceil_mode):
    """A -inf maximum equals the -inf padding: the gradient must still reach the window's first
    real element, as in PyTorch (select_and_scatter gives it to the padding, losing it)."""
    torch = pytest.importorskip("torch")
    x = _random((1, *size, 2), seed=15)
    x[:, : size[0] // 2] = -np.inf  # the top half: windows of -inf only, some over padding
    y = jax.eval_shape(lambda v: max_pool2d(v, kernel, stride, padding, ceil_mode), x)
    cotangent = np.ones(y.shape, np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, kernel, stride, padding, ceil_mode=ceil_mode)
    yt.sum().backward()
    got = jax.jit(jax.grad(lambda v: jnp.sum(max_pool2d(v, kernel, stride, padding, ceil_mode)
                                             * cotangent)))(x)
    np.testing.assert_array_equal(got, xt.grad.numpy().transpose(0, 2, 3, 1))
    assert float(np.sum(got)) == cotangent.size  # every window's gradient lands somewhere


def test_max_pool_gradient_stores_the_first_maximum_index():
    """The first-maximum tap index reaches the compiled gradient as a stored division result:
    were `1 + 0 * first` folded, XLA would recompute the whole first-maximum chain for each tap
    inside the backward's pad fusion (6x slower, docs/performance.md). CPU only: elsewhere
    `max_pool2d` is `select_and_scatter`'s."""
    if jax.default_backend() != "cpu":
        pytest.skip("the tangent rule is CPU-only")
    x = _random((2, 9, 9, 3), seed=16)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(max_pool2d(v, 3, 2, 1)))))
    assert grad.lower(x).compile().as_text().count(" divide(") >= 1


def test_max_pool_forward_mode_and_second_order():
    """The tangent rule also serves jvp, as select_and_scatter-based pooling did, and the
    gradient differentiates again (`check_grads` to second order, forward and reverse)."""
    x = _random((2, 9, 9, 3), seed=15)
    t = _random(x.shape, seed=16)
    pool = jax.jit(lambda v: max_pool2d(v, 3, 2, 1))
    y, y_dot = jax.jit(lambda v, t: jax.jvp(pool, (v,), (t,)))(x, t)
    want_y, want_dot = jax.jit(lambda v, t: jax.jvp(
        lambda u: _select_and_scatter_pool(u, 3, 2, 1, False), (v,), (t,)))(x, t)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(y_dot, want_dot)
    check_grads(pool, (x,), order=2, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)


def test_bfloat16_max_pool_gradient_equals_select_and_scatter():
    x = jnp.asarray(_random((2, 12, 12, 3), seed=17), jnp.bfloat16)
    got = jax.jit(jax.grad(lambda v: jnp.sum(max_pool2d(v, 3, 2, 1).astype(jnp.float32))))(x)
    want = jax.jit(jax.grad(lambda v: jnp.sum(
        _select_and_scatter_pool(v, 3, 2, 1, False).astype(jnp.float32))))(x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# ------------------------------------------------------------ adaptive max-pool gradient
# adaptive_max_pool2d takes each 2-D bin's max at once (`_block_max`) and sends the gradient to
# the bin's first maximum in row-major order, as PyTorch does, ties included.
@pytest.mark.parametrize("size,out", [((12, 12), (4, 4)), ((12, 10), (3, 4)), ((7, 5), (3, 2)),
                                      ((5, 9), (5, 4)), ((6, 6), (1, 1))])
@pytest.mark.parametrize("ties", [False, True])
def test_adaptive_max_pool_gradient_matches_torch(size, out, ties):
    """Divisible, mixed and uneven (overlapping) bins; ties: integer-valued inputs, 3 levels."""
    torch = pytest.importorskip("torch")
    x = _random((2, *size, 3), seed=18)
    if ties:
        x = np.round(np.clip(x, -1, 1)).astype(np.float32)
    cotangent = _random((2, *out, 3), seed=19)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    yt = torch.nn.functional.adaptive_max_pool2d(xt, out)
    (yt * torch.from_numpy(cotangent.transpose(0, 3, 1, 2).copy())).sum().backward()
    y, grad = jax.jit(lambda v, c: _value_and_pullback(lambda u: adaptive_max_pool2d(u, out), v,
                                                       c))(x, cotangent)
    np.testing.assert_array_equal(y, yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(grad, xt.grad.numpy().transpose(0, 2, 3, 1))


def test_adaptive_max_pool_tie_gradient_by_hand():
    """The two cases that once differed from PyTorch: a 2x2 bin tied on its anti-diagonal
    (rows first: (0, 1), not (1, 0)) and uneven bins of [1, 1, 0, 0, 0] (no double weight on
    a repeated element, no split between ties)."""
    x = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32).reshape(1, 2, 2, 1)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(adaptive_max_pool2d(v, 1))))(x)
    np.testing.assert_array_equal(grad.reshape(2, 2), [[0, 1], [0, 0]])
    x = np.array([1.0, 1.0, 0.0, 0.0, 0.0], np.float32).reshape(1, 5, 1, 1)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(adaptive_max_pool2d(v, (3, 1))[:, 0])))(x)
    np.testing.assert_array_equal(grad.ravel(), [1, 0, 0, 0, 0])


def test_spatial_pyramid_max_differentiates_without_windowed_reductions():
    """No select_and_scatter (XLA:CPU's slow max-pool gradient) and, for bins that divide the
    map, no gather either: forward and reverse mode, to second order."""
    x = _random((2, 8, 8, 3), seed=22)
    jaxpr = str(jax.make_jaxpr(jax.grad(
        lambda v: jnp.sum(spatial_pyramid_pool(v, (1, 2, 4), "max") ** 2)))(x))
    assert "select_and_scatter" not in jaxpr and "scatter" not in jaxpr
    check_grads(jax.jit(lambda v: spatial_pyramid_pool(v, (1, 2, 3), "max")), (x,), order=2,
                modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)


def test_adaptive_max_pool_nan_wins_and_takes_the_gradient():
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 1, 2, 0] = np.nan
    y, grad = jax.jit(lambda v: _value_and_pullback(lambda u: adaptive_max_pool2d(u, 2), v,
                                                    jnp.ones((1, 2, 2, 1))))(x)
    assert np.isnan(y[0, 0, 1, 0]) and not np.isnan(np.delete(y.ravel(), 1)).any()
    assert grad[0, 1, 2, 0] == 1 and grad[0, :2, 2:].sum() == 1


def test_max_pool_gradient_reaches_a_nan_in_its_window():
    """A window holding NaN has max NaN, which equals nothing: the tangent rule lost the whole
    window's gradient, where PyTorch (and select_and_scatter) send it to the NaN."""
    torch = pytest.importorskip("torch")
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    x[0, 1, 1, 0] = np.nan
    y, grad = jax.jit(lambda v: _value_and_pullback(lambda u: max_pool2d(u, 2, 2), v,
                                                    jnp.ones((1, 2, 2, 1))))(x)
    grad = np.asarray(grad)  # (nansum's own gradient skips NaNs)
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    out = torch.nn.functional.max_pool2d(tx, 2, 2)
    out.backward(torch.ones_like(out))
    np.testing.assert_array_equal(grad, tx.grad.numpy().transpose(0, 2, 3, 1))
    assert grad[0, 1, 1, 0] == 1.0


@pytest.mark.parametrize("pool", [global_avg_pool, global_max_pool])
def test_global_pool_keepdims_must_be_a_bool(pool):
    with pytest.raises(ValueError, match=rf"^{pool.__name__}: keepdims='no' is invalid; expected "
                                         r"True or False"):
        pool(jnp.ones((1, 2, 2, 1)), keepdims="no")


@pytest.mark.parametrize("shape,out", [((1, 1, 1, 2), 3), ((1, 2, 3, 2), (4, 6)),
                                       ((1, 4, 4, 1), 4), ((1, 2, 2, 3), (2, 5))])
def test_adaptive_avg_pool_of_one_pixel_bins_repeats_or_keeps_them(shape, out):
    """Bins of one pixel each: the map itself when there is one bin per pixel, else pixels
    repeated as PyTorch's bins repeat them (d847498 returned the unrepeated map for both)."""
    x = jax.random.normal(jax.random.key(0), shape)
    pair = (out, out) if isinstance(out, int) else out
    np.testing.assert_allclose(adaptive_avg_pool2d(x, out), _adaptive_reference(x, pair, "avg"),
                               rtol=RTOL, atol=ATOL)


def test_avg_pool_builds_no_map_sized_array_on_the_host():
    """The divisor was a NumPy outer product of the window counts: 18.6 GB for a 100000-pixel
    image during the engine's shape-only size check, which the kernel killed with no record.
    It is a product inside the graph now; the traced function holds only per-axis counts."""
    x = jax.ShapeDtypeStruct((1, 4096, 4096, 1), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: avg_pool2d(x, 2))(x)
    assert max((np.size(c) for c in jaxpr.consts), default=0) <= 2048
    out = jax.eval_shape(lambda x: avg_pool2d(x, 2), jax.ShapeDtypeStruct((1, 100_000, 100_000,
                                                                           1), jnp.float32))
    assert out.shape == (1, 50_000, 50_000, 1)

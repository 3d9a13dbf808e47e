"""LocalResponseNorm checked against tf.nn.local_response_normalization and a float64 formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.test_util import check_grads

from cnnjax.layers.norm import LocalResponseNorm

RTOL, ATOL = 1e-4, 1e-6


def _random(shape, seed=0, scale=3.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _lrn_reference(x, size, k, alpha, beta, divide_alpha_by_size):
    """The formula written channel by channel in float64 (PyTorch's window for even sizes)."""
    x = x.astype(np.float64)
    channels = x.shape[-1]
    scale = alpha / size if divide_alpha_by_size else alpha
    out = np.empty_like(x)
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels - 1, c + (size - 1) // 2)
        squares = np.sum(x[..., lo:hi + 1] ** 2, axis=-1)
        out[..., c] = x[..., c] / (k + scale * squares) ** beta
    return out


def _apply(layer, x):
    return layer.apply({}, jnp.asarray(x))


@pytest.mark.parametrize("size,channels", [(5, 9), (3, 7), (1, 4), (7, 5), (5, 3)])
@pytest.mark.parametrize("divide_alpha_by_size", [False, True])
def test_matches_tensorflow(size, channels, divide_alpha_by_size):
    x = _random((2, 5, 7, channels), seed=size)
    k, alpha, beta = 1.5, 2e-2, 0.75
    layer = LocalResponseNorm(size, k, alpha, beta, divide_alpha_by_size)
    # TF never divides alpha and takes a radius: depth_radius = (size - 1) / 2 for odd sizes.
    tf_alpha = alpha / size if divide_alpha_by_size else alpha
    expected = tf.nn.local_response_normalization(
        x, depth_radius=(size - 1) // 2, bias=k, alpha=tf_alpha, beta=beta).numpy()
    np.testing.assert_allclose(_apply(layer, x), expected, rtol=RTOL, atol=ATOL)


def test_alexnet_defaults_match_tensorflow_with_paper_constants():
    layer = LocalResponseNorm()
    assert (layer.size, layer.k, layer.alpha, layer.beta) == (5, 2.0, 1e-4, 0.75)
    assert layer.effective_alpha == 1e-4
    assert LocalResponseNorm(divide_alpha_by_size=True).effective_alpha == pytest.approx(2e-5)
    x = _random((1, 7, 7, 11), seed=1, scale=30.0)  # Large activations so the norm matters.
    expected = tf.nn.local_response_normalization(x, 2, bias=2.0, alpha=1e-4, beta=0.75).numpy()
    got = _apply(layer, x)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert not np.allclose(got, x / 2.0 ** 0.75, rtol=1e-3)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 9])
@pytest.mark.parametrize("divide_alpha_by_size", [False, True])
def test_matches_float64_formula(size, divide_alpha_by_size):
    x = _random((2, 3, 5, 7), seed=10 + size)
    layer = LocalResponseNorm(size, k=1.0, alpha=0.05, beta=0.6,
                              divide_alpha_by_size=divide_alpha_by_size)
    expected = _lrn_reference(x, size, 1.0, 0.05, 0.6, divide_alpha_by_size)
    np.testing.assert_allclose(_apply(layer, x), expected, rtol=RTOL, atol=ATOL)


def test_a_window_wider_than_the_channels_is_clamped():
    """Channels beyond the map add zeros: the window is clamped to them, same values. A size of
    2**40 made XLA sum windows of that many padded channels (over ten minutes on 6 channels)."""
    x = _random((1, 2, 3, 6), seed=3)
    expected = _lrn_reference(x, 10**6, 1.0, 0.05, 0.6, False)
    np.testing.assert_allclose(_apply(LocalResponseNorm(10**6, 1.0, 0.05, 0.6), x), expected,
                               rtol=RTOL, atol=ATOL)
    jaxpr = jax.make_jaxpr(lambda x: _apply(LocalResponseNorm(2**40), x))(x)
    windows = [e.params["window_dimensions"] for e in jaxpr.jaxpr.eqns
               if e.primitive.name.startswith("reduce_window")]
    assert windows == [(1, 1, 1, 11)]  # 5 channels on either side and the channel itself


@pytest.mark.parametrize("k", [np.float32(1.0), jnp.float32(1.0), np.int64(1)])
def test_numpy_and_jax_scalar_constants_are_accepted(k):
    """A constant read from an array (np.float32, a JAX scalar) was refused as not a number."""
    layer = LocalResponseNorm(2, k=k, alpha=np.float32(1.0), beta=jnp.asarray(1.0),
                              divide_alpha_by_size=np.bool_(False))
    x = np.array([1.0, 2.0, 3.0], np.float32).reshape(1, 1, 1, 3)
    np.testing.assert_allclose(_apply(layer, x).reshape(-1), [0.5, 1 / 3, 3 / 14], rtol=1e-6)


def test_even_size_window_by_hand():
    # size=2 sums channels c-1 and c (PyTorch's convention). k=1, alpha=1, beta=1, channels 1,2,3:
    # b0 = 1 / (1 + 1), b1 = 2 / (1 + 1 + 4), b2 = 3 / (1 + 4 + 9).
    x = np.array([1.0, 2.0, 3.0], np.float32).reshape(1, 1, 1, 3)
    got = _apply(LocalResponseNorm(2, k=1.0, alpha=1.0, beta=1.0), x)
    np.testing.assert_allclose(got.reshape(-1), [0.5, 1 / 3, 3 / 14], rtol=1e-6)


def test_keeps_low_precision_dtype_and_has_no_params():
    x = _random((1, 3, 3, 6), seed=2).astype(jnp.bfloat16)
    layer = LocalResponseNorm()
    assert layer.init(jax.random.key(0), x) == {}
    out = _apply(layer, x)
    assert out.dtype == jnp.bfloat16
    expected = _lrn_reference(np.asarray(x, np.float32), 5, 2.0, 1e-4, 0.75, False)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=1e-2)
    assert _apply(LocalResponseNorm(dtype=jnp.float32), x).dtype == jnp.float32


def _round_to_bfloat16(x):
    """float64 values rounded once to bfloat16's 8 significant bits, to nearest, ties to even
    (`astype(jnp.bfloat16)` goes through float32: twice)."""
    mantissa, exponent = np.frexp(x)
    return np.ldexp(np.round(mantissa * 2.0**8), exponent - 8)


def test_bfloat16_power_is_computed_in_float32():
    """The power and the window sum are evaluated in float32 and rounded once: bfloat16
    outputs are the float64 formula's own values rounded to bfloat16. Computed in bfloat16
    itself, 34% of them were a bfloat16 ulp off and some two (review GC, N3)."""
    x = jnp.asarray(20 * np.random.default_rng(0).normal(size=(4, 8, 8, 16)), jnp.bfloat16)
    out = _apply(LocalResponseNorm(5, k=2.0, alpha=1e-3), x)
    assert out.dtype == jnp.bfloat16
    got = np.asarray(out, np.float64)
    expected = _round_to_bfloat16(_lrn_reference(np.asarray(x, np.float64), 5, 2.0, 1e-3, 0.75,
                                                 False))
    ulp = np.ldexp(1.0, np.frexp(expected)[1] - 8)  # bfloat16's spacing at each expected value
    errors = np.abs(got - expected) / ulp
    assert errors.max() <= 1, errors.max()
    # Rounding float32 instead of float64 values differs only next to a tie (about 2**-16 of
    # values): 1% is ample, while the bfloat16 computation differed in 34%.
    assert np.mean(errors > 0) <= 0.01, np.mean(errors > 0)


def test_gradients():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 2, 3, 6)) * 2)
        layer = LocalResponseNorm(3, k=1.0, alpha=0.3, beta=0.75)
        check_grads(jax.jit(lambda v: layer.apply({}, v)), (x,), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"size": 0}, "LocalResponseNorm: size=0 is invalid; expected a positive integer."),
        ({"size": 2.5}, "LocalResponseNorm: size=2.5 is invalid; expected a positive integer."),
        ({"k": 0.0}, "LocalResponseNorm: k=0.0 is invalid; expected a positive finite number."),
        ({"k": "2"}, "LocalResponseNorm: k='2' is invalid; expected a positive finite number."),
        ({"beta": -0.75}, "LocalResponseNorm: beta=-0.75 is invalid; expected a positive finite"),
        ({"alpha": -1e-4},
         "LocalResponseNorm: alpha=-0.0001 is invalid; expected a finite number >= 0."),
        ({"alpha": float("nan")},
         "LocalResponseNorm: alpha=nan is invalid; expected a finite number >= 0."),
        ({"alpha": None}, "LocalResponseNorm: alpha=None is invalid; expected a finite number"),
        ({"k": float("inf")}, "LocalResponseNorm: k=inf is invalid; expected a positive finite"),
        ({"divide_alpha_by_size": "yes"},
         "LocalResponseNorm: divide_alpha_by_size='yes' is invalid; expected True or False."),
        # An integer dtype silently gave zeros; an unknown name failed only when traced.
        ({"dtype": jnp.int32}, "LocalResponseNorm: dtype='int32' is invalid; "
                               "expected None or a floating-point dtype"),
        ({"dtype": "int8"}, "LocalResponseNorm: dtype='int8' is invalid; expected None or a "
                            "floating-point dtype"),
        ({"dtype": "foo"}, "LocalResponseNorm: dtype='foo' is invalid; expected None or a "
                           "floating-point dtype"),
        ({"dtype": bool}, "LocalResponseNorm: dtype='bool' is invalid; expected None"),
        ({"dtype": jnp.float8_e4m3fn}, "LocalResponseNorm: dtype='float8_e4m3fn' is invalid"),
    ],
)
def test_construction_errors(kwargs, message):
    with pytest.raises(ValueError) as info:
        LocalResponseNorm(**kwargs)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("dtype", [jnp.float16, "bfloat16", np.float64, jnp.dtype("float32")])
def test_floating_dtypes_are_accepted(dtype):
    assert LocalResponseNorm(dtype=dtype).dtype is dtype


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_an_input_without_channels_is_returned_empty(dtype):
    """C=0 made a window of -1 channels: lax's bare TypeError naming no layer; pooling returns
    such inputs empty, and so does LRN."""
    y = _apply(LocalResponseNorm(dtype=dtype), np.ones((1, 2, 2, 0), np.float32))
    assert y.shape == (1, 2, 2, 0) and y.dtype == (dtype or jnp.float32)


def test_call_errors():
    with pytest.raises(ValueError, match=r"^LocalResponseNorm: input.shape=\(3, 3, 5\) is invalid; "
                                         r"expected a rank-4 NHWC array"):
        _apply(LocalResponseNorm(), np.zeros((3, 3, 5), np.float32))
    with pytest.raises(ValueError, match=r"^LocalResponseNorm: input.dtype='int32' is invalid; "
                                         r"expected a floating-point array\."):
        _apply(LocalResponseNorm(), np.zeros((1, 3, 3, 5), np.int32))

"""Shift equivariance of convolutions (exact with circular padding, broken at zero-padded borders)
and shift invariance of max pooling (only within a pooling window)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.analysis.equivariance import equivariance_error, invariance_error, shift_image
from cnnjax.layers.conv import Conv2D

RNG = np.random.default_rng(0)


def _conv_fn(**kwargs):
    layer = Conv2D(features=4, kernel_size=3, **kwargs)
    x = jnp.zeros((1, 16, 16, 3))
    variables = layer.init(jax.random.key(1), x)
    return jax.jit(lambda x: layer.apply(variables, x))


X = RNG.normal(size=(2, 16, 16, 3)).astype(np.float32)


def test_shift_image_reference():
    x = np.arange(16.0).reshape(1, 4, 4, 1)
    rolled = shift_image(x, (1, -1))
    assert rolled[0, 1, 0, 0] == x[0, 0, 1, 0] and rolled[0, 0, 3, 0] == x[0, 3, 0, 0]
    moved = shift_image(x, (1, -1), mode="zeros")
    assert moved[0, 1, 0, 0] == x[0, 0, 1, 0]
    assert np.all(moved[0, 0] == 0) and np.all(moved[0, :, 3] == 0)


def test_circular_conv_is_exactly_equivariant():
    fn = _conv_fn(padding=1, padding_mode="circular")
    for shift in [(3, -2), (0, 5), (-7, 16)]:
        err = equivariance_error(fn, X, shift)
        assert err.max_abs < 1e-5, shift


def test_strided_circular_conv_equivariant_to_multiples_of_its_stride():
    fn = _conv_fn(padding=1, padding_mode="circular", strides=2)
    assert equivariance_error(fn, X, (2, -4)).max_abs < 1e-5  # output shifts by (1, -2)
    with pytest.raises(ValueError, match=r"equivariance_error: shift=\(1, 0\) is invalid; "
                                         r"expected multiples of the output stride \(2, 2\)"):
        equivariance_error(fn, X, (1, 0))


def test_zero_padding_breaks_equivariance_at_the_borders():
    fn = _conv_fn(padding=1, padding_mode="zeros")
    # Circular shift: the wrapped rows meet zero padding in one version only -> large error.
    assert equivariance_error(fn, X, (3, 2)).relative > 0.05
    # Translation: outputs within k//2 = 1 pixel of the border read padding in one version and
    # real pixels in the other; everywhere else the conv is exactly equivariant.
    assert equivariance_error(fn, X, (3, 2), mode="zeros").relative > 0.05
    assert equivariance_error(fn, X, (3, 2), mode="zeros", border=1).max_abs < 1e-5
    # A "VALID" conv never reads padding: equivariant under translation with no border.
    fn_valid = _conv_fn(padding="VALID")
    assert equivariance_error(fn_valid, X, (2, -3), mode="zeros", stride=1).max_abs < 1e-5


def _pool(x):
    return nn.max_pool(jnp.asarray(x), (2, 2), strides=(2, 2))


def _peaks(column):
    """One positive peak per 2x2 window, in the window's given column (0 = left, 1 = right)."""
    x = np.zeros((1, 8, 8, 2), np.float32)
    x[0, ::2, column::2, :] = RNG.uniform(1, 2, size=(4, 4, 2))
    return x


def test_max_pool_invariant_to_shifts_within_its_window():
    # A peak in the left column moves right by one pixel but stays in the same 2x2 window.
    x = _peaks(0)
    assert invariance_error(_pool, x, (0, 1)).max_abs == 0.0
    assert invariance_error(_pool, x, (1, 1), mode="zeros").max_abs == 0.0


def test_max_pool_not_invariant_across_window_boundaries():
    # A peak in the right column moves into the next window: that window's maximum changes.
    x = _peaks(1)
    err = invariance_error(_pool, x, (0, 1))
    # Rolled right, window (i, j) now holds the peak of window (i, j - 1) instead of its own.
    peaks = x[0, ::2, 1::2, :]
    expected = np.abs(np.roll(peaks, 1, axis=1) - peaks).max()
    assert err.max_abs == pytest.approx(expected) and expected > 0.1
    # Translated (zero fill), the left column of windows loses its peak entirely.
    assert invariance_error(_pool, x, (0, 1), mode="zeros").max_abs >= 1.0
    # The pooled map then shifts by half a cell: equivariant only for even shifts.
    assert equivariance_error(_pool, x, (2, 4)).max_abs == 0.0


def test_global_pool_invariant_to_circular_shift():
    fn = lambda x: jnp.mean(x, axis=(1, 2))
    assert invariance_error(fn, X, (5, 3)).max_abs < 1e-6


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: equivariance_error(_pool, np.zeros((4, 4)), (0, 0)),
         r"equivariance_error: x.shape=\(4, 4\) is invalid; expected a batch with spatial axes"),
        (lambda: equivariance_error(_pool, X, 1),
         r"equivariance_error: shift=1 is invalid; expected 2 ints"),
        (lambda: equivariance_error(_pool, X, (1, 2, 3)),
         r"equivariance_error: shift=\(1, 2, 3\) is invalid; expected 2 ints \(one per"),
        (lambda: equivariance_error(_pool, X, (2, 2), mode="reflect"),
         r"equivariance_error: mode='reflect' is invalid; expected one of \['circular', 'zeros'\]"),
        (lambda: equivariance_error(_pool, X, (2, 2), border=-1),
         r"equivariance_error: border=-1 is invalid; expected every entry >= 0"),
        (lambda: equivariance_error(_pool, X, (2, 2), border=4),
         r"equivariance_error: border=4 is invalid; no output positions are left to compare"),
        (lambda: equivariance_error(lambda x: x[:, :14:2, :14:2], X, (14, 0), mode="zeros",
                                    stride=2),
         r"equivariance_error: shift=\(14, 0\) is invalid; expected a shift smaller than the "
         r"input in mode='zeros': it moves the output by \(7, 0\), past every position of an "
         r"axis of size 7"),
        (lambda: equivariance_error(_pool, X, (2, 2), stride=0),
         r"equivariance_error: stride=0 is invalid; expected every entry >= 1"),
        (lambda: equivariance_error(lambda x: x[:, 1:, 1:], X, (1, 1)),
         r"equivariance_error: stride=None is invalid; input size \(16, 16\) is not a multiple "
         r"of output size \(15, 15\)"),
        (lambda: equivariance_error(lambda x: x.sum((1, 2)), X, (1, 1)),
         r"equivariance_error: fn\(x\).shape=\(2, 3\) is invalid; expected a rank-4 output"),
        (lambda: invariance_error(_pool, X, (1,)),
         r"invariance_error: shift=\(1,\) is invalid"),
        (lambda: invariance_error(_pool, X, (1, 1), mode="wrap"),
         r"invariance_error: mode='wrap' is invalid"),
        (lambda: shift_image(X, (1, 1), mode="edge"), r"shift_image: mode='edge' is invalid"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("stride,message", [
    (0, r"stride=0 is invalid; expected every entry >= 1"),
    (3, r"shift=\(2, 2\) is invalid; expected multiples of the output stride \(3, 3\)"),
])
def test_a_given_stride_is_checked_before_fn_runs(stride, message):
    """A bad explicit stride was refused only after fn (a jitted model) had run twice."""
    def fn(x):
        pytest.fail("fn ran")

    with pytest.raises(ValueError, match="^equivariance_error: " + message):
        equivariance_error(fn, X, (2, 2), stride=stride)


@pytest.mark.parametrize("probe", [equivariance_error, invariance_error])
@pytest.mark.parametrize("shift", [(16, 0), (0, -16), (40, 3)])
def test_a_zeros_mode_shift_past_the_image_is_refused_before_fn_runs(probe, shift):
    """A zero-filled translation by >= the image size leaves an all-zero input: invariance_error
    had scored fn(zeros) against fn(x) (relative error 1.0 on a mean pool) and equivariance_error
    refused it only after fn (a jitted model) had run twice. Circular mode wraps any shift."""
    def fn(x):
        pytest.fail("fn ran")

    with pytest.raises(ValueError, match=rf"^{probe.__name__}: shift=\({shift[0]}, {shift[1]}\) "
                                         r"is invalid; expected \|shift\| smaller than the "
                                         r"input's spatial size \(16, 16\) in mode='zeros'"):
        probe(fn, X, shift, mode="zeros")
    # circular wraps: a pointwise map is equivariant and a global mean invariant (to 1e-6)
    pointwise = probe(lambda x: x * x if probe is equivariance_error else x.mean(axis=(1, 2)),
                      X, shift)
    assert pointwise.max_abs < 1e-6


@pytest.mark.parametrize("probe", [equivariance_error, invariance_error, shift_image])
@pytest.mark.parametrize(("x", "message"), [
    (np.zeros((0, 16, 16, 3)), r"x.shape=\(0, 16, 16, 3\) is invalid; expected a non-empty"),
    (np.zeros((2, 16, 0, 3)), r"x.shape=\(2, 16, 0, 3\) is invalid; expected a non-empty"),
    (np.full((1, 4, 4, 1), "a"), r"x.dtype='<U1' is invalid; expected a numeric array"),
])
def test_an_empty_or_non_numeric_input_is_refused(probe, x, message):
    """An empty batch scored a perfect ShiftError(0, 0) (the max deviation of nothing); a string
    array failed inside NumPy's float conversion without naming the probe."""
    kwargs = {} if probe is shift_image else {"fn": lambda a: pytest.fail("fn ran")}
    with pytest.raises(ValueError, match=rf"^{probe.__name__}: " + message):
        probe(x=x, shift=(1, 1), **kwargs)


@pytest.mark.parametrize("probe", [equivariance_error, invariance_error, shift_image])
@pytest.mark.parametrize("shift", [1, (1,), (1, 2, 3), (1.5, 2), np.array(3), "ab"])
def test_a_bad_shift_is_told_the_form_that_is_accepted(probe, shift):
    """A shift of the wrong length was told 'expected an int or 2 ints', but an int is refused
    for shift ('expected 2 ints'): following the message led to another error. Only border and
    stride take one int for every axis."""
    kwargs = {} if probe is shift_image else {"fn": lambda a: pytest.fail("fn ran")}
    with pytest.raises(ValueError, match=rf"^{probe.__name__}: shift=.* is invalid; expected "
                                         r"2 ints \(one per spatial axis\)\.$"):
        probe(x=X, shift=shift, **kwargs)
    # border and stride do take one int for every axis, and say so
    with pytest.raises(ValueError, match=r"border=\(1, 2, 3\) is invalid; expected an int or "
                                         r"2 ints"):
        equivariance_error(lambda a: pytest.fail("fn ran"), X, (2, 2), border=(1, 2, 3))
    assert equivariance_error(lambda a: a, X, (2, 2), border=1, stride=1).max_abs == 0.0


def test_a_bfloat16_batch_runs_in_bfloat16():
    """ml_dtypes' bfloat16 (NumPy kind 'V', the dtype of a bf16 model's activations) was refused
    as 'x.dtype=bfloat16 is invalid; expected a numeric array'. The map runs in the input's
    dtype: a circular 3x3 box filter in bfloat16 is equivariant (the same sums, rolled; error 0),
    its global mean invariant to within bfloat16 rounding of sums of 64 values."""
    x = np.asarray(jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 8, 6, 3)),
                               jnp.bfloat16))
    seen = []

    def box(a):
        seen.append(a.dtype)
        return sum(np.roll(a, (dy, dx), axis=(1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1))

    assert shift_image(x, (1, -2)).dtype == x.dtype
    np.testing.assert_array_equal(shift_image(x, (1, -2)).astype(np.float32),
                                  np.roll(x.astype(np.float32), (1, -2), axis=(1, 2)))
    assert equivariance_error(box, x, (3, 5)) == (0.0, 0.0)
    assert equivariance_error(box, x, (1, 1), mode="zeros", border=1) == (0.0, 0.0)
    assert invariance_error(lambda a: box(a).astype(np.float32).mean(axis=(1, 2)), x,
                            (-9, 13)).relative < 1e-2
    assert set(seen) == {x.dtype}


def test_an_upsampling_map_shifts_its_output_by_the_upsampling_factor():
    """An output larger than the input (a decoder, FCN's upsampling) was refused: 'input size
    is not a multiple of output size; pass the network's output stride explicitly', and no
    stride (an int >= 1) can say 1/2; stride=1, the only fitting one, compared the output
    shifted by s instead of 2s and scored an exactly equivariant nearest upsampler as broken.
    f(T_s x) = T_{s u} f(x) for an upsampling factor u: a nearest x2 (rows) and x3 (columns)
    upsampler is exactly equivariant, circularly and with zero fill."""
    x = RNG.normal(size=(2, 5, 4, 3))

    def up(a):
        return np.repeat(np.repeat(a, 2, axis=1), 3, axis=2)

    for shift in [(1, -1), (3, 2), (-7, 9)]:
        assert equivariance_error(up, x, shift) == (0.0, 0.0)
    assert equivariance_error(up, x, (1, -2), mode="zeros") == (0.0, 0.0)
    # an axis down and one up: rows x2 nearest, columns every other one (stride 2)
    mixed = equivariance_error(lambda a: np.repeat(a, 2, axis=1)[:, :, ::2], x, (3, 2))
    assert mixed == (0.0, 0.0)
    # a position-dependent gain is not equivariant, and is scored so
    ramp = np.arange(10.0)[None, :, None, None]
    assert equivariance_error(lambda a: up(a) * ramp, x, (1, 0)).relative > 0.1
    with pytest.raises(ValueError, match=r"shift=\(1, 1\) is invalid; expected multiples of the "
                                         r"output stride \(1, 2\)"):
        equivariance_error(lambda a: np.repeat(a, 2, axis=1)[:, :, ::2], x, (1, 1))
    with pytest.raises(ValueError, match=r"^equivariance_error: stride=None is invalid; input "
                                         r"size \(5, 4\) is not a multiple of output size "
                                         r"\(7, 4\) nor the output of the input"):
        equivariance_error(lambda a: np.repeat(a, 2, axis=1)[:, :7], x, (1, 1))


def test_a_given_upsampling_factor_probes_a_valid_transposed_conv():
    """A VALID stride-2 transposed conv maps 8 -> 17 rows: the default refused it ("pass the
    network's output stride", which cannot say 1/2) and stride=1 scored it broken (max_abs 2.1).
    With upsampling=2 the output is shifted by 2s; in zeros mode only the 17th row, which the
    kernel's tail adds, differs, so border=1 leaves an exact 0 (review BD)."""
    layer = nn.ConvTranspose(3, (3, 3), strides=(2, 2), padding="VALID")
    x = RNG.normal(size=(1, 8, 8, 2)).astype(np.float32)
    variables = layer.init(jax.random.key(0), x)

    def fn(a):
        return layer.apply(variables, a)

    assert fn(x).shape == (1, 17, 17, 3)
    assert equivariance_error(fn, x, (1, 1), mode="zeros", upsampling=2, border=1) == (0.0, 0.0)
    assert equivariance_error(fn, x, (1, 1), mode="zeros", upsampling=2).max_abs > 0.1
    assert equivariance_error(fn, x, (1, 1), mode="zeros", stride=1, border=1).max_abs > 0.1
    with pytest.raises(ValueError, match=r"pass the network's output `stride` \(downsampling\) "
                                         r"or `upsampling` factor"):
        equivariance_error(fn, x, (1, 1), mode="zeros")
    with pytest.raises(ValueError, match=r"^equivariance_error: upsampling=0 is invalid; "
                                         r"expected every entry >= 1"):
        equivariance_error(lambda a: pytest.fail("fn ran"), x, (1, 1), upsampling=0)


@pytest.mark.parametrize("probe", [equivariance_error, invariance_error])
def test_outputs_of_different_shapes_are_refused_not_broadcast(probe):
    """fn(x) of shape (2, 1, 1, 3) and fn(shifted x) of (2, 1, 1, 1) gave a number (NumPy
    broadcast them) instead of an error."""
    calls = []

    def fn(a):
        calls.append(a)
        return a.sum(axis=(1, 2), keepdims=True)[..., : 3 if len(calls) == 1 else 1]

    with pytest.raises(ValueError, match=r"fn\(shifted x\).shape=\(2, 1, 1, 1\) is invalid; "
                                         r"expected fn\(x\)'s shape \(2, 1, 1, 3\)"):
        probe(fn, X, (1, 1))


@pytest.mark.parametrize("probe", [equivariance_error, invariance_error])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_input_is_refused_before_fn_runs(probe, bad):
    """A NaN pixel scored ShiftError(max_abs=nan, relative=0.0): max|reference| was NaN, so the
    'scale > 0' test failed and the relative error read as a perfect 0."""
    x = X.copy()
    x[1, 5, 7, 2] = bad
    with pytest.raises(ValueError, match=rf"^{probe.__name__}: x\[1, 5, 7, 2\]={bad} is "
                                         r"invalid; expected finite values"):
        probe(lambda a: pytest.fail("fn ran"), x, (2, 2))


@pytest.mark.parametrize("probe", [equivariance_error, invariance_error])
def test_a_non_finite_output_is_refused_not_scored_as_equivariant(probe):
    """A map that returns NaN (a diverged model) was scored relative=0.0, the value of an exactly
    equivariant one; an inf gave NaN - inf differences. Which output failed is named."""
    def breaks_on_shifted(a):  # finite on x, NaN once shifted (the top-left pixel moved)
        return np.where(a[:, :1, :1] == X[:, :1, :1], a[:, :1, :1], np.nan) * np.ones_like(a)

    with pytest.raises(ValueError, match=rf"^{probe.__name__}: fn\(shifted x\)=.*NaN.* is "
                                         r"invalid; expected finite outputs"):
        probe(breaks_on_shifted, X, (2, 2))
    with pytest.raises(ValueError, match=rf"^{probe.__name__}: fn\(x\)=.*inf.* is invalid; "
                                         r"expected finite outputs"):
        probe(lambda a: np.full_like(a, np.inf), X, (2, 2))
    # a finite map is still scored: a pointwise square is exactly equivariant under circular
    # shifts, and the mean of its channels exactly invariant (float32, so to rounding)
    assert probe(lambda a: a * a if probe is equivariance_error else (a * a).mean((1, 2)),
                 X, (2, 2)).relative < 1e-6


@pytest.mark.parametrize("probe", [equivariance_error, invariance_error])
@pytest.mark.parametrize("result, shown", [
    (lambda a: None, "None"),  # a forgotten `return`: was reported as an output "holding NaN"
    (lambda a: (a, a.sum()), "a tuple of 2 items"),  # (logits, features): numpy's own message
    (lambda a: {"logits": a}, "a dict with keys ['logits']"),  # was a TypeError from float()
    (lambda a: "logits", "the str 'logits'"),  # was "could not convert string to float"
])
def test_an_output_that_is_not_one_numeric_array_is_named(probe, result, shown):
    with pytest.raises(ValueError, match=rf"^{probe.__name__}: fn\(x\)={re.escape(repr(shown))} "
                                         r"is invalid; expected fn to return one numeric array"):
        probe(result, X, (2, 2))


@pytest.mark.parametrize("probe", [equivariance_error, invariance_error])
def test_a_complex_output_keeps_its_imaginary_part(probe):
    """The output was cast to float64, dropping the imaginary part (with only a NumPy warning):
    a map whose imaginary part alone is shift-dependent scored 0."""
    def fn(a):  # real part exactly equivariant; imaginary part fixed to the image grid
        grid = np.arange(a.shape[1])[None, :, None, None] * np.ones_like(a)
        y = a + 1j * grid * a
        return y if probe is equivariance_error else y.sum((1, 2, 3))
    err = probe(fn, X, (2, 0))
    assert err.max_abs > 0.1

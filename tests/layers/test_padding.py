"""pad_nhwc checked against tf.pad and np.pad; padding normalization and SAME split by hand."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from jax.test_util import check_grads

from cnnjax.layers.padding import normalize_padding, pad_nhwc, same_padding

PADS = ((2, 1), (0, 3))  # asymmetric, odd
X_SHAPE = (2, 5, 7, 3)  # odd spatial sizes


def _x(seed=0):
    return np.random.default_rng(seed).normal(size=X_SHAPE).astype(np.float32)


@pytest.mark.parametrize("tf_mode,mode", [("CONSTANT", "zeros"), ("REFLECT", "reflect")])
def test_matches_tf_pad(tf_mode, mode):
    x = _x()
    want = tf.pad(x, [[0, 0], list(PADS[0]), list(PADS[1]), [0, 0]], mode=tf_mode).numpy()
    got = np.asarray(pad_nhwc(jnp.asarray(x), PADS, mode))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("np_mode,mode", [("edge", "replicate"), ("wrap", "circular")])
def test_matches_np_pad(np_mode, mode):
    x = _x(1)
    want = np.pad(x, ((0, 0), PADS[0], PADS[1], (0, 0)), mode=np_mode)
    got = np.asarray(pad_nhwc(jnp.asarray(x), PADS, mode))
    np.testing.assert_array_equal(got, want)


def test_circular_padding_wider_than_the_input_wraps_around_again():
    """Documented (PyTorch refuses it): [1 2 3] padded by 5 is the periodic extension."""
    row = jnp.asarray([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
    got = pad_nhwc(row, ((0, 0), (5, 4)), "circular").ravel().tolist()
    assert got == [2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1]


def test_modes_on_a_hand_example():
    """[1 2 3] padded by 2: replicate is edge repetition, not TF's SYMMETRIC mirror."""
    row = jnp.asarray([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
    pads = ((0, 0), (2, 2))

    def flat(mode):
        return pad_nhwc(row, pads, mode).ravel().tolist()

    assert flat("zeros") == [0, 0, 1, 2, 3, 0, 0]
    assert flat("reflect") == [3, 2, 1, 2, 3, 2, 1]
    assert flat("replicate") == [1, 1, 1, 2, 3, 3, 3]
    assert flat("circular") == [2, 3, 1, 2, 3, 1, 2]
    symmetric = tf.pad(np.asarray(row), [[0, 0], [0, 0], [2, 2], [0, 0]], "SYMMETRIC")
    assert symmetric.numpy().ravel().tolist() == [2, 1, 1, 2, 3, 3, 2]  # differs from replicate


def test_padding_forms_normalize_alike():
    x = jnp.asarray(_x(2))
    by_int = pad_nhwc(x, 2, "reflect")
    by_pair = pad_nhwc(x, (2, 2), "reflect")
    by_pairs = pad_nhwc(x, ((2, 2), (2, 2)), "reflect")
    assert by_int.shape == (2, 9, 11, 3)
    np.testing.assert_array_equal(by_int, by_pair)
    np.testing.assert_array_equal(by_int, by_pairs)
    assert normalize_padding("t", (1, 3)) == ((1, 1), (3, 3))
    assert normalize_padding("t", [[0, 1], [2, 3]]) == ((0, 1), (2, 3))
    assert pad_nhwc(x, 0, "circular") is x


def test_numpy_integer_padding_is_accepted_as_python_ints():
    # Kernel sizes and strides took NumPy integers while padding refused them.
    x = jnp.asarray(_x(3))
    for mode in ("zeros", "reflect"):
        expected = pad_nhwc(x, 2, mode)
        for spec in (np.int64(2), (np.int32(2), np.int64(2)),
                     ((np.int64(2), np.int64(2)), (np.uint8(2), 2))):
            np.testing.assert_array_equal(pad_nhwc(x, spec, mode), expected)
    pairs = normalize_padding("t", (np.int64(1), (np.int16(2))))
    assert pairs == ((1, 1), (2, 2))
    assert all(type(v) is int for pair in pairs for v in pair)
    with pytest.raises(ValueError, match=r"t: padding=.* is invalid; expected every padding "
                                         r"entry >= 0"):
        normalize_padding("t", np.int64(-1))
    with pytest.raises(ValueError, match=r"t: padding=.* is invalid; expected a non-negative int"):
        normalize_padding("t", np.bool_(True))


def test_same_padding_split():
    # out = ceil(n/s); total = (out-1)*s + d*(k-1) + 1 - n, odd unit at the high side.
    assert same_padding(7, 3, 1) == (1, 1)
    assert same_padding(7, 3, 2) == (1, 1)  # out 4: 6 + 3 - 7 = 2
    assert same_padding(8, 3, 2) == (0, 1)  # out 4: 6 + 3 - 8 = 1
    assert same_padding(5, 4, 1) == (1, 2)
    assert same_padding(9, 3, 1, dilation=2) == (2, 2)  # effective kernel 5
    assert same_padding(5, 1, 3) == (0, 0)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_gradients(mode):
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 5, 2)))
        check_grads(lambda v: pad_nhwc(v, ((2, 1), (3, 2)), mode), (x,), order=1, modes=("rev",))


def test_unknown_mode():
    with pytest.raises(ValueError, match=r"pad_nhwc: padding_mode='symmetric' is invalid; "
                                         r"expected one of \['zeros', 'reflect'"):
        pad_nhwc(jnp.zeros((1, 4, 4, 1)), 1, "symmetric")


def test_reflect_padding_not_smaller_than_input():
    x = jnp.zeros((1, 3, 8, 1))
    with pytest.raises(ValueError, match=r"pad_nhwc: padding=\(3, 1\) is invalid; reflect padding "
                                         r"must be smaller than the input height 3"):
        pad_nhwc(x, (3, 1), "reflect")
    with pytest.raises(ValueError, match=r"MyLayer: padding=\(\(0, 0\), \(1, 8\)\) is invalid; "
                                         r"reflect padding must be smaller than the input width 8"):
        pad_nhwc(x, ((0, 0), (1, 8)), "reflect", owner="MyLayer")
    assert pad_nhwc(x, ((2, 2), (7, 7)), "reflect").shape == (1, 7, 22, 1)  # size - 1 is fine


@pytest.mark.parametrize("bad", ["2", (1, 2, 3), ((1, 2), 3), (1.5, 1), True, ((1, 2, 3), (0, 0))])
def test_bad_padding_form(bad):
    with pytest.raises(ValueError, match=r"pad_nhwc: padding=.* is invalid; expected a "
                                         r"non-negative int, a pair \(pad_h, pad_w\) or a pair "
                                         r"of pairs"):
        pad_nhwc(jnp.zeros((1, 4, 4, 1)), bad)


def test_negative_padding():
    with pytest.raises(ValueError, match=r"pad_nhwc: padding=\(\(0, -1\), \(0, 0\)\) is invalid; "
                                         r"expected every padding entry >= 0"):
        pad_nhwc(jnp.zeros((1, 4, 4, 1)), ((0, -1), (0, 0)))


def test_input_must_be_nhwc():
    with pytest.raises(ValueError, match=r"pad_nhwc: input.shape=\(4, 4, 1\) is invalid; expected "
                                         r"a rank-4 NHWC array"):
        pad_nhwc(jnp.zeros((4, 4, 1)), 1)


@pytest.mark.parametrize("mode", ["replicate", "circular"])
def test_edge_modes_refuse_padding_an_empty_axis(mode):
    # jnp.pad raised "Cannot apply 'edge' padding to empty axis", naming neither layer nor arg.
    x = jnp.zeros((1, 0, 3, 1))
    with pytest.raises(ValueError, match=rf"MyLayer: padding=\(1, 0\) is invalid; {mode} padding "
                                         r"needs a non-empty input height \(got 0\)"):
        pad_nhwc(x, (1, 0), mode, owner="MyLayer")
    assert pad_nhwc(x, (0, 2), mode).shape == (1, 0, 7, 1)  # the empty axis is not padded
    assert pad_nhwc(x, (1, 0), "zeros").shape == (1, 2, 3, 1)  # zeros need no edge


def test_reflect_leaves_an_unpadded_empty_axis_alone():
    # A zero pad of an empty axis needs no reflection: np.pad and jnp.pad accept it, as
    # pad_nhwc does for replicate/circular; reflect refused it ("padding must be smaller than
    # the input height 0 ... (got (0, 0))").
    x = jnp.zeros((1, 0, 3, 1))
    assert pad_nhwc(x, (0, 1), "reflect").shape == (1, 0, 5, 1)
    assert pad_nhwc(x, 0, "reflect").shape == (1, 0, 3, 1)
    with pytest.raises(ValueError, match=r"MyLayer: padding=\(1, 0\) is invalid; reflect padding "
                                         r"must be smaller than the input height 0"):
        pad_nhwc(x, (1, 0), "reflect", owner="MyLayer")


@pytest.mark.parametrize("mode", ["replicate", "circular", "reflect"])
def test_bfloat16_gradient_sums_the_copies_in_float32(mode):
    """A replicate corner's gradient sums (pad + 1)^2 cotangents: at pad 9, 100 bfloat16 terms
    summed in bfloat16 were 1.3% off. Now each is the float64 sum rounded to bfloat16 once."""
    pad = 9 if mode != "reflect" else 3
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 2)), jnp.bfloat16)
    padded_shape = (1, 4 + 2 * pad, 4 + 2 * pad, 2)
    cotangent = np.random.default_rng(1).uniform(0.5, 1.5, padded_shape).astype(ml_dtypes.bfloat16)
    grad = jax.grad(lambda v: jnp.sum(pad_nhwc(v, pad, mode).astype(jnp.float32)
                                      * jnp.asarray(cotangent, jnp.float32)))(x)
    assert grad.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(pad_nhwc(x, pad, mode)),
                          np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                                 mode={"replicate": "edge", "circular": "wrap",
                                       "reflect": "reflect"}[mode]))
    # float64 reference: the transpose of the same padding, summed exactly
    with jax.enable_x64(True):
        exact = np.asarray(jax.vjp(lambda v: pad_nhwc(v, pad, mode),
                                   jnp.zeros((1, 4, 4, 2), jnp.float64))[1](
                                       jnp.asarray(cotangent, jnp.float64))[0])
    want = exact.astype(ml_dtypes.bfloat16).astype(np.float64)
    ulp = np.spacing(np.abs(exact).astype(ml_dtypes.bfloat16)).astype(np.float64)
    assert np.all(np.abs(np.asarray(grad, np.float64) - want) <= ulp)

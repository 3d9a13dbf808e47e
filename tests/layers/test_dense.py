"""cnnjax.layers.Dense: flax's nn.Dense, with its bias gradient summed in float32 under bfloat16."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cnnjax.layers import Dense
from tests.layers.calls import calls_and_intermediates


def _inputs(rows=512):
    x = jax.random.normal(jax.random.key(0), (rows, 16))
    cotangent = jax.random.normal(jax.random.key(1), (rows, 10))
    return x, cotangent


def test_float32_is_flaxs_dense_bitwise_with_the_same_parameters():
    x, _ = _inputs()
    variables = nn.Dense(10).init(jax.random.key(2), x)
    ours = Dense(10)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(2), x)) == jax.tree.map(
        jnp.shape, variables)
    assert np.array_equal(ours.apply(variables, x), nn.Dense(10).apply(variables, x))


def test_bfloat16_bias_gradient_is_the_exact_sum_rounded_once():
    """The bias gradient sums the output cotangent over the rows. flax's nn.Dense summed 512
    bfloat16 terms in bfloat16 (0.8% off the float64 sum here); the sum is now float32, and the
    only rounding left is to bfloat16 once, as the forward's bias is rounded to it (one ulp)."""
    x, cotangent = _inputs()
    layer = Dense(10, dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(2), x)
    assert layer.apply(variables, x).dtype == jnp.bfloat16

    def loss(params):
        y = layer.apply({"params": params}, x).astype(jnp.float32)
        return jnp.sum(y * cotangent)

    grad = np.asarray(jax.grad(loss)(variables["params"])["bias"], np.float64)
    # float64 reference: the cotangent as the layer receives it (bfloat16), summed exactly
    exact = np.sum(np.asarray(cotangent.astype(jnp.bfloat16), np.float64), axis=0)
    ulp = np.spacing(np.abs(exact).astype(ml_dtypes.bfloat16)).astype(np.float64)
    assert np.all(np.abs(grad - exact) <= ulp), np.max(np.abs(grad - exact) / ulp)


@pytest.mark.parametrize("kwargs, message", [
    ({"features": 0}, "Dense: features=0 is invalid; expected a positive integer."),  # was a
    ({"features": -1}, "Dense: features=-1 is invalid"),  # ZeroDivisionError / TypeError at init
    ({"features": 2.5}, "Dense: features=2.5 is invalid"),
    ({"features": 2, "use_bias": "yes"}, "Dense: use_bias='yes' is invalid"),
    ({"features": 2, "dtype": jnp.int32}, "Dense: dtype="),
    ({"features": 2, "precision": "hihgest"}, "Dense: precision='hihgest' is invalid"),
])
def test_bad_hyperparameters_are_named_at_construction(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        Dense(**kwargs)


def test_inputs_without_features_or_of_other_features_name_the_layer():
    """flax failed with a ZeroDivisionError (no input features, in the initializer), an
    IndexError (a scalar) and a ScopeParamShapeError (other features than the kernel's)."""
    for x in (jnp.ones((2, 0)), jnp.float32(1.0)):
        with pytest.raises(ValueError, match=rf"^Dense: input.shape={re.escape(str(x.shape))} is "
                                             r"invalid; expected \[\.\.\., in_features\] with at "
                                             r"least one feature"):
            Dense(3).init(jax.random.key(0), x)
    variables = Dense(3).init(jax.random.key(0), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"^Dense: input.shape=\(2, 5\) is invalid; its kernel "
                                         r"was created for 4 input channels, this input has 5"):
        Dense(3).apply(variables, jnp.ones((2, 5)))


def test_one_call_is_one_intercepted_call_and_one_intermediate():
    """`Dense` called flax's wrapped `__call__`: `capture_intermediates` recorded two entries per
    call, the first flax's float32 result before the cast to a bfloat16 `dtype`."""
    x, _ = _inputs(8)
    dense = Dense(10, dtype=jnp.bfloat16)
    seen, y, state = calls_and_intermediates(dense, dense.init(jax.random.key(2), x), x)
    assert seen == [("Dense", "__call__")]
    (captured,) = state["intermediates"]["__call__"]
    assert captured.dtype == y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(captured, y)

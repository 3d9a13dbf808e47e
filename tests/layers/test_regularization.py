"""DropPath (stochastic depth, Huang et al. 2016) and the paper's per-block drop rates."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.layers import DropPath, stochastic_depth_rates


def _positive(shape, seed=0):
    """Inputs with no zero entry, so a zero output can only be a dropped example."""
    return np.random.default_rng(seed).uniform(1.0, 2.0, size=shape).astype(np.float32)


def _train(layer, x, seed=0):
    return np.asarray(layer.apply({}, jnp.asarray(x), deterministic=False,
                                  rngs={"dropout": jax.random.key(seed)}))


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.9])
def test_evaluation_is_the_identity(rate):
    x = _positive((4, 3, 3, 2))
    for layer, kwargs in ((DropPath(rate), {"deterministic": True}),
                          (DropPath(rate, deterministic=True), {})):
        y = layer.apply({}, jnp.asarray(x), **kwargs)  # no 'dropout' RNG needed
        np.testing.assert_array_equal(y, x)


def test_rate_zero_is_the_identity_in_training_without_an_rng():
    x = _positive((4, 3, 3, 2))
    np.testing.assert_array_equal(DropPath(0.0).apply({}, jnp.asarray(x), deterministic=False), x)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.75])
def test_training_drops_whole_examples_at_rate_and_scales_kept_ones(rate):
    n = 20_000
    x = _positive((n, 2, 2, 3))
    y = _train(DropPath(rate), x)
    per_example = y.reshape(n, -1)
    dropped = (per_example == 0).all(axis=1)
    # Whole examples: every example is either all zeros or all kept.
    assert ((per_example != 0).all(axis=1) | dropped).all()
    # The dropped fraction is `rate` (binomial std <= 0.0035 at n = 20000; 6 sigma ~ 0.02).
    assert abs(dropped.mean() - rate) < 0.02
    # Kept examples are x / (1 - rate), to the last bit but one: XLA folds the division by a
    # constant into a multiplication by its float32 reciprocal (1 ulp at most).
    np.testing.assert_allclose(y[~dropped], x[~dropped] / np.float32(1 - rate), rtol=2**-22,
                               atol=0)
    # So the expectation is preserved.
    np.testing.assert_allclose(y.mean(), x.mean(), rtol=0.03)


@pytest.mark.parametrize("shape", [(64, 5), (64, 3, 4, 5, 2)])
def test_any_rank_masks_along_the_batch_axis(shape):
    x = _positive(shape)
    y = _train(DropPath(0.5), x).reshape(shape[0], -1)
    dropped = (y == 0).all(axis=1)
    assert 0 < dropped.sum() < shape[0]
    assert ((y != 0).all(axis=1) | dropped).all()


def test_deterministic_given_the_dropout_rng():
    x = _positive((64, 2, 2, 3))
    layer = DropPath(0.5)
    np.testing.assert_array_equal(_train(layer, x, seed=3), _train(layer, x, seed=3))
    assert not np.array_equal(_train(layer, x, seed=3), _train(layer, x, seed=4))
    jitted = jax.jit(lambda v, key: layer.apply({}, v, deterministic=False,
                                                rngs={"dropout": key}))
    np.testing.assert_array_equal(jitted(jnp.asarray(x), jax.random.key(3)),
                                  _train(layer, x, seed=3))


def test_training_needs_the_dropout_stream_and_keeps_the_dtype():
    x = jnp.asarray(_positive((8, 2, 2, 3)), jnp.bfloat16)
    # flax's 'None needs PRNG for "dropout"' named neither the layer nor what to pass
    with pytest.raises(ValueError, match=r"^DropPath: deterministic=False is invalid; rate=0\.5 "
                                         r"draws random masks in training: pass "
                                         r"rngs=\{'dropout': key\} to apply \(or "
                                         r"deterministic=True to evaluate\)\."):
        DropPath(0.5).apply({}, x, deterministic=False)
    with pytest.raises(ValueError, match=r"rngs=\{'drop_path': key\}"):
        DropPath(0.5, rng_collection="drop_path").apply({}, x, deterministic=False,
                                                        rngs={"dropout": jax.random.key(0)})
    y = DropPath(0.5).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert y.dtype == jnp.bfloat16
    custom = DropPath(0.5, rng_collection="drop_path")
    y = custom.apply({}, x, deterministic=False, rngs={"drop_path": jax.random.key(0)})
    assert y.shape == x.shape


def test_deterministic_must_be_given():
    """flax's 'Parameter "deterministic" must be passed ...' named neither the layer nor the
    values."""
    with pytest.raises(ValueError, match=r"^DropPath: deterministic=None is invalid; expected "
                                         r"True \(evaluation: identity\) or False \(training\)"):
        DropPath(0.5).apply({}, jnp.ones((2, 3)))


def test_gradient_flows_through_kept_examples_only():
    x = jnp.asarray(_positive((32, 4)))
    layer = DropPath(0.5)

    def loss(v):
        return layer.apply({}, v, deterministic=False, rngs={"dropout": jax.random.key(0)}).sum()

    grad = np.asarray(jax.grad(loss)(x))
    kept = _train(layer, np.asarray(x)).any(axis=1)
    np.testing.assert_allclose(grad[kept], 2.0)
    np.testing.assert_array_equal(grad[~kept], 0.0)


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, float("nan"), "0.5", True, None])
def test_invalid_rate_is_a_named_error(rate):
    with pytest.raises(ValueError, match=rf"^DropPath: rate={re.escape(repr(rate))} is invalid; "
                                         r"expected 0 <= rate < 1\.$"):
        DropPath(rate)


@pytest.mark.parametrize("value", ["no", 0, 1, np.int8(1)])
def test_deterministic_must_be_a_bool_or_none(value):
    # A non-empty string is truthy, so DropPath(deterministic="no") used to be the identity.
    message = rf"^DropPath: deterministic={re.escape(repr(value))} is invalid; expected True, " \
              r"False or None\."
    with pytest.raises(ValueError, match=message):
        DropPath(0.5, deterministic=value)
    with pytest.raises(ValueError, match=message):
        DropPath(0.5).apply({}, jnp.ones((2, 3)), deterministic=value)
    for flag in (True, False, None, np.bool_(True)):
        DropPath(0.5, deterministic=flag)
    x = jnp.ones((2, 3))
    assert DropPath(0.5).apply({}, x, deterministic=np.bool_(True)) is x


# ----------------------------------------------------------------- stochastic_depth_rates


@pytest.mark.parametrize("total_blocks", [1, 3, 8, 54, 333])
@pytest.mark.parametrize("max_rate", [0.0, 0.1, 0.2, 0.5])
def test_rates_follow_the_papers_linear_decay_rule(total_blocks, max_rate):
    rates = stochastic_depth_rates(total_blocks, max_rate)
    assert len(rates) == total_blocks
    expected = [max_rate * l / total_blocks for l in range(1, total_blocks + 1)]  # noqa: E741
    np.testing.assert_allclose(rates, expected, rtol=1e-15, atol=0)
    assert rates[-1] == max_rate  # exactly: the last block gets drop_path_rate
    assert all(a <= b for a, b in zip(rates, rates[1:], strict=False))
    assert all(isinstance(r, float) for r in rates)


def test_rates_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"^stochastic_depth_rates: total_blocks=0 is invalid"):
        stochastic_depth_rates(0, 0.1)
    with pytest.raises(ValueError, match=r"^stochastic_depth_rates: max_rate=1.0 is invalid; "
                                         r"expected 0 <= max_rate < 1\.$"):
        stochastic_depth_rates(3, 1.0)


def test_a_scalar_input_is_a_named_error():
    """Training drew one value per example along axis 0: a scalar failed as a bare IndexError."""
    with pytest.raises(ValueError, match=r"^DropPath: input.shape=\(\) is invalid; expected an "
                                         r"array with a leading batch axis"):
        DropPath(0.1).apply({}, jnp.float32(1.0), deterministic=False,
                            rngs={"dropout": jax.random.key(0)})


def test_init_in_training_mode_draws_from_the_params_stream_as_flax_does():
    """flax's make_rng falls back to 'params' when the stream is missing (init with one key):
    the missing-stream check must not refuse that."""
    x = jnp.ones((16, 3))
    assert DropPath(0.5).init(jax.random.key(0), x, deterministic=False) == {}
    y = DropPath(0.5).apply({}, x, deterministic=False, rngs={"params": jax.random.key(1)})
    assert 0 < int((y == 0).all(axis=1).sum()) < 16

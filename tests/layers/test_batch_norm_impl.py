"""Tests for cnnjax.layers.batch_norm_impl: BatchNorm's channel sums as matrix-vector products.

References: a float64 NumPy sum (`channel_sum`), flax's own `nn.BatchNorm` (outputs, gradients
by autodiff, running statistics) and, for gradients, float64 autodiff of the textbook formula.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnjax.layers.batch_norm import MaskedBatchNorm
from cnnjax.layers.batch_norm_impl import (
    batch_norm_impl,
    batch_norm_train,
    channel_sum,
    resolve_batch_norm_impl,
)
from cnnjax.models.resnet import BasicBlock, ResNet


def assert_close(actual, expected, rtol, scale=None):
    """Elementwise rtol, plus an absolute floor of rtol * `scale` (default max|expected|)."""
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected))) if scale is None else scale
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * scale)


def assert_trees_close(actual, expected, rtol):
    """Leaf by leaf, with an absolute floor scaled by the tree's largest value: a convolution's
    bias before a BatchNorm has a zero gradient, which float32 rounds to ~1e-5 noise."""
    scale = max(float(np.max(np.abs(np.asarray(leaf)))) for leaf in jax.tree.leaves(expected))
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert_close(got, want, rtol, scale)


@pytest.mark.parametrize("shape", [(128, 32, 32, 8), (7, 5, 3, 4), (1, 1, 1, 3), (131, 6),
                                   (2, 3, 5, 7, 2)])
def test_channel_sum_matches_float64(shape):
    # Same-sign data is the hard case for a float32 sum; 131 rows is prime (zero-padded blocks).
    x = np.abs(np.random.default_rng(0).standard_normal(shape)).astype(np.float32) + 0.5
    expected = x.astype(np.float64).reshape(-1, shape[-1]).sum(0)
    actual = np.asarray(jax.jit(channel_sum)(jnp.asarray(x)))
    np.testing.assert_allclose(actual, expected, rtol=2e-6)


def test_channel_sum_is_more_accurate_than_one_long_sum():
    x = np.abs(np.random.default_rng(1).standard_normal((256, 32, 32, 4))).astype(np.float32)
    expected = x.astype(np.float64).sum((0, 1, 2))
    two_level = np.abs(np.asarray(jax.jit(channel_sum)(jnp.asarray(x))) - expected).max()
    sequential = np.abs(np.cumsum(x.reshape(-1, 4), 0, dtype=np.float32)[-1] - expected).max()
    assert two_level < sequential / 10


def _textbook(x, scale, bias, eps):
    mean = x.mean((0, 1, 2))
    var = x.var((0, 1, 2))
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("fast_variance", [True, False])
def test_batch_norm_train_gradients_match_float64_autodiff(fast_variance):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 6, 6, 5)) * 3 + 1
    scale, bias = rng.random(5) + 0.5, rng.standard_normal(5)
    cotangent = rng.standard_normal(x.shape)
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
    y, vjp = jax.vjp(lambda *a: batch_norm_train(*a, 1e-5, None, None, fast_variance)[0], *f32)
    grads = vjp(jnp.asarray(cotangent, jnp.float32))
    with jax.enable_x64():
        f64 = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias)]
        y64, vjp64 = jax.vjp(lambda *a: _textbook(*a, 1e-5), *f64)
        grads64 = vjp64(jnp.asarray(cotangent))
        y64, grads64 = np.asarray(y64), [np.asarray(g) for g in grads64]
    assert_close(y, y64, 1e-5)
    for got, want in zip(grads, grads64, strict=True):
        assert_close(got, want, 1e-4)


class _Net(nn.Module):
    """Conv -> BatchNorm (-> ReLU), with the BatchNorm options under test."""

    bn_kwargs: dict

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(6, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8, **self.bn_kwargs)(x)
        return nn.relu(x)


def _train_apply(model, variables, x, impl):
    def loss(params):
        with batch_norm_impl(impl):
            y, updates = model.apply({**variables, "params": params}, x, train=True,
                                     mutable=["batch_stats"])
        return jnp.sum(y * jnp.cos(y)), (y, updates)
    (value, (y, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"])
    return value, y, updates, grads


@pytest.mark.parametrize("bn_kwargs", [
    {}, {"use_fast_variance": False}, {"use_scale": False}, {"use_bias": False},
    {"epsilon": 1e-3, "axis": 3},
])
def test_matmul_batch_norm_matches_flax(bn_kwargs):
    model = _Net(bn_kwargs)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 10, 10, 3)) * 2 + 1, jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    reference = _train_apply(model, variables, x, "flax")
    matmul = _train_apply(model, variables, x, "matmul")
    for got, want in zip(matmul, reference, strict=True):  # loss, outputs, statistics, grads
        assert_trees_close(got, want, 1e-4)
    # The running statistics really moved (momentum 0.8 from zeros and ones).
    assert float(jnp.abs(matmul[2]["batch_stats"]["BatchNorm_0"]["mean"]).max()) > 0.05


def test_interceptor_changes_the_lowering_only_in_training_mode():
    model = _Net({})
    x = jnp.ones((2, 4, 4, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)

    def primitives(train):
        def f(v):
            with batch_norm_impl("matmul"):
                return model.apply(v, x, train=train, mutable=["batch_stats"] if train else False)
        return str(jax.make_jaxpr(f)(variables))

    assert "custom_vjp_call" in primitives(True)
    assert "custom_vjp_call" not in primitives(False)


def test_other_dtypes_and_masks_keep_flax():
    x = jnp.ones((2, 4, 4, 3), jnp.bfloat16)
    model = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
    variables = model.init(jax.random.PRNGKey(0), x)

    def traced(mask=None):
        def f(v):
            with batch_norm_impl("matmul"):
                return model.apply(v, x, mask=mask, mutable=["batch_stats"])
        return str(jax.make_jaxpr(f)(variables))

    assert "custom_vjp_call" not in traced()
    float_model = nn.BatchNorm(use_running_average=False)
    with batch_norm_impl("matmul"):
        y, _ = float_model.apply(float_model.init(jax.random.PRNGKey(0), x.astype(jnp.float32)),
                                 x.astype(jnp.float32), mask=jnp.ones(x.shape, bool),
                                 mutable=["batch_stats"])
    assert y.shape == x.shape


def test_masked_batch_norm_takes_the_matmul_path_only_without_a_mask():
    """VGGFeatures' BatchNorms are MaskedBatchNorm (R-CNN's warps): unmasked training calls
    must still run the CPU's matmul lowering, masked ones MaskedBatchNorm's own statistics."""
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3, 3, 2)), jnp.float32)
    model = MaskedBatchNorm(use_running_average=False)
    variables = model.init(jax.random.PRNGKey(0), x)
    mask = jnp.asarray([True, False, True, True])[:, None, None, None]

    def traced(mask):
        def f(v):
            with batch_norm_impl("matmul"):
                return model.apply(v, x, mask=mask, mutable=["batch_stats"])
        return str(jax.make_jaxpr(f)(variables)), f(variables)

    unmasked, (y, _) = traced(None)
    assert "custom_vjp_call" in unmasked
    masked, (y_masked, stats) = traced(mask)
    assert "custom_vjp_call" not in masked
    rows = np.asarray(x, np.float64)[[0, 2, 3]]
    np.testing.assert_allclose(stats["batch_stats"]["mean"], 0.01 * rows.mean((0, 1, 2)),
                               rtol=1e-5)  # momentum 0.99 from zeros
    assert not np.allclose(y, y_masked)


def test_resnet_training_step_matches_flax():
    model = ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, num_classes=4, num_filters=8,
                   stem="cifar")
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 16, 16, 3)), jnp.float32)
    # one jitted init (eager, each of its ops compiled on its own)
    variables = jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.PRNGKey(0), x)

    def step(impl):
        def loss(params):
            with batch_norm_impl(impl):
                logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                              mutable=["batch_stats"])
            return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), updates
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (loss, updates), grads = step("matmul")
    (loss_ref, updates_ref), grads_ref = step("flax")
    assert_close(loss, loss_ref, 1e-5)
    assert_trees_close(updates, updates_ref, 1e-5)
    assert_trees_close(grads, grads_ref, 1e-4)


def test_auto_means_matmul_on_cpu_only():
    assert resolve_batch_norm_impl("auto", "cpu") == "matmul"
    assert resolve_batch_norm_impl("auto", "gpu") == "flax"
    assert resolve_batch_norm_impl("auto", "tpu") == "flax"
    assert resolve_batch_norm_impl("matmul", "tpu") == "matmul"
    with pytest.raises(ValueError, match=r"batch_norm_impl: impl='fast' is invalid; expected one "
                                         r"of \['flax', 'matmul', 'auto'\]"):
        resolve_batch_norm_impl("fast", "cpu")


def test_auto_context_keeps_flax_off_cpu(monkeypatch):
    model = _Net({})
    x = jnp.ones((2, 4, 4, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)

    def traced(impl):
        def f(v):
            with batch_norm_impl(impl):
                return model.apply(v, x, train=True, mutable=["batch_stats"])
        return str(jax.make_jaxpr(f)(variables))

    assert "custom_vjp_call" in traced("auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "custom_vjp_call" not in traced("auto")
    assert "custom_vjp_call" in traced("matmul")


def test_two_pass_variance_is_accurate_at_a_large_offset():
    """fast_variance=False is E[(x - E[x])^2]: at an offset of 1000 it stays within 1e-3 of
    float64, where E[x^2] - E[x]^2 in float32 is off by ~0.1."""
    x = 1000.0 + np.random.default_rng(6).standard_normal((8, 4, 4, 3))
    y, mean, var = batch_norm_train(jnp.asarray(x, jnp.float32), jnp.ones(3), jnp.zeros(3), 1e-5,
                                    None, None, False)
    np.testing.assert_allclose(y, (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5),
                               atol=1e-3)
    np.testing.assert_allclose(var, x.var((0, 1, 2)), rtol=1e-3)


def test_constant_channel_gives_a_finite_output_and_zero_variance():
    """E[x^2] - E[x]^2 of a constant 999.9 rounds below zero in float32; clipped at 0 (its
    float64 value), so rsqrt(var + eps) stays finite."""
    x = jnp.full((8, 4, 4, 2), 999.9, jnp.float32)
    y, mean, var = batch_norm_train(x, jnp.asarray([1.5, 0.5]), jnp.asarray([0.25, -1.0]), 1e-5)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_allclose(mean, 999.9, rtol=1e-6)


def _flax_and_matmul(model, x, variables=None):
    """`model`'s training-mode outputs and updates under "flax" and "matmul", and the matmul
    trace's text."""
    variables = model.init(jax.random.PRNGKey(0), x) if variables is None else variables

    def run(impl):
        with batch_norm_impl(impl):
            f = lambda v: model.apply(v, x, mutable=["batch_stats"])
            return f(variables), str(jax.make_jaxpr(f)(variables))

    return run("flax")[0], *run("matmul")


def test_other_feature_axes_keep_flax():
    """axis=1 normalises over (0, 2, 3): flax's code, not the last-axis matmul path."""
    x = np.random.default_rng(7).standard_normal((8, 3, 4, 3)) * np.arange(1, 4)[:, None, None]
    model = nn.BatchNorm(use_running_average=False, axis=1)
    (y_ref, _), (y, stats), jaxpr = _flax_and_matmul(model, jnp.asarray(x, jnp.float32))
    assert "custom_vjp_call" not in jaxpr
    expected = (x - x.mean((0, 2, 3), keepdims=True)) / np.sqrt(
        x.var((0, 2, 3), keepdims=True) + 1e-5)
    assert_close(y, expected, 1e-5)
    assert_close(y, y_ref, 1e-5)
    assert stats["batch_stats"]["mean"].shape == (3,)


def test_bfloat16_computation_dtype_keeps_flax():
    """dtype=bfloat16 on float32 input: flax's bfloat16 output, not the float32 matmul path."""
    x = jnp.asarray(np.random.default_rng(8).standard_normal((8, 4, 4, 3)), jnp.float32)
    model = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
    (y_ref, _), (y, _), jaxpr = _flax_and_matmul(model, x)
    assert "custom_vjp_call" not in jaxpr
    assert y.dtype == y_ref.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, y_ref)


def test_init_inside_the_block_equals_flax_init():
    """Initialization keeps flax's code: running statistics start at mean 0, var 1 (no update)."""
    x = jnp.asarray(np.random.default_rng(9).standard_normal((8, 4, 4, 3)) + 5, jnp.float32)
    model = nn.BatchNorm(use_running_average=False)
    with batch_norm_impl("matmul"):
        inside = model.init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(inside["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(inside["batch_stats"]["var"], np.ones(3))
    jax.tree.map(np.testing.assert_array_equal, inside, model.init(jax.random.PRNGKey(0), x))


def test_missing_running_statistics_are_created_as_flax_creates_them():
    """Applied without batch_stats, the running var starts at ones: 0.99 + 0.01 * var(x)."""
    x = np.random.default_rng(10).standard_normal((8, 4, 4, 3))
    model = nn.BatchNorm(use_running_average=False)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))["params"]
    (_, ref), (_, stats), _ = _flax_and_matmul(model, jnp.asarray(x, jnp.float32),
                                               {"params": params})
    np.testing.assert_allclose(stats["batch_stats"]["var"], 0.99 + 0.01 * x.var((0, 1, 2)),
                               rtol=1e-6)
    np.testing.assert_allclose(stats["batch_stats"]["mean"], 0.01 * x.mean((0, 1, 2)),
                               rtol=1e-5, atol=1e-8)
    assert_trees_close(stats, ref, 1e-6)


def test_subclasses_of_batch_norm_keep_flax():
    """Only nn.BatchNorm, BatchNorm and MaskedBatchNorm themselves: a subclass may differ."""

    class Sub(nn.BatchNorm):
        pass

    x = jnp.asarray(np.random.default_rng(11).standard_normal((2, 4, 4, 3)), jnp.float32)
    (y_ref, _), (y, _), jaxpr = _flax_and_matmul(Sub(use_running_average=False), x)
    assert "custom_vjp_call" not in jaxpr
    np.testing.assert_array_equal(y, y_ref)


def test_channel_sums_use_highest_precision():
    """Every channel sum is a HIGHEST-precision product: float32-exact on accelerators too."""
    jaxpr = jax.make_jaxpr(lambda x: batch_norm_train(x, jnp.ones(3), jnp.zeros(3), 1e-5)[0])(
        jnp.ones((2, 4, 4, 3)))
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    if not dots:  # the forward sits inside the custom_vjp call
        (call,) = [e for e in jaxpr.jaxpr.eqns if "custom_vjp" in e.primitive.name]
        inner = call.params["call_jaxpr"]
        dots = [e for e in getattr(inner, "jaxpr", inner).eqns
                if e.primitive.name == "dot_general"]
    assert len(dots) == 4  # two channel sums (mean, mean square) of two products each
    for dot in dots:
        assert dot.params["precision"] == (lax.Precision.HIGHEST, lax.Precision.HIGHEST)

"""Tests for cnnjax.layers.conv_impl: patches + matmul convolution and the nn.Conv interceptor.

References: `lax.conv_general_dilated` (XLA's direct convolution, forward and autodiff grads)
and, for the forward, a float64 NumPy loop over kernel taps.
"""

from __future__ import annotations

from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnjax.layers.conv import Conv2D
from cnnjax.layers.conv_impl import (
    AUTO_MAX_OUTPUT_POSITIONS,
    conv_general_dilated,
    conv_general_dilated_matmul,
    conv_impl,
    cpu_lowerings_apply,
    input_gradient_sliced,
    stored_input,
    xla_convolutions,
)
from cnnjax.models.resnet import BasicBlock, ResNet

NHWC = ("NHWC", "HWIO", "NHWC")


def assert_close(actual, expected, rtol=1e-5):
    """Elementwise rtol, plus an absolute floor of rtol * max|expected| (float32 sums)."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol,
                               atol=rtol * float(np.max(np.abs(expected))))


def random_pair(rng, n, h, w, c, kh, kw, f):
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kh, kw, c, f)) / np.sqrt(kh * kw * c), jnp.float32)
    return x, k


def _sub_jaxprs(params):
    """Jaxprs nested in an equation's params (pjit, custom_jvp, cond branches ...)."""
    for value in params.values():
        for item in value if isinstance(value, list | tuple) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def primitives(fun, *args) -> Counter[str]:
    """How often each primitive occurs in `fun`'s jaxpr, nested jaxprs included."""
    names: Counter[str] = Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names[eqn.primitive.name] += 1
            for sub in _sub_jaxprs(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fun)(*args).jaxpr)
    return names


# (input hw, kernel hw, strides, padding, dilation): ResNet-18@32 shapes and edge cases.
CASES = [
    ((1, 1), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # stage4 3x3 on a 1x1 map
    ((2, 2), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # strided 3x3 into a 1x1 map: 4 taps
    ((1, 3), (5, 1), (2, 1), ((2, 4), (0, 0)), (1, 1)),  # taps 0 and 2 read input: not a range
    ((4, 4), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # strided 3x3 into a 2x2 map
    ((4, 4), (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1)),  # 1x1 projection shortcut
    ((9, 9), (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),  # ImageNet stem, odd size
    ((7, 6), (3, 3), (1, 1), "SAME", (2, 2)),  # dilated, "SAME" resolved like lax
    ((6, 7), (3, 1), (2, 1), ((0, 1), (2, 0)), (1, 1)),  # non-square kernel, asymmetric pads
    ((5, 5), (2, 2), (1, 2), "VALID", (1, 2)),
]


@pytest.mark.parametrize("hw,kernel,strides,padding,dilation", CASES)
def test_forward_and_grads_match_lax(hw, kernel, strides, padding, dilation):
    x, k = random_pair(np.random.default_rng(0), 3, *hw, 5, *kernel, 4)

    def run(conv):
        def loss(x, k):
            y = conv(x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC)
            return jnp.sum(jnp.sin(y)), y  # a non-linear loss so cotangents vary

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, k)
        return y, grads

    y, (gx, gk) = run(conv_general_dilated_matmul)
    y_ref, (gx_ref, gk_ref) = run(lax.conv_general_dilated)
    assert y.shape == y_ref.shape
    assert_close(y, y_ref)
    assert_close(gx, gx_ref)
    assert_close(gk, gk_ref)
    assert "conv_general_dilated" not in primitives(
        lambda x, k: conv_general_dilated_matmul(x, k, strides, padding, rhs_dilation=dilation,
                                                 dimension_numbers=NHWC), x, k)


def numpy_conv(x, k, strides, pads, dilation):
    """Float64 NHWC/HWIO convolution as a loop over kernel taps (explicit pads)."""
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
    kp = np.asarray(k, np.float64)
    (sh, sw), (dh, dw) = strides, dilation
    kh, kw = kp.shape[:2]
    h = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    w = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((xp.shape[0], h, w, kp.shape[3]))
    for i in range(kh):
        for j in range(kw):
            window = xp[:, i * dh:i * dh + sh * (h - 1) + 1:sh, j * dw:j * dw + sw * (w - 1) + 1:sw]
            out += np.einsum("nhwc,cf->nhwf", window, kp[i, j])
    return out


def test_forward_matches_float64_numpy_loop():
    x, k = random_pair(np.random.default_rng(1), 2, 5, 6, 3, 3, 3, 4)
    y = conv_general_dilated_matmul(x, k, (2, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    expected = numpy_conv(x, k, (2, 1), ((1, 1), (1, 1)), (1, 1))
    assert expected.shape == (2, 3, 6, 4)
    assert_close(y, expected)


@pytest.mark.parametrize("hw,strides,taps", [((1, 1), (1, 1), 1), ((2, 2), (2, 2), 4),
                                             ((2, 2), (1, 1), 9)])
def test_taps_over_padding_alone_are_skipped(hw, strides, taps):
    """A 3x3 conv with padding 1 on a 1x1 map reads input with its centre tap only: the matmul
    contracts over C, not 9C (stage 4 of ResNet-18 at 32x32). Its other kernel taps get an exact
    zero gradient, and a NaN in one of them stays out of the output, as in XLA's convolution."""
    x, k = random_pair(np.random.default_rng(2), 2, *hw, 5, 3, 3, 4)
    pads = ((1, 1), (1, 1))
    jaxpr = jax.make_jaxpr(lambda x, k: conv_general_dilated_matmul(
        x, k, strides, pads, dimension_numbers=NHWC))(x, k)
    (dot,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dot.invars[0].aval.shape[-1] == taps * 5
    if taps == 1:
        gk = jax.grad(lambda k: jnp.sum(conv_general_dilated_matmul(
            x, k, strides, pads, dimension_numbers=NHWC) ** 2))(k)
        assert np.all(np.asarray(gk)[[0, 0, 2, 2], [0, 2, 0, 2]] == 0)
        k = k.at[0, 0].set(jnp.nan)
        y = conv_general_dilated_matmul(x, k, strides, pads, dimension_numbers=NHWC)
        y_ref = lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=NHWC)
        assert not np.any(np.isnan(y)) and not np.any(np.isnan(y_ref))
        assert_close(y, y_ref)


def test_non_contiguous_taps_reading_input_are_gathered():
    """A 5x1 kernel at stride 2 over a 1-row map padded (2, 4) reads input with taps 0 and 2
    only: the matmul contracts over those two (2C), so a non-finite kernel value in the
    padding-only taps 1, 3 and 4 stays out of the output (as in XLA's convolution) and those taps
    get an exact zero gradient."""
    x, k = random_pair(np.random.default_rng(3), 2, 1, 3, 5, 5, 1, 4)
    strides, pads = (2, 1), ((2, 4), (0, 0))
    jaxpr = jax.make_jaxpr(lambda x, k: conv_general_dilated_matmul(
        x, k, strides, pads, dimension_numbers=NHWC))(x, k)
    (dot,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dot.invars[0].aval.shape[-1] == 2 * 5
    gk = jax.grad(lambda k: jnp.sum(jnp.sin(conv_general_dilated_matmul(
        x, k, strides, pads, dimension_numbers=NHWC))))(k)
    assert np.all(np.asarray(gk)[[1, 3, 4]] == 0) and np.all(np.asarray(gk)[[0, 2]] != 0)
    poisoned = k.at[jnp.array([1, 3, 4])].set(jnp.inf)
    y = conv_general_dilated_matmul(x, poisoned, strides, pads, dimension_numbers=NHWC)
    y_ref = lax.conv_general_dilated(x, poisoned, strides, pads, dimension_numbers=NHWC)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(y_ref))
    assert_close(y, numpy_conv(x, k, strides, pads, (1, 1)))


def test_windows_over_padding_only_give_zeros():
    """Stride 2 over a 1x1 map padded by 1 on each side puts every 1x1 window in the padding:
    the output is all zeros (float64 loop and lax agree), with zero gradients."""
    x, k = random_pair(np.random.default_rng(4), 2, 1, 1, 3, 1, 1, 4)
    strides, pads = (2, 2), ((1, 1), (1, 1))
    y = conv_general_dilated_matmul(x, k, strides, pads, dimension_numbers=NHWC)
    expected = numpy_conv(x, k, strides, pads, (1, 1))
    assert y.shape == expected.shape == (2, 2, 2, 4) and y.dtype == jnp.float32
    assert np.all(np.asarray(y) == 0) and np.all(expected == 0)
    assert_close(y, lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=NHWC))
    gx, gk = jax.grad(lambda x, k: jnp.sum(conv_general_dilated_matmul(
        x, k, strides, pads, dimension_numbers=NHWC)), argnums=(0, 1))(x, k)
    assert np.all(np.asarray(gx) == 0) and np.all(np.asarray(gk) == 0)


def test_unsupported_cases_are_delegated_to_lax():
    """Grouped and transposed (input-dilated) convolutions go to lax unchanged."""
    x, k = random_pair(np.random.default_rng(2), 2, 5, 5, 4, 3, 3, 6)
    grouped = conv_general_dilated_matmul(x, k[:, :, :2], (1, 1), "SAME", dimension_numbers=NHWC,
                                          feature_group_count=2)
    ref = lax.conv_general_dilated(x, k[:, :, :2], (1, 1), "SAME", dimension_numbers=NHWC,
                                   feature_group_count=2)
    np.testing.assert_array_equal(grouped, ref)
    pads = ((1, 1), (2, 0))
    dilated = conv_general_dilated_matmul(x, k, (1, 1), pads, lhs_dilation=(2, 2),
                                          dimension_numbers=NHWC)
    ref = lax.conv_general_dilated(x, k, (1, 1), pads, lhs_dilation=(2, 2),
                                   dimension_numbers=NHWC)
    np.testing.assert_array_equal(dilated, ref)
    xb, kb = random_pair(np.random.default_rng(3), 4, 5, 5, 3, 3, 3, 4)
    batch_grouped = conv_general_dilated_matmul(xb, kb, (1, 1), "SAME", dimension_numbers=NHWC,
                                                batch_group_count=2)
    ref = lax.conv_general_dilated(xb, kb, (1, 1), "SAME", dimension_numbers=NHWC,
                                   batch_group_count=2)
    assert batch_grouped.shape == ref.shape == (2, 5, 5, 4)
    np.testing.assert_array_equal(batch_grouped, ref)


@pytest.mark.parametrize(
    ("hw", "kernel", "strides", "padding", "dilation"),
    [
        ((2, 2), (3, 3), (1, 1), "VALID", (1, 1)),  # window larger than the input: 0x0
        ((4, 5), (3, 3), (2, 2), ((-1, 0), (0, 0)), (2, 1)),  # cropped then dilated: 0 rows
        ((3, 3), (2, 2), (1, 1), ((0, 0), (0, 0)), (1, 3)),  # dilated window too wide: 0 cols
    ],
)
def test_empty_outputs_are_empty_arrays_as_in_lax(hw, kernel, strides, padding, dilation):
    """Where lax returns an empty array, so does the drop-in (same shape and dtype), also jitted."""
    x, k = random_pair(np.random.default_rng(5), 2, *hw, 3, *kernel, 4)
    kwargs = dict(rhs_dilation=dilation, dimension_numbers=NHWC)
    ref = lax.conv_general_dilated(x, k, strides, padding, **kwargs)
    assert 0 in ref.shape
    got = conv_general_dilated_matmul(x, k, strides, padding, **kwargs)
    assert (got.shape, got.dtype) == (ref.shape, ref.dtype)
    jitted = jax.jit(lambda x, k: conv_general_dilated_matmul(x, k, strides, padding, **kwargs))
    assert jitted(x, k).shape == ref.shape


def test_xla_convolutions_suspends_an_enclosing_conv_impl():
    layer = nn.Conv(2, (3, 3))
    x = jnp.ones((1, 2, 2, 1))
    variables = layer.init(jax.random.key(0), x)
    convs = lambda: primitives(lambda v: layer.apply(v, x), variables)["conv_general_dilated"]
    with conv_impl("matmul"):
        assert convs() == 0
        with xla_convolutions():
            assert convs() == 1
        assert convs() == 0


def test_max_output_positions_picks_matmul_only_for_small_outputs():
    x, k = random_pair(np.random.default_rng(3), 2, 4, 4, 3, 3, 3, 2)

    def conv(x, k, strides):
        return conv_general_dilated_matmul(x, k, strides, "SAME", dimension_numbers=NHWC,
                                           max_output_positions=AUTO_MAX_OUTPUT_POSITIONS)

    # 4x4 output (16 positions) > 4: lax; 2x2 output (4 positions): matmul.
    assert "conv_general_dilated" in primitives(lambda x, k: conv(x, k, (1, 1)), x, k)
    assert "conv_general_dilated" not in primitives(lambda x, k: conv(x, k, (2, 2)), x, k)


class TwoConvs(nn.Module):
    """A cnnjax Conv2D, a plain nn.Conv, and a ConvTranspose (not an nn.Conv: untouched)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(Conv2D(6, 3, strides=2, padding=1, name="a")(x))
        x = nn.Conv(5, (1, 1), name="b")(x)
        return nn.ConvTranspose(2, (2, 2), name="t")(x)


@pytest.mark.parametrize("impl", ["matmul", "auto"])
def test_context_manager_keeps_params_and_matches_lax(impl):
    model = TwoConvs()
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 4, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    with conv_impl(impl):
        inside = model.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, inside, variables)  # same tree, same values

    def loss(params):
        return jnp.sum(jnp.sin(model.apply({"params": params}, x)))

    ref_value, ref_grads = jax.value_and_grad(loss)(variables["params"])
    with conv_impl(impl):
        value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
        prims = primitives(loss, variables["params"])
    assert_close(value, ref_value)
    jax.tree.map(assert_close, grads, ref_grads)
    # Only the transposed conv (lhs-dilated in lax) is left as a convolution.
    assert prims["conv_general_dilated"] == 1
    # Leaving the block restores XLA convolutions (a new function: JAX caches traces per
    # function, so `loss` itself would replay the trace made inside the block).
    assert primitives(lambda p: loss(p), variables["params"])["conv_general_dilated"] == 3


def test_context_manager_on_resnet_grads():
    """An ImageNet-layout ResNet (one basic block per stage) at 32x32, stages down to 1x1.

    Eval-mode BatchNorm (an affine map): train-mode BN over 2 images at 1x1 maps divides by
    near-zero variances and magnifies float32 rounding by orders of magnitude in either
    implementation, which would test conditioning rather than the convolution.
    """
    model = ResNet(stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, num_classes=3)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 32, 32, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)  # one compile, not one per op

    def loss(params):
        logits = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
        return jnp.sum(logits * jnp.arange(3.0))

    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    with conv_impl("matmul"):
        value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    # 12 convolutions deep: each gradient tensor to 1e-4 of its own scale (single
    # convolutions above are checked at 1e-5).
    assert_close(value, ref_value, rtol=1e-4)
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-4), grads, ref_grads)


def test_custom_conv_function_is_left_alone():
    calls = []

    def custom(*args, **kwargs):
        calls.append(1)
        return lax.conv_general_dilated(*args, **kwargs)

    layer = nn.Conv(2, (3, 3), conv_general_dilated=custom)
    x = jnp.ones((1, 3, 3, 1))
    with conv_impl("matmul"):
        variables = layer.init(jax.random.key(0), x)
        layer.apply(variables, x)
    assert len(calls) == 2


def test_xla_impl_changes_nothing():
    layer = nn.Conv(2, (3, 3))
    x = jnp.ones((1, 2, 2, 1))
    variables = layer.init(jax.random.key(0), x)
    with conv_impl("xla"):
        assert "conv_general_dilated" in primitives(lambda v: layer.apply(v, x), variables)


def test_invalid_impl_raises_documented_error():
    with pytest.raises(
        ValueError,
        match=r"conv_impl: impl='fast' is invalid; expected one of \['xla', 'matmul', 'auto'\]\.",
    ), conv_impl("fast"):
        pass


def test_auto_keeps_xla_convolutions_off_cpu(monkeypatch):
    """"auto" means the backend's best: patches + matmul on CPU only, as the engine resolves it."""
    layer = nn.Conv(2, (3, 3))
    x = jnp.ones((1, 2, 2, 1))
    variables = layer.init(jax.random.key(0), x)
    convs = lambda: primitives(lambda v: layer.apply(v, x), variables)["conv_general_dilated"]
    with conv_impl("auto"):
        assert convs() == 0  # a 2x2 output on this CPU backend: matmul
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with conv_impl("auto"):
        assert convs() == 1
    with conv_impl("matmul"):  # an explicit choice is kept on any backend
        assert convs() == 0


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stored_input_is_a_bitwise_identity_with_a_bitwise_identity_gradient(dtype):
    special = [0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, np.nan, 1e-30, -3e38, 7.0]
    x = jnp.asarray(np.asarray(special, np.float32).reshape(1, 2, 5, 1), dtype)
    kernel = jnp.asarray(np.random.default_rng(6).standard_normal((3, 3, 1, 2)), dtype)
    out, vjp = jax.vjp(lambda x: stored_input(x, kernel), x)
    cotangent = jnp.asarray(np.asarray(special[::-1], np.float32).reshape(x.shape), dtype)
    (grad,) = vjp(cotangent)
    assert out.dtype == grad.dtype == dtype
    np.testing.assert_array_equal(_bits(jax.jit(stored_input)(x, kernel)), _bits(x))
    np.testing.assert_array_equal(_bits(out), _bits(x))
    np.testing.assert_array_equal(_bits(grad), _bits(cotangent))
    assert jax.grad(lambda k: jnp.sum(stored_input(x[jnp.isfinite(x)], k)))(kernel).sum() == 0


def test_stored_input_flushes_subnormals_as_the_convolution_reads_them():
    """XLA:CPU runs with denormals flushed: a subnormal input becomes 0 in `stored_input`, and
    the convolution it feeds reads it as 0 anyway (1e-40 * 1e30 gives 0, not 1e-10)."""
    x = jnp.full((1, 2, 2, 1), 1e-40, jnp.float32)
    kernel = jnp.full((1, 1, 1, 1), 1e30, jnp.float32)
    np.testing.assert_array_equal(stored_input(x, kernel), 0.0)
    direct = lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=NHWC)
    np.testing.assert_array_equal(direct, 0.0)


def test_stored_input_leaves_integers_and_empty_kernels_alone():
    x = jnp.arange(6, dtype=jnp.int32)
    assert stored_input(x, jnp.ones((1, 1, 1, 1))) is x
    y = jnp.ones((1, 2, 2, 3))
    assert stored_input(y, jnp.ones((3, 3, 3, 0))) is y


def test_stored_input_division_survives_xla_optimization():
    """The division must reach the compiled program: were `1 + 0 * k` folded to 1, XLA would
    again recompute the input inside the kernel gradient's transposed copies."""
    x, k = random_pair(np.random.default_rng(7), 2, 8, 8, 3, 3, 3, 4)

    def divisions(store):
        def loss(x, k):
            h = jnp.maximum(x * 2.0 + 1.0, 0.0)
            y = conv_general_dilated_matmul(h, k, (1, 1), "SAME", dimension_numbers=NHWC,
                                            max_output_positions=4, store_delegated_input=store)
            return jnp.sum(y ** 2)

        return compiled_divisions(jax.jit(jax.grad(loss, argnums=1)), x, k)

    assert divisions(store=False) == 0
    assert divisions(store=True) >= 1


def compiled_divisions(jitted, *args) -> int:
    """How many `divide` instructions the optimized program of `jitted(*args)` holds."""
    return jitted.lower(*args).compile().as_text().count(" divide(")


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + identity, ReLU: the chain XLA would copy into transposes."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3))(x)))
        h = nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3))(h))
        return nn.relu(h + x)


def test_auto_with_stored_inputs_matches_xla_on_large_maps():
    """At 8x8 every convolution is XLA's own under "auto" (64 output positions > 4), now with
    a stored input: losses and gradients of a train-mode residual stack equal plain XLA's."""
    model = nn.Sequential([ResidualBlock(), ResidualBlock()])
    x = jnp.asarray(np.random.default_rng(8).standard_normal((4, 8, 8, 4)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)

    def loss(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                             mutable=["batch_stats"])
        return jnp.sum(out * jnp.cos(out))

    reference = jax.jit(jax.value_and_grad(loss))
    ref_value, ref_grads = reference(variables["params"])
    with conv_impl("auto"):
        step = jax.jit(jax.value_and_grad(lambda p: loss(p)))
        value, grads = step(variables["params"])
        # 4 convolutions, each input divided once (BatchNorm's own divisions are in both).
        assert (compiled_divisions(step, variables["params"])
                >= compiled_divisions(reference, variables["params"]) + 4)
    assert_close(value, ref_value, rtol=1e-6)
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-5), grads, ref_grads)


def test_a_crop_past_the_input_is_refused_as_lax_refuses_it():
    """Negative pads cropping more rows than the input has gave an empty output; lax refuses
    them ("Negative padding is larger than the size of the corresponding dimension")."""
    x, kernel = jnp.ones((1, 2, 3, 1)), jnp.ones((1, 1, 1, 1))
    pads = [(-2, -1), (0, 0)]
    with pytest.raises(Exception) as lax_error:
        lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=NHWC)
    with pytest.raises(type(lax_error.value), match="Negative padding"):
        conv_general_dilated_matmul(x, kernel, (1, 1), pads, dimension_numbers=NHWC)


def test_sliced_input_gradient_with_same_padding_and_dilation_matches_lax():
    """"SAME" resolved with the dilated window (5 = 2 * (3 - 1) + 1: pads (1, 2)) on the sliced
    input-gradient path: forward equals the float64 loop, both gradients lax's autodiff."""
    x, k = random_pair(np.random.default_rng(10), 1, 6, 6, 2, 3, 3, 2)
    args = ((2, 2), "SAME")
    kwargs = dict(rhs_dilation=(2, 2), dimension_numbers=NHWC)
    assert input_gradient_sliced(x, k, *args, **kwargs)  # output 3 < window 5
    assert_close(conv_general_dilated(x, k, *args, **kwargs),
                 numpy_conv(x, k, (2, 2), ((1, 2), (1, 2)), (2, 2)))

    def grads(conv):
        return jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, *args, **kwargs))),
                        argnums=(0, 1))(x, k)

    for got, want in zip(grads(conv_general_dilated), grads(lax.conv_general_dilated),
                         strict=True):
        assert_close(got, want)


def test_default_dimension_numbers_are_lax_nchw_oihw():
    """dimension_numbers=None means lax's NCHW input / OIHW kernel, not flax's NHWC layout."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((2, 3, 3, 3)), jnp.float32)  # C == H == W: no shape error
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 3)) / 5, jnp.float32)
    got = conv_general_dilated_matmul(x, k, (1, 1), "SAME")
    expected = numpy_conv(np.transpose(x, (0, 2, 3, 1)), np.transpose(k, (2, 3, 1, 0)), (1, 1),
                          ((1, 1), (1, 1)), (1, 1)).transpose(0, 3, 1, 2)
    assert_close(got, expected)
    assert_close(got, lax.conv_general_dilated(x, k, (1, 1), "SAME"))


@pytest.mark.parametrize("hw", [(4, 4), (2, 2)])  # a 2x2 output (matmul), an empty one
def test_preferred_element_type_is_honoured(hw):
    """bfloat16 operands with preferred_element_type=float32: lax's dtype, float32 accuracy."""
    x, k = random_pair(np.random.default_rng(12), 1, *hw, 3, 3, 3, 2)
    x, k = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    kwargs = dict(dimension_numbers=NHWC, preferred_element_type=jnp.float32)
    got = conv_general_dilated_matmul(x, k, (1, 1), "VALID", **kwargs)
    ref = lax.conv_general_dilated(x, k, (1, 1), "VALID", **kwargs)
    assert (got.shape, got.dtype) == (ref.shape, ref.dtype) == (ref.shape, jnp.float32)
    if got.size:  # bf16 products are exact in float32: only the float32 sum rounds
        assert_close(got, numpy_conv(x.astype(jnp.float32), k.astype(jnp.float32), (1, 1),
                                     ((0, 0), (0, 0)), (1, 1)))


def test_subclasses_of_nn_conv_keep_xla_convolutions():
    """Only nn.Conv itself (and Conv2D) is intercepted: a subclass may compute something else."""

    class Sub(nn.Conv):
        pass

    layer = Sub(2, (3, 3))
    x = jnp.ones((1, 2, 2, 1))
    variables = layer.init(jax.random.key(0), x)
    with conv_impl("matmul"):
        assert primitives(lambda v: layer.apply(v, x), variables)["conv_general_dilated"] == 1


def test_bound_module_gets_its_convolution_back_after_the_block():
    """The interceptor sets the frozen field for one call only: a bound module called inside the
    block runs XLA's convolution again outside it."""
    layer = nn.Conv(2, (3, 3))
    x = jnp.asarray(np.random.default_rng(13).standard_normal((1, 2, 2, 1)), jnp.float32)
    bound = layer.bind(layer.init(jax.random.key(0), x))
    with conv_impl("matmul"):
        inside = bound(x)
    assert bound.conv_general_dilated is None
    assert primitives(lambda x: bound(x), x)["conv_general_dilated"] == 1
    assert_close(bound(x), inside)


def test_cpu_lowerings_stay_off_other_backends(monkeypatch):
    """The sliced input gradient is an XLA:CPU workaround: off on a GPU backend."""
    x, k = jnp.ones((1, 6, 6, 1)), jnp.ones((2, 3, 1, 2))
    sliced = lambda: input_gradient_sliced(x, k, (2, 2), ((1, 1), (0, 0)),
                                           dimension_numbers=NHWC)
    assert cpu_lowerings_apply() and sliced()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not cpu_lowerings_apply()
    assert not sliced()


@pytest.mark.parametrize(("hw", "convs"), [((3, 3), 1), ((2, 3), 1), ((1, 5), 1), ((2, 2), 0),
                                           ((1, 4), 0)])
def test_auto_uses_matmul_up_to_four_output_positions(hw, convs):
    """"auto" (SAME 3x3, so output = input size): 5, 6 and 9 positions keep XLA's convolution,
    4 positions in either shape take the matmul."""
    layer = nn.Conv(2, (3, 3))
    x = jnp.ones((1, *hw, 1))
    variables = layer.init(jax.random.key(0), x)
    with conv_impl("auto"):
        assert primitives(lambda v: layer.apply(v, x), variables)["conv_general_dilated"] == convs


def test_matmul_keeps_the_requested_precision():
    """precision=HIGHEST reaches the matmul: accelerators would otherwise use TF32/bf16 passes."""
    x, k = random_pair(np.random.default_rng(14), 1, 4, 4, 3, 3, 3, 2)
    jaxpr = jax.make_jaxpr(lambda x, k: conv_general_dilated_matmul(
        x, k, (2, 2), "SAME", dimension_numbers=NHWC, precision=lax.Precision.HIGHEST))(x, k)
    (dot,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dot.params["precision"] == (lax.Precision.HIGHEST, lax.Precision.HIGHEST)


def test_stored_input_keeps_the_input_dtype_with_another_kernel_dtype():
    x = jnp.ones((1, 2, 2, 1), jnp.bfloat16)
    assert stored_input(x, jnp.ones((1, 1, 1, 1), jnp.float32)).dtype == jnp.bfloat16

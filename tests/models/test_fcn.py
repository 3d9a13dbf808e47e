"""Tests for FCN-32s/16s/8s: output geometry, bilinear upsampling, skips, VGG weight mapping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from cnnjax.layers.conv import Conv2D, ConvTranspose2D, bilinear_upsample_init
from cnnjax.models import create_model, list_models
from cnnjax.models.fcn import FCN, bilinear_upsample, fcn_params_from_vgg16

FCN_NAMES = [
    "fcn32s_vgg16",
    "fcn16s_vgg16",
    "fcn8s_vgg16",
    "fcn32s_resnet18",
    "fcn8s_resnet18",
    "fcn8s_resnet50",
]


def _shapes(model, x):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    out = jax.eval_shape(lambda v: model.apply(v, x), variables)
    return variables, out


def test_registered():
    assert set(FCN_NAMES) <= set(list_models("fcn*"))


@pytest.mark.parametrize("name", FCN_NAMES)
@pytest.mark.parametrize("size", [(64, 64), (77, 77), (100, 131)])
def test_output_spatially_equals_input(name, size):
    model = create_model(name, num_classes=5)
    _, out = _shapes(model, jnp.zeros((2, *size, 3)))
    assert out.shape == (2, *size, 5) and out.dtype == jnp.float32


def test_param_count_vgg16_fcn32s_matches_paper():
    # Long et al. Table 1: FCN-VGG16 has 134M parameters. Exactly: the VGG-16 conv trunk
    # (14,714,688) + fc6 as 7x7x512x4096 conv + fc7 1x1x4096x4096 + 21-class 1x1 score layer.
    variables, _ = _shapes(create_model("fcn32s_vgg16"), jnp.zeros((1, 64, 64, 3)))
    count = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert count == 14_714_688 + (7 * 7 * 512 + 1) * 4096 + (4096 + 1) * 4096 + (4096 + 1) * 21
    assert round(count / 1e6) == 134
    # 16s adds score_pool4 (512x21 + 21) and the 2x upsampling kernel (4x4x21x21, no bias).
    v16, _ = _shapes(create_model("fcn16s_vgg16"), jnp.zeros((1, 64, 64, 3)))
    count16 = sum(x.size for x in jax.tree.leaves(v16["params"]))
    assert count16 - count == 512 * 21 + 21 + 4 * 4 * 21 * 21


def test_bilinear_upsample_matches_tf_resize_in_the_interior():
    x = np.random.default_rng(0).normal(size=(1, 6, 7, 3)).astype(np.float32)
    for factor in (2, 3, 8):
        y = np.asarray(bilinear_upsample(jnp.asarray(x), factor))
        assert y.shape == (1, 6 * factor, 7 * factor, 3)
        ref = tf.image.resize(x, (6 * factor, 7 * factor), method="bilinear").numpy()
        b = factor  # the transposed conv sees zeros outside the map, the resize replicates edges
        np.testing.assert_allclose(y[:, b:-b, b:-b], ref[:, b:-b, b:-b], rtol=1e-5, atol=1e-5)


def test_learned_upsampling_is_bilinear_at_init_constant_stays_constant():
    layer = ConvTranspose2D(
        4, 4, strides=2, padding=1, use_bias=False, kernel_init=bilinear_upsample_init
    )
    x = jnp.broadcast_to(jnp.arange(1.0, 5.0), (1, 5, 6, 4))
    y = layer.apply(layer.init(jax.random.key(0), x), x)
    assert y.shape == (1, 10, 12, 4)
    np.testing.assert_allclose(
        y[:, 1:-1, 1:-1], jnp.broadcast_to(jnp.arange(1.0, 5.0), (1, 8, 10, 4)), rtol=1e-6
    )


@pytest.fixture(scope="module")
def fcn8s_small():
    """One FCN-8s-ResNet-18 at a 64x96 input, initialized and jitted once for several tests."""
    model = create_model("fcn8s_resnet18", num_classes=2)
    x = jax.random.normal(jax.random.key(0), (1, 64, 96, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    return model, x, variables, jax.jit(model.apply)


def _with_bias(variables, name, bias):
    params = dict(variables["params"])
    params[name] = {"kernel": params[name]["kernel"], "bias": jnp.asarray(bias)}
    return {**variables, "params": params}


def test_fcn8s_constant_scores_stay_constant_in_the_interior(fcn8s_small):
    model, x, variables, apply = fcn8s_small
    # The score layers are zero-initialized (paper), so the output starts at exactly zero.
    for name in ("head", "score_pool4", "score_pool3"):
        assert not np.any(variables["params"][name]["kernel"])
    np.testing.assert_array_equal(apply(variables, x), 0.0)
    # Constant coarse scores pass upscore2, upscore_pool4 (learned, bilinear at init) and the fixed
    # 8x bilinear: border effects reach (1 + 2) * 8 + 4 = 28 pixels, the centre stays constant.
    out = apply(_with_bias(variables, "head", [1.5, -2.0]), x)
    np.testing.assert_allclose(
        out[0, 30:34, 30:66], np.broadcast_to([1.5, -2.0], (4, 36, 2)), rtol=1e-5
    )
    assert not np.allclose(out[0, 0, 0], [1.5, -2.0])  # (the border does see the zero padding)


@pytest.mark.parametrize("name", ["score_pool3", "score_pool4", "head"])
def test_each_skip_layer_reaches_the_output(fcn8s_small, name):
    model, x, variables, apply = fcn8s_small
    out = apply(_with_bias(variables, name, [1.0, 0.0]), x)
    assert float(out[0, 32, 48, 0]) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_array_equal(out[..., 1], 0.0)


def test_odd_input_is_zero_padded_then_cropped(fcn8s_small):
    model, _, variables, apply = fcn8s_small
    v = _with_bias(variables, "score_pool3", [0.0, 0.0])
    v["params"]["head"] = {
        "kernel": jax.random.normal(jax.random.key(2), (1, 1, 512, 2)),
        "bias": jnp.zeros(2),
    }
    x = jax.random.normal(jax.random.key(0), (1, 45, 77, 3))
    padded = jnp.pad(x, ((0, 0), (0, 64 - 45), (0, 96 - 77), (0, 0)))
    ref = apply(v, padded)
    assert float(jnp.abs(ref).max()) > 0
    np.testing.assert_allclose(apply(v, x), ref[:, :45, :77], rtol=1e-5, atol=1e-6)


def test_learned_final_upsampling_starts_as_the_fixed_bilinear():
    model = create_model("fcn32s_resnet18", num_classes=2, learn_final_upsample=True)
    variables, out = _shapes(model, jnp.zeros((1, 45, 33, 3)))
    assert variables["params"]["upscore_final"]["kernel"].shape == (64, 64, 2, 2)
    assert out.shape == (1, 45, 33, 2)
    layer = ConvTranspose2D(
        3, 16, strides=8, padding=4, use_bias=False, kernel_init=bilinear_upsample_init
    )
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 3))
    y = layer.apply(layer.init(jax.random.key(1), x), x)
    np.testing.assert_allclose(y, bilinear_upsample(x, 8), rtol=1e-5, atol=1e-6)


def test_forward_backward_fcn8s_resnet18_jit(fcn8s_small):
    model, x, variables, _ = fcn8s_small
    labels = jax.random.randint(jax.random.key(1), x.shape[:3], 0, 2)

    @jax.jit
    def grads(params):
        def loss(p):
            out, _ = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), labels[..., None], -1))

        return jax.grad(loss)(params)

    g = grads(variables["params"])
    assert jax.tree.structure(g) == jax.tree.structure(variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))
    # The score layers start at zero, so at the first step only they receive gradient; the
    # backbone and the upsampling kernels (whose inputs are all-zero scores) get exactly zero.
    for name in ("head", "score_pool4", "score_pool3"):
        assert float(jnp.abs(g[name]["kernel"]).sum()) > 0, name
    for name in ("backbone", "upscore2", "upscore_pool4"):
        assert float(optax.global_norm(g[name])) == 0.0, name


@pytest.mark.slow
def test_forward_backward_fcn8s_vgg16_jit():
    model = create_model("fcn8s_vgg16", num_classes=3)
    x = jnp.ones((1, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    g = jax.jit(
        jax.grad(
            lambda p: model.apply(
                {"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)}
            ).sum()
        )
    )(variables["params"])
    assert jax.tree.structure(g) == jax.tree.structure(variables["params"])


def test_fc6_convolutionalized_equals_vgg_dense_fc6():
    rng = np.random.default_rng(0)
    pool5 = rng.normal(size=(1, 7, 7, 512)).astype(np.float32)
    dense_k = rng.normal(size=(7 * 7 * 512, 8)).astype(np.float32) * 0.01
    bias = rng.normal(size=(8,)).astype(np.float32)
    vgg_like = {
        "features": {},
        "fc6": {"kernel": dense_k, "bias": bias},
        "fc7": {"kernel": rng.normal(size=(8, 8)).astype(np.float32), "bias": bias},
    }
    mapped = fcn_params_from_vgg16(vgg_like)
    conv = Conv2D(8, 7, padding=3)
    y = conv.apply({"params": mapped["fc6"]}, pool5)
    dense = (
        pool5.reshape(1, -1).astype(np.float64) @ dense_k + bias
    )  # VGG flattens NHWC as (h, w, c)
    np.testing.assert_allclose(y[0, 3, 3], dense[0], rtol=1e-4, atol=1e-4)
    assert mapped["fc7"]["kernel"].shape == (1, 1, 8, 8)


def test_fcn_params_from_vgg16_fit_the_fcn_tree():
    vgg = jax.eval_shape(
        lambda: create_model("vgg16").init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    )
    fcn, _ = _shapes(create_model("fcn8s_vgg16"), jnp.zeros((1, 64, 64, 3)))
    mapped = jax.eval_shape(fcn_params_from_vgg16, vgg["params"])
    for key in ("features", "fc6", "fc7"):
        assert jax.tree.map(lambda a: a.shape, mapped[key]) == jax.tree.map(
            lambda a: a.shape, fcn["params"][key]
        )


def test_invalid_arguments():
    with pytest.raises(
        ValueError, match=r"FCN: variant=4 is invalid; expected one of \[32, 16, 8\]"
    ):
        FCN(variant=4)
    with pytest.raises(ValueError, match=r"FCN: backbone='alexnet' is invalid; expected one of"):
        FCN(backbone="alexnet")
    with pytest.raises(ValueError, match=r"FCN: num_classes=0 is invalid"):
        FCN(num_classes=0)
    with pytest.raises(ValueError, match=r"FCN: dropout_rate=1.5 is invalid"):
        FCN(dropout_rate=1.5)
    with pytest.raises(
        ValueError, match=r"FCN: input.shape=\(8, 8\) is invalid; expected a rank-4"
    ):
        FCN().init(jax.random.key(0), jnp.zeros((8, 8)))

"""Tests for FCN-32s/16s/8s: output geometry, bilinear upsampling, skips, VGG weight mapping."""

from __future__ import annotations

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from cnnjax.analysis.summary import summary
from cnnjax.layers.conv import ConvTranspose2D, bilinear_upsample_init
from cnnjax.models import create_model, list_models
from cnnjax.models import resnet as resnet_module
from cnnjax.models import vgg as vgg_module
from cnnjax.models.fcn import bilinear_upsample, edge_clamped, fcn_params_from_vgg16

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
    assert set(FCN_NAMES) <= set(list_models("fcn*", task="segmentation"))
    assert not list_models("fcn*")  # not classifiers: the engine trains them as segmentation


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


def test_bilinear_upsample_matches_tf_resize_up_to_the_borders():
    """Half-pixel bilinear with clamped edges, as `tf.image.resize` (the transposed convolution
    against zeros read 0.5x the edge value on the outermost half-block before)."""
    x = np.random.default_rng(0).normal(size=(1, 6, 7, 3)).astype(np.float32)
    for factor in (2, 3, 8, 32):
        y = np.asarray(bilinear_upsample(jnp.asarray(x), factor))
        assert y.shape == (1, 6 * factor, 7 * factor, 3)
        ref = tf.image.resize(x, (6 * factor, 7 * factor), method="bilinear").numpy()
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


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
    # 8x bilinear, all corner-aligned on ResNet, with edges clamped: constant on every pixel, the
    # borders beyond the last stride-32 centre (rows 33..63, columns 65..95) included. Against
    # zeros beyond the map, the last row read 0.03x the score.
    out = apply(_with_bias(variables, "head", [1.5, -2.0]), x)
    np.testing.assert_allclose(out[0], np.broadcast_to([1.5, -2.0], (64, 96, 2)), rtol=1e-5)


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
    # ResNet: corner-aligned odd kernel 2s - 1; VGG: the paper's half-pixel kernel 2s.
    for name, k in (("fcn32s_resnet18", 63), ("fcn32s_vgg16", 64)):
        model = create_model(name, num_classes=2, learn_final_upsample=True)
        variables, out = _shapes(model, jnp.zeros((1, 45, 33, 3)))
        assert variables["params"]["upscore_final"]["kernel"].shape == (k, k, 2, 2)
        assert out.shape == (1, 45, 33, 2)
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 3))
    for corner, (k, p, op) in ((False, (16, 4, 0)), (True, (15, 7, 7))):
        layer = ConvTranspose2D(
            3,
            k,
            strides=8,
            padding=p,
            output_padding=op,
            use_bias=False,
            kernel_init=bilinear_upsample_init,
        )
        params = layer.init(jax.random.key(1), x)
        y = edge_clamped(lambda z, params=params, layer=layer: layer.apply(params, z), x, 8)
        np.testing.assert_allclose(y, bilinear_upsample(x, 8, corner), rtol=1e-5, atol=1e-6)


def test_corner_aligned_bilinear_upsample_matches_tf_align_corners():
    x = np.random.default_rng(1).normal(size=(1, 4, 5, 2)).astype(np.float32)
    for factor in (2, 8, 32):
        y = np.asarray(bilinear_upsample(jnp.asarray(x), factor, corner_aligned=True))
        assert y.shape == (1, 4 * factor, 5 * factor, 2)
        size = (3 * factor + 1, 4 * factor + 1)  # input pixel i at output factor * i
        ref = tf.compat.v1.image.resize_bilinear(x, size, align_corners=True).numpy()
        np.testing.assert_allclose(y[:, : size[0], : size[1]], ref, rtol=1e-5, atol=1e-5)
        # beyond the last input pixel: its value (clamped), not a fall towards zero
        np.testing.assert_allclose(y[:, size[0]:], np.repeat(y[:, size[0] - 1:size[0]],
                                   factor - 1, axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(y[:, :, size[1]:], np.repeat(y[:, :, size[1] - 1:size[1]],
                                   factor - 1, axis=2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FCN_NAMES)
def test_summary_shows_aligned_skips_and_centred_output(name):
    # The receptive-field analysis tracks where each map's pixel 0 is centred on the input: every
    # skip `add` must merge maps on the same grid and output pixel 0 must be centred on input 0.
    result = summary(create_model(name, num_classes=3), (64, 64, 3))
    assert not [n for n in result.notes if "misaligned" in n], result.notes
    assert tuple(result.receptive_field.start) == (0, 0)
    assert tuple(result.receptive_field.jump) == (1, 1)


def _centre_tap_params(params):
    """Every conv kernel reduced to its centre tap (1/fan_in), biases zero, upsampling untouched.

    The backbone then only subsamples: a map pixel reads exactly the input pixel its convolutions
    are centred on (plus the max pools' argmax), so where the FCN looks is where its geometry puts
    it, free of the border truncation a wide effective receptive field would add.
    """

    def fill(path, leaf):
        keys = [str(getattr(k, "key", "")) for k in path]
        if any(k.startswith("upscore") for k in keys):
            return leaf
        if keys[-1] == "kernel":
            kh, kw = leaf.shape[:2]
            tap = np.zeros(leaf.shape, np.float32)
            tap[kh // 2, kw // 2] = 1.0 / leaf.shape[2]
            return jnp.asarray(tap)
        return jnp.zeros_like(leaf) if keys[-1] == "bias" else leaf

    return jax.tree_util.tree_map_with_path(fill, params)


@pytest.mark.parametrize(
    "name",
    # FCN-8s/ResNet-18 in the default suite (CI time): its 32x upsampling path is FCN-32s's,
    # with the two skip fusions added.
    ["fcn8s_resnet18", pytest.param("fcn32s_resnet18", marks=pytest.mark.slow),
     pytest.param("fcn8s_vgg16", marks=pytest.mark.slow)],
)
def test_input_gradient_centroid_of_each_output_pixel_is_that_pixel(name, monkeypatch):
    # Independent of the receptive-field analysis. Centre-tap kernels, and the max pools replaced
    # by average pools over the same windows (same geometry, no data-dependent argmax), make the
    # scores exactly linear in a positive input with every ReLU active, so the centroid of output
    # pixel v's input-gradient, sum_u u * d out[v] / d x[u] / sum_u d out[v] / d x[u], is for all
    # v at once the ratio of two forward-mode derivatives: along the coordinate map and along ones.
    # It must be v; ResNet with the half-pixel upsampling put it 15.5 px up/left.
    def average(x, k, s, padding=0):  # max_pool2d's window, averaged (padding counts as 0)
        return flax.linen.avg_pool(x, (k, k), (s, s), padding=((padding, padding),) * 2)

    monkeypatch.setattr(vgg_module, "max_pool2d", average)
    monkeypatch.setattr(resnet_module, "max_pool2d", average)
    model = create_model(name, num_classes=1)
    n = 96
    x = jnp.ones((1, n, n, 3))
    rows = np.broadcast_to(np.arange(n, dtype=np.float32)[None, :, None, None], x.shape)
    cols = np.broadcast_to(np.arange(n, dtype=np.float32)[None, None, :, None], x.shape)

    @jax.jit
    def directional(tangents):
        # Init, centre taps and the three derivatives in one program: one compilation, and the
        # kernels' random init, overwritten by the taps, is dead code there.
        variables = {**model.init(jax.random.key(1), x)}
        variables["params"] = _centre_tap_params(variables["params"])
        return jax.vmap(lambda t: jax.jvp(lambda inp: model.apply(variables, inp), (x,),
                                          (t,))[1][0, ..., 0])(tangents)

    mass, *along = np.asarray(directional(np.stack([np.ones(x.shape, np.float32), rows, cols])),
                              np.float64)
    inner = slice(32, n - 32)  # away from the zero outside the map that the borders blend in
    assert np.all(mass[inner, inner] > 0)
    v = np.arange(n, dtype=np.float64)[inner]
    for axis, derivative in enumerate(along):
        centroid = derivative[inner, inner] / mass[inner, inner]
        want = v[:, None] if axis == 0 else v[None, :]
        np.testing.assert_allclose(centroid, np.broadcast_to(want, centroid.shape), atol=0.5)


def _vgg_params(name: str) -> dict:
    model = create_model(name, num_classes=10)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]


def test_vgg16_params_map_onto_the_fcn_backbone():
    fcn_shapes = jax.eval_shape(create_model("fcn32s_vgg16").init, jax.random.key(0),
                                jnp.zeros((1, 224, 224, 3)))["params"]
    mapped = jax.eval_shape(fcn_params_from_vgg16, _vgg_params("vgg16"))
    assert jax.tree.map(lambda a: a.shape, mapped) == jax.tree.map(
        lambda a: a.shape, {k: fcn_shapes[k] for k in ("features", "fc6", "fc7")})


@pytest.mark.parametrize("name,detail", [
    ("vgg16_bn", r"its features has \['bn1_1', 'bn1_2'"),
    ("vgg19", r"its features has \['conv3_4', 'conv4_4', 'conv5_4'\]"),
    ("vgg11", r"its features lacks \['conv1_2', 'conv2_2', 'conv3_3'"),
])
def test_another_vggs_params_are_refused(name, detail):
    """Merged into the FCN, VGG-16-BN's BatchNorms or VGG-19's fourth convolutions would be
    ignored and the backbone would run weights trained for another network."""
    with pytest.raises(ValueError, match=r"^fcn_params_from_vgg16: vgg_params='features' is "
                                         r"invalid; expected the params of cnnjax's plain vgg16: "
                                         + detail):
        fcn_params_from_vgg16(_vgg_params(name))


@pytest.mark.slow
def test_fcn_fc7_at_the_centre_equals_the_vgg16_classifiers_fc7():
    """fc6/fc7 as convolutions over the 7x7 pool5 map of a 224x224 input give, at the centre
    position, the classifier's fc7 activations (the reshape's (h, w, c) row order)."""
    x = jax.random.normal(jax.random.key(1), (1, 224, 224, 3))
    vgg, fcn = create_model("vgg16", num_classes=10), create_model("fcn32s_vgg16")
    vgg_vars = jax.jit(vgg.init)(jax.random.key(0), x)
    fcn_vars = jax.jit(fcn.init)(jax.random.key(1), x)
    merged = {"params": {**fcn_vars["params"], **fcn_params_from_vgg16(vgg_vars["params"])}}
    _, features = jax.jit(lambda v, x: fcn.apply(v, x, return_features=True))(merged, x)
    _, reference = jax.jit(lambda v, x: vgg.apply(v, x, return_features=True))(vgg_vars, x)
    np.testing.assert_allclose(features["fc7"][0, 3, 3], reference["pre_logits"][0],
                               rtol=1e-4, atol=1e-4)


def test_dropout_rate_is_refused_on_a_resnet_backbone_and_applied_on_vgg16():
    """Only VGG-16's fc6/fc7 have dropout: a rate given with a ResNet backbone did nothing."""
    with pytest.raises(ValueError, match=r"^FCN: dropout_rate=0.9 is invalid; the resnet18 "
                                         r"backbone has no dropout \(only VGG-16's fc6 and fc7 "
                                         r"have\); leave it None\.$"):
        create_model("fcn8s_resnet18", dropout_rate=0.9)
    model = create_model("fcn32s_vgg16", num_classes=3, dropout_rate=0.9)
    x = jnp.ones((1, 32, 32, 3))
    # Every weight and bias 1e-3 (no random draw of the 134 M parameters): on an all-ones input
    # every activation is then positive, so each zero of fc7 is one dropout made.
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = jax.tree.map(lambda s: jnp.full(s.shape, 1e-3, s.dtype), shapes)
    fc7 = [model.apply(variables, x, train=True, return_features=True,
                       rngs={"dropout": jax.random.key(k)})[1]["fc7"] for k in (1, 2)]
    assert not jnp.any(model.apply(variables, x, return_features=True)[1]["fc7"] == 0)
    dropped = [float(jnp.mean(f == 0)) for f in fc7]
    assert not jnp.array_equal(*fc7) and all(0.85 < d < 0.95 for d in dropped)  # 90% dropped
    assert create_model("fcn32s_vgg16").dropout_rate is None  # the paper's 0.5 when built


def test_effective_dropout_rate_is_the_rate_training_applies():
    """Unset, dropout_rate is the paper's 0.5 on VGG-16 and nothing on a ResNet backbone (no
    dropout layer): the tuning recipe's dropout knob reads this rather than the None."""
    assert create_model("fcn8s_vgg16").effective_dropout_rate == 0.5
    assert create_model("fcn32s_vgg16", dropout_rate=0.2).effective_dropout_rate == 0.2
    assert create_model("fcn8s_resnet18").effective_dropout_rate == 0.0


@pytest.mark.parametrize("shape", [(1, 0, 40, 3), (1, 40, 0, 3), (1, 40, 40, 0)])
def test_an_empty_input_map_is_named_as_the_fcns(shape):
    """An input without pixels or channels is refused by FCN itself, naming the shape, before any
    layer runs (it failed in VGG/ResNet's first pool, or with a ZeroDivisionError in an
    initializer for 0 channels)."""
    model = create_model("fcn32s_resnet18", num_classes=2)
    with pytest.raises(ValueError, match=r"FCN: input\.shape=\(1, (0, 40, 3|40, 0, 3|40, 40, 0)\)"
                                         r" is invalid; expected height, width and channels"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


@pytest.mark.parametrize("factor", [0, -2, 2.0, True])
def test_bilinear_upsample_refuses_a_factor_that_is_no_positive_int(factor):
    """`bilinear_upsample`'s factor 0 or -2 failed in lax ('All dilations must be positive',
    'broadcast shape'), 2.0 with a TypeError, and True upsampled by 1 silently."""
    with pytest.raises(ValueError, match=r"bilinear_upsample: factor=.* is invalid"):
        bilinear_upsample(jnp.ones((1, 2, 2, 1)), factor)

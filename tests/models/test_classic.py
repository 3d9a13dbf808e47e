"""Tests for the classic CNNs: LeNet-5, AlexNet (two layouts), ZFNet, VGG, NiN and GoogLeNet (the
paper's and torchvision's BatchNorm layout, `googlenet_bn`).

Parameter counts and feature-map sizes are checked with `jax.eval_shape` (nothing is allocated or
compiled) against published figures or against closed-form counts written out layer by layer
below; every registered model also initializes and runs forward + backward under `jax.jit` at
the smallest input its registry entry admits.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax.analysis.summary import summary
from cnnjax.layers.conv import Conv2D
from cnnjax.models import create_model, list_models, model_info, settable_fields
from cnnjax.models.alexnet import AlexNet, ZFNet
from cnnjax.models.googlenet import (
    AUX_MIN_INPUT_SIZE,
    BN_EPSILON,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_V1,
    BasicConv2d,
    GoogLeNet,
    GoogLeNetBN,
    GoogLeNetOutputs,
    Inception,
    InceptionAux,
    InceptionBN,
    googlenet,
    transform_imagenet_input,
)
from cnnjax.models.googlenet import __doc__ as googlenet_module_doc
from cnnjax.models.lenet import C3_CONNECTIONS, ConnectionTableConv, LeNet5, scaled_tanh
from cnnjax.models.nin import MLPConv, NiN, NiNStage
from cnnjax.models.vgg import VGG, VGG_C_KERNEL_SIZES, VGG_CONFIGS, VGGFeatures
from cnnjax.train.checks import check_input_size
from tests.layers.pool_reference import pool_reference

CLASSIC = [
    "lenet5",
    "alexnet",
    "alexnet_2tower",
    "zfnet",
    "vgg11",
    "vgg11_bn",
    "vgg11_lrn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_c",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "nin",
    "nin_cifar",
    "googlenet",
    "googlenet_bn",
]
BN_MODELS = [n for n in CLASSIC if n.endswith("_bn")]


def key(seed: int) -> jax.Array:
    """A PRNG key of the "rbg" implementation: XLA's RngBitGenerator compiles several times
    faster on CPU than the default threefry, and init compile time dominates these tests."""
    return jax.random.key(seed, impl="rbg")


RNGS = {"params": key(0), "dropout": key(1)}


# ---------------------------------------------------------------- closed-form parameter counts
def conv(cin: int, cout: int, k: int, groups: int = 1) -> int:
    """Weights + biases of a k x k convolution."""
    return cout * (cin // groups * k * k + 1)


def dense(cin: int, cout: int) -> int:
    return cout * (cin + 1)


def vgg_count(depth: int, bn: bool, classes: int = 1000) -> int:
    widths = {
        11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
        13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
        16: [
            64,
            64,
            "M",
            128,
            128,
            "M",
            256,
            256,
            256,
            "M",
            512,
            512,
            512,
            "M",
            512,
            512,
            512,
            "M",
        ],
        19: [
            64,
            64,
            "M",
            128,
            128,
            "M",
            256,
            256,
            256,
            256,
            "M",
            512,
            512,
            512,
            512,
            "M",
            512,
            512,
            512,
            512,
            "M",
        ],
    }[depth]
    total, cin = 0, 3
    for w in widths:
        if w != "M":
            total += conv(cin, w, 3) + (2 * w if bn else 0)  # BN: scale and bias only
            cin = w
    return total + dense(7 * 7 * 512, 4096) + dense(4096, 4096) + dense(4096, classes)


def inception_count(cin: int, widths: tuple[int, ...]) -> int:
    n1, r3, n3, r5, n5, pp = widths
    return (
        conv(cin, n1, 1)
        + conv(cin, r3, 1)
        + conv(r3, n3, 3)
        + conv(cin, r5, 1)
        + conv(r5, n5, 5)
        + conv(cin, pp, 1)
    )


def googlenet_count(classes: int = 1000, aux: bool = False) -> int:
    total = conv(3, 64, 7) + conv(64, 64, 1) + conv(64, 192, 3)
    cin = 192
    for widths in INCEPTION_V1.values():
        total += inception_count(cin, widths)
        cin = widths[0] + widths[2] + widths[4] + widths[5]
    total += dense(1024, classes)
    if aux:  # on 4a (512 channels) and 4d (528 channels), 4x4 maps after the 5x5/3 pool
        for channels in (512, 528):
            total += conv(channels, 128, 1) + dense(4 * 4 * 128, 1024) + dense(1024, classes)
    return total


CLOSED_FORM = {
    # LeNet-5, full C3 table, linear output layer (10 classes).
    "lenet5": conv(1, 6, 5) + conv(6, 16, 5) + conv(16, 120, 5) + dense(120, 84) + dense(84, 10),
    "alexnet_2tower": (
        conv(3, 96, 11)
        + conv(96, 256, 5, 2)
        + conv(256, 384, 3)
        + conv(384, 384, 3, 2)
        + conv(384, 256, 3, 2)
        + dense(6 * 6 * 256, 4096)
        + dense(4096, 4096)
        + dense(4096, 1000)
    ),
    "zfnet": (
        conv(3, 96, 7)
        + conv(96, 256, 5)
        + conv(256, 512, 3)
        + conv(512, 1024, 3)
        + conv(1024, 512, 3)
        + dense(6 * 6 * 512, 4096)
        + dense(4096, 4096)
        + dense(4096, 1000)
    ),
    "nin": (
        conv(3, 96, 11)
        + 2 * conv(96, 96, 1)
        + conv(96, 256, 5)
        + 2 * conv(256, 256, 1)
        + conv(256, 384, 3)
        + 2 * conv(384, 384, 1)
        + conv(384, 1024, 3)
        + conv(1024, 1024, 1)
        + conv(1024, 1000, 1)
    ),
    "nin_cifar": (
        conv(3, 192, 5)
        + conv(192, 160, 1)
        + conv(160, 96, 1)
        + conv(96, 192, 5)
        + 2 * conv(192, 192, 1)
        + conv(192, 192, 3)
        + conv(192, 192, 1)
        + conv(192, 10, 1)
    ),
    **{f"vgg{d}{s}": vgg_count(d, bool(s)) for d in (11, 13, 16, 19) for s in ("", "_bn")},
    "vgg11_lrn": vgg_count(11, False),  # A-LRN: LRN has no parameters
    "vgg16_c": (  # configuration C, layer by layer (paper Table 1): B + conv1-256/512/512
        conv(3, 64, 3) + conv(64, 64, 3)
        + conv(64, 128, 3) + conv(128, 128, 3)
        + conv(128, 256, 3) + conv(256, 256, 3) + conv(256, 256, 1)
        + conv(256, 512, 3) + conv(512, 512, 3) + conv(512, 512, 1)
        + conv(512, 512, 3) + conv(512, 512, 3) + conv(512, 512, 1)
        + dense(7 * 7 * 512, 4096) + dense(4096, 4096) + dense(4096, 1000)
    ),
    "googlenet": googlenet_count(),
}

# Published figures (torchvision's model docs; Caffe's grouped AlexNet; LeNet-5's widely quoted
# count for the full-table, linear-output variant).
PUBLISHED = {
    "lenet5": 61_706,
    "alexnet": 61_100_840,
    "alexnet_2tower": 60_965_224,
    "vgg11": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
    "googlenet_bn": 6_624_904,  # torchvision's googlenet, aux_logits=False
}

# Simonyan & Zisserman 2015, Table 2: parameters of configurations A, A-LRN, B, C, D, E in millions
# (rounded; torchvision gives A/B/D/E exactly, PUBLISHED).
VGG_TABLE2_MILLIONS = {"vgg11": 133, "vgg11_lrn": 133, "vgg13": 133, "vgg16_c": 134,
                       "vgg16": 138, "vgg19": 144}

# Not a published figure: the paper's GoogLeNet as cnnjax builds it (Szegedy et al. 2015, Table 1
# widths, with biases, a 1000-way head), derived in this project; it is googlenet_count() above,
# so it pins the closed form, not an outside reference. Table 1's own "params" column sums to
# ~6.8 M (rounded per-layer figures), and torchvision's googlenet is another layout (BatchNorm,
# 3x3 "5x5" branches: 6,624,904, cnnjax's googlenet_bn, compared live in
# tests/models/test_torchvision_weights.py): no outside figure matches this model, whose check
# is the layer-by-layer closed form (CLOSED_FORM).
GOOGLENET_DERIVED = 6_998_552
GOOGLENET_AUX_DERIVED = 6_379_728  # the two auxiliary heads, likewise derived


def init_shapes(model: nn.Module, shape, **kwargs):
    """Abstract variables of `model.init` (shapes and dtypes only)."""
    return jax.eval_shape(lambda: model.init(RNGS, jnp.zeros(shape, jnp.float32), **kwargs))


def jinit(model: nn.Module, x, **kwargs):
    """`model.init` under jit (op-by-op eager execution compiles every primitive: slow on CPU)."""
    return jax.jit(functools.partial(model.init, **kwargs))(RNGS, x)


def japply(model: nn.Module, variables, x, **kwargs):
    """`model.apply` under jit."""
    return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


def jrun(model: nn.Module, x, **kwargs):
    """`(variables, model.apply(variables, x, **kwargs))` with fresh variables, in one jit."""

    def run(x):
        variables = model.init(RNGS, x)
        return variables, model.apply(variables, x, **kwargs)

    return jax.jit(run)(x)


def n_params(variables) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def native_shape(name: str, batch: int = 1) -> tuple[int, int, int, int]:
    return (batch, *model_info(name).input_shape)


def min_shape(name: str, batch: int = 2) -> tuple[int, int, int, int]:
    info = model_info(name)
    return (batch, info.min_input_size, info.min_input_size, info.input_shape[2])


def test_registry_lists_every_classic_model():
    assert set(CLASSIC) <= set(list_models())
    assert list_models("vgg1?_bn") == ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
    assert model_info("alexnet_2tower").input_shape == (227, 227, 3)
    assert model_info("lenet5").input_shape == (32, 32, 1)
    assert model_info("lenet5").num_classes == 10
    assert model_info("nin_cifar").num_classes == 10


@pytest.mark.parametrize("name", CLASSIC)
def test_param_count_exact(name):
    variables = init_shapes(create_model(name), native_shape(name))
    count = n_params(variables)
    assert count == CLOSED_FORM.get(name, count)
    assert count == PUBLISHED.get(name, count)
    assert name in CLOSED_FORM or name in PUBLISHED
    if name in VGG_TABLE2_MILLIONS:
        assert round(count / 1e6) == VGG_TABLE2_MILLIONS[name]
    assert "head" in variables["params"]  # the classifier every model names `head`
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))


def test_bn_running_statistics_are_not_params():
    variables = init_shapes(create_model("vgg16_bn"), (1, 224, 224, 3))
    stats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["batch_stats"]))
    assert stats == 2 * (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512)  # mean + var per BN channel
    assert n_params(variables) == 138_365_992


def test_googlenet_aux_heads_param_count():
    model = create_model("googlenet", aux_logits=True)
    variables = init_shapes(model, (1, 224, 224, 3))
    assert googlenet_count() == GOOGLENET_DERIVED  # the recorded derivations still hold
    assert n_params(variables) == googlenet_count(aux=True) == (GOOGLENET_DERIVED
                                                                + GOOGLENET_AUX_DERIVED)
    assert {"aux1", "aux2"} <= set(variables["params"])


def test_num_classes_override_changes_only_the_head():
    a = init_shapes(create_model("vgg11"), (1, 32, 32, 3))
    b = init_shapes(create_model("vgg11", num_classes=10), (1, 32, 32, 3))
    assert n_params(a) - n_params(b) == dense(4096, 1000) - dense(4096, 10)
    assert b["params"]["head"]["kernel"].shape == (4096, 10)


# --------------------------------------------------------------- feature maps at native sizes
def _feature_shapes(model, shape, **kwargs):
    """Logits shape and `{name: shape}` of the features, in the order the model returns them.

    (Traced outputs come back as pytrees with sorted dict keys, so the order is recorded while
    tracing.)
    """
    variables = init_shapes(model, shape)
    order: list[str] = []

    def run(v):
        logits, features = model.apply(v, jnp.zeros(shape), return_features=True, **kwargs)
        order.extend(features)
        return logits, features

    logits, features = jax.eval_shape(run, variables)
    return logits.shape, {k: tuple(features[k].shape) for k in order}


# Map sizes from the papers: AlexNet Figure 2 (55 -> 27 -> 13 -> 6), ZFNet Figure 3
# (110 -> 55 -> 26 -> 13 -> 6), GoogLeNet Table 1 (28, 14, 7), VGG (halving to 7), NiN (Caffe:
# 54 -> 27 -> 13 -> 6; CIFAR 32 -> 16 -> 8), LeNet-5 Figure 2.
NATIVE_FEATURES = {
    "lenet5": {
        "c1": (28, 28, 6),
        "s2": (14, 14, 6),
        "c3": (10, 10, 16),
        "s4": (5, 5, 16),
        "c5": (1, 1, 120),
        "pre_logits": (84,),
    },
    "alexnet_2tower": {
        "layer1": (27, 27, 96),
        "layer2": (13, 13, 256),
        "layer3": (13, 13, 384),
        "layer4": (13, 13, 384),
        "layer5": (6, 6, 256),
        "pre_logits": (4096,),
    },
    "alexnet": {
        "layer1": (27, 27, 64),
        "layer2": (13, 13, 192),
        "layer3": (13, 13, 384),
        "layer4": (13, 13, 256),
        "layer5": (6, 6, 256),
        "pre_logits": (4096,),
    },
    "zfnet": {
        "layer1": (55, 55, 96),
        "layer2": (13, 13, 256),
        "layer3": (13, 13, 512),
        "layer4": (13, 13, 1024),
        "layer5": (6, 6, 512),
        "pre_logits": (4096,),
    },
    "vgg16": {
        "block1": (112, 112, 64),
        "block2": (56, 56, 128),
        "block3": (28, 28, 256),
        "block4": (14, 14, 512),
        "block5": (7, 7, 512),
        "pre_logits": (4096,),
    },
    "nin": {
        "block1": (27, 27, 96),
        "block2": (13, 13, 256),
        "block3": (6, 6, 384),
        "block4": (6, 6, 1024),
        "pre_logits": (6, 6, 1024),
    },
    "nin_cifar": {
        "block1": (16, 16, 96),
        "block2": (8, 8, 192),
        "block3": (8, 8, 192),
        "pre_logits": (8, 8, 192),
    },
    "googlenet": {
        "stem": (28, 28, 192),
        "inception3": (28, 28, 480),
        "inception4": (14, 14, 832),
        "inception5": (7, 7, 1024),
        "pre_logits": (1024,),
    },
    "googlenet_bn": {  # torchvision's comments: 56 -> 28 -> 14 -> 7 (its 2x2/2 maxpool4)
        "stem": (28, 28, 192),
        "inception3": (28, 28, 480),
        "inception4": (14, 14, 832),
        "inception5": (7, 7, 1024),
        "pre_logits": (1024,),
    },
}
NATIVE_FEATURES["vgg16_c"] = NATIVE_FEATURES["vgg16"]  # C's 1x1 convolutions keep the map size


@pytest.mark.parametrize("name", sorted(NATIVE_FEATURES))
def test_feature_maps_match_paper_sizes(name):
    model = create_model(name)
    logits, features = _feature_shapes(model, native_shape(name, batch=2))
    assert logits == (2, model.num_classes)
    expected = NATIVE_FEATURES[name]
    assert list(features) == list(expected)  # names, in network order
    assert features == {k: (2, *v) for k, v in expected.items()}


def test_alexnet_at_224_shows_the_paper_size_inconsistency():
    # (224 - 11) / 4 + 1 = 54.25: the paper's 224 input gives 54 -> 26 -> 12 -> 5, not 6x6 pool5.
    _, features = _feature_shapes(AlexNet(pool_size=None), (1, 224, 224, 3))
    assert features["layer5"] == (1, 5, 5, 256)
    # torchvision's layout pads conv1 by 2 and pools adaptively, so 224 works.
    _, features = _feature_shapes(create_model("alexnet"), (1, 224, 224, 3))
    assert features["layer5"] == (1, 6, 6, 256)
    # The paper's net with the class's adaptive pool (the docstring's advice; the registered name
    # fixes pool_size): fc6 keeps the 9216 inputs of the published count.
    params = init_shapes(AlexNet(pool_size=6), (1, 224, 224, 3))["params"]
    assert params["fc6"]["kernel"].shape == (9216, 4096)


def _lrn_then_pool(relu: np.ndarray, groups: int) -> np.ndarray:
    """float64 reference of AlexNet's LRN (n=5, k=2, alpha=1e-4, beta=0.75; the window clipped at
    each group's edges) over `groups` channel groups separately, then 3x3/s2 max pooling."""
    parts = []
    for part in np.split(relu, groups, axis=-1):
        padded = np.pad(part * part, ((0, 0), (0, 0), (0, 0), (2, 2)))
        window = sum(padded[..., j:j + part.shape[-1]] for j in range(5))
        parts.append(part / (2.0 + 1e-4 * window) ** 0.75)
    lrn = np.concatenate(parts, axis=-1)
    windows = np.lib.stride_tricks.sliding_window_view(lrn, (3, 3), axis=(1, 2))
    return windows[:, ::2, ::2].max(axis=(-2, -1))


def test_alexnet_lrn_groups_normalizes_each_tower_separately():
    """`lrn_groups=2` is the paper's per-GPU LRN (cuda-convnet2's rnorm1a/rnorm1b), default 1
    Caffe's across all maps: layer1/layer2 against float64 NumPy from the captured conv outputs,
    and the two differ exactly at the 2 maps each side of the tower boundary. Widths 8, 67x67."""
    kwargs = dict(widths=(8, 8, 8, 8, 8), hidden_features=4, num_classes=3)
    x = jax.random.normal(jax.random.key(5), (2, 67, 67, 3)) * 30  # LRN's sum matters
    variables = jinit(AlexNet(**kwargs), x)
    layers = {}
    for groups in (1, 2):
        model = AlexNet(**kwargs) if groups == 1 else AlexNet(**kwargs, lrn_groups=groups)
        (_, feats), inter = japply(model, variables, x, return_features=True,
                                   capture_intermediates=lambda m, _: isinstance(m, Conv2D),
                                   mutable=["intermediates"])
        for conv, layer in (("conv1", "layer1"), ("conv2", "layer2")):
            out = np.asarray(inter["intermediates"][conv]["__call__"][0], np.float64)
            expected = _lrn_then_pool(np.maximum(out, 0), groups)
            np.testing.assert_allclose(np.asarray(feats[layer]), expected, rtol=1e-5, atol=1e-5)
        layers[groups] = np.asarray(feats["layer1"])
    changed = np.abs(layers[2] - layers[1]).max(axis=(0, 1, 2)) > 1e-6
    np.testing.assert_array_equal(changed, [0, 0, 1, 1, 1, 1, 0, 0])  # 2, 3 | 4, 5
    assert create_model("alexnet_2tower", lrn_groups=2).lrn_groups == 2
    assert "lrn_groups" not in settable_fields("alexnet")  # fixed with its lrn=False


def test_alexnet_two_towers_are_grouped_convolutions():
    params = init_shapes(create_model("alexnet_2tower"), (1, 227, 227, 3))["params"]
    kernels = {k: params[k]["kernel"].shape for k in ("conv1", "conv2", "conv3", "conv4", "conv5")}
    # Each tower's kernels see only that tower's half of the input maps (except conv3).
    assert kernels == {
        "conv1": (11, 11, 3, 96),
        "conv2": (5, 5, 48, 256),
        "conv3": (3, 3, 256, 384),
        "conv4": (3, 3, 192, 384),
        "conv5": (3, 3, 192, 256),
    }


def test_vgg_parameter_names_for_fcn():
    params = init_shapes(create_model("vgg16"), (1, 224, 224, 3))["params"]
    assert set(params) == {"features", "fc6", "fc7", "head"}
    convs = sorted(params["features"])
    assert convs == sorted(
        f"conv{b}_{i}"
        for b, n in zip(range(1, 6), (2, 2, 3, 3, 3), strict=True)
        for i in range(1, n + 1)
    )
    assert params["fc6"]["kernel"].shape == (7 * 7 * 512, 4096)


def test_vgg_fc6_flatten_order_is_hwc():
    """fc6's kernel reshaped to 7x7x512x4096 is the equivalent convolution (FCN relies on it)."""
    model = VGG(stages=((4,), (8,)), hidden_features=5, pool_size=3, num_classes=3)
    x = jax.random.normal(jax.random.key(2), (2, 12, 12, 3))
    variables, ((_, features), state) = jrun(
        model,
        x,
        return_features=True,
        capture_intermediates=lambda m, _: m.name == "fc6",
        mutable=["intermediates"],
    )
    pooled = np.asarray(features["block2"])  # 3x3x8, the adaptive pool is the identity here
    fc6 = variables["params"]["fc6"]
    kernel = np.asarray(fc6["kernel"]).reshape(3, 3, 8, 5)
    as_conv = np.einsum("nhwc,hwco->no", pooled.astype(np.float64), kernel) + np.asarray(
        fc6["bias"]
    )
    got = state["intermediates"]["fc6"]["__call__"][0]
    np.testing.assert_allclose(np.asarray(got), as_conv, rtol=1e-5, atol=1e-5)


def test_vgg_configurations_a_lrn_and_c_layouts():
    """A-LRN is A's variables (so A's checkpoints load) with `lrn`; C is D's widths with B's
    3x3 convolutions and a 1x1 convolution (no bias change) closing blocks 3-5 (paper Table 1)."""
    def shapes(name):
        return jax.tree.map(lambda a: a.shape, init_shapes(create_model(name), (1, 32, 32, 3)))

    assert shapes("vgg11_lrn") == shapes("vgg11")
    a_lrn, c = create_model("vgg11_lrn"), create_model("vgg16_c")
    assert (a_lrn.stages, a_lrn.lrn, a_lrn.kernel_sizes) == (VGG_CONFIGS[11], True, None)
    assert (c.stages, c.lrn) == (VGG_CONFIGS[16], False)
    kernels = {k: v["kernel"][:2] for k, v in shapes("vgg16_c")["params"]["features"].items()}
    assert kernels == {f"conv{b}_{i}": (1, 1) if i == 3 else (3, 3)
                       for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1)}
    assert CLOSED_FORM["vgg16_c"] - CLOSED_FORM["vgg13"] == (256 * 256 + 256) + 2 * (512 * 512
                                                                                     + 512)


def test_vgg_a_lrn_normalizes_conv1_1_with_alexnets_constants():
    """A-LRN's block1 against float64 NumPy: max_pool(LRN(relu(conv1_1))) with AlexNet's n=5, k=2,
    alpha=1e-4, beta=0.75 (the paper's formula, alpha not divided by n); the same variables
    without `lrn` give A's different block1 and logits. Reduced widths (8, 16), 8x8 inputs."""
    kwargs = dict(stages=((8,), (16,)), hidden_features=6, num_classes=3, pool_size=None)
    a, a_lrn = VGG(**kwargs), VGG(**kwargs, lrn=True)
    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3)) * 30  # LRN's sum matters at this scale
    variables = jinit(a, x)
    (logits, feats), inter = japply(a_lrn, variables, x, return_features=True,
                                    capture_intermediates=lambda m, _: isinstance(m, Conv2D),
                                    mutable=["intermediates"])
    relu = np.maximum(np.asarray(inter["intermediates"]["features"]["conv1_1"]["__call__"][0],
                                 np.float64), 0)
    padded = np.pad(relu * relu, ((0, 0), (0, 0), (0, 0), (2, 2)))
    window = sum(padded[..., j:j + 8] for j in range(5))  # channels c-2 .. c+2, clipped
    lrn = relu / (2.0 + 1e-4 * window) ** 0.75
    pooled = lrn.reshape(2, 4, 2, 4, 2, 8).max(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(feats["block1"]), pooled, rtol=1e-5, atol=1e-5)
    assert 0.01 < float(np.max(1e-4 * window)) < 10  # the sum's term is not negligible
    plain_logits, plain_feats = japply(a, variables, x, return_features=True)
    assert np.max(np.abs(np.asarray(plain_feats["block1"]) - pooled)) > 0.1
    assert not np.allclose(np.asarray(plain_logits), np.asarray(logits))


def test_vgg_a_lrn_and_c_summary_against_a_and_b():
    """`summary` at 224x224: LRN adds no MACs nor receptive field (A's 342); C's 1x1
    convolutions add 56*56*256*256 + (28*28 + 14*14)*512*512 MACs to B's and no receptive
    field (B's 348: fc6's 7x7 view of pool5 included)."""
    rows = {n: summary(create_model(n), (224, 224, 3))
            for n in ("vgg11", "vgg11_lrn", "vgg13", "vgg16_c")}
    macs = {n: r.totals["macs"] for n, r in rows.items()}
    field = {n: tuple(r.receptive_field.size) for n, r in rows.items()}
    assert macs["vgg11_lrn"] == macs["vgg11"]
    assert macs["vgg16_c"] - macs["vgg13"] == 56 * 56 * 256 * 256 + (28 * 28 + 14 * 14) * 512 * 512
    assert field == {"vgg11": (342, 342), "vgg11_lrn": (342, 342), "vgg13": (348, 348),
                     "vgg16_c": (348, 348)}
    assert any("lrn1" in r.name for r in rows["vgg11_lrn"].rows)


# ------------------------------------------------------- forward + backward at the minimum size
def _train_apply(model, variables, x, key):
    """Train-mode logits, grads of a cross-entropy loss and updated state, all under jit."""
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p):
        logits, new_state = model.apply(
            {"params": p, **state}, x, train=True, rngs={"dropout": key}, mutable=list(state)
        )
        labels = jnp.arange(x.shape[0]) % model.num_classes
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, new_state)

    (loss, (logits, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, grads, new_state


@pytest.mark.parametrize("name", CLASSIC)
def test_forward_backward_traces_for_every_model(name):
    """Abstract init + train-mode forward + gradient (jax.eval_shape): shapes, dtypes and
    differentiability of every registered model at its minimum input, without compiling."""
    model = create_model(name)
    shape = min_shape(name)
    variables = init_shapes(model, shape)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    loss, logits, grads, new_state = jax.eval_shape(
        functools.partial(_train_apply, model), variables, x, key(10)
    )
    assert loss.shape == () and logits.shape == (shape[0], model.num_classes)
    assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == jax.tree.map(
        lambda p: (p.shape, p.dtype), variables["params"]
    )
    assert set(new_state) == ({"batch_stats"} if name in BN_MODELS else set())


# Concretely under jit in the default suite: every model but the VGGs (100M+ parameters, ~10 s
# each to draw and differentiate on 2 CPU cores; their code runs in the default suite through
# test_batchnorm_uses_axis_name_for_cross_device_statistics's BN VGG and test_fcn's VGG-16
# dropout test; the reduced-width VGG-11 step below is -m slow), the GoogLeNets (~60
# convolutions: XLA's CPU compile of their init and gradient takes ~30 s) and the ImageNet NiN
# (breadth: nin_cifar runs the same NiN/NiNStage/MLPConv code, max and average pools and
# dropout, in the default suite). Those run with `-m slow`.
# Breadth kept to -m slow for CI time: zfnet is alexnet's layout with a 7x7/2 first conv,
# alexnet_2tower's grouped convolutions are tested in tests/layers, nin_cifar runs NiN.
# alexnet too (~12 s, most of it drawing its 61 M parameters; its fc6/fc7 are 58 M of them): the
# default suite runs its layers, dropout included, forward and backward under jit at this 63x63
# minimum in tests/train/test_freeze_eval.py::test_backbone_dropout_is_off_only_in_backbone_eval
# (same convolutions, fc6/fc7 32 wide: dropout on/off by key, a train step), at full width
# forward under jit in test_torchvision_weights.py::test_logits_match_torchvision[alexnet-224-224]
# and its full-width gradient traced in test_forward_backward_traces_for_every_model[alexnet].
_SLOW_AT_MIN_SIZE = ({n for n in CLASSIC if n.startswith("vgg")}
                     | {"googlenet", "googlenet_bn", "nin", "zfnet", "alexnet_2tower", "alexnet"})
MIN_SIZE_CASES = [
    pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_AT_MIN_SIZE else n for n in CLASSIC
]


@jax.jit
def _finite_leaves_and_norm(grads):
    """`([all finite?] per leaf, global norm)` of `grads` in one compiled program (eager
    `jnp.isfinite` / `optax.tree.norm` compiled a kernel per leaf shape: seconds on big nets)."""
    return [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)], optax.tree.norm(grads)


def _check_forward_backward(model, shape, has_dropout: bool, has_bn: bool) -> None:
    """Init + train step under jit: shapes, finite non-zero grads, dropout RNG use, BN updates."""
    x = jax.random.normal(jax.random.key(3), shape)
    variables = jax.jit(model.init)({"params": key(0)}, x)
    train = jax.jit(functools.partial(_train_apply, model))
    loss, logits, grads, new_state = train(variables, x, key(10))

    assert logits.shape == (shape[0], model.num_classes) and logits.dtype == jnp.float32
    assert np.isfinite(float(loss))
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
    finite, norm = _finite_leaves_and_norm(grads)
    assert len(finite) == len(jax.tree.leaves(grads)) and all(bool(f) for f in finite)
    assert float(norm) > 0

    # Eval mode needs no dropout RNG (tracing would fail if a Dropout were active); train mode
    # draws its dropout masks from the "dropout" stream: same key, same output; new key, new one.
    eval_logits = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert eval_logits.shape == logits.shape
    _, logits_same, _, _ = train(variables, x, key(10))
    _, logits_other, _, _ = train(variables, x, key(11))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits_same))
    assert has_dropout == (not np.array_equal(np.asarray(logits), np.asarray(logits_other)))

    if has_bn:  # train mode returns updated running statistics
        old = jax.tree.leaves(variables["batch_stats"])
        new = jax.tree.leaves(new_state["batch_stats"])
        assert len(old) == len(new) > 0
        assert all(not np.allclose(o, n) for o, n in zip(old, new, strict=True))
    else:
        assert "batch_stats" not in variables


@pytest.mark.parametrize("name", MIN_SIZE_CASES)
def test_forward_backward_jit_at_min_input_size(name):
    model = create_model(name)
    _check_forward_backward(model, min_shape(name), name != "lenet5", name in BN_MODELS)


# Under -m slow (CI time). test_forward_backward_traces_for_every_model[vgg11, vgg11_bn] trace
# both; test_batchnorm_uses_axis_name_for_cross_device_statistics runs a BN VGG and test_fcn's
# dropout test VGG-16 (its convolution and pooling stages).
@pytest.mark.slow
@pytest.mark.parametrize("batch_norm", [False, True])
def test_forward_backward_jit_reduced_width_vgg11(batch_norm):
    """VGG-11's layout with 1/16 of the conv widths and 64-wide fc6/fc7, at CIFAR size."""
    stages = tuple(tuple(c // 16 for c in block) for block in VGG_CONFIGS[11])
    model = VGG(stages=stages, batch_norm=batch_norm, hidden_features=64, num_classes=10)
    _check_forward_backward(model, (2, 32, 32, 3), has_dropout=True, has_bn=batch_norm)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIC)
def test_forward_backward_jit_at_native_size(name):
    model = create_model(name)
    shape = native_shape(name, batch=2)
    x = jax.random.normal(jax.random.key(3), shape)
    variables = jax.jit(model.init)({"params": key(0)}, x)
    loss, logits, grads, _ = jax.jit(functools.partial(_train_apply, model))(variables, x, key(10))
    assert logits.shape == (2, model.num_classes)
    assert np.isfinite(float(loss))
    assert all(bool(f) for f in _finite_leaves_and_norm(grads)[0])


def test_batchnorm_uses_axis_name_for_cross_device_statistics():
    model = VGG(
        stages=((4,),),
        batch_norm=True,
        hidden_features=8,
        num_classes=3,
        axis_name="devices",
        pool_size=None,
        dropout_rate=0.0,
    )
    scale = jnp.array([1.0, 5.0]).reshape(2, 1, 1, 1, 1)  # the two "devices" see different data
    x = jax.random.normal(jax.random.key(6), (2, 3, 4, 4, 3)) * scale
    variables = jinit(model, x[0])

    def step(xs):
        _, state = model.apply(variables, xs, train=True, mutable=["batch_stats"])
        return state["batch_stats"]

    stats = jax.jit(jax.vmap(step, axis_name="devices"))(x)
    mean = stats["features"]["bn1_1"]["mean"]  # [devices, channels]
    np.testing.assert_allclose(np.asarray(mean[0]), np.asarray(mean[1]), rtol=1e-6)
    # Without the axis name each "device" keeps its own (different) statistics.
    local = VGG(
        stages=((4,),),
        batch_norm=True,
        hidden_features=8,
        num_classes=3,
        pool_size=None,
        dropout_rate=0.0,
    )
    stats = jax.jit(
        jax.vmap(
            lambda xs: local.apply(variables, xs, train=True, mutable=["batch_stats"])[1][
                "batch_stats"
            ]
        )
    )(x)
    assert not np.allclose(
        np.asarray(stats["features"]["bn1_1"]["mean"][0]),
        np.asarray(stats["features"]["bn1_1"]["mean"][1]),
    )


# The models that flatten a map for their fully connected layers (the rest pool globally); the
# GoogLeNets flatten in their auxiliary heads, which run in training with aux_logits=True.
FLATTENING = [("lenet5", {}), ("alexnet", {}), ("alexnet_2tower", {}), ("zfnet", {}),
              ("vgg11_bn", {}), ("googlenet", {"aux_logits": True}),
              ("googlenet_bn", {"aux_logits": True})]


@pytest.mark.parametrize("name, kwargs", FLATTENING, ids=[n for n, _ in FLATTENING])
def test_a_batch_of_no_images_gives_no_rows_of_logits(name, kwargs):
    """`x.reshape(0, -1)` is ambiguous: these models failed on an empty batch with a
    ZeroDivisionError from inside JAX, where the globally pooled ones return `(0, classes)`.
    Training on it is refused (BatchNorm wrote NaN statistics; tests/models/test_registry.py)."""
    model = create_model(name, num_classes=3, **kwargs)
    size = max(model_info(name).min_input_size, AUX_MIN_INPUT_SIZE if kwargs else 0)
    x = jax.ShapeDtypeStruct((0, size, size, model_info(name).input_shape[2]), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(RNGS, x), x)
    outputs = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert outputs.shape == (0, 3)
    with pytest.raises(ValueError, match="train=True is invalid; a batch of 0 images"):
        model.apply(variables, x, train=True, rngs={"dropout": key(1)}, mutable=["batch_stats"])


# ------------------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("name", CLASSIC)
def test_bfloat16_activations_float32_params(name):
    model = create_model(name, dtype=jnp.bfloat16)
    shape = min_shape(name, batch=1)
    variables = init_shapes(model, shape)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    logits, features = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros(shape), return_features=True), variables
    )
    assert logits.dtype == jnp.float32  # logits are returned in float32 for the loss
    assert {k: v.dtype for k, v in features.items()} == {k: jnp.bfloat16 for k in features}


# ------------------------------------------------------------------------------------ LeNet-5
def test_lenet5_overfits_a_tiny_batch():
    """300 Adam steps on 16 images take the loss from chance to < 0.05 and every image to its
    label."""
    model = create_model("lenet5")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 32, 32, 1)), jnp.float32)
    y = jnp.arange(16) % 10
    params = jax.jit(model.init)(key(0), x)["params"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    first = None
    for _ in range(300):
        params, opt_state, loss = step(params, opt_state)
        first = float(loss) if first is None else first
    assert first > 2.0  # chance level is ln(10) = 2.3
    assert float(loss) < 0.05
    predictions = np.argmax(np.asarray(japply(model, {"params": params}, x)), -1)
    np.testing.assert_array_equal(predictions, np.asarray(y))


# Table I of LeCun et al. 1998, rows = S2 maps 0-5, columns = C3 maps 0-15 ("X" = connected).
TABLE_I = """
X...XXX..XXXX.XX
XX...XXX..XXXX.X
XXX...XXX..X.XXX
.XXX..XXXX..X.XX
..XXX..XXXX.XX.X
...XXX..XXXX.XXX
"""


def test_lenet5_c3_connection_table_matches_paper():
    table = np.array([[c == "X" for c in row] for row in TABLE_I.split()], dtype=bool)
    derived = np.zeros((6, 16), bool)
    for j, inputs in enumerate(C3_CONNECTIONS):
        derived[list(inputs), j] = True
    np.testing.assert_array_equal(derived, table)
    assert derived.sum() == 60

    model = LeNet5(c3_table="paper", subsampling="trainable")
    x = jax.random.normal(jax.random.key(7), (2, 32, 32, 1))
    variables = jinit(model, x)
    params = variables["params"]
    # Paper II.B: S2 has 12 trainable parameters, C3 1,516 (60 connections x 25 + 16 biases),
    # S4 32. The C3 kernel is stored in full (6 x 16 x 25) but the 900 masked entries are inert.
    assert int(table.sum()) * 25 + params["c3"]["bias"].size == 1516
    assert params["c3"]["kernel"].shape == (5, 5, 6, 16)
    assert params["s2"]["coef"].size + params["s2"]["bias"].size == 12
    assert params["s4"]["coef"].size + params["s4"]["bias"].size == 32

    # Masked entries get zero gradient; connected ones do not.
    def loss(p):
        return jnp.sum(model.apply({"params": p}, x) ** 2)

    grad = np.asarray(jax.jit(jax.grad(loss))(params)["c3"]["kernel"])  # [5, 5, 6, 16]
    touched = np.abs(grad).sum(axis=(0, 1)) > 0
    np.testing.assert_array_equal(touched, table)


def test_connection_table_conv_ignores_unconnected_inputs():
    layer = ConnectionTableConv(C3_CONNECTIONS, 5)
    x = np.asarray(jax.random.normal(jax.random.key(8), (2, 14, 14, 6)))
    bumped = x.copy()
    bumped[..., 0] += 10.0  # S2 map 0 feeds C3 maps 0, 4, 5, 6, 9-12, 14, 15 only
    variables, out = jrun(layer, x)
    out2 = japply(layer, variables, bumped)
    assert out.shape == (2, 10, 10, 16)
    changed = np.abs(np.asarray(out2 - out)).max(axis=(0, 1, 2)) > 1e-6
    np.testing.assert_array_equal(changed, [c == "X" for c in TABLE_I.split()[0]])


class _LecunKernel(nn.Module):
    """Only a `kernel` parameter drawn by flax's LeCun-normal, at ConnectionTableConv's path."""

    @nn.compact
    def __call__(self, x):
        return self.param("kernel", nn.initializers.lecun_normal(), (5, 5, 6, 16), jnp.float32)


def test_connection_table_conv_init_uses_each_maps_own_fan_in():
    """Over 400 seeds, each C3 map's connected kernel entries have std sqrt(1 / (25 * inputs))
    (fan-in 75, 100 or 150; within 3%, ~7 standard errors); a full table keeps flax's draws."""
    layer = ConnectionTableConv(C3_CONNECTIONS, 5)
    x = jnp.zeros((1, 14, 14, 6))
    keys = jax.random.split(jax.random.key(11), 400)
    kernels = np.asarray(jax.jit(jax.vmap(lambda k: layer.init(k, x)["params"]["kernel"]))(keys))
    for j, inputs in enumerate(C3_CONNECTIONS):
        std = kernels[..., list(inputs), j].std()
        assert abs(std * np.sqrt(25 * len(inputs)) - 1) < 0.03, (j, std)
    full = ConnectionTableConv((tuple(range(6)),) * 16, 5)
    key = jax.random.key(12)
    np.testing.assert_array_equal(np.asarray(full.init(key, x)["params"]["kernel"]),
                                  np.asarray(_LecunKernel().init(key, x)["params"]["kernel"]))


def test_lenet5_trainable_subsampling_matches_numpy():
    model = LeNet5(subsampling="trainable", activation="relu")
    x = jax.random.normal(jax.random.key(9), (2, 32, 32, 1))
    variables = jinit(model, x)
    params = jax.tree.map(np.asarray, variables["params"])
    params["s2"]["coef"] = np.linspace(-1.0, 1.0, 6).astype(np.float32)
    params["s2"]["bias"] = np.linspace(0.5, -0.5, 6).astype(np.float32)
    _, feats = japply(model, {"params": params}, x, return_features=True)
    c1 = np.asarray(feats["c1"], np.float64)  # [2, 28, 28, 6]
    sums = c1.reshape(2, 14, 2, 14, 2, 6).sum(axis=(2, 4))
    expected = np.maximum(sums * params["s2"]["coef"] + params["s2"]["bias"], 0.0)
    np.testing.assert_allclose(np.asarray(feats["s2"]), expected, rtol=1e-5, atol=1e-5)


def test_lenet5_activations():
    a = np.linspace(-6.0, 6.0, 101)
    np.testing.assert_allclose(
        np.asarray(scaled_tanh(jnp.asarray(a, jnp.float32))),
        1.7159 * np.tanh(2.0 / 3.0 * a),
        rtol=1e-6,
        atol=1e-6,
    )
    x = jax.random.normal(jax.random.key(10), (1, 32, 32, 1)) * 3
    _, (_, feats) = jrun(LeNet5(activation="scaled_tanh"), x, return_features=True)
    assert 1.0 < float(jnp.max(jnp.abs(feats["c1"]))) <= 1.7159  # beyond tanh's range
    _, (_, feats) = jrun(LeNet5(activation="relu"), x, return_features=True)
    assert float(jnp.min(feats["c1"])) == 0.0 and float(jnp.max(feats["c1"])) > 0.0


# ---------------------------------------------------------------------------------- GoogLeNet
def test_inception_module_concatenates_its_branches():
    module = Inception(*INCEPTION_V1["3a"])
    variables = init_shapes(module, (1, 28, 28, 192))
    out = jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, 28, 28, 192))), variables)
    assert out.shape == (1, 28, 28, 64 + 128 + 32 + 32)
    assert n_params(variables) == inception_count(192, INCEPTION_V1["3a"])
    assert set(variables["params"]) == {
        "branch1x1",
        "branch3x3_reduce",
        "branch3x3",
        "branch5x5_reduce",
        "branch5x5",
        "pool_proj",
    }


def _conv_relu_reference(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray,
                         pad: int) -> np.ndarray:
    """float64 stride-1 convolution of `[H, W, C]` `x` with an HWIO `kernel` (square, `pad`
    zeros each side), then the bias and a ReLU."""
    k = kernel.shape[0]
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    h, w = xp.shape[0] - k + 1, xp.shape[1] - k + 1
    out = sum(xp[i:i + h, j:j + w] @ kernel[i, j] for i in range(k) for j in range(k))
    return np.maximum(out + bias, 0.0)


def test_inception_module_equals_a_float64_reference():
    """Branch order 1x1, 3x3, 5x5, pool-proj (Figure 2b); the pool-proj branch is a 3x3/1 max
    pool (padding 1, -inf) then a 1x1 conv. Distinct widths show a swapped concat order."""
    module = Inception(4, 3, 5, 2, 6, 7)
    x = jax.random.normal(key(0), (1, 7, 7, 8))
    params = jinit(module, x)["params"]
    got = np.asarray(japply(module, {"params": params}, x))[0]
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xn = np.asarray(x[0], np.float64)

    def conv(name: str, inp: np.ndarray, pad: int = 0) -> np.ndarray:
        return _conv_relu_reference(inp, p[name]["kernel"], p[name]["bias"], pad)

    pooled = pool_reference(xn[None], (3, 3), (1, 1), (1, 1), False, "max")[0]
    want = np.concatenate([conv("branch1x1", xn),
                           conv("branch3x3", conv("branch3x3_reduce", xn), 1),
                           conv("branch5x5", conv("branch5x5_reduce", xn), 2),
                           conv("pool_proj", pooled)], axis=-1)
    assert got.shape == want.shape == (7, 7, 4 + 5 + 6 + 7)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 rounding: ~1e-6


def test_googlenet_aux_outputs_only_in_training():
    """With aux heads, training returns the main and both aux logits (with features too); eval,
    and training without aux heads, a plain array of logits."""
    model = create_model("googlenet", aux_logits=True, num_classes=5)
    shape = (2, 224, 224, 3)
    x = jnp.zeros(shape)
    # init's own forward pass is `model.apply(variables, x)`'s: eval mode (one trace less).
    eval_out, variables = jax.eval_shape(lambda: model.init_with_output(RNGS, x))
    assert eval_out.shape == (2, 5)  # eval: main logits only
    out = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, rngs={"dropout": key(0)}), variables
    )
    assert isinstance(out, GoogLeNetOutputs)
    assert [o.shape for o in out] == [(2, 5)] * 3
    out, features = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, return_features=True, rngs={"dropout": key(0)}),
        variables,
    )
    assert isinstance(out, GoogLeNetOutputs) and "pre_logits" in features
    # Without aux heads, training returns a plain array.
    plain = create_model("googlenet", num_classes=5)
    out = jax.eval_shape(
        lambda v: plain.apply(v, x, train=True, rngs={"dropout": key(0)}),
        init_shapes(plain, shape),
    )
    assert out.shape == (2, 5)


def _check_caffe_xavier(params) -> None:
    """Every kernel in `params` is Caffe's "xavier" draw: within +-sqrt(3 / fan_in), variance
    1 / fan_in (to 15% on the large ones)."""
    for path, kernel in jax.tree_util.tree_leaves_with_path(params):
        if path[-1].key != "kernel":
            continue
        kernel = np.asarray(kernel)
        fan_in = int(np.prod(kernel.shape[:-1]))
        assert np.abs(kernel).max() <= np.sqrt(3 / fan_in) * (1 + 1e-6), path
        if kernel.size >= 2000:
            np.testing.assert_allclose(kernel.var() * fan_in, 1.0, rtol=0.15, err_msg=str(path))


def test_googlenet_init_is_caffes_xavier_and_does_not_amplify():
    """The reference Caffe GoogLeNet's init (xavier: uniform, variance 1 / fan_in) for every
    conv and dense kernel; He fan-out (2 / fan_out) made the 192 -> 16 reduce convolutions
    amplify the signal (logits O(100) at init, SGD diverged). Without BatchNorm, an inception
    module fed unit-variance input must keep its output RMS below 1."""
    module = Inception(*INCEPTION_V1["4a"])
    x = jax.random.normal(key(2), (2, 14, 14, 480))
    variables, y = jrun(module, x)
    _check_caffe_xavier(variables["params"])
    assert float(jnp.sqrt(jnp.mean(jnp.square(y)))) < 1.0
    aux = InceptionAux(10)
    aux_vars, _ = jrun(aux, jax.random.normal(key(3), (2, 14, 14, 512)))
    _check_caffe_xavier(aux_vars["params"])
    assert set(aux_vars["params"]) == {"conv", "fc", "head"}
    _check_caffe_biases(variables["params"])
    _check_caffe_biases(aux_vars["params"])


def _check_caffe_biases(params) -> None:
    """bvlc_googlenet's `bias_filler`: constant 0.2 on convolutions and the aux `fc`, 0 on the
    classifiers (`head`)."""
    biases = {jax.tree_util.keystr(path): np.asarray(b) for path, b in
              jax.tree_util.tree_flatten_with_path(params)[0] if path[-1].key == "bias"}
    assert biases
    for name, bias in biases.items():
        np.testing.assert_array_equal(bias, 0.0 if "'head'" in name else np.float32(0.2), name)


@pytest.mark.slow  # ~40 s of XLA compilation (init + gradient of ~60 convolutions) on 2 CPUs
def test_googlenet_starts_at_chance_and_sgd_decreases_the_loss():
    """At init the cross-entropy on unit-variance input is about ln(num_classes) (He fan-out init:
    420 at 224x224, ln 1000 = 6.9) and SGD(0.01, momentum 0.9) on a fixed batch lowers it, finite
    (it went 316 -> 1.9e9 -> NaN). Caffe's 0.2 biases keep the signal through the stack: the
    pooled features' std at init is 0.23 here (0.01 with zero biases)."""
    model = create_model("googlenet", num_classes=10)
    x = jax.random.normal(key(4), min_shape("googlenet", batch=4))
    labels = jnp.arange(4) % 10
    params = jinit(model, x)["params"]
    _, features = jax.jit(lambda p: model.apply({"params": p}, x, return_features=True))(params)
    assert float(jnp.std(features["pre_logits"])) > 0.1
    tx = optax.sgd(0.01, momentum=0.9)

    @jax.jit
    def run(params):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key(5)})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        def step(carry, _):
            p, opt = carry
            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, opt = tx.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), loss

        _, losses = jax.lax.scan(step, (params, tx.init(params)), None, length=6)
        return losses

    losses = np.asarray(run(params))
    assert np.all(np.isfinite(losses)), losses
    assert abs(losses[0] - np.log(10)) < 0.15, losses  # 2.36 at init; logits' std is ~0.3
    assert losses[-1] < losses[0], losses
    _check_caffe_xavier(params)
    _check_caffe_biases(params)


def test_googlenet_aux_heads_need_79_pixels():
    """The registered min_input_size (47) is without aux heads; with them the documented
    AUX_MIN_INPUT_SIZE (79) holds, and the engine's input-size check refuses less, naming aux1."""
    assert model_info("googlenet").min_input_size == 47 and AUX_MIN_INPUT_SIZE == 79
    assert "79x79" in GoogLeNet.__doc__ + googlenet.__doc__ + googlenet_module_doc
    model = create_model("googlenet", aux_logits=True)
    check_input_size(model, "googlenet", (79, 79, 3), 47)
    check_input_size(create_model("googlenet"), "googlenet", (47, 47, 3), 47)
    with pytest.raises(ValueError, match=r"^googlenet: input resolution='78x78' is invalid; too "
                                         r"small: layer aux1 \(InceptionAux\) fails"):
        check_input_size(model, "googlenet", (78, 78, 3), 47)
    assert init_shapes(model, (1, 79, 79, 3))["params"]["aux1"]["fc"]["kernel"].shape == (128, 1024)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "InceptionAux: input.shape=(1, 4, 4, 512) is invalid; expected a map of at least 5x5"
        ),
    ):
        init_shapes(model, (1, 78, 78, 3))


def test_googlenet_bn_has_torchvisions_layout():
    """Conv + BN (no bias) everywhere, 3x3 kernels in the "5x5" branch, the paper model's
    module names; torchvision's counts with and without aux heads (13,004,888 with)."""
    variables = init_shapes(create_model("googlenet_bn"), (1, 224, 224, 3))
    params = variables["params"]
    paper = init_shapes(create_model("googlenet"), (1, 224, 224, 3))["params"]
    assert set(params) == set(paper)  # conv1, conv2_reduce, conv2, inception3a .. 5b, head
    assert params["conv1"]["conv"]["kernel"].shape == (7, 7, 3, 64)
    assert set(params["conv1"]["conv"]) == {"kernel"}  # no conv bias: BatchNorm follows
    assert set(params["inception3a"]) == set(paper["inception3a"])
    assert params["inception3a"]["branch5x5"]["conv"]["kernel"].shape == (3, 3, 16, 32)
    assert paper["inception3a"]["branch5x5"]["kernel"].shape == (5, 5, 16, 32)
    convs = [k for k in flatten_keys(params) if k[-1] == "kernel" and k[-2] == "conv"]
    assert len(convs) == 3 + 6 * len(INCEPTION_V1)
    assert len(flatten_keys(variables["batch_stats"])) == 2 * len(convs)  # mean, var per BN
    aux = init_shapes(create_model("googlenet_bn", aux_logits=True), (1, 224, 224, 3))
    assert n_params(aux) == 13_004_888
    assert aux["params"]["aux1"]["fc"]["kernel"].shape == (4 * 4 * 128, 1024)


def flatten_keys(tree) -> list[tuple[str, ...]]:
    return [tuple(getattr(k, "key", k) for k in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_basic_conv2d_uses_batchnorm_epsilon_1e_3():
    x = jax.random.normal(key(4), (2, 5, 5, 3))
    variables, y = jrun(BasicConv2d(4, 3, padding=1), x)
    kernel = np.asarray(variables["params"]["conv"]["kernel"], np.float64)
    conv = jax.lax.conv_general_dilated(
        np.asarray(x, np.float64), kernel, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # Eval mode at init: running mean 0, var 1, scale 1, bias 0.
    np.testing.assert_allclose(np.asarray(y), np.maximum(np.asarray(conv), 0)
                               / np.sqrt(1 + BN_EPSILON), rtol=1e-5, atol=1e-6)
    assert BN_EPSILON == 1e-3


def test_googlenet_bn_transform_input_rescales_imagenet_normalized_input():
    from cnnjax.data.presets import IMAGENET_MEAN as PRESET_MEAN
    from cnnjax.data.presets import IMAGENET_STD as PRESET_STD

    assert (IMAGENET_MEAN, IMAGENET_STD) == (PRESET_MEAN, PRESET_STD)
    pixels = np.random.default_rng(0).uniform(size=(2, 4, 4, 3))  # RGB in [0, 1]
    normalized = (pixels - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    got = transform_imagenet_input(jnp.asarray(normalized, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), (pixels - 0.5) / 0.5, rtol=1e-5, atol=1e-5)
    transformed = create_model("googlenet_bn", transform_input=True)
    with pytest.raises(ValueError, match=re.escape(
            "GoogLeNetBN: input.shape=(1, 31, 31, 1) is invalid; expected 3 (RGB) channels")):
        init_shapes(transformed, (1, 31, 31, 1))


@pytest.mark.slow  # ~8 s of XLA compilation; test_torchvision_weights checks it against torch
def test_googlenet_bn_transform_input_only_rescales_the_input():
    plain = create_model("googlenet_bn", num_classes=3)
    transformed = create_model("googlenet_bn", num_classes=3, transform_input=True)

    @jax.jit
    def both(x):  # one compilation
        variables = plain.init(RNGS, x)
        return (transformed.apply(variables, x),
                plain.apply(variables, transform_imagenet_input(x)))

    got, want = both(jax.random.normal(key(5), (2, 31, 31, 3)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_googlenet_bn_aux_outputs_only_in_training():
    """As googlenet's; torchvision's adaptive 4x4 aux pool also works on the 2x2 inception-4
    maps of the smallest input (31x31)."""
    model = create_model("googlenet_bn", aux_logits=True, num_classes=5)
    for shape in ((2, 224, 224, 3), min_shape("googlenet_bn")):
        x = jnp.zeros(shape)
        # init's own forward pass is `model.apply(variables, x)`'s: eval mode (one trace less).
        out, variables = jax.eval_shape(lambda x=x: model.init_with_output(RNGS, x))
        assert out.shape == (2, 5)  # eval: main logits only
        out, state = jax.eval_shape(
            lambda v, x=x: model.apply(v, x, train=True, rngs={"dropout": key(0)},
                                       mutable=["batch_stats"]), variables)
        assert isinstance(out, GoogLeNetOutputs) and [o.shape for o in out] == [(2, 5)] * 3
        assert {"aux1", "aux2"} <= set(state["batch_stats"])


# ---------------------------------------------------------------------------------------- NiN
def test_mlpconv_block_layers():
    block = MLPConv((96, 80, 64), kernel_size=5, padding=2)
    variables = init_shapes(block, (1, 16, 16, 3))
    assert jax.tree.map(lambda x: x.shape, variables["params"]) == {
        "conv": {"kernel": (5, 5, 3, 96), "bias": (96,)},
        "cccp1": {"kernel": (1, 1, 96, 80), "bias": (80,)},
        "cccp2": {"kernel": (1, 1, 80, 64), "bias": (64,)},
    }
    out = jax.eval_shape(lambda v: block.apply(v, jnp.zeros((1, 16, 16, 3))), variables)
    assert out.shape == (1, 16, 16, 64)


def test_nin_logits_are_global_average_of_class_maps():
    for relu_logits in (True, False):
        model = NiN(
            stages=(NiNStage((8, 8), 3, padding=1),), num_classes=4, relu_logits=relu_logits
        )
        x = jax.random.normal(jax.random.key(12), (2, 6, 6, 3))
        variables, (logits, inter) = jrun(
            model, x, capture_intermediates=True, mutable=["intermediates"]
        )
        maps = np.asarray(inter["intermediates"]["head"]["__call__"][0], np.float64)
        maps = np.maximum(maps, 0) if relu_logits else maps
        np.testing.assert_allclose(np.asarray(logits), maps.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
        assert variables["params"]["head"]["kernel"].shape == (1, 1, 8, 4)


def test_nin_max_pool_stage_is_a_3x3_stride_2_ceil_mode_max_pool():
    """A `pool="max"` stage max-pools its MLPConv output 3x3/2 in ceil mode (Caffe's NiN): on an
    8x8 map the last window hangs over the edge (8 -> 4, floor mode gives 3)."""
    net = NiN(stages=(NiNStage((4, 4), 3, padding=1, pool="max"),), num_classes=3)
    x = jax.random.normal(key(0), (1, 8, 8, 2))
    variables = jinit(net, x)
    _, features = japply(net, variables, x, return_features=True)
    block = MLPConv((4, 4), 3, 1, 1)
    y = np.asarray(japply(block, {"params": variables["params"]["block1"]}, x), np.float64)[0]
    want = pool_reference(y[None], (3, 3), (2, 2), (0, 0), True, "max")[0]  # ceil: 4 windows
    got = np.asarray(features["block1"][0])
    assert got.shape == want.shape == (4, 4, 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 rounding: ~1e-6


# -------------------------------------------------------------------------- errors and inputs
def test_create_model_unknown_name_lists_close_matches():
    with pytest.raises(
        ValueError, match=re.escape("create_model: unknown model name='vgg61'; did you mean [")
    ) as err:
        create_model("vgg61")
    assert "'vgg16'" in str(err.value)
    with pytest.raises(ValueError, match="did you mean") as err:
        create_model("alexnet_2towers")
    assert "'alexnet_2tower'" in str(err.value)
    # Every valid name is listed too, close matches or not.
    assert f"valid names: {sorted(list_models(task=None))}" in str(err.value)
    with pytest.raises(ValueError, match=re.escape("name='zzz'; valid names: [")):
        create_model("zzz")


STAGES = ((64,), (128,))
INVALID = [
    (lambda: VGG(stages=()), "VGG: stages=() is invalid; expected a non-empty sequence"),
    (lambda: VGG(stages=((64, 0),)), "VGG: stages=((64, 0),) is invalid"),
    (lambda: VGGFeatures(stages=(64,)), "VGGFeatures: stages=(64,) is invalid"),
    (
        lambda: VGG(stages=STAGES, num_classes=0),
        "VGG: num_classes=0 is invalid; expected a positive integer",
    ),
    (
        lambda: VGG(stages=STAGES, dropout_rate=1.0),
        "VGG: dropout_rate=1.0 is invalid; expected a number in [0, 1)",
    ),
    (lambda: VGG(stages=STAGES, hidden_features=-1), "VGG: hidden_features=-1 is invalid"),
    (lambda: VGG(stages=STAGES, pool_size=0), "VGG: pool_size=0 is invalid"),
    (lambda: VGG(stages=STAGES, kernel_sizes=((3,), (2,))),
     "VGG: kernel_sizes=((3,), (2,)) is invalid; expected None or, like stages, 2 sequences of "
     "(1, 1) positive odd ints (one kernel size per convolution)"),
    (lambda: VGG(stages=STAGES, kernel_sizes=((3,),)), "VGG: kernel_sizes=((3,),) is invalid"),
    (lambda: VGGFeatures(stages=STAGES, kernel_sizes=3), "VGGFeatures: kernel_sizes=3 is invalid"),
    (lambda: VGG(stages=STAGES, lrn="True"),
     "VGG: lrn='True' is invalid; expected True or False"),
    (lambda: create_model("vgg16", kernel_sizes=VGG_C_KERNEL_SIZES),
     "create_model: kernel_sizes=((3, 3), (3, 3), (3, 3, 1), (3, 3, 1), (3, 3, 1)) is invalid; "
     "model 'vgg16' does not take 'kernel_sizes'"),
    (lambda: create_model("vgg11", lrn=True),
     "create_model: lrn=True is invalid; model 'vgg11' does not take 'lrn'"),
    (lambda: create_model("vgg16", num_classes=2.5), "VGG: num_classes=2.5 is invalid"),
    (
        lambda: AlexNet(widths=(96, 256, 384, 384)),
        "AlexNet: widths=(96, 256, 384, 384) is invalid; expected five positive ints",
    ),
    (lambda: AlexNet(groups=(1, 2, 1, 2, 0)), "AlexNet: groups=(1, 2, 1, 2, 0) is invalid"),
    (lambda: AlexNet(widths=5), "AlexNet: widths=5 is invalid"),
    (lambda: AlexNet(num_classes=-3), "AlexNet: num_classes=-3 is invalid"),
    (lambda: AlexNet(dropout_rate=-0.1), "AlexNet: dropout_rate=-0.1 is invalid"),
    (lambda: AlexNet(hidden_features=0), "AlexNet: hidden_features=0 is invalid"),
    (lambda: AlexNet(pool_size=0), "AlexNet: pool_size=0 is invalid"),
    (lambda: AlexNet(lrn_groups=0), "AlexNet: lrn_groups=0 is invalid"),
    (
        lambda: AlexNet(lrn_groups=5),
        "AlexNet: lrn_groups=5 is invalid; expected a divisor of conv1's and conv2's widths 96 "
        "and 256",
    ),
    (
        lambda: AlexNet(lrn=False, lrn_groups=2),
        "AlexNet: lrn_groups=2 is invalid; expected 1 with lrn=False",
    ),
    (lambda: ZFNet(widths=(96, 256)), "ZFNet: widths=(96, 256) is invalid"),
    (lambda: ZFNet(num_classes=0), "ZFNet: num_classes=0 is invalid"),
    (lambda: ZFNet(dropout_rate=2), "ZFNet: dropout_rate=2 is invalid"),
    (lambda: ZFNet(hidden_features=0), "ZFNet: hidden_features=0 is invalid"),
    (
        lambda: LeNet5(activation="sigmoid"),
        "LeNet5: activation='sigmoid' is invalid; expected one of ['tanh', 'scaled_tanh', 'relu']",
    ),
    (
        lambda: LeNet5(subsampling="max"),
        "LeNet5: subsampling='max' is invalid; expected one of ['avg', 'trainable']",
    ),
    (
        lambda: LeNet5(c3_table="partial"),
        "LeNet5: c3_table='partial' is invalid; expected one of ['full', 'paper']",
    ),
    (lambda: LeNet5(num_classes=0), "LeNet5: num_classes=0 is invalid"),
    (
        lambda: MLPConv(features=(), kernel_size=3),
        "MLPConv: features=() is invalid; expected a non-empty sequence of positive ints",
    ),
    (lambda: MLPConv(features=(8, -1), kernel_size=3), "MLPConv: features=(8, -1) is invalid"),
    (lambda: NiN(stages=()), "NiN: stages=() is invalid; expected at least one NiNStage"),
    (
        lambda: NiN(stages=(NiNStage((8,), 3, pool="median"),)),
        "NiN: pool='median' is invalid; expected one of ['max', 'avg', 'none']",
    ),
    (lambda: NiN(num_classes=0), "NiN: num_classes=0 is invalid"),
    (lambda: NiN(dropout_rate=1.5), "NiN: dropout_rate=1.5 is invalid"),
    (lambda: GoogLeNet(num_classes=0), "GoogLeNet: num_classes=0 is invalid"),
    (lambda: GoogLeNet(dropout_rate=1), "GoogLeNet: dropout_rate=1 is invalid"),
    (
        lambda: GoogLeNet(aux_dropout_rate=True),
        "GoogLeNet: aux_dropout_rate=True is invalid; expected a number in [0, 1)",
    ),
    (
        lambda: Inception(64, 96, 128, 16, 32, 0),
        "Inception: pool_proj=0 is invalid; expected a positive integer",
    ),
    (lambda: GoogLeNetBN(num_classes=0), "GoogLeNetBN: num_classes=0 is invalid"),
    (lambda: GoogLeNetBN(dropout_rate=-0.2), "GoogLeNetBN: dropout_rate=-0.2 is invalid"),
    (
        lambda: GoogLeNetBN(aux_dropout_rate=1.0),
        "GoogLeNetBN: aux_dropout_rate=1.0 is invalid; expected a number in [0, 1)",
    ),
    (
        lambda: GoogLeNetBN(transform_input=1),
        "GoogLeNetBN: transform_input=1 is invalid; expected True or False",
    ),
    (
        lambda: GoogLeNetBN(aux_logits="yes"),
        "GoogLeNetBN: aux_logits='yes' is invalid; expected True or False",
    ),
    (
        lambda: GoogLeNet(aux_logits="False"),  # a config string is not silently truthy
        "GoogLeNet: aux_logits='False' is invalid; expected True or False",
    ),
    (
        lambda: InceptionBN(64, 96, 0, 16, 32, 32),
        "InceptionBN: features_3x3=0 is invalid; expected a positive integer",
    ),
]


@pytest.mark.parametrize("build, message", INVALID, ids=[m.split(" is")[0] for _, m in INVALID])
def test_invalid_hyperparameters_raise_before_tracing(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


NUMPY_SCALARS = [  # (model, field, NumPy value, the same value as a Python number)
    ("vgg16", "dropout_rate", np.float32(0.5), 0.5),
    ("vgg16_bn", "dropout_rate", np.float64(0.25), 0.25),
    ("alexnet", "dropout_rate", np.float32(0.5), 0.5),
    ("zfnet", "dropout_rate", np.float32(0.5), 0.5),
    ("nin", "dropout_rate", np.float32(0.5), 0.5),
    ("googlenet", "aux_dropout_rate", np.float32(0.7), 0.7),
    ("googlenet_bn", "dropout_rate", np.float32(0.2), 0.2),
    ("zfnet", "widths", tuple(np.array([8, 16, 16, 16, 8])), (8, 16, 16, 16, 8)),
]


@pytest.mark.parametrize("name, field, value, python", NUMPY_SCALARS,
                         ids=[f"{n}-{f}" for n, f, *_ in NUMPY_SCALARS])
def test_numpy_scalars_are_accepted_like_python_numbers(name, field, value, python):
    """A NumPy scalar (e.g. read from an array or a sweep) is the number it holds, as in the
    rest of the zoo (`check_number`, `check_positive_int`); it was refused as "not a number"."""
    model = create_model(name, **{field: value})
    reference = create_model(name, **{field: python})
    size = model_info(name).input_shape[0]
    shapes = [jax.tree_util.tree_map(lambda a: a.shape, init_shapes(m, (1, size, size, 3)))
              for m in (model, reference)]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("build, message", [
    (lambda: VGG(stages=STAGES, dropout_rate="0.5"), "VGG: dropout_rate='0.5' is invalid"),
    (lambda: VGG(stages=STAGES, dropout_rate=np.bool_(True)),
     "VGG: dropout_rate=np.True_ is invalid; expected a number in [0, 1)"),
    (lambda: GoogLeNet(aux_dropout_rate=np.float32(1.0)),
     "GoogLeNet: aux_dropout_rate=np.float32(1.0) is invalid; expected a number in [0, 1)"),
    (lambda: ZFNet(widths=(96, 256, 384, 384, np.bool_(True))), "ZFNet: widths=(96, 256"),
    (lambda: VGG(stages=((np.int64(8), True),)), "VGG: stages=((np.int64(8), True),) is invalid"),
])
def test_numpy_bools_strings_and_out_of_range_scalars_are_still_refused(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


@pytest.mark.parametrize("name", CLASSIC)
def test_non_nhwc_input_is_rejected(name):
    model = create_model(name)
    owner = type(model).__name__
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{owner}: input.shape=(32, 32, 3) is invalid; expected a rank-4 NHWC array"
        ),
    ):
        init_shapes(model, (32, 32, 3))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_models(task=None)
                                  if model_info(n).task != "detection"])
def test_registered_min_input_size_is_exact(name):
    """The engine refuses inputs below `min_input_size` (`check_input_size`, which names the
    layer whose output would vanish): every model must work at it and fail one pixel below, so
    e.g. resnet18 on 28x28 MNIST is not refused."""
    from cnnjax.train.checks import check_input_size

    info = model_info(name)
    size, channels = info.min_input_size, info.input_shape[2]
    model = create_model(name)
    check_input_size(model, name, (size, size, channels), 1)
    if size > 1:
        with pytest.raises(ValueError, match="is invalid"):
            check_input_size(model, name, (size - 1, size - 1, channels), 1)


def test_input_below_min_size_fails_in_python():
    for name in CLASSIC:
        info = model_info(name)
        small = info.min_input_size - 1
        with pytest.raises(ValueError, match="is invalid"):
            init_shapes(create_model(name), (1, small, small, info.input_shape[2]))


def _vgg_block_reference(x, params, name, train, stats=None):
    """Float64 conv3x3 (pad 1) + bias -> BatchNorm (batch statistics in training, else `stats`)
    -> ReLU, the order of the paper's successors and torchvision's `_bn` VGGs."""
    kernel = np.asarray(params[f"conv{name}"]["kernel"], np.float64)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    y = sum(np.einsum("nhwc,cf->nhwf", xp[:, i:i + h, j:j + w], kernel[i, j])
            for i in range(3) for j in range(3)) + np.asarray(params[f"conv{name}"]["bias"])
    if train:
        mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    else:
        mean, var = (np.asarray(stats[f"bn{name}"][k], np.float64) for k in ("mean", "var"))
    bn = params[f"bn{name}"]
    y = (y - mean) / np.sqrt(var + 1e-5) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
    return np.maximum(y, 0)


def _max_pool_2x2(x):
    n, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@pytest.mark.parametrize("train", [True, False])
def test_vgg_bn_block_is_conv_batchnorm_relu_pool_against_float64(train):
    """Each `_bn` block is conv -> BatchNorm -> ReLU, closed by a 2x2 max pool: checked on a
    two-block trunk with random BatchNorm scales (some negative, so BN after ReLU differs)
    and running statistics against a float64 NumPy forward, in training and in eval."""
    trunk = VGGFeatures(stages=((4, 5), (6,)), batch_norm=True)
    x = np.random.default_rng(0).standard_normal((3, 6, 6, 2))
    variables = trunk.init(key(0), jnp.asarray(x, jnp.float32))
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map_with_path(  # running variances positive, the rest any
        lambda path, leaf: jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape) if "var" in str(path)
                                       else rng.standard_normal(leaf.shape) * 0.5, jnp.float32),
        variables)
    params, stats = variables["params"], variables["batch_stats"]
    out = trunk.apply(variables, jnp.asarray(x, jnp.float32), train=train,
                      mutable=["batch_stats"] if train else False)
    out = out[0] if train else out
    params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    y = _vgg_block_reference(x.astype(np.float32).astype(np.float64), params64, "1_1", train, stats)
    y = _max_pool_2x2(_vgg_block_reference(y, params64, "1_2", train, stats))
    np.testing.assert_allclose(out["block1"], y, rtol=1e-4, atol=1e-5)
    y = _max_pool_2x2(_vgg_block_reference(y, params64, "2_1", train, stats))
    np.testing.assert_allclose(out["block2"], y, rtol=1e-4, atol=1e-5)
    assert out["block2"].shape == (3, 1, 1, 6)

"""Tests for the pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual
Networks") and the Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR, and their
pre-activation blocks."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from cnnjax.layers import DropPath
from cnnjax.models import create_model, list_models, model_info
from cnnjax.models.preact_resnet import (
    PreActBasicBlock,
    PreActBottleneckBlock,
    PreActResNet,
    preact_resnet_cifar,
    wide_resnet,
)
from cnnjax.models.resnet import batch_norm
from cnnjax.train.checks import check_input_size
from cnnjax.train.config import model_kwargs_config
from tests.models.cifar import (
    abstract_forward,
    assert_cifar_features,
    drop_path_rates,
    plain_and_stochastic_depth_outputs,
)

EPS = 1e-5  # BatchNorm epsilon (cnnjax.models.resnet.batch_norm)

#: name -> (depth, widening factor k (None: the pre-activation ResNets), bottleneck?, the paper's
#: printed parameter count, exact count at 10 classes).
MODELS = {
    "preact_resnet110_cifar": (110, None, False, "1.7M", 1_730_522),
    "preact_resnet164_cifar": (164, None, True, "1.7M", 1_703_258),
    "preact_resnet1001_cifar": (1001, None, True, "10.2M", 10_327_706),
    "wrn28_10_cifar": (28, 10, False, "36.5M", 36_479_194),
    "wrn16_8_cifar": (16, 8, False, "11.0M", 10_961_370),
    "wrn40_4_cifar": (40, 4, False, "8.9M", 8_949_210),
    "wrn16_4_cifar": (16, 4, False, "2.7M", 2_748_890),
}


def _paper_layout(depth: int, k: int | None, bottleneck: bool, num_classes: int = 10):
    """(weights, BatchNorm parameters, per-stage output channels) of the papers' CIFAR networks,
    in plain Python from their text: a 3x3 conv with 16 filters; three stages of n units (the
    first unit of stages 2 and 3 has stride 2) of widths 16/32/64 (WRN: 16k/32k/64k), each unit
    BN + 3x3 conv + BN + 3x3 conv (basic; depth 6n + 2, WRN 6n + 4) or BN + 1x1 conv to w +
    BN + 3x3 conv + BN + 1x1 conv to 4w (bottleneck, depth 9n + 2), plus a 1x1 projection conv
    where the channels or the stride change; a final BN and the linear classifier (weights and
    bias). No conv biases; BN has a scale and a bias per channel."""
    if k is not None:
        n, widths = (depth - 4) // 6, (16 * k, 32 * k, 64 * k)
        assert depth == 6 * n + 4
    else:
        n, widths = (depth - 2) // (9 if bottleneck else 6), (16, 32, 64)
        assert depth == (9 if bottleneck else 6) * n + 2
    c = 16
    weights, bn = 3 * 3 * 3 * c, 0
    stages = []
    for stage, w in enumerate(widths):
        out = 4 * w if bottleneck else w
        for unit in range(n):
            stride = 2 if stage > 0 and unit == 0 else 1
            if bottleneck:
                weights += c * w + 3 * 3 * w * w + w * out
                bn += 2 * c + 2 * w + 2 * w
            else:
                weights += 3 * 3 * c * out + 3 * 3 * out * out
                bn += 2 * c + 2 * out
            if stride != 1 or c != out:
                weights += c * out
            c = out
        stages.append(c)
    bn += 2 * c
    weights += c * num_classes + num_classes
    return weights, bn, stages


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", [
    # 1,001 layers take ~15 s to trace; ResNet-164 checks the same bottleneck layout
    pytest.param(name, marks=pytest.mark.slow) if name == "preact_resnet1001_cifar" else name
    for name in sorted(MODELS)])
def test_param_count_matches_paper_formula_and_printed_figures(name):
    depth, k, bottleneck, paper, exact = MODELS[name]
    weights, bn, stages = _paper_layout(depth, k, bottleneck)
    assert weights + bn == exact
    variables, logits, feats = abstract_forward(create_model(name))  # shapes only
    params = flatten_dict(variables["params"])
    assert _count(variables["params"]) == exact
    model_bn = sum(math.prod(v.shape) for p, v in params.items() if p[-2].startswith("bn"))
    assert model_bn == bn
    # The printed figures, to their precision: the papers' count matches the conv and classifier
    # weights; counting BatchNorm's scales and shifts too, only ResNet-1001 rounds differently
    # (10.33M: its 149,216 BN parameters are more than the printed precision).
    assert f"{weights / 1e6:.1f}M" == paper
    total = f"{exact / 1e6:.1f}M"
    assert total == ("10.3M" if name == "preact_resnet1001_cifar" else paper)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert_cifar_features(feats, 2, 16, stages)


def test_registry_entries_and_layouts():
    assert set(MODELS) <= set(list_models())
    assert list_models("wrn*") == sorted(n for n in MODELS if n.startswith("wrn"))
    for name in MODELS:
        info = model_info(name)
        assert (info.input_shape, info.num_classes, info.min_input_size) == ((32, 32, 3), 10, 1)
        assert info.paper.startswith("Zagoruyko" if name.startswith("wrn") else "He, Zhang")
    model = create_model("preact_resnet1001_cifar")
    assert (model.stage_sizes, model.widths, model.bottleneck) == ((111,) * 3, (16, 32, 64), True)
    assert model.out_widths == (64, 128, 256)
    assert (model.expansion, model.stride_in_1x1) == (None, None)  # the defaults: 4, True
    model = create_model("wrn28_10_cifar")
    assert (model.stage_sizes, model.widths, model.drop_rate) == ((4,) * 3, (160, 320, 640), 0.0)
    assert create_model("wrn28_10_cifar", drop_rate=0.3).drop_rate == 0.3
    assert create_model("preact_resnet110_cifar", num_classes=100).num_classes == 100


@pytest.mark.parametrize(
    ("name", "projected"),
    [
        # 16 -> 16 in stage 1 (identity), 16 -> 32 and 32 -> 64 with stride 2.
        ("preact_resnet110_cifar", {"stage2_block1": (16, 32), "stage3_block1": (32, 64)}),
        # The stem's 16 channels -> 64 in stage 1 already: projected at stride 1.
        ("preact_resnet164_cifar", {"stage1_block1": (16, 64), "stage2_block1": (64, 128),
                                    "stage3_block1": (128, 256)}),
        ("wrn16_4_cifar", {"stage1_block1": (16, 64), "stage2_block1": (64, 128),
                           "stage3_block1": (128, 256)}),
    ],
)
def test_projection_shortcuts_only_where_the_shape_changes(name, projected):
    variables, _, _ = abstract_forward(create_model(name), batch=1)
    params = variables["params"]
    found = {block: p["proj_conv"]["kernel"].shape for block, p in params.items()
             if isinstance(p, dict) and "proj_conv" in p}
    assert found == {block: (1, 1, cin, cout) for block, (cin, cout) in projected.items()}
    # No BN after the stem: the first block's pre-activation normalizes it; one final BN.
    assert {key for key in params if not key.startswith("stage")} == {
        "conv_init", "bn_final", "head"}


# --- The blocks are full pre-activation units: checked against NumPy float64 -----------------


def _np_conv(x, kernel, stride: int = 1, pad: int = 0):
    """Cross-correlation of NHWC `x` with an HWIO `kernel` (zero padding `pad`)."""
    kh, kw = kernel.shape[:2]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += x[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :] @ kernel[i, j]
    return out


def _np_bn_relu(x, params, stats):
    y = (x - stats["mean"]) / np.sqrt(stats["var"] + EPS) * params["scale"] + params["bias"]
    return np.maximum(y, 0)


def _random_variables(block, x, seed: int):
    """`block`'s variables with random values (positive variances), as float64 NumPy too."""
    shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in flatten_dict(shapes).items():
        if path[-1] == "var":
            value = rng.uniform(0.5, 2.0, leaf.shape)
        elif path[-1] == "scale":
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = rng.normal(0.0, 0.5, leaf.shape)
        flat[path] = value
    as64 = unflatten_dict(flat)
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), as64), as64


def _parts():
    return functools.partial(nn.Conv, use_bias=False), batch_norm(False, jnp.float32, None)


@pytest.mark.parametrize(("cin", "filters", "strides", "first"),
                         [(6, 6, 1, False), (6, 6, 1, True), (4, 6, 2, False), (4, 6, 1, True)])
def test_basic_block_is_bn_relu_conv_bn_relu_conv_plus_shortcut(cin, filters, strides, first):
    conv, norm = _parts()
    block = PreActBasicBlock(filters, conv=conv, norm=norm, strides=strides, first=first)
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, cin))
    variables, ref = _random_variables(block, x, seed=cin + strides)
    y = np.asarray(block.apply(variables, x), np.float64)

    p, s = ref["params"], ref["batch_stats"]
    x64 = np.asarray(x, np.float64)
    preact = _np_bn_relu(x64, p["bn1"], s["bn1"])
    h = _np_conv(preact, p["conv1"]["kernel"], strides, 1)
    h = _np_conv(_np_bn_relu(h, p["bn2"], s["bn2"]), p["conv2"]["kernel"], 1, 1)
    if cin == filters and strides == 1:
        assert "proj_conv" not in p
        # the raw input: nothing on the identity path, but the network's first block splits
        # after its BN-ReLU (He et al. 2016b, sec. 4.1)
        shortcut = preact if first else x64
    else:  # the projection takes the pre-activated input, as the papers' code does
        shortcut = _np_conv(preact, p["proj_conv"]["kernel"], strides, 0)
    assert y.shape == (2, 6 // strides, 6 // strides, filters)
    np.testing.assert_allclose(y, h + shortcut, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_bottleneck_block_matches_numpy(stride_in_1x1):
    conv, norm = _parts()
    block = PreActBottleneckBlock(3, conv=conv, norm=norm, strides=2, stride_in_1x1=stride_in_1x1)
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 5))
    variables, ref = _random_variables(block, x, seed=7)
    y = np.asarray(block.apply(variables, x), np.float64)

    p, s = ref["params"], ref["batch_stats"]
    preact = _np_bn_relu(np.asarray(x, np.float64), p["bn1"], s["bn1"])
    s1, s3 = (2, 1) if stride_in_1x1 else (1, 2)
    h = _np_conv(preact, p["conv1"]["kernel"], s1, 0)
    h = _np_conv(_np_bn_relu(h, p["bn2"], s["bn2"]), p["conv2"]["kernel"], s3, 1)
    h = _np_conv(_np_bn_relu(h, p["bn3"], s["bn3"]), p["conv3"]["kernel"], 1, 0)
    shortcut = _np_conv(preact, p["proj_conv"]["kernel"], 2, 0)
    assert y.shape == (2, 3, 3, 12)
    np.testing.assert_allclose(y, h + shortcut, rtol=1e-5, atol=1e-5)


def test_network_is_stem_conv_blocks_then_final_bn_relu_pool_head():
    """`stem` is the bare conv, each stage output is the un-normalized residual sum, and the head
    sees the mean of ReLU(BN(stage3))."""
    model = wide_resnet(10, 1, num_classes=3)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))

    @jax.jit
    def run(x):  # init and apply in one program: one compilation
        variables = model.init(jax.random.key(1), x)
        return variables, model.apply(variables, x, return_features=True)

    variables, (logits, feats) = run(x)
    stem = jax.lax.conv_general_dilated(x, variables["params"]["conv_init"]["kernel"], (1, 1),
                                        ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(feats["stem"], stem, rtol=1e-5, atol=1e-5)
    assert bool(jnp.any(feats["stage3"] < 0))  # no ReLU after the last addition
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables)
    final = _np_bn_relu(np.asarray(feats["stage3"], np.float64), p["params"]["bn_final"],
                        p["batch_stats"]["bn_final"])
    pooled = final.mean(axis=(1, 2))
    np.testing.assert_allclose(feats["pre_logits"], pooled, rtol=1e-5, atol=1e-5)
    head = p["params"]["head"]
    np.testing.assert_allclose(logits, pooled @ head["kernel"] + head["bias"], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("build", [
    # ResNet-110's and ResNet-164's blocks at depth 20 and 29 (3 units per stage, not 18): the
    # same classes, in 4-5 s instead of 16-23 s each
    lambda: preact_resnet_cifar(20, num_classes=3),
    lambda: preact_resnet_cifar(29, bottleneck=True, num_classes=3),
    lambda: create_model("wrn16_4_cifar", num_classes=3),
], ids=["basic", "bottleneck", "wrn16_4_cifar"])
def test_only_the_first_block_splits_after_its_bn_relu(build):
    """With every branch's last conv zeroed, blocks pass their shortcut on: the first block
    hands on ReLU(BN1(stem)) (>= 0 when identity; projected otherwise), later identities
    copy their input."""
    model = build()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    last = "conv3" if model.bottleneck else "conv2"

    @jax.jit
    def run(x):  # init, zeroing and apply in one program: one compilation
        variables = model.init(jax.random.key(1), x)
        params = {k: ({**v, last: {"kernel": jnp.zeros_like(v[last]["kernel"])}}
                      if k.startswith("stage") else v) for k, v in variables["params"].items()}
        return variables, model.apply({**variables, "params": params}, x, return_features=True)[1]

    variables, feats = run(x)
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables)
    preact = _np_bn_relu(np.asarray(feats["stem"], np.float64),
                         p["params"]["stage1_block1"]["bn1"],
                         p["batch_stats"]["stage1_block1"]["bn1"])
    if "proj_conv" in p["params"]["stage1_block1"]:
        expected = _np_conv(preact, p["params"]["stage1_block1"]["proj_conv"]["kernel"], 1, 0)
    else:
        expected = preact
    np.testing.assert_allclose(feats["stage1"], expected, rtol=1e-5, atol=1e-5)


# --- Dropout (Wide ResNets) -----------------------------------------------------------------


def _calls(model, variables, x, train: bool):
    """(module path, class) of every layer `model.apply` calls, in order."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(
            context.module, nn.Conv | nn.BatchNorm | nn.Dropout | nn.Dense | DropPath
        ):
            seen.append(("/".join(context.module.path), type(context.module).__name__))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # the layers are called while tracing: shapes suffice
        jax.eval_shape(lambda v, x: model.apply(v, x, train=train,
                                                rngs={"dropout": jax.random.key(1)},
                                                mutable=["batch_stats"]), variables, x)
    return seen


def test_dropout_sits_between_the_two_convs_of_each_block():
    model = wide_resnet(16, 1, drop_rate=0.3)  # n = 2: six blocks
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    calls = _calls(model, variables, x, train=True)
    assert sum(kind == "Dropout" for _, kind in calls) == 6
    block = [(path.split("/")[-1], kind) for path, kind in calls
             if path.startswith("stage2_block2/")]
    assert block == [("bn1", "BatchNorm"), ("conv1", "Conv"), ("bn2", "BatchNorm"),
                     ("Dropout_0", "Dropout"), ("conv2", "Conv")]
    first = [path.split("/")[-1] for path, _ in calls if path.startswith("stage2_block1/")]
    assert first == ["bn1", "proj_conv", "conv1", "bn2", "Dropout_0", "conv2"]
    no_dropout = wide_resnet(16, 1)
    assert not any(kind == "Dropout" for _, kind in _calls(no_dropout, variables, x, True))


def test_dropout_only_in_training_with_the_dropout_stream():
    model = wide_resnet(10, 2, drop_rate=0.5, num_classes=4)
    plain = wide_resnet(10, 2, num_classes=4)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))

    @jax.jit
    def run(key_a, key_b):  # one program (one compilation); called twice for `again`
        variables = model.init(jax.random.key(1), x)
        evals = [m.apply(variables, x) for m in (model, plain)]  # no 'dropout' RNG: flax
        trains = [model.apply(variables, x, train=True, rngs={"dropout": k},  # would raise
                              mutable=["batch_stats"])[0] for k in (key_a, key_b)]
        return evals, trains

    (evaluated, evaluated_plain), (a, b) = run(jax.random.key(2), jax.random.key(3))
    np.testing.assert_array_equal(evaluated, evaluated_plain)
    _, (again, _) = run(jax.random.key(2), jax.random.key(4))
    np.testing.assert_array_equal(a, again)  # masks come from the 'dropout' key
    assert not np.allclose(a, b)


def test_forward_backward_jit_small_bottleneck_network():
    """A small bottleneck pre-activation net trains under jit and updates its BN statistics;
    bfloat16 computation keeps float32 parameters and float32 logits."""
    model = preact_resnet_cifar(11, bottleneck=True, num_classes=3)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))

    @jax.jit
    def loss_and_grad(x):  # init and step in one program: one compilation
        variables = model.init(jax.random.key(1), x)

        def loss(p):
            logits, state = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                                        train=True, mutable=["batch_stats"])
            labels = jnp.array([0, 2])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

        value_state, grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return variables, (value_state, grads), optax.tree.norm(grads)  # norm in the program

    variables, ((value, state), grads), grad_norm = loss_and_grad(x)
    assert np.isfinite(float(value)) and float(grad_norm) > 0
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
    old, new = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(state["batch_stats"])
    assert len(old) == 2 * (3 * 3 + 1)  # mean and var of 3 BNs in each of 3 blocks, bn_final
    assert all(not np.allclose(o, n) for o, n in zip(old, new, strict=True))

    half = wide_resnet(10, 1, dtype=jnp.bfloat16)
    x = jnp.ones((1, 8, 8, 3))
    # One abstract trace (init's own forward pass gives the outputs), not an init and an apply.
    (logits, feats), variables = jax.eval_shape(
        lambda: half.init_with_output(jax.random.key(0), x, return_features=True))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    assert feats["stage3"].dtype == jnp.bfloat16 and logits.dtype == jnp.float32


# --- Input sizes and arguments --------------------------------------------------------------


@pytest.mark.parametrize("name", ["preact_resnet164_cifar", "wrn16_4_cifar"])
def test_min_input_size_is_exact(name):
    """Stride-2 3x3 convs with padding 1 and 1x1/2 projections map 1x1 to 1x1: any input runs."""
    model = create_model(name)
    assert model_info(name).min_input_size == 1
    check_input_size(model, name, (1, 1, 3), 1)
    _, logits, feats = abstract_forward(model, size=1, batch=1)
    assert logits.shape == (1, 10)
    assert [feats[f"stage{i}"].shape[1:3] for i in (1, 2, 3)] == [(1, 1)] * 3
    _, _, feats = abstract_forward(model, size=5, batch=1)  # odd sizes: ceil(5 / 2) = 3, then 2
    assert [feats[f"stage{i}"].shape[1:3] for i in (1, 2, 3)] == [(5, 5), (3, 3), (2, 2)]


def test_invalid_arguments():
    cases = [
        (lambda: preact_resnet_cifar(1001),
         r"^preact_resnet_cifar: depth=1001 is invalid; expected 6n \+ 2 with n >= 1 for "
         r"bottleneck=False \(20, 56, 110, \.\.\.\)\.$"),
        (lambda: preact_resnet_cifar(100, bottleneck=True),
         r"^preact_resnet_cifar: depth=100 is invalid; expected 9n \+ 2 with n >= 1 for "
         r"bottleneck=True \(164, 1001, \.\.\.\)\.$"),
        (lambda: preact_resnet_cifar(2), r"^preact_resnet_cifar: depth=2 is invalid"),
        (lambda: preact_resnet_cifar(110.0), r"^preact_resnet_cifar: depth=110.0 is invalid"),
        (lambda: preact_resnet_cifar(164, bottleneck="yes"),
         r"^preact_resnet_cifar: bottleneck='yes' is invalid; expected True or False\.$"),
        (lambda: wide_resnet(27, 10),
         r"^wide_resnet: depth=27 is invalid; expected 6n \+ 4 with n >= 1 for Wide ResNets "
         r"\(16, 22, 28, 40, \.\.\.\)\.$"),
        (lambda: wide_resnet(True, 10), r"^wide_resnet: depth=True is invalid"),
        (lambda: wide_resnet(4, 10), r"^wide_resnet: depth=4 is invalid"),
        (lambda: wide_resnet(28, 0),
         r"^wide_resnet: width=0 is invalid; expected a positive integer\.$"),
        (lambda: wide_resnet(28, 2.5), r"^wide_resnet: width=2.5 is invalid"),
        (lambda: create_model("wrn28_10_cifar", drop_rate=1.0),
         r"^PreActResNet: drop_rate=1.0 is invalid; expected 0 <= drop_rate < 1\.$"),
        (lambda: create_model("wrn16_4_cifar", drop_rate=-0.1),
         r"^PreActResNet: drop_rate=-0.1 is invalid"),
        (lambda: preact_resnet_cifar(164, bottleneck=True, drop_rate=0.3),
         r"^PreActResNet: drop_rate=0.3 is invalid; expected 0 with bottleneck=True"),
        (lambda: create_model("preact_resnet110_cifar", num_classes=0),
         r"^PreActResNet: num_classes=0 is invalid; expected a positive integer\.$"),
        (lambda: PreActResNet(stage_sizes=()),
         r"^PreActResNet: stage_sizes=\(\) is invalid; expected a non-empty sequence"),
        (lambda: PreActResNet(stage_sizes=(2, 2), widths=(16, 32, 64)),
         r"^PreActResNet: widths=\(16, 32, 64\) is invalid; expected 2 positive ints, one per "
         r"stage of stage_sizes=\(2, 2\)\.$"),
        (lambda: PreActResNet(stem_width=0), r"^PreActResNet: stem_width=0 is invalid"),
        (lambda: PreActResNet(stride_in_1x1=1), r"^PreActResNet: stride_in_1x1=1 is invalid"),
        (lambda: PreActBasicBlock(8, conv=None, norm=None, strides=0),
         r"^PreActBasicBlock: strides=0 is invalid; expected a positive integer\.$"),
        (lambda: PreActBottleneckBlock(8, conv=None, norm=None, expansion=0),
         r"^PreActBottleneckBlock: expansion=0 is invalid"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()
    with pytest.raises(ValueError, match=r"^PreActResNet: input.shape=\(32, 32, 3\) is invalid"):
        jax.eval_shape(lambda: create_model("wrn16_4_cifar").init(jax.random.key(0),
                                                                  jnp.zeros((32, 32, 3))))


BASIC = sorted(name for name, (_, _, bottleneck, _, _) in MODELS.items() if not bottleneck)
BOTTLENECK = sorted(name for name, (_, _, bottleneck, _, _) in MODELS.items() if bottleneck)


@pytest.mark.parametrize("name", BASIC)
def test_basic_block_models_do_not_offer_bottleneck_options(name):
    """`expansion` and `stride_in_1x1` only shape bottleneck blocks: on WRNs and ResNet-110 they
    would change nothing, so those factories fix them (None) and do not offer them."""
    settable = model_kwargs_config(name)
    assert not {"expansion", "stride_in_1x1", "bottleneck"} & set(settable)
    assert "drop_rate" in settable
    for field, value in (("expansion", 7), ("stride_in_1x1", False)):
        with pytest.raises(ValueError, match=rf"create_model: {field}={value} is invalid; model "
                           rf"'{name}' does not take '{field}'"):
            create_model(name, **{field: value})
    model = create_model(name)
    assert (model.expansion, model.stride_in_1x1) == (None, None)


@pytest.mark.parametrize("name", BOTTLENECK)
def test_bottleneck_models_offer_bottleneck_options(name):
    assert {"expansion", "stride_in_1x1"} <= set(model_kwargs_config(name))
    model = create_model(name, expansion=2, stride_in_1x1=False)
    assert model.out_widths == (32, 64, 128)


def test_check_config_refuses_bottleneck_options_of_basic_models(monkeypatch):
    from cnnjax.train.config import check_config
    from tests.train import helpers

    helpers.install_fake_pipeline(monkeypatch)
    config = helpers.tiny_config(model="wrn16_4_cifar")
    config.model_kwargs = {"expansion": 7}
    with pytest.raises(ValueError, match=r"^config: model_kwargs=\{'expansion': 7\} is invalid; "
                       r"model 'wrn16_4_cifar' does not accept them"):
        check_config(config)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PreActResNet(expansion=4), "expansion=4"),
        (lambda: PreActResNet(stride_in_1x1=True), "stride_in_1x1=True"),
        (lambda: preact_resnet_cifar(110, stride_in_1x1=False), "stride_in_1x1=False"),
        (lambda: wide_resnet(16, 4, expansion=7), "expansion=7"),
    ],
)
def test_bottleneck_options_on_basic_blocks_are_refused(build, message):
    with pytest.raises(ValueError, match=rf"^PreActResNet: {message} is invalid; expected None "
                       r"with bottleneck=False \(a bottleneck-block option; basic blocks would "
                       r"ignore it\)\.$"):
        build()


def test_bottleneck_defaults_are_expansion_4_and_stride_in_1x1():
    """None means 4 and the stride on the first 1x1: same parameters and outputs as explicit."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    default = preact_resnet_cifar(11, bottleneck=True, num_classes=3)
    explicit = preact_resnet_cifar(11, bottleneck=True, num_classes=3, expansion=4,
                                   stride_in_1x1=True)
    moved = preact_resnet_cifar(11, bottleneck=True, num_classes=3, stride_in_1x1=False)

    @jax.jit
    def run(x):  # one program (eager ops would compile one by one)
        variables = default.init(jax.random.key(1), x)
        return variables, [m.apply(variables, x) for m in (default, explicit, moved)]

    variables, (out, out_explicit, out_moved) = run(x)
    assert default.out_widths == (64, 128, 256)
    assert variables["params"]["stage3_block1"]["conv3"]["kernel"].shape == (1, 1, 64, 256)
    np.testing.assert_array_equal(out_explicit, out)
    assert not np.allclose(out_moved, out)


@pytest.mark.parametrize("value", ["0.3", None, float("nan")])
def test_drop_rate_must_be_a_number(value):
    with pytest.raises(ValueError, match=rf"^PreActResNet: drop_rate={value!r} is invalid; "
                       r"expected 0 <= drop_rate < 1\.$"):
        wide_resnet(16, 4, drop_rate=value)


# --- Stochastic depth --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_drop_path_rate_is_a_model_kwarg(name):
    assert "drop_path_rate" in model_kwargs_config(name)
    assert create_model(name).drop_path_rate == 0.0
    assert create_model(name, drop_path_rate=0.2).drop_path_rate == 0.2


@pytest.mark.parametrize(("name", "stage_sizes"), [("wrn16_4_cifar", (2, 2, 2)),
                                                   ("preact_resnet164_cifar", (18, 18, 18))])
def test_block_drop_rates_decay_linearly_with_depth(name, stage_sizes):
    """Block l of L (in forward order) drops its branch with drop_path_rate * l / L."""
    assert drop_path_rates(create_model(name)) == {}  # rate 0: no DropPath at all
    rates = drop_path_rates(create_model(name, drop_path_rate=0.5))
    blocks = [f"stage{i}_block{j}" for i, n in enumerate(stage_sizes, 1) for j in range(1, n + 1)]
    assert list(rates) == blocks
    total = len(blocks)
    np.testing.assert_allclose(list(rates.values()),
                               [0.5 * l / total for l in range(1, total + 1)])  # noqa: E741
    assert rates[blocks[-1]] == 0.5


def test_drop_path_ends_the_branch_after_dropout_and_the_last_conv():
    model = wide_resnet(16, 1, drop_rate=0.3, drop_path_rate=0.2)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    calls = _calls(model, variables, x, train=True)
    block = [path.split("/")[-1] for path, _ in calls if path.startswith("stage2_block2/")]
    assert block == ["bn1", "conv1", "bn2", "Dropout_0", "conv2", "drop_path"]


@pytest.mark.parametrize("bottleneck", [False, True])
def test_drop_path_drops_the_branch_before_the_addition(bottleneck):
    """A dropped example's output is its identity shortcut x, a kept one's x + F(x) / (1 - rate),
    F(x) being the same block's branch without DropPath (BN statistics come before it)."""
    conv, norm = functools.partial(nn.Conv, use_bias=False), batch_norm(True, jnp.float32, None)
    block = functools.partial(PreActBottleneckBlock, 4) if bottleneck else functools.partial(
        PreActBasicBlock, 16)
    plain, sd = block(conv=conv, norm=norm), block(conv=conv, norm=norm, drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (16, 6, 6, 16))

    @jax.jit
    def run_all(x):  # init and the four applications in one program: one compilation
        variables = plain.init(jax.random.key(1), x)
        return {(m, train): module.apply(variables, x, train, rngs={"dropout": jax.random.key(2)},
                                         mutable=["batch_stats"])[0]
                for m, module in (("plain", plain), ("sd", sd)) for train in (True, False)}

    outputs = run_all(x)

    def run(module, train):
        return np.asarray(outputs["plain" if module is plain else "sd", train])

    branch = run(plain, True) - np.asarray(x)
    y = run(sd, True)
    dropped = np.array([np.array_equal(y[i], x[i]) for i in range(len(x))])
    assert 0 < dropped.sum() < len(x)
    np.testing.assert_allclose(y[~dropped], (x + branch / 0.5)[~dropped], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(run(sd, False), run(plain, False))  # evaluation: no DropPath


@pytest.mark.parametrize(("label", "build"), [
    ("basic+dropout", functools.partial(PreActResNet, stage_sizes=(1, 1), widths=(8, 16),
                                        drop_rate=0.3)),
    ("bottleneck", functools.partial(PreActResNet, stage_sizes=(2, 1), widths=(4, 8),
                                     bottleneck=True)),
])
def test_stochastic_depth_changes_training_only(label, build):
    plain, sd = build(num_classes=3), build(num_classes=3, drop_path_rate=0.5)
    variables, sd_variables, evals, trains = plain_and_stochastic_depth_outputs(
        plain, sd, jax.random.normal(jax.random.key(0), (8, 8, 8, 3)))
    # No parameters or statistics added: the same init gives the same variables.
    assert jax.tree.structure(sd_variables) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, sd_variables, variables)
    np.testing.assert_array_equal(evals["sd"], evals["plain"])  # inference: the plain network
    assert not np.allclose(trains["sd", 0], trains["sd", 1], atol=1e-4)
    assert not np.allclose(trains["sd", 0], trains["plain", 0], atol=1e-4)


def test_invalid_drop_path_rates():
    cases = [
        (lambda: create_model("wrn16_4_cifar", drop_path_rate=1.0),
         r"^PreActResNet: drop_path_rate=1.0 is invalid; expected 0 <= drop_path_rate < 1\.$"),
        (lambda: create_model("preact_resnet164_cifar", drop_path_rate=-0.5),
         r"^PreActResNet: drop_path_rate=-0.5 is invalid"),
        (lambda: PreActResNet(drop_path_rate="0.2"),
         r"^PreActResNet: drop_path_rate='0.2' is invalid"),
        (lambda: PreActBasicBlock(8, conv=None, norm=None, drop_path_rate=1.5),
         r"^PreActBasicBlock: drop_path_rate=1.5 is invalid; expected 0 <= drop_path_rate < 1"),
        (lambda: PreActBottleneckBlock(8, conv=None, norm=None, drop_path_rate=None),
         r"^PreActBottleneckBlock: drop_path_rate=None is invalid"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()

"""Tests for DenseNet-BC 121/169/201/161, the paper's CIFAR DenseNets (basic and BC, Table 2) and
their dense layer, dense block and transition."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax.models import create_model, list_models, model_info
from cnnjax.models.densenet import (
    DenseBlock,
    DenseLayer,
    DenseNet,
    Transition,
    cifar_densenet,
)
from cnnjax.models.resnet import batch_norm
from cnnjax.train.checks import check_input_size
from cnnjax.train.config import model_kwargs_config
from tests.models.cifar import abstract_forward, assert_cifar_features

# torchvision's published counts (1000 classes).
COUNTS = {"densenet121": 7_978_856, "densenet169": 14_149_480, "densenet201": 20_013_928,
          "densenet161": 28_681_000}


def _parts(train: bool = False):
    return functools.partial(nn.Conv, use_bias=False), batch_norm(train, jnp.float32, None)


# densenet161's count is checked in the default suite by test_densenet161_is_the_wide_k48_model,
# from the one abstract init it needs anyway (a DenseNet-161 trace is ~5 s).
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "densenet161"
                                  else n for n in sorted(COUNTS)])
def test_param_count_exact(name):
    """torchvision's published parameter counts (1000 classes), from an abstract init."""
    variables = jax.eval_shape(
        lambda: create_model(name).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    )
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == COUNTS[name]


def test_registered():
    assert set(COUNTS) <= set(list_models("densenet*"))


def test_densenet161_is_the_wide_k48_model():
    """torchvision's DenseNet-161: k=48, a 96-filter stem, blocks (6, 12, 36, 24), bn_size 4,
    compression 0.5 (transitions 384 -> 192, 768 -> 384, 2112 -> 1056; 2208 channels before
    the head). Its parameter count is torchvision's (as test_param_count_exact's: the count does
    not depend on the input size, global pooling feeds the head)."""
    model = create_model("densenet161")
    assert (model.growth_rate, model.num_init_features, tuple(model.block_sizes)) == (
        48, 96, (6, 12, 36, 24))
    assert model.compression == 0.5 and model.bn_size is None  # DEFAULT_BN_SIZE = 4
    assert model_info("densenet161").min_input_size == model_info("densenet121").min_input_size
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 29, 29, 3))))["params"]
    assert params["conv_init"]["kernel"].shape == (7, 7, 3, 96)
    assert params["block1"]["layer1"]["conv1"]["kernel"].shape == (1, 1, 96, 4 * 48)
    assert [params[f"transition{i}"]["conv"]["kernel"].shape[-1] for i in (1, 2, 3)] == [
        192, 384, 1056]
    assert params["head"]["kernel"].shape == (2208, 1000)
    assert sum(x.size for x in jax.tree.leaves(params)) == COUNTS["densenet161"]


def test_dense_block_concatenates_inputs_and_new_channels():
    conv, norm = _parts()
    block = DenseBlock(3, growth_rate=5, conv=conv, norm=norm)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 7))
    variables = jax.jit(block.init)(jax.random.key(1), x)  # eager ops compile one by one
    y = jax.jit(block.apply)(variables, x)
    assert y.shape == (2, 6, 6, 7 + 3 * 5)
    np.testing.assert_array_equal(y[..., :7], x)  # the block input is passed through unchanged
    # Layer i sees all earlier channels: 7, 12, 17 inputs; bottleneck 4k = 20 channels.
    params = variables["params"]
    assert [params[f"layer{i}"]["conv1"]["kernel"].shape for i in (1, 2, 3)] == [
        (1, 1, 7, 20),
        (1, 1, 12, 20),
        (1, 1, 17, 20),
    ]
    assert params["layer3"]["conv2"]["kernel"].shape == (3, 3, 20, 5)
    # The last 5 channels are exactly layer3 applied to the first 17.
    layer = DenseLayer(5, conv=conv, norm=norm)
    ref = jax.jit(layer.apply)(
        {"params": params["layer3"], "batch_stats": variables["batch_stats"]["layer3"]}, y[..., :17]
    )
    np.testing.assert_allclose(y[..., 17:], ref, rtol=1e-6)


def test_transition_matches_reference_average_pool():
    conv, norm = _parts()
    x = jax.random.normal(jax.random.key(0), (1, 7, 9, 8))  # odd sizes: floor
    t = Transition(4, conv=conv, norm=norm)
    variables = t.init(jax.random.key(1), x)
    y = np.asarray(t.apply(variables, x), np.float64)
    assert y.shape == (1, 3, 4, 4)
    # eval-mode BN at init is x / sqrt(1 + eps); then ReLU, 1x1 conv, 2x2 mean.
    k = np.asarray(variables["params"]["conv"]["kernel"], np.float64)[0, 0]
    z = np.maximum(np.asarray(x, np.float64) / np.sqrt(1 + 1e-5), 0) @ k
    ref = z[:, :6, :8].reshape(1, 3, 2, 4, 2, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_features_and_channel_counts_densenet121():
    model = create_model("densenet121", num_classes=4)
    x = jnp.ones((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    logits, feats = jax.eval_shape(lambda v: model.apply(v, x, return_features=True), variables)
    assert logits.shape == (1, 4)
    assert set(feats) == {"stem", "stage1", "stage2", "stage3", "stage4", "pre_logits"}
    # 64 + 6*32 = 256 -> 128; 128 + 12*32 = 512 -> 256; 256 + 24*32 = 1024 -> 512; 512 + 16*32.
    assert [feats[f"stage{i}"].shape[-1] for i in (1, 2, 3, 4)] == [256, 512, 1024, 1024]
    assert [feats[f"stage{i}"].shape[1] for i in (1, 2, 3, 4)] == [8, 4, 2, 1]


def test_forward_backward_jit_small():
    model = DenseNet(block_sizes=(2, 2), num_classes=3, growth_rate=8, num_init_features=16)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))

    @jax.jit
    def loss_and_grad(x):  # init and step in one program: one compilation
        variables = model.init(jax.random.key(1), x)

        def loss(p):
            logits, _ = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 2])).mean()

        value, grads = jax.value_and_grad(loss)(variables["params"])
        return value, optax.tree.norm(grads)  # in the program: eager, a kernel per leaf shape

    value, grad_norm = loss_and_grad(x)
    assert np.isfinite(float(value)) and float(grad_norm) > 0


def test_conv_init_is_he_fan_in_as_torchvision():
    """Conv kernels are He-normal with fan-in, torchvision densenet's `kaiming_normal_` (the
    authors' densenet.lua `ConvInit` uses fan-out; the module docstring says so). The 1x1
    bottleneck conv of a dense layer (fan-in 64, fan-out 32) tells the two apart: variance
    2 / 64 vs 2 / 32."""
    model = DenseNet(block_sizes=(2, 2), num_classes=3, growth_rate=8, num_init_features=64,
                     bn_size=4)
    variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
    kernels = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
               for path, v in jax.tree_util.tree_leaves_with_path(variables["params"])
               if path[-1].key == "kernel" and v.ndim == 4}
    assert kernels
    bottleneck = [k for k, v in kernels.items() if v.shape == (1, 1, 64, 32)]
    assert bottleneck, sorted((k, v.shape) for k, v in kernels.items())
    for name, kernel in kernels.items():
        fan_in = int(np.prod(kernel.shape[:-1]))
        if kernel.size >= 1000:
            np.testing.assert_allclose(kernel.var() * fan_in / 2, 1.0, rtol=0.2, err_msg=name)


def test_dense_layer_dropout_only_in_training():
    conv, norm = _parts()
    layer = DenseLayer(6, conv=conv, norm=norm, drop_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 5))
    plain = DenseLayer(6, conv=conv, norm=norm)

    @jax.jit  # one program (eager ops compile one by one)
    def run(x):
        variables = layer.init(jax.random.key(1), x)
        evaluated = layer.apply(variables, x)  # no 'dropout' RNG needed (flax would raise)
        a, b = (layer.apply(variables, x, train=True, rngs={"dropout": jax.random.key(k)},
                            mutable=True)[0] for k in (2, 3))
        return evaluated, a, b, plain.apply(variables, x, train=True, mutable=True)[0]

    evaluated, a, b, ref = run(x)
    assert not np.array_equal(a, b)
    dropped = np.asarray(a) == 0
    assert 0.3 < dropped.mean() < 0.7  # rate 0.5 over 192 values
    # Kept values are the dropout-free output scaled by 1 / (1 - rate).
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(a)[~dropped], 2 * ref[~dropped], rtol=1e-5, atol=1e-6)
    assert evaluated.shape == (2, 4, 4, 6)


@pytest.mark.slow
def test_densenet121_forward_backward_jit():
    model = create_model("densenet121", num_classes=5)
    x = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    grads = jax.jit(
        jax.grad(
            lambda p: model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )[0].sum()
        )
    )(variables["params"])
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])


def test_invalid_arguments():
    with pytest.raises(
        ValueError, match=r"DenseNet: block_sizes=\(\) is invalid; expected a non-empty"
    ):
        DenseNet(block_sizes=())
    with pytest.raises(
        ValueError, match=r"DenseNet: compression=0.0 is invalid; expected 0 < compression <= 1"
    ):
        DenseNet(block_sizes=(1,), compression=0.0)
    with pytest.raises(
        ValueError, match=r"DenseNet: drop_rate=1.0 is invalid; expected 0 <= drop_rate < 1"
    ):
        DenseNet(block_sizes=(1,), drop_rate=1.0)
    with pytest.raises(
        ValueError, match=r"DenseNet: growth_rate=0 is invalid; expected a positive integer"
    ):
        DenseNet(block_sizes=(1,), growth_rate=0)


# ---------------------------------------------------------------------------------------------
# The paper's CIFAR DenseNets (section 3 "Implementation details", Table 2).

#: name -> (L, k, DenseNet-BC?, Table 2's parameter count as printed, exact count at 10 classes).
CIFAR = {
    "densenet40_cifar": (40, 12, False, "1.0M", 1_019_722),
    "densenet100_k12_cifar": (100, 12, False, "7.0M", 6_979_642),
    "densenet100_k24_cifar": (100, 24, False, "27.2M", 27_249_082),
    "densenet_bc100_cifar": (100, 12, True, "0.8M", 769_162),
    "densenet_bc250_cifar": (250, 24, True, "15.3M", 15_324_406),
    "densenet_bc190_cifar": (190, 40, True, "25.6M", 25_624_430),
}


def _paper_layout(depth: int, k: int, bc: bool, num_classes: int = 10):
    """Parameter count and per-block output channels of the paper's CIFAR DenseNet, in plain
    Python from section 3: a 3x3 conv with 16 (2k for BC) filters and no BN; three blocks of n
    layers (L = 3n + 4 basic, 6n + 4 BC), each layer BN + 3x3 conv to k or BN + 1x1 conv to 4k +
    BN + 3x3 conv to k; transitions BN + 1x1 conv to floor(theta * C) (theta 0.5 for BC, else 1);
    final BN and the linear classifier. No conv biases; BN has a scale and a bias per channel."""
    n = (depth - 4) // (6 if bc else 3)
    assert depth == (6 if bc else 3) * n + 4
    c = 2 * k if bc else 16
    total = 3 * 3 * 3 * c
    stages = []
    for block in range(3):
        for _ in range(n):
            if bc:
                total += 2 * c + 1 * 1 * c * 4 * k + 2 * 4 * k + 3 * 3 * 4 * k * k
            else:
                total += 2 * c + 3 * 3 * c * k
            c += k
        stages.append(c)
        if block < 2:
            out = math.floor(c * (0.5 if bc else 1.0))
            total += 2 * c + 1 * 1 * c * out
            c = out
    total += 2 * c + c * num_classes + num_classes
    return total, stages


# DenseNet-BC-250 (9 s of tracing, cold) under -m slow for CI time: BC-190 and BC-100 check the
# same BC layout against the formula and Table 2.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n == "densenet_bc250_cifar" else n
    for n in sorted(CIFAR)])
def test_cifar_param_count_matches_paper_formula_and_table2(name):
    depth, k, bc, paper, exact = CIFAR[name]
    count, stages = _paper_layout(depth, k, bc)
    assert count == exact
    assert f"{count / 1e6:.1f}M" == paper  # Table 2's figures, to their printed precision
    variables, logits, feats = abstract_forward(create_model(name))  # shapes only
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"])) == count
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert_cifar_features(feats, 2, 2 * k if bc else 16, stages)


def test_cifar_registry_entries():
    assert set(CIFAR) <= set(list_models("densenet*"))
    for name in CIFAR:
        info = model_info(name)
        assert (info.input_shape, info.num_classes, info.min_input_size) == ((32, 32, 3), 10, 4)
        assert info.paper == model_info("densenet121").paper
    model = create_model("densenet_bc100_cifar")
    assert (model.block_sizes, model.growth_rate, model.num_init_features) == ((16,) * 3, 12, 24)
    assert (model.bottleneck, model.compression, model.stem) == (True, 0.5, "cifar")
    assert (model.drop_rate, model.drop_every_conv) == (0.0, True)
    model = create_model("densenet40_cifar", num_classes=100)
    assert (model.block_sizes, model.growth_rate, model.num_init_features) == ((12,) * 3, 12, 16)
    assert (model.bottleneck, model.compression, model.num_classes) == (False, 1.0, 100)


def test_cifar_parameter_tree_basic_and_bc():
    basic, _, _ = abstract_forward(create_model("densenet40_cifar"), size=4, batch=1)
    params = basic["params"]
    assert set(params) == {"conv_init", "bn_final", "head", "transition1", "transition2"} | {
        f"block{i}" for i in (1, 2, 3)
    }  # no stem BN: the first dense layer's BN-ReLU follows the stem conv
    assert params["conv_init"]["kernel"].shape == (3, 3, 3, 16)
    assert set(params["block1"]["layer1"]) == {"bn", "conv"}
    assert [params["block1"][f"layer{j}"]["conv"]["kernel"].shape for j in (1, 2, 12)] == [
        (3, 3, 16, 12), (3, 3, 28, 12), (3, 3, 148, 12)]
    assert params["transition1"]["conv"]["kernel"].shape == (1, 1, 160, 160)  # theta = 1
    assert params["head"]["kernel"].shape == (448, 10)

    bc, _, _ = abstract_forward(create_model("densenet_bc100_cifar"), size=4, batch=1)
    params = bc["params"]
    assert set(params["block1"]["layer1"]) == {"bn1", "conv1", "bn2", "conv2"}
    assert params["block1"]["layer1"]["conv1"]["kernel"].shape == (1, 1, 24, 48)
    assert params["block1"]["layer1"]["conv2"]["kernel"].shape == (3, 3, 48, 12)
    assert params["transition1"]["conv"]["kernel"].shape == (1, 1, 216, 108)  # theta = 0.5
    assert params["transition2"]["conv"]["kernel"].shape == (1, 1, 300, 150)
    assert params["head"]["kernel"].shape == (342, 10)


@pytest.mark.slow
def test_densenet40_cifar_forward_backward_jit():
    model = create_model("densenet40_cifar")
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)

    def loss(p):
        logits, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
        return logits.sum(), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
    assert float(optax.tree.norm(grads)) > 0


# DenseNet-BC-100's case (~10 s: three engine checks of a 100-layer trace) under -m slow: BC
# changes the dense layers and the transitions' widths, not the spatial path the minimum is about
# (the stem, the transitions' 2x2/2 pools), which densenet40_cifar's case checks; the default
# suite still traces densenet_bc100_cifar at 4x4 (test_cifar_parameter_tree_basic_and_bc) and
# checks its registered minimum (test_cifar_registry_entries).
@pytest.mark.parametrize("name", ["densenet40_cifar", pytest.param(
    "densenet_bc100_cifar", marks=pytest.mark.slow)])
def test_cifar_min_input_size_is_exact(name):
    """4x4 pools to 2x2 and 1x1 (8x8 features at 32x32); 3x3 would pool to 1x1, then 0x0. The
    registry's figure and the model's own (`min_input_size`, from `smallest_input`) agree."""
    from cnnjax.models.registry import min_input_size

    model = create_model(name)
    assert model_info(name).min_input_size == 4
    assert min_input_size(name, model) == 4
    check_input_size(model, name, (4, 4, 3), 4)
    _, logits, feats = abstract_forward(model, size=4, batch=1)
    assert logits.shape == (1, 10)
    assert [feats[f"stage{i}"].shape[1:3] for i in (1, 2, 3)] == [(4, 4), (2, 2), (1, 1)]
    with pytest.raises(ValueError, match=r"input resolution='3x3' is invalid; too small: layer "
                                         r"transition2"):
        check_input_size(model, name, (3, 3, 3))
    # Called directly (no engine check), the model refuses rather than pooling to an empty map
    # and returning NaN logits.
    with pytest.raises(ValueError, match=r"DenseNet transition2: input map='1x1' is invalid; "
                                         r"expected at least 2x2 for its 2x2/2 average pool"):
        abstract_forward(model, size=3, batch=1)


# densenet40_cifar's case under -m slow: test_cifar_min_input_size_is_exact[densenet40_cifar]
# makes each of its checks (min_input_size 4, the trace at 4x4 and its failure at 3x3, the engine
# check at 4x4) on the same model.
@pytest.mark.parametrize("name, kwargs, smallest", [
    ("densenet121", {}, 29), ("densenet121", {"stem": "cifar"}, 8),
    pytest.param("densenet40_cifar", {}, 4, marks=pytest.mark.slow),
    ("densenet121", {"block_sizes": (2, 2)}, 5),
])
def test_the_minimum_follows_the_stem_and_the_transitions(name, kwargs, smallest):
    """The registry's 29 is the ImageNet stem's: with stem="cifar" DenseNet-121 takes 8x8 and up
    (its three 2x2/2 pools), which the engine refused below 29. Reference: the abstract trace
    runs at the minimum and fails one pixel below."""
    from cnnjax.models.registry import min_input_size

    if "block_sizes" in kwargs:
        from cnnjax.models.densenet import DenseNet

        model = DenseNet(num_classes=10, **kwargs)
    else:
        model = create_model(name, num_classes=10, **kwargs)
    assert min_input_size(name, model) == smallest
    abstract_forward(model, size=smallest, batch=1)
    with pytest.raises(ValueError, match="expected at least 2x2 for its 2x2/2 average pool"):
        abstract_forward(model, size=smallest - 1, batch=1)
    check_input_size(model, name, (smallest, smallest, 3), smallest)


def _dropout_paths(model, x, train: bool):
    """The module paths of the Dropout layers `model.apply` calls."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout):
            seen.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    with nn.intercept_methods(record):  # the layers are called while tracing: shapes suffice
        jax.eval_shape(lambda v: model.apply(v, x, train=train, rngs={"dropout": jax.random.key(1)},
                                             mutable=["batch_stats"]), variables)
    return seen


@pytest.mark.parametrize(("depth", "bottleneck"), [(10, True), (7, False)])
def test_cifar_dropout_after_every_conv_but_the_first(depth, bottleneck):
    """The paper: "we add a dropout layer after each convolutional layer (except the first
    one)": L - 2 dropouts (all convs but the stem; the head is not a conv)."""
    x = jnp.ones((2, 8, 8, 3))
    model = cifar_densenet(depth, 4, bottleneck=bottleneck, drop_rate=0.2)
    paths = _dropout_paths(model, x, train=True)
    assert len(paths) == depth - 2
    assert sum(p.startswith("transition") for p in paths) == 2
    if bottleneck:  # after the 1x1 and after the 3x3 conv of each layer
        assert sum(p.startswith("block1/layer1/") for p in paths) == 2
    # torchvision's placement (the ImageNet models): the new channels of each layer only.
    torchvision_style = cifar_densenet(depth, 4, bottleneck=bottleneck, drop_rate=0.2,
                                       drop_every_conv=False)
    assert len(_dropout_paths(torchvision_style, x, train=True)) == 3
    assert _dropout_paths(cifar_densenet(depth, 4, bottleneck=bottleneck), x, train=True) == []


def test_cifar_forward_backward_jit_with_dropout_and_bare_stem():
    """Training with dropout (the paper's placement); the stem is just the 3x3 conv (no BN-ReLU,
    no pooling, no dropout): it is `stem` and the first channels of `stage1`."""
    model = cifar_densenet(7, 4, bottleneck=False, drop_rate=0.2, num_classes=3)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))

    @jax.jit
    def loss_and_grad(key):  # init and step in one program: one compilation
        variables = model.init(jax.random.key(1), x)

        def loss(p):
            (logits, feats), _ = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                return_features=True,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            labels = jnp.array([0, 2])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), feats

        (value, feats), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        # The norm in the program: eager, it compiled a kernel per leaf shape.
        return variables, ((value, feats), optax.tree.norm(grads))

    variables, ((value, feats), grad_norm) = loss_and_grad(jax.random.key(2))
    _, ((other, _), _) = loss_and_grad(jax.random.key(3))
    assert np.isfinite(float(value)) and float(grad_norm) > 0
    assert float(value) != float(other)  # dropout masks come from the 'dropout' stream
    # 16 stem channels, + 4 per block, theta = 1.
    assert [feats[f"stage{i}"].shape for i in (1, 2, 3)] == [
        (2, 8, 8, 20), (2, 4, 4, 24), (2, 2, 2, 28)]
    conv = jax.lax.conv_general_dilated(
        x, variables["params"]["conv_init"]["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(feats["stem"], conv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats["stage1"][..., :16], conv, rtol=1e-5, atol=1e-5)
    evaluated = jax.eval_shape(lambda v: model.apply(v, x), variables)  # needs no dropout RNG
    assert evaluated.shape == (2, 3)


def test_basic_dense_layer_is_bn_relu_conv3x3():
    conv, norm = _parts()
    layer = DenseLayer(5, conv=conv, norm=norm, bottleneck=False)
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 7))
    variables = layer.init(jax.random.key(1), x)
    y = layer.apply(variables, x)
    kernel = variables["params"]["conv"]["kernel"]
    assert kernel.shape == (3, 3, 7, 5) and set(variables["params"]) == {"bn", "conv"}
    ref = jax.lax.conv_general_dilated(
        jnp.maximum(x / np.sqrt(1 + 1e-5), 0), kernel, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # eval-mode BN at init is x / sqrt(1 + eps)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_cifar_invalid_arguments():
    with pytest.raises(ValueError, match=r"^cifar_densenet: depth=41 is invalid; expected 6n \+ 4 "
                       r"with n >= 1 for bottleneck=True \(40, 100, 190, 250, \.\.\.\)\.$"):
        cifar_densenet(41, 12)
    with pytest.raises(ValueError, match=r"^cifar_densenet: depth=41 is invalid; expected 3n \+ 4 "
                       r"with n >= 1 for bottleneck=False \(40, 100, \.\.\.\)\.$"):
        cifar_densenet(41, 12, bottleneck=False)
    for depth in (4, 6, True, 100.0, "100"):
        with pytest.raises(ValueError, match=r"^cifar_densenet: depth=.* is invalid; expected 6n"):
            cifar_densenet(depth, 12)
    with pytest.raises(ValueError, match=r"^cifar_densenet: growth_rate=0 is invalid; expected a "
                       r"positive integer\.$"):
        cifar_densenet(40, 0)
    with pytest.raises(ValueError, match=r"^cifar_densenet: bottleneck='yes' is invalid; expected "
                       r"True or False\.$"):
        cifar_densenet(40, 12, bottleneck="yes")
    with pytest.raises(ValueError, match=r"^DenseNet: drop_rate=1.0 is invalid; expected 0 <= "
                       r"drop_rate < 1\.$"):
        create_model("densenet_bc100_cifar", drop_rate=1.0)
    with pytest.raises(ValueError, match=r"^DenseNet: num_classes=0 is invalid; expected a "
                       r"positive integer\.$"):
        create_model("densenet40_cifar", num_classes=0)
    with pytest.raises(ValueError, match=r"^DenseNet: stem='tiny' is invalid; expected one of "
                       r"\['imagenet', 'cifar'\]\.$"):
        DenseNet(block_sizes=(1,), stem="tiny")
    with pytest.raises(ValueError, match=r"^DenseNet: bottleneck=1 is invalid; expected True or "
                       r"False\.$"):
        DenseNet(block_sizes=(1,), bottleneck=1)
    with pytest.raises(ValueError, match=r"^DenseNet: drop_every_conv=None is invalid; expected "
                       r"True or False\.$"):
        DenseNet(block_sizes=(1,), drop_every_conv=None)


BC = sorted(name for name, (_, _, bc, _, _) in CIFAR.items() if bc)
BASIC = sorted(name for name, (_, _, bc, _, _) in CIFAR.items() if not bc)


@pytest.mark.parametrize("name", BC)
def test_bc_models_fix_bottleneck(name):
    """DenseNet-BC with bottleneck=False would silently be the basic DenseNet (densenet_bc100
    -> the 6,979,642-parameter DenseNet-100): the factories fix it, so it is no model kwarg."""
    settable = model_kwargs_config(name)
    assert "bottleneck" not in settable
    assert {"bn_size", "compression", "drop_rate"} <= set(settable)
    with pytest.raises(ValueError, match=rf"create_model: bottleneck=False is invalid; model "
                       rf"'{name}' does not take 'bottleneck' \(unknown, or fixed by its name\)"):
        create_model(name, bottleneck=False)
    assert create_model(name).bottleneck is True


@pytest.mark.parametrize("name", BASIC)
def test_basic_models_have_no_bn_size(name):
    """bn_size sizes the bottleneck's 1x1 conv, which basic dense layers lack: not offered."""
    settable = model_kwargs_config(name)
    assert "bn_size" not in settable and "bottleneck" not in settable
    with pytest.raises(ValueError, match=r"create_model: bn_size=4 is invalid; .* it takes "
                       r"\['act', 'compression'"):
        create_model(name, bn_size=4)
    assert create_model(name).bn_size is None


def test_check_config_refuses_fixed_fields(monkeypatch):
    """From a config the engine reports them as fields the model does not accept."""
    from cnnjax.train.config import check_config
    from tests.train import helpers

    helpers.install_fake_pipeline(monkeypatch)
    for name, field, value in [("densenet_bc100_cifar", "bottleneck", False),
                               ("densenet40_cifar", "bn_size", 4)]:
        config = helpers.tiny_config(model=name)
        config.model_kwargs = {field: value}
        with pytest.raises(ValueError, match=rf"^config: model_kwargs=\{{'{field}': {value}\}} "
                           rf"is invalid; model '{name}' does not accept them"):
            check_config(config)


def test_bn_size_only_with_bottleneck():
    with pytest.raises(ValueError, match=r"^DenseNet: bn_size=4 is invalid; expected None with "
                       r"bottleneck=False \(bn_size is the width of the bottleneck's 1x1 conv"):
        DenseNet(block_sizes=(1,), bottleneck=False, bn_size=4)
    with pytest.raises(ValueError, match=r"^DenseNet: bn_size=2 is invalid; expected None"):
        cifar_densenet(40, 12, bottleneck=False, bn_size=2)
    with pytest.raises(ValueError, match=r"^DenseNet: bn_size=0 is invalid; expected a positive "
                       r"integer\.$"):
        DenseNet(block_sizes=(1,), bn_size=0)
    # None is the bottleneck's 4k (the parameter trees above); a set bn_size is used.
    model = create_model("densenet_bc100_cifar", bn_size=2)
    params, _, _ = abstract_forward(model, size=4, batch=1)
    assert params["params"]["block1"]["layer1"]["conv1"]["kernel"].shape == (1, 1, 24, 24)
    assert create_model("densenet121").bn_size is None


def test_compression_must_keep_a_channel_at_every_transition():
    """int(2 * 0.3) = 0 channels would build an empty transition (a ZeroDivisionError later)."""
    tiny = functools.partial(DenseNet, (1, 1), growth_rate=1, num_init_features=1, stem="cifar")
    with pytest.raises(ValueError, match=r"^DenseNet: compression=0.3 is invalid; transition1 "
                       r"would keep int\(2 \* 0.3\) = 0 of its 2 channels \(block_sizes=\(1, 1\), "
                       r"growth_rate=1, num_init_features=1\); expected a compression that keeps "
                       r"at least one channel there \(>= 0.5\)\.$"):
        tiny(compression=0.3)
    # compression=0.5 is the smallest valid one
    _, logits, feats = abstract_forward(tiny(compression=0.5), size=4, batch=1)
    assert feats["stage2"].shape == (1, 2, 2, 2) and logits.shape == (1, 1000)
    # A later transition can be the empty one: 101 -> 9 at 0.099, then 10 -> 0.
    deep = functools.partial(DenseNet, (1, 1, 1), growth_rate=1, num_init_features=100,
                             stem="cifar")
    with pytest.raises(ValueError, match=r"transition2 would keep int\(10 \* 0.099\) = 0"):
        deep(compression=0.099)
    deep(compression=0.09901)  # 101 -> 10, then 11 -> 1


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        ("compression", "0.5", "expected 0 < compression <= 1"),
        ("compression", 1.5, "expected 0 < compression <= 1"),
        ("compression", True, "expected 0 < compression <= 1"),
        ("compression", float("nan"), "expected 0 < compression <= 1"),
        ("drop_rate", "0.2", "expected 0 <= drop_rate < 1"),
        ("drop_rate", -0.1, "expected 0 <= drop_rate < 1"),
        ("drop_rate", None, "expected 0 <= drop_rate < 1"),
    ],
)
def test_rates_are_numbers_in_range(field, value, valid):
    with pytest.raises(ValueError, match=rf"^DenseNet: {field}={value!r} is invalid; {valid}\.$"):
        DenseNet(block_sizes=(1, 1), **{field: value})


def test_transition_pool_averages_bfloat16_in_float32():
    """The transition's 2x2 average pool (flax's nn.avg_pool) summed bfloat16 windows in
    bfloat16, a rounding per add. Reference: float64 window means of the conv's bfloat16 output,
    rounded once (as LeNet-5's subsampling and PyTorch's bfloat16 avg_pool2d do)."""
    import ml_dtypes

    conv = functools.partial(nn.Conv, use_bias=False, dtype=jnp.bfloat16)
    t = Transition(16, conv=conv, norm=batch_norm(False, jnp.bfloat16, None))
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 8)) + 3.0
    variables = t.init(jax.random.key(1), x)
    y, state = t.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    z = np.asarray(state["intermediates"]["conv"]["__call__"][0]).astype(np.float64)
    ref = z.reshape(4, 8, 2, 8, 2, 16).mean(axis=(2, 4)).astype(ml_dtypes.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), ref)

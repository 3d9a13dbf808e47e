"""Tests for the ImageNet ResNets, the CIFAR ResNets / plain nets and their residual blocks."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from cnnjax.models import (
    ModelArgumentError,
    create_model,
    list_models,
    model_info,
    settable_fields,
)
from cnnjax.models.resnet import (
    BasicBlock,
    BottleneckBlock,
    ResNet,
    batch_norm,
    conv_kernel_init,
)
from cnnjax.models.resnet_cifar import CifarResNet


def n_params(model, shape) -> int:
    """Parameter count (BN statistics excluded) without allocating anything."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def param_paths(variables) -> set[str]:
    return {"/".join(k) for k in flatten_dict(variables["params"])}


# torchvision's published counts (He et al. Table 1 layouts, 1000 classes).
IMAGENET_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
# He et al. 2016, Table 6 (option A shortcuts), in millions.
CIFAR_COUNTS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}


@pytest.mark.parametrize("name", sorted(IMAGENET_COUNTS))
def test_imagenet_resnet_param_count_exact(name):
    assert n_params(create_model(name), (1, 224, 224, 3)) == IMAGENET_COUNTS[name]


@pytest.mark.parametrize("depth", sorted(CIFAR_COUNTS_M))
def test_cifar_resnet_param_count_matches_table6(depth):
    count = n_params(create_model(f"resnet{depth}_cifar"), (1, 32, 32, 3))
    assert abs(count / 1e6 - CIFAR_COUNTS_M[depth]) / CIFAR_COUNTS_M[depth] < 0.03
    # Option A shortcuts and no shortcuts both add no parameters.
    assert n_params(create_model(f"plain{depth}_cifar"), (1, 32, 32, 3)) == count


def test_registry_lists_all_resnets():
    names = set(list_models("resnet*")) | set(list_models("plain*"))
    expected = set(IMAGENET_COUNTS) | {
        f"{k}{d}_cifar" for k in ("resnet", "plain") for d in CIFAR_COUNTS_M
    }
    assert expected <= names
    assert model_info("resnet20_cifar").input_shape == (32, 32, 3)
    assert model_info("resnet50").num_classes == 1000


def _forward_backward(model, shape):
    x = jax.random.normal(jax.random.key(1), shape)
    labels = jnp.arange(shape[0]) % model.num_classes
    variables = model.init(jax.random.key(0), x)

    @jax.jit
    def step(params, batch_stats):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, logits, grads

    loss, logits, grads = step(variables["params"], variables["batch_stats"])
    assert logits.shape == (shape[0], model.num_classes)
    assert np.isfinite(float(loss))
    grad_norm = optax.tree.norm(grads)
    assert np.isfinite(float(grad_norm)) and float(grad_norm) > 0
    # Every parameter gets a gradient of the right shape.
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])


# ResNet-20 forward+backward under jit is exercised by the overfit test below; ResNet-18's
# forward by test_torchvision_weights' logits check, so its backward is -m slow (CI time).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18"])
def test_forward_backward_small_input(name):
    _forward_backward(create_model(name, num_classes=7), (2, *_small_input(name)))


def _small_input(name: str) -> tuple[int, int, int]:
    """A small input a ResNet trains on: 32x32 (stage4 at 1x1; CIFAR size). The registry's
    minimum is 1 (no map ever collapses), but training BatchNorm on a batch of 1x1 images is
    numerically degenerate (ResNet-50 and deeper give inf there)."""
    size = max(model_info(name).min_input_size, 32)
    return size, size, 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "plain20_cifar",
        "resnet110_cifar",
        "plain110_cifar",
    ],
)
def test_forward_backward_deep_small_input(name):
    _forward_backward(create_model(name, num_classes=7), (2, *_small_input(name)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IMAGENET_COUNTS))
def test_imagenet_size_forward(name):
    model = create_model(name)
    x = jnp.zeros((1, 224, 224, 3))
    variables = model.init(jax.random.key(0), x)
    logits, feats = jax.jit(functools.partial(model.apply, return_features=True))(variables, x)
    assert logits.shape == (1, 1000)
    assert [feats[k].shape[1] for k in ("stem", "stage1", "stage2", "stage3", "stage4")] == [
        112,
        56,
        28,
        14,
        7,
    ]


# He et al. 2016, Table 1: multiply-adds ("FLOPs") at 224x224, x10^9.
TABLE1_GMACS = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6,
                "resnet152": 11.3}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in ("resnet101", "resnet152") else n
    for n in sorted(TABLE1_GMACS)])
def test_multiply_adds_match_table1(name):
    """With the paper's stride placement (stride_in_1x1=True for the bottleneck nets) the
    multiply-adds of cnnjax.analysis.summary's abstract trace are within 2% of Table 1 (1.81,
    3.66, 3.86, 7.57, 11.28 G); torchvision's stride on the 3x3, the default, costs ResNet-50
    6% more (4.09 G)."""
    from cnnjax.analysis.summary import summary

    paper = {"stride_in_1x1": True} if name not in ("resnet18", "resnet34") else {}
    gmacs = summary(create_model(name, **paper), (224, 224, 3)).totals["macs"] / 1e9
    assert gmacs == pytest.approx(TABLE1_GMACS[name], rel=0.02)
    if name == "resnet50":
        default = summary(create_model(name), (224, 224, 3)).totals["macs"] / 1e9
        assert default == pytest.approx(4.089, abs=1e-3)


def test_feature_names_order_and_strides():
    model = create_model("resnet18", num_classes=5)
    x = jnp.ones((1, 64, 64, 3))
    variables = model.init(jax.random.key(0), x)
    logits, feats = model.apply(variables, x, return_features=True)
    assert list(feats) == ["stem", "stage1", "stage2", "stage3", "stage4", "pre_logits"]
    assert [feats[k].shape for k in list(feats)[:5]] == [
        (1, 32, 32, 64),
        (1, 16, 16, 64),
        (1, 8, 8, 128),
        (1, 4, 4, 256),
        (1, 2, 2, 512),
    ]
    np.testing.assert_allclose(feats["pre_logits"], feats["stage4"].mean(axis=(1, 2)), rtol=1e-6)
    # The head is a plain linear map of pre_logits.
    head = variables["params"]["head"]
    np.testing.assert_allclose(
        logits, feats["pre_logits"] @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6
    )


def test_cifar_features_and_output_shapes():
    model = create_model("resnet20_cifar")
    x = jnp.ones((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    logits, feats = jax.eval_shape(lambda v: model.apply(v, x, return_features=True), variables)
    assert logits.shape == (2, 10)
    assert set(feats) == {"stem", "stage1", "stage2", "stage3", "pre_logits"}
    assert [feats[k].shape for k in ("stem", "stage1", "stage2", "stage3")] == [
        (2, 32, 32, 16),
        (2, 32, 32, 16),
        (2, 16, 16, 32),
        (2, 8, 8, 64),
    ]


def test_bfloat16_compute_keeps_float32_params():
    model = create_model("resnet20_cifar", dtype=jnp.bfloat16)
    x = jnp.ones((2, 16, 16, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    logits, feats = jax.eval_shape(lambda v: model.apply(v, x, return_features=True), variables)
    assert feats["stage1"].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32


# --- BatchNorm behaviour ------------------------------------------------------------------------


def test_batchnorm_running_stats_update_in_train_mode():
    model = create_model("resnet20_cifar")
    x = jax.random.normal(jax.random.key(3), (4, 16, 16, 3)) * 2.0 + 1.0
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(
        variables, x, train=True, mutable=["batch_stats"], capture_intermediates=True
    )
    conv_out = np.asarray(state["intermediates"]["conv_init"]["__call__"][0], np.float64)
    new = state["batch_stats"]["bn_init"]
    # flax momentum 0.9: running = 0.9 * running + 0.1 * batch statistic (init mean 0, var 1).
    np.testing.assert_allclose(
        new["mean"], 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        new["var"], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    # Eval mode does not touch the statistics.
    _, eval_state = model.apply(variables, x, train=False, mutable=["batch_stats"])
    for a, b in zip(
        jax.tree.leaves(eval_state["batch_stats"]),
        jax.tree.leaves(variables["batch_stats"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_batch_norm_running_variance_is_biased_unlike_pytorch():
    """`batch_norm`'s documented update, against NumPy: running mean as PyTorch's; running
    variance with the biased batch variance (flax), not PyTorch's unbiased one, so the two
    differ by a factor n / (n - 1) on the update, n the values per channel (here 2 x 2 x 2)."""
    x = np.random.default_rng(0).normal(1.0, 2.0, (2, 2, 2, 3)).astype(np.float32)
    bn = batch_norm(True, jnp.float32, None)()
    variables = bn.init(jax.random.key(0), x)
    y, state = bn.apply(variables, x, mutable=["batch_stats"])
    x64 = x.astype(np.float64)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean, var_biased = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    var_unbiased = x64.var(axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(var_unbiased, var_biased * n / (n - 1))
    # Both frameworks normalize with the biased batch variance in training.
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var_biased + 1e-5), rtol=1e-4, atol=1e-5)
    stats = state["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var_biased, rtol=1e-5)
    pytorch_var = 0.9 + 0.1 * var_unbiased  # torch.nn.BatchNorm2d(momentum=0.1)'s update
    assert np.all(np.abs(np.asarray(stats["var"]) - pytorch_var) > 1e-3)
    doc = " ".join(batch_norm.__doc__.split())
    assert "PyTorch-equivalent" not in doc
    assert "biased batch variance" in doc and "n / (n - 1)" in doc


def test_eval_uses_running_averages_train_uses_batch_stats():
    model = create_model("resnet20_cifar")
    x = jax.random.normal(jax.random.key(4), (4, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    # Eval: each example's output is independent of the rest of the batch.
    full = model.apply(variables, x)
    np.testing.assert_allclose(full[:1], model.apply(variables, x[:1]), rtol=1e-5, atol=1e-6)
    # Train: batch statistics couple the examples.
    train_full, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    train_one, _ = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])
    assert not np.allclose(train_full[:1], train_one[:1], atol=1e-4)
    # Eval output changes when the running statistics change.
    shifted = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])
    assert not np.allclose(full, model.apply({**variables, "batch_stats": shifted}, x), atol=1e-4)


# --- Blocks, shortcuts, options ------------------------------------------------------------------


def _block_parts(train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init)
    return conv, batch_norm(train, jnp.float32, None)


def test_option_a_shortcut_has_no_params_and_pads_zero_channels():
    conv, norm = _block_parts()
    block = BasicBlock(32, conv=conv, norm=norm, strides=2, shortcut="A", zero_init_last_bn=True)
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 8, 16)))
    variables = block.init(jax.random.key(1), x)
    assert not any("proj" in p for p in param_paths(variables))
    y = block.apply(variables, x)
    # Zero-init last BN: the residual branch is 0, so the output is the shortcut itself.
    expected = np.concatenate([np.asarray(x)[:, ::2, ::2, :], np.zeros((2, 4, 4, 16))], axis=-1)
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_option_b_and_c_shortcuts_have_projection_params():
    conv, norm = _block_parts()
    x = jnp.ones((1, 8, 8, 16))
    down = BasicBlock(32, conv=conv, norm=norm, strides=2, shortcut="B")
    same_b = BasicBlock(16, conv=conv, norm=norm, shortcut="B")
    same_c = BasicBlock(16, conv=conv, norm=norm, shortcut="C")
    assert {"proj_conv/kernel", "proj_bn/scale", "proj_bn/bias"} <= param_paths(
        down.init(jax.random.key(0), x)
    )
    assert not any("proj" in p for p in param_paths(same_b.init(jax.random.key(0), x)))
    assert "proj_conv/kernel" in param_paths(same_c.init(jax.random.key(0), x))
    # ResNet-20 with option B: two projections 16->32 and 32->64 (1x1 conv + BN) more than option A.
    a = n_params(create_model("resnet20_cifar"), (1, 32, 32, 3))
    b = n_params(create_model("resnet20_cifar", shortcut="B"), (1, 32, 32, 3))
    assert b - a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_plain_net_has_no_shortcut_params_and_no_skip():
    model = create_model("plain20_cifar")
    variables = model.init(jax.random.key(0), jnp.ones((1, 16, 16, 3)))
    assert not any("proj" in p for p in param_paths(variables))
    conv, norm = _block_parts()
    plain = BasicBlock(16, conv=conv, norm=norm, shortcut="none", zero_init_last_bn=True)
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (1, 8, 8, 16)))
    v = plain.init(jax.random.key(1), x)
    # Without a shortcut, a zero-gamma block outputs relu(beta) = 0, not x.
    np.testing.assert_array_equal(plain.apply(v, x), np.zeros_like(x))


def test_option_a_cannot_shrink_channels():
    conv, norm = _block_parts()
    block = BasicBlock(8, conv=conv, norm=norm, shortcut="A")
    with pytest.raises(
        ValueError, match=r"BasicBlock: shortcut='A' is invalid; option 'A' can only widen"
    ):
        block.init(jax.random.key(0), jnp.ones((1, 4, 4, 16)))


def test_a_cifar_resnet_narrowing_with_option_a_is_refused_by_its_widths():
    """It was accepted and failed at the first trace, naming the block, not the model's field."""
    with pytest.raises(ValueError, match=re.escape(
            "CifarResNet: widths=(32, 16, 8) is invalid; expected widths that never decrease "
            "with shortcut 'A'")):
        create_model("resnet20_cifar", widths=(32, 16, 8))
    create_model("resnet20_cifar", widths=(32, 16, 8), shortcut="B")  # projections may narrow


@pytest.mark.parametrize("block_cls", [BasicBlock, BottleneckBlock])
def test_zero_init_last_bn_makes_identity_blocks_identity(block_cls):
    conv, norm = _block_parts()
    filters = 16 if block_cls is BasicBlock else 4  # bottleneck outputs 4 * 4 = 16 channels
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 8, 16)))
    zero = block_cls(filters, conv=conv, norm=norm, zero_init_last_bn=True)
    variables = zero.init(jax.random.key(1), x)
    last_bn = "bn2" if block_cls is BasicBlock else "bn3"
    np.testing.assert_array_equal(variables["params"][last_bn]["scale"], 0.0)
    np.testing.assert_allclose(zero.apply(variables, x), x, atol=1e-6)
    default = block_cls(filters, conv=conv, norm=norm)
    assert not np.allclose(default.apply(default.init(jax.random.key(1), x), x), x, atol=1e-3)


def test_zero_init_resnet18_stage1_passes_pooled_stem_through():
    model = create_model("resnet18", num_classes=3, zero_init_last_bn=True)
    x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    variables = model.init(jax.random.key(1), x)
    _, feats = model.apply(variables, x, return_features=True)
    pooled = nn.max_pool(feats["stem"], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_allclose(feats["stage1"], pooled, atol=1e-6)


def test_stride_in_1x1_moves_the_stride_not_the_params():
    x = jnp.ones((1, 64, 64, 3))
    shapes = {}
    for v1 in (False, True):
        model = create_model("resnet50", num_classes=10, stride_in_1x1=v1)
        # Shapes only (jax.eval_shape): nothing is computed.
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x))
        _, state = jax.eval_shape(
            lambda v, m=model: m.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
            variables,
        )
        block = state["intermediates"]["stage2_block1"]
        shapes[v1] = (block["conv1"]["__call__"][0].shape, block["conv2"]["__call__"][0].shape)
        shapes[(v1, "n")] = sum(p.size for p in jax.tree.leaves(variables["params"]))
    # stage2 input is 16x16 (64 / 4): v1.5 halves at the 3x3, v1 at the first 1x1.
    assert shapes[False] == ((1, 16, 16, 128), (1, 8, 8, 128))
    assert shapes[True] == ((1, 8, 8, 128), (1, 8, 8, 128))
    assert shapes[(False, "n")] == shapes[(True, "n")]


# --- Validation ----------------------------------------------------------------------------------


def test_invalid_arguments_raise_documented_errors():
    with pytest.raises(
        ValueError, match=r"ResNet: num_classes=0 is invalid; expected a positive integer\."
    ):
        ResNet(stage_sizes=(2, 2), block_cls=BasicBlock, num_classes=0)
    with pytest.raises(
        ValueError, match=r"ResNet: stage_sizes=\(\) is invalid; expected a non-empty"
    ):
        ResNet(stage_sizes=(), block_cls=BasicBlock)
    with pytest.raises(ValueError, match=r"ResNet: shortcut='D' is invalid; expected one of"):
        create_model("resnet18", shortcut="D")
    with pytest.raises(ValueError, match=r"BottleneckBlock: strides=0 is invalid"):
        BottleneckBlock(4, conv=nn.Conv, norm=nn.BatchNorm, strides=0)
    with pytest.raises(ValueError, match=r"CifarResNet: depth=21 is invalid; expected 6n \+ 2"):
        CifarResNet(depth=21)
    with pytest.raises(ValueError, match=r"CifarResNet: widths=\(\) is invalid"):
        CifarResNet(widths=())
    with pytest.raises(ValueError, match=r"CifarResNet: depth=20 is invalid; expected 4n \+ 2 "
                                         r"with n >= 1 for 2 stages of widths \(16, 32\)"):
        CifarResNet(depth=20, widths=(16, 32))  # would silently build 18 weight layers
    with pytest.raises(ValueError, match=r"CifarResNet: widths=\(True, 2, 3\) is invalid"):
        CifarResNet(widths=(True, 2, 3))
    # A string from a config file is not silently truthy.
    with pytest.raises(ValueError, match=r"CifarResNet: zero_init_last_bn='False' is invalid; "
                                         r"expected True or False"):
        create_model("resnet20_cifar", zero_init_last_bn="False")
    with pytest.raises(ValueError, match=r"ResNet: zero_init_last_bn=1 is invalid"):
        create_model("resnet18", zero_init_last_bn=1)
    with pytest.raises(ValueError, match=r"BasicBlock: zero_init_last_bn='yes' is invalid"):
        BasicBlock(4, conv=nn.Conv, norm=nn.BatchNorm, zero_init_last_bn="yes")
    assert CifarResNet(depth=18, widths=(16, 32)).blocks_per_stage == 4
    model = create_model("resnet18")
    with pytest.raises(
        ValueError, match=r"ResNet: input.shape=\(32, 32, 3\) is invalid; expected a rank-4"
    ):
        model.init(jax.random.key(0), jnp.ones((32, 32, 3)))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
@pytest.mark.parametrize("kwargs", [{"stage_sizes": (3, 4, 6, 3)}, {"block_cls": BasicBlock},
                                    {"block_cls": None}])
def test_resnet_n_refuses_the_fields_its_name_fixes(name, kwargs):
    """As resnet20_cifar's depth: a stage_sizes override used to turn resnet18 into a 21.8M
    parameter ResNet-34 silently, block_cls=None failed late with a TypeError."""
    (field, value), = kwargs.items()
    message = (f"create_model: {field}={value!r} is invalid; model {name!r} does not take "
               f"{field!r} (unknown, or fixed by its name)")
    with pytest.raises(ModelArgumentError, match="^" + re.escape(message)):
        create_model(name, **kwargs)
    assert not {"stage_sizes", "block_cls"} & set(settable_fields(name))


@pytest.mark.parametrize("block_cls", [None, int, "BasicBlock", functools.partial(int)])
def test_resnet_block_cls_must_be_a_module_class(block_cls):
    with pytest.raises(ValueError, match=r"^ResNet: block_cls=.* is invalid; expected a block "
                                         r"module class"):
        ResNet(stage_sizes=(2, 2), block_cls=block_cls)
    # The ResNetN partials stay general: a partial of a block class is a block class.
    model = ResNet(stage_sizes=(1,), block_cls=functools.partial(BasicBlock, shortcut="B"))
    assert model.block_cls.func is BasicBlock


# --- Learning ------------------------------------------------------------------------------------


def _overfit(name: str, steps: int, size: int, batch: int = 8) -> tuple[float, float]:
    model = create_model(name, num_classes=10)
    tx = optax.adam(3e-3)

    @jax.jit
    def start():  # data, init and the optimizer state in one compile, not one per op
        x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
        variables = model.init(jax.random.key(1), x)
        params = variables["params"]
        return x, jnp.arange(batch) % 10, params, variables["batch_stats"], tx.init(params)

    x, y, params, stats, opt_state = start()

    @jax.jit
    def step(params, stats, opt_state):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd[
                "batch_stats"
            ]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    losses = []
    # One step more than `steps`: its loss, taken before its update, is the trained network's
    # (train-mode BN, the current statistics), through the compiled step rather than a second
    # compile of the forward pass.
    for _ in range(steps + 1):
        params, stats, opt_state, loss = step(params, stats, opt_state)
        losses.append(loss)
    first, final = float(losses[0]), float(losses[-1])
    return first, final


def test_resnet20_overfits_tiny_batch_quick():
    first, final = _overfit("resnet20_cifar", steps=60, size=8)
    assert first > 1.5 and final < 0.05


@pytest.mark.slow
def test_resnet20_overfits_tiny_batch_32px():
    first, final = _overfit("resnet20_cifar", steps=300, size=32, batch=16)
    assert first > 1.5 and final < 0.01


def test_cifar_stem_keeps_resolution_and_differs_only_in_stem_kernel():
    """stem="cifar": 3x3/1 stem conv, no max pool (stages at strides 1, 2, 4, 8)."""
    x = jnp.ones((1, 16, 16, 3))
    imagenet = create_model("resnet18", num_classes=5)
    cifar = create_model("resnet18", num_classes=5, stem="cifar")
    shapes = {k: v.shape for k, v in flatten_dict(jax.eval_shape(
        lambda: imagenet.init(jax.random.key(0), x))["params"]).items()}
    cifar_vars = cifar.init(jax.random.key(0), x)
    cifar_shapes = {k: v.shape for k, v in flatten_dict(cifar_vars["params"]).items()}
    assert set(shapes) == set(cifar_shapes)
    assert {k for k in shapes if shapes[k] != cifar_shapes[k]} == {("conv_init", "kernel")}
    assert cifar_shapes[("conv_init", "kernel")] == (3, 3, 3, 64)
    assert n_params(cifar, x.shape) == IMAGENET_COUNTS["resnet18"] - 1000 * 513 + 5 * 513 - (
        49 - 9) * 3 * 64
    _, feats = cifar.apply(cifar_vars, x, return_features=True)
    assert [feats[k].shape[1] for k in ("stem", "stage1", "stage2", "stage3", "stage4")] == [
        16, 16, 8, 4, 2]
    # The stem is exactly conv(3x3, pad 1) -> BN (eval: running stats 0/1) -> ReLU.
    kernel = cifar_vars["params"]["conv_init"]["kernel"]
    bn = cifar_vars["params"]["bn_init"]
    conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    expected = jax.nn.relu(conv / np.sqrt(1 + 1e-5) * bn["scale"] + bn["bias"])
    np.testing.assert_allclose(feats["stem"], expected, rtol=1e-5, atol=1e-6)


def test_invalid_stem_raises_documented_error():
    with pytest.raises(
        ValueError, match=r"ResNet: stem='tiny' is invalid; expected one of \['imagenet', 'cifar'\]"
    ):
        create_model("resnet18", stem="tiny")


# --- Stochastic depth ----------------------------------------------------------------------------

RESNET_NAMES = sorted(IMAGENET_COUNTS) + [f"resnet{d}_cifar" for d in sorted(CIFAR_COUNTS_M)]


@pytest.mark.parametrize("name", RESNET_NAMES)
def test_drop_path_rate_is_a_model_kwarg_of_every_resnet(name):
    from cnnjax.train.config import model_kwargs_config

    assert "drop_path_rate" in model_kwargs_config(name)
    assert create_model(name).drop_path_rate == 0.0
    assert create_model(name, drop_path_rate=0.2).drop_path_rate == 0.2


@pytest.mark.parametrize(("name", "size", "blocks"), [
    ("resnet18", 32, [f"stage{i}_block{j}" for i in (1, 2, 3, 4) for j in (1, 2)]),
    ("resnet50", 32, [f"stage{i}_block{j + 1}" for i, n in enumerate((3, 4, 6, 3), 1)
                      for j in range(n)]),
    ("resnet20_cifar", 32, [f"stage{i}_block{j}" for i in (1, 2, 3) for j in (1, 2, 3)]),
])
def test_block_drop_rates_decay_linearly_with_depth(name, size, blocks):
    """Block l of L (in forward order) drops its branch with drop_path_rate * l / L."""
    from tests.models.cifar import drop_path_rates

    assert drop_path_rates(create_model(name), size) == {}  # rate 0: no DropPath at all
    rates = drop_path_rates(create_model(name, drop_path_rate=0.3), size)
    assert list(rates) == blocks
    np.testing.assert_allclose(list(rates.values()),
                               [0.3 * l / len(blocks) for l in range(1, len(blocks) + 1)])  # noqa: E741
    assert rates[blocks[-1]] == 0.3


#: Small residual networks by label, built with extra keywords. "cifar8" is the CifarResNet class
#: of resnet20_cifar at depth 8 (one block per stage, 1/4 width): its DropPath wiring at a third
#: of the compile (test_block_drop_rates_decay_linearly_with_depth checks resnet20_cifar's rates).
TINY_RESNETS = {
    "cifar8": lambda **kw: CifarResNet(depth=8, widths=(4, 8, 16), num_classes=3, **kw),
    "basic": lambda **kw: ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=8,
                                 num_classes=3, stem="cifar", **kw),
    "bottleneck": lambda **kw: ResNet(stage_sizes=(2, 1), block_cls=BottleneckBlock,
                                      num_filters=4, num_classes=3, stem="cifar", **kw),
}


@pytest.mark.parametrize("label", sorted(TINY_RESNETS))
def test_stochastic_depth_changes_training_only(label):
    from tests.models.cifar import plain_and_stochastic_depth_outputs

    plain, sd = TINY_RESNETS[label](), TINY_RESNETS[label](drop_path_rate=0.5)
    variables, sd_variables, evals, trains = plain_and_stochastic_depth_outputs(
        plain, sd, jax.random.normal(jax.random.key(1), (8, 16, 16, 3)))
    # No parameters or statistics added: the same init gives the same variables.
    assert jax.tree.structure(sd_variables) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, sd_variables, variables)
    np.testing.assert_array_equal(evals["sd"], evals["plain"])  # inference: the plain network
    assert not np.allclose(trains["sd", 0], trains["sd", 1], atol=1e-4)  # masks follow the key
    assert not np.allclose(trains["sd", 0], trains["plain", 0], atol=1e-4)


@pytest.mark.parametrize("block_cls", [BasicBlock, BottleneckBlock])
def test_drop_path_drops_the_branch_before_the_addition(block_cls):
    """With an identity activation, a dropped example's output is its shortcut (here x) and a
    kept one's is x + F(x) / (1 - rate), F(x) being the same block's branch without DropPath."""
    conv, norm = _block_parts(train=True)
    filters = 16 if block_cls is BasicBlock else 4
    x = jax.random.normal(jax.random.key(0), (16, 6, 6, 16))
    identity = lambda y: y  # noqa: E731
    plain = block_cls(filters, conv=conv, norm=norm, act=identity)
    sd = block_cls(filters, conv=conv, norm=norm, act=identity, drop_path_rate=0.5,
                   deterministic=False)
    variables = plain.init(jax.random.key(1), x)

    @functools.partial(jax.jit, static_argnums=0)
    def run(module):
        return module.apply(variables, x, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(2)})[0]

    branch = np.asarray(run(plain) - x)
    y = np.asarray(run(sd))
    dropped = np.array([np.array_equal(y[i], x[i]) for i in range(len(x))])
    assert 0 < dropped.sum() < len(x)
    np.testing.assert_allclose(y[~dropped], (x + branch / 0.5)[~dropped], rtol=1e-5, atol=1e-5)
    # Evaluation (deterministic=True) is the block without DropPath.
    eval_sd = block_cls(filters, conv=conv, norm=norm, act=identity, drop_path_rate=0.5,
                        deterministic=True)
    np.testing.assert_array_equal(run(eval_sd), run(plain))


class _BlockWithoutDropPath(nn.Module):
    """A custom `block_cls` that knows nothing of stochastic depth."""

    filters: int
    conv: nn.Module
    norm: nn.Module
    act: object = nn.relu
    strides: int = 1
    shortcut: str = "B"
    zero_init_last_bn: bool = False

    @nn.compact
    def __call__(self, x):
        return self.conv(self.filters, (1, 1), (self.strides, self.strides))(x)


def test_custom_blocks_need_drop_path_fields_only_when_it_is_used():
    x = jnp.ones((1, 16, 16, 3))
    build = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=_BlockWithoutDropPath,
                              num_filters=4, num_classes=2)
    jax.eval_shape(lambda: build().init(jax.random.key(0), x))
    with pytest.raises(TypeError, match="drop_path_rate"):
        jax.eval_shape(lambda: build(drop_path_rate=0.1).init(jax.random.key(0), x))


def test_invalid_drop_path_rates_raise_documented_errors():
    cases = [
        (lambda: create_model("resnet18", drop_path_rate=1.0),
         r"^ResNet: drop_path_rate=1.0 is invalid; expected 0 <= drop_path_rate < 1\.$"),
        (lambda: create_model("resnet20_cifar", drop_path_rate=-0.1),
         r"^CifarResNet: drop_path_rate=-0.1 is invalid; expected 0 <= drop_path_rate < 1\.$"),
        (lambda: create_model("resnet20_cifar", drop_path_rate="0.1"),
         r"^CifarResNet: drop_path_rate='0.1' is invalid"),
        (lambda: CifarResNet(depth=20, shortcut="none", drop_path_rate=0.1),
         r"^CifarResNet: drop_path_rate=0.1 is invalid; expected 0 with shortcut='none'"),
        (lambda: create_model("resnet18", shortcut="none", drop_path_rate=0.1),
         r"^ResNet: drop_path_rate=0.1 is invalid; expected 0 with shortcut='none'"),
        (lambda: BasicBlock(8, conv=nn.Conv, norm=nn.BatchNorm, drop_path_rate=0.1),
         r"^BasicBlock: deterministic=None is invalid; expected True \(evaluation\) or False "
         r"\(training\) with drop_path_rate > 0\.$"),
        (lambda: BottleneckBlock(4, conv=nn.Conv, norm=nn.BatchNorm, drop_path_rate=True,
                                 deterministic=True),
         r"^BottleneckBlock: drop_path_rate=True is invalid"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()
    # The registered plain nets fix it at 0 (tests/models/test_registry.py).
    assert create_model("plain20_cifar").drop_path_rate == 0.0


def test_a_plain_net_with_zero_initialized_last_bn_is_refused():
    """Every block of a plain net would output relu(0) = 0: the logits are the same for every
    image and only the head's bias ever gets a gradient (measured before this refusal)."""
    for build, owner in ((lambda: CifarResNet(depth=20, shortcut="none",
                                              zero_init_last_bn=True), "CifarResNet"),
                         (lambda: create_model("resnet18", shortcut="none",
                                               zero_init_last_bn=True), "ResNet")):
        with pytest.raises(ValueError, match=rf"^{owner}: zero_init_last_bn=True is invalid; "
                                             r"expected False with shortcut='none'"):
            build()
    assert create_model("resnet20_cifar", zero_init_last_bn=True).zero_init_last_bn


@pytest.mark.parametrize("name, depth, fits", [
    ("resnet20_cifar", 20, [1, 3, 9]), ("plain56_cifar", 56, [1, 3, 9, 27]),
])
def test_widths_the_names_depth_cannot_split_are_named(name, depth, fits):
    """CifarResNet refused them by `depth` (suggesting depths of 26, 42, ...), which the name
    fixes: following the hint was refused in turn."""
    with pytest.raises(ValueError, match=rf"^{name}: widths=\(16, 32, 64, 128\) is invalid; "
                                         rf"depth {depth} \(fixed by {name}\) is 2·stages·n \+ 2, "
                                         rf"so it takes {re.escape(str(fits))} stages, not 4"):
        create_model(name, widths=(16, 32, 64, 128))
    create_model(name, widths=(8,) * fits[1])  # a stage count that fits builds

"""Tests for DenseNet-BC 121/169/201 and its dense layer, dense block and transition."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax.models import create_model, list_models
from cnnjax.models.densenet import DenseBlock, DenseLayer, DenseNet, Transition
from cnnjax.models.resnet import batch_norm

# torchvision's published counts (1000 classes).
COUNTS = {"densenet121": 7_978_856, "densenet169": 14_149_480, "densenet201": 20_013_928}


def _parts(train: bool = False):
    return functools.partial(nn.Conv, use_bias=False), batch_norm(train, jnp.float32, None)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_param_count_exact(name):
    variables = jax.eval_shape(
        lambda: create_model(name).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    )
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == COUNTS[name]


def test_registered():
    assert set(COUNTS) <= set(list_models("densenet*"))


def test_dense_block_concatenates_inputs_and_new_channels():
    conv, norm = _parts()
    block = DenseBlock(3, growth_rate=5, conv=conv, norm=norm)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 7))
    variables = block.init(jax.random.key(1), x)
    y = block.apply(variables, x)
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
    ref = layer.apply(
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
    variables = jax.jit(model.init)(jax.random.key(1), x)

    @jax.jit
    def loss_and_grad(params):
        def loss(p):
            logits, _ = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 2])).mean()

        return jax.value_and_grad(loss)(params)

    value, grads = loss_and_grad(variables["params"])
    assert np.isfinite(float(value)) and float(optax.global_norm(grads)) > 0


def test_dense_layer_dropout_only_in_training():
    conv, norm = _parts()
    layer = DenseLayer(6, conv=conv, norm=norm, drop_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 5))
    variables = layer.init(jax.random.key(1), x)
    evaluated = layer.apply(variables, x)  # no 'dropout' RNG needed (flax would raise)
    a = layer.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=True)[0]
    b = layer.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)}, mutable=True)[0]
    assert not np.array_equal(a, b)
    dropped = np.asarray(a) == 0
    assert 0.3 < dropped.mean() < 0.7  # rate 0.5 over 192 values
    # Kept values are the dropout-free output scaled by 1 / (1 - rate).
    plain = DenseLayer(6, conv=conv, norm=norm)
    ref = np.asarray(plain.apply(variables, x, train=True, mutable=True)[0])
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

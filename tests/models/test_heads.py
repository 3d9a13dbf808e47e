"""Tests for replace_head, trainable_mask and freeze_backbone (transfer learning)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from cnnjax.models import create_model, list_models, model_info, replace_head
from cnnjax.models.heads import HEAD_MODULES, freeze_backbone, trainable_mask
from cnnjax.models.resnet_cifar import CifarResNet


@pytest.fixture(scope="module")
def resnet20():
    model = CifarResNet(depth=8)  # the smallest CIFAR ResNet (n=1) keeps compilation short
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    # Non-trivial BN statistics, so copying them is checked too.
    _, state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x * 3.0 + 1.0
    )
    return model, x, {**variables, "batch_stats": state["batch_stats"]}


def test_replace_head_keeps_backbone_bitwise_and_reinitializes_head(resnet20):
    model, x, variables = resnet20
    new_model, new_vars = replace_head(model, variables, 5, jax.random.key(7), sample_input=x)
    assert new_model.num_classes == 5 and model.num_classes == 10
    assert new_vars["params"]["head"]["kernel"].shape == (64, 5)
    assert new_vars["params"]["head"]["bias"].shape == (5,)
    old, new = flatten_dict(variables), flatten_dict(new_vars)
    assert set(old) == set(new)
    for key, value in old.items():
        if key[:2] != ("params", "head"):
            np.testing.assert_array_equal(np.asarray(new[key]), np.asarray(value), err_msg=str(key))
    # The backbone computes exactly the same features; the new head maps them to 5 classes.
    logits, feats = new_model.apply(new_vars, x, return_features=True)
    _, old_feats = model.apply(variables, x, return_features=True)
    assert logits.shape == (2, 5)
    np.testing.assert_array_equal(feats["pre_logits"], old_feats["pre_logits"])


def test_replace_head_same_classes_still_draws_a_fresh_head(resnet20):
    model, x, variables = resnet20
    _, new_vars = replace_head(model, variables, 10, jax.random.key(3), sample_input=x)
    assert new_vars["params"]["head"]["kernel"].shape == (64, 10)
    assert not np.array_equal(
        new_vars["params"]["head"]["kernel"], variables["params"]["head"]["kernel"]
    )
    # Fresh values come from the model's own head initializer (flax Dense default: LeCun normal).
    std = float(jnp.std(new_vars["params"]["head"]["kernel"]))
    assert 0.5 / np.sqrt(64) < std < 1.5 / np.sqrt(64)
    # Deterministic in the rng.
    _, again = replace_head(model, variables, 10, jax.random.key(3), sample_input=x)
    np.testing.assert_array_equal(
        again["params"]["head"]["kernel"], new_vars["params"]["head"]["kernel"]
    )


CLASSIFIERS = [n for n in list_models() if not n.startswith("fcn")]
# One model per architecture class in the default suite; every classifier in the slow one.
QUICK = {
    "lenet5",
    "alexnet_2tower",
    "vgg11",
    "nin",
    "googlenet",
    "resnet18",
    "resnet20_cifar",
    "densenet40_cifar",  # DenseNet's class, 36 layers not 58 bottleneck ones: ~half the CPU
}


@pytest.mark.parametrize(
    "name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in CLASSIFIERS]
)
def test_replace_head_works_for_every_classifier(name):
    model = create_model(name)
    x = jnp.zeros((1, *model_info(name).input_shape))
    # Shapes only for the backbone (no memory); the new head is materialized.
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    new_model, new_vars = replace_head(model, variables, 7, jax.random.key(1))
    head = new_vars["params"]["head"]
    assert isinstance(head["kernel"], jax.Array) and head["kernel"].shape[-1] == 7
    old, new = flatten_dict(variables), flatten_dict(new_vars)
    assert {k for k in old if old[k] is not new[k]} == {
        k for k in old if k[:2] == ("params", "head")
    }
    out = jax.eval_shape(lambda v: new_model.apply(v, x), new_vars)
    assert out.shape == (1, 7)


def test_replace_head_on_fcn_reinitializes_all_class_dependent_layers():
    model = create_model("fcn8s_resnet18", num_classes=21)
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    new_model, new_vars = replace_head(model, variables, 3, jax.random.key(1), sample_input=x)
    fresh = {k for k, v in flatten_dict(new_vars).items() if isinstance(v, jax.Array)}
    assert {k[1] for k in fresh} == {
        "head",
        "score_pool4",
        "score_pool3",
        "upscore2",
        "upscore_pool4",
    }
    # (ResNet FCNs upsample 2x with the corner-aligned 3x3 kernel, see cnnjax.models.fcn)
    assert new_vars["params"]["upscore2"]["kernel"].shape == (3, 3, 3, 3)
    assert jax.eval_shape(lambda v: new_model.apply(v, x), new_vars).shape == (1, 64, 64, 3)


@pytest.mark.parametrize("name, head_modules", [
    ("fcn8s_resnet18", {"head", "score_pool4", "score_pool3", "upscore2", "upscore_pool4"}),
    ("googlenet", {"head", "aux1", "aux2"}),
])
def test_replace_head_with_the_same_classes_refreshes_every_head_module(name, head_modules):
    """Same num_classes: no shape changes, yet FCN's score layers and GoogLeNet's auxiliary
    heads are head modules (what a linear probe trains) and start fresh too."""
    kwargs = {"aux_logits": True} if name == "googlenet" else {}
    model = create_model(name, num_classes=7, **kwargs)
    x = jnp.zeros((1, *model_info(name).input_shape))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    _, new_vars = replace_head(model, variables, 7, jax.random.key(1), sample_input=x)
    flat = flatten_dict(new_vars)
    fresh = {k for k, v in flat.items() if isinstance(v, jax.Array)}
    assert {k[1] for k in fresh} == head_modules
    if name == "googlenet":  # only the auxiliary classifiers' own `head`s, not their convs
        assert {k[2] for k in fresh if k[1] == "aux1"} == {"head"}
    # Every leaf of those modules, biases included, is fresh: none kept as a ShapeDtypeStruct.
    in_head = {k for k in flat if k[1] in head_modules
               and (k[1] not in ("aux1", "aux2") or k[2] == "head")}
    assert {k[-1] for k in in_head} >= {"kernel", "bias"}
    assert fresh == in_head


def test_replace_head_with_the_same_classes_overwrites_trained_head_values():
    """A "trained" LeNet-5 head (every leaf 7) replaced with the same 10 classes: its kernel and
    bias are both drawn afresh, no element keeps the old value."""
    model = create_model("lenet5")
    x = jnp.zeros((1, *model_info("lenet5").input_shape))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    variables = {**variables, "params": {**variables["params"], "head": jax.tree.map(
        lambda a: jnp.full_like(a, 7.0), variables["params"]["head"])}}
    _, new_vars = replace_head(model, variables, 10, jax.random.key(1), sample_input=x)
    head = new_vars["params"]["head"]
    assert set(head) == {"kernel", "bias"}
    for name, leaf in head.items():
        assert not np.any(np.asarray(leaf) == 7.0), name


def test_replace_head_errors(resnet20):
    model, x, variables = resnet20
    with pytest.raises(
        ValueError, match=r"replace_head: num_classes=0 is invalid; expected a positive"
    ):
        replace_head(model, variables, 0, jax.random.key(0), sample_input=x)
    no_head = {"params": {k: v for k, v in variables["params"].items() if k != "head"}}
    with pytest.raises(
        ValueError, match=r"replace_head: variables=.* is invalid; expected a 'head'"
    ):
        replace_head(model, no_head, 3, jax.random.key(0), sample_input=x)
    deeper = create_model("resnet32_cifar")  # blamed the input shape, naming no leaf
    with pytest.raises(
        ValueError, match=r"^replace_head: variables='CifarResNet' is invalid; they are not "
                          r"this model's: batch_stats/\S+ is a leaf the model has but the "
                          r"variables lack \(\d+ such, 0 the other way\); pass the model the"
    ):
        replace_head(deeper, variables, 3, jax.random.key(0), sample_input=x)
    lenet = create_model("lenet5")  # flattens its map: its f6 kernel depends on the input size
    grey = jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32)
    lenet_variables = jax.eval_shape(lambda x: lenet.init(jax.random.key(0), x), grey)
    with pytest.raises(  # the same model at another input size: the shape that differs
        ValueError, match=re.escape(
            "replace_head: variables='LeNet5' is invalid; they do not match the model at input "
            "shapes [(1, 36, 36, 1)] (params/f6/kernel: (120, 84) in the variables, (480, 84) in "
            "the model); pass the sample_input")):
        replace_head(lenet, lenet_variables, 3, jax.random.key(0),
                     sample_input=jnp.zeros((1, 36, 36, 1)))
    with pytest.raises(ValueError, match=re.escape(
            "replace_head: variables=\"collections ['params']\" is invalid; expected the model's "
            "collections ['batch_stats', 'params'] (all of model.init's output).")):
        replace_head(model, {"params": variables["params"]}, 3, jax.random.key(0), sample_input=x)
    with pytest.raises(
        ValueError, match=r"replace_head: model='Dense' is invalid; expected a num_classes"
    ):
        import flax.linen as nn

        replace_head(nn.Dense(3), variables, 3, jax.random.key(0), sample_input=x)


def test_trainable_mask(resnet20):
    _, _, variables = resnet20
    params = variables["params"]
    mask = flatten_dict(trainable_mask(params))
    assert all(v == (k[0] == "head") for k, v in mask.items())
    assert sum(mask.values()) == 2  # head kernel and bias
    assert all(flatten_dict(trainable_mask(params, train_backbone=True)).values())
    assert "head" in HEAD_MODULES
    with pytest.raises(
        ValueError, match=r"trainable_mask: params=.* is invalid; expected at least one head"
    ):
        trainable_mask({"conv": {"kernel": jnp.zeros(3)}})


def test_freeze_backbone_updates_only_the_head(resnet20):
    model, x, variables = resnet20
    params = variables["params"]
    tx = freeze_backbone(optax.sgd(0.1), params)
    opt_state = tx.init(params)

    def loss(p):
        logits, _ = model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 2])).mean()

    grads = jax.jit(jax.grad(loss))(params)
    updates, _ = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    for key, value in flatten_dict(params).items():
        changed = not np.array_equal(flatten_dict(new)[key], value)
        assert changed == (key[0] == "head"), key


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_frozen_negative_zero_stays_bitwise(dtype):
    """optax.set_to_zero's +0.0 update turned a frozen -0.0 into +0.0 (-0.0 + 0.0 = +0.0), so
    frozen parameters were not bitwise unchanged; the engine's freeze_optimizer is the same."""
    from cnnjax.train.state import freeze_optimizer

    params = {"conv": {"bias": jnp.asarray([-0.0, 0.0, 1.0, -2.0], dtype)},
              "head": {"kernel": jnp.ones((4, 2), dtype)}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9))
    for frozen in (freeze_backbone(tx, params), freeze_optimizer(tx, params, "backbone")):
        new, state = params, frozen.init(params)
        for _ in range(3):
            updates, state = frozen.update(grads, state, new)
            new = optax.apply_updates(new, updates)
        bits = np.asarray(jax.lax.bitcast_convert_type(new["conv"]["bias"], jnp.uint16
                                                       if dtype == jnp.bfloat16 else jnp.uint32))
        before = np.asarray(jax.lax.bitcast_convert_type(params["conv"]["bias"], bits.dtype))
        np.testing.assert_array_equal(bits, before)
        assert not np.array_equal(new["head"]["kernel"], params["head"]["kernel"])


def test_trainable_mask_counts_nested_heads_as_heads():
    # GoogLeNet's auxiliary classifiers end in `aux1/head`, `aux2/head` (shapes follow num_classes).
    params = {"head": {"kernel": 0}, "conv": {"kernel": 0},
              "aux1": {"fc": {"kernel": 0}, "head": {"kernel": 0, "bias": 0}}}
    mask = flatten_dict(trainable_mask(params))
    assert mask == {("head", "kernel"): True, ("conv", "kernel"): False,
                    ("aux1", "fc", "kernel"): False, ("aux1", "head", "kernel"): True,
                    ("aux1", "head", "bias"): True}


@pytest.mark.parametrize("value", ["False", 0, None])
def test_trainable_mask_train_backbone_must_be_a_bool(value):
    """The string "False" is truthy: it trained the whole net where a linear probe was asked for."""
    params = {"head": {"kernel": 0}, "conv": {"kernel": 0}}
    message = f"trainable_mask: train_backbone={value!r} is invalid; expected True or False"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        trainable_mask(params, train_backbone=value)

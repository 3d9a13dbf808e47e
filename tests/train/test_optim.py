"""Optimizers and schedules built from config against optax's own and a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cnnjax.train.config import default_config
from cnnjax.train.optim import build_optimizer, build_schedule, weight_decay_mask

STEPS = (0, 1, 7, 30, 55, 99, 100)


def _config(schedule="constant", optimizer="sgd", **fields):
    config = default_config()
    config.num_train_steps = 100
    config.optimizer.learning_rate = 0.1
    config.schedule.name = schedule
    config.optimizer.name = optimizer
    for key, value in fields.items():
        group, name = key.split("__")
        config[group][name] = value
    return config


@pytest.mark.parametrize(
    "name,fields,reference",
    [
        ("constant", {}, optax.constant_schedule(0.1)),
        (
            "piecewise",
            {"schedule__boundaries": (30, 60), "schedule__decay_factor": 0.2},
            optax.piecewise_constant_schedule(0.1, {30: 0.2, 60: 0.2}),
        ),
        (
            "exponential",
            {
                "schedule__transition_steps": 10,
                "schedule__decay_rate": 0.5,
                "schedule__staircase": True,
            },
            optax.exponential_decay(0.1, 10, 0.5, staircase=True),
        ),
        ("cosine", {"schedule__alpha": 0.01}, optax.cosine_decay_schedule(0.1, 100, alpha=0.01)),
        (
            "warmup_cosine",
            {"schedule__warmup_steps": 10, "schedule__end_value": 1e-3},
            optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100, 1e-3),
        ),
        ("linear", {"schedule__end_value": 0.01}, optax.linear_schedule(0.1, 0.01, 100)),
        ("one_cycle", {}, optax.cosine_onecycle_schedule(100, 0.1, 0.3, 25.0, 1e4)),
    ],
)
def test_schedule_matches_optax(name, fields, reference):
    schedule = build_schedule(_config(name, **fields))
    for step in STEPS:
        np.testing.assert_allclose(schedule(step), reference(step), rtol=1e-6)


def test_piecewise_values_by_hand():
    schedule = build_schedule(_config("piecewise", schedule__boundaries=(30, 60)))
    np.testing.assert_allclose(
        [schedule(s) for s in (0, 29, 30, 59, 60, 99)],
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
        rtol=1e-6,
    )


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)), "bias": jnp.ones(4)},
        "bn": {"scale": jnp.full(4, 2.0), "bias": jnp.full(4, 0.5)},
        "head": {"kernel": jax.random.normal(k[1], (4, 3)), "bias": jnp.ones(3)},
    }


def _grads(i):
    return jax.tree.map(lambda p: jnp.sin(p * (i + 1)) + 0.1 * i, _params())


def _run(tx, steps=4):
    params = _params()
    state = tx.init(params)
    for i in range(steps):
        updates, state = tx.update(_grads(i), state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize(
    "name,fields,reference",
    [
        (
            "sgd",
            {
                "optimizer__momentum": 0.9,
                "optimizer__nesterov": True,
                "optimizer__weight_decay": 1e-2,
            },
            lambda lr: optax.chain(
                optax.add_decayed_weights(1e-2, weight_decay_mask),
                optax.sgd(lr, 0.9, nesterov=True),
            ),
        ),
        ("adam", {"optimizer__b1": 0.8}, lambda lr: optax.adam(lr, b1=0.8)),
        (
            "adamw",
            {"optimizer__weight_decay": 0.05},
            lambda lr: optax.adamw(lr, weight_decay=0.05, mask=weight_decay_mask),
        ),
        (
            "rmsprop",
            {"optimizer__decay": 0.95, "optimizer__momentum": 0.5},
            lambda lr: optax.rmsprop(lr, decay=0.95, momentum=0.5),
        ),
        (
            "sgd",
            {"optimizer__momentum": 0.0, "optimizer__grad_clip_norm": 0.5},
            lambda lr: optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(lr)),
        ),
    ],
)
def test_optimizer_matches_optax(name, fields, reference):
    config = _config("cosine", name, **fields)
    schedule = build_schedule(config)
    got, want = _run(build_optimizer(config, schedule)), _run(reference(schedule))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def test_sgd_momentum_weight_decay_matches_numpy_float64():
    """Independent reference: L2-coupled heavy-ball SGD (PyTorch semantics) in float64."""
    config = _config("constant", "sgd", optimizer__momentum=0.9, optimizer__weight_decay=0.1)
    got = _run(build_optimizer(config))
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), _params())
    mask = weight_decay_mask(params)
    velocity = jax.tree.map(np.zeros_like, params)
    for i in range(4):
        grads = jax.tree.map(lambda g: np.asarray(g, np.float64), _grads(i))
        grads = jax.tree.map(lambda g, p, m: g + 0.1 * p * m, grads, params, mask)
        velocity = jax.tree.map(lambda v, g: 0.9 * v + g, velocity, grads)
        params = jax.tree.map(lambda p, v: p - 0.1 * v, params, velocity)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, params)


def test_weight_decay_mask_excludes_biases_and_norm_params():
    mask = weight_decay_mask(_params())
    assert mask == {
        "conv": {"kernel": True, "bias": False},
        "bn": {"scale": False, "bias": False},
        "head": {"kernel": True, "bias": False},
    }


@pytest.mark.parametrize(
    "name,expected_kernel",
    [
        # decoupled (adamw) and L2 (sgd) decay both give p * (1 - lr * wd) on a zero gradient
        ("adamw", lambda p: p * (1 - 0.1 * 0.5)),
        ("sgd", lambda p: p * (1 - 0.1 * 0.5)),
        # adam normalizes the L2 gradient wd * p: the first step moves by lr * sign(p)
        ("adam", lambda p: p - 0.1 * np.sign(p)),
    ],
)
def test_weight_decay_leaves_biases_and_norm_untouched(name, expected_kernel):
    """With zero gradients only decay moves params: kernels shrink, biases/scales stay put."""
    config = _config("constant", name, optimizer__weight_decay=0.5, optimizer__momentum=0.0)
    tx = build_optimizer(config)
    params = _params()
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for module, leaf in (("bn", "scale"), ("bn", "bias"), ("conv", "bias"), ("head", "bias")):
        np.testing.assert_array_equal(new[module][leaf], params[module][leaf])
    for module in ("conv", "head"):
        np.testing.assert_allclose(
            new[module]["kernel"], expected_kernel(np.asarray(params[module]["kernel"])),
            rtol=1e-5, atol=1e-6,
        )


@pytest.mark.parametrize("model_name", ["resnet20_cifar", "vgg11_bn", "densenet121"])
def test_weight_decay_mask_on_zoo_models(model_name):
    """On real models: every parameter of a normalization layer (a module that also keeps
    batch_stats) and every bias is excluded; every conv/dense kernel decays."""
    from cnnjax.models import create_model

    model = create_model(model_name, num_classes=10)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    norm_modules = {
        tuple(str(k.key) for k in path[:-1])
        for path, _ in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
    }
    mask = weight_decay_mask(variables["params"])
    counts = {"norm": 0, "bias": 0, "kernel": 0}
    for path, decays in jax.tree_util.tree_leaves_with_path(mask):
        keys = tuple(str(k.key) for k in path)
        if keys[:-1] in norm_modules:
            kind = "norm"
        else:
            kind = keys[-1]
            assert kind in ("bias", "kernel"), keys
        counts[kind] += 1
        assert decays == (kind == "kernel"), keys
    assert counts["norm"] >= 2 * 3 and counts["kernel"] >= 8  # scale+bias of several BNs


@pytest.mark.parametrize(
    "group,field,value,message",
    [
        (
            "optimizer",
            "name",
            "lamb",
            "optimizer: name='lamb' is invalid; expected one of ['sgd', "
            "'adam', 'adamw', 'rmsprop']",
        ),
        (
            "schedule",
            "name",
            "cyclic",
            "schedule: name='cyclic' is invalid; expected one of ['constant', 'piecewise'",
        ),
        ("optimizer", "learning_rate", 0.0, "optimizer: learning_rate=0.0 is invalid"),
        ("optimizer", "learning_rate", -1.0, "optimizer: learning_rate=-1.0 is invalid"),
        ("optimizer", "weight_decay", -0.1, "optimizer: weight_decay=-0.1 is invalid"),
        ("optimizer", "grad_clip_norm", -1.0, "optimizer: grad_clip_norm=-1.0 is invalid"),
        ("schedule", "boundaries", (60, 30), "schedule: boundaries=(60, 30) is invalid"),
        ("schedule", "warmup_steps", 100, "schedule: warmup_steps=100 is invalid"),
    ],
)
def test_bad_optimizer_or_schedule_messages(group, field, value, message):
    config = _config("warmup_cosine" if field == "warmup_steps" else "piecewise")
    config[group][field] = value
    with pytest.raises(ValueError) as err:
        build_optimizer(config)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("transition_steps", 0, "schedule: transition_steps=0 is invalid; expected a positive"),
        ("decay_rate", 0.0, "schedule: decay_rate=0.0 is invalid; expected 0 < decay_rate <= 1"),
    ],
)
def test_bad_exponential_schedule_messages(field, value, message):
    config = _config("exponential")
    config.schedule[field] = value
    with pytest.raises(ValueError) as err:
        build_schedule(config)
    assert message in str(err.value)


def test_plain_dict_config_is_accepted():
    config = ml_collections.ConfigDict(
        {
            "num_train_steps": 10,
            "optimizer": {"name": "adam", "learning_rate": 1e-3},
            "schedule": {"name": "linear"},
        }
    )
    np.testing.assert_allclose(build_schedule(config)(5), 5e-4, rtol=1e-6)

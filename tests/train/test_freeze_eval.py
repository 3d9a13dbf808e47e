"""`config.freeze='backbone_eval'`: a linear probe whose backbone BatchNorm, dropout and stochastic
depth run in eval mode during training (the linear-evaluation protocol), against 'backbone',
whose backbone keeps train-mode BatchNorm statistics and dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.traverse_util import flatten_dict

from cnnjax.models import create_model
from cnnjax.models.heads import backbone_eval_mode, in_head_module, trainable_mask
from cnnjax.train import loop
from cnnjax.train.config import validate_config
from cnnjax.train.parallel import DataParallel
from cnnjax.train.state import create_train_state, freeze_optimizer
from cnnjax.train.step import make_steps
from tests.train import helpers


def _batch(shape, num_classes, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(size, *shape)).astype(np.float32),
            "label": rng.integers(0, num_classes, size).astype(np.int32)}


def _state(model, freeze, image_shape, random_statistics=False):
    """A fresh state and `(freeze's optimizer, backbone_eval)`, the train step's options, as
    `loop.wrap_steps` sets them; with `random_statistics` its running means and
    variances are drawn away from init's 0 / 1 (so eval-mode BatchNorm differs from the
    identity-like init, and from batch statistics)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, *image_shape)), train=False))
    tx = freeze_optimizer(optax.sgd(0.5), shapes["params"], freeze)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *image_shape))
    if random_statistics:
        keys = iter(jax.random.split(jax.random.PRNGKey(7), 1000))
        stats = jax.tree_util.tree_map_with_path(
            lambda path, x: (jax.random.uniform(next(keys), x.shape, minval=0.5, maxval=2.0)
                             if path[-1].key == "var" else
                             0.3 * jax.random.normal(next(keys), x.shape)),
            state.batch_stats)
        state = state.replace(batch_stats=stats)
    return state, (tx, freeze == "backbone_eval")


def _trainer(model, optimizer, batch_norm_impl="flax"):
    """The engine's train step (pmap, one device), compiled once: `train(state, batches)` runs
    it over `batches` and returns `(final state, per-step metrics)`."""
    tx, backbone_eval = optimizer
    train_step, _ = make_steps(model, tx, optax.constant_schedule(0.5), "data",
                               batch_norm_impl=batch_norm_impl, backbone_eval=backbone_eval)
    parallel = DataParallel("pmap", devices=jax.local_devices()[:1])
    p_train = parallel.wrap_train(train_step)

    def train(state, batches):
        replicated, metrics = parallel.replicate(state), []
        for batch in batches:
            replicated, step_metrics = p_train(replicated, parallel.shard_batch(
                {k: v[None] for k, v in batch.items()}))  # a leading axis of 1 device
            metrics.append(parallel.metrics_to_host(step_metrics))
        return parallel.unreplicate(replicated), metrics

    return train


def _train(model, state, optimizer, batches, batch_norm_impl="flax"):
    """`_trainer`'s step over `batches` from `state`: `(final state, per-step metrics)`."""
    return _trainer(model, optimizer, batch_norm_impl)(state, batches)


def _eval_loss(model, state, batch):
    """Mean cross-entropy of `model` in eval mode (running statistics, no dropout), computed
    apart from the engine's loss code."""
    logits = model.apply(state.variables(), batch["image"], train=False)
    return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["label"])))


def _split(params):
    """`(head leaves, backbone leaves)` of `params`, flattened, by `trainable_mask`."""
    mask = flatten_dict(trainable_mask(params))
    flat = flatten_dict(params)
    return ({k: np.asarray(v) for k, v in flat.items() if mask[k]},
            {k: np.asarray(v) for k, v in flat.items() if not mask[k]})


def _bitwise_equal(a, b):
    a, b = flatten_dict(a), flatten_dict(b)
    return a.keys() == b.keys() and all(
        np.array_equal(np.asarray(a[k]).view(np.uint32), np.asarray(b[k]).view(np.uint32))
        for k in a)


RESNET_SHAPE = (8, 8, 3)


def _resnet():
    # Small widths; stochastic depth on, so eval mode must also switch DropPath off.
    return create_model("resnet20_cifar", num_classes=3, widths=(4, 4, 8), drop_path_rate=0.3)


@pytest.fixture(scope="module")
def resnet_backbone_eval_start():
    """The small ResNet, its 'backbone_eval' start state (random running statistics) and
    optimizer, and two batches: built once for both BatchNorm lowerings (states are immutable)."""
    model = _resnet()
    state, optimizer = _state(model, "backbone_eval", RESNET_SHAPE, random_statistics=True)
    return model, state, optimizer, [_batch(RESNET_SHAPE, 3, seed=s) for s in (0, 1)]


@pytest.mark.parametrize("batch_norm_impl", ["flax", "matmul"])
def test_backbone_eval_trains_the_head_on_the_eval_mode_backbone(batch_norm_impl,
                                                                  resnet_backbone_eval_start):
    """Two steps: batch statistics and every backbone parameter bitwise unchanged, the head
    trained, and each step's loss that of an eval-mode apply of the step's starting variables.
    With the "matmul" BatchNorm lowering too (an interceptor of its own)."""
    model, state, optimizer, batches = resnet_backbone_eval_start
    train = _trainer(model, optimizer, batch_norm_impl)  # one compilation for both steps
    middle, first = train(state, batches[:1])
    final, second = train(middle, batches[1:])

    assert _bitwise_equal(final.batch_stats, state.batch_stats)
    head_before, backbone_before = _split(state.params)
    head_after, backbone_after = _split(final.params)
    assert _bitwise_equal(backbone_after, backbone_before)
    assert max(float(np.max(np.abs(head_after[k] - head_before[k]))) for k in head_before) > 1e-3
    np.testing.assert_allclose(first[0]["loss"], _eval_loss(model, state, batches[0]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second[0]["loss"], _eval_loss(model, middle, batches[1]),
                               rtol=1e-5, atol=1e-6)


def test_backbone_trains_with_batch_statistics():
    """The control: freeze='backbone' keeps the backbone's weights but not its running
    statistics, and its loss is not the eval-mode one."""
    model = _resnet()
    state, optimizer = _state(model, "backbone", RESNET_SHAPE, random_statistics=True)
    batch = _batch(RESNET_SHAPE, 3)
    final, metrics = _train(model, state, optimizer, [batch])
    assert not _bitwise_equal(final.batch_stats, state.batch_stats)
    assert _bitwise_equal(_split(final.params)[1], _split(state.params)[1])
    assert abs(float(metrics[0]["loss"]) - _eval_loss(model, state, batch)) > 1e-3


ALEXNET_SHAPE = (63, 63, 3)


@pytest.mark.parametrize(("freeze", "same"), [("backbone_eval", True), ("backbone", False)])
def test_backbone_dropout_is_off_only_in_backbone_eval(freeze, same):
    """AlexNet's fc6/fc7 dropout is backbone: the same step from states differing only in their
    dropout key gives the same loss and head with 'backbone_eval', different ones with
    'backbone'."""
    model = create_model("alexnet", num_classes=3, hidden_features=32, dropout_rate=0.5)
    batch = _batch(ALEXNET_SHAPE, 3, size=4)
    outcomes, train = [], None
    for rng in (0, 1):
        state, optimizer = _state(model, freeze, ALEXNET_SHAPE)
        state = state.replace(rng=jax.random.PRNGKey(100 + rng))  # only the dropout key differs
        train = train or _trainer(model, optimizer)  # the same step for both: compiled once
        final, metrics = train(state, [batch])
        outcomes.append((float(metrics[0]["loss"]), _split(final.params)[0]))
    (loss_a, head_a), (loss_b, head_b) = outcomes
    assert (loss_a == loss_b) is same
    assert _bitwise_equal(head_a, head_b) is same
    if same:
        np.testing.assert_allclose(loss_a, _eval_loss(model, state, batch), rtol=1e-5, atol=1e-6)


def test_backbone_eval_mode_keeps_the_heads_own_layers_in_train_mode():
    """A BatchNorm and Dropout inside `head` (and a nested `head`) keep the model's train mode;
    the same layers in the backbone switch to eval."""
    import flax.linen as nn

    class Head(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
            return nn.Dropout(0.5)(x, deterministic=not train)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            backbone = nn.BatchNorm(name="bn")(x, use_running_average=not train)
            backbone = nn.Dropout(0.5, deterministic=not train)(backbone)
            return backbone, Head(name="head")(x, train), Head(name="aux")(x, train)

    assert in_head_module(("head", "bn")) and in_head_module(("aux1", "head"))
    assert not in_head_module(("aux1", "fc")) and not in_head_module(())
    net = Net()
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 4)) + 3.0
    variables = net.init(jax.random.PRNGKey(1), x, train=False)
    rngs = {"dropout": jax.random.PRNGKey(2)}
    with backbone_eval_mode():
        (backbone, head, aux), updates = net.apply(variables, x, train=True, rngs=rngs,
                                                   mutable=["batch_stats"])
    # Backbone and the nested module named 'aux' (not a head): running statistics, no dropout.
    for name, out in (("bn", backbone), ("aux", aux)):
        stats = variables["batch_stats"][name] if name == "bn" else (
            variables["batch_stats"]["aux"]["bn"])
        np.testing.assert_allclose(out, (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5),
                                   rtol=1e-6)
    assert _bitwise_equal(updates["batch_stats"]["bn"], variables["batch_stats"]["bn"])
    # The head: batch statistics (updated running averages) and dropout's zeros.
    assert not _bitwise_equal(updates["batch_stats"]["head"], variables["batch_stats"]["head"])
    assert np.mean(np.asarray(head) == 0) > 0.2


def test_backbone_eval_is_a_valid_config_value_and_unknown_ones_name_it():
    validate_config(helpers.tiny_config(freeze="backbone_eval"))
    with pytest.raises(ValueError, match=(
            r"config: freeze='eval' is invalid; expected None \(train every parameter\), "
            r"'backbone' .* or 'backbone_eval' \(train only the head; backbone BatchNorm and "
            r"dropout in eval mode\)")):
        validate_config(helpers.tiny_config(freeze="eval"))


@pytest.mark.parametrize(("freeze", "frozen_statistics"),
                         [("backbone_eval", True), ("backbone", False)])
def test_the_engine_runs_config_freeze_backbone_eval(tmp_path, monkeypatch, freeze,
                                                     frozen_statistics):
    """`config.freeze` reaches the engine's train step (`loop.wrap_steps`): a 4-step run
    of the tiny BatchNorm + dropout model keeps its running statistics only with
    'backbone_eval'."""
    helpers.install_fake_pipeline(monkeypatch)
    initial = helpers.record_initial_states(monkeypatch)
    config = helpers.tiny_config(num_train_steps=4, eval_every_steps=4, freeze=freeze)
    config.model_kwargs.dropout_rate = 0.5
    loop.train_and_evaluate(config, str(tmp_path))
    final = ocp.PyTreeCheckpointer().restore(str(tmp_path / "checkpoints" / "4" / "default"))
    assert _bitwise_equal(final["batch_stats"], initial[0].batch_stats) is frozen_statistics
    assert _bitwise_equal(_split(final["params"])[1], _split(initial[0].params)[1])


@pytest.mark.slow
def test_googlenet_trains_its_auxiliary_heads_on_an_eval_mode_backbone():
    """GoogLeNet (BatchNorm variant) with auxiliary classifiers: one 'backbone_eval' step runs,
    leaves every running statistic (the auxiliary branches' included) and backbone parameter
    unchanged and trains the main and auxiliary heads."""
    shape = (64, 64, 3)
    model = create_model("googlenet_bn", num_classes=3, aux_logits=True)
    state, optimizer = _state(model, "backbone_eval", shape, random_statistics=True)
    final, metrics = _train(model, state, optimizer, [_batch(shape, 3, size=2)])
    assert np.isfinite(metrics[0]["loss"]) and np.isfinite(metrics[0]["aux_loss"])
    assert _bitwise_equal(final.batch_stats, state.batch_stats)
    head_before, backbone_before = _split(state.params)
    head_after, backbone_after = _split(final.params)
    assert _bitwise_equal(backbone_after, backbone_before)
    for module in ("head", "aux1", "aux2"):
        changed = [not np.array_equal(head_after[k], head_before[k])
                   for k in head_before if k[0] == module]
        assert changed and all(changed), module

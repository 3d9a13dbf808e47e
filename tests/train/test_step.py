"""The train/eval steps honour `conv_impl`: the lowering changes, the numbers do not."""

import jax
import numpy as np
import optax
import pytest

from cnnjax.layers.conv_impl import resolve_conv_impl
from cnnjax.train.parallel import DataParallel
from cnnjax.train.state import create_train_state
from cnnjax.train.step import make_steps
from tests.train import helpers


def _one_step(conv_impl):
    model = helpers.TinyNet(axis_name="data")
    tx, schedule = optax.sgd(0.1, momentum=0.9), optax.constant_schedule(0.1)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    train_step, eval_step = make_steps(model, tx, schedule, "data", conv_impl=conv_impl)
    parallel = DataParallel("pmap", devices=jax.local_devices()[:1])
    batch = parallel.shard_batch(next(helpers.train_batches(
        None, global_batch_size=16, num_devices=1, seed=0)))
    p_train = parallel.wrap_train(train_step)
    hlo = p_train.lower(parallel.replicate(state), batch).as_text()
    new_state, metrics = p_train(parallel.replicate(state), batch)
    sums = parallel.wrap_eval(eval_step)(new_state, batch | {"mask": np.ones((1, 16), "f4")})
    return hlo, parallel.unreplicate(new_state.params), parallel.metrics_to_host(sums)


def test_matmul_lowering_reaches_the_traced_step_and_matches_xla():
    hlo_xla, params_xla, sums_xla = _one_step("xla")
    hlo_mm, params_mm, sums_mm = _one_step("matmul")
    assert "convolution" in hlo_xla
    assert "convolution" not in hlo_mm  # every conv (fwd and grads) became patches + dot
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params_xla, params_mm)
    for key in sums_xla:
        np.testing.assert_allclose(sums_mm[key], sums_xla[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("impl", "backend", "expected"), [
    ("auto", "cpu", "auto"), ("auto", "gpu", "xla"), ("matmul", "gpu", "matmul"),
    ("xla", "cpu", "xla"),
])
def test_auto_means_xla_off_cpu(impl, backend, expected):
    assert resolve_conv_impl(impl, backend) == expected


def test_unknown_conv_impl_is_refused():
    with pytest.raises(ValueError, match=r"conv_impl: impl='fft' is invalid; expected one of"):
        resolve_conv_impl("fft", "cpu")


def _dropout_step(mode, dropout_rate, step):
    """One SGD step of TinyNet from a state whose counter is `step`; returns the new params."""
    model = helpers.TinyNet(axis_name="data", dropout_rate=dropout_rate)
    tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    state = state.replace(step=np.int32(step))
    train_step, _ = make_steps(model, tx, schedule, "data")
    parallel = DataParallel(mode, devices=jax.local_devices()[:1])
    batch = parallel.shard_batch(next(helpers.train_batches(
        None, global_batch_size=16, num_devices=1, seed=0)))
    new_state, _ = parallel.wrap_train(train_step)(parallel.replicate(state), batch)
    return parallel.unreplicate(new_state.params)


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_dropout_key_changes_with_the_step(mode):
    """Same params and batch, step counter 0 vs 1: new dropout masks, so a different update;
    without dropout the counter changes nothing (constant learning rate)."""
    assert _max_diff(_dropout_step(mode, 0.5, 0), _dropout_step(mode, 0.5, 1)) > 1e-4
    assert _max_diff(_dropout_step(mode, 0.0, 0), _dropout_step(mode, 0.0, 1)) == 0.0


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_train_step_donates_the_state(mode):
    """The input state's buffers are handed to XLA for the new state (no second copy)."""
    model = helpers.TinyNet(axis_name="data")
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    train_step, _ = make_steps(model, tx, optax.constant_schedule(0.1), "data")
    parallel = DataParallel(mode, devices=jax.local_devices()[:1])
    batch = parallel.shard_batch(next(helpers.train_batches(
        None, global_batch_size=16, num_devices=1, seed=0)))
    before = parallel.replicate(jax.device_get(state))
    after, _ = parallel.wrap_train(train_step)(before, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(before.params))
    assert all(x.is_deleted() for x in jax.tree.leaves(before.opt_state))
    assert not any(x.is_deleted() for x in jax.tree.leaves(after))
    assert not any(x.is_deleted() for x in jax.tree.leaves(batch))  # the batch is not donated


@pytest.mark.parametrize("value, finite", [(1e30, 1.0), (np.inf, 0.0), (np.nan, 0.0)])
def test_params_finite_checks_every_parameter_without_overflowing(value, finite):
    """`params_finite` is 1 while every updated parameter is finite, however large (a global
    norm of four 1e30 weights overflows float32, they do not), and 0 once one is not."""
    from cnnjax.train.state import TrainState
    from cnnjax.train.step import PARAMS_FINITE, _apply_gradients

    params = {"dense": {"kernel": np.full((2, 2), 1.0, np.float32),
                        "bias": np.zeros(2, np.float32)}}
    tx = optax.sgd(1.0)
    state = TrainState(step=np.int32(0), params=params, batch_stats={},
                       opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
    grads = {"dense": {"kernel": np.full((2, 2), -value, np.float32),
                       "bias": np.zeros(2, np.float32)}}
    apply = jax.vmap(lambda s, g: _apply_gradients(s, g, {}, {}, tx, optax.constant_schedule(1.0),
                                                    "data"), axis_name="data")
    batched = (jax.tree.map(lambda x: x[None], tree) for tree in (state, grads))
    _, metrics = apply(*batched)
    assert float(metrics[PARAMS_FINITE][0]) == finite


def test_batch_stats_finite_is_zero_on_every_device_when_one_devices_statistic_is_not():
    """`batch_stats_finite` checks the new BatchNorm statistics per leaf, and a `pmin` over the
    devices makes every device report a statistic that only one of them holds (unsynced BN)."""
    from cnnjax.train.state import TrainState
    from cnnjax.train.step import BATCH_STATS_FINITE, _apply_gradients

    params = {"dense": {"kernel": np.ones((2, 2), np.float32)}}
    tx = optax.sgd(1.0)
    state = TrainState(step=np.int32(0), params=params, batch_stats={},
                       opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
    grads = {"dense": {"kernel": np.zeros((2, 2), np.float32)}}
    apply = jax.vmap(lambda s, g, b: _apply_gradients(s, g, b, {}, tx,
                                                       optax.constant_schedule(1.0), "data"),
                     axis_name="data")
    devices = jax.tree.map(lambda x: np.stack([x, x]), (state, grads))
    for var, finite in [(np.array([[1e30, 2.0], [1.0, 1.0]], np.float32), 1.0),
                        (np.array([[1.0, 1.0], [np.inf, 1.0]], np.float32), 0.0)]:
        stats = {"bn": {"mean": np.zeros((2, 2), np.float32), "var": var}}  # row: device
        _, metrics = apply(*devices, stats)
        assert metrics[BATCH_STATS_FINITE].tolist() == [finite, finite]


def _trace_one_step(keep_average, **options):
    """Traces (never compiles) one train step of TinyNet whose state keeps a weight average
    iff `keep_average`, with the step's `options`."""
    model = helpers.TinyNet(axis_name="data")
    tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE),
                               ema=keep_average)
    train_step, _ = make_steps(model, tx, schedule, "data", **options)
    batch = {"image": np.zeros((4, *helpers.IMAGE_SHAPE), np.float32),
             "label": np.zeros((4,), np.int32)}
    teacher_variables = {"params": state.params, "batch_stats": state.batch_stats}
    jax.eval_shape(jax.vmap(train_step, axis_name="data"),
                   *jax.tree.map(lambda x: x[None], (state, batch, teacher_variables)))


@pytest.mark.parametrize(("keep_average", "options", "message"), [
    # A state with an average and no rule: the average stayed the initial weights, scored
    # every eval as `ema_*`.
    (True, {}, r"train_step: ema=None is invalid; .*state\.ema"),
    # A rule and no average in the state: an anonymous pytree-structure error.
    (False, {"ema": "rule"}, r"train_step: ema=ExponentialMovingAverage.* is invalid; "
                             r".*create_train_state\(\.\.\., ema=True\)"),
    # distill without a teacher: AttributeError 'NoneType' object has no attribute 'apply'.
    (False, {"distill": "rule"}, r"train_step: teacher=None is invalid; .*distill"),
    # A teacher without distill: silently never run.
    (False, {"teacher": "model"}, r"train_step: teacher='TinyNet' is invalid; no distillation"),
])
def test_a_train_step_refuses_options_its_state_or_other_options_contradict(
        keep_average, options, message):
    from cnnjax.train.distill import Distillation
    from cnnjax.train.ema import ExponentialMovingAverage

    values = {"ema": ExponentialMovingAverage(0.9), "distill": Distillation(),
              "teacher": helpers.TinyNet(axis_name="data")}
    with pytest.raises(ValueError, match=message):
        _trace_one_step(keep_average, **{name: values[name] for name in options})

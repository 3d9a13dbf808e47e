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
    ("auto", "cpu", "auto"), ("auto", "gpu", "xla"), ("auto", "tpu", "xla"),
    ("matmul", "gpu", "matmul"), ("xla", "cpu", "xla"),
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


@pytest.mark.parametrize("value, learning_rate, finite", [
    (1e30, 1.0, 1.0), (np.inf, 1.0, 0.0), (np.nan, 1.0, 0.0),
    # A finite gradient (-value = 3e38) whose update overflows: np.float32(1) -
    # np.float32(10) * np.float32(3e38) is -inf. Only the new parameters say so, not the grads.
    (-3e38, 10.0, 0.0),
])
def test_params_finite_checks_every_parameter_without_overflowing(value, learning_rate, finite):
    """`params_finite` is 1 while every updated parameter is finite, however large (a global
    norm of four 1e30 weights overflows float32, they do not), and 0 once one is not, even
    when every gradient is finite (it checks the new parameters, not the gradients)."""
    from cnnjax.train.state import TrainState
    from cnnjax.train.step import PARAMS_FINITE, _apply_gradients

    params = {"dense": {"kernel": np.full((2, 2), 1.0, np.float32),
                        "bias": np.zeros(2, np.float32)}}
    tx = optax.sgd(learning_rate)
    state = TrainState(step=np.int32(0), params=params, batch_stats={},
                       opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
    grads = {"dense": {"kernel": np.full((2, 2), -value, np.float32),
                       "bias": np.zeros(2, np.float32)}}
    schedule = optax.constant_schedule(learning_rate)
    apply = jax.vmap(lambda s, g: _apply_gradients(s, g, {}, {}, tx, schedule, "data"),
                     axis_name="data")
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


def _lenet_gradient(dtype):
    """The parameter update of one plain SGD step (learning rate 1: minus the gradient) of
    LeNet-5 computing in `dtype`, its float32 parameters, and the step's loss."""
    from cnnjax.models import create_model

    model = create_model("lenet5", dtype=dtype, axis_name="data")
    tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, 32, 32, 1))
    train_step, _ = make_steps(model, tx, schedule, "data")
    parallel = DataParallel("pmap", devices=jax.local_devices()[:1])
    rng = np.random.default_rng(3)
    batch = {"image": rng.standard_normal((1, 32, 32, 32, 1)).astype(np.float32),
             "label": rng.integers(0, 10, (1, 32)).astype(np.int32)}
    new_state, metrics = parallel.wrap_train(train_step)(
        parallel.replicate(state), parallel.shard_batch(batch))
    new = parallel.unreplicate(new_state.params)
    update = jax.tree.map(lambda a, b: np.asarray(b, np.float64) - np.asarray(a, np.float64),
                          jax.device_get(state.params), new)
    return update, jax.device_get(state.params), batch, float(
        parallel.metrics_to_host(metrics)["loss"])


def test_a_bfloat16_train_step_matches_float32_and_float64():
    """Mixed precision through the whole train step, on LeNet-5 (tanh and average pooling: no
    kinks, so bfloat16 moves the gradient by rounding alone). Every leaf of the float32 step's
    gradient is within 1e-4 (relative norm; measured 1.6e-6) of a float64 reference; the
    bfloat16 step's within 3%: about 20 bfloat16 roundings (2**-9 each) compound through 5
    layers forward and back (measured: 1.2% at worst, c1's kernel). Before 5240621 the bias
    gradients of c1 (32 x 28 x 28 = 25,088 positions) and c3 were summed in bfloat16 and were
    30% and 21% off. The loss: float32 within 1e-5, bfloat16 within 1e-3 (measured 1.1e-5)."""
    import jax.numpy as jnp

    from cnnjax.models import create_model

    bf16, params, batch, loss_bf16 = _lenet_gradient(jnp.bfloat16)
    f32, _, _, loss_f32 = _lenet_gradient(jnp.float32)
    with jax.enable_x64(True):
        model = create_model("lenet5", dtype=jnp.float64)  # refused without x64

        def loss(p):
            logits = model.apply({"params": p}, jnp.asarray(batch["image"][0], jnp.float64),
                                 train=True, rngs={"dropout": jax.random.PRNGKey(0)})
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float64), batch["label"][0]).mean()

        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        # jitted: op by op, the float64 forward and backward compiled one program per op
        loss64, grads = jax.jit(jax.value_and_grad(loss))(params64)
        want = jax.tree.map(lambda g: -np.asarray(g, np.float64), grads)

    def worst(got):
        return max(np.linalg.norm(g - w) / np.linalg.norm(w)
                   for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))

    assert abs(loss_f32 - float(loss64)) < 1e-5 * float(loss64)
    assert abs(loss_bf16 - float(loss64)) < 1e-3 * float(loss64)
    assert worst(f32) < 1e-4
    assert worst(bf16) < 0.03

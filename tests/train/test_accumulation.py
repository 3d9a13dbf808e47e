"""Gradient accumulation (`grad_accum_steps`): k micro-batches make the same step as one batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax.train import loop
from cnnjax.train.parallel import DataParallel
from cnnjax.train.state import create_train_state
from cnnjax.train.step import make_steps
from tests.train import helpers


class _NoBatchNormNet(nn.Module):
    """conv -> relu -> dense: no state besides params, so accumulation is exact."""

    num_classes: int = helpers.NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


def _steps(model, accum_steps, num_steps=3, batch_size=16):
    """`num_steps` SGD+momentum steps on one device; returns (host state, last metrics)."""
    tx, schedule = optax.sgd(0.1, momentum=0.9), optax.constant_schedule(0.1)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    train_step, _ = make_steps(model, tx, schedule, "data", accum_steps=accum_steps)
    parallel = DataParallel("pmap", devices=jax.local_devices()[:1])
    p_train = parallel.wrap_train(train_step)
    state = parallel.replicate(state)
    batches = helpers.train_batches(None, global_batch_size=batch_size, num_devices=1, seed=0)
    for _ in range(num_steps):
        state, metrics = p_train(state, parallel.shard_batch(next(batches)))
    return parallel.unreplicate(state), parallel.metrics_to_host(metrics)


@pytest.mark.parametrize("accum_steps", [2, 4, 16])
def test_accumulated_micro_batches_equal_the_whole_batch_without_batchnorm(accum_steps):
    """Mean of k micro-batch gradients == the batch gradient: same params (float32 sums in a
    different order: 1e-6) and the same loss and accuracy."""
    whole, whole_metrics = _steps(_NoBatchNormNet(), 1)
    parts, parts_metrics = _steps(_NoBatchNormNet(), accum_steps)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 whole.params, parts.params)
    for name in ("loss", "top1", "top5"):
        np.testing.assert_allclose(parts_metrics[name], whole_metrics[name], rtol=1e-5)


def test_batchnorm_sees_each_micro_batch_and_updates_its_averages_once_per_micro_batch():
    """With BatchNorm, a 2-micro-batch step equals a hand-written reference: the gradient is the
    mean of each half's gradient (each half normalized by its own statistics) and the running
    averages are updated twice, first half first."""
    model = helpers.TinyNet(axis_name="data")
    state, _ = _steps(model, 2, num_steps=1)

    tx = optax.sgd(0.1, momentum=0.9)
    initial = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    batch = next(helpers.train_batches(None, global_batch_size=16, num_devices=1, seed=0))
    images, labels = batch["image"][0], batch["label"][0]
    plain = helpers.TinyNet()  # no axis name: outside pmap

    def loss(params, stats, x, y):
        logits, updates = plain.apply({"params": params, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
        one_hot = jax.nn.one_hot(y, helpers.NUM_CLASSES)
        return jnp.mean(optax.softmax_cross_entropy(logits, one_hot)), updates["batch_stats"]

    grads, stats = [], initial.batch_stats
    for half in (slice(0, 8), slice(8, 16)):
        grad, stats = jax.grad(loss, has_aux=True)(initial.params, stats, images[half],
                                                    labels[half])
        grads.append(grad)
    mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    updates, _ = tx.update(mean_grad, tx.init(initial.params), initial.params)
    expected = optax.apply_updates(initial.params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state.params, expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state.batch_stats, stats)


def test_a_run_with_accumulation_trains_and_resumes_its_config(tmp_path, monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)
    config = helpers.tiny_config(grad_accum_steps=4, num_train_steps=40, eval_every_steps=40)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["final_eval"]["top1"] > 0.9
    with pytest.raises(ValueError, match="grad_accum_steps"):  # a trajectory-defining field
        loop.train_and_evaluate(helpers.tiny_config(grad_accum_steps=2, num_train_steps=40,
                                                    eval_every_steps=40), str(tmp_path))


@pytest.mark.parametrize(("value", "message"), [
    (0, r"config: grad_accum_steps=0 is invalid"),
    (3, r"config: grad_accum_steps=3 is invalid; expected a divisor of the per-device batch 16"),
])
def test_bad_accumulation_is_named_before_compiling(tmp_path, monkeypatch, value, message):
    helpers.install_fake_pipeline(monkeypatch)
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(helpers.tiny_config(grad_accum_steps=value), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(("accum_steps", "message"), [
    (0, r"train_step: accum_steps=0 is invalid; expected a positive integer"),
    (3, r"train_step: accum_steps=3 is invalid; expected a divisor of this device's batch of 16 "
        r"examples"),
])
def test_the_step_itself_names_a_bad_accumulation_while_tracing(accum_steps, message):
    with pytest.raises(ValueError, match=message):
        _steps(_NoBatchNormNet(), accum_steps, num_steps=1)


def test_evaluating_a_run_ignores_its_accumulation(tmp_path, monkeypatch):
    """Evaluation never accumulates: a run whose grad_accum_steps would not divide this
    machine's per-device batch still loads (here: config.json edited to a non-divisor)."""
    import json

    from cnnjax.train.trained import load_trained

    helpers.install_fake_pipeline(monkeypatch)
    loop.train_and_evaluate(helpers.tiny_config(grad_accum_steps=2, num_train_steps=4),
                            str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["grad_accum_steps"] = 3
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_trained(str(tmp_path)).step == 4


@pytest.mark.slow
def test_accumulation_on_four_devices_equals_one_device_whole_batch_with_the_engine_optimizer():
    """4 devices x k micro-batches (pmap and shard_map) take the step of 1 device on the whole
    global batch: clipping and weight decay act once per step on the mean gradient (float32
    sums in another order: 1e-6), and the rate logged at step s is the schedule's at s - 1,
    linear warmup over 2 steps then cosine over 8 (float64 formula)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()}
    result = subprocess.run(
        [sys.executable, os.path.join(root, "tests", "train", "accumulation_multidevice_script.py"),
         root], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["param_diff"]) == {"pmap_4x2", "pmap_4x4", "shard_map_4x2",
                                         "shard_map_4x4"}
    for name, diff in report["param_diff"].items():
        assert diff < 1e-6, (name, diff)
    expected = [0.0, 0.05] + [0.05 * (1 + np.cos(np.pi * t / 8)) for t in (0, 1)]
    for name, rates in report["rates"].items():
        np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=1e-9, err_msg=name)


class _DropoutNet(nn.Module):
    """dense -> relu -> dropout(0.5) -> dense: dropout but no BatchNorm, so micro-batches only
    differ by their inputs and their dropout keys."""

    num_classes: int = helpers.NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)


def test_each_micro_batch_draws_its_own_dropout_mask():
    """A batch of two identical halves with accum_steps=2: the step's gradient is the mean of
    the two halves' gradients with dropout keys fold_in(key, 0) and fold_in(key, 1), where key is
    the step's key (state.rng folded with the step, 0, then the device, 0). Every micro-batch
    used to be able to share one key unnoticed (the other tests have no dropout): then both
    halves drop the same units and the gradient is one half's. Reference: plain flax apply and
    jax.grad outside the engine; SGD at rate 1, so the update is minus the gradient (float32
    sums in another order: 1e-5 relative, 1e-6 absolute)."""
    model = _DropoutNet()
    tx = optax.sgd(1.0)
    initial = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    half = next(helpers.train_batches(None, global_batch_size=8, num_devices=1, seed=0))
    batch = {k: np.concatenate([v, v], axis=1) for k, v in half.items()}  # [1, 16, ...]

    train_step, _ = make_steps(model, tx, optax.constant_schedule(1.0), "data", accum_steps=2)
    parallel = DataParallel("pmap", devices=jax.local_devices()[:1])
    state, _ = parallel.wrap_train(train_step)(parallel.replicate(initial),
                                               parallel.shard_batch(batch))
    state = parallel.unreplicate(state)

    def loss(params, images, labels, key):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    step_key = jax.random.fold_in(jax.random.fold_in(initial.rng, 0), 0)  # (rng, step, device)
    images, labels = half["image"][0], half["label"][0]
    grads = [jax.grad(loss)(initial.params, images, labels, jax.random.fold_in(step_key, i))
             for i in (0, 1)]
    # The two masks really differ: the halves' gradients are far apart (not a vacuous check).
    gap = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True))
    assert gap > 1e-2, gap
    expected = jax.tree.map(lambda p, a, b: p - (a + b) / 2, initial.params, *grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state.params, expected)

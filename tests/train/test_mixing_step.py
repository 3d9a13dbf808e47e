"""mixup / CutMix in the engine (`config.mixing`): the train step's loss is the mixed batch's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax.train import loop
from cnnjax.train.mixing import Mixing
from cnnjax.train.parallel import DataParallel
from cnnjax.train.state import create_train_state
from cnnjax.train.step import make_steps
from tests.train import helpers


def _log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("rule", [Mixing(mixup_alpha=0.4), Mixing(cutmix_alpha=1.0)])
def test_the_step_loss_is_the_soft_cross_entropy_of_the_mixed_batch(rule):
    """One step with mixing: the logged loss equals a float64 soft cross-entropy of the model on
    the batch mixed with the step's own key (`split(fold_in(fold_in(rng, step), device))[0]`)."""
    model = helpers.TinyNet(axis_name="data")
    tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    parallel = DataParallel("pmap", devices=jax.local_devices()[:1])
    batch = next(helpers.train_batches(None, global_batch_size=16, num_devices=1, seed=0))
    train_step, _ = make_steps(model, tx, schedule, "data", mixing=rule)
    _, metrics = parallel.wrap_train(train_step)(parallel.replicate(state),
                                                 parallel.shard_batch(batch))
    step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, 0), 0)
    mix_rng = jax.random.split(step_rng)[0]
    images, targets, lam = rule(mix_rng, jnp.asarray(batch["image"][0]),
                                jnp.asarray(batch["label"][0]), helpers.NUM_CLASSES)
    assert 0.0 < float(lam) < 1.0  # this key mixes
    logits, _ = helpers.TinyNet().apply(state.variables(), images, train=True,
                                        mutable=["batch_stats"])
    expected = -np.mean(np.sum(np.asarray(targets, np.float64) * _log_softmax64(logits), -1))
    loss = float(parallel.metrics_to_host(metrics)["loss"])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    _, plain = parallel.wrap_train(make_steps(model, tx, schedule, "data")[0])(
        parallel.replicate(state), parallel.shard_batch(batch))
    assert abs(float(parallel.metrics_to_host(plain)["loss"]) - loss) > 1e-3


def test_a_run_with_cutmix_learns_and_logs_train_metrics(tmp_path, monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)
    config = helpers.tiny_config(**{"mixing.cutmix_alpha": 1.0, "mixing.mixup_alpha": 0.2,
                                    "num_train_steps": 60, "eval_every_steps": 60,
                                    # nothing reads the checkpoints: the final one only
                                    "checkpoint_every_steps": 60})
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["final_eval"]["top1"] > 0.9
    assert np.isfinite(summary["final_train"]["loss"])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"mixing.mixup_alpha": -1.0},
     r"mixing: mixup_alpha=-1.0 is invalid; expected 0 \(off\) or a finite number >= 1e-37\.$"),
    ({"mixing.cutmix_alpha": 1e-38},  # a NaN lam in nearly every float32 draw
     r"mixing: cutmix_alpha=1e-38 is invalid; expected 0 \(off\) or a finite number >= 1e-37 "
     r"\(a smaller one overflows"),
    ({"mixing.cutmix_alpha": 1.0, "mixing.prob": 1.5}, r"mixing: prob=1.5 is invalid"),
    ({"mixing.cutmix_alpha": 1.0, "task": "segmentation", "model": "fcn8s_resnet18"},
     r"mixing: mixup_alpha/cutmix_alpha=\(0.0, 1.0\) is invalid; mixing needs class labels"),
])
def test_bad_mixing_is_named_before_compiling(tmp_path, monkeypatch, overrides, message):
    helpers.install_fake_pipeline(monkeypatch)
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(helpers.tiny_config(**overrides), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_an_unknown_mixing_field_is_named(tmp_path, monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)
    config = helpers.tiny_config()
    config.mixing.alpha = 0.2  # a typo in a Python config file (the command line refuses it)
    with pytest.raises(ValueError, match=r"mixing: field='alpha' is invalid; expected one of "
                                         r"\['mixup_alpha', 'cutmix_alpha', 'switch_prob'"):
        loop.train_and_evaluate(config, str(tmp_path))

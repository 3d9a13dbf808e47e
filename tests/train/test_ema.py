"""Weight averaging (`config.ema`): the average, its evaluation, checkpoints and errors."""

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from cnnjax.train import loop
from cnnjax.train.checkpoint import Checkpointer
from cnnjax.train.ema import ExponentialMovingAverage, initial_average
from cnnjax.train.parallel import DataParallel
from cnnjax.train.state import TrainState, create_train_state, warm_start
from cnnjax.train.step import make_steps
from tests.train import helpers


@pytest.mark.parametrize("warmup", [True, False])
def test_the_average_follows_the_float64_recursion(warmup):
    """Three train steps: the stored average equals a float64 NumPy recursion over the params
    (and BatchNorm statistics) after each step, with TensorFlow's warm-up decay (1e-6)."""
    model = helpers.TinyNet(axis_name="data")
    tx, schedule = optax.sgd(0.1, momentum=0.9), optax.constant_schedule(0.1)
    rule = ExponentialMovingAverage(0.9, warmup=warmup)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE),
                               ema=True)
    train_step, _ = make_steps(model, tx, schedule, "data", ema=rule)
    parallel = DataParallel("pmap", devices=jax.local_devices()[:1])
    p_train = parallel.wrap_train(train_step)
    batches = helpers.train_batches(None, global_batch_size=16, num_devices=1, seed=0)

    def variables(s):
        return {"params": s.params, "batch_stats": s.batch_stats}

    expected = jax.tree.map(lambda x: np.asarray(x, np.float64), variables(state))
    state = parallel.replicate(state)
    for t in range(3):
        state, _ = p_train(state, parallel.shard_batch(next(batches)))
        host = parallel.unreplicate(state)
        decay = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
        expected = jax.tree.map(lambda avg, new, d=decay: d * avg + (1 - d) * np.float64(new),
                                expected, variables(host))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 parallel.unreplicate(state).ema, expected)
    assert warmup or not np.allclose(host.params["head"]["kernel"],
                                     parallel.unreplicate(state).ema["params"]["head"]["kernel"])


@pytest.mark.parametrize("warmup", [True, False])
def test_the_average_of_a_value_that_never_moves_is_that_value_bitwise(warmup):
    """A frozen parameter (a linear probe's backbone) stays bitwise equal to itself; its
    average drifted by an ulp (decay * x + (1 - decay) * x is not always x in float32), so
    `--ema` scored, and `init_from.ema` loaded, a backbone slightly off the frozen one."""
    rule = ExponentialMovingAverage(0.999, warmup=warmup)
    values = {"params": {"w": np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)}}
    update = jax.jit(rule.update)
    average = jax.tree.map(np.copy, values)
    for step in range(50):
        average = update(average, values, np.int32(step))
    np.testing.assert_array_equal(average["params"]["w"], values["params"]["w"])


def test_decay_zero_scores_the_trained_weights_and_a_run_reports_ema_metrics(tmp_path,
                                                                            monkeypatch):
    """decay 0: the average is the current weights, so `ema_*` equals the raw eval exactly;
    decay 0.9: different weights, a different (still learned) eval; best_metric may be ema_top1."""
    helpers.install_fake_pipeline(monkeypatch)
    same = loop.train_and_evaluate(helpers.tiny_config(**{"ema.decay": 0.0}),
                                   str(tmp_path / "zero"))["final_eval"]
    for name in ("loss", "top1", "top5"):
        assert same["ema_" + name] == same[name]
    config = helpers.tiny_config(**{"ema.decay": 0.9, "best_metric": "ema_top1",
                                    "num_train_steps": 40, "eval_every_steps": 20})
    summary = loop.train_and_evaluate(config, str(tmp_path / "ema"))
    final = summary["final_eval"]
    assert final["ema_loss"] != final["loss"] and final["ema_top1"] > 0.9
    assert summary["best"]["metric"] == "ema_top1"
    records = [json.loads(x) for x in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    assert all("ema_top1" in r for r in records if r["split"] == "eval")


def test_an_interrupted_run_resumes_its_average_exactly(tmp_path, monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)
    config = helpers.tiny_config(**{"ema.decay": 0.8})
    loop.train_and_evaluate(config, str(tmp_path / "reference"))
    helpers.run_until_crash(config, tmp_path / "resumed", monkeypatch)
    assert loop.train_and_evaluate(config, str(tmp_path / "resumed"))["resumed_from_step"] == 8
    stored = [_stored(tmp_path / name) for name in ("reference", "resumed")]
    assert stored[0]["ema"]["params"]
    jax.tree.map(np.testing.assert_array_equal, *stored)


def _stored(workdir: Path) -> dict:
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / "12" / "default"))


def test_checkpoints_written_before_the_average_existed_still_resume(tmp_path):
    """A checkpoint without an `ema` entry (cnnjax before weight averaging) restores into a
    state that does not average."""
    import orbax.checkpoint as ocp
    from flax import serialization

    params = {"w": np.arange(3, dtype=np.float32)}
    tx = optax.sgd(0.1)
    state = TrainState(step=np.asarray(3, np.int32), params=params, batch_stats={},
                       opt_state=tx.init(params), rng=np.zeros(2, np.uint32))
    checkpointer = Checkpointer(str(tmp_path), use_async=False)
    old_item = serialization.to_state_dict(state)
    del old_item["ema"]
    checkpointer._manager.save(3, args=ocp.args.StandardSave(old_item), force=True)
    checkpointer.wait()
    restored, step = checkpointer.restore_latest(state)
    checkpointer.close()
    assert step == 3 and restored.ema == {}
    np.testing.assert_array_equal(restored.params["w"], params["w"])


def test_a_warm_start_restarts_the_average_from_the_loaded_weights():
    params = {"head": {"kernel": np.zeros((2, 2), np.float32)}}
    state = TrainState(step=np.asarray(0, np.int32), params=params, batch_stats={},
                       opt_state=(), rng=np.zeros(2, np.uint32), ema=initial_average(params, {}))
    loaded = {"params": {"head": {"kernel": np.ones((2, 2), np.float32)}}}
    started = warm_start(state, loaded)
    np.testing.assert_array_equal(started.ema["params"]["head"]["kernel"], np.ones((2, 2)))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"ema.decay": 1.0}, r"ema: decay=1.0 is invalid; expected 0 <= decay < 1"),
    ({"ema.decay": -0.5}, r"ema: decay=-0.5 is invalid"),
    ({"ema.decay": 0.9, "ema.warmup": 1}, r"ema: warmup=1 is invalid; expected True or"),
    ({"best_metric": "ema_top1"}, r"config: best_metric='ema_top1' is invalid; ema_\* metrics "
                                  r"score a weight average, which this run does not keep: set "
                                  r"--config.ema.decay \(e.g. 0.999\) or pick one of \['loss', "
                                  r"'top1', 'top5'\]"),
    ({"ema.decay": 0.9, "best_metric": "ema_loss"},
     r"config: best_mode='max' is invalid; expected 'min' for best_metric='ema_loss'"),
])
def test_bad_averaging_fields_are_named_before_compiling(tmp_path, monkeypatch, overrides,
                                                         message):
    helpers.install_fake_pipeline(monkeypatch)
    config = helpers.tiny_config()
    for key, value in overrides.items():  # bypass the config's own type check (warmup=1)
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        with node.ignore_type():
            node[leaf] = value
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_the_rule_itself_refuses_bad_values():
    with pytest.raises(ValueError, match=r"ExponentialMovingAverage: decay='0.9' is invalid"):
        ExponentialMovingAverage("0.9")


def test_the_loaded_average_evaluates_to_the_ema_metrics_the_run_logged(tmp_path, monkeypatch):
    from cnnjax.train.trained import evaluate_run, load_trained

    helpers.install_fake_pipeline(monkeypatch)
    summary = loop.train_and_evaluate(helpers.tiny_config(**{"ema.decay": 0.9}), str(tmp_path))
    final = summary["final_eval"]
    averaged = evaluate_run(load_trained(str(tmp_path), step=12, ema=True))
    trained = evaluate_run(load_trained(str(tmp_path), step=12))
    assert (averaged["weights"], trained["weights"]) == ("ema", "trained")
    for name in ("loss", "top1"):
        np.testing.assert_allclose(averaged[name], final["ema_" + name], rtol=1e-6)
        np.testing.assert_allclose(trained[name], final[name], rtol=1e-6)


def test_the_best_checkpoint_is_picked_by_the_metric_of_the_weights_loaded(tmp_path,
                                                                           monkeypatch):
    """A run with best_metric top1 whose raw weights scored best at step 6 and whose average
    scored best at step 12: loading (or warm-starting from) the average picks step 12, the
    trained weights step 6, and a run whose best_metric is ema_top1 reads it the same way."""
    from cnnjax.train.trained import load_trained

    helpers.install_fake_pipeline(monkeypatch)
    source = tmp_path / "source"
    loop.train_and_evaluate(helpers.tiny_config(**{"ema.decay": 0.9}), str(source))
    metrics = source / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    scores = {6: (0.9, 0.1), 12: (0.1, 0.9)}  # step: (top1, ema_top1)
    for r in records:
        if r["split"] == "eval":
            r["top1"], r["ema_top1"] = scores[r["step"]]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert (load_trained(str(source)).step, load_trained(str(source), ema=True).step) == (6, 12)
    config_path = source / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "best_metric": "ema_top1"}))
    assert (load_trained(str(source)).step, load_trained(str(source), ema=True).step) == (6, 12)
    for average, step in ((True, 12), (False, 6)):
        warm = loop.train_and_evaluate(
            helpers.tiny_config(num_train_steps=2, **{"init_from.workdir": str(source),
                                                      "init_from.ema": average}),
            str(tmp_path / f"warm_{average}"))
        assert (warm["init_from"]["step"], warm["init_from"]["checkpoint"]) == (step, "best")


def test_loading_the_average_of_a_run_without_one_is_refused(tmp_path, monkeypatch):
    from cnnjax.train.trained import load_trained

    helpers.install_fake_pipeline(monkeypatch)
    loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4), str(tmp_path))
    with pytest.raises(ValueError, match=r"load_trained: ema=True is invalid; the run in .* kept "
                                         r"no weight average"):
        load_trained(str(tmp_path), ema=True)


def test_sweeps_tunes_and_diagnoses_accept_the_averages_metrics(tmp_path, monkeypatch):
    """A config whose best_metric is ema_top1 sweeps, tunes and is diagnosed by that metric;
    ema_loss is minimized like loss."""
    from cnnjax.tune.diagnose import Thresholds, diagnose_workdir, load_curves, noise_level
    from cnnjax.tune.recipe import Recipe
    from cnnjax.tune.sweep import check_metric, default_mode

    helpers.install_fake_pipeline(monkeypatch)
    config = helpers.tiny_config(**{"ema.decay": 0.9, "best_metric": "ema_top1",
                                    "num_train_steps": 40, "log_every_steps": 1,
                                    "eval_every_steps": 4})
    assert check_metric("sweep", None, config) == "ema_top1"
    assert (default_mode("ema_loss"), default_mode("ema_top1")) == ("min", "max")
    assert Recipe(metric="ema_top1").mode == "max"
    loop.train_and_evaluate(config, str(tmp_path))
    assert diagnose_workdir(str(tmp_path)).findings  # judged by ema_top1, the best_metric
    curves = load_curves(str(tmp_path))
    assert (noise_level(curves, "ema_top1", Thresholds(), 0.5)
            == noise_level(curves, "top1", Thresholds(), 0.5))  # a fraction, not a loss
    with pytest.raises(ValueError, match=r"sweep: metric='ema_top1' is invalid; expected one of "
                                         r"\['loss', 'top1', 'top5'\] .* and ema.decay unset"):
        check_metric("sweep", "ema_top1", helpers.tiny_config())


def test_warmup_is_checked_even_without_a_decay(tmp_path, monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)
    config = helpers.tiny_config()
    with config.ema.ignore_type():
        config.ema.warmup = "yes"
    with pytest.raises(ValueError, match=r"ema: warmup='yes' is invalid; expected True or False"):
        loop.train_and_evaluate(config, str(tmp_path))


def test_an_unknown_ema_field_is_named_before_anything_is_written(tmp_path, monkeypatch):
    """`ema.decy` in a Python config file (the command line refuses it) used to leave decay
    unset: EMA silently off. Refused like an unknown mixing field, decay set or not."""
    from cnnjax.train.config import EMA_DEFAULTS, ema_rule, validate_config

    helpers.install_fake_pipeline(monkeypatch)
    message = r"^ema: field='decy' is invalid; expected one of \['decay', 'warmup'\]\.$"
    for decay in (None, 0.9):
        config = helpers.tiny_config(**{"ema.decay": decay})
        config.ema.decy = 0.999
        with pytest.raises(ValueError, match=message):
            ema_rule(config)
        with pytest.raises(ValueError, match=message):
            validate_config(config)
        with pytest.raises(ValueError, match=message):
            loop.train_and_evaluate(config, str(tmp_path))
        assert not (tmp_path / "config.json").exists()
    assert set(EMA_DEFAULTS) == set(helpers.tiny_config().ema)  # the schema's fields


@pytest.mark.parametrize("best_metric", ["top1", "ema_top1"])
def test_a_run_keeps_the_best_checkpoint_of_both_weights(tmp_path, monkeypatch, best_metric):
    """keep_checkpoints=1, evals (scripted here) at every checkpoint: top1 peaks at step 4 and
    ema_top1 at step 2. Only `best_metric`'s best was kept, so `evaluate --ema` (or without
    `--ema`) loaded another step as its "best"; both are kept now, with the latest."""
    helpers.install_fake_pipeline(monkeypatch)
    scripted = {2: (0.5, 0.9), 4: (0.8, 0.6), 6: (0.7, 0.5), 8: (0.6, 0.4)}
    evaluate = loop._Run.evaluate

    def scripted_evaluate(self, state, p_eval):
        metrics = evaluate(self, state, p_eval)
        step = int(np.asarray(jax.device_get(state.step)).ravel()[0])
        metrics["top1"], metrics["ema_top1"] = scripted[step]
        return metrics

    monkeypatch.setattr(loop._Run, "evaluate", scripted_evaluate)
    config = helpers.tiny_config(**{"ema.decay": 0.5, "best_metric": best_metric,
                                    "keep_checkpoints": 1, "num_train_steps": 8,
                                    "eval_every_steps": 2, "checkpoint_every_steps": 2})
    loop.train_and_evaluate(config, str(tmp_path))
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [2, 4, 8]

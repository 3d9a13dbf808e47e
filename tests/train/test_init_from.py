"""`config.init_from` (warm start / fine-tuning) and `config.freeze`, on synthetic data.

A 4-class source run is fine-tuned on a 2-class variant of the same images (class = top or
bottom half), so the head must be re-initialized while everything else is loaded.
"""

import json
import os
import re
import shutil
import sys
import types
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax.traverse_util import flatten_dict

from cnnjax.train import loop
from cnnjax.train.checkpoint import Checkpointer, SourceCheckpoints
from cnnjax.train.config import default_config, incompatible_fields, validate_config
from cnnjax.train.init_from import _frozen, check_exclude_names
from cnnjax.train.state import freeze_optimizer, select_pretrained
from tests.train import helpers

TWO_CLASSES = "synthetic2"  # the helpers' images, labels 0/1 = bright quadrant on top/bottom


def _pipeline() -> types.ModuleType:
    """The helpers' synthetic source plus a 2-class variant of it."""

    def info(data_config):
        if data_config.name == TWO_CLASSES:  # a per-class budget n keeps 4n of its 64 examples,
            # as the real pipeline keeps fewer for a smaller one (the batches ignore it)
            per_class = data_config.get("train_examples_per_class")
            num_train = 64 if per_class is None else min(64, 4 * per_class)
            return helpers.DatasetInfo(TWO_CLASSES, 2, helpers.IMAGE_SHAPE, num_train, 27)
        return helpers.get_dataset_info(data_config)

    def relabel(batches, data_config):
        for batch in batches:
            if data_config.name == TWO_CLASSES:
                batch = dict(batch, label=batch["label"] // 2)
            yield batch

    module = types.ModuleType("cnnjax.data.pipeline")
    module.get_dataset_info = info
    module.train_batches = lambda data, **kw: relabel(helpers.train_batches(data, **kw), data)
    module.eval_batches = lambda data, **kw: relabel(helpers.eval_batches(data, **kw), data)
    return module


def _install(monkeypatch):
    import cnnjax.data

    helpers.register_tiny_model(monkeypatch)
    module = _pipeline()
    monkeypatch.setitem(sys.modules, "cnnjax.data.pipeline", module)
    monkeypatch.setattr(cnnjax.data, "pipeline", module, raising=False)
    helpers.accept_stand_in_data_names(monkeypatch)


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    _install(monkeypatch)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished 12-step 4-class run: checkpoints kept at 6, 8, 12 (evals at 6 and 12)."""
    workdir = str(tmp_path_factory.mktemp("source"))
    with pytest.MonkeyPatch.context() as mp:
        _install(mp)
        loop.train_and_evaluate(helpers.tiny_config(), workdir)
    return workdir


def _fine_tune_config(source_dir, **overrides):
    config = helpers.tiny_config(**overrides)
    config.data.name = TWO_CLASSES
    config.init_from.workdir = source_dir
    config.optimizer.learning_rate = 0.01  # a different learning rate than the source's 0.05
    return config


def _stored(workdir, step=None):
    """A checkpoint exactly as stored (default: the newest), read without the engine."""
    ckpt = os.path.join(workdir, "checkpoints")
    step = step or max(int(n) for n in os.listdir(ckpt) if n.isdigit())
    return ocp.PyTreeCheckpointer().restore(os.path.join(ckpt, str(step), "default"))


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(dict(tree)).items()}


@pytest.fixture
def initial_states(monkeypatch):
    """Records the host state each run hands to the devices (its state at step 0 / resume)."""
    return helpers.record_initial_states(monkeypatch)


def _no_compilation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the train state was built (compiled) before the error")

    monkeypatch.setattr(loop, "create_train_state", fail)


# ------------------------------------------------------------------------------ warm start
def test_fine_tune_starts_from_the_source_params(source, tmp_path, initial_states):
    from cnnjax.models import create_model
    from cnnjax.train.optim import build_optimizer
    from cnnjax.train.state import create_train_state

    config = _fine_tune_config(source, num_train_steps=4, eval_every_steps=4)
    config.init_from.step = 12
    summary = loop.train_and_evaluate(config, str(tmp_path))
    (start,) = initial_states
    src = _stored(source, 12)
    params, src_params = _flat(start.params), _flat(src["params"])
    assert start.params["head"]["kernel"].shape == (144, 2)
    backbone = [name for name in params if not name.startswith("head/")]
    assert sorted(backbone) == ["bn/bias", "bn/scale", "conv/bias", "conv/kernel"]
    for name in backbone:
        np.testing.assert_array_equal(params[name], src_params[name], err_msg=name)
    for name, value in _flat(src["batch_stats"]).items():
        np.testing.assert_array_equal(_flat(start.batch_stats)[name], value, err_msg=name)
    # The head is this run's own fresh initialization (seed 0) for 2 classes, not the source's.
    model = create_model(helpers.TINY_MODEL, num_classes=2, axis_name="batch")
    fresh = create_train_state(
        model, build_optimizer(config), jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE)
    )
    for name in ("head/kernel", "head/bias"):
        np.testing.assert_array_equal(params[name], _flat(fresh.params)[name], err_msg=name)
    # A fresh run: step 0, momentum buffers zero (the source's optimizer state is not loaded).
    assert int(start.step) == 0 and summary["resumed_from_step"] == 0
    assert all(not np.any(x) for x in jax.tree.leaves(start.opt_state))
    np.testing.assert_array_equal(start.rng, fresh.rng)
    # summary.json (and init_from.json) say where the run started from.
    expected = {
        "workdir": os.path.abspath(source),
        "step": 12,
        "checkpoint": "requested",
        "model": helpers.TINY_MODEL,
        "exclude": ["head"],
        "submodule": None,
        "ema": False,
        "loaded_leaves": 6,  # conv kernel/bias, bn scale/bias, bn mean/var
        "source_leaves": 8,  # and the source's head kernel/bias, excluded
        "excluded_source_modules": ["head"],
        "fresh_modules": ["head"],
        "frozen_fresh_modules": [],
        "freeze": None,
    }
    assert summary["status"] == "completed" and summary["init_from"] == expected
    assert json.loads((tmp_path / "summary.json").read_text())["init_from"] == expected
    assert json.loads((tmp_path / "init_from.json").read_text()) == expected


def test_init_from_ema_loads_the_sources_weight_average(tmp_path, initial_states):
    """init_from.ema: the backbone starts from the source checkpoint's averaged params and
    BatchNorm statistics (not its weights); a source without an average is refused."""
    source_dir = str(tmp_path / "averaged_source")
    loop.train_and_evaluate(helpers.tiny_config(**{"ema.decay": 0.9}), source_dir)
    config = _fine_tune_config(source_dir, num_train_steps=2, eval_every_steps=2)
    config.init_from.step = 12
    config.init_from.ema = True
    summary = loop.train_and_evaluate(config, str(tmp_path / "target"))
    start = initial_states[-1]
    average = _stored(source_dir, 12)["ema"]
    assert summary["init_from"]["ema"] is True
    for collection in ("params", "batch_stats"):
        loaded = _flat(getattr(start, collection))
        for name, value in _flat(average[collection]).items():
            if not name.startswith("head/"):
                np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    weights = _flat(_stored(source_dir, 12)["params"])
    assert not np.array_equal(_flat(start.params)["conv/kernel"], weights["conv/kernel"])

    plain = _fine_tune_config(str(tmp_path / "target"), num_train_steps=2)
    plain.init_from.ema = True
    plain.data.name = "synthetic"
    with pytest.raises(ValueError, match=r"init_from: ema=True is invalid; the checkpoint at "
                                         r"step 2 of .* holds no weight average"):
        loop.train_and_evaluate(plain, str(tmp_path / "plain"))


def test_default_step_is_the_best_kept_checkpoint(source, tmp_path):
    config = _fine_tune_config(source, num_train_steps=2, eval_every_steps=2)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    evals = {
        r["step"]: r["top1"]
        for r in map(json.loads, Path(source, "metrics.jsonl").read_text().splitlines())
        if r["split"] == "eval"
    }
    assert sorted(evals) == [6, 12]  # both kept (keep_checkpoints=3 of 4, 6, 8, 12)
    best = 12 if evals[12] >= evals[6] else 6
    assert summary["init_from"]["checkpoint"] == "best"
    assert summary["init_from"]["step"] == best


def _checkpoints(workdir, steps):
    checkpointer = Checkpointer(str(workdir), use_async=False)
    for step in steps:
        checkpointer.save(step, {"params": {"w": np.full(2, step, np.float32)}})
    checkpointer.close()


def test_choose_step_best_latest_requested(tmp_path):
    _checkpoints(tmp_path, [4, 8, 12])
    records = [
        {"split": "eval", "step": 2, "top1": 0.99, "loss": 0.01},  # not kept: ignored
        {"split": "train", "step": 4, "top1": 1.0, "loss": 0.0},  # train records: ignored
        {"split": "eval", "step": 4, "top1": 0.9, "loss": 0.5},
        {"split": "eval", "step": 8, "top1": 0.5, "loss": 0.2},
        {"split": "eval", "step": 12, "top1": 0.7, "loss": 0.9},
    ]
    source = SourceCheckpoints(str(tmp_path))
    assert source.choose_step(None, "top1") == (12, "latest")  # no metrics.jsonl yet
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert source.choose_step(None, "top1", "max") == (4, "best")
    assert source.choose_step(None, "loss", "min") == (8, "best")
    assert source.choose_step(8, "top1") == (8, "requested")
    assert source.choose_step(None, None) == (12, "latest")
    assert source.restore(8, source.shapes(8, ("params",)))["params"]["w"].tolist() == [8, 8]
    source.close()


def test_a_min_mode_source_warm_starts_from_its_lowest_eval_loss(tmp_path):
    """A source run with best_metric='loss', best_mode='min' warm-starts from its lowest-loss
    checkpoint: the source config's mode is used, not the default 'max' (the steps of the
    lowest loss, the highest loss and the newest checkpoint all differ here)."""
    import ml_collections

    from cnnjax.train.init_from import load_init_from

    _checkpoints(tmp_path, [4, 8, 12])
    (tmp_path / "config.json").write_text(json.dumps(
        {"model": "m", "best_metric": "loss", "best_mode": "min", "optimizer": {}}))
    records = [{"split": "eval", "step": step, "loss": loss}
               for step, loss in ((4, 0.5), (8, 0.2), (12, 0.3))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = min(records, key=lambda r: r["loss"])["step"]
    config = ml_collections.ConfigDict({
        "model": "m", "freeze": None, "data": {"grey_to_rgb": False},
        "init_from": {"workdir": str(tmp_path), "step": None, "exclude": (), "submodule": None,
                      "ema": False}})
    shapes = {"params": {"w": jax.ShapeDtypeStruct((2,), np.float32)}, "batch_stats": {}}
    loaded, record = load_init_from(config, shapes)
    assert (record["step"], record["checkpoint"]) == (expected, "best")
    assert np.asarray(loaded["params"]["w"]).tolist() == [expected, expected]


def test_warm_start_casts_loaded_leaves_to_the_states_dtypes():
    """float16 params and bfloat16 BatchNorm statistics (e.g. a half-precision source) warm-start
    a float32 state as float32 leaves holding the same values: the state's dtypes are kept."""
    import jax.numpy as jnp
    import optax

    from cnnjax.train.state import create_train_state, warm_start

    state = create_train_state(helpers.TinyNet(), optax.sgd(0.1), jax.random.PRNGKey(0),
                               (1, *helpers.IMAGE_SHAPE))
    source = {"params": jax.tree.map(lambda x: np.asarray(x + 0.5, np.float16), state.params),
              "batch_stats": jax.tree.map(lambda x: np.asarray(x + 0.5, jnp.bfloat16),
                                          state.batch_stats)}
    started = warm_start(state, source)
    for collection in ("params", "batch_stats"):
        before = _flat(getattr(state, collection))
        after = _flat(getattr(started, collection))
        assert before.keys() == after.keys() == _flat(source[collection]).keys()
        for path, src in _flat(source[collection]).items():
            assert after[path].dtype == before[path].dtype == np.float32, path
            np.testing.assert_array_equal(after[path], np.asarray(src, np.float32), err_msg=path)


def test_freeze_backbone_trains_only_the_head(source, tmp_path, initial_states):
    config = _fine_tune_config(
        source, num_train_steps=6, eval_every_steps=6, freeze="backbone",
        **{"optimizer.weight_decay": 1e-3},  # frozen leaves get no decay either
    )
    config.init_from.step = 12
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["init_from"]["freeze"] == "backbone"
    start, final, src = initial_states[0], _stored(str(tmp_path)), _stored(source, 12)
    params, src_params = _flat(final["params"]), _flat(src["params"])
    for name in ("conv/kernel", "conv/bias", "bn/scale", "bn/bias"):
        np.testing.assert_array_equal(params[name], src_params[name], err_msg=name)
    for name in ("head/kernel", "head/bias"):
        assert np.abs(params[name] - _flat(start.params)[name]).max() > 1e-4, name
    # As documented: backbone BatchNorm running statistics keep updating in train mode.
    assert np.abs(_flat(final["batch_stats"])["bn/mean"] - _flat(src["batch_stats"])["bn/mean"]
                  ).max() > 1e-4


def test_a_frozen_module_left_out_of_the_warm_start_is_named(source, tmp_path, caplog):
    """freeze='backbone' with init_from.exclude naming a backbone module: that module starts
    random and never trains. Allowed (a random-feature layer may be meant), but said: a warning
    and `frozen_fresh_modules` in the record; it passed silently before."""
    config = _fine_tune_config(source, num_train_steps=2, eval_every_steps=2, freeze="backbone")
    config.init_from.exclude = ("head", "conv")
    with caplog.at_level("WARNING"):
        summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["init_from"]["fresh_modules"] == ["conv", "head"]
    assert summary["init_from"]["frozen_fresh_modules"] == ["conv"]
    assert ("freeze='backbone' keeps ['conv'] at their random initialization: the warm start "
            "loaded nothing into them (named in init_from.exclude, or not in the source)"
            in caplog.text)
    caplog.clear()
    config.init_from.exclude = ("head",)
    with caplog.at_level("WARNING"):
        summary = loop.train_and_evaluate(config, str(tmp_path / "plain"))
    assert summary["init_from"]["frozen_fresh_modules"] == []
    assert "random initialization" not in caplog.text


def test_the_frozen_parts_of_a_fresh_module_with_a_trained_nested_head_are_named():
    """GoogLeNet with aux classifiers, init_from.exclude=('head', 'aux1') (as the docs advise)
    and freeze='backbone': aux1's conv and fc start random and stay frozen, but aux1 was not
    named, because its nested head trains; its frozen parts are named now."""
    def dense(*shape):
        return {"kernel": np.zeros(shape, np.float32), "bias": np.zeros(shape[-1:], np.float32)}

    params = {"conv1": dense(3, 8), "inception3a": {"b1": dense(8, 8)},
              "aux1": {"conv": {"conv": dense(8, 4), "bn": {"scale": np.zeros(4, np.float32)}},
                       "fc": dense(4, 4), "head": dense(4, 10)},
              "head": dense(8, 10)}
    shapes = {"params": params}
    assert _frozen(["aux1", "head"], shapes, "backbone") == ["aux1/conv", "aux1/fc"]
    assert _frozen(["aux1/head", "head"], shapes, "backbone") == []  # only heads are fresh
    assert _frozen(["head", "inception3a"], shapes, "backbone") == ["inception3a"]
    assert _frozen(["aux1", "head"], shapes, None) == []


def test_freeze_without_init_from_trains_only_the_head(tmp_path, initial_states, caplog):
    """Allowed (a random-feature baseline), but said, as for a frozen module the warm start left
    out: the whole backbone stays at its random initialization. It passed silently before."""
    config = helpers.tiny_config(num_train_steps=4, eval_every_steps=4, freeze="backbone")
    with caplog.at_level("WARNING"):
        loop.train_and_evaluate(config, str(tmp_path))
    start, final = _flat(initial_states[0].params), _flat(_stored(str(tmp_path))["params"])
    for name in start:
        changed = bool(np.any(start[name] != final[name]))
        assert changed == name.startswith("head/"), name
    assert ("freeze='backbone' without init_from.workdir keeps the whole backbone at its "
            "random initialization" in caplog.text)


def test_resume_beats_init_from(source, tmp_path, monkeypatch):
    """A fine-tune killed at step 9 and rerun resumes from its own step-8 checkpoint: the source
    is never read again (here it is gone) and the result equals an uninterrupted fine-tune."""
    own_source = str(tmp_path / "source")
    shutil.copytree(source, own_source)
    config = _fine_tune_config(own_source, **{"model_kwargs.dropout_rate": 0.3})
    reference = loop.train_and_evaluate(config, str(tmp_path / "reference"))

    killed = tmp_path / "killed"
    helpers.run_until_crash(config, killed, monkeypatch)
    shutil.rmtree(own_source)
    summary = loop.train_and_evaluate(config, str(killed))
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 8
    assert summary["init_from"] == reference["init_from"]  # recorded by the first attempt
    a, b = _stored(str(tmp_path / "reference")), _stored(str(killed))
    for part in ("params", "batch_stats", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, a[part], b[part])


def test_an_unreadable_init_from_record_does_not_fail_the_finished_run(source, tmp_path,
                                                                        monkeypatch):
    """init_from.json cut short (a disk error): every attempt trained to the end and then failed
    in summary.json with JSON's bare "Expecting value" (a rerun again: the run could never
    complete). The record is only informational: the run completes, warning that it is lost."""
    config = _fine_tune_config(source)
    killed = tmp_path / "killed"
    helpers.run_until_crash(config, killed, monkeypatch)
    (killed / "init_from.json").write_text('{"workdir": ')
    with pytest.warns(RuntimeWarning, match="init_from.json.*unreadable"):
        summary = loop.train_and_evaluate(config, str(killed))
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 8
    assert "init_from" not in summary


def test_architecture_name_may_differ_when_every_shape_matches(source, tmp_path):
    renamed = tmp_path / "renamed"
    shutil.copytree(source, renamed)
    saved = json.loads((renamed / "config.json").read_text())
    (renamed / "config.json").write_text(json.dumps(dict(saved, model="tiny_v0")))
    config = _fine_tune_config(str(renamed), num_train_steps=2, eval_every_steps=2)
    summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["init_from"]["model"] == "tiny_v0" and summary["status"] == "completed"


# ---------------------------------------------------------------------------------- errors
def _raises(config, workdir, monkeypatch, message):
    _no_compilation(monkeypatch)
    with pytest.raises(ValueError) as err:
        loop.train_and_evaluate(config, str(workdir))
    assert message in str(err.value), str(err.value)
    return str(err.value)


def test_missing_source_workdir(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope")
    _raises(
        _fine_tune_config(missing), tmp_path / "run", monkeypatch,
        f"init_from: workdir={missing!r} is invalid; it does not exist (looked for checkpoints "
        f"in {os.path.join(missing, 'checkpoints')!r}); expected the --workdir of a run that "
        "saved checkpoints.",
    )


def test_a_refused_warm_start_leaves_the_run_restart_would_replace(source, tmp_path,
                                                                   monkeypatch):
    """restart=True over a run of another config deleted that run (checkpoints, metrics,
    config.json) before the init_from source was read, so a missing source emptied the workdir
    for nothing; the source is now read first, and the refusal changes no file there."""
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)

    def files():  # but the lock each run takes on the workdir
        return {str(p.relative_to(workdir)): p.read_bytes() if p.is_file() else None
                for p in workdir.rglob("*") if p.name != "run.lock"}

    before = files()
    config = _fine_tune_config(str(tmp_path / "nope"), restart=True)
    _raises(config, workdir, monkeypatch, "init_from: workdir=")
    assert files() == before


def test_source_workdir_without_checkpoints(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(
        _fine_tune_config(str(empty)), tmp_path / "run", monkeypatch,
        f"init_from: workdir={str(empty)!r} is invalid; it has no checkpoints (looked for "
        f"checkpoints in {str(empty / 'checkpoints')!r})",
    )
    (empty / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a torn save
    _raises(
        _fine_tune_config(str(empty)), tmp_path / "run", monkeypatch,
        f"init_from: workdir={str(empty)!r} is invalid; it has no complete checkpoint (looked "
        f"in {str(empty / 'checkpoints')!r})",
    )


def test_requested_step_not_present_lists_the_steps(source, tmp_path, monkeypatch):
    config = _fine_tune_config(source)
    config.init_from.step = 5
    _raises(
        config, tmp_path, monkeypatch,
        f"init_from: step=5 is invalid; {os.path.join(source, 'checkpoints')!r} has checkpoints "
        "at steps [6, 8, 12].",
    )


def test_shape_mismatch_names_the_path_and_suggests_exclude(source, tmp_path, monkeypatch):
    config = _fine_tune_config(source)
    config.init_from.step = 12
    config.init_from.exclude = ()
    _raises(
        config, tmp_path, monkeypatch,
        f"init_from: exclude=() is invalid; params/head/bias has shape (4,) in the "
        f"checkpoint at step 12 of {source!r} but (2,) in the new model "
        f"'{helpers.TINY_MODEL}'; add 'head' to init_from.exclude to keep it freshly "
        "initialized.",
    )


def _handmade_source(workdir, model, params, batch_stats):
    """A checkpoint holding only the variables (what a warm start reads) plus config.json."""
    checkpointer = Checkpointer(str(workdir), use_async=False)
    checkpointer.save(3, {"params": params, "batch_stats": batch_stats, "step": np.int32(3)})
    checkpointer.close()
    (workdir / "config.json").write_text(json.dumps({"model": model}))


def _tiny_variables(**drop):
    conv = {"kernel": np.zeros((3, 3, 1, 4), np.float32), "bias": np.zeros(4, np.float32)}
    bn = {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}
    params = {"conv": conv, "bn": bn}
    for module, leaf in drop.items():
        del params[module][leaf]
    stats = {"bn": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}}
    return params, stats


def test_missing_variable_is_named(tmp_path, monkeypatch):
    source = tmp_path / "source"
    _handmade_source(source, helpers.TINY_MODEL, *_tiny_variables(conv="bias"))
    _raises(
        _fine_tune_config(str(source)), tmp_path / "run", monkeypatch,
        f"init_from: exclude=('head',) is invalid; the new model needs params/conv/bias but the "
        f"checkpoint at step 3 of {str(source)!r} (model '{helpers.TINY_MODEL}') has no such "
        "variable; add 'conv' to init_from.exclude to keep it freshly initialized.",
    )


def test_source_variables_the_new_model_would_not_load_are_refused(tmp_path, monkeypatch,
                                                                   caplog):
    """A source with a module the new model lacks (here `extra`, like a deeper network's extra
    blocks) is refused through the engine before anything compiles or is written; excluding it
    lets the warm start through, and the record says what of the source was left out."""
    source = tmp_path / "source"
    params, stats = _tiny_variables()
    params["extra"] = {"kernel": np.zeros((4, 4), np.float32)}
    stats["extra"] = {"mean": np.zeros(4, np.float32)}
    _handmade_source(source, "tiny_deeper", params, stats)
    run = tmp_path / "run"
    message = _raises(
        _fine_tune_config(str(source)), run, monkeypatch,
        f"init_from: exclude=('head',) is invalid; the checkpoint at step 3 of {str(source)!r} "
        f"(model 'tiny_deeper') has variables the new model '{helpers.TINY_MODEL}' would not "
        "load: 2 leaves in 1 module ('extra'); a warm start loads every source variable outside "
        "init_from.exclude",
    )
    assert message.endswith("add those modules to config.init_from.exclude (it names modules "
                            "at any depth: --config.init_from.exclude=\"('head', 'extra')\").")
    # read before the workdir is prepared: no config.json, checkpoints/ or init_from.json (the
    # lock and the failed run's summary.json saying why)
    assert sorted(os.listdir(run)) == ["run.lock", "summary.json"]

    monkeypatch.undo()
    _install(monkeypatch)
    config = _fine_tune_config(str(source), num_train_steps=2, eval_every_steps=2)
    config.init_from.exclude = ("head", "extra")
    summary = loop.train_and_evaluate(config, str(tmp_path / "partial"))
    record = summary["init_from"]
    assert summary["status"] == "completed"
    assert record["excluded_source_modules"] == ["extra"]  # the source has no head
    assert (record["loaded_leaves"], record["source_leaves"]) == (6, 8)
    assert record["fresh_modules"] == ["head"]
    assert "init_from.exclude names" not in caplog.text  # 'extra' is the source's: no warning


def _model_shapes(name, num_classes=10, size=32, **kwargs):
    """`{collection: ShapeDtypeStruct tree}` of a fresh `name` (traced, never run)."""
    from cnnjax.models import create_model
    from cnnjax.train.state import init_variables

    model = create_model(name, num_classes=num_classes, **kwargs)
    return jax.eval_shape(lambda r: init_variables(model, r, (1, size, size, 3)),
                          jax.random.key(0))


def _select(new, source, exclude=("head",), submodule=None, size=32):
    """`select_pretrained` of model `new` (5 classes) from a 10-class `source` run."""
    return select_pretrained(
        _model_shapes(new, 5, size), _model_shapes(source, 10, size), exclude,
        source_workdir="src", source_step=1, model=new, source_model=source,
        submodule=submodule)


RESNET34_EXTRA_BLOCKS = ("stage1_block3", "stage2_block3", "stage2_block4", "stage3_block3",
                         "stage3_block4", "stage3_block5", "stage3_block6", "stage4_block3")
VGG11_BN_BATCHNORMS = ("bn1_1", "bn2_1", "bn3_1", "bn3_2", "bn4_1", "bn4_2", "bn5_1", "bn5_2")


@pytest.mark.parametrize(
    ("new", "source", "submodule", "size", "message"),
    [
        ("resnet18", "resnet34", None, 32,
         "the checkpoint at step 1 of 'src' (model 'resnet34') has variables the new model "
         "'resnet18' would not load: 80 leaves in 8 modules ('stage1_block3', 'stage2_block3', "
         "'stage2_block4', 'stage3_block3', 'stage3_block4', 'stage3_block5' and 2 more)"),
        ("vgg11", "vgg11_bn", None, 32,  # conv weights trained to feed BatchNorm, BN dropped
         "the checkpoint at step 1 of 'src' (model 'vgg11_bn') has variables the new model "
         "'vgg11' would not load: 32 leaves in 8 modules ('features/bn1_1', 'features/bn2_1', "
         "'features/bn3_1', 'features/bn3_2', 'features/bn4_1', 'features/bn4_2' and 2 more)"),
        ("fcn8s_resnet18", "resnet34", "backbone", 64,
         "the checkpoint at step 1 of 'src' (model 'resnet34') has variables the new model "
         "'fcn8s_resnet18' would not load into 'backbone': 80 leaves in 8 modules "
         "('stage1_block3', 'stage2_block3', 'stage2_block4', 'stage3_block3', 'stage3_block4', "
         "'stage3_block5' and 2 more)"),
    ],
    ids=["resnet18<-resnet34", "vgg11<-vgg11_bn", "fcn8s_resnet18.backbone<-resnet34"],
)
def test_a_larger_source_architecture_is_not_loaded_in_part(new, source, submodule, size,
                                                            message):
    """Every new leaf exists in the source with its shape, but the source has more: refused,
    naming both models and the unused modules, with the exclude that would allow it."""
    with pytest.raises(ValueError) as err:
        _select(new, source, submodule=submodule, size=size)
    text = str(err.value)
    assert text.startswith("init_from: exclude=('head',) is invalid; " + message), text
    assert "if a partial warm start is really intended, add those modules to " \
           "config.init_from.exclude" in text
    extra = VGG11_BN_BATCHNORMS if source == "vgg11_bn" else RESNET34_EXTRA_BLOCKS
    assert text.endswith(f'--config.init_from.exclude="{("head", *extra)!r}").')


@pytest.mark.parametrize(
    ("new", "source", "submodule", "size", "extra", "loaded"),
    [
        ("resnet18", "resnet34", None, 32, RESNET34_EXTRA_BLOCKS, 100),
        ("vgg11", "vgg11_bn", None, 32, VGG11_BN_BATCHNORMS, 20),
        ("fcn8s_resnet18", "resnet34", "backbone", 64, RESNET34_EXTRA_BLOCKS, 100),
    ],
    ids=["resnet18<-resnet34", "vgg11<-vgg11_bn", "fcn8s_resnet18.backbone<-resnet34"],
)
def test_excluding_the_unused_source_modules_allows_a_partial_warm_start(
        new, source, submodule, size, extra, loaded):
    from cnnjax.train.state import excluded_source_modules

    exclude = ("head", *extra)
    selected = _select(new, source, exclude, submodule, size)
    assert sum(len(jax.tree.leaves(tree)) for tree in selected.values()) == loaded
    skipped = excluded_source_modules(_model_shapes(source, 10, size), exclude)
    prefix = "features/" if source == "vgg11_bn" else ""
    assert skipped == sorted(["head", *(prefix + name for name in extra)])


def test_same_architecture_warm_start_loads_everything_but_the_head():
    """resnet18 from a resnet18 run with another num_classes: all but `head` is loaded, as
    before the source-side check; the FCN trunk from a same-depth classifier likewise."""
    from cnnjax.train.state import excluded_source_modules, unused_source_modules

    new, source = _model_shapes("resnet18", 5), _model_shapes("resnet18", 10)
    selected = _select("resnet18", "resnet18")
    for collection in ("params", "batch_stats"):
        want = {p for p in flatten_dict(new[collection]) if p[0] != "head"}
        assert set(flatten_dict(selected[collection])) == want
    assert unused_source_modules(source, selected, ("head",)) == {}
    assert unused_source_modules(source, selected, ()) == {"head": 2}
    assert excluded_source_modules(source, ("head",)) == ["head"]
    fcn = _select("fcn8s_resnet18", "resnet18", submodule="backbone", size=64)
    assert sum(len(jax.tree.leaves(tree)) for tree in fcn.values()) == 100


def test_unused_leaves_of_a_loaded_module_are_named_themselves():
    """A source leaf the new model's version of a loaded module lacks (a conv bias) cannot be
    excluded alone: it is named as a variable, with how to proceed."""
    f32 = np.float32
    new = {"params": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 1, 4), f32)}}}
    source = {"params": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 1, 4), f32),
                                  "bias": jax.ShapeDtypeStruct((4,), f32)}}}
    with pytest.raises(ValueError, match=re.escape(
            "init_from: exclude=('head',) is invalid; the checkpoint at step 3 of 'src' (model "
            "'old') has variables the new model 'new' would not load: 1 leaf in 1 variable "
            "('params/conv/bias'); ")) as err:
        select_pretrained(new, source, ("head",), source_workdir="src", source_step=3,
                          model="new", source_model="old")
    assert "'params/conv/bias' lie in modules that are otherwise loaded" in str(err.value)


def test_different_architecture_is_refused(tmp_path, monkeypatch):
    source = tmp_path / "source"
    params, stats = _tiny_variables()
    params["conv"]["kernel"] = np.zeros((5, 5, 1, 6), np.float32)
    _handmade_source(source, "lenet5", params, stats)
    _raises(
        _fine_tune_config(str(source)), tmp_path / "run", monkeypatch,
        f"init_from: workdir={str(source)!r} is invalid; it holds a 'lenet5' run but "
        f"config.model='{helpers.TINY_MODEL}', and their variables do not match "
        "(params/conv/kernel has shape (5, 5, 1, 6) in the checkpoint at step 3 of "
        f"{str(source)!r} but (3, 3, 1, 4) in the new model '{helpers.TINY_MODEL}'); different "
        "architectures cannot be warm-started whole (set init_from.submodule to load the source "
        "into one module of the new model).",
    )


def test_leaves_no_module_exclusion_can_skip_get_their_own_hint():
    """A mismatch in a leaf directly inside `submodule` (or at the model's top level) cannot be
    fixed with `init_from.exclude` (which names modules), so that hint is not given."""
    new = {"params": {"backbone": {"scale": jax.ShapeDtypeStruct((4,), np.float32)}}}
    source = {"params": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 1, 4), np.float32)}}}
    kwargs = {"source_workdir": "src", "source_step": 3, "model": "new", "source_model": "old"}
    with pytest.raises(ValueError, match=re.escape(
            "init_from: submodule='backbone' is invalid; the new model needs "
            "params/backbone/scale but the checkpoint at step 3 of 'src' (model 'old') has no "
            "such variable as scale; expected the top-level module the source's variables "
            "fill.")):
        select_pretrained(new, source, ("head",), submodule="backbone", **kwargs)
    with pytest.raises(ValueError, match=re.escape(
            "init_from: workdir='src' is invalid; the new model needs params/scale but the "
            "checkpoint at step 3 of 'src' (model 'new') has no such variable, a top-level "
            "variable no init_from.exclude can skip.")):
        select_pretrained({"params": new["params"]["backbone"]}, source, ("head",),
                          **{**kwargs, "source_model": "new"})


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "freeze",
            "all",
            "config: freeze='all' is invalid; expected None (train every parameter), "
            "'backbone' (train only the head; backbone BatchNorm and dropout in train mode) or "
            "'backbone_eval' (train only the head; backbone BatchNorm and dropout in eval mode).",
        ),
        (
            "init_from.step",
            4,
            "init_from: step=4 is invalid; it needs init_from.workdir to be set.",
        ),
        (
            "init_from.ema",
            True,
            "init_from: ema=True is invalid; it needs init_from.workdir to be set (the run whose "
            "weight average to load).",
        ),
        (
            "init_from.exclude",
            ("head", ""),
            "init_from: exclude=('head', '') is invalid; expected a tuple of module names, "
            "e.g. ('head',);",
        ),
        (
            "init_from.exclude",
            ("head,aux1",),  # what `--config.init_from.exclude=head,aux1` gives
            "init_from: exclude=('head,aux1',) is invalid; expected a tuple of module names, "
            "e.g. ('head',); on the command line give it as a Python literal, "
            "--config.init_from.exclude=\"('head', 'aux1')\" (head,aux1 would be one name).",
        ),
        ("init_from.workdir", "", "init_from: workdir='' is invalid; expected the source run's"),
        (
            "init_from.submodule",
            "backbone/stem",
            "init_from: submodule='backbone/stem' is invalid; expected None or a top-level "
            "module name of the model, e.g. 'backbone'.",
        ),
    ],
)
def test_bad_fields(tmp_path, monkeypatch, field, value, message):
    config = helpers.tiny_config(**{field: value})
    _raises(config, tmp_path, monkeypatch, message)
    assert not (tmp_path / "checkpoints").exists()  # refused by validate_config, up front


def test_negative_step_is_refused():
    config = default_config()
    config.init_from.workdir = "/somewhere"
    config.init_from.step = -1
    with pytest.raises(ValueError, match=r"init_from: step=-1 is invalid; expected a checkpoint"):
        validate_config(config)


def test_freeze_optimizer_rejects_unknown_modes():
    with pytest.raises(ValueError, match="config: freeze='head' is invalid"):
        freeze_optimizer(None, {}, "head")


# --------------------------------------------------------------------- workdir compatibility
def test_workdirs_from_before_init_from_still_resume():
    """config.json files written before init_from/freeze existed stay compatible with the
    defaults; with a warm start set on either side, its fields are compared."""
    current = {"model": "lenet5", "init_from.workdir": None, "init_from.step": None,
               "init_from.exclude": ["head"], "freeze": None}
    saved = {"model": "lenet5"}
    assert incompatible_fields(saved, current) == []
    warm = dict(current, **{"init_from.workdir": "/src"})
    assert incompatible_fields(saved, warm) == ["init_from.exclude", "init_from.workdir"]
    assert incompatible_fields(current, dict(current, freeze="backbone")) == ["freeze"]


def test_a_source_reached_by_another_path_is_the_same_source(tmp_path):
    """A warm-started run (a transfer comparison's arm) resumes when its source, or the folder
    holding both, is reached through a symlink or another mount; another folder still differs.
    The rerun through the link was refused as an incompatible config (review BE)."""
    source, other = tmp_path / "runs" / "source", tmp_path / "runs" / "other"
    source.mkdir(parents=True)
    other.mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    for field in ("init_from.workdir", "distill.teacher_workdir"):
        saved = {field: str(source)}
        assert incompatible_fields(saved, {field: str(tmp_path / "link" / "source")}) == []
        assert incompatible_fields(saved, {field: str(tmp_path / "link" / ".." / "runs" /
                                                      "source")}) == []
        assert incompatible_fields(saved, {field: str(other)}) == [field]
        assert incompatible_fields(saved, {field: str(tmp_path / "gone")}) == [field]
        assert incompatible_fields(saved, {field: None}) == [field]


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_fine_tune_through_the_experiment_script(tmp_path):
    """LeNet-5 on digits for 40 steps, then `--config.init_from.workdir=` that run with another
    learning rate: the fine-tune starts from the source's best checkpoint and says so."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    common = [
        sys.executable, "-m", "experiments.train",
        f"--config={os.path.join(root, 'experiments', 'configs', 'lenet5_digits.py')}",
        "--config.global_batch_size=32", "--config.schedule.warmup_steps=5",
        "--config.progress_bar=False", "--config.tensorboard=False",
    ]
    source, fine_tune = tmp_path / "source", tmp_path / "fine_tune"
    first = subprocess.run(
        [*common, f"--workdir={source}", "--config.num_train_steps=40",
         "--config.eval_every_steps=20", "--config.checkpoint_every_steps=20"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run(
        [*common, f"--workdir={fine_tune}", "--config.num_train_steps=20",
         "--config.eval_every_steps=20", "--config.checkpoint_every_steps=20",
         "--config.optimizer.learning_rate=0.01", f"--config.init_from.workdir={source}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads((fine_tune / "summary.json").read_text())
    evals = {
        r["step"]: r["top1"]
        for r in map(json.loads, (source / "metrics.jsonl").read_text().splitlines())
        if r["split"] == "eval"
    }
    best = max(evals, key=lambda s: (evals[s], s))
    assert summary["init_from"]["workdir"] == str(source)
    assert summary["init_from"]["checkpoint"] == "best"
    assert summary["init_from"]["step"] == best
    assert summary["init_from"]["fresh_modules"] == ["head"]
    assert f"of the best checkpoint (step {best}) of {source}" in second.stderr
    assert summary["status"] == "completed" and summary["final_eval"]["top1"] > 0.5
    config = json.loads((fine_tune / "config.json").read_text())
    assert config["optimizer"]["learning_rate"] == 0.01


def test_googlenet_auxiliary_heads_are_heads_for_warm_start_and_freeze():
    """GoogLeNet with aux_logits=True, 10 -> 5 classes: the default exclude ('head',) also
    leaves aux1/head and aux2/head (shape (1024, classes)) fresh instead of refusing the warm
    start, and freeze='backbone' trains them with the main head; everything else in the
    auxiliary branches (conv, fc) is loaded and frozen."""
    import optax

    from cnnjax.models import create_model
    from cnnjax.train.state import init_variables, select_pretrained

    def shapes(num_classes):
        model = create_model("googlenet", num_classes=num_classes, aux_logits=True)
        return jax.eval_shape(lambda r: init_variables(model, r, (1, 96, 96, 3)),
                              jax.random.PRNGKey(0))

    new = shapes(5)
    selected = select_pretrained(new, shapes(10), ("head",), source_workdir="source",
                                 source_step=1, model="googlenet", source_model="googlenet")
    all_params = set(flatten_dict(new["params"]))
    heads = {p for p in all_params if "head" in p[:-1]}
    assert {p[:-1] for p in heads} == {("head",), ("aux1", "head"), ("aux2", "head")}
    assert set(flatten_dict(selected["params"])) == all_params - heads
    assert ("aux1", "fc", "kernel") in all_params - heads  # the branch itself is loaded

    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), new["params"])
    tx = freeze_optimizer(optax.sgd(1.0), params, "backbone")
    updates, _ = tx.update(params, tx.init(params), params)
    trained = {p for p, u in flatten_dict(updates).items() if np.any(np.asarray(u) != 0)}
    assert trained == heads


def test_a_source_with_auxiliary_classifiers_into_a_model_without_them_needs_them_excluded():
    """GoogLeNet trained with aux_logits=True, fine-tuned without: the auxiliary branches
    (beyond their `head`s, excluded by default) would be dropped, so they must be named."""
    new = _model_shapes("googlenet", 5, 96, aux_logits=False)
    source = _model_shapes("googlenet", 10, 96, aux_logits=True)
    kwargs = {"source_workdir": "src", "source_step": 1, "model": "googlenet",
              "source_model": "googlenet"}
    with pytest.raises(ValueError, match=re.escape(
            "would not load: 8 leaves in 2 modules ('aux1', 'aux2'); ")) as err:
        select_pretrained(new, source, ("head",), **kwargs)
    assert str(err.value).endswith("--config.init_from.exclude=\"('head', 'aux1', 'aux2')\").")
    selected = select_pretrained(new, source, ("head", "aux1", "aux2"), **kwargs)
    assert set(flatten_dict(selected["params"])) == {
        p for p in flatten_dict(new["params"]) if p[0] != "head"}


def test_submodule_loads_a_classifier_into_an_fcn_backbone():
    """`init_from.submodule='backbone'`: a resnet18 classifier's variables (its `head` ignored)
    fill exactly FCN-8s-ResNet-18's `backbone`; score and upsampling layers stay fresh."""
    from cnnjax.models import create_model
    from cnnjax.train.state import under_submodule

    def shapes(name, num_classes):
        model = create_model(name, num_classes=num_classes)
        return jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 64, 64, 3)),
                                                 train=False))

    fcn, classifier = shapes("fcn8s_resnet18", 2), shapes("resnet18", 1000)
    kwargs = {"source_workdir": "src", "source_step": 0, "model": "fcn8s_resnet18",
              "source_model": "resnet18"}
    selected = select_pretrained(fcn, classifier, ("head",), submodule="backbone", **kwargs)
    nested = under_submodule(selected, "backbone")
    for collection in ("params", "batch_stats"):
        assert "head" not in selected[collection]  # the classifier's head is not read
        assert set(nested[collection]) == {"backbone"}
        assert (jax.tree.map(np.shape, nested[collection]["backbone"])
                == jax.tree.map(np.shape, fcn[collection]["backbone"]))
    assert set(fcn["params"]) - {"backbone"} >= {"head", "score_pool3", "score_pool4"}
    with pytest.raises(ValueError, match=r"init_from: submodule='trunk' is invalid; model "
                                         r"'fcn8s_resnet18' has no such top-level module; it "
                                         r"has \['backbone', 'head'"):
        select_pretrained(fcn, classifier, ("head",), submodule="trunk", **kwargs)
    # Another architecture: named as the source run, not as one module to exclude after
    # another (following that hint took 11 rounds for lenet5, then refused its unused layers).
    for source_model, parts in (("resnet50", "8 of the module's parts differ ('stage1_block1', "
                                 "'stage1_block2', 'stage2_block1', 'stage2_block2' and 4 more; "
                                 "first: params/backbone/stage1_block1/conv1/kernel has shape "
                                 "(1, 1, 64, 64)"),
                                ("lenet5", "10 of the module's parts differ ('bn_init', "
                                 "'conv_init', 'stage1_block1', 'stage1_block2' and 6 more; "
                                 "first: the new model needs params/backbone/bn_init/")):
        source = shapes(source_model, 10) if source_model == "lenet5" else shapes("resnet50", 1000)
        with pytest.raises(ValueError) as err:
            select_pretrained(fcn, source, ("head",), submodule="backbone",
                              **(kwargs | {"source_model": source_model}))
        assert str(err.value).startswith(
            f"init_from: workdir='src' is invalid; its run (model {source_model!r}) does not fit "
            f"module 'backbone' of 'fcn8s_resnet18': {parts}"), str(err.value)
        assert str(err.value).endswith("expected a run of the architecture 'backbone' is "
                                       "(init_from.exclude can leave one part fresh, not replace "
                                       "the architecture).")


def _damage(step_dir: Path, how: str) -> None:
    """Damages one checkpoint's files as a disk or a copy can: its array data files gone, its
    OCDBT manifest emptied, its tree metadata (`default/_METADATA`) lost, or its arrays replaced
    by another step's (valid files that decode into other numbers: only the digests see it)."""
    item = step_dir / "default"
    if how == "arrays_replaced":
        other = next(p for p in step_dir.parent.iterdir() if p.name.isdigit() and p != step_dir)
        shutil.rmtree(item)
        shutil.copytree(other / "default", item)
    elif how == "data_lost":
        for data in item.rglob("d/*"):  # the OCDBT data and tree files, wherever they are
            data.unlink()
    elif how == "manifest_emptied":
        (item / "manifest.ocdbt").write_bytes(b"")
    else:
        (item / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["data_lost", "manifest_emptied", "metadata_lost",
                                 "arrays_replaced"])
def test_a_damaged_source_checkpoint_is_named_with_its_flag(source, tmp_path, monkeypatch, how):
    """A source checkpoint whose files are damaged is refused before anything compiles, naming
    the init_from field that chose it (workdir: the best checkpoint; step: a requested one), the
    step and the steps to pick instead. It was orbax's bare OUT_OF_RANGE / DATA_LOSS text, a
    lost _METADATA read as a checkpoint of no variables ('add conv to init_from.exclude'), and
    arrays failing their digests named neither field and offered the corrupt step itself."""
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    _damage(copy / "checkpoints" / "12", how)
    config = _fine_tune_config(str(copy))
    config.init_from.step = 12
    problem = ("is corrupt (array " if how == "arrays_replaced" else "could not be read (")
    message = _raises(config, tmp_path / "requested", monkeypatch,
                      f"init_from: step=12 is invalid; the checkpoint at step 12 of {str(copy)!r}"
                      f" {problem}")
    assert message.endswith("); expected another of its steps [6, 8] (or check its files).")

    source_checkpoints = SourceCheckpoints(str(copy))
    best, how_chosen = source_checkpoints.choose_step(None, "top1")
    source_checkpoints.close()
    if best != 12:  # damage the one the default picks
        _damage(copy / "checkpoints" / str(best), how)
    others = [s for s in (6, 8, 12) if s not in (best, 12)]
    message = _raises(_fine_tune_config(str(copy)), tmp_path / "best", monkeypatch,
                      f"init_from: workdir={str(copy)!r} is invalid; its {how_chosen} checkpoint "
                      f"(step {best}) {problem}")
    assert message.endswith(f"); set init_from.step to another of its steps {others} (or check "
                            "its files).")


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]"])
def test_a_source_config_json_that_cannot_be_read_is_named(source, tmp_path, monkeypatch, text):
    """A source whose config.json is not a JSON object (truncated, emptied) is refused naming
    the flag and the file, before anything compiles; it was a bare JSONDecodeError."""
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    (copy / "config.json").write_text(text)
    _raises(_fine_tune_config(str(copy)), tmp_path / "run", monkeypatch,
            f"init_from: workdir={str(copy)!r} is invalid; its "
            f"{str(copy / 'config.json')!r} is not a run's config (not a JSON object:")


def test_an_exclude_name_no_module_has_is_refused(source, tmp_path, monkeypatch):
    """A misspelt module in init_from.exclude ('cnov' for 'conv') was a warning and the run
    loaded that module anyway; it is refused naming the name and the modules there are. The
    default 'head' stays a warning when neither network has one (an FCN from an FCN)."""
    config = _fine_tune_config(str(source))
    config.init_from.exclude = ("head", "cnov")
    _raises(config, tmp_path / "run", monkeypatch,
            "init_from: exclude=('head', 'cnov') is invalid; 'cnov' names no module of model "
            f"'{helpers.TINY_MODEL}' nor of its source; expected module names such as "
            "['bn', 'conv', 'head'] (a name matches a module at any depth).")
    fcn = {"params": {"backbone": {"conv": {"kernel": 0}}, "score": {"kernel": 0}}}
    assert check_exclude_names(("head",), "fcn", fcn, fcn) == ["head"]  # warned about
    assert check_exclude_names(("head", "conv"), "fcn", fcn, {}) == ["head"]  # nested: matches


def test_init_from_ema_of_a_source_without_an_average_says_so_before_the_exclude_names(
        tmp_path, monkeypatch):
    """init_from.ema=True of a source that kept no weight average reads no source modules, so
    an exclude name only the source has ('extra', a deeper source's block) looked misspelt; the
    missing average is the error."""
    source = tmp_path / "source"
    params, stats = _tiny_variables()
    params["extra"] = {"kernel": np.zeros((4, 4), np.float32)}
    _handmade_source(source, "tiny_deeper", params, stats)
    config = _fine_tune_config(str(source))
    config.init_from.exclude = ("head", "extra")
    config.init_from.ema = True
    _raises(config, tmp_path / "run", monkeypatch,
            "init_from: ema=True is invalid; the checkpoint at step 3 of")


def test_an_rgb_source_for_grey_data_suggests_grey_to_rgb(tmp_path, monkeypatch):
    """A source whose input layer takes 3 channels (an RGB run, ImageNet weights) and grey data
    (the synthetic 1-channel images): the error says why the first kernel's shape differs and
    names data.grey_to_rgb, which feeds the grey images as RGB, beside init_from.exclude."""
    source = tmp_path / "source"
    params, stats = _tiny_variables()
    params["conv"]["kernel"] = np.zeros((3, 3, 3, 4), np.float32)  # takes RGB images
    _handmade_source(source, helpers.TINY_MODEL, params, stats)
    _raises(
        _fine_tune_config(str(source)), tmp_path / "run", monkeypatch,
        f"init_from: workdir={str(source)!r} is invalid; params/conv/kernel has shape "
        f"(3, 3, 3, 4) in the checkpoint at step 3 of {str(source)!r} but (3, 3, 1, 4) in the "
        f"new model '{helpers.TINY_MODEL}': the source's input layer takes 3-channel (RGB) "
        "images and this run's have 1 channel (grey); set data.grey_to_rgb=True to feed them "
        "as RGB (the channel repeated 3 times), or add 'conv' to init_from.exclude to train "
        "that layer from scratch.",
    )


def test_a_grey_source_for_grey_data_fed_as_rgb_suggests_unsetting_grey_to_rgb(
        tmp_path, monkeypatch):
    """The converse: a source trained on the grey images (a 1-channel input layer) and a run
    that feeds them as RGB (data.grey_to_rgb=True): the error names data.grey_to_rgb (it
    suggested only init_from.exclude, which would drop the first layer's trained weights)."""
    source = tmp_path / "source"
    params, stats = _tiny_variables()
    assert params["conv"]["kernel"].shape == (3, 3, 1, 4)  # takes grey images
    _handmade_source(source, helpers.TINY_MODEL, params, stats)
    import cnnjax.data

    fake, grey_info = cnnjax.data.pipeline, cnnjax.data.pipeline.get_dataset_info

    def info(data_config):  # as the real pipeline's: grey images fed as RGB have 3 channels
        grey = grey_info(data_config)
        return helpers.DatasetInfo(grey.name, grey.num_classes, (*grey.image_shape[:2], 3),
                                   grey.num_train, grey.num_eval)

    monkeypatch.setattr(fake, "get_dataset_info", info)
    config = _fine_tune_config(str(source))
    config.data.grey_to_rgb = True
    _raises(
        config, tmp_path / "run", monkeypatch,
        f"init_from: workdir={str(source)!r} is invalid; params/conv/kernel has shape "
        f"(3, 3, 1, 4) in the checkpoint at step 3 of {str(source)!r} but (3, 3, 3, 4) in the "
        f"new model '{helpers.TINY_MODEL}': the source's input layer takes 1-channel (grey) "
        "images and this run feeds its grey images as RGB (data.grey_to_rgb=True); set "
        "data.grey_to_rgb=False to feed them as the source saw them, or add 'conv' to "
        "init_from.exclude to train that layer from scratch.",
    )


def test_choose_step_never_picks_a_non_finite_metric(tmp_path):
    """A NaN eval metric (json's NaN in metrics.jsonl) is not the best: `max` kept a NaN
    that came first as the maximum whatever followed it."""
    _checkpoints(tmp_path, [4, 8, 12])
    records = [{"split": "eval", "step": 4, "map50": float("nan")},
               {"split": "eval", "step": 8, "map50": 0.5},
               {"split": "eval", "step": 12, "map50": float("inf")}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    source = SourceCheckpoints(str(tmp_path))
    assert source.choose_step(None, "map50", "max") == (8, "best")
    assert source.choose_step(None, "map50", "min") == (8, "best")
    source.close()

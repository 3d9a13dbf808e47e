"""Knowledge distillation (`config.distill`): the loss against float64 NumPy, alpha=0 == a plain
run bitwise, no gradient to the teacher, exact resume, a changed teacher refused, 2 devices == 1,
every refused input, and workdirs from before the field."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax.train import config as config_lib
from cnnjax.train import distill, loop, losses
from cnnjax.train.checkpoint import Checkpointer
from cnnjax.train.optim import build_optimizer
from cnnjax.train.state import create_train_state
from cnnjax.train.step import make_steps
from tests.train import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    helpers.install_fake_pipeline(monkeypatch)


def _train_teacher(workdir, **overrides):
    """A tiny finished run to distill from (12 steps of the synthetic task)."""
    loop.train_and_evaluate(helpers.tiny_config(**overrides), str(workdir))
    return str(workdir)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        helpers.install_fake_pipeline(monkeypatch)
        return _train_teacher(tmp_path_factory.mktemp("teacher"), **{"ema.decay": 0.9})


@pytest.fixture(scope="module")
def retrained_teacher(tmp_path_factory):
    """`teacher` trained again from another seed (other variables, same step 12): copied over a
    teacher's workdir, it stands for a teacher retrained in place since a student started."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        helpers.install_fake_pipeline(monkeypatch)
        return _train_teacher(tmp_path_factory.mktemp("retrained_teacher"), seed=1,
                              **{"ema.decay": 0.9})


def _retrain_in_place(workdir, retrained):
    """`workdir`'s teacher replaced by the retrained one (what retraining it there leaves)."""
    shutil.rmtree(workdir)
    shutil.copytree(retrained, workdir)


def _student(teacher_workdir, **overrides):
    return helpers.tiny_config(**{"distill.teacher_workdir": teacher_workdir, **overrides})


def _final_state(workdir, config):
    """The host state of the newest checkpoint (with its weight average if `config` keeps one)."""
    from cnnjax.models import create_model

    model = create_model(config.model, num_classes=helpers.NUM_CLASSES, axis_name="data")
    template = loop.fresh_state(config, model, build_optimizer(config), helpers.IMAGE_SHAPE)
    checkpointer = Checkpointer(workdir, use_async=False)
    try:
        return checkpointer.restore_latest(template)[0]
    finally:
        checkpointer.close()


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ------------------------------------------------------------------------------ the loss itself
def _log_softmax64(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _soft_loss64(student, teacher, temperature):
    """T^2 * sum_c p_t (log p_t - log p_s), p = softmax(z / T), in float64."""
    log_s = _log_softmax64(student.astype(np.float64) / temperature)
    log_t = _log_softmax64(teacher.astype(np.float64) / temperature)
    return temperature**2 * np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_soft_target_loss_matches_float64_numpy(temperature):
    """Float32 JAX vs float64 NumPy: relative 1e-5 (a few float32 ulps of the log-softmaxes);
    a teacher confident to 1e-13 (logits 30 apart) still gives a finite, exact term."""
    rng = np.random.default_rng(0)
    student = rng.normal(0, 3, (16, 10)).astype(np.float32)
    teacher = rng.normal(0, 3, (16, 10)).astype(np.float32)
    teacher[0] = 0.0
    teacher[0, 3] = 30.0  # peaked: p_t of the others ~ e^-30 at T = 1
    got = np.asarray(distill.soft_target_loss(student, teacher, temperature))
    np.testing.assert_allclose(got, _soft_loss64(student, teacher, temperature),
                               rtol=1e-5, atol=1e-6)
    assert np.asarray(distill.soft_target_loss(teacher, teacher, temperature)) == \
        pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("temperature", [50.0, 100.0, 1e3, 1e4])
def test_soft_target_loss_keeps_its_precision_at_a_large_temperature(temperature):
    """At large T the KL (O(1/T^2)) sank below the float32 rounding of the log-probabilities it
    was a difference of: 0.37% off at T = 100, 22% at 1000, negative at 10^4. Against float64:
    relative 5e-7 x T, at least 1e-4 (the centred form's error is ~ float32 epsilon x T), and
    never negative."""
    rng = np.random.default_rng(3)
    student = rng.normal(0, 1, (64, 10)).astype(np.float32)
    teacher = rng.normal(0, 1, (64, 10)).astype(np.float32)
    got = np.asarray(distill.soft_target_loss(student, teacher, temperature))
    np.testing.assert_allclose(got, _soft_loss64(student, teacher, temperature),
                               rtol=max(1e-4, 5e-7 * temperature))
    assert np.all(got >= 0)
    grad = jax.grad(lambda s: distill.soft_target_loss(s, teacher, temperature).sum())(student)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_the_objective_matches_float64_numpy_with_label_smoothing():
    """total = (1 - alpha) * CE(smoothed one-hot) + alpha * T^2 KL, per example; `loss` stays the
    hard cross-entropy a plain run reports. Same tolerance."""
    rng = np.random.default_rng(1)
    student = rng.normal(0, 2, (8, 5)).astype(np.float32)
    teacher = rng.normal(0, 2, (8, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 8).astype(np.int32)
    rule = distill.Distillation(temperature=3.0, alpha=0.7)
    per_example = losses.example_metrics(student, labels, label_smoothing=0.1)
    got = distill.distillation_metrics(per_example, student, teacher, rule)
    targets = np.full((8, 5), 0.1 / 5) + 0.9 * np.eye(5)[labels]
    hard = -np.sum(targets * _log_softmax64(student.astype(np.float64)), axis=-1)
    soft = _soft_loss64(student, teacher, 3.0)
    for name, expected in (("loss", hard), ("distill_loss", soft),
                           ("total_loss", 0.3 * hard + 0.7 * soft)):
        np.testing.assert_allclose(np.asarray(got[name]), expected, rtol=1e-5, atol=1e-6)


def test_the_t_squared_factor_keeps_gradients_the_paper_size():
    """Hinton et al. eq. 4: at high T with zero-mean logits, d(KL)/dz_i ~ (z_i - v_i) / (C T^2);
    times T^2 the soft term's gradient is (z_i - v_i) / C whatever T is: within 2.5% (in norm;
    the neglected terms are O(|z| / T) relative) at T = 50 and 100."""
    rng = np.random.default_rng(2)
    z, v = rng.normal(0, 1, (2, 1, 10))
    z, v = (x - x.mean() for x in (z, v))
    expected = (z - v) / 10
    for temperature in (50.0, 100.0):
        grad = jax.grad(lambda s, t=temperature: distill.soft_target_loss(s, v, t).sum())(
            jnp.asarray(z, jnp.float32))
        error = np.linalg.norm(np.asarray(grad) - expected) / np.linalg.norm(expected)
        assert error < 0.025, (temperature, error)


# ------------------------------------------------------------------------------- the train step
def test_no_gradient_reaches_the_teacher():
    """The new student params do not depend on the teacher's variables (stop_gradient: their
    derivative is exactly zero), yet the teacher changes the update (alpha > 0)."""
    model = helpers.TinyNet(axis_name="data")
    tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    teacher_variables = helpers.TinyNet().init(jax.random.PRNGKey(1),
                                               np.zeros((1, *helpers.IMAGE_SHAPE), "f4"))
    train_step, _ = make_steps(model, tx, schedule, "data", distill=distill.Distillation(),
                               teacher=helpers.TinyNet())
    batch = next(helpers.train_batches(None, global_batch_size=16, num_devices=1, seed=0))

    # jitted: run op by op, the step and its gradient compiled one program per op (~4 s more
    # of a cold run)
    @jax.jit
    def new_params(variables):
        step = jax.vmap(train_step, in_axes=(None, 0, None), axis_name="data")
        new_state, metrics = step(state, batch, variables)
        return new_state.params, metrics

    def params_sum(variables):
        return sum(jnp.sum(p) for p in jax.tree.leaves(new_params(variables)[0]))

    grads = jax.jit(jax.grad(params_sum))(teacher_variables)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
    other = jax.tree.map(lambda x: x * 2.0, teacher_variables)
    assert _max_diff(new_params(teacher_variables)[0], new_params(other)[0]) > 1e-4
    metrics = new_params(teacher_variables)[1]
    assert {"loss", "distill_loss", "total_loss"} <= set(metrics)


def test_with_mixing_the_teacher_scores_the_students_mixed_images():
    """With mixup the teacher scores the mixed images the student trains on, not the batch
    before mixing: the step's `distill_loss` equals a float64 T^2 KL(p_t || p_s) of the teacher
    (eval mode) and student (train mode) on the batch mixed with the step's own key
    (`split(fold_in(fold_in(rng, step), device))[0]`), relative 1e-5."""
    from cnnjax.train.mixing import Mixing

    model = helpers.TinyNet(axis_name="data")
    tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    teacher_variables = helpers.TinyNet().init(jax.random.PRNGKey(1),
                                               np.zeros((1, *helpers.IMAGE_SHAPE), "f4"))
    rule, temperature = Mixing(mixup_alpha=0.4), 4.0
    train_step, _ = make_steps(model, tx, schedule, "data", mixing=rule,
                               distill=distill.Distillation(temperature=temperature, alpha=0.5),
                               teacher=helpers.TinyNet())
    batch = next(helpers.train_batches(None, global_batch_size=16, num_devices=1, seed=0))
    step = jax.jit(jax.vmap(train_step, in_axes=(None, 0, None), axis_name="data"))
    _, metrics = step(state, batch, teacher_variables)

    mix_rng = jax.random.split(jax.random.fold_in(jax.random.fold_in(state.rng, 0), 0))[0]
    images, _, lam = rule(mix_rng, jnp.asarray(batch["image"][0]),
                          jnp.asarray(batch["label"][0]), helpers.NUM_CLASSES)
    assert 0.0 < float(lam) < 1.0  # this key mixes
    student, _ = helpers.TinyNet().apply(state.variables(), images, train=True,
                                         mutable=["batch_stats"])
    teacher_logits = helpers.TinyNet().apply(teacher_variables, images, train=False)
    expected = np.mean(_soft_loss64(np.asarray(student), np.asarray(teacher_logits), temperature))
    np.testing.assert_allclose(float(metrics["distill_loss"][0]), expected, rtol=1e-5)


# ------------------------------------------------------------------------------------ full runs
def test_alpha_zero_trains_bitwise_like_a_plain_run_and_the_teacher_is_untouched(
        tmp_path, teacher):
    fingerprint = distill.fingerprint(_teacher_variables(teacher))
    plain = helpers.tiny_config(**{"model_kwargs.dropout_rate": 0.3})
    loop.train_and_evaluate(plain, str(tmp_path / "plain"))
    zero = _student(teacher, **{"model_kwargs.dropout_rate": 0.3, "distill.alpha": 0.0})
    summary = loop.train_and_evaluate(zero, str(tmp_path / "zero"))
    jax.tree.map(np.testing.assert_array_equal, _final_state(str(tmp_path / "plain"), plain),
                 _final_state(str(tmp_path / "zero"), zero))
    assert summary["distill"]["fingerprint"] == fingerprint
    assert {"loss", "distill_loss", "total_loss"} <= set(summary["final_train"])
    assert set(summary["final_eval"]) == {"loss", "top1", "top5", "num_examples"}
    # The teacher's checkpoints are read, never written (alpha > 0 changing the update:
    # test_no_gradient_reaches_the_teacher).
    assert distill.fingerprint(_teacher_variables(teacher)) == fingerprint


def test_a_bfloat16_student_distills_under_shard_map(tmp_path, teacher):
    """Mixed precision and the shard_map wrapper: the float32 teacher's logits meet the bfloat16
    student's in float32; the run completes with finite terms."""
    config = _student(teacher, compute_dtype="bfloat16", parallel="shard_map")
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["status"] == "completed"
    train = summary["final_train"]
    assert all(np.isfinite(train[k]) for k in ("loss", "distill_loss", "total_loss"))
    assert train["total_loss"] == pytest.approx(0.1 * train["loss"] + 0.9 * train["distill_loss"],
                                                rel=1e-5)


def _teacher_variables(workdir):
    from cnnjax.train.trained import load_trained

    return load_trained(workdir, num_devices=1).variables


def test_exact_resume_after_crash_with_distillation(tmp_path, monkeypatch, teacher):
    """Dropout, mixup, weight averaging and 2 accumulation micro-batches, distilling from the
    teacher's weight average: a run killed at step 9 and rerun ends bitwise equal."""
    config = _student(teacher, **{"model_kwargs.dropout_rate": 0.3, "mixing.mixup_alpha": 0.4,
                                  "ema.decay": 0.9, "grad_accum_steps": 2, "distill.ema": True})
    reference = tmp_path / "reference"
    loop.train_and_evaluate(config, str(reference))
    resumed = tmp_path / "resumed"
    helpers.run_until_crash(config, resumed, monkeypatch)
    record = json.loads((resumed / distill.DISTILL_FILE).read_text())
    assert record["ema"] is True and record["workdir"] == os.path.abspath(teacher)
    summary = loop.train_and_evaluate(config, str(resumed))
    assert summary["resumed_from_step"] == 8 and summary["distill"] == record
    jax.tree.map(np.testing.assert_array_equal, _final_state(str(reference), config),
                 _final_state(str(resumed), config))


def test_a_changed_teacher_is_refused_on_resume(tmp_path, monkeypatch, teacher,
                                                 retrained_teacher):
    """The teacher is not in the checkpoint: a resume reads it again, and one retrained in the
    same workdir since (other variables, same step) would break exact resume: refused, naming
    both, before anything compiles."""
    copy = str(tmp_path / "teacher")
    shutil.copytree(teacher, copy)
    config = _student(copy)
    helpers.run_until_crash(config, tmp_path / "student", monkeypatch, at_step=5)
    _retrain_in_place(copy, retrained_teacher)
    with pytest.raises(ValueError, match=re.escape(
            f"distill: teacher_workdir={copy!r} is invalid; this run started with another "
            f"teacher (workdir={copy!r}, step=12, ema=False, fingerprint ")):
        loop.train_and_evaluate(config, str(tmp_path / "student"))
    assert Checkpointer(str(tmp_path / "student")).all_steps() == [4]


def test_a_finished_students_rerun_needs_no_teacher(tmp_path, teacher, retrained_teacher):
    """Rerunning a completed run changes nothing (docs/training.md), but a distilled one read
    and checked its teacher first: one retrained since, or deleted, failed the no-op rerun (a
    requeued job that had finished). Its checkpoints deleted, the run would have to train on,
    and without a teacher that is refused, not done without distillation."""
    copy = str(tmp_path / "teacher")
    shutil.copytree(teacher, copy)
    config = _student(copy)
    student = str(tmp_path / "student")
    first = loop.train_and_evaluate(config, student)
    _retrain_in_place(copy, retrained_teacher)  # retrained: other variables
    assert loop.train_and_evaluate(config, student) == first
    shutil.rmtree(copy)  # gone
    assert loop.train_and_evaluate(config, student) == first
    shutil.rmtree(os.path.join(student, "checkpoints"))
    refusal = f"distill: teacher_workdir={copy!r} is invalid"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        loop.train_and_evaluate(config, student)


def test_a_workdir_from_before_distill_still_resumes(tmp_path, monkeypatch):
    """config.json written before `distill` existed lacks the block: it meant no teacher."""
    run = tmp_path / "run"
    helpers.run_until_crash(helpers.tiny_config(), run, monkeypatch)
    saved = json.loads((run / "config.json").read_text())
    del saved["distill"]
    (run / "config.json").write_text(json.dumps(saved))
    assert config_lib.incompatible_fields(config_lib.flatten(saved),
                                          config_lib.flatten(helpers.tiny_config())) == []
    summary = loop.train_and_evaluate(helpers.tiny_config(), str(run))
    assert summary["resumed_from_step"] == 8 and "distill" not in summary
    assert config_lib.with_legacy_defaults(saved)["distill"] == distill.DISTILL_DEFAULTS
    # Distilling is still a different trajectory: refused on that workdir (here with a copy of
    # the run as the teacher; the run itself cannot teach itself).
    shutil.copytree(run, tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"incompatible config \(distill.teacher_workdir: None"):
        loop.train_and_evaluate(_student(str(tmp_path / "teacher")), str(run))


# -------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(("overrides", "message"), [
    ({"distill.alpha": 1.5}, "distill: alpha=1.5 is invalid; expected the soft-target weight "
                             "0 <= alpha <= 1 (0: plain training)."),
    ({"distill.alpha": -0.1}, "distill: alpha=-0.1 is invalid; expected the soft-target weight"),
    ({"distill.temperature": 0.0}, "distill: temperature=0.0 is invalid; expected a finite "
                                   "temperature T > 0 (e.g. 4; 1: plain softmax)."),
    ({"distill.temperature": -2.0}, "distill: temperature=-2.0 is invalid"),
    ({"distill.temperature": float("nan")}, "distill: temperature=nan is invalid"),
    ({"distill.teacher_step": -1}, "distill: teacher_step=-1 is invalid; expected a checkpoint "
                                   "step >= 1, or None (the teacher's best)."),
    # Step 0 (init_from's converted weights) is no trained run's: was refused only when loading,
    # in load_trained's words.
    ({"distill.teacher_step": 0}, "distill: teacher_step=0 is invalid; expected a checkpoint "
                                  "step >= 1, or None (the teacher's best)."),
    ({"distill.teacher_workdir": None, "distill.teacher_step": 3},
     "distill: teacher_step=3 is invalid; it needs distill.teacher_workdir."),
    ({"distill.teacher_workdir": None, "distill.ema": True},
     "distill: ema=True is invalid; it needs distill.teacher_workdir (the teacher whose weight "
     "average to use)."),
    # A soft-target setting without a teacher was silently ignored (a plain run trained).
    ({"distill.teacher_workdir": None, "distill.temperature": 8.0},
     "distill: temperature=8.0 is invalid; it needs distill.teacher_workdir (without a teacher "
     "the run trains without distillation and nothing reads it)."),
    ({"distill.teacher_workdir": None, "distill.alpha": 0.5},
     "distill: alpha=0.5 is invalid; it needs distill.teacher_workdir"),
    ({"distill.teacher_workdir": ""}, "distill: teacher_workdir='' is invalid; expected the "
                                      "--workdir of a trained classification run, or None (off)."),
    # The string (a config file's; --config.distill.teacher_workdir=None gives None) was taken as
    # a path
    ({"distill.teacher_workdir": "None"}, "distill: teacher_workdir='None' is invalid; the string "
                                          "'None' names no run; use None (not the string) to "
                                          "train without a teacher."),
    # (each with a model of that task: another task's model is refused first)
    ({"task": "segmentation", "model": "fcn8s_resnet18"},
     "distill: teacher_workdir='t' is invalid; distillation trains classifiers only "
     "(config.task='classification', not 'segmentation'); set distill.teacher_workdir=None."),
    ({"task": "detection", "model": "yolo_v1_small"},
     "distill: teacher_workdir='t' is invalid; distillation trains classifiers only "
     "(config.task='classification', not 'detection')"),
])
def test_bad_settings_are_refused_by_validate_config(overrides, message):
    config = _student("t", **overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.validate_config(config)
    config = _student("t")
    config.distill.beta = 1.0
    with pytest.raises(ValueError, match=re.escape("distill: field='beta' is invalid; expected "
                                                   "one of ['teacher_workdir', 'teacher_step'")):
        config_lib.validate_config(config)


def _refused(tmp_path, config, message):
    """`train_and_evaluate` refuses `config` with `message` before compiling or checkpointing."""
    with pytest.raises(ValueError, match=re.escape(message)):
        loop.train_and_evaluate(config, str(tmp_path / "student"))
    assert not (tmp_path / "student" / "checkpoints").exists()
    assert not (tmp_path / "student" / "config.json").exists()


def test_bad_teachers_are_refused_before_compiling(tmp_path, teacher):
    missing = str(tmp_path / "missing")
    _refused(tmp_path, _student(missing),
             f"distill: teacher_workdir={missing!r} is invalid; expected the --workdir of a "
             "finished or checkpointed training run (no readable config.json with a model in it)")
    empty = tmp_path / "empty"  # a run that died before its first checkpoint
    empty.mkdir()
    shutil.copy(Path(teacher) / "config.json", empty / "config.json")
    _refused(tmp_path, _student(str(empty)),
             f"distill: teacher_workdir={str(empty)!r} is invalid; the teacher run cannot be "
             "loaded (load_trained: ")
    _refused(tmp_path, _student(teacher, **{"distill.teacher_step": 5}),
             "distill: teacher_step=5 is invalid; the teacher run cannot be loaded "
             "(load_trained: step=5 is invalid")
    detector = tmp_path / "detector"
    detector.mkdir()
    (detector / "config.json").write_text(json.dumps({"model": "yolo_v1", "task": "detection"}))
    _refused(tmp_path, _student(str(detector)),
             f"distill: teacher_workdir={str(detector)!r} is invalid; it is a detection run; "
             "distillation needs a classification teacher.")


def test_a_teacher_without_an_average_or_of_other_classes_or_inputs_is_refused(tmp_path):
    plain_teacher = _train_teacher(tmp_path / "plain_teacher", num_train_steps=4)
    _refused(tmp_path, _student(plain_teacher, **{"distill.ema": True}),
             "distill: ema=True is invalid; the teacher run cannot be loaded (load_trained: "
             "ema=True is invalid; the run in")
    config = _student(plain_teacher)
    info = helpers.get_dataset_info(config.data)  # the student's, as check_config reads it
    with pytest.raises(ValueError, match=re.escape(
            f"distill: teacher_workdir={plain_teacher!r} is invalid; the teacher predicts 4 "
            "classes ('synthetic') and the student's data has 10; they must be the same "
            "classes.")):
        distill.load_teacher(config, info._replace(num_classes=10))
    with pytest.raises(ValueError, match=re.escape(
            "is invalid; the teacher was trained on (8, 8, 1) images (height, width, channels) "
            "and the student's data gives (8, 8, 3); set the student's data.image_size (and "
            "channels) to the teacher's.")):
        distill.load_teacher(config, info._replace(image_shape=(8, 8, 3)))
    subset = _student(plain_teacher, **{"data.classes": (0, 1, 2, 3)})
    with pytest.raises(ValueError, match=re.escape(
            "is invalid; the teacher was trained on 'synthetic' classes all and the student "
            "trains on 'synthetic' classes (0, 1, 2, 3); they must be the same dataset and "
            "classes")):
        distill.load_teacher(subset, info)
    with pytest.raises(ValueError, match=re.escape(
            f"distill: teacher_workdir={plain_teacher!r} is invalid; it is this run's own "
            "--workdir")):
        distill.load_teacher(config, info, student_workdir=plain_teacher)


def test_the_teacher_is_checked_against_the_students_info_without_reading_it_again(
        teacher, monkeypatch):
    """The loop already holds the student's DatasetInfo (check_config read it): load_teacher
    compares the teacher with it and reads only the teacher's dataset metadata."""
    config = _student(teacher)
    info = helpers.get_dataset_info(config.data)
    pipeline = sys.modules["cnnjax.data.pipeline"]
    read = pipeline.get_dataset_info

    def teacher_only(data_config):
        assert data_config is not config.data, "the student's dataset info was read again"
        return read(data_config)

    monkeypatch.setattr(pipeline, "get_dataset_info", teacher_only)
    teacher = distill.load_teacher(config, info)
    assert teacher.record["dataset"] == "synthetic"
    with pytest.raises(ValueError, match=re.escape(
            "is invalid; the teacher was trained on 'synthetic' classes all and the student "
            "trains on 'digits' classes all; they must be the same dataset and classes")):
        distill.load_teacher(config, info._replace(name="digits"))


# ------------------------------------------------------------------------------- 2 devices
_TWO_DEVICES = """
import json, sys
import jax, numpy as np, optax
sys.path.insert(0, sys.argv[1])
from cnnjax.train.distill import Distillation
from cnnjax.train.parallel import DataParallel
from cnnjax.train.checkpoint import Checkpointer
from cnnjax.train.optim import build_optimizer
from cnnjax.train.state import create_train_state
from cnnjax.train.step import make_steps
from tests.train import helpers

def train(mode, n):
    model = helpers.TinyNet(axis_name="data")
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, *helpers.IMAGE_SHAPE))
    teacher = helpers.TinyNet().init(jax.random.PRNGKey(1), np.zeros((1, 8, 8, 1), "f4"))
    step, _ = make_steps(model, tx, optax.constant_schedule(0.1), "data",
                         distill=Distillation(4.0, 0.9), teacher=helpers.TinyNet())
    parallel = DataParallel(mode, jax.devices()[:n])
    p_train = parallel.wrap_train(step, replicated_args=1)
    state, teacher = parallel.replicate(jax.device_get(state)), parallel.replicate(teacher)
    batches = helpers.train_batches(None, global_batch_size=16, num_devices=n, seed=0)
    for _ in range(3):
        state, metrics = p_train(state, parallel.shard_batch(next(batches)), teacher)
    host = parallel.unreplicate(state)
    return [host.params, host.batch_stats], float(parallel.metrics_to_host(metrics)["total_loss"])

def diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

(one, loss1), (pmap2, loss2), (shard2, loss3) = (train("pmap", 1), train("pmap", 2),
                                                 train("shard_map", 2))
print(json.dumps({"pmap2": diff(one, pmap2), "shard2": diff(pmap2, shard2),
                  "loss": max(abs(loss1 - loss2), abs(loss2 - loss3))}))
"""


def test_two_devices_match_one_under_pmap_and_shard_map():
    """3 distilled steps on the same global batches: 2 devices (pmap, shard_map) == 1 device up
    to float32 summation order (gradients pmean'd, BatchNorm synced, the teacher replicated)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=2").strip()
    result = subprocess.run([sys.executable, "-c", _TWO_DEVICES, ROOT], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = json.loads(result.stdout.strip().splitlines()[-1])
    assert diffs["shard2"] < 1e-6
    assert diffs["pmap2"] < 1e-5 and diffs["loss"] < 1e-5


@pytest.mark.parametrize("field", ["temperature", "alpha"])
def test_a_distillation_rule_refuses_a_string_it_would_use_as_is(field):
    """`Distillation(temperature="4")` passed its check and failed only while tracing the step
    (`1.0 / "4"`: a TypeError naming nothing); the config path still reads numeric strings."""
    with pytest.raises(ValueError, match=rf"^Distillation: {field}='0.5' is invalid; expected"):
        distill.Distillation(**{field: "0.5"})
    assert distill.check_distillation("distill", "0.5", "0.5") == (0.5, 0.5)


def test_a_teacher_reached_by_another_path_resumes(tmp_path):
    """A requeued student whose teacher is the same directory under another path (a symlink,
    storage mounted elsewhere) was refused as "another teacher" with identical fingerprints:
    the record compared the workdir strings, while the config check compares directories."""
    student = tmp_path / "student"
    student.mkdir()
    (tmp_path / "teacher").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "teacher")
    (tmp_path / "other").mkdir()

    def record(workdir):
        return {"workdir": str(workdir), "step": 40, "checkpoint": "best", "ema": False,
                "model": "lenet5", "dataset": "digits", "fingerprint": "d5e5171b6b70aa"}

    distill.check_teacher_record(str(student), record(tmp_path / "teacher"), False, True)
    distill.check_teacher_record(str(student), record(tmp_path / "link"), True, False)
    with pytest.raises(ValueError, match=re.escape(
            f"distill: teacher_workdir={str(tmp_path / 'other')!r} is invalid; this run started "
            f"with another teacher (workdir={str(tmp_path / 'teacher')!r}, step=40, ema=False, "
            f"fingerprint d5e5171b6b70; now workdir={str(tmp_path / 'other')!r}, step=40")):
        distill.check_teacher_record(str(student), record(tmp_path / "other"), True, False)
    changed = {**record(tmp_path / "link"), "fingerprint": "0123456789abcd"}
    with pytest.raises(ValueError, match=r"; now step=40, fingerprint 0123456789ab\) and would"):
        distill.check_teacher_record(str(student), changed, True, False)

"""The learning-rate range test (cnnjax.tune.lr_range): its ramp, smoothing, stop rule and
suggestions against float64 NumPy references, its refusals before anything compiles, reruns,
and the `experiments.lr_range_test` script as a user runs it."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cnnjax.tune import lr_range
from cnnjax.tune.diagnose import exponential_smoothing
from tests.commands import run_commands
from tests.experiments.test_train import _env
from tests.train import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "lenet5_digits.py")
# The tiny engine model on synthetic data: SGD (momentum 0.9) from 1e-4 up to 1e3, far past
# where it can train, so the test stops as diverged (with label smoothing: without it the
# easy synthetic task reaches a loss of 0, and its BatchNorm net then never blows up).
SETTINGS = {"lr_min": 1e-4, "lr_max": 1e3, "steps": 40}


def _config(**overrides):
    return helpers.tiny_config(label_smoothing=0.1, **overrides)
FLOAT32_RTOL = 1e-5  # the engine computes and reports the rate in float32


@pytest.fixture(scope="module")
def fake_engine():
    """The engine's synthetic pipeline and tiny model for this module's in-process runs."""
    with pytest.MonkeyPatch.context() as mp:
        helpers.install_fake_pipeline(mp)
        yield


@pytest.fixture(scope="module")
def ramp(fake_engine, tmp_path_factory):
    """One range test of the tiny model, shared by the checks of its record."""
    workdir = str(tmp_path_factory.mktemp("lr_range"))
    record = lr_range.run_lr_range(_config(), workdir, **SETTINGS)
    return workdir, record


def _curve(record, key):
    return np.array([r[key] for r in record["records"]], np.float64)


def _reference_ema(losses, beta):
    """Closed form of the bias-corrected EMA: sum_i (1-b) b^(t-i) x_i / (1 - b^(t+1))."""
    t = np.arange(len(losses))
    weights = (1 - beta) * beta ** (t[:, None] - t[None, :]) * (t[None, :] <= t[:, None])
    return (weights @ losses) / (1 - beta ** (t + 1))


def test_recorded_lrs_are_the_geometric_ramp(ramp):
    _, record = ramp
    lrs = _curve(record, "lr")
    expected = np.geomspace(1e-4, 1e3, 40, dtype=np.float64)[: len(lrs)]
    np.testing.assert_allclose(lrs, expected, rtol=FLOAT32_RTOL)
    assert [r["step"] for r in record["records"]] == list(range(len(lrs)))


def test_ramp_schedule_matches_the_formula_and_holds_lr_max_after_the_end():
    schedule = lr_range.ramp_schedule(1e-5, 10.0, 100)
    steps = np.arange(120)
    expected = 1e-5 * (10.0 / 1e-5) ** (np.minimum(steps, 99) / 99)
    np.testing.assert_allclose([float(schedule(t)) for t in steps], expected, rtol=FLOAT32_RTOL)


def test_smoothed_loss_is_the_bias_corrected_ema(ramp):
    _, record = ramp
    losses, smoothed = _curve(record, "loss"), _curve(record, "smoothed_loss")
    np.testing.assert_allclose(smoothed, _reference_ema(losses, 0.98), rtol=1e-12)
    # the diagnosis' smoothing
    np.testing.assert_allclose(smoothed, exponential_smoothing(losses, 0.98), rtol=1e-12)
    assert smoothed[0] == losses[0]  # bias-corrected: the first point is the first loss


def test_suggestions_are_the_steepest_descent_up_to_the_minimum(ramp):
    _, record = ramp
    lrs, smoothed = _curve(record, "lr"), _curve(record, "smoothed_loss")
    best, skip = int(np.argmin(smoothed)), 4  # the first 10% of the 40 steps are skipped
    slopes = np.diff(smoothed[skip: best + 1]) / np.diff(np.log(lrs[skip: best + 1]))
    tips = record["suggestions"]
    assert tips["skip_start"] == skip and best > skip + 5
    assert tips["suggested"] == tips["steepest"] == lrs[skip + int(np.argmin(slopes))]
    assert tips["steepest_slope"] == pytest.approx(slopes.min(), rel=1e-12)
    assert tips["min_loss"] == lrs[best] and tips["min_loss_step"] == best
    assert tips["min_loss_over_10"] == pytest.approx(lrs[best] / 10, rel=1e-15)


def test_loss_falls_then_the_test_stops_as_diverged_well_before_lr_max(ramp):
    _, record = ramp
    losses, smoothed = _curve(record, "loss"), _curve(record, "smoothed_loss")
    stop = record["stop"]
    assert record["status"] == stop["reason"] == "diverged"
    assert stop["step"] < 39 and stop["message"].startswith(f"diverged at step {stop['step']} ")
    assert smoothed.min() < 0.7 * losses[0]  # it learned at the small rates
    assert record["suggestions"]["suggested"] < record["suggestions"]["min_loss"] < 1e3
    # The stop rule, checked independently: no step before the stop broke it.
    running_min = np.minimum.accumulate(smoothed)
    broke = (smoothed > 4 * running_min) | ~np.isfinite(losses)
    if len(losses) == stop["step"] + 1:  # the last recorded step broke the rule
        assert broke[-1] and not broke[:-1].any()
    else:  # the stop step's loss was not finite: not recorded
        assert len(losses) == stop["step"] and not broke.any()
        assert "the loss is" in stop["message"]


def test_record_and_plot_are_written(ramp):
    workdir, record = ramp
    with open(os.path.join(workdir, lr_range.RECORD_FILE)) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(record))
    assert saved["config"]["label_smoothing"] == 0.1
    assert saved["settings"] == {**SETTINGS, "lr_max": 1000.0, "divergence_factor": 4.0,
                                 "smoothing": 0.98}
    assert saved["overrides"] == {"num_train_steps": 40, "optimizer.learning_rate": 1000.0,
                                  "schedule.name": "constant", "schedule.warmup_steps": 0,
                                  "schedule.boundaries": [], "schedule.init_value": 0.0,
                                  "schedule.end_value": 0.0, "schedule.alpha": 0.0}
    assert saved["config"]["optimizer.momentum"] == 0.9  # the config's own optimizer
    assert os.path.getsize(os.path.join(workdir, lr_range.PLOT_FILE)) > 10_000


@pytest.mark.parametrize("schedule", [{"name": "piecewise", "boundaries": (20, 30)},
                                      {"name": "cosine", "alpha": 0.1},
                                      {"name": "warmup_cosine", "warmup_steps": 5,
                                       "init_value": 0.01, "end_value": 0.001}])
def test_the_ramp_replaces_any_schedule(fake_engine, tmp_path, schedule):
    """Fields only the config's own schedule reads (piecewise boundaries, a cosine floor, a
    warmup's start) are cleared with it: the engine refuses them under the ramp's "constant"."""
    config = _config()
    for name, value in schedule.items():
        config.schedule[name] = value
    record = lr_range.run_lr_range(config, str(tmp_path / "run"), **SETTINGS)
    assert record["status"] in lr_range.FINISHED
    assert record["config"]["schedule.name"] == "constant"
    assert record["config"]["schedule.boundaries"] == []


def test_a_sigterm_is_recorded_as_interrupted_and_a_rerun_redoes_the_test(fake_engine,
                                                                         tmp_path, monkeypatch,
                                                                         caplog):
    """scancel and SLURM's time limit send SIGTERM: the test used to die at once (exit 143)
    leaving no lr_range.json, so neither the user nor a tune knew why it stopped; then it
    exited 143 printing nothing (experiments.train logs why it stopped)."""
    import signal

    from cnnjax.train.preemption import EXIT_CODE, TrainingInterrupted

    real = lr_range.stop_reason

    def term_at_step_3(step, *args):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *args)

    monkeypatch.setattr(lr_range, "stop_reason", term_at_step_3)
    workdir = str(tmp_path / "run")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info, caplog.at_level("WARNING"):
        lr_range.run_lr_range(_config(), workdir, **SETTINGS)
    assert info.value.code == EXIT_CODE and info.value.step == 3
    assert ("LR range test: Stopped by SIGTERM at step 3 (nothing to resume); rerun the same "
            "command to redo it." in caplog.text)
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    with open(os.path.join(workdir, lr_range.RECORD_FILE)) as f:
        record = json.load(f)
    assert record["status"] == "interrupted" and record["stop"]["step"] == 3
    assert "Stopped by SIGTERM at step 3 (nothing to resume)" in record["stop"]["message"]
    monkeypatch.setattr(lr_range, "stop_reason", real)
    assert lr_range.run_lr_range(_config(), workdir, **SETTINGS)["status"] in lr_range.FINISHED


def test_a_sigterm_while_the_finished_record_is_written_stays_pending(fake_engine, tmp_path,
                                                                      monkeypatch):
    """A SIGTERM in the moment between the ramp's last step and lr_range.json used to reach
    the process's own handler (by default: killed, the finished test unrecorded, a rerun
    redoing it). It is now held like one after a training run's last poll: the record is
    written and the signal stays pending, so a tune's next round stops before it trains."""
    import signal

    from cnnjax.train import preemption

    def reached_the_outer_handler(signum, frame):
        raise AssertionError("the SIGTERM reached the handler outside run_lr_range")

    real_plot = lr_range.plot

    def term_then_plot(record, path):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_plot(record, path)

    monkeypatch.setattr(lr_range, "plot", term_then_plot)
    workdir = str(tmp_path / "run")
    previous = signal.signal(signal.SIGTERM, reached_the_outer_handler)
    try:
        record = lr_range.run_lr_range(_config(), workdir, **SETTINGS)
        assert signal.getsignal(signal.SIGTERM) is reached_the_outer_handler  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
        pending = preemption.take_pending()
    assert pending == "SIGTERM"
    assert record["status"] in lr_range.FINISHED
    with open(os.path.join(workdir, lr_range.RECORD_FILE)) as f:
        assert json.load(f)["status"] == record["status"]
    assert os.path.exists(os.path.join(workdir, lr_range.PLOT_FILE))


def test_rerun_with_the_same_settings_returns_the_record_untouched(ramp, monkeypatch):
    workdir, record = ramp
    path = os.path.join(workdir, lr_range.RECORD_FILE)
    before = os.stat(path).st_mtime_ns
    monkeypatch.setattr(lr_range, "_train", lambda *a: pytest.fail("trained again"))
    again = lr_range.run_lr_range(_config(progress_bar=True), workdir, **SETTINGS)
    assert again == json.loads(json.dumps(record))
    assert os.stat(path).st_mtime_ns == before


def test_a_rerun_in_a_copied_workdir_names_the_files_where_they_are_now(ramp, tmp_path,
                                                                        monkeypatch):
    """The record keeps the first invocation's absolute paths; the rerun's summary names the
    copy's (it printed the original's)."""
    workdir, record = ramp
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    monkeypatch.setattr(lr_range, "_train", lambda *a: pytest.fail("trained again"))
    again = lr_range.run_lr_range(_config(), copy, **SETTINGS)
    assert again["outputs"] == {"record": os.path.join(copy, lr_range.RECORD_FILE),
                                "plot": os.path.join(copy, lr_range.PLOT_FILE)}
    assert f"Plot:   {os.path.join(copy, lr_range.PLOT_FILE)}" in lr_range.format_summary(again)
    with open(os.path.join(copy, lr_range.RECORD_FILE)) as f:
        assert json.load(f)["outputs"] == record["outputs"]  # the file is left as it was


@pytest.mark.parametrize("change, detail", [
    ({"steps": 30}, "steps: 40 -> 30"),
    ({"smoothing": 0.9}, "smoothing: 0.98 -> 0.9"),
    ({"config": {"optimizer.momentum": 0.5}}, "config.optimizer.momentum: 0.9 -> 0.5"),
])
def test_other_settings_in_a_finished_workdir_are_refused(ramp, change, detail):
    workdir, _ = ramp
    config = _config(**change.pop("config", {}))
    with pytest.raises(ValueError) as err:
        lr_range.run_lr_range(config, workdir, **{**SETTINGS, **change})
    assert str(err.value) == (
        f"workdir: {workdir!r} holds a finished LR range test with other settings ({detail}); "
        "to start fresh use a new --workdir or delete "
        f"{os.path.join(workdir, lr_range.RECORD_FILE)!r}.")


@pytest.mark.parametrize("settings, message", [
    ({"lr_min": 0.0}, "lr_range: lr_min=0.0 is invalid; expected a positive finite number."),
    ({"lr_min": -1e-3}, "lr_range: lr_min=-0.001 is invalid; expected a positive finite number."),
    ({"lr_min": math.nan}, "lr_range: lr_min=nan is invalid; expected a positive finite number."),
    ({"lr_max": math.inf}, "lr_range: lr_max=inf is invalid; expected a positive finite number."),
    ({"lr_max": 1e-4}, "lr_range: lr_max=0.0001 is invalid; expected lr_max > lr_min "
                       "(lr_min=0.0001): the rate ramps up from lr_min to lr_max."),
    ({"lr_max": 1e-5}, "lr_range: lr_max=1e-05 is invalid; expected lr_max > lr_min "
                       "(lr_min=0.0001): the rate ramps up from lr_min to lr_max."),
    *[({"steps": s}, f"lr_range: steps={s!r} is invalid; expected an integer >= 2 (the ramp's "
                     "lr at step t is lr_min * (lr_max / lr_min) ** (t / (steps - 1)); ~100 is "
                     "usual).") for s in (1, 0, 2.5, True)],
    *[({"divergence_factor": f}, f"lr_range: divergence_factor={f!r} is invalid; expected a "
                                 "finite number > 1 (the test stops once the smoothed loss "
                                 "exceeds this multiple of its minimum; 4 is usual).")
      for f in (1.0, 0.5, math.inf)],
    *[({"smoothing": s}, f"lr_range: smoothing={s!r} is invalid; expected 0 <= smoothing < 1 "
                         "(the weight of the previous average in the loss's exponential moving "
                         "average; 0: no smoothing, 0.98 is usual).") for s in (1.0, -0.1)],
    ({"config": {"global_batch_size": 0}},
     "config: global_batch_size=0 is invalid; expected a positive integer."),
    ({"config": {"optimizer.momentum": 1.0}},
     "optimizer: momentum=1.0 is invalid; expected 0 <= momentum < 1."),
    ({"config": {"global_batch_size": 15, "grad_accum_steps": 2}},
     "config: grad_accum_steps=2 is invalid; expected a divisor of the per-device batch 15 "
     "(global_batch_size 15 / 1 devices), so that micro-batches are equal."),
])
def test_bad_input_is_refused_before_anything_compiles_or_is_written(
        fake_engine, tmp_path, monkeypatch, settings, message):
    settings = dict(settings)
    config = _config(**settings.pop("config", {}))
    monkeypatch.setattr(lr_range, "wrap_steps", lambda *a: pytest.fail("compiled"))
    monkeypatch.setattr(lr_range, "fresh_state", lambda *a: pytest.fail("initialized"))
    workdir = tmp_path / "lr_range"
    with pytest.raises(ValueError) as err:
        lr_range.run_lr_range(config, str(workdir), **{**SETTINGS, **settings})
    assert str(err.value) == message
    assert not workdir.exists()


def test_another_commands_directory_is_refused(fake_engine, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds a training run \(config.json\), not a "
                                         r"learning-rate range test: use a new directory"):
        lr_range.run_lr_range(_config(), str(tmp_path), **SETTINGS)
    assert not (tmp_path / lr_range.RECORD_FILE).exists()


def test_a_failed_test_is_recorded_and_redone_by_the_rerun(fake_engine, tmp_path, monkeypatch):
    import cnnjax.data

    pipeline = cnnjax.data.pipeline
    monkeypatch.setattr(pipeline, "train_batches",
                        helpers.crashing_batches(pipeline.train_batches, at_step=3))
    with pytest.raises(helpers.SimulatedCrashError):
        lr_range.run_lr_range(_config(), str(tmp_path), **SETTINGS)
    with open(tmp_path / lr_range.RECORD_FILE) as f:
        failed = json.load(f)
    assert failed["status"] == "failed"
    assert failed["stop"]["message"] == "SimulatedCrashError: simulated kill"
    monkeypatch.undo()  # the pipeline works again
    record = lr_range.run_lr_range(_config(), str(tmp_path), **SETTINGS)
    assert record["status"] == "diverged"


@pytest.mark.parametrize("shape", ["tanh", "flat"])
def test_suggest_on_curves_with_a_known_answer(shape):
    lrs = np.geomspace(1e-6, 1.0, 121)  # 20 points per decade
    if shape == "tanh":  # steepest exactly halfway between grid points 59 and 60 (1e-3)
        smoothed = 2.0 - np.tanh(np.log(lrs / 10 ** -3.025))
        tips = lr_range.suggest(lrs, smoothed)
        assert tips["suggested"] == tips["steepest"] == lrs[59]  # the interval's start
        assert tips["suggested"] == pytest.approx(10 ** -3.05, rel=1e-12)
        assert tips["min_loss"] == pytest.approx(1.0, rel=1e-12)  # monotone: the last point
        assert tips["min_loss_over_10"] == pytest.approx(0.1, rel=1e-12)
    else:  # rising from the start: no descent, no suggestion
        tips = lr_range.suggest(lrs, 1.0 + lrs)
        assert tips["suggested"] is None and tips["steepest"] is None
        assert tips["min_loss"] == 1e-6 and tips["min_loss_step"] == 0
        assert tips["min_loss_over_10"] is None  # 1e-7: below every rate tested
    assert lr_range.suggest(np.array([]), np.array([]))["min_loss"] is None


def test_suggest_skips_the_first_steps():
    lrs = np.geomspace(1e-4, 1.0, 9)
    smoothed = np.array([5.0, 2.0, 1.9, 1.6, 1.5, 1.0, 0.95, 0.9, 0.99])  # noisy first drop
    assert lr_range.suggest(lrs, smoothed)["steepest"] == lrs[0]
    assert lr_range.suggest(lrs, smoothed, skip_start=1)["steepest"] == lrs[4]
    too_late = lr_range.suggest(lrs, smoothed, skip_start=7)  # the minimum is step 7
    assert too_late["suggested"] is None and too_late["min_loss"] == lrs[7]
    assert [lr_range.skipped_steps(n) for n in (2, 9, 10, 100, 1000)] == [0, 0, 1, 10, 100]


def test_script_bad_flag_is_a_one_line_error_before_anything_is_written(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.lr_range_test", f"--config={CONFIG}",
         f"--workdir={tmp_path / 'lrr'}", "--lr_min=1e-2", "--lr_max=1e-3"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: lr_range: lr_max=0.001 is invalid; expected lr_max > lr_min (lr_min=0.01): the "
        "rate ramps up from lr_min to lr_max.")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "lrr").exists()


_CTRL_C_DURING_THE_TEST = """
import sys
from absl import app
from cnnjax.tune import lr_range
from cnnjax.utils.cli import parse_flags

def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt

lr_range.run_lr_range = ctrl_c
from experiments import lr_range_test
app.run(lr_range_test.main, flags_parser=parse_flags)
"""


def test_script_ctrl_c_is_one_line_saying_the_rerun_redoes_the_test(tmp_path):
    """Ctrl-C ended `experiments.lr_range_test` with a ~40-line KeyboardInterrupt traceback
    (from inside the jitted step); train, sweep and tune print one `interrupted:` line."""
    workdir = tmp_path / "lrr"
    result = subprocess.run(
        [sys.executable, "-c", _CTRL_C_DURING_THE_TEST, f"--config={CONFIG}",
         f"--workdir={workdir}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"interrupted: Ctrl-C; the LR range test in {str(workdir)!r} has no checkpoint to "
        f"resume (its {lr_range.RECORD_FILE} records it as interrupted): rerunning the same "
        "command redoes it.")


@pytest.mark.slow
def test_script_end_to_end_on_digits_then_rerun_reprints_and_other_settings_refused(tmp_path):
    """LeNet-5 on the real `digits` pipeline, 30 steps from 1e-4 to 1e2 (it diverges)."""
    from cnnjax.data import sources, spec  # not `pipeline`: `fake_engine` may stand in for it

    # digits generated first (into the test session's tfds data dir, which the commands share):
    # on its first use tfds prints a build banner, which only the first run's stdout would hold.
    sources.open_source(spec.resolve(spec.default_data_config("digits")))
    workdir = tmp_path / "lrr"
    command = [sys.executable, "-m", "experiments.lr_range_test", f"--config={CONFIG}",
               f"--workdir={workdir}", "--lr_min=1e-4", "--lr_max=100", "--steps=30",
               "--config.global_batch_size=32"]
    first = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(workdir / lr_range.RECORD_FILE) as f:
        record = json.load(f)
    assert record["model"] == "lenet5" and record["dataset"] == "digits"
    assert record["config"]["global_batch_size"] == 32
    assert record["status"] == "diverged" and record["stop"]["step"] < 29
    lrs = _curve(record, "lr")
    np.testing.assert_allclose(lrs, np.geomspace(1e-4, 100, 30)[: len(lrs)], rtol=FLOAT32_RTOL)
    tips = record["suggestions"]
    assert f"Suggested learning rate: {tips['suggested']:.3g}" in first.stdout
    assert f"Plot:   {workdir / lr_range.PLOT_FILE}" in first.stdout
    assert os.path.getsize(workdir / lr_range.PLOT_FILE) > 10_000

    again = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and again.stdout == first.stdout
    with open(workdir / lr_range.RECORD_FILE) as f:
        assert json.load(f) == record

    other = subprocess.run([*command, "--steps=20"], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines()[-1].startswith(
        f"error: workdir: {str(workdir)!r} holds a finished LR range test with other settings "
        "(steps: 30 -> 20); to start fresh use a new --workdir or delete")


def test_a_detection_config_ramps_its_detectors_own_loss(tmp_path, monkeypatch):
    """YOLO v1 (small) on the detection loop's in-memory boxes: the same ramp and record."""
    import types

    import cnnjax.data
    from tests.train import test_detection_loop as detection

    module = types.ModuleType("cnnjax.data.detection")
    module.get_dataset_info = detection._info
    module.train_batches = detection._train_batches
    module.eval_batches = detection._eval_batches
    module.eval_split_name = lambda data_config: "eval"
    monkeypatch.setitem(sys.modules, "cnnjax.data.detection", module)
    monkeypatch.setattr(cnnjax.data, "detection", module, raising=False)
    helpers.accept_stand_in_data_names(monkeypatch)
    record = lr_range.run_lr_range(detection._config(), str(tmp_path), lr_min=1e-5, lr_max=1e-2,
                                   steps=6, smoothing=0.5)
    assert record["status"] == "completed" and record["model"] == "yolo_v1_small"
    assert record["stop"] == {"reason": "completed", "step": 5, "message": "completed all 6 "
                              "steps without diverging (lr 1e-05 to 0.01)"}
    np.testing.assert_allclose(_curve(record, "lr"), np.geomspace(1e-5, 1e-2, 6),
                               rtol=FLOAT32_RTOL)
    losses = _curve(record, "loss")
    assert np.all(np.isfinite(losses)) and np.all(losses > 0)
    np.testing.assert_allclose(_curve(record, "smoothed_loss"), _reference_ema(losses, 0.5),
                               rtol=1e-12)


# ------------------------------------------------------------------ recipe.lr_range_test
def test_recipe_round1_grid_is_centred_at_the_suggestion_with_the_recipes_span():
    from cnnjax.tune import recipe as rc

    recipe = rc.Recipe(lr_min=1e-3, lr_max=1.0, num_lrs=5)
    plan = rc.first_round(recipe, centre=0.05)
    half = math.sqrt(1.0 / 1e-3)
    np.testing.assert_allclose(plan.values, np.geomspace(0.05 / half, 0.05 * half, 5),
                               rtol=5e-3)  # the recipe rounds rates to 3 significant digits
    assert plan.values[2] == 0.05 and "suggested lr 0.05 (lr_range/lr_range.json)" in plan.reason
    assert rc.first_round(recipe).values == recipe.lr_grid()  # no centre: the recipe's grid
    with pytest.raises(ValueError, match=r"^recipe: lr_range_test='yes' is invalid; expected "
                                         r"True or False\.$"):
        rc.Recipe(lr_range_test="yes")


def test_a_tune_with_lr_range_test_centres_round_1_and_its_rerun_reuses_the_test(
        tmp_path, monkeypatch):
    """The range test is real (the tiny model, 100 steps); the trials are the recipe tests'
    stand-in trainer."""
    from tests.tune.test_recipe import FakeTrainer, _base, _tune

    base = _base(label_smoothing=0.1)
    record = _tune(tmp_path, monkeypatch, FakeTrainer(), base=base, lr_range_test=True,
                   max_rounds=1)
    path = tmp_path / "tune" / "lr_range" / lr_range.RECORD_FILE
    with open(path) as f:
        test = json.load(f)
    assert test["settings"] == {"lr_min": 1e-5, "lr_max": 10.0, "steps": 100,
                                "divergence_factor": 4.0, "smoothing": 0.98}
    suggested = test["suggestions"]["suggested"]
    assert suggested is not None
    from cnnjax.tune import recipe as rc

    expected = rc.Recipe(lr_min=0.01, lr_max=1.0, num_lrs=3).lr_grid(suggested)
    assert tuple(record["rounds"][0]["values"]) == expected
    before = os.stat(path).st_mtime_ns
    again = _tune(tmp_path, monkeypatch, FakeTrainer(), base=base, lr_range_test=True,
                  max_rounds=1)
    assert again["rounds"][0]["values"] == record["rounds"][0]["values"]
    assert os.stat(path).st_mtime_ns == before


def test_plot_and_summary_of_a_test_whose_first_loss_was_not_finite(tmp_path):
    record = {"status": "diverged", "model": "m", "dataset": "d", "records": [],
              "settings": {"lr_min": 1e-5, "lr_max": 10.0, "steps": 100, "smoothing": 0.98,
                           "divergence_factor": 4.0},
              "stop": {"reason": "diverged", "step": 0,
                       "message": "diverged at step 0 (lr 1e-05): the loss is nan"},
              "suggestions": lr_range.suggest(np.array([]), np.array([]), 10),
              "outputs": {"record": "r.json", "plot": "p.png"}}
    assert os.path.getsize(lr_range.plot(record, str(tmp_path / "p.png"))) > 1000
    assert lr_range.format_summary(record).splitlines()[:2] == [
        "LR range test of m on d, lr 1e-05 to 10 over 100 steps: diverged at step 0 (lr 1e-05): "
        "the loss is nan.",
        "No suggestion: the smoothed loss did not fall after the first 10 steps (lower "
        "--lr_min, or more --steps)."]


def test_a_curve_that_never_falls_gets_no_rule_of_thumb_rate_in_the_summary():
    """The loss rose from the start: the summary said "No suggestion" and then offered
    "min/10 rule: 1e-06", a tenth of lr_min, a rate the test never tried."""
    lrs = np.geomspace(1e-5, 10.0, 100)
    record = {"model": "m", "dataset": "d",
              "settings": {"lr_min": 1e-5, "lr_max": 10.0, "steps": 100},
              "stop": {"message": "diverged at step 99 (lr 10)"},
              "suggestions": lr_range.suggest(lrs, 1.0 + lrs, 10),
              "outputs": {"record": "r.json", "plot": "p.png"}}
    lines = lr_range.format_summary(record).splitlines()
    assert lines[1].startswith("No suggestion: ")
    assert lines[2] == "Minimum smoothed loss at lr=1e-05 (step 0, before any descent)."
    assert "min/10" not in lr_range.format_summary(record)


def test_stop_reasons():
    assert lr_range.stop_reason(3, 0.1, 1.0, 1.2, 1.0, 4.0) is None
    assert lr_range.stop_reason(3, 0.1, 1.0, 4.0, 1.0, 4.0) is None  # at 4x: not yet
    assert lr_range.stop_reason(3, 0.1, 9.0, 4.01, 1.0, 4.0) == (
        "diverged at step 3 (lr 0.1): the smoothed loss 4.01 exceeds 4 x its minimum 1")
    assert lr_range.stop_reason(5, 2.0, math.inf, math.nan, 1.0, 4.0) == (
        "diverged at step 5 (lr 2): the loss is inf")
    assert lr_range.stop_reason(5, 2.0, 1.0, 1.0, 1.0, 4.0, params_finite=False) == (
        "diverged at step 5 (lr 2): a parameter is not finite after the update")
    assert lr_range.stop_reason(5, 2.0, 1.0, 1.0, 1.0, 4.0, batch_stats_finite=False) == (
        "diverged at step 5 (lr 2): a BatchNorm statistic is not finite after the step")


def test_a_distilled_config_ramps_the_distilled_objective(fake_engine, ramp, tmp_path):
    """With `config.distill` the ramp runs the engine's distilled step (the teacher checked
    before anything is written) and follows the optimized `total_loss`, not the hard `loss`."""
    from cnnjax.train import loop

    teacher = str(tmp_path / "teacher")
    loop.train_and_evaluate(helpers.tiny_config(num_train_steps=4), teacher)
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"^distill: teacher_workdir="):
        lr_range.run_lr_range(_config(**{"distill.teacher_workdir": missing}),
                              str(tmp_path / "refused"), **SETTINGS)
    assert not (tmp_path / "refused").exists()
    record = lr_range.run_lr_range(_config(**{"distill.teacher_workdir": teacher}),
                                   str(tmp_path / "distilled"), **SETTINGS)
    plain_first, first = ramp[1]["records"][0], record["records"][0]
    assert first["lr"] == plain_first["lr"] and first["loss"] != plain_first["loss"]
    assert record["status"] in ("completed", "diverged") and len(record["records"]) > 5


# experiments.lr_range_test with `run_lr_range` (and `format_summary`) replaced: it prints what
# the command gives it (`python -m tests.tune.test_lr_range experiments.lr_range_test <flags>`,
# forked by run_commands)
_STAND_IN = ("import json, sys\n"
             "from cnnjax.tune import lr_range\n"
             "def run_lr_range(config, workdir, **kwargs):\n"
             "    print(json.dumps({'model': config.model, 'dataset': config.data.name,\n"
             "                      'workdir': workdir, **kwargs}), flush=True)\n"
             "    return {'status': 'completed'}\n"
             "lr_range.run_lr_range = run_lr_range\n"
             "lr_range.format_summary = lambda record: f'summary of {record}'\n"
             "sys.argv = sys.argv[1:]\n"
             "import runpy; runpy.run_module('experiments.lr_range_test', run_name='__main__')")
# the flags besides --workdir: what run_lr_range must receive (the documented defaults unless set)
_STAND_IN_CASES = {
    "defaults": ([], {"lr_min": 1e-5, "lr_max": 10.0, "steps": 100, "divergence_factor": 4.0,
                      "smoothing": 0.98}),
    "every_flag": (["--lr_min=0.001", "--lr_max=2", "--steps=7", "--divergence_factor=3",
                    "--smoothing=0.5"],
                   {"lr_min": 0.001, "lr_max": 2.0, "steps": 7, "divergence_factor": 3.0,
                    "smoothing": 0.5}),
}


@pytest.fixture(scope="module")
def stand_in_runs(tmp_path_factory):
    """{case: (workdir, CompletedProcess)} of experiments.lr_range_test under the stand-in
    `run_lr_range`, with no --config (the default one), one interpreter forking a child per
    case (~3 s)."""
    root = tmp_path_factory.mktemp("stand_in")
    commands = [["tests.tune.test_lr_range", "experiments.lr_range_test",
                 f"--workdir={root / case}", *flags]
                for case, (flags, _) in _STAND_IN_CASES.items()]
    results = run_commands(commands, env=_env(),
                           preimport=["cnnjax.tune.lr_range", "cnnjax.data.presets"])
    return {case: (root / case, result)
            for case, result in zip(_STAND_IN_CASES, results, strict=True)}


@pytest.mark.parametrize("case", _STAND_IN_CASES)
def test_script_forwards_its_flags_and_prints_the_summary(stand_in_runs, case):
    """Each flag (or its default: 1e-5 to 10 over 100 steps, stop at 4x, smoothing 0.98; config
    LeNet-5 on digits) reaches run_lr_range, and the record's summary is printed."""
    workdir, result = stand_in_runs[case]
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(result.stdout.splitlines()[0]), *result.stdout.splitlines()[1:]] == [
        {"model": "lenet5", "dataset": "digits", "workdir": str(workdir),
         **_STAND_IN_CASES[case][1]},
        "summary of {'status': 'completed'}"]


if __name__ == "__main__":  # a stand-in driver, for `stand_in_runs`
    exec(_STAND_IN)  # noqa: S102

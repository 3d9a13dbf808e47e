"""The learning-rate range test ("LR finder"): train briefly while the rate grows exponentially,
and read a good learning rate off the smoothed loss curve: fast.ai's form of Smith's test
(Smith, "Cyclical Learning Rates for Training Neural Networks", 2017, section 3.3, ramps the
rate linearly and reads the bounds off the accuracy).

`run_lr_range(config, workdir, lr_min, lr_max, steps)` runs the engine's own training step (the
config's model, input pipeline, optimizer with its momentum, weight decay and clipping, batch
size, augmentation, mixing, weight average, distillation teacher;
`cnnjax.train.loop.wrap_steps` under the engine's DataParallel) for `steps` steps while the
learning rate goes from `lr_min` to `lr_max` on a geometric ramp:
`lr_t = lr_min * (lr_max / lr_min) ** (t / (steps - 1))`, replacing the config's schedule and
warmup. Each step's loss (a distilled config's optimized `total_loss`) is smoothed by a
bias-corrected exponential moving average; the test stops early once the smoothed loss exceeds
`divergence_factor` times its minimum, a loss is not finite or an update makes a parameter or a
BatchNorm statistic NaN/inf. Nothing is evaluated or checkpointed: the run exists only for its
curve.

Outputs in `workdir`: `lr_range.json` (settings, the config overrides, the full config, every
step's lr / loss / smoothed loss, why it stopped, the suggestions) and `lr_range.png` (loss and
smoothed loss against the learning rate on a log axis, suggestions marked). A finished
`lr_range.json` of the same settings and config is returned as it is; another test in the same
workdir is refused.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import numpy as np
import optax
from absl import logging

from cnnjax.train import config as config_lib
from cnnjax.train import distill as distill_lib
from cnnjax.train import init_from as init_from_lib
from cnnjax.train.loop import fresh_state, wrap_steps
from cnnjax.train.parallel import DataParallel
from cnnjax.train.preemption import StopRequest, TrainingInterrupted
from cnnjax.train.state import warm_start
from cnnjax.train.step import BATCH_STATS_FINITE, PARAMS_FINITE
from cnnjax.tune.diagnose import LR_FIELD, STEPS_FIELD, WARMUP_FIELD
from cnnjax.tune.space import apply_overrides
from cnnjax.utils.files import read_json, save_figure, write_json
from cnnjax.utils.lock import directory_lock
from cnnjax.utils.validation import check_number, check_positive_float, invalid

RECORD_FILE = "lr_range.json"
PLOT_FILE = "lr_range.png"
MIN_STEPS = 2  # the ramp's exponent divides by steps - 1; a slope needs two points
DEFAULT_LR_MIN, DEFAULT_LR_MAX, DEFAULT_STEPS = 1e-5, 10.0, 100  # 6 decades, ~16 steps each
DEFAULT_SMOOTHING = 0.98  # fast.ai's beta: the loss averaged over roughly the last 50 steps
DEFAULT_DIVERGENCE_FACTOR = 4.0  # fast.ai: stop once the smoothed loss is 4x its best
FINISHED = ("completed", "diverged")  # statuses a rerun returns instead of redoing
_OWNER = "lr_range"


def check_settings(lr_min: Any, lr_max: Any, steps: Any,
                   divergence_factor: Any = DEFAULT_DIVERGENCE_FACTOR,
                   smoothing: Any = DEFAULT_SMOOTHING) -> dict[str, Any]:
    """The test's own settings, checked (pure Python, before anything is built): a ValueError
    naming the flag, its value and what is valid; else them as a JSON-ready dict."""
    lr_min = check_positive_float(_OWNER, "lr_min", lr_min)
    lr_max = check_positive_float(_OWNER, "lr_max", lr_max)
    if not lr_max > lr_min:
        raise invalid(_OWNER, "lr_max", lr_max,
                      f"expected lr_max > lr_min (lr_min={lr_min!r}): the rate ramps up from "
                      "lr_min to lr_max")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < MIN_STEPS:
        raise invalid(_OWNER, "steps", steps,
                      f"expected an integer >= {MIN_STEPS} (the ramp's lr at step t is "
                      "lr_min * (lr_max / lr_min) ** (t / (steps - 1)); ~100 is usual)")
    divergence_factor = check_number(
        _OWNER, "divergence_factor", divergence_factor,
        "expected a finite number > 1 (the test stops once the smoothed loss exceeds this "
        "multiple of its minimum; 4 is usual)", low=1.0, high=math.inf, low_open=True,
        high_open=True)
    smoothing = check_number(
        _OWNER, "smoothing", smoothing,
        "expected 0 <= smoothing < 1 (the weight of the previous average in the loss's "
        "exponential moving average; 0: no smoothing, 0.98 is usual)", low=0.0, high=1.0,
        high_open=True)
    return {"lr_min": lr_min, "lr_max": lr_max, "steps": int(steps),
            "divergence_factor": divergence_factor, "smoothing": smoothing}


def ramp_schedule(lr_min: float, lr_max: float, steps: int) -> optax.Schedule:
    """The optax schedule `t -> lr_min * (lr_max / lr_min) ** (t / (steps - 1))`: exponential
    growth from `lr_min` at step 0 to `lr_max` at step `steps - 1` (held there after)."""
    return optax.exponential_decay(lr_min, transition_steps=steps - 1,
                                   decay_rate=lr_max / lr_min, end_value=lr_max)


#: Schedule fields only other schedules read: the ramp clears them (where the config has them),
#: since the engine refuses a value the "constant" schedule recorded for the ramp would ignore.
_RAMP_CLEARS = {"boundaries": (), "init_value": 0.0, "end_value": 0.0, "alpha": 0.0}


def ramp_overrides(settings: dict[str, Any], config: Any = None) -> dict[str, Any]:
    """The config fields the test changes: its length, and the schedule (the ramp replaces it;
    `optimizer.learning_rate` records the ramp's top). Everything else is the config's."""
    schedule = None if config is None else config.get("schedule")
    clears = {f"schedule.{name}": value for name, value in _RAMP_CLEARS.items()
              if schedule is None or name in schedule}
    return {STEPS_FIELD: settings["steps"], LR_FIELD: settings["lr_max"],
            "schedule.name": "constant", WARMUP_FIELD: 0, **clears}


def skipped_steps(steps: int) -> int:
    """How many first steps the steepest-descent search ignores: the first 10% of the ramp,
    where the bias-corrected average is still the mean of a few noisy losses and one lucky batch
    reads as a steep descent (fast.ai skips the first 10 of its 100 steps)."""
    return steps // 10


def suggest(lrs: np.ndarray, smoothed: np.ndarray, skip_start: int = 0) -> dict[str, Any]:
    """The learning rates read off the curve; `suggested` is `steepest`.

    `steepest`: the lr at the start of the steepest descent of the smoothed loss (the most
    negative forward difference d loss / d ln lr between steps `skip_start` and the minimum),
    where the network learns fastest: fast.ai's choice, as the minimum itself
    already sits at the edge of divergence. `min_loss`: the lr of the minimum smoothed loss;
    `min_loss_over_10`: a tenth of it, the common rule of thumb. `suggested` is None where the
    curve has no descent after `skip_start` (its minimum comes before step `skip_start + 1`), and
    so is `min_loss_over_10`: a tenth of a minimum at the start is a rate below the range tested.
    """
    lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    out: dict[str, Any] = {"suggested": None, "steepest": None, "steepest_slope": None,
                           "steepest_step": None, "min_loss": None, "min_loss_step": None,
                           "min_loss_over_10": None, "skip_start": skip_start}
    if len(smoothed) == 0:
        return out
    best = int(np.argmin(smoothed))
    out.update(min_loss=float(lrs[best]), min_loss_step=best)
    if best <= skip_start:
        return out
    out["min_loss_over_10"] = float(lrs[best]) / 10.0
    span = slice(skip_start, best + 1)
    slopes = np.diff(smoothed[span]) / np.diff(np.log(lrs[span]))
    steep = skip_start + int(np.argmin(slopes))
    out.update(suggested=float(lrs[steep]), steepest=float(lrs[steep]),
               steepest_slope=float(slopes.min()), steepest_step=steep)
    return out


def stop_reason(step: int, lr: float, loss: float, smoothed: float, minimum: float,
                factor: float, params_finite: bool = True,
                batch_stats_finite: bool = True) -> str | None:
    """Why the test stops after `step`, or None to go on: a loss that is not finite, an update
    that made a parameter or a BatchNorm statistic NaN/inf (as the engine stops), or a smoothed
    loss above `factor` times its minimum so far."""
    if not math.isfinite(loss):
        return f"diverged at step {step} (lr {lr:.4g}): the loss is {loss}"
    if not params_finite:
        return f"diverged at step {step} (lr {lr:.4g}): a parameter is not finite after the update"
    if not batch_stats_finite:
        return (f"diverged at step {step} (lr {lr:.4g}): a BatchNorm statistic is not finite "
                "after the step")
    if smoothed > factor * minimum:
        return (f"diverged at step {step} (lr {lr:.4g}): the smoothed loss {smoothed:.4g} "
                f"exceeds {factor:g} x its minimum {minimum:.4g}")
    return None


def run_lr_range(config: Any, workdir: str, lr_min: float, lr_max: float, steps: int,
                 divergence_factor: float = DEFAULT_DIVERGENCE_FACTOR,
                 smoothing: float = DEFAULT_SMOOTHING) -> dict:
    """Runs the range test of `config` in `workdir` and returns the `lr_range.json` record.

    Every check (these settings, then the engine's own `check_config`) raises its ValueError
    before anything compiles or is written. A workdir whose lr_range.json finished with the same
    settings and config is returned untouched; one with other settings (or another command's
    outputs) is refused. Process 0 holds `<workdir>/run.lock` while it runs.
    """
    settings = check_settings(lr_min, lr_max, steps, divergence_factor, smoothing)
    overrides = ramp_overrides(settings, config)
    run_config = apply_overrides(config, overrides)
    schedule = ramp_schedule(settings["lr_min"], settings["lr_max"], settings["steps"])
    checked = config_lib.check_config(run_config, schedule=schedule)
    teacher = None  # config.distill's teacher, checked like the engine checks it
    if distill_lib.distill_settings(run_config) is not None:
        teacher = distill_lib.load_teacher(run_config, checked.data_info)
    is_primary = jax.process_index() == 0
    flat = config_lib.flatten(run_config)
    with directory_lock(workdir, kind="learning-rate range test", hold=is_primary):
        finished = _finished_record(workdir, settings, flat)
        if finished is not None:
            logging.info("%s already holds this test (%s); nothing to do.", workdir,
                         finished["status"])
            return finished | {"outputs": _outputs(workdir)}  # where they are now (moved?)
        record = {"status": "running", "settings": settings, "overrides": overrides,
                  "model": run_config.model, "dataset": checked.data_info.name,
                  "config": flat, "outputs": _outputs(workdir)}
        started = time.time()
        # SIGTERM (scancel, preemption): polled by the ramp, recorded, exit 143. Held until the
        # record and plot are written: one arriving after the ramp's last poll stays pending
        # (as after a training run's) instead of killing the process, the test unrecorded.
        with StopRequest() as stop_request:
            try:
                record |= _train(run_config, checked, schedule, settings, stop_request, teacher)
            except BaseException as err:  # recorded (a rerun redoes it), then raised
                status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                record |= {"status": status, "stop": {"reason": status,
                                                      "step": getattr(err, "step", None),
                                                      "message": f"{type(err).__name__}: {err}"},
                           "wall_time_s": time.time() - started}
                if is_primary:
                    write_json(os.path.join(workdir, RECORD_FILE), record)
                if isinstance(err, TrainingInterrupted):  # it exits 143: say why, as training does
                    logging.warning("LR range test: %s", err)
                raise
            record["wall_time_s"] = time.time() - started
            if is_primary:
                plot(record, os.path.join(workdir, PLOT_FILE))
                write_json(os.path.join(workdir, RECORD_FILE), record)
    return record


def _outputs(workdir: str) -> dict[str, str]:
    """The test's files in `workdir`, as absolute paths."""
    root = os.path.abspath(workdir)
    return {"record": os.path.join(root, RECORD_FILE), "plot": os.path.join(root, PLOT_FILE)}


def _finished_record(workdir: str, settings: dict, flat: dict) -> dict | None:
    """The workdir's finished record of these settings and config, None when there is none
    (or it failed: then it is redone); a ValueError when it holds a different test."""
    saved = read_json(os.path.join(workdir, RECORD_FILE))
    if not isinstance(saved, dict) or saved.get("status") not in FINISHED:
        return None
    differ = [f"{k}: {saved['settings'].get(k)!r} -> {v!r}" for k, v in settings.items()
              if saved["settings"].get(k) != v]
    ramp = ramp_overrides(settings)  # follow from the settings: said once, as settings
    differ += [f"config.{n}: {saved['config'].get(n, '<unset>')!r} -> {flat.get(n, '<unset>')!r}"
               for n in config_lib.incompatible_fields(saved.get("config", {}), flat)
               if n not in ramp]
    if differ:
        raise ValueError(
            f"workdir: {workdir!r} holds a finished LR range test with other settings "
            f"({', '.join(differ[:8])}); to start fresh use a new --workdir or delete "
            f"{os.path.join(workdir, RECORD_FILE)!r}.")
    return saved


def _train(config: Any, checked: Any, schedule: optax.Schedule, settings: dict[str, Any],
           stop_request: StopRequest, teacher: distill_lib.Teacher | None = None) -> dict:
    """The ramp itself: the engine's train step (distilling from `teacher` if given), step by
    step, until the end, divergence or a signal `stop_request` caught; returns the record's
    `records`, `stop`, `status` and `suggestions`."""
    parallel = DataParallel(config.parallel, checked.devices)
    p_train, _ = wrap_steps(config, checked.task, checked.model, checked.tx, schedule, parallel,
                            teacher)
    image_shape = tuple(checked.data_info.image_shape)
    host_state = fresh_state(config, checked.model, checked.tx, image_shape)
    if config_lib.init_from_workdir(config) is not None:  # a fine-tuning config: its start
        host_state = warm_start(host_state,
                                init_from_lib.load_init_from(config, checked.variable_shapes)[0])
    state = parallel.replicate(host_state)
    batches = checked.pipeline.train_batches(
        config.data, global_batch_size=config.global_batch_size,
        num_devices=parallel.local_device_count, seed=config.seed, start_step=0,
        process_index=jax.process_index(), process_count=jax.process_count())
    smoothing, factor = settings["smoothing"], settings["divergence_factor"]
    records: list[dict] = []
    acc, minimum, reason = 0.0, math.inf, None
    for step in range(settings["steps"]):
        state, metrics = p_train(state, parallel.shard_batch(next(batches)))
        host = parallel.metrics_to_host(metrics)
        loss = float(host.get("total_loss", host["loss"]))  # the objective the rate steps
        lr = float(host["learning_rate"])
        if math.isfinite(loss):  # diagnose.exponential_smoothing, kept online
            acc = smoothing * acc + (1.0 - smoothing) * loss
            smoothed = acc / (1.0 - smoothing ** (step + 1))
            minimum = min(minimum, smoothed)
            records.append({"step": step, "lr": lr, "loss": loss, "smoothed_loss": smoothed})
        else:
            smoothed = math.nan
        reason = stop_reason(step, lr, loss, smoothed, minimum, factor,
                             float(host.get(PARAMS_FINITE, 1.0)) == 1.0,
                             float(host.get(BATCH_STATS_FINITE, 1.0)) == 1.0)
        if reason is not None:
            logging.info("LR range test: %s", reason)
            break
        signal_name = stop_request.should_stop(step, 1)
        if signal_name is not None:  # run_lr_range records it as "interrupted"
            raise TrainingInterrupted(step, signal_name, checkpointed=False)
    status = "completed" if reason is None else "diverged"
    stop = {"reason": status, "step": step,
            "message": reason or f"completed all {settings['steps']} steps without diverging "
                                 f"(lr {settings['lr_min']:g} to {settings['lr_max']:g})"}
    lrs = np.array([r["lr"] for r in records])
    curve = np.array([r["smoothed_loss"] for r in records])
    return {"status": status, "stop": stop, "records": records,
            "suggestions": suggest(lrs, curve, skipped_steps(settings["steps"]))}


def plot(record: dict, path: str) -> str:
    """lr_range.png: loss (thin) and smoothed loss (thick) against the learning rate on a log
    axis, the suggestions as vertical lines, the stop reason as the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = record["records"]
    lrs = [r["lr"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, [r["loss"] for r in records], color="tab:blue", alpha=0.35, lw=1,
            label="loss")
    ax.plot(lrs, [r["smoothed_loss"] for r in records], color="tab:blue", lw=2,
            label=f"smoothed loss (EMA {record['settings']['smoothing']:g})")
    tips = record["suggestions"]
    marks = (("suggested", "steepest descent", "tab:green", "-"),
             ("min_loss", "minimum", "tab:red", "--"),
             ("min_loss_over_10", "minimum / 10", "tab:orange", ":"))
    for key, name, color, style in marks:
        if tips.get(key) is not None:
            ax.axvline(tips[key], color=color, ls=style, lw=1.5,
                       label=f"{name}: lr={tips[key]:.3g}")
    if records:  # from the lowest loss to a little above the start: a blow-up runs off the top
        low = min(min(r["loss"], r["smoothed_loss"]) for r in records)
        high = max(r["loss"] for r in records[: max(2, len(records) // 10)])
        ax.set_ylim(low - 0.05 * abs(high - low), max(high, low) * 1.3 + 1e-6)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {record['model']} on {record['dataset']}\n"
                 f"{record['stop']['message']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def format_summary(record: dict) -> str:
    """A few lines for the terminal: how the test ended, the suggestions, where the files are."""
    s, tips = record["settings"], record["suggestions"]
    lines = [f"LR range test of {record['model']} on {record['dataset']}, lr {s['lr_min']:g} to "
             f"{s['lr_max']:g} over {s['steps']} steps: {record['stop']['message']}."]
    if tips["suggested"] is not None:
        lines.append(f"Suggested learning rate: {tips['suggested']:.3g} (steepest descent of the "
                     "smoothed loss)")
    else:
        lines.append("No suggestion: the smoothed loss did not fall after the first "
                     f"{tips['skip_start']} steps (lower --lr_min, or more --steps).")
    if tips["min_loss_over_10"] is not None:
        lines.append(f"Minimum smoothed loss at lr={tips['min_loss']:.3g}; "
                     f"min/10 rule: {tips['min_loss_over_10']:.3g}")
    elif tips["min_loss"] is not None:  # no descent: a tenth of it was never tested
        lines.append(f"Minimum smoothed loss at lr={tips['min_loss']:.3g} (step "
                     f"{tips['min_loss_step']}, before any descent).")
    lines += [f"Plot:   {record['outputs']['plot']}", f"Record: {record['outputs']['record']}"]
    return "\n".join(lines)

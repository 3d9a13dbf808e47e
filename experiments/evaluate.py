"""Evaluate a training run's checkpoint on a split of its dataset (no training).

    python -m experiments.evaluate --workdir=workdirs/lenet5_digits [--split=test] [--step=N]
        [--ema] [--n_bins=15] [--temperature_split='train[90%:]' [--allow_same_split]]

Loads the run's best checkpoint (by its config's best_metric; else its newest; or --step), runs
the engine's own evaluation on --split (default: the run's eval split) and prints the metrics.
They are also written to <workdir>/eval/<split>_step<N>.json (--output overrides the path), with
a PNG beside it: the confusion matrix (and per-class top-1 in the JSON) of a classifier, a
detector's boxes on the first images, or a dense predictor's image, truth and predicted class
maps. With --ema the checkpoint's weight average (a run with
--config.ema.decay) is evaluated instead of its weights, written to ..._step<N>_ema.json. The
run's own files are only read, so a run still training can be evaluated.

A classifier's JSON also gets a `calibration` block (`cnnjax.analysis.calibration`: ECE and MCE
over --n_bins equal-width confidence bins, NLL, Brier score and the bins), and a reliability
diagram is drawn to <output stem>_reliability.png. With --temperature_split a temperature T is
fitted (Guo et al. 2017) on that split's logits and the evaluated split's calibration at that T
is added (`calibration.temperature_scaling`). Fitting on the evaluated split itself is refused
unless --allow_same_split: the scores would then be measured on the examples T was fitted to.
Calibration costs one prediction pass over --split (shared with the confusion matrix);
--nocalibration skips it. If T cannot be fitted, the JSON is still written (with
`calibration_error`) before the command exits with the reason.

A plot this evaluation does not draw (--noplot, --nocalibration) but the earlier evaluation into
the same JSON drew (named in that JSON) is removed, so that the PNGs a JSON names or sits beside
are of its evaluation; other files are never touched.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Collection

from cnnjax.platform import configure_entry_point

configure_entry_point()

from absl import app, flags  # noqa: E402

from cnnjax.utils.cli import (  # noqa: E402
    exit_on_ctrl_c,
    one_line_errors,
    parse_flags,
    start_command,
)
from cnnjax.utils.files import (  # noqa: E402
    check_output_dir,
    check_outside_run,
    make_parent_dir,
    read_json,
)

_WORKDIR = flags.DEFINE_string("workdir", None, "The --workdir of a training run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best, else newest).")
_SPLIT = flags.DEFINE_string("split", None, "tfds split, e.g. 'test' (default: the run's).")
_BATCH = flags.DEFINE_integer(
    "eval_batch_size", None, "Images per forward pass. Default: the run's eval batch size for the "
    "metrics, cnnjax.train.trained.PREDICTION_BATCH (64) for the calibration and confusion passes.")
_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices to evaluate on (0: all; default: "
                                "the run's config.num_devices).")
_EMA = flags.DEFINE_bool("ema", False, "Evaluate the run's weight average (a run trained with "
                         "--config.ema.decay) instead of its weights.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path (default: <workdir>/eval/...json).")
_PLOT = flags.DEFINE_bool("plot", True, "Also write a PNG next to the JSON: the confusion matrix "
                          "(classification) or detections on the first --plot_images images.")
_PLOT_IMAGES = flags.DEFINE_integer("plot_images", 16, "Images drawn for a detector.")
_N_BINS = flags.DEFINE_integer("n_bins", 15, "Classifier calibration: equal-width confidence "
                               "bins (lo, hi] of ECE, MCE and the reliability diagram.")
_CALIBRATION = flags.DEFINE_bool("calibration", True, "Classifier: report calibration (one "
                                  "more prediction pass, shared with the confusion matrix).")
_TEMPERATURE_SPLIT = flags.DEFINE_string(
    "temperature_split", None, "Classifier: fit a softmax temperature on this tfds split of the "
    "run's dataset (held out from training, e.g. 'train[90%:]' of a run trained on "
    "'train[:90%]') and also report --split's calibration at it.")
_ALLOW_SAME_SPLIT = flags.DEFINE_bool(
    "allow_same_split", False, "Allow --temperature_split to be the evaluated split (an "
    "optimistic oracle: T is then fitted to the examples it is scored on).")
flags.mark_flags_as_required(["workdir"])


def _calibration_line(record: dict) -> str:
    """The calibration scores, and those after temperature scaling, as printed (the bins are
    in the JSON)."""
    line = (f"Calibration ({record['n_bins']} bins): ECE {record['ece']:.4f}, MCE "
            f"{record['mce']:.4f}, NLL {record['nll']:.4f}, Brier {record['brier']:.4f}")
    scaled = record.get("temperature_scaling")
    if scaled:
        line += (f"\nAfter temperature scaling (T={scaled['temperature']:.4f}, fitted on "
                 f"{scaled['split']!r}, {scaled['num_fit_examples']} examples): ECE "
                 f"{scaled['ece']:.4f}, MCE {scaled['mce']:.4f}, NLL {scaled['nll']:.4f}, "
                 f"Brier {scaled['brier']:.4f}")
        if scaled["at_bound"]:
            line += " (T is at the end of its search range: the NLL was still falling there)"
    return line


def _hint(err: Exception) -> str:
    """The flag to pass when the run's device count does not fit this machine ('' otherwise)."""
    return (" (pass --num_devices=N for this machine's devices)"
            if "num_devices=" in str(err) and _DEVICES.value is None else "")


def _output_hint(err: Exception) -> str:
    """Where else the results can go when the default folder cannot be written ('' otherwise)."""
    return (" (pass --output=<a JSON path> to write them elsewhere)"
            if isinstance(err, OSError) and _OUTPUT.value is None else "")


def _flag_error() -> str | None:
    """What is wrong with the flags, checked before anything loads (None: nothing)."""
    if _TEMPERATURE_SPLIT.value is not None and not _CALIBRATION.value:
        return "--temperature_split is invalid with --nocalibration; drop one of them"
    if _PLOT.value and _PLOT_IMAGES.value < 1:
        return f"--plot_images={_PLOT_IMAGES.value} is invalid; expected at least 1 (or --noplot)"
    if _STEP.value is not None and _STEP.value < 1:  # load_trained would name its argument
        return (f"--step={_STEP.value} is invalid; expected a checkpoint step >= 1 (or leave it "
                "out: the best checkpoint, else the newest)")
    if _DEVICES.value is not None and _DEVICES.value < 0:
        return (f"--num_devices={_DEVICES.value} is invalid; expected 0 (every local device) or "
                "a positive count")
    if _BATCH.value is not None and _BATCH.value < 1:  # evaluate_run would name its argument
        return (f"--eval_batch_size={_BATCH.value} is invalid; expected a positive batch size "
                "(or leave it out: the run's eval batch size)")
    for split in (_SPLIT, _TEMPERATURE_SPLIT):  # the rest is checked against the run's dataset
        if split.value is not None and not split.value.strip():
            return (f"--{split.name}={split.value!r} is invalid; expected a tfds split such as "
                    "'test'")
    if _N_BINS.value < 1:
        return f"--n_bins={_N_BINS.value} is invalid; expected at least 1 (Guo et al. use 15)"
    if _OUTPUT.value == "":  # was taken for the default path without a word
        return ("--output='' is invalid; expected a JSON file path (or leave it out: "
                "<workdir>/eval/<split>_step<N>.json)")
    if _OUTPUT.value and os.path.isdir(_OUTPUT.value):
        return f"--output={_OUTPUT.value!r} is invalid; expected a JSON file path, not a directory"
    if _OUTPUT.value and _OUTPUT.value.lower().endswith(".png"):  # the plot's own path
        return (f"--output={_OUTPUT.value!r} is invalid; expected a JSON file path (the plot is "
                "written beside it, with the suffix .png)")
    return None


def _earlier_plots(output: str) -> set[str]:
    """The file names of the plots the earlier evaluation's JSON at `output` names (none if there
    is none): by name, since plots are written beside their JSON and its paths may be relative
    to another working folder."""
    earlier = read_json(output)
    if not isinstance(earlier, dict):
        return set()
    return {os.path.basename(earlier[key]) for key in ("plot", "reliability_plot")
            if isinstance(earlier.get(key), str)}


def _remove_stale_plots(stem: str, earlier: set[str], result: dict) -> list[str]:
    """Removes the plots at `stem` (the JSON's path without .json) that an earlier evaluation into
    the same JSON drew (`earlier`: their file names) and this one did not (--noplot,
    --nocalibration, a failed prediction pass): they would be read as this one's. Files the
    command never wrote are left alone. Returns the removed paths."""
    drawn = {result.get("plot"), result.get("reliability_plot")}
    stale = [path for path in (stem + ".png", stem + "_reliability.png")
             if path not in drawn and os.path.basename(path) in earlier and os.path.isfile(path)]
    for path in stale:
        os.remove(path)
    return stale


def ignored_flags(given: Collection[str], task: str | None, plot: bool, calibration: bool,
                  temperature_split: str | None) -> str | None:
    """Why a flag given on the command line (`given`: their names) would be ignored, silently,
    as one line; None when every one is read. `task` is the run's (None: not loaded yet, only
    the flags' own combinations are checked)."""
    if "plot_images" in given and not plot:
        return "--plot_images is invalid with --noplot (it sets the plot's images); drop one"
    if "n_bins" in given and not calibration:
        return "--n_bins is invalid with --nocalibration (it sets calibration's bins); drop one"
    if "allow_same_split" in given and temperature_split is None:
        return ("--allow_same_split is invalid without --temperature_split (it allows that "
                "split to be the evaluated one); pass --temperature_split or drop it")
    if "plot_images" in given and task == "classification":
        return ("--plot_images is invalid for a classification run; a classifier's plot is its "
                "confusion matrix over every example (the flag sets the images a detector's or "
                "a dense predictor's plot draws)")
    if "n_bins" in given and task not in (None, "classification"):
        return (f"--n_bins is invalid for a {task} run; calibration (ECE, MCE, reliability "
                "diagram) is reported for classifiers only")
    return None


def _given() -> set[str]:
    """The names of the flags given on the command line that `ignored_flags` checks."""
    return {name for name in ("plot_images", "n_bins", "allow_same_split")
            if flags.FLAGS[name].present}


def _calibrate(run, result: dict, same_split: bool) -> tuple[tuple | None, str | None]:
    """Adds a classifier's `calibration` (and temperature scaling) to `result`; returns the
    (logits, labels) pass it made, shared with the confusion plot, and why the temperature
    could not be fitted (the scores at T = 1 are kept then), or None."""
    from cnnjax.train.trained import calibrate_run, classifier_logits

    classified = None
    # --eval_batch_size, else the prediction batch these functions default to
    batch = {} if _BATCH.value is None else {"batch_size": _BATCH.value}
    try:  # one pass of the model for calibration and the confusion matrix
        classified = classifier_logits(run, result["split"], **batch)
        result["calibration"] = calibrate_run(
            run, *classified, _N_BINS.value, _TEMPERATURE_SPLIT.value,
            same_split=same_split, name="--temperature_split", **batch)
    except ValueError as err:  # e.g. no temperature fits: keep the metrics, then say why
        result["calibration_error"] = str(err)
        if classified is not None:  # only the fit failed: the scores at T = 1 stand
            result["calibration"] = calibrate_run(run, *classified, _N_BINS.value)
        return classified, str(err)
    return classified, None


def _plot_reliability(run, result: dict, path: str) -> str:
    """The reliability diagram of `result`'s calibration (before and after temperature
    scaling, when fitted) at `path`."""
    from cnnjax.analysis.calibration import plot_reliability

    record = result["calibration"]
    scaled = record.get("temperature_scaling")
    panels = [("before temperature scaling" if scaled else "", record)]
    if scaled:
        panels.append((f"T = {scaled['temperature']:.3f} (fitted on {scaled['split']})", scaled))
    return plot_reliability(panels, path,
                            title=f"{run.config.model} step {run.step}, {result['split']}")


def main(argv: list[str]) -> None:
    start_command(argv)
    # Ctrl-C: one line, exit status 130, as experiments.train
    with exit_on_ctrl_c(lambda: f"Ctrl-C; evaluate only reads the run in {_WORKDIR.value!r}: "
                                "rerun the command to evaluate it."):
        _evaluate()


def _evaluate() -> None:
    from cnnjax.train.config import config_task
    from cnnjax.train.trained import (
        NoWeightAverageError,
        argument_prefix,
        check_split,
        check_temperature_split,
        classifier_confusion,
        evaluate_run,
        load_trained,
        plot_predictions,
    )
    from cnnjax.utils.files import write_json
    from cnnjax.utils.validation import error_prefix

    if (error := _flag_error() or ignored_flags(
            _given(), None, _PLOT.value, _CALIBRATION.value, _TEMPERATURE_SPLIT.value)):
        sys.exit(f"error: {error}")
    with one_line_errors(_hint, {argument_prefix("workdir"): _WORKDIR,
                                 argument_prefix("step"): _STEP,
                                 error_prefix("config", "num_devices"): _DEVICES}):
        if _OUTPUT.value:  # before the evaluation: a file in the way of its folder ends it now
            check_outside_run(_OUTPUT.value, _WORKDIR.value, "--output", folder=False)
            check_output_dir(os.path.dirname(os.path.abspath(_OUTPUT.value)), "--output's folder")
        elif os.path.isdir(_WORKDIR.value):  # anything else: load_trained says what it is
            check_output_dir(os.path.join(_WORKDIR.value, "eval"), "--workdir's eval folder")
        try:
            run = load_trained(_WORKDIR.value, _STEP.value, _DEVICES.value, ema=_EMA.value)
        except NoWeightAverageError as err:
            sys.exit(f"error: {err.flag_message('--ema')}")
        if (error := ignored_flags(_given(), config_task(run.config), _PLOT.value,
                                   _CALIBRATION.value, _TEMPERATURE_SPLIT.value)):
            sys.exit(f"error: {error}")
        check_split(run, _SPLIT.value, "--split")  # before anything compiles
        same_split, warnings = check_temperature_split(
            run, _SPLIT.value, _TEMPERATURE_SPLIT.value, _ALLOW_SAME_SPLIT.value,
            name="--temperature_split", allow="--allow_same_split")
        result = evaluate_run(run, _SPLIT.value, _BATCH.value)
    output = _OUTPUT.value or os.path.join(_WORKDIR.value, "eval",
                                           f"{result['split']}_step{result['step']}"
                                           f"{'_ema' if run.ema else ''}.json")
    with one_line_errors(_output_hint):  # e.g. a folder it may not write: one line naming it
        make_parent_dir(output)  # checked above
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        stem = os.path.splitext(output)[0]
        classified, failure = None, None
        if config_task(run.config) == "classification" and _CALIBRATION.value:
            classified, failure = _calibrate(run, result, same_split)
        if classified is not None or failure is None:
            if _PLOT.value:
                result |= plot_predictions(run, stem + ".png", result["split"],
                                           _PLOT_IMAGES.value, classified=classified)
            elif config_task(run.config) == "classification":  # the JSON's matrix, not drawn
                result |= classifier_confusion(run, result["split"], classified)
        if _PLOT.value and "calibration" in result:
            result["reliability_plot"] = _plot_reliability(run, result, stem + "_reliability.png")
        earlier = _earlier_plots(output)
        write_json(output, result)
        removed = _remove_stale_plots(stem, earlier, result)
    shown = {k: v for k, v in result.items() if k not in ("confusion_matrix", "calibration")}
    print(json.dumps(shown, indent=2, default=float))  # all of it is in the file
    if "calibration" in result:
        print(_calibration_line(result["calibration"]))
    print(f"Written to {output}")
    for path in removed:
        print(f"Removed {path}: an earlier evaluation's plot, which this one did not draw")
    if failure is not None:
        sys.exit(f"error: {failure} (the other metrics are written to {output})")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

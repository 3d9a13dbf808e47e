"""Evaluate a training run's checkpoint on a split of its dataset (no training).

    python -m experiments.evaluate --workdir=workdirs/lenet5_digits [--split=test] [--step=N]
        [--ema] [--n_bins=15] [--temperature_split='train[90%:]' [--allow_same_split]]

Loads the run's best checkpoint (by its config's best_metric; else its newest; or --step), runs
the engine's own evaluation on --split (default: the run's eval split) and prints the metrics.
They are also written to <workdir>/eval/<split>_step<N>.json (--output overrides the path), with
a PNG beside it: the confusion matrix (and per-class top-1 in the JSON) of a classifier, or a
detector's boxes on the first images. With --ema the checkpoint's weight average (a run with
--config.ema.decay) is evaluated instead of its weights, written to ..._step<N>_ema.json. The
run's own files are only read, so a run still training can be evaluated.

A classifier's JSON also gets a `calibration` block (`cnnjax.analysis.calibration`: ECE and MCE
over --n_bins equal-width confidence bins, NLL, Brier score and the bins), and a reliability
diagram is drawn to <output stem>_reliability.png. With --temperature_split a temperature T is
fitted (Guo et al. 2017) on that split's logits and the evaluated split's calibration at that T
is added (`calibration.temperature_scaling`). Fitting on the evaluated split itself is refused
unless --allow_same_split: the scores would then be measured on the examples T was fitted to.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from cnnjax.platform import configure_cpu_defaults

configure_cpu_defaults()

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The --workdir of a training run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best, else newest).")
_SPLIT = flags.DEFINE_string("split", None, "tfds split, e.g. 'test' (default: the run's).")
_BATCH = flags.DEFINE_integer("eval_batch_size", None, "Default: the run's eval batch size.")
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
_TEMPERATURE_SPLIT = flags.DEFINE_string(
    "temperature_split", None, "Classifier: fit a softmax temperature on this tfds split of the "
    "run's dataset (held out from training, e.g. 'train[90%:]' of a run trained on "
    "'train[:90%]') and also report --split's calibration at it.")
_ALLOW_SAME_SPLIT = flags.DEFINE_bool(
    "allow_same_split", False, "Allow --temperature_split to be the evaluated split (an "
    "optimistic oracle: T is then fitted to the examples it is scored on).")
flags.mark_flags_as_required(["workdir"])


def _normalized(split: str) -> str:
    """A tfds split string without spaces, to compare two spellings of a split."""
    return "".join(split.split())


def check_temperature_split(run: Any, split: str | None, temperature_split: str | None,
                            allow_same_split: bool = False) -> tuple[bool, list[str]]:
    """Checks `temperature_split` for `run` evaluated on `split` (None: its eval split) before
    anything compiles: a classifier's run, an existing split, not the evaluated split (unless
    `allow_same_split`). Returns whether it is the evaluated split, and warnings: fitting on
    the evaluated split, or on examples the run was trained on (its whole train split or a
    slice of it; an overlap of two slices is not detected)."""
    from cnnjax.train import config as config_lib
    from cnnjax.train.trained import with_split

    if temperature_split is None:
        return False, []
    task = config_lib.config_task(run.config)
    if task != "classification":
        raise ValueError(f"--temperature_split={temperature_split!r} is invalid; temperature "
                         f"scaling is for classifiers, and this is a {task} run")
    if not isinstance(temperature_split, str) or not temperature_split.strip():
        raise ValueError(f"--temperature_split={temperature_split!r} is invalid; expected a "
                         "tfds split such as 'train[90%:]'")
    pipeline = config_lib.data_pipeline(run.config)
    config = with_split(run.config, split)
    evaluated = pipeline.eval_split_name(config.data)
    try:  # reads the split's size: an unknown split fails here, before any compilation
        pipeline.get_dataset_info(with_split(run.config, temperature_split).data)
    except ValueError as err:
        raise ValueError(f"--temperature_split={temperature_split!r} is invalid; {err}") from None
    warnings = []
    same_split = _normalized(temperature_split) == _normalized(evaluated)
    if same_split:
        if not allow_same_split:
            raise ValueError(
                f"--temperature_split={temperature_split!r} is invalid; it is the evaluated "
                "split, so T would be fitted to the very examples it is scored on (an "
                "optimistic ECE); pass a held-out split (e.g. 'train[90%:]' of a run trained "
                "on 'train[:90%]'), or --allow_same_split for that oracle on purpose")
        warnings.append(f"T is fitted on the evaluated split {evaluated!r} itself: its "
                        "calibration after scaling is optimistic (--allow_same_split)")
    train = _normalized(run.config.data.get("train_split") or "")
    fitted = _normalized(temperature_split)
    if train and (fitted == train or ("[" not in train and fitted.split("[")[0] == train)):
        warnings.append(f"--temperature_split={temperature_split!r} is part of the run's "
                        f"training split {train!r}: a model is more confident on examples it "
                        "learned than on new ones, so the T fitted there is biased low; train "
                        "on a slice (--config.data.train_split='train[:90%]') and fit on the "
                        "rest")
    return same_split, warnings


def calibration_record(run: Any, logits: Any, labels: Any, n_bins: int = 15,
                       temperature_split: str | None = None, batch_size: int = 64,
                       same_split: bool = False) -> dict:
    """The JSON `calibration` block of a classifier's `logits` and `labels`: ECE, MCE, NLL,
    Brier score and bins at T = 1, plus (with `temperature_split`) `temperature_scaling`: T
    fitted on that split's logits (one more pass of the model) and the same scores at T."""
    from cnnjax.analysis.calibration import calibration_metrics, temperature_scaling
    from cnnjax.train.trained import classifier_logits

    record = calibration_metrics(logits, labels, n_bins)
    if temperature_split is not None:
        fit_logits, fit_labels = classifier_logits(run, temperature_split, batch_size)
        try:
            scaled = temperature_scaling(fit_logits, fit_labels, logits, labels, n_bins)
        except ValueError as err:
            raise ValueError(f"--temperature_split={temperature_split!r}: {err}") from None
        record["temperature_scaling"] = {
            "split": temperature_split, "same_split": same_split,
            **{k: scaled[k] for k in ("temperature", "at_bound", "num_fit_examples",
                                      "fit_nll_before", "fit_nll_after")},
            **{k: v for k, v in scaled["after"].items() if k != "temperature"}}
    return record


def _calibration_line(record: dict) -> str:
    """The calibration scores in one printed line (the bins are in the JSON)."""
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from cnnjax.analysis.calibration import plot_reliability
    from cnnjax.train.config import config_task
    from cnnjax.train.logging import quiet_library_logs
    from cnnjax.train.trained import (
        classifier_logits,
        evaluate_run,
        load_trained,
        plot_predictions,
    )
    from cnnjax.utils.files import write_json

    quiet_library_logs()
    if _PLOT.value and _PLOT_IMAGES.value < 1:
        sys.exit(f"error: --plot_images={_PLOT_IMAGES.value} is invalid; expected at least 1 "
                 "(or --noplot)")
    if _N_BINS.value < 1:
        sys.exit(f"error: --n_bins={_N_BINS.value} is invalid; expected at least 1 (Guo et al. "
                 "use 15)")
    if _OUTPUT.value and os.path.isdir(_OUTPUT.value):
        sys.exit(f"error: --output={_OUTPUT.value!r} is invalid; expected a JSON file path, "
                 "not a directory")
    if _OUTPUT.value and _OUTPUT.value.lower().endswith(".png"):  # the plot's own path
        sys.exit(f"error: --output={_OUTPUT.value!r} is invalid; expected a JSON file path (the "
                 "plot is written beside it, with the suffix .png)")
    try:
        run = load_trained(_WORKDIR.value, _STEP.value, _DEVICES.value, ema=_EMA.value)
        same_split, warnings = check_temperature_split(run, _SPLIT.value, _TEMPERATURE_SPLIT.value,
                                           _ALLOW_SAME_SPLIT.value)
        result = evaluate_run(run, _SPLIT.value, _BATCH.value)
    except (ValueError, FileNotFoundError) as err:
        hint = (" (pass --num_devices=N for this machine's devices)"
                if "num_devices=" in str(err) and _DEVICES.value is None else "")
        sys.exit(f"error: {err}{hint}")
    output = _OUTPUT.value or os.path.join(_WORKDIR.value, "eval",
                                           f"{result['split']}_step{result['step']}"
                                           f"{'_ema' if run.ema else ''}.json")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        sys.exit(f"error: --output={output!r} is invalid; a file is in the way of its folder")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    stem = os.path.splitext(output)[0]
    classified = None
    if config_task(run.config) == "classification":  # one pass of the model for both
        try:
            classified = classifier_logits(run, result["split"], _BATCH.value or 64)
            result["calibration"] = calibration_record(
                run, *classified, _N_BINS.value, _TEMPERATURE_SPLIT.value, _BATCH.value or 64,
                same_split=same_split)
        except ValueError as err:
            sys.exit(f"error: {err}")
    if _PLOT.value:
        result |= plot_predictions(run, stem + ".png", result["split"], _PLOT_IMAGES.value,
                                   classified=classified)
    if _PLOT.value and classified is not None:
        record = result["calibration"]
        scaled = record.get("temperature_scaling")
        panels = [("before temperature scaling" if scaled else "", record)]
        if scaled:
            panels.append((f"T = {scaled['temperature']:.3f} (fitted on {scaled['split']})",
                           scaled))
        result["reliability_plot"] = plot_reliability(
            panels, stem + "_reliability.png",
            title=f"{run.config.model} step {run.step}, {result['split']}")
    write_json(output, result)
    shown = {k: v for k, v in result.items() if k not in ("confusion_matrix", "calibration")}
    print(json.dumps(shown, indent=2, default=float))  # all of it is in the file
    if classified is not None:
        print(_calibration_line(result["calibration"]))
    print(f"Written to {output}")


if __name__ == "__main__":
    app.run(main)

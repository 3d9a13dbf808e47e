"""Evaluate a training run's checkpoint on a split of its dataset (no training).

    python -m experiments.evaluate --workdir=workdirs/lenet5_digits [--split=test] [--step=N]
        [--ema]

Loads the run's best checkpoint (by its config's best_metric; else its newest; or --step), runs
the engine's own evaluation on --split (default: the run's eval split) and prints the metrics.
They are also written to <workdir>/eval/<split>_step<N>.json (--output overrides the path), with
a PNG beside it: the confusion matrix (and per-class top-1 in the JSON) of a classifier, or a
detector's boxes on the first images. With --ema the checkpoint's weight average (a run with
--config.ema.decay) is evaluated instead of its weights, written to ..._step<N>_ema.json. The
run's own files are only read, so a run still training can be evaluated.
"""

from __future__ import annotations

import json
import os
import sys

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
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from cnnjax.train.logging import quiet_library_logs
    from cnnjax.train.trained import evaluate_run, load_trained, plot_predictions
    from cnnjax.utils.files import write_json

    quiet_library_logs()
    if _PLOT.value and _PLOT_IMAGES.value < 1:
        sys.exit(f"error: --plot_images={_PLOT_IMAGES.value} is invalid; expected at least 1 "
                 "(or --noplot)")
    if _OUTPUT.value and os.path.isdir(_OUTPUT.value):
        sys.exit(f"error: --output={_OUTPUT.value!r} is invalid; expected a JSON file path, "
                 "not a directory")
    if _OUTPUT.value and _OUTPUT.value.lower().endswith(".png"):  # the plot's own path
        sys.exit(f"error: --output={_OUTPUT.value!r} is invalid; expected a JSON file path (the "
                 "plot is written beside it, with the suffix .png)")
    try:
        run = load_trained(_WORKDIR.value, _STEP.value, _DEVICES.value, ema=_EMA.value)
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
    if _PLOT.value:
        result |= plot_predictions(run, os.path.splitext(output)[0] + ".png", result["split"],
                                   _PLOT_IMAGES.value)
    write_json(output, result)
    shown = {k: v for k, v in result.items() if k != "confusion_matrix"}  # in the file
    print(json.dumps(shown, indent=2, default=float))
    print(f"Written to {output}")


if __name__ == "__main__":
    app.run(main)

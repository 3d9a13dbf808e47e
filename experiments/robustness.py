"""Top-1 of a trained classifier under common corruptions (Hendrycks & Dietterich, ICLR 2019).

    python -m experiments.robustness --workdir=workdirs/lenet5_digits [--corruptions=all|a,b]
        [--severities=1,2,3,4,5] [--split=test] [--max_examples=N] [--seed=0]
        [--source=on_the_fly|tfds] [--step=N] [--ema] [--eval_batch_size=256]
        [--baseline=<run>]

Loads the run's best checkpoint (`load_trained`; with --ema its weight average, for a run trained
with --config.ema.decay, into files ending `_ema`), reads its eval split (or --split) through the
run's own eval transform up to the pixels before normalization (`Transforms.eval_pixels`, 32x32 or
224x224, in [0, 255]), corrupts them (`cnnjax.analysis.corruptions`: CIFAR-10-C's formulas and table
at 32, ImageNet-C's at 224), stores the result as uint8 (truncated, as CIFAR-10-C), then normalizes
it as the run's eval does (`Transforms.normalize`): the model sees what it would see on a corrupted
copy of the split. Clean top-1 is the uncorrupted pixels stored and normalized the same way (for
native uint8 data the engine's eval top-1).

With --source=tfds each cell is the real benchmark instead, read from tfds (other splits than
the set's refused):
- runs trained on `cifar10`: `cifar10_corrupted/<corruption>_<severity>`'s test split (CIFAR-10-C),
  through the same preprocessing;
- runs trained on `imagenet2012` whose model sees 224x224 images:
  `imagenet2012_corrupted/<corruption>_<severity>`'s validation split (ImageNet-C). Its images
  are stored as 224x224 centre crops already (the region of the run's eval resize and crop), so
  they are normalized as stored, not cropped again.
Runs on other datasets are refused. cnnjax never downloads these: prepare them first (`tfds build
cifar10_corrupted` on a machine with internet, or per config, e.g.
`cifar10_corrupted/gaussian_noise_1`; imagenet2012_corrupted is built from ImageNet's validation
archive, downloaded by hand) into the run's data dir. The JSON's `tfds_dataset` names the set
read.

Reports top-1 per corruption x severity, clean top-1, the mean corruption top-1 (over the
requested corruptions x severities, once every one is measured: `complete` is false and the mean
null until then), the relative drop `(clean - mean) / clean` and per-corruption means, written
to <workdir>/robustness/robustness.json after every cell (atomically) with a plot beside it
(top-1 vs severity, one line per corruption, clean dashed). Each choice of --source=tfds,
--split, --seed, --max_examples and --step has its own file (e.g. robustness_seed1_max200.json),
so a quick check never replaces a long measurement; when the run's own checkpoint moved on since
robustness.json was written, that file is kept as robustness_step<N>.json.
An interrupted command resumes at the first missing cell; rerunning a finished one reprints it.
Grey runs (`digits`) skip `saturate` under --corruptions=all and refuse it by name.
"""

from __future__ import annotations

import os
import sys

from cnnjax.platform import configure_entry_point

configure_entry_point()

from absl import app, flags  # noqa: E402

from cnnjax.analysis.robustness import (  # noqa: E402
    SOURCES,
    corruption_errors,
    read_baseline,
    record_file_name,
    run_robustness,
    table,
)
from cnnjax.train.trained import NoWeightAverageError  # noqa: E402
from cnnjax.utils.cli import one_line_errors, parse_flags, start_command  # noqa: E402
from cnnjax.utils.files import write_json  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The --workdir of a trained classifier's run.")
_CORRUPTIONS = flags.DEFINE_string("corruptions", "all", "'all' or comma-separated names.")
_SEVERITIES = flags.DEFINE_string("severities", "1,2,3,4,5", "Comma-separated, from 1 to 5.")
_SPLIT = flags.DEFINE_string("split", None, "tfds split (default: the run's eval split).")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "The first N examples of the split "
                                     "(stored order; default: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the corruptions' noise.")
_SOURCE = flags.DEFINE_enum("source", "on_the_fly", list(SOURCES),
                            "on_the_fly: corrupt the split here; tfds: read tfds's "
                            "cifar10_corrupted (cifar10 runs) or imagenet2012_corrupted "
                            "(imagenet2012 runs).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best, else newest).")
_EMA = flags.DEFINE_bool("ema", False, "Measure the run's weight average (a run trained with "
                         "--config.ema.decay) instead of its weights.")
_BATCH = flags.DEFINE_integer("eval_batch_size", 256, "Images per forward pass.")
flags.DEFINE_alias("batch_size", "eval_batch_size")  # its first name; as experiments.evaluate's
_BASELINE = flags.DEFINE_string(
    "baseline", None, "Another run's workdir (or its robustness JSON), measured with the same "
    "flags: adds the corruption errors normalized by it (CE, mCE, relative mCE; Hendrycks & "
    "Dietterich use AlexNet). A workdir's record of its trained weights is read, also under "
    "--ema; pass the JSON file to compare with its weight average's.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    start_command(argv)
    # A tfds corrupted config that is not prepared is named by `run_robustness`, with how to
    # prepare that set.
    with one_line_errors():
        if _BASELINE.value is not None and not os.path.exists(_BASELINE.value):
            raise ValueError(f"robustness: baseline={_BASELINE.value!r} is invalid; it does not "
                             "exist (expected another run's workdir or its robustness JSON)")
        # Read before the measurement: a baseline without the record of these flags was
        # refused only after every cell had been measured.
        baseline = None if _BASELINE.value is None else read_baseline(
            _BASELINE.value, record_file_name(_SEVERITIES.value, _SPLIT.value, _MAX_EXAMPLES.value,
                                              _SEED.value, _SOURCE.value, _STEP.value,
                                              _BATCH.value))
        try:
            record, path = run_robustness(
                _WORKDIR.value, _CORRUPTIONS.value, _SEVERITIES.value, _SPLIT.value,
                _MAX_EXAMPLES.value, _SEED.value, _SOURCE.value, _STEP.value, _BATCH.value,
                baseline=baseline, baseline_given_as=_BASELINE.value, ema=_EMA.value)
        except NoWeightAverageError as err:
            sys.exit(f"error: {err.flag_message('--ema')}")
        if baseline is not None:
            record["baseline_errors"] = corruption_errors(record, baseline, _BASELINE.value)
            write_json(path, record)
    print(table(record))
    for name, why in record["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"Written to {path} and {os.path.splitext(path)[0]}.png")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

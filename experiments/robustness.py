"""Top-1 of a trained classifier under common corruptions (Hendrycks & Dietterich, ICLR 2019).

    python -m experiments.robustness --workdir=workdirs/lenet5_digits [--corruptions=all|a,b]
        [--severities=1,2,3,4,5] [--split=test] [--max_examples=N] [--seed=0]
        [--source=on_the_fly|tfds] [--step=N] [--batch_size=256]

Loads the run's best checkpoint (`load_trained`), reads its eval split (or --split) through the
run's own eval transform up to the pixels before normalization (`Transforms.eval_pixels`, 32x32
or 224x224, in [0, 255]), corrupts them (`cnnjax.analysis.corruptions`: CIFAR-10-C's formulas
and table at 32, ImageNet-C's at 224), stores the result as uint8 (truncated, as CIFAR-10-C), then
normalizes it as the run's eval does (`Transforms.normalize`): the model sees what it would see
on a corrupted copy of the split. Clean top-1 is the uncorrupted pixels stored and normalized the
same way (for native uint8 data the engine's eval top-1). --source=tfds reads CIFAR-10's test
split only (other splits refused).

With --source=tfds (runs trained on `cifar10` only) each cell is the real benchmark instead:
tfds's `cifar10_corrupted/<corruption>_<severity>` test split, through the same preprocessing.
cnnjax never downloads it: prepare it first (`tfds build cifar10_corrupted` on a machine with
internet, or per config, e.g. `cifar10_corrupted/gaussian_noise_1`) into the run's data dir.

Reports top-1 per corruption x severity, clean top-1, the mean corruption top-1 (over every
cell), the relative drop `(clean - mean) / clean` and per-corruption means, written to
<workdir>/robustness/robustness.json (robustness_tfds.json for --source=tfds) after every cell
(atomically) with a plot beside it (top-1 vs severity, one line per corruption, clean dashed).
An interrupted command resumes at the first missing cell; rerunning a finished one reprints it.
Cells of other settings (split, seed, max_examples, checkpoint) are recomputed, not mixed in.
Grey runs (`digits`) skip `saturate` under --corruptions=all and refuse it by name.
"""

from __future__ import annotations

import os

from cnnjax.platform import configure_cpu_defaults

configure_cpu_defaults()

from absl import app, flags  # noqa: E402

from cnnjax.analysis.robustness import TFDS_CORRUPTED, run_robustness, table  # noqa: E402
from cnnjax.utils.cli import one_line_errors, parse_flags, start_command  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The --workdir of a trained classifier's run.")
_CORRUPTIONS = flags.DEFINE_string("corruptions", "all", "'all' or comma-separated names.")
_SEVERITIES = flags.DEFINE_string("severities", "1,2,3,4,5", "Comma-separated, from 1 to 5.")
_SPLIT = flags.DEFINE_string("split", None, "tfds split (default: the run's eval split).")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "The first N examples of the split "
                                     "(stored order; default: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the corruptions' noise.")
_SOURCE = flags.DEFINE_enum("source", "on_the_fly", ["on_the_fly", "tfds"],
                            "on_the_fly: corrupt the split here; tfds: read cifar10_corrupted.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best, else newest).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per forward pass.")
flags.mark_flags_as_required(["workdir"])


def _hint(err: Exception) -> str:
    """What to do about a `cifar10_corrupted` config that is not prepared ('' for other errors)."""
    from cnnjax.data.sources import DatasetNotPreparedError

    if not isinstance(err, DatasetNotPreparedError):
        return ""
    return (f" For --source=tfds, prepare each `{TFDS_CORRUPTED}/<corruption>_<severity>` config "
            f"you evaluate (e.g. `tfds build {TFDS_CORRUPTED}` prepares all 95), or use "
            "--source=on_the_fly.")


def main(argv: list[str]) -> None:
    start_command(argv)
    with one_line_errors(_hint):
        record, path = run_robustness(
            _WORKDIR.value, _CORRUPTIONS.value, _SEVERITIES.value, _SPLIT.value,
            _MAX_EXAMPLES.value, _SEED.value, _SOURCE.value, _STEP.value, _BATCH.value)
    print(table(record))
    for name, why in record["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"Written to {path} and {os.path.splitext(path)[0]}.png")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""Compute an experiment's external region proposals ahead of training (no training).

    python -m experiments.proposals --config=experiments/configs/rcnn_shapes.py:selective_search

Runs selective search (`data.proposals`) on the config's train and eval splits and caches each
beside the dataset (`cnnjax.data.proposals`), where the training command then finds them. Worth
running as a CPU job of its own before a GPU or multi-host job: without the cache every process
of that job would compute them before its first step. Rerunning finds the cache and does nothing.
"""

from __future__ import annotations

import time

# XLA flags and TF's log level must be set before JAX and TF start; user-set values win.
from cnnjax.platform import configure_entry_point

configure_entry_point()

from absl import app, flags, logging  # noqa: E402

from cnnjax.utils.cli import (  # noqa: E402
    define_config_file,
    one_line_errors,
    parse_flags,
    start_command,
)

_CONFIG = define_config_file(
    "config", None, "Experiment config file (a detection config with data.proposals set).",
    lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    start_command(argv)
    from cnnjax.data.spec import check_proposals_set

    with one_line_errors():  # before TensorFlow starts (~6 s): nothing to prepare is one line
        check_proposals_set(_CONFIG.value.data)
    from cnnjax.data import detection

    logging.set_verbosity(logging.INFO)
    started = time.time()
    with one_line_errors():
        paths = detection.prepare_proposals(_CONFIG.value.data)
    for split, path in paths.items():
        print(f"{split}: {path}")
    print(f"Done in {time.time() - started:.1f} s.")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""Grid or random hyperparameter search: each trial is one `train_and_evaluate` run.

    python -m experiments.sweep --config=experiments/configs/lenet5_digits.py \\
        --sweep=experiments/sweeps/lenet5_digits_lr.py --sweep_dir=workdirs/sweeps/lenet5_lr \\
        [--config.<field>=<value> ...] [--sweep.<field>=<value> ...]

`--config` is the base experiment (any experiment config, with the usual overrides); `--sweep` is
a file whose `get_config()` describes the space (kind grid|random, seed and num_trials for a
random search, metric, mode, parameters: see experiments/sweeps/; a grid runs every combination,
`--max_trials=N` runs fewer). Trials run one after another in
<sweep_dir>/trials/<trial_id>/; results.csv/results.json and sweep.png are rewritten after each.
Rerunning the same command skips finished trials and resumes an interrupted one from its
checkpoint. `--trial_index=i` runs trial i alone (one task of a cluster array job), with
`--trial_count=k` trials i to i+k-1 (an array task running several);
`--max_trials=0` only rebuilds the results table and plot from the trial directories (it
refuses a larger random `--sweep.num_trials` than the sweep holds rather than grow it).
Exit status 1 if a trial failed, or if every trial has finished and none completed (all
diverged: nothing to rank; an array task's own diverged trials are not an error); diverged
trials beside completed ones are results, not failures. Ctrl-C stops the
trial running (status interrupted) and exits 130 with one line saying where it stopped.
"""

from __future__ import annotations

import sys

# XLA flags and TF's log level must be set before JAX and TF start; user-set values win.
from cnnjax.platform import configure_entry_point

configure_entry_point()

from absl import app, flags  # noqa: E402

from cnnjax.tune.space import sweep_file_parser  # noqa: E402
from cnnjax.utils.cli import (  # noqa: E402
    define_config_file,
    exit_command,
    exit_on_ctrl_c,
    none_override_paths,
    one_line_errors,
    parse_flags,
    start_command,
)

_CONFIG = define_config_file(
    "config", None, "Base experiment config file (ml_collections).", lock_config=True
)
_SWEEP = define_config_file(
    "sweep", None, "Sweep config file: get_config() describes the search space.",
    lock_config=True,
)
# --sweep.metric/mode/seed=... set them also where the sweep file leaves them out
flags.FLAGS[_SWEEP.name].parser = sweep_file_parser(_SWEEP.name)
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Directory for trials and results.")
_TRIAL_INDEX = flags.DEFINE_integer(
    "trial_index", None, "Run only this trial (0-based), e.g. $SLURM_ARRAY_TASK_ID."
)
_TRIAL_COUNT = flags.DEFINE_integer(
    "trial_count", 1, "With --trial_index: run this many consecutive trials from it."
)
_MAX_TRIALS = flags.DEFINE_integer(
    "max_trials", None, "Start at most this many unfinished trials in this invocation."
)
flags.mark_flags_as_required(["config", "sweep", "sweep_dir"])


def main(argv: list[str]) -> None:
    start_command(argv)
    from cnnjax.tune import space as space_lib
    from cnnjax.tune import sweep as sweep_lib

    sweep_config = _SWEEP.value
    # Ctrl-C: one line, as experiments.train, no traceback
    with (exit_on_ctrl_c(lambda: sweep_lib.interruption_message(_SWEEP_DIR.value)),
          one_line_errors()):
        space = space_lib.from_config(sweep_config)
        # an override of a swept field was replaced by each trial's value without a word
        overrides = [*flags.FLAGS[_CONFIG.name].override_values,
                     *none_override_paths(flags.FLAGS, sys.argv, _CONFIG.name)]
        sweep_lib.check_overrides_not_swept(
            overrides, space,
            f"--{_SWEEP.name}={flags.FLAGS[_SWEEP.name].config_filename}", _CONFIG.name)
        rows = sweep_lib.run_sweep(
            _CONFIG.value,
            space,
            _SWEEP_DIR.value,
            metric=sweep_config.get("metric"),
            mode=sweep_config.get("mode"),
            trial_index=_TRIAL_INDEX.value,
            trial_count=_TRIAL_COUNT.value,
            max_trials=_MAX_TRIALS.value,
        )
    if _TRIAL_INDEX.value is not None:  # an array task answers for its own trials only
        first = _TRIAL_INDEX.value
        rows = [r for r in rows if first <= r["index"] < first + _TRIAL_COUNT.value]
    message = sweep_lib.failure_message(rows)
    if not message and _TRIAL_INDEX.value is None:  # other tasks' trials may complete
        message = sweep_lib.no_result_error(rows)
    if message:
        exit_command(f"error: {message}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

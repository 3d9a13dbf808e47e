"""Automated tuning: rounds of sweeps steered by the learning-curve diagnosis (cnnjax.tune.recipe).

    python -m experiments.tune --config=experiments/configs/lenet5_digits.py \\
        --recipe=experiments/recipes/lenet5_digits.py --tune_dir=workdirs/tune/lenet5_digits \\
        [--config.<field>=<value> ...] [--recipe.<field>=<value> ...]

`--config` is the base experiment (any experiment config, with the usual overrides); `--recipe`
is a file whose `get_config()` starts from `cnnjax.tune.recipe.default_recipe()` (metric, lr
range, round-1 steps, max_steps, max_rounds, max_trials, trials_per_round, diagnosis
thresholds); `--recipe.lr_range_test=True` centres round 1's lr grid at the suggestion of a
learning-rate range test run first in <tune_dir>/lr_range/ (`experiments.lr_range_test`).
Round k is a sweep in <tune_dir>/round_<k>/; recipe.json, report.md and tune.png in
<tune_dir> are rewritten after every round. Rerunning the same command skips finished rounds and
trials and resumes an interrupted trial; a tune_dir made with another base config or recipe is
refused (only --recipe.max_rounds may change, e.g. to continue a finished tune).
Exit status 1 if a trial failed (rerun to retry it) or no trial completed (every one diverged:
the tune has no result); diverged trials are otherwise results. Ctrl-C stops the trial running
(status interrupted) and exits 130 with one line naming the round and trial and where it stopped.
"""

from __future__ import annotations

# XLA flags and TF's log level must be set before JAX and TF start; user-set values win.
from cnnjax.platform import configure_entry_point

configure_entry_point()

from absl import app, flags  # noqa: E402

from cnnjax.utils.cli import (  # noqa: E402
    define_config_file,
    exit_command,
    exit_on_ctrl_c,
    one_line_errors,
    parse_flags,
    start_command,
)

_CONFIG = define_config_file(
    "config", None, "Base experiment config file (ml_collections).", lock_config=True
)
_RECIPE = define_config_file(
    "recipe", None, "Recipe config file: get_config() sets the tuning budget and ranges.",
    lock_config=True,
)
_TUNE_DIR = flags.DEFINE_string("tune_dir", None, "Directory for rounds and reports.")
flags.mark_flags_as_required(["config", "recipe", "tune_dir"])


def main(argv: list[str]) -> None:
    start_command(argv)
    from cnnjax.tune import recipe as recipe_lib
    from cnnjax.tune import report as report_lib

    # Ctrl-C: one line naming the round and trial, no traceback; exit status 130
    with (exit_on_ctrl_c(lambda: recipe_lib.interruption_message(_TUNE_DIR.value)),
          one_line_errors()):
        record = recipe_lib.run_tune(_CONFIG.value, _RECIPE.value, _TUNE_DIR.value)
    print(f"Report: {_TUNE_DIR.value}/{report_lib.REPORT_FILE}", flush=True)
    if record["status"] in ("failed", "no_result"):  # a script must not read success
        exit_command(f"error: {record['reason']}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

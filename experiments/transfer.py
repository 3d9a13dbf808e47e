"""From scratch vs fine-tuning vs linear probe at several label budgets of a target task.

    python -m experiments.transfer --transfer=experiments/transfers/<name>.py \\
        --transfer_dir=workdirs/transfers/<name> [--transfer.<field>=<value> ...]

`--transfer` is a file whose `get_config()` holds `source` and `target` (ordinary experiment
configs), `budget_field` (a dotted target field, e.g. `data.train_examples_per_class`), `budgets`,
`arms`, `seeds`, `arm_overrides` and `metric` (unset: the target's `best_metric`); any of it can
be overridden, e.g.
`--transfer.target.num_train_steps=100` or `--transfer.budgets='(5, 50)'`. The source is
pretrained once in <transfer_dir>/trials/source/, then every arm x budget x seed is one
`train_and_evaluate` run in <transfer_dir>/trials/<budget>-<arm>-s<seed>/; results.csv,
results.json, transfer.png and report.md are rewritten after each. Rerunning the same command
skips finished runs and resumes an interrupted one from its checkpoint (a moved or renamed
transfer directory too, given as the new --transfer_dir).
Exit status 1 if a run failed (diverged runs are results, not failures); Ctrl-C stops the run
in progress (status interrupted) and exits 130 with one line naming it and where it stopped.
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

_TRANSFER = define_config_file(
    "transfer", None, "Transfer config file: source, target, budgets, arms, seeds.",
    lock_config=True,
)
_TRANSFER_DIR = flags.DEFINE_string("transfer_dir", None, "Directory for runs and results.")
flags.mark_flags_as_required(["transfer", "transfer_dir"])


def main(argv: list[str]) -> None:
    start_command(argv)
    from cnnjax.transfer import compare

    # Ctrl-C: one line naming the run and where it stopped, no traceback; exit status 130
    with (exit_on_ctrl_c(lambda: compare.interruption_message(_TRANSFER_DIR.value)),
          one_line_errors()):
        source, target, kwargs = compare.transfer_parts(_TRANSFER.value)
        rows = compare.run_transfer(source, target, _TRANSFER_DIR.value, **kwargs)
    message = compare.failure_message(rows, _TRANSFER_DIR.value)
    if message:
        exit_command(f"error: {message}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""The learning-rate range test ("LR finder") of an experiment config (cnnjax.tune.lr_range).

    python -m experiments.lr_range_test --config=experiments/configs/lenet5_digits.py \\
        --workdir=workdirs/lr_range --lr_min=1e-5 --lr_max=10 --steps=100 \\
        [--config.<field>=<value> ...]

Trains the config's model with the engine's own step (its optimizer, momentum, weight decay, batch
size, augmentation) for --steps steps while the learning rate grows exponentially from --lr_min to
--lr_max (the config's schedule and warmup are replaced), stopping early once the smoothed loss
exceeds --divergence_factor times its minimum. Prints the suggested learning rate (the steepest
descent of the smoothed loss), the lr at the minimum and a tenth of it, and writes lr_range.json
and lr_range.png in --workdir. Rerunning the same command reprints the finished test and starts an
interrupted one over (it keeps no checkpoint); other settings in the same workdir are refused (use
a new --workdir, or delete its lr_range.json). Errors end the process with a one-line message.
"""

from __future__ import annotations

# XLA flags and TF's log level must be set before JAX and TF start; user-set values win.
from cnnjax.platform import configure_entry_point

configure_entry_point()

from absl import app, flags  # noqa: E402

from cnnjax.tune import lr_range  # noqa: E402
from cnnjax.utils.cli import (  # noqa: E402
    define_config_file,
    exit_on_ctrl_c,
    one_line_errors,
    parse_flags,
    start_command,
)

_CONFIG = define_config_file(
    "config",
    "experiments/configs/lenet5_digits.py",
    "Path to an ml_collections experiment config file.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for lr_range.json and lr_range.png.")
_LR_MIN = flags.DEFINE_float("lr_min", lr_range.DEFAULT_LR_MIN,
                             "Learning rate of the first step (> 0).")
_LR_MAX = flags.DEFINE_float("lr_max", lr_range.DEFAULT_LR_MAX,
                             "Learning rate of the last step (> lr_min).")
_STEPS = flags.DEFINE_integer("steps", lr_range.DEFAULT_STEPS,
                              "Training steps of the ramp (>= 2).")
_DIVERGENCE_FACTOR = flags.DEFINE_float(
    "divergence_factor", lr_range.DEFAULT_DIVERGENCE_FACTOR,
    "Stop once the smoothed loss exceeds this multiple of its minimum (> 1).")
_SMOOTHING = flags.DEFINE_float(
    "smoothing", lr_range.DEFAULT_SMOOTHING,
    "Weight of the previous average in the loss's bias-corrected exponential moving average "
    "(0 <= smoothing < 1; 0: no smoothing).")
flags.mark_flags_as_required(["workdir"])


def _interrupted_message() -> str:
    return (f"Ctrl-C; the LR range test in {_WORKDIR.value!r} has no checkpoint to resume (its "
            f"{lr_range.RECORD_FILE} records it as interrupted): rerunning the same command "
            "redoes it.")


def main(argv: list[str]) -> None:
    start_command(argv)
    # Ctrl-C: one line, exit status 130, as experiments.train (SIGTERM still exits 143)
    with exit_on_ctrl_c(_interrupted_message), one_line_errors():
        record = lr_range.run_lr_range(
            _CONFIG.value, _WORKDIR.value, lr_min=_LR_MIN.value, lr_max=_LR_MAX.value,
            steps=_STEPS.value, divergence_factor=_DIVERGENCE_FACTOR.value,
            smoothing=_SMOOTHING.value)
    print(lr_range.format_summary(record), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""input_pipeline and profile_step refuse bad flags in one `error:` line before reading data or
compiling (an unknown model was a traceback from create_model; a --json_out or --trace_dir with
a file in the way failed only after the whole run)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, *args):
    return subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("script, args, message", [
    ("input_pipeline", ["--model=resnet19"], "error: --model='resnet19' is invalid; expected a "
                                             "classification model"),
    ("input_pipeline", ["--model=lenet5", "--batch_size=7", "--num_devices=2"],
     "error: --batch_size=7 is invalid; expected a multiple of --num_devices=2"),
    ("input_pipeline", ["--model=lenet5", "--json_out=README.md/bench.json"],
     "error: --json_out's folder="),
    ("profile_step", ["--model=resnet19"], "error: --model='resnet19' is invalid"),
    ("profile_step", ["--model=lenet5", "--trace_dir=README.md/trace"],
     "error: --trace_dir='README.md/trace' is invalid; expected a directory or a path to create"),
])
def test_bad_flags_are_one_line_before_any_work(script, args, message):
    result = _run(script, *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert result.stdout == ""

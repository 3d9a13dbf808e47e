"""benchmarks/conv_transpose.py times both forms and says which one ConvTranspose2D picks."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*flags):
    return subprocess.run([sys.executable, "-m", "benchmarks.conv_transpose", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_prints_both_forms_and_the_choice():
    result = _run("--batch=1", "--size=4", "--channels=2", "--groups=1,depthwise", "--repeats=1")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == ("(1, 4, 4, 2) -> (1, 8, 8, 2), kernel 4, stride 2, groups 1: "
                        "ConvTranspose2D uses the per-phase form here")
    assert lines[3].endswith("groups 2: ConvTranspose2D uses the per-phase form here")
    assert [line.split(":")[0].strip() for line in lines[1:3] + lines[4:]] == [
        "layer default", "input-dilated"] * 2


def test_refuses_a_bad_group_count():
    result = _run("--groups=two", "--repeats=1")
    assert result.returncode != 0
    assert "--groups='two' is invalid; expected positive integers or 'depthwise'" in result.stderr

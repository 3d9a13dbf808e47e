"""benchmarks/device_check.sh refuses an unknown argument before it installs or runs anything."""

import os
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "device_check.sh")


def _run(*arguments: str, out) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *arguments], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out)}, timeout=60)


@pytest.mark.parametrize("argument", ["--partiy", "--help", "parity"])
def test_an_unknown_argument_is_refused_before_any_check(argument, tmp_path):
    out = tmp_path / "out"
    result = _run(argument, out=out)
    assert result.returncode == 2
    assert f"unknown argument '{argument}'" in result.stderr
    assert "--prepare or --parity" in result.stderr
    assert result.stdout == "" and not out.exists()  # no install, no benchmark, no $OUT


def test_a_second_argument_is_refused_not_dropped(tmp_path):
    out = tmp_path / "out"
    result = _run("--parity", "--models=all", out=out)
    assert result.returncode == 2
    assert "takes at most one argument (none, --prepare or --parity), got: --parity " \
           "--models=all" in result.stderr
    assert result.stdout == "" and not out.exists()

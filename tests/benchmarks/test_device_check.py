"""benchmarks/device_check.sh refuses an unknown argument before it installs or runs anything."""

import os
import signal
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


def _stub_python3(tmp_path, body: str) -> dict[str, str]:
    """An environment whose `python3` is a bash script running `body` (for pip and the checks)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / "python3").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_a_checks_printed_figures_reach_the_log_before_a_kill(tmp_path):
    """grep (dropping JAX's log lines) held a check's output in its block buffer: when the
    device tool's timeout killed the whole script, the figures printed so far never reached
    $OUT. A stand-in benchmark prints a figure, waits (up to 20 s) for it to reach the log, then
    kills the script's whole session (its id from /proc: no `ps` needed)."""
    env = _stub_python3(tmp_path, 'if [[ "$*" == *benchmarks.train_step* ]]; then\n'
                        '  echo "round 1/2 jax_auto: 123.4 img/s"\n'
                        '  for _ in $(seq 200); do grep -q 123.4 "$OUT/device_check.log" '
                        '&& break; sleep 0.1; done\n'
                        '  kill -KILL -- -"$(cut -d" " -f6 /proc/$$/stat)"\nfi')
    out = tmp_path / "out"
    result = subprocess.run(["bash", SCRIPT], capture_output=True, text=True,
                            start_new_session=True, env={**env, "OUT": str(out)}, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr  # killed, not run to its end
    log = (out / "device_check.log").read_text()
    assert "round 1/2 jax_auto: 123.4 img/s" in log, log


def test_prepare_writes_nothing_into_git(tmp_path):
    """--prepare appended `/.whl/` to .git/info/exclude, which .gitignore already lists (and
    which is no folder in a worktree). Run on a copy of the script in a fresh repository, with
    a stand-in `python3` for pip's download: only `.whl/` changes, and git ignores it."""
    import shutil

    root = os.path.dirname(os.path.dirname(SCRIPT))
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "benchmarks" / "device_check.sh")
    shutil.copy(os.path.join(root, ".gitignore"), repo / ".gitignore")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    exclude = repo / ".git" / "info" / "exclude"
    before = exclude.read_text() if exclude.exists() else None
    env = _stub_python3(tmp_path, "mkdir -p .whl && touch .whl/stub.whl")
    for _ in range(2):
        result = subprocess.run(["bash", str(repo / "benchmarks" / "device_check.sh"),
                                 "--prepare"], capture_output=True, text=True, env=env,
                                timeout=60)
        assert result.returncode == 0, result.stderr
    assert (exclude.read_text() if exclude.exists() else None) == before
    ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", ".whl/stub.whl"])
    assert ignored.returncode == 0  # .gitignore's /.whl/, as in this repository

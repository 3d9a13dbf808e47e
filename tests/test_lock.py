"""cnnjax.utils.lock: one process per directory, re-entrant within it, no stale locks."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from cnnjax.utils import lock
from cnnjax.utils.lock import DirectoryInUseError, directory_lock
from tests.train.helpers import locked_by_another_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _can_lock_from_another_process(path) -> bool:
    code = ("import sys\nfrom cnnjax.utils.lock import directory_lock, DirectoryInUseError\n"
            "try:\n    with directory_lock(sys.argv[1]): pass\n"
            "except DirectoryInUseError:\n    sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                            cwd=ROOT)  # this checkout's cnnjax, wherever pytest started
    assert result.returncode in (0, 3), result.stderr
    return result.returncode == 0


def test_a_second_process_is_refused_with_the_holders_pid_host_and_command(tmp_path):
    with (locked_by_another_process(tmp_path) as holder,
          pytest.raises(DirectoryInUseError) as err,
          directory_lock(str(tmp_path))):
        pass
    message = str(err.value)
    assert message.startswith(f"workdir: {str(tmp_path)!r} is in use by another run (pid "
                              f"{holder.pid} on host {socket.gethostname()} since ")
    assert "-c" in message and "pass a different --workdir" in message
    assert isinstance(err.value, ValueError)


def test_the_flag_named_in_the_error_is_the_callers(tmp_path):
    with (locked_by_another_process(tmp_path),
          pytest.raises(DirectoryInUseError, match=r"^sweep_dir: .*--sweep_dir\.$"),
          directory_lock(str(tmp_path), "sweep_dir")):
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    with locked_by_another_process(tmp_path) as holder:
        assert not _can_lock_from_another_process(tmp_path)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        with directory_lock(str(tmp_path)):
            info = json.loads((tmp_path / lock.LOCK_FILE).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()


def test_reentrant_in_one_process_and_released_by_the_outermost_exit(tmp_path):
    with directory_lock(str(tmp_path)):
        with directory_lock(str(tmp_path / ".." / tmp_path.name)):  # same real path
            assert not _can_lock_from_another_process(tmp_path)
        assert not _can_lock_from_another_process(tmp_path)  # the outer block still holds it
    assert _can_lock_from_another_process(tmp_path)
    assert lock._held == {}


def test_the_directory_is_created(tmp_path):
    with directory_lock(str(tmp_path / "new" / "run")):
        assert (tmp_path / "new" / "run" / lock.LOCK_FILE).is_file()


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    warnings = []
    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(lock.logging, "warning", lambda msg, *args: warnings.append(msg % args))
    with directory_lock(str(tmp_path)):
        pass
    assert len(warnings) == 1 and "does not support flock" in warnings[0]
    assert lock._held == {}


def test_other_lock_errors_propagate(tmp_path, monkeypatch):
    def broken(fd, operation):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"), directory_lock(str(tmp_path)):
        pass
    assert lock._held == {}


def test_a_file_in_the_way_is_a_clear_error_naming_the_flag(tmp_path):
    (tmp_path / "f").write_text("x")
    for path in (tmp_path / "f", tmp_path / "f" / "run"):
        with (pytest.raises(ValueError, match=r"^sweep_dir='.*' is invalid; expected a "
                                              r"directory or a path to create, but a file is in "
                                              r"the way\.$"),
              directory_lock(str(path), "sweep_dir")):
            pass


@pytest.mark.parametrize("fails", ["makedirs", "open"])
def test_a_directory_that_cannot_be_written_is_a_clear_error_naming_the_flag(tmp_path,
                                                                            monkeypatch, fails):
    """A read-only workdir (or one on a full disk, or another user's) was a bare OSError
    traceback from opening run.lock; now a ValueError naming the flag, path and reason, and
    nothing is left held."""
    target = tmp_path / "run"
    if fails == "makedirs":
        def refuse(name, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", name)

        monkeypatch.setattr(lock.os, "makedirs", refuse)
    else:
        target.mkdir()

        def refuse(name, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", name)

        monkeypatch.setattr(lock, "open", refuse, raising=False)
    with (pytest.raises(lock.DirectoryNotWritableError,
                        match=r"^workdir: '.*run' cannot be written \(Read-only file system: "
                              r"'.*run.*'\); .*pass a different --workdir\.$") as err,
          directory_lock(str(target))):
        pass
    assert isinstance(err.value, ValueError)
    assert lock._held == {}


def test_kind_refuses_another_commands_directory_before_creating_anything(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    with (pytest.raises(ValueError, match=r"^sweep_dir=.* it holds a sweep \(sweep.json\), not a "
                                          r"training run: use a new directory\.$"),
          directory_lock(str(tmp_path), "sweep_dir", kind="training run")):
        pass
    assert not (tmp_path / lock.LOCK_FILE).exists()  # refused before the lock file was made


def test_kind_is_checked_again_once_the_lock_is_held(tmp_path, monkeypatch):
    """A marker written between the first check and the lock (by a sweep holding the lock while
    it writes sweep.json, say) is seen by the second check, made while holding it."""
    check = lock.check_directory_kind
    calls = []

    def check_then_write_marker(path, kind, flag):
        check(path, kind, flag)
        calls.append(kind)
        if len(calls) == 1:
            (tmp_path / "tune.json").write_text("{}")

    monkeypatch.setattr(lock, "check_directory_kind", check_then_write_marker)
    with (pytest.raises(ValueError, match=r"it holds a tune \(tune.json\), not a training run"),
          directory_lock(str(tmp_path), kind="training run")):
        pass
    assert calls == ["training run"]  # the second call raised
    assert _can_lock_from_another_process(tmp_path) and lock._held == {}


def test_hold_false_checks_the_kind_but_takes_no_lock(tmp_path):
    with locked_by_another_process(tmp_path), directory_lock(str(tmp_path), hold=False):
        pass  # a multi-host run's other processes leave the directory to process 0
    (tmp_path / "tune.json").write_text("{}")
    with (pytest.raises(ValueError, match=r"holds a tune"),
          directory_lock(str(tmp_path), kind="training run", hold=False)):
        pass

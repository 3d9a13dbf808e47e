"""One writer per directory: an exclusive advisory lock that a run holds on its workdir.

Two processes training into the same workdir (a SLURM requeue while the old job still runs, a
command started twice, two sweep drivers on one trial) would interleave checkpoints, metrics and
summary.json. `directory_lock(path)` takes `flock(LOCK_EX | LOCK_NB)` on `<path>/run.lock` and
writes who holds it there; a second process is refused at once with a `DirectoryInUseError`
naming that holder. The kernel drops the lock when the holder exits, however it dies (SIGKILL
included), so there are no stale locks to clean up; the file itself stays and means nothing when
unlocked. Nested `directory_lock`s of one path in one process share one lock (re-entrant), so a
sweep can hold a trial's workdir around the engine, which locks it again.

On a file system without `flock` (e.g. Lustre mounted without `-o flock`) the lock is skipped
with a warning: concurrent runs are then not detected.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

from absl import logging

from cnnjax.utils.files import NOT_WRITABLE_HINT, check_directory_kind, check_output_dir

LOCK_FILE = "run.lock"

_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_held: dict[str, list] = {}  # real path -> [file object, depth]
_held_guard = threading.Lock()


class DirectoryInUseError(ValueError):
    """Another process holds the directory's lock (a ValueError: the --workdir given is busy)."""


class DirectoryNotWritableError(ValueError):
    """The directory (or its lock file) cannot be created: a read-only or full file system, or
    missing permissions (a ValueError: the --workdir given is unusable)."""


def _not_writable(flag: str, path: str, err: OSError) -> DirectoryNotWritableError:
    where = f": {err.filename!r}" if err.filename else ""
    return DirectoryNotWritableError(
        f"{flag}: {path!r} cannot be written ({err.strerror or err}{where}); "
        f"{NOT_WRITABLE_HINT}; pass a different --{flag}.")


def _holder(lock_path: str) -> str:
    """`pid P on host H since T: command`, read from the lock file (what the holder wrote)."""
    try:
        with open(lock_path) as f:
            info = json.load(f)
        return (f"pid {info['pid']} on host {info['host']} since {info['since']}: "
                f"{info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its details yet"


@contextlib.contextmanager
def directory_lock(path: str, flag: str = "workdir", *, kind: str | None = None,
                   hold: bool = True) -> Iterator[None]:
    """Holds the exclusive lock on `<path>/run.lock` (creating `path`) for the block.

    Raises `DirectoryInUseError` (naming `flag`, the path and the holder) if another process
    holds it, and `DirectoryNotWritableError` if the directory or its lock file cannot be
    created (e.g. a read-only file system). Re-entrant within a process.

    With `kind` (a key of `files.DIRECTORY_MARKERS`, e.g. "training run") a directory holding
    another command's outputs is refused, before anything is created and again once the lock
    is held: commands write their marker holding the lock, so of two started together on a new
    directory (a sweep and a training run) the second sees the first's marker or is refused.
    `hold=False` (a multi-host run's other processes, which leave the directory to process 0)
    only checks the kind.
    """
    if kind is not None:
        check_directory_kind(path, kind, flag)
    if not hold:
        yield
        return
    with _locked(path, flag):
        if kind is not None:
            check_directory_kind(path, kind, flag)
        yield


@contextlib.contextmanager
def _locked(path: str, flag: str) -> Iterator[None]:
    """`directory_lock`'s lock itself: created, acquired (or re-entered), released."""
    try:
        os.makedirs(check_output_dir(path, flag, writable=False), exist_ok=True)
    except OSError as err:
        raise _not_writable(flag, path, err) from None
    key = os.path.realpath(path)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            acquired = None
        else:
            acquired = _acquire(os.path.join(path, LOCK_FILE), flag, path)
            _held[key] = [acquired, 1]
    try:
        yield
    finally:
        with _held_guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                lock_file = _held.pop(key)[0]
                if lock_file is not None:
                    lock_file.close()  # closing the descriptor releases the flock


@contextlib.contextmanager
def waiting_lock(lock_path: str) -> Iterator[None]:
    """Holds an exclusive flock on the file `lock_path` (created) for a short critical section,
    waiting for another holder, unlike `directory_lock`, which refuses at once; on a file system
    without flock the block runs unlocked, as `directory_lock` does."""
    with open(lock_path, "a") as lock_file:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
        yield  # closing the file releases the lock


def _acquire(lock_path: str, flag: str, path: str) -> TextIO | None:
    """The open, locked lock file with this process's details in it; None if unsupported."""
    try:
        lock_file = open(lock_path, "a+")  # noqa: SIM115 — held open for the lock's lifetime
    except OSError as err:  # read-only, full, not ours: one line, not an OSError traceback
        raise _not_writable(flag, path, err) from None
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise DirectoryInUseError(
            f"{flag}: {path!r} is in use by another run ({_holder(lock_path)}); wait for it to "
            f"finish, stop it, or pass a different --{flag}."
        ) from None
    except OSError as err:
        lock_file.close()
        if err.errno not in _UNSUPPORTED:
            raise
        logging.warning("%s: the file system of %r does not support flock (%s); concurrent runs "
                        "on this directory will not be detected.", flag, path, err.strerror)
        return None
    since = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lock_file.seek(0)
    lock_file.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": since,
               "command": " ".join(sys.argv)}, lock_file)
    lock_file.flush()
    return lock_file

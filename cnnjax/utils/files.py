"""Crash-safe file writes and tolerant reads for run records (JSON, text, figures).

Every record a run, sweep or launcher leaves behind is written to a temporary file next to its
target and renamed over it, so a reader (or a rerun after a kill) never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

#: A temporary file a killed writer left is removed once it is this old (seconds) and its
#: process is gone; the age also spares a live writer in another container with our hostname.
STALE_TEMPORARY_SECONDS = 60.0


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
    """A temp file next to `path`, open for the block and renamed over `path` when it ends
    without an error (removed if it raises): readers never see a half-written file, and
    concurrent writers (processes or threads) each leave a complete one. The data and then the
    rename are fsynced, so after a power loss or a host crash `path` holds the old or the new
    contents, not an empty file (ext4/XFS may commit a rename before the data it points to).

    The temp file is `<path>.<pid>-<thread>@<host>.tmp`; one a SIGKILLed writer on this host
    left behind is removed the next time `path` is written (`remove_stale_temporaries`)."""
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def temporary_path(path: str) -> str:
    """`<path>.<pid>-<thread>@<host>.tmp`: this writer's own temp file for `path`, which
    `remove_stale_temporaries` recognizes once its writer is gone."""
    return f"{path}.{os.getpid()}-{threading.get_ident()}@{_host()}.tmp"


def _host() -> str:
    """This host's name as temp-file names carry it ('@' cannot occur in a hostname)."""
    return socket.gethostname().replace("/", "_")


def _running(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Removes the temp files of `path` that `atomic_file` writers on this host left when they
    were killed mid-write (SIGKILL, the OOM killer): their process is gone and the file is
    older than `STALE_TEMPORARY_SECONDS`. Other hosts' files are left alone (their pids mean
    nothing here). Returns the removed paths."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix, suffix = os.path.basename(path) + ".", f"@{_host()}.tmp"
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid = name[len(prefix):-len(suffix)].split("-", 1)[0]
        stale = os.path.join(directory, name)
        try:
            old = time.time() - os.path.getmtime(stale) > STALE_TEMPORARY_SECONDS
        except OSError:  # removed meanwhile
            continue
        if pid.isdigit() and old and not _running(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(stale)
                removed.append(stale)
    return removed


def _fsync_directory(directory: str) -> None:
    """Makes a rename in `directory` durable; a no-op where directories cannot be opened or
    synced (Windows, some network file systems)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def distinct_name(text: str, replacement: str = "_") -> str:
    """`text` as part of a file name: each run of characters other than letters, digits, '_',
    '.' and '-' becomes `replacement`, and when any did, 8 hex digits of the text's SHA-1
    follow, so texts that read alike (the splits `train[:90%]` and `train[90%:]`) stay apart."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", replacement, text)
    if readable == text:
        return text
    return f"{readable}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def make_parent_dir(path: str | os.PathLike) -> str | os.PathLike:
    """Creates the folder `path` is to be written in (and its parents) if missing; returns
    `path`. Output flags accept a folder still to be made (`check_output_file` checks it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def atomic_write(path: str, text: str) -> None:
    """Writes `text` to `path` through `atomic_file`."""
    with atomic_file(path) as f:
        f.write(text)


def write_json(path: str, record: Any) -> None:
    """`atomic_write` of `record` as indented JSON (NumPy/JAX scalars written as floats)."""
    atomic_write(path, json.dumps(record, indent=2, default=float))


def retire_error_log(workdir: str, name: str = "error.log") -> str | None:
    """After an invocation that succeeded, moves an earlier one's traceback `<workdir>/<name>`
    to `<name without .log>.previous.log` (replacing an older one) so a leftover traceback is
    not read as this run's failure; returns the new path, or None when there was none."""
    path = os.path.join(workdir, name)
    if not os.path.isfile(path):
        return None
    kept = os.path.join(workdir, f"{name.removesuffix('.log')}.previous.log")
    os.replace(path, kept)
    return kept


def read_json(path: str) -> Any:
    """The JSON value in `path`, or None if it is missing or unreadable (cut short by a kill)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_figure(fig: Any, path: str, dpi: int = 100) -> str:
    """Saves a matplotlib figure to `path` atomically, closes it and returns `path`."""
    import matplotlib.pyplot as plt

    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=dpi, format=os.path.splitext(path)[1].lstrip(".") or "png")
    plt.close(fig)
    return path


# The record file each command leaves at the top of its directory (loop.CONFIG_FILE,
# sweep.SWEEP_FILE, recipe.TUNE_FILE, compare.TRANSFER_FILE, lr_range.RECORD_FILE).
DIRECTORY_MARKERS = {"training run": "config.json", "sweep": "sweep.json", "tune": "tune.json",
                     "transfer comparison": "transfer.json",
                     "learning-rate range test": "lr_range.json"}


def check_outside_run(path: str, workdir: str, flag: str, *, folder: bool) -> None:
    """Refuses (a ValueError naming `flag`) an output that would land among a training run's own
    files: the workdir itself (`folder`) or a file directly in it (its config.json,
    summary.json, metrics.jsonl), or anything under its checkpoints. A command that reads a run
    (evaluate, rcnn_svm) overwrote them when pointed there, and the run could no longer be
    evaluated or resumed. The run's subfolders (eval/, visualize/, rcnn_svm/) are fine."""
    target, run = os.path.realpath(path), os.path.realpath(workdir)
    checkpoints = os.path.join(run, "checkpoints")  # checkpoint.CHECKPOINT_DIR
    home = target if folder else os.path.dirname(target)
    if home == run or target == checkpoints or target.startswith(checkpoints + os.sep):
        raise ValueError(f"{flag}={path!r} is invalid; it would write among the run's own files "
                         f"in {workdir!r} (its config, summary and checkpoints): use a subfolder "
                         "or another directory.")


def check_directory_kind(path: str, kind: str, flag: str) -> None:
    """Refuses `path` (a ValueError naming `flag`) when it holds another command's outputs, e.g.
    a sweep aimed at a training run's workdir: their results and trials would mix."""
    for other, marker in DIRECTORY_MARKERS.items():
        if other != kind and os.path.exists(os.path.join(path, marker)):
            raise ValueError(f"{flag}={path!r} is invalid; it holds a {other} ({marker}), not a "
                             f"{kind}: use a new directory.")


#: What a folder nothing can be created in needs to be, for the errors that refuse one.
NOT_WRITABLE_HINT = ("expected a directory this process can create files in (is the file system "
                     "read-only or full, or the directory another user's?)")


def check_output_dir(path: str, label: str, *, writable: bool = True) -> str:
    """Refuses (a ValueError naming `label`, e.g. `--output_dir`) an output folder `path` that could
    not be created because a file is in its way (at `path` or a parent), creating nothing;
    returns `path`. Commands call it before their work, so the error comes at once, not after.
    An empty path (e.g. `--workdir=$WORKDIR` with the variable unset) is refused too.

    With `writable` it also refuses a folder nothing can be created in (a read-only file system,
    another user's directory, /proc): an empty folder is made and removed in `path`, or in its
    nearest existing parent, as the probe."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{label}={path!r} is invalid; expected a directory path.")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise ValueError(f"{label}={path!r} is invalid; expected a directory or a path to "
                         "create, but a file is in the way.")
    if writable and os.path.isdir(probe):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".cnnjax-write-check-", dir=probe))
        except OSError as err:
            raise ValueError(
                f"{label}={path!r} is invalid; nothing can be created in {probe!r} "
                f"({err.strerror or err}); {NOT_WRITABLE_HINT}") from None
    return path


def check_figure_path(path: str, label: str) -> str:
    """Refuses (a ValueError naming `label`, e.g. `--output`) a figure file `path` that could not
    be written: an extension matplotlib cannot save, a directory at `path`, or a file in the way
    of its folder; returns `path`. Commands call it before their work, not after it."""
    from matplotlib.figure import Figure

    formats = sorted(Figure().canvas.get_supported_filetypes())
    extension = os.path.splitext(str(path))[1].lstrip(".").lower()
    if extension not in formats:
        raise ValueError(f"{label}={path!r} is invalid; expected a file name ending in an image "
                         f"format matplotlib writes, one of {formats} (e.g. erf.png)")
    return check_output_file(path, label, label)


def check_output_file(path: str, label: str, folder_label: str) -> str:
    """Refuses (a ValueError naming `label`) an output file `path` that is a directory, and (naming
    `folder_label`) one whose folder could not be created (`check_output_dir`); returns `path`."""
    if os.path.isdir(path):
        raise ValueError(f"{label}={path!r} is invalid; it is a directory, expected a file name")
    check_output_dir(os.path.dirname(os.path.abspath(path)), folder_label)
    return path


def same_directory(a: Any, b: Any) -> bool:
    """Whether two paths name the same existing directory, however spelled (a symlink, shared
    storage mounted under another path); False if either is unset or gone."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return os.path.isdir(b) and os.path.samefile(a, b)
    except OSError:
        return False

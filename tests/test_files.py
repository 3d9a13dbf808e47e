"""cnnjax.utils.files: atomic writes leave whole files only; tolerant reads."""

import json
import os
import signal
import subprocess
import sys
import time

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cnnjax.utils import files  # noqa: E402


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "a.txt")
    files.atomic_write(path, "one")
    files.atomic_write(path, "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_write_json_round_trips_and_numpy_scalars_become_floats(tmp_path):
    import numpy as np

    path = str(tmp_path / "r.json")
    files.write_json(path, {"x": np.float32(0.5), "y": [1, "b"]})
    assert files.read_json(path) == {"x": 0.5, "y": [1, "b"]}


def test_read_json_of_a_missing_or_truncated_file_is_none(tmp_path):
    assert files.read_json(str(tmp_path / "missing.json")) is None
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps({"a": 1})[:-2])
    assert files.read_json(str(cut)) is None


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert files.save_figure(fig, str(tmp_path / "f.png")) == str(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert os.listdir(tmp_path) == ["f.png"]


def test_atomic_file_leaves_the_old_file_and_no_temporary_when_the_writer_fails(tmp_path):
    import pytest

    path = str(tmp_path / "a.bin")
    with files.atomic_file(path, "wb") as f:
        f.write(b"old")
    with (pytest.raises(RuntimeError, match="^killed mid-write$"),
          files.atomic_file(path, "wb") as f):
        f.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "a.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_a_directory_of_another_command_is_refused(tmp_path):
    from cnnjax.utils.files import check_directory_kind

    (tmp_path / "config.json").write_text("{}")  # a training run's workdir
    check_directory_kind(str(tmp_path), "training run", "workdir")  # its own kind: fine
    check_directory_kind(str(tmp_path / "new"), "sweep", "sweep_dir")  # nothing there yet
    with pytest.raises(ValueError, match=r"^sweep_dir='.*' is invalid; it holds a training run "
                                         r"\(config.json\), not a sweep: use a new directory\.$"):
        check_directory_kind(str(tmp_path), "sweep", "sweep_dir")


def test_an_output_folder_behind_a_file_is_refused_and_nothing_is_created(tmp_path):
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "file", tmp_path / "file" / "x" / "y"):
        with pytest.raises(ValueError, match=r"^--out=.* is invalid; expected a directory or a "
                                             r"path to create, but a file is in the way\.$"):
            files.check_output_dir(str(path), "--out")
    assert files.check_output_dir(str(tmp_path / "new" / "x"), "--out") == str(tmp_path / "new/x")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_folder_nothing_can_be_created_in_is_refused_by_its_flag(tmp_path):
    """`--sweep_dir=/proc/x` (and a read-only file system) passed the check and failed later
    with a bare OS error naming the path but not the flag; the folder is now probed by creating
    (and removing) an empty one. A read-only data_dir, which is only read, is not probed."""
    with pytest.raises(ValueError, match=r"^--out='/proc/x/y' is invalid; nothing can be created "
                                         r"in '/proc' \(.*\); expected a directory this process "
                                         r"can create files in \(is the file system read-only"):
        files.check_output_dir("/proc/x/y", "--out")
    assert files.check_output_dir("/proc/x/y", "data_dir", writable=False) == "/proc/x/y"
    assert files.check_output_dir(str(tmp_path), "--out") == str(tmp_path)
    assert os.listdir(tmp_path) == []  # the probe is gone


def test_an_earlier_traceback_is_kept_aside_after_a_success(tmp_path):
    assert files.retire_error_log(str(tmp_path)) is None
    (tmp_path / "error.log").write_text("old traceback")
    (tmp_path / "error.previous.log").write_text("older traceback")
    kept = files.retire_error_log(str(tmp_path))
    assert kept == str(tmp_path / "error.previous.log")
    assert sorted(os.listdir(tmp_path)) == ["error.previous.log"]
    assert (tmp_path / "error.previous.log").read_text() == "old traceback"
    (tmp_path / "error.process1.log").write_text("process 1's")
    assert files.retire_error_log(str(tmp_path), "error.process1.log") == str(
        tmp_path / "error.process1.previous.log")


@pytest.mark.parametrize("path", ["", "   "])
def test_an_empty_output_folder_is_refused(path):
    """`--workdir=$WORKDIR` with the variable unset reached os.makedirs('')."""
    with pytest.raises(ValueError, match=r"^--workdir='\s*' is invalid; expected a directory "
                                         r"path\.$"):
        files.check_output_dir(path, "--workdir")


def test_a_figure_path_that_could_not_be_written_is_refused_before_the_work(tmp_path):
    """The effective-receptive-field CLI computed for ~20 s and then died in matplotlib on
    --output=erf.txt, or on a folder with a file in its way."""
    from cnnjax.utils.files import check_figure_path

    assert check_figure_path(str(tmp_path / "new" / "erf.png"), "--output").endswith("erf.png")
    assert not (tmp_path / "new").exists()  # nothing created
    with pytest.raises(ValueError, match=r"^--output='erf.txt' is invalid; expected a file name "
                                         r"ending in an image format matplotlib writes, one of "
                                         r"\[.*'png'.*\] \(e.g. erf.png\)$"):
        check_figure_path("erf.txt", "--output")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"^--output='.*' is invalid; expected a directory or a "
                                         r"path to create, but a file is in the way"):
        check_figure_path(str(tmp_path / "a_file" / "erf.png"), "--output")
    (tmp_path / "plots.png").mkdir()
    with pytest.raises(ValueError, match=r"is invalid; it is a directory, expected a file name"):
        check_figure_path(str(tmp_path / "plots.png"), "--output")


def test_make_parent_dir_creates_the_folders_of_a_path_and_returns_it(tmp_path):
    path = str(tmp_path / "a" / "b" / "table.csv")
    assert files.make_parent_dir(path) == path
    assert os.path.isdir(tmp_path / "a" / "b") and not os.path.exists(path)
    assert files.make_parent_dir(path) == path  # an existing folder is fine
    assert files.make_parent_dir("table.csv") == "table.csv"  # the current folder: nothing made


def test_atomic_file_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """A rename committed before its data leaves an empty file after a power loss (ext4's
    delayed allocation); nothing was fsynced before."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((os.path.basename(target), os.fstat(fd).st_size,
                       (tmp_path / "a.txt").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    files.atomic_write(str(tmp_path / "a.txt"), "12345")
    tmp_name = os.path.basename(files.temporary_path(str(tmp_path / "a.txt")))
    assert synced[0] == (tmp_name, 5, False)  # the whole data, before the rename
    assert synced[1][0] == tmp_path.name and synced[1][2]  # the folder, after it
    assert len(synced) == 2


def _dead_pid() -> int:
    """The pid of a process that has already exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _aged(path, seconds: float = files.STALE_TEMPORARY_SECONDS + 5):
    """Sets `path`'s mtime `seconds` in the past."""
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_a_temporary_a_sigkilled_writer_left_is_removed_at_the_next_write(tmp_path):
    """A writer killed inside `atomic_file` left `<path>.<pid>-<thread>@<host>.tmp` for good."""
    path = tmp_path / "summary.json"
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from cnnjax.utils import files\n"
         f"with files.atomic_file({str(path)!r}) as f:\n"
         "    f.write('half'); f.flush(); print('writing', flush=True); time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    (left,) = os.listdir(tmp_path)
    assert left.startswith(f"summary.json.{writer.pid}-") and left.endswith(".tmp")
    _aged(tmp_path / left)
    files.write_json(str(path), {"status": "completed"})
    assert os.listdir(tmp_path) == ["summary.json"]
    assert files.read_json(str(path)) == {"status": "completed"}


def test_only_old_temporaries_of_gone_writers_on_this_host_are_removed(tmp_path):
    path = str(tmp_path / "r.json")
    host = files.temporary_path(path).rsplit("@", 1)[1].removesuffix(".tmp")
    dead, alive = _dead_pid(), os.getppid()
    old = files.STALE_TEMPORARY_SECONDS + 5

    def make(name: str, age: float = old):
        (tmp_path / name).write_text("x")
        return _aged(tmp_path / name, age)

    removed = make(f"r.json.{dead}-7@{host}.tmp")
    keep = {
        make(f"r.json.{alive}-7@{host}.tmp").name,  # its writer still runs
        make(f"r.json.{dead}-8@{host}.tmp", age=0).name,  # too recent to judge
        make(f"r.json.{dead}-7@other-{host}.tmp").name,  # another host's pid
        make(f"q.json.{dead}-7@{host}.tmp").name,  # another file's
        make("r.json.notes@x.tmp").name,  # not a writer's name
    }
    assert files.remove_stale_temporaries(path) == [str(removed)]
    assert set(os.listdir(tmp_path)) == keep

"""The test session's compilation cache is kept only in a directory the current user alone owns."""

import os
import stat

import pytest

from tests.compilation_cache import CACHE_NAME, private_cache_dir

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="giving a directory away needs root")


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_new_cache_is_made_private(tmp_path):
    path = private_cache_dir(str(tmp_path))
    assert path == str(tmp_path / CACHE_NAME)
    assert _mode(path) == 0o700


def test_an_own_cache_is_kept_and_its_group_and_other_permissions_removed(tmp_path):
    own = tmp_path / CACHE_NAME
    own.mkdir()
    (own / "entry").write_bytes(b"compiled")
    own.chmod(0o777)
    assert private_cache_dir(str(tmp_path)) == str(own)
    assert _mode(own) == 0o700
    assert (own / "entry").read_bytes() == b"compiled"


def test_a_link_in_place_of_the_cache_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / CACHE_NAME).symlink_to(elsewhere)
    path = private_cache_dir(str(tmp_path))
    assert path == str(tmp_path / f"{CACHE_NAME}-{os.getuid()}")
    assert _mode(path) == 0o700


def test_a_file_in_place_of_both_names_gives_a_fresh_private_dir(tmp_path):
    (tmp_path / CACHE_NAME).write_text("")
    (tmp_path / f"{CACHE_NAME}-{os.getuid()}").write_text("")
    path = private_cache_dir(str(tmp_path))
    assert os.path.dirname(path) == str(tmp_path)
    assert os.path.basename(path).startswith(f"{CACHE_NAME}-")
    assert stat.S_ISDIR(os.lstat(path).st_mode) and _mode(path) == 0o700


@needs_root
def test_a_cache_another_user_made_is_not_used_nor_changed(tmp_path):
    theirs = tmp_path / CACHE_NAME
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    path = private_cache_dir(str(tmp_path))
    assert path == str(tmp_path / f"{CACHE_NAME}-{os.getuid()}")
    assert os.lstat(theirs).st_uid == 65534 and _mode(theirs) == 0o755

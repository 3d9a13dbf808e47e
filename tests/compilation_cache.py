"""Where the test session keeps XLA's persistent compilation cache and its tfds data dir:
directories kept across runs (a warm cache halves the default suite's time; the offline datasets
are generated once) that only the current user can write, since JAX runs the executables it finds
there and the tests trust the records they read."""

import os
import stat
import tempfile

CACHE_NAME = "cnnjax_test_jax_cache"
TFDS_DIR_NAME = "cnnjax_test_tfds"


def is_private_dir(path: str) -> bool:
    """Makes `path` a directory (mode 0700) if it is absent; True when it is then a real
    directory (not a link) owned by this user, whose group/other permissions are removed."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(info.st_mode) & 0o700)
    return True


def private_dir(name: str, base: str | None = None) -> str:
    """`<base>/<name>` if this user owns it (or can make it), else a per-user
    `<base>/<name>-<uid>`, else a fresh private temp dir; base is `$TMPDIR`."""
    base = tempfile.gettempdir() if base is None else base
    for path in (os.path.join(base, name), os.path.join(base, f"{name}-{os.getuid()}")):
        if is_private_dir(path):
            return path
    return tempfile.mkdtemp(prefix=f"{name}-", dir=base)


def private_cache_dir(base: str | None = None) -> str:
    """The compilation cache's `private_dir`, `<base>/cnnjax_test_jax_cache`."""
    return private_dir(CACHE_NAME, base)

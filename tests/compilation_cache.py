"""Where the test session keeps XLA's persistent compilation cache: a directory kept across runs
(a warm cache halves the default suite's time) that only the current user can write, since JAX
runs the executables it finds there."""

import os
import stat
import tempfile

CACHE_NAME = "cnnjax_test_jax_cache"


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


def private_cache_dir(base: str | None = None) -> str:
    """`<base>/cnnjax_test_jax_cache` if this user owns it (or can make it), else a per-user
    `<base>/cnnjax_test_jax_cache-<uid>`, else a fresh private temp dir; base is `$TMPDIR`."""
    base = tempfile.gettempdir() if base is None else base
    for path in (os.path.join(base, CACHE_NAME), os.path.join(base, f"{CACHE_NAME}-{os.getuid()}")):
        if is_private_dir(path):
            return path
    return tempfile.mkdtemp(prefix=f"{CACHE_NAME}-", dir=base)

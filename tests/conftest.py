"""Test-session setup: cnnjax's XLA CPU defaults, a faster-compiling LLVM level, and one shared
XLA compilation cache, all set before any test module starts a JAX backend.

`configure_cpu_defaults()` only adds flags absent from `XLA_FLAGS` (yours win). docs/performance.md
has the measurements (e.g. VGG-16 forward passes at 224x224, which the slow tests run, take ~1.8x
less CPU time). The tests compile hundreds of small programs and run each a few times, so most of
their time is compilation: LLVM's optimization level 1 instead of XLA's default 2 took
`tests/models` from 546 s to 381 s on 2 cores (level 0 was as fast overall but made AlexNet's
backward pass 4x slower to run). XLA's persistent cache then serves programs that several tests or
processes compile alike (the engine's tiny steps; tests/models 546 -> 505 s starting empty).
On jaxlib < 0.11 the legacy loop emitters halve a small program's ~45 ms compile (tests/layers
from an empty cache: 147 -> 99 s). Subprocesses started by tests inherit all of it through the
environment.
"""

import os
import signal
from importlib.metadata import version

from cnnjax.platform import CPU_DEFAULT_FLAGS, configure_cpu_defaults, quiet_tensorflow_info
from tests.compilation_cache import TFDS_DIR_NAME, private_cache_dir, private_dir

TEST_XLA_FLAGS = {**CPU_DEFAULT_FLAGS, "xla_backend_optimization_level": "1"}
if tuple(int(part) for part in version("jaxlib").split(".")[:2]) < (0, 11):
    # jaxlib 0.11 removed the flag, and XLA aborts on an unknown flag
    TEST_XLA_FLAGS["xla_cpu_use_fusion_emitters"] = "false"
configure_cpu_defaults(TEST_XLA_FLAGS)
# TF's C++ INFO lines off, as every `experiments.*` entry point does, for the whole session and
# its subprocesses alike (a test module setting it at import made a subprocess's stderr depend on
# which files were collected).
quiet_tensorflow_info()

# JAX reads these when it is imported, here and in every subprocess a test starts (the tests
# build subprocess environments from os.environ); a value you set wins.
# The cache is kept across runs in a directory only this user can write (JAX runs what it finds).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = private_cache_dir()
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# The tests are CPU tests (XLA CPU flags above; the benchmark scripts' tests expect the CPU as
# the default backend), so a machine with a GPU runs them on its CPU too; a value you set wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Hermetic: tfds's default data dir is the user's ~/tensorflow_datasets (or $TFDS_DATA_DIR, perhaps
# a read-only shared store); the tests generate cnnjax's offline datasets into their own dir
# instead, kept across runs. A test passed only when ~/tensorflow_datasets/digits already existed
# (tfds's build banner reached a refusal's stdout), and tests wrote ~28 MB into the user's HOME.
# Catalogue datasets are always mocked (`tfds.testing.mock_data`). Set before tfds is imported.
os.environ["TFDS_DATA_DIR"] = private_dir(TFDS_DIR_NAME)

# Inside a SLURM allocation (`salloc`, an sbatch job) the SLURM_* variables would make every
# training subprocess a test starts try to join a multi-process JAX job; the tests that launch
# SLURM jobs set the variables they need themselves.
for _name in [name for name in os.environ if name.startswith("SLURM_")]:
    del os.environ[_name]

# torchvision 0.29 segfaults when imported after TensorFlow 2.21 (the other order works), and
# test modules import TensorFlow through cnnjax.data long before the torchvision tests run.
# Only where the optional `torchvision` extra is installed (CI installs it when it can).
import importlib.util  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

if importlib.util.find_spec("torchvision") is not None:
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # noqa: BLE001 — a broken install (e.g. a disk filled mid-install)
        warnings.warn(f"torchvision is installed but does not import ({err!r}); the tests that "
                      "compare against PyTorch skip", stacklevel=1)
        sys.modules["torch"] = sys.modules["torchvision"] = None  # `import torch` -> ImportError


def pytest_terminal_summary(terminalreporter) -> None:
    """Names the tests skipped for want of PyTorch/torchvision, the optional independent
    reference, so a local `make test` does not pass them over in silence."""
    skipped = [report for report in terminalreporter.stats.get("skipped", [])
               if "torch" in str(report.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} tests comparing against PyTorch/torchvision were skipped (not "
            "installed): pip install -e '.[test,torchvision]' runs them, as CI does.",
            yellow=True)


def pytest_sessionfinish(session) -> None:
    """An xdist worker ignores SIGINT once its tests are done: execnet SIGINTs a worker still
    busy 5 s after being told to exit, and a worker's end-of-session garbage collection (pytest
    runs gc twice there) can take that long on 2 cores, so the KeyboardInterrupt landed in a
    weakref callback and was reported as an unraisable-exception warning after the last test.
    A worker that really hangs is still killed by xdist after its own timeout."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def pytest_runtest_teardown(item) -> None:
    """Closes the pyplot figures a test left open (tests inspect the figures cnnjax's
    `*_figure` functions return, which the library's callers save and close): an xdist worker
    that ran many of them passed matplotlib's 20-open-figures limit, a RuntimeWarning in the
    summary. Only where pyplot is already imported, so no test pays for importing it."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")

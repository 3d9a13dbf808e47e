"""Test-session setup: run under the same fast XLA CPU defaults as cnnjax's entry points.

`configure_cpu_defaults()` only adds flags absent from `XLA_FLAGS` (yours win) and runs here,
before any test module starts a JAX backend. docs/performance.md has the measurements (e.g. VGG-16
forward passes at 224x224, which the slow tests run, take ~1.8x less CPU time).
Subprocesses started by tests inherit the flags through the environment.
"""

from cnnjax.platform import configure_cpu_defaults

configure_cpu_defaults()

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

"""Test-session setup: run under the same fast XLA CPU defaults as cnnjax's entry points.

`configure_cpu_defaults()` only adds flags absent from `XLA_FLAGS` (yours win) and runs here,
before any test module starts a JAX backend. docs/performance.md has the measurements (e.g. VGG-16
forward passes at 224x224, which the slow tests run, take ~1.8x less CPU time).
Subprocesses started by tests inherit the flags through the environment.
"""

from cnnjax.platform import configure_cpu_defaults

configure_cpu_defaults()

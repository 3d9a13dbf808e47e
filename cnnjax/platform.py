"""Process settings cnnjax's entry points opt into before JAX and TensorFlow start.

XLA reads `XLA_FLAGS` once, when JAX creates its first backend. Some of XLA:CPU's defaults are
slow for convolutional training here (docs/performance.md has the measurements), so the
experiment script, the benchmarks and the test session call `configure_cpu_defaults()` first.
Importing cnnjax never does: a library import must not change process-wide state.

The function only *adds* flags: a flag the user already named in `XLA_FLAGS` (with any value)
is left as it is, and `CNNJAX_CPU_DEFAULTS=0` turns the whole thing off. `quiet_tensorflow_info()`
likewise sets TensorFlow's C++ log threshold only when the user has not; the experiment commands
run both through `configure_entry_point()`.
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from collections.abc import Mapping, MutableMapping

#: Flags `configure_cpu_defaults` adds when absent, with why (measured in docs/performance.md).
#: `xla_cpu_experimental_ynn_fusion_type=` (empty list): turns off XLA:CPU's YNNPACK library
#: fusions (jaxlib 0.10): never slower here, 1.25-1.9x less CPU time on large activations
#: (VGG-16 forward at 224, ResNet-18 at 128x128 or with a CIFAR stem). Nothing else helped.
CPU_DEFAULT_FLAGS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "",
}

#: Set to "0" (or "false"/"no"/"off") to make `configure_cpu_defaults` a no-op.
OPT_OUT_ENV = "CNNJAX_CPU_DEFAULTS"

#: TensorFlow's C++ log threshold, read once when TensorFlow is imported. cnnjax only uses TF for
#: the input pipeline, and at "1" TF drops its INFO lines (the CPU-instructions notice, tf.data's
#: buffer notes) while keeping warnings and errors.
TF_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
TF_LOG_LEVEL_QUIET = "1"
_FALSY = ("0", "false", "no", "off")


def parse_xla_flags(value: str) -> dict[str, str | None]:
    """Maps each flag named in an `XLA_FLAGS` string to its value (None for a bare `--flag`).

    Tokens are split like a shell would (XLA accepts quoted values); anything not starting with
    `--` is ignored, as XLA itself only reads `--name[=value]` tokens.
    """
    try:
        tokens = shlex.split(value)
    except ValueError:  # an unbalanced quote: fall back to plain whitespace splitting
        tokens = value.split()
    flags: dict[str, str | None] = {}
    for token in tokens:
        if not token.startswith("--"):
            continue
        name, sep, flag_value = token[2:].partition("=")
        if name:
            flags[name] = flag_value if sep else None
    return flags


def jax_backend_initialized() -> bool:
    """True when JAX has already created a backend, so new `XLA_FLAGS` would be ignored."""
    if "jax" not in sys.modules:  # nothing can have started without importing jax
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - jax moved its internals; assume the worst
        return True
    checker = getattr(xla_bridge, "backends_are_initialized", None)
    return True if checker is None else bool(checker())


def _format_flag(name: str, value: str) -> str:
    return f"--{name}={shlex.quote(value) if value else ''}"


def configure_cpu_defaults(
    flags: Mapping[str, str] | None = None,
    *,
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, str]:
    """Adds to `XLA_FLAGS` each of `flags` (default `CPU_DEFAULT_FLAGS`) the user has not set.

    Call it at the top of an entry point, before anything runs a JAX computation. Returns the
    flags it added, `{name: value}` (empty when there was nothing to add, the user opted out with
    `CNNJAX_CPU_DEFAULTS=0`, `XLA_FLAGS` names a flags file (a value not starting with `-`,
    which XLA reads as a path: appending to it would break it), or it was too late). If JAX's
    backend is already initialized the flags could no longer take effect, so it warns
    (`RuntimeWarning`) and changes nothing.
    Calling it twice adds nothing the second time. `environ` (default `os.environ`) is for tests
    and for building a subprocess environment; an explicit mapping is edited whatever the state
    of this process's backend.
    """
    env = os.environ if environ is None else environ
    wanted = dict(CPU_DEFAULT_FLAGS if flags is None else flags)
    if env.get(OPT_OUT_ENV, "1").strip().lower() in _FALSY:
        return {}
    current = env.get("XLA_FLAGS", "")
    if current.strip() and not current.lstrip().startswith("-"):
        return {}  # XLA reads such a value as the path of a file of flags: the user's own set
    already = parse_xla_flags(current)
    added = {name: value for name, value in wanted.items() if name not in already}
    if not added:
        return {}
    if environ is None and jax_backend_initialized():  # an explicit mapping is not XLA's
        warnings.warn(
            "cnnjax.platform.configure_cpu_defaults: the JAX backend is already initialized, so "
            f"XLA_FLAGS can no longer change; not adding {sorted(added)}. Call it before the first "
            "JAX computation (or set XLA_FLAGS in the environment).",
            RuntimeWarning,
            stacklevel=2,
        )
        return {}
    extra = " ".join(_format_flag(name, value) for name, value in added.items())
    env["XLA_FLAGS"] = f"{current} {extra}".strip()
    return added


def quiet_tensorflow_info(environ: MutableMapping[str, str] | None = None) -> bool:
    """Sets `TF_CPP_MIN_LOG_LEVEL=1` (TF's C++ INFO lines off) unless the user set it.

    Returns whether it set it. It only takes effect before TensorFlow is imported, so like
    `configure_cpu_defaults` it belongs at the top of an entry point. (TF's `oneDNN custom
    operations are on` banner ignores this variable; it cannot be silenced without turning
    oneDNN off, which cnnjax does not do.)
    """
    env = os.environ if environ is None else environ
    if TF_LOG_LEVEL_ENV in env:
        return False
    env[TF_LOG_LEVEL_ENV] = TF_LOG_LEVEL_QUIET
    return True


def configure_entry_point() -> dict[str, str]:
    """What every `experiments.*` command runs first: `configure_cpu_defaults()` and
    `quiet_tensorflow_info()`. Returns the XLA flags it added (see `configure_cpu_defaults`)."""
    quiet_tensorflow_info()
    return configure_cpu_defaults()

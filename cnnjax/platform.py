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


def read_xla_flags(value: str) -> tuple[dict[str, str | None], str]:
    """The flags XLA reads from an `XLA_FLAGS` string, `{name: value}` (None for a bare
    `--flag`), and the text it leaves unread ('' when it reads it all).

    Read as XLA's own parser reads it (`parse_flags_from_env.cc`): whitespace-separated tokens
    while each starts with '-'; a value that opens with a quote right after '=' runs to the
    closing quote (a backslash escapes the next character inside double quotes) and may hold
    spaces. The first token not starting with '-' (a stray word, a bool flag's separate value)
    ends the reading, and XLA ignores everything from there on without a word.
    """
    flags: dict[str, str | None] = {}
    position, size = 0, len(value)
    while True:
        while position < size and value[position].isspace():
            position += 1
        if position == size or value[position] != "-":
            return flags, value[position:]
        end = position
        while end < size and (value[end] in "-_" or (value[end].isascii()
                                                     and value[end].isalnum())):
            end += 1
        token_name = value[position:end]
        if end + 1 < size and value[end] == "=" and value[end + 1] in "'\"":
            quote, end, chars = value[end + 1], end + 2, []
            while end < size and value[end] != quote:
                if quote == '"' and value[end] == "\\" and end + 1 < size:
                    end += 1
                chars.append(value[end])
                end += 1
            end = min(end + 1, size)  # past the closing quote, if there is one
            name = token_name[2:] if token_name.startswith("--") else ""
            flag_value: str | None = "".join(chars)
        else:  # the token runs to the next whitespace: --name, --name=value
            while end < size and not value[end].isspace():
                end += 1
            token = value[position:end]
            name, sep, text = token[2:].partition("=") if token.startswith("--") else ("", "", "")
            flag_value = text if sep else None
        if name:
            flags[name] = flag_value
        position = end


def parse_xla_flags(value: str) -> dict[str, str | None]:
    """Maps each flag XLA reads from an `XLA_FLAGS` string to its value (None for a bare
    `--flag`): `read_xla_flags` without the unread text."""
    return read_xla_flags(value)[0]


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
    """`--name=value`, the value double-quoted (XLA's quoting, `read_xla_flags`) when it holds
    whitespace or starts with a quote."""
    if any(c.isspace() for c in value) or value[:1] in ("'", '"'):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'--{name}="{escaped}"'
    return f"--{name}={value}"


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
    A flag counts as set when XLA reads it (`read_xla_flags`); where XLA stops reading before the
    end (a stray word), the flags go before that word, with a `RuntimeWarning`.
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
    already, unread = read_xla_flags(current)
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
    if unread:
        # XLA stops reading at `unread`: flags appended after it would be ignored, so they go
        # first (none of them is set by the user, so no precedence changes).
        warnings.warn(
            f"cnnjax.platform.configure_cpu_defaults: XLA stops reading XLA_FLAGS at "
            f"{unread.split()[0]!r} (not a --flag) and ignores the rest, {unread!r}; the cnnjax "
            "defaults are put before it.", RuntimeWarning, stacklevel=2)
        env["XLA_FLAGS"] = f"{extra} {current}".strip()
    else:
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

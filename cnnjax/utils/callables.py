"""Functions and classes in configs, written by import path: `config.model_kwargs.act =
jax.nn.gelu` is saved in config.json as "callable:jax.nn.gelu", compared as that on a rerun and
imported back when a run is reloaded (a repr such as "<function gelu at 0x7f...>" differs in
every process and cannot be rebuilt)."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

PREFIX = "callable:"

#: Public modules tried first, so a name survives a library moving its private module.
_PUBLIC_MODULES = ("jax.nn", "flax.linen", "jax.numpy")


def is_callable_value(value: Any) -> bool:
    """True for a function or class as a config value (plain values and config nodes are not
    callable)."""
    return callable(value)


def import_path(path: str) -> Any:
    """The object at dotted `path` (a module, then attributes), or None if there is none."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def callable_path(fn: Any) -> str | None:
    """A dotted import path that gives back `fn` itself, or None (a lambda, a local function,
    an object without a name)."""
    name, module = getattr(fn, "__qualname__", None), getattr(fn, "__module__", None)
    if not isinstance(name, str) or not isinstance(module, str) or "<" in name:
        return None
    for public in _PUBLIC_MODULES:
        if "." not in name and import_path(f"{public}.{name}") is fn:
            return f"{public}.{name}"
    path = f"{module}.{name}"
    return path if import_path(path) is fn else None


def encode(value: Any) -> Any:
    """`value` (nested dicts/lists/tuples) with each importable function or class replaced by
    "callable:<path>" and each NumPy scalar by its Python value (np.True_ as True: JSON wrote
    it as the string "unserializable object: True"); other values unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(encode(item) for item in value)
    if is_callable_value(value):
        path = callable_path(value)
        return PREFIX + path if path else value
    return value


def decode(value: Any) -> Any:
    """Inverse of `encode`: "callable:<path>" strings imported back (nested dicts/lists); a path
    that does not import raises ValueError naming it."""
    if isinstance(value, dict):
        return {key: decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode(item) for item in value]
    if isinstance(value, str) and value.startswith(PREFIX):
        obj = import_path(value[len(PREFIX):])
        if obj is None:
            raise ValueError(f"{value!r} is invalid; it does not import here (saved from a "
                             "function or class of another version or an uninstalled package)")
        return obj
    return value

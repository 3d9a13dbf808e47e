"""Argument checks shared by layers, models and the engine.

Every check raises a `ValueError` that names the owner (a layer, model or flag), the argument,
the offending value and what would be valid, so a bad configuration fails in Python before
JAX traces or compiles anything.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: Appended to a layer's "window larger than its input" error: inside a model (called directly,
#: not through the engine, which checks the model first) the model's input is what is too small.
INPUT_TOO_SMALL_HINT = ("; inside a network this means its input is too small "
                        "(cnnjax.models.registry.min_input_size gives a registered model's "
                        "smallest input side)")


def invalid(owner: str, arg: str, value: Any, valid: str) -> ValueError:
    """Builds the standard error: `<owner>: <arg>=<value> is invalid; <valid>.` (no second stop
    after a `valid` that ends a sentence itself, e.g. a quoted `Did you mean "x"?`)."""
    stop = "" if valid.endswith((".", "?", "!")) else "."
    return ValueError(f"{error_prefix(owner, arg)}{value!r} is invalid; {valid}{stop}")


def listed(names: Sequence[Any], limit: int) -> str:
    """The first `limit` of `names` as reprs joined by commas, then "and N more" for the rest:
    a long list named in an error without flooding it."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(name) for name in names[:limit]) + more


def error_prefix(owner: str, arg: str) -> str:
    """How `invalid(owner, arg, ...)`'s message starts, for a command that renames the argument
    to its flag (`cli.one_line_errors(flags_named=)`)."""
    return f"{owner}: {arg}="


def check_bool(owner: str, arg: str, value: Any) -> bool:
    """Returns `value` as a bool if it is one (NumPy's `np.bool_` too), so a stray 0/1 or string
    never means True silently."""
    if not isinstance(value, bool | np.bool_):
        raise invalid(owner, arg, value, "expected True or False")
    return bool(value)


def check_optional_bool(owner: str, arg: str, value: Any) -> bool | None:
    """Returns `value` if it is None, else as `check_bool` has it: a flag such as `deterministic`
    that may be left for call time (`nn.merge_param`), where a stray string must not read as
    True."""
    if value is not None and not isinstance(value, bool | np.bool_):
        raise invalid(owner, arg, value, "expected True, False or None")
    return None if value is None else bool(value)


def check_depth(owner: str, depth: Any, per_unit: int, offset: int, context: str,
                examples: Iterable[int] | None = None) -> int:
    """n for a network `depth` = `per_unit` * n + `offset` with n >= 1 (a CIFAR ResNet's 6n + 2,
    a DenseNet-BC's 6n + 4), else a ValueError naming that form, `context` (e.g. "bottleneck=True")
    and `examples` of valid depths (default: the first three)."""
    if (not is_integer(depth) or depth < per_unit + offset
            or (depth - offset) % per_unit):
        if examples is None:
            examples = (per_unit * n + offset for n in (1, 2, 3))
        examples = ", ".join(str(d) for d in examples)
        raise invalid(owner, "depth", depth, f"expected {per_unit}n + {offset} with n >= 1 for "
                      f"{context} ({examples}, ...)")
    return int(depth - offset) // per_unit


def check_positive_ints(owner: str, arg: str, value: Any, valid: str) -> tuple[int, ...]:
    """`value` as a tuple if it is a non-empty sequence of ints > 0 (no bools), e.g. a network's
    blocks per stage, else raises with `valid`."""
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if not items or not all(is_integer(v) and v > 0 for v in items):
        raise invalid(owner, arg, value, valid)
    return tuple(int(v) for v in items)


def check_positive_int(owner: str, arg: str, value: Any, *, high: int | None = None,
                       valid: str = "expected a positive integer") -> int:
    """Returns `value` as an int if it is an integer > 0 (a NumPy integer too, not a bool) and
    at most `high` when given, else raises with `valid`."""
    if not is_integer(value) or value <= 0 or (high is not None and value > high):
        raise invalid(owner, arg, value, valid)
    return int(value)


def check_non_negative_int(owner: str, arg: str, value: Any) -> int:
    """Returns `value` as an int if it is an integer >= 0 (a NumPy integer too, not a bool),
    else raises."""
    if not is_integer(value) or value < 0:
        raise invalid(owner, arg, value, "expected an integer >= 0")
    return int(value)


def check_positive_float(owner: str, arg: str, value: Any) -> float:
    """Returns `value` as float if it is a finite number > 0 (not a bool), else raises."""
    if isinstance(value, bool | np.bool_):
        raise invalid(owner, arg, value, "expected a positive number, not a bool")
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise invalid(owner, arg, value, _traced(err) or "expected a positive number") from None
    if not number > 0 or number == float("inf"):
        raise invalid(owner, arg, value, "expected a positive finite number")
    return number


def _traced(err: Exception) -> str | None:
    """What to say when `float(value)` raised `err` because the value is traced (inside
    jit/vmap/grad), where a range check needs it concrete; None for any other failure."""
    if type(err).__name__ != "ConcretizationTypeError":  # jax.errors', without importing jax
        return None
    return ("expected a concrete number, not a value traced by jit/vmap/grad: the argument is "
            "checked (and used) in Python, so pass it as a Python number, e.g. closed over or a "
            "static argument")


def check_number(owner: str, arg: str, value: Any, valid: str, *, low: float = -np.inf,
                 high: float = np.inf, low_open: bool = False, high_open: bool = False,
                 strings: bool = True) -> float:
    """Returns `value` as a float if it is a number (not a bool, not NaN) within `low`..`high`
    (each end closed unless `low_open` / `high_open`), else raises with `valid`. A numeric
    string ("0.5") counts unless `strings=False` (for a value used as-is, e.g. a module field)."""
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        if (traced := _traced(err)):
            raise invalid(owner, arg, value, traced) from None
        number = float("nan")
    above = low < number if low_open else low <= number
    below = number < high if high_open else number <= high
    if isinstance(value, bool | np.bool_) or not (above and below) or (
            not strings and isinstance(value, str | bytes)):
        raise invalid(owner, arg, value, valid)
    return number


def concrete_value(x: Any) -> np.ndarray | None:
    """`x` as a NumPy array, or None when it is a tracer (inside jit/vmap/grad), so value
    checks run on concrete inputs and are skipped under tracing."""
    import jax  # deferred: this module is also imported by code that never needs JAX

    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_prng_key(owner: str, key: Any) -> None:
    """Raises unless `key` is a JAX PRNG key: a typed key (`jax.random.key`) or a raw uint32 one
    (`jax.random.PRNGKey`); an int seed failed deep inside `jax.random` naming neither."""
    import jax  # deferred, as in concrete_value

    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype == np.uint32 and np.ndim(key) >= 1:
        return
    shown = key if np.ndim(key) == 0 and not hasattr(key, "shape") else (
        f"array of dtype {dtype} and shape {tuple(np.shape(key))}")
    raise invalid(owner, "key", shown,
                  "expected a JAX PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
                  "not a seed")


def given_dtype(x: Any) -> np.dtype:
    """The dtype `x` was given with (before `jnp.asarray` narrows 64-bit types)."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def check_bool_array(owner: str, arg: str, x: Any) -> None:
    """Raises unless `x` was given as a bool array: a float or int mask would be cast with 0.5
    (or 2) read as True; `arg`.dtype is named in the error."""
    dtype = given_dtype(x)
    if dtype != np.bool_:
        raise invalid(owner, f"{arg}.dtype", str(dtype), "expected a bool array")


def widen_low_precision(values: np.ndarray) -> np.ndarray:
    """`values` as float32 if its dtype is one of ml_dtypes' floats (bfloat16, float8_*), which
    NumPy reports as kind 'V', so that dtype-kind checks see a float; else unchanged."""
    if values.dtype.kind != "V":
        return values
    import ml_dtypes  # deferred: a JAX dependency, needed only for these dtypes

    try:
        ml_dtypes.finfo(values.dtype)
    except ValueError:  # a structured or void dtype, an ml_dtypes integer: left to the caller
        return values
    return values.astype(np.float32)


def check_choice(owner: str, arg: str, value: Any, choices: Iterable[Any]) -> Any:
    """Returns `value` if it is one of `choices`, else raises listing them."""
    choices = list(choices)
    if value not in choices:
        raise invalid(owner, arg, value, f"expected one of {choices}")
    return value


def check_known_fields(owner: str, block: Any, fields: Iterable[str]) -> None:
    """Raises naming the first (sorted) key of the config block `block` that is not one of
    `fields`, listing those. A Python config file can add any key to a block (only the command
    line refuses unknown ones), so a typo such as `ema.decy` would otherwise be read as unset
    and silently change the run."""
    fields = list(fields)
    unknown = sorted(set(block) - set(fields))
    if unknown:
        raise invalid(owner, "field", unknown[0], f"expected one of {fields}")


def is_integer(value: Any) -> bool:
    """An int or NumPy integer (any `numbers.Integral`), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def checked_input_shape(owner: str, input_shape: Any) -> tuple[int, ...]:
    """`input_shape` (spatial..., channels) as positive ints, else a ValueError naming `owner`."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise invalid(owner, "input_shape", input_shape,
                      "expected a sequence like (H, W, C)") from None
    if len(shape) < 2 or not all(is_integer(s) and s > 0 for s in shape):
        raise invalid(owner, "input_shape", input_shape,
                      "expected positive ints (spatial..., channels), e.g. (224, 224, 3)")
    return tuple(int(s) for s in shape)


def to_pair(
    owner: str, arg: str, value: int | Sequence[int], *, minimum: int = 1
) -> tuple[int, int]:
    """Normalizes an int or a pair of ints (NumPy integers too, never bools) to `(h, w)` of
    Python ints, each at least `minimum` and below 2**63 (XLA's sizes are int64: a larger one
    was an OverflowError from deep inside the lowering)."""
    pair = (value, value) if is_integer(value) else value
    try:
        pair = tuple(pair)
    except TypeError:
        raise invalid(owner, arg, value, "expected an int or a pair of ints") from None
    if len(pair) != 2 or not all(is_integer(v) for v in pair):
        raise invalid(owner, arg, value, "expected an int or a pair of ints")
    if any(v < minimum for v in pair):
        raise invalid(owner, arg, value, f"expected every entry >= {minimum}")
    if any(v >= 2**63 for v in pair):
        raise invalid(owner, arg, value, "expected every entry below 2**63 (XLA's int64 sizes)")
    return int(pair[0]), int(pair[1])


def check_nhwc(owner: str, x: Any, arg: str = "input") -> None:
    """Raises unless `x`, the argument `arg`, is a rank-4 NHWC array."""
    if getattr(x, "ndim", None) != 4:
        shape = getattr(x, "shape", None)
        raise invalid(
            owner, f"{arg}.shape", shape,
            "expected a rank-4 NHWC array (batch, height, width, channels)",
        )


def check_float_dtype(owner: str, arg: str, value: Any, *, allow_none: bool = True,
                      computable: bool = False) -> None:
    """Raises unless `value` names a floating-point dtype of 16 bits or more (or is None, when
    `allow_none`): an integer compute dtype would truncate, a float8 one has no promotion path
    to float32 parameters, and a misspelt name would fail only when traced, in flax's words and
    without the layer's name. With `computable`, also unless JAX computes in it now: float64
    without x64 would silently be float32."""
    import jax
    import jax.numpy as jnp  # NumPy alone does not count bfloat16 as floating

    try:
        floating = (value is None and allow_none) or (
            value is not None and jnp.issubdtype(jnp.dtype(value), jnp.floating)
            and jnp.dtype(value).itemsize >= 2)
    except TypeError:
        floating = False
    if not floating:
        shown = dtype_name(value)
        expected = ("a floating-point dtype of 16 bits or more (jnp.float16, jnp.bfloat16, "
                    "jnp.float32, jnp.float64)")
        raise invalid(owner, arg, shown, f"expected None or {expected}" if allow_none
                      else f"expected {expected}")
    if computable and value is not None and (
            jax.dtypes.canonicalize_dtype(value) != jnp.dtype(value)):
        raise invalid(owner, arg, jnp.dtype(value).name,
                      "expected a dtype JAX computes in: float64 needs "
                      "jax.config.update('jax_enable_x64', True) first (else it computes in "
                      "float32)")


def dtype_name(value: Any) -> Any:
    """`value`'s dtype name for an error (jnp.int32 reads as 'int32', not "<class
    'jax.numpy.int32'>"), else `value` itself (None, a misspelt name)."""
    import jax.numpy as jnp  # NumPy alone does not know bfloat16

    try:
        return value if value is None else jnp.dtype(value).name
    except TypeError:
        return value


def check_layer_dtypes(module: Any) -> None:
    """A layer's `dtype` (None: flax's rule, the input's and the parameters' dtypes promoted
    together, so a bfloat16 input with float32 parameters computes and returns float32) and
    `param_dtype` must be floating: flax would fail only at `init`, without naming the layer."""
    owner = type(module).__name__
    check_float_dtype(owner, "dtype", module.dtype)
    check_float_dtype(owner, "param_dtype", module.param_dtype, allow_none=False)


def check_nhwc_nonempty(owner: str, x: Any, arg: str = "input") -> None:
    """Raises unless `x` (the argument `arg`) is a rank-4 NHWC array with height and width >= 1
    (a batch of 0 is fine), for reductions over the map that have no value on an empty one (a
    mean is NaN)."""
    check_nhwc(owner, x, arg)
    if min(x.shape[1:3]) < 1:
        raise invalid(owner, f"{arg}.shape", tuple(x.shape),
                      "expected height and width >= 1 in an NHWC array")

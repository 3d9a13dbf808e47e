"""Translation equivariance and invariance probes.

A map f is shift-equivariant when shifting its input shifts its output, f(T_s x) = T_{s/r} f(x)
for a network of output stride r, and shift-invariant when f(T_s x) = f(x). Convolutions are
equivariant away from the borders (exactly, everywhere, with circular padding); pooling buys
invariance only to shifts that keep each maximum inside its window (Goodfellow et al., Deep
Learning §9.3-9.4). These probes measure both on concrete inputs: the map runs in the input's
dtype and its output (one numeric array) is compared in float64, or complex128 if complex.

Shifts act on the spatial axes `1 .. x.ndim - 2` of a channels-last batch (NHWC for images).
`mode="circular"` rolls the image around (the exact symmetry of circular convolution);
`mode="zeros"` translates it and fills the vacated border with zeros (the comparison then skips
the output positions the translation left undefined). A NaN or inf in the input (refused
before `fn` runs) or in an output is a ValueError: no deviation can be measured through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from cnnjax.utils.validation import check_choice, invalid, widen_low_precision

MODES = ("circular", "zeros")


class ShiftError(NamedTuple):
    """`max_abs`: largest absolute deviation; `relative`: `max_abs / max|reference|` (0 if 0)."""

    max_abs: float
    relative: float


def _per_axis(owner: str, arg: str, value: Any, n: int, minimum: int,
              scalar: bool = True) -> tuple[int, ...]:
    """`value` as `n` ints >= `minimum`; with `scalar`, one int stands for every axis (the
    messages offer it only then)."""
    expected = f"expected an int or {n} ints" if scalar else f"expected {n} ints"
    values = (value,) * n if scalar and isinstance(value, int | np.integer) else value
    try:
        values = tuple(values)
    except TypeError:
        raise invalid(owner, arg, value, f"{expected} (one per spatial axis)") from None
    if len(values) != n or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values
    ):
        raise invalid(owner, arg, value, f"{expected} (one per spatial axis)")
    if any(v < minimum for v in values):
        raise invalid(owner, arg, value, f"expected every entry >= {minimum}")
    return tuple(int(v) for v in values)


def _check_input(owner: str, x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim < 3:
        raise invalid(owner, "x.shape", arr.shape,
                      "expected a batch with spatial axes and channels, e.g. (N, H, W, C)")
    if arr.size == 0:  # every deviation of nothing is 0: a perfect score for no input
        raise invalid(owner, "x.shape", arr.shape,
                      "expected a non-empty batch (no axis of size 0)")
    # bfloat16 and float8_* (ml_dtypes, NumPy kind 'V') are floats too; x keeps its dtype
    low_precision_float = widen_low_precision(arr[:0]).dtype != arr.dtype
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
            or low_precision_float):
        raise invalid(owner, "x.dtype", str(arr.dtype), "expected a numeric array")
    return arr


def _check_finite(owner: str, arr: np.ndarray) -> None:
    """A NaN or inf pixel is refused before fn runs: its deviations are NaN, which no score
    can report as a distance from equivariance."""
    wide = widen_low_precision(arr)
    if wide.dtype.kind == "f" and not np.all(np.isfinite(wide)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(wide))[0])
        raise invalid(owner, f"x[{', '.join(map(str, bad))}]", float(wide[bad]),
                      "expected finite values")


def _describe(out: Any) -> str:
    """A short description of an `fn` output that is not one numeric array, for an error."""
    if isinstance(out, str):
        return f"the str {out!r}"
    if isinstance(out, dict):
        return f"a dict with keys {sorted(map(str, out))}"
    if isinstance(out, tuple | list):
        return f"a {type(out).__name__} of {len(out)} items"
    if out is None:
        return "None"
    return f"a {type(out).__name__}"


def _output(owner: str, name: str, out: Any) -> np.ndarray:
    """`fn`'s output `name` in float64 (complex128 if complex), refused when it is not one
    numeric array (None from a forgotten `return` was reported as "holding NaN", a tuple or dict
    failed in NumPy's words) or holds a NaN or inf (a diverged model): its deviations would be
    NaN, and a NaN reference scale read as a relative error of 0."""
    try:
        y = np.asarray(out)
    except (TypeError, ValueError):  # ragged: a (logits, features) tuple
        y = None
    if y is None or not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_
                         or widen_low_precision(y.reshape(-1)[:0]).dtype != y.dtype):
        raise invalid(owner, name, _describe(out),
                      "expected fn to return one numeric array (e.g. the logits or one feature "
                      "map)")
    y = y.astype(np.complex128 if np.iscomplexobj(y) else np.float64)
    if not np.all(np.isfinite(y)):
        kinds = sorted({"NaN" if np.isnan(v) else "inf" for v in y[~np.isfinite(y)][:1000]})
        raise invalid(owner, name, f"an array of shape {y.shape} holding {' and '.join(kinds)}",
                      "expected finite outputs")
    return y


def _check_fits(owner: str, shift: tuple[int, ...], arr: np.ndarray, mode: str) -> None:
    """In "zeros" mode a shift must be smaller than the input along every axis: a larger one
    moves the whole image out and compares fn of an all-zero input (checked before fn runs)."""
    sizes = arr.shape[1:-1]
    if mode == "zeros" and any(abs(s) >= n for s, n in zip(shift, sizes, strict=True)):
        raise invalid(owner, "shift", shift,
                      f"expected |shift| smaller than the input's spatial size {sizes} in "
                      "mode='zeros' (a larger shift leaves an all-zero image); mode='circular' "
                      "wraps any shift")


def _shift_vector(owner: str, shift: Any, n: int) -> tuple[int, ...]:
    return _per_axis(owner, "shift", shift, n, minimum=-(2**62), scalar=False)


def shift_image(x: Any, shift: Sequence[int], mode: str = "circular") -> np.ndarray:
    """Translates `x` by `shift` pixels along its spatial axes (positive = down/right)."""
    owner = "shift_image"
    arr = _check_input(owner, x)
    check_choice(owner, "mode", mode, MODES)
    shift = _shift_vector(owner, shift, arr.ndim - 2)
    return _translate(arr, shift, mode)


def _translate(arr: np.ndarray, shift: Sequence[int], mode: str) -> np.ndarray:
    axes = tuple(range(1, arr.ndim - 1))
    if mode == "circular":
        return np.roll(arr, shift, axis=axes)
    out = np.zeros_like(arr)
    src = [slice(None)] * arr.ndim
    dst = [slice(None)] * arr.ndim
    for axis, s in zip(axes, shift, strict=True):
        n = arr.shape[axis]
        if abs(s) >= n:
            return out
        src[axis] = slice(max(0, -s), n - max(0, s))
        dst[axis] = slice(max(0, s), n - max(0, -s))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _error(a: np.ndarray, ref: np.ndarray) -> ShiftError:
    if a.size == 0:
        return ShiftError(0.0, 0.0)
    max_abs = float(np.max(np.abs(a - ref)))
    scale = float(np.max(np.abs(ref)))
    return ShiftError(max_abs, max_abs / scale if scale > 0 else 0.0)


def _output_stride(owner: str, shift: tuple[int, ...], stride: Any, n: int) -> tuple[int, ...]:
    """The per-axis output `stride` (each >= 1), which every `shift` must be a multiple of so
    the output moves by whole pixels."""
    stride = _per_axis(owner, "stride", stride, n, minimum=1)
    if any(s % r for s, r in zip(shift, stride, strict=True)):
        raise invalid(owner, "shift", shift,
                      f"expected multiples of the output stride {stride} so the output shifts "
                      "by whole pixels")
    return stride


def equivariance_error(
    fn: Callable[[Any], Any],
    x: Any,
    shift: Sequence[int],
    *,
    border: int | Sequence[int] = 0,
    mode: str = "circular",
    stride: int | Sequence[int] | None = None,
    upsampling: int | Sequence[int] | None = None,
) -> ShiftError:
    """Deviation of `fn(shift(x))` from `shift(fn(x))`, ignoring `border` output pixels per side.

    The output is shifted by `shift / stride * upsampling`. By default (both None) `stride` (the
    network's output stride, per axis) is `input_size / output_size`, and along an axis whose
    output is an integer multiple `u` of the input (an upsampling decoder) `upsampling` is `u`.
    Give them when the sizes do not divide (`upsampling=2` for a VALID stride-2 transposed
    conv, 8 -> 17 pixels; `stride` then defaults to 1). `shift` must be a multiple of `stride`.
    In "zeros" mode the output positions the translation leaves undefined are skipped as well.
    """
    owner = "equivariance_error"
    arr = _check_input(owner, x)
    check_choice(owner, "mode", mode, MODES)
    n = arr.ndim - 2
    shift = _shift_vector(owner, shift, n)
    _check_fits(owner, shift, arr, mode)
    _check_finite(owner, arr)
    border_arg, border = border, _per_axis(owner, "border", border, n, minimum=0)
    # given ones are checked before fn runs (compiles)
    if upsampling is not None:
        upsampling = _per_axis(owner, "upsampling", upsampling, n, minimum=1)
        stride = 1 if stride is None else stride
    if stride is not None:
        stride = _output_stride(owner, shift, stride, n)
    y = _output(owner, "fn(x)", fn(arr))
    y_shifted = _output(owner, "fn(shifted x)", fn(_translate(arr, shift, mode)))
    if y.ndim != arr.ndim:
        raise invalid(owner, "fn(x).shape", y.shape,
                      f"expected a rank-{arr.ndim} output with the input's spatial axes")
    _check_same_shape(owner, y, y_shifted)
    in_sizes, out_sizes = arr.shape[1:-1], y.shape[1:-1]
    upsampling = (1,) * n if upsampling is None else upsampling
    if stride is None:
        sizes = list(zip(in_sizes, out_sizes, strict=True))
        if any(o == 0 or (i % o and o % i) for i, o in sizes):
            raise invalid(owner, "stride", None,
                          f"input size {in_sizes} is not a multiple of output size {out_sizes} "
                          "nor the output of the input; pass the network's output `stride` "
                          "(downsampling) or `upsampling` factor (a decoder, e.g. a VALID "
                          "transposed conv) explicitly")
        # per axis: a downsampling stride i / o, or an upsampling factor o / i (a decoder)
        stride = _output_stride(
            owner, shift, tuple(1 if i % o else i // o for i, o in sizes), n)
        upsampling = tuple(o // i if i % o else 1 for i, o in sizes)
    out_shift = tuple(s // r * u for s, r, u in zip(shift, stride, upsampling, strict=True))
    reference = _translate(y, out_shift, mode)
    region = [slice(None)]
    for m, s, b in zip(out_sizes, out_shift, border, strict=True):
        lo, hi = (0, m) if mode == "circular" else (max(0, s), m + min(0, s))
        if hi <= lo:  # the shift alone leaves nothing that both outputs see
            raise invalid(owner, "shift", shift,
                          f"expected a shift smaller than the input in mode={mode!r}: it moves "
                          f"the output by {out_shift}, past every position of an axis of size "
                          f"{m}")
        lo, hi = lo + b, hi - b
        if hi <= lo:
            raise invalid(owner, "border", border_arg,
                          f"no output positions are left to compare along an axis of size {m}")
        region.append(slice(lo, hi))
    region.append(slice(None))
    return _error(y_shifted[tuple(region)], reference[tuple(region)])


def invariance_error(
    fn: Callable[[Any], Any], x: Any, shift: Sequence[int], *, mode: str = "circular"
) -> ShiftError:
    """Deviation of `fn(shift(x))` from `fn(x)` (e.g. a pooled feature or a classifier's logits)."""
    owner = "invariance_error"
    arr = _check_input(owner, x)
    check_choice(owner, "mode", mode, MODES)
    shift = _shift_vector(owner, shift, arr.ndim - 2)
    _check_fits(owner, shift, arr, mode)
    _check_finite(owner, arr)
    y = _output(owner, "fn(x)", fn(arr))
    y_shifted = _output(owner, "fn(shifted x)", fn(_translate(arr, shift, mode)))
    _check_same_shape(owner, y, y_shifted)
    return _error(y_shifted, y)


def _check_same_shape(owner: str, y: np.ndarray, y_shifted: np.ndarray) -> None:
    """Refuses outputs of different shapes (NumPy would broadcast them into a number)."""
    if y_shifted.shape != y.shape:
        raise invalid(owner, "fn(shifted x).shape", y_shifted.shape,
                      f"expected fn(x)'s shape {y.shape}: fn's output shape must not depend on "
                      "the input's values")

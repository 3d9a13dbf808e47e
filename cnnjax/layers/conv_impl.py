"""Convolution as patches + matmul, and a context manager routing `nn.Conv` through it.

XLA:CPU (jaxlib 0.10) runs 2-D convolutions on small spatial maps (outputs of 1x1 or 2x2, as
in ResNet-18's last stages at 32x32 input) 10-25x slower than the same arithmetic as one matrix
multiply (docs/performance.md). `conv_general_dilated_matmul` is a drop-in for
`lax.conv_general_dilated` that gathers the k_h*k_w shifted (strided, dilated) views of the
zero-padded input, concatenates them along channels and multiplies by the reshaped kernel: the
same sums, so forward and gradients match `lax` to float rounding. `conv_impl(...)` applies it
to every `flax.linen.Conv` called inside the `with` block, so existing models run unchanged
(same parameter tree, same numerics). Opt-in only; nothing here changes global state outside
the block.

"auto" also hands XLA's own convolutions a `stored_input`: XLA:CPU's fusion pass otherwise
recomputes a convolution's input (BatchNorm + ReLU + residual sums) inside the transposed copies
its kernel gradient needs, a loop 6x slower than a plain transpose (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.utils.validation import invalid

Array = Any

#: `conv_impl` modes: "xla" (lax convolution everywhere, i.e. no change), "matmul" (every
#: supported conv as patches + matmul) and "auto" (matmul only where the output map is small,
#: XLA's convolution with a `stored_input` elsewhere).
CONV_IMPLS = ("xla", "matmul", "auto")

#: "auto" uses the matmul form when the output has at most this many positions (H_out * W_out).
#: Measured on 2 AVX2 cores: matmul is 10-25x faster at 1x1 and 2x2 outputs, about even at 4x4
#: and slower (the patch copies cost more than XLA's direct conv saves) at 8x8 and up.
AUTO_MAX_OUTPUT_POSITIONS = 4

_NHWC = ("NHWC", "HWIO", "NHWC")

#: The classes whose convolution `conv_impl` swaps: flax's `nn.Conv` exactly (a subclass may
#: compute otherwise) and the one `Conv2D` wraps (`conv.py` adds it).
INTERCEPTED_CONV_CLASSES: set[type] = {nn.Conv}

_SUSPENDED: contextvars.ContextVar[bool] = contextvars.ContextVar("conv_impl_suspended",
                                                                  default=False)


def _is_nhwc_2d(dimension_numbers: Any, ndim: int) -> bool:
    """True when `dimension_numbers` describe flax's 2-D layout (NHWC input, HWIO kernel)."""
    if ndim != 4:
        return False
    expected = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    if dimension_numbers is None:
        return False
    given = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers)
    return given == expected


def matmul_supported(lhs: Array, rhs: Array, lhs_dilation: Sequence[int] | None,
                     dimension_numbers: Any, feature_group_count: int,
                     batch_group_count: int) -> bool:
    """Whether `conv_general_dilated_matmul` computes this convolution itself (else delegates).

    Supported: 2-D, NHWC input with HWIO kernel (flax's layout), no input (transposed-conv)
    dilation, one feature group and one batch group. Any stride, kernel dilation and padding.
    """
    return (_is_nhwc_2d(dimension_numbers, jnp.ndim(lhs)) and jnp.ndim(rhs) == 4
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and feature_group_count == 1 and batch_group_count == 1)


def _taps_reading_input(size: int, pad_lo: int, k: int, dilation: int, stride: int,
                        out: int) -> range:
    """The kernel taps along one axis whose view holds at least one input element (not only
    padding), as a range; all `k` taps when those are not contiguous. A tap over padding alone
    adds only zeros, so dropping it (with its kernel slice) leaves the sums unchanged: on a 1x1
    map a 3x3 convolution with padding 1 is its centre tap's matmul, 9x less work."""
    reading = [i for i in range(k)
               if any(0 <= r * stride + i * dilation - pad_lo < size for r in range(out))]
    if reading and reading == list(range(reading[0], reading[-1] + 1)):
        return range(reading[0], reading[-1] + 1)
    return range(k)


def patches_matmul_conv(x: Array, kernel: Array, strides: Sequence[int],
                        pads: Sequence[tuple[int, int]], dilation: Sequence[int],
                        precision: Any = None, preferred_element_type: Any = None) -> Array:
    """NHWC x HWIO convolution (zero padding `pads`) as one [N*Ho*Wo, kh*kw*C] @ [kh*kw*C, F].

    The patch matrix's columns are ordered (kh, kw, C), the row-major order of the HWIO kernel,
    so the kernel is only reshaped. A 1x1 kernel skips the concatenation (strided slice only).
    Taps whose views hold only padding are left out with their kernel rows
    (`_taps_reading_input`): on a 1x1 map a padded 3x3 convolution is one [N, C] @ [C, F].
    """
    kh, kw, cin, features = kernel.shape
    n, h, w, c = x.shape
    if c != cin:
        raise ValueError(f"patches_matmul_conv: input channels {c} != kernel input channels {cin}")
    (st_h, st_w), (d_h, d_w) = strides, dilation
    (top, bottom), (left, right) = pads
    h_out = (h + top + bottom - d_h * (kh - 1) - 1) // st_h + 1
    w_out = (w + left + right - d_w * (kw - 1) - 1) // st_w + 1
    if h_out <= 0 or w_out <= 0:  # the window exceeds the padded input: lax's empty output
        return jnp.zeros((n, max(h_out, 0), max(w_out, 0), features),
                         preferred_element_type or jnp.result_type(x, kernel))
    rows = _taps_reading_input(h, top, kh, d_h, st_h, h_out)
    cols = _taps_reading_input(w, left, kw, d_w, st_w, w_out)
    # lax.pad also handles negative pads (cropping), as lax.conv_general_dilated does.
    x = lax.pad(x, jnp.zeros((), x.dtype),
                ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    views = [
        lax.slice(x, (0, i * d_h, j * d_w, 0),
                  (n, i * d_h + (h_out - 1) * st_h + 1, j * d_w + (w_out - 1) * st_w + 1, c),
                  (1, st_h, st_w, 1))
        for i in rows for j in cols
    ]
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    kernel = kernel[rows.start:rows.stop, cols.start:cols.stop]
    y = lax.dot_general(patches.reshape(n * h_out * w_out, len(views) * c),
                        kernel.reshape(len(views) * c, features), (((1,), (0,)), ((), ())),
                        precision=precision, preferred_element_type=preferred_element_type)
    return y.reshape(n, h_out, w_out, features)


def stored_input(x: Array, kernel: Array) -> Array:
    """`x` unchanged (bitwise), as a value XLA computes once and stores, not one it recomputes.

    XLA's fusion pass copies cheap elementwise producers (BatchNorm, ReLU, residual adds) into
    every consumer. When a consumer is the transposed copy a convolution's kernel gradient needs,
    that loop reads each recomputed input in transposed order: on XLA:CPU 177 ms instead of
    11 + 16 ms for the sum and a plain transpose of a [128, 32, 32, 64] map, about 0.45 s of a
    2.7 s CIFAR ResNet-18 step. A floating-point division is "expensive" to that pass and never
    copied, so `x / one` is computed once, where `one` is 1 built from `kernel` (`1 + 0 * k`)
    so that it cannot be constant-folded away. x / 1 == x exactly (signed zeros, inf and NaN
    included; subnormals flush to 0 on XLA:CPU, which the convolution reads them as anyway) and
    so is the gradient; a non-finite kernel[0, ..., 0] would make every output NaN, as that
    filter's outputs already are. Integer inputs (and empty kernels) are returned as they are.
    """
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact) or jnp.size(kernel) == 0:
        return x
    anchor = lax.stop_gradient(kernel[(0,) * jnp.ndim(kernel)]).astype(jnp.result_type(x))
    return x / (1 + 0 * anchor)


def conv_general_dilated_matmul(
    lhs: Array, rhs: Array, window_strides: Sequence[int], padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
    precision: Any = None, preferred_element_type: Any = None,
    max_output_positions: int | None = None, store_delegated_input: bool = False,
) -> Array:
    """`lax.conv_general_dilated` with the same signature, computed as patches + matmul.

    Cases `matmul_supported` rejects (grouped, transposed, non-NHWC/3-D) and, when
    `max_output_positions` is given, outputs with more than that many spatial positions are
    passed to `lax.conv_general_dilated` unchanged (with `store_delegated_input`, its input
    wrapped in `stored_input`). An empty output (a window larger than the padded input, or a
    zero-size dimension) is an empty array of that shape, as in `lax`; negative pads cropping
    more than the input holds are passed to `lax`, which refuses them.
    """
    def delegate() -> Array:
        return lax.conv_general_dilated(
            stored_input(lhs, rhs) if store_delegated_input else lhs, rhs, window_strides,
            padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)

    if not matmul_supported(lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count,
                            batch_group_count):
        return delegate()
    dilation = tuple(rhs_dilation or (1, 1))
    strides = tuple(window_strides)
    if isinstance(padding, str):
        window = tuple(d * (k - 1) + 1 for d, k in zip(dilation, rhs.shape[:2], strict=True))
        pads = lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding)
    else:
        pads = tuple(tuple(p) for p in padding)
    if any(size + lo + hi < 0 for size, (lo, hi) in zip(lhs.shape[1:3], pads, strict=True)):
        return delegate()  # a crop past the input: lax's error, not an empty output
    if max_output_positions is not None:
        h_out, w_out = (
            (size + lo + hi - d * (k - 1) - 1) // s + 1
            for size, (lo, hi), d, k, s in zip(lhs.shape[1:3], pads, dilation, rhs.shape[:2],
                                               strides, strict=True))
        if h_out * w_out > max_output_positions:
            return delegate()
    return patches_matmul_conv(lhs, rhs, strides, pads, dilation, precision,
                               preferred_element_type)


def _auto_conv(*args: Any, **kwargs: Any) -> Array:
    return conv_general_dilated_matmul(*args, max_output_positions=AUTO_MAX_OUTPUT_POSITIONS,
                                       store_delegated_input=True, **kwargs)


def conv_function(impl: str) -> Callable[..., Array] | None:
    """The `conv_general_dilated` replacement for `impl` (None for "xla": no replacement)."""
    if impl not in CONV_IMPLS:
        raise invalid("conv_impl", "impl", impl, f"expected one of {list(CONV_IMPLS)}")
    return {"xla": None, "matmul": conv_general_dilated_matmul, "auto": _auto_conv}[impl]


def resolve_conv_impl(impl: str, backend: str) -> str:
    """The implementation `impl` means on `backend`: "auto" is "xla" off CPU.

    The matmul form wins only against XLA:CPU's convolutions on small maps; GPU/TPU convolution
    libraries handle those well, so accelerators keep XLA's own lowering.
    """
    conv_function(impl)  # validates the name
    return impl if impl != "auto" or backend == "cpu" else "xla"


@contextlib.contextmanager
def conv_impl(impl: str = "auto") -> Iterator[None]:
    """Within the block, every `nn.Conv` (exactly that class or `Conv2D`'s, shared weights, no
    custom `conv_general_dilated`) computes its convolution with `impl`'s function.

    Works on modules built outside the block and under `jit` tracing; `xla_convolutions()`
    suspends it (`cnnjax.analysis` traces the network, not its CPU lowering). The choice is made
    when a function is traced, so wrap the tracing (e.g. `.lower()` or the first call) in the
    block; JAX caches traces per function object, so a function already traced (or
    `make_jaxpr`-ed) on one side of the block replays that trace on the other. Parameters,
    their names and initialization are untouched: the interceptor only swaps the convolution
    primitive for the duration of each call. Default "auto": the fastest measured on CPU
    (docs/performance.md); on other backends "auto" is "xla" (`resolve_conv_impl`).
    """
    function = conv_function(resolve_conv_impl(impl, jax.default_backend()))
    if function is None:
        yield
        return

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict,
                    context: nn.module.InterceptorContext) -> Any:
        module = context.module
        if (_SUSPENDED.get() or context.method_name != "__call__"
                or type(module) not in INTERCEPTED_CONV_CLASSES
                or module.conv_general_dilated is not None
                or module.conv_general_dilated_cls is not None):
            return next_fun(*args, **kwargs)
        # Modules are frozen dataclasses; set the field for this one call and restore it.
        object.__setattr__(module, "conv_general_dilated", function)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "conv_general_dilated", None)

    with nn.intercept_methods(interceptor):
        yield


def lowerings_suspended() -> bool:
    """Whether the caller runs inside `xla_convolutions()`: layers with a faster lowering of
    their own (`ConvTranspose2D`'s per-phase form) then emit their canonical convolution."""
    return _SUSPENDED.get()


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Within the block, every enclosing `conv_impl` is suspended: `nn.Conv` runs XLA's own
    convolution, and `ConvTranspose2D` its input-dilated one (`lowerings_suspended`).
    `cnnjax.analysis` traces under it, so a summary describes the network's convolutions (exact
    receptive fields and MACs), not their patches + matmul or per-phase lowering."""
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)

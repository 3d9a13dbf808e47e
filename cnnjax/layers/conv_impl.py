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
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

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
                        out: int) -> tuple[int, ...]:
    """The kernel taps along one axis whose view holds at least one input element (not only
    padding), in order. A tap over padding alone adds only zeros, so dropping it (with its kernel
    slice) leaves the sums unchanged, as in lax, even where that kernel slice is not finite: on a
    1x1 map a 3x3 convolution with padding 1 is its centre tap's matmul, 9x less work."""
    return tuple(i for i in range(k)
                 if any(0 <= r * stride + i * dilation - pad_lo < size for r in range(out)))


def _kernel_taps(kernel: Array, taps: tuple[int, ...], axis: int) -> Array:
    """`kernel`'s slices `taps` along `axis`: a slice when they are contiguous, else a gather."""
    if taps == tuple(range(taps[0], taps[-1] + 1)):
        return lax.slice_in_dim(kernel, taps[0], taps[-1] + 1, axis=axis)
    return jnp.take(kernel, jnp.asarray(taps), axis=axis)


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
    rows = _taps_reading_input(h, top, kh, d_h, st_h, h_out)
    cols = _taps_reading_input(w, left, kw, d_w, st_w, w_out)
    if not rows or not cols:
        # The window exceeds the padded input (lax's empty output), or every window lies in the
        # padding (all sums are of zeros).
        return jnp.zeros((n, max(h_out, 0), max(w_out, 0), features),
                         preferred_element_type or jnp.result_type(x, kernel))
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
    kernel = _kernel_taps(_kernel_taps(kernel, rows, 0), cols, 1)
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


def _spatial_dims(lhs: Array, rhs: Array, dimension_numbers: Any) -> Any:
    """`lax.ConvDimensionNumbers` for these operands or their shapes (`jax.ShapeDtypeStruct`;
    None: lax's default NCHW/OIHW order)."""
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)


def _window_and_pads(lhs: Array, rhs: Array, window_strides: Sequence[int],
                     padding: str | Sequence[tuple[int, int]],
                     rhs_dilation: Sequence[int] | None, dimension_numbers: Any
                     ) -> tuple[list[int], list[int], Sequence[tuple[int, int]]]:
    """The input's spatial sizes, the dilated kernel's window and the explicit pads ("SAME" /
    "VALID" resolved as lax does) of a convolution."""
    dn = _spatial_dims(lhs, rhs, dimension_numbers)
    sizes = [lhs.shape[i] for i in dn.lhs_spec[2:]]
    kernel = [rhs.shape[i] for i in dn.rhs_spec[2:]]
    dilation = tuple(rhs_dilation or (1,) * len(kernel))
    window = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    pads = (lax.padtype_to_pads(sizes, window, window_strides, padding)
            if isinstance(padding, str) else padding)
    return sizes, window, pads


def input_gradient_sliced(lhs: Array, rhs: Array, window_strides: Sequence[int],
                          padding: str | Sequence[tuple[int, int]],
                          lhs_dilation: Sequence[int] | None = None,
                          rhs_dilation: Sequence[int] | None = None,
                          dimension_numbers: Any = None, feature_group_count: int = 1,
                          batch_group_count: int = 1) -> bool:
    """Whether `conv_general_dilated` differentiates this convolution's input through a
    stride-1 convolution and a strided slice: on the CPU, outside `xla_convolutions()`, for a
    strided convolution (no input dilation, one batch group, no cropping pads) whose output is
    shorter than its dilated kernel along some spatial axis. XLA:CPU's algebraic simplifier
    aborts the process ("Window dimensions do not match RHS shape", jax 0.10-0.11) on some such
    input gradients, e.g. a (2, 3) kernel, stride 2, padding ((1, 1), (0, 0)) on a 6x6 map; in
    3,000 random geometries and a 1,728-case grid every abort (11 and 8) had both properties
    (docs/performance.md), and such outputs are small."""
    if not cpu_lowerings_apply() or batch_group_count != 1:
        return False
    if not any(s > 1 for s in window_strides) or any(d != 1 for d in lhs_dilation or ()):
        return False
    sizes, window, pads = _window_and_pads(lhs, rhs, window_strides, padding, rhs_dilation,
                                           dimension_numbers)
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        return False
    return any((n + lo + hi - w) // s + 1 < w
               for n, (lo, hi), w, s in zip(sizes, pads, window, window_strides, strict=True))


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> Array:
    """`lax.conv_general_dilated` (same signature and values) whose input derivative avoids the
    XLA:CPU abort `input_gradient_sliced` describes: there, the input's tangent goes through a
    stride-1 convolution and a strided slice, which transpose to zeros between the output
    gradient's entries (`lax.pad`) and a stride-1 convolution instead of an input-dilated one.
    The primal is lax's strided convolution; the kernel's derivative is lax's."""
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                  dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                  batch_group_count=batch_group_count, precision=precision,
                  preferred_element_type=preferred_element_type)
    if not input_gradient_sliced(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                 dimension_numbers, feature_group_count, batch_group_count):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    _, _, pads = _window_and_pads(lhs, rhs, window_strides, padding, rhs_dilation,
                                  dimension_numbers)
    static = _StaticConv(tuple(window_strides), tuple(tuple(p) for p in pads),
                         tuple(sorted((k, _hashable(v)) for k, v in kwargs.items())))
    return _conv_sliced_input_tangent(lhs, rhs, static)


def patch_kernel(kernel_size: Sequence[int], channels: int, dtype: Any) -> Array:
    """The HWIO kernel (`feature_group_count=channels`) whose convolution gathers each output
    position's `k_h·k_w` inputs per channel, ordered `(C, k_h, k_w)` as in
    `lax.conv_general_dilated_patches`: output channel `c·k_h·k_w + a·k_w + b` is tap (a, b)
    of input channel c."""
    taps = math.prod(kernel_size)
    one_tap_each = jnp.eye(taps, dtype=dtype).reshape(*kernel_size, 1, taps)
    return jnp.tile(one_tap_each, (1, 1, 1, channels))


def input_patches(x: Array, kernel_size: Sequence[int], strides: Sequence[int],
                  pads: Sequence[tuple[int, int]], dilation: Sequence[int],
                  precision: Any = None) -> Array:
    """`[N, H, W, C]` -> `[N, H_out, W_out, C·k_h·k_w]`, `lax.conv_general_dilated_patches`'
    values and order through `conv_general_dilated` (its input gradient XLA:CPU compiles)."""
    return conv_general_dilated(x, patch_kernel(kernel_size, x.shape[-1], x.dtype), strides,
                                pads, rhs_dilation=dilation, dimension_numbers=_NHWC,
                                feature_group_count=x.shape[-1], precision=precision)


def _hashable(value: Any) -> Any:
    """`value` as a hashable static argument: lists (of pads, dilations) become tuples."""
    if isinstance(value, list) or type(value) is tuple:
        return tuple(_hashable(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class _StaticConv:
    """The static arguments of a `_conv_sliced_input_tangent` call (explicit pads)."""

    strides: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    options: tuple[tuple[str, Any], ...]

    def conv(self, lhs: Array, rhs: Array, strides: Sequence[int] | None = None) -> Array:
        return lax.conv_general_dilated(lhs, rhs, strides or self.strides, self.pads,
                                        **dict(self.options))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv_sliced_input_tangent(lhs: Array, rhs: Array, static: _StaticConv) -> Array:
    return static.conv(lhs, rhs)


def _conv_sliced_input_tangent_jvp(static: _StaticConv, primals: tuple, tangents: tuple
                                   ) -> tuple[Array, Array]:
    """Tangent: the input's through a stride-1 convolution sliced every `stride` outputs (the
    same numbers as the strided convolution), the kernel's through lax's strided one; a
    symbolic-zero tangent (an operand not differentiated) adds no convolution. The primal is
    this function again, so that a derivative of the rule (d/dx of the kernel gradient) takes
    the sliced input tangent too: lax's strided convolution there aborted."""
    lhs, rhs = primals
    lhs_dot, rhs_dot = tangents
    y = _conv_sliced_input_tangent(lhs, rhs, static)
    terms = []
    if not isinstance(lhs_dot, SymbolicZero):
        dn = _spatial_dims(lhs, rhs, dict(static.options)["dimension_numbers"])
        full = static.conv(lhs_dot, rhs, (1,) * len(static.strides))
        step = [1] * y.ndim
        for axis, s in zip(dn.out_spec[2:], static.strides, strict=True):
            step[axis] = s
        # The barrier keeps XLA from folding the transpose's zeros (`lax.pad`) back into an
        # input-dilated convolution (FoldConvInputPad), the form that aborts.
        terms.append(lax.slice(lax.optimization_barrier(full), (0,) * y.ndim, full.shape, step))
    if not isinstance(rhs_dot, SymbolicZero):  # this function again: its own derivatives safe
        terms.append(_conv_sliced_input_tangent(lhs, rhs_dot, static))
    return y, functools.reduce(lax.add, terms) if terms else jnp.zeros_like(y)


_conv_sliced_input_tangent.defjvp(_conv_sliced_input_tangent_jvp, symbolic_zeros=True)


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
        return conv_general_dilated(
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
    custom `conv_general_dilated` other than this module's) computes its convolution with
    `impl`'s function.

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
                or module.conv_general_dilated not in (None, conv_general_dilated)
                or module.conv_general_dilated_cls is not None):
            return next_fun(*args, **kwargs)
        # Modules are frozen dataclasses; set the field for this one call and restore it.
        own = module.conv_general_dilated
        object.__setattr__(module, "conv_general_dilated", function)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "conv_general_dilated", own)

    with nn.intercept_methods(interceptor):
        yield


def cpu_lowerings_apply() -> bool:
    """Whether layers take their CPU-specific lowering (`ConvTranspose2D`'s phases or explicit
    dilation, `conv_general_dilated`'s sliced input gradient): on the CPU backend, outside
    `xla_convolutions()`."""
    return not lowerings_suspended() and jax.default_backend() == "cpu"


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

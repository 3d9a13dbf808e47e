"""Convolution layers (NHWC, flax.linen): shared, grouped, unshared, tiled and transposed.

Per spatial dimension, with input size `n`, kernel `k`, stride `s`, dilation `d` and padding
`(lo, hi)` (after resolving "SAME"/"VALID"), the effective kernel is `d·(k − 1) + 1` and

- `Conv2D`, `LocallyConnected2D`, `TiledConv2D`: `out = floor((n + lo + hi − d·(k − 1) − 1)/s) + 1`
  (the classic `(W − F + 2P)/S + 1`); "SAME" gives `ceil(n/s)`, "VALID" is `lo = hi = 0`.
- `ConvTranspose2D`: `out = (n − 1)·s − lo − hi + d·(k − 1) + output_padding + 1`
  (PyTorch's `ConvTranspose2d` convention; `lo = hi = p` for an int padding).

Every hyperparameter is checked in Python at construction; checks that need the input (channels
divisible by groups, effective kernel larger than the padded input) run at the start of
`__call__`, from static shapes, before anything is traced.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen.dtypes import promote_dtype
from jax import lax

from cnnjax.layers.conv_impl import (
    INTERCEPTED_CONV_CLASSES,
    conv_general_dilated,
    cpu_lowerings_apply,
    input_gradient_sliced,
    input_patches,
)
from cnnjax.layers.padding import (
    PADDING_MODES,
    PaddingSpec,
    Pads,
    normalize_padding,
    pad_nhwc,
    same_padding,
)
from cnnjax.utils.validation import (
    INPUT_TOO_SMALL_HINT,
    check_bool,
    check_choice,
    check_layer_dtypes,
    check_nhwc_nonempty,
    check_positive_int,
    invalid,
    is_integer,
    to_pair,
)

Array = jax.Array
Dtype = Any
Initializer = Any
IntPair = int | Sequence[int]
ConvPadding = str | PaddingSpec

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

default_kernel_init = nn.initializers.lecun_normal()
"""Default kernel init of `Conv2D`, `ConvTranspose2D` (as `nn.Conv`): LeCun normal over fan-in."""

local_kernel_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0, 1)
)
"""LeCun normal for per-position kernels `(P_h, P_w, ..., in, out)`: the two leading
position axes are batch axes, so the fan-in is that of one position's kernel (flax's default for
`nn.ConvLocal` would also count the output positions and shrink the scale)."""

tiled_kernel_init = local_kernel_init
"""Default kernel init of `TiledConv2D` `(t_h, t_w, k_h, k_w, in, out)`: fan-in `k_h·k_w·in`."""


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Normalized window hyperparameters of a 2-D convolution."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilation: tuple[int, int]
    padding: str | Pads  # "SAME", "VALID" or explicit ((top, bottom), (left, right))
    mode: str

    @property
    def effective_kernel(self) -> tuple[int, int]:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation, strict=True))

    def resolve(self, owner: str, x: Array) -> tuple[Pads, tuple[int, int]]:
        """Explicit pads and output `(H, W)` for input `x`; raises if the kernel does not fit."""
        _check_conv_input(owner, x)
        size = x.shape[1:3]
        if self.padding == "VALID":
            pads: Pads = ((0, 0), (0, 0))
        elif self.padding == "SAME":
            pads = tuple(  # type: ignore[assignment]
                same_padding(n, k, s, d)
                for n, k, s, d in zip(size, self.kernel, self.strides, self.dilation, strict=True)
            )
        else:
            pads = self.padding  # type: ignore[assignment]
        out = []
        for axis, n, (lo, hi), ek, s in zip(
            ("height", "width"), size, pads, self.effective_kernel, self.strides, strict=True
        ):
            padded = n + lo + hi
            if ek > padded:
                raise invalid(
                    owner, "kernel_size", self.kernel,
                    f"the effective kernel {axis} {ek} (dilation·(kernel−1)+1 with "
                    f"dilation={self.dilation}) must not exceed the padded input {axis} "
                    f"{padded} (input {n} + padding {lo} + {hi}){INPUT_TOO_SMALL_HINT}",
                )
            out.append((padded - ek) // s + 1)
        return pads, (out[0], out[1])


def _geometry(
    owner: str, kernel_size: IntPair, strides: IntPair, padding: ConvPadding,
    padding_mode: str, dilation: IntPair,
) -> _Geometry:
    """Validates and normalizes kernel/stride/dilation/padding/mode of a conv-like layer."""
    kernel = to_pair(owner, "kernel_size", kernel_size, minimum=1)
    stride_pair = to_pair(owner, "strides", strides, minimum=1)
    dilation_pair = to_pair(owner, "dilation", dilation, minimum=1)
    check_choice(owner, "padding_mode", padding_mode, PADDING_MODES)
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise invalid(
                owner, "padding", padding,
                "expected 'SAME', 'VALID', an int, a pair (pad_h, pad_w) or "
                "((top, bottom), (left, right))",
            )
        pads: str | Pads = padding.upper()
    else:
        pads = normalize_padding(owner, padding)
    return _Geometry(kernel, stride_pair, dilation_pair, pads, padding_mode)


def _check_groups(owner: str, features: int, groups: int) -> None:
    check_positive_int(owner, "features", features)
    check_positive_int(owner, "groups", groups)
    if features % groups:
        raise invalid(
            owner, "groups", groups,
            f"the output channels (features={features}) must be divisible by groups",
        )


def _precision_name(value: Any) -> bool:
    """Whether `value` is a `lax.Precision` or one of its names ("highest", "float32", ...)."""
    if isinstance(value, lax.Precision):
        return True
    if not isinstance(value, str):
        return False
    try:
        lax.Precision(value)
    except ValueError:
        return False
    return True


def _check_precision(module: nn.Module) -> None:
    """`precision` must be a form `lax` accepts: a misspelt one ("hihgest") failed only when
    traced, in lax's words and without the layer's name."""
    value = module.precision
    if (value is None or _precision_name(value)
            or isinstance(value, lax.DotAlgorithm | lax.DotAlgorithmPreset)
            or (isinstance(value, str) and value in lax.DotAlgorithmPreset.__members__)
            or (isinstance(value, list | tuple) and len(value) == 2
                and all(_precision_name(v) for v in value))):
        return
    raise invalid(type(module).__name__, "precision", value,
                  "expected None, a lax.Precision or its name ('default', 'high', 'highest', "
                  "...), a pair of those, or a lax.DotAlgorithmPreset or its name")


def _check_conv_input(owner: str, x: Array) -> None:
    """A rank-4 NHWC input with a non-empty map and at least one channel (a kernel over 0 input
    channels has no fan-in: flax's initializer would divide by zero)."""
    check_nhwc_nonempty(owner, x)
    if x.shape[-1] < 1:
        raise invalid(owner, "input.shape", tuple(x.shape),
                      "expected at least 1 input channel in an NHWC array")


def _check_input_groups(owner: str, x: Array, groups: int) -> None:
    channels = x.shape[-1]
    if channels % groups:
        raise invalid(
            owner, "groups", groups,
            f"the input channels ({channels}) must be divisible by groups",
        )


def add_bias(y: Array, bias: Array) -> Array:
    """`y + bias` in `y`'s dtype, added in at least float32. The bias gradient is the output
    cotangent summed over every position the bias is broadcast to; added in bfloat16, XLA:CPU
    summed it in bfloat16, whose running sum stalls once its ulp exceeds twice a term (a
    17x17 map of 8 images: 78% low). The sum is rounded to `y`'s dtype once; XLA may keep a
    conv's float32 result through the add, so outputs can be an ulp closer to the exact value
    than a bfloat16 add (3x3 conv, 8 -> 5 channels: mean |error| vs float64 0.028, not 0.039)."""
    wide = jnp.promote_types(y.dtype, jnp.float32)
    return (y.astype(wide) + bias.astype(wide)).astype(y.dtype)


def promote_with_wide_bias(*args: Any, dtype: Any = None, inexact: bool = True) -> list:
    """flax's `promote_dtype` for `nn.Conv`/`nn.ConvLocal`/`nn.Dense`, except that the bias
    comes back widened to at least float32 (after rounding to the compute dtype, as flax rounds
    it): the layer's `y += bias` then runs in float32 and its gradient sums in float32 (see
    `add_bias`); the wrapping layer casts the output back to the compute dtype."""
    inputs, kernel, bias = promote_dtype(*args, dtype=dtype, inexact=inexact)
    if bias is not None:
        bias = bias.astype(jnp.promote_types(bias.dtype, jnp.float32))
    return [inputs, kernel, bias]


def output_dtype(module: nn.Module, x: Array) -> Any:
    """The dtype flax's `promote_dtype` computes a layer (conv or dense) in: `dtype`, else that
    of the input and the parameters together."""
    if module.dtype is not None:
        return jnp.dtype(module.dtype)
    return jnp.dtype(jnp.result_type(x.dtype, module.param_dtype))


def _flax_padding(geo: _Geometry) -> str | list[tuple[int, int]]:
    """Padding handed to the flax conv: zeros pad inside the conv; other modes pad beforehand."""
    if geo.mode != "zeros":
        return "VALID"
    if isinstance(geo.padding, str):
        return geo.padding
    return [tuple(p) for p in geo.padding]


class _OneRecordPerCall:
    """Mixin for the flax layer a cnnjax layer wraps with its scope shared: where
    `capture_intermediates` records the wrapper's output too (in the same scope), its own output
    (before the wrapper's cast) is not recorded, so there is one entry per layer call (as for
    `BatchNorm` and `Dense`, which call flax's body). A filter that selects only the flax layer
    (`isinstance(m, nn.Conv)`) still gets its output. The filter is asked about the wrapper
    once more per call, so a filter that counts its calls sees that one too."""

    @nn.nowrap
    def sow(self, col: str, name: str, value: Any, *args: Any, **kwargs: Any) -> bool:
        if col == "intermediates" and name == "__call__" and _captured(self.parent, name):
            return False
        return super().sow(col, name, value, *args, **kwargs)


def _captured(module: Any, method_name: str) -> bool:
    """Whether the active `capture_intermediates` filter records `module`'s `method_name` (flax
    keeps the filter in its module context; False where that is not found)."""
    from flax.linen import module as flax_module

    stack = getattr(getattr(flax_module, "_context", None), "capture_stack", None)
    selects = stack[-1] if stack else None
    return bool(selects and isinstance(module, nn.Module) and selects(module, method_name))


class _WrappedConv(_OneRecordPerCall, nn.Conv):
    """`nn.Conv` inside `Conv2D`, convolving with `conv_impl.conv_general_dilated` (lax's, with
    an input derivative XLA:CPU compiles for every geometry)."""

    conv_general_dilated: Callable[..., Array] | None = conv_general_dilated


INTERCEPTED_CONV_CLASSES.add(_WrappedConv)


class _WrappedConvLocal(_OneRecordPerCall, nn.ConvLocal):
    """`nn.ConvLocal` inside `LocallyConnected2D`."""


class Conv2D(nn.Module):
    """2-D convolution over `flax.linen.Conv`, adding padding modes, explicit pads and groups.

    Output `(N, H_out, W_out, features)`, `H_out = floor((H + top + bottom − d·(k−1) − 1)/s) + 1`
    ("SAME": `ceil(H/s)`). `padding` is an int, `(ph, pw)`, `((top, bottom), (left, right))`,
    "SAME" or "VALID"; `padding_mode` is "zeros", "reflect", "replicate" (edge) or "circular".
    Non-zero modes pad explicitly (`pad_nhwc`; "SAME" pads computed as in TF/XLA) and then run the
    conv with VALID padding. `groups` is `feature_group_count` (AlexNet's two towers): each of the
    `groups` blocks of `features/groups` outputs sees only its block of `C_in/groups` inputs.
    Parameters are `nn.Conv`'s, at this module's level: `kernel (k_h, k_w, C_in/groups, features)`
    and `bias (features,)`, i.e. `features·(C_in/groups·k_h·k_w + 1)` numbers.
    """

    features: int
    kernel_size: IntPair
    strides: IntPair = 1
    padding: ConvPadding = 0
    padding_mode: str = "zeros"
    dilation: IntPair = 1
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    def __post_init__(self) -> None:
        _check_groups(type(self).__name__, self.features, self.groups)
        _geometry(type(self).__name__, self.kernel_size, self.strides, self.padding,
                  self.padding_mode, self.dilation)
        check_bool(type(self).__name__, "use_bias", self.use_bias)
        check_layer_dtypes(self)
        _check_precision(self)
        super().__post_init__()

    def setup(self) -> None:
        """Builds the wrapped `nn.Conv`, its scope shared so `kernel`/`bias` are this module's."""
        geo = _geometry(type(self).__name__, self.kernel_size, self.strides, self.padding,
                        self.padding_mode, self.dilation)
        self.conv = _WrappedConv(
            features=self.features, kernel_size=geo.kernel, strides=geo.strides,
            padding=_flax_padding(geo), kernel_dilation=geo.dilation,
            feature_group_count=self.groups, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision,
            kernel_init=self.kernel_init, bias_init=self.bias_init,
            promote_dtype=promote_with_wide_bias,
        )
        nn.share_scope(self, self.conv)  # params stay `kernel`/`bias` of this module

    def __call__(self, x: Array) -> Array:
        """`[N, H, W, C_in]` -> `[N, H_out, W_out, features]`; non-zero modes pad `x` first."""
        owner = type(self).__name__
        geo = _geometry(owner, self.kernel_size, self.strides, self.padding,
                        self.padding_mode, self.dilation)
        pads, _ = geo.resolve(owner, x)
        _check_input_groups(owner, x, self.groups)
        _check_kernel_channels(self, x, self.groups)
        if geo.mode != "zeros":
            x = pad_nhwc(x, pads, geo.mode, owner=owner, given=self.padding)
        return self.conv(x).astype(output_dtype(self, x))


def _check_kernel_channels(layer: nn.Module, x: Array, groups: int = 1) -> None:
    """Refuses an input whose channels differ from those the layer's kernel (input channels on
    its second-to-last axis) was created for: flax's ScopeParamShapeError names neither."""
    if not layer.has_variable("params", "kernel"):
        return  # Initialization: the kernel is created for this input.
    built = layer.get_variable("params", "kernel").shape[-2] * groups
    if built != x.shape[-1]:
        raise invalid(type(layer).__name__, "input.shape", tuple(x.shape),
                      f"its kernel was created for {built} input channels, this input has "
                      f"{x.shape[-1]}; a layer takes the channel count it was initialized with")


class LocallyConnected2D(nn.Module):
    """Unshared convolution over `flax.linen.ConvLocal`: a separate kernel at each output position.

    Same window arithmetic and padding options as `Conv2D` (output
    `floor((H + top + bottom − d·(k−1) − 1)/s) + 1` per dimension; strides, dilation, "SAME",
    "VALID", explicit pads, all padding modes); no groups. Parameters (shapes fixed by the first
    input): `kernel (H_out, W_out, C_in·k_h·k_w, features)` whose third axis is ordered
    `(C_in, k_h, k_w)` (the `lax.conv_general_dilated_patches` order), and `bias
    (H_out, W_out, features)` — one bias per output position *and* channel, as in
    `nn.ConvLocal` and Keras' `LocallyConnected2D`.
    """

    features: int
    kernel_size: IntPair
    strides: IntPair = 1
    padding: ConvPadding = 0
    padding_mode: str = "zeros"
    dilation: IntPair = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = local_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    def __post_init__(self) -> None:
        check_positive_int(type(self).__name__, "features", self.features)
        _geometry(type(self).__name__, self.kernel_size, self.strides, self.padding,
                  self.padding_mode, self.dilation)
        check_bool(type(self).__name__, "use_bias", self.use_bias)
        check_layer_dtypes(self)
        _check_precision(self)
        super().__post_init__()

    def setup(self) -> None:
        """Builds the wrapped `nn.ConvLocal`, its scope shared: the parameters are this module's."""
        geo = _geometry(type(self).__name__, self.kernel_size, self.strides, self.padding,
                        self.padding_mode, self.dilation)
        self.conv = _WrappedConvLocal(
            features=self.features, kernel_size=geo.kernel, strides=geo.strides,
            padding=_flax_padding(geo), kernel_dilation=geo.dilation, use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            kernel_init=self.kernel_init, bias_init=self.bias_init,
            promote_dtype=promote_with_wide_bias,
        )
        nn.share_scope(self, self.conv)
        # The same layer as a 1x1 one over the input's patches: the same parameters (shapes,
        # (C, k_h, k_w) order, initial values), for the geometries `__call__` routes to it.
        self.conv_on_patches = _WrappedConvLocal(
            features=self.features, kernel_size=(1, 1), padding="VALID", use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            kernel_init=self.kernel_init, bias_init=self.bias_init,
            promote_dtype=promote_with_wide_bias,
        )
        nn.share_scope(self, self.conv_on_patches)

    def __call__(self, x: Array) -> Array:
        """`[N, H, W, C_in]` -> `[N, H_out, W_out, features]`, for the input size the per-position
        parameters were created for. Where lax's input gradient of the patch extraction would
        abort XLA:CPU (`conv_impl.input_gradient_sliced`), the patches come from
        `conv_impl.input_patches` and a 1x1 locally connected layer weighs them."""
        owner = type(self).__name__
        # a NumPy float64 input as JAX holds it (float32 without x64): flax's ConvLocal probes
        # its output shape in the input's dtype and failed on the mix with its float32 kernel
        x = jnp.asarray(x)
        geo = _geometry(owner, self.kernel_size, self.strides, self.padding,
                        self.padding_mode, self.dilation)
        pads, out = geo.resolve(owner, x)
        self._check_input_matches_parameters(x, out, geo.kernel)
        if geo.mode != "zeros":
            x = pad_nhwc(x, pads, geo.mode, owner=owner, given=self.padding)
            pads = ((0, 0), (0, 0))
        patch_kernel = jax.ShapeDtypeStruct(  # `conv_impl.patch_kernel`'s shape
            (*geo.kernel, 1, x.shape[-1] * math.prod(geo.kernel)), x.dtype)
        if input_gradient_sliced(x, patch_kernel, geo.strides, pads, rhs_dilation=geo.dilation,
                                 dimension_numbers=_DIMENSION_NUMBERS,
                                 feature_group_count=x.shape[-1]):
            y = self.conv_on_patches(input_patches(x, geo.kernel, geo.strides, pads,
                                                   geo.dilation, self.precision))
        else:
            y = self.conv(x)
        return y.astype(output_dtype(self, x))

    def _check_input_matches_parameters(self, x: Array, out: tuple[int, int],
                                        kernel: tuple[int, int]) -> None:
        """Refuses an input whose output grid or channels differ from those the per-position
        parameters were created for (flax would raise a ScopeParamShapeError naming neither)."""
        if not self.has_variable("params", "kernel"):
            return  # Initialization: the parameters are created for this input.
        have = tuple(self.get_variable("params", "kernel").shape)
        want = (*out, x.shape[-1] * kernel[0] * kernel[1], self.features)
        if have != want:
            built_channels = have[2] // (kernel[0] * kernel[1])
            raise invalid(
                type(self).__name__, "input.shape", tuple(x.shape),
                f"its parameters (kernel {have}) were created for a {have[0]}x{have[1]} output "
                f"grid from {built_channels} input channels, this input gives a "
                f"{out[0]}x{out[1]} grid from {x.shape[-1]}; a locally connected layer takes "
                "only the input height, width and channels it was initialized with",
            )


class TiledConv2D(nn.Module):
    """Tiled convolution (Goodfellow et al., Deep Learning §9.5): `t_h × t_w` kernel sets cycled.

    Output position `(i, j)` uses kernel set `(i mod t_h, j mod t_w)`; `tile_size=1` is an
    ordinary convolution and `tile_size = (H_out, W_out)` is a locally connected layer. Output
    size and padding options as `Conv2D`: `floor((H + top + bottom − d·(k−1) − 1)/s) + 1`.
    Parameters: `kernel (t_h, t_w, k_h, k_w, C_in, features)` (`kernel[a, b]` is an ordinary HWIO
    kernel) and `bias (t_h, t_w, features)`. `tile_size` may not exceed the output size (unused
    kernel sets).

    Cost: the multiply-accumulates of one ordinary convolution, `N·H_out·W_out·C_in·k_h·k_w·
    features` (no `t²` redundant convolutions). Kernel set `(a, b)` is an ordinary convolution
    evaluated only at its positions `(a::t_h, b::t_w)`: windows from offset `(a·s_h, b·s_w)` of
    the padded input, strides `(t_h·s_h, t_w·s_w)`; the `t_h·t_w` results are interleaved by
    zero-dilating pads and `t_h + t_w − 2` output-sized adds. Every op is a plain window op, so
    `cnnjax.analysis` traces the exact receptive field, and there is no patch matrix: XLA:GPU
    (jaxlib 0.11.2) aborted compiling the gradient of the earlier patches-times-kernel form
    (docs/performance.md, "First GPU figures"). For tiles near the output size prefer
    `LocallyConnected2D` (one contraction instead of `t_h·t_w`).
    """

    features: int
    kernel_size: IntPair
    tile_size: IntPair = 2
    strides: IntPair = 1
    padding: ConvPadding = 0
    padding_mode: str = "zeros"
    dilation: IntPair = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = tiled_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "features", self.features)
        to_pair(owner, "tile_size", self.tile_size, minimum=1)
        _geometry(owner, self.kernel_size, self.strides, self.padding, self.padding_mode,
                  self.dilation)
        check_bool(owner, "use_bias", self.use_bias)
        check_layer_dtypes(self)
        _check_precision(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """`[N, H, W, C_in]` -> `[N, H_out, W_out, features]`: one strided convolution per kernel
        set, interleaved."""
        owner = type(self).__name__
        geo = _geometry(owner, self.kernel_size, self.strides, self.padding,
                        self.padding_mode, self.dilation)
        pads, (out_h, out_w) = geo.resolve(owner, x)
        th, tw = to_pair(owner, "tile_size", self.tile_size, minimum=1)
        if th > out_h or tw > out_w:
            raise invalid(
                owner, "tile_size", self.tile_size,
                f"expected at most the output size ({out_h}, {out_w}); larger tiles leave "
                "kernel sets that no output position uses",
            )
        (kh, kw), c_in = geo.kernel, x.shape[-1]
        _check_kernel_channels(self, x)
        kernel = self.param("kernel", self.kernel_init, (th, tw, kh, kw, c_in, self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (th, tw, self.features), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        # A kernel set whose windows start at or past the input's end (a high pad wider than
        # the input) cannot start on a slice of `x`: its zeros are padded in explicitly.
        past_end = any((t - 1) * s - low >= n for t, s, (low, _), n in
                       zip((th, tw), geo.strides, pads, x.shape[1:3], strict=True))
        if geo.mode != "zeros" or past_end:
            x, pads = pad_nhwc(x, pads, geo.mode, owner=owner, given=self.padding), ((0, 0), (0, 0))
        rows = []
        for a in range(th):
            columns = [_tile_phase(x, pads, kernel, bias, (a, b), (th, tw), geo, self.precision)
                       for b in range(tw)]
            rows.append(_interleave(columns, axis=2, size=out_w))
        return _interleave(rows, axis=1, size=out_h)


def _tile_phase(x: Array, pads: Pads, kernel: Array, bias: Array | None, phase: tuple[int, int],
                tile: tuple[int, int], geo: _Geometry, precision: Any) -> Array:
    """Outputs `(a::t_h, b::t_w)` of a tiled convolution: kernel set (a, b) as an ordinary
    convolution whose windows start at `(a·s_h, b·s_w)` of the zero-padded input, strides `t·s`.

    The start is a slice of `x` where it lies past the low pad, else a smaller low pad, so zero
    padding stays the convolution's own (its taps count no FLOPs, as in `Conv2D`)."""
    (a, b), (th, tw) = phase, tile
    starts, conv_pads = [0], []
    for offset, (low, high) in zip((a * geo.strides[0], b * geo.strides[1]), pads, strict=True):
        starts.append(max(offset - low, 0))
        conv_pads.append((max(low - offset, 0), high))
    part = lax.slice(x, (*starts, 0), x.shape)
    y = lax.conv_general_dilated(part, kernel[a, b], (th * geo.strides[0], tw * geo.strides[1]),
                                 conv_pads, rhs_dilation=geo.dilation,
                                 dimension_numbers=_DIMENSION_NUMBERS, precision=precision)
    return y if bias is None else add_bias(y, bias[a, b])


def _interleave(parts: Sequence[Array], axis: int, size: int) -> Array:
    """Interleaves `parts[p]` (positions p, p + T, p + 2T ... of `axis`, T = len(parts)) into
    `size` positions: each part is zero-dilated and shifted by one `lax.pad`, then summed."""
    stride, out = len(parts), None
    for p, part in enumerate(parts):
        config = [(0, 0, 0)] * part.ndim
        config[axis] = (p, size - p - (part.shape[axis] - 1) * stride - 1, stride - 1)
        padded = lax.pad(part, jnp.zeros((), part.dtype), config)
        out = padded if out is None else out + padded
    return out


class ConvTranspose2D(nn.Module):
    """Transposed convolution ("deconvolution"), the adjoint of `Conv2D`, PyTorch conventions.

    Output size per dimension: `(n − 1)·s − lo − hi + d·(k − 1) + output_padding + 1`, where
    `padding` (int, `(ph, pw)` or `((top, bottom), (left, right))`) crops `lo`/`hi` from the full
    transposed output and `output_padding` (< max(stride, dilation)) adds rows/columns at the
    bottom/right, resolving which of the `s` input sizes a strided conv maps to the same size.
    Each input pixel `x[i]` scatters `x[i]·kernel[a]` to output `i·s + a·d − lo`.
    Parameters: `kernel (k_h, k_w, C_in/groups, features)` in that scatter orientation (PyTorch's
    `weight (C_in, features/groups, k_h, k_w)` for groups=1 is `weight.transpose(2, 3, 0, 1)`;
    TensorFlow's `conv2d_transpose` filter `(k_h, k_w, features, C_in)` is
    `kernel.transpose(0, 1, 3, 2)`), and `bias (features,)`.

    Computed as `lax.conv_transpose` does — a stride-1 convolution of the `s`-dilated input with
    the spatially flipped kernel — via `lax.conv_general_dilated` directly, because
    `lax.conv_transpose` has no `feature_group_count` for `groups`. With a stride > 1 it is
    instead `s_h·s_w` ordinary convolutions of the undilated input, one per output phase
    (`_transposed_phases`), interleaved as `TiledConv2D`'s, while `s_h·s_w` is at most
    `MAX_PHASES` (`MAX_PHASES_GROUPED` with `groups` > 1): on XLA:CPU the input-dilated form's
    kernel gradient is 7-18x slower, and with groups its forward pass 2-30x (docs/performance.md);
    more phases compile too slowly (64: 5 s). An output side below its stride (no phase form)
    has its input dilated by `lax.pad` on the CPU instead: XLA:CPU aborted the process on some
    such input-dilated convolutions. Same sums; `cnnjax.analysis` traces the input-dilated form
    (`conv_impl.xla_convolutions`), whose receptive field it knows exactly.
    """

    features: int
    kernel_size: IntPair
    strides: IntPair = 1
    padding: PaddingSpec = 0
    output_padding: IntPair = 0
    dilation: IntPair = 1
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    def __post_init__(self) -> None:
        _transpose_geometry(self)
        check_bool(type(self).__name__, "use_bias", self.use_bias)
        check_layer_dtypes(self)
        _check_precision(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """`[N, H, W, C_in]` -> `[N, H_out, W_out, features]` (output size in the class docstring),
        per output phase or as one convolution of the (explicitly or `lhs_dilation`-) dilated
        input."""
        owner = type(self).__name__
        _check_conv_input(owner, x)  # an empty map would give an output of only the bias
        geo, out_pad = _transpose_geometry(self)
        _check_input_groups(owner, x, self.groups)
        conv_pads, out_size = [], []
        for n, k, s, d, (lo, hi), op in zip(x.shape[1:3], geo.kernel, geo.strides, geo.dilation,
                                            geo.padding, out_pad, strict=True):
            full = d * (k - 1)
            conv_pads.append((full - lo, full - hi + op))  # negative entries crop
            out_size.append((n - 1) * s - lo - hi + full + op + 1)
        if min(out_size) < 1:
            raise invalid(
                owner, "padding", self.padding,
                f"the output would be {out_size[0]}x{out_size[1]} for a "
                f"{x.shape[1]}x{x.shape[2]} input; (in−1)·s − lo − hi + d·(k−1) + "
                "output_padding + 1 must be >= 1",
            )
        kh, kw = geo.kernel
        _check_kernel_channels(self, x, self.groups)
        kernel = self.param("kernel", self.kernel_init,
                            (kh, kw, x.shape[-1] // self.groups, self.features), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        if _use_phases(geo.strides, out_size, self.groups):
            y = _transposed_phases(x, kernel, geo, out_size, self.groups, self.precision)
        elif _dilates_input_explicitly(geo.strides, out_size):
            y = _explicitly_dilated_conv(x, kernel[::-1, ::-1], conv_pads, geo.strides,
                                         rhs_dilation=geo.dilation,
                                         feature_group_count=self.groups,
                                         precision=self.precision)
        else:
            y = _conv_cropping(x, kernel[::-1, ::-1], conv_pads, lhs_dilation=geo.strides,
                               rhs_dilation=geo.dilation, feature_group_count=self.groups,
                               precision=self.precision)
        if bias is not None:
            y = add_bias(y, bias)
        return y


def _conv_cropping(x: Array, kernel: Array, pads: Sequence[tuple[int, int]],
                   **kwargs: Any) -> Array:
    """A stride-1 `lax.conv_general_dilated` whose `pads` may be negative (a crop), computed with
    the negative entries as 0 and its output cropped instead: a stride-1 output shifts by one
    position per padded row. XLA:CPU's convolution read outside its input for a negative low
    pad beside a positive high one (openxla/xla#48713; wrong values, even uninitialised ones)."""
    clamped = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
    y = lax.conv_general_dilated(x, kernel, (1, 1), clamped,
                                 dimension_numbers=_DIMENSION_NUMBERS, **kwargs)
    if clamped == [tuple(p) for p in pads]:
        return y
    (lo_h, hi_h), (lo_w, hi_w) = pads
    return lax.slice(y, (0, -min(lo_h, 0), -min(lo_w, 0), 0),
                     (y.shape[0], y.shape[1] + min(hi_h, 0), y.shape[2] + min(hi_w, 0),
                      y.shape[3]))


def _dilates_input_explicitly(strides: Sequence[int], out_size: Sequence[int]) -> bool:
    """Whether a transposed convolution with no per-phase form (an output side below its stride)
    dilates its input with `lax.pad` instead of `lhs_dilation`: on the CPU, outside
    `xla_convolutions()`. XLA:CPU aborts the process on some such input-dilated convolutions
    (algebraic_simplifier "Window dimensions do not match RHS shape", jax 0.10-0.11; e.g. kernel
    (2, 4), stride 2, padding ((3, 2), (2, 1)), output_padding (0, 1) on a 3x2 input); outputs
    this small cost nothing either way."""
    if not cpu_lowerings_apply():
        return False
    return any(o < s for o, s in zip(out_size, strides, strict=True))


def _explicitly_dilated_conv(x: Array, kernel: Array, pads: Sequence[tuple[int, int]],
                             strides: Sequence[int], **kwargs: Any) -> Array:
    """`lax.conv_general_dilated(x, kernel, 1, pads, lhs_dilation=strides)` as `lax.pad` (zeros
    between inputs, `pads` around them; a negative entry crops, as `lax.pad` does exactly) and
    an unpadded stride-1 convolution."""
    config = [(0, 0, 0), *((lo, hi, s - 1) for (lo, hi), s in zip(pads, strides, strict=True)),
              (0, 0, 0)]
    # The barrier keeps XLA from folding the zeros back into `lhs_dilation` (FoldConvInputPad).
    dilated = lax.optimization_barrier(lax.pad(x, jnp.zeros((), x.dtype), config))
    return lax.conv_general_dilated(dilated, kernel, (1, 1), "VALID",
                                    dimension_numbers=_DIMENSION_NUMBERS, **kwargs)


#: `ConvTranspose2D` runs as one convolution per output phase up to this many phases (s_h·s_w).
MAX_PHASES = 16
#: The same with `groups` > 1, whose input-dilated form XLA:CPU runs 2-30x slower even forward.
MAX_PHASES_GROUPED = 64


def _use_phases(strides: Sequence[int], out_size: Sequence[int], groups: int) -> bool:
    """Whether a transposed convolution runs as per-phase convolutions (`_transposed_phases`):
    on the CPU (accelerator libraries have their own transposed kernels), outside
    `xla_convolutions()`, strided, every output dimension at least its stride (each phase has
    an output) and not more phases than `MAX_PHASES` / `MAX_PHASES_GROUPED` allow."""
    if not cpu_lowerings_apply():
        return False
    limit = MAX_PHASES_GROUPED if groups > 1 else MAX_PHASES
    return 1 < strides[0] * strides[1] <= limit and all(
        o >= s for o, s in zip(out_size, strides, strict=True))


@dataclasses.dataclass(frozen=True)
class _Phase:
    """The kernel taps reaching one output phase of a transposed convolution along one axis:
    `taps` (a range of tap indices; empty if none), the input offset of the last tap `low`
    (outputs `m` of the phase read inputs `m − low + u·step`) and the phase's output count."""

    taps: range
    step: int  # input distance between consecutive taps: d / gcd(s, d)
    low: int
    size: int


def _phases(n: int, k: int, s: int, d: int, lo: int, out: int) -> list[_Phase]:
    """Per output phase `p` (outputs `p, p + s, ...`) the taps reaching it: input `i` and tap `a`
    scatter to output `i·s + a·d − lo`, so the phase gets the taps with `a·d ≡ p + lo (mod s)`,
    spaced `s / gcd(s, d)` apart, each reading input `m + (p + lo − a·d)/s` for output `m`."""
    g = math.gcd(s, d)
    phases = []
    for p in range(s):
        c = p + lo
        first = next((a for a in range(min(k, s // g)) if (a * d - c) % s == 0), None)
        taps = range(0) if first is None else range(first, k, s // g)
        low = 0 if not taps else (taps[-1] * d - c) // s
        phases.append(_Phase(taps, d // g, low, -(-(out - p) // s)))
    return phases


def _transposed_phases(x: Array, kernel: Array, geo: _Geometry, out_size: Sequence[int],
                       groups: int, precision: Any) -> Array:
    """A transposed convolution (scatter kernel `kernel`, geometry `geo`, output `out_size` after
    cropping, every output dimension at least its stride) as one ordinary stride-1 convolution
    of the undilated input per output phase: phase `(p, q)` sums the taps of `_phases`, in
    reverse (the last tap reads the lowest input), and the phases are interleaved."""
    per_axis = [
        _phases(n, k, s, d, lo, out)
        for n, k, s, d, (lo, _), out in zip(x.shape[1:3], geo.kernel, geo.strides, geo.dilation,
                                             geo.padding, out_size, strict=True)
    ]
    rows = []
    for ph in per_axis[0]:
        columns = []
        for pw in per_axis[1]:
            if not ph.taps or not pw.taps:
                columns.append(jnp.zeros((x.shape[0], ph.size, pw.size, kernel.shape[-1]),
                                         x.dtype))
                continue
            sub = lax.rev(lax.slice(kernel, (ph.taps.start, pw.taps.start, 0, 0),
                                    (ph.taps[-1] + 1, pw.taps[-1] + 1, *kernel.shape[2:]),
                                    (ph.taps.step, pw.taps.step, 1, 1)), (0, 1))
            pads = [(t.low, t.size - n - t.low + t.step * (len(t.taps) - 1))
                    for t, n in zip((ph, pw), x.shape[1:3], strict=True)]
            columns.append(_conv_cropping(x, sub, pads, rhs_dilation=(ph.step, pw.step),
                                          feature_group_count=groups, precision=precision))
        rows.append(_interleave(columns, axis=2, size=out_size[1]))
    return _interleave(rows, axis=1, size=out_size[0])


def _transpose_geometry(layer: ConvTranspose2D) -> tuple[_Geometry, tuple[int, int]]:
    """Validates a `ConvTranspose2D`'s hyperparameters; returns its geometry and output padding."""
    owner = type(layer).__name__
    _check_groups(owner, layer.features, layer.groups)
    if isinstance(layer.padding, str):
        raise invalid(owner, "padding", layer.padding,
                      "expected an int, a pair (pad_h, pad_w) or ((top, bottom), (left, right))")
    geo = _geometry(owner, layer.kernel_size, layer.strides, layer.padding, "zeros",
                    layer.dilation)
    out_pad = to_pair(owner, "output_padding", layer.output_padding, minimum=0)
    limit = tuple(max(s, d) for s, d in zip(geo.strides, geo.dilation, strict=True))
    if any(op >= lim for op, lim in zip(out_pad, limit, strict=True)):
        raise invalid(
            owner, "output_padding", layer.output_padding,
            f"expected output_padding < max(stride, dilation) = {limit} in each dimension",
        )
    return geo, out_pad


def bilinear_kernel_1d(size: int) -> np.ndarray:
    """The 1-D factor of the FCN bilinear upsampling kernel of length `size` (float64).

    `f[i] = 1 − |i − c|/m` with `m = ceil(size/2)`, `c = m − 1` (odd size) or `m − 0.5` (even);
    e.g. size 4 (stride 2) gives `[0.25, 0.75, 0.75, 0.25]`.
    """
    size = check_positive_int("bilinear_kernel_1d", "size", size)
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    return 1.0 - np.abs(np.arange(size) - center) / factor


def bilinear_upsample_init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    """`ConvTranspose2D` kernel initializer for bilinear upsampling (FCN, Long et al. 2015).

    As FCN's Caffe `bilinear` filler; use `kernel_size = 2s − s mod 2`, `strides = s` and
    `padding = ceil((s − 1)/2)` (s=2: k=4, p=1; s=3: k=5, p=1) for an `s·n` output that equals
    half-pixel-centred bilinear resizing away from the border (the input is zero outside). An
    odd `kernel_size = 2s − 1` with `padding = s − 1`, `output_padding = s − 1` is corner-aligned
    instead: input pixel i lands on output `s·i` (as `align_corners=True` resizing), for inputs
    whose pixel i is centred at `s·i` of the finer grid (e.g. after padded stride-s convolutions).
    `shape = (k_h, k_w, C_in/groups, C_out)`: output channel `o` gets the 2-D kernel
    `outer(f_h, f_w)` from input channel `o mod (C_in/groups)` of its group and zeros from the
    others — a diagonal kernel for `C_in = C_out`, groups=1, or the same kernel for every channel
    of a depthwise (`groups = C_in`) layer. `key` is unused (deterministic).
    """
    del key
    if len(shape) != 4:
        raise invalid("bilinear_upsample_init", "shape", tuple(shape),
                      "expected a 4-D kernel shape (k_h, k_w, C_in/groups, C_out)")
    kh, kw, c_in, c_out = shape
    if not all(is_integer(n) and n > 0 for n in shape):  # C_in 0 was a ZeroDivisionError
        raise invalid("bilinear_upsample_init", "shape", tuple(shape),
                      "expected positive integers (k_h, k_w, C_in/groups, C_out)")
    if c_out % c_in:
        raise invalid(
            "bilinear_upsample_init", "shape", tuple(shape),
            "expected C_out divisible by C_in/groups so every output channel upsamples exactly "
            "one input channel",
        )
    filt = np.outer(bilinear_kernel_1d(kh), bilinear_kernel_1d(kw))
    select = np.arange(c_out)[None, :] % c_in == np.arange(c_in)[:, None]  # (C_in, C_out)
    kernel = filt[:, :, None, None] * select[None, None, :, :]
    return jnp.asarray(kernel, dtype=dtype)

"""Closed-form output-size, parameter and multiply-accumulate formulas for convolution layers.

These are the textbook formulas (CS231n; Dumoulin & Visin, "A guide to convolution arithmetic")
that researchers use to reason about a network on paper; `summary` measures the same things on
a real model and the tests check that both agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cnnjax.utils.validation import (
    check_bool,
    check_non_negative_int,
    check_positive_int,
    invalid,
    to_pair,
)


def _padding_pair(owner: str, padding: int | Sequence[int]) -> tuple[int, int]:
    """Normalizes `padding` (an int or a `(before, after)` pair) to `(before, after)`, both >= 0."""
    return to_pair(owner, "padding", padding, minimum=0)


def conv_output_size(
    size: int,
    kernel: int,
    stride: int = 1,
    padding: int | Sequence[int] = 0,
    dilation: int = 1,
    ceil_mode: bool = False,
    exact: bool = False,
) -> int:
    """Spatial output size of a convolution or pooling window along one axis.

    `floor((W + P_before + P_after - d*(F-1) - 1) / S) + 1`, i.e. `(W - F + 2P)/S + 1` for d = 1.
    `padding` is an int (both sides) or a `(before, after)` pair. `ceil_mode=True` rounds up as
    PyTorch pooling does, dropping a last window that would start inside the right padding.
    `exact=True` raises instead of silently flooring when the division leaves a remainder
    (AlexNet conv1 at 224 with padding 2: (224 - 11 + 4)/4 + 1 = 55.25).
    A window larger than the padded input is refused even with `ceil_mode=True`, where PyTorch
    returns one output (3x3/2 on 2x2 gives 1), as `max_pool2d` does (see `min_input_size`).
    """
    owner = "conv_output_size"
    check_positive_int(owner, "size", size)
    check_positive_int(owner, "kernel", kernel)
    check_positive_int(owner, "stride", stride)
    check_positive_int(owner, "dilation", dilation)
    check_bool(owner, "ceil_mode", ceil_mode)
    check_bool(owner, "exact", exact)
    return _output_size(owner, size, kernel, stride, _padding_pair(owner, padding), dilation,
                        ceil_mode, exact)


def _output_size(owner: str, size: int, kernel: int, stride: int, padding: tuple[int, int],
                 dilation: int, ceil_mode: bool, exact: bool) -> int:
    """`conv_output_size` on checked arguments; `owner` (the public caller) names errors."""
    before, after = padding
    effective_kernel = dilation * (kernel - 1) + 1
    padded = size + before + after
    if effective_kernel > padded:
        raise invalid(
            owner,
            "kernel",
            kernel,
            f"the effective kernel dilation*(kernel-1)+1={effective_kernel} must fit in the padded "
            f"input size+padding={padded}",
        )
    span = padded - effective_kernel
    if exact and span % stride:
        raise invalid(
            owner,
            "size",
            size,
            f"(size - effective_kernel + padding)/stride + 1 = ({size} - {effective_kernel} + "
            f"{before + after})/{stride} + 1 = {span / stride + 1:g} is not an integer; choose "
            "size, padding or stride so the windows tile the input exactly",
        )
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    # PyTorch: the last window must start inside the input or the left padding.
    if (out - 1) * stride >= size + before:
        out -= 1
    return out


def conv_transpose_output_size(
    size: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    output_padding: int = 0,
    dilation: int = 1,
) -> int:
    """Output size of a transposed convolution: `(W-1)*s - 2p + d*(k-1) + output_padding + 1`.

    This is the PyTorch / Keras convention; `output_padding` (< max(stride, dilation)) picks one of
    the several input sizes a strided convolution maps to the same output size.
    """
    owner = "conv_transpose_output_size"
    check_positive_int(owner, "size", size)
    check_positive_int(owner, "kernel", kernel)
    check_positive_int(owner, "stride", stride)
    check_positive_int(owner, "dilation", dilation)
    check_non_negative_int(owner, "padding", padding)
    check_non_negative_int(owner, "output_padding", output_padding)
    if output_padding >= max(stride, dilation):
        raise invalid(
            owner,
            "output_padding",
            output_padding,
            f"expected 0 <= output_padding < max(stride, dilation) = {max(stride, dilation)}",
        )
    out = (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
    if out <= 0:
        raise invalid(owner, "padding", padding, f"it leaves an output size of {out} <= 0")
    return out


def _kernel_pair(owner: str, kernel: int | Sequence[int]) -> tuple[int, int]:
    return to_pair(owner, "kernel", kernel, minimum=1)


def _check_groups(owner: str, in_channels: int, out_channels: int, groups: int) -> None:
    check_positive_int(owner, "in_channels", in_channels)
    check_positive_int(owner, "out_channels", out_channels)
    check_positive_int(owner, "groups", groups)
    if in_channels % groups:
        raise invalid(owner, "groups", groups,
                      f"in_channels={in_channels} must be divisible by it")
    if out_channels % groups:
        raise invalid(owner, "groups", groups,
                      f"out_channels={out_channels} must be divisible by it")


def conv_params(
    in_channels: int,
    out_channels: int,
    kernel: int | Sequence[int],
    groups: int = 1,
    bias: bool = True,
) -> int:
    """Parameter count of a 2D convolution: `out * (in/groups * k_h * k_w + 1 if bias)`.

    Each of the `out` filters sees only `in/groups` channels (AlexNet's two towers: groups=2 halves
    the weights).
    """
    owner = "conv_params"
    kh, kw = _kernel_pair(owner, kernel)
    _check_groups(owner, in_channels, out_channels, groups)
    check_bool(owner, "bias", bias)
    return out_channels * (in_channels // groups * kh * kw + (1 if bias else 0))


def conv_macs(
    in_channels: int,
    out_channels: int,
    kernel: int | Sequence[int],
    output_size: int | Sequence[int],
    groups: int = 1,
    batch_size: int = 1,
) -> int:
    """Multiply-accumulates of a 2D convolution (dense count).

    `N * H_out * W_out * out * in/groups * k_h * k_w`. This is the figure papers quote (taps over
    zero padding included); FLOPs are about 2x MACs.
    """
    owner = "conv_macs"
    kh, kw = _kernel_pair(owner, kernel)
    oh, ow = to_pair(owner, "output_size", output_size, minimum=1)
    _check_groups(owner, in_channels, out_channels, groups)
    check_positive_int(owner, "batch_size", batch_size)
    return batch_size * oh * ow * out_channels * (in_channels // groups) * kh * kw


def pool_output_size(
    size: int, kernel: int, stride: int | None = None, padding: int = 0, ceil_mode: bool = False
) -> int:
    """Output size of a pooling window (stride defaults to the kernel, as in PyTorch/Keras).

    `padding` may be at most half the kernel, the rule of `max_pool2d` and PyTorch (a window
    lying wholly in the padding would hold no real element). A kernel larger than the padded
    input is refused even with `ceil_mode=True` (PyTorch returns one output), as in `max_pool2d`.
    """
    owner = "pool_output_size"
    # Checked here so that errors name this function, not `conv_output_size`.
    check_positive_int(owner, "size", size)
    check_positive_int(owner, "kernel", kernel)
    if stride is not None:
        check_positive_int(owner, "stride", stride)
    check_bool(owner, "ceil_mode", ceil_mode)
    pair = _padding_pair(owner, padding)
    if 2 * max(pair) > kernel:
        raise invalid(owner, "padding", padding,
                      f"expected at most half the kernel size {kernel}, as max_pool2d")
    return _output_size(owner, size, kernel, kernel if stride is None else stride, pair, 1,
                        ceil_mode, exact=False)


def same_padding(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """The `(before, after)` padding of TensorFlow/XLA "SAME": output size `ceil(W / S)`."""
    owner = "same_padding"
    check_positive_int(owner, "size", size)
    check_positive_int(owner, "kernel", kernel)
    check_positive_int(owner, "stride", stride)
    check_positive_int(owner, "dilation", dilation)
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return total // 2, total - total // 2

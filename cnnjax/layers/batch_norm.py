"""flax's BatchNorm with a check for one value per channel, and a masked BatchNorm whose
statistics are those of the whole synced batch's masked-in positions.

`BatchNorm` is `nn.BatchNorm` that refuses, when training, an input holding one value per
channel over the whole (synced) batch: a batch of 1 reaching a 1x1 map, e.g. ResNet-18's last
stage on a 32x32 image. There the batch mean is the value itself, so the output is the bias
alone and every layer before it gets an exactly zero gradient, silently (PyTorch's BatchNorm
raises for the same input). Every cnnjax model's BatchNorm is this one.

flax's `nn.BatchNorm(axis_name=...)` called with a `mask` takes each device's masked mean and
averages the devices with equal weight (`pmean` of per-device means), so a device holding 3
masked-in rows counts as much as one holding 30, and a device holding none yields NaN. R-CNN's
warps need the masked statistics to be a device-count-independent quantity: the same as one
device holding the whole global batch computes. `MaskedBatchNorm` sums values and counts over
the devices (`psum`) and divides once; where no position of the whole batch is masked in, every
position counts (the unmasked statistics), not NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from cnnjax.utils.validation import (
    check_bool,
    check_layer_dtypes,
    check_number,
    check_optional_bool,
    invalid,
    is_integer,
)

Array = Any


def _given_axes(axis: int | Sequence[int]) -> tuple[Any, ...]:
    """The feature axes as given: one int or a sequence."""
    return tuple(axis) if isinstance(axis, Sequence) else (axis,)


def _axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    return tuple(sorted(a % ndim for a in _given_axes(axis)))


#: flax's BatchNorm body without its method wrapper, called from inside the subclasses' own
#: (wrapped, compact) `__call__`: interceptors and `capture_intermediates` see one call per layer
#: then, not the subclass's and flax's both.
_flax_batch_norm = getattr(nn.BatchNorm.__call__, "__wrapped__", nn.BatchNorm.__call__)


def _values_per_channel(module: nn.BatchNorm, x: Array) -> int | None:
    """How many values each channel's training statistics reduce over: this device's positions
    times the devices of `axis_name` (None where jax gives no static axis size)."""
    feature_axes = _axes(module.axis, x.ndim)
    local = math.prod(x.shape[a] for a in range(x.ndim) if a not in feature_axes)
    if module.axis_name is None:
        return local
    if module.axis_index_groups is not None:
        return local * len(module.axis_index_groups[0])
    devices = lax.psum(1, module.axis_name)  # a Python int inside pmap, shard_map and vmap
    return local * devices if isinstance(devices, int) else None


class OneValuePerChannelError(ValueError):
    """A training BatchNorm given one value per channel (`check_values_per_channel`); `layer`
    names it as the message does (e.g. "BatchNorm stage4_block1/bn1")."""

    def __init__(self, message: str, layer: str):
        super().__init__(message)
        self.layer = layer


def check_values_per_channel(module: nn.BatchNorm, x: Array, running: bool) -> None:
    """Raises if `module`, training (`running` False: the merged `use_running_average`) on `x`,
    would normalize each channel over a single value (its output would be the bias alone: no
    gradient reaches anything before it). Initialization (a one-image dummy batch) is not
    checked."""
    if running or module.is_initializing() or not hasattr(x, "shape"):
        return
    if _values_per_channel(module, x) != 1:
        return
    path = "/".join(module.scope.path) if module.scope is not None else ""
    owner = f"{type(module).__name__} {path}" if path else type(module).__name__
    raise OneValuePerChannelError(str(invalid(
        owner, "input.shape", tuple(x.shape),
        "in training it normalizes each channel over a single value (batch x height x width"
        + ("" if module.axis_name is None else f", over every device of {module.axis_name!r}")
        + "), so its output is the bias alone and no gradient reaches the layers before it; "
        "train on more than one value per channel (a larger batch per device and per "
        "accumulation micro-batch, or a larger input image), or use the running statistics "
        "(use_running_average=True, train=False)")), owner)


def _check_fields(module: nn.BatchNorm) -> None:
    """The fields flax takes as they come: a string flag ('False') read as True (eval mode,
    silently), a momentum outside [0, 1] or a negative epsilon ran with drifting or NaN
    statistics, a bad axis failed as a bare IndexError."""
    owner = type(module).__name__
    check_optional_bool(owner, "use_running_average", module.use_running_average)
    check_number(owner, "momentum", module.momentum, "expected a number in [0, 1] (the running "
                 "averages' decay)", low=0.0, high=1.0, strings=False)
    check_number(owner, "epsilon", module.epsilon, "expected a positive number (added to the "
                 "variance)", low=0.0, low_open=True, strings=False)
    for arg in ("use_bias", "use_scale", "use_fast_variance"):
        check_bool(owner, arg, getattr(module, arg))
    axes = _given_axes(module.axis)
    if not axes or not all(is_integer(a) for a in axes):
        raise invalid(owner, "axis", module.axis, "expected an int or a sequence of ints (the "
                      "feature axes; -1: channels last)")


def _check_call(module: nn.BatchNorm, x: Array, use_running_average: Any,
                mask: Array | None) -> None:
    """A call's flag (a string would read as True), feature axes within `x`'s rank, the
    channels the statistics were created for, and a mask that broadcasts to `x`: flax failed on
    each with an error naming no layer."""
    owner = type(module).__name__
    check_optional_bool(owner, "use_running_average", use_running_average)
    if not hasattr(x, "shape") or any(not -x.ndim <= a < x.ndim for a in _given_axes(module.axis)):
        raise invalid(owner, "input.shape", tuple(getattr(x, "shape", ())),
                      f"expected an array with axis {module.axis} (the feature axes)")
    if module.has_variable("batch_stats", "mean"):
        built = tuple(module.get_variable("batch_stats", "mean").shape)
        features = tuple(x.shape[a] for a in _axes(module.axis, x.ndim))
        if built != features:
            raise invalid(owner, "input.shape", tuple(x.shape),
                          f"its statistics were created for {built} features, this input has "
                          f"{features}; a layer takes the channel count it was initialized with")
    if mask is not None:
        try:
            jnp.broadcast_shapes(jnp.shape(mask), x.shape)
        except ValueError:
            raise invalid(owner, "mask.shape", tuple(jnp.shape(mask)),
                          f"expected a shape that broadcasts to the input's {tuple(x.shape)}"
                          ) from None


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` (same fields, variables and results) that refuses, in training, an input
    with a single value per channel over the whole batch (`check_values_per_channel`), and at
    construction a `dtype` or `param_dtype` that is no float of 16 bits or more and fields flax
    does not check (`_check_fields`)."""

    def __post_init__(self) -> None:
        check_layer_dtypes(self)
        _check_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None) -> Array:
        """Normalizes `x` as `nn.BatchNorm` does, after the input and one-value checks."""
        _check_call(self, x, use_running_average, mask)
        check_values_per_channel(self, x, nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average))
        return _flax_batch_norm(self, x, use_running_average, mask=mask)


class MaskedBatchNorm(BatchNorm):
    """`BatchNorm` (same fields, variables and unmasked behaviour) whose masked training
    statistics pool sums and counts over `axis_name` instead of averaging per-device means.

    Without a mask, in eval mode and at initialization it is `BatchNorm` itself. With a mask
    in training, statistics are computed in at least float32, with the same fast (E[x^2] -
    E[x]^2) or two-pass variance as `use_fast_variance` selects, and gradients flow through them
    as through flax's.
    """

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None) -> Array:
        """Normalizes `x`; in training, statistics over the positions `mask` (broadcastable to
        `x`) marks, summed over every device of `axis_name`."""
        _check_call(self, x, use_running_average, mask)
        running = nn.merge_param("use_running_average", self.use_running_average,
                                 use_running_average)
        check_values_per_channel(self, x, running)
        if mask is None or running or self.is_initializing():
            return _flax_batch_norm(self, x, use_running_average, mask=mask)
        feature_axes = _axes(self.axis, x.ndim)
        reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
        features = tuple(x.shape[a] for a in feature_axes)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        mean, var = self._pooled_statistics(x, jnp.broadcast_to(jnp.asarray(mask, bool),
                                                                x.shape), reduction_axes)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return self._normalize(x, mean, var, reduction_axes, feature_axes)

    def _psum(self, value: Array) -> Array:
        if self.axis_name is None:
            return value
        return lax.psum(value, self.axis_name, axis_index_groups=self.axis_index_groups)

    def _pooled_statistics(self, x: Array, mask: Array, axes: tuple[int, ...],
                           ) -> tuple[Array, Array]:
        """`(mean, var)` per feature over the masked-in positions of every device (all positions
        of every device where none is masked in)."""
        dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
        x = x.astype(dtype)
        none_in = self._psum(jnp.sum(mask, axes, dtype=dtype)) == 0
        mask = mask | jnp.expand_dims(none_in, axes)
        sums = [jnp.sum(mask, axes, dtype=dtype), jnp.sum(jnp.where(mask, x, 0), axes)]
        if self.use_fast_variance:
            sums.append(jnp.sum(jnp.where(mask, x * x, 0), axes))
        count, total, *squares = self._psum(jnp.stack(sums))  # one collective
        mean = total / count
        if self.use_fast_variance:
            return mean, jnp.maximum(0.0, squares[0] / count - mean * mean)
        centred = x - jnp.expand_dims(mean, axes)
        return mean, self._psum(jnp.sum(jnp.where(mask, centred * centred, 0), axes)) / count

    def _normalize(self, x: Array, mean: Array, var: Array, reduction_axes: tuple[int, ...],
                   feature_axes: tuple[int, ...]) -> Array:
        """`(x - mean) / sqrt(var + epsilon) * scale + bias`, with `nn.BatchNorm`'s parameters
        (`scale`, `bias`, shaped like the features) and its output dtype."""
        shape = [1] * x.ndim
        for a in feature_axes:
            shape[a] = x.shape[a]
        features = tuple(x.shape[a] for a in feature_axes)
        mul = lax.rsqrt(jnp.expand_dims(var, reduction_axes) + self.epsilon)
        inputs = [x]
        if self.use_scale:
            scale = self.param("scale", self.scale_init, features, self.param_dtype)
            mul = mul * scale.reshape(shape)
            inputs.append(scale)
        y = (x - jnp.expand_dims(mean, reduction_axes)) * mul
        if self.use_bias:
            bias = self.param("bias", self.bias_init, features, self.param_dtype)
            y = y + bias.reshape(shape)
            inputs.append(bias)
        return jnp.asarray(y, self.dtype or jnp.result_type(*inputs))

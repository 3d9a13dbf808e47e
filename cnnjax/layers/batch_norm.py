"""BatchNorm whose masked statistics are those of the whole synced batch's masked-in positions.

flax's `nn.BatchNorm(axis_name=...)` called with a `mask` takes each device's masked mean and
averages the devices with equal weight (`pmean` of per-device means), so a device holding 3
masked-in rows counts as much as one holding 30, and a device holding none yields NaN. R-CNN's
warps need the masked statistics to be a device-count-independent quantity: the same as one
device holding the whole global batch computes. `MaskedBatchNorm` sums values and counts over
the devices (`psum`) and divides once; where no position of the whole batch is masked in, every
position counts (the unmasked statistics), not NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

Array = Any


def _axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    return tuple(sorted(a % ndim for a in (axis if isinstance(axis, Sequence) else (axis,))))


class MaskedBatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` (same fields, variables and unmasked behaviour) whose masked training
    statistics pool sums and counts over `axis_name` instead of averaging per-device means.

    Without a mask, in eval mode and at initialization it is `nn.BatchNorm` itself. With a mask
    in training, statistics are computed in at least float32, with the same fast (E[x^2] -
    E[x]^2) or two-pass variance as `use_fast_variance` selects, and gradients flow through them
    as through flax's.
    """

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None) -> Array:
        """Normalizes `x`; in training, statistics over the positions `mask` (broadcastable to
        `x`) marks, summed over every device of `axis_name`."""
        running = nn.merge_param("use_running_average", self.use_running_average,
                                 use_running_average)
        if mask is None or running or self.is_initializing():
            return super().__call__(x, use_running_average, mask=mask)
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

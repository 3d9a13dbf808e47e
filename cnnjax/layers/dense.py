"""`Dense`: flax's fully connected layer with its bias gradient summed in float32."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from jax import Array

from cnnjax.layers.conv import (
    _check_kernel_channels,
    _check_precision,
    output_dtype,
    promote_with_wide_bias,
)
from cnnjax.utils.validation import check_bool, check_layer_dtypes, check_positive_int, invalid

#: flax's Dense body without its method wrapper, called from inside `Dense.__call__` (itself
#: wrapped): interceptors and `capture_intermediates` see one call per layer, not two.
_flax_dense = getattr(nn.Dense.__call__, "__wrapped__", nn.Dense.__call__)


class Dense(nn.Dense):
    """`flax.linen.Dense` (same parameters, names and float32 outputs) whose bias is added in at
    least float32, so under a bfloat16 `dtype` the bias gradient, a sum of the output cotangent
    over the batch rows, is summed in float32: flax's summed it in bfloat16, 0.5-1% off at
    32-512 rows (see `cnnjax.layers.conv.add_bias`). The output is cast back to the compute
    dtype."""

    promote_dtype: Any = promote_with_wide_bias

    def __post_init__(self) -> None:
        """Bad hyperparameters named at construction, as the convolutions do (features=0 was a
        ZeroDivisionError in the initializer, -1 a broadcasting TypeError)."""
        owner = type(self).__name__
        check_positive_int(owner, "features", self.features)
        check_bool(owner, "use_bias", self.use_bias)
        check_layer_dtypes(self)
        _check_precision(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """`[..., in_features]` -> `[..., features]` in the compute dtype."""
        _check_inputs(self, inputs)
        return _flax_dense(self, inputs).astype(output_dtype(self, inputs))


def _check_inputs(layer: Dense, inputs: Array) -> None:
    """At least one input feature, and those the kernel was made for: flax failed with a
    ZeroDivisionError (no features), an IndexError (a scalar) or a ScopeParamShapeError."""
    shape = tuple(getattr(inputs, "shape", ()))
    if not shape or shape[-1] < 1:
        raise invalid(type(layer).__name__, "input.shape", shape,
                      "expected [..., in_features] with at least one feature")
    _check_kernel_channels(layer, inputs)  # the kernel's [in, out]: channels on axis -2

"""`Dense`: flax's fully connected layer with its bias gradient summed in float32."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from jax import Array

from cnnjax.layers.conv import _check_precision, output_dtype, promote_with_wide_bias
from cnnjax.utils.validation import check_bool, check_layer_dtypes, check_positive_int


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

    def __call__(self, inputs: Array) -> Array:
        """`[..., in_features]` -> `[..., features]` in the compute dtype."""
        return super().__call__(inputs).astype(output_dtype(self, inputs))

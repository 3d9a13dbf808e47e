"""Local response normalization across channels (Krizhevsky et al., 2012, Section 3.3).

For channel `c` of an NHWC activation `a` (with `C` channels) the output is

    b_c = a_c / (k + alpha' * sum_{j in window(c)} a_j ** 2) ** beta

where `window(c) = [c - size // 2, c + (size - 1) // 2]`, clipped to `[0, C - 1]` (channels outside
the map contribute zero). For odd `size` the window is symmetric with radius `(size - 1) / 2`; for
even `size` it holds `size` channels, one more below `c` than above it (PyTorch's convention,
which pads `size // 2` channels before and `(size - 1) // 2` after).

The two conventions for `alpha'` in the literature:

* `divide_alpha_by_size=False` (default): `alpha' = alpha`. This is the AlexNet paper's formula and
  `tf.nn.local_response_normalization(x, depth_radius=(size - 1) // 2, bias=k, alpha=alpha,
  beta=beta)` for odd `size`. The paper's constants are n=5, k=2, alpha=1e-4, beta=0.75, i.e.
  `LocalResponseNorm()`.
* `divide_alpha_by_size=True`: `alpha' = alpha / size`, as in Caffe's LRN layer and PyTorch's
  `nn.LocalResponseNorm`. Caffe's AlexNet prototxt uses local_size=5, alpha=1e-4, beta=0.75, k=1
  with this convention, so its effective alpha is 2e-5; the TF equivalent passes `alpha / size`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.utils.validation import (
    check_bool,
    check_float_dtype,
    check_nhwc,
    check_number,
    check_positive_int,
    invalid,
)


def _check_number(owner: str, arg: str, value: Any, positive: bool) -> None:
    """Raises unless `value` is a real number (a NumPy or JAX scalar too, not a string), finite
    and > 0 (`positive`) or >= 0."""
    valid = "expected a positive finite number" if positive else "expected a finite number >= 0"
    check_number(owner, arg, value, valid, low=0.0, low_open=positive, high=float("inf"),
                 high_open=True, strings=False)


class LocalResponseNorm(nn.Module):
    """AlexNet's cross-channel local response normalization (no parameters); see module doc.

    Attributes:
      size: number of channels in the window (n in the paper); any positive int, see module doc
        for even sizes.
      k: additive constant, > 0 so the denominator never vanishes.
      alpha: scale of the sum of squares, >= 0.
      beta: exponent, > 0.
      divide_alpha_by_size: False = paper/TensorFlow (alpha' = alpha), True = Caffe/PyTorch
        (alpha' = alpha / size).
      dtype: computation and output dtype; None keeps the input's. The power is always evaluated
        in at least float32.
    """

    size: int = 5
    k: float = 2.0
    alpha: float = 1e-4
    beta: float = 0.75
    divide_alpha_by_size: bool = False
    dtype: Any = None

    def __post_init__(self) -> None:
        owner = "LocalResponseNorm"
        check_positive_int(owner, "size", self.size)
        _check_number(owner, "k", self.k, positive=True)
        _check_number(owner, "alpha", self.alpha, positive=False)
        _check_number(owner, "beta", self.beta, positive=True)
        check_bool(owner, "divide_alpha_by_size", self.divide_alpha_by_size)
        check_float_dtype(owner, "dtype", self.dtype)
        super().__post_init__()

    @property
    def effective_alpha(self) -> float:
        """The alpha' multiplying the windowed sum of squares."""
        return self.alpha / self.size if self.divide_alpha_by_size else float(self.alpha)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes NHWC `x` across channels: same shape, in `dtype` (None: the input's)."""
        check_nhwc("LocalResponseNorm", x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise invalid("LocalResponseNorm", "input.dtype", str(x.dtype),
                          "expected a floating-point array")
        out_dtype = x.dtype if self.dtype is None else self.dtype
        if x.shape[-1] == 0:  # nothing to normalize (a window of -1 channels failed in lax)
            return x.astype(out_dtype)
        compute = jnp.promote_types(out_dtype, jnp.float32)
        a = x.astype(compute)
        # Window reach beyond the C - 1 other channels only adds zeros: clamped, so a huge
        # `size` (2**40) does not make XLA sum a window of that many padded channels.
        reach = x.shape[-1] - 1
        below, above = min(self.size // 2, reach), min((self.size - 1) // 2, reach)
        window_sum = jax.lax.reduce_window(
            a * a, np.array(0, compute), jax.lax.add, (1, 1, 1, below + above + 1), (1, 1, 1, 1),
            ((0, 0), (0, 0), (0, 0), (below, above)))
        scale = (self.k + self.effective_alpha * window_sum) ** (-self.beta)
        return (a * scale).astype(out_dtype)

"""Stochastic depth (Huang, Sun, Liu, Sedra, Weinberger 2016, "Deep Networks with Stochastic
Depth"): `DropPath` and the per-block rates of the paper's linear decay rule.

In training, each residual block's branch is dropped for a whole example with probability
`rate`, so the block passes that example through its shortcut alone: the network trained is a
random shallower one, and at test time all blocks are kept. Kept branches are scaled by
1 / (1 - rate) during training (timm's `drop_path` with `scale_by_keep=True`), so the expected
branch output is unchanged and inference is the plain network, with no rescaling. (The paper
instead scales by the survival probability at test time; the two are equivalent in expectation.
It also draws one gate per block per mini-batch, where this, like timm and most later work,
draws one per example: the same expected depth with less gradient noise between batches.)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.utils.validation import (
    check_number,
    check_optional_bool,
    check_positive_int,
    invalid,
)

Array = Any


def check_drop_rate(owner: str, arg: str, value: Any) -> float:
    """Returns `value` as a float if it is a drop probability in [0, 1) (1 would drop every example
    and divide by zero), else the standard ValueError naming `owner`, `arg` and `value`."""
    return check_number(owner, arg, value, f"expected 0 <= {arg} < 1", low=0.0, high=1.0,
                        high_open=True, strings=False)


def stochastic_depth_rates(total_blocks: int, max_rate: float) -> tuple[float, ...]:
    """Drop rates of residual blocks 1..`total_blocks`, by the paper's linear decay rule (eq. 4):
    block l of L is dropped with probability `max_rate * l / L`, so the first block is rarely
    dropped and the last one with `max_rate` (the paper's 1 - p_L; it uses 0.5).

    timm's `linspace(0, max_rate, L)` differs by starting at 0 for the first block; this follows
    the paper. `l / L` is computed first so the last rate is exactly `max_rate`.
    """
    check_positive_int("stochastic_depth_rates", "total_blocks", total_blocks)
    max_rate = check_drop_rate("stochastic_depth_rates", "max_rate", max_rate)
    return tuple(max_rate * (block / total_blocks) for block in range(1, total_blocks + 1))


class DropPath(nn.Module):
    """Drops the whole input of an example with probability `rate` in training (stochastic depth);
    wrap a residual branch with it, before the addition to the shortcut.

    Kept examples are scaled by 1 / (1 - rate) (the expectation is preserved, so evaluation needs
    no rescaling). Identity when deterministic (evaluation) or `rate` is 0. The mask has one entry
    per example along axis 0, broadcast over the other axes, drawn from the `rng_collection`
    stream (`'dropout'`, which the training engine supplies per step and device). `deterministic`
    is given here or at call time, as for `nn.Dropout`.

    Attributes:
      rate: probability of dropping an example's branch, in [0, 1).
      deterministic: True for evaluation (identity), False for training.
      rng_collection: the RNG stream the mask is drawn from.
    """

    rate: float
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    def __post_init__(self) -> None:
        check_drop_rate(type(self).__name__, "rate", self.rate)
        check_optional_bool(type(self).__name__, "deterministic", self.deterministic)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
        """`x` with each example dropped (zeros) with probability `rate` and the kept ones scaled by
        1 / (1 - rate); `x` itself when deterministic or `rate` is 0."""
        check_optional_bool(type(self).__name__, "deterministic", deterministic)
        if not getattr(x, "ndim", 0):  # training failed on a scalar with a bare IndexError
            raise invalid(type(self).__name__, "input.shape", tuple(getattr(x, "shape", ())),
                          "expected an array with a leading batch axis (one draw per example)")
        if self.deterministic is None and deterministic is None:  # flax's message names no layer
            raise invalid(type(self).__name__, "deterministic", None,
                          "expected True (evaluation: identity) or False (training) here or "
                          "at construction")
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0:
            return x
        # flax's make_rng falls back to 'params' (init); with neither it said only 'None needs
        # PRNG for "dropout"'
        if not (self.has_rng(self.rng_collection) or self.has_rng("params")):
            raise invalid(type(self).__name__, "deterministic", deterministic,
                          f"rate={self.rate} draws random masks in training: pass "
                          f"rngs={{{self.rng_collection!r}: key}} to apply (or "
                          "deterministic=True to evaluate)")
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng(self.rng_collection), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))

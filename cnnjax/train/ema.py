"""An exponential moving average of the weights (Polyak averaging), kept beside the trained ones.

`config.ema.decay` set: `TrainState.ema` holds `{'params', 'batch_stats'}` averaged after every
optimizer step, `ema <- d * ema + (1 - d) * new`, and every eval also scores the averaged
weights (metrics `ema_top1`, `ema_loss`, ... which `best_metric` may name). BatchNorm running
statistics are averaged too, as timm's `ModelEmaV2` and TensorFlow's EfficientNet recipe do, so
the averaged model is evaluated with statistics of the same kind. With `warmup` the decay of
update t (0-based) is `min(decay, (1 + t) / (10 + t))` (TensorFlow's
`ExponentialMovingAverage(num_updates=...)`), so the average forgets its random start early on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cnnjax.utils.validation import check_bool, check_number

#: Prefix of the eval metrics of the averaged weights (`ema_top1`, `ema_miou`, ...).
METRIC_PREFIX = "ema_"


@dataclasses.dataclass(frozen=True)
class ExponentialMovingAverage:
    """The averaging rule: `decay` in [0, 1) and whether it warms up (see the module doc)."""

    decay: float
    warmup: bool = True

    def __post_init__(self) -> None:
        check_ema(self.decay, self.warmup)

    def decay_at(self, step: jax.Array) -> jax.Array:
        """The decay of the update made by optimizer step `step` (0-based), float32."""
        decay = jnp.asarray(self.decay, jnp.float32)
        if not self.warmup:
            return decay
        step = jnp.asarray(step, jnp.float32)
        return jnp.minimum(decay, (1.0 + step) / (10.0 + step))

    def update(self, average: dict, variables: dict, step: jax.Array) -> dict:
        """`average` moved towards `variables` (both `{'params', 'batch_stats'}`) by step
        `step`'s decay; leaves keep their dtype. Written as `old + (1 - decay) * (new - old)`:
        the same average, and exactly `old` where the value did not move (a frozen parameter's
        average stays bitwise equal to it; `decay * old + (1 - decay) * old` can be an ulp
        off)."""
        decay = self.decay_at(step)
        return jax.tree.map(
            lambda old, new: (old + (1.0 - decay) * (new - old)).astype(old.dtype),
            average, variables)


def check_ema(decay: Any, warmup: Any, owner: str = "ExponentialMovingAverage") -> None:
    """Raises a ValueError naming `owner`'s `decay` / `warmup` unless 0 <= decay < 1 and warmup
    is a bool (a decay of 1 would never move; common values are 0.999-0.9999)."""
    check_number(owner, "decay", decay, "expected 0 <= decay < 1, e.g. 0.999",
                 low=0.0, high=1.0, high_open=True, strings=False)
    check_bool(owner, "warmup", warmup)


def initial_average(params: Any, batch_stats: Any) -> dict:
    """The average before any step: a copy of the initial (or warm-started) variables."""
    return {"params": jax.tree.map(lambda x: x.copy(), params),
            "batch_stats": jax.tree.map(lambda x: x.copy(), batch_stats)}


def averaged(state: Any) -> Any:
    """`state` whose params and BatchNorm statistics are the averaged ones (for evaluation)."""
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def metric_scoring(metric: str, ema: bool) -> str:
    """The eval metric that scores the weights being loaded: `ema_<name>` for the average,
    `<name>` for the trained weights, whichever of the two the run's `best_metric` names
    (`top1` -> `ema_top1` with `ema`, `ema_top1` -> `top1` without)."""
    name = metric.removeprefix(METRIC_PREFIX)
    return METRIC_PREFIX + name if ema else name


def prefixed(metrics: dict) -> dict:
    """Eval metrics of the averaged weights under `ema_` names (`num_examples` is dropped:
    it equals the raw eval's)."""
    return {METRIC_PREFIX + name: value for name, value in metrics.items()
            if name != "num_examples"}

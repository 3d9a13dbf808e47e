"""Optimizers and learning-rate schedules built from a config, entirely from optax pieces.

`build_schedule(config)` maps `config.schedule` to an optax schedule and `build_optimizer(config)`
maps `config.optimizer` to an `optax.GradientTransformation` (gradient clipping, weight decay masked
off biases and normalization parameters, then the update rule). No update math is written here, so
every optimizer matches optax's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from cnnjax.utils.validation import check_positive_float, check_positive_int, invalid

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = (
    "constant",
    "piecewise",
    "exponential",
    "cosine",
    "warmup_cosine",
    "linear",
    "one_cycle",
)
# Leaf names that never get weight decay: biases and the affine parameters of normalization layers.
NO_DECAY_NAMES = ("bias", "scale")


def _get(cfg: Any, name: str, default: Any) -> Any:
    """Reads an optional field of a ConfigDict/dict/namespace, falling back to `default`."""
    if isinstance(cfg, dict):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default) if hasattr(cfg, name) else default
    return default if value is None else value


def build_schedule(config: Any) -> optax.Schedule:
    """Returns the optax schedule `step -> learning rate` described by `config.schedule`.

    The peak rate is `config.optimizer.learning_rate`; `config.num_train_steps` sets the length of
    decaying schedules.
    """
    sched = config.schedule
    name = _get(sched, "name", "constant")
    if name not in SCHEDULES:
        raise invalid("schedule", "name", name, f"expected one of {list(SCHEDULES)}")
    lr = check_positive_float("optimizer", "learning_rate", config.optimizer.learning_rate)
    total = check_positive_int("config", "num_train_steps", config.num_train_steps)
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "piecewise":
        boundaries = [int(b) for b in _get(sched, "boundaries", ())]
        factor = float(_get(sched, "decay_factor", 0.1))
        if any(b <= 0 for b in boundaries) or boundaries != sorted(boundaries):
            raise invalid(
                "schedule",
                "boundaries",
                tuple(boundaries),
                "expected increasing positive step numbers",
            )
        return optax.piecewise_constant_schedule(lr, {b: factor for b in boundaries})
    if name == "exponential":
        return optax.exponential_decay(
            lr,
            transition_steps=check_positive_int(
                "schedule", "transition_steps", int(_get(sched, "transition_steps", total))
            ),
            decay_rate=check_positive_float(
                "schedule", "decay_rate", _get(sched, "decay_rate", 0.1)
            ),
            staircase=bool(_get(sched, "staircase", False)),
        )
    if name == "cosine":
        return optax.cosine_decay_schedule(
            lr, decay_steps=total, alpha=float(_get(sched, "alpha", 0.0))
        )
    if name == "warmup_cosine":
        warmup = int(_get(sched, "warmup_steps", 0))
        if not 0 <= warmup < total:
            raise invalid(
                "schedule",
                "warmup_steps",
                warmup,
                f"expected 0 <= warmup_steps < num_train_steps={total}",
            )
        return optax.warmup_cosine_decay_schedule(
            init_value=float(_get(sched, "init_value", 0.0)),
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=total,
            end_value=float(_get(sched, "end_value", 0.0)),
        )
    if name == "linear":
        return optax.linear_schedule(
            lr, float(_get(sched, "end_value", 0.0)), transition_steps=total
        )
    # one_cycle
    return optax.cosine_onecycle_schedule(
        transition_steps=total,
        peak_value=lr,
        pct_start=float(_get(sched, "pct_start", 0.3)),
        div_factor=float(_get(sched, "div_factor", 25.0)),
        final_div_factor=float(_get(sched, "final_div_factor", 1e4)),
    )


def weight_decay_mask(params: Any) -> Any:
    """A pytree of bools, True where weight decay applies: kernels, not biases or norm parameters.

    A leaf is excluded when its name is `bias` or `scale` (Dense/Conv biases, BatchNorm/LayerNorm
    affine parameters) or when it is a vector (a rank <= 1 parameter is a bias or norm parameter).
    """

    def decays(path: tuple, leaf: Any) -> bool:
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return name not in NO_DECAY_NAMES and getattr(leaf, "ndim", 0) > 1

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(
    config: Any, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """Returns the optax transformation for `config.optimizer` driven by `schedule`.

    Order: clip by global norm (if `grad_clip_norm`), then the optimizer. For `adamw` the decoupled
    decay is optax's own (`optax.adamw(..., mask=...)`); for sgd/adam/rmsprop weight decay is the
    classic L2 term `optax.add_decayed_weights` applied to the gradient before the update rule.
    """
    opt = config.optimizer
    name = _get(opt, "name", "sgd")
    if name not in OPTIMIZERS:
        raise invalid("optimizer", "name", name, f"expected one of {list(OPTIMIZERS)}")
    if schedule is None:
        schedule = build_schedule(config)
    wd = float(_get(opt, "weight_decay", 0.0))
    if wd < 0:
        raise invalid("optimizer", "weight_decay", wd, "expected a number >= 0")
    parts: list[optax.GradientTransformation] = []
    clip = _get(opt, "grad_clip_norm", None)
    if clip is not None:
        parts.append(
            optax.clip_by_global_norm(check_positive_float("optimizer", "grad_clip_norm", clip))
        )
    if name == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=float(_get(opt, "b1", 0.9)),
                b2=float(_get(opt, "b2", 0.999)),
                eps=float(_get(opt, "eps", 1e-8)),
                weight_decay=wd,
                mask=weight_decay_mask,
            )
        )
        return optax.chain(*parts)
    if wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
    rule: Callable[..., optax.GradientTransformation]
    if name == "sgd":
        momentum = float(_get(opt, "momentum", 0.0))
        rule = optax.sgd(
            schedule, momentum=momentum or None, nesterov=bool(_get(opt, "nesterov", False))
        )
    elif name == "adam":
        rule = optax.adam(
            schedule,
            b1=float(_get(opt, "b1", 0.9)),
            b2=float(_get(opt, "b2", 0.999)),
            eps=float(_get(opt, "eps", 1e-8)),
        )
    else:  # rmsprop
        rule = optax.rmsprop(
            schedule,
            decay=float(_get(opt, "decay", 0.9)),
            eps=float(_get(opt, "eps", 1e-8)),
            momentum=float(_get(opt, "momentum", 0.0)) or None,
            nesterov=bool(_get(opt, "nesterov", False)),
        )
    parts.append(rule)
    return optax.chain(*parts)

"""Optimizers and learning-rate schedules built from a config, entirely from optax pieces.

`build_schedule(config)` maps `config.schedule` to an optax schedule and `build_optimizer(config)`
maps `config.optimizer` to an `optax.GradientTransformation` (gradient clipping, weight decay masked
off biases and normalization parameters, then the update rule). No update math is written here, so
every optimizer matches optax's own. Every field a builder reads is checked first (type, NaN/inf,
range) and refused with a named ValueError; `check_optimization(config)` runs both builders for
those checks alone (pure Python, nothing is traced or compiled).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import optax
from absl import logging

from cnnjax.utils.validation import (
    check_bool,
    check_choice,
    check_number,
    check_positive_float,
    check_positive_int,
    invalid,
)

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
#: The largest step number a run can reach: the step counters (`TrainState.step`, optax's
#: `count`) are int32, and a larger number in a schedule overflowed when the step compiled.
MAX_STEPS = 2**31 - 1
# Leaf names that never get weight decay: biases and the affine parameters of normalization layers.
NO_DECAY_NAMES = ("bias", "scale")


def _get(cfg: Any, name: str, default: Any) -> Any:
    """Reads an optional field of a ConfigDict/dict/namespace, falling back to `default`."""
    if isinstance(cfg, dict):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default) if hasattr(cfg, name) else default
    return default if value is None else value


def _integer(owner: str, arg: str, value: Any, valid: str) -> int:
    """`value` as an int if it is an integer (not a bool), else raises with `valid`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise invalid(owner, arg, value, valid)
    return int(value)


def _non_negative(owner: str, arg: str, value: Any) -> float:
    """`value` as a float if it is a finite number >= 0 (NaN and inf refused), else raises."""
    return check_number(owner, arg, value, "expected a finite number >= 0", low=0.0,
                        high=math.inf, high_open=True)


def _unit_interval(owner: str, arg: str, value: Any, *, low_open: bool = False,
                   high_open: bool = False) -> float:
    """`value` as a float within 0..1 (each end closed unless `*_open`), else raises."""
    low, high = ("<" if low_open else "<="), ("<" if high_open else "<=")
    return check_number(owner, arg, value, f"expected 0 {low} {arg} {high} 1", low=0.0,
                        high=1.0, low_open=low_open, high_open=high_open)


def _warmup_steps(sched: Any, name: str, total: int) -> int:
    """`schedule.warmup_steps`, checked: 0 for one_cycle (it warms up by itself), else in
    0..num_train_steps-1 (a warmup as long as the run never reaches the peak rate)."""
    value = _get(sched, "warmup_steps", 0)
    valid = f"expected 0 <= warmup_steps < num_train_steps={total}"
    warmup = _integer("schedule", "warmup_steps", value, valid)
    if name == "one_cycle" and warmup:
        raise invalid("schedule", "warmup_steps", value,
                      "expected 0 with schedule 'one_cycle', which warms up by itself over its "
                      "first pct_start of the run")
    if not 0 <= warmup < total:
        raise invalid("schedule", "warmup_steps", value, valid)
    return warmup


def _piecewise(sched: Any, lr: float, total: int, warmup: int) -> optax.Schedule:
    """`lr` times `decay_factor` at each boundary: absolute step numbers, strictly increasing
    and after the warmup (so each one decays the rate exactly once); boundaries at or after
    `num_train_steps` (a shortened run) are logged, not refused."""
    value = _get(sched, "boundaries", ())
    try:
        boundaries = [_integer("schedule", "boundaries", b, "") for b in value]
    except (TypeError, ValueError):
        raise invalid("schedule", "boundaries", value,
                      "expected a sequence of integer step numbers") from None
    if any(b > MAX_STEPS for b in boundaries):
        raise invalid("schedule", "boundaries", value,
                      f"expected step numbers <= {MAX_STEPS} (2**31 - 1: the step counter is "
                      "int32)")
    first = f"warmup_steps={warmup}" if warmup else "0"
    if any(b <= a for a, b in zip([warmup, *boundaries], boundaries, strict=False)):
        raise invalid("schedule", "boundaries", value,
                      f"expected strictly increasing step numbers > {first} (each boundary "
                      "decays the rate once)")
    late = [b for b in boundaries if b >= total]
    if late:  # legitimate in a shortened run (a smoke test, a tuning round): said, not refused
        logging.warning("schedule.boundaries %s: %s at or after num_train_steps=%d never decay "
                        "the rate in this run.", tuple(boundaries), late, total)
    factor = _decay_factor(sched)
    return optax.piecewise_constant_schedule(lr, {b - warmup: factor for b in boundaries})


def _decay_factor(sched: Any) -> float:
    return check_number("schedule", "decay_factor", _get(sched, "decay_factor", 0.1),
                        "expected 0 < decay_factor <= 1 (the rate is multiplied by it at each "
                        "boundary)", low=0.0, high=1.0, low_open=True)


def _exponential_fields(sched: Any, total: int) -> tuple[int, float, bool]:
    """`(transition_steps, decay_rate, staircase)`, checked."""
    value = _get(sched, "transition_steps", total)
    steps = check_positive_int("schedule", "transition_steps", value)
    if steps > MAX_STEPS:
        raise invalid("schedule", "transition_steps", value,
                      f"expected a positive integer <= {MAX_STEPS} (2**31 - 1: the schedule "
                      "divides the int32 step counter by it)")
    rate = check_number("schedule", "decay_rate", _get(sched, "decay_rate", 0.1),
                        "expected 0 < decay_rate <= 1 (above 1 the rate would grow "
                        "exponentially)", low=0.0, high=1.0, low_open=True)
    staircase = check_bool("schedule", "staircase", _get(sched, "staircase", False))
    return int(steps), rate, staircase


def _one_cycle_fields(sched: Any) -> tuple[float, float, float]:
    """`(pct_start, div_factor, final_div_factor)`, checked."""
    pct = _unit_interval("schedule", "pct_start", _get(sched, "pct_start", 0.3), low_open=True,
                         high_open=True)
    div = check_positive_float("schedule", "div_factor", _get(sched, "div_factor", 25.0))
    final = check_positive_float("schedule", "final_div_factor",
                                 _get(sched, "final_div_factor", 1e4))
    return pct, div, final


def _check_every_schedule_field(sched: Any, total: int) -> None:
    """Range checks of the fields other schedules read: a bad value there (`decay_rate=nan`
    with cosine) was silently ignored, and would surface only when the schedule is switched."""
    _decay_factor(sched)
    _exponential_fields(sched, total)
    _one_cycle_fields(sched)


def _exponential(sched: Any, lr: float, total: int, warmup: int) -> optax.Schedule:
    """`lr * decay_rate ** (step / transition_steps)` (floored with `staircase`), counted from
    the end of the warmup; its period is `transition_steps`, whatever `num_train_steps` is."""
    steps, rate, staircase = _exponential_fields(sched, total)
    return optax.exponential_decay(lr, transition_steps=steps, decay_rate=rate,
                                   staircase=staircase)


def _cosine(sched: Any, lr: float, total: int, warmup: int) -> optax.Schedule:
    """Cosine from `lr` down to `alpha * lr` over the steps after the warmup."""
    alpha = _unit_interval("schedule", "alpha", _get(sched, "alpha", 0.0))
    return optax.cosine_decay_schedule(lr, decay_steps=total - warmup, alpha=alpha)


def _linear(sched: Any, lr: float, total: int, warmup: int) -> optax.Schedule:
    """Straight line from `lr` to `end_value` over the steps after the warmup."""
    end = _non_negative("schedule", "end_value", _get(sched, "end_value", 0.0))
    return optax.linear_schedule(lr, end, transition_steps=total - warmup)


def _constant(sched: Any, lr: float, total: int, warmup: int) -> optax.Schedule:
    """`lr` at every step after the warmup."""
    return optax.constant_schedule(lr)


# Schedules a linear warmup can precede: each is built over the steps after the warmup.
_AFTER_WARMUP: dict[str, Callable[[Any, float, int, int], optax.Schedule]] = {
    "constant": _constant,
    "piecewise": _piecewise,
    "exponential": _exponential,
    "cosine": _cosine,
    "linear": _linear,
}


def _one_cycle(sched: Any, lr: float, total: int) -> optax.Schedule:
    """PyTorch's `OneCycleLR(total_steps=num_train_steps, cycle_momentum=False)` learning rate
    (cosine, two phases), step for step; the momentum stays `optimizer.momentum` (torch's default
    `cycle_momentum=True` also moves SGD's momentum 0.95 -> 0.85 -> 0.95):
    cosine up from `lr / div_factor` to `lr` until step `pct_start * num_train_steps - 1`, then
    cosine down to `lr / (div_factor * final_div_factor)` at step `num_train_steps - 1`, the last
    step the run takes (and held after it).

    Built with optax's `piecewise_interpolate_schedule`, the function under
    `cosine_onecycle_schedule`, on torch's own phase boundaries; `cosine_onecycle_schedule`
    itself ends a step late (at `transition_steps`) and truncates the warm-up's end to an
    integer, where torch's may fall between two steps (37 steps at pct_start 0.3: step 10.1).
    A warm-up ending at or before step 0 (`pct_start * num_train_steps <= 1`, e.g. a
    one-step run) has no step on it: the run starts on the annealing, as torch's (whose own
    formula divides by zero at exactly 1, where this starts at the peak), which is logged.
    """
    pct, div, final = _one_cycle_fields(sched)
    peak_step = float(pct * total) - 1  # torch's end of the warm-up: a float step number
    last_step = total - 1  # torch's end of the annealing
    if peak_step <= 0:
        logging.warning("schedule.pct_start=%g with num_train_steps=%d: the warm-up would end "
                        "at step %g, so no step warms up and the run starts on the annealing "
                        "(as torch's OneCycleLR); pct_start * num_train_steps > 1 warms up.",
                        pct, total, peak_step)
    # optax's intervals start at step 0: a peak_step <= 0 leaves the warm-up interval empty,
    # and the annealing is still measured from peak_step, as torch's.
    return optax.piecewise_interpolate_schedule(
        "cosine", lr / div, {peak_step: div, last_step: 1.0 / (div * final)})


def _warmup_cosine(sched: Any, lr: float, total: int, warmup: int) -> optax.Schedule:
    """optax's own: linear from `init_value` to `lr` over `warmup` steps, then cosine down to
    `end_value` at `num_train_steps` (its decay_steps count the warmup)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=_non_negative("schedule", "init_value", _get(sched, "init_value", 0.0)),
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=_non_negative("schedule", "end_value", _get(sched, "end_value", 0.0)),
    )


#: The `optimizer` fields each optimizer reads besides `_EVERY_OPTIMIZER_READS`.
OPTIMIZER_READS: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum", "nesterov"),
    "adam": ("b1", "b2", "eps"),
    "adamw": ("b1", "b2", "eps"),
    "rmsprop": ("decay", "eps", "momentum", "nesterov"),
}
_EVERY_OPTIMIZER_READS = ("name", "learning_rate", "weight_decay", "grad_clip_norm")
#: The `schedule` fields each schedule reads besides its `name` (`init_value` only when
#: `warmup_steps` > 0: the rate a warmup starts from).
SCHEDULE_READS: dict[str, tuple[str, ...]] = {
    "constant": ("warmup_steps", "init_value"),
    "piecewise": ("warmup_steps", "init_value", "boundaries", "decay_factor"),
    "exponential": ("warmup_steps", "init_value", "transition_steps", "decay_rate", "staircase"),
    "cosine": ("warmup_steps", "init_value", "alpha"),
    "linear": ("warmup_steps", "init_value", "end_value"),
    "warmup_cosine": ("warmup_steps", "init_value", "end_value"),
    "one_cycle": ("pct_start", "div_factor", "final_div_factor"),
}


def _readers(reads: dict[str, tuple[str, ...]], field: str) -> tuple[str, ...]:
    """The choices in `reads` (`OPTIMIZER_READS` or `SCHEDULE_READS`) that read `field`."""
    return tuple(name for name, fields in reads.items() if field in fields)


#: The schedule fields that set where the rate starts or ends, and the schedules that read them
#: (`init_value` only with a warmup: optax's warmup_cosine starts at the peak without one): a
#: non-zero one the chosen schedule would ignore is refused, not silently dropped.
_ENDPOINT_READERS: dict[str, tuple[str, ...]] = {
    field: _readers(SCHEDULE_READS, field) for field in ("alpha", "end_value", "init_value")
}
_ENDPOINT_HINTS = {
    "alpha": "the cosine floor as a fraction of the peak",
    "end_value": "the final rate of linear and warmup_cosine (cosine's floor is alpha)",
    "init_value": "the rate a warmup starts from",
}


def _check_endpoints(sched: Any, name: str, warmup: int) -> None:
    """Refuses a non-zero `alpha`/`end_value`/`init_value` that schedule `name` (with `warmup`
    steps) would not read, naming what the field is for."""
    for field, readers in _ENDPOINT_READERS.items():
        value = _get(sched, field, 0.0)
        try:  # a numeric string counts, as the readers' own checks take it
            unset = isinstance(value, bool) or float(value) == 0
        except (TypeError, ValueError):
            unset = True  # a bad type, which the reader's own check names
        if unset:
            continue
        if name in readers and (field != "init_value" or warmup):
            continue
        needs = (f"schedule.warmup_steps > 0 with {name!r}" if name in readers
                 else f"schedule.name in {list(readers)}")
        raise invalid("schedule", field, value,
                      f"schedule {name!r} does not read it ({_ENDPOINT_HINTS[field]}); it "
                      f"applies with {needs}, so set it to 0")


def _check_attribute_config(owner: str, config: Any, fields: tuple[str, ...]) -> None:
    """Refuses a `config` without the attribute `fields` (a plain dict failed with a bare
    AttributeError naming neither the function nor the fix)."""
    missing = [f for f in fields if not hasattr(config, f)]
    if missing:
        kind = type(config).__name__
        fix = (" (wrap a dict: ml_collections.ConfigDict(d))" if isinstance(config, dict)
               else "")
        raise invalid(owner, "config", f"<{kind} without {', '.join(missing)}>",
                      f"expected a config read by attribute with fields {list(fields)}, e.g. "
                      f"cnnjax.train.config.default_config(){fix}")


def build_schedule(config: Any) -> optax.Schedule:
    """Returns the optax schedule `step -> learning rate` described by `config.schedule`.

    The peak rate is `config.optimizer.learning_rate`. `config.num_train_steps` sets the length
    of `cosine`, `linear`, `warmup_cosine` and `one_cycle`; `piecewise`'s boundaries are
    absolute step numbers (those at or after it are logged). `exponential` does not depend on it: it
    multiplies the rate by `decay_rate` every `schedule.transition_steps` steps (1000 in
    `default_config`; num_train_steps only for a config without that field).
    Warmup: with `schedule.warmup_steps = W > 0` the rate rises linearly from `init_value` to the
    peak over the first W steps. `warmup_cosine` is optax's own; `constant`, `piecewise`,
    `exponential`, `cosine` and `linear` are joined after the warmup (`optax.join_schedules`) and
    run over the remaining `num_train_steps - W` steps (piecewise boundaries stay absolute, so
    they must lie after W); `one_cycle` refuses W > 0, as it warms up over `pct_start` itself.
    `config` is read by attribute: an `ml_collections.ConfigDict` such as
    `cnnjax.train.config.default_config()` (a plain dict is refused, naming the fix).
    """
    _check_attribute_config("build_schedule", config, ("schedule", "optimizer", "num_train_steps"))
    sched = config.schedule
    name = check_choice("schedule", "name", _get(sched, "name", "constant"), SCHEDULES)
    lr = check_positive_float("optimizer", "learning_rate", config.optimizer.learning_rate)
    total = check_positive_int("config", "num_train_steps", config.num_train_steps)
    warmup = _warmup_steps(sched, name, total)
    _check_endpoints(sched, name, warmup)
    _check_every_schedule_field(sched, total)
    boundaries = _get(sched, "boundaries", ())
    if name != "piecewise" and boundaries:
        raise invalid("schedule", "boundaries", boundaries,
                      f"schedule {name!r} does not read it (the decay steps of 'piecewise'); "
                      "set schedule.name='piecewise', or boundaries=()")
    if name == "one_cycle":
        return _one_cycle(sched, lr, total)
    if name == "warmup_cosine":
        return _warmup_cosine(sched, lr, total, warmup)
    after = _AFTER_WARMUP[name](sched, lr, total, warmup)
    if not warmup:
        return after
    init = _non_negative("schedule", "init_value", _get(sched, "init_value", 0.0))
    return optax.join_schedules([optax.linear_schedule(init, lr, warmup), after], [warmup])


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


def _momentum(opt: Any) -> tuple[float | None, bool]:
    """`(momentum or None, nesterov)` for sgd/rmsprop: momentum in [0, 1); Nesterov needs some."""
    momentum = _unit_interval("optimizer", "momentum", _get(opt, "momentum", 0.0),
                              high_open=True)
    nesterov = check_bool("optimizer", "nesterov", _get(opt, "nesterov", False))
    if nesterov and not momentum:
        raise invalid("optimizer", "nesterov", nesterov,
                      f"Nesterov momentum needs momentum > 0 (momentum={momentum!r})")
    return momentum or None, nesterov


def _adam_moments(opt: Any) -> dict[str, float]:
    """adam/adamw's `b1`, `b2` (each in [0, 1)) and `eps` (> 0: it keeps the division finite);
    `nesterov=True` is refused: adam/adamw do not read it (cnnjax's configs set it for SGD, so
    switching `optimizer.name` to adam would silently drop it)."""
    if check_bool("optimizer", "nesterov", _get(opt, "nesterov", False)):
        raise invalid("optimizer", "nesterov", True,
                      f"{_get(opt, 'name', 'sgd')} does not use it (only sgd and rmsprop "
                      "read it); set --config.optimizer.nesterov=False")
    return {
        "b1": _unit_interval("optimizer", "b1", _get(opt, "b1", 0.9), high_open=True),
        "b2": _unit_interval("optimizer", "b2", _get(opt, "b2", 0.999), high_open=True),
        "eps": check_positive_float("optimizer", "eps", _get(opt, "eps", 1e-8)),
    }


def _check_every_optimizer_field(opt: Any) -> None:
    """Range checks of the fields other optimizers read (adam's `b1`, `b2`, `eps`, rmsprop's
    `decay`, sgd's `momentum`): a bad value there was silently ignored until the optimizer was
    switched (a sweep over `optimizer.name`)."""
    for field, default in (("b1", 0.9), ("b2", 0.999), ("decay", 0.9), ("momentum", 0.0)):
        _unit_interval("optimizer", field, _get(opt, field, default), high_open=True)
    check_positive_float("optimizer", "eps", _get(opt, "eps", 1e-8))


def _sgd(opt: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """optax.sgd with the config's momentum (0: none) and Nesterov flag."""
    momentum, nesterov = _momentum(opt)
    return optax.sgd(schedule, momentum=momentum, nesterov=nesterov)


def _adam(opt: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """optax.adam with the config's moments."""
    return optax.adam(schedule, **_adam_moments(opt))


def _rmsprop(opt: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """optax.rmsprop: `decay` in [0, 1) (at 1 the squared-gradient average never moves off its
    initial 0 and every update is grad / sqrt(eps): optax adds eps under the root), `eps` > 0,
    momentum as for sgd."""
    decay = _unit_interval("optimizer", "decay", _get(opt, "decay", 0.9), high_open=True)
    eps = check_positive_float("optimizer", "eps", _get(opt, "eps", 1e-8))
    momentum, nesterov = _momentum(opt)
    return optax.rmsprop(schedule, decay=decay, eps=eps, momentum=momentum, nesterov=nesterov)


_RULES: dict[str, Callable[[Any, optax.Schedule], optax.GradientTransformation]] = {
    "sgd": _sgd,
    "adam": _adam,
    "rmsprop": _rmsprop,
}


def build_optimizer(
    config: Any, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """Returns the optax transformation for `config.optimizer` driven by `schedule`.

    Order: clip by global norm (if `grad_clip_norm`), then the optimizer. For `adamw` the decoupled
    decay is optax's own (`optax.adamw(..., mask=...)`); for sgd/adam/rmsprop weight decay is the
    classic L2 term `optax.add_decayed_weights` applied to the gradient before the update rule.
    Every field is checked (NaN, inf, range) before anything is built, those the chosen optimizer
    does not read included. `config` is read by attribute, as in `build_schedule`.
    """
    _check_attribute_config("build_optimizer", config,
                            ("optimizer",) if schedule is not None
                            else ("schedule", "optimizer", "num_train_steps"))
    opt = config.optimizer
    name = check_choice("optimizer", "name", _get(opt, "name", "sgd"), OPTIMIZERS)
    _check_every_optimizer_field(opt)
    if schedule is None:
        schedule = build_schedule(config)
    wd = _non_negative("optimizer", "weight_decay", _get(opt, "weight_decay", 0.0))
    parts: list[optax.GradientTransformation] = []
    clip = _get(opt, "grad_clip_norm", None)
    if clip is not None:
        parts.append(
            optax.clip_by_global_norm(check_positive_float("optimizer", "grad_clip_norm", clip))
        )
    if name == "adamw":
        moments = _adam_moments(opt)
        parts.append(optax.adamw(schedule, **moments, weight_decay=wd, mask=weight_decay_mask))
        return optax.chain(*parts)
    rule = _RULES[name](opt, schedule)
    if wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
    parts.append(rule)
    return optax.chain(*parts)


def check_optimization(config: Any) -> None:
    """Raises the ValueError `build_optimizer(config)` would (schedule included): builds both,
    which is pure Python (no tracing, no compilation), so config validation can call it."""
    build_optimizer(config)


def unread_fields(config: Any) -> dict[str, str]:
    """`{dotted field: why}` for each `optimizer.*` / `schedule.*` field of `config` that its
    chosen optimizer and schedule do not read, so changing it changes nothing in the run (a
    sweep over it trains the same network again); none for a group whose `name` is unknown."""
    unread = {}
    groups = (("optimizer", OPTIMIZER_READS, _EVERY_OPTIMIZER_READS),
              ("schedule", SCHEDULE_READS, ("name",)))
    for group, reads, every in groups:
        cfg = config[group]
        name = _get(cfg, "name", "sgd" if group == "optimizer" else "constant")
        if not isinstance(name, str) or name not in reads:
            continue  # an unknown name, which the builders' own check names
        read = {*every, *reads[name]}
        for field in cfg:
            if field not in read:
                others = [repr(n) for n in _readers(reads, field)]
                verb = "does" if len(others) == 1 else "do"
                unread[f"{group}.{field}"] = f"{group} {name!r} does not read it" + (
                    f" (only {' and '.join(others)} {verb})" if others else f" (no {group} does)")
        warmup = _get(cfg, "warmup_steps", 0)
        if "init_value" in cfg and "init_value" in read and not (
                isinstance(warmup, numbers.Integral) and warmup > 0):
            unread[f"{group}.init_value"] = ("it is the rate a warmup starts from, read only "
                                             "with schedule.warmup_steps > 0")
    return unread

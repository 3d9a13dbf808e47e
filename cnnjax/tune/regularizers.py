"""The regularizer knobs the tuning recipe turns up when its best trial overfits.

Each knob (`REGULARIZERS`) names a config field and the stronger values to sweep given the
current one; `check_regularizers` refuses, before any training, a knob the base config cannot
take. Kept apart from `cnnjax.tune.recipe` so adding a knob touches only this file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from cnnjax.train import config as config_lib
from cnnjax.tune import space as space_lib
from cnnjax.utils.validation import invalid

if TYPE_CHECKING:  # recipe.py imports this module
    from cnnjax.tune.recipe import Recipe

WEIGHT_DECAY = "optimizer.weight_decay"
LABEL_SMOOTHING = "label_smoothing"
AUGMENT = "data.augment"
RANDAUGMENT = "data.randaugment_layers"
MIXUP = "mixing.mixup_alpha"
CUTMIX = "mixing.cutmix_alpha"
DROP_PATH = "model_kwargs.drop_path_rate"
DROPOUT = "model_kwargs.dropout_rate"
# Significant digits kept in proposed values: 0.178 rather than 0.17782794100389226.
_DIGITS = 3
_OWNER = "recipe"  # errors name the recipe's `regularizers` field
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """A knob the recipe turns up when the incumbent overfits: the config `field` and the
    values to sweep given the incumbent's (priority order; none when it is as strong as the
    recipe goes)."""

    field: str
    stronger: Callable[[Any], tuple]
    classification_only: bool = False  # needs class labels (mixing, RandAugment)
    needs_augment: bool = False  # swept with data.augment=True
    optional: bool = False  # skipped where the base config lacks the field, not refused


def round_value(value: float) -> float:
    """`value` at the significant digits every proposed value keeps (knob values, lr grids)."""
    return float(f"{value:.{_DIGITS}g}")


def _up_from_zero(start: tuple, factors: tuple = (2, 4)) -> Callable[[Any], tuple]:
    """`start` when the knob is off (0/None), else the current value times `factors`."""
    return lambda v: start if not v else tuple(round_value(v * f) for f in factors)


def _rate_up(start: tuple) -> Callable[[Any], tuple]:
    """A probability: `start` when 0, else 0.1 and 0.2 higher (below 0.9)."""
    return lambda v: start if not v else tuple(
        r for r in (round_value(v + 0.1), round_value(v + 0.2)) if r < 0.9)


def _more_randaugment(layers: int | None) -> tuple[int, ...]:
    """Stronger RandAugment settings than `layers` ops, up to the pipeline's cap."""
    from cnnjax.data.randaugment import MAX_LAYERS  # imports TensorFlow: only when asked

    return (2, 1, 3) if not layers else tuple(m for m in (layers + 1, layers + 2)
                                              if m <= MAX_LAYERS)


#: `recipe.regularizers` names, in the order the default recipe tries the first three.
REGULARIZERS: dict[str, Regularizer] = {
    "weight_decay": Regularizer(WEIGHT_DECAY, _up_from_zero((1e-4, 1e-3, 1e-2), (3, 10, 30))),
    "label_smoothing": Regularizer(
        LABEL_SMOOTHING,
        lambda v: (0.1, 0.2, 0.05) if not v else tuple(x for x in (0.1, 0.2, 0.3) if x > v),
        classification_only=True),
    "augment": Regularizer(AUGMENT, lambda v: () if v else (True,), optional=True),
    # RandAugment ops per image (magnitude as configured): 2 is the paper's usual N; never past
    # the pipeline's cap (randaugment.MAX_LAYERS), which the trial's config check would refuse.
    "randaugment": Regularizer(RANDAUGMENT, _more_randaugment,
                               classification_only=True, needs_augment=True),
    # Beta(alpha, alpha): 0.2 is the mixup paper's ImageNet choice, 1.0 its CIFAR one.
    "mixup": Regularizer(MIXUP, _up_from_zero((0.2, 1.0, 0.4)), classification_only=True),
    "cutmix": Regularizer(CUTMIX, _up_from_zero((1.0, 0.5, 2.0)), classification_only=True),
    "drop_path": Regularizer(DROP_PATH, _rate_up((0.1, 0.2, 0.05))),
    "dropout": Regularizer(DROPOUT, _rate_up((0.3, 0.5, 0.1))),
}
#: What a recipe without `regularizers` (and every tune.json written before it existed) uses.
DEFAULT_REGULARIZERS = ("weight_decay", "label_smoothing", "augment")


def task_regularizers(names: tuple[str, ...], task: str) -> tuple[str, ...]:
    """The knobs a tune of `task` tries: `names`, except that the default list leaves out the
    knobs that need class labels for detection and segmentation (a list the user wrote is kept
    whole, so `check_regularizers` names such a knob)."""
    if tuple(names) != DEFAULT_REGULARIZERS or task == "classification":
        return tuple(names)
    return tuple(n for n in names if not REGULARIZERS[n].classification_only)


def strength(value: Any) -> float:
    """How strong a regularizer setting is: every knob's values grow with their effect (a rate,
    an alpha, a number of ops, True over False); unset is the weakest."""
    return -math.inf if value is None else float(value)


def knob_value(base: Any, overrides: Mapping[str, Any], field: str) -> Any:
    """The incumbent's value of `field`. An unset `model_kwargs.<name>` is what the incumbent's
    model uses: its `effective_<name>` where the model resolves the field itself (FCN's unset
    dropout_rate is 0.5 on VGG-16, so "stronger" means above 0.5), else the field's default."""
    value = overrides.get(field, space_lib.get_field(base, field))
    if value is None and field.startswith("model_kwargs."):
        from cnnjax.models import create_model  # deferred: imports every architecture

        config = space_lib.apply_overrides(base, overrides)
        name = field.split(".", 1)[1]
        try:
            model = create_model(config.model, **config_lib.model_kwargs(config))
        except ValueError:  # the base's own problem: check_config reports it, in its own words
            return None
        value = getattr(model, f"effective_{name}", getattr(model, name, None))
    return value


def _never_applied(base: Any, field: str) -> str | None:
    """Why `base`'s mixing never uses the method whose alpha `field` is (mixup or CutMix), so
    turning it up changes nothing (`cnnjax.train.mixing.mix_batch`), else None."""
    if field not in (MIXUP, CUTMIX):
        return None
    defaults = config_lib.MIXING_DEFAULTS
    prob = space_lib.get_field(base, "mixing.prob", defaults["prob"])
    switch = space_lib.get_field(base, "mixing.switch_prob", defaults["switch_prob"])
    if prob == 0:
        return "mixing.prob=0 never mixes a batch"
    other = CUTMIX if field == MIXUP else MIXUP
    never = 1.0 if field == MIXUP else 0.0  # the switch_prob that always picks the other one
    if (space_lib.get_field(base, other, 0.0) or 0.0) > 0 and switch == never:
        return (f"{other} > 0 with mixing.switch_prob={switch:g} always picks "
                f"{'CutMix' if field == MIXUP else 'mixup'}")
    return None


def check_regularizers(recipe: Recipe, base: Any) -> None:
    """Each knob of `recipe.regularizers` applies to `base`: its field exists (an optional
    knob's may not), its task has class labels where it needs them, and the base config turned
    up to the knob's first value passes the engine's field checks."""
    task = config_lib.config_task(base)
    for name in task_regularizers(recipe.regularizers, task):
        knob = REGULARIZERS[name]
        if space_lib.get_field(base, knob.field, _MISSING) is _MISSING:
            if knob.optional:
                continue
            hint = (f"model {base.model!r} has no such field, or the config does not declare "
                    "model_kwargs = model_kwargs_config(config.model)"
                    if knob.field.startswith("model_kwargs.")
                    else "build configs from cnnjax.train.config.default_config()")
            raise invalid(_OWNER, "regularizers", name,
                          f"it sweeps {knob.field}, which the base config lacks ({hint})")
        if knob.classification_only and task != "classification":
            raise invalid(_OWNER, "regularizers", name,
                          f"it needs class labels (config.task='classification', not {task!r})")
        idle = _never_applied(base, knob.field)
        if idle:
            raise invalid(_OWNER, "regularizers", name,
                          f"it sweeps {knob.field}, which the base config never applies "
                          f"({idle}), so every trial would train as the incumbent does")
        candidates = knob.stronger(knob_value(base, {}, knob.field))
        if candidates:
            turned_up = {knob.field: candidates[0]}
            if knob.needs_augment:
                turned_up[AUGMENT] = True
            try:
                stronger = space_lib.apply_overrides(base, turned_up)
                config_lib.validate_config(stronger)
                if knob.field.startswith("model_kwargs."):  # the model checks its own fields
                    _check_model_takes(base, stronger)
            except ValueError as err:
                raise invalid(_OWNER, "regularizers", name,
                              f"the base config with {turned_up} is refused ({err})") from None


def _check_model_takes(base: Any, stronger: Any) -> None:
    """Builds `stronger`'s model (a flax module: construction only, nothing initialized) where
    `base`'s builds, so a value the model refuses (e.g. drop_path_rate > 0 on a plain network,
    which has no residual branch to drop) fails here rather than when the knob's round starts."""
    from cnnjax.models import create_model  # deferred: imports every architecture

    try:
        create_model(base.model, **config_lib.model_kwargs(base))
    except ValueError:  # the base's own problem: check_config reports it, in its own words
        return
    create_model(stronger.model, **config_lib.model_kwargs(stronger))

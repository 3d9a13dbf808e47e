"""An automated tuning recipe: rounds of sweeps, each steered by the learning-curve diagnosis.

In the spirit of the Deep Learning Tuning Playbook (Godbole et al., 2023) and Smith's learning-
rate range test (Smith, 2017): round 1 is a coarse log-spaced learning-rate grid at a short step
budget; with `recipe.lr_range_test` that grid (its span lr_min..lr_max) is centred at the lr a
range test of the base config suggests (`cnnjax.tune.lr_range`, run first in
<tune_dir>/lr_range/). After every round the incumbent (the best trial so far by
`recipe.metric`) is diagnosed (`cnnjax.tune.diagnose`) and `decide` plans the next round, in this
order:

    diverged / unstable   lr x(0.5, 1, 0.25) with gradient clipping and a 5% warmup (any
                          schedule but one_cycle, which warms up by itself); diverged includes
                          a completed run whose loss the rate lifted and left at chance
    best lr at an edge    two rates past that edge, half and one grid step (never at or above
                          an lr that diverged); a rate tied with another one is no edge, nor
                          the low edge when the verdict is too_slow or underfitting (both ask
                          for more learning, which lower rates would not give)
    converged             stop
    too_slow              lr x(2, 4); if both ran already, train longer
    overfitting           sweep the first knob of `recipe.regularizers` not swept yet and not
                          already at its strongest (`cnnjax.tune.regularizers`); by default
                          weight decay x(3, 10, 30) (1e-4, 1e-3, 1e-2 from zero), then label
                          smoothing (0.1, 0.2, 0.05; classification only), then
                          data.augment=True. With
                          `recipe.lengthen_regularizers`, a swept knob whose best value lost
                          while still learning (too_slow, underfitting, still_improving) is
                          first rerun against the knob's old value at twice its steps
    underfitting          train longer with lr x(1, 2, 0.5); at max_steps, or at once when the
                          train loss plateaued, weight decay x(0.3, 0.1)
    still_improving       train longer (2x steps, at most max_steps) with lr x(1, 0.5, 2)

`recipe.regularizers` may also list randaugment, mixup, cutmix (classification), drop_path and
dropout (models with that field); each is checked against the base config before any training.

`recipe.metric` must be an eval metric of the base config's task (`config_lib.TASK_METRICS`):
loss, top1 or top5 for classification; map50, map, coco_map50, coco_map75 or map50_voc07 for
detection (whose diagnosis judges the mAP's progress and the train loss; see
`cnnjax.tune.diagnose`); loss, pixel_accuracy or miou for segmentation. Unset (None), it is the
base config's `best_metric`: top1, map50 in the detection configs, miou in the segmentation ones.

A round holds at most `trials_per_round` new trials (configs already run are skipped) and the
recipe at most `max_trials` in all and `max_rounds` rounds. Every round is a `run_sweep` in
`<tune_dir>/round_<k>/`, so rerunning the same command skips finished rounds and trials and
resumes an interrupted trial; decisions are recomputed from the results on disk (deterministic)
and recorded in recipe.json. Layout of a tune directory:

    tune.json     the base config and the recipe (a different one is refused; only
                  max_rounds may change, e.g. raised to continue a finished tune, never
                  below a round already started)
    round_<k>/    one sweep directory per round (sweep.json, trials/, results.csv, sweep.png)
    recipe.json   rounds, trials, diagnoses, decisions, the best trial and its config overrides
    report.md     the same for people; tune.png: metric vs lr and the learning curves of all rounds

report.md and tune.png are rendered from the recipe.json record by `cnnjax.tune.report`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from cnnjax.train import config as config_lib
from cnnjax.train.ema import METRIC_PREFIX
from cnnjax.train.loop import TOTAL_WALL_TIME
from cnnjax.train.preemption import StopRequest
from cnnjax.tune import lr_range
from cnnjax.tune import report as report_lib
from cnnjax.tune import space as space_lib
from cnnjax.tune.diagnose import (
    CLIP_FIELD,
    LR_FIELD,
    STEPS_FIELD,
    WARMUP_FIELD,
    WARMUP_FRACTION,
    Diagnosis,
    Thresholds,
    as_thresholds,
    diagnose_workdir,
)
from cnnjax.tune.regularizers import (
    AUGMENT,
    DEFAULT_REGULARIZERS,
    LABEL_SMOOTHING,
    REGULARIZERS,
    WEIGHT_DECAY,
    Regularizer,
    check_regularizers,
    knob_value,
    round_value,
    strength,
    task_regularizers,
)
from cnnjax.tune.sweep import (
    TRIALS_DIR,
    check_metric,
    check_mode,
    config_changes,
    interrupted_trial,
    run_sweep,
    say,
    trial_configs,
)
from cnnjax.tune.sweep import interruption_message as sweep_interruption_message
from cnnjax.utils.files import atomic_write, check_output_dir, read_json
from cnnjax.utils.lock import directory_lock
from cnnjax.utils.validation import check_bool, check_choice, invalid

TUNE_FILE = "tune.json"
LR_RANGE_DIR = "lr_range"  # recipe.lr_range_test's range test, inside the tune_dir
RECIPE_FILE = "recipe.json"
#: Fields the recipe sets or sweeps; each must exist in the base config.
TUNED_FIELDS = (LR_FIELD, STEPS_FIELD, WEIGHT_DECAY, LABEL_SMOOTHING, CLIP_FIELD, WARMUP_FIELD,
                "log_every_steps", "eval_every_steps", "checkpoint_every_steps")
#: How a tune ended (`recipe.json` "status"); "running" while rounds remain.
STATUSES = ("running", "converged", "budget_spent", "exhausted", "no_result", "failed",
            "interrupted")
# Clipping threshold for an unstable run: the global-norm clip most CNN recipes use.
CLIP_NORM = 1.0
_OWNER = "recipe"
# The smallest value of each integer recipe field: round 1 needs two rates to compare, a trial
# at least the evals and logs a trend is read from (the thresholds' defaults may ask for more).
_COUNT_MINIMUMS = {"num_lrs": 2, "round1_steps": 1, "max_steps": 1, "max_rounds": 1,
                   "max_trials": 1, "trials_per_round": 1, "evals_per_trial": 3,
                   "logs_per_trial": 5}


# --------------------------------------------------------------------------------- recipe
def default_recipe() -> ml_collections.ConfigDict:
    """Every recipe field with its default (recipe files start from this)."""
    c = ml_collections.ConfigDict()
    # Eval metric that ranks trials: loss, top1, top5; map50, map (detection). None: the base
    # config's best_metric.
    c.metric = ml_collections.FieldReference(None, field_type=str)
    c.mode = ml_collections.FieldReference(None, field_type=str)  # None: by metric
    c.lr_min = 1e-3  # round 1: num_lrs log-spaced learning rates in [lr_min, lr_max]
    c.lr_max = 1.0
    # True: first run the learning-rate range test (cnnjax.tune.lr_range: 1e-5..10 over 100
    # steps) and centre round 1's grid, same span, at its suggested lr.
    c.lr_range_test = False
    c.num_lrs = 5
    c.round1_steps = 200  # num_train_steps of round 1 (the short budget)
    c.max_steps = 800  # "train longer" never goes beyond this
    c.max_rounds = 3
    c.max_trials = 12  # trials over all rounds
    c.trials_per_round = 3  # new trials per round after the first
    c.evals_per_trial = 8  # eval_every_steps = num_train_steps // evals_per_trial
    c.logs_per_trial = 40  # log_every_steps = num_train_steps // logs_per_trial
    # Knobs an overfitting incumbent turns up, first unswept first (REGULARIZERS' names).
    c.regularizers = DEFAULT_REGULARIZERS
    # Give a knob that lost while still learning twice the steps (strong augmentation such as
    # RandAugment needs a longer schedule to pay off) before moving to the next knob.
    c.lengthen_regularizers = False
    c.thresholds = ml_collections.ConfigDict(dataclasses.asdict(Thresholds()))
    return c


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe config (see `default_recipe` for the fields)."""

    metric: str | None = None  # None until `for_config` reads the base config's best_metric
    mode: str | None = None
    lr_min: float = 1e-3
    lr_max: float = 1.0
    lr_range_test: bool = False
    num_lrs: int = 5
    round1_steps: int = 200
    max_steps: int = 800
    max_rounds: int = 3
    max_trials: int = 12
    trials_per_round: int = 3
    evals_per_trial: int = 8
    logs_per_trial: int = 40
    regularizers: tuple[str, ...] = DEFAULT_REGULARIZERS
    lengthen_regularizers: bool = False
    thresholds: Thresholds = dataclasses.field(default_factory=Thresholds)

    def __post_init__(self):
        # A mapping of some threshold fields (as recipe files and from_config give) is accepted.
        object.__setattr__(self, "thresholds", as_thresholds(self.thresholds, _OWNER))
        object.__setattr__(self, "mode", self._checked_mode())
        self._check_lr_range()
        self._check_counts()
        object.__setattr__(self, "regularizers", _regularizer_names(self.regularizers))
        for flag in ("lengthen_regularizers", "lr_range_test"):  # a NumPy bool as Python's (JSON)
            object.__setattr__(self, flag, check_bool(_OWNER, flag, getattr(self, flag)))
        self._check_grid()
        self._check_judged()

    def _checked_mode(self) -> str | None:
        """`mode` after checking `metric` (any task's, or a weight average's: run_tune checks
        it against its base config's task and config.ema); by the metric when None."""
        metrics = list(dict.fromkeys(m for ms in config_lib.TASK_METRICS.values() for m in ms))
        if self.metric is not None and (not isinstance(self.metric, str)
                                        or self.metric.removeprefix(METRIC_PREFIX) not in metrics):
            raise invalid(_OWNER, "metric", self.metric,
                          f"expected an eval metric of one of the tasks: {metrics}, one of them "
                          f"prefixed {METRIC_PREFIX!r} (a weight average's) or None (the base "
                          "config's best_metric)")
        if self.metric is not None:
            return check_mode(_OWNER, self.metric, self.mode)
        if self.mode is not None:
            check_choice(_OWNER, "mode", self.mode, ("max", "min"))
        return self.mode

    def _check_lr_range(self) -> None:
        """lr_min and lr_max: positive finite rates, lr_min < lr_max."""
        for name in ("lr_min", "lr_max"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value <= 0):
                raise invalid(_OWNER, name, value, "expected a positive finite learning rate")
        if self.lr_min >= self.lr_max:
            raise invalid(_OWNER, "lr_min", self.lr_min,
                          f"expected lr_min < lr_max (lr_max={self.lr_max!r})")

    def _check_counts(self) -> None:
        """The integer budgets and per-trial counts have their minimums; max_steps >=
        round1_steps."""
        for name, low in _COUNT_MINIMUMS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise invalid(_OWNER, name, value, f"expected an integer >= {low}")
        if self.max_steps < self.round1_steps:
            raise invalid(_OWNER, "max_steps", self.max_steps,
                          f"expected max_steps >= round1_steps={self.round1_steps}")

    def _check_grid(self) -> None:
        """Round 1's grid holds num_lrs distinct rates, and max_trials has room for them; both
        bounds that need no grid come first (num_lrs=10**20 failed in np.geomspace naming no
        field; 2**40 asked for 8 TiB)."""
        if self.max_trials < self.num_lrs:
            raise invalid(_OWNER, "max_trials", self.max_trials,
                          f"expected at least num_lrs={self.num_lrs} (round 1's trials)")
        span = f"lr_min={self.lr_min!r}..lr_max={self.lr_max!r}"
        most = _most_distinct_rates(self.lr_min, self.lr_max)
        if self.num_lrs > most:
            raise invalid(_OWNER, "num_lrs", self.num_lrs,
                          f"{span} holds fewer distinct rates at 3 significant digits (at most "
                          f"{most}); widen the range or lower num_lrs")
        grid = self.lr_grid()
        if len(set(grid)) < len(grid):
            raise invalid(_OWNER, "num_lrs", self.num_lrs,
                          f"{span} holds fewer distinct rates at 3 significant digits "
                          f"({_preview(grid)}); widen the range or lower num_lrs")

    def _check_judged(self) -> None:
        """Every trial logs and evaluates often enough for the diagnosis (its thresholds)."""
        if self.thresholds.min_evals > self.evals_per_trial:
            raise invalid(_OWNER, "evals_per_trial", self.evals_per_trial,
                          f"expected >= thresholds.min_evals={self.thresholds.min_evals}")
        if self.thresholds.min_train_logs > self.logs_per_trial:
            raise invalid(_OWNER, "logs_per_trial", self.logs_per_trial,
                          f"expected >= thresholds.min_train_logs="
                          f"{self.thresholds.min_train_logs}")
        judged = max(self.thresholds.min_train_logs, self.thresholds.min_evals)
        if self.round1_steps < judged:  # a step logs or evaluates at most once
            raise invalid(_OWNER, "round1_steps", self.round1_steps,
                          f"expected >= {judged}: round 1's trials must log at least "
                          f"thresholds.min_train_logs={self.thresholds.min_train_logs} times and "
                          f"evaluate thresholds.min_evals={self.thresholds.min_evals} times to "
                          "be judged")

    @classmethod
    def from_config(cls, config: Any) -> Recipe:
        """From a recipe ConfigDict or mapping; unknown fields are refused with the valid ones."""
        values = dict(config.items()) if hasattr(config, "items") else None
        if values is None:
            raise invalid(_OWNER, "config", config, "expected a ConfigDict or mapping")
        known = [f.name for f in dataclasses.fields(cls)]
        for name in values:
            check_choice(_OWNER, "field", name, known)
        return cls(**values)

    def for_config(self, base_config: Any) -> Recipe:
        """This recipe with `metric` checked against `base_config`'s task (None: its
        best_metric) and `mode` resolved."""
        return dataclasses.replace(self, metric=check_metric(_OWNER, self.metric, base_config))

    def describe(self) -> dict:
        """The recipe's fields as JSON-ready data (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def lr_grid(self, centre: float | None = None) -> tuple[float, ...]:
        """Round 1's learning rates: `num_lrs` log-spaced points from lr_min to lr_max, or with
        `centre` over the same span (lr_max / lr_min) centred at it geometrically."""
        low, high = self.lr_min, self.lr_max
        if centre is not None:
            half = math.sqrt(high / low)
            low, high = centre / half, centre * half
        return tuple(round_value(v) for v in np.geomspace(low, high, self.num_lrs))


def _most_distinct_rates(low: float, high: float) -> int:
    """An upper bound on the distinct 3-significant-digit rates in [low, high]: 900 (1.00..9.99
    times its power of ten) per decade it meets, one more decade for rounding up to the next
    power; from logarithms, so a ratio like 1e308 / 1e-300 cannot overflow."""
    return 900 * (math.floor(math.log10(high)) - math.floor(math.log10(low)) + 2)


def _regularizer_names(value: Any) -> tuple[str, ...]:
    """`recipe.regularizers` as a tuple of known names, each at most once."""
    regularizers = (value,) if isinstance(value, str) else value
    if not isinstance(regularizers, list | tuple):
        raise invalid(_OWNER, "regularizers", regularizers,
                      f"expected a sequence of names from {list(REGULARIZERS)}")
    # `--recipe.regularizers=weight_decay,mixup` arrives as ('weight_decay,mixup',); an
    # empty value (`--recipe.regularizers=`) means no knob
    regularizers = tuple(n.strip() if isinstance(n, str) else n
                         for item in regularizers for n in
                         (item.split(",") if isinstance(item, str) else [item])
                         if not isinstance(n, str) or n.strip())
    for name in regularizers:
        check_choice(_OWNER, "regularizers", name, REGULARIZERS)
    if len(set(regularizers)) < len(regularizers):
        raise invalid(_OWNER, "regularizers", tuple(regularizers),
                      "expected each name at most once")
    return tuple(regularizers)


# ----------------------------------------------------------------------------- the rounds
@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """One round: `field` swept over `values`, every trial with the `fixed` overrides."""

    index: int  # 1-based
    action: str
    reason: str
    fixed: dict
    field: str
    values: tuple

    @property
    def dirname(self) -> str:
        """The round's sweep directory name, `round_<index>`."""
        return f"round_{self.index}"

    def space(self) -> space_lib.SearchSpace:
        """A grid over `field`'s `values`: one trial per value."""
        return space_lib.grid([space_lib.choice(self.field, self.values)])

    def base_config(self, base: Any) -> Any:
        """A copy of `base` with the round's `fixed` overrides applied."""
        return space_lib.apply_overrides(base, self.fixed)

    def describe(self) -> dict:
        """JSON-ready description of the round: index, directory, action, reason and fields."""
        return json.loads(json.dumps({
            "index": self.index, "dir": self.dirname, "action": self.action,
            "reason": self.reason, "field": self.field, "values": list(self.values),
            "fixed": self.fixed}))


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """A finished round: its plan and `run_sweep`'s result rows."""

    plan: RoundPlan
    rows: list[dict]

    def overrides(self, row: dict) -> dict:
        """Everything the trial changed from the base config: the fixed and swept fields."""
        return {**self.plan.fixed, **row["overrides"]}


@dataclasses.dataclass(frozen=True)
class Decision:
    """What `decide` concluded after a round: the next round, or why the tune stops."""

    after_round: int
    action: str
    reason: str
    incumbent: dict | None
    diagnosis: Diagnosis | None
    next_round: RoundPlan | None = None
    status: str = "running"

    def describe(self) -> dict:
        """JSON-ready description: the action, reason, status, incumbent, the diagnosis that
        led there and the next round's plan."""
        return {"after_round": self.after_round, "action": self.action, "reason": self.reason,
                "status": self.status,
                "incumbent": self.incumbent,
                "diagnosis": self.diagnosis.to_dict() if self.diagnosis else None,
                "next_round": self.next_round.describe() if self.next_round else None}


DiagnoseFn = Callable[[str, str, Thresholds], Diagnosis]


@dataclasses.dataclass(frozen=True)
class _Proposal:
    """What the diagnosis asks for: sweep `field` over `candidates` (priority order) with
    `fixed`, or stop (`field` None) with `status`."""

    action: str
    reason: str
    fixed: dict | None = None
    field: str | None = None
    candidates: tuple = ()
    status: str = "running"


def _stop(reason: str, status: str) -> _Proposal:
    return _Proposal("stop", reason, status=status)


def logging_overrides(steps: int, recipe: Recipe) -> dict:
    """num_train_steps and the log/eval/checkpoint intervals that give the diagnosis its points."""
    every_eval = max(1, steps // recipe.evals_per_trial)
    return {STEPS_FIELD: steps, "log_every_steps": max(1, steps // recipe.logs_per_trial),
            "eval_every_steps": every_eval, "checkpoint_every_steps": every_eval}


def first_round(recipe: Recipe, centre: float | None = None) -> RoundPlan:
    """Round 1: the coarse log-spaced learning-rate grid at `round1_steps` (centred at
    `centre`, the range test's suggested lr, when given)."""
    grid = recipe.lr_grid(centre)
    where = (f" centred at the learning-rate range test's suggested lr {_short(centre)} "
             f"({LR_RANGE_DIR}/{lr_range.RECORD_FILE})" if centre is not None else "")
    return RoundPlan(1, "lr_search",
                     f"coarse learning-rate search{where}: {len(grid)} log-spaced rates "
                     f"{_short(grid[0])}..{_short(grid[-1])} at {recipe.round1_steps} steps",
                     logging_overrides(recipe.round1_steps, recipe), LR_FIELD, grid)


def range_test_round(base: Any, recipe: Recipe, tune_dir: str, verbose: bool) -> RoundPlan:
    """`recipe.lr_range_test`: the range test of `base` in `<tune_dir>/lr_range` (a rerun
    reads its finished record), then round 1 centred at its suggestion; the recipe's own grid
    when the test suggests nothing (its smoothed loss never fell)."""
    record = lr_range.run_lr_range(base, os.path.join(tune_dir, LR_RANGE_DIR),
                                   lr_range.DEFAULT_LR_MIN, lr_range.DEFAULT_LR_MAX,
                                   lr_range.DEFAULT_STEPS)
    say(verbose, lr_range.format_summary(record))
    return first_round(recipe, record["suggestions"]["suggested"])


def incumbent(history: Sequence[RoundResult], mode: str) -> tuple[RoundResult, dict] | None:
    """The best completed trial of all rounds (ties: the later round, then the lower index)."""
    sign = 1 if mode == "max" else -1
    best = None
    for result in history:
        for row in result.rows:
            if row["status"] != "completed" or row["best"] is None:
                continue
            key = (sign * row["best"], result.plan.index, -row["index"])
            if best is None or key > best[0]:
                best = (key, result, row)
    return None if best is None else (best[1], best[2])


def decide(history: Sequence[RoundResult], recipe: Recipe, base: Any,
           diagnose_fn: DiagnoseFn = diagnose_workdir) -> Decision:
    """The decision after the last round of `history`: the next round's plan, or a stop.

    Pure given the rows (and what `diagnose_fn` reads from the incumbent's workdir and, with
    `lengthen_regularizers`, from a losing regularizer trial's), so a rerun recomputes the same
    decisions from the results on disk.
    """
    recipe = recipe.for_config(base)  # an unset metric is the base config's best_metric
    last = history[-1].plan.index
    found = incumbent(history, recipe.mode)
    if found is None:
        return Decision(last, "stop", "no trial has completed (every one diverged or failed): "
                        "lower recipe.lr_min / recipe.lr_max", None, None, status="no_result")
    result, row = found
    overrides = result.overrides(row)
    diagnosis = diagnose_fn(row["workdir"], recipe.metric, recipe.thresholds)
    best = {"round": result.plan.index, "trial_id": row["trial_id"], "value": row["best"],
            "step": row["best_step"], "workdir": row["workdir"],
            "overrides": _tuned(overrides)}
    proposal = _propose(history, recipe, base, result, row, diagnosis, diagnose_fn)
    action, reason, fixed, field = (proposal.action, proposal.reason, proposal.fixed,
                                    proposal.field)
    if field is None:
        return Decision(last, action, reason, best, diagnosis, status=proposal.status)
    if last >= recipe.max_rounds:
        return Decision(last, "stop", f"max_rounds={recipe.max_rounds} reached (the next round "
                        f"would be: {reason})", best, diagnosis, status="budget_spent")
    used = sum(len(r.rows) for r in history)
    room = min(recipe.trials_per_round, recipe.max_trials - used)
    if room <= 0:
        return Decision(last, "stop", f"max_trials={recipe.max_trials} trials run (the next "
                        f"round would be: {reason})", best, diagnosis, status="budget_spent")
    seen = {_config_key({**r.overrides(x)}) for r in history for x in r.rows}
    values: list = []
    for value in proposal.candidates:
        if _config_key({**fixed, field: value}) not in seen and value not in values:
            values.append(value)
    if not values:
        return Decision(last, "stop", f"every trial of the next round ({reason}) has already "
                        "run", best, diagnosis, status="exhausted")
    if action == "regularize_longer" and room < len(values):  # without its control: no test
        return Decision(last, "stop", f"only {room} trial(s) left, and the next round ({reason}) "
                        f"needs {len(values)}", best, diagnosis, status="budget_spent")
    values = values[:room]
    fixed = {k: v for k, v in fixed.items() if k != field}  # the swept field is not fixed
    plan = RoundPlan(last + 1, action, reason, fixed, field, tuple(_sorted(values)))
    return Decision(last, action, reason, best, diagnosis, next_round=plan)


def _warms_up(base: Any) -> bool:
    """Whether `schedule.warmup_steps` shapes this base config's schedule (every schedule but
    one_cycle, which warms up over its pct_start)."""
    return space_lib.get_field(base, "schedule.name") != "one_cycle"


@dataclasses.dataclass(frozen=True)
class _Incumbent:
    """The best trial as `_propose` reads it: the rounds so far, its settings and diagnosis."""

    history: Sequence[RoundResult]
    recipe: Recipe
    base: Any
    row: dict
    overrides: dict  # everything it changed from the base config
    diagnosis: Diagnosis
    diagnose_fn: DiagnoseFn
    lr_cap: float  # the lowest rate that diverged with its settings (`_lr_cap`)

    def value(self, field: str) -> Any:
        """Its `field`: its override, else the base config's."""
        return self.overrides.get(field, space_lib.get_field(self.base, field))

    @property
    def fixed(self) -> dict:
        return dict(self.overrides)

    @property
    def lr(self) -> float:
        return self.value(LR_FIELD)

    @property
    def steps(self) -> int:
        return self.value(STEPS_FIELD)

    @property
    def evidence(self) -> str:
        """The diagnosis's finding, quoted in brackets in a reason: without its full stop."""
        return self.diagnosis.findings[0].message.rstrip(".")

    def lrs(self, *factors: float) -> tuple[float, ...]:
        """Its lr times `factors`, below every rate that diverged with its settings."""
        return tuple(round_value(self.lr * f) for f in factors if self.lr * f < self.lr_cap)

    def longer(self, why: str, lr_factors: tuple[float, ...]) -> _Proposal | None:
        """A train_longer round (2x steps, at most max_steps; the lr times `lr_factors`), or
        None at max_steps."""
        steps, recipe = self.steps, self.recipe
        if steps >= recipe.max_steps:
            return None
        new_steps = min(2 * steps, recipe.max_steps)
        new_fixed = {**self.fixed, **logging_overrides(new_steps, recipe)}
        if _warms_up(self.base) and WARMUP_FIELD in self.overrides:
            new_fixed[WARMUP_FIELD] = min(new_fixed[WARMUP_FIELD], new_steps - 1)
        return _Proposal("train_longer", f"{why}: {new_steps} steps (was {steps}), lr around "
                         f"{_short(self.lr)}", new_fixed, LR_FIELD, self.lrs(*lr_factors))


def _lr_cap(history: Sequence[RoundResult], overrides: Mapping[str, Any]) -> float:
    """The lowest rate that diverged with the settings of `overrides` (inf if none): a
    divergence caused by, say, a strong weight decay in a regularization round says nothing
    about the incumbent's lr."""
    same = _settings_key(overrides)
    diverged = [r.overrides(x)[LR_FIELD] for r in history for x in r.rows
                if x["status"] == "diverged" and LR_FIELD in r.overrides(x)
                and _settings_key(r.overrides(x)) == same]
    return min(diverged) if diverged else math.inf


def _propose(history: Sequence[RoundResult], recipe: Recipe, base: Any, result: RoundResult,
             row: dict, diagnosis: Diagnosis, diagnose_fn: DiagnoseFn) -> _Proposal:
    """The next round the incumbent's diagnosis asks for (see the module docstring)."""
    overrides = result.overrides(row)
    best = _Incumbent(history, recipe, base, row, overrides, diagnosis, diagnose_fn,
                      _lr_cap(history, overrides))
    verdict = diagnosis.primary
    if verdict in ("diverged", "unstable"):
        return _stabilize(best, verdict)
    return _past_the_edge(best) or _BY_VERDICT.get(verdict, _cannot_judge)(best)


def _stabilize(best: _Incumbent, verdict: str) -> _Proposal:
    """diverged / unstable: lower lr with gradient clipping (at 1, or the run's own tighter
    clip) and a 5% warmup (or the run's own longer one)."""
    clip = best.value(CLIP_FIELD)
    stable = {**best.fixed, CLIP_FIELD: CLIP_NORM if clip is None else min(clip, CLIP_NORM)}
    if _warms_up(best.base):
        stable[WARMUP_FIELD] = max(best.value(WARMUP_FIELD), round(WARMUP_FRACTION * best.steps))
    return _Proposal("stabilize", f"the best trial is {verdict} ({best.evidence}): lower lr, "
                     f"clip gradients at {stable[CLIP_FIELD]:g}", stable, LR_FIELD,
                     best.lrs(0.5, 1.0, 0.25))


# Verdicts whose own round raises the rate or trains longer: a best lr at the low edge of the
# grid (say, every higher rate diverged) is no reason to try lower rates for them.
_WANTS_MORE_LEARNING = ("too_slow", "underfitting")


def _past_the_edge(best: _Incumbent) -> _Proposal | None:
    """An lr_search past the grid's edge when the best lr is at it, unless every candidate ran
    or the edge is the low one and the verdict asks for faster learning."""
    edge, ratio = _lr_edge(best.history, best.overrides, best.row["best"])
    if not edge or (edge == "low" and best.diagnosis.primary in _WANTS_MORE_LEARNING):
        return None
    # Half a grid step and a full one past the edge: the optimum may lie in either.
    factors = (ratio**0.5, ratio) if edge == "high" else (ratio**-0.5, 1 / ratio)
    candidates = best.lrs(*factors)
    if all(_config_key({**best.fixed, LR_FIELD: v}) in _seen(best.history) for v in candidates):
        return None
    return _Proposal("lr_search", f"the best lr {_short(best.lr)} is the {edge}est rate "
                     "tried with these settings: extend the grid past it", best.fixed, LR_FIELD,
                     candidates)


def _converged(best: _Incumbent) -> _Proposal:
    return _stop(f"the best trial has converged ({best.evidence})", "converged")


def _too_slow(best: _Incumbent) -> _Proposal:
    """lr x(2, 4); if both ran already, train longer."""
    proposal = _Proposal("lr_search", f"the best trial learns too slowly ({best.evidence}): "
                         "raise lr", best.fixed, LR_FIELD, best.lrs(2.0, 4.0))
    if all(_config_key({**best.fixed, LR_FIELD: v}) in _seen(best.history)
           for v in best.lrs(2.0, 4.0)):
        proposal = best.longer("too slow even at the best lr", (1.0, 2.0)) or proposal
    return proposal


def _overfitting(best: _Incumbent) -> _Proposal:
    """The first knob of recipe.regularizers that has a round to run, else stop."""
    swept = {r.plan.field for r in best.history}
    for name in task_regularizers(best.recipe.regularizers, config_lib.config_task(best.base)):
        proposal = _knob_round(best, REGULARIZERS[name], swept)
        if proposal is not None:
            return proposal
    return _stop(f"the best trial overfits ({best.evidence}) and every knob of "
                 f"recipe.regularizers={list(best.recipe.regularizers)} has been swept or is at "
                 "its strongest", "exhausted")


def _knob_round(best: _Incumbent, knob: Regularizer, swept: set[str]) -> _Proposal | None:
    """`knob`'s round: a swept knob's lengthening (`_lengthen`), an unswept one turned up from
    the incumbent's value; None when it has none (off and optional, or at its strongest)."""
    current = knob_value(best.base, best.overrides, knob.field)
    if knob.field in swept:
        if not best.recipe.lengthen_regularizers:
            return None
        return _lengthen(knob, current, best.history, best.recipe, best.base, best.fixed,
                         best.evidence, best.diagnose_fn)
    if knob.optional and current is None:
        return None
    candidates = knob.stronger(current)
    if not candidates:
        return None
    needs = {AUGMENT: True} if knob.needs_augment and not best.value(AUGMENT) else {}
    return _Proposal("regularize", f"the best trial overfits ({best.evidence}): sweep "
                     f"{knob.field}", {**best.fixed, **needs}, knob.field, candidates)


def _underfitting(best: _Incumbent) -> _Proposal:
    """Train longer with lr x(1, 2, 0.5); at max_steps, or at once when the train loss
    plateaued, weight decay x(0.3, 0.1); with no weight decay left, stop."""
    # A train loss that plateaued while the rate was high is not short of steps.
    plateaued = best.diagnosis.findings[0].evidence.get("train_loss_plateaued")
    proposal = None if plateaued else best.longer(f"the best trial underfits ({best.evidence})",
                                                  (1.0, 2.0, 0.5))
    if proposal:
        return proposal
    wd = best.value(WEIGHT_DECAY)
    where = "with a plateaued train loss" if plateaued else "at max_steps"
    if wd > 0:
        return _Proposal("less_regularization", f"the best trial underfits {where} "
                         f"({best.evidence}): lower the weight decay", best.fixed, WEIGHT_DECAY,
                         (round_value(wd * 0.3), round_value(wd * 0.1)))
    joined = "and" if plateaued else "with"
    return _stop(f"the best trial underfits {where} {joined} no weight decay ({best.evidence}): "
                 "a larger model is needed", "exhausted")


def _still_improving(best: _Incumbent) -> _Proposal:
    """Train longer with lr x(1, 0.5, 2); at max_steps, stop."""
    proposal = best.longer(f"the best trial is still improving ({best.evidence})",
                           (1.0, 0.5, 2.0))
    if proposal:
        return proposal
    return _stop(f"still improving at max_steps={best.recipe.max_steps} ({best.evidence}): raise "
                 "recipe.max_steps to continue", "budget_spent")


def _cannot_judge(best: _Incumbent) -> _Proposal:
    return _stop(f"cannot judge the best trial ({best.evidence})", "exhausted")


# The round each verdict asks for (after diverged/unstable and an lr at the grid's edge).
_BY_VERDICT: dict[str, Callable[[_Incumbent], _Proposal]] = {
    "converged": _converged, "too_slow": _too_slow, "overfitting": _overfitting,
    "underfitting": _underfitting, "still_improving": _still_improving}


def _lengthen(knob: Regularizer, current: Any, history: Sequence[RoundResult], recipe: Recipe,
             base: Any, fixed: dict, evidence: str, diagnose_fn: DiagnoseFn) -> _Proposal | None:
    """A round rerunning `knob`'s best other value against the incumbent's (`current`) at twice
    the steps it had, when it lost to the overfitting incumbent while still learning; else None.

    Strong regularizers (RandAugment, CutMix) slow training down and pay off only on a longer
    schedule, so a comparison at the incumbent's short budget can reject one that would win.
    """
    sign = 1 if recipe.mode == "max" else -1
    knob_round = [r for r in history if r.plan.field == knob.field][-1]
    # Its best value stronger than the incumbent's (ties: the stronger one).
    tried = [x for x in knob_round.rows if x["status"] == "completed" and x["best"] is not None
             and strength(knob_round.overrides(x)[knob.field]) > strength(current)]
    if not tried:
        return None
    row = max(tried, key=lambda x: (sign * x["best"],
                                    strength(knob_round.overrides(x)[knob.field])))
    steps = knob_round.overrides(row).get(STEPS_FIELD, space_lib.get_field(base, STEPS_FIELD))
    if steps >= recipe.max_steps:
        return None
    verdict = diagnose_fn(row["workdir"], recipe.metric, recipe.thresholds)
    if verdict.primary not in ("too_slow", "underfitting", "still_improving"):
        return None
    value = knob_round.overrides(row)[knob.field]
    incumbent_steps = fixed.get(STEPS_FIELD, space_lib.get_field(base, STEPS_FIELD))
    new_steps = max(min(2 * steps, recipe.max_steps), incumbent_steps)
    new_fixed = {**fixed, **logging_overrides(new_steps, recipe)}  # steps only grow: warmup fits
    both = ""
    if knob.needs_augment and not fixed.get(AUGMENT, space_lib.get_field(base, AUGMENT)):
        new_fixed[AUGMENT] = True
        both = f" (both with {AUGMENT}=True)"
    return _Proposal("regularize_longer", f"the best trial overfits ({evidence}) and "
                     f"{knob.field}={_short(value)} lost at {steps} steps while still learning "
                     f"({verdict.primary}): compare it with {_short(current)} at {new_steps} "
                     f"steps{both}", new_fixed, knob.field, (value, current))


def _settings_key(overrides: Mapping[str, Any]) -> str:
    """The config key of `overrides` without the lr and the fields stabilizing or lengthening
    a run sets (steps, warmup, clipping): trials with the same key differ only in those."""
    return _config_key({k: v for k, v in overrides.items()
                        if k not in (LR_FIELD, STEPS_FIELD, WARMUP_FIELD, CLIP_FIELD)})


def _lr_edge(history: Sequence[RoundResult], overrides: Mapping[str, Any],
             score: float | None = None) -> tuple:
    """('low' | 'high' | None, grid spacing): whether the incumbent's lr is the lowest/highest
    of the rates tried (diverged ones included) with otherwise the same settings, and beats
    them: another rate with the same `score` (a saturated metric) makes the optimum flat, not
    an edge to extend past."""
    same = _config_key({k: v for k, v in overrides.items() if k != LR_FIELD})
    rows = [(r.overrides(x), x) for r in history for x in r.rows]
    rows = [(o, x) for o, x in rows
            if LR_FIELD in o and _config_key({k: v for k, v in o.items() if k != LR_FIELD}) == same]
    rates = sorted({o[LR_FIELD] for o, _ in rows})
    if LR_FIELD not in overrides or len(rates) < 2:
        return None, 0.0
    lr = overrides[LR_FIELD]
    edge = "low" if lr == rates[0] else "high" if lr == rates[-1] else None
    if edge and score is not None and any(o[LR_FIELD] != lr and x["status"] == "completed"
                                          and x["best"] == score for o, x in rows):
        edge = None
    return edge, _spacing(rates)


def _spacing(values: Sequence[float]) -> float:
    """The grid's geometric spacing (ratio of neighbours, averaged in log space; >= 2)."""
    low, high = min(values), max(values)
    ratio = (high / low) ** (1 / (len(values) - 1)) if len(values) > 1 else 2.0
    return max(ratio, 2.0)


def _seen(history: Sequence[RoundResult]) -> set[str]:
    return {_config_key(r.overrides(x)) for r in history for x in r.rows}


# --------------------------------------------------------------------------------- driver
def _same_refusal(base_config: Any, err: ValueError) -> bool:
    """Whether `base_config` as given is refused with `err`'s message too: then the fields
    the recipe fixes (steps, intervals) are not what is wrong, and the recipe is not blamed."""
    try:
        config_lib.validate_config(base_config)
    except ValueError as own:
        return str(own) == str(err)
    return False


def check_tune(base_config: Any, recipe: Recipe | Any) -> tuple[Recipe, RoundPlan]:
    """The recipe (checked against `base_config`: metric, regularizers, tuned fields) and its
    round 1, with every round-1 trial config through `validate_config`: the checks that need
    neither the dataset nor the devices, so launch.submit runs them on a login node too."""
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_config(recipe)
    recipe = recipe.for_config(base_config)
    plan = first_round(recipe)
    # The base as the rounds train it (their step counts: warmup and boundaries must fit).
    try:
        config_lib.validate_config(plan.base_config(base_config))
    except ValueError as err:  # name the recipe's fields, not only the config's they set
        if _same_refusal(base_config, err):  # the base's own fault, whatever the steps
            raise
        fixed = ", ".join(f"{k}={v!r}" for k, v in plan.fixed.items())
        raise ValueError(f"recipe: round 1 trains the base config with {fixed} (from "
                         f"recipe.round1_steps={recipe.round1_steps!r}, evals_per_trial and "
                         f"logs_per_trial), which it refuses: {err}") from None
    # The fields later rounds may set must exist now, not after hours of round 1.
    space_lib.check_fields(base_config, space_lib.grid({f: (None,) for f in TUNED_FIELDS}))
    check_regularizers(recipe, plan.base_config(base_config))  # at round 1's step counts
    for trial, config in space_lib.trial_configs(plan.base_config(base_config), plan.space()):
        try:
            config_lib.validate_config(config)
        except ValueError as err:
            raise ValueError(f"recipe: round 1 ({plan.action}) trial {trial.index} "
                             f"{dict(trial.overrides)}: {err}") from None
    return recipe, plan


def run_tune(base_config: Any, recipe: Recipe | Any, tune_dir: str, *, verbose: bool = True,
             diagnose_fn: DiagnoseFn = diagnose_workdir) -> dict:
    """Runs (or resumes) the recipe in `tune_dir`; returns the recipe.json record.

    Everything is checked before any training: the recipe, the base config, the fields the
    recipe tunes and every round-1 trial config; a `tune_dir` made with another base config or
    recipe is refused. Each later round's trial configs are checked before that round trains.
    """
    check_output_dir(tune_dir, "recipe: tune_dir")  # before round 1 reads (or generates) data
    recipe, plan = check_tune(base_config, recipe)
    _check_round(base_config, plan)  # the engine's checks (dataset, devices) on round 1
    with directory_lock(tune_dir, "tune_dir", kind="tune"):  # one driver per tune_dir
        return _run_rounds(base_config, recipe, tune_dir, plan, verbose, diagnose_fn)


def _run_rounds(base_config: Any, recipe: Recipe, tune_dir: str, plan: RoundPlan | None,
                verbose: bool, diagnose_fn: DiagnoseFn) -> dict:
    """`run_tune` once `tune_dir` is held: each round a sweep, planned from the rounds before."""
    _prepare_tune_dir(tune_dir, base_config, recipe)
    started = time.time()
    earlier = _earlier_wall_time(tune_dir)
    history: list[RoundResult] = []
    decisions: list[Decision] = []
    status, reason = "running", ""
    checked = plan  # `run_tune` checked round 1 before taking the lock
    running = None  # the round whose sweep is under way, for a record written if it stops
    # SIGTERM between rounds (no run holds a handler then) is kept pending, not the default
    # kill: the next round's first trial stops before training and recipe.json says why.
    with StopRequest():
        try:
            if recipe.lr_range_test and plan is not None:
                plan = range_test_round(base_config, recipe, tune_dir, verbose)
            while plan is not None:
                if plan is not checked:
                    _check_round(base_config, plan)
                say(verbose, f"=== Round {plan.index} ({plan.action}): {plan.reason}")
                running = plan
                rows = run_sweep(plan.base_config(base_config), plan.space(),
                                 os.path.join(tune_dir, plan.dirname), recipe.metric, recipe.mode,
                                 verbose=verbose)
                history.append(RoundResult(plan, sorted(rows, key=lambda r: r["index"])))
                running = None
                failed = [r for r in rows if r["status"] not in ("completed", "diverged")]
                if failed:
                    status = "failed"
                    reason = (f"round {plan.index}: {len(failed)} trial(s) did not finish ("
                              + "; ".join(f"{r['trial_id']}: {r['status']} {r['reason']}"
                                          for r in failed[:3])
                              + "); rerun the command to retry them")
                    break
                decision = decide(history, recipe, base_config, diagnose_fn)
                decisions.append(decision)
                say(verbose, f"=== After round {plan.index}: {decision.action}: {decision.reason}")
                status, reason, plan = decision.status, decision.reason, decision.next_round
                if plan is not None:  # the last round's outputs are written once, below
                    _write_outputs(tune_dir, recipe, history, decisions, "running", reason,
                                   (time.time() - started, earlier), diagnose_fn)
        except BaseException as err:  # why it stopped goes to recipe.json, then the error goes on
            stopped = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            why = f"{stopped} ({type(err).__name__}: {err}); rerun the command to continue"
            try:
                _write_outputs(tune_dir, recipe, history, decisions, stopped, why,
                               (time.time() - started, earlier), diagnose_fn, running)
            except Exception:  # noqa: BLE001 — e.g. the diagnosis itself failed: record without it
                _write_outputs(tune_dir, recipe, history, decisions, stopped, why,
                               (time.time() - started, earlier), None, running)
            raise
    record = _write_outputs(tune_dir, recipe, history, decisions, status, reason,
                            (time.time() - started, earlier), diagnose_fn)
    if verbose:
        print(report_lib.format_summary(record), flush=True)
    return record


def _check_round(base: Any, plan: RoundPlan) -> None:
    """Every trial config of the round passes the engine's checks (schedule included)."""
    try:
        trial_configs(plan.base_config(base), plan.space())
    except ValueError as err:
        raise ValueError(f"recipe: round {plan.index} ({plan.action}): {err}") from None


def _prepare_tune_dir(tune_dir: str, base: Any, recipe: Recipe) -> None:
    """Creates tune.json, or refuses (`check_tune_dir`) a tune_dir made with another base config
    or recipe."""
    current = check_tune_dir(tune_dir, base, recipe)
    os.makedirs(tune_dir, exist_ok=True)
    atomic_write(os.path.join(tune_dir, TUNE_FILE), json.dumps(current, indent=2))


def check_tune_dir(tune_dir: str, base: Any, recipe: Recipe) -> dict:
    """Raises a ValueError when `tune_dir`'s tune.json was made with another base config or
    recipe (only `max_rounds` may change); returns this tune's record (writes nothing:
    `launch.submit` calls it before queuing a job)."""
    current = {"base_config": config_lib.flatten(base), "recipe": recipe.describe()}
    path = os.path.join(tune_dir, TUNE_FILE)
    fresh = ("to start fresh use a new --tune_dir or delete this one; to continue it restore the "
             "original")
    saved = read_json(path)
    if saved is not None:
        # A tune.json from before `regularizers` existed ran the default knobs.
        old = config_lib.flatten({"regularizers": list(DEFAULT_REGULARIZERS),
                                  "lengthen_regularizers": False, "lr_range_test": False,
                                  **saved.get("recipe", {})})
        # ... and one from before thresholds.plateau_ratio or jump_noise_factor existed, their
        # defaults (jump_noise_factor was rise_noise_factor, and judged only rises, in 12fddea).
        if "thresholds.rise_noise_factor" in old:
            old["thresholds.jump_noise_factor"] = old.pop("thresholds.rise_noise_factor")
        for field in ("plateau_ratio", "jump_noise_factor"):
            old.setdefault(f"thresholds.{field}", getattr(Thresholds(), field))
        new = config_lib.flatten(current["recipe"])
        changed = sorted(k for k in set(old) | set(new)
                         if k != "max_rounds" and old.get(k) != new.get(k))
        if changed:
            details = ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
                                for k in changed)
            raise ValueError(f"recipe: tune_dir={tune_dir!r} was created with a different "
                             f"recipe ({details}); {fresh} recipe (only max_rounds may change).")
        details = config_changes(saved.get("base_config", {}), current["base_config"])
        if details:
            raise ValueError(f"recipe: tune_dir={tune_dir!r} was created with a different base "
                             f"config ({details}); {fresh} base config.")
        started = max(_started_rounds(tune_dir), default=0)
        if recipe.max_rounds < started:  # the record would be rebuilt without the later rounds
            raise invalid(_OWNER, "max_rounds", recipe.max_rounds,
                          f"tune_dir={tune_dir!r} holds round {started} already, which a smaller "
                          f"max_rounds would drop from the record; expected at least {started}")
    return current


def interruption_message(tune_dir: str) -> str:
    """What a Ctrl-C'd `run_tune` in `tune_dir` stopped: the round it was in, that round's
    interrupted trial with its engine's message (the step, the checkpoint a rerun resumes from)
    and the round's results so far (`sweep.interruption_message`); outside a trial (the range
    test, between rounds), where the tune's report is."""
    rounds = _started_rounds(tune_dir)
    if rounds:  # rounds run in order: the last one started is the one Ctrl-C stopped
        last = max(rounds)
        round_dir = os.path.join(tune_dir, f"round_{last}")
        if interrupted_trial(os.path.join(round_dir, TRIALS_DIR)):
            return f"round {last}: {sweep_interruption_message(round_dir)}"
    return (f"Ctrl-C; rerunning the same command resumes the tune. Results so far: "
            f"{os.path.join(tune_dir, report_lib.REPORT_FILE)}")


def _started_rounds(tune_dir: str) -> list[int]:
    """The indices of the `round_<k>` directories in `tune_dir`: the rounds that started."""
    return [int(name.removeprefix("round_")) for name in _listdir(tune_dir)
            if name.startswith("round_") and name.removeprefix("round_").isdigit()]


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


# -------------------------------------------------------------------------------- outputs
def _write_outputs(tune_dir: str, recipe: Recipe, history: Sequence[RoundResult],
                   decisions: Sequence[Decision], status: str, reason: str,
                   wall: tuple[float, float], diagnose_fn: DiagnoseFn | None,
                   running: RoundPlan | None = None) -> dict:
    """Writes recipe.json, report.md and tune.png (atomically) and returns the record; each
    round's best trial is diagnosed with `diagnose_fn` (None: left out). `wall`: this
    invocation's seconds so far and the earlier invocations' (`_earlier_wall_time`). `running`:
    the round a stopped tune was in the middle of (its sweep keeps the finished trials)."""
    rounds = []
    for i, result in enumerate(history):
        found = incumbent([result], recipe.mode)
        best = None
        if found:
            row = found[1]
            best = {"trial_id": row["trial_id"], "value": row["best"], "step": row["best_step"],
                    "overrides": _tuned(result.overrides(row)), "workdir": row["workdir"],
                    "diagnosis": diagnose_fn(row["workdir"], recipe.metric,
                                             recipe.thresholds).to_dict()
                    if diagnose_fn else None}
        rounds.append({
            **result.plan.describe(),
            "trials": [{k: r[k] for k in ("index", "trial_id", "status", "best", "best_step",
                                          "final", "steps", "wall_time_s", "reason", "workdir")}
                       | {"value": r["overrides"][result.plan.field]} for r in result.rows],
            "best": best,
            "decision": decisions[i].describe() if i < len(decisions) else None,
        })
    final = decisions[-1].incumbent if decisions else None
    trial_wall = sum(t["wall_time_s"] or 0.0 for r in history for t in r.rows)
    record = json.loads(json.dumps({
        "status": status, "reason": reason, "metric": recipe.metric, "mode": recipe.mode,
        "recipe": recipe.describe(), "num_rounds": len(history),
        "num_trials": sum(len(r.rows) for r in history), "trial_wall_time_s": trial_wall,
        # The trials ran inside the tune's invocations: a killed one, counted only up to its
        # last write of this record, counts at least up to its trials' last checkpoint.
        "wall_time_s": wall[0], TOTAL_WALL_TIME: max(wall[0] + wall[1], trial_wall),
        "best": final,
        "diagnosis": decisions[-1].diagnosis.to_dict() if decisions and final else None,
        "rounds": rounds,
        "running_round": running.describe() if running is not None else None,
    }))
    atomic_write(os.path.join(tune_dir, RECIPE_FILE), json.dumps(record, indent=2))
    atomic_write(os.path.join(tune_dir, report_lib.REPORT_FILE), report_lib.format_report(record))
    if report_lib.has_plot(record):
        report_lib.plot_tune(record, os.path.join(tune_dir, report_lib.PLOT_FILE),
                             recipe.thresholds.ema_weight)
    return record


# -------------------------------------------------------------------------------- helpers
def _earlier_wall_time(tune_dir: str) -> float:
    """Seconds the tune's earlier invocations ran, from its recipe.json (each up to its last
    write, and in all at least their trials' training time: `_write_outputs`; 0 for a new
    tune). A record from before `total_wall_time_s` has only its last invocation's
    `wall_time_s`."""
    record = read_json(os.path.join(tune_dir, RECIPE_FILE)) or {}
    return float(record.get(TOTAL_WALL_TIME, record.get("wall_time_s", 0.0)) or 0.0)


def _tuned(overrides: Mapping[str, Any]) -> dict:
    """The overrides without the engine's runtime fields (intervals): the config that matters."""
    return {k: v for k, v in overrides.items() if k not in config_lib.RUNTIME_FIELDS}


def _config_key(overrides: Mapping[str, Any]) -> str:
    return json.dumps(_tuned(overrides), sort_keys=True, default=str)


def _sorted(values: Sequence[Any]) -> list:
    try:
        return sorted(values)
    except TypeError:
        return list(values)


def _preview(values: Sequence[Any], head: int = 3) -> str:
    """`values` as a tuple, or for a long one its first `head` and last value with the counts,
    so an error about a 500-point grid stays one readable line."""
    values = tuple(values)
    if len(values) <= head + 2:
        return repr(values)
    shown = ", ".join(repr(v) for v in values[:head])
    return (f"({shown}, ..., {values[-1]!r}): {len(values)} rates, "
            f"{len(set(values))} distinct")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)

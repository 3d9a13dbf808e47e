"""Learning-curve diagnosis of one run, read from its `metrics.jsonl` and `summary.json`.

`diagnose(curves)` returns a `Diagnosis`: the findings that hold, most urgent first, each a
verdict with the numbers behind it and the config changes it recommends. Verdicts (`VERDICTS`):

    diverged          NaN/inf train or eval loss (the engine stops such a run) or a loss
                      explosion: a logged train loss above `explosion_factor` x the first one
                      (for a classifier, x ln(num_classes), its initial loss, if that is
                      lower), or a smoothed one ending above `relapse_factor` x its minimum (a
                      collapse after learning, e.g. back to chance), or one that rose above its
                      first log and ended no lower than its start or chance, ln(num_classes)
                      (a network the rate stopped learning, e.g. dead ReLUs: `spike_min_rise`,
                      `jump_noise_factor`, `min_loss_delta`). Step given.
    unstable          repeated train-loss spikes above a windowed median of the preceding logs.
    too_slow          the smoothed train loss fell by less than `slow_min_drop` of its first
                      value over the whole run, and not fast at first (beyond the logs' noise,
                      `jump_noise_factor`) and then hardly at all (`plateau_ratio`, measured
                      per unit of the logged learning rate): the learning rate is too low.
    overfitting       eval loss rose `eval_loss_rise` above its minimum (step of the minimum
                      given), or the train-eval top-1 gap is large and growing, or very large.
    underfitting      train top-1 at the end (smoothed, or the last log where higher) below
                      `underfit_train_top1`, and no overfitting: eval top-1 within
                      `overfit_gap` of it or above it (augmented or mixed train images), or
                      further below but neither growing apart nor `large_gap` away.
    still_improving   over the last quarter, the eval metric improved by more than its noise
                      or the eval loss fell by more than `tail_loss_drop`.
    converged         none of the above: the eval metric is flat at the end.
    insufficient_data fewer logs/evals than a diagnosis needs (log or evaluate more often).

Detection runs (`config.task="detection"`) are diagnosed on `map50`, `map`, `coco_map50` or
`coco_map75`: diverged, unstable and too_slow read the train loss (the detector's summed loss)
and still_improving / converged the mAP, whose noise level is approximated like an accuracy's
(binomial standard error over the eval images; mAP is not a proportion, but it is a [0, 1]
score of the same per-image evidence). Detectors log no eval loss and no top-1, so overfitting
and underfitting are never found for them (a train/eval mAP gap would need an eval pass over
the train split, which the engine does not run); read the learning curves for those.
Segmentation runs are diagnosed the same way on `miou` or `pixel_accuracy` (noise level as for
an accuracy over the eval images).

A classifier's train logs without top-1 (its evals hold top1), or train logs without the
learning rate (the engine writes both in every train log), are diagnosed on what they hold, and
`Diagnosis.notes` names the checks that skipped or approximated for want of them.

Noisy curves are smoothed explicitly: the train loss with a bias-corrected exponential moving
average (`exponential_smoothing`, TensorBoard's smoothing; not the weight average of
`cnnjax.train.ema`) for trends and with a trailing windowed median for spikes; eval accuracy
changes are compared with its binomial standard error on the eval set.
Thresholds live in `Thresholds` (defaults with their reasons), so a caller can tune them.

The curves are read and checked by `cnnjax.tune.metrics_file` (`load_curves`): a metrics.jsonl
record the engine never writes (a NaN/inf or percent score, a field that the run's other records
hold missing, a step logged twice, ...) is refused with a ValueError naming its line and field,
and before any verdict so are judged scores that some evals lack, NaN/inf ones and ones outside
[0, 1] of curves built from records (`check_curves`, naming the metric and step). So is a judged
`metric` the evals do not report, naming the metrics.jsonl when the curves were read from one
(`Curves.source`).

    python -m cnnjax.tune.diagnose --workdir=workdirs/lenet5_digits
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cnnjax.train import config as config_lib
from cnnjax.train.ema import METRIC_PREFIX
from cnnjax.train.loop import CONFIG_FILE
from cnnjax.tune.metrics_file import FRACTION_METRICS, Curves, check_curves, load_curves
from cnnjax.tune.regularizers import LABEL_SMOOTHING, WEIGHT_DECAY
from cnnjax.tune.space import get_field
from cnnjax.utils.files import read_json
from cnnjax.utils.validation import check_choice, invalid

#: Every verdict, most urgent first (`Diagnosis.primary` is the first that holds).
VERDICTS = (
    "diverged",
    "unstable",
    "too_slow",
    "overfitting",
    "underfitting",
    "still_improving",
    "converged",
    "insufficient_data",
)
# Recommended warmup: 5% of the run, a common choice (e.g. Goyal et al. 2017 warm up ~5 epochs).
WARMUP_FRACTION = 0.05
WARMUP_FIELD = "schedule.warmup_steps"
LR_FIELD = "optimizer.learning_rate"
STEPS_FIELD = "num_train_steps"
CLIP_FIELD = "optimizer.grad_clip_norm"
# The weight decay advised to a run without any (the recipe's first step up from zero).
WEIGHT_DECAY_FROM_ZERO = 1e-4
_OWNER = "diagnose"


# Thresholds compared with top-1 accuracies or their differences, all fractions in [0, 1].
TOP1_FRACTION_FIELDS = ("min_accuracy_delta", "overfit_gap", "gap_growth", "large_gap",
                        "underfit_train_top1")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The numbers the verdicts compare against; defaults suit classifiers trained with
    cross-entropy for a few hundred to a few thousand steps, logged every ~1-5% of the run."""

    # Smoothing weight of the train-loss EMA (TensorBoard's default slider value): ~2.5 logs.
    ema_weight: float = 0.6
    # A loss above 2x the first logged one (near ln(classes) at init) has blown up.
    explosion_factor: float = 2.0
    # ... and so has a smoothed loss that ends above 2x its own minimum (by at least
    # `spike_min_rise` of the first loss): a collapse after learning, e.g. back to chance.
    relapse_factor: float = 2.0
    # Spikes are measured against the median of this many preceding train logs.
    spike_window: int = 5
    # A logged loss 1.5x that median is a spike: window means of >= 10 steps rarely jump 50%.
    spike_factor: float = 1.5
    # ... and rises by at least 5% of the first loss (ignores jitter once the loss is ~0).
    spike_min_rise: float = 0.05
    # A jump a verdict rests on, the rise of a network the rate stopped learning (`diverged`)
    # or a plateau's early fall (no `too_slow`), also exceeds 5x the train loss's log-to-log
    # noise (robust standard deviation): on flat noisy curves (40 logs at ln 10, noise 2.6%) a
    # smoothed log lands 5% above a low first log in ~1 run in 4, 5 sds ~1 in 700; a high
    # first log made 4% of them (sd 0.06) a "plateau". Runs of fewer logs estimate their noise
    # less surely, and the floor widens by sqrt(39 / log-to-log changes) (`_jump_floor`).
    jump_noise_factor: float = 5.0
    # Two spikes are a pattern; a single one (even spanning consecutive logs) may be one bad batch.
    min_spikes: int = 2
    # Learning has barely started if the smoothed loss fell by < 30% of its first value ...
    slow_min_drop: float = 0.3
    # ... unless it fell fast and then flattened: over the second half of the learning rate's
    # budget (its sum over the steps) it fell by less than this fraction of what it fell per
    # unit of that budget in the first half. A rate-limited loss falls in step with the lr
    # (ratio ~1: 1.2 on LeNet-5/digits at lr 1e-4); a plateau (0.19 at weight decay 0.3) is a
    # capacity or regularization limit that a larger rate does not lift. A smoothed train loss
    # still falling more than `tail_loss_drop` over the last `tail_fraction` is no plateau
    # (a high-lr phase at its noise floor, then the fall as the schedule anneals the rate).
    plateau_ratio: float = 0.5
    # The last quarter of the run is where "still improving" vs "plateau" is judged.
    tail_fraction: float = 0.25
    # Accuracy changes smaller than 2 binomial standard errors of the eval set are noise.
    noise_std_errors: float = 2.0
    # ... and never smaller than 0.2 points (huge eval sets still have run-to-run noise).
    min_accuracy_delta: float = 0.002
    # Loss-metric changes below 2% (relative) are noise.
    min_loss_delta: float = 0.02
    # An eval loss still falling > 20% within the last quarter is far from a plateau, even when
    # top-1 on a small eval set moves less than its noise (and so is a smoothed train loss).
    tail_loss_drop: float = 0.2
    # Eval loss 10% above its minimum, at least 2 evals after it, is overfitting.
    eval_loss_rise: float = 0.1
    # A train-eval top-1 gap over 5 points is large ...
    overfit_gap: float = 0.05
    # ... and growing if it widened by 2 points (or more than the eval noise) since mid-run.
    gap_growth: float = 0.02
    # A gap over 10 points is overfitting even when it no longer grows (memorized train set).
    large_gap: float = 0.1
    # Below 90% train top-1 the model does not fit its training set (CNNs on the classic
    # benchmarks reach >95%); lower it for ImageNet-scale data.
    underfit_train_top1: float = 0.9
    # Fewest train logs / evals a trend can be read from.
    min_train_logs: int = 5
    min_evals: int = 3

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            integral = field.name in ("spike_window", "min_spikes", "min_train_logs", "min_evals")
            ok = isinstance(value, int) if integral else isinstance(value, int | float)
            if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
                raise invalid(_OWNER, f"thresholds.{field.name}", value,
                              f"expected a positive {'integer' if integral else 'number'}")
        if self.relapse_factor <= 1:  # a loss always ends at >= 1 x its minimum
            raise invalid(_OWNER, "thresholds.relapse_factor", self.relapse_factor,
                          "expected a number > 1")
        if self.explosion_factor <= 1:  # else the first logged loss itself would "explode"
            raise invalid(_OWNER, "thresholds.explosion_factor", self.explosion_factor,
                          "expected a number > 1")
        for name in ("ema_weight", "slow_min_drop", "plateau_ratio", "tail_fraction"):
            if getattr(self, name) >= 1:
                raise invalid(_OWNER, f"thresholds.{name}", getattr(self, name),
                              "expected a number in (0, 1)")
        for name in TOP1_FRACTION_FIELDS:  # compared with top-1 in [0, 1]: 90 is not 90%
            if getattr(self, name) > 1:
                raise invalid(_OWNER, f"thresholds.{name}", getattr(self, name),
                              "expected a fraction of top-1 in (0, 1], e.g. 0.9 for 90%")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> Thresholds:
        """Defaults with `values` replacing some (unknown names are refused, listing the rest)."""
        values = dict(values.items()) if values else {}
        known = [f.name for f in dataclasses.fields(cls)]
        for name in values:
            check_choice(_OWNER, "thresholds field", name, known)
        return cls(**values)


def as_thresholds(value: Thresholds | Mapping[str, Any] | None, owner: str = _OWNER
                  ) -> Thresholds:
    """`value` as `Thresholds`: None gives the defaults, a mapping (or ConfigDict) of some
    fields replaces those (`Thresholds.from_mapping`); anything else is refused by name. Errors
    name `owner` (e.g. `recipe: thresholds.overfit_gap=...`)."""
    if value is None or isinstance(value, Thresholds):
        return value or Thresholds()
    if isinstance(value, Mapping) or hasattr(value, "items"):
        try:
            return Thresholds.from_mapping(value)
        except ValueError as error:  # named by its owner, as its flag is (`--recipe.thresholds.x`)
            if owner == _OWNER:
                raise
            raise ValueError(f"{owner}: {str(error).removeprefix(f'{_OWNER}: ')}") from None
    raise invalid(owner, "thresholds", value,
                  "expected a Thresholds, a mapping of some of its fields or None (defaults)")


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """Change config `field`: `multiply` it by `value`, or `set` it to `value`."""

    field: str
    change: str
    value: Any
    reason: str

    def describe(self) -> str:
        """One line, e.g. `optimizer.learning_rate x0.3 (reason)` or `field = value (reason)`."""
        what = f"x{self.value:g}" if self.change == "multiply" else f"= {self.value!r}"
        return f"{self.field} {what} ({self.reason})"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One verdict, a one-line explanation with numbers, the numbers, and what to change."""

    verdict: str
    message: str
    evidence: dict
    recommendations: tuple[Recommendation, ...] = ()

    def to_dict(self) -> dict:
        """The finding as JSON-able data, its recommendations as dicts."""
        return {"verdict": self.verdict, "message": self.message, "evidence": self.evidence,
                "recommendations": [dataclasses.asdict(r) for r in self.recommendations]}


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """All findings of one run, most urgent first (`VERDICTS` order), and notes naming the
    checks it reached but could not run as the engine's logs would allow (`_notes`)."""

    findings: tuple[Finding, ...]
    status: str
    notes: tuple[str, ...] = ()

    @property
    def verdicts(self) -> list[str]:
        """The findings' verdicts, most urgent first."""
        return [f.verdict for f in self.findings]

    @property
    def primary(self) -> str:
        """The most urgent verdict (every diagnosis holds at least one finding)."""
        return self.findings[0].verdict

    def finding(self, verdict: str) -> Finding | None:
        """The finding with `verdict`, or None if the run did not get it."""
        return next((f for f in self.findings if f.verdict == verdict), None)

    def to_dict(self) -> dict:
        """The diagnosis as JSON-able data: status, primary verdict, findings and notes."""
        return {"status": self.status, "primary": self.primary,
                "findings": [f.to_dict() for f in self.findings], "notes": list(self.notes)}

    def format(self) -> str:
        """Human-readable: one block per finding with its recommendations."""
        lines = [f"run status: {self.status}; verdicts: {', '.join(self.verdicts)}"]
        for f in self.findings:
            lines.append(f"- {f.verdict}: {f.message}")
            lines.extend(f"    -> {r.describe()}" for r in f.recommendations)
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def diagnose_workdir(workdir: str, metric: str | None = None,
                     thresholds: Thresholds | Mapping[str, Any] | None = None) -> Diagnosis:
    """`diagnose(load_curves(workdir), ...)`; `metric` None: the run's own `best_metric`
    (config.json; top1 for runs that do not record one). Recommendations that would change
    nothing or undo what they ask for are left out: setting a field to the value the run
    already had (`data.augment = True` on an augmented run), multiplying a field that is 0
    (weight decay x0.3 of a run without any; x3 becomes the recipe's first step from zero,
    1e-4), a warmup where the run already warms up at least as long or runs `one_cycle`
    (which warms up by itself; the engine refuses warmup_steps there), a gradient clip where
    the run already clips at least as tightly, and label smoothing where the run already
    smooths at least as much (either "set" would loosen what it asks to tighten)."""
    curves = load_curves(workdir)  # checks workdir first
    config = read_json(os.path.join(workdir, CONFIG_FILE)) or {}
    if metric is None:
        metric = config.get("best_metric") or "top1"
    return _without_settings_in_effect(diagnose(curves, metric, thresholds), config)


def _without_settings_in_effect(diagnosis: Diagnosis, config: Mapping[str, Any]) -> Diagnosis:
    def in_effect(rec: Recommendation) -> bool:  # a "set" value is never None
        current = get_field(config, rec.field)
        if rec.field == WARMUP_FIELD and rec.change == "set":
            return (get_field(config, "schedule.name") == "one_cycle"
                    or (_is_count(current) and current >= rec.value))
        if rec.field == CLIP_FIELD and rec.change == "set":
            return _is_number(current) and current <= rec.value
        if rec.field == LABEL_SMOOTHING and rec.change == "set":
            return _is_number(current) and current >= rec.value
        return rec.change == "set" and current == rec.value

    def from_zero(rec: Recommendation) -> Recommendation | None:
        """`rec`, or for a multiple of a field that is 0 the step up from zero (weight decay)
        or None (a smaller multiple, or a field with no such step)."""
        if rec.change != "multiply" or get_field(config, rec.field) != 0:
            return rec
        if rec.field == WEIGHT_DECAY and rec.value > 1:
            return Recommendation(rec.field, "set", WEIGHT_DECAY_FROM_ZERO,
                                  f"{rec.reason}; the run has none")
        return None

    findings = tuple(dataclasses.replace(f, recommendations=tuple(
        r for r in map(from_zero, f.recommendations) if r is not None and not in_effect(r)))
        for f in diagnosis.findings)
    return dataclasses.replace(diagnosis, findings=findings)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ------------------------------------------------------------------------------ smoothing
def exponential_smoothing(values: np.ndarray, weight: float) -> np.ndarray:
    """Bias-corrected exponential moving average: s_t = w s_{t-1} + (1-w) x_t, divided by
    (1 - w^t) so the first points are not pulled towards zero (TensorBoard's smoothing)."""
    out = np.empty(len(values), dtype=np.float64)
    acc, norm = 0.0, 0.0
    for i, x in enumerate(values):
        acc = weight * acc + (1 - weight) * x
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out


def trailing_median(values: np.ndarray, window: int) -> np.ndarray:
    """Median of the `window` values before each point (NaN where there are fewer than 2)."""
    out = np.full(len(values), np.nan)
    for i in range(2, len(values)):
        out[i] = np.median(values[max(0, i - window):i])
    return out


# ------------------------------------------------------------------------------- verdicts
def diagnose(curves: Curves, metric: str = "top1",
             thresholds: Thresholds | Mapping[str, Any] | None = None) -> Diagnosis:
    """Every verdict that holds for `curves`, most urgent first; `metric` is the eval metric
    judged for improvement (loss, top1, top5; map50, map, coco_map50, coco_map75 for detection)."""
    t = as_thresholds(thresholds)
    judged = ("loss", *FRACTION_METRICS)
    check_choice(_OWNER, "metric", metric, (*judged, *(METRIC_PREFIX + m for m in judged)))
    # Before any verdict: a diverged or barely logged run must not hide a metric it never reports.
    if curves.eval_metrics and metric not in curves.eval_metrics:
        where = f" in {curves.source}" if curves.source else ""
        raise invalid(_OWNER, "metric", metric,
                      f"the run's evals{where} report {sorted(curves.eval_metrics)}")
    check_curves(curves, metric, judged)
    findings: list[Finding] = []
    diverged = _diverged(curves, t)
    if diverged:
        return Diagnosis((diverged,), curves.status, _notes(curves, "diverged"))
    if len(curves.train_steps) < t.min_train_logs:
        return Diagnosis((_insufficient(curves, t, "train logs", len(curves.train_steps),
                                        t.min_train_logs),), curves.status,
                         _notes(curves, "diverged"))
    smooth = exponential_smoothing(curves.train_loss, t.ema_weight)
    # The loss fell and then blew up, or rose and never fell below where it started: the rate
    # is too high, and "too slow" or "underfitting" (raise it, train longer) would mislead.
    wrecked = _relapsed(curves, smooth, t) or _stalled_after_rise(curves, smooth, t)
    if wrecked:
        return Diagnosis((wrecked,), curves.status, _notes(curves, "diverged"))
    for check in (_unstable(curves, t), _too_slow(curves, smooth, t)):
        if check:
            findings.append(check)
    if len(curves.eval_steps) < t.min_evals:
        findings.append(_insufficient(curves, t, "evals", len(curves.eval_steps), t.min_evals))
        return Diagnosis(tuple(findings), curves.status, _notes(curves, "too_slow"))
    overfitting = _overfitting(curves, t)
    # A train top-1 below the line is underfitting unless its gap to eval is overfitting's: a
    # steady moderate gap (train 85%, eval 78%) fell between the two and read as converged.
    for check in (overfitting, None if overfitting else _underfitting(curves, smooth, t)):
        if check:
            findings.append(check)
    findings.append(_tail(curves, smooth, metric, t))  # still_improving or converged
    if any(f.verdict not in ("still_improving", "converged") for f in findings):
        findings = [f for f in findings if f.verdict != "converged"]  # not converged: a problem
    findings.sort(key=lambda f: VERDICTS.index(f.verdict))
    return Diagnosis(tuple(findings), curves.status, _notes(curves, "overfitting"))


def _notes(curves: Curves, reached: str) -> tuple[str, ...]:
    """What the diagnosis, up to the verdict `reached` (diverged, too_slow, overfitting), could
    not check as it would on the engine's logs: train logs without the top-1 (of a classifier:
    the evals hold top1) or the learning rate that the engine writes in every one. Such logs
    are no engine's, but the rest of the diagnosis still holds; saying what was skipped keeps
    a reader from taking e.g. 'converged' for 'not overfitting'."""
    notes = []
    if curves.train_top1 is None and "top1" in curves.eval_metrics:
        skipped = ([] if curves.initial_loss is not None else
                   ["a loss explosion was judged against the first logged loss only, not "
                    "ln(num_classes)"])
        if reached == "overfitting":
            skipped.append("overfitting's train-eval top-1 gap and underfitting were not "
                           "checked")
        if skipped:
            notes.append("no train log holds top1 while the evals do (the training engine logs "
                         f"a classifier's top-1 in both): {', and '.join(skipped)}.")
    if curves.train_lr is None and reached in ("too_slow", "overfitting"):
        notes.append("no train log holds learning_rate (the training engine logs it in every "
                     "one): too_slow's plateau test assumed a constant rate, so a loss that "
                     "flattens as the schedule decays the rate reads as a plateau, not as too "
                     "slow.")
    return tuple(notes)


def _nonfinite_eval_loss(curves: Curves) -> tuple[int, str, float] | None:
    """(step, name, value) of the first NaN/inf eval loss (`loss`, `ema_loss`), if any."""
    found = [(int(curves.eval_steps[i]), name, float(values[i]))
             for name, values in curves.eval_metrics.items() if config_lib.lower_is_better(name)
             for i in np.flatnonzero(~np.isfinite(values))[:1]]
    return min(found) if found else None


def _divergence_advice(curves: Curves) -> tuple[Recommendation, ...]:
    """What a diverged run should change: a smaller rate, a warmup and gradient clipping."""
    return (Recommendation(LR_FIELD, "multiply", 0.3,
                           "the step size blew the loss up"),
            Recommendation(WARMUP_FIELD, "set", _warmup(curves),
                           "ramp the rate up over 5% of the run (schedule warmup_cosine)"),
            Recommendation(CLIP_FIELD, "set", 1.0, "cap the update size"))


def _relapsed(curves: Curves, smooth: np.ndarray, t: Thresholds) -> Finding | None:
    """`diverged` for a finite collapse after learning: the smoothed train loss ends above
    `relapse_factor` x its minimum (below `explosion_factor` x the first loss, which
    `_diverged` already catches)."""
    i_min = int(np.argmin(smooth))
    low, last, first = smooth[i_min], smooth[-1], smooth[0]
    if not (last > t.relapse_factor * low and last - low > t.spike_min_rise * first):
        return None
    i_up = i_min + int(np.argmax(smooth[i_min:] > t.relapse_factor * low))
    step, min_step = int(curves.train_steps[i_up]), int(curves.train_steps[i_min])
    return Finding(
        "diverged",
        f"diverged at step {step}: the smoothed train loss rose from its minimum {low:.4g} "
        f"(step {min_step}) to {last:.4g} at the end (> {t.relapse_factor:g} x the minimum): "
        "it blew up after learning.",
        {"step": step, "min_loss": float(low), "min_loss_step": min_step,
         "final_loss": float(last)},
        _divergence_advice(curves),
    )


def _stalled_after_rise(curves: Curves, smooth: np.ndarray, t: Thresholds) -> Finding | None:
    """`diverged` for a run the rate stopped from learning at all: the smoothed train loss rose
    above its first log (by more than the `spike_min_rise` jitter floor and `jump_noise_factor`
    x the logs' noise) and ended no lower (within `min_loss_delta`) than its start, the lower
    of that log and a classifier's chance level ln(C); or the first log is already that far
    above ln(C) (the jump came within it) and the loss settled at ln(C) with a flat tail
    (within `min_loss_delta`): a network predicting the class prior whatever the input (e.g.
    dead ReLUs). A rate too low leaves the loss near its start too (`too_slow`), but never
    lifts it first."""
    first, last, chance = smooth[0], smooth[-1], curves.initial_loss
    start = first if chance is None else min(first, chance)
    # Both jumps must beat the noise too: a low (or high) first log of a flat noisy run is no jump.
    noise = _jump_floor(curves, t)
    above = smooth - first > max(t.spike_min_rise * first, noise)
    rose = first > 0 and bool(above.any()) and last >= (1 - t.min_loss_delta) * start
    settled = (chance is not None and first - chance > max(t.spike_min_rise * chance, noise)
               and abs(last - chance) <= t.min_loss_delta * chance
               and _train_tail_drop(curves, smooth, t) <= t.min_loss_delta)
    if not (rose or settled):
        return None
    i_up = int(np.argmax(above)) if rose else 0
    level = "" if chance is None else f" (chance level ln(C) {chance:.4g})"
    how = (f"the smoothed train loss rose from its first log {first:.4g} to {np.max(smooth):.4g} "
           f"and ended at {last:.4g}, no lower than its start{level}" if rose else
           f"the first logged train loss {first:.4g} is already {100 * (first / chance - 1):.0f}% "
           f"above chance level ln(C) {chance:.4g} (the jump came within that log) and the "
           f"smoothed loss settled at chance ({last:.4g})")
    eval_top1 = curves.eval_metrics.get("top1")
    accuracy = (f"; eval top-1 {100 * eval_top1[-1]:.1f}%" if eval_top1 is not None
                and len(eval_top1) else "")
    return Finding(
        "diverged",
        f"diverged at step {curves.train_steps[i_up]}: {how}{accuracy}: the rate is too high "
        "and stopped the network learning (not too low).",
        {"step": int(curves.train_steps[i_up]), "first_loss": float(first),
         "max_loss": float(np.max(smooth)), "final_loss": float(last),
         "chance_loss": _num(chance)},
        _divergence_advice(curves),
    )


# `jump_noise_factor` was calibrated on runs of 40 logs (39 log-to-log changes).
_CALIBRATION_CHANGES = 39


def _jump_floor(curves: Curves, t: Thresholds) -> float:
    """The smallest change of the smoothed train loss a verdict takes for a jump, not noise:
    `jump_noise_factor` x the logs' noise (`_log_noise`), widened by sqrt(39 / changes) below 40
    logs, as the estimate's spread grows like 1 / sqrt(changes): from 10 logs it comes out under
    40% of the true noise in 1 run in 17 (1 in 140 from 20 logs, never in 20,000 from 40)."""
    changes = max(len(curves.train_loss) - 1, 1)
    widening = max(1.0, math.sqrt(_CALIBRATION_CHANGES / changes))
    return t.jump_noise_factor * _log_noise(curves.train_loss) * widening


def _log_noise(loss: np.ndarray) -> float:
    """Robust standard deviation of the logged losses' noise about their trend: the median
    absolute deviation of log-to-log changes (x 1.4826, a Gaussian's sd; / sqrt 2, as each
    change holds two logs' noise), which a jump or two and a steady trend leave alone."""
    changes = np.diff(loss)
    if not len(changes):
        return 0.0
    return float(1.4826 * np.median(np.abs(changes - np.median(changes))) / math.sqrt(2))


def _diverged(curves: Curves, t: Thresholds) -> Finding | None:
    loss = curves.train_loss
    bad = np.flatnonzero(~np.isfinite(loss))
    first = loss[0] if len(loss) and math.isfinite(loss[0]) else None
    # A classifier's reference is at most its initial loss ln(C): a first log already blown up
    # (no warmup, a far too large lr) would otherwise hide the explosion it belongs to.
    reference, what = first, "the first logged loss"
    if first is not None and curves.initial_loss is not None and curves.initial_loss < first:
        reference, what = curves.initial_loss, "ln(num_classes), a classifier's initial loss,"
    exploded = (np.flatnonzero(loss > t.explosion_factor * reference) if first is not None
                else np.array([], dtype=np.int64))
    # A NaN/inf eval loss stops the engine's run as diverged too (loop.log_eval).
    eval_bad = _nonfinite_eval_loss(curves)
    if curves.status == "diverged":
        step, why = curves.diverged_step, "the engine stopped the run: NaN/inf or max_loss"
    elif len(bad) and (eval_bad is None or curves.train_steps[bad[0]] <= eval_bad[0]):
        step, why = int(curves.train_steps[bad[0]]), f"a non-finite train loss ({loss[bad[0]]})"
    elif eval_bad is not None:
        step, name, value = eval_bad
        why = f"a non-finite eval {name.replace('_', ' ')} ({value})"
    elif len(exploded):
        i = int(exploded[0])
        step = int(curves.train_steps[i])
        why = (f"train loss {loss[i]:.4g} > {t.explosion_factor:g} x {what} "
               f"{reference:.4g}")
    else:
        return None
    return Finding(
        "diverged", f"diverged at step {step}: {why}.",
        {"step": step, "first_loss": _num(first),
         "max_finite_loss": _num(np.max(loss[np.isfinite(loss)]) if np.isfinite(loss).any()
                                 else None)},
        _divergence_advice(curves),
    )


def _unstable(curves: Curves, t: Thresholds) -> Finding | None:
    loss, first = curves.train_loss, curves.train_loss[0]
    median = trailing_median(loss, t.spike_window)
    with np.errstate(invalid="ignore"):
        spikes = np.flatnonzero((loss > t.spike_factor * median)
                                & (loss - median > t.spike_min_rise * first))
    # Consecutive elevated logs are one event (one bad stretch spanning two log windows).
    starts = spikes[np.diff(spikes, prepend=-2) > 1]
    if len(starts) < t.min_spikes:
        return None
    worst = spikes[np.argmax(loss[spikes] / median[spikes])]
    return Finding(
        "unstable",
        f"{len(starts)} train-loss spikes (> {t.spike_factor:g} x the median of the "
        f"{t.spike_window} logs before), worst at step {curves.train_steps[worst]}: "
        f"{loss[worst]:.4g} vs {median[worst]:.4g}.",
        {"num_spikes": len(starts), "spike_steps": curves.train_steps[starts].tolist(),
         "worst_step": int(curves.train_steps[worst]), "worst_loss": float(loss[worst]),
         "median_before": float(median[worst])},
        (Recommendation(LR_FIELD, "multiply", 0.5, "smaller steps"),
         Recommendation(CLIP_FIELD, "set", 1.0, "cap rare huge updates"),
         Recommendation(WARMUP_FIELD, "set", _warmup(curves),
                        "a warmup over 5% of the run calms the early steps")),
    )


def _too_slow(curves: Curves, smooth: np.ndarray, t: Thresholds) -> Finding | None:
    first, last = smooth[0], smooth[-1]
    drop = (first - last) / first if first > 0 else 0.0
    if drop >= t.slow_min_drop or _plateaued(curves, smooth, t):
        return None
    moved = f"fell only {100 * drop:.1f}%" if drop >= 0 else f"did not fall (+{-100 * drop:.1f}%)"
    return Finding(
        "too_slow",
        f"smoothed train loss {moved} ({first:.4g} -> {last:.4g}) over "
        f"{curves.train_steps[-1]} steps (< {100 * t.slow_min_drop:.0f}%).",
        {"first_loss": float(first), "last_loss": float(last), "relative_drop": float(drop)},
        (Recommendation(LR_FIELD, "multiply", 3.0,
                        "the loss barely moves: the rate is too low"),
         Recommendation(STEPS_FIELD, "multiply", 2.0, "if a larger rate does worse")),
    )


def _plateaued(curves: Curves, smooth: np.ndarray, t: Thresholds) -> bool:
    """Whether the smoothed train loss fell (by more than the `spike_min_rise` jitter floor
    and `jump_noise_factor` x the logs' noise: a high first log is no fall) over the first half
    of the lr budget and then slowed to under `plateau_ratio` of that rate per unit of lr: a
    plateau, not a rate that is too low; never while it still falls by more than
    `tail_loss_drop` over the run's last `tail_fraction`. Without logged rates, a constant rate
    is assumed (the budget is the steps)."""
    steps = curves.train_steps.astype(np.float64)
    lr = curves.train_lr if curves.train_lr is not None else np.ones_like(steps)
    if not np.isfinite(lr).all():
        return False
    budget = np.concatenate([[0.0], np.cumsum(np.diff(steps) * (lr[1:] + lr[:-1]) / 2)])
    half = int(np.searchsorted(budget, budget[-1] / 2))
    if budget[-1] <= 0 or not 0 < half < len(smooth) - 1:
        return False
    early, late = smooth[0] - smooth[half], smooth[half] - smooth[-1]
    if early <= max(t.spike_min_rise * smooth[0], _jump_floor(curves, t)):
        return False  # it never really fell: not a plateau
    # Still falling by more than `tail_loss_drop` over the last quarter (a rate annealing to 0
    # after a high-lr phase at the noise floor, which per unit of lr looks flat): no plateau.
    if _train_tail_drop(curves, smooth, t) > t.tail_loss_drop:
        return False
    rate_early = early / budget[half]
    rate_late = late / (budget[-1] - budget[half])
    return bool(rate_late < t.plateau_ratio * rate_early)


def _aligned_train_top1(curves: Curves, t: Thresholds) -> np.ndarray | None:
    """Smoothed train top-1 at each eval step (linear interpolation between train logs)."""
    if curves.train_top1 is None:
        return None
    smooth = exponential_smoothing(curves.train_top1, t.ema_weight)
    return np.interp(curves.eval_steps, curves.train_steps, smooth)


def _overfitting(curves: Curves, t: Thresholds) -> Finding | None:
    evidence: dict[str, Any] = {}
    reasons = []
    eval_loss = curves.eval_metrics.get("loss")
    if eval_loss is not None and np.isfinite(eval_loss).all():
        i_min = int(np.argmin(eval_loss))
        rise = eval_loss[-1] / eval_loss[i_min] - 1 if eval_loss[i_min] > 0 else 0.0
        evidence.update(eval_loss_min=float(eval_loss[i_min]),
                        eval_loss_min_step=int(curves.eval_steps[i_min]),
                        eval_loss_final=float(eval_loss[-1]), eval_loss_rise=float(rise))
        if rise > t.eval_loss_rise and len(eval_loss) - 1 - i_min >= 2:
            reasons.append(f"eval loss rose {100 * rise:.0f}% after its minimum "
                           f"{eval_loss[i_min]:.4g} at step {curves.eval_steps[i_min]}")
    train_top1, eval_top1 = _aligned_train_top1(curves, t), curves.eval_metrics.get("top1")
    if train_top1 is not None and eval_top1 is not None:
        gap = train_top1 - eval_top1
        middle = len(gap) // 2
        growth = gap[-1] - gap[middle]
        # Both gaps carry the eval noise: their difference's is sqrt(2) x one accuracy's.
        needed = max(t.gap_growth, math.sqrt(2) * noise_level(curves, "top1", t, eval_top1[-1]))
        evidence.update(final_gap=float(gap[-1]), mid_gap=float(gap[middle]),
                        gap_growth=float(growth), gap_growth_needed=float(needed))
        if gap[-1] > t.overfit_gap and growth > needed:
            reasons.append(f"train-eval top-1 gap {100 * gap[-1]:.1f} points, up "
                           f"{100 * growth:.1f} since step {curves.eval_steps[middle]}")
        elif gap[-1] > t.large_gap:
            reasons.append(f"train-eval top-1 gap {100 * gap[-1]:.1f} points (train "
                           f"{100 * train_top1[-1]:.1f}%, eval {100 * eval_top1[-1]:.1f}%)")
    if not reasons:
        return None
    # Label smoothing needs class labels: a run without top-1 (detection, segmentation) is
    # not a classifier, and the engine refuses the setting there.
    smoothing = ((Recommendation(LABEL_SMOOTHING, "set", 0.1, "softer targets"),)
                 if eval_top1 is not None else ())
    return Finding(
        "overfitting", "; ".join(reasons) + ".", evidence,
        (Recommendation(WEIGHT_DECAY, "multiply", 3.0, "stronger L2 penalty"),
         *smoothing,
         Recommendation("data.augment", "set", True, "more varied training images"),
         Recommendation(STEPS_FIELD, "multiply", 0.5,
                        "or stop earlier (the best checkpoint is kept)")),
    )


def _final_train_top1(curves: Curves, t: Thresholds) -> float | None:
    """Train top-1 where the run ends: the smoothed value, or the last log where that is higher.
    The smoothing lags a rising curve: on 5 logs it read 87% where the last two logs were 93% and
    96%, which called a run underfitting at 90%. (One batch's log alone is too noisy a figure
    to call a run underfitting by.)"""
    if curves.train_top1 is None:
        return None
    smooth = exponential_smoothing(curves.train_top1, t.ema_weight)
    return float(max(smooth[-1], curves.train_top1[-1]))


#: Below a float32 rounding of a fraction: a logged top-1 this close to a line is on it.
_FLOAT32_SLACK = 1e-6


def _underfitting(curves: Curves, smooth: np.ndarray, t: Thresholds) -> Finding | None:
    """Train top-1 below the line, whatever its gap to eval (the caller asks only when the run
    does not overfit)."""
    final_train, eval_top1 = _final_train_top1(curves, t), curves.eval_metrics.get("top1")
    if final_train is None or eval_top1 is None:
        return None
    gap = final_train - eval_top1[-1]
    # metrics.jsonl holds float32 top-1s: 288/320 reads 0.89999998, which is on the line
    if final_train >= t.underfit_train_top1 - _FLOAT32_SLACK:
        return None
    relation = (f"{100 * -gap:.1f} points below" if gap < 0 else
                f"within {100 * gap:.1f} points of" if gap <= t.overfit_gap else
                f"{100 * gap:.1f} points above")
    steady = ", a gap that does not grow" if gap > t.overfit_gap else ""
    longer = (Recommendation(STEPS_FIELD, "multiply", 2.0, "more training"),
              Recommendation(LR_FIELD, "multiply", 2.0,
                             "if the loss flattened only because the schedule decayed the rate"))
    capacity = (Recommendation(WEIGHT_DECAY, "multiply", 0.3, "less regularization"),
                Recommendation("model", "set", "a larger model", "more capacity"))
    # A loss that flattened while the rate was still high is held by regularization or
    # capacity: more steps come last (the recipe then lowers the weight decay first).
    plateaued = _plateaued(curves, smooth, t)
    return Finding(
        "underfitting",
        f"train top-1 {100 * final_train:.2f}% (< {100 * t.underfit_train_top1:.0f}%) and "
        f"{relation} eval top-1 {100 * eval_top1[-1]:.1f}%{steady}"
        + ("; the train loss plateaued (per unit of lr)." if plateaued else "."),
        {"train_top1": final_train, "eval_top1": float(eval_top1[-1]),
         "gap": float(gap), "train_loss_plateaued": plateaued},
        capacity + longer if plateaued else longer + capacity,
    )


def noise_level(curves: Curves, metric: str, t: Thresholds, value: float) -> float:
    """The smallest change of eval `metric` (near `value`) that is not noise."""
    if metric.removeprefix(METRIC_PREFIX) in FRACTION_METRICS:
        n = curves.eval_examples
        se = math.sqrt(max(value * (1 - value), 0.0) / n) if n else 0.0
        return max(t.noise_std_errors * se, t.min_accuracy_delta)
    return t.min_loss_delta * abs(value)


def _tail_start(curves: Curves, t: Thresholds) -> float:
    """The step where the last `tail_fraction` of the run begins. The tail of what ran: a run
    stopped early (interrupted, incomplete) is judged on its own last quarter, not on the
    quarter of its plan that it never reached."""
    end = int(max(curves.eval_steps[-1] if len(curves.eval_steps) else 0,
                  curves.train_steps[-1] if len(curves.train_steps) else 0))
    if curves.status == "completed" and curves.num_train_steps:
        end = int(curves.num_train_steps)
    return end - t.tail_fraction * end


def _train_tail_drop(curves: Curves, smooth: np.ndarray, t: Thresholds) -> float:
    """How much the smoothed train loss fell over the last `tail_fraction` of the run, as a
    fraction of its value where that tail begins."""
    train_start = float(np.interp(_tail_start(curves, t), curves.train_steps, smooth))
    return (train_start - smooth[-1]) / train_start if train_start > 0 else 0.0


def _tail(curves: Curves, smooth: np.ndarray, metric: str, t: Thresholds) -> Finding:
    """still_improving or converged, from the eval metric over the last `tail_fraction`."""
    steps, values = curves.eval_steps, curves.eval_metrics[metric]
    sign = -1.0 if config_lib.lower_is_better(metric) else 1.0
    start = _tail_start(curves, t)
    before = values[steps <= start]
    if len(before) == 0:  # the tail covers every eval: compare with the first one
        before = values[:1]
    best_before = float(np.max(sign * before) * sign)
    best_tail = float(np.max(sign * values[steps > start]) * sign) if (steps > start).any() \
        else float(values[-1])
    gain = sign * (best_tail - best_before)
    noise = noise_level(curves, metric, t, best_before)
    train_drop = _train_tail_drop(curves, smooth, t)
    evidence = {"metric": metric, "tail_start_step": int(round(start)),
                "best_before_tail": best_before, "best_in_tail": best_tail, "gain": gain,
                "noise_level": noise, "train_loss_tail_drop": float(train_drop),
                "final": float(values[-1])}
    reasons = []
    if gain > noise:
        reasons.append(f"eval {metric} improved {gain:.4g} (> noise {noise:.3g}) "
                       f"({best_before:.4g} -> {best_tail:.4g})")
    # The judged weights' loss: the weight average's (ema_loss) for an ema_ metric
    prefix = METRIC_PREFIX if metric.startswith(METRIC_PREFIX) else ""
    loss = curves.eval_metrics.get(prefix + "loss")
    before_and_tail = (steps > start).any() and (steps <= start).any()
    if not config_lib.lower_is_better(metric) and loss is not None and before_and_tail:
        before_loss, tail_loss = np.min(loss[steps <= start]), np.min(loss[steps > start])
        drop = (before_loss - tail_loss) / before_loss if before_loss > 0 else 0.0
        evidence["eval_loss_tail_drop"] = float(drop)
        if drop > t.tail_loss_drop:
            reasons.append(f"eval loss fell {100 * drop:.0f}% ({before_loss:.4g} -> "
                           f"{tail_loss:.4g})")
    if reasons:
        return Finding(
            "still_improving",
            " and ".join(reasons) + f" in the last {100 * t.tail_fraction:.0f}% of the run.",
            evidence,
            (Recommendation(STEPS_FIELD, "multiply", 2.0, "it has not plateaued"),),
        )
    return Finding(
        "converged",
        f"eval {metric} changed {gain:+.4g} (within noise {noise:.3g}) in the last "
        f"{100 * t.tail_fraction:.0f}% of the run; final {values[-1]:.4g}.",
        evidence,
    )


def _insufficient(curves: Curves, t: Thresholds, what: str, have: int, need: int) -> Finding:
    return Finding(
        "insufficient_data",
        f"{have} {what} logged; at least {need} are needed to read a trend.",
        {"have": have, "need": need, "what": what},
        (Recommendation("log_every_steps" if what == "train logs" else "eval_every_steps",
                        "multiply", 0.25, "log/evaluate more often"),),
    )


# -------------------------------------------------------------------------------- helpers
def _warmup(curves: Curves) -> int:
    """5% of the run's steps (the planned ones if known), at least 1."""
    total = curves.num_train_steps or (int(curves.train_steps[-1]) if len(curves.train_steps)
                                       else 0)
    return max(1, round(WARMUP_FRACTION * total))


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def main(argv: Sequence[str]) -> None:  # pragma: no cover - thin CLI
    """Prints the diagnosis of `--workdir`; bad input ends it with one `error:` line, exit 1."""
    from absl import flags

    from cnnjax.utils.cli import one_line_errors, start_command

    start_command(list(argv))
    with one_line_errors():
        diagnosis = diagnose_workdir(flags.FLAGS.workdir, flags.FLAGS.metric)
    print(diagnosis.format())


if __name__ == "__main__":  # pragma: no cover
    from absl import app, flags

    from cnnjax.utils.cli import parse_flags

    flags.DEFINE_string("workdir", None, "A run's --workdir (metrics.jsonl, summary.json).")
    flags.DEFINE_string("metric", None, "Eval metric judged for improvement (default: the "
                        "run's config.best_metric, e.g. top1, map50 or miou).")
    flags.mark_flag_as_required("workdir")
    app.run(main, flags_parser=parse_flags)

"""A run's metrics.jsonl read into checked records and `Curves` (with its summary.json and
config.json): what the diagnosis (`cnnjax.tune.diagnose`), the sweep's ranking and the tune's
report read, refused where the training engine would never have written it.

A NaN/inf accuracy, mAP, mIoU or eval-set size (which the engine never writes: it stops a run at
its first NaN/inf loss) is refused with a ValueError naming the metrics.jsonl line and field
(`load_curves`, `read_checked_metrics`) or the metric and step (`check_curves`, for curves built
from records): unlike a loss it is no sign of divergence, only of a broken file, and as a number
it would read as a change of "+nan" (converged). So is an accuracy, mAP or IoU outside [0, 1] (a
percent, 97.0 for 97%: the engine writes fractions), and an eval record lacking a field the
engine writes in every eval (`EVERY_EVAL_FIELDS`: loss, top1, num_examples and their `ema_`
twins) that the run's other eval records hold: as NaN, a missing eval loss would read as a
divergence. So is a train log lacking its top-1 or learning rate (`EVERY_TRAIN_FIELDS`) that
other train logs hold: either would silently turn off the train-eval gap or the plateau test for
the whole run; so is any train log lacking its loss (`ALWAYS_TRAIN_FIELDS`: it was left out of
the curves unsaid). A loss that is no number (a string, null), a learning rate that is no finite
number >= 0, an eval-set size of 0 or less, a record without an integer step and a step logged
twice in one split (the engine logs each once: a resumed run first drops the records past its
checkpoint) are refused the same way. So is a judged metric that some evals lack, naming the
metrics.jsonl and the line of the first eval without it when the curves were read from one
(`Curves.source`). The errors are the diagnosis's (`diagnose: ...`) unless a caller names
itself (`read_checked_metrics(path, owner)`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cnnjax.train import config as config_lib
from cnnjax.train.ema import METRIC_PREFIX
from cnnjax.train.logging import METRICS_FILE, read_metrics
from cnnjax.train.loop import CONFIG_FILE, SUMMARY_FILE
from cnnjax.utils.files import DIRECTORY_MARKERS, read_json
from cnnjax.utils.validation import invalid, is_integer

ACCURACY_METRICS = ("top1", "top5")
# Eval metrics in [0, 1] (higher: better); the verdicts judge their gains against a binomial
# noise level.
FRACTION_METRICS = (*ACCURACY_METRICS, *config_lib.DETECTION_METRICS, "pixel_accuracy", "miou")
# Per-class scores (`ap50/<class>`, `ap50_voc07/<class>`, `iou/<class>`), fractions in [0, 1] too.
PER_CLASS_FRACTIONS = ("ap50", "ap50_voc07", "iou")
# Eval fields the engine has written in every eval record since it began (the `ema_` ones in
# every eval of a weight-averaged run) and that the verdicts read whatever the judged metric.
# One that some eval records of a run hold and another lacks reads as NaN there: a loss as a
# divergence. Others may be absent from some: per-class scores (a class only predicted in some
# evals), metrics added later (`map50_voc07`) in the records of runs resumed across that change.
EVERY_EVAL_FIELDS = ("loss", "top1", "num_examples", METRIC_PREFIX + "loss",
                     METRIC_PREFIX + "top1")
# Train-log fields the engine has written in every train log since it began (top-1 in every
# one of a classifier's, none of a detector's or segmenter's) and that the verdicts read:
# top-1 for the train-eval gap, the learning rate for the plateau test (`diagnose._plateaued`).
EVERY_TRAIN_FIELDS = ("top1", "learning_rate")
# The train-log field of every run, whatever its task, so required even where no other train log
# holds it: the loss every verdict reads (a log without one was left out of the curves unsaid,
# a file of such logs read as '0 train logs: log more often').
ALWAYS_TRAIN_FIELDS = ("loss",)
# The checks are the diagnosis's: their errors name it unless a caller passes its own owner.
_OWNER = "diagnose"


@dataclasses.dataclass(frozen=True)
class Curves:
    """A run's logged curves as arrays (train logs and evals, each sorted by step)."""

    train_steps: np.ndarray
    train_loss: np.ndarray
    train_top1: np.ndarray | None
    eval_steps: np.ndarray
    eval_metrics: dict[str, np.ndarray]
    eval_examples: float | None = None  # eval-set size, for the accuracy noise level
    status: str = "completed"
    diverged_step: int | None = None
    num_train_steps: int | None = None
    train_lr: np.ndarray | None = None  # the logged learning rate at each train log
    # ln(num_classes), a classifier's loss at initialization (None: unknown or not one): the
    # first logged loss, a mean over the first log's steps, may already have blown up.
    initial_loss: float | None = None
    # The metrics.jsonl the curves were read from (`load_curves`), named in `diagnose`'s errors.
    source: str | None = None

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]], summary: Mapping | None = None,
                     num_train_steps: int | None = None) -> Curves:
        """From metrics.jsonl records (`{'step', 'split', 'loss', 'top1', ...}`) and summary."""
        _check_records(records, lambda index: f"records[{index}]")
        return cls._from_checked_records(records, summary, num_train_steps)

    @classmethod
    def _from_checked_records(cls, records: Sequence[Mapping[str, Any]],
                              summary: Mapping | None, num_train_steps: int | None,
                              source: str | None = None) -> Curves:
        """`from_records` for records `_check_records` accepted (`load_curves` checks them
        itself, naming the file's lines)."""
        summary = summary or {}
        train = sorted((r for r in records if r.get("split") == "train"), key=lambda r: r["step"])
        evals = sorted((r for r in records if r.get("split") == "eval"), key=lambda r: r["step"])
        eval_names = sorted({k for r in evals for k in r} - {"step", "split", "num_examples"})
        status = summary.get("status", "incomplete")
        return cls(
            train_steps=np.array([r["step"] for r in train], dtype=np.int64),
            train_loss=np.array([_float(r["loss"]) for r in train], dtype=np.float64),
            train_top1=(np.array([_float(r["top1"]) for r in train], dtype=np.float64)
                        if train and all("top1" in r for r in train) else None),
            eval_steps=np.array([r["step"] for r in evals], dtype=np.int64),
            eval_metrics={n: np.array([_float(r.get(n)) for r in evals], dtype=np.float64)
                          for n in eval_names},
            eval_examples=(float(evals[-1]["num_examples"])
                           if evals and "num_examples" in evals[-1] else None),
            status=status,
            diverged_step=(int(summary["step"]) if status == "diverged" and "step" in summary
                           else None),
            num_train_steps=num_train_steps,
            train_lr=(np.array([_float(r["learning_rate"]) for r in train], dtype=np.float64)
                      if train and all("learning_rate" in r for r in train) else None),
            initial_loss=_initial_loss(train, summary),
            source=source,
        )


def load_curves(workdir: str) -> Curves:
    """The curves of the run in `workdir` (metrics.jsonl, summary.json, config.json); a run
    that failed before its first train log is refused with its error (nothing to diagnose)."""
    if not isinstance(workdir, str | os.PathLike) or not os.path.isdir(workdir):
        raise invalid(_OWNER, "workdir", workdir, "expected the work directory of a run")
    if not any(os.path.exists(os.path.join(workdir, name))
               for name in (METRICS_FILE, SUMMARY_FILE, CONFIG_FILE)):
        # An empty folder or another command's (a sweep's) would read as a run with no logs.
        held = [f"a {kind} ({marker})" for kind, marker in DIRECTORY_MARKERS.items()
                if os.path.exists(os.path.join(workdir, marker))]
        what = held[0] if held else f"no {METRICS_FILE}, {SUMMARY_FILE} or {CONFIG_FILE}"
        raise invalid(_OWNER, "workdir", workdir,
                      f"it holds {what}, not a training run; expected the --workdir of one run "
                      "(a sweep's runs are its trials/<trial_id> folders, a tune's "
                      "round_<k>/trials/<trial_id>)")
    path = os.path.join(workdir, METRICS_FILE)
    records = read_checked_metrics(path)
    summary = read_json(os.path.join(workdir, SUMMARY_FILE))
    config = read_json(os.path.join(workdir, CONFIG_FILE)) or {}
    curves = Curves._from_checked_records(records, summary, config.get("num_train_steps"), path)
    if curves.status == "failed" and not len(curves.train_steps):
        # "log more often" (insufficient_data) would hide the error that stopped it.
        error = ": ".join(str(summary[k]) for k in ("error", "message") if summary.get(k))
        raise invalid(_OWNER, "workdir", workdir,
                      f"its run failed before its first train log, so there are no curves; fix "
                      f"the error its {SUMMARY_FILE} holds and rerun it: "
                      f"{error.rstrip('.') or 'no message'}")
    return curves


def read_checked_metrics(path: str, owner: str = _OWNER) -> list[dict]:
    """The records of the metrics.jsonl at `path` (`read_metrics`: none while it does not exist,
    a torn last line of a running or killed run skipped), each one the engine writes: others are
    refused naming the line and field (`_check_scores`), under `owner`'s name. The sweep's
    ranking and the tune's figure read it too, so a repeated or percent eval is not counted."""
    records = read_metrics(path)
    _check_scores(path, records, owner)
    return records


def _scores(record: Mapping[str, Any]) -> list[str]:
    """The fields of a metrics.jsonl record that the diagnosis reads as scores (not a loss,
    whose NaN/inf is a divergence): train top-1; every eval metric and the eval-set size."""
    if record.get("split") == "train":
        return ["top1"] if "top1" in record else []
    if record.get("split") == "eval":
        return [k for k in record if k not in ("step", "split")
                and not config_lib.lower_is_better(k)]
    return []


def _check_scores(path: str, records: Sequence[Mapping[str, Any]], owner: str = _OWNER
                  ) -> None:
    """Refuses a record of `records` (read from `path`) that the engine never writes, naming its
    line (counted in the file, whose torn lines `read_metrics` skipped) and field: not an object
    with an integer step, one `_check_records` refuses, a loss that is no number, a NaN/inf (or
    non-numeric) score, a fraction outside [0, 1] (a percent: 97.0 for 97%), an eval-set size
    of 0 or less or a learning rate that is no finite number >= 0."""
    for index, record in enumerate(records):  # the checks below index records by field
        if not isinstance(record, Mapping) or (record.get("split") in ("train", "eval")
                                               and not is_integer(record.get("step"))):
            raise invalid(owner, "record", record,
                          f"{path} line {_line_number(path, index)} holds it, expected an object "
                          "with an integer 'step' and its 'split' (train or eval) as the "
                          "training engine writes, so the file was edited or written by another "
                          "program")
    _check_records(records, lambda index: f"{path} line {_line_number(path, index)}", owner)
    for index, record in enumerate(records):
        problem = _value_problem(record)
        if problem is not None:
            field, expected = problem
            raise invalid(owner, field, record[field],
                          f"{path} line {_line_number(path, index)} ({record['split']} record of "
                          f"step {record['step']}) holds it, expected {expected}, so the file was "
                          "edited or written by another program")


def _value_problem(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """(field, what was expected) of the first value of `record` the engine never writes."""
    losses = ([k for k in record if config_lib.lower_is_better(k)]
              if record.get("split") == "eval" else ["loss"] if "loss" in record else [])
    for field in losses:  # NaN/inf is a divergence, a string or null no loss at all
        if isinstance(record[field], bool) or not isinstance(record[field], int | float):
            return field, ("a number (NaN/inf if the run diverged): the training engine writes "
                           "every loss as one")
    if _split_read(record) == "train" and "learning_rate" in record:  # read by the plateau test
        rate = record["learning_rate"]
        if (isinstance(rate, bool) or not isinstance(rate, int | float)
                or not math.isfinite(rate) or rate < 0):
            return "learning_rate", ("a finite number >= 0: the training engine logs the "
                                     "schedule's rate")
    for field in _scores(record):
        value = _float(record[field])
        if not math.isfinite(value):
            return field, ("a finite number: the training engine never writes a NaN or inf "
                           "score")
        if is_fraction(field) and not 0 <= value <= 1:
            return field, ("a fraction in [0, 1]: the training engine writes accuracies, mAP and "
                           "IoU as fractions (0.97, not 97 for 97%)")
        if field == "num_examples" and value <= 0:
            return field, ("a count > 0: the training engine stops a run whose eval split "
                           "yields no examples")
    return None


def is_fraction(field: str) -> bool:
    """Whether metrics.jsonl `field` is a score in [0, 1]: an accuracy, mAP or IoU (mean or
    per class, of the weights or their `ema_` average)."""
    name = field.removeprefix(METRIC_PREFIX)
    return name in FRACTION_METRICS or ("/" in name and name.split("/")[0] in PER_CLASS_FRACTIONS)


def _check_records(records: Sequence[Mapping[str, Any]], where: Callable[[int], str],
                   owner: str = _OWNER) -> None:
    """Refuses the first record of `records` that the engine would have written differently
    (`_missing_field`, `_repeated_step`), placed by `where(index)` (a file's line or a list
    index), under `owner`'s name."""
    missing = _missing_field(records)
    if missing is not None:
        index, field = missing
        raise invalid(owner, field, "missing", f"{where(index)} {_lacks(records, index, field)}")
    repeated = _repeated_step(records)
    if repeated is not None:
        index, first = repeated
        split, step = records[index]["split"], records[index]["step"]
        raise invalid(owner, "step", step,
                      f"{where(index)} ({split} record) repeats the {split} record of step "
                      f"{step} at {where(first)}; expected one {split} record per step: the "
                      "training engine writes each once (a resumed run drops the records past "
                      "its checkpoint first), so the file was edited, concatenated or written by "
                      "another program")


def _repeated_step(records: Sequence[Mapping[str, Any]]) -> tuple[int, int] | None:
    """(index, index of the first) of the first train log or eval record whose step an earlier
    record of its split already logged. The engine logs each step once: a resumed run drops the
    records past its checkpoint (`MetricLogger`) and goes on from the step after it, so a
    repeat is no re-evaluation but a broken file, and "last record wins" would hide it."""
    seen: dict[tuple[str, int], int] = {}
    for index, record in enumerate(records):
        split = _split_read(record)
        if split is not None:
            first = seen.setdefault((split, record["step"]), index)
            if first != index:
                return index, first
    return None


def _split_read(record: Mapping[str, Any]) -> str | None:
    """The split as which the diagnosis reads `record`: train, eval or none (another split)."""
    return record.get("split") if record.get("split") in ("train", "eval") else None


def _missing_field(records: Sequence[Mapping[str, Any]]) -> tuple[int, str] | None:
    """(index, field) of the first train log or eval record lacking a field of
    `ALWAYS_TRAIN_FIELDS`, or of `EVERY_TRAIN_FIELDS` or `EVERY_EVAL_FIELDS` that another record
    of its split holds."""
    found = []
    for split, always, fields in (("train", ALWAYS_TRAIN_FIELDS, EVERY_TRAIN_FIELDS),
                                  ("eval", (), EVERY_EVAL_FIELDS)):
        read = [(i, r) for i, r in enumerate(records) if _split_read(r) == split]
        held = [*always, *(name for name in fields if any(name in r for _, r in read))]
        found.append(next(((i, name) for i, r in read for name in held if name not in r), None))
    return min((f for f in found if f is not None), default=None)


def _lacks(records: Sequence[Mapping[str, Any]], index: int, field: str) -> str:
    """Why `records[index]`, missing `field` (`_missing_field`), is refused (after where it
    is)."""
    split = records[index]["split"]
    held = any(field in r for r in records if _split_read(r) == split)
    others = f", which the run's other {split} records hold" if held else ""
    return (f"({split} record of step {records[index].get('step')}) lacks it{others}; expected "
            f"a number: the training engine writes it in every "
            f"{'eval' if split == 'eval' else 'train log'}, so the file was edited or written "
            "by another program")


def _line_number(path: str, index: int) -> int:
    """The 1-based line of `path` holding the `index`-th record `read_metrics` returned."""
    parsed = 0
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                json.loads(line)
            except json.JSONDecodeError:  # read_metrics skips it
                continue
            if parsed == index:
                return number
            parsed += 1
    raise AssertionError(f"{path} holds fewer than {index + 1} records")  # pragma: no cover


def check_curves(curves: Curves, metric: str, judged: Sequence[str]) -> None:
    """Refuses `curves` whose scores the verdicts, judging eval `metric` (one of `judged`),
    would misread: a judged score some evals of the source file lack
    (`_check_judged_in_every_eval`), a NaN/inf or out-of-range score or learning rate
    (`_check_finite_curves`: curves built without `load_curves`)."""
    _check_judged_in_every_eval(curves, metric, judged)
    _check_finite_curves(curves, metric)


def _check_judged_in_every_eval(curves: Curves, metric: str, judged: Sequence[str]) -> None:
    """Refuses a judged score `metric` that some evals of the file the curves were read from
    lack (a NaN there: `load_curves` refused NaN scores), naming the line of the first and the
    `judged` metrics every eval holds; curves from no file are left to `_check_finite_curves`,
    and a run with no eval yet (train logs only, or stopped before its first) to the verdicts."""
    if (curves.source is None or metric not in curves.eval_metrics
            or config_lib.lower_is_better(metric)):
        return
    missing = np.flatnonzero(np.isnan(curves.eval_metrics[metric]))
    if not len(missing):
        return
    step = int(curves.eval_steps[missing[0]])
    every = sorted(name for name, values in curves.eval_metrics.items()
                   if name.removeprefix(METRIC_PREFIX) in judged
                   and (config_lib.lower_is_better(name) or not np.isnan(values).any()))
    raise invalid(_OWNER, "metric", metric,
                  f"{curves.source}{_line_of(curves.source, 'eval', step)} (eval record of step "
                  f"{step}) lacks it, which the run's other eval records hold; expected a metric "
                  f"every eval reports: {every}")


def _line_of(path: str, split: str, step: int) -> str:
    """' line <n>' of `path`'s `split` record of `step` (one: `_repeated_step`), or '' if the
    file no longer holds it."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:  # gone since the curves were read: the error still names the file
        return ""
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (record.get("split"), record.get("step")) == (split,
                                                                                        step):
            return f" line {number}"
    return ""


def _check_finite_curves(curves: Curves, metric: str) -> None:
    """Refuses a NaN/inf among the scores the verdicts read (train and eval top-1, the judged
    `metric` unless it is a loss, the eval-set size), such a fraction outside [0, 1] (a
    percent) and a logged learning rate that is NaN/inf or negative: curves built without
    `load_curves`."""
    for name in dict.fromkeys(("top1", metric)):
        if name in curves.eval_metrics and not config_lib.lower_is_better(name):
            _check_score_curve("eval", name, curves.eval_steps, curves.eval_metrics[name])
    if curves.train_top1 is not None:
        _check_score_curve("train", "top1", curves.train_steps, curves.train_top1)
    if curves.train_lr is not None:  # a NaN turned off the plateau test (`diagnose._plateaued`)
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(~np.isfinite(curves.train_lr) | (curves.train_lr < 0))
        if len(bad):
            raise invalid(_OWNER, f"train learning_rate at step {curves.train_steps[bad[0]]}",
                          float(curves.train_lr[bad[0]]),
                          "expected a finite number >= 0 (the schedule's rate)")
    if curves.eval_examples is not None and not math.isfinite(curves.eval_examples):
        raise invalid(_OWNER, "eval_examples", curves.eval_examples, "expected a finite number")


def _check_score_curve(split: str, name: str, steps: np.ndarray, values: np.ndarray) -> None:
    """Refuses the first NaN/inf of score `name`'s `values`, or one outside [0, 1] of a
    fraction (`is_fraction`), naming its split and step."""
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise invalid(_OWNER, f"{split} {name} at step {steps[bad[0]]}", float(values[bad[0]]),
                      "expected a finite number (a missing or NaN/inf score)")
    bad = np.flatnonzero((values < 0) | (values > 1)) if is_fraction(name) else []
    if len(bad):
        raise invalid(_OWNER, f"{split} {name} at step {steps[bad[0]]}", float(values[bad[0]]),
                      "expected a fraction in [0, 1] (0.97, not 97 for 97%)")


def _initial_loss(train: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
                  ) -> float | None:
    """ln(num_classes) of a classifier (train logs with top-1) whose summary records its class
    count; None for others and for distillation, whose T^2-scaled KL term may start higher."""
    classes = summary.get("num_classes")
    if (not train or not all("top1" in r for r in train) or "distill" in summary
            or isinstance(classes, bool) or not isinstance(classes, int) or classes < 2):
        return None
    return math.log(classes)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan

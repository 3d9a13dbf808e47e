"""Learning-curve diagnosis: each verdict on synthetic curves built to be that case, curves just
either side of a threshold, noise that must not flip a verdict, and real LeNet-5 runs."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cnnjax.train.logging import read_metrics
from cnnjax.tune import diagnose as dg

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 400


def _records(train_loss, train_top1, eval_loss, eval_top1, *, steps=STEPS, log_every=10,
             eval_every=50, eval_examples=1000):
    """metrics.jsonl records of a run whose curves are the given functions of the step."""
    records = []
    for step in range(log_every, steps + 1, log_every):
        records.append({"step": step, "split": "train", "loss": train_loss(step),
                        "top1": train_top1(step), "learning_rate": 0.1})
        if step % eval_every == 0:
            records.append({"step": step, "split": "eval", "loss": eval_loss(step),
                            "top1": eval_top1(step), "top5": 1.0,
                            "num_examples": float(eval_examples)})
    return records


def _curves(*, status="completed", steps=STEPS, **kw):
    summary = {"status": status, "step": steps}
    return dg.Curves.from_records(_records(steps=steps, **kw), summary, steps)


def _decay(start, end, rate):
    """start -> end, exponentially with `rate` per step."""
    return lambda s: end + (start - end) * math.exp(-rate * s)


def _converged(**kw):
    """Loss 2.3 -> 0.05 by step ~150, then flat; train 99%, eval 97%: a finished run."""
    curves = dict(train_loss=_decay(2.3, 0.05, 0.03), train_top1=_decay(0.1, 0.99, 0.03),
                  eval_loss=_decay(2.3, 0.1, 0.03), eval_top1=_decay(0.1, 0.97, 0.03))
    return curves | kw


def test_converged_run():
    d = dg.diagnose(_curves(**_converged()))
    assert d.verdicts == ["converged"]
    evidence = d.findings[0].evidence
    assert evidence["tail_start_step"] == 300
    assert abs(evidence["gain"]) < evidence["noise_level"]
    # 2 binomial standard errors of 97% on 1000 examples.
    p = evidence["best_before_tail"]
    assert p == pytest.approx(0.97, abs=1e-3)
    assert evidence["noise_level"] == pytest.approx(2 * math.sqrt(p * (1 - p) / 1000), rel=1e-9)
    assert d.findings[0].recommendations == ()


def test_still_improving_run_recommends_more_steps():
    linear = lambda low, high: (lambda s: low + (high - low) * s / STEPS)  # noqa: E731
    d = dg.diagnose(_curves(train_loss=_decay(2.3, 0.2, 0.01), train_top1=linear(0.5, 0.95),
                            eval_loss=_decay(2.3, 0.3, 0.01), eval_top1=linear(0.5, 0.92)))
    assert d.primary == "still_improving"
    f = d.finding("still_improving")
    # Best eval top-1 up to step 300 vs best after it: 0.5 + 0.42 * (300 / 400) -> 0.92.
    assert f.evidence["best_before_tail"] == pytest.approx(0.815)
    assert f.evidence["best_in_tail"] == pytest.approx(0.92)
    assert [(r.field, r.change, r.value) for r in f.recommendations] == [
        ("num_train_steps", "multiply", 2.0)]


@pytest.mark.parametrize("status", ["interrupted", "incomplete"])
def test_a_run_stopped_early_is_judged_on_the_steps_it_ran(status):
    """Planned 1,000 steps, stopped at 200 with eval top-1 still rising 0.5 -> 0.92: still
    improving (the tail is steps 150-200), not converged because no eval reached the last
    quarter of the plan; the same curves in a completed 200-step run give the same verdict."""
    linear = lambda low, high: (lambda s: low + (high - low) * s / 200)  # noqa: E731
    kw = dict(train_loss=_decay(2.3, 0.2, 0.02), train_top1=linear(0.5, 0.95),
              eval_loss=_decay(2.3, 0.3, 0.02), eval_top1=linear(0.5, 0.92))
    records = _records(steps=200, **kw)
    stopped = dg.diagnose(dg.Curves.from_records(records, {"status": status}, 1000))
    finished = dg.diagnose(dg.Curves.from_records(records, {"status": "completed"}, 200))
    assert stopped.primary == finished.primary == "still_improving"
    assert stopped.status == status
    assert stopped.finding("still_improving").evidence["tail_start_step"] == 150


def test_engine_stopped_divergence_gives_its_step():
    records = _records(**_converged(), steps=120)
    d = dg.diagnose(dg.Curves.from_records(records, {"status": "diverged", "step": 137}, 400))
    assert d.verdicts == ["diverged"]
    assert d.findings[0].evidence["step"] == 137
    fields = {r.field: r for r in d.findings[0].recommendations}
    assert fields["optimizer.learning_rate"].value == 0.3
    assert fields["schedule.warmup_steps"].value == 20  # 5% of the planned 400 steps
    assert fields["optimizer.grad_clip_norm"].value == 1.0


def test_nan_loss_in_metrics_is_divergence_at_that_step():
    loss = _decay(2.3, 0.05, 0.03)
    d = dg.diagnose(_curves(**_converged(train_loss=lambda s: math.nan if s >= 150 else loss(s)),
                            status="failed"))
    assert d.verdicts == ["diverged"] and d.findings[0].evidence["step"] == 150


def _workdir(path, records, status="completed", steps=STEPS):
    """A run's work dir holding `records` as its metrics.jsonl (json.dumps writes NaN/Infinity)."""
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps({"status": status, "step": steps}))
    (path / "config.json").write_text(json.dumps({"num_train_steps": steps}))
    return str(path)


@pytest.mark.parametrize("metric", ["top1", "loss"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_eval_loss_is_divergence_at_that_eval(tmp_path, metric, bad):
    """The engine stops a run whose eval loss is NaN/inf as diverged (loop.log_eval) and never
    logs it; a metrics.jsonl holding one (edited, or written by another program) is diagnosed
    the same way, at that eval's step, not as converged with a change of '+nan'."""
    records = _records(**_converged(eval_loss=lambda s: bad if s >= 300 else 0.1))
    d = dg.diagnose_workdir(_workdir(tmp_path, records), metric)
    assert d.verdicts == ["diverged"]
    assert d.findings[0].evidence["step"] == 300
    assert d.findings[0].message == f"diverged at step 300: a non-finite eval loss ({bad})."
    assert [r.field for r in d.findings[0].recommendations] == [
        "optimizer.learning_rate", "schedule.warmup_steps", "optimizer.grad_clip_norm"]


@pytest.mark.parametrize("schedule, warmup, advised", [
    ("warmup_cosine", 0, 20),  # none yet: 5% of the 400 steps
    ("warmup_cosine", 10, 20),  # a shorter one: lengthened to 5%
    ("warmup_cosine", 100, None),  # already longer than 5%: "set 20" would shorten it
    ("one_cycle", 0, None),  # warms up by itself; the engine refuses warmup_steps there
])
def test_divergence_advises_a_warmup_only_where_it_lengthens_the_runs(tmp_path, schedule,
                                                                      warmup, advised):
    """The warmup advice of a diverged run reads the run's own schedule (config.json): it
    recommended `schedule.warmup_steps = 5%` of the run also to a run that already warmed up
    longer (lenet5_digits at 40 steps, warmup 30: "set 2") and to one_cycle, which has none."""
    records = _records(**_converged(), steps=120)
    path = _workdir(tmp_path, records, status="diverged", steps=STEPS)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "diverged", "step": 120}))
    (tmp_path / "config.json").write_text(json.dumps({
        "num_train_steps": STEPS, "schedule": {"name": schedule, "warmup_steps": warmup}}))
    d = dg.diagnose_workdir(path)
    assert d.verdicts == ["diverged"]
    fields = {r.field: r.value for r in d.findings[0].recommendations}
    assert fields.get("schedule.warmup_steps") == advised
    assert fields["optimizer.learning_rate"] == 0.3 and fields["optimizer.grad_clip_norm"] == 1.0


@pytest.mark.parametrize("clip, advised", [(None, 1.0), (5.0, 1.0), (1.0, None), (0.25, None)])
def test_divergence_advises_a_clip_only_where_it_tightens_the_runs(tmp_path, clip, advised):
    """A run already clipping at 0.25 was told `optimizer.grad_clip_norm = 1.0`: a looser clip
    than it had, against the advice's own point (cap the update size)."""
    records = _records(**_converged(), steps=120)
    path = _workdir(tmp_path, records, status="diverged", steps=STEPS)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "diverged", "step": 120}))
    (tmp_path / "config.json").write_text(json.dumps({
        "num_train_steps": STEPS, "optimizer": {"grad_clip_norm": clip}}))
    fields = {r.field: r.value for r in dg.diagnose_workdir(path).findings[0].recommendations}
    assert fields.get("optimizer.grad_clip_norm") == advised
    assert fields["optimizer.learning_rate"] == 0.3


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_weight_decay_advice_to_a_run_without_any(tmp_path, weight_decay):
    """'optimizer.weight_decay x0.3' (underfitting) and 'x3' (overfitting) changed nothing for a
    run without weight decay (lenet5_digits with --config.optimizer.weight_decay=0 was told
    'x0.3 (less regularization)'): the first is left out, the second becomes 1e-4."""
    def advice(records, name):
        (tmp_path / "config.json").write_text(json.dumps({
            "num_train_steps": STEPS, "optimizer": {"weight_decay": weight_decay}}))
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp_path / "summary.json").write_text(json.dumps({"status": "completed",
                                                           "step": STEPS}))
        return {r.field: (r.change, r.value) for r in
                dg.diagnose_workdir(str(tmp_path)).finding(name).recommendations}

    under = advice(_records(**_converged(train_loss=_decay(2.3, 1.0, 0.03),
                                         train_top1=_decay(0.1, 0.7, 0.03),
                                         eval_top1=_decay(0.1, 0.69, 0.03))), "underfitting")
    over = advice(_records(**_overfit(0.12)), "overfitting")
    if weight_decay:
        assert under["optimizer.weight_decay"] == ("multiply", 0.3)
        assert over["optimizer.weight_decay"] == ("multiply", 3.0)
    else:
        assert "optimizer.weight_decay" not in under and "model" in under
        assert over["optimizer.weight_decay"] == ("set", 1e-4)


@pytest.mark.parametrize("smoothing, advised", [(0.0, 0.1), (0.05, 0.1), (0.1, None),
                                                (0.2, None)])
def test_overfitting_advises_label_smoothing_only_where_it_softens_the_targets(
        tmp_path, smoothing, advised):
    """An overfitting run smoothing labels by 0.2 was told `label_smoothing = 0.1` ("softer
    targets"), which halves the smoothing: harder targets."""
    path = _workdir(tmp_path, _records(**_overfit(0.12)))
    (tmp_path / "config.json").write_text(json.dumps({"num_train_steps": STEPS,
                                                      "label_smoothing": smoothing}))
    fields = {r.field: r.value for r in
              dg.diagnose_workdir(path).finding("overfitting").recommendations}
    assert fields.get("label_smoothing") == advised
    assert fields["optimizer.weight_decay"] == 3.0


def test_a_non_finite_ema_eval_loss_is_divergence_too():
    records = _records(**_converged())
    for r in records:
        if r["split"] == "eval":
            r["ema_loss"], r["ema_top1"] = (math.inf if r["step"] >= 350 else 0.1), 0.97
    d = dg.diagnose(dg.Curves.from_records(records, {"status": "completed"}, STEPS), "ema_top1")
    assert d.verdicts == ["diverged"] and d.findings[0].evidence["step"] == 350


@pytest.mark.parametrize("split, field", [("eval", "top1"), ("eval", "top5"),
                                          ("eval", "num_examples"), ("train", "top1")])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_score_in_metrics_jsonl_is_refused_naming_its_line(tmp_path, split, field,
                                                                         bad):
    """An accuracy (or eval-set size) is a count's fraction: NaN/inf is no learning signal but a
    broken file, so it is refused naming the file, line and field (as a number it read as
    'changed +nan' and converged, or 'improved inf')."""
    _assert_refused_at_step_300(tmp_path, split, field, bad,
                                r"expected a finite number.*never writes")


def _assert_refused_at_step_300(tmp_path, split: str, field: str, value, expected: str) -> None:
    """`field` of the converged run's `split` record of step 300 set to `value` is refused by
    `load_curves` and `diagnose_workdir`, naming the value, the file's line and `expected`."""
    records = _records(**_converged())
    line = max(i for i, r in enumerate(records) if r["split"] == split and r["step"] <= 300) + 1
    records[line - 1][field] = value
    path = _workdir(tmp_path, records)
    message = (rf"diagnose: {field}={value!r} is invalid; .*metrics.jsonl line {line} \({split} "
               rf"record of step 300\) holds it, {expected}")
    with pytest.raises(ValueError, match=message):
        dg.load_curves(path)
    with pytest.raises(ValueError, match=message):
        dg.diagnose_workdir(path)


@pytest.mark.parametrize("split, field", [
    ("eval", "loss"), ("eval", "top1"), ("eval", "num_examples"), ("eval", "ema_loss"),
    ("eval", "ema_top1"), ("train", "top1"), ("train", "learning_rate"), ("train", "loss")])
def test_a_record_missing_a_field_every_record_of_its_split_holds_is_refused_naming_its_line(
        tmp_path, split, field):
    """The engine writes loss, top-1 and num_examples (and their ema_ twins, with a weight
    average) in every eval record, and the learning rate (and a classifier's top-1) in every
    train log: one that lacks a field its run's other records of that split hold is a hand-made
    or broken file. As NaN a missing eval loss read as 'diverged at step 300', a missing last
    num_examples silently dropped the noise level to its 0.2-point floor; one train log without
    top-1 turned off the train-eval gap (an overfitting run read as converged), one without its
    learning rate the plateau test's per-lr measure."""
    records = _records(**_converged())
    for r in records:
        if r["split"] == "eval":
            r["ema_loss"], r["ema_top1"] = r["loss"], r["top1"]
    line = max(i for i, r in enumerate(records) if r["split"] == split and r["step"] <= 300) + 1
    del records[line - 1][field]
    path = _workdir(tmp_path, records)
    every = "eval" if split == "eval" else "train log"
    message = (rf"diagnose: {field}='missing' is invalid; .*metrics.jsonl line {line} \({split} "
               rf"record of step 300\) lacks it, which the run's other {split} records hold; "
               rf"expected a number: the training engine writes it in every {every}, so")
    with pytest.raises(ValueError, match=message):
        dg.load_curves(path)
    with pytest.raises(ValueError, match=message):
        dg.diagnose_workdir(path)
    with pytest.raises(ValueError, match=rf"diagnose: {field}='missing' is invalid; "
                                         rf"records\[{line - 1}\] \({split} record of step "
                                         r"300\)"):
        dg.Curves.from_records(records, {"status": "completed"}, STEPS)


def test_train_logs_without_a_loss_are_refused_even_when_none_holds_one(tmp_path):
    """The engine writes the loss in every train log of every task: a file of train logs
    without one read as '0 train logs logged ... log_every_steps x0.25' (and a note that no
    train log holds the top-1 they all held), one such log was left out of the curves."""
    records = _records(**_converged())
    for r in records:
        if r["split"] == "train":
            del r["loss"]
    message = (r"^diagnose: loss='missing' is invalid; .*metrics.jsonl line 1 \(train record of "
               r"step 10\) lacks it; expected a number: the training engine writes it in every "
               r"train log, so the file was edited or written by another program\.$")
    with pytest.raises(ValueError, match=message):
        dg.diagnose_workdir(_workdir(tmp_path, records))
    with pytest.raises(ValueError, match=r"^diagnose: loss='missing' is invalid; records\[0\] "
                                         r"\(train record of step 10\) lacks it; expected"):
        dg.Curves.from_records(records, {"status": "completed"}, STEPS)


def test_one_train_log_without_top1_does_not_hide_overfitting(tmp_path):
    """Train top-1 99%, eval 80%: overfitting; without the top-1 of one train log the gap was
    not measured at all and the run read as converged."""
    records = _records(**_converged(eval_top1=lambda s: 0.8))
    assert dg.diagnose_workdir(_workdir(tmp_path, records)).verdicts == ["overfitting"]
    del next(r for r in records if r["split"] == "train" and r["step"] == 200)["top1"]
    with pytest.raises(ValueError, match=r"top1='missing' is invalid; .*metrics.jsonl line 23 "
                                         r"\(train record of step 200\) lacks it"):
        dg.diagnose_workdir(_workdir(tmp_path, records))


@pytest.mark.parametrize("split, field, value, expected", [
    ("train", "loss", "abc", "a number (NaN/inf if the run diverged)"),
    ("eval", "loss", None, "a number (NaN/inf if the run diverged)"),
    ("eval", "num_examples", 0.0, "a count > 0"),
    ("eval", "num_examples", -5.0, "a count > 0")])
def test_a_loss_that_is_no_number_or_an_empty_eval_set_is_refused_naming_its_line(
        tmp_path, split, field, value, expected):
    """A string or null loss read as NaN, 'diverged'; an eval-set size of 0 dropped the noise
    level to its floor, a negative one raised 'math domain error'. The engine writes neither."""
    records = _records(**_converged())
    line = max(i for i, r in enumerate(records) if r["split"] == split and r["step"] <= 300) + 1
    records[line - 1][field] = value
    message = (rf"diagnose: {field}={value!r} is invalid; .*metrics.jsonl line {line} \({split} "
               rf"record of step 300\) holds it, expected {re.escape(expected)}")
    with pytest.raises(ValueError, match=message):
        dg.diagnose_workdir(_workdir(tmp_path, records))


@pytest.mark.parametrize("record", [[1, 2], {"split": "eval", "loss": 0.1},
                                    {"step": "30", "split": "train", "loss": 0.1}])
def test_a_record_without_an_integer_step_is_refused_naming_its_line(tmp_path, record):
    """It raised KeyError 'step', TypeError (str < int) or AttributeError ('list'.get)."""
    records = _records(**_converged())
    records.insert(6, record)
    with pytest.raises(ValueError, match=r"diagnose: record=.* is invalid; .*metrics.jsonl line 7 "
                                         r"holds it, expected an object with an integer 'step'"):
        dg.diagnose_workdir(_workdir(tmp_path, records))


def test_fields_only_some_evals_hold_are_accepted(tmp_path):
    """Fields an engine-written file may hold in only some eval records: a per-class IoU (a class
    predicted in some evals only), a metric added after a resumed run's first evals (map50_voc07);
    a detector logs no eval loss nor top-1 at all. The diagnosis is that of the same file without
    those fields."""
    records = _detection_records(_decay(0.1, 0.5, 0.01))
    for r in records:
        if r["split"] == "eval" and r["step"] >= 200:
            r["map50_voc07"], r["iou/3"] = r["map50"] - 0.01, 0.2
    plain = [{k: v for k, v in r.items() if k not in ("map50_voc07", "iou/3")} for r in records]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    got = dg.diagnose_workdir(_workdir(tmp_path / "a", records), "map50")
    assert got.verdicts == ["converged"]
    assert got == dg.diagnose_workdir(_workdir(tmp_path / "b", plain), "map50")


@pytest.mark.parametrize("split, field, value", [
    ("eval", "top1", 97.0), ("eval", "top5", 100.0), ("eval", "pixel_accuracy", 1.01),
    ("eval", "map50", 40.0), ("eval", "miou", -0.1), ("eval", "ap50/0", 55.0),
    ("eval", "ema_iou/2", 1.5), ("train", "top1", 99.0)])
def test_a_fraction_written_as_a_percent_is_refused_naming_its_line(tmp_path, split, field,
                                                                    value):
    """The engine writes accuracies, mAP and IoU as fractions in [0, 1]; a percent (97.0 for
    97%) read as a top-1 that 'improved 0.0102 (96.99 -> 97)': still_improving, not converged."""
    _assert_refused_at_step_300(tmp_path, split, field, value,
                                r"expected a fraction in \[0, 1\]")


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_fractions_at_the_ends_of_their_range_are_accepted(tmp_path, value):
    """0 and 1 are valid scores (a blank or a perfect eval), and not a percent."""
    records = _records(**_converged())
    for r in records:
        if r["split"] == "eval":
            r["top5"] = value
    assert dg.diagnose_workdir(_workdir(tmp_path, records)).verdicts == ["converged"]


@pytest.mark.parametrize("split", ["eval", "train"])
def test_diagnose_refuses_curves_with_a_top1_in_percent(split):
    """Curves built from records (not a file) are checked by `diagnose`: top-1 must be a
    fraction (eval 97 against train 0.99 read as no train-eval gap at all)."""
    records = _records(**_converged())
    for r in records:
        if r["split"] == split:
            r["top1"] *= 100
    curves = dg.Curves.from_records(records, {"status": "completed"}, STEPS)
    with pytest.raises(ValueError, match=rf"diagnose: {split} top1 at step (10|50)=\d+\.\d+ is "
                                         r"invalid; expected a fraction in \[0, 1\] \(0.97, "
                                         r"not 97 for 97%\)\."):
        dg.diagnose(curves)


def test_a_torn_line_does_not_shift_the_line_number_named(tmp_path):
    records = _records(**_converged())
    records[-1]["top1"] = math.nan
    lines = [json.dumps(r) for r in records]
    (tmp_path / "metrics.jsonl").write_text("\n".join(['{"step": 1, "spl', *lines]) + "\n")
    with pytest.raises(ValueError, match=rf"metrics.jsonl line {len(lines) + 1} \(eval record"):
        dg.load_curves(str(tmp_path))


@pytest.mark.parametrize("metric", ["top1", "top5", "loss"])
def test_diagnose_refuses_curves_with_a_non_finite_score_it_reads(metric):
    """Curves built from records (not a file) are checked by `diagnose`: the eval top-1 (read
    for overfitting and underfitting, whatever the judged metric) and the judged metric."""
    records = _records(**_converged())
    records[-1]["top1"] = math.nan
    with pytest.raises(ValueError, match=r"diagnose: eval top1 at step 400=nan is invalid; "
                                         r"expected a finite number"):
        dg.diagnose(dg.Curves.from_records(records, {"status": "completed"}, STEPS), metric)


@pytest.mark.parametrize("factor, exploded", [(1.9, False), (2.1, True)])
def test_loss_explosion_threshold(factor, exploded):
    """A logged loss above 2x the first one (2.3 at step 10) is an explosion; 1.9x is not."""
    first = _decay(2.3, 0.05, 0.03)(10)
    base = _decay(2.3, 0.05, 0.03)
    d = dg.diagnose(_curves(**_converged(
        train_loss=lambda s: factor * first if s == 200 else base(s))))
    assert ("diverged" in d.verdicts) is exploded
    if exploded:
        assert d.findings[0].evidence["step"] == 200



def _relapse(level):
    """Loss 2.3 -> 0.3 by step 200, then back up to `level` and staying there (below 2x the
    first loss: no explosion); top-1 follows it down."""
    down = _decay(2.3, 0.3, 0.03)
    return _converged(train_loss=lambda s: down(s) if s <= 200 else level,
                      train_top1=lambda s: 0.92 if s <= 200 else 0.1 + 0.82 * 0.3 / level,
                      eval_loss=lambda s: down(s) if s <= 200 else level,
                      eval_top1=lambda s: 0.9 if s <= 200 else 0.1 + 0.8 * 0.3 / level)


@pytest.mark.parametrize("level, relapsed", [(2.3, True), (1.0, True), (0.5, False)])
def test_a_collapse_after_learning_is_divergence_not_too_slow(level, relapsed):
    """Back to chance (2.3) or to 1.0 after reaching 0.3 is a blow-up (the smoothed loss ends
    above 2x its minimum); the recipe must lower the rate, not raise it as 'too_slow' would.
    Ending at 0.5 (1.7x) is left to the other verdicts."""
    d = dg.diagnose(_curves(**_relapse(level)))
    assert (d.verdicts == ["diverged"]) is relapsed
    if relapsed:
        finding = d.findings[0]
        assert 200 < finding.evidence["step"] <= 230
        assert finding.evidence["min_loss"] == pytest.approx(0.3, abs=0.05)
        assert finding.recommendations[0].field == "optimizer.learning_rate"
        assert finding.recommendations[0].value < 1

def test_repeated_spikes_are_unstable():
    base = _decay(2.3, 0.3, 0.02)
    d = dg.diagnose(_curves(**_converged(
        train_loss=lambda s: base(s) * (3.0 if s in (150, 250) else 1.0))))
    assert d.primary == "unstable"
    evidence = d.findings[0].evidence
    assert evidence["spike_steps"] == [150, 250]
    assert evidence["worst_step"] == 250  # the higher ratio: 3x a smaller median
    assert evidence["median_before"] == pytest.approx(np.median([base(s) for s in range(200, 250,
                                                                                          10)]))


def test_a_single_spike_is_not_instability():
    base = _decay(2.3, 0.3, 0.02)
    d = dg.diagnose(_curves(**_converged(
        train_loss=lambda s: base(s) * (3.0 if s == 150 else 1.0))))
    assert "unstable" not in d.verdicts


def test_one_spike_spanning_two_consecutive_logs_is_not_instability():
    """3x the loss at steps 150 and 160 is one bad stretch, not the two events `min_spikes`
    asks for; the same two logs 100 steps apart are."""
    base = _decay(2.3, 0.3, 0.02)
    d = dg.diagnose(_curves(**_converged(
        train_loss=lambda s: base(s) * (3.0 if s in (150, 160) else 1.0))))
    assert "unstable" not in d.verdicts
    d = dg.diagnose(_curves(**_converged(
        train_loss=lambda s: base(s) * (3.0 if s in (150, 160, 250) else 1.0))))
    assert d.primary == "unstable"
    assert d.findings[0].evidence["spike_steps"] == [150, 250]


@pytest.mark.parametrize("seed", range(10))
def test_ordinary_minibatch_noise_is_not_instability(seed):
    """10% multiplicative noise on every logged loss: no spikes, the verdict stays converged."""
    rng = np.random.default_rng(seed)
    base = _decay(2.3, 0.05, 0.03)
    noise = {s: float(rng.normal(1.0, 0.1)) for s in range(0, STEPS + 1, 10)}
    d = dg.diagnose(_curves(**_converged(train_loss=lambda s: base(s) * noise[s])))
    assert d.verdicts == ["converged"]


def _ten_classes(**kw):
    """Curves of a 10-class classifier (its summary's num_classes: initial loss ln(10))."""
    return dg.Curves.from_records(_records(**kw), {"status": "completed", "step": STEPS,
                                                   "num_classes": 10}, STEPS)


CHANCE = math.log(10)
_AT_CHANCE = dict(train_top1=lambda s: 0.1, eval_loss=lambda s: CHANCE, eval_top1=lambda s: 0.1)


@pytest.mark.parametrize("name, loss, killed", [
    # The loss jumps 15% above its first log, then sits at chance to the end.
    ("rose, then chance", lambda s: 2.63 if s == 20 else CHANCE, True),
    # ... or stays above where it started (worse than chance).
    ("rose, stays up", lambda s: 2.3 if s == 10 else 2.6, True),
    # A first log below chance (2.0), lifted to 2.6, ending at 2.1: below chance, but above its
    # start (the lower of the first log and chance), so the rate still undid all its learning.
    ("rose from below chance, ends above its start",
     lambda s: 2.0 + 0.6 * min(s, 100) / 100 - 0.5 * min(max(s - 100, 0), 100) / 100, True),
    # The jump fell within the first log (2.9), then the loss settled at chance.
    ("first log above chance", lambda s: 2.9 if s == 10 else CHANCE + 0.005, True),
    # A rate too low: near its start, gently falling, never lifted above it.
    ("too low", lambda s: 2.3 - 0.0004 * s, False),
    # A too-low rate from a bad init (4.0, far above ln(10)) never settles at chance.
    ("bad init, too low", lambda s: 4.0 - 0.0025 * s, False),
    # A warmup bump, then real learning.
    ("bump, then learns", lambda s: 2.63 if s == 20 else _decay(2.3, 0.3, 0.01)(s), False),
])
def test_a_loss_the_rate_lifted_and_stalled_is_divergence_not_too_slow(name, loss, killed):
    """A network the rate kills (LeNet-5 relu at lr 0.5: the loss jumps, then sits at
    ln(10) with chance top-1) was read as too_slow, "fell only -0.4%", raise the lr x3. A loss
    that rose above its start and never fell below it (or chance) is a rate too high."""
    d = dg.diagnose(_ten_classes(train_loss=loss, **_AT_CHANCE))
    assert (d.verdicts == ["diverged"]) is killed, (name, d.format())
    if killed:
        advice = d.findings[0].recommendations[0]
        assert (advice.field, advice.value) == ("optimizer.learning_rate", 0.3)
        assert "the rate is too high" in d.findings[0].message
    else:
        assert "diverged" not in d.verdicts, (name, d.format())


@pytest.mark.parametrize("drift, sd", [(0.0, 0.03), (0.0, 0.06), (0.05, 0.06)])
def test_a_noisy_flat_or_slowly_falling_loss_is_too_slow(drift, sd):
    """A rate too low: 40 logs at chance ln(10), flat or falling 5%, with Gaussian noise of sd
    0.03 or 0.06 (1.3%, 2.6%). A low first log made later smoothed logs "rise" 5% above it, and
    45 in 200 such flat runs at sd 0.06 read as diverged (lower the rate), the wrong way; a
    high first log made 9 in 200 a plateau's early fall, and too_slow went unsaid."""
    wrong = []
    for seed in range(100):
        noise = np.random.default_rng(seed).normal(0.0, sd, STEPS // 10)
        loss = {s: CHANCE * (1 - drift * s / STEPS) + noise[s // 10 - 1]
                for s in range(10, STEPS + 1, 10)}
        d = dg.diagnose(_ten_classes(train_loss=loss.__getitem__, **_AT_CHANCE))
        if "diverged" in d.verdicts or "too_slow" not in d.verdicts:
            wrong.append((seed, d.format()))
    assert not wrong, wrong[:2]


@pytest.mark.parametrize("log_every", [40, 20])
def test_a_noisy_flat_loss_with_few_logs_is_not_diverged(log_every):
    """A rate too low, logged 10 or 20 times, at chance ln(10) with noise of sd 0.1 (4%). The
    noise estimate from so few log-to-log changes came out at a third of the truth often enough
    that a low first log and a chance high later one read as a rise: 2 (10 logs) and 1 (20 logs)
    of these 100 runs were diverged (lower the rate), the wrong way."""
    wrong = []
    for seed in range(100):
        noise = np.random.default_rng(seed).normal(0.0, 0.1, STEPS // log_every)
        loss = {s: CHANCE + noise[s // log_every - 1]
                for s in range(log_every, STEPS + 1, log_every)}
        d = dg.diagnose(_ten_classes(train_loss=loss.__getitem__, log_every=log_every,
                                     **_AT_CHANCE))
        if "diverged" in d.verdicts:
            wrong.append((seed, d.format()))
    assert not wrong, wrong[:2]


@pytest.mark.parametrize("rise, killed", [(0.3, True), (0.1, False)])
def test_a_few_logs_still_show_a_rise_beyond_their_noise(rise, killed):
    """Ten logs with noise of sd 0.02: a loss lifted 0.3 above its start (15 sds) and left there
    is a rate that stopped the network learning; a lift of 0.1 (5 sds, within what ten logs
    cannot tell from their noise) is not read as one."""
    noise = np.random.default_rng(0).normal(0.0, 0.02, 10)
    loss = {s: 2.2 + (rise if s > 40 else 0.0) + noise[s // 40 - 1] for s in range(40, 401, 40)}
    d = dg.diagnose(_ten_classes(train_loss=loss.__getitem__, log_every=40, **_AT_CHANCE))
    assert ("diverged" in d.verdicts) is killed, d.format()


def test_a_loss_that_rose_a_little_is_too_slow_without_saying_it_fell():
    """A flat loss drifting 3% up (under the 5% rise that reads as a rate too high) is still
    too slow, but "fell only -3.0%" said the opposite of what it did."""
    d = dg.diagnose(_ten_classes(train_loss=lambda s: 2.3 * (1 + 0.03 * s / STEPS),
                                 **_AT_CHANCE))
    f = d.finding("too_slow")
    assert f is not None and "fell" not in f.message
    assert f.message.startswith("smoothed train loss did not fall (+"), f.message


@pytest.mark.parametrize("name, step", [("lenet5_digits_relu_lr0.5_dead", 8),
                                        ("lenet5_digits_relu_lr0.5_dead_first_log", 10)])
def test_real_lenet_run_killed_by_its_rate_is_diverged_not_too_slow(name, step):
    """LeNet-5 (relu) on digits at lr 0.5, 80 steps: the train loss jumps (2.30 -> 2.63 at step
    8; or within the first log, 2.87 at step 10) and then sits at 2.30-2.33 = ln(10) with eval
    top-1 10.0% at every eval. It read as too_slow (lr x3) and underfitting, and a tune with
    rates 0.5..2 trained longer at 0.5 instead of trying lower rates. Made with
    `experiments.sweep` (`--config.num_train_steps=80 --config.eval_every_steps=10
    --config.log_every_steps=4 --config.schedule.warmup_steps=4
    --config.model_kwargs.activation=relu`, lr 0.5) and round 2 of `experiments.tune`
    (`--recipe.lr_min=0.5 --recipe.lr_max=2.0`, warmup 5, 80 steps logged every 10); trimmed
    as the other runs here."""
    d = dg.diagnose_workdir(os.path.join(DATA, name))
    assert d.verdicts == ["diverged"], d.format()
    f = d.findings[0]
    assert f.evidence["step"] == step and f.evidence["chance_loss"] == pytest.approx(CHANCE)
    assert f.evidence["final_loss"] == pytest.approx(CHANCE, rel=0.01)
    assert f.recommendations[0].field == "optimizer.learning_rate"
    assert f.recommendations[0].value < 1 and "fell" not in f.message
    assert "eval top-1 10.0%" in f.message


@pytest.mark.parametrize("end, slow", [(1.66, True), (1.56, False)])
def test_too_slow_threshold(end, slow):
    """A linear loss from 2.3 that ends 28% (1.66) vs 32% (1.56) lower: only the first is slow
    (threshold 30%, on the EMA-smoothed curve)."""
    d = dg.diagnose(_curves(**_converged(train_loss=lambda s: 2.3 - (2.3 - end) * s / STEPS)))
    assert ("too_slow" in d.verdicts) is slow
    if slow:
        f = d.finding("too_slow")
        assert f.recommendations[0].field == "optimizer.learning_rate"
        assert f.recommendations[0].value == 3.0


def test_exponential_smoothing_matches_the_weighted_average_definition():
    """Bias-corrected EMA = sum_i w^i x_{t-i} / sum_i w^i (float64 loop reference)."""
    x = np.random.default_rng(0).normal(size=30)
    w = 0.6
    reference = [sum(w**i * x[t - i] for i in range(t + 1)) / sum(w**i for i in range(t + 1))
                 for t in range(len(x))]
    np.testing.assert_allclose(dg.exponential_smoothing(x, w), reference, rtol=1e-12)
    assert dg.trailing_median(np.arange(8.0), 3)[5] == 3.0  # median of x[2:5]


def _overfit(rise):
    """Train -> 100%; eval loss falls to 0.4 at step 150, then rises by `rise` (linearly)."""
    def eval_loss(s):
        return 0.4 + (2.3 - 0.4) * (150 - s) / 150 if s <= 150 else 0.4 * (1 + rise * (s - 150)
                                                                            / 250)
    return _converged(train_top1=_decay(0.1, 1.0, 0.02), eval_loss=eval_loss,
                      eval_top1=_decay(0.1, 0.9, 0.03))


@pytest.mark.parametrize("rise, overfit", [(0.08, False), (0.12, True)])
def test_overfitting_by_rising_eval_loss_threshold(rise, overfit):
    d = dg.diagnose(_curves(**_overfit(rise)))
    assert ("overfitting" in d.verdicts) is overfit
    if overfit:
        f = d.finding("overfitting")
        assert f.evidence["eval_loss_min_step"] == 150
        assert f.evidence["eval_loss_rise"] == pytest.approx(rise)
        assert "at step 150" in f.message
        assert f.recommendations[0].field == "optimizer.weight_decay"
        assert d.primary == "overfitting" and "converged" not in d.verdicts


def test_an_overfitting_run_without_top1_is_not_told_to_smooth_labels():
    """A segmentation run (pixel accuracy and mIoU, no top-1) overfits by its eval loss alone;
    label smoothing is a classifier's setting, which the engine refuses for other tasks."""
    records = _records(**_overfit(0.12))
    for record in records:
        top1 = record.pop("top1")
        record.pop("top5", None)
        if record["split"] == "eval":
            record.update(pixel_accuracy=top1, miou=top1 * 0.8)
    d = dg.diagnose(dg.Curves.from_records(records, {"status": "completed", "step": STEPS},
                                           STEPS), metric="miou")
    fields = [r.field for r in d.finding("overfitting").recommendations]
    assert fields == ["optimizer.weight_decay", "data.augment", "num_train_steps"]
    classifier = dg.diagnose(_curves(**_overfit(0.12))).finding("overfitting")
    assert "label_smoothing" in [r.field for r in classifier.recommendations]


def test_overfitting_by_a_growing_train_eval_gap():
    d = dg.diagnose(_curves(**_converged(train_top1=_decay(0.1, 1.0, 0.02),
                                         eval_top1=lambda s: min(0.9, 0.1 + s / 200) - (
                                             0.0004 * max(0, s - 200)))))
    f = d.finding("overfitting")
    assert f is not None and f.evidence["final_gap"] > 0.05 and f.evidence["gap_growth"] > 0.02


@pytest.mark.parametrize("eval_top1, overfit", [(0.91, False), (0.88, True)])
def test_a_very_large_stable_gap_is_overfitting(eval_top1, overfit):
    """Train 100%, eval flat: a 9-point gap that does not grow is fine, 12 points is not."""
    d = dg.diagnose(_curves(**_converged(train_top1=_decay(0.1, 1.0, 0.05),
                                         eval_top1=_decay(0.1, eval_top1, 0.05))))
    assert ("overfitting" in d.verdicts) is overfit
    assert d.finding("overfitting" if overfit else "converged").evidence  # numbers given


def test_real_lenet_run_on_4_percent_of_the_training_set_overfits():
    d = dg.diagnose_workdir(os.path.join(DATA, "lenet5_digits_4pct"))
    assert d.primary == "overfitting"
    f = d.findings[0]
    assert f.evidence["final_gap"] > 0.15  # train 100%, test 84%
    # The run already augmented its data, so `data.augment = True` is not recommended to it;
    # the curves alone (no config) keep the generic list.
    assert [r.field for r in f.recommendations] == [
        "optimizer.weight_decay", "label_smoothing", "num_train_steps"]
    alone = dg.diagnose(dg.load_curves(os.path.join(DATA, "lenet5_digits_4pct")))
    assert [r.field for r in alone.findings[0].recommendations][:3] == [
        "optimizer.weight_decay", "label_smoothing", "data.augment"]


@pytest.mark.parametrize("plateau", [False, True])
def test_underfitting_run(plateau):
    """Train loss still falling (2.3 -> 1.5 linearly) or flat at 1.0 from step ~150 at the
    same (constant) rate: train longer first, or lower the regularization first."""
    loss = _decay(2.3, 1.0, 0.03) if plateau else (lambda s: 2.3 - 0.002 * s)
    d = dg.diagnose(_curves(**_converged(train_loss=loss, train_top1=_decay(0.1, 0.7, 0.03),
                                         eval_top1=_decay(0.1, 0.69, 0.03))))
    assert d.verdicts == ["underfitting"]
    f = d.findings[0]
    assert f.evidence["train_top1"] == pytest.approx(0.7, abs=1e-3)
    assert f.evidence["train_loss_plateaued"] is plateau
    assert f.recommendations[0].field == ("optimizer.weight_decay" if plateau
                                          else "num_train_steps")
    assert f.message == ("train top-1 70.00% (< 90%) and within 1.0 points of eval top-1 69.0%"
                         + ("; the train loss plateaued (per unit of lr)." if plateau else "."))


def test_a_short_rising_run_is_judged_on_its_end_not_its_lagging_average():
    """A real tune trial's 5 train logs (lenet5 on digits, 20 steps): its last two read 93% and
    96%, but the EMA (weight 0.6) 86.6%, which called it underfitting, "5.3 points below eval
    top-1 91.9%"."""
    logged = {4: 0.2031, 8: 0.6953, 12: 0.8477, 16: 0.9297, 20: 0.957}
    evals = {4: 0.30, 8: 0.70, 12: 0.85, 16: 0.90, 20: 0.9192}
    curves = _curves(steps=20, log_every=4, eval_every=4, train_loss=_decay(2.3, 0.2, 0.2),
                     train_top1=logged.get, eval_loss=_decay(2.3, 0.3, 0.2), eval_top1=evals.get)
    assert "underfitting" not in dg.diagnose(curves).verdicts
    lower = _curves(steps=20, log_every=4, eval_every=4, train_loss=_decay(2.3, 0.2, 0.2),
                    train_top1=lambda s: logged[s] - 0.1, eval_loss=_decay(2.3, 0.3, 0.2),
                    eval_top1=evals.get)
    f = dg.diagnose(lower).finding("underfitting")  # 85.7% at its end: still underfitting
    assert f.evidence["train_top1"] == pytest.approx(0.857)


def test_an_ema_metric_is_still_improving_while_the_averages_loss_falls():
    """metric=ema_top1 read the raw weights' eval loss for its "eval loss fell" test: flat raw
    curves called the run converged while the weight average's loss fell 24% in the tail."""
    records = [{"step": s, "split": "train", "loss": 2.3 * math.exp(-s / 40) + 0.05,
                "top1": 0.97, "learning_rate": 0.05} for s in range(10, STEPS + 1, 10)]
    records += [{"step": s, "split": "eval", "loss": 0.1, "top1": 0.95, "num_examples": 359.0,
                 "ema_loss": 0.1 + 0.9 * math.exp(-s / 120), "ema_top1": 0.95}
                for s in range(50, STEPS + 1, 50)]
    curves = dg.Curves.from_records(records, {"status": "completed"}, STEPS)
    f = dg.diagnose(curves, "ema_top1").finding("still_improving")
    assert f.evidence["eval_loss_tail_drop"] == pytest.approx(
        (0.9 * math.exp(-300 / 120) - 0.9 * math.exp(-400 / 120)) / (0.1 + 0.9 * math.exp(-2.5)))
    assert dg.diagnose(curves, "top1").verdicts == ["converged"]  # the raw weights are flat


@pytest.mark.parametrize("eval_top1, verdicts", [(0.78, ["underfitting"]),
                                                  (0.70, ["overfitting"])])
def test_a_steady_moderate_gap_below_the_underfit_line_is_underfitting(eval_top1, verdicts):
    """Train 85%, eval 78%, both flat: below the 90% line, a 7-point gap that does not grow
    (under large_gap) fell between underfitting (gap <= 5) and overfitting and read as
    converged. A 15-point gap is overfitting's, and only overfitting's."""
    d = dg.diagnose(_curves(**_converged(train_loss=_decay(2.3, 0.5, 0.03),
                                         train_top1=_decay(0.1, 0.85, 0.03),
                                         eval_top1=_decay(0.1, eval_top1, 0.03))))
    assert d.verdicts == verdicts
    if verdicts == ["underfitting"]:
        assert d.findings[0].message.startswith(
            "train top-1 85.00% (< 90%) and 7.0 points above eval top-1 78.0%, a gap that does "
            "not grow")


@pytest.mark.parametrize("train_top1, underfits", [(np.float32(0.9), False), (0.899, True)])
def test_a_train_top1_on_the_line_in_float32_is_not_underfitting(train_top1, underfits):
    """288/320 right, logged as float32 0.89999998: read as "train top-1 90.00% (< 90%)"."""
    d = dg.diagnose(_curves(**_converged(train_loss=_decay(2.3, 0.5, 0.03),
                                         train_top1=lambda s: float(train_top1),
                                         eval_top1=_decay(0.1, 0.88, 0.03))))
    assert ("underfitting" in d.verdicts) is underfits


def test_underfitting_with_eval_above_train_says_so():
    """Augmented or mixed train images can put eval top-1 above train's: still underfitting
    (train below 90%), and the message says eval is higher, not "within" a 15-point gap."""
    d = dg.diagnose(_curves(**_converged(train_loss=_decay(2.3, 1.0, 0.03),
                                         train_top1=_decay(0.1, 0.55, 0.03),
                                         eval_top1=_decay(0.1, 0.7, 0.03))))
    assert d.verdicts == ["underfitting"]
    assert d.findings[0].message.startswith("train top-1 55.00% (< 90%) and 15.0 points below "
                                            "eval top-1 70.0%")


@pytest.mark.parametrize("seed", range(10))
def test_eval_noise_within_two_standard_errors_does_not_make_a_plateau_improve(seed):
    """A flat 94% eval top-1 on 400 examples, jittered by +-1 standard error: converged."""
    rng = np.random.default_rng(seed)
    se = math.sqrt(0.94 * 0.06 / 400)
    jitter = {s: float(rng.uniform(-se, se)) for s in range(50, STEPS + 1, 50)}
    d = dg.diagnose(_curves(**_converged(eval_top1=lambda s: 0.94 + jitter[s]),
                            eval_examples=400))
    assert d.verdicts == ["converged"]


@pytest.mark.parametrize("gain, improving", [(0.025, False), (0.035, True)])
def test_still_improving_threshold_is_two_standard_errors(gain, improving):
    """Eval top-1 flat at 0.9 on 400 examples (2 SE = 0.03), then a final step up by `gain`."""
    d = dg.diagnose(_curves(**_converged(eval_top1=lambda s: 0.9 + (gain if s == STEPS else 0)),
                            eval_examples=400))
    assert d.primary == ("still_improving" if improving else "converged")


@pytest.mark.parametrize("drop, improving", [(0.18, False), (0.22, True)])
def test_eval_loss_still_falling_in_the_last_quarter_is_still_improving(drop, improving):
    """Top-1 flat (within noise); eval loss flat at 0.5, then `drop` lower after step 300."""
    d = dg.diagnose(_curves(**_converged(eval_loss=lambda s: 0.5 * (1 - drop * (s > 300)))))
    assert d.verdicts == (["still_improving"] if improving else ["converged"])
    assert d.findings[0].evidence["eval_loss_tail_drop"] == pytest.approx(drop)
    if improving:
        assert f"eval loss fell {100 * drop:.0f}% (0.5 -> {0.5 * (1 - drop):.4g})" \
            in d.findings[0].message


@pytest.mark.parametrize("drop, improving", [(0.015, False), (0.025, True)])
def test_loss_as_the_judged_metric_uses_a_relative_threshold(drop, improving):
    """metric='loss': a 2.5% lower eval loss in the last quarter is an improvement, 1.5% noise."""
    d = dg.diagnose(_curves(**_converged(eval_loss=lambda s: 0.5 * (1 - drop * (s > 300)))),
                    metric="loss")
    assert d.primary == ("still_improving" if improving else "converged")
    evidence = d.findings[0].evidence
    assert evidence["gain"] == pytest.approx(0.5 * drop)
    assert evidence["noise_level"] == pytest.approx(0.02 * 0.5)


def test_too_few_evals_is_insufficient_data():
    d = dg.diagnose(_curves(**_converged(), eval_every=200))
    assert d.verdicts == ["insufficient_data"]
    assert d.findings[0].recommendations[0].field == "eval_every_steps"


def test_a_run_read_from_file_before_its_first_eval_is_diagnosed_not_a_key_error(tmp_path):
    """Train logs only, an empty file, or a run the engine stopped as diverged before its first
    eval: curves read from a file raised KeyError('top1'), those built in memory did not."""
    train = [{"step": s, "split": "train", "loss": 2.3 * math.exp(-s / 100), "top1": 0.5,
              "learning_rate": 0.1} for s in range(10, 101, 10)]
    for name, records, status, verdict in (
            ("train_only", train, "completed", "insufficient_data"),
            ("empty", [], "completed", "insufficient_data"),
            ("diverged", [*train[:2], {**train[2], "loss": math.nan}], "diverged", "diverged")):
        path = tmp_path / name
        path.mkdir()
        assert dg.diagnose_workdir(_workdir(path, records, status=status)).verdicts == [verdict]


def test_real_lenet_run_at_its_learning_rate_has_converged():
    d = dg.diagnose_workdir(os.path.join(DATA, "lenet5_digits_lr0.05"))
    assert d.verdicts == ["converged"]
    evidence = d.findings[0].evidence
    with open(os.path.join(DATA, "lenet5_digits_lr0.05", "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    assert evidence["final"] == evals[-1]["top1"]
    assert evidence["best_in_tail"] == max(r["top1"] for r in evals if r["step"] > 225)


def test_real_lenet_run_at_a_hundredth_of_its_rate_underfits():
    d = dg.diagnose_workdir(os.path.join(DATA, "lenet5_digits_lr0.0005"))
    assert d.primary == "underfitting"
    assert d.findings[0].evidence["train_top1"] < 0.85


def test_real_lenet_run_with_huge_weight_decay_plateaus_it_is_not_too_slow():
    """Weight decay 0.3: the train loss falls fast to ~1.6 and stays there at 90% of the peak
    lr (47.6% train top-1). Its fall from the first log (already 1.87) is 14%, which read as
    "too slow: lr x3"; per unit of lr it slowed to 0.19 x its first half's rate: a plateau."""
    d = dg.diagnose_workdir(os.path.join(DATA, "lenet5_digits_wd0.3"))
    assert d.verdicts == ["underfitting"]
    f = d.findings[0]  # more steps would not lift a plateau: less regularization comes first
    assert f.evidence["train_loss_plateaued"] and f.message.endswith(
        "; the train loss plateaued (per unit of lr).")
    assert [r.field for r in f.recommendations][:2] == ["optimizer.weight_decay", "model"]
    still_falling = dg.diagnose_workdir(os.path.join(DATA, "lenet5_digits_lr0.0001"))
    assert not still_falling.finding("underfitting").evidence["train_loss_plateaued"]


def test_real_lenet_run_whose_loss_still_falls_at_the_end_has_not_plateaued():
    """lr 1.0 for 40 steps (warmup 30, then cosine; a tune's round 1 with round1_steps=40): the
    loss hovers near 0.8 at the peak rate, then falls 23% in the last quarter as the rate
    anneals (eval loss -39%). Per unit of lr its second half fell at 0.2 x its first half's rate,
    which read as "the train loss plateaued" and sent the recipe to lower a 5e-4 weight decay
    instead of training longer; a loss still falling more than tail_loss_drop over the last
    tail_fraction of the run is no plateau. (Its last two train logs are 91.4%: underfitting at
    the default 90% no longer holds, its lagging EMA having read 86%; judged at 95% here.)"""
    path = os.path.join(DATA, "lenet5_digits_lr1_40steps")
    assert dg.diagnose_workdir(path).verdicts == ["still_improving"]
    d = dg.diagnose_workdir(path, thresholds={"underfit_train_top1": 0.95})
    assert d.verdicts == ["underfitting", "still_improving"]
    f = d.findings[0]
    assert not f.evidence["train_loss_plateaued"]
    assert not f.message.endswith("plateaued (per unit of lr).")
    assert f.recommendations[0].field == "num_train_steps"
    assert d.finding("still_improving").evidence["train_loss_tail_drop"] > 0.2


def test_real_lenet_run_at_a_five_hundredth_of_its_rate_is_too_slow():
    """lr 1e-4: the loss falls 2.37 -> 1.73 in step with the (warmup-cosine) rate, as fast per
    unit of lr in the second half as in the first (ratio 1.2): too slow, raise the rate."""
    d = dg.diagnose_workdir(os.path.join(DATA, "lenet5_digits_lr0.0001"))
    assert d.verdicts == ["too_slow", "underfitting"]
    assert d.findings[0].recommendations[0].field == "optimizer.learning_rate"


@pytest.mark.parametrize("late_rate, plateau", [(0.4, True), (0.6, False)])
def test_plateau_ratio_compares_the_fall_per_unit_of_lr(late_rate, plateau):
    """Constant lr, loss 2.3 falling 0.1 per 100 steps to step 200, then `late_rate` x that:
    a 17-21% fall in all, too slow unless it slowed below half its first rate."""
    def loss(s):
        return 2.3 - 0.001 * min(s, 200) - 0.001 * late_rate * max(s - 200, 0)
    d = dg.diagnose(_curves(**_converged(train_loss=loss)))
    assert ("too_slow" in d.verdicts) is not plateau


def test_real_lenet_run_blown_up_within_its_first_log_is_diverged():
    """lr 5 without warmup: the first log (mean of steps 1-20) is already 248 nats and the loss
    stays in the hundreds (train top-1 ~15%) until the cosine schedule has nearly stopped (3.8
    at step 300, under max_loss). Against that first log nothing "exploded": it read as
    underfitting and still improving (eval loss 83 -> 3.4), train longer. The summary's 10
    classes put the initial loss at ln(10)."""
    d = dg.diagnose_workdir(os.path.join(DATA, "lenet5_digits_lr5_nowarmup"))
    assert d.verdicts == ["diverged"] and d.findings[0].evidence["step"] == 20
    assert "train loss 248.3 > 2 x ln(num_classes), a classifier's initial loss, 2.303" \
        in d.findings[0].message
    # Every other real run, with its 10 classes known, is judged as before.
    for name in ("lenet5_digits_lr0.05", "lenet5_digits_lr0.0005", "lenet5_digits_4pct",
                 "lenet5_digits_wd0.3", "lenet5_digits_lr0.0001"):
        records = read_metrics(os.path.join(DATA, name, "metrics.jsonl"))
        summary = dg.read_json(os.path.join(DATA, name, "summary.json"))
        plain = dg.diagnose(dg.Curves.from_records(records, summary)).verdicts
        known = dg.diagnose(dg.Curves.from_records(records, {**summary, "num_classes": 10}))
        assert known.verdicts == plain and "diverged" not in plain, name


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"diagnose: workdir='.*nowhere' is invalid; expected "
                                         r"the work directory of a run\."):
        dg.load_curves(str(tmp_path / "nowhere"))
    # A folder with none of a run's files read as a run with no logs ("insufficient_data").
    with pytest.raises(ValueError, match=r"diagnose: workdir='.*' is invalid; it holds no "
                                         r"metrics.jsonl, summary.json or config.json, not a "
                                         r"training run; expected the --workdir of one run"):
        dg.load_curves(str(tmp_path))
    (tmp_path / "sweep.json").write_text("{}")
    with pytest.raises(ValueError, match=r"it holds a sweep \(sweep.json\), not a training run; "
                                         r".*a sweep's runs are its trials/<trial_id> folders"):
        dg.load_curves(str(tmp_path))
    with pytest.raises(ValueError, match=r"diagnose: metric='acc' is invalid"):
        dg.diagnose(_curves(**_converged()), metric="acc")
    with pytest.raises(ValueError, match=r"diagnose: thresholds.spike_factor=-1 is invalid; "
                                         r"expected a positive number\."):
        dg.Thresholds(spike_factor=-1)
    with pytest.raises(ValueError, match=r"diagnose: thresholds field='spike' is invalid"):
        dg.Thresholds.from_mapping({"spike": 2})
    with pytest.raises(ValueError, match=r"thresholds.ema_weight=1.0 is invalid; expected a "
                                         r"number in \(0, 1\)"):
        dg.Thresholds(ema_weight=1.0)
    with pytest.raises(ValueError, match=r"thresholds.relapse_factor=1.0 is invalid; expected "
                                         r"a number > 1\."):
        dg.Thresholds(relapse_factor=1.0)
    with pytest.raises(ValueError, match=r"thresholds.explosion_factor=0.5 is invalid; expected "
                                         r"a number > 1\."):  # every run would have "diverged"
        dg.Thresholds(explosion_factor=0.5)
    for name in dg.TOP1_FRACTION_FIELDS:  # a percentage typed for a fraction
        with pytest.raises(ValueError, match=rf"diagnose: thresholds.{name}=90 is invalid; "
                                             r"expected a fraction of top-1 in \(0, 1\], e.g. "
                                             r"0.9 for 90%\."):
            dg.Thresholds(**{name: 90})
    assert dg.Thresholds(underfit_train_top1=1.0).underfit_train_top1 == 1.0


def test_command_line_prints_the_diagnosis():
    result = subprocess.run(
        [sys.executable, "-m", "cnnjax.tune.diagnose",
         f"--workdir={os.path.join(DATA, 'lenet5_digits_lr0.0005')}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "verdicts: underfitting" in result.stdout
    assert "-> num_train_steps x2" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--workdir=/nonexistent/run"],
     "error: diagnose: workdir='/nonexistent/run' is invalid; expected the work directory of a "
     "run."),
    ([f"--workdir={os.path.join(DATA, 'lenet5_digits_lr0.0005')}", "--metric=bogus"],
     "error: diagnose: metric='bogus' is invalid; expected one of ['loss', 'top1', 'top5',"),
])
def test_command_line_bad_input_is_one_error_line(args, message):
    result = subprocess.run([sys.executable, "-m", "cnnjax.tune.diagnose", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and not result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr


def _detection_records(map50, *, loss=None, eval_examples=500):
    """A detector's metrics.jsonl: train `loss` only (no top-1), eval mAPs (no eval loss)."""
    loss = loss or _decay(14.0, 2.0, 0.02)
    records = []
    for step in range(10, STEPS + 1, 10):
        records.append({"step": step, "split": "train", "loss": loss(step), "no_object": 0.3,
                        "learning_rate": 1e-3})
        if step % 50 == 0:
            records.append({"step": step, "split": "eval", "map50": map50(step),
                            "map": map50(step) / 3, "coco_map50": map50(step),
                            "coco_map75": map50(step) / 5, "ap50/0": map50(step),
                            "num_examples": float(eval_examples)})
    return records


@pytest.mark.parametrize("gain, improving", [(0.04, False), (0.05, True)])
def test_detection_map_gains_are_judged_against_two_binomial_standard_errors(gain, improving):
    """mAP@0.5 flat at 0.4 on 500 images (2 SE = 2 sqrt(0.4 x 0.6 / 500) = 0.0438), then up by
    `gain` at the last eval; a detector logs neither top-1 nor eval loss, so no over/underfit."""
    records = _detection_records(lambda s: 0.4 + (gain if s == STEPS else 0.0))
    curves = dg.Curves.from_records(records, {"status": "completed", "step": STEPS}, STEPS)
    d = dg.diagnose(curves, metric="map50")
    assert d.verdicts == (["still_improving"] if improving else ["converged"])
    assert d.findings[0].evidence["noise_level"] == pytest.approx(
        2 * math.sqrt(0.4 * 0.6 / 500))
    assert d.findings[0].evidence["metric"] == "map50"


def test_detection_loss_explosion_is_divergence():
    records = _detection_records(lambda s: 0.4, loss=lambda s: 14.0 if s < 200 else 40.0)
    curves = dg.Curves.from_records(records, {"status": "completed", "step": STEPS}, STEPS)
    assert dg.diagnose(curves, metric="map").primary == "diverged"


@pytest.mark.parametrize("gain, improving", [(0.04, False), (0.05, True)])
def test_segmentation_miou_gains_are_judged_like_a_fraction(gain, improving):
    """A segmentation run's eval logs loss, pixel_accuracy and miou: mIoU flat at 0.4 on 500
    images, then up by `gain` at the last eval, against the same two standard errors."""
    loss, records = _decay(1.6, 0.2, 0.02), []
    for step in range(10, STEPS + 1, 10):
        records.append({"step": step, "split": "train", "loss": loss(step),
                        "pixel_accuracy": 0.9, "learning_rate": 1e-3})
        if step % 50 == 0:
            miou = 0.4 + (gain if step == STEPS else 0.0)
            records.append({"step": step, "split": "eval", "loss": 0.35, "pixel_accuracy": 0.9,
                            "miou": miou, "iou/0": 0.9, "num_examples": 500.0})
    curves = dg.Curves.from_records(records, {"status": "completed", "step": STEPS}, STEPS)
    d = dg.diagnose(curves, metric="miou")
    assert d.verdicts == (["still_improving"] if improving else ["converged"])
    assert d.findings[0].evidence["noise_level"] == pytest.approx(
        2 * math.sqrt(0.4 * 0.6 / 500))


def test_a_workdir_is_judged_by_its_own_best_metric_and_a_missing_metric_is_named(tmp_path):
    """`diagnose_workdir(metric=None)` (the CLI's default) reads config.json's best_metric: a
    detector is judged on map50, not on a top1 it never logs."""
    records = _detection_records(lambda s: 0.4)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "step": STEPS}))
    (tmp_path / "config.json").write_text(json.dumps({"best_metric": "map50",
                                                      "num_train_steps": STEPS}))
    d = dg.diagnose_workdir(str(tmp_path))
    assert d.verdicts == ["converged"] and d.findings[0].evidence["metric"] == "map50"
    message = (rf"diagnose: metric='top1' is invalid; the run's evals in "
               rf"{re.escape(str(tmp_path / 'metrics.jsonl'))} report \['ap50/0', 'coco_map50', "
               r"'coco_map75', 'map', 'map50'\]\.$")
    with pytest.raises(ValueError, match=message):
        dg.diagnose_workdir(str(tmp_path), metric="top1")
    with pytest.raises(ValueError, match=message):
        dg.diagnose(dg.load_curves(str(tmp_path)), metric="top1")


def test_a_judged_metric_only_some_evals_of_a_file_hold_is_refused_naming_the_line(tmp_path):
    """A metric added after a resumed run's first evals (map50_voc07 from step 200 on) may be
    absent from the earlier ones, but cannot be judged over the run: refused naming the file's
    line of the first eval without it and the metrics every eval holds (it was 'eval
    map50_voc07 at step 50=nan ... a missing or NaN/inf score', without the file)."""
    records = _detection_records(_decay(0.1, 0.5, 0.01))
    for r in records:
        if r["split"] == "eval" and r["step"] >= 200:
            r["map50_voc07"] = r["map50"] - 0.01
    path = _workdir(tmp_path, records)
    message = (rf"diagnose: metric='map50_voc07' is invalid; "
               rf"{re.escape(str(tmp_path / 'metrics.jsonl'))} line 6 \(eval record of step 50\) "
               r"lacks it, which the run's other eval records hold; expected a metric every eval "
               r"reports: \['coco_map50', 'coco_map75', 'map', 'map50'\]\.$")
    with pytest.raises(ValueError, match=message):
        dg.diagnose_workdir(path, "map50_voc07")
    with pytest.raises(ValueError, match=r"diagnose: eval map50_voc07 at step 50=nan is invalid; "
                                         r"expected a finite number \(a missing or NaN/inf"):
        dg.diagnose(dg.Curves.from_records(records, {"status": "completed"}, STEPS),
                    "map50_voc07")
    assert dg.diagnose_workdir(path, "map50").verdicts == ["converged"]


def test_a_run_that_failed_before_its_first_log_is_refused_with_its_error(tmp_path):
    """A failed run without train logs was "insufficient_data: log more often", which hid the
    error that stopped it (here a batch larger than the 50-example train split)."""
    message = ("config: global_batch_size=64 is invalid; expected at most the 50 examples of the "
               "train split of 'digits' (an epoch would have no step).")
    (tmp_path / "summary.json").write_text(json.dumps(
        {"status": "failed", "error": "ValueError", "message": message}))
    with pytest.raises(ValueError, match=r"diagnose: workdir='.*' is invalid; its run failed "
                                         r"before its first train log, so there are no curves; "
                                         r"fix the error its summary.json holds and rerun it: "
                                         r"ValueError: config: global_batch_size=64 .* "
                                         r"no step\)\.$"):
        dg.diagnose_workdir(str(tmp_path))
    with pytest.raises(ValueError, match=r"diagnose: workdir=None is invalid; expected the work "
                                         r"directory of a run\."):
        dg.diagnose_workdir(None)


def test_thresholds_may_be_a_mapping_of_some_fields_and_nothing_else():
    """A dict of thresholds raised AttributeError deep inside the checks (8 evals here)."""
    curves = _curves(**_converged())
    assert dg.diagnose(curves, thresholds={"min_evals": 8}).verdicts == ["converged"]
    assert dg.diagnose(curves, thresholds={"min_evals": 9}).verdicts == ["insufficient_data"]
    with pytest.raises(ValueError, match=r"diagnose: thresholds field='spike' is invalid"):
        dg.diagnose(curves, thresholds={"spike": 2})
    with pytest.raises(ValueError, match=r"diagnose: thresholds=0.5 is invalid; expected a "
                                         r"Thresholds, a mapping of some of its fields or None"):
        dg.diagnose(curves, thresholds=0.5)


@pytest.mark.parametrize("status, steps", [("completed", 40), ("diverged", STEPS)])
def test_a_metric_the_run_does_not_report_is_named_whatever_the_verdict(status, steps):
    """A classification run diagnosed on map50 (`python -m cnnjax.tune.diagnose --metric=map50`)
    was judged anyway when it had too few train logs (insufficient_data) or diverged, so the bad
    flag went unnoticed; with enough logs the same call raised. It is refused in every case."""
    curves = _curves(status=status, steps=steps, eval_every=10, **_converged())
    with pytest.raises(ValueError, match=r"diagnose: metric='map50' is invalid; the run's evals "
                                         r"report \['loss', 'top1', 'top5'\]"):
        dg.diagnose(curves, metric="map50")
    assert dg.diagnose(curves).primary == ("insufficient_data" if status == "completed"
                                           else "diverged")


def _real_curves(name: str, drop_train: str | None = None) -> "dg.Curves":
    """The real run `name`'s curves, with `drop_train` left out of every train log."""
    records = read_metrics(os.path.join(DATA, name, "metrics.jsonl"))
    records = [{k: v for k, v in r.items() if not (r["split"] == "train" and k == drop_train)}
               for r in records]
    config = dg.read_json(os.path.join(DATA, name, "config.json"))
    return dg.Curves.from_records(records, dg.read_json(os.path.join(DATA, name, "summary.json")),
                                  config["num_train_steps"])


NO_LR_NOTE = ("no train log holds learning_rate (the training engine logs it in every one): "
              "too_slow's plateau test assumed a constant rate, so a loss that flattens as the "
              "schedule decays the rate reads as a plateau, not as too slow.")


def test_a_run_without_logged_learning_rates_says_its_plateau_test_assumed_a_constant_one():
    """lr 1e-4 with a cosine schedule is too slow; without the logged rates its flattening as the
    rate decays reads as a plateau (per step) and too_slow silently went away. The engine logs
    the rate in every train log, so the diagnosis says what it assumed."""
    logged = dg.diagnose(_real_curves("lenet5_digits_lr0.0001"))
    assert logged.verdicts == ["too_slow", "underfitting"] and logged.notes == ()
    d = dg.diagnose(_real_curves("lenet5_digits_lr0.0001", drop_train="learning_rate"))
    assert d.verdicts == ["underfitting"]
    assert d.notes == (NO_LR_NOTE,)
    assert d.format().splitlines()[-1] == f"note: {NO_LR_NOTE}"
    assert d.to_dict()["notes"] == [NO_LR_NOTE]


NO_TOP1 = ("no train log holds top1 while the evals do (the training engine logs a classifier's "
           "top-1 in both): a loss explosion was judged against the first logged loss only, not "
           "ln(num_classes)")
NO_TOP1_NOTE = NO_TOP1 + (", and overfitting's train-eval top-1 gap and underfitting were not "
                          "checked.")


@pytest.mark.parametrize("name, verdicts", [("lenet5_digits_4pct", ["converged"]),
                                            ("lenet5_digits_lr5_nowarmup", ["still_improving"]),
                                            ("lenet5_digits_lr0.0001", ["too_slow"])])
def test_a_classifier_without_train_top1_says_which_checks_it_skipped(name, verdicts):
    """Train top-1 absent from every train log while the evals hold top-1 (the engine writes a
    classifier's in both): the 4%-subset run's overfitting read as converged and lr 5's
    divergence as still improving, without a word. The verdicts stay what the curves allow, and
    the notes name the checks that could not run."""
    assert dg.diagnose(_real_curves(name)).notes == ()
    d = dg.diagnose(_real_curves(name, drop_train="top1"))
    assert d.verdicts == verdicts
    assert d.notes == (NO_TOP1_NOTE,)


def test_notes_name_only_the_checks_the_diagnosis_reached():
    """A run stopped by divergence reaches neither the plateau test nor the gap checks; one with
    too few evals the plateau test but no gap check: only what was skipped on the way is named."""
    records = [{k: v for k, v in r.items() if k not in ("top1", "learning_rate")
                or r["split"] == "eval"} for r in _records(**_converged())]
    curves = dg.Curves.from_records(records, {"status": "diverged", "step": 200}, STEPS)
    assert dg.diagnose(curves).notes == (NO_TOP1 + ".",)
    curves = dg.Curves.from_records(records, {"status": "completed"}, STEPS)
    d = dg.diagnose(curves, thresholds={"min_evals": 9})
    assert d.verdicts == ["insufficient_data"]
    assert d.notes == (NO_TOP1 + ".", NO_LR_NOTE)
    assert dg.diagnose(curves).notes == (NO_TOP1_NOTE, NO_LR_NOTE)


def test_runs_that_log_no_top1_at_all_get_no_note():
    """A detector or segmenter logs no top-1 anywhere: nothing was skipped for want of it."""
    records = _detection_records(lambda s: 0.4)
    curves = dg.Curves.from_records(records, {"status": "completed", "step": STEPS}, STEPS)
    assert dg.diagnose(curves, "map50").notes == ()


def test_curves_given_their_initial_loss_note_only_the_gap_checks():
    """Curves built with `initial_loss` (not from records) keep the ln(num_classes) reference."""
    records = [{k: v for k, v in r.items() if k != "top1" or r["split"] == "eval"}
               for r in _records(**_converged())]
    curves = dg.Curves.from_records(records, {"status": "diverged", "step": 200}, STEPS)
    assert dg.diagnose(dataclasses.replace(curves, initial_loss=math.log(10))).notes == ()
    curves = dg.Curves.from_records(records, {"status": "completed"}, STEPS)
    assert dg.diagnose(dataclasses.replace(curves, initial_loss=math.log(10))).notes == (
        "no train log holds top1 while the evals do (the training engine logs a classifier's "
        "top-1 in both): overfitting's train-eval top-1 gap and underfitting were not checked.",)


@pytest.mark.parametrize("split", ["eval", "train"])
def test_a_step_logged_twice_is_refused_naming_both_lines(tmp_path, split):
    """The engine logs each step once: a resumed run first drops the records past the checkpoint
    it resumes from (`MetricLogger(resume_step=...)`) and goes on from the step after it, so it
    never repeats one. A repeat (two files concatenated, an edit) was read as two evals of that
    step: here a last eval top-1 of 0.5 after 0.97 read as overfitting, not as a broken file."""
    records = _records(**_converged())
    first = max(i for i, r in enumerate(records) if r["split"] == split and r["step"] == 400)
    records.append({**records[first], "top1": 0.5})
    path = _workdir(tmp_path, records)
    message = (rf"diagnose: step=400 is invalid; .*metrics.jsonl line {len(records)} \({split} "
               rf"record\) repeats the {split} record of step 400 at .*metrics.jsonl line "
               rf"{first + 1}; expected one {split} record per step: the training engine writes "
               r"each once \(a resumed run drops the records past its checkpoint first\), so the "
               r"file was edited, concatenated or written by another program\.")
    with pytest.raises(ValueError, match=message):
        dg.load_curves(path)
    with pytest.raises(ValueError, match=message):
        dg.diagnose_workdir(path)
    last = len(records) - 1
    with pytest.raises(ValueError, match=rf"diagnose: step=400 is invalid; records\[{last}\] "
                                         rf"\({split} record\) repeats the {split} record of "
                                         rf"step 400 at records\[{first}\]; expected one"):
        dg.Curves.from_records(records, {"status": "completed"}, STEPS)



@pytest.mark.parametrize("value", ["abc", None, math.nan, math.inf, -0.1])
def test_a_learning_rate_that_is_no_rate_is_refused_naming_its_line(tmp_path, value):
    """The engine logs the schedule's rate, a finite number >= 0. One string, null or NaN rate
    (read as NaN) turned off the plateau test for the whole run: the weight-decay-0.3 run's
    plateau read as too_slow (lr x3) besides underfitting."""
    _assert_refused_at_step_300(tmp_path, "train", "learning_rate", value,
                                r"expected a finite number >= 0: the training engine logs the "
                                r"schedule's rate")
    records = _records(**_converged())
    next(r for r in records if r["split"] == "train" and r["step"] == 300)["learning_rate"] = value
    with pytest.raises(ValueError, match=r"diagnose: train learning_rate at step 300=.* is "
                                         r"invalid; expected a finite number >= 0"):
        dg.diagnose(dg.Curves.from_records(records, {"status": "completed"}, STEPS))

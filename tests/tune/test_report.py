"""report.md's text and tune.png from a recipe.json record: what a reader of them learns."""

import json
import os
import re

import pytest

from cnnjax.tune import report as rp


def _record(workdir, diagnosis=None):
    """A one-round, one-trial tune record whose trial ran in `workdir`."""
    trial = {"value": 0.1, "status": "completed", "best": 0.6, "best_step": 10, "final": 0.6,
             "steps": 10, "wall_time_s": 1.0, "workdir": workdir}
    best = {"value": 0.6, "step": 10, "round": 1, "trial_id": "t0", "workdir": workdir,
            "overrides": {"optimizer.learning_rate": 0.1}, "diagnosis": diagnosis}
    return {"metric": "top1", "mode": "max", "status": "converged", "reason": "done",
            "num_rounds": 1, "num_trials": 1, "trial_wall_time_s": 1.0, "best": best,
            "diagnosis": diagnosis,
            "rounds": [{"index": 1, "action": "lr_search", "reason": "first round",
                        "fixed": {}, "field": "optimizer.learning_rate", "trials": [trial],
                        "best": best, "decision": None}]}


def _write_metrics(workdir, records):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    return path


_TRAIN = [{"step": s, "split": "train", "loss": 2.0 / s, "top1": 0.1 * s, "learning_rate": 0.1}
          for s in (1, 5)]


def _eval(step, top1):
    return {"step": step, "split": "eval", "loss": 1.0, "top1": top1, "num_examples": 100}


def test_the_figure_plots_each_logged_eval_once(tmp_path):
    workdir = str(tmp_path / "t0")
    _write_metrics(workdir, [*_TRAIN, _eval(5, 0.5), _eval(10, 0.6)])
    ax_eval = rp.tune_figure(_record(workdir)).axes[1]
    assert [line.get_ydata().tolist() for line in ax_eval.lines] == [[0.5, 0.6]]


@pytest.mark.parametrize("evals, message", [
    # A concatenated file: the curve went back from step 10 to step 10 and was drawn twice.
    ([_eval(5, 0.5), _eval(10, 0.9), _eval(10, 0.6)],
     r"tune: step=10 is invalid; {path} line 5 \(eval record\) repeats the eval record of "
     r"step 10 at {path} line 4"),
    # A percent: plotted at 97 on an axis of fractions.
    ([_eval(5, 0.5), _eval(10, 97.0)],
     r"tune: top1=97\.0 is invalid; {path} line 4 \(eval record of step 10\) holds it, "
     r"expected a fraction in \[0, 1\]"),
])
def test_the_figure_refuses_a_trials_records_the_engine_never_writes(tmp_path, evals, message):
    workdir = str(tmp_path / "t0")
    path = _write_metrics(workdir, [*_TRAIN, *evals])
    with pytest.raises(ValueError, match="^" + message.format(path=re.escape(path))):
        rp.tune_figure(_record(workdir))


def test_the_report_prints_the_diagnosis_notes_recipe_json_holds(tmp_path):
    """A check the run's logs kept from running is named under the finding (and in the best
    round's), as `Diagnosis.format` prints it; a record from before notes reads as before."""
    note = "train logs without learning_rate: the plateau test assumed a constant rate"
    diagnosis = {"status": "completed", "primary": "converged", "notes": [note], "findings": [
        {"verdict": "converged", "message": "flat.", "evidence": {}, "recommendations": []}]}
    text = rp.format_report(_record(str(tmp_path), diagnosis))
    assert text.count(f"- **converged**: flat.\n- note: {note}\n") == 2
    del diagnosis["notes"]
    text = rp.format_report(_record(str(tmp_path), diagnosis))
    assert text.count("- **converged**: flat.\n") == 2 and "note:" not in text


def test_the_best_trials_overrides_say_what_they_are_relative_to(tmp_path):
    """The overrides printed for the best trial are the recipe's only; the report says where the
    rest of its config is (the tune's base config, the trial's own resolved config.json)."""
    text = rp.format_report(_record(str(tmp_path)))
    said = text.split("## Best trial", 1)[1].split("```", 1)[0]
    assert "`tune.json`" in said and "`config.json`" in said
    assert "--config.optimizer.learning_rate=0.1" in text


def test_the_report_links_tune_png_only_when_it_is_drawn(tmp_path):
    """A tune interrupted before any trial completed draws no tune.png: report.md linked it."""
    link = "](tune.png)"
    assert link in rp.format_report(_record(str(tmp_path)))
    record = _record(str(tmp_path))
    record["rounds"][0]["trials"][0]["status"] = "interrupted"
    assert not rp.has_plot(record) and link not in rp.format_report(record)

"""The tuning recipe: decisions on synthetic results (no training), the round loop with a
stand-in trainer (resume after an interruption, refusal of a changed config or recipe, bad
inputs), and one small real run of the engine."""

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
from matplotlib.colors import same_color

from cnnjax.train.logging import read_metrics
from cnnjax.train.loop import TrainingDivergedError
from cnnjax.tune import diagnose as dg
from cnnjax.tune import recipe as rc
from cnnjax.tune import regularizers as rg
from cnnjax.tune import report as rp
from cnnjax.tune import sweep as sw
from tests.train import helpers

LR, STEPS, WD = rc.LR_FIELD, rc.STEPS_FIELD, rg.WEIGHT_DECAY


def _base(**overrides):
    config = helpers.tiny_config(**overrides)
    config.lock()
    return config


def _recipe(**overrides):
    values = dict(lr_min=0.01, lr_max=1.0, num_lrs=3, round1_steps=100, max_steps=400,
                  max_rounds=4, max_trials=12, trials_per_round=3, evals_per_trial=5,
                  logs_per_trial=10)
    return rc.Recipe(**(values | overrides))


def _diagnosis(verdict):
    return dg.Diagnosis((dg.Finding(verdict, f"synthetic {verdict}", {}),), "completed")


def _row(index, value, best, *, field=LR, status="completed", workdir=None):
    return {"index": index, "trial_id": f"t{index}{value}", "overrides": {field: value},
            "status": status, "best": best if status == "completed" else None,
            "best_step": 100, "final": best, "steps": 100, "wall_time_s": 1.0, "reason": "",
            "workdir": workdir or f"w_{field}_{value}"}


def _round1(recipe, bests, statuses=None):
    plan = rc.first_round(recipe)
    statuses = statuses or ["completed"] * len(bests)
    rows = [_row(i, v, b, status=s)
            for i, (v, b, s) in enumerate(zip(plan.values, bests, statuses, strict=True))]
    return rc.RoundResult(plan, rows)


def _decide(history, recipe, verdict, base=None):
    return rc.decide(history, recipe, base or _base(), lambda *a: _diagnosis(verdict))


# ---------------------------------------------------------------------- decisions (pure)
def test_rates_tied_at_the_edge_are_a_flat_optimum_not_an_edge_to_extend():
    """A saturated metric ties every rate; the tie-break picks the lowest, which used to read
    as "the best lr is the lowest rate" and extended the grid down round after round."""
    recipe = _recipe()
    history = [_round1(recipe, [0.90, 0.97, 0.95])]
    plan = _decide(history, recipe, "still_improving").next_round
    history.append(rc.RoundResult(plan, [_row(i, v, 0.98) for i, v in enumerate(plan.values)]))
    decision = _decide(history, recipe, "converged")
    assert (decision.action, decision.status) == ("stop", "converged")
    history[-1].rows[0]["best"] = 0.99  # the lowest rate now strictly wins: extend past it
    decision = _decide(history, recipe, "converged")
    assert decision.action == "lr_search" and max(decision.next_round.values) < plan.values[0]


def test_a_lengthening_round_without_room_for_its_control_stops():
    """regularize_longer compares a regularizer with the incumbent's setting at twice the steps:
    cut to one trial, it would judge the regularizer against a shorter run."""
    recipe = _recipe(regularizers=("randaugment", "cutmix"), lengthen_regularizers=True,
                     max_rounds=8, max_trials=7)  # round 1 (3) + RandAugment (3): room for 1
    verdicts = {}
    decide = lambda h: rc.decide(  # noqa: E731
        h, recipe, _lowdata_base(), lambda w, *a: _diagnosis(verdicts.get(w, "overfitting")))
    history = [_round1(recipe, [0.5, 0.9, 0.3])]
    plan = decide(history).next_round
    rows = []
    for i, (value, best) in enumerate(zip(plan.values, [0.40, 0.45, 0.42], strict=True)):
        verdicts[f"w2_{value}"] = "too_slow"
        rows.append(_row(i, value, best, field=plan.field, workdir=f"w2_{value}"))
    history.append(rc.RoundResult(plan, rows))
    decision = decide(history)
    assert (decision.action, decision.status) == ("stop", "budget_spent")
    assert "only 1 trial(s) left, and the next round (" in decision.reason


def test_a_base_config_without_warmup_steps_is_refused_before_round_1():
    """The stabilize round sets schedule.warmup_steps: a config without it failed there."""
    import ml_collections

    config = helpers.tiny_config()
    config.schedule = ml_collections.ConfigDict({"name": "cosine"})
    config.lock()
    with pytest.raises(ValueError, match=r"parameters\['schedule.warmup_steps'\].field="):
        rc.check_tune(config, _recipe())


def test_first_round_is_a_log_spaced_lr_grid_at_the_short_budget():
    plan = rc.first_round(_recipe(lr_min=1e-3, lr_max=1.0, num_lrs=5, round1_steps=200))
    assert plan.field == LR and plan.values == (0.001, 0.00562, 0.0316, 0.178, 1.0)
    np.testing.assert_allclose(plan.values, np.geomspace(1e-3, 1.0, 5), rtol=2e-3)
    assert plan.fixed == {STEPS: 200, "log_every_steps": 20, "eval_every_steps": 40,
                          "checkpoint_every_steps": 40}  # 10 logs and 5 evals per trial


def test_converged_incumbent_inside_the_grid_stops():
    recipe = _recipe()
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "converged")
    assert d.status == "converged" and d.next_round is None
    assert d.incumbent["overrides"] == {STEPS: 100, LR: 0.1} and d.incumbent["value"] == 0.9


def test_best_lr_at_the_high_edge_extends_the_grid_upwards_below_a_diverged_rate():
    recipe = _recipe()
    d = _decide([_round1(recipe, [0.3, 0.5, 0.9])], recipe, "converged")
    assert d.action == "lr_search" and d.next_round.values == (3.16, 10.0)  # grid spacing 10x
    assert d.next_round.fixed[STEPS] == 100 and LR not in d.next_round.fixed
    # With 10.0 diverged in round 1 of another recipe, nothing at or above it is proposed.
    recipe = _recipe(lr_min=0.1, lr_max=10.0)
    d = _decide([_round1(recipe, [0.5, 0.9, None], ["completed", "completed", "diverged"])],
                recipe, "converged")
    assert d.status == "converged"  # 1.0 is not an edge: 10.0 was tried (and diverged)


def test_best_lr_at_the_low_edge_extends_downwards():
    recipe = _recipe()
    d = _decide([_round1(recipe, [0.9, 0.5, 0.3])], recipe, "still_improving")
    assert d.action == "lr_search" and d.next_round.values == (0.001, 0.00316)


def test_too_slow_at_the_low_edge_raises_the_rate_below_the_diverged_ones():
    """Every rate above the lowest diverged and the lowest learns too slowly: the edge rule
    tried 1e-4 and 3e-4 (predictably worse, a real tune's round 2 scored at chance); the
    verdict's own round raises the rate, below the lowest that diverged."""
    recipe = _recipe(lr_min=0.001, lr_max=1.0, num_lrs=4)
    history = [_round1(recipe, [0.4, None, None, None],
                       ["completed", "diverged", "diverged", "diverged"])]
    d = _decide(history, recipe, "too_slow")
    assert d.action == "lr_search" and d.next_round.values == (0.002, 0.004)
    assert "raise lr" in d.reason
    # underfitting's own round (train longer around the best lr) instead of lower rates.
    d = _decide(history, recipe, "underfitting")
    assert d.action == "train_longer" and max(d.next_round.values) >= 0.001


def test_still_improving_trains_longer_around_the_best_lr():
    recipe = _recipe()
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "still_improving")
    plan = d.next_round
    assert d.action == "train_longer" and plan.index == 2 and plan.field == LR
    assert plan.values == (0.05, 0.1, 0.2)
    assert plan.fixed == {STEPS: 200, "log_every_steps": 20, "eval_every_steps": 40,
                          "checkpoint_every_steps": 40}


def test_train_longer_is_capped_at_max_steps():
    """Twice round 1's 300 steps would be 600: the round trains max_steps=400 instead."""
    recipe = _recipe(round1_steps=300, max_steps=400)
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "still_improving")
    assert d.action == "train_longer" and d.next_round.fixed[STEPS] == 400
    assert "400 steps (was 300)" in d.reason


def test_no_rate_at_or_above_one_that_diverged_is_proposed():
    """lr 0.5 and 1.0 diverged and 0.25 learns too slowly: raising it (x2, x4) would rerun
    rates that diverged, so the tune trains longer, at rates below the lowest that diverged."""
    recipe = _recipe(lr_min=0.25, lr_max=1.0, num_lrs=3)
    history = [_round1(recipe, [0.9, None, None], ["completed", "diverged", "diverged"])]
    assert history[0].plan.values == (0.25, 0.5, 1.0)
    d = _decide(history, recipe, "too_slow")
    assert d.action == "train_longer" and d.next_round.fixed[STEPS] == 200
    assert d.next_round.values and max(d.next_round.values) < 0.5  # min of the diverged


def test_still_improving_at_max_steps_stops_with_the_budget_spent():
    recipe = _recipe(round1_steps=400)
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "still_improving")
    assert d.status == "budget_spent" and "raise recipe.max_steps" in d.reason


@pytest.mark.parametrize(("verdict", "round1_steps"), [("still_improving", 100),
                                                       ("still_improving", 400),
                                                       ("converged", 100)])
def test_the_diagnosis_quoted_in_a_reason_is_not_a_sentence_in_brackets(verdict, round1_steps):
    """The diagnosis's finding is a sentence ("... of the run."); quoted in brackets inside the
    decision's reason it printed as "(... of the run.): 80 steps" in the tune's log and
    report.md."""
    recipe = _recipe(round1_steps=round1_steps)
    message = "eval loss fell 22% (0.351 -> 0.2741) in the last 25% of the run."
    d = rc.decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, _base(),
                  lambda *a: dg.Diagnosis((dg.Finding(verdict, message, {}),), "completed"))
    assert f"({message[:-1]})" in d.reason and ".)" not in d.reason, d.reason


@pytest.mark.parametrize("verdict", ["unstable", "diverged"])
def test_unstable_incumbent_is_stabilized(verdict):
    recipe = _recipe()
    base = _base(**{"schedule.name": "warmup_cosine", "schedule.warmup_steps": 2})
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, verdict, base)
    plan = d.next_round
    assert d.action == "stabilize" and plan.values == (0.025, 0.05, 0.1)
    assert plan.fixed[rc.CLIP_FIELD] == 1.0 and plan.fixed[rc.WARMUP_FIELD] == 5  # 5% of 100 steps


@pytest.mark.parametrize("clip, expected", [(0.25, 0.25), (5.0, 1.0)])
def test_stabilize_never_loosens_the_runs_own_clip(clip, expected):
    """A base clipping at 0.25 was "stabilized" with a clip at 1, four times looser than the
    run it diagnosed; a looser clip is tightened to 1 as before."""
    recipe = _recipe()
    base = _base(**{"schedule.name": "warmup_cosine", "schedule.warmup_steps": 2,
                    "optimizer.grad_clip_norm": clip})
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "unstable", base)
    assert d.action == "stabilize" and d.next_round.fixed[rc.CLIP_FIELD] == expected
    assert d.reason.endswith(f"clip gradients at {expected:g}"), d.reason


def test_an_incumbent_whose_eval_loss_turned_nan_is_stabilized_not_stopped(tmp_path):
    """A NaN eval loss in the incumbent's metrics.jsonl is a divergence (the real diagnosis, not
    a scripted one): the tune stabilizes it instead of stopping it as converged with '+nan'."""
    records = []
    for step in range(10, 101, 10):
        records.append({"step": step, "split": "train", "loss": 2.3 * math.exp(-0.03 * step),
                        "top1": 0.99, "learning_rate": 0.1})
        if step % 20 == 0:
            records.append({"step": step, "split": "eval", "num_examples": 1000.0,
                            "loss": math.nan if step >= 80 else 0.1, "top1": 0.97})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "step": 100}))
    recipe = _recipe()
    plan = rc.first_round(recipe)
    rows = [_row(i, v, b, workdir=str(tmp_path))
            for i, (v, b) in enumerate(zip(plan.values, [0.5, 0.9, 0.3], strict=True))]
    d = rc.decide([rc.RoundResult(plan, rows)], recipe, _base())
    assert d.diagnosis.verdicts == ["diverged"] and d.action == "stabilize"
    assert "a non-finite eval loss (nan)" in d.reason and "+nan" not in d.reason


def test_a_network_the_lowest_rate_killed_gets_lower_rates_not_more_steps():
    """A tune over lr 0.5..2 (LeNet-5 relu on digits): 1.0 and 2.0 diverged and 0.5 sat at
    chance (its real metrics.jsonl). Diagnosed too_slow, the low edge was not extended and the
    tune trained longer at 0.5 to the end of its budget at 10% top-1; diagnosed as the rate's
    fault (the real diagnosis), the next round tries rates below the grid's."""
    recipe = _recipe(lr_min=0.5, lr_max=2.0, round1_steps=80, evals_per_trial=8,
                     logs_per_trial=20)
    plan = rc.first_round(recipe)
    assert plan.values == (0.5, 1.0, 2.0)
    dead = os.path.join(os.path.dirname(__file__), "data", "lenet5_digits_relu_lr0.5_dead")
    rows = [_row(0, 0.5, 0.1003, workdir=dead), _row(1, 1.0, None, status="diverged"),
            _row(2, 2.0, None, status="diverged")]
    d = rc.decide([rc.RoundResult(plan, rows)], recipe, _base())
    assert d.diagnosis.primary == "diverged" and "raise" not in d.reason
    assert d.next_round.fixed[STEPS] == 80 and min(d.next_round.values) < 0.5
    assert max(d.next_round.values) <= 0.5


def test_too_slow_raises_the_rate():
    recipe = _recipe()
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "too_slow")
    assert d.action == "lr_search" and d.next_round.values == (0.2, 0.4)


def test_overfitting_sweeps_weight_decay_then_label_smoothing():
    recipe = _recipe()
    first = _round1(recipe, [0.5, 0.9, 0.3])
    d = _decide([first], recipe, "overfitting")
    assert d.action == "regularize" and d.next_round.field == WD
    assert d.next_round.values == (0.0001, 0.001, 0.01)  # from zero weight decay
    assert d.next_round.fixed[LR] == 0.1
    second = rc.RoundResult(d.next_round, [_row(i, v, 0.85, field=WD)
                                           for i, v in enumerate(d.next_round.values)])
    d = _decide([first, second], recipe, "overfitting")  # incumbent still round 1's
    assert d.next_round.field == rg.LABEL_SMOOTHING and d.next_round.values == (0.05, 0.1, 0.2)
    base = _base(**{WD: 5e-4})
    d = rc.decide([first], recipe, base, lambda *a: _diagnosis("overfitting"))
    assert d.next_round.values == (0.0015, 0.005, 0.015)


def _lowdata_base(**overrides):
    """The ResNet-20 small-data config: every regularizer knob exists there."""
    from experiments.configs import resnet20_shapes_lowdata

    config = helpers.apply_overrides(resnet20_shapes_lowdata.get_config(), overrides)
    config.lock()
    return config


def _swept(plan, best):
    return rc.RoundResult(plan, [_row(i, v, best, field=plan.field)
                                 for i, v in enumerate(plan.values)])


def test_overfitting_walks_the_recipes_regularizers_in_order():
    recipe = _recipe(regularizers=("mixup", "randaugment", "drop_path", "cutmix"), max_rounds=6,
                     max_trials=20)
    base = _lowdata_base(**{"data.augment": False})
    history = [_round1(recipe, [0.5, 0.9, 0.3])]
    seen = []
    while True:
        d = _decide(history, recipe, "overfitting", base)
        if d.next_round is None:
            break
        seen.append((d.next_round.field, d.next_round.values, d.next_round.fixed.get(rg.AUGMENT)))
        history.append(_swept(d.next_round, 0.85))  # never beats round 1's incumbent
    assert seen == [
        (rg.MIXUP, (0.2, 0.4, 1.0), None),
        (rg.RANDAUGMENT, (1, 2, 3), True),  # RandAugment needs the base augmentation on
        (rg.DROP_PATH, (0.05, 0.1, 0.2), None),  # resnet20_cifar's default rate is 0
        (rg.CUTMIX, (0.5, 1.0, 2.0), None),
    ]
    assert d.status == "exhausted" and "recipe.regularizers=['mixup', 'randaugment', " \
        "'drop_path', 'cutmix'] has been swept or is at its strongest" in d.reason


def test_a_regularizer_that_lost_while_still_learning_gets_twice_the_steps():
    """RandAugment loses at the incumbent's 100 steps but is too_slow there: it is rerun against
    the incumbent's value at 200, then 400 steps (max_steps); only then does CutMix come."""
    recipe = _recipe(regularizers=("randaugment", "cutmix"), lengthen_regularizers=True,
                     max_rounds=8, max_trials=30)
    base = _lowdata_base()
    verdicts = {}  # workdir -> verdict; the default is overfitting

    def decide(history):
        return rc.decide(history, recipe, base,
                         lambda workdir, *a: _diagnosis(verdicts.get(workdir, "overfitting")))

    def run(plan, bests, steps):
        rows = []
        for i, (v, b) in enumerate(zip(plan.values, bests, strict=True)):
            workdir = f"w{plan.index}_{v}"
            rows.append(_row(i, v, b, field=plan.field, workdir=workdir))
            verdicts[workdir] = "too_slow" if v else "overfitting"
        assert plan.fixed[rc.STEPS_FIELD] == steps
        return rc.RoundResult(plan, rows)

    history = [_round1(recipe, [0.5, 0.9, 0.3])]
    d = decide(history)
    assert (d.action, d.next_round.field, d.next_round.values) == ("regularize", rg.RANDAUGMENT,
                                                                   (1, 2, 3))
    history.append(run(d.next_round, [0.40, 0.45, 0.42], 100))
    d = decide(history)
    assert (d.action, d.next_round.values, d.next_round.fixed[rc.STEPS_FIELD]) == (
        "regularize_longer", (0, 2), 200)
    assert "data.randaugment_layers=2 lost at 100 steps while still learning (too_slow): " \
        "compare it with 0 at 200 steps" in d.reason
    history.append(run(d.next_round, [0.95, 0.92], 200))  # the control wins again at 200
    d = decide(history)
    assert (d.action, d.next_round.values, d.next_round.fixed[rc.STEPS_FIELD]) == (
        "regularize_longer", (0, 2), 400)
    history.append(run(d.next_round, [0.96, 0.93], 400))
    d = decide(history)  # max_steps reached: the next knob, at the incumbent's 400 steps
    assert (d.action, d.next_round.field, d.next_round.fixed[rc.STEPS_FIELD]) == (
        "regularize", rg.CUTMIX, 400)
    # Without the option the recipe moves on after the first RandAugment round.
    plain = dataclasses.replace(recipe, lengthen_regularizers=False)
    assert rc.decide(history[:2], plain, base, lambda *a: _diagnosis("overfitting")) \
        .next_round.field == rg.CUTMIX


def test_a_regularizer_that_won_its_longer_round_is_not_lengthened_again():
    recipe = _recipe(regularizers=("randaugment", "cutmix"), lengthen_regularizers=True,
                     max_rounds=8, max_trials=30)
    base = _lowdata_base()
    history = [_round1(recipe, [0.5, 0.9, 0.3])]
    d = _decide(history, recipe, "overfitting", base)
    history.append(_swept(d.next_round, 0.4))
    d = rc.decide(history, recipe, base, lambda w, *a: _diagnosis(
        "too_slow" if "randaugment" in w else "overfitting"))
    assert d.action == "regularize_longer"
    plan = d.next_round  # RandAugment (2 layers... the first best) now wins at 200 steps
    history.append(rc.RoundResult(plan, [_row(0, 0, 0.91, field=plan.field, workdir="control"),
                                         _row(1, plan.values[1], 0.97, field=plan.field,
                                              workdir="ra")]))
    d = rc.decide(history, recipe, base, lambda w, *a: _diagnosis("overfitting"))
    assert (d.action, d.next_round.field) == ("regularize", rg.CUTMIX)
    assert d.next_round.fixed[rg.RANDAUGMENT] == plan.values[1]  # the winner is kept


def test_only_values_stronger_than_the_incumbents_are_lengthened():
    """RandAugment 1 wins its round (so it is the incumbent's) and 3 lost still learning: 3 is
    rerun against 1 at 200 steps; once 3 wins, nothing weaker (1) is lengthened back."""
    recipe = _recipe(regularizers=("randaugment", "cutmix"), lengthen_regularizers=True,
                     max_rounds=8, max_trials=30)
    base = _lowdata_base()
    slow = {"w2_3", "w3_1"}  # 3 at 100 steps; 1 at 200, where 3 wins (and overfits)

    def decide(history):
        return rc.decide(history, recipe, base, lambda w, *a: _diagnosis(
            "too_slow" if w in slow else "overfitting"))

    def run(plan, bests):
        rows = [_row(i, v, b, field=plan.field, workdir=f"w{plan.index}_{v}")
                for i, (v, b) in enumerate(zip(plan.values, bests, strict=True))]
        return rc.RoundResult(plan, rows)

    history = [_round1(recipe, [0.5, 0.9, 0.3])]
    history.append(run(decide(history).next_round, [0.95, 0.93, 0.94]))  # 1 / 2 / 3 layers
    d = decide(history)
    assert (d.action, d.next_round.values, d.next_round.fixed[rc.STEPS_FIELD]) == (
        "regularize_longer", (1, 3), 200)
    history.append(run(d.next_round, [0.96, 0.98]))  # 3 wins at 200 steps
    d = decide(history)
    assert (d.action, d.next_round.field, d.next_round.fixed[rg.RANDAUGMENT]) == (
        "regularize", rg.CUTMIX, 3)


def test_a_divergence_under_other_settings_does_not_cap_the_incumbents_lr():
    """Weight decay 1e-2 diverges at the incumbent's lr 0.1; the incumbent (no weight decay)
    still trains longer at lr 0.1 and 0.2."""
    recipe = _recipe()
    first = _round1(recipe, [0.5, 0.9, 0.3])
    d = _decide([first], recipe, "overfitting")
    rows = [_row(i, v, 0.8, field=WD, status="diverged" if v == 0.01 else "completed")
            for i, v in enumerate(d.next_round.values)]
    d = _decide([first, rc.RoundResult(d.next_round, rows)], recipe, "still_improving")
    assert d.action == "train_longer" and d.next_round.values == (0.05, 0.1, 0.2)


def test_label_smoothing_is_only_turned_up():
    stronger = rg.REGULARIZERS["label_smoothing"].stronger
    assert (stronger(0.0), stronger(0.05), stronger(0.2), stronger(0.3)) == (
        (0.1, 0.2, 0.05), (0.1, 0.2, 0.3), (0.3,), ())


def test_a_knob_already_on_is_turned_up_and_one_at_its_strongest_is_skipped():
    recipe = _recipe(regularizers=("augment", "mixup", "drop_path"))
    base = _lowdata_base(**{"mixing.mixup_alpha": 0.3, "model_kwargs.drop_path_rate": 0.75})
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "overfitting", base)
    assert d.next_round.field == rg.MIXUP and d.next_round.values == (0.6, 1.2)  # augment is on
    assert rg.REGULARIZERS["drop_path"].stronger(0.75) == (0.85,)  # rates stay below 0.9
    assert rg.REGULARIZERS["drop_path"].stronger(0.8) == ()
    assert rg.REGULARIZERS["dropout"].stronger(0.5) == (0.6, 0.7)  # AlexNet's default
    assert rg.REGULARIZERS["randaugment"].stronger(2) == (3, 4)
    assert rg.REGULARIZERS["randaugment"].stronger(9) == (10,)  # the pipeline's cap
    assert rg.REGULARIZERS["randaugment"].stronger(10) == ()


def test_the_default_regularizers_are_the_original_three():
    assert rc.Recipe().regularizers == rg.DEFAULT_REGULARIZERS == (
        "weight_decay", "label_smoothing", "augment")
    assert rc.Recipe(regularizers="mixup, cutmix").regularizers == ("mixup", "cutmix")
    assert rc.Recipe(regularizers=("mixup,",)).regularizers == ("mixup",)
    assert rc.Recipe(regularizers="").regularizers == ()  # no knob: an overfit stops the tune
    assert rc.Recipe.from_config(rc.default_recipe()).regularizers == rg.DEFAULT_REGULARIZERS


@pytest.mark.parametrize(("regularizers", "message"), [
    (("mixup", "dropuot"), "recipe: regularizers='dropuot' is invalid; expected one of "
                           "['weight_decay', 'label_smoothing', 'augment', 'randaugment', "
                           "'mixup', 'cutmix', 'drop_path', 'dropout']."),
    (("mixup", "mixup"), "recipe: regularizers=('mixup', 'mixup') is invalid; expected each name "
                         "at most once."),
    (3, "recipe: regularizers=3 is invalid; expected a sequence of names"),
    ((3,), "recipe: regularizers=3 is invalid; expected one of ['weight_decay'"),
])
def test_bad_regularizer_lists(regularizers, message):
    with pytest.raises(ValueError) as err:
        _recipe(regularizers=regularizers)
    assert message in str(err.value)


def test_regularizers_are_checked_on_the_base_as_round_1_trains_it():
    """A base of 5 steps with a 30-step warmup is valid for a tune (round 1 trains
    round1_steps=100), but the regularizer check ran on the raw base and blamed
    'weight_decay' for the warmup."""
    import runpy

    base = runpy.run_path("experiments/configs/lenet5_digits.py")["get_config"]()
    recipe = runpy.run_path("experiments/recipes/lenet5_digits.py")["get_config"]()
    base.num_train_steps = 5
    recipe.regularizers = ("weight_decay",)
    _, plan = rc.check_tune(base, recipe)
    assert plan.base_config(base).num_train_steps == 100


def test_regularizers_that_do_not_fit_the_base_config_are_refused_before_training():
    with pytest.raises(ValueError, match=r"recipe: regularizers='drop_path' is invalid; it sweeps "
                                         r"model_kwargs.drop_path_rate, which the base config "
                                         r"lacks \(model 'test_tiny_bn_cnn' has no such field"):
        rg.check_regularizers(_recipe(regularizers=("drop_path",)), _base())
    from experiments.configs import yolo_shapes

    with pytest.raises(ValueError, match=r"recipe: regularizers='cutmix' is invalid; it needs "
                                         r"class labels \(config.task='classification', not "
                                         r"'detection'\)"):
        rg.check_regularizers(_recipe(regularizers=("cutmix",)), yolo_shapes.get_config())
    every_but_dropout = tuple(n for n in rg.REGULARIZERS if n != "dropout")
    rg.check_regularizers(_recipe(regularizers=every_but_dropout), _lowdata_base())
    with pytest.raises(ValueError, match=r"regularizers='dropout' is invalid; it sweeps "
                                         r"model_kwargs.dropout_rate, which the base config lacks "
                                         r"\(model 'resnet20_cifar' has no such field"):
        rg.check_regularizers(_recipe(regularizers=("dropout",)), _lowdata_base())
    from experiments.configs import alexnet_imagenette

    rg.check_regularizers(_recipe(regularizers=("dropout",)), alexnet_imagenette.get_config())
    rg.check_regularizers(_recipe(regularizers=("augment",)), _base())  # optional: skipped


def test_underfitting_with_a_plateaued_train_loss_lowers_weight_decay_at_once():
    """A train loss that flattened at a high rate (weight decay 0.3 on LeNet-5/digits) is not
    short of steps: training twice as long, the underfitting rule's first move, would not help."""
    recipe = _recipe()  # round 1 at 100 of max_steps 800
    plateau = dg.Diagnosis((dg.Finding("underfitting", "synthetic", {
        "train_loss_plateaued": True}),), "completed")
    base = _base(**{WD: 0.3})
    d = rc.decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, base, lambda *a: plateau)
    assert d.action == "less_regularization" and d.next_round.values == (0.03, 0.09)
    assert "underfits with a plateaued train loss" in d.reason
    assert _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "underfitting",
                   base).action == "train_longer"  # without the plateau: as before


def test_underfitting_without_weight_decay_says_why_it_stops():
    """No weight decay left to lower: the tune stops. It said "underfits at max_steps" also
    when the stop came from a plateaued train loss at 100 of max_steps 400 (seen on
    lenet5_digits with --config.optimizer.weight_decay=0: "at max_steps" at 40 of 80)."""
    recipe = _recipe()  # round 1 at 100 of max_steps 400
    plateau = dg.Diagnosis((dg.Finding("underfitting", "synthetic", {
        "train_loss_plateaued": True}),), "completed")
    d = rc.decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, _base(**{WD: 0.0}),
                  lambda *a: plateau)
    assert d.status == "exhausted" and d.next_round is None
    assert "underfits with a plateaued train loss and no weight decay" in d.reason
    assert "max_steps" not in d.reason
    at_max = _recipe(round1_steps=400)
    d = _decide([_round1(at_max, [0.5, 0.9, 0.3])], at_max, "underfitting", _base(**{WD: 0.0}))
    assert d.status == "exhausted" and "underfits at max_steps with no weight decay" in d.reason


def test_underfitting_at_max_steps_lowers_weight_decay():
    recipe = _recipe(round1_steps=400)
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "underfitting", _base(**{WD: 1e-3}))
    assert d.action == "less_regularization" and d.next_round.values == (0.0001, 0.0003)


def test_nothing_completed_stops_with_no_result():
    recipe = _recipe()
    d = _decide([_round1(recipe, [None] * 3, ["diverged"] * 3)], recipe, "converged")
    assert d.status == "no_result" and d.incumbent is None and "lr_min" in d.reason


def test_budgets_trim_and_stop():
    recipe = _recipe(max_trials=4)
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "still_improving")
    assert d.next_round.values == (0.1,)  # 1 trial left: the incumbent's lr comes first
    recipe = _recipe(max_trials=3)
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "still_improving")
    assert d.status == "budget_spent" and "max_trials=3" in d.reason
    recipe = _recipe(max_rounds=1)
    d = _decide([_round1(recipe, [0.5, 0.9, 0.3])], recipe, "still_improving")
    assert d.status == "budget_spent" and "max_rounds=1" in d.reason


def test_a_round_of_configs_already_run_is_not_proposed_again():
    recipe = _recipe()
    first = _round1(recipe, [0.5, 0.9, 0.3])
    d = _decide([first], recipe, "too_slow")
    second = rc.RoundResult(d.next_round, [_row(i, v, 0.1)
                                           for i, v in enumerate(d.next_round.values)])
    d = _decide([first, second], recipe, "too_slow")  # lr 0.2, 0.4 ran: train longer instead
    assert d.action == "train_longer" and d.next_round.fixed[STEPS] == 200


def test_incumbent_ties_go_to_the_later_round():
    recipe = _recipe()
    first = _round1(recipe, [0.5, 0.9, 0.3])
    plan = rc.RoundPlan(2, "train_longer", "", {STEPS: 200}, LR, (0.1,))
    second = rc.RoundResult(plan, [_row(0, 0.1, 0.9, workdir="later")])
    assert rc.incumbent([first, second], "max")[1]["workdir"] == "later"
    assert rc.incumbent([first, second], "min")[1]["best"] == 0.3


@pytest.mark.parametrize("kwargs, message", [
    ({"lr_min": 0.0}, "recipe: lr_min=0.0 is invalid; expected a positive finite learning rate."),
    ({"lr_min": 1.0, "lr_max": 0.1}, "recipe: lr_min=1.0 is invalid; expected lr_min < lr_max "
                                     "(lr_max=0.1)."),
    ({"num_lrs": 1}, "recipe: num_lrs=1 is invalid; expected an integer >= 2."),
    ({"max_trials": 2}, "recipe: max_trials=2 is invalid; expected at least num_lrs=3"),
    # checked before the grid is built: np.geomspace of 10**20 rates raised "Maximum allowed
    # size exceeded" naming no field (2**40: an 8 TiB allocation)
    ({"num_lrs": 10**20}, "recipe: max_trials=12 is invalid; expected at least "
                          "num_lrs=100000000000000000000 (round 1's trials)."),
    ({"num_lrs": 10**20, "max_trials": 10**20},
     "recipe: num_lrs=100000000000000000000 is invalid; lr_min=0.01..lr_max=1.0 holds fewer "
     "distinct rates at 3 significant digits (at most 3600); widen the range or lower num_lrs."),
    ({"metric": "acc"}, "recipe: metric='acc' is invalid; expected an eval metric of one of the "
                        "tasks: ['loss', 'top1', 'top5', 'map50', 'map', 'coco_map50', "
                        "'coco_map75', 'map50_voc07', 'pixel_accuracy', 'miou'], one of them "
                        "prefixed 'ema_' (a "
                        "weight average's) or None (the base config's best_metric)."),
    ({"mode": "up"}, "recipe: mode='up' is invalid; expected one of ['max', 'min']."),
    ({"metric": "ema_loss", "mode": "max"},
     "recipe: mode='max' is invalid; expected 'min' for metric='ema_loss' (lower is better)"),
    ({"max_steps": 50}, "recipe: max_steps=50 is invalid; expected max_steps >= "
                        "round1_steps=100."),
    ({"evals_per_trial": 2}, "recipe: evals_per_trial=2 is invalid; expected an integer >= 3."),
    ({"round1_steps": 1.5}, "recipe: round1_steps=1.5 is invalid; expected an integer >= 1."),
    ({"round1_steps": 4}, "recipe: round1_steps=4 is invalid; expected >= 5: round 1's trials "
                          "must log at least thresholds.min_train_logs=5 times"),
    ({"lr_min": 0.1, "lr_max": 0.1004}, "recipe: num_lrs=3 is invalid; lr_min=0.1..lr_max=0.1004 "
                                        "holds fewer distinct rates at 3 significant digits "
                                        "((0.1, 0.1, 0.1))"),
    # a long grid is summarized, not listed point by point
    ({"lr_min": 1e-3, "lr_max": 1.001e-3, "num_lrs": 200, "max_trials": 300},
     "recipe: num_lrs=200 is invalid; lr_min=0.001..lr_max=0.001001 holds fewer distinct rates "
     "at 3 significant digits ((0.001, 0.001, 0.001, ..., 0.001): 200 rates, 1 distinct); "
     "widen the range or lower num_lrs."),
])
def test_bad_recipe_values(kwargs, message):
    with pytest.raises(ValueError) as err:
        _recipe(**kwargs)
    assert message in str(err.value)


def test_recipe_config_fields_are_checked():
    config = rc.default_recipe()
    assert rc.Recipe.from_config(config) == rc.Recipe()
    with pytest.raises(ValueError, match=r"recipe: field='lr' is invalid; expected one of"):
        rc.Recipe.from_config({"lr": 0.1})
    with pytest.raises(ValueError, match=r"^recipe: thresholds field='gap' is invalid"):
        rc.Recipe.from_config({"thresholds": {"gap": 0.1}})
    # A bad value is named as its flag is (--recipe.thresholds.overfit_gap), not as diagnose's.
    with pytest.raises(ValueError, match=r"^recipe: thresholds.overfit_gap=2 is invalid; expected "
                                         r"a fraction of top-1"):
        rc.Recipe.from_config({"thresholds": {"overfit_gap": 2}})
    with pytest.raises(ValueError, match=r"^diagnose: thresholds.overfit_gap=2 is invalid"):
        dg.as_thresholds({"overfit_gap": 2})
    assert rc.Recipe.from_config({"thresholds": {"overfit_gap": 0.1}}).thresholds.overfit_gap \
        == 0.1


# ------------------------------------------------------------ the round loop, stand-in trainer
class FakeTrainer:
    """Writes what the engine writes (config.json, metrics.jsonl, summary.json) for a made-up
    response: top-1 peaks at lr 0.1, grows with steps, +0.01 with weight decay >= 1e-3; lr >= 3
    diverges. `interrupt_at` raises KeyboardInterrupt on that call (1-based), as Ctrl-C would."""

    def __init__(self, interrupt_at=None):
        self.calls = []
        self.interrupt_at = interrupt_at

    def __call__(self, config, workdir):
        self.calls.append(workdir)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort())
        lr, steps = config.optimizer.learning_rate, config.num_train_steps
        if lr >= 3:
            _dump(os.path.join(workdir, "summary.json"), {"status": "diverged", "step": 3})
            raise TrainingDivergedError(3, math.nan)
        quality = math.exp(-math.log10(lr / 0.1) ** 2)
        final = 0.5 + 0.3 * quality + 0.02 * math.log2(steps / 100)
        final += 0.01 * (config.optimizer.weight_decay >= 1e-3)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for step in range(config.eval_every_steps, steps + 1, config.eval_every_steps):
                f.write(json.dumps({"step": step, "split": "train",
                                    "loss": 2.3 * math.exp(-3 * step / steps)}) + "\n")
                f.write(json.dumps({"step": step, "split": "eval", "loss": 1 - final,
                                    "top1": round(final * step / steps, 6)}) + "\n")
        _dump(os.path.join(workdir, "summary.json"),
              {"status": "completed", "step": steps, "final_eval": {"top1": final}})
        return {}


def _dump(path, record):
    with open(path, "w") as f:
        json.dump(record, f)


def _scripted_diagnosis(workdir, metric, thresholds):
    """Short runs are still improving; 200+ steps overfit unless weight decay >= 1e-3."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    if config["num_train_steps"] < 200:
        return _diagnosis("still_improving")
    return _diagnosis("overfitting" if config["optimizer"]["weight_decay"] < 1e-3
                      else "converged")


def _tune(tmp_path, monkeypatch, trainer, name="tune", base=None, plots=False, **recipe):
    helpers.install_fake_pipeline(monkeypatch)  # check_config reads the (synthetic) dataset
    monkeypatch.setattr(sw, "train_and_evaluate", trainer)
    monkeypatch.setattr(sw, "plot_results", lambda *a, **k: None)  # slower than the trainer
    if not plots:
        monkeypatch.setattr(rp, "plot_tune", lambda *a, **k: None)
    return rc.run_tune(base or _base(), _recipe(**recipe), str(tmp_path / name), verbose=False,
                       diagnose_fn=_scripted_diagnosis)


def _without_times(record):
    text = json.dumps(record)
    record = json.loads(text)
    record.pop("wall_time_s")
    record.pop("total_wall_time_s")
    record.pop("trial_wall_time_s")
    for r in record["rounds"]:
        for t in r["trials"]:
            t.pop("wall_time_s")
    return record


@pytest.fixture(scope="module")
def whole_tune(tmp_path_factory):
    """One uninterrupted tune of the default recipe (stand-in trainer, tune.png drawn), with
    the index of each round whose configs `_check_round` checked: the tests of its rounds read
    it, and the interrupted tunes' reruns must reproduce its record. Returns (record, tune_dir,
    trainer, checked)."""
    trainer, checked = FakeTrainer(), []
    real_check = rc._check_round
    tmp_path = tmp_path_factory.mktemp("whole_tune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rc, "_check_round",
                   lambda base, plan: (checked.append(plan.index), real_check(base, plan)))
        record = _tune(tmp_path, mp, trainer, plots=True)
    return record, tmp_path / "tune", trainer, checked


def _as_if_in(record, tune_dir, reference_dir):
    """`record` without its times, and with `reference_dir` in its paths read as `tune_dir`."""
    text = json.dumps(_without_times(record))
    return json.loads(text.replace(str(reference_dir), str(tune_dir)))


def test_rounds_follow_the_diagnosis_until_converged(whole_tune):
    record, tune_dir, trainer, _ = whole_tune
    rounds = record["rounds"]
    assert [r["action"] for r in rounds] == ["lr_search", "train_longer", "regularize"]
    assert [r["values"] for r in rounds] == [[0.01, 0.1, 1.0], [0.05, 0.1, 0.2],
                                             [0.0001, 0.001, 0.01]]
    assert rounds[1]["fixed"][STEPS] == 200 and rounds[2]["fixed"][LR] == 0.1
    assert [r["decision"]["action"] for r in rounds] == ["train_longer", "regularize", "stop"]
    assert record["status"] == "converged" and record["num_trials"] == 9
    best = record["best"]
    # 0.5 + 0.3 + 0.02 * log2(2) + 0.01: lr 0.1, 200 steps, wd 1e-3 (tie with 1e-2: lower index).
    assert best["value"] == pytest.approx(0.83) and best["round"] == 3
    assert best["overrides"] == {STEPS: 200, LR: 0.1, WD: 0.001}
    assert record["diagnosis"]["primary"] == "converged"
    assert json.loads((tune_dir / "recipe.json").read_text()) == record
    report = (tune_dir / "report.md").read_text()
    assert "**Status:** converged" in report and "## Round 3: regularize" in report
    assert "--config.num_train_steps=200 --config.optimizer.learning_rate=0.1 " \
           "--config.optimizer.weight_decay=0.001" in report
    assert os.path.getsize(tune_dir / "tune.png") > 1000
    for k in (1, 2, 3):  # every round is an ordinary sweep directory
        assert (tune_dir / f"round_{k}" / "results.csv").exists()
    assert len(trainer.calls) == 9
    fig = rp.tune_figure(record)
    ax_lr, ax_eval, ax_loss = fig.axes
    assert ax_lr.get_xscale() == "log" and ax_loss.get_yscale() == "log"
    rings = [c for c in ax_lr.collections if c.get_label() == "best"]
    assert [tuple(c.get_offsets()[0]) for c in rings] == [(0.1, pytest.approx(0.83))]
    points = np.concatenate([c.get_offsets() for c in ax_lr.collections if c not in rings])
    assert sorted(map(tuple, points.tolist())) == sorted(
        ({**r["fixed"], r["field"]: t["value"]}[LR], t["best"])
        for r in rounds for t in r["trials"])
    assert len(ax_eval.lines) == len(ax_loss.lines) == 9
    black = [line for line in ax_eval.lines if same_color(line.get_color(), "black")]
    assert len(black) == 1 and black[0].get_ydata()[-1] == pytest.approx(0.83)


def test_each_rounds_configs_are_checked_once_round_1_before_anything_runs(whole_tune):
    """`run_tune` checks round 1 before taking the lock; the loop checks each later round before
    it trains, and does not check round 1 again."""
    record, _, _, checked = whole_tune
    assert [r["index"] for r in record["rounds"]] == [1, 2, 3]
    assert checked == [1, 2, 3]


def test_interrupted_tune_resumes_without_rerunning_finished_trials(tmp_path, monkeypatch,
                                                                    whole_tune):
    """Ctrl-C in round 2: the rerun runs only the unfinished trials and ends with the record of
    a tune never interrupted; a third run trains nothing."""
    reference, reference_dir, _, _ = whole_tune
    trainer = FakeTrainer(interrupt_at=5)  # round 2's second trial
    with pytest.raises(KeyboardInterrupt):
        _tune(tmp_path, monkeypatch, trainer)
    saved = json.loads((tmp_path / "tune" / "recipe.json").read_text())
    assert saved["status"] == "interrupted" and saved["num_rounds"] == 1
    # the round it stopped in is recorded and reported (report.md listed round 1 only)
    second = reference["rounds"][1]
    assert saved["running_round"] == {k: second[k] for k in saved["running_round"]}
    assert saved["running_round"]["index"] == 2 and saved["running_round"]["dir"] == "round_2"
    report = (tmp_path / "tune" / "report.md").read_text()
    assert (f"## Round 2: {second['action']} (stopped before it finished)\n\n{second['reason']}"
            "\n\nIts sweep `round_2/` keeps the trials that finished" in report)
    done = trainer.calls[:4]
    trainer = FakeTrainer()
    record = _tune(tmp_path, monkeypatch, trainer)
    assert not set(trainer.calls) & set(done)  # finished trials were not run again
    assert len(trainer.calls) == 5  # the interrupted one, round 2's last and round 3's three
    strip = lambda r: _as_if_in(r, tmp_path / "tune", reference_dir)  # noqa: E731
    assert strip(record) == strip(reference)
    trainer = FakeTrainer()
    assert strip(_tune(tmp_path, monkeypatch, trainer)) == strip(reference)
    assert trainer.calls == []  # a finished tune trains nothing


def test_recipe_json_sums_the_wall_time_of_every_invocation(tmp_path, monkeypatch):
    """`wall_time_s` is this invocation's; `total_wall_time_s` adds the earlier ones' (recipe.json
    had only the last invocation's, so a tune resumed three times looked seconds long)."""
    trainer = FakeTrainer(interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        _tune(tmp_path, monkeypatch, trainer)
    path = tmp_path / "tune" / "recipe.json"
    saved = json.loads(path.read_text())
    assert saved["total_wall_time_s"] == saved["wall_time_s"] > 0
    saved["total_wall_time_s"] = 1000.0  # as if the first invocation had run that long
    path.write_text(json.dumps(saved))
    record = _tune(tmp_path, monkeypatch, FakeTrainer())
    assert record["status"] == "converged" and 0 < record["wall_time_s"] < 1000
    assert record["total_wall_time_s"] == pytest.approx(1000.0 + record["wall_time_s"])
    # A recipe.json from before the total existed: its wall_time_s was all it had.
    del record["total_wall_time_s"]
    record["wall_time_s"] = 50.0
    path.write_text(json.dumps(record))
    again = _tune(tmp_path, monkeypatch, FakeTrainer())
    assert again["total_wall_time_s"] == pytest.approx(50.0 + again["wall_time_s"])


def test_the_tunes_total_wall_time_is_never_below_its_trials(tmp_path, monkeypatch):
    """A SIGKILLed invocation is counted up to its last write of recipe.json, while the trial
    it killed counts its training up to its last checkpoint: the rerun's total (73.7 s) came
    out below the trials' 81.2 s. Here the killed invocation's record says 0 s and the trial
    it stopped 500 s."""
    with pytest.raises(KeyboardInterrupt):
        _tune(tmp_path, monkeypatch, FakeTrainer(interrupt_at=5))
    tune_dir = tmp_path / "tune"
    path = tune_dir / "recipe.json"
    saved = json.loads(path.read_text())
    saved["total_wall_time_s"] = 0.0
    path.write_text(json.dumps(saved))
    stopped = [t for t in (tune_dir / "round_2" / "trials").glob("*/trial.json")
               if json.loads(t.read_text())["status"] == "interrupted"]
    assert len(stopped) == 1
    trial = json.loads(stopped[0].read_text())
    stopped[0].write_text(json.dumps({**trial, "wall_time_s": 500.0}))
    record = _tune(tmp_path, monkeypatch, FakeTrainer())
    assert record["status"] == "converged" and 500 < record["trial_wall_time_s"] < 600
    assert record["total_wall_time_s"] == record["trial_wall_time_s"] > record["wall_time_s"]


def test_a_sigterm_between_rounds_stops_the_tune_before_the_next_round_trains(tmp_path,
                                                                               monkeypatch,
                                                                               whole_tune):
    """SIGTERM while the tune plans round 2 (no run holds a handler then): the default used to
    kill it with recipe.json still "running" (here a caller's handler took the signal and round
    2 trained). Now round 2's first trial stops before training and recipe.json says
    interrupted; the rerun finishes as an uninterrupted tune."""
    import signal

    from cnnjax.train.preemption import TrainingInterrupted

    reference, reference_dir, _, _ = whole_tune
    decide = rc.decide

    def decide_then_sigterm(history, *args, **kwargs):
        decision = decide(history, *args, **kwargs)
        if len(history) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return decision

    trainer = FakeTrainer()
    monkeypatch.setattr(rc, "decide", decide_then_sigterm)
    with helpers.sigterm_fallback() as caught, pytest.raises(TrainingInterrupted):
        _tune(tmp_path, monkeypatch, trainer)
    assert caught == [] and len(trainer.calls) == 3  # round 1 only
    saved = json.loads((tmp_path / "tune" / "recipe.json").read_text())
    assert saved["status"] == "interrupted" and "SIGTERM" in saved["reason"]
    monkeypatch.setattr(rc, "decide", decide)
    strip = lambda r: _as_if_in(r, tmp_path / "tune", reference_dir)  # noqa: E731
    assert strip(_tune(tmp_path, monkeypatch, FakeTrainer())) == strip(reference)


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """The tune_dir of a default tune (stand-in trainer) stopped by max_rounds=2; each test
    that changes or resumes it works on its own copy (`_two_rounds_in`)."""
    tmp_path = tmp_path_factory.mktemp("two_rounds")
    with pytest.MonkeyPatch.context() as mp:
        record = _tune(tmp_path, mp, FakeTrainer(), max_rounds=2)
    assert record["num_rounds"] == 2
    return tmp_path / "tune"


def _two_rounds_in(tmp_path, two_rounds):
    """A copy of the `two_rounds` tune as `tmp_path / "tune"` (the rounds' results are read
    from their own directories wherever they are)."""
    shutil.copytree(two_rounds, tmp_path / "tune")


def test_changed_base_config_or_recipe_is_refused(tmp_path, monkeypatch, two_rounds):
    _two_rounds_in(tmp_path, two_rounds)
    trainer = FakeTrainer()
    with pytest.raises(ValueError) as err:
        _tune(tmp_path, monkeypatch, trainer, base=_base(global_batch_size=32), max_rounds=2)
    assert (f"recipe: tune_dir={str(tmp_path / 'tune')!r} was created with a different base "
            "config (global_batch_size: 16 -> 32); to start fresh use a new --tune_dir") \
        in str(err.value)
    with pytest.raises(ValueError, match=r"different recipe \(lr_max: 1.0 -> 3.0\)"):
        _tune(tmp_path, monkeypatch, trainer, lr_max=3.0, max_rounds=2)
    with pytest.raises(ValueError, match=r"different recipe \(thresholds.overfit_gap: 0.05 -> "
                                         r"0.1\); to start fresh"):
        _tune(tmp_path, monkeypatch, trainer, max_rounds=2,
              thresholds=dg.Thresholds(overfit_gap=0.1))
    assert trainer.calls == []
    # Only max_rounds may change: a larger one continues the finished tune.
    record = _tune(tmp_path, monkeypatch, trainer, max_rounds=4)
    assert record["status"] == "converged" and record["num_rounds"] == 3
    assert len(trainer.calls) == 3
    # A smaller one rewrote recipe.json and report.md without the rounds past it, still on disk.
    with pytest.raises(ValueError, match=r"^recipe: max_rounds=2 is invalid; tune_dir=.* holds "
                                         r"round 3 already, .* expected at least 3\.$"):
        _tune(tmp_path, monkeypatch, trainer, max_rounds=2)
    assert len(trainer.calls) == 3
    assert _tune(tmp_path, monkeypatch, trainer, max_rounds=3)["num_rounds"] == 3


def test_a_tune_dir_from_before_regularizers_resumes_with_the_default_knobs(tmp_path,
                                                                             monkeypatch,
                                                                             two_rounds):
    _two_rounds_in(tmp_path, two_rounds)
    path = tmp_path / "tune" / rc.TUNE_FILE
    saved = json.loads(path.read_text())
    assert saved["recipe"].pop("regularizers") == list(rg.DEFAULT_REGULARIZERS)
    assert saved["recipe"].pop("lengthen_regularizers") is False
    assert saved["recipe"]["thresholds"].pop("plateau_ratio") == 0.5  # nor these thresholds
    assert saved["recipe"]["thresholds"].pop("jump_noise_factor") == 5.0
    path.write_text(json.dumps(saved))  # as an older cnnjax wrote it
    trainer = FakeTrainer()
    with pytest.raises(ValueError, match=r"different recipe \(regularizers: \['weight_decay', "
                                         r"'label_smoothing', 'augment'\] -> \['label_smoothing'"
                                         r"\]\)"):
        _tune(tmp_path, monkeypatch, trainer, max_rounds=2, regularizers=("label_smoothing",))
    _tune(tmp_path, monkeypatch, trainer, max_rounds=2)
    assert trainer.calls == []


def test_a_tune_dir_with_the_old_rise_noise_factor_name_resumes(tmp_path, monkeypatch,
                                                                two_rounds):
    """thresholds.jump_noise_factor was rise_noise_factor (12fddea): such a tune.json resumes,
    and a different value under the old name is still a different recipe."""
    _two_rounds_in(tmp_path, two_rounds)
    path = tmp_path / "tune" / rc.TUNE_FILE
    saved = json.loads(path.read_text())
    thresholds = saved["recipe"]["thresholds"]
    thresholds["rise_noise_factor"] = thresholds.pop("jump_noise_factor")
    path.write_text(json.dumps(saved))
    trainer = FakeTrainer()
    _tune(tmp_path, monkeypatch, trainer, max_rounds=3)
    assert trainer.calls and all("round_3" in call for call in trainer.calls)  # resumed
    saved = json.loads(path.read_text())
    saved["recipe"]["thresholds"]["rise_noise_factor"] = 3.0
    del saved["recipe"]["thresholds"]["jump_noise_factor"]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"thresholds\.jump_noise_factor: 3\.0 -> 5\.0"):
        _tune(tmp_path, monkeypatch, FakeTrainer(), max_rounds=3)


def test_bad_inputs_fail_before_anything_is_written(tmp_path, monkeypatch):
    trainer = FakeTrainer()
    base = _base(**{"schedule.name": "warmup_cosine", "schedule.warmup_steps": 150})
    # The recipe's round1_steps is what the user changes: the message names it too.
    with pytest.raises(ValueError, match=r"^recipe: round 1 trains the base config with "
                                         r"num_train_steps=100, .* \(from recipe.round1_steps=100, "
                                         r".*\), which it refuses: schedule: warmup_steps=150 is "
                                         r"invalid; expected 0 <= warmup_steps < "
                                         r"num_train_steps=100"):
        _tune(tmp_path, monkeypatch, trainer, base=base)
    # A base config that is invalid whatever the steps is its own fault, not the recipe's: the
    # message blamed recipe.round1_steps for --config.optimizer.learning_rate=-1.
    with pytest.raises(ValueError, match=r"^optimizer: learning_rate=-1.0 is invalid"):
        _tune(tmp_path, monkeypatch, trainer, base=_base(**{LR: -1.0}))
    with pytest.raises(ValueError, match=r"^schedule: name='cosin' is invalid"):
        rc.check_tune(_base(**{"schedule.name": "cosin"}), _recipe())
    with pytest.raises(ValueError, match=r"recipe: num_lrs=0 is invalid"):
        rc.run_tune(_base(), {"num_lrs": 0}, str(tmp_path / "tune"))
    assert trainer.calls == [] and not (tmp_path / "tune").exists()


def test_a_tune_dir_another_driver_holds_is_refused_untouched(tmp_path, monkeypatch):
    trainer = FakeTrainer()
    with (helpers.locked_by_another_process(tmp_path / "tune"),
          pytest.raises(ValueError, match=r"^tune_dir: .* is in use by another run .*"
                                          r"pass a different --tune_dir\.$")):
        _tune(tmp_path, monkeypatch, trainer)
    assert trainer.calls == [] and os.listdir(tmp_path / "tune") == ["run.lock"]


def test_diverged_and_failed_trials(tmp_path, monkeypatch):
    """lr 10 diverges (a result: the tune goes on); a crashing trial stops the tune as failed
    and the rerun retries it."""
    record = _tune(tmp_path, monkeypatch, FakeTrainer(), lr_min=0.1, lr_max=10.0, max_rounds=1)
    assert [t["status"] for t in record["rounds"][0]["trials"]] == ["completed", "completed",
                                                                     "diverged"]
    assert record["status"] == "budget_spent"
    ax_lr = rp.tune_figure(record).axes[0]
    crosses = [c for c in ax_lr.collections
               if len(c.get_facecolor()) and same_color(c.get_facecolor()[0], "tab:red")]
    lowest = min(t["best"] for t in record["rounds"][0]["trials"] if t["best"] is not None)
    assert [tuple(c.get_offsets()[0]) for c in crosses] == [(10.0, lowest)]  # at the bottom
    by_loss = {**record, "metric": "loss", "mode": "min"}  # a loss ranks the other way round
    crosses = [c for c in rp.tune_figure(by_loss).axes[0].collections
               if len(c.get_facecolor()) and same_color(c.get_facecolor()[0], "tab:red")]
    highest = max(t["best"] for t in record["rounds"][0]["trials"] if t["best"] is not None)
    assert [tuple(c.get_offsets()[0]) for c in crosses] == [(10.0, highest)]  # at the top

    def crash(config, workdir):
        raise RuntimeError("out of memory")

    record = _tune(tmp_path, monkeypatch, crash, name="crash")
    assert record["status"] == "failed" and "out of memory" in record["reason"]
    assert "rerun the command to retry" in record["reason"]
    record = _tune(tmp_path, monkeypatch, FakeTrainer(), name="crash")
    assert record["status"] == "converged"


# --------------------------------------------------------------------- one real small run
def test_real_engine_tune_on_the_tiny_model(tmp_path, monkeypatch):
    """One round of two trials on the engine's test model and synthetic data (~1 s each): the
    record agrees with each trial's own metrics.jsonl and a rerun trains nothing."""
    helpers.install_fake_pipeline(monkeypatch)
    monkeypatch.setattr(sw, "plot_results", lambda *a, **k: None)  # tune.png is drawn
    recipe = rc.Recipe(lr_min=0.01, lr_max=0.3, num_lrs=2, round1_steps=12, max_steps=24,
                       max_rounds=1, max_trials=2, evals_per_trial=3, logs_per_trial=6)
    tune_dir = str(tmp_path / "tune")
    record = rc.run_tune(_base(), recipe, tune_dir, verbose=False)
    assert record["num_trials"] == 2 and record["rounds"][0]["values"] == [0.01, 0.3]
    assert record["status"] in ("converged", "budget_spent", "exhausted")
    bests = []
    for r in record["rounds"]:
        for t in r["trials"]:
            assert t["status"] == "completed"
            evals = [x for x in read_metrics(os.path.join(t["workdir"], "metrics.jsonl"))
                     if x["split"] == "eval"]
            assert t["best"] == max(x["top1"] for x in evals)
            bests.append(t["best"])
    assert record["best"]["value"] == max(bests)
    first = record["rounds"][0]
    assert first["best"]["diagnosis"]["primary"] in dg.VERDICTS
    decision = record["rounds"][0]["decision"]
    assert decision["diagnosis"] == first["best"]["diagnosis"]  # round 1's best is the incumbent
    assert decision["incumbent"]["overrides"][LR] == first["best"]["overrides"][LR]
    summaries = {t["workdir"]: os.stat(os.path.join(t["workdir"], "summary.json")).st_mtime_ns
                 for r in record["rounds"] for t in r["trials"]}
    again = rc.run_tune(_base(), recipe, tune_dir, verbose=False)
    assert _without_times(again) == _without_times(record)
    assert os.path.getsize(os.path.join(tune_dir, "tune.png")) > 1000
    assert {w: os.stat(os.path.join(w, "summary.json")).st_mtime_ns for w in summaries} \
        == summaries


def test_an_error_between_rounds_is_recorded_before_it_propagates(tmp_path, monkeypatch):
    def broken(workdir, metric, thresholds):
        raise OSError("metrics.jsonl unreadable")

    helpers.install_fake_pipeline(monkeypatch)
    monkeypatch.setattr(sw, "train_and_evaluate", FakeTrainer())
    monkeypatch.setattr(sw, "plot_results", lambda *a, **k: None)
    with pytest.raises(OSError, match="unreadable"):
        rc.run_tune(_base(), _recipe(), str(tmp_path / "tune"), verbose=False,
                    diagnose_fn=broken)
    saved = json.loads((tmp_path / "tune" / "recipe.json").read_text())
    assert saved["status"] == "failed" and saved["num_rounds"] == 1
    assert saved["reason"] == ("failed (OSError: metrics.jsonl unreadable); rerun the command to "
                               "continue")


def test_the_default_regularizers_leave_label_smoothing_out_where_there_are_no_class_labels():
    """The engine refuses label_smoothing for detection and segmentation (their losses have no
    class-label smoothing), so the default recipe skips it there; a list naming it is refused."""
    from experiments.configs import yolo_shapes

    base = yolo_shapes.get_config()
    assert rg.task_regularizers(rg.DEFAULT_REGULARIZERS, "detection") == ("weight_decay",
                                                                         "augment")
    assert rg.task_regularizers(rg.DEFAULT_REGULARIZERS, "classification") == \
        rg.DEFAULT_REGULARIZERS
    rg.check_regularizers(_recipe(), base)  # the default list: fine
    with pytest.raises(ValueError, match=r"recipe: regularizers='label_smoothing' is invalid; "
                                         r"it needs class labels \(config.task='classification', "
                                         r"not 'detection'\)"):
        rg.check_regularizers(_recipe(regularizers=("label_smoothing",)), base)
    recipe = _recipe()
    first = _round1(recipe, [0.5, 0.9, 0.3])
    d = _decide([first], recipe, "overfitting", base=base)
    assert d.next_round.field == WD
    second = _swept(d.next_round, 0.85)
    d = _decide([first, second], recipe, "overfitting", base=base)
    # weight decay swept and data.augment already on: nothing left (no label smoothing round)
    assert d.action == "stop" and d.next_round is None and base.data.augment


@pytest.mark.parametrize("name, overrides, reason", [
    ("mixup", {"mixing.prob": 0.0}, "mixing.prob=0 never mixes a batch"),
    ("cutmix", {"mixing.prob": 0.0}, "mixing.prob=0 never mixes a batch"),
    ("mixup", {"mixing.cutmix_alpha": 1.0, "mixing.switch_prob": 1.0},
     "mixing.cutmix_alpha > 0 with mixing.switch_prob=1 always picks CutMix"),
    ("cutmix", {"mixing.mixup_alpha": 0.2, "mixing.switch_prob": 0.0},
     "mixing.mixup_alpha > 0 with mixing.switch_prob=0 always picks mixup"),
])
def test_a_mixing_knob_the_base_config_never_applies_is_refused(name, overrides, reason):
    """Turning up an alpha that `mix_batch` never uses (prob 0, or switch_prob pinned to the
    other method) would train every trial as the incumbent: refused before training, not swept.
    The same knobs pass where they take effect (switch_prob strictly between 0 and 1, or the
    other method off)."""
    field = rg.MIXUP if name == "mixup" else rg.CUTMIX
    with pytest.raises(ValueError) as err:
        rg.check_regularizers(_recipe(regularizers=(name,)), _base(**overrides))
    assert str(err.value) == (
        f"recipe: regularizers={name!r} is invalid; it sweeps {field}, which the base config "
        f"never applies ({reason}), so every trial would train as the incumbent does.")
    rg.check_regularizers(_recipe(regularizers=(name,)), _base(**{"mixing.switch_prob": 0.0}
                                                               if name == "mixup" else {}))
    rg.check_regularizers(_recipe(regularizers=(name,)), _base(**{"mixing.switch_prob": 1.0}
                                                               if name == "cutmix" else {}))


def _fcn_base(model):
    """The Pets segmentation config on FCN `model`, its model_kwargs declared and unset."""
    from cnnjax.train.config import model_kwargs_config
    from experiments.configs import fcn_pets

    config = fcn_pets.get_config()
    config.model = model
    config.model_kwargs = model_kwargs_config(model)
    config.lock()
    return config


def test_the_dropout_knob_turns_up_the_rate_fcn_vgg16_trains_with():
    """FCN's unset dropout_rate is the paper's 0.5 on VGG-16. The knob read the None as off and
    proposed 0.3, 0.5 and 0.1 as stronger, and the lengthening filter (None the weakest) agreed;
    it now reads the model's effective rate. A ResNet-backbone FCN (no dropout) stays refused."""
    base = _fcn_base("fcn8s_vgg16")
    assert rg.knob_value(base, {}, rg.DROPOUT) == 0.5
    recipe = _recipe(regularizers=("dropout",), lengthen_regularizers=True, max_rounds=8,
                     max_trials=30)
    rg.check_regularizers(recipe, base)
    history = [_round1(recipe, [0.5, 0.9, 0.3])]
    d = _decide(history, recipe, "overfitting", base)
    assert (d.action, d.next_round.field, d.next_round.values) == (
        "regularize", rg.DROPOUT, (0.6, 0.7))
    # Both rates lost still learning; 0.3 (weaker than the incumbent's 0.5) scored higher but is
    # not the regularizer to rerun longer: 0.6 is, against the incumbent's 0.5.
    plan = dataclasses.replace(d.next_round, values=(0.3, 0.6))
    history.append(rc.RoundResult(plan, [_row(0, 0.3, 0.85, field=rg.DROPOUT),
                                         _row(1, 0.6, 0.8, field=rg.DROPOUT)]))
    d = rc.decide(history, recipe, base, lambda w, *a: _diagnosis(
        "too_slow" if w.startswith(f"w_{rg.DROPOUT}") else "overfitting"))
    assert (d.action, d.next_round.values) == ("regularize_longer", (0.5, 0.6))
    assert f"{rg.DROPOUT}=0.6 lost at 100 steps while still learning" in d.reason
    with pytest.raises(ValueError, match=r"^recipe: regularizers='dropout' is invalid; the base "
                                         r"config with \{'model_kwargs.dropout_rate': 0.3\} is "
                                         r"refused \(FCN: dropout_rate=0.3 is invalid; the "
                                         r"resnet18 backbone has no dropout"):
        rg.check_regularizers(_recipe(regularizers=("dropout",)), _fcn_base("fcn8s_resnet18"))


def test_a_drop_path_knob_a_plain_network_refuses_is_refused_before_round_1():
    """A network without shortcuts refuses drop_path_rate > 0 (no residual branch to drop):
    `validate_config` never builds the model, so the knob passed and the tune died when its
    round's `check_config` ran, after round 1 had trained. Now the model is constructed (no
    parameters initialized) with the knob's first value; the residual twin still passes. The
    registered plain nets pin drop_path_rate, so their configs do not declare it at all."""
    from cnnjax.train.config import model_kwargs_config

    def base(model, **model_kwargs):
        config = helpers.tiny_config(model=model)
        config.model_kwargs = model_kwargs_config(model)
        config.model_kwargs.update(model_kwargs)
        config.lock()
        return config

    with pytest.raises(ValueError) as err:
        rg.check_regularizers(_recipe(regularizers=("drop_path",)),
                              base("resnet18", shortcut="none"))
    assert str(err.value).startswith(
        "recipe: regularizers='drop_path' is invalid; the base config with "
        "{'model_kwargs.drop_path_rate': 0.1} is refused (ResNet: drop_path_rate=0.1 is "
        "invalid; expected 0 with shortcut='none'")
    rg.check_regularizers(_recipe(regularizers=("drop_path",)), base("resnet18"))
    with pytest.raises(ValueError, match=r"it sweeps model_kwargs.drop_path_rate, which the "
                                         r"base config lacks \(model 'plain20_cifar' has no "
                                         r"such field"):
        rg.check_regularizers(_recipe(regularizers=("drop_path",)), base("plain20_cifar"))
    rg.check_regularizers(_recipe(regularizers=("drop_path",)), base("resnet20_cifar"))


def test_recipe_thresholds_may_be_a_mapping_of_some_fields():
    """Recipe(thresholds={...}) raised AttributeError in its own checks (from_config took it)."""
    assert rc.Recipe(thresholds={"overfit_gap": 0.1}).thresholds == dg.Thresholds(overfit_gap=0.1)
    with pytest.raises(ValueError, match=r"^recipe: thresholds=3 is invalid; expected a "
                                         r"Thresholds, a mapping of some of its fields or None"):
        rc.Recipe(thresholds=3)


def test_numpy_bool_switches_are_kept_as_python_bools():
    """check_bool takes np.bool_ since session 50; the recipe kept it as given, and describe()
    (tune.json, recipe.json) then failed: "Object of type bool is not JSON serializable"."""
    recipe = _recipe(lengthen_regularizers=np.True_, lr_range_test=np.False_)
    assert recipe.lengthen_regularizers is True and recipe.lr_range_test is False
    assert json.loads(json.dumps(recipe.describe()))["lengthen_regularizers"] is True

"""A sweep, a tuning recipe's checks and a diagnosis of a real detection run, ranked by mAP.

The runs use the engine's own detection test data (1-2 coloured squares per 16x16 image, in
memory) and its tiny YOLO, so a trial is a few seconds of the real `train_and_evaluate`."""

import dataclasses
import os

import pytest

from cnnjax.train.logging import read_metrics
from cnnjax.tune import diagnose as dg
from cnnjax.tune import recipe as rc
from cnnjax.tune import space as sp
from cnnjax.tune import sweep as sw
from cnnjax.utils import files
from tests.train.test_detection_loop import _config, fake_detection_data  # noqa: F401


def test_detection_sweep_ranks_trials_by_map50_and_diagnoses_on_it(tmp_path, monkeypatch):
    """A diverging and a learning tiny-YOLO trial: ranked by their best eval map50 (the config's
    best_metric), and the diagnosis judges the run on the mAP."""
    # sweep.png (drawn after each trial, not checked here) is tested in tests/tune/test_sweep.py
    monkeypatch.setattr(sw, "plot_results", lambda *args, **kwargs: None)
    base = _config(num_train_steps=12, eval_every_steps=4)
    base.lock()
    space = sp.grid({"optimizer.learning_rate": [1e3, 3e-3]})
    sweep_dir = str(tmp_path / "sweep")
    rows = sw.run_sweep(base, space, sweep_dir, verbose=False)  # metric: its best_metric map50
    assert [(r["status"], r["rank"]) for r in rows] == [("completed", 1), ("diverged", None)]
    evals = [r for r in read_metrics(os.path.join(rows[0]["workdir"], "metrics.jsonl"))
             if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert rows[0]["best"] == max(r["map50"] for r in evals)  # the best eval map50
    results = files.read_json(os.path.join(sweep_dir, sw.RESULTS_JSON))
    assert (results["metric"], results["mode"]) == ("map50", "max")
    diagnosis = dg.diagnose_workdir(rows[0]["workdir"], "map50",
                                    dg.Thresholds(min_evals=3, min_train_logs=5))
    print(diagnosis.format())
    tail = [f for f in diagnosis.findings if f.verdict in ("still_improving", "converged")]
    assert len(tail) == 1 and tail[0].evidence["metric"] == "map50"  # judged on the mAP
    assert not {"overfitting", "underfitting"} & set(diagnosis.verdicts)  # no top-1, eval loss


def test_tuning_recipe_ranks_detection_by_its_metrics(tmp_path):
    base = _config()
    recipe = rc.Recipe(metric="top1", lr_min=1e-3, lr_max=1e-2, num_lrs=2, round1_steps=12,
                       max_steps=12, max_trials=2)
    with pytest.raises(ValueError, match=r"recipe: metric='top1' is invalid; expected one of "
                                         r"\['map50', 'map', 'coco_map50', 'coco_map75', "
                                         r"'map50_voc07'\] \(the eval metrics of "
                                         r"config.task='detection'\)"):
        rc.run_tune(base, recipe, str(tmp_path / "tune"), verbose=False)
    assert not os.path.exists(tmp_path / "tune")
    assert rc.Recipe(metric="map").mode == "max"
    unset = rc.Recipe(mode="min")  # metric unset: the base config's best_metric, mode kept
    assert (unset.metric, unset.mode) == (None, "min")
    assert rc.Recipe().for_config(base) == dataclasses.replace(rc.Recipe(), metric="map50",
                                                               mode="max")
    with pytest.raises(ValueError, match=r"^recipe: mode='min' is invalid; expected 'max' for "
                                         r"metric='map50' \(higher is better\)"):
        unset.for_config(base)  # the best_metric it resolves to is a higher-is-better mAP

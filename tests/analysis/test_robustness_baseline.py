"""`robustness.corruption_errors`: Hendrycks & Dietterich's (un)normalized corruption errors
(CE, mCE, relative mCE) of one record against a baseline's, on hand-made numbers."""

import json

import numpy as np
import pytest

from cnnjax.analysis import corruptions as C
from cnnjax.analysis import robustness as R
from cnnjax.analysis.corruptions import VALIDATION_CORRUPTIONS

SETTINGS = {"source": "on_the_fly", "split": "test", "seed": 0, "max_examples": None,
            "step": 40, "clean": "uint8"}


def _record(clean, cells, **settings):
    record = {"workdir": "/runs/x", "model": "m", "clean_top1": clean, "cells": cells,
              "settings": {**SETTINGS, **settings},
              "requested": {"corruptions": list(cells), "severities": [1, 2]}}
    return R.summarize(record)


MODEL = {**_record(0.9, {"fog": {"1": 0.8, "2": 0.6}, "contrast": {"1": 0.7, "2": 0.5}}),
         "dataset": "cifar10", "num_examples": 10000,
         "parameters": {"fog": [[0.2, 3.0], [0.5, 3.0], [0.75, 2.5], [1.0, 2.0], [1.5, 1.75]]}}
BASE = {**_record(0.8, {"fog": {"1": 0.6, "2": 0.4}, "contrast": {"1": 0.5, "2": 0.3}}, step=7),
        "dataset": "cifar10", "num_examples": 10000}


def test_the_papers_formulas_on_hand_numbers():
    """E = 1 - top-1. fog: CE = (0.2 + 0.4) / (0.4 + 0.6) = 0.6; relative CE = ((0.2 - 0.1) +
    (0.4 - 0.1)) / ((0.4 - 0.2) + (0.6 - 0.2)) = 0.4 / 0.6. contrast: CE = (0.3 + 0.5) /
    (0.5 + 0.7) = 0.8 / 1.2; relative CE = (0.2 + 0.4) / (0.3 + 0.5) = 0.75."""
    errors = R.corruption_errors(MODEL, BASE)
    assert errors["corruption_error"] == pytest.approx({"fog": 0.6, "contrast": 0.8 / 1.2})
    assert errors["relative_corruption_error"] == pytest.approx({"fog": 0.4 / 0.6,
                                                                 "contrast": 0.75})
    assert errors["mce"] == pytest.approx((0.6 + 0.8 / 1.2) / 2)
    assert errors["relative_mce"] == pytest.approx((0.4 / 0.6 + 0.75) / 2)
    assert errors["baseline"] == {"workdir": "/runs/x", "model": "m", "step": 7}
    assert R.corruption_errors(BASE, BASE)["mce"] == pytest.approx(1.0)  # by definition


def test_the_benchmark_mce_leaves_out_the_papers_validation_corruptions():
    """Hendrycks & Dietterich hold out speckle_noise, gaussian_blur, spatter and saturate for
    validation; their mCE averages the benchmark corruptions. mce averages all requested ones.
    speckle_noise: CE = (0.5 + 0.7) / (0.6 + 0.8) = 1.2 / 1.4."""
    cells = {"fog": {"1": 0.8, "2": 0.6}, "speckle_noise": {"1": 0.5, "2": 0.3}}
    model = {**_record(0.9, cells), "dataset": "cifar10", "num_examples": 10000}
    base = {**_record(0.8, {"fog": {"1": 0.6, "2": 0.4}, "speckle_noise": {"1": 0.4, "2": 0.2}}),
            "dataset": "cifar10", "num_examples": 10000}
    errors = R.corruption_errors(model, base)
    assert errors["mce"] == pytest.approx((0.6 + 1.2 / 1.4) / 2)
    assert errors["benchmark_corruptions"] == ["fog"]
    assert errors["benchmark_mce"] == pytest.approx(0.6)
    assert errors["benchmark_relative_mce"] == pytest.approx(0.4 / 0.6)
    shown = R.table({**model, "severities": [1, 2], "baseline_errors": errors})
    assert "over the 1 benchmark corruptions" in shown and "mCE 0.6000" in shown
    only_validation = R.corruption_errors(
        {**model, "cells": {"speckle_noise": cells["speckle_noise"]},
         "requested": {"corruptions": ["speckle_noise"], "severities": [1, 2]}}, base)
    assert only_validation["benchmark_mce"] is None and only_validation["mce"] is not None
    assert MODEL["requested"]["corruptions"] == R.corruption_errors(MODEL, BASE)[
        "benchmark_corruptions"]  # fog and contrast are both benchmark corruptions


def test_the_validation_corruptions_are_the_papers_four():
    """Hendrycks & Dietterich (Section 3) hold out speckle noise, gaussian blur, spatter and
    saturate: a record of those four and fog has fog as its only benchmark corruption."""
    assert VALIDATION_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    names = ["speckle_noise", "gaussian_blur", "spatter", "saturate", "fog"]
    model = {**_record(0.9, {n: {"1": 0.8, "2": 0.6} for n in names}),
             "dataset": "cifar10", "num_examples": 10000}
    base = {**_record(0.8, {n: {"1": 0.6, "2": 0.4} for n in names}),
            "dataset": "cifar10", "num_examples": 10000}
    errors = R.corruption_errors(model, base)
    assert errors["benchmark_corruptions"] == ["fog"]
    assert errors["benchmark_mce"] == pytest.approx(0.6)  # (0.2 + 0.4) / (0.4 + 0.6)


def test_an_error_free_baseline_leaves_that_ratio_undefined():
    perfect = _record(1.0, {"fog": {"1": 1.0, "2": 1.0}, "contrast": {"1": 0.5, "2": 0.3}})
    errors = R.corruption_errors(MODEL, perfect)
    assert errors["corruption_error"]["fog"] is None and errors["mce"] is None
    assert errors["relative_mce"] is None
    assert errors["corruption_error"]["contrast"] == pytest.approx(0.8 / 1.2)


def test_a_relative_ce_whose_baseline_errors_cancel_is_undefined_not_huge():
    """A baseline on 359 images with clean top-1 300/359 and fog cells 299/359 and 301/359:
    its relative CE's denominator is exactly 0 (in images), where float rates left a residue
    of ~1e-17 and a relative CE of ~1e14. The table says why each undefined value is."""
    n = 359
    cells = {"fog": {"1": 299 / n, "2": 301 / n}}
    model = {**_record(250 / n, {"fog": {"1": 200 / n, "2": 210 / n}}), "num_examples": n}
    base = {**_record(300 / n, cells), "num_examples": n}
    errors = R.corruption_errors(model, base)
    assert errors["relative_corruption_error"]["fog"] is None and errors["relative_mce"] is None
    assert errors["mce"] == pytest.approx((159 + 149) / (60 + 58))
    text = R.table({**model, "severities": [1, 2], "baseline_errors": errors})
    assert (f"mCE {errors['mce']:.4f}, relative mCE n/a (a corruption whose baseline errors "
            "average its clean error)") in text
    perfect = {**_record(1.0, {"fog": {"1": 1.0, "2": 1.0}}), "num_examples": n}
    text = R.table({**model, "severities": [1, 2],
                    "baseline_errors": R.corruption_errors(model, perfect)})
    assert "mCE n/a (a corruption the baseline classifies without error)" in text


@pytest.mark.parametrize(("baseline", "message"), [
    (_record(0.8, {"fog": {"1": 0.6, "2": 0.4}}),
     "the baseline lacks cells contrast severity 1, contrast severity 2"),
    (_record(0.8, {"fog": {"1": 0.6, "2": 0.4}, "contrast": {"1": 0.5, "2": 0.3}}, seed=1),
     "measured with other settings (seed: 0 here, 1 there)"),
    (_record(0.8, {"fog": {"1": 0.6, "2": 0.4}, "contrast": {"1": 0.5, "2": 0.3}},
             max_examples=100, split="train"),
     "(split: 'test' here, 'train' there; max_examples: None here, 100 there)"),
    # The same split name and seed on another dataset were compared (an mCE across datasets).
    ({**BASE, "dataset": "digits", "num_examples": 360},
     "(dataset: 'cifar10' here, 'digits' there; num_examples: 10000 here, 360 there)"),
    ({**BASE, "parameters": {"fog": [[1.5, 2.0]] * 5, "contrast": [0.75] * 5}},
     "fog's parameters: [[0.2, 3.0], [0.5, 3.0], [0.75, 2.5], [1.0, 2.0], [1.5, 1.75]] here, "
     "[[1.5, 2.0], [1.5, 2.0], [1.5, 2.0], [1.5, 2.0], [1.5, 2.0]] there"),
    # Cells corrupted from other images (the unquantized pixels, in older records).
    ({**BASE, "settings": {**BASE["settings"], "clean": "uint8, corrupted from it"}},
     "(clean: 'uint8' here, 'uint8, corrupted from it' there)"),
])
def test_a_baseline_of_other_images_or_cells_is_refused(baseline, message):
    with pytest.raises(ValueError, match=r"^robustness: baseline=") as err:
        R.corruption_errors(MODEL, baseline)
    assert message in str(err.value)


def test_a_refused_baseline_is_named_as_it_was_given():
    """A baseline given as its record's JSON path was named by the workdir stored inside it."""
    other = {**BASE, "dataset": "digits"}
    with pytest.raises(ValueError, match=r"^robustness: baseline='/tmp/b/robustness\.json' is "
                                         r"invalid; it was measured with other settings"):
        R.corruption_errors(MODEL, other, "/tmp/b/robustness.json")
    with pytest.raises(ValueError, match=r"^robustness: baseline='/runs/x' is invalid"):
        R.corruption_errors(MODEL, other)  # without it: the record's own workdir
    assert R.corruption_errors(MODEL, BASE, "/tmp/b/robustness.json")["baseline"]["workdir"] == (
        "/runs/x")


def test_an_incomplete_record_has_no_errors_yet():
    partial = R.summarize({**MODEL, "requested": {"corruptions": ["fog", "contrast", "snow"],
                                                  "severities": [1, 2]}})
    with pytest.raises(ValueError, match=r"^robustness: record='/runs/x' is invalid; it is "
                                         r"incomplete \(4 of 6 requested cells measured\); "):
        R.corruption_errors(partial, BASE)


@pytest.mark.parametrize("baseline, shown", [
    (["not", "a", "record"], "baseline=<class 'list'> is invalid; expected a robustness record "
                             "(a dict)."),
    ({"cells": {}}, "baseline=['cells'] is invalid; expected a robustness record (with 'cells' "
                    "and 'clean_top1'); it lacks 'clean_top1'."),
    ({}, "baseline=[] is invalid; expected a robustness record (with 'cells' and 'clean_top1'); "
         "it lacks 'cells' and 'clean_top1'."),
])
def test_a_baseline_that_is_no_record_is_named_by_what_it_is(baseline, shown):
    """The error showed the literal 'a dict' for any value, a list included."""
    with pytest.raises(ValueError) as err:
        R.corruption_errors(MODEL, baseline)
    assert str(err.value) == f"robustness: {shown}"


def test_the_baseline_is_read_from_a_workdir_or_a_json_file(tmp_path):
    folder = tmp_path / "alexnet" / "robustness"
    folder.mkdir(parents=True)
    (folder / "robustness_seed1.json").write_text(json.dumps(BASE))
    for given in (tmp_path / "alexnet", folder / "robustness_seed1.json"):
        assert R.read_baseline(str(given), "robustness_seed1.json") == BASE
    with pytest.raises(ValueError, match=r"^robustness: baseline='.*' is invalid; it has no "
                                         r"robustness/robustness\.json: run experiments\."
                                         r"robustness on the baseline run first, with the same "
                                         r"flags"):
        R.read_baseline(str(tmp_path / "alexnet"), "robustness.json")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"is not a robustness record"):
        R.read_baseline(str(tmp_path / "bad.json"), "robustness.json")


# ------------------------------------------------------------------ a cell, chunk by chunk
def test_a_cells_top1_counts_every_chunks_images():
    """3 + 1 images, all classified 0: chunk 1 gets 2 of 3 right, chunk 2 its 1, so the cell is
    3 / 4 (not the last chunk's count as the denominator)."""
    chunks = [(np.zeros((3, 1)), np.array([0, 0, 1])), (np.zeros((1, 1)), np.array([0]))]
    assert R._top1(lambda pixels: np.zeros(len(pixels), int), chunks) == 0.75


def test_on_the_fly_chunks_draw_each_images_own_noise(monkeypatch):
    """Chunks of 2 of 5 stored images: concatenated, they are one `corrupt` call on all 5,
    stored as uint8 (each chunk's images draw the noise of their index in the split)."""
    monkeypatch.setattr(R, "_CHUNK", 2)
    clean = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(5)
    chunks = list(R._cell_chunks(None, clean, labels, "gaussian_noise", 3, 0, None, None))
    assert [len(chunk_labels) for _, chunk_labels in chunks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([pixels for pixels, _ in chunks]),
                                  C.quantize(C.corrupt(clean, "gaussian_noise", 3, 0)))
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in chunks]), labels)

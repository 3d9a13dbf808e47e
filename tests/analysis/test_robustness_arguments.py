"""`run_robustness`'s argument checks, made before the run is loaded: the shared integer checks
(a NumPy integer accepted and passed on as a Python int, whose record JSON holds it)."""

import json

import numpy as np
import pytest

from cnnjax.analysis import robustness as R


def test_numpy_integers_are_accepted_and_passed_on_as_python_ints():
    levels, max_examples, batch_size, seed = R._check_arguments(
        "1,3", np.int64(8), np.int32(16), np.int64(3), "on_the_fly")
    assert (levels, max_examples, batch_size, seed) == ([1, 3], 8, 16, 3)
    assert all(type(v) is int for v in (max_examples, batch_size, seed))
    # The record's settings hold them: json.dumps refuses a NumPy integer.
    assert json.dumps({"seed": seed, "max_examples": max_examples}) == (
        '{"seed": 3, "max_examples": 8}')
    assert R._file_stem("on_the_fly", None, seed, max_examples, None) == "robustness_seed3_max8"


def test_split_slices_have_files_of_their_own(tmp_path):
    """test[:50%], test[50%:], test[:50] and test[50:] all read `test-50-` in a file name: one
    file, each slice's measurement moved aside by the next, then overwritten."""
    stems = {split: R._file_stem("on_the_fly", split, 0, None, None)
             for split in ("test[:50%]", "test[50%:]", "test[:50]", "test[50:]")}
    assert len(set(stems.values())) == 4
    assert stems["test[:50%]"].startswith("robustness_split-test-50-")
    assert R._file_stem("on_the_fly", "test", 0, None, None) == "robustness_split-test"


def test_a_record_of_other_settings_is_kept_without_replacing_one_kept_before(tmp_path):
    stem, messages = "robustness", []
    for seed, step in ((0, 5), (1, 5), (2, 5)):  # each moved aside as the step-5 record
        (tmp_path / f"{stem}.json").write_text(json.dumps(
            {"step": step, "settings": {"seed": seed, "step": step}}))
        (tmp_path / f"{stem}.png").write_text(str(seed))
        assert R._previous_record(str(tmp_path), stem, {"seed": 9, "step": 5},
                                  messages.append) == {}
    kept = {name: json.loads((tmp_path / f"{name}.json").read_text())["settings"]["seed"]
            for name in ("robustness_step5", "robustness_step5_2", "robustness_step5_3")}
    assert kept == {"robustness_step5": 0, "robustness_step5_2": 1, "robustness_step5_3": 2}
    assert (tmp_path / "robustness_step5_3.png").read_text() == "2"
    assert not (tmp_path / f"{stem}.json").exists()
    assert "was measured with other settings (seed: 0 there, 9 here)" in messages[0]


def test_a_numpy_seed_passes_to_the_run_check(tmp_path):
    """The arguments are checked first: a np.int64 seed gets as far as the missing run."""
    with pytest.raises(ValueError, match=r"^load_trained: workdir='.*none' is invalid; expected "
                                         r"the --workdir of a training run"):
        R.run_robustness(str(tmp_path / "none"), seed=np.int64(3))


@pytest.mark.parametrize("seed", [True, -1, 1.0, "3", None])
def test_a_seed_that_is_no_integer_at_least_0_is_refused_before_the_run_is_read(tmp_path, seed):
    with pytest.raises(ValueError, match=rf"^robustness: seed={seed!r} is invalid; expected an "
                                         r"integer >= 0\.$"):
        R.run_robustness(str(tmp_path / "none"), seed=seed)

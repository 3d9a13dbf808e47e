"""`cnnjax.train.trained`'s split overlap: which examples two tfds split strings share, checked
against example indices written out by hand, and `check_temperature_split` on real `digits`."""

from __future__ import annotations

import itertools

import ml_collections
import pytest
import tensorflow_datasets as tfds

from cnnjax.train.config import default_config
from cnnjax.train.trained import TrainedRun, _overlap, check_temperature_split

# A small dataset: train is 10 examples in shards of 4 and 6, test is 7 in one shard.
SPLITS = {"train": tfds.core.SplitInfo(name="train", shard_lengths=[4, 6], num_bytes=0),
          "test": tfds.core.SplitInfo(name="test", shard_lengths=[7], num_bytes=0)}


def _train(*indices: int) -> set[tuple[str, int]]:
    return {("train", i) for i in indices}


def _test(*indices: int) -> set[tuple[str, int]]:
    return {("test", i) for i in indices}


# Each spec with the examples it reads, by hand (percent boundaries round to the closest index,
# halves to even, as tfds's `closest` rounding does).
EXAMPLES = {
    "train": _train(*range(10)),
    "train[:60%]": _train(0, 1, 2, 3, 4, 5),
    "train[50%:]": _train(5, 6, 7, 8, 9),
    "train[:50%]": _train(0, 1, 2, 3, 4),
    "train[25%:35%]": _train(2, 3),  # 2.5 -> 2, 3.5 -> 4
    "train[35%:45%]": set(),  # 3.5 -> 4, 4.5 -> 4: empty
    "train[:5]": _train(0, 1, 2, 3, 4),
    "train[5:]": _train(5, 6, 7, 8, 9),
    "train[-3:]": _train(7, 8, 9),
    "train[:-3]": _train(0, 1, 2, 3, 4, 5, 6),
    "train[-30%:]": _train(7, 8, 9),
    "train[6:7]": _train(6),
    "train[1shard]": _train(4, 5, 6, 7, 8, 9),
    "train[:1shard]": _train(0, 1, 2, 3),
    "test": _test(*range(7)),
    "test[:5]": _test(0, 1, 2, 3, 4),
    "test[5:]": _test(5, 6),
    "test[-2:]": _test(5, 6),
    "train+test": _train(*range(10)) | _test(*range(7)),
    "train[:2] + test[-2:]": _train(0, 1) | _test(5, 6),
    "train[90%:]+test[:1]": _train(9) | _test(0),
    " train [ 7 : ] ": _train(7, 8, 9),
    "all": _train(*range(10)) | _test(*range(7)),
}


def test_two_splits_overlap_exactly_when_they_share_an_example():
    """All 529 ordered pairs of the specs above (one test: a table, not 529 cases)."""
    wrong = [(a, b) for a, b in itertools.product(EXAMPLES, repeat=2)
             if _overlap(a, b, SPLITS) != bool(EXAMPLES[a] & EXAMPLES[b])]
    assert not wrong, f"{len(wrong)} pairs misjudged, e.g. {wrong[:5]}"


@pytest.mark.parametrize("a, b, shared", [
    ("train", "train", True),
    ("train", " train[:50%]", True),
    ("train[:60%]", "train", True),
    ("train[:60%]", "train[50%:]", False),  # no sizes: two slices are not compared
    ("train+test", "test", False),
    ("train", "test", False),
])
def test_without_split_sizes_only_a_split_and_its_slices_count(a, b, shared):
    assert _overlap(a, b) == shared


def test_a_split_the_sizes_do_not_hold_falls_back_to_the_conservative_rule():
    assert _overlap("validation", "validation[:5]", SPLITS)
    assert not _overlap("validation[:5]", "validation[5:]", SPLITS)
    assert not _overlap("validation", "train", SPLITS)


def _digits_run(**data: str) -> TrainedRun:
    """A stand-in run of LeNet-5 on the offline `digits` (train 1438, test 359 scans)."""
    config = default_config()
    config.model = "lenet5"
    config.data = ml_collections.ConfigDict({"name": "digits", **data})
    return TrainedRun("w", config, model=None, variables={}, step=1, how="best")


def test_overlapping_slices_and_joins_of_digits_are_found():
    run = _digits_run(train_split="train[:60%]")
    same, warnings = check_temperature_split(run, None, "train[50%:]")
    assert not same and len(warnings) == 1 and warnings[0].startswith(
        "evaluate: temperature_split='train[50%:]' shares examples with the run's training split "
        "'train[:60%]': a model is more confident on examples it learned")
    assert check_temperature_split(run, None, "train[60%:]") == (False, [])
    assert check_temperature_split(run, None, "train[-40%:]") == (False, [])
    assert check_temperature_split(run, None, "train[863:]") == (False, [])  # 60% is 863
    assert check_temperature_split(run, None, "train[862:]")[1]
    with pytest.raises(ValueError, match=r"^evaluate: temperature_split='train\[60%:\]\+test' is "
                                         r"invalid; it holds the evaluated split 'test', so T "
                                         r"would be fitted to the very examples it is scored on"):
        check_temperature_split(run, None, "train[60%:]+test")
    with pytest.raises(ValueError, match=r"^evaluate: temperature_split='test\[-10:\]' is "
                                         r"invalid; it holds the evaluated split 'test\[:-5\]'"):
        check_temperature_split(run, "test[:-5]", "test[-10:]")
    assert check_temperature_split(run, "test[:-5]", "test[-5:]") == (False, [])
    same, warnings = check_temperature_split(run, "test[:50%]", "test[40%:] + train[:10]",
                                             allow_same_split=True)
    assert same and len(warnings) == 2


def test_a_command_has_its_errors_and_warnings_name_its_flags():
    """experiments.evaluate's user typed --temperature_split and --allow_same_split: its
    errors and warnings said `evaluate: temperature_split=...` and `allow_same_split`."""
    run = _digits_run(train_split="train[:60%]")
    flags = {"name": "--temperature_split", "allow": "--allow_same_split"}
    with pytest.raises(ValueError, match=r"^--temperature_split='validation' is invalid; "
                                         r"'digits' has splits \['train', 'test'\]"):
        check_temperature_split(run, None, "validation", **flags)
    with pytest.raises(ValueError, match=r"^--temperature_split='test' is invalid; it holds the "
                                         r"evaluated split 'test', .*, or --allow_same_split for "
                                         r"that oracle on purpose\.$"):
        check_temperature_split(run, None, "test", **flags)
    same, warnings = check_temperature_split(run, None, "test + train[50%:]", True, **flags)
    assert same and len(warnings) == 2
    assert warnings[0] == ("T is fitted on examples of the evaluated split 'test': its "
                           "calibration after scaling is optimistic (--allow_same_split)")
    assert warnings[1].startswith("--temperature_split='test + train[50%:]' shares examples with "
                                  "the run's training split 'train[:60%]'")

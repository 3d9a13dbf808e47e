"""The offline `digits` builder: real scikit-learn scans, stratified split, determinism."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from cnnjax.data.builders import Digits
from cnnjax.data.builders import digits as digits_lib


def _split_arrays(data_dir: str, split: str) -> dict[str, np.ndarray]:
    builder = tfds.builder("digits", data_dir=data_dir)
    return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))


@pytest.fixture(scope="module")
def sklearn_digits():
    return load_digits()


def test_registered_under_its_name_without_catalogue_clash():
    assert tfds.builder_cls("digits") is Digits
    assert str(Digits.VERSION) == "1.0.0"


def test_generated_offline_on_first_use(digits_dir):
    # `digits_dir` is an empty data dir in which the pipeline's `get_dataset_info` ran once.
    version_dir = os.path.join(digits_dir, "digits", "1.0.0")
    assert {"dataset_info.json", "features.json"} <= set(os.listdir(version_dir))
    assert tfds.builder("digits", data_dir=digits_dir).is_prepared()


def test_sizes_classes_and_features(digits_dir):
    builder = tfds.builder("digits", data_dir=digits_dir)
    info = builder.info
    assert info.splits["train"].num_examples == 1438 == digits_lib.NUM_TRAIN
    assert info.splits["test"].num_examples == 359 == digits_lib.NUM_TEST
    assert info.splits["train"].num_examples + info.splits["test"].num_examples == 1797
    assert info.features["label"].num_classes == 10
    assert info.features["image"].shape == (8, 8, 1)
    assert info.features["image"].dtype == np.uint8


def test_split_is_stratified_disjoint_and_complete(digits_dir, sklearn_digits):
    train, test = _split_arrays(digits_dir, "train"), _split_arrays(digits_dir, "test")
    everything = np.concatenate([train["index"], test["index"]])
    np.testing.assert_array_equal(np.sort(everything), np.arange(1797))  # each scan exactly once
    class_counts = np.bincount(sklearn_digits.target, minlength=10)
    expected_test = np.floor(0.2 * class_counts + 0.5).astype(int)
    np.testing.assert_array_equal(np.bincount(test["label"], minlength=10), expected_test)
    np.testing.assert_array_equal(np.bincount(train["label"], minlength=10),
                                  class_counts - expected_test)
    # The documented per-class test counts.
    np.testing.assert_array_equal(expected_test, [36, 36, 35, 37, 36, 36, 36, 36, 35, 36])
    for split in (train, test):  # labels are sklearn's for the recorded row
        np.testing.assert_array_equal(split["label"], sklearn_digits.target[split["index"]])


def test_pixels_are_sklearn_scans_rescaled_to_uint8(digits_dir, sklearn_digits):
    test = _split_arrays(digits_dir, "test")
    assert test["image"].dtype == np.uint8 and test["image"].shape == (359, 8, 8, 1)
    # float64 reference: 0..16 -> 0..255, rounded half up.
    reference = np.floor(sklearn_digits.images * 255.0 / 16.0 + 0.5)
    for position in (0, 1, 100, 358):
        row = test["index"][position]
        np.testing.assert_array_equal(test["image"][position, :, :, 0], reference[row])
    np.testing.assert_array_equal(test["image"][..., 0], reference[test["index"]])
    assert test["image"].max() == 255 and test["image"].min() == 0


def test_two_builds_write_identical_bytes(digits_dir, tmp_path):
    other = str(tmp_path / "second_build")
    tfds.builder("digits", data_dir=other).download_and_prepare()
    first = sorted(glob.glob(os.path.join(digits_dir, "digits", "1.0.0", "*.tfrecord*")))
    second = sorted(glob.glob(os.path.join(other, "digits", "1.0.0", "*.tfrecord*")))
    assert [os.path.basename(p) for p in first] == [os.path.basename(p) for p in second]
    assert len(first) == 2
    for a, b in zip(first, second, strict=True):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read(), os.path.basename(a)


def test_split_indices_are_reproducible():
    labels = load_digits().target
    split = digits_lib.split_indices(labels)
    assert len(split["train"]) == 1438 and len(split["test"]) == 359
    assert not set(split["train"]) & set(split["test"])
    np.testing.assert_array_equal(split["test"], digits_lib.split_indices(labels)["test"])
    for name in ("train", "test"):  # sorted, as split_indices' docstring promises
        assert (np.diff(split[name]) > 0).all(), name
    # the names spec.resolve checks split strings against before the dataset is generated
    assert tuple(split) == digits_lib.Digits.SPLIT_NAMES

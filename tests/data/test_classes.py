"""`data.classes` / `data.train_examples_per_class` on the offline `digits` data: split sizes,
relabelling and the per-class budget checked against the stored split read straight from tfds
(NumPy), plus determinism, exact resume, process shards and bad values."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cnnjax.data import pipeline, sources
from cnnjax.data.pipeline import eval_batches, get_dataset_info, train_batches
from cnnjax.data.spec import resolve
from tests.data.test_pipeline import _keys

TARGET = (7, 5, 9)  # deliberately not sorted: new label i is old label TARGET[i]


def _stored(digits_dir: str, split: str) -> tuple[list[bytes], np.ndarray]:
    """(pixel keys, labels) of a split in stored order, straight from tfds."""
    builder = tfds.builder("digits", data_dir=digits_dir)
    raw = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    return [image.tobytes() for image in raw["image"]], raw["label"]


def _reference(digits_dir: str, split: str, classes, per_class=None) -> list[tuple[bytes, int]]:
    """The examples a subset keeps, in stored order, relabelled: written without tf.data."""
    keys, labels = _stored(digits_dir, split)
    seen = dict.fromkeys(classes, 0)
    kept = []
    for key, label in zip(keys, labels, strict=True):
        if label in seen and (per_class is None or seen[label] < per_class):
            seen[label] += 1
            kept.append((key, classes.index(label)))
    return kept


def _eval_examples(config, **layout) -> list[tuple[bytes, int]]:
    out = []
    for batch in eval_batches(config, global_batch_size=32, num_devices=1, **layout):
        valid = batch["mask"].reshape(-1) > 0
        keys = _keys(batch["image"].reshape(-1, 8, 8, 1)[valid])
        out += list(zip(keys, batch["label"].reshape(-1)[valid].tolist(), strict=True))
    return out


def _epoch(config, batch_size: int, steps: int, **kwargs) -> list[tuple[bytes, int]]:
    batches = itertools.islice(
        train_batches(config, global_batch_size=batch_size, num_devices=1, seed=3, **kwargs),
        steps)
    return [pair for b in batches
            for pair in zip(_keys(b["image"].reshape(-1, 8, 8, 1)),
                            b["label"].reshape(-1).tolist(), strict=True)]


def test_split_sizes_and_class_count_follow_the_subset(digits_config, digits_dir):
    _, train_labels = _stored(digits_dir, "train")
    _, test_labels = _stored(digits_dir, "test")
    info = get_dataset_info(digits_config(classes=TARGET))
    assert info.num_classes == 3
    assert info.num_train == int(np.isin(train_labels, TARGET).sum())
    assert info.num_eval == int(np.isin(test_labels, TARGET).sum())
    # The budget cuts only the train split; the eval split keeps every example of the classes.
    budget = get_dataset_info(digits_config(classes=TARGET, train_examples_per_class=4))
    assert (budget.num_classes, budget.num_train, budget.num_eval) == (3, 12, info.num_eval)
    # A budget alone keeps every class; one above a class's count keeps all of that class.
    whole = get_dataset_info(digits_config(train_examples_per_class=1000))
    assert (whole.num_classes, whole.num_train) == (10, len(train_labels))


def test_a_per_class_budget_alone_cuts_every_class(digits_config, digits_dir):
    """`train_examples_per_class=5` without `classes` keeps the first 5 of each of the 10
    labels (the test above uses a budget above every class's count, which cuts nothing)."""
    config = digits_config(train_examples_per_class=5)
    info = get_dataset_info(config)
    assert (info.num_classes, info.num_train) == (10, 50)
    expected = _reference(digits_dir, "train", list(range(10)), per_class=5)
    assert len(expected) == 50
    assert sorted(_epoch(config, batch_size=10, steps=5)) == sorted(expected)


def _cut_train_split(digits_dir: str, root: str, size: int) -> None:
    """Copies `digits_dir` to `root` with the train split cut to its first `size` records."""
    shutil.copytree(digits_dir, root)
    version_dir = tfds.builder("digits", data_dir=root).data_dir
    (shard,) = [f for f in os.listdir(version_dir) if f.startswith("digits-train.tfrecord")]
    path = os.path.join(version_dir, shard)
    records = list(itertools.islice(tf.data.TFRecordDataset(path).as_numpy_iterator(), size))
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    info_path = os.path.join(version_dir, "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    for split in info["splits"]:
        if split["name"] == "train":
            split["shardLengths"] = [str(size)]
    with open(info_path, "w") as f:
        json.dump(info, f)


def test_class_counts_follow_the_data_dir_not_the_dataset_name(digits_config, digits_dir,
                                                                tmp_path):
    """The per-label counts are cached per source; two data dirs of one dataset may hold
    different data (here a cut-down copy), so the key is the folder read, not the name: the
    copy's sizes were the first dir's."""
    other = str(tmp_path / "cut")
    _cut_train_split(digits_dir, other, 100)
    classes = (0, 1, 2)
    _, full_labels = _stored(digits_dir, "train")
    _, cut_labels = _stored(other, "train")
    assert len(cut_labels) == 100
    full = get_dataset_info(digits_config(classes=classes))
    cut = get_dataset_info(digits_config(classes=classes, data_dir=other))
    assert full.num_train == int(np.isin(full_labels, classes).sum())
    assert cut.num_train == int(np.isin(cut_labels, classes).sum()) < full.num_train
    keys = {sources.open_source(resolve(digits_config(data_dir=d))).storage_key
            for d in (digits_dir, other)}
    assert len(keys) == 2


def test_every_subset_of_a_split_shares_one_count_of_its_labels(digits_config, monkeypatch):
    """Class counts are cached per stored split, not per config: a transfer comparison checks
    ~20 configs of two subsets of one dataset and should read each split once, not 20 times."""
    from cnnjax.data import sources

    monkeypatch.setattr(sources, "_LABEL_COUNTS", {})
    reads = []
    real_read = sources.TfdsSource.read
    monkeypatch.setattr(sources.TfdsSource, "read",
                        lambda self, split, shard: reads.append(split) or real_read(self, split,
                                                                                   shard))
    sizes = [get_dataset_info(digits_config(classes=c, train_examples_per_class=k, image_size=s))
             for c, k, s in [(TARGET, None, 8), ((0, 1), 4, 8), (TARGET, 4, 16)]]
    assert sorted(reads) == ["test", "train"]  # one pass over each split for all three
    assert [(i.num_classes, i.num_train) for i in sizes[1:]] == [(2, 8), (3, 12)]
    assert sizes[0].num_eval == sizes[2].num_eval
    key = sources.open_source(resolve(digits_config(classes=TARGET))).storage_key
    assert key[0] == "tfds" and set(sources._LABEL_COUNTS) == {(key, "train"), (key, "test")}


def test_eval_split_is_the_subset_relabelled_in_stored_order(digits_config, digits_dir):
    got = _eval_examples(digits_config(classes=TARGET))
    assert got == _reference(digits_dir, "test", list(TARGET))
    assert {label for _, label in got} == {0, 1, 2}


def test_one_epoch_is_exactly_the_first_examples_of_each_class(digits_config, digits_dir):
    """3 classes x 4 examples, batch 4: the epoch's 3 batches hold exactly the reference 12."""
    config = digits_config(classes=TARGET, train_examples_per_class=4)
    epoch = _epoch(config, batch_size=4, steps=3)
    expected = _reference(digits_dir, "train", list(TARGET), per_class=4)
    assert len(expected) == 12 and sorted(epoch) == sorted(expected)
    assert [label for _, label in expected].count(2) == 4  # balanced
    # The next epoch holds the same examples in another order.
    two = _epoch(config, batch_size=4, steps=6)
    assert sorted(two[12:]) == sorted(expected) and two[12:] != two[:12]


def test_budget_never_cuts_an_eval_split_named_as_the_train_split(digits_config, digits_dir):
    """`train_examples_per_class` limits what training reads, not a split string: an eval split
    spelled 'train' (as train_split) was cut to the budget too, while 'train[:100%]' was not."""
    config = digits_config(classes=TARGET, train_examples_per_class=4, eval_split="train")
    whole = _reference(digits_dir, "train", list(TARGET))
    info = get_dataset_info(config)
    assert (info.num_train, info.num_eval) == (12, len(whole))
    assert _eval_examples(config) == whole
    epoch = _epoch(config, batch_size=4, steps=3)
    assert sorted(epoch) == sorted(_reference(digits_dir, "train", list(TARGET), per_class=4))


def test_subset_batches_are_deterministic_and_resume_exactly(digits_config):
    config = digits_config(classes=TARGET, train_examples_per_class=10, cache=False)
    full = _epoch(config, batch_size=6, steps=9)  # 5 steps per epoch: crosses an epoch boundary
    assert _epoch(config, batch_size=6, steps=9) == full
    assert _epoch(config, batch_size=6, steps=2, start_step=7) == full[42:]
    cached = digits_config(classes=TARGET, train_examples_per_class=10, cache=True)
    assert _epoch(cached, batch_size=6, steps=9) == full


def test_process_shards_partition_the_subset(digits_config, digits_dir):
    config = digits_config(classes=TARGET)
    shards = [_eval_examples(config, process_index=i, process_count=2) for i in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(_reference(digits_dir, "test", list(TARGET)))
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    budget = digits_config(classes=TARGET, train_examples_per_class=4)
    halves = [_epoch(budget, batch_size=4, steps=3, process_index=i, process_count=2)
              for i in range(2)]  # 2 examples per process and step, 6 per process per epoch
    assert sorted(halves[0] + halves[1]) == sorted(
        _reference(digits_dir, "train", list(TARGET), per_class=4))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("classes", (), "data: classes=() is invalid; expected None (every class) or a "
                        "non-empty list of distinct labels >= 0, e.g. (5, 6, 7, 8, 9)"),
        ("classes", (3, 3), "data: classes=(3, 3) is invalid; expected None (every class)"),
        ("classes", (-1, 2), "data: classes=(-1, 2) is invalid; expected None (every class)"),
        ("classes", (10, 2), "data: classes=(10, 2) is invalid; expected labels in [0, 9]: "
                             "'digits' has 10 classes"),
        ("train_examples_per_class", 0, "data: train_examples_per_class=0 is invalid; expected "
                                        "a positive integer (examples kept per class in the "
                                        "train split), or None for all of them"),
    ],
)
def test_bad_values_are_refused(digits_config, field, value, message):
    config = digits_config()
    config[field] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        get_dataset_info(config)
    with pytest.raises(ValueError, match=re.escape(message)):
        train_batches(config, global_batch_size=4, num_devices=1, seed=0)


def test_wrongly_typed_values_are_refused():
    config = pipeline.default_data_config("digits").to_dict()
    for field, value in (("classes", "57"), ("classes", (1.5,)), ("classes", (True,)),
                         ("train_examples_per_class", 2.5), ("train_examples_per_class", True)):
        bad = ml_collections.ConfigDict({**config, field: value}, type_safe=False)
        with pytest.raises(ValueError, match=re.escape(f"data: {field}={value!r} is invalid")):
            get_dataset_info(bad)


def test_unknown_split_is_named_with_a_subset(digits_config):
    with pytest.raises(ValueError, match=re.escape(
            "data: eval_split='validation' is invalid; 'digits' has splits ['train', 'test']")):
        get_dataset_info(digits_config(classes=TARGET, eval_split="validation"))


def test_subset_with_no_eval_examples_is_refused_at_info_time(digits_config, digits_dir):
    """A class subset absent from the eval split fails in `get_dataset_info` (before a model
    compiles), naming the split and the classes, not at the first evaluation."""
    _, labels = _stored(digits_dir, "test[:3]")
    absent = tuple(sorted(set(range(10)) - set(labels.tolist())))[:2]
    config = digits_config(classes=absent, eval_split="test[:3]")
    with pytest.raises(ValueError, match=re.escape(
            f"data: eval_split='test[:3]' is invalid; it holds no examples of classes={absent} "
            "of 'digits'; expected a split holding some of them (or classes that it holds).")):
        get_dataset_info(config)
    present = (int(labels[0]), *absent)
    assert get_dataset_info(digits_config(classes=present, eval_split="test[:3]")).num_eval == (
        np.sum(labels == labels[0]))


def test_fake_dataset_subset():
    """The subset also wraps the in-memory `fake` source: its eval labels are the full split's,
    filtered and relabelled in NumPy."""
    config = pipeline.default_data_config("fake")
    config.fake_num_classes, config.fake_num_eval = 5, 200

    def eval_labels(config):
        return np.concatenate([
            b["label"].reshape(-1)[b["mask"].reshape(-1) > 0]
            for b in eval_batches(config, global_batch_size=64, num_devices=1)])

    labels = eval_labels(config)
    config.classes = (4, 0)
    kept = labels[np.isin(labels, (4, 0))]
    info = get_dataset_info(config)
    assert (info.num_classes, info.num_eval) == (2, len(kept)) and 0 < len(kept) < 200
    np.testing.assert_array_equal(eval_labels(config), np.where(kept == 4, 0, 1))

"""tf.data pipeline on the offline `digits` data: shapes, determinism, exact resume, sharding."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cnnjax.data import pipeline, presets, sources
from cnnjax.data.pipeline import eval_batches, get_dataset_info, train_batches
from cnnjax.data.sources import open_source
from cnnjax.data.spec import resolve, split_detection_fields
from cnnjax.data.transforms import Transforms, _random_resized_crop

# digits: 1,438 train examples; a global batch of 128 gives 11 steps per epoch.
STEPS_PER_EPOCH = 11


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _keys(images: np.ndarray) -> list[bytes]:
    """Identifies native-size, un-augmented digits by their pixels (all 1,797 scans differ).

    Undoes the normalization and rounds back to the stored uint8 pixels.
    """
    preset = presets.get_preset("digits")
    pixels = np.rint((images.astype(np.float64) * preset.std[0] + preset.mean[0]) * 255.0)
    return [image.tobytes() for image in pixels.astype(np.uint8).reshape(-1, 8, 8, 1)]


def _split_keys(digits_dir: str, split: str) -> set[bytes]:
    """Keys of a split's stored images, read straight from tfds."""
    builder = tfds.builder("digits", data_dir=digits_dir)
    raw = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))["image"]
    return {image.tobytes() for image in raw}


def _split_in_order(digits_dir: str, split: str) -> tuple[list[bytes], np.ndarray]:
    """Keys and labels of a split's stored examples, in tfds's stored order."""
    builder = tfds.builder("digits", data_dir=digits_dir)
    raw = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    return [image.tobytes() for image in raw["image"]], raw["label"]


def test_dataset_info(digits_config):
    info = get_dataset_info(digits_config(image_size=32))
    assert info == pipeline.DatasetInfo("digits", 10, (32, 32, 1), 1438, 359)
    assert get_dataset_info(digits_config()).image_shape == (8, 8, 1)
    assert pipeline.steps_per_epoch(info.num_train, 128) == STEPS_PER_EPOCH


def test_dataset_info_is_named_after_the_preset_not_the_dataset_read(digits_config):
    """`DatasetInfo.name` is the preset's (distillation compares teacher and student by it),
    not `tfds_name`, which may carry a version or a config (imagenette/320px-v2)."""
    info = get_dataset_info(digits_config(tfds_name="digits:1.0.0"))
    assert info == pipeline.DatasetInfo("digits", 10, (8, 8, 1), 1438, 359)


@pytest.mark.parametrize("args,message", [
    ((1024, 0), "global_batch_size=0 is invalid; expected a positive integer"),  # ZeroDivision
    ((1024, -3), "global_batch_size=-3 is invalid"),  # was -342
    ((-5, 8), "num_train=-5 is invalid; expected an integer >= 0"),  # was -1
])
def test_steps_per_epoch_refuses_counts_that_are_not_counts(args, message):
    with pytest.raises(ValueError, match=rf"^steps_per_epoch: {message}"):
        pipeline.steps_per_epoch(*args)


@pytest.mark.parametrize("split", ["test[:0]", "test[100%:]", "train[5:5]"])
def test_empty_eval_split_is_refused_at_info_time(digits_config, split):
    """`get_dataset_info` (what the trainer calls before compiling) refuses an eval split with
    no examples, rather than returning num_eval=0 for the first evaluation to fail on."""
    with pytest.raises(ValueError, match=re.escape(
            f"data: eval_split={split!r} is invalid; it holds no examples of 'digits'; expected "
            "a non-empty split (a whole split, or a slice such as 'train[90%:]').")):
        get_dataset_info(digits_config(eval_split=split))
    assert get_dataset_info(digits_config(eval_split="test[:1]")).num_eval == 1


@pytest.mark.parametrize("split", ["train[:0]", "train[100%:]", "test[5:5]"])
def test_empty_train_split_is_refused_by_name(digits_config, split):
    """An empty train split is refused at info time (get_dataset_info had returned num_train=0)
    and by train_batches, naming train_split (train_batches named global_batch_size)."""
    message = re.escape(f"data: train_split={split!r} is invalid; it holds no examples of "
                        "'digits'; expected a non-empty split")
    config = digits_config(train_split=split)
    with pytest.raises(ValueError, match=message):
        get_dataset_info(config)
    with pytest.raises(ValueError, match=message):
        train_batches(config, global_batch_size=4, num_devices=1, seed=0)


@pytest.mark.parametrize("split, part", [("train[:0shard]", "train[:0shard]"),
                                         ("test[:5] + train[1shard:0shard]",
                                          "train[1shard:0shard]")])
def test_a_slice_ending_at_shard_0_is_refused_not_read_whole(digits_config, split, part):
    """tfds reads a slice ending at shard 0 as the whole split: 'train[:0shard]' trained on all
    1,438 examples, while 'train[:0]' is refused as empty."""
    with pytest.raises(ValueError, match=re.escape(
            f"data: train_split={split!r} is invalid; {part!r} ends at shard 0, so it holds no "
            "example, and tfds would read the whole split instead; expected a slice ending at "
            "shard 1 or later (or no end).")):
        get_dataset_info(digits_config(train_split=split))
    assert get_dataset_info(digits_config(train_split="train[:1shard]")).num_train == 1438


@pytest.mark.parametrize("field", ["train_split", "eval_split"])
@pytest.mark.parametrize("split,start,end", [("test[5:2]", 5, 2), ("test[50%:10%]", 180, 36),
                                             ("test[-2:5]", 357, 5),
                                             ("test[5:2]+train[:3]", 5, 2)])
def test_reversed_slices_are_refused_by_name(digits_config, field, split, start, end):
    """tfds counts a reversed slice as a negative number of examples (num_eval=-3 passed the
    empty check) and only fails when reading; a `+` join with one summed to 0 or more."""
    message = re.escape(
        f"data: {field}={split!r} is invalid; its slice of 'test' starts at example {start} "
        f"after it ends at {end}; expected a slice whose start is at or before its end, e.g. "
        f"'test[{end}:{start}]'.")
    config = digits_config(**{field: split})
    with pytest.raises(ValueError, match=message):
        get_dataset_info(config)
    with pytest.raises(ValueError, match=message):
        if field == "train_split":
            train_batches(config, global_batch_size=4, num_devices=1, seed=0)
        else:
            eval_batches(config, global_batch_size=4, num_devices=1)


@pytest.mark.parametrize("split, part, name, size", [
    ("train[2000:]", "train[2000:]", "train", 1438),
    ("train[:90%]+test[400:500]", "test[400:500]", "test", 359)])
def test_a_slice_outside_its_split_says_so(digits_config, split, part, name, size):
    """It read "'digits' has splits ['train', 'test'] (slices like ... also work)", as if the
    split's name were unknown, with tfds's reason last in brackets."""
    with pytest.raises(ValueError, match=re.escape(
            f"data: train_split={split!r} is invalid; its slice {part!r} reaches outside "
            f"{name!r}, which holds {size} examples; expected example indices within "
            f"[0, {size}] (or percentages, e.g. '{name}[:90%]').")):
        get_dataset_info(digits_config(train_split=split))


def test_fake_says_it_takes_whole_splits_only():
    """'train[:50%]' on `fake` read "'fake' has splits ['train', 'test']", as if 'train' were
    not one of them."""
    config = pipeline.default_data_config("fake")
    config.train_split = "train[:50%]"
    with pytest.raises(ValueError, match=re.escape(
            "data: train_split='train[:50%]' is invalid; 'fake' has splits ['train', 'test'], "
            "read whole: it takes no slices or '+'.")):
        get_dataset_info(config)


def test_tensorflow_gpus_are_hidden_before_a_pipeline_is_built(digits_config, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline.tf.config, "set_visible_devices",
                        lambda devices, kind: calls.append((list(devices), kind)))
    get_dataset_info(digits_config())
    eval_batches(digits_config(), global_batch_size=8, num_devices=1)
    assert calls == [([], "GPU"), ([], "GPU")]


def test_dense_target_sources_are_opened_with_tensorflow_gpus_hidden(monkeypatch):
    """Detection and segmentation build their `TfdsSource` themselves, not through
    `sources.open_source`: `open_whole_image_source` must hide the GPUs before `make_source`
    runs (no dataset is read: `make_source` stops the call)."""
    from cnnjax.data import spec as spec_lib

    calls = []
    monkeypatch.setattr(pipeline.tf.config, "set_visible_devices",
                        lambda devices, kind: calls.append((list(devices), kind)))

    class OpenedError(Exception):
        pass

    def make_source(spec):
        assert calls == [([], "GPU")]
        raise OpenedError

    for task in ("detection", "segmentation"):
        calls.clear()
        config = (spec_lib.detection_data_config if task == "detection"
                  else spec_lib.segmentation_data_config)("shapes")
        with pytest.raises(OpenedError):
            pipeline.open_whole_image_source(spec_lib.resolve_for_task(config, task),
                                             make_source)


def test_late_gpu_hiding_warns_when_tensorflow_already_holds_gpus(monkeypatch, caplog):
    """TF initialized with GPUs visible before the pipeline: visibility is frozen, so warn."""

    def frozen(devices, kind):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    monkeypatch.setattr(pipeline.tf.config, "set_visible_devices", frozen)
    monkeypatch.setattr(pipeline.tf.config, "get_visible_devices", lambda kind: ["GPU:0"])
    with caplog.at_level("WARNING"):
        pipeline.hide_gpus_from_tensorflow()
    assert "TensorFlow was initialized with GPUs visible" in caplog.text
    caplog.clear()
    monkeypatch.setattr(pipeline.tf.config, "get_visible_devices", lambda kind: [])
    pipeline.hide_gpus_from_tensorflow()  # frozen but no GPU visible (CPU-only TF): nothing to say
    assert "GPUs visible" not in caplog.text


def test_train_batch_shapes_and_dtypes(digits_config):
    batch = next(train_batches(digits_config(image_size=32), global_batch_size=16, num_devices=2,
                               seed=0))
    assert batch["image"].shape == (2, 8, 32, 32, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 8) and batch["label"].dtype == np.int32
    assert set(batch) == {"image", "label"}
    assert batch["label"].min() >= 0 and batch["label"].max() < 10


def test_missing_fields_take_preset_defaults(digits_dir):
    config = ml_collections.ConfigDict({"name": "digits", "data_dir": digits_dir})
    batch = next(train_batches(config, global_batch_size=8, num_devices=1, seed=0))
    assert batch["image"].shape == (1, 8, 8, 8, 1)


def test_same_seed_same_batches_other_seed_different(digits_config):
    config = digits_config()
    a = _take(train_batches(config, global_batch_size=128, num_devices=1, seed=3), 13)
    b = _take(train_batches(config, global_batch_size=128, num_devices=1, seed=3), 13)
    c = _take(train_batches(config, global_batch_size=128, num_devices=1, seed=4), 1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_the_top_seed_bit_changes_the_batches(digits_config):
    """All 63 bits of the seed count: seed 3 + 2**62 is not an alias of seed 3 (the same
    first 128 labels by chance: about 10**-128)."""
    low, high = (next(train_batches(digits_config(), global_batch_size=128, num_devices=1,
                                    seed=seed)) for seed in (3, 3 + 2**62))
    assert not np.array_equal(low["label"], high["label"])


def test_start_step_resumes_exactly(digits_config):
    # Mid-epoch, last step of an epoch (next batch crosses the boundary), first step of an
    # epoch, and a later epoch.
    config = digits_config(image_size=16)
    starts = [5, STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH + 3]
    fresh = _take(train_batches(config, global_batch_size=128, num_devices=1, seed=7),
                  max(starts) + 2)
    for start_step in starts:
        resumed = _take(train_batches(config, global_batch_size=128, num_devices=1, seed=7,
                                      start_step=start_step), 2)
        for k in range(2):
            np.testing.assert_array_equal(resumed[k]["image"], fresh[start_step + k]["image"])
            np.testing.assert_array_equal(resumed[k]["label"], fresh[start_step + k]["label"])


def test_epochs_hold_distinct_examples_and_are_shuffled_differently(digits_config, digits_dir):
    config = digits_config()
    batches = _take(train_batches(config, global_batch_size=128, num_devices=1, seed=0),
                    2 * STEPS_PER_EPOCH)
    train_keys = _split_keys(digits_dir, "train")
    epochs = []
    for e in range(2):
        keys = _keys(np.concatenate([b["image"] for b in batches[e * 11:(e + 1) * 11]], axis=1))
        assert len(keys) == len(set(keys)) == 11 * 128  # no repeats; remainder (30) dropped
        assert set(keys) <= train_keys
        epochs.append(keys)
    assert epochs[0] != epochs[1]  # a new order each epoch
    assert set(epochs[0]) != set(epochs[1])  # and a different dropped remainder


def test_cache_does_not_change_batches(digits_config):
    cached = _take(train_batches(digits_config(cache=True), global_batch_size=64, num_devices=1,
                                 seed=1, start_step=20), 3)
    streamed = _take(train_batches(digits_config(cache=False), global_batch_size=64,
                                   num_devices=1, seed=1, start_step=20), 3)
    for x, y in zip(cached, streamed, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])


@pytest.mark.parametrize("cache", [True, False])
def test_cache_holds_the_decoded_split_only_when_asked(digits_config, monkeypatch, cache):
    """`cache=False` is for splits that do not fit in memory (imagenet2012): the batches are
    the same either way (above), so count the `Dataset.cache` calls: one with it, none without."""
    calls = []
    real_cache = tf.data.Dataset.cache
    monkeypatch.setattr(tf.data.Dataset, "cache",
                        lambda self, *args, **kwargs: calls.append(1) or real_cache(self, *args,
                                                                                    **kwargs))
    next(train_batches(digits_config(cache=cache), global_batch_size=8, num_devices=1, seed=0))
    assert len(calls) == int(cache)


def test_device_axis_is_a_reshape_of_the_global_batch(digits_config):
    config = digits_config()
    one = next(train_batches(config, global_batch_size=32, num_devices=1, seed=2))
    four = next(train_batches(config, global_batch_size=32, num_devices=4, seed=2))
    assert four["image"].shape == (4, 8, 8, 8, 1)
    np.testing.assert_array_equal(four["image"].reshape(one["image"].shape), one["image"])
    np.testing.assert_array_equal(four["label"].reshape(1, 32), one["label"])


def test_eval_covers_every_example_once_with_padding(digits_config, digits_dir):
    config = digits_config()
    batches = list(eval_batches(config, global_batch_size=100, num_devices=2))
    assert len(batches) == 4  # ceil(359 / 100)
    assert all(b["image"].shape == (2, 50, 8, 8, 1) for b in batches)
    mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
    assert mask.dtype == np.float32 and mask.sum() == 359
    np.testing.assert_array_equal(mask, np.r_[np.ones(359), np.zeros(41)])
    images = np.concatenate([b["image"].reshape(-1, 8, 8, 1) for b in batches])
    labels = np.concatenate([b["label"].reshape(-1) for b in batches])
    keys = _keys(images[:359])
    assert len(set(keys)) == 359 and set(keys) == _split_keys(digits_dir, "test")
    assert not images[359:].any() and not labels[359:].any()  # padding is zeros
    # In stored order (device 0's rows of a batch first), as `trained.eval_examples` promises.
    stored_keys, stored_labels = _split_in_order(digits_dir, "test")
    assert keys == stored_keys
    np.testing.assert_array_equal(labels[:359], stored_labels)


def test_train_process_shards_are_disjoint(digits_config):
    config = digits_config()
    per_process = []
    for p in range(2):
        batches = _take(train_batches(config, global_batch_size=128, num_devices=2, seed=5,
                                      process_index=p, process_count=2), STEPS_PER_EPOCH)
        assert batches[0]["image"].shape == (2, 32, 8, 8, 1)  # 128 / 2 processes / 2 devices
        keys = _keys(np.concatenate([b["image"] for b in batches], axis=1))
        assert len(set(keys)) == STEPS_PER_EPOCH * 64
        per_process.append(set(keys))
    assert not per_process[0] & per_process[1]


def test_uneven_shards_of_a_joined_split_still_resume_exactly_on_every_process(digits_config):
    """tfds shards "train[:7]+test[:5]" over 3 processes as 5, 4 and 3 examples (part by part),
    not 4 each: the third process used to run out one batch into each epoch, so its epochs
    (shuffles, augmentation keys) drifted from the step count a resume computes."""
    config = digits_config(train_split="train[:7]+test[:5]")
    for p in range(3):
        def batches(start, count, p=p):
            return _take(train_batches(config, global_batch_size=3, num_devices=1, seed=2,
                                       start_step=start, process_index=p, process_count=3),
                         count)

        fresh = batches(0, 9)
        for start in (3, 4, 7):
            for k, batch in enumerate(batches(start, 2)):
                np.testing.assert_array_equal(batch["image"], fresh[start + k]["image"])


def test_a_shard_too_small_for_a_process_batch_is_refused_by_name(digits_config):
    """"train[:7]+test[:5]" (12 examples) holds one global batch of 12, but over 3 processes
    its shards are 5, 4 and 3 examples: the smallest holds no process batch of 4, so an epoch
    has no step. That raised ZeroDivisionError (divmod by 0 steps) on every process."""
    config = digits_config(train_split="train[:7]+test[:5]")
    message = re.escape(
        "data: global_batch_size=12 is invalid; expected at most 9 (3 processes * 3): split "
        "'train[:7]+test[:5]' of 'digits' shards over 3 processes as [5, 4, 3] examples (tfds "
        "shards a '+'-joined split part by part), so a process batch of 4 leaves an epoch "
        "without a step.")
    for p in range(3):
        with pytest.raises(ValueError, match=message):
            train_batches(config, global_batch_size=12, num_devices=1, seed=0, process_index=p,
                          process_count=3)
    assert len(_take(train_batches(config, global_batch_size=9, num_devices=1, seed=0,
                                   process_index=2, process_count=3), 2)) == 2


def test_eval_process_shards_partition_the_split(digits_config):
    config = digits_config(eval_split="test[:10]")  # shards of 4, 3, 3 examples
    keys, counts = [], []
    for p in range(3):
        batches = list(eval_batches(config, global_batch_size=9, num_devices=1, process_index=p,
                                    process_count=3))
        counts.append(len(batches))
        for b in batches:
            keep = b["mask"].reshape(-1) > 0
            keys += _keys(b["image"].reshape(-1, 8, 8, 1)[keep])
    assert counts == [2, 2, 2]  # every process runs the same number of eval steps
    assert len(keys) == len(set(keys)) == 10


def test_more_processes_than_eval_examples_pad_the_empty_shards(digits_config):
    config = digits_config(eval_split="test[:2]")
    shards = [list(eval_batches(config, global_batch_size=4, num_devices=1, process_index=p,
                                process_count=4)) for p in range(4)]
    assert [len(s) for s in shards] == [1, 1, 1, 1]
    assert [float(s[0]["mask"].sum()) for s in shards] == [1.0, 1.0, 0.0, 0.0]
    assert not shards[3][0]["image"].any()
    # A padding-only batch has the dtypes and shapes of a read one: every process feeds the
    # same arrays to the same compiled eval step.
    layouts = [{k: (v.dtype, v.shape) for k, v in s[0].items()} for s in shards]
    assert layouts == [{"image": (np.float32, (1, 1, 8, 8, 1)), "label": (np.int32, (1, 1)),
                        "mask": (np.float32, (1, 1))}] * 4


def test_fake_dataset(tmp_path):
    config = pipeline.default_data_config("fake")
    config.fake_image_shape = (12, 10, 3)
    config.fake_num_classes = 7
    config.fake_num_train = 40
    config.fake_num_eval = 9
    info = get_dataset_info(config)
    assert info == pipeline.DatasetInfo("fake", 7, (12, 10, 3), 40, 9)
    a = _take(train_batches(config, global_batch_size=8, num_devices=2, seed=0), 6)
    b = _take(train_batches(config, global_batch_size=8, num_devices=2, seed=0, start_step=5), 1)
    assert a[0]["image"].shape == (2, 4, 12, 10, 3)
    np.testing.assert_array_equal(a[5]["image"], b[0]["image"])
    labels = np.concatenate([x["label"].reshape(-1) for x in a])
    assert labels.max() < 7
    evals = list(eval_batches(config, global_batch_size=4, num_devices=1))
    assert [e["mask"].sum() for e in evals] == [4, 4, 1]


@pytest.mark.parametrize("name", ["digits", "cifar10", "imagenette"])
@pytest.mark.parametrize("field,value", [
    ("fake_num_classes", 7), ("fake_num_train", 40), ("fake_num_eval", 9),
    ("fake_image_shape", (12, 10, 3)),
])
def test_fake_fields_are_refused_for_a_real_dataset(name, field, value):
    """The `fake_*` fields shape the in-memory `fake` set only: a changed one beside a tfds
    dataset did nothing (digits kept its 10 classes under fake_num_classes=7), silently. It is
    refused by name before any I/O; the defaults every config carries, and values equal to
    them (a config.json's list for the shape), still resolve."""
    config = pipeline.default_data_config(name)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=re.escape(
            f"data: {field}={value!r} is invalid; expected the default "
            f"{getattr(pipeline.default_data_config('fake'), field)!r} for name={name!r}: the "
            "fake_* fields shape the in-memory 'fake' dataset only")):
        resolve(config)
    config = pipeline.default_data_config(name)
    config.fake_image_shape = list(config.fake_image_shape)
    assert resolve(config).preset.name == name
    fake = pipeline.default_data_config("fake")
    setattr(fake, field, value)
    assert getattr(resolve(fake), field) == value


# ------------------------------------------------------------------------------------ errors
def _expect(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_unknown_dataset_lists_valid_names(digits_config):
    config = digits_config()
    config.name = "svhn"
    _expect(r"data: name='svhn' is invalid; expected one of \['cifar10', 'cifar100', "
            r"'digits', 'fake', 'fashion_mnist', 'imagenet2012', 'imagenette', 'mnist', "
            r"'oxford_iiit_pet', 'shapes', 'voc2007', 'voc2012'\]",
            get_dataset_info, config)


def test_config_field_errors(digits_config):
    _expect(r"data: image_size=0 is invalid; expected a positive integer, or None",
            get_dataset_info, digits_config(image_size=0))
    _expect(r"data: image_size=-3 is invalid", get_dataset_info, digits_config(image_size=-3))
    _expect(r"data: shuffle_buffer=0 is invalid; expected a positive integer",
            get_dataset_info, digits_config(shuffle_buffer=0))
    config = ml_collections.ConfigDict({"name": "digits", "augment": 1})
    _expect(r"data: augment=1 is invalid; expected True or False", get_dataset_info, config)
    config = digits_config()
    config.fake_image_shape = (8, 8)
    _expect(r"data: fake_image_shape=\(8, 8\) is invalid; expected three positive integers",
            get_dataset_info, config)
    config = digits_config()
    config.imag_size = 32
    _expect(r"data: fields=\['imag_size'\] is invalid; expected only \['augment', 'cache'",
            get_dataset_info, config)
    _expect(r"data: eval_split='validation' is invalid; 'digits' has splits \['train', 'test'\]",
            get_dataset_info, digits_config(eval_split="validation"))


def _padding_only_crops(size: int, padding: int) -> float:
    """The fraction of the (2 * padding + 1)**2 crop offsets of a `size`-pixel square padded by
    `padding` whose `size`-pixel crop holds no image pixel, counted on a mask."""
    mask = np.pad(np.ones((size, size), bool), padding)
    offsets = range(2 * padding + 1)
    return np.mean([not mask[y:y + size, x:x + size].any() for y in offsets for x in offsets])


@pytest.mark.parametrize("name", ["cifar10", "shapes"])
@pytest.mark.parametrize("size", [1, 4])
def test_image_size_within_the_crop_padding_is_refused(name, size):
    """pad_crop_flip pads 4 pixels per side: a crop of 4 or fewer pixels at the offsets farthest
    from the centre holds only padding (40% of crops at 4 pixels), so such an image size is
    refused before anything is read (unless augment=False)."""
    config = pipeline.default_data_config(name)
    config.image_size = size
    with pytest.raises(ValueError, match=re.escape(
            f"data: image_size={size} is invalid; expected more than 4 pixels for {name!r}: its "
            f"training crop pads 4 pixels per side, so {_padding_only_crops(size, 4):.0%} of its "
            "random crops would be padding only")):
        resolve(config)
    config.augment = False
    assert resolve(config).size == (size, size)
    config.augment, config.image_size = True, 5
    assert resolve(config).size == (5, 5)


@pytest.mark.parametrize("name,grey_to_rgb,largest", [("digits", False, 46340),
                                                      ("cifar10", False, 26754),
                                                      ("mnist", True, 26754)])
def test_an_image_size_beyond_tensorflows_int32_sizes_is_refused(name, grey_to_rgb, largest):
    """image_size=2**31 failed in tf.image with an int32 overflow naming no field (the engine
    only caught it through the model's trace). The bound is floor(sqrt((2**31 - 1) / C)) for
    the C channels the pipeline makes (grey_to_rgb: 3)."""
    assert largest == math.isqrt((2**31 - 1) // (1 if name == "digits" else 3))
    config = pipeline.default_data_config(name)
    config.grey_to_rgb = grey_to_rgb
    config.image_size = largest + 1
    with pytest.raises(ValueError, match=re.escape(
            f"data: image_size={largest + 1} is invalid; expected at most {largest} for "
            f"{name!r} (")):
        resolve(config)
    config.image_size = largest
    assert resolve(config).size == (largest, largest)


_FAKE_SPLIT = ("expected a positive integer <= {most}: the 'fake' dataset draws each split into "
               "memory, {bytes} bytes per example of fake_image_shape={shape!r} (uint8 image, "
               "int64 label), up to 16 GiB (2**34 bytes).")


@pytest.mark.parametrize("name,fields,refused,message", [
    # np.minimum(counts, limit) raised OverflowError mid-run (per class limit beyond int64)
    ("digits", {}, {"train_examples_per_class": 10**20},
     "expected a positive integer (examples kept per class in the train split), or None for all "
     "of them; at most 2**63 - 1 (counted in int64)."),
    # tf.data's shuffle failed after the workdir held config.json and checkpoints
    ("digits", {}, {"shuffle_buffer": 2**63},
     "expected a positive integer <= 2**63 - 1 (tf.data's shuffle buffer size is an int64)."),
    # labels reach the model as int32; 2**40 classes failed RESOURCE_EXHAUSTED after compiling
    ("fake", {}, {"fake_num_classes": 2**40},
     "expected a positive integer <= 2**31 - 1 (the labels are int32)."),
    # "Maximum allowed dimension exceeded" naming no field; 2**40: MemoryError for 3 PiB
    ("fake", {}, {"fake_num_train": 10**20},
     _FAKE_SPLIT.format(most=2**34 // 3080, bytes=32 * 32 * 3 + 8, shape=(32, 32, 3))),
    ("fake", {}, {"fake_num_eval": 2**40},
     _FAKE_SPLIT.format(most=2**34 // 3080, bytes=32 * 32 * 3 + 8, shape=(32, 32, 3))),
    ("fake", {"fake_image_shape": (46340, 46340, 1)}, {"fake_num_train": 1024},
     _FAKE_SPLIT.format(most=8, bytes=46340**2 + 8, shape=(46340, 46340, 1))),
    ("fake", {}, {"fake_image_shape": (2**16, 2**15, 1)},
     "expected at most 2**31 - 1 values per image (it holds 2147483648): TensorFlow counts a "
     "tensor's values in int32."),
], ids=["per_class_int64", "shuffle_int64", "classes_int32", "train_bytes", "eval_bytes",
        "train_bytes_of_large_images", "image_int32"])
def test_counts_beyond_what_the_pipeline_can_hold_are_refused(name, fields, refused, message):
    """Values beyond what the pipeline counts in (int64, int32 labels) or the in-memory 'fake'
    set can draw passed `resolve` as positive integers and failed mid-run naming no field; they
    are refused by name, and the largest value each bound allows still resolves."""
    (field, value), = refused.items()
    config = pipeline.default_data_config(name)
    for key, ok in fields.items():
        config[key] = ok
    config[field] = value
    with pytest.raises(ValueError, match=re.escape(f"data: {field}={value!r} is invalid; "
                                                   f"{message}")):
        resolve(config)


@pytest.mark.parametrize("name,fields", [
    ("digits", {"train_examples_per_class": 2**63 - 1, "shuffle_buffer": 2**63 - 1}),
    ("fake", {"fake_num_classes": 2**31 - 1, "fake_num_train": 2**34 // 3080,
              "fake_num_eval": 2**34 // 3080}),
    ("fake", {"fake_image_shape": (46340, 46340, 1), "fake_num_train": 8, "fake_num_eval": 8}),
])
def test_counts_at_the_pipelines_bounds_resolve(name, fields):
    config = pipeline.default_data_config(name)
    for key, value in fields.items():
        config[key] = value
    spec = resolve(config)
    assert {key: getattr(spec, key) for key in fields} == fields


def test_config_type_and_name_errors(digits_dir, tmp_path):
    _expect(r"data: config='digits' is invalid; expected an ml_collections ConfigDict",
            get_dataset_info, "digits")
    _expect(r"data: data_dir=5 is invalid; expected a non-empty string or None",
            get_dataset_info, ml_collections.ConfigDict({"name": "digits", "data_dir": 5}))
    # A file where the data dir (or a parent) should be: tfds failed inside its first-use build
    # with a bare NotADirectoryError naming a 'downloads' folder.
    in_the_way = str(tmp_path / "a_file")
    open(in_the_way, "w").close()
    for path in (in_the_way, os.path.join(in_the_way, "sub")):
        _expect(rf"data: data_dir='{re.escape(path)}' is invalid; expected a directory \(tfds "
                r"reads datasets from it and builds cnnjax's offline ones there\), but a file is "
                r"in the way", get_dataset_info,
                ml_collections.ConfigDict({"name": "digits", "data_dir": path}))
    if os.path.isdir("/proc/self"):  # Linux: nothing can be created under /proc, even by root
        # An offline dataset's first-use build into such a dir: tfds printed its build banner,
        # then a bare "[Errno 2] No such file or directory: '/proc/...'".
        cannot = (r"is invalid; cnnjax generates 'digits' there on first use{}, but nothing can "
                  r"be created in '/proc' \(.*\); expected a directory this process can create "
                  r"files in .*; set data.data_dir to a writable directory\.$")
        _expect(r"data: data_dir='/proc/cnnjax_test/tfds' " + cannot.format(""), get_dataset_info,
                ml_collections.ConfigDict({"name": "digits", "data_dir": "/proc/cnnjax_test/tfds"}))
        # data_dir unset: tfds's default, here as a process whose $TFDS_DATA_DIR is that dir
        # sees it (tfds also finds the copies in the data dirs it registered at import).
        _expect(r"data: data_dir=None " + cannot.format(
            r" \(unset: tfds's default data dir '/proc/cnnjax_test/default', from "
            r"\$TFDS_DATA_DIR or ~/tensorflow_datasets\)"), sources._check_can_generate,
            tfds.builder("digits", data_dir="/proc/cnnjax_test/default"), "digits", None,
            "data: data_dir", "data.data_dir")
    _expect(r"data: tfds_name='no_such_dataset' is invalid; tfds does not know this dataset",
            get_dataset_info, ml_collections.ConfigDict(
                {"name": "digits", "data_dir": digits_dir, "tfds_name": "no_such_dataset"}))
    with pytest.raises(ValueError) as unknown:  # not tfds's ~9,000-character catalogue
        get_dataset_info(ml_collections.ConfigDict(
            {"name": "cifar10", "data_dir": digits_dir, "tfds_name": "cifar11"}))
    assert len(str(unknown.value)) < 300 and "close names: ['cifar10" in str(unknown.value)
    fake = pipeline.default_data_config("fake")
    fake.eval_split = "validation"
    _expect(r"data: eval_split='validation' is invalid; 'fake' has splits \['train', 'test'\]",
            get_dataset_info, fake)
    fake = pipeline.default_data_config("fake")
    fake.fake_num_train = 0
    _expect(r"data: fake_num_train=0 is invalid; expected a positive integer",
            get_dataset_info, fake)


@pytest.mark.parametrize("name,tfds_name,message", [
    ("digits", "digits/foo", "tfds cannot open it (BuilderConfig foo not found with version "
                             "1.0.0.); 'digits' has versions ['1.0.0'] ('digits:<version>')."),
    ("digits", "digits:2.0.0", "tfds cannot open it (Dataset digits cannot be loaded at version "
                               "2.0.0, only: 1.0.0.); 'digits' has versions ['1.0.0']"),
    ("cifar10", "cifar10:9.9.9", "tfds cannot open it (Dataset cifar10 cannot be loaded at "
                                 "version 9.9.9, only: 3.0.2.); 'cifar10' has versions ['3.0.2']"),
    ("imagenette", "imagenette/bogus", "tfds cannot open it (BuilderConfig bogus not found with "
                                       "version 1.0.0.); 'imagenette' has configs "
                                       "['full-size-v2', '320px-v2', '160px-v2', "),
])
def test_unknown_tfds_config_or_version_is_refused_by_name(digits_dir, name, tfds_name, message):
    """tfds raised its own ValueError (a config) or AssertionError (a version) naming no field."""
    config = pipeline.default_data_config(name)
    config.data_dir, config.tfds_name = digits_dir, tfds_name
    with pytest.raises(ValueError, match=re.escape(
            f"data: tfds_name={tfds_name!r} is invalid; {message}")):
        get_dataset_info(config)


def test_layout_errors(digits_config):
    config = digits_config()
    _expect(r"data: global_batch_size=10 is invalid; expected a multiple of num_devices \* "
            r"process_count = 4 \* 1 = 4", train_batches, config, global_batch_size=10,
            num_devices=4, seed=0)
    _expect(r"data: global_batch_size=12 is invalid; expected a multiple of num_devices \* "
            r"process_count = 1 \* 8 = 8", eval_batches, config, global_batch_size=12,
            num_devices=1, process_count=8)
    _expect(r"data: global_batch_size=0 is invalid; expected a positive integer",
            train_batches, config, global_batch_size=0, num_devices=1, seed=0)
    _expect(r"data: num_devices=0 is invalid", train_batches, config, global_batch_size=8,
            num_devices=0, seed=0)
    _expect(r"data: process_count=0 is invalid; expected a positive integer", eval_batches,
            config, global_batch_size=8, num_devices=1, process_count=0)
    _expect(r"data: process_index=2 is invalid; expected 0 <= process_index < "
            r"process_count=2", train_batches, config, global_batch_size=8, num_devices=1,
            seed=0, process_index=2, process_count=2)
    _expect(r"data: seed=-1 is invalid; expected an integer >= 0", train_batches, config,
            global_batch_size=8, num_devices=1, seed=-1)
    _expect(r"data: start_step=-5 is invalid", train_batches, config, global_batch_size=8,
            num_devices=1, seed=0, start_step=-5)
    for batches in (train_batches, eval_batches):  # tfds would read shard -1, i.e. shard 1
        _expect(r"data: process_index=-1 is invalid; expected an integer >= 0", batches, config,
                global_batch_size=8, num_devices=1, process_index=-1, process_count=2,
                **({"seed": 0} if batches is train_batches else {}))
    # 2**63 would be masked to seed 0 (the shuffle seeds are int64).
    _expect(r"data: seed=9223372036854775808 is invalid; expected 0 <= seed < 2\*\*63",
            train_batches, config, global_batch_size=8, num_devices=1, seed=2**63)
    _expect(r"data: global_batch_size=2048 is invalid; expected at most the 1438 examples of "
            r"'digits' split 'train' \(an epoch would have no step\)", train_batches, config,
            global_batch_size=2048, num_devices=1, seed=0)


def test_layout_is_checked_before_the_source_is_opened(digits_config, monkeypatch):
    """"All arguments are validated before anything is read": a bad layout is refused by name
    without opening the source (which may generate a dataset, or fail as not prepared)."""
    monkeypatch.setattr(pipeline.sources, "open_source", None)  # any I/O would fail loudly
    config = digits_config()
    _expect(r"data: global_batch_size=10 is invalid; expected a multiple of num_devices \* "
            r"process_count = 4 \* 1 = 4", train_batches, config, global_batch_size=10,
            num_devices=4, seed=0)
    _expect(r"data: process_index=2 is invalid", eval_batches, config, global_batch_size=8,
            num_devices=1, process_index=2, process_count=2)


def test_a_start_step_past_the_last_epoch_is_refused_by_name(digits_config):
    """The epochs are `Dataset.range(first_epoch, 2**62)`: a start_step of 2**62 epochs or more
    yielded no batch at all, and 2**63 epochs TensorFlow's out-of-range error naming no field.
    The last step before the bound still starts a batch (the last of epoch 2**62 - 1)."""
    config = digits_config()
    for epochs in (2**62, 2**63):
        start_step = epochs * STEPS_PER_EPOCH
        _expect(rf"^data: start_step={start_step} is invalid; expected start_step < 2\*\*62 \* "
                rf"{STEPS_PER_EPOCH} \(2\*\*62 epochs of {STEPS_PER_EPOCH} steps\)\.$",
                train_batches, config, global_batch_size=128, num_devices=1, seed=0,
                start_step=start_step)
    last = train_batches(config, global_batch_size=128, num_devices=1, seed=0,
                         start_step=2**62 * STEPS_PER_EPOCH - 1)
    assert next(last)["label"].shape == (1, 128)
    assert next(last, None) is None


# ------------------------------------------------------------------ recorded batches (golden)
def _digest(batches) -> str:
    """sha256 over every array's name, dtype, shape and bytes, batch by batch."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            digest.update(f"{key}{value.dtype}{value.shape}".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


# Recorded before `epoch_dataset` replaced the classification-only `_train_dataset` (TensorFlow
# 2.x as pinned by the venv; TF documents its shuffle order as version-dependent). A change to
# the epoch shuffle, the per-example keys, the skip on resume or the cache changes these.
RECORDED = {
    "digits": "d45c5d172e7ca80dd00b9fc5d70380c5aa91321009027540813bfe918d5b009f",
    "digits_subset": "5e801e1257fa9cbec7e2c7043637cfff0b5f2eb4063e2b0c22dfdfb600ea8d19",
    "fake": "dc681b979181d1ed31de409bc0004c9294d1ccaf8c96b9a3b74e4c0d3269ee59",
}

def test_padded_eval_batches_checks_its_layout_on_the_call():
    """The eval scheme shared by every pipeline refuses a layout when called, not at `next`."""
    with pytest.raises(ValueError, match=re.escape(
            "data: global_batch_size=7 is invalid; expected a multiple of num_devices * "
            "process_count = 2 * 1 = 2.")):
        pipeline.padded_eval_batches(None, None, None, {}, global_batch_size=7, num_devices=2,
                                     process_index=0, process_count=1)


@pytest.mark.parametrize("cache", [True, False])
def test_batches_match_the_recorded_ones(digits_config, cache):
    digits = _take(train_batches(digits_config(cache=cache), global_batch_size=32,
                                 num_devices=2, seed=11, start_step=5), 3)
    assert _digest(digits) == RECORDED["digits"]
    subset = digits_config(cache=cache, classes=(5, 6, 7), train_examples_per_class=20)
    assert _digest(_take(train_batches(subset, global_batch_size=16, num_devices=1, seed=2,
                                       process_index=1, process_count=2), 5)) == (
        RECORDED["digits_subset"])


def test_fake_batches_match_the_recorded_ones():
    config = pipeline.default_data_config("fake")
    assert _digest(_take(train_batches(config, global_batch_size=32, num_devices=1, seed=4,
                                       start_step=31), 3)) == RECORDED["fake"]


def test_epoch_dataset_hands_preprocess_the_documented_keys(digits_config):
    """Any per-example `preprocess` (detection's too) gets the decoded example and the stateless
    key `fold_in(fold_in((seed, epoch), process), position)`; resuming skips within the epoch."""
    spec = resolve(digits_config(cache=False))
    source = open_source(spec)

    def preprocess(ex, key):
        return {"key": key, "label": ex["label"], "pixels": tf.reduce_sum(tf.cast(
            ex["image"], tf.int32))}  # decoded uint8 pixels, not encoded bytes

    def batches(start_step):
        ds = pipeline.epoch_dataset(spec, source, preprocess, global_batch_size=128, seed=9,
                                    start_step=start_step, shard=(1, 2))
        return _take(ds.as_numpy_iterator(), 2)

    fold_in = tf.random.experimental.stateless_fold_in
    start = STEPS_PER_EPOCH - 1  # last step of epoch 0, then the first of epoch 1
    for (epoch, first), batch in zip([(0, 64 * (STEPS_PER_EPOCH - 1)), (1, 0)], batches(start),
                                     strict=True):
        process_key = fold_in(tf.constant([9, epoch], tf.int64), 1)
        expected = [fold_in(process_key, tf.constant(first + i, tf.int64)).numpy()
                    for i in range(64)]
        np.testing.assert_array_equal(batch["key"], np.stack(expected))
        assert batch["pixels"].min() > 0
    fresh = _take(pipeline.epoch_dataset(spec, source, preprocess, global_batch_size=128,
                                         seed=9, start_step=0, shard=(1, 2)).as_numpy_iterator(),
                  start + 1)
    np.testing.assert_array_equal(fresh[start]["label"], batches(start)[0]["label"])


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_detection_trains_through_epoch_dataset(monkeypatch, tmp_path, process_index,
                                                process_count):
    """One epoch scheme: detection's `train_batches` hands its own `preprocess` to
    `pipeline.epoch_dataset` instead of repeating the shuffle-and-seed logic, on this process's
    shard `(process_index, process_count)` (with every host on shard 0 each would train on the
    same examples)."""
    from cnnjax.data import detection

    seen = []

    def spy(spec, source, preprocess, **kwargs):
        seen.append((spec.tfds_name, kwargs))
        raise StopIteration

    monkeypatch.setattr(pipeline, "epoch_dataset", spy)
    monkeypatch.setattr(detection, "_open", lambda config: (
        resolve(split_detection_fields(config)[0]), None,
        Transforms((8, 8, 3), (8, 8), (0.0,) * 3, (1.0,) * 3, "none", "resize", 0, 1.0),
        4))
    config = detection.default_data_config("shapes")
    config.data_dir = str(tmp_path)
    with pytest.raises(StopIteration):
        detection.train_batches(config, global_batch_size=8, num_devices=1, seed=3, start_step=2,
                                process_index=process_index, process_count=process_count)
    assert seen == [("shapes", {"global_batch_size": 8, "seed": 3, "start_step": 2,
                                "shard": (process_index, process_count)})]


@pytest.mark.parametrize("field, value, valid", [
    ("train_augmentation", "pad_crop", r"expected one of \['none', 'pad_crop_flip'"),
    ("eval_transform", "resize_centre_crop", r"expected one of \['resize', 'resize_center_crop'"),
    ("crop_padding", -2, r"expected an integer >= 0"),
    ("crop_fraction", 0.0, r"expected a number in \(0, 1\]"),
    ("randaugment_layers", 11, r"expected an integer in \[0, 10\]"),
    ("randaugment_magnitude", -1.0, r"expected a number in \[0, 10\]"),
])
def test_transforms_fields_are_checked(field, value, valid):
    """A misspelt augmentation fell through `train`'s else branch to the Inception crop, and a
    misspelt eval transform to a plain resize, silently; crop_fraction=0 raised
    ZeroDivisionError inside the map."""
    fields = dict(out_shape=(8, 8, 3), native_hw=(8, 8), mean=(0.0,) * 3, std=(1.0,) * 3,
                  train_augmentation="none", eval_transform="resize", crop_padding=0,
                  crop_fraction=1.0)
    with pytest.raises(ValueError, match=rf"^Transforms: {field}={re.escape(repr(value))} is "
                                         rf"invalid; {valid}"):
        Transforms(**fields | {field: value})


# ------------------------------------------------------------------------------ RandAugment
# `Transforms.train` digests recorded with the code before RandAugment existed (no resize in
# either case, so the bytes only depend on exact elementwise float ops and the stateless draws).
RECORDED_TRANSFORMS = {
    "none": "4afbfd85b31ecd8fc0bff49e90b6eb3d73e9b96dac94ff0b76b97608ba24b7dc",
    "pad_crop_flip": "171fa61fe9c9ae3fba026170724c76c4fb6f4fef88d3e2428ba3c53803e981f9",
}


@pytest.mark.parametrize("augmentation,shape", [("none", (8, 8, 1)),
                                                ("pad_crop_flip", (12, 10, 3))])
def test_train_transform_without_randaugment_is_unchanged(augmentation, shape):
    c = shape[-1]
    transforms = Transforms(shape, shape[:2], (0.45,) * c, (0.25,) * c, augmentation, "resize", 4,
                            0.875)
    images = np.random.default_rng(5).integers(0, 256, (8, *shape), dtype=np.uint8)
    digest = hashlib.sha256()
    for k in range(8):
        digest.update(transforms.train(images[k], tf.constant([k, 2024], tf.int64)).numpy()
                      .tobytes())
    assert digest.hexdigest() == RECORDED_TRANSFORMS[augmentation]


def test_pad_crop_flip_is_a_crop_of_the_zero_padded_image_or_its_mirror():
    """Against a NumPy model of CIFAR's augmentation (He et al. 2016, §4.2): each of 200 outputs
    (mean 0, std 1, so pixels / 255 exactly) equals exactly one of the 9 x 9 crops of the image
    zero-padded by 4 on every side, or its left-right mirror. The draws spread over the offsets
    (all 9 row and all 9 column offsets, each 200/9 ~ 22 times, held to 3..42, i.e. +-4.5 sd;
    about 74 of the 81 pairs expected, at least 55 required) and mirror about half the outputs
    (binomial(200, 1/2): 100 +- 30, i.e. 4.2 sd)."""
    shape, pad, draws = (12, 10, 3), 4, 200
    transforms = Transforms(shape, shape[:2], (0.0,) * 3, (1.0,) * 3, "pad_crop_flip", "resize",
                            pad, 0.875)
    # no zero pixel, so the padding is distinguishable and every crop is different
    image = np.random.default_rng(8).integers(1, 256, shape, dtype=np.uint8)
    padded = np.pad(image.astype(np.float32) / 255, ((pad, pad), (pad, pad), (0, 0)))
    offsets = list(itertools.product(range(2 * pad + 1), repeat=2))
    crops = np.stack([padded[dy:dy + shape[0], dx:dx + shape[1]] for dy, dx in offsets])
    candidates = np.concatenate([crops, crops[:, :, ::-1]])  # [81 x (no flip, flip)]
    augment = tf.function(lambda seed: transforms.train(tf.constant(image), seed))
    found = []
    for k in range(draws):
        out = augment(tf.constant([k, 2024], tf.int64)).numpy()
        match = np.flatnonzero((candidates == out).all(axis=(1, 2, 3)))
        assert len(match) == 1, (k, match)
        found.append(divmod(int(match[0]), len(offsets)))
    flips = sum(flip for flip, _ in found)
    pairs = [offsets[i] for _, i in found]
    assert abs(flips - draws / 2) <= 30, flips
    for axis in range(2):
        counts = np.bincount([pair[axis] for pair in pairs], minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1 and counts.min() >= 3 and counts.max() <= 42, counts
    assert len(set(pairs)) >= 55, len(set(pairs))


def test_random_resized_crop_keeps_its_seeds_without_randaugment():
    """The crop and flip keys are still `stateless_split(key, 2)`; RandAugment folds its own."""
    transforms = Transforms((16, 16, 3), (None, None), (0.5,) * 3, (0.25,) * 3,
                            "random_resized_crop_flip", "resize_center_crop", 4, 0.875)
    image = np.random.default_rng(6).integers(0, 256, (21, 27, 3), dtype=np.uint8)
    for k in range(4):
        key = tf.constant([k, 1], tf.int64)
        crop, flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        want = _random_resized_crop(tf.cast(image, tf.float32) / 255.0, (16, 16, 3), crop)
        want = (tf.image.stateless_random_flip_left_right(want, seed=flip) - 0.5) / 0.25
        np.testing.assert_array_equal(transforms.train(image, key).numpy(), want.numpy())


def test_randaugment_layers_0_is_the_default(digits_config):
    default = _take(train_batches(digits_config(), global_batch_size=32, num_devices=1, seed=11,
                                  start_step=5), 3)
    off = _take(train_batches(digits_config(randaugment_layers=0, randaugment_magnitude=3),
                              global_batch_size=32, num_devices=1, seed=11, start_step=5), 3)
    assert _digest(off) == _digest(default)
    spec = resolve(ml_collections.ConfigDict({"name": "digits"}))  # an old config
    assert (spec.randaugment_layers, spec.randaugment_magnitude) == (0, 9.0)


def test_randaugment_changes_train_images_only_and_replays(digits_config):
    on = digits_config(randaugment_layers=2, randaugment_magnitude=9)
    plain = _take(train_batches(digits_config(), global_batch_size=64, num_devices=2, seed=3), 4)
    augmented = _take(train_batches(on, global_batch_size=64, num_devices=2, seed=3), 4)
    for x, y in zip(plain, augmented, strict=True):
        np.testing.assert_array_equal(x["label"], y["label"])  # same examples, same order
        assert x["image"].shape == y["image"].shape and y["image"].dtype == np.float32
        changed = (x["image"] != y["image"]).reshape(64, -1).any(-1)
        assert changed.mean() > 0.5  # only no-op draws (e.g. Identity twice) leave an image
    # Augmented pixels stay on the 0..255 level grid (RandAugment works on uint8).
    preset = presets.get_preset("digits")
    levels = (augmented[0]["image"].astype(np.float64) * preset.std[0] + preset.mean[0]) * 255
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-3)
    again = _take(train_batches(on, global_batch_size=64, num_devices=2, seed=3, start_step=2), 2)
    assert _digest(again) == _digest(augmented[2:])
    other_seed = next(train_batches(on, global_batch_size=64, num_devices=2, seed=4))
    assert not np.array_equal(other_seed["image"], augmented[0]["image"])
    evals = [list(eval_batches(config, global_batch_size=100, num_devices=1))
             for config in (digits_config(), on)]
    assert _digest(evals[0]) == _digest(evals[1])


def test_randaugment_on_resized_and_rgb_images(digits_config):
    batch = next(train_batches(digits_config(image_size=16, randaugment_layers=3),
                               global_batch_size=8, num_devices=1, seed=0))
    assert batch["image"].shape == (1, 8, 16, 16, 1) and np.isfinite(batch["image"]).all()
    fake = pipeline.default_data_config("fake")
    fake.randaugment_layers, fake.randaugment_magnitude = 2, 5.5
    batch = next(train_batches(fake, global_batch_size=8, num_devices=1, seed=0))
    assert batch["image"].shape == (1, 8, 32, 32, 3)


def test_randaugment_config_errors(digits_config):
    for layers in (-1, 11, 10**6):  # 10**6 used to pass here and then hang building the map
        _expect(rf"data: randaugment_layers={layers} is invalid; expected an integer in "
                r"\[0, 10\] \(RandAugment ops applied to each image; 0: none; the paper uses "
                r"1-3\)", get_dataset_info, digits_config(randaugment_layers=layers))
    assert get_dataset_info(digits_config(randaugment_layers=10)).num_classes == 10
    config = digits_config()
    config.randaugment_layers = None
    _expect(r"data: randaugment_layers=None is invalid", get_dataset_info, config)
    _expect(r"data: randaugment_magnitude=11.0 is invalid; expected a number in \[0, 10\] "
            r"\(RandAugment's magnitude scale, 10 the strongest\)",
            get_dataset_info, digits_config(randaugment_magnitude=11))
    config = ml_collections.ConfigDict({"name": "digits", "randaugment_magnitude": "9"})
    _expect(r"data: randaugment_magnitude='9' is invalid", get_dataset_info, config)
    _expect(r"data: randaugment_layers=2 is invalid; expected 0 when augment=False \(RandAugment "
            r"is a training augmentation: set augment=True, or randaugment_layers=0\)",
            train_batches, digits_config(augment=False, randaugment_layers=2),
            global_batch_size=8, num_devices=1, seed=0)
    get_dataset_info(digits_config(augment=False, randaugment_magnitude=3))  # off: any magnitude
    fake = pipeline.default_data_config("fake")
    fake.fake_image_shape, fake.randaugment_layers = (16, 16, 4), 2
    _expect(r"data: randaugment_layers=2 is invalid; expected 0 for 4-channel images",
            get_dataset_info, fake)


def test_randaugment_is_refused_for_dense_targets(tmp_path):
    from cnnjax.data import detection, segmentation

    for module in (detection, segmentation):
        config = module.default_data_config("shapes")
        config.data_dir = str(tmp_path)
        config.randaugment_layers = 1
        _expect(r"data: randaugment_layers=1 is invalid; expected 0: RandAugment is for "
                r"classification", module.get_dataset_info, config)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_dense_task_fields_are_refused_by_resolve_for_task(task, monkeypatch):
    """`spec.resolve_for_task` (check_config's data check, before TensorFlow) refuses what the
    dense-target pipelines refuse: RandAugment and the in-memory `fake` set (segmentation let
    both through to `open_whole_image_source`, after TensorFlow and JAX had started). Nothing
    is opened: the source is never reached."""
    from cnnjax.data import spec

    monkeypatch.setattr(pipeline.sources, "open_source", None)  # any I/O would fail loudly
    config = (spec.detection_data_config if task == "detection"
              else spec.segmentation_data_config)("shapes")
    config.randaugment_layers = 1
    _expect(r"data: randaugment_layers=1 is invalid; expected 0: RandAugment is for "
            r"classification", spec.resolve_for_task, config, task)
    config = (spec.detection_data_config if task == "detection"
              else spec.segmentation_data_config)("fake")
    _expect(r"data: name='fake' is invalid; .*(tfds dataset|boxes)", spec.resolve_for_task,
            config, task)


@pytest.mark.parametrize("name, field, split, message", [
    ("digits", "train_split", "train[:abc]", r"'digits' has splits \['train', 'test'\]; expected "
                                             r"a tfds split string such as 'train'"),
    ("digits", "eval_split", " test", r"'digits' has splits"),
    ("digits", "train_split", "train[:150%]", r"'digits' has splits .*; expected a tfds split"),
    ("shapes", "eval_split", "tset", r"'shapes' has splits \['train', 'test'\] \(slices like"),
    ("shapes", "train_split", "train[:90%]+valid", r"'shapes' has splits \['train', 'test'\]"),
    ("cifar10", "eval_split", "test[1:x]", r"expected a tfds split string such as 'train'"),
])
def test_a_bad_split_is_refused_before_the_dataset_is_opened(name, field, split, message,
                                                              monkeypatch):
    """A split tfds cannot parse, or a split name an offline dataset lacks, was refused only
    by the source's split count, after a first use had generated the dataset (10 s for
    shapes_multi, review BF); `resolve` refuses it without I/O."""
    from cnnjax.data import spec

    monkeypatch.setattr(pipeline.sources, "open_source", None)  # any I/O would fail loudly
    config = spec.default_data_config(name)
    config[field] = split
    _expect(rf"^data: {field}={re.escape(repr(split))} is invalid; {message}", spec.resolve,
            config)


@pytest.mark.parametrize("field", ["train_split", "eval_split"])
@pytest.mark.parametrize("name, tfds_name, split, message", [
    ("digits", "digits:1.0.0", "tset", r"'digits:1.0.0' has splits \['train', 'test'\]"),
    ("digits", "digits:1.*.*", "validation", r"'digits:1.\*.\*' has splits \['train', 'test'\]"),
    ("cifar10", "shapes", "validation", r"'shapes' has splits \['train', 'test'\] \(slices"),
])
def test_a_bad_split_of_the_dataset_read_is_refused_before_it_is_opened(
        name, tfds_name, split, message, field, monkeypatch):
    """The split names are those of the dataset read (`tfds_name`), not of the preset's, and a
    version in `tfds_name` still names the offline dataset: `digits:1.0.0` with 'tset' was
    generated first and only then refused by the source."""
    from cnnjax.data import spec

    monkeypatch.setattr(pipeline.sources, "open_source", None)  # any I/O would fail loudly
    config = spec.default_data_config(name)
    config.tfds_name = tfds_name
    config[field] = split
    _expect(rf"^data: {field}={re.escape(repr(split))} is invalid; {message}", spec.resolve,
            config)


@pytest.mark.parametrize("field", ["train_split", "eval_split"])
def test_a_split_of_the_dataset_read_resolves_whatever_the_preset_has(field, monkeypatch):
    """imagenette has a 'validation' split, digits (the preset) none: read from imagenette, it
    resolves, without I/O."""
    from cnnjax.data import spec

    monkeypatch.setattr(pipeline.sources, "open_source", None)
    config = spec.default_data_config("digits")
    config.tfds_name = "imagenette/320px-v2"
    config[field] = "validation"
    assert getattr(spec.resolve(config), field) == "validation"


@pytest.mark.parametrize("field", ["data_dir", "tfds_name", "train_split", "eval_split"])
def test_an_empty_string_is_refused_by_name(field):
    """'' is neither a folder nor a dataset nor a split: `tfds_name=''` fell back to the
    preset's dataset silently, `data_dir=''` reached tfds."""
    config = pipeline.default_data_config("digits")
    config[field] = ""
    _expect(rf"^data: {field}='' is invalid; expected a non-empty string or None", resolve,
            config)


def _fake_config(**fields):
    config = pipeline.default_data_config("fake")
    for key, value in fields.items():
        config[key] = value
    return config


def test_fake_shards_partition_a_split_that_does_not_divide_evenly():
    """10 fake examples over 3 shards are 3 + 3 + 4, in order: no example is dropped."""
    source = open_source(resolve(_fake_config(fake_num_train=10)))
    assert [source.num_examples("train", (i, 3)) for i in range(3)] == [3, 3, 4]

    def labels(shard):
        return np.array([x["label"] for x in source.read("train", shard).as_numpy_iterator()])

    whole = labels((0, 1))
    assert whole.shape == (10,)
    np.testing.assert_array_equal(np.concatenate([labels((i, 3)) for i in range(3)]), whole)


def test_fake_train_and_eval_splits_differ_and_are_the_same_on_every_open():
    """Evaluating on the training examples would hide overfitting; each split is seeded by its
    own index, identically on every open."""
    def first(split):
        source = open_source(resolve(_fake_config()))
        return next(source.read(split, (0, 1)).as_numpy_iterator())["image"]

    train, test = first("train"), first("test")
    assert not np.array_equal(train, test)
    np.testing.assert_array_equal(train, first("train"))
    np.testing.assert_array_equal(test, first("test"))


def test_eval_batches_refuse_an_empty_eval_split(digits_config):
    """Called directly (the engine checks get_dataset_info first), eval_batches on an empty
    split yielded no batch and no error (review BF)."""
    _expect(r"^data: eval_split='test\[:0\]' is invalid; it holds no examples of 'digits'",
            pipeline.eval_batches, digits_config(eval_split="test[:0]"), global_batch_size=8,
            num_devices=1)


def test_workdirs_from_before_randaugment_still_resume():
    """A config.json written before the RandAugment fields existed lacks them; LEGACY_DEFAULTS
    says it had them off, so it stays compatible with today's default data config."""
    from cnnjax.train import config as config_lib

    current = config_lib.default_config()
    current.data = pipeline.default_data_config("digits")
    new = config_lib.flatten(current)
    assert new["data.randaugment_layers"] == 0 and new["data.randaugment_magnitude"] == 9
    old = {k: v for k, v in new.items() if not k.startswith("data.randaugment_")}
    assert config_lib.incompatible_fields(old, new) == []
    assert config_lib.incompatible_fields(new, old) == []
    assert config_lib.incompatible_fields(old, dict(new, **{"data.randaugment_layers": 2})) == [
        "data.randaugment_layers"]
    assert config_lib.incompatible_fields(
        old, dict(new, **{"data.randaugment_magnitude": 5})) == ["data.randaugment_magnitude"]


def test_train_and_eval_datasets_run_deterministic_without_the_autotune_thread(digits_config,
                                                                               monkeypatch):
    """Both dataset kinds carry `_options()`: deterministic order, and tf.data's autotuning off
    (tearing an autotuned iterator down waited for the autotune thread's next wake-up: 8.6 s of
    `make train`'s 26 s)."""
    spec = resolve(digits_config(cache=False))
    source = open_source(spec)
    train = pipeline.epoch_dataset(spec, source, lambda ex, key: ex, global_batch_size=128,
                                   seed=0, start_step=0, shard=(0, 1))
    seen = []
    real_options = pipeline._options
    monkeypatch.setattr(pipeline, "_options", lambda: seen.append(1) or real_options())
    next(pipeline.eval_batches(digits_config(), global_batch_size=128, num_devices=1))
    assert seen, "eval_batches no longer sets cnnjax's tf.data options"
    for options in (train.options(), real_options()):
        assert options.deterministic is True
        assert options.autotune.enabled is False

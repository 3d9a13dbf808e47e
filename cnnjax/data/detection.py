"""tf.data input for detection: images with padded ground-truth boxes (`config.task="detection"`).

The same datasets, presets, sharding and determinism as `pipeline.py` (its config resolution,
sources, image transforms, batch layout and eval padding are imported; its per-epoch shuffle and
stateless-key scheme is mirrored in `train_batches`, as `pipeline._train_dataset` is written for
`{image, label}` examples), with each example's
tfds `objects` (`bbox` `[ymin, xmin, ymax, xmax]` normalized, `label`) turned into
`max_boxes` rows of `(x1, y1, x2, y2)` pixels of the output image, class labels and a validity
mask (objects beyond `max_boxes` are dropped, in stored order). Batches:

    image f32 [D, B, H, W, C]   boxes f32 [D, B, G, 4]   labels i32 [D, B, G]
    box_valid bool [D, B, G]

plus `mask` f32 [D, B] from `eval_batches` (0 on the padding of the last batch).

The data config is `pipeline.default_data_config(name)` plus `max_boxes`
(`default_data_config` here). `augment=True` means a random horizontal flip of image and boxes
(drawn statelessly from `(seed, epoch, process, position)` like the classification pipeline, so
`start_step=k` resumes exactly); the preset's classification augmentation (crops) is not used,
as it would cut boxes. Use `tfds_name` for a detection set, e.g. `shapes_multi` (64x64 scenes of
1-4 shapes) with `name="shapes"` (its normalization).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cnnjax.data import pipeline
from cnnjax.utils.validation import check_non_negative_int, check_positive_int, invalid

_OWNER = "data"
DEFAULT_MAX_BOXES = 16
_AUTOTUNE = tf.data.AUTOTUNE


def default_data_config(name: str = "shapes") -> ml_collections.ConfigDict:
    """`pipeline.default_data_config(name)` plus `max_boxes` (ground-truth rows per image)."""
    config = pipeline.default_data_config(name)
    config.max_boxes = DEFAULT_MAX_BOXES
    return config


def _split(data_config: Any) -> tuple[ml_collections.ConfigDict, int]:
    """`(the classification data config, max_boxes)`; validates `max_boxes`."""
    if not hasattr(data_config, "items"):
        raise invalid(_OWNER, "config", data_config, "expected an ml_collections ConfigDict")
    fields = dict(data_config.items())
    max_boxes = check_positive_int(_OWNER, "max_boxes", fields.pop("max_boxes",
                                                                   DEFAULT_MAX_BOXES))
    if fields.get("name") == "fake":
        raise invalid(_OWNER, "name", "fake",
                      "detection needs a tfds dataset with `objects` boxes, e.g. shapes")
    for arg in ("classes", "train_examples_per_class"):  # class subsets: classification only
        if fields.get(arg) is not None:
            raise invalid(_OWNER, arg, fields[arg],
                          "expected None: class subsets are not supported for detection")
    return ml_collections.ConfigDict(fields), max_boxes


class _DetectionSource(pipeline._TfdsSource):
    """A tfds dataset read with its `objects` (boxes and classes) next to image and label."""

    def __init__(self, spec: Any):
        super().__init__(spec)
        features = self.builder.info.features
        if "objects" not in features or "bbox" not in features["objects"].feature:
            raise invalid(_OWNER, "tfds_name", spec.tfds_name,
                          "expected a dataset with `objects/bbox` and `objects/label` features")

    def read(self, split: str, shard: tuple[int, int]) -> tf.data.Dataset:
        ds = self.builder.as_dataset(
            split=self._shard_split(split, shard),
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=False),
        )
        return ds.map(lambda ex: {"image": ex["image"], "bbox": ex["objects"]["bbox"],
                                  "classes": ex["objects"]["label"]})


def _open(data_config: Any) -> tuple[Any, _DetectionSource, Any, int]:
    """`(spec, source, transforms, max_boxes)` of a detection data config."""
    config, max_boxes = _split(data_config)
    spec = pipeline._resolve(config)
    if spec.preset.tfds_name is None:
        raise invalid(_OWNER, "name", spec.preset.name, "expected a tfds dataset")
    pipeline.hide_gpus_from_tensorflow()
    source = _DetectionSource(spec)
    return spec, source, pipeline._transforms(spec, source), max_boxes


def get_dataset_info(data_config: Any) -> pipeline.DatasetInfo:
    """`pipeline.get_dataset_info` of the config without its detection fields, named after the
    tfds dataset when `tfds_name` overrides the preset's (e.g. `shapes_multi`)."""
    config = _split(data_config)[0]
    info = pipeline.get_dataset_info(config)
    tfds_name = config.get("tfds_name")
    return dataclasses.replace(info, name=tfds_name) if tfds_name else info


def _targets(bbox: tf.Tensor, classes: tf.Tensor, hw: tuple[int, int], max_boxes: int,
             flip: tf.Tensor) -> dict[str, tf.Tensor]:
    """Padded `(x1, y1, x2, y2)` pixel boxes, labels and validity of one example."""
    count = tf.minimum(tf.shape(classes)[0], max_boxes)
    bbox = tf.cast(bbox[:count], tf.float32)
    height, width = float(hw[0]), float(hw[1])
    x1, x2 = bbox[:, 1] * width, bbox[:, 3] * width
    x1, x2 = tf.where(flip, width - x2, x1), tf.where(flip, width - x1, x2)
    boxes = tf.stack([x1, bbox[:, 0] * height, x2, bbox[:, 2] * height], axis=1)
    missing = max_boxes - count
    boxes = tf.pad(boxes, [[0, missing], [0, 0]])
    boxes.set_shape((max_boxes, 4))
    labels = tf.pad(tf.cast(classes[:count], tf.int32), [[0, missing]])
    labels.set_shape((max_boxes,))
    return {"boxes": boxes, "labels": labels, "box_valid": tf.range(max_boxes) < count}


def train_batches(
    data_config: Any,
    *,
    global_batch_size: int,
    num_devices: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[pipeline.Batch]:
    """Infinite detection batches (layout in the module docstring), exactly resumable.

    Batch `k` is a deterministic function of `(data_config, seed, k)` and the process layout,
    with `pipeline.train_batches`' epoch shuffles and stateless per-example keys.
    """
    spec, source, transforms, max_boxes = _open(data_config)
    process_batch = pipeline._check_layout(global_batch_size, num_devices, process_index,
                                           process_count)
    check_non_negative_int(_OWNER, "seed", seed)
    check_non_negative_int(_OWNER, "start_step", start_step)
    num_train = source.num_examples(spec.train_split)
    steps = pipeline.steps_per_epoch(num_train, global_batch_size)
    if steps == 0:
        raise invalid(_OWNER, "global_batch_size", global_batch_size,
                      f"expected at most the {num_train} examples of {spec.preset.name!r} "
                      f"split {spec.train_split!r} (an epoch would have no step)")
    shard = (process_index, process_count)
    base = source.read(spec.train_split, shard)
    if spec.cache:
        base = base.map(lambda ex: {**ex, "image": source.decode(ex["image"])},
                        num_parallel_calls=_AUTOTUNE).cache()
        base.reduce(np.int64(0), lambda count, _: count + 1)  # fill the cache now (pipeline.py)
    hw = transforms.out_shape[:2]
    first_epoch, first_skip = divmod(start_step, steps)
    seed = int(seed) & (2**63 - 1)
    fold_in = tf.random.experimental.stateless_fold_in

    def epoch_dataset(epoch: tf.Tensor) -> tf.data.Dataset:
        key = tf.stack([tf.constant(seed, tf.int64), epoch])
        shuffle_seed = tf.random.stateless_uniform(
            [], seed=key, minval=0, maxval=2**62, dtype=tf.int64)
        process_key = fold_in(key, shard[0])
        ds = base.shuffle(spec.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        ds = ds.take(steps * process_batch).enumerate()
        skip = tf.constant(first_skip * process_batch, tf.int64)
        ds = ds.skip(tf.where(epoch == first_epoch, skip, tf.zeros_like(skip)))

        def preprocess(position: tf.Tensor, ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            image = transforms.eval(ex["image"] if spec.cache else source.decode(ex["image"]))
            flip = tf.constant(False)
            if spec.augment:
                draw = tf.random.stateless_uniform([], seed=fold_in(process_key, position))
                flip = draw < 0.5
                image = tf.where(flip, tf.reverse(image, axis=[1]), image)
            return {"image": image, **_targets(ex["bbox"], ex["classes"], hw, max_boxes, flip)}

        ds = ds.map(preprocess, num_parallel_calls=_AUTOTUNE)
        return ds.batch(process_batch, drop_remainder=True)

    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_dataset)
    ds = ds.prefetch(_AUTOTUNE).with_options(pipeline._options())
    return (pipeline._device_reshape(batch, num_devices) for batch in ds.as_numpy_iterator())


def eval_batches(
    data_config: Any,
    *,
    global_batch_size: int,
    num_devices: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[pipeline.Batch]:
    """One pass over the eval split in stored order, the last batch zero-padded (`mask` 0).

    Every process yields the same number of batches (the largest shard's), as in `pipeline.py`.
    """
    spec, source, transforms, max_boxes = _open(data_config)
    process_batch = pipeline._check_layout(global_batch_size, num_devices, process_index,
                                           process_count)
    shard = (process_index, process_count)
    largest = max(source.num_examples(spec.eval_split, (i, process_count))
                  for i in range(process_count))
    num_batches = math.ceil(largest / process_batch)
    hw = transforms.out_shape[:2]

    def preprocess(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": transforms.eval(source.decode(ex["image"])),
                **_targets(ex["bbox"], ex["classes"], hw, max_boxes, tf.constant(False)),
                "mask": tf.constant(1.0, tf.float32)}

    ds = source.read(spec.eval_split, shard).map(preprocess, num_parallel_calls=_AUTOTUNE)
    ds = ds.batch(process_batch).prefetch(_AUTOTUNE).with_options(pipeline._options())
    empty = {
        "image": np.zeros((0, *transforms.out_shape), np.float32),
        "boxes": np.zeros((0, max_boxes, 4), np.float32),
        "labels": np.zeros((0, max_boxes), np.int32),
        "box_valid": np.zeros((0, max_boxes), bool),
        "mask": np.zeros((0,), np.float32),
    }
    count = 0
    for batch in ds.as_numpy_iterator():
        yield pipeline._device_reshape(pipeline._pad(batch, process_batch), num_devices)
        count += 1
    for _ in range(count, num_batches):  # a shorter shard than another process's: all padding
        yield pipeline._device_reshape(pipeline._pad(empty, process_batch), num_devices)

"""tf.data input for semantic segmentation: images with per-pixel class maps
(`config.task="segmentation"`).

The same datasets, presets, sharding and determinism as `pipeline.py` (the config resolution of
`spec.py`, the sources of `sources.py`, the image transforms of `transforms.py`, and the batch
layout, eval padding and epoch scheme `pipeline.epoch_dataset` are reused; only the per-example
`preprocess` differs). A dataset needs a `segmentation_mask` image feature and a
`ClassMapLabels` saying what its stored values mean: either class indices named in its metadata
(`segmentation_classes`), as cnnjax's offline `shapes_segmentation`
(64x64 scenes of 1-4 shapes, 5 classes with background; use it with `name="shapes"` for its
normalization), or a known catalogue set (`CATALOGUE_LABELS`: Oxford-IIIT Pet's trimaps).
Stored values that are no class become `IGNORE_LABEL`, which neither the loss nor the metrics
count. Batches:

    image f32 [D, B, H, W, C]   labels i32 [D, B, H, W]

plus `mask` f32 [D, B] from `eval_batches` (0 on the padding of the last batch). Class maps are
resized with the image by nearest neighbour; `augment=True` is a random horizontal flip of both
(the preset's crops are not used), drawn statelessly as in the other pipelines, and with
`scale_range=(low, high)` also DeepLab's random scale and crop (`_random_scale_crop`; refused
with `augment=False`, which would drop it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from cnnjax.data import pipeline
from cnnjax.data.sources import TfdsSource
from cnnjax.data.spec import segmentation_data_config as default_data_config  # noqa: F401 (API)
from cnnjax.data.spec import split_segmentation_fields
from cnnjax.utils.validation import invalid

_OWNER = "data"
_AUTOTUNE = tf.data.AUTOTUNE


IGNORE_LABEL = 255
"""The label of pixels no class is scored on (object borders, unlabelled regions): PASCAL VOC's
and Cityscapes' convention."""


@dataclasses.dataclass(frozen=True)
class ClassMapLabels:
    """What the values of a stored uint8 class map mean: `classes[i]` is class `i` (each name
    once), and stored value `v` is class `classes.index(names[v])`, or `IGNORE_LABEL` where
    `names[v]` is None or `v >= len(names)`."""

    classes: tuple[str, ...]
    names: tuple[str | None, ...]

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if len(self.classes) > IGNORE_LABEL:  # else class 255 would be IGNORE_LABEL
            raise invalid(owner, "classes", f"{len(self.classes)} classes",
                          f"expected at most {IGNORE_LABEL}: class indices are 0..num_classes-1 "
                          f"and {IGNORE_LABEL} is IGNORE_LABEL, which no step scores")
        repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if repeated:  # else the repeat is a class no stored value maps to (`lookup`)
            raise invalid(owner, "classes", self.classes,
                          f"expected each class name at most once; repeated: {repeated}")
        if len(self.names) > 256:
            raise invalid(owner, "names", f"{len(self.names)} stored values",
                          "expected at most 256: class maps are stored as uint8")
        unknown = sorted({n for n in self.names if n is not None} - set(self.classes))
        if unknown:
            raise invalid(owner, "names", unknown,
                          f"expected each name None (ignored) or one of the classes "
                          f"{list(self.classes)}")

    def lookup(self) -> np.ndarray:
        """The int32 `[256]` table from stored value to class index or `IGNORE_LABEL`."""
        table = np.full(256, IGNORE_LABEL, np.int32)
        for value, name in enumerate(self.names):
            if name is not None:
                table[value] = self.classes.index(name)
        return table


CATALOGUE_LABELS: dict[str, ClassMapLabels] = {
    # Oxford-IIIT Pet trimaps (Parkhi et al. 2012): 1 pet, 2 background, 3 the unclassified band
    # along the pet's outline, which the dataset's authors leave unscored.
    "oxford_iiit_pet": ClassMapLabels(classes=("background", "pet"),
                                      names=(None, "pet", "background", None)),
}


class _SegmentationSource(TfdsSource):
    """A tfds dataset read with its `segmentation_mask` next to the image."""

    labels: ClassMapLabels

    def _num_classes(self, spec: Any, features: Any) -> int:
        """The classes of the dataset's `ClassMapLabels` (a ValueError for a set without)."""
        classes = (self.builder.info.metadata or {}).get("segmentation_classes")
        known = CATALOGUE_LABELS.get(self.builder.name)
        if "segmentation_mask" not in features or not (classes or known):
            raise invalid(_OWNER, "tfds_name", spec.tfds_name,
                          "expected a dataset with a `segmentation_mask` feature and "
                          "`segmentation_classes` in its metadata, e.g. shapes_segmentation, or "
                          f"one of {sorted(CATALOGUE_LABELS)}")
        self.labels = known or ClassMapLabels(classes=tuple(classes), names=tuple(classes))
        return len(self.labels.classes)

    def read(self, split: str, shard: tuple[int, int]) -> tf.data.Dataset:
        ds = self.stored_examples(split, shard)
        table = tf.constant(self.labels.lookup())
        return ds.map(lambda ex: {"image": ex["image"],
                                  "labels": tf.gather(table, tf.cast(ex["segmentation_mask"],
                                                                     tf.int32))})


def _open(data_config: Any) -> tuple[Any, _SegmentationSource, Any, tuple[float, float] | None]:
    """`(spec, source, transforms, scale_range)` of a segmentation data config (`resolve` and
    `split_segmentation_fields` check it)."""
    spec, scale_range = split_segmentation_fields(data_config)
    source, transforms = pipeline.open_whole_image_source(spec, _SegmentationSource)
    return spec, source, transforms, scale_range


def eval_split_name(data_config: Any) -> str:
    """The split `eval_batches` reads: `data.eval_split`, else the dataset preset's."""
    return split_segmentation_fields(data_config)[0].eval_split


def check_train_epoch(data_config: Any, *, global_batch_size: int, process_count: int) -> int:
    """`pipeline.check_train_epoch` of this task's data config (`check_config`'s check that
    every process's shard of the train split holds a batch)."""
    spec, source, _, _ = _open(data_config)
    return pipeline.train_epoch_steps(spec, source, global_batch_size=global_batch_size,
                                      process_count=process_count)


def get_dataset_info(data_config: Any) -> pipeline.DatasetInfo:
    """Classes (background included), output image shape and split sizes, named after the tfds
    dataset when `tfds_name` overrides the preset's."""
    spec, source, transforms, _ = _open(data_config)
    return pipeline.dataset_info(spec, source, transforms,
                                 data_config.get("tfds_name") or spec.preset.name)


def _class_map(labels: tf.Tensor, hw: tuple[int, int], flip: tf.Tensor) -> tf.Tensor:
    """A stored `[h, w, 1]` class map as int32 `[H, W]` of the output size (nearest neighbour),
    mirrored with `flip`."""
    resized = tf.image.resize(labels, hw, method="nearest")
    resized = tf.where(flip, tf.reverse(resized, axis=[1]), resized)
    out = tf.cast(resized[..., 0], tf.int32)
    out.set_shape(hw)
    return out


def _random_scale_crop(image: tf.Tensor, labels: tf.Tensor, scale_range: tuple[float, float],
                       key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The FCN/DeepLab training augmentation on an (already resized, flipped) example: both
    scaled by one factor drawn uniformly from `scale_range` (image bilinear, class map nearest),
    padded at the bottom/right to at least the output size (image with 0, the normalized mean
    colour; class map with IGNORE_LABEL, so padding is never scored), then cropped back to the
    output size at one random offset. Stateless in `key`, hence replayable on resume."""
    hw = tuple(int(n) for n in image.shape[:2])
    scale_key, crop_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    scale = tf.random.stateless_uniform([], seed=scale_key, minval=scale_range[0],
                                        maxval=scale_range[1])
    size = tf.maximum(tf.cast(tf.round(tf.constant(hw, tf.float32) * scale), tf.int32), 1)
    image = tf.image.resize(image, size, method="bilinear")
    labels = tf.image.resize(labels[..., None], size, method="nearest")[..., 0]
    pad = tf.maximum(tf.constant(hw) - size, 0)
    image = tf.pad(image, [[0, pad[0]], [0, pad[1]], [0, 0]])
    labels = tf.pad(labels, [[0, pad[0]], [0, pad[1]]], constant_values=IGNORE_LABEL)
    room = tf.shape(labels) - tf.constant(hw) + 1
    top_left = tf.random.stateless_uniform([2], seed=crop_key, maxval=2**30, dtype=tf.int32) % room
    image = tf.slice(image, [top_left[0], top_left[1], 0], [*hw, -1])
    labels = tf.slice(labels, top_left, hw)
    image.set_shape((*hw, image.shape[-1]))
    labels.set_shape(hw)
    return image, labels


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
    """Infinite segmentation batches (layout in the module docstring), exactly resumable:
    batch `k` is a deterministic function of `(data_config, seed, k)` and the process layout."""
    pipeline.check_train_layout(global_batch_size, num_devices, seed, start_step, process_index,
                                process_count)
    spec, source, transforms, scale_range = _open(data_config)  # scale_range None unless augment
    hw = transforms.out_shape[:2]

    def preprocess(ex: dict[str, tf.Tensor], key: tf.Tensor) -> dict[str, tf.Tensor]:
        image, flip = pipeline.flipped_whole_image(spec, transforms, ex["image"], key)
        labels = _class_map(ex["labels"], hw, flip)
        if scale_range is not None:
            image, labels = _random_scale_crop(image, labels, scale_range,
                                               tf.random.experimental.stateless_fold_in(key, 1))
        return {"image": image, "labels": labels}

    ds = pipeline.epoch_dataset(spec, source, preprocess, global_batch_size=global_batch_size,
                                seed=seed, start_step=start_step,
                                shard=(process_index, process_count))
    return pipeline.device_batches(ds, num_devices)


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
    pipeline.check_eval_layout(global_batch_size, num_devices, process_index, process_count)
    spec, source, transforms, _ = _open(data_config)
    hw = transforms.out_shape[:2]

    def preprocess(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": transforms.eval(source.decode(ex["image"])),
                "labels": _class_map(ex["labels"], hw, tf.constant(False))}

    empty = {"image": np.zeros((0, *transforms.out_shape), np.float32),
             "labels": np.zeros((0, *hw), np.int32)}
    return pipeline.padded_eval_batches(
        spec, source, preprocess, empty, global_batch_size=global_batch_size,
        num_devices=num_devices, process_index=process_index, process_count=process_count)

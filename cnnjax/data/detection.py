"""tf.data input for detection: images with padded ground-truth boxes (`config.task="detection"`).

The same datasets, presets, sharding and determinism as `pipeline.py` (the config resolution of
`spec.py`, the sources of `sources.py`, the image transforms of `transforms.py`, and the batch
layout, eval padding and epoch scheme, `pipeline.epoch_dataset`, are reused; only the
per-example `preprocess` differs), with each example's
tfds `objects` (`bbox` `[ymin, xmin, ymax, xmax]` normalized, `label`) turned into
`max_boxes` rows of `(x1, y1, x2, y2)` pixels of the output image, class labels and a validity
mask (objects beyond `max_boxes` are dropped, in stored order; training also drops boxes without
area, x2 <= x1 or y2 <= y1, as torchvision's detection references do, and the eval keeps them, as
pycocotools does). Batches:

    image f32 [D, B, H, W, C]   boxes f32 [D, B, G, 4]   labels i32 [D, B, G]
    box_valid bool [D, B, G]

plus `mask` f32 [D, B] from `eval_batches` (0 on the padding of the last batch), and with
`data.proposals.method` set (`cnnjax.data.proposals`, e.g. selective search) each image's external
region proposals in the same pixel frame, flipped with it:

    proposals f32 [D, B, P, 4]   proposal_valid bool [D, B, P]

The data config is `spec.default_data_config(name)` plus `max_boxes` and `proposals`
(`default_data_config` here, defined as `spec.detection_data_config`). `augment=True` means a
random horizontal flip of image and boxes (drawn statelessly from `(seed, epoch, process,
position)` like the classification pipeline, so `start_step=k` resumes exactly); the preset's
classification augmentation (crops) is not used, as it would cut boxes. Use `tfds_name` for a
detection set, e.g. `shapes_multi` (64x64 scenes of 1-4 shapes) with `name="shapes"` (its
normalization).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from cnnjax.data import pipeline
from cnnjax.data import proposals as proposals_lib
from cnnjax.data.proposals import ProposalSpec
from cnnjax.data.sources import TfdsSource
from cnnjax.data.spec import check_proposals_set, resolve, split_detection_fields
from cnnjax.data.spec import detection_data_config as default_data_config  # noqa: F401 (API)
from cnnjax.utils.validation import invalid

_OWNER = "data"
_AUTOTUNE = tf.data.AUTOTUNE


class _DetectionSource(TfdsSource):
    """A tfds dataset read with its `objects` (boxes and classes) next to image and label, and
    with each image's cached external proposals (`proposals`, `proposal_count`) if asked for."""

    def __init__(self, spec: Any, proposals: ProposalSpec | None):
        super().__init__(spec)
        self.proposals = proposals
        # PASCAL VOC marks hard objects; they are dropped from training targets (py-faster-rcnn's
        # use_diff=False) and ignored by the eval (`box_difficult`, DetectionEvaluator).
        self.has_difficult = "is_difficult" in self.builder.info.features["objects"].feature

    def _num_classes(self, spec: Any, features: Any) -> int:
        """The classes of `objects/label` (a ValueError for a set without boxes)."""
        objects = features["objects"].feature if "objects" in features else {}
        if "bbox" not in objects or "label" not in objects:
            raise invalid(_OWNER, "tfds_name", spec.tfds_name,
                          "expected a dataset with `objects/bbox` and `objects/label` features")
        return int(objects["label"].num_classes)

    def read(self, split: str, shard: tuple[int, int]) -> tf.data.Dataset:
        ds = self.stored_examples(split, shard, with_ids=self.proposals is not None)
        lookup = None
        if self.proposals is not None:  # the whole split's table: every shard's ids are in it
            lookup = proposals_lib.ProposalLookup(
                proposals_lib.load_table(self.builder, split, self.proposals))

        def fields(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            out = {"image": ex["image"], "bbox": ex["objects"]["bbox"],
                   "classes": ex["objects"]["label"]}
            if self.has_difficult:
                out["difficult"] = ex["objects"]["is_difficult"]
            if lookup is not None:
                out["proposals"], out["proposal_count"] = lookup(ex["tfds_id"])
            return out

        return ds.map(fields)


def _open(data_config: Any) -> tuple[Any, _DetectionSource, Any, int]:
    """`(spec, source, transforms, max_boxes)` of a detection data config."""
    config, max_boxes, proposals = split_detection_fields(data_config)
    spec = resolve(config, preset_crop=False)  # whole image + flip (`flipped_whole_image`)
    source, transforms = pipeline.open_whole_image_source(
        spec, lambda spec: _DetectionSource(spec, proposals))
    return spec, source, transforms, max_boxes


def prepare_proposals(data_config: Any) -> dict[str, str]:
    """Computes (or finds) the cached external proposals of the config's train and eval splits
    ahead of training, e.g. as a cluster job of its own (`python -m experiments.proposals`);
    returns `{split: cache file}`. A ValueError if `data.proposals` is unset."""
    check_proposals_set(data_config)
    spec, source, _, _ = _open(data_config)
    splits = list(dict.fromkeys((spec.train_split, spec.eval_split)))
    for split in splits:  # an unknown split: the usual ValueError, before any split's work
        source.num_examples(split)
    paths = {}
    for split in splits:
        proposals_lib.load_table(source.builder, split, source.proposals)
        paths[split] = source.proposals.cache_path(source.builder, split)
    return paths


def head_split(data_config: Any, split: str, num_examples: int) -> str:
    """A tfds split string of the first `num_examples` of `split` (all of it if shorter), which
    may itself be a slice or a '+' join (`train[:90%]`: tfds cannot slice a slice), e.g.
    `train[0:6]`; its parts in stored order."""
    _, source, _, _ = _open(data_config)
    source.num_examples(split)  # an unknown split: the usual ValueError naming it
    return head_of(split, source.builder.info.splits, num_examples)


def head_of(split: str, splits: Any, num_examples: int) -> str:
    """`head_split` given the dataset's `{name: tfds SplitInfo}`."""
    import tensorflow_datasets as tfds

    parts, left = [], num_examples
    for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits):
        start = part.from_ or 0
        stop = splits[part.splitname].num_examples if part.to is None else part.to
        take = min(left, max(0, stop - start))
        if take:
            parts.append(f"{part.splitname}[{start}:{start + take}]")
            left -= take
        if not left:
            break
    return "+".join(parts)


def eval_split_name(data_config: Any) -> str:
    """The split `eval_batches` reads: `data.eval_split`, else the dataset preset's."""
    return pipeline.eval_split_name(split_detection_fields(data_config)[0])


def check_train_epoch(data_config: Any, *, global_batch_size: int, process_count: int) -> int:
    """`pipeline.check_train_epoch` of this task's data config (`check_config`'s check that
    every process's shard of the train split holds a batch)."""
    spec, source, _, _ = _open(data_config)
    return pipeline.train_epoch_steps(spec, source, global_batch_size=global_batch_size,
                                      process_count=process_count)


def get_dataset_info(data_config: Any) -> pipeline.DatasetInfo:
    """Classes (of `objects/label`), output image shape and split sizes, named after the tfds
    dataset when `tfds_name` overrides the preset's (e.g. `shapes_multi`)."""
    spec, source, transforms, _ = _open(data_config)
    return pipeline.dataset_info(spec, source, transforms,
                                 data_config.get("tfds_name") or spec.preset.name)


def _to_pixels(bbox: tf.Tensor, hw: tuple[int, int], flip: tf.Tensor) -> tf.Tensor:
    """Normalized `[ymin, xmin, ymax, xmax]` rows of `bbox` as `(x1, y1, x2, y2)` pixels of the
    `hw` output image (mirrored with `flip`)."""
    bbox = tf.cast(bbox, tf.float32)
    height, width = float(hw[0]), float(hw[1])
    x1, x2 = bbox[:, 1] * width, bbox[:, 3] * width
    x1, x2 = tf.where(flip, width - x2, x1), tf.where(flip, width - x1, x2)
    return tf.stack([x1, bbox[:, 0] * height, x2, bbox[:, 2] * height], axis=1)


def _padded_rows(boxes: tf.Tensor, count: tf.Tensor, rows: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The first `count` rows of `boxes` zero-padded to `rows`, and their validity `[rows]`."""
    boxes = tf.pad(boxes[:count], [[0, rows - count], [0, 0]])
    boxes.set_shape((rows, 4))
    return boxes, tf.range(rows) < count


def _targets(ex: dict[str, tf.Tensor], hw: tuple[int, int], max_boxes: int,
             flip: tf.Tensor, training: bool) -> dict[str, tf.Tensor]:
    """Padded `(x1, y1, x2, y2)` pixel boxes, labels and validity of one example, its first
    `max_boxes` objects; for a set that marks difficult objects, their flags (`box_difficult`,
    eval) or their removal from the targets (training); its external proposals (`proposals`,
    `proposal_valid`) when the source reads them. Training also drops boxes without area (x2 <=
    x1 or y2 <= y1), as torchvision's detection references do: no anchor or RoI can match one
    (IoU 0/0) and its regression target would be log(0/0); it drops them (and difficult ones)
    before taking the first `max_boxes`, so they take no slot from a later object. The eval
    keeps them, as pycocotools and the VOC devkit do."""
    pixels, classes = _to_pixels(ex["bbox"], hw, flip), ex["classes"]
    difficult = tf.cast(ex["difficult"], tf.bool) if "difficult" in ex else None
    if training:
        keep = (pixels[:, 2] > pixels[:, 0]) & (pixels[:, 3] > pixels[:, 1])
        if difficult is not None:
            keep &= ~difficult
        pixels, classes = tf.boolean_mask(pixels, keep), tf.boolean_mask(classes, keep)
    count = tf.minimum(tf.shape(classes)[0], max_boxes)
    boxes, valid = _padded_rows(pixels, count, max_boxes)
    labels = tf.pad(tf.cast(classes[:count], tf.int32), [[0, max_boxes - count]])
    labels.set_shape((max_boxes,))
    out = {"boxes": boxes, "labels": labels, "box_valid": valid}
    if difficult is not None and not training:
        out["box_difficult"] = tf.pad(difficult[:count], [[0, max_boxes - count]])
        out["box_difficult"].set_shape((max_boxes,))
    if "proposals" in ex:
        rows = ex["proposals"].shape[0]
        out["proposals"], out["proposal_valid"] = _padded_rows(
            _to_pixels(ex["proposals"], hw, flip), ex["proposal_count"], rows)
    return out


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
    through `pipeline.epoch_dataset`: the epoch shuffles and stateless per-example keys of
    `pipeline.train_batches`.
    """
    pipeline.check_train_layout(global_batch_size, num_devices, seed, start_step, process_index,
                                process_count)
    spec, source, transforms, max_boxes = _open(data_config)
    hw = transforms.out_shape[:2]

    def preprocess(ex: dict[str, tf.Tensor], key: tf.Tensor) -> dict[str, tf.Tensor]:
        image, flip = pipeline.flipped_whole_image(spec, transforms, ex["image"], key)
        return {"image": image, **_targets(ex, hw, max_boxes, flip, training=True)}

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
    spec, source, transforms, max_boxes = _open(data_config)
    hw = transforms.out_shape[:2]

    def preprocess(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": transforms.eval(source.decode(ex["image"])),
                **_targets(ex, hw, max_boxes, tf.constant(False), training=False),
                _NUM_OBJECTS: tf.shape(ex["classes"])[0]}

    empty = {
        _NUM_OBJECTS: np.zeros((0,), np.int32),
        "image": np.zeros((0, *transforms.out_shape), np.float32),
        "boxes": np.zeros((0, max_boxes, 4), np.float32),
        "labels": np.zeros((0, max_boxes), np.int32),
        "box_valid": np.zeros((0, max_boxes), bool),
    }
    if source.has_difficult:
        empty["box_difficult"] = np.zeros((0, max_boxes), bool)
    if source.proposals is not None:
        rows = source.proposals.max_proposals
        empty |= {"proposals": np.zeros((0, rows, 4), np.float32),
                  "proposal_valid": np.zeros((0, rows), bool)}
    batches = pipeline.padded_eval_batches(
        spec, source, preprocess, empty, global_batch_size=global_batch_size,
        num_devices=num_devices, process_index=process_index, process_count=process_count)
    return _warn_beyond_max_boxes(batches, max_boxes, spec.eval_split)


_NUM_OBJECTS = "num_objects"  # eval only: objects per image before truncation to max_boxes


def _warn_beyond_max_boxes(batches: Iterator[pipeline.Batch], max_boxes: int,
                           split: str) -> Iterator[pipeline.Batch]:
    """`batches` without their `num_objects`, warning after the pass when an image had more
    objects than `max_boxes`: those are not scored, so mAP is against incomplete ground truth."""
    most = dropped = images = 0
    for batch in batches:
        counts = batch.pop(_NUM_OBJECTS)
        most = max(most, int(counts.max(initial=0)))
        dropped += int(np.maximum(counts - max_boxes, 0).sum())
        images += int((counts > max_boxes).sum())
        yield batch
    if dropped:
        logging.warning(
            "cnnjax.data: %d objects in %d images of eval split %r lie beyond data.max_boxes=%d "
            "and are not scored (mAP against incomplete ground truth); set data.max_boxes >= %d.",
            dropped, images, split, max_boxes, most)

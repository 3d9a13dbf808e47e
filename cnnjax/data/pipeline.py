"""tf.data input pipelines: the batches the training engine consumes.

This module batches; the data config is resolved in `spec.py` (`default_data_config`, `resolve`),
examples come from `sources.py` and are preprocessed and augmented by `transforms.py`.

`train_batches` is an infinite, exactly resumable stream: batch `k` depends only on the data
config, `seed` and `k` (and the process layout). Epoch `e = k // steps_per_epoch` shuffles the
split with a seed derived from `(seed, e)`, and every random augmentation draws from a stateless
seed derived from `(seed, e, process_index, position in the epoch)`, so `start_step=k` replays
the same batches an uninterrupted run would see. Each epoch has
`steps_per_epoch = num_train // global_batch_size` steps; the remainder is dropped. This scheme
is `epoch_dataset`, which takes the per-example `preprocess` (classification: augment + label;
`detection.py`: flip + boxes), so every training pipeline shuffles, seeds and resumes alike.

`eval_batches` is one pass over the eval split; the last batch is padded and carries a `mask`.

Class subsets (transfer learning): `classes=(5, 6, 7, 8, 9)` keeps only those labels, remapped to
0..k-1 in the given order, in both splits; `train_examples_per_class=n` keeps the first `n`
examples of each kept class of the train split in its stored order (a fixed, balanced label
budget; the eval split is never cut, even when it names the same split). Both are filters over
the stored order, so batches stay a function of `(config, seed, k)`; the split sizes they leave
are counted with one pass over the split's labels (then cached).

Multi-host: each process reads its own contiguous shard of the split (`tfds.even_splits`) and
yields its `global_batch_size / process_count` examples per step, reshaped to
`[num_devices, per_device, ...]` for its local devices. cnnjax's offline datasets are generated
on first use; processes that build one concurrently into the same data dir all use the copy
that was finished first.

TensorFlow is only the input pipeline: `hide_gpus_from_tensorflow()` runs before any pipeline is
built (not at import, so importing cnnjax does not change TensorFlow's state for user code) so
that TF never allocates GPU memory that JAX needs.

Files are always read in their stored order (tfds writes examples pre-shuffled by hashed key) and
shuffled with a buffer of `shuffle_buffer` examples. So `cache` (decode once and keep the split
in memory) only changes speed, never the batches; both are the preset's when unset (None).
Orders are reproducible for a given TensorFlow version; TF's global seed (`tf.random.set_seed`,
never set by cnnjax) also enters the shuffle.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

# `name as name`: public names of this module that live in `sources` and `spec`, re-exported.
from cnnjax.data import sources
from cnnjax.data.sources import DatasetNotPreparedError as DatasetNotPreparedError
from cnnjax.data.sources import Source
from cnnjax.data.sources import hide_gpus_from_tensorflow as hide_gpus_from_tensorflow
from cnnjax.data.spec import Spec, resolve
from cnnjax.data.spec import default_data_config as default_data_config
from cnnjax.data.transforms import Transforms, make_transforms
from cnnjax.utils.validation import check_non_negative_int, check_positive_int, invalid

Batch = dict[str, np.ndarray]
_OWNER = "data"
_AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the engine needs to know about a dataset before building a model.

    `image_shape` is the shape of one image as the pipeline yields it (after `image_size`);
    `num_train` / `num_eval` count the whole train / eval split (all processes together).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_eval: int


def _check_layout(global_batch_size: Any, num_devices: Any, process_index: Any,
                  process_count: Any) -> int:
    """Validates the batch/device/process layout; returns the per-process batch size."""
    check_positive_int(_OWNER, "global_batch_size", global_batch_size)
    check_positive_int(_OWNER, "num_devices", num_devices)
    check_positive_int(_OWNER, "process_count", process_count)
    check_non_negative_int(_OWNER, "process_index", process_index)
    if process_index >= process_count:
        raise invalid(_OWNER, "process_index", process_index,
                      f"expected 0 <= process_index < process_count={process_count}")
    total = num_devices * process_count
    if global_batch_size % total:
        raise invalid(_OWNER, "global_batch_size", global_batch_size,
                      f"expected a multiple of num_devices * process_count = {num_devices} * "
                      f"{process_count} = {total}")
    return global_batch_size // process_count


def _options() -> tf.data.Options:
    """Deterministic order, and no autotuning thread: tearing an iterator down waited for that
    thread's next wake-up (up to its 60 s period), 8.6 s of `make train`'s 26 s and 11-36 s at
    the end of some 1,000-step runs, while on 2 cores the pipeline ran as fast or faster without
    it (`benchmarks.input_pipeline`, 2026-12-05). AUTOTUNE parallelism is then the core count."""
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return options


# ----------------------------------------------------------------------------------- public
def eval_split_name(data_config: Any) -> str:
    """The split `eval_batches` reads: `data.eval_split`, else the dataset preset's."""
    return resolve(data_config).eval_split


def get_dataset_info(data_config: Any) -> DatasetInfo:
    """Resolves `data_config` and returns the dataset's classes, output shape and split sizes.

    Generates cnnjax's own offline datasets (e.g. `digits`) into the data dir on first use;
    raises `DatasetNotPreparedError` for a catalogue dataset that is not there.
    """
    spec = resolve(data_config)
    source = sources.open_source(spec)
    return dataset_info(spec, source, make_transforms(spec, source), spec.preset.name)


def dataset_info(spec: Spec, source: Source, transforms: Transforms,
                 name: str) -> DatasetInfo:
    """The `DatasetInfo` every input module reports: `source`'s classes and split sizes and the
    output image shape of `transforms`, under `name`; an empty train or eval split is refused."""
    # Empty splits are refused here, before a model compiles, not at the first step or eval.
    num_train = _non_empty(spec, source, "train_split")
    num_eval = _non_empty(spec, source, "eval_split")
    return DatasetInfo(
        name=name,
        num_classes=source.num_classes,
        image_shape=transforms.out_shape,
        num_train=num_train,
        num_eval=num_eval,
    )


def _non_empty(spec: Spec, source: Source, field: str) -> int:
    """The examples of the split in `spec.<field>` (whole, all processes, as its role reads it:
    `Source.for_training` for `train_split`); a ValueError naming the field when it holds none."""
    split = getattr(spec, field)
    if field == "train_split":
        source = source.for_training()
    count = source.num_examples(split)
    if count == 0:
        if spec.classes is None:
            valid = (f"it holds no examples of {source.name!r}; expected a non-empty split (a "
                     "whole split, or a slice such as 'train[90%:]')")
        else:
            valid = (f"it holds no examples of classes={spec.classes} of {source.name!r}; "
                     "expected a split holding some of them (or classes that it holds)")
        raise invalid(_OWNER, field, split, valid)
    return count


def open_whole_image_source(spec: Spec, make_source: Callable[[Spec], Source],
                            ) -> tuple[Source, Transforms]:
    """`(source, transforms)` for a task whose targets are positions in the image (boxes,
    class maps): a tfds dataset, its eval transform the whole image resized to the output size
    whatever the preset uses for classification (a centre crop would cut targets away; training
    then flips, `flipped_whole_image`)."""
    if spec.preset.tfds_name is None:
        raise invalid(_OWNER, "name", spec.preset.name, "expected a tfds dataset")
    if spec.randaugment_layers:
        raise invalid(_OWNER, "randaugment_layers", spec.randaugment_layers,
                      "expected 0: RandAugment is for classification (its geometric ops would "
                      "have to move the boxes or class maps too)")
    sources.hide_gpus_from_tensorflow()
    source = make_source(spec)
    return source, dataclasses.replace(make_transforms(spec, source), eval_transform="resize")


def steps_per_epoch(num_train: int, global_batch_size: int) -> int:
    """Training steps in one epoch of `train_batches` (the remainder of each epoch is dropped)."""
    check_non_negative_int("steps_per_epoch", "num_train", num_train)
    check_positive_int("steps_per_epoch", "global_batch_size", global_batch_size)
    return int(num_train) // int(global_batch_size)


def _device_reshape(batch: Batch, num_devices: int) -> Batch:
    return {k: v.reshape(num_devices, v.shape[0] // num_devices, *v.shape[1:])
            for k, v in batch.items()}


def train_batches(
    data_config: Any,
    *,
    global_batch_size: int,
    num_devices: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Infinite training batches `{'image': f32 [D, B, H, W, C], 'label': i32 [D, B]}`.

    `D = num_devices` (local devices), `B = global_batch_size / (num_devices * process_count)`.
    Batch `k` is a deterministic function of `(data_config, seed, k)` and the process layout;
    `start_step=k` starts at exactly that batch. All arguments are validated before anything is
    read.
    """
    spec = resolve(data_config)
    check_train_layout(global_batch_size, num_devices, seed, start_step, process_index,
                       process_count)
    source = sources.open_source(spec)
    transforms = make_transforms(spec, source)

    def preprocess(ex: dict[str, tf.Tensor], key: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"image": transforms.train(ex["image"], key),
                "label": tf.cast(ex["label"], tf.int32)}

    ds = epoch_dataset(spec, source, preprocess, global_batch_size=global_batch_size,
                       seed=seed, start_step=start_step, shard=(process_index, process_count))
    return device_batches(ds, num_devices)


def flipped_whole_image(spec: Spec, transforms: Transforms, image: tf.Tensor,
                        key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The training augmentation of the dense-target pipelines (detection, segmentation): the
    eval transform (the whole image resized; no crop that would cut boxes or class maps),
    mirrored with probability 1/2 when `spec.augment`, drawn statelessly from `key`. Returns
    `(image, flip)`; apply `flip` to the targets."""
    image = transforms.eval(image)
    flip = tf.constant(False)
    if spec.augment:
        flip = tf.random.stateless_uniform([], seed=key) < 0.5
        image = tf.where(flip, tf.reverse(image, axis=[1]), image)
    return image, flip


def device_batches(ds: tf.data.Dataset, num_devices: int) -> Iterator[Batch]:
    """`ds`'s batches as NumPy, each array split into `[num_devices, per_device, ...]`."""
    return (_device_reshape(batch, num_devices) for batch in ds.as_numpy_iterator())


def check_train_layout(global_batch_size: Any, num_devices: Any, seed: Any, start_step: Any,
                       process_index: Any, process_count: Any) -> None:
    """Validates the batch layout, `seed` and `start_step` of a `train_batches` call."""
    _check_layout(global_batch_size, num_devices, process_index, process_count)
    check_non_negative_int(_OWNER, "seed", seed)
    if seed >= 2**63:  # the shuffle seeds are int64: larger seeds would alias smaller ones
        raise invalid(_OWNER, "seed", seed, "expected 0 <= seed < 2**63")
    check_non_negative_int(_OWNER, "start_step", start_step)


def train_epoch_steps(spec: Spec, source: Source, *, global_batch_size: int,
                      process_count: int) -> int:
    """The steps of each `epoch_dataset` epoch: `num_train // global_batch_size`, fewer when a
    process's shard of a '+'-joined split is shorter than `num_train / process_count`. A
    ValueError naming `global_batch_size` when an epoch would have no step."""
    process_batch = global_batch_size // process_count
    num_train = _non_empty(spec, source, "train_split")
    steps = steps_per_epoch(num_train, global_batch_size)
    if steps == 0:
        raise invalid(_OWNER, "global_batch_size", global_batch_size,
                      f"expected at most the {num_train} examples of {spec.preset.name!r} "
                      f"split {spec.train_split!r} (an epoch would have no step)")
    if process_count > 1:
        # tfds shards a "train+validation" split part by part: a shard may fall short of
        # num_train / processes. Every process ends its epochs at the smallest shard's last
        # full batch, so epoch boundaries (and resume) agree on all of them.
        n = process_count
        train_source = source.for_training()
        sizes = [train_source.num_examples(spec.train_split, (p, n)) for p in range(n)]
        steps = min(steps, min(sizes) // process_batch)
        if steps == 0:
            raise invalid(_OWNER, "global_batch_size", global_batch_size,
                          f"expected at most {n * min(sizes)} ({n} processes * "
                          f"{min(sizes)}): split {spec.train_split!r} of {spec.preset.name!r} "
                          f"shards over {n} processes as {sizes} examples (tfds shards "
                          "a '+'-joined split part by part), so a process batch of "
                          f"{process_batch} leaves an epoch without a step")
    return steps


def check_train_epoch(data_config: Any, *, global_batch_size: int, process_count: int) -> int:
    """`train_epoch_steps` of a data config, without building a pipeline: the error
    `train_batches` would raise on every process for a batch that leaves an epoch without a
    step, raised by `check_config` before the model is built, initialized or compiled."""
    spec = resolve(data_config)
    return train_epoch_steps(spec, sources.open_source(spec),
                             global_batch_size=global_batch_size, process_count=process_count)


def epoch_dataset(spec: Spec, source: Source,
                  preprocess: Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]],
                  *, global_batch_size: int, seed: int, start_step: int,
                  shard: tuple[int, int]) -> tf.data.Dataset:
    """The epoch scheme of every training pipeline: `source`'s train split from `start_step` on,
    as one batched dataset of this process's `global_batch_size / shard[1]` examples per step.

    Epoch `e` shuffles with a seed drawn from the stateless key `(seed, e)` and keeps
    `steps_per_epoch` full batches (fewer when a process's shard of a `+`-joined split is
    shorter than `num_train / processes`); example `i` of the epoch on process `p` becomes
    `preprocess(example with its image decoded, key)` with the stateless key
    `fold_in(fold_in((seed, e), p), i)`, so random augmentations replay exactly on resume.
    Traced once for all epochs (no stall between them).
    """
    process_batch = global_batch_size // shard[1]
    steps = train_epoch_steps(spec, source, global_batch_size=global_batch_size,
                              process_count=shard[1])
    if start_step // steps >= 2**62:  # the epochs are an int64 range ending at 2**62
        raise invalid(_OWNER, "start_step", start_step,
                      f"expected start_step < 2**62 * {steps} (2**62 epochs of {steps} steps)")
    base = source.for_training().read(spec.train_split, shard)
    decoded = spec.cache
    if decoded:
        base = base.map(lambda ex: {**ex, "image": source.decode(ex["image"])},
                        num_parallel_calls=_AUTOTUNE).cache()
        # Fill the cache in full now: epochs stop early (dropped remainder, resumed skips,
        # shuffle buffers smaller than the split) and a partially read cache is thrown away.
        base.reduce(np.int64(0), lambda count, _: count + 1)
    first_epoch, first_skip = divmod(start_step, steps)
    seed = int(seed) & (2**63 - 1)
    fold_in = tf.random.experimental.stateless_fold_in

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        key = tf.stack([tf.constant(seed, tf.int64), epoch])
        shuffle_seed = tf.random.stateless_uniform(
            [], seed=key, minval=0, maxval=2**62, dtype=tf.int64)
        process_key = fold_in(key, shard[0])
        ds = base.shuffle(spec.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        ds = ds.take(steps * process_batch).enumerate()
        skip = tf.constant(first_skip * process_batch, tf.int64)
        ds = ds.skip(tf.where(epoch == first_epoch, skip, tf.zeros_like(skip)))

        def example(position: tf.Tensor, ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            if not decoded:
                ex = {**ex, "image": source.decode(ex["image"])}
            return preprocess(ex, fold_in(process_key, position))

        ds = ds.map(example, num_parallel_calls=_AUTOTUNE)
        return ds.batch(process_batch, drop_remainder=True)

    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(one_epoch)
    return ds.prefetch(_AUTOTUNE).with_options(_options())


def eval_batches(
    data_config: Any,
    *,
    global_batch_size: int,
    num_devices: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """One pass over the eval split: `image`, `label` and `mask` (f32 `[D, B]`, 0 on padding).

    The last batch is padded with zero images (mask 0). Every process yields the same number of
    batches (the largest shard's), so collectives line up across hosts.
    """
    spec = resolve(data_config)
    check_eval_layout(global_batch_size, num_devices, process_index, process_count)
    source = sources.open_source(spec)
    transforms = make_transforms(spec, source)

    def preprocess(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": transforms.eval(source.decode(ex["image"])),
                "label": tf.cast(ex["label"], tf.int32)}

    empty = {"image": np.zeros((0, *transforms.out_shape), np.float32),
             "label": np.zeros((0,), np.int32)}
    return padded_eval_batches(spec, source, preprocess, empty,
                               global_batch_size=global_batch_size, num_devices=num_devices,
                               process_index=process_index, process_count=process_count)


def check_eval_layout(global_batch_size: Any, num_devices: Any, process_index: Any,
                      process_count: Any) -> None:
    """Validates the batch layout of an `eval_batches` call (before anything is opened)."""
    _check_layout(global_batch_size, num_devices, process_index, process_count)


def padded_eval_batches(spec: Spec, source: Source,
                        preprocess: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]],
                        empty: Batch, *, global_batch_size: int, num_devices: int,
                        process_index: int, process_count: int) -> Iterator[Batch]:
    """The eval scheme of every pipeline: one pass over this process's shard of the eval split
    in stored order, `preprocess(example)` plus `mask` 1, batched and the last batch zero-padded
    (`mask` 0). Every process yields as many batches as the largest shard has (all padding,
    built from `empty`, the batch's arrays with 0 rows, once a shorter shard is done), so
    collectives line up across hosts. The layout and split sizes are checked on the call, not at
    the first batch."""
    process_batch = _check_layout(global_batch_size, num_devices, process_index, process_count)
    _non_empty(spec, source, "eval_split")  # else zero batches: metrics averaged over nothing
    shard = (process_index, process_count)
    largest_shard = max(source.num_examples(spec.eval_split, (i, process_count))
                        for i in range(process_count))
    num_batches = math.ceil(largest_shard / process_batch)
    has_examples = source.num_examples(spec.eval_split, shard) > 0  # not with more processes

    def with_mask(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {**preprocess(ex), "mask": tf.constant(1.0, tf.float32)}

    def batches() -> Iterator[Batch]:
        count = 0
        if has_examples:
            ds = source.read(spec.eval_split, shard).map(with_mask, num_parallel_calls=_AUTOTUNE)
            ds = ds.batch(process_batch).prefetch(_AUTOTUNE).with_options(_options())
            for batch in ds.as_numpy_iterator():
                yield _device_reshape(_pad(batch, process_batch), num_devices)
                count += 1
        padding = {**empty, "mask": np.zeros((0,), np.float32)}
        for _ in range(count, num_batches):  # Shorter shard than another process's: padding.
            yield _device_reshape(_pad(padding, process_batch), num_devices)

    return batches()


def _pad(batch: Batch, size: int) -> Batch:
    """Zero-pads every array of `batch` along axis 0 to `size` rows."""
    missing = size - len(batch["mask"])
    if missing == 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()}


"""tf.data input pipelines: the batches the training engine consumes.

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
budget). Both are filters over the stored order, so batches stay a function of `(config, seed,
k)`; the split sizes they leave are counted with one pass over the split's labels (then cached).

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
in memory) only changes speed, never the batches. Orders are reproducible for a given TensorFlow
version; TF's global seed (`tf.random.set_seed`, never set by cnnjax) also enters the shuffle.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from ml_collections import config_dict

from cnnjax.data import presets, randaugment
from cnnjax.data.builders import digits as _digits  # noqa: F401  (registers the `digits` builder)
from cnnjax.utils.validation import (
    check_choice,
    check_non_negative_int,
    check_positive_int,
    invalid,
)

Batch = dict[str, np.ndarray]
_OWNER = "data"
_AUTOTUNE = tf.data.AUTOTUNE
# RandAugment's per-example key is `fold_in(key, _RANDAUGMENT_STREAM)`, apart from the crop/flip
# keys `stateless_split(key, 2)` (unchanged, so runs without RandAugment keep their batches).
_RANDAUGMENT_STREAM = 0x52414E44


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


class DatasetNotPreparedError(FileNotFoundError):
    """A catalogue dataset is not in the tfds data dir, and cnnjax never downloads data."""


# ------------------------------------------------------------------------------------ config
def default_data_config(name: str = "digits") -> ml_collections.ConfigDict:
    """Returns a data config with every field the pipeline reads, set to `name`'s defaults.

    Fields: `name`; `data_dir` (None: tfds's default, `$TFDS_DATA_DIR` or ~/tensorflow_datasets);
    `tfds_name` (None: the preset's, e.g. `imagenette/320px-v2`); `image_size` (None: native size,
    224 for ImageNet-like data); `augment`; `train_split` / `eval_split` (None: the preset's, any
    tfds split string such as `train[:90%]` works); `cache`; `shuffle_buffer`; `classes` (None:
    every class; else the labels to keep, remapped to 0..k-1 in the given order);
    `train_examples_per_class` (None: all; else the first n train examples of each kept class);
    `randaugment_layers` / `randaugment_magnitude` (RandAugment ops per training image, 0: off,
    and their magnitude on the 0..10 scale; `cnnjax.data.randaugment`; needs `augment`);
    and `fake_*`, the shape, classes and sizes of the `fake` dataset (random in-memory images for
    benchmarks).
    """
    preset = presets.get_preset(name)
    fake = presets.get_preset("fake")
    return ml_collections.ConfigDict(
        {
            "name": name,
            "data_dir": config_dict.placeholder(str),
            "tfds_name": config_dict.placeholder(str),
            "image_size": config_dict.placeholder(int),
            "augment": True,
            "train_split": config_dict.placeholder(str),
            "eval_split": config_dict.placeholder(str),
            "cache": preset.cache,
            "shuffle_buffer": preset.shuffle_buffer,
            "classes": config_dict.placeholder(tuple),
            "train_examples_per_class": config_dict.placeholder(int),
            "randaugment_layers": 0,
            "randaugment_magnitude": 9.0,
            "fake_image_shape": fake.image_shape,
            "fake_num_classes": fake.num_classes,
            "fake_num_train": 1024,
            "fake_num_eval": 256,
        }
    )


@dataclasses.dataclass(frozen=True)
class _Spec:
    """A data config resolved against its preset and validated (no I/O yet)."""

    preset: presets.DatasetPreset
    tfds_name: str | None
    data_dir: str | None
    size: tuple[int, int] | None  # output (height, width); None: native (fixed-size data only)
    augment: bool
    train_split: str
    eval_split: str
    cache: bool
    shuffle_buffer: int
    classes: tuple[int, ...] | None  # labels kept, in their new order; None: every class
    train_examples_per_class: int | None
    randaugment_layers: int  # 0: off
    randaugment_magnitude: float
    fake_image_shape: tuple[int, int, int]
    fake_num_classes: int
    fake_num_train: int
    fake_num_eval: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _optional_str(arg: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise invalid(_OWNER, arg, value, "expected a non-empty string or None")
    return value


def _check_bool(arg: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise invalid(_OWNER, arg, value, "expected True or False")
    return bool(value)


def _check_classes(value: Any) -> tuple[int, ...] | None:
    """`data.classes`: None, or a non-empty sequence of distinct labels >= 0 (range checked once
    the dataset's class count is known, in `_SubsetSource`)."""
    if value is None:
        return None
    if (isinstance(value, str | bytes) or not isinstance(value, tuple | list) or not value
            or not all(_is_int(v) and v >= 0 for v in value) or len(set(value)) != len(value)):
        raise invalid(_OWNER, "classes", value,
                      "expected None (every class) or a non-empty list of distinct labels >= 0, "
                      "e.g. (5, 6, 7, 8, 9) (kept in that order, relabelled 0..k-1)")
    return tuple(int(v) for v in value)


def _resolve(data_config: Any) -> _Spec:
    """Fills missing fields from `default_data_config(name)` and validates every field."""
    fields = dict(data_config.items()) if hasattr(data_config, "items") else None
    if fields is None:
        raise invalid(_OWNER, "config", data_config, "expected an ml_collections ConfigDict")
    name = fields.get("name")
    check_choice(_OWNER, "name", name, presets.list_datasets())
    preset = presets.get_preset(name)
    defaults = dict(default_data_config(name).items())
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        raise invalid(_OWNER, "fields", unknown, f"expected only {sorted(defaults)}")
    cfg = {key: fields.get(key, default) for key, default in defaults.items()}

    image_size = cfg["image_size"]
    if image_size is not None:
        if not _is_int(image_size) or image_size <= 0:
            raise invalid(_OWNER, "image_size", image_size,
                          "expected a positive integer, or None for the native size")
        size: tuple[int, int] | None = (int(image_size), int(image_size))
    elif preset.default_image_size is not None:
        size = (preset.default_image_size, preset.default_image_size)
    else:
        size = None

    fake_shape = cfg["fake_image_shape"]
    if (not isinstance(fake_shape, tuple | list) or len(fake_shape) != 3
            or not all(_is_int(v) and v > 0 for v in fake_shape)):
        raise invalid(_OWNER, "fake_image_shape", fake_shape,
                      "expected three positive integers (height, width, channels)")
    for arg in ("fake_num_classes", "fake_num_train", "fake_num_eval", "shuffle_buffer"):
        if not _is_int(cfg[arg]) or cfg[arg] <= 0:
            raise invalid(_OWNER, arg, cfg[arg], "expected a positive integer")
    per_class = cfg["train_examples_per_class"]
    if per_class is not None and (not _is_int(per_class) or per_class <= 0):
        raise invalid(_OWNER, "train_examples_per_class", per_class,
                      "expected a positive integer (examples kept per class in the train split), "
                      "or None for all of them")

    augment = _check_bool("augment", cfg["augment"])
    ra_layers, ra_magnitude = randaugment.check_randaugment(
        _OWNER, cfg["randaugment_layers"], cfg["randaugment_magnitude"],
        layers_arg="randaugment_layers", magnitude_arg="randaugment_magnitude")
    if ra_layers and not augment:
        raise invalid(_OWNER, "randaugment_layers", ra_layers,
                      "expected 0 when augment=False (RandAugment is a training augmentation: "
                      "set augment=True, or randaugment_layers=0)")

    tfds_name = _optional_str("tfds_name", cfg["tfds_name"]) or preset.tfds_name
    if name == "fake":
        tfds_name = None
    return _Spec(
        preset=preset,
        tfds_name=tfds_name,
        data_dir=_optional_str("data_dir", cfg["data_dir"]),
        size=size,
        augment=augment,
        train_split=_optional_str("train_split", cfg["train_split"]) or preset.train_split,
        eval_split=_optional_str("eval_split", cfg["eval_split"]) or preset.eval_split,
        cache=_check_bool("cache", cfg["cache"]),
        shuffle_buffer=int(cfg["shuffle_buffer"]),
        classes=_check_classes(cfg["classes"]),
        train_examples_per_class=None if per_class is None else int(per_class),
        randaugment_layers=ra_layers,
        randaugment_magnitude=ra_magnitude,
        fake_image_shape=tuple(int(v) for v in fake_shape),  # type: ignore[arg-type]
        fake_num_classes=int(cfg["fake_num_classes"]),
        fake_num_train=int(cfg["fake_num_train"]),
        fake_num_eval=int(cfg["fake_num_eval"]),
    )


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


# ----------------------------------------------------------------------------------- sources
def hide_gpus_from_tensorflow() -> None:
    """Makes GPUs invisible to TensorFlow so it never reserves accelerator memory JAX needs.

    Called by every pipeline entry point before TensorFlow builds anything. If TensorFlow was
    already initialized with GPUs visible (user code ran TF ops first), it logs a warning.
    """
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF runtime already initialized: visibility can no longer change.
        if tf.config.get_visible_devices("GPU"):
            logging.warning("cnnjax.data: TensorFlow was initialized with GPUs visible before "
                            "the input pipeline; it may hold GPU memory that JAX needs.")


def _split_field(spec: _Spec, split: str) -> str:
    """The config field a split string came from, to name it in errors."""
    return ("train_split" if split == spec.train_split
            else "eval_split" if split == spec.eval_split else "split")


class _Source:
    """Raw examples of one dataset: `{'image': encoded bytes or uint8 HWC, 'label': int}`."""

    name: str
    num_classes: int
    native_shape: tuple[int | None, int | None, int]

    def num_examples(self, split: str, shard: tuple[int, int] = (0, 1)) -> int:
        raise NotImplementedError

    def read(self, split: str, shard: tuple[int, int]) -> tf.data.Dataset:
        raise NotImplementedError

    def decode(self, image: tf.Tensor) -> tf.Tensor:
        """Turns a stored image into a uint8 `[H, W, C]` tensor."""
        return image


class _TfdsSource(_Source):
    """A prepared tfds dataset; images stay encoded until `decode` (cheap shuffles and skips)."""

    def __init__(self, spec: _Spec):
        preset = spec.preset
        try:
            builder = tfds.builder(spec.tfds_name, data_dir=spec.data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise invalid(_OWNER, "tfds_name", spec.tfds_name,
                          f"tfds does not know this dataset ({e})") from None
        if not builder.is_prepared():
            if not preset.local_builder:
                raise DatasetNotPreparedError(_missing_dataset_message(spec, builder))
            logging.info("cnnjax.data: generating %r into %s (offline, first use)",
                         spec.tfds_name, builder.data_dir)
            try:
                builder.download_and_prepare()
            except FileExistsError:
                # Another process of a multi-host job built it into the same data dir first
                # (tfds renames a finished build into place; the later rename fails).
                builder = tfds.builder(spec.tfds_name, data_dir=spec.data_dir)
                if not builder.is_prepared():
                    raise
                logging.info("cnnjax.data: another process finished building %r first; "
                             "using its copy", spec.tfds_name)
        self.builder = builder
        self.name = preset.name
        self._spec = spec
        features = builder.info.features
        self._image_feature = features["image"]
        self.num_classes = self._num_classes(spec, features)
        self.native_shape = tuple(self._image_feature.shape)  # type: ignore[assignment]

    def _num_classes(self, spec: _Spec, features: Any) -> int:
        """The classes of the image-level `label` (a ValueError for a set without one)."""
        if "label" not in features:
            raise invalid(_OWNER, "tfds_name", spec.tfds_name,
                          "expected a dataset with an image-level `label` (it has "
                          f"{sorted(features)}; a detection set such as voc/2007 needs "
                          "config.task='detection')")
        return int(features["label"].num_classes)

    def _shard_split(self, split: str, shard: tuple[int, int]) -> Any:
        index, count = shard
        return split if count == 1 else tfds.even_splits(split, n=count)[index]

    def num_examples(self, split: str, shard: tuple[int, int] = (0, 1)) -> int:
        try:
            return int(self.builder.info.splits[self._shard_split(split, shard)].num_examples)
        except (KeyError, ValueError, TypeError, AssertionError) as e:
            raise invalid(_OWNER, _split_field(self._spec, split), split,
                          f"{self.builder.name!r} has splits {list(self.builder.info.splits)} "
                          f"(slices like 'train[:90%]' also work) [{e}]") from None

    def read(self, split: str, shard: tuple[int, int]) -> tf.data.Dataset:
        ds = self.builder.as_dataset(
            split=self._shard_split(split, shard),
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=False),
        )
        return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})

    def decode(self, image: tf.Tensor) -> tf.Tensor:
        return self._image_feature.decode_example(image)


def _missing_dataset_message(spec: _Spec, builder: Any) -> str:
    version_dir = str(builder.data_dir)
    root = version_dir
    for _ in builder.info.full_name.split("/"):
        root = os.path.dirname(root)
    message = (
        f"data: dataset {spec.preset.name!r} (tfds {spec.tfds_name!r}) is not prepared in the "
        f"tfds data_dir {root!r}; its files would be in {version_dir!r}. cnnjax never downloads "
        f"data. Prepare it on a machine with internet access: `tfds build {spec.tfds_name} "
        f"--data_dir=<dir>` (or `tfds.builder({spec.tfds_name!r}, data_dir=<dir>)"
        f".download_and_prepare()`), then copy <dir>/{spec.tfds_name.split('/')[0]} into "
        f"{root!r}, or set data.data_dir to the directory holding it."
    )
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        message += (f" This dataset needs a manual download first: put its archives in "
                    f"{os.path.join(root, 'downloads', 'manual')!r} (see the tfds catalogue).")
    return message


class _FakeSource(_Source):
    """Random uint8 images and labels held in memory (seeded, identical on every call)."""

    def __init__(self, spec: _Spec):
        self.name = "fake"
        self._spec = spec
        self.num_classes = spec.fake_num_classes
        self.native_shape = spec.fake_image_shape
        preset = spec.preset
        self._sizes = {preset.train_split: spec.fake_num_train,
                       preset.eval_split: spec.fake_num_eval}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _bounds(self, split: str, shard: tuple[int, int]) -> tuple[int, int]:
        if split not in self._sizes:
            raise invalid(_OWNER, _split_field(self._spec, split), split,
                          f"'fake' has splits {list(self._sizes)}")
        n, (index, count) = self._sizes[split], shard
        return index * n // count, (index + 1) * n // count

    def num_examples(self, split: str, shard: tuple[int, int] = (0, 1)) -> int:
        start, stop = self._bounds(split, shard)
        return stop - start

    def read(self, split: str, shard: tuple[int, int]) -> tf.data.Dataset:
        start, stop = self._bounds(split, shard)
        if split not in self._arrays:
            rng = np.random.default_rng([0, list(self._sizes).index(split)])
            n = self._sizes[split]
            images = rng.integers(0, 256, (n, *self.native_shape), dtype=np.uint8)
            labels = rng.integers(0, self.num_classes, n, dtype=np.int64)
            self._arrays[split] = (images, labels)
        images, labels = self._arrays[split]
        return tf.data.Dataset.from_tensor_slices(
            {"image": images[start:stop], "label": labels[start:stop]})


class _SubsetSource(_Source):
    """`inner` restricted to `spec.classes` (relabelled 0..k-1 in their order) and, in the train
    split, to the first `spec.train_examples_per_class` examples of each class (stored order).

    Both are deterministic filters over the stored order. A shard `(i, n)` of the filtered split
    is its every n-th example from the i-th (`Dataset.shard`), so shard sizes differ by at most
    one, as with `tfds.even_splits`; every process reads (but does not decode) the whole split.
    """

    def __init__(self, inner: _Source, spec: _Spec):
        self.inner, self.spec = inner, spec
        self.name = inner.name
        self.native_shape = inner.native_shape
        classes = spec.classes if spec.classes is not None else tuple(range(inner.num_classes))
        if max(classes) >= inner.num_classes:
            raise invalid(_OWNER, "classes", spec.classes,
                          f"expected labels in [0, {inner.num_classes - 1}]: {inner.name!r} has "
                          f"{inner.num_classes} classes")
        self.classes = classes
        self.num_classes = len(classes)
        new_label = np.full(inner.num_classes, -1, np.int64)
        new_label[list(classes)] = np.arange(len(classes))
        self._new_label = new_label

    def _limit(self, split: str) -> int | None:
        return self.spec.train_examples_per_class if split == self.spec.train_split else None

    def class_counts(self, split: str) -> np.ndarray:
        """Examples of each original label in the whole `split` (one pass, cached)."""
        self.inner.num_examples(split)  # a clear error for an unknown split
        key = (self.spec, split)
        if key not in _LABEL_COUNTS:
            labels = self.inner.read(split, (0, 1)).map(lambda ex: ex["label"])
            counts = np.zeros(self.inner.num_classes, np.int64)
            for batch in labels.batch(8192).as_numpy_iterator():
                counts += np.bincount(batch, minlength=self.inner.num_classes)
            _LABEL_COUNTS[key] = counts
        return _LABEL_COUNTS[key]

    def num_examples(self, split: str, shard: tuple[int, int] = (0, 1)) -> int:
        counts = self.class_counts(split)[list(self.classes)]
        limit = self._limit(split)
        if limit is not None:
            short = [c for c, n in zip(self.classes, counts, strict=True) if n < limit]
            if short:
                logging.warning("cnnjax.data: train_examples_per_class=%d but classes %s of "
                                "split %r have fewer examples; all of theirs are used.",
                                limit, short, split)
            counts = np.minimum(counts, limit)
        index, count = shard
        return len(range(index, int(counts.sum()), count))

    def read(self, split: str, shard: tuple[int, int]) -> tf.data.Dataset:
        new_label = tf.constant(self._new_label)
        ds = self.inner.read(split, (0, 1)).map(
            lambda ex: {"image": ex["image"], "label": tf.gather(new_label, ex["label"])})
        ds = ds.filter(lambda ex: ex["label"] >= 0)
        limit = self._limit(split)
        if limit is not None:
            def within_limit(seen: tf.Tensor, ex: dict) -> tuple[tf.Tensor, dict]:
                seen_now = seen + tf.one_hot(ex["label"], self.num_classes, dtype=tf.int64)
                return seen_now, {**ex, "keep": seen[ex["label"]] < limit}

            ds = ds.scan(tf.zeros([self.num_classes], tf.int64), within_limit)
            ds = ds.filter(lambda ex: ex["keep"])
            ds = ds.map(lambda kept: {"image": kept["image"], "label": kept["label"]})
        index, shard_count = shard
        return ds if shard_count == 1 else ds.shard(shard_count, index)

    def decode(self, image: tf.Tensor) -> tf.Tensor:
        return self.inner.decode(image)


# (resolved spec, split) -> examples per original label; counting reads the whole split once.
_LABEL_COUNTS: dict[tuple[_Spec, str], np.ndarray] = {}


def _open_source(spec: _Spec) -> _Source:
    hide_gpus_from_tensorflow()
    source = _FakeSource(spec) if spec.preset.name == "fake" else _TfdsSource(spec)
    if spec.classes is None and spec.train_examples_per_class is None:
        return source
    return _SubsetSource(source, spec)


# ------------------------------------------------------------------------------ preprocessing
@dataclasses.dataclass(frozen=True)
class _Transforms:
    """TF graph functions from a decoded uint8 image to a normalized float32 image.

    With `randaugment_layers > 0`, `train` applies RandAugment to the 0..255 pixels after the
    crop and flip (after the resize for the augmentation "none"), before normalization; those
    pixels are rounded to whole levels first (RandAugment's ops are PIL's, on uint8).
    """

    out_shape: tuple[int, int, int]
    native_hw: tuple[int | None, int | None]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_augmentation: str
    eval_transform: str
    crop_padding: int
    crop_fraction: float
    randaugment_layers: int = 0
    randaugment_magnitude: float = 9.0

    def _finish(self, image: tf.Tensor) -> tf.Tensor:
        image = (image - tf.constant(self.mean, tf.float32)) / tf.constant(self.std, tf.float32)
        image.set_shape(self.out_shape)
        return image

    def _resize(self, image: tf.Tensor) -> tf.Tensor:
        hw = self.out_shape[:2]
        if tuple(self.native_hw) == hw:
            return image
        # Antialiasing only matters when shrinking, and costs ~2x when enlarging.
        native = self.native_hw
        shrinks = None in native or any(o < n for o, n in zip(hw, native, strict=True))
        return tf.image.resize(image, hw, method="bilinear", antialias=shrinks)

    def _eval_pixels(self, image: tf.Tensor) -> tf.Tensor:
        """The eval transform before normalization: float32 in [0, 1]."""
        image = tf.cast(image, tf.float32) / 255.0
        if self.eval_transform == "resize_center_crop":
            return _resize_shorter_center_crop(image, self.out_shape[0], self.crop_fraction)
        return self._resize(image)

    def eval(self, image: tf.Tensor) -> tf.Tensor:
        return self._finish(self._eval_pixels(image))

    def train(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Augments with stateless ops seeded by `seed` (int64 `[2]`), so it is replayable."""
        if self.train_augmentation == "none":
            image = self._eval_pixels(image)
        else:
            image = self._crop_flip(image, seed)
        if self.randaugment_layers:
            key = tf.random.experimental.stateless_fold_in(seed, _RANDAUGMENT_STREAM)
            pixels = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)
            pixels = randaugment.rand_augment(pixels, key, self.randaugment_layers,
                                              self.randaugment_magnitude)
            image = tf.cast(pixels, tf.float32) / 255.0
        return self._finish(image)

    def _crop_flip(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """The preset's random crop and flip: float32 in [0, 1]."""
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = tf.cast(image, tf.float32) / 255.0
        if self.train_augmentation == "pad_crop_flip":
            image = self._resize(image)
            p = self.crop_padding
            image = tf.pad(image, [[p, p], [p, p], [0, 0]])
            image = tf.image.stateless_random_crop(image, self.out_shape, seed=crop_seed)
        else:  # random_resized_crop_flip
            image = _random_resized_crop(image, self.out_shape[:2], crop_seed)
        return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _resize_shorter_center_crop(image: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """Resizes the shorter side to `round(size / crop_fraction)`, then center-crops `size`."""
    resize_to = int(round(size / crop_fraction))
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize_to / tf.reduce_min(hw)
    new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), size)
    image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    return image[top:top + size, left:left + size, :]


def _random_resized_crop(image: tf.Tensor, hw: tuple[int, int], seed: tf.Tensor) -> tf.Tensor:
    """Inception crop: 8%-100% of the area, aspect ratio 3/4-4/3, resized to `hw`."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, crop_size)
    return tf.image.resize(image, hw, method="bilinear", antialias=True)


def _transforms(spec: _Spec, source: _Source) -> _Transforms:
    native_h, native_w, channels = source.native_shape
    if spec.size is not None:
        out_hw = spec.size
    elif native_h is not None and native_w is not None:
        out_hw = (native_h, native_w)
    else:  # Only a tfds_name override can lead here: presets of variable-size data have a size.
        raise invalid(_OWNER, "image_size", None,
                      f"{spec.tfds_name!r} has images of varying size; set data.image_size")
    if spec.randaugment_layers and channels not in (1, 3):
        raise invalid(_OWNER, "randaugment_layers", spec.randaugment_layers,
                      f"expected 0 for {channels}-channel images (RandAugment's ops are defined "
                      "on grey or RGB images)")
    preset = spec.preset
    mean, std = preset.mean, preset.std
    if len(mean) != channels:  # `fake` with a custom channel count: centre 0..1 on 0.
        mean, std = (0.5,) * channels, (0.5,) * channels
    return _Transforms(
        out_shape=(*out_hw, channels),
        native_hw=(native_h, native_w),
        mean=mean,
        std=std,
        train_augmentation=preset.train_augmentation if spec.augment else "none",
        eval_transform=preset.eval_transform,
        crop_padding=preset.crop_padding,
        crop_fraction=preset.crop_fraction,
        randaugment_layers=spec.randaugment_layers,
        randaugment_magnitude=spec.randaugment_magnitude,
    )


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


# ----------------------------------------------------------------------------------- public
def eval_split_name(data_config: Any) -> str:
    """The split `eval_batches` reads: `data.eval_split`, else the dataset preset's."""
    return _resolve(data_config).eval_split


def get_dataset_info(data_config: Any) -> DatasetInfo:
    """Resolves `data_config` and returns the dataset's classes, output shape and split sizes.

    Generates cnnjax's own offline datasets (e.g. `digits`) into the data dir on first use;
    raises `DatasetNotPreparedError` for a catalogue dataset that is not there.
    """
    spec = _resolve(data_config)
    source = _open_source(spec)
    return dataset_info(spec, source, _transforms(spec, source), spec.preset.name)


def dataset_info(spec: _Spec, source: _Source, transforms: _Transforms,
                 name: str) -> DatasetInfo:
    """The `DatasetInfo` every input module reports: `source`'s classes and split sizes and the
    output image shape of `transforms`, under `name`."""
    return DatasetInfo(
        name=name,
        num_classes=source.num_classes,
        image_shape=transforms.out_shape,
        num_train=source.num_examples(spec.train_split),
        num_eval=source.num_examples(spec.eval_split),
    )


def open_whole_image_source(spec: _Spec, make_source: Callable[[_Spec], _Source],
                            ) -> tuple[_Source, _Transforms]:
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
    hide_gpus_from_tensorflow()
    source = make_source(spec)
    return source, dataclasses.replace(_transforms(spec, source), eval_transform="resize")


def steps_per_epoch(num_train: int, global_batch_size: int) -> int:
    """Training steps in one epoch of `train_batches` (the remainder of each epoch is dropped)."""
    return num_train // global_batch_size


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
    spec = _resolve(data_config)
    check_train_layout(global_batch_size, num_devices, seed, start_step, process_index,
                       process_count)
    source = _open_source(spec)
    transforms = _transforms(spec, source)

    def preprocess(ex: dict[str, tf.Tensor], key: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"image": transforms.train(ex["image"], key),
                "label": tf.cast(ex["label"], tf.int32)}

    ds = epoch_dataset(spec, source, preprocess, global_batch_size=global_batch_size,
                       seed=seed, start_step=start_step, shard=(process_index, process_count))
    return device_batches(ds, num_devices)


def flipped_whole_image(spec: _Spec, transforms: _Transforms, image: tf.Tensor,
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


def epoch_dataset(spec: _Spec, source: _Source,
                  preprocess: Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]],
                  *, global_batch_size: int, seed: int, start_step: int,
                  shard: tuple[int, int]) -> tf.data.Dataset:
    """The epoch scheme of every training pipeline: `source`'s train split from `start_step` on,
    as one batched dataset of this process's `global_batch_size / shard[1]` examples per step.

    Epoch `e` shuffles with a seed drawn from the stateless key `(seed, e)` and keeps
    `steps_per_epoch` full batches; example `i` of the epoch on process `p` becomes
    `preprocess(example with its image decoded, key)` with the stateless key
    `fold_in(fold_in((seed, e), p), i)`, so random augmentations replay exactly on resume.
    Traced once for all epochs (no stall between them).
    """
    process_batch = global_batch_size // shard[1]
    num_train = source.num_examples(spec.train_split)
    steps = steps_per_epoch(num_train, global_batch_size)
    if steps == 0:
        raise invalid(_OWNER, "global_batch_size", global_batch_size,
                      f"expected at most the {num_train} examples of {spec.preset.name!r} "
                      f"split {spec.train_split!r} (an epoch would have no step)")
    base = source.read(spec.train_split, shard)
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
    spec = _resolve(data_config)
    _check_layout(global_batch_size, num_devices, process_index, process_count)
    source = _open_source(spec)
    transforms = _transforms(spec, source)

    def preprocess(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": transforms.eval(source.decode(ex["image"])),
                "label": tf.cast(ex["label"], tf.int32)}

    empty = {"image": np.zeros((0, *transforms.out_shape), np.float32),
             "label": np.zeros((0,), np.int32)}
    return padded_eval_batches(spec, source, preprocess, empty,
                               global_batch_size=global_batch_size, num_devices=num_devices,
                               process_index=process_index, process_count=process_count)


def padded_eval_batches(spec: _Spec, source: _Source,
                        preprocess: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]],
                        empty: Batch, *, global_batch_size: int, num_devices: int,
                        process_index: int, process_count: int) -> Iterator[Batch]:
    """The eval scheme of every pipeline: one pass over this process's shard of the eval split
    in stored order, `preprocess(example)` plus `mask` 1, batched and the last batch zero-padded
    (`mask` 0). Every process yields as many batches as the largest shard has (all padding,
    built from `empty`, the batch's arrays with 0 rows, once a shorter shard is done), so
    collectives line up across hosts."""
    process_batch = _check_layout(global_batch_size, num_devices, process_index, process_count)
    shard = (process_index, process_count)
    largest_shard = max(source.num_examples(spec.eval_split, (i, process_count))
                        for i in range(process_count))
    num_batches = math.ceil(largest_shard / process_batch)

    def with_mask(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {**preprocess(ex), "mask": tf.constant(1.0, tf.float32)}

    empty = {**empty, "mask": np.zeros((0,), np.float32)}
    count = 0
    if source.num_examples(spec.eval_split, shard):  # more processes than examples: none here
        ds = source.read(spec.eval_split, shard).map(with_mask, num_parallel_calls=_AUTOTUNE)
        ds = ds.batch(process_batch).prefetch(_AUTOTUNE).with_options(_options())
        for batch in ds.as_numpy_iterator():
            yield _device_reshape(_pad(batch, process_batch), num_devices)
            count += 1
    for _ in range(count, num_batches):  # Shorter shard than another process's: all padding.
        yield _device_reshape(_pad(empty, process_batch), num_devices)


def _pad(batch: Batch, size: int) -> Batch:
    """Zero-pads every array of `batch` along axis 0 to `size` rows."""
    missing = size - len(batch["mask"])
    if missing == 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()}


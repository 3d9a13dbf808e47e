"""Where examples come from: a prepared tfds dataset, the in-memory `fake` set, or a class subset
(`mock_tfds_dataset`: random examples of a catalogue dataset, offline, for tests and benchmarks).

Each is read by process shard in stored order as `{'image', 'label'}`, images as stored (tfds:
encoded) until `decode`. Opening one is every pipeline's first TensorFlow work, so `open_source`
hides the GPUs from TensorFlow first (`hide_gpus_from_tensorflow`).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cnnjax.data.builders import LOCAL_BUILDERS  # importing them registers them with tfds
from cnnjax.data.spec import Spec, dataset_name, split_names, splits_named
from cnnjax.utils.files import check_output_dir
from cnnjax.utils.validation import invalid

_OWNER = "data"


class DatasetNotPreparedError(FileNotFoundError):
    """A catalogue dataset is not in the tfds data dir, and cnnjax never downloads data."""


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


def _split_field(spec: Spec, split: str) -> str:
    """The config field a split string came from, to name it in errors."""
    return ("train_split" if split == spec.train_split
            else "eval_split" if split == spec.eval_split else "split")


class Source:
    """Raw examples of one dataset: `{'image': encoded bytes or uint8 HWC, 'label': int}`."""

    name: str
    num_classes: int
    native_shape: tuple[int | None, int | None, int]
    # What identifies the stored examples, whatever the config reads from them (size, classes,
    # augmentation): sources with equal keys hold the same splits.
    storage_key: tuple

    def num_examples(self, split: str, shard: tuple[int, int] = (0, 1)) -> int:
        """How many examples shard `(index, count)` of `split` holds."""
        raise NotImplementedError

    def read(self, split: str, shard: tuple[int, int]) -> tf.data.Dataset:
        """The shard's raw examples in stored order, images not yet decoded (see `decode`)."""
        raise NotImplementedError

    def decode(self, image: tf.Tensor) -> tf.Tensor:
        """Turns a stored image into a uint8 `[H, W, C]` tensor."""
        return image

    def for_training(self) -> Source:
        """The source as training reads its train split: a class subset's per-class limit
        applies there only, never to an eval split, even one spelled as the train split."""
        return self


class TfdsSource(Source):
    """A prepared tfds dataset; images stay encoded until `decode` (cheap shuffles and skips)."""

    def __init__(self, spec: Spec):
        if spec.data_dir is not None:  # tfds would fail deep in a first-use build instead
            try:
                check_output_dir(spec.data_dir, "data_dir", writable=False)  # may be read-only
            except ValueError:
                raise invalid(_OWNER, "data_dir", spec.data_dir,
                              "expected a directory (tfds reads datasets from it and builds "
                              "cnnjax's offline ones there), but a file is in the way") from None
        # By the dataset named, not the preset: `name='shapes', tfds_name='voc/2007'` reads a
        # catalogue dataset, which must never be downloaded here.
        builder = prepared_builder(
            _open_builder(spec), spec.tfds_name, spec.data_dir,
            what=f"data: dataset {spec.preset.name!r} (tfds {spec.tfds_name!r})",
            data_dir_label="data: data_dir", data_dir_setting="data.data_dir")
        self.builder = builder
        self.name = spec.preset.name
        self.storage_key = ("tfds", builder.data_dir)  # <data_dir>/<name>/<config>/<version>
        self._spec = spec
        features = builder.info.features
        self._image_feature = self._checked_image(spec, features)
        self.num_classes = self._num_classes(spec, features)
        self.native_shape = tuple(self._image_feature.shape)  # type: ignore[assignment]

    @staticmethod
    def _checked_image(spec: Spec, features: Any) -> Any:
        """The dataset's `image` feature; a ValueError naming `tfds_name` unless it is a uint8
        tfds Image (eurosat/all keeps its pixels under `sentinel2`; a uint16 image would be
        scaled by 1/255 like a uint8 one)."""
        image = features["image"] if "image" in features else None  # noqa: SIM401 (no .get)
        if not isinstance(image, tfds.features.Image):
            raise invalid(_OWNER, "tfds_name", spec.tfds_name,
                          f"expected a dataset with an `image` feature (a tfds Image); it has "
                          f"{sorted(features)}")
        # np_dtype: `FeatureConnector.dtype` is deprecated (tfds logs it on every read)
        dtype = np.dtype(getattr(image, "np_dtype", None) or image.dtype.as_numpy_dtype)
        if dtype != np.uint8:
            raise invalid(_OWNER, "tfds_name", spec.tfds_name,
                          f"expected uint8 images (pixels are scaled by 1/255); its `image` is "
                          f"{dtype}")
        return image

    def _num_classes(self, spec: Spec, features: Any) -> int:
        """The classes of the image-level `label` (a ValueError for a set without one)."""
        if "label" not in features:
            raise invalid(_OWNER, "tfds_name", spec.tfds_name,
                          "expected a dataset with an image-level `label` (it has "
                          f"{sorted(features)}; a detection set such as voc/2007 needs "
                          "config.task='detection')")
        if not isinstance(features["label"], tfds.features.ClassLabel):
            raise invalid(_OWNER, "tfds_name", spec.tfds_name,
                          f"expected its `label` to be a tfds ClassLabel (class ids with a class "
                          f"count); it is a {type(features['label']).__name__}")
        return int(features["label"].num_classes)

    def _shard_split(self, split: str, shard: tuple[int, int]) -> Any:
        index, count = shard
        return split if count == 1 else tfds.even_splits(split, n=count)[index]

    def num_examples(self, split: str, shard: tuple[int, int] = (0, 1)) -> int:
        """The shard's tfds example count; a ValueError naming the split's config field for an
        unknown split or a reversed slice (tfds fails on those only when reading)."""
        try:
            relative = {part: tfds.core.ReadInstruction.from_spec(part)
                        for part in map(str.strip, split.split("+"))}
            parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(
                self.builder.info.splits)
            count = int(self.builder.info.splits[self._shard_split(split, shard)].num_examples)
        except (KeyError, ValueError, TypeError, AssertionError) as e:
            raise self._split_error(split, e) from None
        for part, instruction in relative.items():
            # tfds reads a slice ending at shard 0 ('train[:0shard]') as the whole split.
            if instruction.unit == "shard" and instruction.to == 0:
                raise invalid(_OWNER, _split_field(self._spec, split), split,
                              f"{part!r} ends at shard 0, so it holds no example, and tfds would "
                              "read the whole split instead; expected a slice ending at shard 1 "
                              "or later (or no end)")
        for part in parts:
            # tfds counts a reversed slice ('test[5:2]': -3 examples) and fails only on reading.
            if part.from_ is not None and part.to is not None and part.from_ > part.to:
                raise invalid(_OWNER, _split_field(self._spec, split), split,
                              f"its slice of {part.splitname!r} starts at example {part.from_} "
                              f"after it ends at {part.to}; expected a slice whose start is "
                              f"at or before its end, e.g. '{part.splitname}[{part.to}:"
                              f"{part.from_}]'")
        return count

    def _split_error(self, split: str, error: Exception) -> ValueError:
        """The error for a `split` tfds cannot read: a slice outside a split it has (tfds:
        "Requested slice [2000:1438] incompatible with 1438 examples") said so, else the splits
        there are (an unknown name, a bad slice syntax)."""
        splits = self.builder.info.splits
        for part in map(str.strip, split.split("+")):
            name = split_names(part)[0]
            if name not in splits or name == part:
                continue
            try:
                tfds.core.ReadInstruction.from_spec(part).to_absolute(splits)
            except (KeyError, ValueError, TypeError, AssertionError):
                size = int(splits[name].num_examples)
                return invalid(_OWNER, _split_field(self._spec, split), split,
                               f"its slice {part!r} reaches outside {name!r}, which holds "
                               f"{size} examples; expected example indices within [0, {size}] "
                               f"(or percentages, e.g. '{name}[:90%]')")
        return invalid(_OWNER, _split_field(self._spec, split), split,
                       f"{splits_named(self.builder.name, splits)} (slices like 'train[:90%]' "
                       f"also work) [{error}]")

    def stored_examples(self, split: str, shard: tuple[int, int],
                        with_ids: bool = False) -> tf.data.Dataset:
        """The shard's tfds examples in stored order, images still encoded (see `decode`);
        `with_ids` adds each example's `tfds_id`."""
        return self.builder.as_dataset(
            split=self._shard_split(split, shard),
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=with_ids),
        )

    def read(self, split: str, shard: tuple[int, int]) -> tf.data.Dataset:
        """`stored_examples` reduced to `{'image', 'label'}`, images still encoded."""
        return self.stored_examples(split, shard).map(
            lambda ex: {"image": ex["image"], "label": ex["label"]})

    def decode(self, image: tf.Tensor) -> tf.Tensor:
        """Decodes a stored image with the dataset's own tfds image feature."""
        return self._image_feature.decode_example(image)


def _open_builder(spec: Spec) -> Any:
    """`tfds.builder(spec.tfds_name)`; a ValueError naming `tfds_name` for a dataset, config or
    version tfds does not have (tfds raised its own ValueError or AssertionError naming no field,
    and listed its whole catalogue, ~9,000 characters, for an unknown dataset)."""
    name = dataset_name(spec.tfds_name)
    try:
        return tfds.builder(spec.tfds_name, data_dir=spec.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        close = list(dict.fromkeys(difflib.get_close_matches(name, tfds.list_builders())))
        reason = str(e).strip().splitlines()[0]
        hint = f"; close names: {close}" if close else " (see `tfds.list_builders()`)"
        raise invalid(_OWNER, "tfds_name", spec.tfds_name,
                      f"tfds does not know this dataset ({reason}){hint}") from None
    except (ValueError, AssertionError) as e:  # an unknown config ('x/bogus') or version ('x:9')
        reason = " ".join(str(e).split())
        reason = re.sub(r"^Failed to construct dataset .*?\}\": ", "", reason)
        reason = reason.split(" Here are ")[0]
        raise invalid(_OWNER, "tfds_name", spec.tfds_name,
                      f"tfds cannot open it ({reason}){_builder_choices(name)}") from None


def _builder_choices(name: str) -> str:
    """`; '<name>' has configs [...] and versions [...]` (`name`: a tfds dataset without config
    or version), or '' when tfds cannot say."""
    try:
        cls = tfds.builder_cls(name)
    except Exception:  # noqa: BLE001  (only a hint for the message)
        return ""
    configs = [c.name for c in getattr(cls, "BUILDER_CONFIGS", None) or ()]
    versions = {str(v) for v in (cls.VERSION, *getattr(cls, "SUPPORTED_VERSIONS", ())) if v}
    versions |= {str(c.version) for c in getattr(cls, "BUILDER_CONFIGS", None) or ()
                 if getattr(c, "version", None)}
    parts = []
    if configs:
        parts.append(f"configs {configs} ('{name}/<config>')")
    if versions:
        parts.append(f"versions {sorted(versions)} ('{name}:<version>')")
    return f"; {name!r} has " + " and ".join(parts) if parts else ""


def _data_root(builder: Any) -> str:
    """The tfds data dir `builder` reads: its version dir `<root>/<name>[/<config>]/<version>`
    less the dataset's full name."""
    root = str(builder.data_dir)
    for _ in builder.info.full_name.split("/"):
        root = os.path.dirname(root)
    return root


def prepared_builder(builder: Any, tfds_name: str, data_dir: str | None, *, what: str,
                     data_dir_label: str, data_dir_setting: str) -> Any:
    """`builder` (of `tfds_name` in `data_dir`, None: tfds's default) ready to read: a catalogue
    dataset must be prepared already (`DatasetNotPreparedError`: cnnjax never downloads), and
    cnnjax's offline ones are generated on first use, into a data dir checked to be writable
    first. `what` names the dataset in errors (`data: dataset 'voc' (tfds 'voc/2007')`);
    `data_dir_label` is how the data dir is named (`data: data_dir`, `--data_dir`) and
    `data_dir_setting` the config field or flag that points elsewhere (`data.data_dir`)."""
    if not builder.is_prepared():
        if not isinstance(builder, LOCAL_BUILDERS):
            raise DatasetNotPreparedError(missing_dataset_message(what, tfds_name, builder,
                                                                  data_dir_setting))
        _check_can_generate(builder, tfds_name, data_dir, data_dir_label, data_dir_setting)
        logging.info("cnnjax.data: generating %r into %s (offline, first use)", tfds_name,
                     builder.data_dir)
        try:
            builder.download_and_prepare()
        except FileExistsError:
            # Another process of a multi-host job built it into the same data dir first (tfds
            # renames a finished build into place; the later rename fails).
            builder = tfds.builder(tfds_name, data_dir=data_dir)
            if not builder.is_prepared():
                raise
            logging.info("cnnjax.data: another process finished building %r first; using its "
                         "copy", tfds_name)
    if not builder.info.initialized:
        # Opened before the data existed: its info has no splits, even when the data landed
        # since (another process's build, which tfds' `download_and_prepare` then just reuses).
        # Reopened, it reads the prepared copy, as every later run will.
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    return builder


def _check_can_generate(builder: Any, tfds_name: str, data_dir: str | None, data_dir_label: str,
                        data_dir_setting: str) -> None:
    """Refuses a data dir nothing can be created in (read-only, another user's, a typo under
    /proc) before an offline dataset's first-use build: tfds printed its build banner, then
    failed with a bare OSError naming neither the data dir setting nor $TFDS_DATA_DIR."""
    root = _data_root(builder)
    try:
        check_output_dir(root, "data_dir")
    except ValueError as err:
        where = ("" if data_dir is not None
                 else f" (unset: tfds's default data dir {root!r}, from $TFDS_DATA_DIR or "
                      "~/tensorflow_datasets)")
        reason = str(err).split(" is invalid; ", 1)[-1].rstrip(".")
        raise ValueError(f"{data_dir_label}={data_dir!r} is invalid; cnnjax generates "
                         f"{tfds_name!r} there on first use{where}, but {reason}; set "
                         f"{data_dir_setting} to a writable directory.") from None


def missing_dataset_message(what: str, tfds_name: str, builder: Any, data_dir_setting: str
                            ) -> str:
    """Why tfds dataset `tfds_name` (`builder`, not prepared) cannot be read, and how to prepare
    it where there is internet; `what` names it (`data: dataset 'voc' (tfds 'voc/2007')`),
    `data_dir_setting` is the config field or flag that points elsewhere (`data.data_dir`)."""
    version_dir = str(builder.data_dir)
    root = _data_root(builder)
    message = (
        f"{what} is not prepared in the tfds data_dir {root!r}; its files would be in "
        f"{version_dir!r}. cnnjax never downloads data. Prepare it on a machine with internet "
        f"access: `tfds build {tfds_name} --data_dir=<dir>` (or `tfds.builder({tfds_name!r}, "
        f"data_dir=<dir>).download_and_prepare()`), then copy <dir>/{dataset_name(tfds_name)} "
        f"into {root!r}, or set {data_dir_setting} to the directory holding it."
    )
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        # `tfds build --data_dir=<dir>` reads them from <dir>/downloads/manual (tfds' default).
        message += (" This dataset needs a manual download first: put its archives in "
                    "<dir>/downloads/manual before building "
                    f"({os.path.join(root, 'downloads', 'manual')!r} to build in {root!r} "
                    "itself; see the tfds catalogue).")
    return message


class _FakeSource(Source):
    """Random uint8 images and labels held in memory (seeded, identical on every call)."""

    def __init__(self, spec: Spec):
        self.name = "fake"
        self._spec = spec
        self.num_classes = spec.fake_num_classes
        self.native_shape = spec.fake_image_shape
        self.storage_key = ("fake", spec.fake_image_shape, spec.fake_num_classes,
                            spec.fake_num_train, spec.fake_num_eval)
        preset = spec.preset
        self._sizes = {preset.train_split: spec.fake_num_train,
                       preset.eval_split: spec.fake_num_eval}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _bounds(self, split: str, shard: tuple[int, int]) -> tuple[int, int]:
        if split not in self._sizes:
            whole = ", read whole: it takes no slices or '+'" if "[" in split or "+" in split \
                else ""
            raise invalid(_OWNER, _split_field(self._spec, split), split,
                          f"'fake' has splits {list(self._sizes)}{whole}")
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


class _SubsetSource(Source):
    """`inner` restricted to `spec.classes` (relabelled 0..k-1 in their order) and, read
    `for_training`, to the first `spec.train_examples_per_class` examples of each class (stored
    order); by role, not by split string, so an eval split equal to the train split is whole.

    Both are deterministic filters over the stored order. A shard `(i, n)` of the filtered split
    is its every n-th example from the i-th (`Dataset.shard`), so shard sizes differ by at most
    one, as with `tfds.even_splits`; every process reads (but does not decode) the whole split.
    """

    def __init__(self, inner: Source, spec: Spec, *, training: bool = False):
        self.inner, self.spec, self._training = inner, spec, training
        self.name = inner.name
        self.native_shape = inner.native_shape
        self.storage_key = inner.storage_key
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

    def for_training(self) -> Source:
        return _SubsetSource(self.inner, self.spec, training=True)

    def _limit(self) -> int | None:
        return self.spec.train_examples_per_class if self._training else None

    def class_counts(self, split: str) -> np.ndarray:
        """Examples of each original label in the whole `split` (one pass, cached per stored
        split: every class subset and config of one dataset shares it)."""
        self.inner.num_examples(split)  # a clear error for an unknown split
        key = (self.inner.storage_key, split)
        if key not in _LABEL_COUNTS:
            labels = self.inner.read(split, (0, 1)).map(lambda ex: ex["label"])
            counts = np.zeros(self.inner.num_classes, np.int64)
            for batch in labels.batch(8192).as_numpy_iterator():
                counts += np.bincount(batch, minlength=self.inner.num_classes)
            _LABEL_COUNTS[key] = counts
        return _LABEL_COUNTS[key]

    def num_examples(self, split: str, shard: tuple[int, int] = (0, 1)) -> int:
        counts = self.class_counts(split)[list(self.classes)]
        limit = self._limit()
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
        limit = self._limit()
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


# (source's storage_key, split) -> examples per original label; counting reads the whole split
# once per process (a transfer comparison checks ~20 configs of two subsets of one dataset).
_LABEL_COUNTS: dict[tuple[tuple, str], np.ndarray] = {}


def open_source(spec: Spec) -> Source:
    """The source of `spec`'s dataset (a class subset when `spec` asks for one), GPUs hidden from
    TensorFlow first."""
    hide_gpus_from_tensorflow()
    source = _FakeSource(spec) if spec.preset.name == "fake" else TfdsSource(spec)
    if spec.classes is None and spec.train_examples_per_class is None:
        return source
    return _SubsetSource(source, spec)


def write_split_metadata(data_dir: str, tfds_name: str, sizes: Mapping[str, int]) -> None:
    """Makes `data_dir` look like a tfds data dir where `tfds_name` was prepared with `sizes`
    examples per split: its `dataset_info.json` only, no records (for `mock_tfds_dataset`)."""
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    template = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(
            name=split, shard_lengths=[int(n)], num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=builder.data_path, template=template, dataset_name=builder.name,
                split=split, filetype_suffix="tfrecord"))
        for split, n in sizes.items()
    ]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


def _box_features(feature: Any, path: str = "") -> list[str]:
    """The paths ('objects/bbox') of the `BBoxFeature`s in a tfds feature tree."""
    if isinstance(feature, tfds.features.BBoxFeature):
        return [path]
    if isinstance(feature, tfds.features.Sequence):
        return _box_features(feature.feature, path)
    if isinstance(feature, tfds.features.FeaturesDict):
        return [box for key, value in feature.items()
                for box in _box_features(value, f"{path}/{key}" if path else key)]
    return []


@contextlib.contextmanager
def mock_tfds_dataset(spec: Spec, num_examples: int) -> Iterator[None]:
    """Inside it, `spec`'s tfds dataset reads as `num_examples` random examples per split (of
    the shapes and classes of its tfds features) through `tfds.testing.mock_data`, offline.

    mock_data's default looks for split sizes in tfds's own `testing/metadata` folder, which
    installed wheels may lack (the dataset then looks unprepared), so the sizes of the splits
    `spec.train_split` and `spec.eval_split` name are written into `spec.data_dir` first: a
    folder of its own (a dataset already prepared there is refused, not overwritten). A
    dataset with box features (oxford_iiit_pet, voc) is refused: mock_data draws boxes with
    min > max, which tfds refuses at the first read.
    """
    if spec.tfds_name is None:
        raise invalid(_OWNER, "name", spec.preset.name,
                      "expected a tfds dataset to mock (this one is generated in memory)")
    if spec.data_dir is None:
        raise invalid(_OWNER, "data_dir", None,
                      "expected a folder for the mock's split metadata (e.g. a temporary one)")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise invalid(_OWNER, "num_examples", num_examples, "expected an integer >= 1")
    builder = _open_builder(spec)
    if builder.is_prepared():
        raise invalid(_OWNER, "data_dir", spec.data_dir,
                      f"it holds a prepared {spec.tfds_name!r}, which the mock's metadata would "
                      "overwrite; expected a folder without it")
    boxes = _box_features(builder.info.features)
    if boxes:  # else a TensorFlow error at the first example read
        overridden = spec.tfds_name != spec.preset.tfds_name
        field, value = ("tfds_name", spec.tfds_name) if overridden else ("name", spec.preset.name)
        raise invalid(_OWNER, field, value,
                      f"tfds.testing.mock_data cannot mock its box features {boxes} (it draws "
                      "each coordinate on its own, so a box's min exceeds its max, which tfds "
                      "refuses when it reads the example); expected a dataset without boxes to "
                      "mock, e.g. cifar10 or imagenette")
    splits = split_names(spec.train_split) + split_names(spec.eval_split)
    write_split_metadata(spec.data_dir, spec.tfds_name, dict.fromkeys(splits, num_examples))
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=spec.data_dir,
                                policy=tfds.testing.MockPolicy.USE_FILES):
        yield

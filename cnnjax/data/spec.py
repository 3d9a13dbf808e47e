"""The data config: `default_data_config`'s fields and their resolution into a validated `Spec`.

`resolve` does no I/O, so a bad field fails before any dataset is opened; `pipeline`, `detection`
and `segmentation` resolve their configs here, and the sources and transforms read the `Spec`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import ml_collections
import tensorflow_datasets as tfds
from ml_collections import config_dict

from cnnjax.data import presets
from cnnjax.data.builders import LOCAL_BUILDERS
from cnnjax.detection.selective_search import check_settings
from cnnjax.utils.files import distinct_name
from cnnjax.utils.validation import (
    check_bool,
    check_choice,
    check_number,
    check_positive_int,
    invalid,
    is_integer,
)

_OWNER = "data"

# RandAugment's settings (`cnnjax.data.randaugment`), checked here so that a config validates
# without importing TensorFlow.
MAX_MAGNITUDE = 10
# Layers per image at most. The paper searches N in 1..3 (ImageNet: 2); timm takes any N but its
# configs use 2-4. Each layer is traced as a 14-way switch (~1 s of graph building per layer on
# a CPU core), and 10 ops at a useful magnitude leave little of the image, so more than 10 is a
# typo (10**6 would spend days building the map), not an augmentation.
MAX_LAYERS = 10


def check_randaugment(owner: str, num_layers: Any, magnitude: Any, *,
                      layers_arg: str = "num_layers",
                      magnitude_arg: str = "magnitude") -> tuple[int, float]:
    """`(num_layers, magnitude)` as `(int, float)` if `num_layers` is an integer in
    [0, MAX_LAYERS] (0: no op) and `magnitude` a number in [0, 10], else a ValueError naming
    `owner` and the argument (`layers_arg` / `magnitude_arg`, e.g. a config field's name)."""
    if not is_integer(num_layers) or not 0 <= num_layers <= MAX_LAYERS:
        raise invalid(owner, layers_arg, num_layers,
                      f"expected an integer in [0, {MAX_LAYERS}] (RandAugment ops applied to "
                      "each image; 0: none; the paper uses 1-3)")
    value = check_number(owner, magnitude_arg, magnitude,
                         f"expected a number in [0, {MAX_MAGNITUDE}] (RandAugment's magnitude "
                         f"scale, {MAX_MAGNITUDE} the strongest)",
                         low=0.0, high=MAX_MAGNITUDE, strings=False)
    return int(num_layers), value


def default_data_config(name: str = "digits") -> ml_collections.ConfigDict:
    """Returns a data config with every field the pipeline reads, set to `name`'s defaults.

    Fields: `name`; `data_dir` (None: tfds's default, `$TFDS_DATA_DIR` or ~/tensorflow_datasets);
    `tfds_name` (None: the preset's, e.g. `imagenette/320px-v2`); `image_size` (None: native size,
    224 for ImageNet-like data); `augment`; `train_split` / `eval_split` (None: the preset's, any
    tfds split string such as `train[:90%]` works; `fake` reads whole splits only); `cache` /
    `shuffle_buffer` (None: the preset's, so that changing `name` alone, e.g.
    `--config.data.name=imagenet2012`, also takes that dataset's; `pipeline`); `classes` (None:
    every class; else the labels to keep, remapped
    to 0..k-1 in the given order); `train_examples_per_class` (None: all; else the first n
    examples of each kept class in the train split, never cut in the eval split);
    `randaugment_layers` / `randaugment_magnitude` (RandAugment ops per training image, 0..10,
    0: off, and their magnitude on the 0..10 scale; `cnnjax.data.randaugment`; needs `augment`);
    `grey_to_rgb` (True: grey images become RGB, their one channel repeated 3 times, and the
    preset's one-channel mean/std with it, e.g. to fine-tune an ImageNet-pretrained RGB model on
    mnist; refused for data that is not grey); and `fake_*`, the shape, classes and sizes of the
    `fake` dataset (random in-memory images for benchmarks; with any other `name` they must
    keep these defaults, as they would do nothing).
    """
    presets.get_preset(name)  # an unknown name: a ValueError listing the presets
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
            "cache": config_dict.placeholder(bool),
            "shuffle_buffer": config_dict.placeholder(int),
            "classes": config_dict.placeholder(tuple),
            "train_examples_per_class": config_dict.placeholder(int),
            "randaugment_layers": 0,
            "randaugment_magnitude": 9.0,
            "grey_to_rgb": False,
            "fake_image_shape": fake.image_shape,
            "fake_num_classes": fake.num_classes,
            "fake_num_train": 1024,
            "fake_num_eval": 256,
        }
    )


# The task-specific data configs extend `default_data_config`; they live here, beside it, so that
# a detection or segmentation config file loads without TensorFlow (`detection.py`,
# `segmentation.py` and `proposals.py` re-export them and resolve the extra fields).
DEFAULT_MAX_BOXES = 16


def default_proposals_config() -> ml_collections.ConfigDict:
    """`data.proposals`: unset (`method=None`) means the model's own proposals (a detector with
    an RPN, YOLO) or its dense windows (R-CNN, SPP-net, Fast R-CNN); see `cnnjax.data.proposals`."""
    return ml_collections.ConfigDict({
        "method": ml_collections.FieldReference(None, field_type=str),  # selective_search
        "strategy": ml_collections.FieldReference(None, field_type=str),  # fast | quality
        "scale": ml_collections.FieldReference(None, field_type=float),  # upsampling, 1.0
        "max_proposals": ml_collections.FieldReference(None, field_type=int),  # P, 256
    })


def detection_data_config(name: str = "shapes") -> ml_collections.ConfigDict:
    """`default_data_config(name)` plus `max_boxes` (ground-truth rows per image) and
    `proposals` (external region proposals, `cnnjax.data.proposals`; unset by default)."""
    config = default_data_config(name)
    config.max_boxes = DEFAULT_MAX_BOXES
    config.proposals = default_proposals_config()
    return config


def segmentation_data_config(name: str = "shapes") -> ml_collections.ConfigDict:
    """`default_data_config(name)` (use `tfds_name`, e.g. `shapes_segmentation`, beside a
    preset's normalization) plus `scale_range`: None, or `(low, high)` for the FCN/DeepLab
    training augmentation (`cnnjax.data.segmentation`), e.g. (0.5, 2.0)."""
    config = default_data_config(name)
    config.scale_range = config_dict.placeholder(tuple)
    return config


@dataclasses.dataclass(frozen=True)
class Spec:
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
    grey_to_rgb: bool  # 1-channel images fed as 3 (checked against the images in `transforms`)
    fake_image_shape: tuple[int, int, int]
    fake_num_classes: int
    fake_num_train: int
    fake_num_eval: int

    def known_output_hw(self) -> tuple[int, int] | None:
        """The output (height, width), when known before any I/O: the configured size, else the
        preset's fixed native size (the `fake` shape); None for variable-size images or a
        `tfds_name` other than the preset's, whose images only the dataset itself knows."""
        if self.size is not None:
            return self.size
        if self.preset.name == "fake":
            return self.fake_image_shape[0], self.fake_image_shape[1]
        height, width, _ = self.preset.image_shape
        if self.tfds_name != self.preset.tfds_name or height is None or width is None:
            return None
        return height, width


def _optional_str(arg: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise invalid(_OWNER, arg, value, "expected a non-empty string or None")
    return value


def split_names(split: str) -> list[str]:
    """The named splits a split string reads: 'train[:90%]+test' -> ['train', 'test']."""
    return list(dict.fromkeys(part.split("[")[0].strip() for part in split.split("+")))


def splits_named(tfds_name: str, splits: Any) -> str:
    """`'digits' has splits ['train', 'test']`: what a split field may name (slices of them too),
    for a split error."""
    return f"{tfds_name!r} has splits {list(splits)}"


def dataset_name(tfds_name: str) -> str:
    """The dataset a tfds name reads, without config or version ('voc/2007:5.*.*' -> 'voc'):
    the folder tfds writes under its data_dir, and the key of cnnjax's offline datasets."""
    return tfds_name.split(":")[0].split("/")[0]


#: The split names of cnnjax's offline datasets, known before they are generated.
_LOCAL_SPLITS = {builder.name: builder.SPLIT_NAMES for builder in LOCAL_BUILDERS}


def _check_split(arg: str, value: Any, tfds_name: str | None) -> str | None:
    """A split string's syntax (tfds's own parser, no I/O) and, for cnnjax's offline datasets,
    its split names, before the dataset is generated on first use (seconds to build)."""
    split = _optional_str(arg, value)
    if split is None:
        return None
    # 'digits:1.0.0' and 'digits:1.*.*' name the same offline dataset as 'digits' (None: fake).
    local = _LOCAL_SPLITS.get(dataset_name(tfds_name)) if tfds_name else None
    has = "" if local is None else f"{splits_named(tfds_name, local)}; "
    try:
        tfds.core.ReadInstruction.from_spec(split)
    except (ValueError, TypeError, AssertionError):
        raise invalid(_OWNER, arg, split,
                      f"{has}expected a tfds split string such as 'train', 'test[:10%]', "
                      "'train[100:200]' or 'train[:90%]+test' "
                      "(https://www.tensorflow.org/datasets/splits)") from None
    if local is not None and any(name not in local for name in split_names(split)):
        raise invalid(_OWNER, arg, split,
                      f"{splits_named(tfds_name, local)} (slices like 'train[:90%]' also work)")
    return split


def _check_classes(value: Any) -> tuple[int, ...] | None:
    """`data.classes`: None, or a non-empty sequence of distinct labels >= 0 (range checked once
    the dataset's class count is known, in `sources._SubsetSource`)."""
    if value is None:
        return None
    if (isinstance(value, str | bytes) or not isinstance(value, tuple | list) or not value
            or not all(is_integer(v) and v >= 0 for v in value) or len(set(value)) != len(value)):
        raise invalid(_OWNER, "classes", value,
                      "expected None (every class) or a non-empty list of distinct labels >= 0, "
                      "e.g. (5, 6, 7, 8, 9) (kept in that order, relabelled 0..k-1)")
    return tuple(int(v) for v in value)


FAKE_FIELDS = ("fake_image_shape", "fake_num_classes", "fake_num_train", "fake_num_eval")


def _check_fake_fields_unset(name: str, cfg: dict[str, Any], defaults: dict[str, Any]) -> None:
    """The `fake_*` fields shape the in-memory `fake` set only: beside a real dataset a value
    other than the default (which every config carries) would be silently ignored."""
    for arg in FAKE_FIELDS:
        value, default = cfg[arg], defaults[arg]
        if arg == "fake_image_shape":  # a config.json's list is the same shape
            same = tuple(int(v) for v in value) == tuple(default)
        else:
            same = int(value) == default
        if not same:
            raise invalid(_OWNER, arg, value,
                          f"expected the default {default!r} for name={name!r}: the fake_* "
                          "fields shape the in-memory 'fake' dataset only (the size and classes "
                          f"of {name!r} come from its tfds data); set data.name='fake' to use "
                          "them, or leave them unset")


def check_name(name: Any) -> str:
    """`name` if cnnjax has a preset for it (the names `resolve` accepts), else a ValueError
    listing them; without TensorFlow, so a config check refuses a typo before the pipeline."""
    return check_choice(_OWNER, "name", name, presets.list_datasets())


#: TensorFlow counts a tensor's values in int32: one image of more fails deep in tf.image with an
#: overflow naming no field (2**31 pixels per side, session 53), or cannot be allocated.
MAX_IMAGE_VALUES = 2**31 - 1


def _check_image_values(name: str, image_size: int | None, size: tuple[int, int], cfg: dict,
                        preset: presets.DatasetPreset, fake_shape: Any) -> None:
    """Refuses an `image_size` whose one image holds more values than TensorFlow can count."""
    channels = (3 if cfg["grey_to_rgb"] is True else
                int(fake_shape[2]) if name == "fake" else preset.image_shape[2])
    if size[0] * size[1] * channels > MAX_IMAGE_VALUES:
        largest = math.isqrt(MAX_IMAGE_VALUES // channels)
        raise invalid(_OWNER, "image_size", image_size,
                      f"expected at most {largest} for {name!r} ({channels} channel(s)): one "
                      f"image of {size[0]}x{size[1]}x{channels} values is beyond TensorFlow's "
                      "int32 tensor sizes")


#: NumPy and tf.data count examples in int64 (a shuffle buffer, a per-class limit): a larger
#: count passed `resolve` and overflowed mid-run, after the workdir held checkpoints (session 63).
MAX_INT64 = 2**63 - 1
#: The `fake` labels reach the model as int32, so more classes could not be labelled.
MAX_FAKE_CLASSES = 2**31 - 1
#: The `fake` source draws each split into memory at once (uint8 images, int64 labels): a split
#: beyond this failed at the draw (MemoryError for 3 PiB) or in NumPy naming no field.
MAX_FAKE_SPLIT_BYTES = 2**34


def _check_fake_sizes(cfg: dict[str, Any]) -> None:
    """The `fake` fields describe a dataset `_FakeSource` can draw into memory: one image
    TensorFlow can count, int32 labels and at most MAX_FAKE_SPLIT_BYTES per split."""
    shape = cfg["fake_image_shape"]
    if (not isinstance(shape, tuple | list) or len(shape) != 3
            or not all(is_integer(v) and v > 0 for v in shape)):
        raise invalid(_OWNER, "fake_image_shape", shape,
                      "expected three positive integers (height, width, channels)")
    if math.prod(shape) > MAX_IMAGE_VALUES:
        raise invalid(_OWNER, "fake_image_shape", shape,
                      f"expected at most 2**31 - 1 values per image (it holds {math.prod(shape)}):"
                      " TensorFlow counts a tensor's values in int32")
    check_positive_int(_OWNER, "fake_num_classes", cfg["fake_num_classes"],
                       high=MAX_FAKE_CLASSES,
                       valid="expected a positive integer <= 2**31 - 1 (the labels are int32)")
    per_example = math.prod(shape) + 8  # uint8 pixels and an int64 label
    most = MAX_FAKE_SPLIT_BYTES // per_example
    for arg in ("fake_num_train", "fake_num_eval"):
        check_positive_int(_OWNER, arg, cfg[arg], high=most,
                           valid=f"expected a positive integer <= {most}: the 'fake' dataset "
                           f"draws each split into memory, {per_example} bytes per example of "
                           f"fake_image_shape={tuple(shape)!r} (uint8 image, int64 label), up "
                           "to 16 GiB (2**34 bytes)")


def resolve(data_config: Any, *, preset_crop: bool = True) -> Spec:
    """Fills missing fields from `default_data_config(name)` and validates every field.
    `preset_crop=False` for the dense-target pipelines (detection, segmentation), which never
    apply the preset's classification crop, so its `image_size` check does not apply."""
    fields = dict(data_config.items()) if hasattr(data_config, "items") else None
    if fields is None:
        raise invalid(_OWNER, "config", data_config, "expected an ml_collections ConfigDict")
    name = check_name(fields.get("name"))
    preset = presets.get_preset(name)
    defaults = dict(default_data_config(name).items())
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        raise invalid(_OWNER, "fields", unknown, f"expected only {sorted(defaults)}")
    cfg = {key: fields.get(key, default) for key, default in defaults.items()}

    image_size = cfg["image_size"]
    if image_size is not None:
        if not is_integer(image_size) or image_size <= 0:
            raise invalid(_OWNER, "image_size", image_size,
                          "expected a positive integer, or None for the native size")
        size: tuple[int, int] | None = (int(image_size), int(image_size))
    elif preset.default_image_size is not None:
        size = (preset.default_image_size, preset.default_image_size)
    else:
        size = None

    fake_shape = cfg["fake_image_shape"]
    _check_fake_sizes(cfg)
    # Unset: the preset's, whichever preset `name` names now (not the config's first one).
    shuffle_buffer = (preset.shuffle_buffer if cfg["shuffle_buffer"] is None
                      else check_positive_int(
                          _OWNER, "shuffle_buffer", cfg["shuffle_buffer"], high=MAX_INT64,
                          valid="expected a positive integer <= 2**63 - 1 (tf.data's shuffle "
                          "buffer size is an int64)"))
    cache = preset.cache if cfg["cache"] is None else check_bool(_OWNER, "cache", cfg["cache"])
    if name != "fake":
        _check_fake_fields_unset(name, cfg, defaults)
    per_class = cfg["train_examples_per_class"]
    if per_class is not None:
        check_positive_int(_OWNER, "train_examples_per_class", per_class, high=MAX_INT64,
                           valid="expected a positive integer (examples kept per class in the "
                           "train split), or None for all of them; at most 2**63 - 1 (counted "
                           "in int64)")

    if size is not None:
        _check_image_values(name, image_size, size, cfg, preset, fake_shape)

    augment = check_bool(_OWNER, "augment", cfg["augment"])
    if (preset_crop and augment and preset.train_augmentation == "pad_crop_flip"
            and size is not None and min(size) <= preset.crop_padding):
        # A crop of s pixels at a uniform offset in [0, 2p] of an image padded by p overlaps it
        # at 2s - 1 of the 2p + 1 offsets per axis: at all of them only when s > p.
        pad = preset.crop_padding
        blank = 1 - math.prod(min(2 * s - 1, 2 * pad + 1) / (2 * pad + 1) for s in size)
        raise invalid(_OWNER, "image_size", image_size,
                      f"expected more than {pad} pixels for {name!r}: its training crop pads "
                      f"{pad} pixels per side, so {blank:.0%} of its random crops would be "
                      "padding only, examples showing nothing of their class (or set "
                      "augment=False)")
    ra_layers, ra_magnitude = check_randaugment(
        _OWNER, cfg["randaugment_layers"], cfg["randaugment_magnitude"],
        layers_arg="randaugment_layers", magnitude_arg="randaugment_magnitude")
    if ra_layers and not augment:
        raise invalid(_OWNER, "randaugment_layers", ra_layers,
                      "expected 0 when augment=False (RandAugment is a training augmentation: "
                      "set augment=True, or randaugment_layers=0)")

    tfds_name = _optional_str("tfds_name", cfg["tfds_name"])
    if name == "fake" and tfds_name is not None:
        raise invalid(_OWNER, "tfds_name", tfds_name,
                      "expected None for name='fake' (random in-memory images, no tfds); to "
                      "read a tfds dataset, set data.name to its preset instead")
    tfds_name = tfds_name or preset.tfds_name
    return Spec(
        preset=preset,
        tfds_name=tfds_name,
        data_dir=_optional_str("data_dir", cfg["data_dir"]),
        size=size,
        augment=augment,
        train_split=_check_split("train_split", cfg["train_split"], tfds_name)
        or preset.train_split,
        eval_split=_check_split("eval_split", cfg["eval_split"], tfds_name) or preset.eval_split,
        cache=cache,
        shuffle_buffer=shuffle_buffer,
        classes=_check_classes(cfg["classes"]),
        train_examples_per_class=None if per_class is None else int(per_class),
        randaugment_layers=ra_layers,
        randaugment_magnitude=ra_magnitude,
        grey_to_rgb=check_bool(_OWNER, "grey_to_rgb", cfg["grey_to_rgb"]),
        fake_image_shape=tuple(int(v) for v in fake_shape),  # type: ignore[arg-type]
        fake_num_classes=int(cfg["fake_num_classes"]),
        fake_num_train=int(cfg["fake_num_train"]),
        fake_num_eval=int(cfg["fake_num_eval"]),
    )


# ---------------------------------------------------------------------------- proposals
# The checked `data.proposals` settings, here (TensorFlow-free) so that `check_config` can
# validate them without importing cnnjax.data.proposals and TensorFlow.

_PROPOSALS_OWNER = "data.proposals"
METHODS = ("selective_search",)
DEFAULT_MAX_PROPOSALS = 256
MAX_PROPOSALS_LIMIT = 10_000
FIELDS = ("method", "strategy", "scale", "max_proposals")


@dataclasses.dataclass(frozen=True)
class ProposalSpec:
    """A checked `data.proposals` with its defaults filled in."""

    method: str
    strategy: str
    scale: float
    max_proposals: int

    def cache_path(self, builder: Any, split: str) -> str:
        """`<data dir>/proposals/<split>-<settings>.npz`; a split string with characters a file
        name cannot hold (a slice such as `train[:90%]`) gets a hash of its exact text, so
        `train[:90%]` and `train[90%:]` never share a file."""
        name = (f"{distinct_name(split)}-{self.method}-{self.strategy}-x{self.scale:.10g}"
                f"-max{self.max_proposals}.npz")
        return os.path.join(builder.data_dir, "proposals", name)


def proposal_spec(config: Any) -> ProposalSpec | None:
    """The `ProposalSpec` of a `data.proposals` config (a ConfigDict or mapping), None when
    `method` is unset; a ValueError naming the field otherwise."""
    if config is None:
        return None
    fields = dict(config.items()) if hasattr(config, "items") else None
    if fields is None:
        raise invalid(_PROPOSALS_OWNER, "config", config,
                      "expected a ConfigDict with method, strategy, scale, max_proposals")
    for name in fields:
        check_choice(_PROPOSALS_OWNER, "field", name, list(FIELDS))
    if fields.get("method") is None:
        # Settings of no method were ignored: the run trained on the model's own proposals
        # while its config.json recorded e.g. strategy='quality', scale=2.
        for name in ("strategy", "scale", "max_proposals"):
            if fields.get(name) is not None:
                raise invalid(_PROPOSALS_OWNER, name, fields[name],
                              f"expected it unset while method is unset (the model's own "
                              f"proposals or dense windows); set method to one of "
                              f"{list(METHODS)} to use it (as the shapes detection configs "
                              f"do given ':selective_search', e.g. "
                              f"experiments/configs/rcnn_shapes.py:selective_search), or unset "
                              f"{name}")
        return None
    check_choice(_PROPOSALS_OWNER, "method", fields["method"], METHODS)
    unset = {"strategy": "fast", "scale": 1.0, "max_proposals": DEFAULT_MAX_PROPOSALS}
    strategy, scale, max_proposals = (
        unset[name] if fields.get(name) is None else fields[name] for name in unset)
    check_settings(_PROPOSALS_OWNER, strategy, scale)
    max_proposals = check_positive_int(_PROPOSALS_OWNER, "max_proposals", max_proposals)
    if max_proposals > MAX_PROPOSALS_LIMIT:
        raise invalid(_PROPOSALS_OWNER, "max_proposals", max_proposals,
                      f"expected at most {MAX_PROPOSALS_LIMIT:,} (R-CNN uses ~2,000; the cache "
                      "holds max_proposals boxes per image)")
    return ProposalSpec(fields["method"], strategy, float(scale), max_proposals)


def split_detection_fields(data_config: Any,
                           ) -> tuple[ml_collections.ConfigDict, int, ProposalSpec | None]:
    """`(the classification data config, max_boxes, proposals)` of a detection data config;
    validates the last two and the fields detection refuses, without TensorFlow."""
    if not hasattr(data_config, "items"):
        raise invalid(_OWNER, "config", data_config, "expected an ml_collections ConfigDict")
    fields = dict(data_config.items())
    max_boxes = check_positive_int(_OWNER, "max_boxes", fields.pop("max_boxes",
                                                                   DEFAULT_MAX_BOXES))
    proposals = proposal_spec(fields.pop("proposals", None))
    if fields.get("name") == "fake":
        raise invalid(_OWNER, "name", "fake",
                      "detection needs a tfds dataset with `objects` boxes, e.g. shapes")
    for arg in ("classes", "train_examples_per_class"):  # class subsets: classification only
        if fields.get(arg) is not None:
            raise invalid(_OWNER, arg, fields[arg],
                          "expected None: class subsets are not supported for detection")
    _check_no_randaugment(fields)
    return ml_collections.ConfigDict(fields), max_boxes, proposals


def _check_no_randaugment(fields: dict[str, Any]) -> None:
    """The dense-target pipelines (boxes, class maps) take no RandAugment: refused here, before
    TensorFlow, with the message `pipeline.open_whole_image_source` gives."""
    layers = fields.get("randaugment_layers", 0)
    if layers is not None and not (is_integer(layers) and layers == 0):
        raise invalid(_OWNER, "randaugment_layers", layers,
                      "expected 0: RandAugment is for classification (its geometric ops would "
                      "have to move the boxes or class maps too)")


def split_segmentation_fields(data_config: Any) -> tuple[Spec, tuple[float, float] | None]:
    """`(the resolved spec of the pipeline's fields, scale_range)` of a segmentation data config;
    validates the segmentation-only fields, without TensorFlow. `scale_range` with
    `augment=False` is refused, as `resolve` refuses RandAugment then: it is a training
    augmentation, which augment=False turns off, so the setting would be silently dropped."""
    if not hasattr(data_config, "items"):
        raise invalid(_OWNER, "config", data_config, "expected an ml_collections ConfigDict")
    fields = dict(data_config.items())
    scale_range = fields.pop("scale_range", None)
    if scale_range is not None:
        ok = (isinstance(scale_range, tuple | list) and len(scale_range) == 2
              and all(isinstance(v, int | float) and not isinstance(v, bool)
                      and 0 < v < math.inf for v in scale_range)
              and scale_range[0] <= scale_range[1])
        if not ok:
            raise invalid(_OWNER, "scale_range", scale_range,
                          "expected None or (low, high) with 0 < low <= high, e.g. (0.5, 2.0)")
        scale_range = (float(scale_range[0]), float(scale_range[1]))
    for arg in ("classes", "train_examples_per_class"):  # class subsets: classification only
        if fields.get(arg) is not None:
            raise invalid(_OWNER, arg, fields[arg],
                          "expected None: class subsets are not supported for segmentation")
    if fields.get("name") == "fake" and fields.get("tfds_name") is None:
        raise invalid(_OWNER, "name", "fake",
                      "expected a tfds dataset: segmentation needs a `segmentation_mask`, e.g. "
                      "name='shapes' with tfds_name='shapes_segmentation'")
    _check_no_randaugment(fields)
    spec = resolve(ml_collections.ConfigDict(fields), preset_crop=False)  # whole image + flip
    if scale_range is not None and not spec.augment:
        raise invalid(_OWNER, "scale_range", scale_range,
                      "expected None when augment=False (the random scale and crop is a "
                      "training augmentation: set augment=True, or scale_range=None)")
    return spec, scale_range


def resolve_for_task(data_config: Any, task: str) -> Spec:
    """The `Spec` of `task`'s data config (classification, detection or segmentation) with the
    task's own fields checked, as its input module resolves it but without TensorFlow, so a
    config check refuses a bad field before the pipeline starts."""
    if task == "segmentation":
        return split_segmentation_fields(data_config)[0]
    if task == "detection":
        return resolve(split_detection_fields(data_config)[0], preset_crop=False)
    return resolve(data_config)


def check_proposals_set(data_config: Any) -> ProposalSpec:
    """The `ProposalSpec` of a detection data config that asks for external proposals, else a
    ValueError (nothing to prepare); checked before TensorFlow starts."""
    if "proposals" not in data_config:  # a classification or segmentation config
        raise invalid(_OWNER, "proposals", None, "expected a detection config with "
                      "data.proposals set (nothing to prepare), e.g. "
                      "experiments/configs/rcnn_shapes.py:selective_search")
    proposals = split_detection_fields(data_config)[2]
    if proposals is None:
        raise invalid(_OWNER, "proposals.method", None,
                      f"expected one of {list(METHODS)} (nothing to prepare)")
    return proposals

"""Per-dataset defaults: tfds name, classes, native shape, splits, normalization and transforms.

A preset tells the pipeline what a dataset is and how it is usually fed to a CNN, so a config only
names the dataset. Normalization statistics are per channel on the [0, 1] pixel scale:
MNIST/Fashion-MNIST/CIFAR values are the usual published training-set statistics, ImageNet's are
the torchvision/Caffe values; those of cnnjax's offline `digits` and `shapes` are computed from
their train splits (the tests recompute them).

Transforms:
- train augmentation `"none"`: resize to `image_size` when it differs from the native size.
- `"pad_crop_flip"` (CIFAR): zero-pad `crop_padding` pixels per side, random crop back to the image
  size, random horizontal flip (an `image_size` of at most `crop_padding` is refused: then some
  crops, those offset more than `image_size - 1` from the centre, hold padding only).
- `"random_resized_crop_flip"` (ImageNet-like): Inception-style crop covering 8%-100% of the image
  area with aspect ratio 3/4-4/3, resized to `image_size`, random horizontal flip. When 10
  attempts find no such crop (a strip of extreme aspect ratio), torchvision's fallback: the
  centred crop of the full short side with the aspect ratio clamped to 3/4-4/3. The crops are
  drawn by TF's `sample_distorted_bounding_box` (big_vision's and the TF Inception recipes'),
  whose distribution is not torchvision's: on a 224x224 image the mean crop covers 40% of it
  (torchvision 48%), and 41% of crops cover under 30% (torchvision 28%; session 45).
- eval `"resize"`: resize to `image_size` when it differs from the native size.
- `"resize_center_crop"`: resize the shorter side to `round(image_size / crop_fraction)` (256 for
  224 with the usual 0.875; `crop_fraction` in (0, 1]), then center-crop `image_size` x
  `image_size`, with torchvision's `Resize` + `CenterCrop` sizes and offsets (the longer side
  truncated, offsets rounded).

`DatasetPreset` checks every field when built (a ValueError naming it), before any tf.data map.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from cnnjax.utils.validation import (
    check_bool,
    check_number,
    check_positive_int,
    invalid,
    is_integer,
)

TRAIN_AUGMENTATIONS = ("none", "pad_crop_flip", "random_resized_crop_flip")
EVAL_TRANSFORMS = ("resize", "resize_center_crop")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetPreset:
    """How one dataset is read and preprocessed by default.

    `image_shape` is the stored `(height, width, channels)`; height/width are `None` for datasets
    of variable-size images, which then need `default_image_size`.
    `tfds_name` is `None` only for `fake` (in-memory random images, no tfds).
    """

    name: str
    tfds_name: str | None
    num_classes: int
    image_shape: tuple[int | None, int | None, int]
    train_split: str
    eval_split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_augmentation: str = "none"
    eval_transform: str = "resize"
    default_image_size: int | None = None
    crop_padding: int = 4
    crop_fraction: float = 0.875
    cache: bool = True
    shuffle_buffer: int = 10_000

    def __post_init__(self) -> None:
        owner = f"DatasetPreset({self.name!r})"
        check_transform_fields(owner, self.train_augmentation, self.eval_transform,
                               self.crop_padding, self.crop_fraction)
        channels = _check_image_shape(owner, self.image_shape)
        _check_normalization(owner, self.mean, self.std, channels)
        for arg in ("num_classes", "shuffle_buffer"):
            check_positive_int(owner, arg, getattr(self, arg))
        _check_default_image_size(owner, self.default_image_size, self.image_shape)
        object.__setattr__(self, "cache", check_bool(owner, "cache", self.cache))  # np.bool_ too


def _check_image_shape(owner: str, shape: object) -> int:
    """The stored `(height, width, channels)` (sides None for variable-size images); returns the
    channel count the mean/std must match."""
    if (not isinstance(shape, tuple | list) or len(shape) != 3
            or not all(v is None or (is_integer(v) and v > 0) for v in shape[:2])
            or not (is_integer(shape[2]) and shape[2] > 0)):
        raise invalid(owner, "image_shape", shape,
                      "expected (height, width, channels): positive integers, height and "
                      "width None for variable-size images")
    return shape[2]


def _check_normalization(owner: str, mean: tuple[float, ...], std: tuple[float, ...],
                         channels: int) -> None:
    """One finite mean and one finite std > 0 per channel: the pipeline divides by the std."""
    if len(mean) != channels or len(std) != channels:
        raise invalid(owner, "mean/std", (mean, std),
                      f"expected {channels} values each (one per channel)")
    if not all(_finite(m) for m in mean):
        raise invalid(owner, "mean", mean,
                      f"expected {channels} finite numbers (per-channel means of [0, 1] "
                      "pixels)")
    if not all(_finite(s) and s > 0 for s in std):
        raise invalid(owner, "std", std,
                      f"expected {channels} finite numbers > 0 (per-channel standard "
                      "deviations of [0, 1] pixels; the pipeline divides by them)")


def _check_default_image_size(owner: str, size: object,
                              shape: tuple[int | None, int | None, int]) -> None:
    """A positive integer, or None for fixed-size images: variable-size ones need it."""
    if size is not None and (not is_integer(size) or size <= 0):
        raise invalid(owner, "default_image_size", size,
                      "expected a positive integer, or None for fixed-size images")
    if None in shape[:2] and size is None:
        raise invalid(owner, "default_image_size", None,
                      "variable-size datasets need a default image size")


def check_transform_fields(owner: str, train_augmentation: str, eval_transform: str,
                           crop_padding: int, crop_fraction: float) -> None:
    """The transform settings a `DatasetPreset` and `transforms.Transforms` share, else a
    ValueError naming `owner` and the field."""
    if train_augmentation not in TRAIN_AUGMENTATIONS:
        raise invalid(owner, "train_augmentation", train_augmentation,
                      f"expected one of {list(TRAIN_AUGMENTATIONS)}")
    if eval_transform not in EVAL_TRANSFORMS:
        raise invalid(owner, "eval_transform", eval_transform,
                      f"expected one of {list(EVAL_TRANSFORMS)}")
    if not is_integer(crop_padding) or crop_padding < 0:
        raise invalid(owner, "crop_padding", crop_padding,
                      "expected an integer >= 0 (zero pixels padded per side before "
                      "pad_crop_flip's random crop)")
    # Above 1 the resized shorter side, round(size / crop_fraction), is shorter than the crop
    # (torchvision's CenterCrop would pad it with zeros).
    check_number(owner, "crop_fraction", crop_fraction,
                 "expected a number in (0, 1] (the eval centre crop's share of the resized "
                 "shorter side, 0.875 for 224 of 256)", low=0.0, high=1.0, low_open=True,
                 strings=False)


def _finite(value: object) -> bool:
    """A real number (not a bool), not NaN or infinite."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
            and math.isfinite(value))


PRESETS: dict[str, DatasetPreset] = {
    p.name: p
    for p in (
        DatasetPreset(
            name="digits", tfds_name="digits", num_classes=10, image_shape=(8, 8, 1),
            train_split="train", eval_split="test", mean=(0.3058,), std=(0.3764,),
            shuffle_buffer=2048,
        ),
        DatasetPreset(
            name="shapes", tfds_name="shapes", num_classes=4, image_shape=(32, 32, 3),
            train_split="train", eval_split="test",
            mean=(0.5091, 0.5090, 0.5003), std=(0.2855, 0.2891, 0.2870),
            train_augmentation="pad_crop_flip", shuffle_buffer=2048,
        ),
        DatasetPreset(
            name="mnist", tfds_name="mnist", num_classes=10, image_shape=(28, 28, 1),
            train_split="train", eval_split="test", mean=(0.1307,), std=(0.3081,),
            shuffle_buffer=60_000,
        ),
        DatasetPreset(
            name="fashion_mnist", tfds_name="fashion_mnist", num_classes=10,
            image_shape=(28, 28, 1), train_split="train", eval_split="test",
            mean=(0.2860,), std=(0.3530,), shuffle_buffer=60_000,
        ),
        DatasetPreset(
            name="cifar10", tfds_name="cifar10", num_classes=10, image_shape=(32, 32, 3),
            train_split="train", eval_split="test",
            mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
            train_augmentation="pad_crop_flip", shuffle_buffer=50_000,
        ),
        DatasetPreset(
            name="cifar100", tfds_name="cifar100", num_classes=100, image_shape=(32, 32, 3),
            train_split="train", eval_split="test",
            mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
            train_augmentation="pad_crop_flip", shuffle_buffer=50_000,
        ),
        DatasetPreset(
            name="imagenette", tfds_name="imagenette/320px-v2", num_classes=10,
            image_shape=(None, None, 3), train_split="train", eval_split="validation",
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            train_augmentation="random_resized_crop_flip", eval_transform="resize_center_crop",
            default_image_size=224, shuffle_buffer=10_000,
        ),
        DatasetPreset(
            name="imagenet2012", tfds_name="imagenet2012", num_classes=1000,
            image_shape=(None, None, 3), train_split="train", eval_split="validation",
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            train_augmentation="random_resized_crop_flip", eval_transform="resize_center_crop",
            default_image_size=224, cache=False, shuffle_buffer=10_000,
        ),
        # Oxford-IIIT Pet: 37 breeds (classification, ImageNet-style crops) and trimaps
        # (config.task="segmentation": background / pet, the outline band ignored; the whole
        # image resized, `data.segmentation`).
        DatasetPreset(
            name="oxford_iiit_pet", tfds_name="oxford_iiit_pet", num_classes=37,
            image_shape=(None, None, 3), train_split="train", eval_split="test",
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            train_augmentation="random_resized_crop_flip", eval_transform="resize_center_crop",
            default_image_size=224, shuffle_buffer=3_680,
        ),
        # PASCAL VOC detection (config.task="detection": `objects` boxes of 20 classes, difficult
        # objects flagged). Whole images resized to a square, YOLO v1's 448 by default; the
        # 2012 test set has no labels, so its eval split is the validation set.
        DatasetPreset(
            name="voc2007", tfds_name="voc/2007", num_classes=20, image_shape=(None, None, 3),
            train_split="train+validation", eval_split="test", mean=IMAGENET_MEAN,
            std=IMAGENET_STD, default_image_size=448, cache=False, shuffle_buffer=5_011,
        ),
        DatasetPreset(
            name="voc2012", tfds_name="voc/2012", num_classes=20, image_shape=(None, None, 3),
            train_split="train", eval_split="validation", mean=IMAGENET_MEAN, std=IMAGENET_STD,
            default_image_size=448, cache=False, shuffle_buffer=5_717,
        ),
        # Random in-memory images for benchmarks; shape and classes come from the `fake_*`
        # config fields, these values are only the defaults.
        DatasetPreset(
            name="fake", tfds_name=None, num_classes=10, image_shape=(32, 32, 3),
            train_split="train", eval_split="test", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        ),
    )
}


def list_datasets() -> list[str]:
    """Returns the dataset names cnnjax has presets for, sorted."""
    return sorted(PRESETS)


def get_preset(name: str) -> DatasetPreset:
    """Returns the preset for `name`; raises a ValueError listing valid names if unknown."""
    if name not in PRESETS:
        raise invalid("data", "name", name, f"expected one of {list_datasets()}")
    return PRESETS[name]

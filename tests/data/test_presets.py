"""Dataset presets and the catalogue-dataset path, offline with `tfds.testing.mock_data`.

Catalogue datasets cannot be downloaded here, so each test writes the dataset's tfds metadata
(`dataset_info.json` with split sizes) into a temporary data dir and mocks the records.
"""

from __future__ import annotations

import itertools
import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cnnjax.data import pipeline, sources
from cnnjax.data.pipeline import (
    DatasetNotPreparedError,
    default_data_config,
    eval_batches,
    get_dataset_info,
    train_batches,
)
from cnnjax.data.presets import DatasetPreset, get_preset, list_datasets
from cnnjax.data.spec import resolve

# Makes `root` look like a data dir where `tfds_name` was prepared with `sizes` examples (the
# library's helper, which benchmarks.input_pipeline's --mock_examples uses too).
_write_metadata = sources.write_split_metadata


def _mock(root: str, num_examples: int, **kwargs):
    return tfds.testing.mock_data(num_examples=num_examples, data_dir=root,
                                  policy=tfds.testing.MockPolicy.USE_FILES, **kwargs)


def _raw(name: str, split: str, root: str) -> dict[str, np.ndarray]:
    """The mocked records as tfds returns them (mock data is identical on every read)."""
    return tfds.as_numpy(tfds.load(name, split=split, data_dir=root, batch_size=-1))


def _config(name: str, root: str, **overrides):
    config = default_data_config(name)
    config.data_dir = root
    for key, value in overrides.items():
        config[key] = value
    return config


def _denormalize(images: np.ndarray, name: str) -> np.ndarray:
    preset = get_preset(name)
    return (images.astype(np.float64) * np.array(preset.std) + np.array(preset.mean)) * 255.0


# ------------------------------------------------------------------------------ preset table
def test_every_issue_dataset_has_a_preset():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fake", "fashion_mnist",
                               "imagenet2012", "imagenette", "mnist", "oxford_iiit_pet", "shapes",
                               "voc2007", "voc2012"]


@pytest.mark.parametrize("name,mean,std", [
    # torchvision's pretrained-weights transforms (and every ImageNet-trained model of its zoo)
    ("imagenet2012", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("imagenette", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("oxford_iiit_pet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # PyTorch's examples/mnist: Normalize((0.1307,), (0.3081,))
    ("mnist", (0.1307,), (0.3081,)),
    # the per-channel statistics of the 50,000 training images, as published with the datasets'
    # usual training recipes
    ("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ("cifar100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    ("fashion_mnist", (0.2860,), (0.3530,)),
])
def test_catalogue_statistics_are_the_published_ones(name, mean, std):
    """Typed here from their sources (the presets' constants were only compared with themselves:
    IMAGENET_STD's 0.224 -> 0.242 passed every data test)."""
    preset = get_preset(name)
    assert preset.mean == mean and preset.std == std


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match=r"data: name='svhn' is invalid; expected one of "
                                         r"\['cifar10', 'cifar100', 'digits', 'fake'"):
        get_preset("svhn")


def test_preset_choices():
    cifar, imagenet = get_preset("cifar10"), get_preset("imagenet2012")
    assert (cifar.train_augmentation, cifar.crop_padding, cifar.eval_transform) == (
        "pad_crop_flip", 4, "resize")
    assert get_preset("cifar100").num_classes == 100
    assert (imagenet.train_augmentation, imagenet.eval_transform) == (
        "random_resized_crop_flip", "resize_center_crop")
    assert (imagenet.default_image_size, imagenet.crop_fraction, imagenet.num_classes) == (
        224, 0.875, 1000)
    assert get_preset("imagenette").eval_split == "validation"
    for name in ("digits", "mnist", "fashion_mnist"):
        assert get_preset(name).train_augmentation == "none"
        assert get_preset(name).image_shape[2] == 1


def test_preset_validation_errors():
    base = dict(name="x", tfds_name="x", num_classes=2, image_shape=(8, 8, 1),
                train_split="train", eval_split="test", mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match=r"DatasetPreset\('x'\): train_augmentation='mixup' is "
                                         r"invalid; expected one of \['none', 'pad_crop_flip'"):
        DatasetPreset(**base | {"train_augmentation": "mixup"})
    with pytest.raises(ValueError, match=r"eval_transform='crop' is invalid; expected one of"):
        DatasetPreset(**base | {"eval_transform": "crop"})
    with pytest.raises(ValueError, match=r"mean/std=.* is invalid; expected 3 values each"):
        DatasetPreset(**base | {"image_shape": (8, 8, 3)})
    with pytest.raises(ValueError, match=r"default_image_size=None is invalid; variable-size "
                                         r"datasets need a default image size"):
        DatasetPreset(**base | {"image_shape": (None, None, 1)})
    with pytest.raises(ValueError, match=r"default_image_size=None is invalid; variable-size "
                                         r"datasets need a default image size"):
        DatasetPreset(**base | {"image_shape": (8, None, 1)})  # a variable width alone too


def test_mean_and_std_lengths_are_checked_apart():
    """`std` of another length than the channels, beside a right `mean`, is refused (the
    test above breaks both lengths at once)."""
    base = dict(name="x", tfds_name="x", num_classes=2, image_shape=(8, 8, 1),
                train_split="train", eval_split="test", mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match=r"^DatasetPreset\('x'\): mean/std=\(\(0\.5,\), "
                                         r"\(0\.5, 0\.5\)\) is invalid; expected 1 values each"):
        DatasetPreset(**base | {"std": (0.5, 0.5)})


def test_zero_channels_are_refused_even_with_empty_statistics():
    """`image_shape=(8, 8, 0)` with `mean=std=()` passes the mean/std length check, so the
    channel count itself must be refused."""
    base = dict(name="x", tfds_name="x", num_classes=2, train_split="train", eval_split="test")
    with pytest.raises(ValueError, match=r"^DatasetPreset\('x'\): image_shape=\(8, 8, 0\) is "
                                         r"invalid; expected \(height, width, channels\)"):
        DatasetPreset(**base, image_shape=(8, 8, 0), mean=(), std=())


_NAN = float("nan")


@pytest.mark.parametrize("field, value, valid", [
    ("crop_fraction", 0.0, r"expected a number in \(0, 1\]"),
    ("crop_fraction", -0.5, r"expected a number in \(0, 1\]"),
    ("crop_fraction", _NAN, r"expected a number in \(0, 1\]"),
    ("crop_fraction", 1.5, r"expected a number in \(0, 1\]"),
    ("crop_fraction", "0.875", r"expected a number in \(0, 1\]"),
    ("crop_padding", -1, r"expected an integer >= 0"),
    ("crop_padding", 1.5, r"expected an integer >= 0"),
    ("default_image_size", 0, r"expected a positive integer"),
    ("default_image_size", "224", r"expected a positive integer"),
    ("num_classes", 0, r"expected a positive integer"),
    ("shuffle_buffer", -1, r"expected a positive integer"),
    ("std", (0.0,), r"expected 1 finite numbers > 0"),
    ("std", (-0.2,), r"expected 1 finite numbers > 0"),
    ("mean", (_NAN,), r"expected 1 finite numbers"),
    ("image_shape", (0, 8, 1), r"expected \(height, width, channels\)"),
    ("image_shape", (8, 0, 1), r"expected \(height, width, channels\)"),
    ("image_shape", (8, 8), r"expected \(height, width, channels\)"),
    ("cache", 1, r"expected True or False"),
])
def test_preset_numeric_fields_are_checked(field, value, valid):
    """Only the transform names, the mean/std lengths and a variable size's default were checked:
    crop_fraction=0 passed and failed inside the tf.data map (ZeroDivisionError), std=0 gave
    inf images, crop_padding=-1 failed in tf.pad, image_shape=(8, 8) raised IndexError."""
    base = dict(name="x", tfds_name="x", num_classes=2, image_shape=(8, 8, 1),
                train_split="train", eval_split="test", mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match=rf"^DatasetPreset\('x'\): {field}={re.escape(repr(value))}"
                                         rf" is invalid; {valid}"):
        DatasetPreset(**base | {field: value})


def test_a_numpy_bool_cache_is_taken_as_a_bool():
    """`cache=np.True_` (e.g. read from an array of settings) was refused, though `data.cache`
    and every other flag check take NumPy's bool."""
    base = dict(name="x", tfds_name="x", num_classes=2, image_shape=(8, 8, 1),
                train_split="train", eval_split="test", mean=(0.5,), std=(0.5,))
    for value in (np.True_, np.False_):
        preset = DatasetPreset(**base, cache=value)
        assert preset.cache is bool(value)
        assert preset == DatasetPreset(**base, cache=bool(value))


def test_every_preset_passes_the_field_checks():
    for name in list_datasets():
        preset = get_preset(name)
        fields = {f: getattr(preset, f) for f in preset.__dataclass_fields__}
        assert DatasetPreset(**fields) == preset


def test_digits_statistics_match_its_train_split(digits_dir):
    builder = tfds.builder("digits", data_dir=digits_dir)
    train = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1))["image"]
    pixels = train.astype(np.float64) / 255.0
    preset = get_preset("digits")
    assert abs(pixels.mean() - preset.mean[0]) < 1e-4
    assert abs(pixels.std() - preset.std[0]) < 1e-4


# --------------------------------------------------------------------------- catalogue, mocked
@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tfds_cifar10"))
    _write_metadata(root, "cifar10", {"train": 24, "test": 12})
    return root


def test_cifar10_info_and_split_slices(cifar_dir):
    with _mock(cifar_dir, 12):
        info = get_dataset_info(_config("cifar10", cifar_dir))
        assert info == pipeline.DatasetInfo("cifar10", 10, (32, 32, 3), 24, 12)
        assert get_dataset_info(_config("cifar10", cifar_dir, train_split="train[:50%]",
                                         eval_split="train[50%:]")).num_train == 12
        with pytest.raises(ValueError, match=r"data: eval_split='valid' is invalid; 'cifar10' has "
                                             r"splits \['train', 'test'\]"):
            get_dataset_info(_config("cifar10", cifar_dir, eval_split="valid"))


def test_known_output_hw_is_the_size_the_pipeline_produces(cifar_dir, digits_config):
    """What scripts check a model against before reading (or generating) any data."""
    def assert_known(config):
        known = resolve(config).known_output_hw()
        assert known == get_dataset_info(config).image_shape[:2], config

    fake = default_data_config("fake")
    fake.fake_image_shape = (12, 16, 3)  # not the preset's 32x32
    for config in (digits_config(), digits_config(image_size=20), fake):
        assert_known(config)
    with _mock(cifar_dir, 12):
        assert_known(_config("cifar10", cifar_dir))
        assert_known(_config("cifar10", cifar_dir, image_size=24))
        # Another tfds dataset under the preset: only its files know its size (28x28 here).
        other = _config("cifar10", cifar_dir, tfds_name="mnist")
        assert resolve(other).known_output_hw() is None
    assert resolve(_config("imagenette", cifar_dir)).known_output_hw() == (224, 224)


def test_cifar10_eval_is_normalized_raw_images(cifar_dir):
    with _mock(cifar_dir, 12):
        raw = _raw("cifar10", "test", cifar_dir)
        batch = next(eval_batches(_config("cifar10", cifar_dir), global_batch_size=12,
                                  num_devices=2))
    assert batch["image"].shape == (2, 6, 32, 32, 3)
    preset = get_preset("cifar10")
    expected = (raw["image"].astype(np.float64) / 255.0 - preset.mean) / preset.std
    np.testing.assert_allclose(batch["image"].reshape(12, 32, 32, 3), expected, atol=1e-5)
    np.testing.assert_array_equal(batch["label"].reshape(-1), raw["label"])
    np.testing.assert_array_equal(batch["mask"], np.ones((2, 6)))


def test_cifar10_train_augmentation_is_padded_crop_and_flip(cifar_dir):
    config = _config("cifar10", cifar_dir, shuffle_buffer=1)  # keeps the stored order
    with _mock(cifar_dir, 24):
        raw = _raw("cifar10", "train", cifar_dir)["image"].astype(np.float64)
        batch = next(train_batches(config, global_batch_size=24, num_devices=1, seed=0))
    images = _denormalize(batch["image"][0], "cifar10")
    padded = np.pad(raw, ((0, 0), (4, 4), (4, 4), (0, 0)))
    found = set()
    for i, image in enumerate(images):
        matches = [(dy, dx, flip)
                   for dy, dx, flip in itertools.product(range(9), range(9), (False, True))
                   if np.allclose(image, (lambda c: c[:, ::-1] if flip else c)(
                       padded[i, dy:dy + 32, dx:dx + 32]), atol=1e-3)]
        assert matches, f"example {i} is not a flipped/unflipped crop of its padded image"
        found.add(matches[0])
    assert len(found) > 5  # offsets and flips vary across examples
    assert {flip for _, _, flip in found} == {False, True}
    with _mock(cifar_dir, 24):
        unaugmented = next(train_batches(_config("cifar10", cifar_dir, shuffle_buffer=1,
                                                 augment=False), global_batch_size=24,
                                         num_devices=1, seed=0))
    np.testing.assert_allclose(_denormalize(unaugmented["image"][0], "cifar10"), raw, atol=1e-3)


def test_mnist_has_no_augmentation_and_resizes(tmp_path):
    root = str(tmp_path)
    _write_metadata(root, "mnist", {"train": 16, "test": 16})
    with _mock(root, 16):
        raw = _raw("mnist", "train", root)["image"].astype(np.float64)
        batch = next(train_batches(_config("mnist", root, shuffle_buffer=1), global_batch_size=16,
                                   num_devices=1, seed=0))
        np.testing.assert_allclose(_denormalize(batch["image"][0], "mnist"), raw, atol=1e-3)
        info = get_dataset_info(_config("mnist", root, image_size=32))
        big = next(train_batches(_config("mnist", root, image_size=32), global_batch_size=16,
                                 num_devices=1, seed=0))
    assert info.image_shape == (32, 32, 1) and info.num_classes == 10
    assert big["image"].shape == (1, 16, 32, 32, 1)


def _linear_images(sizes):
    """uint8 images whose channels are linear in (y, x): c0 = x + y, c1 = 2y, c2 = 255 - x."""
    images = []
    for h, w in sizes:
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        images.append(np.stack([x + y, 2 * y, 255 - x], axis=-1))
    return images


def _as_dataset_fn(images):
    """A mock `_as_dataset` that serves `images` (PNG-encoded, as tfds stores them)."""

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del self, split, read_config, shuffle_files
        encoded = [tf.io.encode_png(image.astype(np.uint8)).numpy() for image in images]
        ds = tf.data.Dataset.from_tensor_slices(
            {"image": encoded, "label": np.arange(len(images)) % 10})
        if not decoders:
            ds = ds.map(lambda ex: {"image": tf.io.decode_png(ex["image"]), "label": ex["label"]})
        return ds

    return as_dataset


def test_imagenette_eval_resizes_shorter_side_then_center_crops(tmp_path):
    root = str(tmp_path)
    sizes = [(100, 150), (150, 100), (80, 80)]
    _write_metadata(root, "imagenette/320px-v2", {"train": 3, "validation": 3})
    with _mock(root, 3, as_dataset_fn=_as_dataset_fn(_linear_images(sizes))):
        info = get_dataset_info(_config("imagenette", root, image_size=64))
        batch = next(eval_batches(_config("imagenette", root, image_size=64),
                                  global_batch_size=3, num_devices=1))
    assert info.image_shape == (64, 64, 3) and info.num_eval == 3
    images = _denormalize(batch["image"][0], "imagenette")
    resize_to = round(64 / 0.875)  # 73
    for image, (h, w) in zip(images, sizes, strict=True):
        # torchvision's Resize(73) (the longer side truncated) and CenterCrop(64) (offsets
        # rounded, ties to even): tests/data/test_eval_crop.py checks these against torchvision.
        new_h, new_w = (int(h * resize_to / min(h, w)), int(w * resize_to / min(h, w)))
        top, left = round((new_h - 64) / 2), round((new_w - 64) / 2)
        i, j = np.mgrid[0:64, 0:64].astype(np.float64)
        y = (i + top + 0.5) * h / new_h - 0.5  # source coordinates (half-pixel centers)
        x = (j + left + 0.5) * w / new_w - 0.5
        expected = np.stack([x + y, 2 * y, 255 - x], axis=-1)
        # The antialiasing (triangle) filter averages discrete taps, so it reproduces a linear
        # ramp to ~0.1 grey level; a crop or resize off by half a pixel would be off by >= 0.7.
        np.testing.assert_allclose(image, expected, atol=0.15)


def test_oxford_pet_classifies_37_breeds_with_imagenet_crops(tmp_path):
    root = str(tmp_path)
    _write_metadata(root, "oxford_iiit_pet", {"train": 4, "test": 3})
    images = _linear_images([(100, 150), (150, 100), (80, 80)])
    with _mock(root, 3, as_dataset_fn=_as_dataset_fn(images)):
        info = get_dataset_info(_config("oxford_iiit_pet", root))
        batch = next(eval_batches(_config("oxford_iiit_pet", root), global_batch_size=3,
                                  num_devices=1))
    assert (info.num_classes, info.image_shape, info.num_train) == (37, (224, 224, 3), 4)
    assert batch["image"].shape == (1, 3, 224, 224, 3) and batch["label"].tolist() == [[0, 1, 2]]


def test_variable_size_images_need_an_image_size(tmp_path):
    root = str(tmp_path)
    _write_metadata(root, "imagenette/320px-v2", {"train": 3, "validation": 3})
    config = _config("cifar10", root, tfds_name="imagenette/320px-v2", eval_split="validation")
    with _mock(root, 3), pytest.raises(
            ValueError, match=r"data: image_size=None is invalid; 'imagenette/320px-v2' has "
                              r"images of varying size; set data.image_size"):
        get_dataset_info(config)


def test_imagenette_train_random_resized_crop(tmp_path):
    root = str(tmp_path)
    _write_metadata(root, "imagenette/320px-v2", {"train": 8, "validation": 8})
    images = _linear_images([(120, 160)] * 8)
    config = _config("imagenette", root, image_size=48, shuffle_buffer=1)
    with _mock(root, 8, as_dataset_fn=_as_dataset_fn(images)):
        batch = next(train_batches(config, global_batch_size=8, num_devices=1, seed=0))
    out = _denormalize(batch["image"][0], "imagenette")
    assert out.shape == (8, 48, 48, 3)
    # A crop of a linear image, resized, stays (nearly: the antialiasing filter's discrete taps
    # bend it by < 0.6 grey levels) linear on interior pixels; its slopes measure the crop's
    # height and width in source pixels per output pixel, and a flip negates the x slope.
    i, j = np.mgrid[2:46, 2:46].astype(np.float64)
    design = np.stack([i.ravel(), j.ravel(), np.ones(i.size)], axis=1)
    y_slopes, x_slopes = [], []
    for image in out[:, 2:46, 2:46]:
        coef_y, *_ = np.linalg.lstsq(design, image[..., 1].ravel() / 2, rcond=None)  # c1 = 2y
        coef_x, *_ = np.linalg.lstsq(design, 255 - image[..., 2].ravel(), rcond=None)  # 255 - x
        for coef, channel in ((coef_y, image[..., 1] / 2), (coef_x, 255 - image[..., 2])):
            assert np.abs(design @ coef - channel.ravel()).max() < 0.6
        assert abs(coef_y[1]) < 1e-2 and abs(coef_x[0]) < 1e-2  # no rotation or shear
        y_slopes.append(coef_y[0])
        x_slopes.append(coef_x[1])
    y_slopes, x_slopes = np.array(y_slopes), np.array(x_slopes)
    assert len(np.unique(np.round(np.abs(x_slopes), 2))) > 4  # distinct crops
    assert np.all(np.abs(x_slopes) <= 160 / 48 + 1e-2) and np.all(y_slopes <= 120 / 48 + 1e-2)
    area = np.abs(x_slopes) * 48 * y_slopes * 48 / (120 * 160)
    assert np.all(area > 0.08 - 0.02) and np.all(area <= 1.0 + 1e-3)
    # Small crops do happen (areas are drawn from 8%-100%): half of these eight are below 30%,
    # which a narrowed range such as 50%-100% could not give.
    assert np.sum(area < 0.3) >= 4
    ratio = np.abs(x_slopes) / y_slopes
    assert np.all(ratio > 3 / 4 - 0.05) and np.all(ratio < 4 / 3 + 0.05)
    assert (x_slopes < 0).any() and (x_slopes > 0).any()  # some crops were flipped


# The oxford_iiit_pet case runs with the slow tests: its preset has imagenette's augmentation
# and image spec (random_resized_crop_flip on (None, None, 3) images), so the imagenette case
# covers the same crop-then-RandAugment path; test_oxford_pet_classifies_37_breeds_with_
# imagenet_crops still reads oxford_iiit_pet through the eval pipeline.
@pytest.mark.parametrize("name,tfds_name,eval_split", [
    ("imagenette", "imagenette/320px-v2", "validation"),
    pytest.param("oxford_iiit_pet", "oxford_iiit_pet", "test", marks=pytest.mark.slow),
])
def test_randaugment_after_random_resized_crop(tmp_path, name, tfds_name, eval_split):
    """The crop's runtime-sized slice keeps the static channel count RandAugment needs."""
    root = str(tmp_path)
    _write_metadata(root, tfds_name, {"train": 8, eval_split: 8})
    images = _linear_images([(120, 160)] * 8)
    batches = {}
    for layers in (0, 2):
        config = _config(name, root, image_size=48, shuffle_buffer=1, randaugment_layers=layers)
        with _mock(root, 8, as_dataset_fn=_as_dataset_fn(images)):
            batches[layers] = next(train_batches(config, global_batch_size=8, num_devices=1,
                                                 seed=0))
    plain, augmented = batches[0]["image"], batches[2]["image"]
    assert augmented.shape == plain.shape == (1, 8, 48, 48, 3)
    np.testing.assert_array_equal(batches[0]["label"], batches[2]["label"])
    # RandAugment works on uint8: its output is on the 0..255 level grid (to float32 rounding).
    levels = _denormalize(augmented[0], name)
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-3)
    assert (plain != augmented).reshape(8, -1).any(-1).mean() > 0.5


@pytest.mark.parametrize("name,tfds_name,channels,preset_channels", [
    ("cifar10", "mnist", 1, 3),
    ("mnist", "cifar10", 3, 1),
])
def test_images_with_other_channels_than_the_preset_are_refused(tmp_path, name, tfds_name,
                                                                 channels, preset_channels):
    """No silent 0.5/0.5 normalization for a tfds_name whose images do not fit the preset's
    mean/std: the error names both channel counts and the fix."""
    root = str(tmp_path)
    _write_metadata(root, tfds_name, {"train": 4, "test": 4})
    preset = get_preset(name)
    matching = [n for n in list_datasets()
                if n != "fake" and len(get_preset(n).mean) == channels]
    message = (f"data: tfds_name={tfds_name!r} is invalid; tfds {tfds_name!r} has "
               f"{channels}-channel images but preset {name!r} has {preset_channels}-channel "
               f"statistics (mean {preset.mean}, std {preset.std}); pick a data.name whose "
               f"preset has {channels}-channel statistics ({matching}), or a tfds_name with "
               f"{preset_channels}-channel images"
               + (" (or data.grey_to_rgb=True to feed the grey images as RGB)" if channels == 1
                  else "") + ".")
    config = _config(name, root, tfds_name=tfds_name, image_size=32)
    with _mock(root, 4):
        for call in (lambda: get_dataset_info(config),
                     lambda: train_batches(config, global_batch_size=4, num_devices=1, seed=0)):
            with pytest.raises(ValueError, match=re.escape(message)):
                call()


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_fake_images_of_any_channel_count_are_centred_on_0(channels):
    """`fake` keeps its fallback: pixels p in [0, 1] become (p - 0.5) / 0.5, whatever C is."""
    config = default_data_config("fake")
    config.fake_image_shape, config.fake_num_eval = (4, 5, channels), 6
    batch = next(eval_batches(config, global_batch_size=6, num_devices=1))
    spec = resolve(config)
    raw = next(sources.open_source(spec).read(spec.eval_split, (0, 1)).batch(6)
               .as_numpy_iterator())["image"]
    assert batch["image"].shape == (1, *raw.shape) == (1, 6, 4, 5, channels)
    np.testing.assert_allclose(batch["image"][0], (raw / 255.0 - 0.5) / 0.5, atol=1e-6)


# ---------------------------------------------------------------------------- missing datasets
def test_missing_catalogue_dataset_says_how_to_prepare_it(tmp_path):
    root = str(tmp_path / "empty")
    expected_dir = os.path.join(root, "cifar10", "3.0.2")
    with pytest.raises(DatasetNotPreparedError) as error:
        get_dataset_info(_config("cifar10", root))
    message = str(error.value)
    assert f"data: dataset 'cifar10' (tfds 'cifar10') is not prepared in the tfds data_dir " \
           f"{root!r}; its files would be in {expected_dir!r}" in message
    assert "cnnjax never downloads data" in message
    assert "`tfds build cifar10 --data_dir=<dir>`" in message
    assert not os.path.exists(expected_dir)  # nothing was downloaded or generated


@pytest.mark.parametrize("name,tfds_name,folder", [("mnist", "mnist:3.0.1", "mnist"),
                                                    ("cifar10", "cifar10:3.*.*", "cifar10")])
def test_a_versioned_dataset_says_which_folder_to_copy(tmp_path, name, tfds_name, folder):
    """tfds writes `mnist:3.0.1` under <dir>/mnist; the hint said to copy <dir>/mnist:3.0.1,
    a folder `tfds build` never makes."""
    root = str(tmp_path / "empty")
    with pytest.raises(DatasetNotPreparedError) as error:
        get_dataset_info(_config(name, root, tfds_name=tfds_name))
    message = str(error.value)
    version = tfds.builder_cls(folder).VERSION
    assert f"its files would be in {os.path.join(root, folder, str(version))!r}" in message
    assert f"then copy <dir>/{folder} into {root!r}" in message


@pytest.mark.parametrize("name,tfds_name", [("digits", "mnist"), ("shapes", "cifar10"),
                                             ("shapes", "voc/2007")])
def test_an_offline_preset_never_downloads_the_catalogue_dataset_it_names(
        tmp_path, monkeypatch, name, tfds_name):
    """Whether a dataset is generated offline follows the dataset read, not the preset."""
    def download(self, *args, **kwargs):
        raise AssertionError(f"downloaded {self.name}")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download)
    config = _config(name, str(tmp_path), tfds_name=tfds_name)
    with pytest.raises(DatasetNotPreparedError, match=rf"\(tfds {tfds_name!r}\) is not prepared"):
        sources.open_source(resolve(config))


def test_an_offline_builder_named_beside_another_preset_is_generated(tmp_path):
    """`tfds_name='digits'` is generated on first use whatever the preset (here cifar10's):
    there is nothing to download."""
    config = _config("cifar10", str(tmp_path), tfds_name="digits")
    source = sources.open_source(resolve(config))
    assert source.builder.is_prepared() and source.num_classes == 10


def test_fake_refuses_a_tfds_name():
    config = default_data_config("fake")
    config.tfds_name = "cifar10"
    with pytest.raises(ValueError, match=r"^data: tfds_name='cifar10' is invalid; expected None "
                                         r"for name='fake'"):
        resolve(config)


def test_missing_imagenet_mentions_manual_download(tmp_path):
    """The archives go under the data dir the user builds in (`tfds build --data_dir=<dir>`
    reads `<dir>/downloads/manual`), which the message also suggests may be another machine's:
    it named only this data dir's folder."""
    root = str(tmp_path)
    manual = os.path.join(root, "downloads", "manual")
    with pytest.raises(DatasetNotPreparedError) as err:
        train_batches(_config("imagenet2012", root), global_batch_size=8, num_devices=1, seed=0)
    message = str(err.value)
    assert "`tfds build imagenet2012 --data_dir=<dir>`" in message
    assert (f"needs a manual download first: put its archives in <dir>/downloads/manual before "
            f"building ({manual!r} to build in {root!r} itself; see the tfds catalogue)"
            in message)


@pytest.mark.parametrize("name, boxes", [("oxford_iiit_pet", ["head_bbox"]),
                                         ("voc2007", ["objects/bbox"])])
def test_mocking_a_dataset_with_box_features_is_refused_by_name(tmp_path, name, boxes):
    """tfds.testing.mock_data draws each box coordinate on its own (min > max), which tfds
    refuses when it reads the example: `--dataset=oxford_iiit_pet --mock_examples=8` ended in a
    TensorFlow traceback from the first batch. `mock_tfds_dataset` refuses such a set by name,
    before writing or mocking anything; a set without boxes still mocks (cifar10 above)."""
    config = default_data_config(name)
    config.data_dir = str(tmp_path)
    mock = sources.mock_tfds_dataset(resolve(config), 4)
    with pytest.raises(ValueError, match=re.escape(
            f"data: name={name!r} is invalid; tfds.testing.mock_data cannot mock its box "
            f"features {boxes}")):
        mock.__enter__()
    assert os.listdir(tmp_path) == []

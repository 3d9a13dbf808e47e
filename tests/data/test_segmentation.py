"""`shapes_segmentation` through the segmentation input pipeline: class maps aligned with their
images, nearest-neighbour resizing, joint flips, exact resume, eval padding, bad datasets; and
Oxford-IIIT Pet's trimaps (mocked) with their ignored outline. Building shapes_segmentation
(2,500 scenes) takes a few seconds, so the tests that read it are `slow`."""

from __future__ import annotations

import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cnnjax.data import pipeline, presets, segmentation
from cnnjax.data.spec import resolve_for_task, split_segmentation_fields
from cnnjax.data.transforms import Transforms
from tests.data.layouts import LAYOUTS, assert_refused_before_opening


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds_shapes_segmentation"))
    segmentation.get_dataset_info(_config(root))  # generated on first use
    return root


def _config(root, **overrides):
    config = segmentation.default_data_config("shapes")
    config.tfds_name, config.data_dir = "shapes_segmentation", root
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize("layout,message", LAYOUTS)
def test_bad_layouts_are_refused_on_the_call_before_the_dataset_is_opened(
        tmp_path, monkeypatch, layout, message):
    assert_refused_before_opening(segmentation, _config(str(tmp_path / "never_built")), monkeypatch,
                                  layout, message)


@pytest.mark.slow
def test_eval_batches_are_the_stored_class_maps(data_dir):
    info = segmentation.get_dataset_info(_config(data_dir))
    assert (info.name, info.num_classes, info.image_shape, info.num_train, info.num_eval) == (
        "shapes_segmentation", 5, (64, 64, 3), 2000, 500)
    stored = list(tfds.as_numpy(tfds.builder("shapes_segmentation", data_dir=data_dir)
                                .as_dataset(split="test")))
    batches = list(segmentation.eval_batches(_config(data_dir), global_batch_size=64,
                                             num_devices=2))
    labels = np.concatenate([b["labels"].reshape(-1, 64, 64) for b in batches])
    mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
    assert labels.dtype == np.int32 and mask.sum() == 500 and not mask[500:].any()
    np.testing.assert_array_equal(labels[:500], np.stack([e["segmentation_mask"][..., 0]
                                                          for e in stored]))
    small = next(segmentation.eval_batches(_config(data_dir, image_size=32), global_batch_size=8,
                                           num_devices=1))
    # Nearest neighbour with half-pixel centres: output pixel i samples input 2i + 1.
    np.testing.assert_array_equal(small["labels"][0], labels[:8, 1::2, 1::2])


@pytest.mark.slow
def test_flip_moves_image_and_class_map_together_and_resume_replays(data_dir):
    kwargs = {"global_batch_size": 16, "num_devices": 1, "seed": 3}
    plain = next(segmentation.train_batches(_config(data_dir, augment=False), **kwargs))
    stream = segmentation.train_batches(_config(data_dir, augment=True), **kwargs)
    flipped = [next(stream) for _ in range(3)]
    mirrored = 0
    for i in range(16):
        if np.array_equal(plain["image"][0, i], flipped[0]["image"][0, i]):
            np.testing.assert_array_equal(plain["labels"][0, i], flipped[0]["labels"][0, i])
            continue
        mirrored += 1
        np.testing.assert_array_equal(plain["image"][0, i, :, ::-1], flipped[0]["image"][0, i])
        np.testing.assert_array_equal(plain["labels"][0, i, :, ::-1], flipped[0]["labels"][0, i])
    assert 0 < mirrored < 16
    resumed = next(segmentation.train_batches(_config(data_dir, augment=True), start_step=2,
                                              **kwargs))
    for key in ("image", "labels"):
        np.testing.assert_array_equal(flipped[2][key], resumed[key])


# The shapes preset's classification crop pads 4 pixels per side, and an image_size of at most 4
# is refused there (tests/data/test_pipeline.py); segmentation never crops (whole image resized,
# then flipped), and used to be refused all the same.
_CROP_REFUSAL = ("data: image_size=4 is invalid; expected more than 4 pixels for 'shapes': its "
                 "training crop pads 4 pixels per side")


def test_an_image_size_within_the_presets_crop_padding_is_not_refused(tmp_path,
                                                                      whole_image_source_stub):
    config = _config(str(tmp_path / "never_built"), image_size=4, augment=True)
    assert resolve_for_task(config, "segmentation").size == (4, 4)  # check_config's resolution
    with pytest.raises(whole_image_source_stub):
        segmentation.get_dataset_info(config)
    classification = pipeline.default_data_config("shapes")
    classification.image_size = 4
    with pytest.raises(ValueError) as err:
        resolve_for_task(classification, "classification")
    assert str(err.value).startswith(_CROP_REFUSAL)


@pytest.mark.slow
def test_tiny_training_images_are_the_whole_image_resized_and_maybe_mirrored(data_dir):
    """At image_size=4 (within the preset's crop padding) each training example is the eval
    view of its scene or that view mirrored, class map with it: no crop, no padding."""
    kwargs = {"global_batch_size": 16, "num_devices": 1, "seed": 3}
    plain = next(segmentation.train_batches(_config(data_dir, image_size=4, augment=False),
                                            **kwargs))
    augmented = next(segmentation.train_batches(_config(data_dir, image_size=4, augment=True),
                                                **kwargs))
    assert augmented["image"].shape == (1, 16, 4, 4, 3)
    for i in range(16):
        image, labels = plain["image"][0, i], plain["labels"][0, i]
        if not np.array_equal(image, augmented["image"][0, i]):
            image, labels = image[:, ::-1], labels[:, ::-1]
        np.testing.assert_array_equal(image, augmented["image"][0, i])
        np.testing.assert_array_equal(labels, augmented["labels"][0, i])


def test_class_map_flips_along_the_images_width_axis():
    """Fast (no dataset): the training path's `flipped_whole_image` + `_class_map` on an
    asymmetric 5 x 7 example, exactly against np.fliplr of the image and of the class map (also
    after `_class_map`'s nearest 2x resize, whose half-pixel reference is np.repeat)."""
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, (5, 7), dtype=np.uint8)
    assert not np.array_equal(np.fliplr(labels), np.flipud(labels))
    # uint8 pixels to float32 pixels / 255, unresized (native size = output size), mean 0, std 1
    transforms = Transforms((5, 7, 3), (5, 7), (0.0,) * 3, (1.0,) * 3, "none", "resize", 0, 1.0)
    spec = types.SimpleNamespace(augment=True)
    seen = set()
    for k in range(64):
        out, flip = pipeline.flipped_whole_image(spec, transforms, tf.constant(image),
                                                 tf.constant([k, 3], tf.int64))
        flip = bool(flip)
        stored = tf.constant(labels[..., None])
        same = segmentation._class_map(stored, (5, 7), tf.constant(flip)).numpy()
        double = segmentation._class_map(stored, (10, 14), tf.constant(flip)).numpy()
        mirror = np.fliplr if flip else (lambda a: a)
        np.testing.assert_array_equal(out.numpy(), mirror(image.astype(np.float32) / 255))
        np.testing.assert_array_equal(same, mirror(labels))
        np.testing.assert_array_equal(double, mirror(labels.repeat(2, 0).repeat(2, 1)))
        seen.add(flip)
        if len(seen) == 2:
            break
    assert seen == {False, True}  # both branches checked (no flip in 64 draws: chance 2**-63)


def test_a_dataset_without_class_maps_is_refused(digits_dir):
    config = segmentation.default_data_config("digits")
    config.data_dir = digits_dir
    with pytest.raises(ValueError, match=r"data: tfds_name='digits' is invalid; expected a "
                                         r"dataset with a `segmentation_mask` feature"):
        segmentation.get_dataset_info(config)


# ------------------------------------------------------ catalogue segmentation set, mocked
@pytest.fixture(scope="module")
def pets_dir(tmp_path_factory):
    from tests.data.test_presets import _write_metadata

    root = str(tmp_path_factory.mktemp("tfds_pets"))
    _write_metadata(root, "oxford_iiit_pet", {"train": 8, "test": 5})
    return root


def _pet_examples(split):
    """Deterministic Oxford-IIIT Pet-like records of `split` (varying sizes; trimaps of 1 pet,
    2 background, 3 outline)."""
    rng = np.random.default_rng(0 if "test" in split else 1)
    for _ in range(5 if "test" in split else 8):
        h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
        yield {"image": rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
               "segmentation_mask": rng.integers(1, 4, (h, w, 1)).astype(np.uint8),
               "label": int(rng.integers(0, 37))}


def _pets_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """A mock `_as_dataset` serving `_pet_examples` (images PNG-encoded when `decoders` skips
    decoding)."""
    del self, read_config, shuffle_files
    examples = list(_pet_examples(str(split)))
    encoded = bool(decoders)

    def generate():
        for ex in examples:
            yield {**ex, "image": tf.io.encode_png(ex["image"]).numpy() if encoded
                   else ex["image"]}

    return tf.data.Dataset.from_generator(generate, output_signature={
        "image": (tf.TensorSpec((), tf.string) if encoded
                  else tf.TensorSpec((None, None, 3), tf.uint8)),
        "segmentation_mask": tf.TensorSpec((None, None, 1), tf.uint8),
        "label": tf.TensorSpec((), tf.int64)})


def test_oxford_pet_trimaps_become_background_pet_and_ignored_outline(pets_dir):
    """The catalogue path: 2 classes (background, pet), the outline band `IGNORE_LABEL`,
    whole images resized (the preset's classification centre crop is not used)."""
    config = segmentation.default_data_config("oxford_iiit_pet")
    config.data_dir, config.image_size = pets_dir, 40
    with tfds.testing.mock_data(data_dir=pets_dir, as_dataset_fn=_pets_as_dataset,
                                policy=tfds.testing.MockPolicy.USE_FILES):
        info = segmentation.get_dataset_info(config)
        batch = next(segmentation.eval_batches(config, global_batch_size=6, num_devices=1))
    assert (info.num_classes, info.image_shape, info.num_train, info.num_eval) == (
        2, (40, 40, 3), 8, 5)
    assert segmentation.CATALOGUE_LABELS["oxford_iiit_pet"].classes == ("background", "pet")
    for i, ex in enumerate(_pet_examples("test")):
        trimap = tf.image.resize(ex["segmentation_mask"], (40, 40), method="nearest")
        expected = np.select([trimap[..., 0] == 1, trimap[..., 0] == 2], [1, 0],
                             segmentation.IGNORE_LABEL)
        np.testing.assert_array_equal(batch["labels"][0, i], expected)
        image = tf.image.resize(ex["image"].astype(np.float32) / 255.0, (40, 40),
                                antialias=True).numpy()
        preset = presets.get_preset("oxford_iiit_pet")
        np.testing.assert_allclose(batch["image"][0, i] * preset.std + preset.mean, image,
                                   atol=1e-5)
    assert batch["mask"].tolist() == [[1, 1, 1, 1, 1, 0]]


def test_class_map_labels_lookup():
    labels = segmentation.ClassMapLabels(classes=("a", "b"), names=("b", None, "a"))
    table = labels.lookup()
    assert table.shape == (256,) and table[:3].tolist() == [1, 255, 0]
    assert (table[3:] == segmentation.IGNORE_LABEL).all()


def test_class_map_labels_at_their_limits_are_accepted():
    """255 classes (the largest is 254, one below IGNORE_LABEL) and 256 stored values (every
    uint8) are the limits themselves, not past them: both are accepted and looked up."""
    classes = tuple(f"c{i}" for i in range(255))
    table = segmentation.ClassMapLabels(classes=classes, names=classes).lookup()
    assert table[:255].tolist() == list(range(255))
    assert table[255] == segmentation.IGNORE_LABEL  # a value past `names`
    table = segmentation.ClassMapLabels(classes=("bg", "fg"),
                                        names=("bg",) + ("fg",) * 255).lookup()
    assert table[0] == 0 and (table[1:] == 1).all() and table[255] == 1


def test_metadata_classes_without_a_segmentation_mask_feature_are_refused():
    """`segmentation_classes` in the metadata is not enough: without a `segmentation_mask`
    feature, `read` would fail later with a KeyError; the source refuses it by name."""
    source = types.SimpleNamespace(builder=types.SimpleNamespace(
        name="x", info=types.SimpleNamespace(metadata={"segmentation_classes": ["bg", "a"]})))
    spec = types.SimpleNamespace(tfds_name="x")
    with pytest.raises(ValueError, match=r"^data: tfds_name='x' is invalid; expected a dataset "
                                         r"with a `segmentation_mask` feature"):
        segmentation._SegmentationSource._num_classes(source, spec, {"image": None})
    assert segmentation._SegmentationSource._num_classes(
        source, spec, {"image": None, "segmentation_mask": None}) == 2
    assert source.labels == segmentation.ClassMapLabels(("bg", "a"), ("bg", "a"))


@pytest.mark.parametrize("classes, names, detail", [
    # 256 classes: class 255 would be IGNORE_LABEL, scored by the steps (label < C) as a class
    (tuple(f"c{i}" for i in range(256)), tuple(f"c{i}" for i in range(256)), "classes"),
    # 257 stored values: the uint8 table has 256 (an IndexError)
    (("a",), ("a",) * 257, "names"),
    # a stored value named after no class (a bare tuple.index ValueError)
    (("a", "b"), ("a", "c"), "names"),
])
def test_class_map_labels_that_collide_with_the_ignore_label_are_refused(classes, names, detail):
    with pytest.raises(ValueError, match=rf"ClassMapLabels: {detail}=.* is invalid; expected"):
        segmentation.ClassMapLabels(classes=classes, names=names)


def test_class_map_labels_with_a_repeated_class_are_refused():
    """classes=("cat", "cat") made 2 classes, but `lookup` maps every "cat" to class 0: class 1
    was counted (and scored) yet no stored value could reach it. Repeated names are fine."""
    with pytest.raises(ValueError, match=r"^ClassMapLabels: classes=\('bg', 'cat', 'cat'\) is "
                                         r"invalid; expected each class name at most once; "
                                         r"repeated: \['cat'\]"):
        segmentation.ClassMapLabels(classes=("bg", "cat", "cat"), names=("bg", "cat"))
    labels = segmentation.ClassMapLabels(classes=("bg", "cat"), names=("cat", "bg", "cat"))
    assert labels.lookup()[:3].tolist() == [1, 0, 1]


def _scaled(root, scale_range, **overrides):
    return _config(root, augment=True, scale_range=scale_range, shuffle_buffer=1, **overrides)


@pytest.mark.slow
def test_random_scale_crop_moves_image_and_class_map_together(data_dir):
    """scale 0.5: the whole scene shrunk into the top-left quarter, the rest padding (image 0,
    the mean colour; labels IGNORE_LABEL); scale 2: one crop of the doubled scene, at the same
    offset for image (bilinear) and class map (nearest); both replay on resume."""
    kwargs = {"global_batch_size": 8, "num_devices": 1, "seed": 5}
    plain = next(segmentation.train_batches(_config(data_dir, augment=True, shuffle_buffer=1),
                                            **kwargs))
    half = next(segmentation.train_batches(_scaled(data_dir, (0.5, 0.5)), **kwargs))
    for i in range(8):
        labels, image = half["labels"][0, i], half["image"][0, i]
        np.testing.assert_array_equal(
            labels[:32, :32],
            tf.image.resize(plain["labels"][0, i][..., None], (32, 32), "nearest")[..., 0])
        np.testing.assert_allclose(image[:32, :32],
                                   tf.image.resize(plain["image"][0, i], (32, 32)), atol=1e-5)
        assert (labels[32:] == segmentation.IGNORE_LABEL).all() and not image[32:].any()
        assert (labels[:, 32:] == segmentation.IGNORE_LABEL).all() and not image[:, 32:].any()
    stream = segmentation.train_batches(_scaled(data_dir, (2.0, 2.0)), **kwargs)
    double = [next(stream) for _ in range(2)]
    offsets = set()
    for i in range(8):
        big_labels = tf.image.resize(plain["labels"][0, i][..., None], (128, 128),
                                     "nearest")[..., 0].numpy()
        big_image = tf.image.resize(plain["image"][0, i], (128, 128)).numpy()
        labels, image = double[0]["labels"][0, i], double[0]["image"][0, i]
        matches = [(y, x) for y in range(65) for x in range(65)
                   if np.allclose(big_image[y:y + 64, x:x + 64], image, atol=1e-5)]
        assert len(matches) == 1, matches
        y, x = matches[0]
        np.testing.assert_array_equal(big_labels[y:y + 64, x:x + 64], labels)
        offsets.add((y, x))
    assert len(offsets) > 1  # drawn per example
    resumed = next(segmentation.train_batches(_scaled(data_dir, (2.0, 2.0)), start_step=1,
                                              **kwargs))
    for key in ("image", "labels"):
        np.testing.assert_array_equal(double[1][key], resumed[key])


def _scale_crops(scale_range, keys, size=64):
    """`_random_scale_crop` of an all-3 `size` x `size` example (image and labels) per key."""
    image, labels = tf.fill((size, size, 3), 3.0), tf.fill((size, size), 3)
    return [tuple(t.numpy() for t in segmentation._random_scale_crop(
        image, labels, scale_range, tf.constant([k, 7], tf.int64))) for k in keys]


def test_random_scale_crop_draws_scales_across_the_whole_range():
    """Fast (no dataset): with scale_range (0.5, 2.0) a scale s < 1 leaves the scene as the
    top-left round(64 s) square, the rest IGNORE_LABEL; s >= 1 fills the crop. Over 16 keys
    the square sides must vary within [32, 64] and some crops must be full (P(s >= 1) = 2/3
    per key), which a draw stuck at the low end (always 32) would not give."""
    sides = []
    for _, labels in _scale_crops((0.5, 2.0), range(16)):
        kept = labels != segmentation.IGNORE_LABEL
        side = int(kept[:, 0].sum())
        expected = np.zeros((64, 64), bool)
        expected[:side, :side] = True
        np.testing.assert_array_equal(kept, expected)  # a top-left square
        assert (labels[kept] == 3).all() and 32 <= side <= 64
        sides.append(side)
    assert 64 in sides and len(set(sides)) > 2, sides


def test_random_scale_crop_keeps_at_least_one_pixel():
    """A valid (0 < low) but tiny scale_range: 64 * 0.005 rounds to 0 pixels, floored to 1, so
    the crop is the scene as one pixel at [0, 0] and padding elsewhere (not an error)."""
    [(image, labels)] = _scale_crops((0.005, 0.005), [0])
    assert image.shape == (64, 64, 3) and labels.shape == (64, 64)
    kept = np.argwhere(labels != segmentation.IGNORE_LABEL)
    assert kept.tolist() == [[0, 0]] and labels[0, 0] == 3
    np.testing.assert_allclose(image[0, 0], [3.0] * 3, atol=1e-6)
    image[0, 0] = 0
    assert not image.any()  # padded with 0, the normalized mean colour


@pytest.mark.parametrize("field, value, message", [
    ("scale_range", (2.0, 0.5), "data: scale_range=(2.0, 0.5) is invalid; expected None or "
                                "(low, high) with 0 < low <= high, e.g. (0.5, 2.0)."),
    ("scale_range", (0.0, 1.0), "data: scale_range=(0.0, 1.0) is invalid"),
    ("classes", (1, 2), "data: classes=(1, 2) is invalid; expected None: class subsets are not "
                        "supported for segmentation."),
])
def test_bad_segmentation_fields(digits_dir, field, value, message):
    config = segmentation.default_data_config("digits")
    config.data_dir, config[field] = digits_dir, value
    with pytest.raises(ValueError) as err:
        segmentation.get_dataset_info(config)
    assert message in str(err.value)


def test_scale_range_without_augment_is_refused_before_the_dataset_is_opened(tmp_path,
                                                                              monkeypatch):
    """The random scale and crop is a training augmentation: with augment=False it used to be
    dropped silently; now every entry point refuses it, as RandAugment with augment=False."""
    def must_not_open(*args, **kwargs):
        raise AssertionError("the dataset was opened before the config was checked")

    monkeypatch.setattr(pipeline, "open_whole_image_source", must_not_open)
    root = str(tmp_path / "never_built")
    config = _config(root, augment=False, scale_range=(0.5, 2.0))
    message = ("data: scale_range=(0.5, 2.0) is invalid; expected None when augment=False (the "
               "random scale and crop is a training augmentation: set augment=True, or "
               "scale_range=None).")
    for call in (lambda: segmentation.get_dataset_info(config),
                 lambda: segmentation.train_batches(config, global_batch_size=4, num_devices=1,
                                                    seed=0),
                 lambda: segmentation.eval_batches(config, global_batch_size=4, num_devices=1),
                 lambda: segmentation.eval_split_name(config)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message
    spec, scale_range = split_segmentation_fields(_config(root, augment=True, scale_range=(0.5, 2)))
    assert spec.augment and scale_range == (0.5, 2.0)
    spec, scale_range = split_segmentation_fields(_config(root, augment=False))  # unset: fine
    assert not spec.augment and scale_range is None
    assert segmentation.eval_split_name(_config(root)) == "test"
    assert not (tmp_path / "never_built").exists()



def test_check_train_epoch_counts_each_process_shard(pets_dir):
    """`check_config`'s multi-process check: 'train[:7]+test[:1]' (8 examples) shards over 2
    processes as 4+1 and 3+0 examples, so a global batch of 8 (the whole split) is refused by
    name and 6 fits (one step)."""
    config = segmentation.default_data_config("oxford_iiit_pet")
    config.data_dir, config.image_size, config.train_split = pets_dir, 40, "train[:7]+test[:1]"
    with pytest.raises(ValueError, match=r"data: global_batch_size=8 is invalid; expected at "
                       r"most 6 \(2 processes \* 3\): split 'train\[:7\]\+test\[:1\]' of "
                       r"'oxford_iiit_pet' shards over 2 processes as \[5, 3\] examples"):
        segmentation.check_train_epoch(config, global_batch_size=8, process_count=2)
    assert segmentation.check_train_epoch(config, global_batch_size=6, process_count=2) == 1

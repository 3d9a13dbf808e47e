"""`shapes_multi` and the detection input pipeline: boxes in pixels, padding, flips that move
image and boxes together, exact resume, eval padding, bad configs.

Building `shapes_multi` (4,500 scenes) takes 10-30 s on 2 cores, so the tests that read it are
`slow`; the config checks run in the default suite."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cnnjax.data import detection, pipeline
from cnnjax.data import spec as spec_lib
from cnnjax.data.builders import shapes as shapes_lib
from cnnjax.data.transforms import Transforms
from tests.data.layouts import LAYOUTS, assert_refused_before_opening


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds_shapes_multi"))
    detection.get_dataset_info(_config(root))  # generated on first use (~10 s)
    return root


def _config(root, **overrides):
    config = detection.default_data_config("shapes")
    config.tfds_name = "shapes_multi"
    config.data_dir = root
    config.max_boxes = 4
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize("layout,message", LAYOUTS)
def test_bad_layouts_are_refused_on_the_call_before_the_dataset_is_opened(
        tmp_path, monkeypatch, layout, message):
    assert_refused_before_opening(detection, _config(str(tmp_path / "never_built")), monkeypatch,
                                  layout, message)


@pytest.fixture(scope="module")
def stored_test(data_dir):
    builder = tfds.builder("shapes_multi", data_dir=data_dir)
    return list(tfds.as_numpy(builder.as_dataset(split="test")))


@pytest.mark.slow
def test_shapes_multi_scenes(data_dir, stored_test):
    info = detection.get_dataset_info(_config(data_dir))
    assert (info.name, info.num_classes, info.image_shape, info.num_train, info.num_eval) == (
        "shapes_multi", 4, (64, 64, 3), 4000, 500)
    counts = np.bincount([len(e["objects"]["label"]) for e in stored_test], minlength=5)
    assert counts[0] == 0 and counts[1:].min() > 80  # 1-4 shapes, each count common
    for example in stored_test:
        boxes = example["objects"]["bbox"]
        for a, b in itertools.combinations(boxes, 2):  # disjoint boxes
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        sides = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert example["label"] == example["objects"]["label"][np.argmax(sides)]
    again = [e["image"].tobytes() for _, e in itertools.islice(
        shapes_lib.generate_multi("test"), 50)]  # reproducible generation
    assert set(again) <= {e["image"].tobytes() for e in stored_test}


@pytest.mark.slow
def test_objects_beyond_max_boxes_in_eval_are_reported(data_dir, stored_test, caplog):
    """The eval scores only max_boxes objects per image: say how many were left out."""
    batches = list(detection.eval_batches(_config(data_dir, max_boxes=2), global_batch_size=100,
                                          num_devices=1))
    assert set(batches[0]) == {"image", "boxes", "labels", "box_valid", "mask"}
    counts = np.array([len(e["objects"]["label"]) for e in stored_test])
    beyond = np.maximum(counts - 2, 0)
    assert (f"{beyond.sum()} objects in {(beyond > 0).sum()} images of eval split 'test' lie "
            "beyond data.max_boxes=2") in caplog.text
    assert "set data.max_boxes >= 4" in caplog.text
    caplog.clear()
    list(detection.eval_batches(_config(data_dir), global_batch_size=100, num_devices=1))
    assert "beyond data.max_boxes" not in caplog.text


@pytest.mark.slow
def test_eval_batches_are_the_stored_boxes_in_pixels(data_dir, stored_test):
    batches = list(detection.eval_batches(_config(data_dir), global_batch_size=64,
                                          num_devices=2))
    assert len(batches) == 8  # ceil(500 / 64)
    assert batches[0]["image"].shape == (2, 32, 64, 64, 3)
    assert batches[0]["boxes"].shape == (2, 32, 4, 4)
    flat = {k: np.concatenate([b[k].reshape(-1, *b[k].shape[2:]) for b in batches])
            for k in batches[0]}
    assert flat["mask"].sum() == 500 and not flat["mask"][500:].any()
    assert not flat["box_valid"][500:].any()
    for i, example in enumerate(stored_test):
        n = len(example["objects"]["label"])
        ymin, xmin, ymax, xmax = example["objects"]["bbox"].T * 64
        np.testing.assert_allclose(flat["boxes"][i, :n], np.stack([xmin, ymin, xmax, ymax], 1),
                                   rtol=1e-6)
        np.testing.assert_array_equal(flat["labels"][i, :n], example["objects"]["label"])
        assert flat["box_valid"][i].tolist() == [True] * n + [False] * (4 - n)
        assert not flat["boxes"][i, n:].any()


@pytest.mark.slow
def test_flip_moves_image_and_boxes_together(data_dir):
    kwargs = {"global_batch_size": 32, "num_devices": 1, "seed": 3}
    plain = next(detection.train_batches(_config(data_dir, augment=False), **kwargs))
    flipped = next(detection.train_batches(_config(data_dir, augment=True), **kwargs))
    mirrored = 0
    for i in range(32):
        if np.array_equal(plain["image"][0, i], flipped["image"][0, i]):
            np.testing.assert_array_equal(plain["boxes"][0, i], flipped["boxes"][0, i])
            continue
        mirrored += 1
        np.testing.assert_array_equal(plain["image"][0, i, :, ::-1], flipped["image"][0, i])
        valid = plain["box_valid"][0, i]
        x1, y1, x2, y2 = plain["boxes"][0, i][valid].T
        np.testing.assert_allclose(flipped["boxes"][0, i][valid],
                                   np.stack([64 - x2, y1, 64 - x1, y2], 1), atol=1e-5)
    assert 5 < mirrored < 27  # about half


def _flip_keys(spec):
    """A stateless key that `pipeline.flipped_whole_image` mirrors with and one it does not."""
    draws = {}
    for k in range(64):
        key = tf.constant([k, 7], tf.int64)
        flip = bool(pipeline.flipped_whole_image(spec, _IDENTITY, tf.zeros((6, 10, 1), tf.uint8),
                                                 key)[1])
        draws.setdefault(flip, key)
        if len(draws) == 2:
            return draws[False], draws[True]
    raise AssertionError("no flip in 64 draws (chance 2**-64)")


# uint8 pixels to float32 pixels / 255, unresized (native size = output size), mean 0, std 1.
_IDENTITY = Transforms((6, 10, 1), (6, 10), (0.0,), (1.0,), "none", "resize", 0, 1.0)


def test_flipped_boxes_are_the_numpy_mirror_and_cover_the_flipped_pixels():
    """Fast (no dataset): the training path's `flipped_whole_image` + `_targets` on a 6 x 10
    image with two painted boxes, against np.fliplr of the image and x1' = W - x2, x2' = W - x1
    (y unchanged) of the unflipped pixel boxes (float32 products of normalized coordinates:
    atol 1e-5 px); each mirrored box, rounded, covers exactly its own pixels of the flipped
    image."""
    height, width = 6, 10
    pixel_boxes = np.array([[1, 1, 4, 5], [6, 0, 9, 6]], np.float64)  # (x1, y1, x2, y2), ints
    image = np.zeros((height, width, 1), np.uint8)
    for value, (x1, y1, x2, y2) in enumerate(pixel_boxes.astype(int), start=1):
        image[y1:y2, x1:x2] = value
    example = {
        "image": tf.constant(image),
        "classes": tf.constant([3, 1], tf.int64),
        # stored normalized [ymin, xmin, ymax, xmax]
        "bbox": tf.constant(pixel_boxes[:, [1, 0, 3, 2]] / [height, width, height, width],
                            tf.float32),
    }
    spec = types.SimpleNamespace(augment=True)
    out = {}
    for flip, key in zip((False, True), _flip_keys(spec), strict=True):
        image_out, flipped = pipeline.flipped_whole_image(spec, _IDENTITY, example["image"], key)
        assert bool(flipped) is flip
        targets = detection._targets(example, (height, width), 3, flipped, training=True)
        out[flip] = (image_out.numpy()[..., 0], targets["boxes"].numpy(),
                     targets["box_valid"].numpy())
    plain_image, plain_boxes, valid = out[False]
    flip_image, flip_boxes, flip_valid = out[True]
    np.testing.assert_array_equal(valid, [True, True, False])
    np.testing.assert_array_equal(flip_valid, valid)
    np.testing.assert_array_equal(plain_image, image[..., 0] / np.float32(255))
    np.testing.assert_allclose(plain_boxes[:2], pixel_boxes, atol=1e-5)
    np.testing.assert_array_equal(flip_image, np.fliplr(image[..., 0]) / np.float32(255))
    flip_image = np.rint(flip_image * 255)
    x1, y1, x2, y2 = pixel_boxes.T
    np.testing.assert_allclose(flip_boxes[:2], np.stack([width - x2, y1, width - x1, y2], 1),
                               atol=1e-5)
    assert not flip_boxes[2].any()  # the padding row stays zero
    for value, box in enumerate(flip_boxes[:2], start=1):
        bx1, by1, bx2, by2 = np.rint(box).astype(int)
        assert bx1 < bx2 and by1 < by2
        inside = np.zeros((height, width), bool)
        inside[by1:by2, bx1:bx2] = True
        np.testing.assert_array_equal(flip_image == value, inside)


def test_no_flip_without_augment_even_with_a_key_that_flips():
    """Fast (no dataset): with `augment=False`, `flipped_whole_image` returns the eval image
    (here the pixels / 255, unmirrored) and `flip` False, even for a key that mirrors when
    augmentation is on."""
    image = np.arange(60, dtype=np.uint8).reshape(6, 10, 1)
    _, flipping_key = _flip_keys(types.SimpleNamespace(augment=True))
    image_out, flip = pipeline.flipped_whole_image(types.SimpleNamespace(augment=False),
                                                   _IDENTITY, tf.constant(image), flipping_key)
    assert not bool(flip)
    np.testing.assert_array_equal(image_out.numpy(), image / np.float32(255))


def test_training_drops_unused_boxes_before_taking_max_boxes():
    """Fast (no dataset): training removes difficult and area-less boxes *before* taking the
    first `max_boxes`, so they take no slot from a later object (they used to: objects [ok,
    zero-height, difficult, ok, ok] with max_boxes=3 left one valid box); the eval keeps the
    first `max_boxes` objects as stored, difficult ones flagged."""
    bbox = np.array([[0.1, 0.1, 0.3, 0.3], [0.2, 0.2, 0.2, 0.5], [0.5, 0.5, 0.9, 0.9],
                     [0.4, 0.6, 0.8, 0.9], [0.0, 0.25, 0.5, 1.0]], np.float32)
    example = {"bbox": tf.constant(bbox), "classes": tf.constant([0, 1, 2, 3, 4], tf.int64),
               "difficult": tf.constant([False, False, True, False, False])}

    def pixels(rows):  # [ymin, xmin, ymax, xmax] of a 40 x 80 image -> (x1, y1, x2, y2)
        return bbox[rows][:, [1, 0, 3, 2]] * np.float32([80, 40, 80, 40])

    train = detection._targets(example, (40, 80), 3, tf.constant(False), training=True)
    np.testing.assert_array_equal(train["box_valid"], [True, True, True])
    np.testing.assert_array_equal(train["labels"], [0, 3, 4])
    np.testing.assert_allclose(train["boxes"], pixels([0, 3, 4]), atol=1e-5)
    assert "box_difficult" not in train
    roomy = detection._targets(example, (40, 80), 4, tf.constant(False), training=True)
    np.testing.assert_array_equal(roomy["box_valid"], [True, True, True, False])
    assert not roomy["boxes"].numpy()[3].any() and roomy["labels"].numpy()[3] == 0
    evaluated = detection._targets(example, (40, 80), 3, tf.constant(False), training=False)
    np.testing.assert_array_equal(evaluated["box_valid"], [True, True, True])
    np.testing.assert_array_equal(evaluated["labels"], [0, 1, 2])
    np.testing.assert_array_equal(evaluated["box_difficult"], [False, False, True])
    np.testing.assert_allclose(evaluated["boxes"], pixels([0, 1, 2]), atol=1e-5)


def test_proposals_are_mirrored_with_the_image_and_padded_to_the_tables_rows():
    """Fast (no dataset): `_targets` turns an image's cached proposals into pixels of a 20 x 40
    output like its boxes, mirrored with the flip (x1' = W - x2, x2' = W - x1), the first
    `proposal_count` rows valid and the rest of the table's rows zero (float64 reference,
    atol 1e-5 px)."""
    height, width = 20, 40
    norm = np.array([[0.1, 0.25, 0.5, 0.5], [0.0, 0.0, 1.0, 0.75], [0, 0, 0, 0]], np.float32)
    example = {"bbox": tf.constant(norm[:1]), "classes": tf.constant([1], tf.int64),
               "proposals": tf.constant(norm), "proposal_count": tf.constant(2, tf.int32)}
    out = detection._targets(example, (height, width), 2, tf.constant(True), training=True)
    ymin, xmin, ymax, xmax = norm[:2].T.astype(np.float64)
    mirrored = np.stack([width - xmax * width, ymin * height, width - xmin * width,
                         ymax * height], 1)  # [[20, 2, 30, 10], [10, 0, 40, 20]]
    assert out["proposals"].shape == (3, 4)
    np.testing.assert_allclose(out["proposals"][:2], mirrored, atol=1e-5)
    assert not out["proposals"].numpy()[2].any()
    np.testing.assert_array_equal(out["proposal_valid"], [True, True, False])
    np.testing.assert_allclose(out["boxes"][0], mirrored[0], atol=1e-5)  # the same flip


def test_objects_beyond_max_boxes_are_counted_over_the_whole_pass(caplog):
    """Fast (no dataset): the eval's warning sums over every batch, and its max_boxes hint is
    the largest count of the pass, not of the last batch; `num_objects` never reaches the
    caller. Hand counts for [5, 2] then [3, 0] with max_boxes=2: 3 + 0 + 1 + 0 = 4 objects left
    out, in 2 images; the hint >= 5."""
    batches = [{"num_objects": np.array([5, 2]), "x": 0},
               {"num_objects": np.array([3, 0]), "x": 1}]
    with caplog.at_level(logging.WARNING):
        out = list(detection._warn_beyond_max_boxes(iter(batches), 2, "test"))
    assert out == [{"x": 0}, {"x": 1}]
    assert ("4 objects in 2 images of eval split 'test' lie beyond data.max_boxes=2"
            in caplog.text)
    assert "set data.max_boxes >= 5." in caplog.text


@pytest.mark.slow
def test_resume_replays_the_same_batches(data_dir):
    kwargs = {"global_batch_size": 16, "num_devices": 2, "seed": 5}
    config = _config(data_dir, augment=True)
    stream = detection.train_batches(config, **kwargs)
    batches = [next(stream) for _ in range(3)]
    resumed = next(detection.train_batches(config, start_step=2, **kwargs))
    for key in batches[2]:
        np.testing.assert_array_equal(batches[2][key], resumed[key])
    assert batches[0]["labels"].dtype == np.int32 and batches[0]["box_valid"].dtype == bool


@pytest.mark.parametrize("overrides,message", [
    ({"max_boxes": 0}, "data: max_boxes=0 is invalid; expected a positive integer."),
    ({"name": "fake", "tfds_name": None},
     "data: name='fake' is invalid; detection needs a tfds dataset with `objects` boxes"),
    ({"classes": (0, 1)}, "data: classes=(0, 1) is invalid; expected None: class subsets are "
                          "not supported for detection."),
])
def test_bad_configs(tmp_path, overrides, message):
    with pytest.raises(ValueError) as err:  # refused before any dataset is opened
        next(detection.train_batches(_config(str(tmp_path), **overrides), global_batch_size=8,
                                     num_devices=1, seed=0))
    assert str(err.value).startswith(message)


def test_an_image_size_within_the_presets_crop_padding_is_not_refused(tmp_path,
                                                                      whole_image_source_stub):
    """The shapes preset's classification crop pads 4 pixels per side (an image_size of at most
    4 is refused for classification); detection never crops (whole image resized, flipped), and
    used to be refused all the same. (Its models refuse such inputs themselves, by name.)"""
    config = _config(str(tmp_path / "never_built"), image_size=4, augment=True)
    assert spec_lib.resolve_for_task(config, "detection").size == (4, 4)  # check_config's
    with pytest.raises(whole_image_source_stub):
        detection.get_dataset_info(config)


def test_dataset_without_boxes_is_refused(digits_dir):
    config = detection.default_data_config("digits")
    config.data_dir = digits_dir
    with pytest.raises(ValueError, match=r"data: tfds_name='digits' is invalid; expected a "
                                         r"dataset with `objects/bbox`"):
        next(detection.eval_batches(config, global_batch_size=8, num_devices=1))


@pytest.mark.parametrize("feature", [{"bbox": object()}, {"label": object()}])
def test_objects_with_only_one_of_bbox_and_label_are_refused(feature):
    """Fast (no dataset): `objects` needs both `bbox` and `label` (with `bbox` alone the check
    let it through to a bare KeyError: 'label'); the same named ValueError as for no boxes."""
    spec = types.SimpleNamespace(tfds_name="half_boxes")
    with pytest.raises(ValueError, match=r"^data: tfds_name='half_boxes' is invalid; expected a "
                                         r"dataset with `objects/bbox` and `objects/label`"):
        detection._DetectionSource._num_classes(
            None, spec, {"objects": types.SimpleNamespace(feature=feature)})


@pytest.mark.slow
@pytest.mark.parametrize("augment,cache,recorded", [
    (True, True, "f261fcf7aa009db4cc1309cd9a8cd1d8749f368a5f72680ae5b0388fd4d117bc"),
    (True, False, "f261fcf7aa009db4cc1309cd9a8cd1d8749f368a5f72680ae5b0388fd4d117bc"),
    (False, True, "c3fa92f4efa85cee0237caf33415b018dd60bdf63897e0b9463fc812716f2081"),
])
def test_batches_match_the_recorded_ones(data_dir, augment, cache, recorded):
    """Recorded before detection's copy of the epoch scheme became `pipeline.epoch_dataset`
    (start_step 249 crosses from epoch 0 into epoch 1 of 250 steps)."""
    from tests.data.test_pipeline import _digest

    stream = detection.train_batches(_config(data_dir, augment=augment, cache=cache),
                                     global_batch_size=16, num_devices=2, seed=5, start_step=249)
    assert _digest([next(stream) for _ in range(3)]) == recorded


def _with_proposals(root, **overrides):
    config = _config(root, train_split="train[:48]", eval_split="test[:40]", **overrides)
    config.proposals.method = "selective_search"
    config.proposals.scale = 2.0
    config.proposals.max_proposals = 96
    return config


def _expected_proposals(image, rows):
    """The image's selective-search boxes in pixels, padded to `rows` (the batch's layout)."""
    from cnnjax.detection.selective_search import selective_search

    boxes = selective_search(image, scale=2.0, max_boxes=rows)
    padded = np.zeros((rows, 4), np.float32)
    padded[: len(boxes)] = boxes
    return padded, np.arange(rows) < len(boxes)


@pytest.mark.slow
def test_eval_batches_carry_each_images_selective_search_boxes(data_dir, stored_test):
    batches = list(detection.eval_batches(_with_proposals(data_dir), global_batch_size=16,
                                          num_devices=1))
    flat = {k: np.concatenate([b[k][0] for b in batches]) for k in batches[0]}
    assert flat["proposals"].shape == (48, 96, 4) and flat["proposal_valid"].dtype == bool
    assert not flat["proposal_valid"][40:].any()  # the last batch's padding
    for i, example in enumerate(stored_test[:40]):
        boxes, valid = _expected_proposals(example["image"], 96)
        np.testing.assert_allclose(flat["proposals"][i], boxes, atol=1e-4)  # via [0, 1] coords
        np.testing.assert_array_equal(flat["proposal_valid"][i], valid)


@pytest.mark.slow
def test_prepare_proposals_caches_both_splits(data_dir, monkeypatch):
    from cnnjax.data import proposals

    paths = detection.prepare_proposals(_with_proposals(data_dir))
    assert list(paths) == ["train[:48]", "test[:40]"]
    for split, path in paths.items():
        with np.load(path) as table:
            assert table["boxes"].shape == (int(split[-3:-1]), 96, 4)
    monkeypatch.setattr(proposals, "compute_table", None)  # a rerun computes nothing
    assert detection.prepare_proposals(_with_proposals(data_dir)) == paths


def test_prepare_proposals_checks_every_split_before_computing_any(voc_dir, monkeypatch):
    """A bad eval split was reported only after the train split's selective search (minutes).
    On the mocked VOC's metadata (splits train, validation, test): generating shapes_multi for
    this one check took ~15 s."""
    from cnnjax.data import proposals

    computed = []
    monkeypatch.setattr(proposals, "load_table",
                        lambda builder, split, spec: computed.append(split))
    config = _voc_config(voc_dir, train_split="train", eval_split="test")
    config.proposals.method = "selective_search"
    detection.prepare_proposals(config)  # the splits exist: both are computed
    assert computed == ["train", "test"]
    computed.clear()
    with pytest.raises(ValueError, match=r"eval_split='bogus' is invalid"):
        config.eval_split = "bogus"
        detection.prepare_proposals(config)
    assert computed == []


@pytest.mark.slow
def test_train_proposals_flip_with_the_image_and_resume(data_dir):
    kwargs = {"global_batch_size": 16, "num_devices": 2, "seed": 3}
    plain = next(detection.train_batches(_with_proposals(data_dir, augment=False), **kwargs))
    config = _with_proposals(data_dir, augment=True)
    stream = detection.train_batches(config, **kwargs)
    flipped = [next(stream) for _ in range(3)]
    mirrored = 0
    for d, i in itertools.product(range(2), range(8)):
        valid = plain["proposal_valid"][d, i]
        np.testing.assert_array_equal(flipped[0]["proposal_valid"][d, i], valid)
        x1, y1, x2, y2 = plain["proposals"][d, i][valid].T
        if np.array_equal(plain["image"][d, i], flipped[0]["image"][d, i]):
            np.testing.assert_array_equal(plain["proposals"][d, i], flipped[0]["proposals"][d, i])
            continue
        mirrored += 1
        np.testing.assert_allclose(flipped[0]["proposals"][d, i][valid],
                                   np.stack([64 - x2, y1, 64 - x1, y2], 1), atol=1e-5)
    assert 0 < mirrored < 16
    resumed = next(detection.train_batches(config, start_step=2, **kwargs))
    for key in ("image", "proposals", "proposal_valid"):
        np.testing.assert_array_equal(flipped[2][key], resumed[key])


# ------------------------------------------------------------ catalogue detection set, mocked
@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
    from tests.data.test_presets import _write_metadata

    root = str(tmp_path_factory.mktemp("tfds_voc"))
    _write_metadata(root, "voc/2007", {"train": 5, "validation": 3, "test": 6})
    return root


def _voc_config(root, **overrides):
    config = detection.default_data_config("voc2007")
    config.data_dir, config.image_size, config.max_boxes = root, 48, 6
    for key, value in overrides.items():
        config[key] = value
    return config


def _voc_examples(split):
    """Deterministic VOC-like records of `split` (tfds' own mock cannot make `objects`
    sequences): varying image sizes, 1-8 objects each, every third one difficult."""
    rng = np.random.default_rng(0 if "test" in split else 1)
    for _ in range(6 if "test" in split else 8):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        n = int(rng.integers(1, 9))
        corners = np.sort(rng.uniform(0, 1, (n, 2, 2)), axis=1)  # [n, (lo, hi), (y, x)]
        yield {"image": rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
               "objects": {"bbox": corners.reshape(n, 4).astype(np.float32),
                           "label": rng.integers(0, 20, n),
                           "is_difficult": np.arange(n) % 3 == 2}}


def _voc_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False,
                    examples_fn=_voc_examples):
    """A mock `_as_dataset` serving `examples_fn(split)` (default `_voc_examples`; images
    PNG-encoded unless decoded)."""
    del self, read_config, shuffle_files
    examples = list(examples_fn(str(split)))

    def generate():
        for ex in examples:
            image = ex["image"] if not decoders else tf.io.encode_png(ex["image"]).numpy()
            yield {"image": image, "objects": ex["objects"]}

    image_spec = (tf.TensorSpec((None, None, 3), tf.uint8) if not decoders
                  else tf.TensorSpec((), tf.string))
    return tf.data.Dataset.from_generator(generate, output_signature={
        "image": image_spec,
        "objects": {"bbox": tf.TensorSpec((None, 4), tf.float32),
                    "label": tf.TensorSpec((None,), tf.int64),
                    "is_difficult": tf.TensorSpec((None,), tf.bool)}})


def test_voc2007_boxes_classes_and_difficult_flags(voc_dir):
    """The catalogue path (`tfds.testing.mock_data`): 20 classes from `objects/label`, whole
    images resized (boxes scaled with them), difficult objects flagged for the eval and removed
    from the training targets."""
    from tests.data.test_presets import _mock

    test, train = list(_voc_examples("test")), list(_voc_examples("train+validation"))
    with _mock(voc_dir, 6, as_dataset_fn=_voc_as_dataset):
        info = detection.get_dataset_info(_voc_config(voc_dir))
        batch = next(detection.eval_batches(_voc_config(voc_dir), global_batch_size=6,
                                            num_devices=1))
        trained = next(detection.train_batches(
            _voc_config(voc_dir, augment=False, shuffle_buffer=1), global_batch_size=8,
            num_devices=1, seed=0))
    assert (info.name, info.num_classes, info.image_shape, info.num_train, info.num_eval) == (
        "voc2007", 20, (48, 48, 3), 8, 6)
    assert batch["image"].shape == (1, 6, 48, 48, 3)
    flagged = 0
    for i, example in enumerate(test):
        objects = example["objects"]
        n = min(len(objects["label"]), 6)  # ([ymin, xmin, ymax, xmax] normalized, as tfds')
        ymin, xmin, ymax, xmax = objects["bbox"][:n].T * 48
        np.testing.assert_allclose(batch["boxes"][0, i, :n], np.stack([xmin, ymin, xmax, ymax], 1),
                                   rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(batch["labels"][0, i, :n], objects["label"][:n])
        assert batch["box_valid"][0, i].tolist() == [True] * n + [False] * (6 - n)
        np.testing.assert_array_equal(batch["box_difficult"][0, i, :n], objects["is_difficult"][:n])
        flagged += int(objects["is_difficult"][:n].sum())
    assert flagged > 0  # the mock marks some objects difficult
    assert not batch["box_difficult"][0][~batch["box_valid"][0]].any()
    removed = 0
    for i, example in enumerate(train):  # shuffle_buffer=1: the stored order
        hard = example["objects"]["is_difficult"]
        n = min(int((~hard).sum()), 6)  # the first 6 objects that are not difficult
        assert trained["box_valid"][0, i].tolist() == [True] * n + [False] * (6 - n)
        np.testing.assert_array_equal(trained["labels"][0, i, :n],
                                      example["objects"]["label"][~hard][:n])
        removed += int(hard.sum())
    assert removed > 0 and "box_difficult" not in trained
    assert batch["labels"].dtype == trained["labels"].dtype == np.int32  # the documented layout


def test_boxes_without_area_are_dropped_from_training_targets_only(voc_dir):
    """A zero-width or zero-height box matches no anchor or RoI (IoU 0/0) and its regression
    target is log(0/0): training drops it (torchvision's references do), the eval keeps it."""
    from tests.data.test_presets import _mock

    def flattened(split):  # object 0 of every image has no width, object 1 no height
        for ex in _voc_examples(split):
            bbox = ex["objects"]["bbox"].copy()
            bbox[0, 3] = bbox[0, 1]
            if len(bbox) > 1:
                bbox[1, 2] = bbox[1, 0]
            yield {**ex, "objects": {**ex["objects"], "bbox": bbox}}

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        return _voc_as_dataset(self, split, decoders, read_config, shuffle_files, flattened)

    with _mock(voc_dir, 6, as_dataset_fn=as_dataset):
        trained = next(detection.train_batches(
            _voc_config(voc_dir, augment=False, shuffle_buffer=1), global_batch_size=8,
            num_devices=1, seed=0))
        batch = next(detection.eval_batches(_voc_config(voc_dir), global_batch_size=6,
                                            num_devices=1))
    for i, example in enumerate(flattened("train+validation")):
        kept = ~example["objects"]["is_difficult"]
        kept[:2] = False  # the two flattened boxes
        n = min(int(kept.sum()), 6)
        assert trained["box_valid"][0, i].tolist() == [True] * n + [False] * (6 - n)
        np.testing.assert_array_equal(trained["labels"][0, i, :n],
                                      example["objects"]["label"][kept][:n])
    for i, example in enumerate(flattened("test")):
        n = min(len(example["objects"]["label"]), 6)
        assert batch["box_valid"][0, i].tolist() == [True] * n + [False] * (6 - n)


def test_classification_on_a_detection_set_is_refused(voc_dir):
    from cnnjax.data import pipeline

    config = pipeline.default_data_config("voc2007")
    config.data_dir = voc_dir
    with pytest.raises(ValueError, match=r"data: tfds_name='voc/2007' is invalid; expected a "
                                         r"dataset with an image-level `label` .* needs "
                                         r"config.task='detection'\)"):
        pipeline.get_dataset_info(config)


def test_a_cropping_preset_still_resizes_whole_images(voc_dir):
    """imagenette's centre crop is for classification; boxes need the whole image (same
    normalization as voc2007, so the batches must be equal)."""
    from tests.data.test_presets import _mock

    imagenette = _voc_config(voc_dir)
    imagenette.name = "imagenette"
    imagenette.tfds_name, imagenette.eval_split = "voc/2007", "test"
    with _mock(voc_dir, 6, as_dataset_fn=_voc_as_dataset):
        cropped_preset, voc = (
            next(detection.eval_batches(c, global_batch_size=6, num_devices=1))
            for c in (imagenette, _voc_config(voc_dir)))
    assert cropped_preset.keys() == voc.keys()
    for key in voc:
        np.testing.assert_array_equal(cropped_preset[key], voc[key], err_msg=key)


def test_dataset_info_is_named_after_the_tfds_name_override(voc_dir):
    """`get_dataset_info` names the dataset read (`tfds_name`), not the preset lending its
    normalization (as `shapes_multi` with name='shapes'; that test is slow)."""
    from tests.data.test_presets import _mock

    config = _voc_config(voc_dir)
    config.name, config.tfds_name, config.eval_split = "imagenette", "voc/2007", "test"
    with _mock(voc_dir, 6, as_dataset_fn=_voc_as_dataset):
        assert detection.get_dataset_info(config).name == "voc/2007"
        assert detection.get_dataset_info(_voc_config(voc_dir)).name == "voc2007"


def test_an_empty_eval_shard_pads_with_a_batch_like_a_real_one(voc_dir):
    """Over 2 processes, eval split 'test[:1]' leaves process 1 no example: it yields one
    all-padding batch (built from `empty`), which must have a real batch's keys (VOC's
    `box_difficult` too), dtypes and shapes, or the hosts' collectives would not line up."""
    from tests.data.test_presets import _mock

    config = _voc_config(voc_dir, eval_split="test[:1]")
    kwargs = {"global_batch_size": 2, "num_devices": 1, "process_count": 2}
    with _mock(voc_dir, 6, as_dataset_fn=_voc_as_dataset):
        real = next(detection.eval_batches(config, process_index=0, **kwargs))
        padding = list(detection.eval_batches(config, process_index=1, **kwargs))
    assert real["mask"].tolist() == [[1.0]]
    assert len(padding) == 1 and not padding[0]["mask"].any()
    assert padding[0].keys() == real.keys()
    for key in real:
        assert padding[0][key].dtype == real[key].dtype, key
        assert padding[0][key].shape == real[key].shape, key
        assert not padding[0][key].any(), key


def test_non_square_outputs_scale_x_by_width_and_y_by_height(voc_dir, monkeypatch):
    """Every other test image is square, so a swapped (H, W) went unseen; a 32 x 48 output (as
    a fixed non-square native size with image_size=None gives) must put x in [0, 48] and y in
    [0, 32], in eval and training (float64 reference from the stored boxes, atol 1e-4 px)."""
    from tests.data.test_presets import _mock

    make = pipeline.make_transforms
    monkeypatch.setattr(pipeline, "make_transforms", lambda spec, source: dataclasses.replace(
        make(spec, source), out_shape=(32, 48, 3)))
    with _mock(voc_dir, 6, as_dataset_fn=_voc_as_dataset):
        batch = next(detection.eval_batches(_voc_config(voc_dir), global_batch_size=6,
                                            num_devices=1))
        trained = next(detection.train_batches(
            _voc_config(voc_dir, augment=False, shuffle_buffer=1), global_batch_size=8,
            num_devices=1, seed=0))
    assert batch["image"].shape == (1, 6, 32, 48, 3)
    assert trained["image"].shape == (1, 8, 32, 48, 3)

    def pixels(bbox):  # normalized [ymin, xmin, ymax, xmax] -> (x1, y1, x2, y2) of 32 x 48
        ymin, xmin, ymax, xmax = bbox.T.astype(np.float64)
        return np.stack([xmin * 48, ymin * 32, xmax * 48, ymax * 32], 1)

    for i, example in enumerate(_voc_examples("test")):
        n = min(len(example["objects"]["label"]), 6)
        np.testing.assert_allclose(batch["boxes"][0, i, :n],
                                   pixels(example["objects"]["bbox"][:n]), atol=1e-4)
    for i, example in enumerate(_voc_examples("train+validation")):  # shuffle_buffer=1: stored
        kept = example["objects"]["bbox"][~example["objects"]["is_difficult"]][:6]
        np.testing.assert_allclose(trained["boxes"][0, i, :len(kept)], pixels(kept), atol=1e-4)


def test_eval_reports_the_objects_beyond_max_boxes_before_truncation(voc_dir, caplog):
    """The fast form of the slow shapes_multi check: the warning counts each image's objects as
    stored (not cut to max_boxes) and names the eval split, not the train split."""
    from tests.data.test_presets import _mock

    counts = np.array([len(e["objects"]["label"]) for e in _voc_examples("test")])
    beyond = np.maximum(counts - 2, 0)
    assert beyond.sum() > 0
    with _mock(voc_dir, 6, as_dataset_fn=_voc_as_dataset), caplog.at_level(logging.WARNING):
        list(detection.eval_batches(_voc_config(voc_dir, max_boxes=2), global_batch_size=6,
                                    num_devices=1))
    assert (f"{beyond.sum()} objects in {(beyond > 0).sum()} images of eval split 'test' lie "
            "beyond data.max_boxes=2") in caplog.text
    assert f"set data.max_boxes >= {counts.max()}." in caplog.text


def test_prepare_proposals_returns_each_splits_own_cache(voc_dir, monkeypatch):
    """Fast form of the slow shapes_multi check: `{split: cache file}` maps each split to its
    own table (`ProposalSpec.cache_path`), so the eval does not read the train split's."""
    from cnnjax.data import proposals

    monkeypatch.setattr(proposals, "load_table", lambda builder, split, spec: None)
    config = _voc_config(voc_dir, train_split="train", eval_split="test")
    config.proposals.method = "selective_search"
    paths = detection.prepare_proposals(config)
    _, source, _, _ = detection._open(config)
    assert paths == {split: source.proposals.cache_path(source.builder, split)
                     for split in ("train", "test")}
    assert paths["train"] != paths["test"]


def test_eval_split_name_of_a_detection_config(voc_dir):
    """The real function (callers' tests fake it): `data.eval_split` of a config that also
    carries the detection fields `max_boxes` and `proposals`, else the preset's."""
    assert detection.eval_split_name(_voc_config(voc_dir)) == "test"
    assert detection.eval_split_name(_voc_config(voc_dir, eval_split="test[:5]")) == "test[:5]"


@pytest.mark.parametrize("split,num,expected", [
    ("train", 6, "train[0:6]"),
    ("train[:90%]", 6, "train[0:6]"),
    ("train[10:]", 6, "train[10:16]"),
    ("train[95:]", 10, "train[95:100]"),  # shorter than asked: all of it
    ("train[98:]+test[:5]", 4, "train[98:100]+test[0:2]"),
])
def test_the_head_of_a_sliced_or_joined_split_is_one_tfds_can_read(split, num, expected):
    """R-CNN's SVM stage reads the first N train scenes; `train[:90%][:N]` is no tfds split."""
    splits = {name: tfds.core.SplitInfo(name=name, shard_lengths=[size], num_bytes=0,
                                        filename_template=None)
              for name, size in (("train", 100), ("test", 40))}
    assert detection.head_of(split, splits, num) == expected
    tfds.core.ReadInstruction.from_spec(expected)  # parses


def test_head_split_reads_the_dataset_splits_and_refuses_a_bad_split(voc_dir):
    """`head_split` on the mocked VOC's metadata (train 5, validation 3): the head of a joined
    split by hand, and a bad split refused by name (its `head_of` alone returned '' for a
    reversed slice and tfds' bare error for an unknown split)."""
    config = _voc_config(voc_dir)
    assert detection.head_split(config, "train+validation", 6) == "train[0:5]+validation[0:1]"
    assert detection.head_split(config, "validation[1:]+test", 4) == "validation[1:3]+test[0:2]"
    with pytest.raises(ValueError, match=r"^data: split='bogus' is invalid; 'voc' has splits"):
        detection.head_split(config, "bogus", 3)
    with pytest.raises(ValueError, match=r"^data: split='train\[4:2\]' is invalid; its slice"):
        detection.head_split(config, "train[4:2]", 3)


def test_voc2007_trainval_shards_without_a_process_batch_are_refused_by_check_train_epoch(
        voc_dir):
    """voc2007's train split is 'train+validation' (5 + 3 here), which tfds shards part by part:
    over 2 processes 3+2 and 2+1 examples. A global batch of 8 fits the split but not the
    shard of 3; `check_config` asks `check_train_epoch` before building the model."""
    with pytest.raises(ValueError, match=re.escape(
            "data: global_batch_size=8 is invalid; expected at most 6 (2 processes * 3): split "
            "'train+validation' of 'voc2007' shards over 2 processes as [5, 3] examples")):
        detection.check_train_epoch(_voc_config(voc_dir), global_batch_size=8, process_count=2)
    assert detection.check_train_epoch(_voc_config(voc_dir), global_batch_size=6,
                                       process_count=2) == 1
    assert detection.check_train_epoch(_voc_config(voc_dir), global_batch_size=8,
                                       process_count=1) == 1

"""The offline synthetic `shapes` builder: sizes, balance, fidelity, geometry, pipeline use."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnnjax.data.builders import Shapes
from cnnjax.data.builders import shapes as shapes_lib
from cnnjax.data.pipeline import default_data_config, get_dataset_info, train_batches
from cnnjax.data.presets import get_preset


@pytest.fixture(scope="module")
def shapes_config(tmp_path_factory):
    config = default_data_config("shapes")
    config.data_dir = str(tmp_path_factory.mktemp("tfds_shapes"))
    return config


@pytest.fixture(scope="module")
def splits(shapes_config):
    get_dataset_info(shapes_config)  # generated on first use
    builder = tfds.builder("shapes", data_dir=shapes_config.data_dir)
    return {split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
            for split in ("train", "test")}


def test_registered_and_described(shapes_config, splits):
    assert tfds.builder_cls("shapes") is Shapes
    info = get_dataset_info(shapes_config)
    assert (info.num_classes, info.image_shape, info.num_train, info.num_eval) == (
        4, (32, 32, 3), 2000, 400)


def test_balanced_classes_and_one_box_per_image(splits):
    for split, per_class in (("train", 500), ("test", 100)):
        np.testing.assert_array_equal(np.bincount(splits[split]["label"]), [per_class] * 4)
        boxes = splits[split]["objects"]["bbox"]
        assert boxes.shape == (4 * per_class, 1, 4)
        np.testing.assert_array_equal(splits[split]["objects"]["label"][:, 0],
                                      splits[split]["label"])


def test_stored_images_are_the_generated_ones(splits):
    generated = {e["image"].tobytes(): e["label"] for _, e in shapes_lib.generate("test")}
    stored = splits["test"]
    assert len(generated) == 400
    for image, label in zip(stored["image"], stored["label"], strict=True):
        assert generated[image.tobytes()] == label
    again = [e["image"] for _, e in shapes_lib.generate("test")]  # reproducible generation
    assert {a.tobytes() for a in again} == set(generated)


def test_shape_geometry_matches_box_and_class_area(splits):
    # Independent check: classify pixels by their nearest colour (shape vs background), then
    # compare the shape's pixel area with the analytic area of the class for the stored box.
    area_per_box = {0: np.pi / 4, 1: 1.0, 2: 0.5, 3: 5 / 9}  # circle, square, triangle, cross
    test = splits["test"]
    for image, label, box in zip(test["image"], test["label"], test["objects"]["bbox"][:, 0],
                                 strict=True):
        pixels = image.astype(np.float64)
        ymin, xmin, ymax, xmax = box * 32
        cy, cx = int((ymin + ymax) / 2), int((xmin + xmax) / 2)
        foreground = pixels[cy, cx]
        yy, xx = np.mgrid[0:32, 0:32] + 0.5
        outside = (yy < ymin - 1) | (yy > ymax + 1) | (xx < xmin - 1) | (xx > xmax + 1)
        background = np.median(pixels[outside], axis=0)
        is_shape = (np.abs(pixels - foreground).sum(-1) < np.abs(pixels - background).sum(-1))
        assert not is_shape[outside].any()  # nothing drawn outside the box
        expected = area_per_box[int(label)] * (ymax - ymin) * (xmax - xmin)
        assert abs(is_shape.sum() - expected) <= 0.2 * expected + 4


def test_preset_statistics_match_train_split(splits):
    pixels = splits["train"]["image"].astype(np.float64) / 255.0
    preset = get_preset("shapes")
    np.testing.assert_allclose(pixels.mean(axis=(0, 1, 2)), preset.mean, atol=1e-4)
    np.testing.assert_allclose(pixels.std(axis=(0, 1, 2)), preset.std, atol=1e-4)


def test_pipeline_batches(shapes_config, splits):
    batch = next(train_batches(shapes_config, global_batch_size=16, num_devices=2, seed=0))
    assert batch["image"].shape == (2, 8, 32, 32, 3)
    assert batch["label"].max() < 4


def test_augmented_batches_match_the_recorded_ones(shapes_config, splits):
    """`pad_crop_flip` draws from the per-example stateless keys of `pipeline.epoch_dataset`;
    these batches were recorded before it replaced the classification-only `_train_dataset`."""
    from tests.data.test_pipeline import _digest

    batches = train_batches(shapes_config, global_batch_size=32, num_devices=2, seed=11,
                            start_step=5)
    assert _digest([next(batches) for _ in range(3)]) == (
        "17c4c86917b66d3a97c27e22449fadb37a2896fe569643da04141d72e4c734af")


def test_segmentation_class_maps_agree_with_boxes_and_labels():
    """`shapes_segmentation`: every shape's pixels carry `1 + label` inside its box, background is
    0 outside every box, and a shape's mask covers about its rendered area; the scene renderer
    behind it still draws `shapes_multi`'s scenes unchanged."""
    for _, ex in itertools.islice(shapes_lib.generate_segmentation("test"), 60):
        class_map = ex["segmentation_mask"][..., 0]
        assert class_map.shape == (64, 64) and class_map.dtype == np.uint8
        outside = np.ones((64, 64), bool)
        for (ymin, xmin, ymax, xmax), label in zip(ex["objects"]["bbox"] * 64,
                                                   ex["objects"]["label"], strict=True):
            box = (slice(int(np.floor(ymin)), int(np.ceil(ymax))),
                   slice(int(np.floor(xmin)), int(np.ceil(xmax))))
            outside[box] = False
            values = set(np.unique(class_map[box]).tolist())
            assert values <= {0, int(label) + 1} and int(label) + 1 in values
            side = (ymax - ymin) / 2  # the half-size r: a square covers (2r)^2, a circle pi r^2
            area = int(np.sum(class_map[box] == label + 1))
            lower = {0: np.pi, 1: 4.0, 2: 2.0, 3: 20 / 9}[int(label)] * side**2
            assert abs(area - lower) <= 0.25 * lower + 2 * side * 4  # edge pixels
        assert not class_map[outside].any()
    scene = shapes_lib.render_scene(np.random.RandomState([11, 0]))
    multi = shapes_lib.render_multi(np.random.RandomState([11, 0]))
    for a, b in zip(scene[:3], multi, strict=True):
        np.testing.assert_array_equal(a, b)
    assert tuple(shapes_lib.SEGMENTATION_CLASSES) == ("background", *shapes_lib.CLASS_NAMES)

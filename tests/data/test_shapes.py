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
    0 outside every box, a shape's mask covers about its rendered area, and the image label is
    the class of the largest box; the scene renderer behind it still draws `shapes_multi`'s
    scenes unchanged. Disjoint boxes may lie within a pixel of each other, so a box's
    floor/ceil pixels can hold a neighbour's edge: each box is checked on the pixels no other
    box touches (the first 60 scenes never met that case, example 68 does)."""
    counts = np.zeros(5, int)  # scenes per number of shapes
    for _, ex in itertools.islice(shapes_lib.generate_segmentation("test"), 200):
        counts[len(ex["objects"]["label"])] += 1
        class_map = ex["segmentation_mask"][..., 0]
        assert class_map.shape == (64, 64) and class_map.dtype == np.uint8
        boxes = ex["objects"]["bbox"].astype(np.float64) * 64
        touched = np.zeros((len(boxes), 64, 64), bool)  # every pixel a box overlaps
        for t, (ymin, xmin, ymax, xmax) in zip(touched, boxes, strict=True):
            t[int(np.floor(ymin)):int(np.ceil(ymax)),
              int(np.floor(xmin)):int(np.ceil(xmax))] = True
        for i, (box, label) in enumerate(zip(boxes, ex["objects"]["label"], strict=True)):
            own = touched[i] & ~np.delete(touched, i, axis=0).any(axis=0)
            values = set(np.unique(class_map[own]).tolist())
            assert values <= {0, int(label) + 1} and int(label) + 1 in values
            side = (box[2] - box[0]) / 2  # half-size r: a square covers (2r)^2, a circle pi r^2
            area = int(np.sum(class_map[own] == label + 1))
            lower = {0: np.pi, 1: 4.0, 2: 2.0, 3: 20 / 9}[int(label)] * side**2
            assert abs(area - lower) <= 0.25 * lower + 2 * side * 4  # edge pixels
        assert not class_map[~touched.any(axis=0)].any()
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert ex["label"] == ex["objects"]["label"][np.argmax(areas)]  # the first on ties
    assert counts[0] == 0 and counts[1:].min() > 20, counts  # 1-4 shapes, each count common
    scene = shapes_lib.render_scene(np.random.RandomState([11, 0]))
    multi = shapes_lib.render_multi(np.random.RandomState([11, 0]))
    for a, b in zip(scene[:3], multi, strict=True):
        np.testing.assert_array_equal(a, b)
    assert tuple(shapes_lib.SEGMENTATION_CLASSES) == ("background", *shapes_lib.CLASS_NAMES)


def _slack(label: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """How far (px, > 0 inside) offsets `(dx, dy)` from the centre lie inside the documented
    shape of half-size `r`: a circle, a square, a triangle with apex `(0, -r)` and base at
    `dy = r`, or a plus sign with arms `2r/3` wide (the triangle's sides scaled by 2/sqrt(5))."""
    if label == 0:
        return r - np.hypot(dx, dy)
    if label == 1:
        return r - np.maximum(np.abs(dx), np.abs(dy))
    if label == 2:
        return np.minimum(r - dy, (dy + r) / 2 - np.abs(dx))
    return np.maximum(np.minimum(r - np.abs(dx), r / 3 - np.abs(dy)),
                      np.minimum(r / 3 - np.abs(dx), r - np.abs(dy)))


def test_segmentation_class_map_marks_pixels_a_shape_covers_at_least_half():
    """The class map is `1 + label` exactly where a shape covers at least half of the pixel, 0
    elsewhere: each shape's 4x4 sub-pixel coverage recomputed in float64 from its stored box
    and label, later shapes painted over earlier ones. Pixels with a sub-pixel sample within
    1e-4 px of an edge (the float32 boxes round by ~4e-6 px) are left out, and must be rare;
    pixels exactly half covered and ones covered 1/16..7/16 must occur, so both `> 0.5` and
    `> 0` thresholds would be caught (as in scene `[22, 0]`, a cross at x=36.05 y=10.96)."""
    centres = (np.arange(64 * 4) + 0.5) / 4  # sub-pixel sample centres, px
    exactly_half = partly = ambiguous = 0
    for _, ex in itertools.islice(shapes_lib.generate_segmentation("test"), 100):
        expected = np.zeros((64, 64), np.uint8)
        unsure = np.zeros((64, 64), bool)
        for (ymin, xmin, ymax, xmax), label in zip(ex["objects"]["bbox"].astype(np.float64) * 64,
                                                   ex["objects"]["label"], strict=True):
            r, cy, cx = (ymax - ymin) / 2, (ymin + ymax) / 2, (xmin + xmax) / 2
            assert abs((xmax - xmin) / 2 - r) < 1e-4  # a 2r x 2r box, never clipped
            slack = _slack(int(label), centres[None, :] - cx, centres[:, None] - cy, r)
            inside = (slack > 1e-4).reshape(64, 4, 64, 4).sum((1, 3))  # of 16 samples
            maybe = (slack >= -1e-4).reshape(64, 4, 64, 4).sum((1, 3))
            expected[inside >= 8] = label + 1
            unsure |= (inside >= 8) != (maybe >= 8)
            exactly_half += int(np.sum((inside == 8) & (maybe == 8)))
            partly += int(np.sum((maybe > 0) & (maybe < 8)))
        class_map = ex["segmentation_mask"][..., 0]
        np.testing.assert_array_equal(class_map[~unsure], expected[~unsure])
        ambiguous += int(unsure.sum())
    assert ambiguous <= 5 and exactly_half > 0 and partly > 0, (ambiguous, exactly_half, partly)


def test_splits_share_no_image_and_no_seed():
    """A test split drawn with its train split's seed repeats the train images (the test set
    leaks into training): every split seed of the three builders differs, and the first 100
    test renders of each builder share no image with its first 100 train renders."""
    seeds = [seed for splits in (shapes_lib.SPLITS, shapes_lib.MULTI_SPLITS,
                                 shapes_lib.SEGMENTATION_SPLITS) for _, seed in splits.values()]
    assert len(seeds) == 6 and len(set(seeds)) == 6, seeds
    for generate in (shapes_lib.generate, shapes_lib.generate_multi,
                     shapes_lib.generate_segmentation):
        train, test = ({ex["image"].tobytes() for _, ex in itertools.islice(generate(split), 100)}
                       for split in ("train", "test"))
        assert len(train) == len(test) == 100  # no repeats within a split either
        assert not train & test, generate.__name__

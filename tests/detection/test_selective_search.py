"""Selective search (OpenCV's implementation): it finds flat-coloured objects, its output is a
reproducible set in the input's pixels, and bad settings are refused."""

import re

import numpy as np
import pytest

from cnnjax.detection.selective_search import pixel_levels, selective_search

# Three flat-coloured rectangles (x1, y1, x2, y2) on a dark, slightly textured background.
OBJECTS = np.array([[4, 6, 24, 30], [34, 8, 58, 22], [20, 38, 50, 60]], np.float64)
COLOURS = ((230, 40, 40), (40, 200, 60), (50, 80, 240))


def _scene() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(10, 30, size=(64, 64, 3)).astype(np.uint8)
    for (x1, y1, x2, y2), colour in zip(OBJECTS.astype(int), COLOURS, strict=True):
        image[y1:y2, x1:x2] = colour
    return image


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU, float64 (the reference for the recall check)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area = lambda z: np.prod(z[:, 2:] - z[:, :2], axis=-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


@pytest.mark.parametrize("strategy,scale", [("fast", 1.0), ("fast", 2.0), ("quality", 1.0)])
def test_every_object_gets_a_tight_proposal(strategy, scale):
    boxes = selective_search(_scene(), strategy=strategy, scale=scale)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert 3 <= len(boxes) < 500
    # Each rectangle is one segment: some proposal is that rectangle (up to the upsampling's
    # half-pixel rounding).
    assert (_iou(OBJECTS, boxes).max(axis=1) >= 0.9).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()


@pytest.mark.parametrize("shape, scale", [((30, 75), 0.3), ((41, 53), 1.5), ((64, 64), 2.0)])
def test_boxes_map_back_by_the_actual_resize_factors(shape, scale):
    # cv2.resize makes round(75 * 0.3) = 22 (or 23) columns, not 22.5: the hierarchy's root
    # region (the whole resized image, always among OpenCV's rects) must come back as exactly
    # the whole input image (tolerance: float32 rounding, 1e-4 px), not 22 / 0.3 = 73.3.
    image = np.random.default_rng(1).integers(0, 255, size=shape + (3,)).astype(np.uint8)
    boxes = selective_search(image, scale=scale)
    height, width = shape
    whole = np.abs(boxes - np.array([0, 0, width, height], np.float32)).max(axis=1)
    assert whole.min() <= 1e-4


def test_a_reproducible_sorted_set():
    boxes = selective_search(_scene(), scale=2.0)
    np.testing.assert_array_equal(boxes, selective_search(_scene(), scale=2.0))
    np.testing.assert_array_equal(boxes, np.unique(boxes, axis=0))  # sorted, no duplicates
    few = selective_search(_scene(), scale=2.0, max_boxes=5)
    assert len(few) == 5 and {tuple(b) for b in few} <= {tuple(b) for b in boxes}
    np.testing.assert_array_equal(few, selective_search(_scene(), scale=2.0, max_boxes=5))
    np.testing.assert_array_equal(selective_search(_scene(), max_boxes=10_000),
                                  selective_search(_scene()))


def test_grey_images_are_searched_as_rgb():
    grey = _scene()[..., 0]
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_array_equal(selective_search(grey), selective_search(rgb))
    np.testing.assert_array_equal(selective_search(grey[..., None]), selective_search(rgb))
    np.testing.assert_array_equal(selective_search(rgb.astype(np.float32)),
                                  selective_search(rgb))


@pytest.mark.parametrize("kwargs,message", [
    ({"strategy": "slow"}, "selective_search: strategy='slow' is invalid; expected one of "
                           "['fast', 'quality']."),
    ({"scale": 0}, "selective_search: scale=0 is invalid; expected a number in [0.25, 8]"),
    ({"scale": True}, "selective_search: scale=True is invalid"),
    ({"max_boxes": 0}, "selective_search: max_boxes=0 is invalid; expected a positive integer."),
    ({"image": np.zeros((8, 8, 2))}, "selective_search: image='array of shape (8, 8, 2)' is "
                                     "invalid; expected [H, W, 3], [H, W, 1] or [H, W]"),
    # These were an OpenCV assertion error (an empty resize), or searched silently after a cast
    # to uint8 (NaN: undefined values; complex: the imaginary part dropped; bool: 0/1 pixels).
    ({"image": np.zeros((2, 2, 3), np.uint8), "scale": 0.25},
     "selective_search: scale=0.25 is invalid; expected at least 2 pixels per side once "
     "scaled: the 2x2 image would be 0x0."),
    ({"image": np.zeros((5, 40), np.uint8), "scale": 0.25},
     "selective_search: scale=0.25 is invalid; expected at least 2 pixels per side once "
     "scaled: the 5x40 image would be 1x10."),
    ({"image": np.full((8, 8, 3), np.nan)},
     "selective_search: image='an array with NaN or infinite values' is invalid; expected "
     "finite values in [0, 255]."),
    # A normalized image and a 16-bit one were clipped to uint8 and segmented as near-flat.
    ({"image": np.linspace(-2.0, 2.0, 192).reshape(8, 8, 3)},
     "selective_search: image='<float64 values in [-2.0, 2.0]>' is invalid; expected values in "
     "[0, 255] (pixel levels, not normalized to [0, 1] or [-1, 1], nor 16-bit)."),
    ({"image": np.full((8, 8, 3), 1000, np.uint16)},
     "selective_search: image='<uint16 values in [1000, 1000]>' is invalid; expected values in "
     "[0, 255]"),
    # ... and a [0, 1] float image passed, segmented as 0/1 levels (one box for three objects)
    ({"image": np.linspace(0.0, 1.0, 192, dtype=np.float32).reshape(8, 8, 3)},
     "selective_search: image='<float32 values in [0.0, 1.0]>' is invalid; expected values in "
     "[0, 255] (pixel levels, not normalized to [0, 1]"),
    ({"image": np.ones((8, 8, 3), complex)},
     "selective_search: image.dtype='complex128' is invalid; expected uint8"),
    ({"image": np.ones((8, 8, 3), bool)}, "selective_search: image.dtype='bool' is invalid"),
    ({"image": np.full((8, 8, 3), "a")}, "selective_search: image.dtype='<U1' is invalid"),
])
def test_bad_settings(kwargs, message):
    image = kwargs.pop("image", _scene())
    with pytest.raises(ValueError, match=re.escape(message)):
        selective_search(image, **kwargs)


def test_float_pixel_levels_are_rounded_not_truncated():
    """254.9 was cast to 254; a float image of levels is searched as its rounded uint8 twin (and
    an all-zero float image is no normalized one: searched, not refused)."""
    np.testing.assert_array_equal(pixel_levels(np.array([254.9, 0.4, 127.5, 3.0])),
                                  np.array([255, 0, 128, 3], np.uint8))
    scene = _scene()
    jittered = scene.astype(np.float64) + np.where(scene > 127, -0.4, 0.4)
    np.testing.assert_array_equal(selective_search(jittered), selective_search(scene))
    selective_search(np.zeros((16, 16, 3), np.float32))


def test_a_numpy_float32_scale_is_a_number():
    np.testing.assert_array_equal(selective_search(_scene(), scale=np.float32(2.0)),
                                  selective_search(_scene(), scale=2.0))


def test_the_smallest_scaled_image_is_searched():
    """6 rows at scale 0.3 become cv2.resize's round(1.8) = 2: searched, not refused."""
    image = np.random.default_rng(2).integers(0, 255, size=(6, 40, 3)).astype(np.uint8)
    boxes = selective_search(image, scale=0.3)
    assert len(boxes) >= 1 and (boxes[:, 2:] <= [40, 6]).all()

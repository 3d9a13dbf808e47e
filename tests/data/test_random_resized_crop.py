"""The `random_resized_crop_flip` training crop against torchvision's
`RandomResizedCrop.get_params` where sampling cannot succeed, computed by
`tests.data.torchvision_resized_crop` (in this process: tests/conftest.py imports torchvision
before TensorFlow, the order that works).

On an image of extreme aspect ratio no crop of 8%-100% of its area with an aspect ratio in
[3/4, 4/3] fits, so all 10 attempts fail for any seed; torchvision then takes a centred crop whose
aspect ratio is clamped to that range (the full short side), not the whole image.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from cnnjax.data.transforms import _random_resized_crop, _random_resized_crop_box

# (height, width): wide and tall strips where every attempt of torchvision's (and TF's) sampling
# fails: a crop of >= 8% of the area with aspect ratio <= 4/3 is taller than the image.
EXTREME_SHAPES = [(1, 100), (100, 1), (2, 64), (64, 2), (4, 100), (100, 4), (5, 300), (300, 5),
                  (7, 1000)]
SEEDS = list(range(8))


@pytest.fixture(scope="module")
def torchvision_boxes(tmp_path_factory) -> np.ndarray:
    """torchvision's `(top, left, height, width)`, `[shape, seed, 4]`."""
    pytest.importorskip("torchvision")
    root = tmp_path_factory.mktemp("torchvision_resized_crop")
    src, dst = root / "in.npz", root / "out.npz"
    np.savez(src, shapes=np.array(EXTREME_SHAPES), seeds=np.array(SEEDS))
    # In this process: tests/conftest.py imports torchvision before TensorFlow, the order that
    # works (a subprocess spent ~4-8 s of the cold suite importing torch again).
    from tests.data import torchvision_resized_crop

    torchvision_resized_crop.main(str(src), str(dst))
    return np.load(dst)["boxes"]


def _coordinates(h: int, w: int) -> np.ndarray:
    """float32 `[h, w, 2]`: each pixel's row and column (a crop shows where it was taken)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows, cols], axis=-1).astype(np.float32)


@pytest.mark.parametrize("k", range(len(EXTREME_SHAPES)))
def test_failed_sampling_falls_back_to_torchvisions_centre_crop(torchvision_boxes, k):
    """All 10 attempts fail: the crop is torchvision's clamped centre crop (e.g. the 4x5 middle
    of a 4x100 strip, left 47), not the whole strip squeezed to the output size."""
    h, w = EXTREME_SHAPES[k]
    boxes = torchvision_boxes[k]
    assert (boxes == boxes[0]).all(), boxes  # the fallback: the same for every seed
    top, left, crop_h, crop_w = boxes[0].tolist()
    assert (crop_h, crop_w) != (h, w)  # not the whole image: its aspect is out of range
    image = _coordinates(h, w)
    want = image[top:top + crop_h, left:left + crop_w]
    for seed in range(16):
        # Output size = the crop's: the resize is an identity, the pixels are the crop's.
        got = _random_resized_crop(tf.constant(image), (crop_h, crop_w, 2),
                                   tf.constant([seed, 7], tf.int64)).numpy()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(24, 30), (30, 24), (9, 40), (40, 9)])
def test_images_in_or_near_the_ratio_range_still_get_random_crops(shape):
    """Sampling that succeeds is unchanged: crops of one image vary with the seed, and each
    lies inside it with an aspect ratio near [3/4, 4/3]."""
    h, w = shape
    image = _coordinates(h, w)
    corners = set()
    for seed in range(40):
        got = _random_resized_crop(tf.constant(image), (h, w, 2),
                                   tf.constant([seed, 1], tf.int64)).numpy()
        corners.add((round(float(got[0, 0, 0]), 3), round(float(got[0, 0, 1]), 3)))
    assert len(corners) >= 10, corners


def _area_and_ratio(heights_widths: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Each crop's fraction of a `side` x `side` image's area, and its aspect ratio w / h."""
    hw = heights_widths.astype(np.float64)
    return hw[:, 0] * hw[:, 1] / side**2, hw[:, 1] / hw[:, 0]


def test_crop_area_and_ratio_ranges_are_torchvisions(tmp_path):
    """On a 300x300 image over 1000 seeds the crops span 8%-100% of the area at aspect ratio
    3/4-4/3, as torchvision's `get_params` (scale (0.08, 1), ratio (3/4, 4/3)) on the same seeds:
    the smallest area is ~0.08 (not e.g. 0.25), the extreme ratios ~3/4 and ~4/3.

    Only the ranges are compared: TF draws the height uniformly, torchvision the area, so the
    distributions inside them differ (area quantiles by up to ~0.1 of the image).
    """
    pytest.importorskip("torchvision")
    side, n = 300, 1000
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, shapes=np.array([(side, side)]), seeds=np.arange(n))
    from tests.data import torchvision_resized_crop

    torchvision_resized_crop.main(str(src), str(dst))
    want_area, want_ratio = _area_and_ratio(np.load(dst)["boxes"][0, :, 2:], side)

    @tf.function
    def crop_sizes(seeds: tf.Tensor) -> tf.Tensor:
        return tf.map_fn(lambda s: _random_resized_crop_box(tf.constant([side, side, 3]), s)[1][:2],
                         seeds, fn_output_signature=tf.int32)

    seeds = tf.stack([tf.range(n, dtype=tf.int64), tf.fill([n], tf.constant(7, tf.int64))], 1)
    area, ratio = _area_and_ratio(crop_sizes(seeds).numpy(), side)
    # Measured: min area 0.0800 (torchvision 0.0809), max 0.967 (0.977); ratio 0.748-1.333
    # (0.748-1.333). Over 1000 draws the extremes come within ~0.005 of the bounds.
    for a, r in ((area, ratio), (want_area, want_ratio)):
        assert 0.075 <= a.min() < 0.085 and 0.9 < a.max() <= 1.0, (a.min(), a.max())
        assert 0.74 <= r.min() < 0.765 and 1.31 < r.max() <= 1.345, (r.min(), r.max())
    assert abs(area.min() - want_area.min()) < 0.005

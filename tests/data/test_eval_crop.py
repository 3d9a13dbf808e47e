"""The `resize_center_crop` eval transform against torchvision's `Resize(n)` + `CenterCrop(size)`
(the transform torchvision's ImageNet weights were evaluated with), computed by
`tests.data.torchvision_center_crop` (in this process: tests/conftest.py imports torchvision
before TensorFlow, the order that works).

Geometry is compared exactly: the resized size (torchvision truncates `int(n * long / short)`)
and the crop's top/left corner (`int(round((side - size) / 2))`, Python's round: ties to even),
on 200 random sizes, both orientations, squares, sizes whose offset is a tie and crop sizes whose
resize `round(size / crop_fraction)` rounds up (32, 299). Pixels are compared with torchvision's
tensor path (`antialias=True`, the same triangle filter as TF's antialiased bilinear resize) to
2e-6 (float32 rounding; measured <= 1.2e-6, i.e. 3e-4 grey levels); a resized side one pixel
long, or an offset off by one, is off by >= 9e-4 on the ramp. (torchvision's PIL-image path
differs from both by PIL's 8-bit output: <= 1 grey level.)
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from cnnjax.data.transforms import _center_crop_geometry, _resize_shorter_center_crop

CROP_FRACTION = 0.875
# (h, w, size): landscape/portrait ImageNet-like shapes, squares and near-squares, the small
# imagenette test size (64 -> resize to 73), and shapes whose crop offset is a tie rounding up
# (73 x 75 at 64: (75 - 64) / 2 = 5.5 -> 6) or down (320 x 427: (341 - 224) / 2 = 58.5 -> 58).
PIXEL_CASES = [(320, 427, 224), (427, 320, 224), (375, 500, 224), (500, 333, 224),
               (256, 256, 224), (257, 259, 224), (100, 150, 64), (150, 100, 64), (73, 75, 64),
               (79, 73, 64)]
# Sizes whose resize rounds up (32 / 0.875 = 36.57 -> 37, 299 / 0.875 = 341.71 -> 342), where a
# truncating int(size / crop_fraction) resizes one pixel short; both orientations and a square.
ROUNDED_UP_CASES = [(500, 400, 32), (400, 500, 32), (37, 37, 32), (375, 500, 299),
                    (500, 375, 299), (342, 342, 299)]


def _images(h: int, w: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A linear ramp (any resampling error shows) and uniform noise, float32 in [0, 1]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = np.stack([x + y, 2 * y, 255 - x], axis=-1) / 1000.0
    return [ramp, rng.random((h, w, 3), dtype=np.float32)]


@pytest.fixture(scope="module")
def torchvision_reference(tmp_path_factory) -> tuple[list, dict]:
    """(cases, torchvision's outputs) for PIXEL_CASES (with images) and 200 random sizes."""
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(0)
    random_sizes = rng.integers(120, 700, (200, 2))
    cases = PIXEL_CASES + ROUNDED_UP_CASES + [(int(h), int(w), 224 if min(h, w) >= 256 else 64)
                                              for h, w in random_sizes]
    data = {"cases": np.array(cases), "crop_fraction": np.float64(CROP_FRACTION)}
    images = {}
    for k, (h, w, _) in enumerate(PIXEL_CASES):
        for j, image in enumerate(_images(h, w, rng)):
            images[(k, j)] = image
    root = tmp_path_factory.mktemp("torchvision_center_crop")
    # The script takes one image per case: one run with
    # the PIXEL_CASES repeated after `cases` for the noise images, the ramps on the first ones.
    first, second = 0, len(cases)
    data["cases"] = np.array(cases + PIXEL_CASES)
    src, dst = root / "in.npz", root / "out.npz"
    np.savez(src, **data, **{f"image_{start + k}": images[(k, j)]
                             for j, start in enumerate((first, second))
                             for k in range(len(PIXEL_CASES))})
    # In this process: tests/conftest.py imports torchvision before TensorFlow, the order that
    # works (a subprocess spent ~6-15 s of the cold suite importing torch again).
    from tests.data import torchvision_center_crop

    torchvision_center_crop.main(str(src), str(dst))
    out = dict(np.load(dst))
    outputs = {j: {"resized": out["resized"][:second], "offsets": out["offsets"][:second],
                   **{f"crop_{k}": out[f"crop_{start + k}"] for k in range(len(PIXEL_CASES))}}
               for j, start in enumerate((first, second))}
    return cases, {"images": images, "outputs": outputs}


def test_resized_size_and_crop_offsets_equal_torchvision(torchvision_reference):
    cases, ref = torchvision_reference
    out = ref["outputs"][0]
    got_hw, got_offsets = [], []
    for h, w, size in cases:
        new_hw, top_left = _center_crop_geometry(tf.constant([h, w]), size, CROP_FRACTION)
        got_hw.append(new_hw.numpy().tolist())
        got_offsets.append(top_left.numpy().tolist())
    np.testing.assert_array_equal(got_hw, out["resized"])
    np.testing.assert_array_equal(got_offsets, out["offsets"])
    # The cases exercise what a rounded resize or a floored offset gets wrong:
    n = np.array([round(size / CROP_FRACTION) for _, _, size in cases])
    hw = np.array([(h, w) for h, w, _ in cases])
    rounded_long = np.rint(hw.max(1) * n / hw.min(1)).astype(int)
    assert (rounded_long != out["resized"].max(1)).sum() > 50
    excess = out["resized"] - np.array([size for _, _, size in cases])[:, None]
    assert ((excess % 4 == 3) & (out["offsets"] == excess // 2 + 1)).any()  # tie rounded up
    assert ((excess % 4 == 1) & (out["offsets"] == excess // 2)).any()  # tie rounded down


@pytest.mark.parametrize("k", range(len(PIXEL_CASES)))
def test_eval_crop_pixels_equal_torchvision(torchvision_reference, k):
    _, ref = torchvision_reference
    h, w, size = PIXEL_CASES[k]
    for j in range(2):
        ours = _resize_shorter_center_crop(tf.constant(ref["images"][(k, j)]), size,
                                           CROP_FRACTION).numpy()
        want = ref["outputs"][j][f"crop_{k}"]
        assert ours.shape == want.shape == (size, size, 3)
        np.testing.assert_allclose(ours, want, rtol=0, atol=2e-6)

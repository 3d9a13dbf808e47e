"""Anchors against py-faster-rcnn's published `generate_anchors` table and a float64 NumPy
re-implementation of its reference code (inclusive pixel coordinates, converted explicitly)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.detection.anchors import anchor_grid, anchors_inside, generate_anchors

# py-faster-rcnn lib/rpn/generate_anchors.py, output of generate_anchors() (base 16, ratios
# (0.5, 1, 2), scales (8, 16, 32)), in its inclusive (x1, y1, x2, y2) pixel indices.
PUBLISHED = np.array([
    [-84, -40, 99, 55],
    [-176, -88, 191, 103],
    [-360, -184, 375, 199],
    [-56, -56, 71, 71],
    [-120, -120, 135, 135],
    [-248, -248, 263, 263],
    [-36, -80, 51, 95],
    [-80, -168, 95, 183],
    [-168, -344, 183, 359],
], dtype=np.float64)


def _inclusive_to_continuous(boxes):
    """Inclusive pixel indices (x2 is the last pixel) -> continuous corners (x2 = last + 1)."""
    return boxes + np.array([0, 0, 1, 1], dtype=np.float64)


# ------------------------------------------------ the reference algorithm, inclusive coordinates


def _whctrs(anchor):
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)


def _mkanchors(ws, hs, x_ctr, y_ctr):
    ws, hs = ws[:, None], hs[:, None]
    return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                      x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))


def _reference_anchors(base_size, ratios, scales):
    base = np.array([1, 1, base_size, base_size], dtype=np.float64) - 1
    w, h, x_ctr, y_ctr = _whctrs(base)
    size_ratios = (w * h) / np.asarray(ratios, np.float64)
    ws = np.round(np.sqrt(size_ratios))
    hs = np.round(ws * np.asarray(ratios, np.float64))
    ratio_anchors = _mkanchors(ws, hs, x_ctr, y_ctr)
    out = []
    for anchor in ratio_anchors:
        w, h, x_ctr, y_ctr = _whctrs(anchor)
        out.append(_mkanchors(w * np.asarray(scales, np.float64),
                              h * np.asarray(scales, np.float64), x_ctr, y_ctr))
    return np.vstack(out)


def _reference_grid(base_anchors, height, width, stride):
    shift_x, shift_y = np.meshgrid(np.arange(width) * stride, np.arange(height) * stride)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(),
                        shift_y.ravel())).transpose()
    a, k = base_anchors.shape[0], shifts.shape[0]
    return (base_anchors.reshape(1, a, 4) + shifts.reshape(k, 1, 4)).reshape(k * a, 4)


# ------------------------------------------------------------------------------- tests


def test_generate_anchors_matches_published_table():
    np.testing.assert_array_equal(generate_anchors(16, (0.5, 1, 2), (8, 16, 32)),
                                  _inclusive_to_continuous(PUBLISHED))
    np.testing.assert_array_equal(generate_anchors(), _inclusive_to_continuous(PUBLISHED))


def test_reference_reimplementation_reproduces_published_table():
    np.testing.assert_array_equal(_reference_anchors(16, (0.5, 1, 2), (8, 16, 32)), PUBLISHED)


@pytest.mark.parametrize("base_size, ratios, scales", [
    (8, (0.3, 1.7, 2.5), (2, 5)),
    (32, (1.0,), (0.5, 1.0, 4.0)),
    (7, (0.25, 0.5, 1, 2, 4), (3,)),  # odd base: centres at half pixels
])
def test_generate_anchors_matches_reference_code(base_size, ratios, scales):
    expected = _inclusive_to_continuous(_reference_anchors(base_size, ratios, scales))
    np.testing.assert_allclose(generate_anchors(base_size, ratios, scales), expected,
                               rtol=0, atol=1e-12)


def test_generate_anchors_hand_values():
    # Ratio 1, scale 1: the base box itself; ratio 2 (h = 2w) at base 4: w = round(sqrt(8)) = 3,
    # h = 6, centred on (2, 2).
    np.testing.assert_array_equal(generate_anchors(16, (1,), (1,)), [[0, 0, 16, 16]])
    np.testing.assert_array_equal(generate_anchors(4, (2,), (1,)), [[0.5, -1, 3.5, 5]])


def test_anchor_grid_matches_reference_shifts_and_order():
    base = generate_anchors()
    height, width, stride = 3, 5, 16
    grid = np.asarray(anchor_grid((height, width), stride, base))
    expected = _inclusive_to_continuous(_reference_grid(PUBLISHED, height, width, stride))
    assert grid.shape == (height * width * 9, 4) and grid.dtype == np.float32
    np.testing.assert_array_equal(grid, expected)
    # Row (i * W + j) * A + a is base anchor a shifted to cell (i, j).
    i, j, a = 2, 3, 7
    np.testing.assert_array_equal(grid[(i * width + j) * 9 + a],
                                  base[a] + np.array([j, i, j, i]) * stride)


def test_anchor_grid_centres_on_cells_and_runs_under_jit():
    grid = jax.jit(partial(anchor_grid, (2, 4), 8))(generate_anchors(8, (0.5, 1, 2), (1, 2)))
    centres = (np.asarray(grid)[:, :2] + np.asarray(grid)[:, 2:]) / 2
    rows, cols = np.divmod(np.arange(2 * 4).repeat(6), 4)
    np.testing.assert_array_equal(centres, np.stack([(cols + 0.5) * 8, (rows + 0.5) * 8], 1))


def test_anchors_inside_keeps_boxes_ending_exactly_at_the_edge():
    """A box whose far side lies on the image edge (or on the edge + border) is inside: in
    py-faster-rcnn's inclusive pixel indices its last pixel is x2 - 1 = W - 1 < W + border."""
    boxes = np.array([[0, 0, 16, 16], [-2, -2, 18, 18], [0, 0, 17, 16], [0, 0, 16, 17],
                      [-3, 0, 16, 16], [-2, -2, 19, 18]], np.float64)  # integer pixel edges

    def reference(border):  # anchor_target_layer's filter on inclusive coordinates
        inclusive = boxes - np.array([0, 0, 1, 1])
        return ((inclusive[:, 0] >= -border) & (inclusive[:, 1] >= -border)
                & (inclusive[:, 2] < 16 + border) & (inclusive[:, 3] < 16 + border))

    np.testing.assert_array_equal(reference(0), [True, False, False, False, False, False])
    np.testing.assert_array_equal(reference(2), [True, True, True, True, False, False])
    for border in (0, 2):
        got = anchors_inside(boxes.astype(np.float32), (16, 16), border=border)
        np.testing.assert_array_equal(np.asarray(got), reference(border))


def test_anchors_inside_matches_reference_filter():
    rng = np.random.default_rng(0)
    height, width, border = 50, 70, 3
    boxes = np.sort(rng.integers(-10, 80, size=(200, 2, 2)), axis=1).transpose(0, 2, 1)
    boxes = boxes.reshape(200, 4)[:, [0, 2, 1, 3]].astype(np.float64)  # x1, y1, x2, y2
    inclusive = boxes - np.array([0, 0, 1, 1])
    # py-faster-rcnn anchor_target_layer, allowed_border, inclusive coordinates.
    expected = ((inclusive[:, 0] >= -border) & (inclusive[:, 1] >= -border)
                & (inclusive[:, 2] < width + border) & (inclusive[:, 3] < height + border))
    assert 0 < expected.sum() < 200
    got = anchors_inside(boxes.astype(np.float32), (height, width), border=border)
    np.testing.assert_array_equal(np.asarray(got), expected)
    per_image = jax.vmap(anchors_inside, in_axes=(None, 0))(
        boxes.astype(np.float32), np.array([[height, width], [height, width]], np.float32))
    assert per_image.shape == (2, 200)
    np.testing.assert_array_equal(np.asarray(per_image[0]),
                                  np.asarray(anchors_inside(boxes, (height, width))))


@pytest.mark.parametrize("call, message", [
    (lambda: generate_anchors(0), "generate_anchors: base_size=0 is invalid; expected a positive"),
    (lambda: generate_anchors(16, ()), "generate_anchors: ratios=() is invalid; expected a "
                                       "non-empty sequence of positive numbers."),
    (lambda: generate_anchors(16, (0.5, 0)), "generate_anchors: ratios=(0.5, 0) is invalid"),
    (lambda: generate_anchors(16, (1,), (-8,)), "generate_anchors: scales=(-8,) is invalid"),
    (lambda: generate_anchors(16, (1,), (True,)), "generate_anchors: scales=(True,) is "
                                                  "invalid"),  # was read as 1.0
    (lambda: generate_anchors(16, ("0.5", "2")), "generate_anchors: ratios=('0.5', '2') is "
                                                 "invalid"),  # were read as numbers
    (lambda: generate_anchors(1, (1000,)), "generate_anchors: ratios=(1000,) is invalid; ratio "
                                           "1000 rounds a side of the 1x1 base box to 0 pixels."),
    (lambda: anchor_grid((0, 3), 16, np.zeros((1, 4))), "anchor_grid: feature_size=(0, 3) is "
                                                         "invalid"),
    (lambda: anchor_grid(4, 0, np.zeros((1, 4))), "anchor_grid: stride=0 is invalid; expected a "
                                                   "positive integer."),
    (lambda: anchor_grid(4, 16, np.zeros(4)), "anchor_grid: base_anchors.shape=(4,) is invalid"),
    (lambda: anchor_grid(4, 16, []), "anchor_grid: base_anchors.shape=(0,) is invalid"),
    # NaN or inverted base anchors gave a grid of NaN or inverted anchors silently
    (lambda: anchor_grid(4, 16, np.array([[0.0, 0, 8, 8], [0, 0, np.nan, 4]])),
     "anchor_grid: base_anchors[1]=[0.0, 0.0, nan, 4.0] is invalid; expected a positive finite "
     "width and height (x1 < x2, y1 < y2)."),
    (lambda: anchor_grid(4, 16, jnp.array([[4.0, 4, 0, 0]])),
     "anchor_grid: base_anchors[0]=[4.0, 4.0, 0.0, 0.0] is invalid"),
    # uint8 wrapped past 255 px, int32 truncated the .5 corners, bfloat16 rounded them
    (lambda: anchor_grid(28, 8, np.array([[0.0, 0, 8, 8]]), dtype=jnp.uint8),
     "anchor_grid: dtype='uint8' is invalid; expected float32 or float64."),
    (lambda: anchor_grid(28, 8, np.array([[0.0, 0, 8, 8]]), dtype=jnp.bfloat16),
     "anchor_grid: dtype='bfloat16' is invalid"),
    (lambda: anchor_grid(28, 8, np.array([[0.0, 0, 8, 8]]), dtype="float8"),
     "anchor_grid: dtype='float8' is invalid"),
    (lambda: anchors_inside(np.zeros((3, 3)), (4, 4)), "anchors_inside: boxes.shape=(3, 3) is "
                                                       "invalid"),
    (lambda: anchors_inside(np.zeros((3, 4)), (4, 0)), "anchors_inside: image_size=(4, 0) is "
                                                       "invalid; expected (height, width), two "
                                                       "positive numbers."),
    (lambda: anchors_inside(np.zeros((3, 4)), np.ones(3)), "anchors_inside: image_size.shape=(3,)"
                                                           " is invalid"),
    (lambda: anchors_inside(np.zeros((3, 4)), (4, 4), border=-1), "anchors_inside: border=-1 is "
                                                                  "invalid; expected a finite "
                                                                  "number >= 0."),
])
def test_errors(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


@pytest.mark.parametrize("stride, ratios, scales, grid", [
    (16, (0.5, 1.0, 2.0), (8.0, 16.0, 32.0), (5, 7)),  # the paper's VGG-16 setting
    (8, (0.5, 1.0, 2.0), (1.5, 3.0), (8, 8)),  # faster_rcnn_small
    (8, (0.25, 1.0, 3.0), (2.0, 4.0), (3, 5)),
])
def test_anchor_grid_against_torchvision_anchor_generator(stride, ratios, scales, grid):
    """torchvision's `AnchorGenerator(sizes=stride * scales)`: the same rows (cells row-major,
    ratios then scales), aspect ratio h / w, centres half a stride earlier (torchvision centres
    on the cell's corner, py-faster-rcnn on its centre) and sides within the reference's
    rounding: py-faster-rcnn rounds the `stride`-px base box before scaling, so a side may be
    off by a few px times the scale (plus 1 px for torchvision's rounding of each corner)."""
    torch = pytest.importorskip("torch")
    anchor_utils = pytest.importorskip("torchvision.models.detection.anchor_utils")
    image_list = pytest.importorskip("torchvision.models.detection.image_list")
    size = (grid[0] * stride, grid[1] * stride)
    generator = anchor_utils.AnchorGenerator(sizes=(tuple(stride * s for s in scales),),
                                             aspect_ratios=(ratios,))
    images = image_list.ImageList(torch.zeros(1, 3, *size), [size])
    want = generator(images, [torch.zeros(1, 1, *grid)])[0].double().numpy()
    got = np.asarray(anchor_grid(grid, stride, generate_anchors(stride, ratios, scales)),
                     np.float64)
    assert got.shape == want.shape
    centre = lambda b: (b[:, :2] + b[:, 2:]) / 2  # noqa: E731
    np.testing.assert_allclose(centre(got) - stride / 2, centre(want), atol=0.5)
    # Per base anchor (ratio r outer, scale s inner): the width ws = round(...) is off by
    # <= 1/2 px before scaling, the height round(ws * r) by <= (1 + r) / 2.
    r, s = (np.asarray(v, np.float64).reshape(-1) for v in np.meshgrid(ratios, scales,
                                                                       indexing="ij"))
    for axis, tolerance in ((0, s / 2), (1, (1 + r) * s / 2)):
        diff = np.abs((got[:, 2 + axis] - got[:, axis]) - (want[:, 2 + axis] - want[:, axis]))
        assert np.all(diff.reshape(-1, len(r)) <= tolerance + 1), diff.max()

"""RoI ops checked against tf.image.crop_and_resize / non_max_suppression and float64 NumPy
re-implementations of torchvision's roi_align and roi_pool kernels."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.test_util import check_grads

from cnnjax.layers import roi as roi_module
from cnnjax.layers.pooling import spatial_pyramid_pool
from cnnjax.layers.roi import box_iou, nms, roi_align, roi_pool, roi_spatial_pyramid_pool

RTOL, ATOL = 1e-4, 1e-5


def _features(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _random_boxes(rng, count, width, height, low=0.0):
    """Random (x1, y1, x2, y2) boxes inside [low, width - low] x [low, height - low]."""
    xs = np.sort(rng.uniform(low, width - low, size=(count, 2)), axis=1)
    ys = np.sort(rng.uniform(low, height - low, size=(count, 2)), axis=1)
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)


# ---------------------------------------------------------------- float64 references


def _bilinear_ref(image, y, x):
    """torchvision's bilinear_interpolate (roi_align_kernel.cpp), one point, float64."""
    height, width = image.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(image.shape[2])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * image[y_low, x_low] + hy * lx * image[y_low, x_high]
            + ly * hx * image[y_high, x_low] + ly * lx * image[y_high, x_high])


def _adaptive_counts(box, scale, offset, aligned, output_size):
    """torchvision's adaptive samples per bin side, `ceil(roi_h / out_h)` and `ceil(roi_w /
    out_w)`, in its float32 arithmetic: one rounding per step (a box's size on the map can lie
    an ulp either side of a multiple of the output size, and the count follows that ulp)."""
    f32 = np.float32
    x1, y1, x2, y2 = (f32(v) * f32(scale) - f32(offset) for v in box)
    roi_h, roi_w = f32(y2 - y1), f32(x2 - x1)
    if not aligned:
        roi_h, roi_w = max(roi_h, f32(1)), max(roi_w, f32(1))
    return (math.ceil(f32(roi_h / f32(output_size[0]))),
            math.ceil(f32(roi_w / f32(output_size[1]))))


def _roi_align_ref(features, boxes, batch_indices, output_size, scale, sampling_ratio, aligned):
    features, boxes = features.astype(np.float64), boxes.astype(np.float64)
    out_h, out_w = output_size
    out = np.zeros((len(boxes), out_h, out_w, features.shape[3]))
    offset = 0.5 if aligned else 0.0
    for k, (box, b) in enumerate(zip(boxes, batch_indices, strict=True)):
        x1, y1, x2, y2 = box * scale - offset
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h, grid_w = (sampling_ratio,) * 2 if sampling_ratio > 0 else _adaptive_counts(
            box, scale, offset, aligned, output_size)
        count = max(grid_h * grid_w, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                total = np.zeros(features.shape[3])
                for iy in range(grid_h):
                    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total += _bilinear_ref(features[b], y, x)
                out[k, ph, pw] = total / count
    return out


def _roi_pool_bins_ref(shape, boxes, batch_indices, output_size, scale):
    """torchvision's roi_pool_kernel.cpp bins: `(k, image, ph, pw, h0, h1, w0, w1)` for each box
    and bin, with exact bin edges (C `round` is half away from zero)."""
    height, width = shape[1:3]
    out_h, out_w = output_size
    for k, (box, b) in enumerate(zip(boxes.astype(np.float64), batch_indices, strict=True)):
        x1, y1, x2, y2 = (int(math.floor(v * scale + 0.5)) for v in box)
        bin_h = Fraction(max(y2 - y1 + 1, 1), out_h)
        bin_w = Fraction(max(x2 - x1 + 1, 1), out_w)
        for ph in range(out_h):
            h0 = min(max(math.floor(ph * bin_h) + y1, 0), height)
            h1 = min(max(math.ceil((ph + 1) * bin_h) + y1, 0), height)
            for pw in range(out_w):
                w0 = min(max(math.floor(pw * bin_w) + x1, 0), width)
                w1 = min(max(math.ceil((pw + 1) * bin_w) + x1, 0), width)
                yield k, b, ph, pw, h0, h1, w0, w1


def _roi_pool_ref(features, boxes, batch_indices, output_size, scale):
    """torchvision's roi_pool forward in float64: each non-empty bin's max, else 0."""
    features = features.astype(np.float64)
    out = np.zeros((len(boxes), *output_size, features.shape[3]))
    for k, b, ph, pw, h0, h1, w0, w1 in _roi_pool_bins_ref(features.shape, boxes, batch_indices,
                                                            output_size, scale):
        if h1 > h0 and w1 > w0:
            out[k, ph, pw] = features[b, h0:h1, w0:w1].max(axis=(0, 1))
    return out


# ---------------------------------------------------------------- roi_align


def test_roi_align_matches_crop_and_resize_at_bin_centres():
    # aligned=True, sampling_ratio=1 samples one point per bin, at the bin centre:
    #   y_i = y1*s - 0.5 + (i + 0.5) * (y2 - y1)*s / out_h,  i = 0 .. out_h - 1.
    # crop_and_resize samples y_i = y1n*(H-1) + i * (y2n - y1n)*(H-1) / (out_h - 1), so the two
    # agree for normalized corners y1n = y_0 / (H-1) and y2n = y_{out_h-1} / (H-1) (same for x).
    # Boxes keep every sample inside [0, H-1], where both ops use plain bilinear interpolation.
    height, width, scale, (out_h, out_w) = 13, 11, 0.5, (3, 4)
    feats = _features((2, height, width, 5), seed=1)
    rng = np.random.default_rng(2)
    boxes = _random_boxes(rng, 6, width / scale, height / scale, low=2.0)
    batch = np.array([0, 1, 1, 0, 1, 0], np.int32)
    got = roi_align(feats, boxes, batch, (out_h, out_w), scale, sampling_ratio=1, aligned=True)

    s = boxes.astype(np.float64) * scale - 0.5
    bin_h, bin_w = (s[:, 3] - s[:, 1]) / out_h, (s[:, 2] - s[:, 0]) / out_w
    normalized = np.stack([
        (s[:, 1] + 0.5 * bin_h) / (height - 1), (s[:, 0] + 0.5 * bin_w) / (width - 1),
        (s[:, 1] + (out_h - 0.5) * bin_h) / (height - 1),
        (s[:, 0] + (out_w - 0.5) * bin_w) / (width - 1),
    ], axis=1)
    assert normalized.min() >= 0 and normalized.max() <= 1
    expected = tf.image.crop_and_resize(feats, normalized.astype(np.float32), batch,
                                        (out_h, out_w), method="bilinear").numpy()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_roi_align_matches_torchvision_reference(aligned, sampling_ratio):
    height, width, scale = 9, 11, 0.25
    feats = _features((2, height, width, 3), seed=3)
    rng = np.random.default_rng(4)
    boxes = _random_boxes(rng, 7, width / scale, height / scale)
    boxes[0] = [0.0, 0.0, width / scale, height / scale]  # Whole image: samples reach the borders.
    boxes[1] = [8.0, 8.0, 8.0, 10.0]  # Zero width: aligned=False forces it to one cell.
    batch = rng.integers(0, 2, size=7).astype(np.int32)
    got = roi_align(feats, boxes, batch, (3, 2), scale, sampling_ratio, aligned)
    expected = _roi_align_ref(feats, boxes, batch, (3, 2), scale, sampling_ratio, aligned)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_adaptive_counts_follow_torchvisions_float32_rounding(aligned):
    """Boxes 70k px wide at scale 0.1 with output 7 are k sample columns wide up to an ulp, so
    the adaptive count is k or k + 1 depending on float32 rounding. The kernel computed it with
    XLA:CPU's division, which is not correctly rounded (and fused the scaling into an FMA): 15%
    of these boxes got one sample more or fewer than torchvision's. Concrete boxes now get the
    host's IEEE float32 counts; torchvision itself is compared when installed."""
    feats = _features((1, 40, 40, 2), seed=8)
    starts = np.arange(0, 120) / 10 + 1.3
    boxes = np.concatenate([np.stack([starts, starts, starts + 70 * k, starts + 70 * k], axis=1)
                            for k in (1, 2, 3)]).astype(np.float32)
    batch = np.zeros(len(boxes), np.int32)
    got = np.asarray(roi_align(feats, boxes, batch, 7, 0.1, -1, aligned))
    expected = _roi_align_ref(feats, boxes, batch, (7, 7), 0.1, -1, aligned)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    try:
        import torch
        from torchvision.ops import roi_align as torchvision_roi_align
    except ImportError:
        return
    rois = torch.from_numpy(np.concatenate([batch[:, None].astype(np.float32), boxes], axis=1))
    theirs = torchvision_roi_align(torch.from_numpy(feats.transpose(0, 3, 1, 2)), rois, 7, 0.1,
                                   -1, aligned).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, theirs, rtol=RTOL, atol=ATOL)


# Boxes past a 13x13 map (AlexNet's 227-px image at stride 16) with a bilinear sample within an
# ulp of the map's far edge x = 13 or y = 13, where torchvision's sample switches from the last
# cell's value to 0: (dtype, box, output size, sampling ratio, aligned), found among 4,000
# random integer boxes each (about 1 in 2,000 differed from torchvision by up to 0.9).
_FAR_EDGE_SAMPLES = [
    (np.float32, [54.0, 150.0, 222.0, 189.0], 7, 2, True),  # x = 13.0 exactly; ours 13 + 1 ulp
    (np.float32, [42.0, 54.0, 191.0, 222.0], 7, -1, True),
    (np.float32, [181.0, 155.0, 217.0, 168.0], 7, 2, False),
    (np.float32, [46.0, 14.0, 214.0, 169.0], 7, -1, False),
    (np.float32, [70.0, 166.0, 135.0, 222.0], 6, -1, False),
    (np.float64, [167.0, 41.0, 223.0, 121.0], 6, 2, True),
    (np.float64, [48.0, 159.0, 134.0, 215.0], 6, 2, False),
]


@pytest.mark.parametrize("dtype,box,output_size,sampling_ratio,aligned", _FAR_EDGE_SAMPLES)
def test_samples_on_the_far_edge_of_the_map_follow_torchvisions_rounding(
        dtype, box, output_size, sampling_ratio, aligned):
    """torchvision reads a sample at x <= W (clamped to the last cell) and drops one at x > W,
    so a sample an ulp from the edge depends on its float rounding. The kernel divided the box
    size by the output size as XLA:CPU does, times a rounded reciprocal (10.5 / 7 = 1.5 + 1 ulp
    in float32), and dropped samples torchvision reads (or read ones it drops). Concrete boxes
    now get torchvision's sample coordinates, computed on the host in the input's dtype."""
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    with jax.enable_x64(dtype == np.float64):
        feats = np.random.default_rng(0).normal(size=(1, 13, 13, 2)).astype(dtype)
        boxes = np.array([box], dtype)
        got = np.asarray(roi_align(feats, boxes, np.array([0], np.int32), output_size, 1 / 16,
                                   sampling_ratio, aligned))
    rois = torch.from_numpy(np.concatenate([np.zeros((1, 1), dtype), boxes], axis=1))
    theirs = ops.roi_align(torch.from_numpy(feats.transpose(0, 3, 1, 2).copy()), rois,
                           output_size, 1 / 16, sampling_ratio, aligned)
    np.testing.assert_allclose(got, theirs.numpy().transpose(0, 2, 3, 1), rtol=RTOL, atol=ATOL)


def test_float64_features_round_as_torchvision_does_in_double():
    """torchvision computes box corners and adaptive counts in the input's dtype. In float64,
    45 * 0.7 = 31.499999999999996 rounds to column 31 (float32: 31.5 -> 32), and a box 8 - 1 ulp
    high gets 8 samples per bin side (float32: 8.000001 -> 9). Both were computed in float32."""
    with jax.enable_x64(True):
        feats = np.random.default_rng(3).normal(size=(1, 2, 64, 1))
        box = np.array([[45.0, 0.0, 45.0, 0.0]])
        got = roi_pool(feats, box, np.array([0]), 1, 0.7)
        assert got.dtype == jnp.float64 and float(got[0, 0, 0, 0]) == feats[0, :1, 31, 0].max()
        np.testing.assert_array_equal(got, _roi_pool_ref(feats, box, np.array([0]), (1, 1), 0.7))
        feats = np.random.default_rng(0).normal(size=(1, 7, 9, 1))
        box = np.array([[36.0, 3.24422058, 40.0, 43.24422058]])
        got = np.asarray(roi_align(feats, box, np.array([0]), 1, 0.2, -1, True))
        # On the map the box is 7.999999999999999 high and 0.7999999999999998 wide: 8 x 1
        # samples (float32 rounding gave 9 x 1), averaged by torchvision's bilinear rule.
        x1, y1, x2, y2 = box[0] * 0.2 - 0.5
        rows = [_bilinear_ref(feats[0], y1 + (i + 0.5) * (y2 - y1) / 8, (x1 + x2) / 2)
                for i in range(8)]
        np.testing.assert_allclose(got[0, 0, 0], np.mean(rows, axis=0), rtol=1e-12)
        try:
            import torch
            from torchvision.ops import roi_align as torchvision_roi_align
        except ImportError:
            return
        theirs = torchvision_roi_align(torch.from_numpy(feats.transpose(0, 3, 1, 2).copy()),
                                       torch.tensor([[0.0, *box[0]]], dtype=torch.float64),
                                       1, 0.2, -1, True).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(got, theirs, rtol=1e-12)


def test_roi_align_under_jit():
    feats = _features((2, 9, 9, 2), seed=5)
    boxes = _random_boxes(np.random.default_rng(6), 4, 9.0, 9.0)
    batch = np.array([1, 0, 1, 1], np.int32)
    fixed = jax.jit(lambda f, b, i: roi_align(f, b, i, 2, sampling_ratio=2))
    np.testing.assert_allclose(fixed(feats, boxes, batch),
                               _roi_align_ref(feats, boxes, batch, (2, 2), 1.0, 2, True),
                               rtol=RTOL, atol=ATOL)
    # Adaptive sampling needs a static grid under jit: max_sampling_ratio large enough is exact.
    adaptive = jax.jit(lambda f, b, i: roi_align(f, b, i, 2, sampling_ratio=0,
                                                 max_sampling_ratio=8))
    np.testing.assert_allclose(adaptive(feats, boxes, batch),
                               _roi_align_ref(feats, boxes, batch, (2, 2), 1.0, 0, True),
                               rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=r"^roi_align: sampling_ratio=-1 is invalid; adaptive "
                                         r"sampling \(<= 0\) needs concrete boxes"):
        jax.jit(lambda b: roi_align(feats, b, batch, 2))(boxes)
    # Boxes traced by grad alone (no jit) are refused alike, and the advice names that case.
    with pytest.raises(ValueError, match=r"with traced boxes \(under jit, grad or vmap\)"):
        jax.grad(lambda b: roi_align(feats, b, batch, 2).sum())(boxes)


def test_roi_align_gradients():
    with jax.enable_x64(True):
        feats = jnp.asarray(np.random.default_rng(7).normal(size=(2, 5, 6, 2)))
        boxes = np.array([[0.5, 1.0, 5.0, 4.5], [1.0, 0.0, 6.0, 3.0]])
        batch = np.array([1, 0], np.int32)
        fn = jax.jit(lambda f: roi_align(f, boxes, batch, (2, 3), sampling_ratio=2))
        check_grads(fn, (feats,), order=1, modes=("fwd", "rev"))


# ---------------------------------------------------------------- roi_pool


@pytest.fixture(params=["vectorized", "loop"])
def roi_pool_path(request, monkeypatch):
    """Runs a test with each of `roi_pool`'s two reductions (chosen by size, at trace time)."""
    if request.param == "loop":
        monkeypatch.setattr(roi_module, "_VECTORIZED_ROI_POOL_ELEMENTS", 0)
    roi_module._roi_pool.clear_cache()
    yield request.param
    roi_module._roi_pool.clear_cache()


@pytest.mark.parametrize("scale,output_size", [(1.0, (2, 2)), (0.5, (3, 2)), (0.25, (4, 3))])
def test_roi_pool_matches_torchvision_reference(scale, output_size, roi_pool_path):
    height, width = 11, 9
    feats = _features((2, height, width, 3), seed=8)
    rng = np.random.default_rng(9)
    boxes = _random_boxes(rng, 8, width / scale, height / scale)
    boxes[0] = [0.0, 0.0, width / scale, height / scale]
    boxes[1] = [1.0, 1.0, 1.0, 1.0]  # A point: one cell, several bins share it.
    batch = rng.integers(0, 2, size=8).astype(np.int32)
    got = roi_pool(feats, boxes, batch, output_size, scale)
    np.testing.assert_allclose(got, _roi_pool_ref(feats, boxes, batch, output_size, scale),
                               rtol=RTOL, atol=ATOL)


def test_roi_pool_rounds_half_away_from_zero():
    # x1 = 5 at scale 0.5 is 2.5: C's round gives column 3 (banker's rounding would give 2).
    feats = np.zeros((1, 4, 8, 1), np.float32)
    feats[0, :, 2, 0] = 10.0
    feats[0, 1, 4, 0] = 3.0
    out = roi_pool(feats, np.array([[5.0, 0.0, 9.0, 6.0]]), np.array([0]), 1, 0.5)
    assert float(out[0, 0, 0, 0]) == 3.0


def test_roi_pool_gradients_of_both_paths_agree(monkeypatch):
    """The gradient goes to each bin's max cell (summed over the bins and boxes sharing it)."""
    feats = _features((2, 9, 7, 3), seed=16)
    boxes = _random_boxes(np.random.default_rng(17), 12, 14.0, 18.0)
    batch = np.random.default_rng(18).integers(0, 2, 12).astype(np.int32)

    def grad():
        roi_module._roi_pool.clear_cache()
        return jax.grad(lambda f: jnp.sum(roi_pool(f, boxes, batch, (3, 2), 0.5) ** 2))(
            jnp.asarray(feats))

    vectorized = grad()
    monkeypatch.setattr(roi_module, "_VECTORIZED_ROI_POOL_ELEMENTS", 0)
    looped = grad()
    roi_module._roi_pool.clear_cache()
    np.testing.assert_allclose(vectorized, looped, rtol=1e-6, atol=1e-6)
    # Reference: 2 * value at each bin's argmax (no ties in normal samples), accumulated.
    pooled = _roi_pool_ref(feats, boxes, batch, (3, 2), 0.5)
    want = np.zeros(feats.shape)
    for k in range(12):
        for value in pooled[k].reshape(-1):
            if value != 0.0:
                want[batch[k]][np.isclose(feats[batch[k]], value, rtol=0, atol=0)] += 2 * value
    np.testing.assert_allclose(vectorized, want, rtol=1e-5, atol=1e-5)


def _roi_pool_grad_ref(features, boxes, batch_indices, output_size, scale, grad):
    """torchvision's roi_pool backward: each bin's argmax is the first cell, rows then columns,
    strictly greater than every earlier one; it alone takes the bin's gradient. float64."""
    want = np.zeros(features.shape)
    for k, b, ph, pw, h0, h1, w0, w1 in _roi_pool_bins_ref(features.shape, boxes, batch_indices,
                                                            output_size, scale):
        for c in range(features.shape[3]):
            best, where = -np.finfo(np.float32).max, None
            for i in range(h0, h1):
                for j in range(w0, w1):
                    if features[b, i, j, c] > best:
                        best, where = features[b, i, j, c], (i, j)
            if where is not None:
                want[b, where[0], where[1], c] += grad[k, ph, pw, c]
    return want


def test_roi_pool_tied_maxima_give_the_gradient_to_the_first_cell(roi_pool_path):
    """Post-ReLU maps tie at 0 (and here at small integers too): each bin's gradient goes to its
    first maximal cell in row-major order, as torchvision's kernel does (JAX's max would share
    it among the tied cells). Exact: the reference sums the same float32 values."""
    rng = np.random.default_rng(31)
    feats = np.maximum(np.round(rng.normal(size=(2, 9, 8, 3)) * 1.5), 0).astype(np.float32)
    boxes = _random_boxes(rng, 10, 16.0, 18.0)
    boxes[0] = [0.0, 0.0, 16.0, 18.0]
    feats[1, :, :, 2] = 0.0  # a channel tied everywhere
    batch = rng.integers(0, 2, 10).astype(np.int32)
    upstream = rng.normal(size=(10, 3, 2, 3)).astype(np.float32)

    def loss(f):
        return jnp.sum(roi_pool(f, boxes, batch, (3, 2), 0.5) * upstream)

    got = jax.grad(loss)(jnp.asarray(feats))
    want = _roi_pool_grad_ref(feats, boxes, batch, (3, 2), 0.5, upstream)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.count_nonzero(want[1, :, :, 2]) < want[1, :, :, 2].size  # ties did occur
    # Forward mode works too, and is the same linear map: <J t, u> == <t, J^T u>.
    tangent = rng.normal(size=feats.shape).astype(np.float32)
    _, pushed = jax.jvp(lambda f: roi_pool(f, boxes, batch, (3, 2), 0.5), (feats,), (tangent,))
    np.testing.assert_allclose(np.sum(np.asarray(pushed, np.float64) * upstream),
                               np.sum(tangent.astype(np.float64) * want), rtol=1e-5)
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    theirs_input = torch.from_numpy(feats.transpose(0, 3, 1, 2)).requires_grad_()
    rois = torch.from_numpy(np.concatenate([batch[:, None], boxes], axis=1).astype(np.float32))
    out = ops.roi_pool(theirs_input, rois, (3, 2), 0.5)
    (out * torch.from_numpy(upstream.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_allclose(got, theirs_input.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-6, atol=1e-6)


def test_roi_pool_a_nan_bin_gives_no_gradient_on_either_path(roi_pool_path):
    """A NaN in a bin makes its max NaN (as jnp.max) and leaves it without an argmax, so no cell
    takes its gradient. The loop path used to keep the first finite column's cell when the NaN
    came in a later row and column."""
    feats = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4, 1)
    feats[0, 3, 1, 0] = np.nan
    boxes, batch = np.array([[0.0, 0.0, 3.0, 4.0]], np.float32), np.array([0], np.int32)
    assert np.isnan(np.asarray(roi_pool(feats, boxes, batch, 1))).all()
    grad = jax.grad(lambda f: jnp.sum(roi_pool(f, boxes, batch, 1)))(jnp.asarray(feats))
    np.testing.assert_array_equal(grad, np.zeros_like(feats))


def test_bfloat16_roi_pool_gradient_is_summed_in_float32():
    """Every bin whose max is a cell adds its cotangent to that cell. With bfloat16 features
    that scatter-add ran in bfloat16 and stalled at 256: a cell that 2,770 bins (512 boxes,
    7x7 bins, roi_spatial_pyramid_pool's level too) take got 256, 91% low. Summed in float32
    the only error is rounding each cell's sum to bfloat16 (2**-9; 2**-8 allowed), and for the
    pyramid rounding its L = 4 levels' sums and adding them in bfloat16 ((2L - 1) * 2**-9).
    Reference: float64 counts of the bins whose output is each cell's value (distinct values,
    exact in bfloat16, so bfloat16 and float32 pick the same cells)."""
    rng = np.random.default_rng(21)
    feats = (rng.permutation(256) + 1).reshape(1, 8, 8, 4) / 256.0
    corner = rng.uniform(0, 3, (512, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(3, 5, (512, 2))], 1).astype(np.float32)
    batch = np.zeros(512, np.int32)
    for pool, rtol in ((lambda f: roi_pool(f, boxes, batch, 7), 2.0**-8),
                       (lambda f: roi_spatial_pyramid_pool(f, boxes, batch, (1, 2, 4, 7)),
                        7 * 2.0**-9)):
        low = jnp.asarray(feats, jnp.bfloat16)
        grad = jax.jit(jax.grad(lambda f, pool=pool: jnp.sum(pool(f).astype(jnp.float32))))(low)
        outputs = np.asarray(pool(low), np.float64).reshape(512, -1, 4)
        want = np.stack([(outputs[:, :, c].ravel()[:, None] == feats[0, :, :, c].ravel()).sum(0)
                         for c in range(4)], axis=-1).reshape(feats.shape)
        assert grad.dtype == jnp.bfloat16 and want.max() > 2000
        np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=rtol)


def test_roi_pool_under_jit_and_empty_box_sets():
    feats = _features((2, 7, 9, 2), seed=10)
    boxes = _random_boxes(np.random.default_rng(11), 3, 9.0, 7.0)
    batch = np.array([1, 0, 1], np.int32)
    fn = jax.jit(lambda f, b, i: roi_pool(f, b, i, (2, 3)))
    expected = _roi_pool_ref(feats, boxes, batch, (2, 3), 1.0)
    np.testing.assert_allclose(fn(feats, boxes, batch), expected, rtol=RTOL, atol=ATOL)
    none, no_index = np.zeros((0, 4), np.float32), np.zeros(0, np.int32)
    assert roi_pool(feats, none, no_index, (2, 3)).shape == (0, 2, 3, 2)
    assert roi_align(feats, none, no_index, (2, 3)).shape == (0, 2, 3, 2)
    for op in (roi_pool, roi_align):  # [] was refused as float32 (jnp.asarray's dtype for it)
        assert op(feats, [], [], (2, 3)).shape == (0, 2, 3, 2)
        with pytest.raises(ValueError, match="batch_indices.dtype='float32' is invalid"):
            op(feats, boxes, [0.0, 1.0, 1.0], (2, 3))


# ---------------------------------------------------------------- roi_spatial_pyramid_pool


def test_roi_spp_is_each_levels_float64_roi_pool_flattened_and_concatenated():
    height, width, levels, scale = 11, 9, (1, 2, 3, 6), 0.5
    feats = _features((2, height, width, 4), seed=12)
    rng = np.random.default_rng(13)
    boxes = _random_boxes(rng, 6, width / scale, height / scale)
    batch = rng.integers(0, 2, size=6).astype(np.int32)
    got = roi_spatial_pyramid_pool(feats, boxes, batch, levels, scale)
    want = np.concatenate([_roi_pool_ref(feats, boxes, batch, (lv, lv), scale).reshape(6, -1)
                           for lv in levels], axis=1)
    assert got.shape == (6, 4 * (1 + 4 + 9 + 36))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_roi_spp_of_the_whole_map_is_the_image_level_spatial_pyramid_pool():
    """He et al.'s image-level SPP is the whole-image window's (bins floor/ceil on 11x9 maps)."""
    feats = _features((2, 11, 9, 3), seed=14)
    whole = np.array([[0.0, 0.0, 8.0, 10.0]] * 2, np.float32)  # last cell (8, 10) included
    got = roi_spatial_pyramid_pool(feats, whole, np.array([0, 1]), (1, 2, 3, 6))
    np.testing.assert_array_equal(got, spatial_pyramid_pool(feats, (1, 2, 3, 6)))
    # The same box at spatial_scale 1/4 is (0, 0, (W - 1) * 4, (H - 1) * 4): equal again.
    got = roi_spatial_pyramid_pool(feats, whole * 4, np.array([0, 1]), (1, 2, 3, 6), 0.25)
    np.testing.assert_array_equal(got, spatial_pyramid_pool(feats, (1, 2, 3, 6)))
    # The image-size box (0, 0, W, H) spans 10x12 cells (the last one clipped): other bins.
    image = np.array([[0.0, 0.0, 9.0, 11.0]] * 2, np.float32)
    got = roi_spatial_pyramid_pool(feats, image, np.array([0, 1]), (2,))
    assert not np.array_equal(got, spatial_pyramid_pool(feats, (2,)))


def test_roi_spp_under_jit_and_its_errors():
    feats = _features((1, 6, 6, 2), seed=15)
    boxes = np.array([[0.0, 0.0, 3.0, 5.0]], np.float32)
    fn = jax.jit(lambda f, b: roi_spatial_pyramid_pool(f, b, jnp.zeros(1, jnp.int32), (1, 2)))
    np.testing.assert_array_equal(fn(feats, boxes),
                                  roi_spatial_pyramid_pool(feats, boxes, [0], (1, 2)))
    with pytest.raises(ValueError, match=r"^roi_spatial_pyramid_pool: levels=\(\) is invalid; "
                                         r"expected a non-empty sequence of positive ints"):
        roi_spatial_pyramid_pool(feats, boxes, [0], ())
    with pytest.raises(ValueError, match=r"^roi_spatial_pyramid_pool: levels=\(1, 0\) is"):
        roi_spatial_pyramid_pool(feats, boxes, [0], (1, 0))
    with pytest.raises(ValueError, match=r"^roi_spatial_pyramid_pool: boxes\[0\]="):
        roi_spatial_pyramid_pool(feats, np.array([[-1.0, 0.0, 3.0, 5.0]]), [0], (1, 2))


# ---------------------------------------------------------------- box_iou and nms


def test_box_iou_by_hand():
    a = np.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    b = np.array([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    expected = [[1 / 7, 1.0, 0.0], [0.0, 0.0, 0.0]]
    np.testing.assert_allclose(box_iou(a, b), expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_box_iou_of_half_precision_boxes_is_computed_in_float32(dtype):
    """300 x 300 areas overflow float16 (max 65504): IoUs were 0 (torchvision upcasts, too)."""
    a = np.array([[0.0, 0.0, 300.0, 300.0], [0.0, 0.0, 290.0, 300.0]])
    b = np.array([[10.0, 0.0, 300.0, 300.0]])
    expected = [[290 / 300], [280 / 300]]  # float64 by hand; every corner is exact in both dtypes
    ious = box_iou(jnp.asarray(a, dtype), jnp.asarray(b, dtype))
    assert ious.dtype == jnp.float32
    np.testing.assert_allclose(ious, expected, rtol=1e-6)


@pytest.mark.parametrize("iou_threshold,max_output_size,score_threshold",
                         [(0.5, 10, float("-inf")), (0.3, 60, float("-inf")), (0.7, 25, 0.4),
                          (0.0, 40, float("-inf")), (1.0, 7, 0.9)])
def test_nms_matches_tensorflow(iou_threshold, max_output_size, score_threshold):
    rng = np.random.default_rng(int(iou_threshold * 10) + max_output_size)
    boxes = _random_boxes(rng, 50, 32.0, 32.0)
    scores = rng.uniform(size=50).astype(np.float32)
    indices, valid = nms(boxes, scores, iou_threshold, max_output_size, score_threshold)
    assert indices.shape == valid.shape == (max_output_size,)
    # TF takes (y1, x1, y2, x2); IoU does not care which axis comes first.
    expected = tf.image.non_max_suppression(boxes[:, [1, 0, 3, 2]], scores, max_output_size,
                                            iou_threshold, score_threshold).numpy()
    valid = np.asarray(valid)
    assert valid.sum() == len(expected) and valid[:len(expected)].all()
    np.testing.assert_array_equal(np.asarray(indices)[valid], expected)
    assert np.all(np.asarray(indices)[~valid] == 0)


def test_nms_takes_traced_thresholds_and_refuses_a_traced_scale_by_name():
    """Thresholds vmapped over a sweep (or jitted) were refused as "expected a number in [0, 1]"
    though the kernel takes them traced; each lane matches the concrete call. A traced
    `spatial_scale`, which roi_align uses in Python, is refused as traced, not as not a number."""
    rng = np.random.default_rng(3)
    boxes = _random_boxes(rng, 30, 32.0, 32.0)
    scores = rng.uniform(size=30).astype(np.float32)
    thresholds = np.array([0.1, 0.5, 0.9], np.float32)
    floors = np.array([-np.inf, 0.3, 0.6], np.float32)
    indices, valid = jax.vmap(lambda t, f: nms(boxes, scores, t, 12, f))(thresholds, floors)
    for lane, (t, f) in enumerate(zip(thresholds, floors, strict=True)):
        expected = tf.image.non_max_suppression(boxes[:, [1, 0, 3, 2]], scores, 12, t, f).numpy()
        np.testing.assert_array_equal(np.asarray(indices[lane])[np.asarray(valid[lane])], expected)
    with pytest.raises(ValueError, match=r"^nms: iou_threshold=1.5 is invalid; expected a number "
                                         r"in \[0, 1\]"):
        nms(boxes, scores, 1.5, 12)
    # a traced array was broadcast against the boxes, silently
    with pytest.raises(ValueError, match=r"^nms: score_threshold=.* is invalid; expected a number "
                                         r"\(not NaN\); a traced value must be a float scalar, "
                                         r"got shape \(30,\) float32"):
        jax.jit(lambda f: nms(boxes, scores, 0.5, 12, f))(scores)
    with pytest.raises(ValueError, match=r"^roi_align: spatial_scale=.*Tracer.* is invalid; "
                                         r"expected a concrete number, not a value traced by "
                                         r"jit/vmap/grad"):
        jax.jit(lambda scale: roi_align(F, B, IDX, 2, spatial_scale=scale))(0.5)


def test_nms_never_keeps_a_nan_score_as_tensorflow():
    """The docstring's rule 'score > score_threshold': NaN is not, so it is never kept, as in
    tf.image.non_max_suppression (torchvision's nms ranks NaN first and keeps it)."""
    boxes = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [5, 5, 6, 6]], np.float32)
    scores = np.array([np.nan, 1.0, 0.5], np.float32)
    indices, valid = nms(boxes, scores, 0.5, 3)
    expected = tf.image.non_max_suppression(boxes, scores, 3, 0.5).numpy()
    np.testing.assert_array_equal(np.asarray(indices)[np.asarray(valid)], expected)
    assert expected.tolist() == [1, 2]


def test_nms_under_jit_and_by_hand():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.6, 0.9, 0.5, 0.8], np.float32)
    fn = jax.jit(lambda b, s: nms(b, s, 0.5, 3))
    indices, valid = fn(boxes, scores)
    # Box 1 (0.9) suppresses 0 (IoU 81/119) and 3 (IoU 80/120 ~ 0.67 > 0.5); box 2 is disjoint.
    np.testing.assert_array_equal(indices, [1, 2, 0])
    np.testing.assert_array_equal(valid, [True, True, False])
    empty_indices, empty_valid = nms(np.zeros((0, 4), np.float32), np.zeros(0), 0.5, 2)
    assert empty_indices.shape == (2,) and not np.asarray(empty_valid).any()


# Tied scores. (a) Boxes 0-2 overlap each other (IoU 90/110, 90/110, 81/119 > 0.5), box 3 is
# disjoint, all at 0.9: lower index first keeps 0 then 3 (the reverse order would keep 3, 2).
# (b) Box 0 overlaps boxes 1 and 2 (IoU 50/150 > 0.3 each), which are disjoint, all at 0.5,
# after box 3 (0.7, disjoint): lower index first keeps 3, 0, while visiting the tie from the
# highest index would keep 3, 2, 1: the tie order changes the kept set.
NMS_TIES = {
    "cluster": (np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11], [20, 20, 30, 30]],
                         np.float32), np.full(4, 0.9, np.float32), 0.5, [0, 3]),
    "chain": (np.array([[5, 0, 15, 10], [0, 0, 10, 10], [10, 0, 20, 10], [40, 40, 50, 50]],
                       np.float32), np.array([0.5, 0.5, 0.5, 0.7], np.float32), 0.3, [3, 0]),
}


def _quantized_ties(seed=0, count=60):
    """Random boxes whose scores take 3 values, so most comparisons are ties."""
    rng = np.random.default_rng(seed)
    return _random_boxes(rng, count, 32.0, 32.0), (rng.integers(0, 3, count) / 4).astype(
        np.float32)


def _kept(boxes, scores, iou_threshold):
    indices, valid = nms(boxes, scores, iou_threshold, len(boxes))
    return np.asarray(indices)[np.asarray(valid)].tolist()


@pytest.mark.parametrize("case", sorted(NMS_TIES))
def test_nms_ties_visit_the_lower_index_first(case):
    boxes, scores, iou_threshold, expected = NMS_TIES[case]
    np.testing.assert_allclose(box_iou(boxes, boxes)[0, 1], 90 / 110 if case == "cluster"
                               else 50 / 150, rtol=1e-6)
    assert _kept(boxes, scores, iou_threshold) == expected
    assert tf.image.non_max_suppression(boxes[:, [1, 0, 3, 2]], scores, len(boxes),
                                        iou_threshold).numpy().tolist() == expected


def test_nms_ties_match_torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    cases = [case[:3] for case in NMS_TIES.values()] + [(*_quantized_ties(), 0.3)]
    for boxes, scores, iou_threshold in cases:
        expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                       iou_threshold).tolist()
        assert _kept(boxes, scores, iou_threshold) == expected


def test_nms_score_threshold_is_strict_as_tensorflow():
    """A score equal to `score_threshold` is not above it: the box is dropped, as by
    tf.image.non_max_suppression (review GC, R10)."""
    boxes = np.array([[0, 0, 1, 1], [5, 5, 6, 6]], np.float32)  # disjoint
    scores = np.array([0.9, 0.5], np.float32)
    for floor, kept in [(0.5, [0]), (np.float32(0.5), [0]), (0.4, [0, 1])]:
        expected = tf.image.non_max_suppression(boxes[:, [1, 0, 3, 2]], scores, 2, 0.5,
                                                score_threshold=floor).numpy().tolist()
        indices, valid = nms(boxes, scores, 0.5, 2, score_threshold=floor)
        assert np.asarray(indices)[np.asarray(valid)].tolist() == expected == kept, floor


# Two boxes whose IoU is exactly 0.5 (1 / 2, exact in float32): at iou_threshold=0.5 it does not
# exceed the threshold, so both are kept.
IOU_TIE = (np.array([[0, 0, 2, 1], [0, 0, 1, 1]], np.float32), np.array([0.9, 0.8], np.float32))


def test_nms_keeps_a_box_whose_iou_equals_the_threshold_as_tensorflow():
    """Suppression needs an IoU above `iou_threshold`, not equal to it (review GC, R9)."""
    boxes, scores = IOU_TIE
    assert float(box_iou(boxes, boxes)[0, 1]) == 0.5
    expected = tf.image.non_max_suppression(boxes[:, [1, 0, 3, 2]], scores, 2, 0.5).numpy()
    assert _kept(boxes, scores, 0.5) == expected.tolist() == [0, 1]
    assert _kept(boxes, scores, 0.49) == [0]


def test_nms_keeps_a_box_whose_iou_equals_the_threshold_as_torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    boxes, scores = IOU_TIE
    for iou_threshold in (0.5, 0.49):
        expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                       iou_threshold).tolist()
        assert _kept(boxes, scores, iou_threshold) == expected


# ---------------------------------------------------------------- boxes past the map


def _past_the_map_boxes(rng, width, height, scale):
    """Boxes clipped to an image 0.9 cells larger than the map covers (as a 60-px image's 7-cell
    map at stride 8 covers only 56 px), many reaching past the map."""
    image_w, image_h = (width + 0.9) / scale, (height + 0.9) / scale
    boxes = _random_boxes(rng, 12, image_w, image_h)
    boxes[:4, 2], boxes[4:8, 3] = image_w, image_h  # Flush with the image's far edge.
    boxes[8] = [0.0, 0.0, image_w, image_h]
    boxes[9] = [width / scale, height / scale, image_w, image_h]  # Wholly past the map.
    assert min((boxes[:, 2] > width / scale).sum(), (boxes[:, 3] > height / scale).sum()) >= 5
    return boxes


@pytest.mark.parametrize("scale", [0.125, 0.25, 1.0])
def test_boxes_past_the_map_match_torchvision_eager_and_under_jit(scale):
    # Reference: torchvision.ops.roi_align / roi_pool themselves (they clamp, never raise);
    # float32 on both sides, tolerance RTOL/ATOL. Eager (concrete boxes, checked) must equal jit
    # (RoIAlign up to rounding: eager places its samples with torchvision's host arithmetic, the
    # kernel an ulp apart, see test_samples_on_the_far_edge_of_the_map_follow_torchvisions...).
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    height, width = 7, 6
    feats = _features((2, height, width, 3), seed=21)
    boxes = _past_the_map_boxes(np.random.default_rng(22), width, height, scale)
    batch = np.random.default_rng(23).integers(0, 2, size=len(boxes)).astype(np.int32)
    torch_feats = torch.from_numpy(feats.transpose(0, 3, 1, 2).copy())
    torch_boxes = torch.from_numpy(np.concatenate([batch[:, None].astype(np.float32), boxes], 1))
    for aligned in (True, False):
        expected = ops.roi_align(torch_feats, torch_boxes, (3, 2), scale, 2,
                                 aligned).numpy().transpose(0, 2, 3, 1)
        eager = roi_align(feats, boxes, batch, (3, 2), scale, 2, aligned)
        jitted = jax.jit(lambda b, a=aligned: roi_align(feats, b, batch, (3, 2), scale, 2, a))(
            boxes)
        np.testing.assert_allclose(eager, expected, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(jitted, expected, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-6)
    expected = ops.roi_pool(torch_feats, torch_boxes, (3, 2), scale).numpy().transpose(0, 2, 3, 1)
    eager = roi_pool(feats, boxes, batch, (3, 2), scale)
    np.testing.assert_allclose(eager, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(eager, jax.jit(
        lambda b: roi_pool(feats, b, batch, (3, 2), scale))(boxes))
    levels = roi_spatial_pyramid_pool(feats, boxes, batch, (1, 2), scale)
    pooled = [ops.roi_pool(torch_feats, torch_boxes, (n, n), scale).numpy().transpose(0, 2, 3, 1)
              for n in (1, 2)]
    np.testing.assert_allclose(
        levels, np.concatenate([p.reshape(len(boxes), -1) for p in pooled], 1), rtol=RTOL,
        atol=ATOL)


def test_boxes_past_the_map_but_inside_the_image_match_torchvision():
    """AlexNet's 227-px input gives a 13x13 conv5 map at stride 16 (208 px): boxes clipped to
    the image reach past it, up to x = 227. They are valid, as in torchvision (once refused)."""
    feats = _features((1, 13, 13, 2), seed=3)
    boxes = np.array([[100.0, 100.0, 226.0, 226.0], [0.0, 0.0, 227.0, 227.0]], np.float32)
    batch = np.zeros(2, np.int32)
    np.testing.assert_allclose(
        roi_align(feats, boxes, batch, (3, 3), 1 / 16, 2),
        _roi_align_ref(feats, boxes, batch, (3, 3), 1 / 16, 2, True), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(roi_pool(feats, boxes, batch, (3, 3), 1 / 16),
                               _roi_pool_ref(feats, boxes, batch, (3, 3), 1 / 16),
                               rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- errors

F = np.zeros((2, 8, 8, 3), np.float32)
B = np.array([[0.0, 0.0, 4.0, 4.0]], np.float32)
IDX = np.array([0], np.int32)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: roi_align(F[0], B, IDX, 2),
         "roi_align: features.shape=(8, 8, 3) is invalid; expected a rank-4 NHWC array"),
        (lambda: roi_pool(F.astype(np.int32), B, IDX, 2),
         "roi_pool: features.dtype='int32' is invalid; expected a floating-point array."),
        (lambda: roi_align(F, B[0], IDX, 2),
         "roi_align: boxes.shape=(4,) is invalid; expected [K, 4] boxes as (x1, y1, x2, y2)."),
        (lambda: roi_pool(F, np.array([[4.0, 0.0, 2.0, 4.0]]), IDX, 2),
         "roi_pool: boxes[0]=[4.0, 0.0, 2.0, 4.0] is invalid; expected x1 <= x2 and y1 <= y2"),
        (lambda: roi_align(F, np.array([[0.0, 0.0, 4.0, 4.0], [0.0, 5.0, 4.0, 3.0]]), [0, 1], 2),
         "roi_align: boxes[1]=[0.0, 5.0, 4.0, 3.0] is invalid; expected x1 <= x2 and y1 <= y2"),
        (lambda: roi_align(F, np.array([[0.0, 0.0, np.nan, 4.0]]), IDX, 2),
         "roi_align: boxes[0]=[0.0, 0.0, nan, 4.0] is invalid; expected finite coordinates."),
        (lambda: roi_pool(F, np.array([[-1.0, 0.0, 4.0, 4.0]]), IDX, 2),
         "roi_pool: boxes[0]=[-1.0, 0.0, 4.0, 4.0] is invalid; boxes must lie inside the image, "
         "x1 >= 0 and y1 >= 0 (image pixel coordinates); clip them to the image first."),
        (lambda: roi_align(F, np.array([[0.0, -0.5, 4.0, 4.0]]), IDX, 2),
         "roi_align: boxes[0]=[0.0, -0.5, 4.0, 4.0] is invalid; boxes must lie inside the image"),
        (lambda: roi_align(F, B, np.array([2]), 2),
         "roi_align: batch_indices[0]=2 is invalid; expected 0 <= index < 2 (the batch size"),
        (lambda: roi_pool(F, B, np.array([-1]), 2),
         "roi_pool: batch_indices[0]=-1 is invalid; expected 0 <= index < 2"),
        (lambda: roi_align(F, B, np.array([0, 1]), 2),
         "roi_align: batch_indices.shape=(2,) is invalid; expected (1,), one batch index per box."),
        (lambda: roi_align(F, B, np.array([0.0]), 2),
         "roi_align: batch_indices.dtype='float32' is invalid; expected an integer array."),
        (lambda: roi_align(F, B, IDX, 0),
         "roi_align: output_size=0 is invalid; expected every entry >= 1."),
        (lambda: roi_pool(F, B, IDX, (2, -3)),
         "roi_pool: output_size=(2, -3) is invalid; expected every entry >= 1."),
        (lambda: roi_align(F, B, IDX, 2, spatial_scale=0.0),
         "roi_align: spatial_scale=0.0 is invalid; expected a positive finite number."),
        (lambda: roi_align(F, B, IDX, 2, sampling_ratio=1.5),
         "roi_align: sampling_ratio=1.5 is invalid; expected an int"),
        (lambda: roi_align(F, B, IDX, 2, aligned=1),
         "roi_align: aligned=1 is invalid; expected True or False."),
        (lambda: roi_align(F, B, IDX, 2, max_sampling_ratio=0),
         "roi_align: max_sampling_ratio=0 is invalid; expected a positive integer."),
        (lambda: roi_align(F, B, IDX, 2, sample_positions="host"),
         "roi_align: sample_positions='host' is invalid; expected 'torchvision' (torchvision's "
         "positions, through a host callback for traced boxes on CPU) or 'kernel'"),
        (lambda: nms(B[0], np.ones(1), 0.5, 3),
         "nms: boxes.shape=(4,) is invalid; expected [K, 4] boxes"),
        (lambda: nms(np.array([[0.0, 3.0, 1.0, 2.0]]), np.ones(1), 0.5, 3),
         "nms: boxes[0]=[0.0, 3.0, 1.0, 2.0] is invalid; expected x1 <= x2 and y1 <= y2"),
        (lambda: nms(B, np.ones(2), 0.5, 3),
         "nms: scores.shape=(2,) is invalid; expected (1,), one score per box."),
        (lambda: nms(B, np.ones(1), 1.5, 3),
         "nms: iou_threshold=1.5 is invalid; expected a number in [0, 1]."),
        (lambda: nms(B, np.ones(1), -0.1, 3),
         "nms: iou_threshold=-0.1 is invalid; expected a number in [0, 1]."),
        (lambda: nms(B, np.ones(1), "high", 3),
         "nms: iou_threshold='high' is invalid; expected a number in [0, 1]."),
        (lambda: nms(B, np.ones(1), 0.5, 0),
         "nms: max_output_size=0 is invalid; expected a positive integer."),
        (lambda: nms(B, np.ones(1), 0.5, 2, score_threshold=float("nan")),
         "nms: score_threshold=nan is invalid; expected a number (not NaN)."),
        (lambda: box_iou(B, np.ones((2, 3))),
         "box_iou: boxes.shape=(2, 3) is invalid; expected [K, 4] boxes"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("aligned", [True, False])
def test_a_non_finite_cell_reaches_only_the_outputs_that_sample_it(aligned):
    """The dense bilinear contraction spread one inf (0 * inf = NaN) to every output of every
    image; torchvision's kernel reads only each sample's neighbours."""
    features = _features((2, 12, 12, 3), seed=3)
    features[1, 7, 7, 0] = np.inf
    features[1, 6, 6, 1] = np.nan
    features[0, 2, 2, 2] = -np.inf
    rng = np.random.default_rng(4)
    boxes = np.concatenate([_random_boxes(rng, 10, 12, 12), [[5.3, 5.2, 9.1, 9.4],
                                                               [0.6, 0.7, 4.1, 3.8]]])
    boxes = boxes.astype(np.float32)
    batch = np.array([0, 1] * 5 + [1, 0])
    got = np.asarray(roi_align(jnp.asarray(features), boxes, batch, (3, 3), 1.0, 2, aligned))
    want = _roi_align_ref(features, boxes, batch, (3, 3), 1.0, 2, aligned)
    assert np.isfinite(want).sum() > 0.8 * want.size  # most outputs never read a bad cell
    assert (~np.isfinite(want)).any()  # and the last two boxes do
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)  # NaN where NaN, same infs


def test_a_non_finite_cell_keeps_the_feature_gradient_the_bilinear_weights():
    """roi_align is linear in the features, so its feature gradient is the bilinear weights
    whatever they hold (torchvision's): the outputs reading an inf or NaN cell, replaced by a
    constant, passed no gradient back to any cell of their bins."""
    features = _features((2, 12, 12, 3), seed=5)
    bad = features.copy()
    bad[1, 7, 7, 0], bad[1, 6, 6, 1], bad[0, 2, 2, 2] = np.inf, np.nan, -np.inf
    boxes = np.array([[5.3, 5.2, 9.1, 9.4], [0.6, 0.7, 4.1, 3.8], [1.0, 1.0, 8.0, 8.0]],
                     np.float32)
    batch = np.array([1, 0, 1])
    cotangent = jnp.asarray(np.random.default_rng(6).normal(size=(3, 2, 2, 3)), jnp.float32)

    def grad(maps):
        return np.asarray(jax.grad(lambda f: jnp.sum(
            roi_align(f, boxes, batch, (2, 2), 1.0, 2, True) * cotangent))(jnp.asarray(maps)))

    want = grad(features)
    assert np.count_nonzero(want[1, 7, 7]) and np.count_nonzero(want[0, 2, 2])  # cells read
    np.testing.assert_array_equal(grad(bad), want)
    out = np.asarray(roi_align(jnp.asarray(bad), boxes, batch, (2, 2), 1.0, 2, True))
    assert np.isnan(out).any() and np.isneginf(out).any()  # the values keep their NaN/inf


@pytest.mark.parametrize("op", [roi_align, roi_pool])
def test_an_empty_map_is_refused(op):
    with pytest.raises(ValueError, match=rf"^{op.__name__}: features.shape=\(1, 0, 4, 2\) is "
                                         r"invalid; expected height and width >= 1"):
        op(jnp.zeros((1, 0, 4, 2)), np.array([[0.0, 0.0, 1.0, 1.0]]), np.array([0]), (2, 2))


def _traced_boxes(rng, count, width, height, scale):
    """Boxes on a half-pixel lattice (as detectors' boxes often are) from 1.5 maps before the
    map to 1.5 maps past it, so that many bilinear samples land exactly on x = -1, 0, W - 1, W:
    the edges where torchvision's kernel switches a sample from a cell's value to 0."""
    span_w, span_h = width / scale, height / scale
    xs = np.sort(rng.integers(int(-3 * span_w), int(5 * span_w), size=(count, 2)), axis=1) / 2
    ys = np.sort(rng.integers(int(-3 * span_h), int(5 * span_h), size=(count, 2)), axis=1) / 2
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)
    boxes[: count // 4] += rng.uniform(-1, 1, size=(count // 4, 1))  # and off the lattice
    return boxes.astype(np.float32)


@pytest.mark.parametrize("scale", [0.25, pytest.param(0.1, marks=pytest.mark.slow),
                                   pytest.param(1 / 16, marks=pytest.mark.slow)])
def test_traced_boxes_before_and_past_the_map_match_torchvision(scale):
    """Under jit (traced boxes) the sample positions were computed in the kernel, where XLA:CPU
    fuses `start + p * bin` into an FMA and divides by the output size and the sample count
    as multiplies by rounded reciprocals, in another order than torchvision's; a sample that
    torchvision places exactly on x = -1 (read: the first cell's value) or x = W (read: the last
    cell's) landed an ulp outside and read 0 (or the other way): 75 of 129,600 random box and
    setting pairs differed by up to 2.0. Reference: torchvision.ops.roi_align itself, float32,
    aligned True and False, fixed and adaptive sampling; tolerance RTOL/ATOL."""
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    height, width = 7, 9
    feats = _features((2, height, width, 3), seed=31)
    rng = np.random.default_rng(32)
    boxes = _traced_boxes(rng, 1500, width, height, scale)
    batch = rng.integers(0, 2, size=len(boxes)).astype(np.int32)
    torch_feats = torch.from_numpy(feats.transpose(0, 3, 1, 2).copy())
    rois = torch.from_numpy(np.concatenate([batch[:, None].astype(np.float32), boxes], 1))
    # Adaptive sampling under jit: a static grid of max_sampling_ratio, here large enough for
    # every box (torchvision's count, ceil(box side on the map / output side), is at most 12).
    counts = [(sampling_ratio, None) for sampling_ratio in (1, 2, 3)] + [(0, 12)]
    failures = []
    for aligned in (True, False):
        for sampling_ratio, max_ratio in counts:
            expected = ops.roi_align(torch_feats, rois, (3, 4), scale, sampling_ratio,
                                     aligned).numpy().transpose(0, 2, 3, 1)
            got = np.asarray(jax.jit(lambda b, a=aligned, s=sampling_ratio, m=max_ratio:
                                     roi_align(feats, b, batch, (3, 4), scale, s, a, m))(boxes))
            error = np.abs(got - expected) - RTOL * np.abs(expected)
            bad = np.flatnonzero((error > ATOL).any(axis=(1, 2, 3)))
            failures += [(aligned, sampling_ratio, boxes[i].tolist(), float(error[i].max()))
                         for i in bad]
    assert not failures, failures[:5]


@pytest.mark.slow
def test_traced_and_concrete_boxes_give_the_same_bits_gradients_and_vmap():
    """Traced boxes take their sample positions from the host arithmetic concrete boxes use
    (on CPU), and their gradient from the kernel's: eager and jit agree to the bit, the box
    gradient is the float64 finite difference's, and vmap over images of boxes works."""
    feats = _features((2, 7, 9, 3), seed=33)
    rng = np.random.default_rng(34)
    boxes = _traced_boxes(rng, 200, 9, 7, 0.25)
    boxes = np.clip(boxes, 0, None)  # concrete boxes must lie inside the image
    batch = rng.integers(0, 2, size=len(boxes)).astype(np.int32)
    for sampling_ratio, max_ratio in ((2, None), (0, 12)):
        jitted = jax.jit(lambda b, s=sampling_ratio, m=max_ratio: roi_align(
            feats, b, batch, (3, 4), 0.25, s, True, m))(boxes)
        np.testing.assert_array_equal(
            jitted, roi_align(feats, boxes, batch, (3, 4), 0.25, sampling_ratio, True, max_ratio))
    stacked = jax.vmap(lambda b: roi_align(feats, b, batch[:50], 2, 0.25, 2))(
        boxes[:100].reshape(2, 50, 4))
    np.testing.assert_array_equal(stacked.reshape(100, 2, 2, 3),
                                  roi_align(feats, boxes[:100], np.tile(batch[:50], 2), 2, 0.25, 2))
    with jax.enable_x64(True):
        box = jnp.array([[3.3, 2.1, 27.7, 21.9]])

        def total(b):
            return jnp.sum(roi_align(feats.astype(np.float64), b, np.array([1]), 2, 0.25, 2) ** 2)

        grad = jax.grad(total)(box)
        step = 1e-6
        numeric = [(total(box.at[0, i].add(step)) - total(box.at[0, i].add(-step))) / (2 * step)
                   for i in range(4)]
        np.testing.assert_allclose(grad[0], numeric, rtol=1e-5, atol=1e-8)


def test_traced_boxes_under_shard_map_and_pmap():
    """The host samples of traced boxes come from a callback inside `platform_dependent`, whose
    branches must agree on the mesh axes they vary over: under `jax.shard_map` (the engine's
    `shard_map` data parallelism) roi_align raised 'switch branches must have equal output
    types'. Each device's boxes give the outputs of concrete boxes, bit for bit."""
    from jax.sharding import Mesh, PartitionSpec

    feats = _features((2, 7, 9, 3), seed=35)
    boxes = _random_boxes(np.random.default_rng(36), 10, 36.0, 28.0).reshape(1, 10, 4)
    batch = np.array([0, 1] * 5, np.int32)

    def per_device(f, b):
        return roi_align(f, b[0], batch, 2, 0.25, 2)[None]

    expected = roi_align(feats, boxes[0], batch, 2, 0.25, 2)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(
        "data")), out_specs=PartitionSpec("data")))(feats, boxes)
    np.testing.assert_array_equal(sharded[0], expected)
    mapped = jax.pmap(per_device, in_axes=(None, 0))(feats, boxes[None])
    np.testing.assert_array_equal(mapped[0, 0], expected)


def test_kernel_sample_positions_export_and_serialize_for_cpu():
    """Traced boxes on CPU take their sample positions from a host callback, which `jax.export`
    cannot serialize ('serialization of host_callbacks is not yet implemented'), so no function
    of traced boxes calling roi_align could be exported. `sample_positions='kernel'` places them
    in the kernel on every platform: exported, serialized, deserialized and called, it gives the
    jitted kernel path's bits, and torchvision's values within the usual tolerance."""
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    feats = _features((2, 7, 9, 3), seed=37)
    boxes = _random_boxes(np.random.default_rng(38), 20, 36.0, 28.0)
    batch = np.array([0, 1] * 10, np.int32)
    for sampling_ratio, max_ratio in ((2, None), (0, 12)):
        def pooled(f, b, s=sampling_ratio, m=max_ratio):
            return roi_align(f, b, batch, (3, 4), 0.25, s, True, m, sample_positions="kernel")

        exported = jax.export.export(jax.jit(pooled), platforms=["cpu"])(feats, boxes)
        restored = jax.export.deserialize(exported.serialize())
        got = np.asarray(restored.call(feats, boxes))
        np.testing.assert_array_equal(got, jax.jit(pooled)(feats, boxes))
        rois = torch.from_numpy(np.concatenate([batch[:, None], boxes], axis=1).astype(np.float32))
        expected = ops.roi_align(torch.from_numpy(np.asarray(feats).transpose(0, 3, 1, 2).copy()),
                                 rois, (3, 4), 0.25, sampling_ratio, True).numpy()
        np.testing.assert_allclose(got, expected.transpose(0, 2, 3, 1), rtol=RTOL, atol=ATOL)
    with pytest.raises(NotImplementedError, match="host_callbacks"):  # the default's limit
        jax.export.export(jax.jit(lambda f, b: roi_align(f, b, batch, 2, 0.25, 2)),
                          platforms=["cpu"])(feats, boxes).serialize()


def test_kernel_sample_positions_of_legacy_aligned_false_force_sub_pixel_boxes_to_one_cell():
    """`aligned=False` (torchvision's default, Detectron's legacy RoIAlign) forces a box smaller
    than a cell on the map to 1 x 1 before placing its samples and counting them. The kernel
    path (`sample_positions='kernel'`, every non-CPU platform's) was only tested with
    aligned=True, so dropping that clamp from the kernel went unnoticed: a 0.4 x 0.3 box then
    sampled its own tiny extent (off by up to 1.5 here). Reference: torchvision.ops.roi_align
    itself, aligned=False, float32, fixed and adaptive sampling, traced boxes."""
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    feats = _features((2, 8, 9, 3), seed=39)
    boxes = np.array([
        [2.0, 2.0, 2.4, 2.3],  # 0.4 x 0.3 cells at scale 1
        [4.5, 1.25, 4.5, 3.75],  # zero width, 2.5 tall
        [1.0, 5.0, 6.5, 5.5],  # 5.5 wide, half a cell tall
        [3.0, 3.0, 3.0, 3.0],  # a point
        [6.2, 0.7, 7.1, 1.6],  # 0.9 x 0.9
        [1.0, 3.0, 5.0, 7.0],  # an ordinary 4 x 4 box
        [0.5, 0.5, 7.5, 6.0],  # an ordinary 7 x 5.5 box
    ], np.float32)
    batch = np.array([0, 1, 0, 1, 1, 0, 1], np.int32)
    rois = torch.from_numpy(np.concatenate([batch[:, None].astype(np.float32), boxes], axis=1))
    torch_feats = torch.from_numpy(feats.transpose(0, 3, 1, 2).copy())
    for scale in (1.0, 0.5):
        for sampling_ratio, max_ratio in ((2, None), (0, 4)):
            expected = ops.roi_align(torch_feats, rois, (2, 3), scale, sampling_ratio,
                                     False).numpy().transpose(0, 2, 3, 1)
            got = jax.jit(lambda b, s=scale, r=sampling_ratio, m=max_ratio: roi_align(
                feats, b, batch, (2, 3), s, r, False, m, sample_positions="kernel"))(boxes)
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{scale=} {sampling_ratio=}")

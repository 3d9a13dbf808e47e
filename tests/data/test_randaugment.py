"""RandAugment's TensorFlow ops against PIL, the library AutoAugment/RandAugment were defined with.

Point ops are compared with `PIL.ImageOps` / `PIL.ImageEnhance`, geometric ops with PIL's
`Image.rotate` / `Image.transform(AFFINE, NEAREST, fillcolor=128)`, on random uint8 RGB images
(odd sizes, so no op can rely on square or even shapes), a low-contrast one, a smooth one and a
grayscale one.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from cnnjax.data import randaugment as ra

_RNG = np.random.default_rng(0)
IMAGES = {
    "rgb0": _RNG.integers(0, 256, (17, 23, 3), dtype=np.uint8),
    "rgb1": _RNG.integers(0, 256, (20, 15, 3), dtype=np.uint8),
    "low_contrast": _RNG.integers(40, 200, (17, 23, 3)).astype(np.uint8),
    "smooth": np.clip(np.cumsum(_RNG.integers(-3, 4, (32, 32, 3)), axis=1) + 128, 0,
                      255).astype(np.uint8),
    "grey": _RNG.integers(0, 256, (19, 13, 1), dtype=np.uint8),
}
SEED = tf.constant([7, 3], tf.int64)


def _pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)


def _array(image: Image.Image, channels: int) -> np.ndarray:
    out = np.asarray(image)
    return out[..., None] if channels == 1 else out


def _fill(x: np.ndarray):
    return (128,) * 3 if x.shape[-1] == 3 else 128


# -------------------------------------------------------------------------------- point ops
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_lookup_table_ops_equal_pil_exactly(name):
    x = IMAGES[name]
    c = x.shape[-1]
    np.testing.assert_array_equal(ra.autocontrast(x).numpy(),
                                  _array(ImageOps.autocontrast(_pil(x)), c))
    np.testing.assert_array_equal(ra.equalize(x).numpy(), _array(ImageOps.equalize(_pil(x)), c))
    for threshold in (0, 26, 128, 200, 256):
        np.testing.assert_array_equal(ra.solarize(x, threshold).numpy(),
                                      _array(ImageOps.solarize(_pil(x), threshold), c))
    for bits in (1, 4, 5, 7, 8):
        np.testing.assert_array_equal(ra.posterize(x, bits).numpy(),
                                      _array(ImageOps.posterize(_pil(x), bits), c))


def test_autocontrast_and_equalize_keep_flat_and_two_level_images_as_pil_does():
    flat = np.full((5, 7, 3), 77, np.uint8)
    two = np.where(np.arange(35).reshape(5, 7, 1) % 3, 10, 240).astype(np.uint8).repeat(3, -1)
    # 200 pixels at 255 and one at each of 0..55: PIL's step leaves out the top level's count,
    # (256 - 200) // 255 = 0, so equalize keeps the image (a step of 256 // 255 = 1 remaps it)
    top_heavy = np.concatenate([np.arange(56), np.full(200, 255)]).astype(np.uint8)
    for x in (flat, two, top_heavy.reshape(16, 16, 1)):
        np.testing.assert_array_equal(ra.autocontrast(x).numpy(),
                                      _array(ImageOps.autocontrast(_pil(x)), x.shape[-1]))
        np.testing.assert_array_equal(ra.equalize(x).numpy(),
                                      _array(ImageOps.equalize(_pil(x)), x.shape[-1]))


ENHANCE = {"color": (ra.color, ImageEnhance.Color),
           "contrast": (ra.contrast, ImageEnhance.Contrast),
           "brightness": (ra.brightness, ImageEnhance.Brightness),
           "sharpness": (ra.sharpness, ImageEnhance.Sharpness)}


@pytest.mark.parametrize("op", sorted(ENHANCE))
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_enhance_ops_match_pil(op, name):
    """Same float32 blend `d + f * (x - d)`, truncated, as PIL's C `ImagingBlend`, and the same
    degenerate images (PIL's fixed-point grey, rounded mean, SMOOTH filter). Exact on x86-64;
    the tolerance (+-1 grey level on at most 1% of the values) allows for a PIL build whose
    compiler fuses that multiply-add (one rounding less), which can move a value across an
    integer before the truncation."""
    ours, reference = ENHANCE[op]
    x = IMAGES[name]
    for factor in (0.0, 0.1, 0.37, 1.0, 1.55, 1.9, 2.5):
        got = ours(x, factor).numpy().astype(int)
        want = _array(reference(_pil(x)).enhance(factor), x.shape[-1]).astype(int)
        assert np.abs(got - want).max() <= 1, factor
        assert np.mean(got == want) >= 0.99, factor


@pytest.mark.parametrize("x", [np.array([[[0], [1]]], np.uint8),
                               np.array([[[0, 0, 0], [1, 1, 1]]], np.uint8)])
def test_contrasts_mean_level_rounds_half_up_as_pil_does(x):
    """A mean grey of 0.5 is PIL's `int(mean + 0.5)` = 1 (round half to even gave 0): at factor
    0 the image is that level everywhere."""
    np.testing.assert_array_equal(
        ra.contrast(x, 0.0).numpy(),
        _array(ImageEnhance.Contrast(_pil(x)).enhance(0.0), x.shape[-1]))
    np.testing.assert_array_equal(ra.contrast(x, 0.0).numpy(), np.ones_like(x))


def test_color_of_a_grey_image_is_the_identity_as_in_pil():
    x = IMAGES["grey"]
    np.testing.assert_array_equal(ra.color(x, 0.0).numpy(), x)


# ---------------------------------------------------------------------------- geometric ops
def _source_coordinates(matrix, shape) -> tuple[np.ndarray, np.ndarray]:
    """Float64 input coordinates (pixel-area units) PIL samples for every output pixel."""
    a, b, c, d, e, f = matrix
    y, x = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    return a * x + b * y + c, d * x + e * y + f


def _rotation_matrix(degrees: float, shape) -> tuple[float, ...]:
    """PIL's `Image.rotate` matrix (counter-clockwise about (w/2, h/2))."""
    r = math.radians(degrees)
    cos, sin = math.cos(r), math.sin(r)
    cx, cy = shape[1] / 2, shape[0] / 2
    return cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy


def _geometric_cases(x: np.ndarray):
    """(label, ours, PIL's, matrix, whole lines of ties) for rotations, shears and translations
    of `x`; the last is True for the +-30 degree rotations (sin = 1/2)."""
    h, w = x.shape[:2]
    pil, fill = _pil(x), _fill(x)
    for degrees in (0.0, 7.3, -13.7, 21.1, 30.0, -30.0):
        yield (f"rotate {degrees}", ra.rotate(x, degrees),
               pil.rotate(degrees, resample=Image.NEAREST, fillcolor=fill),
               _rotation_matrix(degrees, x.shape), abs(degrees) == 30.0)
    affine = lambda m: pil.transform(pil.size, Image.AFFINE, m, resample=Image.NEAREST,
                                     fillcolor=fill)
    for s in (0.0, 0.3, -0.3, 0.17, -0.12):
        m = (1, s, 0, 0, 1, 0)
        yield f"shear_x {s}", ra.shear_x(x, s), affine(m), m, False
        m = (1, 0, 0, s, 1, 0)
        yield f"shear_y {s}", ra.shear_y(x, s), affine(m), m, False
    for t in (0.0, 2.6, -3.0, -7.4, 0.45 * w, 0.3 * h):
        m = (1, 0, -t, 0, 1, 0)
        yield f"translate_x {t}", ra.translate_x(x, t), affine(m), m, False
        m = (1, 0, 0, 0, 1, -t)
        yield f"translate_y {t}", ra.translate_y(x, t), affine(m), m, False


@pytest.mark.parametrize("name,tie_width", [*((name, 1e-4) for name in sorted(IMAGES)),
                                             ("imagenet_size", 2.5e-3)])
def test_geometric_ops_equal_pil_except_at_pixel_boundary_ties(name, tie_width):
    """Where the exact input coordinate lies on or near a whole number (a boundary between two
    pixels: e.g. the centre column under a 30-degree rotation with sin = 1/2) TF (float32) and
    PIL may pick different neighbours. Every differing pixel must be such a tie (within
    `tie_width` of a boundary), and at least 99% of the pixels must agree except under the
    exactly-1/2 rotations, which put a whole column on ties. PIL drifts from the exact
    coordinate as images grow (its affine steps along each row): 1e-4 px holds up to 32x32, at
    224x224 its ties reach about 1e-3 px.
    """
    x = IMAGES[name] if name in IMAGES else _RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for label, ours, theirs, matrix, tie_lines in _geometric_cases(x):
        ours = ours.numpy()
        assert ours.shape == x.shape and ours.dtype == np.uint8
        differ = (ours != _array(theirs, x.shape[-1])).any(-1)
        qx, qy = _source_coordinates(matrix, x.shape)
        tie = np.minimum(np.abs(qx - np.round(qx)), np.abs(qy - np.round(qy))) < tie_width
        assert not (differ & ~tie).any(), label
        if not tie_lines:
            assert differ.mean() <= 0.01, (label, differ.mean())


def test_geometric_fill_is_grey_128_and_zero_parameters_are_the_identity():
    x = IMAGES["rgb0"]
    np.testing.assert_array_equal(ra.translate_x(x, 100.0).numpy(), np.full_like(x, 128))
    np.testing.assert_array_equal(ra.translate_y(x, -100.0).numpy(), np.full_like(x, 128))
    for op in (ra.rotate, ra.shear_x, ra.shear_y, ra.translate_x, ra.translate_y):
        np.testing.assert_array_equal(op(x, 0.0).numpy(), x)
    moved = ra.translate_x(x, 3.0).numpy()  # content moves right; 3 grey columns come in
    np.testing.assert_array_equal(moved[:, 3:], x[:, :-3])
    assert (moved[:, :3] == 128).all()
    down = ra.translate_y(x, 2.0).numpy()
    np.testing.assert_array_equal(down[2:], x[:-2])


# -------------------------------------------------------------------------------- magnitude
def test_magnitude_mapping():
    p = ra.op_parameter
    assert [p(n, 10) for n in ("Identity", "AutoContrast", "Equalize")] == [None] * 3
    assert p("Rotate", 10) == 30.0 and p("Rotate", 5) == 15.0
    assert p("ShearX", 10) == p("ShearY", 10) == pytest.approx(0.3)
    assert p("TranslateX", 10) == p("TranslateY", 10) == pytest.approx(0.45)
    assert [p("Solarize", m) for m in (0, 1, 5, 9, 10)] == [256, 231, 128, 26, 0]
    assert [p("Posterize", m) for m in range(11)] == [8, 8, 7, 7, 6, 6, 6, 5, 5, 4, 4]
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert p(name, 9) == pytest.approx(0.81) and p(name, 0) == 0
    with pytest.raises(ValueError, match=r"randaugment: op='Invert' is invalid; expected one of"):
        p("Invert", 5)


def test_magnitudes_and_op_parameters_outside_their_ranges_are_refused():
    """Only rand_augment checked the magnitude: apply_op(Posterize, 25) shifted by a negative
    amount (a black image) and Rotate at 100 turned 300 degrees."""
    x = IMAGES["rgb0"]
    for magnitude in (25, -5, 10.5):
        with pytest.raises(ValueError, match=rf"^randaugment: magnitude={magnitude} is invalid; "
                                             r"expected a number in \[0, 10\]"):
            ra.apply_op(x, "Posterize", magnitude)
    for call, message in [(lambda: ra.posterize(x, -2), r"bits=-2 .* \[0, 8\]"),
                          (lambda: ra.posterize(x, tf.constant(9)), r"bits=9 .* \[0, 8\]"),
                          (lambda: ra.posterize(x, 2.5), r"bits=2.5 .* \[0, 8\]"),
                          (lambda: ra.solarize(x, 300), r"threshold=300 .* \[0, 256\]")]:
        with pytest.raises(ValueError, match=rf"^randaugment: {message}"):
            call()
    np.testing.assert_array_equal(ra.posterize(x, 0).numpy(), np.zeros_like(x))  # the ends
    np.testing.assert_array_equal(ra.solarize(x, 256).numpy(), x)


def test_apply_op_maps_magnitude_and_sign_onto_the_ops():
    x = IMAGES["rgb1"]
    h, w = x.shape[:2]
    cases = [
        ("Rotate", 5, False, ra.rotate(x, 15.0)), ("Rotate", 5, True, ra.rotate(x, -15.0)),
        ("ShearX", 10, False, ra.shear_x(x, 0.3)), ("ShearY", 10, True, ra.shear_y(x, -0.3)),
        ("TranslateX", 10, False, ra.translate_x(x, 0.45 * w)),
        ("TranslateY", 4, True, ra.translate_y(x, -0.18 * h)),
        ("Solarize", 9, True, ra.solarize(x, 26)), ("Posterize", 10, False, ra.posterize(x, 4)),
        ("Color", 9, False, ra.color(x, 1.81)), ("Contrast", 9, True, ra.contrast(x, 0.19)),
        ("Brightness", 5, True, ra.brightness(x, 0.55)),
        ("Sharpness", 10, False, ra.sharpness(x, 1.9)),
        ("AutoContrast", 3, True, ra.autocontrast(x)), ("Equalize", 3, False, ra.equalize(x)),
    ]
    for name, magnitude, negate, want in cases:
        np.testing.assert_array_equal(ra.apply_op(x, name, magnitude, negate).numpy(),
                                      want.numpy(), err_msg=name)


@pytest.mark.parametrize("name", ["rgb0", "grey"])
def test_magnitude_zero_is_the_identity_but_for_autocontrast_and_equalize(name):
    x = IMAGES[name]
    for op in ra.OPS:
        for negate in (False, True):
            out = ra.apply_op(x, op, 0, negate).numpy()
            if op in ("AutoContrast", "Equalize"):
                continue
            np.testing.assert_array_equal(out, x, err_msg=op)


# ----------------------------------------------------------------------------- rand_augment
def test_rand_augment_is_its_draws_applied_in_order():
    x = IMAGES["rgb0"]
    for k in range(6):
        seed = tf.constant([k, 11], tf.int64)
        ops, negate = ra.layer_draws(seed, 3)
        want = x
        for op, neg in zip(ops.numpy(), negate.numpy(), strict=True):
            want = ra.apply_op(want, ra.OPS[op], 7, bool(neg))
        np.testing.assert_array_equal(ra.rand_augment(x, seed, 3, 7).numpy(), want.numpy())


def test_draws_are_uniform_over_the_ops_with_random_signs():
    ops, negate = ra.layer_draws(tf.constant([1, 2], tf.int64), 14_000)
    counts = np.bincount(ops.numpy(), minlength=len(ra.OPS))
    assert len(counts) == 14 and counts.min() > 850 and counts.max() < 1150  # ~ +-4.7 sigma
    assert 0.48 < negate.numpy().mean() < 0.52


def test_rand_augment_is_deterministic_per_seed_and_varies_across_seeds():
    x = IMAGES["smooth"]
    a = ra.rand_augment(x, SEED, 2, 9).numpy()
    np.testing.assert_array_equal(ra.rand_augment(x, SEED, 2, 9).numpy(), a)
    outputs = {ra.rand_augment(x, tf.constant([s, 0], tf.int64), 2, 9).numpy().tobytes()
               for s in range(12)}
    assert len(outputs) >= 10  # only a rare draw of two no-op-like ops could coincide


@pytest.mark.parametrize("name", ["rgb1", "grey"])
def test_rand_augment_keeps_shape_and_dtype(name):
    x = IMAGES[name]
    out = ra.rand_augment(x, SEED, 3, 9)
    assert out.shape == x.shape and out.dtype == tf.uint8
    as_float = ra.rand_augment(x.astype(np.float32), SEED, 3, 9)
    assert as_float.dtype == tf.float32
    np.testing.assert_array_equal(as_float.numpy(), out.numpy())  # rounded to levels first
    np.testing.assert_array_equal(ra.rand_augment(x, SEED, 0, 9).numpy(), x)


def test_float_images_are_rounded_to_levels_and_kept_as_they_are_without_layers():
    """100.7 is rounded to level 101 (truncation gave 100); at magnitude 0 every op keeps a flat
    image, so two layers return 101.0 as float32. With no layers the input comes back as it is,
    float32 100.7 (not the rounded uint8 levels)."""
    x = np.full((4, 4, 3), 100.7, np.float32)
    seed = tf.constant([1, 2], tf.int64)
    out = ra.rand_augment(x, seed, 2, 0)
    assert out.dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), np.full((4, 4, 3), 101.0, np.float32))
    same = ra.rand_augment(x, seed, 0, 0)
    assert same.dtype == tf.float32
    np.testing.assert_array_equal(same.numpy(), x)


def test_rand_augment_at_magnitude_zero_changes_only_what_autocontrast_or_equalize_do():
    x = IMAGES["rgb0"]
    allowed = {x.tobytes(), ra.autocontrast(x).numpy().tobytes(),
               ra.equalize(x).numpy().tobytes()}
    for s in range(20):
        out = ra.rand_augment(x, tf.constant([s, 5], tf.int64), 1, 0).numpy()
        assert out.tobytes() in allowed


def test_rand_augment_runs_inside_dataset_map_like_eager():
    images = _RNG.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)

    def augment(index, image):
        return ra.rand_augment(image, tf.stack([tf.constant(4, tf.int64), index]), 2, 9)

    ds = tf.data.Dataset.from_tensor_slices(images).enumerate().map(augment)
    assert ds.element_spec == tf.TensorSpec((12, 10, 3), tf.uint8)  # static shape kept
    graph = np.stack(list(ds.as_numpy_iterator()))
    np.testing.assert_array_equal(np.stack(list(ds.as_numpy_iterator())), graph)
    eager = np.stack([augment(tf.constant(i, tf.int64), images[i]).numpy() for i in range(6)])
    np.testing.assert_array_equal(graph, eager)


# ----------------------------------------------------------------------------------- errors
def test_check_randaugment():
    assert ra.check_randaugment("x", 2, 9) == (2, 9.0)
    assert ra.check_randaugment("x", np.int64(0), 10.0) == (0, 10.0)
    assert ra.check_randaugment("x", ra.MAX_LAYERS, 9) == (10, 9.0)
    for layers in (-1, 1.5, True, "2", None, 11, 10**6):
        with pytest.raises(ValueError, match=rf"x: num_layers={layers!r} is invalid; expected an "
                                             r"integer in \[0, 10\] \(RandAugment ops"):
            ra.check_randaugment("x", layers, 9)
    with pytest.raises(ValueError, match=r"rand_augment: num_layers=11 is invalid"):
        ra.rand_augment(IMAGES["rgb0"], SEED, 11, 9)
    for magnitude in (-0.5, 10.5, "9", None, float("nan"), True):
        with pytest.raises(ValueError, match=r"x: magnitude=.* is invalid; expected a number in "
                                             r"\[0, 10\]"):
            ra.check_randaugment("x", 2, magnitude)
    with pytest.raises(ValueError, match=r"rand_augment: magnitude=12 is invalid"):
        ra.rand_augment(IMAGES["rgb0"], SEED, 2, 12)


def test_images_of_other_shapes_or_dtypes_are_refused():
    with pytest.raises(ValueError, match=r"randaugment: image.shape=\(4, 4, 2\) is invalid"):
        ra.rand_augment(np.zeros((4, 4, 2), np.uint8), SEED, 1, 5)
    with pytest.raises(ValueError, match=r"randaugment: image.dtype='int32' is invalid; "
                                         r"expected uint8"):
        ra.equalize(np.zeros((4, 4, 3), np.int32))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, bool])
def test_rand_augment_refuses_images_neither_uint8_nor_float(dtype):
    """Only uint8 and float (0..255) images are defined; an int or bool image used to be cast
    to float and augmented without a word (a bool mask came back as a bool 'image')."""
    x = np.zeros((6, 5, 3), dtype)
    with pytest.raises(ValueError, match=rf"rand_augment: image.dtype='{tf.as_dtype(dtype).name}'"
                                         r" is invalid; expected uint8, or a float type with "
                                         r"values in \[0, 255\]"):
        ra.rand_augment(x, SEED, 2, 9)


@pytest.mark.parametrize("low, high", [(-1.0, 200.0), (0.0, 255.5), (0.0, float("nan"))])
def test_rand_augment_refuses_known_float_values_outside_0_255(low, high):
    """A float image whose values are known before the graph runs (eager, or a constant) must
    lie in [0, 255]; normalized images (negative values) used to be clipped silently."""
    x = np.full((6, 5, 3), 100.0, np.float32)
    x[0, 0, 0], x[1, 1, 1] = low, high
    with pytest.raises(ValueError, match=r"rand_augment: image=.*is invalid; expected values in "
                                         r"\[0, 255\]"):
        ra.rand_augment(x, SEED, 2, 9)
    ok = np.clip(np.nan_to_num(x), 0, 255)
    assert ra.rand_augment(ok, SEED, 2, 9).dtype == tf.float32  # in range: accepted


@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 1)])
def test_rand_augment_refuses_empty_images_whatever_the_draw(shape):
    """An empty image used to pass through the ops that ignore geometry and fail inside TF
    (ImageProjectiveTransformV3 "output dimensions must be positive", an out-of-bounds slice in
    Equalize) for the others, so the outcome depended on the seed."""
    x = np.zeros(shape, np.uint8)
    for s in range(4):
        with pytest.raises(ValueError, match=re.escape(f"randaugment: image.shape={shape!r} is "
                                                       "invalid; expected a non-empty")):
            ra.rand_augment(x, tf.constant([s, 1], tf.int64), 2, 9)
    with pytest.raises(ValueError, match=r"expected a non-empty"):
        ra.equalize(x)


@pytest.mark.parametrize("call, message", [
    (lambda x: ra.rotate(x, float("nan")), r"degrees=nan"),
    (lambda x: ra.rotate(x, float("inf")), r"degrees=inf"),
    (lambda x: ra.shear_x(x, float("inf")), r"shear=inf"),
    (lambda x: ra.shear_y(x, tf.constant(float("nan"))), r"shear=nan"),
    (lambda x: ra.translate_x(x, float("nan")), r"pixels=nan"),
    (lambda x: ra.translate_y(x, -float("inf")), r"pixels=-inf"),
    (lambda x: ra.color(x, float("nan")), r"factor=nan"),
    (lambda x: ra.contrast(x, float("inf")), r"factor=inf"),
    (lambda x: ra.brightness(x, float("nan")), r"factor=nan"),
    (lambda x: ra.sharpness(x, float("nan")), r"factor=nan"),
])
def test_known_non_finite_op_parameters_are_refused(call, message):
    """PIL refuses none of these either, but its results are meaningless: a NaN rotation gave
    an all-grey image (128) and a NaN colour factor an all-black one, without a word."""
    with pytest.raises(ValueError, match=rf"^randaugment: {message} is invalid; expected a "
                                         r"finite number"):
        call(IMAGES["rgb0"])


def test_affine_refuses_a_matrix_without_six_entries():
    with pytest.raises(ValueError, match=r"^randaugment: matrix=\(1, 0, 0, 0, 1\) is invalid; "
                                         r"expected 6 numbers \(a, b, c, d, e, f\)"):
        ra.affine(IMAGES["rgb0"], (1, 0, 0, 0, 1))

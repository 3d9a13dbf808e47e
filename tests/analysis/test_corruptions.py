"""CIFAR-10-C corruptions against references written here from the paper's formulas.

Each reference is independent of the module's implementation: float64 NumPy with explicit
kernels (gaussian_blur, defocus_blur), Python's `colorsys` per pixel (brightness, saturate),
OpenCV's JPEG codec (jpeg_compression), an area-average written in NumPy (pixelate). The noises
redraw the same numbers from `example_rng` (the documented draw order) and are also checked by
their distributions, so a wrong scale would fail even if the draw were shared.
"""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from cnnjax.analysis import corruptions as C


def _images(n: int = 6, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Image-like uint8 test images: smooth colour fields with a bright square (edges) at a
    random place."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.uniform(0, 255, (n, 32, 32, channels)), (0, 1.5, 1.5, 0))
    x = (x - x.mean()) * 5 + 120
    for image, (top, left) in zip(x, rng.integers(0, 20, (n, 2)), strict=True):
        image[top:top + 12, left:left + 12] += 60
    return np.clip(x, 0, 255).astype(np.uint8)


def _grey(level: float = 128.0, n: int = 20) -> np.ndarray:
    return np.full((n, 32, 32, 3), level)


def _reference(images: np.ndarray, name: str, severity: int, formula, seed: int = 0):
    """`formula(x in [0, 1], c, rng)` per image with the module's per-example generators,
    clipped and scaled to [0, 255] as make_cifar_c.py returns it."""
    c = C.PARAMETERS[name][severity - 1]
    return np.stack([np.clip(formula(x / 255.0, c, C.example_rng(seed, name, severity, i)), 0, 1)
                     * 255 for i, x in enumerate(images.astype(np.float64))])


# ------------------------------------------------------------------------------- noises
@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_noises_match_the_formulas_with_the_same_draws(severity):
    x = _images()
    formulas = {
        "gaussian_noise": lambda x, c, rng: x + c * rng.standard_normal(x.shape),
        "shot_noise": lambda x, c, rng: rng.poisson(x * c) / c,
        "speckle_noise": lambda x, c, rng: x * (1 + c * rng.standard_normal(x.shape)),
        "impulse_noise": lambda x, c, rng: np.where(
            rng.random(x.shape) <= c, (rng.random(x.shape) < 0.5) * 1.0, x),
    }
    for name, formula in formulas.items():
        np.testing.assert_allclose(C.corrupt(x, name, severity, seed=0),
                                   _reference(x, name, severity, formula), atol=1e-9,
                                   err_msg=name)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_noise_distributions_have_the_tabled_scale(severity):
    """On mid-grey (x = 128/255, so clipping is > 5 sigma away) over 61,440 values: the std
    of additive / multiplicative noise is c within 3% (the std's own sampling error is 0.3%),
    shot noise has variance x / c within 5%, impulse noise flips a fraction c within 5 binomial
    standard deviations, half of them to 255."""
    grey = _grey()
    x = 128 / 255
    n = grey.size
    diff = (C.corrupt(grey, "gaussian_noise", severity) - grey) / 255
    c = C.PARAMETERS["gaussian_noise"][severity - 1]
    assert abs(diff.std() / c - 1) < 0.03 and abs(diff.mean()) < 4 * c / np.sqrt(n)
    diff = (C.corrupt(grey, "speckle_noise", severity) - grey) / 255 / x
    assert abs(diff.std() / C.PARAMETERS["speckle_noise"][severity - 1] - 1) < 0.03
    c = C.PARAMETERS["shot_noise"][severity - 1]
    shot = C.corrupt(grey, "shot_noise", severity) / 255
    assert abs(shot.var() / (x / c) - 1) < 0.05 and abs(shot.mean() - x) < 4 * np.sqrt(x / c / n)
    c = C.PARAMETERS["impulse_noise"][severity - 1]
    out = C.corrupt(grey, "impulse_noise", severity)
    flipped = out != grey
    assert abs(flipped.mean() - c) < 5 * np.sqrt(c * (1 - c) / n)
    assert set(np.unique(out[flipped])) <= {0.0, 255.0}
    assert abs((out[flipped] == 255).mean() - 0.5) < 5 * np.sqrt(0.25 / flipped.sum())


# -------------------------------------------------------------------------------- blurs
def _correlate(image: np.ndarray, kernel: np.ndarray, pad_mode: str) -> np.ndarray:
    """2-D correlation of every channel of `image` with `kernel` (odd sides), padded by NumPy's
    `pad_mode`, in float64 by explicit shifted sums."""
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(image, ((ry, ry), (rx, rx), (0, 0)), mode=pad_mode)
    out = np.zeros_like(image, dtype=np.float64)
    h, w = image.shape[:2]
    for dy in range(kernel.shape[0]):
        for dx in range(kernel.shape[1]):
            out += kernel[dy, dx] * padded[dy:dy + h, dx:dx + w]
    return out


def _gauss_1d(sigma: float, radius: int) -> np.ndarray:
    k = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    return k / k.sum()


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_gaussian_blur_is_skimage_gaussian_with_its_defaults(severity):
    """skimage.filters.gaussian(x, sigma, multichannel=True): per channel, kernel radius
    int(4 sigma + 0.5), edge ('nearest') padding. Reference: that kernel, float64; 1e-9."""
    sigma = C.PARAMETERS["gaussian_blur"][severity - 1]
    k = _gauss_1d(sigma, int(4 * sigma + 0.5))
    x = _images(2)
    ref = np.stack([np.clip(_correlate(im / 255.0, np.outer(k, k), "edge"), 0, 1) * 255
                    for im in x.astype(np.float64)])
    np.testing.assert_allclose(C.corrupt(x, "gaussian_blur", severity), ref, atol=1e-9)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_defocus_blur_is_the_authors_antialiased_disk(severity):
    """make_cifar_c.py's disk(radius, alias_blur): a 17x17 disk X^2 + Y^2 <= r^2 normalized,
    blurred by OpenCV's 3x3 Gaussian exp(-i^2 / 2 sigma^2) (reflect-101 border); the image is
    then correlated with it with OpenCV's reflect-101 border (NumPy's 'reflect'). The module's
    kernel is float32 as the authors': 1e-4 levels."""
    radius, alias = C.PARAMETERS["defocus_blur"][severity - 1]
    grid = np.arange(-8, 9)
    disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    g = _gauss_1d(alias, 1)
    kernel = _correlate(disk[:, :, None], np.outer(g, g), "reflect")[:, :, 0]
    np.testing.assert_allclose(C.disk_kernel(radius, alias), kernel, atol=1e-7)
    x = _images(2)
    ref = np.stack([np.clip(_correlate(im / 255.0, kernel, "reflect"), 0, 1) * 255
                    for im in x.astype(np.float64)])
    np.testing.assert_allclose(C.corrupt(x, "defocus_blur", severity), ref, atol=1e-4)


# -------------------------------------------------------------------------- colour, digital
@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_contrast_scales_about_each_channels_mean(severity):
    c = C.PARAMETERS["contrast"][severity - 1]
    x = _images().astype(np.float64) / 255
    mean = x.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(C.corrupt(_images(), "contrast", severity),
                               np.clip((x - mean) * c + mean, 0, 1) * 255, atol=1e-9)


def _via_colorsys(image: np.ndarray, change) -> np.ndarray:
    """Per pixel through Python's colorsys HSV with `change(h, s, v) -> (h, s, v)`."""
    out = np.empty(image.shape)
    for i, j in np.ndindex(*image.shape[:2]):
        out[i, j] = colorsys.hsv_to_rgb(*change(*colorsys.rgb_to_hsv(*image[i, j] / 255.0)))
    return np.clip(out, 0, 1) * 255


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_brightness_and_saturate_match_colorsys(severity):
    """skimage's rgb2hsv/hsv2rgb are the textbook conversions colorsys implements: 1e-9."""
    x = _images(2)
    b = C.PARAMETERS["brightness"][severity - 1]
    a, s0 = C.PARAMETERS["saturate"][severity - 1]
    bright = np.stack([_via_colorsys(im, lambda h, s, v: (h, s, min(max(v + b, 0), 1)))
                       for im in x])
    sat = np.stack([_via_colorsys(im, lambda h, s, v: (h, min(max(s * a + s0, 0), 1), v))
                    for im in x])
    np.testing.assert_allclose(C.corrupt(x, "brightness", severity), bright, atol=1e-9)
    np.testing.assert_allclose(C.corrupt(x, "saturate", severity), sat, atol=1e-9)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_jpeg_compression_equals_opencvs_codec_at_the_tabled_quality(severity):
    """PIL's and OpenCV's JPEG (both libjpeg, 4:2:0 for RGB) agree bit for bit here; a grey
    image is one luma plane. Exact equality (a different libjpeg build could shift a level)."""
    import cv2

    quality = C.PARAMETERS["jpeg_compression"][severity - 1]
    for x in (_images(2), _images(2, channels=1)):
        ref = []
        for im in x:
            bgr = im[:, :, ::-1] if im.shape[2] == 3 else im[:, :, 0]
            ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
            decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
            ref.append(decoded[:, :, ::-1] if im.shape[2] == 3 else decoded[:, :, None])
        np.testing.assert_array_equal(C.corrupt(x, "jpeg_compression", severity), np.stack(ref))


def _box_resize(image: np.ndarray, size: int) -> np.ndarray:
    """PIL's BOX resampling as its `precompute_coeffs` defines it: output pixel o averages the
    inputs x whose centres lie within its footprint, -0.5 < (x + 0.5 - centre) / max(scale, 1)
    <= 0.5 with centre = (o + 0.5) * scale (an area average when shrinking, the nearest input
    when enlarging), rounded half up to uint8 levels as PIL stores it."""
    def weights(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        w = np.zeros((n_out, n_in))
        for o in range(n_out):
            d = (np.arange(n_in) + 0.5 - (o + 0.5) * scale) / max(scale, 1.0)
            w[o] = (d > -0.5) & (d <= 0.5)
        return w / w.sum(axis=1, keepdims=True)

    w = weights(image.shape[0], size)  # square images; width first, as PIL does, rounded
    wide = np.clip(np.floor(np.einsum("pj,ijc->ipc", w, image) + 0.5), 0, 255)
    return np.clip(np.floor(np.einsum("oi,ipc->opc", w, wide) + 0.5), 0, 255)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_pixelate_is_a_box_down_and_up_sampling(severity):
    """Down to int(32 c) and back to 32 by BOX resampling, width then height, each pass rounded
    half up to a level: PIL's result exactly (its fixed-point weights need no tolerance here)."""
    small = int(32 * C.PARAMETERS["pixelate"][severity - 1])
    x = _images(2)
    ref = np.stack([_box_resize(_box_resize(im.astype(np.float64), small), 32) for im in x])
    np.testing.assert_array_equal(C.corrupt(x, "pixelate", severity), ref)


# ---------------------------------------------------------------------- properties, errors
def test_distance_from_the_original_grows_with_severity():
    """Mean squared distance over 16 images rises strictly from severity 1 to 5 for every
    corruption but saturate, whose table is not ordered that way (s x 0.3, x 0.1, then x 1.5,
    x 2 + 0.1, x 2.5 + 0.2): its distance rises from 1 to 2 and from 3 to 5."""
    x = _images(16)
    for name in C.CORRUPTIONS:
        d = [np.mean((C.corrupt(x, name, s) - x) ** 2) for s in C.SEVERITIES]
        if name == "saturate":
            assert d[0] < d[1] and d[2] < d[3] < d[4], (name, d)
        else:
            assert all(np.diff(d) > 0), (name, d)


def test_deterministic_per_seed_and_per_example_whatever_the_batching():
    x = _images(4)
    for name in C.CORRUPTIONS:
        a = C.corrupt(x, name, 3, seed=7)
        np.testing.assert_array_equal(a, C.corrupt(x, name, 3, seed=7))
        np.testing.assert_array_equal(a[2:], C.corrupt(x[2:], name, 3, seed=7, first_index=2))
        np.testing.assert_array_equal(a[1], C.corrupt(x[1], name, 3, seed=7, first_index=1))
        assert a.shape == x.shape and a.dtype == np.float64 and 0 <= a.min() <= a.max() <= 255
        if name.endswith("_noise"):
            assert not np.array_equal(a, C.corrupt(x, name, 3, seed=8))


def test_grey_images_take_every_corruption_but_saturate():
    grey = _images(2, channels=1)
    assert C.available(1) == tuple(n for n in C.CORRUPTIONS if n != "saturate")
    assert C.available(3) == C.CORRUPTIONS
    rgb = np.repeat(grey, 3, axis=-1)
    for name in C.available(1):
        out = C.corrupt(grey, name, 4)
        assert out.shape == grey.shape
        if name in ("brightness", "contrast", "gaussian_blur", "defocus_blur", "pixelate"):
            # deterministic and channel-wise: the grey result is the replicated RGB result's
            np.testing.assert_allclose(out[..., 0], C.corrupt(rgb, name, 4)[..., 0], atol=1e-9)
    with pytest.raises(ValueError, match=r"corruptions: name='saturate' is invalid; it is "
                                         r"defined for RGB images only, and these have 1 "
                                         r"channel; for grey images expected one of "
                                         r"\['gaussian_noise'"):
        C.corrupt(grey, "saturate", 1)


def test_quantize_truncates_as_cifar10c_was_stored():
    values = np.array([0.0, 0.99, 1.0, 254.999, 255.0, 300.0, -3.0])
    np.testing.assert_array_equal(C.quantize(values), [0, 0, 1, 254, 255, 255, 0])
    assert C.quantize(values).dtype == np.uint8


@pytest.mark.parametrize("call, message", [
    (lambda x: C.corrupt(x, "fog", 1),
     r"corruptions: name='fog' is invalid; expected one of \['gaussian_noise', 'shot_noise'"),
    (lambda x: C.corrupt(x, "contrast", 0),
     r"corruptions: severity=0 is invalid; expected an integer from 1 to 5\."),
    (lambda x: C.corrupt(x, "contrast", 6), r"severity=6 is invalid"),
    (lambda x: C.corrupt(x, "contrast", True), r"severity=True is invalid"),
    (lambda x: C.corrupt(x, "contrast", 2.5), r"severity=2.5 is invalid"),
    (lambda x: C.corrupt(x, "contrast", 1, seed=-1),
     r"corruptions: seed=-1 is invalid; expected a non-negative integer\."),
    (lambda x: C.corrupt(np.zeros((64, 64, 3)), "contrast", 1),
     r"corruptions: images='<array of shape \(64, 64, 3\)>' is invalid; expected \[32, 32, C\] "
     r"or \[N, 32, 32, C\] with C = 1 or 3 \(the CIFAR-10-C parameters are for 32x32 images"),
    (lambda x: C.corrupt(np.zeros((32, 32, 4)), "contrast", 1), r"with C = 1 or 3"),
    (lambda x: C.corrupt(np.zeros((32, 32, 3), np.int64), "contrast", 1),
     r"images='<int64 array>' is invalid; expected uint8 or float values in \[0, 255\]"),
    (lambda x: C.corrupt(x / 255.0 - 0.5, "contrast", 1),
     r"images='<array with values in \[-0.5, .*\]>' is invalid; expected values in \[0, 255\] "
     r"\(not \[0, 1\], nor normalized\)"),
    (lambda x: C.corrupt(np.full((32, 32, 3), np.nan), "contrast", 1),
     r"expected values in \[0, 255\]"),
])
def test_bad_inputs_name_the_argument_value_and_choices(call, message):
    with pytest.raises(ValueError, match=message):
        call(_images(1)[0].astype(np.float64))

"""CIFAR-10-C's (32x32) and ImageNet-C's (224x224) corruptions against references written here
from the authors' formulas.

Each reference is independent of the module's implementation: float64 NumPy with explicit
kernels (gaussian_blur, defocus_blur), Python's `colorsys` per pixel (brightness, saturate),
OpenCV's JPEG codec (jpeg_compression), an area-average written in NumPy (pixelate). The noises
redraw the same numbers from `example_rng` (the documented draw order) and are also checked by
their distributions, so a wrong scale would fail even if the draw were shared.
"""

from __future__ import annotations

import colorsys
import sys

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
    clipped and scaled to [0, 255] as make_cifar_c.py returns it (the table of the images'
    size)."""
    c = C.parameters(images.shape[1])[name][severity - 1]
    return np.stack([np.clip(formula(x / 255.0, c, C.example_rng(seed, name, severity, i)), 0, 1)
                     * 255 for i, x in enumerate(images.astype(np.float64))])


# ------------------------------------------------------------------------------- noises
#: The authors' noise formulas on [0, 1] pixels, each drawing from `rng` as the module does.
NOISE_FORMULAS = {
    "gaussian_noise": lambda x, c, rng: x + c * rng.standard_normal(x.shape),
    "shot_noise": lambda x, c, rng: rng.poisson(x * c) / c,
    "speckle_noise": lambda x, c, rng: x * (1 + c * rng.standard_normal(x.shape)),
    "impulse_noise": lambda x, c, rng: np.where(
        rng.random(x.shape) <= c, (rng.random(x.shape) < 0.5) * 1.0, x),
}


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_noises_match_the_formulas_with_the_same_draws(severity):
    x = _images()
    for name, formula in NOISE_FORMULAS.items():
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


# ----------------------------------------------------------------- blurs added from the table
def _textured(n: int = 2, channels: int = 3, seed: int = 1, side: int = 32) -> np.ndarray:
    """uint8 images of independent uniform levels 1-254: sharp texture, no flat region, so no
    blurred value sits on a whole level (glass blur truncates one)."""
    return np.random.default_rng(seed).integers(1, 255, (n, side, side, channels)).astype(
        np.uint8)


def _bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """Corner-aligned linear interpolation from n_in to n_out samples as a matrix: output o
    reads input o (n_in - 1) / (n_out - 1) between its two neighbours (scipy's zoom with
    grid_mode False)."""
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
        at = o * (n_in - 1) / (n_out - 1)
        i0 = min(int(np.floor(at)), n_in - 1)
        t = at - i0
        w[o, i0] += 1 - t
        if t > 0:
            w[o, i0 + 1] += t
    return w


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_zoom_blur_averages_corner_aligned_bilinear_zooms(severity):
    """make_cifar_c.py: mean of the image and, for each f in np.arange(1, c, 0.01), its centre
    ceil(32 / f) square zoomed to round(side f) pixels by order-1 scipy zoom, centre-cropped.
    Reference: explicit float64 interpolation matrices; the module works in float32 as the
    authors: 1e-3 levels."""
    stop = C.PARAMETERS["zoom_blur"][severity - 1]
    factors = np.arange(1, stop, 0.01)
    # float rounding puts the stop itself in the authors' arange at severities 1-2 only
    assert len(factors) == (7, 12, 16, 21, 26)[severity - 1]
    x = _images(2).astype(np.float64) / 255
    ref = x.copy()
    for f in factors:
        side = int(np.ceil(32 / f))
        top = (32 - side) // 2
        size = int(round(side * f))
        w = _bilinear_1d(side, size)
        zoomed = np.einsum("oi,nijc,pj->nopc", w, x[:, top:top + side, top:top + side], w)
        trim = (size - 32) // 2
        ref += zoomed[:, trim:trim + 32, trim:trim + 32]
    ref = np.clip(ref / (len(factors) + 1), 0, 1) * 255
    np.testing.assert_allclose(C.corrupt(_images(2), "zoom_blur", severity), ref, atol=1e-3)


def _authors_shuffle(pixels: np.ndarray, offsets: np.ndarray, max_delta: int = 1,
                     ) -> np.ndarray:
    """make_cifar_c.py's (and make_imagenet_c.py's, side 224) glass-blur loop, statement for
    statement, on a copy of `pixels`: rows and columns from side - d down to d + 1."""
    x = pixels.copy()
    side, d = x.shape[0], max_delta
    for a, h in enumerate(range(side - d, d, -1)):
        for b, w in enumerate(range(side - d, d, -1)):
            dx, dy = offsets[a, b]
            h_prime, w_prime = h + dy, w + dx
            x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
    return x


@pytest.mark.parametrize("channels", [3, 1])
def test_shuffle_pixels_is_the_authors_loop(channels):
    """The authors' tuple "swap" of NumPy pixel views copies (h', w') onto (h, w): the gather
    equals their loop exactly, and differs from a true swap."""
    rng = np.random.default_rng(3)
    pixels = _textured(1, channels)[0]
    offsets = rng.integers(-1, 1, size=(30, 30, 2))
    out = C.shuffle_pixels(pixels, offsets)
    np.testing.assert_array_equal(out, _authors_shuffle(pixels, offsets))
    swapped = pixels.copy()
    for a, h in enumerate(range(31, 1, -1)):
        for b, w in enumerate(range(31, 1, -1)):
            dx, dy = offsets[a, b]
            swapped[[h, h + dy], [w, w + dx]] = swapped[[h + dy, h], [w + dx, w]]
    assert not np.array_equal(out, swapped)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_glass_blur_is_blur_truncate_shuffle_blur(severity):
    """Gaussian blur (explicit radius-int(4 sigma + 0.5) kernel, edge padding), np.uint8 of
    x 255 (truncation), the authors' loop per iteration with offsets redrawn from example_rng
    as one integers(-1, 1, (30, 30, 2)) per pass, blur again: 1e-9 levels."""
    sigma, _, iterations = C.PARAMETERS["glass_blur"][severity - 1]
    k = _gauss_1d(sigma, int(4 * sigma + 0.5))
    x = _textured(2)
    ref = []
    for i, im in enumerate(x.astype(np.float64)):
        rng = C.example_rng(0, "glass_blur", severity, i)
        pixels = np.uint8(_correlate(im / 255.0, np.outer(k, k), "edge") * 255)
        for _ in range(iterations):
            pixels = _authors_shuffle(pixels, rng.integers(-1, 1, size=(30, 30, 2)))
        ref.append(np.clip(_correlate(pixels / 255.0, np.outer(k, k), "edge"), 0, 1) * 255)
    np.testing.assert_allclose(C.corrupt(x, "glass_blur", severity), np.stack(ref), atol=1e-9)


def test_motion_kernel_matches_hand_computed_taps():
    """radius 6 -> 2 ceil(6) + 1 = 13 taps; sigma 1 -> weights e^(-i^2 / 2) / sum; offsets
    (ceil(i cos a - 1/2), ceil(i sin a - 1/2)) worked out by hand for 0, 90, 30 and -45
    degrees."""
    weights, offsets = C.motion_kernel(6, 1, 0)
    e = np.array([1, 0.60653066, 0.13533528, 0.011108997, 3.3546263e-4, 3.7266532e-6,
                  1.5229980e-8, 2.2897349e-11, 1.2664166e-14, 2.5767571e-18, 1.9287498e-22,
                  5.3110922e-27, 5.3801862e-32])  # e^0, e^-1/2, e^-2, ..., e^-72
    np.testing.assert_allclose(weights, e / e.sum(), rtol=1e-7)
    np.testing.assert_array_equal(offsets, [[i, 0] for i in range(13)])
    np.testing.assert_array_equal(C.motion_kernel(6, 1, 90)[1], [[0, i] for i in range(13)])
    assert len(C.motion_kernel(8, 2, 10)[0]) == 17 and len(C.motion_kernel(9, 2.5, 0)[0]) == 19
    # a fractional radius rounds up (GetOptimalKernelWidth1D): 2 ceil(2.5) + 1 = 7, not 6
    assert len(C.motion_kernel(2.5, 1, 0)[0]) == 7
    np.testing.assert_array_equal(C.motion_kernel(6, 1, 30)[1].T, [
        [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 10], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]])
    np.testing.assert_array_equal(C.motion_kernel(6, 1, -45)[1].T, [
        [0, 1, 1, 2, 3, 4, 4, 5, 6, 6, 7, 8, 8],
        [0, -1, -1, -2, -3, -4, -4, -5, -6, -6, -7, -8, -8]])


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_motion_blur_is_imagemagicks_one_sided_line_kernel(severity):
    """Per pixel, in plain Python: sum_i w_i in(y + dy_i, x + dx_i) with coordinates clamped to
    the image (ImageMagick's edge virtual pixels), angle = example_rng(...).uniform(-45, 45),
    taps from math.ceil / math.cos / math.sin, rounded half up: bit-exact."""
    radius, sigma = C.PARAMETERS["motion_blur"][severity - 1]
    x = _images(2)
    ref = np.stack([_motion_plain(im.astype(np.float64), radius, sigma, C.example_rng(
        0, "motion_blur", severity, n).uniform(-45, 45)) for n, im in enumerate(x)])
    np.testing.assert_array_equal(C.corrupt(x, "motion_blur", severity), ref)


def _motion_plain(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's motion blur of `image` ([H, W, C] levels) pixel by pixel in plain Python:
    2 ceil(radius) + 1 taps, edge-clamped, rounded half up."""
    import math

    width = 2 * math.ceil(radius) + 1
    w = [math.exp(-i * i / (2 * sigma * sigma)) for i in range(width)]
    w = [v / sum(w) for v in w]
    a = math.radians(angle)
    taps = [(math.ceil(i * math.cos(a) - 0.5), math.ceil(i * math.sin(a) - 0.5))
            for i in range(width)]
    h, wd = image.shape[:2]
    out = np.empty(image.shape)
    for r, c, ch in np.ndindex(*image.shape):
        total = sum(wi * image[min(max(r + dy, 0), h - 1), min(max(c + dx, 0), wd - 1), ch]
                    for wi, (dx, dy) in zip(w, taps, strict=True))
        out[r, c, ch] = math.floor(total + 0.5)
    return out


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_snow_is_zoomed_thresholded_streaked_flakes_on_a_whitened_image(severity):
    """make_cifar_c.py's snow, redrawing N(mean, std) flakes and then the angle U(-135, -45)
    from example_rng: flakes zoomed by explicit corner-aligned interpolation matrices, zeroed
    below the threshold, truncated to uint8, motion-blurred in plain Python, added as drawn
    and rotated by 180 degrees to keep x + (1 - keep) max(x, 1.5 luma + 0.5) with the ITU-R
    601 luma (0.299, 0.587, 0.114). The module's image and luma are float32: 1e-3 levels."""
    mean, std, zoom, threshold, radius, sigma, keep = C.PARAMETERS["snow"][severity - 1]
    x = _images(2)
    ref = []
    for i, im in enumerate(x.astype(np.float64) / 255):
        rng = C.example_rng(0, "snow", severity, i)
        flakes = rng.normal(mean, std, (32, 32))
        side = int(np.ceil(32 / zoom))
        top = (32 - side) // 2
        size = int(round(side * zoom))
        w = _bilinear_1d(side, size)
        trim = (size - 32) // 2
        flakes = (w @ flakes[top:top + side, top:top + side] @ w.T)[trim:trim + 32,
                                                                     trim:trim + 32]
        flakes = np.floor(np.clip(np.where(flakes < threshold, 0, flakes), 0, 1) * 255)
        streaks = _motion_plain(flakes[:, :, None], radius, sigma, rng.uniform(-135, -45)) / 255
        assert 0 < np.count_nonzero(streaks) < streaks.size  # some flakes, not a white-out
        luma = im @ np.array([0.299, 0.587, 0.114])
        whiter = keep * im + (1 - keep) * np.maximum(im, luma[:, :, None] * 1.5 + 0.5)
        ref.append(np.clip(whiter + streaks + streaks[::-1, ::-1], 0, 1) * 255)
    np.testing.assert_allclose(C.corrupt(x, "snow", severity), np.stack(ref), atol=1e-3)


# ----------------------------------------------------------------------------------- fog
def _plasma_plain(rng: np.random.Generator, size: int, decay: float) -> np.ndarray:
    """Diamond-square in plain Python on a torus, point by point: per step size s, square
    centres (mean of the 4 corners), then diamond points on corner rows, then on centre rows
    (mean of the 2 corners and 2 centres around each), each + wibble * U(-wibble, wibble)
    drawn one scalar at a time in row-major order; wibble 100, divided by `decay` per step;
    finally scaled to [0, 1]."""
    m = [[0.0] * size for _ in range(size)]
    s, wibble = size, 100.0
    while s >= 2:
        h, n = s // 2, size // s
        for i in range(n):
            for j in range(n):
                y, x = i * s, j * s
                corners = (m[y][x] + m[(y + s) % size][x]) + (
                    m[y][(x + s) % size] + m[(y + s) % size][(x + s) % size])
                m[y + h][x + h] = corners / 4 + wibble * rng.uniform(-wibble, wibble)
        for i in range(n):  # on corner rows: centres above and below, corners left and right
            for j in range(n):
                y, x = i * s, j * s + h
                total = (m[y + h][x] + m[(y - h) % size][x]) + (m[y][x - h] + m[y][(x + h) % size])
                m[y][x] = total / 4 + wibble * rng.uniform(-wibble, wibble)
        for i in range(n):  # on centre rows: centres left and right, corners above and below
            for j in range(n):
                y, x = i * s + h, j * s
                total = (m[y][x + h] + m[y][(x - h) % size]) + (m[y - h][x] + m[(y + h) % size][x])
                m[y][x] = total / 4 + wibble * rng.uniform(-wibble, wibble)
        s //= 2
        wibble /= decay
    low = min(min(row) for row in m)
    high = max(max(row) for row in m) - low
    return np.array([[(v - low) / high for v in row] for row in m])


@pytest.mark.parametrize("size, decay", [(32, 3.0), (32, 1.75), (8, 2.0)])
def test_plasma_fractal_is_diamond_square(size, decay):
    out = C.plasma_fractal(np.random.default_rng(4), size, decay)
    np.testing.assert_allclose(out, _plasma_plain(np.random.default_rng(4), size, decay),
                               atol=1e-12)
    assert out.shape == (size, size) and out.min() == 0 and out.max() == 1


@pytest.mark.parametrize("size", [24, 48, 1, 0, 2.0])
def test_plasma_fractal_refuses_a_mapsize_not_a_power_of_two(size):
    """The diamond-square fill only reaches every cell of a power-of-two grid (the authors
    assert it): at 24 the step goes 24, 12, 6, 3 and rows/columns 2 mod 3 stayed
    `np.empty` garbage; at 1 the result was 0 / 0 = NaN; at 0 an IndexError."""
    with pytest.raises(ValueError, match=rf"corruptions: mapsize={size!r} is invalid; expected "
                                         r"a power of two >= 2"):
        C.plasma_fractal(np.random.default_rng(0), size)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_fog_adds_plasma_and_rescales_by_the_peak(severity):
    """x + a plasma, times max(x) / (max(x) + a), max over the whole image: 1e-9 levels."""
    a, decay = C.PARAMETERS["fog"][severity - 1]
    x = _images(2)
    ref = []
    for i, im in enumerate(x.astype(np.float64) / 255):
        plasma = _plasma_plain(C.example_rng(0, "fog", severity, i), 32, decay)
        ref.append(np.clip((im + a * plasma[:, :, None]) * im.max() / (im.max() + a), 0, 1)
                   * 255)
    np.testing.assert_allclose(C.corrupt(x, "fog", severity), np.stack(ref), atol=1e-9)


# ---------------------------------------------------------------------------------- elastic
def _sample(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, fold) -> np.ndarray:
    """Bilinear samples of `image` ([H, W, C], float64) at float positions, the out-of-range
    neighbours mapped back by `fold(index, n)`: loops over output pixels."""
    h, w = image.shape[:2]
    out = np.empty((*rows.shape, image.shape[2]))
    for p in np.ndindex(*rows.shape):
        r0, c0 = int(np.floor(rows[p])), int(np.floor(cols[p]))
        tr, tc = rows[p] - r0, cols[p] - c0
        out[p] = sum(wr * wc * image[fold(r0 + dr, h), fold(c0 + dc, w)]
                     for dr, wr in ((0, 1 - tr), (1, tr)) for dc, wc in ((0, 1 - tc), (1, tc)))
    return out


def _reflect_half(i: int, n: int) -> int:
    """scipy's 'reflect' (d c b a | a b c d | d c b a)."""
    i %= 2 * n
    return 2 * n - 1 - i if i >= n else i


def _reflect_101(i: int, n: int) -> int:
    """OpenCV's BORDER_REFLECT_101 (d c b | a b c d | c b a)."""
    i %= 2 * n - 2
    return 2 * n - 2 - i if i >= n else i


def test_elastic_fields_redraw_from_the_generator():
    """Three points (x, y) = (26, 26), (26, 6), (6, 6) moved by U(-a, a) (float32); the affine
    map solved in float64 (1e-6); dx, dy = U(-1, 1) fields smoothed by an explicit Gaussian of
    radius int(3 sigma + 0.5) with half-sample symmetric padding, times alpha (float32: 1e-6)."""
    for c in C.PARAMETERS["elastic_transform"]:
        alpha, sigma, a = c
        matrix, dx, dy = C.elastic_fields(c, np.random.default_rng(9))
        rng = np.random.default_rng(9)
        src = np.array([[26, 26], [26, 6], [6, 6]], np.float32)
        dst = (src + rng.uniform(-a, a, (3, 2)).astype(np.float32)).astype(np.float64)
        solved = np.linalg.solve(np.c_[src, np.ones(3)].astype(np.float64), dst).T
        np.testing.assert_allclose(matrix, solved, atol=1e-6)
        for field in (dx, dy):
            noise = rng.uniform(-1, 1, (32, 32))
            if sigma:
                radius = int(3 * sigma + 0.5)
                k = _gauss_1d(sigma, radius)
                noise = _correlate(noise[:, :, None], np.outer(k, k), "symmetric")[:, :, 0]
            np.testing.assert_allclose(field, noise * alpha, atol=1e-6)
            assert field.dtype == np.float32


def test_elastic_displacement_is_half_sample_reflected_bilinear():
    """With the identity affine, out(r, c) = bilinear in(r + dy, c + dx) with scipy's 'reflect'
    borders; displacements up to 3 pixels push samples past every border. float32: 1e-6."""
    rng = np.random.default_rng(5)
    image = _images(1)[0].astype(np.float32) / 255
    dx = rng.uniform(-3, 3, (32, 32)).astype(np.float32)
    dy = rng.uniform(-3, 3, (32, 32)).astype(np.float32)
    identity = np.float64([[1, 0, 0], [0, 1, 0]])
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    ref = _sample(image.astype(np.float64), rows + dy.astype(np.float64),
                  cols + dx.astype(np.float64), _reflect_half)
    np.testing.assert_allclose(C.elastic_warp(image, identity, dx, dy), ref, atol=1e-6)


def test_elastic_affine_is_opencvs_inverse_mapped_bilinear():
    """With no displacement, out(p) = bilinear in(M^-1 p) with reflect-101 borders: exact for
    an integer shift; for the random affines, OpenCV rounds source positions to 1/32 pixel, so
    each pixel may differ by (1/32) x the largest step between neighbouring source levels."""
    image = _images(1)[0].astype(np.float32) / 255
    zero = np.zeros((32, 32), np.float32)
    rows, cols = np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij")
    shift = np.float64([[1, 0, 3], [0, 1, -2]])  # moves content 3 right and 2 up
    np.testing.assert_allclose(C.elastic_warp(image, shift, zero, zero),
                               _sample(image.astype(np.float64), rows + 2, cols - 3,
                                       _reflect_101), atol=1e-6)
    step = max(np.abs(np.diff(image, axis=0)).max(), np.abs(np.diff(image, axis=1)).max())
    for severity, c in enumerate(C.PARAMETERS["elastic_transform"], 1):
        matrix = C.elastic_fields(c, C.example_rng(0, "elastic_transform", severity, 0))[0]
        inverse = np.linalg.inv(np.r_[matrix, [[0, 0, 1]]])
        src_x, src_y = np.einsum("ij,jhw->ihw", inverse[:2],
                                 np.stack([cols, rows, np.ones_like(rows)]))
        ref = _sample(image.astype(np.float64), src_y, src_x, _reflect_101)
        out = C.elastic_warp(image, matrix, zero, zero)
        assert np.abs(out - ref).max() <= step / 32 + 1e-6, severity
        assert np.abs(out - ref).mean() < step / 128, severity


def test_elastic_transform_composes_the_fields_and_the_warp():
    x = _images(2)
    for severity in C.SEVERITIES:
        c = C.PARAMETERS["elastic_transform"][severity - 1]
        ref = [np.clip(C.elastic_warp((im / 255.0).astype(np.float32),
                                      *C.elastic_fields(c, C.example_rng(
                                          0, "elastic_transform", severity, i))), 0, 1) * 255
               for i, im in enumerate(x)]
        np.testing.assert_array_equal(C.corrupt(x, "elastic_transform", severity),
                                      np.stack(ref))


# ---------------------------------------------------------------------------------- spatter
def _canny_l1(img: np.ndarray, low: int, high: int) -> np.ndarray:
    """OpenCV's Canny in plain Python: 3x3 Sobel with replicated borders, L1 magnitude,
    non-maximum suppression along the gradient sector (tan 22.5 in OpenCV's 15-bit fixed
    point; strict on one side), > high strong, > low weak, weak kept when 8-connected to
    strong."""
    p = np.pad(img.astype(np.int64), 1, mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.pad(np.abs(dx) + np.abs(dy), 1)
    h, w = img.shape
    state = np.zeros((h, w), np.int64)  # 0 none, 1 weak, 2 strong
    tg22 = round(0.4142135623730950488 * (1 << 15))
    for y, x in np.ndindex(h, w):
        v, gx, gy = mag[y + 1, x + 1], int(dx[y, x]), int(dy[y, x])
        if v <= low:
            continue
        along = abs(gx) * tg22
        if abs(gy) << 15 < along:  # horizontal gradient: compare left and right
            a, b, strict_b = mag[y + 1, x], mag[y + 1, x + 2], False
        elif abs(gy) << 15 > along + (abs(gx) << 16):  # vertical: above and below
            a, b, strict_b = mag[y, x + 1], mag[y + 2, x + 1], False
        else:
            s = -1 if (gx ^ gy) < 0 else 1
            a, b, strict_b = mag[y, x + 1 - s], mag[y + 2, x + 1 + s], True
        if v > a and (v > b if strict_b else v >= b):
            state[y, x] = 2 if v > high else 1
    out = np.where(state == 2, 255, 0).astype(np.uint8)
    stack = [tuple(q) for q in np.argwhere(state == 2)]
    while stack:
        y, x = stack.pop()
        for ny, nx in np.ndindex(3, 3):
            ny, nx = y + ny - 1, x + nx - 1
            if 0 <= ny < h and 0 <= nx < w and state[ny, nx] == 1 and not out[ny, nx]:
                out[ny, nx] = 255
                stack.append((ny, nx))
    return out


def _chamfer(img: np.ndarray) -> np.ndarray:
    """Distance of each pixel to the nearest zero pixel along paths of 5x5 chamfer moves
    (1 straight, 1.4 diagonal, 2.1969 knight's), inside the image, by Dijkstra; +inf without
    a zero pixel."""
    import heapq

    h, w = img.shape
    moves = [(dy, dx, 1.0) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
    moves += [(dy, dx, 1.4) for dy in (-1, 1) for dx in (-1, 1)]
    moves += [(dy, dx, 2.1969) for dy in (-2, -1, 1, 2) for dx in (-2, -1, 1, 2)
              if abs(dy) != abs(dx)]
    dist = np.where(img == 0, 0.0, np.inf)
    heap = [(0.0, y, x) for y, x in np.argwhere(img == 0)]
    while heap:
        d, y, x = heapq.heappop(heap)
        if d > dist[y, x]:
            continue
        for dy, dx, cost in moves:
            ny, nx = y + dy, x + dx
            if 0 <= ny < h and 0 <= nx < w and d + cost < dist[ny, nx]:
                dist[ny, nx] = d + cost
                heapq.heappush(heap, (d + cost, ny, nx))
    return dist


def _equalize(img: np.ndarray) -> np.ndarray:
    """OpenCV's equalizeHist: levels above the lowest present one map to the cumulative count
    times 255 / (count - count of the lowest), in float32, rounded half to even."""
    hist = np.bincount(img.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    scale = np.float32(255) / np.float32(img.size - hist[first])
    lut = np.zeros(256, np.uint8)
    for j in range(first + 1, 256):
        lut[j] = min(255, int(np.rint(np.float32(hist[first + 1:j + 1].sum()) * scale)))
    return lut[img]


def _box_sum(a: np.ndarray, kernel: np.ndarray | None = None) -> np.ndarray:
    """3x3 correlation (all ones by default) with reflect-101 borders, float64."""
    kernel = np.ones((3, 3)) if kernel is None else kernel
    return _correlate(a.astype(np.float64)[:, :, None], kernel, "reflect")[:, :, 0]


def _water_plain(liquid: np.ndarray) -> np.ndarray:
    """The water shading written out step by step with the plain references above."""
    edges = _canny_l1(liquid, 50, 150)
    dist = np.minimum(_chamfer(255 - edges), 20)
    dist = (_box_sum(dist) * (1 / 9)).astype(np.float32).astype(np.uint8)
    dist = _equalize(dist)
    ripple = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float64)
    dist = np.clip(_box_sum(dist, ripple), 0, 255)
    dist = np.floor(_box_sum(dist) / 9 + 0.5)
    shade = liquid * dist
    return shade / shade.max(), edges


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_spatter_is_shaded_water_or_mud_on_a_blurred_liquid_layer(severity):
    """make_cifar_c.py's spatter, redrawing the N(mean, std) layer from example_rng and
    blurring it with an explicit radius-int(4 sigma + 0.5) kernel (edge padding). Water
    (severities 1-3): the shading by plain-Python Canny, chamfer distance (Dijkstra),
    box blurs, histogram equalization and emboss, times the intensity, times pale turquoise
    (175, 238, 238) / 255, added. Mud (4-5): the wet area blurred by sigma, zeroed below 0.8,
    blends the image into (63, 42, 20) / 255. float32 in the module: 1e-3 levels."""
    mean, std, sigma, threshold, strength, mud = C.PARAMETERS["spatter"][severity - 1]
    x = _images(2)
    ref, edges = [], 0
    for i, im in enumerate(x.astype(np.float64) / 255):
        noise = C.example_rng(0, "spatter", severity, i).normal(mean, std, (32, 32))
        k = _gauss_1d(sigma, int(4 * sigma + 0.5))
        liquid = _correlate(noise[:, :, None], np.outer(k, k), "edge")[:, :, 0]
        liquid[liquid < threshold] = 0
        if mud:
            k = _gauss_1d(strength, int(4 * strength + 0.5))
            wet = _correlate((liquid > threshold)[:, :, None] * 1.0, np.outer(k, k), "edge")
            wet[wet < 0.8] = 0
            out = im * (1 - wet) + wet * np.array([63, 42, 20]) / 255
        else:
            shade, found = _water_plain((liquid * 255).astype(np.uint8))
            edges += found.any()
            out = im + strength * shade[:, :, None] * np.array([175, 238, 238]) / 255
        ref.append(np.clip(out, 0, 1) * 255)
    assert mud or edges  # the water's Canny path is exercised
    np.testing.assert_allclose(C.corrupt(x, "spatter", severity), np.stack(ref), atol=1e-3)


def test_grey_spatter_is_the_luma_of_the_rgb_result():
    """Grey images get the colours' ITU-R 601 luma: the luma of the RGB result of the grey
    copied to three channels (dark images, so nothing clips): 1e-4 levels."""
    grey = (_images(2, channels=1) // 4).astype(np.uint8)
    for severity in C.SEVERITIES:
        rgb = C.corrupt(np.repeat(grey, 3, axis=-1), "spatter", severity)
        np.testing.assert_allclose(C.corrupt(grey, "spatter", severity),
                                   rgb @ np.array([[0.299], [0.587], [0.114]]), atol=1e-4)


# ---------------------------------------------------------------------- properties, errors
def test_distance_from_the_original_grows_with_severity():
    """Mean squared distance over 16 images rises strictly from severity 1 to 5 for every
    corruption whose table is ordered by strength. Not so ordered: saturate (s x 0.3, x 0.1,
    then x 1.5, x 2 + 0.1, x 2.5 + 0.2; its distance rises from 1 to 2 and from 3 to 5);
    glass_blur (one shuffle at severities 1-3, where a larger sigma smooths it away, two at
    4-5: every two-pass severity is farther than every one-pass one); elastic_transform (the
    affine jitter, which moves pixels most, shrinks from 2.56 to 0.96 pixels while the
    elastic field grows: its distance falls)."""
    x = _images(16)
    for name in C.CORRUPTIONS:
        d = [np.mean((C.corrupt(x, name, s) - x) ** 2) for s in C.SEVERITIES]
        if name == "saturate":
            assert d[0] < d[1] and d[2] < d[3] < d[4], (name, d)
        elif name == "glass_blur":
            assert min(d[3:]) > max(d[:3]), (name, d)
        elif name == "elastic_transform":
            assert all(np.diff(d) < 0), (name, d)
        else:
            assert all(np.diff(d) > 0), (name, d)


RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur",
          "motion_blur", "fog", "elastic_transform", "snow", "spatter")


def test_deterministic_per_seed_and_per_example_whatever_the_batching():
    x = _images(4)
    for name in C.CORRUPTIONS:
        a = C.corrupt(x, name, 3, seed=7)
        np.testing.assert_array_equal(a, C.corrupt(x, name, 3, seed=7))
        np.testing.assert_array_equal(a[2:], C.corrupt(x[2:], name, 3, seed=7, first_index=2))
        np.testing.assert_array_equal(a[1], C.corrupt(x[1], name, 3, seed=7, first_index=1))
        assert a.shape == x.shape and a.dtype == np.float64 and 0 <= a.min() <= a.max() <= 255
        if name in RANDOM:
            assert not np.array_equal(a, C.corrupt(x, name, 3, seed=8)), name
        else:
            np.testing.assert_array_equal(a, C.corrupt(x, name, 3, seed=8))


def test_grey_images_take_every_corruption_but_saturate():
    """A grey image gets channel 0 of what its RGB copy gets, for every corruption but the
    noises (they draw per value, so the draws differ), jpeg (one luma plane) and spatter (the
    colours' luma: tested below): the other
    random ones draw per example (angle, offsets, plasma, fields, flakes), not per channel.
    Snow's luma of a replicated grey is the grey within float32 rounding: 1e-4 levels."""
    grey = _images(2, channels=1)
    assert C.available(1) == tuple(n for n in C.CORRUPTIONS if n != "saturate")
    assert C.available(3) == C.CORRUPTIONS
    rgb = np.repeat(grey, 3, axis=-1)
    for name in C.available(1):
        out = C.corrupt(grey, name, 4)
        assert out.shape == grey.shape
        if not name.endswith("_noise") and name not in ("jpeg_compression", "spatter"):
            # deterministic and channel-wise: the grey result is the replicated RGB result's
            np.testing.assert_allclose(out[..., 0], C.corrupt(rgb, name, 4)[..., 0], atol=1e-4,
                                       err_msg=name)
    with pytest.raises(ValueError, match=r"corruptions: name='saturate' is invalid; it is "
                                         r"defined for RGB images only, and these have 1 "
                                         r"channel; for grey images expected one of "
                                         r"\['gaussian_noise'"):
        C.corrupt(grey, "saturate", 1)


def test_bfloat16_and_float16_images_are_floats_too():
    """bfloat16 (an ml_dtypes float, NumPy kind 'V') was refused as "expected uint8 or float
    values"; it and float16 corrupt as the same values in float64 do."""
    import ml_dtypes

    images = np.round(_images(2))  # integers <= 255 are exact in bfloat16's 8-bit mantissa
    expected = C.corrupt(images, "contrast", 3)
    for dtype in (ml_dtypes.bfloat16, np.float16):
        np.testing.assert_array_equal(C.corrupt(images.astype(dtype), "contrast", 3), expected)


@pytest.mark.parametrize("name", ["jpeg_compression", "pixelate", "motion_blur"])
def test_float_images_are_rounded_to_levels_for_the_pil_and_imagemagick_ops(name):
    """These ops take uint8 levels: float pixels x + 0.7 are rounded to x + 1 first (truncation
    took x, a level darker), so they give what the op gives on those levels."""
    x = np.minimum(_images(2), 254).astype(np.float64) + 0.7
    np.testing.assert_array_equal(C.corrupt(x, name, 3),
                                  C.corrupt(np.rint(x).astype(np.uint8), name, 3))


def test_quantize_truncates_as_cifar10c_was_stored():
    values = np.array([0.0, 0.99, 1.0, 254.999, 255.0, 300.0, -3.0])
    np.testing.assert_array_equal(C.quantize(values), [0, 0, 1, 254, 255, 255, 0])
    assert C.quantize(values).dtype == np.uint8


@pytest.mark.parametrize("call, message", [
    (lambda x: C.corrupt(x, "fros", 1),
     r"corruptions: name='fros' is invalid; expected one of \['gaussian_noise', 'shot_noise'"
     r".*'pixelate', 'glass_blur', 'motion_blur', 'zoom_blur', 'fog', 'elastic_transform', "
     r"'snow', 'spatter'\]"),
    # a real ImageNet-C corruption: the message said only "expected one of", as for a typo
    (lambda x: C.corrupt(x, "frost", 1),
     r"corruptions: name='frost' is invalid; cnnjax does not compute frost \(it blends crops of "
     r"the ImageNet-C authors' frost photographs, which cnnjax does not ship\); expected one of "
     r"\['gaussian_noise'"),
    (lambda x: C.corrupt(x, "contrast", 0),
     r"corruptions: severity=0 is invalid; expected an integer from 1 to 5\."),
    (lambda x: C.corrupt(x, "contrast", 6), r"severity=6 is invalid"),
    (lambda x: C.corrupt(x, "contrast", True), r"severity=True is invalid"),
    (lambda x: C.corrupt(x, "contrast", 2.5), r"severity=2.5 is invalid"),
    # An integral float passed `in (1, ..., 5)` and then failed indexing a parameter table.
    (lambda x: C.corrupt(x, "contrast", 3.0), r"severity=3.0 is invalid; expected an integer"),
    (lambda x: C.corrupt(x, "contrast", np.float64(2.0)), r"severity=(np.float64\()?2.0\)? is "
                                                          r"invalid"),
    (lambda x: C.corrupt(x, "contrast", 1, first_index=-1),
     r"corruptions: first_index=-1 is invalid; expected an integer >= 0\."),
    (lambda x: C.corrupt(x, "contrast", 1, first_index=1.5), r"first_index=1.5 is invalid"),
    (lambda x: C.corrupt(x, "contrast", 1, first_index=True), r"first_index=True is invalid"),
    (lambda x: C.corrupt(x, "contrast", 1, seed=-1),
     r"corruptions: seed=-1 is invalid; expected an integer >= 0\."),
    (lambda x: C.corrupt(np.zeros((64, 64, 3)), "contrast", 1),
     r"corruptions: images='<array of shape \(64, 64, 3\)>' is invalid; expected \[S, S, C\] "
     r"or \[N, S, S, C\] with C = 1 or 3 and S = 32 \(CIFAR-10-C's table, make_cifar_c.py\) "
     r"or 224 \(ImageNet-C's, make_imagenet_c.py\): each table is tuned for its size, so "
     r"resize first\.$"),
    (lambda x: C.corrupt(np.zeros((2, 224, 32, 3)), "contrast", 1),
     r"images='<array of shape \(2, 224, 32, 3\)>' is invalid; expected \[S, S, C\]"),
    (lambda x: C.corrupt(np.zeros((256, 256, 3)), "contrast", 1), r"or 224 \(ImageNet-C's"),
    (lambda x: C.parameters(64),
     r"^corruptions: size=64 is invalid; expected 32 \(CIFAR-10-C's table, make_cifar_c.py\) "
     r"or 224 \(ImageNet-C's, make_imagenet_c.py\)"),
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


def test_numpy_integer_seed_and_first_index_draw_the_noise_of_the_python_ints():
    """A NumPy integer seed/first_index (from an array of settings) is the same seed."""
    x = np.full((2, 32, 32, 3), 128.0)
    want = C.corrupt(x, "gaussian_noise", 3, seed=5, first_index=7)
    got = C.corrupt(x, "gaussian_noise", 3, seed=np.int64(5), first_index=np.uint32(7))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want, C.corrupt(x, "gaussian_noise", 3, seed=6, first_index=7))


def test_the_opencv_corruptions_are_refused_without_opencv(monkeypatch):
    """OpenCV is an optional extra: without it the four corruptions computed with it are refused
    by name before any image is touched, and the others still run."""
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    image = _images(1)[0]
    for name in C.NEEDS_OPENCV:
        with pytest.raises(ValueError, match=rf"^corruptions: name='{name}' is invalid; it needs "
                                             r"OpenCV, which is not installed: pip install "
                                             r"'cnnjax\[robustness\]'"):
            C.corrupt(image, name, 1)
    assert C.corrupt(image, "gaussian_blur", 1).shape == image.shape
    C.check_corruption("spatter", 1, 3)  # the name itself is valid (cifar10_corrupted has it)
    assert C.missing_dependency("spatter") and C.missing_dependency("contrast") is None


# ======================================================================= ImageNet-C, 224x224
S = 224


def _photos(n: int = 1, channels: int = 3, seed: int = 0) -> np.ndarray:
    """224x224 analogues of `_images`: smooth colour fields (sigma 10 pixels) with a bright
    84-pixel square at a random place."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.uniform(0, 255, (n, S, S, channels)), (0, 10, 10, 0))
    x = (x - x.mean()) * 15 + 120
    for image, (top, left) in zip(x, rng.integers(0, S - 84, (n, 2)), strict=True):
        image[top:top + 84, left:left + 84] += 60
    return np.clip(x, 0, 255).astype(np.uint8)


def _separable(image: np.ndarray, k: np.ndarray, pad_mode: str) -> np.ndarray:
    """`image` correlated with the outer product of the odd 1-D kernel `k`, padded by NumPy's
    `pad_mode`: rows then columns, by explicit shifted sums (equal to the 2-D correlation)."""
    return _correlate(_correlate(image, k[None, :], pad_mode), k[:, None], pad_mode)


def test_imagenet_table_is_make_imagenet_cs():
    """Typed from the authors' ImageNet-C/create_c/make_imagenet_c.py (hendrycks/robustness),
    function by function; elastic_transform keeps their 244 (their comment: "244 should have
    been 224, but ultimately nothing is incorrect"); zoom_blur's entries are the (stop, step)
    of their np.arange(1, stop, step)."""
    authors = {
        "gaussian_noise": [.08, .12, 0.18, 0.26, 0.38],
        "shot_noise": [60, 25, 12, 5, 3],
        "impulse_noise": [.03, .06, .09, 0.17, 0.27],
        "speckle_noise": [.15, .2, 0.35, 0.45, 0.6],
        "gaussian_blur": [1, 2, 3, 4, 6],
        "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
        "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
        "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
        "zoom_blur": [(1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)],
        "fog": [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],
        "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
                 (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
                 (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
        "spatter": [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0),
                    (0.65, 0.3, 2, 0.68, 0.5, 0), (0.65, 0.3, 1, 0.65, 1.5, 1),
                    (0.67, 0.4, 1, 0.65, 1.5, 1)],
        "contrast": [0.4, .3, .2, .1, .05],
        "brightness": [.1, .2, .3, .4, .5],
        "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
        "jpeg_compression": [25, 18, 15, 10, 7],
        "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
        "elastic_transform": [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                              (244 * 0.05, 244 * 0.01, 244 * 0.02),
                              (244 * 0.07, 244 * 0.01, 244 * 0.02),
                              (244 * 0.12, 244 * 0.01, 244 * 0.02)],
    }
    assert set(C.IMAGENET_PARAMETERS) == set(authors) == set(C.CORRUPTIONS)
    for name, row in authors.items():
        assert list(C.IMAGENET_PARAMETERS[name]) == row, name
    assert C.parameters(32) is C.PARAMETERS and C.parameters(224) is C.IMAGENET_PARAMETERS
    assert C.IMAGE_SIZES == (32, 224)


def test_cifar_table_is_make_cifar_cs():
    """Typed from the authors' ImageNet-C/create_c/make_cifar_c.py (hendrycks/robustness),
    function by function (the CIFAR tests read `C.PARAMETERS` itself, so a typo there passed
    them); zoom_blur's entries are the stop of their np.arange(1, stop, 0.01); frost is not
    implemented (their frost photos are not shipped)."""
    size = 32  # their IMSIZE
    authors = {
        "gaussian_noise": [0.04, 0.06, .08, .09, .10],
        "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [.01, .02, .03, .05, .07],
        "speckle_noise": [.06, .1, .12, .16, .2],
        "gaussian_blur": [.4, .6, 0.7, .8, 1],
        "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        "zoom_blur": [1.06, 1.11, 1.16, 1.21, 1.26],
        "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                 (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                 (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
        "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                    (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                    (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
        "contrast": [.75, .5, .4, .3, 0.15],
        "brightness": [.05, .1, .15, .2, .3],
        "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
        "jpeg_compression": [80, 65, 58, 50, 40],
        "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
        "elastic_transform": [(size * 0, size * 0, size * 0.08),
                              (size * 0.05, size * 0.2, size * 0.07),
                              (size * 0.08, size * 0.06, size * 0.06),
                              (size * 0.1, size * 0.04, size * 0.05),
                              (size * 0.1, size * 0.03, size * 0.03)],
    }
    assert set(C.PARAMETERS) == set(authors) == set(C.CORRUPTIONS)
    for name, row in authors.items():
        assert list(C.PARAMETERS[name]) == row, name
    assert size == C.IMAGE_SIZE


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_224_noises_match_the_formulas_with_the_same_draws(severity):
    """The noises are size-generic; at 224 they take ImageNet-C's c (1e-9)."""
    x = _photos(1)
    for name, formula in NOISE_FORMULAS.items():
        np.testing.assert_allclose(C.corrupt(x, name, severity), _reference(
            x, name, severity, formula), atol=1e-9, err_msg=name)
    c = C.IMAGENET_PARAMETERS["impulse_noise"][severity - 1]  # the scale is ImageNet's
    flipped = (C.corrupt(x, "impulse_noise", severity) != x).mean()
    assert abs(flipped - c) < 5 * np.sqrt(c / x.size) + 0.01  # + levels already at 0 or 255


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_224_gaussian_blur_and_contrast(severity):
    """Gaussian blur: explicit radius-int(4 sigma + 0.5) kernel (up to 49 taps at sigma 6),
    edge padding, rows then columns (1e-9); contrast about each channel's mean (1e-9)."""
    sigma = C.IMAGENET_PARAMETERS["gaussian_blur"][severity - 1]
    x = _photos(1)
    k = _gauss_1d(sigma, int(4 * sigma + 0.5))
    ref = np.clip(_separable(x[0] / 255.0, k, "edge"), 0, 1)[None] * 255
    np.testing.assert_allclose(C.corrupt(x, "gaussian_blur", severity), ref, atol=1e-9)
    c = C.IMAGENET_PARAMETERS["contrast"][severity - 1]
    y = x / 255.0
    mean = y.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(C.corrupt(x, "contrast", severity),
                               np.clip((y - mean) * c + mean, 0, 1) * 255, atol=1e-9)


def test_disk_kernel_radius_above_8_is_the_authors_wider_disk():
    """make_imagenet_c.py's disk: radius <= 8 on the 17x17 grid with a 3x3 Gaussian, radius 10
    on a 21x21 grid (-radius..radius) with a 5x5 Gaussian (reflect-101 border), float32."""
    for radius, alias in C.IMAGENET_PARAMETERS["defocus_blur"]:
        reach, half = (8, 1) if radius <= 8 else (radius, 2)
        grid = np.arange(-reach, reach + 1)
        disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2).astype(np.float64)
        disk /= disk.sum()
        g = _gauss_1d(alias, half)
        kernel = _correlate(disk[:, :, None], np.outer(g, g), "reflect")[:, :, 0]
        out = C.disk_kernel(radius, alias)
        assert out.shape == (2 * reach + 1,) * 2 and out.dtype == np.float32
        np.testing.assert_allclose(out, kernel, atol=1e-7)
    assert C.disk_kernel(10, 0.5).shape == (21, 21)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_224_defocus_blur_is_the_disk_with_reflect_101_borders(severity):
    """The image correlated with the reference disk (radius 3-10) in float64, NumPy 'reflect'
    (OpenCV's reflect-101) padding; OpenCV may filter a kernel this large by DFT and the kernel
    is float32: 1e-4 levels."""
    radius, alias = C.IMAGENET_PARAMETERS["defocus_blur"][severity - 1]
    kernel = C.disk_kernel(radius, alias).astype(np.float64)  # checked just above
    x = _photos(1)
    ref = np.clip(_correlate(x[0] / 255.0, kernel, "reflect"), 0, 1)[None] * 255
    np.testing.assert_allclose(C.corrupt(x, "defocus_blur", severity), ref, atol=1e-4)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_224_brightness_and_saturate_match_colorsys(severity):
    """Per pixel through colorsys on a 32x32 subgrid of the 224 image (every 7th row and
    column): ImageNet's value shifts up to +.5 and saturation factors up to 20 (1e-9)."""
    x = _photos(1)
    b = C.IMAGENET_PARAMETERS["brightness"][severity - 1]
    a, s0 = C.IMAGENET_PARAMETERS["saturate"][severity - 1]
    sub = x[0, ::7, ::7]
    bright = _via_colorsys(sub, lambda h, s, v: (h, s, min(max(v + b, 0), 1)))
    sat = _via_colorsys(sub, lambda h, s, v: (h, min(max(s * a + s0, 0), 1), v))
    np.testing.assert_allclose(C.corrupt(x, "brightness", severity)[0, ::7, ::7], bright,
                               atol=1e-9)
    np.testing.assert_allclose(C.corrupt(x, "saturate", severity)[0, ::7, ::7], sat, atol=1e-9)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_224_jpeg_and_pixelate(severity):
    """JPEG at ImageNet's qualities 25-7 equals OpenCV's codec (RGB and grey, bit-exact);
    pixelate is BOX down to int(224 c) (134, 112, 89, 67, 56) and back to 224 (bit-exact)."""
    import cv2

    quality = C.IMAGENET_PARAMETERS["jpeg_compression"][severity - 1]
    for x in (_photos(1), _photos(1, channels=1)):
        im = x[0]
        bgr = im[:, :, ::-1] if im.shape[2] == 3 else im[:, :, 0]
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
        ref = decoded[:, :, ::-1] if im.shape[2] == 3 else decoded[:, :, None]
        np.testing.assert_array_equal(C.corrupt(x, "jpeg_compression", severity)[0], ref)
    small = int(224 * C.IMAGENET_PARAMETERS["pixelate"][severity - 1])
    assert small == (134, 112, 89, 67, 56)[severity - 1]
    x = _photos(1)
    ref = _box_resize(_box_resize(x[0].astype(np.float64), small), 224)
    np.testing.assert_array_equal(C.corrupt(x, "pixelate", severity)[0], ref)


def _zoom_reference(x: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Mean of `x` ([N, H, H, C] in [0, 1]) and its centre ceil(H / f) squares zoomed to
    round(side f) by explicit corner-aligned interpolation matrices, centre-cropped, float64,
    clipped and scaled to [0, 255]."""
    h = x.shape[1]
    ref = x.copy()
    for f in factors:
        side = int(np.ceil(h / f))
        top = (h - side) // 2
        size = int(round(side * f))
        w = _bilinear_1d(side, size)
        crop = x[:, top:top + side, top:top + side]
        zoomed = np.einsum("oi,nijc,pj->nopc", w, crop, w, optimize=True)
        trim = (size - h) // 2
        ref += zoomed[:, trim:trim + h, trim:trim + h]
    return np.clip(ref / (len(factors) + 1), 0, 1) * 255


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_224_zoom_blur_takes_the_tabled_steps(severity):
    """make_imagenet_c.py's zooms np.arange(1, stop, step) with steps .01, .01, .02, .02, .03:
    float rounding includes the stop 1.11 at severity 1 (12, 16, 11, 13, 11 zooms, up to 1.30).
    Explicit interpolation matrices; float32 in the module: 1e-3 levels."""
    stop, step = C.IMAGENET_PARAMETERS["zoom_blur"][severity - 1]
    factors = np.arange(1, stop, step)
    assert len(factors) == (12, 16, 11, 13, 11)[severity - 1]
    np.testing.assert_array_equal(C.zoom_factors((stop, step)), factors)
    np.testing.assert_array_equal(C.zoom_factors(1.06), np.arange(1, 1.06, 0.01))  # CIFAR's
    x = _photos(1)
    np.testing.assert_allclose(C.corrupt(x, "zoom_blur", severity),
                               _zoom_reference(x / 255.0, factors), atol=1e-3)


@pytest.mark.parametrize("max_delta", [1, 2, 3, 4])
def test_224_shuffle_pixels_is_the_authors_loop(max_delta):
    """Rows and columns 224 - d down to d + 1, offsets in [-d, d - 1]: with d > 1 a pixel may
    copy one already overwritten earlier in the pass (the gather follows such chains); equal to
    the loop exactly, and for d > 1 not a plain gather of the original pixels."""
    rng = np.random.default_rng(max_delta)
    pixels = _textured(1, seed=max_delta, side=S)[0]
    n = S - 2 * max_delta
    offsets = rng.integers(-max_delta, max_delta, size=(n, n, 2))
    out = C.shuffle_pixels(pixels, offsets, max_delta)
    np.testing.assert_array_equal(out, _authors_shuffle(pixels, offsets, max_delta))
    visit = np.arange(S - max_delta, max_delta, -1)
    rows, cols = np.meshgrid(visit, visit, indexing="ij")
    gathered = pixels.copy()
    gathered[rows, cols] = pixels[rows + offsets[..., 1], cols + offsets[..., 0]]
    assert np.array_equal(out, gathered) == (max_delta == 1)
    with pytest.raises(ValueError, match=r"offsets of shape"):
        C.shuffle_pixels(pixels, offsets[1:], max_delta)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_224_glass_blur_is_blur_truncate_shuffle_blur(severity):
    """Explicit-kernel blur (edge padding), np.uint8 truncation, the authors' loop per pass
    with offsets redrawn as one integers(-d, d, (224 - 2d, 224 - 2d, 2)) per pass, blur again:
    1e-9 levels."""
    sigma, delta, iterations = C.IMAGENET_PARAMETERS["glass_blur"][severity - 1]
    k = _gauss_1d(sigma, int(4 * sigma + 0.5))
    x = _textured(1, side=S)
    rng = C.example_rng(0, "glass_blur", severity, 0)
    pixels = np.uint8(_separable(x[0] / 255.0, k, "edge") * 255)
    for _ in range(iterations):
        n = S - 2 * delta
        pixels = _authors_shuffle(pixels, rng.integers(-delta, delta, size=(n, n, 2)), delta)
    ref = np.clip(_separable(pixels / 255.0, k, "edge"), 0, 1) * 255
    np.testing.assert_allclose(C.corrupt(x, "glass_blur", severity)[0], ref, atol=1e-9)


def _motion_at(image: np.ndarray, radius: float, sigma: float, angle: float,
               points: np.ndarray) -> np.ndarray:
    """`_motion_plain` at the given (row, col) points only: plain Python, edge-clamped, rounded
    half up."""
    import math

    width = 2 * math.ceil(radius) + 1
    w = [math.exp(-i * i / (2 * sigma * sigma)) for i in range(width)]
    w = [v / sum(w) for v in w]
    a = math.radians(angle)
    taps = [(math.ceil(i * math.cos(a) - 0.5), math.ceil(i * math.sin(a) - 0.5))
            for i in range(width)]
    h, wd = image.shape[:2]
    out = np.empty((len(points), image.shape[2]))
    for p, (r, c) in enumerate(points):
        for ch in range(image.shape[2]):
            total = sum(wi * image[min(max(r + dy, 0), h - 1), min(max(c + dx, 0), wd - 1), ch]
                        for wi, (dx, dy) in zip(w, taps, strict=True))
            out[p, ch] = math.floor(total + 0.5)
    return out


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_224_motion_blur_at_sampled_pixels(severity):
    """ImageNet's radii 10-20 (21-41 taps): at 300 random pixels (borders included), the plain
    Python sum with the same angle: bit-exact."""
    radius, sigma = C.IMAGENET_PARAMETERS["motion_blur"][severity - 1]
    assert len(C.motion_kernel(radius, sigma, 0)[0]) == 2 * radius + 1
    x = _photos(1)
    points = np.random.default_rng(severity).integers(0, S, (300, 2))
    points[:4] = [[0, 0], [0, S - 1], [S - 1, 0], [S - 1, S - 1]]
    out = C.corrupt(x, "motion_blur", severity)[0]
    angle = C.example_rng(0, "motion_blur", severity, 0).uniform(-45, 45)
    np.testing.assert_array_equal(out[points[:, 0], points[:, 1]], _motion_at(
        x[0].astype(np.float64), radius, sigma, angle, points))


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_224_fog_crops_a_256_plasma(severity):
    """make_imagenet_c.py: plasma_fractal(mapsize=256)[:224, :224]; the plain-Python
    diamond-square at 256 with the same draws, then fog's rescaling (1e-9 levels)."""
    assert C.plasma_size(224) == 256 and C.plasma_size(32) == 32
    a, decay = C.IMAGENET_PARAMETERS["fog"][severity - 1]
    x = _photos(1)
    im = x[0] / 255.0
    plasma = _plasma_plain(C.example_rng(0, "fog", severity, 0), 256, decay)[:S, :S]
    ref = np.clip((im + a * plasma[:, :, None]) * im.max() / (im.max() + a), 0, 1) * 255
    np.testing.assert_allclose(C.corrupt(x, "fog", severity)[0], ref, atol=1e-9)


def _smoothing_matrix(n: int, sigma: float, truncate: float) -> np.ndarray:
    """The n x n matrix of a 1-D Gaussian (radius int(truncate sigma + 0.5)) with scipy's
    'reflect' (half-sample symmetric) borders folded in tap by tap: radius 512 at ImageNet's
    sigma 170.8 folds the kernel over the 224 samples several times."""
    radius = int(truncate * sigma + 0.5)
    k = _gauss_1d(sigma, radius)
    w = np.zeros((n, n))
    for i in range(n):
        for t, weight in zip(range(-radius, radius + 1), k, strict=True):
            w[i, _reflect_half(i + t, n)] += weight
    return w


def test_224_elastic_fields_use_the_sizes_points_and_the_authors_244():
    """Anchor points centre 112 +- 224 // 3 = 74 as (x, y); the affine solved in float64
    (1e-6, relative: ImageNet's jitter is up to 48.8 pixels); dx, dy = U(-1, 1) fields
    smoothed by explicit folded Gaussians (sigma 2.44-170.8), times alpha up to 488 (1e-6
    relative to alpha)."""
    np.testing.assert_array_equal(C.elastic_points(224), [[186, 186], [186, 38], [38, 38]])
    np.testing.assert_array_equal(C.elastic_points(32), [[26, 26], [26, 6], [6, 6]])
    for c in C.IMAGENET_PARAMETERS["elastic_transform"]:
        alpha, sigma, a = c
        matrix, dx, dy = C.elastic_fields(c, np.random.default_rng(9), S)
        rng = np.random.default_rng(9)
        src = np.array([[186, 186], [186, 38], [38, 38]], np.float32)
        dst = (src + rng.uniform(-a, a, (3, 2)).astype(np.float32)).astype(np.float64)
        solved = np.linalg.solve(np.c_[src, np.ones(3)].astype(np.float64), dst).T
        np.testing.assert_allclose(matrix, solved, atol=1e-6, rtol=1e-6)
        w = _smoothing_matrix(S, sigma, 3.0)
        for field in (dx, dy):
            ref = w @ rng.uniform(-1, 1, (S, S)) @ w.T * alpha
            np.testing.assert_allclose(field, ref, atol=1e-6 * alpha)
            assert field.dtype == np.float32 and field.shape == (S, S)


def test_224_elastic_transform_composes_the_fields_and_the_warp():
    """corrupt draws the 224 fields and warps with them (the warp is tested at 32 above)."""
    x = _photos(1)
    for severity in (1, 3):
        c = C.IMAGENET_PARAMETERS["elastic_transform"][severity - 1]
        fields = C.elastic_fields(c, C.example_rng(0, "elastic_transform", severity, 0), S)
        ref = np.clip(C.elastic_warp((x[0] / 255.0).astype(np.float32), *fields), 0, 1) * 255
        np.testing.assert_array_equal(C.corrupt(x, "elastic_transform", severity)[0], ref)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_224_snow(severity):
    """As the 32 test: flakes zoomed by explicit interpolation matrices (zoom up to 4.5),
    thresholded, truncated, streaked by the module's motion_blur_levels (checked against plain
    Python above, at 32 and at sampled 224 pixels), on the whitened image: 1e-3 levels."""
    mean, std, zoom, threshold, radius, sigma, keep = C.IMAGENET_PARAMETERS["snow"][severity - 1]
    x = _photos(1)
    im = x[0] / 255.0
    rng = C.example_rng(0, "snow", severity, 0)
    flakes = rng.normal(mean, std, (S, S))
    side = int(np.ceil(S / zoom))
    top = (S - side) // 2
    size = int(round(side * zoom))
    w = _bilinear_1d(side, size)
    trim = (size - S) // 2
    flakes = (w @ flakes[top:top + side, top:top + side] @ w.T)[trim:trim + S, trim:trim + S]
    flakes = np.floor(np.clip(np.where(flakes < threshold, 0, flakes), 0, 1) * 255)
    streaks = C.motion_blur_levels(flakes[:, :, None], radius, sigma,
                                   rng.uniform(-135, -45)) / 255
    assert 0 < np.count_nonzero(streaks) < streaks.size
    luma = im @ np.array([0.299, 0.587, 0.114])
    whiter = keep * im + (1 - keep) * np.maximum(im, luma[:, :, None] * 1.5 + 0.5)
    ref = np.clip(whiter + streaks + streaks[::-1, ::-1], 0, 1) * 255
    np.testing.assert_allclose(C.corrupt(x, "snow", severity)[0], ref, atol=1e-3)


def _spatter_224_reference(severity: int, x: np.ndarray) -> np.ndarray:
    """make_imagenet_c.py's spatter on one 224 image, as the 32 test's reference."""
    mean, std, sigma, threshold, strength, mud = C.IMAGENET_PARAMETERS["spatter"][severity - 1]
    im = x[0] / 255.0
    noise = C.example_rng(0, "spatter", severity, 0).normal(mean, std, (S, S))
    liquid = _separable(noise[:, :, None], _gauss_1d(sigma, int(4 * sigma + 0.5)), "edge")
    liquid = liquid[:, :, 0]
    liquid[liquid < threshold] = 0
    if mud:
        k = _gauss_1d(strength, int(4 * strength + 0.5))
        wet = _separable((liquid > threshold)[:, :, None] * 1.0, k, "edge")
        wet[wet < 0.8] = 0
        out = im * (1 - wet) + wet * np.array([63, 42, 20]) / 255
    else:
        shade, edges = _water_plain((liquid * 255).astype(np.uint8))
        assert edges.any()
        out = im + strength * shade[:, :, None] * np.array([175, 238, 238]) / 255
    return np.clip(out, 0, 1) * 255


@pytest.mark.parametrize("severity", [4, 5])
def test_224_spatter_mud(severity):
    """Severities 4-5 (mud, sigma 1.5): explicit kernels, 1e-3 levels."""
    x = _photos(1)
    np.testing.assert_allclose(C.corrupt(x, "spatter", severity)[0],
                               _spatter_224_reference(severity, x), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("severity", [1, 2, 3])
def test_224_spatter_water(severity):
    """Severities 1-3 (water, sigma 4, 3, 2): the plain-Python Canny and Dijkstra chamfer on
    224x224 (~2 s each), 1e-3 levels."""
    x = _photos(1)
    np.testing.assert_allclose(C.corrupt(x, "spatter", severity)[0],
                               _spatter_224_reference(severity, x), atol=1e-3)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_224_outputs_are_in_range_and_deterministic(name):
    """One RGB and one grey 224 image at severity 5 (the strongest parameters): shape, dtype,
    range, same seed same result, batching-independent, another seed another result for the
    random ones; grey images take all but saturate."""
    x = np.concatenate([_photos(1), _photos(1, seed=1)])
    a = C.corrupt(x, name, 5, seed=7)
    assert a.shape == x.shape and a.dtype == np.float64 and 0 <= a.min() <= a.max() <= 255
    np.testing.assert_array_equal(a[1], C.corrupt(x[1], name, 5, seed=7, first_index=1))
    if name in RANDOM:
        assert not np.array_equal(a[0], C.corrupt(x[0], name, 5, seed=8)), name
    grey = _photos(1, channels=1)
    if name in C.available(1):
        out = C.corrupt(grey, name, 5)
        assert out.shape == grey.shape and 0 <= out.min() <= out.max() <= 255
    else:
        with pytest.raises(ValueError, match=r"defined for RGB images only"):
            C.corrupt(grey, name, 5)


@pytest.mark.slow
def test_224_distance_from_the_original_grows_with_severity():
    """Mean squared distance over four 224 images, for the ImageNet-C table. Not ordered by
    strength: saturate (x .3, x .1, then x 2, x 5 + .1, x 20 + .2: 1 < 2 and 3 < 4 < 5);
    glass_blur (its 1-2 pass, max_delta 1-2 severities 1-2 nearer than 3-5: severity 3 has
    three passes, 4-5 larger deltas); fog (amount 1.5, 2, 2.5, 2.5, 3: 1 < 2 < 3 and 4 < 5;
    3 and 4 share the amount, 4 has the finer haze); elastic_transform (severities 1-2 carry
    the affine jitter, 24.4 and 48.8 pixels, 3-5 only 4.9: 1 < 2, both above 3-5, and
    3-5 are not ordered); snow (severities 2 and 3 trade flake count, threshold .5 vs .9, for
    flake size, zoom 2 vs 4: both above 1 and below 4 < 5)."""
    x = _photos(4)
    for name in C.CORRUPTIONS:
        d = [np.mean((C.corrupt(x, name, s) - x) ** 2) for s in C.SEVERITIES]
        if name == "saturate":
            assert d[0] < d[1] and d[2] < d[3] < d[4], (name, d)
        elif name == "glass_blur":
            assert min(d[2:]) > max(d[:2]), (name, d)
        elif name == "fog":
            assert d[0] < d[1] < d[2] and d[3] < d[4], (name, d)
        elif name == "elastic_transform":
            assert d[0] < d[1] and min(d[:2]) > max(d[2:]), (name, d)
        elif name == "snow":
            assert d[0] < min(d[1:3]) and max(d[1:3]) < d[3] < d[4], (name, d)
        else:
            assert all(np.diff(d) > 0), (name, d)

"""RandAugment (Cubuk et al. 2019) as TensorFlow ops for tf.data, seeded statelessly.

"RandAugment: Practical automated data augmentation with a reduced search space": each image
gets `num_layers` ops drawn uniformly, with replacement, from the 14 below, all at one global
magnitude `M` on the integer scale 0..10 (`MAX_MAGNITUDE`; fractional values interpolate). Every
drawn op is applied (the paper's scheme; timm applies each with probability 0.5 by default).

Images are uint8 `[H, W, C]` with C = 1 or 3, and every op works on the uint8 pixels, with
exactly the arithmetic of the PIL functions AutoAugment and RandAugment were defined with
(`PIL.ImageOps`, `PIL.ImageEnhance`, `Image.transform`), so an op is that PIL op (the tests
compare them): AutoContrast and Equalize are PIL's per-channel lookup tables, grey is PIL's
`convert("L")` (`(19595 R + 38470 G + 7471 B + 2**15) >> 16`), and the enhance ops are PIL's
`Image.blend(degenerate, image, factor)` (float32 interpolation, truncated, clipped to 0..255).
`rand_augment` also takes a float image in 0..255, which it rounds to uint8 first and returns in
its own dtype.

Magnitude `M` -> op parameter (`m = M / 10`; +- is a random sign, probability 1/2 each), as timm's
`rand_augment_transform` maps it ("increasing" ops, PyTorch Image Models
`timm/data/auto_augment.py`), so that a larger M is always a stronger distortion. torchvision's
`RandAugment` has the same end points for rotate, shear, the enhance ops and posterize but its
own scale: its magnitude runs over `num_magnitude_bins` (0..30 by default), so its M = 9 is
M = 3 here, and it translates by up to 150/331 of the size, solarizes from threshold 255 at
M = 0 and fills with black.

    Identity, AutoContrast, Equalize   no parameter
    Rotate              +-30 m degrees, counter-clockwise about the image centre (PIL's rotate)
    ShearX, ShearY      +-0.3 m: input x = x + s y (ShearX) / y = y + s x (ShearY), PIL's
                        AFFINE data (1, s, 0, 0, 1, 0) / (1, 0, 0, s, 1, 0) as timm uses
    TranslateX/Y        +-0.45 m of the image width / height (`TRANSLATE_FRACTION`, timm's
                        `translate_pct` of its RandAugment); the content moves by that many pixels
    Solarize            inverts pixels >= threshold 256 - int(256 m) (256: none; timm's
                        SolarizeIncreasing)
    Posterize           keeps 8 - round(4 m) bits (8 at M=0 down to 4: torchvision's RandAugment;
                        timm's PosterizeIncreasing keeps 4 - int(4 m), from 4 bits down to 0)
    Color, Contrast,    PIL enhance factor 1 +- 0.9 m (0.1..1.9; timm's *Increasing ops: 1 is the
    Brightness,         image itself, 0 the degenerate image: grey, mean grey, black, smoothed)
    Sharpness

At M = 0 every op but AutoContrast and Equalize is the identity. Geometric ops sample the input
nearest to each output pixel (`tf.raw_ops.ImageProjectiveTransformV3`, NEAREST; core TF) and fill
pixels from outside the image with grey `FILL_VALUE` = 128, as TF-models
(`official/vision/ops/augment.py`) does (timm resamples bilinearly or bicubically at random and
fills with 128 under its default hparams, the dataset mean through `create_transform`). They follow
PIL's pixel-area coordinates (pixel i covers [i, i + 1)), so they equal PIL's `Image.transform`
except where an input coordinate falls near a pixel boundary: TF samples in float32, and PIL's
coordinates drift from the exact ones along a row (about 1e-3 px at 224x224, 2e-3 px at 375x500;
0.1-0.2% of the pixels of a rotation pick the other neighbour there, mostly where PIL, not TF,
departs from the float64 coordinate; on odd sizes and at half-pixel shifts whole columns are such
ties: 3-8% of the pixels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

# The setting checks live in `spec` so that a config validates without importing TensorFlow.
from cnnjax.data.spec import MAX_LAYERS as MAX_LAYERS
from cnnjax.data.spec import MAX_MAGNITUDE as MAX_MAGNITUDE
from cnnjax.data.spec import check_randaugment as check_randaugment
from cnnjax.utils.validation import invalid

TRANSLATE_FRACTION = 0.45
FILL_VALUE = 128
OPS = ("Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")


# ------------------------------------------------------------------------------ point ops
def _checked(image: Any) -> tf.Tensor:
    """`image` as a tensor if it is uint8 `[H, W, C]` with a static C of 1 or 3, else raises."""
    image = tf.convert_to_tensor(image)
    if image.shape.rank != 3 or image.shape[-1] not in (1, 3):
        raise invalid("randaugment", "image.shape", tuple(image.shape),
                      "expected [height, width, channels] with a static 1 or 3 channels")
    if 0 in image.shape[:2]:  # the geometric ops and Equalize fail inside TF on these
        raise invalid("randaugment", "image.shape", tuple(image.shape),
                      "expected a non-empty image (height and width >= 1)")
    if image.dtype != tf.uint8:
        raise invalid("randaugment", "image.dtype", image.dtype.name, "expected uint8")
    return image


def _grey(image: tf.Tensor) -> tf.Tensor:
    """PIL's `convert("L")` as int32 `[H, W]` (ITU-R 601-2 luma, fixed point, rounded)."""
    image = _checked(image)
    pixels = tf.cast(image, tf.int32)
    if image.shape[-1] == 1:
        return pixels[..., 0]
    weighted = 19595 * pixels[..., 0] + 38470 * pixels[..., 1] + 7471 * pixels[..., 2]
    return tf.bitwise.right_shift(weighted + 32768, 16)


def identity(image: tf.Tensor) -> tf.Tensor:
    """RandAugment's `Identity` op: `image` unchanged."""
    return image


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """`ImageOps.autocontrast` (no cutoff): each channel's [min, max] stretched to [0, 255]
    (`int(x * scale + offset)` in float64 as PIL computes it); a flat channel is kept."""
    image = _checked(image)
    pixels = tf.cast(image, tf.float64)
    lo = tf.reduce_min(pixels, axis=[0, 1])
    hi = tf.reduce_max(pixels, axis=[0, 1])
    flat = hi <= lo
    scale = tf.where(flat, tf.ones_like(hi), 255.0 / tf.where(flat, tf.ones_like(hi), hi - lo))
    offset = tf.where(flat, tf.zeros_like(lo), -lo * scale)
    stretched = tf.clip_by_value(tf.floor(pixels * scale + offset), 0.0, 255.0)
    return tf.cast(stretched, tf.uint8)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL's equalize lookup table of one uint8 `[H, W]` channel, applied."""
    pixels = tf.cast(channel, tf.int32)
    histogram = tf.math.bincount(tf.reshape(pixels, [-1]), minlength=256, maxlength=256)
    total = tf.reduce_sum(histogram)
    step = (total - histogram[tf.reduce_max(pixels)]) // 255  # excludes the top level's count
    below = tf.cumsum(histogram, exclusive=True)
    lut = tf.minimum((step // 2 + below) // tf.maximum(step, 1), 255)
    return tf.where(step > 0, tf.gather(lut, pixels), pixels)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """`ImageOps.equalize`: each channel's histogram equalized (PIL's lookup table: a level
    maps to `(step // 2 + count below it) // step`, `step` the pixels below the top level / 255;
    a channel with step 0, e.g. a flat one, is kept)."""
    image = _checked(image)
    return tf.cast(tf.stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])],
                            axis=-1), tf.uint8)


def _check_static_range(arg: str, value: Any, low: int, high: int) -> None:
    """A ValueError if `value`, when known before the graph runs (a Python number or a constant
    tensor), is not an integer in [low, high]."""
    static = tf.get_static_value(value) if tf.is_tensor(value) else value
    if static is None:  # computed in the graph (e.g. from a random draw): not checkable here
        return
    if isinstance(static, np.ndarray | np.generic) and np.ndim(static) == 0:
        static = static.item()
    if (isinstance(static, bool) or np.ndim(static) or not float(static).is_integer()
            or not low <= static <= high):
        raise invalid("randaugment", arg, static, f"expected an integer in [{low}, {high}]")


def _check_static_finite(arg: str, value: Any) -> None:
    """A ValueError if the scalar `value`, when known before the graph runs (a Python number or
    a constant tensor), is NaN or infinite (PIL gives meaningless images for those: a NaN
    rotation all fill, a NaN enhance factor all black)."""
    static = tf.get_static_value(value) if tf.is_tensor(value) else value
    if static is None or np.ndim(static):
        return
    try:
        number = float(static)
    except (TypeError, ValueError):
        return  # not a number: TF's own cast reports it
    if not math.isfinite(number):
        raise invalid("randaugment", arg, number, "expected a finite number")


def solarize(image: tf.Tensor, threshold: Any) -> tf.Tensor:
    """`ImageOps.solarize`: every pixel >= `threshold` (0..256) becomes 255 - pixel."""
    image = _checked(image)
    _check_static_range("threshold", threshold, 0, 256)
    pixels = tf.cast(image, tf.int32)
    inverted = tf.where(pixels < tf.cast(threshold, tf.int32), pixels, 255 - pixels)
    return tf.cast(inverted, tf.uint8)


def posterize(image: tf.Tensor, bits: Any) -> tf.Tensor:
    """`ImageOps.posterize`: keeps the `bits` (0..8) most significant bits of each pixel."""
    image = _checked(image)
    _check_static_range("bits", bits, 0, 8)  # outside it the shift is negative or past 8 bits
    mask = tf.bitwise.bitwise_and(tf.bitwise.left_shift(255, 8 - tf.cast(bits, tf.int32)), 255)
    return tf.bitwise.bitwise_and(image, tf.cast(mask, tf.uint8))


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: Any) -> tf.Tensor:
    """PIL's `Image.blend(degenerate, image, factor)` on uint8: `d + factor * (x - d)` in
    float32, clipped to [0, 255] and truncated."""
    _check_static_finite("factor", factor)
    d = tf.cast(degenerate, tf.float32)
    blended = d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d)
    return tf.cast(tf.clip_by_value(blended, 0.0, 255.0), tf.uint8)


def color(image: tf.Tensor, factor: Any) -> tf.Tensor:
    """`ImageEnhance.Color`: blends from the image's grey (factor 0) to the image (1); a
    one-channel image is its own grey."""
    image = _checked(image)
    grey = tf.cast(_grey(image), tf.uint8)[..., None]
    return _blend(tf.broadcast_to(grey, tf.shape(image)), image, factor)


def contrast(image: tf.Tensor, factor: Any) -> tf.Tensor:
    """`ImageEnhance.Contrast`: blends from the flat image of the mean grey level (PIL's
    `int(mean + 0.5)`; factor 0) to the image (1)."""
    image = _checked(image)
    grey = _grey(image)
    mean = tf.reduce_sum(tf.cast(grey, tf.float64)) / tf.cast(tf.size(grey), tf.float64)
    level = tf.cast(tf.floor(mean + 0.5), tf.uint8)
    return _blend(tf.fill(tf.shape(image), level), image, factor)


def brightness(image: tf.Tensor, factor: Any) -> tf.Tensor:
    """`ImageEnhance.Brightness`: blends from black (factor 0) to the image (1)."""
    image = _checked(image)
    return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: Any) -> tf.Tensor:
    """`ImageEnhance.Sharpness`: blends from the image under PIL's SMOOTH filter (3x3 kernel
    [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded; border pixels kept; factor 0) to the image
    (1); factors above 1 sharpen."""
    image = _checked(image)
    channels = image.shape[-1]
    pixels = tf.cast(image, tf.float32)
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32)
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    sums = tf.nn.depthwise_conv2d(pixels[None], kernel, [1, 1, 1, 1], "SAME")[0]
    smooth = (2 * tf.cast(sums, tf.int32) + 13) // 26  # round(sum / 13): never a tie
    shape = tf.shape(image)
    rows = tf.range(shape[0])[:, None, None]
    cols = tf.range(shape[1])[None, :, None]
    interior = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
    degenerate = tf.where(interior, tf.cast(smooth, tf.uint8), image)
    return _blend(degenerate, image, factor)


# -------------------------------------------------------------------------- geometric ops
def affine(image: tf.Tensor, matrix: Any) -> tf.Tensor:
    """PIL's `image.transform(size, Image.AFFINE, matrix, resample=NEAREST, fillcolor=128)`:
    output pixel (x, y) (pixel-area coordinates, centres at i + 0.5) takes the input pixel
    under `(a x + b y + c, d x + e y + f)` for `matrix = (a, b, c, d, e, f)`; outside: grey."""
    image = _checked(image)
    try:
        entries = len(matrix)
    except TypeError:
        entries = None
    if entries != 6:
        raise invalid("randaugment", "matrix", matrix, "expected 6 numbers (a, b, c, d, e, f)")
    a, b, c, d, e, f = (tf.cast(v, tf.float64) for v in matrix)
    # PIL takes input pixel floor(q), q = A (x + 0.5) + t in area coordinates; TF takes
    # round(q') of its pixel-centre coordinate q' = A x + t', so t' = t + A (0.5, 0.5) - 0.5
    # gives q' = q - 0.5, and round(q - 0.5) (halves away from zero) = floor(q) unless q = 0.
    transform = tf.stack([a, b, c + 0.5 * (a + b) - 0.5, d, e, f + 0.5 * (d + e) - 0.5,
                          tf.zeros_like(a), tf.zeros_like(a)])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.cast(transform, tf.float32)[None],
        output_shape=tf.shape(image)[:2], fill_value=tf.constant(FILL_VALUE, tf.float32),
        interpolation="NEAREST", fill_mode="CONSTANT")[0]
    out.set_shape(image.shape)
    return out


def _hw(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    shape = tf.cast(tf.shape(image), tf.float64)
    return shape[0], shape[1]


def rotate(image: tf.Tensor, degrees: Any) -> tf.Tensor:
    """PIL's `image.rotate(degrees, NEAREST, fillcolor=128)`: counter-clockwise by `degrees`
    about the image centre, same size, corners filled with grey."""
    image = _checked(image)
    _check_static_finite("degrees", degrees)
    h, w = _hw(image)
    radians = tf.cast(degrees, tf.float64) * (math.pi / 180.0)
    cos, sin = tf.cos(radians), tf.sin(radians)
    cx, cy = w / 2.0, h / 2.0
    return affine(image, (cos, -sin, cx - cos * cx + sin * cy,
                          sin, cos, cy - sin * cx - cos * cy))


def shear_x(image: tf.Tensor, shear: Any) -> tf.Tensor:
    """PIL AFFINE `(1, shear, 0, 0, 1, 0)` (timm's ShearX): row y shifts by `-shear * y`."""
    _check_static_finite("shear", shear)
    return affine(image, (1.0, shear, 0.0, 0.0, 1.0, 0.0))


def shear_y(image: tf.Tensor, shear: Any) -> tf.Tensor:
    """PIL AFFINE `(1, 0, 0, shear, 1, 0)` (timm's ShearY): column x shifts by `-shear * x`."""
    _check_static_finite("shear", shear)
    return affine(image, (1.0, 0.0, 0.0, shear, 1.0, 0.0))


def translate_x(image: tf.Tensor, pixels: Any) -> tf.Tensor:
    """Moves the content `pixels` (a float) to the right: PIL AFFINE `(1, 0, -pixels, 0, 1, 0)`."""
    _check_static_finite("pixels", pixels)
    return affine(image, (1.0, 0.0, -tf.cast(pixels, tf.float64), 0.0, 1.0, 0.0))


def translate_y(image: tf.Tensor, pixels: Any) -> tf.Tensor:
    """Moves the content `pixels` (a float) down: PIL AFFINE `(1, 0, 0, 0, 1, -pixels)`."""
    _check_static_finite("pixels", pixels)
    return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, -tf.cast(pixels, tf.float64)))


# -------------------------------------------------------------------------------- magnitude
_SIGNED = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY",
                     "Color", "Contrast", "Brightness", "Sharpness"})


def op_parameter(name: str, magnitude: float) -> float | int | None:
    """The parameter op `name` gets at `magnitude` (0..10) before the random sign: degrees,
    shear, fraction of the image size (Translate*), threshold, bits, or the enhance factor's
    distance from 1 (the factor is 1 +- that). None for the ops without one."""
    if name not in OPS:
        raise invalid("randaugment", "op", name, f"expected one of {list(OPS)}")
    _, magnitude = check_randaugment("randaugment", 0, magnitude)  # 25 gave Posterize -2 bits
    m = magnitude / MAX_MAGNITUDE
    return {
        "Rotate": 30.0 * m,
        "ShearX": 0.3 * m,
        "ShearY": 0.3 * m,
        "TranslateX": TRANSLATE_FRACTION * m,
        "TranslateY": TRANSLATE_FRACTION * m,
        "Solarize": 256 - min(256, int(256 * m)),
        "Posterize": 8 - int(round(4 * m)),
        "Color": 0.9 * m,
        "Contrast": 0.9 * m,
        "Brightness": 0.9 * m,
        "Sharpness": 0.9 * m,
    }.get(name)


def apply_op(image: tf.Tensor, name: str, magnitude: float, negate: Any = False) -> tf.Tensor:
    """Op `name` of `OPS` at `magnitude` (0..10, mapped as the module docstring says) on a uint8
    image; `negate` (a bool or a boolean tensor) flips the sign of the signed ops."""
    image = _checked(image)
    value = op_parameter(name, magnitude)
    if name in _SIGNED:
        value = tf.where(tf.cast(negate, tf.bool), -value, value)
    h, w = _hw(image)
    ops: dict[str, Callable[[], tf.Tensor]] = {
        "Identity": lambda: identity(image),
        "AutoContrast": lambda: autocontrast(image),
        "Equalize": lambda: equalize(image),
        "Rotate": lambda: rotate(image, value),
        "Solarize": lambda: solarize(image, value),
        "Color": lambda: color(image, 1.0 + value),
        "Posterize": lambda: posterize(image, value),
        "Contrast": lambda: contrast(image, 1.0 + value),
        "Brightness": lambda: brightness(image, 1.0 + value),
        "Sharpness": lambda: sharpness(image, 1.0 + value),
        "ShearX": lambda: shear_x(image, value),
        "ShearY": lambda: shear_y(image, value),
        "TranslateX": lambda: translate_x(image, tf.cast(value, tf.float64) * w),
        "TranslateY": lambda: translate_y(image, tf.cast(value, tf.float64) * h),
    }
    out = ops[name]()
    out.set_shape(image.shape)
    return out


def layer_draws(seed: Any, num_layers: int) -> tuple[tf.Tensor, tf.Tensor]:
    """`(op indices into OPS, negate flags)`, each `[num_layers]`: the ops `rand_augment` applies
    in order (uniform, with replacement) and the signs of their parameters, drawn statelessly
    from `seed` (int64 `[2]`)."""
    seed = tf.convert_to_tensor(seed)
    fold_in = tf.random.experimental.stateless_fold_in
    ops = tf.random.stateless_uniform([num_layers], seed=fold_in(seed, 0), maxval=len(OPS),
                                      dtype=tf.int32)
    negate = tf.random.stateless_uniform([num_layers], seed=fold_in(seed, 1)) < 0.5
    return ops, negate


def _check_float_pixels(image: tf.Tensor) -> None:
    """A ValueError unless `image` is a float tensor whose values, where known before the graph
    runs (eager, or a constant), are in [0, 255]."""
    if not image.dtype.is_floating:
        raise invalid("rand_augment", "image.dtype", image.dtype.name,
                      "expected uint8, or a float type with values in [0, 255]")
    values = tf.get_static_value(image)
    if values is None or not values.size:
        return
    if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 255):
        raise invalid("rand_augment", "image", f"<values in [{values.min()}, {values.max()}]>",
                      "expected values in [0, 255] (pixel levels, not normalized)")


# Plain TensorFlow ops (tf.switch_case, Python control flow on Python values only): autograph's
# conversion of this module's source, which `Dataset.map` does by default, is left out; it took
# ~4.5 of the ~5.4 s that building a RandAugment pipeline's map function took, for the same graph.
@tf.autograph.experimental.do_not_convert
def rand_augment(image: Any, seed: Any, num_layers: int, magnitude: float) -> tf.Tensor:
    """RandAugment: `num_layers` ops drawn uniformly from `OPS` (with replacement), each applied
    at `magnitude` (0..10) with a random sign, all drawn from the stateless `seed` (int64 `[2]`,
    as `tf.random.stateless_*` take): the same seed gives the same output. Graph-mode safe (for
    `tf.data.Dataset.map`); keeps the static shape.

    `image`: uint8 `[H, W, C]`, C = 1 or 3; or a float image in 0..255, rounded to uint8 first
    and returned as its dtype (whole levels; other dtypes, empty images and known float values
    outside 0..255 are refused). `num_layers=0` returns `image` as it is.
    """
    num_layers, magnitude = check_randaugment("rand_augment", num_layers, magnitude)
    image = tf.convert_to_tensor(image)
    dtype = image.dtype
    pixels = image
    if dtype != tf.uint8:
        _check_float_pixels(image)
        pixels = tf.cast(tf.round(tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)),
                         tf.uint8)
    pixels = _checked(pixels)
    if num_layers == 0:
        return image
    ops, negate = layer_draws(seed, num_layers)
    for layer in range(num_layers):
        branches = [lambda x=pixels, name=name, neg=negate[layer]: apply_op(x, name, magnitude,
                                                                             neg)
                    for name in OPS]
        pixels = tf.switch_case(ops[layer], branches)
        pixels.set_shape(image.shape)
    return pixels if dtype == tf.uint8 else tf.cast(pixels, dtype)

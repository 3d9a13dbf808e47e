"""Per-example preprocessing: a decoded uint8 image to the normalized float32 image a model sees.

The preset's eval resize or centre crop; for training its random crop and flip and optional
RandAugment, drawn statelessly from a per-example key so resumed runs replay them bit for bit.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from cnnjax.data import presets, randaugment
from cnnjax.data.sources import Source
from cnnjax.data.spec import Spec
from cnnjax.utils.validation import invalid

_OWNER = "data"
# RandAugment's per-example key is `fold_in(key, _RANDAUGMENT_STREAM)`, apart from the crop/flip
# keys `stateless_split(key, 2)` (unchanged, so runs without RandAugment keep their batches).
_RANDAUGMENT_STREAM = 0x52414E44


@dataclasses.dataclass(frozen=True)
class Transforms:
    """TF graph functions from a decoded uint8 image to a normalized float32 image.

    With `randaugment_layers > 0`, `train` applies RandAugment to the 0..255 pixels after the
    crop and flip (after the resize for the augmentation "none"), before normalization; those
    pixels are rounded to whole levels first (RandAugment's ops are PIL's, on uint8).

    `grey_to_rgb`: a decoded 1-channel image becomes 3 identical channels first (as PIL's
    `convert("RGB")`), so every later step, `eval_pixels` included, sees an RGB image; `out_shape`,
    `mean` and `std` then have 3 channels.
    """

    out_shape: tuple[int, int, int]
    native_hw: tuple[int | None, int | None]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_augmentation: str
    eval_transform: str
    crop_padding: int
    crop_fraction: float
    randaugment_layers: int = 0
    randaugment_magnitude: float = 9.0
    grey_to_rgb: bool = False

    def __post_init__(self) -> None:
        presets.check_transform_fields("Transforms", self.train_augmentation,
                                       self.eval_transform, self.crop_padding,
                                       self.crop_fraction)
        randaugment.check_randaugment("Transforms", self.randaugment_layers,
                                      self.randaugment_magnitude, layers_arg="randaugment_layers",
                                      magnitude_arg="randaugment_magnitude")

    def normalize(self, image: tf.Tensor) -> tf.Tensor:
        """Pixels in [0, 1] (any leading axes) to what the model sees: minus mean, over std."""
        return (image - tf.constant(self.mean, tf.float32)) / tf.constant(self.std, tf.float32)

    def _finish(self, image: tf.Tensor) -> tf.Tensor:
        image = self.normalize(image)
        image.set_shape(self.out_shape)
        return image

    def _pixels(self, image: tf.Tensor) -> tf.Tensor:
        """A decoded uint8 image as float32 in [0, 1], its grey channel repeated 3 times under
        `grey_to_rgb`."""
        image = tf.cast(image, tf.float32) / 255.0
        if self.grey_to_rgb:
            image = tf.tile(tf.ensure_shape(image, [None, None, 1]), [1, 1, 3])
        return image

    def _resize(self, image: tf.Tensor) -> tf.Tensor:
        hw = self.out_shape[:2]
        if tuple(self.native_hw) == hw:
            return image
        # Antialiasing only matters when shrinking, and costs ~2x when enlarging.
        native = self.native_hw
        shrinks = None in native or any(o < n for o, n in zip(hw, native, strict=True))
        return tf.image.resize(image, hw, method="bilinear", antialias=shrinks)

    def eval_pixels(self, image: tf.Tensor) -> tf.Tensor:
        """The eval transform before normalization: float32 in [0, 1] (`eval` normalizes it;
        `experiments.robustness` corrupts it first)."""
        image = self._pixels(image)
        if self.eval_transform == "resize_center_crop":
            return _resize_shorter_center_crop(image, self.out_shape[0], self.crop_fraction)
        return self._resize(image)

    def eval(self, image: tf.Tensor) -> tf.Tensor:
        """The deterministic eval transform: `eval_pixels`, normalized, with the static shape."""
        return self._finish(self.eval_pixels(image))

    def train(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Augments with stateless ops seeded by `seed` (int64 `[2]`), so it is replayable."""
        if self.train_augmentation == "none":
            image = self.eval_pixels(image)
        else:
            image = self._crop_flip(image, seed)
        if self.randaugment_layers:
            key = tf.random.experimental.stateless_fold_in(seed, _RANDAUGMENT_STREAM)
            pixels = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)
            pixels = randaugment.rand_augment(pixels, key, self.randaugment_layers,
                                              self.randaugment_magnitude)
            image = tf.cast(pixels, tf.float32) / 255.0
        return self._finish(image)

    def _crop_flip(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """The preset's random crop and flip: float32 in [0, 1]."""
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = self._pixels(image)
        if self.train_augmentation == "pad_crop_flip":
            image = self._resize(image)
            p = self.crop_padding
            image = tf.pad(image, [[p, p], [p, p], [0, 0]])
            image = tf.image.stateless_random_crop(image, self.out_shape, seed=crop_seed)
        else:  # random_resized_crop_flip
            image = _random_resized_crop(image, self.out_shape, crop_seed)
        return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _center_crop_geometry(hw: tf.Tensor, size: int,
                          crop_fraction: float) -> tuple[tf.Tensor, tf.Tensor]:
    """torchvision's `Resize(round(size / crop_fraction))` + `CenterCrop(size)` geometry for
    an image of int32 `hw`: the resized `[h, w]` and the crop's `[top, left]`.

    `Resize(n)` makes the shorter side n and the longer `int(n * long / short)` (truncated);
    `CenterCrop` starts at `int(round((side - size) / 2))` (Python's round: half to even).
    With `crop_fraction` in (0, 1] (`Transforms` checks it) both resized sides are >= `size`.
    """
    resize_to = int(round(size / crop_fraction))
    short, long = tf.reduce_min(hw), tf.reduce_max(hw)
    new_long = resize_to * long // short  # exact integer floor of n * long / short
    new_hw = tf.where(hw == short, resize_to, new_long)  # a square image: both sides n
    excess = new_hw - size
    half = excess // 2
    top_left = half + (excess % 2) * (half % 2)  # round(excess / 2), ties to the even one
    return new_hw, top_left


def _resize_shorter_center_crop(image: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """Resizes the shorter side to `round(size / crop_fraction)`, then center-crops `size`, with
    torchvision's output sizes and crop offsets (`_center_crop_geometry`)."""
    new_hw, top_left = _center_crop_geometry(tf.shape(image)[:2], size, crop_fraction)
    image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    top, left = top_left[0], top_left[1]
    return image[top:top + size, left:left + size, :]


# torchvision's `RandomResizedCrop` defaults (and Inception's): area and aspect-ratio ranges. The
# sampling within them is TF's (`_random_resized_crop_box`), whose area distribution differs.
_CROP_AREA = (0.08, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)


def _fallback_crop(hw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """torchvision's `RandomResizedCrop.get_params` crop when all its attempts fail, as
    `(begin [top, left], size [h, w])` of an image of int32 `hw`: the whole image if its aspect
    ratio is within [3/4, 4/3], else a centred crop of the full short side with the nearest
    aspect ratio in range (`h = round(w / (3/4))` for a tall image, `w = round(h * 4/3)` for a
    wide one; 4n/3 is never a tie), at `(side - crop) // 2`."""
    h, w = hw[0], hw[1]
    tall, wide = 4 * w < 3 * h, 3 * w > 4 * h  # w/h < 3/4, w/h > 4/3, exactly
    crop_h = tf.where(tall, (4 * w + 1) // 3, h)  # round(4w/3) in integers
    crop_w = tf.where(wide, (4 * h + 1) // 3, w)
    size = tf.stack([crop_h, crop_w])
    return (hw - size) // 2, size


def _random_resized_crop_box(shape: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The Inception crop of an image of `shape` (`[H, W, C]`) as `(begin, size)`, `[3]` each:
    TF's sampling of 8%-100% of the area at aspect ratio 3/4-4/3 (10 attempts); when every
    attempt fails, torchvision's fallback (`_fallback_crop`), not the whole image TF returns."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=_CROP_RATIO,
        area_range=_CROP_AREA,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    # TF gives the whole image when all attempts fail. A sampled crop is the whole image only
    # when round(h * ratio) = w for a ratio in range (or w / ratio = h), and then torchvision's
    # fallback is the whole image too: replacing every whole-image result changes failures only.
    hw = tf.cast(shape[:2], tf.int32)
    whole = tf.reduce_all(size[:2] == hw)
    fallback_begin, fallback_size = _fallback_crop(hw)
    begin = tf.where(whole, tf.concat([fallback_begin, [0]], 0), begin)
    size = tf.where(whole, tf.concat([fallback_size, [-1]], 0), size)
    return begin, size


def _random_resized_crop(image: tf.Tensor, shape: tuple[int, int, int],
                         seed: tf.Tensor) -> tf.Tensor:
    """Inception crop (`_random_resized_crop_box`), resized to `shape[:2]`."""
    begin, crop_size = _random_resized_crop_box(tf.shape(image), seed)
    # A slice with a runtime size loses the static channel count (RandAugment needs it).
    image = tf.ensure_shape(tf.slice(image, begin, crop_size), [None, None, shape[2]])
    return tf.image.resize(image, shape[:2], method="bilinear", antialias=True)


def _normalization_mismatch(spec: Spec, channels: int) -> ValueError:
    """The error for images whose channel count differs from the preset's mean/std."""
    preset = spec.preset
    matching = [name for name in presets.list_datasets()
                if name != "fake" and len(presets.get_preset(name).mean) == channels]
    overridden = spec.tfds_name != preset.tfds_name
    hint = (" (or data.grey_to_rgb=True to feed the grey images as RGB)"
            if channels == 1 and len(preset.mean) == 3 else "")
    field, value = ("tfds_name", spec.tfds_name) if overridden else ("name", preset.name)
    return invalid(_OWNER, field, value,
                   f"tfds {spec.tfds_name!r} has {channels}-channel images but preset "
                   f"{preset.name!r} has {len(preset.mean)}-channel statistics (mean "
                   f"{preset.mean}, std {preset.std}); pick a data.name whose preset has "
                   f"{channels}-channel statistics ({matching}), or a tfds_name with "
                   f"{len(preset.mean)}-channel images{hint}")


def make_transforms(spec: Spec, source: Source) -> Transforms:
    """The `Transforms` of `spec` for `source`'s images (output size, channels, normalization)."""
    native_h, native_w, channels = source.native_shape
    if spec.size is not None:
        out_hw = spec.size
    elif native_h is not None and native_w is not None:
        out_hw = (native_h, native_w)
    else:  # Only a tfds_name override can lead here: presets of variable-size data have a size.
        raise invalid(_OWNER, "image_size", None,
                      f"{spec.tfds_name!r} has images of varying size; set data.image_size")
    if spec.grey_to_rgb and channels != 1:
        raise invalid(_OWNER, "grey_to_rgb", True,
                      f"{spec.tfds_name or spec.preset.name!r} has {channels}-channel images; "
                      "expected False (grey_to_rgb repeats the one channel of grey images 3 "
                      "times)")
    if spec.randaugment_layers and channels not in (1, 3):
        raise invalid(_OWNER, "randaugment_layers", spec.randaugment_layers,
                      f"expected 0 for {channels}-channel images (RandAugment's ops are defined "
                      "on grey or RGB images)")
    preset = spec.preset
    mean, std = preset.mean, preset.std
    if spec.grey_to_rgb:
        channels = 3
        if len(mean) == 1:  # the grey statistics hold for each of the 3 identical channels
            mean, std = mean * 3, std * 3
    if len(mean) != channels:
        if preset.name != "fake":
            raise _normalization_mismatch(spec, channels)
        mean, std = (0.5,) * channels, (0.5,) * channels  # custom `fake` channels: 0..1 on 0
    return Transforms(
        out_shape=(*out_hw, channels),
        native_hw=(native_h, native_w),
        mean=mean,
        std=std,
        train_augmentation=preset.train_augmentation if spec.augment else "none",
        eval_transform=preset.eval_transform,
        crop_padding=preset.crop_padding,
        crop_fraction=preset.crop_fraction,
        randaugment_layers=spec.randaugment_layers,
        randaugment_magnitude=spec.randaugment_magnitude,
        grey_to_rgb=spec.grey_to_rgb,
    )

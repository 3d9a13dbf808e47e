"""Fully convolutional networks FCN-32s/16s/8s (Long, Shelhamer, Darrell 2015).

A classification backbone is "convolutionalized" and scores every position; transposed
convolutions upsample the coarse scores back to the input resolution, fusing (8s, 16s) the finer
scores of earlier pooling stages on the way.

- VGG-16 backbone: the `VGGFeatures` trunk of `cnnjax.models.vgg` (same parameter names), then
  `fc6` as a 7x7 convolution with 4096 filters and `fc7` as a 1x1 convolution with 4096 filters
  (ReLU + dropout after each), then the class-scoring 1x1 convolution `head` (Caffe's
  `score_fr`). Their kernels have exactly the shapes of VGG-16's dense `fc6`/`fc7` kernels
  reshaped, so ImageNet VGG-16 weights load with `fcn_params_from_vgg16`.
- ResNet backbones: `ResNet(features_only=True)` (same parameter names as the classifier, under
  `backbone`); the global-average-pool + linear classifier convolutionalized is a 1x1 `head` on
  stage4 (no fc6/fc7). pool3/pool4/pool5 are stage2/stage3/stage4 (strides 8/16/32).
- Skips: `score_pool4` / `score_pool3` 1x1 convolutions (zero-initialized, as in the paper, so
  training starts from the coarser net's prediction); `upscore2`, `upscore_pool4` are learned 2x
  `ConvTranspose2D`s initialized to bilinear interpolation; the final 32x/16x/8x upsampling is
  fixed bilinear interpolation as in the paper (`learn_final_upsample=True` makes it learned).

Input sizes. The original pads the input by 100 pixels and crops the upsampled scores with
per-layer offsets, so that fc6's 7x7 VALID convolution fits any image. This module instead pads
the input at the bottom/right with zeros to the next multiple of the output stride (32) and runs
fc6 with SAME padding (3), so every stride-s map is exactly `H_pad/s`, each 2x/8x/16x/32x
transposed convolution produces exactly `s` times its input, and the final scores are cropped
back to `H x W`. Any input of at least one pixel works, the output is `[N, H, W, num_classes]`
(float32). With inputs normalized to zero mean, zero padding is padding with the mean colour.

Alignment. Every upsampling must put coarse pixel i where the backbone centred it on the finer
grid, or the skips add scores of different places and the output map is shifted off the input.
The two backbones place coarse pixels differently, so they get different (exact) geometries:
- VGG-16: 2x2 stride-2 pools centre coarse pixel i on the fine *half-pixel* `s·i + (s−1)/2` (the
  centre of its s x s block). Upsampling is the paper's half-pixel bilinear (even kernel
  `2s − s mod 2`, padding `ceil((s−1)/2)`), which puts coarse pixel i exactly there.
- ResNet: the padded stride-2 convolutions and 3x3 max pool (symmetric padding k//2) centre
  coarse pixel i on fine pixel `s·i` exactly. Upsampling is corner-aligned bilinear: odd kernel
  `2s − 1` (the triangle `1 − |t|/s`, centred), padding `s − 1`, output_padding `s − 1`, so
  output pixel `s·i` is coarse pixel i and the pixels between interpolate linearly. Half-pixel
  upsampling here would shift the FCN-32s output by 15.5 pixels and misalign the FCN-8s skips by
  8 and 12 pixels, which no learned layer can undo in FCN-32s (1x1 score layer, fixed final
  upsampling).
With either, the centre of each output pixel's receptive field is that pixel
(`cnnjax.analysis.summary` reports start 0 and no misaligned merge).

Borders. Every upsampling (fixed or learned) sees the coarse map with its edge rows and columns
repeated once beyond it, so output pixels outside the outermost coarse centres interpolate towards
the edge value, as torch's `interpolate` and TF's `resize` clamp and as Caffe's pad-100 scores
extend beyond the image. Upsampled against zeros, a constant score map read 0.52 of itself on
the edges of a 32x VGG output and 0.03 on the last row of a ResNet one, and FCN-8s's skip sums
mixed attenuated and full scores there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from cnnjax.layers.conv import Conv2D, ConvTranspose2D, bilinear_kernel_1d, bilinear_upsample_init
from cnnjax.models.registry import check_call, register_model
from cnnjax.models.resnet import ResNet18, ResNet34, ResNet50, ResNet101, ResNet152
from cnnjax.models.vgg import VGG_CONFIGS, VGGFeatures, check_dropout_rate
from cnnjax.utils.validation import (
    check_bool,
    check_choice,
    check_nhwc,
    check_positive_int,
    invalid,
)

Array = Any

_PAPER = (
    "Long, Shelhamer, Darrell 2015, Fully Convolutional Networks for Semantic Segmentation (CVPR)"
)

#: ResNet backbones by name; each gives {stem, stage1..stage4} at strides 2, 4, 8, 16, 32.
RESNET_BACKBONES = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
}
BACKBONES = ("vgg16", *RESNET_BACKBONES)
OUTPUT_STRIDE = 32


def _upsample_geometry(factor: int, corner_aligned: bool = False) -> tuple[int, int, int]:
    """(kernel, padding, output_padding) of an exact `factor`x bilinear transposed convolution.

    Half-pixel (VGG: coarse pixel i at fine `s·i + (s−1)/2`) or corner-aligned (ResNet: at `s·i`);
    see the module docstring. Both give exactly `factor · n` outputs for `n` inputs.
    """
    if corner_aligned:
        return 2 * factor - 1, factor - 1, factor - 1
    return 2 * factor - factor % 2, math.ceil((factor - 1) / 2), 0


def bilinear_upsample(x: Array, factor: int, corner_aligned: bool = False) -> Array:
    """Fixed (parameter-free) bilinear upsampling by an integer `factor`, each channel alone.

    The transposed convolution FCN uses, with the bilinear kernel of
    `cnnjax.layers.conv.bilinear_upsample_init`: output `factor * n`, half-pixel aligned (input
    pixel i centred at output `s·i + (s−1)/2`, as `tf.image.resize`) or, with `corner_aligned`,
    input pixel i at output `s·i`. Outputs beyond the outermost input centres take the edge value
    (clamped, as `tf.image.resize`), not a blend with zeros.
    """
    check_positive_int("bilinear_upsample", "factor", factor)
    return edge_clamped(
        functools.partial(bilinear_transposed_conv, factor=factor, corner_aligned=corner_aligned),
        x, factor)


def bilinear_transposed_conv(x: Array, factor: int, corner_aligned: bool = False) -> Array:
    """`bilinear_upsample`'s depthwise transposed convolution alone: zeros beyond the map, so
    the outermost outputs blend the edge with zero (`factor * n` outputs for `n` inputs).

    Written for XLA:CPU's speed, same outputs (to float rounding): the bilinear kernel is the
    outer product of two 1-D ones, so it runs as two 1-D transposed convolutions (height, then
    width; `2k` rather than `k²` taps per output), each channel as its own image of one channel
    (a grouped convolution with input dilation runs near 1 MFLOP/s there). 32x on a 7x7x21 map:
    22 s per image as one depthwise 2-D convolution, 0.76 s as two 1-D ones, 0.03 s as these.
    """
    k, p, op = _upsample_geometry(factor, corner_aligned)
    n, h, w, channels = x.shape
    taps = bilinear_kernel_1d(k)[::-1]  # symmetric; flipped as a transposed convolution flips
    pads, none = (k - 1 - p, k - 1 - p + op), (0, 0)
    y = jnp.transpose(x, (0, 3, 1, 2)).reshape(n * channels, h, w, 1)
    for window, padding, dilation in (((k, 1), [pads, none], (factor, 1)),
                                      ((1, k), [none, pads], (1, factor))):
        y = lax.conv_general_dilated(
            y,
            jnp.asarray(taps.reshape(*window, 1, 1), x.dtype),
            window_strides=(1, 1),
            padding=padding,
            lhs_dilation=dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    return jnp.transpose(y.reshape(n, channels, *y.shape[1:3]), (0, 2, 3, 1))


def edge_clamped(upsample: Callable[[Array], Array], x: Array, factor: int) -> Array:
    """`upsample` (exactly `factor`x on H and W) of NHWC `x` with its edge rows and columns
    repeated once beyond the map, cropped back to `factor` times `x`: the border outputs of a
    bilinear transposed convolution interpolate towards the edge value instead of towards zero."""
    y = upsample(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge"))
    return y[:, factor:-factor, factor:-factor]


class FCN(nn.Module):
    """FCN-`variant`s (32, 16 or 8) on a `backbone` (`"vgg16"` or `"resnet18"`..`"resnet152"`).

    `__call__(x, train=False, return_features=False)` returns scores `[N, H, W, num_classes]`
    (float32) for an NHWC input of any size, or `(scores, features)` where `features` holds the
    backbone's maps (VGG: `block1`..`block5`, `fc7`; ResNet: `stem`, `stage1`..`stage4`) and the
    coarse `score` map (stride 32).
    """

    num_classes: int = 21
    variant: int = 8
    backbone: str = "vgg16"
    # Dropout after fc6 and fc7, which only the VGG-16 backbone has (None: the paper's 0.5).
    dropout_rate: float | None = None
    learn_final_upsample: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_classes", self.num_classes)
        check_choice(owner, "variant", self.variant, (32, 16, 8))
        check_choice(owner, "backbone", self.backbone, BACKBONES)
        if self.dropout_rate is not None:
            check_dropout_rate(owner, self.dropout_rate)
            if self.backbone != "vgg16":
                raise invalid(owner, "dropout_rate", self.dropout_rate,
                              f"the {self.backbone} backbone has no dropout (only VGG-16's fc6 "
                              "and fc7 have); leave it None")
        check_bool(owner, "learn_final_upsample", self.learn_final_upsample)
        super().__post_init__()

    @property
    def effective_dropout_rate(self) -> float:
        """The dropout rate training applies: `dropout_rate` after VGG-16's fc6 and fc7 (unset:
        the paper's 0.5); 0 on a ResNet backbone, which has no dropout layer. The tuning
        recipe's dropout knob reads it (`cnnjax.tune.regularizers.knob_value`)."""
        if self.backbone != "vgg16":
            return 0.0
        return 0.5 if self.dropout_rate is None else self.dropout_rate

    def _backbone(self, x: Array, train: bool) -> tuple[dict[str, Array], tuple[Array, ...]]:
        """Backbone maps and the (pool3, pool4, stride-32 map) triple the FCN head consumes."""
        if self.backbone == "vgg16":
            feats = VGGFeatures(
                stages=VGG_CONFIGS[16], dtype=self.dtype, axis_name=self.axis_name, name="features"
            )(x, train)
            y = feats["block5"]
            for name, kernel in (("fc6", 7), ("fc7", 1)):
                y = Conv2D(4096, kernel, padding=kernel // 2, dtype=self.dtype, name=name)(y)
                y = nn.Dropout(self.effective_dropout_rate, deterministic=not train)(nn.relu(y))
            feats["fc7"] = y
            return feats, (feats["block3"], feats["block4"], y)
        feats = RESNET_BACKBONES[self.backbone](
            num_classes=1,
            features_only=True,
            dtype=self.dtype,
            axis_name=self.axis_name,
            name="backbone",
        )(x, train)
        return feats, (feats["stage2"], feats["stage3"], feats["stage4"])

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        """Scores `[N, H, W, num_classes]` (float32) of NHWC images `x` of any size; with
        `return_features` `(scores, features)` (see the class docstring)."""
        check_nhwc(type(self).__name__, x)
        if min(x.shape[1:]) < 1:  # the backbone's first pool or initializer would fail instead
            raise invalid(type(self).__name__, "input.shape", tuple(x.shape),
                          "expected height, width and channels >= 1 in an NHWC array")
        train = check_call(self, x, train, return_features,
                           dropout_rate=self.effective_dropout_rate)
        _, h, w, _ = x.shape
        pad_h, pad_w = (-h) % OUTPUT_STRIDE, (-w) % OUTPUT_STRIDE
        x = jnp.pad(jnp.asarray(x, self.dtype), ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        feats, (pool3, pool4, top) = self._backbone(x, train)

        score_conv = functools.partial(
            Conv2D, self.num_classes, 1, dtype=self.dtype, kernel_init=nn.initializers.zeros
        )
        corner = self.backbone != "vgg16"  # see "Alignment" in the module docstring
        k2, p2, op2 = _upsample_geometry(2, corner)
        up2 = functools.partial(
            ConvTranspose2D,
            self.num_classes,
            k2,
            strides=2,
            padding=p2,
            output_padding=op2,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=bilinear_upsample_init,
        )
        score = score_conv(name="head")(top)
        feats["score"] = score
        if self.variant <= 16:
            score = (edge_clamped(up2(name="upscore2"), score, 2)
                     + score_conv(name="score_pool4")(pool4))
        if self.variant == 8:
            score = (edge_clamped(up2(name="upscore_pool4"), score, 2)
                     + score_conv(name="score_pool3")(pool3))

        factor = self.variant
        if self.learn_final_upsample:
            k, p, op = _upsample_geometry(factor, corner)
            upscore_final = ConvTranspose2D(
                self.num_classes,
                k,
                strides=factor,
                padding=p,
                output_padding=op,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=bilinear_upsample_init,
                name="upscore_final",
            )
            score = edge_clamped(upscore_final, score, factor)
        else:
            score = bilinear_upsample(score, factor, corner)
        out = jnp.asarray(score[:, :h, :w, :], jnp.float32)
        return (out, feats) if return_features else out


def _check_vgg16_params(vgg_params: Mapping[str, Any]) -> None:
    """Raises unless `vgg_params` holds exactly a plain VGG-16's convolutions, fc6 and fc7."""
    owner, valid = "fcn_params_from_vgg16", "expected the params of cnnjax's plain vgg16"
    if not isinstance(vgg_params, Mapping) or not {"features", "fc6", "fc7"} <= set(vgg_params):
        found = sorted(vgg_params) if isinstance(vgg_params, Mapping) else type(vgg_params)
        raise invalid(owner, "vgg_params", found,
                      f"{valid} (with 'features', 'fc6' and 'fc7'; pass variables['params'])")
    expected = {f"conv{b}_{i}" for b, widths in enumerate(VGG_CONFIGS[16], 1)
                for i in range(1, len(widths) + 1)}
    names = set(vgg_params["features"])
    if names != expected:
        differences = [f"{what} {sorted(found)}" for what, found in (
            ("has", names - expected), ("lacks", expected - names)) if found]
        raise invalid(owner, "vgg_params", "features",
                      f"{valid}: its features {' and '.join(differences)} (VGG-16-BN's "
                      "BatchNorms or another depth's convolutions would be dropped or missing)")
    shape = tuple(vgg_params["fc6"]["kernel"].shape)
    if shape[0] != 7 * 7 * 512:
        raise invalid(owner, "vgg_params", f"fc6 kernel {shape}",
                      f"{valid}: fc6 reads the 7x7x512 pool5 map (25088 rows)")


def fcn_params_from_vgg16(vgg_params: Mapping[str, Any]) -> dict[str, Any]:
    """Maps a VGG-16 classifier's params (`cnnjax.models.vgg.vgg16`) to an FCN-VGG16's backbone.

    Returns `{"features", "fc6", "fc7"}` with fc6's dense kernel (25088, 4096) reshaped to the
    7x7x512x4096 convolution kernel (the dense kernel's rows index the pool5 map in (h, w, c)
    order) and fc7's to 1x1x4096x4096; merge it into an initialized FCN's params, keeping the
    freshly initialized score and upsampling layers. Params of another VGG (VGG-19's extra
    convolutions, VGG-16-BN's BatchNorms) are refused: merged, their extra entries would be
    ignored and the backbone would run with weights trained for another network.
    """
    _check_vgg16_params(vgg_params)
    fc6, fc7 = vgg_params["fc6"], vgg_params["fc7"]
    return {
        "features": vgg_params["features"],
        "fc6": {"kernel": jnp.reshape(fc6["kernel"], (7, 7, 512, -1)), "bias": fc6["bias"]},
        "fc7": {
            "kernel": jnp.reshape(fc7["kernel"], (1, 1, *fc7["kernel"].shape)),
            "bias": fc7["bias"],
        },
    }


_REGISTER = functools.partial(
    register_model, input_shape=(224, 224, 3), min_input_size=1, num_classes=21, paper=_PAPER,
    task="segmentation",
)


@_REGISTER("fcn32s_vgg16")
def fcn32s_vgg16(**kwargs: Any) -> FCN:
    """FCN-32s on VGG-16: scores at stride 32, upsampled 32x (21 classes: PASCAL VOC)."""
    return FCN(variant=32, backbone="vgg16", **kwargs)


@_REGISTER("fcn16s_vgg16")
def fcn16s_vgg16(**kwargs: Any) -> FCN:
    """FCN-16s on VGG-16: stride-32 scores fused with pool4's, upsampled 16x."""
    return FCN(variant=16, backbone="vgg16", **kwargs)


@_REGISTER("fcn8s_vgg16")
def fcn8s_vgg16(**kwargs: Any) -> FCN:
    """FCN-8s on VGG-16: fused with pool4's and pool3's scores, upsampled 8x."""
    return FCN(variant=8, backbone="vgg16", **kwargs)


@_REGISTER("fcn32s_resnet18")
def fcn32s_resnet18(**kwargs: Any) -> FCN:
    """FCN-32s on ResNet-18 (a small FCN for quick experiments)."""
    return FCN(variant=32, backbone="resnet18", **kwargs)


@_REGISTER("fcn8s_resnet18")
def fcn8s_resnet18(**kwargs: Any) -> FCN:
    """FCN-8s on ResNet-18 (skips from stage2 and stage3)."""
    return FCN(variant=8, backbone="resnet18", **kwargs)


@_REGISTER("fcn8s_resnet50")
def fcn8s_resnet50(**kwargs: Any) -> FCN:
    """FCN-8s on ResNet-50 (skips from stage2 and stage3)."""
    return FCN(variant=8, backbone="resnet50", **kwargs)

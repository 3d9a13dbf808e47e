"""AlexNet (Krizhevsky, Sutskever & Hinton 2012) in two layouts, and ZFNet (Zeiler & Fergus 2013).

`alexnet_2tower` is the paper's network (Section 3.5, Figure 2): conv1 96@11x11/4, conv2
256@5x5/p2, conv3 384@3x3/p1, conv4 384@3x3/p1, conv5 256@3x3/p1; the two GPU towers are grouped
convolutions (groups=2) in conv2, conv4 and conv5, whose kernels see only their own tower's half
of the input channels, while conv3 connects across towers; local response normalization
(k=2, n=5, alpha=1e-4, beta=0.75, alpha not divided by n) after the ReLU of conv1 and conv2, over
all 96/256 maps as in Caffe's reference AlexNet, so maps 46-49 (126-129) see across the tower
boundary (the paper's GPUs each normalize their own maps, cuda-convnet2's rnorm1a/rnorm1b, which
differs only there: `lrn_groups=2`); overlapping 3x3/s2 max pooling after conv1, conv2 and conv5;
fc6 4096, fc7 4096 with dropout 0.5 after their ReLUs; then the linear `head`. 60,965,224
parameters at 1000 classes (the figure of Caffe's grouped reference AlexNet; the paper says "60
million").

The paper's "224x224" input is a known inconsistency: (224 - 11) / 4 + 1 = 54.25 is not an
integer, and only a 227x227 input (or 224 padded by 3) gives the 55x55x96 conv1 map of Figure 2.
This implementation uses no conv1 padding and a native input of 227x227, which yields the
6x6x256 pool5 map (9216 fc6 inputs) behind the published count. Other input sizes run (down to
67x67) but change fc6's fan-in; the class `AlexNet(pool_size=6)` adds torchvision's adaptive
pooling (the registered name fixes the paper's flatten, so `create_model` refuses `pool_size`).

`alexnet` is torchvision's single-tower layout (cuda-convnet2's one-GPU config; the "One weird
trick" paper, Krizhevsky 2014, has 384 filters in conv4): 64-192-384-256-256 filters, conv1
11x11/4 with padding 2, no LRN, no groups, adaptive average pooling to 6x6 before the classifier
(so any input of at least 63x63 gives the same parameters), dropout before fc6 and fc7;
61,100,840 parameters at 1000 classes.

`zfnet` is Zeiler & Fergus's network (Figure 3): conv1 96@7x7/2 (padding 1), 3x3/s2 max pool,
contrast normalization, conv2 256@5x5/2, 3x3/s2 max pool, contrast normalization, conv3-5 3x3/p1,
3x3/s2 max pool, fc6 4096, fc7 4096 (dropout 0.5), `head`. The default widths of conv3/4/5 are
512/1024/512, the larger model of their Table 2 (16.0% validation / 16.1% test top-5 as a single
net; their 14.8% is a 6-net ensemble); Figure 3's own
384/384/256 is `zfnet(widths=(96, 256, 384, 384, 256))`. Pooling uses ceil mode (Caffe's
semantics), which reproduces Figure 3's map sizes 110-55-26-13-13-13-6 at 224x224. The paper
normalizes "across feature maps" without constants; AlexNet's LRN constants are used, after the
pool as Figure 3's caption orders it. Not reproduced: the renormalization of conv filters whose
RMS exceeds 0.1 (a training-time constraint, not architecture).

Parameter names: `conv1` .. `conv5`, `fc6`, `fc7`, `head`. Features (`return_features=True`):
`layer1` .. `layer5`, each conv layer's output after its ReLU and whatever LRN/pool follows it
(the "layers" of Zeiler & Fergus's visualizations), and `pre_logits` (the head's input).
Initialization: He-normal (fan-out) conv kernels, N(0, 0.01) dense kernels, zero biases (as
torchvision's VGG; the paper's N(0, 0.01) everywhere with unit biases trains too but slowly).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers.conv import Conv2D
from cnnjax.layers.dense import Dense
from cnnjax.layers.norm import LocalResponseNorm
from cnnjax.layers.pooling import adaptive_avg_pool2d, max_pool2d
from cnnjax.models.registry import build_variant, check_call, register_model
from cnnjax.models.vgg import check_dropout_rate, conv_kernel_init, dense_kernel_init, flatten
from cnnjax.utils.validation import (
    check_bool,
    check_non_negative_int,
    check_positive_int,
    invalid,
    is_integer,
)

Array = Any

_ALEXNET_PAPER = ("Krizhevsky, Sutskever & Hinton 2012, ImageNet Classification with Deep "
                  "Convolutional Neural Networks (NeurIPS)")
_ZFNET_PAPER = "Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks (ECCV)"


def _check_five(owner: str, arg: str, value: Any) -> tuple[int, ...]:
    """Validates a per-conv-layer setting: five positive ints (conv1 .. conv5)."""
    try:
        values = tuple(value)
    except TypeError:
        values = ()
    if len(values) != 5 or not all(is_integer(v) and v > 0 for v in values):
        raise invalid(owner, arg, value, "expected five positive ints, one per conv layer")
    return values


def _check_lrn_groups(owner: str, lrn_groups: Any, lrn: bool, widths: Sequence[int]) -> None:
    """`lrn_groups` must split conv1's and conv2's maps evenly, and needs `lrn`."""
    check_positive_int(owner, "lrn_groups", lrn_groups)
    if lrn_groups == 1:
        return
    if not lrn:
        raise invalid(owner, "lrn_groups", lrn_groups, "expected 1 with lrn=False (no LRN to "
                      "group)")
    if widths[0] % lrn_groups or widths[1] % lrn_groups:
        raise invalid(owner, "lrn_groups", lrn_groups, f"expected a divisor of conv1's and "
                      f"conv2's widths {widths[0]} and {widths[1]}")


def _classifier(module: nn.Module, x: Array, train: bool, dropout_before_fc: bool) -> Array:
    """fc6 and fc7 (ReLU, dropout) of AlexNet-family nets; returns the head's input."""
    dense = functools.partial(Dense, dtype=module.dtype, kernel_init=dense_kernel_init)
    x = flatten(x)
    for name in ("fc6", "fc7"):
        if dropout_before_fc:
            x = nn.Dropout(module.dropout_rate, deterministic=not train)(x)
        x = nn.relu(dense(module.hidden_features, name=name)(x))
        if not dropout_before_fc:
            x = nn.Dropout(module.dropout_rate, deterministic=not train)(x)
    return x


class AlexNet(nn.Module):
    """AlexNet; the defaults are the paper's two-tower net (`alexnet_2tower`), see module doc.

    Attributes:
      num_classes: outputs of `head`.
      widths: output channels of conv1 .. conv5.
      groups: feature groups of conv1 .. conv5 (2 = the paper's two towers; all 1 = one tower).
      conv1_padding: zero padding of conv1 (paper: 0 at 227x227; torchvision: 2 at 224x224).
      lrn: local response normalization after the ReLU of conv1 and conv2 (before their pools).
      lrn_groups: channel groups each LRN normalizes separately: 1 = across all maps (Caffe's
        reference AlexNet), 2 = per tower (the paper's two GPUs); must divide widths[0] and [1].
      pool_size: side of an adaptive average pool before fc6 (torchvision: 6); None flattens
        pool5 as it is (the paper).
      dropout_before_fc: False = dropout after the ReLUs of fc6 and fc7 (paper, Caffe);
        True = before fc6 and fc7 (torchvision).
      dropout_rate: dropout probability (0.5), active only when `train=True`.
      hidden_features: width of fc6 and fc7 (4096).
      dtype: computation dtype (parameters stay float32); logits are returned in float32.
      axis_name: unused (no BatchNorm); kept so every cnnjax model has the same fields.
    """

    num_classes: int = 1000
    widths: Sequence[int] = (96, 256, 384, 384, 256)
    groups: Sequence[int] = (1, 2, 1, 2, 2)
    conv1_padding: int = 0
    lrn: bool = True
    lrn_groups: int = 1
    pool_size: int | None = None
    dropout_before_fc: bool = False
    dropout_rate: float = 0.5
    hidden_features: int = 4096
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_classes", self.num_classes)
        _check_five(owner, "widths", self.widths)
        _check_five(owner, "groups", self.groups)
        check_non_negative_int(owner, "conv1_padding", self.conv1_padding)
        check_bool(owner, "lrn", self.lrn)
        _check_lrn_groups(owner, self.lrn_groups, self.lrn, self.widths)
        check_bool(owner, "dropout_before_fc", self.dropout_before_fc)
        check_dropout_rate(owner, self.dropout_rate)
        check_positive_int(owner, "hidden_features", self.hidden_features)
        if self.pool_size is not None:
            check_positive_int(owner, "pool_size", self.pool_size)
        super().__post_init__()

    def _lrn(self, x: Array) -> Array:
        """AlexNet's LRN over each of the `lrn_groups` channel groups separately."""
        lrn = LocalResponseNorm(dtype=self.dtype)  # parameter-free: one instance serves all
        if self.lrn_groups == 1:
            return lrn(x)
        return jnp.concatenate([lrn(part) for part in jnp.split(x, self.lrn_groups, axis=-1)],
                               axis=-1)

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        """Logits `[N, num_classes]` (float32) of NHWC images `x`; with `return_features`
        `(logits, features)`, the features `layer1`..`layer5` and `pre_logits`."""
        train = check_call(self, x, train, return_features, dropout_rate=self.dropout_rate)
        x = jnp.asarray(x, self.dtype)
        conv = functools.partial(Conv2D, dtype=self.dtype, kernel_init=conv_kernel_init)
        w, g = tuple(self.widths), tuple(self.groups)
        features: dict[str, Array] = {}

        x = nn.relu(conv(w[0], 11, strides=4, padding=self.conv1_padding, groups=g[0],
                         name="conv1")(x))
        if self.lrn:
            x = self._lrn(x)
        features["layer1"] = x = max_pool2d(x, 3, 2)
        x = nn.relu(conv(w[1], 5, padding=2, groups=g[1], name="conv2")(x))
        if self.lrn:
            x = self._lrn(x)
        features["layer2"] = x = max_pool2d(x, 3, 2)
        features["layer3"] = x = nn.relu(conv(w[2], 3, padding=1, groups=g[2], name="conv3")(x))
        features["layer4"] = x = nn.relu(conv(w[3], 3, padding=1, groups=g[3], name="conv4")(x))
        x = nn.relu(conv(w[4], 3, padding=1, groups=g[4], name="conv5")(x))
        features["layer5"] = x = max_pool2d(x, 3, 2)

        if self.pool_size is not None:
            x = adaptive_avg_pool2d(x, self.pool_size)
        x = _classifier(self, x, train, self.dropout_before_fc)
        features["pre_logits"] = x
        logits = Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_kernel_init,
                       name="head")(x)
        logits = jnp.asarray(logits, jnp.float32)
        return (logits, features) if return_features else logits


class ZFNet(nn.Module):
    """Zeiler & Fergus's network (Figure 3), conv3-5 widened to 512/1024/512 by default.

    Attributes:
      num_classes: outputs of `head`.
      widths: output channels of conv1 .. conv5.
      dropout_rate: dropout after the ReLUs of fc6 and fc7 (0.5), active only when `train=True`.
      hidden_features: width of fc6 and fc7 (4096).
      dtype: computation dtype (parameters stay float32); logits are returned in float32.
      axis_name: unused (no BatchNorm); kept so every cnnjax model has the same fields.
    """

    num_classes: int = 1000
    widths: Sequence[int] = (96, 256, 512, 1024, 512)
    dropout_rate: float = 0.5
    hidden_features: int = 4096
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_classes", self.num_classes)
        _check_five(owner, "widths", self.widths)
        check_dropout_rate(owner, self.dropout_rate)
        check_positive_int(owner, "hidden_features", self.hidden_features)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        """Logits `[N, num_classes]` (float32) of NHWC images `x`; with `return_features`
        `(logits, features)`, the features `layer1`..`layer5` and `pre_logits`."""
        train = check_call(self, x, train, return_features, dropout_rate=self.dropout_rate)
        x = jnp.asarray(x, self.dtype)
        conv = functools.partial(Conv2D, dtype=self.dtype, kernel_init=conv_kernel_init)
        pool = functools.partial(max_pool2d, kernel_size=3, stride=2, ceil_mode=True)
        w = tuple(self.widths)
        features: dict[str, Array] = {}

        x = pool(nn.relu(conv(w[0], 7, strides=2, padding=1, name="conv1")(x)))
        features["layer1"] = x = LocalResponseNorm(dtype=self.dtype)(x)
        x = pool(nn.relu(conv(w[1], 5, strides=2, name="conv2")(x)))
        features["layer2"] = x = LocalResponseNorm(dtype=self.dtype)(x)
        features["layer3"] = x = nn.relu(conv(w[2], 3, padding=1, name="conv3")(x))
        features["layer4"] = x = nn.relu(conv(w[3], 3, padding=1, name="conv4")(x))
        features["layer5"] = x = pool(nn.relu(conv(w[4], 3, padding=1, name="conv5")(x)))

        x = _classifier(self, x, train, dropout_before_fc=False)
        features["pre_logits"] = x
        logits = Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_kernel_init,
                       name="head")(x)
        logits = jnp.asarray(logits, jnp.float32)
        return (logits, features) if return_features else logits


# What each name fixes (`build_variant`): the layer layout; dropout, fc width and the paper
# net's `lrn_groups` stay settable.
_ALEXNET_2TOWER = functools.partial(
    AlexNet, widths=(96, 256, 384, 384, 256), groups=(1, 2, 1, 2, 2), conv1_padding=0, lrn=True,
    pool_size=None, dropout_before_fc=False)
_ALEXNET_TORCHVISION = functools.partial(
    AlexNet, widths=(64, 192, 384, 256, 256), groups=(1, 1, 1, 1, 1), conv1_padding=2, lrn=False,
    lrn_groups=1, pool_size=6, dropout_before_fc=True)


@register_model("alexnet_2tower", input_shape=(227, 227, 3), min_input_size=67, num_classes=1000,
                paper=_ALEXNET_PAPER)
def alexnet_2tower(**kwargs: Any) -> AlexNet:
    """The paper's two-tower AlexNet at 227x227; 60,965,224 parameters at 1000 classes."""
    return build_variant(_ALEXNET_2TOWER, kwargs)


@register_model("alexnet", input_shape=(224, 224, 3), min_input_size=63, num_classes=1000,
                paper=_ALEXNET_PAPER + "; torchvision's layout (cuda-convnet2's one-GPU config; "
                "the 'One weird trick' paper's conv4 has 384)")
def alexnet(**kwargs: Any) -> AlexNet:
    """Single-tower AlexNet in torchvision's layout; 61,100,840 parameters at 1000 classes."""
    return build_variant(_ALEXNET_TORCHVISION, kwargs)


@register_model("zfnet", input_shape=(224, 224, 3), min_input_size=63, num_classes=1000,
                paper=_ZFNET_PAPER)
def zfnet(**kwargs: Any) -> ZFNet:
    """ZFNet with 512/1024/512 filters in conv3/4/5 (Table 2's best single model)."""
    return ZFNet(**kwargs)

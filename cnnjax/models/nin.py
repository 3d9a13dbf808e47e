"""Network in Network (Lin, Chen & Yan 2014): mlpconv blocks and a global-average-pooling head.

An mlpconv block (`MLPConv`) is a k x k convolution followed by 1x1 convolutions (a small MLP
slid over the map, the paper's "cascaded cross channel parametric pooling", cccp), each with a
ReLU. Instead of fully connected layers, the last block outputs one map per class and the maps are
averaged over space (global average pooling), so the classifier itself has no dense layer.

Two registered models, both from the authors' released networks:

- `nin`: the ImageNet model (the Caffe model zoo's `nin_imagenet`, the one the paper reports
  only in passing and most textbooks draw): conv 96@11x11/4 + cccp 96, 96; max pool 3x3/2;
  conv 256@5x5/p2 + cccp 256, 256; max pool; conv 384@3x3/p1 + cccp 384, 384; max pool;
  dropout 0.5; conv 1024@3x3/p1 + cccp 1024, then the 1x1 `head` to the classes; global average
  pooling. 7,595,176 parameters at 1000 classes.
- `nin_cifar`: the paper's CIFAR-10 model (Section 4.2; the authors' cuda-convnet/Caffe
  definition): conv 192@5x5/p2 + cccp 160, 96; max pool 3x3/2; dropout 0.5; conv 192@5x5/p2 +
  cccp 192, 192; average pool 3x3/2; dropout 0.5; conv 192@3x3/p1 + cccp 192, then the 1x1 `head`
  to 10 classes; global average pooling. "Dropout on the outputs of all but the last mlpconv".

Pools use ceil mode as in Caffe (32 -> 16 -> 8 on CIFAR; 54 -> 27 -> 13 -> 6 on ImageNet).
As in the released nets, the class maps pass through a ReLU before the average (`relu_logits`;
set it False to average the raw maps). The `head` is the final 1x1 convolution, so
`cnnjax.models.heads.replace_head` works as for the other models.

Features (`return_features=True`): `block1` .. `blockN` (each mlpconv block's output after its
pool and dropout, where present; the last is the head's input) and `pre_logits` (the same map as
the last block: NiN has no vector before its classifier).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers.conv import Conv2D
from cnnjax.layers.pooling import avg_pool2d, global_avg_pool, max_pool2d
from cnnjax.models.registry import check_call, register_model
from cnnjax.models.vgg import check_dropout_rate, conv_kernel_init
from cnnjax.utils.validation import (
    check_bool,
    check_choice,
    check_positive_int,
    invalid,
    is_integer,
)

Array = Any

_PAPER = "Lin, Chen & Yan 2014, Network In Network (ICLR)"


class MLPConv(nn.Module):
    """An mlpconv block: a `kernel_size` convolution to `features[0]` channels, then one 1x1
    convolution per further entry of `features`; every convolution is followed by a ReLU."""

    features: Sequence[int]
    kernel_size: int
    strides: int = 1
    padding: int = 0
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        owner = type(self).__name__
        try:
            ok = len(self.features) > 0 and all(
                is_integer(f) and f > 0 for f in self.features)
        except TypeError:
            ok = False
        if not ok:
            raise invalid(owner, "features", self.features,
                          "expected a non-empty sequence of positive ints")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """`[N, H, W, C]` -> `[N, H_out, W_out, features[-1]]`, a ReLU after every convolution."""
        conv = functools.partial(Conv2D, dtype=self.dtype, kernel_init=conv_kernel_init)
        x = nn.relu(conv(self.features[0], self.kernel_size, strides=self.strides,
                         padding=self.padding, name="conv")(x))
        for i, features in enumerate(self.features[1:], start=1):
            x = nn.relu(conv(features, 1, name=f"cccp{i}")(x))
        return x


class NiNStage(NamedTuple):
    """One mlpconv block of a NiN and what follows it.

    `pool` is "max", "avg" or "none" (3x3/s2, ceil mode); `dropout` applies after the pool.
    """

    features: tuple[int, ...]
    kernel_size: int
    strides: int = 1
    padding: int = 0
    pool: str = "max"
    dropout: bool = False


#: The Caffe model zoo's ImageNet NiN; the last block's final 1x1 is the model's `head`.
NIN_IMAGENET: tuple[NiNStage, ...] = (
    NiNStage((96, 96, 96), 11, strides=4),
    NiNStage((256, 256, 256), 5, padding=2),
    NiNStage((384, 384, 384), 3, padding=1, dropout=True),
    NiNStage((1024, 1024), 3, padding=1, pool="none"),
)

#: The paper's CIFAR-10 NiN.
NIN_CIFAR: tuple[NiNStage, ...] = (
    NiNStage((192, 160, 96), 5, padding=2, dropout=True),
    NiNStage((192, 192, 192), 5, padding=2, pool="avg", dropout=True),
    NiNStage((192, 192), 3, padding=1, pool="none"),
)

POOLS = ("max", "avg", "none")


class NiN(nn.Module):
    """Network in Network: `stages` of mlpconv blocks, a 1x1 conv `head` to the classes, GAP.

    Attributes:
      stages: the mlpconv blocks (`NIN_IMAGENET`, `NIN_CIFAR` or your own `NiNStage`s).
      num_classes: channels of the `head` (1x1 convolution), i.e. of the logits.
      dropout_rate: rate of the dropout after the blocks whose stage asks for it (0.5).
      relu_logits: ReLU on the class maps before the global average (as the released nets).
      dtype: computation dtype (parameters stay float32); logits are returned in float32.
      axis_name: unused (no BatchNorm); kept so every cnnjax model has the same fields.
    """

    stages: Sequence[NiNStage] = NIN_IMAGENET
    num_classes: int = 1000
    dropout_rate: float = 0.5
    relu_logits: bool = True
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_classes", self.num_classes)
        check_dropout_rate(owner, self.dropout_rate)
        check_bool(owner, "relu_logits", self.relu_logits)
        if not self.stages:
            raise invalid(owner, "stages", self.stages, "expected at least one NiNStage")
        for stage in self.stages:
            check_choice(owner, "pool", stage.pool, POOLS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        """Logits `[N, num_classes]` (float32) of NHWC images `x`; with `return_features`
        `(logits, features)`, the features `block1`..`blockN` and `pre_logits`."""
        train = check_call(self, x, train, return_features, dropout_rate=self.dropout_rate)
        x = jnp.asarray(x, self.dtype)
        features: dict[str, Array] = {}
        for i, stage in enumerate(self.stages, start=1):
            x = MLPConv(stage.features, stage.kernel_size, stage.strides, stage.padding,
                        dtype=self.dtype, name=f"block{i}")(x)
            if stage.pool == "max":
                x = max_pool2d(x, 3, 2, ceil_mode=True)
            elif stage.pool == "avg":
                x = avg_pool2d(x, 3, 2, ceil_mode=True)
            if stage.dropout:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            features[f"block{i}"] = x
        features["pre_logits"] = x
        x = Conv2D(self.num_classes, 1, dtype=self.dtype, kernel_init=conv_kernel_init,
                   name="head")(x)
        if self.relu_logits:
            x = nn.relu(x)
        logits = jnp.asarray(global_avg_pool(x), jnp.float32)
        return (logits, features) if return_features else logits


@register_model("nin", input_shape=(224, 224, 3), min_input_size=55, num_classes=1000,
                paper=_PAPER + "; ImageNet model of the Caffe model zoo")
def nin(**kwargs: Any) -> NiN:
    """The ImageNet NiN (Caffe model zoo `nin_imagenet`); 7,595,176 parameters at 1000 classes."""
    return NiN(stages=NIN_IMAGENET, **kwargs)  # the name fixes the stages


@register_model("nin_cifar", input_shape=(32, 32, 3), min_input_size=6, num_classes=10,
                paper=_PAPER + "; CIFAR-10 model, Section 4.2")
def nin_cifar(**kwargs: Any) -> NiN:
    """The paper's CIFAR-10 NiN (three mlpconv blocks); 966,986 parameters at 10 classes."""
    return NiN(stages=NIN_CIFAR, **kwargs)  # the name fixes the stages

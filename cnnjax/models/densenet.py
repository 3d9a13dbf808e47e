"""DenseNet-BC 121/169/201 (Huang, Liu, van der Maaten, Weinberger 2017).

Each dense layer sees the concatenation of all earlier feature maps in its block and adds
`growth_rate` new channels through a bottleneck (BN-ReLU-1x1 conv to `bn_size * growth_rate`,
BN-ReLU-3x3 conv to `growth_rate`); transitions between blocks compress the channels by
`compression` (1x1 conv) and halve the resolution (2x2 average pool). Stem: 7x7/2 conv with
`2 * growth_rate` = 64 filters, BN-ReLU, 3x3/2 max pool; after the last block a final BN-ReLU,
global average pooling and the linear `head`. Convolutions have no bias; with 1000 classes the
parameter counts equal torchvision's (7,978,856 / 14,149,480 / 20,013,928).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models.registry import register_model
from cnnjax.models.resnet import batch_norm
from cnnjax.utils.validation import check_nhwc, check_positive_int, invalid

ModuleDef = Any
Array = Any

#: He (fan-in) normal initialization, as in the DenseNet reference code.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

_PAPER = (
    "Huang, Liu, van der Maaten, Weinberger 2017, Densely Connected Convolutional Networks (CVPR)"
)


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size*k) - BN-ReLU-3x3 conv (k); returns only the k new channels.

    `drop_rate` > 0 applies dropout (the `'dropout'` RNG stream) to the new channels in training.
    """

    growth_rate: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    bn_size: int = 4
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        y = self.act(self.norm(name="bn1")(x))
        y = self.conv(self.bn_size * self.growth_rate, (1, 1), padding="VALID", name="conv1")(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        if self.drop_rate > 0:
            y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
        return y


class DenseBlock(nn.Module):
    """`num_layers` DenseLayers, each fed the concatenation of the block input and all earlier
    layers' outputs; outputs `in_channels + num_layers * growth_rate` channels."""

    num_layers: int
    growth_rate: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    bn_size: int = 4
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        for i in range(self.num_layers):
            new = DenseLayer(
                self.growth_rate,
                conv=self.conv,
                norm=self.norm,
                act=self.act,
                bn_size=self.bn_size,
                drop_rate=self.drop_rate,
                name=f"layer{i + 1}",
            )(x, train)
            x = jnp.concatenate([x, new], axis=-1)
        return x


class Transition(nn.Module):
    """BN-ReLU-1x1 conv to `features` channels, then 2x2/2 average pooling (floor for odd sizes)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = self.act(self.norm(name="bn")(x))
        y = self.conv(self.features, (1, 1), padding="VALID", name="conv")(y)
        return nn.avg_pool(y, (2, 2), strides=(2, 2), padding="VALID")


class DenseNet(nn.Module):
    """DenseNet-BC: stem, dense blocks separated by compressing transitions, final BN-ReLU, GAP,
    linear `head`.

    Features: `stem` (after the stem conv-BN-ReLU, stride 2), `stage1`..`stage4` (each dense
    block's output, before the following transition; strides 4, 8, 16, 32), `pre_logits`.
    Logits are float32 whatever the computation `dtype`.
    """

    block_sizes: Sequence[int]
    num_classes: int = 1000
    growth_rate: int = 32
    num_init_features: int = 64
    bn_size: int = 4
    compression: float = 0.5
    drop_rate: float = 0.0
    dtype: Any = jnp.float32
    axis_name: str | None = None
    act: Callable = nn.relu

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive_int(name, "num_classes", self.num_classes)
        check_positive_int(name, "growth_rate", self.growth_rate)
        check_positive_int(name, "num_init_features", self.num_init_features)
        check_positive_int(name, "bn_size", self.bn_size)
        if not self.block_sizes or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in self.block_sizes
        ):
            raise invalid(
                name,
                "block_sizes",
                self.block_sizes,
                "expected a non-empty sequence of positive layer counts",
            )
        if not 0 < self.compression <= 1:
            raise invalid(name, "compression", self.compression, "expected 0 < compression <= 1")
        if not 0 <= self.drop_rate < 1:
            raise invalid(name, "drop_rate", self.drop_rate, "expected 0 <= drop_rate < 1")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        check_nhwc(type(self).__name__, x)
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init
        )
        norm = batch_norm(train, self.dtype, self.axis_name)
        features: dict[str, Array] = {}

        x = jnp.asarray(x, self.dtype)
        x = conv(
            self.num_init_features, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv_init"
        )(x)
        x = self.act(norm(name="bn_init")(x))
        features["stem"] = x
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        for i, num_layers in enumerate(self.block_sizes):
            x = DenseBlock(
                num_layers,
                self.growth_rate,
                conv=conv,
                norm=norm,
                act=self.act,
                bn_size=self.bn_size,
                drop_rate=self.drop_rate,
                name=f"block{i + 1}",
            )(x, train)
            features[f"stage{i + 1}"] = x
            if i + 1 < len(self.block_sizes):
                out = int(x.shape[-1] * self.compression)
                x = Transition(out, conv=conv, norm=norm, act=self.act, name=f"transition{i + 1}")(
                    x
                )

        x = self.act(norm(name="bn_final")(x))
        x = jnp.mean(x, axis=(1, 2))
        features["pre_logits"] = x
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        logits = jnp.asarray(logits, jnp.float32)
        return (logits, features) if return_features else logits


DenseNet121 = functools.partial(DenseNet, block_sizes=(6, 12, 24, 16))
DenseNet169 = functools.partial(DenseNet, block_sizes=(6, 12, 32, 32))
DenseNet201 = functools.partial(DenseNet, block_sizes=(6, 12, 48, 32))

_REGISTER = functools.partial(
    register_model, input_shape=(224, 224, 3), min_input_size=29, num_classes=1000, paper=_PAPER
)


@_REGISTER("densenet121")
def densenet121(**kwargs: Any) -> DenseNet:
    """DenseNet-121 (BC, k=32): blocks (6, 12, 24, 16); 7,978,856 parameters at 1000 classes."""
    return DenseNet121(**kwargs)


@_REGISTER("densenet169")
def densenet169(**kwargs: Any) -> DenseNet:
    """DenseNet-169 (BC, k=32): blocks (6, 12, 32, 32); 14,149,480 parameters at 1000 classes."""
    return DenseNet169(**kwargs)


@_REGISTER("densenet201")
def densenet201(**kwargs: Any) -> DenseNet:
    """DenseNet-201 (BC, k=32): blocks (6, 12, 48, 32); 20,013,928 parameters at 1000 classes."""
    return DenseNet201(**kwargs)

"""DenseNets of Huang, Liu, van der Maaten, Weinberger 2017: ImageNet DenseNet-BC 121/169/201/161
and the paper's CIFAR networks (section 3, Table 2).

Each dense layer sees the concatenation of all earlier feature maps in its block and adds
`growth_rate` (k) new channels, through a bottleneck (BN-ReLU-1x1 conv to `bn_size * k`,
BN-ReLU-3x3 conv to k; the "B" of DenseNet-BC) or, with `bottleneck=False`, through a single
BN-ReLU-3x3 conv (the basic DenseNet, which has no `bn_size`: setting it is an error);
transitions between blocks scale the channels by `compression` (BN-ReLU-1x1 conv,
floor(compression * C) outputs, at least 1; the "C") and halve the resolution (2x2 average
pool). After the last block: a final BN-ReLU, global average pooling and the linear
`head`. Convolutions have no bias.

ImageNet (`stem="imagenet"`): 7x7/2 conv with `2 * growth_rate` filters (64 for k=32, 96 for
DenseNet-161's k=48), BN-ReLU, 3x3/2 max pool, four blocks; with 1000 classes the parameter counts
equal torchvision's (7,978,856 / 14,149,480 / 20,013,928 / 28,681,000 for 121 / 169 / 201 / 161).

CIFAR (`stem="cifar"`, built by `cifar_densenet`): one 3x3/1 conv with 16 filters (2k for
DenseNet-BC) on the 32x32 input, no BN-ReLU or pooling, then three blocks of equal length on
32x32, 16x16 and 8x8 maps. Depth L counts the stem conv, the convs of the dense layers, the two
transition convs and the head: L = 3n + 4 with n basic layers per block, L = 6n + 4 with n
bottleneck layers. At 10 classes the registered models have Table 2's 1.0M (L=40, k=12), 7.0M
(L=100, k=12), 27.2M (L=100, k=24) and, for DenseNet-BC, 0.8M (L=100, k=12), 15.3M (L=250, k=24)
and 25.6M (L=190, k=40) parameters. The paper trains them with dropout 0.2 after every conv but
the first only without data augmentation: `drop_rate` defaults to 0 (`drop_every_conv=True` puts
the dropout where the paper does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers.dense import Dense
from cnnjax.layers.pooling import avg_pool2d, max_pool2d
from cnnjax.models.registry import build_variant, check_call, register_model
from cnnjax.models.resnet import batch_norm
from cnnjax.utils.validation import (
    check_bool,
    check_choice,
    check_depth,
    check_number,
    check_positive_int,
    check_positive_ints,
    invalid,
)

ModuleDef = Any
Array = Any

#: He-normal initialization with fan-in (std sqrt(2 / (kh * kw * in_channels))), as torchvision's
#: densenet (`kaiming_normal_`, whose default mode is fan-in), so that cnnjax's init matches the
#: torchvision model its weights convert from. The authors' reference code (liuzhuang13/DenseNet,
#: densenet.lua `ConvInit`) uses fan-out instead: std sqrt(2 / (kh * kw * out_channels)).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

#: `DenseNet.stem` choices: the ImageNet stem (7x7/2 conv, BN-ReLU, 3x3/2 max pool) or the
#: paper's CIFAR stem (a single 3x3/1 conv: no BN-ReLU, no pooling).
STEMS = ("imagenet", "cifar")

#: The bottleneck's width in multiples of k that `DenseNet(bn_size=None)` means (the paper's and
#: torchvision's 4).
DEFAULT_BN_SIZE = 4

_PAPER = (
    "Huang, Liu, van der Maaten, Weinberger 2017, Densely Connected Convolutional Networks (CVPR)"
)


def _transition_channels(block_sizes: Sequence[int], growth_rate: int, num_init_features: int,
                         compression: float) -> list[tuple[int, int]]:
    """(input, output) channels of each transition of a DenseNet: a block adds
    `num_layers * growth_rate` channels, a transition keeps int(compression * C) of its C."""
    channels, widths = num_init_features, []
    for i, num_layers in enumerate(block_sizes):
        channels += num_layers * growth_rate
        if i + 1 < len(block_sizes):
            out = int(channels * compression)
            widths.append((channels, out))
            channels = out
    return widths


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size*k) - BN-ReLU-3x3 conv (k), or with `bottleneck=False` just
    BN-ReLU-3x3 conv (k, parameters `bn` and `conv`); returns only the k new channels.

    `drop_rate` > 0 applies dropout (the `'dropout'` RNG stream) in training to the new channels
    and, with `drop_every_conv=True` (the paper's placement), also to the bottleneck's 1x1 conv
    output.
    """

    growth_rate: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    bn_size: int = 4
    drop_rate: float = 0.0
    bottleneck: bool = True
    drop_every_conv: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """The k new channels `[N, H, W, growth_rate]` of `x` `[N, H, W, C]` (not concatenated)."""
        def dropout(y: Array) -> Array:
            if self.drop_rate > 0:
                y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
            return y

        if not self.bottleneck:
            y = self.act(self.norm(name="bn")(x))
            y = self.conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name="conv")(y)
            return dropout(y)
        y = self.act(self.norm(name="bn1")(x))
        y = self.conv(self.bn_size * self.growth_rate, (1, 1), padding="VALID", name="conv1")(y)
        if self.drop_every_conv:
            y = dropout(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        return dropout(y)


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
    bottleneck: bool = True
    drop_every_conv: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """`x` `[N, H, W, C]` and every layer's new channels: `[N, H, W, C + num_layers * k]`."""
        for i in range(self.num_layers):
            new = DenseLayer(
                self.growth_rate,
                conv=self.conv,
                norm=self.norm,
                act=self.act,
                bn_size=self.bn_size,
                drop_rate=self.drop_rate,
                bottleneck=self.bottleneck,
                drop_every_conv=self.drop_every_conv,
                name=f"layer{i + 1}",
            )(x, train)
            x = jnp.concatenate([x, new], axis=-1)
        return x


class Transition(nn.Module):
    """BN-ReLU-1x1 conv to `features` channels, then 2x2/2 average pooling (floor for odd sizes).

    `drop_rate` > 0 applies dropout to the conv output in training (before the pooling, as the
    paper's reference code does).
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """`[N, H, W, C]` -> `[N, H // 2, W // 2, features]`."""
        y = self.act(self.norm(name="bn")(x))
        y = self.conv(self.features, (1, 1), padding="VALID", name="conv")(y)
        if self.drop_rate > 0:
            y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
        if min(y.shape[1:3]) < 2:  # the VALID pool would give an empty map, the GAP a NaN
            raise invalid(f"DenseNet {self.name}", "input map", "x".join(map(str, y.shape[1:3])),
                          "expected at least 2x2 for its 2x2/2 average pool: the network's input "
                          "is too small (each transition before it halves the map)")
        return avg_pool2d(y, 2, 2)


class DenseNet(nn.Module):
    """DenseNet: stem, dense blocks separated by transitions, final BN-ReLU, GAP, linear `head`.

    Features: `stem` (ImageNet: after the stem conv-BN-ReLU, stride 2; CIFAR: the 3x3 conv's
    output, stride 1), `stage1`..`stageN` (each dense block's output, before the following
    transition; ImageNet strides 4, 8, 16, 32, CIFAR strides 1, 2, 4), `pre_logits`.
    Logits are float32 whatever the computation `dtype`.

    Attributes:
      block_sizes: dense layers per block ((6, 12, 24, 16) for DenseNet-121).
      growth_rate: k, the channels each dense layer adds.
      num_init_features: the stem conv's filters (64 = 2k on ImageNet; 16 or 2k on CIFAR).
      bn_size: the bottleneck's width in multiples of k (None: DEFAULT_BN_SIZE = 4); only with
        `bottleneck=True` (a ValueError on the basic DenseNet, which has no 1x1 conv).
      compression: theta in (0, 1], the transitions' output/input channel ratio (0.5; 1 keeps
        them); every transition must keep at least one channel (int(theta * C) >= 1).
      drop_rate: dropout rate in training, in [0, 1) (0 disables it).
      dtype / axis_name: computation dtype (params float32) / BatchNorm cross-device axis.
      bottleneck: dense layers with the 1x1 bottleneck (default True, DenseNet-B/BC) or a single
        3x3 conv (the basic DenseNet).
      stem: "imagenet" (default) or "cifar" (see STEMS).
      drop_every_conv: False (default, torchvision): dropout only on each dense layer's k new
        channels; True (the paper): after every conv but the stem's, i.e. also after the
        bottleneck 1x1 convs and the transition convs.
    """

    block_sizes: Sequence[int]
    num_classes: int = 1000
    growth_rate: int = 32
    num_init_features: int = 64
    bn_size: int | None = None
    compression: float = 0.5
    drop_rate: float = 0.0
    dtype: Any = jnp.float32
    axis_name: str | None = None
    act: Callable = nn.relu
    bottleneck: bool = True
    stem: str = "imagenet"
    drop_every_conv: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive_int(name, "num_classes", self.num_classes)
        check_positive_int(name, "growth_rate", self.growth_rate)
        check_positive_int(name, "num_init_features", self.num_init_features)
        check_choice(name, "stem", self.stem, STEMS)
        check_bool(name, "bottleneck", self.bottleneck)
        check_bool(name, "drop_every_conv", self.drop_every_conv)
        if self.bn_size is not None:
            check_positive_int(name, "bn_size", self.bn_size)
            if not self.bottleneck:
                raise invalid(name, "bn_size", self.bn_size,
                              "expected None with bottleneck=False (bn_size is the width of the "
                              "bottleneck's 1x1 conv, which basic dense layers do not have)")
        check_positive_ints(name, "block_sizes", self.block_sizes,
                            "expected a non-empty sequence of positive layer counts")
        check_number(name, "compression", self.compression, "expected 0 < compression <= 1",
                        low=0.0, high=1.0, low_open=True, strings=False)
        check_number(name, "drop_rate", self.drop_rate, "expected 0 <= drop_rate < 1",
                        low=0.0, high=1.0, high_open=True, strings=False)
        widths = _transition_channels(self.block_sizes, self.growth_rate, self.num_init_features,
                                      self.compression)
        for i, (channels, out) in enumerate(widths):
            if out < 1:
                raise invalid(
                    name, "compression", self.compression,
                    f"transition{i + 1} would keep int({channels} * {self.compression!r}) = 0 "
                    f"of its {channels} channels (block_sizes={tuple(self.block_sizes)}, "
                    f"growth_rate={self.growth_rate}, "
                    f"num_init_features={self.num_init_features}); expected a compression "
                    f"that keeps at least one channel there (>= {1 / channels:.4g})",
                )
        super().__post_init__()

    def smallest_input(self) -> int:
        """The smallest input side: each of the t transitions' 2x2/2 pools needs a 2x2 map, so
        the stem must leave 2**t; the CIFAR stem keeps the size, the ImageNet stem (7x7/2 conv,
        3x3/2 pool) takes ceil(ceil(n / 2) / 2), so n >= 4 (2**t - 1) + 1 (29 for 3)."""
        needed = 2 ** (len(self.block_sizes) - 1)
        return needed if self.stem == "cifar" else 4 * (needed - 1) + 1

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        """Logits `[N, num_classes]` (float32) of NHWC images `x`; with `return_features`
        `(logits, features)`, the features `stem`, `stage1`..`stageN` and `pre_logits`."""
        train = check_call(self, x, train, return_features, first_conv="conv_init",
                           drop_rate=self.drop_rate)
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init
        )
        norm = batch_norm(train, self.dtype, self.axis_name)
        bn_size = DEFAULT_BN_SIZE if self.bn_size is None else self.bn_size
        features: dict[str, Array] = {}

        x = jnp.asarray(x, self.dtype)
        if self.stem == "cifar":
            x = conv(self.num_init_features, (3, 3), padding=((1, 1), (1, 1)), name="conv_init")(x)
            features["stem"] = x
        else:
            x = conv(
                self.num_init_features, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv_init"
            )(x)
            x = self.act(norm(name="bn_init")(x))
            features["stem"] = x
            x = max_pool2d(x, 3, 2, padding=1)

        for i, num_layers in enumerate(self.block_sizes):
            x = DenseBlock(
                num_layers,
                self.growth_rate,
                conv=conv,
                norm=norm,
                act=self.act,
                bn_size=bn_size,
                drop_rate=self.drop_rate,
                bottleneck=self.bottleneck,
                drop_every_conv=self.drop_every_conv,
                name=f"block{i + 1}",
            )(x, train)
            features[f"stage{i + 1}"] = x
            if i + 1 < len(self.block_sizes):
                out = int(x.shape[-1] * self.compression)
                x = Transition(
                    out,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    drop_rate=self.drop_rate if self.drop_every_conv else 0.0,
                    name=f"transition{i + 1}",
                )(x, train)

        x = self.act(norm(name="bn_final")(x))
        x = jnp.mean(x, axis=(1, 2))
        features["pre_logits"] = x
        logits = Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        logits = jnp.asarray(logits, jnp.float32)
        return (logits, features) if return_features else logits


_BC_K32 = {"growth_rate": 32, "num_init_features": 64, "bottleneck": True}
DenseNet121 = functools.partial(DenseNet, block_sizes=(6, 12, 24, 16), **_BC_K32)
DenseNet169 = functools.partial(DenseNet, block_sizes=(6, 12, 32, 32), **_BC_K32)
DenseNet201 = functools.partial(DenseNet, block_sizes=(6, 12, 48, 32), **_BC_K32)
#: The paper's widest ImageNet model: k=48 and a 96-filter (2k) stem, the same bottleneck
#: (bn_size 4) and compression 0.5 as the k=32 models.
DenseNet161 = functools.partial(
    DenseNet, block_sizes=(6, 12, 36, 24), growth_rate=48, num_init_features=96, bottleneck=True
)


def cifar_densenet(depth: int, growth_rate: int, *, bottleneck: bool = True,
                   **kwargs: Any) -> DenseNet:
    """The paper's CIFAR DenseNet of depth L = `depth` and growth rate k = `growth_rate`.

    Three blocks of n layers each: L = 6n + 4 with `bottleneck=True` (two convs per layer; by
    default also compression 0.5 and a 2k-filter stem: DenseNet-BC), L = 3n + 4 with
    `bottleneck=False` (the basic DenseNet: no compression, a 16-filter stem). Defaults to 10
    classes and the paper's dropout placement (`drop_every_conv=True`, active once `drop_rate`
    > 0); other keywords (`compression`, `num_init_features`, `drop_rate`, `num_classes`, ...)
    go to `DenseNet`, e.g. `compression=1.0` for DenseNet-B (`bn_size` only with `bottleneck`).
    """
    owner = "cifar_densenet"
    check_bool(owner, "bottleneck", bottleneck)
    check_positive_int(owner, "growth_rate", growth_rate)
    per_block = 6 if bottleneck else 3  # convolutions per block and per layer-count unit
    n = check_depth(owner, depth, per_block, 4, f"bottleneck={bottleneck}",
                    (40, 100, 190, 250) if bottleneck else (40, 100))
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("num_init_features", 2 * growth_rate if bottleneck else 16)
    kwargs.setdefault("compression", 0.5 if bottleneck else 1.0)
    kwargs.setdefault("drop_every_conv", True)
    return DenseNet(
        block_sizes=(n, n, n), growth_rate=growth_rate, bottleneck=bottleneck, stem="cifar",
        **kwargs,
    )


_REGISTER = functools.partial(
    register_model, input_shape=(224, 224, 3), min_input_size=29, num_classes=1000, paper=_PAPER
)
#: CIFAR models: the two 2x2/2 average pools need 4x4 inputs (3x3 would pool to 1x1, then 0x0).
#: Their factories fix `bottleneck` (and the basic ones `bn_size=None`): passing either is a
#: `ModelArgumentError`, so `model_kwargs_config` does not offer them (densenet_bc100_cifar with
#: bottleneck=False would be the basic DenseNet-100).
_REGISTER_CIFAR = functools.partial(
    register_model, input_shape=(32, 32, 3), min_input_size=4, num_classes=10, paper=_PAPER
)


@_REGISTER("densenet121")
def densenet121(**kwargs: Any) -> DenseNet:
    """DenseNet-121 (BC, k=32): blocks (6, 12, 24, 16); 7,978,856 parameters at 1000 classes."""
    return build_variant(DenseNet121, kwargs)


@_REGISTER("densenet169")
def densenet169(**kwargs: Any) -> DenseNet:
    """DenseNet-169 (BC, k=32): blocks (6, 12, 32, 32); 14,149,480 parameters at 1000 classes."""
    return build_variant(DenseNet169, kwargs)


@_REGISTER("densenet201")
def densenet201(**kwargs: Any) -> DenseNet:
    """DenseNet-201 (BC, k=32): blocks (6, 12, 48, 32); 20,013,928 parameters at 1000 classes."""
    return build_variant(DenseNet201, kwargs)


@_REGISTER("densenet161")
def densenet161(**kwargs: Any) -> DenseNet:
    """DenseNet-161 (BC, k=48, 96 stem filters): blocks (6, 12, 36, 24); 28,681,000 parameters
    at 1000 classes."""
    return build_variant(DenseNet161, kwargs)


@_REGISTER_CIFAR("densenet40_cifar")
def densenet40_cifar(**kwargs: Any) -> DenseNet:
    """CIFAR DenseNet (L=40, k=12): 3 blocks of 12 basic layers; 1,019,722 parameters at 10
    classes (Table 2: 1.0M)."""
    return cifar_densenet(40, 12, bottleneck=False, bn_size=None, **kwargs)


@_REGISTER_CIFAR("densenet100_k12_cifar")
def densenet100_k12_cifar(**kwargs: Any) -> DenseNet:
    """CIFAR DenseNet (L=100, k=12): 3 blocks of 32 basic layers; 6,979,642 parameters at 10
    classes (Table 2: 7.0M)."""
    return cifar_densenet(100, 12, bottleneck=False, bn_size=None, **kwargs)


@_REGISTER_CIFAR("densenet100_k24_cifar")
def densenet100_k24_cifar(**kwargs: Any) -> DenseNet:
    """CIFAR DenseNet (L=100, k=24): 3 blocks of 32 basic layers; 27,249,082 parameters at 10
    classes (Table 2: 27.2M)."""
    return cifar_densenet(100, 24, bottleneck=False, bn_size=None, **kwargs)


@_REGISTER_CIFAR("densenet_bc100_cifar")
def densenet_bc100_cifar(**kwargs: Any) -> DenseNet:
    """CIFAR DenseNet-BC (L=100, k=12): 3 blocks of 16 bottleneck layers; 769,162 parameters at
    10 classes (Table 2: 0.8M)."""
    return cifar_densenet(100, 12, bottleneck=True, **kwargs)


@_REGISTER_CIFAR("densenet_bc250_cifar")
def densenet_bc250_cifar(**kwargs: Any) -> DenseNet:
    """CIFAR DenseNet-BC (L=250, k=24): 3 blocks of 41 bottleneck layers; 15,324,406 parameters
    at 10 classes (Table 2: 15.3M)."""
    return cifar_densenet(250, 24, bottleneck=True, **kwargs)


@_REGISTER_CIFAR("densenet_bc190_cifar")
def densenet_bc190_cifar(**kwargs: Any) -> DenseNet:
    """CIFAR DenseNet-BC (L=190, k=40): 3 blocks of 31 bottleneck layers; 25,624,430 parameters
    at 10 classes (Table 2: 25.6M)."""
    return cifar_densenet(190, 40, bottleneck=True, **kwargs)

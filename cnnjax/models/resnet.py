"""ResNet-18/34/50/101/152 (He et al. 2016) and the residual blocks the CIFAR variants reuse.

Layout follows the paper's Table 1 and torchvision's parameterization (so the parameter counts
match exactly): 7x7/2 conv stem + BN + ReLU, 3x3/2 max pool, four stages of residual blocks whose
first block halves the resolution (except stage 1) and changes the width, global average pooling
and one linear layer named `head`. BatchNorm follows every convolution; a shortcut is the identity
unless the shape changes, where it is a 1x1 convolution + BN ("option B" in the paper).

Where the stride of a bottleneck block sits is a choice (`stride_in_1x1`):
- `False` (default, "ResNet v1.5" as in torchvision, flax's imagenet example and most modern
  training recipes): stride 2 on the 3x3 convolution; slightly more accurate, slightly more FLOPs.
- `True` (the original paper / Caffe release): stride 2 on the first 1x1 convolution.
The choice moves where resolution drops inside a block; the parameter count is the same.

Blocks take injected `conv` / `norm` / `act` factories (the flax `examples/imagenet` style), so
research code can swap BatchNorm for GroupNorm, change the activation or the initializer without
touching the block.

`drop_path_rate` > 0 trains with stochastic depth (Huang et al. 2016, `cnnjax.layers.DropPath`):
each block's residual branch is dropped per example, before the addition to the shortcut, with
the paper's linearly decaying rates (block l of L: `drop_path_rate * l / L`). It adds no
parameters and changes nothing at inference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers.batch_norm import BatchNorm
from cnnjax.layers.dense import Dense
from cnnjax.layers.pooling import max_pool2d
from cnnjax.layers.regularization import DropPath, check_drop_rate, stochastic_depth_rates
from cnnjax.models.registry import build_variant, check_call, register_model
from cnnjax.utils.validation import (
    check_bool,
    check_choice,
    check_positive_int,
    check_positive_ints,
    invalid,
)

ModuleDef = Any
Array = Any

#: Shortcut options of He et al. 2016 section 3.3 plus "none" for the plain (no-shortcut) nets.
#: "A": identity, or stride-s subsampling + zero channel padding when the shape changes (no params);
#: "B": identity, or 1x1 conv + BN projection when the shape changes;
#: "C": a 1x1 conv + BN projection on every block; "none": no shortcut at all (plain network).
SHORTCUTS = ("A", "B", "C", "none")

#: He (fan-out) initialization for convolutions, as torchvision's ResNet uses.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_PAPER = "He, Zhang, Ren, Sun 2016, Deep Residual Learning for Image Recognition (CVPR)"


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric 'same-style' padding k//2 on both sides (the paper's / torchvision's padding)."""
    return ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))


def _check_shortcut(owner: str, shortcut: str) -> None:
    check_choice(owner, "shortcut", shortcut, SHORTCUTS)


def check_drop_path_rate(owner: str, drop_path_rate: Any, shortcut: str) -> None:
    """`drop_path_rate` in [0, 1), and 0 for a plain (shortcut="none") network, where dropping
    the branch would drop the whole block's output, not skip the block."""
    if check_drop_rate(owner, "drop_path_rate", drop_path_rate) > 0 and shortcut == "none":
        raise invalid(owner, "drop_path_rate", drop_path_rate,
                      "expected 0 with shortcut='none' (stochastic depth drops a residual "
                      "branch and keeps the shortcut; a plain network has none)")


def check_zero_init_last_bn(owner: str, zero_init_last_bn: Any, shortcut: str) -> None:
    """`zero_init_last_bn` a bool, and False for a plain (shortcut="none") network: every
    block would output relu(0) = 0, and no gradient would ever reach the weights before the
    head (a residual block with a zero branch passes its input on instead)."""
    check_bool(owner, "zero_init_last_bn", zero_init_last_bn)
    if zero_init_last_bn and shortcut == "none":
        raise invalid(owner, "zero_init_last_bn", zero_init_last_bn,
                      "expected False with shortcut='none' (zero-initialized last BN gammas "
                      "make every block of a plain network output 0, which never trains)")


class _ResidualMixin:
    """The shortcut path and stochastic depth shared by the basic and bottleneck blocks."""

    def check_drop_path(self) -> None:
        """Validates `drop_path_rate` and that `deterministic` is set when it is used."""
        name = type(self).__name__
        rate, deterministic = self.drop_path_rate, self.deterministic  # type: ignore[attr-defined]
        check_drop_path_rate(name, rate, self.shortcut)  # type: ignore[attr-defined]
        if rate > 0 and deterministic is None:
            raise invalid(name, "deterministic", None,
                          "expected True (evaluation) or False (training) with drop_path_rate > 0")

    def drop_path(self, y: Array) -> Array:
        """The residual branch `y` through `DropPath` when `drop_path_rate` > 0 (no parameters)."""
        rate, deterministic = self.drop_path_rate, self.deterministic  # type: ignore[attr-defined]
        if rate == 0:
            return y
        return DropPath(rate, deterministic=deterministic, name="drop_path")(y)

    def shortcut_path(self, x: Array, out_features: int, strides: int, conv: ModuleDef,
                      norm: ModuleDef) -> Array | None:
        """The shortcut branch for input `x`, or None for a plain (shortcut="none") block."""
        shortcut = self.shortcut  # type: ignore[attr-defined]
        if shortcut == "none":
            return None
        in_features = x.shape[-1]
        changes_shape = strides != 1 or in_features != out_features
        if shortcut == "C" or (shortcut == "B" and changes_shape):
            y = conv(out_features, (1, 1), (strides, strides), padding="VALID", name="proj_conv")(x)
            return norm(name="proj_bn")(y)
        if not changes_shape:
            return x
        # Option A: parameter-free. Subsample spatially, then append zero channels.
        if in_features > out_features:
            raise invalid(
                type(self).__name__,
                "shortcut",
                shortcut,
                f"option 'A' can only widen ({in_features} -> {out_features} channels would "
                "shrink); use 'B' or 'C'",
            )
        y = x[:, ::strides, ::strides, :]
        return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, out_features - in_features)))


class BasicBlock(_ResidualMixin, nn.Module):
    """Two 3x3 conv-BN layers with a shortcut: y = act(F(x) + shortcut(x)) (ResNet-18/34, CIFAR).

    `filters` is the output width; `strides` (on the first conv) downsamples. `zero_init_last_bn`
    sets the second BN's gamma to zero so the block starts as act(shortcut(x)) (Goyal et al. 2017).
    `drop_path_rate` > 0 drops F(x) per example in training (stochastic depth): y = act(DropPath(
    F(x)) + shortcut(x)). `deterministic` (True: evaluation, False: training; required when
    drop_path_rate > 0) is set by the network from `train`, as the mode of its `norm` factory is.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    strides: int = 1
    shortcut: str = "B"
    zero_init_last_bn: bool = False
    drop_path_rate: float = 0.0
    deterministic: bool | None = None

    def __post_init__(self) -> None:
        _check_shortcut(type(self).__name__, self.shortcut)
        check_positive_int(type(self).__name__, "strides", self.strides)
        check_bool(type(self).__name__, "zero_init_last_bn", self.zero_init_last_bn)
        self.check_drop_path()
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """`[N, H, W, C]` -> `[N, H / strides, W / strides, filters]`: act(F(x) + shortcut(x))."""
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (3, 3), s, padding=_pad(3), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=_pad(3), name="conv2")(y)
        last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.drop_path(self.norm(scale_init=last_init, name="bn2")(y))
        residual = self.shortcut_path(x, self.filters, self.strides, self.conv, self.norm)
        return self.act(y if residual is None else y + residual)


class BottleneckBlock(_ResidualMixin, nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x`expansion`) with a shortcut (ResNet-50/101/152).

    `filters` is the bottleneck width; the block outputs `filters * expansion` channels.
    `stride_in_1x1=False` (v1.5, default) puts the stride on the 3x3 conv, `True` (v1, paper) on
    the first 1x1. `zero_init_last_bn` zeroes the third BN's gamma. `drop_path_rate` /
    `deterministic`: stochastic depth on the branch, as in `BasicBlock`.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    strides: int = 1
    stride_in_1x1: bool = False
    shortcut: str = "B"
    zero_init_last_bn: bool = False
    expansion: int = 4
    drop_path_rate: float = 0.0
    deterministic: bool | None = None

    def __post_init__(self) -> None:
        _check_shortcut(type(self).__name__, self.shortcut)
        check_positive_int(type(self).__name__, "strides", self.strides)
        check_positive_int(type(self).__name__, "expansion", self.expansion)
        check_bool(type(self).__name__, "stride_in_1x1", self.stride_in_1x1)
        check_bool(type(self).__name__, "zero_init_last_bn", self.zero_init_last_bn)
        self.check_drop_path()
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """`[N, H, W, C]` -> `[N, H / strides, W / strides, filters * expansion]`."""
        s = (self.strides, self.strides)
        s1, s3 = (s, (1, 1)) if self.stride_in_1x1 else ((1, 1), s)
        out = self.filters * self.expansion
        y = self.conv(self.filters, (1, 1), s1, padding="VALID", name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), s3, padding=_pad(3), name="conv2")(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(out, (1, 1), padding="VALID", name="conv3")(y)
        last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.drop_path(self.norm(scale_init=last_init, name="bn3")(y))
        residual = self.shortcut_path(x, out, self.strides, self.conv, self.norm)
        return self.act(y if residual is None else y + residual)


def batch_norm(train: bool, dtype: Any, axis_name: str | None) -> ModuleDef:
    """The BatchNorm factory every cnnjax ResNet-family model injects: `cnnjax.layers.BatchNorm`
    (flax's, refusing one value per channel in training) with epsilon 1e-5 and PyTorch's
    default momentum.

    momentum 0.9 in flax (running = 0.9 * running + 0.1 * batch) is PyTorch's momentum 0.1. In
    training both normalize with the batch mean and the biased batch variance, and both update
    the running mean alike; the running variance differs: flax (so cnnjax) folds in the biased
    batch variance (divided by n, the number of values per channel: batch x height x width),
    PyTorch the unbiased one (divided by n - 1), so each update PyTorch adds 0.1 * var_biased *
    n / (n - 1) where cnnjax adds 0.1 * var_biased. Negligible for real batches (n = 256 x 7 x 7
    at the last stage of an ImageNet ResNet), it makes the running variance of an eval-mode
    model trained here slightly smaller than PyTorch's would be only for tiny n. Converted
    torchvision weights carry PyTorch's running statistics as they are.
    """
    return functools.partial(
        BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        axis_name=axis_name,
    )


#: `ResNet.stem` choices: the paper's ImageNet stem, or the 3x3/1 no-pool stem used for CIFAR.
STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
    """ImageNet ResNet: stem, `len(stage_sizes)` stages of `block_cls`, GAP, linear `head`.

    Features (with `return_features=True`): `stem` (after conv-BN-ReLU, stride 2, before the max
    pool), `stage1`..`stageN` (strides 4, 8, 16, 32) and `pre_logits` (the pooled vector).
    Logits are returned in float32 whatever the computation `dtype`. `features_only=True` makes
    the module a backbone (timm's option of that name): no pooling or `head` parameters, and
    `__call__` returns just the dict `{stem, stage1, ..., stageN}` (used by FCN).

    Attributes:
      stage_sizes: blocks per stage ((2, 2, 2, 2) for ResNet-18); stage i has
        `num_filters` * 2**i filters.
      num_filters: the stem's and first stage's width (64).
      block_cls: `BasicBlock` or `BottleneckBlock` (or a compatible module / partial).
      stride_in_1x1: bottleneck stride on the first 1x1 (v1, paper) instead of the 3x3 (v1.5,
        default False).
      zero_init_last_bn: zero gamma in each block's last BN (the block starts as the identity).
      shortcut: "B" (default, the paper's ImageNet choice), "A", "C" or "none" (see SHORTCUTS).
      dtype / axis_name: computation dtype (params float32) / BatchNorm cross-device axis.
      stem: "imagenet" (default: 7x7/2 conv + 3x3/2 max pool) or "cifar" (3x3/1 conv, no max
        pool: the usual "ResNet-18 for CIFAR" layout, stages at strides 1, 2, 4, 8). Parameters
        differ only in `conv_init`'s kernel size.
      drop_path_rate: stochastic depth in training (0, the default, disables it): block l of the
        L blocks drops its residual branch per example with probability `drop_path_rate * l / L`
        (the paper's linear decay; the last block gets `drop_path_rate`, 0.5 in the paper); needs
        the `'dropout'` RNG. Not with shortcut="none". A custom `block_cls` needs
        `drop_path_rate` and `deterministic` fields only when it is > 0.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int = 1000
    num_filters: int = 64
    dtype: Any = jnp.float32
    axis_name: str | None = None
    stride_in_1x1: bool = False
    zero_init_last_bn: bool = False
    shortcut: str = "B"
    act: Callable = nn.relu
    features_only: bool = False
    stem: str = "imagenet"
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.stem not in STEMS:
            raise invalid(name, "stem", self.stem, f"expected one of {list(STEMS)}")
        check_positive_int(name, "num_classes", self.num_classes)
        check_positive_int(name, "num_filters", self.num_filters)
        _check_shortcut(name, self.shortcut)
        check_zero_init_last_bn(name, self.zero_init_last_bn, self.shortcut)
        check_positive_ints(name, "stage_sizes", self.stage_sizes,
                            "expected a non-empty sequence of positive block counts")
        check_drop_path_rate(name, self.drop_path_rate, self.shortcut)
        check_bool(name, "stride_in_1x1", self.stride_in_1x1)
        check_bool(name, "features_only", self.features_only)
        block = _unwrap(self.block_cls)
        if not (isinstance(block, type) and issubclass(block, nn.Module)):
            raise invalid(name, "block_cls", self.block_cls,
                          "expected a block module class (BasicBlock, BottleneckBlock or a "
                          "compatible nn.Module subclass) or a functools.partial of one")
        if self.stride_in_1x1 and not issubclass(block, BottleneckBlock):
            raise invalid(name, "stride_in_1x1", self.stride_in_1x1,
                          "expected False with basic blocks (a bottleneck-block option; "
                          f"{block.__name__} would ignore it)")
        super().__post_init__()

    def _block_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "shortcut": self.shortcut,
            "zero_init_last_bn": self.zero_init_last_bn,
        }
        block = _unwrap(self.block_cls)
        if isinstance(block, type) and issubclass(block, BottleneckBlock):
            kwargs["stride_in_1x1"] = self.stride_in_1x1
        return kwargs

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        """Logits `[N, num_classes]` (float32) of NHWC images `x`; with `return_features`
        `(logits, features)`, the features `stem`, `stage1`..`stageN` and `pre_logits`.
        With `features_only`, just the features dict (no `pre_logits`)."""
        train = check_call(self, x, train, return_features, first_conv="conv_init",
                           drop_path_rate=self.drop_path_rate)
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init
        )
        norm = batch_norm(train, self.dtype, self.axis_name)
        features: dict[str, Array] = {}

        x = jnp.asarray(x, self.dtype)
        if self.stem == "cifar":
            x = conv(self.num_filters, (3, 3), padding=_pad(3), name="conv_init")(x)
        else:
            x = conv(self.num_filters, (7, 7), (2, 2), padding=_pad(7), name="conv_init")(x)
        x = self.act(norm(name="bn_init")(x))
        features["stem"] = x
        if self.stem == "imagenet":
            x = max_pool2d(x, 3, 2, padding=1)

        kwargs = self._block_kwargs()
        rates = iter(stochastic_depth_rates(sum(self.stage_sizes), self.drop_path_rate))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                rate = next(rates)
                if self.drop_path_rate > 0:  # only then, so blocks without the fields plug in
                    kwargs.update(drop_path_rate=rate, deterministic=not train)
                x = self.block_cls(
                    self.num_filters * 2**i,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    strides=strides,
                    name=f"stage{i + 1}_block{j + 1}",
                    **kwargs,
                )(x)
            features[f"stage{i + 1}"] = x
        if self.features_only:
            return features

        x = jnp.mean(x, axis=(1, 2))
        features["pre_logits"] = x
        logits = Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        logits = jnp.asarray(logits, jnp.float32)
        return (logits, features) if return_features else logits


def _unwrap(factory: Any) -> Any:
    """The class behind a module class or a functools.partial of one."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory


# The basic-block nets pin `stride_in_1x1` (a bottleneck-block option) to its only valid value,
# so `create_model` refuses it as fixed by the name and `model_kwargs_config` does not offer it.
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock,
                             stride_in_1x1=False)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock,
                             stride_in_1x1=False)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock)


_REGISTER = functools.partial(
    register_model, input_shape=(224, 224, 3), min_input_size=1, num_classes=1000, paper=_PAPER
)


@_REGISTER("resnet18")
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2); 11,689,512 parameters at 1000 classes."""
    return build_variant(ResNet18, kwargs)


@_REGISTER("resnet34")
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34: basic blocks (3, 4, 6, 3); 21,797,672 parameters at 1000 classes."""
    return build_variant(ResNet34, kwargs)


@_REGISTER("resnet50")
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3); 25,557,032 parameters at 1000 classes."""
    return build_variant(ResNet50, kwargs)


@_REGISTER("resnet101")
def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101: bottleneck blocks (3, 4, 23, 3); 44,549,160 parameters at 1000 classes."""
    return build_variant(ResNet101, kwargs)


@_REGISTER("resnet152")
def resnet152(**kwargs: Any) -> ResNet:
    """ResNet-152: bottleneck blocks (3, 8, 36, 3); 60,192,808 parameters at 1000 classes."""
    return build_variant(ResNet152, kwargs)

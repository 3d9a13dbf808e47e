"""CIFAR ResNet-20/32/44/56/110 and the matching plain nets (He et al. 2016, section 4.2).

The CIFAR-10 design of the paper: a 3x3 conv with 16 filters, three stages of `n` basic blocks
at 16/32/64 filters on 32x32/16x16/8x8 maps (the first block of stages 2 and 3 has stride 2),
global average pooling and a linear `head`: depth 6n + 2. Shortcuts default to the paper's
option "A" (identity, or stride-2 subsampling + zero channel padding when the shape changes,
no parameters), giving Table 6's 0.27M/0.46M/0.66M/0.85M/1.7M parameters; "B" (1x1 conv + BN
projections when the shape changes) and "C" are selectable. The `plain*` nets are the same stack
without any shortcut, for the paper's degradation experiment (Fig. 6).

`drop_path_rate` > 0 trains the ResNets with stochastic depth (Huang et al. 2016, who used
ResNet-110 with a final rate of 0.5 on CIFAR): see `CifarResNet`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers.dense import Dense
from cnnjax.layers.regularization import stochastic_depth_rates
from cnnjax.models.registry import check_call, register_model
from cnnjax.models.resnet import (
    SHORTCUTS,
    BasicBlock,
    batch_norm,
    check_drop_path_rate,
    check_zero_init_last_bn,
    conv_kernel_init,
)
from cnnjax.utils.validation import (
    check_choice,
    check_depth,
    check_positive_int,
    check_positive_ints,
    invalid,
)

Array = Any

_PAPER = "He, Zhang, Ren, Sun 2016, Deep Residual Learning for Image Recognition, sec. 4.2 (CVPR)"


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with depth 6n+2 (`depth` in 20, 32, 44, 56, 110, 1202, ...).

    `shortcut="none"` gives the plain network. Features: `stem` (after the first conv-BN-ReLU),
    `stage1`..`stage3` and `pre_logits`. Logits are float32 whatever the computation `dtype`.

    `drop_path_rate` > 0 trains with stochastic depth: block l of the L = 3n blocks drops its
    residual branch per example with probability `drop_path_rate * l / L` (the paper's linear
    decay rule; the last block gets `drop_path_rate`, 0.5 in the paper), using the `'dropout'`
    RNG. 0 (default) disables it; it must be 0 for the plain nets; inference is unaffected.
    """

    depth: int = 20
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    shortcut: str = "A"
    zero_init_last_bn: bool = False
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    axis_name: str | None = None
    act: Callable = nn.relu

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive_int(name, "num_classes", self.num_classes)
        check_choice(name, "shortcut", self.shortcut, SHORTCUTS)
        check_zero_init_last_bn(name, self.zero_init_last_bn, self.shortcut)
        check_positive_ints(name, "widths", self.widths,
                            "expected a non-empty tuple of positive ints")
        per_block = 2 * len(self.widths)  # two 3x3 convolutions per block, in every stage
        check_depth(name, self.depth, per_block, 2,
                    f"{len(self.widths)} stages of widths {tuple(self.widths)}",
                    (per_block * n + 2 for n in (3, 5, 7, 9)))
        widths = tuple(self.widths)
        if self.shortcut == "A" and any(b < a for a, b in itertools.pairwise(widths)):
            # Caught here, not at the first narrowing block's trace (which names neither).
            raise invalid(name, "widths", self.widths,
                          "expected widths that never decrease with shortcut 'A' (it zero-pads "
                          "channels, so it can only widen); use shortcut 'B' or 'C'")
        check_drop_path_rate(name, self.drop_path_rate, self.shortcut)
        super().__post_init__()

    @property
    def blocks_per_stage(self) -> int:
        """n in depth = 2·stages·n + 2 (6n + 2 with the default three stages)."""
        return (self.depth - 2) // (2 * len(self.widths))

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        """Logits `[N, num_classes]` (float32) of NHWC images `x`; with `return_features`
        `(logits, features)`, the features `stem`, `stage1`..`stage3` and `pre_logits`."""
        train = check_call(self, x, train, return_features, first_conv="conv_init",
                           drop_path_rate=self.drop_path_rate)
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init
        )
        norm = batch_norm(train, self.dtype, self.axis_name)
        features: dict[str, Array] = {}

        x = jnp.asarray(x, self.dtype)
        x = conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_init")(x)
        x = self.act(norm(name="bn_init")(x))
        features["stem"] = x
        rates = iter(stochastic_depth_rates(len(self.widths) * self.blocks_per_stage,
                                            self.drop_path_rate))
        for i, width in enumerate(self.widths):
            for j in range(self.blocks_per_stage):
                x = BasicBlock(
                    width,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    strides=2 if i > 0 and j == 0 else 1,
                    shortcut=self.shortcut,
                    zero_init_last_bn=self.zero_init_last_bn,
                    drop_path_rate=next(rates),
                    deterministic=not train,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
            features[f"stage{i + 1}"] = x

        x = jnp.mean(x, axis=(1, 2))
        features["pre_logits"] = x
        logits = jnp.asarray(
            Dense(self.num_classes, dtype=self.dtype, name="head")(x), jnp.float32
        )
        return (logits, features) if return_features else logits


_REGISTER = functools.partial(
    register_model, input_shape=(32, 32, 3), min_input_size=1, num_classes=10, paper=_PAPER
)


def _check_stages(name: str, depth: int, kwargs: dict[str, Any]) -> None:
    """`widths` whose stage count the name's fixed `depth` cannot split evenly, named as such:
    CifarResNet's own check blamed `depth`, which the name fixes."""
    widths = kwargs.get("widths")
    if not isinstance(widths, tuple | list) or not widths or (depth - 2) % (2 * len(widths)) == 0:
        return  # the model's own checks speak for other values
    fits = [n for n in range(1, depth // 2 + 1) if (depth - 2) % (2 * n) == 0]
    raise invalid(name, "widths", widths,
                  f"depth {depth} (fixed by {name}) is 2·stages·n + 2, so it takes {fits} stages, "
                  f"not {len(widths)}")


#: The residual-branch options a plain net has no branch for, pinned to their only valid value,
#: so `create_model` refuses them as fixed by the name and `model_kwargs_config` (hence a sweep
#: or the tuning recipe's drop_path knob) does not offer them.
_RESIDUAL_ONLY = {"zero_init_last_bn": False, "drop_path_rate": 0.0}


def _plain(name: str, depth: int, kwargs: dict[str, Any]) -> CifarResNet:
    """A plain net: its name fixes `shortcut="none"` (passing `shortcut` is a
    `ModelArgumentError`: plain20_cifar with shortcut A is resnet20_cifar)."""
    _check_stages(name, depth, kwargs)
    return CifarResNet(depth=depth, shortcut="none", **_RESIDUAL_ONLY, **kwargs)


def _residual(name: str, depth: int, kwargs: dict[str, Any]) -> CifarResNet:
    """A CIFAR ResNet: any of the paper's shortcut options A, B, C, but not "none" (that
    network is registered as the plain net of the same depth)."""
    if kwargs.get("shortcut") == "none":
        residual = [s for s in SHORTCUTS if s != "none"]
        raise invalid(name, "shortcut", "none", f"expected one of {residual} "
                      f"(without shortcuts it is plain{depth}_cifar)")
    _check_stages(name, depth, kwargs)
    return CifarResNet(depth=depth, **kwargs)


@_REGISTER("resnet20_cifar")
def resnet20_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (n=3), option A shortcuts unless `shortcut` is given."""
    return _residual("resnet20_cifar", 20, kwargs)


@_REGISTER("resnet32_cifar")
def resnet32_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (n=5), option A shortcuts unless `shortcut` is given."""
    return _residual("resnet32_cifar", 32, kwargs)


@_REGISTER("resnet44_cifar")
def resnet44_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44 (n=7), option A shortcuts unless `shortcut` is given."""
    return _residual("resnet44_cifar", 44, kwargs)


@_REGISTER("resnet56_cifar")
def resnet56_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (n=9), option A shortcuts unless `shortcut` is given."""
    return _residual("resnet56_cifar", 56, kwargs)


@_REGISTER("resnet110_cifar")
def resnet110_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-110 (n=18), option A shortcuts unless `shortcut` is given."""
    return _residual("resnet110_cifar", 110, kwargs)


@_REGISTER("plain20_cifar")
def plain20_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR plain-20: ResNet-20 without shortcuts (the degradation experiment)."""
    return _plain("plain20_cifar", 20, kwargs)


@_REGISTER("plain32_cifar")
def plain32_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR plain-32: ResNet-32 without shortcuts (the degradation experiment)."""
    return _plain("plain32_cifar", 32, kwargs)


@_REGISTER("plain44_cifar")
def plain44_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR plain-44: ResNet-44 without shortcuts (the degradation experiment)."""
    return _plain("plain44_cifar", 44, kwargs)


@_REGISTER("plain56_cifar")
def plain56_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR plain-56: ResNet-56 without shortcuts (the degradation experiment)."""
    return _plain("plain56_cifar", 56, kwargs)


@_REGISTER("plain110_cifar")
def plain110_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR plain-110: ResNet-110 without shortcuts (the degradation experiment)."""
    return _plain("plain110_cifar", 110, kwargs)

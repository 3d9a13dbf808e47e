"""VGG-11/13/16/19 (Simonyan & Zisserman 2015, configurations A/B/D/E), with and without BatchNorm,
and the paper's two other configurations, A-LRN (`vgg11_lrn`) and C (`vgg16_c`).

Layout and parameterization follow torchvision, so the parameter counts match exactly
(vgg11 132,863,336; vgg13 133,047,848; vgg16 138,357,544; vgg19 143,667,240; vgg16_bn
138,365,992 at 1000 classes): five blocks of 3x3/s1/p1 convolutions + ReLU, each block closed by a
2x2/s2 max pool, channels 64-128-256-512-512; then an adaptive average pool to 7x7 (the identity at
the native 224x224, and what lets any input of at least 32x32 through), fc6 4096 + ReLU + dropout,
fc7 4096 + ReLU + dropout, and the linear `head`. The `_bn` variants put a BatchNorm between each
convolution and its ReLU and keep the convolution bias (as torchvision does); BatchNorm running
statistics are state (`batch_stats`), not parameters.

The paper's Table 1 has two more columns, which torchvision leaves out: A-LRN (`vgg11_lrn`) is A
with AlexNet's local response normalization after the first convolution's ReLU (the paper found it
did not help: Table 3, 10.5% top-5 error against A's 10.4%); C (`vgg16_c`) is B with a 1x1
convolution closing blocks 3, 4 and 5 (conv1-256, conv1-512, conv1-512). Table 2 rounds their
parameter counts to 133M (A-LRN: the LRN has none, so it is A's 132,863,336) and 134M (C:
133,638,952).

Parameter names (stable: FCN and weight converters rely on them):

- `features/conv{b}_{i}`: the i-th convolution of block b (Caffe's names, conv1_1 .. conv5_3; C's
  1x1 convolutions are conv3_3, conv4_3 and conv5_3); `features/bn{b}_{i}` its BatchNorm in the
  `_bn` variants. The LRN has no parameters: A's variables load into A-LRN unchanged.
- `fc6`: Dense 7*7*512 -> 4096. Its kernel rows index the flattened NHWC map in (h, w, c) order,
  so `params["fc6"]["kernel"].reshape(7, 7, 512, 4096)` is the equivalent 7x7 convolution kernel
  (the "convolutionalized" fc6 of FCN, Long et al. 2015).
- `fc7`: Dense 4096 -> 4096; `kernel.reshape(1, 1, 4096, 4096)` is the equivalent 1x1 convolution.
- `head`: Dense 4096 -> num_classes.

Features (`return_features=True`): `block1` .. `block5`, the output of each block's max pool
(strides 2, 4, 8, 16, 32; FCN's pool3/pool4/pool5 are `block3`/`block4`/`block5`), and
`pre_logits` (fc7's output after ReLU and dropout, the head's input). The convolutional trunk is
the public `VGGFeatures` module, usable alone as a backbone.

Initialization follows torchvision: He-normal (fan-out) convolution kernels, N(0, 0.01) dense
kernels, zero biases. (The paper instead trained the shallow configuration A first and used it to
initialize the deeper ones; He initialization makes that unnecessary.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers.batch_norm import BatchNorm, MaskedBatchNorm
from cnnjax.layers.conv import Conv2D
from cnnjax.layers.dense import Dense
from cnnjax.layers.norm import LocalResponseNorm
from cnnjax.layers.pooling import adaptive_avg_pool2d, max_pool2d
from cnnjax.models.registry import check_call, register_model
from cnnjax.utils.validation import (
    check_bool,
    check_number,
    check_positive_int,
    invalid,
    is_integer,
)

Array = Any

_PAPER = ("Simonyan & Zisserman 2015, Very Deep Convolutional Networks for Large-Scale Image "
          "Recognition (ICLR)")

#: Output channels of every 3x3 convolution, block by block (paper Table 1, configurations A/B/D/E).
VGG_CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}

#: Kernel sizes of configuration C's convolutions (its widths are `VGG_CONFIGS[16]`): B's 3x3
#: convolutions and a 1x1 one closing blocks 3, 4 and 5 (paper Table 1, conv1-256/512/512).
VGG_C_KERNEL_SIZES: tuple[tuple[int, ...], ...] = ((3, 3), (3, 3), (3, 3, 1), (3, 3, 1), (3, 3, 1))

#: torchvision's initializers: He-normal (fan-out) for convolutions, N(0, 0.01) for dense layers.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_kernel_init = nn.initializers.normal(stddev=0.01)


def flatten(x: Array) -> Array:
    """`[N, ...] -> [N, prod(...)]` for a fully connected layer; unlike `x.reshape(N, -1)` it
    also works for a batch of 0, where the -1 is ambiguous (JAX raises ZeroDivisionError)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def check_dropout_rate(owner: str, rate: Any, arg: str = "dropout_rate") -> float:
    """Returns `rate` as a float if it is a number in [0, 1) (a NumPy scalar too; not a bool or a
    string), else raises the standard ValueError naming `arg`."""
    return check_number(owner, arg, rate, "expected a number in [0, 1)", low=0.0, high=1.0,
                        high_open=True, strings=False)


def check_stages(owner: str, stages: Any, arg: str = "stages") -> None:
    """Raises unless `stages` is a non-empty sequence of non-empty sequences of positive ints
    (`VGGFeatures`'s blocks; detectors pass their own field name as `arg`)."""
    try:
        ok = len(stages) > 0 and all(
            len(block) > 0 and all(is_integer(c) and c > 0 for c in block)
            for block in stages)
    except TypeError:
        ok = False
    if not ok:
        raise invalid(owner, arg, stages,
                      "expected a non-empty sequence of non-empty sequences of positive ints")


def check_kernel_sizes(owner: str, stages: Sequence[Sequence[int]], kernel_sizes: Any) -> None:
    """Raises unless `kernel_sizes` is None or, like `stages`, one sequence per block with one
    positive odd int per convolution (odd, so "same" padding keeps the map size)."""
    if kernel_sizes is None:
        return
    try:
        ok = len(kernel_sizes) == len(stages) and all(
            len(sizes) == len(block) and all(
                is_integer(k) and k > 0 and k % 2 == 1
                for k in sizes)
            for sizes, block in zip(kernel_sizes, stages, strict=False))
    except TypeError:
        ok = False
    if not ok:
        shape = tuple(len(block) for block in stages)
        raise invalid(owner, "kernel_sizes", kernel_sizes,
                      f"expected None or, like stages, {len(stages)} sequences of {shape} positive "
                      "odd ints (one kernel size per convolution)")


class VGGFeatures(nn.Module):
    """VGG's convolutional trunk: blocks of 3x3 conv (+ BN) + ReLU, each closed by a 2x2/s2 pool.

    Returns `{"block1": ..., "blockN": ...}`, the output of each block's pool (NHWC, `dtype`).
    Every block halves the resolution, so N blocks need an input of at least 2**N pixels a side.
    `kernel_sizes` (same nesting as `stages`; None: all 3x3) sets each convolution's size, padded
    by `k // 2` (configuration C's 1x1 convolutions); `lrn` adds AlexNet's local response
    normalization after the first convolution's ReLU (configuration A-LRN).
    """

    stages: Sequence[Sequence[int]]
    batch_norm: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None
    kernel_sizes: Sequence[Sequence[int]] | None = None
    lrn: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_stages(owner, self.stages)
        check_kernel_sizes(owner, self.stages, self.kernel_sizes)
        check_bool(owner, "lrn", self.lrn)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False, mask: Array | None = None,
                 ) -> dict[str, Array]:
        """`mask` `[N]` bool (None: every image) picks the images whose BatchNorm statistics
        count in training (R-CNN's warps: the sampled regions, not the padding rows), pooled
        over `axis_name`'s devices by count (`MaskedBatchNorm`; none anywhere: every image);
        the others are normalized with those statistics too."""
        train = check_call(self, x, train)  # it is used on its own too (the detectors' trunk)
        x = jnp.asarray(x, self.dtype)
        if mask is not None and tuple(jnp.shape(mask)) != x.shape[:1]:
            raise invalid(type(self).__name__, "mask.shape", tuple(jnp.shape(mask)),
                          f"expected ({x.shape[0]},), one flag per image")
        outputs: dict[str, Array] = {}
        kernel_sizes = self.kernel_sizes or [[3] * len(block) for block in self.stages]
        # Same variables either way; without a mask (a classifier, eval) the plain BatchNorm.
        row_mask, norm_cls = None, BatchNorm
        if mask is not None and train:
            row_mask, norm_cls = jnp.asarray(mask, bool)[:, None, None, None], MaskedBatchNorm
        for b, (block, sizes) in enumerate(zip(self.stages, kernel_sizes, strict=True), start=1):
            for i, (features, k) in enumerate(zip(block, sizes, strict=True), start=1):
                x = Conv2D(features, k, padding=k // 2, dtype=self.dtype,
                           kernel_init=conv_kernel_init, name=f"conv{b}_{i}")(x)
                if self.batch_norm:
                    bn = norm_cls(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                  dtype=self.dtype, axis_name=self.axis_name, name=f"bn{b}_{i}")
                    x = bn(x, mask=row_mask)
                x = nn.relu(x)
                if self.lrn and b == i == 1:
                    x = LocalResponseNorm(dtype=self.dtype, name="lrn1")(x)
            x = max_pool2d(x, 2, 2)
            outputs[f"block{b}"] = x
        return outputs


class VGG(nn.Module):
    """VGG classifier: `VGGFeatures` trunk, adaptive 7x7 average pool, fc6, fc7, `head`.

    Attributes:
      stages: conv widths per block (`VGG_CONFIGS[depth]`).
      num_classes: outputs of `head`.
      batch_norm: BatchNorm after every convolution (the `_bn` variants).
      dropout_rate: dropout after the ReLUs of fc6 and fc7 (paper: 0.5), active only in training.
      hidden_features: width of fc6 and fc7 (4096).
      pool_size: side of the adaptive average pool before fc6 (torchvision: 7); None flattens the
        trunk's output as it is (the paper's layout, which fixes the input at 224x224 for the
        parameter count to match).
      dtype: computation dtype (parameters stay float32); logits are returned in float32.
      axis_name: passed to every BatchNorm for cross-device statistics.
      kernel_sizes: kernel size of every convolution, nested like `stages`; None: all 3x3
        (`VGG_C_KERNEL_SIZES` for configuration C).
      lrn: AlexNet's local response normalization after the first ReLU (configuration A-LRN).
    """

    stages: Sequence[Sequence[int]]
    num_classes: int = 1000
    batch_norm: bool = False
    dropout_rate: float = 0.5
    hidden_features: int = 4096
    pool_size: int | None = 7
    dtype: Any = jnp.float32
    axis_name: str | None = None
    kernel_sizes: Sequence[Sequence[int]] | None = None
    lrn: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_stages(owner, self.stages)
        check_kernel_sizes(owner, self.stages, self.kernel_sizes)
        check_bool(owner, "lrn", self.lrn)
        check_positive_int(owner, "num_classes", self.num_classes)
        check_positive_int(owner, "hidden_features", self.hidden_features)
        check_dropout_rate(owner, self.dropout_rate)
        if self.pool_size is not None:
            check_positive_int(owner, "pool_size", self.pool_size)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        """Logits `[N, num_classes]` (float32) of NHWC images `x`; with `return_features`
        `(logits, features)`, the features `block1`..`blockN` (`VGGFeatures`) and `pre_logits`."""
        train = check_call(self, x, train, return_features, dropout_rate=self.dropout_rate)
        features = VGGFeatures(stages=self.stages, batch_norm=self.batch_norm, dtype=self.dtype,
                               axis_name=self.axis_name, kernel_sizes=self.kernel_sizes,
                               lrn=self.lrn, name="features")(x, train)
        x = features[f"block{len(self.stages)}"]
        if self.pool_size is not None:
            x = adaptive_avg_pool2d(x, self.pool_size)
        x = flatten(x)
        dense = functools.partial(Dense, dtype=self.dtype, kernel_init=dense_kernel_init)
        for name in ("fc6", "fc7"):
            x = nn.relu(dense(self.hidden_features, name=name)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        features["pre_logits"] = x
        logits = jnp.asarray(dense(self.num_classes, name="head")(x), jnp.float32)
        return (logits, features) if return_features else logits


def _vgg(depth: int, batch_norm: bool, kwargs: dict[str, Any],
         kernel_sizes: tuple[tuple[int, ...], ...] | None = None, lrn: bool = False) -> VGG:
    """VGG-`depth`: its name fixes `stages`, `batch_norm`, `kernel_sizes` and `lrn`, so passing
    one in `kwargs` raises the duplicate-keyword TypeError `create_model` reports as a
    `ModelArgumentError` (vgg16 with VGG-11's stages would otherwise be a VGG-11 named vgg16)."""
    return VGG(stages=VGG_CONFIGS[depth], batch_norm=batch_norm, kernel_sizes=kernel_sizes,
               lrn=lrn, **kwargs)


_REGISTER = functools.partial(register_model, input_shape=(224, 224, 3), min_input_size=32,
                              num_classes=1000, paper=_PAPER)


@_REGISTER("vgg11")
def vgg11(**kwargs: Any) -> VGG:
    """VGG-11 (configuration A); 132,863,336 parameters at 1000 classes."""
    return _vgg(11, False, kwargs)


@_REGISTER("vgg11_bn")
def vgg11_bn(**kwargs: Any) -> VGG:
    """VGG-11 with BatchNorm; 132,868,840 parameters at 1000 classes."""
    return _vgg(11, True, kwargs)


@_REGISTER("vgg11_lrn")
def vgg11_lrn(**kwargs: Any) -> VGG:
    """VGG-11 with LRN (configuration A-LRN): A with AlexNet's local response normalization (n=5,
    k=2, alpha=1e-4, beta=0.75) after conv1_1's ReLU; A's 132,863,336 parameters (LRN has none)."""
    return _vgg(11, False, kwargs, lrn=True)


@_REGISTER("vgg13")
def vgg13(**kwargs: Any) -> VGG:
    """VGG-13 (configuration B); 133,047,848 parameters at 1000 classes."""
    return _vgg(13, False, kwargs)


@_REGISTER("vgg13_bn")
def vgg13_bn(**kwargs: Any) -> VGG:
    """VGG-13 with BatchNorm; 133,053,736 parameters at 1000 classes."""
    return _vgg(13, True, kwargs)


@_REGISTER("vgg16")
def vgg16(**kwargs: Any) -> VGG:
    """VGG-16 (configuration D); 138,357,544 parameters at 1000 classes."""
    return _vgg(16, False, kwargs)


@_REGISTER("vgg16_c")
def vgg16_c(**kwargs: Any) -> VGG:
    """VGG-16 with 1x1 convolutions (configuration C): B plus a 1x1 convolution closing blocks 3,
    4 and 5 (conv3_3, conv4_3, conv5_3); 133,638,952 parameters at 1000 classes."""
    return _vgg(16, False, kwargs, kernel_sizes=VGG_C_KERNEL_SIZES)


@_REGISTER("vgg16_bn")
def vgg16_bn(**kwargs: Any) -> VGG:
    """VGG-16 with BatchNorm; 138,365,992 parameters at 1000 classes."""
    return _vgg(16, True, kwargs)


@_REGISTER("vgg19")
def vgg19(**kwargs: Any) -> VGG:
    """VGG-19 (configuration E); 143,667,240 parameters at 1000 classes."""
    return _vgg(19, False, kwargs)


@_REGISTER("vgg19_bn")
def vgg19_bn(**kwargs: Any) -> VGG:
    """VGG-19 with BatchNorm; 143,678,248 parameters at 1000 classes."""
    return _vgg(19, True, kwargs)

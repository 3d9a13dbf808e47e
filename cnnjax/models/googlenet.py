"""GoogLeNet / Inception v1 (Szegedy et al. 2015), faithful to the paper's Table 1.

Stem: conv 64@7x7/2 (padding 3), max pool 3x3/2, LRN, conv 64@1x1, conv 192@3x3 (padding 1), LRN,
max pool 3x3/2; inception 3a, 3b, max pool; 4a .. 4e, max pool; 5a, 5b; global average pooling
(the paper's 7x7/1 average pool at 224x224); dropout 0.4; the linear `head`. Every convolution,
including those inside the inception modules, is followed by a ReLU; none has BatchNorm (that is
Inception v2). Max pools use ceil mode as in the reference Caffe model (112 -> 56 -> 28 -> 14 -> 7
at 224x224). The paper does not give LRN constants; those of the reference Caffe model are used
(size 5, alpha 1e-4 divided by the size, beta 0.75, k 1). With biases, 1000 classes and no
auxiliary heads the model has 6,998,552 parameters (Table 1's column is rounded and lower;
torchvision's 6,624,904 is a BatchNorm variant with 3x3 kernels in the "5x5" branch, which
cnnjax registers as `googlenet_bn`).

Auxiliary classifiers (`aux_logits=True`, Section 5): on the outputs of 4a and 4d, average pool
5x5/3 (4x4 maps at 224x224), conv 128@1x1 + ReLU, fc 1024 + ReLU, dropout 0.7, linear (named
`head` inside `aux1`/`aux2`). They exist to add gradient to the middle of the net in training
(the paper weights their losses by 0.3, the engine's `config.aux_loss_weight`) and are discarded
at inference.

Return type: as every cnnjax model (`logits`, or `(logits, features)` with `return_features`),
except that with `aux_logits=True` and `train=True` the `logits` slot holds a
`GoogLeNetOutputs(logits, aux1, aux2)` named tuple. The auxiliary heads are computed (and so
initialized) whenever `aux_logits=True`, also when `train=False`, so one `init` serves both
modes; under `jax.jit` the unused auxiliary branch is dead code and costs nothing in eval.
Because they run in eval too, they set the smallest input: the registry's `min_input_size` of
`googlenet`, 47, holds for the default `aux_logits=False`; with `aux_logits=True` the input must
be at least 79x79 (`AUX_MIN_INPUT_SIZE`: the 5x5/3 pool needs 5x5 maps from 4a and 4d), which
`InceptionAux` enforces and the engine's input-size check (`check_input_size` in
`cnnjax.train.checks`: the registry's bound, then an abstract trace of the configured model)
reports before compiling, naming `aux1`.

Features (`return_features=True`): `stem` (28x28x192 at 224, stride 8, after the stem's last
pool), `inception3` (output of 3b, stride 8), `inception4` (4e, stride 16), `inception5` (5b,
stride 32) and `pre_logits` (the pooled 1024-vector before dropout).

Initialization: every convolution and dense kernel (the auxiliary heads' too) is drawn from
Caffe's "xavier" filler, as in the reference Caffe model (BVLC `bvlc_googlenet`
`train_val.prototxt`: `weight_filler { type: "xavier" }` on every convolution and inner product):
uniform on [-sqrt(3 / fan_in), sqrt(3 / fan_in)], variance 1 / fan_in (`caffe_xavier_init`), and
biases are that model's constants (`caffe_bias_init`): 0.2 for every convolution and the auxiliary
heads' `fc`, 0 for the classifiers (`head`). The positive biases keep the signal alive through
the ReLU stack: at init on unit-variance 224x224 input the pooled features' std is 0.32 with them
and 0.014 with zero biases. Without BatchNorm, the He-normal fan-out init of cnnjax's VGG
(torchvision's for VGG) does not suit this net: its 1x1 reduce convolutions (e.g. 192 -> 16
channels) get weight variance 2 / 16 and amplify the signal, so the logits at init are O(100)
and SGD diverges; with the fan-in Xavier init the logits at init are small and the
cross-entropy is about ln(num_classes).

`googlenet_bn` (`GoogLeNetBN`) is torchvision's `googlenet` layout, so torchvision's ImageNet
weights convert to it (`cnnjax.models.torchvision_weights`): every convolution is a
`BasicConv2d` (conv without bias, BatchNorm with epsilon 1e-3, ReLU), there is no LRN, the "5x5"
branch of every inception module uses 3x3 kernels (a known torchvision quirk, pytorch/vision
issue 906, that its published weights were trained with), the pool between 4e and 5a is 2x2/2
(ceil mode) instead of 3x3/2, dropout before `head` is 0.2 and the auxiliary classifiers average
pool adaptively to 4x4 (`InceptionAuxBN`). 6,624,904 parameters at 1000 classes without
auxiliary heads, as torchvision's. Same widths (`INCEPTION_V1`), return types and features as
`googlenet`; initialization: He-normal (fan-out) convolution kernels (BatchNorm follows each),
LeCun-normal dense kernels, zero biases. `transform_input=True` (off by default, as in
torchvision for randomly initialized models; torchvision turns it on when it loads its ImageNet
weights) maps an ImageNet-normalized input, `(x - mean) / std` per RGB channel, to the
`(x - 0.5) / 0.5` scaling that those weights, ported from Google's original TensorFlow model,
expect.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.layers.batch_norm import BatchNorm
from cnnjax.layers.conv import Conv2D
from cnnjax.layers.dense import Dense
from cnnjax.layers.norm import LocalResponseNorm
from cnnjax.layers.pooling import adaptive_avg_pool2d, avg_pool2d, global_avg_pool, max_pool2d
from cnnjax.models.registry import check_call, register_model
from cnnjax.models.vgg import check_dropout_rate, conv_kernel_init, flatten
from cnnjax.utils.validation import check_bool, check_positive_int, invalid

Array = Any

_PAPER = "Szegedy et al. 2015, Going Deeper with Convolutions (CVPR)"
_PAPER_BN = _PAPER + "; layout of torchvision's googlenet (BatchNorm, 3x3 \"5x5\" branches)"


#: The smallest input side of `GoogLeNet(aux_logits=True)` (4x4 maps at 4a below it, too small
#: for the auxiliary heads' 5x5/3 pool); the registered `min_input_size`, 47, is for
#: `aux_logits=False`, the default.
AUX_MIN_INPUT_SIZE = 79

#: torchvision's GoogLeNet BatchNorm epsilon (its BasicConv2d; cnnjax's other BN models use 1e-5).
BN_EPSILON = 1e-3

#: The ImageNet RGB mean and std that `GoogLeNetBN(transform_input=True)` undoes (torchvision's
#: constants; equal to `cnnjax.data.presets.IMAGENET_MEAN/STD`, not imported here because
#: `cnnjax.data` imports TensorFlow).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Caffe's "xavier" weight filler with its default `variance_norm: FAN_IN` (`XavierFiller` in
#: caffe/filler.hpp: uniform on [-scale, scale], scale = sqrt(3 / fan_in)), which the reference
#: Caffe GoogLeNet uses for every convolution and inner product; `googlenet`'s kernel init.
caffe_xavier_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

#: The reference Caffe GoogLeNet's `bias_filler { type: "constant" value: 0.2 }` on every
#: convolution and the auxiliary `fc` layers (its classifiers' biases are 0). With fan-in xavier
#: weights and zero biases, the ReLU stack halves the signal's variance at every layer (the
#: pooled features' std at init is ~0.01 at 224x224); the positive biases keep it near 0.3.
caffe_bias_init = nn.initializers.constant(0.2)

#: Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) of every inception module.
INCEPTION_V1: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def _check_classifier_fields(module: nn.Module) -> None:
    """Both GoogLeNets' shared fields: `num_classes`, `aux_logits`, `dropout_rate` and
    `aux_dropout_rate` (a number in [0, 1)); the standard ValueError names the model."""
    owner = type(module).__name__
    check_positive_int(owner, "num_classes", module.num_classes)
    check_bool(owner, "aux_logits", module.aux_logits)
    check_dropout_rate(owner, module.dropout_rate)
    check_dropout_rate(owner, module.aux_dropout_rate, "aux_dropout_rate")


class GoogLeNetOutputs(NamedTuple):
    """Training-mode output of a GoogLeNet with auxiliary classifiers."""

    logits: Array
    aux1: Array  # auxiliary classifier on inception 4a
    aux2: Array  # auxiliary classifier on inception 4d


class Inception(nn.Module):
    """Inception module (Figure 2b): four parallel branches concatenated along channels.

    Branches: 1x1 conv (`features_1x1`); 1x1 reduce (`reduce_3x3`) then 3x3 conv (`features_3x3`);
    1x1 reduce (`reduce_5x5`) then 5x5 conv (`features_5x5`); 3x3/s1 max pool then 1x1 projection
    (`pool_proj`). Each conv has a ReLU; spatial size is preserved. Output channels:
    `features_1x1 + features_3x3 + features_5x5 + pool_proj`.
    """

    features_1x1: int
    reduce_3x3: int
    features_3x3: int
    reduce_5x5: int
    features_5x5: int
    pool_proj: int
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        for field in ("features_1x1", "reduce_3x3", "features_3x3", "reduce_5x5",
                      "features_5x5", "pool_proj"):
            check_positive_int(type(self).__name__, field, getattr(self, field))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """`[N, H, W, C]` -> `[N, H, W, features_1x1 + features_3x3 + features_5x5 + pool_proj]`."""
        conv = functools.partial(Conv2D, dtype=self.dtype, kernel_init=caffe_xavier_init,
                                 bias_init=caffe_bias_init)
        b1 = nn.relu(conv(self.features_1x1, 1, name="branch1x1")(x))
        b3 = nn.relu(conv(self.reduce_3x3, 1, name="branch3x3_reduce")(x))
        b3 = nn.relu(conv(self.features_3x3, 3, padding=1, name="branch3x3")(b3))
        b5 = nn.relu(conv(self.reduce_5x5, 1, name="branch5x5_reduce")(x))
        b5 = nn.relu(conv(self.features_5x5, 5, padding=2, name="branch5x5")(b5))
        bp = max_pool2d(x, 3, 1, padding=1)
        bp = nn.relu(conv(self.pool_proj, 1, name="pool_proj")(bp))
        return jnp.concatenate([b1, b3, b5, bp], axis=-1)


class InceptionAux(nn.Module):
    """GoogLeNet's auxiliary classifier (Section 5): avg pool 5x5/3, conv 128@1x1, fc 1024,
    dropout 0.7, linear `head`. Needs an input of at least 5x5."""

    num_classes: int
    dropout_rate: float = 0.7
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Auxiliary logits `[N, num_classes]` (float32) of a map of at least 5x5."""
        if x.shape[1] < 5 or x.shape[2] < 5:
            raise invalid(type(self).__name__, "input.shape", tuple(x.shape),
                          "expected a map of at least 5x5 for the 5x5/3 average pool; use a "
                          f"larger input (GoogLeNet: at least {AUX_MIN_INPUT_SIZE}x"
                          f"{AUX_MIN_INPUT_SIZE}) or aux_logits=False")
        x = avg_pool2d(x, 5, 3)
        x = nn.relu(Conv2D(128, 1, dtype=self.dtype, kernel_init=caffe_xavier_init,
                           bias_init=caffe_bias_init, name="conv")(x))
        x = flatten(x)
        dense = functools.partial(Dense, dtype=self.dtype, kernel_init=caffe_xavier_init)
        x = nn.relu(dense(1024, bias_init=caffe_bias_init, name="fc")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return jnp.asarray(dense(self.num_classes, name="head")(x), jnp.float32)


class GoogLeNet(nn.Module):
    """GoogLeNet (Inception v1); see the module docstring for layout and return types.

    Attributes:
      num_classes: outputs of `head` (and of the auxiliary heads).
      aux_logits: build the two auxiliary classifiers, returned only when `train=True`; they
        need inputs of at least 79x79 (`AUX_MIN_INPUT_SIZE`; 47x47 without them).
      dropout_rate: dropout before `head` (0.4).
      aux_dropout_rate: dropout inside the auxiliary classifiers (0.7).
      dtype: computation dtype (parameters stay float32); logits are returned in float32.
      axis_name: unused (no BatchNorm); kept so every cnnjax model has the same fields.
    """

    num_classes: int = 1000
    aux_logits: bool = False
    dropout_rate: float = 0.4
    aux_dropout_rate: float = 0.7
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self) -> None:
        _check_classifier_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        """Logits `[N, num_classes]` (float32; in training with `aux_logits`, `GoogLeNetOutputs`
        with the auxiliary logits); with `return_features` `(logits, features)`, the
        features `stem`, `inception3`..`inception5` and `pre_logits`."""
        train = check_call(self, x, train, return_features, dropout_rate=self.dropout_rate,
                           aux_dropout_rate=self.aux_dropout_rate if self.aux_logits else 0)
        x = jnp.asarray(x, self.dtype)
        conv = functools.partial(Conv2D, dtype=self.dtype, kernel_init=caffe_xavier_init,
                                 bias_init=caffe_bias_init)
        pool = functools.partial(max_pool2d, kernel_size=3, stride=2, ceil_mode=True)
        lrn = functools.partial(LocalResponseNorm, size=5, k=1.0, alpha=1e-4, beta=0.75,
                                divide_alpha_by_size=True, dtype=self.dtype)
        inception = {name: functools.partial(Inception, *widths, dtype=self.dtype,
                                             name=f"inception{name}")
                     for name, widths in INCEPTION_V1.items()}
        aux = functools.partial(InceptionAux, self.num_classes, self.aux_dropout_rate,
                                dtype=self.dtype)
        features: dict[str, Array] = {}

        x = pool(nn.relu(conv(64, 7, strides=2, padding=3, name="conv1")(x)))
        x = lrn()(x)
        x = nn.relu(conv(64, 1, name="conv2_reduce")(x))
        x = nn.relu(conv(192, 3, padding=1, name="conv2")(x))
        features["stem"] = x = pool(lrn()(x))

        x = inception["3b"]()(inception["3a"]()(x))
        features["inception3"] = x
        x = inception["4a"]()(pool(x))
        aux1 = aux(name="aux1")(x, train) if self.aux_logits else None
        x = inception["4d"]()(inception["4c"]()(inception["4b"]()(x)))
        aux2 = aux(name="aux2")(x, train) if self.aux_logits else None
        x = inception["4e"]()(x)
        features["inception4"] = x
        x = inception["5b"]()(inception["5a"]()(pool(x)))
        features["inception5"] = x

        return _classify(self, x, features, (aux1, aux2), train, return_features,
                         kernel_init=caffe_xavier_init)


def _classify(module: nn.Module, x: Array, features: dict[str, Array], aux: tuple,
              train: bool, return_features: bool, **head_kwargs: Any) -> Any:
    """Both GoogLeNets' end, called from their `__call__`: global average pool, dropout and the
    linear `head` (`head_kwargs`, e.g. its `kernel_init`, go to its `Dense`); with
    `aux_logits`, in training, the auxiliary heads' logits too."""
    x = global_avg_pool(x)
    features["pre_logits"] = x
    x = nn.Dropout(module.dropout_rate, deterministic=not train)(x)
    logits = jnp.asarray(Dense(module.num_classes, dtype=module.dtype, name="head",
                               **head_kwargs)(x), jnp.float32)
    if module.aux_logits and train:
        logits = GoogLeNetOutputs(logits, *aux)
    return (logits, features) if return_features else logits


@register_model("googlenet", input_shape=(224, 224, 3), min_input_size=47, num_classes=1000,
                paper=_PAPER)
def googlenet(**kwargs: Any) -> GoogLeNet:
    """GoogLeNet (Inception v1); 6,998,552 parameters at 1000 classes without auxiliary heads.
    `min_input_size` 47 is without them; with `aux_logits=True` inputs need 79x79."""
    return GoogLeNet(**kwargs)


# ------------------------------------------------------------- torchvision's BatchNorm variant
class BasicConv2d(nn.Module):
    """torchvision GoogLeNet's unit: conv without bias (`conv`), BatchNorm with epsilon 1e-3
    (`bn`; torch's momentum 0.1 is flax's 0.9), ReLU."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Conv, BatchNorm (batch statistics when `train`), ReLU: `[N, H_out, W_out, features]`."""
        x = Conv2D(self.features, self.kernel_size, strides=self.strides, padding=self.padding,
                   use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init, name="conv")(x)
        x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPSILON,
                      dtype=self.dtype, axis_name=self.axis_name, name="bn")(x)
        return nn.relu(x)


class InceptionBN(Inception):
    """torchvision's inception module: `Inception`'s four branches, widths and parameter names,
    with `BasicConv2d` units and 3x3 kernels (padding 1) in the "5x5" branch (`branch5x5`)."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """`[N, H, W, C]` -> `[N, H, W, features_1x1 + features_3x3 + features_5x5 + pool_proj]`."""
        conv = functools.partial(BasicConv2d, dtype=self.dtype, axis_name=self.axis_name)
        b1 = conv(self.features_1x1, 1, name="branch1x1")(x, train)
        b3 = conv(self.reduce_3x3, 1, name="branch3x3_reduce")(x, train)
        b3 = conv(self.features_3x3, 3, padding=1, name="branch3x3")(b3, train)
        b5 = conv(self.reduce_5x5, 1, name="branch5x5_reduce")(x, train)
        b5 = conv(self.features_5x5, 3, padding=1, name="branch5x5")(b5, train)
        bp = max_pool2d(x, 3, 1, padding=1)
        bp = conv(self.pool_proj, 1, name="pool_proj")(bp, train)
        return jnp.concatenate([b1, b3, b5, bp], axis=-1)


class InceptionAuxBN(nn.Module):
    """torchvision GoogLeNet's auxiliary classifier: adaptive average pool to 4x4 (any input
    size), `BasicConv2d` 128@1x1 (`conv`), fc 2048 -> 1024 + ReLU (`fc`), dropout (0.7), linear
    `head`."""

    num_classes: int
    dropout_rate: float = 0.7
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Auxiliary logits `[N, num_classes]` (float32) of a map of any size."""
        x = adaptive_avg_pool2d(x, 4)
        x = BasicConv2d(128, 1, dtype=self.dtype, axis_name=self.axis_name, name="conv")(x, train)
        x = flatten(x)
        x = nn.relu(Dense(1024, dtype=self.dtype, name="fc")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return jnp.asarray(Dense(self.num_classes, dtype=self.dtype, name="head")(x),
                           jnp.float32)


def transform_imagenet_input(x: Array) -> Array:
    """torchvision GoogLeNet's `transform_input`: `(x - mean) / std` per RGB channel (ImageNet
    statistics, NHWC) -> `(x - 0.5) / 0.5`, the input range of its ported ImageNet weights."""
    if x.shape[-1] != 3:
        raise invalid("GoogLeNetBN", "input.shape", tuple(x.shape),
                      "expected 3 (RGB) channels with transform_input=True")
    scale = jnp.asarray([s / 0.5 for s in IMAGENET_STD], x.dtype)
    shift = jnp.asarray([(m - 0.5) / 0.5 for m in IMAGENET_MEAN], x.dtype)
    return x * scale + shift


class GoogLeNetBN(nn.Module):
    """torchvision's `googlenet` layout (see the module docstring); same outputs and features
    as `GoogLeNet`. Inputs must be at least 31x31 (torchvision's runs from 15x15: its ceil-mode
    pools also take a window that starts inside the map but hangs over its padded end, which
    cnnjax's pooling refuses); from 31x31 up both give the same output sizes.

    Attributes:
      num_classes: outputs of `head` (and of the auxiliary heads).
      aux_logits: build the two auxiliary classifiers, returned only when `train=True`.
      transform_input: first map ImageNet-normalized input to [-1, 1] scaling (True for
        torchvision's converted ImageNet weights; False, torchvision's default otherwise).
      dropout_rate: dropout before `head` (0.2, torchvision's).
      aux_dropout_rate: dropout inside the auxiliary classifiers (0.7).
      dtype: computation dtype (parameters stay float32); logits are returned in float32.
      axis_name: BatchNorm cross-device axis.
    """

    num_classes: int = 1000
    aux_logits: bool = False
    transform_input: bool = False
    dropout_rate: float = 0.2
    aux_dropout_rate: float = 0.7
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self) -> None:
        _check_classifier_fields(self)
        check_bool(type(self).__name__, "transform_input", self.transform_input)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        """Logits `[N, num_classes]` (float32; in training with `aux_logits`, `GoogLeNetOutputs`
        with the auxiliary logits); with `return_features` `(logits, features)`, the
        features `stem`, `inception3`..`inception5` and `pre_logits`."""
        train = check_call(self, x, train, return_features, dropout_rate=self.dropout_rate,
                           aux_dropout_rate=self.aux_dropout_rate if self.aux_logits else 0)
        x = jnp.asarray(x, self.dtype)
        if self.transform_input:
            x = transform_imagenet_input(x)
        conv = functools.partial(BasicConv2d, dtype=self.dtype, axis_name=self.axis_name)
        pool = functools.partial(max_pool2d, kernel_size=3, stride=2, ceil_mode=True)
        inception = {name: functools.partial(InceptionBN, *widths, dtype=self.dtype,
                                             axis_name=self.axis_name, name=f"inception{name}")
                     for name, widths in INCEPTION_V1.items()}
        aux = functools.partial(InceptionAuxBN, self.num_classes, self.aux_dropout_rate,
                                dtype=self.dtype, axis_name=self.axis_name)
        features: dict[str, Array] = {}

        x = pool(conv(64, 7, strides=2, padding=3, name="conv1")(x, train))
        x = conv(64, 1, name="conv2_reduce")(x, train)
        features["stem"] = x = pool(conv(192, 3, padding=1, name="conv2")(x, train))

        x = inception["3b"]()(inception["3a"]()(x, train), train)
        features["inception3"] = x
        x = inception["4a"]()(pool(x), train)
        aux1 = aux(name="aux1")(x, train) if self.aux_logits else None
        for name in ("4b", "4c", "4d"):
            x = inception[name]()(x, train)
        aux2 = aux(name="aux2")(x, train) if self.aux_logits else None
        x = inception["4e"]()(x, train)
        features["inception4"] = x
        x = max_pool2d(x, 2, 2, ceil_mode=True)  # torchvision's maxpool4 (the paper's is 3x3/2)
        x = inception["5b"]()(inception["5a"]()(x, train), train)
        features["inception5"] = x

        return _classify(self, x, features, (aux1, aux2), train, return_features)


@register_model("googlenet_bn", input_shape=(224, 224, 3), min_input_size=31,
                num_classes=1000, paper=_PAPER_BN)
def googlenet_bn(**kwargs: Any) -> GoogLeNetBN:
    """torchvision's GoogLeNet (BatchNorm, 3x3 "5x5" branches); 6,624,904 parameters at 1000
    classes without auxiliary heads."""
    return GoogLeNetBN(**kwargs)

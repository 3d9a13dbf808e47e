"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, Section II.B and Figure 2).

Input 32x32x1 (MNIST's 28x28 digits padded by 2); C1 6@5x5 -> 28x28; S2 2x2/2 subsampling ->
14x14; C3 16@5x5 -> 10x10; S4 -> 5x5; C5 120@5x5 -> 1x1 (a convolution, as in the paper, so
larger inputs give a map); F6 84; output layer `head`. Every layer up to F6 is followed by the
squashing function.

Options:

- `activation`: "tanh" (default), "scaled_tanh" (the paper's exact f(a) = 1.7159 tanh(2a/3),
  Appendix A), or "relu".
- `subsampling`: "avg" (default; 2x2 average pooling after C1/C3's activation, no parameters, the
  common modern rendition) or "trainable" (the paper's S-layers: each map's 2x2 sum times a
  trainable coefficient plus a trainable bias, then the activation; 12 and 32 parameters).
- `c3_table`: "full" (default; every C3 map sees all six S2 maps) or "paper" (Table I: maps 0-5
  see 3 contiguous S2 maps, 6-11 four contiguous, 12-14 four non-contiguous, 15 all six; 60
  connections, 1,516 effective parameters). The partial table is a fixed 0/1 mask on a full
  5x5x6x16 kernel, so the stored kernel still has 2,400 entries but the 900 masked ones never
  influence the output and get zero gradient. That dense convolution is what runs, and what
  `cnnjax.analysis.summary` counts: 240,000 MACs for C3 with either table (the paper's 60
  connections are 150,000 MACs, its "151,600 connections" with the biases).

With the defaults and 10 classes the model has 61,706 parameters. Not reproduced: the output
layer of Euclidean RBF units with fixed 7x12 bitmap codes (a linear `head` with softmax
cross-entropy replaces it) and the paper's scaled-uniform initialization (flax's LeCun-normal is
its modern form; with the partial C3 table each map's kernel is scaled by its own fan-in, 75, 100
or 150, as the paper scales each unit's).

Features (`return_features=True`): `c1`, `s2`, `c3`, `s4`, `c5` (after their activations), and
`pre_logits` (F6's activated output).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.layers.conv import Conv2D, add_bias
from cnnjax.layers.dense import Dense
from cnnjax.layers.pooling import avg_pool2d
from cnnjax.models.registry import check_call, register_model
from cnnjax.models.vgg import flatten
from cnnjax.utils.validation import check_choice, check_positive_int

Array = Any

_PAPER = ("LeCun, Bottou, Bengio & Haffner 1998, Gradient-Based Learning Applied to Document "
          "Recognition (Proc. IEEE)")

ACTIVATIONS = ("tanh", "scaled_tanh", "relu")
SUBSAMPLINGS = ("avg", "trainable")
C3_TABLES = ("full", "paper")

#: Table I of the paper: the S2 maps (0-5) each C3 map (0-15) is connected to.
C3_CONNECTIONS: tuple[tuple[int, ...], ...] = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)


def scaled_tanh(x: Array) -> Array:
    """The paper's squashing function f(a) = A tanh(S a), A = 1.7159, S = 2/3 (Appendix A)."""
    return 1.7159 * jnp.tanh(x * (2.0 / 3.0))


_ACTIVATION_FNS = {"tanh": jnp.tanh, "scaled_tanh": scaled_tanh, "relu": nn.relu}


class TrainableSubsampling(nn.Module):
    """LeNet-5's S-layer before its squashing: per map, (sum of each 2x2 block) * coef + bias.

    Non-overlapping 2x2 windows (stride 2); one trainable coefficient and one bias per channel.
    The coefficient starts at 1/4, so the layer starts as 2x2 average pooling.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """`[N, H // 2, W // 2, C]`: each 2x2 block's sum times `coef`, plus `bias`."""
        channels = x.shape[-1]
        coef = self.param("coef", nn.initializers.constant(0.25), (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        x = jnp.asarray(x, self.dtype)
        # In at least float32 (the parameters rounded to the compute dtype first): the window
        # sums, so the output is rounded once, as cnnjax.layers.avg_pool2d's; and the gradients
        # of coef and bias, sums over every position, which stall at 256 in bfloat16.
        wide = jnp.promote_types(x.dtype, jnp.float32)
        # A NumPy init value keeps reduce_window's sum monoid (and so its gradient) under jit.
        summed = jax.lax.reduce_window(x.astype(wide), np.zeros((), wide), jax.lax.add,
                                       (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        y = (summed * coef.astype(self.dtype).astype(wide)
             + bias.astype(self.dtype).astype(wide))
        return y.astype(x.dtype)


class ConnectionTableConv(nn.Module):
    """A VALID convolution in which output map j only sees the input maps `connections[j]`.

    Implemented as a full `[k, k, in, out]` kernel times a fixed 0/1 `[in, out]` mask (LeNet-5's
    C3 with Table I): masked kernel entries never affect the output and receive zero gradient.
    The kernel is LeCun-normal for each output map's own fan-in, k * k * len(connections[j]).
    """

    connections: tuple[tuple[int, ...], ...]
    kernel_size: int = 5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """The VALID convolution, no activation: `[N, H, W, C_in]` ->
        `[N, H - k + 1, W - k + 1, len(connections)]`."""
        k, in_features = self.kernel_size, x.shape[-1]
        mask = np.zeros((in_features, len(self.connections)), np.float32)
        for j, inputs in enumerate(self.connections):
            mask[list(inputs), j] = 1.0
        # LeCun-normal draws for the full fan-in k*k*in, rescaled per map to its own fan-in (a
        # factor of exactly 1 for a full table, so those draws stay flax's; a map without inputs
        # keeps 1, not inf, which the mask's zeros would turn into NaN).
        scale = jnp.asarray(np.sqrt(in_features / np.maximum(mask.sum(axis=0), 1)), jnp.float32)
        kernel = self.param("kernel",
                            lambda *a: nn.initializers.lecun_normal()(*a) * scale,
                            (k, k, in_features, len(self.connections)), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (len(self.connections),), jnp.float32)
        kernel = (kernel * jnp.asarray(mask)).astype(self.dtype)
        y = jax.lax.conv_general_dilated(jnp.asarray(x, self.dtype), kernel, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        # Added in at least float32: the bias gradient sums over every position (as Conv2D).
        return add_bias(y, bias.astype(self.dtype))


class LeNet5(nn.Module):
    """LeNet-5; see the module docstring for the layers and options.

    Attributes:
      num_classes: outputs of `head` (10 digits).
      activation: "tanh" | "scaled_tanh" | "relu".
      subsampling: "avg" | "trainable".
      c3_table: "full" | "paper".
      dtype: computation dtype (parameters stay float32); logits are returned in float32.
      axis_name: unused (no BatchNorm); kept so every cnnjax model has the same fields.
    """

    num_classes: int = 10
    activation: str = "tanh"
    subsampling: str = "avg"
    c3_table: str = "full"
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_classes", self.num_classes)
        check_choice(owner, "activation", self.activation, ACTIVATIONS)
        check_choice(owner, "subsampling", self.subsampling, SUBSAMPLINGS)
        check_choice(owner, "c3_table", self.c3_table, C3_TABLES)
        super().__post_init__()

    def _subsample(self, x: Array, name: str) -> Array:
        if self.subsampling == "avg":
            return avg_pool2d(x, 2, 2)
        act = _ACTIVATION_FNS[self.activation]
        return act(TrainableSubsampling(dtype=self.dtype, name=name)(x))

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        """Logits `[N, num_classes]` (float32) of NHWC images `x`; with `return_features`
        `(logits, features)`, the features `c1`, `s2`, `c3`, `s4`, `c5` and `pre_logits`."""
        train = check_call(self, x, train, return_features)
        act = _ACTIVATION_FNS[self.activation]
        x = jnp.asarray(x, self.dtype)
        features: dict[str, Array] = {}

        features["c1"] = x = act(Conv2D(6, 5, dtype=self.dtype, name="c1")(x))
        features["s2"] = x = self._subsample(x, "s2")
        if self.c3_table == "paper":
            c3 = ConnectionTableConv(C3_CONNECTIONS, 5, dtype=self.dtype, name="c3")
        else:
            c3 = Conv2D(16, 5, dtype=self.dtype, name="c3")
        features["c3"] = x = act(c3(x))
        features["s4"] = x = self._subsample(x, "s4")
        features["c5"] = x = act(Conv2D(120, 5, dtype=self.dtype, name="c5")(x))
        x = flatten(x)
        features["pre_logits"] = x = act(Dense(84, dtype=self.dtype, name="f6")(x))
        logits = jnp.asarray(Dense(self.num_classes, dtype=self.dtype, name="head")(x),
                             jnp.float32)
        return (logits, features) if return_features else logits


@register_model("lenet5", input_shape=(32, 32, 1), min_input_size=32, num_classes=10,
                paper=_PAPER)
def lenet5(**kwargs: Any) -> LeNet5:
    """LeNet-5 for 32x32 grayscale digits; 61,706 parameters at 10 classes (defaults)."""
    return LeNet5(**kwargs)

"""Small reference networks for the analysis tests and the summary CLI (`--model=examples.<name>`).

They are hand-built (independent of the model zoo) and small enough to trace and compile in a
second on a CPU, while keeping the structure whose numbers the tests derive by hand: AlexNet's
11x11/4 stem, overlapping 3x3/2 pooling, LRN and two-tower grouped convs; VGG's stacks of 3x3
convs; residual and inception-style multi-path blocks; and layers written as plain functions.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.layers.norm import LocalResponseNorm


class AlexNetLike(nn.Module):
    """AlexNet's layout (Krizhevsky et al., 2012) with narrow layers, for 99x99x3 inputs.

    conv1 11x11/4 VALID -> LRN -> max 3x3/2 -> conv2 5x5 p2 (2 groups) -> LRN -> max 3x3/2 ->
    conv3 3x3 p1 -> conv4 3x3 p1 (2 groups) -> conv5 3x3 p1 (2 groups) -> max 3x3/2 -> flatten ->
    fc6 -> fc7 -> head. Spatial sizes at 99: 23, 11, 11, 5, 5, 5, 5, 2.
    """

    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 48, 48, 32)
    hidden: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c1, c2, c3, c4, c5 = self.widths
        x = nn.relu(nn.Conv(c1, (11, 11), strides=4, padding="VALID", name="conv1")(x))
        x = LocalResponseNorm(name="lrn1")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = nn.relu(nn.Conv(c2, (5, 5), padding=2, feature_group_count=2, name="conv2")(x))
        x = LocalResponseNorm(name="lrn2")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = nn.relu(nn.Conv(c3, (3, 3), padding=1, name="conv3")(x))
        x = nn.relu(nn.Conv(c4, (3, 3), padding=1, feature_group_count=2, name="conv4")(x))
        x = nn.relu(nn.Conv(c5, (3, 3), padding=1, feature_group_count=2, name="conv5")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, name="fc6")(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        x = nn.relu(nn.Dense(self.hidden, name="fc7")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class VGGLike(nn.Module):
    """VGG's layout (Simonyan & Zisserman, 2015): stages of 3x3 p1 convs + 2x2/2 max pooling.

    Stages (16, 16), (32, 32), (64, 64, 64) on 32x32x3 inputs, then flatten -> fc -> head.
    """

    num_classes: int = 10
    stages: tuple[tuple[int, ...], ...] = ((16, 16), (32, 32), (64, 64, 64))
    hidden: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for s, widths in enumerate(self.stages, start=1):
            for i, width in enumerate(widths, start=1):
                x = nn.relu(nn.Conv(width, (3, 3), padding=1, name=f"conv{s}_{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, name="fc")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class ResidualBlock(nn.Module):
    """Basic residual block: two 3x3 convs on the main path; identity or 1x1/s shortcut."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(nn.Conv(self.features, (3, 3), self.stride, padding=1, name="conv_a")(x))
        y = nn.Conv(self.features, (3, 3), padding=1, name="conv_b")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), self.stride, padding=0, name="shortcut")(x)
        return nn.relu(x + y)


class ResidualNet(nn.Module):
    """Stem 3x3 conv, an identity residual block, a strided residual block, global pool, head."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Conv(8, (3, 3), padding=1, name="stem")(x))
        x = ResidualBlock(8, name="block1")(x)
        x = ResidualBlock(16, stride=2, name="block2")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class InceptionModule(nn.Module):
    """Inception v1 module: 1x1 | 1x1->3x3 | 1x1->5x5 | 3x3/1 max pool->1x1, concatenated."""

    widths: tuple[int, int, int, int] = (8, 8, 4, 4)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w1, w3, w5, wp = self.widths
        b1 = nn.relu(nn.Conv(w1, (1, 1), name="b1")(x))
        b3 = nn.relu(nn.Conv(w3, (1, 1), name="b3_reduce")(x))
        b3 = nn.relu(nn.Conv(w3, (3, 3), padding=1, name="b3")(b3))
        b5 = nn.relu(nn.Conv(w5, (1, 1), name="b5_reduce")(x))
        b5 = nn.relu(nn.Conv(w5, (5, 5), padding=2, name="b5")(b5))
        bp = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = nn.relu(nn.Conv(wp, (1, 1), name="pool_proj")(bp))
        return jnp.concatenate([b1, b3, b5, bp], axis=-1)


class InceptionNet(nn.Module):
    """Stem 3x3 conv, one inception module, global average pool, head."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Conv(8, (3, 3), padding=1, name="stem")(x))
        x = InceptionModule(name="inception")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class MisalignedNet(nn.Module):
    """Adds two paths whose fields are not centred on each other (a 3x3 VALID conv and a 3x3
    max pool of the input shifted by 2): the merged field is their union, wider than either."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        a = nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)
        shifted = jnp.pad(x, ((0, 0), (2, 0), (2, 0), (0, 0)))[:, : x.shape[1], : x.shape[2]]
        b = nn.max_pool(shifted, (3, 3), strides=(1, 1))
        b = nn.Conv(4, (1, 1), name="proj")(b)
        return a + b


class FunctionalNet(nn.Module):
    """Layers written as plain functions on parameters of this one module: `lax` convolutions,
    `jnp.pad` (reflect and zeros), `nn.max_pool`, `nn.avg_pool`, a transposed convolution and a
    reshape, then a Dense head."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dn = ("NHWC", "HWIO", "NHWC")
        k1 = self.param("k1", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], 8))
        k2 = self.param("k2", nn.initializers.lecun_normal(), (3, 3, 8, 8))
        kt = self.param("kt", nn.initializers.lecun_normal(), (2, 2, 8, 8))
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        x = jax.lax.conv_general_dilated(x, k1, (1, 1), "VALID", dimension_numbers=dn)
        x = nn.relu(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = jax.lax.conv_general_dilated(x, k2, (2, 2), "VALID", rhs_dilation=(1, 1),
                                         dimension_numbers=dn)
        x = jax.lax.conv_transpose(x, kt, (2, 2), "VALID", dimension_numbers=dn)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="head")(x)


# name -> (factory(num_classes) -> module, native (H, W, C))
EXAMPLES: dict[str, tuple[Callable[..., nn.Module], tuple[int, int, int]]] = {
    "alexnet_like": (AlexNetLike, (99, 99, 3)),
    "vgg_like": (VGGLike, (32, 32, 3)),
    "residual_net": (ResidualNet, (16, 16, 3)),
    "inception_net": (InceptionNet, (12, 12, 3)),
    "misaligned_net": (MisalignedNet, (11, 11, 1)),
    "functional_net": (FunctionalNet, (20, 20, 3)),
}


def create_example(name: str, num_classes: int = 10) -> nn.Module:
    """Builds the example network `name` (a key of `EXAMPLES`)."""
    if name not in EXAMPLES:
        raise ValueError(
            f"create_example: name={name!r} is invalid; expected one of {sorted(EXAMPLES)}."
        )
    return EXAMPLES[name][0](num_classes=num_classes)

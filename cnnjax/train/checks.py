"""Pre-compilation checks that need the model: is the input resolution large enough?

`check_input_size` traces `model.init` abstractly (`jax.eval_shape`: shapes only, no compilation,
no FLOPs) while watching every submodule call; the first layer whose output has an empty spatial
dimension, or that fails on the shape it receives, is named in the error.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.utils.validation import invalid


class _TooSmallError(Exception):
    def __init__(self, layer: str, detail: str):
        super().__init__(layer, detail)
        self.layer = layer
        self.detail = detail


def _layer_name(module: nn.Module) -> str:
    path = getattr(module, "path", None) or getattr(getattr(module, "scope", None), "path", ())
    return "/".join(str(p) for p in path) or type(module).__name__


def _empty_spatial(tree: Any) -> tuple | None:
    for leaf in jax.tree.leaves(tree):
        shape = getattr(leaf, "shape", None)
        if shape is not None and len(shape) >= 3 and any(d <= 0 for d in shape[1:-1]):
            return tuple(shape)
    return None


def _interceptor(next_fun, args, kwargs, context):
    name = f"{_layer_name(context.module)} ({type(context.module).__name__})"
    try:
        out = next_fun(*args, **kwargs)
    except _TooSmallError:
        raise
    except Exception as err:  # noqa: BLE001 — a shape error inside this layer
        raise _TooSmallError(
            name, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from err
    shape = _empty_spatial(out)
    if shape is not None:
        raise _TooSmallError(name, f"its output shape would be {shape}")
    return out


def check_input_size(
    model: nn.Module,
    model_name: str,
    input_shape: tuple[int, int, int],
    min_input_size: int | None = None,
) -> None:
    """Raises a ValueError naming the layer if `model` cannot run on `input_shape` (H, W, C).

    `min_input_size` (from the model registry) is checked first; then the abstract trace finds the
    layer where the spatial size collapses.
    """
    height, width = input_shape[0], input_shape[1]
    if min_input_size is not None and min(height, width) < min_input_size:
        raise invalid(
            model_name,
            "input resolution",
            f"{height}x{width}",
            f"the model needs inputs of at least {min_input_size}x{min_input_size}",
        )
    dummy = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    try:
        with nn.intercept_methods(_interceptor):
            jax.eval_shape(lambda x: model.init(rngs, x, train=False), dummy)
    except _TooSmallError as err:
        raise invalid(
            model_name,
            "input resolution",
            f"{height}x{width}",
            f"too small: layer {err.layer} fails ({err.detail}); use a larger "
            "data.image_size or a model meant for small images",
        ) from None

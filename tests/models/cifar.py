"""Helpers shared by the CIFAR model tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def abstract_forward(model: Any, size: int = 32, batch: int = 2) -> tuple[Any, Any, Any]:
    """`(variables, logits, features)` of `model` on `[batch, size, size, 3]` inputs, as shapes
    only (`jax.eval_shape`: nothing is computed, so the largest networks stay cheap)."""
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    logits, feats = jax.eval_shape(
        lambda v, x: model.apply(v, x, return_features=True), variables, x
    )
    return variables, logits, feats


def assert_cifar_features(feats: Mapping[str, Any], batch: int, stem_channels: int,
                          stage_channels: Sequence[int]) -> None:
    """The CIFAR layout's `return_features` maps: a stride-1 stem, three stages on 32x32, 16x16
    and 8x8 maps with `stage_channels`, and `pre_logits` of the last stage's width."""
    assert set(feats) == {"stem", "stage1", "stage2", "stage3", "pre_logits"}
    assert feats["stem"].shape == (batch, 32, 32, stem_channels)
    assert [feats[f"stage{i}"].shape for i in (1, 2, 3)] == [
        (batch, 32, 32, stage_channels[0]),
        (batch, 16, 16, stage_channels[1]),
        (batch, 8, 8, stage_channels[2]),
    ]
    assert feats["pre_logits"].shape == (batch, stage_channels[2])

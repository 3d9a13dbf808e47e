"""Helpers shared by the CIFAR and residual model tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def abstract_forward(model: Any, size: int = 32, batch: int = 2) -> tuple[Any, Any, Any]:
    """`(variables, logits, features)` of `model` on `[batch, size, size, 3]` inputs, as shapes
    only (`jax.eval_shape`: nothing is computed, so the largest networks stay cheap). One trace
    (`init_with_output`: init's own forward pass gives the outputs), not an init and an apply:
    tracing a deep network is most of such a test's time."""
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    (logits, feats), variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, return_features=True), x
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


def drop_path_rates(model: Any, size: int = 32) -> dict[str, float]:
    """`{block name: rate}` of every `DropPath` in `model`, in call order, read from the module
    tree while it is initialized abstractly (nothing is computed)."""
    rates: dict[str, float] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if type(module).__name__ == "DropPath" and context.method_name == "__call__":
            rates["/".join(module.scope.path[:-1])] = module.rate
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return rates


def plain_and_stochastic_depth_outputs(plain: Any, sd: Any, x: Any) -> tuple[Any, Any, Any, Any]:
    """`(variables, sd_variables, evals, trains)` of two models that differ only in
    `drop_path_rate` (`plain` 0, `sd` > 0), both initialized with the same key, and applied to `x`
    with `plain`'s variables: `evals[m]` in evaluation (no 'dropout' RNG) for m in ("plain", "sd"),
    `trains[m, k]` in training with dropout key k for ("plain", 0), ("sd", 0) and ("sd", 1).
    One compiled program."""

    @jax.jit
    def run(x):
        variables = plain.init(jax.random.key(0), x)
        sd_variables = sd.init(jax.random.key(0), x)
        models = {"plain": plain, "sd": sd}
        evals = {m: model.apply(variables, x) for m, model in models.items()}
        trains = {(m, k): models[m].apply(variables, x, train=True, mutable=["batch_stats"],
                                          rngs={"dropout": jax.random.key(k)})[0]
                  for m, k in (("plain", 0), ("sd", 0), ("sd", 1))}
        return variables, sd_variables, evals, trains

    return run(x)

"""`TrainState`: everything a training run carries from step to step, as one pytree.

Holding `step`, `params`, `batch_stats`, `opt_state` and the base `rng` together makes a checkpoint
one object and resuming exact: the step's dropout key is derived from `(rng, step, device)`, never
carried as mutable host state.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    """Training state; every field is an array pytree so it can be replicated, donated and saved."""

    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jnp.ndarray

    def variables(self) -> dict:
        """The flax variable collections for `model.apply`."""
        variables = {"params": self.params}
        if self.batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables


def init_variables(model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """Initializes `model` on a zeros batch of `input_shape` (N, H, W, C), in eval mode."""
    params_rng, dropout_rng = jax.random.split(rng)
    dummy = jnp.zeros(input_shape, jnp.float32)
    return model.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, input_shape: tuple[int, ...]
) -> TrainState:
    """Builds the initial state: fresh params/batch_stats, optimizer state, step 0.

    `rng` is split into an init key and the base key that dropout keys are folded from.
    """
    init_rng, train_rng = jax.random.split(rng)
    variables = jax.jit(lambda r: init_variables(model, r, input_shape))(init_rng)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=train_rng,
    )

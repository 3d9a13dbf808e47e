"""The per-device train and eval steps, written once with named-axis collectives.

Both functions run on one device's shard of the batch inside `jax.pmap` or `jax.shard_map` (see
`parallel.py`), where `axis_name` names the data-parallel axis: gradients and metrics are averaged
with `lax.pmean`, BatchNorm statistics are synced by the model's own `axis_name`, and each device
folds its index into the dropout key. With one device the collectives are identities.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from cnnjax.layers.conv_impl import conv_impl as conv_impl_context
from cnnjax.train import losses
from cnnjax.train.state import TrainState


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    axis_name: str,
    label_smoothing: float = 0.0,
    aux_loss_weight: float = 0.3,
    conv_impl: str = "xla",
) -> tuple[TrainState, dict]:
    """One SGD step on this device's `batch` {'image': [B, H, W, C], 'label': [B]}.

    Returns the new state (identical on every device) and device-averaged metrics: `loss`, `top1`,
    `top5` of the main head over the global batch and the `learning_rate` used for this step.
    A model with auxiliary classifiers (GoogLeNet with `aux_logits=True`) adds
    `aux_loss_weight` x their cross-entropy to the optimized loss (0.3 in Szegedy et al. 2014);
    their mean loss is reported as `aux_loss`. `conv_impl` picks how `nn.Conv` layers are
    lowered while this function is traced (`cnnjax.layers.conv_impl`: same math, faster on CPU).
    """
    dropout_rng = jax.random.fold_in(
        jax.random.fold_in(state.rng, state.step), lax.axis_index(axis_name)
    )

    def loss_fn(params):
        variables = {"params": params}
        mutable: list[str] | bool = False
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
            mutable = ["batch_stats"]
        with conv_impl_context(conv_impl):
            out = model.apply(
                variables,
                batch["image"],
                train=True,
                mutable=mutable,
                rngs={"dropout": dropout_rng},
            )
        outputs, updates = out if mutable else (out, {})
        logits, aux_logits = losses.split_auxiliary(outputs)
        per_example = losses.example_metrics(logits, batch["label"], label_smoothing)
        loss = jnp.mean(per_example["loss"])
        if aux_logits:
            per_example["aux_loss"] = sum(
                losses.cross_entropy(aux, batch["label"], label_smoothing) for aux in aux_logits
            )
            loss = loss + aux_loss_weight * jnp.mean(per_example["aux_loss"])
        return loss, (per_example, updates)

    grads, (per_example, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, axis_name)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    # The main head's loss (with label smoothing) and accuracies, averaged over devices.
    metrics = lax.pmean({name: jnp.mean(value) for name, value in per_example.items()}, axis_name)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
    )
    return new_state, metrics


def eval_step(
    state: TrainState, batch: dict, *, model: nn.Module, axis_name: str, conv_impl: str = "xla"
) -> dict:
    """Masked metric sums over this device's eval `batch`, summed over all devices.

    `batch['mask']` is 1 for real examples and 0 for padding, so every example counts exactly once;
    the host divides the accumulated sums by the accumulated `count`.
    """
    with conv_impl_context(conv_impl):
        logits = model.apply(state.variables(), batch["image"], train=False)
    per_example = losses.example_metrics(logits, batch["label"])
    mask = batch.get("mask")
    if mask is None:
        mask = jnp.ones(batch["label"].shape, jnp.float32)
    return lax.psum(losses.masked_sums(per_example, mask), axis_name)


def make_steps(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    axis_name: str,
    label_smoothing: float = 0.0,
    aux_loss_weight: float = 0.3,
    conv_impl: str = "xla",
) -> tuple[Callable, Callable]:
    """Binds the model and optimizer into per-device `(train_step, eval_step)` functions."""
    train = functools.partial(
        train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        axis_name=axis_name,
        label_smoothing=label_smoothing,
        aux_loss_weight=aux_loss_weight,
        conv_impl=conv_impl,
    )
    evaluate = functools.partial(
        eval_step, model=model, axis_name=axis_name, conv_impl=conv_impl
    )
    return train, evaluate

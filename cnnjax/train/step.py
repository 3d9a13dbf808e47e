"""The per-device train and eval steps, written once with named-axis collectives.

Three families, each with a `make_*` factory that binds the model and optimizer:

- classification, `train_step` / `eval_step` (`make_steps`): cross-entropy and accuracy, with
  optional mixing, distillation and auxiliary classifiers;
- segmentation, `segmentation_train_step` / `segmentation_eval_step` (`make_segmentation_steps`):
  per-pixel cross-entropy, pixel accuracy and a confusion matrix;
- detection, `detection_train_step` / `detection_predict_step` (`make_detection_steps`): the
  detector's own `loss` and `detect` methods (mAP is computed on the host).

Every step runs on one device's shard of the batch inside `jax.pmap` or `jax.shard_map` (see
`parallel.py`), where `axis_name` names the data-parallel axis: gradients and train metrics are
averaged with `lax.pmean` (eval sums with `lax.psum`), BatchNorm statistics are synced by the
model's own `axis_name`, and each device folds its index into the dropout key. With one device
the collectives are identities.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from cnnjax.layers.batch_norm_impl import batch_norm_impl as batch_norm_impl_context
from cnnjax.layers.conv_impl import conv_impl as conv_impl_context
from cnnjax.models.heads import backbone_eval_mode
from cnnjax.train import losses
from cnnjax.train.distill import Distillation, distillation_metrics
from cnnjax.train.ema import ExponentialMovingAverage
from cnnjax.train.mixing import Mixing
from cnnjax.train.state import TrainState
from cnnjax.utils.validation import check_number, check_positive_int, invalid

#: Train-step metric: 1.0 when every parameter after the update is finite (not logged).
PARAMS_FINITE = "params_finite"
#: Train-step metric: 1.0 when every BatchNorm running statistic after the step is finite on
#: every device (not logged), so a broken running mean/variance stops the run as `PARAMS_FINITE`
#: does instead of silently degrading every eval.
BATCH_STATS_FINITE = "batch_stats_finite"


def _all_finite(tree: Any) -> jax.Array:
    """1.0 (float32) when every leaf of `tree` is finite (also for no leaves), else 0.0. Per
    leaf, not a global norm: ~20x cheaper on CPU, and no overflow of a sum of squares."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(1.0, jnp.float32)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])).astype(jnp.float32)


def train_step(
    state: TrainState,
    batch: dict,
    teacher_variables: dict | None = None,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    axis_name: str,
    label_smoothing: float = 0.0,
    aux_loss_weight: float = 0.3,
    conv_impl: str = "xla",
    batch_norm_impl: str = "flax",
    accum_steps: int = 1,
    ema: ExponentialMovingAverage | None = None,
    mixing: Mixing | None = None,
    distill: Distillation | None = None,
    teacher: nn.Module | None = None,
    backbone_eval: bool = False,
) -> tuple[TrainState, dict]:
    """One SGD step on this device's `batch` {'image': [B, H, W, C], 'label': [B]}.

    Returns the new state (identical on every device) and device-averaged metrics: `loss`, `top1`,
    `top5` of the main head over the global batch, the `learning_rate` used for this step and
    `PARAMS_FINITE` and `BATCH_STATS_FINITE` (whether the updated parameters and BatchNorm
    statistics are all finite).
    A model with auxiliary classifiers (GoogLeNet with `aux_logits=True`) adds
    `aux_loss_weight` x each one's cross-entropy to the optimized loss (0.3 in Szegedy et al.
    2014); `aux_loss` reports the batch mean of their cross-entropies summed (GoogLeNet's two:
    about 2 ln(num_classes) at chance), so the optimized loss is `loss` (with `distill`,
    `total_loss`) `+ aux_loss_weight * aux_loss`. `conv_impl` picks how `nn.Conv` layers are
    lowered while this function is traced (`cnnjax.layers.conv_impl`: same math, faster on CPU),
    `batch_norm_impl` how training-mode BatchNorms are (`cnnjax.layers.batch_norm_impl`:
    "matmul" channel sums as matrix-vector products, faster on CPU; "auto" that on CPU, flax's
    own elsewhere).
    `accum_steps` and `ema`: see `_gradients` and `_apply_gradients`. `backbone_eval` (with a
    `freeze_optimizer(..., 'backbone_eval')` `tx`) runs the backbone's BatchNorm and dropout in
    eval mode (`_apply_training`). An enabled `mixing`
    (mixup / CutMix, `cnnjax.train.mixing`) mixes this device's batch with its own key first;
    the loss is then against the soft targets and top-1/top-5 score their dominant label.
    With `distill` (knowledge distillation, `cnnjax.train.distill`) the `teacher` module with
    `teacher_variables` scores the same (mixed) images in eval mode, and the optimized loss is
    the mean `total_loss`, `(1 - alpha) * loss + alpha * distill_loss`; `loss` stays the hard
    cross-entropy a plain run reports, and `distill_loss` and `total_loss` are added.
    A `label_smoothing` outside [0, 1) or a negative or non-finite `aux_loss_weight` is refused
    (ValueError naming it) while the step is traced, before anything compiles; so are an `ema`
    that `state` keeps no average for (or an average without `ema`, which would never move),
    and a `distill` without a `teacher` and its `teacher_variables` (or a teacher without
    `distill`, which would never run).
    """
    label_smoothing = losses.check_label_smoothing("train_step", label_smoothing)
    _check_average("train_step", state, ema)
    _check_teacher("train_step", distill, teacher, teacher_variables)
    aux_loss_weight = check_number("train_step", "aux_loss_weight", aux_loss_weight,
                                   "expected a finite number >= 0", low=0.0, high=math.inf,
                                   high_open=True, strings=False)
    dropout_rng = _step_rng(state, axis_name)
    if mixing is not None and mixing.enabled:
        mix_rng, dropout_rng = jax.random.split(dropout_rng)
        images, targets, _ = mixing(mix_rng, batch["image"], batch["label"], model.num_classes)
        batch = {**batch, "image": images, "label": targets}

    def loss_fn(params: Any, batch_stats: Any, batch: dict,
                rng: jax.Array) -> tuple[jax.Array, tuple[dict, dict]]:
        outputs, updates = _apply_training(
            model, params, batch_stats, (batch["image"],), {"dropout": rng}, conv_impl,
            batch_norm_impl, backbone_eval=backbone_eval,
        )
        logits, aux_logits = losses.split_auxiliary(outputs)
        per_example = losses.example_metrics(logits, batch["label"], label_smoothing)
        if distill is not None:  # per micro-batch: one micro-batch's teacher activations live
            teacher_logits = _teacher_logits(teacher, teacher_variables, batch["image"],
                                             conv_impl)
            per_example = distillation_metrics(per_example, logits, teacher_logits, distill)
        loss = jnp.mean(per_example["total_loss" if distill is not None else "loss"])
        if aux_logits:
            per_example["aux_loss"] = sum(
                losses.cross_entropy(aux, batch["label"], label_smoothing) for aux in aux_logits
            )
            loss = loss + aux_loss_weight * jnp.mean(per_example["aux_loss"])
        return loss, (per_example, updates)

    grads, per_example, batch_stats = _gradients(loss_fn, state, batch, dropout_rng, accum_steps)
    # The main head's loss (with label smoothing) and accuracies, averaged over devices.
    metrics = {name: jnp.mean(value) for name, value in per_example.items()}
    return _apply_gradients(state, grads, batch_stats, metrics, tx, schedule, axis_name, ema)


def _check_average(owner: str, state: TrainState, ema: ExponentialMovingAverage | None) -> None:
    """Refuses (while tracing) an `ema` rule for a `state` without a weight average, and a
    `state` holding one without a rule: that average would stay the initial weights while every
    eval scores it as `ema_*`."""
    if ema is not None and not state.ema:
        raise invalid(owner, "ema", ema, "the state keeps no weight average to update; build it "
                      "with create_train_state(..., ema=True), or pass ema=None")
    if ema is None and state.ema:
        raise invalid(owner, "ema", None, "the state keeps a weight average (state.ema), which "
                      "would never move from its start; pass the averaging rule "
                      "(ExponentialMovingAverage), or a state built with ema=False")


def _check_teacher(owner: str, distill: Distillation | None, teacher: nn.Module | None,
                   teacher_variables: dict | None) -> None:
    """Refuses (while tracing) `distill` without a teacher module and its variables, and a
    teacher without `distill`, which the step would never run."""
    if distill is None and teacher is not None:
        raise invalid(owner, "teacher", type(teacher).__name__,
                      "no distillation rule reads it; pass distill=Distillation(...) to distill "
                      "from it, or teacher=None")
    if distill is not None and teacher is None:
        raise invalid(owner, "teacher", None,
                      f"distill={distill!r} needs the teacher module (and its variables, the "
                      "step's third argument)")
    if distill is not None and teacher_variables is None:
        raise invalid(owner, "teacher_variables", None,
                      f"distill={distill!r} needs the teacher's variables ({{'params', "
                      "'batch_stats'}), the step's third argument")


def _teacher_logits(teacher: nn.Module, variables: dict, images: jax.Array,
                    conv_impl: str) -> jax.Array:
    """The teacher's float32 logits of `images` in eval mode (BatchNorm running statistics, no
    dropout), as constants: no gradient reaches the teacher."""
    with conv_impl_context(conv_impl):
        outputs = teacher.apply(variables, images, train=False)
    logits, _ = losses.split_auxiliary(outputs)
    return lax.stop_gradient(logits.astype(jnp.float32))


def _gradients(
    loss_fn: Callable, state: TrainState, batch: dict, rng: jax.Array, accum_steps: int
) -> tuple[Any, dict, Any]:
    """`(mean gradient, metrics, new batch_stats)` of `loss_fn(params, batch_stats, batch, rng)
    -> (loss, (metrics, updates))` on this device's `batch`.

    With `accum_steps` = k > 1 (gradient accumulation) the batch is cut into k equal micro-
    batches run one after another (`lax.scan`, so only one micro-batch's activations are live):
    the gradient is the mean of theirs, which for a model without BatchNorm equals the whole
    batch's; BatchNorm normalizes each micro-batch by its own statistics and updates its running
    averages k times (as PyTorch's accumulation loops do). On several devices those statistics
    are synced: micro-batch i is every device's i-th slice together, so D devices with k equal
    one device with k whose micro-batch i holds the same examples (checked to 1.2e-7 on 2
    devices), not one device fed the global batch in its stored order. Micro-batch i draws its
    dropout from `fold_in(rng, i)`. Metrics come back stacked per micro-batch: their mean is the
    batch's.

    On CPU the scan is unrolled: XLA:CPU runs convolutions inside a loop body ~20x slower
    (ResNet-20, batch 128, k=4: 17.7 img/s rolled, 377 unrolled, 358 without accumulation), and
    CPU memory is rarely the limit; accelerators keep the rolled loop and its memory bound.
    """
    check_positive_int("train_step", "accum_steps", accum_steps)
    for size in {x.shape[0] for x in jax.tree.leaves(batch)}:
        if size % accum_steps:
            raise invalid("train_step", "accum_steps", accum_steps,
                          f"expected a divisor of this device's batch of {size} examples")
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        grads, (metrics, updates) = grad_fn(state.params, state.batch_stats, batch, rng)
        return grads, metrics, updates.get("batch_stats", state.batch_stats)

    def split(x: jax.Array) -> jax.Array:
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])

    def micro_step(carry: tuple[Any, Any],
                   inputs: tuple[jax.Array, dict]) -> tuple[tuple[Any, Any], dict]:
        grad_sum, batch_stats = carry
        index, micro_batch = inputs
        grads, (metrics, updates) = grad_fn(
            state.params, batch_stats, micro_batch, jax.random.fold_in(rng, index))
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, updates.get("batch_stats", batch_stats)), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, batch_stats), metrics = lax.scan(
        micro_step, (zeros, state.batch_stats),
        (jnp.arange(accum_steps), jax.tree.map(split, batch)),
        unroll=jax.default_backend() == "cpu")
    return jax.tree.map(lambda g: g / accum_steps, grad_sum), metrics, batch_stats


def _apply_gradients(
    state: TrainState,
    grads: dict,
    batch_stats: Any,
    metrics: dict,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    axis_name: str,
    ema: ExponentialMovingAverage | None = None,
) -> tuple[TrainState, dict]:
    """The optimizer update with device-averaged gradients; device-averaged `metrics` plus the
    step's `learning_rate`. `batch_stats` are the new BatchNorm statistics (synced across
    devices by the model's `axis_name`); with `ema` the weight average follows the new
    variables."""
    grads = lax.pmean(grads, axis_name)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    metrics = lax.pmean(metrics, axis_name)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    # This step's loss predates its update: a NaN/inf update is only seen in the new parameters
    # (the host refuses to save them; identical on every device, so no pmean).
    metrics[PARAMS_FINITE] = _all_finite(params)
    # A `pmin`, for a model whose statistics are not synced across devices.
    metrics[BATCH_STATS_FINITE] = lax.pmin(_all_finite(batch_stats), axis_name)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    if ema is not None:
        new_state = new_state.replace(ema=ema.update(
            state.ema, {"params": params, "batch_stats": batch_stats}, state.step))
    return new_state, metrics


def _apply_training(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    args: tuple,
    rngs: dict,
    conv_impl: str,
    batch_norm_impl: str,
    method: str | None = None,
    backbone_eval: bool = False,
    **kwargs: Any,
) -> tuple[Any, dict]:
    """`model.apply(..., train=True)` with `params` and `batch_stats`, its convolutions lowered
    by `conv_impl` and its BatchNorms by `batch_norm_impl`; returns `(outputs, updates)`, where
    `updates` holds the new BatchNorm statistics (empty for a model without any). With
    `backbone_eval` (`config.freeze='backbone_eval'`) the BatchNorm, Dropout and DropPath layers
    outside the head run in eval mode (`heads.backbone_eval_mode`), so backbone statistics come
    back unchanged."""
    variables = {"params": params}
    mutable: list[str] | bool = False
    if batch_stats:
        variables["batch_stats"] = batch_stats
        mutable = ["batch_stats"]
    if method is not None:
        kwargs["method"] = method
    # Outermost, so the BatchNorm lowering below sees the eval-mode flag it sets.
    eval_mode = backbone_eval_mode() if backbone_eval else contextlib.nullcontext()
    with eval_mode, conv_impl_context(conv_impl), batch_norm_impl_context(batch_norm_impl):
        out = model.apply(variables, *args, train=True, mutable=mutable, rngs=rngs, **kwargs)
    return out if mutable else (out, {})


def _step_rng(state: TrainState, axis_name: str) -> jax.Array:
    """This step's and this device's key: `(rng, step, device)`, never carried host state."""
    return jax.random.fold_in(
        jax.random.fold_in(state.rng, state.step), lax.axis_index(axis_name)
    )


def _pixel_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per image `[B]`: mean per-pixel cross-entropy `loss` of `logits [B, H, W, C]` against
    class maps `labels [B, H, W]` over the pixels whose label is a class (`0 <= label < C`;
    others, `data.segmentation.IGNORE_LABEL`, count nowhere; an image without any scores 0), and
    the int32 counts of those `scored` pixels and of the `correct` ones among them."""
    logits = logits.astype(jnp.float32)
    scored = (labels >= 0) & (labels < logits.shape[-1])
    safe = jnp.where(scored, labels, 0)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    correct = jnp.argmax(logits, axis=-1) == labels
    count = jnp.sum(scored, axis=(1, 2), dtype=jnp.int32)
    return {"loss": (jnp.sum(jnp.where(scored, per_pixel, 0.0), axis=(1, 2))
                     / jnp.maximum(count, 1).astype(jnp.float32)),
            "scored": count, "correct": jnp.sum(correct & scored, axis=(1, 2), dtype=jnp.int32)}


def _class_maps(owner: str, batch: dict) -> jax.Array:
    """`batch['labels']` as int32 `[B, H, W]` class maps, refused (while tracing, before any
    compilation) unless integer maps of the images' `[B, H, W]`: a `[B, H, W, 1]` tfds mask or
    float labels would otherwise fail deep in a gather, and uint8 maps (tfds's dtype) would form
    the confusion index `label * C + prediction` in uint8, wrapping past 255."""
    labels, image = batch["labels"], batch["image"]
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise invalid(owner, "batch['labels'].dtype", str(labels.dtype),
                      "expected integer class indices (0 <= label < num_classes, or "
                      "data.segmentation.IGNORE_LABEL)")
    if tuple(labels.shape) != tuple(image.shape[:3]):
        raise invalid(owner, "batch['labels'].shape", tuple(labels.shape),
                      f"expected the image batch's [B, H, W] = {tuple(image.shape[:3])} (one "
                      "class index per pixel, no channel axis)")
    return labels.astype(jnp.int32)


def segmentation_train_step(
    state: TrainState,
    batch: dict,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    axis_name: str,
    conv_impl: str = "xla",
    batch_norm_impl: str = "flax",
    accum_steps: int = 1,
    ema: ExponentialMovingAverage | None = None,
    backbone_eval: bool = False,
) -> tuple[TrainState, dict]:
    """One step of a dense predictor (an FCN) on `batch` {'image' [B, H, W, C], 'labels'
    [B, H, W]} (`cnnjax.data.segmentation`); metrics `loss` (device-averaged), `pixel_accuracy`
    (correct over scored pixels of the whole global batch, as eval counts it) and the
    `learning_rate`.

    The loss is a mean of per-image means: each image's per-pixel cross-entropy is averaged over
    that image's scored pixels (labels in `[0, C)`; `IGNORE_LABEL` pixels count nowhere), then
    those means are averaged over the images. So every image weighs the same whatever its number
    of scored pixels, and an image without any scored pixel contributes 0 but still counts in
    the batch mean (`_pixel_metrics`). Not the mean over all scored pixels of the batch that
    torchvision's reference takes (`CrossEntropyLoss(ignore_index=255)`), nor Caffe FCN's sum.
    """

    _check_average("segmentation_train_step", state, ema)

    def loss_fn(params: Any, batch_stats: Any, batch: dict,
                rng: jax.Array) -> tuple[jax.Array, tuple[dict, dict]]:
        logits, updates = _apply_training(model, params, batch_stats, (batch["image"],),
                                          {"dropout": rng}, conv_impl, batch_norm_impl,
                                          backbone_eval=backbone_eval)
        per_image = _pixel_metrics(logits, batch["labels"])
        return jnp.mean(per_image["loss"]), (per_image, updates)

    batch = {**batch, "labels": _class_maps("segmentation_train_step", batch)}
    grads, per_image, batch_stats = _gradients(
        loss_fn, state, batch, _step_rng(state, axis_name), accum_steps)
    # Pixel accuracy over every scored pixel of the global batch, as eval's confusion matrix
    # counts it (a mean of per-image accuracies would not be comparable with eval's figure).
    pixels = lax.psum({"correct": jnp.sum(per_image["correct"]),
                       "scored": jnp.sum(per_image["scored"])}, axis_name)
    metrics = {"loss": jnp.mean(per_image["loss"]),
               "pixel_accuracy": pixels["correct"] / jnp.maximum(pixels["scored"], 1)}
    return _apply_gradients(state, grads, batch_stats, metrics, tx, schedule, axis_name, ema)


def segmentation_eval_step(
    state: TrainState, batch: dict, *, model: nn.Module, axis_name: str, conv_impl: str = "xla"
) -> dict:
    """Masked sums over this device's eval `batch`, summed over all devices: `count` (images),
    `loss` (per-image means, summed) and the `confusion` matrix `[C, C]` (rows: true class,
    columns: predicted; pixels of padded images and ignored pixels count 0), from which the host
    computes pixel accuracy and mean IoU over all scored pixels
    (`analysis.confusion.intersection_over_union`)."""
    with conv_impl_context(conv_impl):
        logits = model.apply(state.variables(), batch["image"], train=False)
    labels = _class_maps("segmentation_eval_step", batch)
    mask = _example_mask(batch, labels.shape[0])
    sums = losses.masked_sums({"loss": _pixel_metrics(logits, labels)["loss"]}, mask)
    num_classes = logits.shape[-1]
    scored = (labels >= 0) & (labels < num_classes)
    # Counted in int32: float32 counts stop growing at 2**24 pixels per cell.
    weights = (scored & (mask[:, None, None] > 0)).astype(jnp.int32).ravel()
    pairs = jnp.where(scored, labels, 0).ravel() * num_classes + jnp.argmax(logits, -1).ravel()
    confusion = jnp.zeros(num_classes * num_classes, jnp.int32).at[pairs].add(weights)
    sums["confusion"] = confusion.reshape(num_classes, num_classes)
    return lax.psum(sums, axis_name)


def make_segmentation_steps(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    axis_name: str,
    conv_impl: str = "xla",
    **train_options: Any,
) -> tuple[Callable, Callable]:
    """Binds a dense predictor and optimizer into per-device `(train_step, eval_step)`;
    `train_options` are further keywords of `segmentation_train_step`."""
    train = functools.partial(segmentation_train_step, model=model, tx=tx, schedule=schedule,
                              axis_name=axis_name, conv_impl=conv_impl, **train_options)
    evaluate = functools.partial(segmentation_eval_step, model=model, axis_name=axis_name,
                                 conv_impl=conv_impl)
    return train, evaluate


PROPOSAL_KEYS = ("proposals", "proposal_valid")


def proposal_kwargs(batch: dict) -> dict:
    """A detection batch's external region proposals (`cnnjax.data.proposals`) as the keyword
    arguments of the detector's `loss` and `detect`; {} when the batch has none."""
    return {key: batch[key] for key in PROPOSAL_KEYS if key in batch}


def detection_train_step(
    state: TrainState,
    batch: dict,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    axis_name: str,
    conv_impl: str = "xla",
    batch_norm_impl: str = "flax",
    accum_steps: int = 1,
    ema: ExponentialMovingAverage | None = None,
    backbone_eval: bool = False,
) -> tuple[TrainState, dict]:
    """One step of a detector on `batch` {'image', 'boxes', 'labels', 'box_valid'} and maybe
    {'proposals', 'proposal_valid'} (`cnnjax.data.detection`): the model's own `loss` method,
    which returns `(loss, terms)`.

    Metrics are the device-averaged `terms` (which hold `loss`) and the `learning_rate`. The
    model may draw from the `dropout` and `sample` (e.g. RoI sampling) RNG streams, both derived
    from `(rng, step, device)`.
    """
    _check_average("detection_train_step", state, ema)

    def loss_fn(params: Any, batch_stats: Any, batch: dict,
                rng: jax.Array) -> tuple[jax.Array, tuple[dict, dict]]:
        (loss, terms), updates = _apply_training(
            model,
            params,
            batch_stats,
            (batch["image"], batch["boxes"], batch["labels"], batch["box_valid"]),
            {"dropout": rng, "sample": jax.random.fold_in(rng, 1)},
            conv_impl,
            batch_norm_impl,
            method="loss",
            backbone_eval=backbone_eval,
            **proposal_kwargs(batch),
        )
        return loss, (terms, updates)

    grads, terms, batch_stats = _gradients(
        loss_fn, state, batch, _step_rng(state, axis_name), accum_steps)
    metrics = {name: jnp.mean(jnp.asarray(value, jnp.float32)) for name, value in terms.items()}
    return _apply_gradients(state, grads, batch_stats, metrics, tx, schedule, axis_name, ema)


def detection_predict_step(
    state: TrainState, batch: dict, *, model: nn.Module, conv_impl: str = "xla"
) -> Any:
    """This device's fixed-size detections of `batch['image']` (the model's `detect` method, on
    the batch's proposals if it has any); the host gathers them from every device and computes
    mAP (`detection.evaluation`)."""
    with conv_impl_context(conv_impl):
        return model.apply(state.variables(), batch["image"], method="detect",
                           **proposal_kwargs(batch))


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
    mask = _example_mask(batch, batch["label"].shape[0])
    return lax.psum(losses.masked_sums(per_example, mask), axis_name)


def _example_mask(batch: dict, size: int) -> jax.Array:
    """The eval batch's `mask` (1: a real example, 0: padding); all ones when it has none."""
    mask = batch.get("mask")
    return jnp.ones((size,), jnp.float32) if mask is None else mask


def make_steps(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    axis_name: str,
    label_smoothing: float = 0.0,
    aux_loss_weight: float = 0.3,
    conv_impl: str = "xla",
    **train_options: Any,
) -> tuple[Callable, Callable]:
    """Binds the model and optimizer into per-device `(train_step, eval_step)` functions;
    `train_options` are further keywords of `train_step` (`accum_steps`, `ema`, `mixing`,
    `distill` and `teacher`)."""
    train = functools.partial(
        train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        axis_name=axis_name,
        label_smoothing=label_smoothing,
        aux_loss_weight=aux_loss_weight,
        conv_impl=conv_impl,
        **train_options,
    )
    evaluate = functools.partial(
        eval_step, model=model, axis_name=axis_name, conv_impl=conv_impl
    )
    return train, evaluate


def make_detection_steps(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    axis_name: str,
    conv_impl: str = "xla",
    **train_options: Any,
) -> tuple[Callable, Callable]:
    """Binds a detector and optimizer into per-device `(train_step, predict_step)` functions;
    `train_options` are further keywords of `detection_train_step` (`accum_steps`, `ema`)."""
    train = functools.partial(
        detection_train_step, model=model, tx=tx, schedule=schedule, axis_name=axis_name,
        conv_impl=conv_impl, **train_options,
    )
    predict = functools.partial(detection_predict_step, model=model, conv_impl=conv_impl)
    return train, predict

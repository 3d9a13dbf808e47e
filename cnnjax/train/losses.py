"""Loss and classification metrics: softmax cross-entropy (optional label smoothing), top-1/top-5.

Targets are int labels or, for mixup/CutMix (`cnnjax.train.mixing`), soft targets [N, C].

Eval metrics are returned as masked *sums* plus an example count so that padded batches and several
devices combine exactly: the caller divides once at the end.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax.utils.validation import check_number, check_positive_int, concrete_value, invalid

LABEL_SMOOTHING_RANGE = "expected a number 0 <= label_smoothing < 1 (0: off)"


def check_label_smoothing(owner: str, label_smoothing: Any) -> float:
    """`label_smoothing` as a float if it is a number in [0, 1) (not a bool, NaN or a string),
    else a ValueError naming `owner`: at 1 the targets are uniform whatever the label, above 1
    or below 0 they hold negative entries (the loss rewards wrong classes)."""
    return check_number(owner, "label_smoothing", label_smoothing, LABEL_SMOOTHING_RANGE,
                        low=0.0, high=1.0, high_open=True, strings=False)


def _check_labels(owner: str, logits: jnp.ndarray, labels: jnp.ndarray, *, ids: bool = True,
                  targets: bool = True) -> None:
    """Refuses (statically, while tracing) `labels` that are neither class ids of the logits'
    leading shape (`ids`) nor targets of the logits' own shape (`targets`): ids `[N, 1]`
    broadcast against `[N, C]` logits into wrong numbers without an error."""
    shapes = ([tuple(logits.shape[:-1])] if ids else []) + (
        [tuple(logits.shape)] if targets else [])
    if tuple(labels.shape) in shapes:
        if ids and labels.shape == logits.shape[:-1] and not jnp.issubdtype(labels.dtype,
                                                                              jnp.integer):
            # one_hot(1.5) is all zeros: a loss of 0, no error
            raise invalid(owner, "labels.dtype", labels.dtype,
                          "expected integer class ids (or targets of the logits' shape)")
        return
    kinds = [f"class ids of shape {shapes[0]} (the logits' {tuple(logits.shape)} without "
             "their class axis)"] if ids else []
    if targets:
        kinds.append(f"targets of the logits' shape {tuple(logits.shape)}")
    raise invalid(owner, "labels.shape", tuple(labels.shape), "expected " + " or ".join(kinds))


def _check_class_ids(owner: str, labels: jnp.ndarray, num_classes: int) -> None:
    """Refuses concrete class ids outside [0, num_classes): `one_hot` makes them all-zero rows,
    a loss of 0 that drops the example from the loss and its gradient without an error. Traced
    ids (inside jit) cannot be checked; the engine checks num_classes against the dataset."""
    ids = concrete_value(labels)
    if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        outside = np.argwhere((ids < 0) | (ids >= num_classes))
        first = tuple(int(i) for i in outside[0])
        raise invalid(owner, f"labels[{', '.join(map(str, first))}]", int(ids[first]),
                      f"expected class ids in [0, {num_classes}) for logits of {num_classes} "
                      f"classes ({len(outside)} of {ids.size} labels are outside; one_hot makes "
                      "them all-zero rows, a loss of 0 without an error)")


def soft_cross_entropy(
    logits: jnp.ndarray, targets: jnp.ndarray, label_smoothing: float = 0.0
) -> jnp.ndarray:
    """Per-example softmax cross-entropy (float32) of `logits [N, C]` against distributions
    `targets [N, C]` (e.g. mixup/CutMix soft targets). Smoothing the mixed targets is the same as
    mixing smoothed one-hots (it is linear), which is how timm combines the two."""
    label_smoothing = check_label_smoothing("soft_cross_entropy", label_smoothing)
    _check_labels("soft_cross_entropy", logits, targets, ids=False)
    targets = targets.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def cross_entropy(
    logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0
) -> jnp.ndarray:
    """Per-example softmax cross-entropy (float32) of `logits [N, C]` against int `labels [N]`
    or soft targets `[N, C]` (mixup/CutMix, `soft_cross_entropy`)."""
    label_smoothing = check_label_smoothing("cross_entropy", label_smoothing)
    _check_labels("cross_entropy", logits, labels)
    if labels.ndim < logits.ndim:
        _check_class_ids("cross_entropy", labels, logits.shape[-1])
        labels = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return soft_cross_entropy(logits, labels, label_smoothing)


def topk_correct(logits: jnp.ndarray, labels: jnp.ndarray, k: int) -> jnp.ndarray:
    """1.0 where the label is among the `k` highest logits (k is capped at the class count).

    Ties rank the lower class index first, as `argmax` and `lax.top_k` do, so constant logits
    are not "correct" for every label; an example with a NaN logit is never correct (a
    diverged model must not score 100%), nor one whose label is not a class index in [0, C)
    (indexing would read NaN past the end, or wrap a negative label to the last class)."""
    k = min(check_positive_int("topk_correct", "k", k), logits.shape[-1])
    _check_labels("topk_correct", logits, labels, targets=False)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    index = jnp.arange(logits.shape[-1])
    ahead = (logits > label_logit) | ((logits == label_logit) & (index < labels[..., None]))
    rank = jnp.sum(ahead, axis=-1)  # classes ranked above the label
    finite = jnp.all(~jnp.isnan(logits), axis=-1)
    a_class = (labels >= 0) & (labels < logits.shape[-1])
    return ((rank < k) & finite & a_class).astype(jnp.float32)


def example_metrics(logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0) -> dict:
    """Per-example `loss`, `top1`, `top5` (each shape [N], float32).

    `labels` is int `[N]` or soft targets `[N, C]` (mixup/CutMix). With soft targets the loss is
    against the whole distribution, while top-1/top-5 score the dominant label, their argmax (the
    lower class on a tie): a mixed image has no single true class, and the label with the larger
    share is the usual stand-in (train accuracy under mixing is therefore a rough signal)."""
    label_smoothing = check_label_smoothing("example_metrics", label_smoothing)
    _check_labels("example_metrics", logits, labels)
    logits = logits.astype(jnp.float32)
    loss = cross_entropy(logits, labels, label_smoothing)
    if labels.ndim == logits.ndim:
        labels = jnp.argmax(labels, axis=-1)
    return {
        "loss": loss,
        "top1": topk_correct(logits, labels, 1),
        "top5": topk_correct(logits, labels, 5),
    }


def split_auxiliary(outputs: Any) -> tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
    """`(main logits, auxiliary logits)` of a model's training output.

    A plain array has no auxiliary heads. A named tuple with a `logits` field (GoogLeNet's
    `GoogLeNetOutputs(logits, aux1, aux2)`) has its other fields as auxiliary classifiers.
    """
    fields = getattr(outputs, "_fields", ())
    if "logits" in fields:
        return outputs.logits, tuple(getattr(outputs, f) for f in fields if f != "logits")
    return outputs, ()


def masked_sums(per_example: dict, mask: jnp.ndarray) -> dict:
    """Sums each per-example metric over examples where `mask` is 1, plus `count` = sum(mask)."""
    mask = mask.astype(jnp.float32)
    # `where`, not `value * mask`: a NaN on a padded example must not poison the sum.
    sums = {name: jnp.sum(jnp.where(mask > 0, value * mask, 0.0))
            for name, value in per_example.items()}
    sums["count"] = jnp.sum(mask)
    return sums

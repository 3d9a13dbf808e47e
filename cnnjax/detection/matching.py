"""Anchor labelling against ground-truth boxes (Faster R-CNN's RPN rule) and the fixed-size
balanced sampler of positives and negatives.

Ground truth is padded to a fixed `G` boxes with a validity mask, so every shape is static and
both functions run under `jit` and `vmap` (one image per call; `vmap` over a batch).
Boxes are `(x1, y1, x2, y2)` as in `cnnjax.layers.roi`, whose `box_iou` is used here.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.layers.roi import box_iou, check_valid_boxes
from cnnjax.utils.validation import (
    check_bool,
    check_bool_array,
    check_number,
    check_positive_int,
    check_prng_key,
    concrete_value,
    given_dtype,
    invalid,
)

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1


_UNIT = "expected a number in [0, 1]"


class AnchorLabels(NamedTuple):
    """What `label_anchors` returns, per anchor `[A]`."""

    labels: jax.Array  # int32: POSITIVE (1), NEGATIVE (0) or IGNORE (-1)
    matched_gt: jax.Array  # int32 index of the anchor's highest-IoU valid gt box (0 if none)
    max_iou: jax.Array  # that IoU (0 where there is no valid gt box or the anchor is invalid)






def _mask(owner: str, arg: str, mask: Any, length: int) -> jax.Array:
    """`mask` as a bool array of shape `[length]`, else raises."""
    given, mask = mask, jnp.asarray(mask)
    if mask.shape != (length,):
        raise invalid(owner, f"{arg}.shape", tuple(mask.shape), f"expected ({length},)")
    check_bool_array(owner, arg, given)
    return mask


def label_anchors(
    anchors: Any, gt_boxes: Any, gt_valid: Any, fg_thresh: float = 0.7, bg_thresh: float = 0.3,
    force_best: bool = True, anchor_valid: Any = None,
) -> AnchorLabels:
    """Labels `anchors` `[A, 4]` positive, negative or ignored against `gt_boxes` `[G, 4]`.

    An anchor's IoU is its highest IoU with a valid gt box (`gt_valid` `[G]` bool; padded boxes
    are ignored whatever their values). IoU `>= fg_thresh` is positive, `< bg_thresh` negative,
    in between ignored. With `force_best` (the RPN rule of Ren et al. 2015, as py-faster-rcnn's
    `anchor_target_layer`), each valid gt box's highest-IoU anchors, ties included, are positive
    too, overriding "negative", so every object gets an anchor. Unlike the reference, a gt box that
    overlaps no anchor (best IoU 0) forces nothing: the reference would mark every anchor with IoU
    0 to it positive. `anchor_valid` `[A]` bool (e.g. `anchors_inside`) excludes anchors: they are
    ignored and cannot be a gt's best. With no valid gt box every valid anchor is negative.

    `matched_gt` is the anchor's own best gt (first on ties), also for forced positives, as in the
    reference; gather regression targets with `gt_boxes[matched_gt]`.
    """
    owner = "label_anchors"
    anchors = jnp.asarray(anchors)
    gt_boxes = jnp.asarray(gt_boxes)
    for arg, boxes in (("anchors", anchors), ("gt_boxes", gt_boxes)):
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise invalid(owner, f"{arg}.shape", tuple(boxes.shape),
                          "expected [K, 4] boxes as (x1, y1, x2, y2)")
    gt_valid = _mask(owner, "gt_valid", gt_valid, gt_boxes.shape[0])
    if anchor_valid is None:
        anchor_valid = jnp.ones(anchors.shape[0], bool)
    anchor_valid = _mask(owner, "anchor_valid", anchor_valid, anchors.shape[0])
    # fg_thresh 0 would make every valid anchor positive, those overlapping nothing too
    fg = check_number(owner, "fg_thresh", fg_thresh, "expected a number in (0, 1]", low=0.0,
                      high=1.0, low_open=True)
    bg = check_number(owner, "bg_thresh", bg_thresh, _UNIT, low=0.0, high=1.0)
    if fg < bg:
        raise invalid(owner, "fg_thresh", fg_thresh,
                      f"expected fg_thresh >= bg_thresh={bg_thresh!r}")
    force_best = check_bool(owner, "force_best", force_best)
    if anchors.shape[0] == 0:  # forcing each gt's best anchor needs one
        raise invalid(owner, "anchors.shape", tuple(anchors.shape),
                      "expected [A, 4] with A >= 1 anchors to label")
    # Checked here to name this function's arguments (box_iou would name its own `boxes`).
    check_valid_boxes(owner, "anchors", anchors)
    check_valid_boxes(owner, "gt_boxes", gt_boxes, gt_valid)
    # Padded boxes may hold anything; zero them so box_iou's checks of concrete boxes pass.
    gt_boxes = jnp.where(gt_valid[:, None], gt_boxes, 0)
    iou = box_iou(anchors, gt_boxes)  # [A, G]
    return _label(iou, gt_valid, anchor_valid, fg, bg, force_best)


@partial(jax.jit, static_argnames=("force_best",))
def _label(
    iou: jax.Array, gt_valid: jax.Array, anchor_valid: jax.Array, fg: float, bg: float,
    force_best: bool,
) -> AnchorLabels:
    """`label_anchors` from the `[A, G]` IoU matrix."""
    iou = jnp.where(gt_valid[None, :] & anchor_valid[:, None], iou, -1.0)
    if iou.shape[1] == 0:
        iou = jnp.full((iou.shape[0], 1), -1.0, iou.dtype)
    matched = jnp.argmax(iou, axis=1).astype(jnp.int32)
    max_iou = jnp.max(iou, axis=1)
    labels = jnp.where(max_iou < bg, NEGATIVE, IGNORE)
    if force_best:
        best = jnp.max(iou, axis=0)  # [G]; -1 for invalid gt, 0 for a gt overlapping no anchor
        forced = jnp.any((iou == best[None, :]) & (best[None, :] > 0), axis=1)
        labels = jnp.where(forced, POSITIVE, labels)
    labels = jnp.where(max_iou >= fg, POSITIVE, labels)
    labels = jnp.where(anchor_valid, labels, IGNORE).astype(jnp.int32)
    return AnchorLabels(labels, matched, jnp.maximum(max_iou, 0.0))


def _first_k(key: jax.Array, candidates: jax.Array, k: jax.Array) -> jax.Array:
    """A uniformly random subset of `min(k, sum(candidates))` of the True entries (a mask)."""
    count = candidates.shape[0]
    priority = jax.random.permutation(key, count)
    order = jnp.argsort(jnp.where(candidates, priority, priority + count))
    rank = jnp.zeros(count, jnp.int32).at[order].set(jnp.arange(count, dtype=jnp.int32))
    return candidates & (rank < k)


def sample_balanced(
    key: jax.Array, labels: Any, num_samples: int = 256, positive_fraction: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """Randomly picks a fixed-size minibatch of anchors (or RoIs): `(positive, negative)` masks.

    Up to `int(num_samples * positive_fraction)` positives (`labels == 1`), the rest of
    `num_samples` negatives (`labels == 0`), each set a uniformly random subset drawn with `key`
    (py-faster-rcnn's and torchvision's rule: 256 anchors, half positive, for the RPN). Fewer are
    picked when there are not enough; ignored anchors (`-1`) never are. Same key, same masks.
    """
    owner = "sample_balanced"
    dtype = given_dtype(labels)
    labels = jnp.asarray(labels)
    if labels.ndim != 1:
        raise invalid(owner, "labels.shape", tuple(labels.shape), "expected [A]")
    if not np.issubdtype(dtype, np.integer):
        raise invalid(owner, "labels.dtype", str(dtype),
                      "expected an integer array of 1 / 0 / -1")
    values = concrete_value(labels)
    if values is not None:  # a class id (2, 3, ...) is neither positive nor negative
        bad = np.flatnonzero((values != POSITIVE) & (values != NEGATIVE) & (values != IGNORE))
        if bad.size:
            raise invalid(owner, f"labels[{bad[0]}]", int(values[bad[0]]),
                          "expected 1 (positive), 0 (negative) or -1 (ignored)")
    check_prng_key(owner, key)
    check_positive_int(owner, "num_samples", num_samples)
    fraction = check_number(owner, "positive_fraction", positive_fraction, _UNIT, low=0.0, high=1.0)
    return _sample(key, labels, num_samples, int(num_samples * fraction))


@partial(jax.jit, static_argnames=("num_samples", "max_positive"))
def _sample(
    key: jax.Array, labels: jax.Array, num_samples: int, max_positive: int,
) -> tuple[jax.Array, jax.Array]:
    """`sample_balanced` after validation."""
    pos_key, neg_key = jax.random.split(key)
    positive = _first_k(pos_key, labels == POSITIVE, max_positive)
    negative = _first_k(neg_key, labels == NEGATIVE, num_samples - jnp.sum(positive))
    return positive, negative

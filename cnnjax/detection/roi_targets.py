"""Fast / Faster R-CNN second-stage training targets for one image, and the box head's loss.

`sample_rois` labels region proposals against the ground truth (Girshick 2015, sec. 2.3:
foreground at IoU >= 0.5 with a gt box, background below) and samples a fixed-size minibatch
of RoIs with a bounded foreground share, their class labels and class-specific regression targets
(py-faster-rcnn's `proposal_target_layer`, torchvision's `RoIHeads.select_training_samples`).
`fast_rcnn_loss` is the multi-task loss of eq. 1 on that minibatch (torchvision's `fastrcnn_loss`).
Fixed shapes throughout (padding + validity masks): both run under `jit` and `vmap` over images.
Boxes are `(x1, y1, x2, y2)` in continuous pixels, as in `cnnjax.layers.roi`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.detection.box_coding import check_box_weights, encode_boxes
from cnnjax.detection.losses import masked_mean, smooth_l1
from cnnjax.detection.matching import NEGATIVE, POSITIVE, sample_balanced
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

BACKGROUND = 0


class RoiTargets(NamedTuple):
    """What `sample_rois` returns, `S = num_samples` rows: foreground first, then background."""

    rois: jax.Array  # [S, 4] the sampled boxes (x1, y1, x2, y2); 0 where not valid
    labels: jax.Array  # [S] int32 class of the matched gt box (1..C), 0 for background/padding
    regression_targets: jax.Array  # [S, 4] encode_boxes(matched gt, roi, box_weights); 0 if not fg
    valid: jax.Array  # [S] bool: a sampled RoI (False: padding)


class FastRcnnLosses(NamedTuple):
    """The two terms of Fast R-CNN's multi-task loss (eq. 1, lambda = 1: add them)."""

    classification: jax.Array  # mean cross-entropy over the valid RoIs
    box: jax.Array  # smooth L1 of the true class's deltas, fg only, summed / number of valid RoIs








def _boxes(owner: str, arg: str, boxes: Any) -> jax.Array:
    """`boxes` as a `[K, 4]` array, else raises."""
    boxes = jnp.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise invalid(owner, f"{arg}.shape", tuple(boxes.shape),
                      "expected [K, 4] boxes as (x1, y1, x2, y2)")
    return boxes


def _vector(owner: str, arg: str, x: Any, length: int, kind: str) -> jax.Array:
    """`x` as a `[length]` array of `kind` ("bool" or "integer"), else raises."""
    dtype = given_dtype(x)
    given, x = x, jnp.asarray(x)
    if x.shape != (length,):
        raise invalid(owner, f"{arg}.shape", tuple(x.shape), f"expected ({length},)")
    if kind == "bool":
        check_bool_array(owner, arg, given)
    if kind == "integer" and not np.issubdtype(dtype, np.integer):
        raise invalid(owner, f"{arg}.dtype", str(dtype), "expected an integer array")
    return x


def sample_rois(
    key: jax.Array, proposals: Any, proposals_valid: Any, gt_boxes: Any, gt_labels: Any,
    gt_valid: Any, *, num_samples: int = 128, fg_fraction: float = 0.25, fg_thresh: float = 0.5,
    bg_thresh_hi: float = 0.5, bg_thresh_lo: float = 0.0, append_gt: bool = True,
    box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
) -> RoiTargets:
    """Samples `num_samples` RoIs of one image with their classes and regression targets.

    Candidates are the valid `proposals` `[P, 4]` (`proposals_valid` `[P]` bool, e.g.
    `rpn_proposals(...).valid`) and, with `append_gt` (py-faster-rcnn, torchvision), the valid
    `gt_boxes` `[G, 4]` themselves, so every object has a foreground RoI from the first step.
    A candidate's IoU is its highest with a valid gt box (`gt_valid` `[G]` bool; padded gt rows
    are ignored whatever their values; first gt on ties). Foreground: IoU `>= fg_thresh`, class
    `gt_labels` `[G]` (integers `1..C`; 0 is background) of that gt. Background: IoU in
    `[bg_thresh_lo, bg_thresh_hi)`, class 0. Others are never sampled. With no valid gt box every
    IoU is 0: only background, if `bg_thresh_lo` is 0.

    Up to `int(num_samples * fg_fraction)` foreground (py-faster-rcnn rounds instead; the same
    for the defaults) and then background to fill `num_samples` are drawn uniformly at random
    with `key` (`matching.sample_balanced`; same key, same sample).
    When there are not enough candidates the rest of the rows are padding (`valid` False, zero
    box, label 0): unlike py-faster-rcnn, which repeats background RoIs (or foreground when there
    is no background) to fill the batch, a padded row counts in no loss. Rows are the sampled
    foreground then the sampled background, each in candidate order (proposals, then gt).

    Regression targets are `encode_boxes(matched gt, roi, box_weights)` for foreground (the
    box head's Detectron/torchvision weights `(10, 10, 5, 5)` by default; py-faster-rcnn
    normalizes by stds `(0.1, 0.1, 0.2, 0.2)`, the same thing) and 0 otherwise.

    Defaults: 128 RoIs per image, 25% foreground, IoU 0.5 (py-faster-rcnn's Faster R-CNN
    end-to-end setting, one image per batch; the Fast R-CNN paper takes 64 from each of 2 images,
    torchvision 512 per image). The Fast R-CNN paper's background range is `[0.1, 0.5)` (its
    code's `BG_THRESH_LO = 0.1`), "a heuristic for hard example mining"; `bg_thresh_lo=0.0` (the
    default, which every detector in `cnnjax.models` uses, Fast R-CNN and SPP-net included) is
    py-faster-rcnn's end-to-end Faster R-CNN setting and torchvision's. Proposals carry no
    gradient (apply `jax.lax.stop_gradient` upstream).
    """
    owner = "sample_rois"
    proposals = _boxes(owner, "proposals", proposals)
    gt_boxes = _boxes(owner, "gt_boxes", gt_boxes)
    proposals_valid = _vector(owner, "proposals_valid", proposals_valid, proposals.shape[0],
                              "bool")
    count = gt_boxes.shape[0]
    gt_labels_in = gt_labels
    gt_labels = _vector(owner, "gt_labels", gt_labels, count, "integer")
    gt_valid_in = gt_valid
    gt_valid = _vector(owner, "gt_valid", gt_valid, count, "bool")
    check_prng_key(owner, key)
    samples = check_positive_int(owner, "num_samples", num_samples)
    unit = "expected a number in [0, 1]"
    fraction = check_number(owner, "fg_fraction", fg_fraction, unit, low=0.0, high=1.0)
    fg = check_number(owner, "fg_thresh", fg_thresh, "expected a number in (0, 1]", low=0.0,
                      high=1.0, low_open=True)
    hi = check_number(owner, "bg_thresh_hi", bg_thresh_hi, unit, low=0.0, high=1.0)
    lo = check_number(owner, "bg_thresh_lo", bg_thresh_lo, unit, low=0.0, high=1.0)
    if hi > fg:
        raise invalid(owner, "bg_thresh_hi", bg_thresh_hi,
                      f"expected bg_thresh_hi <= fg_thresh={fg_thresh!r}")
    if lo > hi:
        raise invalid(owner, "bg_thresh_lo", bg_thresh_lo,
                      f"expected bg_thresh_lo <= bg_thresh_hi={bg_thresh_hi!r}")
    append_gt = check_bool(owner, "append_gt", append_gt)
    weights = check_box_weights(owner, "box_weights", box_weights)
    check_valid_boxes(owner, "proposals", proposals, proposals_valid)
    check_valid_boxes(owner, "gt_boxes", gt_boxes, gt_valid_in)
    labels, valid = concrete_value(gt_labels_in), concrete_value(gt_valid_in)
    if labels is not None and valid is not None:
        bad = np.flatnonzero(valid & (labels < 1))
        if bad.size:
            i = int(bad[0])
            raise invalid(owner, f"gt_labels[{i}]", int(labels[i]),
                          "expected a class >= 1 (0 is background)")
    dtype = jnp.promote_types(jnp.result_type(proposals, gt_boxes), jnp.float32)
    return _sample_rois(key, proposals.astype(dtype), proposals_valid, gt_boxes.astype(dtype),
                        gt_labels.astype(jnp.int32), gt_valid, samples, fraction, fg, hi, lo,
                        append_gt, weights)


@partial(jax.jit, static_argnames=("samples", "fraction", "append_gt", "weights"))
def _sample_rois(
    key: jax.Array, proposals: jax.Array, proposals_valid: jax.Array, gt_boxes: jax.Array,
    gt_labels: jax.Array, gt_valid: jax.Array, samples: int, fraction: float, fg: float,
    hi: float, lo: float, append_gt: bool, weights: tuple[float, ...],
) -> RoiTargets:
    """`sample_rois` after validation."""
    if gt_boxes.shape[0] == 0:  # one padded gt row keeps the gathers below well-defined
        gt_boxes = jnp.zeros((1, 4), gt_boxes.dtype)
        gt_labels = jnp.zeros(1, jnp.int32)
        gt_valid = jnp.zeros(1, bool)
    # Padded rows may hold anything (even inf/NaN): zero them before any arithmetic.
    gt_boxes = jnp.where(gt_valid[:, None], gt_boxes, 0)
    candidates = jnp.where(proposals_valid[:, None], proposals, 0)
    candidate_valid = proposals_valid
    if append_gt:
        candidates = jnp.concatenate([candidates, gt_boxes])
        candidate_valid = jnp.concatenate([candidate_valid, gt_valid])
    if candidates.shape[0] == 0:  # no proposals and no gt rows: one padded candidate
        candidates = jnp.zeros((1, 4), gt_boxes.dtype)
        candidate_valid = jnp.zeros(1, bool)
    count = candidates.shape[0]

    iou = jnp.where(gt_valid[None, :], box_iou(candidates, gt_boxes), -1.0)  # [N, G]
    matched = jnp.argmax(iou, axis=1)
    max_iou = jnp.maximum(jnp.max(iou, axis=1), 0.0)  # 0 when there is no valid gt box
    foreground = candidate_valid & (max_iou >= fg)  # fg > 0: needs a valid gt box
    background = candidate_valid & ~foreground & (max_iou >= lo) & (max_iou < hi)
    kinds = jnp.where(foreground, POSITIVE, jnp.where(background, NEGATIVE, -1))
    picked_fg, picked_bg = sample_balanced(key, kinds.astype(jnp.int32), samples, fraction)

    # Rows: picked foreground, then picked background, each in candidate order, then the rest.
    index = jnp.arange(count)
    rank = jnp.where(picked_fg, index, jnp.where(picked_bg, count + index, 2 * count + index))
    order = jnp.argsort(rank)
    if count < samples:
        order = jnp.concatenate([order, jnp.zeros(samples - count, order.dtype)])
    order = order[:samples]
    valid = jnp.arange(samples) < jnp.sum(picked_fg) + jnp.sum(picked_bg)
    is_fg = valid & foreground[order]

    rois = jnp.where(valid[:, None], candidates[order], 0)
    gt = matched[order]
    labels = jnp.where(is_fg, gt_labels[gt], BACKGROUND).astype(jnp.int32)
    # Foreground RoIs overlap their gt (IoU >= fg > 0), so both have positive sizes; other rows
    # get a unit box on both sides (finite zeros instead of log(0) or 0 / 0).
    unit = jnp.asarray([0.0, 0.0, 1.0, 1.0], rois.dtype)
    targets = encode_boxes(jnp.where(is_fg[:, None], gt_boxes[gt], unit),
                           jnp.where(is_fg[:, None], rois, unit), weights)
    targets = jnp.where(is_fg[:, None], targets, 0.0)
    return RoiTargets(rois, labels, targets, valid)


def fast_rcnn_loss(
    class_logits: Any, box_deltas: Any, targets: RoiTargets, beta: float = 1.0,
) -> FastRcnnLosses:
    """Fast R-CNN's classification and box losses on the RoIs sampled by `sample_rois`.

    `class_logits` `[S, K]` with `K = C + 1` (class 0 is background); `box_deltas` `[S, K, 4]`
    or `[S, 4 K]` (class `k`'s deltas at `4k:4k+4`, py-faster-rcnn's and torchvision's layout).
    `classification` is the softmax cross-entropy averaged over the valid rows. `box` is the
    smooth L1 (`losses.smooth_l1`, threshold `beta`) between the true class's deltas and the
    regression targets, summed over the 4 coordinates of foreground rows and divided by the
    number of valid rows (torchvision's normalization, which py-faster-rcnn's `SmoothL1Loss`
    over the whole minibatch shares), so background rows pull the box loss down. `beta = 1` is
    the paper's eq. 3; torchvision uses `1/9`, Detectron2 `0` (plain L1).
    Padded rows contribute nothing (value or gradient); with none valid both terms are 0.
    """
    owner = "fast_rcnn_loss"
    try:
        labels, regression, valid = (targets.labels, targets.regression_targets, targets.valid)
    except AttributeError:
        raise invalid(owner, "targets", type(targets).__name__,
                      "expected a RoiTargets (from sample_rois)") from None
    labels_in = labels
    labels = jnp.asarray(labels)
    regression = jnp.asarray(regression)
    if labels.ndim != 1:
        raise invalid(owner, "targets.labels.shape", tuple(labels.shape), "expected [S]")
    label_dtype = given_dtype(labels_in)
    if not np.issubdtype(label_dtype, np.integer):  # a float class would be truncated
        raise invalid(owner, "targets.labels.dtype", str(label_dtype),
                      "expected an integer array (classes in [0, C + 1), 0: background)")
    rows = labels.shape[0]
    if regression.shape != (rows, 4):
        raise invalid(owner, "targets.regression_targets.shape", tuple(regression.shape),
                      f"expected ({rows}, 4)")
    valid = _vector(owner, "targets.valid", valid, rows, "bool")
    class_logits = jnp.asarray(class_logits)
    if class_logits.ndim != 2 or class_logits.shape[0] != rows or class_logits.shape[1] < 2:
        raise invalid(owner, "class_logits.shape", tuple(class_logits.shape),
                      f"expected ({rows}, C + 1) with C >= 1 ({rows} = len(targets.labels))")
    classes = class_logits.shape[1]
    box_deltas = jnp.asarray(box_deltas)
    if box_deltas.shape == (rows, 4 * classes):
        box_deltas = box_deltas.reshape(rows, classes, 4)
    if box_deltas.shape != (rows, classes, 4):
        raise invalid(owner, "box_deltas.shape", tuple(box_deltas.shape),
                      f"expected ({rows}, {classes}, 4) or ({rows}, {4 * classes})")
    width = check_number(owner, "beta", beta, "expected a finite number >= 0", low=0.0,
                         high_open=True)
    concrete = concrete_value(labels_in)
    if concrete is not None:
        bad = np.flatnonzero((concrete < 0) | (concrete >= classes))
        if bad.size:
            i = int(bad[0])
            raise invalid(owner, f"targets.labels[{i}]", int(concrete[i]),
                          f"expected a class in [0, {classes}) (K = class_logits.shape[1])")
    dtype = jnp.promote_types(jnp.result_type(class_logits, box_deltas), jnp.float32)
    return _fast_rcnn_loss(class_logits.astype(dtype), box_deltas.astype(dtype),
                           labels.astype(jnp.int32), regression.astype(dtype), valid, width)


@partial(jax.jit, static_argnames=("beta",))
def _fast_rcnn_loss(
    logits: jax.Array, deltas: jax.Array, labels: jax.Array, regression: jax.Array,
    valid: jax.Array, beta: float,
) -> FastRcnnLosses:
    """`fast_rcnn_loss` after validation."""
    labels = jnp.where(valid, labels, BACKGROUND)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    cross_entropy = -jnp.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0]
    classification = masked_mean(cross_entropy, valid)
    chosen = jnp.take_along_axis(deltas, labels[:, None, None], axis=1)[:, 0]  # [S, 4]
    foreground = valid & (labels > BACKGROUND)
    per_row = jnp.where(foreground[:, None], smooth_l1(chosen, regression, beta), 0.0)
    return FastRcnnLosses(classification, masked_mean(per_row, valid))

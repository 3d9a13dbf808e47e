"""YOLO v1 (Redmon et al., CVPR 2016): per-cell training targets and the sum-squared loss (eq. 3).

The image is divided into an `S x S` grid (`(S_h, S_w)` also accepted); each cell predicts `B`
boxes with a confidence each and `C` class scores, a `[S, S, B * 5 + C]` tensor laid out per cell
as `B` groups `(x, y, sqrt_w, sqrt_h, confidence)` then the `C` class scores:

- `(x, y)`: the box centre as an offset within the cell, in cell units (0..1 inside the cell);
- `(sqrt_w, sqrt_h)`: square roots of the box size relative to the image, so the box is
  `sqrt_w**2` image widths wide. The paper regresses `sqrt(w)` "to reflect that small deviations
  in large boxes matter less than in small boxes"; like darknet (`sqrt=1`) the network outputs the
  root itself, which keeps the loss smooth (no `sqrt` of a prediction, finite gradients at 0).

Targets are `[S, S, 5 + C]`: `(x, y, w, h, object, one-hot class)` of the object a cell is
responsible for (`w`, `h` relative to the image, not rooted), all zero in cells without one.
One image per call, fixed shapes (ground truth padded to `G` boxes with a validity mask): `vmap`
both functions over a batch and sum (darknet) or average the per-image losses.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.detection.anchors import image_size_pair
from cnnjax.layers.roi import box_iou, check_valid_boxes
from cnnjax.utils.validation import (
    check_bool_array,
    check_choice,
    check_positive_int,
    concrete_value,
    given_dtype,
    invalid,
    to_pair,
)

CONFIDENCE_TARGETS = ("iou", "one")






def yolo_v1_targets(
    gt_boxes: Any, gt_labels: Any, gt_valid: Any, image_size: Any, grid_size: Any,
    num_classes: int,
) -> jax.Array:
    """The `[S, S, 5 + C]` target tensor of one image (layout in the module docstring).

    `gt_boxes` `[G, 4]` are `(x1, y1, x2, y2)` pixels of an image of `image_size`
    `(height, width)` (numbers, or a `[2]` array under `vmap`); `gt_labels` `[G]` integer classes
    in `[0, num_classes)`; `gt_valid` `[G]` bool marks real boxes (padding is ignored whatever its
    values; concrete valid boxes must be finite with x1 <= x2 and y1 <= y2, else the loss would
    be NaN). The cell containing a box's centre is responsible for it (a centre on the far image
    edge belongs to the last cell; a centre outside the image to the nearest border cell, its
    offset then outside `[0, 1]`). A cell holds one object: when several centres fall into it the
    valid box with the lowest index wins, deterministically (darknet keeps the first box of a
    randomly shuffled list: shuffle `G` yourself to get that).
    """
    owner = "yolo_v1_targets"
    gt_boxes = jnp.asarray(gt_boxes)
    if gt_boxes.ndim != 2 or gt_boxes.shape[1] != 4:
        raise invalid(owner, "gt_boxes.shape", tuple(gt_boxes.shape),
                      "expected [G, 4] boxes as (x1, y1, x2, y2)")
    count = gt_boxes.shape[0]
    label_dtype = given_dtype(gt_labels)
    gt_labels = jnp.asarray(gt_labels)
    if gt_labels.shape != (count,):
        raise invalid(owner, "gt_labels.shape", tuple(gt_labels.shape), f"expected ({count},)")
    if not np.issubdtype(label_dtype, np.integer):
        raise invalid(owner, "gt_labels.dtype", str(label_dtype), "expected an integer array")
    given_valid, gt_valid = gt_valid, jnp.asarray(gt_valid)
    if gt_valid.shape != (count,):
        raise invalid(owner, "gt_valid.shape", tuple(gt_valid.shape), f"expected ({count},)")
    check_bool_array(owner, "gt_valid", given_valid)
    height, width = image_size_pair(owner, image_size)
    grid = to_pair(owner, "grid_size", grid_size)
    classes = check_positive_int(owner, "num_classes", num_classes)
    check_valid_boxes(owner, "gt_boxes", gt_boxes, gt_valid)
    labels, valid = concrete_value(gt_labels), concrete_value(gt_valid)
    if labels is not None and valid is not None:
        bad = np.flatnonzero(valid & ((labels < 0) | (labels >= classes)))
        if bad.size:
            i = int(bad[0])
            raise invalid(owner, f"gt_labels[{i}]", int(labels[i]),
                          f"expected a class in [0, {classes})")
    dtype = jnp.promote_types(gt_boxes.dtype, jnp.float32)
    size_hw = jnp.stack([jnp.asarray(height, dtype), jnp.asarray(width, dtype)])
    return _targets(gt_boxes.astype(dtype), gt_labels, gt_valid, size_hw, grid, classes)


@partial(jax.jit, static_argnames=("grid", "classes"))
def _targets(
    boxes: jax.Array, labels: jax.Array, valid: jax.Array, size_hw: jax.Array,
    grid: tuple[int, int], classes: int,
) -> jax.Array:
    """`yolo_v1_targets` after validation."""
    rows, cols = grid
    height, width = size_hw[0], size_hw[1]
    boxes = jnp.where(valid[:, None], boxes, 0)  # padding may hold anything (even inf/NaN)
    cx = (boxes[:, 0] + boxes[:, 2]) / (2 * width) * cols  # centre in cell units
    cy = (boxes[:, 1] + boxes[:, 3]) / (2 * height) * rows
    col = jnp.clip(jnp.floor(cx), 0, cols - 1)
    row = jnp.clip(jnp.floor(cy), 0, rows - 1)
    features = jnp.concatenate([
        jnp.stack([cx - col, cy - row, (boxes[:, 2] - boxes[:, 0]) / width,
                   (boxes[:, 3] - boxes[:, 1]) / height, jnp.ones_like(cx)], axis=1),
        jax.nn.one_hot(labels, classes, dtype=boxes.dtype)], axis=1)  # [G, 5 + C]
    cell = (row * cols + col).astype(jnp.int32)
    assigned = (cell[:, None] == jnp.arange(rows * cols)[None, :]) & valid[:, None]  # [G, S*S]
    if boxes.shape[0] == 0:
        return jnp.zeros((rows, cols, 5 + classes), boxes.dtype)
    winner = jnp.argmax(assigned, axis=0)  # the first (lowest-index) valid box of each cell
    occupied = jnp.any(assigned, axis=0)
    table = jnp.where(occupied[:, None], features[winner], 0.0)
    return table.reshape(rows, cols, 5 + classes)


class YoloV1LossTerms(NamedTuple):
    """The five sums of eq. (3), weights applied (`yolo_v1_loss` is their sum)."""

    coord_xy: jax.Array  # lambda_coord * sum 1obj_ij [(x - x^)^2 + (y - y^)^2]
    coord_wh: jax.Array  # lambda_coord * sum 1obj_ij [(sqrt w - sqrt w^)^2 + (sqrt h - ...)^2]
    object: jax.Array  # sum 1obj_ij (C - C^)^2, C^ the IoU (or 1)
    no_object: jax.Array  # lambda_noobj * sum 1noobj_ij C^2
    classes: jax.Array  # sum 1obj_i sum_c (p(c) - p^(c))^2


def _nonnegative(owner: str, arg: str, value: Any) -> float:
    """`value` as a finite float >= 0, else raises."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool | str | bytes) or not 0.0 <= number < float("inf"):
        raise invalid(owner, arg, value, "expected a finite number >= 0")
    return number


def check_yolo_v1_loss_settings(
    owner: str, lambda_coord: Any, lambda_noobj: Any, confidence_target: Any
) -> tuple[float, float]:
    """`(lambda_coord, lambda_noobj)` as floats if both are finite and >= 0 and
    `confidence_target` is one of `CONFIDENCE_TARGETS`, else a ValueError naming `owner`.

    One rule for the loss (checked when traced) and for the modules that carry these settings
    (`cnnjax.models.yolo.YOLOv1`, checked at construction), so a bad setting fails before the
    first train step compiles rather than inside it.
    """
    coord = _nonnegative(owner, "lambda_coord", lambda_coord)
    noobj = _nonnegative(owner, "lambda_noobj", lambda_noobj)
    check_choice(owner, "confidence_target", confidence_target, CONFIDENCE_TARGETS)
    return coord, noobj


def yolo_v1_loss_terms(
    predictions: Any, targets: Any, lambda_coord: float = 5.0, lambda_noobj: float = 0.5,
    confidence_target: str = "iou", num_boxes: int | None = None,
) -> YoloV1LossTerms:
    """The terms of the YOLO v1 loss (eq. 3) of one image; see `yolo_v1_loss`."""
    owner = "yolo_v1_loss"
    predictions = jnp.asarray(predictions)
    targets = jnp.asarray(targets)
    if targets.ndim != 3 or targets.shape[2] < 6:
        raise invalid(owner, "targets.shape", tuple(targets.shape),
                      "expected [S, S, 5 + C] with C >= 1 (from yolo_v1_targets)")
    classes = targets.shape[2] - 5
    if predictions.ndim != 3 or predictions.shape[:2] != targets.shape[:2]:
        raise invalid(owner, "predictions.shape", tuple(predictions.shape),
                      f"expected [S, S, B * 5 + C] with S, S = {tuple(targets.shape[:2])} "
                      "(those of targets)")
    boxes5 = predictions.shape[2] - classes
    if num_boxes is not None:
        check_positive_int(owner, "num_boxes", num_boxes)
        if boxes5 != 5 * num_boxes:
            raise invalid(owner, "predictions.shape", tuple(predictions.shape),
                          f"expected a last axis of num_boxes * 5 + C = {num_boxes} * 5 + "
                          f"{classes} = {5 * num_boxes + classes} (C = {classes} from targets: "
                          "do predictions and targets have the same num_classes?)")
    if boxes5 < 5 or boxes5 % 5:
        raise invalid(owner, "predictions.shape", tuple(predictions.shape),
                      f"expected a last axis of B * 5 + {classes} (B >= 1; C = {classes} from "
                      "targets)")
    coord, noobj = check_yolo_v1_loss_settings(owner, lambda_coord, lambda_noobj,
                                               confidence_target)
    dtype = jnp.promote_types(jnp.result_type(predictions, targets), jnp.float32)
    return _loss_terms(predictions.astype(dtype), targets.astype(dtype), boxes5 // 5, coord,
                       noobj, confidence_target == "iou")


def yolo_v1_loss(
    predictions: Any, targets: Any, lambda_coord: float = 5.0, lambda_noobj: float = 0.5,
    confidence_target: str = "iou", num_boxes: int | None = None,
) -> jax.Array:
    """The YOLO v1 sum-squared loss (eq. 3) of one image, a scalar.

    `predictions` `[S, S, B * 5 + C]` (raw outputs: no activation is applied; layout in the
    module docstring), `targets` `[S, S, 5 + C]` from `yolo_v1_targets`. `B` is `num_boxes`;
    pass it: left None, `B` is inferred from the last axes, and targets of another `C` that
    still divide evenly (B = 2, C = 20 predictions against C = 15 targets: B = 3) go unnoticed.
    In a cell with an object, the responsible predictor is the one of the `B` whose box has the
    highest IoU with the object's (ties: the lower index); where all `B` IoUs are 0 (typical early
    in training, where the paper's rule says nothing) it is the one with the lowest root-mean-square
    difference of `(centre x, centre y, w, h)` in image units, darknet's rule. The responsible
    predictor's confidence regresses to that IoU (`confidence_target="iou"`, the paper: "the
    confidence ... equal the IoU between the predicted box and the ground truth", darknet's
    `rescore=1`; the default) or to 1 (`"one"`). Every other predictor, also in object cells, is
    pushed to confidence 0 with weight `lambda_noobj`; coordinates of responsible predictors
    have weight `lambda_coord`; class scores regress to the one-hot class in object cells only.
    The IoU target and the choice of predictor carry no gradient.
    """
    terms = yolo_v1_loss_terms(predictions, targets, lambda_coord, lambda_noobj,
                               confidence_target, num_boxes)
    return sum(terms[1:], terms[0])


def _corners(cx: jax.Array, cy: jax.Array, w: jax.Array, h: jax.Array) -> jax.Array:
    """`(x1, y1, x2, y2)` `[..., 4]` of centre-size boxes."""
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


@partial(jax.jit, static_argnames=("num_boxes", "rescore"))
def _loss_terms(
    predictions: jax.Array, targets: jax.Array, num_boxes: int, lambda_coord: float,
    lambda_noobj: float, rescore: bool,
) -> YoloV1LossTerms:
    """`yolo_v1_loss_terms` after validation."""
    rows, cols = targets.shape[:2]
    boxes = predictions[..., :5 * num_boxes].reshape(rows, cols, num_boxes, 5)
    scores = predictions[..., 5 * num_boxes:]
    x, y, sqrt_w, sqrt_h, confidence = (boxes[..., k] for k in range(5))  # [S, S, B]
    tx, ty, tw, th, has_object = (targets[..., k] for k in range(5))  # [S, S]
    obj = has_object > 0.5
    col = jnp.arange(cols, dtype=targets.dtype)[None, :]
    row = jnp.arange(rows, dtype=targets.dtype)[:, None]

    # Which predictor is responsible: geometry in image units, without gradient.
    fixed = jax.lax.stop_gradient(boxes)
    pcx = (col[..., None] + fixed[..., 0]) / cols
    pcy = (row[..., None] + fixed[..., 1]) / rows
    pw, ph = fixed[..., 2] ** 2, fixed[..., 3] ** 2
    gcx, gcy = (col + tx) / cols, (row + ty) / rows
    predicted = _corners(pcx, pcy, pw, ph).reshape(rows * cols, num_boxes, 4)
    truth = _corners(gcx, gcy, tw, th).reshape(rows * cols, 1, 4)
    iou = jax.vmap(box_iou)(predicted, truth).reshape(rows, cols, num_boxes)
    rmse = jnp.sqrt((pcx - gcx[..., None]) ** 2 + (pcy - gcy[..., None]) ** 2
                    + (pw - tw[..., None]) ** 2 + (ph - th[..., None]) ** 2)
    best = jnp.where(jnp.any(iou > 0, axis=-1), jnp.argmax(iou, axis=-1),
                     jnp.argmin(rmse, axis=-1))
    responsible = (jax.nn.one_hot(best, num_boxes, dtype=jnp.bool_) & obj[..., None])  # [S,S,B]

    def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(mask, values, 0.0))

    xy = (x - tx[..., None]) ** 2 + (y - ty[..., None]) ** 2
    wh = ((sqrt_w - jnp.sqrt(tw)[..., None]) ** 2 + (sqrt_h - jnp.sqrt(th)[..., None]) ** 2)
    target_confidence = iou if rescore else jnp.ones_like(iou)
    one_hot = targets[..., 5:]
    return YoloV1LossTerms(
        coord_xy=lambda_coord * masked_sum(xy, responsible),
        coord_wh=lambda_coord * masked_sum(wh, responsible),
        object=masked_sum((confidence - target_confidence) ** 2, responsible),
        no_object=lambda_noobj * masked_sum(confidence ** 2, ~responsible),
        classes=masked_sum(jnp.sum((scores - one_hot) ** 2, axis=-1), obj),
    )

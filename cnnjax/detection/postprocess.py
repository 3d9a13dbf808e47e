"""Detector outputs with fixed shapes: class-aware NMS to at most `K` detections per image.

Every detector in `cnnjax.models` returns a `Detections` of `[N, K, ...]` arrays padded with a
validity mask, so inference runs under `jit`/`pmap` and the evaluation (`evaluation.py`) gathers
the same shapes from every batch. Boxes are `(x1, y1, x2, y2)` pixels of the network input.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.layers.roi import check_float_scores, check_valid_boxes, greedy_nms
from cnnjax.utils.validation import (
    check_number,
    check_positive_int,
    concrete_value,
    given_dtype,
    invalid,
)

#: Detections narrower or lower than this (pixels, after clipping to the image) are dropped, as
#: torchvision's: a box moved off the image is a sure false positive, not a detection.
MIN_BOX_SIZE = 1e-2


def has_min_size(boxes: jax.Array) -> jax.Array:
    """`[...]` bool: whether each (clipped) box `[..., 4]` is at least `MIN_BOX_SIZE` wide and
    high, i.e. a detection rather than a box moved off the image."""
    sides = boxes[..., 2:] - boxes[..., :2]
    return jnp.all(sides >= MIN_BOX_SIZE, axis=-1)


class Detections(NamedTuple):
    """`K` detections per image, in decreasing-score order; padding rows are 0 and not `valid`."""

    boxes: jax.Array  # [..., K, 4] (x1, y1, x2, y2) pixels
    scores: jax.Array  # [..., K]
    classes: jax.Array  # [..., K] int32 in [0, C)
    valid: jax.Array  # [..., K] bool


# `jax.export` serializes the output tree of a program only with registered node types: a
# detector's exported `detect` (roi_sample_positions="kernel" where it pools RoIs) returns these.
jax.export.register_namedtuple_serialization(
    Detections, serialized_name="cnnjax.detection.postprocess.Detections")


def check_detection_settings(owner: str, module: Any) -> None:
    """Checks a detector's inference fields: `nms_iou` in [0, 1], `score_threshold` in [0, 1)
    and a positive int `max_detections` (every detector in `cnnjax.models` has all three)."""
    check_positive_int(owner, "max_detections", module.max_detections)
    check_number(owner, "nms_iou", module.nms_iou, "expected a number in [0, 1]", low=0.0,
                 high=1.0, strings=False)
    check_number(owner, "score_threshold", module.score_threshold, "expected a number in [0, 1)",
                 low=0.0, high=1.0, high_open=True, strings=False)


def batched_nms(
    boxes: Any, scores: Any, classes: Any, iou_threshold: float, max_detections: int,
    score_threshold: float = 0.0,
) -> Detections:
    """Per-class greedy NMS of one image's candidates, the best `max_detections` kept.

    `boxes` `[M, 4]`, `scores` `[M]`, `classes` `[M]` (an integer dtype). Boxes of different
    classes never suppress each other: one greedy pass (`cnnjax.layers.roi.nms`'s) with the IoU
    of every cross-class pair set to 0, so same-class IoUs are those of the boxes themselves
    (torchvision's class-offset trick rounds coordinates shifted far out in float32). Candidates
    are the rows with `score > score_threshold` (a NaN score is none): the others are dropped and
    may hold anything (padding, even inf/NaN boxes), which never changes the result. Concrete
    candidate boxes must be finite with x1 <= x2 and y1 <= y2, as `nms` checks; under tracing a
    non-finite candidate box is dropped instead. Returns a `Detections` of `[max_detections]`
    rows (all padding, not `valid`, when `M = 0`).
    """
    owner = "batched_nms"
    boxes = jnp.asarray(boxes)
    check_float_scores(owner, scores)  # before jnp.asarray narrows a 64-bit dtype's name
    scores = jnp.asarray(scores)
    class_dtype = given_dtype(classes)
    classes = jnp.asarray(classes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise invalid(owner, "boxes.shape", tuple(boxes.shape), "expected [M, 4]")
    count = boxes.shape[0]
    for arg, value in (("scores", scores), ("classes", classes)):
        if value.shape != (count,):
            raise invalid(owner, f"{arg}.shape", tuple(value.shape), f"expected ({count},)")
    if not np.issubdtype(class_dtype, np.integer):  # a float class would be truncated
        raise invalid(owner, "classes.dtype", str(class_dtype), "expected an integer array")
    thresh = check_number(owner, "iou_threshold", iou_threshold, "expected a number in [0, 1]",
                          low=0.0, high=1.0)
    check_positive_int(owner, "max_detections", max_detections)
    floor = check_number(owner, "score_threshold", score_threshold, "expected a finite number",
                         high_open=True, low_open=True)
    # float32 at least, float64 kept (under x64: ranked as float32, scores 1e-12 apart tied
    # and the lower index, not the higher score, was kept), as `nms` does
    score_dtype = jnp.promote_types(scores.dtype, jnp.float32)
    values = concrete_value(scores)
    if values is not None:  # in the dtype `_batched_nms` compares in
        with np.errstate(over="ignore"):
            candidate = np.asarray(values, score_dtype) > np.asarray(floor, score_dtype)
        check_valid_boxes(owner, "boxes", boxes, candidate)
    return _batched_nms(boxes.astype(jnp.promote_types(boxes.dtype, jnp.float32)),
                        scores.astype(score_dtype), classes.astype(jnp.int32), thresh,
                        max_detections, floor)


@partial(jax.jit, static_argnames=("iou_threshold", "max_detections", "score_threshold"))
def _batched_nms(
    boxes: jax.Array, scores: jax.Array, classes: jax.Array, iou_threshold: float,
    max_detections: int, score_threshold: float,
) -> Detections:
    """`batched_nms` after validation."""
    if boxes.shape[0] == 0:  # no candidate (nothing to gather): all padding, as `nms` pads
        return Detections(boxes=jnp.zeros((max_detections, 4), boxes.dtype),
                          scores=jnp.zeros(max_detections, scores.dtype),
                          classes=jnp.zeros(max_detections, classes.dtype),
                          valid=jnp.zeros(max_detections, bool))
    candidate = (scores > score_threshold) & jnp.all(jnp.isfinite(boxes), axis=1)
    # Non-candidates (padding, even NaN rows) become zero boxes ranked -inf: never kept.
    boxes = jnp.where(candidate[:, None], boxes, 0.0)
    classes = jnp.where(candidate, classes, 0)
    ranking = jnp.where(candidate, scores, -jnp.inf)
    indices, valid = greedy_nms(boxes, ranking, iou_threshold, max_detections, float("-inf"),
                                groups=classes)
    return Detections(
        boxes=jnp.where(valid[:, None], boxes[indices], 0.0),
        scores=jnp.where(valid, scores[indices], 0.0),
        classes=jnp.where(valid, classes[indices], 0),
        valid=valid,
    )

"""The ground truth a detector's `loss` takes, checked once for every detector (R-CNN family,
YOLO): `[N, G, 4]` `(x1, y1, x2, y2)` boxes in pixels of the `N` images, `[N, G]` integer labels
and `[N, G]` bool validity (padding rows may hold anything). Every valid box must have an area:
as in torchvision's detectors, since its IoU with every anchor, RoI or prediction is 0 (the R-CNN
family matched it to nothing; YOLO trained its cell's confidence towards 0)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.layers.roi import check_valid_boxes
from cnnjax.utils.validation import (
    check_bool_array,
    check_nhwc,
    concrete_value,
    given_dtype,
    invalid,
)

Array = Any


def check_ground_truth(owner: str, images: Array, gt_boxes: Array, gt_labels: Array,
                       gt_valid: Array, num_classes: int) -> None:
    """A ValueError naming `owner` unless the ground truth fits the `N >= 1` images: `[N, G, 4]`
    boxes, `[N, G]` integer labels and bool validity; when concrete, every valid box finite with
    x1 < x2, y1 < y2 and every valid label in `[0, num_classes)`. Shapes and dtypes are checked
    under jit too; otherwise a batch mismatch was JAX's vmap error, float labels were truncated
    (1.7 -> class 1), -1 became background, `num_classes` a NaN loss and a box without area was
    silently matched to nothing."""
    check_nhwc(owner, images)
    n = images.shape[0]
    if n == 0:  # torchvision's detectors refuse an empty batch too
        raise invalid(owner, "images.shape", tuple(images.shape),
                      "expected at least one image: the loss is a mean over the images (of 0 "
                      "images, NaN)")
    boxes = tuple(jnp.shape(gt_boxes))
    if len(boxes) != 3 or boxes[0] != n or boxes[2] != 4:
        raise invalid(owner, "gt_boxes.shape", boxes,
                      f"expected ({n}, G, 4) (x1, y1, x2, y2) for {n} images")
    for arg, value in (("gt_labels", gt_labels), ("gt_valid", gt_valid)):
        if tuple(jnp.shape(value)) != boxes[:2]:
            raise invalid(owner, f"{arg}.shape", tuple(jnp.shape(value)),
                          f"expected {boxes[:2]}, one per gt box")
    label_dtype = given_dtype(gt_labels)
    if not np.issubdtype(label_dtype, np.integer):
        raise invalid(owner, "gt_labels.dtype", str(label_dtype),
                      f"expected an integer array (classes in [0, {num_classes}))")
    check_bool_array(owner, "gt_valid", gt_valid)
    check_valid_boxes(owner, "gt_boxes", gt_boxes, gt_valid)
    _check_positive_area(owner, gt_boxes, gt_valid)
    labels, valid = concrete_value(gt_labels), concrete_value(gt_valid)
    if labels is not None and valid is not None:
        bad = np.argwhere(valid & ((labels < 0) | (labels >= num_classes)))
        if bad.size:
            i, j = (int(k) for k in bad[0])
            raise invalid(owner, f"gt_labels[{i}, {j}]", int(labels[i, j]),
                          f"expected a class in [0, {num_classes}) (num_classes={num_classes})")


def _check_positive_area(owner: str, gt_boxes: Array, gt_valid: Array) -> None:
    """When both are concrete, a ValueError naming the first valid box (image, row) of zero width
    or height, compared in the dtype the model computes in (float64 boxes become float32)."""
    boxes, valid = concrete_value(gt_boxes), concrete_value(gt_valid)
    if boxes is None or valid is None:
        return
    boxes = np.asarray(boxes, jax.dtypes.canonicalize_dtype(boxes.dtype))
    flat = np.asarray(valid, bool) & ~has_area(boxes)
    if flat.any():
        i, j = (int(k) for k in np.argwhere(flat)[0])
        raise invalid(owner, f"gt_boxes[{i}, {j}]", np.asarray(boxes[i, j], float).tolist(),
                      f"expected a positive width and height (x1 < x2 and y1 < y2), as "
                      f"torchvision's detectors require: a box without area has IoU 0 with every "
                      f"anchor, RoI or prediction, so nothing can match it; drop image {i}'s box "
                      f"{j} or set gt_valid[{i}, {j}] False")


def has_area(boxes: np.ndarray) -> np.ndarray:
    """Mask `[...]` of `(x1, y1, x2, y2)` boxes `[..., 4]` with a positive width and height, the
    ground truth a detector can learn from (the training pipeline drops the others)."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])

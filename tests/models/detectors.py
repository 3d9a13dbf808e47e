"""Helpers shared by the detector model tests."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest


def assert_eager_detect_equals_jitted(model: Any, variables: Any, x: Any) -> None:
    """`model.apply(..., method="detect")` run eagerly (concrete boxes, checked) gives the
    detections it gives under jit (traced boxes), at least one of them valid."""
    jitted = jax.jit(lambda v, x: model.apply(v, x, method="detect"))(variables, x)
    eager = model.apply(variables, x, method="detect")
    assert bool(jitted.valid.any())
    np.testing.assert_array_equal(eager.valid, jitted.valid)
    np.testing.assert_array_equal(eager.classes, jitted.classes)
    np.testing.assert_allclose(eager.scores, jitted.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eager.boxes, jitted.boxes, rtol=1e-5, atol=1e-4)


def trace_loss(model: Any, gt: tuple[Any, Any, Any], height: int = 64, width: int = 64) -> Any:
    """`model.loss` on 2 `height x width` images and ground truth `gt` (concrete, so its values
    are checked), traced only (nothing compiled): the output's shapes."""
    x = jax.ShapeDtypeStruct((2, height, width, 3), np.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return jax.eval_shape(lambda v, x: model.apply(
        v, x, *gt, method="loss", mutable=["batch_stats"], rngs={"sample": jax.random.key(1)}),
        variables, x)


GT_BOXES = np.array([[[4.0, 4, 20, 20], [30, 30, 50, 60]], [[0, 0, 10, 10], [0, 0, 0, 0]]])
GT_LABELS = np.array([[1, 2], [3, 0]])
GT_VALID = np.array([[True, True], [True, False]])

#: Ground truth `loss` must refuse for 2 images and 4 classes, `(boxes, labels, valid)` with
#: None for the defaults above, and the end of the message after "<Model>.loss: ".
BAD_GROUND_TRUTH = [
    pytest.param((GT_BOXES[:1], GT_LABELS[:1], GT_VALID[:1]),
                 "gt_boxes.shape=(1, 2, 4) is invalid; expected (2, G, 4)", id="batch"),
    pytest.param((None, GT_LABELS + 0.7, None), "gt_labels.dtype='float64' is invalid; expected "
                 "an integer array (classes in [0, 4)).", id="float-labels"),
    pytest.param((None, GT_LABELS[:, :1], None),
                 "gt_labels.shape=(2, 1) is invalid; expected (2, 2)", id="labels-shape"),
    pytest.param((None, None, GT_VALID.astype(int)),
                 "gt_valid.dtype='int64' is invalid; expected a bool array.", id="int-valid"),
    pytest.param((None, np.array([[1, -1], [3, 0]]), None), "gt_labels[0, 1]=-1 is invalid; "
                 "expected a class in [0, 4) (num_classes=4).", id="negative-label"),
    pytest.param((None, np.array([[1, 2], [4, 9]]), None),
                 "gt_labels[1, 0]=4 is invalid; expected a class in [0, 4)", id="label-C"),
    pytest.param((np.array([[[20.0, 4, 4, 20], [30, 30, 50, 60]], [[0, 0, 10, 10], [0, 0, 0, 0]]]),
                  None, None), "gt_boxes[0, 0]=[20.0, 4.0, 4.0, 20.0] is invalid; expected "
                 "x1 <= x2 and y1 <= y2", id="x2<x1"),
    pytest.param((np.array([[[4.0, 4, 20, 20], [30, 30, 50, 60]], [[0, 0, 10, np.nan], [0] * 4]]),
                  None, None), "gt_boxes[1, 0]=[0.0, 0.0, 10.0, nan] is invalid; expected "
                 "finite coordinates.", id="nan-box"),
    # torchvision refuses these too; they were accepted and matched to nothing
    pytest.param((np.array([[[4.0, 4, 20, 20], [30, 30, 50, 60]], [[0, 5, 10, 5], [0] * 4]]),
                  None, None), "gt_boxes[1, 0]=[0.0, 5.0, 10.0, 5.0] is invalid; expected a "
                 "positive width and height (x1 < x2 and y1 < y2)", id="zero-height"),
    pytest.param((np.array([[[4.0, 4, 20, 20], [30, 30, 30, 60]], [[0, 0, 10, 10], [0] * 4]]),
                  None, None), "gt_boxes[0, 1]=[30.0, 30.0, 30.0, 60.0] is invalid; expected a "
                 "positive width and height", id="zero-width"),
]


def with_defaults(gt: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
    """`gt` with None entries replaced by `GT_BOXES`, `GT_LABELS`, `GT_VALID`."""
    return tuple(d if g is None else g for g, d in
                 zip(gt, (GT_BOXES, GT_LABELS, GT_VALID), strict=True))

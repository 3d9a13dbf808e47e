"""YOLO v1 (Redmon et al., CVPR 2016): one network regressing boxes and classes on an S x S grid.

`yolo_v1` is the paper's detection network (Fig. 3): 24 convolutional layers (7x7/2 64, max
pool, 3x3 192, max pool, 1x1 128 / 3x3 256 / 1x1 256 / 3x3 512, max pool, 4 x (1x1 256 / 3x3
512), 1x1 512 / 3x3 1024, max pool, 2 x (1x1 512 / 3x3 1024), 3x3 1024, 3x3 1024/2, 3x3 1024,
3x3 1024), all leaky ReLU (slope 0.1), then fc 4096 (leaky ReLU, dropout 0.5) and a linear fc to
`S * S * (B * 5 + C)` outputs: 448x448 input, S = 7, B = 2, C = 20 (PASCAL VOC). Convolutions
pad `kernel // 2` on every side, as darknet's `yolov1.cfg` (`pad=1`) does: the output sizes of
SAME padding, whose stride-2 windows would start one pixel later. So 448 -> 7x7x1024 before the
fcs.
`yolo_v1_small` is the same design scaled for 64x64 images (`shapes_multi`): 6 convolutions
with BatchNorm, fc 512 (`hidden_features=512`), no dropout, an 8x8 grid.

Output: `[N, S, S, B * 5 + C]`, per cell `B` groups `(x, y, sqrt_w, sqrt_h, confidence)` then `C`
class scores, the layout `cnnjax.detection.yolo.yolo_v1_loss` expects (raw linear outputs, as in
the paper). `loss(images, gt_boxes, gt_labels, gt_valid)` is eq. 3 summed over the grid and
averaged over the images; `detect(images)` decodes every predictor to a box scored
`confidence * P(c)` for every class `c` (the paper's "class-specific confidence scores for each
box", as darknet's v1), drops boxes clipped to under `MIN_BOX_SIZE` (wholly off the image), and
applies per-class NMS down to `max_detections` per image (`cnnjax.detection.postprocess`).

Parameter names: `conv{i}` (and `bn{i}`) for the i-th convolution (1-based, as listed), `fc1`,
`head` (the final fc).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.detection.anchors import image_size_pair
from cnnjax.detection.ground_truth import check_ground_truth
from cnnjax.detection.postprocess import (
    Detections,
    batched_nms,
    check_detection_settings,
    has_min_size,
)
from cnnjax.detection.yolo import (
    YoloV1LossTerms,
    check_yolo_v1_loss_settings,
    yolo_v1_loss_terms,
    yolo_v1_targets,
)
from cnnjax.layers.batch_norm import BatchNorm
from cnnjax.layers.conv import Conv2D
from cnnjax.layers.dense import Dense
from cnnjax.layers.pooling import max_pool2d
from cnnjax.models.registry import check_call, check_train, register_model
from cnnjax.models.vgg import check_dropout_rate, flatten
from cnnjax.utils.validation import (
    check_bool,
    check_number,
    check_positive_int,
    invalid,
    is_integer,
)

Array = Any

_PAPER = "Redmon et al. 2016, You Only Look Once: Unified, Real-Time Object Detection (CVPR)"

MAX_POOL = "M"

#: The paper's 24 convolutions (features, kernel, stride) and 2x2/2 max pools ("M"), Fig. 3.
YOLO_V1_LAYERS: tuple[Any, ...] = (
    (64, 7, 2), MAX_POOL,
    (192, 3, 1), MAX_POOL,
    (128, 1, 1), (256, 3, 1), (256, 1, 1), (512, 3, 1), MAX_POOL,
    *((256, 1, 1), (512, 3, 1)) * 4, (512, 1, 1), (1024, 3, 1), MAX_POOL,
    *((512, 1, 1), (1024, 3, 1)) * 2, (1024, 3, 1), (1024, 3, 2),
    (1024, 3, 1), (1024, 3, 1),
)

#: The small variant for 64x64 inputs: 64 -> 8x8x128 before the fcs.
YOLO_V1_SMALL_LAYERS: tuple[Any, ...] = (
    (16, 3, 1), MAX_POOL, (32, 3, 1), MAX_POOL, (64, 3, 1), MAX_POOL,
    (128, 3, 1), (64, 1, 1), (128, 3, 1),
)


def _check_layers(owner: str, layers: Any) -> None:
    def is_conv(layer: Any) -> bool:
        return (isinstance(layer, tuple | list) and len(layer) == 3
                and all(is_integer(v) and v > 0 for v in layer))

    try:
        ok = len(layers) > 0 and all(layer == MAX_POOL or is_conv(layer) for layer in layers)
    except TypeError:
        ok = False
    if not ok:
        raise invalid(owner, "layers", layers,
                      f"expected a non-empty sequence of (features, kernel, stride) triples of "
                      f"positive ints and {MAX_POOL!r} (2x2/2 max pool)")


class YOLOv1(nn.Module):
    """YOLO v1: conv trunk (`layers`), fc `hidden_features`, linear `head` to the S x S grid.

    Attributes:
      layers: the trunk, `(features, kernel, stride)` convolutions and `"M"` max pools.
      num_classes: `C`, the object classes (no background class).
      grid_size: `S`, cells per side.
      boxes_per_cell: `B`, predictors per cell.
      hidden_features: width of the first fc (paper: 4096).
      dropout_rate: after the first fc (paper: 0.5), only when `train=True`.
      batch_norm: BatchNorm after every convolution (YOLO v2's addition; off in the paper).
      negative_slope: of the leaky ReLUs (paper: 0.1).
      lambda_coord, lambda_noobj, confidence_target: `yolo_v1_loss`'s (paper: 5, 0.5, "iou").
      score_threshold, nms_iou, max_detections: `detect`'s filtering (scores `<=` the threshold
        dropped; per-class NMS at IoU `nms_iou`; at most `max_detections` per image).
      dtype: computation dtype (params float32); outputs are float32.
      axis_name: passed to every BatchNorm for cross-device statistics.
    """

    layers: Sequence[Any] = YOLO_V1_LAYERS
    num_classes: int = 20
    grid_size: int = 7
    boxes_per_cell: int = 2
    hidden_features: int = 4096
    dropout_rate: float = 0.5
    batch_norm: bool = False
    negative_slope: float = 0.1
    lambda_coord: float = 5.0
    lambda_noobj: float = 0.5
    confidence_target: str = "iou"
    score_threshold: float = 0.005
    nms_iou: float = 0.5
    max_detections: int = 100
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_layers(owner, self.layers)
        for arg in ("num_classes", "grid_size", "boxes_per_cell", "hidden_features"):
            check_positive_int(owner, arg, getattr(self, arg))
        check_dropout_rate(owner, self.dropout_rate)
        check_number(owner, "negative_slope", self.negative_slope, "expected a number in [0, 1]",
                     low=0.0, high=1.0, strings=False)
        check_detection_settings(owner, self)
        # The loss checks these again when traced; checking here makes a bad setting fail at
        # create_model / config validation instead of inside the first compiled train step.
        check_yolo_v1_loss_settings(owner, self.lambda_coord, self.lambda_noobj,
                                    self.confidence_target)
        check_bool(owner, "batch_norm", self.batch_norm)
        super().__post_init__()

    @property
    def cell_outputs(self) -> int:
        """`B * 5 + C`, the last axis of the output."""
        return self.boxes_per_cell * 5 + self.num_classes

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False) -> Any:
        """Predictions `[N, S, S, B * 5 + C]` (float32) of NHWC images `x`; with `return_features`
        `(out, features)`, the features `trunk` and `pre_logits`."""
        train = check_call(self, x, train, return_features, dropout_rate=self.dropout_rate)
        x = jnp.asarray(x, self.dtype)
        features: dict[str, Array] = {}
        index = 0
        for layer in self.layers:
            if layer == MAX_POOL:
                x = max_pool2d(x, 2, 2)
                continue
            index += 1
            width, kernel, stride = layer
            # darknet's pad=1: kernel // 2 on every side (SAME pads unevenly at stride 2)
            x = Conv2D(width, kernel, strides=stride, padding=kernel // 2,
                       use_bias=not self.batch_norm, dtype=self.dtype, name=f"conv{index}")(x)
            if self.batch_norm:
                x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                              dtype=self.dtype, axis_name=self.axis_name, name=f"bn{index}")(x)
            x = nn.leaky_relu(x, self.negative_slope)
        features["trunk"] = x
        x = flatten(x)
        x = Dense(self.hidden_features, dtype=self.dtype, name="fc1")(x)
        x = nn.leaky_relu(x, self.negative_slope)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        features["pre_logits"] = x
        s = self.grid_size
        x = Dense(s * s * self.cell_outputs, dtype=self.dtype, name="head")(x)
        out = x.reshape(x.shape[0], s, s, self.cell_outputs).astype(jnp.float32)
        return (out, features) if return_features else out

    def loss(self, images: Array, gt_boxes: Array, gt_labels: Array, gt_valid: Array,
             train: bool = True) -> tuple[Array, dict[str, Array]]:
        """Eq. 3 per image, averaged over the batch: `(loss, terms)`, `terms` holding `loss` and
        the five sums of `yolo_v1_loss_terms` (`coord_xy`, `coord_wh`, `object`, ...).

        `gt_boxes` `[N, G, 4]` `(x1, y1, x2, y2)` pixels of `images`, `gt_labels` `[N, G]` in
        `[0, C)`, `gt_valid` `[N, G]` bool.
        """
        train = check_train(self, train, dropout_rate=self.dropout_rate)
        check_ground_truth(f"{type(self).__name__}.loss", images, gt_boxes, gt_labels, gt_valid,
                           self.num_classes)
        outputs = self(images, train=train)
        size = tuple(images.shape[1:3])

        def one(pred: Array, boxes: Array, labels: Array, valid: Array) -> YoloV1LossTerms:
            targets = yolo_v1_targets(boxes, labels, valid, size, self.grid_size,
                                      self.num_classes)
            return yolo_v1_loss_terms(pred, targets, self.lambda_coord, self.lambda_noobj,
                                      self.confidence_target, self.boxes_per_cell)

        per_image = jax.vmap(one)(outputs, gt_boxes, gt_labels, gt_valid)
        terms = {name: jnp.mean(value) for name, value in per_image._asdict().items()}
        loss = sum(terms.values())
        return loss, {"loss": loss, **terms}

    def detect(self, images: Array) -> Detections:
        """Boxes, scores, classes and validity `[N, max_detections, ...]` (eval mode)."""
        outputs = self(images, train=False)
        return jax.vmap(lambda out: decode_yolo_v1(
            out, images.shape[1:3], self.boxes_per_cell, self.score_threshold, self.nms_iou,
            self.max_detections))(outputs)


def decode_yolo_v1(
    output: Array, image_size: tuple[int, int], boxes_per_cell: int, score_threshold: float,
    nms_iou: float, max_detections: int,
) -> Detections:
    """One image's `[S, S, B * 5 + C]` output as `Detections` (see the module docstring).

    A predictor's box is centred at `((col + x) / S, (row + y) / S)` of the image with size
    `(sqrt_w**2, sqrt_h**2)` image widths/heights, clipped to the image; every (predictor, class
    `c`) pair is a candidate scored `confidence * P(c)` (so a runner-up class is still found),
    boxes under `MIN_BOX_SIZE` dropped, then per-class NMS. `image_size` may be a traced `[2]`
    array (per-image sizes under `vmap`).
    """
    owner = "decode_yolo_v1"
    output = jnp.asarray(output)
    count = check_positive_int(owner, "boxes_per_cell", boxes_per_cell)
    if output.ndim != 3 or output.shape[2] <= 5 * count:
        raise invalid(owner, "output.shape", tuple(output.shape),
                      f"expected [S, S, B * 5 + C] with B = boxes_per_cell = {count} and C >= 1")
    dtype = output.dtype if jnp.issubdtype(output.dtype, jnp.floating) else jnp.float32
    output = output.astype(dtype)
    height, width = (jnp.asarray(v, dtype) for v in image_size_pair(owner, image_size))
    rows, cols, _ = output.shape
    boxes = output[..., :5 * count].reshape(rows, cols, count, 5)
    col = jnp.arange(cols, dtype=dtype)[None, :, None]
    row = jnp.arange(rows, dtype=dtype)[:, None, None]
    cx = (col + boxes[..., 0]) / cols * width
    cy = (row + boxes[..., 1]) / rows * height
    w = boxes[..., 2] ** 2 * width
    h = boxes[..., 3] ** 2 * height
    corners = jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
    corners = jnp.clip(corners, 0.0, jnp.stack([width, height, width, height]))  # [S, S, B, 4]
    class_scores = boxes[..., 4:5] * output[..., None, 5 * count:]  # [S, S, B, C]
    class_scores = jnp.where(has_min_size(corners)[..., None], class_scores, 0.0)
    classes = jnp.broadcast_to(jnp.arange(class_scores.shape[-1], dtype=jnp.int32),
                               class_scores.shape)
    candidates = jnp.broadcast_to(corners[..., None, :], (*class_scores.shape, 4))
    return batched_nms(candidates.reshape(-1, 4), class_scores.reshape(-1), classes.reshape(-1),
                       nms_iou, max_detections, score_threshold)


@register_model("yolo_v1", input_shape=(448, 448, 3), min_input_size=31, num_classes=20,
                paper=_PAPER, task="detection")
def yolo_v1(**kwargs: Any) -> YOLOv1:
    """The paper's network: 24 convolutions + 2 fcs, 448x448 input, S=7, B=2, 20 VOC classes."""
    return YOLOv1(**kwargs)


@register_model("yolo_v1_small", input_shape=(64, 64, 3), min_input_size=8, num_classes=4,
                paper=_PAPER, task="detection")
def yolo_v1_small(**kwargs: Any) -> YOLOv1:
    """A 6-convolution YOLO v1 with BatchNorm for 64x64 `shapes_multi` images (8x8 grid)."""
    kwargs = {"layers": YOLO_V1_SMALL_LAYERS, "grid_size": 8, "hidden_features": 512,
              "dropout_rate": 0.0, "batch_norm": True, **kwargs}
    return YOLOv1(**kwargs)

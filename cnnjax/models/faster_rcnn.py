"""Faster R-CNN (Ren et al., NeurIPS 2015): a Region Proposal Network and a Fast R-CNN box head
sharing one convolutional feature map, trained jointly (approximate joint training).

Pipeline, all fixed shapes (padding + validity masks), built from `cnnjax.detection`:

- backbone: `VGGFeatures` (the paper's VGG trunk design, here with BatchNorm and a few blocks),
  the last block's map at stride `2**len(backbone_stages)`;
- RPN (sec. 3.1): 3x3 conv + ReLU, then per anchor an objectness logit and `(tx, ty, tw, th)`
  deltas (1x1 convs; one logit per anchor with a sigmoid, as torchvision, instead of the
  paper's 2-way softmax); anchors from `generate_anchors(stride, anchor_ratios, anchor_scales)`
  on the feature grid;
- proposals: `rpn_proposals` (decode, clip, min size, top-n, NMS at 0.7, top-n), no gradient;
- box head (Fast R-CNN): `roi_align` of each RoI to `roi_size x roi_size`, two fcs + ReLU,
  then `C + 1` class logits (0 = background) and class-specific deltas `4 (C + 1)`.

Training (`loss`): the RPN loss (anchors labelled by `label_anchors` at IoU 0.7 / 0.3 with
forced best anchors, 256 sampled half positive by `sample_balanced`; sigmoid cross-entropy plus
smooth L1 (beta 1/9) summed over positives, both averaged over the sampled anchors) plus the
Fast R-CNN loss (`sample_rois`: 25% foreground at IoU >= 0.5, background at IoU in [0, 0.5)
as py-faster-rcnn's end-to-end setting and torchvision, gt boxes appended; `fast_rcnn_loss`).
Inference (`detect`): class probabilities times class-specific decoded boxes of every proposal,
clipped, per-class NMS at 0.5 to `max_detections`.

`num_classes` counts object classes (as YOLO's; `gt_labels` in `[0, C)`), the head adds the
background class. Random sampling draws from the `sample` RNG stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax.detection.anchors import (
    anchor_grid,
    anchors_inside,
    check_anchor_settings,
    generate_anchors,
)
from cnnjax.detection.box_coding import clip_boxes, decode_boxes, encode_boxes
from cnnjax.detection.ground_truth import check_ground_truth
from cnnjax.detection.losses import masked_mean, smooth_l1
from cnnjax.detection.matching import POSITIVE, label_anchors, sample_balanced
from cnnjax.detection.postprocess import (
    Detections,
    batched_nms,
    check_detection_settings,
    has_min_size,
)
from cnnjax.detection.proposals import check_min_size_fits, rpn_proposals
from cnnjax.detection.roi_targets import fast_rcnn_loss, sample_rois
from cnnjax.layers.conv import Conv2D
from cnnjax.layers.dense import Dense
from cnnjax.layers.roi import check_sample_positions, check_valid_boxes, roi_align
from cnnjax.models.registry import check_call, check_images, check_train, register_model
from cnnjax.models.vgg import VGGFeatures, check_stages
from cnnjax.utils.validation import (
    check_bool_array,
    check_number,
    check_positive_int,
    invalid,
)

Array = Any

_PAPER = ("Ren et al. 2015, Faster R-CNN: Towards Real-Time Object Detection with Region "
          "Proposal Networks (NeurIPS)")

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the box head's target scaling (Detectron, torchvision)


class RpnOutputs(NamedTuple):
    """The RPN's raw outputs for a batch, anchors in the order of the rows."""

    features: jax.Array  # [N, h, w, C] the backbone map
    objectness: jax.Array  # [N, h * w * A] logits
    deltas: jax.Array  # [N, h * w * A, 4]
    anchors: jax.Array  # [h * w * A, 4]


class BoxHead(nn.Module):
    """Fast R-CNN's head on pooled RoIs `[R, h, w, C]`: fc6, fc7 (+ ReLU), then class logits
    `[R, C + 1]` (0 = background) and class-specific deltas `[R, C + 1, 4]` (float32); with
    `return_fc7` also the fc7 activations `[R, features]` (R-CNN's SVM features)."""

    num_classes: int
    features: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled: Array, return_fc7: bool = False) -> tuple[Array, ...]:
        """`(logits [R, C + 1], deltas [R, C + 1, 4])` of pooled RoIs `[R, h, w, C]`, and fc7
        `[R, features]` after them with `return_fc7`."""
        x = pooled.reshape(pooled.shape[0], math.prod(pooled.shape[1:]))  # R may be 0
        x = nn.relu(Dense(self.features, dtype=self.dtype, name="fc6")(x))
        x = nn.relu(Dense(self.features, dtype=self.dtype, name="fc7")(x))
        logits = Dense(self.num_classes + 1, dtype=self.dtype,
                       kernel_init=nn.initializers.normal(0.01), name="class_logits")(x)
        deltas = Dense(4 * (self.num_classes + 1), dtype=self.dtype,
                       kernel_init=nn.initializers.normal(0.001), name="box_deltas")(x)
        out = (logits.astype(jnp.float32), deltas.astype(jnp.float32).reshape(
            x.shape[0], self.num_classes + 1, 4))
        return (*out, x.astype(jnp.float32)) if return_fc7 else out


def pool_rois(features: Array, rois: Array, output_size: int, spatial_scale: float,
              sample_positions: str = "torchvision") -> Array:
    """`roi_align` (2x2 samples per bin) of RoIs `[N, R, 4]` on their images: `[N * R, ...]`."""
    n, r = rois.shape[:2]
    batch_indices = jnp.repeat(jnp.arange(n, dtype=jnp.int32), r)
    return roi_align(features, rois.reshape(n * r, 4), batch_indices, output_size,
                     spatial_scale=spatial_scale, sampling_ratio=2,
                     sample_positions=sample_positions)


def sample_training_rois(key: Array, proposals: Array, proposals_valid: Array, gt_boxes: Array,
                         gt_labels: Array, gt_valid: Array, num_samples: int) -> Any:
    """`sample_rois` of every image (25% foreground at IoU >= 0.5, background at IoU in
    `[0, 0.5)`: `bg_thresh_lo=0.0`, not the Fast R-CNN paper's 0.1; gt appended), gt classes
    shifted to `1..C`."""
    keys = jax.random.split(key, gt_boxes.shape[0])
    return jax.vmap(lambda k, p, v, b, c, g: sample_rois(
        k, p, v, b, c, g, num_samples=num_samples, fg_fraction=0.25, box_weights=BOX_WEIGHTS))(
            keys, proposals, proposals_valid, gt_boxes, gt_labels.astype(jnp.int32) + 1, gt_valid)


def sample_key(module: nn.Module, owner: str, sampled: str) -> Array:
    """The module's 'sample' PRNG key (the loss's random `sampled`, e.g. "RoIs"), else a
    ValueError naming `owner` and how to pass one: flax's InvalidRngError named neither."""
    if not module.has_rng("sample"):
        raise ValueError(f"{owner}: the loss samples {sampled} at random, which needs a "
                         "'sample' PRNG key: pass rngs={'sample': key} to apply.")
    return module.make_rng("sample")


def check_anchors_fit(
    owner: str, image_size: tuple[int, int], stride: int, ratios: Sequence[float],
    scales: Sequence[float],
) -> None:
    """Raises unless some anchor of the stride-`stride` map lies inside the `(height, width)`
    image: the RPN trains on those alone (`anchors_inside`, no border), so with none its losses
    would be 0 forever. Static shapes only, so it runs before anything compiles."""
    height, width = image_size
    base = generate_anchors(stride, ratios, scales)  # [A, 4], float64 NumPy
    # VGGFeatures' 2x2/s2 pools round down: the map is (height // stride, width // stride).
    xs = np.arange(width // stride)[:, None] * stride
    ys = np.arange(height // stride)[:, None] * stride
    fits_x = np.any((base[:, 0] + xs >= 0) & (base[:, 2] + xs <= width), axis=0)
    fits_y = np.any((base[:, 1] + ys >= 0) & (base[:, 3] + ys <= height), axis=0)
    if not np.any(fits_x & fits_y):
        raise invalid(owner, "anchor_scales", tuple(scales),
                      f"no anchor (anchor_ratios={tuple(ratios)}, stride {stride}) lies inside "
                      f"the {height}x{width} image, and the RPN trains only on anchors inside "
                      "it, so its losses would stay 0; expected smaller anchor_scales or larger "
                      "images")


def rpn_loss(
    key: Array, objectness: Array, deltas: Array, anchors: Array, gt_boxes: Array,
    gt_valid: Array, anchor_valid: Array, batch_size: int = 256,
) -> tuple[Array, Array]:
    """The RPN loss of one image: `(objectness, box)` terms.

    Anchors are labelled by `label_anchors` (IoU >= 0.7 positive, < 0.3 negative, each gt's best
    anchors forced positive, `anchor_valid` ones only) and `batch_size` of them sampled, at most
    half positive (`sample_balanced` with `key`). Objectness: sigmoid cross-entropy averaged over
    the sampled anchors. Box: smooth L1 (beta 1/9, py-faster-rcnn's sigma 3) of the positives'
    deltas against `encode_boxes(matched gt, anchor)`, summed over coordinates and positives and
    divided by the number sampled (torchvision's normalization). `G` may be 0 (no object).
    """
    owner = "rpn_loss"
    count = jnp.shape(anchors)[0]
    for arg, value, shape in (("objectness", objectness, (count,)),
                              ("deltas", deltas, (count, 4))):
        if tuple(jnp.shape(value)) != shape:
            raise invalid(owner, f"{arg}.shape", tuple(jnp.shape(value)),
                          f"expected {shape}, one row per anchor (anchors.shape[0]={count})")
    if jnp.shape(gt_boxes)[0] == 0:  # one invalid row keeps the matched-gt gather defined
        gt_boxes, gt_valid = jnp.zeros((1, 4), jnp.float32), jnp.zeros(1, bool)
    labels = label_anchors(anchors, gt_boxes, gt_valid, 0.7, 0.3, anchor_valid=anchor_valid)
    positive, negative = sample_balanced(key, labels.labels, batch_size, 0.5)
    sampled = positive | negative
    target = (labels.labels == POSITIVE).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(objectness, target)
    matched = jnp.where(positive[:, None], gt_boxes[labels.matched_gt], anchors)
    regression = smooth_l1(deltas, encode_boxes(matched, anchors), beta=1.0 / 9)
    box = jnp.where(positive[:, None], regression, 0.0)
    return masked_mean(bce, sampled), masked_mean(box, sampled)


def head_loss(logits: Array, deltas: Array, targets: Any) -> dict[str, Array]:
    """`fast_rcnn_loss` per image `[N, S, ...]`, averaged: `{"classification", "box"}`."""
    losses = jax.vmap(fast_rcnn_loss)(logits, deltas, targets)
    return {"classification": jnp.mean(losses.classification), "box": jnp.mean(losses.box)}


def _check_head_outputs(owner: str, logits: Array, deltas: Array, proposals: Array,
                        valid: Array) -> None:
    """Raises unless `logits` `[N, P, C + 1]` (C >= 1), `deltas` `[N, P, C + 1, 4]`,
    `proposals` `[N, P, 4]` and bool `valid` `[N, P]` agree; valid concrete proposals must be
    finite with x1 <= x2 and y1 <= y2 (a mismatched batch was broadcast silently)."""
    shape = tuple(jnp.shape(logits))
    if len(shape) != 3 or shape[2] < 2:
        raise invalid(owner, "logits.shape", shape,
                      "expected [N, P, C + 1] with C >= 1 (class 0 is background)")
    for arg, value, want in (("deltas", deltas, (*shape, 4)), ("proposals", proposals,
                             (*shape[:2], 4)), ("valid", valid, shape[:2])):
        if tuple(jnp.shape(value)) != want:
            raise invalid(owner, f"{arg}.shape", tuple(jnp.shape(value)),
                          f"expected {want} for logits of shape {shape}")
    check_bool_array(owner, "valid", valid)
    check_valid_boxes(owner, "proposals", proposals, valid)


def detect_from_head(
    logits: Array, deltas: Array, proposals: Array, valid: Array, image_size: tuple[int, int],
    score_threshold: float, nms_iou: float, max_detections: int,
) -> Detections:
    """Class probability times class-specific decoded box of each proposal `[N, P, 4]` (valid
    `[N, P]`), clipped, boxes narrower or lower than `MIN_BOX_SIZE` dropped (a box moved off the
    image clips to zero width: a sure false positive; torchvision's `remove_small_boxes`),
    per-class NMS to `max_detections` per image (R-CNN family inference; torchvision's
    `RoIHeads.postprocess_detections`). Rows not `valid` (and their logits and deltas) may hold
    anything, even inf/NaN: they score 0 with a zero box, so they never change the detections."""
    owner = "detect_from_head"
    _check_head_outputs(owner, logits, deltas, proposals, valid)
    check_number(owner, "score_threshold", score_threshold, "expected a number in [0, 1)",
                 low=0.0, high=1.0, high_open=True)
    check_number(owner, "nms_iou", nms_iou, "expected a number in [0, 1]", low=0.0, high=1.0)
    check_positive_int(owner, "max_detections", max_detections)
    classes = logits.shape[-1] - 1
    probs = jax.nn.softmax(logits, axis=-1)[..., 1:]  # [N, P, C]
    proposals = jnp.where(valid[..., None], proposals, 0.0)
    boxes = decode_boxes(deltas[:, :, 1:], proposals[:, :, None, :], BOX_WEIGHTS)
    boxes = jnp.where(valid[..., None, None], clip_boxes(boxes, image_size), 0.0)  # [N, P, C, 4]
    scores = jnp.where(valid[..., None] & has_min_size(boxes), probs, 0.0)
    labels = jnp.broadcast_to(jnp.arange(classes, dtype=jnp.int32), scores.shape)
    return jax.vmap(lambda b, s, c: batched_nms(
        b.reshape(-1, 4), s.reshape(-1), c.reshape(-1), nms_iou, max_detections,
        score_threshold))(boxes, scores, labels)


class FasterRCNN(nn.Module):
    """Faster R-CNN with a `VGGFeatures` backbone (see the module docstring).

    Attributes:
      num_classes: object classes `C` (the box head has `C + 1` outputs).
      backbone_stages: `VGGFeatures` stages; each halves the resolution.
      anchor_scales, anchor_ratios: `generate_anchors(base_size=stride, ratios, scales)`; anchor
        sides are about `stride * scale` pixels (paper: stride 16, scales 8/16/32 = 128-512 px).
      rpn_channels: width of the RPN's 3x3 conv (paper: 512 for VGG-16).
      rpn_pre_nms_train, rpn_post_nms_train, rpn_pre_nms_test, rpn_post_nms_test: proposal
        counts before/after NMS (paper: 12000/2000 training, 6000/300 test).
      rpn_batch_size: anchors sampled per image (256), half positive at most.
      rpn_min_size: proposals narrower or lower than this are dropped (pixels).
      roi_samples: RoIs sampled per image for the box head (paper: 128), 25% foreground.
      roi_size: `roi_align` output side (paper: 7 for VGG-16's 7x7 pool5).
      roi_sample_positions: `roi_align`'s `sample_positions`: "torchvision" (on CPU through a
        host callback, bitwise torchvision's) or "kernel" (no callback, so `jax.export` can
        serialize the detector; ulp-level differences at the map's edges).
      head_features: width of the two fcs of the box head (paper: 4096).
      score_threshold, nms_iou, max_detections: `detect`'s filtering.
      dtype: computation dtype (params float32); axis_name: BatchNorm's cross-device axis.
    """

    num_classes: int = 20
    backbone_stages: Sequence[Sequence[int]] = ((32,), (64,), (128, 128))
    anchor_scales: Sequence[float] = (1.5, 3.0)
    anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    rpn_channels: int = 128
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 64
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 64
    rpn_batch_size: int = 256
    rpn_min_size: float = 2.0
    roi_samples: int = 64
    roi_size: int = 4
    roi_sample_positions: str = "torchvision"
    head_features: int = 256
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for arg in ("num_classes", "rpn_channels", "rpn_pre_nms_train", "rpn_post_nms_train",
                    "rpn_pre_nms_test", "rpn_post_nms_test", "rpn_batch_size", "roi_samples",
                    "roi_size", "head_features"):
            check_positive_int(owner, arg, getattr(self, arg))
        check_stages(owner, self.backbone_stages, "backbone_stages")
        check_detection_settings(owner, self)
        check_sample_positions(owner, "roi_sample_positions", self.roi_sample_positions)
        check_number(owner, "rpn_min_size", self.rpn_min_size, "expected a finite number >= 0",
                     low=0.0, high_open=True, strings=False)
        check_anchor_settings(owner, self.stride, self.anchor_ratios, self.anchor_scales,
                              ("backbone_stages", "anchor_ratios", "anchor_scales"))
        super().__post_init__()

    @property
    def stride(self) -> int:
        """The backbone's output stride."""
        return 2 ** len(self.backbone_stages)

    def setup(self) -> None:
        """The backbone, the RPN's 3x3 conv and 1x1 objectness and delta convs, and the box head."""
        self.backbone = VGGFeatures(stages=self.backbone_stages, batch_norm=True,
                                    dtype=self.dtype, axis_name=self.axis_name)
        anchors_per_cell = len(self.anchor_scales) * len(self.anchor_ratios)
        head_init = nn.initializers.normal(0.01)  # the paper's N(0, 0.01) for new layers
        # Conv2D, not nn.Conv: its bias gradient (a sum over every anchor position) is summed
        # in float32 under bfloat16; flax's stalls at 256 (cnnjax.layers.conv.add_bias).
        self.rpn_conv = Conv2D(self.rpn_channels, 3, padding="SAME", dtype=self.dtype,
                               kernel_init=head_init)
        self.rpn_objectness = Conv2D(anchors_per_cell, 1, dtype=self.dtype,
                                     kernel_init=head_init)
        self.rpn_deltas = Conv2D(4 * anchors_per_cell, 1, dtype=self.dtype,
                                 kernel_init=head_init)
        self.head = BoxHead(self.num_classes, self.head_features, dtype=self.dtype)

    # ------------------------------------------------------------------------------ stages
    def rpn(self, images: Array, train: bool) -> RpnOutputs:
        """Backbone and RPN head on a batch."""
        check_images(type(self).__name__, images)
        if min(images.shape[1:3]) < self.stride:  # else a max_pool2d error from the backbone
            raise invalid(type(self).__name__, "input.shape", tuple(images.shape),
                          f"expected height and width >= {self.stride} (the backbone's stride, "
                          f"2**len(backbone_stages))")
        check_min_size_fits(type(self).__name__, "rpn_min_size", self.rpn_min_size,
                            tuple(images.shape[1:3]))
        x = jnp.asarray(images, self.dtype)
        features = self.backbone(x, train)[f"block{len(self.backbone_stages)}"]
        n, h, w, _ = features.shape
        hidden = nn.relu(self.rpn_conv(features))
        rows = h * w * len(self.anchor_scales) * len(self.anchor_ratios)  # explicit: N may be 0
        objectness = self.rpn_objectness(hidden).reshape(n, rows).astype(jnp.float32)
        deltas = self.rpn_deltas(hidden).reshape(n, rows, 4).astype(jnp.float32)
        base = generate_anchors(self.stride, self.anchor_ratios, self.anchor_scales)
        return RpnOutputs(features, objectness, deltas, anchor_grid((h, w), self.stride, base))

    def proposals(self, rpn: RpnOutputs, image_size: tuple[int, int], train: bool) -> Any:
        """`rpn_proposals` of every image (no gradient), train or test counts."""
        pre = self.rpn_pre_nms_train if train else self.rpn_pre_nms_test
        post = self.rpn_post_nms_train if train else self.rpn_post_nms_test
        return jax.vmap(lambda o, d: rpn_proposals(
            o, d, rpn.anchors, image_size, pre_nms_top_n=pre, post_nms_top_n=post,
            nms_thresh=0.7, min_size=self.rpn_min_size))(
                jax.lax.stop_gradient(rpn.objectness), jax.lax.stop_gradient(rpn.deltas))

    def box_head(self, features: Array, rois: Array) -> tuple[Array, Array]:
        """Class logits `[N, R, C + 1]` and deltas `[N, R, C + 1, 4]` of RoIs `[N, R, 4]`."""
        n, r = rois.shape[:2]
        logits, deltas = self.head(pool_rois(features, rois, self.roi_size, 1.0 / self.stride,
                                                self.roi_sample_positions))
        return logits.reshape(n, r, *logits.shape[1:]), deltas.reshape(n, r, *deltas.shape[1:])

    # ----------------------------------------------------------------------------- methods
    def __call__(self, x: Array, train: bool = False, return_features: bool = False) -> Any:
        """Raw outputs: `(class_logits [N, R, C + 1], box_deltas [N, R, C + 1, 4], proposals)`
        on the test-time proposals (`return_features` adds `{"backbone": map}`)."""
        train = check_call(self, x, train, return_features)
        rpn = self.rpn(x, train)
        proposals = self.proposals(rpn, tuple(x.shape[1:3]), train=False)
        logits, deltas = self.box_head(rpn.features, proposals.boxes)
        out = (logits, deltas, proposals)
        return (out, {"backbone": rpn.features}) if return_features else out

    def loss(self, images: Array, gt_boxes: Array, gt_labels: Array, gt_valid: Array,
             train: bool = True) -> tuple[Array, dict[str, Array]]:
        """RPN + Fast R-CNN losses averaged over the images: `(loss, terms)`. Ground truth as
        `detection.ground_truth.check_ground_truth` has it (`G` may be 0: images without
        objects)."""
        train = check_train(self, train)
        owner = f"{type(self).__name__}.loss"
        check_ground_truth(owner, images, gt_boxes, gt_labels, gt_valid, self.num_classes)
        image_size = tuple(images.shape[1:3])
        self.check_training_size(image_size)
        rpn_key, roi_key = jax.random.split(sample_key(self, owner, "anchors and RoIs"))
        rpn = self.rpn(images, train)
        rpn_keys = jax.random.split(rpn_key, images.shape[0])
        inside = anchors_inside(rpn.anchors, image_size)

        rpn_cls, rpn_box = jax.vmap(lambda k, o, d, b, v: rpn_loss(
            k, o, d, rpn.anchors, b, v, inside, self.rpn_batch_size))(
                rpn_keys, rpn.objectness, rpn.deltas, gt_boxes, gt_valid)
        proposals = self.proposals(rpn, image_size, train=True)
        targets = sample_training_rois(roi_key, proposals.boxes, proposals.valid, gt_boxes,
                                       gt_labels, gt_valid, self.roi_samples)
        logits, deltas = self.box_head(rpn.features, targets.rois)
        terms = {"rpn_objectness": jnp.mean(rpn_cls), "rpn_box": jnp.mean(rpn_box),
                 **head_loss(logits, deltas, targets)}
        loss = sum(terms.values())
        return loss, {"loss": loss, **terms}

    def check_training_size(self, image_size: tuple[int, int]) -> None:
        """The static check `loss` makes of `(height, width)` images (`check_anchors_fit`),
        callable on the unbound model: the engine's `check_config` makes it before anything
        compiles (`checks.check_training_size`)."""
        check_anchors_fit(type(self).__name__, tuple(image_size), self.stride,
                          self.anchor_ratios, self.anchor_scales)

    def detect(self, images: Array) -> Detections:
        """Boxes, scores, classes and validity `[N, max_detections, ...]` (eval mode)."""
        logits, deltas, proposals = self(images, train=False)
        return detect_from_head(logits, deltas, proposals.boxes, proposals.valid,
                                tuple(images.shape[1:3]), self.score_threshold, self.nms_iou,
                                self.max_detections)


@register_model("faster_rcnn_small", input_shape=(64, 64, 3), min_input_size=18, num_classes=4,
                paper=_PAPER, task="detection")
def faster_rcnn_small(**kwargs: Any) -> FasterRCNN:
    """Faster R-CNN for 64x64 `shapes_multi`: 4-conv VGG-style BatchNorm backbone at stride 8,
    6 anchors per cell (about 12 and 24 px, ratios 1:2, 1:1, 2:1), RoIAlign 4x4, fcs 256.
    18 px is the smallest square image with an anchor inside it (below, the RPN cannot train)."""
    return FasterRCNN(**kwargs)

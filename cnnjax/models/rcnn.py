"""R-CNN (Girshick et al., CVPR 2014), SPP-net (He et al., ECCV 2014) and Fast R-CNN (Girshick,
ICCV 2015) on external proposals.

All three classify and refine region proposals given from outside the network. The papers used
~2,000 selective-search regions per image: set `data.proposals.method="selective_search"` and the
input pipeline delivers each image's (`cnnjax.data.proposals`, passed as `proposals` /
`proposal_valid` to `loss` and `detect`). Without them the external proposals are dense
multi-scale square windows (`window_proposals`: every `proposal_sizes` side at a stride of
`proposal_stride` pixels), the same for every image.

- `FastRCNN`: one conv pass over the image (`VGGFeatures`), `roi_align` of every RoI on the
  shared map, `faster_rcnn.BoxHead` (fc6/fc7, `C + 1` class logits, class-specific deltas):
  Faster R-CNN's second stage without the RPN.
- `SPPNet`: the same shared map, but each RoI is max-pooled by a spatial pyramid
  (`roi_spatial_pyramid_pool`, levels `pyramid_levels`) instead of one RoI grid: the step between
  R-CNN and Fast R-CNN (whose RoI pooling is the one-level pyramid).
- `RCNN`: every region is cropped from the *image* and warped to `warp_size x warp_size`
  (`roi_align` on the image, bilinear, as the paper's affine warp; with `context_padding` p the
  box is first dilated so that p warped pixels of context surround it, the paper's p = 16 of
  227, zeros (the normalized mean) beyond the image as the paper's mean padding), and a
  separate small CNN classifies each warp: one forward pass per region, the cost Fast R-CNN
  removed. The engine fine-tunes it end to end with Fast R-CNN's softmax + smooth-L1 loss (the
  paper's step 1). The paper's second stage, per-class linear SVMs on fc7 features with
  hard-negative mining and a ridge box regressor on pool5 features, is trained afterwards on a
  finished run by `cnnjax.detection.rcnn_svm` (`python -m experiments.rcnn_svm`), which reads
  both feature sets from `RCNN.region_features`.

Training samples `roi_samples` RoIs per image from the valid proposals plus the ground truth
(`sample_rois` via `faster_rcnn.sample_training_rois`: 25% foreground at IoU >= 0.5) and
minimizes `fast_rcnn_loss`; inference scores every valid proposal and runs
`faster_rcnn.detect_from_head` (decode, clip, per-class NMS).

Background RoIs are drawn from IoU `[0, 0.5)` for all three models (`bg_thresh_lo=0.0`: the
setting of py-faster-rcnn's end-to-end Faster R-CNN config and of torchvision), whereas the Fast
R-CNN paper (sec. 2.3) and its code (`BG_THRESH_LO = 0.1`) use `[0.1, 0.5)`, "a heuristic for
hard example mining"; SPP-net here shares Fast R-CNN's sampling. The default stays 0.0 so that
trained runs reproduce; `sample_rois(..., bg_thresh_lo=0.1)` is the paper's rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cnnjax.detection.ground_truth import check_ground_truth
from cnnjax.detection.postprocess import Detections, check_detection_settings
from cnnjax.layers.pooling import check_pyramid_levels
from cnnjax.layers.roi import (
    check_sample_positions,
    check_valid_boxes,
    roi_align,
    roi_spatial_pyramid_pool,
)
from cnnjax.models.faster_rcnn import (
    BoxHead,
    detect_from_head,
    head_loss,
    pool_rois,
    sample_key,
    sample_training_rois,
)
from cnnjax.models.registry import check_call, check_images, check_train, register_model
from cnnjax.models.vgg import VGGFeatures, check_stages
from cnnjax.utils.validation import (
    check_bool_array,
    check_positive_int,
    check_positive_ints,
    invalid,
    is_integer,
    to_pair,
)

Array = Any

_RCNN_PAPER = ("Girshick et al. 2014, Rich feature hierarchies for accurate object detection and "
               "semantic segmentation (CVPR)")
_FAST_PAPER = "Girshick 2015, Fast R-CNN (ICCV)"
_SPP_PAPER = ("He et al. 2014, Spatial Pyramid Pooling in Deep Convolutional Networks for Visual "
              "Recognition (ECCV)")


def window_proposals(image_size: tuple[int, int], sizes: Sequence[int], stride: int) -> np.ndarray:
    """Square windows `[P, 4]` `(x1, y1, x2, y2)` of every side in `sizes`, placed every `stride`
    pixels inside a `(height, width)` image (the last position flush with the far edge)."""
    owner = "window_proposals"
    height, width = to_pair(owner, "image_size", image_size)
    stride = check_positive_int(owner, "stride", stride)
    try:
        items = () if isinstance(sizes, str) else tuple(sizes)
    except TypeError:
        items = ()
    if not items:
        raise invalid(owner, "sizes", sizes, "expected a non-empty sequence of positive ints "
                      "(window sides, px)")
    windows = []
    for i, size in enumerate(items):
        check_positive_int(owner, f"sizes[{i}]", size)
        if size > min(height, width):
            raise invalid(owner, "sizes", items,
                          f"expected sides <= {min(height, width)} (the image is {height}x{width})")
        ys = np.unique(np.append(np.arange(0, height - size + 1, stride), height - size))
        xs = np.unique(np.append(np.arange(0, width - size + 1, stride), width - size))
        y, x = np.meshgrid(ys, xs, indexing="ij")
        corners = np.stack([x, y, x + size, y + size], axis=-1).reshape(-1, 4)
        windows.append(corners)
    return np.concatenate(windows).astype(np.float32)


def _check_common(module: Any) -> None:
    """The hyperparameter checks R-CNN and Fast R-CNN share (a function: flax wraps methods,
    and these run in `__post_init__`, before the module is bound)."""
    owner = type(module).__name__
    for arg in ("num_classes", "proposal_stride", "roi_samples"):
        check_positive_int(owner, arg, getattr(module, arg))
    check_positive_ints(owner, "proposal_sizes", module.proposal_sizes,
                        "expected a non-empty sequence of positive ints (window sides, px)")
    check_detection_settings(owner, module)


class RegionFeatures(NamedTuple):
    """`RCNN.region_features` of `R` regions in each of `N` images (float32)."""

    pool5: Array  # [N, R, h * w * C] the CNN's last block, flattened
    fc7: Array  # [N, R, F] the head's second fc after ReLU
    logits: Array  # [N, R, C + 1] as `score`
    deltas: Array  # [N, R, C + 1, 4] as `score`


class _ProposalDetector(nn.Module):
    """What R-CNN and Fast R-CNN share: external proposals, RoI sampling, loss and inference.

    Subclasses implement `score(images, rois [N, R, 4], train) -> (logits, deltas)`.
    """

    accepts_proposals: ClassVar[bool] = True  # `loss`/`detect` take the batch's proposals

    num_classes: int = 20
    proposal_sizes: Sequence[int] = (12, 18, 26)
    proposal_stride: int = 4
    roi_samples: int = 64
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def windows(self, images: Array, proposals: Array | None = None,
                proposal_valid: Array | None = None) -> tuple[Array, Array]:
        """The regions to classify, `(rois [N, P, 4], valid [N, P])`: the external `proposals`
        of each image when given (e.g. selective search from the input pipeline,
        `cnnjax.data.proposals`; rows not `proposal_valid` become zero boxes, whatever they
        held), else the dense windows, the same for every image."""
        owner = type(self).__name__
        check_images(owner, images)
        if proposals is None:
            largest = max(self.proposal_sizes)
            if min(images.shape[1:3]) < largest:
                # named as the setting, so the engine's size check names the field to change
                raise invalid(owner, "proposal_sizes", tuple(self.proposal_sizes),
                              f"expected sizes <= the images' height and width (input.shape="
                              f"{tuple(images.shape)}) for the dense windows (smaller "
                              "proposal_sizes or larger images), or external proposals")
            windows = window_proposals(tuple(images.shape[1:3]), self.proposal_sizes,
                                       self.proposal_stride)
            rois = jnp.broadcast_to(jnp.asarray(windows), (images.shape[0], *windows.shape))
            return rois, jnp.ones(rois.shape[:2], bool)
        if proposals.ndim != 3 or proposals.shape[0] != images.shape[0] or proposals.shape[2] != 4:
            raise invalid(owner, "proposals", f"array of shape {tuple(proposals.shape)}",
                          f"expected [{images.shape[0]}, P, 4] (x1, y1, x2, y2 per image)")
        given_valid = proposal_valid  # None: every row valid, checked concrete
        if proposal_valid is None:
            proposal_valid = jnp.ones(proposals.shape[:2], bool)
        if tuple(proposal_valid.shape) != tuple(proposals.shape[:2]):
            raise invalid(owner, "proposal_valid", f"array of shape {tuple(proposal_valid.shape)}",
                          f"expected {tuple(proposals.shape[:2])}, one flag per proposal")
        check_bool_array(owner, "proposal_valid", proposal_valid)
        # x1, y1 >= 0 too: else roi_align refuses them by its own name and flat index
        check_valid_boxes(owner, "proposals", proposals, given_valid, inside_image=True)
        valid = jnp.asarray(proposal_valid, bool)
        # Padded proposals may hold anything (even inf/NaN): zero them before any pooling.
        return jnp.where(valid[..., None], jnp.asarray(proposals, jnp.float32), 0.0), valid

    def score(self, images: Array, rois: Array, train: bool,
              valid: Array | None = None) -> tuple[Array, Array]:
        """`(logits [N, R, C + 1], deltas [N, R, C + 1, 4])` of `rois` `[N, R, 4]`; `valid`
        `[N, R]` (None: all) marks the real rows, for the statistics of a per-region
        BatchNorm (R-CNN's)."""
        raise NotImplementedError

    def __call__(self, x: Array, train: bool = False, return_features: bool = False,
                 proposals: Array | None = None, proposal_valid: Array | None = None) -> Any:
        """`(class_logits [N, P, C + 1], box_deltas [N, P, C + 1, 4], rois [N, P, 4])` of the
        external `proposals` (`windows`)."""
        train = check_call(self, x, train, return_features)
        rois, valid = self.windows(x, proposals, proposal_valid)
        logits, deltas = self.score(x, rois, train, valid)
        out = (logits, deltas, rois)
        return (out, {}) if return_features else out

    def loss(self, images: Array, gt_boxes: Array, gt_labels: Array, gt_valid: Array,
             train: bool = True, proposals: Array | None = None,
             proposal_valid: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """Fast R-CNN's loss on `roi_samples` RoIs per image: `(loss, terms)`. Ground truth as
        `detection.ground_truth.check_ground_truth` has it: `[N, G, 4]` boxes, `[N, G]` labels in
        `[0, num_classes)` and bool validity."""
        train = check_train(self, train)
        check_ground_truth(f"{type(self).__name__}.loss", images, gt_boxes, gt_labels, gt_valid,
                           self.num_classes)
        key = sample_key(self, f"{type(self).__name__}.loss", "RoIs")
        rois, valid = self.windows(images, proposals, proposal_valid)
        targets = sample_training_rois(key, rois, valid, gt_boxes, gt_labels, gt_valid,
                                       self.roi_samples)
        logits, deltas = self.score(images, targets.rois, train, targets.valid)
        terms = head_loss(logits, deltas, targets)
        loss = terms["classification"] + terms["box"]
        return loss, {"loss": loss, **terms}

    def detect(self, images: Array, proposals: Array | None = None,
               proposal_valid: Array | None = None) -> Detections:
        """Every valid proposal scored and refined, per-class NMS to `max_detections` per
        image."""
        rois, valid = self.windows(images, proposals, proposal_valid)
        logits, deltas = self.score(images, rois, train=False)
        return detect_from_head(logits, deltas, rois, valid, tuple(images.shape[1:3]),
                                self.score_threshold, self.nms_iou, self.max_detections)


class _SharedMapDetector(_ProposalDetector):
    """One conv pass per image (`VGGFeatures(backbone_stages)`), each RoI pooled from the shared
    map to a fixed size by `pool`, then `BoxHead`: what Fast R-CNN and SPP-net share."""

    backbone_stages: Sequence[Sequence[int]] = ((32,), (64,), (128, 128))
    head_features: int = 256

    def __post_init__(self) -> None:
        _check_common(self)
        check_stages(type(self).__name__, self.backbone_stages, "backbone_stages")
        check_positive_int(type(self).__name__, "head_features", self.head_features)
        super().__post_init__()

    def setup(self) -> None:
        self.backbone = VGGFeatures(stages=self.backbone_stages, batch_norm=True,
                                    dtype=self.dtype, axis_name=self.axis_name)
        self.head = BoxHead(self.num_classes, self.head_features, dtype=self.dtype)

    def pool(self, features: Array, rois: Array, spatial_scale: float) -> Array:
        """Fixed-size features `[N * R, ...]` of RoIs `[N, R, 4]` on the shared map."""
        raise NotImplementedError

    def score(self, images: Array, rois: Array, train: bool,
              valid: Array | None = None) -> tuple[Array, Array]:
        # `valid` is unused: the BatchNorm runs on the images, the per-RoI head has none.
        stride = 2 ** len(self.backbone_stages)
        if min(images.shape[1:3]) < stride:  # else a max_pool2d error from the backbone
            raise invalid(type(self).__name__, "input.shape", tuple(images.shape),
                          f"expected height and width >= {stride} (the backbone's stride, "
                          "2**len(backbone_stages))")
        features = self.backbone(jnp.asarray(images, self.dtype), train)[
            f"block{len(self.backbone_stages)}"]
        n, r = rois.shape[:2]
        logits, deltas = self.head(self.pool(features, rois, 1.0 / stride))
        return logits.reshape(n, r, *logits.shape[1:]), deltas.reshape(n, r, *deltas.shape[1:])


class FastRCNN(_SharedMapDetector):
    """Fast R-CNN: the shared map, RoIAlign of each RoI to `roi_size x roi_size`, `BoxHead`.
    `roi_sample_positions` is `roi_align`'s `sample_positions` ("kernel": exportable, see
    `FasterRCNN`)."""

    roi_size: int = 4
    roi_sample_positions: str = "torchvision"

    def __post_init__(self) -> None:
        check_positive_int(type(self).__name__, "roi_size", self.roi_size)
        check_sample_positions(type(self).__name__, "roi_sample_positions",
                               self.roi_sample_positions)
        super().__post_init__()

    def pool(self, features: Array, rois: Array, spatial_scale: float) -> Array:
        """RoIAlign of RoIs `[N, R, 4]` to `[N * R, roi_size, roi_size, C]`."""
        return pool_rois(features, rois, self.roi_size, spatial_scale, self.roi_sample_positions)


class SPPNet(_SharedMapDetector):
    """SPP-net detection (He et al., ECCV 2014): the shared map, each window max-pooled by a
    spatial pyramid (`roi_spatial_pyramid_pool`: `l x l` bins for every `l` in
    `pyramid_levels`) into one fixed-length vector, `BoxHead`. The paper pooled conv5 at levels
    (1, 2, 3, 6), fine-tuned only the fc layers and classified with SVMs; here the pyramid fits
    the 8x8 map of a 64x64 image and the whole network trains end to end with Fast R-CNN's loss.
    """

    pyramid_levels: Sequence[int] = (1, 2, 4)

    def __post_init__(self) -> None:
        try:
            check_pyramid_levels(type(self).__name__, self.pyramid_levels)
        except ValueError:  # it names its own argument, `levels`
            raise invalid(type(self).__name__, "pyramid_levels", self.pyramid_levels,
                          "expected a non-empty sequence of positive ints (the bins per side of "
                          "each level)") from None
        super().__post_init__()

    def pool(self, features: Array, rois: Array, spatial_scale: float) -> Array:
        """The spatial pyramid of each RoI `[N, R, 4]`: `[N * R, C * sum(l * l)]`."""
        n, r = rois.shape[:2]
        batch_indices = jnp.repeat(jnp.arange(n, dtype=jnp.int32), r)
        return roi_spatial_pyramid_pool(features, rois.reshape(n * r, 4), batch_indices,
                                        tuple(self.pyramid_levels), spatial_scale)


class RCNN(_ProposalDetector):
    """R-CNN: each region warped from the image to `warp_size` and classified by its own CNN
    pass (`VGGFeatures(cnn_stages)` then `BoxHead`). `region_features` exposes pool5 and fc7 for
    the paper's SVM + ridge stage (`cnnjax.detection.rcnn_svm`). `roi_sample_positions` is the
    warp's `roi_align` `sample_positions` ("kernel": exportable, see `FasterRCNN`)."""

    proposal_stride: int = 8
    roi_samples: int = 32  # each RoI costs a whole CNN pass
    warp_size: int = 24
    context_padding: int = 0  # warped pixels of context on each side (the paper: 16 of 227)
    cnn_stages: Sequence[Sequence[int]] = ((16,), (32,), (64,))
    head_features: int = 256
    roi_sample_positions: str = "torchvision"

    def __post_init__(self) -> None:
        _check_common(self)
        check_sample_positions(type(self).__name__, "roi_sample_positions",
                               self.roi_sample_positions)
        check_stages(type(self).__name__, self.cnn_stages, "cnn_stages")
        check_positive_int(type(self).__name__, "warp_size", self.warp_size)
        if self.warp_size < 2 ** len(self.cnn_stages):  # else a max_pool2d error when traced
            raise invalid(type(self).__name__, "warp_size", self.warp_size,
                          f"expected at least {2 ** len(self.cnn_stages)} = 2**len(cnn_stages) "
                          "(each stage of the CNN halves the warp)")
        padding = self.context_padding
        if not is_integer(padding) or not 0 <= 2 * padding < self.warp_size:
            raise invalid(type(self).__name__, "context_padding", padding,
                          f"expected an integer in [0, {(self.warp_size - 1) // 2}] (warped "
                          f"pixels per side, less than half of warp_size={self.warp_size})")
        check_positive_int(type(self).__name__, "head_features", self.head_features)
        super().__post_init__()

    def setup(self) -> None:
        """The per-region CNN (`cnn`) and the box head (`head`)."""
        self.cnn = VGGFeatures(stages=self.cnn_stages, batch_norm=True, dtype=self.dtype,
                               axis_name=self.axis_name)
        self.head = BoxHead(self.num_classes, self.head_features, dtype=self.dtype)

    def context_boxes(self, images: Array, rois: Array) -> tuple[Array, Array]:
        """`(images, rois)` with R-CNN's context: each box `[..., 4]` dilated about its centre
        by `warp / (warp - 2 p)`, so that after warping `p = context_padding` pixels of context
        surround it, and the images zero-padded (the normalized mean, as the paper's mean
        padding) far enough for any dilated in-image box, the boxes shifted to match."""
        if self.context_padding == 0:
            return images, rois
        scale = self.warp_size / (self.warp_size - 2 * self.context_padding)
        centre = (rois[..., :2] + rois[..., 2:]) / 2
        half = (rois[..., 2:] - rois[..., :2]) * (scale / 2)
        pad = math.ceil(max(images.shape[1:3]) * (scale - 1) / 2)
        images = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        return images, jnp.concatenate([centre - half, centre + half], axis=-1) + pad

    def warped_features(self, images: Array, rois: Array, train: bool,
                        valid: Array | None = None) -> Array:
        """The CNN's last block (the paper's pool5) of every RoI `[N, R, 4]` warped from its
        image (with `context_padding`): `[N * R, h, w, C]`. In training, the CNN's BatchNorm
        statistics come from the `valid` `[N, R]` rows alone (None: every row; none valid:
        every row too), not from `sample_rois`' padding rows (warps of a zero box)."""
        n, r = rois.shape[:2]
        if train and n * r == 0:  # the CNN would train its BatchNorm on a batch of no warps
            raise invalid(type(self).__name__, "train", True, "0 regions (proposals.shape="
                          f"{tuple(rois.shape)}) have nothing to train on (and BatchNorm's "
                          "statistics of no warps are NaN): pass train=False")
        batch_indices = jnp.repeat(jnp.arange(n, dtype=jnp.int32), r)
        images, boxes = self.context_boxes(jnp.asarray(images, jnp.float32), rois)
        warped = roi_align(images, boxes.reshape(n * r, 4), batch_indices, self.warp_size,
                           spatial_scale=1.0, sampling_ratio=2,
                           sample_positions=self.roi_sample_positions)
        # No valid row in the whole (synced) batch: every row, as without a mask.
        mask = None if valid is None else jnp.asarray(valid, bool).reshape(n * r)
        return self.cnn(warped.astype(self.dtype), train, mask)[
            f"block{len(self.cnn_stages)}"]

    def score(self, images: Array, rois: Array, train: bool,
              valid: Array | None = None) -> tuple[Array, Array]:
        """`(logits [N, R, C + 1], deltas [N, R, C + 1, 4])`, one CNN pass per warped RoI; in
        training only the `valid` rows feed the CNN's BatchNorm statistics."""
        n, r = rois.shape[:2]
        logits, deltas = self.head(self.warped_features(images, rois, train, valid))
        return logits.reshape(n, r, *logits.shape[1:]), deltas.reshape(n, r, *deltas.shape[1:])

    def region_features(self, images: Array, rois: Array) -> RegionFeatures:
        """Eval-mode features and head outputs of every RoI `[N, R, 4]` (one CNN pass each):
        flattened pool5, fc7 after its ReLU (the paper's SVM features), and the same logits and
        deltas `score` gives."""
        owner = f"{type(self).__name__}.region_features"
        check_images(owner, images)
        shape = tuple(jnp.shape(rois))
        if len(shape) != 3 or shape[0] != images.shape[0] or shape[2] != 4:
            raise invalid(owner, "rois.shape", shape,
                          f"expected ({images.shape[0]}, R, 4) (x1, y1, x2, y2) for "
                          f"{images.shape[0]} images")
        check_valid_boxes(owner, "rois", rois)
        n, r = rois.shape[:2]
        pool5 = self.warped_features(images, rois, train=False)
        logits, deltas, fc7 = self.head(pool5, return_fc7=True)
        return RegionFeatures(
            pool5=pool5.reshape(n, r, math.prod(pool5.shape[1:])).astype(jnp.float32),
            fc7=fc7.reshape(n, r, *fc7.shape[1:]), logits=logits.reshape(n, r, *logits.shape[1:]),
            deltas=deltas.reshape(n, r, *deltas.shape[1:]))


@register_model("fast_rcnn_small", input_shape=(64, 64, 3), min_input_size=26, num_classes=4,
                paper=_FAST_PAPER, task="detection")
def fast_rcnn_small(**kwargs: Any) -> FastRCNN:
    """Fast R-CNN on 12/18/26-px windows every 4 px (486 per 64x64 image), stride-8 backbone."""
    return FastRCNN(**kwargs)


@register_model("sppnet_small", input_shape=(64, 64, 3), min_input_size=26, num_classes=4,
                paper=_SPP_PAPER, task="detection")
def sppnet_small(**kwargs: Any) -> SPPNet:
    """SPP-net on Fast R-CNN's 486 windows and stride-8 backbone, 1+4+16-bin pyramid pooling."""
    return SPPNet(**kwargs)


@register_model("rcnn_small", input_shape=(64, 64, 3), min_input_size=26, num_classes=4,
                paper=_RCNN_PAPER, task="detection")
def rcnn_small(**kwargs: Any) -> RCNN:
    """R-CNN on 12/18/26-px windows every 8 px (149 per 64x64 image), 24x24 warps, 3-block CNN."""
    return RCNN(**kwargs)

"""The Faster R-CNN RPN proposal layer (Ren et al. 2015) for one image, with fixed output shapes.

Turns the RPN's per-anchor objectness logits and box deltas into at most `post_nms_top_n` region
proposals: decode the deltas against the anchors, clip to the image, drop boxes smaller than
`min_size`, keep the `pre_nms_top_n` highest-scoring, suppress overlaps with NMS, keep the first
`post_nms_top_n` survivors (py-faster-rcnn's `proposal_layer` order). Every shape is static: boxes
are masked instead of removed, and fewer survivors come back padded with a validity mask, so the
function runs under `jit` and `vmap` (per-image sizes as a `[2]` array).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.detection.anchors import check_anchor_sizes, image_size_pair
from cnnjax.detection.box_coding import (
    DEFAULT_SCALE_CLAMP,
    check_box_weights,
    check_scale_clamp,
    clip_boxes,
    decode_boxes,
    min_size_mask,
)
from cnnjax.layers.roi import nms
from cnnjax.utils.validation import check_number, check_positive_int, concrete_value, invalid


class Proposals(NamedTuple):
    """What `rpn_proposals` returns, `K = post_nms_top_n` rows in decreasing-score order."""

    boxes: jax.Array  # [K, 4] (x1, y1, x2, y2) clipped to the image; 0 where not valid
    scores: jax.Array  # [K] objectness probability sigmoid(logit); 0 where not valid
    valid: jax.Array  # [K] bool: a real proposal (False: padding)




def rpn_proposals(
    objectness: Any, deltas: Any, anchors: Any, image_size: Any, *,
    pre_nms_top_n: int = 6000, post_nms_top_n: int = 300, nms_thresh: float = 0.7,
    min_size: float = 16.0, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> Proposals:
    """Proposals of one image from `objectness` logits `[N]` and `deltas` `[N, 4]` over `anchors`
    `[N, 4]` (e.g. `anchor_grid`, in the order of the head's reshaped outputs; concrete anchors
    must have a positive finite width and height).

    Steps: `decode_boxes(deltas, anchors, weights, scale_clamp)`; `clip_boxes` to `image_size`
    `(height, width)`; mask out boxes under `min_size` pixels wide or high (`min_size_mask`);
    rank the remaining boxes by logit and keep the first `min(pre_nms_top_n, N)`; greedy NMS at
    IoU `nms_thresh` (`cnnjax.layers.roi.nms`: ties keep the lower index); keep the first
    `post_nms_top_n`. Defaults are the paper's test setting (py-faster-rcnn: 6000 / 300, IoU 0.7,
    `min_size` 16 pixels of the network input; py-faster-rcnn multiplies its 16 by the image's
    resize factor; torchvision's defaults are 1000 -> 1000 at test and 2000 -> 2000 in training,
    per FPN level, with `min_size=1e-3`). Unlike torchvision, which takes its top-n before
    removing small boxes, small boxes are dropped first (py-faster-rcnn), so up to
    `pre_nms_top_n` usable boxes reach NMS.

    Returns `Proposals(boxes [K, 4], scores [K], valid [K])` with `K = post_nms_top_n`, the
    survivors in decreasing-score order, padded with zeros (and `valid=False`) when fewer survive.
    No gradient is meant to flow through proposals (Faster R-CNN's approximate joint training):
    apply `jax.lax.stop_gradient` to the boxes before RoI pooling.
    """
    owner = "rpn_proposals"
    objectness = jnp.asarray(objectness)
    deltas = jnp.asarray(deltas)
    anchors = jnp.asarray(anchors)
    if anchors.ndim != 2 or anchors.shape[1] != 4:
        raise invalid(owner, "anchors.shape", tuple(anchors.shape),
                      "expected [N, 4] boxes as (x1, y1, x2, y2)")
    count = anchors.shape[0]
    if objectness.shape != (count,):
        raise invalid(owner, "objectness.shape", tuple(objectness.shape),
                      f"expected ({count},), one logit per anchor")
    if deltas.shape != (count, 4):
        raise invalid(owner, "deltas.shape", tuple(deltas.shape),
                      f"expected ({count}, 4), one (tx, ty, tw, th) per anchor")
    if count == 0:
        raise invalid(owner, "anchors.shape", tuple(anchors.shape), "expected at least one anchor")
    height, width = image_size_pair(owner, image_size)
    pre = check_positive_int(owner, "pre_nms_top_n", pre_nms_top_n)
    post = check_positive_int(owner, "post_nms_top_n", post_nms_top_n)
    thresh = check_number(owner, "nms_thresh", nms_thresh, "expected a number in [0, 1]",
                          low=0.0, high=1.0)
    size = check_number(owner, "min_size", min_size, "expected a finite number >= 0", low=0.0,
                        high_open=True)
    sides = concrete_value(image_size) if hasattr(image_size, "shape") else (height, width)
    if sides is not None:  # a traced size (per image, under vmap) is trusted
        check_min_size_fits(owner, "min_size", size, tuple(np.asarray(sides).tolist()))
    coder = check_box_weights(owner, "weights", weights)
    clamp = check_scale_clamp(owner, scale_clamp)
    # Concrete anchors (anchor_grid's) with x2 <= x1 would decode to no box or zero-size ones.
    check_anchor_sizes(owner, anchors)
    dtype = jnp.promote_types(jnp.result_type(objectness, deltas, anchors), jnp.float32)
    size_hw = jnp.stack([jnp.asarray(height, dtype), jnp.asarray(width, dtype)])
    return _proposals(objectness.astype(dtype), deltas.astype(dtype), anchors.astype(dtype),
                      size_hw, min(pre, count), post, thresh, size, coder, clamp)


def check_min_size_fits(owner: str, arg: str, min_size: float,
                        image_size: tuple[float, float]) -> None:
    """Raises unless `min_size` <= the `(height, width)` image's shorter side: proposals are
    clipped to the image, so a larger one would drop every proposal (silently, before)."""
    height, width = image_size
    if min_size > min(height, width):
        raise invalid(owner, arg, min_size,
                      f"expected at most {min(height, width)!r}, the shorter side of the "
                      f"{height!r}x{width!r} (height x width) image: proposals are clipped to the "
                      f"image, so every one would be dropped")


@partial(jax.jit, static_argnames=("pre", "post", "thresh", "min_size", "weights", "clamp"))
def _proposals(
    objectness: jax.Array, deltas: jax.Array, anchors: jax.Array, size_hw: jax.Array, pre: int,
    post: int, thresh: float, min_size: float, weights: tuple[float, ...], clamp: float,
) -> Proposals:
    """`rpn_proposals` after validation (`pre <= N`)."""
    boxes = clip_boxes(decode_boxes(deltas, anchors, weights, clamp), size_hw)
    keep = min_size_mask(boxes, min_size)
    # -0.0 as +0.0: top_k ranks +0.0 first, which broke "ties keep the lower index" (nms's rule)
    ranking = jnp.where(keep, jnp.where(objectness == 0, 0.0, objectness), -jnp.inf)
    top_scores, top = jax.lax.top_k(ranking, pre)  # masked boxes rank last
    top_boxes = boxes[top]
    # -inf (masked) never passes nms's default score_threshold of -inf, so it is never kept.
    indices, valid = nms(top_boxes, top_scores, thresh, post)
    out_boxes = jnp.where(valid[:, None], top_boxes[indices], 0.0)
    out_scores = jnp.where(valid, jax.nn.sigmoid(objectness[top[indices]]), 0.0)
    return Proposals(out_boxes, out_scores, valid)

"""Mean average precision of detections on the host (NumPy, float64): PASCAL VOC and COCO rules.

`DetectionEvaluator` collects a whole eval split batch by batch (fixed-size `Detections` with
validity masks and padded ground truth, padded examples masked out) and computes:

- `map50`: PASCAL VOC AP at IoU 0.5 with all-point interpolation (the VOC2010+ devkit's
  `voc_ap(use_07_metric=False)`: area under the precision envelope). A detection matches the
  ground-truth box it overlaps most if their IoU is `>= 0.5` (the devkit's `VOCevaldet.m`:
  `ovmax >= minoverlap`; py-faster-rcnn's `voc_eval.py` port uses `>`); if that box is already
  taken the detection is a false positive.
- `map50_voc07`: the same matches scored with VOC2007's 11-point interpolated AP (the VOC2007
  devkit's `VOCevaldet.m`, `voc_ap(use_07_metric=True)`; the metric of the VOC 2007 tables of
  R-CNN, Fast/Faster R-CNN and YOLO): the mean over recall thresholds t = 0, 0.1, ..., 1 of the
  highest precision at a recall >= t (0 where the recall never reaches t). The thresholds are
  exactly k / 10, so a recall of 3/10, 6/10 or 7/10 reaches its threshold (py-faster-rcnn's
  `np.arange(0., 1.1, 0.1)` puts those three an ulp above k / 10).
- `map`: COCO AP averaged over IoU 0.50:0.05:0.95 with 101-point interpolated precision
  (pycocotools' `COCOeval` bbox, area "all", `maxDets` per image): a detection matches the
  highest-IoU still unmatched box with IoU `>= t`. `coco_map50` / `coco_map75` are its
  single-threshold values (`COCOeval.stats[1]` / `stats[2]`).

Both average over the classes that have at least one ground-truth box (a class without any is
undefined, COCO's -1) and score 0 for a class with boxes but no detections. IoU is computed on
continuous `(x1, y1, x2, y2)` boxes (areas `w * h`, as pycocotools; the VOC devkit's `+1` pixel
convention is not used).

"Difficult" ground truth (PASCAL VOC's `is_difficult`, `gt_difficult` in `add`) neither counts as
an object to find nor punishes a detection of it: VOC ignores a detection whose best-overlapping
box (IoU >= 0.5) is difficult (the devkit's rule, before the already-taken check); COCO treats
difficult boxes as its ignore regions (pycocotools' `iscrowd` handling: matched only when no
regular box matches, any number of times, the detection then ignored), with the usual IoU.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from cnnjax.layers.roi import check_valid_boxes
from cnnjax.utils.validation import check_bool_array, check_positive_int, invalid

VOC_IOU = 0.5
COCO_IOUS = np.linspace(0.5, 0.95, 10)  # pycocotools' iouThrs
COCO_RECALLS = np.linspace(0.0, 1.0, 101)  # pycocotools' recThrs
VOC07_RECALLS = np.arange(11) / 10  # 0, 0.1, ..., 1: exactly k / 10


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU `[len(a), len(b)]` of float64 `(x1, y1, x2, y2)` boxes; 0 for empty unions."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0],
                                                                       b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1],
                                                                       b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP (VOC2010+): area under the monotone precision envelope."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _interpolated_ap(recall: np.ndarray, precision: np.ndarray, thresholds: np.ndarray) -> float:
    """The envelope's precision (the highest at this recall or beyond) at the first point of the
    non-decreasing `recall` reaching each of `thresholds` (0 where never reached), averaged."""
    if recall.size == 0:
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, thresholds, side="left")
    reached = index < recall.size
    return float(np.mean(np.where(reached, envelope[np.minimum(index, recall.size - 1)], 0.0)))


def coco_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """101-point interpolated AP (pycocotools' `accumulate`): the envelope's precision at the
    first point reaching each recall in 0, 0.01, ..., 1 (0 where never reached), averaged."""
    return _interpolated_ap(recall, precision, COCO_RECALLS)


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007's 11-point interpolated AP (`voc_ap(use_07_metric=True)`): the mean over recall
    thresholds t = 0, 0.1, ..., 1 of the highest precision at a recall >= t (0 if none)."""
    return _interpolated_ap(recall, precision, VOC07_RECALLS)


# A detection's outcome: a true positive, a false positive, or ignored (it found a difficult box).
TP, FP, IGNORED = 1, 0, -1


def _voc_matches(iou: np.ndarray, difficult: np.ndarray) -> np.ndarray:
    """Outcomes `[D]` (TP/FP/IGNORED) of score-sorted detections against one image's boxes of a
    class, `difficult [G]` (the VOC devkit's rule)."""
    taken = np.zeros(iou.shape[1], bool)
    hits = np.full(iou.shape[0], FP, np.int8)
    if iou.shape[1] == 0:
        return hits
    for d in range(iou.shape[0]):
        best = int(np.argmax(iou[d]))
        if iou[d, best] >= VOC_IOU:
            if difficult[best]:
                hits[d] = IGNORED
            elif not taken[best]:
                taken[best], hits[d] = True, TP
    return hits


def _coco_matches(iou: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """Outcomes `[T, D]` per COCO threshold (pycocotools' `evaluateImg` greedy rule, `ignore`
    boxes `[G]` as its crowd regions: tried after the regular ones, never used up)."""
    hits = np.full((len(COCO_IOUS), iou.shape[0]), FP, np.int8)
    order = np.argsort(ignore, kind="stable")  # regular boxes first, as pycocotools sorts
    for t, threshold in enumerate(COCO_IOUS):
        taken = np.zeros(iou.shape[1], bool)
        for d in range(iou.shape[0]):
            best, match = min(threshold, 1 - 1e-10), -1
            for g in order:
                if taken[g] and not ignore[g]:
                    continue
                if match > -1 and not ignore[match] and ignore[g]:
                    break  # a regular match beats any ignore region
                if iou[d, g] >= best:
                    best, match = iou[d, g], g
            if match >= 0:
                taken[match] = True
                hits[t, d] = IGNORED if ignore[match] else TP
    return hits


def _boxes(owner: str, arg: str, boxes: Any) -> np.ndarray:
    """`boxes` as a float64 array `[..., K, 4]` (K may be 0), else raises."""
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim < 2 or boxes.shape[-1] != 4:
        raise invalid(owner, f"{arg}.shape", boxes.shape, "expected [N, K, 4] (x1, y1, x2, y2)")
    return boxes


def _matching(owner: str, arg: str, values: Any, shape: tuple[int, ...]) -> np.ndarray:
    """`values` as an array of exactly `shape` (one entry per box or per image), else raises."""
    values = np.asarray(values)
    if values.shape != tuple(shape):
        raise invalid(owner, f"{arg}.shape", values.shape, f"expected {tuple(shape)}")
    return values


def _flags(owner: str, arg: str, values: Any, shape: tuple[int, ...]) -> np.ndarray:
    """`values` as a bool array of exactly `shape`, else raises: a float or int flag was cast
    with 0.5 counted as set, where the detectors refuse a non-bool mask."""
    values = _matching(owner, arg, values, shape)
    check_bool_array(owner, arg, values)
    return values


class _Batch(NamedTuple):
    """One `DetectionEvaluator.add` batch, checked and flattened to N images."""

    boxes: np.ndarray  # [N, K, 4] float64
    scores: np.ndarray  # [N, K] float64
    classes: np.ndarray  # [N, K]
    valid: np.ndarray  # [N, K] bool
    gt_boxes: np.ndarray  # [N, G, 4] float64
    gt_labels: np.ndarray  # [N, G]
    gt_valid: np.ndarray  # [N, G] bool
    difficult: np.ndarray  # [N, G] bool
    mask: np.ndarray  # [N] bool: a real example


def _checked_batch(owner: str, detections: Any, gt_boxes: Any, gt_labels: Any, gt_valid: Any,
                   mask: Any, gt_difficult: Any) -> _Batch:
    """`DetectionEvaluator.add`'s arguments checked (shapes, flags, valid boxes, scores not NaN)
    and flattened to N images; raises naming the first argument that is wrong."""
    try:
        boxes, scores, classes, valid = (detections.boxes, detections.scores,
                                         detections.classes, detections.valid)
    except AttributeError:
        raise invalid(owner, "detections", type(detections).__name__,
                      "expected a Detections (boxes, scores, classes, valid)") from None
    boxes = _boxes(owner, "detections.boxes", boxes)
    lead, k = boxes.shape[:-2], boxes.shape[-2]
    scores = _matching(owner, "detections.scores", scores, boxes.shape[:-1])
    classes = _matching(owner, "detections.classes", classes, boxes.shape[:-1])
    valid = _flags(owner, "detections.valid", valid, boxes.shape[:-1])
    n = int(np.prod(lead))
    gt_boxes = _boxes(owner, "gt_boxes", gt_boxes)
    if int(np.prod(gt_boxes.shape[:-2])) != n:
        raise invalid(owner, "gt_boxes.shape", gt_boxes.shape,
                      f"expected {n} images, as many as the detections")
    g = gt_boxes.shape[-2]
    gt_labels = _matching(owner, "gt_labels", gt_labels, gt_boxes.shape[:-1])
    gt_valid = _flags(owner, "gt_valid", gt_valid, gt_boxes.shape[:-1])
    difficult = (np.zeros(gt_valid.shape, bool) if gt_difficult is None else
                 _flags(owner, "gt_difficult", gt_difficult, gt_boxes.shape[:-1]))
    mask = (np.ones(n, bool) if mask is None
            else _matching(owner, "mask", mask, gt_boxes.shape[:-2]))
    if mask.dtype.kind not in "biuf":
        raise invalid(owner, "mask.dtype", str(mask.dtype),
                      "expected bool or numbers (0: a padded example, nonzero: a real one)")
    if mask.dtype.kind == "f" and not np.isfinite(mask).all():  # NaN != 0 would count as real
        raise invalid(owner, "mask", "an array with NaN or infinite values",
                      "expected 0 (a padded example) or nonzero (a real one)")
    check_valid_boxes(owner, "detections.boxes", boxes, valid)
    check_valid_boxes(owner, "gt_boxes", gt_boxes, gt_valid)
    _check_scores(owner, scores, valid)
    return _Batch(boxes.reshape(n, k, 4), scores.astype(np.float64).reshape(n, k),
                  classes.reshape(n, k), valid.reshape(n, k), gt_boxes.reshape(n, g, 4),
                  gt_labels.reshape(n, g), gt_valid.reshape(n, g), difficult.reshape(n, g),
                  mask.reshape(n) != 0)


def _check_scores(owner: str, scores: np.ndarray, valid: np.ndarray) -> None:
    """Refuses a NaN score of a valid detection, naming its index (padded rows may hold NaN)."""
    bad = valid & np.isnan(scores.astype(np.float64))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise invalid(owner, f"detections.scores[{', '.join(map(str, index))}]",
                      float(scores[index]), "expected a number (not NaN) for a valid detection")


class DetectionEvaluator:
    """Accumulates detections and ground truth over batches; `compute()` gives the mAPs.

    Per image and class, detections are sorted by decreasing score (stable). The COCO metrics
    keep the first `max_detections` of them (COCO's `maxDets`, applied per image and class as
    pycocotools does); VOC's `map50` counts every one, as the VOC devkit has no such cap.
    """

    def __init__(self, num_classes: int, max_detections: int = 100):
        self.num_classes = check_positive_int("DetectionEvaluator", "num_classes", num_classes)
        self.max_detections = check_positive_int("DetectionEvaluator", "max_detections",
                                                 max_detections)
        # Per class: lists of per-image score arrays (every detection; COCO reads the first
        # max_detections of each) and match arrays, and the gt count.
        self._scores: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self._voc: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self._coco: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self._num_gt = np.zeros(num_classes, np.int64)
        self.num_images = 0

    def add(self, detections: Any, gt_boxes: Any, gt_labels: Any, gt_valid: Any,
            mask: Any = None, gt_difficult: Any = None) -> None:
        """Adds a batch: `detections` with `boxes [N, K, 4]`, `scores`, `classes`, `valid`
        `[N, K]` (a `Detections`, any leading axes flattened into N); padded ground truth
        `gt_boxes [N, G, 4]`, `gt_labels [N, G]` in `[0, C)`, `gt_valid [N, G]` (classes and
        labels of an integer dtype, `valid` and `gt_valid` bool); `mask [N]`
        (nonzero: a real example; None: all are); `gt_difficult [N, G]` bool (None: none is).
        `K` or `G` may be 0 (images without detections or ground truth). Valid boxes must be
        finite with x1 <= x2 and y1 <= y2 and valid scores not NaN; padded rows may hold
        anything."""
        owner = "DetectionEvaluator.add"
        batch = _checked_batch(owner, detections, gt_boxes, gt_labels, gt_valid, mask,
                               gt_difficult)
        for arg, labels, ok in (("gt_labels", batch.gt_labels, batch.gt_valid),
                                ("detections.classes", batch.classes, batch.valid)):
            self._check_class_ids(owner, arg, labels, ok)
        for i in np.flatnonzero(batch.mask):
            self._add_image(batch, i)

    def _check_class_ids(self, owner: str, arg: str, labels: np.ndarray, ok: np.ndarray,
                         ) -> None:
        """Refuses a non-integer label array, or a set (`ok`) label outside `[0, C)`."""
        if not np.issubdtype(labels.dtype, np.integer):  # a float class never equals c
            raise invalid(owner, f"{arg}.dtype", str(labels.dtype), "expected an integer array")
        bad = ok & ((labels < 0) | (labels >= self.num_classes))
        if bad.any():
            raise invalid(owner, arg, int(labels[bad][0]),
                          f"expected a class in [0, {self.num_classes})")

    def _add_image(self, batch: _Batch, i: int) -> None:
        """Counts image `i`'s ground truth and matches its detections, class by class."""
        self.num_images += 1
        for c in range(self.num_classes):
            of_class = batch.gt_valid[i] & (batch.gt_labels[i] == c)
            truth, hard = batch.gt_boxes[i][of_class], batch.difficult[i][of_class]
            self._num_gt[c] += int(np.sum(~hard))
            mine = batch.valid[i] & (batch.classes[i] == c)
            if not mine.any():
                continue
            order = np.argsort(-batch.scores[i][mine], kind="stable")
            iou = box_iou_np(batch.boxes[i][mine][order], truth)
            self._scores[c].append(batch.scores[i][mine][order])
            self._voc[c].append(_voc_matches(iou, hard))
            # Greedy matching never looks ahead: matching the first max_detections alone
            # gives the same outcomes as this list's prefix.
            self._coco[c].append(_coco_matches(iou[:self.max_detections], hard))

    def compute(self) -> dict[str, float]:
        """`map50` (VOC all-point), `map50_voc07` (VOC2007 11-point), `map` (COCO 0.50:0.95),
        `coco_map50`, `coco_map75`, per-class VOC APs as `ap50/<class>` and
        `ap50_voc07/<class>`; classes without ground truth are left out of every mean."""
        voc, voc07, coco = {}, {}, {}
        for c in range(self.num_classes):
            if self._num_gt[c] == 0:
                continue
            if self._scores[c]:
                scores = np.concatenate(self._scores[c])
                order = np.argsort(-scores, kind="stable")  # the VOC devkit's sort
                voc_hits = np.concatenate(self._voc[c])[order]
                capped = np.concatenate([s[:self.max_detections] for s in self._scores[c]])
                order = np.argsort(-capped, kind="mergesort")  # pycocotools' sort
                coco_hits = np.concatenate(self._coco[c], axis=1)[:, order]
            else:
                voc_hits = np.zeros(0, np.int8)
                coco_hits = np.zeros((len(COCO_IOUS), 0), np.int8)
            curve = self._curve(voc_hits, self._num_gt[c])
            voc[c], voc07[c] = voc_ap(*curve), voc07_ap(*curve)
            coco[c] = [coco_ap(*self._curve(h, self._num_gt[c])) for h in coco_hits]
        if not voc:
            raise invalid("DetectionEvaluator.compute", "ground truth", "none",
                          "expected at least one valid ground-truth box that is not marked "
                          "difficult in the added images (difficult boxes are not scored)")
        per_threshold = np.mean(np.array(list(coco.values())), axis=0)  # [T]
        result = {
            "map50": float(np.mean(list(voc.values()))),
            "map50_voc07": float(np.mean(list(voc07.values()))),
            "map": float(np.mean(per_threshold)),
            "coco_map50": float(per_threshold[0]),
            "coco_map75": float(per_threshold[5]),
        }
        result.update({f"ap50/{c}": value for c, value in voc.items()})
        result.update({f"ap50_voc07/{c}": value for c, value in voc07.items()})
        return result

    @staticmethod
    def _curve(hits: np.ndarray, num_gt: int) -> tuple[np.ndarray, np.ndarray]:
        """`(recall, precision)` after each counted detection of a score-sorted outcome list
        (ignored detections are left out)."""
        hits = hits[hits != IGNORED]
        tp = np.cumsum(hits == TP, dtype=np.float64)
        fp = np.cumsum(hits == FP, dtype=np.float64)
        return tp / num_gt, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)

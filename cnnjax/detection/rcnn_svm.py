"""R-CNN's second stage (Girshick et al. 2014, sec. 2.3 and appendix B/C) on extracted features.

After the CNN is fine-tuned with a softmax, the paper (1) trains one linear SVM per class on fc7
features: positives are the ground-truth boxes of the class only, negatives every region with
IoU < 0.3 to all of that class's ground truth (regions in between are ignored), with
hard-negative mining (start from a subset of the negatives, repeatedly add those the current SVM
scores above -1, i.e. inside the margin, drop cached ones below -1.2, retrain); (2) fits a
class-specific ridge regression from pool5 features to the box deltas `(tx, ty, tw, th)` of the
regions with IoU >= 0.6 to a ground-truth box; (3) scores every region with every SVM, moves it
with the regressor and runs per-class NMS.

Conventions of the paper's code (rcnn, `rcnn_train.m`): features are scaled so that their mean
L2 norm is 20 (`feature_scale`; rcnn measures it on regions sampled from the whole training set,
`rcnn_feature_stats`; `rcnn_svm_run` on all its training regions for fc7 and on the regression
pairs only for pool5), liblinear's L2-regularized hinge loss with `C = 1e-3`, positive class
weight 2 and bias multiplier 10 (sklearn `LinearSVC`, liblinear itself), ridge `lambda = 1000`.
The ridge intercept is not penalized here (sklearn `Ridge`'s convention; rcnn penalized an
appended ones column). Two more departures from `rcnn_train_bbox_regressor.m`, whose pairs are
every box of `d.boxes` with IoU > 0.6, the ground-truth boxes among them (IoU 1, target 0):
here the pairs are the proposal regions only (a ground-truth box is no region a detector
moves; their pool5 is not extracted), and IoU >= 0.6 (the paper's text) rather than > 0.6.
Everything is NumPy float64 on the host except decoding and NMS, which
reuse `box_coding` and `postprocess` (JAX).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.detection.box_coding import clip_boxes, decode_boxes, encode_boxes
from cnnjax.detection.evaluation import box_iou_np
from cnnjax.detection.postprocess import Detections, batched_nms, has_min_size
from cnnjax.layers.roi import check_valid_boxes
from cnnjax.utils.validation import (
    check_non_negative_int,
    check_number,
    check_positive_float,
    check_positive_int,
    invalid,
)

NEGATIVE_IOU = 0.3  # SVM negatives: IoU below this to every ground-truth box of the class
REGRESSION_IOU = 0.6  # ridge training pairs: IoU at least this to their best ground-truth box
HARD_THRESHOLD = -1.0  # a negative scored above this violates the margin: mined
EASY_THRESHOLD = -1.2  # a cached negative scored below this is evicted (rcnn's evict_thresh)
PAPER_FEATURE_NORM = 20.0  # rcnn's feat_norm_mean
REGRESSION_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # the paper's unweighted (tx, ty, tw, th)


class LinearModels(NamedTuple):
    """One linear model per class: `score = x @ weights[c] + bias[c]` (float64).

    SVMs: `weights [C, D]`, `bias [C]`; box regressors: `weights [C, D, 4]`, `bias [C, 4]`.
    """

    weights: np.ndarray
    bias: np.ndarray


# ------------------------------------------------------------------------------ validation
def _matrix(owner: str, arg: str, x: Any, *, columns: int | None = None,
            allow_empty: bool = False) -> np.ndarray:
    """`x` as a finite 2-D float array (rows, columns), else raises."""
    x = np.asarray(x)
    if x.ndim != 2 or (columns is not None and x.shape[1] != columns):
        want = f"[n, {columns}]" if columns is not None else "a 2-D array [n, features]"
        raise invalid(owner, f"{arg}.shape", tuple(x.shape), f"expected {want}")
    if x.shape[0] == 0 and not allow_empty:
        raise invalid(owner, f"{arg}.shape", tuple(x.shape), "expected at least one row")
    if not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
        raise invalid(owner, arg, f"{x.dtype} array", "expected finite floating-point values")
    return x


def _boxes(owner: str, arg: str, boxes: Any, valid: bool = True) -> np.ndarray:
    """`boxes` as float64 `[n, 4]`, with (`valid`) every row finite and x1 <= x2, y1 <= y2,
    else raises."""
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise invalid(owner, f"{arg}.shape", tuple(boxes.shape), "expected [n, 4] (x1, y1, x2, y2)")
    if valid:
        check_valid_boxes(owner, arg, boxes)
    return boxes


def _ground_truth(owner: str, gt_boxes: Any, gt_labels: Any, gt_valid: Any,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(gt_boxes [G, 4] float64, gt_labels [G] integers, gt_valid [G] bool)`, else raises;
    rows not `gt_valid` may hold anything."""
    gt_boxes = _boxes(owner, "gt_boxes", gt_boxes, valid=False)
    gt_labels = np.asarray(gt_labels).reshape(-1)
    gt_valid = np.asarray(gt_valid).reshape(-1)
    count = gt_boxes.shape[0]
    for arg, value in (("gt_labels", gt_labels), ("gt_valid", gt_valid)):
        if value.shape != (count,):
            raise invalid(owner, f"{arg}.shape", value.shape,
                          f"expected ({count},), one per gt box")
    if gt_labels.size and not np.issubdtype(gt_labels.dtype, np.integer):
        raise invalid(owner, "gt_labels.dtype", str(gt_labels.dtype),
                      "expected integer class ids")
    gt_valid = gt_valid.astype(bool)
    check_valid_boxes(owner, "gt_boxes", gt_boxes, gt_valid)
    return gt_boxes, gt_labels, gt_valid


def _iou(owner: str, arg: str, value: Any) -> float:
    return check_number(owner, arg, value, "expected an IoU in [0, 1]", low=0.0, high=1.0)


# ---------------------------------------------------------------------------------- labels
def class_overlaps(boxes: Any, gt_boxes: Any, gt_labels: Any, gt_valid: Any,
                   num_classes: int) -> np.ndarray:
    """`[M, C]` float64: each box's largest IoU with the valid ground-truth boxes of each class
    (0 for a class without any), as rcnn's `overlap` per class."""
    owner = "class_overlaps"
    boxes = _boxes(owner, "boxes", boxes)
    gt_boxes, gt_labels, gt_valid = _ground_truth(owner, gt_boxes, gt_labels, gt_valid)
    num_classes = check_positive_int(owner, "num_classes", num_classes)
    labels = gt_labels[gt_valid]
    if np.any((labels < 0) | (labels >= num_classes)):
        raise invalid(owner, "gt_labels", labels.tolist(),
                      f"expected classes in [0, {num_classes})")
    iou = box_iou_np(boxes, gt_boxes[gt_valid])  # [M, G']
    overlaps = np.zeros((boxes.shape[0], num_classes))
    for c in range(num_classes):
        if np.any(labels == c):
            overlaps[:, c] = iou[:, labels == c].max(axis=1)
    return overlaps


def svm_labels(overlaps: Any, gt_class: Any, class_id: int,
               negative_iou: float = NEGATIVE_IOU, positive_iou: float | None = None,
               ) -> np.ndarray:
    """Training labels `[M]` int8 of class `class_id`'s SVM: +1 for the ground-truth boxes of
    the class (`gt_class == class_id`; -1 marks a region that is not a gt box), -1 for any box
    (region or another class's gt box) with `overlaps[:, class_id] < negative_iou`, 0 (ignored)
    otherwise: regions that overlap the class's gt boxes more are neither. `positive_iou` (not
    the paper's rule; None: off) also makes every box with at least that overlap with the
    class's gt boxes a positive, per class: a region (or another class's gt box) can be a
    positive of two classes' SVMs, where the softmax fine-tuning's IoU >= 0.5 foreground takes
    only the class it overlaps most."""
    owner = "svm_labels"
    overlaps = _matrix(owner, "overlaps", overlaps, allow_empty=True)
    gt_class = np.asarray(gt_class).reshape(-1)
    if gt_class.shape[0] != overlaps.shape[0]:
        raise invalid(owner, "gt_class.shape", gt_class.shape,
                      f"expected ({overlaps.shape[0]},), one per row of overlaps")
    if gt_class.size and not np.issubdtype(gt_class.dtype, np.integer):
        raise invalid(owner, "gt_class.dtype", str(gt_class.dtype),
                      "expected integer class ids (-1: a region)")
    class_id = check_non_negative_int(owner, "class_id", class_id)
    if class_id >= overlaps.shape[1]:
        raise invalid(owner, "class_id", class_id, f"expected a class in [0, {overlaps.shape[1]})")
    threshold = _iou(owner, "negative_iou", negative_iou)
    labels = np.zeros(overlaps.shape[0], np.int8)
    labels[overlaps[:, class_id] < threshold] = -1
    if positive_iou is not None:
        check_number(owner, "positive_iou", positive_iou,
                     f"expected None or an IoU in [negative_iou={threshold}, 1]",
                     low=threshold, high=1.0)
        labels[overlaps[:, class_id] >= positive_iou] = 1
    labels[gt_class == class_id] = 1
    return labels


def regression_targets(
    boxes: Any, gt_boxes: Any, gt_labels: Any, gt_valid: Any, min_iou: float = REGRESSION_IOU,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ridge training pairs among `boxes [M, 4]`: `(selected [M] bool, classes [M] int,
    targets [M, 4])`. A box is selected when its highest-IoU valid gt box overlaps it at least
    `min_iou`; its class is that gt box's and its target `encode_boxes(gt, box)` (unweighted
    `tx, ty, tw, th`, the paper's eq. for `t_*`). Unselected rows: class -1, target 0."""
    owner = "regression_targets"
    boxes = _boxes(owner, "boxes", boxes)
    gt_boxes, labels, valid = _ground_truth(owner, gt_boxes, gt_labels, gt_valid)
    threshold = _iou(owner, "min_iou", min_iou)
    if threshold <= 0:  # IoU 0 would select boxes apart from (or without) any overlap
        raise invalid(owner, "min_iou", min_iou, "expected an IoU in (0, 1]")
    selected = np.zeros(boxes.shape[0], bool)
    classes = np.full(boxes.shape[0], -1, np.int64)
    targets = np.zeros((boxes.shape[0], 4))
    if not valid.any() or boxes.shape[0] == 0:
        return selected, classes, targets
    iou = box_iou_np(boxes, gt_boxes[valid])
    best = iou.argmax(axis=1)
    selected = iou[np.arange(len(best)), best] >= threshold
    matched = gt_boxes[valid][best]
    classes = np.where(selected, labels[valid][best], -1)
    if selected.any():  # only selected boxes are encoded: a degenerate other one has no target
        targets[selected] = np.asarray(
            encode_boxes(matched[selected], boxes[selected], REGRESSION_WEIGHTS), np.float64)
    return selected, classes, targets


def feature_scale(features: Any, target_norm: float = PAPER_FEATURE_NORM) -> float:
    """The factor that makes the mean L2 norm of the rows of `features` equal `target_norm`
    (rcnn scales fc7 and pool5 features this way, so `C` and `lambda` keep their meaning)."""
    owner = "feature_scale"
    features = _matrix(owner, "features", features)
    target = check_positive_float(owner, "target_norm", target_norm)
    mean_norm = float(np.mean(np.linalg.norm(features.astype(np.float64), axis=1)))
    if mean_norm <= 0:
        raise invalid(owner, "features", "all-zero rows", "expected some nonzero feature")
    return target / mean_norm


# ------------------------------------------------------------------------------------- SVM
def _fit_linear_svm(x: np.ndarray, y: np.ndarray, c: float, positive_weight: float,
                    bias_scale: float, max_iter: int, seed: int) -> tuple[np.ndarray, float, bool]:
    """liblinear's L2-regularized hinge loss (dual), as rcnn: `(w, b, converged)`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    svm = LinearSVC(C=c, loss="hinge", dual=True, class_weight={1: positive_weight, -1: 1.0},
                    intercept_scaling=bias_scale, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return svm.coef_[0].astype(np.float64), float(svm.intercept_[0]), converged


def train_svm_with_hard_negatives(
    positives: Any, negatives: Any, *, c: float = 1e-3, positive_weight: float = 2.0,
    initial_negatives: int = 5000, max_rounds: int = 10, hard_threshold: float = HARD_THRESHOLD,
    easy_threshold: float = EASY_THRESHOLD, bias_scale: float = 10.0, max_iter: int = 10000,
    seed: int = 0,
) -> tuple[np.ndarray, float, list[dict]]:
    """One class's linear SVM with hard-negative mining: `(weights [D], bias, history)`.

    Starts from `initial_negatives` random rows of `negatives` (the cache); each round fits the
    SVM on the positives and the cache, scores every negative, evicts cached ones scored below
    `easy_threshold` and adds every uncached one scored above `hard_threshold` (margin
    violators). Stops when a round finds no new violator (then the SVM is final: no negative
    outside the cache violates its margin) or after `max_rounds` (then it is refitted once on the
    last cache). `history` holds one record per fit.
    """
    owner = "train_svm_with_hard_negatives"
    positives = _matrix(owner, "positives", positives)
    negatives = _matrix(owner, "negatives", negatives, columns=positives.shape[1])
    c = check_positive_float(owner, "c", c)
    positive_weight = check_positive_float(owner, "positive_weight", positive_weight)
    initial_negatives = check_positive_int(owner, "initial_negatives", initial_negatives)
    max_rounds = check_positive_int(owner, "max_rounds", max_rounds)
    hard_threshold = check_number(owner, "hard_threshold", hard_threshold,
                                  "expected a finite number", low_open=True, high_open=True)
    easy_threshold = check_number(owner, "easy_threshold", easy_threshold,
                                  f"expected a finite number <= hard_threshold={hard_threshold}",
                                  low_open=True, high=hard_threshold)
    bias_scale = check_positive_float(owner, "bias_scale", bias_scale)
    max_iter = check_positive_int(owner, "max_iter", max_iter)

    rng = np.random.default_rng(seed)
    cache = np.zeros(len(negatives), bool)
    cache[rng.permutation(len(negatives))[:initial_negatives]] = True
    history: list[dict] = []

    def fit() -> tuple[np.ndarray, float, np.ndarray]:
        x = np.concatenate([positives, negatives[cache]]).astype(np.float64)
        y = np.concatenate([np.ones(len(positives)), -np.ones(int(cache.sum()))])
        w, b, converged = _fit_linear_svm(x, y, c, positive_weight, bias_scale, max_iter, seed)
        scores = negatives.astype(np.float64) @ w + b
        history.append({
            "round": len(history) + 1,
            "cache": int(cache.sum()),
            "violators": int(np.sum(scores > hard_threshold)),
            "positives_in_margin": int(np.sum(positives.astype(np.float64) @ w + b < 1.0)),
            "liblinear_converged": converged,
        })
        return w, b, scores

    for _ in range(max_rounds):
        w, b, scores = fit()
        hard = (scores > hard_threshold) & ~cache
        history[-1]["added"] = int(hard.sum())
        if not hard.any():
            history[-1]["evicted"] = 0
            return w, b, history
        easy = cache & (scores < easy_threshold)
        history[-1]["evicted"] = int(easy.sum())
        cache = (cache & ~easy) | hard
    w, b, _ = fit()  # the last round added negatives: the final SVM is trained on them too
    return w, b, history


def train_class_svms(features: Any, overlaps: Any, gt_class: Any,
                     positive_iou: float | None = None, **mining: Any,
                     ) -> tuple[LinearModels, list[list[dict]]]:
    """Every class's SVM (`train_svm_with_hard_negatives` on `svm_labels`): `(LinearModels with
    weights [C, D] and bias [C], per-class mining histories)`. `features [M, D]` are already
    scaled; `overlaps [M, C]` from `class_overlaps`; `gt_class [M]` (-1 for regions)."""
    owner = "train_class_svms"
    features = _matrix(owner, "features", features)
    overlaps = _matrix(owner, "overlaps", overlaps)
    if overlaps.shape[0] != features.shape[0]:
        raise invalid(owner, "overlaps.shape", overlaps.shape,
                      f"expected ({features.shape[0]}, C), one row per feature row")
    weights, biases, histories = [], [], []
    for c in range(overlaps.shape[1]):
        labels = svm_labels(overlaps, gt_class, c, positive_iou=positive_iou)
        if not (labels == 1).any() or not (labels == -1).any():
            raise invalid(owner, "gt_class", f"class {c}",
                          "expected every class to have ground-truth boxes and negatives")
        w, b, history = train_svm_with_hard_negatives(features[labels == 1],
                                                      features[labels == -1], **mining)
        weights.append(w)
        biases.append(b)
        histories.append(history)
    return LinearModels(np.stack(weights), np.asarray(biases)), histories


# ----------------------------------------------------------------------------------- ridge
def fit_ridge(x: Any, y: Any, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression in float64 with an unpenalized intercept: `(W [D, k], b [k])` minimizing
    `||y - x W - b||^2 + lam ||W||^2`, i.e. `W = (Xc^T Xc + lam I)^-1 Xc^T yc` on the centred
    `Xc`, `yc` and `b = mean(y) - mean(x) W` (sklearn `Ridge(alpha=lam)`)."""
    owner = "fit_ridge"
    x = _matrix(owner, "x", x).astype(np.float64)
    y = np.asarray(y, np.float64)
    y2 = y.reshape(len(y), -1) if y.ndim == 1 else y
    if y2.ndim != 2 or y2.shape[0] != x.shape[0] or not np.all(np.isfinite(y2)):
        raise invalid(owner, "y.shape", y.shape,
                      f"expected finite targets with {x.shape[0]} rows, one per row of x")
    lam = check_positive_float(owner, "lam", lam)
    x_mean, y_mean = x.mean(axis=0), y2.mean(axis=0)
    xc, yc = x - x_mean, y2 - y_mean
    gram = xc.T @ xc + lam * np.eye(x.shape[1])
    w = np.linalg.solve(gram, xc.T @ yc)
    return w, y_mean - x_mean @ w


def train_box_regressors(features: Any, classes: Any, targets: Any, num_classes: int,
                         lam: float = 1000.0) -> tuple[LinearModels, list[int]]:
    """Class-specific ridge regressors from (scaled) `features [M, D]` to `targets [M, 4]` of
    the rows with `classes == c`: `(LinearModels with weights [C, D, 4] and bias [C, 4],
    training pairs per class)`. A class without pairs gets the zero regressor (boxes unmoved)."""
    owner = "train_box_regressors"
    features = _matrix(owner, "features", features, allow_empty=True)
    targets = _matrix(owner, "targets", targets, columns=4, allow_empty=True)
    classes = np.asarray(classes).reshape(-1)
    if not (len(classes) == len(targets) == len(features)):
        raise invalid(owner, "classes.shape", classes.shape,
                      f"expected ({len(features)},), one per feature row, as targets")
    num_classes = check_positive_int(owner, "num_classes", num_classes)
    if classes.size and (not np.issubdtype(classes.dtype, np.integer)
                         or np.any((classes < -1) | (classes >= num_classes))):
        raise invalid(owner, "classes", np.unique(classes).tolist(),
                      f"expected integer classes in [0, {num_classes}) (-1: no pair)")
    weights = np.zeros((num_classes, features.shape[1], 4))
    bias = np.zeros((num_classes, 4))
    counts = []
    for c in range(num_classes):
        rows = classes == c
        counts.append(int(rows.sum()))
        if rows.any():
            weights[c], bias[c] = fit_ridge(features[rows], targets[rows], lam)
    return LinearModels(weights, bias), counts


# ------------------------------------------------------------------------------ detection
def svm_scores(features: Any, svms: LinearModels) -> np.ndarray:
    """`[..., C]` SVM scores of (scaled) features `[..., D]`."""
    features = np.asarray(features, np.float64)
    return features @ svms.weights.T + svms.bias


def regressed_deltas(features: Any, regressors: LinearModels) -> np.ndarray:
    """`[..., C, 4]` class-specific deltas predicted from (scaled) features `[..., D]`."""
    features = np.asarray(features, np.float64)
    return np.einsum("...d,cdk->...ck", features, regressors.weights) + regressors.bias


def detect_with_scores(scores: Any, boxes: Any, image_size: tuple[int, int], nms_iou: float,
                       max_detections: int, score_threshold: float | None = None) -> Detections:
    """Per-class NMS (`postprocess.batched_nms`) of class scores `[N, P, C]` with their
    class-specific boxes `[N, P, C, 4]` (clipped to the image; those then narrower or lower
    than `MIN_BOX_SIZE` dropped, as `faster_rcnn.detect_from_head` drops them), `max_detections`
    per image. `score_threshold` None keeps every candidate (SVM scores have no natural floor)."""
    boxes = clip_boxes(jnp.asarray(boxes, jnp.float32), image_size)
    scores = jnp.where(has_min_size(boxes), jnp.asarray(scores, jnp.float32), -jnp.inf)
    floor = float(np.finfo(np.float32).min) if score_threshold is None else score_threshold
    labels = jnp.broadcast_to(jnp.arange(scores.shape[-1], dtype=jnp.int32), scores.shape)
    return jax.vmap(lambda b, s, c: batched_nms(
        b.reshape(-1, 4), s.reshape(-1), c.reshape(-1), nms_iou, max_detections, floor))(
            boxes, scores, labels)


def regressed_boxes(deltas: Any, windows: Any) -> np.ndarray:
    """Boxes `[N, P, C, 4]` of the ridge deltas `[N, P, C, 4]` applied to `windows [N, P, 4]`
    (`box_coding.decode_boxes`, unweighted as the targets of `regression_targets`)."""
    return np.asarray(decode_boxes(jnp.asarray(deltas, jnp.float32),
                                   jnp.asarray(windows, jnp.float32)[:, :, None, :],
                                   REGRESSION_WEIGHTS))

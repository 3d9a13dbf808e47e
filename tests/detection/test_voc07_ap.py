"""VOC2007 11-point AP (`map50_voc07`) against an independent float64 port of the VOC devkit
(random detections with difficult boxes, padded rows and several batches) and hand-computed
cases."""

import numpy as np
import pytest

from cnnjax.detection.evaluation import DetectionEvaluator, voc07_ap
from cnnjax.detection.postprocess import Detections


def _iou(box, boxes):
    """IoU of one (x1, y1, x2, y2) box with each of `boxes` (continuous, no +1 pixel)."""
    iw = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0)
    ih = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0)
    inter = iw * ih
    union = ((box[2] - box[0]) * (box[3] - box[1])
             + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter)
    return inter / union


def _devkit_ap(rec, prec, use_07_metric):
    """The devkit's voc_ap: 11-point (mean over t = 0, 0.1, ..., 1 of max precision at recall
    >= t, 0 if none) or all-point (area under the precision envelope)."""
    if use_07_metric:
        ap = 0.0
        for k in range(11):
            t = k / 10
            p = np.max(prec[rec >= t]) if np.any(rec >= t) else 0.0
            ap += p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _devkit_map(images, num_classes, use_07_metric):
    """mAP@0.5 as the VOC devkit (voc_eval) computes it: per class, all detections sorted by
    score; each takes its best-overlapping box of the class in its image if IoU >= 0.5 (a
    difficult box: neither TP nor FP; an already taken box: FP), else FP."""
    aps = {}
    for c in range(num_classes):
        gts = [(img["gt"][img["gl"] == c], img["diff"][img["gl"] == c]) for img in images]
        npos = sum(int(np.sum(~d)) for _, d in gts)
        if npos == 0:
            continue
        dets = [(s, i, b) for i, img in enumerate(images)
                for b, s, cl in zip(img["boxes"], img["scores"], img["classes"], strict=True)
                if cl == c]
        dets.sort(key=lambda d: -d[0])
        taken = [np.zeros(len(g), bool) for g, _ in gts]
        tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
        for n, (_, i, box) in enumerate(dets):
            boxes, difficult = gts[i]
            ovmax, jmax = -np.inf, -1
            if len(boxes):
                overlaps = _iou(box, boxes)
                jmax = int(np.argmax(overlaps))
                ovmax = overlaps[jmax]
            if ovmax >= 0.5:
                if not difficult[jmax]:
                    if not taken[i][jmax]:
                        tp[n], taken[i][jmax] = 1.0, True
                    else:
                        fp[n] = 1.0
            else:
                fp[n] = 1.0
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps[c] = _devkit_ap(rec, prec, use_07_metric)
    return aps


def _random_images(seed, num_images=12, num_classes=3):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        g = int(rng.integers(0, 6))
        xy = rng.uniform(0, 80, (g, 2))
        gt = np.concatenate([xy, xy + rng.uniform(5, 30, (g, 2))], axis=1)
        gl = rng.integers(0, num_classes, g)
        diff = rng.random(g) < 0.25
        # Jittered copies of the ground truth (some duplicates, some wrong classes) and clutter.
        near = gt[rng.integers(0, g, 8)] + rng.normal(0, 4, (8, 4)) if g else np.zeros((0, 4))
        near_cls = (gl[rng.integers(0, g, 8)] if g else np.zeros(0, int))
        near_cls = np.where(rng.random(len(near_cls)) < 0.2,
                            rng.integers(0, num_classes, len(near_cls)), near_cls)
        xy = rng.uniform(0, 80, (4, 2))
        clutter = np.concatenate([xy, xy + rng.uniform(5, 30, (4, 2))], axis=1)
        boxes = np.concatenate([near, clutter])
        boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]),
                                np.maximum(boxes[:, :2], boxes[:, 2:])], axis=1)
        images.append({"gt": gt, "gl": gl, "diff": diff, "boxes": boxes,
                       "scores": rng.random(len(boxes)),
                       "classes": np.concatenate([near_cls, rng.integers(0, num_classes, 4)])})
    return images


def _batch(images, k=16, g=6):
    """`images` as one padded batch (padded rows hold garbage, flagged invalid)."""
    n = len(images)
    boxes, scores = np.full((n, k, 4), 7.0), np.full((n, k), 0.99)
    classes, valid = np.zeros((n, k), np.int32), np.zeros((n, k), bool)
    gt, gl = np.full((n, g, 4), 3.0), np.zeros((n, g), np.int32)
    gv, gd = np.zeros((n, g), bool), np.zeros((n, g), bool)
    for i, img in enumerate(images):
        d, t = len(img["boxes"]), len(img["gt"])
        boxes[i, :d], scores[i, :d], classes[i, :d], valid[i, :d] = (
            img["boxes"], img["scores"], img["classes"], True)
        gt[i, :t], gl[i, :t], gv[i, :t], gd[i, :t] = img["gt"], img["gl"], True, img["diff"]
    return Detections(boxes, scores, classes, valid), gt, gl, gv, gd


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_map50_voc07_matches_the_devkit_on_random_detections(seed):
    images = _random_images(seed)
    ev = DetectionEvaluator(num_classes=3)
    for start in range(0, len(images), 5):  # batches of 5, 5 and 2 images
        dets, gt, gl, gv, gd = _batch(images[start:start + 5])
        ev.add(dets, gt, gl, gv, gt_difficult=gd)
    out = ev.compute()
    ref07 = _devkit_map(images, 3, use_07_metric=True)
    ref = _devkit_map(images, 3, use_07_metric=False)
    assert 0.05 < np.mean(list(ref07.values())) < 0.95  # not degenerate
    assert {k for k in out if k.startswith("ap50_voc07/")} == {f"ap50_voc07/{c}" for c in ref07}
    for c in ref07:
        np.testing.assert_allclose(out[f"ap50_voc07/{c}"], ref07[c], rtol=0, atol=1e-12)
        np.testing.assert_allclose(out[f"ap50/{c}"], ref[c], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["map50_voc07"], np.mean(list(ref07.values())), atol=1e-12)
    np.testing.assert_allclose(out["map50"], np.mean(list(ref.values())), atol=1e-12)


def test_difficult_boxes_change_the_devkit_reference_and_the_metric_alike():
    # The difficult flags matter on this set: dropping them changes both sides equally.
    images = _random_images(5)
    plain = [dict(img, diff=np.zeros_like(img["diff"])) for img in images]
    results = []
    for imgs in (images, plain):
        ev = DetectionEvaluator(num_classes=3)
        dets, gt, gl, gv, gd = _batch(imgs)
        ev.add(dets, gt, gl, gv, gt_difficult=gd)
        ref = _devkit_map(imgs, 3, use_07_metric=True)
        out = ev.compute()
        np.testing.assert_allclose(out["map50_voc07"], np.mean(list(ref.values())), atol=1e-12)
        results.append(out["map50_voc07"])
    assert abs(results[0] - results[1]) > 1e-3


def _ten_objects(detected, scores, difficult_detection=None):
    """One image, 10 class-0 objects in a row; `detected[i]`: the object detection i covers
    (None: a false positive); `difficult_detection`: a score for one more detection, of an
    11th object marked difficult."""
    gt = np.array([[20.0 * j, 0, 20.0 * j + 10, 10] for j in range(11)])
    boxes = [gt[j] if j is not None else [500, 500, 510, 510] for j in detected]
    if difficult_detection is not None:
        boxes, scores = [*boxes, gt[10]], [*scores, difficult_detection]
    k = len(boxes)
    dets = Detections(np.asarray(boxes, float)[None], np.asarray(scores, float)[None],
                      np.zeros((1, k), np.int32), np.ones((1, k), bool))
    ev = DetectionEvaluator(num_classes=1)
    ev.add(dets, gt[None], np.zeros((1, 11), np.int32), np.ones((1, 11), bool),
           gt_difficult=(np.arange(11) == 10)[None])
    return ev.compute()


@pytest.mark.parametrize("difficult_detection", [None, 0.95, 0.75, 0.1])
def test_hand_computed_eleven_points(difficult_detection):
    # TP, FP, TP, TP, FP of 10 objects: recall .1 .1 .2 .3 .3, precision 1 .5 2/3 .75 .6.
    # t = 0, .1: precision 1; t = .2, .3: .75 (a recall of exactly 3/10 reaches t = 3/10);
    # t = .4 .. 1: never reached, 0. A detection of a difficult box, at any rank, changes nothing.
    out = _ten_objects([0, None, 1, 2, None], [0.9, 0.8, 0.7, 0.6, 0.5], difficult_detection)
    assert out["map50_voc07"] == pytest.approx((1 + 1 + 0.75 + 0.75) / 11, abs=1e-15)
    assert out["ap50_voc07/0"] == out["map50_voc07"]
    # All-point: .1 * 1 + .1 * .75 + .1 * .75.
    assert out["map50"] == pytest.approx(0.25, abs=1e-15)


def test_voc07_ap_of_curves():
    assert voc07_ap(np.zeros(0), np.zeros(0)) == 0.0  # no detections
    assert voc07_ap(np.array([1.0]), np.array([1.0])) == 1.0  # one perfect detection
    # Recall .5 at precision 1, then 1.0 at .5: t = 0 .. .5 (6 points) at 1, 5 points at .5.
    assert voc07_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(8.5 / 11)
    # Precision rising later raises every earlier threshold (the envelope).
    assert voc07_ap(np.array([0.1, 0.2]), np.array([0.5, 1.0])) == pytest.approx(3 / 11)

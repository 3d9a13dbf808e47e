"""mAP against pycocotools' COCOeval (random detections) and hand-computed VOC/COCO cases."""

import contextlib
import io
import re

import numpy as np
import pytest

from cnnjax.detection.evaluation import DetectionEvaluator, box_iou_np, coco_ap, voc_ap
from cnnjax.detection.postprocess import Detections

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402


def _detections(boxes, scores, classes, valid=None):
    boxes = np.asarray(boxes, np.float64).reshape(1, -1, 4)
    scores = np.asarray(scores, np.float64).reshape(1, -1)
    if valid is None:
        valid = np.ones(scores.shape, bool)
    return Detections(boxes, scores, np.asarray(classes).reshape(1, -1), np.asarray(valid))


def _evaluate(dets, gt_boxes, gt_labels):
    ev = DetectionEvaluator(num_classes=2)
    gt = np.asarray(gt_boxes, np.float64).reshape(1, -1, 4)
    ev.add(dets, gt, np.asarray(gt_labels).reshape(1, -1), np.ones(gt.shape[:2], bool))
    return ev.compute()


def test_hand_computed_tp_fp_tp():
    # Two objects; scores .9 (hit), .8 (miss), .7 (hit): recall .5 .5 1, precision 1 .5 2/3.
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    dets = _detections([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7],
                       [0, 0, 0])
    out = _evaluate(dets, gt, [0, 0])
    assert out["map50"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-12)
    # 101 recall points: 51 of them (0 .. 0.5) at precision 1, 50 at 2/3.
    assert out["coco_map50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert out["map"] == pytest.approx(out["coco_map50"], abs=1e-12)  # exact boxes: all IoU 1


def test_voc_and_coco_differ_on_a_taken_best_box():
    # The second detection overlaps A most (0.905) but A is taken; B overlaps it 0.739.
    gt = [[0, 0, 10, 10], [2, 0, 12, 10]]
    dets = _detections([[0, 0, 10, 10], [0.5, 0, 10.5, 10]], [0.9, 0.8], [1, 1])
    out = _evaluate(dets, gt, [1, 1])
    assert out["map50"] == pytest.approx(0.5)  # VOC: a duplicate of A, false positive
    assert out["coco_map50"] == pytest.approx(1.0)  # COCO: matched to the free box B
    # 0.739 passes 0.5 .. 0.70 (5 thresholds), fails 0.75 .. 0.95 (AP 51 / 101 each).
    assert out["map"] == pytest.approx((5 * 1.0 + 5 * 51 / 101) / 10)
    assert out["ap50/1"] == out["map50"] and "ap50/0" not in out  # class 0 has no gt: left out


def test_iou_of_exactly_half_is_a_match():
    # IoU 0.5 exactly: both the VOC devkit (VOCevaldet.m: ovmax >= minoverlap) and pycocotools
    # match; just under it neither does.
    out = _evaluate(_detections([[0, 0, 10, 10]], [0.9], [0]), [[0, 0, 20, 10]], [0])
    assert out["map50"] == 1.0 and out["coco_map50"] == 1.0
    out = _evaluate(_detections([[0, 0, 10, 10]], [0.9], [0]), [[0, 0, 20.001, 10]], [0])
    assert out["map50"] == 0.0 and out["coco_map50"] == 0.0


def test_missing_detections_score_zero_and_masked_images_are_skipped():
    ev = DetectionEvaluator(num_classes=2)
    dets = Detections(np.array([[[0, 0, 5, 5]], [[0, 0, 5, 5]]], float), np.array([[0.9], [0.9]]),
                      np.array([[0], [0]]), np.array([[True], [True]]))
    gt = np.array([[[0, 0, 5, 5], [1, 1, 4, 4]], [[7, 7, 9, 9], [0, 0, 1, 1]]], float)
    # Image 0: class 0 hit, class 1 never detected; image 1 is padding (mask 0).
    ev.add(dets, gt, np.array([[0, 1], [0, 1]]), np.array([[True, True], [True, True]]),
           mask=np.array([1.0, 0.0]))
    out = ev.compute()
    assert ev.num_images == 1
    assert out["ap50/0"] == 1.0 and out["ap50/1"] == 0.0 and out["map50"] == 0.5


def test_ap_helpers_on_textbook_curve():
    recall = np.array([0.2, 0.4, 0.4, 0.6])
    precision = np.array([1.0, 1.0, 0.67, 0.75])
    assert voc_ap(recall, precision) == pytest.approx(0.4 * 1.0 + 0.2 * 0.75)
    assert coco_ap(recall, precision) == pytest.approx((41 + 20 * 0.75) / 101)


def _random_set(seed, num_images=12, num_classes=3):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        g = rng.integers(0, 5)
        xy = rng.uniform(0, 50, (g, 2))
        gt = np.concatenate([xy, xy + rng.uniform(5, 25, (g, 2))], 1)
        gl = rng.integers(0, num_classes, g)
        # Detections: jittered copies of the gt (some misclassified) plus random boxes.
        jitter = gt + rng.normal(0, 1.5, gt.shape)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        d = rng.integers(0, 6)
        xy = rng.uniform(0, 50, (d, 2))
        noise = np.concatenate([xy, xy + rng.uniform(5, 25, (d, 2))], 1)
        boxes = np.concatenate([jitter, noise])
        classes = np.concatenate([np.where(rng.uniform(size=g) < 0.8, gl, (gl + 1) % 3),
                                  rng.integers(0, num_classes, d)])
        scores = rng.uniform(0.01, 1, len(boxes))
        images.append((gt, gl, boxes, scores, classes))
    return images


def _pycocotools_stats(images, num_classes, difficult=None, max_dets=100):
    gt_json = {"images": [{"id": i + 1} for i in range(len(images))],
               "categories": [{"id": c + 1} for c in range(num_classes)], "annotations": []}
    results = []
    for i, (gt, gl, boxes, scores, classes) in enumerate(images):
        hard = np.zeros(len(gt), bool) if difficult is None else difficult[i]
        for b, c, crowd in zip(gt, gl, hard, strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            gt_json["annotations"].append({
                "id": len(gt_json["annotations"]) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": int(crowd)})
        for b, s, c in zip(boxes, scores, classes, strict=True):
            results.append({"image_id": i + 1, "category_id": int(c) + 1, "score": float(s),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt_json
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.params.maxDets = [1, min(10, max_dets), max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if max_dets == 100:
        return ev.stats
    # summarize() reads its AP at maxDets=100 only: its stats[0:3] from the last maxDets setting.
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K] at area "all"
    return np.array([np.mean(p[p > -1]) for p in (precision, precision[0], precision[5])])


def _padded(gt, gl, boxes, scores, classes, k, g):
    """One image's detections and ground truth padded to `k` and `g` rows: `add`'s arguments."""
    pad_d = np.zeros((1, k, 4))
    pad_d[0, :len(boxes)] = boxes
    dets = Detections(pad_d, np.pad(scores, (0, k - len(scores)))[None],
                      np.pad(classes, (0, k - len(classes)))[None],
                      (np.arange(k) < len(boxes))[None])
    pad_g = np.zeros((1, g, 4))
    pad_g[0, :len(gt)] = gt
    return dets, pad_g, np.pad(gl, (0, g - len(gl)))[None], (np.arange(g) < len(gt))[None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_map_matches_pycocotools(seed):
    images = _random_set(seed)
    ev = DetectionEvaluator(num_classes=3)
    for gt, gl, boxes, scores, classes in images:  # one image per batch, padded to K and G
        ev.add(*_padded(gt, gl, boxes, scores, classes, k=12, g=5))
    out = ev.compute()
    stats = _pycocotools_stats(images, 3)
    assert 0.05 < stats[0] < 0.95  # a non-degenerate case
    np.testing.assert_allclose(out["map"], stats[0], atol=1e-12)
    np.testing.assert_allclose(out["coco_map50"], stats[1], atol=1e-12)
    np.testing.assert_allclose(out["coco_map75"], stats[2], atol=1e-12)


def test_difficult_boxes_are_neither_missed_nor_false_positives():
    # Class 0: A regular, B difficult. Detections: B (.9), a miss (.8), A (.7), B again (.6).
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    dets = _detections([[20, 20, 30, 30], [50, 50, 60, 60], [0, 0, 10, 10], [21, 20, 30, 30]],
                       [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0])

    def evaluate(difficult):
        ev = DetectionEvaluator(num_classes=1)
        ev.add(dets, np.asarray(gt, float)[None], np.zeros((1, 2), int), np.ones((1, 2), bool),
               gt_difficult=np.asarray(difficult)[None])
        return ev.compute()

    # Both detections of B ignored (the devkit checks difficulty before "already taken"):
    # counted FP (the miss), TP (A) -> recall 0, 1; precision 0, 1/2.
    hard = evaluate([False, True])
    assert hard["map50"] == pytest.approx(0.5, abs=1e-12)
    # Without the flag B is an object: TP, FP, TP, FP -> 0.5 * 1 + 0.5 * 2/3.
    plain = evaluate([False, False])
    assert plain["map50"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    # COCO: B is an ignore region matched by both (never used up); the same counted list, whose
    # precision envelope is 1/2 at every recall point.
    assert hard["coco_map50"] == pytest.approx(0.5, abs=1e-12)
    # A class whose only box is difficult is left out of the means, like one without boxes.
    ev = DetectionEvaluator(num_classes=2)
    ev.add(dets, np.asarray(gt, float)[None], np.array([[0, 1]]), np.ones((1, 2), bool),
           gt_difficult=np.array([[False, True]]))
    assert "ap50/1" not in ev.compute()


@pytest.mark.parametrize("difficult_first", [True, False])
def test_coco_tries_regular_boxes_before_difficult_ones(difficult_first):
    """A detection overlapping a difficult box more (IoU 9/11 = 0.818) than a regular one
    (17/23 = 0.739): COCO (pycocotools sorts crowd regions last) matches the regular box at
    0.50 .. 0.70 (AP 1 each), the ignore region at 0.75 and 0.80 (AP 0: the one box is missed),
    nothing above (AP 0): map = 5/10, whatever the order of the boxes. The VOC devkit takes the
    highest IoU, the difficult box: the detection is ignored and the regular box missed."""
    gt = np.array([[0, 0, 10, 10], [2.5, 0, 12.5, 10]], np.float64)
    difficult = np.array([True, False])
    if not difficult_first:
        gt, difficult = gt[::-1], difficult[::-1]
    np.testing.assert_allclose(box_iou_np(np.array([[1.0, 0, 11, 10]]), gt)[0],
                               [9 / 11, 17 / 23] if difficult_first else [17 / 23, 9 / 11])
    ev = DetectionEvaluator(num_classes=1)
    ev.add(_detections([[1, 0, 11, 10]], [0.9], [0]), gt[None], np.zeros((1, 2), int),
           np.ones((1, 2), bool), gt_difficult=difficult[None])
    out = ev.compute()
    assert out["coco_map50"] == pytest.approx(1.0, abs=1e-12)
    assert out["map"] == pytest.approx(0.5, abs=1e-12)
    assert out["map50"] == 0.0


@pytest.mark.parametrize("seed", [3, 4])
def test_coco_map_with_difficult_boxes_matches_pycocotools_crowd(seed):
    """Difficult boxes against pycocotools' crowd regions; every detection touching one is an
    exact copy of it, so the crowd IoU (intersection over the detection) equals the usual IoU."""
    rng = np.random.default_rng(seed)
    images, difficult = [], []
    for gt, gl, boxes, scores, classes in _random_set(seed):
        hard = np.zeros(len(gt), bool)
        if len(gt) > 1:
            hard[rng.integers(len(gt))] = True
            copies = np.repeat(gt[hard], 2, axis=0)  # two detections on it: both ignored
            touching = box_iou_np(boxes, gt[hard])[:, 0] > 0
            keep = ~touching
            boxes = np.concatenate([boxes[keep], copies])
            scores = np.concatenate([scores[keep], rng.uniform(0.01, 1, 2)])
            classes = np.concatenate([classes[keep], np.repeat(gl[hard], 2)])
        images.append((gt, gl, boxes, scores, classes))
        difficult.append(hard)
    ev = DetectionEvaluator(num_classes=3)
    for (gt, gl, boxes, scores, classes), hard in zip(images, difficult, strict=True):
        ev.add(*_padded(gt, gl, boxes, scores, classes, k=14, g=5),
               gt_difficult=np.pad(hard, (0, 5 - len(hard)))[None])
    out = ev.compute()
    stats = _pycocotools_stats(images, 3, difficult)
    assert any(h.any() for h in difficult) and 0.05 < stats[0] < 0.95
    np.testing.assert_allclose(out["map"], stats[0], atol=1e-12)
    np.testing.assert_allclose(out["coco_map50"], stats[1], atol=1e-12)
    np.testing.assert_allclose(out["coco_map75"], stats[2], atol=1e-12)


def test_bad_input():
    ev = DetectionEvaluator(num_classes=2)
    with pytest.raises(ValueError, match=r"gt_labels=2 is invalid; expected a class in \[0, 2\)"):
        ev.add(_detections([[0, 0, 1, 1]], [1.0], [0]), np.zeros((1, 1, 4)), np.array([[2]]),
               np.array([[True]]))
    with pytest.raises(ValueError, match="expected at least one valid ground-truth box"):
        ev.compute()
    # one valid box, difficult: it does not count, and the message says why
    only_difficult = DetectionEvaluator(num_classes=1)
    only_difficult.add(_detections([[0, 0, 1, 1]], [1.0], [0]), np.array([[[0.0, 0, 1, 1]]]),
                       np.array([[0]]), np.array([[True]]), gt_difficult=np.array([[True]]))
    with pytest.raises(ValueError, match="box that is not marked difficult"):
        only_difficult.compute()
    with pytest.raises(ValueError, match="DetectionEvaluator: num_classes=0 is invalid"):
        DetectionEvaluator(num_classes=0)


def _add_unpadded(ev, gt, gl, boxes, scores, classes):
    """One image as its own batch with exactly its rows: `K = 0` or `G = 0` when it has none."""
    ev.add(Detections(np.asarray(boxes, float).reshape(1, -1, 4), np.asarray(scores)[None],
                      np.asarray(classes, int)[None], np.ones((1, len(scores)), bool)),
           np.asarray(gt, float).reshape(1, -1, 4), np.asarray(gl, int)[None],
           np.ones((1, len(gl)), bool))


def test_images_without_detections_or_ground_truth_by_hand():
    # A: one object, found (.9). B: no object (G = 0), a detection (.8): a false positive.
    # C: one object, no detection (K = 0): a miss. Recall .5 at precision 1, then an FP.
    ev = DetectionEvaluator(num_classes=1)
    _add_unpadded(ev, [[0, 0, 10, 10]], [0], [[0, 0, 10, 10]], [0.9], [0])
    _add_unpadded(ev, np.zeros((0, 4)), [], [[0, 0, 10, 10]], [0.8], [0])
    _add_unpadded(ev, [[5, 5, 9, 9]], [0], np.zeros((0, 4)), [], [])
    ev.add(Detections(np.zeros((2, 0, 4)), np.zeros((2, 0)), np.zeros((2, 0), int),
                      np.zeros((2, 0), bool)), np.zeros((2, 0, 4)), np.zeros((2, 0), int),
           np.zeros((2, 0), bool))  # two empty images: nothing to find, nothing found
    out = ev.compute()
    assert ev.num_images == 5
    assert out["map50"] == pytest.approx(0.5, abs=1e-12)  # VOC: 0.5 * 1 + 0.5 * 0
    assert out["coco_map50"] == pytest.approx(51 / 101, abs=1e-12)


@pytest.mark.parametrize("seed", [5, 6])
def test_unpadded_empty_images_match_pycocotools(seed):
    """Images with no ground truth or no detections, added as `G = 0` / `K = 0` arrays."""
    images = _random_set(seed, num_images=14)
    images[0] = (np.zeros((0, 4)), np.zeros(0, int), *images[0][2:])  # no objects
    images[1] = (*images[1][:2], np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))  # none found
    ev = DetectionEvaluator(num_classes=3)
    for image in images:
        _add_unpadded(ev, *image)
    out = ev.compute()
    stats = _pycocotools_stats(images, 3)
    assert any(len(i[0]) == 0 for i in images) and any(len(i[2]) == 0 for i in images)
    np.testing.assert_allclose(out["map"], stats[0], atol=1e-12)
    np.testing.assert_allclose(out["coco_map50"], stats[1], atol=1e-12)
    np.testing.assert_allclose(out["coco_map75"], stats[2], atol=1e-12)


def test_max_detections_truncation_matches_pycocotools():
    """More detections per image and class than `max_detections` (COCO's maxDets): only the
    best-scoring ones of each image and class count, as pycocotools' `evaluateImg` keeps."""
    rng = np.random.default_rng(7)
    images = []
    for gt, gl, boxes, scores, classes in _random_set(7, num_images=8, num_classes=2):
        gl = gl % 2
        extra = np.repeat(gt, 4, axis=0) + rng.normal(0, 2.5, (4 * len(gt), 4))
        extra[:, 2:] = np.maximum(extra[:, 2:], extra[:, :2] + 1)
        boxes = np.concatenate([boxes, extra])
        scores = np.concatenate([scores, rng.uniform(0.01, 1, len(extra))])
        classes = np.concatenate([classes % 2, np.repeat(gl, 4)])
        images.append((gt, gl, boxes, scores, classes))
    most = max(np.bincount(c, minlength=2).max() for *_, c in images)
    assert most > 5  # truncation happens
    outs = {}
    for max_dets in (5, 100):
        ev = DetectionEvaluator(num_classes=2, max_detections=max_dets)
        for gt, gl, boxes, scores, classes in images:
            ev.add(*_padded(gt, gl, boxes, scores, classes, k=40, g=5))
        outs[max_dets] = out = ev.compute()
        stats = _pycocotools_stats(images, 2, max_dets=max_dets)
        np.testing.assert_allclose(out["map"], stats[0], atol=1e-12)
        np.testing.assert_allclose(out["coco_map50"], stats[1], atol=1e-12)
        np.testing.assert_allclose(out["coco_map75"], stats[2], atol=1e-12)
    assert outs[5]["map"] != outs[100]["map"]
    assert outs[5]["map50"] == outs[100]["map50"]  # VOC counts every detection


def test_voc_map_counts_detections_past_coco_max_detections():
    """One object, 120 false positives scored above its true detection: the VOC devkit counts
    all 121 (AP = precision 1/121 at recall 1); only COCO's metrics stop at maxDets=100. The
    cap cut the true detection from map50 too."""
    far = [[100.0 + 20 * i, 100.0, 110.0 + 20 * i, 110.0] for i in range(120)]
    dets = _detections([*far, [0, 0, 10, 10]], [*np.linspace(0.99, 0.5, 120), 0.4], [0] * 121)
    out = _evaluate(dets, [[0, 0, 10, 10]], [0])
    assert out["map50"] == pytest.approx(1 / 121, abs=1e-15)
    assert out["coco_map50"] == 0.0  # the true detection is the 121st: past maxDets


def test_padding_rows_may_hold_anything():
    gt = np.array([[[0, 0, 10, 10], [np.nan, np.inf, -1, -np.inf]]])
    dets = Detections(np.array([[[0, 0, 10, 10], [np.nan, 0, -5, 0]]]), np.array([[0.9, np.nan]]),
                      np.array([[0, 99]]), np.array([[True, False]]))
    ev = DetectionEvaluator(num_classes=1)
    ev.add(dets, gt, np.array([[0, -4]]), np.array([[True, False]]))
    assert ev.compute()["map50"] == 1.0


def _one(ev, box=(0, 0, 10, 10), score=0.9, gt_box=(0, 0, 10, 10), gt_labels=((0,),),
         mask=None, classes=((0,),), valid=((True,),), gt_valid=((True,),), gt_difficult=None):
    ev.add(Detections(np.array([[box]], float), np.array([[score]]), np.array(classes),
                      np.array(valid)), np.array([[gt_box]], float), np.array(gt_labels),
           np.array(gt_valid), mask=mask,
           gt_difficult=None if gt_difficult is None else np.array(gt_difficult))


@pytest.mark.parametrize("kwargs,message", [
    ({"gt_box": (np.nan, 0, 10, 10)},
     "DetectionEvaluator.add: gt_boxes[0, 0]=[nan, 0.0, 10.0, 10.0] is invalid; expected finite "
     "coordinates."),
    ({"gt_box": (10, 10, 0, 0)},
     "DetectionEvaluator.add: gt_boxes[0, 0]=[10.0, 10.0, 0.0, 0.0] is invalid; expected "
     "x1 <= x2 and y1 <= y2 (boxes are (x1, y1, x2, y2))."),
    ({"box": (0, 0, 10, np.inf)},
     "DetectionEvaluator.add: detections.boxes[0, 0]=[0.0, 0.0, 10.0, inf] is invalid; expected "
     "finite coordinates."),
    ({"score": np.nan},
     "DetectionEvaluator.add: detections.scores[0, 0]=nan is invalid; expected a number (not "
     "NaN) for a valid detection."),
    ({"gt_labels": ((0, 1),)},
     "DetectionEvaluator.add: gt_labels.shape=(1, 2) is invalid; expected (1, 1)."),
    ({"mask": np.ones(3)}, "DetectionEvaluator.add: mask.shape=(3,) is invalid; expected (1,)."),
    ({"mask": np.array([np.nan])}, "DetectionEvaluator.add: mask='an array with NaN or infinite "
     "values' is invalid; expected 0 (a padded example) or nonzero (a real one)."),
    ({"mask": np.array(["1"])}, "DetectionEvaluator.add: mask.dtype='<U1' is invalid; expected "
     "bool or numbers (0: a padded example, nonzero: a real one)."),
    ({"gt_labels": ((0.7,),)},
     "DetectionEvaluator.add: gt_labels.dtype='float64' is invalid; expected an integer array."),
    ({"classes": ((0.0,),)},
     "DetectionEvaluator.add: detections.classes.dtype='float64' is invalid; expected an integer "
     "array."),
    ({"classes": ((False,),)},
     "DetectionEvaluator.add: detections.classes.dtype='bool' is invalid; expected an integer "
     "array."),
    ({"valid": ((0.5,),)}, "DetectionEvaluator.add: detections.valid.dtype='float64' is invalid; "
     "expected a bool array."),
    ({"gt_valid": ((1,),)}, "DetectionEvaluator.add: gt_valid.dtype='int64' is invalid; expected "
     "a bool array."),
    ({"gt_difficult": ((0.0,),)}, "DetectionEvaluator.add: gt_difficult.dtype='float64' is "
     "invalid; expected a bool array."),
])
def test_bad_boxes_scores_and_shapes_are_named(kwargs, message):
    """These were scored silently (a NaN or inverted gt box: map50 0; a NaN score: 1; a float
    class like 0.7 never equal to any class: a missed gt or a lost detection; a float or int
    flag, 0.5 counted as set, where the models refuse non-bool masks) or failed in a NumPy
    reshape."""
    ev = DetectionEvaluator(num_classes=2)
    with pytest.raises(ValueError) as err:
        _one(ev, **kwargs)
    assert str(err.value) == message
    assert ev.num_images == 0


def test_detections_without_the_fields_are_named():
    """A dict of the four arrays was an AttributeError ('dict' object has no attribute 'boxes')."""
    fields = {"boxes": np.zeros((1, 1, 4)), "scores": np.zeros((1, 1)),
              "classes": np.zeros((1, 1), int), "valid": np.zeros((1, 1), bool)}
    with pytest.raises(ValueError, match=re.escape(
            "DetectionEvaluator.add: detections='dict' is invalid; expected a Detections (boxes, "
            "scores, classes, valid).")):
        DetectionEvaluator(num_classes=2).add(fields, np.zeros((1, 1, 4)), np.zeros((1, 1), int),
                                              np.zeros((1, 1), bool))


def test_bad_detection_shapes_are_named():
    ev = DetectionEvaluator(num_classes=2)
    boxes = np.zeros((1, 3, 4))
    with pytest.raises(ValueError, match=re.escape(
            "DetectionEvaluator.add: detections.scores.shape=(1, 2) is invalid; expected (1, 3).")):
        ev.add(Detections(boxes, np.zeros((1, 2)), np.zeros((1, 3), int), np.zeros((1, 3), bool)),
               np.zeros((1, 1, 4)), np.zeros((1, 1), int), np.zeros((1, 1), bool))
    with pytest.raises(ValueError, match=re.escape(
            "DetectionEvaluator.add: gt_boxes.shape=(2, 1, 4) is invalid; expected 1 images")):
        ev.add(Detections(boxes, np.zeros((1, 3)), np.zeros((1, 3), int), np.zeros((1, 3), bool)),
               np.zeros((2, 1, 4)), np.zeros((2, 1), int), np.zeros((2, 1), bool))
    with pytest.raises(ValueError, match=re.escape(
            "DetectionEvaluator.add: detections.boxes.shape=(1, 3) is invalid; expected "
            "[N, K, 4]")):
        ev.add(Detections(np.zeros((1, 3)), np.zeros(1), np.zeros(1, int), np.zeros(1, bool)),
               np.zeros((1, 1, 4)), np.zeros((1, 1), int), np.zeros((1, 1), bool))

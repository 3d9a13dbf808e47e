"""YOLO v1 targets and loss against float64 NumPy loops written from the paper (cell assignment,
eq. 3) and darknet's choice of the responsible predictor, plus hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cnnjax.detection.yolo import yolo_v1_loss, yolo_v1_loss_terms, yolo_v1_targets
from tests.detection.reference import iou_ref


def _once(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` compiled as one program (an eager call compiles each operation on
    its own); the arguments stay concrete, as in an eager call, so its checks still run."""
    return jax.jit(lambda: fn(*args, **kwargs))()


def _grid(s):
    """`(rows, cols)` of a grid size given as `S` or `(S_h, S_w)`."""
    return (s, s) if isinstance(s, int) else tuple(s)


def _targets_ref(boxes, labels, valid, image_size, s, c):
    height, width = image_size
    rows, cols = _grid(s)
    out = np.zeros((rows, cols, 5 + c))
    for g in range(len(boxes)):
        if not valid[g]:
            continue
        x1, y1, x2, y2 = boxes[g]
        cx, cy = (x1 + x2) / 2 / width * cols, (y1 + y2) / 2 / height * rows
        col, row = min(max(math.floor(cx), 0), cols - 1), min(max(math.floor(cy), 0), rows - 1)
        if out[row, col, 4]:
            continue  # the first box of a cell wins
        out[row, col, :5] = [cx - col, cy - row, (x2 - x1) / width, (y2 - y1) / height, 1]
        out[row, col, 5 + labels[g]] = 1
    return out


def _loss_ref(pred, targ, b, lambda_coord=5.0, lambda_noobj=0.5, rescore=True):
    """Eq. (3) as loops; the responsible predictor by darknet's detection_layer loop. Returns the
    five terms and how many object cells fell back to the RMSE rule. The grid may be
    rectangular, `[S_h, S_w]`: x in cells of 1/S_w of the image width, y of 1/S_h of its height."""
    rows, cols = targ.shape[:2]
    terms = np.zeros(5)
    fallbacks = 0
    for row in range(rows):
        for col in range(cols):
            t = targ[row, col]
            cell = pred[row, col]
            responsible, best_iou = -1, 0.0
            if t[4]:
                gx, gy = (col + t[0]) / cols, (row + t[1]) / rows
                truth = [gx - t[2] / 2, gy - t[3] / 2, gx + t[2] / 2, gy + t[3] / 2]
                best_rmse = 20.0
                for j in range(b):
                    x, y, rw, rh = cell[5 * j: 5 * j + 4]
                    px, py, pw, ph = (col + x) / cols, (row + y) / rows, rw * rw, rh * rh
                    iou = iou_ref([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], truth)
                    rmse = math.sqrt((px - gx) ** 2 + (py - gy) ** 2 + (pw - t[2]) ** 2
                                     + (ph - t[3]) ** 2)
                    if best_iou > 0 or iou > 0:
                        if iou > best_iou:
                            best_iou, responsible = iou, j
                    elif rmse < best_rmse:
                        best_rmse, responsible = rmse, j
                fallbacks += best_iou == 0
                for k in range(5, 5 + targ.shape[2] - 5):
                    terms[4] += (cell[5 * b + k - 5] - t[k]) ** 2
            for j in range(b):
                x, y, rw, rh, conf = cell[5 * j: 5 * j + 5]
                if j == responsible:
                    terms[0] += lambda_coord * ((x - t[0]) ** 2 + (y - t[1]) ** 2)
                    terms[1] += lambda_coord * ((rw - math.sqrt(t[2])) ** 2
                                                + (rh - math.sqrt(t[3])) ** 2)
                    terms[2] += (conf - (best_iou if rescore else 1.0)) ** 2
                else:
                    terms[3] += lambda_noobj * conf ** 2
    return terms, fallbacks


def _scene(seed, s=4, b=2, c=3, num_gt=7, num_pad=2, image_size=(96, 128)):
    rng = np.random.default_rng(seed)
    s = _grid(s)
    height, width = image_size
    xy = rng.uniform(0, 1, size=(num_gt, 2)) * [width, height]
    wh = rng.uniform(0.05, 0.6, size=(num_gt, 2)) * [width, height]
    boxes = np.concatenate([np.concatenate([xy - wh / 2, xy + wh / 2], 1),
                            rng.uniform(-50, 50, size=(num_pad, 4))])
    labels = np.concatenate([rng.integers(0, c, num_gt), rng.integers(-5, 5, num_pad)])
    valid = np.arange(num_gt + num_pad) < num_gt
    pred = np.concatenate([
        np.stack([rng.uniform(0, 1, (*s, b)), rng.uniform(0, 1, (*s, b)),
                  rng.uniform(0.05, 0.8, (*s, b)), rng.uniform(0.05, 0.8, (*s, b)),
                  rng.uniform(0, 1, (*s, b))], -1).reshape(*s, 5 * b),
        rng.normal(size=(*s, c))], -1)
    return boxes, labels, valid, pred


def test_targets_hand_case():
    # Image 100 high, 200 wide, 2 x 2 grid of 100 x 50 pixel cells.
    boxes = np.array([[20, 10, 120, 60], [150, 60, 190, 100], [0, 0, 5, 5]], np.float32)
    labels = np.array([1, 0, 1], np.int32)
    got = np.asarray(yolo_v1_targets(boxes, labels, np.array([True, True, False]), (100, 200),
                                     2, 2))
    expected = np.zeros((2, 2, 7))
    expected[0, 0] = [0.7, 0.7, 0.5, 0.5, 1, 0, 1]  # centre (70, 35)
    expected[1, 1] = [0.7, 0.6, 0.2, 0.4, 1, 1, 0]  # centre (170, 80)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_targets_collision_first_valid_box_wins():
    boxes = np.array([[0, 0, 10, 10], [2, 2, 8, 9], [1, 1, 9, 9], [60, 60, 68, 68]], np.float32)
    labels = np.array([0, 1, 2, 0], np.int32)
    got = np.asarray(yolo_v1_targets(boxes, labels, np.array([False, True, True, True]),
                                     (64, 64), 2, 3))
    np.testing.assert_allclose(got[0, 0], [5 / 32, 5.5 / 32, 6 / 64, 7 / 64, 1, 0, 1, 0],
                               atol=1e-6)
    # A centre on the far image edge belongs to the last cell.
    np.testing.assert_allclose(got[1, 1], [1.0, 1.0, 0.125, 0.125, 1, 1, 0, 0], atol=1e-6)
    assert got[0, 1].sum() == 0 and got[1, 0].sum() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_targets_match_loop_reference(seed):
    boxes, labels, valid, _ = _scene(seed, s=3, num_gt=12)
    with jax.enable_x64(True):
        got = yolo_v1_targets(boxes, labels, valid, (96, 128), 3, 3)
        assert got.dtype == jnp.float64
    expected = _targets_ref(boxes, labels, valid, (96, 128), 3, 3)
    assert 0 < expected[..., 4].sum() < 9  # several objects, some empty cells (and collisions)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-12)


def test_loss_hand_case():
    # One cell, gt 0.25 x 0.25 of the image at its centre, class 1 of 2.
    targets = yolo_v1_targets([[37.5, 37.5, 62.5, 62.5]], np.array([1]), np.array([True]),
                              (100, 100), 1, 2)
    np.testing.assert_allclose(np.asarray(targets[0, 0]), [0.5, 0.5, 0.25, 0.25, 1, 0, 1])
    # Predictor 0: same centre, 0.0625 wide (sqrt 0.25): inside the gt, IoU 1/16. Predictor 1: a
    # tiny box far away, IoU 0.
    pred = np.array([[[0.5, 0.5, 0.25, 0.25, 0.5, 0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.6]]])
    terms = _once(yolo_v1_loss_terms, pred, targets)
    np.testing.assert_allclose(np.asarray(terms), [0.0, 5 * 2 * 0.25 ** 2, (0.5 - 1 / 16) ** 2,
                                                   0.5 * 0.2 ** 2, 0.3 ** 2 + 0.4 ** 2],
                               rtol=1e-6)
    assert float(_once(yolo_v1_loss, pred, targets)) == pytest.approx(1.08640625, rel=1e-6)
    assert float(_once(yolo_v1_loss, pred, targets, confidence_target="one")) == pytest.approx(
        1.08640625 - (0.5 - 1 / 16) ** 2 + 0.25, rel=1e-6)
    # No IoU anywhere: the predictor closer to the gt (1, centred at 0.3) is responsible.
    far = np.array([[[0.05, 0.05, 0.1, 0.1, 0.5, 0.3, 0.3, 0.1, 0.1, 0.2, 0.3, 0.6]]])
    terms = _once(yolo_v1_loss_terms, far, targets)
    np.testing.assert_allclose(np.asarray(terms[0]), 5 * 2 * 0.2 ** 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(terms[2:4]), [0.2 ** 2, 0.5 * 0.5 ** 2], rtol=1e-6)
    # An empty 2 x 2 grid costs only lambda_noobj * sum of squared confidences.
    empty = yolo_v1_targets(np.zeros((1, 4)), np.zeros(1, np.int32), np.array([False]),
                            (10, 10), 2, 2)
    conf = np.tile(pred, (2, 2, 1))
    assert float(_once(yolo_v1_loss, conf, empty, lambda_noobj=0.25)) == pytest.approx(
        4 * 0.25 * (0.5 ** 2 + 0.2 ** 2), rel=1e-6)


def test_loss_hand_case_on_a_rectangular_grid():
    """A 2 x 4 grid over a 32 x 64 image (cells 16 x 16 px); the gt, the whole image, is centred
    in cell (1, 2) at offset (0, 0). Predictor 0 there is the gt box exactly (IoU 1, conf 0.5):
    responsible, object term (0.5 - 1)^2. Predictor 1, a quarter-size box at the cell's centre,
    overlaps it (IoU 1/16) but less: its conf 0.5 costs lambda_noobj 0.5 * 0.25. Placing the box
    centres in image units by rows instead of cols gives other IoUs and terms."""
    targets = yolo_v1_targets(np.array([[0.0, 0.0, 64.0, 32.0]]), np.array([0]),
                              np.array([True]), (32, 64), (2, 4), 1)
    expected = np.zeros((2, 4, 6))
    expected[1, 2] = [0, 0, 1, 1, 1, 1]
    np.testing.assert_allclose(np.asarray(targets), expected, atol=1e-7)
    pred = np.zeros((2, 4, 2 * 5 + 1), np.float32)
    pred[1, 2, :10] = [0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    pred[1, 2, 10] = 1.0
    terms = _once(yolo_v1_loss_terms, pred, targets, num_boxes=2)
    np.testing.assert_allclose(np.asarray(terms), [0.0, 0.0, 0.25, 0.5 * 0.25, 0.0], atol=1e-7)
    ref, _ = _loss_ref(pred.astype(np.float64), np.asarray(targets, np.float64), 2)
    np.testing.assert_allclose(ref, [0.0, 0.0, 0.25, 0.5 * 0.25, 0.0], atol=1e-12)


@pytest.mark.parametrize("seed, b, rescore, lambdas, grid", [
    (0, 2, True, (5.0, 0.5), 4),
    (1, 2, False, (5.0, 0.5), 4),
    (2, 3, True, (2.0, 1.0), 4),
    (3, 2, True, (5.0, 0.5), (2, 4)),  # rectangular grids (S_h, S_w), as the docstring allows
    (4, 2, True, (2.0, 1.0), (3, 5)),
    (5, 2, False, (5.0, 0.5), (5, 3)),
])
def test_loss_matches_eq3_loop_reference(seed, b, rescore, lambdas, grid):
    boxes, labels, valid, pred = _scene(seed, s=grid, b=b)
    pred[::2, :, 2:5 * b:5] = 0.0  # zero-width boxes in rows 0, 2, ...: IoU 0, the RMSE rule
    targets = _targets_ref(boxes, labels, valid, (96, 128), grid, 3)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(yolo_v1_targets(boxes, labels, valid, (96, 128),
                                                              grid, 3)), targets, atol=1e-12)
    expected, fallbacks = _loss_ref(pred, targets, b, *lambdas, rescore)
    assert targets[..., 4].sum() >= 4 and fallbacks >= 1  # both rules of choice are exercised
    option = "iou" if rescore else "one"
    with jax.enable_x64(True):
        terms, explicit = _once(lambda: (
            yolo_v1_loss_terms(pred, targets, *lambdas, confidence_target=option),
            yolo_v1_loss_terms(pred, targets, *lambdas, option, num_boxes=b)))
        np.testing.assert_allclose(np.asarray(terms), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.asarray(explicit), np.asarray(terms))
    got = _once(yolo_v1_loss, pred.astype(np.float32), targets.astype(np.float32), *lambdas,
                option)
    np.testing.assert_allclose(float(got), expected.sum(), rtol=1e-5)


def test_jit_vmap_over_a_batch_and_finite_gradients():
    scenes = [_scene(seed) for seed in (3, 4)]
    boxes = np.stack([s[0] for s in scenes]).astype(np.float32)
    labels = np.stack([s[1] for s in scenes]).astype(np.int32)
    valid = np.stack([s[2] for s in scenes])
    pred = np.stack([s[3] for s in scenes]).astype(np.float32)
    pred[0, ..., 2:10:5] = 0.0  # sqrt_w = 0: zero-width predicted boxes
    sizes = np.array([[96.0, 128.0], [64.0, 64.0]], np.float32)

    def batch_loss(p, bx, lb, v, hw):
        t = yolo_v1_targets(bx, lb, v, hw, 4, 3)
        return yolo_v1_loss(p, t)

    losses = jax.jit(jax.vmap(batch_loss))(pred, boxes, labels, valid, sizes)
    for i in range(2):
        targets = _targets_ref(boxes[i].astype(np.float64), labels[i], valid[i],
                               tuple(sizes[i]), 4, 3)
        expected, _ = _loss_ref(pred[i].astype(np.float64), targets, 2)
        np.testing.assert_allclose(float(losses[i]), expected.sum(), rtol=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(batch_loss)(p, boxes, labels, valid,
                                                                    sizes))))(pred)
    assert np.all(np.isfinite(np.asarray(grads)))
    # The analytic gradient agrees with finite differences (float64; IoU targets held fixed).
    with jax.enable_x64(True):
        targets = yolo_v1_targets(boxes[1].astype(np.float64), labels[1], valid[1], (64, 64),
                                  4, 3)
        check_grads(jax.jit(lambda p: yolo_v1_loss(p, targets, confidence_target="one")),
                    (pred[1].astype(np.float64),), order=1, modes=["rev"], eps=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: yolo_v1_targets(np.zeros((2, 3)), np.zeros(2, np.int32), np.ones(2, bool), (8, 8),
                             2, 3), "yolo_v1_targets: gt_boxes.shape=(2, 3) is invalid"),
    (lambda: yolo_v1_targets(np.zeros((2, 4)), np.zeros(3, np.int32), np.ones(2, bool), (8, 8),
                             2, 3), "yolo_v1_targets: gt_labels.shape=(3,) is invalid; "
                                    "expected (2,)."),
    (lambda: yolo_v1_targets(np.zeros((2, 4)), np.zeros(2), np.ones(2, bool), (8, 8), 2, 3),
     "yolo_v1_targets: gt_labels.dtype='float64' is invalid; expected an integer array."),
    (lambda: yolo_v1_targets(np.zeros((2, 4)), np.zeros(2, np.int32), np.ones(1, bool), (8, 8),
                             2, 3), "yolo_v1_targets: gt_valid.shape=(1,) is invalid"),
    (lambda: yolo_v1_targets(np.zeros((2, 4)), np.zeros(2, np.int32), np.ones(2), (8, 8), 2, 3),
     "yolo_v1_targets: gt_valid.dtype='float64' is invalid; expected a bool array."),
    (lambda: yolo_v1_targets(np.zeros((2, 4)), np.zeros(2, np.int32), np.ones(2, bool), (8,),
                             2, 3), "yolo_v1_targets: image_size=(8,) is invalid"),
    # a concrete [2] array was trusted: a zero side gave inf / NaN targets
    (lambda: yolo_v1_targets(np.zeros((2, 4)), np.zeros(2, np.int32), np.ones(2, bool),
                             np.array([8, 0]), 2, 3),
     "yolo_v1_targets: image_size=[8, 0] is invalid; expected (height, width), two positive "
     "numbers."),
    (lambda: yolo_v1_targets(np.zeros((2, 4)), np.zeros(2, np.int32), np.ones(2, bool), (8, 8),
                             0, 3), "yolo_v1_targets: grid_size=0 is invalid"),
    (lambda: yolo_v1_targets(np.zeros((2, 4)), np.zeros(2, np.int32), np.ones(2, bool), (8, 8),
                             2, 0), "yolo_v1_targets: num_classes=0 is invalid"),
    (lambda: yolo_v1_targets(np.zeros((2, 4)), np.array([0, 3]), np.ones(2, bool), (8, 8), 2, 3),
     "yolo_v1_targets: gt_labels[1]=3 is invalid; expected a class in [0, 3)."),
    (lambda: yolo_v1_loss(np.zeros((2, 2, 13)), np.zeros((2, 2, 5))),
     "yolo_v1_loss: targets.shape=(2, 2, 5) is invalid; expected [S, S, 5 + C] with C >= 1"),
    (lambda: yolo_v1_loss(np.zeros((3, 2, 13)), np.zeros((2, 2, 8))),
     "yolo_v1_loss: predictions.shape=(3, 2, 13) is invalid; expected [S, S, B * 5 + C] with "
     "S, S = (2, 2)"),
    (lambda: yolo_v1_loss(np.zeros((2, 2, 12)), np.zeros((2, 2, 8))),
     "yolo_v1_loss: predictions.shape=(2, 2, 12) is invalid; expected a last axis of B * 5 + 3"),
    (lambda: yolo_v1_loss(np.zeros((2, 2, 3)), np.zeros((2, 2, 8))),
     "yolo_v1_loss: predictions.shape=(2, 2, 3) is invalid"),
    # B = 2, C = 3 predictions (13) against C = 8 targets: 13 = 1 * 5 + 8, a silent B = 1.
    (lambda: yolo_v1_loss(np.zeros((2, 2, 13)), np.zeros((2, 2, 13)), num_boxes=2),
     "yolo_v1_loss: predictions.shape=(2, 2, 13) is invalid; expected a last axis of num_boxes "
     "* 5 + C = 2 * 5 + 8 = 18 (C = 8 from targets: do predictions and targets have the same "
     "num_classes?)."),
    (lambda: yolo_v1_loss(np.zeros((7, 7, 30)), np.zeros((7, 7, 20)), num_boxes=2),
     "yolo_v1_loss: predictions.shape=(7, 7, 30) is invalid; expected a last axis of num_boxes "
     "* 5 + C = 2 * 5 + 15 = 25"),
    (lambda: yolo_v1_loss(np.zeros((2, 2, 13)), np.zeros((2, 2, 8)), num_boxes=0),
     "yolo_v1_loss: num_boxes=0 is invalid; expected a positive integer."),
    (lambda: yolo_v1_loss(np.zeros((2, 2, 13)), np.zeros((2, 2, 8)), lambda_coord=-1),
     "yolo_v1_loss: lambda_coord=-1 is invalid; expected a finite number >= 0."),
    (lambda: yolo_v1_loss(np.zeros((2, 2, 13)), np.zeros((2, 2, 8)), lambda_noobj=math.inf),
     "yolo_v1_loss: lambda_noobj=inf is invalid"),
    (lambda: yolo_v1_loss(np.zeros((2, 2, 13)), np.zeros((2, 2, 8)), confidence_target="1"),
     "yolo_v1_loss: confidence_target='1' is invalid; expected one of ['iou', 'one']."),
])
def test_errors(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


@pytest.mark.parametrize("box,message", [
    ([30, 10, 10, 40], "yolo_v1_targets: gt_boxes[1]=[30.0, 10.0, 10.0, 40.0] is invalid; "
                       "expected x1 <= x2 and y1 <= y2 (boxes are (x1, y1, x2, y2))."),
    ([np.nan, 10, 20, 40], "yolo_v1_targets: gt_boxes[1]=[nan, 10.0, 20.0, 40.0] is invalid; "
                           "expected finite coordinates."),
    ([0, 0, np.inf, 40], "yolo_v1_targets: gt_boxes[1]=[0.0, 0.0, inf, 40.0] is invalid; "
                         "expected finite coordinates."),
])
def test_targets_refuse_bad_valid_boxes_but_not_padding(box, message):
    """A valid inverted or non-finite box made the loss NaN; as padding it is ignored."""
    boxes = np.array([[10, 10, 30, 40], box], np.float32)
    labels = np.array([0, 1], np.int32)
    with pytest.raises(ValueError) as err:
        yolo_v1_targets(boxes, labels, np.array([True, True]), (64, 64), 4, 3)
    assert str(err.value) == message
    padded = yolo_v1_targets(boxes, labels, np.array([True, False]), (64, 64), 4, 3)
    alone = yolo_v1_targets(boxes[:1], labels[:1], np.array([True]), (64, 64), 4, 3)
    np.testing.assert_array_equal(np.asarray(padded), np.asarray(alone))
    assert np.isfinite(float(yolo_v1_loss(np.zeros((4, 4, 13), np.float32), padded)))

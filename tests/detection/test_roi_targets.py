"""Fast R-CNN RoI sampling against a float64 NumPy loop re-implementation of py-faster-rcnn's
proposal_target_layer labelling (max-IoU gt, fg / bg thresholds, class, encoded targets), the
sampler's counts and randomness, and the box-head loss against a float64 NumPy computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.detection.roi_targets import RoiTargets, fast_rcnn_loss, sample_rois
from cnnjax.layers.roi import box_iou
from tests.detection.reference import iou_ref

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _encode_ref(box, roi, weights=WEIGHTS):
    """R-CNN's (tx, ty, tw, th) of `box` from `roi`, one box at a time."""
    rw, rh = roi[2] - roi[0], roi[3] - roi[1]
    bw, bh = box[2] - box[0], box[3] - box[1]
    rx, ry = roi[0] + rw / 2, roi[1] + rh / 2
    bx, by = box[0] + bw / 2, box[1] + bh / 2
    wx, wy, ww, wh = weights
    return [wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * math.log(bw / rw),
            wh * math.log(bh / rh)]


def _candidates_ref(proposals, p_valid, gt, labels, g_valid, fg=0.5, hi=0.5, lo=0.0,
                    append_gt=True):
    """Loop version of the labelling: returns (foreground rows, background rows, smallest distance
    of any IoU to a threshold), each row (box, label, target) in candidate order."""
    boxes = [proposals[i] for i in range(len(proposals)) if p_valid[i]]
    if append_gt:
        boxes += [gt[g] for g in range(len(gt)) if g_valid[g]]
    gts = [g for g in range(len(gt)) if g_valid[g]]
    fg_rows, bg_rows, margin = [], [], 1.0
    for box in boxes:
        best, best_g = 0.0, None
        for g in gts:
            v = iou_ref(box, gt[g])
            if best_g is None or v > best:
                best, best_g = v, g
        margin = min(margin, abs(best - fg), abs(best - hi), abs(best - lo) if lo > 0 else 1.0)
        if best_g is not None and best >= fg:
            fg_rows.append((np.asarray(box), int(labels[best_g]), _encode_ref(gt[best_g], box)))
        elif lo <= best < hi:
            bg_rows.append((np.asarray(box), 0, [0.0] * 4))
    return fg_rows, bg_rows, margin


def _scene(seed, num_gt=4, num_pad=2, num_random=40, num_jitter=24, num_invalid=4):
    """Gt boxes (+ garbage padding rows), and proposals: jittered copies of the gt (foreground),
    random boxes (mostly background) and invalid garbage rows, shuffled."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 120, size=(num_gt, 2))
    wh = rng.uniform(20, 60, size=(num_gt, 2))
    gt = np.concatenate([np.concatenate([xy, xy + wh], 1),
                         [[np.nan, 5, -3, np.inf], [50, 50, 10, 10]][:num_pad]])
    gt_valid = np.arange(len(gt)) < num_gt
    labels = np.concatenate([rng.integers(1, 6, num_gt), [0, -7][:num_pad]]).astype(np.int32)
    base = gt[rng.integers(0, num_gt, num_jitter)]
    size = np.concatenate([base[:, 2:] - base[:, :2]] * 2, 1)
    jitter = base + rng.normal(scale=0.12, size=base.shape) * size
    jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
    rxy = rng.uniform(0, 150, size=(num_random, 2))
    random = np.concatenate([rxy, rxy + rng.uniform(5, 70, size=(num_random, 2))], 1)
    invalid = np.tile([[30.0, 30.0, 1.0, np.nan]], (num_invalid, 1))
    proposals = np.concatenate([jitter, random, invalid])
    p_valid = np.arange(len(proposals)) < num_jitter + num_random
    perm = rng.permutation(len(proposals))
    return proposals[perm], p_valid[perm], gt, labels, gt_valid


def _rows(out):
    out = jax.tree.map(np.asarray, out)
    return out.rois, out.labels, out.regression_targets, out.valid


def _check_full(out, fg_rows, bg_rows, num_samples, atol):
    rois, labels, targets, valid = _rows(out)
    rows = fg_rows + bg_rows
    n = len(rows)
    assert valid.tolist() == [True] * n + [False] * (num_samples - n)
    np.testing.assert_allclose(rois[:n], np.stack([r[0] for r in rows]), rtol=0, atol=atol)
    np.testing.assert_array_equal(labels[:n], [r[1] for r in rows])
    np.testing.assert_allclose(targets[:n], np.asarray([r[2] for r in rows]), rtol=0,
                               atol=atol * 100)
    assert not rois[n:].any() and not labels[n:].any() and not targets[n:].any()


@pytest.mark.parametrize("seed, fg, hi, lo, append_gt", [
    (0, 0.5, 0.5, 0.0, True),
    (1, 0.6, 0.4, 0.1, True),
    (2, 0.5, 0.5, 0.1, False),
])
def test_labels_and_targets_match_loop_reference(seed, fg, hi, lo, append_gt):
    proposals, p_valid, gt, labels, g_valid = _scene(seed)
    fg_rows, bg_rows, margin = _candidates_ref(proposals, p_valid, gt, labels, g_valid, fg, hi,
                                               lo, append_gt)
    assert len(fg_rows) >= 8 and len(bg_rows) >= 8 and margin > 1e-4
    # A batch larger than the candidate set with no foreground cap takes every candidate: the
    # output is deterministic (fg then bg, candidate order, then padding).
    kwargs = dict(num_samples=80, fg_fraction=1.0, fg_thresh=fg, bg_thresh_hi=hi,
                  bg_thresh_lo=lo, append_gt=append_gt)
    with jax.enable_x64(True):
        out = sample_rois(jax.random.key(seed), proposals, p_valid, gt, labels, g_valid, **kwargs)
        assert out.rois.dtype == jnp.float64
        _check_full(out, fg_rows, bg_rows, 80, 1e-12)
    if seed == 0:  # float32 agrees too (no IoU within 1e-4 of a threshold); one compilation
        out32 = sample_rois(jax.random.key(seed), proposals.astype(np.float32), p_valid,
                            gt.astype(np.float32), labels, g_valid, **kwargs)
        assert out32.rois.dtype == jnp.float32 and out32.labels.dtype == jnp.int32
        _check_full(out32, fg_rows, bg_rows, 80, 2e-5)


@pytest.mark.parametrize("num_samples, fg_fraction", [(16, 0.25), (64, 0.25), (64, 0.5)])
def test_sampler_counts_and_rows_from_the_reference(num_samples, fg_fraction):
    proposals, p_valid, gt, labels, g_valid = _scene(3)
    fg_rows, bg_rows, _ = _candidates_ref(proposals, p_valid, gt, labels, g_valid)
    expect_fg = min(len(fg_rows), int(num_samples * fg_fraction))
    expect_bg = min(len(bg_rows), num_samples - expect_fg)
    out = sample_rois(jax.random.key(0), proposals, p_valid, gt, labels, g_valid,
                      num_samples=num_samples, fg_fraction=fg_fraction)
    rois, got_labels, targets, valid = _rows(out)
    assert rois.shape == (num_samples, 4) and targets.shape == (num_samples, 4)
    n_fg = int((got_labels > 0).sum())
    assert n_fg == expect_fg and int(valid.sum()) == expect_fg + expect_bg
    # Full when there is enough background to fill the batch after the capped foreground (a
    # short foreground is made up by background, never the other way round); padded at the end.
    assert valid.all() == (len(bg_rows) >= num_samples - expect_fg)
    assert valid.tolist() == sorted(valid.tolist(), reverse=True)
    assert (got_labels[:n_fg] > 0).all() and not got_labels[n_fg:].any()  # fg rows come first
    # Every sampled row is one candidate (no repeats) with the reference's label and target.
    picked = set()
    for i in np.flatnonzero(valid):
        pool = fg_rows if i < n_fg else bg_rows
        j = int(np.argmin([np.abs(r[0] - rois[i]).max() for r in pool]))
        assert np.abs(pool[j][0] - rois[i]).max() < 1e-4 and (i < n_fg, j) not in picked
        picked.add((i < n_fg, j))
        assert got_labels[i] == pool[j][1]
        np.testing.assert_allclose(targets[i], pool[j][2], rtol=1e-4, atol=1e-4)


def test_determinism_per_key_and_difference_across_keys():
    proposals, p_valid, gt, labels, g_valid = _scene(4)

    def draw(seed):
        return _rows(sample_rois(jax.random.key(seed), proposals, p_valid, gt, labels, g_valid,
                                 num_samples=16))

    first, again, other = draw(0), draw(0), draw(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # 16 * 0.25 = 4 of >= 8 foreground and 12 of >= 8 + ... background: both sets differ.
    n_fg = int((first[1] > 0).sum())
    assert n_fg == 4
    assert not np.array_equal(first[0][:n_fg], other[0][:n_fg])
    assert not np.array_equal(first[0][n_fg:], other[0][n_fg:])


def test_gt_boxes_are_appended_as_foreground():
    # Padded to the shapes of _scene (68 proposals, 6 gt) to share the other tests' compilations.
    gt = np.zeros((6, 4))
    gt[:2] = [[10, 10, 50, 40], [60, 20, 90, 80]]
    labels = np.array([3, 1, 0, 0, 0, 0], np.int32)
    g_valid = np.arange(6) < 2
    proposals = np.full((68, 4), np.nan)
    proposals[:2] = [[100, 100, 120, 130], [200, 0, 220, 10]]  # IoU 0 with the gt: background
    p_valid = np.arange(68) < 2
    out = sample_rois(jax.random.key(0), proposals, p_valid, gt, labels, g_valid, num_samples=16)
    rois, got_labels, targets, valid = _rows(out)
    # The 2 valid gt boxes are foreground RoIs of their own class with zero targets (IoU 1 with
    # themselves), then the 2 background proposals, then 12 padded rows.
    assert valid.tolist() == [True] * 4 + [False] * 12
    np.testing.assert_array_equal(rois[:4], np.concatenate([gt[:2], proposals[:2]]))
    assert got_labels.tolist() == [3, 1] + [0] * 14
    np.testing.assert_allclose(targets, 0.0, atol=1e-6)
    # Without append_gt nothing is foreground here.
    with jax.enable_x64(True):
        out = sample_rois(jax.random.key(0), proposals, p_valid, gt, labels, g_valid,
                          num_samples=80, fg_fraction=1.0, append_gt=False)
    assert _rows(out)[3].tolist() == [True] * 2 + [False] * 78 and not out.labels.any()


def test_an_iou_exactly_at_a_threshold_falls_on_its_documented_side():
    """Foreground is IoU `>= fg_thresh`, background IoU in `[bg_thresh_lo, bg_thresh_hi)`. The
    reference tests keep every IoU 1e-4 away from the thresholds, so taking an IoU equal to
    fg_thresh as not foreground (`>` for `>=`), or one equal to bg_thresh_hi as background
    (`<=` for `<`), went unnoticed; and with fg_thresh 1 (allowed: "(0, 1]") the appended gt
    boxes, IoU exactly 1 with themselves, were then no longer foreground. Proposals sharing the
    gt's corner, 10 px wide and 7.5, 20, 40, 80 px tall against a 10 x 10 gt, have IoUs 75/100,
    100/200, 100/400, 100/800: exact in float32, as the thresholds are."""
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)  # the second overlaps nothing
    labels = np.array([3, 2], np.int32)
    g_valid = np.array([True, True])
    proposals = np.array([[0, 0, 10, 7.5], [0, 0, 10, 20], [0, 0, 10, 40], [0, 0, 10, 80]],
                         np.float32)
    p_valid = np.ones(4, bool)
    assert np.asarray(box_iou(proposals, gt[:1]))[:, 0].tolist() == [0.75, 0.5, 0.25, 0.125]

    def sample(fg, hi, lo, append_gt=False):
        out = sample_rois(jax.random.key(0), proposals, p_valid, gt, labels, g_valid,
                          num_samples=8, fg_fraction=1.0, fg_thresh=fg, bg_thresh_hi=hi,
                          bg_thresh_lo=lo, append_gt=append_gt)
        rois, got_labels, _, valid = _rows(out)
        return rois[valid].tolist(), got_labels[valid].tolist()

    p = proposals.tolist()
    # At fg_thresh: foreground; at bg_thresh_hi (== fg_thresh here): not background.
    assert sample(0.5, 0.5, 0.0) == (p, [3, 3, 0, 0])
    # At bg_thresh_hi < fg_thresh: neither, never sampled; at bg_thresh_lo: background.
    assert sample(0.75, 0.5, 0.25) == ([p[0], p[2]], [3, 0])
    assert sample(0.75, 0.25, 0.125) == ([p[0], p[3]], [3, 0])
    # fg_thresh 1: the appended gt boxes (and nothing else) are foreground, of their class.
    assert sample(1.0, 0.5, 0.0, append_gt=True) == (gt.tolist() + p[2:], [3, 2, 0, 0])


def test_padded_gt_is_ignored_and_empty_cases():
    proposals, p_valid, gt, labels, g_valid = _scene(5)
    zeros_gt, zeros_labels = gt.copy(), labels.copy()
    zeros_gt[4:], zeros_labels[4:] = 0.0, 0
    clean = sample_rois(jax.random.key(2), proposals, p_valid, zeros_gt, zeros_labels, g_valid,
                        num_samples=16)
    # The scene's gt has 2 padded rows holding NaN / inf / reversed boxes and labels 0 and -7.
    padded = sample_rois(jax.random.key(2), proposals, p_valid, gt, labels, g_valid,
                         num_samples=16)
    for a, b in zip(_rows(clean), _rows(padded), strict=True):
        np.testing.assert_array_equal(a, b)
    # No valid gt: every valid proposal is background (IoU 0) with bg_thresh_lo = 0, none with
    # the paper's 0.1 (all padding).
    none = np.zeros(len(gt), bool)
    out = sample_rois(jax.random.key(0), proposals, p_valid, gt, labels, none, num_samples=80,
                      fg_fraction=1.0)
    assert int(out.valid.sum()) == int(p_valid.sum()) and not out.labels.any()
    assert not np.asarray(out.regression_targets).any()
    out = sample_rois(jax.random.key(0), proposals, p_valid, gt, labels, none, num_samples=80,
                      fg_fraction=1.0, bg_thresh_lo=0.1)
    assert not out.valid.any() and not np.asarray(out.rois).any()
    # No gt rows at all: all background; no candidate at all (no proposals, no gt): all padding.
    out = sample_rois(jax.random.key(0), proposals, p_valid, np.zeros((0, 4)),
                      np.zeros(0, np.int32), np.zeros(0, bool), num_samples=16)
    assert out.valid.all() and not out.labels.any()
    out = sample_rois(jax.random.key(0), np.zeros((0, 4)), np.zeros(0, bool), np.zeros((0, 4)),
                      np.zeros(0, np.int32), np.zeros(0, bool), num_samples=4)
    assert not out.valid.any() and out.rois.shape == (4, 4)


def test_jit_vmap_over_a_padded_batch():
    scenes = [_scene(seed) for seed in (6, 7)]
    proposals, p_valid, gt, labels, g_valid = (np.stack(x) for x in zip(*scenes, strict=True))
    g_valid[1, 2:] = False  # the second image has 2 gt boxes
    p_valid[1, :10] = False
    keys = jax.random.split(jax.random.key(3), 2)
    batched = jax.jit(jax.vmap(lambda *a: sample_rois(*a, num_samples=16)))(
        keys, proposals, p_valid, gt, labels, g_valid)
    assert batched.rois.shape == (2, 16, 4) and batched.valid.shape == (2, 16)
    for i in range(2):
        single = sample_rois(keys[i], proposals[i], p_valid[i], gt[i], labels[i], g_valid[i],
                             num_samples=16)
        for a, b in zip(_rows(batched), _rows(single), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-5)


def _loss_ref(logits, deltas, targets, beta):
    """Float64: mean cross-entropy over valid rows; sum of smooth L1 over fg rows' true-class
    deltas divided by the number of valid rows."""
    labels, valid = np.asarray(targets.labels), np.asarray(targets.valid)
    regression = np.asarray(targets.regression_targets, np.float64)
    n = max(int(valid.sum()), 1)
    ce, box = 0.0, 0.0
    for i in np.flatnonzero(valid):
        z = logits[i] - logits[i].max()
        ce += -(z[labels[i]] - math.log(np.exp(z).sum()))
        if labels[i] > 0:
            x = np.abs(deltas[i, labels[i]] - regression[i])
            box += np.where(x < beta, 0.5 * x**2 / beta, x - 0.5 * beta).sum()
    return ce / n, box / n


@pytest.mark.parametrize("beta, flat", [(1.0, False), (1 / 9, True)])
def test_fast_rcnn_loss_matches_numpy(beta, flat):
    proposals, p_valid, gt, labels, g_valid = _scene(3)
    targets = sample_rois(jax.random.key(0), proposals, p_valid, gt, labels, g_valid,
                          num_samples=64)
    assert int(targets.valid.sum()) == 56 and int((targets.labels > 0).sum()) == 16  # 8 padded
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(64, 6))
    deltas = rng.normal(size=(64, 6, 4))
    ce_ref, box_ref = _loss_ref(logits, deltas, targets, beta)
    given = deltas.reshape(64, 24) if flat else deltas
    got = fast_rcnn_loss(logits.astype(np.float32), given.astype(np.float32), targets, beta)
    np.testing.assert_allclose(float(got.classification), ce_ref, rtol=1e-5)
    np.testing.assert_allclose(float(got.box), box_ref, rtol=1e-5)
    # Nothing valid: both terms 0.
    empty = targets._replace(valid=np.zeros(64, bool))
    assert [float(v) for v in fast_rcnn_loss(logits, deltas, empty)] == [0.0, 0.0]


def test_fast_rcnn_loss_matches_torchvision():
    """torchvision's `fastrcnn_loss` (its box head's beta 1/9, `[S, 4 K]` deltas) on the valid
    rows; 8 padded rows of garbage appended on our side change nothing."""
    torch = pytest.importorskip("torch")
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    rng = np.random.default_rng(1)
    rows, k, pad = 64, 6, 8
    logits = rng.normal(scale=2.0, size=(rows + pad, k)).astype(np.float32)
    deltas = rng.normal(size=(rows + pad, 4 * k)).astype(np.float32)
    labels = rng.integers(0, k, rows + pad).astype(np.int32)
    labels[:20] = 0
    regression = rng.normal(size=(rows + pad, 4)).astype(np.float32)
    logits[rows:], deltas[rows:], regression[rows:] = np.nan, np.inf, np.nan
    ce, box = roi_heads.fastrcnn_loss(
        torch.tensor(logits[:rows]), torch.tensor(deltas[:rows]),
        [torch.tensor(labels[:rows], dtype=torch.int64)], [torch.tensor(regression[:rows])])
    targets = RoiTargets(np.zeros((rows + pad, 4), np.float32), labels, regression,
                         np.arange(rows + pad) < rows)
    got = fast_rcnn_loss(logits, deltas, targets, beta=1 / 9)
    np.testing.assert_allclose(float(got.classification), float(ce), rtol=1e-6)
    np.testing.assert_allclose(float(got.box), float(box), rtol=1e-6)


def test_fast_rcnn_loss_gradient_under_jit():
    proposals, p_valid, gt, labels, g_valid = _scene(3)
    targets = sample_rois(jax.random.key(1), proposals, p_valid, gt, labels, g_valid,
                          num_samples=64)
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
    deltas = jnp.asarray(rng.normal(size=(64, 24)) * 3, jnp.float32)

    def total(lg, dt):
        return sum(fast_rcnn_loss(lg, dt, targets))

    g_logits, g_deltas = jax.jit(jax.grad(total, argnums=(0, 1)))(logits, deltas)
    g_logits, g_deltas = np.asarray(g_logits), np.asarray(g_deltas).reshape(64, 6, 4)
    assert np.isfinite(g_logits).all() and np.isfinite(g_deltas).all()
    valid, lab = np.asarray(targets.valid), np.asarray(targets.labels)
    assert not g_logits[~valid].any() and g_logits[valid].any()
    # Only the true class's deltas of foreground rows get gradient.
    mask = np.zeros((64, 6), bool)
    mask[np.flatnonzero(valid & (lab > 0)), lab[valid & (lab > 0)]] = True
    assert not g_deltas[~mask].any() and np.abs(g_deltas[mask]).sum(-1).all()


def _sr(**kwargs):
    args = dict(proposals=np.zeros((3, 4)), proposals_valid=np.ones(3, bool),
                gt_boxes=np.array([[0, 0, 4, 4.0], [1, 1, 5, 5]]),
                gt_labels=np.array([1, 2], np.int32), gt_valid=np.ones(2, bool))
    args.update(kwargs)
    return lambda: sample_rois(jax.random.key(0), **args)


def _targets(rows=3):
    return RoiTargets(np.zeros((rows, 4), np.float32), np.array([0, 1, 2][:rows], np.int32),
                      np.zeros((rows, 4), np.float32), np.ones(rows, bool))


@pytest.mark.parametrize("call, message", [
    (_sr(proposals=np.zeros((3, 5))), "sample_rois: proposals.shape=(3, 5) is invalid; "
     "expected [K, 4] boxes as (x1, y1, x2, y2)."),
    (_sr(gt_boxes=np.zeros(4)), "sample_rois: gt_boxes.shape=(4,) is invalid"),
    (_sr(proposals_valid=np.ones(2, bool)),
     "sample_rois: proposals_valid.shape=(2,) is invalid; expected (3,)."),
    (_sr(proposals_valid=np.ones(3)),
     "sample_rois: proposals_valid.dtype='float64' is invalid; expected a bool array."),
    (_sr(gt_labels=np.ones(3, np.int32)), "sample_rois: gt_labels.shape=(3,) is invalid"),
    (_sr(gt_labels=np.ones(2)),
     "sample_rois: gt_labels.dtype='float64' is invalid; expected an integer array."),
    (_sr(gt_valid=np.ones(1, bool)), "sample_rois: gt_valid.shape=(1,) is invalid"),
    (_sr(gt_valid=np.ones(2, np.int32)), "sample_rois: gt_valid.dtype='int32' is invalid"),
    (_sr(num_samples=0), "sample_rois: num_samples=0 is invalid; expected a positive integer."),
    (_sr(fg_fraction=1.5), "sample_rois: fg_fraction=1.5 is invalid; expected a number in [0, 1]."),
    (_sr(fg_thresh=0.0), "sample_rois: fg_thresh=0.0 is invalid; expected a number in (0, 1]."),
    (_sr(bg_thresh_hi=-0.5), "sample_rois: bg_thresh_hi=-0.5 is invalid; expected a number in"),
    (_sr(bg_thresh_lo="x"), "sample_rois: bg_thresh_lo='x' is invalid; expected a number in"),
    (_sr(fg_thresh=0.4), "sample_rois: bg_thresh_hi=0.5 is invalid; "
     "expected bg_thresh_hi <= fg_thresh=0.4."),
    (_sr(bg_thresh_lo=0.3, bg_thresh_hi=0.2),
     "sample_rois: bg_thresh_lo=0.3 is invalid; expected bg_thresh_lo <= bg_thresh_hi=0.2."),
    (_sr(append_gt=1), "sample_rois: append_gt=1 is invalid; expected True or False."),
    (lambda: sample_rois(0, np.zeros((1, 4)), np.ones(1, bool), np.zeros((1, 4)),
                         np.ones(1, np.int32), np.ones(1, bool)),
     "sample_rois: key=0 is invalid; expected a JAX PRNG key"),
    (_sr(box_weights=(1, 1, 0, 1)), "sample_rois: box_weights=(1, 1, 0, 1) is invalid; "
     "expected four positive numbers (wx, wy, ww, wh)."),
    (_sr(proposals=np.array([[0, 0, 1, 1], [0, 0, np.inf, 1], [0, 0, 1, 1.0]])),
     "sample_rois: proposals[1]=[0.0, 0.0, inf, 1.0] is invalid; expected finite coordinates."),
    (_sr(gt_boxes=np.array([[0, 0, 4, 4.0], [5, 1, 1, 5]])),
     "sample_rois: gt_boxes[1]=[5.0, 1.0, 1.0, 5.0] is invalid; expected x1 <= x2 and y1 <= y2"),
    (_sr(gt_labels=np.array([1, 0], np.int32)),
     "sample_rois: gt_labels[1]=0 is invalid; expected a class >= 1 (0 is background)."),
    (lambda: fast_rcnn_loss(np.zeros((3, 3)), np.zeros((3, 3, 4)), (1, 2, 3)),
     "fast_rcnn_loss: targets='tuple' is invalid; expected a RoiTargets (from sample_rois)."),
    (lambda: fast_rcnn_loss(np.zeros((3, 3)), np.zeros((3, 3, 4)),
                            _targets()._replace(labels=np.zeros((3, 1), np.int32))),
     "fast_rcnn_loss: targets.labels.shape=(3, 1) is invalid; expected [S]."),
    (lambda: fast_rcnn_loss(np.zeros((3, 3)), np.zeros((3, 3, 4)),
                            _targets()._replace(regression_targets=np.zeros((3, 2)))),
     "fast_rcnn_loss: targets.regression_targets.shape=(3, 2) is invalid; expected (3, 4)."),
    (lambda: fast_rcnn_loss(np.zeros((3, 3)), np.zeros((3, 3, 4)),
                            _targets()._replace(valid=np.ones(3))),
     "fast_rcnn_loss: targets.valid.dtype='float64' is invalid; expected a bool array."),
    (lambda: fast_rcnn_loss(np.zeros((3, 1)), np.zeros((3, 1, 4)), _targets()),
     "fast_rcnn_loss: class_logits.shape=(3, 1) is invalid; expected (3, C + 1) with C >= 1"),
    (lambda: fast_rcnn_loss(np.zeros((3, 3)), np.zeros((3, 2, 4)), _targets()),
     "fast_rcnn_loss: box_deltas.shape=(3, 2, 4) is invalid; expected (3, 3, 4) or (3, 12)."),
    (lambda: fast_rcnn_loss(np.zeros((3, 3)), np.zeros((3, 12)), _targets(), beta=-1),
     "fast_rcnn_loss: beta=-1 is invalid; expected a finite number >= 0."),
    (lambda: fast_rcnn_loss(np.zeros((3, 2)), np.zeros((3, 2, 4)), _targets()),
     "fast_rcnn_loss: targets.labels[2]=2 is invalid; expected a class in [0, 2)"),
    # float labels were truncated silently (1.7 -> class 1), as check_ground_truth refuses
    (lambda: fast_rcnn_loss(np.zeros((3, 3)), np.zeros((3, 3, 4)),
                            _targets()._replace(labels=np.array([0.0, 1.7, 2.0]))),
     "fast_rcnn_loss: targets.labels.dtype='float64' is invalid; expected an integer array"),
])
def test_errors(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_sample_rois_against_torchvision_roi_heads():
    """torchvision's `RoIHeads` (gt appended, `Matcher(0.5, 0.5)`, `BoxCoder(10, 10, 5, 5)`,
    `BalancedPositiveNegativeSampler(48, 0.25)`) on the valid rows of a scene: the same number of
    foreground and background RoIs, each sampled row one of its candidates with its label (and
    foreground target), and over 400 keys every foreground (background) candidate drawn about
    as often as torchvision's sampler draws it: uniformly, `count / candidates` of the time."""
    torch = pytest.importorskip("torch")
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    proposals, p_valid, gt, labels, g_valid = _scene(5)
    samples = 48
    heads = roi_heads.RoIHeads(None, None, None, 0.5, 0.5, samples, 0.25, WEIGHTS, 0.05, 0.5, 100)
    tv_gt = torch.tensor(gt[g_valid])
    candidates = heads.add_gt_proposals([torch.tensor(proposals[p_valid])], [tv_gt])
    matched, tv_labels = heads.assign_targets_to_proposals(
        candidates, [tv_gt], [torch.tensor(labels[g_valid], dtype=torch.int64)])
    tv_targets = heads.box_coder.encode([tv_gt[matched[0]]], candidates)[0].numpy()
    boxes, tv_labels = candidates[0].numpy(), tv_labels[0].numpy()
    fg, bg = np.flatnonzero(tv_labels > 0), np.flatnonzero(tv_labels == 0)
    torch.manual_seed(0)
    tv_fg = np.zeros(len(boxes))
    tv_bg = np.zeros(len(boxes))
    for _ in range(400):
        pos, neg = heads.fg_bg_sampler([torch.tensor(tv_labels)])
        tv_fg += pos[0].numpy()
        tv_bg += neg[0].numpy()
    n_fg, n_bg = tv_fg.sum() / 400, tv_bg.sum() / 400  # the same counts every draw

    keys = jax.random.split(jax.random.key(0), 400)
    out = jax.jit(jax.vmap(lambda k: sample_rois(k, proposals, p_valid, gt, labels, g_valid,
                                                 num_samples=samples)))(keys)
    rois, got_labels, targets, valid = _rows(out)
    assert 0 < n_fg < len(fg) and 0 < n_bg < len(bg)  # both sampled, not all taken
    np.testing.assert_array_equal((got_labels > 0).sum(1), n_fg)
    np.testing.assert_array_equal(valid.sum(1), n_fg + n_bg)
    # Each sampled row is a torchvision candidate with its label and (float32) target.
    distance = np.abs(rois[:, :, None] - boxes[None, None]).max(-1)  # [keys, S, candidates]
    index = distance.argmin(-1)
    assert distance.min(-1)[valid].max() < 1e-5
    np.testing.assert_array_equal(got_labels[valid], tv_labels[index[valid]])
    is_fg = valid & (got_labels > 0)  # torchvision encodes background too, and ignores it
    np.testing.assert_allclose(targets[is_fg], tv_targets[index[is_fg]], atol=1e-4)
    assert not targets[~is_fg].any()
    counts = np.zeros(len(boxes))
    np.add.at(counts, index[valid], 1)
    for pool, tv_counts, rate in ((fg, tv_fg, n_fg / len(fg)), (bg, tv_bg, n_bg / len(bg))):
        sigma = np.sqrt(400 * rate * (1 - rate))
        assert np.abs(counts[pool] - 400 * rate).max() < 5 * sigma  # uniform, as torchvision
        assert np.abs(tv_counts[pool] - 400 * rate).max() < 5 * sigma

"""Anchor labelling against a float64 NumPy loop re-implementation of py-faster-rcnn's
anchor_target_layer rule, and the balanced sampler's counts, determinism and uniformity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.detection.anchors import anchor_grid, anchors_inside, generate_anchors
from cnnjax.detection.matching import (
    IGNORE,
    NEGATIVE,
    POSITIVE,
    label_anchors,
    sample_balanced,
)
from tests.detection.reference import iou_ref


def _label_ref(anchors, gt, gt_valid, fg, bg, force_best=True, anchor_valid=None):
    """Loop version of the rule: negatives, then each gt's best anchors (ties; best IoU > 0), then
    IoU >= fg; invalid anchors ignored."""
    num_a = len(anchors)
    anchor_valid = np.ones(num_a, bool) if anchor_valid is None else anchor_valid
    gts = [g for g in range(len(gt)) if gt_valid[g]]
    labels = np.full(num_a, -1)
    matched = np.zeros(num_a, int)
    max_iou = np.zeros(num_a)
    iou = {(a, g): iou_ref(anchors[a], gt[g]) for a in range(num_a) for g in gts}
    for a in range(num_a):
        if not anchor_valid[a]:
            continue
        best, best_g = -1.0, 0
        for g in gts:
            if iou[a, g] > best:
                best, best_g = iou[a, g], g
        matched[a], max_iou[a] = best_g, max(best, 0.0)
        if best < bg:
            labels[a] = 0
    if force_best:
        for g in gts:
            best = max((iou[a, g] for a in range(num_a) if anchor_valid[a]), default=0.0)
            for a in range(num_a):
                if anchor_valid[a] and best > 0 and iou[a, g] == best:
                    labels[a] = 1
    for a in range(num_a):
        if anchor_valid[a] and gts and max_iou[a] >= fg:
            labels[a] = 1
    return labels, matched, max_iou


def _scene(seed, num_gt=6, num_pad=2):
    rng = np.random.default_rng(seed)
    anchors = np.asarray(anchor_grid((5, 6), 16, generate_anchors(16, (0.5, 1, 2), (1, 2, 4))),
                         np.float64)
    xy = rng.uniform(0, 80, size=(num_gt, 2))
    wh = rng.uniform(10, 50, size=(num_gt, 2))
    gt = np.concatenate([np.concatenate([xy, xy + wh], 1),
                         rng.uniform(-99, 99, size=(num_pad, 4))])  # padding: garbage
    gt_valid = np.arange(num_gt + num_pad) < num_gt
    return anchors, gt, gt_valid


@pytest.mark.parametrize("seed, fg, bg, force_best, inside", [
    (0, 0.7, 0.3, True, False),
    (1, 0.7, 0.3, True, True),
    (2, 0.5, 0.5, True, False),
    (3, 0.6, 0.2, False, True),
])
def test_label_anchors_matches_loop_reference(seed, fg, bg, force_best, inside):
    anchors, gt, gt_valid = _scene(seed)
    anchor_valid = np.asarray(anchors_inside(anchors, (80, 96))) if inside else None
    labels, matched, max_iou = _label_ref(anchors, gt, gt_valid, fg, bg, force_best, anchor_valid)
    assert (labels == 1).sum() > 0 and (labels == 0).sum() > 0
    with jax.enable_x64(True):
        got = label_anchors(anchors, gt, gt_valid, fg, bg, force_best, anchor_valid)
        np.testing.assert_allclose(np.asarray(got.max_iou), max_iou, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(got.labels), labels)
    np.testing.assert_array_equal(np.asarray(got.matched_gt)[labels == 1], matched[labels == 1])
    # float32 agrees too (no IoU lands within rounding of a threshold in these scenes).
    got32 = label_anchors(anchors.astype(np.float32), gt.astype(np.float32), gt_valid, fg, bg,
                          force_best, anchor_valid)
    assert got32.labels.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got32.labels), labels)


@pytest.mark.parametrize("seed", range(8))
def test_label_anchors_matches_torchvision_matcher(seed):
    """torchvision's RPN `Matcher(0.7, 0.3, allow_low_quality_matches=True)` on the same boxes
    (every anchor valid, as torchvision's RPN has it; every gt overlaps some anchor, where the
    documented deviation cannot arise): the same label for every anchor, and the same gt for
    every positive."""
    torch = pytest.importorskip("torch")
    utils = pytest.importorskip("torchvision.models.detection._utils")
    from torchvision.ops import box_iou as torch_box_iou

    rng = np.random.default_rng(seed)
    corner = rng.uniform(0, 60, (300, 2))
    anchors = np.concatenate([corner, corner + rng.uniform(4, 30, (300, 2))], 1, dtype=np.float32)
    corner = rng.uniform(0, 60, (1 + seed % 5, 2))
    gt = np.concatenate([corner, corner + rng.uniform(4, 30, corner.shape)], 1, dtype=np.float32)
    quality = torch_box_iou(torch.tensor(gt), torch.tensor(anchors))
    assert bool((quality.max(dim=1).values > 0).all())
    matches = utils.Matcher(0.7, 0.3, allow_low_quality_matches=True)(quality).numpy()
    got = label_anchors(anchors, gt, np.ones(len(gt), bool), 0.7, 0.3)
    expected = np.where(matches >= 0, POSITIVE, np.where(matches == -1, NEGATIVE, IGNORE))
    np.testing.assert_array_equal(np.asarray(got.labels), expected)
    positive = matches >= 0
    assert positive.any()
    np.testing.assert_array_equal(np.asarray(got.matched_gt)[positive], matches[positive])


def test_forced_positives_include_ties_and_low_iou():
    anchors = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [40, 40, 50, 50], [0, 0, 30, 30]],
                       np.float32)
    # The gt straddles anchors 0 and 1 equally (IoU 1/3 each, below fg and above bg), and anchor 3
    # has IoU 100/900 = 1/9 < bg. A second gt overlaps no anchor at all.
    gt = np.array([[5, 0, 15, 10], [100, 100, 110, 110]], np.float32)
    valid = np.array([True, True])
    out = label_anchors(anchors, gt, valid, 0.7, 0.3)
    np.testing.assert_array_equal(np.asarray(out.labels), [POSITIVE, POSITIVE, NEGATIVE, NEGATIVE])
    np.testing.assert_allclose(np.asarray(out.max_iou), [1 / 3, 1 / 3, 0, 1 / 9], rtol=1e-6)
    no_force = label_anchors(anchors, gt, valid, 0.7, 0.3, force_best=False)
    np.testing.assert_array_equal(np.asarray(no_force.labels), [IGNORE, IGNORE, NEGATIVE, NEGATIVE])
    # Without valid gt boxes every anchor is background; invalid anchors are ignored.
    empty = label_anchors(anchors, gt, np.array([False, False]), 0.7, 0.3,
                          anchor_valid=np.array([True, False, True, True]))
    np.testing.assert_array_equal(np.asarray(empty.labels), [0, -1, 0, 0])
    none = label_anchors(anchors, np.zeros((0, 4), np.float32), np.zeros(0, bool))
    np.testing.assert_array_equal(np.asarray(none.labels), [0, 0, 0, 0])


@pytest.mark.parametrize("force_best", [False, True])
def test_an_iou_exactly_at_a_threshold_falls_on_its_documented_side(force_best):
    """IoU `>= fg_thresh` is positive and `< bg_thresh` negative. The reference tests' random
    boxes never land exactly on a threshold, so labelling an IoU equal to fg_thresh ignored
    (`>` for `>=`) or one equal to bg_thresh negative (`<=` for `<`) went unnoticed. Anchors
    sharing the gt's corner, 10 px wide and 7.5, 20, 40, 80 px tall against a 10 x 10 gt, have
    IoUs 75/100, 100/200, 100/400, 100/800: exact in float32, as the thresholds are."""
    anchors = np.array([[0, 0, 10, 7.5], [0, 0, 10, 20], [0, 0, 10, 40], [0, 0, 10, 80],
                        [0, 0, 10, 10]], np.float32)
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)  # the second overlaps nothing
    valid = np.array([True, True])
    with_gt = label_anchors(anchors[:4], gt, valid, 0.5, 0.25, force_best)
    assert np.asarray(with_gt.max_iou).tolist() == [0.75, 0.5, 0.25, 0.125]  # exactly
    np.testing.assert_array_equal(np.asarray(with_gt.labels),
                                  [POSITIVE, POSITIVE, IGNORE, NEGATIVE])
    np.testing.assert_array_equal(np.asarray(label_anchors(anchors[:4], gt, valid, 0.75, 0.5,
                                                           force_best).labels),
                                  [POSITIVE, IGNORE, NEGATIVE, NEGATIVE])
    # fg_thresh == bg_thresh leaves nothing ignored: IoU at the threshold is positive.
    np.testing.assert_array_equal(np.asarray(label_anchors(anchors[:4], gt, valid, 0.5, 0.5,
                                                           force_best).labels),
                                  [POSITIVE, POSITIVE, NEGATIVE, NEGATIVE])
    # fg_thresh 1 (allowed: "(0, 1]") keeps exact matches positive, whether forced or not.
    exact = label_anchors(anchors, gt, valid, 1.0, 0.25, force_best)
    assert float(exact.max_iou[4]) == 1.0
    np.testing.assert_array_equal(np.asarray(exact.labels),
                                  [IGNORE, IGNORE, IGNORE, NEGATIVE, POSITIVE])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_label_anchors_half_precision_boxes_get_float32_ious(dtype):
    # 300 x 300 boxes: areas of 90000 px^2 overflow float16 (max 65504). Reference: iou_ref in
    # float64 on the same (exactly representable) coordinates; max_iou within 1e-6.
    anchors = np.array([[0, 0, 300, 300], [0, 0, 288, 300], [0, 0, 64, 64]], np.float64)
    gt = np.array([[8, 0, 300, 300]], np.float64)
    want = [iou_ref(a, gt[0]) for a in anchors]  # 0.973, 0.947, 0.044
    out = label_anchors(jnp.asarray(anchors, dtype), jnp.asarray(gt, dtype), np.array([True]))
    np.testing.assert_allclose(np.asarray(out.max_iou, np.float64), want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.labels), [POSITIVE, POSITIVE, NEGATIVE])


def test_label_anchors_vmaps_over_a_padded_batch_under_jit():
    scenes = [_scene(seed) for seed in (4, 5)]
    anchors = scenes[0][0].astype(np.float32)
    gts = np.stack([s[1] for s in scenes]).astype(np.float32)
    valid = np.stack([s[2] for s in scenes])
    valid[1, 3:] = False  # the second image has 3 boxes
    batched = jax.jit(jax.vmap(lambda g, v: label_anchors(anchors, g, v).labels))(gts, valid)
    for i in range(2):
        ref, _, _ = _label_ref(anchors.astype(np.float64), gts[i].astype(np.float64), valid[i],
                               0.7, 0.3)
        np.testing.assert_array_equal(np.asarray(batched[i]), ref)


def _labels(num_pos, num_neg, total, seed=0):
    labels = np.array([1] * num_pos + [0] * num_neg + [-1] * (total - num_pos - num_neg), np.int32)
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("num_pos, num_neg, expect_pos, expect_neg", [
    (300, 5000, 128, 128),  # both capped
    (40, 5000, 40, 216),  # few positives: negatives fill the batch
    (300, 50, 128, 50),  # few negatives: the batch is not filled up with positives
    (0, 10, 0, 10),
])
def test_sampler_counts(num_pos, num_neg, expect_pos, expect_neg):
    labels = _labels(num_pos, num_neg, 6000)  # one length: one compilation for all cases
    pos, neg = sample_balanced(jax.random.key(0), labels, 256, 0.5)
    assert int(pos.sum()) == expect_pos and int(neg.sum()) == expect_neg
    assert np.all(labels[np.asarray(pos)] == 1) and np.all(labels[np.asarray(neg)] == 0)
    # Same key, same masks; another key, another sample (where there is a choice to make).
    again = sample_balanced(jax.random.key(0), labels, 256, 0.5)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(pos))
    np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(neg))
    other = sample_balanced(jax.random.key(1), labels, 256, 0.5)
    assert not np.array_equal(np.asarray(other[1]), np.asarray(neg)) or expect_neg == num_neg


def test_sampler_is_uniform_under_vmap():
    labels = _labels(20, 60, 100)
    draw = jax.jit(jax.vmap(lambda k: sample_balanced(k, labels, 16, 0.25)))
    pos, neg = (np.asarray(m) for m in draw(jax.random.split(jax.random.key(7), 400)))
    assert np.all(pos.sum(1) == 4) and np.all(neg.sum(1) == 12)
    # Every positive is picked with probability 4/20, every negative with 12/60 (binomial std
    # 0.02 over 400 draws; 5 std tolerance); ignored anchors never.
    np.testing.assert_allclose(pos.mean(0)[labels == 1], 0.2, atol=0.1)
    np.testing.assert_allclose(neg.mean(0)[labels == 0], 0.2, atol=0.1)
    # Jointly: a chi-square test of equal pick counts across the anchors of each kind (a mild
    # bias, e.g. 0.25 for the first anchors and 0.15 for the last, fails it; p = 1e-3).
    from scipy.stats import chi2

    for picks in (pos[:, labels == 1], neg[:, labels == 0]):
        counts = picks.sum(0)
        expected = counts.mean()
        stat = float(((counts - expected) ** 2 / expected).sum())
        assert stat < chi2.ppf(0.999, df=len(counts) - 1), (stat, counts)
    assert not pos[:, labels != 1].any() and not neg[:, labels != 0].any()


@pytest.mark.parametrize("call, message", [
    (lambda: label_anchors(np.zeros((3, 4)), np.zeros((2, 4)), np.ones(2, bool), 0.3, 0.7),
     "label_anchors: fg_thresh=0.3 is invalid; expected fg_thresh >= bg_thresh=0.7."),
    (lambda: label_anchors(np.zeros((3, 4)), np.zeros((2, 4)), np.ones(2, bool), 1.5),
     "label_anchors: fg_thresh=1.5 is invalid; expected a number in (0, 1]."),
    (lambda: label_anchors(np.zeros((3, 4)), np.zeros((2, 4)), np.ones(2, bool), 0.0, 0.0),
     "label_anchors: fg_thresh=0.0 is invalid; expected a number in (0, 1]."),
    (lambda: label_anchors(np.zeros((3, 4)), np.zeros((2, 4)), np.ones(2, bool), 0.7, -0.1),
     "label_anchors: bg_thresh=-0.1 is invalid"),
    (lambda: label_anchors(np.zeros((3, 5)), np.zeros((2, 4)), np.ones(2, bool)),
     "label_anchors: anchors.shape=(3, 5) is invalid"),
    (lambda: label_anchors(np.zeros((3, 4)), np.zeros(4), np.ones(1, bool)),
     "label_anchors: gt_boxes.shape=(4,) is invalid"),
    (lambda: label_anchors(np.zeros((3, 4)), np.zeros((2, 4)), np.ones(3, bool)),
     "label_anchors: gt_valid.shape=(3,) is invalid; expected (2,)."),
    (lambda: label_anchors(np.zeros((3, 4)), np.zeros((2, 4)), np.ones(2)),
     "label_anchors: gt_valid.dtype='float64' is invalid; expected a bool array."),
    (lambda: label_anchors(np.zeros((3, 4)), np.zeros((2, 4)), np.ones(2, bool),
                           anchor_valid=np.ones(2, bool)),
     "label_anchors: anchor_valid.shape=(2,) is invalid; expected (3,)."),
    (lambda: label_anchors(np.zeros((3, 4)), np.zeros((2, 4)), np.ones(2, bool), force_best=1),
     "label_anchors: force_best=1 is invalid; expected True or False."),
    # These named box_iou's `boxes`, or failed in a zero-size reduction (no anchor).
    (lambda: label_anchors(np.zeros((3, 4)), np.array([[0, 0, 4, 4], [5, 5, 1, 1.0]]),
                           np.ones(2, bool)),
     "label_anchors: gt_boxes[1]=[5.0, 5.0, 1.0, 1.0] is invalid; expected x1 <= x2 and "
     "y1 <= y2 (boxes are (x1, y1, x2, y2))."),
    (lambda: label_anchors(np.array([[0, 0, 4, 4], [0, 0, np.nan, 4]]), np.zeros((1, 4)),
                           np.ones(1, bool)),
     "label_anchors: anchors[1]=[0.0, 0.0, nan, 4.0] is invalid; expected finite coordinates."),
    (lambda: label_anchors(np.zeros((0, 4)), np.array([[0, 0, 4, 4.0]]), np.ones(1, bool)),
     "label_anchors: anchors.shape=(0, 4) is invalid; expected [A, 4] with A >= 1 anchors to "
     "label."),
    (lambda: label_anchors(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0, bool)),
     "label_anchors: anchors.shape=(0, 4) is invalid"),
    (lambda: sample_balanced(jax.random.key(0), np.zeros((2, 3), np.int32)),
     "sample_balanced: labels.shape=(2, 3) is invalid; expected [A]."),
    (lambda: sample_balanced(jax.random.key(0), np.zeros(3)),
     "sample_balanced: labels.dtype='float64' is invalid"),
    (lambda: sample_balanced(jax.random.key(0), np.zeros(3, np.int32), 0),
     "sample_balanced: num_samples=0 is invalid; expected a positive integer."),
    (lambda: sample_balanced(jax.random.key(0), np.zeros(3, np.int32), 8, 1.5),
     "sample_balanced: positive_fraction=1.5 is invalid; expected a number in [0, 1]."),
    # Class ids passed by mistake were neither positive nor negative: mostly empty masks.
    (lambda: sample_balanced(jax.random.key(0), np.array([1, 0, 2, -1], np.int32)),
     "sample_balanced: labels[2]=2 is invalid; expected 1 (positive), 0 (negative) or -1 "
     "(ignored)."),
    # A seed for a key failed inside jax.random ("invalid PRNG key data"), naming neither.
    (lambda: sample_balanced(0, np.zeros(3, np.int32)),
     "sample_balanced: key=0 is invalid; expected a JAX PRNG key (jax.random.key(seed) or "
     "jax.random.PRNGKey(seed)), not a seed."),
    (lambda: sample_balanced(np.zeros(2, np.int32), np.zeros(3, np.int32)),
     "sample_balanced: key='array of dtype int32 and shape (2,)' is invalid"),
])
def test_errors(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_raw_keys_and_traced_labels_are_taken():
    """A raw uint32 key samples as its typed twin does; under jit the labels' values are not
    checked (they are unknown) and the masks are the same."""
    labels = np.array([1, 0, -1, 1, 0, 0], np.int32)
    typed = sample_balanced(jax.random.key(3), labels, 4)
    raw = sample_balanced(jax.random.PRNGKey(3), labels, 4)
    jitted = jax.jit(lambda k, lab: sample_balanced(k, lab, 4))(jax.random.key(3), labels)
    for got in (raw, jitted):
        np.testing.assert_array_equal(np.stack(got), np.stack(typed))

"""mixup and CutMix (cnnjax.train.mixing) against float64 NumPy; the checks of their settings."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.train import mixing

B, H, W, C, K = 6, 7, 9, 2, 5  # odd, non-square images: boxes clip unevenly at the borders
MIXUP = {"mixup_alpha": 1.0, "cutmix_alpha": 0.0}
CUTMIX = {"mixup_alpha": 0.0, "cutmix_alpha": 1.0}
BOTH = {"mixup_alpha": 1.0, "cutmix_alpha": 1.0}


def _batch(seed=0, shape=(B, H, W, C)):
    """Continuous random pixels, so a pixel equal to the partner's was copied from it."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.integers(0, K, shape[0]).astype(np.int32)


def _keys(n, seed=0):
    return jax.random.split(jax.random.PRNGKey(seed), n)


def _mix_many(keys, images, labels, **settings):
    """mix_batch jitted and vmapped over `keys`: outputs with a leading axis of len(keys)."""
    mix = partial(mixing.mix_batch, num_classes=K, **settings)
    out = jax.jit(jax.vmap(mix, in_axes=(0, None, None)))(keys, images, labels)
    return jax.tree.map(np.asarray, out)


def _np_targets(labels, lam):
    eye = np.eye(K)
    return lam * eye[labels] + (1 - lam) * eye[labels[::-1]]


def test_mixup_blends_each_image_with_the_reversed_batch():
    images, labels = _batch()
    mixed, targets, lam = _mix_many(_keys(8), images, labels, **MIXUP)
    assert np.all((lam > 0) & (lam < 1))
    x = images.astype(np.float64)
    for i, lam_i in enumerate(lam.astype(np.float64)):
        # float32 arithmetic on unit-scale pixels: a few ulp.
        np.testing.assert_allclose(mixed[i], lam_i * x + (1 - lam_i) * x[::-1], rtol=0, atol=2e-6)
        np.testing.assert_allclose(targets[i], _np_targets(labels, lam_i), rtol=0, atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=0, atol=1e-6)


def test_cutmix_pastes_one_rectangle_of_area_one_minus_lam():
    images, labels = _batch()
    mixed, targets, lam = _mix_many(_keys(64), images, labels, **CUTMIX)
    areas = []
    for i in range(len(lam)):
        from_partner, from_self = mixed[i] == images[::-1], mixed[i] == images
        assert np.all(from_partner ^ from_self)  # every pixel copied, none blended
        box = from_partner[0, :, :, 0]
        assert np.array_equal(from_partner, np.broadcast_to(box[None, :, :, None], mixed[i].shape))
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        assert np.array_equal(box, np.outer(box.any(1), box.any(0)))  # rows x columns ...
        for run in (rows, cols):  # ... each one contiguous run
            assert run.size == 0 or run[-1] - run[0] + 1 == run.size
        area = int(box.sum())
        assert area == round((1 - float(lam[i])) * H * W)  # lam is the area actually left
        np.testing.assert_allclose(1 - float(lam[i]), area / (H * W), rtol=0, atol=1e-6)
        np.testing.assert_allclose(targets[i], _np_targets(labels, float(lam[i])), atol=1e-6)
        areas.append(area)
    assert len(set(areas)) > 10  # boxes of many sizes (some empty, when lam rounds to 1)


def test_cutmix_lam_is_the_uncovered_fraction_to_the_last_bit():
    """Under jit, 1 - area / (H W) was computed with a multiply by 1/(H W): a 7x7 image wholly
    covered left lam = 2e-8 (negative at other sizes), never 0; lam is (H W - area) / (H W)
    now, within float32's rounding of the fraction and exactly 0 for a whole-image box."""
    images = jnp.ones((2, 7, 7, 1))
    partner = jnp.zeros_like(images)
    cut = jax.jit(jax.vmap(lambda key: mixing._cutmix(key, images, partner, jnp.float32(0.0))))
    mixed, lam = cut(jax.random.split(jax.random.key(0), 4000))
    uncovered = np.asarray(mixed[:, 0]).sum(axis=(1, 2, 3))  # ones left where no box was pasted
    np.testing.assert_allclose(np.asarray(lam), uncovered / 49, rtol=2.5e-7, atol=0)
    assert (uncovered == 0).any()  # whole-image boxes were drawn: lam exactly 0


@pytest.mark.parametrize("switch_prob", [0.0, 0.5, 1.0])
def test_switch_prob_is_the_cutmix_frequency(switch_prob):
    images, labels = _batch()
    mixed, _, _ = _mix_many(_keys(1000), images, labels, **BOTH, switch_prob=switch_prob)
    copied = np.all((mixed == images) | (mixed == images[::-1]), axis=(1, 2, 3, 4))  # CutMix
    assert abs(copied.mean() - switch_prob) < 0.06  # 4 binomial standard deviations at 0.5


def test_prob_is_the_mixed_fraction_and_unmixed_batches_are_untouched():
    images, labels = _batch()
    mixed, targets, lam = _mix_many(_keys(1000), images, labels, **MIXUP, prob=0.3)
    kept = lam == 1.0
    assert abs(1 - kept.mean() - 0.3) < 0.06
    np.testing.assert_array_equal(mixed[kept], np.broadcast_to(images, mixed[kept].shape))
    np.testing.assert_array_equal(targets[kept],
                                  np.broadcast_to(np.eye(K)[labels], targets[kept].shape))


@pytest.mark.parametrize("settings", [{**BOTH, "prob": 0.0},
                                      {"mixup_alpha": 0.0, "cutmix_alpha": 0.0}])
def test_disabled_mixing_returns_the_batch_and_one_hot_targets(settings):
    images, labels = _batch()
    prob = settings.get("prob", 1.0)
    assert not mixing.mixing_enabled(settings["mixup_alpha"], settings["cutmix_alpha"], prob)
    mixed, targets, lam = mixing.mix_batch(jax.random.PRNGKey(0), images, labels, K, **settings)
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_array_equal(targets, np.eye(K)[labels])
    assert targets.dtype == jnp.float32 and float(lam) == 1.0


def test_mixing_enabled():
    assert mixing.mixing_enabled(0.2, 0.0) and mixing.mixing_enabled(0.0, 1.0, 0.5)
    assert not mixing.mixing_enabled(0.0, 0.0) and not mixing.mixing_enabled(0.2, 1.0, 0.0)


def test_deterministic_given_rng_jit_matches_eager_and_rngs_differ():
    images, labels = _batch()
    mix = partial(mixing.mix_batch, num_classes=K, **BOTH)
    key = jax.random.PRNGKey(7)
    first, again = jax.jit(mix)(key, images, labels), jax.jit(mix)(key, images, labels)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    eager = mix(key, images, labels)
    jax.tree.map(partial(np.testing.assert_allclose, rtol=0, atol=2e-6), first, eager)
    _, _, lam = _mix_many(_keys(16), images, labels, **BOTH)
    assert len(np.unique(lam)) == 16


def _lams(n, shape, **settings):
    """lam of `n` batches of `shape` (jitted and vmapped; only lam is computed)."""
    images, labels = _batch(shape=shape)
    mix = partial(mixing.mix_batch, num_classes=K, **settings)
    return np.asarray(jax.jit(jax.vmap(lambda key: mix(key, images, labels)[2]))(_keys(n)))


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_lam_follows_beta_alpha_alpha(alpha):
    """20000 draws: mean 0.5 (std. error <= 0.003), variance 1 / (4 (2 alpha + 1))."""
    lam = _lams(20000, (2, 1, 1, 1), mixup_alpha=alpha, cutmix_alpha=0.0)
    assert np.all(np.isfinite(lam)) and np.all((lam >= 0) & (lam <= 1))
    assert abs(lam.mean() - 0.5) < 0.02
    np.testing.assert_allclose(lam.var(), 1 / (4 * (2 * alpha + 1)), rtol=0.1)


def _official_box(size, cut, centre):
    """One axis of the CutMix authors' `rand_bbox` (Yun et al. 2019, clovaai/CutMix-PyTorch
    train.py; timm's `rand_bbox` is the same): [centre - cut // 2, centre + cut // 2) clipped, so
    an odd cut gives a box one pixel narrower than `cut`."""
    return np.clip(centre - cut // 2, 0, size), np.clip(centre + cut // 2, 0, size)


def _cnnjax_box(size, cut, centre):
    """One axis of cnnjax's box (its docstring): exactly `cut` = floor(size * sqrt(1 - lam))
    pixels, the paper's r_w = W sqrt(1 - lam), starting at centre - cut // 2, clipped."""
    start = centre - cut // 2
    return np.clip(start, 0, size), np.clip(start + cut, 0, size)


def _exact_box_law(size_hw, alpha, box):
    """Exact law of the clipped CutMix box (no sampling): lam ~ Beta(alpha, alpha) through its
    CDF (scipy's regularized incomplete beta), both sides floor(side * s) of the same
    s = sqrt(1 - lam), centre pixel uniform on each axis, one axis of the box given by `box`.
    Returns [(probability, y-intervals over all centres, x-intervals over all centres)], one
    entry per (cut_h, cut_w) pair the draw of lam can give.

    One float32 effect is part of the law: 1 - lam rounds to 1 for lam <= 2**-25, so s = 1 and
    the box is the whole image (lam then 0, consistent labels) with probability
    F(2**-25) = 0.3% at alpha = 0.3 (the float64 reference code: F(1e-16) ~ 1e-5)."""
    from scipy.special import betainc

    height, width = size_hw
    edges = np.unique(np.concatenate([np.arange(height + 1) / height,
                                      np.arange(width + 1) / width]))  # where a floor changes
    whole = betainc(alpha, alpha, 2.0**-25)  # P(s == 1 in float32)
    law = [(whole, box(height, height, np.arange(height)), box(width, width, np.arange(width)))]
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        # P(low <= s < high) = P(1 - high^2 < lam <= 1 - low^2), less the float32 s == 1
        p = betainc(alpha, alpha, 1 - low**2) - betainc(alpha, alpha, 1 - high**2)
        p -= whole if high == 1 else 0.0
        s = 0.5 * (low + high)  # both floors are constant on [low, high)
        cut_h, cut_w = int(np.floor(height * s)), int(np.floor(width * s))
        law.append((p, box(height, cut_h, np.arange(height)), box(width, cut_w, np.arange(width))))
    assert abs(sum(p for p, _, _ in law) - 1) < 1e-12
    return law


def _cutmix_boxes(n, size_hw, alpha):
    """`n` CutMix draws on a batch of a zero image and a ones image: each draw's box
    (y0, y1, x0, x1, all 0 when empty, from the pixels) and its returned lam."""
    height, width = size_hw
    images = np.stack([np.zeros((height, width, 1)), np.ones((height, width, 1))])
    images = images.astype(np.float32)
    mix = partial(mixing.mix_batch, num_classes=K, mixup_alpha=0.0, cutmix_alpha=alpha)
    mixed, _, lam = jax.jit(jax.vmap(lambda key: mix(key, images, np.array([0, 1], np.int32))))(
        _keys(n))
    box = np.asarray(mixed)[:, 0, :, :, 0] == 1  # the first image shows its partner's ones
    rows, cols = box.any(2), box.any(1)
    assert np.array_equal(box, rows[:, :, None] & cols[:, None, :])  # a rows x columns box ...
    for runs in (rows, cols):  # ... each a contiguous run
        count, first = runs.sum(1), runs.argmax(1)
        assert np.all(count == np.where(count, runs.shape[1] - first - runs[:, ::-1].argmax(1),
                                        0))
    nonempty = rows.any(1)
    y0, x0 = rows.argmax(1), cols.argmax(1)
    y1, x1 = y0 + rows.sum(1), x0 + cols.sum(1)
    return np.stack([y0, y1, x0, x1]) * nonempty, np.asarray(lam, np.float64)


@pytest.mark.parametrize("rule", [
    "cnnjax",
    pytest.param("official", marks=pytest.mark.xfail(strict=True, reason=(
        "cnnjax's box is floor(side * sqrt(1 - lam)) pixels, the paper's r_w = W sqrt(1 - lam); "
        "the authors' code (and timm) spans centre +- cut // 2, one pixel less for an odd cut, "
        "so cnnjax covers slightly more on average (mean lam 0.690 vs 0.701 at 32x32, "
        "alpha=1; 0.6807 vs 0.6822 at 224x224)"))),
])
@pytest.mark.parametrize("alpha", [0.3, 2.0])
def test_cutmix_box_and_lam_follow_the_exact_law_of_the_reference_rule(alpha, rule):
    """20000 CutMix boxes on 16x12 images against the exact law of the CutMix box (no simulation:
    `_exact_box_law`). Per draw, lam is exactly 1 - box area / image area (the authors' and
    timm's corrected lam). Over the draws: the (y0, y1) and (x0, x1) spans follow their exact
    laws (chi-square, p > 1e-4; cells expected < 5 times pooled), and the mean lam, the mean
    corner coordinates and the empty-box rate lie within 4.5 exact standard errors of their
    exact means (the two sides share one lam, which the area's law needs)."""
    from scipy.stats import chisquare

    n, size_hw = 20000, (16, 12)
    box = {"cnnjax": _cnnjax_box, "official": _official_box}[rule]
    law = _exact_box_law(size_hw, alpha, box)
    corners, lam = _cutmix_boxes(n, size_hw, alpha)
    y0, y1, x0, x1 = corners
    area = (y1 - y0) * (x1 - x0)
    np.testing.assert_allclose(lam, 1 - area / np.prod(size_hw), rtol=0, atol=1e-6)

    def corners_law():
        """(probability, y0, y1, x0, x1 over all centre pixels, all 0 where the box is empty)."""
        for p, (ya, yb), (xa, xb) in law:
            y0_, y1_, x0_, x1_ = ya[:, None], yb[:, None], xa[None, :], xb[None, :]
            nonempty = (y1_ > y0_) & (x1_ > x0_)
            yield p, [np.where(nonempty, c, 0) for c in (y0_, y1_, x0_, x1_)]

    features = {
        "lam": lambda y0, y1, x0, x1: 1 - (y1 - y0) * (x1 - x0) / np.prod(size_hw),
        "y0": lambda y0, y1, x0, x1: y0, "y1": lambda y0, y1, x0, x1: y1,
        "x0": lambda y0, y1, x0, x1: x0, "x1": lambda y0, y1, x0, x1: x1,
        "empty": lambda y0, y1, x0, x1: (y1 - y0) * (x1 - x0) == 0,
    }
    for name, feature in features.items():
        mean = sum(p * feature(*c).mean() for p, c in corners_law())
        var = sum(p * (feature(*c).astype(np.float64) ** 2).mean() for p, c in corners_law())
        var -= mean**2
        observed = feature(y0, y1, x0, x1).mean()
        assert abs(observed - mean) < 4.5 * np.sqrt(var / n), (name, observed, mean)

    for axis, (lo, hi) in enumerate(((y0, y1), (x0, x1))):
        expected = {}
        for p, *spans in law:
            other = spans[1 - axis]
            other_nonempty = np.mean(other[1] > other[0])
            for a, b in zip(*spans[axis], strict=True):
                span = (int(a), int(b)) if b > a else (0, 0)
                share = p / len(spans[axis][0])
                expected[span] = expected.get(span, 0) + share * other_nonempty
                expected[(0, 0)] = expected.get((0, 0), 0) + share * (1 - other_nonempty)
        spans_seen = {}
        for a, b in zip(lo, hi, strict=True):
            spans_seen[(int(a), int(b))] = spans_seen.get((int(a), int(b)), 0) + 1
        assert set(spans_seen) <= set(expected), set(spans_seen) - set(expected)
        cells = sorted(expected, key=expected.get)
        rare = [c for c in cells if expected[c] * n < 5]
        common = [c for c in cells if expected[c] * n >= 5]
        obs = [spans_seen.get(c, 0) for c in common]
        exp = [expected[c] * n for c in common]
        if rare:
            obs.append(sum(spans_seen.get(c, 0) for c in rare))
            exp.append(sum(expected[c] for c in rare) * n)
        assert chisquare(obs, exp).pvalue > 1e-4, ("yx"[axis], chisquare(obs, exp))


def test_with_both_methods_on_each_draws_lam_from_its_own_alpha():
    """mixup_alpha=5 and cutmix_alpha=0.1 (switch_prob 0.5, 4000 batches of two 16x12 images):
    the lam of the mixup batches has the first two moments of Beta(5, 5) (closed form:
    E[lam^k] = prod_{j<k} (5 + j) / (10 + j)) and the corrected lam of the CutMix batches those of
    the exact law of the clipped box with lam ~ Beta(0.1, 0.1) (`_exact_box_law`), each within
    4.5 exact standard errors. The other tests turn one method on at a time or give both the
    same alpha, so a step that swapped the alphas (mixup from Beta(0.1): E[lam^2] 0.458 instead
    of 0.273; CutMix from Beta(5): 0.494 instead of 0.601; here ~44 and ~13 standard errors
    off) went unnoticed. A batch is CutMix's when every pixel is its own or its partner's:
    mixup's Beta(5, 5) lam (in [0.01, 0.99] but for ~3e-8 of draws) blends every pixel."""
    n, size_hw = 4000, (16, 12)
    images, labels = _batch(shape=(2, *size_hw, 1))
    mixed, _, lam = _mix_many(_keys(n), images, labels, mixup_alpha=5.0, cutmix_alpha=0.1)
    lam = lam.astype(np.float64)
    copied = np.all((mixed == images) | (mixed == images[::-1]), axis=(1, 2, 3, 4))

    mixup_moments = [np.prod([(5.0 + j) / (10.0 + j) for j in range(k)]) for k in range(5)]
    cutmix_moments = np.zeros(5)  # E[lam^k] of the corrected lam, k = 0..4, exactly
    for p, (ya, yb), (xa, xb) in _exact_box_law(size_hw, 0.1, _cnnjax_box):
        left = 1 - (yb - ya)[:, None] * (xb - xa)[None, :] / np.prod(size_hw)  # every centre
        cutmix_moments += p * np.array([np.mean(left ** k) for k in range(5)])
    for method, draws, moments in (("mixup", lam[~copied], mixup_moments),
                                   ("cutmix", lam[copied], cutmix_moments)):
        for k in (2, 1):  # the mean square and the mean, against their exact values
            std_error = np.sqrt((moments[2 * k] - moments[k] ** 2) / draws.size)
            observed = np.mean(draws ** k)
            assert abs(observed - moments[k]) < 4.5 * std_error, (method, k, observed,
                                                                 moments[k], std_error)
    assert 0.45 < copied.mean() < 0.55  # switch_prob 0.5 (4000 draws: 6 standard deviations)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_are_kept(dtype):
    images, labels = _batch()
    for switch_prob in (0.0, 1.0):  # mixup, CutMix
        mixed, targets, lam = jax.jit(partial(
            mixing.mix_batch, num_classes=K, **BOTH, switch_prob=switch_prob
        ))(jax.random.PRNGKey(0), images.astype(dtype), labels)
        assert (mixed.dtype, targets.dtype, lam.dtype) == (dtype, jnp.float32, jnp.float32)


def test_mix_batch_refuses_integer_images_and_non_nhwc_input():
    images, labels = _batch()
    with pytest.raises(ValueError, match=r"mix_batch: images\.dtype=.*uint8.* floating dtype"):
        mixing.mix_batch(jax.random.PRNGKey(0), images.astype(np.uint8), labels, K, **MIXUP)
    with pytest.raises(ValueError, match=r"mix_batch: input\.shape=\(6, 7, 9\)"):
        mixing.mix_batch(jax.random.PRNGKey(0), images[..., 0], labels, K, **MIXUP)
    with pytest.raises(ValueError, match=r"mix_batch: num_classes=0 is invalid"):
        mixing.mix_batch(jax.random.PRNGKey(0), images, labels, 0, **MIXUP)


@pytest.mark.parametrize(("labels", "shown"), [
    (lambda y: y[:-1], r"'int32\[5\]'"),  # one label short: the reversal would pair wrongly
    (lambda y: y[:, None], r"'int32\[6, 1\]'"),
    (lambda y: y.astype(np.float32), r"'float32\[6\]'"),
])
def test_mix_batch_refuses_labels_that_are_not_one_class_id_per_image(labels, shown):
    images, y = _batch()
    with pytest.raises(ValueError, match=f"mix_batch: labels={shown} is invalid; expected "
                                         r"integer class ids of shape \[6\], one per image"):
        mixing.mix_batch(jax.random.PRNGKey(0), images, labels(np.asarray(y, np.int32)), K,
                         **MIXUP)


GOOD = {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "switch_prob": 0.5, "prob": 1.0}


def test_check_mixing_returns_floats_and_accepts_the_ends():
    assert mixing.check_mixing("config", 0, 2, 0, 1) == (0.0, 2.0, 0.0, 1.0)
    assert mixing.check_mixing("config", **GOOD) == (0.2, 1.0, 0.5, 1.0)


ALPHA_RANGE = "expected 0 (off) or a finite number >= 1e-37"
TINY_ALPHA = (f"{ALPHA_RANGE} (a smaller one overflows the float32 Beta(alpha, alpha) draw of "
              "lam: NaN images and targets)")


@pytest.mark.parametrize("field,value,valid", [
    ("mixup_alpha", -0.1, ALPHA_RANGE),
    ("mixup_alpha", math.nan, ALPHA_RANGE),
    ("cutmix_alpha", math.inf, ALPHA_RANGE),
    ("cutmix_alpha", True, ALPHA_RANGE),
    ("mixup_alpha", 1e-38, TINY_ALPHA),
    ("cutmix_alpha", 5e-45, TINY_ALPHA),
    ("cutmix_alpha", 9.9e-38, TINY_ALPHA),
    ("switch_prob", 1.5, "expected 0 <= switch_prob <= 1"),
    ("switch_prob", -0.01, "expected 0 <= switch_prob <= 1"),
    ("prob", 2, "expected 0 <= prob <= 1"),
    ("prob", "0.5", "expected 0 <= prob <= 1"),
    ("prob", None, "expected 0 <= prob <= 1"),
])
def test_each_bad_setting_is_named(field, value, valid):
    settings = GOOD | {field: value}
    with pytest.raises(ValueError) as err:
        mixing.check_mixing("config", **settings)
    assert str(err.value) == f"config: {field}={value!r} is invalid; {valid}."
    images, labels = _batch()
    with pytest.raises(ValueError, match=f"mix_batch: {field}="):
        mixing.mix_batch(jax.random.PRNGKey(0), images, labels, K, **settings)


def test_the_smallest_alpha_mixes_finite_values_and_a_smaller_one_would_not():
    """jax.random.beta draws log Gamma(alpha) with a log(1 - u) / alpha term; float32 u is at most
    1 - 2**-23, so the term is finite at MIN_ALPHA for every draw (NumPy float32), while at 1e-38
    (refused) the draws give NaN lams."""
    worst = np.float32(23 * math.log(2)) / np.float32(mixing.MIN_ALPHA)
    assert np.isfinite(worst) and worst < np.finfo(np.float32).max / 2
    # op by op: jitted, jaxlib 0.11's XLA folds these draws to finite 0s and 1s (0.10's does not)
    draws = jax.random.beta(jax.random.PRNGKey(0), 1e-38, 1e-38, (100,))
    assert np.isnan(np.asarray(draws)).all()
    images, labels = _batch()
    for settings in ({"mixup_alpha": mixing.MIN_ALPHA, "cutmix_alpha": 0.0},
                     {"mixup_alpha": 0.0, "cutmix_alpha": mixing.MIN_ALPHA}):
        mixed, targets, lam = _mix_many(_keys(500), images, labels, **settings)
        assert np.isfinite(mixed).all() and np.isfinite(targets).all() and np.isfinite(lam).all()
    assert set(np.unique(_lams(500, (2, 1, 1, 1), mixup_alpha=mixing.MIN_ALPHA,
                                cutmix_alpha=0.0))) == {0.0, 1.0}  # Beta(1e-37, 1e-37)'s ends

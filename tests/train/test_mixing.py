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


@pytest.mark.parametrize("alpha", [0.3, 2.0])
def test_cutmix_lam_matches_a_numpy_simulation_of_the_clipped_box(alpha):
    """The mean uncovered fraction over 4000 draws on 16x12 images matches 200000 NumPy draws of
    lam ~ Beta, a floor(16 s) x floor(12 s) box (s = sqrt(1 - lam)) at a uniform centre pixel,
    clipped (std. error < 0.006)."""
    size = np.array([16, 12])
    lam = _lams(4000, (2, *size, 1), mixup_alpha=0.0, cutmix_alpha=alpha)
    rng = np.random.default_rng(0)
    beta = rng.beta(alpha, alpha, 200000)
    cut = np.floor(size * np.sqrt(1 - beta)[:, None]).astype(int)
    start = rng.integers(0, size, (200000, 2)) - cut // 2
    sides = np.clip(start + cut, 0, size) - np.clip(start, 0, size)
    expected = 1 - sides.prod(-1) / size.prod()
    assert abs(lam.mean() - expected.mean()) < 0.02


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


@pytest.mark.parametrize("field,value,valid", [
    ("mixup_alpha", -0.1, "expected a finite number >= 0 (0 = off)"),
    ("mixup_alpha", math.nan, "expected a finite number >= 0 (0 = off)"),
    ("cutmix_alpha", math.inf, "expected a finite number >= 0 (0 = off)"),
    ("cutmix_alpha", True, "expected a finite number >= 0 (0 = off)"),
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

"""mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of one device's batch, in a jitted step.

Batch mode, as timm's `Mixup(mode="batch")`: one lambda per batch, and each example is mixed with
its partner in the batch reversed (deterministic and free, no gather of a random permutation).
With an odd batch the middle example is its own partner and stays unmixed. The alphas and
probabilities are static Python floats; everything random comes from the `rng` argument, so pass
each device its own key (e.g. folded with `lax.axis_index`) for independent lambdas per device.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from cnnjax.utils.validation import check_nhwc, check_number, check_positive_int, invalid

#: The smallest alpha > 0 allowed: `jax.random.beta` draws log Gamma(alpha) with a log(u) / alpha
#: term (|log u| <= 23 ln 2 in float32), which overflows to -inf below alpha ~4.7e-38; two -inf
#: draws make lam NaN, so NaN images and targets (measured: NaN in nearly every draw at 1e-38).
#: Any alpha this small draws lam 0 or 1 anyway, which mixes nothing.
MIN_ALPHA = 1e-37


def check_mixing(owner: str, mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5,
                 prob: float = 1.0) -> tuple[float, float, float, float]:
    """The four settings as floats if each alpha is 0 (that method off) or a finite number >=
    `MIN_ALPHA` and each probability is in [0, 1], else a ValueError naming `owner`, the field
    and its value."""
    valid = f"expected 0 (off) or a finite number >= {MIN_ALPHA:g}"
    alphas = []
    for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        alpha = check_number(owner, name, value, valid, low=0.0, high=math.inf, high_open=True,
                             strings=False)
        if 0 < alpha < MIN_ALPHA:
            raise invalid(owner, name, value, f"{valid} (a smaller one overflows the float32 "
                          "Beta(alpha, alpha) draw of lam: NaN images and targets)")
        alphas.append(alpha)
    probs = [check_number(owner, name, value, f"expected 0 <= {name} <= 1", low=0.0, high=1.0,
                          strings=False)
             for name, value in (("switch_prob", switch_prob), ("prob", prob))]
    return (*alphas, *probs)  # type: ignore[return-value]


def mixing_enabled(mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0) -> bool:
    """Whether these settings ever mix a batch (some alpha > 0 and `prob` > 0)."""
    return prob > 0 and (mixup_alpha > 0 or cutmix_alpha > 0)


@dataclasses.dataclass(frozen=True)
class Mixing:
    """The engine's mixing settings (`config.mixing`), checked; calling it mixes a batch
    (`mix_batch`)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5
    prob: float = 1.0

    def __post_init__(self) -> None:
        check_mixing("Mixing", self.mixup_alpha, self.cutmix_alpha, self.switch_prob, self.prob)

    @property
    def enabled(self) -> bool:
        """Whether these settings ever mix a batch (`mixing_enabled`)."""
        return mixing_enabled(self.mixup_alpha, self.cutmix_alpha, self.prob)

    def __call__(self, rng: jax.Array, images: jnp.ndarray, labels: jnp.ndarray,
                 num_classes: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """`mix_batch` with these settings: `(mixed images, soft targets, lam)`."""
        return mix_batch(rng, images, labels, num_classes, **dataclasses.asdict(self))


def mix_batch(
    rng: jax.Array,
    images: jnp.ndarray,
    labels: jnp.ndarray,
    num_classes: int,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
    prob: float = 1.0,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """`(mixed images [B, H, W, C], soft targets [B, num_classes] float32, lam float32 scalar)`.

    With probability `prob` the batch is mixed with its reverse, using lam ~ Beta(alpha, alpha):
    by CutMix with probability `switch_prob` when both alphas are > 0 (else by whichever is > 0).
    mixup blends whole images, lam * x + (1 - lam) * partner, in the images' dtype. CutMix pastes
    the partner into one box of area ~(1 - lam), centred uniformly at random and clipped to the
    image, and returns lam = the uncovered fraction actually left (timm's `correct_lam`). Targets
    are lam * onehot(y) + (1 - lam) * onehot(partner's y); an unmixed batch returns the images,
    one-hot targets and lam = 1. `num_classes`, the alphas and probabilities must be static;
    `labels` are integer class ids [B] (ids outside [0, num_classes) give all-zero targets).
    """
    owner = "mix_batch"
    mixup_alpha, cutmix_alpha, switch_prob, prob = check_mixing(
        owner, mixup_alpha, cutmix_alpha, switch_prob, prob)
    check_positive_int(owner, "num_classes", num_classes)
    check_nhwc(owner, images)
    if not jnp.issubdtype(images.dtype, jnp.floating):  # mixup would truncate integer pixels
        raise invalid(owner, "images.dtype", images.dtype,
                      "expected a floating dtype (mix after converting/normalizing the images)")
    labels = jnp.asarray(labels)
    if labels.shape != images.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise invalid(owner, "labels", f"{labels.dtype}{list(labels.shape)}",
                      f"expected integer class ids of shape [{images.shape[0]}], one per image")
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if not mixing_enabled(mixup_alpha, cutmix_alpha, prob):
        return images, targets, jnp.ones((), jnp.float32)

    apply_key, switch_key, lam_key, box_key = jax.random.split(rng, 4)
    both = mixup_alpha > 0 and cutmix_alpha > 0
    if both:
        use_cutmix = jax.random.bernoulli(switch_key, switch_prob)
        alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    else:  # one method is on: choose it statically and trace only its branch
        use_cutmix = cutmix_alpha > 0
        alpha = max(mixup_alpha, cutmix_alpha)
    lam = jax.random.beta(lam_key, alpha, alpha, dtype=jnp.float32)
    lam = jnp.where(jax.random.bernoulli(apply_key, prob), lam, 1.0)  # lam = 1: no change

    partner = jnp.flip(images, axis=0)
    if both:
        cut_images, cut_lam = _cutmix(box_key, images, partner, lam)
        mixed = jnp.where(use_cutmix, cut_images, _mixup(images, partner, lam))
        lam = jnp.where(use_cutmix, cut_lam, lam)
    elif use_cutmix:
        mixed, lam = _cutmix(box_key, images, partner, lam)
    else:
        mixed = _mixup(images, partner, lam)
    targets = lam * targets + (1.0 - lam) * jnp.flip(targets, axis=0)
    return mixed, targets, lam


def _mixup(images: jnp.ndarray, partner: jnp.ndarray, lam: jnp.ndarray) -> jnp.ndarray:
    """lam * images + (1 - lam) * partner, computed in the images' dtype."""
    lam = lam.astype(images.dtype)
    return images * lam + partner * (1 - lam)


def _cutmix(
    rng: jax.Array, images: jnp.ndarray, partner: jnp.ndarray, lam: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Images with the partner pasted into a random box, and the corrected lam.

    The box is floor(H * sqrt(1 - lam)) x floor(W * sqrt(1 - lam)) around a uniform random centre
    pixel, clipped to the image; it is applied as a mask, so shapes stay static under jit. The
    paper's r_w = W sqrt(1 - lam) exactly: the authors' code (and timm's `rand_bbox`) spans
    [c - cut//2, c + cut//2), one pixel narrower for an odd cut (mean lam 0.690 here vs 0.701
    at 32x32, alpha 1); lam is recomputed from the pasted area either way."""
    height, width = images.shape[1:3]
    y_key, x_key = jax.random.split(rng)
    ratio = jnp.sqrt(1.0 - lam)

    def span(key: jax.Array, size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`[start, stop)` of the box along an axis of `size` pixels, clipped to it."""
        cut = jnp.floor(size * ratio).astype(jnp.int32)
        start = jax.random.randint(key, (), 0, size) - cut // 2
        return jnp.clip(start, 0, size), jnp.clip(start + cut, 0, size)

    (y0, y1), (x0, x1) = span(y_key, height), span(x_key, width)
    rows, cols = jnp.arange(height), jnp.arange(width)
    inside = (((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :])
    mixed = jnp.where(inside[None, :, :, None], partner, images)
    area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
    # (HW - area) / HW, not 1 - area / HW: XLA multiplies by 1/HW, and a whole-image box then
    # left lam at +-6e-8 instead of 0 (HW - area is exact in float32 below 2**24 pixels).
    return mixed, (height * width - area) / (height * width)

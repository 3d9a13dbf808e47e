"""How far a classifier's confidence is from its accuracy, and temperature scaling to close it.

Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017). Every function takes the
logits `[N, C]` (any log-probabilities work: softmax only needs them up to a per-row constant)
and integer labels `[N]`, and scores `softmax(logits / temperature)` in float64 on the host:

- reliability bins: the confidences (the top softmax probability) split into `n_bins`
  equal-width bins (lo, hi] over [0, 1] (edges k / n_bins, k = 0..n_bins; a confidence equal
  to an edge belongs to the bin it closes, and the first bin also takes 0); per bin, the count,
  mean confidence and accuracy (top-1 of the examples in it), as in Guo et al.'s Figure 1;
- ECE = sum_b n_b / N * |accuracy_b - confidence_b| (Guo et al.'s eq. 3, 15 bins by default as
  in their experiments) and MCE = max over non-empty bins of the same gap (eq. 5);
- NLL: the mean of -log softmax(logits / T)[label] (nats);
- Brier score: the mean over examples of sum_c (p_c - [c = label])^2 (Brier 1950, multi-class;
  in [0, 2], 0 for certain and right);
- temperature scaling (Guo et al., section 4.2): the single T > 0 that minimizes the NLL of
  softmax(logits / T) on held-out logits; dividing by T never changes the argmax, so top-1 is
  unchanged.

`plot_reliability` draws the reliability diagram (`experiments.evaluate` writes it beside the
confusion matrix).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cnnjax.utils.files import save_figure
from cnnjax.utils.validation import (
    check_positive_float,
    check_positive_int,
    invalid,
    widen_low_precision,
)

#: Guo et al.'s bin count (their experiments use M = 15).
DEFAULT_BINS = 15
#: The interval `fit_temperature` searches (T, not log T): a T at either end means the NLL was
#: still falling there (e.g. every fitting example right, so sharper is always better).
TEMPERATURE_BOUNDS = (1e-3, 1e3)


@dataclasses.dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin count, mean confidence and accuracy (NaN for an empty bin) over bins (lo, hi]."""

    edges: np.ndarray  # [n_bins + 1], k / n_bins for k = 0..n_bins
    count: np.ndarray  # [n_bins] int64
    confidence: np.ndarray  # [n_bins] float64, mean top softmax probability; NaN if empty
    accuracy: np.ndarray  # [n_bins] float64, fraction of top-1 hits; NaN if empty

    @property
    def gap(self) -> np.ndarray:
        """|accuracy - confidence| per bin (NaN if empty): the miscalibration of each bin."""
        return np.abs(self.accuracy - self.confidence)

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean gap (Guo et al.'s eq. 3)."""
        filled = self.count > 0
        return float(np.sum(self.count[filled] * self.gap[filled]) / np.sum(self.count))

    @property
    def mce(self) -> float:
        """Maximum calibration error: the largest gap of a non-empty bin (Guo et al.'s eq. 5)."""
        return float(np.max(self.gap[self.count > 0]))

    def to_json(self) -> list[dict]:
        """One record per bin: lo, hi, count, confidence and accuracy (None when empty)."""
        return [{"lo": float(self.edges[b]), "hi": float(self.edges[b + 1]),
                 "count": int(self.count[b]),
                 "confidence": float(self.confidence[b]) if self.count[b] else None,
                 "accuracy": float(self.accuracy[b]) if self.count[b] else None}
                for b in range(len(self.count))]


def check_logits_and_labels(owner: str, logits: Any, labels: Any
                            ) -> tuple[np.ndarray, np.ndarray]:
    """`(logits, labels)` as float64 `[N, C]` and int64 `[N]` after checking them, so a bad
    input fails with its name instead of a silently wrong score."""
    try:
        logits = widen_low_precision(np.asarray(logits))  # a bfloat16 model's logits
    except (TypeError, ValueError):  # ragged rows: NumPy's "inhomogeneous shape"
        raise invalid(owner, "logits", f"<ragged {type(logits).__name__}>",
                      "expected an [N, C] array of logits (every row of C classes)") from None
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
        raise invalid(owner, "logits.shape", logits.shape,
                      "expected [N, C] with N >= 1 examples and C >= 2 classes (flatten "
                      "per-pixel logits to [N * H * W, C] first)")
    if logits.dtype.kind not in "fiu":
        raise invalid(owner, "logits.dtype", str(logits.dtype), "expected real numbers")
    logits = logits.astype(np.float64)
    if not np.all(np.isfinite(logits)):
        bad = np.argwhere(~np.isfinite(logits))[0]
        raise invalid(owner, f"logits[{bad[0]}, {bad[1]}]", float(logits[tuple(bad)]),
                      "expected finite logits (a NaN or inf means the model diverged)")
    try:
        labels = widen_low_precision(np.asarray(labels))
    except (TypeError, ValueError):
        raise invalid(owner, "labels", f"<ragged {type(labels).__name__}>",
                      "expected an [N] array of class indices") from None
    if labels.shape != logits.shape[:1]:
        raise invalid(owner, "labels.shape", labels.shape,
                      f"expected ({logits.shape[0]},), one class index per row of the logits "
                      f"{logits.shape}")
    if labels.dtype.kind == "f":
        wrong = labels[~(np.isfinite(labels) & (labels == np.round(labels)))]
        if wrong.size:
            raise invalid(owner, "labels", f"values like {wrong[:3].tolist()}",
                          "expected integer class indices")
    elif labels.dtype.kind not in "iu":
        raise invalid(owner, "labels.dtype", str(labels.dtype), "expected integer class indices")
    # Range first: a float label past int64's range (1e20) would wrap in the cast.
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise invalid(owner, "labels", f"values in [{labels.min()}, {labels.max()}]",
                      f"expected class indices in [0, {logits.shape[1]}) for "
                      f"{logits.shape[1]}-class logits")
    return logits, labels.astype(np.int64)


def _check_temperature(owner: str, temperature: Any) -> float:
    """`temperature` as a float if it is finite and > 0 (softmax(logits / T) needs T > 0)."""
    return check_positive_float(owner, "temperature", temperature)


def _shifted(logits: np.ndarray, temperature: float) -> np.ndarray:
    """(logits - row max) / temperature: the max subtracted before dividing, so a tiny T sends
    the other entries to -inf instead of overflowing the row to inf - inf = NaN."""
    logits = np.asarray(logits, np.float64)
    with np.errstate(over="ignore"):  # -> -inf: probability 0, as intended
        return (logits - logits.max(axis=-1, keepdims=True)) / temperature


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log softmax(logits / temperature) along the last axis, stably (max subtracted)."""
    shifted = _shifted(logits, temperature)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def reliability_bins(logits: Any, labels: Any, n_bins: int = DEFAULT_BINS,
                     temperature: float = 1.0) -> ReliabilityBins:
    """Count, mean confidence and accuracy of the examples in each of `n_bins` equal-width
    confidence bins (lo, hi]: the data of a reliability diagram and of ECE/MCE."""
    owner = "reliability_bins"
    n_bins = check_positive_int(owner, "n_bins", n_bins)
    logits, labels = check_logits_and_labels(owner, logits, labels)
    return _bins(logits, labels, n_bins, _check_temperature(owner, temperature))


def _bins(logits: np.ndarray, labels: np.ndarray, n_bins: int,
          temperature: float) -> ReliabilityBins:
    """`reliability_bins` of already checked inputs."""
    # The top probability as 1 / sum exp(shifted) (its own term is exp(0) = 1): one rounding,
    # so a confidence that is exactly an edge (1/8 of 8 tied logits) stays on it, where
    # exp(-log(8)) = 0.12500000000000003 would fall into the next bin.
    confidence = 1.0 / np.sum(np.exp(_shifted(logits, temperature)), axis=1)
    hits = (np.argmax(logits, axis=1) == labels).astype(np.float64)  # T > 0 keeps the argmax
    # k / n correctly rounded: linspace's k * (1 / n) falls below fl(k / n) for some k (7 / 35),
    # which put a confidence of exactly 0.2 (five tied classes) in the bin above the one it closes.
    edges = np.arange(n_bins + 1) / n_bins
    # searchsorted 'left' gives i with edges[i - 1] < c <= edges[i]: bin i - 1 is (lo, hi].
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, hits, minlength=n_bins) / count
    return ReliabilityBins(edges, count.astype(np.int64), mean_confidence, accuracy)


def expected_calibration_error(logits: Any, labels: Any, n_bins: int = DEFAULT_BINS,
                               temperature: float = 1.0) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width bins (lo, hi]."""
    return reliability_bins(logits, labels, n_bins, temperature).ece


def maximum_calibration_error(logits: Any, labels: Any, n_bins: int = DEFAULT_BINS,
                              temperature: float = 1.0) -> float:
    """MCE: the largest |accuracy - confidence| of a non-empty bin (the worst-case gap)."""
    return reliability_bins(logits, labels, n_bins, temperature).mce


def negative_log_likelihood(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / T)[label] in nats: the proper score temperature scaling fits."""
    logits, labels = check_logits_and_labels("negative_log_likelihood", logits, labels)
    temperature = _check_temperature("negative_log_likelihood", temperature)
    return _nll(logits, labels, temperature)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """`negative_log_likelihood` of already checked inputs (the objective `fit_temperature`
    evaluates many times)."""
    log_probs = log_softmax(logits, temperature)
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def brier_score(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean over examples of sum_c (p_c - onehot_c)^2: a proper score in [0, 2] that, unlike
    NLL, stays bounded for a confident mistake."""
    logits, labels = check_logits_and_labels("brier_score", logits, labels)
    return _brier(logits, labels, _check_temperature("brier_score", temperature))


def _brier(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """`brier_score` of already checked inputs."""
    probabilities = np.exp(log_softmax(logits, temperature))
    probabilities[np.arange(len(labels)), labels] -= 1.0
    return float(np.mean(np.sum(probabilities**2, axis=1)))


def fit_temperature(logits: Any, labels: Any) -> float:
    """The T > 0 minimizing the NLL of softmax(logits / T) on these (held-out) examples.

    Searched over log T (so T stays positive and T and 1/T are equally easy to reach) in
    `TEMPERATURE_BOUNDS` by scipy's bounded Brent method (`minimize_scalar(method="bounded")`).
    The NLL is convex in 1/T (a log-sum-exp of linear functions minus a linear function), hence
    unimodal in log T, so a bracketing 1-D search finds the global minimum without a gradient,
    step size or starting point to tune (unlike LBFGS on a plain T, which can step to T <= 0).
    Logits that are constant in every row give an NLL that does not depend on T: 1.0 then.
    If every example's label has the largest logit (ties included), the NLL keeps falling as
    T -> 0 and has no minimum (the search would stop wherever float64 rounds it to 0): refused.
    """
    from scipy.optimize import minimize_scalar

    logits, labels = check_logits_and_labels("fit_temperature", logits, labels)
    if np.all(np.ptp(logits, axis=1) == 0):
        return 1.0
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    if np.all(logits[rows, labels] >= others.max(axis=1)):
        raise invalid("fit_temperature", "labels", f"{len(labels)} examples all classified "
                      "correctly", "the NLL then falls as T -> 0 without a minimum; fit on "
                      "held-out examples the model gets some wrong (examples it was not trained"
                      " on, or more of them)")
    lo, hi = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: _nll(logits, labels, float(np.exp(log_t))),
                             bounds=(lo, hi), method="bounded",
                             options={"xatol": 1e-8, "maxiter": 500})
    return float(np.exp(result.x))


def calibration_metrics(logits: Any, labels: Any, n_bins: int = DEFAULT_BINS,
                        temperature: float = 1.0) -> dict:
    """ECE, MCE, NLL, Brier score, top-1 and the reliability bins of softmax(logits / T), as the
    JSON record `experiments.evaluate` writes."""
    n_bins = check_positive_int("calibration_metrics", "n_bins", n_bins)
    logits, labels = check_logits_and_labels("calibration_metrics", logits, labels)
    temperature = _check_temperature("calibration_metrics", temperature)
    bins = _bins(logits, labels, n_bins, temperature)
    return {"ece": bins.ece, "mce": bins.mce, "nll": _nll(logits, labels, temperature),
            "brier": _brier(logits, labels, temperature),
            "top1": float(np.mean(np.argmax(logits, axis=1) == labels)),
            "num_examples": int(len(labels)), "temperature": temperature, "n_bins": n_bins,
            "bins": bins.to_json()}


def temperature_scaling(fit_logits: Any, fit_labels: Any, logits: Any, labels: Any,
                        n_bins: int = DEFAULT_BINS) -> dict:
    """T fitted on (`fit_logits`, `fit_labels`), then the calibration of (`logits`, `labels`)
    before (T = 1) and after (T): `{"temperature", "at_bound", "fit_nll_before",
    "fit_nll_after", "before", "after"}` (the last two as `calibration_metrics`)."""
    n_bins = check_positive_int("temperature_scaling", "n_bins", n_bins)
    fit_logits, fit_labels = check_logits_and_labels("temperature_scaling", fit_logits,
                                                     fit_labels)
    logits, labels = check_logits_and_labels("temperature_scaling", logits, labels)
    if fit_logits.shape[1] != logits.shape[1]:
        raise invalid("temperature_scaling", "fit_logits.shape", fit_logits.shape,
                      f"expected {logits.shape[1]} classes like the logits {logits.shape}")
    temperature = fit_temperature(fit_logits, fit_labels)
    at_bound = bool(np.isclose(temperature, TEMPERATURE_BOUNDS, rtol=1e-4).any())
    return {"temperature": temperature, "at_bound": at_bound,
            "num_fit_examples": int(len(fit_labels)),
            "fit_nll_before": _nll(fit_logits, fit_labels, 1.0),
            "fit_nll_after": _nll(fit_logits, fit_labels, temperature),
            "before": calibration_metrics(logits, labels, n_bins),
            "after": calibration_metrics(logits, labels, n_bins, temperature)}


def _bins_from_record(record: dict) -> ReliabilityBins:
    """The `ReliabilityBins` of a `calibration_metrics` record (None -> NaN)."""
    rows = record["bins"]
    nan = float("nan")
    return ReliabilityBins(
        edges=np.array([rows[0]["lo"]] + [r["hi"] for r in rows]),
        count=np.array([r["count"] for r in rows], np.int64),
        confidence=np.array([nan if r["confidence"] is None else r["confidence"] for r in rows]),
        accuracy=np.array([nan if r["accuracy"] is None else r["accuracy"] for r in rows]))


def plot_reliability(records: list[tuple[str, dict]], path: str, title: str = "") -> str:
    """Reliability diagrams of `(name, calibration_metrics record)` pairs side by side (e.g.
    before and after temperature scaling): accuracy per bin against the diagonal, the gap to
    each bin's mean confidence shaded, ECE in the title, and below each the share of examples
    per bin (counts written over up to 20 bins) with the mean confidence and accuracy marked.
    Saved to `path` (PNG); returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise invalid("plot_reliability", "records", records,
                      "expected at least one (name, calibration_metrics record)")
    fig, axes = plt.subplots(2, len(records), figsize=(4.2 * len(records), 6.2), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.2]}, sharex=True)
    for column, (name, record) in enumerate(records):
        bins = _bins_from_record(record)
        lo, width = bins.edges[:-1], np.diff(bins.edges)
        filled = bins.count > 0
        top, bottom = axes[0, column], axes[1, column]
        top.bar(lo[filled], bins.accuracy[filled], width=width[filled], align="edge",
                color="tab:blue", edgecolor="black", linewidth=0.6, label="accuracy")
        low = np.minimum(bins.accuracy, bins.confidence)[filled]
        top.bar(lo[filled], np.abs(bins.accuracy - bins.confidence)[filled], bottom=low,
                width=width[filled], align="edge", color="tab:red", alpha=0.3,
                edgecolor="tab:red", hatch="//", linewidth=0.6, label="gap to confidence")
        top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
        top.set_title(f"{name}\nECE {100 * record['ece']:.2f}%  MCE {100 * record['mce']:.1f}%  "
                      f"NLL {record['nll']:.3f}", fontsize=9)
        top.legend(loc="upper left", fontsize=7)
        share = bins.count / max(int(bins.count.sum()), 1)
        bottom.bar(lo, share, width=width, align="edge", color="tab:gray", edgecolor="black",
                   linewidth=0.6)
        if len(bins.count) <= 20:  # the counts, to judge how much a bin's gap can be trusted
            for b in np.flatnonzero(filled):
                bottom.text(lo[b] + width[b] / 2, min(share[b], 0.8) + 0.03,
                            str(bins.count[b]), ha="center", va="bottom", fontsize=6)
        bottom.set_ylim(0, 1.15)
        counted = bins.count.sum()
        mean_confidence = float(np.nansum(bins.confidence * bins.count) / counted)
        bottom.axvline(mean_confidence, color="tab:red", linestyle="--", linewidth=1,
                       label=f"mean confidence {mean_confidence:.3f}")
        bottom.axvline(record["top1"], color="tab:blue", linestyle="-", linewidth=1,
                       label=f"accuracy {record['top1']:.3f}")
        bottom.set(xlim=(0, 1), xlabel="confidence (top softmax probability)",
                   ylabel="share of examples")
        bottom.legend(loc="upper left", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)

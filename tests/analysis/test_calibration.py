"""`cnnjax.analysis.calibration` against a plain-Python float64 reference, synthetic sets of known
calibration, and a dense grid search of the temperature."""

import math
from fractions import Fraction

import numpy as np
import pytest

from cnnjax.analysis import calibration as cal

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the plain-Python reference
def _softmax_row(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = math.fsum(exps)
    return [e / total for e in exps]


def _reference(logits, labels, n_bins, temperature=1.0):
    """ECE, MCE, NLL, Brier, per-bin counts: one example at a time, bins (b/B, (b+1)/B]."""
    n = len(labels)
    counts, conf_sums, hit_sums = [0] * n_bins, [0.0] * n_bins, [0.0] * n_bins
    nll, brier = [], []
    for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
        probs = _softmax_row([v / temperature for v in row])
        confidence = max(probs)
        predicted = row.index(max(row))
        b = next(b for b in range(n_bins) if confidence <= (b + 1) / n_bins)
        counts[b] += 1
        conf_sums[b] += confidence
        hit_sums[b] += predicted == label
        top = max(v / temperature for v in row)
        log_z = top + math.log(math.fsum(math.exp(v / temperature - top) for v in row))
        nll.append(log_z - row[label] / temperature)
        brier.append(math.fsum((p - (c == label)) ** 2 for c, p in enumerate(probs)))
    gaps = [abs(hit_sums[b] / counts[b] - conf_sums[b] / counts[b]) if counts[b] else None
            for b in range(n_bins)]
    ece = math.fsum(counts[b] / n * gaps[b] for b in range(n_bins) if counts[b])
    mce = max(g for g in gaps if g is not None)
    return {"ece": ece, "mce": mce, "nll": math.fsum(nll) / n, "brier": math.fsum(brier) / n,
            "count": counts}


def _sample_labels(rng, logits):
    """One label per row drawn from softmax(row): a perfectly calibrated set by construction."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    u = rng.random(len(logits))[:, None]
    return np.minimum((np.cumsum(probs, axis=1) < u).sum(axis=1), logits.shape[1] - 1)


def _random_set(seed=0, n=600, classes=7, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * scale
    return logits, rng.integers(0, classes, n)


# ---------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("n_bins", [1, 5, 15, 40])
@pytest.mark.parametrize("temperature", [1.0, 0.4, 2.5])
def test_scores_match_the_plain_python_reference(n_bins, temperature):
    """Same float64 maths, other summation order: agreement to 1e-10 relative (1e-12 abs)."""
    logits, labels = _random_set()
    labels[:400] = np.argmax(logits[:400], axis=1)  # a mix of right and wrong predictions
    want = _reference(logits, labels, n_bins, temperature)
    bins = cal.reliability_bins(logits, labels, n_bins, temperature)
    assert bins.count.tolist() == want["count"]
    got = {"ece": cal.expected_calibration_error(logits, labels, n_bins, temperature),
           "mce": cal.maximum_calibration_error(logits, labels, n_bins, temperature),
           "nll": cal.negative_log_likelihood(logits, labels, temperature),
           "brier": cal.brier_score(logits, labels, temperature)}
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-10, atol=1e-12, err_msg=name)
    record = cal.calibration_metrics(logits.astype(np.float32), labels, n_bins, temperature)
    assert record["n_bins"] == n_bins and len(record["bins"]) == n_bins
    assert sum(b["count"] for b in record["bins"]) == len(labels)
    np.testing.assert_allclose(record["ece"], want["ece"], rtol=1e-5, atol=1e-6)  # float32 in


def test_nll_matches_optax_cross_entropy():
    """An independent implementation (optax, float32): to 1e-5 relative."""
    import optax

    logits, labels = _random_set(seed=1)
    want = float(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(np.float32), labels).mean())
    np.testing.assert_allclose(cal.negative_log_likelihood(logits, labels), want, rtol=1e-5)


def test_a_bfloat16_models_logits_are_scored_as_their_float32_values():
    """ml_dtypes' bfloat16 is dtype kind 'V' to NumPy: it was refused as "not real numbers"."""
    import ml_dtypes

    logits, labels = _random_set(seed=2)
    low = logits.astype(ml_dtypes.bfloat16)
    assert cal.expected_calibration_error(low, labels) == cal.expected_calibration_error(
        low.astype(np.float32), labels)
    with pytest.raises(ValueError, match=r"logits.dtype='\|V2' is invalid; expected real"):
        cal.expected_calibration_error(np.zeros((2, 3), "V2"), [0, 1])


def test_bins_are_lo_exclusive_hi_inclusive():
    """A confidence on an edge belongs to the bin it closes; 1.0 to the last, 0.5 of two equal
    logits to (0.25, 0.5] of 4 bins (not (0.5, 0.75])."""
    logits = np.array([[0.0, 0.0], [50.0, 0.0], [math.log(3.0), 0.0]])  # conf 0.5, ~1, 0.75
    labels = np.array([0, 0, 1])
    bins = cal.reliability_bins(logits, labels, n_bins=4)
    assert bins.count.tolist() == [0, 1, 1, 1]
    np.testing.assert_allclose(bins.confidence[1:], [0.5, 0.75, 1.0], rtol=1e-12)
    np.testing.assert_array_equal(bins.accuracy[1:], [1.0, 0.0, 1.0])
    assert np.isnan(bins.confidence[0]) and np.isnan(bins.accuracy[0])
    assert cal.calibration_metrics(logits, labels, 4)["bins"][0] == {
        "lo": 0.0, "hi": 0.25, "count": 0, "confidence": None, "accuracy": None}
    # |1 - 0.5| * 1/3 + |0 - 0.75| * 1/3 + |1 - 1| * 1/3, and the worst bin's 0.75
    np.testing.assert_allclose(bins.ece, (0.5 + 0.75) / 3, rtol=1e-12)
    np.testing.assert_allclose(bins.mce, 0.75, rtol=1e-12)


def test_a_perfectly_calibrated_set_has_ece_near_zero_and_an_overconfident_one_does_not():
    """Labels drawn from the predicted probabilities (200,000 examples, seed 0): ECE < 0.005
    (measured 0.0026, the finite-sample bias of |accuracy - confidence| per bin); the same
    logits doubled (overconfident) give an ECE above 0.05 (measured 0.197); the best T for the
    calibrated set is 1 to within 2% (measured 0.9998)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200_000, 10)) * rng.uniform(0.5, 3.0, size=(200_000, 1))
    labels = _sample_labels(rng, logits)
    assert cal.expected_calibration_error(logits, labels) < 0.005
    assert cal.expected_calibration_error(2 * logits, labels) > 0.05
    assert abs(cal.fit_temperature(logits, labels) - 1.0) < 0.02


# -------------------------------------------------------------------- temperature scaling
@pytest.mark.parametrize("t_true", [2.5, 0.5])
def test_temperature_scaling_recovers_a_known_temperature(t_true):
    """logits = T_true * calibrated logits, labels drawn from the calibrated probabilities
    (50,000 examples): the fitted T is within 3% of T_true (measured 0.2% off for both), the
    ECE of a second draw of labels falls below 0.01 (from > 0.2; measured 0.0047) and top-1 is
    unchanged."""
    rng = np.random.default_rng(1)
    calibrated = rng.normal(size=(50_000, 10)) * 2.0
    labels = _sample_labels(rng, calibrated)
    logits = t_true * calibrated
    fitted = cal.fit_temperature(logits, labels)
    assert abs(fitted / t_true - 1) < 0.03
    held_out = _sample_labels(rng, calibrated)  # a second draw: the evaluated split
    report = cal.temperature_scaling(logits, labels, logits, held_out)
    assert report["temperature"] == fitted and not report["at_bound"]
    assert report["fit_nll_after"] < report["fit_nll_before"]
    assert report["after"]["ece"] < 0.01 < report["before"]["ece"]
    assert report["after"]["top1"] == report["before"]["top1"]
    scaled = cal.log_softmax(logits, fitted)
    np.testing.assert_array_equal(np.argmax(scaled, axis=1), np.argmax(logits, axis=1))


def test_the_fitted_temperature_is_the_minimum_of_a_dense_grid():
    """NLL over 8,001 log-spaced T in [0.1, 10] (steps of 5.8e-4 in log T): the fitted T is
    within one step of the grid's argmin and its NLL is no higher than the grid's best."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1000, 5)) * 4.0
    labels = _sample_labels(rng, logits / 1.7)
    grid = np.exp(np.linspace(np.log(0.1), np.log(10.0), 8_001))
    nll = np.array([cal.negative_log_likelihood(logits, labels, t) for t in grid])
    best = grid[np.argmin(nll)]
    fitted = cal.fit_temperature(logits, labels)
    step = np.log(grid[1] / grid[0])
    assert abs(np.log(fitted / best)) <= step
    assert cal.negative_log_likelihood(logits, labels, fitted) <= nll.min() + 1e-12


def _float64_nll(logits, labels, temperature):
    """Mean NLL of softmax(logits / T) in plain float64 NumPy (log-sum-exp shifted by the max)."""
    z = logits / temperature
    top = z.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return float(np.mean(log_z - z[np.arange(len(labels)), labels]))


def test_a_constant_row_among_informative_ones_does_not_stop_the_fit():
    """Only all-constant logits make the NLL independent of T: one constant row (row 0) beside
    rows that do depend on T must still be fitted. Reference: the argmin of a float64 NumPy NLL
    over 20,001 log-spaced T in [0.05, 20] (steps of 3e-4 in log T; measured 2.164); the fit is
    within one step of it (returning 1.0 for any constant row is 0.77 off in log T)."""
    logits = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    labels = np.array([0, 0, 1, 1])
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 20_001))
    nll = np.array([_float64_nll(logits, labels, t) for t in grid])
    best = grid[np.argmin(nll)]
    assert 0 < np.argmin(nll) < len(grid) - 1  # an interior minimum, not a bound of the grid
    fitted = cal.fit_temperature(logits, labels)
    assert abs(np.log(fitted / best)) <= np.log(grid[1] / grid[0])
    np.testing.assert_allclose(fitted, 2.164, rtol=1e-3)


def test_temperature_edge_cases():
    """Constant rows: the NLL does not depend on T (1.0); all correct: no minimum (refused);
    worse than chance: T runs to the top of its range, which the report flags."""
    assert cal.fit_temperature(np.zeros((4, 3)), [0, 1, 2, 0]) == 1.0
    logits = np.eye(3)[[0, 1, 2, 0]] * 5.0
    with pytest.raises(ValueError, match=r"^fit_temperature: labels='4 examples all classified "
                                         r"correctly' is invalid; the NLL then falls as T -> 0"):
        cal.fit_temperature(logits, [0, 1, 2, 0])
    # A label tied with the top logit counts as correct: the summed NLL of [[1, 1], [2, 0]] with
    # labels [0, 0], log(1 + e^0) + log(1 + e^(-2 / T)), falls to log 2 as T -> 0 (no minimum).
    with pytest.raises(ValueError, match=r"^fit_temperature: labels='2 examples all classified "
                                         r"correctly' is invalid"):
        cal.fit_temperature(np.array([[1.0, 1.0], [2.0, 0.0]]), [0, 0])
    wrong = [1, 2, 0, 1]
    report = cal.temperature_scaling(logits, wrong, logits, wrong)
    assert report["at_bound"] and report["temperature"] > 0.99 * cal.TEMPERATURE_BOUNDS[1]


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_named():
    logits, labels = _random_set(n=5, classes=3)
    cases = [
        (lambda: cal.expected_calibration_error(logits, labels, n_bins=0),
         r"^reliability_bins: n_bins=0 is invalid; expected a positive integer\.$"),
        (lambda: cal.expected_calibration_error(logits, labels[:4]),
         r"^reliability_bins: labels.shape=\(4,\) is invalid; expected \(5,\), one class index "
         r"per row of the logits \(5, 3\)\.$"),
        (lambda: cal.negative_log_likelihood(logits, labels + 3),
         r"^negative_log_likelihood: labels='values in \[3, 5\]' is invalid; expected class "
         r"indices in \[0, 3\) for 3-class logits\.$"),
        # The class count itself is one past the last class index.
        (lambda: cal.reliability_bins(np.zeros((1, 3)), [3], n_bins=2),
         r"^reliability_bins: labels='values in \[3, 3\]' is invalid; expected class indices "
         r"in \[0, 3\) for 3-class logits\.$"),
        (lambda: cal.brier_score(logits, -labels - 1),
         r"^brier_score: labels='values in \[-3, -1\]' is invalid"),
        # A float label past int64's range wrapped in the cast: the error showed -2**63.
        (lambda: cal.brier_score(logits, np.where(np.arange(5) == 2, 1e20, labels)),
         r"^brier_score: labels='values in \[0.0, 1e\+20\]' is invalid"),
        (lambda: cal.brier_score(logits, labels + 0.5),
         r"^brier_score: labels='values like \[.*\]' is invalid; expected integer class"),
        (lambda: cal.fit_temperature(np.where(np.eye(5, 3) > 0, np.nan, logits), labels),
         r"^fit_temperature: logits\[0, 0\]=nan is invalid; expected finite logits"),
        (lambda: cal.calibration_metrics(np.full((5, 3), np.inf), labels),
         r"^calibration_metrics: logits\[0, 0\]=inf is invalid; expected finite logits"),
        (lambda: cal.reliability_bins(logits[0], labels[:1]),
         r"^reliability_bins: logits.shape=\(3,\) is invalid; expected \[N, C\] with N >= 1 "
         r"examples and C >= 2 classes"),
        (lambda: cal.reliability_bins(np.zeros((0, 3)), labels[:0]),
         r"^reliability_bins: logits.shape=\(0, 3\) is invalid"),
        (lambda: cal.negative_log_likelihood(logits, labels, temperature=0.0),
         r"^negative_log_likelihood: temperature=0.0 is invalid; expected a positive"),
        (lambda: cal.temperature_scaling(logits[:, :2], labels % 2, logits, labels),
         r"^temperature_scaling: fit_logits.shape=\(5, 2\) is invalid; expected 3 classes"),
        (lambda: cal.plot_reliability([], "x.png"), r"^plot_reliability: records=\[\] is"),
        # Ragged rows failed in NumPy's words ("inhomogeneous shape"), naming no argument.
        (lambda: cal.calibration_metrics([[1, 2], [3]], [0, 1]),
         r"^calibration_metrics: logits='<ragged list>' is invalid; expected an \[N, C\] "
         r"array of logits"),
        (lambda: cal.brier_score(logits, [[0], [1, 2], [0], [1], [2]]),
         r"^brier_score: labels='<ragged list>' is invalid; expected an \[N\] array"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_the_reliability_diagram_is_written(tmp_path):
    logits, labels = _random_set()
    before = cal.calibration_metrics(logits, labels)
    after = cal.calibration_metrics(logits, labels, temperature=2.0)
    for records, name in (([("", before)], "one.png"),
                          ([("before", before), ("T = 2", after)], "two.png")):
        path = cal.plot_reliability(records, str(tmp_path / name), title="test")
        assert path == str(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == PNG


@pytest.mark.parametrize("split", ["train[100%:]", "test[5:5]"])
def test_an_empty_temperature_split_is_refused_before_anything_compiles(split, tmp_path_factory):
    """On real (offline) digits: an empty slice would only fail after the evaluation ran."""
    import re

    import ml_collections

    from cnnjax.data.pipeline import get_dataset_info
    from cnnjax.train.config import default_config
    from cnnjax.train.trained import TrainedRun, check_temperature_split

    config = default_config()
    config.model = "lenet5"
    config.data = ml_collections.ConfigDict(
        {"name": "digits", "data_dir": str(tmp_path_factory.mktemp("tfds_digits"))})
    get_dataset_info(config.data)  # builds digits offline
    run = TrainedRun("w", config, model=None, variables={}, step=1, how="best")
    with pytest.raises(ValueError, match=rf"^evaluate: temperature_split={re.escape(repr(split))}"
                                         r" is invalid; it holds no examples"):
        check_temperature_split(run, None, split)
    warnings = check_temperature_split(run, None, "train[90%:]")[1]
    assert warnings and "shares examples with the run's training split 'train'" in warnings[0]


@pytest.mark.parametrize("classes", range(2, 33))
def test_a_confidence_exactly_on_an_edge_closes_its_bin(classes):
    """`classes` equal logits have confidence exactly 1/C, the upper edge of bin 0 of C bins
    and of bin 1 of 2C bins (Guo et al.'s (lo, hi]); computed as exp(-log(C)) it had rounded to
    0.12500000000000003 for C = 8 and landed in bin 1 of 8. Reference: the exact 1/C."""
    logits = np.zeros((1, classes))
    for n_bins, expected in ((classes, 0), (2 * classes, 1)):
        bins = cal.reliability_bins(logits, [0], n_bins=n_bins)
        assert np.flatnonzero(bins.count).tolist() == [expected]
        assert bins.confidence[expected] == 1.0 / classes  # exact
        np.testing.assert_allclose(bins.ece, 1.0 - 1.0 / classes, rtol=1e-15)


def test_tied_classes_land_in_the_bin_their_exact_confidence_closes():
    """k tied top logits give confidence fl(1/k); linspace's edge 7 * (1/35) rounds below
    fl(7/35) = fl(1/5), so five tied classes landed in bin 7 of 35 instead of bin 6. Reference:
    the bin b with b/n < 1/k <= (b + 1)/n in exact rational arithmetic."""
    wrong = []
    for n_bins in range(1, 41):
        for classes in range(2, 41):
            bins = cal.reliability_bins(np.zeros((1, classes)), [0], n_bins=n_bins)
            exact = next(b for b in range(n_bins)
                         if Fraction(b, n_bins) < Fraction(1, classes) <= Fraction(b + 1, n_bins))
            if np.flatnonzero(bins.count).tolist() != [exact]:
                wrong.append((n_bins, classes))
    assert not wrong


def test_a_tiny_positive_temperature_gives_the_limit_not_nan():
    """softmax(z / T) for a T so small that z / T overflows: dividing before subtracting the row
    maximum gave inf - inf = NaN for T = 1e-308. Reference (float64, by hand): the arg-max gets
    probability 1, so row 0 (right, conf 1) and row 1 (wrong, conf 1) give ECE 0.5, Brier
    (0 + 2) / 2 = 1 and NLL (0 + 3 / T) / 2."""
    logits, labels, t = np.array([[10.0, 0.0], [0.0, 3.0]]), np.array([0, 0]), 1e-308
    metrics = cal.calibration_metrics(logits, labels, temperature=t)
    assert metrics["ece"] == 0.5 and metrics["mce"] == 0.5 and metrics["brier"] == 1.0
    np.testing.assert_allclose(metrics["nll"], 3.0 / t / 2, rtol=1e-12)
    np.testing.assert_allclose(cal.negative_log_likelihood(logits, labels, t), 3.0 / t / 2,
                               rtol=1e-12)

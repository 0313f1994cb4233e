"""Metrics agree with scikit-learn and with a plain-loop GAUC reference, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score

from kdcore.evaluation.metrics import (
    auc,
    calibration,
    gauc,
    log_loss,
    mae,
    normalized_entropy,
    rmse,
    task_metrics,
)

SEEDS = [0, 1, 2, 3, 4]


def _binary_data(seed: int, n: int = 2000, n_groups: int = 60):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n)
    # Coarse scores force many ties, within and across groups.
    scores = np.round(rng.random(n) + 0.3 * (groups % 3), 1)
    labels = (rng.random(n) < 0.2 + 0.5 * (scores / scores.max())).astype(np.int64)
    probs = np.clip(rng.random(n), 0.01, 0.99)
    return labels, scores, probs, groups


def _gauc_reference(labels, scores, groups) -> float:
    total, weight = 0.0, 0
    for g in np.unique(groups):
        m = groups == g
        y, s = labels[m], scores[m]
        if y.min() == y.max():
            continue
        pos, neg = s[y == 1], s[y == 0]
        wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
        total += wins / (len(pos) * len(neg)) * m.sum()
        weight += m.sum()
    return total / weight if weight else float("nan")


@pytest.mark.parametrize("seed", SEEDS)
def test_auc_matches_sklearn_with_ties(seed):
    labels, scores, _, _ = _binary_data(seed)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_gauc_matches_loop_reference(seed):
    labels, scores, _, groups = _binary_data(seed, n=600, n_groups=40)
    assert gauc(labels, scores, groups) == pytest.approx(_gauc_reference(labels, scores, groups),
                                                         abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_probability_metrics_match_sklearn(seed):
    labels, _, probs, _ = _binary_data(seed)
    assert log_loss(labels, probs) == pytest.approx(sk_log_loss(labels, probs), rel=1e-10)
    rate = labels.mean()
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert normalized_entropy(labels, probs) == pytest.approx(sk_log_loss(labels, probs) / base,
                                                              rel=1e-10)
    assert calibration(labels, probs) == pytest.approx(probs.mean() / rate, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_regression_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, pred = rng.exponential(size=500), rng.normal(size=500)
    assert rmse(y, pred) == pytest.approx(math.sqrt(mean_squared_error(y, pred)), rel=1e-12)
    assert mae(y, pred) == pytest.approx(mean_absolute_error(y, pred), rel=1e-12)


def test_gauc_accepts_string_groups():
    labels, scores, _, groups = _binary_data(7, n=300, n_groups=20)
    names = np.array([f"user-{g}" for g in groups])
    assert gauc(labels, scores, names) == pytest.approx(gauc(labels, scores, groups), abs=1e-12)


def test_one_class_is_nan():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([], []))
    assert math.isnan(gauc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], ["a", "a", "b", "b"]))
    assert math.isnan(normalized_entropy([0, 0], [0.1, 0.2]))
    assert math.isnan(normalized_entropy([1, 1], [0.1, 0.2]))
    assert math.isnan(calibration([0, 0], [0.1, 0.2]))


def test_single_class_groups_are_skipped():
    labels = np.array([1, 0, 0, 1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.5, 0.4, 0.3, 0.2])
    groups = np.array([1, 1, 2, 2, 3, 3, 4, 4, 4])
    # Group 1: AUC 1 (2 rows); group 2: AUC 0 (2 rows); groups 3 and 4 are single-class.
    assert gauc(labels, scores, groups) == pytest.approx(0.5)
    assert gauc(labels[:2], scores[:2], groups[:2]) == pytest.approx(1.0)


def test_all_tied_scores_give_half():
    assert auc([0, 1, 0, 1], [0.5] * 4) == pytest.approx(0.5)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="same length"):
        auc([0, 1], [0.1])


def test_task_metrics_keys():
    labels, _, probs, groups = _binary_data(0)
    binary = task_metrics("binary", labels, probs, groups)
    assert set(binary) == {"auc", "gauc", "logloss", "ne", "calibration", "n", "label_mean",
                           "pred_mean"}
    assert binary["n"] == len(labels)
    assert binary["gauc"] == pytest.approx(gauc(labels, probs, groups))
    assert math.isnan(task_metrics("binary", labels, probs)["gauc"])
    reg = task_metrics("regression", probs, labels, None)
    assert set(reg) == {"rmse", "mae", "n", "label_mean", "pred_mean"}
    assert reg["label_mean"] == pytest.approx(probs.mean())
    with pytest.raises(ValueError, match="unknown task kind"):
        task_metrics("ranking", labels, probs)  # type: ignore[arg-type]


# --- Undefined (NaN/inf) and invalid input ---------------------------------------------

NAN, INF = float("nan"), float("inf")
BINARY_PROB_METRICS = [log_loss, normalized_entropy, calibration]


def _gauc_2(labels, scores):
    """gauc with two groups of two rows each (both groups would qualify)."""
    return gauc(labels, scores, [0, 0, 1, 1])


BINARY_METRICS = [auc, _gauc_2, *BINARY_PROB_METRICS]


def test_auc_nan_scores_are_nan_not_perfect():
    # The reviewer's example: NaN sorted above every score used to give 1.0.
    assert math.isnan(auc([0, 0, 1, 1], [0.9, 0.8, NAN, NAN]))
    assert math.isnan(auc([0, 0, 1, 1], [NAN, NAN, 0.2, 0.1]))
    assert math.isnan(auc([0, 1, 0, 1], [0.1, 0.9, 0.2, NAN]))


@pytest.mark.parametrize("labels", [[0, 1], [1, 0], [0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0]])
def test_all_nan_scores_are_nan_in_any_row_order(labels):
    scores = [NAN] * len(labels)
    assert math.isnan(auc(labels, scores))
    assert math.isnan(gauc(labels, scores, [0] * len(labels)))


@pytest.mark.parametrize("bad", [INF, -INF])
def test_infinite_scores_are_nan(bad):
    assert math.isnan(auc([0, 1, 0, 1], [0.1, 0.9, 0.2, bad]))
    assert math.isnan(gauc([0, 1, 0, 1], [0.1, 0.9, 0.2, bad], [0, 0, 1, 1]))


@pytest.mark.parametrize("metric", BINARY_METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_label_is_nan(metric, bad):
    # A NaN label used to count as a negative (NaN > 0.5 is False), giving a number.
    assert math.isnan(metric([0, 1, 0, bad], [0.2, 0.8, 0.3, 0.4]))
    assert math.isnan(metric(np.array([0, 1, 1, bad], np.float32), [0.2, 0.8, 0.3, 0.4]))


@pytest.mark.parametrize("metric", BINARY_METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_prob_or_score_is_nan(metric, bad):
    assert math.isnan(metric([0, 1, 0, 1], [0.2, 0.8, 0.3, bad]))
    assert math.isnan(metric([0, 1, 0, 1], np.array([0.2, 0.8, bad, 0.4], np.float32)))


def test_gauc_nan_in_one_group_is_not_dropped():
    labels = [0, 1, 0, 1, 0, 1]
    groups = [0, 0, 1, 1, 2, 2]
    assert gauc(labels, [0.1, 0.9, 0.2, 0.8, 0.3, 0.7], groups) == pytest.approx(1.0)
    # Without the NaN row's group, the other two groups would still give 1.0.
    assert math.isnan(gauc(labels, [0.1, 0.9, 0.2, 0.8, 0.3, NAN], groups))
    assert math.isnan(gauc([0, 1, 0, 1, 0, NAN], [0.1, 0.9, 0.2, 0.8, 0.3, 0.7], groups))
    # A NaN label in an otherwise single-class group still poisons the result.
    assert math.isnan(gauc([0, 1, 0, 1, 0, 0, NAN], [0.1, 0.9, 0.2, 0.8, 0.3, 0.3, 0.4],
                           [0, 0, 1, 1, 2, 2, 2]))


def test_gauc_nan_group_id_is_nan():
    labels, scores = [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]
    assert gauc(labels, scores, [0.0, 0.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert math.isnan(gauc(labels, scores, [0.0, 0.0, NAN, NAN]))


def test_nan_beyond_first_rows_and_in_large_input_is_found():
    labels, scores, probs, groups = _binary_data(3)
    scores, probs = scores.astype(np.float64), probs.copy()
    scores[-1] = NAN
    probs[len(probs) // 2] = NAN
    assert math.isnan(auc(labels, scores))
    assert math.isnan(gauc(labels, scores, groups))
    for metric in BINARY_PROB_METRICS:
        assert math.isnan(metric(labels, probs))


@pytest.mark.parametrize("metric", BINARY_METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [2, -1, 0.5, 0.3])
def test_label_outside_0_1_raises(metric, bad):
    with pytest.raises(ValueError, match=rf"labels must be 0 or 1.*got 1 of 4 other value\(s\), e\.g\. {bad}"):
        metric([0, 1, bad, 0], [0.2, 0.8, 0.3, 0.4])


def test_label_error_counts_and_lists_offending_values():
    with pytest.raises(ValueError, match=r"labels.*got 3 of 5 .*e\.g\. 2, 3"):
        auc([0, 1, 2, 3, 2], [0.1, 0.2, 0.3, 0.4, 0.5])


def test_invalid_label_raises_even_with_nan_present():
    # An invalid value is a bug and must not be masked by an undefined (NaN) result.
    with pytest.raises(ValueError, match="labels"):
        auc([0, 1, NAN, 2], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="probs"):
        log_loss([0, 1, NAN, 1], [0.1, 0.2, 0.3, 1.5])


@pytest.mark.parametrize("metric", BINARY_PROB_METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [1.5, -0.1, 2.0, -3.0, 1.0 + 1e-5])
def test_probability_outside_0_1_raises(metric, bad):
    with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\].*got 1 of 4 value"):
        metric([0, 1, 0, 1], [0.2, 0.8, bad, 0.4])


def test_probability_error_reports_range():
    with pytest.raises(ValueError, match=r"probs.*got 2 of 3 value\(s\) outside, from -0\.1 to 1\.5"):
        log_loss([0, 1, 1], [-0.1, 0.5, 1.5])


def test_auc_and_gauc_accept_arbitrary_scores():
    labels, _, _, groups = _binary_data(5)
    logits = np.random.default_rng(5).normal(scale=4.0, size=len(labels))
    sig = 1.0 / (1.0 + np.exp(-logits))
    assert logits.min() < 0 and logits.max() > 1
    assert auc(labels, logits) == pytest.approx(auc(labels, sig), abs=1e-12)
    assert auc(labels, logits) == pytest.approx(roc_auc_score(labels, logits), abs=1e-12)
    assert gauc(labels, logits, groups) == pytest.approx(gauc(labels, sig, groups), abs=1e-12)


def test_float32_rounding_above_one_is_tolerated_and_clipped():
    above = np.nextafter(np.float32(1), np.float32(2))  # 1.0000001
    below = -np.float32(1e-7)
    probs = np.array([0.2, above, below, 0.7], np.float32)
    clipped = np.array([0.2, 1.0, 0.0, 0.7], np.float32)
    labels = [0, 1, 0, 1]
    assert above > 1 and below < 0
    for metric in BINARY_PROB_METRICS:
        assert metric(labels, probs) == metric(labels, clipped)
    assert calibration(labels, probs) == pytest.approx(np.mean(clipped, dtype=np.float64) / 0.5, rel=1e-12)
    got = task_metrics("binary", labels, probs, [0, 0, 1, 1])
    want = task_metrics("binary", labels, clipped, [0, 0, 1, 1])
    assert got == pytest.approx(want, rel=1e-12)
    # Just past the tolerance is an error, not rounding.
    with pytest.raises(ValueError, match="probs"):
        log_loss(labels, [0.2, 1.0 + 2e-6, 0.3, 0.7])


def test_extreme_but_valid_probabilities_are_finite():
    # A sigmoid in float32 saturates to exactly 0 and 1; those are valid probabilities.
    labels = [0, 1, 1, 0]
    probs = np.array([0.0, 1.0, 0.0, 1.0], np.float32)
    assert math.isfinite(log_loss(labels, probs))
    assert log_loss(labels, probs) == pytest.approx(-math.log(1e-7) / 2, rel=1e-6)
    assert calibration(labels, probs) == pytest.approx(1.0)


@pytest.mark.parametrize("fn", [rmse, mae], ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_regression_non_finite_is_nan(fn, bad):
    assert math.isfinite(fn([1.0, 2.0, 3.0], [1.5, 2.0, 2.0]))
    assert math.isnan(fn([1.0, 2.0, 3.0], [1.5, bad, 2.0]))
    assert math.isnan(fn([1.0, bad, 3.0], [1.5, 2.0, 2.0]))
    # Both inf used to give inf - inf = NaN for one sign and inf for another: now always NaN.
    assert math.isnan(fn([bad, 2.0], [bad, 2.0]))


def test_empty_input_is_nan_everywhere():
    for metric in [auc, log_loss, normalized_entropy, calibration, rmse, mae]:
        assert math.isnan(metric([], [])), metric.__name__
    assert math.isnan(gauc([], [], []))
    binary = task_metrics("binary", [], [], [])
    assert binary["n"] == 0
    assert all(math.isnan(v) for k, v in binary.items() if k != "n")
    reg = task_metrics("regression", [], [])
    assert all(math.isnan(v) for k, v in reg.items() if k != "n")


def test_single_class_stays_nan_with_valid_probs():
    assert math.isnan(auc([0, 0, 0], [0.1, 0.5, 0.9]))
    assert math.isnan(gauc([1, 1, 1], [0.1, 0.5, 0.9], [0, 1, 1]))
    assert math.isnan(normalized_entropy([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(calibration([0, 0, 0], [0.1, 0.5, 0.9]))
    # All positives: calibration is defined (mean prediction / 1).
    assert calibration([1, 1], [0.2, 0.4]) == pytest.approx(0.3)
    # Single class does not excuse invalid input.
    with pytest.raises(ValueError, match="probs"):
        normalized_entropy([1, 1, 1], [0.1, 0.5, 1.5])
    with pytest.raises(ValueError, match="labels"):
        auc([2, 2], [0.1, 0.2])


def test_mismatched_lengths_raise_for_every_metric():
    for metric in [auc, log_loss, normalized_entropy, calibration, rmse, mae]:
        with pytest.raises(ValueError, match="same length"):
            # Single-class labels used to let normalized_entropy return NaN unchecked.
            metric([0, 0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        gauc([0, 1], [0.1, 0.2], [0])
    with pytest.raises(ValueError, match="same length"):
        task_metrics("binary", [0, 1], [0.1, 0.2], [0, 1, 2])


def test_task_metrics_binary_non_finite_makes_all_metrics_nan():
    labels, _, probs, groups = _binary_data(1)
    probs = probs.astype(np.float32)
    probs[10] = NAN
    got = task_metrics("binary", labels, probs, groups)
    for key in ["auc", "gauc", "logloss", "ne", "calibration", "pred_mean"]:
        assert math.isnan(got[key]), key
    assert got["label_mean"] == pytest.approx(labels.mean())
    assert got["n"] == len(labels)
    y = labels.astype(np.float32)
    y[3] = NAN
    got = task_metrics("binary", y, np.clip(probs, 0, 1)[~np.isnan(probs)].tolist() + [0.5], groups)
    for key in ["auc", "gauc", "logloss", "ne", "calibration", "label_mean"]:
        assert math.isnan(got[key]), key
    assert math.isfinite(got["pred_mean"])


def test_task_metrics_binary_validates_labels_and_preds():
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        task_metrics("binary", [0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="preds must be probabilities"):
        task_metrics("binary", [0, 1, 1], [0.1, 0.2, 1.5])
    with pytest.raises(ValueError, match="unknown task kind"):
        task_metrics("ranking", [0, 1], [0.1])  # type: ignore[arg-type]


def test_task_metrics_regression_non_finite():
    got = task_metrics("regression", [1.0, 2.0, 3.0], [1.0, INF, 2.0])
    assert math.isnan(got["rmse"]) and math.isnan(got["mae"]) and math.isnan(got["pred_mean"])
    assert got["label_mean"] == pytest.approx(2.0)
    # Regression labels are not restricted to {0, 1}, nor preds to [0, 1].
    got = task_metrics("regression", [5.0, -2.0], [4.0, -1.0])
    assert got["rmse"] == pytest.approx(1.0) and got["mae"] == pytest.approx(1.0)


def test_task_metrics_matches_single_metrics_on_caller_dtypes():
    # training.loop.evaluate passes float32 hard labels and float32 sigmoid outputs, which
    # saturate to exactly 0.0 / 1.0; the runner passes float32 teacher labels.
    labels, _, _, groups = _binary_data(2)
    logits = np.random.default_rng(2).normal(scale=12.0, size=len(labels)).astype(np.float32)
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    probs[:3] = 0.0  # as torch.sigmoid gives for logits below about -104
    assert probs.max() == 1.0 and probs.min() == 0.0
    y = labels.astype(np.float32)
    got = task_metrics("binary", y, probs, groups)
    assert got["auc"] == auc(labels, probs)
    assert got["gauc"] == gauc(labels, probs, groups)
    assert got["logloss"] == log_loss(labels, probs)
    assert got["ne"] == normalized_entropy(labels, probs)
    assert got["calibration"] == calibration(labels, probs)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, probs.astype(np.float64)), abs=1e-12)
    assert got["logloss"] == pytest.approx(
        sk_log_loss(labels, np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)), rel=1e-10)


def test_bool_and_int8_labels_are_accepted():
    labels, scores, probs, _ = _binary_data(4)
    assert auc(labels.astype(bool), scores) == auc(labels.astype(np.int8), scores) == auc(labels, scores)
    assert log_loss(labels.astype(bool), probs) == pytest.approx(log_loss(labels, probs), rel=1e-15)


# ------------------------------------------------------------------ lean forms, same numbers


def _day_like(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(np.float32)
    p = (np.round(rng.random(n) * 64) / 64).astype(np.float32)  # many ties
    g = rng.integers(0, max(n // 20, 1), n)
    return y, p, g


@pytest.mark.parametrize("n", [1, 2, 57, 20_001])
def test_auc_without_group_arrays_equals_the_grouped_form_bit_for_bit(n):
    from kdcore.evaluation.metrics import _auc_core, _grouped_auc

    y, p, _ = _day_like(n)
    if 0 < y.sum() < n:
        ref = float(_grouped_auc(y == 1, p, np.zeros(n, dtype=np.int64), 1)[0][0])
        assert _auc_core(y, p) == ref
    else:
        assert np.isnan(_auc_core(y, p))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint32])
def test_gauc_bucket_by_bucket_equals_the_whole_day_bit_for_bit(monkeypatch, dtype):
    import kdcore.evaluation.metrics as m

    y, p, g = _day_like(30_011, seed=3)
    g = g.astype(dtype)
    whole = m._gauc_core(y, p, g)
    monkeypatch.setattr(m, "GAUC_BUCKET_ROWS", 1_000)  # 31 buckets
    assert m._gauc_core(y, p, g) == whole


def test_chunked_log_loss_rmse_mae_equal_the_one_expression_forms(monkeypatch):
    import kdcore.evaluation.metrics as m

    monkeypatch.setattr(m, "_CHUNK", 1_000)
    y, p, _ = _day_like(10_007, seed=5)
    p = np.clip(p, 0.0, 1.0)
    y64, p64 = y.astype(np.float64), np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    assert m._log_loss_core(y, p, 1e-7) == float(-np.mean(y64 * np.log(p64) + (1.0 - y64) * np.log1p(-p64)))
    a, b = y.astype(np.float64) * 5, p.astype(np.float64)
    assert m._rmse_core(y * 5, p) == float(np.sqrt(np.mean((a - b) ** 2)))
    assert m._mae_core(y * 5, p) == float(np.mean(np.abs(a - b)))


def test_decile_calibration_with_byte_deciles_equals_the_bincount_form():
    from kdcore.quality.labels_check import N_DECILES, decile_calibration

    rng = np.random.default_rng(9)
    pred, label = np.round(rng.random(50_003) * 100) / 100, (rng.random(50_003) < 0.3).astype(np.float64)
    n = pred.size
    order = np.argsort(pred, kind="stable")
    group = np.empty(n, dtype=np.int64)
    group[order] = (np.arange(n) * N_DECILES) // n
    counts = np.bincount(group, minlength=N_DECILES)
    sp, sl = (np.bincount(group, weights=w, minlength=N_DECILES) for w in (pred, label))
    got = decile_calibration(pred, label)
    assert [(d.mean_pred, d.label_rate, d.count) for d in got] == \
        [(float(sp[d] / counts[d]), float(sl[d] / counts[d]), int(counts[d])) for d in range(N_DECILES)]

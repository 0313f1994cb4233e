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

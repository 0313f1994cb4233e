"""Ranking and regression metrics, vectorized in numpy.

Offline evaluation runs over millions of rows per day and per model (teacher, student,
baseline), so every metric here is a handful of array passes: no Python loop over rows or
groups. The input checks below cost one or two extra comparison passes per array (a few
ms for millions of rows, small next to the sorts and logs of the metrics themselves).

What each metric does with input it cannot score honestly:

=========================  ===========================================================
input                      result
=========================  ===========================================================
empty input                NaN (undefined; a report shows "n/a" for the day)
one class only             NaN for auc, gauc (when no group has both classes) and NE;
                           calibration is NaN when there is no positive. AUC is
                           undefined there, and a day without clicks must look neither
                           perfect nor useless.
NaN or +-inf anywhere in   NaN, for every metric; gauc too (one bad row makes the whole
labels, scores, probs or   value NaN, no row is dropped). Such a value is a missing
preds (or a NaN float      label or a numerically broken model, and any number computed
group id in gauc)          from it is fiction: a NaN score sorts above every real score,
                           so two NaN positives would make a "perfect" AUC, and a NaN
                           label fails ``> 0.5`` and would count as a negative. Dropping
                           the rows instead would hide a broken model behind a plausible
                           value; NaN reaches reports as "n/a" and gates as "no value".
binary label not 0 or 1    ValueError naming the argument, the count and examples
                           (auc, gauc, log_loss, normalized_entropy, calibration and
                           task_metrics("binary")): a 2 or a -1 is a wrong column or
                           encoding, not an undefined day, so it must stop the run. Soft
                           labels (0.3) are rejected too: these metrics score against
                           hard labels, and thresholding them silently would be a guess.
probability outside [0,1]  ValueError for log_loss, normalized_entropy, calibration and
                           task_metrics("binary"); auc and gauc take arbitrary real
                           scores (only the order matters). A tolerance of PROB_TOL
                           (1e-6) lets float32 rounding such as 1.0000001 through; such
                           values are clipped to [0, 1] before use.
=========================  ===========================================================

Invalid finite values are reported before undefined ones: labels [nan, 2] raise rather
than return NaN. Mismatched lengths always raise.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["PROB_TOL", "auc", "calibration", "gauc", "log_loss", "mae", "normalized_entropy", "rmse",
           "task_metrics"]

#: How far outside [0, 1] a probability may lie and still be accepted (then clipped): a few
#: float32 ulps, enough for rounding in upstream float32 arithmetic (1 ulp at 1.0 is 1.2e-7),
#: far too little to hide a logit or a percentage passed by mistake.
PROB_TOL = 1e-6

_NAN = float("nan")


def _as_1d(x: ArrayLike) -> np.ndarray:
    """Flat numeric view; non-numeric (e.g. object) input is converted to float64."""
    a = np.asarray(x).reshape(-1)
    return a if a.dtype.kind in "biuf" else a.astype(np.float64)


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have the same length, got {lengths}")
    return next(iter(lengths.values()))


def _examples(values: np.ndarray, k: int = 3) -> str:
    return ", ".join(repr(v) for v in np.unique(values)[:k].tolist())


def _all_finite(x: np.ndarray) -> bool:
    """True unless x holds NaN or +-inf (integer and bool arrays always qualify)."""
    return x.dtype.kind not in "fc" or bool(np.isfinite(x).all())


def _check_labels01(name: str, y: np.ndarray) -> bool:
    """Raise unless every finite label is 0 or 1; return whether all labels are finite.

    One fused pass ((y == 0) | (y == 1)) on the common, valid path; the slower split into
    invalid vs non-finite values only runs when that pass finds something.
    """
    ok = (y == 0) | (y == 1)
    if ok.all():
        return True
    bad = y[~ok]
    wrong = bad[np.isfinite(bad)]
    if wrong.size:
        raise ValueError(f"{name} must be 0 or 1 for a binary metric; got {wrong.size} of {len(y)} "
                         f"other value(s), e.g. {_examples(wrong)}")
    return False


def _check_probs(name: str, p: np.ndarray) -> tuple[np.ndarray, bool]:
    """Raise if a finite probability lies outside [-PROB_TOL, 1 + PROB_TOL]; return the
    probabilities (clipped to [0, 1] only if some lay within the tolerance outside) and
    whether all are finite."""
    ok = (p >= 0) & (p <= 1)
    if ok.all():
        return p, True
    bad = p[~ok]
    finite = np.isfinite(bad)
    wrong = bad[finite & ((bad < -PROB_TOL) | (bad > 1 + PROB_TOL))]
    if wrong.size:
        raise ValueError(f"{name} must be probabilities in [0, 1]; got {wrong.size} of {len(p)} value(s) "
                         f"outside, from {wrong.min().item()!r} to {wrong.max().item()!r}")
    if not finite.all():
        return p, False
    return np.clip(p, 0, 1), True


def _binary_probs(labels: ArrayLike, probs: ArrayLike, probs_name: str = "probs"
                  ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validated (labels, probabilities, all finite) for the probability metrics."""
    y, p = _as_1d(labels), _as_1d(probs)
    _check_same_length(labels=y, **{probs_name: p})
    y_finite = _check_labels01("labels", y)
    p, p_finite = _check_probs(probs_name, p)
    return y, p, y_finite and p_finite


def _grouped_auc(positive: np.ndarray, scores: np.ndarray,
                 codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group Mann-Whitney AUC, tied scores sharing the average of their ranks.

    Sorting once by (group, score) gives, for each row, its rank within its group; runs of
    equal (group, score) get the mean rank of the run, which is exactly the tie correction
    that makes AUC count a tied positive/negative pair as one half. Returns (auc, size) per
    group; groups without both classes get NaN. Scores must be finite (NaN has no rank).
    """
    n = len(scores)
    # Two argsorts beat np.lexsort ~1.6x; the second must be stable to keep score order.
    order = np.argsort(scores)
    if n_groups > 1:
        order = order[np.argsort(codes[order], kind="stable")]
    s, g, p = scores[order], codes[order], positive[order]
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(g[1:], g[:-1], out=new_group[1:])
    new_run = new_group.copy()
    new_run[1:] |= s[1:] != s[:-1]

    run_starts = np.flatnonzero(new_run)
    run_len = np.diff(np.append(run_starts, n))
    group_starts = np.flatnonzero(new_group)
    # Position (0-based) of each run's group start, to turn global positions into in-group ranks.
    group_of_run = np.cumsum(new_group)[run_starts] - 1
    run_rank = run_starts - group_starts[group_of_run] + (run_len + 1) / 2.0
    ranks = np.repeat(run_rank, run_len)

    size = np.bincount(g, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(g, weights=p.astype(np.float64), minlength=n_groups)
    rank_sum_pos = np.bincount(g, weights=np.where(p, ranks, 0.0), minlength=n_groups)
    n_neg = size - n_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        per_group = (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    per_group[(n_pos == 0) | (n_neg == 0)] = np.nan
    return per_group, size


# Cores: inputs already validated, non-empty and finite.

def _auc_core(y: np.ndarray, s: np.ndarray) -> float:
    """:func:`_grouped_auc` for one group without its per-row group arrays (a 10M-row day:
    ~330 MB at most instead of ~770 MB). The same number bit for bit: rank sums are sums of
    half-integers below 2**52, exact in any order."""
    n = len(s)
    order = np.argsort(s)
    s_sorted, positive = s[order], (y == 1)[order]
    del order
    new_run = np.empty(n, dtype=bool)
    new_run[0] = True
    np.not_equal(s_sorted[1:], s_sorted[:-1], out=new_run[1:])
    del s_sorted
    run_starts = np.flatnonzero(new_run)
    del new_run
    run_len = np.diff(np.append(run_starts, n))
    run_rank = run_starts + (run_len + 1) / 2.0
    del run_len
    pos_per_run = np.add.reduceat(positive, run_starts, dtype=np.int64)
    n_pos = float(pos_per_run.sum())
    n_neg = float(n) - n_pos
    if n_pos == 0 or n_neg == 0:
        return _NAN
    rank_sum_pos = float(np.dot(run_rank, pos_per_run))
    return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# GAUC of a larger day is computed bucket by bucket (buckets of whole groups, by group id),
# so its per-row temporaries are a bucket's, not the day's.
GAUC_BUCKET_ROWS = 1 << 20


def _gauc_core(y: np.ndarray, s: np.ndarray, grp: np.ndarray) -> float:
    if grp.dtype.kind in "fc" and np.isnan(grp).any():
        return _NAN  # a row without a group cannot be placed: undefined, not dropped
    k = -(-len(s) // GAUC_BUCKET_ROWS)
    if k <= 1 or grp.dtype.kind not in "iu":
        uniq, codes = np.unique(grp, return_inverse=True)
        per_group, size = _grouped_auc(y == 1, s, codes.reshape(-1), len(uniq))
    else:
        # A group's AUC depends on its own rows only, so each bucket gives exactly the numbers
        # the whole day gives; put back in sorted group order, the weighted mean below adds
        # them in the same order too: the same GAUC bit for bit.
        bucket = np.remainder(grp, k).astype(np.min_scalar_type(k))
        parts = []
        for b in range(k):
            rows = np.flatnonzero(bucket == b)
            if rows.size:
                uniq, codes = np.unique(grp[rows], return_inverse=True)
                parts.append((uniq, *_grouped_auc(y[rows] == 1, s[rows], codes.reshape(-1), len(uniq))))
        del bucket
        by_value = np.argsort(np.concatenate([u for u, _, _ in parts]), kind="stable")
        per_group = np.concatenate([g for _, g, _ in parts])[by_value]
        size = np.concatenate([z for _, _, z in parts])[by_value]
    ok = ~np.isnan(per_group)
    if not ok.any():
        return _NAN
    return float(np.sum(per_group[ok] * size[ok]) / np.sum(size[ok]))


# Per-row terms are computed this many rows at a time into one float64 array, then averaged
# whole: the same mean bit for bit as the one-expression form, without its six day-sized
# temporaries (10M rows: 458 MB -> ~100 MB).
_CHUNK = 1 << 18


def _row_terms(n: int, term) -> np.ndarray:
    out = np.empty(n, dtype=np.float64)
    for a in range(0, n, _CHUNK):
        out[a:a + _CHUNK] = term(slice(a, a + _CHUNK))
    return out


def _log_loss_core(y: np.ndarray, p: np.ndarray, eps: float) -> float:
    def term(r: slice) -> np.ndarray:
        yc = y[r].astype(np.float64, copy=False)
        pc_ = np.clip(p[r].astype(np.float64), eps, 1.0 - eps)
        return yc * np.log(pc_) + (1.0 - yc) * np.log1p(-pc_)

    return float(-np.mean(_row_terms(len(y), term)))


def _ne_core(y: np.ndarray, p: np.ndarray, logloss: float | None = None) -> float:
    """NE; ``logloss`` (eps 1e-7) is reused when the caller already has it."""
    rate = float(np.mean(y, dtype=np.float64))
    if rate <= 0.0 or rate >= 1.0:
        return _NAN
    base_entropy = -(rate * np.log(rate) + (1.0 - rate) * np.log1p(-rate))
    if logloss is None:
        logloss = _log_loss_core(y, p, 1e-7)
    return logloss / float(base_entropy)


def _calibration_core(y: np.ndarray, p: np.ndarray) -> float:
    rate = float(np.mean(y, dtype=np.float64))
    if rate == 0.0:
        return _NAN
    return float(np.mean(p, dtype=np.float64)) / rate


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC via average ranks (ties count one half).

    ``labels`` must be 0 or 1 (ValueError otherwise: a soft or mis-encoded label has no
    class). ``scores`` may be any real numbers, only their order matters. NaN when only one
    class is present or the input is empty, because AUC is undefined there and a day with no
    clicks must not look like a perfect or a useless model; NaN as well when any label or
    score is NaN or +-inf, because such a row has no rank (a NaN score would sort above every
    real score) and dropping it would hide a broken model.
    """
    y, s = _as_1d(labels), _as_1d(scores)
    n = _check_same_length(labels=y, scores=s)
    y_finite = _check_labels01("labels", y)
    if n == 0 or not (y_finite and _all_finite(s)):
        return _NAN
    return _auc_core(y, s)


def gauc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> float:
    """Group AUC: per-group AUC averaged with weights = group size.

    Ranking is served per user, so what matters is ordering within a user's candidates;
    a global AUC rewards merely separating active from inactive users. Groups with a single
    class carry no ordering information and are skipped; NaN if no group qualifies. Labels
    must be 0 or 1 (ValueError otherwise); scores may be any real numbers. Any NaN or +-inf
    label or score, or a NaN group id, makes the result NaN: the rows are not dropped,
    because an average over the remaining groups would look valid while part of the day
    was never scored.
    """
    y, s, grp = _as_1d(labels), _as_1d(scores), np.asarray(groups).reshape(-1)
    n = _check_same_length(labels=y, scores=s, groups=grp)
    y_finite = _check_labels01("labels", y)
    if n == 0 or not (y_finite and _all_finite(s)):
        return _NAN
    return _gauc_core(y, s, grp)


def log_loss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities are clipped to [eps, 1-eps] so a single
    confident mistake costs a large but finite amount.

    Labels must be 0 or 1 and probabilities in [0, 1] (within PROB_TOL for float32
    rounding), else ValueError: a logit or a rating passed as a probability would otherwise
    give a plausible-looking number. NaN on empty input and when any label or probability
    is NaN or +-inf (a missing value has no loss; averaging it away would hide it).
    """
    y, p, finite = _binary_probs(labels, probs)
    if len(y) == 0 or not finite:
        return _NAN
    return _log_loss_core(y, p, eps)


def normalized_entropy(labels: ArrayLike, probs: ArrayLike) -> float:
    """Log loss divided by the entropy of the base rate (He et al., 2014).

    Log loss alone moves with the click rate of the day; NE < 1 means the model beats
    always predicting the base rate, comparable across days. NaN if the rate is 0 or 1
    (no base entropy to divide by), on empty input, and when any label or probability is
    NaN or +-inf. Labels outside {0, 1} and probabilities outside [0, 1] raise ValueError,
    as for log_loss.
    """
    y, p, finite = _binary_probs(labels, probs)
    if len(y) == 0 or not finite:
        return _NAN
    return _ne_core(y, p)


def calibration(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean prediction / label rate: 1 is calibrated, > 1 over-predicts. A distilled
    student can rank well yet be miscalibrated, which breaks auctions and thresholds.

    NaN when there is no positive label (nothing to divide by), on empty input, and when any
    label or probability is NaN or +-inf (both means would be fiction). Labels outside
    {0, 1} and probabilities outside [0, 1] raise ValueError, as for log_loss.
    """
    y, p, finite = _binary_probs(labels, probs)
    if len(y) == 0 or not finite:
        return _NAN
    return _calibration_core(y, p)


def _rmse_core(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean(_row_terms(len(a), lambda r: (a[r].astype(np.float64)
                                                                - b[r].astype(np.float64)) ** 2))))


def _mae_core(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(_row_terms(len(a), lambda r: np.abs(a[r].astype(np.float64) - b[r].astype(np.float64)))))


def _regression_defined(a: np.ndarray, b: np.ndarray) -> bool:
    """False if empty or any value is NaN or +-inf."""
    return len(a) > 0 and _all_finite(a) and _all_finite(b)


def rmse(y: ArrayLike, pred: ArrayLike) -> float:
    """Root mean squared error. NaN on empty input and when any target or prediction is
    NaN or +-inf: an inf prediction is an overflow, not a measurably large error, so it is
    reported as undefined like in every other metric here rather than as inf (and inf - inf
    would give NaN anyway, so inf was never a reliable signal)."""
    a, b = _as_1d(y), _as_1d(pred)
    _check_same_length(y=a, pred=b)
    return _rmse_core(a, b) if _regression_defined(a, b) else _NAN


def mae(y: ArrayLike, pred: ArrayLike) -> float:
    """Mean absolute error. NaN on empty input and when any target or prediction is NaN or
    +-inf (see rmse)."""
    a, b = _as_1d(y), _as_1d(pred)
    _check_same_length(y=a, pred=b)
    return _mae_core(a, b) if _regression_defined(a, b) else _NAN


def _mean_or_nan(x: np.ndarray, finite: bool) -> float:
    return float(np.mean(x, dtype=np.float64)) if finite and len(x) else _NAN


def task_metrics(kind: Literal["binary", "regression"], labels: ArrayLike, preds: ArrayLike,
                 groups: ArrayLike | None = None) -> dict[str, float]:
    """All metrics for one task in one dict, so reports and quality gates read the same
    names. Binary preds are probabilities; `groups` (e.g. user ids) feeds GAUC and may be
    None, in which case gauc is NaN.

    Inputs are checked once, with the rules of the single metrics: for "binary", labels
    outside {0, 1} or preds outside [0, 1] raise ValueError, and any NaN or +-inf label or
    pred makes every metric NaN. For "regression", any NaN or +-inf makes rmse and mae NaN.
    ``label_mean`` / ``pred_mean`` are NaN when their own array holds NaN or +-inf (or is
    empty); ``n`` is always the row count.
    """
    if kind not in ("binary", "regression"):
        raise ValueError(f"unknown task kind {kind!r}; expected 'binary' or 'regression'")
    y, p = _as_1d(labels), _as_1d(preds)
    n = _check_same_length(labels=y, preds=p)
    grp = None if groups is None else np.asarray(groups).reshape(-1)
    if grp is not None:
        _check_same_length(labels=y, groups=grp)
    if kind == "binary":
        y_finite = _check_labels01("labels", y)
        p, p_finite = _check_probs("preds", p)
    else:
        y_finite, p_finite = _all_finite(y), _all_finite(p)
    common = {"n": float(n), "label_mean": _mean_or_nan(y, y_finite),
              "pred_mean": _mean_or_nan(p, p_finite)}
    defined = n > 0 and y_finite and p_finite
    if kind == "regression":
        return {"rmse": _rmse_core(y, p) if defined else _NAN,
                "mae": _mae_core(y, p) if defined else _NAN, **common}
    if not defined:
        return {"auc": _NAN, "gauc": _NAN, "logloss": _NAN, "ne": _NAN, "calibration": _NAN, **common}
    logloss = _log_loss_core(y, p, 1e-7)
    return {
        "auc": _auc_core(y, p),
        "gauc": _gauc_core(y, p, grp) if grp is not None else _NAN,
        "logloss": logloss,
        "ne": _ne_core(y, p, logloss),
        "calibration": _calibration_core(y, p),
        **common,
    }

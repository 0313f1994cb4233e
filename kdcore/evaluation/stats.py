"""Paired comparisons of two models: mean difference with a bootstrap interval.

Two sources of variation matter and an honest interval must see both:

* **seeds** — two runs of the same model with different initialisation seeds differ, so a
  gain measured on a few seeds can be luck of the draw;
* **days** — progressive metrics move together from day to day (traffic, the stream), and
  consecutive days are correlated (each day's model is warm-started from yesterday's).

``paired_bootstrap`` therefore resamples seed indices with replacement *and* days in
circular moving blocks of consecutive days, using the same indices for both models (the
comparison stays paired by seed and day). ``gap_recovered`` applies the same replicates
to a ratio: the fraction of the teacher–control gap a student recovers.

``paired_diff`` (days only, on per-day values) is the older, simpler interval; it is kept
for callers that have one value per day (the pipeline report, the teacher search)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def paired_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of (a - b) over days where both are finite, with a percentile bootstrap CI.

    Days only: with seed-averaged inputs it cannot see seed-to-seed variation; use
    ``paired_bootstrap`` on [seeds, days] arrays for that."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if d.size == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "days": 0}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "days": int(d.size)}


def moving_block_days(rng: np.random.Generator, n_days: int, block: int, n_boot: int) -> np.ndarray:
    """[n_boot, n_days] day indices of a circular moving-block bootstrap.

    Each replicate concatenates ceil(n_days / block) blocks of ``block`` consecutive days
    (wrapping around the end, so every day is equally likely to be drawn) and is cut to
    n_days. Keeping neighbouring days together preserves their correlation, which an
    i.i.d. day bootstrap would destroy (and so give too narrow an interval)."""
    block = max(1, min(block, n_days))
    n_blocks = -(-n_days // block)
    starts = rng.integers(0, n_days, size=(n_boot, n_blocks))
    idx = (starts[:, :, None] + np.arange(block)) % n_days
    return idx.reshape(n_boot, n_blocks * block)[:, :n_days]


def _replicate_weights(n_seeds: int, n_days: int, *, block: int, n_boot: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each seed ([n_boot, seeds]) and each day ([n_boot, days]) is drawn.

    A replicate's resampled cells are all (seed, day) pairs of its drawn indices, so a sum
    over them is ``sum_s sum_d ws[s] * wd[d] * x[s, d]`` — a matrix product instead of
    materialising [n_boot, seeds, days] gathers."""
    rng = np.random.default_rng(seed)
    si = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    di = moving_block_days(rng, n_days, block, n_boot)
    rows = np.arange(n_boot)[:, None]
    ws = np.bincount((rows * n_seeds + si).ravel(), minlength=n_boot * n_seeds).reshape(n_boot, n_seeds)
    wd = np.bincount((rows * n_days + di).ravel(), minlength=n_boot * n_days).reshape(n_boot, n_days)
    return ws.astype(float), wd.astype(float)


def _rep_sum(x: np.ndarray, ws: np.ndarray, wd: np.ndarray) -> np.ndarray:
    return ((ws @ x) * wd).sum(axis=1)


def _as_grid(x: ArrayLike) -> np.ndarray:
    x = np.asarray(x, float)
    return x[None, :] if x.ndim == 1 else x


def _interval(reps: np.ndarray, level: float) -> tuple[float, float]:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(reps, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _empty(n_seeds: int, block: int) -> dict[str, Any]:
    return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "seeds": 0, "days": 0,
            "per_seed": [math.nan] * n_seeds, "block": block, "dropped": 0}


def paired_bootstrap(a: ArrayLike, b: ArrayLike, *, block: int = 7, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Any]:
    """Mean of (a - b) over the (seed, day) cells of two [seeds, days] arrays, with a
    percentile interval from a seed x moving-block-of-days paired bootstrap.

    NaN cells (a metric undefined on that day for that seed) are left out of every mean.
    ``seeds`` / ``days`` count the seeds / days with at least one usable cell; ``dropped``
    counts replicates that drew no usable cell. Deterministic given ``seed``."""
    a, b = _as_grid(a), _as_grid(b)
    a, b = np.broadcast_arrays(a, b)
    n_seeds, n_days = a.shape
    block = max(1, min(block, n_days))
    d = a - b
    ok = np.isfinite(d)
    if not ok.any():
        return _empty(n_seeds, block)
    d0 = np.where(ok, d, 0.0)
    ws, wd = _replicate_weights(n_seeds, n_days, block=block, n_boot=n_boot, seed=seed)
    cnt = _rep_sum(ok.astype(float), ws, wd)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = np.where(cnt > 0, _rep_sum(d0, ws, wd) / cnt, np.nan)
        per_seed = d0.sum(1) / ok.sum(1)
    lo, hi = _interval(reps, level)
    return {"mean": float(d0.sum() / ok.sum()), "lo": lo, "hi": hi, "seeds": int(ok.any(1).sum()),
            "days": int(ok.any(0).sum()), "per_seed": [float(x) for x in per_seed], "block": block,
            "dropped": int((~np.isfinite(reps)).sum())}


def gap_recovered(student: ArrayLike, control: ArrayLike, teacher: ArrayLike, *, block: int = 7,
                  n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Fraction of the teacher–control gap the student recovers:
    mean(student - control) / mean(teacher - control), with a paired bootstrap interval.

    ``student`` and ``control`` are [seeds, days]; ``teacher`` is [days] (one teacher shared
    by every seed, broadcast) or [seeds, days]. Only cells where all three are finite
    enter, in numerator and denominator alike, and every replicate uses the same seed and
    day indices for the three arrays (``paired_bootstrap``'s resampling). The direction of
    the metric cancels in the ratio. A replicate whose denominator is ~0 has no defined
    ratio: it is dropped and counted in ``dropped``."""
    s, c = _as_grid(student), _as_grid(control)
    t = np.asarray(teacher, float)
    s, c, t = np.broadcast_arrays(s, c, t[None, :] if t.ndim == 1 else t)
    n_seeds, n_days = s.shape
    block = max(1, min(block, n_days))
    ok = np.isfinite(s) & np.isfinite(c) & np.isfinite(t)
    if not ok.any():
        return _empty(n_seeds, block)
    num = np.where(ok, s - c, 0.0)
    den = np.where(ok, t - c, 0.0)
    tol = 1e-9 * float(np.abs(den).sum() / ok.sum())  # "~0" relative to the typical per-cell gap

    def ratio(n: np.ndarray, dd: np.ndarray, cnt: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((cnt > 0) & (np.abs(dd) > tol * np.maximum(cnt, 1)), n / dd, np.nan)

    ws, wd = _replicate_weights(n_seeds, n_days, block=block, n_boot=n_boot, seed=seed)
    reps = ratio(_rep_sum(num, ws, wd), _rep_sum(den, ws, wd), _rep_sum(ok.astype(float), ws, wd))
    point = ratio(np.array([num.sum()]), np.array([den.sum()]), np.array([float(ok.sum())]))[0]
    per_seed = ratio(num.sum(1), den.sum(1), ok.sum(1).astype(float))
    lo, hi = _interval(reps, level)
    return {"mean": float(point), "lo": lo, "hi": hi, "seeds": int(ok.any(1).sum()), "days": int(ok.any(0).sum()),
            "per_seed": [float(x) for x in per_seed], "block": block, "dropped": int((~np.isfinite(reps)).sum())}


def per_seed_signs(per_seed: list[float], higher_better: bool) -> str:
    """"k/n better": in how many seeds the student beats the other model (n counts the
    seeds with a defined difference). A gain that holds in every seed is far more credible
    than the same mean carried by one seed."""
    vals = [x for x in per_seed if x is not None and math.isfinite(x)]
    better = sum(1 for x in vals if (x > 0 if higher_better else x < 0))
    return f"{better}/{len(vals)} better"


def fmt_ci(r: dict[str, float], digits: int = 4) -> str:
    """"mean [lo, hi] (n=...)"; n is days, or seeds×days for ``paired_bootstrap`` results."""
    if not r["days"]:
        return "n/a"
    n = f"{r['seeds']}×{r['days']}" if "seeds" in r else f"{r['days']}"
    return f"{r['mean']:+.{digits}f} [{r['lo']:+.{digits}f}, {r['hi']:+.{digits}f}] (n={n})"

"""Paired comparisons over days: mean difference with a bootstrap 95% interval.

Days are the unit of replication in progressive validation (rows within a day are not
independent of the model trained on the previous day), so intervals resample days."""

from __future__ import annotations

import math

import numpy as np


def paired_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of (a - b) over days where both are finite, with a percentile bootstrap CI."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if d.size == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "days": 0}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "days": int(d.size)}


def fmt_ci(r: dict[str, float], digits: int = 4) -> str:
    if not r["days"]:
        return "n/a"
    return f"{r['mean']:+.{digits}f} [{r['lo']:+.{digits}f}, {r['hi']:+.{digits}f}] (n={r['days']})"

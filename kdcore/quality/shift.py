"""Distribution shift between the teacher's training window (a reference `Profile`) and
the student's day D.

The math is plain numpy over bin counts so it can be checked against the textbook
formulas. Counting is vectorized over Arrow/numpy columns: numeric features are binned
on the reference's quantile edges, categorical features on the reference's top values.
Missing values (null or NaN) get a bin of their own, so a feature that suddenly goes
missing shows up as shift instead of silently shrinking the denominator.

Performance: `compare` on 1M rows x 20 numeric features runs in well under 0.5 s
(see bench/bench_shift.py); the hot loop is one `<=` comparison per edge per column.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from kdcore.data.spec import DatasetSpec, TaskKind
from kdcore.errors import DataError
from kdcore.quality.bins import ArrayLike, as_float64, bin_counts, categorical_counts
from kdcore.quality.profile import Profile

# --------------------------------------------------------------------------- math


def _distribution(counts: np.ndarray, side: str) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError(f"{side} counts are empty (sum is {total}); a distribution needs mass")
    return counts / total


def _check_shared_bins(ref_counts: np.ndarray, cur_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(ref_counts, dtype=np.float64)
    cur = np.asarray(cur_counts, dtype=np.float64)
    if ref.shape != cur.shape or ref.ndim != 1:
        raise ValueError(f"counts must be 1-d over shared bins, got shapes {ref.shape} and {cur.shape}")
    return ref, cur


def psi(ref_counts: np.ndarray, cur_counts: np.ndarray, eps: float = 1e-6) -> float:
    """Population stability index: sum_i (q_i - p_i) * ln(q_i / p_i), with p the reference
    and q the current share per bin. Shares are floored at `eps` so an empty bin on one side
    gives a large but finite term instead of infinity (the usual convention)."""
    ref, cur = _check_shared_bins(ref_counts, cur_counts)
    p = np.maximum(_distribution(ref, "reference"), eps)
    q = np.maximum(_distribution(cur, "current"), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def js_divergence(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (base 2), hence in [0, 1]. Unlike PSI it needs no
    epsilon: 0 * log 0 is taken as 0 and the mixture is positive wherever either side is."""
    ref, cur = _check_shared_bins(ref_counts, cur_counts)
    p = _distribution(ref, "reference")
    q = _distribution(cur, "current")
    m = 0.5 * (p + q)

    def kl_to_m(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(min(max(0.5 * kl_to_m(p) + 0.5 * kl_to_m(q), 0.0), 1.0))


# --------------------------------------------------------------------------- counting


def _missing_count(values: np.ndarray) -> int:
    return int(np.count_nonzero(np.isnan(values)))


def label_sum_count(col: ArrayLike) -> tuple[float, int]:
    """Sum and count over finite, non-null values: what a streamed mean adds up."""
    v = as_float64(col)
    finite = np.isfinite(v)
    return float(v[finite].sum()), int(np.count_nonzero(finite))


# --------------------------------------------------------------------------- report


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureShift(_Model):
    kind: Literal["numeric", "categorical"]
    psi: float
    js: float
    ref_missing_frac: float
    cur_missing_frac: float


class LabelDrift(_Model):
    """Hard-label mean of the reference window vs day D (rate for binary tasks)."""

    kind: TaskKind
    ref_mean: float | None
    cur_mean: float | None
    abs_diff: float | None
    rel_diff: float | None  # abs_diff / |ref_mean| (denominator floored at 1e-12)


class ShiftReport(_Model):
    ref_rows: int
    ref_rows_per_day: float
    cur_rows: int
    row_count_ratio: float  # cur_rows / reference rows per day
    features: dict[str, FeatureShift]
    labels: dict[str, LabelDrift]

    def max_feature(self, metric: Literal["psi", "js"]) -> tuple[str, float] | None:
        """(feature, value) of the most shifted feature by `metric`; ties go to the first."""
        if not self.features:
            return None
        name = max(self.features, key=lambda f: getattr(self.features[f], metric))
        return name, getattr(self.features[name], metric)


def _require_columns(data: pa.Table | pa.RecordBatch, columns: list[str]) -> None:
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise DataError(f"day data lacks column(s) {missing} required by the reference profile")


def _feature_shift(kind: Literal["numeric", "categorical"], ref: np.ndarray, cur: np.ndarray) -> FeatureShift:
    return FeatureShift(kind=kind, psi=psi(ref, cur), js=js_divergence(ref, cur),
                        ref_missing_frac=float(ref[-1] / ref.sum()),
                        cur_missing_frac=float(cur[-1] / cur.sum()))


def compare(profile: Profile, data: pa.Table | Iterable[pa.RecordBatch | pa.Table], spec: DatasetSpec
            ) -> ShiftReport:
    """Shift of day D (`data`: a table, or its batches streamed) against the reference
    `profile`, per feature and per task.

    Only counts are accumulated, so a streamed day of any size needs the memory of one
    batch. Features come from the profile (what the reference saw), tasks from the spec.
    Raises DataError when D is empty or lacks a profiled column: both are contract breaks,
    not drift, and must not be scored as a number."""
    task_cols = {t.name: t.label_column for t in spec.tasks if t.name in profile.tasks}
    numeric = {name: np.zeros(len(nref.edges) + 2, np.int64) for name, nref in profile.numeric.items()}
    categorical = {name: np.zeros(len(cref.values) + 2, np.int64) for name, cref in profile.categorical.items()}
    label_sum = dict.fromkeys(task_cols, 0.0)
    label_n = dict.fromkeys(task_cols, 0)
    rows = 0
    for batch in [data] if isinstance(data, pa.Table) else data:
        _require_columns(batch, [*profile.numeric, *profile.categorical, *task_cols.values()])
        rows += batch.num_rows
        for name, nref in profile.numeric.items():
            values = as_float64(batch.column(name))
            numeric[name] += np.append(bin_counts(values, nref.edges), _missing_count(values))
        for name, cref in profile.categorical.items():
            col = batch.column(name)
            categorical[name] += np.append(categorical_counts(col, cref.values), col.null_count)
        for task, col_name in task_cols.items():
            total, n = label_sum_count(batch.column(col_name))
            label_sum[task] += total
            label_n[task] += n
    if rows == 0:
        raise DataError("day data has no rows; shift is undefined")

    features: dict[str, FeatureShift] = {}
    for name, nref in profile.numeric.items():
        features[name] = _feature_shift("numeric", np.array([*nref.counts, nref.null_count]), numeric[name])
    for name, cref in profile.categorical.items():
        ref = np.array([*cref.counts, cref.other_count, cref.null_count])
        features[name] = _feature_shift("categorical", ref, categorical[name])

    labels: dict[str, LabelDrift] = {}
    for task in spec.tasks:
        tref = profile.tasks.get(task.name)
        if tref is None:
            continue
        cur_mean = label_sum[task.name] / label_n[task.name] if label_n[task.name] else None
        abs_diff = rel_diff = None
        if tref.mean is not None and cur_mean is not None:
            abs_diff = abs(cur_mean - tref.mean)
            rel_diff = abs_diff / max(abs(tref.mean), 1e-12)
        labels[task.name] = LabelDrift(kind=task.kind, ref_mean=tref.mean, cur_mean=cur_mean,
                                       abs_diff=abs_diff, rel_diff=rel_diff)

    per_day = profile.row_count / max(profile.n_days, 1)
    return ShiftReport(ref_rows=profile.row_count, ref_rows_per_day=per_day, cur_rows=rows,
                       row_count_ratio=rows / per_day if per_day else float(rows),
                       features=features, labels=labels)

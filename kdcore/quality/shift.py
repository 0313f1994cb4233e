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

from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from kdcore.data.spec import DatasetSpec, TaskKind
from kdcore.errors import DataError

if TYPE_CHECKING:  # profile.py imports this module at runtime; avoid the cycle
    from kdcore.quality.profile import Profile

ArrayLike = pa.Array | pa.ChunkedArray

# Above this many edges one binary search per value beats one comparison pass per edge.
_COMPARE_MAX_EDGES = 32


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


def as_float64(col: ArrayLike) -> np.ndarray:
    """A numeric Arrow column as a float64 numpy array with nulls as NaN (zero-copy for a
    single-chunk float64 column without nulls). One dtype everywhere keeps edge
    comparisons exact whatever the stored width."""
    if not pa.types.is_float64(col.type):
        try:
            col = pc.cast(col, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"column of type {col.type} is not numeric ({e})") from None
    return col.to_numpy(zero_copy_only=False)


def bin_counts(values: np.ndarray, edges: np.ndarray | list[float]) -> np.ndarray:
    """Counts per bin (-inf, e1], (e1, e2], ..., (ek, inf) over the non-NaN `values`
    (len(edges) + 1 counts; +-inf land in the outer bins).

    For the usual handful of edges, k vectorized `<=` passes (cumulative counts, then a
    diff) are about 8x faster than np.searchsorted + np.bincount on 1M values, which is
    what keeps `compare` inside its budget; many edges fall back to searchsorted."""
    values = np.asarray(values)
    edges = np.asarray(edges, dtype=np.float64)
    if values.dtype.kind == "f":
        n_valid = values.size - int(np.count_nonzero(np.isnan(values)))
    else:
        n_valid = values.size
    if edges.size > _COMPARE_MAX_EDGES:
        finite_or_inf = values[~np.isnan(values)] if values.dtype.kind == "f" else values
        idx = np.searchsorted(edges, finite_or_inf, side="left")
        return np.bincount(idx, minlength=edges.size + 1).astype(np.int64)
    cum = np.empty(edges.size + 2, dtype=np.int64)
    cum[0] = 0
    for i, e in enumerate(edges):  # loop over edges (<= 32), each pass vectorized over rows
        cum[i + 1] = np.count_nonzero(values <= e)
    cum[-1] = n_valid
    return np.diff(cum)


def _value_set_for(arr: ArrayLike, top_values: list[str]) -> tuple[ArrayLike, pa.Array]:
    """Bring the column and the (string) top values to one type, preferring to cast the few
    top values rather than the million-row column."""
    if pa.types.is_dictionary(arr.type):
        arr = pc.cast(arr, arr.type.value_type)
    values = pa.array(top_values, type=pa.string())
    if pa.types.is_string(arr.type):
        return arr, values
    if pa.types.is_large_string(arr.type):
        return arr, values.cast(pa.large_string())
    try:
        typed = values.cast(arr.type)
        # A lossy round trip ("1.0" -> 1 -> "1") would silently merge values; refuse it.
        if typed.cast(pa.string()).equals(values):
            return arr, typed
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    return pc.cast(arr, pa.string()), values


def categorical_counts(arr: ArrayLike, top_values: list[str]) -> np.ndarray:
    """Counts of each of `top_values` followed by one "__other__" count (len + 1 counts);
    nulls are excluded (callers count them with `arr.null_count`)."""
    arr, value_set = _value_set_for(arr, top_values)
    idx = pc.index_in(arr, options=pc.SetLookupOptions(value_set, skip_nulls=True))
    k = len(top_values)
    idx_np = pc.fill_null(idx, k).to_numpy(zero_copy_only=False)
    counts = np.bincount(idx_np, minlength=k + 1).astype(np.int64)
    counts[k] -= arr.null_count  # nulls were filled into the "other" slot
    return counts


def _missing_count(values: np.ndarray) -> int:
    return int(np.count_nonzero(np.isnan(values)))


def label_mean(col: ArrayLike) -> tuple[float | None, int]:
    """Mean and count over finite, non-null values (the rate for a 0/1 label)."""
    v = as_float64(col)
    finite = np.isfinite(v)
    n = int(np.count_nonzero(finite))
    return (float(v[finite].mean()) if n else None), n


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


def _require_columns(data: pa.Table, columns: list[str]) -> None:
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise DataError(f"day data lacks column(s) {missing} required by the reference profile")


def _feature_shift(kind: Literal["numeric", "categorical"], ref: np.ndarray, cur: np.ndarray) -> FeatureShift:
    return FeatureShift(kind=kind, psi=psi(ref, cur), js=js_divergence(ref, cur),
                        ref_missing_frac=float(ref[-1] / ref.sum()),
                        cur_missing_frac=float(cur[-1] / cur.sum()))


def compare(profile: Profile, data: pa.Table, spec: DatasetSpec) -> ShiftReport:
    """Shift of day D (`data`) against the reference `profile`, per feature and per task.

    Features come from the profile (what the reference saw), tasks from the spec. Raises
    DataError when D is empty or lacks a profiled column: both are contract breaks, not
    drift, and must not be scored as a number."""
    if data.num_rows == 0:
        raise DataError("day data has no rows; shift is undefined")
    task_cols = [t.label_column for t in spec.tasks if t.name in profile.tasks]
    _require_columns(data, [*profile.numeric, *profile.categorical, *task_cols])

    features: dict[str, FeatureShift] = {}
    for name, nref in profile.numeric.items():
        values = as_float64(data.column(name))
        cur = np.append(bin_counts(values, nref.edges), _missing_count(values))
        features[name] = _feature_shift("numeric", np.array([*nref.counts, nref.null_count]), cur)
    for name, cref in profile.categorical.items():
        col = data.column(name)
        cur = np.append(categorical_counts(col, cref.values), col.null_count)
        ref = np.array([*cref.counts, cref.other_count, cref.null_count])
        features[name] = _feature_shift("categorical", ref, cur)

    labels: dict[str, LabelDrift] = {}
    for task in spec.tasks:
        tref = profile.tasks.get(task.name)
        if tref is None:
            continue
        cur_mean, _ = label_mean(data.column(task.label_column))
        abs_diff = rel_diff = None
        if tref.mean is not None and cur_mean is not None:
            abs_diff = abs(cur_mean - tref.mean)
            rel_diff = abs_diff / max(abs(tref.mean), 1e-12)
        labels[task.name] = LabelDrift(kind=task.kind, ref_mean=tref.mean, cur_mean=cur_mean,
                                       abs_diff=abs_diff, rel_diff=rel_diff)

    per_day = profile.row_count / max(profile.n_days, 1)
    return ShiftReport(ref_rows=profile.row_count, ref_rows_per_day=per_day, cur_rows=data.num_rows,
                       row_count_ratio=data.num_rows / per_day if per_day else float(data.num_rows),
                       features=features, labels=labels)

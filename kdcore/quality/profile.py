"""A compact, JSON-serializable summary of the teacher's training window (the reference):
quantile bins per numeric feature, top values per categorical feature, label means per
task. Day D is compared against it (shift.py) and the GX suite is generated from it
(expectations.py), so the reference window is read once and never again.

Streaming choice: `build_profile` makes ONE pass over the batches. The quantile edges
come from the first `edge_sample_rows` rows (default 1,000,000), which are buffered;
every row (buffered or not) is then counted into those edges. This is deterministic and
needs no second read of the window. The cost: when the window is ordered by date, the
edges reflect its earliest days. That only affects how evenly the bins split the data,
not the validity of PSI/JS (both sides are counted on the same fixed edges, and the outer
bins are open-ended); pass a shuffled or date-interleaved stream if that matters.
Windows that fit in the sample (the common case) get exact quantile edges.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from kdcore.data.spec import DatasetSpec, TaskKind
from kdcore.errors import DataError
from kdcore.quality.bins import as_float64, bin_counts, quantile_edges

OTHER = "__other__"
_SECONDS_PER_DAY = 86_400


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NumericProfile(_Model):
    """Bins are (-inf, e1], (e1, e2], ..., (ek, inf): `counts` has len(edges) + 1 entries.
    NaN and null count as `null_count`; min/max/mean are over finite values only."""

    edges: list[float]
    counts: list[int]
    null_count: int
    min: float | None
    max: float | None
    mean: float | None


class CategoricalProfile(_Model):
    """Top values (as strings, most frequent first, ties by value) with their counts; all
    other non-null values are pooled into `other_count` (the "__other__" bucket).
    `arrow_type` lets consumers turn the strings back into the column's values."""

    arrow_type: str
    values: list[str]
    counts: list[int]
    other_count: int
    null_count: int

    def as_counts(self) -> dict[str, int]:
        return {**dict(zip(self.values, self.counts)), OTHER: self.other_count}


class TaskProfile(_Model):
    kind: TaskKind
    mean: float | None  # label rate for binary tasks; over finite, non-null labels
    count: int


class Profile(_Model):
    dataset: str
    row_count: int
    n_days: int  # distinct days in the window; row_count / n_days is the per-day average
    n_bins: int
    top_k: int
    edge_sample_rows: int  # rows the numeric quantile edges were computed from
    numeric: dict[str, NumericProfile]
    categorical: dict[str, CategoricalProfile]
    tasks: dict[str, TaskProfile]

    @property
    def rows_per_day(self) -> float:
        return self.row_count / max(self.n_days, 1)


# --------------------------------------------------------------------------- helpers


def _day_numbers(col: pa.ChunkedArray) -> np.ndarray:
    """Distinct UTC day numbers of a time column: timestamp/date types, or integers taken as
    epoch seconds (the MovieLens convention). Other types give no days."""
    t = col.type
    if pa.types.is_timestamp(t):
        per_day = _SECONDS_PER_DAY * {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[t.unit]
        raw = pc.cast(col, pa.int64())
    elif pa.types.is_date32(t):
        per_day, raw = 1, pc.cast(col, pa.int32())
    elif pa.types.is_date64(t):
        per_day, raw = _SECONDS_PER_DAY * 1000, pc.cast(col, pa.int64())
    elif pa.types.is_integer(t):
        per_day, raw = _SECONDS_PER_DAY, pc.cast(col, pa.int64())
    else:
        return np.empty(0, dtype=np.int64)
    v = pc.drop_null(raw).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.unique(np.floor_divide(v, per_day))


def _as_table(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    return pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


# --------------------------------------------------------------------------- accumulators


class _NumericAcc:
    def __init__(self, edges: list[float]):
        self.edges = edges
        self.counts = np.zeros(len(edges) + 1, dtype=np.int64)
        self.nulls = 0
        self.n_finite = 0
        self.total = 0.0
        self.lo = np.inf
        self.hi = -np.inf

    def add(self, values: np.ndarray) -> None:
        self.counts += bin_counts(values, self.edges)
        self.nulls += int(np.count_nonzero(np.isnan(values)))
        finite = values[np.isfinite(values)]
        if finite.size:
            self.n_finite += finite.size
            self.total += float(finite.sum())
            self.lo = min(self.lo, float(finite.min()))
            self.hi = max(self.hi, float(finite.max()))

    def result(self) -> NumericProfile:
        has = self.n_finite > 0
        return NumericProfile(edges=self.edges, counts=self.counts.tolist(), null_count=self.nulls,
                              min=self.lo if has else None, max=self.hi if has else None,
                              mean=self.total / self.n_finite if has else None)


class _CategoricalAcc:
    """Exact value counts merged batch by batch with an Arrow group-by (vectorized; memory
    grows with the number of distinct values, which is fine for ids up to a few million)."""

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.arrow_type: pa.DataType | None = None
        self.table = pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        self.nulls = 0

    def add(self, col: pa.ChunkedArray) -> None:
        self.arrow_type = self.arrow_type or _value_type(col.type)
        self.nulls += col.null_count
        vc = pc.value_counts(pc.cast(pc.drop_null(col), pa.string()))
        batch = pa.table({"value": vc.field("values"), "count": vc.field("counts").cast(pa.int64())})
        merged = pa.concat_tables([self.table, batch]).group_by("value").aggregate([("count", "sum")])
        self.table = pa.table({"value": merged.column("value"), "count": merged.column("count_sum")})

    def result(self) -> CategoricalProfile:
        order = pc.sort_indices(self.table, sort_keys=[("count", "descending"), ("value", "ascending")])
        top = self.table.take(order[: self.top_k])
        counts = top.column("count").to_pylist()
        total = int(pc.sum(self.table.column("count")).as_py() or 0)
        return CategoricalProfile(arrow_type=str(self.arrow_type or pa.string()),
                                  values=top.column("value").to_pylist(), counts=counts,
                                  other_count=total - sum(counts), null_count=self.nulls)


class _TaskAcc:
    def __init__(self, kind: TaskKind):
        self.kind = kind
        self.total = 0.0
        self.count = 0

    def add(self, col: pa.ChunkedArray) -> None:
        v = as_float64(col)
        finite = v[np.isfinite(v)]
        self.total += float(finite.sum())
        self.count += finite.size

    def result(self) -> TaskProfile:
        return TaskProfile(kind=self.kind, mean=self.total / self.count if self.count else None,
                           count=self.count)


# --------------------------------------------------------------------------- builder


def _check_columns(table: pa.Table, spec: DatasetSpec) -> None:
    needed = [*spec.numeric, *spec.categorical, *[t.label_column for t in spec.tasks]]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(f"reference data for dataset '{spec.name}' lacks column(s) {missing}")


def _buffer_sample(it: Iterator[pa.Table], spec: DatasetSpec, rows: int) -> list[pa.Table]:
    """Pull batches until at least `rows` rows are buffered (or the stream ends)."""
    buffered: list[pa.Table] = []
    n = 0
    while n < rows:
        batch = next(it, None)
        if batch is None:
            break
        _check_columns(batch, spec)
        buffered.append(batch)
        n += batch.num_rows
    return buffered


def build_profile(batches: Iterable[pa.RecordBatch | pa.Table], spec: DatasetSpec, n_bins: int = 10,
                  top_k: int = 50, *, edge_sample_rows: int = 1_000_000,
                  n_days: int | None = None) -> Profile:
    """Profile the reference window in one streaming pass (see the module docstring for how
    edges are chosen). `n_days` defaults to the number of distinct UTC days in the spec's
    timestamp column (1 when it is absent or of another type)."""
    if n_bins < 1 or top_k < 0 or edge_sample_rows < 1 or (n_days is not None and n_days < 1):
        raise ValueError(f"need n_bins >= 1, top_k >= 0, edge_sample_rows >= 1, n_days >= 1 "
                         f"(got {n_bins}, {top_k}, {edge_sample_rows}, {n_days})")
    it = (_as_table(b) for b in batches)
    buffered = _buffer_sample(it, spec, edge_sample_rows)
    if not buffered or sum(b.num_rows for b in buffered) == 0:
        raise DataError(f"reference data for dataset '{spec.name}' has no rows")

    sample = pa.concat_tables(buffered).slice(0, edge_sample_rows)
    numeric = {c: _NumericAcc(quantile_edges(as_float64(sample.column(c)), n_bins)) for c in spec.numeric}
    sample_rows = sample.num_rows
    del sample
    categorical = {c: _CategoricalAcc(top_k) for c in spec.categorical}
    tasks = {t.name: _TaskAcc(t.kind) for t in spec.tasks}
    days: set[int] = set()
    row_count = 0

    def consume(table: pa.Table) -> None:
        nonlocal row_count
        row_count += table.num_rows
        for c, acc in numeric.items():
            acc.add(as_float64(table.column(c)))
        for c, cacc in categorical.items():
            cacc.add(table.column(c))
        for t in spec.tasks:
            tasks[t.name].add(table.column(t.label_column))
        if n_days is None and spec.timestamp in table.column_names:
            days.update(_day_numbers(table.column(spec.timestamp)).tolist())

    for table in buffered:
        consume(table)
    buffered.clear()
    for table in it:
        _check_columns(table, spec)
        consume(table)

    return Profile(dataset=spec.name, row_count=row_count, n_days=n_days or max(len(days), 1),
                   n_bins=n_bins, top_k=top_k, edge_sample_rows=sample_rows,
                   numeric={c: a.result() for c, a in numeric.items()},
                   categorical={c: a.result() for c, a in categorical.items()},
                   tasks={n: a.result() for n, a in tasks.items()})

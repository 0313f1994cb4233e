"""Checks on the teacher labels for day D against D's examples: coverage (every example
labelled once), validity (right dtype, finite, in range), the teacher's calibration on D
per binary task (overall and per prediction decile) and bias per regression task.
It also records which teacher labelled D and whether it is staler than the label policy
asks for (a fallback after a failed or skipped refresh, or a pinned version).

This module only measures and counts bad rows; gate.py turns the counts into pass / warn
/ fail with the policy thresholds (staleness included, which is passed in as a number).
Teacher labels: column `spec.example_id` plus one floating column per task, named by the
task name. Hard labels come from the examples' `task.label_column`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from kdcore.data.examples import duplicate_ids
from kdcore.data.spec import DatasetSpec, Task, TaskKind
from kdcore.errors import DataError
from kdcore.quality.bins import as_float64

N_DECILES = 10


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Coverage(_Model):
    n_examples: int
    n_label_rows: int
    missing: int  # examples of D without a teacher label (null example ids included)
    duplicate_ids: int  # label rows repeating an example_id seen in an earlier label row
    null_ids: int  # label rows without an example_id
    extra: int  # label rows whose example_id is not an example of D (informational)

    @property
    def missing_fraction(self) -> float:
        return self.missing / self.n_examples if self.n_examples else 0.0


class TaskValidity(_Model):
    """Bad rows of one teacher column. Categories are disjoint; `n_invalid` is their sum,
    or every row when the column is absent or not floating (its values cannot be trusted)."""

    task: str
    kind: TaskKind
    column: str
    dtype: str | None  # None: the column is absent
    dtype_ok: bool
    valid_min: float | None
    valid_max: float | None
    n_rows: int
    n_null: int
    n_nonfinite: int
    n_out_of_range: int
    n_invalid: int

    @property
    def invalid_fraction(self) -> float:
        return self.n_invalid / self.n_rows if self.n_rows else 0.0

    def describe(self) -> str:
        if self.dtype is None:
            return f"column '{self.column}' is missing from the teacher labels: {self.n_invalid} bad rows"
        if not self.dtype_ok:
            return (f"column '{self.column}' has dtype {self.dtype}, expected floating (float32): "
                    f"{self.n_invalid} bad rows")
        rng = f"[{self.valid_min}, {self.valid_max}]"
        return (f"column '{self.column}': {self.n_invalid} bad rows ({self.n_null} null, "
                f"{self.n_nonfinite} non-finite, {self.n_out_of_range} outside {rng})")


class DecileCalibration(_Model):
    decile: int  # 0 = lowest predictions
    mean_pred: float
    label_rate: float
    count: int


class Calibration(_Model):
    """Mean teacher prediction / observed label rate on D (1.0 is ideal; None when D has
    no positive label). Only examples with a finite prediction and label count."""

    task: str
    mean_pred: float | None
    label_rate: float | None
    calibration: float | None
    count: int
    deciles: list[DecileCalibration]


class RegressionBias(_Model):
    task: str
    mean_pred: float | None
    mean_label: float | None
    bias: float | None  # mean_pred - mean_label
    count: int


class TeacherLineage(_Model):
    """The teacher that labelled D, from the labels' manifest metadata. ``stale``: it is
    older than the label policy asks for (``staleness_days > expected_staleness_days``),
    so the labels come from a fallback teacher."""

    version: str
    trained_through: str  # ISO date
    expected_staleness_days: int
    stale: bool


class LabelChecks(_Model):
    coverage: Coverage
    validity: dict[str, TaskValidity]
    calibration: dict[str, Calibration]
    bias: dict[str, RegressionBias]
    staleness_days: int
    teacher: TeacherLineage | None = None  # None: not known to the caller (no freshness check)


# --------------------------------------------------------------------------- pieces


def _ids(table: pa.Table, column: str, what: str) -> pa.Array:
    if column not in table.column_names:
        raise DataError(f"{what} lack the example id column '{column}'")
    return table.column(column).combine_chunks()


def _match(label_ids: pa.Array, example_ids: pa.Array) -> tuple[pa.Array | None, Coverage]:
    """For each example, the row of its (first) label (None: row for row), and the coverage
    counts.

    Labels are written in the examples' row order, so the usual day matches row for row:
    that case is one comparison, where the general join builds three hash tables over the
    ids (about 3 GB at 10M rows, docs/performance.md "Memory")."""
    n_valid = len(label_ids) - label_ids.null_count
    if label_ids.null_count == 0 and len(label_ids) == len(example_ids) and label_ids.equals(example_ids):
        return None, Coverage(n_examples=len(example_ids), n_label_rows=len(label_ids), missing=0,
                             duplicate_ids=duplicate_ids(label_ids)[0], null_ids=0, extra=0)
    idx = pc.index_in(example_ids, options=pc.SetLookupOptions(label_ids, skip_nulls=True))
    in_day = pc.is_in(label_ids, options=pc.SetLookupOptions(example_ids, skip_nulls=True))
    extra = n_valid - int(pc.sum(pc.fill_null(in_day, False)).as_py() or 0)
    return idx, Coverage(n_examples=len(example_ids), n_label_rows=len(label_ids), missing=idx.null_count,
                         duplicate_ids=duplicate_ids(label_ids.drop_null())[0], null_ids=label_ids.null_count,
                         extra=extra)


def _valid_range(task: Task) -> tuple[float | None, float | None]:
    return (0.0, 1.0) if task.kind == "binary" else (task.min, task.max)


def _validity(labels: pa.Table, task: Task) -> tuple[TaskValidity, np.ndarray | None]:
    """The validity counts, and the column as float64 (None when it cannot be used)."""
    lo, hi = _valid_range(task)
    n = labels.num_rows
    base = dict(task=task.name, kind=task.kind, column=task.name, valid_min=lo, valid_max=hi, n_rows=n)
    if task.name not in labels.column_names:
        return TaskValidity(**base, dtype=None, dtype_ok=False, n_null=0, n_nonfinite=0,
                            n_out_of_range=0, n_invalid=n), None
    col = labels.column(task.name)
    if not pa.types.is_floating(col.type):
        return TaskValidity(**base, dtype=str(col.type), dtype_ok=False, n_null=col.null_count,
                            n_nonfinite=0, n_out_of_range=0, n_invalid=n), None
    v = as_float64(col)
    finite = np.isfinite(v)
    n_null = col.null_count
    n_nonfinite = int(np.count_nonzero(~finite)) - n_null
    with np.errstate(invalid="ignore"):
        out = np.zeros(n, dtype=bool)
        if lo is not None:
            out |= v < lo
        if hi is not None:
            out |= v > hi
    n_out = int(np.count_nonzero(out & finite))
    return TaskValidity(**base, dtype=str(col.type), dtype_ok=True, n_null=n_null,
                        n_nonfinite=n_nonfinite, n_out_of_range=n_out,
                        n_invalid=n_null + n_nonfinite + n_out), v


def decile_calibration(pred: np.ndarray, label: np.ndarray) -> list[DecileCalibration]:
    """Sort by prediction (stable, so ties are deterministic) and cut into ten groups of
    near-equal size; per group the mean prediction, the label rate and the count."""
    n = pred.size
    if n == 0:
        return []
    order = np.argsort(pred, kind="stable")
    group = np.empty(n, dtype=np.uint8)  # 1 byte a row: a 10M-row day's gate holds less
    chunk = 1 << 20
    for a in range(0, n, chunk):
        group[order[a:a + chunk]] = (np.arange(a, min(a + chunk, n)) * N_DECILES) // n
    del order
    counts = np.bincount(group, minlength=N_DECILES)
    # Summed in row order, one decile at a time (cumsum adds left to right, as bincount does).
    sum_pred, sum_label = np.zeros(N_DECILES), np.zeros(N_DECILES)
    for d in range(N_DECILES):
        rows = group == d
        if counts[d]:
            sum_pred[d] = np.cumsum(pred[rows], dtype=np.float64)[-1]
            sum_label[d] = np.cumsum(label[rows], dtype=np.float64)[-1]
    return [DecileCalibration(decile=d, mean_pred=float(sum_pred[d] / counts[d]),
                              label_rate=float(sum_label[d] / counts[d]), count=int(counts[d]))
            for d in range(N_DECILES) if counts[d]]


def _paired(pred_all: np.ndarray, idx: pa.Array | None, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Teacher prediction and hard label per example of D (first label row per id; ``idx``
    None: labels and examples match row for row), keeping examples where both are finite."""
    if idx is None:
        pred = pred_all
    else:
        matched = ~np.asarray(idx.is_null().to_numpy(zero_copy_only=False))
        rows = pc.fill_null(idx, 0).to_numpy(zero_copy_only=False)
        pred = np.where(matched, pred_all[rows] if pred_all.size else np.nan, np.nan)
    keep = np.isfinite(pred) & np.isfinite(label)
    return pred[keep], label[keep]


def _mean(a: np.ndarray) -> float | None:
    return float(a.mean()) if a.size else None


# --------------------------------------------------------------------------- entry point


def check_labels(labels: pa.Table, examples: pa.Table, spec: DatasetSpec, staleness_days: int,
                 teacher: TeacherLineage | None = None) -> LabelChecks:
    """Measure the teacher labels for day D against D's examples. Raises DataError only when
    an id column or a hard-label column of the examples is absent (nothing can be checked);
    every problem in the teacher labels themselves is reported as counts instead.
    ``teacher`` (the labelling teacher's lineage) is recorded for the freshness check."""
    if staleness_days < 0:
        raise ValueError(f"staleness_days must be >= 0, got {staleness_days}")
    label_ids = _ids(labels, spec.example_id, "teacher labels")
    example_ids = _ids(examples, spec.example_id, "examples")
    idx, coverage = _match(label_ids, example_ids)

    validity: dict[str, TaskValidity] = {}
    calibration: dict[str, Calibration] = {}
    bias: dict[str, RegressionBias] = {}
    for task in spec.tasks:
        validity[task.name], pred_all = _validity(labels, task)
        if pred_all is None:
            continue
        if task.label_column not in examples.column_names:
            raise DataError(f"examples lack the hard-label column '{task.label_column}' of task '{task.name}'")
        pred, label = _paired(pred_all, idx, as_float64(examples.column(task.label_column)))
        mean_pred, mean_label = _mean(pred), _mean(label)
        if task.kind == "binary":
            cal = mean_pred / mean_label if mean_pred is not None and mean_label else None
            calibration[task.name] = Calibration(task=task.name, mean_pred=mean_pred, label_rate=mean_label,
                                                 calibration=cal, count=pred.size,
                                                 deciles=decile_calibration(pred, label))
        else:
            b = mean_pred - mean_label if mean_pred is not None and mean_label is not None else None
            bias[task.name] = RegressionBias(task=task.name, mean_pred=mean_pred, mean_label=mean_label,
                                             bias=b, count=pred.size)
    return LabelChecks(coverage=coverage, validity=validity, calibration=calibration, bias=bias,
                       staleness_days=staleness_days, teacher=teacher)

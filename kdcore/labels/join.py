"""Join teacher labels to a student's examples by example id (vectorized, no row loops).

A missing or duplicate id is an error by default: a student silently distilling from
the wrong rows is the failure this module exists to prevent."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdcore.data.spec import DatasetSpec
from kdcore.errors import DataError
from kdcore.labels.encoding import decode_labels
from kdcore.storage import partition as part


@dataclass
class JoinedLabels:
    soft: dict[str, np.ndarray]  # by task, aligned with the examples (NaN where missing)
    present: np.ndarray  # bool mask of examples that have a teacher label
    metadata: dict

    @property
    def missing(self) -> int:
        return int((~self.present).sum())


def read_labels(uri: str, spec: DatasetSpec) -> tuple[pa.Table, dict]:
    """The committed labels with every task as float32 task values (decoded from the
    encoding their manifest declares), and the manifest metadata."""
    manifest = part.read_manifest(uri)
    table = part.read_table(uri, columns=[spec.example_id, *[t.name for t in spec.tasks]], manifest=manifest)
    return decode_labels(table, manifest.metadata, spec), dict(manifest.metadata)


def join_labels(example_ids: pa.Array, labels: pa.Table, spec: DatasetSpec, source: str,
                on_missing: Literal["error", "hard_labels_only"] = "error", metadata: dict | None = None) -> JoinedLabels:
    lab_ids = labels.column(spec.example_id).combine_chunks()
    dupes = len(lab_ids) - pc.count_distinct(lab_ids).as_py()
    if dupes:
        raise DataError(f"{source}: {dupes} duplicate example ids in teacher labels")
    if not lab_ids.type.equals(example_ids.type):
        raise DataError(f"{source}: label id type {lab_ids.type} differs from examples' {example_ids.type}")
    idx = pc.index_in(example_ids, value_set=lab_ids)
    present = np.asarray(idx.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    n_missing = int((~present).sum())
    if n_missing and on_missing == "error":
        raise DataError(f"{source}: {n_missing} of {len(example_ids)} examples have no teacher label "
                        f"(policies.missing_labels is 'error')")
    take = pc.fill_null(idx, 0).to_numpy(zero_copy_only=False)
    soft = {}
    for t in spec.tasks:
        col = labels.column(t.name).to_numpy(zero_copy_only=False).astype(np.float32)
        vals = col[take] if len(col) else np.full(len(take), np.nan, np.float32)
        vals[~present] = np.nan
        soft[t.name] = vals
    return JoinedLabels(soft=soft, present=present, metadata=dict(metadata or {}))


def load_joined(uri: str, example_ids: pa.Array, spec: DatasetSpec, day: dt.date,
                on_missing: Literal["error", "hard_labels_only"] = "error") -> JoinedLabels:
    table, meta = read_labels(uri, spec)
    return join_labels(example_ids, table, spec, uri, on_missing, meta)


def load_aligned(uri: str, examples_uri: str, spec: DatasetSpec, examples_manifest: part.Manifest | None = None,
                 batch_rows: int = 65_536) -> JoinedLabels:
    """Teacher labels of a day that is streamed (too large to hold), in the examples' row
    order, without a whole-day id column or hash join in memory.

    Labels are written in the row order of the examples they score, so the two id columns
    are read batch by batch in lockstep and must agree row for row; only the soft labels
    (a few floats per row) are kept. Labels in another order, or with rows missing or
    extra, are a DataError naming both partitions (the id join of :func:`load_joined`,
    and its ``missing_labels`` policy, apply to days held whole)."""
    manifest = part.read_manifest(uri)
    names = [t.name for t in spec.tasks]
    labels = part.iter_batches(uri, columns=[spec.example_id, *names], batch_size=batch_rows, manifest=manifest)
    ids = part.iter_batches(examples_uri, columns=[spec.example_id], batch_size=batch_rows,
                            manifest=examples_manifest)
    pending: list[pa.RecordBatch] = []
    have = row = 0
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def fail(why: str) -> DataError:
        return DataError(f"{uri}: teacher labels do not follow the rows of {examples_uri} ({why}); a day larger "
                         f"than the student's shuffle_window_rows is streamed and needs labels in example order: "
                         f"re-materialize the labels for this day")

    for batch in ids:
        want = batch.column(0)
        while have < len(want):
            nxt = next(labels, None)
            if nxt is None:
                raise fail(f"labels end after {row + have} rows, the examples have more")
            pending.append(nxt)
            have += nxt.num_rows
        got = pa.Table.from_batches(pending).combine_chunks()
        head, rest = got.slice(0, len(want)), got.slice(len(want))
        lab_ids = head.column(spec.example_id).chunk(0) if len(want) else want
        if not lab_ids.type.equals(want.type):
            raise fail(f"label id type {lab_ids.type}, examples' {want.type}")
        equal = pc.equal(lab_ids, want).to_numpy(zero_copy_only=False)
        if not equal.all():
            raise fail(f"first differing id at row {row + int(np.argmin(equal))}")
        for n in names:
            out[n].append(head.column(n).to_numpy().astype(np.float32))
        pending, have = rest.to_batches(), rest.num_rows
        row += len(want)
    extra = have + sum(b.num_rows for b in labels)
    if extra:
        raise fail(f"{extra} label rows beyond the examples' {row}")
    soft = {n: (np.concatenate(v) if v else np.zeros(0, np.float32)) for n, v in out.items()}
    return JoinedLabels(soft=soft, present=np.ones(row, dtype=bool), metadata=dict(manifest.metadata))

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

"""A day (or a window of days) of examples, ready for a model: read once from storage,
encoded per model config (teacher and students may hash into different bucket counts)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from kdcore.data import examples
from kdcore.data.spec import DatasetSpec
from kdcore.models.features import Features, FeatureSet, encode_features, encode_labels


@dataclass
class DayData:
    spec: DatasetSpec
    table: pa.Table
    days: list[dt.date]
    _features: dict[tuple[int, FeatureSet], Features] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.table.num_rows

    def features(self, hash_buckets: int, columns: FeatureSet | None = None) -> Features:
        """Encoded once per (buckets, columns): the teacher and students of one day share it."""
        columns = columns or FeatureSet.of(self.spec)
        key = (hash_buckets, columns)
        if key not in self._features:
            self._features[key] = encode_features(self.table, self.spec, hash_buckets, columns)
        return self._features[key]

    @property
    def hard(self) -> dict[str, np.ndarray]:
        return encode_labels(self.table, self.spec)

    @property
    def groups(self) -> np.ndarray:
        return self.table.column(self.spec.group).to_numpy(zero_copy_only=False)

    @property
    def example_ids(self) -> pa.Array:
        return self.table.column(self.spec.example_id).combine_chunks()


def load_days(root: str, spec: DatasetSpec, days: list[dt.date]) -> DayData:
    """Rows of the given days in date order (each day in its published order)."""
    tables = [examples.read_day(root, spec, d, columns=spec.required_columns) for d in days]
    return DayData(spec=spec, table=pa.concat_tables(tables).combine_chunks(), days=list(days))

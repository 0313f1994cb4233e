"""A day (or a window of days) of examples, ready for a model: read once from storage,
encoded per model config (teacher and students may hash into different bucket counts).

A day larger than a model's ``shuffle_window_rows`` is not read whole: :class:`DayStream`
keeps only what is a few numbers per row (hard labels, groups) in memory and reads the
features window by window, so training memory stays flat in the day's size (~350 B/row
held whole: 917 MB at 1M rows, 1,977 MB at 4M)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from kdcore.data import examples
from kdcore.data.spec import DatasetSpec
from kdcore.models.features import Features, FeatureSet, encode_features, encode_labels
from kdcore.storage import partition as part
from kdcore.storage.manifest import Manifest


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


@dataclass
class DayStream:
    """One published day read window by window (in published order) instead of whole.

    ``hard`` and ``groups`` (a few numbers per row) are held for the whole day: losses,
    metrics and adapters need them and they are small. Features are read and encoded one
    window of ``window_rows`` rows at a time, from the manifest pinned when the stream was
    opened, so every pass (evaluation, each epoch) reads the same rows in the same order.
    ``windows_read`` counts the windows handed out (tests check the day was not read whole).
    """

    spec: DatasetSpec
    uri: str
    manifest: Manifest
    day: dt.date
    window_rows: int
    hard: dict[str, np.ndarray]
    groups: np.ndarray
    windows_read: int = 0

    @property
    def days(self) -> list[dt.date]:
        return [self.day]

    def __len__(self) -> int:
        return int(self.manifest.rows or 0)

    def windows(self, columns: FeatureSet) -> Iterator[tuple[int, pa.Table]]:
        """(first row, table) of consecutive windows of exactly ``window_rows`` rows (the
        last may be shorter) holding ``columns`` only: window k is rows [k*W, (k+1)*W)
        whatever the file and batch boundaries, so a window's seed names the same rows."""
        pending: list[pa.RecordBatch] = []
        have = offset = 0
        for batch in part.iter_batches(self.uri, columns=columns.names or [self.spec.example_id],
                                       batch_size=min(self.window_rows, 65_536), manifest=self.manifest):
            while batch.num_rows:
                take = min(batch.num_rows, self.window_rows - have)
                pending.append(batch.slice(0, take))
                batch = batch.slice(take)
                have += take
                if have == self.window_rows:
                    self.windows_read += 1
                    yield offset, pa.Table.from_batches(pending)
                    offset, pending, have = offset + have, [], 0
        if have:
            self.windows_read += 1
            yield offset, pa.Table.from_batches(pending)

    def feature_windows(self, hash_buckets: int, columns: FeatureSet) -> Iterator[tuple[int, Features]]:
        """(first row, encoded features) per window; nothing is cached (that is the point)."""
        for offset, table in self.windows(columns):
            yield offset, encode_features(table, self.spec, hash_buckets, columns)


def load_days(root: str, spec: DatasetSpec, days: list[dt.date]) -> DayData:
    """Rows of the given days in date order (each day in its published order)."""
    tables = [examples.read_day(root, spec, d, columns=spec.required_columns) for d in days]
    return DayData(spec=spec, table=pa.concat_tables(tables).combine_chunks(), days=list(days))


def open_day(root: str, spec: DatasetSpec, day: dt.date, window_rows: int) -> DayData | DayStream:
    """The day whole (exactly :func:`load_days`) when it has at most ``window_rows`` rows,
    else a :class:`DayStream` that reads only its labels and groups now."""
    uri = examples.examples_uri(root, spec.name, day)
    manifest = part.read_manifest(uri)
    if (manifest.rows or 0) <= window_rows:
        return load_days(root, spec, [day])
    small = part.read_table(uri, columns=[spec.group, *[t.label_column for t in spec.tasks]], manifest=manifest)
    return DayStream(spec=spec, uri=uri, manifest=manifest, day=day, window_rows=window_rows,
                     hard=encode_labels(small, spec), groups=small.column(spec.group).to_numpy(zero_copy_only=False))

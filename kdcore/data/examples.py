"""Daily example partitions: ``<root>/examples/<dataset>/date=YYYY-MM-DD/``.

Every writer of examples goes through ``publish_day`` so the dataset contract (columns,
types, unique example ids) is checked before anything becomes visible."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdcore.data.spec import DatasetSpec
from kdcore.errors import DataError
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part


def parse_date(value: str | dt.date) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise DataError(f"invalid date '{value}': expected YYYY-MM-DD") from None


def examples_root(root: str, dataset: str) -> str:
    return sfs.join(sfs.normalize(root), "examples", dataset)


def examples_uri(root: str, dataset: str, day: str | dt.date) -> str:
    return sfs.join(examples_root(root, dataset), f"date={parse_date(day).isoformat()}")


def list_days(root: str, dataset: str) -> list[dt.date]:
    return [dt.date.fromisoformat(d) for d in part.list_partitions(examples_root(root, dataset))]


def check_schema(schema: pa.Schema, spec: DatasetSpec, source: str) -> None:
    """Raise DataError naming the column when ``schema`` breaks the contract."""
    names = set(schema.names)
    for col in spec.required_columns:
        if col not in names:
            raise DataError(f"{source}: missing column '{col}' required by dataset spec '{spec.name}'")
    for col in [*spec.numeric, *[t.label_column for t in spec.tasks]]:
        typ = schema.field(col).type
        if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
            raise DataError(f"{source}: column '{col}' must be numeric, found {typ}")
    typ = schema.field(spec.timestamp).type
    if not pa.types.is_timestamp(typ):
        raise DataError(f"{source}: column '{spec.timestamp}' must be a timestamp, found {typ}")
    typ = schema.field(spec.example_id).type
    if not (pa.types.is_integer(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(f"{source}: column '{spec.example_id}' must be an integer or string id, found {typ}")


_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def check_timestamps(batch: pa.RecordBatch | pa.Table, spec: DatasetSpec, day: dt.date, source: str) -> None:
    """Every timestamp of a day's partition falls on that UTC day. A row filed under the
    wrong date is trained and evaluated as the wrong day's traffic (progressive validation
    would then see the future), so it is refused, naming the row and the date it is on.
    A spec that declares its own partition ``date`` column (a local calendar day, a
    processing date) has said the partition date is not the timestamp's: nothing to check."""
    if spec.date is not None:
        return
    col = batch.column(spec.timestamp)
    per_s = _PER_SECOND[col.type.unit]
    start = (day - dt.date(1970, 1, 1)).days * 86_400 * per_s
    values = np.asarray(pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False))
    valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    bad = valid & ((values < start) | (values >= start + 86_400 * per_s))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        on = dt.datetime.fromtimestamp(values[i] / per_s, dt.UTC)
        raise DataError(f"{source}: column '{spec.timestamp}' has {int(bad.sum())} timestamp(s) outside "
                        f"{day} (UTC), e.g. {on:%Y-%m-%d %H:%M:%S} UTC at {spec.example_id}="
                        f"{batch.column(spec.example_id)[i].as_py()!r}; a day's partition holds that day's "
                        f"rows only (publish each row under the UTC date of its timestamp, or declare the "
                        f"spec's `date` column)")


def _check_ids(ids: pa.Array, spec: DatasetSpec, source: str) -> None:
    if ids.null_count:
        raise DataError(f"{source}: column '{spec.example_id}' has {ids.null_count} null ids")
    dupes, example = duplicate_ids(ids)
    if dupes:
        raise DataError(f"{source}: column '{spec.example_id}' has {dupes} duplicate ids (e.g. {example!r})")


def duplicate_ids(ids: pa.Array) -> tuple[int, object]:
    """(number of rows whose id repeats an earlier one, one such id) of a null-free array.

    Integer ids are sorted as numpy (8 bytes a row twice over); arrow's hash-based
    ``count_distinct`` peaked at 1.7 GB on a 10M-row day, more than all else a task holds
    (docs/performance.md, "Memory"). Other types keep the hash count."""
    if pa.types.is_integer(ids.type):
        s = np.sort(ids.to_numpy())
        repeat = s[1:] == s[:-1]
        n = int(repeat.sum())
        return n, (s[1:][repeat][0].item() if n else None)
    n = len(ids) - pc.count_distinct(ids).as_py()
    if not n:
        return 0, None
    counts = pc.value_counts(ids)
    return n, counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0].as_py()


def publish_day(root: str, spec: DatasetSpec, day: str | dt.date,
                batches: Iterable[pa.RecordBatch | pa.Table],
                metadata: Mapping[str, Any] | None = None,
                max_rows_per_file: int = 1_000_000) -> part.Manifest:
    """Validate and publish one day's examples atomically (all or nothing).

    Example ids are checked for uniqueness across the whole day before the manifest is
    written; only the id column is kept in memory for that."""
    day = parse_date(day)
    uri = examples_uri(root, spec.name, day)
    ids: list[pa.Array] = []
    writer: part.PartitionWriter | None = None
    try:
        for batch in batches:
            if writer is None:
                check_schema(batch.schema, spec, uri)
                writer = part.PartitionWriter(uri, batch.schema, {
                    "dataset": spec.name, "date": day.isoformat(), **dict(metadata or {})},
                    max_rows_per_file=max_rows_per_file)
            check_timestamps(batch, spec, day, uri)
            id_col = batch.column(spec.example_id)
            ids.extend(id_col.chunks if isinstance(id_col, pa.ChunkedArray) else [id_col])
            writer.write(batch)
        if writer is None:
            raise DataError(f"{uri}: no rows to publish")
        all_ids = pa.concat_arrays(ids) if ids else pa.array([])
        _check_ids(all_ids, spec, uri)
        manifest = writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return manifest


def read_day(root: str, spec: DatasetSpec, day: str | dt.date,
             columns: list[str] | None = None) -> pa.Table:
    return part.read_table(examples_uri(root, spec.name, day), columns=columns)


def iter_day(root: str, spec: DatasetSpec, day: str | dt.date, columns: list[str] | None = None,
             batch_size: int = 262_144) -> Iterator[pa.RecordBatch]:
    return part.iter_batches(examples_uri(root, spec.name, day), columns=columns, batch_size=batch_size)


def split_by_date(table: pa.Table, timestamp: str) -> dict[dt.date, pa.Table]:
    """Partition a table by the UTC date of ``timestamp`` (rows keep their order)."""
    days = pc.cast(pc.cast(table.column(timestamp), pa.timestamp("s", tz="UTC")), pa.date32())
    days_np = days.to_numpy(zero_copy_only=False).astype("datetime64[D]")
    out: dict[dt.date, pa.Table] = {}
    uniq, inverse = np.unique(days_np, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    for i, d in enumerate(uniq):
        out[d.astype(dt.date)] = table.take(pa.array(order[bounds[i]:bounds[i + 1]]))
    return out

"""Bring any CSV or Parquet source in as daily example partitions, through a dataset spec.

The source is one file or a folder of files (searched recursively; names starting with
``.`` or ``_`` are skipped), on local disk or at ``gs://bucket/prefix``. It is read in
passes that keep memory bounded by a record batch (plus the example ids of one day),
whatever the order of the rows:

1. every file's schema is checked against the spec (required columns, types) before a
   single row is read;
2. rows are streamed batch by batch (pyarrow dataset), their time columns converted
   (integer epochs and ISO-8601 text become ``timestamp[unit, UTC]``), each row given its
   partition date (the UTC date of the timestamp, or the spec's ``date`` column) and
   spooled to local Arrow files, one per day; rows outside ``--from/--to`` are dropped;
3. every day's example ids are checked, and only then is each day published through
   ``examples.publish_day`` (contract check + atomic publish).

So every read, parse and contract error is raised before the first partition is written,
and names the file and the column. Only the columns the spec names are published, in spec
order. Files are read in path order and rows keep their order, so the same input always
publishes the same bytes: a re-run is a no-op, and re-ingesting a day replaces it."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from kdcore.data import examples
from kdcore.data.spec import DatasetSpec
from kdcore.errors import DataError
from kdcore.storage import fs as sfs

FORMATS: dict[str, tuple[str, ...]] = {"csv": (".csv",), "parquet": (".parquet", ".parq", ".pq")}
TICKS_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
EPOCH = dt.date(1970, 1, 1)
# Partition names are YYYY-MM-DD: a date outside years 1..9999 means a wrong unit.
MIN_DAY, MAX_DAY = (dt.date(1, 1, 1) - EPOCH).days, (dt.date(9999, 12, 31) - EPOCH).days
# A time of day followed by a zone offset: such text is parsed as an instant, the rest as UTC.
_ISO_OFFSET = r"[T ]\d{2}(:?\d{2}(:?\d{2}([.,]\d+)?)?)?\s*(Z|z|[+-]\d{2}(:?\d{2})?)$"
_ISO_TYPE = pa.timestamp("ns", tz="UTC")


@dataclass(frozen=True)
class Source:
    """The files of a source, in the order they are read."""

    uri: str
    fs: pafs.FileSystem
    files: list[str]  # filesystem paths, sorted
    format: str

    def display(self, path: str) -> str:
        return f"gs://{path}" if self.uri.startswith("gs://") else path


def _format_of(path: str) -> str | None:
    low = path.lower()
    for fmt, exts in FORMATS.items():
        if low.endswith(exts):
            return fmt
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def find_source(source: str, fmt: str | None = None) -> Source:
    """Resolve ``source`` (file or folder, local or gs://) to the files to read."""
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{source}: unsupported format '{fmt}' (use csv or parquet)")
    uri = sfs.normalize(source)
    fs, path = sfs.resolve(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{source}: source not found")
        if info.type == pafs.FileType.File:
            found = fmt or _format_of(path)
            if found is None:
                raise DataError(f"{source}: unsupported format (expected a .csv or .parquet file; "
                                f"pass --format csv|parquet for another extension)")
            return Source(uri, fs, [path], found)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise DataError(f"{source}: cannot access the source ({_one_line(e)})") from None
    base = path.rstrip("/") + "/"
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                   and not any(p.startswith((".", "_")) for p in i.path[len(base):].split("/")))
    if fmt is None:
        kinds = {k for k in map(_format_of, files) if k}
        if len(kinds) > 1:
            raise DataError(f"{source}: holds both csv and parquet files; pass --format to pick one")
        if not kinds:
            raise DataError(f"{source}: no .csv or .parquet files found (unsupported format?)")
        fmt = kinds.pop()
    files = [f for f in files if _format_of(f) == fmt]
    if not files:
        raise DataError(f"{source}: no {fmt} files found (extensions {', '.join(FORMATS[fmt])})")
    return Source(uri, fs, files, fmt)


# --- time columns ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Time:
    """How to read one time column: ``unit`` is s/ms/us/ns (integer epoch), ``iso`` (ISO-8601
    text or an Arrow timestamp) or ``date`` (an Arrow date or 'YYYY-MM-DD' text)."""

    column: str
    unit: str
    key: str  # the spec key that declares it, for messages

    @property
    def is_epoch(self) -> bool:
        return self.unit in TICKS_PER_SECOND


@dataclass(frozen=True)
class _At:
    file: str
    offset: int  # rows of the file before this batch

    def where(self, column: str) -> str:
        return f"{self.file}: column '{column}'"


def _is_text(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


def _time_type(typ: pa.DataType, t: _Time, file: str) -> pa.DataType:
    """The Arrow type the column becomes, or a DataError naming the file, column and key."""
    where = f"{file}: column '{t.column}'"
    if t.is_epoch:
        if pa.types.is_integer(typ) or _is_text(typ):
            return pa.timestamp(t.unit, tz="UTC")
        raise DataError(f"{where} must hold integer epoch {t.unit} ({t.key}: {t.unit}), found {typ}")
    if t.unit == "date":
        if pa.types.is_date(typ) or _is_text(typ):
            return pa.date32()
        raise DataError(f"{where} must hold dates (a date type or 'YYYY-MM-DD' text) as declared by "
                        f"{t.key}: date, found {typ}")
    if pa.types.is_timestamp(typ):
        return pa.timestamp(typ.unit, tz="UTC")
    if _is_text(typ):
        return _ISO_TYPE
    if pa.types.is_integer(typ):
        hint = "timestamp_unit" if t.key == "timestamp_unit" else "date.unit"
        raise DataError(f"{where} holds integers ({typ}): declare their epoch unit in the spec "
                        f"with `{hint}: s|ms|us|ns`")
    raise DataError(f"{where} must be a timestamp or ISO-8601 text, found {typ}")


def _first_failure(arr: pa.Array, fn: Callable[[pa.Array], Any]) -> int:
    """Index of the first value ``fn`` rejects (bisection: O(n) vectorised work)."""
    lo, hi = 0, len(arr)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            fn(arr.slice(lo, mid - lo))
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            hi = mid
    return lo


def _parse(arr: pa.Array, fn: Callable[[pa.Array], pa.Array], at: _At, column: str, expected: str) -> pa.Array:
    try:
        return fn(arr)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        i = _first_failure(arr, fn)
        raise DataError(f"{at.where(column)} has an unparsable value {arr[i].as_py()!r} at row "
                        f"{at.offset + i + 1} (expected {expected})") from None


def _iso_to_timestamp(arr: pa.Array) -> pa.Array:
    """ISO-8601 text to timestamp[ns, UTC]: an offset (Z, +02:00) is honoured, none means UTC."""
    aware = pc.fill_null(pc.match_substring_regex(arr, _ISO_OFFSET), False)
    n_aware = pc.sum(aware).as_py() or 0
    if n_aware == len(arr):
        return pc.cast(arr, _ISO_TYPE)
    naive = pc.cast(pc.cast(arr if n_aware == 0 else pc.if_else(aware, pa.scalar(None, arr.type), arr),
                            pa.timestamp("ns")), _ISO_TYPE)
    if n_aware == 0:
        return naive
    return pc.if_else(aware, pc.cast(pc.if_else(aware, arr, pa.scalar(None, arr.type)), _ISO_TYPE), naive)


def _to_timestamp(arr: pa.Array, t: _Time, at: _At) -> pa.Array:
    """A time column as timestamp[unit, UTC] (epoch and ISO text converted; see _time_type)."""
    typ = _time_type(arr.type, t, at.file)
    if t.is_epoch:
        if _is_text(arr.type):
            arr = _parse(arr, lambda a: pc.cast(a, pa.int64()), at, t.column, f"an integer epoch in {t.unit}")
        return pc.cast(pc.cast(arr, pa.int64()), typ)
    if pa.types.is_timestamp(arr.type):
        return pc.cast(arr, typ)  # only the zone changes (a naive timestamp is taken as UTC)
    return _parse(arr, _iso_to_timestamp, at, t.column, "ISO-8601 text such as '2024-05-01T12:30:00Z'")


def _show(arr: pa.Array, i: int) -> str:
    try:
        return repr(arr[i].as_py())
    except (OverflowError, ValueError, pa.ArrowException):  # a timestamp beyond Python's datetime
        return repr(pc.cast(arr.slice(i, 1), pa.int64())[0].as_py())


def _day_numbers(arr: pa.Array, t: _Time, at: _At, ts: pa.Array | None = None) -> np.ndarray:
    """Partition date of each row, as days since 1970-01-01 (``ts``: ``arr`` already
    converted by _to_timestamp)."""
    if arr.null_count:
        first = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{at.where(t.column)} has {arr.null_count} empty values (first at row "
                        f"{at.offset + first + 1}): every row needs a date")
    if t.unit == "date":
        _time_type(arr.type, t, at.file)
        if _is_text(arr.type):
            arr = _parse(arr, lambda a: pc.cast(a, pa.date32()), at, t.column, "a date 'YYYY-MM-DD'")
        days = pc.cast(pc.cast(arr, pa.date32()), pa.int32()).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        ts = _to_timestamp(arr, t, at) if ts is None else ts
        ticks = pc.cast(ts, pa.int64()).to_numpy(zero_copy_only=False)
        days = np.floor_divide(ticks, TICKS_PER_SECOND[ts.type.unit] * 86_400)
    bad = np.flatnonzero((days < MIN_DAY) | (days > MAX_DAY))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{at.where(t.column)} value {_show(arr, i)} at row {at.offset + i + 1} is not a "
                        f"date in years 1..9999 (check `{t.key}` in the spec)")
    return days


# --- plan: what each file must hold, what the partitions hold -----------------------------

@dataclass(frozen=True)
class _Plan:
    spec: DatasetSpec
    source: Source
    timestamp: _Time
    date: _Time  # where the partition date comes from (may be the timestamp column)
    read_columns: list[str]
    schema: pa.Schema  # of the published partitions (spec.required_columns, in order)

    def file_format(self) -> ds.FileFormat:
        if self.source.format == "csv":
            # CSV has no types: time columns stay text and are parsed here, the same way in
            # every file (inference could read one file's dates as text, another's as dates).
            text = {c: pa.string() for c in {self.timestamp.column, self.date.column}}
            return ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types=text))
        return ds.ParquetFileFormat()


def _open(src: Source, path: str, fmt: ds.FileFormat) -> ds.Dataset:
    try:
        return ds.dataset(path, format=fmt, filesystem=src.fs)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{src.display(path)}: unreadable {src.format} file ({_one_line(e)})") from None


def plan(spec: DatasetSpec, src: Source) -> _Plan:
    """Check every file's columns and types against the spec (no rows read) and unify
    their types into the partition schema."""
    default_unit = spec.timestamp_unit or "iso"
    ts = _Time(spec.timestamp, default_unit, "timestamp_unit")
    date = _Time(spec.date.column, spec.date.unit, "date.unit") if spec.date else ts
    read = list(spec.required_columns)
    if date.column not in read:
        read.append(date.column)
    draft = _Plan(spec, src, ts, date, read, pa.schema([]))
    fmt = draft.file_format()
    per_file: list[tuple[str, pa.Schema]] = []
    for path in src.files:
        name = src.display(path)
        schema = _open(src, path, fmt).schema
        for col in read:
            if col not in schema.names:
                role = (f"declared as the date column (date.column) of dataset spec '{spec.name}'"
                        if col == date.column and date is not ts else f"required by dataset spec '{spec.name}'")
                raise DataError(f"{name}: missing column '{col}' {role}")
        if date is not ts:
            _time_type(schema.field(date.column).type, date, name)
        fields = []
        for col in spec.required_columns:
            typ = schema.field(col).type
            if col == ts.column:
                typ = _time_type(typ, ts, name)
            fields.append(pa.field(col, typ))
        out = pa.schema(fields)
        # An all-empty CSV column has type null; it takes its type from the other files.
        examples.check_schema(pa.schema([pa.field(f.name, pa.int64()) if pa.types.is_null(f.type) else f
                                         for f in out]), spec, name)
        per_file.append((name, out))
    fields = [pa.field(col, _unify(col, [(n, s.field(col).type) for n, s in per_file], src.uri))
              for col in spec.required_columns]
    schema = pa.schema(fields)
    examples.check_schema(schema, spec, src.uri)
    return _Plan(spec, src, ts, date, read, schema)


def _unify(col: str, types: list[tuple[str, pa.DataType]], source: str) -> pa.DataType:
    distinct = list(dict.fromkeys(t for _, t in types))
    if len(distinct) == 1:
        return distinct[0]
    try:
        return pa.unify_schemas([pa.schema([(col, t)]) for t in distinct],
                                promote_options="permissive").field(col).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        (f1, t1), (f2, t2) = types[0], next((f, t) for f, t in types if t != types[0][1])
        raise DataError(f"{source}: column '{col}' is {t1} in {f1} but {t2} in {f2}") from None


def _convert(batch: pa.RecordBatch, p: _Plan, at: _At) -> tuple[pa.RecordBatch, np.ndarray]:
    """A source batch as a partition batch (spec columns, partition types) and its days."""
    arrays = []
    for field in p.schema:
        arr = batch.column(field.name)
        if field.name == p.timestamp.column:
            arr = _to_timestamp(arr, p.timestamp, at)
        if arr.type != field.type:
            try:
                arr = pc.cast(arr, field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(f"{at.where(field.name)}: cannot convert {arr.type} to {field.type} "
                                f"({_one_line(e)})") from None
        arrays.append(arr)
    out = pa.RecordBatch.from_arrays(arrays, schema=p.schema)
    if p.date is p.timestamp:
        return out, _day_numbers(batch.column(p.date.column), p.date, at, out.column(p.date.column))
    return out, _day_numbers(batch.column(p.date.column), p.date, at)


def _read(p: _Plan, path: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    src = p.source
    dataset = _open(src, path, p.file_format())
    try:
        yield from dataset.to_batches(columns=p.read_columns, batch_size=batch_rows, use_threads=False)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{src.display(path)}: unreadable {src.format} file ({_one_line(e)})") from None


# --- spool: rows grouped by day on local disk ---------------------------------------------

class _Spool:
    """Arrow IPC files per day in a local temporary folder. At most ``max_open`` files are
    open at once: a day written again after its file was closed gets another segment."""

    def __init__(self, schema: pa.Schema, directory: str | None = None, max_open: int = 64):
        self.schema = schema
        self.dir = tempfile.mkdtemp(prefix="kd-ingest-", dir=directory)
        self.max_open = max_open
        self.segments: dict[int, list[str]] = {}
        self.rows: dict[int, int] = {}
        self._open: OrderedDict[int, pa.ipc.RecordBatchFileWriter] = OrderedDict()
        self._options = pa.ipc.IpcWriteOptions(compression="lz4" if pa.Codec.is_available("lz4") else None)

    def add(self, batch: pa.RecordBatch, days: np.ndarray) -> None:
        if len(days) == 0:
            return
        if (days == days[0]).all():  # the usual case: a batch of one day
            self._write(int(days[0]), batch)
            return
        uniq, inverse = np.unique(days, return_inverse=True)
        order = np.argsort(inverse, kind="stable")  # rows keep their order within a day
        bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
        for i, day in enumerate(uniq):
            self._write(int(day), batch.take(pa.array(order[bounds[i]:bounds[i + 1]])))

    def _write(self, day: int, batch: pa.RecordBatch) -> None:
        writer = self._open.pop(day, None)
        if writer is None:
            if len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
            segs = self.segments.setdefault(day, [])
            path = os.path.join(self.dir, f"{day}-{len(segs):05d}.arrow")
            segs.append(path)
            writer = pa.ipc.new_file(path, self.schema, options=self._options)
        self._open[day] = writer
        writer.write_batch(batch)
        self.rows[day] = self.rows.get(day, 0) + batch.num_rows

    def seal(self) -> None:
        while self._open:
            self._open.popitem(last=False)[1].close()

    def batches(self, day: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        for path in self.segments.get(day, []):
            with pa.OSFile(path) as f:
                reader = pa.ipc.open_file(f)
                for i in range(reader.num_record_batches):
                    b = reader.get_batch(i)
                    yield b.select(columns) if columns else b

    def cleanup(self) -> None:
        for w in self._open.values():
            try:
                w.close()
            except (OSError, pa.ArrowException):
                pass
        self._open.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def _rechunk(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Coalesce small spooled batches into pieces of at least ``rows`` rows (a row group
    per piece), so a day scattered over a source still gets a few large row groups."""
    buf: list[pa.RecordBatch] = []
    n = 0
    for b in batches:
        buf.append(b)
        n += b.num_rows
        if n >= rows:
            yield pa.Table.from_batches(buf).combine_chunks()
            buf, n = [], 0
    if buf:
        yield pa.Table.from_batches(buf).combine_chunks()


def _check_ids(spool: _Spool, day: int, spec: DatasetSpec, source: str) -> None:
    ids = pa.chunked_array([b.column(0) for b in spool.batches(day, [spec.example_id])],
                           type=spool.schema.field(spec.example_id).type)
    when = (EPOCH + dt.timedelta(days=day)).isoformat()
    if ids.null_count:
        raise DataError(f"{source}: column '{spec.example_id}' has {ids.null_count} empty ids on {when}")
    counts = pc.value_counts(ids)
    dupes = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dupes):
        extra = pc.sum(dupes.field("counts")).as_py() - len(dupes)
        raise DataError(f"{source}: column '{spec.example_id}' has {extra} duplicate ids on {when} "
                        f"(e.g. {dupes.field('values')[0].as_py()!r}); nothing was published")


# --- the command ----------------------------------------------------------------------------

def ingest(spec: DatasetSpec, source: str, root: str, fmt: str | None = None,
           start: str | dt.date | None = None, end: str | dt.date | None = None, *,
           batch_rows: int = 65_536, spool_dir: str | None = None) -> dict[str, Any]:
    """Publish the days of ``source`` in [start, end] (inclusive, both optional) under
    ``root``; returns a summary (dataset, days, rows, first, last, ...)."""
    lo = examples.parse_date(start) if start is not None else None
    hi = examples.parse_date(end) if end is not None else None
    if lo and hi and lo > hi:
        raise DataError(f"--from {lo} is after --to {hi}")
    src = find_source(source, fmt)
    p = plan(spec, src)
    lo_n = (lo - EPOCH).days if lo else MIN_DAY
    hi_n = (hi - EPOCH).days if hi else MAX_DAY
    spool = _Spool(p.schema, spool_dir)
    outside = 0
    try:
        for path in src.files:
            offset = 0
            for batch in _read(p, path, batch_rows):
                out, days = _convert(batch, p, _At(src.display(path), offset))
                offset += batch.num_rows
                keep = (days >= lo_n) & (days <= hi_n)
                if not keep.all():
                    outside += int((~keep).sum())
                    out, days = out.filter(pa.array(keep)), days[keep]
                spool.add(out, days)
        spool.seal()
        if not spool.rows:
            span = f" dated {lo or '...'} to {hi or '...'}" if lo or hi else ""
            raise DataError(f"{source}: no rows{span} to publish")
        days_sorted = sorted(spool.rows)
        for day in days_sorted:
            _check_ids(spool, day, spec, source)
        meta = {"source": src.uri, "format": src.format}
        for day in days_sorted:
            examples.publish_day(root, spec, EPOCH + dt.timedelta(days=day),
                                 _rechunk(spool.batches(day), batch_rows), meta)
    finally:
        spool.cleanup()
    first, last = (EPOCH + dt.timedelta(days=d) for d in (days_sorted[0], days_sorted[-1]))
    return {"dataset": spec.name, "source": src.uri, "format": src.format, "files": len(src.files),
            "days": len(days_sorted), "rows": sum(spool.rows.values()), "outside_range": outside,
            "first": first.isoformat(), "last": last.isoformat()}

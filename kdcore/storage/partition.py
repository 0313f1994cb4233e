"""Publish and read partitions atomically.

Writers stream record batches into Parquet files spooled on local disk (bounded by
``max_rows_per_file``), name each file by its checksum, upload it, and write the manifest
last. Readers stream batches from exactly the files the manifest lists (pyarrow
dataset), never from a directory listing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdcore.errors import ConflictError, KDError, StorageError, storage_error, transient_os_error
from kdcore.storage import fs as sfs
from kdcore.storage.manifest import MANIFEST_NAME, FileEntry, Manifest, encode_schema

PARQUET_OPTIONS: dict[str, Any] = dict(compression="zstd", compression_level=3,
                                       write_statistics=True, use_dictionary=True)


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_uri(uri: str) -> str:
    return sfs.join(uri, MANIFEST_NAME)


def read_manifest(uri: str) -> Manifest:
    try:
        data = sfs.read_bytes(manifest_uri(uri))
    except StorageError as e:
        if e.transient:  # the manifest may be there: storage did not answer
            raise
        raise StorageError(f"{uri}: partition is not published (no {MANIFEST_NAME})") from None
    try:
        return Manifest.from_bytes(data)
    except ValueError as e:
        raise StorageError(f"{manifest_uri(uri)}: corrupt manifest ({e})") from None


def is_published(uri: str) -> bool:
    return sfs.exists(manifest_uri(uri))


def manifest_digest(manifest: Manifest) -> str:
    """The content key of a partition: its manifest lists every file's checksum, so two
    partitions with the same digest hold the same bytes. Outputs record the digests of
    their inputs and are recomputed when one changes."""
    return hashlib.sha256(manifest.to_bytes()).hexdigest()


def manifest_generation(uri: str) -> str | None:
    """The version of the partition's manifest now (None: unpublished). A writer reads it
    before it starts and commits only if it is unchanged."""
    return sfs.generation(manifest_uri(uri))


def commit_manifest(uri: str, manifest: Manifest, expected: str | None | bool = True) -> bool:
    """Publish ``manifest``; True when the visible partition changed.

    An identical manifest already there is a no-op (a re-run, or a concurrent writer of
    the same content). Otherwise the manifest must still be at generation ``expected``,
    read when the writer started (``True``: read it now, for callers with nothing to
    protect): a writer of different content that committed in between wins, and this one
    gets a ConflictError instead of silently overwriting it."""
    data = manifest.to_bytes()
    muri = manifest_uri(uri)
    found = sfs.generation(muri)
    if expected is True:
        expected = found
    if found is not None and _same(muri, data):
        return False
    if found != expected:
        raise ConflictError(f"{uri}: another writer published different content while this one ran "
                            f"(manifest generation {expected} -> {found}); re-run to build on it")
    try:
        sfs.write_if_generation(muri, data, expected)
    except ConflictError:
        if _same(muri, data):  # a retried request whose first attempt had succeeded, or a twin writer
            return False
        raise
    return True


def _same(muri: str, data: bytes) -> bool:
    try:
        return sfs.read_bytes(muri) == data
    except StorageError:
        return False


SPOOL_PREFIX = "kd-publish-"


def _spool_dir() -> str:
    return tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-")


def sweep_spools() -> list[str]:
    """Remove local spool folders of writers that died (SIGKILL skips every cleanup);
    a folder's owner is the pid in its name."""
    removed = []
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        if not name.startswith(SPOOL_PREFIX):
            continue
        try:
            pid = int(name[len(SPOOL_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not _alive(pid):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed.append(os.path.join(base, name))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PartitionWriter:
    """Stream record batches into a partition; nothing is visible until ``close()``.

    Use as a context manager: leaving the block with an exception publishes nothing.
    ``parquet_options`` override PARQUET_OPTIONS (e.g. per-column ``column_encoding`` and
    ``use_dictionary``): they change only how the bytes are laid out, so checksums, the
    manifest and the atomic publish are the same whatever they are.
    """

    def __init__(self, uri: str, schema: pa.Schema, metadata: Mapping[str, Any] | None = None,
                 max_rows_per_file: int = 1_000_000, parquet_options: Mapping[str, Any] | None = None):
        self.uri = sfs.normalize(uri)
        self.schema = schema
        self.metadata = dict(metadata or {})
        self.parquet_options = {**PARQUET_OPTIONS, **(parquet_options or {})}
        self.max_rows_per_file = max_rows_per_file
        self._base = manifest_generation(self.uri)  # what this writer builds on
        try:
            self._tmp = _spool_dir()
        except OSError as e:
            raise storage_error(f"{self.uri}: cannot create a local spool folder in {tempfile.gettempdir()} "
                                f"({e}); set TMPDIR to a writable disk", transient_os_error(e)) from None
        self._entries: list[FileEntry] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self._local = ""
        self.changed: bool | None = None

    def _open(self) -> None:
        self._local = os.path.join(self._tmp, f"part-{len(self._entries):05d}.parquet")
        self._writer = pq.ParquetWriter(self._local, self.schema, **self.parquet_options)
        self._rows_in_file = 0

    def _finish_file(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        local = self._local
        sha = _sha256_file(local)
        name = f"part-{len(self._entries):05d}"
        stored = f"{name}-{sha[:16]}.parquet"
        size = os.path.getsize(local)
        sfs.store(sfs.join(self.uri, stored), local, sha)
        os.remove(local)
        self._entries.append(FileEntry(name=name, path=stored, bytes=size, sha256=sha,
                                       rows=self._rows_in_file))

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        try:
            self._write(batch)
        except OSError as e:  # the local spool: a full or unwritable temp disk
            self.abort()
            raise storage_error(f"{self.uri}: cannot spool the partition in {self._tmp} ({e}); "
                                f"nothing was published", transient_os_error(e)) from None

    def _write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if not batch.schema.equals(self.schema):
            try:
                batch = batch.select(self.schema.names).cast(self.schema)
            except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise StorageError(f"{self.uri}: batch does not match the partition schema ({e})") from None
        offset = 0
        while offset < batch.num_rows:
            if self._writer is None:
                self._open()
            take = min(batch.num_rows - offset, self.max_rows_per_file - self._rows_in_file)
            piece = batch.slice(offset, take)
            if isinstance(piece, pa.RecordBatch):
                self._writer.write_batch(piece)
            else:
                self._writer.write_table(piece)
            self._rows_in_file += take
            offset += take
            if self._rows_in_file >= self.max_rows_per_file:
                self._finish_file()

    def close(self) -> Manifest:
        try:
            if self._writer is not None or not self._entries:
                try:
                    if self._writer is None:
                        self._open()  # an empty partition still gets one (empty) file with the schema
                    self._finish_file()
                except OSError as e:
                    raise storage_error(f"{self.uri}: cannot spool the partition in {self._tmp} ({e}); "
                                        f"nothing was published", transient_os_error(e)) from None
            manifest = Manifest(
                kind="parquet", files=self._entries, rows=sum(e.rows or 0 for e in self._entries),
                bytes=sum(e.bytes for e in self._entries), schema_b64=encode_schema(self.schema),
                metadata=self.metadata)
            self.changed = commit_manifest(self.uri, manifest, self._base)
        finally:
            self.abort()  # the local spool goes even when an upload or the commit fails
        return manifest

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def publish_batches(uri: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch | pa.Table],
                    metadata: Mapping[str, Any] | None = None,
                    max_rows_per_file: int = 1_000_000,
                    parquet_options: Mapping[str, Any] | None = None) -> Manifest:
    with PartitionWriter(uri, schema, metadata, max_rows_per_file, parquet_options) as w:
        for b in batches:
            w.write(b)
    return read_manifest(uri)


def publish_table(uri: str, table: pa.Table, metadata: Mapping[str, Any] | None = None,
                  max_rows_per_file: int = 1_000_000) -> Manifest:
    return publish_batches(uri, table.schema, [table], metadata, max_rows_per_file)


def publish_blobs(uri: str, blobs: Mapping[str, bytes], metadata: Mapping[str, Any] | None = None,
                  keep_names: bool = False, expected: str | None | bool = True) -> Manifest:
    """Publish named byte objects (checkpoints, JSON, HTML) with the same guarantees.

    Each file is stored under a content-addressed name; with ``keep_names`` the names are
    kept and the whole set goes into a content-addressed folder instead, so relative links
    between the files (an HTML site) keep working.

    ``expected`` is the manifest generation the caller built on, read (with
    :func:`manifest_generation`) before it computed the blobs: a writer whose blobs
    depend on a long computation passes the generation read when it started, so a
    different commit made meanwhile is a ConflictError, not silently replaced. ``True``
    reads it here, for callers with nothing to protect."""
    uri = sfs.normalize(uri)
    base = manifest_generation(uri) if expected is True else expected
    entries = []
    digests = {name: hashlib.sha256(blobs[name]).hexdigest() for name in sorted(blobs)}
    folder = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
    for name, sha in digests.items():
        data = blobs[name]
        if keep_names:
            stored = f"{folder}/{name}"
        else:
            stem, dot, ext = name.rpartition(".")
            stored = f"{stem}-{sha[:16]}.{ext}" if dot else f"{name}-{sha[:16]}"
        sfs.store(sfs.join(uri, stored), data, sha)
        entries.append(FileEntry(name=name, path=stored, bytes=len(data), sha256=sha))
    manifest = Manifest(kind="blobs", files=entries, bytes=sum(e.bytes for e in entries),
                        metadata=dict(metadata or {}))
    commit_manifest(uri, manifest, base)
    return manifest


def read_blob(uri: str, name: str, manifest: Manifest | None = None) -> bytes:
    uri = sfs.normalize(uri)
    manifest = manifest or read_manifest(uri)
    try:
        entry = manifest.file(name)
    except KeyError:
        raise StorageError(f"{uri}: partition has no file '{name}'") from None
    return _verified(uri, entry).to_pybytes()


def _verified(uri: str, entry: FileEntry, verify: bool = True) -> pa.Buffer:
    """A stored file's bytes, checked against the manifest: a missing, truncated or
    bit-flipped file is an error naming it, never data handed to a reader. A mismatch is
    read once more first, since a download can be damaged in transit (GCS's own client
    reports that as DATA_LOSS) while the stored object is fine."""
    file_uri = sfs.join(uri, entry.path)
    fs, path = sfs.resolve(file_uri)
    detail = ""
    for _ in range(2):
        try:
            with fs.open_input_stream(path) as f:
                buf = pa.py_buffer(f.read())
        except (FileNotFoundError, OSError) as e:
            text = str(e).lower()
            if isinstance(e, FileNotFoundError) or "not found" in text or "no such file" in text:
                raise StorageError(f"{file_uri}: listed in {manifest_uri(uri)} but missing; "
                                   f"re-publish the partition (re-run its task with force)") from None
            if "mismatched hashes" not in text and "data_loss" not in text:
                raise storage_error(f"{file_uri}: cannot read ({e})", transient_os_error(e)) from None
            detail = "the download's checksum did not match what storage holds"
            continue
        if not verify or (buf.size == entry.bytes and hashlib.sha256(buf).hexdigest() == entry.sha256):
            return buf
        detail = f"{buf.size} bytes, checksum does not match {manifest_uri(uri)}"
    raise StorageError(f"{file_uri}: corrupt ({detail}); re-publish the partition "
                       f"(re-run its task with force) to repair it")


def _parquet(uri: str, manifest: Manifest, entry: FileEntry, verify: bool) -> pq.ParquetFile:
    file_uri = sfs.join(uri, entry.path)
    try:
        pf = pq.ParquetFile(pa.BufferReader(_verified(uri, entry, verify)))
    except (pa.ArrowInvalid, OSError) as e:
        raise StorageError(f"{file_uri}: not a readable Parquet file ({e})") from None
    if manifest.schema is not None and pf.schema_arrow.names != manifest.schema.names:
        raise StorageError(f"{file_uri}: columns {pf.schema_arrow.names} differ from {manifest_uri(uri)}")
    if entry.rows is not None and pf.metadata.num_rows != entry.rows:
        raise StorageError(f"{file_uri}: {pf.metadata.num_rows} rows, manifest says {entry.rows}")
    return pf


def iter_batches(uri: str, columns: list[str] | None = None, batch_size: int = 262_144,
                 manifest: Manifest | None = None, verify: bool = True) -> Iterator[pa.RecordBatch]:
    """Stream a published partition in manifest order (deterministic), one verified
    file in memory at a time.

    The manifest is read and the columns are checked when this is called (not at the first
    ``next()``): a missing partition or column fails at the call site, and the iterator is
    pinned to the version that was current then."""
    uri = sfs.normalize(uri)
    manifest = manifest or read_manifest(uri)
    _check_columns(uri, manifest, columns)

    target = _projected(manifest, columns)

    def gen() -> Iterator[pa.RecordBatch]:
        for entry in manifest.files:
            pf = _parquet(uri, manifest, entry, verify)
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns, use_threads=False):
                yield _conform(batch, target, uri, entry)

    return gen()


def iter_row_range(uri: str, start: int, stop: int, columns: list[str] | None = None,
                   batch_size: int = 262_144, manifest: Manifest | None = None,
                   verify: bool = True) -> Iterator[pa.RecordBatch]:
    """Rows ``[start, stop)`` of a published partition, in manifest order.

    A shard of a day needs only its own rows: files the manifest's per-file row counts
    place outside the range are never downloaded, and inside a file only the row groups
    overlapping the range are decoded. A file that is read is still verified whole
    against its checksum. Manifests without per-file row counts (older writers) fall back
    to reading every file and slicing."""
    uri = sfs.normalize(uri)
    manifest = manifest or read_manifest(uri)
    _check_columns(uri, manifest, columns)
    target = _projected(manifest, columns)
    if not 0 <= start <= stop:
        raise ValueError(f"row range [{start}, {stop}) is not a range")

    def gen() -> Iterator[pa.RecordBatch]:
        if any(e.rows is None for e in manifest.files):
            pos = 0
            for batch in iter_batches(uri, columns, batch_size, manifest, verify):
                lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
                pos += batch.num_rows
                if lo < hi:
                    yield batch.slice(lo, hi - lo)
            return
        f0 = 0
        for entry in manifest.files:
            f1 = f0 + (entry.rows or 0)
            if f1 > start and f0 < stop:
                yield from _file_range(uri, manifest, entry, max(start - f0, 0), min(stop, f1) - f0,
                                       columns, batch_size, target, verify)
            f0 = f1
            if f0 >= stop:
                break

    return gen()


def _file_range(uri: str, manifest: Manifest, entry: FileEntry, lo: int, hi: int, columns: list[str] | None,
                batch_size: int, target: pa.Schema | None, verify: bool) -> Iterator[pa.RecordBatch]:
    """Rows ``[lo, hi)`` of one file, decoding only the row groups that hold them."""
    pf = _parquet(uri, manifest, entry, verify)
    g0 = 0
    for g in range(pf.metadata.num_row_groups):
        g1 = g0 + pf.metadata.row_group(g).num_rows
        if g1 > lo and g0 < hi:
            table = pf.read_row_group(g, columns=columns, use_threads=False)
            table = table.slice(max(lo - g0, 0), min(hi, g1) - max(lo, g0))
            for batch in table.to_batches(max_chunksize=batch_size):
                yield _conform(batch, target, uri, entry)
        g0 = g1
        if g0 >= hi:
            break


def read_table(uri: str, columns: list[str] | None = None, manifest: Manifest | None = None,
               verify: bool = True) -> pa.Table:
    uri = sfs.normalize(uri)
    manifest = manifest or read_manifest(uri)
    _check_columns(uri, manifest, columns)
    schema = _projected(manifest, columns)
    tables = [_conform(_parquet(uri, manifest, e, verify).read(columns=columns, use_threads=False), schema, uri, e)
              for e in manifest.files]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if table.num_rows != manifest.rows:
        raise StorageError(f"{uri}: read {table.num_rows} rows, manifest says {manifest.rows}")
    return table


def _projected(manifest: Manifest, columns: list[str] | None) -> pa.Schema | None:
    schema = manifest.schema
    if schema is not None and columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    return schema


def _conform(data: Any, schema: pa.Schema | None, uri: str, entry: FileEntry) -> Any:
    """Give read data the partition's schema: Parquet has no second-resolution timestamps,
    so a timestamp[s] column comes back as [ms] and is cast back (losslessly)."""
    if schema is None or data.schema.equals(schema, check_metadata=False):
        return data
    try:
        return data.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise StorageError(f"{sfs.join(uri, entry.path)}: data does not fit the schema of "
                           f"{manifest_uri(uri)} ({e})") from None


def _check_columns(uri: str, manifest: Manifest, columns: list[str] | None) -> None:
    if columns is None or manifest.schema is None:
        return
    missing = [c for c in columns if c not in manifest.schema.names]
    if missing:
        raise StorageError(f"{uri}: partition has no column(s) {missing}; it has {manifest.schema.names}")


def list_partitions(uri: str, key: str = "date") -> list[str]:
    """Values of ``key=value`` sub-partitions under ``uri`` that are published (one
    listing call: a directory without a manifest is invisible)."""
    out = []
    for rel in sfs.list_files(uri):
        head, _, tail = rel.partition("/")
        if tail == MANIFEST_NAME and head.startswith(key + "="):
            out.append(head[len(key) + 1:])
    return sorted(out)


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | float) -> float:
    """Seconds in a duration: a number of seconds (``90``, ``1.5``) or a number with a
    unit (``90s``, ``30m``, ``2h``, ``7d``). ValueError unless positive and finite: a
    NaN, infinite, zero or negative age would keep or delete files nobody meant."""
    text = str(value).strip()
    factor = _DURATION_UNITS.get(text[-1:], 1.0) if text else 1.0
    number = text[:-1] if text[-1:] in _DURATION_UNITS else text
    try:
        seconds = float(number) * factor
    except ValueError:
        raise ValueError(f"{value!r} is not a duration (seconds, or a number with s, m, h or d: "
                         f"90, 90s, 30m, 2h, 7d)") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r} is not a positive finite duration")
    return seconds


def _partition_folders(files: list[tuple[str, float]], uri: str) -> tuple[set[str], set[str]]:
    """Folders (relative, with a trailing '/'; '' is ``uri`` itself) that hold a readable
    kd manifest, and the files no vacuum may touch: every manifest, what each manifest
    lists, and everything under a manifest that cannot be read."""
    published: set[str] = set()
    keep: set[str] = set()
    for rel, _ in files:
        if rel == MANIFEST_NAME or rel.endswith("/" + MANIFEST_NAME):
            folder = rel[:-len(MANIFEST_NAME)]
            keep.add(rel)
            try:
                manifest = read_manifest(sfs.join(uri, folder) if folder else uri)
            except StorageError:  # unreadable manifest: touch nothing under it
                keep.update(r for r, _ in files if r.startswith(folder))
                continue
            published.add(folder)
            keep.update(folder + e.path for e in manifest.files)
    return published, keep


def _key(segment: str) -> str | None:
    key, eq, value = segment.partition("=")
    return key if eq and key and value else None


def _split(folder: str) -> tuple[str, str]:
    """('parent/', 'last') of a relative folder written with a trailing '/'."""
    head, _, last = folder.rstrip("/").rpartition("/")
    return (head + "/" if head else ""), last


def _covered(rel: str, published: set[str], siblings: set[tuple[str, str]]) -> bool:
    """True when file ``rel`` lies under a kd partition folder: one holding a kd manifest
    (shards and kept-name folders inside it included), or a ``key=value`` folder whose
    parent holds a published ``key=...`` partition of the same key (``siblings``: the
    (parent, key) pairs of published folders), so the files of a writer killed before
    its first commit go too. Anything else (a foreign ``key=value`` lake, notes, search
    results) is not ours, whatever its name."""
    if "" in published:
        return True
    folder = ""
    for seg in rel.split("/")[:-1]:
        parent, folder = folder, folder + seg + "/"
        if folder in published or (parent, _key(seg)) in siblings:
            return True
    return False


def vacuum(uri: str, older_than: float | str = 0.0, dry_run: bool = False) -> list[str]:
    """Delete what no manifest under ``uri`` lists and return it (relative paths):
    files superseded by a re-publish, files of writers killed before their commit, and
    ``.tmp-*`` files of interrupted writes; plus the local spool folders of dead writers.

    Only files under a kd partition folder are candidates (see ``_covered``); on local
    disk symlinks are neither listed nor followed, and each file is re-checked when it
    is unlinked (``fs.delete``), so nothing outside ``uri`` goes. A root holding no
    readable kd manifest is refused: it is not a kd root, or the wrong folder was given.
    Only files older than ``older_than`` (seconds, or a duration such as ``2h``; 0:
    everything unlisted, for callers that know no writer runs) go, so a writer still
    uploading keeps its files; a reader that holds a manifest older than that may lose
    them."""
    try:
        older_than = 0.0 if isinstance(older_than, int | float) and older_than == 0 else parse_duration(older_than)
    except ValueError as e:
        raise KDError(f"vacuum: older_than: {e}") from None
    uri = sfs.normalize(uri)
    files = sfs.list_file_ages(uri)
    published, keep = _partition_folders(files, uri)
    if not published:
        raise StorageError(f"{uri}: holds no kd partition (no {MANIFEST_NAME}); refusing to vacuum")
    siblings = {(parent, _key(last)) for parent, last in map(_split, published - {""}) if _key(last)}
    removed = []
    for rel, age in files:
        if rel in keep or age < older_than or not _covered(rel, published, siblings):
            continue
        if dry_run or sfs.delete(sfs.join(uri, rel), root=uri):
            removed.append(rel)
    if not dry_run:
        sweep_spools()
    return removed

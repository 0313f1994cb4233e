"""Publish and read partitions atomically.

Writers stream record batches into Parquet files spooled on local disk (bounded by
``max_rows_per_file``), name each file by its checksum, upload it, and write the manifest
last. Readers stream batches from exactly the files the manifest lists (pyarrow
dataset), never from a directory listing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from kdcore.errors import StorageError
from kdcore.storage import fs as sfs
from kdcore.storage.manifest import MANIFEST_NAME, FileEntry, Manifest, encode_schema

PARQUET_OPTIONS: dict[str, Any] = dict(compression="zstd", compression_level=3,
                                       write_statistics=True, use_dictionary=True)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_uri(uri: str) -> str:
    return sfs.join(uri, MANIFEST_NAME)


def read_manifest(uri: str) -> Manifest:
    try:
        data = sfs.read_bytes(manifest_uri(uri))
    except StorageError:
        raise StorageError(f"{uri}: partition is not published (no {MANIFEST_NAME})") from None
    try:
        return Manifest.from_bytes(data)
    except ValueError as e:
        raise StorageError(f"{manifest_uri(uri)}: corrupt manifest ({e})") from None


def is_published(uri: str) -> bool:
    return sfs.exists(manifest_uri(uri))


def commit_manifest(uri: str, manifest: Manifest) -> bool:
    """Write the manifest unless an identical one is there. True when it changed."""
    data = manifest.to_bytes()
    muri = manifest_uri(uri)
    if sfs.exists(muri) and sfs.read_bytes(muri) == data:
        return False
    sfs.write_bytes_atomic(muri, data)
    return True


class PartitionWriter:
    """Stream record batches into a partition; nothing is visible until ``close()``.

    Use as a context manager: leaving the block with an exception publishes nothing.
    """

    def __init__(self, uri: str, schema: pa.Schema, metadata: Mapping[str, Any] | None = None,
                 max_rows_per_file: int = 1_000_000):
        self.uri = sfs.normalize(uri)
        self.schema = schema
        self.metadata = dict(metadata or {})
        self.max_rows_per_file = max_rows_per_file
        self._tmp = tempfile.mkdtemp(prefix="kd-publish-")
        self._entries: list[FileEntry] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self._local = ""
        self.changed: bool | None = None

    def _open(self) -> None:
        self._local = os.path.join(self._tmp, f"part-{len(self._entries):05d}.parquet")
        self._writer = pq.ParquetWriter(self._local, self.schema, **PARQUET_OPTIONS)
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
        target = sfs.join(self.uri, stored)
        if not sfs.exists(target):
            sfs.upload_file_atomic(local, target)
        os.remove(local)
        self._entries.append(FileEntry(name=name, path=stored, bytes=size, sha256=sha,
                                       rows=self._rows_in_file))

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
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
                if self._writer is None:
                    self._open()  # an empty partition still gets one (empty) file with the schema
                self._finish_file()
            manifest = Manifest(
                kind="parquet", files=self._entries, rows=sum(e.rows or 0 for e in self._entries),
                bytes=sum(e.bytes for e in self._entries), schema_b64=encode_schema(self.schema),
                metadata=self.metadata)
            self.changed = commit_manifest(self.uri, manifest)
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
                    max_rows_per_file: int = 1_000_000) -> Manifest:
    with PartitionWriter(uri, schema, metadata, max_rows_per_file) as w:
        for b in batches:
            w.write(b)
    return read_manifest(uri)


def publish_table(uri: str, table: pa.Table, metadata: Mapping[str, Any] | None = None,
                  max_rows_per_file: int = 1_000_000) -> Manifest:
    return publish_batches(uri, table.schema, [table], metadata, max_rows_per_file)


def publish_blobs(uri: str, blobs: Mapping[str, bytes], metadata: Mapping[str, Any] | None = None,
                  keep_names: bool = False) -> Manifest:
    """Publish named byte objects (checkpoints, JSON, HTML) with the same guarantees.

    Each file is stored under a content-addressed name; with ``keep_names`` the names are
    kept and the whole set goes into a content-addressed folder instead, so relative links
    between the files (an HTML site) keep working."""
    uri = sfs.normalize(uri)
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
        target = sfs.join(uri, stored)
        if not sfs.exists(target):
            sfs.write_bytes_atomic(target, data)
        entries.append(FileEntry(name=name, path=stored, bytes=len(data), sha256=sha))
    manifest = Manifest(kind="blobs", files=entries, bytes=sum(e.bytes for e in entries),
                        metadata=dict(metadata or {}))
    commit_manifest(uri, manifest)
    return manifest


def read_blob(uri: str, name: str, manifest: Manifest | None = None) -> bytes:
    manifest = manifest or read_manifest(uri)
    try:
        entry = manifest.file(name)
    except KeyError:
        raise StorageError(f"{uri}: partition has no file '{name}'") from None
    data = sfs.read_bytes(sfs.join(uri, entry.path))
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise StorageError(f"{sfs.join(uri, entry.path)}: checksum does not match the manifest")
    return data


def _dataset(uri: str, manifest: Manifest) -> ds.Dataset:
    fs, path = sfs.resolve(uri)
    paths = [f"{path}/{e.path}" for e in manifest.files]
    return ds.dataset(paths, schema=manifest.schema, format="parquet", filesystem=fs)


def iter_batches(uri: str, columns: list[str] | None = None, batch_size: int = 262_144,
                 manifest: Manifest | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a published partition in manifest order (deterministic).

    The manifest is read and the columns are checked when this is called (not at the first
    ``next()``): a missing partition or column fails at the call site, and the iterator is
    pinned to the version that was current then."""
    uri = sfs.normalize(uri)
    manifest = manifest or read_manifest(uri)
    _check_columns(uri, manifest, columns)
    return _dataset(uri, manifest).to_batches(columns=columns, batch_size=batch_size,
                                              use_threads=False)


def read_table(uri: str, columns: list[str] | None = None, manifest: Manifest | None = None) -> pa.Table:
    uri = sfs.normalize(uri)
    manifest = manifest or read_manifest(uri)
    _check_columns(uri, manifest, columns)
    table = _dataset(uri, manifest).to_table(columns=columns, use_threads=False)
    if table.num_rows != manifest.rows:
        raise StorageError(f"{uri}: read {table.num_rows} rows, manifest says {manifest.rows}")
    return table


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


def vacuum(uri: str) -> list[str]:
    """Delete files the manifest does not list (left by killed or superseded writers).
    Only safe when no reader still holds an older manifest."""
    manifest = read_manifest(uri)
    keep = {e.path for e in manifest.files} | {MANIFEST_NAME}
    removed = []
    for rel in sfs.list_files(uri):
        if "/" not in rel and rel not in keep:
            sfs.delete(sfs.join(uri, rel))
            removed.append(rel)
    return removed

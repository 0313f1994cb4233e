"""Contract tests for kdcore.storage, each run on a local root and on a GCS emulator root.

The contract: a partition is a directory of content-addressed files plus ``_MANIFEST.json``,
written last and atomically; readers trust only what a manifest lists; publishing the same
content again is a no-op; a failed or killed writer leaves nothing visible (no manifest, or
the previous manifest intact).

Stored objects are inspected independently of kdcore: plain ``open()`` for local roots, the
google-cloud-storage client (which honours ``STORAGE_EMULATOR_HOST``) for gs:// roots.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdcore.errors import StorageError
from kdcore.storage import fs as sfs
from kdcore.storage.manifest import MANIFEST_NAME, Manifest
from kdcore.storage.partition import (
    PartitionWriter,
    is_published,
    iter_batches,
    list_partitions,
    publish_batches,
    publish_blobs,
    publish_table,
    read_blob,
    read_manifest,
    read_table,
    vacuum,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Independent access to stored objects
# --------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _client(endpoint: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    assert endpoint, "STORAGE_EMULATOR_HOST must be set for gs:// roots"
    return storage.Client(project="test", credentials=AnonymousCredentials())


def _gcs(uri: str):
    bucket, _, prefix = uri[len("gs://"):].partition("/")
    return _client(os.environ.get("STORAGE_EMULATOR_HOST", "")).bucket(bucket), prefix.rstrip("/")


def _local(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def stored_objects(uri: str) -> set[str]:
    """Every object under ``uri`` (relative names), GCS directory markers included."""
    if uri.startswith("gs://"):
        bucket, prefix = _gcs(uri)
        return {b.name[len(prefix) + 1:] for b in bucket.client.list_blobs(bucket, prefix=prefix + "/")}
    root = _local(uri)
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def stored_files(uri: str) -> set[str]:
    """Stored objects that hold data (no GCS directory markers)."""
    return {o for o in stored_objects(uri) if o and not o.endswith("/")}


def read_object(uri: str, rel: str) -> bytes:
    if uri.startswith("gs://"):
        bucket, prefix = _gcs(uri)
        return bucket.blob(f"{prefix}/{rel}").download_as_bytes()
    with open(_local(uri) / rel, "rb") as f:
        return f.read()


def write_object(uri: str, rel: str, data: bytes) -> None:
    """Write behind kdcore's back (stray files, corruption)."""
    if uri.startswith("gs://"):
        bucket, prefix = _gcs(uri)
        bucket.blob(f"{prefix}/{rel}").upload_from_string(data)
        return
    path = _local(uri) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def object_version(uri: str, rel: str) -> object:
    """Changes whenever the object is rewritten, even with the same bytes."""
    if uri.startswith("gs://"):
        bucket, prefix = _gcs(uri)
        blob = bucket.get_blob(f"{prefix}/{rel}")
        assert blob is not None, f"{uri}/{rel} does not exist"
        return blob.generation
    st = os.stat(_local(uri) / rel)
    return (st.st_ino, st.st_mtime_ns)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_matches_stored_objects(uri: str, manifest: Manifest) -> None:
    """Every manifest entry names a stored object with that size and checksum."""
    for e in manifest.files:
        data = read_object(uri, e.path)
        assert len(data) == e.bytes, e.path
        assert sha256(data) == e.sha256, e.path
        assert sha256(data)[:16] in e.path, f"{e.path} is not content-addressed"
        if manifest.kind == "parquet":
            assert pq.ParquetFile(io.BytesIO(data)).metadata.num_rows == e.rows, e.path
    assert manifest.bytes == sum(e.bytes for e in manifest.files)
    if manifest.kind == "parquet":
        assert manifest.rows == sum(e.rows for e in manifest.files)


def make_table(n: int, seed: int = 0, start: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "id": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "x": pa.array(rng.random(n, dtype=np.float32)),
        "q": pa.array(rng.integers(0, 1000, n, dtype=np.int32)),
        "s": pa.array([f"item-{v}" for v in rng.integers(0, 50, n)]),
    })


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _plain(uri: str) -> str:
    """What an error message must contain to name ``uri`` (messages use normalized URIs)."""
    return uri if uri.startswith("gs://") else os.path.abspath(uri)


# --------------------------------------------------------------------------------------
# Round trip, streaming, projection
# --------------------------------------------------------------------------------------

def test_round_trip_multi_file(storage_root):
    uri = sfs.join(storage_root, "date=2024-01-01")
    table = make_table(10_000, seed=1)
    m = publish_table(uri, table, metadata={"source": "test", "n": 10_000}, max_rows_per_file=3_000)

    assert m.kind == "parquet"
    assert [e.name for e in m.files] == ["part-00000", "part-00001", "part-00002", "part-00003"]
    assert [e.rows for e in m.files] == [3_000, 3_000, 3_000, 1_000]
    assert m.rows == 10_000
    assert m.metadata == {"source": "test", "n": 10_000}
    assert m.schema is not None and m.schema.equals(table.schema)
    assert_matches_stored_objects(uri, m)

    # The manifest is the stored object, byte for byte, and lists exactly what is stored.
    assert read_object(uri, MANIFEST_NAME) == m.to_bytes()
    assert read_manifest(uri) == m
    assert stored_files(uri) == {e.path for e in m.files} | {MANIFEST_NAME}
    assert is_published(uri)

    got = read_table(uri)
    assert got.equals(table)


def test_iter_batches_order_projection_and_missing_column(storage_root):
    uri = sfs.join(storage_root, "date=2024-01-01")
    table = make_table(10_000, seed=2)
    m = publish_table(uri, table, max_rows_per_file=3_000)

    batches = list(iter_batches(uri, batch_size=1_000))
    assert all(b.num_rows <= 1_000 for b in batches)
    streamed = pa.Table.from_batches(batches)
    assert streamed.equals(read_table(uri))
    assert streamed.equals(table)

    # Manifest order, not listing order: a reader holding a manifest whose files are
    # listed in reverse gets the rows file by file in that order.
    reversed_m = m.model_copy(update={"files": list(reversed(m.files))})
    ids = pa.Table.from_batches(list(iter_batches(uri, columns=["id"], manifest=reversed_m))).column("id")
    bounds = np.cumsum([0] + [e.rows for e in m.files])
    expected = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in reversed(range(len(m.files)))])
    assert np.array_equal(ids.to_numpy(), expected)

    # Projection, in the requested order.
    proj = list(iter_batches(uri, columns=["x", "id"], batch_size=4_096))
    assert all(b.schema.names == ["x", "id"] for b in proj)
    assert pa.Table.from_batches(proj).equals(table.select(["x", "id"]))
    assert read_table(uri, columns=["q"]).equals(table.select(["q"]))

    # A missing column is named, and the error comes at the call, before any iteration.
    with pytest.raises(StorageError, match="no_such_col"):
        iter_batches(uri, columns=["id", "no_such_col"])
    with pytest.raises(StorageError, match="no_such_col"):
        read_table(uri, columns=["no_such_col"])
    with pytest.raises(StorageError, match="not published"):
        iter_batches(sfs.join(storage_root, "date=2099-01-01"))


# --------------------------------------------------------------------------------------
# Idempotence
# --------------------------------------------------------------------------------------

def test_republishing_identical_content_is_a_noop(storage_root):
    uri = sfs.join(storage_root, "date=2024-01-01")
    table = make_table(7_000, seed=3)
    m1 = publish_table(uri, table, metadata={"v": 1}, max_rows_per_file=2_000)
    manifest_bytes = read_object(uri, MANIFEST_NAME)
    objects = stored_objects(storage_root)
    versions = {rel: object_version(uri, rel) for rel in stored_files(uri)}

    m2 = publish_table(uri, table, metadata={"v": 1}, max_rows_per_file=2_000)
    with PartitionWriter(uri, table.schema, {"v": 1}, max_rows_per_file=2_000) as w:
        for b in table.to_batches(max_chunksize=10_000):
            w.write(b)
    assert w.changed is False

    assert m2 == m1
    assert read_object(uri, MANIFEST_NAME) == manifest_bytes
    assert stored_objects(storage_root) == objects
    # Nothing was rewritten either (same generation / inode and mtime).
    assert {rel: object_version(uri, rel) for rel in stored_files(uri)} == versions


def test_identical_content_gives_identical_bytes_across_roots(storage_root):
    table = make_table(5_000, seed=4)
    a, b = sfs.join(storage_root, "a"), sfs.join(storage_root, "b")
    ma = publish_table(a, table, metadata={"k": "v"}, max_rows_per_file=2_000)
    mb = publish_table(b, table, metadata={"k": "v"}, max_rows_per_file=2_000)
    assert ma == mb
    assert read_object(a, MANIFEST_NAME) == read_object(b, MANIFEST_NAME)
    assert stored_files(a) == stored_files(b)
    for rel in stored_files(a):
        assert read_object(a, rel) == read_object(b, rel), rel


# --------------------------------------------------------------------------------------
# Replacement and vacuum
# --------------------------------------------------------------------------------------

def test_replace_keeps_old_files_until_vacuum(storage_root):
    uri = sfs.join(storage_root, "date=2024-01-01")
    old, new = make_table(6_000, seed=5), make_table(4_500, seed=6)
    m_old = publish_table(uri, old, max_rows_per_file=2_000)
    m_new = publish_table(uri, new, max_rows_per_file=2_000)
    assert {e.path for e in m_old.files}.isdisjoint({e.path for e in m_new.files})

    assert read_manifest(uri) == m_new
    assert read_object(uri, MANIFEST_NAME) == m_new.to_bytes()
    assert read_table(uri).equals(new)
    # A reader that loaded the old manifest before the switch can still finish.
    assert read_table(uri, manifest=m_old).equals(old)
    assert pa.Table.from_batches(list(iter_batches(uri, manifest=m_old))).equals(old)

    write_object(uri, "stray-0000.parquet", parquet_bytes(make_table(10)))
    removed = vacuum(uri)
    assert set(removed) == {e.path for e in m_old.files} | {"stray-0000.parquet"}
    assert stored_files(uri) == {e.path for e in m_new.files} | {MANIFEST_NAME}
    assert read_table(uri).equals(new)
    assert vacuum(uri) == []
    with pytest.raises((StorageError, OSError)):
        read_table(uri, manifest=m_old)


def test_readers_see_whole_versions_while_a_writer_replaces(storage_root):
    uri = sfs.join(storage_root, "date=2024-01-01")
    versions = [make_table(3_000, seed=7), make_table(2_000, seed=8, start=10_000)]
    manifests = [publish_table(uri, t, max_rows_per_file=1_000) for t in versions]
    by_bytes = {m.to_bytes(): t for m, t in zip(manifests, versions, strict=True)}
    errors: list[BaseException] = []
    done = threading.Event()

    def writer():
        try:
            for i in range(8):
                publish_table(uri, versions[i % 2], max_rows_per_file=1_000)
        except BaseException as e:  # surfaced below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    reads = 0
    while not done.is_set() or reads < 3:
        raw = read_object(uri, MANIFEST_NAME)
        assert raw in by_bytes, "a reader saw a manifest that is neither version"
        m = Manifest.from_bytes(raw)
        assert read_table(uri, manifest=m).equals(by_bytes[raw])
        reads += 1
    t.join()
    assert not errors, errors


# --------------------------------------------------------------------------------------
# Failed writers
# --------------------------------------------------------------------------------------

def test_failed_writer_publishes_nothing(storage_root):
    uri = sfs.join(storage_root, "date=2024-01-01")
    table = make_table(2_500, seed=9)
    with pytest.raises(RuntimeError, match="boom"):
        with PartitionWriter(uri, table.schema, max_rows_per_file=1_000) as w:
            w.write(table)  # two files are already uploaded at this point
            spool = w._tmp
            raise RuntimeError("boom")
    assert not os.path.exists(spool), "the local spool must be removed"
    assert not is_published(uri)
    with pytest.raises(StorageError, match="not published"):
        read_manifest(uri)
    with pytest.raises(StorageError):
        read_table(uri)
    assert list_partitions(storage_root) == []
    assert MANIFEST_NAME not in stored_files(uri)


def test_failed_writer_leaves_previous_version_intact(storage_root):
    uri = sfs.join(storage_root, "date=2024-01-01")
    old = make_table(1_500, seed=10)
    publish_table(uri, old, max_rows_per_file=1_000)
    manifest_bytes = read_object(uri, MANIFEST_NAME)
    new = make_table(3_500, seed=11)

    with pytest.raises(RuntimeError, match="boom"):
        with PartitionWriter(uri, new.schema, max_rows_per_file=1_000) as w:
            w.write(new)
            raise RuntimeError("boom")

    with pytest.raises(StorageError, match="schema"):  # the writer itself fails mid-way
        with PartitionWriter(uri, new.schema, max_rows_per_file=1_000) as w:
            w.write(new)
            w.write(pa.table({"unrelated": [1, 2, 3]}))

    def failing_batches():
        yield from new.to_batches(max_chunksize=1_000)
        raise ValueError("upstream failed")

    with pytest.raises(ValueError, match="upstream failed"):
        publish_batches(uri, new.schema, failing_batches(), max_rows_per_file=1_000)

    assert read_object(uri, MANIFEST_NAME) == manifest_bytes
    assert read_table(uri).equals(old)
    assert list_partitions(storage_root) == ["2024-01-01"]


# --------------------------------------------------------------------------------------
# Unpublished files are invisible
# --------------------------------------------------------------------------------------

def test_files_without_manifest_are_invisible(storage_root):
    publish_table(sfs.join(storage_root, "date=2024-01-01"), make_table(100))
    stray = sfs.join(storage_root, "date=2024-01-02")
    write_object(stray, "part-00000-0123456789abcdef.parquet", parquet_bytes(make_table(100)))
    # What a writer killed while writing the manifest aside (local) could leave behind.
    half = sfs.join(storage_root, "date=2024-01-03")
    write_object(half, f".tmp-1-abcdef-{MANIFEST_NAME}", b'{"format_version": 1, "ki')

    assert list_partitions(storage_root) == ["2024-01-01"]
    for uri in (stray, half):
        assert not is_published(uri)
        with pytest.raises(StorageError) as e:
            read_table(uri)
        assert _plain(uri) in str(e.value)
        with pytest.raises(StorageError, match="not published"):
            iter_batches(uri)


# --------------------------------------------------------------------------------------
# Blobs
# --------------------------------------------------------------------------------------

def test_blobs_round_trip_and_checksum_mismatch(storage_root):
    uri = sfs.join(storage_root, "models", "v1")
    rnd = random.Random(12)
    blobs = {"model.safetensors": rnd.randbytes(100_000), "report.html": b"<html>ok</html>",
             "README": b"plain", "empty.json": b""}
    m = publish_blobs(uri, blobs, metadata={"step": 3})
    assert m.kind == "blobs" and m.rows is None and m.metadata == {"step": 3}
    assert sorted(e.name for e in m.files) == sorted(blobs)
    assert_matches_stored_objects(uri, m)
    assert m.file("model.safetensors").path.endswith(".safetensors")
    assert m.file("README").path.startswith("README-")
    for name, data in blobs.items():
        assert read_blob(uri, name) == data
    with pytest.raises(StorageError, match="nope.bin"):
        read_blob(uri, "nope.bin")

    manifest_bytes, objects = read_object(uri, MANIFEST_NAME), stored_objects(storage_root)
    assert publish_blobs(uri, blobs, metadata={"step": 3}) == m
    assert read_object(uri, MANIFEST_NAME) == manifest_bytes
    assert stored_objects(storage_root) == objects

    entry = m.file("model.safetensors")
    data = bytearray(read_object(uri, entry.path))
    data[len(data) // 2] ^= 0xFF
    write_object(uri, entry.path, bytes(data))
    with pytest.raises(StorageError, match="checksum") as e:
        read_blob(uri, "model.safetensors")
    assert entry.path in str(e.value)
    assert read_blob(uri, "report.html") == blobs["report.html"]


# --------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------

def test_list_partitions_returns_published_dates_sorted(storage_root):
    dates = ["2024-03-01", "2023-12-31", "2024-01-15", "2024-01-02"]
    for i, d in enumerate(dates):
        publish_blobs(sfs.join(storage_root, f"date={d}"), {"x.json": str(i).encode()})
    publish_blobs(sfs.join(storage_root, "model=teacher"), {"x.json": b"t"})
    publish_blobs(sfs.join(storage_root, "date=2024-05-05", "sub"), {"x.json": b"nested"})
    write_object(sfs.join(storage_root, "date=2024-06-01"), "x.json", b"unpublished")

    assert list_partitions(storage_root) == sorted(dates)
    assert list_partitions(storage_root, key="model") == ["teacher"]
    assert list_partitions(sfs.join(storage_root, "nothing-here")) == []


# --------------------------------------------------------------------------------------
# SIGKILL: a killed writer leaves nothing visible, or the previous whole version
# --------------------------------------------------------------------------------------

KILL_ROWS, KILL_ROWS_PER_FILE, KILL_BATCH_ROWS, KILL_SEED = 2_000_000, 200_000, 100_000, 2024

WRITER_SCRIPT = '''
import sys

import numpy as np
import pyarrow as pa

from kdcore.storage.partition import PartitionWriter

uri, rows, per_file, batch_rows, seed = sys.argv[1], *map(int, sys.argv[2:6])
schema = pa.schema([("id", pa.int64()), ("x", pa.float32()), ("q", pa.int32())])
with PartitionWriter(uri, schema, {"rows": rows, "seed": seed}, max_rows_per_file=per_file) as w:
    print("started", flush=True)
    for i, lo in enumerate(range(0, rows, batch_rows)):
        n = min(batch_rows, rows - lo)
        rng = np.random.default_rng([seed, i])
        w.write(pa.record_batch([pa.array(np.arange(lo, lo + n, dtype=np.int64)),
                                 pa.array(rng.random(n, dtype=np.float32)),
                                 pa.array(rng.integers(0, 1000, n, dtype=np.int32))], schema=schema))
        print(f"batch {i}", flush=True)
    print("closing", flush=True)
print("done", flush=True)
'''


class KillableWriter:
    """Runs WRITER_SCRIPT in a subprocess and SIGKILLs it at a chosen moment."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.script = tmp_path / "kd_writer.py"
        self.script.write_text(WRITER_SCRIPT)
        spool = tmp_path / "spool"  # killed writers leave their local spool here
        spool.mkdir()
        self.env = dict(os.environ)  # carries STORAGE_EMULATOR_HOST for gs:// roots
        self.env["TMPDIR"] = str(spool)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        self.runs = 0

    def run(self, uri: str, kill_after: tuple[str, float] | None = None, timeout: float = 120.0) -> bool:
        """Run one publish; with ``kill_after=(line, delay)`` SIGKILL the writer ``delay``
        seconds after it prints ``line``. True when the writer was killed."""
        self.runs += 1
        err_path = self.tmp_path / f"writer-{self.runs}.err"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(self.script), uri, str(KILL_ROWS), str(KILL_ROWS_PER_FILE),
                 str(KILL_BATCH_ROWS), str(KILL_SEED)],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True, env=self.env)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump():
            for line in proc.stdout:
                lines.put(line.strip())
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        try:
            if kill_after is not None:
                marker, delay = kill_after
                while True:
                    try:
                        line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
                    except queue.Empty:
                        pytest.fail(f"writer never printed {marker!r}; stderr:\n{err_path.read_text()}")
                    if line is None:
                        pytest.fail(f"writer exited ({proc.wait()}) before {marker!r}; "
                                    f"stderr:\n{err_path.read_text()}")
                    if line == marker:
                        break
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if kill_after is None or rc != -signal.SIGKILL:
            assert rc == 0, f"writer failed ({rc}); stderr:\n{err_path.read_text()}"
        return rc == -signal.SIGKILL


class VersionChecker:
    """Checks that what a reader sees is one whole version; verifies each distinct
    manifest once (full read, row count, ids, stored checksums)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.verified: set[bytes] = set()

    def new_version_is_whole(self, m: Manifest) -> None:
        raw = m.to_bytes()
        if raw in self.verified:
            return
        assert m.rows == KILL_ROWS
        assert m.metadata == {"rows": KILL_ROWS, "seed": KILL_SEED}
        assert len(m.files) == KILL_ROWS // KILL_ROWS_PER_FILE
        assert_matches_stored_objects(self.uri, m)
        ids = read_table(self.uri, columns=["id"]).column("id").to_numpy()
        assert np.array_equal(ids, np.arange(KILL_ROWS))
        self.verified.add(raw)


def _kill_moments(seed: int) -> list[tuple[str, float]]:
    rng = random.Random(seed)
    return [("started", 0.0),                                  # before any file is complete
            ("started", round(rng.uniform(0.3, 0.9), 3)),      # somewhere among the uploads
            ("closing", round(rng.uniform(0.0, 0.02), 3))]     # around the manifest write


def test_sigkilled_writer_leaves_nothing_or_a_whole_partition(storage_root, tmp_path):
    uri = sfs.join(storage_root, "date=2024-02-01")
    writer, check = KillableWriter(tmp_path), VersionChecker(uri)

    for i, moment in enumerate(_kill_moments(seed=7)):
        killed = writer.run(uri, kill_after=moment)
        if i == 0:
            assert killed
        try:
            m = read_manifest(uri)
        except StorageError:
            assert not is_published(uri)
            assert list_partitions(storage_root) == []
            continue
        assert list_partitions(storage_root) == ["2024-02-01"]
        check.new_version_is_whole(m)

    # A writer that runs to the end (reusing whatever complete, content-addressed files
    # the killed ones left) publishes the whole partition; vacuum drops the leftovers.
    assert writer.run(uri) is False
    m = read_manifest(uri)
    check.new_version_is_whole(m)
    vacuum(uri)
    assert stored_files(uri) == {e.path for e in m.files} | {MANIFEST_NAME}
    check.verified.clear()
    check.new_version_is_whole(read_manifest(uri))


def test_sigkilled_writer_over_previous_version(storage_root, tmp_path):
    uri = sfs.join(storage_root, "date=2024-02-01")
    old = make_table(20_000, seed=13).select(["id", "x", "q"])
    publish_table(uri, old, max_rows_per_file=8_000)
    old_bytes = read_object(uri, MANIFEST_NAME)
    writer, check = KillableWriter(tmp_path), VersionChecker(uri)

    rng = random.Random(11)
    for moment in [("batch 4", round(rng.uniform(0.0, 0.3), 3)), ("closing", round(rng.uniform(0.0, 0.02), 3))]:
        writer.run(uri, kill_after=moment)
        raw = read_object(uri, MANIFEST_NAME)
        if raw == old_bytes:
            assert read_table(uri).equals(old)
        else:
            check.new_version_is_whole(Manifest.from_bytes(raw))
        assert list_partitions(storage_root) == ["2024-02-01"]

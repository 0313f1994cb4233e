"""End-to-end integrity of published partitions, on local disk and on GCS (the emulator):
checksums verified on every read, a corrupt copy repaired by re-publishing, commits that
cannot silently overwrite another writer, and vacuum that reaches every orphan."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from kdcore.errors import ConflictError, StorageError
from kdcore.storage import fs as sfs
from kdcore.storage.manifest import MANIFEST_NAME
from kdcore.storage.partition import (
    PartitionWriter,
    commit_manifest,
    manifest_generation,
    publish_blobs,
    publish_table,
    read_blob,
    read_manifest,
    read_table,
    vacuum,
)
from tests.test_storage import read_object, stored_files, write_object


def _table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"id": pa.array(range(offset, offset + n), pa.int64()),
                     "x": pa.array([float(i) * 0.5 for i in range(offset, offset + n)], pa.float32())})


def _flip(uri: str, rel: str, at: int) -> None:
    data = bytearray(read_object(uri, rel))
    data[at % len(data)] ^= 0x01
    write_object(uri, rel, bytes(data))


def test_a_flipped_bit_is_an_error_naming_the_file_and_republishing_repairs_it(storage_root):
    uri = sfs.join(storage_root, "t/date=2024-01-01")
    table = _table(5000)
    m = publish_table(uri, table, max_rows_per_file=2000)
    victim = m.files[1].path
    for at in (17, len(read_object(uri, victim)) // 2, -30):  # header, data pages, footer
        _flip(uri, victim, at)
        with pytest.raises(StorageError, match=rf"{victim}: corrupt .*checksum does not match"):
            read_table(uri)
        # The same content published again rewrites only the damaged file.
        publish_table(uri, table, max_rows_per_file=2000)
        assert read_table(uri).equals(table)


def test_a_corrupt_blob_is_refused_and_repaired(storage_root):
    uri = sfs.join(storage_root, "b/date=2024-01-01")
    m = publish_blobs(uri, {"meta.json": b'{"a": 1}\n', "w.bin": bytes(range(256)) * 10})
    _flip(uri, m.file("w.bin").path, 100)
    with pytest.raises(StorageError, match="corrupt"):
        read_blob(uri, "w.bin")
    publish_blobs(uri, {"meta.json": b'{"a": 1}\n', "w.bin": bytes(range(256)) * 10})
    assert read_blob(uri, "w.bin") == bytes(range(256)) * 10


def test_a_file_listed_but_missing_is_a_clear_error(storage_root):
    uri = sfs.join(storage_root, "t/date=2024-01-01")
    m = publish_table(uri, _table(10))
    sfs.delete(sfs.join(uri, m.files[0].path))
    with pytest.raises(StorageError, match=rf"{m.files[0].path}: listed in .*{MANIFEST_NAME} but missing"):
        read_table(uri)


def test_two_writers_of_different_content_one_wins_the_other_gets_a_conflict(storage_root):
    uri = sfs.join(storage_root, "t/date=2024-01-01")
    a, b = PartitionWriter(uri, _table(1).schema), PartitionWriter(uri, _table(1).schema)
    a.write(_table(10))
    b.write(_table(10, offset=100))
    a.close()
    with pytest.raises(ConflictError, match="another writer published different content"):
        b.close()
    assert read_table(uri).equals(_table(10))  # the winner's content, untouched


def test_a_replacement_that_started_before_another_commit_conflicts(storage_root):
    uri = sfs.join(storage_root, "t/date=2024-01-01")
    publish_table(uri, _table(3))
    slow = PartitionWriter(uri, _table(1).schema)  # builds on version 1
    publish_table(uri, _table(4))                  # version 2 lands first
    slow.write(_table(5))
    with pytest.raises(ConflictError):
        slow.close()
    assert read_table(uri).equals(_table(4))
    publish_table(uri, _table(5))  # a writer that starts now builds on version 2: fine
    assert read_table(uri).equals(_table(5))


def test_writers_of_the_same_content_both_succeed(storage_root):
    uri = sfs.join(storage_root, "t/date=2024-01-01")
    a, b = PartitionWriter(uri, _table(1).schema), PartitionWriter(uri, _table(1).schema)
    for w in (a, b):
        w.write(_table(7))
    a.close()
    b.close()
    assert a.changed is True and b.changed is False
    assert read_table(uri).equals(_table(7))


def test_racing_commits_exactly_one_wins(storage_root):
    """Many threads commit different manifests over the same starting generation: the
    precondition (GCS) or the directory lock (local) lets exactly one through."""
    uri = sfs.join(storage_root, "race/date=2024-01-01")
    manifests = [publish_table(sfs.join(storage_root, f"src{i}/date=2024-01-01"), _table(3, offset=10 * i))
                 for i in range(6)]
    base = manifest_generation(uri)
    start, results = threading.Barrier(len(manifests)), []

    def commit(m):
        start.wait()
        try:
            results.append(("ok", commit_manifest(uri, m, base)))
        except ConflictError as e:
            results.append(("conflict", str(e)))

    threads = [threading.Thread(target=commit, args=(m,)) for m in manifests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results) == ["conflict"] * 5 + ["ok"]
    winner = read_manifest(uri)
    assert winner in manifests


def test_vacuum_reaches_every_orphan_and_nothing_else(storage_root, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    labels = sfs.join(storage_root, "labels/ds/date=2024-01-01/teacher=t1")
    shard = sfs.join(labels, "_shards/shard=000-of-001")
    m = publish_table(shard, _table(10))
    keep = sfs.join(storage_root, "models/ds/m/date=2024-01-01")
    publish_blobs(keep, {"index.html": b"<a href='x.html'>x</a>", "x.html": b"x"}, keep_names=True)
    # superseded shard file, a killed write's temp file, a killed first publish, a stranger
    publish_table(shard, _table(11))
    write_object(shard, f".tmp-999999-abc-{m.files[0].path}", b"half")
    # a killed first publish of a day, beside a published day of the same dataset (issue 19:
    # without a published sibling a key=value folder is not kd's and stays)
    publish_table(sfs.join(storage_root, "examples/ds/date=2024-01-08"), _table(3))
    write_object(storage_root, "examples/ds/date=2024-01-09/part-00000-0123456789abcdef.parquet", b"x")
    write_object(storage_root, "search/run1/result.json", b"{}")
    dead_spool = tmp_path / "kd-publish-999999-xyz"
    dead_spool.mkdir()
    (dead_spool / "part-00000.parquet").write_bytes(b"x")
    live_spool = tmp_path / f"kd-publish-{os.getpid()}-live"
    live_spool.mkdir()
    before = stored_files(storage_root)

    assert vacuum(storage_root, older_than=3600) == []  # everything is fresh: nothing goes
    assert vacuum(storage_root, dry_run=True) and stored_files(storage_root) == before
    removed = vacuum(storage_root)
    assert sorted(removed) == sorted([
        f"labels/ds/date=2024-01-01/teacher=t1/_shards/shard=000-of-001/{m.files[0].path}",
        f"labels/ds/date=2024-01-01/teacher=t1/_shards/shard=000-of-001/.tmp-999999-abc-{m.files[0].path}",
        "examples/ds/date=2024-01-09/part-00000-0123456789abcdef.parquet"])
    assert "search/run1/result.json" in stored_files(storage_root)
    assert read_table(shard).equals(_table(11)) and read_blob(keep, "x.html") == b"x"
    assert not dead_spool.exists() and live_spool.exists()
    assert vacuum(storage_root) == []


def test_an_unwritable_root_is_a_clear_error_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "root"
    blocker.write_bytes(b"a file where the root folder should be")  # fails for root too
    with pytest.raises(StorageError, match=r"cannot write \(.*\); nothing was published"):
        publish_table(str(blocker / "t" / "date=2024-01-01"), _table(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert not [p for p in Path(tempfile.gettempdir()).glob(f"kd-publish-{os.getpid()}-*")]

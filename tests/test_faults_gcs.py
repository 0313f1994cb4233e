"""Network faults between kdcore and GCS: a fault-injecting proxy (tests/faultproxy.py) in
front of the strict emulator (tests/gcs_strict.py). A lost upload is never published, a
503 storm is retried, a write whose answer was lost is not a conflict, a corrupted
download is refused, and the ``kd`` command line turns a lost write into exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from kdcore.errors import StorageError
from kdcore.storage import partition as part
from kdcore.storage.manifest import MANIFEST_NAME

REPO = Path(__file__).resolve().parents[1]


def _table(n: int = 500) -> pa.Table:
    return pa.table({"id": pa.array(range(n), pa.int64()), "x": pa.array([i / 3 for i in range(n)], pa.float64())})


def _stored(fault_gcs, prefix: str) -> set[str]:
    """What the emulator really holds under ``prefix`` (bypassing the proxy)."""
    client = fault_gcs.client(direct=True)
    return {b.name[len(prefix) + 1:] for b in client.list_blobs(fault_gcs.bucket, prefix=prefix + "/")}


@pytest.fixture
def prefix() -> str:
    return f"faults/{uuid.uuid4().hex}"


def test_a_lost_upload_is_caught_and_nothing_is_published(fault_gcs, prefix):
    uri = f"gs://{fault_gcs.bucket}/{prefix}/date=2024-01-01"
    lost = fault_gcs.proxy.drop_body(method="POST", path_regex=r"/upload/", times=1)  # the parquet file
    with pytest.raises(StorageError, match=r"part-00000-\w+\.parquet: upload reported success but the object "
                                           r"does not exist"):
        part.publish_table(uri, _table())
    assert lost.fired == 1
    assert MANIFEST_NAME not in _stored(fault_gcs, prefix + "/date=2024-01-01")
    assert not part.is_published(uri)
    # without the fault the same publish lands whole
    part.publish_table(uri, _table())
    assert part.read_table(uri).equals(_table())


def test_a_503_storm_is_retried_and_the_data_is_whole(fault_gcs, prefix):
    uri = f"gs://{fault_gcs.bucket}/{prefix}/date=2024-01-01"
    storm = fault_gcs.proxy.fail(method="POST", path_regex=r"/upload/", status=503, times=3)
    part.publish_table(uri, _table(), max_rows_per_file=200)
    assert storm.fired == 3
    assert part.read_table(uri).equals(_table())


def test_a_commit_whose_answer_is_lost_is_not_a_conflict(fault_gcs, prefix):
    """The manifest upload reaches GCS but the connection dies before the answer: the
    client retries with the same generation precondition, gets 412, and must see that
    the manifest there is its own (success), not another writer's (conflict)."""
    uri = f"gs://{fault_gcs.bucket}/{prefix}/date=2024-01-01"
    uploads = len([r for r in fault_gcs.proxy.log if "/upload/" in r.target])
    cut = fault_gcs.proxy.reset(method="POST", path_regex=r"/upload/", forward=True, times=1, skip=1)
    # two uploads: the data file, then the manifest (skip=1 lets the first through)
    m = part.publish_table(uri, _table())
    assert cut.fired == 1 and uploads == 0
    assert part.read_manifest(uri) == m
    assert part.read_table(uri).equals(_table())


def test_a_corrupted_download_is_refused_by_name(fault_gcs, prefix):
    uri = f"gs://{fault_gcs.bucket}/{prefix}/date=2024-01-01"
    m = part.publish_table(uri, _table())
    flip = fault_gcs.proxy.corrupt_response(times=None, path_regex=r"part-00000")
    with pytest.raises(StorageError, match=rf"{m.files[0].path}: corrupt"):
        part.read_table(uri)
    assert flip.fired >= 1
    flip.remove()
    assert part.read_table(uri).equals(_table())


def test_kd_exits_2_on_a_lost_write_and_a_rerun_publishes(fault_gcs, prefix):
    root = f"gs://{fault_gcs.bucket}/{prefix}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    args = [sys.executable, "-m", "kdcore.cli", "data", "synth", "--root", root, "--from", "2026-01-01",
            "--to", "2026-01-01", "--rows-per-day", "2000"]
    fault_gcs.proxy.drop_body(method="POST", path_regex=r"/upload/", times=1)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("kd: error: gs://")
    assert "upload reported success but the object does not exist" in proc.stderr
    assert not [n for n in _stored(fault_gcs, prefix) if n.endswith(MANIFEST_NAME)]
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert again.returncode == 0, again.stderr
    assert part.list_partitions(f"{root}/examples/synth") == ["2026-01-01"]
    assert part.read_table(f"{root}/examples/synth/date=2026-01-01").num_rows == 2000

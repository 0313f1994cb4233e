"""The GCS test infrastructure itself: the strict emulator (tests/gcs_strict.py) and the
fault-injecting proxy (tests/faultproxy.py, fixture ``fault_gcs``).

Everything is checked from outside with the real clients (google-cloud-storage, and
pyarrow's GcsFileSystem) and independently computed checksums; "stored" always means
what a client talking to the emulator directly (bypassing the proxy) reads back.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import os
import threading
import time
import uuid
from datetime import timedelta
from urllib.parse import quote, urlparse

import google_crc32c
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import requests
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from google.resumable_media import DataCorruption

from tests.faultproxy import FaultGCS

MiB = 1024 * 1024
# Retries as google-cloud-storage does them by default, minus the seconds of back-off.
FAST_RETRY = DEFAULT_RETRY.with_delay(initial=0.01, maximum=0.1, multiplier=2).with_timeout(20)


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def _client(endpoint: str) -> storage.Client:
    return storage.Client(project="test", credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": endpoint})


@pytest.fixture
def bucket(gcs_emulator: str) -> storage.Bucket:
    return _client(os.environ["STORAGE_EMULATOR_HOST"]).bucket(gcs_emulator)


@pytest.fixture
def prefix() -> str:
    return f"infra/{uuid.uuid4().hex}"


def _stored(fg: FaultGCS, name: str) -> bytes | None:
    """The object's bytes as the emulator holds them (bypassing the proxy), or None."""
    blob = fg.client(direct=True).bucket(fg.bucket).blob(name)
    try:
        return blob.download_as_bytes()
    except gexc.NotFound:
        return None


def _upload_resumable(blob: storage.Blob, data: bytes, **kwargs) -> None:
    """A resumable upload in 256 KiB chunks (no size given, so never multipart)."""
    blob.chunk_size = 256 * 1024
    blob.upload_from_file(io.BytesIO(data), **kwargs)


# ======================================================================================
# Strict emulator
# ======================================================================================

def test_if_generation_match_zero_creates_only(bucket, prefix):
    blob = bucket.blob(f"{prefix}/obj")
    blob.upload_from_string(b"first", if_generation_match=0)
    first = blob.generation
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(f"{prefix}/obj").upload_from_string(b"second", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        _upload_resumable(bucket.blob(f"{prefix}/obj"), b"third" * 100_000, if_generation_match=0)
    stored = bucket.get_blob(f"{prefix}/obj")
    assert stored.download_as_bytes() == b"first" and stored.generation == first


def test_if_generation_match_needs_the_live_generation(bucket, prefix):
    name = f"{prefix}/obj"
    with pytest.raises(gexc.PreconditionFailed):  # absent object, non-zero generation
        bucket.blob(name).upload_from_string(b"x", if_generation_match=123)
    blob = bucket.blob(name)
    blob.upload_from_string(b"v1")
    g1 = blob.generation
    blob.upload_from_string(b"v2", if_generation_match=g1)
    g2 = blob.generation
    assert g2 > g1
    with pytest.raises(gexc.PreconditionFailed):  # stale
        bucket.blob(name).upload_from_string(b"v3", if_generation_match=g1)
    with pytest.raises(gexc.PreconditionFailed):  # stale, resumable
        _upload_resumable(bucket.blob(name), b"v3" * 200_000, if_generation_match=g1)
    _upload_resumable(bucket.blob(name), b"v4" * 200_000, if_generation_match=g2)
    assert bucket.blob(name).download_as_bytes() == b"v4" * 200_000


def test_other_preconditions(bucket, prefix):
    name = f"{prefix}/obj"
    blob = bucket.blob(name)
    with pytest.raises(gexc.PreconditionFailed):  # 0 = "must exist"
        blob.upload_from_string(b"x", if_generation_not_match=0)
    blob.upload_from_string(b"v1")
    g1 = blob.generation
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(name).upload_from_string(b"x", if_generation_not_match=g1)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(name).upload_from_string(b"x", if_metageneration_match=2)
    bucket.blob(name).upload_from_string(b"v2", if_metageneration_match=1, if_generation_not_match=g1 + 1)
    live = bucket.get_blob(name)
    assert live.generation > g1 and live.metageneration == 1

    # reads: a stale precondition is 412, a stale generation is gone (no versioning)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(name).download_as_bytes(if_generation_match=g1)
    with pytest.raises(gexc.NotFound):
        bucket.blob(name, generation=g1).download_as_bytes()
    assert bucket.get_blob(name, generation=g1) is None  # (get_blob: None for 404)
    assert bucket.blob(name).download_as_bytes(if_generation_match=live.generation) == b"v2"

    # metadata patch and delete
    stale = bucket.blob(name)
    stale.metadata = {"k": "v"}
    with pytest.raises(gexc.PreconditionFailed):
        stale.patch(if_generation_match=g1)
    stale.patch(if_metageneration_match=1)
    assert bucket.get_blob(name).metageneration == 2
    with pytest.raises(gexc.PreconditionFailed):
        bucket.delete_blob(name, if_generation_match=g1)
    with pytest.raises(gexc.NotFound):
        bucket.delete_blob(name, generation=g1)
    bucket.delete_blob(name, if_generation_match=live.generation)
    assert bucket.get_blob(name) is None


def test_resumable_precondition_is_evaluated_when_the_upload_completes(bucket, prefix):
    """GCS checks a resumable session's preconditions at its end, not when it opens:
    a session opened with ifGenerationMatch=0 loses to an object created meanwhile."""
    name = f"{prefix}/obj"
    data = os.urandom(300_000)
    url = bucket.blob(name).create_resumable_upload_session(size=len(data), if_generation_match=0)
    bucket.blob(name).upload_from_string(b"winner", if_generation_match=0)
    put = requests.put(url, data=data, headers={"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"},
                       timeout=30)
    assert put.status_code == 412, put.text
    assert bucket.blob(name).download_as_bytes() == b"winner"

    url = bucket.blob(f"{name}-2").create_resumable_upload_session(size=len(data), if_generation_match=0)
    put = requests.put(url, data=data, headers={"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"},
                       timeout=30)
    assert put.status_code == 200, put.text
    assert bucket.blob(f"{name}-2").download_as_bytes() == data


@pytest.mark.parametrize("upload", ["multipart", "resumable"])
def test_racing_creates_exactly_one_wins(gcs_emulator, prefix, upload):
    endpoint = os.environ["STORAGE_EMULATOR_HOST"]
    writers = 8
    for round_ in range(3):
        name = f"{prefix}/race-{round_}"
        barrier = threading.Barrier(writers)
        outcome: dict[int, object] = {}

        def write(i: int, name=name, barrier=barrier, outcome=outcome) -> None:
            blob = _client(endpoint).bucket(gcs_emulator).blob(name)
            data = f"writer {i} ".encode() * 50_000  # 0.5 MB: several resumable chunks
            barrier.wait()
            try:
                if upload == "multipart":
                    blob.upload_from_string(data, if_generation_match=0)
                else:
                    _upload_resumable(blob, data, if_generation_match=0)
                outcome[i] = blob.generation
            except gexc.PreconditionFailed as err:
                outcome[i] = err

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(outcome) == writers, outcome
        winners = [i for i, v in outcome.items() if not isinstance(v, Exception)]
        assert len(winners) == 1, outcome
        stored = _client(endpoint).bucket(gcs_emulator).get_blob(name)
        assert stored.generation == outcome[winners[0]]
        assert stored.download_as_bytes() == f"writer {winners[0]} ".encode() * 50_000


def _assert_metadata(blob: storage.Blob, data: bytes, *, composite: bool = False) -> None:
    props = blob._properties
    assert props["size"] == str(len(data))
    assert props["crc32c"] == _crc32c(data)
    if composite:  # GCS gives composite objects no MD5
        assert "md5Hash" not in props
    else:
        assert props["md5Hash"] == _md5(data)
    assert props["metageneration"] == "1"
    assert int(props["generation"]) > 0


def test_metadata_matches_content(bucket, prefix):
    small, big = os.urandom(1000), os.urandom(3 * MiB + 17)

    bucket.blob(f"{prefix}/multipart").upload_from_string(small, content_type="application/octet-stream")
    _assert_metadata(bucket.get_blob(f"{prefix}/multipart"), small)
    _upload_resumable(bucket.blob(f"{prefix}/resumable"), big)
    _assert_metadata(bucket.get_blob(f"{prefix}/resumable"), big)
    bucket.blob(f"{prefix}/empty").upload_from_string(b"")
    _assert_metadata(bucket.get_blob(f"{prefix}/empty"), b"")

    host = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).netloc
    fs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=host)
    with fs.open_output_stream(f"{bucket.name}/{prefix}/pyarrow") as f:
        f.write(big)
    _assert_metadata(bucket.get_blob(f"{prefix}/pyarrow"), big)
    assert fs.get_file_info(f"{bucket.name}/{prefix}/pyarrow").size == len(big)

    bucket.copy_blob(bucket.blob(f"{prefix}/multipart"), bucket, f"{prefix}/copy")
    _assert_metadata(bucket.get_blob(f"{prefix}/copy"), small)
    bucket.blob(f"{prefix}/rewrite").rewrite(bucket.blob(f"{prefix}/resumable"))
    _assert_metadata(bucket.get_blob(f"{prefix}/rewrite"), big)
    composed = bucket.blob(f"{prefix}/composed")
    composed.compose([bucket.blob(f"{prefix}/multipart"), bucket.blob(f"{prefix}/resumable")])
    _assert_metadata(bucket.get_blob(f"{prefix}/composed"), small + big, composite=True)
    assert bucket.get_blob(f"{prefix}/composed").component_count == 2

    # a client-declared checksum that does not match the bytes is refused
    liar = bucket.blob(f"{prefix}/liar")
    liar.crc32c = _crc32c(b"something else")
    with pytest.raises(gexc.BadRequest):
        liar.upload_from_string(small, checksum=None)


def test_generation_increases_on_every_overwrite(bucket, prefix):
    name = f"{prefix}/obj"
    host = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).netloc
    fs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=host)
    gens = []
    for i in range(12):
        if i % 3 == 0:
            bucket.blob(name).upload_from_string(b"%d" % i)
        elif i % 3 == 1:
            _upload_resumable(bucket.blob(name), b"%d" % i)
        else:
            with fs.open_output_stream(f"{bucket.name}/{name}") as f:
                f.write(b"%d" % i)
        gens.append(bucket.get_blob(name).generation)
    assert gens == sorted(gens) and len(set(gens)) == len(gens), gens

    # two resumable sessions: the one that completes last is live and has the newer generation
    a = bucket.blob(name).create_resumable_upload_session(size=1)
    b = bucket.blob(name).create_resumable_upload_session(size=1)
    for url, body in ((b, b"b"), (a, b"a")):
        assert requests.put(url, data=body, headers={"Content-Range": "bytes 0-0/1"}, timeout=30).ok
    live = bucket.get_blob(name)
    assert live.download_as_bytes() == b"a" and live.generation > gens[-1]


def test_copy_and_compose_preconditions(bucket, prefix):
    src, dst = bucket.blob(f"{prefix}/src"), bucket.blob(f"{prefix}/dst")
    src.upload_from_string(b"source")
    dst.upload_from_string(b"dest")
    with pytest.raises(gexc.PreconditionFailed):
        bucket.copy_blob(src, bucket, dst.name, if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.copy_blob(src, bucket, f"{prefix}/new", if_source_generation_match=src.generation + 1)
    bucket.copy_blob(src, bucket, dst.name, if_generation_match=dst.generation)
    assert bucket.blob(dst.name).download_as_bytes() == b"source"

    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(dst.name).compose([src, src], if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(f"{prefix}/c").compose([src], if_source_generation_match=[src.generation + 1])
    fresh = bucket.blob(f"{prefix}/c")
    fresh.compose([src, src], if_generation_match=0, if_source_generation_match=[src.generation] * 2)
    assert fresh.download_as_bytes() == b"sourcesource"


# ======================================================================================
# Fault proxy
# ======================================================================================

def test_fault_gcs_fixture_routes_clients_through_the_proxy(fault_gcs, prefix):
    assert os.environ["STORAGE_EMULATOR_HOST"] == fault_gcs.endpoint != fault_gcs.upstream
    from kdcore.storage import fs as sfs

    uri = f"gs://{fault_gcs.bucket}/{prefix}/kd.bin"
    sfs.write_bytes_atomic(uri, b"via kdcore")
    assert sfs.read_bytes(uri) == b"via kdcore"
    assert _stored(fault_gcs, f"{prefix}/kd.bin") == b"via kdcore"
    log = fault_gcs.proxy.log
    assert any(r.method in ("POST", "PUT") and r.path.startswith("/upload/") for r in log), log
    assert any(r.method == "GET" and "kd.bin" in r.target for r in log), log


def test_proxy_503_is_retried_by_the_client(fault_gcs, prefix):
    proxy = fault_gcs.proxy
    rule = proxy.fail(method="POST", path_regex=r"^/upload/.*uploadType=multipart", status=503, times=2)
    blob = fault_gcs.client().bucket(fault_gcs.bucket).blob(f"{prefix}/obj")
    blob.upload_from_string(b"payload", retry=FAST_RETRY)
    assert [r.status for r in proxy.requests("POST", "/upload/")] == [503, 503, 200]
    assert rule.fired == 2 and rule.exhausted
    assert _stored(fault_gcs, f"{prefix}/obj") == b"payload"

    # skip: the first matching request goes through, the second fails
    proxy.fail(method="GET", path_regex=r"/o/.*alt=media", status=500, times=1, skip=1)
    assert blob.download_as_bytes(retry=None) == b"payload"
    with pytest.raises(gexc.InternalServerError):
        blob.download_as_bytes(retry=None)
    assert blob.download_as_bytes(retry=None) == b"payload"


def test_proxy_503_beyond_retries_fails(fault_gcs, prefix):
    proxy = fault_gcs.proxy
    proxy.fail(method="POST", path_regex="/upload/", status=503, times=None)
    blob = fault_gcs.client().bucket(fault_gcs.bucket).blob(f"{prefix}/obj")
    with pytest.raises(gexc.ServiceUnavailable):
        blob.upload_from_string(b"payload", retry=None)
    with pytest.raises((gexc.RetryError, gexc.ServiceUnavailable)):
        blob.upload_from_string(b"payload", retry=FAST_RETRY.with_timeout(1))
    attempts = proxy.requests("POST", "/upload/")
    assert len(attempts) >= 3 and all(r.status == 503 and r.action == "fail" for r in attempts)
    assert _stored(fault_gcs, f"{prefix}/obj") is None


def test_proxy_reset(fault_gcs, prefix):
    proxy = fault_gcs.proxy
    client = fault_gcs.client()
    name = f"{prefix}/obj"

    proxy.reset(method="POST", path_regex="/upload/", times=1)
    with pytest.raises(requests.exceptions.ConnectionError):
        client.bucket(fault_gcs.bucket).blob(name).upload_from_string(b"x", retry=None)
    assert _stored(fault_gcs, name) is None

    # mid-body: the emulator never sees a complete request
    data = os.urandom(2 * MiB)
    proxy.reset(method="POST", path_regex="/upload/", times=1, after_bytes=64 * 1024)
    with pytest.raises(requests.exceptions.ConnectionError):
        client.bucket(fault_gcs.bucket).blob(name).upload_from_string(data, retry=None)
    assert _stored(fault_gcs, name) is None
    mid = proxy.requests("POST", "/upload/")[-1]
    assert mid.action == "reset" and mid.status is None and mid.request_bytes == 64 * 1024

    # a client that retries gets through
    proxy.reset(method="POST", path_regex="/upload/", times=1)
    client.bucket(fault_gcs.bucket).blob(name).upload_from_string(data, retry=FAST_RETRY)
    assert _stored(fault_gcs, name) == data
    assert [r.status for r in proxy.requests("POST", "/upload/")][-2:] == [None, 200]


def test_proxy_reset_after_forward_loses_only_the_answer(fault_gcs, prefix):
    """The write happens, the client sees a network error: a retry with
    ifGenerationMatch=0 then meets its own object (412)."""
    proxy = fault_gcs.proxy
    blob = fault_gcs.client().bucket(fault_gcs.bucket).blob(f"{prefix}/obj")
    proxy.reset(method="POST", path_regex="/upload/", times=1, forward=True)
    with pytest.raises(gexc.PreconditionFailed):
        blob.upload_from_string(b"payload", if_generation_match=0, retry=FAST_RETRY)
    assert [(r.action, r.status) for r in proxy.requests("POST", "/upload/")] == [("reset", None), ("forward", 412)]
    assert _stored(fault_gcs, f"{prefix}/obj") == b"payload"


@pytest.mark.parametrize("how", ["multipart", "resumable", "pyarrow_stream", "pyarrow_copy_files"])
def test_proxy_drop_body_is_a_lost_write_the_client_believes(fault_gcs, prefix, how, tmp_path):
    proxy = fault_gcs.proxy
    name = f"{prefix}/obj"
    data = os.urandom(700_000)
    rule = proxy.drop_body()
    if how == "multipart":
        blob = fault_gcs.client().bucket(fault_gcs.bucket).blob(name)
        blob.upload_from_string(data)  # checksum="auto": the fake answer's crc32c agrees
        assert blob.size == len(data) and blob.crc32c == _crc32c(data)
    elif how == "resumable":
        _upload_resumable(fault_gcs.client().bucket(fault_gcs.bucket).blob(name), data)  # 3 chunks
    elif how == "pyarrow_stream":
        with fault_gcs.pyarrow_fs().open_output_stream(f"{fault_gcs.bucket}/{name}") as f:
            f.write(data)
    else:
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        pafs.copy_files(str(src), f"{fault_gcs.bucket}/{name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fault_gcs.pyarrow_fs())
    assert rule.fired == 1  # once per upload, however many chunks it had
    assert _stored(fault_gcs, name) is None
    dropped = [r for r in proxy.log if r.action == "drop_body"]
    assert dropped and dropped[-1].status == 200 and all(r.status == 308 for r in dropped[:-1])
    assert sum(r.request_bytes for r in dropped) >= len(data)
    assert not any(r.action == "forward" and r.method == "PUT" for r in proxy.log)


def test_proxy_corrupt_response(fault_gcs, prefix):
    proxy = fault_gcs.proxy
    data = os.urandom(100_000)
    blob = fault_gcs.client().bucket(fault_gcs.bucket).blob(f"{prefix}/obj")
    blob.upload_from_string(data)
    proxy.corrupt_response(times=1)
    with pytest.raises(DataCorruption):
        blob.download_as_bytes(checksum="md5", retry=None)
    proxy.corrupt_response(times=1, offset=10)
    got = blob.download_as_bytes(checksum=None, retry=None)
    assert len(got) == len(data) and [i for i in range(len(data)) if got[i] != data[i]] == [10]
    assert got[10] == data[10] ^ 0xFF
    assert blob.download_as_bytes() == data  # rules used up
    assert [r.action for r in proxy.requests("GET", "alt=media")] == ["corrupt_response", "corrupt_response", "forward"]


def test_proxy_delay(fault_gcs, prefix):
    proxy = fault_gcs.proxy
    blob = fault_gcs.client().bucket(fault_gcs.bucket).blob(f"{prefix}/obj")
    blob.upload_from_string(b"x")
    proxy.delay(0.4, method="GET", path_regex="alt=media", times=1)
    proxy.delay(0.3, method="GET", path_regex="alt=media", times=1, after_forward=True)
    start = time.monotonic()
    assert blob.download_as_bytes() == b"x"
    assert time.monotonic() - start >= 0.7
    start = time.monotonic()
    assert blob.download_as_bytes() == b"x"
    assert time.monotonic() - start < 0.4
    assert [r.delayed for r in proxy.requests("GET", "alt=media")] == [pytest.approx(0.7), 0.0]

    proxy.delay(2.0, method="GET", path_regex="alt=media", times=1)
    with pytest.raises(requests.exceptions.ReadTimeout):
        blob.download_as_bytes(timeout=0.5, retry=None)


def test_proxy_passes_large_objects_intact(fault_gcs, prefix):
    proxy = fault_gcs.proxy
    bucket = fault_gcs.client().bucket(fault_gcs.bucket)
    data = os.urandom(6 * MiB + 123)

    bucket.blob(f"{prefix}/multipart").upload_from_string(data)
    _upload_resumable(bucket.blob(f"{prefix}/resumable"), data)
    for name in ("multipart", "resumable"):
        assert _stored(fault_gcs, f"{prefix}/{name}") == data
        assert bucket.blob(f"{prefix}/{name}").download_as_bytes() == data
        assert bucket.blob(f"{prefix}/{name}").download_as_bytes(start=MiB, end=2 * MiB - 1) == data[MiB:2 * MiB]

    fs = fault_gcs.pyarrow_fs()
    path = f"{fault_gcs.bucket}/{prefix}/pyarrow"
    with fs.open_output_stream(path) as f:
        for i in range(0, len(data), MiB):
            f.write(data[i:i + MiB])
    assert _stored(fault_gcs, f"{prefix}/pyarrow") == data
    with fs.open_input_file(path) as f:
        assert f.size() == len(data)
        assert f.read() == data
        assert f.read_at(4096, 5 * MiB) == data[5 * MiB:5 * MiB + 4096]
    with fs.open_input_stream(f"{fault_gcs.bucket}/{prefix}/multipart") as f:
        assert f.read() == data

    log = proxy.log
    assert all(r.action == "forward" and r.status in (200, 206, 308) for r in log), log
    assert sum(r.request_bytes for r in log if r.method in ("PUT", "POST")) >= 3 * len(data)
    assert sum(r.response_bytes for r in log if r.method == "GET") >= 4 * len(data)
    # keep-alive: the clients reuse their connections to the proxy
    assert len({r.peer for r in log}) < len(log)


def test_proxy_forwards_chunked_request_bodies(fault_gcs, prefix):
    name = f"{prefix}/chunked"
    data = os.urandom(300_000)
    host, port = urlparse(fault_gcs.endpoint).hostname, urlparse(fault_gcs.endpoint).port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        for _ in range(2):  # two requests on one keep-alive connection
            conn.request("POST", f"/upload/storage/v1/b/{fault_gcs.bucket}/o?uploadType=media&name={quote(name, safe='')}",
                         body=(data[i:i + 7000] for i in range(0, len(data), 7000)),
                         headers={"Content-Type": "application/octet-stream"}, encode_chunked=True)
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            resp.read()
    finally:
        conn.close()
    assert _stored(fault_gcs, name) == data
    uploads = fault_gcs.proxy.requests("POST", "uploadType=media")
    assert len(uploads) == 2 and all(r.chunked and r.request_bytes == len(data) for r in uploads)
    assert uploads[0].peer == uploads[1].peer


def test_pyarrow_copy_files_swallows_a_failed_upload(fault_gcs, prefix, tmp_path):
    """Characterizes pyarrow (26.0.1): when the upload's final PUT fails, writing through
    ``open_output_stream`` raises at close, but ``pyarrow.fs.copy_files`` returns normally
    although nothing was stored. If the last assertion fails, pyarrow now reports it."""
    proxy = fault_gcs.proxy
    fs = fault_gcs.pyarrow_fs(retry_time_limit=timedelta(seconds=1))
    proxy.fail(method="PUT", path_regex="upload_id=", status=400, times=None)
    with pytest.raises((OSError, pa.ArrowException)), fs.open_output_stream(f"{fault_gcs.bucket}/{prefix}/stream") as f:
        f.write(b"small")
    assert _stored(fault_gcs, f"{prefix}/stream") is None

    src = tmp_path / "small.bin"
    src.write_bytes(b"small")
    before = len(proxy.requests("PUT", "upload_id="))
    pafs.copy_files(str(src), f"{fault_gcs.bucket}/{prefix}/copied", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    assert len(proxy.requests("PUT", "upload_id=")) > before  # the failing PUT happened
    assert _stored(fault_gcs, f"{prefix}/copied") is None  # ...and copy_files said nothing


def test_proxy_rules_can_be_listed_and_cleared(fault_gcs):
    proxy = fault_gcs.proxy
    a = proxy.fail(path_regex="nothing-matches-this", times=None)
    proxy.delay(0.1, method="GET")
    assert [r.kind for r in proxy.rules] == ["fail", "delay"]
    a.remove()
    assert [r.kind for r in proxy.rules] == ["delay"]
    proxy.clear()
    assert proxy.rules == []
    with pytest.raises(RuntimeError):
        proxy._control("POST", "rules", {"kind": "no-such-kind"})

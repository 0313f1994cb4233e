"""Shared pytest fixtures.

Keep this file generic: fixtures specific to one test module belong in that module.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faultproxy import FaultGCS, FaultProxy, stop_process

GCS_TEST_BUCKET = "kd-test"
_EMULATOR_START_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator_command(port: int, bucket: str) -> list[str]:
    """The strict emulator (gcp-storage-emulator with GCS preconditions and generations,
    tests/gcs_strict.py), run by the interpreter running the tests."""
    return [sys.executable, str(Path(__file__).with_name("gcs_strict.py")), "start",
            "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", bucket]


_stop = stop_process


def _bucket_answers(port: int, bucket: str) -> bool:
    """True once the emulator on ``port`` serves ``bucket`` (a bare TCP answer could be
    some other process that grabbed the port)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(f"http://127.0.0.1:{port}/storage/v1/b/{bucket}", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _start_emulator(workdir: Path, bucket: str, attempts: int = 3) -> tuple[subprocess.Popen, int]:
    last_err = ""
    deadline = time.monotonic() + _EMULATOR_START_TIMEOUT_S  # one bound for all attempts
    for attempt in range(attempts):
        if time.monotonic() >= deadline:
            break
        port = _free_port()
        cmd = _emulator_command(port, bucket)
        err_path = workdir / f"emulator-{attempt}.err"
        # The emulator logs every request: send it to files, never to an unread pipe.
        with open(workdir / f"emulator-{attempt}.out", "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _bucket_answers(port, bucket):
                return proc, port
            time.sleep(0.1)
        # Exited, or never answered (a failed bind leaves it running): stop it by pid.
        exited = proc.poll()
        _stop(proc)
        what = (f"exited with code {exited}" if exited is not None
                else f"did not serve bucket '{bucket}' within {_EMULATOR_START_TIMEOUT_S:.0f} s")
        stderr = err_path.read_text(errors="replace")[-4000:]
        last_err = (f"strict GCS emulator ({' '.join(cmd)}) {what} "
                    f"(attempt {attempt + 1}/{attempts}); stderr:\n{stderr}")
    raise RuntimeError(last_err)


@dataclass(frozen=True)
class GcsServer:
    endpoint: str  #: http://127.0.0.1:PORT
    bucket: str
    pid: int
    logdir: Path  #: emulator-N.out / emulator-N.err


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    """The session's strict GCS emulator process (tests/gcs_strict.py); does not touch the
    environment -- use ``gcs_emulator`` or ``fault_gcs`` for that."""
    workdir = tmp_path_factory.mktemp("gcs-emulator")
    proc, port = _start_emulator(workdir, GCS_TEST_BUCKET)
    try:
        yield GcsServer(f"http://127.0.0.1:{port}", GCS_TEST_BUCKET, proc.pid, workdir)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def gcs_emulator(gcs_server: GcsServer) -> Iterator[str]:
    """An in-memory GCS emulator for the whole session; yields the bucket name.

    The emulator enforces GCS preconditions (``ifGenerationMatch`` & co, 412) and
    generations (tests/gcs_strict.py). ``STORAGE_EMULATOR_HOST`` points
    google-cloud-storage and ``kdcore.storage`` (and any subprocess started with
    ``os.environ``) at it until the session ends."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
        # gcsfs against an emulator is very slow unless this is off (platform notes).
        mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        yield gcs_server.bucket


@pytest.fixture
def fault_gcs(gcs_emulator: str, gcs_server: GcsServer, monkeypatch: pytest.MonkeyPatch,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultGCS]:
    """The session's emulator behind a fault-injecting proxy (tests/faultproxy.py), for one
    test: ``STORAGE_EMULATOR_HOST`` points at the proxy meanwhile. Yields ``FaultGCS``:
    ``.endpoint`` (the proxy), ``.proxy`` (rules: ``fail``/``reset``/``drop_body``/``delay``/
    ``corrupt_response``, and ``.log``), ``.bucket``, ``.upstream`` (the emulator itself),
    ``.client()`` and ``.pyarrow_fs()``. The proxy is a process of its own (its output:
    files in a temporary directory). The bucket is shared with the session: use a unique
    prefix."""
    with FaultProxy(gcs_server.endpoint, workdir=tmp_path_factory.mktemp("faultproxy")) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        yield FaultGCS(proxy.endpoint, proxy, gcs_emulator, gcs_server.endpoint)


@pytest.fixture(params=["local", "gcs"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty storage root URI on each backend: a local path, or
    ``gs://<bucket>/<uuid>`` on the session's emulator (started only when needed)."""
    if request.param == "local":
        root = tmp_path / "store"
        root.mkdir()
        return str(root)
    bucket = request.getfixturevalue("gcs_emulator")
    return f"gs://{bucket}/{uuid.uuid4().hex}"


# The longest test files first (make test runs two xdist workers, one file each at a time):
# a long file started last leaves the other worker idle while it runs. Measured with
# `pytest --durations`; the order only changes wall time, never what is tested.
LONGEST_FIRST = ("test_airflow_integration.py", "test_hitl_promotion.py", "test_celery.py", "test_dag_run.py",
                 "test_faults.py", "test_teacher_search.py", "test_experiments.py", "test_ui_plugin.py",
                 "test_ui_browser.py", "test_fail_fast.py", "test_bad_input.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise

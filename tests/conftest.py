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
from pathlib import Path

import pytest

GCS_TEST_BUCKET = "kd-test"
_EMULATOR_START_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator_script() -> str:
    """The ``gcp-storage-emulator`` console script of the interpreter running the tests."""
    bindir = Path(sys.executable).parent
    for name in ("gcp-storage-emulator", "gcp-storage-emulator.exe"):
        if (bindir / name).exists():
            return str(bindir / name)
    raise RuntimeError(f"gcp-storage-emulator is not installed next to {sys.executable}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


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
    script = _emulator_script()
    last_err = ""
    deadline = time.monotonic() + _EMULATOR_START_TIMEOUT_S  # one bound for all attempts
    for attempt in range(attempts):
        if time.monotonic() >= deadline:
            break
        port = _free_port()
        err_path = workdir / f"emulator-{attempt}.err"
        # The emulator logs every request: send it to files, never to an unread pipe.
        with open(workdir / f"emulator-{attempt}.out", "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [script, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                 "--default-bucket", bucket],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
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
        last_err = (f"gcp-storage-emulator ({script}) on 127.0.0.1:{port} {what} "
                    f"(attempt {attempt + 1}/{attempts}); stderr:\n{stderr}")
    raise RuntimeError(last_err)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An in-memory GCS emulator for the whole session; yields the bucket name.

    ``STORAGE_EMULATOR_HOST`` points google-cloud-storage and ``kdcore.storage`` (and any
    subprocess started with ``os.environ``) at it until the session ends."""
    workdir = tmp_path_factory.mktemp("gcs-emulator")
    proc, port = _start_emulator(workdir, GCS_TEST_BUCKET)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
            # gcsfs against an emulator is very slow unless this is off (platform notes).
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            yield GCS_TEST_BUCKET
    finally:
        _stop(proc)


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

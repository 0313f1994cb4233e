"""Faults say whether they can pass, and only those that can are retried.

A table of raise sites, each provoked with the real component (a missing or corrupt
file, a real EIO, a lost race, a config the parent does not fit, ...): the class it
raises and its ``transient``. Then the one retry rule of the Airflow tasks
(``operators.faults.no_retry``) and of the ``kd`` command line, on real faults."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from kdcore.errors import (
    ConflictError,
    DataError,
    KDError,
    LineageError,
    SpecError,
    StorageError,
    TransientStorageError,
    is_transient,
    transient_os_error,
)
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part
from kdcore.storage.manifest import MANIFEST_NAME
from operators.faults import no_retry
from operators.kd_daily import _no_retry  # imported before a test runs: Airflow sets up logging once
from tests.pipeline_fixtures import KD, kd, kd_base  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def _raised(fn) -> KDError:
    with pytest.raises(KDError) as e:
        fn()
    return e.value


def _published(tmp_path: Path) -> str:
    uri = str(tmp_path / f"t-{uuid.uuid4().hex}" / "date=2024-01-01")
    part.publish_table(uri, pa.table({"id": pa.array(range(12), pa.int64())}))
    return uri


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _lost_race(tmp_path: Path) -> None:
    uri = _published(tmp_path)
    base = part.manifest_generation(uri)
    part.publish_table(uri, pa.table({"id": pa.array(range(3), pa.int64())}))  # the winner
    part.publish_blobs(uri, {"x.json": b"{}"}, expected=base)  # the loser built on `base`


def _under_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a folder")
    sfs.write_bytes_atomic(str(tmp_path / "plain" / "x.json"), b"{}")


def _missing_data_file(tmp_path: Path) -> None:
    uri = _published(tmp_path)
    (Path(uri) / part.read_manifest(uri).files[0].path).unlink()
    part.read_table(uri)


def _corrupt_data_file(tmp_path: Path) -> None:
    uri = _published(tmp_path)
    _flip(Path(uri) / part.read_manifest(uri).files[0].path)
    part.read_table(uri)


def _corrupt_manifest(tmp_path: Path) -> None:
    uri = _published(tmp_path)
    path = Path(uri) / MANIFEST_NAME
    path.write_text(path.read_text().replace('"rows": 12', '"rows": 13', 1))
    part.read_manifest(uri)


# (site, provoke(tmp_path), class, transient, message)
STORAGE_SITES = [
    ("fs.read_bytes: a local EIO", lambda t: sfs.read_bytes("/proc/self/mem"),
     TransientStorageError, True, "cannot read"),
    ("fs.read_bytes: missing", lambda t: sfs.read_bytes(str(t / "nothing")), StorageError, False, "not found"),
    ("fs._local_write: ENOTDIR", _under_a_file, StorageError, False, "cannot write"),
    ("fs.parse: a bad URI", lambda t: sfs.parse("s3://bucket/x"), StorageError, False, "unsupported storage URI"),
    ("partition.read_manifest: not published", lambda t: part.read_manifest(str(t / "date=2024-01-01")),
     StorageError, False, "partition is not published"),
    ("partition.read_manifest: corrupt", _corrupt_manifest, StorageError, False, "corrupt manifest"),
    ("partition.read_blob: no such file", lambda t: part.read_blob(_published(t), "nope.json"),
     StorageError, False, "partition has no file 'nope.json'"),
    ("partition._verified: missing file", _missing_data_file, StorageError, False, "but missing"),
    ("partition._verified: corrupt file", _corrupt_data_file, StorageError, False, "corrupt"),
    ("partition.commit_manifest: lost a race", _lost_race, ConflictError, False,
     "another writer published different content"),
    ("partition.vacuum: not a kd root", lambda t: part.vacuum(str(t)), StorageError, False, "holds no kd partition"),
]


@pytest.mark.parametrize(("site", "provoke", "cls", "transient", "message"), STORAGE_SITES,
                         ids=[s[0] for s in STORAGE_SITES])
def test_storage_raise_sites_say_whether_they_can_pass(tmp_path, site, provoke, cls, transient, message):
    e = _raised(lambda: provoke(tmp_path))
    assert type(e) is cls and e.transient is transient and is_transient(e) is transient, (site, type(e), e)
    assert message in str(e), (site, str(e))


@pytest.mark.parametrize(("code", "transient"), [
    (errno.EIO, True), (errno.EAGAIN, True), (errno.ETIMEDOUT, True), (errno.ECONNRESET, True),
    (errno.ENOSPC, False), (errno.EDQUOT, False), (errno.EACCES, False), (errno.EROFS, False),
    (errno.ENOENT, False), (errno.EFBIG, False)])
def test_an_os_error_is_transient_only_when_the_os_says_try_again(code, transient):
    assert transient_os_error(OSError(code, os.strerror(code))) is transient
    assert is_transient(OSError(code, os.strerror(code))) is transient


def test_gcs_status_text_of_pyarrow_is_read():
    """What pyarrow's GCS filesystem raises once its own retries ran out (seen in
    test_kd_retries_a_transient_gcs_fault_and_not_a_permanent_one)."""
    assert transient_os_error(OSError("google::cloud::Status(UNAVAILABLE: Retry policy exhausted ...)"))
    assert not transient_os_error(OSError(errno.EACCES, "google::cloud::Status(PERMISSION_DENIED: ...)"))


def test_other_exceptions_are_not_transient():
    import torch

    with pytest.raises(ValueError) as e:  # what an optimizer raises for a bad setting
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=-1.0)
    assert not is_transient(e.value)
    assert not any(c.transient for c in (KDError, SpecError, DataError, StorageError, LineageError))


# ---------------------------------------------------------------- the pipeline's misused StorageErrors


def _label_shard_with(kd: KD, **meta_update) -> None:
    """Commit D's labels from a shard whose metadata says it was computed otherwise."""
    from kdcore.labels import materialize as mat

    cfg, D = kd.cfg, kd.day(1)
    shard = mat.materialize_shard(cfg, D, 0, 1)
    m = part.read_manifest(shard["uri"])
    part.publish_table(shard["uri"], part.read_table(shard["uri"], manifest=m), {**m.metadata, **meta_update})
    mat.commit(cfg, D, shard["teacher_version"], 1)


def test_pipeline_raise_sites_say_what_they_are(kd: KD):
    """The StorageErrors a retry cannot fix: a parent's model config differs, a distilling
    student has no labels, no examples to bootstrap from, a checkpoint that is absent;
    and the label commit's refusals say what they are (lineage, config)."""
    import datetime as dt

    from kdcore.labels import encoding as enc
    from kdcore.models import registry
    from kdcore.training import steps

    cfg, D = kd.cfg, kd.day(1)
    model = cfg.student("student_aux").model
    refused = cfg.model_copy(update={"students": [
        x.model_copy(update={"model": model.model_copy(update={"lr": model.lr * 2})}) if x.name == "student_aux"
        else x for x in cfg.students]})
    sites = [
        ("steps: parent's model config differs",
         lambda: steps.student_step(refused, "student_aux", D, None, "hard_labels_only"),
         StorageError, "parent's model config differs from the pipeline config"),
        ("steps: distills without labels", lambda: steps.student_step(cfg, "student_aux", D, None),
         StorageError, "distills but no teacher labels were given"),
        ("steps.bootstrap: no examples", lambda: steps.bootstrap(cfg, dt.date(1990, 1, 1)),
         StorageError, "no example partitions on or before 1990-01-01 to bootstrap from"),
        ("registry.find_checkpoint: absent", lambda: registry.find_checkpoint(cfg.root, "movielens", "teacher",
                                                                              dt.date(2031, 1, 1)),
         StorageError, "no checkpoint of 'teacher' trained through 2031-01-01"),
        ("materialize.commit: examples changed", lambda: _label_shard_with(kd, examples_sha256="0" * 64),
         LineageError, "was computed from other examples than the ones published now"),
        ("materialize.commit: another encoding", lambda: _label_shard_with(kd, **{enc.METADATA_KEY: {}}),
         SpecError, "was stored in another label encoding"),
    ]
    for site, provoke, cls, message in sites:
        e = _raised(provoke)
        assert type(e) is cls and e.transient is False and not is_transient(e), (site, type(e), e)
        assert message in str(e), (site, str(e))


# ---------------------------------------------------------------- the DAG's rule


def test_a_task_fails_at_once_unless_the_fault_is_transient(tmp_path, caplog):
    assert _no_retry is no_retry  # one rule for every task of both DAGs
    with pytest.raises(StorageError) as e:  # propagates: Airflow retries it with backoff
        with no_retry("step"):
            sfs.read_bytes("/proc/self/mem")
    assert e.value.transient
    for provoke in (lambda: part.read_manifest(str(tmp_path / "nothing")), lambda: _corrupt_data_file(tmp_path)):
        with pytest.raises(AirflowFailException, match=r"^step: StorageError: .* \(not retried: the inputs will "
                                                        r"not change\)$"):
            with no_retry("step"):
                provoke()
    # a lost commit race fails at once: a re-run would replace the winner's output
    with pytest.raises(AirflowFailException, match=r"^step: ConflictError: .*another writer published"):
        with no_retry("step"):
            _lost_race(tmp_path)

    import torch

    caplog.set_level(logging.ERROR, logger="operators.faults")
    with pytest.raises(AirflowFailException, match=r"^train: ValueError: Invalid learning rate: -1.0 \(not retried"):
        with no_retry("train"):
            torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=-1.0)
    logged, = [r for r in caplog.records if r.name == "operators.faults"]
    assert logged.exc_info and logged.exc_info[0] is ValueError  # the traceback is in the task log
    with pytest.raises(AirflowSkipException):  # Airflow's own exceptions pass untouched
        with no_retry("step"):
            raise AirflowSkipException("nothing to do")


def test_teacher_search_tasks_use_the_same_rule():
    import ast

    tree = ast.parse((REPO / "operators" / "teacher_search.py").read_text())
    wrapped = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
               for w in ast.walk(f) if isinstance(w, ast.With)
               and any(isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "no_retry"
                       for i in w.items)}
    assert {"setup", "plan_rung", "train_candidate", "close_rung", "report"} <= wrapped


# ---------------------------------------------------------------- the command line's rule


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def test_kd_retries_a_transient_gcs_fault_and_not_a_permanent_one(fault_gcs):
    """``kd vacuum`` lists the root through pyarrow's GCS filesystem. A 503 that outlasts
    pyarrow's own retries is a transient fault: with KD_RETRIES=0 it ends as one line and
    exit 2 after one attempt; by default kd logs one retry line, and once the fault is gone
    the retry succeeds. A 403 is not transient: exit 2 at once, no retry."""
    root = f"gs://{fault_gcs.bucket}/faults/{uuid.uuid4().hex}"
    part.publish_table(f"{root}/date=2024-01-01", pa.table({"id": pa.array(range(5), pa.int64())}))
    args = [sys.executable, "-m", "kdcore.cli", "vacuum", "--root", root, "--dry-run"]
    listing = r"/storage/v1/b/[^/]+/o\?prefix="

    denied = fault_gcs.proxy.fail(method="GET", path_regex=listing, status=403, times=None)
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert denied.fired >= 1
    denied.remove()
    assert proc.returncode == 2 and "kd: retry" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line
    assert "cannot list" in proc.stderr and "PERMISSION_DENIED" in proc.stderr

    fault_gcs.proxy.fail(method="GET", path_regex=listing, status=503, times=None)
    try:
        proc = subprocess.run(args, env=_env(KD_RETRIES="0"), capture_output=True, text=True, timeout=120,
                              cwd=str(REPO))
        assert proc.returncode == 2 and "kd: retry" not in proc.stderr, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"kd: error: {root}: cannot list (") and "UNAVAILABLE" in last, last

        run = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=str(REPO))
        try:
            assert run.stderr is not None
            first = run.stderr.readline()  # after the first attempt gave up
            fault_gcs.proxy.clear()  # the fault passes during the 1 s backoff
            out, rest = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    finally:
        fault_gcs.proxy.clear()
    assert first.startswith(f"kd: retry 1/2 in 1 s after a transient fault: {root}: cannot list ("), first
    assert run.returncode == 0 and rest == "", (first, rest)
    assert "Traceback" not in first + rest


def test_a_bad_kd_retries_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdcore.cli", "vacuum", "--root", str(tmp_path)],
                          env=_env(KD_RETRIES="three"), capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 2
    assert proc.stderr == "kd: error: KD_RETRIES must be a whole number of retries (0 or more), got 'three'\n"

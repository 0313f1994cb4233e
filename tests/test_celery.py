"""kd_daily beyond one machine: CeleryExecutor, a PostgreSQL metadata DB, a Redis broker,
two Celery workers and gs:// storage on the GCS emulator (docs/deployment.md).

The test starts PostgreSQL and Redis itself (Debian packages, ``make celery-deps``) on
loopback, on free ports, in temporary directories, and stops them at the end. It publishes
MovieLens and bootstraps the tiny config on a local root, copies that root to ``gs://`` for
the Celery deployment and keeps a local copy for the reference: ``kd run`` (the CLI, no
Airflow) on the same date. What must hold:

* the run succeeds, and the label shards (``materialize_labels``) and the students
  (``train_student``) ran on both workers (each task instance's ``hostname``);
* labels and checkpoints are the same bytes as the reference's: every label Parquet file's
  sha256 from the manifests, every checkpoint blob but meta.json, and meta.json without its
  ``train_seconds`` (a wall-clock measure).

It prints each task's worker and duration (the figures in docs/deployment.md)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.airflow_env import celery_env
from tests.airflow_helpers import (
    BOOTSTRAP_DAYS,
    DAG_ID,
    REPO,
    TINY,
    Api,
    Component,
    free_port,
    init_airflow,
    prepare_store,
    run_outputs,
    running,
    wait_until,
)
from tests.faultproxy import stop_process

pytestmark = pytest.mark.celery
WORKERS = ("worker-a", "worker-b")
DEPS = "run `make celery-deps` (apt-get install postgresql redis-server)"


# ---------------------------------------------------------------- services


def _postgres_bin() -> Path:
    """Debian keeps the server binaries out of PATH, under /usr/lib/postgresql/<version>/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        pytest.fail(f"PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: {DEPS}")
    return found[-1].parent


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as the 'postgres' user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"{what} exited {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-2000:]}")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port> (trust auth, no fsync: test
    data only), its socket and data in a temporary directory owned by the server's user (a
    pytest tmp_path is private to root). Yields the SQLAlchemy URL of database 'airflow'."""
    pg = _postgres_bin()
    base = Path(tempfile.mkdtemp(prefix="kd-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
    data, port = base / "data", free_port()
    try:
        _run(_as_postgres([str(pg / "initdb"), "-D", str(data), "-U", "airflow", "-A", "trust", "-E", "UTF8",
                           "--no-sync"]), "initdb")
        opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off -c max_connections=200")
        _run(_as_postgres([str(pg / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"), "-w", "-t", "120",
                           "-o", opts, "start"]), "pg_ctl start")
        try:
            _run(_as_postgres([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "airflow", "airflow"]),
                 "createdb")
            yield f"postgresql+psycopg2://airflow@127.0.0.1:{port}/airflow"
        finally:
            _run(_as_postgres([str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]), "pg_ctl stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A Redis on 127.0.0.1:<free port> with no persistence. Yields the broker URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail(f"redis-server not found on PATH: {DEPS}")
    port = free_port()
    with open(workdir / "redis.log", "wb") as log:
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(workdir)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until("redis PING", lambda: proc.poll() is None and _redis_ping(port), 30, interval=0.2)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


# ---------------------------------------------------------------- data


def _copy_to_gcs(local: Path, root: str) -> None:
    """The bootstrapped store, byte for byte, under a gs:// root (manifests name files relative
    to their partition, so a copied root is a valid root)."""
    import pyarrow.fs as pafs

    from kdcore.storage import fs as sfs

    dst, path = sfs.resolve(root)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dst,
                    use_threads=True)


# ---------------------------------------------------------------- the run


def _tis(api: Api, run_id: str) -> list[dict]:
    return api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]


def _timeline(tis: list[dict]) -> str:
    """One line per task instance: worker, queued -> start wait, run duration (seconds)."""
    def ts(s: str | None) -> dt.datetime | None:
        return dt.datetime.fromisoformat(s) if s else None

    t0 = min(ts(t["start_date"]) for t in tis if t["start_date"])
    lines = [f"{'task':<34} {'worker':<10} {'start':>6} {'wait':>6} {'run':>6}"]
    for t in sorted(tis, key=lambda t: t["start_date"] or "~"):
        start, queued = ts(t["start_date"]), ts(t.get("queued_when"))
        name = t["task_id"] + (f"[{t['rendered_map_index'] or t['map_index']}]" if t["map_index"] >= 0 else "")
        lines.append(f"{name:<34} {t.get('hostname') or '-':<10} "
                     f"{(start - t0).total_seconds() if start else float('nan'):>6.1f} "
                     f"{(start - queued).total_seconds() if start and queued else float('nan'):>6.1f} "
                     f"{t.get('duration') or 0:>6.1f}  {t['state']}")
    return "\n".join(lines)


def test_kd_daily_on_celery_two_workers_gcs(tmp_path: Path, gcs_emulator: str) -> None:
    t_start = time.monotonic()
    local, ref = tmp_path / "store", tmp_path / "reference"
    days = prepare_store(local)
    day = days[BOOTSTRAP_DAYS]
    shutil.copytree(local, ref)
    root = f"gs://{gcs_emulator}/celery-{uuid.uuid4().hex[:8]}"
    _copy_to_gcs(local, root)
    phases = {"data (publish, bootstrap, copy to gs://)": time.monotonic() - t_start}
    logdir = tmp_path / "logs"
    logdir.mkdir()
    # the reference: the CLI, no Airflow, same inputs; runs while the deployment starts
    ref_env = {**os.environ, "KD_STORAGE_ROOT": str(ref),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ref_log = open(logdir / "reference.log", "wb")  # noqa: SIM115  (closed below)
    reference = subprocess.Popen([sys.executable, "-m", "kdcore.cli", "run", "--config", str(TINY), "--from",
                                  day.isoformat(), "--to", day.isoformat(), "--quiet"], env=ref_env, cwd=REPO,
                                 stdout=ref_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    comps: list[Component] = []
    try:
        # the components stop first (running's exit), then Redis and PostgreSQL
        with postgres_server() as db, redis_server(tmp_path) as broker, running(comps) as codes:
            port = free_port()
            env = celery_env(tmp_path / "airflow", root, TINY, sql_alchemy_conn=db, broker_url=broker,
                             api_port=port, KD_SENSOR_TIMEOUT_SECONDS="1")
            init_airflow(env)
            comps += [Component("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port)], env, logdir),
                      Component("scheduler", ["scheduler"], env, logdir),
                      Component("dag-processor", ["dag-processor"], env, logdir)]
            for name in WORKERS:  # one task at a time each: two tasks at once land on two workers
                wenv = {**env, "KD_WORKER_HOSTNAME": name,
                        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}
                comps.append(Component(name, ["celery", "worker", "--concurrency", "1", "--celery-hostname",
                                              f"{name}@%h", "--pid", str(logdir / f"{name}.pid")], wenv, logdir))
            api = Api(port, tmp_path / "airflow")
            wait_until("API server health", api.healthy, 180, components=comps)
            api.login()
            for w in comps[3:]:
                wait_until(f"{w.name} ready", lambda w=w: " ready." in w.tail(20000), 180, components=comps)
            wait_until("kd_daily parsed", lambda: api("GET", f"/dags/{DAG_ID}"), 120, components=comps)
            phases["services up (postgres, redis, migrate, airflow, workers)"] = time.monotonic() - t_start - sum(
                phases.values())
            run = api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"date": day.isoformat()}})
            api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
            rid = run["dag_run_id"]
            t_run = time.monotonic()
            run = wait_until("the Celery run", lambda: (r := api("GET", f"/dags/{DAG_ID}/dagRuns/{rid}"))["state"]
                             in ("success", "failed") and r, 240, interval=2, components=comps,
                             progress=lambda: sorted((t["task_id"], t["map_index"], t["state"] or "")
                                                     for t in _tis(api, rid)))
            run_seconds = phases["the run (trigger to done)"] = time.monotonic() - t_run
            tis = _tis(api, rid)
            print(f"\nkd_daily {day} on Celery ({run_seconds:.0f} s from trigger to done):\n{_timeline(tis)}")
            assert run["state"] == "success", {(t["task_id"], t["map_index"]): t["state"] for t in tis}
            for task in ("materialize_labels", "train_student"):
                hosts = {t["hostname"] for t in tis if t["task_id"] == task}
                assert hosts == set(WORKERS), f"{task} ran on {hosts}, expected both workers {WORKERS}"
        assert all(not c.alive() for c in comps), codes
    finally:
        try:
            reference.wait(timeout=600)
        finally:
            ref_log.close()
    assert reference.returncode == 0, (logdir / "reference.log").read_text(errors="replace")[-4000:]
    celery_out, cli_out = run_outputs(root, TINY, day), run_outputs(str(ref), TINY, day)
    assert len(celery_out["labels"]) >= 2, celery_out["labels"]  # tiny.yaml: labels.shards = 2
    assert celery_out == cli_out
    phases["stop, reference wait, compare"] = time.monotonic() - t_start - sum(phases.values())
    print("".join(f"{k}: {v:.0f} s\n" for k, v in phases.items()) + f"celery test: {time.monotonic() - t_start:.0f} s in all")

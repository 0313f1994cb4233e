"""Helpers for the Airflow tests (test_dag_integrity, test_dag_run, test_airflow_integration).

Airflow reads its configuration when first imported, so every Airflow process here is a
subprocess started with an explicit environment (a private AIRFLOW_HOME with SQLite,
LocalExecutor, this repo's dags/ and plugins/, no examples): the pytest process itself
never imports Airflow's settings with the wrong home.

Also runnable as a script (used by test_dag_run in a subprocess):
``python tests/airflow_helpers.py dag-test DATE [DATE ...]`` runs ``dag.test()`` of
kd_daily for each date in order (conf {"date": DATE}) and prints one JSON line per run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from scripts.airflow_env import airflow_env as _airflow_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = REPO / "tests" / "configs" / "tiny.yaml"
DAG_ID = "kd_daily"
POOL = "kd_training"
BOOTSTRAP_DAYS = 10  # tests/configs/tiny.yaml: bootstrap.days


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- data


def prepare_store(root: Path, config: Path = TINY) -> list[dt.date]:
    """Publish MovieLens-100K under ``root`` (the wheel is downloaded once and cached) and
    bootstrap the config on its first BOOTSTRAP_DAYS days. Returns every published day;
    the daily loop starts at ``days[BOOTSTRAP_DAYS]``."""
    os.environ["KD_STORAGE_ROOT"] = str(root)  # read by cfg.root
    try:
        from kdcore.config import load_pipeline
        from kdcore.data import movielens
        from kdcore.data.examples import list_days
        from kdcore.training.steps import bootstrap

        movielens.publish(str(root))
        cfg = load_pipeline(config)
        days = list_days(cfg.root, cfg.spec.name)
        bootstrap(cfg, days[BOOTSTRAP_DAYS - 1])
    finally:
        del os.environ["KD_STORAGE_ROOT"]
    return days


def sha_tree(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative names), to compare outputs byte for byte."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_outputs(root: str, config: Path, day: dt.date) -> dict[str, Any]:
    """The bytes the run for ``day`` produced under ``root`` (local or gs://), as digests:
    each label file's sha256 (from the labels' manifest), and per model each checkpoint
    blob's sha256 but meta.json's, and meta.json itself without ``train_seconds``. Two
    executions of the same day (CLI, LocalExecutor, Celery) must give equal results."""
    from kdcore.config import load_pipeline
    from kdcore.models import registry
    from kdcore.pipeline import find_labels
    from kdcore.storage.partition import read_manifest

    old = os.environ.get("KD_STORAGE_ROOT")
    os.environ["KD_STORAGE_ROOT"] = root  # read by cfg.root
    try:
        cfg = load_pipeline(config)
        ds = cfg.spec.name
        out: dict[str, Any] = {"labels": {f.name: f.sha256 for f in read_manifest(find_labels(cfg, day)).files}}
        for name in [cfg.teacher.name, *[s.name for s in cfg.all_students()]]:
            ck = registry.find_checkpoint(cfg.root, ds, name, day)
            out[name] = {"blobs": {f.name: f.sha256 for f in read_manifest(ck.uri).files
                                   if f.name != registry.META},
                         "meta": {k: v for k, v in ck.meta.items() if k != "train_seconds"}}
        return out
    finally:
        if old is None:
            del os.environ["KD_STORAGE_ROOT"]
        else:
            os.environ["KD_STORAGE_ROOT"] = old


def mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- airflow env


def airflow_env(home: Path, store: Path, config: Path = TINY, api_port: int | None = None,
                parallelism: int = 4, **extra: str) -> dict[str, str]:
    """The demo's Airflow environment, pointed at ``store`` with ``config``."""
    return _airflow_env(home, store, config, api_port=api_port or 8080, parallelism=parallelism, **extra)


def airflow(args: list[str], env: Mapping[str, str], timeout: float = 300, check: bool = True
            ) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "airflow"), *args], env=dict(env), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"airflow {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def init_airflow(env: Mapping[str, str], pool_slots: int = 2) -> None:
    """Migrate the metadata DB (writes airflow.cfg with shared secrets) and create the pool."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    airflow(["db", "migrate"], env)
    airflow(["pools", "set", POOL, str(pool_slots), "KD training (teacher + students)"], env)


def create_backfill(env: Mapping[str, str], first: dt.date, last: dt.date, attempts: int = 10) -> str:
    """``airflow backfill create`` for the partitions first..last, one run at a time.
    Retried while SQLite is locked by the scheduler (the embedded default has one writer)."""
    args = ["backfill", "create", "--dag-id", DAG_ID, "--from-date", first.isoformat(),
            "--to-date", last.isoformat(), "--max-active-runs", "1"]
    for attempt in range(attempts):
        proc = airflow(args, env, timeout=120, check=False)
        if proc.returncode == 0:
            return proc.stdout
        if "database is locked" not in proc.stdout + proc.stderr or attempt == attempts - 1:
            raise AssertionError(f"airflow {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        time.sleep(3)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- processes


class Component:
    """One Airflow component in its own process group, output to a log file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], logdir: Path):
        self.name = name
        self.log = logdir / f"{name}.log"
        self._out = open(self.log, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen([str(BIN / "airflow"), *args], env=dict(env), cwd=REPO,
                                     stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL what is left. Returns the exit code."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # children (task runners, gunicorn workers) of a group whose leader exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._out.close()
        return self.proc.returncode

    def tail(self, n: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextlib.contextmanager
def running(comps: list[Component]) -> Iterator[dict[str, int | None]]:
    """Airflow components for the length of a block (``comps`` may still grow inside it): on
    any failure each one's log tail is printed, since the reason is usually there, and all are
    stopped whatever happens; the yielded dict then holds their exit codes."""
    codes: dict[str, int | None] = {}
    try:
        yield codes
    except BaseException:
        for c in comps:
            print(f"===== {c.name} log (tail) =====\n{c.tail()}")
        raise
    finally:
        codes.update({c.name: c.stop() for c in comps})


def http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 10) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {url} -> {e.code}: {e.read()[:2000]!r}") from None
    return json.loads(raw) if raw else None


def wait_until(what: str, fn, timeout: float, interval: float = 1.0, components=(), progress=None,
               ceiling: float = 3600.0) -> Any:
    """Poll ``fn`` until it returns something truthy. Without ``progress``, ``timeout`` is a
    plain deadline. With it, ``timeout`` is how long nothing may move: each change of
    ``progress()`` (e.g. the task-instance states) restarts the clock, so a loaded machine
    that is slow but working does not fail the test; ``ceiling`` bounds the whole wait."""
    start = time.monotonic()
    deadline = start + timeout
    last: Any = None
    seen: Any = None
    while time.monotonic() < min(deadline, start + ceiling):
        for c in components:
            if not c.alive():
                raise AssertionError(f"{c.name} exited ({c.proc.returncode}) while waiting for {what}")
        try:
            last = fn()
            if last:
                return last
            if progress is not None and (now := progress()) != seen:
                seen, deadline = now, time.monotonic() + timeout
        except (AssertionError, OSError) as e:
            last = e
        time.sleep(interval)
    stalled = f"no progress for {timeout:.0f} s" if progress is not None else f"timed out after {timeout:.0f} s"
    raise AssertionError(f"{stalled} waiting for {what} ({time.monotonic() - start:.0f} s in all); last: {last!r}")


class Api:
    """REST client of the API server, authenticated as the generated admin user."""

    def __init__(self, port: int, home: Path):
        self.base = f"http://127.0.0.1:{port}"
        self.home = home
        self.token: str | None = None

    def healthy(self) -> bool:
        h = http("GET", f"{self.base}/api/v2/monitor/health")
        return all(h.get(k, {}).get("status") == "healthy" for k in ("metadatabase", "scheduler"))

    def login(self) -> None:
        pw_file = self.home / "simple_auth_manager_passwords.json.generated"
        password = json.loads(pw_file.read_text())["admin"]
        self.token = http("POST", f"{self.base}/auth/token",
                          {"username": "admin", "password": password})["access_token"]

    def __call__(self, method: str, path: str, body: Any = None) -> Any:
        return http(method, f"{self.base}/api/v2{path}", body, self.token)


# ---------------------------------------------------------------- dag.test runner (subprocess)


def _dag_test(dates: list[str]) -> int:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "kd_daily.py"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags[DAG_ID]
    rc = 0
    for d in dates:
        start = time.monotonic()
        # like `airflow dags test`: a manual run at "now"; the partition date comes from conf
        run = dag.test(logical_date=dt.datetime.now(dt.UTC), run_conf={"date": d})
        if not run.get_task_instances():
            raise AssertionError(f"dag.test for {d} created no task instances")
        states = {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in run.get_task_instances()}
        print("DAGTEST " + json.dumps({"date": d, "state": str(run.state), "run_id": run.run_id,
                                       "seconds": round(time.monotonic() - start, 1), "tasks": states}),
              flush=True)
        rc |= str(run.state) != "success"
    return rc


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "dag-test":
        sys.exit(_dag_test(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)

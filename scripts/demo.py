"""`make demo`: the daily KD pipeline on MovieLens-100K through the REAL kd_daily DAG.

1. publish MovieLens into the demo root (`kd data movielens`), bootstrap the teacher and
   students on history (`kd bootstrap --through <day before the first demo date>`);
2. start an embedded-default Airflow (SQLite, LocalExecutor, AIRFLOW_HOME=var/airflow,
   dags/ and plugins/ of this repo, no examples, low parallelism) as separate processes:
   API server, scheduler, DAG processor; create the `kd_training` pool;
3. unpause kd_daily and `airflow backfill create --max-active-runs 1` over the demo dates,
   wait for every run, stop every component;
4. print the report (`kd report`).

Environment: DEMO_ROOT (var/demo), DEMO_FROM (1998-02-17), DEMO_DAYS (5), DEMO_PORT (free).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = REPO / "configs" / "demo.yaml"
sys.path.insert(0, str(REPO))
from scripts.airflow_env import airflow_env as _airflow_env  # noqa: E402

DAG_ID = "kd_daily"


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def airflow_env(home: Path, root: Path, port: int) -> dict[str, str]:
    return _airflow_env(home, root, CONFIG, api_port=port, retry_delay_seconds=5, sensor_poke_seconds=10,
                        sensor_timeout_seconds=30)


def run(cmd: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> str:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if not quiet and proc.stdout.strip():
        print(proc.stdout.strip()[-2000:], flush=True)
    return proc.stdout


def http(method: str, url: str, body=None, token: str | None = None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, method=method,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def wait(what: str, fn, timeout: float, procs, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {what}")
        try:
            if result := fn():
                return result
        except OSError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"timed out waiting for {what}")


def stop(procs) -> None:
    for _name, p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for name, p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log(f"{name} did not stop in 30 s: killing it")
        try:
            os.killpg(p.pid, signal.SIGKILL)  # leftovers of the group (task runners)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
        log(f"{name} stopped ({p.returncode})")


def main() -> int:
    t0 = time.monotonic()
    root = (REPO / os.environ.get("DEMO_ROOT", "var/demo")).resolve()
    home = REPO / "var" / "airflow"
    first = dt.date.fromisoformat(os.environ.get("DEMO_FROM", "1998-02-17"))
    n_days = int(os.environ.get("DEMO_DAYS", "5"))
    kd = str(BIN / "kd")
    kd_env = {**os.environ, "KD_STORAGE_ROOT": str(root)}

    run([kd, "data", "movielens", "--root", str(root)], kd_env)
    sys.path.insert(0, str(REPO))
    from kdcore.data.examples import list_days

    days = [d for d in list_days(str(root), "movielens") if d >= first][:n_days]
    history = [d for d in list_days(str(root), "movielens") if d < first]
    run([kd, "bootstrap", "--config", str(CONFIG), "--through", history[-1].isoformat()], kd_env, quiet=True)
    log(f"bootstrapped through {history[-1]}; running kd_daily for {days[0]} .. {days[-1]} ({len(days)} days)")

    port = int(os.environ.get("DEMO_PORT") or free_port())
    env = airflow_env(home, root, port)
    home.mkdir(parents=True, exist_ok=True)
    af = str(BIN / "airflow")
    run([af, "db", "migrate"], env, quiet=True)
    run([af, "pools", "set", "kd_training", "2", "KD training (teacher + students)"], env, quiet=True)
    logs = home / "demo-logs"
    logs.mkdir(exist_ok=True)
    procs = []
    for name, args in (("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port)]),
                       ("scheduler", ["scheduler"]), ("dag-processor", ["dag-processor"])):
        out = open(logs / f"{name}.log", "wb")  # noqa: SIM115
        procs.append((name, subprocess.Popen([af, *args], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)))
    log(f"Airflow components started (logs in {logs}); API on http://127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    ok = False
    try:
        wait("API server health", lambda: http("GET", f"{base}/api/v2/monitor/health")["scheduler"]["status"]
             == "healthy", 180, procs)
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        token = http("POST", f"{base}/auth/token", {"username": "admin", "password": password})["access_token"]

        def api(method, path, body=None):
            return http(method, f"{base}/api/v2{path}", body, token)

        wait("kd_daily to be parsed", lambda: api("GET", f"/dags/{DAG_ID}"), 120, procs)
        # Create the backfill while the DAG is still paused (fewer concurrent SQLite writers),
        # retried on "database is locked" (SQLite raises it at once on a lock upgrade), then unpause.
        backfill = [af, "backfill", "create", "--dag-id", DAG_ID, "--from-date", days[0].isoformat(),
                    "--to-date", days[-1].isoformat(), "--max-active-runs", "1"]
        for attempt in range(10):
            log("$ " + " ".join(backfill))
            proc = subprocess.run(backfill, env=env, cwd=REPO, capture_output=True, text=True)
            if proc.returncode == 0:
                break
            if "database is locked" not in proc.stdout + proc.stderr or attempt == 9:
                raise RuntimeError(f"backfill create failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            log("SQLite busy; retrying")
            time.sleep(3)
        api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
        seen: set[str] = set()

        def progress():
            runs = api("GET", f"/dags/{DAG_ID}/dagRuns?run_type=backfill&limit=100")["dag_runs"]
            for r in sorted(runs, key=lambda r: r["data_interval_start"]):
                if r["state"] in ("success", "failed") and r["dag_run_id"] not in seen:
                    seen.add(r["dag_run_id"])
                    log(f"{r['data_interval_start'][:10]}: {r['state']}")
            return len(runs) == len(days) and all(r["state"] in ("success", "failed") for r in runs) and runs

        runs = wait("the backfill", progress, 60 * 60, procs, interval=5)
        failed = [r["data_interval_start"][:10] for r in runs if r["state"] != "success"]
        ok = not failed
        if failed:
            log(f"FAILED dates: {failed}; task logs under {home / 'logs'}")
    finally:
        stop(procs)
    if not ok:
        return 1
    print(run([kd, "report", "--config", str(CONFIG)], kd_env, quiet=True), flush=True)
    log(f"demo done in {time.monotonic() - t0:.0f} s; `make ui` to browse the runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark (not a test): one day at scale through the real kd_daily DAG, task by task.

Takes a root prepared by ``bench/bench_day.py --keep-bootstrap DIR`` (D0 and D1 published
with ``kd data synth``, the demo recipe bootstrapped on D0), copies it, and runs D1 as an
ad hoc kd_daily run in a real embedded-default Airflow (SQLite, LocalExecutor with the
forkserver preload, scheduler + DAG processor + API server), with the labels split into
``--shards`` mapped tasks and ``--workers`` task slots (``[core] parallelism`` and the
``kd_training`` pool). It prints, per task instance, its start offset, duration and peak
RSS (the ``peak RSS`` line each kd task logs), and per stage its wall time; for the label
shards and the students, the work summed over tasks against the stage's wall time, which
is how the time divides over workers, and what the stage would take with more of them.

With ``--compare STORE`` it also checks that the DAG wrote the same bytes as the CLI run
of the same day in STORE (``bench_day.py --keep-result DIR``: DIR/store): the teacher
checkpoint, every label file and every student's checkpoint.

Run (10M rows: about an hour for each command on 2 cores):
  .venv/bin/python bench/bench_day.py --rows 10000000 --shards 4 --keep-bootstrap /tmp/kd10m
  .venv/bin/python bench/bench_dag_day.py --root /tmp/kd10m --shards 4 --workers 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_day import D1, day_config  # noqa: E402

from scripts.airflow_env import airflow_env  # noqa: E402
from tests.airflow_helpers import (  # noqa: E402
    DAG_ID,
    Api,
    Component,
    free_port,
    init_airflow,
    run_outputs,
    running,
    wait_until,
)

STAGE_OF = {"refresh_teacher": "teacher refresh", "materialize_labels": "labels", "commit_labels": "labels",
            "quality_gate": "gate", "train_student": "students", "report": "report"}
RSS = re.compile(r"peak RSS (\d+) MB")


def _ts(value: str | None) -> float | None:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def _peak_rss(home: Path, run_id: str, ti: dict) -> float | None:
    """The ``peak RSS`` a kd task logs when its body finishes (operators/kd_daily._task_body)."""
    folder = home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={ti['task_id']}"
    if ti["map_index"] >= 0:
        folder = folder / f"map_index={ti['map_index']}"
    found = [float(m.group(1)) for p in folder.glob("attempt=*.log") for m in RSS.finditer(p.read_text())]
    return max(found) if found else None


def _run_day(work: Path, shards: int, workers: int, timeout: float) -> tuple[list[dict], dict, Path]:
    store = work / "store"
    cfg = day_config(work, shards)
    home = work / "airflow"
    port = free_port()
    env = airflow_env(home, store, cfg, api_port=port, parallelism=workers, sensor_timeout_seconds=120)
    init_airflow(env, pool_slots=workers)
    logs = home / "component-logs"
    logs.mkdir()
    parts = [Component(name, args, env, logs) for name, args in (
        ("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port)]),
        ("scheduler", ["scheduler"]), ("dag-processor", ["dag-processor"]))]
    api = Api(port, home)
    with running(parts):
        wait_until("API server health", api.healthy, 300, components=parts)
        api.login()
        wait_until("kd_daily to be parsed", lambda: api("GET", f"/dags/{DAG_ID}"), 300, components=parts)
        api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
        run = api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"date": D1.isoformat()}})
        run_id = run["dag_run_id"]
        print(f"bench_dag_day: triggered {run_id} for {D1} ({shards} shards, {workers} workers)", flush=True)

        def tis() -> list[dict]:
            return api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=200")["task_instances"]

        def states() -> tuple:
            return tuple(sorted((t["task_id"], t["map_index"], t["state"]) for t in tis()))

        def done() -> dict | None:
            r = api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
            return r if r["state"] in ("success", "failed") else None

        last: tuple = ()

        def progress() -> tuple:
            nonlocal last
            now = states()
            for task_id, index, state in sorted(set(now) - set(last)):
                if state in ("running", "success", "failed", "up_for_retry", "skipped"):
                    print(f"  {time.strftime('%H:%M:%S')} {task_id}[{index}] {state}", flush=True)
            last = now
            return now

        final = wait_until("the run", done, timeout, interval=5, components=parts, progress=progress,
                           ceiling=6 * 3600)
        return tis(), final, home


def _summarize(tis: list[dict], run: dict, home: Path, workers: int) -> dict:
    rows = []
    for t in tis:
        start, end = _ts(t.get("start_date")), _ts(t.get("end_date"))
        if start is None or end is None:
            continue
        rows.append({"task": t["task_id"] + (f"[{t['map_index']}]" if t["map_index"] >= 0 else ""),
                     "label": t.get("rendered_map_index") or "", "state": t["state"], "start": start, "end": end,
                     "seconds": end - start, "rss_mb": _peak_rss(home, run["dag_run_id"], t),
                     "stage": STAGE_OF.get(t["task_id"], "bookkeeping"), "hostname": t.get("hostname")})
    t0 = _ts(run["start_date"])
    wall = _ts(run["end_date"]) - t0
    stages = {}
    for stage in ("teacher refresh", "labels", "gate", "students", "report", "bookkeeping"):
        mine = [r for r in rows if r["stage"] == stage]
        if mine:
            stages[stage] = {"wall": max(r["end"] for r in mine) - min(r["start"] for r in mine),
                             "work": sum(r["seconds"] for r in mine), "tasks": len(mine),
                             "peak_rss_mb": max((r["rss_mb"] or 0) for r in mine)}
    return {"run_id": run["dag_run_id"], "state": run["state"], "wall": wall, "workers": workers,
            "tasks": [{**r, "start": r["start"] - t0, "end": r["end"] - t0} for r in rows], "stages": stages}


def _print(s: dict) -> None:
    print(f"bench_dag_day: run {s['run_id']} {s['state']} in {s['wall']:.0f} s wall, {s['workers']} worker slot(s)")
    for r in sorted(s["tasks"], key=lambda r: r["start"]):
        rss = f"{r['rss_mb']:6.0f} MB" if r["rss_mb"] else "     - "
        print(f"  {r['task']:<24} {r['label'][:26]:<26} +{r['start']:7.0f} s {r['seconds']:8.1f} s  peak RSS {rss}"
              f"  {r['state']}")
    print("  stage             wall      work (sum of tasks)  tasks  peak RSS")
    for name, st in s["stages"].items():
        wall = "      -  " if name == "bookkeeping" else f"{st['wall']:7.0f} s"
        rss = f"{st['peak_rss_mb']:6.0f} MB" if st["peak_rss_mb"] else "     - "
        print(f"  {name:<16} {wall}  {st['work']:8.0f} s  {st['tasks']:10d}  {rss}")
    on_path = sum(st["wall"] for name, st in s["stages"].items() if name != "bookkeeping")
    print(f"  the stages' walls add up to {on_path:.0f} s of the run's {s['wall']:.0f} s; the rest "
          f"({s['wall'] - on_path:.0f} s) is scheduling between tasks and the bookkeeping tasks "
          "(resolve, sensor and validation, choose_teacher, commit)")
    for what, prefix, stage in (("label shards", "materialize_labels", "labels"),
                                ("students", "train_student", "students")):
        mapped = [r for r in s["tasks"] if r["task"].startswith(prefix)]
        if not mapped:
            continue
        k, per = len(mapped), sum(r["seconds"] for r in mapped) / len(mapped)
        print(f"  {what}: {k} x {per:.0f} s mean, {s['stages'][stage]['wall']:.0f} s of wall on {s['workers']} "
              f"worker slot(s); with W slots about ceil({k}/W) x {per:.0f} s: "
              + ", ".join(f"W={w}: {math.ceil(k / w) * per:.0f} s" for w in (1, 2, 4, 8) if w <= k))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="a bench_day.py --keep-bootstrap DIR")
    ap.add_argument("--shards", type=int, default=4, help="label shards (mapped materialize_labels tasks)")
    ap.add_argument("--workers", type=int, default=2, help="task slots: [core] parallelism and the kd_training pool")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds the run may go without any task changing")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--compare", default=None, metavar="STORE",
                    help="the store of a CLI run of the same day (bench_day.py --keep-result DIR: DIR/store)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep the run's root (store + Airflow home) in DIR")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kd-bench-dag-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shutil.copytree(Path(args.root) / "store", work / "store")
        tis, run, home = _run_day(work, args.shards, args.workers, args.timeout)
        summary = _summarize(tis, run, home, args.workers)
        if args.compare:
            cfg = work / "pipeline.yaml"
            dag_out, cli_out = run_outputs(str(work / "store"), cfg, D1), run_outputs(args.compare, cfg, D1)
            summary["same_bytes_as_cli"] = {k: dag_out[k] == cli_out.get(k) for k in dag_out}
    _print(summary)
    if "same_bytes_as_cli" in summary:
        same = summary["same_bytes_as_cli"]
        print(f"  same bytes as the CLI run ({args.compare}): " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                                             for k, v in same.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if summary["state"] == "success" and all(summary.get("same_bytes_as_cli", {}).values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

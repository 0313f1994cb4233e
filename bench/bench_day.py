"""Benchmark (not a test): one whole daily run at scale, stage by stage, wall time and peak memory.

Publishes a small bootstrap day D0 and a synthetic day D1 of ``--rows`` rows (default
1,000,000) to a temporary root, bootstraps the demo recipe (configs/demo.yaml: one
teacher, three students and their control, on the synthetic dataset configs/synth.yaml)
on D0, then runs D1 the way the DAG does, each stage in its own process as an Airflow task
would be (so each pays its imports, and its peak RSS is its own):

    teacher refresh -> labels (all shards) -> gate -> each student/control -> report

and prints one line per stage: wall seconds, share of the day, peak RSS (VmHWM) in MB.
Run it at several sizes to see whether memory stays flat (``--rows 4000000``...).

Run: .venv/bin/python bench/bench_day.py [--rows N] [--boot-rows N] [--shards K] [--only labels,gate,...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
D0, D1 = dt.date(2026, 1, 1), dt.date(2026, 1, 2)


def _child(argv: list[str]) -> int:
    """Run one ``kd`` command in this process, then report its peak RSS (VmHWM)."""
    from kdcore import cli
    from kdcore.sysinfo import peak_rss_mb

    rc = cli.main(argv)
    print("BENCH " + json.dumps({"rc": rc, "rss_mb": peak_rss_mb()}), flush=True)
    return rc


def _stage(name: str, argv: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"stage {name} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result = {"stage": name, "seconds": wall, **json.loads(line[6:])}
    print(f"  ({time.strftime('%H:%M:%S')} {name}: {wall:.1f} s, peak RSS {result['rss_mb']:.0f} MB)", flush=True)
    return result


def day_config(root: Path, shards: int) -> Path:
    """configs/demo.yaml on the synthetic dataset under ``root``: the demo's models and policies."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["dataset"] = str(REPO / "configs" / "synth.yaml")
    cfg["storage_root"] = str(root / "store")
    cfg["bootstrap"] = {"days": 1, "epochs": 1}
    cfg["labels"] = {**cfg.get("labels", {}), "shards": shards}
    cfg["gate"] = {**cfg.get("gate", {}), "ignore_features": ["user_id", "item_id"]}
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _publish(root: Path, rows: int, boot_rows: int) -> list[dict]:
    """Publish D0 and D1 with ``kd data synth`` (a timed stage each: the generator streams)."""
    synth_cfg = root / "synth.yaml"
    synth_cfg.write_text(yaml.safe_dump({"start_date": D0.isoformat()}))
    return [_stage(f"kd data synth {day}", ["data", "synth", "--root", str(root / "store"), "--from", day.isoformat(),
                                            "--to", day.isoformat(), "--rows-per-day", str(n), "--config",
                                            str(synth_cfg)])
            for day, n in ((D0, boot_rows), (D1, rows))]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the benchmarked day")
    ap.add_argument("--boot-rows", type=int, default=50_000, help="rows of the bootstrap day before it")
    ap.add_argument("--shards", type=int, default=2, help="label shards (run one after another here)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--keep-result", default=None, metavar="DIR",
                    help="copy the root after the day to DIR (bench/bench_dag_day.py --compare DIR/store)")
    ap.add_argument("--keep-bootstrap", default=None, metavar="DIR",
                    help="copy the bootstrapped root (both days published, D0 trained) to DIR before D1 runs, "
                         "so bench/bench_dag_day.py can run D1 through Airflow from the same state")
    ap.add_argument("--only", default=None, help="comma-separated stages to time (teacher,labels,gate,students "
                    "or a model name, report); default all. Labels come from the bootstrapped teacher either way")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kd-bench-day-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        synth = _publish(root, args.rows, args.boot_rows)
        cfg = str(day_config(root, args.shards))
        _stage("bootstrap", ["bootstrap", "--config", cfg, "--through", D0.isoformat()])
        setup = time.perf_counter() - t0
        if args.keep_bootstrap:
            shutil.copytree(root / "store", Path(args.keep_bootstrap) / "store")
        d = D1.isoformat()
        run = ["run", "--config", cfg, "--from", d, "--to", d, "--quiet", "--stages"]
        only = set(args.only.split(",")) if args.only else None

        def wanted(*names: str) -> bool:
            return only is None or bool(only & set(names))

        results = []
        for stage in ("teacher", "labels", "gate"):
            if wanted(stage):
                results.append(_stage("teacher refresh" if stage == "teacher" else stage, [*run, stage]))
        from kdcore.config import load_pipeline

        for s in load_pipeline(cfg).all_students():
            if wanted("students", s.name):
                results.append(_stage(f"student {s.name}", ["student", "train", "--config", cfg, "--name", s.name,
                                                            "--date", d]))
        if wanted("report"):
            results.append(_stage("report", ["report", "--config", cfg]))
        if args.keep_result:
            shutil.copytree(root / "store", Path(args.keep_result) / "store")
    total = sum(r["seconds"] for r in results)
    print(f"bench_day: {args.rows:,} rows, {args.shards} label shard(s) in sequence; setup (publish + bootstrap "
          f"on {args.boot_rows:,} rows) {setup:.0f} s")
    for r in synth:
        print(f"  {r['stage']:<28} {r['seconds']:8.1f} s  (setup)  peak RSS {r['rss_mb']:7.0f} MB")
    for r in results:
        print(f"  {r['stage']:<28} {r['seconds']:8.1f} s  {100 * r['seconds'] / total:5.1f}%  "
              f"peak RSS {r['rss_mb']:7.0f} MB")
    students = sum(r["seconds"] for r in results if r["stage"].startswith("student"))
    print(f"  {'whole day':<28} {total:8.1f} s  100.0%  peak RSS {max(r['rss_mb'] for r in results):7.0f} MB "
          f"(students {students:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "synth": synth, "stages": results,
                                               "total_seconds": total},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

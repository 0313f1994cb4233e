"""Benchmark (not a test): how long the DAG processor takes to parse this repo's DAG files.

The DAG processor re-parses every file of dags/ periodically, so a DAG file must stay
cheap: no torch, pyarrow, pandas or great_expectations at its top level. This measures,
in a fresh process with the repo's Airflow environment, Airflow's own per-file parse
duration (``DagBag.dagbag_stats``) on the first parse (cold: the file's imports are paid)
and the median of ``--repeats`` re-parses (warm), and which heavy modules the parse
imported (should be none).

Run: .venv/bin/python bench/bench_dag_parse.py [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pyarrow", "pandas", "great_expectations", "kdcore")

_PROBE = r"""
import json, statistics, sys, time
from airflow.models.dagbag import DagBag
heavy = {HEAVY!r}
def parse():
    bag = DagBag(dag_folder={dags!r})
    assert not bag.import_errors, bag.import_errors
    return {{Path(s.file).name: s.duration.total_seconds() if hasattr(s.duration, "total_seconds")
            else float(s.duration) for s in bag.dagbag_stats}}
from pathlib import Path
t0 = time.perf_counter(); cold = parse(); cold_wall = time.perf_counter() - t0
loaded = sorted(m for m in heavy if m in sys.modules)
warm = [parse() for _ in range({repeats})]
print("BENCH " + json.dumps({{"cold": cold, "cold_wall": cold_wall, "heavy_loaded": loaded,
    "warm": {{f: statistics.median(w[f] for w in warm) for f in cold}}}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from scripts.airflow_env import airflow_env

    with tempfile.TemporaryDirectory(prefix="kd-bench-parse-") as tmp:
        env = airflow_env(Path(tmp) / "airflow", Path(tmp) / "store", REPO / "configs" / "demo.yaml")
        code = _PROBE.format(HEAVY=HEAVY, dags=str(REPO / "dags"), repeats=args.repeats)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"parse probe failed: {proc.stderr[-3000:]}")
    out = json.loads(line[6:])
    for name in sorted(out["cold"]):
        print(f"dag parse {name:<24} cold {1000 * out['cold'][name]:7.1f} ms  warm (median of {args.repeats}) "
              f"{1000 * out['warm'][name]:7.1f} ms")
    print(f"dag parse: whole folder cold {out['cold_wall']:.2f} s; heavy modules imported by parsing: "
          f"{out['heavy_loaded'] or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

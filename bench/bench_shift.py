"""Benchmark (not a test): `compare` of a 1,000,000-row x 20-numeric-feature day against a
precomputed reference profile. Target: median < 0.5 s on the 2-core build machine.

Run: .venv/bin/python bench/bench_shift.py [--rows N] [--features F] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa

from kdcore.data.spec import DatasetSpec
from kdcore.quality.profile import build_profile
from kdcore.quality.shift import compare

TARGET_S = 0.5


def make_table(rng: np.random.Generator, rows: int, features: int, shift: float) -> pa.Table:
    """float64 features with varied shapes; every third feature's mean moves by `shift` std."""
    cols: dict[str, pa.Array] = {"example_id": pa.array(np.arange(rows, dtype=np.int64))}
    for j in range(features):
        mu = shift if j % 3 == 0 else 0.0
        if j % 4 == 3:  # a discrete feature (0/1 flag) exercises duplicate edges
            cols[f"f{j:02d}"] = pa.array((rng.random(rows) < 0.2 + 0.1 * mu).astype(np.float64))
        else:
            cols[f"f{j:02d}"] = pa.array(rng.normal(mu, 1.0 + j / 10, rows))
    cols["like"] = pa.array((rng.random(rows) < 0.3).astype(np.float32))
    return pa.table(cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    spec = DatasetSpec(name="bench", group="example_id",
                       numeric=[f"f{j:02d}" for j in range(args.features)],
                       tasks=[{"name": "like", "kind": "binary"}])
    rng = np.random.default_rng(20240601)
    ref = make_table(rng, args.rows, args.features, shift=0.0)
    t0 = time.perf_counter()
    profile = build_profile(ref.to_batches(max_chunksize=250_000), spec)
    build_s = time.perf_counter() - t0
    del ref
    cur = make_table(rng, args.rows, args.features, shift=0.5)

    report = compare(profile, cur, spec)  # warm-up (page faults, lazy imports)
    times = []
    for _ in range(max(args.repeats, 5)):
        t0 = time.perf_counter()
        report = compare(profile, cur, spec)
        times.append(time.perf_counter() - t0)

    med = statistics.median(times)
    worst = report.max_feature("psi")
    verdict = "PASS" if med < TARGET_S else "FAIL"
    print(f"compare {args.rows:,} rows x {args.features} numeric: median {med:.3f} s "
          f"(min {min(times):.3f}, max {max(times):.3f}, n={len(times)}); "
          f"build_profile {build_s:.2f} s; max PSI {worst[1]:.3f} on {worst[0]} | "
          f"target < {TARGET_S} s: {verdict}")


if __name__ == "__main__":
    main()

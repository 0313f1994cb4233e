"""Benchmark (not a test): what checksum verification costs a reader.

Publishes a synthetic day (default 1,000,000 rows, the synthetic stream's columns) to a
local root, then reads it back whole (`read_table`) and streamed (`iter_batches`), with
and without verifying each file's sha256 against the manifest, alternating the two so
both see the same machine load. Prints medians and the verify/no-verify ratio measured in
the same run.

Run: .venv/bin/python bench/bench_integrity.py [--rows N] [--repeats R] [--columns all|labels]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time

from kdcore.data import examples, synth
from kdcore.storage import partition as part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    day = dt.date(2026, 1, 1)
    cfg = synth.SynthConfig(rows_per_day=args.rows, start_date=day)
    spec = synth.dataset_spec()
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as root:
        m = examples.publish_day(root, spec, day, synth.generate_day(cfg, day))
        uri = examples.examples_uri(root, spec.name, day)
        print(f"{m.rows:,} rows, {len(m.files)} file(s), {m.bytes / 1e6:.1f} MB")
        label_cols = [spec.example_id, *[t.label_column for t in spec.tasks]]
        cases = {
            "read_table all columns": lambda v: part.read_table(uri, verify=v),
            "read_table id+labels": lambda v: part.read_table(uri, columns=label_cols, verify=v),
            "iter_batches all columns": lambda v: sum(b.num_rows for b in part.iter_batches(uri, verify=v)),
        }
        # The reader before verification existed: pyarrow.dataset over the manifest's files,
        # which reads only the projected columns' pages (verification must read whole files).
        import pyarrow.dataset as ds

        from kdcore.storage import fs as sfs

        fs, path = sfs.resolve(uri)
        paths = [f"{path}/{e.path}" for e in m.files]

        def before(cols):
            return ds.dataset(paths, schema=m.schema, format="parquet", filesystem=fs).to_table(
                columns=cols, use_threads=False)

        for name, cols in (("all columns", None), ("id+labels", label_cols)):
            ts: dict[str, list[float]] = {"dataset": [], "verified": []}
            for _ in range(args.repeats):
                for kind in ts:
                    t0 = time.perf_counter()
                    before(cols) if kind == "dataset" else part.read_table(uri, columns=cols)
                    ts[kind].append(time.perf_counter() - t0)
            a, b = statistics.median(ts["dataset"]), statistics.median(ts["verified"])
            print(f"{'vs old reader, ' + name:26s} dataset   {a * 1e3:7.1f} ms   verify {b * 1e3:7.1f} ms   "
                  f"ratio {b / a:.2f}x  (medians of {args.repeats})")
        for name, fn in cases.items():
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.repeats):
                for verify in (False, True):
                    t0 = time.perf_counter()
                    fn(verify)
                    times[verify].append(time.perf_counter() - t0)
            off, on = statistics.median(times[False]), statistics.median(times[True])
            print(f"{name:26s} no-verify {off * 1e3:7.1f} ms   verify {on * 1e3:7.1f} ms   "
                  f"ratio {on / off:.2f}x  (+{(on - off) * 1e3:.1f} ms; medians of {args.repeats})")


if __name__ == "__main__":
    main()

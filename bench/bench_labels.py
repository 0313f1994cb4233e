"""Benchmark (not a test): teacher labelling against the teacher's own compute bound.

Publishes a synthetic day (default 1,000,000 rows) and a teacher checkpoint (the default
teacher architecture, normalizer fitted on the day) to a temporary root, then measures,
alternating cases within each repeat so all see the same machine load:

- forward rows/s of the teacher on pre-built tensors, per inference batch size;
- end-to-end ``materialize_shard`` rows/s (read + verify + hash + forward + write), as a
  ratio of the best forward (the goal is >= 70%), with 1 shard and with 4 shards run
  one after the other (each shard reads only its rows);
- categorical hashing per 1M rows: the previous per-batch hashing (blake2b of every
  distinct value of every 65,536-row batch) vs one BucketCache carried across batches;
- N students: one shared labelling plus N label joins vs N separate teacher inferences;
- the import cost a fresh task process pays before it can label.

Run: .venv/bin/python bench/bench_labels.py [--rows N] [--repeats R] [--threads T] [--students N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdcore.config import LabelsConfig, PipelineConfig, StudentConfig, TeacherConfig
from kdcore.data import examples, synth
from kdcore.data.validate import ensure_valid
from kdcore.labels import materialize as mat
from kdcore.labels.join import join_labels, read_labels
from kdcore.models import registry
from kdcore.models.features import (
    NULL_BUCKET,
    BucketCache,
    FeatureSet,
    encode_features,
    hash_categorical,
    hash_value,
)
from kdcore.models.inference import predict, set_determinism
from kdcore.models.ranker import MultiTaskRanker
from kdcore.storage import partition as part

REPO = Path(__file__).resolve().parents[1]
READ_ROWS = 65_536


def old_hash_categorical(arr: pa.Array | pa.ChunkedArray, buckets: int, salt: str) -> np.ndarray:
    """The hashing before the cache (verbatim logic): blake2b per distinct value per call."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_floating(arr.type):
        arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
    encoded = pc.dictionary_encode(arr)
    distinct = encoded.dictionary.to_pylist()
    lookup = np.empty(len(distinct) + 1, dtype=np.int64)
    lookup[0] = NULL_BUCKET
    lookup[1:] = [hash_value(v, buckets, salt) for v in distinct]
    indices = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return lookup[indices + 1]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the config's torch_threads)")
    ap.add_argument("--students", type=int, default=3)
    ap.add_argument("--sizes", default="2048,4096,8192,16384,32768,65536", help="inference batch sizes to time")
    ap.add_argument("--inference-rows", default=None,
                    help="labels.inference_rows values to time end to end, comma-separated (default: the config's)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    day = dt.date(2026, 1, 2)
    spec = synth.dataset_spec()
    set_determinism(args.threads)
    with tempfile.TemporaryDirectory(prefix="kd-bench-labels-") as root:
        m = examples.publish_day(root, spec, day, synth.generate_day(
            synth.SynthConfig(rows_per_day=args.rows, start_date=day), day))
        uri = examples.examples_uri(root, spec.name, day)
        table = part.read_table(uri)
        teacher_cfg = TeacherConfig()
        feats = encode_features(table, spec, teacher_cfg.model.hash_buckets)
        model = MultiTaskRanker(teacher_cfg.model, feats.cat.shape[1], feats.num.shape[1], list(spec.tasks),
                                aux_heads=False)
        model.fit_normalizer(feats.num)
        registry.publish_checkpoint(root, spec.name, teacher_cfg.name, day - dt.timedelta(days=1), model, {})

        def config(**labels: int) -> PipelineConfig:
            return PipelineConfig(dataset=str(REPO / "configs" / "synth.yaml"), storage_root=root,
                                  teacher=teacher_cfg, students=[StudentConfig(name="student")],
                                  labels=LabelsConfig(**labels), torch_threads=args.threads)

        infer = [int(v) for v in args.inference_rows.split(",")] if args.inference_rows else \
            [LabelsConfig().inference_rows]
        cfg, old_shape = config(shards=1, inference_rows=infer[0]), config(shards=1, inference_rows=READ_ROWS)
        more = {f"labels 1 shard, inference_rows {v}": config(shards=1, inference_rows=v) for v in infer[1:]}
        ensure_valid(root, spec, day)  # the DAG's validate task; cached in this process
        print(f"{m.rows:,} rows, {len(m.files)} file(s), teacher {model.flops_per_example() / 1e3:.0f} kFLOP/row, "
              f"{args.threads} torch thread(s), medians of {args.repeats}")

        fwd: dict[int, list[float]] = {s: [] for s in sizes}
        e2e: dict[str, list[float]] = {f"labels 1 shard, inference_rows {infer[0]}": [], "labels 4 shards": [],
                                       "labels, forward batch 65536": [], **{k: [] for k in more}}
        hashing: dict[str, list[float]] = {"old": [], "cached": []}
        batches = list(part.iter_batches(uri, columns=spec.categorical, batch_size=READ_ROWS))

        nb = teacher_cfg.model.hash_buckets

        def hash_all(cache: BucketCache | None) -> None:
            """Every categorical column of every read batch: without a cache, the old
            per-batch hashing; with one, the cache carried across the batches."""
            for b in batches:
                for c in spec.categorical:
                    if cache is None:
                        old_hash_categorical(b.column(c), nb, c)
                    else:
                        hash_categorical(b.column(c), nb, c, cache)

        def labels(c: PipelineConfig, shards: int) -> None:
            for i in range(shards):
                mat.materialize_shard(c, day, i, shards)

        for _ in range(args.repeats):
            for s in sizes:
                fwd[s].append(timed(lambda s=s: predict(model, feats, s)))
            e2e[f"labels 1 shard, inference_rows {infer[0]}"].append(timed(lambda: labels(cfg, 1)))
            for k, c in more.items():
                e2e[k].append(timed(lambda c=c: labels(c, 1)))
            e2e["labels 4 shards"].append(timed(lambda: labels(cfg, 4)))
            e2e["labels, forward batch 65536"].append(timed(lambda: labels(old_shape, 1)))
            hashing["old"].append(timed(lambda: hash_all(None)))
            hashing["cached"].append(timed(lambda: hash_all(BucketCache())))

        n = m.rows or 0
        rate = {s: n / statistics.median(v) for s, v in fwd.items()}
        best = max(rate, key=rate.__getitem__)
        for s in sizes:
            print(f"forward batch {s:6d}: {rate[s]:9,.0f} rows/s  {rate[s] / rate[best]:5.0%} of best "
                  f"({rate[s] * model.flops_per_example() / 1e9:.1f} GFLOP/s)")
        for name, v in e2e.items():
            r = n / statistics.median(v)
            print(f"{name:38s}: {r:9,.0f} rows/s  {r / rate[best]:5.0%} of the best forward ({best})")
        old, new = (statistics.median(hashing[k]) * 1e6 / n for k in ("old", "cached"))
        print(f"hashing per 1M rows ({len(spec.categorical)} columns, {READ_ROWS}-row batches): "
              f"before {old:.2f} s, cached {new:.2f} s, ratio {old / new:.1f}x")

        # N students: label once and join N times, or each student runs the teacher itself.
        labels_uri = mat.commit(cfg, day, mat.choose_teacher(cfg, day).version, 1)["uri"]
        ids = table.column(spec.example_id).combine_chunks()
        cols = FeatureSet.of(spec, teacher_cfg.model.features)
        joins, infers = [], []
        for _ in range(args.repeats):
            joins.append(timed(lambda: join_labels(ids, read_labels(labels_uri, spec)[0], spec, labels_uri)))
            infers.append(timed(lambda: predict(model, encode_features(table, spec, teacher_cfg.model.hash_buckets,
                                                                       cols, BucketCache()), best)))
        label_s, join_s, infer_s = statistics.median(e2e[f"labels 1 shard, inference_rows {infer[0]}"]), \
            statistics.median(joins), \
            statistics.median(infers)
        k = args.students
        print(f"{k} students: shared labels {label_s + k * join_s:.2f} s (label once {label_s:.2f} s + "
              f"{k} joins of {join_s:.2f} s) vs {k} separate inferences {k * infer_s:.2f} s, "
              f"ratio {(k * infer_s) / (label_s + k * join_s):.1f}x")

    imports = [timed(lambda: subprocess.run([sys.executable, "-c", "import kdcore.labels.materialize"], check=True,
                                            cwd=REPO)) for _ in range(args.repeats)]
    bare = [timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)) for _ in range(args.repeats)]
    imp, base = statistics.median(imports), statistics.median(bare)
    print(f"fresh process importing kdcore.labels.materialize: {imp:.2f} s wall vs {base:.2f} s bare "
          f"interpreter (+{imp - base:.2f} s per task process, {(imp - base) / label_s:.0%} of labelling the day)")


if __name__ == "__main__":
    main()

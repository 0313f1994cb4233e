"""Benchmark (not a test): bytes per example of teacher labels in each label encoding.

Generates a synthetic day (default 1,000,000 rows), trains a small real teacher on its
first rows (one epoch, seconds), scores the whole day with it, clips like the labels
materialization does, and publishes the labels through the real writer
(PartitionWriter with the encoding's codecs and column encodings) once per encoding,
plus the writer as it was before label encodings (dictionary-encoded float32) as the
baseline. Sizes are the compressed Parquet column chunks of the published files.

Prints one line per encoding and task: the codec used, bytes/example/task, bytes/example
of the ids, the max abs error measured against the float32 teacher output and the bound
recorded in the manifest, and the task's bytes relative to the dictionary baseline.

Run: PYTHONPATH=. .venv/bin/python bench/bench_label_bytes.py [--rows N] [--train-rows N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcore.data import examples, synth
from kdcore.distill.config import DistillConfig
from kdcore.labels import encoding as enc
from kdcore.labels.materialize import clip_to_range, label_schema
from kdcore.models.inference import predict, set_determinism
from kdcore.models.ranker import RankerConfig
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part
from kdcore.training.data import DayData, load_days
from kdcore.training.loop import fit, model_features, new_model


def teacher_predictions(root: str, rows: int, train_rows: int) -> tuple[pa.Array, dict[str, np.ndarray]]:
    day = dt.date(2026, 1, 1)
    spec = synth.dataset_spec()
    examples.publish_day(root, spec, day, synth.generate_day(synth.SynthConfig(rows_per_day=rows, start_date=day),
                                                             day))
    data = load_days(root, spec, [day])
    train = DayData(spec, data.table.slice(0, train_rows), [day])
    cfg = RankerConfig(embedding_dim=16, hidden=[64, 32], hash_buckets=20_000, batch_size=512, lr=0.003)
    model = new_model(cfg, spec, False, train, seed=0)
    fit(model, model_features(model, train), train.hard, None, DistillConfig(mode="none"), seed=0)
    return data.example_ids, clip_to_range(predict(model, model_features(model, data)), spec)


def column_bytes(uri: str) -> dict[str, int]:
    """Compressed bytes per column over every published file of the partition."""
    out: dict[str, int] = {}
    for entry in part.read_manifest(uri).files:
        md = pq.ParquetFile(sfs.resolve(sfs.join(uri, entry.path))[1]).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                out[col.path_in_schema] = out.get(col.path_in_schema, 0) + col.total_compressed_size
    return out


def publish(uri: str, ids: pa.Array, preds: dict[str, np.ndarray], encoding: str | None) -> dict:
    """Labels through the real writer; ``None``: the writer before encodings existed."""
    spec = synth.dataset_spec()
    codecs = enc.codecs(spec, encoding or "float32")
    schema = label_schema(spec, ids.type, codecs)
    cols = [enc.encode(preds[t.name], codecs[t.name]) for t in spec.tasks]
    errors = {t.name: enc.measured_error(preds[t.name], c, codecs[t.name]) for t, c in zip(spec.tasks, cols)}
    options = enc.parquet_options(schema, spec) if encoding else None
    part.publish_batches(uri, schema, [pa.table([ids, *cols], schema=schema)], {}, parquet_options=options)
    return {"codecs": codecs, "errors": errors, "bytes": column_bytes(uri)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--train-rows", type=int, default=100_000, help="rows the teacher trains on (one epoch)")
    args = ap.parse_args()
    set_determinism(2)
    spec = synth.dataset_spec()
    with tempfile.TemporaryDirectory(prefix="kd-bench-labels-") as root:
        t0 = time.perf_counter()
        ids, preds = teacher_predictions(root, args.rows, min(args.train_rows, args.rows))
        n = len(ids)
        p = preds["click"]
        print(f"{n:,} rows; teacher scored in {time.perf_counter() - t0:.1f} s; click p: mean {p.mean():.3f}, "
              f"p1 {np.quantile(p, 0.01):.4f}, p99 {np.quantile(p, 0.99):.4f}; watch_time is unbounded (min only)")
        base = publish(sfs.join(root, "dictionary"), ids, preds, None)
        runs = {"dictionary float32 (before)": base}
        for e in enc.ENCODINGS:
            runs[e] = publish(sfs.join(root, e), ids, preds, e)
        for name, r in runs.items():
            for t in spec.tasks:
                c = r["codecs"][t.name]
                print(f"{name:28s} {t.name:10s} {c['encoding']:13s} {r['bytes'][t.name] / n:6.3f} B/example/task  "
                      f"ids {r['bytes'][spec.example_id] / n:6.3f} B/example  max abs error {r['errors'][t.name]:.3g} "
                      f"(bound {c['max_abs_error']:.3g})  x{r['bytes'][t.name] / base['bytes'][t.name]:.2f} vs dictionary")


if __name__ == "__main__":
    main()

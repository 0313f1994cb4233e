"""Teacher inference, once per example, shared by every student.

The chosen teacher scores a day's examples under inference mode, in forward batches
sized for the CPU cache (``labels.inference_rows``) on a grid fixed from the day's first
row, while reads and feature encoding go in larger chunks (``labels.batch_rows``); each
shard (a contiguous row range of the day) reads only the files holding its rows and is
published on its own, then ``commit`` makes all shards visible at once with a manifest
naming the teacher, the date it is trained through, the label staleness and the row
count. Labels are stored in the declared ``labels.encoding`` (kdcore/labels/encoding.py);
the manifest records each task's codec, its error bound and the error measured on the day."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from kdcore.config import PipelineConfig
from kdcore.data import examples
from kdcore.data.spec import DatasetSpec
from kdcore.data.validate import ensure_valid
from kdcore.errors import DataError, LineageError, SpecError, StorageError
from kdcore.labels import encoding as enc
from kdcore.labels.store import labels_ref, labels_uri, shard_dir, shard_uri
from kdcore.models import registry
from kdcore.models.features import BucketCache, FeatureSet, encode_features
from kdcore.models.inference import predict, set_determinism
from kdcore.records import LabelLineage, LabelsRef
from kdcore.storage import partition as part
from kdcore.storage.manifest import FileEntry, Manifest

log = logging.getLogger(__name__)


def choose_teacher(cfg: PipelineConfig, day: dt.date, version: str | None = None) -> registry.Checkpoint:
    """The teacher that labels ``day``: a pinned version, or the newest teacher trained
    through ``day - label_lag`` or earlier, refused when staler than the policy allows."""
    root, ds, name = cfg.root, cfg.spec.name, cfg.teacher.name
    if version:
        ckpt = registry.find_version(root, ds, name, version)
    else:
        newest = registry.latest_before(root, ds, name, day - dt.timedelta(days=cfg.policies.label_lag_days),
                                        inclusive=True)
        if newest is None:
            raise LineageError(f"no teacher checkpoint trained through {day} or earlier under "
                               f"{registry.model_root(root, ds, name)}")
        ckpt = registry.find_checkpoint(root, ds, name, newest)
    staleness = (day - ckpt.trained_through).days
    if staleness < 0:
        raise LineageError(f"teacher {ckpt.version} is trained through {ckpt.trained_through}, after {day}")
    if version is None and staleness > cfg.policies.max_label_staleness_days:
        raise LineageError(f"newest teacher {ckpt.version} is {staleness} days stale for {day}; "
                           f"policies.max_label_staleness_days is {cfg.policies.max_label_staleness_days}")
    return ckpt


def label_schema(spec: DatasetSpec, id_type: pa.DataType,
                 codecs: dict[str, dict[str, Any]] | None = None) -> pa.Schema:
    """The stored schema: the id, then one column per task in its codec's storage type
    (float32 without codecs)."""
    return pa.schema([pa.field(spec.example_id, id_type, nullable=False),
                      *[pa.field(t.name, enc.storage_type(codecs[t.name]) if codecs else pa.float32())
                        for t in spec.tasks]])


def _shard_range(rows: int, shard: int, shards: int) -> tuple[int, int]:
    return rows * shard // shards, rows * (shard + 1) // shards


def _inference_span(lo: int, hi: int, rows: int, inference_rows: int) -> tuple[int, int]:
    """The rows a shard scores: its range widened to the day's grid of inference batches
    (``[k * inference_rows, (k + 1) * inference_rows)`` from row 0). Every row goes through
    the same forward batch whatever the shard count, so labels are bitwise identical."""
    if lo >= hi:
        return lo, lo
    return lo // inference_rows * inference_rows, min(-(-hi // inference_rows) * inference_rows, rows)


def _chunks(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Re-cut a stream of batches into tables of exactly ``rows`` rows (the last shorter):
    read batches follow files and row groups, encode/forward chunks follow the grid."""
    pending: list[pa.RecordBatch] = []
    n = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - n, batch.num_rows)
            pending.append(batch.slice(0, take))
            batch, n = batch.slice(take), n + take
            if n == rows:
                yield pa.Table.from_batches(pending)
                pending, n = [], 0
    if n:
        yield pa.Table.from_batches(pending)


def materialize_shard(cfg: PipelineConfig, day: dt.date, shard: int = 0, shards: int = 1,
                      teacher_version: str | None = None) -> dict[str, Any]:
    """Score rows ``[lo, hi)`` of the day and publish them as one shard. Reads only the
    files (and row groups) that hold the shard's rows; features are encoded in read-sized
    chunks with one hash cache for the shard, the forward runs in cache-sized batches."""
    if not 0 <= shard < shards:
        raise ValueError(f"--shard {shard}/{shards}: shard index must be in [0, {shards})")
    set_determinism(cfg.torch_threads)
    spec = cfg.spec
    ensure_valid(cfg.root, spec, day)  # a day that fails the contract gets no labels
    teacher = choose_teacher(cfg, day, teacher_version)
    model = teacher.load(spec)
    ex_uri = examples.examples_uri(cfg.root, spec.name, day)
    manifest = part.read_manifest(ex_uri)
    lo, hi = _shard_range(manifest.rows or 0, shard, shards)
    assert manifest.schema is not None
    codecs = enc.codecs(spec, cfg.labels.encoding, cfg.labels.logit_eps)
    schema = label_schema(spec, manifest.schema.field(spec.example_id).type, codecs)
    measured = {t.name: 0.0 for t in spec.tasks}
    uri = shard_uri(cfg.root, spec.name, day, teacher.version, shard, shards)
    start = time.perf_counter()
    infer = cfg.labels.inference_rows
    chunk = max(cfg.labels.batch_rows // infer, 1) * infer  # chunk starts stay on the grid
    a, b = _inference_span(lo, hi, manifest.rows or 0, infer)
    columns = FeatureSet.of(spec, model.config.features)
    cache = BucketCache()

    def batches() -> Iterator[pa.RecordBatch]:
        offset = a
        rows = part.iter_row_range(ex_uri, a, b, columns=[spec.example_id, *spec.feature_columns],
                                   batch_size=chunk, manifest=manifest)
        for table in _chunks(rows, chunk):
            feats = encode_features(table, spec, model.config.hash_buckets, columns, cache)
            preds = clip_to_range(predict(model, feats, batch_rows=infer), spec)
            _check_finite(preds, teacher.version, day)
            c_lo, c_hi = offset, offset + table.num_rows
            offset = c_hi
            s, n = max(lo - c_lo, 0), min(hi, c_hi) - max(lo, c_lo)
            if n <= 0:
                continue
            ids = table.column(spec.example_id).slice(s, n).combine_chunks()
            cols = []
            for t in spec.tasks:
                values = preds[t.name][s:s + n].astype(np.float32)
                stored = enc.encode(values, codecs[t.name])
                measured[t.name] = max(measured[t.name], enc.measured_error(values, stored, codecs[t.name]))
                cols.append(stored)
            yield pa.record_batch([ids, *cols], schema=schema)

    meta = label_metadata(cfg, teacher, day, part.manifest_digest(manifest))
    with part.PartitionWriter(uri, schema, {**meta, "shard": shard, "shards": shards},
                              parquet_options=enc.parquet_options(schema, spec)) as w:
        for batch in batches():
            w.write(batch)
        w.metadata[enc.MEASURED_KEY] = measured  # known once every row is encoded
    m = part.read_manifest(uri)
    if m.rows != hi - lo:
        raise StorageError(f"{uri}: wrote {m.rows} label rows, expected {hi - lo}")
    seconds = time.perf_counter() - start
    log.info("labels %s shard %d/%d: %d rows (examples %d-%d) scored by teacher %s (trained through %s, "
             "staleness %d day(s)) in %.2f s, %.0f rows/s", day, shard, shards, m.rows, lo, hi, teacher.version,
             teacher.trained_through, meta["staleness_days"], seconds, (m.rows or 0) / max(seconds, 1e-9))
    return {"uri": uri, "rows": m.rows, "teacher_version": teacher.version,
            "seconds": round(seconds, 3)}


def _check_finite(preds: dict[str, np.ndarray], version: str, day: dt.date) -> None:
    """A diverged teacher must not publish NaN labels that every student then trains on."""
    for task, p in preds.items():
        bad = int(np.count_nonzero(~np.isfinite(p)))
        if bad:
            raise DataError(f"teacher {version} predicts {bad} non-finite value(s) for task '{task}' on {day}; "
                            f"labels not published (the teacher diverged: check its training data and learning rate)")


def clip_to_range(preds: dict[str, np.ndarray], spec: DatasetSpec) -> dict[str, np.ndarray]:
    """Regression predictions are clipped to the task's declared range (a rating head is
    unbounded); binary predictions are probabilities already."""
    out = dict(preds)
    for t in spec.tasks:
        if t.kind == "regression" and (t.min is not None or t.max is not None):
            out[t.name] = np.clip(preds[t.name], t.min, t.max)
    return out


def label_metadata(cfg: PipelineConfig, teacher: registry.Checkpoint, day: dt.date,
                   examples_digest: str) -> dict[str, Any]:
    """What the labels are a function of, with paths relative to the storage root (a root
    can be moved or copied, and the same labels are the same bytes under any root).

    ``teacher_stale`` makes a fallback visible downstream: the labels come from a teacher
    older than the label policy asks for (its refresh failed or was skipped, or a version
    was pinned), so the gate, the asset event and the report can say so.

    The per-task codecs (``label_encoding``) are part of it: labels stored in another
    encoding are other labels, so they are not reused, and the manifest digest that
    students record changes with them."""
    lineage = LabelLineage.of(teacher.version, teacher.trained_through, day, cfg.policies.label_lag_days)
    return {"kind": "teacher_labels", "dataset": cfg.spec.name, "date": day.isoformat(), **lineage.metadata(),
            "teacher_path": registry.checkpoint_path(cfg.spec.name, teacher.meta["name"], teacher.trained_through),
            "examples_sha256": examples_digest,
            enc.METADATA_KEY: enc.codecs(cfg.spec, cfg.labels.encoding, cfg.labels.logit_eps)}


def labels_summary(uri: str, ref: LabelsRef) -> dict[str, Any]:
    """``commit``'s and ``materialize``'s JSON result (what ``kd labels`` prints)."""
    out = {"uri": uri, "rows": ref.rows, "teacher_version": ref.lineage.teacher_version,
           "changed": ref.changed, "staleness_days": ref.lineage.staleness_days,
           "teacher_stale": ref.lineage.teacher_stale, "bytes": ref.bytes}
    return {**out, "reused": True} if ref.reused else out


def commit(cfg: PipelineConfig, day: dt.date, teacher_version: str, shards: int) -> dict[str, Any]:
    """Publish one manifest listing every shard's files; refuses missing shards or a row
    count that does not match the day's examples."""
    spec = cfg.spec
    teacher = registry.find_version(cfg.root, spec.name, cfg.teacher.name, teacher_version)
    files: list[FileEntry] = []
    schema_b64 = None
    ex = part.read_manifest(examples.examples_uri(cfg.root, spec.name, day))
    digest = part.manifest_digest(ex)
    meta = label_metadata(cfg, teacher, day, digest)
    measured = {t.name: 0.0 for t in spec.tasks}
    uri = labels_uri(cfg.root, spec.name, day, teacher_version)
    base = part.manifest_generation(uri)
    for i in range(shards):
        suri = shard_uri(cfg.root, spec.name, day, teacher_version, i, shards)
        try:
            m = part.read_manifest(suri)
        except StorageError as e:
            if e.transient:
                raise
            raise StorageError(f"cannot commit labels for {day}: shard {i}/{shards} is not published ({suri})") from None
        if m.metadata.get("examples_sha256") != digest:
            raise LineageError(f"cannot commit labels for {day}: shard {i}/{shards} ({suri}) was computed from "
                               f"other examples than the ones published now; re-run the shard")
        if m.metadata.get(enc.METADATA_KEY) != meta[enc.METADATA_KEY]:
            raise SpecError(f"cannot commit labels for {day}: shard {i}/{shards} ({suri}) was stored in "
                            f"another label encoding than labels.encoding {cfg.labels.encoding!r}; "
                            f"re-run the shard")
        for task, err in (m.metadata.get(enc.MEASURED_KEY) or {}).items():
            measured[task] = max(measured.get(task, 0.0), err)
        schema_b64 = m.schema_b64
        files += [e.model_copy(update={"name": f"shard{i:03d}-{e.name}", "path": f"{shard_dir(i, shards)}/{e.path}"})
                  for e in m.files]
    rows = sum(e.rows or 0 for e in files)
    if rows != ex.rows:
        raise StorageError(f"labels for {day} have {rows} rows across {shards} shards; the day has {ex.rows} examples")
    manifest = Manifest(kind="parquet", files=files, rows=rows, bytes=sum(e.bytes for e in files),
                        schema_b64=schema_b64,
                        metadata={**meta, enc.MEASURED_KEY: measured, "shards": shards})
    changed = part.commit_manifest(uri, manifest, base)
    log.info("labels %s: committed %d rows across %d shard(s) from teacher %s (staleness %d day(s)%s)%s",
             day, rows, shards, teacher_version, manifest.metadata["staleness_days"],
             ", STALE FALLBACK teacher" if manifest.metadata["teacher_stale"] else "",
             "" if changed else "; identical to the labels already committed")
    return labels_summary(uri, labels_ref(cfg.root, uri, manifest, changed=changed))


def materialize(cfg: PipelineConfig, day: dt.date, teacher_version: str | None = None,
                shards: int | None = None, force: bool = False) -> dict[str, Any]:
    """All shards in this process, then commit (the command line's default). Labels
    already committed for this teacher and date are reused when they were computed from
    the examples published now (inference is deterministic, so recomputing them would
    only cost time); re-published examples are labelled again. ``force`` recomputes."""
    shards = shards or cfg.labels.shards
    current = ensure_valid(cfg.root, cfg.spec, day)["examples_sha256"]
    version = choose_teacher(cfg, day, teacher_version).version
    uri = labels_uri(cfg.root, cfg.spec.name, day, version)
    if not force and part.is_published(uri):
        m = part.read_manifest(uri)
        same_encoding = m.metadata.get(enc.METADATA_KEY) == enc.codecs(cfg.spec, cfg.labels.encoding,
                                                                         cfg.labels.logit_eps)
        if m.metadata.get("examples_sha256") == current and same_encoding:  # same teacher, examples, encoding
            log.info("labels %s: reusing %d rows already committed by teacher %s for these examples", day, m.rows,
                     version)
            return labels_summary(uri, labels_ref(cfg.root, uri, m, reused=True))
    for i in range(shards):
        materialize_shard(cfg, day, i, shards, version)
    return commit(cfg, day, version, shards)

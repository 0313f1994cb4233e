"""The boundary check of a day's examples, run before anything trains on or labels them.

A day that breaks the contract (labels out of range or missing, non-finite features,
duplicate ids, an empty day, a column whose type changed since the day before) would
otherwise poison the teacher first and every student after it, because the teacher
refresh runs before the quality gate. So every step that reads a day calls
``ensure_valid`` first, and a failing day stops with a DataError that names the file,
the column and an offending example; nothing is published for it."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdcore.data import examples
from kdcore.data.spec import DatasetSpec
from kdcore.errors import DataError, StorageError
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part

log = logging.getLogger(__name__)

_VALID: dict[tuple[str, str], dict[str, Any]] = {}  # (uri, manifest digest) -> summary
_RECORDED: set[tuple[str, str]] = set()  # of those, the ones a stored record matches
# Bump when a rule is added or tightened: records of an older version are checked again.
RULES_VERSION = 2  # 2: timestamps on the partition's date, feature magnitudes within MAX_ABS_FEATURE
RECORD = "validation.json"
# Features are cast to float32 and normalized by statistics fitted at cold start; a value
# beyond about sqrt(float32 max) ~ 1.8e19 overflows to inf as soon as it is squared or meets
# a weight, and training then diverges far from the cause (after labels and quality are
# published). No real feature has such a magnitude: it is a unit or encoding error.
MAX_ABS_FEATURE = 1e18


def record_uri(root: str, dataset: str, day: dt.date) -> str:
    """``<root>/validation/<dataset>/date=D``: the last passed validation of D's examples."""
    return sfs.join(root, "validation", dataset, f"date={day.isoformat()}")


def ensure_valid(root: str, spec: DatasetSpec, day: dt.date, record: bool = False) -> dict[str, Any]:
    """Validate ``day`` once per published version of its examples.

    The pipeline's boundary check (the DAG's ``wait_for_examples``, ``kd run``'s first step
    of a day) passes ``record=True``: a day that passes gets a record keyed by the examples'
    manifest digest, the digest of the day before (the schema check compares with it) and
    ``RULES_VERSION``. Every later step for that day (teacher, label shards, students,
    reruns) finds it and reads nothing but manifests instead of the whole day; without a
    matching record a step validates the day itself and writes nothing, so a command that
    fails later leaves the storage root as it was. A re-published day has another digest
    and is checked again. Within a process the result is also cached."""
    uri = examples.examples_uri(root, spec.name, day)
    if not part.is_published(uri):
        raise StorageError(f"no examples published for {day} ({uri}); publish the day first")
    manifest = part.read_manifest(uri)  # a corrupt manifest is its own error
    digest = part.manifest_digest(manifest)
    key = (uri, digest)
    if key in _VALID and (key in _RECORDED or not record):
        return _VALID[key]
    before = _previous_digest(root, spec, day)  # the schema check compares with the day before
    if key not in _VALID:
        summary = _recorded(root, spec, day, digest, before)
        if summary is not None:
            _RECORDED.add(key)
        else:
            summary = validate_day(root, spec, day, manifest)
        _VALID[key] = {**summary, "uri": uri}
    if record and key not in _RECORDED:
        _record(root, spec, day, _VALID[key], before)
        _RECORDED.add(key)
    return _VALID[key]


def _previous_digest(root: str, spec: DatasetSpec, day: dt.date) -> str | None:
    before = [d for d in examples.list_days(root, spec.name) if d < day]
    return part.manifest_digest(part.read_manifest(examples.examples_uri(root, spec.name, before[-1]))) \
        if before else None


def _recorded(root: str, spec: DatasetSpec, day: dt.date, digest: str, before: str | None
              ) -> dict[str, Any] | None:
    rec_uri = record_uri(root, spec.name, day)
    try:
        if not part.is_published(rec_uri):
            return None
        rec = json.loads(part.read_blob(rec_uri, RECORD))
    except (StorageError, ValueError) as e:  # unreadable: check the day again (and rewrite the record)
        log.warning("%s: validation record unreadable (%s); validating the day again", rec_uri, e)
        return None
    if (rec.get("examples_sha256"), rec.get("previous_sha256"), rec.get("rules_version")) != \
            (digest, before, RULES_VERSION):
        return None
    return {k: rec[k] for k in ("date", "rows", "examples_sha256")}


def _record(root: str, spec: DatasetSpec, day: dt.date, summary: dict[str, Any], before: str | None) -> None:
    """Best effort: a task that cannot write the record (a concurrent shard wrote it first, a
    read-only root) has still validated the day, and a later task just checks it again."""
    body = {"date": summary["date"], "rows": summary["rows"], "examples_sha256": summary["examples_sha256"],
            "previous_sha256": before, "rules_version": RULES_VERSION}
    try:
        part.publish_blobs(record_uri(root, spec.name, day), {RECORD: json.dumps(body, sort_keys=True).encode()},
                           {"kind": "validation", "date": summary["date"]})
    except StorageError as e:
        log.warning("validation of %s passed but its record was not written (%s)", day, e)


def validate_day(root: str, spec: DatasetSpec, day: dt.date, manifest: part.Manifest | None = None,
                 batch_size: int = 262_144) -> dict[str, Any]:
    uri = examples.examples_uri(root, spec.name, day)
    manifest = manifest or part.read_manifest(uri)
    if not manifest.rows:
        raise DataError(f"{uri}: the day has no rows; nothing can train on it")
    schema = manifest.schema
    assert schema is not None
    examples.check_schema(schema, spec, uri)
    _same_types_as_before(root, spec, day, schema, uri)
    ids: list[pa.Array] = []
    checked = 0
    for batch in part.iter_batches(uri, columns=spec.required_columns, batch_size=batch_size, manifest=manifest):
        ids.append(batch.column(spec.example_id))
        for task in spec.tasks:
            _check_label(batch, spec, task, uri)
        for col in spec.numeric:
            _check_numeric(batch, spec, col, uri)
        _check_nulls(batch, spec, spec.timestamp, uri, "a timestamp")
        examples.check_timestamps(batch, spec, day, uri)
        checked += batch.num_rows
    all_ids = pa.concat_arrays(ids)
    del ids
    if all_ids.null_count:
        raise DataError(f"{uri}: column '{spec.example_id}' has {all_ids.null_count} null id(s)")
    dupes, example = examples.duplicate_ids(all_ids)
    if dupes:
        raise DataError(f"{uri}: column '{spec.example_id}' has {dupes} duplicate id(s) (e.g. {example!r})")
    return {"uri": uri, "date": day.isoformat(), "rows": checked, "examples_sha256": part.manifest_digest(manifest)}


def _example(batch: pa.RecordBatch, spec: DatasetSpec, mask: np.ndarray) -> str:
    i = int(np.flatnonzero(mask)[0])
    return f"e.g. {spec.example_id}={batch.column(spec.example_id)[i].as_py()!r}"


def _check_nulls(batch: pa.RecordBatch, spec: DatasetSpec, col: str, uri: str, what: str) -> None:
    arr = batch.column(col)
    if arr.null_count:
        mask = np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
        raise DataError(f"{uri}: column '{col}' has null value(s) where {what} is required "
                        f"({_example(batch, spec, mask)})")


def _values(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False))


def _check_label(batch: pa.RecordBatch, spec: DatasetSpec, task: Any, uri: str) -> None:
    col = task.label_column
    _check_nulls(batch, spec, col, uri, f"the label of task '{task.name}'")
    v = _values(batch.column(col))
    if task.kind == "binary":
        bad = ~((v == 0) | (v == 1))
        rule = "0 or 1"
    else:
        lo = -np.inf if task.min is None else task.min
        hi = np.inf if task.max is None else task.max
        bad = ~(np.isfinite(v) & (v >= lo) & (v <= hi))
        rule = f"finite and within [{task.min}, {task.max}]"
    if bad.any():
        raise DataError(f"{uri}: column '{col}' (label of task '{task.name}') has {int(bad.sum())} value(s) "
                        f"that are not {rule}, e.g. {float(v[bad][0])!r} ({_example(batch, spec, bad)})")


def _check_numeric(batch: pa.RecordBatch, spec: DatasetSpec, col: str, uri: str) -> None:
    arr = batch.column(col)
    if spec.null_policy(col) == "error":
        _check_nulls(batch, spec, col, uri, "a value (nulls: error)")
    v = _values(arr)
    bad = np.isinf(v)
    if bad.any():
        raise DataError(f"{uri}: column '{col}' has {int(bad.sum())} infinite value(s) "
                        f"({_example(batch, spec, bad)}); features must be finite or null")
    huge = np.abs(np.nan_to_num(v)) > MAX_ABS_FEATURE
    if huge.any():
        raise DataError(f"{uri}: column '{col}' has {int(huge.sum())} value(s) beyond +/-{MAX_ABS_FEATURE:g}, "
                        f"e.g. {float(v[huge][0]):g} ({_example(batch, spec, huge)}); float32 training overflows "
                        f"on such magnitudes: rescale the column (e.g. log or other units) in the source")
    if spec.null_policy(col) == "error" and np.isnan(v).any():
        raise DataError(f"{uri}: column '{col}' has NaN value(s) and its null policy is 'error' "
                        f"({_example(batch, spec, np.isnan(v))})")


def _same_types_as_before(root: str, spec: DatasetSpec, day: dt.date, schema: pa.Schema, uri: str) -> None:
    """A column that changes type between days breaks every multi-day window (bootstrap,
    the gate's reference profile) far from its cause: refuse it here, naming both days."""
    before = [d for d in examples.list_days(root, spec.name) if d < day]
    if not before:
        return
    prev_uri = examples.examples_uri(root, spec.name, before[-1])
    prev = part.read_manifest(prev_uri).schema
    assert prev is not None
    for col in spec.required_columns:
        if col in prev.names and prev.field(col).type != schema.field(col).type:
            raise DataError(f"{uri}: column '{col}' is {schema.field(col).type} on {day} but "
                            f"{prev.field(col).type} on {before[-1]} ({prev_uri}); a day must keep the "
                            f"schema of the days before it: re-publish it with the same types")

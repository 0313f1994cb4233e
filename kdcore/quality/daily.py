"""The daily data-quality and shift gate for date D.

Compares the reference profile of the teacher that labelled D (its training window,
stored with its checkpoint at refresh) with the students' day D, checks the labels
(coverage, validity, calibration, staleness, and whether the teacher that labelled them is
a stale fallback: ``teacher_fresh`` warns then), validates D with a great-expectations
suite generated from the profile, and decides what students may do. Everything it saw
is published under ``<root>/quality/<dataset>/date=D/`` (decision, figures, Data Docs)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdcore.config import PipelineConfig
from kdcore.data import examples
from kdcore.data.spec import DatasetSpec
from kdcore.errors import LineageError, StorageError
from kdcore.labels.encoding import decode_labels
from kdcore.labels.store import check_labels_for
from kdcore.models import registry
from kdcore.quality.gate import CheckResult, evaluate_gate, with_expectations
from kdcore.quality.labels_check import TeacherLineage, check_labels
from kdcore.quality.profile import Profile, build_profile
from kdcore.quality.shift import compare
from kdcore.records import GateDecision, LabelLineage
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part

log = logging.getLogger(__name__)
PROFILE = "profile.json"


def window_profile(root: str, spec: DatasetSpec, through: dt.date, days: int) -> bytes:
    """Profile of the (published) days in (through - days, through]: the teacher's recent
    training window. Streams the days; nothing is held but the profile's counters."""
    window = [d for d in examples.list_days(root, spec.name) if through - dt.timedelta(days=days) < d <= through]
    batches = (b for d in window for b in examples.iter_day(root, spec, d, columns=spec.required_columns))
    return build_profile(batches, spec, n_days=max(len(window), 1)).model_dump_json().encode()


def quality_uri(cfg: PipelineConfig, day: dt.date) -> str:
    return sfs.join(cfg.root, "quality", cfg.spec.name, f"date={day.isoformat()}")


def run_gate(cfg: PipelineConfig, day: dt.date, labels_uri: str) -> dict[str, Any]:
    """The gate of D on the labels at ``labels_uri``, as ``kd gate`` prints it."""
    return decide(cfg, day, labels_uri).result()


def decide(cfg: PipelineConfig, day: dt.date, labels_uri: str) -> GateDecision:
    """Measure D against the reference profile of the teacher that labelled the labels at
    ``labels_uri`` and publish what it saw; the decision the students follow is returned."""
    spec = cfg.spec
    # labels of another day (ids may restart daily) or of examples since re-published are
    # refused before any check measures them: coverage by id would not notice
    examples_digest = part.manifest_digest(part.read_manifest(examples.examples_uri(cfg.root, spec.name, day)))
    labels_manifest = check_labels_for(labels_uri, spec.name, day, examples_digest)
    meta = labels_manifest.metadata
    # labels committed before paths were relative to the root name the teacher by URI
    teacher = registry.read_checkpoint(sfs.join(cfg.root, meta["teacher_path"]) if "teacher_path" in meta
                                       else meta["teacher_uri"])
    if meta.get("teacher_version") and teacher.version != meta["teacher_version"]:
        # the teacher's day was retrained (e.g. with --force) after it scored these labels: its
        # profile and lineage are another model's, so the gate would judge the labels by it
        raise LineageError(f"labels at {labels_uri} were scored by {meta['teacher_version']}, but {teacher.uri} "
                           f"now holds {teacher.version}; re-materialize the labels of {day} "
                           f"(kd labels materialize --date {day} --force)")
    try:
        profile = Profile.model_validate_json(part.read_blob(teacher.uri, PROFILE))
    except StorageError as e:
        if e.transient:
            raise
        raise StorageError(f"{teacher.uri}: teacher checkpoint has no reference profile ({PROFILE}); "
                           f"refresh the teacher with this version of kdcore") from None
    # The day is never held whole (flat memory in its size): the shift streams it, the
    # label checks read the ids and hard labels only, and GX sees an evenly spaced sample.
    shift = compare(profile, examples.iter_day(cfg.root, spec, day, columns=_shift_columns(profile, spec)), spec)
    # Decoded from the declared encoding; a column not stored as declared stays raw, so its
    # dtype error is a check, not a crash.
    labels = decode_labels(part.read_table(labels_uri, manifest=labels_manifest), meta, spec, strict=False)
    staleness = int(meta["staleness_days"])
    lineage = teacher_lineage(meta, teacher, cfg.policies.label_lag_days)
    hard = examples.read_day(cfg.root, spec, day, columns=[spec.example_id, *(t.label_column for t in spec.tasks)])
    checks = check_labels(labels, hard, spec, staleness, lineage)
    del labels, hard
    decision = evaluate_gate(shift, checks, cfg.gate)
    with tempfile.TemporaryDirectory(prefix="kd-gx-") as tmp:
        from kdcore.quality.expectations import validate_day

        sample = sample_rows(examples.iter_day(cfg.root, spec, day), shift.cur_rows, cfg.gate.expectations_max_rows)
        gx = validate_day(sample, profile, spec, shift, tmp, run_name=f"{spec.name}-{day.isoformat()}")
        del sample
        docs = {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    decision = with_expectations(decision, gx.unsuccessful, gx.evaluated, gx.failed_expectations)
    checks_all = decision.checks
    summary = decision.summary()
    lin = LabelLineage(teacher_version=teacher.version, teacher_trained_through=lineage.trained_through,
                       staleness_days=staleness, expected_staleness_days=lineage.expected_staleness_days,
                       teacher_stale=lineage.stale)
    # Deterministic (no times, no run ids): re-running the gate leaves decision.json's bytes alone.
    record = {"date": day.isoformat(), "status": decision.status, "action": decision.action, "summary": summary,
              **lin.metadata(), "labels_path": sfs.relative(cfg.root, labels_uri),
              "checks": [c.model_dump(mode="json") for c in checks_all]}
    blobs = {"decision.json": _json(record), "shift.json": shift.model_dump_json(indent=1).encode(),
             "labels_check.json": checks.model_dump_json(indent=1).encode(),
             **{f"data_docs/{k}": v for k, v in docs.items()}}
    uri = quality_uri(cfg, day)
    if _unchanged(uri, blobs):  # GX output carries run ids and times: keep the first publish
        manifest = part.read_manifest(uri)
    else:
        manifest = part.publish_blobs(uri, blobs, {"kind": "gate", "date": day.isoformat(),
                                               "status": decision.status, "teacher_stale": lineage.stale},
                                      keep_names=True)
    if lineage.stale:
        log.warning("%s: FALLBACK teacher: labels come from %s (trained through %s), %d day(s) stale, "
                    "the label policy expects %d", day, teacher.version, lineage.trained_through, staleness,
                    lineage.expected_staleness_days)
    log.log(logging.WARNING if decision.status != "pass" else logging.INFO, "%s: %s", day, summary)
    log.info("%s: gate checks (teacher %s, %d day(s) stale, labels %s):\n%s", day, teacher.version, staleness,
             sfs.relative(cfg.root, labels_uri), check_table(checks_all))
    return GateDecision(date=day.isoformat(), status=decision.status, action=decision.action, summary=summary,
                        uri=uri, lineage=lin,
                        data_docs=sfs.join(uri, manifest.file("data_docs/index.html").path)
                        if "index.html" in docs else None,
                        checks={c.name: {"value": c.value, "status": c.status} for c in checks_all})


def _shift_columns(profile: Profile, spec: DatasetSpec) -> list[str]:
    """What ``compare`` reads: the profiled features and the label columns, in schema order."""
    wanted = {*profile.numeric, *profile.categorical, *(t.label_column for t in spec.tasks)}
    return [c for c in spec.required_columns if c in wanted]


def sample_rows(batches: Iterable[pa.RecordBatch], rows: int, max_rows: int) -> pa.Table:
    """Every k-th row of a day of ``rows`` rows (k = ceil(rows / max_rows)), starting at the
    first: the whole day when it fits, else at most ``max_rows`` rows spread over all of it
    (so every hour and every file is represented), the same rows on every run."""
    step = max(1, -(-rows // max_rows))
    taken, seen = [], 0
    for batch in batches:
        first = (-seen) % step  # the first row of this batch whose day index is a multiple of step
        if step == 1:
            taken.append(batch)
        elif first < batch.num_rows:
            taken.append(batch.take(pa.array(np.arange(first, batch.num_rows, step))))
        seen += batch.num_rows
    return pa.Table.from_batches(taken)


def check_table(checks: list[CheckResult], detail_chars: int = 90) -> str:
    """The gate's checks as a small fixed-width table (one row per check) for the task log."""
    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4g}"

    rows = [("check", "status", "value", "warn", "fail", "detail")]
    rows += [(c.name, c.status.upper(), num(c.value), num(c.warn), num(c.fail),
              c.detail if len(c.detail) <= detail_chars else c.detail[:detail_chars - 3] + "...") for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  " + "  ".join(v.ljust(w) for v, w in zip(r[:5], widths)) + "  " + r[5] for r in rows)


def teacher_lineage(meta: dict[str, Any], teacher: registry.Checkpoint, label_lag_days: int) -> TeacherLineage:
    """The labelling teacher as the labels' manifest records it. Labels committed before
    the manifest carried ``teacher_stale`` are judged against today's ``label_lag_days``."""
    expected = meta.get("expected_staleness_days")
    expected = int(label_lag_days if expected is None else expected)
    stale = meta.get("teacher_stale")
    if stale is None:
        stale = int(meta["staleness_days"]) > expected
    return TeacherLineage(version=str(meta.get("teacher_version") or teacher.version),
                          trained_through=str(meta.get("teacher_trained_through")
                                              or teacher.trained_through.isoformat()),
                          expected_staleness_days=expected, stale=bool(stale))


def _unchanged(uri: str, blobs: dict[str, bytes]) -> bool:
    """True when the gate already published the same decision and figures for this day."""
    if not part.is_published(uri):
        return False
    try:
        return all(part.read_blob(uri, k) == blobs[k] for k in ("decision.json", "shift.json", "labels_check.json"))
    except StorageError:
        return False


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode()

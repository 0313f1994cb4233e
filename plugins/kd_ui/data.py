"""What the KD view shows, read from the pipeline's storage root with kdcore (local or gs://).

Nothing here recomputes a figure: the dashboard reads the published report
(``<root>/reports/<dataset>/``: kd_gain.csv, metrics.csv, gate.csv), a date's view reads
that date's gate record (``quality_uri``: decision.json) and the checkpoints trained
through it (their ``progressive`` metrics), and the lineage reads the labels' and the
checkpoints' metadata. Artifacts are only served by a name listed in a manifest.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import mimetypes
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


class NotFound(Exception):
    """An unknown date, run, artifact or an unpublished record (404)."""


def config_path() -> str:
    """The pipeline config, exactly as the tasks find it (operators.kd_daily.config_path):
    ``$KD_PIPELINE_CONFIG`` or the repo's configs/demo.yaml."""
    try:
        from operators.kd_daily import config_path as tasks_config_path
    except ImportError:  # the repo is not on sys.path: same rule, restated
        path = Path(os.environ.get("KD_PIPELINE_CONFIG") or REPO / "configs" / "demo.yaml")
        return str((path if path.is_absolute() else REPO / path).resolve())
    return tasks_config_path()


@lru_cache(maxsize=4)
def _load(path: str, root_env: str | None):
    from kdcore.config import load_pipeline

    return load_pipeline(path)


def cfg():
    """The pipeline config (cached per config path and KD_STORAGE_ROOT)."""
    return _load(config_path(), os.environ.get("KD_STORAGE_ROOT"))


def parse_day(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise NotFound(f"not a date (YYYY-MM-DD): {value!r}") from None


def _num(v: str) -> Any:
    """A CSV cell as the report wrote it: '' -> None, True/False -> bool, numbers -> float/int."""
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ---------------------------------------------------------------- published report


def report_uri(c=None) -> str:
    from kdcore.storage import fs as sfs

    c = c or cfg()
    return sfs.join(c.root, "reports", c.spec.name)


def report_csv(name: str) -> list[dict[str, Any]]:
    from kdcore.errors import StorageError
    from kdcore.storage import partition as part

    try:
        data = part.read_blob(report_uri(), name)
    except StorageError:
        return []
    return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(data.decode()))]


def report_files() -> list[str]:
    from kdcore.errors import StorageError
    from kdcore.storage import partition as part

    try:
        return sorted(f.name for f in part.read_manifest(report_uri()).files)
    except StorageError:
        return []


def dashboard() -> dict[str, Any]:
    """Over dates: KD gain per student with its interval, mean metrics of teacher, students
    and control, per-day metrics, gate decisions with drift, and label lineage."""
    c = cfg()
    metrics = report_csv("metrics.csv")
    gains = report_csv("kd_gain.csv")
    gates = report_csv("gate.csv")
    files = report_files()
    means: list[dict[str, Any]] = []
    for model in sorted({r["model"] for r in metrics}):
        for task in [t.name for t in c.spec.tasks]:
            sel = [r for r in metrics if r["model"] == model and r["task"] == task]
            if not sel:
                continue
            row = {"model": model, "role": sel[0]["role"], "task": task, "days": len(sel)}
            for k in ("auc", "gauc", "ne", "calibration", "rmse"):
                vals = [r[k] for r in sel if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
                row[k] = sum(vals) / len(vals) if vals else None
            means.append(row)
    return {"dataset": c.spec.name, "root": c.root, "config": config_path(),
            "dates": sorted({r["date"] for r in metrics}), "gains": gains, "means": means, "metrics": metrics,
            "gates": gates, "plots": [f for f in files if f.endswith(".png")], "report_files": files,
            "lineage": lineage()}


# ---------------------------------------------------------------- one date


def _checkpoint(name: str, day: dt.date) -> dict[str, Any] | None:
    """The checkpoint's meta, or None where there is none to show: missing, unreadable, or
    refused as another model's (a misplaced checkpoint is not this model's figures)."""
    from kdcore.errors import LineageError, StorageError
    from kdcore.models import registry

    c = cfg()
    try:
        return registry.find_checkpoint(c.root, c.spec.name, name, day).meta
    except (StorageError, LineageError):
        return None


def gate_record(day: dt.date) -> dict[str, Any] | None:
    """The gate's decision.json for ``day`` (None when no gate ran), with the Data Docs
    pages its manifest lists."""
    from kdcore.errors import StorageError
    from kdcore.quality.daily import quality_uri
    from kdcore.storage import partition as part

    uri = quality_uri(cfg(), day)
    try:
        manifest = part.read_manifest(uri)
        decision = json.loads(part.read_blob(uri, "decision.json", manifest))
    except StorageError:
        return None
    pages = sorted(f.name for f in manifest.files if f.name.startswith("data_docs/") and f.name.endswith(".html"))
    decision["data_docs"] = pages
    decision["checks"] = [{k: _clean(v) for k, v in ch.items()} for ch in decision.get("checks", [])]
    return decision


def day_view(day: dt.date) -> dict[str, Any]:
    """The figures of one partition date: teacher and its freshness, gate decision with
    drift and calibration, Data Docs, and every student's progressive metrics on the date
    next to its control's."""
    c = cfg()
    gate = gate_record(day)
    teacher_ckpt = _checkpoint(c.teacher.name, day)
    labels = labels_for(day)
    teacher: dict[str, Any] = {"name": c.teacher.name}
    from kdcore.records import LabelLineage

    if gate or labels:  # the gate's record names the lineage; without a gate, the labels' manifest
        teacher.update(LabelLineage.pick(gate or labels[0]))
    teacher["refreshed_version"] = teacher_ckpt.get("version") if teacher_ckpt else None
    teacher["progressive"] = _progressive(teacher_ckpt, day)
    students = []
    for s in c.students:
        control = c.control_of(s.name)
        meta, cmeta = _checkpoint(s.name, day), _checkpoint(control, day)
        students.append({"student": s.name, "mode": s.distill.mode, "control": control,
                         "version": meta.get("version") if meta else None,
                         "kd_applied": meta.get("kd_applied") if meta else None,
                         "gate_action": meta.get("gate_action") if meta else None,
                         "label_teacher": meta.get("teacher_version") if meta else None,
                         "metrics": _progressive(meta, day), "control_metrics": _progressive(cmeta, day)})
    for s in students:
        s["delta"] = {task: {k: (v - s["control_metrics"][task][k])
                             for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                             and isinstance(s["control_metrics"].get(task, {}).get(k), (int, float))}
                      for task, m in s["metrics"].items()}
    if gate is None and teacher_ckpt is None and not any(s["version"] for s in students):
        raise NotFound(f"nothing published for {day} under {c.root}")
    return {"date": day.isoformat(), "dataset": c.spec.name, "teacher": teacher, "gate": gate,
            "labels": labels, "students": students}


def _progressive(meta: dict[str, Any] | None, day: dt.date) -> dict[str, dict[str, Any]]:
    """A checkpoint's progressive metrics when they were measured on ``day``."""
    prog = (meta or {}).get("progressive") or {}
    if prog.get("date") != day.isoformat():
        return {}
    return {task: {k: _clean(v) for k, v in m.items()} for task, m in (prog.get("metrics") or {}).items()}


# ---------------------------------------------------------------- lineage


def labels_for(day: dt.date) -> list[dict[str, Any]]:
    """Committed label sets for ``day``: the teacher that made each, from its manifest."""
    from kdcore.errors import StorageError
    from kdcore.labels.store import labels_uri, list_label_versions
    from kdcore.records import LabelLineage
    from kdcore.storage import partition as part

    c = cfg()
    out = []
    for version in list_label_versions(c.root, c.spec.name, day):
        try:
            meta = part.read_manifest(labels_uri(c.root, c.spec.name, day, version)).metadata
        except StorageError:
            continue
        out.append({**LabelLineage.pick(meta), "teacher_version": version, "shards": meta.get("shards")})
    return out


def lineage() -> list[dict[str, Any]]:
    """Per labelled date: which teacher labelled it, and which student checkpoints consumed
    those labels (a student checkpoint's meta names teacher_version and labels_path)."""
    from kdcore.models import registry
    from kdcore.storage import fs as sfs
    from kdcore.storage.manifest import MANIFEST_NAME

    c = cfg()
    base = sfs.join(c.root, "labels", c.spec.name)
    consumers: dict[tuple[str, str], list[str]] = {}
    for s in c.all_students():
        for day in registry.list_checkpoints(c.root, c.spec.name, s.name):
            meta = _checkpoint(s.name, day) or {}
            if meta.get("teacher_version") and meta.get("labels_path"):
                consumers.setdefault((day.isoformat(), meta["teacher_version"]), []).append(s.name)
    days = sorted({rel.split("/")[0][len("date="):] for rel in sfs.list_files(base)
                   if rel.count("/") == 2 and rel.startswith("date=") and rel.endswith("/" + MANIFEST_NAME)})
    rows = []
    for day in days:
        for lab in labels_for(dt.date.fromisoformat(day)):
            rows.append({"date": day, **lab, "students": sorted(consumers.get((day, lab["teacher_version"]), []))})
    return rows


# ---------------------------------------------------------------- artifacts


def _blob(uri: str, name: str) -> tuple[bytes, str]:
    """A file of a published partition, only by a name its manifest lists."""
    from kdcore.errors import StorageError
    from kdcore.storage import partition as part

    try:
        manifest = part.read_manifest(uri)
    except StorageError:
        raise NotFound(f"not published: {uri}") from None
    if name not in {f.name for f in manifest.files}:
        raise NotFound(f"no file {name!r} in {uri}")
    data = part.read_blob(uri, name, manifest)
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if name.endswith((".md", ".csv")):
        kind = "text/plain"
    return data, kind


def report_artifact(name: str) -> tuple[bytes, str]:
    return _blob(report_uri(), name)


def quality_artifact(day: dt.date, name: str) -> tuple[bytes, str]:
    from kdcore.quality.daily import quality_uri

    return _blob(quality_uri(cfg(), day), name)


# ---------------------------------------------------------------- dag runs


def run_date(dag_id: str, run_id: str) -> dt.date:
    """The partition date of a DAG run, resolved as the run's ``resolve`` task does
    (operators.kd_daily.resolve_date): conf/params ``date`` for manual runs, the data
    interval's start for scheduled and backfill runs."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if run is None:
            raise NotFound(f"no run {run_id!r} of DAG {dag_id!r}")
        conf = dict(run.conf or {})
        run_type, start = run.run_type, run.data_interval_start
    try:
        from operators.kd_daily import resolve_date
    except ImportError:
        resolve_date = None
    if resolve_date is not None:
        try:
            return resolve_date(conf.get("date"), run_type, start)
        except Exception as e:  # noqa: BLE001 - AirflowFailException: the run names no date
            raise NotFound(f"run {run_id!r}: {e}") from None
    if conf.get("date"):
        return parse_day(conf["date"])
    if start is None:
        raise NotFound(f"run {run_id!r} names no partition date")
    return start.date()

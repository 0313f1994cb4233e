"""The daily KD pipeline for one date D, as plain functions (the CLI and the Airflow
tasks call these): teacher refresh → labels (sharded, one commit) → quality gate →
students + control → report. Every function takes the config and a date, returns a
JSON-serializable summary, and is idempotent for the same inputs."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

from kdcore.config import PipelineConfig
from kdcore.errors import KDError
from kdcore.labels import materialize as mat
from kdcore.labels.store import labels_uri
from kdcore.storage import partition as part
from kdcore.training import steps

log = logging.getLogger(__name__)
STAGES = ("teacher", "labels", "gate", "students", "report")


def refresh_teacher(cfg: PipelineConfig, day: dt.date, force: bool = False) -> dict[str, Any]:
    return steps.teacher_step(cfg, day, force=force)


def materialize_labels(cfg: PipelineConfig, day: dt.date, teacher_version: str | None = None,
                       force: bool = False) -> dict[str, Any]:
    return mat.materialize(cfg, day, teacher_version, force=force)


def find_labels(cfg: PipelineConfig, day: dt.date, teacher_version: str | None = None) -> str:
    """URI of the committed labels the students of ``day`` read (chosen like the
    materialization chooses its teacher, so both agree without passing state)."""
    version = mat.choose_teacher(cfg, day, teacher_version).version
    uri = labels_uri(cfg.root, cfg.spec.name, day, version)
    if not part.is_published(uri):
        raise KDError(f"labels of teacher {version} for {day} are not materialized ({uri}); "
                      f"run `kd labels materialize --date {day}` first")
    return uri


def gate(cfg: PipelineConfig, day: dt.date, labels: str) -> dict[str, Any]:
    from kdcore.quality.daily import run_gate

    return run_gate(cfg, day, labels)


def train_students(cfg: PipelineConfig, day: dt.date, labels: str | None, action: steps.GateAction,
                   names: Iterable[str] | None = None, force: bool = False) -> dict[str, Any]:
    names = list(names) if names else [s.name for s in cfg.all_students()]
    return {n: steps.student_step(cfg, n, day, labels, action, force=force) for n in names}


def run_day(cfg: PipelineConfig, day: dt.date, stages: Iterable[str] = STAGES,
            students: Iterable[str] | None = None, teacher_version: str | None = None,
            force: bool = False) -> dict[str, Any]:
    from kdcore.data.validate import ensure_valid

    stages = set(stages)
    out: dict[str, Any] = {"date": day.isoformat()}
    # A day that breaks the data contract stops here, before the teacher trains on it: the
    # stale-teacher fallback below is for a failed refresh, never for bad data.
    out["examples"] = ensure_valid(cfg.root, cfg.spec, day, record=True)
    if "teacher" in stages and not teacher_version:
        try:
            out["teacher"] = refresh_teacher(cfg, day, force)
        except KDError as e:  # the last good teacher stays in use, within the staleness policy
            log.error("teacher refresh for %s failed: %s", day, e)
            out["teacher"] = {"error": str(e)}
    if "labels" in stages:
        out["labels"] = materialize_labels(cfg, day, teacher_version, force)
    needs_labels = any(s.distill.uses_teacher for s in cfg.students)
    labels = None
    if needs_labels and {"gate", "students"} & stages:  # the commit just made names them already
        labels = out["labels"]["uri"] if "labels" in out else find_labels(cfg, day, teacher_version)
    action: steps.GateAction = "distill"
    if "gate" in stages and labels:
        out["gate"] = gate(cfg, day, labels)
        action = out["gate"]["action"]
    if "students" in stages:
        out["students"] = train_students(cfg, day, labels, action, students, force)
    return out


def run(cfg: PipelineConfig, start: dt.date, end: dt.date, progress: bool = True, **kwargs: Any) -> list[dict[str, Any]]:
    """Day by day, in date order, so continuous training sees the days in sequence."""
    from kdcore.data.examples import list_days

    if start > end:
        raise KDError(f"the date range {start} .. {end} is reversed (its start is after its end)")
    days = [d for d in list_days(cfg.root, cfg.spec.name) if start <= d <= end]
    if not days:
        raise KDError(f"no example partitions between {start} and {end}")
    if not progress:
        results = [run_day(cfg, d, **kwargs) for d in days]
    else:
        from tqdm import tqdm

        with tqdm(days, desc="kd run", unit="day") as bar:  # closed (own line) before an error is printed
            results = [run_day(cfg, d, **kwargs) for d in bar]
    if "report" in set(kwargs.get("stages", STAGES)):
        # The report covers every published day, so it is built once, after the last day,
        # not once per day; it is attached to the last day's result.
        from kdcore.report.build import build_report

        rep = build_report(cfg)
        results[-1]["report"] = {"uri": rep["uri"], "files": rep.get("files")}
    return results

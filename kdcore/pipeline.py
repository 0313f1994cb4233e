"""The daily KD pipeline for one date D (``kd run``): a walk of the stage graph
(:mod:`kdcore.flow.graph`: validate → teacher refresh → labels (sharded, one commit) →
quality gate → students + control → report), and the single steps the other commands
call. Every function takes the config and a date, returns a JSON-serializable summary,
and is idempotent for the same inputs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from kdcore.config import PipelineConfig
from kdcore.errors import KDError
from kdcore.flow import graph
from kdcore.flow.stage import Run
from kdcore.labels import materialize as mat
from kdcore.storage import fs as sfs
from kdcore.training import steps

STAGES = graph.STAGES


def refresh_teacher(cfg: PipelineConfig, day: dt.date, force: bool = False) -> dict[str, Any]:
    return steps.teacher_step(cfg, day, force=force)


def materialize_labels(cfg: PipelineConfig, day: dt.date, teacher_version: str | None = None,
                       force: bool = False) -> dict[str, Any]:
    return mat.materialize(cfg, day, teacher_version, force=force)


def find_labels(cfg: PipelineConfig, day: dt.date, teacher_version: str | None = None) -> str:
    """URI of the committed labels the students of ``day`` read (:func:`graph.find_labels`)."""
    return sfs.absolute(cfg.root, graph.find_labels(cfg, day, teacher_version).path)


def train_students(cfg: PipelineConfig, day: dt.date, labels: str | None, action: steps.GateAction,
                   names: Iterable[str] | None = None, force: bool = False) -> dict[str, Any]:
    names = list(names) if names else [s.name for s in cfg.all_students()]
    return {n: steps.student_step(cfg, n, day, labels, action, force=force) for n in names}


def run_day(cfg: PipelineConfig, day: dt.date, stages: Iterable[str] = STAGES,
            students: Iterable[str] | None = None, teacher_version: str | None = None,
            force: bool = False) -> dict[str, Any]:
    """One walk of the graph's per-day stages over ``day``; the JSON summary ``kd run`` prints."""
    outputs = graph.walk_day(Run(cfg, day, frozenset(stages), tuple(students) if students else None,
                                 teacher_version, force))
    out: dict[str, Any] = {"date": day.isoformat(), "examples": outputs["validate"]}
    if "teacher" in outputs:
        out["teacher"] = outputs["teacher"]
    if "labels" in outputs:
        ref = outputs["labels"]
        out["labels"] = mat.labels_summary(sfs.absolute(cfg.root, ref.path), ref)
    decision = outputs.get("gate")
    if decision is not None and decision.status != "not_run":  # only a gate that ran is shown
        out["gate"] = decision.result()
    if "students" in outputs:
        out["students"] = outputs["students"]
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
    # The stages that cover every published day (the report) run once, after the last day,
    # not once per day; their results are attached to the last day's result.
    last = Run(cfg, days[-1], frozenset(kwargs.get("stages", STAGES)))
    for stage in graph.GRAPH:
        if not stage.per_day and stage.is_wanted(last):
            rep = graph.run_stage(stage, last, {})
            results[-1][stage.name] = {"uri": rep["uri"], "files": rep.get("files")}
    return results

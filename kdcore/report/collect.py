"""Gather per-day figures from what the pipeline published (checkpoint metadata and
gate decisions) into flat rows; the report never recomputes a metric."""

from __future__ import annotations

import json
import math
from typing import Any

from kdcore.config import PipelineConfig
from kdcore.models import registry
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part


def metric_rows(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One row per (date, model, task): the model's progressive metrics on that date."""
    rows = []
    names = [(cfg.teacher.name, "teacher"), *[(s.name, "control" if s.name in cfg.controls() else "student")
                                               for s in cfg.all_students()]]
    for name, role in names:
        for day in registry.list_checkpoints(cfg.root, cfg.spec.name, name):
            meta = registry.find_checkpoint(cfg.root, cfg.spec.name, name, day).meta
            prog = meta.get("progressive")
            if not prog or not prog.get("metrics"):
                continue
            stale = _stale(meta.get("label_teacher_stale"), meta.get("label_staleness_days"),
                           cfg.policies.label_lag_days)
            for task, m in prog["metrics"].items():
                rows.append({"date": prog["date"], "model": name, "role": role, "task": task,
                             "kd_applied": meta.get("kd_applied"), "staleness": meta.get("label_staleness_days"),
                             "label_teacher": meta.get("teacher_version"), "teacher_stale": stale,
                             **{k: (v if v is None or not isinstance(v, float) or math.isfinite(v) else None)
                                for k, v in m.items()}})
    return sorted(rows, key=lambda r: (r["date"], r["model"], r["task"]))


def gate_rows(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One row per date with the gate decision and its figures, where a gate ran."""
    base = sfs.join(cfg.root, "quality", cfg.spec.name)
    rows = []
    for day in part.list_partitions(base):
        uri = sfs.join(base, f"date={day}")
        try:
            decision = json.loads(part.read_blob(uri, "decision.json"))
        except Exception:  # noqa: BLE001 - an unreadable decision is reported as missing
            continue
        checks = {c["name"]: c for c in decision.get("checks", [])}
        staleness = decision.get("staleness_days", (checks.get("staleness_days") or {}).get("value"))
        row = {"date": day, "status": decision.get("status"), "action": decision.get("action"),
               "teacher_version": decision.get("teacher_version"),
               "teacher_stale": _stale(decision.get("teacher_stale"), staleness, cfg.policies.label_lag_days,
                                       (checks.get("teacher_fresh") or {}).get("status")),
               "expected_staleness_days": decision.get("expected_staleness_days")}
        for name, check in checks.items():
            value = check.get("value")
            # whole days: staleness is a count of days, not a ratio
            row[name] = int(value) if name in _DAY_CHECKS and isinstance(value, float) else value
        rows.append(row)
    return rows


_DAY_CHECKS = ("staleness_days", "teacher_fresh")


def _stale(flag: bool | None, staleness: float | None, label_lag_days: int,
           check_status: str | None = None) -> bool | None:
    """Whether the labels came from a teacher staler than the label policy asks for: the
    recorded flag; for records written before the flag existed, the teacher_fresh check's
    status, else the recorded staleness against today's label_lag_days (None: unknown)."""
    if flag is not None:
        return bool(flag)
    if check_status is not None:
        return check_status != "pass"
    if staleness is None:
        return None
    return int(staleness) > label_lag_days


def model_rows(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One row per model from its newest checkpoint: served size and cost (what a serving
    budget is about), the features it reads, its recipe, and each task's share of its
    training loss over its last day (so no task silently dominates by scale)."""
    rows = []
    names = [(cfg.teacher.name, "teacher"), *[(s.name, "control" if s.name in cfg.controls() else "student")
                                               for s in cfg.all_students()]]
    for name, role in names:
        days = registry.list_checkpoints(cfg.root, cfg.spec.name, name)
        if not days:
            continue
        meta = registry.find_checkpoint(cfg.root, cfg.spec.name, name, max(days)).meta
        feats = meta.get("features") or []
        rows.append({"model": name, "role": role, "trained_through": meta["trained_through"],
                     "params": meta.get("serving_params", meta.get("params")),
                     "flops_per_example": meta.get("serving_flops_per_example", meta.get("flops_per_example")),
                     "features": len(feats), "privileged": len([f for f in feats if f in cfg.spec.privileged]),
                     "lr": meta["model"]["lr"], "batch_size": meta["model"]["batch_size"],
                     "steps_total": meta.get("steps_total"),
                     **{f"loss_share:{t}": v for t, v in ((meta.get("train") or {}).get("loss_share") or {}).items()}})
    return rows


def not_trained(cfg: PipelineConfig) -> dict[str, list[str]]:
    """Per date on which some model (teacher, student or control) was trained, the models
    that were not: a partial run (a subset of students, a stage left out) or a failed
    task. Only dates after a model's first checkpoint count (a model added later is not
    'missing' before it existed). A lineage skips such a date silently (the next day
    warm-starts from the newest checkpoint before it); the report lists it."""
    names = [cfg.teacher.name, *[s.name for s in cfg.all_students()]]
    trained = {n: set(registry.list_checkpoints(cfg.root, cfg.spec.name, n)) for n in names}
    dates = sorted(set().union(*trained.values())) if trained else []
    out: dict[str, list[str]] = {}
    for day in dates:
        missing = [n for n in names if trained[n] and min(trained[n]) < day and day not in trained[n]]
        if missing:
            out[day.isoformat()] = missing
    return out

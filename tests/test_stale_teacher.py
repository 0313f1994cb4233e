"""A stale-teacher fallback is a visible state: when the teacher refresh fails, the last
good teacher labels the day within ``policies.max_label_staleness_days``, and the labels'
metadata, the gate (``teacher_fresh`` warns), the Airflow tasks (log, asset event extra,
gate decision) and the report all say so. A fresh day says the opposite."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import csv
import io
import json
import logging
from collections import defaultdict
from types import SimpleNamespace

import pytest

from kdcore import pipeline
from kdcore.errors import KDError
from kdcore.quality import daily
from kdcore.quality.daily import run_gate
from kdcore.records import GateDecision
from kdcore.report.build import build_report
from kdcore.storage import partition as part
from kdcore.training import steps
from tests.pipeline_fixtures import KD, TINY, kd, kd_base, local  # noqa: F401  (fixtures)

GATED = ("teacher", "labels", "gate", "students")


def _stale_section(md: str) -> str:
    assert "## Labels from a stale teacher" in md
    return md.split("## Labels from a stale teacher", 1)[1].split("\n## ", 1)[0]


def test_failed_refresh_is_visible_in_labels_gate_and_report(kd: KD, monkeypatch):
    cfg = kd.cfg
    d1, d2, d3 = kd.day(1), kd.day(2), kd.day(3)
    assert cfg.policies.label_lag_days == 1  # tiny.yaml: out-of-sample labels, one day of lag

    # A normal day: labelled by the teacher through d1 - 1, as the policy asks.
    r1 = pipeline.run_day(cfg, d1, stages=GATED)
    fresh_teacher = r1["teacher"]["version"]  # trained through d1 by this run
    assert r1["labels"]["teacher_stale"] is False and r1["labels"]["staleness_days"] == 1
    assert part.read_manifest(r1["labels"]["uri"]).metadata["teacher_stale"] is False
    g1 = r1["gate"]
    assert g1["teacher_stale"] is False and g1["teacher_version"] == kd.boot["teacher"]["version"]
    assert g1["checks"]["teacher_fresh"]["status"] == "pass"
    assert "teacher_fresh" not in g1["summary"]  # a passing check is not named among the warnings
    d1_record = json.loads(part.read_blob(g1["uri"], "decision.json"))
    assert d1_record["teacher_stale"] is False and d1_record["staleness_days"] == 1
    rep = build_report(cfg)
    assert "None: every day was labelled by a teacher as fresh" in _stale_section(rep["markdown"])
    assert rep["stale_teacher_days"] == []

    # The refresh fails from d2 on: d2 is still labelled by the teacher through d1 (fresh),
    # d3 falls back to it too, two days stale where the policy expects one.
    def boom(cfg, day, force=False):
        raise KDError(f"refresh for {day} exploded")

    monkeypatch.setattr(steps, "teacher_step", boom)
    r2 = pipeline.run_day(cfg, d2, stages=("teacher", "labels"))
    assert "error" in r2["teacher"] and r2["labels"]["teacher_stale"] is False
    r3 = pipeline.run_day(cfg, d3, stages=GATED)
    assert "error" in r3["teacher"]

    # labels
    assert r3["labels"]["teacher_version"] == fresh_teacher
    assert r3["labels"]["teacher_stale"] is True and r3["labels"]["staleness_days"] == 2
    meta = part.read_manifest(r3["labels"]["uri"]).metadata
    assert meta["teacher_stale"] is True and meta["staleness_days"] == 2 and meta["expected_staleness_days"] == 1

    # gate: teacher_fresh warns (the staleness_days check alone would pass at 2 days: warn > 2)
    g3 = r3["gate"]
    assert g3["checks"]["staleness_days"]["status"] == "pass"
    assert g3["checks"]["teacher_fresh"] == {"value": 2.0, "status": "warn"}
    assert g3["status"] != "pass"
    assert g3["teacher_stale"] is True and g3["teacher_version"] == fresh_teacher
    assert g3["staleness_days"] == 2 and g3["expected_staleness_days"] == 1
    assert "teacher_fresh = 2 > warn 1" in g3["summary"]
    record = json.loads(part.read_blob(g3["uri"], "decision.json"))
    assert record["teacher_stale"] is True and record["teacher_version"] == fresh_teacher
    assert record["teacher_trained_through"] == d1.isoformat()
    check = next(c for c in record["checks"] if c["name"] == "teacher_fresh")
    assert check["status"] == "warn"
    for part_ in (f"FALLBACK: labels come from teacher {fresh_teacher}", f"trained through {d1.isoformat()}",
                  "2 day(s) stale", "the label policy expects 1"):
        assert part_ in check["detail"], check["detail"]
    assert part.read_manifest(g3["uri"]).metadata["teacher_stale"] is True

    # the gate's record is idempotent: a second gate on the same labels publishes nothing new
    manifest = (local(g3["uri"]) / "_MANIFEST.json").read_bytes()
    decision = part.read_blob(g3["uri"], "decision.json")
    again = run_gate(cfg, d3, r3["labels"]["uri"])
    assert (local(g3["uri"]) / "_MANIFEST.json").read_bytes() == manifest
    assert part.read_blob(g3["uri"], "decision.json") == decision
    assert again["teacher_stale"] is True and again["checks"] == g3["checks"]

    # report: the gate table names the teacher and the fallback, the stale section the date
    rep = build_report(cfg)
    md = rep["markdown"]
    assert "| date | status | action | teacher | fallback | max PSI | max JS | staleness (days) |" in md
    row3 = next(line for line in md.splitlines() if line.startswith(f"| {d3} | {g3['status']} |"))
    assert f"| {fresh_teacher} | **yes (stale)** |" in row3 and row3.endswith("| 2 |"), row3
    row1 = next(line for line in md.splitlines() if line.startswith(f"| {d1} | {g1['status']} |"))
    assert f"| {kd.boot['teacher']['version']} | no |" in row1 and row1.endswith("| 1 |"), row1
    assert ".0000 |" not in row1 + row3  # staleness in whole days
    section = _stale_section(md)
    assert f"- {d3}: teacher {fresh_teacher}, 2 day(s) stale (expected 1); gate {g3['status']}" in section
    assert str(d1) not in section and str(d2) not in section and "None:" not in section
    assert rep["stale_teacher_days"] == [d3.isoformat()]
    gates = {g["date"]: g for g in csv.DictReader(io.StringIO(part.read_blob(rep["uri"], "gate.csv").decode()))}
    assert gates[d3.isoformat()]["teacher_stale"] == "True" and gates[d1.isoformat()]["teacher_stale"] == "False"
    assert gates[d3.isoformat()]["staleness_days"] == "2"


def test_stale_dates_from_student_checkpoints_without_a_gate(kd: KD, monkeypatch):
    """A day trained without a gate still shows in the report's stale section, read from
    the distilling students' checkpoints (old ones without the flag included)."""
    from kdcore.report import build, collect

    cfg, d2 = kd.cfg, kd.day(2)
    monkeypatch.setattr(daily, "decide", lambda cfg, day, labels: GateDecision(
        date=day.isoformat(), status="pass", action="distill", summary=""))
    out = pipeline.run_day(cfg, d2, stages=("labels", "gate", "students"))  # teacher through B: 2 days stale
    assert out["labels"]["teacher_stale"] is True
    rows = collect.metric_rows(cfg)
    aux = [r for r in rows if r["model"] == "student_aux" and r["date"] == d2.isoformat()]
    assert aux and all(r["teacher_stale"] is True and r["staleness"] == 2 for r in aux)
    assert all(r["teacher_stale"] is None for r in rows if r["model"] == "control")
    stale = build.stale_days(rows, [])
    assert list(stale) == [d2.isoformat()] and stale[d2.isoformat()]["teacher"] == kd.boot["teacher"]["version"]
    # a checkpoint written before label_teacher_stale existed: judged by its staleness
    for r in rows:
        r["teacher_stale"] = collect._stale(None, r["staleness"], cfg.policies.label_lag_days)
    assert list(build.stale_days(rows, [])) == [d2.isoformat()]
    assert collect._stale(None, 1, 1) is False and collect._stale(None, None, 1) is None


# ---------------------------------------------------------------- the Airflow tasks


@pytest.fixture
def ops_log():
    """The operators' log records (Airflow's logging setup keeps them from caplog)."""
    from operators import kd_daily as ops

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    old = ops.log.level
    ops.log.addHandler(handler)
    ops.log.setLevel(logging.INFO)
    try:
        yield records
    finally:
        ops.log.removeHandler(handler)
        ops.log.setLevel(old)


class _TI:
    def __init__(self):
        self.pushed = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


def _plan(kd: KD, day, stages=("labels", "gate")) -> dict:
    return {"date": day.isoformat(), "config": str(TINY), "root": kd.cfg.root, "dataset": kd.cfg.spec.name,
            "stages": list(stages), "students": [], "teacher_version": None, "force": False,
            "shards": kd.cfg.labels.shards}


def test_airflow_tasks_say_fallback(kd: KD, ops_log):
    from operators import kd_daily as ops

    d2 = kd.day(2)  # the newest teacher is through B: two days stale, the policy expects one
    boot = kd.boot["teacher"]["version"]
    plan = _plan(kd, d2)
    shards = ops.choose_teacher.function(plan)
    assert [s["teacher_version"] for s in shards] == [boot] * plan["shards"]
    warnings = [r.getMessage() for r in ops_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"FALLBACK: labels for {d2} come from stale teacher {boot}")
    assert "2 day(s) stale" in warnings[0] and "refresh_teacher failed or was skipped" in warnings[0]

    from kdcore.labels import materialize as mat

    for s in shards:  # what the mapped materialize_labels task does (it needs a task context)
        mat.materialize_shard(kd.cfg, d2, s["shard"], plan["shards"], s["teacher_version"])
    events = defaultdict(SimpleNamespace)
    out = ops.commit_labels.function(plan, shards, outlet_events=events)
    extra = events[ops.LABELS_ASSET].extra
    assert extra == {"date": d2.isoformat(), "uri": out["uri"], "rows": out["rows"], "teacher_version": boot,
                     "staleness_days": 2, "teacher_stale": True}

    ti = _TI()
    decision = ops.quality_gate.function(plan, ti=ti)
    assert ti.pushed[ops.DECISION_KEY] == decision
    assert decision["teacher_stale"] is True and decision["teacher_version"] == boot
    assert decision["checks"]["teacher_fresh"]["status"] == "warn" and decision["status"] == "warn"

    # without the gate stage the decision still carries the fallback, from the labels
    decision = ops.quality_gate.function(_plan(kd, d2, stages=("labels", "students")), ti=_TI())
    assert decision["status"] == "not_run" and decision["teacher_stale"] is True
    assert decision["teacher_version"] == boot


def test_fresh_labels_log_no_fallback(kd: KD, ops_log):
    from operators import kd_daily as ops

    ops.choose_teacher.function(_plan(kd, kd.day(1)))
    assert not [r for r in ops_log if r.levelno >= logging.WARNING]
    assert any("come from" in r.getMessage() for r in ops_log)


@pytest.mark.parametrize("stale", [True, False, None])
def test_labels_event_extra(stale):
    from operators.kd_daily import labels_event_extra

    out = {"uri": "file:///r/labels", "rows": 7, "teacher_version": "v1", "changed": True, "bytes": 1,
           "staleness_days": 2, "teacher_stale": stale}
    assert labels_event_extra("1998-01-05", out) == {
        "date": "1998-01-05", "uri": "file:///r/labels", "rows": 7, "teacher_version": "v1",
        "staleness_days": 2, "teacher_stale": stale}


def test_fallback_message_names_the_teacher_and_why():
    import datetime as dt

    from operators.kd_daily import fallback_message

    msg = fallback_message(dt.date(1998, 1, 5), "v9", dt.date(1998, 1, 2), 3, 1, pinned=False)
    assert msg.startswith("FALLBACK: labels for 1998-01-05 come from stale teacher v9 (trained through 1998-01-02)")
    assert "3 day(s) stale, the label policy expects 1" in msg and "refresh_teacher failed" in msg
    assert "pinned" in fallback_message(dt.date(1998, 1, 5), "v9", dt.date(1998, 1, 2), 3, 1, pinned=True)

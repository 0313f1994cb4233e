"""kd_daily fails fast and says why once: bad params stop the run at ``resolve`` and every
downstream task that still runs (trigger rules all_done / none_failed) skips at once
instead of raising a TypeError three times; errors a retry cannot change are not
retried; a missing partition fails with its URI after a declared timeout; a partial run
(a subset of students) is listed in the report."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from kdcore.errors import DataError, KDError, LineageError, SpecError, StorageError, TransientStorageError
from tests.pipeline_fixtures import KD, TINY, kd, kd_base  # noqa: F401  (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))  # as Airflow's plugin manager does
from kd_ui.run_notes import partition_note  # noqa: E402


class _TI:
    def __init__(self, decision=None, first_reschedule=None):
        self.pushed, self.decision, self.first = {}, decision, first_reschedule

    def xcom_push(self, key, value):
        self.pushed[key] = value

    def xcom_pull(self, task_ids=None, key=None):
        return self.decision

    def get_first_reschedule_date(self, context):
        return self.first


def _plan(kd: KD, day, stages=("gate", "students"), students=()) -> dict:
    return {"date": day.isoformat(), "config": str(TINY), "root": kd.cfg.root, "dataset": kd.cfg.spec.name,
            "stages": list(stages), "students": list(students), "not_trained": [], "teacher_version": None,
            "force": False, "shards": kd.cfg.labels.shards}


# ---------------------------------------------------------------- 1. no plan: skip, never TypeError


def _calls():
    from operators import kd_daily as ops

    return {
        "student_fanout": lambda: ops.student_fanout.function(None),
        "wait_for_examples": lambda: ops.wait_for_examples.function(None, ti=_TI()),
        "refresh_teacher": lambda: ops.refresh_teacher.function(None),
        "choose_teacher": lambda: ops.choose_teacher.function(None),
        "materialize_labels": lambda: ops.materialize_shard.function(None, "t-19980101-x", 0),
        "commit_labels": lambda: ops.commit_labels.function(None, []),
        "quality_gate": lambda: ops.quality_gate.function(None, ti=_TI()),
        "train_student": lambda: ops.train_student.function(None, "student_aux", ti=_TI()),
        "report": lambda: ops.report.function(None),
    }


@pytest.mark.parametrize("task_id", list(_calls()))
def test_downstream_tasks_skip_without_a_plan(task_id):
    with pytest.raises(AirflowSkipException, match="'resolve' failed"):
        _calls()[task_id]()


_BAD_RUNS = r"""
import datetime as dt, json, sys, time
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags["kd_daily"]
for conf in json.loads(sys.argv[2]):
    t = time.monotonic()
    run = dag.test(logical_date=dt.datetime.now(dt.UTC), run_conf=conf)
    states = {f"{ti.task_id}[{ti.map_index}]": (str(ti.state), ti.try_number) for ti in run.get_task_instances()}
    print("BADRUN " + json.dumps({"conf": conf, "state": str(run.state), "tasks": states,
                                   "seconds": round(time.monotonic() - t, 1)}), flush=True)
"""


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    from tests.airflow_helpers import REPO, airflow_env, init_airflow

    base = tmp_path_factory.mktemp("kd-fail-fast")
    (base / "store").mkdir()
    env = airflow_env(base / "airflow", base / "store")
    init_airflow(env)
    confs = [{}, {"date": "1998-02-20", "students": ["no_such_student"]}]
    proc = subprocess.run([sys.executable, "-c", _BAD_RUNS, str(REPO / "dags" / "kd_daily.py"), json.dumps(confs)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    runs = [json.loads(x.split(" ", 1)[1]) for x in proc.stdout.splitlines() if x.startswith("BADRUN ")]
    assert len(runs) == len(confs), proc.stdout[-4000:] + proc.stderr[-8000:]
    return runs, proc.stdout + proc.stderr


def test_bad_params_fail_the_run_at_resolve_once(bad_runs):
    runs, output = bad_runs
    for run in runs:
        assert run["state"] == "failed", run
        tasks = run["tasks"]
        assert tasks["resolve[-1]"] == ["failed", 1], run  # AirflowFailException: one try, no retry
        failed = {t for t, (state, _) in tasks.items() if state == "failed"}
        assert failed == {"resolve[-1]"}, run  # one red task, one message
        for t, (state, tries) in tasks.items():
            assert state in ("failed", "skipped", "upstream_failed"), (t, state)
            assert tries <= 1, (t, tries)  # nothing retried
        assert tasks["choose_teacher[-1]"][0] == "skipped", run  # all_done: ran, found no plan, skipped
        assert run["seconds"] < 60, run  # seconds, not minutes of retry backoff
    assert "TypeError" not in output
    assert "must name its partition" in output and "params.students: unknown ['no_such_student']" in output


# ---------------------------------------------------------------- 2. permanent errors are not retried


@pytest.mark.parametrize("exc", [DataError, SpecError, LineageError, KDError, StorageError])
def test_permanent_errors_fail_without_retry(exc):
    from operators.kd_daily import _no_retry

    with pytest.raises(AirflowFailException, match="not retried"):
        with _no_retry("step"):
            raise exc("bad input")


def test_storage_errors_still_retry():
    """Transient ones: a StorageError a retry cannot change fails like the others
    (tests/test_errors_transient.py)."""
    from operators.kd_daily import _no_retry

    with pytest.raises(StorageError):
        with _no_retry("step"):
            raise TransientStorageError("gs://bucket/x: 503")


def test_a_task_body_logs_its_peak_rss_when_it_finishes_and_fails_like_no_retry(caplog):
    from operators.kd_daily import _task_body

    caplog.set_level("INFO", logger="operators.kd_daily")
    with _task_body("teacher refresh for 2026-01-02"):
        pass
    done = [r.getMessage() for r in caplog.records if "peak RSS" in r.getMessage()]
    assert len(done) == 1 and done[0].startswith("teacher refresh for 2026-01-02: done, peak RSS ")
    assert float(done[0].split("peak RSS ")[1].removesuffix(" MB")) > 10  # a Python process holds more
    caplog.clear()
    with pytest.raises(AirflowFailException, match="not retried"):
        with _task_body("step"):
            raise DataError("bad input")
    assert not [r for r in caplog.records if "peak RSS" in r.getMessage()]  # a failed body reports nothing


def test_gate_without_labels_fails_without_retry(kd: KD):
    from operators import kd_daily as ops

    with pytest.raises(AirflowFailException, match="not materialized"):
        ops.quality_gate.function(_plan(kd, kd.day(1)), ti=_TI())


def test_unknown_student_fails_without_retry(kd: KD, monkeypatch):
    from operators import kd_daily as ops

    monkeypatch.setattr(ops, "_label", lambda text: None)  # needs a task context
    day = kd.day(1)
    ti = _TI(decision={"date": day.isoformat(), "action": "distill", "status": "pass", "labels_uri": None})
    with pytest.raises(AirflowFailException, match="no_such_student"):
        ops.train_student.function(_plan(kd, day), "no_such_student", ti=ti)


# ---------------------------------------------------------------- 3. a missing partition, by name


def test_missing_partition_fails_after_the_timeout_naming_the_uri(kd: KD):
    from operators import kd_daily as ops

    plan = _plan(kd, dt.date(2031, 1, 1))  # never published
    task = SimpleNamespace(timeout=4 * 3600.0, poke_interval=300.0)
    early = _TI(first_reschedule=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    assert ops.wait_for_examples.function(plan, ti=early, task=task).is_done is False  # keeps waiting
    late = _TI(first_reschedule=dt.datetime.now(dt.UTC) - dt.timedelta(hours=3, minutes=56))
    with pytest.raises(AirflowFailException) as e:
        ops.wait_for_examples.function(plan, ti=late, task=task)
    assert "2031-01-01" in str(e.value) and "not published at" in str(e.value)
    assert "examples" in str(e.value) and str(kd.root) in str(e.value)


# ---------------------------------------------------------------- 7. partial runs in the plan and the report


def test_partial_run_is_in_the_plan_and_the_report(kd: KD, monkeypatch):
    from kdcore import pipeline
    from kdcore.report.build import build_report
    from operators import kd_daily as ops

    cfg = kd.cfg
    names = [s.name for s in cfg.all_students()]
    subset, rest = names[:1], names[1:]
    assert rest
    d1 = kd.day(1)

    monkeypatch.setenv("KD_PIPELINE_CONFIG", str(TINY))
    ctx = {"params": {"date": d1.isoformat(), "students": subset, "stages": None, "teacher_version": None,
                      "force": False},
           "dag_run": SimpleNamespace(run_type="manual"), "data_interval_start": None, "logical_date": None}
    plan = ops.resolve.function(**ctx)
    assert plan["students"] == subset and plan["not_trained"] == rest
    # the run list's note (kd_ui's listener) reads the partition the same way resolve does
    assert partition_note("manual", ctx["params"], None) == f"partition {d1} · students: {subset[0]} · stages: all"

    pipeline.run_day(cfg, d1, stages=("teacher", "labels", "gate"))
    from kdcore.training import steps

    labels = pipeline.find_labels(cfg, d1)
    for name in subset:
        steps.student_step(cfg, name, d1, labels if cfg.student(name).distill.uses_teacher else None, "distill")
    rep = build_report(cfg)
    assert rep["not_trained_days"] == {d1.isoformat(): rest}
    md = rep["markdown"]
    section = md.split("## Models not trained", 1)[1].split("\n## ", 1)[0]
    assert f"- {d1}: not trained: {', '.join(rest)}" in section
    for name in rest:
        assert f"| {d1} | {name} | — | not trained |" in md


def test_full_run_has_no_not_trained_days(kd: KD):
    from kdcore import pipeline
    from kdcore.report.build import build_report

    pipeline.run_day(kd.cfg, kd.day(1))
    rep = build_report(kd.cfg)
    assert rep["not_trained_days"] == {}
    assert "None: on every day some model was trained, every model was trained." in rep["markdown"]


@pytest.mark.parametrize(("run_type", "conf", "start", "note"), [
    ("scheduled", {}, dt.datetime(1998, 2, 20, tzinfo=dt.UTC), "partition 1998-02-20 · students: all · stages: all"),
    ("backfill", None, dt.datetime(1998, 2, 21, tzinfo=dt.UTC), "partition 1998-02-21 · students: all · stages: all"),
    ("manual", {"date": "1998-02-22", "students": ["a", "b"], "stages": ["students"]}, None,
     "partition 1998-02-22 · students: a, b · stages: students"),
    ("asset_triggered", {"date": "1998-02-23"}, dt.datetime(1998, 1, 1, tzinfo=dt.UTC),
     "partition 1998-02-23 · students: all · stages: all"),
    ("manual", {}, dt.datetime(1998, 2, 20, tzinfo=dt.UTC), None),  # a manual run's interval is not its partition
    ("manual", {"date": "1998-02-30"}, None, None),  # resolve fails it; no misleading note
    ("scheduled", {}, None, None),
    # names outside the params' pattern (a conf that skipped their validation): no markup in the run list
    ("manual", {"date": "1998-02-22", "students": ["<img src=x onerror=alert(1)>"]}, None, None),
    ("manual", {"date": "1998-02-22", "stages": "students"}, None, None),
])
def test_run_note_names_the_partition_resolve_uses(run_type, conf, start, note):
    assert partition_note(run_type, conf, start) == note

"""DAG files import cleanly, import nothing heavy at top level, and kd_daily's tasks and
params are configured as documented (retries, execution_timeout, pool, params schema)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kdcore.pipeline import STAGES
from tests.airflow_helpers import REPO

DAG_FILE = REPO / "dags" / "kd_daily.py"
HEAVY = ("torch", "pyarrow", "kdcore", "pandas", "great_expectations", "matplotlib")

_PROBE = r"""
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
t = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.perf_counter() - t
dag = bag.dags.get("kd_daily")
tasks = {}
if dag:
    for task in dag.tasks:
        tasks[task.task_id] = {"retries": task.retries, "timeout": task.execution_timeout.total_seconds()
                               if task.execution_timeout else None, "pool": task.pool,
                               "trigger_rule": str(task.trigger_rule),
                               "sensor_timeout": getattr(task, "timeout", None) if task.task_id ==
                               "wait_for_examples" else None,
                               "max_active_tis_per_dag": task.max_active_tis_per_dag}
heavy = [m for m in sys.argv[2].split(",") if m in sys.modules]
bad = {}
if dag:
    import copy
    for name, value in {"date": "1998-13-45", "stages": ["teachr"], "force": "yes"}.items():
        try:
            copy.deepcopy(dag.params.get_param(name)).resolve(value=value)
            bad[name] = "accepted"
        except Exception as e:
            bad[name] = type(e).__name__
    for name, value in {"date": "1998-01-05", "students": ["student_aux"], "stages": ["students"],
                        "teacher_version": None, "force": True}.items():
        copy.deepcopy(dag.params.get_param(name)).resolve(value=value)
    for name in ("date", "students", "teacher_version", "stages", "force"):  # optional: null is valid
        copy.deepcopy(dag.params.get_param(name)).resolve(value=None)
schemas = {k: {**dag.params.get_param(k).schema, "description": dag.params.get_param(k).description}
           for k in dag.params} if dag else {}
print("PROBE " + json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                             "dags": sorted(bag.dags), "tasks": tasks, "heavy": heavy,
                             "seconds": seconds, "params": bad, "schemas": schemas,
                             "schedule": type(dag.timetable).__name__ if dag else None,
                             "max_active_runs": dag.max_active_runs if dag else None,
                             "catchup": dag.catchup if dag else None}))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    from tests.airflow_helpers import airflow_env

    base = tmp_path_factory.mktemp("kd-integrity")
    env = airflow_env(base / "airflow", base / "store")
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(DAG_FILE), ",".join(HEAVY)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1].split(" ", 1)[1])


def test_imports_without_errors(probe):
    assert probe["errors"] == {}
    assert "kd_daily" in probe["dags"]


def test_nothing_heavy_at_top_level(probe):
    assert probe["heavy"] == [], f"DAG file imports {probe['heavy']} at parse time"


def test_every_task_has_retries_and_timeout(probe):
    assert probe["tasks"]
    for task_id, t in probe["tasks"].items():
        assert t["retries"] >= 1, task_id
        assert t["timeout"] and t["timeout"] > 0, task_id
    assert probe["tasks"]["refresh_teacher"]["pool"] == "kd_training"
    assert probe["tasks"]["train_student"]["pool"] == "kd_training"


def test_timetable_and_runs(probe):
    assert probe["schedule"] == "CronDataIntervalTimetable"
    # > 1: a scheduled run waiting for a partition that never arrives does not block ad hoc runs
    assert probe["max_active_runs"] >= 2
    assert probe["catchup"] is False
    # ... while the teacher trains one date at a time, across runs
    assert probe["tasks"]["refresh_teacher"]["max_active_tis_per_dag"] == 1


def test_sensor_timeout_is_declared_and_finite(probe):
    # tests/airflow_helpers.airflow_env sets KD_SENSOR_TIMEOUT_SECONDS=20 for the DAG processor
    assert probe["tasks"]["wait_for_examples"]["sensor_timeout"] == 20


def test_sensor_timeout_default_is_hours_not_half_a_day(monkeypatch):
    from operators import kd_daily as ops

    monkeypatch.delenv("KD_SENSOR_TIMEOUT_SECONDS", raising=False)
    assert ops.sensor_timeout() == 4 * 3600
    monkeypatch.setenv("KD_SENSOR_TIMEOUT_SECONDS", "90")
    assert ops.sensor_timeout() == 90


def test_every_entry_point_declares_the_sensor_timeout():
    ui = (REPO / "scripts" / "ui.sh").read_text()
    assert 'KD_SENSOR_TIMEOUT_SECONDS="${KD_SENSOR_TIMEOUT_SECONDS:-' in ui
    from scripts import demo

    env = demo.airflow_env(REPO / "var" / "x", REPO / "var" / "y", 8080)
    assert 0 < float(env["KD_SENSOR_TIMEOUT_SECONDS"]) <= 3600
    assert "KD_SENSOR_TIMEOUT_SECONDS" in (REPO / "docs" / "airflow.md").read_text()


def test_trigger_form_params(probe):
    """Airflow 3's form marks a typed param whose type lacks "null" as required; every
    kd_daily param is optional. 'stages' renders as a multi-select of the known stages."""
    schemas = probe["schemas"]
    assert set(schemas) == {"date", "students", "teacher_version", "stages", "force"}
    for name, schema in schemas.items():
        assert isinstance(schema["type"], list) and "null" in schema["type"], name
    stages = schemas["stages"]
    assert "array" in stages["type"] and stages["items"]["enum"] == list(STAGES)
    assert stages["examples"] == list(STAGES)  # the UI's multi-select needs examples (or enum) on the array
    assert set(stages["values_display"]) == set(STAGES)
    assert schemas["date"]["format"] == "date"
    assert "backfill" in schemas["date"]["description"].lower()


def test_params_schema_rejects_bad_values(probe):
    assert probe["params"] == {"date": "ParamValidationError", "stages": "ParamValidationError",
                               "force": "ParamValidationError"}


def test_stages_mirror_the_library():
    from kdcore.pipeline import STAGES
    from operators.kd_daily import STAGES as DAG_STAGES

    assert tuple(DAG_STAGES) == tuple(STAGES)


@pytest.mark.parametrize("run_type,param,start,expected", [
    ("scheduled", None, "1998-01-05", "1998-01-05"),
    ("backfill", None, "1998-01-05", "1998-01-05"),
    ("manual", "1998-01-07", None, "1998-01-07"),
    ("asset_triggered", "1998-01-07", None, "1998-01-07"),
])
def test_resolve_date(run_type, param, start, expected):
    import datetime as dt

    from operators.kd_daily import resolve_date

    interval = dt.datetime.fromisoformat(start).replace(tzinfo=dt.UTC) if start else None
    assert resolve_date(param, run_type, interval) == dt.date.fromisoformat(expected)


@pytest.mark.parametrize("run_type,param,start,logical", [
    ("manual", None, None, None),  # a manual run must name its date
    ("manual", None, "1998-01-05", None),  # ... even with a logical date
    ("backfill", "1998-01-09", "1998-01-05", None),  # a conf date contradicting the partition
    ("backfill", "1998-01-05", "1998-01-05", "1998-01-05"),  # a backfill never takes a date, even an equal one
    # a failed manual run (logical 01-06, interval [01-05, 01-06)) reprocessed by a backfill
    ("backfill", None, "1998-01-05", "1998-01-06"),
    ("scheduled", None, "1998-01-05", "1998-01-06"),
    ("scheduled", None, None, None),
])
def test_resolve_date_fails_fast(run_type, param, start, logical):
    import datetime as dt

    from airflow.sdk.exceptions import AirflowFailException

    from operators.kd_daily import resolve_date

    interval = dt.datetime.fromisoformat(start).replace(tzinfo=dt.UTC) if start else None
    logical_date = dt.datetime.fromisoformat(logical).replace(tzinfo=dt.UTC) if logical else None
    with pytest.raises(AirflowFailException) as e:
        resolve_date(param, run_type, interval, logical_date)
    if run_type == "backfill" and logical and logical != start:
        assert "reprocessed by a backfill" in str(e.value) and "1998-01-06" in str(e.value)


def test_backfill_run_matching_its_logical_date_resolves():
    import datetime as dt

    from operators.kd_daily import resolve_date

    d = dt.datetime(1998, 1, 5, tzinfo=dt.UTC)
    assert resolve_date(None, "backfill", d, d) == dt.date(1998, 1, 5)
    assert resolve_date("1998-01-05", "scheduled", d, d) == dt.date(1998, 1, 5)

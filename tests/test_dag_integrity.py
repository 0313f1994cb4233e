"""DAG files import cleanly, import nothing heavy at top level, and kd_daily's tasks and
params are configured as documented (retries, execution_timeout, pool, params schema)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
                               "trigger_rule": str(task.trigger_rule)}
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
print("PROBE " + json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                             "dags": sorted(bag.dags), "tasks": tasks, "heavy": heavy,
                             "seconds": seconds, "params": bad,
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


def test_parse_is_fast(probe):
    assert probe["seconds"] < 2.0  # `airflow dags report` measures it (< 0.5 s); generous for CI


def test_every_task_has_retries_and_timeout(probe):
    assert probe["tasks"]
    for task_id, t in probe["tasks"].items():
        assert t["retries"] >= 1, task_id
        assert t["timeout"] and t["timeout"] > 0, task_id
    assert probe["tasks"]["refresh_teacher"]["pool"] == "kd_training"
    assert probe["tasks"]["train_student"]["pool"] == "kd_training"


def test_timetable_and_runs(probe):
    assert probe["schedule"] == "CronDataIntervalTimetable"
    assert probe["max_active_runs"] == 1
    assert probe["catchup"] is False


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


@pytest.mark.parametrize("run_type,param,start", [
    ("manual", None, None),  # a manual run must name its date
    ("manual", None, "1998-01-05"),  # ... even with a logical date
    ("backfill", "1998-01-09", "1998-01-05"),  # a conf date contradicting the partition
    ("scheduled", None, None),
])
def test_resolve_date_fails_fast(run_type, param, start):
    import datetime as dt

    from airflow.sdk.exceptions import AirflowFailException

    from operators.kd_daily import resolve_date

    interval = dt.datetime.fromisoformat(start).replace(tzinfo=dt.UTC) if start else None
    with pytest.raises(AirflowFailException):
        resolve_date(param, run_type, interval)

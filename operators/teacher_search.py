"""Airflow tasks of the teacher search (``dags/kd_teacher_search.py`` wires them).

Thin shells over ``kdcore.search.run``'s rung-by-rung functions; kdcore (torch, pyarrow)
is imported inside the task bodies only. Tasks pass the run URI and small JSON plans
through XCom; the search state lives in ``<search_root>/search/<run_id>/state.json``.
Every task is idempotent for the same run id (a retried task resumes or re-reads)."""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path
from typing import Any

from airflow.sdk import TriggerRule, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/teacher_search.yaml"
MAX_RUNGS = 4  # eta=2: enough for up to 8 candidates (8 -> 4 -> 2 -> 1)
TRAIN_TIMEOUT = dt.timedelta(hours=2)


def _config_path(value: str | None) -> str:
    path = Path(value or DEFAULT_CONFIG)
    if not path.is_absolute():
        path = REPO_ROOT / path
    return str(path.resolve())


def run_id_for(param: str | None, dag_run_id: str) -> str:
    """The search run id: params.run_id, or the DAG run id made path-safe."""
    return param or re.sub(r"[^A-Za-z0-9_.-]+", "_", dag_run_id)[:80]


@task(task_id="setup", retries=1, execution_timeout=dt.timedelta(minutes=30))
def setup(**context: Any) -> str:
    """Validate the search config with the run's params, bootstrap the shared proxy
    student and control; returns the run URI."""
    from kdcore.errors import KDError
    from kdcore.search.config import load_search
    from kdcore.search.run import setup_run

    p = context["params"]
    overrides = {"budget.seconds": p.get("budget_seconds"), "window.bootstrap_end": p.get("bootstrap_end"),
                 "window.validation_days": p.get("validation_days"), "proxy_student": p.get("proxy_student"),
                 "search_root": p.get("root")}
    try:
        cfg = load_search(_config_path(p.get("config")), overrides)
    except KDError as e:
        raise AirflowFailException(str(e)) from None
    out = setup_run(cfg, run_id_for(p.get("run_id"), context["dag_run"].run_id))
    log.info("search run %s (resumed: %s)", out["run"], out["resumed"])
    return out["run"]


@task(retries=1, execution_timeout=TRAIN_TIMEOUT)
def plan_rung(run: str, rung: int) -> list[dict[str, Any]]:
    """Plan the rung under the remaining budget and train the shared control; the mapped
    training task expands over the returned list (empty: the search is over)."""
    from kdcore.search.run import plan_and_control

    items = plan_and_control(run, rung)
    log.info("rung %d: %d candidates", rung, len(items))
    return items


@task(retries=1, execution_timeout=TRAIN_TIMEOUT, map_index_template="{{ map_label }}")
def train_candidate(run: str, rung: int, cid: str, target: int, allowance: float) -> str:
    """One candidate's rung: teacher bootstrap (rung 0), then daily teacher refresh, labels,
    proxy student, each day started only when it fits the candidate's allowance."""
    from kdcore.search.run import train_candidate as train

    get_current_context()["map_label"] = f"{cid} r{rung}"  # type: ignore[typeddict-unknown-key]
    return train(run, rung, cid, target, allowance)


@task(retries=1, execution_timeout=dt.timedelta(minutes=10), trigger_rule=TriggerRule.NONE_FAILED)
def close_rung(run: str, rung: int) -> dict[str, Any]:
    """Merge the rung's results, rank by the proxy student's gain, keep the best 1/eta."""
    from kdcore.search.run import close_rung as close

    return close(run, rung)


@task(task_id="report", retries=1, execution_timeout=dt.timedelta(minutes=10),
      trigger_rule=TriggerRule.NONE_FAILED)
def report(run: str, **context: Any) -> dict[str, Any]:
    """Ranked Markdown table + gain-vs-cost PNG + result.json (the input of promotion)."""
    from kdcore.search.run import finish_run

    out = finish_run(run, command=f"airflow dag kd_teacher_search run {context['dag_run'].run_id}")
    log.info("teacher search result: %s", out)
    return out

"""Airflow tasks of the teacher search (``dags/kd_teacher_search.py`` wires them).

Thin shells over ``kdcore.search.run``'s rung-by-rung functions; kdcore (torch, pyarrow)
is imported inside the task bodies only. Tasks pass the run URI and small JSON plans
through XCom; the search state lives in ``<search_root>/search/<run_id>/state.json``.
Every task is idempotent for the same run id (a retried task resumes or re-reads).

Params are confined before anything is read (``validate_params``): ``config`` must lie in
the configs folder (``$KD_CONFIG_DIR``, default the repo's ``configs/``), ``root`` at or
under the config's ``search_root`` or ``$KD_STORAGE_ROOT``, ``run_id`` is one path
segment. The ``kd teacher search`` CLI does not confine: its user runs the machine."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow.sdk import TriggerRule, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "teacher_search.yaml"  # relative to the configs folder
MAX_RUNGS = 4  # eta=2: enough for up to 8 candidates (8 -> 4 -> 2 -> 1)
TRAIN_TIMEOUT = dt.timedelta(hours=2)


def config_dir() -> Path:
    """The folder params.config must lie in: ``$KD_CONFIG_DIR``, or the repo's configs/."""
    return Path(os.environ.get("KD_CONFIG_DIR") or REPO_ROOT / "configs")


def _config_path(value: str | None) -> str:
    """params.config as a real path inside ``config_dir()`` (kdcore.errors.SpecError naming
    ``params.config`` otherwise; nothing is read). Relative values are taken in the configs
    folder; the repo-relative form ``configs/<file>`` (the CLI's) is accepted too."""
    from kdcore.paths import confine_path

    base = config_dir()
    path = Path(value or DEFAULT_CONFIG)
    if not path.is_absolute():
        path = REPO_ROOT / path if path.parts and path.parts[0] == "configs" else base / path
    return str(confine_path(path, base, "params.config"))


def allowed_roots(cfg: Any) -> list[str]:
    """Where params.root may point: the (trusted) config's own search_root, and the
    deployment's ``$KD_STORAGE_ROOT`` when set; any sub-root of these is fine."""
    from kdcore.storage import fs as sfs

    roots = [cfg.root]
    if os.environ.get("KD_STORAGE_ROOT"):
        roots.append(sfs.normalize(os.environ["KD_STORAGE_ROOT"]))
    return roots


def _root(value: str | None, cfg: Any, config: str) -> str | None:
    """params.root confined to ``allowed_roots(cfg)``; relative to the config's folder
    (as search_root in the file is). Returns the canonical URI, or None when not given."""
    from kdcore.paths import confine_uri

    if value is None:
        return None
    if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
        value = str(Path(config).parent / value)
    return confine_uri(value, allowed_roots(cfg), "params.root")


def run_id_for(param: str | None, dag_run_id: str) -> str:
    """The search run id: params.run_id, or the DAG run id made path-safe; refused
    (SpecError naming ``params.run_id``) unless it is one safe path segment."""
    from kdcore.paths import safe_name

    if param:
        return safe_name(param, "params.run_id")
    return safe_name(re.sub(r"[^A-Za-z0-9_.-]+", "_", dag_run_id).lstrip(".-")[:80] or "run",
                     "params.run_id (from the DAG run id)")


def validate_params(params: Mapping[str, Any], dag_run_id: str) -> tuple[Any, str]:
    """The validated search config and run id for a run's params. Every path-reaching
    param is confined before it is used: params.config before the file is read (a
    refused file is never opened, so no error quotes it), params.root against the
    file's own roots. Raises kdcore.errors.KDError (SpecError) naming the param."""
    from kdcore.search.config import load_search

    config = _config_path(params.get("config"))
    run_id = run_id_for(params.get("run_id"), dag_run_id)
    root = _root(params.get("root"), load_search(config), config)
    overrides = {"budget.seconds": params.get("budget_seconds"),
                 "window.bootstrap_end": params.get("bootstrap_end"),
                 "window.validation_days": params.get("validation_days"),
                 "proxy_student": params.get("proxy_student"), "search_root": root}
    return load_search(config, overrides), run_id


@task(task_id="setup", retries=1, execution_timeout=dt.timedelta(minutes=30))
def setup(**context: Any) -> str:
    """Validate the search config with the run's params, bootstrap the shared proxy
    student and control; returns the run URI."""
    from kdcore.errors import KDError
    from kdcore.search.run import setup_run

    try:
        cfg, run_id = validate_params(context["params"], context["dag_run"].run_id)
    except KDError as e:
        raise AirflowFailException(str(e)) from None
    out = setup_run(cfg, run_id)
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

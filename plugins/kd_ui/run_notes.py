"""Name every kd_daily run after the partition it processes, in the run list's note column.

The partition of a manual run is its ``date`` param, not its logical date, and Airflow 3's
execution API gives a task no way to set its run's note. This listener runs in the
scheduler when a run starts (``on_dag_run_running``, msg ``started``) and writes
``partition D · students: … · stages: …`` as the note, unless a person already wrote one.
It mirrors ``operators.kd_daily.resolve_date`` without importing it (plugins load in every
Airflow process; the repo's operators need not be importable there); when the params are
bad it notes nothing and ``resolve`` fails the run with its message.

The note is text the Airflow UI renders (as Markdown): it only ever prints the date and
names that match the DAG params' pattern, so a conf that slipped past their validation
(they are checked when a run is triggered) cannot put markup into the run list.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

from airflow.listeners import hookimpl

DAG_ID = "kd_daily"
NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")  # dags/kd_daily.py: the students param's items (stages are a subset)
log = logging.getLogger(__name__)


def partition_note(run_type: Any, conf: dict[str, Any] | None, interval_start: Any) -> str | None:
    """The note for a run, or None when its partition cannot be told from its params."""
    conf = conf or {}
    kind = str(getattr(run_type, "value", run_type) or "")
    if kind in ("scheduled", "backfill"):
        if interval_start is None:
            return None
        day = interval_start.date() if isinstance(interval_start, dt.datetime) else interval_start
    else:
        try:
            day = dt.date.fromisoformat(str(conf.get("date") or ""))
        except ValueError:
            return None
    students = conf.get("students") or []
    stages = conf.get("stages") or []
    if not (isinstance(students, list) and isinstance(stages, list)
            and all(isinstance(n, str) and NAME.fullmatch(n) for n in [*students, *stages])):
        return None
    return (f"partition {day.isoformat()} · students: {', '.join(students) if students else 'all'}"
            f" · stages: {', '.join(stages) if stages else 'all'}")


@hookimpl
def on_dag_run_running(dag_run: Any, msg: str) -> None:
    if dag_run.dag_id != DAG_ID or dag_run.note:
        return
    note = partition_note(dag_run.run_type, dag_run.conf, dag_run.data_interval_start)
    if note:
        dag_run.note = note
        log.info("kd_daily run %s: note %r", dag_run.run_id, note)

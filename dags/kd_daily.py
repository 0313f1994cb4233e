"""kd_daily: the daily knowledge-distillation pipeline, one run per date partition D.

resolve → wait_for_examples → refresh_teacher → choose_teacher → materialize_labels[shard]
→ commit_labels → quality_gate → train_student[name] → report. See docs/airflow.md.

Thin on purpose: the tasks live in ``operators/kd_daily.py``; nothing heavy (torch,
pyarrow, kdcore) is imported when the DAG processor parses this file.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import CronDataIntervalTimetable, Param, dag

from operators import kd_daily as t


@dag(
    dag_id="kd_daily",
    description="Daily KD: teacher refresh, shared labels, quality gate, students + control, report",
    # One run = one date partition: the run for D covers [D, D+1) and is named after D.
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=dt.datetime(1997, 9, 1, tzinfo=dt.UTC),  # before MovieLens' first day (1997-09-20)
    catchup=False,
    max_active_runs=1,  # continuous training: days in order (backfills: --max-active-runs 1)
    default_args={
        "retries": 2,
        "retry_delay": dt.timedelta(seconds=int(os.environ.get("KD_RETRY_DELAY_SECONDS", "60"))),
        "retry_exponential_backoff": 2.0,
        "execution_timeout": dt.timedelta(hours=1),
        "owner": "kd",
    },
    params={
        "date": Param(None, type=["null", "string"], format="date",
                      description="Partition date YYYY-MM-DD. Required for manual runs; scheduled and "
                                  "backfill runs use their data interval start."),
        "students": Param([], type="array", items={"type": "string", "pattern": "^[a-z][a-z0-9_]{0,40}$"},
                          uniqueItems=True,
                          description="Subset of students (and controls) to train; empty = all, "
                                      "checked against the pipeline config at run time."),
        "teacher_version": Param(None, type=["null", "string"],
                                 description="Pin the labelling teacher (<name>-<YYYYMMDD>-<hash>); "
                                             "skips the refresh."),
        "stages": Param(list(t.STAGES), type="array", minItems=1, uniqueItems=True,
                        items={"type": "string", "enum": list(t.STAGES)},
                        description="Stages to run, e.g. [\"students\"] to train over existing labels."),
        "force": Param(False, type="boolean", description="Retrain even if an identical checkpoint exists."),
    },
    tags=["kd"],
    doc_md=__doc__,
)
def kd_daily():
    plan = t.resolve()
    ready = t.wait_for_examples(plan)
    teacher = t.refresh_teacher(plan)
    choice = t.choose_teacher(plan)
    shards = t.materialize_shard.partial(plan=plan).expand_kwargs(choice)
    labels = t.commit_labels(plan, choice)
    decision = t.quality_gate(plan)
    students = t.train_student.partial(plan=plan).expand(name=t.student_fanout(plan))
    report = t.report(plan)
    ready >> teacher >> choice
    shards >> labels >> decision >> students >> report


kd_daily()

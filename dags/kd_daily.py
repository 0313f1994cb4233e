"""kd_daily: the daily knowledge-distillation pipeline, one run per date partition D.

resolve → wait_for_examples → refresh_teacher → choose_teacher → materialize_labels[shard]
→ commit_labels → quality_gate → train_student[name] → report. See docs/airflow.md.

Ad hoc (manual) runs: conf {"date": "YYYY-MM-DD"} is required. Every run's note names its
partition (``partition D · students: … · stages: …``, set by the kd_ui plugin's listener).
Backfills: never set ``date`` (a backfill run with a date, or a reprocessed manual run whose
interval disagrees with its logical date, fails in ``resolve``).
Bad params: ``resolve`` fails once, in seconds; downstream tasks skip (no plan).
Missing partition: ``wait_for_examples`` waits at most ``$KD_SENSOR_TIMEOUT_SECONDS`` (4 h by
default), then fails (no retry, no soft-fail) naming the partition URI; the run fails.
A subset of students is a partial run: the report lists the others as "not trained".

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
    # Not 1: a scheduled run whose partition never arrives waits (sensor, no slot held) until
    # its declared timeout; ad hoc runs must not queue behind it. Training stays bounded by
    # pool kd_training, and the teacher trains one date at a time (max_active_tis_per_dag=1).
    # In-order continuous training over many days: backfill with --max-active-runs 1.
    max_active_runs=t.MAX_ACTIVE_RUNS,
    default_args={
        "retries": 2,
        "retry_delay": dt.timedelta(seconds=int(os.environ.get("KD_RETRY_DELAY_SECONDS", "60"))),
        "retry_exponential_backoff": 2.0,
        "execution_timeout": dt.timedelta(hours=1),
        "owner": "kd",
    },
    params={
        # Every param is optional: each type allows null (the Airflow 3 trigger form marks a typed
        # param without "null" as required). The form renders "stages" as a multi-select (array +
        # examples + values_display), "date" as a date picker, "force" as a switch.
        "date": Param(None, type=["null", "string"], format="date", title="Partition date",
                      description="YYYY-MM-DD. Required for manual (ad hoc) runs. Leave EMPTY for backfills "
                                  "and scheduled runs: they process the date they are named after, and a "
                                  "backfill run with a date fails."),
        "students": Param(None, type=["null", "array"],
                          items={"type": "string", "pattern": "^[a-z][a-z0-9_]{0,40}$"}, uniqueItems=True,
                          title="Students (subset)",
                          description="Names of students/controls to train, one per line; empty = all, checked "
                                      "against the pipeline config at run time. A subset is a partial run: the "
                                      "report lists the others as 'not trained' that day."),
        "teacher_version": Param(None, type=["null", "string"], title="Teacher version (pin)",
                                 description="Pin the labelling teacher (<name>-<YYYYMMDD>-<hash>); "
                                             "skips the refresh. Empty = newest allowed by the policy."),
        "stages": Param(list(t.STAGES), type=["null", "array"], minItems=1, uniqueItems=True, title="Stages",
                        items={"type": "string", "enum": list(t.STAGES)},
                        examples=list(t.STAGES), values_display=t.STAGE_LABELS,
                        description="Stages to run, e.g. only 'students' to train over existing labels; "
                                    "empty = all."),
        "force": Param(False, type=["null", "boolean"], title="Force",
                       description="Retrain even if an identical checkpoint exists."),
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
    decision = t.quality_gate(plan, labels)  # the labels the commit made, not looked up again
    students = t.train_student.partial(plan=plan).expand(name=t.student_fanout(plan))
    report = t.report(plan)
    ready >> teacher >> choice
    shards >> labels >> decision >> students >> report


kd_daily()

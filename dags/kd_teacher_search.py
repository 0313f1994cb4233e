"""kd_teacher_search: choose the teacher's configuration within a budget (issue 7).

setup → [plan_rung_k → train_candidate_k[candidate] → close_rung_k] x MAX_RUNGS → report
→ approve_promotion (human in the loop) → promote.

Successive halving: every candidate teacher gets a short run (bootstrap, a few daily
steps of teacher refresh + labels + a proxy student distilling next to the control);
candidates are ranked by the *student's* progressive NE gain over the control; the best
1/eta continue warm from their checkpoints with more days, until the budget is spent or
one remains. Manual trigger only. The daily pipeline changes only through a human's
approval: ``approve_promotion`` (Airflow HITL) shows the ranked candidates with their gains
and 95% intervals and offers ``Promote <candidate>`` / ``Reject``; ``promote`` then rewrites
the teacher block of ``params.promote_config`` (in the configs folder) and records who
approved. Reject, or no answer within ``params.approval_timeout_minutes``, writes nothing.
(CLI equivalent: ``kd teacher promote --search-result <uri> --config ... --write``.)
Path params are confined at run time (``operators.teacher_search.validate_params``):
``config`` to the configs folder, ``root`` to the config's search_root or
$KD_STORAGE_ROOT. See docs/teacher_search.md.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, dag

from operators import teacher_search as t


@dag(
    dag_id="kd_teacher_search",
    description="Teacher configuration search by successive halving, judged by a proxy student's gain",
    schedule=None,  # manual trigger only
    start_date=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": dt.timedelta(seconds=30), "owner": "kd",
                  "execution_timeout": dt.timedelta(hours=2)},
    params={
        "config": Param(t.DEFAULT_CONFIG, type="string", minLength=1,
                        description="candidates file: teacher search YAML in the configs folder "
                                    "($KD_CONFIG_DIR or the repo's configs/; relative paths are taken there)"),
        "budget_seconds": Param(None, type=["null", "number"], exclusiveMinimum=0,
                                description="override budget.seconds (work seconds of the whole search)"),
        "bootstrap_end": Param(None, type=["null", "string"], format="date",
                               description="override window.bootstrap_end (YYYY-MM-DD)"),
        "validation_days": Param(None, type=["null", "integer"], minimum=2,
                                 description="override window.validation_days"),
        "proxy_student": Param(None, type=["null", "object"],
                               description="override proxy_student: {model: {...}, distill: {...}, bootstrap_days}"),
        "root": Param(None, type=["null", "string"], minLength=1,
                      description="override search_root: at or under the config's search_root "
                                  "or $KD_STORAGE_ROOT"),
        "promote_config": Param(t.DEFAULT_PROMOTE_CONFIG, type="string", minLength=1,
                                description="pipeline config whose teacher block an approved promotion rewrites "
                                            "(in the configs folder; relative paths are taken there)"),
        "request_approval": Param(True, type="boolean",
                                  description="ask a human to approve a promotion at the end (false: search only, "
                                              "nothing is promoted)"),
        "approval_timeout_minutes": Param(t.APPROVAL_TIMEOUT_MINUTES, type="number", exclusiveMinimum=0,
                                          maximum=t.MAX_APPROVAL_TIMEOUT_MINUTES,
                                          description="how long the approval waits; then Reject (nothing written)"),
        "run_id": Param(None, type=["null", "string"], pattern="^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$",
                        description="search run id (default: the DAG run id)"),
    },
    tags=["kd", "search"],
    doc_md=__doc__,
)
def kd_teacher_search():
    run = t.setup()
    prev = run
    for k in range(t.MAX_RUNGS):
        items = t.plan_rung.override(task_id=f"plan_rung_{k}")(run, k)
        trained = t.train_candidate.override(task_id=f"train_rung_{k}").partial().expand_kwargs(items)
        closed = t.close_rung.override(task_id=f"close_rung_{k}")(run, k)
        prev >> items
        trained >> closed
        prev = closed
    rep = t.report(run)
    prev >> rep
    approve = t.TeacherApprovalOperator(task_id="approve_promotion", retries=0,
                                        execution_timeout=dt.timedelta(minutes=10))
    rep >> approve
    t.promote_teacher(approve.output)


kd_teacher_search()

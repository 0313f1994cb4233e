"""Airflow tasks of the daily KD pipeline (``dags/kd_daily.py`` wires them).

Each task is a thin shell over one ``kdcore`` function. Nothing heavy is imported at
module level: kdcore pulls in torch and pyarrow, so it is imported inside the task bodies
(the DAG processor re-parses the DAG file every 30 s; the workers pay the import once per
task). Tasks pass a small JSON *plan* and URIs through XCom, never data.

The plan (output of ``resolve``) fixes, once per run, everything the other tasks need:
the partition date, the config path, the stages, the students, the teacher pin and
``force``. Every task is idempotent for the same plan (the library is), so retrying a
task or clearing a whole date leaves the same outputs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, AssetAlias, PokeReturnValue, TriggerRule, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from operators.faults import no_retry as _no_retry  # only transient faults are retried

if TYPE_CHECKING:  # kdcore is imported inside the tasks only
    from kdcore.flow.stage import Run
    from kdcore.records import GateDecision

log = logging.getLogger(__name__)

# Mirrors kdcore.flow.graph.STAGES and STAGE_LABELS, the stages a run may select (checked by
# tests/test_dag_integrity.py and tests/test_graph.py; not imported: the DAG file imports no
# kdcore at parse time).
STAGES = ("teacher", "labels", "gate", "students", "report")
STAGE_LABELS = {"teacher": "teacher: refresh the teacher on D", "labels": "labels: materialize D's teacher labels",
                "gate": "gate: data-quality gate", "students": "students: train students + controls",
                "report": "report: rebuild the report"}
# Concurrent runs of kd_daily (see dags/kd_daily.py and docs/airflow.md, "Concurrent runs").
MAX_ACTIVE_RUNS = 3
POOL = "kd_training"
POOL_SLOTS_DEFAULT = 2
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
GATE_TASK_ID = "quality_gate"
DECISION_KEY = "decision"

# Assets other DAGs can schedule on. Logical URIs (the storage root is only known at run
# time, from the config and KD_STORAGE_ROOT); the concrete URIs travel in the events' extra.
TEACHER_ASSET = Asset(name="kd_teacher_checkpoint", uri="kd://pipeline/teacher")
LABELS_ASSET = Asset(name="kd_teacher_labels", uri="kd://pipeline/labels")
STUDENTS_ALIAS = AssetAlias(name="kd_student_checkpoints")


def student_asset(name: str) -> Asset:
    """The asset of one student's (or control's) checkpoints, emitted through STUDENTS_ALIAS."""
    return Asset(name=f"kd_student_{name}", uri=f"kd://pipeline/students/{name}")


def config_path() -> str:
    """The pipeline config: ``$KD_PIPELINE_CONFIG`` or the repo's configs/demo.yaml.

    Deliberately not a DAG param: the environment is set by whoever deploys the workers
    (trusted, like the ``kd`` CLI's arguments, so not confined; tests point it at
    tests/configs/). No kd_daily param reaches a path: the plan's config and storage root
    come from here and from the config/``$KD_STORAGE_ROOT``; ``students`` are matched
    against the config's names and ``teacher_version`` against a stored checkpoint's
    exact version before either is used. A param that ever names a path must be confined
    with kdcore.paths (see operators.teacher_search.validate_params)."""
    path = Path(os.environ.get("KD_PIPELINE_CONFIG") or DEFAULT_CONFIG)
    if not path.is_absolute():
        path = REPO_ROOT / path
    return str(path.resolve())


def _as_date(value: Any) -> dt.date:
    return value.date() if isinstance(value, dt.datetime) else value


def resolve_date(param_date: str | None, run_type: str | None, interval_start: Any,
                 logical_date: Any = None) -> dt.date:
    """The one partition date a run processes.

    Scheduled and backfill runs process their data interval's start: with
    ``CronDataIntervalTimetable("0 0 * * *")`` the run for D covers [D, D+1) and its
    logical date is D. Other runs (manual, asset-triggered) have no trustworthy interval
    (a manual run with logical date D gets [D-1, D), one without a logical date has
    none), so they must name the date in ``params.date``.

    A backfill never takes ``date``: a backfill run processes the date it is named after
    (its logical date) or nothing. A backfill that reprocesses a failed *manual* run keeps
    that run's interval [D-1, D) (Airflow only relabels it ``backfill``): its interval
    start then disagrees with its logical date D, and the run is refused instead of
    silently processing D-1.
    """
    run_type = str(getattr(run_type, "value", run_type) or "")
    if run_type in ("scheduled", "backfill"):
        if interval_start is None:
            raise AirflowFailException(f"{run_type} run without a data interval: cannot resolve its date")
        day = _as_date(interval_start)
        if logical_date is not None and _as_date(logical_date) != day:
            raise AirflowFailException(
                f"this {run_type} run is named after {_as_date(logical_date)} but its data interval starts "
                f"{day}: it was created as a manual run and then reprocessed by a backfill, which keeps the "
                f"manual run's interval. Refusing to process {day} under the name {_as_date(logical_date)}: "
                f"delete this run and backfill {_as_date(logical_date)} again, or trigger a manual run with "
                f'conf {{"date": "{_as_date(logical_date)}"}}')
        if run_type == "backfill" and param_date:
            raise AirflowFailException(
                f"params.date={param_date} is set on a backfill run for {day}: a backfill processes the date "
                f"it is named after and never takes 'date' (leave it empty in the backfill dialog and "
                f"--dag-run-conf; a reprocessed manual run keeps its conf: delete that run first)")
        if param_date and dt.date.fromisoformat(param_date) != day:
            raise AirflowFailException(
                f"params.date={param_date} contradicts this {run_type} run's partition {day}")
        return day
    if not param_date:
        raise AirflowFailException(
            f"a {run_type or 'manual'} run must name its partition: trigger with conf "
            f'{{"date": "YYYY-MM-DD"}} (params.date); the logical date of a manual run is not used')
    try:
        return dt.date.fromisoformat(param_date)
    except ValueError:
        raise AirflowFailException(f"params.date must be YYYY-MM-DD, got {param_date!r}") from None


def fallback_message(day: dt.date, version: str, trained_through: dt.date, staleness: int, expected: int,
                     pinned: bool) -> str:
    """The WARNING choose_teacher logs when D's labels come from a stale teacher."""
    why = "the teacher version is pinned" if pinned else "refresh_teacher failed or was skipped"
    return (f"FALLBACK: labels for {day} come from stale teacher {version} (trained through {trained_through}): "
            f"{staleness} day(s) stale, the label policy expects {expected} ({why})")


def labels_event_extra(date: str, out: dict[str, Any]) -> dict[str, Any]:
    """The labels asset event's extra, from ``materialize.commit``'s result: where the
    labels are and which teacher made them, fallback (``teacher_stale``) included, so a
    consumer scheduled on the asset can tell stale labels apart."""
    return {"date": date, "uri": out["uri"], "rows": out["rows"], "teacher_version": out["teacher_version"],
            "staleness_days": out.get("staleness_days"), "teacher_stale": out.get("teacher_stale")}


def _cfg(plan: dict[str, Any]):
    from kdcore.config import load_pipeline

    return load_pipeline(plan["config"])


def _day(plan: dict[str, Any]) -> dt.date:
    return dt.date.fromisoformat(plan["date"])


def _run(plan: dict[str, Any]) -> Run:
    """The plan as the graph's walk of one day (each task runs one of its stages)."""
    from kdcore.flow.stage import Run

    return Run(_cfg(plan), _day(plan), frozenset(plan["stages"]), tuple(plan["students"]) or None,
               plan["teacher_version"], bool(plan["force"]))


def _stage(name: str, run: Run, given: dict[str, Any] | None = None) -> Any:
    """Run the graph's stage ``name`` with the upstream outputs ``given`` (from XCom)."""
    from kdcore.flow import graph

    return graph.run_stage(graph.BY_NAME[name], run, given or {})


def _label(text: str) -> None:
    """Name a mapped task instance in the UI (map_index_template="{{ map_label }}")."""
    get_current_context()["map_label"] = text  # type: ignore[typeddict-unknown-key]


def _require_plan(plan: dict[str, Any] | None, task_id: str) -> dict[str, Any]:
    """The tasks that run on ``all_done``/``none_failed`` still start when ``resolve``
    failed, with ``plan=None``. They skip at once (no retry, no TypeError): the run fails
    with resolve's one message."""
    if not isinstance(plan, dict) or "date" not in plan:
        raise AirflowSkipException(f"{task_id}: no plan, 'resolve' failed (see its log for why); nothing to do")
    return plan


@contextlib.contextmanager
def _task_body(what: str) -> Iterator[None]:
    """A task's main work: errors as in ``_no_retry``; when it finishes, the task process's
    peak RSS is logged, what a worker slot must hold for this task at this day size
    (bench/bench_dag_day.py collects it per task)."""
    from kdcore.sysinfo import peak_rss_mb

    with _no_retry(what):
        yield
    log.info("%s: done, peak RSS %.0f MB", what, peak_rss_mb())


@task(task_id="resolve")
def resolve(**context: Any) -> dict[str, Any]:
    """Fix the run's plan: date, config, stages, students (validated against the config)."""
    from kdcore.errors import KDError

    params, dag_run = context["params"], context["dag_run"]
    day = resolve_date(params.get("date"), getattr(dag_run, "run_type", None),
                       context.get("data_interval_start"), context.get("logical_date"))
    stages = list(params.get("stages") or STAGES)
    unknown_stages = sorted(set(stages) - set(STAGES))
    if unknown_stages:
        raise AirflowFailException(f"unknown stages {unknown_stages}; known: {list(STAGES)}")
    path = config_path()
    try:
        from kdcore.config import load_pipeline

        cfg = load_pipeline(path)
    except KDError as e:
        raise AirflowFailException(f"pipeline config {path}: {e}") from None
    known = [s.name for s in cfg.all_students()]
    wanted = list(params.get("students") or [])
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise AirflowFailException(f"params.students: unknown {unknown}; configured in {path}: {known}")
    students = [n for n in known if not wanted or n in wanted]  # config order, deterministic
    trained = students if "students" in stages else []
    plan = {"date": day.isoformat(), "config": path, "root": cfg.root, "dataset": cfg.spec.name,
            "stages": [s for s in STAGES if s in stages],
            "students": trained,
            # a partial run: the configured students this run does not train (their lineage skips
            # D unless another run trains them; the report lists such dates as 'not trained')
            "not_trained": [n for n in known if n not in trained],
            "teacher_version": params.get("teacher_version") or None,
            "force": bool(params.get("force")), "shards": cfg.labels.shards}
    log.info("plan for %s: %s", day, plan)
    if plan["not_trained"] and "students" in stages:
        log.warning("partial run for %s: students not trained by this run: %s", day, ", ".join(plan["not_trained"]))
    return plan


@task(task_id="student_fanout")
def student_fanout(plan: dict[str, Any]) -> list[str]:
    """The students (and controls) this run trains: the mapped training task expands over
    this list, read from the pipeline config at run time (empty: 'students' not selected)."""
    return list(_require_plan(plan, "student_fanout")["students"])


# How long wait_for_examples waits for D's partition before the run fails (declared, finite):
# $KD_SENSOR_TIMEOUT_SECONDS, default 4 h (read when the DAG file is parsed, so the DAG
# processor's environment sets it; make ui / scripts/ui.sh and make demo set it explicitly).
SENSOR_TIMEOUT_DEFAULT = 4 * 3600
SENSOR_POKE_DEFAULT = 300


def sensor_timeout() -> float:
    return float(os.environ.get("KD_SENSOR_TIMEOUT_SECONDS") or SENSOR_TIMEOUT_DEFAULT)


def sensor_poke_interval() -> float:
    return float(os.environ.get("KD_SENSOR_POKE_SECONDS") or SENSOR_POKE_DEFAULT)


def missing_partition_message(uri: str, day: str, waited: float, timeout: float) -> str:
    return (f"examples partition for {day} not published at {uri} after waiting {waited:.0f} s "
            f"(sensor timeout {timeout:.0f} s, $KD_SENSOR_TIMEOUT_SECONDS): nothing ran for {day}. "
            f"Publish the partition, then clear this task (or trigger a manual run with "
            f'conf {{"date": "{day}"}})')


def _waited_seconds(context: dict[str, Any]) -> float:
    """Seconds since this sensor started waiting, computed like BaseSensorOperator does
    in reschedule mode (the first reschedule's start, else now)."""
    ti = context["ti"]
    try:
        first = ti.get_first_reschedule_date(context)
    except Exception:  # noqa: BLE001 - no supervisor (unit tests): the poke is the first one
        first = None
    if first is None:
        return 0.0
    return (dt.datetime.now(dt.UTC) - first).total_seconds()


@task.sensor(task_id="wait_for_examples", mode="reschedule",
             poke_interval=sensor_poke_interval(), timeout=sensor_timeout(),
             execution_timeout=dt.timedelta(minutes=10))
def wait_for_examples(plan: dict[str, Any], **context: Any) -> PokeReturnValue:
    """D's examples partition is published (its manifest exists).

    Never waits forever: once the declared timeout would pass before the next poke, the
    task fails (no retry, not soft-failed: a missing day is an error someone must see)
    with a message naming the partition's URI."""
    plan = _require_plan(plan, "wait_for_examples")
    from kdcore.data.examples import examples_uri
    from kdcore.storage.partition import is_published

    uri = examples_uri(plan["root"], plan["dataset"], plan["date"])
    done = is_published(uri)
    log.info("%s published: %s", uri, done)
    if done:  # the boundary: a day that breaks the data contract stops the run before any training
        _validate(plan)
    else:
        task = context.get("task")
        timeout = float(getattr(task, "timeout", None) or sensor_timeout())
        poke = float(getattr(task, "poke_interval", None) or sensor_poke_interval())
        waited = _waited_seconds(context)
        if waited + poke > timeout:  # the next poke would be past the timeout: fail now, by name
            raise AirflowFailException(missing_partition_message(uri, plan["date"], waited, timeout))
    return PokeReturnValue(is_done=done, xcom_value=uri if done else None)


def _validate(plan: dict[str, Any]) -> None:
    """Check D's examples against the dataset contract; a failing day fails the task at
    once (no retry can fix data) with the error naming the file, column and an example."""
    from kdcore.errors import DataError

    with _no_retry("pipeline config"):
        run = _run(plan)
    try:
        out = _stage("validate", run)
    except DataError as e:
        raise AirflowFailException(f"examples of {plan['date']} fail validation, nothing trains on them: {e}") from None
    log.info("examples of %s valid: %d rows (examples %s)", plan["date"], out["rows"], out["examples_sha256"][:12])


@task(task_id="refresh_teacher", pool=POOL, outlets=[TEACHER_ASSET], max_active_tis_per_dag=1,
      execution_timeout=dt.timedelta(hours=2))
def refresh_teacher(plan: dict[str, Any], **context: Any) -> dict[str, Any]:
    """Progressive-evaluate the teacher through D-1 on D, then train it on D. The parent
    is found by lineage (newest checkpoint before D), not by assuming D-1 ran."""
    plan = _require_plan(plan, "refresh_teacher")
    if "teacher" not in plan["stages"]:
        raise AirflowSkipException("stage 'teacher' not selected")
    if plan["teacher_version"]:
        raise AirflowSkipException(f"teacher pinned to {plan['teacher_version']}: no refresh")
    with _task_body(f"teacher refresh for {plan['date']}"):
        out = _stage("teacher", _run(plan))
    context["outlet_events"][TEACHER_ASSET].extra = {
        "date": plan["date"], "version": out["version"], "uri": out["uri"], "parent": out.get("parent")}
    return out


@task(task_id="choose_teacher", trigger_rule=TriggerRule.ALL_DONE)
def choose_teacher(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The teacher that labels D (pinned, or the newest allowed by the staleness policy).

    Runs even when the refresh failed: the last good teacher then stays in use, within
    ``policies.max_label_staleness_days`` (the refresh task stays red in the UI).
    Returns the keyword arguments of the shard tasks, one dict per shard (none when the
    'labels' stage is not selected: the mapped shard task is then skipped)."""
    plan = _require_plan(plan, "choose_teacher")
    if "labels" not in plan["stages"]:
        return []
    from kdcore.data.examples import examples_uri
    from kdcore.errors import KDError
    from kdcore.labels import materialize as mat
    from kdcore.storage.partition import is_published

    with _no_retry("pipeline config"):
        cfg, day = _cfg(plan), _day(plan)
    if not is_published(examples_uri(cfg.root, cfg.spec.name, day)):
        raise AirflowFailException(f"examples of {day} are not published; nothing to label")
    _validate(plan)  # runs after a failed refresh too: bad data must not reach the fallback teacher
    try:
        ckpt = mat.choose_teacher(cfg, day, plan["teacher_version"])
    except KDError as e:
        raise AirflowFailException(str(e)) from None
    staleness = (day - ckpt.trained_through).days
    if staleness > cfg.policies.label_lag_days:  # staler than the label policy asks for: a refresh failed
        log.warning("%s", fallback_message(day, ckpt.version, ckpt.trained_through, staleness,
                                           cfg.policies.label_lag_days, bool(plan["teacher_version"])))
    else:
        log.info("labels for %s come from %s (%s, %d day(s) old)", day, ckpt.version, cfg.policies.labels, staleness)
    return [{"teacher_version": ckpt.version, "shard": i} for i in range(plan["shards"])]


@task(task_id="materialize_labels", map_index_template="{{ map_label }}")
def materialize_shard(plan: dict[str, Any], teacher_version: str, shard: int) -> dict[str, Any]:
    """Score shard ``shard`` of D's examples with the chosen teacher (published, not yet visible)."""
    plan = _require_plan(plan, "materialize_labels")
    _label(f"shard {shard}/{plan['shards']}")
    from kdcore.labels import materialize as mat

    with _task_body(f"labels shard {shard} of {plan['date']}"):
        return mat.materialize_shard(_cfg(plan), _day(plan), shard, plan["shards"], teacher_version)


@task(task_id="commit_labels", outlets=[LABELS_ASSET], trigger_rule=TriggerRule.NONE_FAILED)
def commit_labels(plan: dict[str, Any], shards: list[dict[str, Any]], **context: Any) -> dict[str, Any]:
    """Make every shard visible at once (one manifest); emits the labels asset event."""
    plan = _require_plan(plan, "commit_labels")
    if "labels" not in plan["stages"] or not shards:
        raise AirflowSkipException("stage 'labels' not selected")
    teacher_version = shards[0]["teacher_version"]
    from kdcore.labels import materialize as mat

    with _task_body(f"committing the labels of {plan['date']}"):
        out = mat.commit(_cfg(plan), _day(plan), teacher_version, plan["shards"])
    extra = labels_event_extra(plan["date"], out)
    context["outlet_events"][LABELS_ASSET].extra = extra
    if extra["teacher_stale"]:
        log.warning("labels for %s committed from stale teacher %s (%s day(s) stale)", plan["date"],
                    teacher_version, extra["staleness_days"])
    return out


@task(task_id=GATE_TASK_ID, trigger_rule=TriggerRule.NONE_FAILED)
def quality_gate(plan: dict[str, Any], labels: dict[str, Any] | None = None, **context: Any) -> dict[str, Any]:
    """Decide what the students do on D: pass / warn (distil, warning logged) / fail.
    Labels from a stale (fallback) teacher warn at least; the decision carries
    ``teacher_stale`` and ``teacher_version`` (None when no labels are used).

    The decision is pushed to XCom (key ``decision``) in every case. On ``fail`` the task
    then fails (red in the UI, no retry: the data will not change) and the students react
    per the action (train on hard labels only, or skip).

    ``labels`` is ``commit_labels``' output (None when this run commits no labels: the
    gate stage then reads the labels committed for D already). The decision's typed
    record travels under ``record``; the flat keys are what logs, tests and the UI read."""
    plan = _require_plan(plan, GATE_TASK_ID)
    from kdcore.flow import graph
    from kdcore.storage import fs as sfs

    with _task_body(f"quality gate for {plan['date']}"):
        run = _run(plan)
        if not graph.BY_NAME["gate"].is_wanted(run):
            raise AirflowSkipException("stages 'gate' and 'students' not selected")
        committed = graph.labels_at(run.cfg, labels["uri"]) if labels else None
        record = _stage("gate", run, {"labels": committed})
    day, result = run.day, record.result()
    decision = {**result, "date": plan["date"],
                "labels_uri": sfs.absolute(run.cfg.root, record.labels.path) if record.labels else None,
                "teacher_stale": result.get("teacher_stale"), "teacher_version": result.get("teacher_version"),
                "record": record.model_dump(mode="json")}
    context["ti"].xcom_push(key=DECISION_KEY, value=decision)
    status, action = decision["status"], decision["action"]
    if decision["teacher_stale"]:
        log.warning("FALLBACK: %s was labelled by stale teacher %s (%s day(s) stale)", day,
                    decision["teacher_version"], decision.get("staleness_days"))
    if status == "warn":
        log.warning("quality gate WARN for %s (students distil): %s", day, decision.get("summary"))
    elif status == "fail":
        log.error("quality gate FAIL for %s -> students: %s. %s", day, action, decision.get("summary"))
        raise AirflowFailException(f"quality gate failed for {day}: students {action}; {decision.get('summary')}")
    else:
        log.info("quality gate %s for %s: %s", status, day, decision.get("summary"))
    return decision


@task(task_id="train_student", pool=POOL, outlets=[STUDENTS_ALIAS], trigger_rule=TriggerRule.ALL_DONE,
      map_index_template="{{ map_label }}", execution_timeout=dt.timedelta(hours=2))
def train_student(plan: dict[str, Any], name: str, **context: Any) -> dict[str, Any]:
    """Progressive-evaluate student ``name`` on D, then warm-start and train it on D, as the
    gate decided. Runs after the gate whatever its state; without a decision it fails."""
    plan = _require_plan(plan, "train_student")
    _label(name)
    decision = context["ti"].xcom_pull(task_ids=GATE_TASK_ID, key=DECISION_KEY)
    if not decision or decision.get("date") != plan["date"]:
        raise AirflowFailException(f"no quality-gate decision for {plan['date']} "
                                   f"(task '{GATE_TASK_ID}' did not decide): student '{name}' not trained")
    action = decision["action"]
    if action == "skip_students":
        raise AirflowSkipException(f"gate {decision['status']}: students do not train on {plan['date']}")
    from kdcore.flow import graph

    with _task_body(f"student '{name}' on {plan['date']}"):
        run = _run(plan)
        request = graph.training_request(run, name, _gate_record(run, decision))
        out = graph.train(run.cfg, request)
    context["outlet_events"][STUDENTS_ALIAS].add(student_asset(name), extra={
        "date": plan["date"], "student": name, "version": out.get("version"), "uri": out.get("uri"),
        "action": action})
    return out


def _gate_record(run: Run, decision: dict[str, Any]) -> GateDecision:
    """The gate's typed record from its XCom. A decision pushed without one (by a worker
    of the previous version, during an upgrade) is rebuilt from its flat keys."""
    from kdcore.flow import graph
    from kdcore.records import GateDecision

    if "record" in decision:
        return GateDecision.model_validate(decision["record"])
    labels = graph.labels_at(run.cfg, decision["labels_uri"]) if decision.get("labels_uri") else None
    return GateDecision(date=decision["date"], status=decision["status"], action=decision["action"],
                        summary=decision.get("summary") or "", labels=labels,
                        lineage=labels.lineage if labels else None)


@task(task_id="report", trigger_rule=TriggerRule.NONE_FAILED)
def report(plan: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the report (per-day metrics, KD gain, gate figures) over every published day."""
    plan = _require_plan(plan, "report")
    if "report" not in plan["stages"]:
        raise AirflowSkipException("stage 'report' not selected")
    with _task_body("report"):
        out = _stage("report", _run(plan))
    log.info("report for %s written to %s\n%s", plan["date"], out["uri"], out.get("markdown", ""))
    stale = out.get("stale_teacher_days") or []
    if stale:
        log.warning("report: %d day(s) labelled by a stale (fallback) teacher: %s", len(stale), ", ".join(stale))
    partial = out.get("not_trained_days") or {}
    if partial:
        log.warning("report: %d day(s) on which some models were not trained: %s", len(partial),
                    "; ".join(f"{d}: {', '.join(m)}" for d, m in partial.items()))
    return {"uri": out["uri"], "files": out.get("files"), "date": plan["date"], "stale_teacher_days": stale,
            "not_trained_days": partial, "not_trained": plan.get("not_trained", [])}

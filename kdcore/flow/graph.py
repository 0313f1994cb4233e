"""The daily stages of date D, in order, each declaring the stages whose outputs it takes:
validate (D's examples, once) -> teacher (refresh) -> labels (materialize, one commit) ->
gate (quality gate, or the "not_run" decision) -> students (+ controls) -> report.

``kd run`` (:func:`kdcore.pipeline.run_day`), ``kd student train`` and the Airflow tasks
(``operators/kd_daily.py``) walk this one list, so a stage added here reaches every caller.
The leaf packages do the work; this module only wires them (imported lazily: the DAG
file reads :data:`STAGES` from here without pulling in torch)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from kdcore.flow.stage import Run, Stage, run_stage
from kdcore.records import GateDecision, LabelsRef, TrainingRequest

if TYPE_CHECKING:
    from kdcore.config import PipelineConfig

log = logging.getLogger(__name__)


def _validate(run: Run, inputs: dict[str, Any]) -> dict[str, Any]:
    """The day's boundary check, once: a day that breaks the data contract stops here,
    before the teacher trains on it (the stale-teacher fallback is for a failed refresh,
    never for bad data). Its summary (the examples digest) is recorded for the later steps."""
    from kdcore.data.validate import ensure_valid

    return ensure_valid(run.cfg.root, run.cfg.spec, run.day, record=True)


def _teacher(run: Run, inputs: dict[str, Any]) -> dict[str, Any]:
    from kdcore.training import steps

    return steps.teacher_step(run.cfg, run.day, force=run.force)


def _labels(run: Run, inputs: dict[str, Any]) -> LabelsRef:
    from kdcore.labels import materialize as mat

    out = mat.materialize(run.cfg, run.day, run.teacher_version, force=run.force)
    return labels_at(run.cfg, out["uri"], changed=out["changed"], reused=bool(out.get("reused")))


def labels_at(cfg: PipelineConfig, uri: str, changed: bool = False, reused: bool = False) -> LabelsRef:
    """The reference to the labels committed at ``uri`` (what the labels stage hands on)."""
    from kdcore.labels.store import labels_ref
    from kdcore.storage import partition as part

    return labels_ref(cfg.root, uri, part.read_manifest(uri), changed=changed, reused=reused)


def find_labels(cfg: PipelineConfig, day: dt.date, teacher_version: str | None = None) -> LabelsRef:
    """The committed labels the students of ``day`` read when this walk did not commit
    them (chosen like the materialization chooses its teacher, so both agree)."""
    from kdcore.errors import KDError
    from kdcore.labels import materialize as mat
    from kdcore.labels.store import labels_uri
    from kdcore.storage import partition as part

    version = mat.choose_teacher(cfg, day, teacher_version).version
    uri = labels_uri(cfg.root, cfg.spec.name, day, version)
    if not part.is_published(uri):
        raise KDError(f"labels of teacher {version} for {day} are not materialized ({uri}); "
                      f"run `kd labels materialize --date {day}` first")
    return labels_at(cfg, uri)


def _needs_labels(cfg: PipelineConfig) -> bool:
    return any(s.distill.uses_teacher for s in cfg.students)


def _gate_inputs(run: Run, given: dict[str, Any]) -> dict[str, Any]:
    """The labels to gate: those the labels stage committed, else the ones committed for
    D already; none when no student uses teacher labels."""
    if not _needs_labels(run.cfg):
        return {"labels": None}
    return {"labels": given.get("labels") or find_labels(run.cfg, run.day, run.teacher_version)}


def _gate(run: Run, inputs: dict[str, Any]) -> GateDecision:
    from kdcore.quality import gate

    labels: LabelsRef | None = inputs["labels"]
    if labels is None or "gate" not in run.stages:
        return gate.not_run(run.day.isoformat(), labels, gate.not_run_reason(labels))
    from kdcore.quality.daily import decide
    from kdcore.storage import fs as sfs

    # the decision names the labels it gated: the students distil from those
    return decide(run.cfg, run.day, sfs.absolute(run.cfg.root, labels.path)).model_copy(update={"labels": labels})


def training_request(run: Run, name: str, decision: GateDecision) -> TrainingRequest:
    """What student ``name`` trains on D, as the gate decided (labels only for a student
    that distils from the teacher)."""
    uses_teacher = run.cfg.student(name).distill.uses_teacher
    return TrainingRequest(name=name, date=run.day.isoformat(), labels=decision.labels if uses_teacher else None,
                           action=decision.action, force=run.force)


def train(cfg: PipelineConfig, request: TrainingRequest) -> dict[str, Any]:
    """One student's day step, from its request."""
    from kdcore.storage import fs as sfs
    from kdcore.training import steps

    labels = sfs.absolute(cfg.root, request.labels.path) if request.labels else None
    return steps.student_step(cfg, request.name, dt.date.fromisoformat(request.date), labels, request.action,
                              force=request.force)


def _students(run: Run, inputs: dict[str, Any]) -> dict[str, Any]:
    decision: GateDecision = inputs["gate"]
    names = list(run.students) if run.students else [s.name for s in run.cfg.all_students()]
    return {n: train(run.cfg, training_request(run, n, decision)) for n in names}


def _report(run: Run, inputs: dict[str, Any]) -> dict[str, Any]:
    from kdcore.report.build import build_report

    return build_report(run.cfg)


def _wants_teacher(run: Run) -> bool:
    return "teacher" in run.stages and not run.teacher_version


GRAPH: tuple[Stage, ...] = (
    Stage("validate", "validate: check D's examples against the contract", (), _validate, optional=False),
    Stage("teacher", "teacher: refresh the teacher on D", ("validate",), _teacher, fallback="teacher refresh",
          wanted=_wants_teacher),
    Stage("labels", "labels: materialize D's teacher labels", ("validate", "teacher"), _labels),
    # the students need the decision even when the gate stage itself is not selected ("not_run")
    Stage("gate", "gate: data-quality gate", ("labels",), _gate, resolve=_gate_inputs,
          wanted=lambda run: bool({"gate", "students"} & run.stages)),
    Stage("students", "students: train students + controls", ("gate",), _students),
    # the report covers every published day: built once, after the last day of a walk
    Stage("report", "report: rebuild the report", ("students",), _report, per_day=False),
)
BY_NAME = {s.name: s for s in GRAPH}
# The stages a run may select (kd run --stages, the DAG's `stages` param), in order.
STAGES = tuple(s.name for s in GRAPH if s.optional)
STAGE_LABELS = {s.name: s.label for s in GRAPH if s.optional}


def walk_day(run: Run) -> dict[str, Any]:
    """Every per-day stage the run wants, in order, each given its inputs' outputs. A
    failed fallback stage (the teacher refresh) is recorded as ``{"error": ...}`` and the
    day goes on with what is already published (the last good teacher)."""
    from kdcore.errors import KDError

    outputs: dict[str, Any] = {}
    for stage in GRAPH:
        if not stage.per_day or not stage.is_wanted(run):
            continue
        try:
            outputs[stage.name] = run_stage(stage, run, outputs)
        except KDError as e:
            if not stage.fallback:
                raise
            log.error("%s for %s failed: %s", stage.fallback, run.day, e)
            outputs[stage.name] = {"error": str(e)}
    return outputs


__all__ = ["BY_NAME", "GRAPH", "STAGES", "STAGE_LABELS", "Run", "find_labels", "labels_at", "run_stage",
           "train", "training_request", "walk_day"]

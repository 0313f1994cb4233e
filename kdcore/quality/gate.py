"""The gate between label materialization and the student fan-out: turns the shift report
and the label checks into pass / warn / fail and the action the students take.

A value trips a level when it is strictly greater than that level's threshold, so a
threshold of 0.0 means "any amount trips it" (used for invalid labels). On fail the
policy chooses: students train on hard labels only (no KD), or do not train at all.
Warnings proceed with distillation but are named in the summary.

``teacher_fresh`` is not configurable: labels from a teacher staler than the label policy
asks for (the refresh failed or was skipped and the last good teacher stood in, or a
version was pinned) always warn, so a fallback never passes silently. How stale is too
stale to distil from stays the ``staleness_days`` thresholds' call.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdcore import records
from kdcore.quality.labels_check import LabelChecks, TeacherLineage
from kdcore.quality.shift import ShiftReport
from kdcore.records import LabelsRef
from kdcore.yamlconf import Strict

Status = Literal["pass", "warn", "fail"]
Action = Literal["distill", "hard_labels_only", "skip_students"]

_ACTION_TEXT = {
    "distill": "students distil from the teacher labels",
    "hard_labels_only": "students train on hard labels only (no teacher labels)",
    "skip_students": "students do not train on this day",
}


class Thresholds(Strict):
    """Inside GatePolicy a violation is reported at the field's location ("psi", ...),
    which pydantic and yamlconf put in the error message."""

    warn: float
    fail: float

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.warn > self.fail:
            raise ValueError(f"warn ({self.warn}) must be <= fail ({self.fail})")
        return self

    def status(self, value: float | None) -> Status:
        """None means the value could not be measured, which fails (nothing to trust)."""
        if value is None or value > self.fail:
            return "fail"
        return "warn" if value > self.warn else "pass"


class GatePolicy(Strict):
    """Per check a warn and a fail threshold (pipeline config, `gate:` section)."""

    psi: Thresholds = Thresholds(warn=0.1, fail=0.25)  # max over features
    js: Thresholds = Thresholds(warn=0.05, fail=0.15)  # max over features, bits
    label_drift: Thresholds = Thresholds(warn=0.05, fail=0.15)  # binary: abs diff; regression: relative
    calibration: Thresholds = Thresholds(warn=0.1, fail=0.25)  # |mean pred / label rate - 1|
    staleness_days: Thresholds = Thresholds(warn=2, fail=7)
    coverage: Thresholds = Thresholds(warn=0.0, fail=0.001)  # fraction of examples without a label
    invalid_labels: Thresholds = Thresholds(warn=0.0, fail=0.0)  # fraction of label rows; also ids
    ignore_features: list[str] = []  # e.g. raw ids whose daily mix always shifts
    profile_window_days: int = Field(7, ge=1, description="days of the teacher's training window profiled at refresh")
    expectations_max_rows: int = Field(
        1_000_000, ge=1, description="rows of D the GX expectations see: an evenly spaced sample of a larger day "
        "(the shift, label checks and the contract checks of kdcore.data.validate see every row)")
    on_fail: Literal["hard_labels_only", "skip_students"] = "hard_labels_only"
    on_warn: Literal["proceed"] = "proceed"


class CheckResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    value: float | None
    warn: float
    fail: float
    status: Status
    detail: str

    def describe(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        level = self.fail if self.status == "fail" else self.warn
        op = ">" if self.status != "pass" else "<="
        return f"{self.name} = {value} {op} {self.status if self.status != 'pass' else 'warn'} {level:g} ({self.detail})"


class GateDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Status
    action: Action
    checks: list[CheckResult]

    def tripped(self, status: Status) -> list[CheckResult]:
        return [c for c in self.checks if c.status == status]

    def summary(self) -> str:
        """One paragraph for logs and the daily report: the decision, then why."""
        head = f"Gate {self.status.upper()}: {_ACTION_TEXT[self.action]} (action '{self.action}')."
        parts = [head]
        fails, warns = self.tripped("fail"), self.tripped("warn")
        if fails:
            parts.append("Failed: " + "; ".join(c.describe() for c in fails) + ".")
        if warns:
            parts.append("Warnings: " + "; ".join(c.describe() for c in warns) + ".")
        n_pass = len(self.checks) - len(fails) - len(warns)
        if not fails and not warns:
            parts.append(f"All {n_pass} checks are within their warn thresholds.")
        else:
            parts.append(f"{n_pass} of {len(self.checks)} checks passed.")
        return " ".join(parts)


# --------------------------------------------------------------------------- checks


def _check(name: str, value: float | None, t: Thresholds, detail: str) -> CheckResult:
    return CheckResult(name=name, value=value, warn=t.warn, fail=t.fail, status=t.status(value), detail=detail)


def _shift_checks(shift: ShiftReport, policy: GatePolicy) -> list[CheckResult]:
    out = []
    for metric, t in (("psi", policy.psi), ("js", policy.js)):
        feats = {f: s for f, s in shift.features.items() if f not in policy.ignore_features}
        if not feats:
            continue
        feature = max(sorted(feats), key=lambda f: getattr(feats[f], metric))
        value = getattr(feats[feature], metric)
        over = sorted(f for f, s in feats.items() if getattr(s, metric) > t.warn)
        detail = f"max on feature '{feature}' ({shift.features[feature].kind})"
        if over:
            detail += f"; {len(over)} feature(s) over warn: {', '.join(over)}"
        out.append(_check(metric, value, t, detail))
    for task, d in shift.labels.items():
        value = d.abs_diff if d.kind == "binary" else d.rel_diff
        how = "abs diff" if d.kind == "binary" else "relative diff"
        detail = (f"task '{task}' ({d.kind}) hard-label mean ref {_fmt(d.ref_mean)} vs day {_fmt(d.cur_mean)}, {how}"
                  if value is not None else f"task '{task}' has no valid hard labels on one side")
        out.append(_check(f"label_drift:{task}", value, policy.label_drift, detail))
    return out


def _label_checks(labels: LabelChecks, policy: GatePolicy) -> list[CheckResult]:
    cov = labels.coverage
    out = [
        _check("coverage", cov.missing_fraction, policy.coverage,
               f"{cov.missing} bad rows: {cov.missing} of {cov.n_examples} examples have no teacher label"
               + (f"; {cov.extra} label rows are not examples of the day" if cov.extra else "")),
    ]
    bad_ids = cov.duplicate_ids + cov.null_ids
    out.append(_check("duplicate_ids", bad_ids / cov.n_label_rows if cov.n_label_rows else 0.0,
                      policy.invalid_labels,
                      f"{bad_ids} bad rows: {cov.duplicate_ids} duplicate example_id rows, "
                      f"{cov.null_ids} null example_id rows in the teacher labels"))
    for task, v in labels.validity.items():
        out.append(_check(f"invalid_labels:{task}", v.invalid_fraction, policy.invalid_labels, v.describe()))
    for task, c in labels.calibration.items():
        value = abs(c.calibration - 1.0) if c.calibration is not None else None
        detail = (f"task '{task}': mean teacher prediction {_fmt(c.mean_pred)} / label rate {_fmt(c.label_rate)}"
                  f" = {_fmt(c.calibration)} over {c.count} examples")
        out.append(_check(f"calibration:{task}", value, policy.calibration, detail))
    out.append(_check("staleness_days", float(labels.staleness_days), policy.staleness_days,
                      f"the teacher has not seen the last {labels.staleness_days} day(s) of data"))
    if labels.teacher is not None:
        out.append(teacher_check(labels.teacher, labels.staleness_days))
    return out


def teacher_check(t: TeacherLineage, staleness_days: int) -> CheckResult:
    """``teacher_fresh``: warn (never pass) when the labels come from a stale teacher. The
    value is the labels' staleness in days, the warn level the staleness the label policy
    expects; it never fails by itself (``staleness_days`` has the fail threshold)."""
    if t.stale:
        detail = (f"FALLBACK: labels come from teacher {t.version}, trained through {t.trained_through}: "
                  f"{staleness_days} day(s) stale where the label policy expects {t.expected_staleness_days} "
                  f"(the teacher refresh failed or was skipped, or a version was pinned)")
    else:
        detail = (f"labels come from teacher {t.version}, trained through {t.trained_through}: "
                  f"{staleness_days} day(s) stale, as the label policy expects ({t.expected_staleness_days})")
    return CheckResult(name="teacher_fresh", value=float(staleness_days), warn=float(t.expected_staleness_days),
                       fail=float("inf"), status="warn" if t.stale else "pass", detail=detail)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def evaluate_gate(shift: ShiftReport, labels: LabelChecks, policy: GatePolicy) -> GateDecision:
    """Evaluate every check; the worst status decides, and the policy maps it to an action.
    Regression bias is measured (labels.bias) but not gated: it has no policy threshold."""
    checks = [*_shift_checks(shift, policy), *_label_checks(labels, policy)]
    statuses = {c.status for c in checks}
    status: Status = "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass"
    action: Action = policy.on_fail if status == "fail" else "distill"
    return GateDecision(status=status, action=action, checks=checks)


def with_expectations(decision: GateDecision, unsuccessful: int, evaluated: int,
                      failed: list[str]) -> GateDecision:
    """The decision with the great-expectations result as one more check. Expectations
    inform (warn) but never by themselves stop distillation: a failed expectation turns
    a pass into a warn, never into a fail."""
    gx = CheckResult(name="expectations", value=float(unsuccessful), warn=0.0, fail=float("inf"),
                     status="warn" if unsuccessful else "pass",
                     detail=f"{unsuccessful} of {evaluated} expectations failed"
                            + (f": {', '.join(failed[:5])}" if failed else ""))
    status: Status = decision.status if decision.status == "fail" or gx.status == "pass" else "warn"
    return decision.model_copy(update={"checks": [*decision.checks, gx], "status": status})


def not_run(day: str, labels: LabelsRef | None, why: str) -> records.GateDecision:
    """The decision when no gate measures the day (no student uses teacher labels, or the
    'gate' stage is not selected): students distil, and the labels' lineage stays
    visible, so a fallback teacher is still named. The CLI and the DAG both decide so."""
    return records.GateDecision(date=day, status="not_run", action="distill", summary=why,
                                lineage=labels.lineage if labels else None, labels=labels)


def not_run_reason(labels: LabelsRef | None) -> str:
    return "no student uses teacher labels" if labels is None else "stage 'gate' not selected"

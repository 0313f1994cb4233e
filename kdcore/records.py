"""The typed records the daily stages hand each other (and the DAG's tasks pass through
XCom as JSON): which teacher labelled a day, where the labels are, what the gate decided,
and what a student is asked to train on. (A teacher's or student's day step hands on its
summary dict, whose ``reused`` says whether it trained.)

One module on the ground floor (it imports nothing of kdcore), so every stage, the
orchestration above them and the UI spell a record's keys in one place. Paths inside
records are relative to the storage root (:func:`kdcore.storage.fs.relative`): a moved
or copied root keeps them."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Action = Literal["distill", "hard_labels_only", "skip_students"]


class Record(BaseModel):
    """Immutable, no unknown keys: a record read back is the record written."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class LabelLineage(Record):
    """The teacher that labelled a day, as the labels' manifest metadata records it.
    ``teacher_stale``: the teacher is older than the label policy asks for (a fallback)."""

    teacher_version: str
    teacher_trained_through: str
    staleness_days: int
    expected_staleness_days: int
    teacher_stale: bool

    @classmethod
    def of(cls, version: str, trained_through: dt.date, day: dt.date, expected_staleness_days: int) -> LabelLineage:
        staleness = (day - trained_through).days
        return cls(teacher_version=version, teacher_trained_through=trained_through.isoformat(),
                   staleness_days=staleness, expected_staleness_days=expected_staleness_days,
                   teacher_stale=staleness > expected_staleness_days)

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> LabelLineage:
        return cls(**{k: meta[k] for k in LINEAGE_KEYS})

    def metadata(self) -> dict[str, Any]:
        """The manifest-metadata keys (the same keys and values the stored JSON has)."""
        return self.model_dump()

    @staticmethod
    def pick(meta: dict[str, Any]) -> dict[str, Any]:
        """The lineage keys of a stored record, None where an older record lacks one."""
        return {k: meta.get(k) for k in LINEAGE_KEYS}


LINEAGE_KEYS = tuple(LabelLineage.model_fields)


class LabelsRef(Record):
    """Committed labels of one day: where (relative to the root) and from which teacher."""

    path: str
    date: str
    lineage: LabelLineage
    rows: int | None = None
    bytes: int | None = None
    changed: bool = False
    reused: bool = False


class GateDecision(Record):
    """What the students may do on a day. ``not_run``: no gate measured the day (no
    student uses teacher labels, or the stage was not selected); the lineage still says
    which teacher labelled it. ``checks``: name -> {value, status}."""

    date: str
    status: Literal["pass", "warn", "fail", "not_run"]
    action: Action
    summary: str
    checks: dict[str, dict[str, Any]] | None = None
    lineage: LabelLineage | None = None
    labels: LabelsRef | None = None
    uri: str | None = None
    data_docs: str | None = None

    def result(self) -> dict[str, Any]:
        """The gate's JSON result as ``kd gate`` and ``kd run`` print it."""
        out: dict[str, Any] = {"status": self.status, "action": self.action, "summary": self.summary}
        lin = self.lineage
        if self.status == "not_run":
            if lin:
                out.update(teacher_version=lin.teacher_version, teacher_stale=lin.teacher_stale,
                           staleness_days=lin.staleness_days)
            return out
        return {**out, "uri": self.uri, "data_docs": self.data_docs,
                "teacher_version": lin.teacher_version if lin else None,
                "teacher_stale": lin.teacher_stale if lin else None,
                "staleness_days": lin.staleness_days if lin else None,
                "expected_staleness_days": lin.expected_staleness_days if lin else None, "checks": self.checks}


class TrainingRequest(Record):
    """One student's training on a day: the labels it may distil from (None: hard labels
    only, or a student that uses no teacher) and the gate's action."""

    name: str
    date: str
    labels: LabelsRef | None = None
    action: Action = "distill"
    force: bool = False

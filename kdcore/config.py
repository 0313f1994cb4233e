"""The pipeline config: one YAML file declares the dataset, where outputs live, the
teacher, the students and the policies. Validated into typed objects; every error names
the file and the field."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator

from kdcore.data.spec import DatasetSpec, load_spec
from kdcore.distill.config import DistillConfig
from kdcore.errors import SpecError
from kdcore.models.ranker import RankerConfig
from kdcore.quality.gate import GatePolicy
from kdcore.storage import fs as sfs
from kdcore.yamlconf import Strict, load_yaml

CONTROL = "control"
NAME = r"^[a-z][a-z0-9_]{0,40}$"


class TeacherConfig(Strict):
    name: str = Field("teacher", pattern=NAME)
    model: RankerConfig = Field(default_factory=lambda: RankerConfig(embedding_dim=32, hidden=[256, 128, 64]))


class StudentConfig(Strict):
    name: str = Field(pattern=NAME)
    model: RankerConfig = Field(default_factory=RankerConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


class Policies(Strict):
    max_label_staleness_days: int = Field(3, ge=0, description="oldest teacher allowed to label a day")
    label_lag_days: int = Field(0, ge=0, description="labels for D come from a teacher through D - lag")
    missing_labels: Literal["error", "hard_labels_only"] = Field(
        "error", description="what a student does when an example has no teacher label")


class LabelsConfig(Strict):
    shards: int = Field(2, ge=1, le=256)
    batch_rows: int = Field(65_536, ge=1)


class BootstrapConfig(Strict):
    days: int = Field(30, ge=1, description="history days trained in one go before the daily loop")
    epochs: int = Field(2, ge=1)


class PipelineConfig(Strict):
    dataset: str = Field(description="path of the dataset spec YAML (relative to this file)")
    storage_root: str = Field(description="local path (relative to this file), file:// or gs:// URI")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    students: list[StudentConfig] = Field(min_length=1)
    policies: Policies = Field(default_factory=Policies)
    gate: GatePolicy = Field(default_factory=GatePolicy)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    torch_threads: int = Field(2, ge=1, le=64)
    _base: Path = PrivateAttr(default=Path("."))

    @field_validator("students")
    @classmethod
    def _unique_names(cls, students: list[StudentConfig], info: ValidationInfo) -> list[StudentConfig]:
        names = [s.name for s in students]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"student names must be unique; repeated: {dupes}")
        teacher = info.data.get("teacher")
        reserved = {teacher.name if teacher else "teacher", CONTROL} & set(names)
        if reserved or any(n.startswith(CONTROL + "_") for n in names):
            raise ValueError(f"student names may not be the teacher's name or start with '{CONTROL}': {sorted(reserved) or names}")
        return students

    @property
    def root(self) -> str:
        env = os.environ.get("KD_STORAGE_ROOT")
        if env:  # relative to the working directory, like any command-line path
            return sfs.normalize(env)
        root = self.storage_root
        if "://" in root or os.path.isabs(root):
            return sfs.normalize(root)
        return sfs.normalize(str(self._base / root))

    @cached_property
    def spec(self) -> DatasetSpec:
        path = Path(self.dataset)
        return load_spec(path if path.is_absolute() else self._base / path)

    def student(self, name: str) -> StudentConfig:
        for s in self.all_students():
            if s.name == name:
                return s
        known = [s.name for s in self.all_students()]
        raise SpecError(f"unknown student '{name}'; configured: {known}")

    def controls(self) -> dict[str, StudentConfig]:
        """One control (no KD) per distinct student shape, keyed by the control's name:
        the KD gain of a student is always measured against a model of its own shape."""
        shapes: dict[str, StudentConfig] = {}
        for s in self.students:
            key = s.model.model_dump_json()
            if key not in shapes:
                shapes[key] = s
        single = len(shapes) == 1
        out = {}
        for i, s in enumerate(shapes.values()):
            name = CONTROL if single else f"{CONTROL}_{i}"
            out[name] = StudentConfig(name=name, model=s.model, distill=DistillConfig(mode="none"))
        return out

    def control_of(self, student: str) -> str:
        model = self.student(student).model
        for name, c in self.controls().items():
            if c.model == model:
                return name
        raise SpecError(f"no control for student '{student}'")

    def all_students(self) -> list[StudentConfig]:
        return [*self.students, *self.controls().values()]


def load_pipeline(path: str | Path) -> PipelineConfig:
    path = Path(path).resolve()
    cfg = load_yaml(PipelineConfig, path)
    cfg._base = path.parent
    try:
        cfg.spec  # noqa: B018  (fail now, naming the spec file, not later in a task)
    except SpecError as e:
        raise SpecError(f"{path}: field 'dataset': {e}") from None
    return cfg

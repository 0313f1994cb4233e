"""The pipeline config: one YAML file declares the dataset, where outputs live, the
teacher, the students and the policies. Validated into typed objects; every error names
the file and the field."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from kdcore.data.spec import DatasetSpec, load_spec
from kdcore.distill.config import DistillConfig
from kdcore.errors import SpecError
from kdcore.labels.encoding import DEFAULT_LOGIT_EPS
from kdcore.labels.encoding import Encoding as LabelEncoding
from kdcore.models.ranker import RankerConfig
from kdcore.paths import is_safe_name
from kdcore.quality.gate import GatePolicy
from kdcore.storage import fs as sfs
from kdcore.yamlconf import Strict, load_yaml

CONTROL = "control"
# Model names (teacher, students, controls) are path segments (<root>/models/<dataset>/<name>/)
# and Airflow asset names: lower-case identifiers, so never '.', '..' or anything with '/'.
NAME = r"^[a-z][a-z0-9_]{0,40}$"


def _path_segment(value: str) -> str:
    """Belt and braces behind NAME: whatever NAME becomes, a name stays one safe path
    segment (kdcore.paths.SAFE_NAME, not '.' or '..'); the error names the field."""
    if not is_safe_name(value):
        raise ValueError(f"{value!r} is not a safe name: one path segment, not '.' or '..', no '/'")
    return value


class TeacherConfig(Strict):
    name: str = Field("teacher", pattern=NAME, description="path segment: lower-case identifier")
    model: RankerConfig = Field(default_factory=lambda: RankerConfig(embedding_dim=32, hidden=[256, 128, 64]))

    _safe_name = field_validator("name")(_path_segment)


class StudentConfig(Strict):
    name: str = Field(pattern=NAME, description="path segment: lower-case identifier")
    model: RankerConfig = Field(default_factory=RankerConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    _safe_name = field_validator("name")(_path_segment)


class Policies(Strict):
    """Label policy: labels for D come, by default, from a teacher that has not trained on D
    (`out_of_sample`: the teacher through D - label_lag_days, lag >= 1, i.e. scored before
    the day's refresh). A teacher scoring the very rows it just trained on is overconfident
    on them (label AUC 0.753 vs 0.692 progressive on MovieLens), and students then learn
    that overconfidence. `in_sample` (lag 0) stays available, by name only."""

    max_label_staleness_days: int = Field(3, ge=0, description="oldest teacher allowed to label a day")
    labels: Literal["out_of_sample", "in_sample"] = Field(
        "out_of_sample", description="out_of_sample: the labelling teacher has not seen D; in_sample: it has")
    label_lag_days: int = Field(1, ge=0, description="labels for D come from a teacher through D - lag")
    missing_labels: Literal["error", "hard_labels_only"] = Field(
        "error", description="what a student does when some examples of the day have no teacher label: "
                             "error stops it; hard_labels_only trains it on the whole day's hard labels "
                             "without distillation that day (kd_applied false, labels_missing and the reason "
                             "in its checkpoint meta)")

    @model_validator(mode="after")
    def _lag_matches_policy(self) -> Policies:
        if self.labels == "out_of_sample" and self.label_lag_days < 1:
            raise ValueError("label_lag_days 0 labels D with a teacher trained on D (in-sample); "
                             "set labels: in_sample to ask for that explicitly, or a lag >= 1")
        if self.labels == "in_sample" and self.label_lag_days != 0:
            raise ValueError(f"labels: in_sample means label_lag_days 0, got {self.label_lag_days}")
        if self.label_lag_days > self.max_label_staleness_days:
            raise ValueError(f"label_lag_days {self.label_lag_days} exceeds max_label_staleness_days "
                             f"{self.max_label_staleness_days}: no teacher would be allowed to label")
        return self


class LabelsConfig(Strict):
    """How teacher labels are computed and stored.

    Reading and the forward pass use different batch sizes: large reads amortize I/O and
    decoding, while a forward batch that fits in cache keeps the GEMMs compute-bound
    (issue 13, idle 2-core machine: 57.5 GFLOP/s at 8,192 rows vs 29.9 at 65,536). Under
    CPU contention with 2 torch threads larger batches can win: measure with
    bench/bench_labels.py (docs/performance.md, "Labelling").

    ``encoding`` trades bytes for a declared worst-case error (kdcore/labels/encoding.py,
    docs/performance.md): float32 is exact; the others are recorded per task with their
    error bound in the labels manifest, and changing it recomputes the labels (and
    retrains the students that read them)."""

    shards: int = Field(2, ge=1, le=256)
    batch_rows: int = Field(65_536, ge=1, description=(
        "rows read and feature-encoded at a time (rounded down to a multiple of inference_rows)"))
    inference_rows: int = Field(8_192, ge=1, description=(
        "rows per teacher forward pass; the day is cut into batches of this size from row 0, "
        "so labels are bitwise identical whatever the shard count. Changing it may change "
        "the last bits of the labels"))
    encoding: LabelEncoding = Field("float32", description=(
        "float32 (exact), float16, bfloat16, float16_logit or uint8_logit; unbounded regression "
        "tasks stay float32"))
    logit_eps: float = Field(DEFAULT_LOGIT_EPS, gt=0.0, lt=0.01, description=(
        "logit encodings clip p to [eps, 1 - eps] (part of the recorded error bound)"))


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
        if sfs.has_scheme(root) or os.path.isabs(root):
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

    def resolved(self) -> PipelineConfig:
        """The config with every model's feature list made explicit: the teacher reads all
        features (privileged included), a student the serving ones. A student configured
        with a privileged feature is refused here, naming it: at serving time that
        feature does not exist."""
        spec = self.spec
        teacher = self.teacher
        if teacher.model.features is None:
            teacher = teacher.model_copy(update={"model": teacher.model.model_copy(
                update={"features": list(spec.feature_columns)})})
        check_features(spec, teacher.model.features, f"teacher '{teacher.name}'", serving=False)
        students = []
        for s in self.students:
            if s.model.features is None:
                s = s.model_copy(update={"model": s.model.model_copy(update={"features": spec.serving_features})})
            check_features(spec, s.model.features, f"student '{s.name}'", serving=True)
            s.distill.distilled_tasks(spec.served_tasks, [t.name for t in spec.tasks])
            students.append(s)
        out = self.model_copy(update={"teacher": teacher, "students": students})
        out._base = self._base
        return out


def check_features(spec: DatasetSpec, features: list[str] | None, who: str, serving: bool) -> None:
    if features is None:
        return
    unknown = [c for c in features if c not in spec.feature_columns]
    if unknown:
        raise SpecError(f"{who}: model.features {unknown} are not features of dataset '{spec.name}' "
                        f"(known: {spec.feature_columns})")
    if not features:
        raise SpecError(f"{who}: model.features is empty")
    priv = [c for c in features if c in spec.privileged]
    if serving and priv:
        raise SpecError(f"{who}: feature '{priv[0]}' is privileged (teacher-only: dataset '{spec.name}' "
                        f"declares it unavailable at serving time); remove it from model.features")


def load_pipeline(path: str | Path) -> PipelineConfig:
    path = Path(path).resolve()
    cfg = load_yaml(PipelineConfig, path)
    cfg._base = path.parent
    try:
        cfg.spec  # noqa: B018  (fail now, naming the spec file, not later in a task)
    except SpecError as e:
        raise SpecError(f"{path}: field 'dataset': {e}") from None
    try:
        return cfg.resolved()
    except (SpecError, ValueError) as e:
        raise SpecError(f"{path}: {e}") from None

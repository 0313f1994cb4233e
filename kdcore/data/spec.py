"""The dataset contract: which column is the id, the time, the user, the features and
the tasks. Every reader and writer checks data against it, so a stream that changes
shape fails loudly at the boundary instead of silently training on garbage."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from kdcore.yamlconf import Strict, load_yaml

TaskKind = Literal["binary", "regression"]
TargetTransform = Literal["log1p", "standardize"]
NullPolicy = Literal["mean", "zero", "error"]
# How a source stores a point in time: integer epoch seconds / ms / us / ns, or ISO-8601 text
# ("2024-05-01T12:30:00Z"; no offset means UTC).
TimeUnit = Literal["s", "ms", "us", "ns", "iso"]
# A declared date field may also be a calendar date (an Arrow date, or text "YYYY-MM-DD",
# taken as is). `iso` accepts an Arrow timestamp too, in both.
DateUnit = Literal["s", "ms", "us", "ns", "iso", "date"]
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class Task(Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: TaskKind
    column: str | None = None  # defaults to `name`
    # Range of valid values, used by label validity checks (regression); binary is [0, 1].
    min: float | None = None
    max: float | None = None
    loss_weight: float = Field(1.0, ge=0.0, description=(
        "weight of this task's loss in the training total; with `transform` it keeps a task "
        "from dominating the shared layers by the scale of its target"))
    transform: list[TargetTransform] = Field(default_factory=list, description=(
        "regression target transforms applied in order before the loss (and inverted for "
        "predictions): log1p, standardize (mean/std fitted at cold start, kept in the checkpoint)"))
    served: bool = Field(True, description=(
        "whether the serving head of this task is what production serves; unserved tasks are "
        "trained as auxiliary objectives and are not distilled by default"))

    @model_validator(mode="after")
    def _transform_fits_kind(self) -> Task:
        if self.transform and self.kind != "regression":
            raise ValueError(f"task '{self.name}': transform {self.transform} applies to regression tasks only")
        if len(set(self.transform)) != len(self.transform):
            raise ValueError(f"task '{self.name}': transform lists a step twice: {self.transform}")
        if "log1p" in self.transform and (self.min is None or self.min < 0):
            raise ValueError(f"task '{self.name}': transform log1p needs a declared min >= 0 (got min={self.min})")
        return self

    @property
    def label_column(self) -> str:
        return self.column or self.name


class DateField(Strict):
    """Where `kd data ingest` reads the partition date of each row, when it is not the
    UTC date of the timestamp column (the default)."""

    column: str = Field(min_length=1, description="source column holding the date (read, not published)")
    unit: DateUnit = Field("date", description=(
        "date: an Arrow date or 'YYYY-MM-DD' text, taken as is; s/ms/us/ns: integer epoch; "
        "iso: ISO-8601 text or an Arrow timestamp. All but `date` give the UTC date"))


class DatasetSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN, description=(
        "dataset name, one folder under examples/, labels/ and quality/: letters, digits, "
        "'_', '.', '-', not starting with '.' or '-'"))
    # Required in a spec YAML (see load_spec); the defaults serve specs built in code.
    example_id: str = "example_id"
    timestamp: str = "timestamp"
    timestamp_unit: TimeUnit | None = Field(None, description=(
        "how the source stores `timestamp` when it is not already an Arrow timestamp "
        "(ingest converts it to timestamp[unit, UTC]; iso gives timestamp[ns, UTC]); a CSV "
        "source without it is read as ISO-8601 text"))
    date: DateField | None = Field(None, description=(
        "ingest only: the column giving each row's partition date; default: the UTC date "
        "of `timestamp`"))
    group: str = Field(description="column grouping examples for per-user metrics (GAUC)")
    categorical: list[str] = Field(default_factory=list)
    numeric: list[str] = Field(default_factory=list)
    tasks: list[Task] = Field(min_length=1)
    privileged: list[str] = Field(default_factory=list, description=(
        "features only teachers may use: not available at serving time (e.g. computed offline "
        "or after the impression); a student configured with one is refused"))
    nulls: dict[str, NullPolicy] = Field(default_factory=dict, description=(
        "per numeric feature: mean (impute the normalizer's mean, the default), zero (the raw "
        "value 0) or error (a null is a data error naming the column)"))

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, name: str) -> str:
        if name.startswith((".", "-")):
            raise ValueError(f"dataset name '{name}' must not start with '.' or '-' ('.' and '..' "
                             f"would make examples, labels and quality share one folder)")
        return name

    @field_validator("date")
    @classmethod
    def _date_is_another_column(cls, date: DateField | None, info: ValidationInfo) -> DateField | None:
        ts = info.data.get("timestamp")
        if date is not None and date.column == ts:
            raise ValueError(f"column '{ts}' is the timestamp column, whose UTC date is already the "
                             f"default partition date: remove `date` and declare how '{ts}' is stored "
                             f"with `timestamp_unit`")
        return date

    @model_validator(mode="after")
    def _distinct_columns(self) -> DatasetSpec:
        seen: dict[str, str] = {}
        roles = [("example_id", [self.example_id]), ("timestamp", [self.timestamp]),
                 ("categorical", self.categorical), ("numeric", self.numeric),
                 ("tasks", [t.label_column for t in self.tasks])]
        for role, cols in roles:
            for c in cols:
                if c in seen:
                    raise ValueError(f"column '{c}' is used as both {seen[c]} and {role}")
                seen[c] = role
        if not self.categorical and not self.numeric:
            raise ValueError("at least one categorical or numeric feature is required")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for c in self.privileged:
            if c not in self.feature_columns:
                raise ValueError(f"privileged feature '{c}' is not a categorical or numeric feature of the spec")
        if set(self.feature_columns) <= set(self.privileged):
            raise ValueError("every feature is privileged: students would have no serving feature")
        for c in self.nulls:
            if c not in self.numeric:
                raise ValueError(f"nulls: '{c}' is not a numeric feature (categorical nulls always map to bucket 0)")
        if not any(t.served for t in self.tasks):
            raise ValueError("at least one task must be served (served: true)")
        return self

    @property
    def serving_features(self) -> list[str]:
        """Features a served model may read: everything but the privileged ones."""
        return [c for c in self.feature_columns if c not in self.privileged]

    @property
    def served_tasks(self) -> list[str]:
        return [t.name for t in self.tasks if t.served]

    def null_policy(self, column: str) -> NullPolicy:
        return self.nulls.get(column, "mean")

    @property
    def feature_columns(self) -> list[str]:
        return [*self.categorical, *self.numeric]

    @property
    def required_columns(self) -> list[str]:
        cols = [self.example_id, self.timestamp, *self.feature_columns,
                *[t.label_column for t in self.tasks]]
        if self.group not in cols:
            cols.append(self.group)
        return cols

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"dataset '{self.name}' has no task '{name}'")


class _SpecFile(DatasetSpec):
    """A spec as written in YAML: the id and time columns must be named, never defaulted
    (a stream whose time column is silently "timestamp" would fail far from its cause)."""

    example_id: str = Field(None, validate_default=True)
    timestamp: str = Field(None, validate_default=True)

    @field_validator("example_id", "timestamp", mode="before")
    @classmethod
    def _named(cls, value: object, info: ValidationInfo) -> object:
        if value is None:
            what = {"example_id": "the unique id of each example",
                    "timestamp": "the time of each example"}[info.field_name]
            raise ValueError(f"required key '{info.field_name}' is missing: name the column holding "
                             f"{what}, e.g. `{info.field_name}: {info.field_name}`")
        return value


def load_spec(path: str | Path) -> DatasetSpec:
    """Load a spec YAML; errors name the file and the field (a missing key included)."""
    spec = load_yaml(_SpecFile, path)
    return DatasetSpec.model_validate({k: getattr(spec, k) for k in DatasetSpec.model_fields})

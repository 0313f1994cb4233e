"""The dataset contract: which column is the id, the time, the user, the features and
the tasks. Every reader and writer checks data against it, so a stream that changes
shape fails loudly at the boundary instead of silently training on garbage."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from kdcore.yamlconf import Strict, load_yaml

TaskKind = Literal["binary", "regression"]


class Task(Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: TaskKind
    column: str | None = None  # defaults to `name`
    # Range of valid values, used by label validity checks (regression); binary is [0, 1].
    min: float | None = None
    max: float | None = None

    @property
    def label_column(self) -> str:
        return self.column or self.name


class DatasetSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    example_id: str = "example_id"
    timestamp: str = "timestamp"
    group: str = Field(description="column grouping examples for per-user metrics (GAUC)")
    categorical: list[str] = Field(default_factory=list)
    numeric: list[str] = Field(default_factory=list)
    tasks: list[Task] = Field(min_length=1)

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
        return self

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


def load_spec(path: str | Path) -> DatasetSpec:
    return load_yaml(DatasetSpec, path)

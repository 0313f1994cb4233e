"""The search config (``configs/teacher_search.yaml``): candidates (an explicit list
and/or a small grid), the budget, the date window, the proxy student and the halving
settings. Validated into typed objects; every error names the file and the field."""

from __future__ import annotations

import datetime as dt
import itertools
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from kdcore.data.spec import DatasetSpec, load_spec
from kdcore.distill.config import DistillConfig
from kdcore.errors import SpecError
from kdcore.models.ranker import RankerConfig
from kdcore.paths import is_safe_name
from kdcore.storage import fs as sfs
from kdcore.yamlconf import Strict, load_yaml, validate

CAND_ID = r"^[a-z][a-z0-9_]{0,30}$"  # a path segment (<run>/cand=<id>/): never '.', '..' or with '/'


class Candidate(Strict):
    id: str = Field(pattern=CAND_ID, description="short unique name; used in paths and reports")
    model: RankerConfig = Field(description="the teacher's model (size, depth/width, embedding dim, epochs per day)")
    bootstrap_days: int = Field(30, ge=1, description="teacher training window: history days before the daily loop")
    bootstrap_epochs: int = Field(1, ge=1)

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        """Belt and braces behind CAND_ID: the id stays one safe path segment."""
        if not is_safe_name(value):
            raise ValueError(f"{value!r} is not a safe name: one path segment, not '.' or '..', no '/'")
        return value


class Grid(Strict):
    """A small cross product: every combination of the lists, on top of ``base``."""

    base: RankerConfig = Field(default_factory=RankerConfig)
    embedding_dim: list[int] = Field(default_factory=list)
    hidden: list[list[int]] = Field(default_factory=list)
    epochs: list[int] = Field(default_factory=list)
    bootstrap_days: list[int] = Field(default_factory=lambda: [30])
    bootstrap_epochs: int = Field(1, ge=1)
    max_candidates: int = Field(32, ge=1, le=256, description="refuse grids larger than this")

    def expand(self) -> list[Candidate]:
        axes = {"embedding_dim": self.embedding_dim or [self.base.embedding_dim],
                "hidden": self.hidden or [self.base.hidden], "epochs": self.epochs or [self.base.epochs]}
        combos = list(itertools.product(axes["embedding_dim"], axes["hidden"], axes["epochs"], self.bootstrap_days))
        if len(combos) > self.max_candidates:
            raise ValueError(f"grid has {len(combos)} combinations; max_candidates is {self.max_candidates}")
        out = []
        for emb, hidden, epochs, days in combos:
            cid = f"g_e{emb}_h{'x'.join(map(str, hidden))}_ep{epochs}_b{days}"[:31]
            model = self.base.model_copy(update={"embedding_dim": emb, "hidden": list(hidden), "epochs": epochs})
            out.append(Candidate(id=cid, model=RankerConfig.model_validate(model.model_dump()),
                                 bootstrap_days=days, bootstrap_epochs=self.bootstrap_epochs))
        return out


class Budget(Strict):
    seconds: float = Field(gt=0, description="total work seconds the search may spend")
    kind: Literal["wall", "cpu"] = Field("wall", description="measure work in wall seconds or process CPU seconds")


class Window(Strict):
    bootstrap_end: dt.date = Field(description="last history day; the teacher/student bootstraps end here")
    validation_days: int = Field(8, ge=2, description="days after bootstrap_end the rungs may use")


class ProxyStudent(Strict):
    model: RankerConfig = Field(default_factory=lambda: RankerConfig(embedding_dim=4, hidden=[8]))
    distill: DistillConfig = Field(default_factory=lambda: DistillConfig(mode="auxiliary"))
    bootstrap_days: int = Field(30, ge=1, description="history days of the student's (and control's) bootstrap")

    @model_validator(mode="after")
    def _uses_teacher(self) -> ProxyStudent:
        if not self.distill.uses_teacher:
            raise ValueError("distill.mode must use the teacher ('auxiliary' or 'direct'), not 'none'")
        return self


class SearchConfig(Strict):
    dataset: str = Field(description="path of the dataset spec YAML (relative to this file)")
    examples_root: str = Field(description="storage root holding the published example partitions")
    search_root: str = Field(description="where search runs write (<search_root>/search/<run_id>/...)")
    budget: Budget
    window: Window
    proxy_student: ProxyStudent = Field(default_factory=ProxyStudent)
    candidates: list[Candidate] = Field(default_factory=list)
    grid: Grid | None = None
    eta: int = Field(2, ge=2, description="halving factor: keep the best 1/eta each rung")
    min_days_per_rung: int = Field(2, ge=1, description="daily steps of rung 0; rung k runs min * eta^k days in total")
    task: str | None = Field(None, description="binary task the gain is measured on (default: the first binary task)")
    seed: int = Field(0, ge=0)
    torch_threads: int = Field(2, ge=1, le=64)
    _base: Path = PrivateAttr(default=Path("."))

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if not self.candidates and self.grid is None:
            raise ValueError("give at least one of 'candidates' or 'grid'")
        ids = [c.id for c in self.all_candidates()]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"candidate ids must be unique; repeated: {dupes}")
        if len(ids) < 1:
            raise ValueError("no candidates")
        return self

    def all_candidates(self) -> list[Candidate]:
        return [*self.candidates, *(self.grid.expand() if self.grid else [])]

    def _abs(self, value: str) -> str:
        if sfs.has_scheme(value) or os.path.isabs(value):
            return sfs.normalize(value)
        return sfs.normalize(str(self._base / value))

    @property
    def examples_uri(self) -> str:
        return self._abs(self.examples_root)

    @property
    def root(self) -> str:
        return self._abs(self.search_root)

    @property
    def spec(self) -> DatasetSpec:
        path = Path(self.dataset)
        return load_spec(path if path.is_absolute() else self._base / path)

    @property
    def dataset_path(self) -> str:
        path = Path(self.dataset)
        return str(path if path.is_absolute() else (self._base / path).resolve())

    def primary_task(self) -> str:
        spec = self.spec
        binary = [t.name for t in spec.tasks if t.kind == "binary"]
        if self.task:
            if self.task not in binary:
                raise SpecError(f"field 'task': '{self.task}' is not a binary task of dataset '{spec.name}' ({binary})")
            return self.task
        if not binary:
            raise SpecError(f"dataset '{spec.name}' has no binary task to measure NE/AUC gain on")
        return binary[0]

    def resolved(self) -> dict[str, Any]:
        """JSON-able form with absolute paths (what a run records and the DAG passes on)."""
        data = self.model_dump(mode="json")
        data.update(dataset=self.dataset_path, examples_root=self.examples_uri, search_root=self.root)
        return data


def _finish(cfg: SearchConfig, base: Path, source: str) -> SearchConfig:
    cfg._base = base
    try:
        cfg.spec  # noqa: B018
    except SpecError as e:
        raise SpecError(f"{source}: field 'dataset': {e}") from None
    return cfg


def load_search(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchConfig:
    """Load and validate; ``overrides`` (dotted keys such as ``budget.seconds``) win over
    the file, and are validated with it.

    ``path`` and ``overrides['search_root']`` are used as given: the ``kd`` CLI passes its
    own arguments here unconfined (its user runs the machine). Values from Airflow params
    must be confined first (kdcore.paths; operators.teacher_search.validate_params does)."""
    path = Path(path).resolve()
    if not overrides:
        return _finish(load_yaml(SearchConfig, path), path.parent, str(path))
    import yaml

    cfg = load_yaml(SearchConfig, path)  # the file alone must be valid too
    data = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *head, last = key.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    cfg = validate(SearchConfig, data, f"{path} (with overrides {sorted(k for k, v in overrides.items() if v is not None)})")
    return _finish(cfg, path.parent, str(path))


def search_from_dict(data: dict[str, Any], source: str = "search config", base: Path | None = None) -> SearchConfig:
    return _finish(validate(SearchConfig, data, source), base or Path("."), source)

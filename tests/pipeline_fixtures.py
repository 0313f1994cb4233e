"""Fixtures for the pipeline tests (test_pipeline, test_labels, test_training).

One session-scoped base root holds the real MovieLens-100K stream and the tiny config
bootstrapped on its first 10 days; every test gets its own copy of that root (cheap:
only the first days' examples are copied), so tests can mutate it freely.

A test module imports the fixtures it uses (``from tests.pipeline_fixtures import kd,
kd_base``) and silences ruff's F811 for the fixture arguments.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kdcore.config import PipelineConfig, load_pipeline
from kdcore.data import examples, movielens
from kdcore.storage import fs as sfs
from kdcore.training.steps import bootstrap

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
BOOTSTRAP_DAYS = 10  # tiny.yaml: bootstrap.days
COPY_DAYS = 25  # example partitions copied into each test's root (the tests use fewer)


@dataclass
class Base:
    root: Path
    days: list[dt.date]
    boot: dict[str, Any]

    @property
    def through(self) -> dt.date:
        return self.days[BOOTSTRAP_DAYS - 1]


@dataclass
class KD:
    """A test's private storage root (KD_STORAGE_ROOT points at it) and its config."""

    cfg: PipelineConfig
    root: Path
    days: list[dt.date]  # every example date of the copy, in order
    boot: dict[str, Any]  # bootstrap summary per model name

    @property
    def B(self) -> dt.date:
        """The date the bootstrap checkpoints are trained through (the 10th day)."""
        return self.days[BOOTSTRAP_DAYS - 1]

    def day(self, i: int) -> dt.date:
        """The i-th example date after the bootstrap window (i=1 is the first daily run)."""
        return self.days[BOOTSTRAP_DAYS - 1 + i]


# Each module that imports the fixture gets its own session-scoped FixtureDef from pytest;
# this cache makes them share one base root (publish + bootstrap run once per session).
_BASE: list[Base] = []


@pytest.fixture(scope="session")
def kd_base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    if _BASE:
        return _BASE[0]
    root = tmp_path_factory.mktemp("kd-base") / "root"
    movielens.publish(str(root))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KD_STORAGE_ROOT", str(root))
        cfg = load_pipeline(TINY)
        days = examples.list_days(cfg.root, cfg.spec.name)
        if len(days) != 213:
            raise RuntimeError(f"MovieLens-100K should give 213 daily partitions, got {len(days)}")
        boot = bootstrap(cfg, days[BOOTSTRAP_DAYS - 1])
    _BASE.append(Base(root=root, days=days, boot=boot))
    return _BASE[0]


def copy_root(base: Base, dest: Path) -> Path:
    keep = {f"date={d.isoformat()}" for d in base.days[:COPY_DAYS]}
    ex_dir = base.root / "examples" / "movielens"

    def ignore(directory: str, names: list[str]) -> list[str]:
        if Path(directory) == ex_dir:
            return [n for n in names if n.startswith("date=") and n not in keep]
        return []

    shutil.copytree(base.root, dest, ignore=ignore)
    return dest


@pytest.fixture
def kd(kd_base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KD:
    root = copy_root(kd_base, tmp_path / "root")
    monkeypatch.setenv("KD_STORAGE_ROOT", str(root))
    cfg = load_pipeline(TINY)
    return KD(cfg=cfg, root=root, days=kd_base.days[:COPY_DAYS], boot=kd_base.boot)


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` by relative path."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def local(uri: str) -> Path:
    """Local path of a file:// (or plain) URI."""
    return Path(sfs.local_path(uri))


def _restart_ids(kd: KD, day: dt.date, rows: int | None = None) -> None:
    """Re-publish a day with example ids 0..n-1, as a source whose ids restart every day
    would (the ingest contract allows it): ids then say nothing about the day."""
    import numpy as np
    import pyarrow as pa

    from kdcore.storage import partition as part

    t = examples.read_day(kd.cfg.root, kd.cfg.spec, day)
    t = t.slice(0, rows) if rows is not None else t
    t = t.set_column(t.schema.get_field_index(kd.cfg.spec.example_id), kd.cfg.spec.example_id,
                     pa.array(np.arange(t.num_rows, dtype=np.int64)))
    part.publish_table(examples.examples_uri(kd.cfg.root, kd.cfg.spec.name, day), t)


def yesterdays_labels_as_today(kd: KD) -> tuple[str, str]:
    """Days 1 and 2 with ids that restart, day 1's labels copied into day 2's folder of the
    same teacher: (day 1's labels URI, the copy's URI). Day 2 is cut to at most day 1's
    size, so every id of day 2 has a label in the copy (a join by id sees nothing wrong).
    Day 2 is recorded valid, as the pipeline's boundary check records it."""
    from kdcore.data.validate import ensure_valid
    from kdcore.labels import materialize as mat
    from kdcore.labels.store import labels_uri

    d1, d2 = kd.day(1), kd.day(2)
    rows = min(examples.read_day(kd.cfg.root, kd.cfg.spec, d).num_rows for d in (d1, d2))
    _restart_ids(kd, d1)
    _restart_ids(kd, d2, rows)
    src = mat.materialize(kd.cfg, d1)
    version = mat.choose_teacher(kd.cfg, d2).version
    assert version == src["teacher_version"]  # the same teacher labels both days
    dst = labels_uri(kd.cfg.root, kd.cfg.spec.name, d2, version)
    shutil.copytree(local(src["uri"]), local(dst))
    ensure_valid(kd.cfg.root, kd.cfg.spec, d2, record=True)
    return src["uri"], dst

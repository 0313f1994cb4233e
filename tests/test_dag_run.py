"""dag.test() of kd_daily for three consecutive MovieLens dates on the tiny config: every
stage's output exists, the teacher (and every student's) lineage is D-1 -> D, and
re-running one date leaves byte-identical labels and checkpoints.

Airflow runs in a subprocess with a private AIRFLOW_HOME (migrated SQLite DB), so its
settings never leak into the pytest process."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.airflow_helpers import (
    BOOTSTRAP_DAYS,
    REPO,
    TINY,
    airflow_env,
    init_airflow,
    prepare_store,
    sha_tree,
)


def _dag_test(env: dict[str, str], dates: list[dt.date]) -> list[dict]:
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "airflow_helpers.py"), "dag-test",
                           *[d.isoformat() for d in dates]], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    runs = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("DAGTEST ")]
    if proc.returncode != 0 or len(runs) != len(dates):
        pytest.fail(f"dag.test exited {proc.returncode}; runs: {runs}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return runs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("kd-dag-run")
    store = base / "store"
    days = prepare_store(store)
    env = airflow_env(base / "airflow", store)
    init_airflow(env)
    dates = days[BOOTSTRAP_DAYS:BOOTSTRAP_DAYS + 3]
    runs = _dag_test(env, dates)
    return {"store": store, "env": env, "days": days, "dates": dates, "runs": runs}


def _cfg(store: Path):
    from kdcore.config import load_pipeline

    os.environ["KD_STORAGE_ROOT"] = str(store)
    return load_pipeline(TINY)


def test_three_dates_succeed(world):
    for run, day in zip(world["runs"], world["dates"]):
        assert run["date"] == day.isoformat()
        assert run["state"] == "success", run
        bad = {t: s for t, s in run["tasks"].items()
               if s != "success" and not (t.startswith("quality_gate") and s == "failed")}
        assert not bad, f"{day}: tasks not successful: {bad}"


def test_every_stage_output_and_lineage(world, monkeypatch):
    from kdcore.models import registry
    from kdcore.pipeline import find_labels
    from kdcore.storage.partition import is_published

    monkeypatch.setenv("KD_STORAGE_ROOT", str(world["store"]))
    cfg = _cfg(world["store"])
    ds = cfg.spec.name
    boot = world["days"][BOOTSTRAP_DAYS - 1]
    expected = [*reversed(world["dates"]), boot]  # newest first, back to the bootstrap
    for name in [cfg.teacher.name, *[s.name for s in cfg.all_students()]]:
        chain = registry.lineage(cfg.root, ds, name, world["dates"][-1])
        assert [c.trained_through for c in chain] == expected, name
        for child, parent in zip(chain, chain[1:]):
            assert child.meta["parent"] == parent.version  # D-1 -> D
    assert "control" in [s.name for s in cfg.all_students()]
    for day in world["dates"]:
        labels = find_labels(cfg, day)
        assert is_published(labels)
        # out-of-sample labels: D is scored by the teacher through D-1, before D's refresh
        teacher = registry.lineage(cfg.root, ds, cfg.teacher.name, day)[1]
        assert teacher.trained_through < day and teacher.version in labels
    assert is_published(f"{cfg.root}/reports/{ds}")


def test_rerun_one_date_is_byte_identical(world):
    store = world["store"]
    before_labels, before_models = sha_tree(store / "labels"), sha_tree(store / "models")
    day = world["dates"][1]
    (run,) = _dag_test(world["env"], [day])
    assert run["state"] == "success", run
    assert sha_tree(store / "labels") == before_labels
    assert sha_tree(store / "models") == before_models

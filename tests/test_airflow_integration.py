"""kd_daily under a real Airflow: scheduler, DAG processor and API server as separate
processes (SQLite, LocalExecutor, private AIRFLOW_HOME, free port on 127.0.0.1).

Backfills five MovieLens dates through the CLI with --max-active-runs 1 and checks that
every date succeeded, in date order, with the checkpoint chain D-1 -> D; clears one date
and checks its labels are byte-identical after the re-run; triggers an ad hoc run with
params through the REST API and checks they were honoured; stops every component."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from tests.airflow_helpers import (
    BOOTSTRAP_DAYS,
    DAG_ID,
    TINY,
    Api,
    Component,
    airflow_env,
    create_backfill,
    free_port,
    init_airflow,
    mtimes,
    prepare_store,
    running,
    sha_tree,
    wait_until,
)

pytestmark = pytest.mark.integration
N_DATES = 5


def _runs(api: Api, run_type: str) -> list[dict]:
    return api("GET", f"/dags/{DAG_ID}/dagRuns?run_type={run_type}&limit=100")["dag_runs"]


def _run(api: Api, run_id: str) -> dict:
    return api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")


def _progress(api: Api) -> tuple:
    """Every task instance's state across the DAG's runs: changes whenever work gets done."""
    tis = api("GET", f"/dags/{DAG_ID}/dagRuns/~/taskInstances?limit=1000")["task_instances"]
    return tuple(sorted((t["dag_run_id"], t["task_id"], t.get("map_index", -1), t.get("state") or "")
                        for t in tis))


def _tis(api: Api, run_id: str) -> list[dict]:
    return api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]


def _done(run: dict) -> bool:
    return run["state"] in ("success", "failed")


def test_backfill_and_adhoc_run(tmp_path, monkeypatch):
    store, home = tmp_path / "store", tmp_path / "airflow"
    days = prepare_store(store)
    dates = days[BOOTSTRAP_DAYS:BOOTSTRAP_DAYS + N_DATES]
    port = free_port()
    env = airflow_env(home, store, api_port=port)
    init_airflow(env)
    logdir = tmp_path / "logs"
    logdir.mkdir()
    comps = [Component("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port)], env, logdir),
             Component("scheduler", ["scheduler"], env, logdir),
             Component("dag-processor", ["dag-processor"], env, logdir)]
    api = Api(port, home)
    t0 = time.monotonic()
    with running(comps) as codes:
        wait_until("API server health", api.healthy, 120, components=comps)
        api.login()
        wait_until("kd_daily parsed", lambda: api("GET", f"/dags/{DAG_ID}"), 90, components=comps)
        # -- backfill five dates, in order, one at a time (created while paused: fewer SQLite writers)
        create_backfill(env, dates[0], dates[-1])
        api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
        runs = wait_until("the backfill", lambda: (rs := _runs(api, "backfill")) and len(rs) == N_DATES
                          and all(_done(r) for r in rs) and rs, 420, interval=3, components=comps,
                          progress=lambda: _progress(api))
        runs.sort(key=lambda r: r["data_interval_start"])
        starts = [dt.datetime.fromisoformat(r["data_interval_start"]).date() for r in runs]
        assert starts == dates, f"backfill runs cover {starts}, expected {dates}"
        assert [r["state"] for r in runs] == ["success"] * N_DATES, [(r["dag_run_id"], r["state"]) for r in runs]
        ends = [r["end_date"] for r in runs]
        assert ends == sorted(ends), "backfill runs did not finish in date order"
        # the run list names each run's partition (the kd_ui listener's note)
        assert [r["note"] for r in runs] == [f"partition {d} · students: all · stages: all" for d in dates]
        for a, b in zip(runs, runs[1:]):  # one at a time: D starts after D-1 ended
            assert b["start_date"] >= a["end_date"]

        monkeypatch.setenv("KD_STORAGE_ROOT", str(store))
        from kdcore.config import load_pipeline
        from kdcore.models import registry

        cfg = load_pipeline(TINY)
        ds = cfg.spec.name
        for name in [cfg.teacher.name, *[s.name for s in cfg.all_students()]]:
            chain = registry.lineage(cfg.root, ds, name, dates[-1])
            assert [c.trained_through for c in chain[:N_DATES + 1]] == [*reversed(dates), days[BOOTSTRAP_DAYS - 1]]
            for child, parent in zip(chain, chain[1:]):
                assert child.meta["parent"] == parent.version, name

        # -- clear one date: the re-run leaves byte-identical labels (and checkpoints)
        labels_before, models_before = sha_tree(store / "labels"), sha_tree(store / "models")
        cleared = runs[1]
        api("POST", f"/dags/{DAG_ID}/clearTaskInstances",
            {"dag_run_id": cleared["dag_run_id"], "only_failed": False, "reset_dag_runs": True, "dry_run": False})
        wait_until("the cleared run to restart", lambda: _run(api, cleared["dag_run_id"])["end_date"] != cleared["end_date"],
                   60, components=comps)
        rerun = wait_until("the cleared run", lambda: _done(r := _run(api, cleared["dag_run_id"])) and r, 240,
                           interval=3, components=comps, progress=lambda: _progress(api))
        assert rerun["state"] == "success"
        assert sha_tree(store / "labels") == labels_before
        assert sha_tree(store / "models") == models_before

        # -- ad hoc run with params through the REST API: one student over existing labels
        day = dates[-1]
        models_root = store / "models" / ds
        before = mtimes(models_root)
        conf = {"date": day.isoformat(), "stages": ["students"], "students": ["student_aux"], "force": True}
        adhoc = api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
        adhoc = wait_until("the ad hoc run", lambda: _done(r := _run(api, adhoc["dag_run_id"])) and r, 180,
                           progress=lambda: _progress(api),
                           interval=2, components=comps)
        tis = {(t["task_id"], t["map_index"]): t for t in _tis(api, adhoc["dag_run_id"])}
        assert adhoc["state"] == "success", {k: t["state"] for k, t in tis.items()}
        assert adhoc["conf"] == conf
        assert adhoc["note"] == f"partition {day} · students: student_aux · stages: students"
        students = [t for (task, _), t in tis.items() if task == "train_student"]
        assert [(t["rendered_map_index"], t["state"]) for t in students] == [("student_aux", "success")]
        for task in ("refresh_teacher", "commit_labels", "report"):
            assert tis[(task, -1)]["state"] == "skipped", task
        # The forced student really retrained (not reused) on the requested date; training is
        # deterministic, so its checkpoint may come out byte-identical (its meta records the
        # training seconds, which can round to the same value): only student_aux may change.
        ret = api("GET", f"/dags/{DAG_ID}/dagRuns/{adhoc['dag_run_id']}/taskInstances/train_student/"
                         f"xcomEntries/return_value?map_index={students[0]['map_index']}&deserialize=true")["value"]
        ret = json.loads(ret) if isinstance(ret, str) else ret
        assert ret["name"] == "student_aux" and ret["trained_through"] == day.isoformat(), ret
        assert not ret.get("reused") and not ret.get("skipped"), ret
        after = mtimes(models_root)
        changed = {k.split("/")[0] for k in after if after[k] != before.get(k)}
        assert changed <= {"student_aux"}, f"files changed under {models_root}: {changed}"
        assert sha_tree(store / "labels") == labels_before
        print(f"integration: {time.monotonic() - t0:.0f} s with components up")
    assert all(not c.alive() for c in comps), codes

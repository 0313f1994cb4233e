"""Human-in-the-loop promotion at the end of kd_teacher_search (Airflow 3.1+ HITL).

* ``test_approval_task_and_promotion_on_a_real_result``: a real (tiny) search on MovieLens,
  then, in a subprocess with a private Airflow environment: the DAG's structure (HITL task
  after report, promote after it, finite timeouts, Reject default), the options and the
  Markdown body built from that result, and the operator's ``execute_complete`` + the
  promote task's function for approve / reject / timeout events.
* ``test_hitl_approval_under_a_real_scheduler`` (integration): scheduler, DAG processor and
  API server as separate processes; the DAG runs for real, the approval is answered through
  the REST API (``PATCH /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/{task}/-1/hitlDetails``)
  as the authenticated admin: Reject leaves the config byte-identical, ``Promote <another
  candidate>`` rewrites its teacher block and records the respondent, and no answer before
  the response timeout (15 s) takes the Reject default. Waits poll task states, never fixed sleeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.airflow_helpers import (
    REPO,
    Api,
    Component,
    airflow_env,
    free_port,
    init_airflow,
    running,
    wait_until,
)
from tests.test_teacher_search import _tiny_search, ml_examples  # noqa: F401  (fixture)

DAG_ID = "kd_teacher_search"
HITL_TASK = "approve_promotion"


def _configs(tmp_path: Path, examples: Path, n_candidates: int = 3) -> tuple[Path, Path, Path]:
    """A configs folder with the search config and a pipeline config to promote into."""
    cdir = tmp_path / "configs"
    cdir.mkdir()
    search = cdir / "search.yaml"
    data = _tiny_search(examples, tmp_path / "s")
    data["candidates"] = data["candidates"][:n_candidates]
    search.write_text(yaml.safe_dump(data))
    pipe = cdir / "pipe.yaml"
    pipe.write_text((REPO / "configs/demo.yaml").read_text().replace(
        "dataset: movielens.yaml", f"dataset: {REPO / 'configs/movielens.yaml'}"))
    return cdir, search, pipe


def _non_teacher(text: str) -> dict:
    return {k: v for k, v in yaml.safe_load(text).items() if k != "teacher"}


# ---------------------------------------------------------------- structure + task functions

_PROBE = r"""
import datetime as dt, json, os, sys
from pathlib import Path
from airflow.dag_processing.dagbag import DagBag
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk.exceptions import AirflowSkipException

result_uri, pipe = sys.argv[1], sys.argv[2]
bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"] + "/kd_teacher_search.py")
dag = bag.dags["kd_teacher_search"]
hitl = dag.task_dict["approve_promotion"]
prom = dag.task_dict["promote"]
from operators import teacher_search as t
from kdcore.search.runner import read_json
result = read_json(result_uri)
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()},
       "hitl_is_hitl": isinstance(hitl, HITLOperator), "hitl_upstream": sorted(hitl.upstream_task_ids),
       "promote_upstream": sorted(prom.upstream_task_ids), "leaves": sorted(x.task_id for x in dag.leaves),
       "hitl_timeout": hitl.execution_timeout.total_seconds(), "response_timeout": hitl.response_timeout.total_seconds(),
       "promote_timeout": prom.execution_timeout.total_seconds(), "defaults": hitl.defaults,
       "params": sorted(dag.params.keys())}
opts = t.approval_options(result)
subject, body = t.approval_text(result, pipe, {"diff": "--- a\n+++ b\n"}, 60)
out.update(options=opts, subject=subject, body=body)

class TI:
    def xcom_pull(self, task_ids):
        assert task_ids == "report"
        return {"result": result_uri}

class Run:
    run_id = "manual__probe"

ctx = {"ti": TI(), "params": {"promote_config": pipe}, "dag_run": Run()}
now = dt.datetime.now(dt.UTC)
admin = {"id": "admin", "name": "admin"}
second = [o for o, c in opts.items() if c and c != result["winner"]][0]
events = {"reject": {"chosen_options": ["Reject"], "params_input": {}, "responded_at": now, "responded_by_user": admin},
          "timeout": {"chosen_options": ["Reject"], "params_input": {}, "responded_at": now, "responded_by_user": None,
                      "timedout": True},
          "approve": {"chosen_options": [second], "params_input": {}, "responded_at": now, "responded_by_user": admin}}
fn = prom.python_callable
for name, ev in events.items():
    op = t.TeacherApprovalOperator(task_id="x")  # a fresh instance, as after a resume
    dec = op.execute_complete(ctx, ev)
    before = Path(pipe).read_text()
    try:
        rec = fn(dec, **ctx)
        out[name] = {"decision": dec, "record": rec, "changed": Path(pipe).read_text() != before}
    except AirflowSkipException as e:
        out[name] = {"decision": dec, "skipped": str(e), "changed": Path(pipe).read_text() != before}
try:
    t.TeacherApprovalOperator(task_id="y").execute_complete(ctx, {**events["approve"], "chosen_options": ["Promote nope"]})
    out["bad_option"] = "accepted"
except ValueError as e:
    out["bad_option"] = str(e)
try:
    t.promote_config_path("../outside.yaml")
    out["outside"] = "accepted"
except Exception as e:
    out["outside"] = str(e)
print("PROBE " + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def search_result(ml_examples, tmp_path_factory):  # noqa: F811
    from kdcore.search.config import search_from_dict
    from kdcore.search.run import run_search

    root = tmp_path_factory.mktemp("hitl_search")
    result = run_search(search_from_dict(_tiny_search(ml_examples, root / "s")), "probe")
    return result


def test_approval_task_and_promotion_on_a_real_result(search_result, ml_examples, tmp_path):  # noqa: F811
    from kdcore.config import load_pipeline

    cdir, _, pipe = _configs(tmp_path, ml_examples)
    original = pipe.read_text()
    env = airflow_env(tmp_path / "airflow", tmp_path / "store", KD_CONFIG_DIR=str(cdir))
    proc = subprocess.run([sys.executable, "-c", _PROBE, search_result["uris"]["result"], str(pipe)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    p = json.loads(lines[0][6:])
    assert p["errors"] == {}
    # structure: report -> approve_promotion (HITL) -> promote; finite timeouts; Reject by default
    assert p["hitl_is_hitl"] and p["hitl_upstream"] == ["report"] and p["promote_upstream"] == [HITL_TASK]
    assert p["leaves"] == ["promote"]
    assert 0 < p["hitl_timeout"] <= 3600 and 0 < p["response_timeout"] <= 7 * 86400 and p["promote_timeout"] > 0
    assert p["defaults"] == ["Reject"]
    assert {"promote_config", "request_approval", "approval_timeout_minutes"} <= set(p["params"])
    # options and body come from the real result: every ranked candidate with scored days, winner first
    win = search_result["winner"]
    ranked = [r["id"] for r in search_result["ranking"] if r["ne_gain"]["days"]]
    assert list(p["options"].values()) == [*ranked, None]
    assert list(p["options"])[0] == f"Promote {win} (winner)" and list(p["options"])[-1] == "Reject"
    assert win in p["subject"] and "NE gain" in p["subject"]
    from kdcore.evaluation.stats import fmt_ci
    for r in search_result["ranking"]:
        assert f"| `{r['id']}` | {r['status']} |" in p["body"]
        assert fmt_ci(r["ne_gain"]) in p["body"] and fmt_ci(r["auc_gain"]) in p["body"]
    assert "```diff" in p["body"] and "Reject" in p["body"]
    # reject and timeout: skipped, nothing written; approve (another candidate): written, respondent recorded
    assert p["reject"]["decision"]["decision"] == "reject" and "NOT PROMOTED: reject by admin" in p["reject"]["skipped"]
    assert p["timeout"]["decision"]["decision"] == "timeout" and p["timeout"]["decision"]["candidate"] is None
    assert "NOT PROMOTED: timeout" in p["timeout"]["skipped"]
    assert not p["reject"]["changed"] and not p["timeout"]["changed"]
    appr = p["approve"]
    chosen = appr["decision"]["candidate"]
    assert appr["decision"]["decision"] == "approve" and chosen != win and appr["changed"]
    rec = appr["record"]
    assert rec["written"] and rec["candidate"] == chosen and rec["approved_by"] == {"id": "admin", "name": "admin"}
    assert json.loads(Path(rec["record"].removeprefix("file://")).read_text())["approved_by"]["name"] == "admin"
    new = pipe.read_text()
    assert _non_teacher(new) == _non_teacher(original)
    assert "approved by admin" in new
    cand = next(c for c in search_result["config"]["candidates"] if c["id"] == chosen)
    cfg = load_pipeline(pipe)
    assert cfg.teacher.name == f"teacher_{chosen}"
    assert cfg.teacher.model.hidden == cand["model"]["hidden"]
    assert cfg.teacher.model.embedding_dim == cand["model"]["embedding_dim"]
    assert "Responses" in p["bad_option"] and "outside the allowed folder" in p["outside"]


# ---------------------------------------------------------------- real scheduler + REST


def _tis(api: Api, run_id: str) -> dict[str, dict]:
    tis = api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]
    return {f"{t['task_id']}[{t['map_index']}]": t for t in tis}


def _states(api: Api, run_id: str) -> tuple:
    return tuple(sorted((k, t.get("state") or "") for k, t in _tis(api, run_id).items()))


def _hitl_state(api: Api, run_id: str) -> str | None:
    return (_tis(api, run_id).get(f"{HITL_TASK}[-1]") or {}).get("state")


def _run_state(api: Api, run_id: str) -> str:
    return api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")["state"]


def _trigger_until_awaiting(api: Api, conf: dict, comps) -> str:
    run_id = api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def awaiting():
        st = _hitl_state(api, run_id)
        if _run_state(api, run_id) == "failed":
            raise RuntimeError(f"run {run_id} failed: {_states(api, run_id)}")
        return st == "awaiting_input"

    wait_until(f"{HITL_TASK} awaiting input in {run_id}", awaiting, 180, interval=2, components=comps,
               progress=lambda: _states(api, run_id))
    # Airflow 3.3.2 race: an answer that resumes the task before the scheduler has processed
    # the executor event of the process that parked it gets the resumed try marked failed
    # ("finished with state success, but the task instance's state attribute is running").
    # Answer only once that event is in the scheduler's log (polled, not a fixed sleep).
    sched = next(c for c in comps if c.name == "scheduler")
    wait_until(f"the scheduler to see {HITL_TASK} parked in {run_id}",
               lambda: any("Received executor event" in line and HITL_TASK in line and run_id in line
                           for line in sched.log.read_text(errors="replace").splitlines()),
               60, interval=1, components=comps)
    return run_id


def _finish(api: Api, run_id: str, comps) -> dict[str, str]:
    wait_until(f"run {run_id} to finish", lambda: _run_state(api, run_id) in ("success", "failed"), 120,
               interval=2, components=comps, progress=lambda: _states(api, run_id))
    return {k: t["state"] for k, t in _tis(api, run_id).items()}


@pytest.mark.integration
def test_hitl_approval_under_a_real_scheduler(ml_examples, tmp_path):  # noqa: F811
    from kdcore.config import load_pipeline

    cdir, search, pipe = _configs(tmp_path, ml_examples, n_candidates=2)  # one rung: keeps the run short
    original = pipe.read_text()
    port = free_port()
    home = tmp_path / "airflow"
    env = airflow_env(home, tmp_path / "store", api_port=port, KD_CONFIG_DIR=str(cdir),
                      AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL="2")
    init_airflow(env)
    logdir = tmp_path / "logs"
    logdir.mkdir()
    t0 = time.monotonic()
    comps = [Component("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port)], env, logdir),
             Component("scheduler", ["scheduler"], env, logdir),
             Component("dag-processor", ["dag-processor"], env, logdir)]
    api = Api(port, home)
    conf = {"config": search.name, "budget_seconds": 300, "validation_days": 4, "run_id": "hitl",
            "promote_config": pipe.name}
    timings = {}
    with running(comps) as codes:
        wait_until("API server health", api.healthy, 120, components=comps)
        api.login()
        wait_until(f"{DAG_ID} parsed", lambda: api("GET", f"/dags/{DAG_ID}"), 90, components=comps)
        api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
        timings["up"] = time.monotonic() - t0

        # -- run 1: the whole search; the form offers the ranked candidates; a person promotes a
        # non-winner (a person's Reject is the same skip path as the timeout below, and is
        # covered on the real task in test_approval_task_and_promotion_on_a_real_result)
        run1 = _trigger_until_awaiting(api, conf, comps)
        timings["search+await"] = time.monotonic() - t0
        hitl_path = f"/dags/{DAG_ID}/dagRuns/{run1}/taskInstances/{HITL_TASK}/-1/hitlDetails"
        detail = api("GET", hitl_path)
        result = json.loads((tmp_path / "s/search/hitl/report/result.json").read_text())
        win = result["winner"]
        assert detail["options"][0] == f"Promote {win} (winner)" and detail["options"][-1] == "Reject"
        assert detail["defaults"] == ["Reject"] and not detail["multiple"]
        assert win in detail["subject"] and "NE gain [95% CI]" in detail["body"] and "```diff" in detail["body"]
        assert pipe.read_text() == original  # nothing promoted while the question waits
        other = next(o for o in detail["options"] if o.startswith("Promote ") and "(winner)" not in o)
        chosen = other.removeprefix("Promote ")
        resp = api("PATCH", hitl_path, {"chosen_options": [other], "params_input": {}})
        assert resp["responded_by"]["name"] == "admin"  # PATCH answers responded_by; GET responded_by_user
        states = _finish(api, run1, comps)
        assert states["promote[-1]"] == "success", states
        rec = api("GET", f"/dags/{DAG_ID}/dagRuns/{run1}/taskInstances/promote/xcomEntries/return_value"
                         "?deserialize=true")["value"]
        rec = json.loads(rec) if isinstance(rec, str) else rec
        assert rec["written"] and rec["candidate"] == chosen and rec["approved_by"]["name"] == "admin"
        new = pipe.read_text()
        assert new != original and "approved by admin" in new
        assert _non_teacher(new) == _non_teacher(original)
        cand = next(c for c in result["config"]["candidates"] if c["id"] == chosen)
        cfg = load_pipeline(pipe)
        assert cfg.teacher.name == f"teacher_{chosen}" and cfg.teacher.model.hidden == cand["model"]["hidden"]
        assert json.loads(Path(rec["record"].removeprefix("file://")).read_text())["approved_by"]["name"] == "admin"

        # -- run 2 (same search run id: the search resumes, nothing retrains): nobody answers before
        # the response timeout -> Reject default, nothing written
        promoted = pipe.read_text()
        run2 = _trigger_until_awaiting(api, {**conf, "approval_timeout_minutes": 0.25}, comps)
        states = _finish(api, run2, comps)
        assert states[f"{HITL_TASK}[-1]"] == "success" and states["promote[-1]"] == "skipped", states
        detail = api("GET", f"/dags/{DAG_ID}/dagRuns/{run2}/taskInstances/{HITL_TASK}/-1/hitlDetails")
        assert detail["chosen_options"] == ["Reject"] and detail["responded_by_user"] is None
        assert pipe.read_text() == promoted
        timings["total"] = time.monotonic() - t0
        print(f"hitl integration timings (s): { {k: round(v) for k, v in timings.items()} }")
    assert all(not c.alive() for c in comps), codes

"""The KD view plugin (plugins/kd_ui) on a real Airflow API server.

A storage root produced by the real pipeline (the tiny config, bootstrapped, two daily
runs through kdcore.pipeline.run, then kdcore.report.build_report); an API server and a
DAG processor (for the REST-created run of kd_daily) with this repo's plugins folder.
Checks: every plugin endpoint answers 401 without a token (and with a bad one); with a
token the JSON figures equal the stored report's CSVs and gate records; the manual run's
tab resolves its partition date from conf; a plot PNG and a Data Docs page are served;
names not listed in a manifest are refused.

The session-scoped ``kd_ui_server`` fixture is shared with tests/test_ui_browser.py (one server)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.airflow_helpers import (
    DAG_ID,
    TINY,
    Api,
    Component,
    airflow_env,
    free_port,
    init_airflow,
    running,
    wait_until,
)
from tests.pipeline_fixtures import BOOTSTRAP_DAYS, copy_root, kd_base  # noqa: F401

pytestmark = pytest.mark.integration
PREFIX = "/kd"


@dataclass
class Server:
    api: Api
    home: Path
    store: Path
    days: list[dt.date]  # the two daily dates the pipeline ran
    run_id: str  # a manual kd_daily run created through REST with conf {"date": days[-1]}
    report: dict[str, Any]  # build_report's result
    comps: list[Component]

    @property
    def base(self) -> str:
        return self.api.base

    def get(self, path: str, token: str | None = "default", cookie: str | None = None) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(self.base + path)
        token = self.api.token if token == "default" else token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if cookie:
            req.add_header("Cookie", f"_token={cookie}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, path: str) -> Any:
        code, _, body = self.get(path)
        assert code == 200, (path, code, body[:500])
        return json.loads(body)


def _health(api: Api) -> bool:
    from tests.airflow_helpers import http

    return http("GET", f"{api.base}/api/v2/monitor/health").get("metadatabase", {}).get("status") == "healthy"


def api_server(env: dict[str, str], logdir: Path) -> tuple[Component, Api]:
    """Start an API server with ``env`` (airflow_env: this repo's plugins folder, a storage
    root and a config). A second one on the same AIRFLOW_HOME, with its own port, root and
    config, serves another storage root to the same users and DAG runs."""
    port = int(env["AIRFLOW__API__PORT"])
    comp = Component(f"api-server-{port}", ["api-server", "--host", "127.0.0.1", "--port", str(port)], env, logdir)
    return comp, Api(port, Path(env["AIRFLOW_HOME"]))


# Each module importing the fixture gets its own session-scoped FixtureDef: this cache makes
# them share one server (stopped at the end of the session by the first one's teardown).
_SERVER: list[Server] = []


@pytest.fixture(scope="session")
def kd_ui_server(kd_base, tmp_path_factory) -> Server:  # noqa: F811
    if _SERVER:
        yield _SERVER[0]
        return
    tmp = tmp_path_factory.mktemp("kd-ui")
    store = copy_root(kd_base, tmp / "store")
    days = kd_base.days[BOOTSTRAP_DAYS:BOOTSTRAP_DAYS + 2]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KD_STORAGE_ROOT", str(store))
        from kdcore import pipeline
        from kdcore.config import load_pipeline
        from kdcore.report.build import build_report

        cfg = load_pipeline(TINY)
        pipeline.run(cfg, days[0], days[-1], progress=False)
        report = build_report(cfg)
    home = tmp / "airflow"
    env = airflow_env(home, store, api_port=free_port())
    init_airflow(env)
    logdir = tmp / "logs"
    logdir.mkdir()
    server, api = api_server(env, logdir)
    comps = [server, Component("dag-processor", ["dag-processor"], env, logdir)]
    with running(comps):
        wait_until("API server health", lambda: _health(api), 120, components=comps)
        api.login()
        wait_until("kd_daily parsed", lambda: api("GET", f"/dags/{DAG_ID}"), 90, components=comps)
        plugins = api("GET", "/plugins")["plugins"]
        assert [p["name"] for p in plugins if p["name"] == "kd_ui"] == ["kd_ui"], plugins
        assert api("GET", "/plugins/importErrors")["import_errors"] == []
        run = api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"date": days[-1].isoformat()}})
        _SERVER.append(Server(api=api, home=home, store=store, days=days, run_id=run["dag_run_id"], report=report,
                              comps=comps))
        yield _SERVER[0]


def _endpoints(s: Server) -> list[str]:
    d = s.days[-1].isoformat()
    return [f"{PREFIX}/", f"{PREFIX}/run/{DAG_ID}/{s.run_id}", f"{PREFIX}/day/{d}", f"{PREFIX}/api/dashboard",
            f"{PREFIX}/api/run/{DAG_ID}/{s.run_id}", f"{PREFIX}/api/day/{d}", f"{PREFIX}/api/lineage",
            f"{PREFIX}/artifacts/report/metrics_like.png", f"{PREFIX}/artifacts/quality/{d}/data_docs/index.html",
            f"{PREFIX}/artifacts/report/nope", f"{PREFIX}/docs", f"{PREFIX}/openapi.json"]


def _stored_csv(s: Server, name: str) -> list[dict[str, str]]:
    from kdcore.storage import partition as part

    return list(csv.DictReader(io.StringIO(part.read_blob(s.report["uri"], name).decode())))


def _num(v: str) -> Any:
    return None if v == "" else (v == "True") if v in ("True", "False") else float(v)


def test_every_endpoint_requires_airflow_auth(kd_ui_server):
    s = kd_ui_server
    for path in _endpoints(s)[:10]:  # the app's own routes (docs/openapi are FastAPI's: see below)
        for token in (None, "not-a-jwt", s.api.token[:-4] + "AAAA"):
            code, headers, body = s.get(path, token=token)
            assert code == 401, (path, token and token[:8], code, body[:300])
            assert headers.get("www-authenticate", "").lower().startswith("bearer"), headers
        code, _, body = s.get(path, token=None, cookie="garbage")
        assert code == 401, (path, "bad cookie", code)
    for path in _endpoints(s)[10:]:  # FastAPI's generated docs: behind the same dependency, or absent
        code, _, _ = s.get(path, token=None)
        assert code in (401, 404), (path, code)
    # a valid token works as bearer and as the UI's _token cookie
    assert s.get(f"{PREFIX}/api/lineage")[0] == 200
    assert s.get(f"{PREFIX}/api/lineage", token=None, cookie=s.api.token)[0] == 200


def test_dashboard_json_equals_stored_report(kd_ui_server):
    s = kd_ui_server
    t0 = time.monotonic()
    d = s.json(f"{PREFIX}/api/dashboard")
    gains = _stored_csv(s, "kd_gain.csv")
    assert len(d["gains"]) == len(gains) > 0
    for shown, stored in zip(d["gains"], gains):
        for k in ("student", "mode", "control", "task", "metric"):
            assert shown[k] == stored[k]
        for k in ("mean", "lo", "hi", "days"):
            assert shown[k] == _num(stored[k]), (k, shown, stored)
    # the report's own gains (build_report's return) agree too
    assert [(g["student"], g["metric"], g["mean"]) for g in d["gains"]] == \
        [(g["student"], g["metric"], g["mean"]) for g in s.report["gains"]]
    gates = _stored_csv(s, "gate.csv")
    assert [g["date"] for g in d["gates"]] == [g["date"] for g in gates] == [x.isoformat() for x in s.days]
    for shown, stored in zip(d["gates"], gates):
        for k, v in stored.items():
            assert shown[k] == (v if k in ("date", "status", "action", "teacher_version") else _num(v)), (k, shown)
    metrics = _stored_csv(s, "metrics.csv")
    assert len(d["metrics"]) == len(metrics)
    for shown, stored in zip(d["metrics"], metrics):
        assert shown["auc"] == _num(stored["auc"]) and shown["rmse"] == _num(stored["rmse"])
    # teacher vs students vs control: the means printed in report.md
    md = s.report["markdown"]
    for r in d["means"]:
        row = f"| {r['model']} | {r['role']} | {r['task']} | {r['days']} | "
        assert row in md, row
        line = next(ln for ln in md.splitlines() if ln.startswith(row))
        cells = [c.strip() for c in line.strip("|").split("|")][4:]
        assert cells == [f"{r[m]:.4f}" if r[m] is not None else "" for m in ("auc", "gauc", "ne", "calibration",
                                                                              "rmse")], (line, r)
    assert {r["role"] for r in d["means"]} == {"teacher", "student", "control"}
    assert set(d["plots"]) == {f for f in s.report["files"] if f.endswith(".png")}
    # lineage: each date labelled by the teacher the gate recorded, consumed by both distilling students
    assert [(r["date"], r["teacher_version"]) for r in d["lineage"]] == \
        [(g["date"], g["teacher_version"]) for g in gates]
    assert all(r["students"] == ["student_aux", "student_direct"] for r in d["lineage"]), d["lineage"]
    assert s.json(f"{PREFIX}/api/lineage") == d["lineage"]
    print(f"dashboard JSON in {time.monotonic() - t0:.1f} s")


def test_run_tab_json_equals_gate_record_and_checkpoints(kd_ui_server, monkeypatch):
    s = kd_ui_server
    from kdcore.config import load_pipeline
    from kdcore.models import registry
    from kdcore.quality.daily import quality_uri
    from kdcore.storage import partition as part

    monkeypatch.setenv("KD_STORAGE_ROOT", str(s.store))  # cfg.root reads it
    cfg = load_pipeline(TINY)
    day = s.days[-1]
    v = s.json(f"{PREFIX}/api/run/{DAG_ID}/{s.run_id}")
    assert v["date"] == day.isoformat() and v["run_id"] == s.run_id  # from the run's conf
    decision = json.loads(part.read_blob(quality_uri(cfg, day), "decision.json"))
    t = v["teacher"]
    for k in ("teacher_version", "teacher_trained_through", "staleness_days", "expected_staleness_days",
              "teacher_stale"):
        assert t[k] == decision[k], k
    assert v["gate"]["status"] == decision["status"] and v["gate"]["action"] == decision["action"]
    checks = {c["name"]: c["value"] for c in v["gate"]["checks"]}
    for c in decision["checks"]:
        assert checks[c["name"]] == c["value"], c["name"]
    assert {"psi", "js", "calibration:like", "label_drift:like"} <= set(checks)
    assert "data_docs/index.html" in v["gate"]["data_docs"]
    # each student's progressive metrics on D against the control's: the checkpoints' own
    assert [x["student"] for x in v["students"]] == [x.name for x in cfg.students]
    for x in v["students"]:
        meta = registry.find_checkpoint(cfg.root, cfg.spec.name, x["student"], day).meta
        cmeta = registry.find_checkpoint(cfg.root, cfg.spec.name, x["control"], day).meta
        assert meta["progressive"]["date"] == day.isoformat()
        assert x["metrics"]["like"]["auc"] == meta["progressive"]["metrics"]["like"]["auc"]
        assert x["control_metrics"]["like"]["auc"] == cmeta["progressive"]["metrics"]["like"]["auc"]
        assert x["delta"]["rating"]["rmse"] == pytest.approx(
            meta["progressive"]["metrics"]["rating"]["rmse"] - cmeta["progressive"]["metrics"]["rating"]["rmse"])
        assert x["label_teacher"] == decision["teacher_version"]
    # the per-run figures agree with the published metrics.csv rows of that date
    rows = {(r["model"], r["task"]): r for r in _stored_csv(s, "metrics.csv") if r["date"] == day.isoformat()}
    for x in v["students"]:
        assert x["metrics"]["like"]["ne"] == _num(rows[(x["student"], "like")]["ne"])
    # ?date= override and the per-date view
    other = s.days[0].isoformat()
    assert s.json(f"{PREFIX}/api/run/{DAG_ID}/{s.run_id}?date={other}")["date"] == other
    assert s.json(f"{PREFIX}/api/day/{day.isoformat()}")["gate"] == v["gate"]
    assert s.get(f"{PREFIX}/api/run/{DAG_ID}/no-such-run")[0] == 404
    assert s.get(f"{PREFIX}/api/day/1900-01-01")[0] == 404
    code, _, html = s.get(f"{PREFIX}/run/{DAG_ID}/{s.run_id}")
    assert code == 200 and decision["teacher_version"].encode() in html


def test_artifacts_served_from_manifests_only(kd_ui_server):
    s = kd_ui_server
    from kdcore.storage import partition as part

    code, headers, body = s.get(f"{PREFIX}/artifacts/report/metrics_like.png")
    assert code == 200 and headers["content-type"] == "image/png" and body.startswith(b"\x89PNG")
    assert body == part.read_blob(s.report["uri"], "metrics_like.png")
    day = s.days[-1].isoformat()
    code, headers, body = s.get(f"{PREFIX}/artifacts/quality/{day}/data_docs/index.html")
    assert code == 200 and headers["content-type"].startswith("text/html") and b"<html" in body.lower()
    page = s.json(f"{PREFIX}/api/day/{day}")["gate"]["data_docs"]
    validation = next(p for p in page if "/validations/" in p)
    code, _, body = s.get(f"{PREFIX}/artifacts/quality/{day}/{validation}")
    assert code == 200 and b"Great Expectations" in body and b"<table" in body
    code, _, body = s.get(f"{PREFIX}/artifacts/report/report.md")
    assert code == 200 and body.decode() == s.report["markdown"]
    # only names a manifest lists: stored paths, traversal and other partitions are refused
    stored_path = part.read_manifest(s.report["uri"]).file("metrics_like.png").path
    for bad in [f"{PREFIX}/artifacts/report/{stored_path}", f"{PREFIX}/artifacts/report/_MANIFEST.json",
                f"{PREFIX}/artifacts/report/..%2F..%2Fmodels", f"{PREFIX}/artifacts/quality/{day}/..%2F..%2F..%2Freports",
                f"{PREFIX}/artifacts/quality/{day}/data_docs/../../../../etc/passwd",
                f"{PREFIX}/artifacts/quality/{day}/%2Fetc%2Fpasswd", f"{PREFIX}/artifacts/quality/../etc/passwd",
                f"{PREFIX}/artifacts/quality/not-a-date/decision.json"]:
        code, _, body = s.get(bad)
        assert code == 404, (bad, code, body[:200])


def csp(headers: dict[str, str]) -> dict[str, list[str]]:
    """The Content-Security-Policy header as {directive: [values]} (one header expected)."""
    value = {k.lower(): v for k, v in headers.items()}.get("content-security-policy")
    assert value, f"no Content-Security-Policy in {headers}"
    return {d.split()[0]: d.split()[1:] for d in (x.strip() for x in value.split(";")) if d}


def assert_page_policy(headers: dict[str, str]) -> None:
    """The view's own pages: no script from anywhere, framed by the Airflow UI (same origin) only."""
    p = csp(headers)
    assert p["default-src"] == ["'none'"] and "script-src" not in p and "script-src-elem" not in p, p
    assert p["frame-ancestors"] == ["'self'"] and p["base-uri"] == ["'none'"] and p["form-action"] == ["'none'"], p
    assert all(v in ("'self'", "'unsafe-inline'", "'none'") for vs in p.values() for v in vs), p  # no other origin


def assert_artifact_policy(headers: dict[str, str]) -> None:
    """Stored files: a sandbox without allow-scripts / allow-same-origin, loading nothing."""
    p = csp(headers)
    assert p["sandbox"] == [], p  # no allow-* token at all
    assert p["default-src"] == ["'none'"] and "script-src" not in p, p
    loads = {k: vs for k, vs in p.items() if k != "frame-ancestors"}  # who may frame it is not a load
    assert not any("'self'" in vs or any(v.startswith("http") for v in vs) for vs in loads.values()), p
    assert p["frame-ancestors"] == ["'self'"], p


def test_security_headers_on_every_response(kd_ui_server):
    """Every response of the view (pages, JSON, artifacts, 401 and 404) is nosniff and carries a
    CSP: the pages the view's own, every stored file the sandbox; JSON stays JSON."""
    s = kd_ui_server
    day = s.days[-1].isoformat()
    docs = s.json(f"{PREFIX}/api/day/{day}")["gate"]["data_docs"]
    assert len(docs) >= 3, docs  # index, expectation suite, validation
    pages = [f"{PREFIX}/", f"{PREFIX}/run/{DAG_ID}/{s.run_id}", f"{PREFIX}/day/{day}"]
    jsons = [f"{PREFIX}/api/dashboard", f"{PREFIX}/api/run/{DAG_ID}/{s.run_id}", f"{PREFIX}/api/day/{day}",
             f"{PREFIX}/api/lineage"]
    artifacts = [f"{PREFIX}/artifacts/report/metrics_like.png", f"{PREFIX}/artifacts/report/report.md",
                 f"{PREFIX}/artifacts/report/kd_gain.csv", f"{PREFIX}/artifacts/quality/{day}/decision.json",
                 *[f"{PREFIX}/artifacts/quality/{day}/{p}" for p in docs]]
    errors = [(f"{PREFIX}/day/1900-01-01", "default", 404), (f"{PREFIX}/artifacts/report/nope", "default", 404),
              (f"{PREFIX}/", None, 401), (f"{PREFIX}/artifacts/quality/{day}/data_docs/index.html", None, 401)]
    for path in pages + jsons + artifacts:
        code, headers, _ = s.get(path)
        assert code == 200, (path, code)
        assert headers.get("x-content-type-options") == "nosniff", (path, headers)
        kind = headers["content-type"]
        if path in pages:
            assert kind.startswith("text/html"), (path, kind)
            assert_page_policy(headers)
        elif path in jsons:
            assert kind == "application/json", (path, kind)
            assert_page_policy(headers)
        else:
            assert_artifact_policy(headers)
    for path, token, status in errors:
        code, headers, _ = s.get(path, token=token)
        assert code == status and headers["content-type"] == "application/json", (path, code, headers)
        assert headers.get("x-content-type-options") == "nosniff" and csp(headers), (path, headers)


def test_data_docs_are_served_without_script_or_other_origins(kd_ui_server):
    """GX writes script, CDN style sheets and scripts, event handlers and an S3 logo into its
    pages (the stored bytes keep them); what is served has none, and stays readable: the
    validation tables are all there, and the index's script-filled tables are plain rows."""
    import re

    from kdcore.quality.daily import quality_uri
    from kdcore.storage import partition as part

    s = kd_ui_server
    day = s.days[-1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KD_STORAGE_ROOT", str(s.store))
        from kdcore.config import load_pipeline

        uri = quality_uri(load_pipeline(TINY), day)
    docs = s.json(f"{PREFIX}/api/day/{day.isoformat()}")["gate"]["data_docs"]
    validation = next(p for p in docs if "/validations/" in p)
    for name in docs:
        stored = part.read_blob(uri, name).decode()
        code, headers, body = s.get(f"{PREFIX}/artifacts/quality/{day.isoformat()}/{name}")
        served = body.decode()
        assert code == 200 and headers["content-type"].startswith("text/html")
        assert "<script" in stored and "https://" in stored, name  # what GX wrote
        assert "<script" not in served.lower(), name
        assert not re.search(r"""\s(?:src|href|action|data)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//|/)""", served,
                             re.I), name
        assert not re.search(r"<[a-z][^>]*\son[a-z]+\s*=", served, re.I), name
        assert served.count("<table") == stored.count("<table"), name
        assert served.count("<td") >= stored.count("<td"), name
    code, _, body = s.get(f"{PREFIX}/artifacts/quality/{day.isoformat()}/data_docs/index.html")
    index = body.decode()
    assert f'<a href="{validation.removeprefix("data_docs/")}">' in index, index[-3000:]
    assert f"<td>movielens-{day.isoformat()}</td>" in index  # the run name, from the script's data

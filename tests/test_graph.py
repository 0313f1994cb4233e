"""The one step graph: ``kd run`` and the DAG's tasks walk the same stages and make the
same decisions for the same inputs; a stage added to the graph reaches both; a reused
stage says so; records round-trip through JSON (XCom) and keep the stored keys."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdcore import pipeline
from kdcore.errors import KDError
from kdcore.flow import graph
from kdcore.flow.stage import Run, Stage
from kdcore.records import GateDecision, LabelLineage, LabelsRef
from kdcore.storage import fs as sfs
from kdcore.training import steps
from tests.pipeline_fixtures import KD, kd, kd_base  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- records and paths


def test_lineage_keeps_the_manifest_keys_and_records_round_trip_through_json():
    lin = LabelLineage.of("teacher-19970929-x", dt.date(1997, 9, 29), dt.date(1997, 10, 1), 1)
    assert lin.metadata() == {"teacher_version": "teacher-19970929-x", "teacher_trained_through": "1997-09-29",
                              "staleness_days": 2, "expected_staleness_days": 1, "teacher_stale": True}
    assert LabelLineage.from_metadata({**lin.metadata(), "rows": 3}) == lin
    ref = LabelsRef(path="labels/movielens/date=1997-10-01/teacher=x", date="1997-10-01", lineage=lin, rows=3)
    decision = GateDecision(date="1997-10-01", status="warn", action="distill", summary="s",
                            checks={"teacher_fresh": {"value": 2.0, "status": "warn"}}, lineage=lin, labels=ref)
    assert GateDecision.model_validate(json.loads(json.dumps(decision.model_dump(mode="json")))) == decision
    with pytest.raises(ValueError):
        LabelLineage(**lin.metadata(), extra=1)


def test_one_rule_for_paths_relative_to_the_root(tmp_path):
    root = sfs.normalize(str(tmp_path / "a root"))
    uri = sfs.join(root, "labels", "ds", "date=1997-10-01")
    assert sfs.relative(root, uri) == "labels/ds/date=1997-10-01"  # no leading slash
    assert sfs.absolute(root, sfs.relative(root, uri)) == uri
    assert sfs.relative(root, "gs://other/x") == "gs://other/x"


def test_a_fingerprint_recorded_with_the_legacy_leading_slash_is_the_same(kd: KD, monkeypatch):
    """Student checkpoints published before one path rule recorded ``/labels/...``: an
    upgraded deployment reuses them instead of retraining."""
    D = kd.day(1)
    pipeline.run_day(kd.cfg, D, stages=("teacher", "labels", "students"))
    ckpt = steps.registry.find_checkpoint(kd.cfg.root, kd.cfg.spec.name, "student_aux", D)
    fp = ckpt.meta["fingerprint"]
    assert fp["labels"].startswith("labels/") and ckpt.meta["labels_path"] == fp["labels"]
    parent = steps.registry.parent_for(kd.cfg.root, kd.cfg.spec.name, "student_aux", D)
    legacy = {**fp, "labels": "/" + fp["labels"]}
    monkeypatch.setattr(steps.registry, "find_checkpoint", lambda *a: SimpleNamespace(
        meta={**ckpt.meta, "fingerprint": legacy}))
    assert steps.existing_checkpoint(kd.cfg, "student_aux", D, parent, fp) is not None


# ---------------------------------------------------------------- the graph reaches every caller


def test_the_stage_lists_of_kd_run_and_the_dag_come_from_the_graph():
    from operators import kd_daily as ops

    assert [s.name for s in graph.GRAPH] == ["validate", "teacher", "labels", "gate", "students", "report"]
    assert pipeline.STAGES == graph.STAGES == tuple(ops.STAGES)  # the DAG file mirrors it (no kdcore at parse)
    assert ops.STAGE_LABELS == graph.STAGE_LABELS
    for stage in graph.GRAPH:  # inputs name earlier stages only
        earlier = [s.name for s in graph.GRAPH[:graph.GRAPH.index(stage)]]
        assert set(stage.inputs) <= set(earlier), stage.name


def test_a_stage_added_to_the_graph_runs_in_kd_run_and_in_a_dag_task(kd: KD, monkeypatch):
    seen = []

    def bless(run: Run, inputs: dict) -> dict:
        seen.append((run.day, sorted(inputs["students"])))
        return {"blessed": sorted(inputs["students"])}

    extra = Stage("bless", "bless: accept the students", ("students",), bless)
    monkeypatch.setattr(graph, "GRAPH", (*graph.GRAPH[:-1], extra, graph.GRAPH[-1]))
    D = kd.day(1)
    outputs = graph.walk_day(Run(kd.cfg, D, frozenset({*pipeline.STAGES, "bless"})))
    assert outputs["bless"] == {"blessed": ["control", "student_aux", "student_direct"]}
    assert seen == [(D, ["control", "student_aux", "student_direct"])]
    # the DAG's tasks run graph stages by name (operators.kd_daily._stage)
    from operators import kd_daily as ops

    monkeypatch.setattr(graph, "BY_NAME", {**graph.BY_NAME, "bless": extra})
    plan = {"date": D.isoformat(), "config": str(REPO / "tests" / "configs" / "tiny.yaml"), "stages": ["bless"],
            "students": [], "teacher_version": None, "force": False}
    assert ops._stage("bless", ops._run(plan), {"students": {"x": {}}}) == {"blessed": ["x"]}


def test_a_rerun_records_every_reused_stage_as_reused(kd: KD):
    run = Run(kd.cfg, kd.day(1), frozenset(pipeline.STAGES) - {"report"})
    first = graph.walk_day(run)
    assert not first["labels"].reused and not first["teacher"].get("reused")
    again = graph.walk_day(run)
    assert again["teacher"]["reused"] is True and again["labels"].reused is True
    assert all(s["reused"] is True for s in again["students"].values())
    assert again["gate"].model_dump(exclude={"labels"}) == first["gate"].model_dump(exclude={"labels"})
    assert again["gate"].labels == first["labels"].model_copy(update={"changed": False, "reused": True})


# ---------------------------------------------------------------- the CLI and the DAG decide alike


def _config(tmp: Path) -> Path:
    """tiny.yaml whose gate fails a day labelled 2 days stale (a stale fallback)."""
    text = (REPO / "tests" / "configs" / "tiny.yaml").read_text()
    text = text.replace("dataset: ../../configs/movielens.yaml", f"dataset: {REPO / 'configs' / 'movielens.yaml'}")
    text += "  staleness_days: {warn: 1, fail: 1.5}\n"
    p = tmp / "pipeline.yaml"
    p.write_text(text)
    return p


class _Events(dict):
    def __missing__(self, key):
        self[key] = SimpleNamespace(extra=None, add=lambda asset, extra=None: None)
        return self[key]


class _TI:
    def __init__(self, decision=None):
        self.pushed, self.decision = {}, decision

    def xcom_push(self, key, value):
        self.pushed[key] = value

    def xcom_pull(self, task_ids=None, key=None):
        return self.decision


def _xcom(value):
    return json.loads(json.dumps(value))  # what XCom stores


def _dag_day(config: Path, cfg, day: dt.date) -> None:
    """The DAG's tasks for one day in its order, each given its upstream's XCom."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from operators import kd_daily as ops

    plan = {"date": day.isoformat(), "config": str(config), "root": cfg.root, "dataset": cfg.spec.name,
            "stages": list(ops.STAGES), "students": [s.name for s in cfg.all_students()], "not_trained": [],
            "teacher_version": None, "force": False, "shards": cfg.labels.shards}
    if not ops.wait_for_examples.function(plan, ti=_TI(), task=SimpleNamespace(timeout=0.0, poke_interval=0.0)
                                          ).is_done:
        raise AssertionError("not published")
    try:
        ops.refresh_teacher.function(plan, outlet_events=_Events())
    except AirflowFailException:
        pass  # choose_teacher runs on all_done: the last good teacher stands in
    shards = _xcom(ops.choose_teacher.function(plan))
    for s in shards:
        ops.materialize_shard.function(plan, **s)
    labels = _xcom(ops.commit_labels.function(plan, shards, outlet_events=_Events()))
    ti = _TI()
    try:
        ops.quality_gate.function(plan, labels, ti=ti)
    except AirflowFailException:
        pass  # a failed gate still pushed its decision; the students follow its action
    decision = _xcom(ti.pushed[ops.DECISION_KEY])
    for name in plan["students"]:
        try:
            ops.train_student.function(plan, name, ti=_TI(decision), outlet_events=_Events())
        except AirflowSkipException:
            pass


def _records(root: Path) -> dict[str, object]:
    """The decisions both callers store: gate records, labels manifests, checkpoint metas
    (without their wall-clock seconds) and checkpoint files."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel.startswith(("examples/", "reports/")) or "/data_docs/" in rel:
            continue
        if rel.startswith("quality/"):  # a folder named by content, Data Docs (GX run times) included
            if p.name == "decision.json":
                out[rel.split("/", 3)[0] + "/" + "/".join(rel.split("/")[1:3]) + "/decision.json"] = \
                    json.loads(p.read_text())
        elif rel.startswith("labels/") and p.name == "_MANIFEST.json":
            out[rel] = json.loads(p.read_text())
        elif rel.startswith("models/") and p.name.startswith("meta"):  # named by content: seconds
            meta = json.loads(p.read_text())
            meta.pop("train_seconds", None)
            out[rel.rsplit("/", 1)[0] + "/meta.json"] = meta
        elif rel.startswith("models/") and p.name != "_MANIFEST.json":
            out[rel] = p.read_bytes()
    return out


def test_the_cli_and_the_dag_make_the_same_decisions(kd: KD, tmp_path, monkeypatch):
    """Three days and a missing one, driven through ``kd run`` and through the DAG's tasks
    from copies of one root: a normal day, two failed teacher refreshes (the second labels
    the day with a 2-day-stale fallback teacher, which the gate fails: students train on
    hard labels only), and a day never published (both refuse it, nothing written)."""
    pytest.importorskip("airflow")
    from kdcore.config import load_pipeline
    from operators import kd_daily as ops

    monkeypatch.setattr(ops, "_label", lambda text: None)  # needs a task context
    config = _config(tmp_path)
    roots = {"cli": kd.root, "dag": tmp_path / "dag-root"}
    shutil.copytree(kd.root, roots["dag"])
    days = [kd.day(1), kd.day(2), kd.day(3)]
    real = steps.teacher_step

    def refresh(cfg, day, force=False):
        if day != days[0]:
            raise KDError(f"refresh of {day} exploded")
        return real(cfg, day, force=force)

    monkeypatch.setattr(steps, "teacher_step", refresh)
    missing = dt.date(2031, 1, 1)
    for who, root in roots.items():
        monkeypatch.setenv("KD_STORAGE_ROOT", str(root))
        cfg = load_pipeline(config)
        for day in days:
            if who == "cli":
                out = pipeline.run_day(cfg, day)
            else:
                _dag_day(config, cfg, day)
        before = _records(root)
        with pytest.raises(Exception, match="2031-01-01"):
            if who == "cli":
                pipeline.run_day(cfg, missing)
            else:
                ops.wait_for_examples.function(
                    {"date": missing.isoformat(), "config": str(config), "root": cfg.root,
                     "dataset": cfg.spec.name, "stages": list(ops.STAGES), "students": [],
                     "teacher_version": None, "force": False, "shards": 2},
                    ti=_TI(), task=SimpleNamespace(timeout=0.5, poke_interval=1.0))
        assert _records(root) == before
        if who == "cli":
            assert out["gate"]["status"] == "fail" and out["gate"]["teacher_stale"] is True
    cli, dag = _records(roots["cli"]), _records(roots["dag"])
    assert cli.keys() == dag.keys()
    for k in cli:
        assert cli[k] == dag[k], k
    gates = {k: v for k, v in cli.items() if k.endswith("decision.json")}
    assert len(gates) == 3 and list(gates.values())[-1]["status"] == "fail"
    stale = gates[f"quality/{kd.cfg.spec.name}/date={days[2]}/decision.json"]
    assert stale["teacher_stale"] is True and stale["action"] == "hard_labels_only"
    aux = cli[f"models/{kd.cfg.spec.name}/student_aux/date={days[2]}/meta.json"]
    assert aux["kd_applied"] is False and aux["gate_action"] == "hard_labels_only"

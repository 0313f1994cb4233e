"""The quality gate inside the daily pipeline: a frozen teacher and a sudden shift trip
warn then fail (a teacher staler than the label lag always warns: teacher_fresh),
students react per policy, broken label files fail with the check and the count of bad
rows, and the report shows every day's gate figures and the stale-teacher days."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from kdcore import pipeline
from kdcore.config import load_pipeline
from kdcore.data import examples, synth
from kdcore.labels import materialize as mat
from kdcore.models import registry
from kdcore.quality.daily import run_gate
from kdcore.report.build import build_report
from kdcore.storage import partition as part
from kdcore.training import steps

REPO = Path(__file__).resolve().parents[1]
D0 = dt.date(2026, 1, 1)
SHIFT = dt.date(2026, 1, 9)


def _config(tmp: Path, on_fail: str) -> Path:
    text = f"""
dataset: {REPO / 'configs' / 'synth.yaml'}
storage_root: {tmp / 'root'}
teacher:
  model: {{embedding_dim: 8, hidden: [32, 16], hash_buckets: 4096, lr: 0.01, batch_size: 256, epochs: 2}}
students:
  - name: student_aux
    model: {{embedding_dim: 4, hidden: [8], hash_buckets: 2048, lr: 0.01, batch_size: 256}}
    distill: {{mode: auxiliary}}
policies: {{max_label_staleness_days: 30}}
labels: {{shards: 1}}
bootstrap: {{days: 4, epochs: 2}}
gate:
  ignore_features: [user_id, item_id]
  on_fail: {on_fail}
torch_threads: 1
"""
    p = tmp / f"pipeline-{on_fail}.yaml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gate")
    cfg = load_pipeline(_config(tmp, "hard_labels_only"))
    scfg = synth.SynthConfig(seed=3, rows_per_day=3000, n_users=2000, n_items=500, new_items_per_day=5,
                             start_date=D0, shift_date=SHIFT, shift_strength=1.0)
    for i in range(12):
        day = D0 + dt.timedelta(days=i)
        examples.publish_day(cfg.root, cfg.spec, day, synth.generate_day(scfg, day))
    steps.bootstrap(cfg, D0 + dt.timedelta(days=3))
    return tmp


def _fresh(synth_root: Path, tmp_path: Path, on_fail: str):
    shutil.copytree(synth_root / "root", tmp_path / "root")
    return load_pipeline(_config(tmp_path, on_fail))


def test_frozen_teacher_trips_warn_then_fail_and_students_fall_back(synth_root, tmp_path):
    cfg = _fresh(synth_root, tmp_path, "hard_labels_only")
    frozen = registry.find_checkpoint(cfg.root, cfg.spec.name, "teacher", D0 + dt.timedelta(days=3)).version
    statuses, fresh = {}, {}
    for k in (1, 3, 8):  # staleness thresholds: warn > 2, fail > 7
        day = D0 + dt.timedelta(days=3 + k)
        out = pipeline.run_day(cfg, day, stages=("labels", "gate", "students"), teacher_version=frozen)
        statuses[k] = out["gate"]["checks"]["staleness_days"]["status"]
        # a pinned teacher staler than the one-day label lag is a stale teacher: teacher_fresh warns
        fresh[k] = (out["gate"]["checks"]["teacher_fresh"]["status"], out["gate"]["teacher_stale"])
        assert out["gate"]["teacher_version"] == frozen and out["gate"]["staleness_days"] == k
        if statuses[k] == "fail":
            assert out["gate"]["status"] == "fail" and out["gate"]["action"] == "hard_labels_only"
            assert "staleness_days" in out["gate"]["summary"]
            meta = registry.find_checkpoint(cfg.root, cfg.spec.name, "student_aux", day).meta
            assert meta["kd_applied"] is False and meta["gate_action"] == "hard_labels_only"
    assert statuses == {1: "pass", 3: "warn", 8: "fail"}
    assert fresh == {1: ("pass", False), 3: ("warn", True), 8: ("warn", True)}
    stale = build_report(cfg)
    assert stale["stale_teacher_days"] == [(D0 + dt.timedelta(days=3 + k)).isoformat() for k in (3, 8)]
    assert f"- {D0 + dt.timedelta(days=11)}: teacher {frozen}, 8 day(s) stale (expected 1); gate fail" \
        in stale["markdown"]


def test_skip_policy_publishes_no_student(synth_root, tmp_path):
    cfg = _fresh(synth_root, tmp_path, "skip_students")
    frozen = registry.find_checkpoint(cfg.root, cfg.spec.name, "teacher", D0 + dt.timedelta(days=3)).version
    day = D0 + dt.timedelta(days=11)  # 8 days stale
    out = pipeline.run_day(cfg, day, stages=("labels", "gate", "students"), teacher_version=frozen)
    assert out["gate"]["action"] == "skip_students"
    assert all(s["skipped"] for s in out["students"].values())
    assert registry.list_checkpoints(cfg.root, cfg.spec.name, "student_aux") == [D0 + dt.timedelta(days=3)]


def test_sudden_shift_is_flagged_after_but_not_before(synth_root, tmp_path):
    cfg = _fresh(synth_root, tmp_path, "hard_labels_only")
    results = pipeline.run(cfg, D0 + dt.timedelta(days=4), D0 + dt.timedelta(days=9), progress=False)
    by_day = {r["date"]: r["gate"] for r in results}
    before = by_day[(SHIFT - dt.timedelta(days=1)).isoformat()]
    after = by_day[SHIFT.isoformat()]
    tripped_after = {n for n, c in after["checks"].items() if c["status"] != "pass"} - {"expectations"}
    tripped_before = {n for n, c in before["checks"].items() if c["status"] != "pass"} - {"expectations"}
    # the shift moves the click rate: the click label drift trips on the shift day only
    assert "label_drift:click" in tripped_after, after["summary"]
    assert "label_drift:click" not in tripped_before, before["summary"]
    # every day's gate figures are in the report
    report = build_report(cfg)
    gate_csv = part.read_blob(report["uri"], "gate.csv").decode()
    for r in results:
        assert r["date"] in gate_csv
    assert "## Gate per day" in report["markdown"]
    assert "shift.png" in report["files"]
    # the teacher was refreshed every day: no fallback anywhere
    assert all(not r["gate"]["teacher_stale"] and r["gate"]["checks"]["teacher_fresh"]["status"] == "pass"
               for r in results)
    assert "## Labels from a stale teacher\n\nNone: every day was labelled" in report["markdown"]
    assert report["stale_teacher_days"] == []


@pytest.mark.parametrize("breakage,check,count", [
    ("nan", "invalid_labels:click", 7),
    ("missing", "coverage", 5),
    ("dtype", "invalid_labels:click", None),
])
def test_broken_label_files_fail_the_gate_naming_check_and_count(synth_root, tmp_path, breakage, check, count):
    cfg = _fresh(synth_root, tmp_path, "hard_labels_only")
    day = D0 + dt.timedelta(days=4)
    steps.teacher_step(cfg, day)
    good = mat.materialize(cfg, day)
    labels = part.read_table(good["uri"])
    if breakage == "nan":
        click = labels["click"].to_numpy().copy()
        click[:7] = float("nan")
        labels = labels.set_column(labels.schema.get_field_index("click"), "click", pa.array(click))
    elif breakage == "missing":
        labels = labels.slice(5)
    else:
        labels = labels.set_column(labels.schema.get_field_index("click"), "click",
                                   pc.cast(pc.round(labels["click"]), pa.int64()))
    manifest = part.read_manifest(good["uri"])
    # in the teacher's own folder: labels in a folder of another teacher name are refused
    # before any check (issue 19), so the broken labels replace the good ones
    bad_uri = good["uri"]
    part.publish_table(bad_uri, labels, manifest.metadata)
    out = run_gate(cfg, day, bad_uri)
    assert out["status"] == "fail"
    assert out["checks"][check]["status"] == "fail"
    decision = json.loads(part.read_blob(out["uri"], "decision.json"))
    detail = next(c["detail"] for c in decision["checks"] if c["name"] == check)
    if count is not None:
        assert f"{count} " in detail, detail
    assert check.split(":")[0] in out["summary"]
    assert out["data_docs"] and part.read_manifest(out["uri"]).file("data_docs/index.html")


def test_gx_sees_at_most_expectations_max_rows_the_other_checks_every_row(synth_root, tmp_path):
    cfg = _fresh(synth_root, tmp_path, "hard_labels_only")
    cfg = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"expectations_max_rows": 1000})})
    day = D0 + dt.timedelta(days=4)
    steps.teacher_step(cfg, day)
    out = run_gate(cfg, day, mat.materialize(cfg, day)["uri"])
    gx = json.loads(part.read_blob(out["uri"], "data_docs/kd_validation_result.json"))
    counts = {r["result"]["element_count"] for r in gx["results"] if "element_count" in r.get("result", {})}
    assert counts == {1000}  # 3000 rows: every 3rd
    shift = json.loads(part.read_blob(out["uri"], "shift.json"))
    checks = json.loads(part.read_blob(out["uri"], "labels_check.json"))
    assert shift["cur_rows"] == checks["coverage"]["n_examples"] == 3000

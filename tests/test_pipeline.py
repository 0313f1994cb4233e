"""The daily pipeline end to end on the real MovieLens stream: run over a few days, the
report, the ``kd`` command line, and config validation."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from kdcore import cli, pipeline
from kdcore.config import load_pipeline
from kdcore.errors import KDError, SpecError
from kdcore.labels.store import labels_uri, list_label_versions, shard_uri
from kdcore.models import registry
from kdcore.quality import daily
from kdcore.records import GateDecision
from kdcore.report.build import build_report
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part
from kdcore.training.data import load_days
from tests.pipeline_fixtures import KD, TINY, kd, kd_base, local, tree_digest  # noqa: F401  (fixtures)

DS = "movielens"
MODELS = ("teacher", "student_aux", "student_direct", "control")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATASET = (Path(__file__).resolve().parents[1] / "configs" / "movielens.yaml").as_posix()


# ---------------------------------------------------------------- run + report


def test_run_days_in_order_then_report(kd: KD):
    cfg = kd.cfg
    days = [kd.day(1), kd.day(2), kd.day(3)]
    results = pipeline.run(cfg, days[0], days[-1], progress=False)
    assert [r["date"] for r in results] == [d.isoformat() for d in days]

    prev = {m: kd.boot[m]["version"] for m in MODELS}
    for day, r in zip(days, results, strict=True):
        assert r["teacher"]["parent"] == prev["teacher"]
        assert r["labels"]["teacher_version"] == prev["teacher"]  # out of sample: scored before the refresh
        assert r["labels"]["staleness_days"] == 1
        action = r["gate"]["action"]
        assert action in ("distill", "hard_labels_only"), r["gate"]  # tiny.yaml: on_fail hard_labels_only
        assert set(r["students"]) == {"student_aux", "student_direct", "control"}
        for name, s in r["students"].items():
            assert s["parent"] == prev[name], (day, name)
            meta = registry.find_checkpoint(cfg.root, DS, name, day).meta
            assert meta["gate_action"] == action
            assert meta["kd_applied"] is (name != "control" and action == "distill")
            if meta["kd_applied"]:
                assert meta["teacher_version"] == prev["teacher"]
        prev = {"teacher": r["teacher"]["version"], **{n: s["version"] for n, s in r["students"].items()}}

    uri = sfs.join(cfg.root, "reports", DS)
    # `report` is one of run's stages: built once, after the last day, over every day
    assert "report" not in results[0] and results[-1]["report"]["uri"] == uri
    built = part.read_manifest(uri)
    assert {d.isoformat() for d in days} <= {r["date"] for r in csv.DictReader(io.StringIO(
        part.read_blob(uri, "metrics.csv").decode()))}
    rep = build_report(cfg)
    assert rep["uri"] == uri
    manifest = part.read_manifest(uri)
    assert part.manifest_digest(manifest) == part.manifest_digest(built)  # same inputs, same report bytes
    published = {f.name for f in manifest.files}
    assert {"report.md", "metrics.csv", "kd_gain.csv", "gate.csv", "metrics_like.png",
            "metrics_rating.png"} <= published
    assert set(rep["files"]) == published
    assert manifest.metadata["days"] == 3

    md = part.read_blob(uri, "report.md").decode()
    assert md == rep["markdown"]
    assert f"over 3 days ({days[0]} .. {days[-1]})" in md
    # every model's served size, cost, features and loss shares, read from its newest checkpoint
    models = {r["model"]: r for r in csv.DictReader(io.StringIO(part.read_blob(uri, "models.csv").decode()))}
    assert set(models) == set(MODELS)
    for name in MODELS:
        meta = registry.find_checkpoint(cfg.root, DS, name, days[-1]).meta
        assert int(models[name]["flops_per_example"]) == meta["serving_flops_per_example"]
        assert f"| {name} | {models[name]['role']} | {meta['serving_params']:,} | " in md
        shares = meta["train"]["loss_share"]
        assert float(models[name]["loss_share:like"]) == pytest.approx(shares["like"])
        assert shares["like"] + shares["rating"] == pytest.approx(1.0)
    assert int(models["teacher"]["privileged"]) == len(cfg.spec.privileged)
    assert int(models["control"]["privileged"]) == 0
    for day in days:
        teacher_meta = registry.find_checkpoint(cfg.root, DS, "teacher", day).meta
        auc = teacher_meta["progressive"]["metrics"]["like"]["auc"]
        assert f"| {day} | teacher | like | {auc:.4f} |" in md
        for model in MODELS:
            for task in ("like", "rating"):
                assert f"| {day} | {model} | {task} |" in md, (day, model, task)

    gains = list(csv.DictReader(io.StringIO(part.read_blob(uri, "kd_gain.csv").decode())))
    want = {(s, "like", m) for s in ("student_aux", "student_direct") for m in ("auc", "gauc", "ne", "calibration")}
    want |= {(s, "rating", "rmse") for s in ("student_aux", "student_direct")}
    assert len(gains) == len(want) == 10
    assert {(g["student"], g["task"], g["metric"]) for g in gains} == want
    assert {g["control"] for g in gains} == {"control"}
    assert all(g["days"] == "3" for g in gains)
    assert {g["mode"] for g in gains if g["student"] == "student_aux"} == {"auxiliary"}

    metrics = list(csv.DictReader(io.StringIO(part.read_blob(uri, "metrics.csv").decode())))
    assert len(metrics) == len(days) * len(MODELS) * 2
    assert {r["role"] for r in metrics if r["model"] == "control"} == {"control"}

    gates = list(csv.DictReader(io.StringIO(part.read_blob(uri, "gate.csv").decode())))
    assert [(g["date"], g["action"]) for g in gates] == [(d.isoformat(), r["gate"]["action"])
                                                        for d, r in zip(days, results, strict=True)]
    assert "## Gate per day" in md and "shift.png" in published

    pngs = [n for n in published if n.endswith(".png")]
    assert pngs
    for name in pngs:
        data = part.read_blob(uri, name)
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name


def test_report_before_any_daily_run_says_so(kd: KD, tmp_path):
    out = build_report(kd.cfg, str(tmp_path / "rep"))  # bootstrap checkpoints carry no progressive metrics
    assert "No progressive metrics yet" in out["markdown"]
    assert all(g["days"] == 0 for g in out["gains"])
    assert part.read_blob(str(tmp_path / "rep"), "report.md") == out["markdown"].encode()


def test_run_without_partitions_in_range(kd: KD):
    with pytest.raises(KDError, match="no example partitions"):
        pipeline.run(kd.cfg, kd.days[-1].replace(year=2001), kd.days[-1].replace(year=2002), progress=False)


@pytest.fixture
def pass_gate(monkeypatch):
    """The data-quality gate says "distill" without running (it has its own tests)."""
    calls = []

    def gate(cfg, day, labels):
        calls.append((day, labels))
        return GateDecision(date=day.isoformat(), status="pass", action="distill", summary="")

    monkeypatch.setattr(daily, "decide", gate)  # the gate stage's computation
    return calls


def test_run_day_with_failed_teacher_refresh_uses_last_good_teacher(kd: KD, monkeypatch, pass_gate):
    """A failed refresh is recorded; labels then come from the last good teacher."""
    from kdcore.training import steps

    def boom(cfg, day, force=False):
        raise KDError("refresh exploded")

    monkeypatch.setattr(steps, "teacher_step", boom)
    out = pipeline.run_day(kd.cfg, kd.day(1))
    assert out["teacher"] == {"error": "refresh exploded"}
    assert out["labels"]["teacher_version"] == kd.boot["teacher"]["version"]
    assert out["labels"]["staleness_days"] == 1
    assert registry.list_checkpoints(kd.cfg.root, DS, "teacher") == [kd.B]
    meta = registry.find_checkpoint(kd.cfg.root, DS, "student_aux", kd.day(1)).meta
    assert meta["label_staleness_days"] == 1


# ---------------------------------------------------------------- command line


def test_cli_labels_materialize_one_shard(kd: KD, capsys):
    B = kd.day(1)  # labelled out of sample by the bootstrap teacher
    teacher = kd.boot["teacher"]["version"]
    rc = cli.main(["labels", "materialize", "--config", str(TINY), "--date", B.isoformat(), "--shard", "0/2"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = load_days(kd.cfg.root, kd.cfg.spec, [B]).table.num_rows
    assert out["uri"] == shard_uri(kd.cfg.root, DS, B, teacher, 0, 2)
    assert out["rows"] == rows // 2 and out["teacher_version"] == teacher
    assert part.is_published(out["uri"])
    assert not part.is_published(shard_uri(kd.cfg.root, DS, B, teacher, 1, 2))
    assert list_label_versions(kd.cfg.root, DS, B) == []  # nothing visible before the commit

    # The other shard, then the commit, through the command line too.
    assert cli.main(["labels", "materialize", "--config", str(TINY), "--date", B.isoformat(), "--shard", "1/2"]) == 0
    capsys.readouterr()
    assert cli.main(["labels", "commit", "--config", str(TINY), "--date", B.isoformat(),
                     "--teacher-version", teacher, "--shards", "2"]) == 0
    committed = json.loads(capsys.readouterr().out)
    assert committed["rows"] == rows and committed["uri"] == labels_uri(kd.cfg.root, DS, B, teacher)
    assert list_label_versions(kd.cfg.root, DS, B) == [teacher]


@pytest.mark.parametrize("shard", ["3/2", "2/2", "-1/2", "x/2", "1"])
def test_cli_bad_shard_is_an_argparse_error(kd: KD, capsys, shard):
    with pytest.raises(SystemExit) as exc:
        cli.main(["labels", "materialize", "--config", str(TINY), "--date", kd.B.isoformat(), "--shard", shard])
    assert exc.value.code == 2
    assert "--shard" in capsys.readouterr().err
    assert not (local(kd.cfg.root) / "labels").exists()


def test_cli_unknown_student(kd: KD, capsys):
    rc = cli.main(["student", "train", "--config", str(TINY), "--name", "nope", "--date", kd.day(1).isoformat()])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("kd: error:")
    assert "'nope'" in err and "student_aux" in err  # names the student and what is configured


def test_cli_student_train_needs_materialized_labels(kd: KD, capsys):
    rc = cli.main(["student", "train", "--config", str(TINY), "--name", "student_aux", "--date", kd.day(1).isoformat()])
    assert rc == 2
    assert "kd labels materialize" in capsys.readouterr().err
    assert registry.list_checkpoints(kd.cfg.root, DS, "student_aux") == [kd.B]


def test_cli_run_two_days(kd: KD, capsys, pass_gate):
    d1, d2 = kd.day(1), kd.day(2)
    rc = cli.main(["run", "--config", str(TINY), "--from", d1.isoformat(), "--to", d2.isoformat(), "--quiet"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == {"days": 2, "from": d1.isoformat(), "to": d2.isoformat(),
                                "report": sfs.join(kd.cfg.root, "reports", DS)}
    assert part.is_published(sfs.join(kd.cfg.root, "reports", DS))
    for name in MODELS:
        assert registry.list_checkpoints(kd.cfg.root, DS, name) == [kd.B, d1, d2], name
        chain = registry.lineage(kd.cfg.root, DS, name, d2)
        assert [c.trained_through for c in chain] == [d2, d1, kd.B]
    assert len(list_label_versions(kd.cfg.root, DS, d2)) == 1
    assert [day for day, _ in pass_gate] == [d1, d2]


@pytest.mark.parametrize("action", ["hard_labels_only", "skip_students"])
def test_run_day_follows_the_gate_action(kd: KD, monkeypatch, action):
    seen = []

    def fake_gate(cfg, day, labels):
        seen.append(labels)
        return GateDecision(date=day.isoformat(), status="fail", action=action, summary="")

    monkeypatch.setattr(daily, "decide", fake_gate)
    D = kd.day(1)
    out = pipeline.run_day(kd.cfg, D)
    assert seen == [out["labels"]["uri"]]
    for name in ("student_aux", "student_direct", "control"):
        if action == "skip_students":
            assert out["students"][name]["skipped"] is True
            assert registry.list_checkpoints(kd.cfg.root, DS, name) == [kd.B]
        else:
            meta = registry.find_checkpoint(kd.cfg.root, DS, name, D).meta
            assert meta["kd_applied"] is False and meta["gate_action"] == action
    assert registry.list_checkpoints(kd.cfg.root, DS, "teacher") == [kd.B, D]  # the teacher still refreshes

    # Re-running the day is a no-op for the teacher, the labels and every student.
    before = {d: tree_digest(kd.root / d) for d in ("models", "labels")}
    again = pipeline.run_day(kd.cfg, D)
    assert again["teacher"]["reused"] is True
    assert again["labels"]["changed"] is False
    if action == "skip_students":
        assert again["students"] == out["students"]
    else:
        assert all(s["reused"] is True for s in again["students"].values())
    assert {d: tree_digest(kd.root / d) for d in ("models", "labels")} == before


# ---------------------------------------------------------------- config validation


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"dataset: {DATASET}\nstorage_root: store\n{body}")
    return path


def test_tiny_config_loads(kd: KD):
    cfg = kd.cfg
    assert [s.name for s in cfg.students] == ["student_aux", "student_direct"]
    assert list(cfg.controls()) == ["control"]  # both students share one shape
    assert cfg.control_of("student_direct") == "control"
    assert cfg.root == sfs.normalize(str(kd.root))  # KD_STORAGE_ROOT wins over storage_root
    assert cfg.spec.name == DS


def test_storage_root_relative_to_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv("KD_STORAGE_ROOT", raising=False)
    cfg = load_pipeline(_write(tmp_path, "students:\n  - {name: s1}\n"))
    assert cfg.root == sfs.normalize(str(tmp_path / "store"))


@pytest.mark.parametrize("body, field, words", [
    ("students:\n  - {name: a}\n  - {name: b, distill: {mode: direct, bogus: 1}}\n",
     "students.1.distill.bogus", "Extra inputs are not permitted"),
    ("students:\n  - {name: a, distill: {mode: sideways}}\n", "students.0.distill.mode", "'auxiliary'"),
    ("students:\n  - {name: a, distill: {mode: auxiliary, auxiliary: {loss_weight: -1}}}\n",
     "students.0.distill.auxiliary.loss_weight", "greater than 0"),
    ("students:\n  - {name: a, distill: {mode: auxiliary, auxiliary: {grad_scale: 0.5}}}\n",
     "students.0.distill.auxiliary", "same knob as loss_weight"),
    ("students:\n  - {name: a}\npolicies: {label_lag_days: 0}\n", "policies", "set labels: in_sample"),
    ("students: []\n", "students", "at least 1"),
    ("students:\n  - {name: Bad-Name}\n", "students.0.name", "pattern"),
])
def test_config_field_errors_name_file_and_field(tmp_path, body, field, words):
    path = _write(tmp_path, body)
    with pytest.raises(SpecError) as exc:
        load_pipeline(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert f"field '{field}'" in msg
    assert words in msg


@pytest.mark.parametrize("body, words", [
    ("students:\n  - {name: a}\n  - {name: b}\n  - {name: a}\n", "unique; repeated: ['a']"),
    ("students:\n  - {name: a}\n  - {name: control}\n", "['control']"),
    ("students:\n  - {name: control_2}\n", "start with 'control'"),
    ("teacher: {name: big}\nstudents:\n  - {name: big}\n", "['big']"),
])
def test_config_student_name_errors(tmp_path, body, words):
    path = _write(tmp_path, body)
    with pytest.raises(SpecError) as exc:
        load_pipeline(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert words in msg


@pytest.mark.parametrize("body", [
    "students:\n  - {name: a}\n  - {name: a}\n",
    "students:\n  - {name: control}\n",
])
def test_config_student_name_errors_name_the_students_field(tmp_path, body):
    with pytest.raises(SpecError, match=r"field 'students'"):
        load_pipeline(_write(tmp_path, body))


def test_config_bad_dataset_path_names_the_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("dataset: nowhere.yaml\nstorage_root: s\nstudents:\n  - {name: a}\n")
    with pytest.raises(SpecError) as exc:
        load_pipeline(path)
    assert str(path) in str(exc.value) and "field 'dataset'" in str(exc.value)

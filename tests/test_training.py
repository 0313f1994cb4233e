"""Continuous training on the real MovieLens stream: teacher lineage, progressive
validation, idempotent day steps, determinism; students in every distillation mode."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from kdcore.errors import LineageError, StorageError
from kdcore.labels import materialize as mat
from kdcore.models import registry
from kdcore.models.checkpoint import model_to_bytes
from kdcore.models.inference import predict
from kdcore.models.ranker import MultiTaskRanker
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part
from kdcore.training import steps
from kdcore.training.data import load_days
from kdcore.training.loop import NO_KD, evaluate, fit, model_features
from tests.pipeline_fixtures import KD, kd, kd_base, local, tree_digest  # noqa: F401  (fixtures)

DS = "movielens"


def _ckpt(k: KD, name: str, day) -> registry.Checkpoint:
    return registry.find_checkpoint(k.cfg.root, DS, name, day)


def _weights(ckpt: registry.Checkpoint) -> bytes:
    return part.read_blob(ckpt.uri, registry.WEIGHTS)


# ---------------------------------------------------------------- teacher lineage


def test_teacher_step_warm_starts_from_previous_day_and_records_progressive_metrics(kd: KD):
    cfg, B, D = kd.cfg, kd.B, kd.day(1)
    parent = _ckpt(kd, "teacher", B)
    assert parent.version == kd.boot["teacher"]["version"]

    out = steps.teacher_step(cfg, D)
    ckpt = _ckpt(kd, "teacher", D)
    assert out["version"] == ckpt.version != parent.version
    assert ckpt.meta["parent"] == parent.version == out["parent"]
    assert ckpt.meta["trained_through"] == D.isoformat()
    data = load_days(cfg.root, cfg.spec, [D])
    assert ckpt.meta["rows_day"] == len(data)
    assert ckpt.meta["rows_seen"] == parent.meta["rows_seen"] + len(data)

    # Progressive metrics: the parent (through D-1) scored on D before training on D.
    prog = ckpt.meta["progressive"]
    assert prog["date"] == D.isoformat()
    want = evaluate(parent.load(cfg.spec), data)
    assert set(prog["metrics"]) == {"like", "rating"}
    for task, metrics in want.items():
        assert prog["metrics"][task] == pytest.approx(metrics, nan_ok=True), task
    # ... and not by the new checkpoint, which has seen D.
    after = evaluate(ckpt.load(cfg.spec), data)
    assert after["like"]["logloss"] != pytest.approx(prog["metrics"]["like"]["logloss"])

    # Warm start: the published weights are exactly the parent (weights and optimizer
    # state) trained one day on D.
    model = parent.load(cfg.spec)
    fit(model, data.features(cfg.teacher.model.hash_buckets), data.hard, None, NO_KD,
        seed=steps._seed(cfg.teacher.model, D), optimizer=parent.load_optimizer(model), start_step=parent.steps)
    assert model_to_bytes(model) == _weights(ckpt)
    assert registry.lineage(cfg.root, DS, "teacher", D)[1].version == parent.version


def test_teacher_refresh_before_its_bootstrap_is_refused(kd: KD):
    """A day before the teacher's first checkpoint has no parent; cold-starting there would
    grow a second, orphan lineage beside the bootstrapped one (issue 19), so it is refused
    and nothing is written. (Cold starts of a model with no checkpoint at all: the
    bootstrap tests and test_training_fast's streamed day.)"""
    cfg = kd.cfg
    early = kd.days[2]  # before the bootstrap checkpoint: no teacher exists before it
    before = tree_digest(kd.root)
    with pytest.raises(LineageError, match=rf"'teacher' has no checkpoint before {early}: its first is trained "
                                           rf"through {kd.B} .*bootstrap again"):
        steps.teacher_step(cfg, early)
    assert tree_digest(kd.root) == before


def test_check_parent_refuses_parent_not_older_than_day(kd: KD):
    B = kd.B
    parent = _ckpt(kd, "teacher", B)
    registry.check_parent(None, B)
    registry.check_parent(parent, kd.day(1))
    for day in (B, kd.days[5]):
        with pytest.raises(LineageError, match=parent.version):
            registry.check_parent(parent, day)


def test_teacher_step_refuses_misplaced_parent_trained_too_late(kd: KD):
    """A checkpoint stored under date=B whose meta says it is trained through B+1 must
    not become the parent of B+1 (its lineage would include the day being trained)."""
    cfg, B, D = kd.cfg, kd.B, kd.day(1)
    steps.teacher_step(cfg, D)
    ckpt_b = local(_ckpt(kd, "teacher", B).uri)
    shutil.rmtree(ckpt_b)
    shutil.copytree(local(_ckpt(kd, "teacher", D).uri), ckpt_b)
    # refused where it is read: its meta says another date than its folder (issue 19 item 5;
    # it used to be read, then refused by check_parent as "refusing parent")
    with pytest.raises(LineageError, match=rf"teacher/date={B} holds a checkpoint of 'teacher' \(dataset movielens, "
                                           rf"trained through {D}, .*refusing it as teacher's"):
        steps.teacher_step(cfg, D, force=True)


def test_a_checkpoint_of_another_model_is_refused_as_parent(kd: KD):
    """The control's checkpoint copied into student_direct's folder is not student_direct's
    parent: its meta names another model than the folder it sits in."""
    cfg, B, D = kd.cfg, kd.B, kd.day(1)
    labels = _labels(kd, D)
    folder = local(registry.checkpoint_uri(cfg.root, DS, "student_direct", B))
    shutil.rmtree(folder)
    shutil.copytree(local(_ckpt(kd, "control", B).uri), folder)
    before = tree_digest(kd.root)
    pattern = (rf"models/movielens/student_direct/date={B} holds a checkpoint of 'control' \(dataset movielens, "
               rf"trained through {B}, version control-\d{{8}}-\w+\); refusing it as student_direct's")
    with pytest.raises(LineageError, match=pattern):
        steps.student_step(cfg, "student_direct", D, labels)
    with pytest.raises(LineageError, match=pattern):
        registry.find_checkpoint(cfg.root, DS, "student_direct", B)
    with pytest.raises(LineageError, match=pattern):  # read by URI: the same check, from the folder's name
        registry.read_checkpoint(registry.checkpoint_uri(cfg.root, DS, "student_direct", B))
    assert tree_digest(kd.root) == before


@pytest.mark.parametrize("field, value", [("dataset", "synth"), ("version", "student_direct-19700101-abc")])
def test_a_checkpoint_whose_meta_disagrees_with_its_folder_is_refused(kd: KD, field, value):
    B = kd.B
    ckpt = _ckpt(kd, "student_direct", B)
    blobs = {f.name: part.read_blob(ckpt.uri, f.name) for f in part.read_manifest(ckpt.uri).files}
    blobs[registry.META] = json.dumps({**ckpt.meta, field: value}).encode()
    part.publish_blobs(ckpt.uri, blobs, part.read_manifest(ckpt.uri).metadata)
    with pytest.raises(LineageError, match=rf"student_direct/date={B} holds a checkpoint of 'student_direct' .*"
                                           rf"refusing it as student_direct's \(dataset movielens"):
        _ckpt(kd, "student_direct", B)


def test_every_bootstrapped_checkpoint_sits_in_its_own_folder(kd: KD):
    for name in ["teacher", *(s.name for s in kd.cfg.all_students())]:
        assert _ckpt(kd, name, kd.B).meta["name"] == name  # the folder check passes for every model


def test_teacher_gap_day_finds_last_checkpoint_as_parent(kd: KD):
    cfg, B = kd.cfg, kd.B
    gap = kd.day(2)  # day(1) is never trained
    out = steps.teacher_step(cfg, gap)
    assert out["parent"] == kd.boot["teacher"]["version"]
    chain = registry.lineage(cfg.root, DS, "teacher", gap)
    assert [c.trained_through for c in chain] == [gap, B]
    # A later day then chains onto the gap day, not onto the bootstrap.
    nxt = steps.teacher_step(cfg, kd.day(3))
    assert nxt["parent"] == out["version"]


def test_teacher_step_rerun_is_noop_and_force_is_deterministic(kd: KD):
    cfg, D = kd.cfg, kd.day(1)
    first = steps.teacher_step(cfg, D)
    ckpt_dir = local(first["uri"])
    before = tree_digest(ckpt_dir)
    manifest = (ckpt_dir / "_MANIFEST.json").read_bytes()

    again = steps.teacher_step(cfg, D)
    assert again["reused"] is True
    assert again["version"] == first["version"]
    assert (ckpt_dir / "_MANIFEST.json").read_bytes() == manifest
    assert tree_digest(ckpt_dir) == before

    weights = _weights(_ckpt(kd, "teacher", D))
    forced = steps.teacher_step(cfg, D, force=True)
    assert "reused" not in forced
    assert forced["version"] == first["version"]
    assert forced["progressive"] == first["progressive"]
    assert _weights(_ckpt(kd, "teacher", D)) == weights


def test_teacher_step_retrains_when_parent_changes(kd: KD):
    """The no-op is keyed on the parent: a new parent (a gap day filled in) retrains."""
    cfg = kd.cfg
    gap_first = steps.teacher_step(cfg, kd.day(2))
    assert gap_first["parent"] == kd.boot["teacher"]["version"]
    filled = steps.teacher_step(cfg, kd.day(1))
    redo = steps.teacher_step(cfg, kd.day(2))
    assert redo["parent"] == filled["version"]
    assert redo["version"] != gap_first["version"]
    assert "reused" not in redo


# ---------------------------------------------------------------- students


def _labels(kd: KD, day, **kw) -> str:
    return mat.materialize(kd.cfg, day, **kw)["uri"]


def test_students_in_every_mode_record_kd_metadata(kd: KD):
    cfg, D = kd.cfg, kd.day(1)
    # No teacher refresh: D is labelled by the teacher through B, one day stale.
    labels = _labels(kd, D)
    teacher_b = kd.boot["teacher"]["version"]

    results = {n: steps.student_step(cfg, n, D, labels) for n in ("control", "student_direct", "student_aux")}
    metas = {n: _ckpt(kd, n, D).meta for n in results}
    for name, meta in metas.items():
        assert results[name]["version"] == meta["version"]
        assert meta["parent"] == kd.boot[name]["version"]
        assert meta["trained_through"] == D.isoformat()
        assert meta["progressive"]["date"] == D.isoformat()

    ctrl = metas["control"]
    assert ctrl["role"] == "control" and ctrl["distill_mode"] == "none"
    assert ctrl["kd_applied"] is False
    assert "teacher_version" not in ctrl and "label_staleness_days" not in ctrl

    for name, mode in (("student_direct", "direct"), ("student_aux", "auxiliary")):
        m = metas[name]
        assert m["role"] == "student" and m["distill_mode"] == mode
        assert m["kd_applied"] is True and m["gate_action"] == "distill"
        assert m["teacher_version"] == teacher_b
        assert m["label_staleness_days"] == 1
        assert sfs.join(sfs.normalize(cfg.root), m["labels_path"]) == sfs.normalize(labels)
        assert m["labels_path"].endswith(f"/teacher={m['teacher_version']}")  # one teacher in the whole story
        assert m["labels_missing"] == 0 and m["label_teacher_stale"] is False
    assert metas["student_aux"]["aux_heads"] is True
    assert metas["student_direct"]["aux_heads"] is False

    # Bootstrap already distils (from the bootstrap teacher), so the direct student and the
    # control differ from their first checkpoint on.
    assert _ckpt(kd, "student_direct", kd.B).meta["kd_applied"] is True
    assert _ckpt(kd, "control", kd.B).meta["kd_applied"] is False
    assert _weights(_ckpt(kd, "student_direct", D)) != _weights(_ckpt(kd, "control", D))


def test_auxiliary_student_serving_export_has_no_aux_heads(kd: KD):
    cfg, D = kd.cfg, kd.day(1)
    steps.teacher_step(cfg, D)
    labels = _labels(kd, D)
    steps.student_step(cfg, "student_aux", D, labels)
    ckpt = _ckpt(kd, "student_aux", D)
    assert ckpt.meta["label_staleness_days"] == 1  # out of sample: the teacher through D-1
    full_state = st_load(_weights(ckpt))
    serving_state = st_load(part.read_blob(ckpt.uri, registry.SERVING))
    aux_keys = {k for k in full_state if k.startswith("aux_heads.")}
    assert aux_keys  # the full model does have auxiliary heads
    assert not [k for k in serving_state if k.startswith("aux")]
    assert set(serving_state) == set(full_state) - aux_keys
    for k, v in serving_state.items():
        assert torch.equal(v, full_state[k]), k

    full = ckpt.load(cfg.spec)
    served = MultiTaskRanker(full.config, full.n_cat, full.n_num, full.tasks, aux_heads=False)
    served.load_state_dict(serving_state, strict=True)
    feats = model_features(full, load_days(cfg.root, cfg.spec, [D]))
    want, got = predict(full, feats), predict(served, feats)
    for task in want:
        np.testing.assert_array_equal(got[task], want[task])
    # The aux heads were trained on the teacher labels: they disagree with the serving heads.
    with torch.no_grad():
        out = full(torch.from_numpy(feats.cat), torch.from_numpy(feats.num))
    assert not torch.allclose(out.aux["like"], out.serving["like"])


def test_control_and_direct_students_have_no_serving_export(kd: KD):
    cfg, D = kd.cfg, kd.day(1)
    labels = _labels(kd, D)
    for name in ("control", "student_direct"):
        steps.student_step(cfg, name, D, labels)
        with pytest.raises(StorageError, match="serving.safetensors"):
            part.read_blob(_ckpt(kd, name, D).uri, registry.SERVING)


def test_hard_labels_only_trains_without_kd(kd: KD):
    cfg, D = kd.cfg, kd.day(1)
    labels = _labels(kd, D)
    out = steps.student_step(cfg, "student_direct", D, labels, action="hard_labels_only")
    steps.student_step(cfg, "control", D, labels, action="hard_labels_only")
    meta = _ckpt(kd, "student_direct", D).meta
    assert out["version"] == meta["version"]
    assert meta["kd_applied"] is False and meta["gate_action"] == "hard_labels_only"
    assert "teacher_version" not in meta
    # Without KD the direct student is exactly its parent trained on the hard labels alone.
    parent = _ckpt(kd, "student_direct", kd.B)
    model = parent.load(cfg.spec)
    data = load_days(cfg.root, cfg.spec, [D])
    fit(model, model_features(model, data), data.hard, None, NO_KD, seed=steps._seed(model.config, D),
        optimizer=parent.load_optimizer(model), start_step=parent.steps)
    assert _weights(_ckpt(kd, "student_direct", D)) == model_to_bytes(model)

    # Switching the action later retrains the day with KD (the fingerprint differs).
    again = steps.student_step(cfg, "student_direct", D, labels, action="distill")
    assert again["version"] != out["version"] and "reused" not in again
    assert _ckpt(kd, "student_direct", D).meta["kd_applied"] is True


def test_skip_students_publishes_nothing(kd: KD):
    cfg, D = kd.cfg, kd.day(1)
    labels = _labels(kd, D)
    for s in cfg.all_students():
        out = steps.student_step(cfg, s.name, D, labels, action="skip_students")
        assert out["skipped"] is True and out["trained_through"] is None
        assert registry.list_checkpoints(cfg.root, DS, s.name) == [kd.B]


def test_distilling_student_requires_labels(kd: KD):
    with pytest.raises(StorageError, match="student_aux"):
        steps.student_step(kd.cfg, "student_aux", kd.day(1), None)
    assert registry.list_checkpoints(kd.cfg.root, DS, "student_aux") == [kd.B]


def test_student_rerun_is_noop(kd: KD):
    cfg, D = kd.cfg, kd.day(1)
    labels = _labels(kd, D)
    first = steps.student_step(cfg, "student_aux", D, labels)
    ckpt_dir = local(first["uri"])
    before = tree_digest(ckpt_dir)
    again = steps.student_step(cfg, "student_aux", D, labels)
    assert again["reused"] is True and again["version"] == first["version"]
    assert tree_digest(ckpt_dir) == before


def test_copied_root_still_recognises_its_student_checkpoints(kd: KD, tmp_path, monkeypatch):
    cfg, D = kd.cfg, kd.day(1)
    first = steps.student_step(cfg, "student_aux", D, _labels(kd, D))
    moved = tmp_path / "moved"
    shutil.copytree(kd.root, moved)
    monkeypatch.setenv("KD_STORAGE_ROOT", str(moved))
    from kdcore.pipeline import find_labels

    again = steps.student_step(cfg, "student_aux", D, find_labels(cfg, D))
    assert again["reused"] is True and again["version"] == first["version"]


# ---------------------------------------------------------------- nothing trained, nothing lost


@pytest.mark.parametrize("name", ["teacher", "student_aux"])
def test_a_step_with_no_training_rows_publishes_nothing(kd: KD, name):
    """Zero rows (e.g. every row filtered away) is an error naming the model and the day,
    not a checkpoint of the parent re-dated with NaN metrics."""
    from kdcore.errors import DataError
    from kdcore.training.data import DayData

    cfg, D = kd.cfg, kd.day(1)
    day = load_days(cfg.root, cfg.spec, [D])
    empty = DayData(cfg.spec, day.table.slice(0, 0), day.days)
    model_cfg = cfg.teacher.model if name == "teacher" else cfg.student(name).model
    parent = _ckpt(kd, name, kd.B)
    before = tree_digest(kd.root)
    with pytest.raises(DataError, match=rf"^0 training rows for {name} on {D}: nothing trained or published$"):
        steps.train_and_publish(cfg, name, "student", model_cfg, parent.meta["aux_tasks"], D, empty, parent, NO_KD,
                                None, {}, {}, steps.base_generation(cfg, name, D))
    assert tree_digest(kd.root) == before


def test_a_checkpoint_committed_while_a_step_trains_is_not_replaced(kd: KD, monkeypatch):
    """A step builds on the checkpoint folder as it was when the step started: a rival
    that commits another checkpoint of the same model and day while it trains wins, and
    the step gets a ConflictError instead of replacing it."""
    from kdcore.errors import ConflictError

    cfg, D = kd.cfg, kd.day(1)
    labels = _labels(kd, D)
    real_fit, rival = steps.fit_day, {}

    def rival_commits_during_training(*args, **kwargs):
        out = real_fit(*args, **kwargs)
        monkeypatch.setattr(steps, "fit_day", real_fit)
        rival.update(steps.student_step(cfg, "student_direct", D, labels, action="hard_labels_only"))
        return out

    monkeypatch.setattr(steps, "fit_day", rival_commits_during_training)
    with pytest.raises(ConflictError, match=r"student_direct/date=\S+: another writer published different content "
                                            r"while this one ran"):
        steps.student_step(cfg, "student_direct", D, labels)
    kept = _ckpt(kd, "student_direct", D)
    assert kept.version == rival["version"] and kept.meta["gate_action"] == "hard_labels_only"
    assert _weights(kept)  # the winner's files are all there and verified
    # Started after the rival's commit, the same step builds on it and replaces it.
    again = steps.student_step(cfg, "student_direct", D, labels)
    assert again["version"] != rival["version"] and _ckpt(kd, "student_direct", D).meta["kd_applied"] is True


def test_a_checkpoint_publish_from_a_stale_generation_conflicts_unless_identical(kd: KD):
    from kdcore.errors import ConflictError

    cfg, D = kd.cfg, kd.day(1)
    uri = registry.checkpoint_uri(cfg.root, DS, "teacher", D)
    assert part.manifest_generation(uri) is None  # what a step starting now reads
    first = steps.teacher_step(cfg, D)
    manifest = part.read_manifest(uri)
    blobs = {f.name: part.read_blob(uri, f.name) for f in manifest.files}
    model = _ckpt(kd, "teacher", kd.B).load(cfg.spec)
    with pytest.raises(ConflictError):
        registry.publish_checkpoint(cfg.root, DS, "teacher", D, model, {"dataset": DS}, expected=None)
    # the committed checkpoint is intact (the loser's uploads are orphans for `kd vacuum`)
    assert part.read_manifest(uri) == manifest and _ckpt(kd, "teacher", D).version == first["version"]
    assert {f.name: part.read_blob(uri, f.name) for f in manifest.files} == blobs
    # the same content again is a no-op, whatever generation the writer started from
    committed = tree_digest(local(uri))
    part.publish_blobs(uri, blobs, manifest.metadata, expected=None)
    assert tree_digest(local(uri)) == committed

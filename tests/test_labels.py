"""Teacher labels: deterministic sharded materialization with one commit, one directory
per teacher version, the staleness policy, and the join by example id."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from kdcore.config import Policies
from kdcore.data.movielens import SPEC_PATH
from kdcore.data.spec import load_spec
from kdcore.errors import DataError, LineageError, StorageError
from kdcore.labels import materialize as mat
from kdcore.labels.join import join_labels, read_labels
from kdcore.labels.store import labels_uri, list_label_versions, shard_uri
from kdcore.models import registry
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part
from kdcore.training import steps
from kdcore.training.data import load_days
from tests.pipeline_fixtures import (  # noqa: F401  (fixtures)
    KD,
    copy_root,
    kd,
    kd_base,
    local,
    tree_digest,
    yesterdays_labels_as_today,
)

DS = "movielens"


def _parquet_files(uri: str) -> dict[str, bytes]:
    base = local(uri)
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*.parquet"))}


def _with_policies(kd: KD, **kw):
    """A copy of the config with other policies (same base path and storage root)."""
    cfg = kd.cfg.model_copy(update={"policies": Policies(**{**kd.cfg.policies.model_dump(), **kw})})
    cfg._base = kd.cfg._base
    return cfg


def _in_sample(kd: KD):
    """The named in-sample variant: D labelled by the teacher through D (the bootstrap day
    B can only be labelled this way, no older teacher exists)."""
    return _with_policies(kd, labels="in_sample", label_lag_days=0)


# ---------------------------------------------------------------- materialization


def test_materialize_is_deterministic_and_idempotent(kd: KD, kd_base, tmp_path, monkeypatch):
    cfg, B = _in_sample(kd), kd.B
    out = mat.materialize(cfg, B)
    uri = out["uri"]
    teacher = kd.boot["teacher"]["version"]
    assert uri == labels_uri(cfg.root, DS, B, teacher)
    assert out["changed"] is True and out["teacher_version"] == teacher
    files = _parquet_files(uri)
    assert len(files) == cfg.labels.shards
    before = tree_digest(local(uri))
    manifest = (local(uri) / "_MANIFEST.json").read_bytes()

    # A second materialization of the same date changes nothing: committed labels are
    # reused without inference, and a forced recomputation yields the same bytes.
    again = mat.materialize(cfg, B)
    assert again["changed"] is False and again["uri"] == uri and again["reused"] is True
    forced = mat.materialize(cfg, B, force=True)
    assert forced["changed"] is False and "reused" not in forced
    assert (local(uri) / "_MANIFEST.json").read_bytes() == manifest
    assert tree_digest(local(uri)) == before

    # A fresh copy of the root (same teacher) gives byte-identical label files.
    other = copy_root(kd_base, tmp_path / "other")
    monkeypatch.setenv("KD_STORAGE_ROOT", str(other))
    out2 = mat.materialize(cfg, B)
    assert out2["uri"] != uri and out2["teacher_version"] == teacher
    assert _parquet_files(out2["uri"]) == files
    assert part.read_manifest(out2["uri"]).files == part.read_manifest(uri).files


def test_label_manifest_metadata(kd: KD):
    cfg, B, D = kd.cfg, kd.B, kd.day(2)
    out = mat.materialize(cfg, D)  # newest teacher is through B: two days stale
    m = part.read_manifest(out["uri"])
    teacher = registry.find_version(cfg.root, DS, "teacher", kd.boot["teacher"]["version"])
    rows = load_days(cfg.root, cfg.spec, [D]).table.num_rows
    assert m.metadata["kind"] == "teacher_labels"
    assert m.metadata["date"] == D.isoformat()
    assert m.metadata["teacher_version"] == teacher.version
    # relative to the storage root: the root can be moved and the labels stay the same bytes
    assert sfs.join(sfs.normalize(cfg.root), m.metadata["teacher_path"]) == teacher.uri
    assert "://" not in m.to_bytes().decode()  # nothing absolute: a moved root keeps its labels
    assert m.metadata["teacher_stale"] is True and m.metadata["expected_staleness_days"] == 1
    assert m.metadata["teacher_trained_through"] == B.isoformat()
    assert m.metadata["staleness_days"] == (D - B).days == out["staleness_days"]
    assert m.metadata["shards"] == cfg.labels.shards
    assert m.rows == out["rows"] == rows
    assert m.schema.names == ["example_id", "like", "rating"]


def test_labels_are_the_teacher_predictions(kd: KD):
    from kdcore.models.inference import predict

    cfg, B = kd.cfg, kd.B
    uri = mat.materialize(cfg, kd.day(1))["uri"]
    table, _ = read_labels(uri, cfg.spec)
    data = load_days(cfg.root, cfg.spec, [kd.day(1)])
    assert table.column("example_id").to_pylist() == data.example_ids.to_pylist()
    teacher = registry.find_checkpoint(cfg.root, DS, "teacher", B).load(cfg.spec)
    want = predict(teacher, data.features(teacher.config.hash_buckets))
    np.testing.assert_allclose(table.column("like").to_numpy(), want["like"], rtol=1e-6, atol=1e-6)
    # The rating head is unbounded: its labels are clipped to the task's declared range.
    rating = cfg.spec.task("rating")
    np.testing.assert_allclose(table.column("rating").to_numpy(), np.clip(want["rating"], rating.min, rating.max),
                               rtol=1e-6, atol=1e-6)
    assert ((table.column("like").to_numpy() > 0) & (table.column("like").to_numpy() < 1)).all()


def test_sharded_commit_equals_unsharded(kd: KD):
    cfg, B = _in_sample(kd), kd.B
    teacher = kd.boot["teacher"]["version"]
    rows = load_days(cfg.root, cfg.spec, [B]).table.num_rows
    s0 = mat.materialize_shard(cfg, B, 0, 2)
    s1 = mat.materialize_shard(cfg, B, 1, 2)
    assert s0["rows"] + s1["rows"] == rows and s0["rows"] == rows // 2
    assert not part.is_published(labels_uri(cfg.root, DS, B, teacher))  # invisible until commit
    c = mat.commit(cfg, B, teacher, 2)
    sharded, _ = read_labels(c["uri"], cfg.spec)

    u = mat.materialize(cfg, B, shards=1)
    assert u["uri"] == c["uri"] and u["rows"] == rows
    unsharded, _ = read_labels(u["uri"], cfg.spec)
    assert sharded.num_rows == unsharded.num_rows == rows
    assert sharded.column("example_id").equals(unsharded.column("example_id"))
    ids = load_days(cfg.root, cfg.spec, [B]).example_ids
    assert sharded.column("example_id").combine_chunks().equals(ids)  # the day's order
    for t in ("like", "rating"):
        np.testing.assert_allclose(sharded.column(t).to_numpy(), unsharded.column(t).to_numpy(),
                                   rtol=1e-6, atol=0)


def test_sharded_labels_are_bitwise_identical_to_unsharded(kd: KD):
    cfg = _in_sample(kd)
    for day in (kd.B, kd.day(1), kd.day(2)):
        whole, _ = read_labels(mat.materialize(cfg, day, shards=1)["uri"], cfg.spec)
        for shards in (2, 3):
            split, _ = read_labels(mat.materialize(cfg, day, shards=shards)["uri"], cfg.spec)
            assert split.equals(whole), (day, shards)


def test_commit_refuses_missing_shard_and_row_mismatch(kd: KD):
    cfg, B = _in_sample(kd), kd.B
    teacher = kd.boot["teacher"]["version"]
    mat.materialize_shard(cfg, B, 0, 3)
    mat.materialize_shard(cfg, B, 2, 3)
    with pytest.raises(StorageError, match=r"shard 1/3 is not published"):
        mat.commit(cfg, B, teacher, 3)
    assert not part.is_published(labels_uri(cfg.root, DS, B, teacher))

    # Shard 1 published with too few rows (a truncated writer): the commit counts rows.
    shard0, _ = read_labels(shard_uri(cfg.root, DS, B, teacher, 0, 3), cfg.spec)
    shard0_meta = part.read_manifest(shard_uri(cfg.root, DS, B, teacher, 0, 3)).metadata
    part.publish_table(shard_uri(cfg.root, DS, B, teacher, 1, 3), shard0.slice(0, 5), shard0_meta)
    with pytest.raises(StorageError, match=r"rows across 3 shards; the day has \d+ examples"):
        mat.commit(cfg, B, teacher, 3)
    assert not part.is_published(labels_uri(cfg.root, DS, B, teacher))


def test_other_teacher_version_gets_its_own_directory(kd: KD):
    cfg, D = _in_sample(kd), kd.day(1)
    old = kd.boot["teacher"]["version"]
    first = mat.materialize(cfg, D)  # teacher through B (no refresh yet)
    assert first["teacher_version"] == old and first["staleness_days"] == 1
    first_files = tree_digest(local(first["uri"]))

    new = steps.teacher_step(cfg, D)["version"]
    second = mat.materialize(cfg, D)  # now the fresh teacher through D
    assert second["teacher_version"] == new != old
    assert second["staleness_days"] == 0
    assert second["uri"] != first["uri"]
    assert tree_digest(local(first["uri"])) == first_files
    assert list_label_versions(cfg.root, DS, D) == sorted([old, new])
    a, _ = read_labels(first["uri"], cfg.spec)
    b, _ = read_labels(second["uri"], cfg.spec)
    assert a.column("example_id").equals(b.column("example_id"))
    assert not np.array_equal(a.column("like").to_numpy(), b.column("like").to_numpy())


def test_staleness_policy_and_pinned_teacher(kd: KD):
    cfg, B = _in_sample(kd), kd.B
    max_stale = cfg.policies.max_label_staleness_days
    old = kd.boot["teacher"]["version"]
    ok_day = B + dt.timedelta(days=max_stale)
    stale_day = B + dt.timedelta(days=max_stale + 1)
    assert mat.choose_teacher(cfg, ok_day).version == old
    with pytest.raises(LineageError, match=rf"{old} is {max_stale + 1} days stale"):
        mat.choose_teacher(cfg, stale_day)
    stale_dates = [d for d in kd.days if (d - B).days > max_stale]
    with pytest.raises(LineageError, match="max_label_staleness_days"):
        mat.materialize(cfg, stale_dates[0])

    # A pinned version bypasses both the newest-teacher choice and the staleness limit.
    newer = steps.teacher_step(cfg, kd.day(1))["version"]
    assert mat.choose_teacher(cfg, kd.day(1)).version == newer
    assert mat.choose_teacher(cfg, kd.day(1), old).version == old
    out = mat.materialize(cfg, stale_dates[0], teacher_version=old)
    assert out["teacher_version"] == old
    assert out["staleness_days"] == (stale_dates[0] - B).days > max_stale
    # A teacher trained after the day is refused even when pinned.
    with pytest.raises(LineageError, match="after"):
        mat.choose_teacher(cfg, B, newer)

    # The policy is a setting: a zero-day limit refuses yesterday's teacher.
    strict = _with_policies(kd, max_label_staleness_days=0, labels="in_sample", label_lag_days=0)
    assert mat.choose_teacher(strict, kd.day(1)).version == newer
    with pytest.raises(LineageError, match="0 days|is 1 days stale"):
        mat.choose_teacher(strict, kd.day(2))


def test_label_lag_policy_uses_older_teacher(kd: KD):
    D = kd.day(1)
    fresh = steps.teacher_step(kd.cfg, D)["version"]
    assert kd.cfg.policies.labels == "out_of_sample" and kd.cfg.policies.label_lag_days == 1  # the default
    assert mat.choose_teacher(kd.cfg, D).version == kd.boot["teacher"]["version"]  # has not seen D
    assert mat.choose_teacher(_in_sample(kd), D).version == fresh  # the named in-sample variant
    steps.teacher_step(kd.cfg, kd.day(2))
    lag2 = _with_policies(kd, label_lag_days=2)
    assert mat.choose_teacher(lag2, kd.day(2)).version == kd.boot["teacher"]["version"]
    assert mat.choose_teacher(kd.cfg, kd.day(2)).version == fresh


def test_no_teacher_at_all(kd: KD):
    with pytest.raises(LineageError, match="no teacher checkpoint"):
        mat.choose_teacher(kd.cfg, kd.days[0])


# ---------------------------------------------------------------- join


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC_PATH)


def _labels_table(ids, like, rating) -> pa.Table:
    return pa.table({"example_id": pa.array(ids, pa.int64()), "like": pa.array(like, pa.float32()),
                     "rating": pa.array(rating, pa.float32())})


def test_join_aligns_shuffled_labels(spec):
    ids = pa.array([101, 205, 307, 409, 511, 613], pa.int64())
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ids))
    lab_ids = np.asarray(ids)[order]
    table = _labels_table(lab_ids, lab_ids / 1000.0, lab_ids % 5 + 1.0)
    j = join_labels(ids, table, spec, "mem", metadata={"teacher_version": "t"})
    assert j.missing == 0 and j.present.all()
    np.testing.assert_array_equal(j.soft["like"], (np.asarray(ids) / 1000.0).astype(np.float32))
    np.testing.assert_array_equal(j.soft["rating"], (np.asarray(ids) % 5 + 1.0).astype(np.float32))
    assert j.metadata == {"teacher_version": "t"}


def test_join_rejects_missing_ids(spec):
    ids = pa.array([1, 2, 3, 4, 5], pa.int64())
    table = _labels_table([5, 1, 3], [0.5, 0.1, 0.3], [5.0, 1.0, 3.0])
    with pytest.raises(DataError, match=r"mem: 2 of 5 examples have no teacher label"):
        join_labels(ids, table, spec, "mem")


def test_join_hard_labels_only_returns_present_mask(spec):
    ids = pa.array([1, 2, 3, 4, 5], pa.int64())
    table = _labels_table([5, 1, 3], [0.5, 0.1, 0.3], [5.0, 1.0, 3.0])
    j = join_labels(ids, table, spec, "mem", on_missing="hard_labels_only")
    assert j.present.tolist() == [True, False, True, False, True]
    assert j.missing == 2
    np.testing.assert_array_equal(j.soft["like"][j.present], np.float32([0.1, 0.3, 0.5]))
    assert np.isnan(j.soft["like"][~j.present]).all() and np.isnan(j.soft["rating"][~j.present]).all()


def test_join_rejects_duplicate_ids(spec):
    ids = pa.array([1, 2, 3], pa.int64())
    table = _labels_table([1, 2, 2, 3, 3, 3], [0.1] * 6, [1.0] * 6)
    with pytest.raises(DataError, match=r"mem: 3 duplicate example ids"):
        join_labels(ids, table, spec, "mem")
    # Even when every example is covered and the policy tolerates missing labels.
    with pytest.raises(DataError, match="duplicate"):
        join_labels(ids, table, spec, "mem", on_missing="hard_labels_only")


def test_join_rejects_id_type_mismatch(spec):
    ids = pa.array(["1", "2"], pa.string())
    with pytest.raises(DataError, match="id type"):
        join_labels(ids, _labels_table([1, 2], [0.1, 0.2], [1.0, 2.0]), spec, "mem")


@pytest.mark.parametrize("removed", [3, "all"])
def test_student_with_missing_labels_policy_trains_on_the_whole_day_without_kd(kd: KD, removed, caplog):
    """End to end: D's labels with some (or all) rows removed; 'error' refuses, and the
    'hard_labels_only' policy does what it says: the whole day, hard labels only, no
    distillation, recorded in the meta and the log (it used to drop the unlabelled rows,
    and train on 0 rows, with NaN metrics, when every label was missing)."""
    import logging

    cfg, D = kd.cfg, kd.day(1)
    full = mat.materialize(cfg, D)
    table, meta = read_labels(full["uri"], cfg.spec)
    keep = table.slice(table.num_rows) if removed == "all" else table.slice(removed)
    part.publish_table(full["uri"], keep, part.read_manifest(full["uri"]).metadata)  # the day's folder, rows short
    missing = table.num_rows - keep.num_rows
    with pytest.raises(DataError, match=f"{missing} of {table.num_rows} examples have no teacher label"):
        steps.student_step(cfg, "student_direct", D, full["uri"])
    lenient = _with_policies(kd, missing_labels="hard_labels_only")
    with caplog.at_level(logging.INFO, logger="kdcore"):
        out = steps.student_step(lenient, "student_direct", D, full["uri"])
    meta = registry.find_checkpoint(cfg.root, DS, "student_direct", D).meta
    assert out["version"] == meta["version"]
    assert meta["labels_missing"] == missing and meta["kd_applied"] is False
    assert meta["kd_skipped_reason"] == (f"{missing} of {table.num_rows} examples have no teacher label "
                                         f"(policies.missing_labels is 'hard_labels_only')")
    assert meta["rows_day"] == table.num_rows  # every row of the day, none dropped
    assert np.isfinite(meta["train"]["loss/total"])
    assert not any(k.startswith("soft/") for k in meta["train"])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"student_direct {D}: hard labels only: {meta['kd_skipped_reason']}" in m
               and f"trains on all {table.num_rows} rows of the day without distillation" in m for m in warned)
    # The very model the gate's hard_labels_only action trains: no soft term at all.
    gate_said = steps.student_step(cfg, "student_direct", D, full["uri"], action="hard_labels_only", force=True)
    assert gate_said["version"] == out["version"]


def test_labels_of_another_day_are_refused_by_students_and_gate(kd: KD):
    """Ids that restart daily join yesterday's labels without a missing row: the labels'
    recorded date and examples digest refuse them, naming both days, before any use."""
    from kdcore.pipeline import run_day

    cfg, d2 = kd.cfg, kd.day(2)
    _, copy = yesterdays_labels_as_today(kd)
    table, _ = read_labels(copy, cfg.spec)
    ids = load_days(cfg.root, cfg.spec, [d2]).example_ids
    assert join_labels(ids, table, cfg.spec, "copy").missing == 0  # what the old join-only check saw
    before = tree_digest(kd.root)
    pattern = rf"labels at .*date={d2}/teacher=\S+ are for {kd.day(1)} \(examples \w{{12}}\) but are used for {d2}"
    for name in ("student_aux", "student_direct"):
        with pytest.raises(DataError, match=pattern):
            steps.student_step(cfg, name, d2, copy)
    # a student that streams the day (labels read alongside in row order, no id join) too
    streams = cfg.model_copy(update={"students": [
        x.model_copy(update={"model": x.model.model_copy(update={"shuffle_window_rows": 100})})
        if x.name == "student_aux" else x for x in cfg.students]})
    with pytest.raises(DataError, match=pattern):
        steps.student_step(streams, "student_aux", d2, copy)
    with pytest.raises(DataError, match=pattern):
        run_day(cfg, d2, stages=["gate", "students"])
    lenient = _with_policies(kd, missing_labels="hard_labels_only")  # the policy does not excuse it
    with pytest.raises(DataError, match=pattern):
        steps.student_step(lenient, "student_direct", d2, copy)
    assert tree_digest(kd.root) == before  # nothing trained, gated or published
    assert registry.list_checkpoints(cfg.root, DS, "student_aux") == [kd.B]


def test_check_labels_for_names_what_differs(kd: KD):
    from kdcore.labels.store import check_labels_for

    cfg, D = kd.cfg, kd.day(1)
    out = mat.materialize(cfg, D)
    from kdcore.data.examples import examples_uri

    digest = part.manifest_digest(part.read_manifest(examples_uri(cfg.root, DS, D)))
    m = check_labels_for(out["uri"], DS, D, digest)
    assert m == part.read_manifest(out["uri"])
    with pytest.raises(DataError, match=rf"are for {D} \(examples {digest[:12]}\) but are used for {D} "
                                        rf"\(examples {'0' * 12}\); re-materialize them: kd labels materialize "
                                        rf"--date {D} --force"):
        check_labels_for(out["uri"], DS, D, "0" * 64)  # examples re-published since the labels
    with pytest.raises(DataError, match=rf"are for {D} .* but are used for {kd.day(2)}"):
        check_labels_for(out["uri"], DS, kd.day(2), digest)
    with pytest.raises(DataError, match=r"are of dataset 'movielens' but are used for dataset 'synth'"):
        check_labels_for(out["uri"], "synth", D, digest)
    # another teacher's folder: the labels name the teacher that scored them
    other = labels_uri(cfg.root, DS, D, out["teacher_version"] + "x")
    part.publish_table(other, read_labels(out["uri"], cfg.spec)[0], part.read_manifest(out["uri"]).metadata)
    with pytest.raises(DataError, match=rf"scored by teacher {out['teacher_version']}, not by the "
                                        rf"{out['teacher_version']}x their folder names"):
        check_labels_for(other, DS, D, digest)
    ckpt = registry.find_checkpoint(cfg.root, DS, "teacher", kd.B)
    with pytest.raises(DataError, match=r"not teacher labels \(manifest kind 'checkpoint'"):
        check_labels_for(ckpt.uri, DS, D, digest)


def test_gate_refuses_labels_whose_teacher_was_retrained_since(kd: KD):
    """The gate judges labels by the reference profile of the teacher that scored them: when
    that teacher's day was retrained after it labelled (a --force refresh), the checkpoint
    at its path is another model, and the gate refuses instead of mixing the two."""
    from kdcore.quality.daily import run_gate

    out = mat.materialize(kd.cfg, kd.day(1))
    retrained = steps.teacher_step(kd.cfg, kd.B, force=True)  # the labelling teacher's day, again
    assert retrained["version"] != out["teacher_version"]
    before = tree_digest(kd.root)
    with pytest.raises(LineageError, match=rf"scored by {out['teacher_version']}, but .* now holds "
                                           rf"{retrained['version']}; re-materialize"):
        run_gate(kd.cfg, kd.day(1), out["uri"])
    assert tree_digest(kd.root) == before

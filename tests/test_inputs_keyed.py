"""Outputs are keyed on the content of their inputs: unchanged input is reused, changed
input is recomputed, a moved root is still recognised, and a day that breaks the data
contract stops before the teacher (or anything else) trains on it."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest

from kdcore import pipeline
from kdcore.config import load_pipeline
from kdcore.data import examples
from kdcore.errors import DataError
from kdcore.labels.store import labels_day_uri
from tests.pipeline_fixtures import KD, TINY, kd, kd_base, local, tree_digest  # noqa: F401  (fixtures)

STUDENTS = ("student_aux", "student_direct", "control")


def _republish(kd: KD, day, change) -> None:
    table = examples.read_day(kd.cfg.root, kd.cfg.spec, day)
    examples.publish_day(kd.cfg.root, kd.cfg.spec, day, [change(table)], {"source": "test"})


def test_unchanged_input_is_reused_and_changed_input_recomputed(kd: KD):
    cfg, D = kd.cfg, kd.day(1)
    first = pipeline.run_day(cfg, D)
    again = pipeline.run_day(cfg, D)
    assert again["teacher"]["reused"] is True and again["labels"]["reused"] is True
    assert all(again["students"][n]["reused"] for n in STUDENTS)
    assert again["teacher"]["version"] == first["teacher"]["version"]

    # The day's examples are re-published with different rows: nothing may be reused.
    _republish(kd, D, lambda t: t.slice(0, t.num_rows - 7))
    changed = pipeline.run_day(cfg, D)
    assert changed["examples"]["rows"] == first["examples"]["rows"] - 7
    assert not changed["teacher"].get("reused") and changed["teacher"]["version"] != first["teacher"]["version"]
    # same (older) labelling teacher, new examples: the labels are computed again
    assert changed["labels"]["teacher_version"] == first["labels"]["teacher_version"]
    assert not changed["labels"].get("reused") and changed["labels"]["rows"] == first["labels"]["rows"] - 7
    for n in STUDENTS:
        assert not changed["students"][n].get("reused"), n
        assert changed["students"][n]["version"] != first["students"][n]["version"], n


def test_a_moved_root_keeps_its_outputs_byte_for_byte(kd: KD, tmp_path, monkeypatch):
    D = kd.day(1)
    pipeline.run_day(kd.cfg, D)
    old_root = kd.cfg.root  # the root follows KD_STORAGE_ROOT
    moved = tmp_path / "moved"
    shutil.copytree(kd.root, moved)
    monkeypatch.setenv("KD_STORAGE_ROOT", str(moved))
    cfg2 = load_pipeline(TINY)
    assert cfg2.root != old_root
    out = pipeline.run_day(cfg2, D)
    assert out["teacher"]["reused"] and out["labels"]["reused"] and all(out["students"][n]["reused"] for n in STUDENTS)
    labels = local(labels_day_uri(old_root, "movielens", D))
    assert tree_digest(labels) == tree_digest(local(labels_day_uri(cfg2.root, "movielens", D)))
    assert tree_digest(kd.root) == tree_digest(moved)  # nothing was rewritten


@pytest.mark.parametrize("column,value,message", [
    ("like", 2, r"column 'like' \(label of task 'like'\) has 1 value\(s\) that are not 0 or 1"),
    ("rating", 9.0, r"column 'rating' \(label of task 'rating'\) has 1 value\(s\) that are not finite and within"),
    ("release_year", float("inf"), r"column 'release_year' has 1 infinite value\(s\)"),
])
def test_a_bad_day_stops_teacher_labels_and_students(kd: KD, column, value, message):
    cfg, D = kd.cfg, kd.day(1)

    def poison(t: pa.Table) -> pa.Table:
        col = t.column(column).to_numpy().copy()
        col[3] = value
        return t.set_column(t.schema.get_field_index(column), column, pa.array(col, t.schema.field(column).type))

    _republish(kd, D, poison)
    before = tree_digest(kd.root)
    for stages in (pipeline.STAGES, ("labels",), ("students",)):
        with pytest.raises(DataError, match=rf"date={D}.*{message}.*example_id="):
            pipeline.run_day(cfg, D, stages=stages)
    from kdcore.training import steps

    with pytest.raises(DataError, match=message):
        steps.teacher_step(cfg, D)
    assert tree_digest(kd.root) == before  # nothing was published for the day


def test_a_column_that_changes_type_between_days_is_refused(kd: KD):
    cfg, D = kd.cfg, kd.day(1)
    _republish(kd, D, lambda t: t.set_column(t.schema.get_field_index("hour"), "hour",
                                             pa.array(np.asarray(t.column("hour"), dtype=np.float64) + 0.5)))
    with pytest.raises(DataError, match=rf"column 'hour' is double on {D} but \w+ on {kd.B}"):
        pipeline.run_day(cfg, D)

"""The validation of a day is recorded once and trusted by later tasks only while it
still describes what is published (kdcore.data.validate.ensure_valid)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pytest

from kdcore.data import examples, synth
from kdcore.data import validate as v
from kdcore.errors import DataError
from kdcore.storage import partition as part

D0, D1 = dt.date(2026, 1, 1), dt.date(2026, 1, 2)
SPEC = synth.dataset_spec()


def _publish(root: str, day: dt.date, rows: int = 500, seed: int = 0, edit=None) -> None:
    cfg = synth.SynthConfig(rows_per_day=rows, start_date=D0, seed=seed)
    batches = list(synth.generate_day(cfg, day))
    if edit is not None:
        batches = [edit(b) for b in batches]
    examples.publish_day(root, SPEC, day, batches, {"source": "synth"})


@pytest.fixture()
def root(tmp_path) -> str:
    r = str(tmp_path / "store")
    _publish(r, D0)
    _publish(r, D1)
    _fresh_process()
    yield r
    _fresh_process()


def _fresh_process() -> None:
    """What a new task process sees: no in-process cache."""
    v._VALID.clear()
    v._RECORDED.clear()


def _forbid_validation(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("the day was read again although its validation record matches")
    monkeypatch.setattr(v, "validate_day", refuse)


def test_only_the_boundary_check_writes_the_record(root):
    v.ensure_valid(root, SPEC, D1)  # a step's own check: the root is left as it was
    assert not part.is_published(v.record_uri(root, SPEC.name, D1))
    v.ensure_valid(root, SPEC, D1, record=True)  # the pipeline's boundary (cached result, now recorded)
    assert part.is_published(v.record_uri(root, SPEC.name, D1))


def test_a_bad_day_gets_no_record(root):
    def bad_label(b: pa.RecordBatch) -> pa.RecordBatch:
        i = b.schema.get_field_index("click")
        return b.set_column(i, "click", pa.array([2] * b.num_rows, b.schema.field("click").type))

    _publish(root, D1, edit=bad_label)
    with pytest.raises(DataError, match="column 'click'"):
        v.ensure_valid(root, SPEC, D1, record=True)
    assert not part.is_published(v.record_uri(root, SPEC.name, D1))


def test_a_later_task_trusts_the_record_and_reads_no_rows(root, monkeypatch):
    first = v.ensure_valid(root, SPEC, D1, record=True)
    rec = json.loads(part.read_blob(v.record_uri(root, SPEC.name, D1), v.RECORD))
    assert rec["examples_sha256"] == first["examples_sha256"] and rec["rows"] == 500
    assert rec["rules_version"] == v.RULES_VERSION and rec["previous_sha256"] is not None
    _fresh_process()
    _forbid_validation(monkeypatch)
    assert v.ensure_valid(root, SPEC, D1) == first
    # and a rerun writes nothing: the record's manifest is untouched
    before = part.read_manifest(v.record_uri(root, SPEC.name, D1))
    _fresh_process()
    v.ensure_valid(root, SPEC, D1, record=True)
    assert part.read_manifest(v.record_uri(root, SPEC.name, D1)) == before


def test_a_republished_bad_day_is_checked_again_not_trusted(root):
    v.ensure_valid(root, SPEC, D1, record=True)

    def bad_label(b: pa.RecordBatch) -> pa.RecordBatch:
        i = b.schema.get_field_index("click")
        return b.set_column(i, "click", pa.array([2] * b.num_rows, b.schema.field("click").type))

    _publish(root, D1, edit=bad_label)
    _fresh_process()
    with pytest.raises(DataError, match="column 'click'"):
        v.ensure_valid(root, SPEC, D1)


def test_the_record_is_checked_again_for_new_rules_a_new_day_before_or_a_corrupt_record(root, monkeypatch):
    v.ensure_valid(root, SPEC, D1, record=True)
    calls = []
    real = v.validate_day
    monkeypatch.setattr(v, "validate_day", lambda *a, **k: calls.append(1) or real(*a, **k))

    monkeypatch.setattr(v, "RULES_VERSION", v.RULES_VERSION + 1)
    _fresh_process()
    v.ensure_valid(root, SPEC, D1, record=True)
    assert len(calls) == 1  # and the record now carries the new version
    _fresh_process()
    v.ensure_valid(root, SPEC, D1, record=True)
    assert len(calls) == 1

    _publish(root, D0, seed=1)  # the day before changed: the schema comparison is redone
    _fresh_process()
    v.ensure_valid(root, SPEC, D1, record=True)
    assert len(calls) == 2

    rec_uri = v.record_uri(root, SPEC.name, D1)
    path = next(p for p in (part.read_manifest(rec_uri).files) if p.name == v.RECORD).path
    (Path(rec_uri.removeprefix("file://")) / path).write_bytes(b"{not json")
    _fresh_process()
    v.ensure_valid(root, SPEC, D1, record=True)
    assert len(calls) == 3

"""The synthetic stream is deterministic, matches its spec, and its shift is measurable."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kdcore.data.spec import load_spec
from kdcore.data.synth import SYNTH_SCHEMA, SynthConfig, dataset_spec, generate_day
from kdcore.errors import SpecError

REPO = Path(__file__).resolve().parents[1]
DAY = date(2026, 1, 10)
SMALL = SynthConfig(rows_per_day=5_000, batch_rows=1_024, n_users=2_000, n_items=500,
                    new_items_per_day=20)


def _day(cfg: SynthConfig, day: date) -> pa.Table:
    return pa.Table.from_batches(list(generate_day(cfg, day)), schema=SYNTH_SCHEMA)


def test_yaml_matches_code_spec():
    assert load_spec(REPO / "configs" / "synth.yaml") == dataset_spec()


def test_deterministic():
    a, b = _day(SMALL, DAY), _day(SMALL, DAY)
    assert a.equals(b)
    other_seed = _day(SMALL.model_copy(update={"seed": 1}), DAY)
    assert not a.column("click").equals(other_seed.column("click"))


def test_schema_matches_spec():
    spec = dataset_spec()
    table = _day(SMALL, DAY)
    assert set(spec.required_columns) <= set(table.column_names)
    assert table.schema.field(spec.example_id).type == pa.int64()
    assert table.schema.field(spec.timestamp).type == pa.timestamp("us", tz="UTC")
    for col in spec.numeric:
        t = table.schema.field(col).type
        assert pa.types.is_floating(t) or pa.types.is_integer(t), col
    for col in spec.categorical:
        t = table.schema.field(col).type
        assert pa.types.is_string(t) or pa.types.is_integer(t), col
    for col in spec.feature_columns:
        assert table.column(col).null_count == 0, col
    click = table.column("click").to_numpy()
    assert set(np.unique(click)) <= {0, 1}
    watch = table.column("watch_time").to_numpy()
    assert (watch >= 0).all() and (watch[click == 0] == 0).all() and (watch[click == 1] > 0).all()


def test_rows_batches_and_time_window():
    cfg = SMALL.model_copy(update={"rows_per_day": 3_000, "batch_rows": 1_000 - 1})
    batches = list(generate_day(cfg, DAY))
    assert [b.num_rows for b in batches] == [999, 999, 999, 3]
    ts = pa.Table.from_batches(batches).column("timestamp").to_numpy().astype("datetime64[us]")
    start = np.datetime64(datetime(2026, 1, 10, tzinfo=UTC).replace(tzinfo=None), "us")
    assert (ts >= start).all() and (ts < start + np.timedelta64(1, "D")).all()
    assert (np.diff(ts.astype(np.int64)) >= 0).all()


def test_example_ids_unique_within_and_across_days():
    ids = np.concatenate([_day(SMALL, d).column("example_id").to_numpy()
                          for d in (DAY, DAY + timedelta(days=1))])
    assert len(np.unique(ids)) == len(ids) == 2 * SMALL.rows_per_day


def test_catalogue_grows_with_new_items():
    late = DAY + timedelta(days=30)
    items = _day(SMALL, late).column("item_id").to_numpy()
    day_index = (late - SMALL.start_date).days
    assert items.max() < SMALL.n_items + SMALL.new_items_per_day * day_index
    assert (items >= SMALL.n_items).any()  # items born after day 0 get traffic


def test_day_before_start_is_rejected():
    with pytest.raises(SpecError, match="before start_date"):
        next(generate_day(SMALL, SMALL.start_date - timedelta(days=1)))


def test_shift_changes_label_relationship():
    shift = DAY + timedelta(days=1)
    cfg = SMALL.model_copy(update={"rows_per_day": 20_000, "batch_rows": 8_192,
                                   "shift_date": shift})
    before, after = _day(cfg, DAY), _day(cfg, shift)

    def corr(t: pa.Table) -> float:
        return float(np.corrcoef(t.column("f0").to_numpy(), t.column("click").to_numpy())[0, 1])

    # The effect of f0 on clicks flips sign (std. error of each correlation is ~0.007).
    assert corr(before) > 0.04 and corr(after) < -0.04
    assert corr(before) - corr(after) > 0.12
    rate_before = before.column("click").to_numpy().mean()
    rate_after = after.column("click").to_numpy().mean()
    assert rate_after - rate_before > 0.03
    # Without a shift, the next day looks like the previous one.
    calm = _day(cfg.model_copy(update={"shift_date": None}), shift)
    assert corr(calm) > 0.04

"""`kd data ingest`: CSV and Parquet sources, local and gs://, every way of stating time,
the date filter, idempotent re-runs, and errors that name the file and the column."""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdcore.cli import main
from kdcore.data import examples, ingest
from kdcore.data.spec import DatasetSpec, load_spec
from kdcore.errors import DataError, SpecError
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part

UTC = dt.UTC
D1, D2, D3 = dt.date(2024, 3, 1), dt.date(2024, 3, 2), dt.date(2024, 3, 3)
SPEC_YAML = """\
name: shop
example_id: id
timestamp: ts
{extra}group: user
categorical: [user, item]
numeric: [price]
tasks: [{{name: click, kind: binary}}]
"""


def _epoch(day: dt.date, seconds: int = 0) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) + seconds


def _spec(**kw) -> DatasetSpec:
    base = dict(name="shop", example_id="id", timestamp="ts", group="user",
                categorical=["user", "item"], numeric=["price"], tasks=[{"name": "click", "kind": "binary"}])
    return DatasetSpec.model_validate({**base, **kw})


def _spec_file(tmp_path, extra: str = "", name: str = "spec.yaml"):
    p = tmp_path / name
    p.write_text(SPEC_YAML.format(extra=extra))
    return p


def _rows(ids, ts, **cols) -> pa.Table:
    n = len(ids)
    base = {"id": ids, "ts": ts, "user": [f"u{i % 3}" for i in ids], "item": [f"i{i % 5}" for i in ids],
            "price": [float(i) / 2 for i in ids], "click": [i % 2 for i in ids], "note": ["x"] * n}
    return pa.table({**base, **cols})


def _csv_bytes(table: pa.Table) -> bytes:
    cols = table.column_names
    lines = [",".join(cols)]
    for row in table.to_pylist():
        lines.append(",".join("" if row[c] is None else str(row[c]) for c in cols))
    return ("\n".join(lines) + "\n").encode()


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _put(uri: str, table: pa.Table, fmt: str) -> str:
    sfs.write_bytes_atomic(uri, _csv_bytes(table) if fmt == "csv" else _parquet_bytes(table))
    return uri


def _day(root: str, spec: DatasetSpec, day: dt.date) -> pa.Table:
    return examples.read_day(root, spec, day)


def _manifests(root: str, spec: DatasetSpec) -> dict[dt.date, bytes]:
    return {d: sfs.read_bytes(part.manifest_uri(examples.examples_uri(root, spec.name, d)))
            for d in examples.list_days(root, spec.name)}


# --- sources, formats, units -----------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_folder_of_files_epoch_seconds(storage_root, fmt):
    """Two files, rows of three days interleaved: each day gets exactly its rows, in source
    order (files by path), with only the spec's columns and the time as timestamp[s, UTC]."""
    src = sfs.join(storage_root, "raw", "shop")
    _put(sfs.join(src, "part-1." + fmt), _rows([1, 2, 3, 4], [_epoch(D2, 5), _epoch(D1, 86_399),
                                                             _epoch(D2, 1), _epoch(D3)]), fmt)
    _put(sfs.join(src, "part-2." + fmt), _rows([5, 6], [_epoch(D1), _epoch(D2, 7)]), fmt)
    for skipped in ("_SUCCESS", "_temporary/part-9." + fmt, ".part-1." + fmt + ".crc"):
        sfs.write_bytes_atomic(sfs.join(src, skipped), b"not data")  # markers and temporaries
    root = sfs.join(storage_root, "store")
    spec = _spec(timestamp_unit="s")
    summary = ingest.ingest(spec, src, root)
    assert summary == {**summary, "dataset": "shop", "format": fmt, "files": 2, "days": 3, "rows": 6,
                       "first": "2024-03-01", "last": "2024-03-03", "outside_range": 0}
    assert examples.list_days(root, "shop") == [D1, D2, D3]
    assert _day(root, spec, D1)["id"].to_pylist() == [2, 5]
    assert _day(root, spec, D2)["id"].to_pylist() == [1, 3, 6]
    d3 = _day(root, spec, D3)
    assert d3["id"].to_pylist() == [4]
    assert d3.column_names == spec.required_columns  # "note" is not published
    assert d3.schema.field("ts").type == pa.timestamp("s", tz="UTC")
    assert d3["ts"][0].as_py() == dt.datetime(2024, 3, 3, tzinfo=UTC)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_epoch_milliseconds_split_at_utc_midnight(tmp_path, fmt):
    ms = [_epoch(D1, 86_399) * 1000 + 999, _epoch(D2) * 1000, _epoch(D2) * 1000 + 1]
    src = _put(str(tmp_path / f"events.{fmt}"), _rows([10, 11, 12], ms), fmt)
    spec = _spec(timestamp_unit="ms")
    ingest.ingest(spec, src, str(tmp_path / "store"))
    d1, d2 = _day(str(tmp_path / "store"), spec, D1), _day(str(tmp_path / "store"), spec, D2)
    assert d1["id"].to_pylist() == [10]
    assert d2["id"].to_pylist() == [11, 12]
    assert d1.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert d1["ts"][0].as_py() == dt.datetime(2024, 3, 1, 23, 59, 59, 999_000, tzinfo=UTC)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_iso_text_timestamps_honour_offsets(tmp_path, fmt):
    """ISO-8601 text needs no declaration: an offset is honoured, none means UTC."""
    ts = ["2024-03-01T23:30:00-02:00",  # 01:30 UTC on March 2
          "2024-03-01 23:59:59",  # naive: UTC, March 1
          "2024-03-02T00:15:00+01:00",  # 23:15 UTC on March 1
          "2024-03-02"]  # midnight UTC
    src = _put(str(tmp_path / f"iso.{fmt}"), _rows([1, 2, 3, 4], ts), fmt)
    spec = _spec()
    ingest.ingest(spec, src, str(tmp_path / "store"))
    d1 = _day(str(tmp_path / "store"), spec, D1)
    d2 = _day(str(tmp_path / "store"), spec, D2)
    assert d1["id"].to_pylist() == [2, 3]
    assert d2["id"].to_pylist() == [1, 4]
    assert d2.schema.field("ts").type == pa.timestamp("ns", tz="UTC")
    assert d2["ts"][0].as_py().isoformat() == "2024-03-02T01:30:00+00:00"


def test_parquet_arrow_timestamps_in_another_zone(tmp_path):
    """An Arrow timestamp keeps its unit (Parquet stores seconds as ms) and goes to UTC;
    its date is taken in UTC whatever its zone."""
    ts = pa.array([_epoch(D1, 86_000), _epoch(D2, 10)], pa.timestamp("s", tz="America/New_York"))
    src = _put(str(tmp_path / "t.parquet"), _rows([1, 2], ts), "parquet")
    spec = _spec()
    ingest.ingest(spec, src, str(tmp_path / "store"))
    # 23:53 UTC on March 1 is the evening of March 1 in New York, but 00:00:10 UTC on March 2
    # is still March 1 there: the partition follows UTC.
    assert examples.list_days(str(tmp_path / "store"), "shop") == [D1, D2]
    t = _day(str(tmp_path / "store"), spec, D2)
    assert t.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert t["id"].to_pylist() == [2]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_declared_date_field(storage_root, fmt):
    """`date: {column: ds}` partitions by a date column instead of the UTC date of the
    timestamp; the date column is read, not published."""
    ts = [_epoch(D2, 3600), _epoch(D2, 7200), _epoch(D3, 60)]
    ds_col = ["2024-03-01", "2024-03-02", "2024-03-02"]  # e.g. a local calendar day
    src = _put(sfs.join(storage_root, "raw", "d." + fmt), _rows([1, 2, 3], ts, ds=ds_col), fmt)
    spec = _spec(timestamp_unit="s", date={"column": "ds"})
    root = sfs.join(storage_root, "store")
    summary = ingest.ingest(spec, src, root)
    assert (summary["days"], summary["first"], summary["last"]) == (2, "2024-03-01", "2024-03-02")
    assert _day(root, spec, D1)["id"].to_pylist() == [1]
    d2 = _day(root, spec, D2)
    assert d2["id"].to_pylist() == [2, 3]
    assert "ds" not in d2.column_names


def test_declared_date_field_other_units(tmp_path):
    ts = [_epoch(D1), _epoch(D1, 10)]
    spec = _spec(timestamp_unit="s", date={"column": "day_ms", "unit": "ms"})
    src = _put(str(tmp_path / "a.parquet"), _rows([1, 2], ts, day_ms=[_epoch(D3) * 1000, _epoch(D2) * 1000]),
               "parquet")
    ingest.ingest(spec, src, str(tmp_path / "s1"))
    assert examples.list_days(str(tmp_path / "s1"), "shop") == [D2, D3]
    spec = _spec(timestamp_unit="s", date={"column": "day"})
    src = _put(str(tmp_path / "b.parquet"), _rows([1, 2], ts, day=pa.array([D3, D3], pa.date32())), "parquet")
    ingest.ingest(spec, src, str(tmp_path / "s2"))
    assert examples.list_days(str(tmp_path / "s2"), "shop") == [D3]
    assert _day(str(tmp_path / "s2"), spec, D3)["id"].to_pylist() == [1, 2]
    spec = _spec(timestamp_unit="s", date={"column": "seen", "unit": "iso"})
    seen = ["2024-03-02T23:30:00-01:00", "2024-03-02T23:30:00+01:00"]  # UTC: March 3, March 2
    src = _put(str(tmp_path / "c.csv"), _rows([1, 2], ts, seen=seen), "csv")
    ingest.ingest(spec, src, str(tmp_path / "s3"))
    assert [_day(str(tmp_path / "s3"), spec, d)["id"].to_pylist() for d in (D2, D3)] == [[2], [1]]


def test_from_to_publish_only_those_days(tmp_path):
    ts = [_epoch(D1), _epoch(D2), _epoch(D3), _epoch(D2, 1), _epoch(D3, 1)]
    src = _put(str(tmp_path / "a.csv"), _rows([1, 2, 3, 4, 5], ts), "csv")
    spec = _spec(timestamp_unit="s")
    root = str(tmp_path / "store")
    summary = ingest.ingest(spec, src, root, start="2024-03-02", end="2024-03-02")
    assert (summary["days"], summary["rows"], summary["outside_range"]) == (1, 2, 3)
    assert examples.list_days(root, "shop") == [D2]
    assert _day(root, spec, D2)["id"].to_pylist() == [2, 4]
    ingest.ingest(spec, src, root, start="2024-03-03")  # open-ended
    assert examples.list_days(root, "shop") == [D2, D3]
    with pytest.raises(DataError, match="no rows dated 2024-04-01"):
        ingest.ingest(spec, src, root, start="2024-04-01")
    with pytest.raises(DataError, match="after --to"):
        ingest.ingest(spec, src, root, start="2024-03-03", end="2024-03-01")


def test_rerun_is_byte_identical(storage_root):
    src = sfs.join(storage_root, "raw")
    _put(sfs.join(src, "a.parquet"), _rows([1, 2, 3], [_epoch(D1), _epoch(D2), _epoch(D1, 5)]), "parquet")
    _put(sfs.join(src, "b.parquet"), _rows([4], [_epoch(D2, 9)]), "parquet")
    root = sfs.join(storage_root, "store")
    spec = _spec(timestamp_unit="s")
    ingest.ingest(spec, src, root)
    first = _manifests(root, spec)
    files = sfs.list_files(examples.examples_root(root, "shop"))
    ingest.ingest(spec, src, root)
    assert _manifests(root, spec) == first
    assert sfs.list_files(examples.examples_root(root, "shop")) == files
    assert len(first) == 2 and all(json.loads(m)["rows"] == 2 for m in first.values())


def test_scattered_day_order_and_spool_segments(tmp_path):
    """Rows of many days interleaved, tiny batches and a spool allowed one open file: every
    day keeps its rows in source order (its spool has several segments)."""
    rng = np.random.default_rng(0)
    n = 300
    day_of = rng.integers(0, 12, n)
    ts = [_epoch(D1 + dt.timedelta(days=int(d)), i) for i, d in enumerate(day_of)]
    src = _put(str(tmp_path / "a.parquet"), _rows(list(range(n)), ts), "parquet")
    spec = _spec(timestamp_unit="s")
    root = str(tmp_path / "store")
    real = ingest._Spool
    spools = []

    def one_open(schema, directory=None):
        spools.append(real(schema, directory, max_open=1))
        return spools[-1]

    mp = pytest.MonkeyPatch()
    mp.setattr(ingest, "_Spool", one_open)
    try:
        ingest.ingest(spec, src, root, batch_rows=7)
    finally:
        mp.undo()
    assert max(len(s) for s in spools[0].segments.values()) > 1
    days = examples.list_days(root, "shop")
    assert len(days) == len(set(day_of.tolist()))
    for d in days:
        want = [i for i in range(n) if D1 + dt.timedelta(days=int(day_of[i])) == d]
        assert _day(root, spec, d)["id"].to_pylist() == want


# --- errors -------------------------------------------------------------------------------------

def test_unparsable_date_names_file_column_value_row(tmp_path):
    src = tmp_path / "raw"
    _put(str(src / "a.csv"), _rows([1], ["2024-03-01T10:00:00Z"]), "csv")
    _put(str(src / "b.csv"), _rows([2, 3], ["2024-03-02T10:00:00Z", "yesterday"]), "csv")
    root = str(tmp_path / "store")
    with pytest.raises(DataError) as e:
        ingest.ingest(_spec(), str(src), root)
    msg = str(e.value)
    assert f"{src / 'b.csv'}: column 'ts'" in msg and "'yesterday'" in msg and "row 2" in msg
    assert examples.list_days(root, "shop") == []  # nothing published, not even March 1


@pytest.mark.parametrize("spec_kw,values,needle", [
    ({"timestamp_unit": "s"}, ["17x"], "unparsable value '17x' at row 1 (expected an integer epoch in s)"),
    ({"date": {"column": "ds"}}, ["2024-3-1"], "column 'ds' has an unparsable value '2024-3-1'"),
    ({"date": {"column": "ds"}}, [""], "column 'ds' has an unparsable value ''"),
])
def test_bad_time_values(tmp_path, spec_kw, values, needle):
    ts = values if "timestamp_unit" in spec_kw else ["2024-03-01T00:00:00Z"]
    extra = {"ds": values} if "date" in spec_kw else {}
    src = _put(str(tmp_path / "a.csv"), _rows([1], ts, **extra), "csv")
    with pytest.raises(DataError, match="a.csv: ") as e:
        ingest.ingest(_spec(**spec_kw), src, str(tmp_path / "store"))
    assert needle in str(e.value)


def test_integer_time_without_unit_asks_for_it(tmp_path):
    src = _put(str(tmp_path / "a.parquet"), _rows([1], [_epoch(D1)]), "parquet")
    with pytest.raises(DataError, match=r"a.parquet: column 'ts' holds integers \(int64\): declare .*timestamp_unit"):
        ingest.ingest(_spec(), src, str(tmp_path / "store"))


def test_wrong_unit_is_caught(tmp_path):
    """Milliseconds declared as seconds land beyond year 9999: refused, not published."""
    src = _put(str(tmp_path / "a.parquet"), _rows([1], [_epoch(D1) * 1000]), "parquet")
    with pytest.raises(DataError, match=f"column 'ts' value {_epoch(D1) * 1000} at row 1 is not a date "
                       "in years 1..9999 .*timestamp_unit"):
        ingest.ingest(_spec(timestamp_unit="s"), src, str(tmp_path / "store"))
    assert examples.list_days(str(tmp_path / "store"), "shop") == []


def test_empty_date_values_are_refused(tmp_path):
    ts = pa.array([_epoch(D1), None], pa.int64())
    src = _put(str(tmp_path / "a.parquet"), _rows([1, 2], ts), "parquet")
    with pytest.raises(DataError, match="column 'ts' has 1 empty values .*row 2"):
        ingest.ingest(_spec(timestamp_unit="s"), src, str(tmp_path / "store"))


def test_missing_column_names_the_file(storage_root):
    src = sfs.join(storage_root, "raw")
    _put(sfs.join(src, "a.parquet"), _rows([1], [_epoch(D1)]), "parquet")
    _put(sfs.join(src, "b.parquet"), _rows([2], [_epoch(D1)]).drop_columns(["price"]), "parquet")
    root = sfs.join(storage_root, "store")
    with pytest.raises(DataError, match="b.parquet: missing column 'price' required by dataset spec 'shop'"):
        ingest.ingest(_spec(timestamp_unit="s"), src, root)
    assert examples.list_days(root, "shop") == []
    with pytest.raises(DataError, match=r"a.parquet: missing column 'ds' declared as the date column \(date.column\)"):
        ingest.ingest(_spec(timestamp_unit="s", date={"column": "ds"}), sfs.join(src, "a.parquet"), root)


def test_type_conflict_between_files(tmp_path):
    _put(str(tmp_path / "raw" / "a.parquet"), _rows([1], [_epoch(D1)]), "parquet")
    _put(str(tmp_path / "raw" / "b.parquet"), _rows([2], [_epoch(D1)], user=pa.array([7])), "parquet")
    with pytest.raises(DataError, match="column 'user' is string in .*a.parquet but int64 in .*b.parquet"):
        ingest.ingest(_spec(timestamp_unit="s"), str(tmp_path / "raw"), str(tmp_path / "store"))


def test_contract_types_are_checked_per_file(tmp_path):
    src = _put(str(tmp_path / "a.csv"), _rows([1], [_epoch(D1)], click=["yes"]), "csv")
    with pytest.raises(DataError, match="a.csv: column 'click' must be numeric, found string"):
        ingest.ingest(_spec(timestamp_unit="s"), src, str(tmp_path / "store"))


def test_duplicate_ids_publish_nothing(tmp_path):
    ts = [_epoch(D1), _epoch(D2), _epoch(D2, 1)]
    src = _put(str(tmp_path / "a.csv"), _rows([1, 2, 2], ts), "csv")
    root = str(tmp_path / "store")
    with pytest.raises(DataError, match="column 'id' has 1 duplicate ids on 2024-03-02 \\(e.g. 2\\)"):
        ingest.ingest(_spec(timestamp_unit="s"), src, root)
    assert examples.list_days(root, "shop") == []  # March 1 was fine, and is not published either


def test_source_errors(tmp_path):
    root = str(tmp_path / "store")
    spec = _spec(timestamp_unit="s")
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: source not found"):
        ingest.ingest(spec, str(tmp_path / "nope"), root)
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(DataError, match="data.json: unsupported format"):
        ingest.ingest(spec, str(tmp_path / "data.json"), root)
    with pytest.raises(DataError, match="unsupported format 'json'"):
        ingest.ingest(spec, str(tmp_path / "data.json"), root, fmt="json")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet: unreadable parquet file"):
        ingest.ingest(spec, str(tmp_path / "bad.parquet"), root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .csv or .parquet files"):
        ingest.ingest(spec, str(tmp_path / "empty"), root)
    (tmp_path / "mixed").mkdir()
    _put(str(tmp_path / "mixed" / "a.csv"), _rows([1], [_epoch(D1)]), "csv")
    _put(str(tmp_path / "mixed" / "b.parquet"), _rows([2], [_epoch(D1)]), "parquet")
    with pytest.raises(DataError, match="both csv and parquet"):
        ingest.ingest(spec, str(tmp_path / "mixed"), root)
    summary = ingest.ingest(spec, str(tmp_path / "mixed"), root, fmt="parquet")
    assert (summary["files"], summary["rows"]) == (1, 1)
    assert _day(root, spec, D1)["id"].to_pylist() == [2]


def test_gcs_source_not_found(gcs_emulator, tmp_path):
    with pytest.raises(DataError, match=f"gs://{gcs_emulator}/no-such-prefix: source not found"):
        ingest.ingest(_spec(timestamp_unit="s"), f"gs://{gcs_emulator}/no-such-prefix", str(tmp_path / "store"))


# --- the command line ---------------------------------------------------------------------------

def test_cli_ingest_ok_and_errors(tmp_path, capsys):
    spec_path = _spec_file(tmp_path, "timestamp_unit: ms\n")
    src = _put(str(tmp_path / "a.csv"), _rows([1, 2], [_epoch(D1) * 1000, _epoch(D3) * 1000]), "csv")
    root = str(tmp_path / "store")
    args = ["data", "ingest", "--spec", str(spec_path), "--source", src, "--root", root]
    assert main([*args, "--to", "2024-03-02"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["days"], out["rows"], out["first"], out["last"]) == (1, 1, "2024-03-01", "2024-03-01")
    assert examples.list_days(root, "shop") == [D1]

    bad = _put(str(tmp_path / "b.csv"), _rows([1], [_epoch(D1) * 1000]).drop_columns(["item"]), "csv")
    assert main(["data", "ingest", "--spec", str(spec_path), "--source", bad, "--root", root]) == 2
    err = capsys.readouterr().err
    assert err == f"kd: error: {bad}: missing column 'item' required by dataset spec 'shop'\n"


def test_cli_spec_without_timestamp(tmp_path, capsys):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC_YAML.format(extra="").replace("timestamp: ts\n", ""))
    src = _put(str(tmp_path / "a.csv"), _rows([1], ["2024-03-01T00:00:00Z"]), "csv")
    code = main(["data", "ingest", "--spec", str(spec_path), "--source", src, "--root", str(tmp_path / "s")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kd: error: {spec_path}: invalid configuration")
    assert "field 'timestamp': Value error, required key 'timestamp' is missing" in err
    assert not (tmp_path / "s").exists()


def test_cli_refuses_dot_dot_name(tmp_path, capsys):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC_YAML.format(extra="").replace("name: shop", "name: '..'"))
    src = _put(str(tmp_path / "a.csv"), _rows([1], ["2024-03-01T00:00:00Z"]), "csv")
    assert main(["data", "ingest", "--spec", str(spec_path), "--source", src, "--root", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"{spec_path}" in err and "field 'name'" in err and "dataset name '..' must not start with '.'" in err
    assert not (tmp_path / "s").exists()


def test_spec_file_with_date_declaration_loads(tmp_path):
    spec = load_spec(_spec_file(tmp_path, "timestamp_unit: us\ndate: {column: ds, unit: iso}\n"))
    assert spec.timestamp_unit == "us"
    assert (spec.date.column, spec.date.unit) == ("ds", "iso")
    with pytest.raises(SpecError, match="field 'date.unit'"):
        load_spec(_spec_file(tmp_path, "date: {column: ds, unit: days}\n"))

"""MovieLens-100K as a daily stream: the real data, published twice, plus bad inputs."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from kdcore.data import examples, movielens
from kdcore.data.spec import load_spec
from kdcore.errors import DataError, StorageError
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part


@pytest.fixture(scope="session")
def ml_source() -> Path:
    return movielens.fetch_widedeep_copy()


@pytest.fixture(scope="session")
def ml_root(tmp_path_factory, ml_source) -> str:
    root = str(tmp_path_factory.mktemp("ml"))
    movielens.publish(root, ml_source)
    return root


def _files_digest(root: str) -> dict[str, str]:
    base = Path(root)
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file()}


def test_publishes_213_days_with_all_rows(ml_root, ml_source):
    spec = load_spec(movielens.SPEC_PATH)
    days = examples.list_days(ml_root, "movielens")
    assert len(days) == 213
    raw = pq.read_table(ml_source / "MovieLens100k_data.parquet.brotli")
    raw_days = raw["timestamp"].to_numpy().astype("datetime64[s]").astype("datetime64[D]")
    want = dict(zip(*np.unique(raw_days, return_counts=True)))
    total, ids = 0, []
    for d in days:
        t = examples.read_day(ml_root, spec, d)
        assert t.num_rows == want[np.datetime64(d)], d
        got_days = pc.cast(pc.cast(t["timestamp"], pa.timestamp("s", tz="UTC")), pa.date32())
        assert set(got_days.to_pylist()) == {d}
        total += t.num_rows
        ids.append(t["example_id"])
    assert total == 100_000
    all_ids = pa.chunked_array(ids)
    assert pc.count_distinct(all_ids).as_py() == 100_000
    t = examples.read_day(ml_root, spec, days[0])
    assert set(spec.required_columns) <= set(t.column_names)
    assert set(pc.unique(t["like"]).to_pylist()) <= {0, 1}


def test_second_run_is_byte_identical(ml_root, ml_source, tmp_path):
    before = _files_digest(ml_root)
    movielens.publish(ml_root, ml_source)  # same root: a no-op
    assert _files_digest(ml_root) == before
    other = tmp_path / "again"
    movielens.publish(str(other), ml_source)  # fresh root: same bytes
    assert _files_digest(str(other)) == before


def _write_ml100k(dir: Path, ratings: str, users: str | None = None, items: str | None = None) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "u.data").write_text(ratings)
    (dir / "u.user").write_text(users or "1|24|M|technician|85711\n2|53|F|other|94043\n")
    genres = "|".join(["0"] * 18)
    (dir / "u.item").write_text(items or f"10|A (1995)|01-Jan-1995||http://x|1|{genres}\n"
                                          f"20|B (1996)|01-Jan-1996||http://y|0|{genres}\n")
    return dir


def test_official_layout_is_read(tmp_path):
    src = _write_ml100k(tmp_path / "ml-100k", "1\t10\t5\t881250949\n2\t20\t2\t881250950\n1\t20\t4\t891717742\n")
    counts = movielens.publish(str(tmp_path / "root"), src)
    assert sum(counts.values()) == 3 and len(counts) == 2
    t = examples.read_day(str(tmp_path / "root"), load_spec(movielens.SPEC_PATH), dt.date(1997, 12, 4))
    assert t["release_year"].to_pylist() == [1995.0, 1996.0]
    assert t["like"].to_pylist() == [1, 0]


@pytest.mark.parametrize("ratings,users,message", [
    ("1\t10\t5\n", None, "u.data"),                                      # missing column
    ("1\t10\tfive\t881250949\n", None, "u.data"),                         # wrong type
    ("1\t10\t5\t881250949\n1\t10\t4\t881250999\n", None, "duplicate"),     # duplicate ids
    ("1\t10\t5\t881250949\n", "1|old|M|technician|1\n", "u.user"),         # wrong type in users
    ("7\t10\t5\t881250949\n", None, "absent from the users file"),        # dangling user id
])
def test_bad_input_names_the_problem_and_publishes_nothing(tmp_path, ratings, users, message):
    src = _write_ml100k(tmp_path / "bad", ratings, users)
    root = tmp_path / "root"
    with pytest.raises(DataError, match=message):
        movielens.publish(str(root), src)
    assert not root.exists() or not list(root.rglob("_MANIFEST.json"))


def test_unreadable_file_is_named(tmp_path):
    src = tmp_path / "wd"
    src.mkdir()
    for m in movielens.WHEEL_MEMBERS.values():
        (src / Path(m).name).write_bytes(b"not parquet")
    with pytest.raises(DataError, match="MovieLens100k_data.parquet.brotli: unreadable"):
        movielens.publish(str(tmp_path / "root"), src)


def test_publish_day_rejects_contract_violations(tmp_path):
    spec = load_spec(movielens.SPEC_PATH)
    base = {c: [1.0, 2.0] for c in spec.numeric}
    base.update({"example_id": [1, 1], "timestamp": pa.array([1577836800, 1577836801], pa.timestamp("s", tz="UTC")),
                 "user_id": [1, 2], "item_id": [3, 4], "gender": ["M", "F"], "occupation": ["a", "b"],
                 "age_bucket": ["x", "y"], "like": [0, 1], "rating": [1.0, 5.0]})
    root = str(tmp_path)
    with pytest.raises(DataError, match="'example_id' has 1 duplicate"):
        examples.publish_day(root, spec, "2020-01-01", [pa.table(base)])
    no_age = {k: v for k, v in base.items() if k != "age"}
    with pytest.raises(DataError, match="missing column 'age'"):
        examples.publish_day(root, spec, "2020-01-01", [pa.table(no_age)])
    text_rating = dict(base, example_id=[1, 2], rating=["a", "b"])
    with pytest.raises(DataError, match="'rating' must be numeric"):
        examples.publish_day(root, spec, "2020-01-01", [pa.table(text_rating)])
    with pytest.raises(StorageError, match="not published"):
        part.read_manifest(examples.examples_uri(root, "movielens", "2020-01-01"))
    assert sfs.list_files(sfs.normalize(root)) == []

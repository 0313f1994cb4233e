"""One storage-URI parser for the whole project (issue 19): plain local paths are literal
(``#``, ``?``, ``%``, spaces and unicode are path characters), ``file://`` follows RFC 8089
(percent-decoded; a literal ``#``/``?`` refused), the canonical form percent-encodes only
what a path segment cannot hold, and ``gs://`` refuses what an object name cannot hold or
GCS tools misread. Tested down to a whole pipeline day on a root named ``r #1?é``."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from kdcore import cli
from kdcore.config import load_pipeline
from kdcore.data import examples
from kdcore.errors import SpecError, StorageError
from kdcore.labels.store import labels_uri, list_label_versions
from kdcore.models import registry
from kdcore.paths import confine_uri
from kdcore.storage import fs as sfs
from kdcore.storage.manifest import MANIFEST_NAME
from kdcore.storage.partition import (
    list_partitions,
    publish_blobs,
    publish_table,
    read_blob,
    read_table,
    vacuum,
)
from tests.pipeline_fixtures import BOOTSTRAP_DAYS, COPY_DAYS, TINY, copy_root, kd_base  # noqa: F401
from tests.test_storage import stored_files

WEIRD = "r #1?é"
# RFC 3986 path characters: unreserved, sub-delims, ':', '@', '/' and percent-encodings.
PCHARS = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-F]{2})*")
NAMES = [WEIRD, "100%", "a%20b", "x[1]", "tab\tname", "new\nline", "ü ñ 日本", 'quo"te', "<>|^`{}\\", "a=b c;d"]


# ------------------------------------------------------------------ the parser


def test_ordinary_paths_give_the_same_uri_as_before():
    """Records and tests compare URI strings: for ordinary paths nothing is encoded."""
    for path in ("/tmp/kd/examples/movielens/date=2024-01-01", "/r/labels/ds/date=2024-01-01/teacher=v1-abc",
                 "/a/b=c:d@e!f$g&h'i(j)k*l+m,n;o-p.q_r~s"):
        assert sfs.normalize(path) == "file://" + path
        assert sfs.normalize("file://" + path) == "file://" + path
    assert sfs.normalize("/tmp/x/") == "file:///tmp/x" and sfs.normalize("/") == "file:///"
    assert sfs.normalize("rel/p") == "file://" + os.path.abspath("rel/p")
    assert sfs.normalize("gs://kd-test/a/b/") == "gs://kd-test/a/b"


@pytest.mark.parametrize("name", NAMES)
def test_local_paths_round_trip_literally(name, tmp_path):
    path = str(tmp_path / name)
    uri = sfs.normalize(path)
    assert uri.startswith("file://") and PCHARS.fullmatch(uri[len("file://"):]), uri
    assert sfs.local_path(uri) == path
    assert sfs.normalize(uri) == uri  # canonical is a fixed point
    assert sfs.normalize(Path(path).as_uri()) == uri  # Path.as_uri() encodes more ('='), same path
    assert sfs.parse(uri) == ("file", path) == sfs.parse(path)
    assert sfs.local_path(sfs.join(uri, "date=2024-01-01", name)) == f"{path}/date=2024-01-01/{name}"
    assert sfs.resolve(uri)[1] == path


def test_file_uris_are_percent_decoded():
    assert sfs.local_path("file:///tmp/r%20%231%3F%C3%A9") == "/tmp/r #1?é"
    assert sfs.local_path("file:///tmp/a%2520b") == "/tmp/a%20b"
    assert sfs.local_path("file://localhost/tmp/x") == "/tmp/x"
    assert sfs.local_path("file:///tmp/a/../b") == "/tmp/b"
    assert sfs.normalize("/tmp/r #1?é") == "file:///tmp/r%20%231%3F%C3%A9"
    raw = os.fsdecode(b"/tmp/\xff\xfename")  # a file name that is not UTF-8
    assert sfs.normalize(raw) == "file:///tmp/%FF%FEname" and sfs.local_path(sfs.normalize(raw)) == raw


@pytest.mark.parametrize("uri, message", [
    ("file:///tmp/x#y", r"literal '#'.*percent-encode it \(%23\) or pass a plain path"),
    ("file:///tmp/x?y", r"literal '\?'.*percent-encode it \(%3F\) or pass a plain path"),
    ("file://otherhost/tmp/x", r"names host 'otherhost'"),
    ("file:///tmp/a%00b", r"NUL"),
    ("/tmp/a\x00b", r"NUL"),
    ("s3://bucket/x", r"unsupported storage URI 's3://bucket/x'"),
    ("GS://bucket/x", r"unsupported storage URI"),
])
def test_refused_local_forms(uri, message):
    with pytest.raises(StorageError, match=message):
        sfs.normalize(uri)


@pytest.mark.parametrize("uri, message", [
    ("gs://bucket/a/../b", r"^storage URI 'gs://bucket/a/\.\./b' has a '\.\.' segment$"),
    ("gs://bucket/./b", r"has a '\.' segment"),
    ("gs://bucket/a\r\nb", r"control character '\\r' \(U\+000D\)"),
    ("gs://bucket/a\nb", r"control character '\\n' \(U\+000A\)"),
    ("gs://bucket/a\x7fb", r"control character .*U\+007F"),
    ("gs://bucket/a\x85b", r"control character .*U\+0085"),
    ("gs://bucket/a#b", r"'#', which GCS tools read as a fragment"),
    ("gs://bucket/a?b", r"'\?', which GCS tools read as a wildcard or query"),
    ("gs://bucket/a[1]", r"'\[', which GCS tools read as a wildcard"),
    ("gs://bucket/a]", r"'\]'"),
    ("gs://bucket/day*", r"'\*', which GCS tools read as a wildcard"),
    ("gs:///kd", r"'' is not a valid GCS bucket name \(it is empty\)"),
    ("gs://ab/kd", r"'ab' is not a valid GCS bucket name \(it must be 3-63 characters"),
    ("gs://" + "b" * 64 + "/kd", r"not a valid GCS bucket name \(it must be 3-63"),
    ("gs://Bucket/kd", r"'Bucket' is not a valid GCS bucket name \(use a-z"),
    ("gs://-bucket/kd", r"not a valid GCS bucket name \(use a-z"),
    ("gs://bucket-/kd", r"not a valid GCS bucket name"),
    ("gs://a..b/kd", r"not a valid GCS bucket name"),
    ("gs://bu cket/kd", r"not a valid GCS bucket name"),
    ("gs://192.168.0.1/kd", r"IP address"),
    ("gs://goog-data/kd", r"'goog'"),
    ("gs://my-google-data/kd", r"'google'"),
    ("gs://bucket/" + "x" * 1025, r"object name is 1025 bytes; GCS allows at most 1024"),
])
def test_refused_gs_forms(uri, message):
    with pytest.raises(StorageError, match=message) as e:
        sfs.normalize(uri)
    assert "\n" not in str(e.value) and "\r" not in str(e.value)  # one line, whatever the URI holds


def test_gs_object_names_are_literal():
    assert sfs.parse("gs://kd-test/a b/é/x%41/") == ("gs", "kd-test/a b/é/x%41")
    assert sfs.normalize("gs://my.bucket.example/kd") == "gs://my.bucket.example/kd"
    assert sfs.join("gs://kd-test/a b", "c d") == "gs://kd-test/a b/c d"
    with pytest.raises(StorageError, match="not a local path"):
        sfs.local_path("gs://kd-test/x")


def test_confinement_on_the_parser(tmp_path):
    store = tmp_path / WEIRD
    (store / "sub").mkdir(parents=True)
    real = os.path.realpath(store)
    assert confine_uri(str(store / "sub"), [str(store)], "params.root") == sfs.file_uri(real) + "/sub"
    assert confine_uri(Path(store / "sub").as_uri(), [str(store)], "params.root") == sfs.file_uri(real) + "/sub"
    with pytest.raises(SpecError, match=r"params\.root: .*literal '#'"):
        confine_uri(f"file://{store}/sub", [str(store)], "params.root")
    with pytest.raises(SpecError, match="outside the allowed storage root"):
        confine_uri(str(tmp_path / "r "), [str(store)], "params.root")  # what urlparse used to cut it to


# ------------------------------------------------------------------ through storage


def test_partitions_on_a_local_root_with_unusual_characters(tmp_path):
    root = tmp_path / WEIRD
    uri = sfs.join(sfs.normalize(str(root)), "date=2024-01-01")
    table = pa.table({"id": [1, 2, 3]})
    publish_table(uri, table)
    publish_blobs(sfs.join(sfs.normalize(str(root)), "m ü"), {"a b#1.html": b"<p>x</p>"}, keep_names=True)
    assert (root / "date=2024-01-01" / MANIFEST_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIRD]
    assert read_table(uri).equals(table) and list_partitions(str(root)) == ["2024-01-01"]
    assert read_blob(sfs.join(sfs.normalize(str(root)), "m ü"), "a b#1.html") == b"<p>x</p>"
    stray = root / "date=2024-01-01" / "part-00009-0123456789abcdef.parquet"
    stray.write_bytes(b"x")
    assert vacuum(str(root)) == ["date=2024-01-01/part-00009-0123456789abcdef.parquet"] and not stray.exists()


def test_gs_names_with_spaces_and_unicode_round_trip(gcs_emulator):
    """Written by google-cloud-storage, read by pyarrow's GcsFileSystem: both must mean
    the same literal object name."""
    root = f"gs://{gcs_emulator}/{uuid.uuid4().hex}/r 1 é %41"  # '%41' stays three characters
    uri = sfs.join(root, "date=2024-01-01")
    table = pa.table({"id": [1, 2, 3]})
    publish_table(uri, table)
    publish_blobs(sfs.join(root, "m ü"), {"a b.json": b"{}"}, keep_names=True)
    assert read_table(uri).equals(table) and list_partitions(root) == ["2024-01-01"]
    assert read_blob(sfs.join(root, "m ü"), "a b.json") == b"{}"
    names = stored_files(root)
    assert f"date=2024-01-01/{MANIFEST_NAME}" in names and any(n.startswith("m ü/") for n in names)


# ------------------------------------------------------------------ through the CLI


def test_synth_on_a_root_with_a_hash_publishes_every_day_there(tmp_path, capsys):
    root = tmp_path / "x#y"
    rc = cli.main(["data", "synth", "--root", str(root), "--from", "2026-01-01", "--to", "2026-01-03",
                   "--rows-per-day", "100"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out) == {"dataset": "synth", "days": 3, "rows": 300}
    assert [d.isoformat() for d in examples.list_days(str(root), "synth")] == ["2026-01-01", "2026-01-02",
                                                                               "2026-01-03"]
    assert not (tmp_path / "x").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["x#y"]


def test_a_whole_day_on_a_root_named_with_hash_question_mark_space_and_unicode(kd_base, tmp_path, monkeypatch,
                                                                             capsys):
    root = copy_root(kd_base, tmp_path / WEIRD)
    monkeypatch.setenv("KD_STORAGE_ROOT", str(root))
    day = kd_base.days[BOOTSTRAP_DAYS]
    rc = cli.main(["run", "--config", str(TINY), "--from", day.isoformat(), "--to", day.isoformat(), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIRD]  # nothing beside it (no 'r ' folder)

    cfg = load_pipeline(TINY)
    assert cfg.root == sfs.file_uri(str(root)) and sfs.local_path(cfg.root) == str(root)
    assert examples.list_days(cfg.root, "movielens") == kd_base.days[:COPY_DAYS]
    d = f"date={day.isoformat()}"
    assert (root / "quality" / "movielens" / d / MANIFEST_NAME).is_file()  # the gate
    versions = list_label_versions(cfg.root, "movielens", day)
    assert versions and (root / "labels" / "movielens" / d / f"teacher={versions[0]}" / MANIFEST_NAME).is_file()
    assert sfs.local_path(labels_uri(cfg.root, "movielens", day, versions[0])).startswith(str(root) + "/")
    for name in ("teacher", "student_aux", "student_direct", "control"):
        assert (root / "models" / "movielens" / name / d / MANIFEST_NAME).is_file(), name
        assert day in registry.list_checkpoints(cfg.root, "movielens", name)
        meta = registry.find_checkpoint(cfg.root, "movielens", name, day).meta
        assert meta["trained_through"] == day.isoformat()

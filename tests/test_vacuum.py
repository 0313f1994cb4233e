"""``kd vacuum`` never leaves its root (issue 19): symlinks are neither listed nor
followed, only files under a kd partition folder are candidates (a folder with a kd
manifest, or a ``key=value`` sibling of a published one), a root without any kd manifest
is refused, and ``--older-than`` takes only a positive finite duration.

Roots are built the way a user builds them (``kd data synth``) or with the storage API;
file ages are set with ``os.utime``, never waited for."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from kdcore import cli
from kdcore.errors import KDError, StorageError
from kdcore.storage import fs as sfs
from kdcore.storage.manifest import MANIFEST_NAME
from kdcore.storage.partition import parse_duration, publish_table, read_manifest, read_table, vacuum
from tests.pipeline_fixtures import tree_digest
from tests.test_storage import stored_files, write_object

TWO_HOURS_AGO = time.time() - 7200


def _old(path: Path, data: bytes = b"x") -> Path:
    """A file last modified two hours ago (older than vacuum's default hour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (TWO_HOURS_AGO, TWO_HOURS_AGO))
    return path


def _age_all(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.utime(p, (TWO_HOURS_AGO, TWO_HOURS_AGO))


def _kd(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def synth_root(tmp_path, capsys) -> Path:
    """A kd storage root from `kd data synth` (3 days), every file two hours old."""
    root = tmp_path / "root"
    rc, _, err = _kd(["data", "synth", "--root", str(root), "--from", "2026-01-01", "--to", "2026-01-03",
                      "--rows-per-day", "100"], capsys)
    assert rc == 0, err
    _age_all(root)
    return root


def _day(root: Path, day: str) -> Path:
    return root / "examples" / "synth" / f"date={day}"


def test_a_symlink_to_an_outside_folder_is_never_followed(synth_root, tmp_path, capsys):
    # The command: a symlinked folder holding a key=value folder with an old file.
    outside = _old(tmp_path / "o" / "year=2025" / "data.csv")
    (synth_root / "shared_link").symlink_to(tmp_path / "o", target_is_directory=True)
    # Links inside a published partition folder: to an outside file and to an outside folder.
    target = _old(tmp_path / "elsewhere" / "part-00009-0123456789abcdef.parquet")
    (_day(synth_root, "2026-01-01") / "linked.parquet").symlink_to(target)
    (_day(synth_root, "2026-01-01") / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    stray = _old(_day(synth_root, "2026-01-01") / "part-00001-ffffffffffffffff.parquet")  # really ours

    rc, out, err = _kd(["vacuum", "--root", str(synth_root)], capsys)
    assert rc == 0, err
    assert json.loads(out)["removed"] == ["examples/synth/date=2026-01-01/part-00001-ffffffffffffffff.parquet"]
    assert not stray.exists()
    assert outside.read_bytes() == b"x" and target.read_bytes() == b"x"
    assert (_day(synth_root, "2026-01-01") / "linked.parquet").is_symlink()  # a link is not a candidate
    assert (synth_root / "shared_link").is_symlink()


def test_delete_rechecks_the_path_when_it_unlinks(tmp_path):
    """A folder swapped for a symlink after the listing cannot redirect the delete: each
    folder below the root is opened without following links, the file is lstat-ed."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    victim = _old(outside / "b" / "f.parquet")
    (root / "a").mkdir(parents=True)
    (root / "a" / "b").symlink_to(outside / "b", target_is_directory=True)
    assert sfs.delete(sfs.join(sfs.normalize(str(root)), "a/b/f.parquet"), root=str(root)) is False
    (root / "a" / "link.parquet").symlink_to(victim)
    assert sfs.delete(sfs.join(sfs.normalize(str(root)), "a/link.parquet"), root=str(root)) is False
    assert victim.read_bytes() == b"x" and (root / "a" / "link.parquet").is_symlink()
    with pytest.raises(StorageError, match="not under"):
        sfs.delete(sfs.normalize(str(victim)), root=str(root))
    mine = _old(root / "a" / "c" / "f.parquet")
    assert sfs.delete(sfs.normalize(str(mine)), root=str(root)) is True and not mine.exists()


def test_only_kd_partition_folders_are_candidates(synth_root, capsys):
    ex = synth_root / "examples" / "synth"
    # kd's own debris: a superseded file in a published day, a killed first publish of a new
    # day (a key=value sibling of the published days, same key) and its temp file.
    superseded = _old(ex / "date=2026-01-02" / "part-00000-0000000000000000.parquet")
    killed = _old(ex / "date=2026-01-09" / "part-00000-1111111111111111.parquet")
    killed_tmp = _old(ex / "date=2026-01-09" / ".tmp-999999-abc-_MANIFEST.json")
    # Not kd's, whatever the names: another key beside kd's days, a key=value folder whose
    # parent holds no published partition, a lake of the same key elsewhere, a temp file
    # outside any partition folder, notes at the top.
    strangers = [_old(ex / "dt=2025-01-01" / "part-0.parquet"),
                 _old(synth_root / "o" / "year=2025" / "data.csv"),
                 _old(synth_root / "lake" / "events" / "date=2025-01-01" / "part-0.parquet"),
                 _old(synth_root / "scratch" / ".tmp-123-abc-notes.txt"),
                 _old(synth_root / "notes.txt")]

    rc, out, err = _kd(["vacuum", "--root", str(synth_root), "--dry-run"], capsys)
    assert rc == 0, err
    expected = sorted(str(p.relative_to(synth_root)) for p in (superseded, killed, killed_tmp))
    assert sorted(json.loads(out)["would_remove"]) == expected
    assert superseded.exists() and killed.exists()

    rc, out, err = _kd(["vacuum", "--root", str(synth_root)], capsys)
    assert rc == 0, err
    assert sorted(json.loads(out)["removed"]) == expected
    assert not any(p.exists() for p in (superseded, killed, killed_tmp))
    assert all(p.read_bytes() == b"x" for p in strangers)
    assert [d.name for d in sorted(ex.iterdir()) if (d / MANIFEST_NAME).exists()] == [
        "date=2026-01-01", "date=2026-01-02", "date=2026-01-03"]
    assert read_table(sfs.join(sfs.normalize(str(ex)), "date=2026-01-02")).num_rows == 100


def test_dead_shards_and_kept_name_folders_inside_a_partition_go(storage_root):
    """Beside a published shard (same key), a shard whose writer died before its first
    commit is kd's; so is anything unlisted inside a published partition's sub-folders."""
    labels = sfs.join(storage_root, "labels/ds/date=2024-01-01/teacher=t1")
    publish_table(sfs.join(labels, "_shards/shard=000-of-002"), pa.table({"id": [1, 2]}))
    write_object(labels, "_shards/shard=001-of-002/part-00000-2222222222222222.parquet", b"dead")
    write_object(labels, "_shards/other=1/part-00000-3333333333333333.parquet", b"not a shard")
    assert vacuum(storage_root) == ["labels/ds/date=2024-01-01/teacher=t1/_shards/shard=001-of-002/"
                                    "part-00000-2222222222222222.parquet"]
    assert "labels/ds/date=2024-01-01/teacher=t1/_shards/other=1/part-00000-3333333333333333.parquet" in \
        stored_files(storage_root)


def test_a_root_without_a_kd_manifest_is_refused(tmp_path, capsys):
    # The second command: a foreign lake of key=value folders, old files, no kd manifest.
    lake = tmp_path / "lake"
    _old(lake / "events" / "dt=2025-01-01" / "part-0.parquet")
    _old(lake / "events" / "date=2025-01-01" / "part-0.parquet")
    _old(lake / "events" / "date=2025-01-02" / "_MANIFEST.json", b"{not a kd manifest")
    before = tree_digest(lake)
    rc, _, err = _kd(["vacuum", "--root", str(lake)], capsys)
    assert rc == 2
    assert err.strip() == (f"kd: error: {sfs.normalize(str(lake))}: holds no kd partition (no _MANIFEST.json); "
                           f"refusing to vacuum")
    assert tree_digest(lake) == before
    with pytest.raises(StorageError, match="holds no kd partition"):
        vacuum(str(tmp_path / "missing"))


def test_a_gcs_prefix_without_a_kd_manifest_is_refused(gcs_emulator):
    root = f"gs://{gcs_emulator}/lake-{os.getpid()}"
    write_object(root, "events/date=2025-01-01/part-0.parquet", b"x")
    with pytest.raises(StorageError, match="holds no kd partition"):
        vacuum(root)
    assert stored_files(root) == {"events/date=2025-01-01/part-0.parquet"}


@pytest.mark.parametrize("value", ["nan", "-100", "0", "inf", "-inf", "0s", "-2h", "soon", "2 weeks", "h", ""])
def test_older_than_must_be_a_positive_finite_duration(value, synth_root, capsys):
    stray = _old(_day(synth_root, "2026-01-01") / "part-00001-ffffffffffffffff.parquet")
    before = tree_digest(synth_root)
    rc, _, err = _kd(["vacuum", "--root", str(synth_root), f"--older-than={value}"], capsys)
    assert rc == 2
    assert "kd vacuum: error: argument --older-than: " in err and "Traceback" not in err
    assert tree_digest(synth_root) == before and stray.exists()
    with pytest.raises(KDError, match=r"^vacuum: older_than: "):
        vacuum(str(synth_root), older_than=value)


def test_library_older_than_is_checked_too(synth_root):
    for bad in (float("nan"), -100, float("inf"), -0.5):
        with pytest.raises(KDError, match=r"^vacuum: older_than: .* is not a positive finite duration"):
            vacuum(str(synth_root), older_than=bad)
    assert vacuum(str(synth_root), older_than=0) == []  # 0 (the default): nothing unlisted to remove


@pytest.mark.parametrize("text, seconds", [("90", 90.0), ("1.5", 1.5), ("90s", 90.0), ("30m", 1800.0),
                                           ("2h", 7200.0), ("7d", 604800.0), (" 1e3 ", 1000.0), (3600.0, 3600.0)])
def test_durations_in_the_units_people_use(text, seconds):
    assert parse_duration(text) == seconds


def test_older_than_keeps_what_is_younger(synth_root, capsys):
    day = _day(synth_root, "2026-01-01")
    old = _old(day / "part-00001-aaaaaaaaaaaaaaaa.parquet")
    young = day / "part-00002-bbbbbbbbbbbbbbbb.parquet"
    young.write_bytes(b"y")
    os.utime(young, (time.time() - 600, time.time() - 600))  # ten minutes old
    rc, out, err = _kd(["vacuum", "--root", str(synth_root), "--older-than", "30m"], capsys)
    assert rc == 0, err
    assert json.loads(out)["removed"] == [str(old.relative_to(synth_root))]
    assert young.exists()
    assert read_manifest(sfs.join(sfs.normalize(str(synth_root)), "examples/synth/date=2026-01-01")).rows == 100

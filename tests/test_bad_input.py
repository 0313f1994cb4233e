"""Bad input, as a user meets it: each case runs the ``kd`` command line on a real root and
asserts one line naming the file, column, parameter or check, exit status 2, and a storage
listing (every file and its bytes) unchanged by the failed command."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from kdcore import cli
from kdcore.data import examples
from kdcore.models import registry
from kdcore.storage import partition as part
from kdcore.storage.manifest import MANIFEST_NAME
from tests.pipeline_fixtures import KD, TINY, kd, kd_base, local, tree_digest  # noqa: F401  (fixtures)

DATASET = (Path(__file__).resolve().parents[1] / "configs" / "movielens.yaml").as_posix()


def _cfg_variant(kd: KD, tmp: Path, change: Callable[[dict], None], name: str = "variant.yaml") -> str:
    raw = yaml.safe_load(TINY.read_text())
    raw["dataset"] = DATASET
    change(raw)
    path = tmp / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _day_table(kd: KD) -> pa.Table:
    return examples.read_day(kd.cfg.root, kd.cfg.spec, kd.day(1))


def _replace_day(kd: KD, table: pa.Table) -> None:
    """Publish a day behind the contract's back (as a foreign writer could)."""
    part.publish_table(examples.examples_uri(kd.cfg.root, kd.cfg.spec.name, kd.day(1)), table)


def _set(table: pa.Table, column: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), column, values)


def _poke(kd: KD, column: str, value) -> None:
    t = _day_table(kd)
    col = t.column(column).to_numpy(zero_copy_only=False).copy()
    col[2] = value
    _replace_day(kd, _set(t, column, pa.array(col, t.schema.field(column).type)))


def _examples_file(kd: KD) -> Path:
    uri = examples.examples_uri(kd.cfg.root, kd.cfg.spec.name, kd.day(1))
    return local(uri) / part.read_manifest(uri).files[0].path


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _foreign_architecture(kd: KD) -> None:
    """The teacher checkpoint's meta says another architecture than its weights hold."""
    ckpt = registry.find_checkpoint(kd.cfg.root, "movielens", "teacher", kd.B)
    blobs = {f.name: part.read_blob(ckpt.uri, f.name) for f in part.read_manifest(ckpt.uri).files}
    meta = json.loads(blobs[registry.META])
    meta["model"]["hidden"] = [64, 16]
    blobs[registry.META] = (json.dumps(meta, sort_keys=True, indent=1) + "\n").encode()
    part.publish_blobs(ckpt.uri, blobs, part.read_manifest(ckpt.uri).metadata)


def _diverged_teacher(kd: KD) -> None:
    """The teacher's weights became NaN (a diverged refresh that was still published)."""
    from safetensors.torch import load, save

    ckpt = registry.find_checkpoint(kd.cfg.root, "movielens", "teacher", kd.B)
    blobs = {f.name: part.read_blob(ckpt.uri, f.name) for f in part.read_manifest(ckpt.uri).files}
    state = load(blobs[registry.WEIGHTS])
    blobs[registry.WEIGHTS] = save({k: (v * float("nan") if v.is_floating_point() else v) for k, v in state.items()})
    part.publish_blobs(ckpt.uri, blobs, part.read_manifest(ckpt.uri).metadata)


def _foreign_lake(lake: Path) -> Path:
    """A folder of key=value partitions kd never wrote, files two hours old (issue 19)."""
    for rel in ("events/dt=2025-01-01/part-0.parquet", "events/date=2025-01-01/part-0.parquet"):
        (lake / rel).parent.mkdir(parents=True, exist_ok=True)
        (lake / rel).write_bytes(b"x")
        os.utime(lake / rel, (time.time() - 7200, time.time() - 7200))
    return lake


def _truncated_optimizer(kd: KD) -> None:
    """The teacher's optimizer state is cut short, under a manifest that lists it as it is."""
    ckpt = registry.find_checkpoint(kd.cfg.root, "movielens", "teacher", kd.B)
    blobs = {f.name: part.read_blob(ckpt.uri, f.name) for f in part.read_manifest(ckpt.uri).files}
    blobs[registry.OPTIMIZER] = blobs[registry.OPTIMIZER][: len(blobs[registry.OPTIMIZER]) // 2]
    part.publish_blobs(ckpt.uri, blobs, part.read_manifest(ckpt.uri).metadata)


def _timestamp_off_day(kd: KD) -> None:
    """One row of the day carries the next day's timestamp."""
    t = _day_table(kd)
    ts = t.column("timestamp").cast(pa.int64()).to_numpy().copy()
    ts[3] += 86_400
    _replace_day(kd, _set(t, "timestamp", pa.array(ts).cast(t.schema.field("timestamp").type)))


def _yesterdays_labels(kd: KD) -> None:
    """Day 1's labels copied into day 2's folder of the same teacher, ids restarting daily."""
    from tests.pipeline_fixtures import yesterdays_labels_as_today

    yesterdays_labels_as_today(kd)


def _control_as_student_direct(kd: KD) -> None:
    """The control's bootstrap checkpoint copied over student_direct's (its parent for day
    1), with day 1's labels materialized so the student gets as far as its parent."""
    import shutil

    from kdcore.labels import materialize as mat

    mat.materialize(kd.cfg, kd.day(1))
    folder = local(registry.checkpoint_uri(kd.cfg.root, "movielens", "student_direct", kd.B))
    shutil.rmtree(folder)
    shutil.copytree(local(registry.checkpoint_uri(kd.cfg.root, "movielens", "control", kd.B)), folder)


# Each case: (id, setup(kd, tmp) -> argv after `kd`, regex the one-line error must match).
D1 = "{d1}"
CASES: list[tuple[str, Callable[[KD, Path], list[str]], str]] = [
    ("invalid-date", lambda kd, t: ["run", "--config", str(TINY), "--from", "1998-13-01", "--to", "1998-12-01"],
     r"argument --from: invalid date '1998-13-01': expected YYYY-MM-DD"),
    ("unknown-stage", lambda kd, t: ["run", "--config", str(TINY), "--from", D1, "--to", D1, "--stages", "teacher",
                                     "lables"], r"--stages: unknown \['lables'\]; known: \['teacher', 'labels'"),
    ("invalid-date-in-range", lambda kd, t: ["teacher", "refresh", "--config", str(TINY), "--date", "1998-02-30"],
     r"argument --date: invalid date '1998-02-30'"),
    ("binary-label-out-of-range", lambda kd, t: (_poke(kd, "like", 2), ["run", "--config", str(TINY),
                                                 "--from", D1, "--to", D1])[1],
     r"date=" + D1 + r".*column 'like' \(label of task 'like'\) has 1 value\(s\) that are not 0 or 1.*example_id="),
    ("regression-label-out-of-range", lambda kd, t: (_poke(kd, "rating", 0.0), ["teacher", "refresh", "--config",
                                                      str(TINY), "--date", D1])[1],
     r"column 'rating' \(label of task 'rating'\) has 1 value\(s\) that are not finite and within \[1.0, 5.0\]"),
    ("null-label", lambda kd, t: (_replace_day(kd, _set(_day_table(kd), "like", pa.array(
        [None] + _day_table(kd).column("like").to_pylist()[1:], pa.int8()))),
        ["labels", "materialize", "--config", str(TINY), "--date", D1])[1],
     r"column 'like' has null value\(s\) where the label of task 'like' is required"),
    ("infinite-feature", lambda kd, t: (_poke(kd, "release_year", np.inf), ["run", "--config", str(TINY),
                                         "--from", D1, "--to", D1])[1],
     r"column 'release_year' has 1 infinite value\(s\) .*features must be finite or null"),
    ("duplicate-ids", lambda kd, t: (_replace_day(kd, _set(_day_table(kd), "example_id", pa.array(
        np.zeros(_day_table(kd).num_rows, dtype=np.int64)))), ["run", "--config", str(TINY), "--from", D1,
                                                               "--to", D1])[1],
     r"column 'example_id' has \d+ duplicate id\(s\)"),
    ("empty-day", lambda kd, t: (_replace_day(kd, _day_table(kd).slice(0, 0)),
                                 ["run", "--config", str(TINY), "--from", D1, "--to", D1])[1],
     r"date=" + D1 + r": the day has no rows"),
    ("missing-column", lambda kd, t: (_replace_day(kd, _day_table(kd).drop_columns(["hour"])),
                                      ["run", "--config", str(TINY), "--from", D1, "--to", D1])[1],
     r"missing column 'hour' required by dataset spec 'movielens'"),
    ("string-numeric-column", lambda kd, t: (_replace_day(kd, _set(_day_table(kd), "age", _day_table(kd).column(
        "age").cast(pa.string()))), ["run", "--config", str(TINY), "--from", D1, "--to", D1])[1],
     r"column 'age' must be numeric, found string"),
    ("schema-change-between-days", lambda kd, t: (_replace_day(kd, _set(_day_table(kd), "hour", _day_table(kd).column(
        "hour").cast(pa.float64()))), ["run", "--config", str(TINY), "--from", D1, "--to", D1])[1],
     r"column 'hour' is double on " + D1 + r" but \w+ on "),
    ("file-missing-from-manifest", lambda kd, t: (_examples_file(kd).unlink(),
                                                  ["run", "--config", str(TINY), "--from", D1, "--to", D1])[1],
     r"part-00000-\w+\.parquet: listed in .*_MANIFEST\.json but missing"),
    ("bit-flip-in-examples", lambda kd, t: (_flip(_examples_file(kd)),
                                            ["run", "--config", str(TINY), "--from", D1, "--to", D1])[1],
     r"part-00000-\w+\.parquet: corrupt .*checksum does not match"),
    ("unreadable-examples-file", lambda kd, t: ((lambda p: (p.unlink(), p.mkdir()))(_examples_file(kd)),
                                                ["run", "--config", str(TINY), "--from", D1, "--to", D1])[1],
     r"part-00000-\w+\.parquet: cannot read"),
    ("corrupt-manifest", lambda kd, t: ((local(examples.examples_uri(kd.cfg.root, "movielens", kd.day(1)))
                                         / MANIFEST_NAME).write_text("{not json"),
                                        ["teacher", "refresh", "--config", str(TINY), "--date", D1])[1],
     r"_MANIFEST\.json: corrupt manifest"),
    ("checkpoint-of-another-architecture", lambda kd, t: (_foreign_architecture(kd),
                                                          ["labels", "materialize", "--config", str(TINY),
                                                           "--date", D1])[1],
     r"models/movielens/teacher/date=\S+: checkpoint does not fit dataset 'movielens'.*do not match the model config"),
    ("diverged-teacher", lambda kd, t: (_diverged_teacher(kd), ["labels", "materialize", "--config", str(TINY),
                                                                "--date", D1])[1],
     r"teacher teacher-\d{8}-\w+ predicts \d+ non-finite value\(s\) for task '\w+' on " + D1
     + r"; labels not published"),
    ("parent-of-another-config", lambda kd, t: ["teacher", "refresh", "--date", D1, "--config", _cfg_variant(
        kd, t, lambda c: c["teacher"]["model"].update(hidden=[16]))],
     r"parent's model config differs from the pipeline config; start a new model name or bootstrap again"),
    ("unwritable-root", lambda kd, t: ((t / "file").write_text("x"),
                                       ["data", "synth", "--root", str(t / "file" / "root"), "--from", "2026-01-01",
                                        "--to", "2026-01-01", "--rows-per-day", "100"])[1],
     r"file/root/examples/synth/date=2026-01-01/\S+: cannot write \(.*\); nothing was published"),
    ("no-examples-for-date", lambda kd, t: ["teacher", "refresh", "--config", str(TINY), "--date", "2030-01-01"],
     r"no examples published for 2030-01-01 \(.*examples/movielens/date=2030-01-01\)"),
    ("no-examples-in-range", lambda kd, t: ["run", "--config", str(TINY), "--from", "2030-01-01",
                                            "--to", "2030-01-02"],
     r"no example partitions between 2030-01-01 and 2030-01-02"),
    ("unknown-student", lambda kd, t: ["student", "train", "--config", str(TINY), "--name", "nobody",
                                       "--date", D1],
     r"unknown student 'nobody'; configured: \["),
    ("labels-not-materialized", lambda kd, t: ["student", "train", "--config", str(TINY), "--name", "student_aux",
                                               "--date", D1],
     r"labels of teacher teacher-\d{8}-\w+ for " + D1 + r" are not materialized .*kd labels materialize"),
    ("malformed-shard", lambda kd, t: ["labels", "materialize", "--config", str(TINY), "--date", D1,
                                       "--shard", "3of4"],
     r"argument --shard: --shard must look like i/n, got '3of4'"),
    ("malformed-teacher-version", lambda kd, t: ["labels", "materialize", "--config", str(TINY), "--date", D1,
                                                 "--teacher-version", "bogus"],
     r"malformed model version 'bogus': expected <name>-<YYYYMMDD>-<hash>"),
    ("missing-config-file", lambda kd, t: ["run", "--config", str(t / "nope.yaml"), "--from", D1, "--to", D1],
     r"nope\.yaml"),
    ("config-yaml-syntax", lambda kd, t: ((t / "broken.yaml").write_text("teacher: [unclosed\n"),
                                          ["run", "--config", str(t / "broken.yaml"), "--from", D1, "--to", D1])[1],
     r"broken\.yaml"),
    ("config-unknown-key", lambda kd, t: ["run", "--from", D1, "--to", D1, "--config", _cfg_variant(
        kd, t, lambda c: c["teacher"]["model"].update(hiden=[4]))],
     r"variant\.yaml.*hiden"),
    ("privileged-feature-for-student", lambda kd, t: ["run", "--from", D1, "--to", D1, "--config", _cfg_variant(
        kd, t, lambda c: c["students"][0]["model"].update(features=["item_id", "gender"]))],
     r"gender"),
    ("dataset-name-dot-dot", lambda kd, t: ((t / "spec.yaml").write_text(
        Path(DATASET).read_text().replace("name: movielens", "name: ..")),
        ["run", "--from", D1, "--to", D1, "--config", _cfg_variant(kd, t, lambda c: c.update(
            dataset=str(t / "spec.yaml")))])[1],
     r"spec\.yaml.*name"),
    ("gs-uri-with-dot-dot", lambda kd, t: ["vacuum", "--root", "gs://bucket/a/../b"],
     r"storage URI 'gs://bucket/a/\.\./b' has a '\.\.' segment"),
    # issue 19: storage confinement
    ("vacuum-foreign-lake", lambda kd, t: ["vacuum", "--root", str(_foreign_lake(t / "lake"))],
     r"/lake: holds no kd partition \(no _MANIFEST\.json\); refusing to vacuum"),
    ("vacuum-older-than-nan", lambda kd, t: ["vacuum", "--root", str(kd.root), "--older-than", "nan"],
     r"argument --older-than: 'nan' is not a positive finite duration"),
    ("vacuum-older-than-negative", lambda kd, t: ["vacuum", "--root", str(kd.root), "--older-than", "-100"],
     r"argument --older-than: '-100' is not a positive finite duration"),
    ("vacuum-older-than-zero", lambda kd, t: ["vacuum", "--root", str(kd.root), "--older-than", "0"],
     r"argument --older-than: '0' is not a positive finite duration"),
    ("file-uri-with-literal-hash", lambda kd, t: ["data", "synth", "--root", f"file://{t}/x#y", "--from",
                                                  "2026-01-01", "--to", "2026-01-03", "--rows-per-day", "100"],
     r"storage URI 'file://.*/x#y' has a literal '#'.*percent-encode it \(%23\) or pass a plain path"),
    ("gs-uri-with-wildcard", lambda kd, t: ["vacuum", "--root", "gs://bucket/kd/day*"],
     r"storage URI 'gs://bucket/kd/day\*' has '\*', which GCS tools read as a wildcard"),
    ("gs-uri-with-newline", lambda kd, t: ["vacuum", "--root", "gs://bucket/kd\nx"],
     r"storage URI 'gs://bucket/kd\\nx' has control character '\\n' \(U\+000A\)"),
    ("gs-invalid-bucket", lambda kd, t: ["vacuum", "--root", "gs://My_Bucket/kd"],
     r"'My_Bucket' is not a valid GCS bucket name"),
    # issue 19: inputs that claimed to be something they are not
    ("truncated-optimizer-state", lambda kd, t: (_truncated_optimizer(kd), ["teacher", "refresh", "--config",
                                                                             str(TINY), "--date", D1])[1],
     r"optimizer\.safetensors: optimizer state of teacher-\d{8}-\w+ cannot be restored"),
    ("feature-beyond-float32", lambda kd, t: (_poke(kd, "release_year", 3e38), ["run", "--config", str(TINY),
                                                "--from", D1, "--to", D1])[1],
     r"column 'release_year' has 1 value\(s\) beyond \+/-1e\+18, e\.g\. 3e\+38 .*rescale the column"),
    ("timestamp-on-another-day", lambda kd, t: (_timestamp_off_day(kd), ["run", "--config", str(TINY),
                                                "--from", D1, "--to", D1])[1],
     r"date=" + D1 + r".*column 'timestamp' has 1 timestamp\(s\) outside " + D1 + r" \(UTC\), e\.g\. "),
    ("synth-rows-per-day-unbounded", lambda kd, t: ["data", "synth", "--root", str(t / "s"), "--from", "2026-01-01",
                                                    "--to", "2026-01-01", "--rows-per-day", "2000000000"],
     r"rows_per_day.*100000000"),
    ("synth-reversed-range", lambda kd, t: ["data", "synth", "--root", str(t / "s"), "--from", "2026-01-07",
                                            "--to", "2026-01-01", "--rows-per-day", "100"],
     r"--from 2026-01-07 is after --to 2026-01-01: the date range is reversed"),
    ("run-reversed-range", lambda kd, t: ["run", "--config", str(TINY), "--from", kd.day(2).isoformat(),
                                          "--to", D1],
     r"--from \S+ is after --to " + D1 + r": the date range is reversed"),
    ("bootstrap-negative-days", lambda kd, t: ["bootstrap", "--config", str(TINY), "--through", D1,
                                               "--days", "-4"],
     r"argument --days: must be a positive number of days, got -4"),
    ("refresh-before-bootstrap", lambda kd, t: ["teacher", "refresh", "--config", str(TINY), "--date",
                                                kd.days[0].isoformat()],
     r"'teacher' has no checkpoint before \S+: its first is trained through .*bootstrap again"),
    # issue 19: inputs (labels checked against the day they are used for, checkpoints against their model)
    ("labels-of-the-day-before-student", lambda kd, t: (_yesterdays_labels(kd), [
        "student", "train", "--config", str(TINY), "--name", "student_aux", "--date", kd.day(2).isoformat()])[1],
     r"labels at \S+/labels/movielens/date=\S+/teacher=teacher-\d{8}-\w+ are for " + D1
     + r" \(examples \w{12}\) but are used for \S+ \(examples \w{12}\); re-materialize them"),
    ("labels-of-the-day-before-gate", lambda kd, t: (_yesterdays_labels(kd), [
        "run", "--config", str(TINY), "--from", kd.day(2).isoformat(), "--to", kd.day(2).isoformat(), "--stages",
        "gate", "students"])[1],
     r"labels at \S+/labels/movielens/date=\S+/teacher=teacher-\d{8}-\w+ are for " + D1
     + r" \(examples \w{12}\) but are used for \S+ \(examples \w{12}\); re-materialize them"),
    ("checkpoint-of-another-model-as-parent", lambda kd, t: (_control_as_student_direct(kd), [
        "student", "train", "--config", str(TINY), "--name", "student_direct", "--date", D1])[1],
     r"models/movielens/student_direct/date=\S+ holds a checkpoint of 'control' \(dataset movielens, trained "
     r"through \S+, version control-\d{8}-\w+\); refusing it as student_direct's"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_exit_2_and_nothing_changed(case, kd: KD, tmp_path, capsys):
    name, setup, pattern = case
    d1 = kd.day(1).isoformat()
    side = tmp_path / "side"
    side.mkdir()
    argv = [a.replace(D1, d1) for a in setup(kd, side)]
    pattern = pattern.replace(D1, re.escape(d1))
    before, side_before = tree_digest(kd.root), tree_digest(side)
    spools = set(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"kd-publish-{os.getpid()}-*"))
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (name, err)
    assert "Traceback" not in err
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=[\r\n]))kd( [\w-]+)*: error: ", err)]
    assert len(starts) == 1, (name, err)  # one error, however much progress was printed before it
    message = err[starts[0]:].strip()
    assert re.search(pattern, message, re.S), f"{name}: {message!r} does not match {pattern!r}"
    assert tree_digest(kd.root) == before, f"{name}: the failed command changed the storage root"
    assert tree_digest(side) == side_before, f"{name}: the failed command left files behind"
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"kd-publish-{os.getpid()}-*")) == spools


@pytest.mark.parametrize("values, expected", [
    (pa.array([7, 1, 2, 7, 7], pa.int64()), (2, 7)),
    (pa.array([5, 4, 3], pa.int32()), (0, None)),
    (pa.array(["a", "b", "a"]), (1, "a")),
    (pa.array(["a", "b"]), (0, None)),
])
def test_duplicate_ids_counts_repeats_and_names_one(values, expected):
    from kdcore.data.examples import duplicate_ids

    assert duplicate_ids(values) == expected

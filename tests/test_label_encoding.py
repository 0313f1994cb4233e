"""Declared teacher-label encodings: every codec respects (and nearly reaches) its recorded
error bound, the bound and the measured error are in the manifest, float32 written
byte-stream-split beats the old dictionary encoding, an unknown encoding is refused naming
`labels.encoding`, and students train from encoded labels end to end."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import yaml

from kdcore.config import LabelsConfig, PipelineConfig
from kdcore.data.spec import Task
from kdcore.errors import DataError, SpecError
from kdcore.labels import encoding as enc
from kdcore.labels import materialize as mat
from kdcore.labels.join import read_labels
from kdcore.models import registry
from kdcore.quality.labels_check import check_labels
from kdcore.storage import partition as part
from kdcore.training import steps
from kdcore.training.data import load_days
from kdcore.yamlconf import validate
from tests.pipeline_fixtures import KD, TINY, kd, kd_base  # noqa: F401  (fixtures)

LIKE = Task(name="like", kind="binary")
RATING = Task(name="rating", kind="regression", min=1, max=5)
UNBOUNDED = Task(name="minutes", kind="regression")


def _probabilities(n: int = 200_000) -> np.ndarray:
    """Dense over [0, 1] and over logits, with the clipped extremes: the worst case of
    every codec is reached somewhere."""
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 1, n), 1 / (1 + np.exp(-rng.normal(0, 4, n))), [0.0, 1.0, 1e-7]])
    return p.astype(np.float32)


def _with_labels(kd: KD, **kw) -> PipelineConfig:
    cfg = kd.cfg.model_copy(update={"labels": LabelsConfig(**{**kd.cfg.labels.model_dump(), **kw})})
    cfg._base = kd.cfg._base
    return cfg


@pytest.mark.parametrize("encoding", enc.ENCODINGS)
@pytest.mark.parametrize("task", [LIKE, RATING, UNBOUNDED], ids=lambda t: t.name)
def test_round_trip_respects_a_tight_bound(encoding, task):
    values = _probabilities() if task.kind == "binary" else \
        np.random.default_rng(1).uniform(1, 5, 200_000).astype(np.float32)
    codec = enc.codec_for(task, encoding)
    stored = enc.encode(values, codec)
    assert stored.type.equals(enc.storage_type(codec))
    err = enc.measured_error(values, stored, codec)
    bound = codec["max_abs_error"]
    assert err <= bound
    if encoding == "float32" or task is UNBOUNDED:  # exact: no lossy codec has an absolute bound here
        assert codec["encoding"] == "float32" and bound == 0.0 and err == 0.0
    else:
        assert err >= 0.9 * bound, f"bound {bound} is loose: measured {err}"
    decoded = enc.decode(stored.to_numpy(zero_copy_only=False), codec)
    assert decoded.dtype == np.float32
    lo, hi = (0.0, 1.0) if task.kind == "binary" else (task.min, task.max)
    if lo is not None:
        assert decoded.min() >= lo and decoded.max() <= hi


def test_issue_goal_float16_under_1e3():
    """The issue's target: <= 1e-3 in probability for the <= 2 bytes/example/task codecs."""
    assert enc.codec_for(LIKE, "float16")["max_abs_error"] <= 1e-3
    assert enc.codec_for(LIKE, "float16_logit")["max_abs_error"] <= 1e-3
    assert enc.codec_for(LIKE, "uint8_logit")["max_abs_error"] < 0.01


def _bytes_per_row(tmp_path, name: str, table: pa.Table, options: dict | None) -> float:
    m = part.publish_table(str(tmp_path / name), table) if options is None else \
        part.publish_batches(str(tmp_path / name), table.schema, [table], parquet_options=options)
    return m.bytes / table.num_rows


def test_float32_byte_stream_split_beats_dictionary_and_ids_delta_encode(tmp_path, spec):
    p = _probabilities(100_000)
    n = len(p)
    ids = pa.array(np.arange(10**9, 10**9 + n, dtype=np.int64))
    ratings = np.random.default_rng(2).uniform(1, 5, n).astype(np.float32)
    table = pa.table({"example_id": ids, "like": p, "rating": ratings})
    options = enc.parquet_options(table.schema, spec)
    assert options["column_encoding"]["example_id"] == "DELTA_BINARY_PACKED"
    dictionary = _bytes_per_row(tmp_path, "dict", table, None)
    split = _bytes_per_row(tmp_path, "bss", table, options)
    assert split < 0.75 * dictionary, (split, dictionary)
    only_ids = _bytes_per_row(tmp_path, "ids", table.select(["example_id"]),
                              enc.parquet_options(table.select(["example_id"]).schema,
                                                  spec.model_copy(update={"tasks": []})))
    assert only_ids < 0.05
    # the options change the layout only: same values back, checksums verified on read
    assert part.read_table(str(tmp_path / "bss")).equals(table)


@pytest.fixture
def spec():
    from kdcore.data.movielens import SPEC_PATH
    from kdcore.data.spec import load_spec

    return load_spec(SPEC_PATH)


def test_unknown_encoding_is_refused_naming_the_key():
    data = yaml.safe_load(TINY.read_text())
    data["labels"] = {**data["labels"], "encoding": "int4"}
    with pytest.raises(SpecError, match=r"labels\.encoding"):
        validate(PipelineConfig, data, "tiny.yaml")
    data["labels"] = {"logit_eps": 0.5}
    with pytest.raises(SpecError, match=r"labels\.logit_eps"):
        validate(PipelineConfig, data, "tiny.yaml")


def test_strict_decode_refuses_codes_stored_as_another_type(spec):
    meta = {enc.METADATA_KEY: enc.codecs(spec, "uint8_logit")}
    table = pa.table({"example_id": pa.array([1, 2], pa.int64()), "like": pa.array([0.1, 0.2], pa.float32()),
                      "rating": pa.array([3, 4], pa.uint8())})
    with pytest.raises(DataError, match="'like' is stored as float"):
        enc.decode_labels(table, meta, spec)
    lenient = enc.decode_labels(table, meta, spec, strict=False)  # the gate counts it as a dtype error
    assert lenient.column("like").type == pa.float32() and lenient.column("rating").type == pa.float32()


def test_encoded_labels_end_to_end(kd: KD):
    """uint8_logit labels: the manifest records codec, bound and measured error; readers
    get float32 within the bound of the exact labels; the gate's checks see valid
    floats; changing the encoding recomputes the labels and retrains the student."""
    D = kd.day(1)
    exact = mat.materialize(kd.cfg, D)
    ref, ref_meta = read_labels(exact["uri"], kd.cfg.spec)
    assert ref_meta[enc.METADATA_KEY]["like"]["encoding"] == "float32"
    student = steps.student_step(kd.cfg, "student_direct", D, exact["uri"])

    cfg = _with_labels(kd, encoding="uint8_logit")
    out = mat.materialize(cfg, D)
    assert out["uri"] == exact["uri"] and out["changed"] is True and not out.get("reused")
    assert out["bytes"] < exact["bytes"]
    m = part.read_manifest(out["uri"])
    assert [str(f.type) for f in m.schema] == ["int64", "uint8", "uint8"]
    codecs, measured = m.metadata[enc.METADATA_KEY], m.metadata[enc.MEASURED_KEY]
    assert codecs["like"]["encoding"] == "uint8_logit" and codecs["rating"]["encoding"] == "uint8_linear"
    table, _ = read_labels(out["uri"], cfg.spec)
    for task in ("like", "rating"):
        assert table.column(task).type == pa.float32()
        err = float(np.max(np.abs(table.column(task).to_numpy() - ref.column(task).to_numpy())))
        assert err == pytest.approx(measured[task], abs=1e-7) and err <= codecs[task]["max_abs_error"]
    assert table.column("example_id").equals(ref.column("example_id"))
    # reused under the same encoding
    assert mat.materialize(cfg, D)["reused"] is True

    data = load_days(cfg.root, cfg.spec, [D]).table
    decoded = enc.decode_labels(part.read_table(out["uri"]), m.metadata, cfg.spec, strict=False)
    checks = check_labels(decoded, data, cfg.spec, staleness_days=1)
    assert all(v.dtype_ok and v.n_invalid == 0 for v in checks.validity.values())

    again = steps.student_step(cfg, "student_direct", D, out["uri"])
    assert again.get("reused") is not True and again["version"] != student["version"]
    meta = registry.find_checkpoint(cfg.root, "movielens", "student_direct", D).meta
    assert meta["kd_applied"] is True and meta["labels_missing"] == 0

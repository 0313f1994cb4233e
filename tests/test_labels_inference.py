"""Labelling at the compute bound: cached/vectorized hashing gives the very buckets of
the per-value blake2b, a shard reads only the files holding its rows, and labels are
bitwise the same for any shard count, read chunk and file layout."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from kdcore.config import LabelsConfig
from kdcore.data import examples
from kdcore.data.validate import ensure_valid
from kdcore.labels import materialize as mat
from kdcore.labels.join import read_labels
from kdcore.models.features import (
    NULL_BUCKET,
    BucketCache,
    FeatureSet,
    encode_features,
    hash_categorical,
    hash_value,
)
from kdcore.models.inference import predict
from kdcore.storage import partition as part
from tests.pipeline_fixtures import KD, kd, kd_base  # noqa: F401  (fixtures)

# ---------------------------------------------------------------- hashing


def _reference(arr: pa.Array, buckets: int, salt: str) -> list[int]:
    """The definition, one Python value at a time: null and NaN -> 0, else hash_value."""
    out = []
    for v in arr.to_pylist():
        nan = isinstance(v, float) and v != v
        out.append(NULL_BUCKET if v is None or nan else hash_value(v, buckets, salt))
    return out


def _columns() -> dict[str, pa.Array]:
    rng = np.random.default_rng(7)
    ints = rng.integers(-(2**40), 2**40, 3000)
    ints[::7] = rng.integers(0, 50, len(ints[::7]))  # repeats across batches (cache hits)
    mask = rng.random(3000) < 0.1
    words = ["", "a", "A", "é", "e\u0301", "日本語", "🙂", "NULL", "None", "1", "1.0", "True", " x ", "tab\t"]
    cols: dict[str, pa.Array] = {
        "int64": pa.array(ints, mask=mask),
        "int64_extremes": pa.array([-(2**63), 2**63 - 1, 0, -1, None], pa.int64()),
        "uint64_big": pa.array([2**64 - 1, 2**63, 5, None], pa.uint64()),
        "str": pa.array([words[i % len(words)] + (str(i % 97) if i % 3 else "") for i in range(3000)], mask=mask),
        "large_str": pa.array(words + [None], pa.large_string()),
        "float": pa.array([0.0, -0.0, 1.0, 1.5, float("nan"), None, float("inf"), -float("inf"), 1e300]),
        "bool": pa.array([True, False, None, True]),
        "date": pa.array([0, 19000, None], pa.date32()),
    }
    for t in (pa.int8(), pa.int16(), pa.int32(), pa.uint8(), pa.uint16(), pa.uint32()):
        cols[str(t)] = pa.array(rng.integers(0, 100, 500), mask=rng.random(500) < 0.1).cast(t)
    return cols


@pytest.mark.parametrize("buckets", [2, 97, 50_000])
def test_cached_hashing_equals_per_value_blake2b(buckets):
    cache = BucketCache()  # one cache across every column and batch, as a shard uses it
    for name, arr in _columns().items():
        want = _reference(arr, buckets, name)
        assert hash_categorical(arr, buckets, name).tolist() == want, name  # fresh cache
        got = [hash_categorical(arr.slice(i, 400), buckets, name, cache) for i in range(0, len(arr), 400)]
        assert np.concatenate(got).tolist() == want, name  # cache shared across batches
        again = hash_categorical(pa.chunked_array([arr.slice(0, 3), arr.slice(3)]), buckets, name, cache)
        assert again.tolist() == want, name  # all hits now


def test_ints_of_any_width_and_their_strings_share_buckets():
    cache = BucketCache()
    a = hash_categorical(pa.array([7, 300, None], pa.int16()), 1000, "u", cache)
    assert a.tolist() == hash_categorical(pa.array([7, 300, None], pa.int64()), 1000, "u").tolist()
    assert a.tolist() == hash_categorical(pa.array(["7", "300", None]), 1000, "u", cache).tolist()
    # The same digits under another salt or bucket count are another bucket set.
    assert hash_categorical(pa.array([7, 300], pa.int64()), 1000, "v", cache).tolist() == [
        hash_value(7, 1000, "v"), hash_value(300, 1000, "v")]


def test_dictionary_column_with_duplicate_and_unused_entries():
    dictionary = pa.array(["b", "a", "b", "unused", None, "c"])
    indices = pa.array([0, 1, 2, None, 4, 5, 0], pa.int32())
    arr = pa.DictionaryArray.from_arrays(indices, dictionary)
    want = _reference(pc.cast(arr, pa.string()), 64, "item")
    assert hash_categorical(arr, 64, "item", BucketCache()).tolist() == want


def test_encode_features_with_cache_equals_without(kd: KD):
    spec = kd.cfg.spec
    table = part.read_table(examples.examples_uri(kd.cfg.root, spec.name, kd.B))
    cache = BucketCache()
    parts = [encode_features(table.slice(i, 37), spec, 2048, cache=cache) for i in range(0, table.num_rows, 37)]
    whole = encode_features(table, spec, 2048)
    np.testing.assert_array_equal(np.concatenate([p.cat for p in parts]), whole.cat)
    np.testing.assert_array_equal(np.concatenate([p.num for p in parts]), whole.num)


# ---------------------------------------------------------------- reading a row range


def _count_files(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = part._parquet

    def counting(uri, manifest, entry, verify):
        seen.append(entry.path)
        return real(uri, manifest, entry, verify)

    monkeypatch.setattr(part, "_parquet", counting)
    return seen


def test_row_range_reads_only_overlapping_files(tmp_path, monkeypatch):
    table = pa.table({"id": pa.array(range(1000), pa.int64()), "x": pa.array(np.arange(1000) * 0.5)})
    uri = str(tmp_path / "p")
    # 100-row files, each written as 30-row batches (several row groups per file).
    m = part.publish_batches(uri, table.schema, table.to_batches(max_chunksize=30), max_rows_per_file=100)
    assert len(m.files) == 10
    seen = _count_files(monkeypatch)
    for lo, hi in [(0, 1000), (0, 0), (250, 251), (99, 101), (100, 200), (333, 777), (999, 1000), (950, 5000)]:
        seen.clear()
        got = pa.Table.from_batches(list(part.iter_row_range(uri, lo, hi, batch_size=17)), schema=table.schema)
        assert got.equals(table.slice(lo, max(min(hi, 1000) - lo, 0))), (lo, hi)
        wanted = [m.files[i].path for i in range(lo // 100, -(-min(hi, 1000) // 100))] if hi > lo else []
        assert seen == wanted, (lo, hi)
    # Still verified: a corrupted file inside the range is refused.
    from kdcore.errors import StorageError
    from tests.pipeline_fixtures import local

    victim = local(uri) / m.files[3].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    assert sum(b.num_rows for b in part.iter_row_range(uri, 0, 300)) == 300  # file 3 not read
    with pytest.raises(StorageError, match="corrupt"):
        list(part.iter_row_range(uri, 0, 301))


# ---------------------------------------------------------------- sharded labelling


def _labels_cfg(kd: KD, **labels):
    cfg = kd.cfg.model_copy(update={"labels": LabelsConfig(**labels)})
    cfg._base = kd.cfg._base
    return cfg


def test_labels_bitwise_identical_for_any_shard_count_and_chunk(kd: KD, monkeypatch):
    """The day is re-published in many small files; shards of it read only their files
    and the labels equal the teacher's forward on the whole day cut on the same grid."""
    spec, day = kd.cfg.spec, kd.day(1)
    uri = examples.examples_uri(kd.cfg.root, spec.name, day)
    table = part.read_table(uri)
    examples.publish_day(kd.cfg.root, spec, day, table.to_batches(max_chunksize=23), max_rows_per_file=40)
    manifest = part.read_manifest(uri)
    n, files = manifest.rows, len(manifest.files)
    assert files >= 6, f"day {day} has {n} rows: too few for this test"

    infer = 16
    teacher = mat.choose_teacher(kd.cfg, day)
    model = teacher.load(spec)
    feats = encode_features(table, spec, model.config.hash_buckets, FeatureSet.of(spec, model.config.features))
    want = mat.clip_to_range(predict(model, feats, batch_rows=infer), spec)

    # Validation reads the whole day once per process (the DAG's validate task; cached by
    # the examples digest): count only what labelling itself reads.
    ensure_valid(kd.cfg.root, spec, day)
    seen = _count_files(monkeypatch)
    results = {}
    for shards, batch_rows in [(1, 10_000), (3, 50), (5, 16), (3, 7)]:
        cfg = _labels_cfg(kd, shards=shards, batch_rows=batch_rows, inference_rows=infer)
        for i in range(shards):
            seen.clear()
            mat.materialize_shard(cfg, day, i, shards)
            lo, hi = mat._shard_range(n, i, shards)
            a, b = mat._inference_span(lo, hi, n, infer)
            assert len(seen) == len(set(seen)) == len(range(a // 40, -(-b // 40))), (shards, i, seen)
        out = mat.commit(cfg, day, teacher.version, shards)
        labels, _ = read_labels(out["uri"], spec)
        results[(shards, batch_rows)] = labels
        assert labels.column("example_id").equals(table.column("example_id"))
        for t in spec.tasks:
            got = labels.column(t.name).to_numpy()
            assert got.tobytes() == want[t.name].astype(np.float32).tobytes(), (shards, batch_rows, t.name)
    first = next(iter(results.values()))
    assert all(r.equals(first) for r in results.values())


def test_inference_span_is_on_the_grid():
    assert mat._inference_span(0, 10, 10, 4) == (0, 10)
    assert mat._inference_span(5, 9, 100, 4) == (4, 12)
    assert mat._inference_span(8, 8, 100, 4) == (8, 8)
    assert mat._inference_span(97, 100, 100, 8) == (96, 100)

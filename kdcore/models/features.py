"""Arrow data -> model inputs (hashed categorical ids, numeric matrix, labels).

Teacher and students run in different processes on different days and must agree on
which embedding row a value maps to, so categorical hashing is keyed blake2b over the
value's string form, never Python's per-process salted `hash()`. Only the distinct
values of a column are bucketed (blake2b once per value per ``BucketCache``); rows are
mapped with a vectorized take.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdcore.data.spec import DatasetSpec
from kdcore.errors import DataError

NULL_BUCKET = 0
_BLAKE2B_MAX_KEY = 64

Data = pa.Table | pa.RecordBatch


@dataclass(frozen=True)
class FeatureSet:
    """The columns one model reads, in spec order. Teachers may read privileged features;
    students read serving features only, so the teacher can know what a student cannot."""

    categorical: tuple[str, ...]
    numeric: tuple[str, ...]

    @classmethod
    def of(cls, spec: DatasetSpec, names: list[str] | None = None) -> FeatureSet:
        """The spec's features restricted to ``names`` (all when None), in spec order."""
        if names is not None:
            unknown = [c for c in names if c not in spec.feature_columns]
            if unknown:
                raise DataError(f"features {unknown} are not features of dataset '{spec.name}' "
                                f"(known: {spec.feature_columns})")
        keep = set(spec.feature_columns if names is None else names)
        return cls(tuple(c for c in spec.categorical if c in keep), tuple(c for c in spec.numeric if c in keep))

    @property
    def names(self) -> list[str]:
        return [*self.categorical, *self.numeric]


@dataclass(frozen=True)
class Features:
    """Model inputs for N rows, columns in spec order.

    cat: int64 [N, n_cat] bucket ids (0 = null); num: float32 [N, n_num], nulls as NaN
    under the `mean` null policy (the model imputes its normalizer mean), 0 under `zero`.
    """

    cat: np.ndarray
    num: np.ndarray

    def __len__(self) -> int:
        return int(self.cat.shape[0])


def _hash_key(salt: str) -> bytes:
    """blake2b keys are at most 64 bytes; longer feature names are digested first so
    every name still yields a distinct, stable key."""
    key = salt.encode("utf-8")
    if len(key) > _BLAKE2B_MAX_KEY:
        key = hashlib.blake2b(key, digest_size=_BLAKE2B_MAX_KEY).digest()
    return key


def hash_value(value: object, buckets: int, salt: str) -> int:
    """Bucket of one non-null value: 1 + blake2b_8(str(value), key=salt) mod (buckets-1).

    `str()` of the Python value is the string form, so int32 and int64 columns holding
    the same ids hash identically.
    """
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8, key=_hash_key(salt)).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


def _hash_strings(strings: list[str], buckets: int, salt: str) -> list[int]:
    """``hash_value`` of many string forms with the key derived once (the loop is the
    cost of labelling a day's new ids)."""
    key, mod, blake2b, from_bytes = _hash_key(salt), buckets - 1, hashlib.blake2b, int.from_bytes
    return [1 + from_bytes(blake2b(s.encode("utf-8"), digest_size=8, key=key).digest(), "little") % mod
            for s in strings]


class BucketCache:
    """Buckets of values already hashed, per column, carried across the batches of a run.

    A day's ids repeat across batches (popular items are in every one), so blake2b runs
    once per distinct value per run instead of once per distinct value per batch. Integer
    values live in sorted numpy arrays and are looked up with ``searchsorted``; other
    values are keyed by ``str(value)``, exactly the bytes ``hash_value`` digests, so a
    cached bucket can never differ from a fresh one (1 vs 1.0 vs True vs "1" stay apart).
    Entries are a pure function of (salt, buckets, value): sharing is always safe."""

    def __init__(self) -> None:
        self._ints: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._strs: dict[tuple[str, int], dict[str, int]] = {}

    def int_buckets(self, values: np.ndarray, buckets: int, salt: str) -> np.ndarray:
        """Buckets of distinct int64 ``values``; only values not seen before are hashed."""
        keys, vals = self._ints.get((salt, buckets), (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        pos = np.searchsorted(keys, values)
        hit = pos < len(keys)
        hit[hit] = keys[pos[hit]] == values[hit]
        out = np.empty(len(values), np.int64)
        out[hit] = vals[pos[hit]]
        miss = values[~hit]
        if len(miss):
            new = np.array(_hash_strings([str(v) for v in miss.tolist()], buckets, salt), np.int64)
            out[~hit] = new
            keys, vals = np.concatenate([keys, miss]), np.concatenate([vals, new])
            order = np.argsort(keys, kind="stable")
            self._ints[(salt, buckets)] = keys[order], vals[order]
        return out

    def str_buckets(self, values: list[object], buckets: int, salt: str) -> np.ndarray:
        """Buckets of distinct non-null Python values, keyed by their string form."""
        known = self._strs.setdefault((salt, buckets), {})
        keys = [str(v) for v in values]
        new = [k for k in dict.fromkeys(keys) if k not in known]
        known.update(zip(new, _hash_strings(new, buckets, salt), strict=True))
        return np.array([known[k] for k in keys], np.int64)


def _distinct_buckets(values: pa.Array, buckets: int, salt: str, cache: BucketCache) -> np.ndarray:
    """Bucket of each entry of ``values`` (a column's distinct values or a dictionary);
    null and float NaN -> NULL_BUCKET."""
    out = np.full(len(values), NULL_BUCKET, np.int64)
    if pa.types.is_floating(values.type):
        valid = pc.and_kleene(pc.is_valid(values), pc.invert(pc.is_nan(values)))
    else:
        valid = pc.is_valid(values)
    valid_np = valid.to_numpy(zero_copy_only=False).astype(bool)
    present = values.filter(valid)
    t = values.type
    if pa.types.is_integer(t) and not pa.types.is_uint64(t):
        # str() of any integer width is its decimal form, so the int64 view hashes alike.
        out[valid_np] = cache.int_buckets(present.cast(pa.int64()).to_numpy(), buckets, salt)
    else:
        out[valid_np] = cache.str_buckets(present.to_pylist(), buckets, salt)
    return out


def hash_categorical(arr: pa.Array | pa.ChunkedArray, buckets: int, salt: str,
                     cache: BucketCache | None = None) -> np.ndarray:
    """Map a column to int64 bucket ids in [1, buckets); null (and float NaN) -> 0.

    Stable across processes, runs and machines; any value, seen before or not, lands in
    range, so new items at serving time need no vocabulary update. Only distinct values
    (a dictionary column's dictionary, else the column's ``dictionary_encode``) are
    bucketed, through ``cache`` when given; rows are mapped with a numpy take.
    """
    if buckets < 2:
        raise ValueError(f"buckets must be >= 2 (0 is reserved for null), got {buckets}")
    cache = cache if cache is not None else BucketCache()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], type=arr.type)
    if not pa.types.is_dictionary(arr.type):
        # NaN is folded into null by _distinct_buckets; encoding it as a value is harmless.
        arr = pc.dictionary_encode(arr)
    # A stored dictionary may hold unused or duplicate entries: each entry is bucketed by
    # its value, so duplicates agree and unused ones cost one lookup.
    lookup = np.concatenate([[NULL_BUCKET], _distinct_buckets(arr.dictionary, buckets, salt, cache)])
    indices = pc.fill_null(arr.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return lookup[indices + 1]


def _column(data: Data, name: str, role: str) -> pa.Array | pa.ChunkedArray:
    if name not in data.schema.names:
        raise DataError(f"column '{name}' ({role}) is missing; data has columns {data.schema.names}")
    return data.column(name)


def _is_numeric(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_decimal(t) or pa.types.is_null(t))


def _to_float(data: Data, name: str, role: str) -> np.ndarray:
    """float64 values of a numeric column with nulls as NaN."""
    col = _column(data, name, role)
    if not _is_numeric(col.type):
        raise DataError(f"column '{name}' ({role}) must be numeric, got type {col.type}")
    return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def encode_features(data: Data, spec: DatasetSpec, hash_buckets: int, columns: FeatureSet | None = None,
                    cache: BucketCache | None = None) -> Features:
    """Encode the model's features (all of the spec's when ``columns`` is None). Numeric
    nulls follow the spec's per-feature policy: `mean` keeps NaN for the model to impute
    with its normalizer mean (a null is "typical", not a -140 sigma zero), `zero` writes
    0.0, `error` refuses the data. +-inf is left alone for the data-quality checks.
    Pass one ``cache`` to every batch of a run so repeated ids are hashed once."""
    columns = columns or FeatureSet.of(spec)
    n = data.num_rows
    cat = np.zeros((n, len(columns.categorical)), dtype=np.int64)
    for j, name in enumerate(columns.categorical):
        col = _column(data, name, "categorical feature")
        try:
            cat[:, j] = hash_categorical(col, hash_buckets, salt=name, cache=cache)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as e:
            raise DataError(f"column '{name}' (categorical feature) of type {col.type} "
                            f"cannot be hashed: {e}") from None
    num = np.zeros((n, len(columns.numeric)), dtype=np.float32)
    for j, name in enumerate(columns.numeric):
        values = _to_float(data, name, "numeric feature")
        nulls = np.isnan(values)
        policy = spec.null_policy(name)
        if policy == "error" and nulls.any():
            raise DataError(f"column '{name}' (numeric feature) has {int(nulls.sum())} null/NaN value(s) "
                            f"and its null policy is 'error' (spec field nulls.{name})")
        num[:, j] = np.where(nulls, 0.0, values) if policy == "zero" else values
    return Features(cat=cat, num=num)


def encode_labels(data: Data, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """float32 hard labels by task name. Nulls stay NaN: a missing label is a data
    problem for the quality gate, not something to paper over with a made-up value."""
    return {t.name: _to_float(data, t.label_column, f"label of task '{t.name}'").astype(np.float32)
            for t in spec.tasks}

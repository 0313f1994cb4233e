"""Arrow data -> model inputs (hashed categorical ids, numeric matrix, labels).

Teacher and students run in different processes on different days and must agree on
which embedding row a value maps to, so categorical hashing is keyed blake2b over the
value's string form, never Python's per-process salted `hash()`. Only the distinct
values of a column go through Python; rows are mapped with a vectorized take.
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


def _as_array(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], type=arr.type)
    if pa.types.is_dictionary(arr.type):
        # Re-encode from the values: a stored dictionary may contain unused or duplicate entries.
        arr = pc.cast(arr, arr.type.value_type)
    return arr


def hash_categorical(arr: pa.Array | pa.ChunkedArray, buckets: int, salt: str) -> np.ndarray:
    """Map a column to int64 bucket ids in [1, buckets); null (and float NaN) -> 0.

    Stable across processes, runs and machines; any value, seen before or not, lands in
    range, so new items at serving time need no vocabulary update.
    """
    if buckets < 2:
        raise ValueError(f"buckets must be >= 2 (0 is reserved for null), got {buckets}")
    arr = _as_array(arr)
    if pa.types.is_floating(arr.type):
        arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
    encoded = pc.dictionary_encode(arr)
    distinct = encoded.dictionary.to_pylist()
    lookup = np.empty(len(distinct) + 1, dtype=np.int64)
    lookup[0] = NULL_BUCKET
    lookup[1:] = [hash_value(v, buckets, salt) for v in distinct]
    indices = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
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


def encode_features(data: Data, spec: DatasetSpec, hash_buckets: int, columns: FeatureSet | None = None) -> Features:
    """Encode the model's features (all of the spec's when ``columns`` is None). Numeric
    nulls follow the spec's per-feature policy: `mean` keeps NaN for the model to impute
    with its normalizer mean (a null is "typical", not a -140 sigma zero), `zero` writes
    0.0, `error` refuses the data. +-inf is left alone for the data-quality checks."""
    columns = columns or FeatureSet.of(spec)
    n = data.num_rows
    cat = np.zeros((n, len(columns.categorical)), dtype=np.int64)
    for j, name in enumerate(columns.categorical):
        col = _column(data, name, "categorical feature")
        try:
            cat[:, j] = hash_categorical(col, hash_buckets, salt=name)
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

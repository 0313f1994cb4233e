"""How teacher labels are stored: a declared, bounded-error encoding per task.

Labels are written once and read by every student each day, and dictionary-encoded
float32 costs ~5.4 bytes per example and task (teacher outputs are almost all unique, so
the dictionary only adds indices). Each encoding here is a codec with a worst-case
absolute error (probability for binary tasks, task units for regression) computed from
its parameters alone; that bound and the error actually measured on the day go into the
labels manifest, and readers decode through :func:`decode_labels` so every consumer still
gets float32 values.

Per declared ``labels.encoding`` and task kind, the codec used:

================  ===================  ==========================  ====================
encoding          binary               regression with min & max   unbounded regression
================  ===================  ==========================  ====================
float32           float32 (exact)      float32 (exact)             float32 (exact)
float16           float16              float16                     float32
bfloat16          bfloat16 (uint16)    bfloat16 (uint16)           float32
float16_logit     float16 of logit(p)  float16                     float32
uint8_logit       uint8, linear in     uint8 linear in [min, max]  float32
                  logit(p) in +-L
================  ===================  ==========================  ====================

An unbounded regression task has no absolute error bound under any lossy codec, so it
stays exact float32 (the recorded bound is then 0). Logit codecs clip p to
[eps, 1 - eps] (``labels.logit_eps``) first; that clipping is part of the bound.
Every label column is written with BYTE_STREAM_SPLIT and no dictionary (smallest for
all codecs, measured in bench/bench_label_bytes.py).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdcore.data.spec import DatasetSpec, Task
from kdcore.errors import DataError

Encoding = Literal["float32", "float16", "bfloat16", "float16_logit", "uint8_logit"]
ENCODINGS: tuple[str, ...] = ("float32", "float16", "bfloat16", "float16_logit", "uint8_logit")
DEFAULT_LOGIT_EPS = 1e-4
METADATA_KEY = "label_encoding"  # per task: codec, storage type, parameters, max_abs_error (a bound)
MEASURED_KEY = "label_measured_error"  # per task: max |decoded - teacher output| on the day

_STORAGE = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16(),
            "float16_logit": pa.float16(), "uint8_logit": pa.uint8(), "uint8_linear": pa.uint8()}
_F32_HALF_ULP_1 = 2.0 ** -24  # rounding a decoded value in [0, 1] to float32
_FLOAT16_MAX = 65504.0


def _range(task: Task) -> tuple[float | None, float | None]:
    return (0.0, 1.0) if task.kind == "binary" else (task.min, task.max)


def _half_ulp(magnitude: float, mantissa_bits: int, min_exp: int) -> float:
    """Worst rounding error of a float with ``mantissa_bits`` for values of |x| < magnitude
    (exclusive: a power of two at the top of the range is itself exact)."""
    below = float(np.nextafter(magnitude, 0.0))
    exp = max(math.floor(math.log2(below)), min_exp) if below > 0 else min_exp
    return 2.0 ** (exp - mantissa_bits - 1)


def _float16_logit_bound(clip: float, eps: float) -> float:
    """float16 rounds z = logit(p) by h_k = 2^(k-11) in binade [2^k, 2^(k+1)); sigma'(z) is
    at most sigma'(2^k - h_k) there, so the probability moves by at most h_k times that.
    A clipped p in [0, eps] decodes to sigma(-L +- h_L): within eps * e^h_L."""
    worst = 0.0
    for k in range(-14, math.floor(math.log2(clip)) + 1):
        h = 2.0 ** (k - 11)
        z = max(2.0 ** k - h, 0.0)
        s = 1.0 / (1.0 + math.exp(-z))
        worst = max(worst, h * s * (1.0 - s))
    h_top = _half_ulp(2.0 ** (math.floor(math.log2(clip)) + 1), 10, -14)
    return max(worst, eps * math.exp(h_top)) + _F32_HALF_ULP_1


def codec_for(task: Task, encoding: str, eps: float = DEFAULT_LOGIT_EPS) -> dict[str, Any]:
    """The codec of one task as manifest metadata: everything a reader needs to decode
    (never the config, which may have changed since), plus the worst-case error."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown label encoding {encoding!r}; known: {list(ENCODINGS)}")
    lo, hi = _range(task)
    bounded = lo is not None and hi is not None
    if encoding == "float32" or not bounded:
        return {"encoding": "float32", "storage": "float", "max_abs_error": 0.0}
    assert lo is not None and hi is not None
    mag = max(abs(lo), abs(hi))
    rng = {"min": float(lo), "max": float(hi)}
    if task.kind == "binary" and encoding in ("float16_logit", "uint8_logit"):
        clip = math.log((1.0 - eps) / eps)
        if encoding == "uint8_logit":
            half_step = clip / 255.0  # codes 0..255 span [-L, L]
            bound = max(eps, math.tanh(half_step / 4.0)) + _F32_HALF_ULP_1
        else:
            bound = _float16_logit_bound(clip, eps)
        return {"encoding": encoding, "storage": str(_STORAGE[encoding]), "logit_eps": eps, "logit_clip": clip,
                **rng, "max_abs_error": bound}
    if encoding == "uint8_logit":  # regression: linear codes over the declared range
        bound = (hi - lo) / 255.0 / 2.0 + mag * 2.0 ** -24
        return {"encoding": "uint8_linear", "storage": "uint8", **rng, "max_abs_error": bound}
    if encoding in ("float16", "float16_logit"):
        if mag > _FLOAT16_MAX:
            return {"encoding": "float32", "storage": "float", "max_abs_error": 0.0}
        return {"encoding": "float16", "storage": "halffloat", **rng, "max_abs_error": _half_ulp(mag, 10, -14)}
    return {"encoding": "bfloat16", "storage": "uint16", **rng, "max_abs_error": _half_ulp(mag, 7, -126)}


def codecs(spec: DatasetSpec, encoding: str, eps: float = DEFAULT_LOGIT_EPS) -> dict[str, dict[str, Any]]:
    return {t.name: codec_for(t, encoding, eps) for t in spec.tasks}


def storage_type(codec: dict[str, Any]) -> pa.DataType:
    return _STORAGE[codec["encoding"]]


def _logit(p: np.ndarray, eps: float) -> np.ndarray:
    p = np.clip(p.astype(np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def encode(values: np.ndarray, codec: dict[str, Any]) -> pa.Array:
    """Teacher outputs (finite, already clipped to the task's range) to the stored array."""
    name = codec["encoding"]
    v = np.asarray(values, dtype=np.float32)
    if name == "float32":
        return pa.array(v, pa.float32())
    if name == "float16":
        return pa.array(v.astype(np.float16), pa.float16())
    if name == "bfloat16":  # top 16 bits of the float32, rounded to nearest even
        bits = v.view(np.uint32).astype(np.uint64)
        return pa.array(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16), pa.uint16())
    if name == "float16_logit":
        return pa.array(_logit(v, codec["logit_eps"]).astype(np.float16), pa.float16())
    if name == "uint8_logit":
        clip = codec["logit_clip"]
        codes = np.rint((np.clip(_logit(v, codec["logit_eps"]), -clip, clip) + clip) * (255.0 / (2.0 * clip)))
        return pa.array(codes.astype(np.uint8), pa.uint8())
    lo, hi = codec["min"], codec["max"]  # uint8_linear
    codes = np.rint((np.clip(v.astype(np.float64), lo, hi) - lo) * (255.0 / (hi - lo)))
    return pa.array(codes.astype(np.uint8), pa.uint8())


def decode(stored: np.ndarray, codec: dict[str, Any]) -> np.ndarray:
    """Stored values to float32 task values, clipped to the declared range (rounding must
    not push a label outside it: the quality gate counts those as invalid)."""
    name = codec["encoding"]
    if name == "float32":
        return stored.astype(np.float32, copy=False)
    if name == "float16":
        out = stored.astype(np.float64)
    elif name == "bfloat16":
        out = (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    elif name == "float16_logit":
        out = 1.0 / (1.0 + np.exp(-stored.astype(np.float64)))
    elif name == "uint8_logit":
        clip = codec["logit_clip"]
        out = 1.0 / (1.0 + np.exp(-(stored.astype(np.float64) * (2.0 * clip / 255.0) - clip)))
    else:  # uint8_linear
        out = codec["min"] + stored.astype(np.float64) * ((codec["max"] - codec["min"]) / 255.0)
    return np.clip(out, codec["min"], codec["max"]).astype(np.float32)


def measured_error(values: np.ndarray, stored: pa.Array, codec: dict[str, Any]) -> float:
    """Max |decoded - original| over a batch (0.0 for an empty one)."""
    if not len(values):
        return 0.0
    dec = decode(stored.to_numpy(zero_copy_only=False), codec).astype(np.float64)
    return float(np.max(np.abs(dec - np.asarray(values, dtype=np.float32).astype(np.float64))))


def decode_labels(table: pa.Table, metadata: dict[str, Any], spec: DatasetSpec, strict: bool = True) -> pa.Table:
    """The labels table with every encoded task column decoded to float32, using the codecs
    recorded in the manifest ``metadata`` (labels written before encodings existed have
    none and are float32 already). A column whose stored type is not its codec's is an
    error when ``strict`` (a student must never read codes as probabilities); otherwise
    it is left raw, for the quality gate to count as a dtype error."""
    declared = metadata.get(METADATA_KEY) or {}
    for t in spec.tasks:
        codec = declared.get(t.name)
        if codec is None or t.name not in table.column_names or codec["encoding"] == "float32":
            continue
        col = table.column(t.name)
        want = storage_type(codec)
        if not col.type.equals(want):
            if strict:
                raise DataError(f"teacher labels column '{t.name}' is stored as {col.type}, but the manifest "
                                f"declares encoding {codec['encoding']} ({want})")
            continue
        col = col.combine_chunks()
        values = decode(pc.fill_null(col, 0).to_numpy(zero_copy_only=False), codec)
        mask = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else None  # nulls stay nulls
        i = table.column_names.index(t.name)
        table = table.set_column(i, pa.field(t.name, pa.float32()), pa.array(values, pa.float32(), mask=mask))
    return table


def parquet_options(schema: pa.Schema, spec: DatasetSpec) -> dict[str, Any]:
    """Column encodings for a labels file: byte-stream-split label columns (teacher outputs
    are unique floats, a dictionary of them only adds indices) and a delta-encoded
    integer id (ids of a day are near-sequential: ~0.01 byte per example)."""
    enc = {t.name: "BYTE_STREAM_SPLIT" for t in spec.tasks}
    if pa.types.is_integer(schema.field(spec.example_id).type):
        enc[spec.example_id] = "DELTA_BINARY_PACKED"
    return {"use_dictionary": [c for c in schema.names if c not in enc], "column_encoding": enc}

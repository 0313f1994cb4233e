"""A synthetic daily ranking stream with known drift and an optional sudden shift.

Real logs cannot be scaled up at will, and their shifts are neither known nor controlled.
This generator produces days of any size (10M+ rows, batch by batch, bounded memory)
whose labels come from a latent model we own: user and item vectors, slow preference
drift, and, from `shift_date` on, a sudden change that makes a teacher trained before it
biased after it. That lets tests and benchmarks ask "does distillation recover?" with a
ground truth.

Determinism: everything per user/item is a hash of (seed, id), so an item keeps its
vector as the catalogue grows; everything per row comes from a numpy stream seeded by
(seed, day ordinal, batch number). The same config and day always give identical
batches; `batch_rows` is part of that identity (a different batch size draws differently).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import lru_cache

import numpy as np
import pyarrow as pa
from pydantic import Field

from kdcore.data.spec import DatasetSpec, Task
from kdcore.errors import SpecError
from kdcore.yamlconf import Strict

__all__ = ["SYNTH_SCHEMA", "SynthConfig", "dataset_spec", "generate_day"]

ROW_ID_SPAN = 10**10  # example_id = day_index * ROW_ID_SPAN + row
MAX_ROWS_PER_DAY = 100_000_000
LATENT_DIM = 8
N_DENSE = 5  # f0..f4: noisy views of the first latent interaction terms
N_FLIPPED = 4  # latent dims whose effect the shift reverses (f0..f3 visibly flip)
DEVICES = ("ios", "android", "web", "tv")
DEVICE_EFFECT = np.array([0.10, 0.0, -0.25, 0.15], dtype=np.float32)
SEGMENTS = ("light", "regular", "heavy", "power")
SEGMENT_EDGES = np.array([0.5, 1.5, 3.0])  # on the Exp(1) activity draw
# Relative traffic per UTC hour: quiet nights, an evening peak.
HOURLY_TRAFFIC = np.array([2, 1.5, 1, 0.8, 0.8, 1, 2, 3, 4, 4.5, 5, 5, 5.5, 5, 5, 5.5, 6, 7, 8,
                           9, 9, 8, 6, 3.5], dtype=np.float64)
US_PER_DAY = 86_400_000_000
_TV = DEVICES.index("tv")  # longer sessions on the big screen

# Hash salts: one independent "stream" per per-entity attribute.
_S_USER_POP, _S_USER_DEV, _S_USER_VEC, _S_USER_DRIFT = 1, 2, 3, 5
_S_ITEM_POP, _S_ITEM_AGE, _S_ITEM_PRICE, _S_ITEM_VEC = 11, 12, 13, 15


class SynthConfig(Strict):
    """Knobs of the synthetic stream; see the module docstring for what each drives."""

    seed: int = Field(0, ge=0)
    # 100M rows is ~10 GB of examples a day, far past any test or benchmark here: a larger
    # value is a typo (2e9 streamed 6.9 GB before anyone noticed), not a request.
    rows_per_day: int = Field(10_000, ge=1, le=MAX_ROWS_PER_DAY)
    batch_rows: int = Field(262_144, ge=1)
    n_users: int = Field(100_000, ge=1)
    n_items: int = Field(20_000, ge=1)
    new_items_per_day: int = Field(200, ge=0)
    zipf_a: float = Field(1.1, gt=0)  # popularity skew of users/items
    drift_per_day: float = 0.02  # radians per day that user preferences rotate
    start_date: date = date(2026, 1, 1)  # day index 0
    shift_date: date | None = None  # sudden shift from this date on (flips f0..f3, lifts CTR)
    shift_strength: float = Field(1.0, ge=0)


def dataset_spec() -> DatasetSpec:
    """The contract of the stream; configs/synth.yaml ships the same spec (a test checks)."""
    return DatasetSpec(
        name="synth",
        example_id="example_id",
        timestamp="timestamp",
        group="user_id",
        categorical=["user_id", "item_id", "device", "user_segment"],
        numeric=["hour", "user_activity", "item_age_days", "item_popularity", "price",
                 *[f"f{j}" for j in range(N_DENSE)]],
        tasks=[Task(name="click", kind="binary"),
               Task(name="watch_time", kind="regression", min=0.0, transform=["log1p", "standardize"],
                    loss_weight=0.5, served=False)],
        privileged=[f"f{j}" for j in range(N_DENSE)],
    )


SYNTH_SCHEMA = pa.schema([
    ("example_id", pa.int64()),
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("user_id", pa.int64()),
    ("item_id", pa.int64()),
    ("device", pa.string()),
    ("user_segment", pa.string()),
    ("hour", pa.int32()),
    ("user_activity", pa.float32()),
    ("item_age_days", pa.float32()),
    ("item_popularity", pa.float32()),
    ("price", pa.float32()),
    *[(f"f{j}", pa.float32()) for j in range(N_DENSE)],
    ("click", pa.int8()),
    ("watch_time", pa.float32()),
])


# --- deterministic per-entity attributes ------------------------------------------------

def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a bijective, well-mixing uint64 hash (wraps mod 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_uniform(ids: np.ndarray, seed: int, salt: int, dims: int = 0) -> np.ndarray:
    """Uniform(0, 1) per id (shape (n,) or (n, dims)), a pure function of (seed, salt, id)."""
    key = _splitmix64(np.array([(seed * 1_000_003 + salt) % 2**64], dtype=np.uint64))
    x = ids.astype(np.uint64)
    if dims:
        x = x[:, None] * np.uint64(dims) + np.arange(dims, dtype=np.uint64)
    z = _splitmix64(_splitmix64(x ^ key))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _hash_normal(ids: np.ndarray, seed: int, salt: int, dims: int) -> np.ndarray:
    """Standard normals per (id, dim) via Box-Muller on two hashed uniform streams."""
    u1 = _hash_uniform(ids, seed, salt, dims)
    u2 = _hash_uniform(ids, seed, salt + 100, dims)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def _pareto_exponent(ids: np.ndarray, seed: int, salt: int, n_ref: int) -> np.ndarray:
    """Exp(1) draws e, capped at log(n_ref): weights exp(a*e) = u**-a rank like Zipf(a).

    The cap keeps the single luckiest id from owning the stream (it is the weight the
    top rank would get among n_ref ids)."""
    return np.minimum(-np.log(_hash_uniform(ids, seed, salt)), math.log(max(n_ref, 2)))


def _traffic_z(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Standardise x under the traffic weights, so a label effect of c * z shifts the
    logit of an average *row* by c, whatever the skew (heavy ids dominate the rows)."""
    mean = np.average(x, weights=weight)
    std = math.sqrt(max(np.average((x - mean) ** 2, weights=weight), 1e-12))
    return ((x - mean) / std).astype(np.float32)


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


@dataclass(frozen=True)
class _Users:
    activity: np.ndarray  # Exp(1) draw; log traffic weight = zipf_a * activity
    activity_z: np.ndarray  # activity standardised over traffic (what rows actually see)
    segment: np.ndarray  # int8 index into SEGMENTS
    device: np.ndarray  # int8 preferred device
    vec: np.ndarray  # (n, LATENT_DIM) preferences at day 0
    drift_vec: np.ndarray  # (n, LATENT_DIM) direction preferences rotate towards
    cdf: np.ndarray  # unnormalised cumulative traffic weights


@lru_cache(maxsize=4)
def _users(seed: int, n_users: int, zipf_a: float) -> _Users:
    ids = np.arange(n_users, dtype=np.int64)
    e = _pareto_exponent(ids, seed, _S_USER_POP, n_users)
    weight = np.exp(zipf_a * (e - e.max()))
    users = _Users(
        activity=e.astype(np.float32),
        activity_z=_traffic_z(e, weight),
        segment=np.searchsorted(SEGMENT_EDGES, e).astype(np.int8),
        device=(_hash_uniform(ids, seed, _S_USER_DEV) * len(DEVICES)).astype(np.int8),
        vec=_hash_normal(ids, seed, _S_USER_VEC, LATENT_DIM),
        drift_vec=_hash_normal(ids, seed, _S_USER_DRIFT, LATENT_DIM),
        cdf=np.cumsum(weight),
    )
    _readonly(users.activity, users.activity_z, users.segment, users.device, users.vec, users.drift_vec, users.cdf)
    return users


@dataclass(frozen=True)
class _Items:
    popularity: np.ndarray  # log traffic weight, including the new-item boost
    base_pop_z: np.ndarray  # long-run popularity standardised over traffic
    age: np.ndarray  # whole days since the item appeared
    log_price: np.ndarray  # standard normal; price = exp(3 + 0.6 * log_price)
    vec: np.ndarray  # (n, LATENT_DIM)
    cdf: np.ndarray


@lru_cache(maxsize=2)
def _items(seed: int, n_items: int, new_per_day: int, zipf_a: float, day_index: int) -> _Items:
    """The catalogue on a day: the initial items plus `new_per_day` ids per day so far."""
    n = n_items + new_per_day * day_index
    ids = np.arange(n, dtype=np.int64)
    initial_age = 1 + np.floor(_hash_uniform(ids, seed, _S_ITEM_AGE) * 730)  # up to 2 years old
    birth = np.where(ids < n_items, -initial_age, (ids - n_items) // max(new_per_day, 1) + 1)
    age = (day_index - birth).astype(np.float32)
    e = _pareto_exponent(ids, seed, _S_ITEM_POP, n_items)
    popularity = zipf_a * e + np.log1p(4.0 * np.exp(-age / 2.0))  # fresh items get exposure
    weight = np.exp(popularity - popularity.max())
    items = _Items(
        popularity=popularity.astype(np.float32),
        base_pop_z=_traffic_z(e, weight),
        age=age,
        log_price=_hash_normal(ids, seed, _S_ITEM_PRICE, 1)[:, 0].copy(),
        vec=_hash_normal(ids, seed, _S_ITEM_VEC, LATENT_DIM),
        cdf=np.cumsum(weight),
    )
    _readonly(items.popularity, items.base_pop_z, items.age, items.log_price, items.vec, items.cdf)
    return items


# --- per-row generation --------------------------------------------------------------

def _day_index(cfg: SynthConfig, day: date) -> int:
    idx = (day - cfg.start_date).days
    if idx < 0:
        raise SpecError(f"synth: day {day} is before start_date {cfg.start_date}")
    return idx


def _sample(cdf: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n i.i.d. indices drawn with the weights behind the unnormalised cumulative `cdf`.

    Searching sorted uniforms walks the table in order (~4x faster than random probes,
    which miss cache); a shuffle then restores independence from the row position.
    """
    u = np.sort(rng.random(n))
    idx = np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1)
    rng.shuffle(idx)
    return idx


_HOUR_CDF = np.concatenate([[0.0], np.cumsum(HOURLY_TRAFFIC) / HOURLY_TRAFFIC.sum()])
_HOUR_SECONDS = np.arange(25, dtype=np.float64) * 3600.0
_HOUR_EFFECT = (0.25 * np.sin(2 * np.pi / 24 * (np.arange(24) - 14))).astype(np.float32)


def _latent_weights(strength: float) -> np.ndarray:
    """Per-dim weight of the user-item interaction; a shift of strength 1 reverses the
    first N_FLIPPED dims (0.5 cancels them), so f0..f3 change the sign of their effect."""
    w = np.ones(LATENT_DIM, dtype=np.float32)
    w[:N_FLIPPED] = 1.0 - 2.0 * strength
    return w / np.float32(math.sqrt(LATENT_DIM))


def _batch(cfg: SynthConfig, day: date, day_idx: int, users_t: np.ndarray, items: _Items,
           batch_no: int, row0: int, n: int) -> pa.RecordBatch:
    """Rows [row0, row0 + n) of the day, from the batch's own random stream."""
    users = _users(cfg.seed, cfg.n_users, cfg.zipf_a)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, day.toordinal()],
                                                       spawn_key=(batch_no,)))
    shifted = cfg.shift_date is not None and day >= cfg.shift_date
    strength = cfg.shift_strength if shifted else 0.0  # also raises the base click rate
    f32 = np.float32

    # Time: stratified over the day's traffic curve, so timestamps increase with the row.
    rows = np.arange(row0, row0 + n, dtype=np.int64)
    q = (rows + rng.random(n)) / cfg.rows_per_day
    seconds = np.interp(q, _HOUR_CDF, _HOUR_SECONDS)
    day_us = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 1_000_000
    ts = day_us + np.minimum((seconds * 1e6).astype(np.int64), US_PER_DAY - 1)
    hour = np.minimum(seconds // 3600, 23).astype(np.int32)

    uid = _sample(users.cdf, rng, n)
    iid = _sample(items.cdf, rng, n)
    device = np.where(rng.random(n) < 0.85, users.device[uid],
                      rng.integers(0, len(DEVICES), n, dtype=np.int8)).astype(np.int8)

    # np.take is ~10x faster than fancy indexing for gathering short rows.
    interaction = np.take(users_t, uid, axis=0) * np.take(items.vec, iid, axis=0)
    affinity = interaction @ _latent_weights(strength)
    dense = np.ascontiguousarray(interaction[:, :N_DENSE].T)  # one contiguous column per f_j
    dense += f32(0.5) * rng.standard_normal((N_DENSE, n), dtype=f32)

    activity = users.activity[uid]
    age = items.age[iid] + (seconds / 86_400.0).astype(f32)
    log_price = items.log_price[iid]
    logit = (f32(-2.6 + 0.6 * strength) + f32(1.2) * affinity
             + f32(0.3) * users.activity_z[uid] + f32(0.25) * items.base_pop_z[iid]
             - f32(0.4) * log_price + f32(0.5) * np.exp(-age / f32(3.0))
             + _HOUR_EFFECT[hour]
             + DEVICE_EFFECT[device])
    click = (rng.random(n, dtype=f32) * (1 + np.exp(-logit)) < 1).astype(np.int8)
    watch = np.exp(f32(3.5) + f32(0.4) * affinity + f32(0.3) * (device == _TV)
                   + f32(0.6) * rng.standard_normal(n, dtype=f32)) * click

    columns = [
        pa.array(day_idx * ROW_ID_SPAN + rows),
        pa.array(ts, type=pa.timestamp("us", tz="UTC")),
        pa.array(uid.astype(np.int64)),
        pa.array(iid.astype(np.int64)),
        pa.array(DEVICES).take(pa.array(device)),
        pa.array(SEGMENTS).take(pa.array(users.segment[uid])),
        pa.array(hour),
        pa.array(f32(cfg.zipf_a) * activity),
        pa.array(age),
        pa.array(items.popularity[iid]),
        pa.array(np.exp(f32(3.0) + f32(0.6) * log_price)),
        *[pa.array(dense[j]) for j in range(N_DENSE)],
        pa.array(click),
        pa.array(watch.astype(f32)),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=SYNTH_SCHEMA)


def generate_day(cfg: SynthConfig, day: date) -> Iterator[pa.RecordBatch]:
    """Yield `cfg.rows_per_day` rows for `day` in batches of at most `cfg.batch_rows`.

    Only one batch of rows is alive at a time (plus per-user and per-item tables), so a
    10M-row day needs about as much memory as a 10k-row one. Rows are in time order.
    """
    day_idx = _day_index(cfg, day)
    users = _users(cfg.seed, cfg.n_users, cfg.zipf_a)
    items = _items(cfg.seed, cfg.n_items, cfg.new_items_per_day, cfg.zipf_a, day_idx)
    theta = cfg.drift_per_day * day_idx
    users_t = (math.cos(theta) * users.vec + math.sin(theta) * users.drift_vec).astype(np.float32)
    for batch_no, row0 in enumerate(range(0, cfg.rows_per_day, cfg.batch_rows)):
        n = min(cfg.batch_rows, cfg.rows_per_day - row0)
        yield _batch(cfg, day, day_idx, users_t, items, batch_no, row0, n)

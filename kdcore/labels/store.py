"""Where teacher labels live: ``<root>/labels/<dataset>/date=D/teacher=<version>/``.

One directory per (date, teacher version): labels of another teacher never overwrite
labels that students may be reading. Shards are published under ``_shards/`` and become
visible together through one commit manifest."""

from __future__ import annotations

import datetime as dt

from kdcore.data.examples import parse_date
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part


def labels_day_uri(root: str, dataset: str, day: dt.date | str) -> str:
    return sfs.join(sfs.normalize(root), "labels", dataset, f"date={parse_date(day).isoformat()}")


def labels_uri(root: str, dataset: str, day: dt.date | str, teacher_version: str) -> str:
    return sfs.join(labels_day_uri(root, dataset, day), f"teacher={teacher_version}")


def shard_dir(shard: int, shards: int) -> str:
    return f"_shards/shard={shard:03d}-of-{shards:03d}"


def shard_uri(root: str, dataset: str, day: dt.date | str, teacher_version: str, shard: int, shards: int) -> str:
    return sfs.join(labels_uri(root, dataset, day, teacher_version), shard_dir(shard, shards))


def list_label_versions(root: str, dataset: str, day: dt.date | str) -> list[str]:
    """Teacher versions whose labels for ``day`` are committed."""
    return part.list_partitions(labels_day_uri(root, dataset, day), key="teacher")

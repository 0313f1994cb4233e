"""Where teacher labels live: ``<root>/labels/<dataset>/date=D/teacher=<version>/``.

One directory per (date, teacher version): labels of another teacher never overwrite
labels that students may be reading. Shards are published under ``_shards/`` and become
visible together through one commit manifest."""

from __future__ import annotations

import datetime as dt

from kdcore.data.examples import parse_date
from kdcore.errors import DataError
from kdcore.records import LabelLineage, LabelsRef
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part
from kdcore.storage.manifest import Manifest

KIND = "teacher_labels"


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


def check_labels_for(uri: str, dataset: str, day: dt.date, examples_digest: str,
                     manifest: Manifest | None = None) -> Manifest:
    """The labels' manifest, refused (DataError) unless it records being teacher labels of
    ``dataset`` for ``day``, computed from the examples published now (manifest digest
    ``examples_digest``) by the teacher its ``teacher=<version>`` folder names.

    A join by example id cannot see this: ids may restart every day, so yesterday's
    labels copied into today's folder (or labels left from examples since re-published)
    would join without a missing row and be distilled from. Students and the gate call
    this before they read a label."""
    manifest = manifest or part.read_manifest(uri)
    meta = manifest.metadata
    fix = f"re-materialize them: kd labels materialize --date {day} --force"
    if meta.get("kind") != KIND:
        raise DataError(f"{uri}: not teacher labels (manifest kind {meta.get('kind')!r}, expected {KIND!r}); {fix}")
    if meta.get("dataset") != dataset:
        raise DataError(f"labels at {uri} are of dataset {meta.get('dataset')!r} but are used for dataset "
                        f"{dataset!r}; {fix}")
    recorded = str(meta.get("examples_sha256") or "none recorded")
    if meta.get("date") != day.isoformat() or recorded != examples_digest:
        raise DataError(f"labels at {uri} are for {meta.get('date')} (examples {recorded[:12]}) but are used for "
                        f"{day} (examples {examples_digest[:12]}); {fix}")
    folder = sfs.normalize(uri).rstrip("/").rsplit("/", 1)[-1]
    if folder.startswith("teacher=") and folder[len("teacher="):] != meta.get("teacher_version"):
        raise DataError(f"labels at {uri} were scored by teacher {meta.get('teacher_version')}, not by the "
                        f"{folder[len('teacher='):]} their folder names; {fix}")
    return manifest


def labels_ref(root: str, uri: str, manifest: Manifest, changed: bool = False, reused: bool = False) -> LabelsRef:
    """The reference to committed labels that the stages after the commit take."""
    return LabelsRef(path=sfs.relative(root, uri), date=manifest.metadata["date"],
                     lineage=LabelLineage.from_metadata(manifest.metadata), rows=manifest.rows,
                     bytes=manifest.bytes, changed=changed, reused=reused)

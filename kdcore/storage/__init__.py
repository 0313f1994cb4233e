"""Object storage: URIs, atomic partition publishing, manifest-driven reads."""

from kdcore.storage.manifest import Manifest
from kdcore.storage.partition import (
    PartitionWriter,
    is_published,
    iter_batches,
    list_partitions,
    publish_batches,
    publish_blobs,
    publish_table,
    read_blob,
    read_manifest,
    read_table,
)
from kdcore.storage.uri import join, normalize

__all__ = ["Manifest", "PartitionWriter", "is_published", "iter_batches", "join",
           "list_partitions", "normalize", "publish_batches", "publish_blobs", "publish_table",
           "read_blob", "read_manifest", "read_table"]

"""The manifest: the single object that makes a partition visible.

A partition is a directory of content-addressed files plus ``_MANIFEST.json``, written
last and atomically. Readers trust only the files a manifest lists, so a writer that
dies mid-publish leaves nothing visible, and a re-publish of the same content produces
the same manifest bytes (a no-op)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

MANIFEST_NAME = "_MANIFEST.json"
FORMAT_VERSION = 1


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str  # logical name, e.g. "part-00000" or "model.safetensors"
    path: str  # stored file, relative to the partition, content-addressed
    bytes: int
    sha256: str
    rows: int | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int = FORMAT_VERSION
    kind: str  # "parquet" or "blobs"
    files: list[FileEntry]
    rows: int | None = None
    bytes: int
    schema_b64: str | None = None  # Arrow IPC-serialized schema of parquet partitions
    metadata: dict[str, Any] = {}
    # sha256 of the manifest's own canonical body: a flipped bit that leaves valid JSON (a
    # row count, a staleness) is caught too. Absent in manifests written before it existed.
    checksum: str | None = None

    def _body(self) -> bytes:
        body = self.model_dump(mode="json", exclude={"checksum"})
        return json.dumps(body, sort_keys=True, indent=1).encode()

    def to_bytes(self) -> bytes:
        # Sorted keys and no timestamps: the same content always gives the same bytes.
        out = self.model_dump(mode="json")
        out["checksum"] = hashlib.sha256(self._body()).hexdigest()
        return (json.dumps(out, sort_keys=True, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        m = cls.model_validate_json(data)
        if m.checksum is not None and hashlib.sha256(m._body()).hexdigest() != m.checksum:
            raise ValueError("its checksum does not match its content")
        return m.model_copy(update={"checksum": None})

    @property
    def schema(self) -> pa.Schema | None:
        if self.schema_b64 is None:
            return None
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.schema_b64)))

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)


def encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()

"""Resolve storage URIs to pyarrow filesystems.

One interface for the embedded default (local paths / ``file://``) and for
``gs://bucket/prefix``: everything else in kdcore speaks URIs and never touches a
filesystem class directly, so a deployment moves to GCS by changing one config value.
"""

from __future__ import annotations

import os
from datetime import timedelta
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs

from kdcore.errors import StorageError


def normalize(uri: str) -> str:
    """Canonical form: ``gs://b/p`` or ``file:///abs/path`` (no trailing slash)."""
    uri = str(uri)
    if uri.startswith("gs://"):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        path = urlparse(uri).path
    elif "://" in uri:
        raise StorageError(f"unsupported storage URI '{uri}': use a local path, file:// or gs://")
    else:
        path = uri
    return "file://" + os.path.abspath(os.path.expanduser(path)).rstrip("/")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


@lru_cache(maxsize=8)
def _gcs(endpoint: str | None) -> pafs.FileSystem:
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else "http://" + endpoint)
        return pafs.GcsFileSystem(anonymous=True, scheme=parsed.scheme or "http",
                                  endpoint_override=parsed.netloc,
                                  retry_time_limit=timedelta(seconds=15))
    return pafs.GcsFileSystem()


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path for a URI. ``STORAGE_EMULATOR_HOST`` (the variable the
    google-cloud-storage client honours) points gs:// at an emulator in tests."""
    uri = normalize(uri)
    if uri.startswith("gs://"):
        return _gcs(os.environ.get("STORAGE_EMULATOR_HOST")), uri[len("gs://"):]
    return pafs.LocalFileSystem(), urlparse(uri).path


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: not found") from None
    except OSError as e:
        if "not found" in str(e).lower() or "no such file" in str(e).lower():
            raise StorageError(f"{uri}: not found") from None
        raise StorageError(f"{uri}: cannot read ({e})") from None


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Readers see the old object or the new one, never a partial one: local files are
    written aside and renamed; a GCS object becomes visible only when its upload ends."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.tmp-{os.getpid()}-{os.urandom(6).hex()}-{path.rsplit('/', 1)[1]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def upload_file_atomic(local_path: str, uri: str) -> None:
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.tmp-{os.getpid()}-{os.urandom(6).hex()}"
        pafs.copy_files(local_path, tmp, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        os.replace(tmp, path)
    else:
        pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)


def list_files(uri: str) -> list[str]:
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    base = path.rstrip("/") + "/"
    return sorted(i.path[len(base):] for i in infos if i.type == pafs.FileType.File)


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)

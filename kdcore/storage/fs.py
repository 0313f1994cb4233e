"""Resolve storage URIs to pyarrow filesystems.

One interface for the embedded default (local paths / ``file://``) and for
``gs://bucket/prefix``: everything else in kdcore speaks URIs and never touches a
filesystem class directly, so a deployment moves to GCS by changing one config value.
The URIs themselves are parsed in :mod:`kdcore.storage.uri`; their forms are handed on
here, so callers keep one storage interface.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from datetime import timedelta
from functools import lru_cache
from typing import BinaryIO
from urllib.parse import urlparse

import pyarrow.fs as pafs

from kdcore.errors import ConflictError, StorageError, storage_error, transient_os_error
from kdcore.storage import gcs
from kdcore.storage.uri import file_uri as file_uri  # the URI forms stay part of this interface
from kdcore.storage.uri import has_scheme as has_scheme
from kdcore.storage.uri import join as join
from kdcore.storage.uri import local_path, normalize, parse


def relative(root: str, uri: str) -> str:
    """``uri`` relative to the storage root, without a leading slash (the one form paths
    take inside published records, so a moved or copied root keeps them); a URI outside
    the root is returned whole."""
    root, uri = normalize(root), normalize(uri)
    return uri[len(root) + 1:] if uri.startswith(root + "/") else uri


def absolute(root: str, path: str) -> str:
    """The URI of a record's ``path`` (:func:`relative`'s inverse, so ``path`` is already
    percent-encoded and is not encoded again; a whole URI stays)."""
    return path if has_scheme(path) else normalize(root) + "/" + path.lstrip("/")


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
    scheme, path = parse(uri)
    if scheme == "gs":
        return _gcs(os.environ.get("STORAGE_EMULATOR_HOST")), path
    return pafs.LocalFileSystem(), path


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise storage_error(f"{uri}: cannot stat ({e})", transient_os_error(e)) from None


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
        raise storage_error(f"{uri}: cannot read ({e})", transient_os_error(e)) from None


def _os_error(uri: str, e: OSError) -> StorageError:
    """A full disk, a quota, a permission or a read-only mount stays so on retry; EIO,
    EAGAIN and the like may pass (see ``kdcore.errors.TRANSIENT_ERRNOS``)."""
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
              errno.EPERM: "operation not permitted", errno.EFBIG: "file too large for this file system"}.get(e.errno or 0, e.strerror or str(e))
    return storage_error(f"{uri}: cannot write ({reason}); nothing was published", transient_os_error(e))


TMP_PREFIX = ".tmp-"


def _local_write(uri: str, path: str, fill: Callable[[BinaryIO], None]) -> None:
    """Write beside the target and rename: readers see the old file or the new one. The
    temporary file goes whatever happens (a full disk leaves nothing behind)."""
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/{TMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}-{name}"
    try:
        os.makedirs(parent, exist_ok=True)
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise _os_error(uri, e) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Readers see the old object or the new one, never a partial one: local files are
    written aside and renamed; a GCS object becomes visible only when its upload ends,
    and is verified (exists, size and MD5) before this returns."""
    uri = normalize(uri)
    if uri.startswith("gs://"):
        gcs.upload(uri, data)
        return
    _local_write(uri, local_path(uri), lambda f: f.write(data))


def upload_file_atomic(src: str, uri: str, size: int | None = None) -> None:
    """Copy the local file ``src`` to ``uri`` atomically and verify it landed whole."""
    uri = normalize(uri)
    size = os.path.getsize(src) if size is None else size
    if uri.startswith("gs://"):
        gcs.upload(uri, src)
        return
    path = local_path(uri)
    _local_write(uri, path, lambda f: _copy(src, f))
    if os.path.getsize(path) != size:
        raise StorageError(f"{uri}: wrote {os.path.getsize(path)} bytes, expected {size}")


def _copy(src: str, dst: BinaryIO) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, dst, 1 << 20)


def store(uri: str, src: bytes | str, sha256: str) -> bool:
    """Put content-addressed bytes (or a local file, given its path) at ``uri`` unless an
    intact copy is already there; True when it wrote. An existing copy is trusted only
    after its size and checksum are checked (GCS: the stored MD5; local: a re-hash), so
    re-publishing repairs a corrupted file instead of keeping it."""
    uri = normalize(uri)
    size = os.path.getsize(src) if isinstance(src, str) else len(src)
    if uri.startswith("gs://"):
        st = gcs.stat(uri)
        if st is not None and st.size == size and st.md5 == _digest(src, "md5"):
            return False
    else:
        path = local_path(uri)
        try:
            intact = os.path.getsize(path) == size and _digest(path, "sha256") == sha256
        except (FileNotFoundError, NotADirectoryError):
            intact = False
        except OSError as e:
            raise storage_error(f"{uri}: cannot read ({e})", transient_os_error(e)) from None
        if intact:
            return False
    if isinstance(src, str):
        upload_file_atomic(src, uri, size)
    else:
        write_bytes_atomic(uri, src)
    return True


def _digest(src: bytes | str, algo: str) -> str:
    if isinstance(src, bytes):
        return hashlib.new(algo, src).hexdigest()
    with open(src, "rb") as f:
        return hashlib.file_digest(f, algo).hexdigest()


def generation(uri: str) -> str | None:
    """An opaque version of the object at ``uri`` (None when absent): the GCS generation,
    or inode and mtime on local disk (every atomic rename makes a new inode)."""
    uri = normalize(uri)
    if uri.startswith("gs://"):
        st = gcs.stat(uri)
        return st.generation if st else None
    try:
        st = os.stat(local_path(uri))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise storage_error(f"{uri}: cannot stat ({e})", transient_os_error(e)) from None
    return f"{st.st_ino}.{st.st_mtime_ns}"


def write_if_generation(uri: str, data: bytes, expected: str | None) -> None:
    """Replace the object only if it is still at generation ``expected`` (None: only if
    it does not exist); otherwise raise ConflictError. GCS checks the precondition
    itself; on local disk the check and the rename happen under an exclusive lock on the
    parent directory, which every committer takes."""
    uri = normalize(uri)
    if uri.startswith("gs://"):
        gcs.upload(uri, data, if_generation_match=int(expected) if expected is not None else 0)
        return
    path = local_path(uri)
    parent = path.rsplit("/", 1)[0]
    try:
        os.makedirs(parent, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY)
    except OSError as e:
        raise _os_error(uri, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        found = generation(uri)
        if found != expected:
            raise ConflictError(f"{uri}: changed by another writer (expected "
                                f"{'no object' if expected is None else 'generation ' + expected}, "
                                f"found {'no object' if found is None else 'generation ' + found})")
        _local_write(uri, path, lambda f: f.write(data))
    finally:
        os.close(fd)  # releases the lock


def list_files(uri: str) -> list[str]:
    """Relative paths of every file below ``uri``: what a reader sees, so symlinked
    folders are followed (experiment roots link shared datasets in)."""
    return sorted(rel for rel, _ in _listed_files(uri))


def _listed_files(uri: str) -> list[tuple[str, pafs.FileInfo]]:
    """(relative path, info) of every file below ``uri``, by pyarrow's recursive listing."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    except OSError as e:
        raise storage_error(f"{uri}: cannot list ({e})", transient_os_error(e)) from None
    base = path.rstrip("/") + "/"
    return [(i.path[len(base):], i) for i in infos if i.type == pafs.FileType.File]


def list_file_ages(uri: str) -> list[tuple[str, float]]:
    """(path relative to ``uri``, seconds since last modified) of every file below it, for
    deleters: on local disk a symlink is never listed nor followed (pyarrow's recursive
    listing follows them), so nothing reached through a link can become a candidate. The
    root itself may be a link: it is the folder the caller named."""
    import time

    scheme, path = parse(uri)
    now = time.time()
    if scheme == "file":
        return sorted((rel, now - mtime) for rel, mtime in _walk_local(uri, path))
    return sorted((rel, now - i.mtime.timestamp() if i.mtime else float("inf")) for rel, i in _listed_files(uri))


def _walk_local(uri: str, root: str) -> list[tuple[str, float]]:
    """(relative path, mtime) of the regular files below ``root``, symlinks skipped."""
    out: list[tuple[str, float]] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        try:
            with os.scandir(os.path.join(root, rel) if rel else root) as it:
                for entry in it:
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    if entry.is_symlink():
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(child)
                    elif entry.is_file(follow_symlinks=False):
                        out.append((child, entry.stat(follow_symlinks=False).st_mtime))
        except (FileNotFoundError, NotADirectoryError):
            if not rel:
                return []  # no root yet: nothing to list
        except OSError as e:
            raise storage_error(f"{uri}: cannot list ({e})", transient_os_error(e)) from None
    return out


def delete(uri: str, root: str | None = None) -> bool:
    """Delete the one file at ``uri``; True when it was there. Never a folder, and never
    through a symlink: on local disk the file must still be a regular file reached from
    ``root`` (default: its own folder) without a symlink in any folder between, checked
    when it is unlinked (each folder is opened with O_NOFOLLOW relative to the one
    before, the file is lstat-ed and unlinked relative to its folder), so a link swapped
    in after the listing cannot redirect the delete outside ``root``."""
    scheme, path = parse(uri)
    if scheme == "gs":
        fs, path = resolve(uri)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return False
        fs.delete_file(path)
        return True
    base = local_path(root) if root is not None else os.path.dirname(path)
    if not (path.startswith(base.rstrip("/") + "/")):
        raise StorageError(f"{uri}: not under {root}; refusing to delete it")
    return _unlink_confined(uri, os.path.realpath(base), path[len(base.rstrip("/")) + 1:])


def _unlink_confined(uri: str, real_root: str, rel: str) -> bool:
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"{uri}: '{rel}' is not a plain relative path; refusing to delete it")
    try:
        fd = os.open(real_root, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise storage_error(f"{uri}: cannot delete ({e})", transient_os_error(e)) from None
    try:
        for name in parts[:-1]:
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = sub
        if not stat.S_ISREG(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode):
            return False  # a symlink, folder or device now stands there: not ours to delete
        os.unlink(parts[-1], dir_fd=fd)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False  # gone already, or a folder on the way is not one
    except OSError as e:
        if e.errno == errno.ELOOP:  # a folder on the way became a symlink
            return False
        raise storage_error(f"{uri}: cannot delete ({e})", transient_os_error(e)) from None
    finally:
        os.close(fd)

"""The gs:// hook: writes that GCS itself checks.

Reads stream through pyarrow's GcsFileSystem (see ``fs``), but every write goes through
google-cloud-storage, because only its API exposes what integrity needs: generation
preconditions (a commit that lost a race gets HTTP 412 instead of silently overwriting)
and the object's stored size and MD5, which are compared with what was sent before a
manifest may name the object. ``STORAGE_EMULATOR_HOST`` points it at an emulator."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache

from kdcore.errors import ConflictError, StorageError, storage_error
from kdcore.storage.uri import parse


@lru_cache(maxsize=4)
def _client(endpoint: str | None):
    from google.cloud import storage

    return storage.Client()  # honours STORAGE_EMULATOR_HOST (anonymous) or default credentials


def _blob(uri: str):
    scheme, path = parse(uri)
    bucket, _, name = path.partition("/")
    if scheme != "gs":
        raise StorageError(f"{uri}: not a gs:// URI")
    if not bucket or not name:
        raise StorageError(f"{uri}: a gs:// object URI needs a bucket and an object name")
    return _client(os.environ.get("STORAGE_EMULATOR_HOST")).bucket(bucket).blob(name)


@dataclass(frozen=True)
class ObjectStat:
    size: int
    md5: str  # hex
    generation: str


def stat(uri: str) -> ObjectStat | None:
    from google.api_core import exceptions as gexc

    blob = _blob(uri)
    try:
        blob.reload()
    except gexc.NotFound:
        return None
    except gexc.GoogleAPIError as e:
        raise storage_error(f"{uri}: cannot read object metadata ({e})", _transient(e)) from None
    md5 = base64.b64decode(blob.md5_hash).hex() if blob.md5_hash else ""
    return ObjectStat(size=int(blob.size or 0), md5=md5, generation=str(blob.generation))


def upload(uri: str, data: bytes | str, if_generation_match: int | None = None) -> None:
    """Upload bytes (or a local file, given its path) and verify: the object must exist
    afterwards with our size and MD5.

    A client that believed an upload succeeded while the server stored nothing (or
    something else) is caught here, not by a reader days later."""
    from google.api_core import exceptions as gexc
    from google.cloud.storage.retry import DEFAULT_RETRY

    blob = _blob(uri)
    if isinstance(data, str):
        size, md5 = os.path.getsize(data), _md5_file(data)
    else:
        size, md5 = len(data), hashlib.md5(data).hexdigest()
    try:
        if isinstance(data, str):
            blob.upload_from_filename(data, content_type="application/octet-stream",
                                      if_generation_match=if_generation_match, retry=DEFAULT_RETRY)
        else:
            blob.upload_from_string(data, content_type="application/octet-stream",
                                    if_generation_match=if_generation_match, retry=DEFAULT_RETRY)
    except gexc.PreconditionFailed:
        raise ConflictError(f"{uri}: changed by another writer (generation precondition "
                            f"{if_generation_match} failed)") from None
    except gexc.GoogleAPIError as e:
        raise storage_error(f"{uri}: upload failed ({e})", _transient(e)) from None
    verify(uri, size, md5)


def _md5_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _transient(e: Exception) -> bool:
    """A GCS answer that may change on retry: 408, 429, a 5xx, or the client's own retries
    running out of time (it retries exactly these, so a RetryError is one that persisted).
    A 403, 404 or 400 stays what it is."""
    from google.api_core import exceptions as gexc

    return isinstance(e, gexc.RetryError | gexc.TooManyRequests | gexc.ServerError) or getattr(e, "code", None) == 408


def verify(uri: str, size: int, md5: str) -> ObjectStat:
    """The object just uploaded is there, whole. Not transient when it is not: GCS
    acknowledged a write it does not hold, or holds other bytes (a lost write, a proxy or
    endpoint that lies); kdcore's own check found it, not the service, and retrying would
    hide a storage path that loses data from the person who must look at it."""
    st = stat(uri)
    if st is None:
        raise StorageError(f"{uri}: upload reported success but the object does not exist")
    if st.size != size or (st.md5 and st.md5 != md5):
        raise StorageError(f"{uri}: stored object does not match what was uploaded "
                           f"({st.size} bytes md5 {st.md5}, sent {size} bytes md5 {md5})")
    return st

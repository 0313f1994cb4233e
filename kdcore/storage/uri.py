"""Storage URIs: the one parser of them and the canonical forms it gives.

A leaf of the storage package (it imports no filesystem): ``fs`` resolves what it parses
to a filesystem, and ``gcs`` names its objects with it, so neither needs the other to
read a URI.
"""

from __future__ import annotations

import os
import re
import unicodedata
from urllib.parse import quote, unquote

from kdcore.errors import StorageError

# The one parser of storage URIs: everything that reads a scheme, a bucket or a local path
# out of a URI (and everything that turns a canonical URI back into a local path) goes
# through ``parse``, so a character means the same thing everywhere.

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# RFC 3986 pchar minus pct-encoded, plus "/": what a canonical file:// URI keeps literal.
# Everything else (space, '#', '?', '%', '[', ']', non-ASCII, ...) is percent-encoded, so
# ordinary paths give the same URI string as before and unusual ones survive a round trip.
_PATH_SAFE = "/=:@!$&'()*+,;~"  # quote() keeps ASCII letters, digits and '-._' anyway
# Characters GCS tools read as wildcards, fragments or queries (gsutil, gcloud storage, the
# console, signed URLs): an object name holding them is one nobody can address reliably.
_GS_MISREAD = {"#": "a fragment", "?": "a wildcard or query", "[": "a wildcard", "]": "a wildcard",
               "*": "a wildcard"}
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
GCS_MAX_OBJECT_NAME = 1024  # bytes of UTF-8


def parse(uri: str) -> tuple[str, str]:
    """``("file", absolute local path)`` or ``("gs", "bucket/object/prefix")`` for a storage
    URI (no trailing slash); StorageError naming the URI otherwise.

    - A plain path (no ``scheme://``) is taken literally: ``#``, ``?``, ``%``, spaces and
      unicode are path characters; ``~`` and relative paths are expanded.
    - ``file://`` follows RFC 8089: the path is percent-decoded (so ``Path.as_uri()``
      works); a literal ``#`` or ``?`` is refused, since in a URI they start a fragment or
      query and taking them as path characters would silently mean another folder than
      a URI-aware reader sees. Only an empty or ``localhost`` authority is local.
    - ``gs://``: the object name is literal (GCS names are not percent-encoded), and what
      an object name cannot hold or GCS tools misread is refused (see ``_parse_gs``).
    """
    uri = str(uri)
    if "\x00" in uri:
        raise StorageError(f"storage URI {uri!r} has a NUL character")
    if uri.startswith("gs://"):
        return "gs", _parse_gs(uri)
    if uri.startswith("file://"):
        return "file", _parse_file(uri)
    if has_scheme(uri):
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path, file:// or gs://")
    return "file", _absolute(os.path.expanduser(uri))


def has_scheme(value: str) -> bool:
    """True when ``value`` is a URI (``scheme://...``) rather than a plain path: the test
    ``parse`` itself applies, for callers that resolve relative paths against a folder."""
    return _SCHEME.match(str(value)) is not None


def _absolute(path: str) -> str:
    path = os.path.abspath(path)
    return path if path == "/" else path.rstrip("/")


def _parse_file(uri: str) -> str:
    rest = uri[len("file://"):]
    for ch, code in (("#", "%23"), ("?", "%3F")):
        if ch in rest:
            raise StorageError(f"storage URI {uri!r} has a literal '{ch}', which a file:// URI reads as the "
                               f"start of a {'fragment' if ch == '#' else 'query'}: percent-encode it ({code}) "
                               f"or pass a plain path")
    authority, slash, path = rest.partition("/")
    if authority.lower() not in ("", "localhost"):
        raise StorageError(f"storage URI {uri!r} names host '{authority}': only local files can be read "
                           f"(file:///path or file://localhost/path)")
    path = unquote(slash + path, errors="surrogateescape")  # any bytes a local file name can hold
    if "\x00" in path:
        raise StorageError(f"storage URI {uri!r} has a NUL character (%00)")
    return _absolute(path or "/")


def _parse_gs(uri: str) -> str:
    bucket, _, name = uri[len("gs://"):].rstrip("/").partition("/")
    _check_bucket(uri, bucket)
    for ch in name:
        if unicodedata.category(ch) == "Cc":
            raise StorageError(f"storage URI {uri!r} has control character {ch!r} (U+{ord(ch):04X}), "
                               f"which a GCS object name cannot hold")
        if ch in _GS_MISREAD:
            raise StorageError(f"storage URI {uri!r} has '{ch}', which GCS tools read as {_GS_MISREAD[ch]} "
                               f"in an object name; use a prefix without it")
    for seg in name.split("/") if name else ():
        if seg in (".", ".."):
            raise StorageError(f"storage URI {uri!r} has a '{seg}' segment")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > GCS_MAX_OBJECT_NAME:
        raise StorageError(f"storage URI {uri!r}: the object name is {size} bytes; GCS allows at most "
                           f"{GCS_MAX_OBJECT_NAME}")
    return f"{bucket}/{name}" if name else bucket


def _check_bucket(uri: str, bucket: str) -> None:
    """GCS bucket naming rules (cloud.google.com/storage/docs/buckets#naming)."""
    parts = bucket.split(".")
    why = None
    if not bucket:
        why = "it is empty"
    elif len(bucket) < 3 or len(bucket) > (222 if "." in bucket else 63) or any(len(p) > 63 for p in parts):
        why = "it must be 3-63 characters long, or up to 222 with dots and at most 63 between them"
    elif not _BUCKET.match(bucket) or not all(parts):
        why = "use a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit"
    elif _IPV4.match(bucket):
        why = "it must not look like an IP address"
    elif bucket.startswith("goog") or "google" in bucket or "g00gle" in bucket:
        why = "it must not start with 'goog' or contain 'google'"
    if why:
        raise StorageError(f"storage URI {uri!r}: {bucket!r} is not a valid GCS bucket name ({why})")


def file_uri(path: str) -> str:
    """The canonical ``file://`` URI of an absolute local path: only what RFC 3986 does
    not allow in a path segment is percent-encoded."""
    return "file://" + quote(path, safe=_PATH_SAFE, errors="surrogateescape")


def normalize(uri: str) -> str:
    """Canonical form: ``gs://b/p`` or ``file:///abs/path`` (no trailing slash; see
    ``parse`` for what each form accepts, ``file_uri`` for the encoding)."""
    scheme, path = parse(uri)
    return "gs://" + path if scheme == "gs" else file_uri(path)


def local_path(uri: str) -> str:
    """The local path a (local) storage URI or plain path names: the one way back from a
    canonical ``file://`` URI to a path. StorageError for a gs:// URI."""
    scheme, path = parse(uri)
    if scheme != "file":
        raise StorageError(f"{uri}: not a local path")
    return path


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended as path segments. In a ``file://`` URI the parts are
    percent-encoded like ``file_uri`` does (a part is a literal name, never URI syntax)."""
    encode = uri.startswith("file://")
    out = uri.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        out += "/" + (quote(p, safe=_PATH_SAFE, errors="surrogateescape") if encode else p)
    return out

"""Confine values that become paths: config files, storage roots and names used as path
segments.

Who must confine: anything that reaches a path from a value a *user of the deployment*
sets (an Airflow DAG param, a trigger's conf). Values the operator of the machine sets
(command-line arguments of ``kd``, environment variables such as ``KD_STORAGE_ROOT`` or
``KD_PIPELINE_CONFIG``, the config files in the configs folder) are trusted: the ``kd``
CLI does not confine ``--config`` or ``--root``, because whoever runs it can already
read and write what it could reach.

Every check resolves first and compares after: local paths through ``realpath`` (so
neither ``..`` nor a symlink can leave the allowed folder), ``gs://`` URIs by a prefix
check on the normalized URI with ``.`` / ``..`` segments refused (object stores do not
resolve them, but the local code that joins URIs might). A refusal is a ``SpecError``
naming the parameter, the value and the allowed root(s); nothing is read before the
check, so an error never quotes a file from outside the allowed folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

from kdcore.errors import KDError, SpecError
from kdcore.storage import fs as sfs

SAFE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
MAX_NAME = 128
_SAFE_NAME = re.compile(SAFE_NAME)


def is_safe_name(value: object) -> bool:
    """A single path segment: letters, digits, ``_ . -``, not starting with ``.`` or
    ``-``, never ``.`` or ``..``, no ``/`` or ``\\``, at most MAX_NAME characters."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_NAME and value not in (".", "..")
            and _SAFE_NAME.fullmatch(value) is not None)


def safe_name(value: object, what: str) -> str:
    """``value`` if it is safe as one path segment (see ``is_safe_name``), else SpecError
    naming ``what`` (the field or parameter)."""
    if not is_safe_name(value):
        raise SpecError(f"{what}: {value!r} is not a safe name (one path segment matching "
                        f"{SAFE_NAME}, at most {MAX_NAME} characters, not '.' or '..')")
    return value  # type: ignore[return-value]


def _realpath(path: str | os.PathLike[str], what: str, value: object) -> str:
    try:
        return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))
    except (ValueError, OSError) as e:  # NUL bytes, symlink loops
        raise SpecError(f"{what}: {value!r} is not a usable path ({e})") from None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def confine_path(path: str | os.PathLike[str], allowed_dir: str | os.PathLike[str], what: str) -> Path:
    """The real path of ``path`` (relative: to the working directory), which must be
    ``allowed_dir`` or lie under it after both are resolved (``..`` and symlinks
    followed). Nothing is read. SpecError naming ``what`` otherwise."""
    real = _realpath(path, what, path)
    root = _realpath(allowed_dir, what, allowed_dir)
    if not _under(real, root):
        raise SpecError(f"{what}: '{os.fspath(path)}' resolves to '{real}', outside the allowed folder "
                        f"'{root}'")
    return Path(real)


def _gs_segments_ok(path: str) -> bool:
    """Stricter than the parser (which refuses literal ``.``/``..`` and empty buckets): no
    percent-encoded dot segments and no backslashes either, which some tools decode."""
    return all(unquote(s) not in (".", "..") and "\\" not in s for s in path.split("/"))


def _canonical(uri: str, what: str, value: object) -> str:
    """``gs://b/p`` (``.``/``..`` segments refused) or ``file://<realpath>``."""
    try:
        scheme, path = sfs.parse(uri)
    except KDError as e:
        raise SpecError(f"{what}: {value!r}: {e}") from None
    if scheme == "gs":
        if not _gs_segments_ok(path):
            raise SpecError(f"{what}: {value!r}: '.' and '..' segments (and empty buckets) are not "
                            "allowed in gs:// URIs")
        return "gs://" + path
    return sfs.file_uri(_realpath(path, what, value))


def confine_uri(uri: str, allowed_roots: Iterable[str], what: str) -> str:
    """The canonical URI of ``uri`` (a local path, ``file://`` or ``gs://``), which must be
    one of ``allowed_roots`` or lie under one of them (a sub-root is fine). Local paths
    are compared after ``realpath``; ``gs://`` by prefix on segment boundaries. Returns
    the canonical form, so what is used is what was checked. SpecError naming ``what``,
    the value and the allowed roots otherwise."""
    if not isinstance(uri, str) or not uri:
        raise SpecError(f"{what}: {uri!r} is not a storage URI")
    roots = [_canonical(r, f"allowed root of {what}", r) for r in allowed_roots]
    if not roots:
        raise SpecError(f"{what}: '{uri}' refused: no allowed storage root is configured")
    canon = _canonical(uri, what, uri)
    if not any(_under(canon, r) for r in roots):
        shown = roots[0] if len(roots) == 1 else roots
        raise SpecError(f"{what}: '{uri}' (resolved: '{canon}') is outside the allowed storage root "
                        f"{shown!r}; give a root at or under it")
    return canon

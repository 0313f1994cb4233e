"""Errors a person can act on: each names the file, column, field or check at fault.

Each fault also says whether it can pass (``transient``): whether the same step, run
again unchanged, may succeed. Only transient faults are retried, by the DAG's tasks
(operators/faults.py) and by the ``kd`` command line (kdcore/cli.py) alike. A fault is
transient only when the storage service or the operating system said so (a 5xx, a 429, a
timeout, a dropped connection, EIO/EAGAIN, ...: ``TransientStorageError``). Everything
else is not: a lost commit race (``ConflictError``: a re-run would replace the winner), a
missing partition a re-run cannot create, corrupt data, a config mismatch, missing
labels, a broken lineage, a bad spec -- retrying those only delays the red task."""

from __future__ import annotations

import errno

# errno values the OS uses for "try again": an I/O error, a busy or interrupted call, a
# network that dropped or refused the connection, an NFS handle that went stale.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE,
                              errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                              errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET, errno.EHOSTUNREACH})
# What pyarrow's GCS filesystem puts in the text of the OSError it raises once its own
# retries ran out (google-cloud-cpp status codes): the service was unavailable or slow.
_TRANSIENT_STATUS_TEXT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


class KDError(Exception):
    """Base class for every error kdcore raises on purpose."""

    transient: bool = False  # True: the same step, run again unchanged, may succeed


class SpecError(KDError):
    """A dataset spec or pipeline config is invalid (names the file and field)."""


class DataError(KDError):
    """Input data violates the dataset contract (names the file and column)."""


class StorageError(KDError):
    """A partition is missing, incomplete or corrupt (names the URI). Not transient: a
    re-run finds the same partition missing or the same bytes corrupt."""


class TransientStorageError(StorageError):
    """Storage I/O that may succeed when tried again: the service or the OS said so."""

    transient = True


class LineageError(KDError):
    """A checkpoint chain is broken, a parent is not older than the day trained, or an
    output was computed from other inputs than the ones published now."""


class GateError(KDError):
    """The data-quality gate failed under a policy that stops the run."""


class ConflictError(StorageError):
    """Another writer committed different content to the same partition first.

    Not transient: a re-run of the same step for the same day would not build on the
    winner, it would replace it (a trainer's output is the day's checkpoint itself), which
    is the lost write the generation check exists to prevent. Two writers disagreeing on
    one output is for a person (or the orchestrator's next scheduled run) to settle."""


def transient_os_error(e: OSError) -> bool:
    """True when an OSError (local disk, or pyarrow's GCS filesystem) says try again."""
    return (isinstance(e, TimeoutError | ConnectionError) or e.errno in TRANSIENT_ERRNOS
            or any(s in str(e) for s in _TRANSIENT_STATUS_TEXT))


def storage_error(message: str, transient: bool) -> StorageError:
    """The StorageError of an I/O failure, transient or not as its cause says."""
    return TransientStorageError(message) if transient else StorageError(message)


def is_transient(e: BaseException) -> bool:
    """Whether a fault may pass on retry: a KDError says so itself; an OSError that no
    raise site wrapped says so by its errno; anything else (a bug, an optimizer's
    ValueError) is not: the same code on the same inputs raises it again."""
    if isinstance(e, KDError):
        return e.transient
    return isinstance(e, OSError) and transient_os_error(e)


class ServingError(KDError):
    """A serving step (blessing, export, validation, push, rollback) refused: the message
    names the surface, version, file or figure, and the serving pointer did not move."""

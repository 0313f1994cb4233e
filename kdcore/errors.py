"""Errors a person can act on: each names the file, column, field or check at fault."""

from __future__ import annotations


class KDError(Exception):
    """Base class for every error kdcore raises on purpose."""


class SpecError(KDError):
    """A dataset spec or pipeline config is invalid (names the file and field)."""


class DataError(KDError):
    """Input data violates the dataset contract (names the file and column)."""


class StorageError(KDError):
    """A partition is missing, incomplete or corrupt (names the URI)."""


class LineageError(KDError):
    """A checkpoint chain is broken, or a parent is not older than the day trained."""


class GateError(KDError):
    """The data-quality gate failed under a policy that stops the run."""


class ConflictError(StorageError):
    """Another writer committed different content to the same partition first."""

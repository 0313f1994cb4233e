"""The one retry rule of every Airflow task: only a fault that may pass is retried.

Shared by operators/kd_daily.py and operators/teacher_search.py; the ``kd`` command line
applies the same rule (kdcore/cli.py). Light on purpose: the DAG processor imports it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from airflow.sdk.exceptions import AirflowException, AirflowFailException

log = logging.getLogger(__name__)


@contextlib.contextmanager
def no_retry(what: str) -> Iterator[None]:
    """Fail the task at once (AirflowFailException, message prefixed with ``what``) unless
    the fault is transient (``kdcore.errors.is_transient``).

    - A transient fault (TransientStorageError: GCS 5xx/429/timeouts, a dropped
      connection, EIO/EAGAIN) propagates and
      Airflow retries the task with backoff: every task is idempotent, so a retry redoes
      only what did not land.
    - Any other KDError (a lost commit race: a re-run would replace the winner; a missing partition, corrupt data, a config mismatch, missing
      labels, a broken lineage, a bad spec) fails at once: the inputs will not change.
    - Any exception kdcore did not raise on purpose (a bug, an optimizer's ValueError, a
      shape mismatch) fails at once too, with its traceback in the task log: the same code
      on the same inputs raises it again, so retries with backoff would only delay the red
      task by minutes and bury the traceback under three copies of itself.

    Airflow's own exceptions (skip, fail, a timeout) pass through untouched."""
    from kdcore.errors import KDError, is_transient

    try:
        yield
    except AirflowException:
        raise
    except Exception as e:
        if is_transient(e):
            raise
        if isinstance(e, KDError):
            raise AirflowFailException(f"{what}: {type(e).__name__}: {e} (not retried: the inputs will not change)") \
                from None
        log.exception("%s: unexpected %s", what, type(e).__name__)
        raise AirflowFailException(f"{what}: {type(e).__name__}: {e} (not retried: not a fault that passes; "
                                   f"see the traceback above)") from None

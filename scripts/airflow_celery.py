"""``[celery] celery_config_options`` of the Celery variant (scripts/airflow_env.celery_env):
Airflow's default Celery config with prefetching off, plus the preload of heavy third-party modules in each worker.

A Celery worker runs every task in a process forked from its pool, which forks from the
worker's main process; Airflow preloads a few of its own modules there (Celery's
``import_modules`` signal). Adding numpy, pyarrow and torch the same way saves each task the
seconds it would spend importing them (docs/deployment.md, "Where the time goes") -- the
Celery counterpart of the LocalExecutor forkserver preload. The signal fires in workers only,
so the scheduler and API server, which read this config too, import nothing more."""

from __future__ import annotations

import importlib
from typing import Any

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery.signals import import_modules

from scripts.airflow_env import THIRD_PARTY_PRELOAD

# A worker takes a task only when it has a free slot (Celery >= 5.6, Redis broker). With
# Airflow's acks_late and a prefetch multiplier of 1 a busy worker still reserved the next
# message: a second label shard or student then waited behind the first on one worker while
# the other worker sat idle (seen in tests/test_celery.py), which for hour-long training tasks
# is an hour lost.
CELERY_CONFIG: dict[str, Any] = {**DEFAULT_CELERY_CONFIG, "worker_disable_prefetch": True}


@import_modules.connect
def _preload(*args: Any, **kwargs: Any) -> None:
    for name in THIRD_PARTY_PRELOAD:
        importlib.import_module(name)

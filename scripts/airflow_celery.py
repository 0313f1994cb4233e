"""``[celery] celery_config_options`` of the Celery variant (scripts/airflow_env.celery_env):
Airflow's default Celery config, plus the preload of heavy third-party modules in each worker.

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

CELERY_CONFIG: dict[str, Any] = DEFAULT_CELERY_CONFIG


@import_modules.connect
def _preload(*args: Any, **kwargs: Any) -> None:
    for name in THIRD_PARTY_PRELOAD:
        importlib.import_module(name)

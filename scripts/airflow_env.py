"""The environment of an embedded-default Airflow (SQLite, LocalExecutor, local storage)
running this repo's DAGs: one definition shared by `make demo` and the Airflow tests, so
what the tests prove is what the demo runs."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Imported once by the scheduler's forkserver (Airflow 3.3 `[scheduler] mp_start_method` /
# `mp_forkserver_preload`); LocalExecutor workers fork from it and every task process forks
# from a worker, so tasks find these already imported instead of paying ~4.5 s each
# (docs/performance.md, "Labelling"). Third-party only: kdcore stays imported per task, so
# new kdcore code takes effect without restarting the scheduler.
THIRD_PARTY_PRELOAD = ("numpy", "pyarrow", "pyarrow.parquet", "pyarrow.compute", "pydantic", "torch")
FORKSERVER_PRELOAD = ("airflow", "airflow.executors.local_executor", *THIRD_PARTY_PRELOAD)


def airflow_env(home: Path, store: str | Path, config: Path, api_port: int = 8080, parallelism: int = 4,
                retry_delay_seconds: int = 2, sensor_poke_seconds: int = 5, sensor_timeout_seconds: int = 20,
                **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "KD_"))}
    port = api_port
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__SCHEDULER__MP_START_METHOD": "forkserver",
        "AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD": ",".join(FORKSERVER_PRELOAD),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(parallelism),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "scripts.airflow_sqlite.CONNECT_ARGS",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "scripts.airflow_sqlite.CONNECT_ARGS_ASYNC",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "KD_STORAGE_ROOT": str(store),
        "KD_PIPELINE_CONFIG": str(config),
        "KD_RETRY_DELAY_SECONDS": str(retry_delay_seconds),
        "KD_SENSOR_POKE_SECONDS": str(sensor_poke_seconds),
        # the scheduled run catchup=False creates for yesterday (wall clock) finds no data:
        # its sensor gives up quickly instead of holding the DAG's only active-run slot
        "KD_SENSOR_TIMEOUT_SECONDS": str(sensor_timeout_seconds),
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    })
    env.update(extra)
    return env


def celery_env(home: Path, store: str | Path, config: Path, *, sql_alchemy_conn: str, broker_url: str,
               api_port: int = 8080, parallelism: int = 4, **extra: str) -> dict[str, str]:
    """The distributed variant (docs/deployment.md): CeleryExecutor, a PostgreSQL metadata DB
    (``postgresql+psycopg2://...``) and a Redis broker; everything else as in ``airflow_env``,
    so the scheduler, API server, DAG processor and every worker agree on DAGs and storage.

    Dropped from the embedded default: the SQLite connect args (they are SQLite's), and the
    scheduler's forkserver preload (a LocalExecutor speed-up: with Celery, tasks run in the
    workers, and the scheduler's forkserver would only hold torch in memory for nothing)."""
    env = airflow_env(home, store, config, api_port=api_port, parallelism=parallelism)
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC",
                "AIRFLOW__SCHEDULER__MP_START_METHOD", "AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD"):
        env.pop(key)
    env.update({
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_alchemy_conn,
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        # task states come back through the metadata DB (Celery's SQLAlchemy backend, "db+" URL;
        # the driver stays explicit: SQLAlchemy 2.1's bare "postgresql://" means psycopg 3)
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + sql_alchemy_conn,
        # Celery workers preload what the LocalExecutor forkserver preloads (scripts/airflow_celery.py)
        "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "scripts.airflow_celery.CELERY_CONFIG",
        # a task instance records the hostname of the worker that ran it (REST API `hostname`)
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "scripts.airflow_env.worker_hostname",
    })
    env.update(extra)
    return env


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the Celery variant: ``$KD_WORKER_HOSTNAME`` when set, else
    the FQDN (Airflow's default). Workers on separate machines differ by FQDN anyway; setting the
    variable tells apart several workers on one machine (the tests, a big host)."""
    import socket

    return os.environ.get("KD_WORKER_HOSTNAME") or socket.getfqdn()

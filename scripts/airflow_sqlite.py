"""SQLAlchemy connect args for the embedded default (SQLite) metadata DB.

Scheduler, DAG processor, API server and CLI commands (``airflow backfill create``) all
write to one SQLite file; the driver's default 5 s lock timeout makes a CLI write fail
with "database is locked" while the scheduler holds a transaction. Used through
``AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS=scripts.airflow_sqlite.CONNECT_ARGS``
(with the repo root on PYTHONPATH) by scripts/demo.sh, scripts/ui.sh and the tests."""

CONNECT_ARGS = {"timeout": 60}
CONNECT_ARGS_ASYNC = {"timeout": 60}

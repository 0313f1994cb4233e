#!/usr/bin/env bash
# `make ui`: airflow standalone (API server + UI, scheduler, DAG processor, triggerer) with
# kd_daily and the demo config loaded. Login: user `admin`, password in
# var/airflow/simple_auth_manager_passwords.json.generated. Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
export AIRFLOW_HOME="$REPO/var/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$REPO/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$REPO/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$AIRFLOW_HOME/airflow.db"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS=scripts.airflow_sqlite.CONNECT_ARGS
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC=scripts.airflow_sqlite.CONNECT_ARGS_ASYNC
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# airflow standalone starts its components as `airflow ...` found on PATH
export PATH="$REPO/.venv/bin:$PATH"
export KD_PIPELINE_CONFIG="${KD_PIPELINE_CONFIG:-$REPO/configs/demo.yaml}"
export KD_STORAGE_ROOT="${KD_STORAGE_ROOT:-$REPO/${DEMO_ROOT:-var/demo}}"
# wait_for_examples: a finite, declared wait (the DAG default is 4 h). The scheduled run that
# unpausing creates for yesterday (wall clock) finds no MovieLens data: it fails after 30 min
# with a message naming the missing partition, and never blocks ad hoc runs (max_active_runs 3).
export KD_SENSOR_TIMEOUT_SECONDS="${KD_SENSOR_TIMEOUT_SECONDS:-1800}"
export KD_SENSOR_POKE_SECONDS="${KD_SENSOR_POKE_SECONDS:-60}"
mkdir -p "$AIRFLOW_HOME"
.venv/bin/airflow db migrate >/dev/null
.venv/bin/airflow pools set kd_training 2 "KD training (teacher + students)" >/dev/null
echo "Airflow UI: http://localhost:8080  user: admin  password: $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
exec .venv/bin/airflow standalone

# Two commands a new user needs: `make demo` (set up + run the daily KD pipeline) and
# `make test` (set up + lint + tests). Both create the virtual environment on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_ROOT ?= var/demo

.PHONY: venv demo test lint ui bench bench-10m clean browser celery-deps test-celery

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	DEMO_ROOT=$(DEMO_ROOT) $(BIN)/python scripts/demo.py

ui: $(STAMP)
	DEMO_ROOT=$(DEMO_ROOT) scripts/ui.sh

lint: $(STAMP)
	$(BIN)/ruff check .

# Headless Debian Chromium for tests/test_ui_browser.py (driven by the playwright package; no browser download)
browser:
	@test -x /usr/bin/chromium || apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)

# PostgreSQL and Redis for tests/test_celery.py (Debian packages; the test starts its own
# throwaway server of each on loopback and stops it: nothing here is configured or started)
celery-deps:
	@(ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && test -x /usr/bin/redis-server) \
	  || apt-get install -y -q postgresql redis-server \
	  || (apt-get update -q && apt-get install -y -q postgresql redis-server)

# The distributed deployment (docs/deployment.md): CeleryExecutor + PostgreSQL + Redis, two workers, gs://
test-celery: $(STAMP) celery-deps
	$(BIN)/python -m pytest -q -s -m celery tests/test_celery.py

# Two workers, one test file each at a time (--dist loadfile), longest files first
# (tests/conftest.py orders them; --no-loadscope-reorder keeps that order instead of xdist's
# "most tests first"): the Airflow tests mostly wait on schedulers while the other worker computes.
test: lint browser celery-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# One line per figure, each a ratio or a breakdown measured in the same run (docs/performance.md).
# BENCH_ROWS sets the day size (1M by default); the whole-day run is the slow one (~10 min at 1M).
BENCH_ROWS ?= 1000000
bench: $(STAMP)
	$(BIN)/python bench/bench_dag_parse.py
	$(BIN)/python bench/bench_shift.py --rows $(BENCH_ROWS)
	$(BIN)/python bench/bench_integrity.py --rows $(BENCH_ROWS)
	$(BIN)/python bench/bench_label_bytes.py --rows $(BENCH_ROWS)
	$(BIN)/python bench/bench_labels.py --rows $(BENCH_ROWS)
	$(BIN)/python bench/bench_training.py --rows $(BENCH_ROWS)
	$(BIN)/python bench/bench_day.py --rows $(BENCH_ROWS)

# 10M rows a day end to end (docs/performance.md, "10M rows a day"; about an hour on 2 cores):
# `kd data synth` + a whole day through the CLI, stage by stage, then the same day through the
# real kd_daily DAG (LocalExecutor, 4 label shards on 2 worker slots), checked byte for byte.
BENCH_10M ?= var/bench-10m
bench-10m: $(STAMP)
	rm -rf $(BENCH_10M) && mkdir -p $(BENCH_10M)
	$(BIN)/python bench/bench_day.py --rows 10000000 --shards 4 --keep-bootstrap $(BENCH_10M)/boot \
	  --keep-result $(BENCH_10M)/cli --json $(BENCH_10M)/cli.json
	$(BIN)/python bench/bench_dag_day.py --root $(BENCH_10M)/boot --shards 4 --workers 2 \
	  --compare $(BENCH_10M)/cli/store --json $(BENCH_10M)/dag.json

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache

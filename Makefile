# Billing pipeline — run `make help`.
PYTHON ?= python3.11
# Test workers (pytest-xdist): each starts its own embedded stack; a test file stays on one worker.
TEST_WORKERS ?= 2
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-fast lint format stack-up stack-down stack-status airflow monitoring monitoring-down bench clean lock simulate

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# requirements-dev.txt is the runtime requirements.txt plus the development tools.
$(STAMP): $(BIN)/python requirements.txt requirements-dev.txt pyproject.toml dev/pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip wheel setuptools
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e . -e dev
	@touch $(STAMP)

# Cosmos renders the dbt task groups from pre-built manifests, so DAG parsing never runs dbt.
DBT_SOURCES := $(shell find dbt_project -path dbt_project/target -prune -o -path dbt_project/logs -prune -o -type f \( -name '*.sql' -o -name '*.yml' \) -print)
MANIFESTS   := dbt_project/target/postgres/manifest.json dbt_project/target/clickhouse/manifest.json

$(MANIFESTS) &: $(STAMP) $(DBT_SOURCES)
	$(BIN)/billing transform --parse

setup: $(STAMP) $(MANIFESTS) ## Create .venv, install everything, pre-build dbt manifests (quick when nothing changed)

demo: setup ## Run the pipeline end to end on the embedded stack and print a summary
	$(BIN)/billing demo

test: setup ## Run the whole test suite on the real embedded stack
	@scripts/install-system-deps.sh || echo "(tests needing promtool/chromium will skip outside CI)"
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20

lint: setup ## ruff check + format check
	$(BIN)/ruff check include dev dags plugins tests bench
	$(BIN)/ruff format --check include dev dags plugins tests bench

format: setup ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix include dev dags plugins tests bench
	$(BIN)/ruff format include dev dags plugins tests bench

SIMULATE_ARGS ?= --days 35 --orgs 5 --events-per-day 2000 --seed 7 --faults all
simulate: setup ## A month of nightly runs under faults on a private stack; invariant report (SIMULATE_ARGS=...)
	$(BIN)/billing simulate $(SIMULATE_ARGS)

stack-up: setup ## Start the local services
	$(BIN)/billing stack up

stack-down: setup ## Stop the local services
	$(BIN)/billing stack down

stack-status: setup ## Show the local services
	$(BIN)/billing stack status

airflow: setup ## Start the Airflow UI against the local stack
	$(BIN)/billing airflow

monitoring: setup ## Prometheus with the alert rules scraping `make airflow`'s /billing/metrics (URL printed)
	$(BIN)/billing monitoring up
	@$(BIN)/billing monitoring status

monitoring-down: setup ## Stop the local Prometheus
	$(BIN)/billing monitoring down

# Each set is resolved in a throw-away venv, so nothing else installed in .venv leaks into
# the pins; the development set is constrained to the runtime pins and keeps only what it adds.
LOCK_VENV := .local/lock-venv
lock: ## Re-resolve requirements.in / requirements-dev.in into the pinned requirements.txt / requirements-dev.txt
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.in
	$(LOCK_VENV)/bin/pip freeze > requirements.txt
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.in -c requirements.txt
	{ echo '-r requirements.txt'; $(LOCK_VENV)/bin/pip freeze \
		| grep -vxFf requirements.txt; } > requirements-dev.txt
	rm -rf $(LOCK_VENV)

# Every stack under .local (the dev stack, simulate's, leftover test sessions'): stop it and
# delete its data, including PostgreSQL's folder outside the checkout (/var/tmp/billing-*)
# when the checkout is one the unprivileged postgres user cannot enter (root under /root).
clean: ## Stop every local stack and delete its data, also outside .local (keeps .venv)
	-@for f in $$(find .local -name stack.json 2>/dev/null); do \
		BILLING_LOCAL_DIR="$$(dirname "$$f")" $(BIN)/billing stack destroy >/dev/null; done
	rm -rf .local

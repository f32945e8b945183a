# Two commands do all set-up on a fresh machine:
#   make run    - the mirror daemon (embedded PostgreSQL unless MIRROR_DATABASE_URL is set)
#   make test   - the whole test suite against a real Mosquitto and a real PostgreSQL
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run quickstart test venv mosquitto promtool postgis lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/flespi-mirror run $(ARGS)

# The README's quick start: a private Mosquitto on a free port, the mirror, simulated traffic.
quickstart: $(STAMP) mosquitto
	@bash scripts/quickstart.sh

# The tests start their own Mosquitto; install the broker when it is missing and we may.
# NO_INSTALL=1 (for these three targets): never install, name the missing package instead.
mosquitto:
	@bash scripts/ensure-mosquitto.sh

# Alert rules, dashboards and the metrics endpoint are checked with Prometheus's promtool.
promtool:
	@bash scripts/ensure-promtool.sh

# The spatial tests run with PostGIS and without it; installed when missing and we may.
postgis:
	@bash scripts/ensure-postgis.sh

test: $(STAMP) mosquitto promtool postgis
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mirror tests bench
	$(BIN)/mypy

bench: $(STAMP) mosquitto
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates .venv when missing and (re)installs the project into it
# whenever pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo bad-day test lint typecheck coverage pytest node-deps tools image clean

demo: $(STAMP)
	$(BIN)/heartbeat-gateway demo

bad-day: $(STAMP)
	$(BIN)/heartbeat-gateway demo --bad-day

test: lint typecheck coverage pytest

# The container image, heartbeat-gateway:dev, with docker or podman (scripts/build-image says how,
# including a base made from Debian's packages where no registry is reachable).
image: $(STAMP)
	PYTHON=$(BIN)/python scripts/build-image

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict gateway tests bench

# The pure modules (pyproject.toml, [tool.coverage.run]) under their own fast
# tests, held to the floor in [tool.coverage.report].
UNIT_TESTS := tests/test_config.py tests/test_credentials.py tests/test_headers.py \
	tests/test_heartbeat_core.py tests/test_heartbeat_core_properties.py tests/test_heartbeat_query.py \
	tests/test_heartbeat_wire.py tests/test_absorption_model.py tests/test_routing.py tests/test_links.py tests/test_simulator_sessions.py \
	tests/test_egress.py tests/test_credential_text.py \
	tests/test_redaction.py tests/test_plan.py

coverage: $(STAMP)
	$(BIN)/coverage run -m pytest -q -W error -p no:cacheprovider $(UNIT_TESTS)
	$(BIN)/coverage report

pytest: $(STAMP) node-deps
	$(BIN)/pytest -W error

# The TypeScript SDK worker the end-to-end tests drive, pinned by
# tests/node/package-lock.json. Without npm those tests skip, except in CI.
NODE_STAMP := tests/node/node_modules/.installed

node-deps:
	@if command -v npm >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory $(NODE_STAMP); \
	else \
	  echo "npm not found: the TypeScript SDK worker tests will skip (install Node.js 20, or run .ci/run)"; \
	fi

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
	touch $@

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The external tools some tests use (helm 3 and 4; promtool comes with
# Debian's prometheus package). Without them those tests skip, except in CI.
tools:
	scripts/fetch-helm

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis .coverage tests/node/node_modules

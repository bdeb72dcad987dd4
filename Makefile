# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates .venv when missing and (re)installs the project into it
# whenever pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest tools clean

demo: $(STAMP)
	$(BIN)/heartbeat-gateway demo

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict gateway

pytest: $(STAMP)
	$(BIN)/pytest -W error

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
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis

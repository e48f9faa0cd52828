# Two commands on a fresh machine: `make run` (the main job) and `make test`. Both install what they need.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: install run sweep test lint ui bench bench-smoke clean

# Re-installs only when pyproject.toml changes; the package itself is editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/masksweep-train

test: install
	$(BIN)/pytest

# The MLflow UI on ./mlruns, on 127.0.0.1 (PORT=5001 make ui for another port).
ui: install
	$(BIN)/masksweep ui --port $(or $(PORT),5000)

lint: install
	$(BIN)/ruff check src tests

clean:
	rm -rf outputs multirun .pytest_cache

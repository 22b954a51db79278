# prunescope: `make run` builds everything and serves the dashboard; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
WORKSPACE ?= data/workspace
SIZE   ?= small
PORT   ?= 8501
STAMP  := $(VENV)/.installed


.PHONY: run demo serve test test-fast lint install chromium clean-workspace

# (Re)install when pyproject.toml or constraints.txt change. pip takes torch from local disk here.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/prunescope demo --workspace $(WORKSPACE) --size $(SIZE)

serve: $(STAMP)
	$(BIN)/prunescope serve --workspace $(WORKSPACE) --address 127.0.0.1 --port $(PORT)

# Build the demo workspace if missing (the demo is idempotent: a built one returns at once), then serve.
run: demo serve

# Debian chromium for the browser tests (never `playwright install`: it downloads a browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not browser"

lint: $(STAMP)
	$(BIN)/ruff check core dashboard tests
	$(BIN)/mypy core

clean-workspace:
	rm -rf $(WORKSPACE)

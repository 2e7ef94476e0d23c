# Two entry points that do all set-up on a fresh machine (Python 3.11 + pip, no torch, no GPU):
#   make demo   -- the bundled demo model answers a question about a bundled image
#   make test   -- the test suite
# Both create and reuse a local virtualenv in .venv. torch==2.13.0 is pinned so pip takes the local
# CPU wheel where one is provided (and PyPI's build elsewhere).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,eval]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vismmoe run

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV)

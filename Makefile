# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# The virtual environment is rebuilt only when requirements or packaging change, so a second call
# installs nothing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/digits.yaml
ARGS ?=

export RAY_USAGE_STATS_ENABLED ?= 0
export WANDB_MODE ?= offline
export DS_ACCELERATOR ?= cpu

.PHONY: install data run test lint clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Writes the scenario's shards once; prepare skips a scenario whose manifest matches the config.
data: $(STAMP)
	$(VENV)/bin/iil-dist prepare $(CONFIG) $(ARGS)

run: data
	$(VENV)/bin/iil-dist train $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) data runs wandb

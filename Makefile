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

.PHONY: install data run test lint clean studies bench

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

# The digits studies shown in the README (about 4 hours on 2 CPU cores; finished runs are reused, so an
# interrupted `make studies` continues): every method and ablation over 5 data orders on the rotation
# drift and on the plain split, DBD at 5 and 20 phases (the task-count study) on the rotation drift, and
# the main methods over 5 orders on the corruption and sub-population drifts, the one-at-a-time sweep of
# the recipe's defaults (DBD over 3 orders, each field at two other values); then each study's report
# (also logged to wandb in the study's group), copied to docs/.
ALL_VARIANTS := dbd,fl_dis,fl_only,dis_only,finetune,lwf,mean_teacher,joint
SWEEP := --sweep method.sigma=0.5,2 --sweep method.ema_alpha=0.8,0.95 --sweep method.ema_every_epochs=2,5 \
	--sweep method.beta_outer=0.5,2 --sweep method.lambda_dis=0.5,2 --sweep optim.epochs_per_phase=20,40 \
	--sweep method.freeze_epochs=5,15
studies: $(STAMP)
	$(VENV)/bin/iil-dist study $(CONFIG) --name digits-methods-rotation --variants $(ALL_VARIANTS) --orders 0-4
	$(VENV)/bin/iil-dist study $(CONFIG) --name digits-tasks-rotation --variants dbd --orders 0-4 --phases 5,20
	$(VENV)/bin/iil-dist study $(CONFIG) data.drift=none --name digits-methods-plain --variants $(ALL_VARIANTS) --orders 0-4
	$(VENV)/bin/iil-dist study $(CONFIG) data.drift=corruption --name digits-methods-corruption --variants dbd,finetune,lwf --orders 0-4
	$(VENV)/bin/iil-dist study $(CONFIG) data.drift=subpopulation --name digits-methods-subpopulation --variants dbd,finetune,lwf --orders 0-4
	# the one-at-a-time sweep behind the recipe's method and schedule defaults (its report: docs/digits-sweep/)
	$(VENV)/bin/iil-dist study $(CONFIG) --name digits-sweep --variants dbd --orders 0-2 $(SWEEP)
	# the rotation report takes the task-count runs too (DBD at T = 5 and 20), for METHOD.md §8's claim 4
	$(VENV)/bin/iil-dist report runs/digits-methods-rotation runs/digits-tasks-rotation --out runs/digits-tasks-rotation
	mkdir -p docs/digits-tasks-rotation && cp runs/digits-tasks-rotation/report.md runs/digits-tasks-rotation/study.json \
		runs/digits-tasks-rotation/*.png docs/digits-tasks-rotation/
	$(VENV)/bin/iil-dist report runs/digits-sweep && mkdir -p docs/digits-sweep && \
		cp runs/digits-sweep/report.md runs/digits-sweep/study.json runs/digits-sweep/*.png docs/digits-sweep/
	for s in rotation plain corruption subpopulation; do \
		$(VENV)/bin/iil-dist report runs/digits-methods-$$s && mkdir -p docs/digits-methods-$$s && \
		cp runs/digits-methods-$$s/report.md runs/digits-methods-$$s/study.json runs/digits-methods-$$s/*.png \
			docs/digits-methods-$$s/ || exit 1; \
	done

# The CPU benchmarks of the README's Performance section (about 8 minutes on 2 cores; results in
# bench/results/): engine efficiency and data, consolidation cost, scale at 10k and 100k samples; the GPU
# script writes a "skipped" result where no GPU is present.
bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/consolidation.py
	$(PY) bench/scale.py
	$(PY) bench/gpu.py

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) data runs wandb

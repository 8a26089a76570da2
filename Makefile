# Every target runs inside .venv, created on first use from the exact pins.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA  ?=
# Digits demo knobs (defaults give the numbers in the README).
DIGITS_ROOT ?= $(CURDIR)/outputs/data/digits
# Glyphs demo (open set): where scripts/prepare_glyphs.py writes the rendered glyphs.
GLYPHS_ROOT ?= $(CURDIR)/outputs/data/glyphs

.PHONY: help install lint test test-fast test-zoo test-all demo demo-glyphs gpu-check ui worst report convert-market convert-cars convert-fruits clean \
	convert-sop convert-inshop convert-cub convert-msmt17 convert-cuhk03np convert-veri
# A bare `make` prints the targets instead of building .venv (the stamp file would otherwise be the first target).
.DEFAULT_GOAL := help

help:                  ## list the targets with what they do
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.txt requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements.txt -c requirements.lock
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)      ## create .venv from the exact pins (only when a pin file changed), metriclab editable

lint: install          ## ruff (lint + import order) on the repo, mypy on metriclab/; both run, either fails it
	@rc=0; $(VENV)/bin/ruff check . || rc=1; $(VENV)/bin/mypy metriclab || rc=1; exit $$rc

# Two pytest workers (pytest-xdist), one per core; a test file stays on one worker (its module fixtures run once).
XDIST := -n 2 --dist loadfile

test: install          ## the whole suite, slow tests included (what CI runs; < 20 min on 2 cores); not zoo_heavy
	$(PY) -m pytest -q $(XDIST) -m "not zoo_heavy"

test-fast: install     ## the quick loop: every test not marked slow
	$(PY) -m pytest -q $(XDIST) -m "not slow and not zoo_heavy"

test-zoo: install      ## the seven 0.2-0.9 B parameter zoo extractors train one epoch each (slow on a CPU)
	$(PY) -m pytest -m zoo_heavy -q tests/test_zoo_training.py

test-all: test         ## same as `make test` (kept for old habits)

demo: install          ## real digits data: prepare, measure random init, train, validate
	$(PY) scripts/prepare_digits.py --out $(DIGITS_ROOT)
	$(PY) scripts/demo.py dataset.root=$(DIGITS_ROOT)

demo-glyphs: install   ## open set: render glyphs, then random init vs batch-hard triplet vs ArcFace on unseen classes
	$(PY) scripts/prepare_glyphs.py --out $(GLYPHS_ROOT)
	$(PY) scripts/demo_glyphs.py dataset.root=$(GLYPHS_ROOT)

gpu-check: install     ## GPU readiness: market_bot on generated Market-1501 data, images/s, memory, ONNX parity [ARGS=]
	$(PY) bench/gpu_check.py $(ARGS)

ui: install            ## MLflow UI over the embedded store
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db \
		--default-artifact-root $(CURDIR)/outputs/mlartifacts --host 127.0.0.1 --port 5000

report: install        ## compare the MLflow runs: outputs/report/report.md [EXPERIMENT=name]
	$(PY) scripts/report.py $(if $(EXPERIMENT),--experiment "$(EXPERIMENT)")

worst: install         ## fetch and list a run's worst-query grids: make worst RUN=<mlflow run id>
	@test -n "$(RUN)" || { echo "usage: make worst RUN=<mlflow run id>"; exit 2; }
	$(PY) scripts/worst.py "$(RUN)"

convert-market: install  ## Market-1501 folder -> dataset.csv: make convert-market DATA=<folder>
	@test -n "$(DATA)" || { echo "usage: make convert-market DATA=/path/to/Market-1501-v15.09.15"; exit 2; }
	$(PY) converters/market1501.py "$(DATA)" $(if $(STRICT),--strict) $(if $(SKIP_BAD),--skip-bad)

convert-cars: install  ## Cars196 folder -> dataset.csv: make convert-cars DATA=<folder> [PROTOCOL=metric|stanford]
	@test -n "$(DATA)" || { echo "usage: make convert-cars DATA=/path/to/stanford_cars [PROTOCOL=metric|stanford]"; exit 2; }
	$(PY) converters/cars196.py "$(DATA)" --protocol $(or $(PROTOCOL),metric) $(if $(STRICT),--strict)

convert-fruits: install  ## fruit folders -> dataset.csv: make convert-fruits DATA=<folder> [QUERY=] [PROTOCOL=]
	@test -n "$(DATA)" || { echo "usage: make convert-fruits DATA=/path/to/fruits [QUERY=validation|test] [PROTOCOL=closed|open]"; exit 2; }
	$(PY) converters/fruits.py "$(DATA)" --protocol $(or $(PROTOCOL),closed) --query $(or $(QUERY),validation) $(if $(STRICT),--strict)

convert-sop: install   ## Stanford Online Products -> dataset.csv: make convert-sop DATA=<folder>
	@test -n "$(DATA)" || { echo "usage: make convert-sop DATA=/path/to/Stanford_Online_Products"; exit 2; }
	$(PY) converters/sop.py "$(DATA)" $(if $(STRICT),--strict)

convert-inshop: install  ## DeepFashion In-shop -> dataset.csv: make convert-inshop DATA=<folder> [NO_BBOXES=1]
	@test -n "$(DATA)" || { echo "usage: make convert-inshop DATA=/path/to/In-shop [NO_BBOXES=1]"; exit 2; }
	$(PY) converters/inshop.py "$(DATA)" $(if $(NO_BBOXES),--no-bboxes) $(if $(STRICT),--strict)

convert-cub: install   ## CUB-200-2011 -> dataset.csv: make convert-cub DATA=<folder> [PROTOCOL=zero_shot|closed]
	@test -n "$(DATA)" || { echo "usage: make convert-cub DATA=/path/to/CUB_200_2011 [PROTOCOL=zero_shot|closed] [NO_BBOXES=1]"; exit 2; }
	$(PY) converters/cub200.py "$(DATA)" --protocol $(or $(PROTOCOL),zero_shot) $(if $(NO_BBOXES),--no-bboxes) $(if $(STRICT),--strict)

convert-msmt17: install  ## MSMT17 V1/V2 -> dataset.csv: make convert-msmt17 DATA=<folder> [EXCLUDE_VAL=1]
	@test -n "$(DATA)" || { echo "usage: make convert-msmt17 DATA=/path/to/MSMT17_V1 [EXCLUDE_VAL=1]"; exit 2; }
	$(PY) converters/msmt17.py "$(DATA)" $(if $(EXCLUDE_VAL),--exclude-val) $(if $(STRICT),--strict) $(if $(SKIP_BAD),--skip-bad)

convert-cuhk03np: install  ## CUHK03-NP -> dataset.csv: make convert-cuhk03np DATA=<cuhk03-np/labeled or detected>
	@test -n "$(DATA)" || { echo "usage: make convert-cuhk03np DATA=/path/to/cuhk03-np/labeled (or .../detected, or cuhk03-np SUBSET=labeled|detected)"; exit 2; }
	$(PY) converters/cuhk03np.py "$(DATA)" $(if $(SUBSET),--subset $(SUBSET)) $(if $(STRICT),--strict) $(if $(SKIP_BAD),--skip-bad)

convert-veri: install  ## VeRi-776 -> dataset.csv: make convert-veri DATA=<folder>
	@test -n "$(DATA)" || { echo "usage: make convert-veri DATA=/path/to/VeRi"; exit 2; }
	$(PY) converters/veri776.py "$(DATA)" $(if $(STRICT),--strict) $(if $(SKIP_BAD),--skip-bad)

clean:                 ## delete outputs/ (runs, MLflow store, prepared data) and tool caches; .venv stays
	rm -rf outputs multirun .pytest_cache .mypy_cache .ruff_cache

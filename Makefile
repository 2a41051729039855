# Setup installs torch first (CPU build here; GPU users set TORCH to their CUDA build), then the project.
PY ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
STORE ?= data/store

.PHONY: setup demo test test-slow test-e2e lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	@mkdir -p out
	$(BIN)/python -m jobs.ingest synthetic --store $(STORE) --name demo --noise-rate 0.4 > out/demo-uri.txt
	$(BIN)/python -m jobs.train --config configs/demo.yaml --dataset "$$(tail -n 1 out/demo-uri.txt)" \
		--summary-json out/demo-summary.json
	@$(BIN)/python -c "import json; s = json.load(open('out/demo-summary.json')); \
	print('\nMLflow run:', s['mlflow_run_id'], '(tracking URI', s['tracking_uri'] + ')'); \
	print('Registered model:', s['registered_model']); \
	print('Test MAP (i2t / t2i / mean): %.4f / %.4f / %.4f' % tuple(s['test_map'][k] for k in ('i2t', 't2i', 'mean'))); \
	print('Browse: $(BIN)/mlflow ui --backend-store-uri', s['tracking_uri'])"

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

test-e2e: setup
	$(BIN)/python -m pytest -m e2e

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf out runs data mlflow.db mlartifacts

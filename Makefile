# The front door: `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
NOTEBOOK := llm_batch_inference_vision.ipynb
SMOKE_TEST ?= 1
export SMOKE_TEST
# Offline by default: the smoke preset needs no hub access; a real run can unset these.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help setup run job test test-fast readme lint clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'
	@echo "  Variables: SMOKE_TEST=1 (default: offline preset on CPU; 0 = the GPU tutorial), VENV=$(VENV)"

setup: ## Create or refresh the CPU virtual environment (idempotent)
	bash ci/setup_venv.sh $(VENV)

run: setup ## Run the notebook end to end; writes outputs/ (executed notebook + captions)
	mkdir -p outputs
	$(PY) -m papermill --log-output --no-progress-bar -k python3 $(NOTEBOOK) outputs/$(NOTEBOOK)
	@echo "Executed notebook: outputs/$(NOTEBOOK); captions: outputs/captions/"

test: setup ## Run every test: unit, notebook (nbval), README sync, lint
	bash ci/test.sh $(VENV)

readme: setup ## Regenerate README.md from the notebook
	$(PY) -m jupyter nbconvert --to markdown $(NOTEBOOK) --output README --log-level WARN

lint: setup ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check helpers tests

clean: ## Remove outputs, caches and the virtual environment
	rm -rf outputs .cache .pytest_cache .ruff_cache $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# The front door: `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
NOTEBOOK := llm_batch_inference_vision.ipynb
# The offline preset needs no hub access: say so to the HF libraries before Python starts. Its local
# Ray cluster runs with token authentication on (Ray's default), said explicitly: Ray prints no notice.
OFFLINE := SMOKE_TEST=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=token
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help setup run run-gpu job test readme screenshot lint clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'
	@echo "  Variables: VENV=$(VENV)"

setup: ## Create or refresh the CPU virtual environment (idempotent)
	bash ci/setup_venv.sh $(VENV)

run: setup ## Run the notebook offline on CPU; writes outputs/ (executed notebook + captions)
	mkdir -p outputs
	$(OFFLINE) $(PY) -m papermill --log-output --no-progress-bar -k python3 $(NOTEBOOK) outputs/$(NOTEBOOK)
	@echo "Executed notebook: outputs/$(NOTEBOOK); captions: outputs/captions*/"

run-gpu: ## Run the real GPU tutorial with the current python3 (pip install -r requirements.txt papermill)
	mkdir -p outputs
	SMOKE_TEST=0 python3 -m papermill --log-output -k python3 $(NOTEBOOK) outputs/$(NOTEBOOK)

job: setup ## Run the production job offline on CPU over the bundled shards; writes outputs/job/
	$(OFFLINE) $(PY) batch_inference_vision.py --smoke --output outputs/job

test: setup ## Run every test: lint, the notebook end to end (nbval), unit and job tests, README sync
	bash ci/test.sh $(VENV)

readme: setup ## Regenerate README.md from the notebook
	$(PY) -m jupyter nbconvert --to markdown $(NOTEBOOK) --output README --log-level WARN

# Docs rendering, checked in a real browser: the executed notebook as HTML, in headless Chromium.
CHROMIUM_FLAGS := --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars
screenshot: ## Render outputs/ (from make run) to HTML and screenshot it: outputs/notebook.png
	test -f outputs/$(NOTEBOOK) || { echo "run \`make run\` first"; exit 1; }
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	$(PY) -m jupyter nbconvert --to html outputs/$(NOTEBOOK) --output-dir outputs --log-level WARN
	chromium $(CHROMIUM_FLAGS) --user-data-dir=$$(mktemp -d) --window-size=1100,$${HEIGHT:-14000} \
	  --screenshot=$(CURDIR)/outputs/notebook.png file://$(CURDIR)/outputs/llm_batch_inference_vision.html
	@echo "Screenshot: outputs/notebook.png"

lint: setup ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check helpers tests

clean: ## Remove outputs, caches and the virtual environment
	rm -rf outputs .cache .pytest_cache .ruff_cache $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

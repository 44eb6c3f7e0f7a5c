#!/usr/bin/env bash
# The whole test suite, offline, on CPU. Called by `make test` (and so by .ci/run).
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
  RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check helpers tests
"$VENV/bin/python" -m pytest -v --durations=10 tests
# The unmodified notebook runs end to end inside pytest (tests/test_notebook_run.py), executed
# headless with papermill as `make run` does, with only the documented switch flipped.

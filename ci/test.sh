#!/usr/bin/env bash
# The whole test suite, offline, on CPU. Called by `make test` (and so by .ci/run).
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
  RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check helpers tests
# The unmodified notebook runs cell by cell with nbval (--nbval-lax: a cell fails on an error),
# with only the documented switch flipped; tests/test_notebook_run.py then checks that same run's
# outputs and captions. Two pytest-xdist workers share the 2 cores: much of a test's time is Ray
# and the engine starting up and waiting, and a file's tests stay in one worker (tests/conftest.py).
# A local Ray starts with token authentication on, said explicitly so that Ray prints no notice in
# the notebook. A cell that runs past 10 minutes (the longest takes about a minute) fails, so a
# hang ends the run well inside CI's limit instead of running into it.
NB_OUT=$(mktemp -d)
trap 'rm -rf "$NB_OUT"' EXIT
export SMOKE_TEST=1 RAY_AUTH_MODE=token OUTPUT_DIR="$NB_OUT/captions"
"$VENV/bin/python" -m pytest -v --durations=25 -n "${PYTEST_WORKERS:-2}" --dist loadfile \
  --nbval-lax --nbval-current-env --nbval-cell-timeout=600 llm_batch_inference_vision.ipynb tests

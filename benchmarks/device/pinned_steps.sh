#!/bin/bash
# The runs of issue #31 on the pinned stack, once run_step.sh has installed it (one step per call;
# carry .device-pinned/kit):
#   bash .device-pinned/kit/pinned_steps.sh notebook   the unmodified notebook, the sizes of
#                                                      h200_x2.sh's notebook step, random weights
#   bash .device-pinned/kit/pinned_steps.sh bench ARGS... benchmarks/bench_vision.py --dummy ARGS
#   bash .device-pinned/kit/pinned_steps.sh serve ARGS... benchmarks/serve_prototype.py --dummy ARGS
# Logs and JSON lines land in $OUT.
K=$(cd "$(dirname "$0")" && pwd)
source "$K/env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
T0=$(date +%s)
case "$1" in
notebook)
  [ -f /tmp/model/rand3b/config.json ] || python3 "$K/make_random_weights.py" "$MODEL_DIR" /tmp/model/rand3b > "$OUT/weights.log" 2>&1
  tail -c 300 "$OUT/weights.log"
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_vision as b; b.make_shards(__import__('pathlib').Path('/tmp/shards'), 8192)"
  echo "prep_s=$(( $(date +%s) - T0 ))"
  # One GPU: the replicas the notebook picks for it (3 on an H200, 1 on an H100) for both runs.
  per_gpu=$(PYTHONPATH=$PWD:$PYTHONPATH python3 -c 'from helpers.presets import get_preset as g, local_gpu_memory_bytes as m
print(g(False).replicas_per_gpu_for(m()))')
  SMOKE_TEST=0 MODEL=/tmp/model/rand3b DATASET='/tmp/shards/*.tar' NUM_IMAGES=4096 REPLICAS_PER_GPU=$per_gpu \
    SCALE_UP_IMAGES=8192 SCALE_UP_CONCURRENCY=$per_gpu OUTPUT_DIR=/tmp/nbout/captions PYTHONPATH=$PWD:$PYTHONPATH \
    timeout -s KILL "${NB_TIMEOUT:-520}" python3 "$K/run_notebook_cells.py" llm_batch_inference_vision.ipynb > "$OUT/notebook.txt" 2>&1
  echo "notebook rc=$? wall_s=$(( $(date +%s) - T0 ))"
  grep -E "=== CELL .* (done|FAILED)|NB_OK|Error|rows, written" "$OUT/notebook.txt" | cut -c1-300 | tail -40
  python3 - <<'PY'
import pyarrow.parquet as pq
for d in ("/tmp/nbout/captions", "/tmp/nbout/captions_scaled"):
    try:
        t = pq.read_table(d)
        errors = sum(1 for e in t.column("error").to_pylist() if e) if "error" in t.column_names else None
        print(f"ROWS_OUT {d} {t.num_rows} errors={errors}")
    except Exception as e:  # noqa: BLE001
        print(f"ROWS_OUT {d} unreadable: {e!r}")
PY
  logs=$(grep -l "Elapsed time for batch\|init engine" /tmp/ray/session_latest/logs/worker-*.out /tmp/ray/session_latest/logs/worker-*.err 2>/dev/null)
  # shellcheck disable=SC2086  # a list of files
  [ -n "$logs" ] && tar czf "$OUT/notebook_engine_logs.tgz" $logs 2>/dev/null
  for f in $(grep -l "Elapsed time for batch" /tmp/ray/session_latest/logs/worker-*.err 2>/dev/null); do
    echo "batches $(grep -c "Elapsed time for batch" "$f") in $(basename "$f")"
  done ;;
bench)
  shift
  python3 benchmarks/bench_vision.py --model "$MODEL_DIR" --dummy --logdir "$OUT/logs" --out "$OUT/results.jsonl" "$@" \
    | python3 -c "
import json, sys
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        print(line.rstrip()[:300])
        continue
    keep = ('run', 'label', 'num_images', 'max_tokens', 'images', 'tokens_ok', 'startup_s', 'steady_images_per_s',
            'sustained_images_per_s', 'sustained_window_s', 'first_wave_rows', 'e2e_s', 'e2e_images_per_s', 'versions',
            'startup_breakdown', 'error')
    print(json.dumps({k: r[k] for k in keep if k in r})[:3000], flush=True)
"
  echo "bench wall_s=$(( $(date +%s) - T0 ))" ;;
serve)
  # benchmarks/serve_prototype.py (#28): one Ray Serve LLM deployment for every run, random weights,
  # synthetic images, the replicas the notebook picks for this GPU, e.g. `serve -n 4096 --scale-up-n 8192
  # --max-tokens 48 --clients 4` (the notebook's shape) or `serve --skip-notebook --sustained 32000
  # --repeat 2 --clients 4`.
  shift
  PYTHONPATH=$PWD:$PYTHONPATH timeout -s KILL "${SERVE_TIMEOUT:-560}" python3 benchmarks/serve_prototype.py --model "$MODEL_DIR" --dummy \
    --synthetic-dir /tmp/sp_shards --out "$OUT/results.jsonl" "$@" > "$OUT/serve.txt" 2>&1
  echo "serve rc=$? wall_s=$(( $(date +%s) - T0 ))"
  tar czf "$OUT/serve_logs.tgz" /tmp/ray/session_latest/logs/serve 2>/dev/null  # controller, replicas
  grep -E '^\{' "$OUT/serve.txt" | cut -c1-1500
  grep -E "Error|Traceback" "$OUT/serve.txt" | head -5 | cut -c1-300 ;;
*) echo "usage: pinned_steps.sh notebook | bench ARGS... | serve ARGS..."; exit 2 ;;
esac

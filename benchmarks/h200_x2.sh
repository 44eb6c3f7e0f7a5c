#!/bin/bash
# The device runs behind benchmarks/results/*-h200x2-*.jsonl, on nvidia-h200-x2 once the kit of
# ../shared/device/README.md is staged and installed. One step per device call:
#   bash benchmarks/h200_x2.sh tenk       ours and the original settings, 10,000 images each, side
#                                         by side (one GPU each, one Ray cluster), same moment
#   bash benchmarks/h200_x2.sh scale      ours with two engine replicas (one per GPU), 20,000 images
#   bash benchmarks/h200_x2.sh tune       the preset (GPU A) beside 1,024 sequences in flight on the
#                                         engine (GPU B), N=6144 each, one Ray cluster
#   bash benchmarks/h200_x2.sh yardstick  vLLM AsyncLLM alone (GPU 0) beside ours with the engine's
#                                         default per-token output (GPU 1), 10,000 images each
# Logs and JSON lines land in $OUT.
set -u
source .device/kit/env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/logs"
N=${N:-10000}
bench() { python3 benchmarks/bench_vision.py --model "$MODEL_DIR" --dummy --logdir "$OUT/logs" --out "$OUT/results.jsonl" "$@"; }
ray_cli() { python3 -m ray.scripts.scripts "$@"; }
# One Ray cluster over both GPUs for two drivers side by side (Ray's own start is in neither figure).
cluster_up() {
  ray_cli start --head --num-gpus 2 --include-dashboard=false --disable-usage-stats > "$OUT/ray_start.log" 2>&1
  export RAY_ADDRESS=auto
}
cluster_down() { ray_cli stop --force > /dev/null 2>&1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpus.csv"
case "$1" in
tenk)
  cluster_up
  bench -n "$N" --runs original --workdir /tmp/bw_orig --label tenk > "$OUT/original.txt" 2>&1 &
  bench -n "$N" --runs pipeline --workdir /tmp/bw_pipe --label tenk > "$OUT/pipeline.txt" 2>&1 &
  wait
  cluster_down ;;
scale)
  bench -n $((2 * N)) --runs pipeline --concurrency 2 --workdir /tmp/bw_scale --label scale2 > "$OUT/scale.txt" 2>&1 ;;
tune)
  cluster_up
  bench -n 6144 --runs pipeline --workdir /tmp/bw_a --label tune-preset > "$OUT/tune_a.txt" 2>&1 &
  bench -n 6144 --runs pipeline --workdir /tmp/bw_b --label tune-1024 --max-concurrent-batches 32 \
    --engine-kwargs '{"max_num_seqs": 1024, "compilation_config": {"max_cudagraph_capture_size": 1024}}' \
    > "$OUT/tune_b.txt" 2>&1 &
  wait
  cluster_down ;;
yardstick)
  CUDA_VISIBLE_DEVICES=0 bench -n "$N" --runs engine_async --workdir /tmp/bw_async --label yardstick \
    > "$OUT/engine_async.txt" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 bench -n "$N" --runs pipeline --cumulative --workdir /tmp/bw_cum --label cumulative \
    > "$OUT/cumulative.txt" 2>&1 &
  wait ;;
*) echo "usage: h200_x2.sh tenk | scale | tune | yardstick"; exit 2 ;;
esac
cat "$OUT/results.jsonl" 2>/dev/null | cut -c1-1500
grep -h "PROGRESS\|Error\|error" "$OUT"/logs/*.log 2>/dev/null | tail -20

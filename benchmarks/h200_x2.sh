#!/bin/bash
# The device runs behind the published figures (benchmarks/README.md says which step made which),
# on nvidia-h200 or nvidia-h200-x2 once the kit of ../shared/device/README.md is staged and
# installed. One step per device call:
#   bash benchmarks/h200_x2.sh alone      one GPU: runs one after the other on one Ray cluster, in the
#                                         order $ORDER (default "P"; P is the preset, "original" the
#                                         original tutorial's settings, any other word a variant
#                                         below), N=$ALONE_N (default 6144) images each.
#                                         PROFILE_RUN="k ..." profiles run k mid-run (py-spy,
#                                         nvidia-smi, top); WARMUP_DUMP_RUN="k ..." dumps run k's
#                                         engines during vLLM's kernel warm-up (DUMP_NATIVE=1: C frames)
#   bash benchmarks/h200_x2.sh tenk       two GPUs: $TENK_A (default preset) and the original settings,
#                                         $N (10,000) images each, side by side, one GPU each
#   bash benchmarks/h200_x2.sh scale      two GPUs: the preset on two GPUs, then on one, $SCALE_N images
#                                         per GPU
#   bash benchmarks/h200_x2.sh notebook   the unmodified notebook with the GPU preset and random weights,
#                                         the scale-up on every GPU of the machine (carry .nbtools:
#                                         run_notebook_cells.py, make_random_weights.py)
# Variants are engine kwargs in JSON, merged into the preset's (a dict such as compilation_config key
# by key: a variant names only what it changes), with bench arguments from VARIANT_ARGS.
# Carry .device/kit (and .whl: py-spy for the profile). Every log lands in $OUT/logs.tgz, the JSON
# lines in $OUT/results.jsonl; a summary table is printed last.
set -u
source .device/kit/env.sh
OUT=${OUT:-/tmp/out}
L=/tmp/runlogs/$1
# A fresh folder: a log left by an earlier call of the same step would set off its profiles at once.
rm -rf "$L"
mkdir -p "$OUT" "$L/logs" "$L/prof"
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-555}  # the call's limit is 600 s: stop runs in time to pack the logs
N=${N:-10000}
# --upgrade: the kit already made /tmp/site/bin, and pip --target skips folders that exist.
if [ -d .whl ] && [ ! -x /tmp/site/bin/py-spy ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PATH=/tmp/site/bin:$PATH
SIZES1024='[1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]'
SIZES="${SIZES1024%]}, 1280, 1536, 1792, 2048]"
SEQS2048="\"max_num_seqs\": 2048, \"compilation_config\": {\"cudagraph_capture_sizes\": $SIZES}"
SIZES4096="${SIZES%]}, 2560, 3072, 3584, 4096]"
SEQS4096="\"max_num_seqs\": 4096, \"compilation_config\": {\"cudagraph_capture_sizes\": $SIZES4096}"
# CUDA graphs for the mixed steps too (decodes plus prefill chunks, up to max_num_batched_tokens).
SIZES16K="${SIZES4096%]}, 4608, 5120, 6144, 7168, 8192, 10240, 12288, 14336, 16384]"
QUEUE8192="--max-pending-requests 8192 --max-concurrent-batches 192"
# One engine replica per GPU, vLLM sizing its KV cache (Preset.sharing_gpus(1)).
ONE="--replicas-per-gpu 1 --concurrency 1"
declare -A VARIANT=(
  [preset]='{}'
  # One engine of 4,096 sequences per GPU: the yardstick for two engines per GPU.
  [seqs4096]="{$SEQS4096}"
  # Two engines of 2,048 on one GPU, said in full (the preset runs three, Preset.sharing_gpus).
  [two2048]="{$SEQS2048, \"gpu_memory_utilization\": 0.45, \"kv_cache_memory_bytes\": 30064771072}"
  # CUDA graphs up to 16,384 tokens, on one engine of 4,096 and on the preset (not kept).
  [graphs16k]="{\"max_num_seqs\": 4096, \"compilation_config\": {\"cudagraph_capture_sizes\": $SIZES16K}}"
  [two16k]="{\"compilation_config\": {\"cudagraph_capture_sizes\": $SIZES16K}}"
  # vLLM's online FP8 quantization of the weights (needs the compressed-tensors and loguru wheels).
  [fp8]='{"quantization": "fp8"}'
)
declare -A VARIANT_ENV=()
declare -A VARIANT_ARGS=(
  [seqs4096]="$QUEUE8192 $ONE"
  [graphs16k]="$QUEUE8192 $ONE"
  [two16k]="--replicas-per-gpu 2 --concurrency 2"  # two engines, as its name says (the preset runs three)
  [two2048]="--max-pending-requests 4096 --max-concurrent-batches 96 --concurrency 2 --placement-group-config {\"bundle_per_worker\":{\"GPU\":0.5,\"CPU\":1}}"
)
# The GPU preset's engine replicas per GPU (the scale and notebook steps ask for whole GPUs).
replicas_per_gpu() { python3 -c 'from helpers.presets import get_preset; print(get_preset(False).replicas_per_gpu)'; }
left() { local s=$((START + DEADLINE_S - $(date +%s))); echo $((s > 1 ? s : 1)); }
bench() {
  timeout -s KILL "$(left)" python3 benchmarks/bench_vision.py --model "$MODEL_DIR" --dummy \
    --logdir "$L/logs" --out "$OUT/results.jsonl" "$@"
}
benchv() {  # bench with a named variant's engine kwargs, its bench arguments and environment
  local v=$1 extra=()
  shift
  read -r -a extra <<< "${VARIANT_ARGS[$v]:-}"
  [ -n "${VARIANT_ENV[$v]:-}" ] && extra+=(--env "${VARIANT_ENV[$v]}")
  bench "$@" --engine-kwargs "${VARIANT[$v]}" "${extra[@]}"
}
ray_cli() { python3 -m ray.scripts.scripts "$@"; }
# The machine's GPUs (not MIG devices, which nvidia-smi -L lists too).
gpu_count() { nvidia-smi --query-gpu=index --format=csv,noheader | wc -l; }
# One Ray cluster over both GPUs for two drivers side by side (Ray's own start is in neither figure).
cluster_up() {
  ray_cli start --head --num-gpus "$(gpu_count)" --include-dashboard=false --disable-usage-stats > "$L/ray_start.log" 2>&1
  export RAY_ADDRESS=auto
}
cluster_down() { ray_cli stop --force > /dev/null 2>&1; }
# Every engine-core process and its parent, the engine actor.
engine_pids() {
  local pids
  pids=$(pgrep -f "EngineCore|spawn_main")
  echo $pids $(for p in $pids; do ps -o ppid= -p "$p"; done | sort -u)
}
# py-spy (dump, then 10 s of samples per thread, idle threads too) of every engine-core process and
# its parent, the engine actor, once LOG shows ${3:-2},000 rows out; meanwhile nvidia-smi's view of both
# GPUs and top's per-thread CPU (is a main thread at 100 %?).
profile_at() {
  local log=$1 d="$L/prof/$2" k=${3:-2} re
  re="PROGRESS ([$k-9][0-9]{3}|[0-9]{5}) rows"
  for _ in $(seq 500); do grep -qE "$re" "$log" 2>/dev/null && break; sleep 1; done
  grep -qE "$re" "$log" 2>/dev/null || return
  mkdir -p "$d"
  date +%s > "$d/at"
  ps -eo pid,ppid,etimes,pcpu,rss,args --sort=-pcpu | cut -c1-220 > "$d/ps.txt"
  nvidia-smi --query-compute-apps=pid,gpu_bus_id,used_memory --format=csv > "$d/apps.csv" 2>&1
  nvidia-smi --query-gpu=index,pci.bus_id,utilization.gpu,memory.used --format=csv > "$d/gpus.csv" 2>&1
  nvidia-smi dmon -s u -c 12 > "$d/dmon.txt" 2>&1 &
  top -b -H -n 2 -d 5 -w 250 | awk '/^top -/{n++} n==2' | head -60 > "$d/top-threads.txt" 2>&1 &
  # PROFILE_PYSPY=0: the GPU's and top's view only. py-spy samples with --nonblocking (without it,
  # py-spy stops the process at every sample, which slows the run it profiles).
  if [ "${PROFILE_PYSPY:-1}" = 1 ]; then
    for pid in $(engine_pids); do
      py-spy dump --pid "$pid" > "$d/dump-$pid.txt" 2>&1
      timeout 40 py-spy record --pid "$pid" -d 10 -r 100 --idle --threads --nonblocking --format raw -o "$d/rec-$pid.txt" > "$d/rec-$pid.log" 2>&1 &
    done
  fi
  wait
}
# py-spy dumps of every engine-core process and its engine actor, ${4:-10} times, ${5:-3} s apart plus the
# dumps' own time (with DUMP_NATIVE=1 and four processes a round took 4-5 s), once LOG shows
# PATTERN: dumps_after LOG NAME PATTERN [COUNT] [INTERVAL]
dumps_after() {
  local log=$1 d="$L/prof/$2" pattern=$3
  for _ in $(seq 500); do grep -q "$pattern" "$log" 2>/dev/null && break; sleep 1; done
  grep -q "$pattern" "$log" 2>/dev/null || return
  mkdir -p "$d"
  for k in $(seq "${4:-10}"); do
    sleep "${5:-3}"
    date +%s > "$d/at-$k"
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader > "$d/gpu-$k.csv" 2>&1
    for pid in $(engine_pids); do
      py-spy dump --pid "$pid" > "$d/dump-$k-$pid.txt" 2>&1
      # DUMP_NATIVE=1: also the C frames (a wait inside CUDA, Triton or a lock shows only there)
      [ "${DUMP_NATIVE:-0}" = 1 ] && py-spy dump --native --pid "$pid" > "$d/native-$k-$pid.txt" 2>&1
    done
  done
}
# After the CUDA graphs: vLLM's kernel warm-up, 1 s in some starts and 11-18 s in others.
dump_after_capture() { dumps_after "$1" "$2" "Graph capturing finished" 10 2; }
summary() {
  [ -e "$OUT/results.jsonl" ] || return 0  # the notebook step writes none
  python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        print(r.get("label"), r["run"], r["attempt"], "ERROR", r["error"][-600:].replace("\n", " | "))
        continue
    b = r.get("startup_breakdown", {})
    e = r.get("engine_stats", {})
    print(f"{r['label']:>14} {r['run']:>8} #{r['attempt']} n={r['images']} ok={r['tokens_ok']} start={r['startup_s']} "
          f"steady={r['steady_images_per_s']} e2e={r['e2e_images_per_s']} ({r['e2e_s']} s) "
          f"run/wait={e.get('running_median')}/{e.get('waiting_median')} kv={e.get('kv_cache_usage_pct_max')}")
    print("      " + " ".join(f"{k}={v}" for k, v in b.items()))
    print("      " + " ".join(f"{k}={v}" for k, v in r.get("startup_vllm_reported", {}).items()))
PY
}
finish() {
  cluster_down
  tar czf "$OUT/logs.tgz" -C /tmp/runlogs "$1" 2>/dev/null
  summary
  echo "step $1 took $(($(date +%s) - START)) s"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$L/gpus.csv"
case "$1" in
alone)
  # Not side by side: pair each run with its neighbours in the same call.
  variant_of() { echo "$1"; }
  label_of() { [ "$1" = P ] && echo alone-preset || echo "alone-$1"; }
  cluster_up
  # PROFILE_RUN="k ...": py-spy, nvidia-smi and top (profile_at) during each run k (0-based) once
  # it has ${PROFILE_AT_K:-3},000 rows out (PROFILE_PYSPY=0: without py-spy).
  n=${ALONE_N:-6144}
  read -r -a who_list <<< "${ORDER:-P}"
  profs=()
  # WARMUP_DUMP_RUN="k ...": py-spy dumps every 2 s for 20 s once run k's first engine has
  # captured its CUDA graphs (dump_after_capture).
  for wk in ${WARMUP_DUMP_RUN:-}; do
    lab=$(label_of "${who_list[$wk]}")
    dump_after_capture "$L/logs/$wk/pipeline-$lab-0.log" "run$wk-$lab-warmup" &
    profs+=($!)
  done
  for pk in ${PROFILE_RUN:-}; do
    lab=$(label_of "${who_list[$pk]}")
    profile_at "$L/logs/$pk/pipeline-$lab-0.log" "run$pk-$lab" "${PROFILE_AT_K:-3}" &
    profs+=($!)
  done
  k=0
  for who in "${who_list[@]}"; do
    v=$(variant_of "$who")
    if [ "$v" = P ]; then
      bench -n "$n" --runs pipeline --workdir /tmp/bw_a --logdir "$L/logs/$k" --label "$(label_of P)"
    elif [ "$v" = original ]; then  # the tutorial's original settings (bench --runs original)
      bench -n "$n" --runs original --workdir /tmp/bw_a --logdir "$L/logs/$k" --label alone-original
    else
      benchv "$v" -n "$n" --runs pipeline --workdir /tmp/bw_a --logdir "$L/logs/$k" --label "$(label_of "$v")"
    fi
    k=$((k + 1))
  done > "$L/a.txt" 2>&1
  [ ${#profs[@]} -gt 0 ] && kill "${profs[@]}" 2>/dev/null
  finish alone ;;
tenk)
  A=${TENK_A:-preset}
  cluster_up
  benchv "$A" -n "$N" --runs pipeline --workdir /tmp/bw_a --label "tenk-$A" > "$L/a.txt" 2>&1 &
  bench -n "$N" --runs original --workdir /tmp/bw_b --label tenk > "$L/b.txt" 2>&1 &
  wait
  finish tenk ;;
scale)
  # Two GPUs and one, the preset's replicas per GPU (fixed pools of 2 and 1 x that), the same
  # $SCALE_N images (12,288) per GPU, one after the other on one Ray cluster, in the order
  # $SCALE_ORDER (words 1 and 2: GPUs).
  cluster_up
  n=${SCALE_N:-12288}
  per_gpu=$(replicas_per_gpu)
  for r in ${SCALE_ORDER:-2 1}; do
    bench -n $((r * n)) --runs pipeline --concurrency $((r * per_gpu)) --workdir /tmp/bw_scale --label "scale$r"
  done > "$L/scale.txt" 2>&1
  finish scale ;;
notebook)
  # The notebook reads real files: a model folder with random weights as safetensors, local shards.
  python3 .nbtools/make_random_weights.py "$MODEL_DIR" /tmp/model/rand3b > "$L/weights.log" 2>&1
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_vision as b; b.make_shards(__import__('pathlib').Path('/tmp/shards'), 8192)"
  # The scale-up's pool: every GPU of this machine (two on nvidia-h200-x2, one on nvidia-h200), the
  # preset's replicas on each (said, though the notebook would pick the same on an H200's 141 GB).
  gpus=$(gpu_count)
  per_gpu=$(replicas_per_gpu)
  SMOKE_TEST=0 MODEL=/tmp/model/rand3b DATASET='/tmp/shards/*.tar' NUM_IMAGES=4096 REPLICAS_PER_GPU=$per_gpu \
    SCALE_UP_IMAGES=8192 SCALE_UP_CONCURRENCY=$((gpus * per_gpu)) OUTPUT_DIR=/tmp/nbout/captions PYTHONPATH=$PWD:$PYTHONPATH \
    timeout -s KILL "$(left)" python3 .nbtools/run_notebook_cells.py llm_batch_inference_vision.ipynb > "$L/notebook.txt" 2>&1
  grep -h "=== CELL\|NB_OK" "$L/notebook.txt" | grep -v "start t=" | tail -40
  # The engines' lines stay in Ray's worker logs (the notebook sets log_to_driver=False): keep them,
  # and count each engine replica's batches (each should caption an even share of each section).
  engine_logs=$(grep -l "Elapsed time for batch" /tmp/ray/session_latest/logs/worker-*.{out,err} 2>/dev/null)
  # With each engine worker's other stream: vLLM's INFO lines (torch.compile, init engine) go to
  # .out, Ray's batch lines to .err.
  # shellcheck disable=SC2086  # a list of files
  [ -n "$engine_logs" ] && tar czf "$L/engine_logs.tgz" $(for f in $engine_logs; do ls "${f%.*}".{out,err} 2>/dev/null; done | sort -u) 2>/dev/null
  for f in $engine_logs; do echo "batches $(grep -c "Elapsed time for batch" "$f") in $(basename "$f")"; done
  finish notebook ;;
*) echo "usage: h200_x2.sh alone | tenk | scale | notebook"; exit 2 ;;
esac

#!/bin/bash
# The device runs behind benchmarks/results/*-h200x2-*.jsonl, on nvidia-h200-x2 once the kit of
# ../shared/device/README.md is staged and installed. The install call ends with
#   ...run_step.sh check; setsid bash -c 'python3 -m compileall -q -j 32 /tmp/site \
#     > /tmp/compileall.log 2>&1; touch /tmp/compileall.done' > /dev/null 2>&1 < /dev/null &
# (bytecode for the kit, which installs with --no-compile, as a pip-installed image has it).
# One step per device call:
#   bash benchmarks/h200_x2.sh startup    start-up cold and warm, side by side, N=4096 each, one Ray
#                                         cluster: GPU A the preset on a fresh machine (cold), the
#                                         preset with enforce_eager, the preset again (warm); GPU B
#                                         the original settings twice (cold, warm); py-spy at steady
#                                         state of the eager and the warm runs, py-spy dumps after
#                                         the cold run's first request. Run first after the
#                                         kit's install (it waits for the install's compileall).
#                                         2026-11-30: GPU A's third run did not fit in the call
#   bash benchmarks/h200_x2.sh probe      py-spy and nvidia-smi at steady state; the preset beside two
#                                         replicas of it on one GPU (see the step)
#   bash benchmarks/h200_x2.sh encoder    $ENC_A (mmgraph, mmcompile) beside the preset, $REPEAT (3)
#                                         runs each, N=6144: the vision encoder compiled or graphed
#                                         (2026-12-01: 2 pairs fit per call; mmgraph 0.83x, mmcompile ~1x)
#   bash benchmarks/h200_x2.sh steady     the preset beside $STEADY_B (default eager), $REPEAT (3) runs each,
#                                         N=6144 (2026-11-30, STEADY_B=oldpreset: 2 runs each fit)
#   bash benchmarks/h200_x2.sh tenk       ours ($TENK_A) and the original settings, 10,000 images
#                                         each, side by side (one GPU each: ours as the preset's
#                                         two replicas of half a GPU; one Ray cluster), both
#                                         with warm compile caches when each configuration ran
#                                         earlier on the same machine; then $FILL_A on GPU A and
#                                         $FILL_B on GPU B (see fill)
#   bash benchmarks/h200_x2.sh scale      ours on two GPUs (the fixed pool (4, 4), two replicas per
#                                         GPU) and on one (2, 2), $SCALE_N images per GPU, one
#                                         after the other
#   bash benchmarks/h200_x2.sh fp8        the preset with quantization=fp8 (GPU A) beside bf16 (GPU B),
#                                         N=12288, then $FILL_A / $FILL_B
#                                         (needs the compressed-tensors and loguru wheels in .whl)
#   bash benchmarks/h200_x2.sh notebook   the unmodified notebook with the GPU preset, random weights,
#                                         the scale-up on every GPU of the machine
#                                         (carry .nbtools: run_notebook_cells.py, make_random_weights.py;
#                                         2026-12-01 seventh session, one H200: 403.4 s, before each
#                                         replica's even share; eighth session, after it: 406.1 s,
#                                         each engine 32 batches of the first run, 64 of the scale-up)
#   bash benchmarks/h200_x2.sh alone      one GPU: $ALONE_A (default seqs2048) and the preset one
#                                         after the other, order $ORDER (default "A P A"; other
#                                         words name variants), N=$ALONE_N (default 6144)
#                                         (2026-12-01: pend2048 against Ray's default cap, 3 calls
#                                         of 3, 3 and 2 runs; later ORDER="async P async2048",
#                                         "async2048 P async2048", "async2048 P async", whose
#                                         async2048 runs became the preset; then ALONE_N=12288,
#                                         ORDER="seqs4096 P", "P seqs4096", "seqs4096 P" with
#                                         PROFILE_RUN="0 1" PROFILE_PYSPY=0, whose seqs4096 runs
#                                         became the preset; then ORDER="two2048 P two2048",
#                                         "warmrenderer P warmrenderer", "P warmrenderer P" with
#                                         ALONE_N=12288 PROFILE_AT_K=5, py-spy on; then
#                                         "graphs16k P graphs16k" (one run fit), "P graphs16k",
#                                         "two2048 P", whose two2048 run became the preset;
#                                         then "P P" (the machine's first start) and "P two16k":
#                                         the preset's steady median of 4 runs, its start-ups;
#                                         eighth session: "P fp8" (the machine's first start),
#                                         "fp8 P": FP8 with the two-engine preset; ninth:
#                                         ALONE_N=1024 "P original" (the machine's first start:
#                                         both compile caches warmed), then ALONE_N=10000
#                                         "original P" (the P run cut: the pair needs more than
#                                         a call's 600 s) and "P P", back to back: the
#                                         10,000-image ratio on one H200, 2.05).
#                                         PROFILE_RUN=k
#                                         profiles run k (py-spy, nvidia-smi, top) mid-run;
#                                         WARMUP_DUMP_RUN=k dumps run k's engines (py-spy) during
#                                         vLLM's kernel warm-up after the CUDA graphs (DUMP_NATIVE=1:
#                                         with their C frames too)
#   earlier steps: tune (the preset beside 1,024 seqs), yardstick (AsyncLLM alone beside ours)
# Variants are engine kwargs in JSON, merged into the preset's (a dict such as compilation_config key
# by key: a variant names only what it changes), with bench arguments from
# VARIANT_ARGS and an environment from VARIANT_ENV. A variant without VARIANT_ARGS changes the current
# preset (two engines per GPU since 2026-12-01's sixth session; the earlier ones ran on one engine per
# GPU, which the seqs variants restore with $ONE: seqs4096 is the preset before it). Several name a lever that is now in the preset
# (kept so the results files can be repeated): pend2048, seqs4096; seqs2048 and async2048 are the
# preset before it, seqs1024 the one before that; async is vLLM's default.
# Carry .device/kit (and .whl: py-spy for the profile). Every log lands in $OUT/logs.tgz, the JSON
# lines in $OUT/results.jsonl; a summary table is printed last.
set -u
source .device/kit/env.sh
OUT=${OUT:-/tmp/out}
L=/tmp/runlogs/$1
# A fresh folder: a log left by an earlier call of the same step would set off its profiles at once
# (it did on 2026-11-30: the second probe call's profiles ran before its engines were up).
rm -rf "$L"
mkdir -p "$OUT" "$L/logs" "$L/prof"
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-555}  # the call's limit is 600 s: stop runs in time to pack the logs
N=${N:-10000}
# --upgrade: the kit already made /tmp/site/bin, and pip --target skips folders that exist (without
# it py-spy's binary never arrived: the 2026-11-30 profiles came back empty).
if [ -d .whl ] && [ ! -x /tmp/site/bin/py-spy ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PATH=/tmp/site/bin:$PATH
SIZES1024='[1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]'
SIZES="${SIZES1024%]}, 1280, 1536, 1792, 2048]"
# The two engine sizes and their queues (bench arguments), shared by the variants below.
SEQS1024="\"max_num_seqs\": 1024, \"compilation_config\": {\"cudagraph_capture_sizes\": $SIZES1024}"
SEQS2048="\"max_num_seqs\": 2048, \"compilation_config\": {\"cudagraph_capture_sizes\": $SIZES}"
QUEUE2048="--max-pending-requests 2048 --max-concurrent-batches 48"
QUEUE4096="--max-pending-requests 4096 --max-concurrent-batches 96"
SIZES4096="${SIZES%]}, 2560, 3072, 3584, 4096]"  # the preset's CUDA graph sizes
SEQS4096="\"max_num_seqs\": 4096, \"compilation_config\": {\"cudagraph_capture_sizes\": $SIZES4096}"
# Piecewise CUDA graphs for the mixed steps too: at steady state every step admits new requests, so it
# holds more than 4,096 tokens (decodes plus prefill chunks, up to max_num_batched_tokens 16,384),
# and vLLM runs any step above the largest captured size without graphs (cg_mode NONE; the 2026-12-01
# py-spy profile saw no graph replay in 10 s, and 10-11% of the engine core's thread launching the
# decoder's compiled kernels from Python). Not measured yet.
SIZES16K="${SIZES4096%]}, 4608, 5120, 6144, 7168, 8192, 10240, 12288, 14336, 16384]"
QUEUE8192="--max-pending-requests 8192 --max-concurrent-batches 192"
# One engine replica per GPU, vLLM sizing its KV cache (Preset.sharing_gpus(1)): every preset before
# 2026-12-01's sixth session. The preset since runs two per GPU.
ONE="--replicas-per-gpu 1 --concurrency 1"
declare -A VARIANT=(
  [preset]='{}'
  [eager]='{"enforce_eager": true}'
  [nocompile]='{"compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}'
  # The preset before 2026-12-01's second session: 1,024 sequences, a queue of 2,048 (VARIANT_ARGS).
  [seqs1024]="{$SEQS1024}"
  # 2,048 sequences and a queue of 4,096 (VARIANT_ARGS): the preset of 2026-12-01's second
  # session (1.29x over seqs1024).
  [seqs2048]="{$SEQS2048}"
  # Twice that again: 4,096 sequences, a queue of 8,192, graph sizes up to 4,096: the preset
  # since 2026-12-01's third session (1.14x over seqs2048). A wave is then 4,096 images: run it
  # with ALONE_N=12288 (three waves) so the steady window holds two.
  [seqs4096]="{$SEQS4096}"
  # The same 4,096 sequences as two engines of 2,048 on one GPU (VARIANT_ARGS: two replicas of half
  # a GPU each), so two engine-core threads and two engine actors feed it: at 4,096 both threads of
  # one engine were busy 83-98% (2026-12-01). Each gets a fixed KV cache (2,048 sequences peaked at
  # 22.6 GiB), or the second engine finds no memory left when both profile at once (2026-11-30).
  # With ALONE_N=12288 each engine gets 6,144 images, three waves of 2,048. Both its runs are void:
  # the first engine up took all 12,288 rows and Ray Data shut the second down, as in that day's
  # scale. 2026-12-01 (FILL_A after tenk): Ray's default max_tasks_in_flight_per_actor; 2026-12-01,
  # one H200, ORDER="two2048 P two2048" (only the first run fit): a cap of 96 tasks, but a task was a
  # block of 256 rows (four batches). Now Preset.replica_tasks_in_flight counts rows, and the
  # preset's blocks are one batch.
  # Measured with one engine of 4,096 (VARIANT_ARGS): 2026-12-01 sixth session, one H200, the
  # machine's first start alone (173.63), then ORDER="P graphs16k": 160.72 against the one-engine
  # preset's 146.15 (one pair, 1.10x). Not kept: two engines per GPU did far more.
  [graphs16k]="{\"max_num_seqs\": 4096, \"compilation_config\": {\"cudagraph_capture_sizes\": $SIZES16K}}"
  # The same on the two-engine preset: each engine's steps hold up to 16,384 tokens too. 2026-12-01
  # seventh session, one H200, ORDER="P two16k": 219.86 against the preset's 197.64 (one pair, 1.11x,
  # inside the preset's own spread that session, 198-228; 18 GiB more GPU memory). Not kept.
  [two16k]="{\"compilation_config\": {\"cudagraph_capture_sizes\": $SIZES16K}}"
  # two2048 is the preset since 2026-12-01's sixth session: ORDER="two2048 P" on one H200 (the cap
  # counting rows; each engine captioned 96 batches, 6,144 rows): 221.43 images/s steady against
  # 139.86 for one engine of 4,096 (1.58x, one pair; start-up 157.0 s, its compile cache cold,
  # against 141.6 s).
  [two2048]="{$SEQS2048, \"gpu_memory_utilization\": 0.45, \"kv_cache_memory_bytes\": 30064771072}"
  # The preset of 2026-11-30 (vLLM's 83 CUDA graph sizes up to 1,024, 32 concurrent batches).
  [oldpreset]='{"max_num_seqs": 1024, "compilation_config": {"cudagraph_capture_sizes": null, "max_cudagraph_capture_size": 1024}}'
  # The vision encoder, a third of the engine core's thread at steady state (probe, 2026-11-30):
  # torch.compile'd (both vLLM versions), or captured in CUDA graphs (vLLM 0.26 only with its V1
  # model runner: its default V2 runner ignores cudagraph_mm_encoder; vLLM 0.29's V2 runner has it).
  [mmcompile]='{"compilation_config": {"compile_mm_encoder": true}}'
  [mmgraph]='{"compilation_config": {"cudagraph_mm_encoder": true}}'
  # Without the preset's mm_processor_kwargs: transformers deep-copies the processor kwargs, with
  # vLLM's tokenizer among them, when vLLM builds the HF processor at the first request
  # (2026-12-01, steady REPEAT=3: one pair fit; the wait was not shorter).
  [nomaxpix]='{"mm_processor_kwargs": null}'
  # More requests inside the engine than Ray Data LLM's default cap (1.1 x max_num_seqs = 1,127):
  # vLLM prepares an image only when its request enters the engine, so with the default only ~100
  # prepared requests wait when a wave of 1,024 finishes together (2026-12-01 logs: waiting 0,
  # running falls as low as 530-670 while the engine actor prepares the next ones one by one).
  # Run at 1,024 sequences; the queue is now the preset's at 2,048 sequences.
  [pend2048]="{$SEQS1024}"
  # vLLM's async scheduling (CPU work of the next step while the GPU runs this one): vLLM 0.26 and
  # 0.29 turn it on by default (the log says "Asynchronous scheduling is enabled" for the preset
  # too), so setting it changes nothing: 2026-12-01, one pair at 1,024 sequences, 150.53 against
  # 137.81, is the spread between identical runs.
  [async]="{\"async_scheduling\": true, $SEQS1024}"
  [async2048]="{\"async_scheduling\": true, $SEQS2048}"
  # The preset with benchmarks/warmhook (VARIANT_ARGS --warm-renderer): vLLM's HF processor built
  # while the engine starts, not at the first request (10 s of the actor's CPU in AsyncLLM on the
  # project's CPU machine with the 3B tokenizer; 16-23 s of idle GPU). 2026-12-01 on one H200,
  # ORDER="warmrenderer P warmrenderer" then "P warmrenderer P" (the third runs were cut): the
  # warm-up took 19.4 and 21.4 s and the first batch reached the vision encoder 3-4 s after it went
  # in (23-25 s for the preset), but the engine started later beside it: start-up 140.5 and 131.2 s
  # against 134.1 and 144.0. No net gain; not in the preset.
  [warmrenderer]='{}'
  # The current preset (two engines per GPU) in FP8 (vLLM's online quantization of the weights;
  # needs the compressed-tensors and loguru wheels in .whl). The fp8 step runs the one-engine
  # preset of its time beside bf16 on the other GPU; this one runs in `alone` on one GPU.
  [fp8]='{"quantization": "fp8"}'
)
declare -A VARIANT_ENV=([mmgraph]=VLLM_USE_V2_MODEL_RUNNER=0)
declare -A VARIANT_ARGS=(
  [seqs1024]="$QUEUE2048 $ONE"
  [pend2048]="$QUEUE2048 $ONE"
  [async]="$QUEUE2048 $ONE"
  [seqs2048]="$QUEUE4096 $ONE"
  [async2048]="$QUEUE4096 $ONE"
  [seqs4096]="$QUEUE8192 $ONE"
  [graphs16k]="$QUEUE8192 $ONE"
  [two2048]="$QUEUE4096 --concurrency 2 --placement-group-config {\"bundle_per_worker\":{\"GPU\":0.5,\"CPU\":1}}"
  [oldpreset]="--max-concurrent-batches 32 --max-pending-requests 1127 $ONE"  # Ray Data LLM's default queue
  [warmrenderer]="--warm-renderer"
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
# After vLLM's first request: what the ~24 s before the vision encoder's first kernel are spent on.
dump_after_first_request() { dumps_after "$1" "$2" "Passing raw prompts to InputProcessor"; }
# After the CUDA graphs: vLLM's kernel warm-up, about 1 s in 6 of 18 starts (one or two engines per GPU)
# and 11-18 s in the other 12, two engines finishing it together (2026-12-01; the ninth session's three
# warm starts, dumped, all took about 1 s): what they wait on.
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
# Where each engine ran, every 15 s while the step runs: its GPU, the CPU core its processes were
# last on and their CPU use. The steady rate falls in two groups (89-96 and 118-149 images/s)
# with nothing changed (2026-12-01); this is the record to tell GPU, NUMA node or core apart.
where_sampler() {
  nvidia-smi topo -m > "$L/topo.txt" 2>&1
  lscpu > "$L/lscpu.txt" 2>&1
  while sleep 15; do
    echo "== $(date +%s)"
    nvidia-smi --query-compute-apps=pid,gpu_bus_id,used_memory --format=csv,noheader 2>&1
    for pid in $(engine_pids); do ps -o pid=,ppid=,psr=,pcpu=,comm= -p "$pid"; done
  done >> "$L/where.txt" 2>&1
}
where_sampler &
WHERE=$!
disown $WHERE  # else the steps' bare `wait` would wait for it forever
trap 'kill $WHERE 2>/dev/null' EXIT
# The preset (labelled PREFIX-preset) beside variant VARIANT (PREFIX-VARIANT), one driver per GPU on
# one Ray cluster, started at the same moment, $REPEAT (3) runs each, N=6144: beside_preset PREFIX VARIANT
# Side by side on one Ray cluster, a driver keeps a GPU of its own only with one replica per GPU:
# Ray places half-GPU replicas on the first GPU with room, so the preset's two replicas and the
# other driver's could share a GPU. So both sides run with $SIDE (default $ONE: one engine of the
# preset's 2,048 sequences per GPU); the two-replica preset itself is measured with `alone`.
SIDE=${SIDE-$ONE}
beside_preset() {
  cluster_up
  # shellcheck disable=SC2086  # $SIDE is a list of arguments
  bench -n 6144 --runs pipeline --repeat "${REPEAT:-3}" --workdir /tmp/bw_a --label "$1-preset" $SIDE > "$L/a.txt" 2>&1 &
  # shellcheck disable=SC2086
  benchv "$2" -n 6144 --runs pipeline --repeat "${REPEAT:-3}" --workdir /tmp/bw_b --label "$1-$2" $SIDE > "$L/b.txt" 2>&1 &
  wait
}
# After a step's run on GPU a or b: variant $1 (original: the original settings; fp8: the preset
# in fp8; else a variant of VARIANT) with $FILL_N (2,048) images, e.g. to warm a configuration's
# compile cache for a later call on the same machine. Nothing when $1 is empty.
fill() {
  local v=$1 n=${FILL_N:-2048}
  [ -z "$v" ] && return
  case "$v" in
  original | fp8) bench -n "$n" --runs "$v" --workdir "/tmp/bw_$2" --label "fill-$v" ;;
  *) benchv "$v" -n "$n" --runs pipeline --workdir "/tmp/bw_$2" --label "fill-$v" ;;
  esac
}
finish() {
  kill $WHERE 2>/dev/null
  cluster_down
  tar czf "$OUT/logs.tgz" -C /tmp/runlogs "$1" 2>/dev/null
  summary
  echo "step $1 took $(($(date +%s) - START)) s"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$L/gpus.csv"
case "$1" in
startup)
  # Python bytecode for the kit, as a pip-installed image has it (run_step.sh installs with
  # --no-compile): started in the background at install; wait for it here.
  for _ in $(seq 120); do [ -e /tmp/compileall.done ] && break; sleep 1; done
  cluster_up
  {
    bench -n 4096 --runs pipeline --workdir /tmp/bw_a --label cold-preset
    benchv eager -n 4096 --runs pipeline --workdir /tmp/bw_a --label eager
    bench -n 4096 --runs pipeline --workdir /tmp/bw_a --label warm-preset
  } > "$L/a.txt" 2>&1 &
  pa=$!
  bench -n 4096 --runs original --repeat 2 --workdir /tmp/bw_b --label startup > "$L/b.txt" 2>&1 &
  pb=$!
  profile_at "$L/logs/pipeline-eager-0.log" eager &
  p1=$!
  profile_at "$L/logs/pipeline-warm-preset-0.log" warm-preset &
  p2=$!
  dump_after_first_request "$L/logs/pipeline-cold-preset-0.log" first-request &
  p3=$!
  wait $pa $pb
  kill $p1 $p2 $p3 2>/dev/null
  finish startup ;;
probe)
  # Where the ~40 ms decode step goes, and whether a second engine on the same GPU is the lever.
  # One Ray cluster over both GPUs (Ray fills a GPU's halves first, so the halves share one GPU):
  # A the preset twice (cold, warm), N=6144; B the preset as two replicas on one GPU (half a GPU and
  # 20 GiB of KV cache each), N=12288, twice. py-spy on every engine at steady state of both first
  # runs; dumps every 3 s after the first request of A's runs (the ~24 s before the first vision kernel).
  for _ in $(seq 120); do [ -e /tmp/compileall.done ] && break; sleep 1; done
  cluster_up
  TWO='{"bundle_per_worker": {"GPU": 0.5, "CPU": 1}}'
  TWO_KW='{"gpu_memory_utilization": 0.45, "kv_cache_memory_bytes": 21474836480}'
  # shellcheck disable=SC2086  # the preset of the time: one engine per GPU
  bench -n 6144 --runs pipeline --repeat 2 --workdir /tmp/bw_a --label probe-preset $ONE > "$L/a.txt" 2>&1 &
  pa=$!
  bench -n 12288 --runs pipeline --repeat 2 --concurrency 2 --placement-group-config "$TWO" \
    --engine-kwargs "$TWO_KW" --workdir /tmp/bw_b --label probe-2pergpu > "$L/b.txt" 2>&1 &
  pb=$!
  dump_after_first_request "$L/logs/pipeline-probe-preset-0.log" first-request-cold &
  p1=$!
  dump_after_first_request "$L/logs/pipeline-probe-preset-1.log" first-request-warm &
  p2=$!
  profile_at "$L/logs/pipeline-probe-preset-0.log" preset-steady 2 &
  p3=$!
  profile_at "$L/logs/pipeline-probe-2pergpu-0.log" 2pergpu-steady 4 &
  p4=$!
  wait $pa $pb
  kill $p1 $p2 $p3 $p4 2>/dev/null
  finish probe ;;
encoder)
  beside_preset enc "${ENC_A:-mmgraph}"
  finish encoder ;;
steady)
  beside_preset steady "${STEADY_B:-eager}"
  finish steady ;;
alone)
  # One GPU (nvidia-h200, when two are not lent): the preset (P) and $ALONE_A (A) one after the
  # other on one Ray cluster, in the order $ORDER (default "A P A"; any other word names a variant,
  # e.g. ORDER="async P seqs2048", and "original" the tutorial's original settings), N=$ALONE_N
  # (default 6144) each. Not side by side: pair each run with its
  # neighbours in the same call.
  A=${ALONE_A:-seqs2048}
  variant_of() { [ "$1" = A ] && echo "$A" || echo "$1"; }
  label_of() { local v; v=$(variant_of "$1"); [ "$v" = P ] && echo alone-preset || echo "alone-$v"; }
  cluster_up
  # PROFILE_RUN="k ...": py-spy, nvidia-smi and top (profile_at) during each run k (0-based) once
  # it has ${PROFILE_AT_K:-3},000 rows out (PROFILE_PYSPY=0: without py-spy).
  n=${ALONE_N:-6144}
  read -r -a who_list <<< "${ORDER:-A P A}"
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
  {
    benchv "$A" -n "$N" --runs pipeline --workdir /tmp/bw_a --label "tenk-$A"
    fill "${FILL_A:-}" a
  } > "$L/a.txt" 2>&1 &
  {
    bench -n "$N" --runs original --workdir /tmp/bw_b --label tenk
    fill "${FILL_B:-}" b
  } > "$L/b.txt" 2>&1 &
  wait
  finish tenk ;;
scale)
  # Two GPUs and one, the preset's two replicas per GPU (fixed pools (4, 4) and (2, 2)), the same
  # $SCALE_N (12,288: three waves of 2,048 per replica) per GPU, one after the other on one Ray
  # cluster, in the order $SCALE_ORDER (words 1 and 2: GPUs).
  cluster_up
  n=${SCALE_N:-12288}
  per_gpu=$(replicas_per_gpu)
  for r in ${SCALE_ORDER:-2 1}; do
    bench -n $((r * n)) --runs pipeline --concurrency $((r * per_gpu)) --workdir /tmp/bw_scale --label "scale$r"
  done > "$L/scale.txt" 2>&1
  finish scale ;;
fp8)
  cluster_up
  # One replica per GPU on each side ($SIDE, see beside_preset).
  # shellcheck disable=SC2086
  { bench -n 12288 --runs fp8 --workdir /tmp/bw_a --label fp8 $SIDE; fill "${FILL_A:-}" a; } > "$L/a.txt" 2>&1 &
  # shellcheck disable=SC2086
  { bench -n 12288 --runs pipeline --workdir /tmp/bw_b --label bf16 $SIDE; fill "${FILL_B:-}" b; } > "$L/b.txt" 2>&1 &
  wait
  finish fp8 ;;
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
  # The engines' lines stay in Ray's worker logs (the notebook sets log_to_driver=False; the 2026-12-01
  # run kept none): keep them, and count each engine replica's batches, first run and scale-up
  # (each replica should caption about an even share of each: replica_tasks_in_flight).
  engine_logs=$(grep -l "Elapsed time for batch" /tmp/ray/session_latest/logs/worker-*.{out,err} 2>/dev/null)
  # With each engine worker's other stream: vLLM's INFO lines (torch.compile, init engine) go to
  # .out, Ray's batch lines to .err (2026-12-01 call 18 kept only the .err files).
  # shellcheck disable=SC2086  # a list of files
  [ -n "$engine_logs" ] && tar czf "$L/engine_logs.tgz" $(for f in $engine_logs; do ls "${f%.*}".{out,err} 2>/dev/null; done | sort -u) 2>/dev/null
  for f in $engine_logs; do echo "batches $(grep -c "Elapsed time for batch" "$f") in $(basename "$f")"; done
  finish notebook ;;
tune)
  cluster_up
  bench -n 6144 --runs pipeline --workdir /tmp/bw_a --label tune-preset > "$L/tune_a.txt" 2>&1 &
  bench -n 6144 --runs pipeline --workdir /tmp/bw_b --label tune-1024 --max-concurrent-batches 32 \
    --engine-kwargs '{"max_num_seqs": 1024, "compilation_config": {"max_cudagraph_capture_size": 1024}}' \
    > "$L/tune_b.txt" 2>&1 &
  wait
  finish tune ;;
yardstick)
  CUDA_VISIBLE_DEVICES=0 bench -n "$N" --runs engine_async --workdir /tmp/bw_async --label yardstick \
    > "$L/engine_async.txt" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 bench -n "$N" --runs pipeline --cumulative --workdir /tmp/bw_cum --label cumulative \
    > "$L/cumulative.txt" 2>&1 &
  wait
  finish yardstick ;;
*) echo "usage: h200_x2.sh startup | probe | encoder | steady | alone | tenk | scale | fp8 | notebook | tune | yardstick"; exit 2 ;;
esac

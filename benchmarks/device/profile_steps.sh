#!/bin/bash
# Issue #29 on the pinned stack: bench runs sampled at steady state, one after the other in one
# device call (carry .device-pinned/kit; py-spy's wheel travels in it, py_spy-*.whl), once
# run_step.sh has installed the stack on the warm machine:
#   export CALL_T0=$(date +%s)                     the call's start (each run's limit counts from it)
#   bash .device-pinned/kit/profile_steps.sh run LABEL MODE BENCH_ARGS...
#   bash .device-pinned/kit/profile_steps.sh pack  the call's runs as $OUT/LABEL.tgz, JSON lines
# MODE: pyspy  py-spy (dumps, then 10 s of samples at 100 Hz, --nonblocking --threads: one record
#              of the running samples, one --gil, and for the engines one --idle) of every
#              engine-core process, its parent (the engine actor) and the 3 busiest other
#              processes, with nvidia-smi and top
#       light  nvidia-smi and top only (no py-spy: nothing slows the run)
#       none   no sampling
# The samples start once AT_ROWS rows are out (default 9000: past the preset's first wave of
# 6,144, inside the sustained window of a 30,000-row run). Each run is bench_vision.py through
# pinned_steps.sh (its --label LABEL), killed DEADLINE_S (default 575) s after CALL_T0; a run with
# under MIN_LEFT_S (default 200) s left is skipped; a run that stalls is stopped (watch, below).
# The bench's JSON line and a py-spy summary (pyspy_summary.py) are printed.
# At N=30,000 and 48 tokens a fresh machine's first run needs about 400 s (first caption near
# 300 s), a later one on the warm machine 260-310 s: runs and times in benchmarks/README.md.
K=$(cd "$(dirname "$0")" && pwd)
source "$K/env.sh"
OUT=${OUT:-/tmp/out}
P=/tmp/prof
mkdir -p "$OUT" "$P"
CALL_T0=${CALL_T0:-$(date +%s)}
left() { echo $((CALL_T0 + ${DEADLINE_S:-575} - $(date +%s))); }
PYSPY=/tmp/pyspy/bin/py-spy
pyspy() {  # py-spy from the carried wheel, unpacked once per machine
  if [ ! -x $PYSPY ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pyspy \
      "$K"/py_spy-*.whl > /dev/null 2>&1
  fi
  $PYSPY "$@"
}
rows_out() { grep -oE "PROGRESS [0-9]+ rows" "$1" 2>/dev/null | tail -1 | awk '{print $2}'; }
# Every engine-core process (VLLM::EngineCore, or spawn_main where setproctitle is missing) and its
# parent, the engine actor (ray::MapWorker(MapBatches(vLLMEngineStageUDF))).
engine_cores() { pgrep -f "EngineCore|spawn_main" | sort -n; }
engine_actors() { for p in $(engine_cores); do ps -o ppid= -p "$p"; done | tr -d ' ' | sort -un; }
# The busiest other processes (Ray Data's CPU stages, the driver, raylet), by CPU over 2 s.
others() {
  local skip
  skip=" $(engine_cores | tr '\n' ' ') $(engine_actors | tr '\n' ' ') "
  top -b -n 2 -d 2 -w 200 | awk '/^top -/{n++} n==2 && $1 ~ /^[0-9]+$/ {print $1, $9, $12}' |
    grep -vE "py-spy|nvidia-smi|top|pgrep" | while read -r pid cpu _; do
      [[ $skip == *" $pid "* ]] || echo "$pid $cpu"
    done | sort -k2 -nr | head -"${1:-3}" | awk '{print $1}'
}
sample() {  # sample LOG DIR MODE
  local log=$1 d=$2 mode=$3 at=${AT_ROWS:-9000} r
  for _ in $(seq 600); do
    r=$(rows_out "$log"); [ "${r:-0}" -ge "$at" ] && break
    grep -q "^ *[0-9.]*| RESULT " "$log" 2>/dev/null && return
    sleep 1
  done
  [ "${r:-0}" -ge "$at" ] || return
  mkdir -p "$d"
  echo "$(date +%s.%N) rows_out=$r" > "$d/at.txt"
  ps -eo pid,ppid,nlwp,etimes,pcpu,rss,args --sort=-pcpu | cut -c1-240 | head -60 > "$d/ps.txt"
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv > "$d/gpu-apps.csv" 2>&1
  timeout 21 nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,power.draw,clocks.sm \
    --format=csv,noheader -lms 500 > "$d/gpu-util.csv" 2>&1 &
  nvidia-smi dmon -s u -c 20 > "$d/dmon.txt" 2>&1 &
  top -b -n 4 -d 5 -w 250 | awk '/^top -/{n++; k=0} {k++} k<=45' > "$d/top-procs.txt" 2>&1 &
  top -b -H -n 4 -d 5 -w 250 | awk '/^top -/{n++; k=0} {k++} k<=70' > "$d/top-threads.txt" 2>&1 &
  if [ "$mode" = pyspy ]; then
    local pids cores actors
    cores=$(engine_cores | tr '\n' ' '); actors=$(engine_actors | tr '\n' ' ')
    pids="$cores $actors $(others 3 | tr '\n' ' ')"
    echo "cores: $cores" > "$d/pids.txt"; echo "actors: $actors" >> "$d/pids.txt"; echo "all: $pids" >> "$d/pids.txt"
    for pid in $pids; do
      ps -o pid=,args= -p "$pid" | cut -c1-200 >> "$d/pids.txt"
      pyspy dump --pid "$pid" > "$d/dump0-$pid.txt" 2>&1
    done
    for pid in $pids; do  # act: without --idle (the samples where the OS ran the thread)
      for kind in act gil idle; do
        [ $kind = idle ] && [[ " $cores $actors " != *" $pid "* ]] && continue
        flag=(); [ $kind = gil ] && flag=(--gil); [ $kind = idle ] && flag=(--idle)
        # the binary, not the pyspy function: timeout runs programs only
        timeout 40 $PYSPY record --pid "$pid" -d 10 -r 100 "${flag[@]}" --threads --nonblocking --format raw \
          -o "$d/rec-$kind-$pid.txt" > "$d/rec-$kind-$pid.log" 2>&1 &
      done
    done
    sleep 12
    for pid in $pids; do pyspy dump --pid "$pid" > "$d/dump1-$pid.txt" 2>&1; done
  fi
  wait
  echo "$(date +%s.%N) rows_out=$(rows_out "$log")" >> "$d/at.txt"
}
# A run that stalls is stopped early, after py-spy dumps of its engines (why it hangs): no row out
# FIRST_ROW_S (default 420) s after its start, or no new row for STALL_S (default 90) s. A fresh
# machine's first caption comes near 300 s, and a variant whose graph is not in the compile cache
# (FP8: 72 s of torch.compile) adds a minute or more to that.
watch() {  # watch LOG PID DIR
  local t0 last=0 since r now
  t0=$(date +%s); since=$t0
  while kill -0 "$2" 2> /dev/null; do
    sleep 5
    r=$(rows_out "$1"); r=${r:-0}; now=$(date +%s)
    [ "$r" != "$last" ] && { last=$r; since=$now; }
    if { [ "$r" = 0 ] && [ $((now - t0)) -gt "${FIRST_ROW_S:-420}" ]; } ||
      { [ "$r" != 0 ] && [ $((now - since)) -gt "${STALL_S:-90}" ]; }; then
      echo "STALL: rows_out=$r at $((now - t0)) s, none new for $((now - since)) s: dumps, then stop"
      mkdir -p "$3/stall"
      nvidia-smi > "$3/stall/nvidia-smi.txt" 2>&1
      ps -eo pid,ppid,pcpu,rss,args --sort=-pcpu | cut -c1-200 | head -40 > "$3/stall/ps.txt"
      for pid in $(engine_cores) $(engine_actors); do pyspy dump --pid "$pid" > "$3/stall/dump-$pid.txt" 2>&1; done
      kill -TERM "$2"; return
    fi
  done
}
# The log bench_vision.py writes for the first of --runs (RUN-LABEL-0.log; default pipeline): the
# file the sampler and the watch read rows from. A wrong name reads as no row out, and the watch
# stops a healthy run as stalled.
bench_log() {  # bench_log DIR LABEL BENCH_ARGS...
  local dir=$1 label=$2 run=pipeline prev=""; shift 2
  for a in "$@"; do
    [ "$prev" = --runs ] && run=$a
    case $a in --runs=*) run=${a#--runs=} ;; esac
    prev=$a
  done
  echo "$dir/logs/${run%%,*}-$label-0.log"
}
case "$1" in
log)  # the log a run's rows are read from: profile_steps.sh log LABEL BENCH_ARGS...
  label=$2; shift 2; bench_log "$P/$label" "$label" "$@" ;;
run)
  label=$2 mode=$3; shift 3
  D=$P/$label; rm -rf "$D"; mkdir -p "$D"
  echo "$label" >> "$P/call-$CALL_T0.list"  # pack takes this call's runs only
  if [ "$(left)" -lt "${MIN_LEFT_S:-200}" ]; then echo "SKIP $label: $(left) s left"; exit 3; fi
  echo "RUN $label mode=$mode left=$(left)s args: $*"
  OUT=$D timeout -s KILL "$(left)" bash "$K/pinned_steps.sh" bench --label "$label" "$@" > "$D/bench.txt" 2>&1 &
  bpid=$!
  log=$(bench_log "$D" "$label" "$@")
  if [ "$mode" != none ]; then sample "$log" "$D/prof" "$mode" & spid=$!; fi
  watch "$log" $bpid "$D" & wpid=$!
  wait $bpid; rc=$?
  [ -n "${spid:-}" ] && kill "$spid" 2> /dev/null
  wait $wpid
  for f in "$D"/stall/dump-*.txt; do [ -e "$f" ] && grep -A12 -m1 "MainThread\|run_loop" "$f" | head -14; done
  if [ $rc != 0 ]; then  # cut short: stop what the run left (its Ray cluster), so the next one starts clean
    echo "bench rc=$rc"; python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1
  fi
  grep -E '^\{|wall_s' "$D/bench.txt" | cut -c1-1500
  python3 "$K/pyspy_summary.py" "$D" 2>&1 | head -"${SUMMARY_LINES:-60}"
  exit $rc ;;
pack)
  for label in $(cat "$P/call-$CALL_T0.list" 2> /dev/null); do
    cat "$P/$label/results.jsonl" >> "$OUT/results.jsonl" 2> /dev/null
    tar czf "$OUT/$label.tgz" -C "$P" "$label"
  done
  ls -la "$OUT" ;;
*) echo "usage: profile_steps.sh run LABEL pyspy|light|none BENCH_ARGS... | pack | log LABEL BENCH_ARGS..."; exit 2 ;;
esac

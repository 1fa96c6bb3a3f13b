#!/usr/bin/env bash
# `make gpu-check`: the one command for a lent GPU machine (no network there), within a time budget
# (GPU_CHECK_BUDGET_S, default 540 s: the device tool allows 600 s a call and a session has ~15 minutes in all):
#   1. build (sm_90 only, parallel) and `dlcore info`;
#   2. the GPU tests: those marked gpu or with cuda in their id (every kernel natively on CUDA tensors) and the
#      check that the CUDA extension built, under a timeout of about half the time left; the CPU suite, the
#      sm_90 static checks and the interpreter runs of the GPU tiles run on CI, not here;
#   3. `dlcore bench --device cuda` (--quick when under GPU_CHECK_FULL_BENCH_S is left) under the rest; it rewrites
#      its JSON/Markdown report after every case, so a run cut short still reports what it measured.
# The log and results go to benchmarks/results/ and, after every stage, to $OUT when the device tool sets it
# (a command killed at its limit returns only what is already under $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
export DLCORE_CUDA_ARCHS="${DLCORE_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}"
budget="${GPU_CHECK_BUDGET_S:-540}"
full_bench_s="${GPU_CHECK_FULL_BENCH_S:-360}"
results=benchmarks/results
mkdir -p "$results"
log="$results/gpu-check-$(date +%Y-%m-%d-%H%M).log"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
ship() { if [ -n "${OUT:-}" ]; then cp -r "$results"/. "$OUT"/ 2>/dev/null || true; fi; }
say() { echo "== $* ($(( $(date +%s) - start )) s elapsed, $(left) s left)" | tee -a "$log"; }

say "setup and build"
bash tools/setup_env.sh >>"$log" 2>&1 || { say "setup/build FAILED"; tail -40 "$log"; ship; exit 1; }
PY=$(cat .dlcore-python)
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  "$PY" -m dlcore.cli info; } >>"$log" 2>&1
ship

# `timeout 0` would mean no limit at all: a stage with under 30 s to run is skipped instead
limit=$(( $(left) / 2 ))
test_rc=125
if [ "$limit" -ge 30 ]; then
  say "GPU tests (limit $limit s)"
  timeout --signal=INT --kill-after=15 "$limit" \
    "$PY" -m pytest tests -q -p no:cacheprovider -rs \
    -k "((cuda or gpu) and not test_static_gpu and not test_gpu_tiles_interpreted) or test_cuda_extension_was_built_when_nvcc_is_present" \
    >>"$log" 2>&1
  test_rc=$?
  [ "$test_rc" -eq 124 ] && say "GPU tests stopped at their time limit"
  tail -25 "$log"
else
  say "GPU tests SKIPPED: the build left too little of the budget"
fi
ship

limit=$(( $(left) - 20 ))
bench_rc=125
if [ "$limit" -ge 30 ]; then
  quick=""
  [ "$(left)" -lt "$full_bench_s" ] && quick="--quick"
  say "bench $quick (limit $limit s)"
  timeout --signal=INT --kill-after=15 "$limit" \
    "$PY" -m dlcore.cli bench --device cuda $quick --out "$results" >>"$log" 2>&1
  bench_rc=$?
  [ "$bench_rc" -eq 124 ] && say "bench stopped at its time limit (the report holds the cases measured)"
else
  say "bench SKIPPED: too little of the budget left"
fi
# each op's GPU backends, fastest first, as measured (the dispatch point reads dlcore/gpu_order.json)
"$PY" - >>"$log" 2>&1 <<'PYEOF'
import glob, json, os
reports = sorted(glob.glob("benchmarks/results/cuda-*.json"), key=os.path.getmtime)
if reports:
    order = json.load(open(reports[-1])).get("gpu_order", {})
    json.dump(order, open("benchmarks/results/gpu_order.json", "w"), indent=1)
    print("measured gpu_order:", order, "-> copy benchmarks/results/gpu_order.json to dlcore/gpu_order.json")
PYEOF
say "done: tests rc=$test_rc, bench rc=$bench_rc"
ship
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

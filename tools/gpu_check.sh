#!/usr/bin/env bash
# `make gpu-check`: the one command for a lent GPU machine (no network there), under 8 minutes:
#   build (sm_90 only, parallel), `dlcore info`, the whole test suite with the GPU present (every kernel runs
#   natively on CUDA tensors, the CPU tests too), then `dlcore bench --device cuda`. Results and the log go to
#   benchmarks/results/ (and to $OUT when the device tool sets it, so they come back).
set -uo pipefail
cd "$(dirname "$0")/.."
export DLCORE_CUDA_ARCHS="${DLCORE_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}"
mkdir -p benchmarks/results
log="benchmarks/results/gpu-check-$(date +%Y-%m-%d-%H%M).log"
start=$(date +%s)
{
  echo "== setup and build"
  bash tools/setup_env.sh || exit 1
  PY=$(cat .dlcore-python)
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  "$PY" -m dlcore.cli info
  echo "== tests ($(( $(date +%s) - start )) s)"
  "$PY" -m pytest tests -q -p no:cacheprovider -rs
  test_rc=$?
  echo "== static check ($(( $(date +%s) - start )) s)"
  "$PY" -m dlcore._static_check
  echo "== bench ($(( $(date +%s) - start )) s)"
  "$PY" -m dlcore.cli bench --device cuda --out benchmarks/results
  bench_rc=$?
  # each op's GPU backends, fastest first, as measured just now (the dispatch point reads dlcore/gpu_order.json)
  "$PY" - <<'PYEOF'
import glob, json, os
reports = sorted(glob.glob("benchmarks/results/cuda-*.json"), key=os.path.getmtime)
if reports:
    order = json.load(open(reports[-1])).get("gpu_order", {})
    json.dump(order, open("benchmarks/results/gpu_order.json", "w"), indent=1)
    print("measured gpu_order:", order, "-> copy benchmarks/results/gpu_order.json to dlcore/gpu_order.json")
PYEOF
  echo "== done in $(( $(date +%s) - start )) s: tests rc=$test_rc, bench rc=$bench_rc"
  [ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
} 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then cp benchmarks/results/* "$OUT"/ 2>/dev/null || true; fi
exit "$rc"

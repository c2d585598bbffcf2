#!/usr/bin/env bash
# Everything a lent GPU session needs (see BENCHMARKS.md), as stages of one script:
#   bash benchmarks/gpu_session.sh                 # every stage, in order (may pass the device tool's 10 min)
#   bash benchmarks/gpu_session.sh build tests layer   # or a few stages per call of the device tool
# Stages: build (the extension against the machine's CUDA torch), tests (tests/test_gpu.py: the kernels against
# float64), host (host time per layer with real launches), layer (the layer table, bf16, r=16 and 64, then
# fp32 adapters on the bf16 base, float64 check of every variant), optim (issue 6), spectral (issue 5),
# e2e (issue 8). Logs and JSON go to $OUT (or ./gpu-out); each stage prints its table's tail.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests host layer optim spectral e2e)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1

run() {  # run NAME CMD...: the command's output to $OUT/NAME.txt, its tail to the console
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$OUT/$name.txt" 2>&1
  echo "(exit $?)"; tail -n 30 "$OUT/$name.txt"
}

for stage in "${STAGES[@]}"; do
  case $stage in
    build) $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
             || { tail -30 "$OUT/build.log"; exit 1; } ;;
    tests) run gpu_tests $PY -m pytest -q tests/test_gpu.py ;;
    host) run host_overhead $PY benchmarks/host_overhead.py --device cuda --json "$OUT/host_overhead.json" ;;
    layer)
      run lora_linear_bf16 $PY benchmarks/lora_linear_bench.py --dtype bf16 --r 16 64 --check \
          --json "$OUT/lora_linear_bf16.json"
      run lora_linear_bf16_fp32ad $PY benchmarks/lora_linear_bench.py --dtype bf16 --adapter-dtype fp32 \
          --r 16 64 --check --json "$OUT/lora_linear_bf16_fp32ad.json" ;;
    optim) run optim $PY benchmarks/optim_bench.py --device cuda --json "$OUT/optim.json" ;;
    spectral) run spectral_init $PY benchmarks/spectral_init_bench.py --json "$OUT/spectral_init.json" ;;
    e2e) run e2e_step $PY benchmarks/e2e_step.py --device cuda --json "$OUT/e2e_step.json" ;;
    *) echo "unknown stage $stage (build tests host layer optim spectral e2e)"; exit 2 ;;
  esac
done
exit 0

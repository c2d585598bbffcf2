#!/usr/bin/env bash
# Everything a lent GPU session needs, in one call of the device tool (see BENCHMARKS.md):
#   bash benchmarks/gpu_session.sh            # writes logs and JSON under $OUT (or ./gpu-out)
# 1. build the extension against the machine's CUDA torch; 2. the GPU tests (float64-referenced kernels);
# 3. the layer table (bf16, r=16 and 64; then fp32 adapters on the bf16 base) with a float64 check of every
# variant; 4. the optimizer and spectral-init benchmarks when present.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
$PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
$PY -m pytest -q tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"
$PY benchmarks/lora_linear_bench.py --dtype bf16 --r 16 64 --check --json "$OUT/lora_linear_bf16.json" \
    > "$OUT/lora_linear_bf16.txt" 2>&1
$PY benchmarks/lora_linear_bench.py --dtype bf16 --adapter-dtype fp32 --r 16 64 --check \
    --json "$OUT/lora_linear_bf16_fp32ad.json" > "$OUT/lora_linear_bf16_fp32ad.txt" 2>&1
if [ -f benchmarks/optim_bench.py ]; then
  $PY benchmarks/optim_bench.py --json "$OUT/optim.json" > "$OUT/optim.txt" 2>&1
fi
tail -n 45 "$OUT/lora_linear_bf16.txt"; tail -n 45 "$OUT/lora_linear_bf16_fp32ad.txt"
[ -f "$OUT/optim.txt" ] && tail -n 15 "$OUT/optim.txt"
exit 0

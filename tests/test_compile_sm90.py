"""The Triton kernels compile for an H100 (sm_90a) on a machine without a GPU: what the interpreter cannot
show (dot operand shapes, dtypes, constexpr branches, shared memory, registers) is caught in CI.

`compile_sm90.py --quick` compiles each LoRA kernel and mode once per dtype family (fp16/bf16 activations, fp32
with tf32) at the family's default config, with the arguments its launcher passes; ~40 s on 2 idle cores."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = 232448  # bytes of shared memory per block on an H100


def _field(line: str, name: str) -> str:
    return re.search(rf"\b{name}=(\S+)", line).group(1)


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_sm90.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout
    assert proc.returncode == 0 and "FAIL" not in out, out[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in out.splitlines()
             if ln.startswith(("gemm_fwd", "gemm_bwd", "xa", "dy", "reduce", "gram", "update"))]
    count = {p: sum(ln.startswith(p) for ln in lines) for p in ("gemm_fwd", "gemm_bwd", "xa", "dy", "reduce")}
    # every kernel x mode x dtype family (half, tf32): GEMM forward 2 modes, backward 6, x pass 2, dY pass 2;
    # the reduce for fp32, bf16 and fp16 adapters
    assert count == {"gemm_fwd": 4, "gemm_bwd": 12, "xa": 4, "dy": 4, "reduce": 3}, count
    # the optimizer's Gram and update kernels, A and B, bf16 and fp32, r = 16 and 64
    assert sum(ln.startswith(("gram", "update")) for ln in lines) == 16
    # quick covers both activation dtypes, fp32 adapters and every BLOCK_R
    lora = [ln for ln in lines if not ln.startswith(("gram", "update"))]
    for token in ("fp16/fp16", "bf16/bf16", "fp16/fp32", "bf16/fp32", "fp32/fp32", "br16", "br32", "br64"):
        assert any(token in ln for ln in lora), token
    # every kernel got through ptxas
    assert all("regs=-1" not in ln for ln in lines)
    # the GEMMs really use Hopper's warp-group MMA (dA-only has no base GEMM: its r-row dot is too short for it)
    assert all("wgmma=True" in ln for ln in lora if ln.startswith("gemm") and " dA-only" not in ln)
    # every default/candidate config fits in shared memory without spilling (what `tune` may pick)
    checked = [ln for ln in lora if _field(ln, "role") != "report"]
    assert len(checked) == len(lora)  # --quick compiles the defaults only
    for ln in checked:
        assert int(_field(ln, "shared")) <= SMEM_LIMIT and _field(ln, "spills") == "0", ln
    # the optimizer's fp64 kernels fit without spills at the launch parameters TritonEngine uses
    assert all("spills=0" in ln for ln in lines if ln.startswith(("gram", "update")))

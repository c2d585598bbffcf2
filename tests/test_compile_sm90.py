"""The Triton kernels compile for an H100 (sm_90a) on a machine without a GPU: what the interpreter cannot
show (dot operand shapes, dtypes, constexpr branches, shared memory) is caught in CI."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_sm90.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("gemm", "xa", "dy", "gram", "update"))]
    assert proc.returncode == 0 and "FAIL" not in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(lines) == 14 + 16  # LoRA layer kernels + the optimizer's Gram and update kernels
    # the GEMMs really use Hopper's warp-group MMA, and every kernel got through ptxas
    assert all("wgmma=True" in ln for ln in lines if ln.startswith("gemm"))
    assert all("regs=-1" not in ln for ln in lines)
    # the optimizer's fp64 kernels fit without spills at the launch parameters TritonEngine uses
    assert all("spills=0" in ln for ln in lines if ln.startswith(("gram", "update")))

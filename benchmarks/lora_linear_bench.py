"""LoRA layer forward and forward+backward against the frozen layer and the peers, measured in one run.

    python benchmarks/lora_linear_bench.py --device cuda --dtype bf16 --r 16 64 --check   # the issue-4 table
    python benchmarks/lora_linear_bench.py --device cpu --dtype fp32 --shapes 512x1024x1024 --json out.json

Variants (each on the same x, W, A, B):
  frozen      nn.Linear forward; backward computes dX only (W frozen): the floor
  lorakern    lorakern.LoRALinear with the "auto" backend (Triton kernels on CUDA, C++ on the CPU)
  lk-hybrid   (CUDA) the Triton backend with LORAKERN_BASE_GEMM=cublas: cuBLAS runs x W^T and dY W, the Triton
              passes add the rank-r terms (and dA) in place -- the other design for the dispatch choice
  lk-torch    lorakern.LoRALinear forced onto the plain-torch path (cuBLAS GEMMs, rank-r products as
              separate cuBLAS calls)
  eager       x @ W^T + b + s * (x @ A^T) @ B^T written out, autograd does the rest
  peft        peft's LoRA layer (peft.get_peft_model on a one-layer module)
  compile     torch.compile of the eager form (CUDA only; compile time excluded)
Times are medians (CUDA events on GPU, perf_counter on CPU); ratios are to `frozen` in the same run.
--check first compares every variant's y, dX, dA, dB with float64 (relative Frobenius error, column `err`).
"""
from __future__ import annotations

import argparse
from _report import save_json  # benchmarks/ is the script folder, on sys.path
import os
import statistics
import sys
import time

import torch
from torch import nn

import lorakern as lk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHAPES = ["8192x4096x4096", "8192x4096x14336", "8192x14336x4096", "2048x4096x4096"]


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _One(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def build_variants(M, k, n, r, dtype, device, adapter_dtype=None):
    """{name: module} sharing one base weight; every LoRA variant gets the same non-zero adapter."""
    g = torch.Generator(device="cpu").manual_seed(0)
    base = nn.Linear(k, n, device=device, dtype=dtype)
    base.requires_grad_(False)
    A = (torch.randn(r, k, generator=g) / k ** 0.5).to(device, adapter_dtype or dtype)
    B = (torch.randn(n, r, generator=g) * 0.01).to(device, adapter_dtype or dtype)
    out = {"frozen": base}
    ours = lk.LoRALinear.from_linear(base, r=r, alpha=2 * r, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        ours.lora_A.copy_(A)
        ours.lora_B.copy_(B)
    out["lorakern"] = ours
    if device.type == "cuda":
        out["lk-hybrid"] = ours  # same module, Triton backend with cuBLAS for the base GEMMs
    out["lk-torch"] = ours  # same module, run with the torch backend

    class Eager(nn.Module):
        def __init__(self):
            super().__init__()
            self.A, self.B = nn.Parameter(A.clone().to(dtype)), nn.Parameter(B.clone().to(dtype))

        def forward(self, x):
            return torch.addmm(base.bias, x, base.weight.t()) + ours.scaling * (x @ self.A.t()) @ self.B.t()

    out["eager"] = Eager()
    try:
        import peft
        pm = peft.get_peft_model(_One(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
        with torch.no_grad():
            pm.base_model.model.proj.lora_A["default"].weight.copy_(A)
            pm.base_model.model.proj.lora_B["default"].weight.copy_(B)
        out["peft"] = pm
    except ImportError:
        pass
    if device.type == "cuda":
        out["compile"] = torch.compile(out["eager"])
    return out


def _adapter_params(mod, r, k, n):
    """(A, B) of a variant, found by shape: (r, in) and (out, r) among its trainable parameters."""
    ps = [p for p in mod.parameters() if p.requires_grad]
    A = next((p for p in ps if tuple(p.shape) == (r, k)), None)
    B = next((p for p in ps if tuple(p.shape) == (n, r) and p is not A), None)
    return A, B


def check_errors(mod, x, dy, base, r) -> float:
    """Largest relative Frobenius error against float64 over y, dX and (for LoRA variants) dA, dB."""
    M, k = x.shape
    n = dy.shape[1]
    A, B = _adapter_params(mod, r, k, n)
    x.grad = None
    for p in (A, B):
        if p is not None:
            p.grad = None
    y = mod(x)
    y.backward(dy)
    X = x.detach().double().requires_grad_(True)
    ref = X @ base.weight.double().T + base.bias.double()
    leaves = [X]
    if A is not None:
        Ad, Bd = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
        ref = ref + 2.0 * (X @ Ad.T) @ Bd.T  # every variant has alpha = 2r: scaling 2
        leaves += [Ad, Bd]
    grads = torch.autograd.grad(ref, leaves, dy.double())
    errs = [_rel(y, ref)] + [_rel(t.grad, g) for t, g in zip([x] + ([A, B] if A is not None else []), grads)]
    return max(errs)


def _rel(a, ref) -> float:
    if a is None:
        return float("inf")
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def run_shape(M, k, n, r, dtype, device, warmup, iters, adapter_dtype=None, check=False):
    mods = build_variants(M, k, n, r, dtype, device, adapter_dtype)
    x = torch.randn(M, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, n, device=device, dtype=dtype)
    rows = {}
    for name, mod in mods.items():
        lk.set_backend("torch" if name == "lk-torch" else "auto")
        os.environ["LORAKERN_BASE_GEMM"] = "cublas" if name == "lk-hybrid" else "triton"
        err = check_errors(mod, x, dy, mods["frozen"], r) if check else None
        for p in mod.parameters():
            p.grad = None

        def fwd():
            with torch.no_grad():
                mod(x)

        def fwd_bwd():
            x.grad = None
            mod(x).backward(dy)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row = {"fwd_ms": timed(fwd, device, warmup, iters), "fwd_bwd_ms": timed(fwd_bwd, device, warmup, iters)}
        if device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        if err is not None:
            row["err"] = err
        rows[name] = row
    lk.set_backend("auto")
    os.environ.pop("LORAKERN_BASE_GEMM", None)
    floor = rows["frozen"]
    for row in rows.values():
        row["fwd_ratio"] = row["fwd_ms"] / floor["fwd_ms"]
        row["fwd_bwd_ratio"] = row["fwd_bwd_ms"] / floor["fwd_bwd_ms"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--adapter-dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="MxKxN: tokens x in x out")
    p.add_argument("--r", type=int, nargs="+", default=[16])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--check", action="store_true", help="compare every variant with float64 first")
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    adt = DTYPES[a.adapter_dtype] if a.adapter_dtype else None
    results = []
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), dtype={a.dtype}, "
          f"adapter_dtype={a.adapter_dtype or a.dtype}, torch {torch.__version__}, backends {lk.backends()}")
    print(f"{'shape':>18} {'r':>4} {'variant':>9} {'fwd ms':>9} {'x floor':>8} {'fwd+bwd ms':>11} {'x floor':>8}"
          + (f" {'peak MiB':>8}" if device.type == "cuda" else "") + (f" {'err':>8}" if a.check else ""))
    for shape in a.shapes:
        M, k, n = (int(v) for v in shape.lower().split("x"))
        for r in a.r:
            rows = run_shape(M, k, n, r, dtype, device, a.warmup, a.iters, adt, a.check)
            for name, row in rows.items():
                extra = f" {row.get('peak_mib', 0):8.0f}" if "peak_mib" in row else ""
                extra += f" {row['err']:8.1e}" if "err" in row else ""
                print(f"{shape:>18} {r:>4} {name:>9} {row['fwd_ms']:9.3f} {row['fwd_ratio']:8.2f} "
                      f"{row['fwd_bwd_ms']:11.3f} {row['fwd_bwd_ratio']:8.2f}{extra}")
                results.append({"shape": shape, "r": r, "variant": name, **row})
    save_json(a.json, {"device": str(device), "dtype": a.dtype, "adapter_dtype": a.adapter_dtype,
                       "torch": torch.__version__, "results": results})
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

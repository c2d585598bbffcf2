"""LoRA layer forward and forward+backward against the frozen layer and the peers, measured in one run.

    python benchmarks/lora_linear_bench.py --device cuda --dtype bf16            # the issue-4 table
    python benchmarks/lora_linear_bench.py --device cpu --dtype fp32 --shapes 512x1024x1024 --json out.json

Variants (each on the same x, W, A, B):
  frozen      nn.Linear forward; backward computes dX only (W frozen): the floor
  lorakern    lorakern.LoRALinear with the "auto" backend (C++ on the CPU, torch/cuBLAS on CUDA for now)
  lk-torch    lorakern.LoRALinear forced onto the plain-torch path
  eager       x @ W^T + b + s * (x @ A^T) @ B^T written out, autograd does the rest
  peft        peft's LoRA layer (peft.get_peft_model on a one-layer module)
  compile     torch.compile of the eager form (CUDA only; compile time excluded)
Times are medians (CUDA events on GPU, perf_counter on CPU); ratios are to `frozen` in the same run.
"""
from __future__ import annotations

import argparse
import json
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


def run_shape(M, k, n, r, dtype, device, warmup, iters, adapter_dtype=None):
    mods = build_variants(M, k, n, r, dtype, device, adapter_dtype)
    x = torch.randn(M, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, n, device=device, dtype=dtype)
    rows = {}
    for name, mod in mods.items():
        lk.set_backend("torch" if name == "lk-torch" else "auto")

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
        rows[name] = row
    lk.set_backend("auto")
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
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    adt = DTYPES[a.adapter_dtype] if a.adapter_dtype else None
    results = []
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), dtype={a.dtype}, "
          f"adapter_dtype={a.adapter_dtype or a.dtype}, torch {torch.__version__}, backends {lk.backends()}")
    print(f"{'shape':>18} {'r':>4} {'variant':>9} {'fwd ms':>9} {'x floor':>8} {'fwd+bwd ms':>11} {'x floor':>8}")
    for shape in a.shapes:
        M, k, n = (int(v) for v in shape.lower().split("x"))
        for r in a.r:
            rows = run_shape(M, k, n, r, dtype, device, a.warmup, a.iters, adt)
            for name, row in rows.items():
                print(f"{shape:>18} {r:>4} {name:>9} {row['fwd_ms']:9.3f} {row['fwd_ratio']:8.2f} "
                      f"{row['fwd_bwd_ms']:11.3f} {row['fwd_bwd_ratio']:8.2f}")
                results.append({"shape": shape, "r": r, "variant": name, **row})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": str(device), "dtype": a.dtype, "adapter_dtype": a.adapter_dtype,
                       "torch": torch.__version__, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""LoRA layer forward and forward+backward against the frozen layer and the peers, measured in one run.

    python benchmarks/lora_linear_bench.py --device cuda --dtype bf16 --r 16 64 --check   # the issue-4 table
    python benchmarks/lora_linear_bench.py --device cuda --dtype bf16 --adapter-dtype bf16 fp32 \
        --shapes 8192x4096x4096:16 8192x4096x4096:64 --variants frozen,lk-auto,lk-fused --check
    python benchmarks/lora_linear_bench.py --device cpu --dtype fp32 --shapes 512x1024x1024 --json out.json

Shapes are MxKxN (tokens x in x out), run at every --r, or MxKxN:r (that rank only); every shape runs with
every --adapter-dtype (default: the base dtype).

Variants (each on the same x, W, A, B; the lk-* ones are one lorakern.LoRALinear run under a design):
  frozen      nn.Linear forward; backward computes dX only (W frozen): the floor
  lk-auto     lorakern's default: on CUDA the dispatch's measured choice, on the CPU the C++ operator
  lk-cublas   torch GEMMs + the rank-r products as small GEMMs (on the CPU: the plain-torch path)
  lk-hybrid   (CUDA) cuBLAS runs x W^T and dY W, Triton passes add the rank-r terms (and dA) in place
  lk-fused    (CUDA) the Triton GEMM with the rank-r term as its accumulator's start
  eager       x @ W^T + b + s * (x @ A^T) @ B^T written out, autograd does the rest
  peft        peft's LoRA layer (peft.get_peft_model on a one-layer module)
  compile     torch.compile of the eager form (CUDA only; compile time excluded)
A design is selected with lorakern.set_design and restored afterwards. --variants picks a subset (frozen always runs: it is the floor); variants that do not
exist on the device are dropped, so one command line serves the CPU and CUDA.
Times are medians (CUDA events on GPU, perf_counter on CPU); ratios are to `frozen` in the same run.
--check first compares every variant's y, dX, dA, dB with float64 (relative Frobenius error, column `err`).
"""
from __future__ import annotations

import argparse
import contextlib
from _report import save_json  # benchmarks/ is the script folder, on sys.path
import statistics
import sys
import time

import torch
from torch import nn

import lorakern as lk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHAPES = ["8192x4096x4096", "8192x4096x14336", "8192x14336x4096", "2048x4096x4096"]
# lk-* variant -> lorakern design (lorakern.set_design); every lk-* variant is the same LoRALinear module
DESIGNS = {"lk-auto": "auto", "lk-cublas": "cublas", "lk-hybrid": "hybrid", "lk-fused": "fused"}
VARIANTS = ["frozen", *DESIGNS, "eager", "peft", "compile"]
CUDA_ONLY = ("lk-hybrid", "lk-fused", "compile")


def parse_shape(spec: str, ranks: list[int]) -> list[tuple[int, int, int, int]]:
    """'MxKxN' -> [(M, K, N, r) for every r in ranks]; 'MxKxN:r' -> [(M, K, N, r)]."""
    dims, _, rank = spec.lower().partition(":")
    try:
        M, k, n = (int(v) for v in dims.split("x"))
        rs = [int(rank)] if rank else list(ranks)
    except ValueError:
        raise ValueError(f"shape {spec!r}: expected MxKxN or MxKxN:r (tokens x in x out : rank)") from None
    return [(M, k, n, r) for r in rs]


def available_variants(requested: list[str], device: torch.device) -> list[str]:
    """The requested variants that exist on `device`, in VARIANTS order, with frozen (the floor) first."""
    unknown = sorted(set(requested) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {VARIANTS}")
    wanted = set(requested) | {"frozen"}
    return [v for v in VARIANTS if v in wanted and (device.type == "cuda" or v not in CUDA_ONLY)]


@contextlib.contextmanager
def design(variant: str, device: torch.device):
    """Runs the body under the lorakern design of an lk-* variant (other variants: as configured); restores the
    backend and the design afterwards. On the CPU designs do not apply: lk-cublas is the plain-torch path, the
    other lk-* variants the C++ operator."""
    name = DESIGNS.get(variant)
    saved = (lk.get_backend(), lk.get_design())
    try:
        if name == "cublas" and device.type != "cuda":
            lk.set_backend("torch")
        elif name is not None:
            lk.set_backend("auto")  # the design decides, not a backend left in the environment
            if device.type == "cuda":
                lk.set_design(name)
        yield
    finally:
        lk.set_backend(saved[0])
        lk.set_design(saved[1])


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


def build_variants(M, k, n, r, dtype, device, adapter_dtype=None, variants=None):
    """{name: module} sharing one base weight; every LoRA variant gets the same non-zero adapter. `variants`:
    the names to keep (default: every one available here; frozen is always built)."""
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
    for name in DESIGNS:  # one module; `design(name, device)` selects how it runs
        out[name] = ours

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
    keep = available_variants(variants or VARIANTS, device)
    return {name: mod for name, mod in out.items() if name in keep}


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


def measure(mod, x, dy, device, warmup, iters) -> dict:
    """fwd_ms and fwd_bwd_ms of one variant (and its peak memory on CUDA)."""
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
    return row


def run_shape(M, k, n, r, dtype, device, warmup, iters, adapter_dtype=None, check=False, variants=None):
    mods = build_variants(M, k, n, r, dtype, device, adapter_dtype, variants)
    x = torch.randn(M, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, n, device=device, dtype=dtype)
    rows = {}
    for name, mod in mods.items():
        with design(name, device):
            err = check_errors(mod, x, dy, mods["frozen"], r) if check else None
            for p in mod.parameters():
                p.grad = None
            rows[name] = measure(mod, x, dy, device, warmup, iters)
        if err is not None:
            rows[name]["err"] = err
    floor = rows["frozen"]
    for row in rows.values():
        row["fwd_ratio"] = row["fwd_ms"] / floor["fwd_ms"]
        row["fwd_bwd_ratio"] = row["fwd_bwd_ms"] / floor["fwd_bwd_ms"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--adapter-dtype", nargs="+", default=None, choices=sorted(DTYPES),
                   help="one run per adapter dtype (default: the base dtype)")
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES,
                   help="MxKxN (at every --r) or MxKxN:r: tokens x in x out : rank")
    p.add_argument("--r", type=int, nargs="+", default=[16])
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {VARIANTS} (frozen always runs)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--check", action="store_true", help="compare every variant with float64 first")
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    try:
        cases = [case for spec in a.shapes for case in parse_shape(spec, a.r)]
        variants = available_variants([v for v in a.variants.split(",") if v], device)
    except ValueError as exc:
        p.error(str(exc))
    adapter_dtypes = a.adapter_dtype or [a.dtype]
    print_header(device, a, adapter_dtypes)
    header = {"device": str(device), "dtype": a.dtype, "adapter_dtypes": adapter_dtypes, "variants": variants,
              "design_api": getattr(lk, "set_design", None) is not None, "torch": torch.__version__}
    results = []
    for M, k, n, r in cases:
        for ad in adapter_dtypes:
            rows = run_shape(M, k, n, r, dtype, device, a.warmup, a.iters, DTYPES[ad], a.check, variants)
            for name, row in rows.items():
                results.append({"shape": f"{M}x{k}x{n}", "r": r, "adapter_dtype": ad, "variant": name, **row})
                print_row(results[-1])
            save_json(a.json, {**header, "complete": False, "results": results})  # what survives a kill
    save_json(a.json, {**header, "complete": True, "results": results})
    return results


def print_header(device, a, adapter_dtypes):
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device={device} ({name}), dtype={a.dtype}, adapter_dtypes={adapter_dtypes}, torch {torch.__version__}, "
          f"backends {lk.backends()}")
    extra = (f" {'peak MiB':>8}" if device.type == "cuda" else "") + (f" {'err':>8}" if a.check else "")
    print(f"{'shape':>18} {'r':>4} {'adapter':>7} {'variant':>9} {'fwd ms':>9} {'x floor':>8} {'fwd+bwd ms':>11} "
          f"{'x floor':>8}{extra}")


def print_row(row):
    extra = f" {row['peak_mib']:8.0f}" if "peak_mib" in row else ""
    extra += f" {row['err']:8.1e}" if "err" in row else ""
    print(f"{row['shape']:>18} {row['r']:>4} {row['adapter_dtype']:>7} {row['variant']:>9} {row['fwd_ms']:9.3f} "
          f"{row['fwd_ratio']:8.2f} {row['fwd_bwd_ms']:11.3f} {row['fwd_bwd_ratio']:8.2f}{extra}", flush=True)

if __name__ == "__main__":
    sys.exit(0 if main() else 1)

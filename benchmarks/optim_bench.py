"""One optimizer step on LoRA adapters: lorakern's PreconditionedAdamW against fused AdamW, the eager per-pair
preconditioned form and peft's Riemannian optimizer, measured in one run (issue 6).

    python benchmarks/optim_bench.py --device cuda                      # LLaMA-7B adapter shapes, r=16: 40M params
    python benchmarks/optim_bench.py --device cpu --small --json out.json

Setting: --layers blocks x (q, k, v, o: hidden -> hidden; gate, up: hidden -> intermediate; down:
intermediate -> hidden), one LoRA pair of rank r each (default 32 x 7 pairs, 39.98M adapter parameters, fp32).
The frozen base weights stay on the meta device: an optimizer step never reads them.

Variants (the same adapter values and gradients; each has its own parameters and state):
  adamw      torch.optim.AdamW, fused=True on CUDA (foreach=True on the CPU): no preconditioning; the floor
  lorakern   lk.optim.PreconditionedAdamW, backend "auto" (fused Triton on CUDA, the torch engine on the CPU)
  lk-torch   lk.optim.PreconditionedAdamW forced onto the torch engine (CUDA only: on the CPU it is "lorakern")
  eager      per pair: inverse of the two damped r x r Grams (fp32), two matmuls into .grad, then foreach AdamW
  peft       peft.optimizers.create_riemannian_optimizer(model, torch.optim.AdamW, reg=damping) (if installed)
Times are medians of one step (CUDA events on GPU, perf_counter on CPU); gradients are re-set before each
step outside the timed region (peft preconditions .grad in place). ratio = time / adamw time;
speedup_vs_eager = eager time / time. max_rel_err: the parameters after one step against "eager" (lorakern's
Grams, solves and P grad products are float64, the eager form's fp32: part of the difference is the latter's).
"""
from __future__ import annotations

import argparse
import gc
from _report import print_table, save_json  # benchmarks/ is the script folder, on sys.path
from _timing import elapsed_ms
import statistics
import sys

import torch
from torch import nn

import lorakern as lk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMALL = dict(layers=2, hidden=256, intermediate=688)


def adapter_shapes(layers: int, hidden: int, intermediate: int) -> list[tuple[int, int]]:
    """(in_features, out_features) of every adapted projection of a LLaMA-style decoder."""
    block = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]
    return block * layers


def build_pairs(shapes, r: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Adapter values: A ~ N(0, 1/in), B ~ N(0, 0.02^2), the same for every variant (CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(r, i, generator=g) / i ** 0.5).to(device, dtype),
             (torch.randn(o, r, generator=g) * 0.02).to(device, dtype)) for i, o in shapes]


def build_grads(pairs, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [tuple((torch.randn(t.shape, generator=g) * 1e-3).to(t.device, t.dtype) for t in pair) for pair in pairs]


def lora_layers(pairs, r: int) -> list[lk.LoRALinear]:
    """LoRALinear modules holding copies of `pairs`; their base weights live on the meta device."""
    layers = []
    for A, B in pairs:
        layer = lk.LoRALinear(A.shape[1], B.shape[0], r=r, device="meta", dtype=A.dtype)
        layer.lora_A = nn.Parameter(A.clone())
        layer.lora_B = nn.Parameter(B.clone())
        layers.append(layer)
    return layers


class _PeftPair(nn.Module):
    """Parameter names `<i>.lora_A.weight` / `<i>.lora_B.weight`: what peft's pair matching looks for."""

    def __init__(self, A, B):
        super().__init__()
        self.lora_A = nn.Linear(A.shape[1], A.shape[0], bias=False, device="meta")
        self.lora_B = nn.Linear(B.shape[1], B.shape[0], bias=False, device="meta")
        self.lora_A.weight = nn.Parameter(A.clone())
        self.lora_B.weight = nn.Parameter(B.clone())


def _adamw_kw(device: torch.device) -> dict:
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def _eager_step(pairs, opt, damping: float):
    """The issue's eager form: per pair an r x r inverse and a matmul per factor, then one foreach AdamW."""
    with torch.no_grad():
        for A, B in pairs:
            eye = torch.eye(A.shape[0], device=A.device, dtype=torch.float32)
            P_A = torch.linalg.inv(B.float().T @ B.float() + damping * eye)
            P_B = torch.linalg.inv(A.float() @ A.float().T + damping * eye)
            A.grad = (P_A @ A.grad.float()).to(A.dtype)
            B.grad = (B.grad.float() @ P_B).to(B.dtype)
    opt.step()


def build_variant(name: str, pairs, grads, r: int, device: torch.device, lr: float, damping: float, order: str):
    """(step function, setup function, parameter pairs) of one variant, or None when it is unavailable."""
    if name == "peft":
        try:
            from peft.optimizers import create_riemannian_optimizer
        except ImportError:
            return None
        model = nn.ModuleList(_PeftPair(A, B) for A, B in pairs)
        params = [(m.lora_A.weight, m.lora_B.weight) for m in model]
        opt = create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, reg=damping, **_adamw_kw(device))

        def setup():  # peft overwrites .grad with the preconditioned gradient: restore it, untimed
            for (A, B), (gA, gB) in zip(params, grads):
                if A.grad is None:
                    A.grad, B.grad = gA.clone(), gB.clone()
                else:
                    A.grad.copy_(gA)
                    B.grad.copy_(gB)
        return opt.step, setup, params
    if name in ("lorakern", "lk-torch"):
        layers = lora_layers(pairs, r)
        params = [(l.lora_A, l.lora_B) for l in layers]
        opt = lk.optim.PreconditionedAdamW(layers, lr=lr, damping=damping, order=order)
        backend = "torch" if name == "lk-torch" else "auto"

        def step():
            lk.set_backend(backend)
            opt.step()
    else:
        params = [(nn.Parameter(A.clone()), nn.Parameter(B.clone())) for A, B in pairs]
        opt = torch.optim.AdamW([t for pair in params for t in pair], lr=lr, **_adamw_kw(device))
        step = opt.step if name == "adamw" else (lambda: _eager_step(params, opt, damping))

    def setup():  # these variants never modify .grad in place: re-pointing it is enough
        for (A, B), (gA, gB) in zip(params, grads):
            A.grad, B.grad = gA, gB
    return step, setup, params


def timed(fn, setup, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn(), with setup() before each call outside the timed region."""
    for _ in range(warmup):
        setup()
        fn()
    times = []
    for _ in range(iters):
        setup()
        times.append(elapsed_ms(fn, device))
    return statistics.median(times)


def max_rel_err(params, ref_params) -> float:
    errs = []
    for pair, ref in zip(params, ref_params):
        for t, u in zip(pair, ref):
            t, u = t.detach().double(), u.detach().double()
            errs.append(((t - u).norm() / u.norm().clamp_min(1e-300)).item())
    return max(errs)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help=f"a quick CPU-sized setting: {SMALL}")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--damping", type=float, default=1e-6)
    ap.add_argument("--order", choices=["jacobi", "gauss-seidel"], default="jacobi")
    ap.add_argument("--variants", default="adamw,lorakern,lk-torch,eager,peft")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    size = dict(SMALL) if args.small else dict(layers=32, hidden=4096, intermediate=11008)
    size.update({k: getattr(args, k) for k in ("layers", "hidden", "intermediate") if getattr(args, k) is not None})
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    shapes = adapter_shapes(**size)
    pairs = build_pairs(shapes, args.r, dtype, device)
    grads = build_grads(pairs)
    n_params = sum(A.numel() + B.numel() for A, B in pairs)
    names = [v for v in args.variants.split(",") if v]
    if device.type != "cuda" and "lk-torch" in names:
        names.remove("lk-torch")  # on the CPU "lorakern" already is the torch engine

    # correctness: one step of each variant from the same values, against the eager form
    after_one = {}
    for name in names:
        built = build_variant(name, pairs, grads, args.r, device, args.lr, args.damping, "jacobi")
        if built is None:
            continue
        step, setup, params = built
        setup()
        step()
        after_one[name] = [tuple(t.detach().clone() for t in pair) for pair in params]
        del built, step, setup, params
        gc.collect()

    results = []
    for name in names:
        built = build_variant(name, pairs, grads, args.r, device, args.lr, args.damping, args.order)
        if built is None:
            print(f"{name}: not installed, skipped", file=sys.stderr)
            continue
        step, setup, _ = built
        ms = timed(step, setup, device, args.warmup, args.iters)
        row = {"variant": name, "step_ms": ms}
        if "eager" in after_one and name in after_one:
            row["max_rel_err_vs_eager"] = max_rel_err(after_one[name], after_one["eager"])
        results.append(row)
        del built, step, setup
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lk.set_backend("auto")
    base = next((r["step_ms"] for r in results if r["variant"] == "adamw"), None)
    eager = next((r["step_ms"] for r in results if r["variant"] == "eager"), None)
    for row in results:
        row["ratio_vs_adamw"] = row["step_ms"] / base if base else None
        row["speedup_vs_eager"] = eager / row["step_ms"] if eager else None

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    config = dict(size, r=args.r, dtype=args.dtype, pairs=len(pairs), adapter_params=n_params, lr=args.lr,
                  damping=args.damping, order=args.order, device=device_name, threads=torch.get_num_threads(),
                  warmup=args.warmup, iters=args.iters, torch=torch.__version__)
    print(f"{len(pairs)} pairs, {n_params / 1e6:.2f}M adapter params, r={args.r}, {args.dtype}, "
          f"order={args.order}, {device_name}")
    print_table(results, [("variant", "variant", "", 10), ("step ms", "step_ms", ".3f", 10),
                          ("x adamw", "ratio_vs_adamw", ".2f", 9), ("eager/x", "speedup_vs_eager", ".2f", 9),
                          ("err vs eager", "max_rel_err_vs_eager", ".1e", 13)])
    return save_json(args.json, {"config": config, "results": results})


if __name__ == "__main__":
    main()

"""One optimizer step on LoRA adapters: lorakern's PreconditionedAdamW and ScaledGD against torch's AdamW / SGD,
the eager per-pair preconditioned form and peft's Riemannian optimizer, all measured in one run (issues 6, 14).

    python benchmarks/optim_bench.py --device cpu --sizes minilm,40m        # issue 14 item 4: both sizes, one run
    python benchmarks/optim_bench.py --device cuda                          # LLaMA-7B adapter shapes, r=16: 40M
    python benchmarks/optim_bench.py --device cpu --small --json out.json   # a quick CPU-sized setting

Sizes (--sizes, comma-separated; default "40m", or "small" with --small):
  minilm  all-MiniLM-L6-v2's adapter shapes: 6 layers x (query, key, value, attention.output.dense 384->384,
          intermediate 384->1536, output 1536->384): 36 pairs (0.66M adapter parameters at r=16)
  40m     LLaMA-7B's: 32 blocks x (q, k, v, o 4096->4096, gate, up 4096->11008, down 11008->4096): 224 pairs
          (39.98M at r=16); --layers / --hidden / --intermediate change it
  small   the LLaMA layout at 2 x (256, 688) (or --layers / ... ), for a quick run
The frozen base weights stay on the meta device: an optimizer step never reads them.

Variants (the same adapter values and gradients; each has its own parameters and state):
  adamw      torch.optim.AdamW, fused=True on CUDA (foreach=True on the CPU): no preconditioning; the floor
  lorakern   lk.optim.PreconditionedAdamW, backend "auto" (fused Triton on CUDA, the torch engine on the CPU)
  lk-torch   lk.optim.PreconditionedAdamW forced onto the torch engine (CUDA only: on the CPU it is "lorakern")
  scaledgd   lk.optim.ScaledGD (same lr and damping), backend "auto"
  sgd        torch.optim.SGD (foreach on the CPU, fused on CUDA): ScaledGD's floor (column x sgd)
  eager      per pair: inverse of the two damped r x r Grams (fp32), two matmuls into .grad, then AdamW
  peft       peft.optimizers.create_riemannian_optimizer(model, torch.optim.AdamW, reg=damping) (if installed)
Timing: all variants are built first, then timed in interleaved rounds (one step of each per round, after
--warmup rounds), so a load change on a shared machine hits every variant alike; medians over --iters rounds
of wall time (CUDA events on GPU, perf_counter on CPU) and, on the CPU, of process CPU time. Gradients are
re-set before each step outside the timed region (peft preconditions .grad in place). x adamw = median time /
adamw's median time (x sgd likewise), both from this run.
Accuracy, one step from the same values against a float64 step written here (per pair: P = (Gram + damping I)^-1
by torch.linalg.solve, then AdamW's first step or SGD): err = max over factors of ||X - X64||_F / ||X64||_F
(the parameters after the step); for scaledgd also step err = ||X - X64||_F / ||X64 - X0||_F (relative to
the step's size: what the precision of P grad decides; AdamW's first step is sign-like, so this says nothing
there). eager and peft are referenced to the AdamW step.
"""
from __future__ import annotations

import argparse
import gc
import os
from _report import print_table, save_json  # benchmarks/ is the script folder, on sys.path
from _timing import elapsed_ms
import statistics
import sys
import time

import torch
from torch import nn

import lorakern as lk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMALL = dict(layers=2, hidden=256, intermediate=688)
LLAMA_7B = dict(layers=32, hidden=4096, intermediate=11008)
SIZE_NAMES = ("minilm", "40m", "small")
ADAM_LIKE = ("adamw", "lorakern", "lk-torch", "eager", "peft")


def adapter_shapes(layers: int, hidden: int, intermediate: int) -> list[tuple[int, int]]:
    """(in_features, out_features) of every adapted projection of a LLaMA-style decoder."""
    block = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]
    return block * layers


def minilm_shapes(layers: int = 6, hidden: int = 384, intermediate: int = 1536) -> list[tuple[int, int]]:
    """(in_features, out_features) of all-MiniLM-L6-v2's adapted projections (a BERT encoder)."""
    block = [(hidden, hidden)] * 4 + [(hidden, intermediate), (intermediate, hidden)]
    return block * layers


def size_shapes(name: str, overrides: dict) -> list[tuple[int, int]]:
    if name == "minilm":
        return minilm_shapes()
    base = dict(SMALL if name == "small" else LLAMA_7B)
    base.update(overrides)
    return adapter_shapes(**base)


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


def _torch_kw(device: torch.device) -> dict:
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def _eager_step(pairs, opt, damping: float):
    """The issue's eager form: per pair an r x r inverse and a matmul per factor, then one AdamW step."""
    with torch.no_grad():
        for A, B in pairs:
            eye = torch.eye(A.shape[0], device=A.device, dtype=torch.float32)
            P_A = torch.linalg.inv(B.float().T @ B.float() + damping * eye)
            P_B = torch.linalg.inv(A.float() @ A.float().T + damping * eye)
            A.grad = (P_A @ A.grad.float()).to(A.dtype)
            B.grad = (B.grad.float() @ P_B).to(B.dtype)
    opt.step()


def _regrad_setup(params, grads):
    """For variants that never modify .grad in place: re-pointing it is enough."""
    def setup():
        for (A, B), (gA, gB) in zip(params, grads):
            A.grad, B.grad = gA, gB
    return setup


def _peft_variant(pairs, grads, device, args):
    try:
        from peft.optimizers import create_riemannian_optimizer
    except ImportError:
        return None
    model = nn.ModuleList(_PeftPair(A, B) for A, B in pairs)
    params = [(m.lora_A.weight, m.lora_B.weight) for m in model]
    opt = create_riemannian_optimizer(model, torch.optim.AdamW, lr=args.lr, reg=args.damping,
                                      weight_decay=args.weight_decay, **_torch_kw(device))

    def setup():  # peft overwrites .grad with the preconditioned gradient: restore it, untimed
        for (A, B), (gA, gB) in zip(params, grads):
            if A.grad is None:
                A.grad, B.grad = gA.clone(), gB.clone()
            else:
                A.grad.copy_(gA)
                B.grad.copy_(gB)
    return opt.step, setup, params


def _lorakern_variant(name, pairs, grads, r, args, order):
    layers = lora_layers(pairs, r)
    params = [(l.lora_A, l.lora_B) for l in layers]
    if name == "scaledgd":
        opt = lk.optim.ScaledGD(layers, lr=args.sgd_lr, damping=args.damping, order=order,
                                weight_decay=args.weight_decay)
    else:
        opt = lk.optim.PreconditionedAdamW(layers, lr=args.lr, damping=args.damping, order=order,
                                           weight_decay=args.weight_decay)
    backend = "torch" if name == "lk-torch" else "auto"

    def step():
        lk.set_backend(backend)
        opt.step()
    return step, _regrad_setup(params, grads), params


def build_variant(name: str, pairs, grads, r: int, device: torch.device, args, order: str = "jacobi"):
    """(step function, setup function, parameter pairs) of one variant, or None when it is unavailable."""
    if name == "peft":
        return _peft_variant(pairs, grads, device, args)
    if name in ("lorakern", "lk-torch", "scaledgd"):
        return _lorakern_variant(name, pairs, grads, r, args, order)
    params = [(nn.Parameter(A.clone()), nn.Parameter(B.clone())) for A, B in pairs]
    flat = [t for pair in params for t in pair]
    if name == "sgd":
        opt = torch.optim.SGD(flat, lr=args.sgd_lr, weight_decay=args.weight_decay, **_torch_kw(device))
    else:
        opt = torch.optim.AdamW(flat, lr=args.lr, weight_decay=args.weight_decay, **_torch_kw(device))
    step = (lambda: _eager_step(params, opt, args.damping)) if name == "eager" else opt.step
    return step, _regrad_setup(params, grads), params


# -- accuracy: one step against a float64 step --------------------------------------------------------------
def _fp64_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    if damping == 0:
        return torch.linalg.pinv(gram, hermitian=True)
    return torch.linalg.solve(gram + damping * eye, eye)


def fp64_step(A, B, gA, gB, args, adam: bool):
    """One Jacobi step of the preconditioned AdamW (its first step: m_hat = g, sqrt(v_hat) = |g|) or SGD from
    (A, B), in float64, per pair and in the textbook form."""
    A, B, gA, gB = (t.detach().double() for t in (A, B, gA, gB))
    pgA = _fp64_inverse(B.T @ B, args.damping) @ gA
    pgB = gB @ _fp64_inverse(A @ A.T, args.damping)
    lr = args.lr if adam else args.sgd_lr
    out = []
    for X, g in ((A, pgA), (B, pgB)):
        update = g / (g.abs() + 1e-8) if adam else g
        out.append(X * (1 - lr * args.weight_decay) - lr * update)
    return out


def step_errors(params, pairs, grads, args, adam: bool) -> tuple[float, float]:
    """(max relative error of the parameters, max relative error of the step) over all factors."""
    err = step_err = 0.0
    for (A1, B1), (A0, B0), (gA, gB) in zip(params, pairs, grads):
        refs = fp64_step(A0, B0, gA, gB, args, adam)
        for got, ref, start in zip((A1, B1), refs, (A0, B0)):
            diff = (got.detach().double() - ref).norm()
            err = max(err, (diff / ref.norm().clamp_min(1e-300)).item())
            step_err = max(step_err, (diff / (ref - start.double()).norm().clamp_min(1e-300)).item())
    return err, step_err


def max_rel_err(params, ref_params) -> float:
    errs = []
    for pair, ref in zip(params, ref_params):
        for t, u in zip(pair, ref):
            t, u = t.detach().double(), u.detach().double()
            errs.append(((t - u).norm() / u.norm().clamp_min(1e-300)).item())
    return max(errs)


# -- timing ------------------------------------------------------------------------------------------------
def timed_rounds(variants: dict, device: torch.device, warmup: int, iters: int) -> dict:
    """{name: (wall ms list, cpu ms list)}: one step of every variant per round, interleaved."""
    out = {name: ([], []) for name in variants}
    for i in range(warmup + iters):
        for name, (step, setup, _) in variants.items():
            setup()
            cpu0 = time.process_time()
            ms = elapsed_ms(step, device)
            cpu = (time.process_time() - cpu0) * 1e3
            if i >= warmup:
                out[name][0].append(ms)
                out[name][1].append(cpu)
    return out


def run_size(size: str, shapes, device, dtype, names, args) -> tuple[dict, list[dict]]:
    pairs = build_pairs(shapes, args.r, dtype, device)
    grads = build_grads(pairs)
    variants, rows = {}, {}
    for name in names:  # build, one step from the start values (accuracy), keep for timing
        built = build_variant(name, pairs, grads, args.r, device, args, args.order)
        if built is None:
            print(f"{name}: not installed, skipped", file=sys.stderr)
            continue
        step, setup, params = built
        setup()
        step()
        rows[name] = {"size": size, "variant": name}
        if args.order == "jacobi" and name not in ("adamw", "sgd"):
            err, step_err = step_errors(params, pairs, grads, args, adam=name in ADAM_LIKE)
            rows[name]["max_rel_err_vs_fp64"] = err
            if name not in ADAM_LIKE:  # Adam's first step is sign-like: its size says nothing of P's precision
                rows[name]["step_rel_err_vs_fp64"] = step_err
        if name == "eager":
            eager_after = [tuple(t.detach().clone() for t in pair) for pair in params]
        variants[name] = built
    if "eager" in variants:
        for name, (_, _, params) in variants.items():
            if name in ADAM_LIKE and name != "adamw":
                rows[name]["max_rel_err_vs_eager"] = max_rel_err(params, eager_after)
    times = timed_rounds(variants, device, args.warmup, args.iters)
    for name, (wall, cpu) in times.items():
        rows[name]["step_ms"] = statistics.median(wall)
        rows[name]["cpu_ms"] = statistics.median(cpu) if device.type == "cpu" else None
    _add_ratios(rows)
    info = dict(size=size, pairs=len(pairs), adapter_params=sum(A.numel() + B.numel() for A, B in pairs))
    del variants, pairs, grads
    gc.collect()
    return info, list(rows.values())


def _add_ratios(rows: dict) -> None:
    for floor, key in (("adamw", "ratio_vs_adamw"), ("sgd", "ratio_vs_sgd"), ("eager", "speedup_vs_eager")):
        if floor not in rows:
            continue
        for row in rows.values():
            if key == "speedup_vs_eager":
                row[key] = rows[floor]["step_ms"] / row["step_ms"]
            elif floor == "adamw" or row["variant"] in ("scaledgd", "sgd"):
                row[key] = row["step_ms"] / rows[floor]["step_ms"]
                if row.get("cpu_ms") is not None:
                    row[key.replace("ratio", "cpu_ratio")] = row["cpu_ms"] / rows[floor]["cpu_ms"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", help=f"comma-separated, of {SIZE_NAMES}; default 40m (small with --small)")
    ap.add_argument("--small", action="store_true", help=f"the quick setting: {SMALL}")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--lr", type=float, default=1e-4, help="of the Adam variants")
    ap.add_argument("--sgd-lr", type=float, default=0.5, help="of scaledgd and sgd (ScaledGD's default)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="the same for every variant")
    ap.add_argument("--damping", type=float, default=1e-6)
    ap.add_argument("--order", choices=["jacobi", "gauss-seidel"], default="jacobi")
    ap.add_argument("--variants", default="adamw,lorakern,lk-torch,scaledgd,sgd,eager,peft")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    sizes = (args.sizes or ("small" if args.small else "40m")).split(",")
    bad = [s for s in sizes if s not in SIZE_NAMES]
    if bad:
        ap.error(f"unknown size(s) {bad}; choose from {SIZE_NAMES}")
    args.size_list = sizes
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    overrides = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate") if getattr(args, k) is not None}
    names = [v for v in args.variants.split(",") if v]
    if device.type != "cuda" and "lk-torch" in names:
        names.remove("lk-torch")  # on the CPU "lorakern" already is the torch engine
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    config = dict(r=args.r, dtype=args.dtype, lr=args.lr, weight_decay=args.weight_decay, damping=args.damping,
                  order=args.order, device=device_name, threads=torch.get_num_threads(),
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS"), warmup=args.warmup, iters=args.iters,
                  torch=torch.__version__, sizes=[])
    results = []
    for size in args.size_list:
        info, rows = run_size(size, size_shapes(size, overrides), device, dtype, names, args)
        config["sizes"].append(info)
        results += rows
        print(f"{size}: {info['pairs']} pairs, {info['adapter_params'] / 1e6:.2f}M adapter params, r={args.r}, "
              f"{args.dtype}, order={args.order}, {device_name}, {torch.get_num_threads()} threads")
        print_table(rows, [("variant", "variant", "", 9), ("step ms", "step_ms", ".3f", 10),
                           ("x adamw", "ratio_vs_adamw", ".2f", 8), ("x sgd", "ratio_vs_sgd", ".2f", 6),
                           ("cpu x adamw", "cpu_ratio_vs_adamw", ".2f", 11),
                           ("err vs fp64", "max_rel_err_vs_fp64", ".1e", 11),
                           ("step err", "step_rel_err_vs_fp64", ".1e", 9),
                           ("err vs eager", "max_rel_err_vs_eager", ".1e", 12)])
    lk.set_backend("auto")
    if len(config["sizes"]) == 1:
        config.update(config["sizes"][0])
    return save_json(args.json, {"config": config, "results": results})


if __name__ == "__main__":
    main()

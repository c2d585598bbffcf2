"""`python -m lorakern check`: the environment, then every kernel family once against float64.

Prints torch / Triton / CUDA / GPU, the backends, the extension, the settings and the dispatch table in
force; then runs the Triton LoRA kernels (forward: x pass + GEMM; backward: dY pass + GEMM + the fixed-order
reductions) on each case below with one fixed config each (the defaults), in both Triton designs, and
compares y, dx, dA and dB with a float64 reference. Exits 1 if any case fails, naming its kernels, dtypes
and shape. On the CPU the kernels run under Triton's interpreter (`__main__` sets TRITON_INTERPRET=1 when
there is no GPU), which is how CI runs it.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

import lorakern as lk
from lorakern import _backend
from lorakern._util import gpu_arch
from lorakern.ops import dispatch

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    x: str            # activation dtype
    adapter: str      # adapter dtype
    M: int
    K: int            # in_features
    N: int            # out_features
    r: int
    dropout: float
    bias: bool
    design: str       # "fused" | "hybrid"
    layout: str = "2d"  # "2d" | "3d" (through lk.ops.lora_linear) | "strided" (rows of x a strided view)
    grads: str = "xAB"  # which of x, A, B need gradients ("AB": x frozen, the dA-only GEMM launch)

    def name(self) -> str:
        drop = f" p={self.dropout:g}" if self.dropout else ""
        return (f"{self.design} {self.x}/{self.adapter} {self.M}x{self.K}->{self.N} r={self.r}{drop}"
                f"{'' if self.bias else ' no-bias'} {self.layout} grads={self.grads}")


def cases(gpu: bool) -> list[Case]:
    """Odd shapes that cross the tiles' edges: interpreter-sized on the CPU, Hopper-tile-sized on a GPU."""
    M, K, N = (333, 301, 517) if gpu else (37, 45, 29)
    return [
        Case("bf16", "bf16", M, K, N, 16, 0.0, True, "fused"),
        Case("bf16", "fp32", M, K, N, 16, 0.1, True, "fused"),
        Case("fp16", "fp16", M, K, N, 1, 0.0, False, "fused"),
        Case("fp16", "fp32", M, K, N, 16, 0.25, True, "fused"),
        Case("fp32", "fp32", M, K, N, 16, 0.0, True, "fused"),
        Case("fp32", "bf16", M, K, N, 3, 0.0, True, "fused"),
        Case("bf16", "bf16", M, K, N, 256, 0.1, True, "fused"),
        Case("bf16", "bf16", M, K, N, 16, 0.1, True, "hybrid"),
        Case("fp32", "fp32", M, K, N, 1, 0.0, False, "hybrid"),
        Case("bf16", "fp32", M, K, N, 16, 0.0, True, "fused", layout="3d"),
        Case("fp16", "fp16", M, K, N, 16, 0.0, True, "hybrid", layout="strided"),
        Case("bf16", "bf16", M, K, N, 16, 0.1, True, "fused", grads="AB"),
    ]


def tolerance(case: Case) -> float:
    """Relative Frobenius error allowed against float64: the coarser of the activation and adapter dtypes."""
    def tol(name: str) -> float:
        if name == "fp32":
            return 1e-5 if dispatch.fp32_matmul_is_exact() or _backend.interpreting() else 3e-3
        return {"bf16": 1.5e-2, "fp16": 5e-3}[name]
    return max(tol(case.x), tol(case.adapter))


def _rel(a: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if a is None or ref is None:
        return 0.0 if a is None and ref is None else float("inf")
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _inputs(case: Case, device: torch.device, gen: torch.Generator):
    xdt, adt = _DT[case.x], _DT[case.adapter]
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)
    if case.layout == "strided":  # every other row of a wider buffer: stride(0) = 2K
        x = rnd(2 * case.M, case.K).to(xdt)[::2]
    elif case.layout == "3d":
        x = rnd(3, case.M // 3, case.K).to(xdt)
    else:
        x = rnd(case.M, case.K).to(xdt)
    W = rnd(case.N, case.K, scale=case.K ** -0.5).to(xdt)
    b = rnd(case.N).to(xdt) if case.bias else None
    A = rnd(case.r, case.K, scale=case.K ** -0.5).to(adt)
    B = rnd(case.N, case.r, scale=0.3).to(adt)
    return x, W, b, A, B


def _mask(kt, case: Case, M: int, seed: int, device: torch.device) -> torch.Tensor | None:
    """The kernels' keep-mask for (M, K) with this seed, read off an identity layer (y = drop(1 + U))."""
    if not case.dropout:
        return None
    K = case.K
    x = (1 + torch.rand(M, K, device=device))
    rng = torch.tensor([seed, 0], dtype=torch.int64, device=device)
    eye = torch.eye(K, device=device)
    y, _ = kt.forward(x, torch.zeros(K, K, device=device), None, eye, eye, 1.0, case.dropout, rng)
    return y != 0


def run_case(case: Case, device: torch.device, seed: int = 0, configs: dict | None = None) -> dict:
    """Runs one case and returns its errors; raises nothing for wrong numbers (they are reported)."""
    from lorakern.ops import lora_linear_triton as kt
    gen = torch.Generator().manual_seed(seed)
    x, W, b, A, B = _inputs(case, device, gen)
    s, p = 0.75, case.dropout
    x2 = x.reshape(-1, case.K)
    M = x2.shape[0]
    rng_seed = 12345 + seed
    rng = torch.tensor([rng_seed, 0], dtype=torch.int64, device=device)
    need = ("x" in case.grads, "A" in case.grads, "B" in case.grads)
    if case.layout == "3d":  # the public op: leading dims, LoRALinearFunction, the settings in force
        saved = _backend.settings()
        try:
            lk.set_backend("triton")
            lk.set_design(case.design)
            xg, Ag, Bg = (t.detach().clone().requires_grad_(n) for t, n in zip((x, A, B), need))
            gen_dev = torch.Generator(device=device).manual_seed(seed)
            y = lk.ops.lora_linear(xg, W, b, Ag, Bg, s, p, gen_dev)
            dy = torch.randn(y.shape, generator=gen).to(device=device, dtype=y.dtype)
            y.backward(dy)
            y, dy = y.reshape(M, -1), dy.reshape(M, -1)
            dx = xg.grad.reshape(M, -1) if need[0] else None
            dA, dB = Ag.grad, Bg.grad
        finally:
            _backend._settings = saved
        keep = None  # no dropout in the 3-D case (its mask would come from the generator's draw)
    else:
        y, xa = kt.forward(x2, W, b, A, B, s, p, rng, hybrid=case.design == "hybrid", need_grads=need,
                           configs=configs)
        dy = torch.randn(y.shape, generator=gen).to(device=device, dtype=y.dtype)
        dx, dA, dB = kt.backward(dy, x2 if x2.stride(1) == 1 else x2.contiguous(), xa, W, A, B, s, p, rng,
                                 *need, hybrid=case.design == "hybrid", configs=configs)
        keep = _mask(kt, case, M, rng_seed, device)
    # float64 reference with the same mask
    X, Wd, Ad, Bd = (t.detach().double().cpu() for t in (x2, W, A, B))
    X.requires_grad_(need[0]); Ad.requires_grad_(need[1]); Bd.requires_grad_(need[2])
    xl = X if keep is None else X * keep.cpu().double() / (1 - p)
    yr = X @ Wd.T + (0 if b is None else b.double().cpu()) + s * (xl @ Ad.T) @ Bd.T
    wanted = [t for t, n in zip((X, Ad, Bd), need) if n]
    refs = iter(torch.autograd.grad(yr, wanted, dy.double().cpu()))
    rx, rA, rB = (next(refs) if n else None for n in need)
    errs = {"y": _rel(y, yr), "dx": _rel(dx, rx), "dA": _rel(dA, rA), "dB": _rel(dB, rB)}
    keep_frac = None if keep is None else keep.float().mean().item()
    mask_ok = keep_frac is None or abs(keep_frac - (1 - p)) < 4 * (p * (1 - p) / keep.numel()) ** 0.5 + 1e-3
    return {"errors": errs, "keep_fraction": keep_frac, "mask_ok": mask_ok}


def dropout_key_check(device: torch.device) -> str | None:
    """Through the public op: two calls draw different masks, and torch.manual_seed reproduces them. None when
    that holds, else what failed."""
    saved = _backend.settings()
    try:
        lk.set_backend("triton")
        lk.set_design("fused")
        K = 64
        x, W, eye = torch.ones(48, K, device=device), torch.zeros(K, K, device=device), torch.eye(K, device=device)
        def masks():
            torch.manual_seed(99)
            return [lk.ops.lora_linear(x, W, None, eye, eye, 1.0, 0.5) != 0 for _ in range(2)]
        first, again = masks(), masks()
    finally:
        _backend._settings = saved
    if torch.equal(first[0], first[1]):
        return "two calls drew the same dropout mask"
    if not (torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])):
        return "torch.manual_seed did not reproduce the dropout masks"
    return None


def tuned_cases(arch: str, gpu: bool, limit: int = 8) -> list[tuple[Case, dict, str]]:
    """One case per distinct measured config set of this architecture (what `tune` wrote and auto runs)."""
    out, seen = [], set()
    M, K, N = (333, 301, 517) if gpu else (37, 45, 29)
    for key, entry in sorted(dispatch.entries(arch).items()):
        c = dispatch.Case.from_key(key)
        for design, configs in sorted((entry.get("configs") or {}).items()):
            sig = (c.x_dtype, c.adapter_dtype, design, repr(configs))
            if sig in seen or len(out) >= limit:
                continue
            seen.add(sig)
            x = "fp32" if c.x_dtype in ("fp32", "tf32") else c.x_dtype
            out.append((Case(x, c.adapter_dtype, M, K, N, min(c.r_bucket, 64), 0.1 if c.dropout else 0.0, True,
                             design), configs, key))
    return out


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "arch": gpu_arch(torch.device("cuda")) if torch.cuda.is_available() else "cpu",
            "backends": lk.backends(), "settings": asdict(_backend.settings()),
            "interpreter": _backend.interpreting()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    ext = _backend._C
    info["extension"] = getattr(ext, "__file__", None) if ext is not None else f"not built: {_backend._C_IMPORT_ERROR}"
    info["dispatch"] = {"package_table": str(dispatch.PACKAGE_TABLE), "cache": str(dispatch.cache_path()),
                        "entries_for_this_arch": len(dispatch.entries(info["arch"]))}
    info["tf32"] = not dispatch.fp32_matmul_is_exact()
    return info


def _print_env(info: dict) -> None:
    print("lorakern check")
    for k in ("python", "torch", "triton", "cuda", "gpu", "arch", "interpreter", "tf32", "extension"):
        print(f"  {k:<12} {info[k]}")
    print(f"  {'backends':<12} {info['backends']}")
    print(f"  {'settings':<12} {info['settings']}")
    d = info["dispatch"]
    print(f"  {'dispatch':<12} {d['entries_for_this_arch']} measured cases for {info['arch']} "
          f"(package table {d['package_table']}; cache {d['cache']}); unmeasured cases take the cuBLAS path")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorakern check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the environment and every case's errors here")
    args = ap.parse_args(argv)
    info = environment()
    _print_env(info)
    if not info["backends"]["triton"]:
        print(f"\nFAILED: the Triton kernels cannot run here: {_backend._check_triton()}")
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from lorakern.ops import lora_linear_triton as kt
    todo = [(case, None, "") for case in cases(device.type == "cuda")]
    todo += tuned_cases(info["arch"], device.type == "cuda")
    t0 = time.perf_counter()
    variants = []
    for case, configs, _ in todo:  # compile everything first, in parallel where Triton can
        x, W, b, A, B = _inputs(case, device, torch.Generator().manual_seed(0))
        variants.append(kt.variant(x.reshape(-1, case.K), W, b, A, B, case.dropout, hybrid=case.design == "hybrid",
                                   configs=configs,
                                   need_grads=("x" in case.grads, "A" in case.grads, "B" in case.grads)))
    compile_failures = {id(v): f for v, f in kt.precompile(variants)}
    compile_s = time.perf_counter() - t0
    rows, failed = [], 0
    header = f"{'case':<58} {'y':>9} {'dx':>9} {'dA':>9} {'dB':>9}  tol       status"
    print(f"\n{header}\n{'-' * len(header)}")
    for (case, configs, source), v in zip(todo, variants):
        tol = tolerance(case)
        failure = compile_failures.get(id(v))
        if failure is None:
            try:
                res = run_case(case, device, configs=configs)
            except Exception as exc:  # a launch failure is a failed case, reported with its name
                res = {"errors": {}, "exception": f"{type(exc).__name__}: {exc}"}
        else:
            res = {"errors": {}, "exception": str(failure)}
        errs = res["errors"]
        bad = [k for k, e in errs.items() if not e <= tol]
        ok = "exception" not in res and not bad and res.get("mask_ok", True)
        failed += not ok
        status = "ok" if ok else ("FAILED: " + (res.get("exception") or
                                                 (f"{', '.join(bad)} above tolerance" if bad else "dropout mask rate")))
        cells = " ".join(f"{errs.get(k, float('nan')):9.2e}" for k in ("y", "dx", "dA", "dB"))
        name = case.name() + (" tuned" if source else "")
        print(f"{name:<58} {cells}  {tol:.1e}  {status}")
        rows.append({"case": asdict(case), "name": name, "tolerance": tol, "ok": ok, "tuned_for": source or None,
                     "configs": configs, **res})
    rng_problem = dropout_key_check(device)
    print(f"{'dropout key: fresh mask per call, reproduced by manual_seed':<58} {'':39}  "
          f"{'ok' if rng_problem is None else 'FAILED: ' + rng_problem}")
    failed += rng_problem is not None
    total_s = time.perf_counter() - t0
    print(f"\n{len(todo) + 1 - failed}/{len(todo) + 1} checks passed (compile {compile_s:.1f} s, total {total_s:.1f} s)")
    if failed:
        print("FAILED cases name the kernels' design, dtypes (activation/adapter) and shape (tokens x in -> out)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": info, "cases": rows, "dropout_key": rng_problem or "ok", "failed": failed,
                       "compile_s": compile_s,
                       "total_s": total_s}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`python -m lorakern tune` / `lk.tune(model, tokens=...)`: time the designs of the LoRA layer on this GPU and
write the measurements the dispatcher uses (lorakern.ops.dispatch).

For each case (tokens x in -> out at rank r, activation and adapter dtypes, dropout) it times forward +
backward (x, lora_A, lora_B needing gradients; the base frozen) of:
- "cublas": torch GEMMs with the LoRA terms as small GEMMs (what runs without a measurement);
- "hybrid": cuBLAS base GEMMs + the Triton rank-r passes (default tiles);
- "fused": the Triton GEMM with the rank-r term fused, its tiles chosen from a pruned candidate list per
  kernel (one kernel at a time, the others fixed: the kernels do not share work).
Autotuning is bounded: every candidate of every case is compiled first, in parallel (Triton's
AsyncCompileMode on a thread pool), and timed with CUDA events (medians of triton.testing.do_bench).
`--budget-s` stops before a case that would start after the budget. `--dry-run` rehearses the same code on
the CPU (the kernels under Triton's interpreter, perf_counter timings, nothing written unless --cache).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lorakern._util import gpu_arch
from lorakern.ops import dispatch

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NEEDS = (True, False, False, True, True)  # x, weight, bias, lora_A, lora_B: an adapted layer mid-network


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """'8192x4096x14336:16' -> (tokens, in, out, r)."""
    try:
        dims, r = text.split(":")
        M, K, N = (int(v) for v in dims.lower().split("x"))
        shape = (M, K, N, int(r))
    except ValueError:
        raise ValueError(f"shape {text!r}: expected TOKENSxINxOUT:RANK, e.g. 8192x4096x4096:16") from None
    if min(shape) < 1:
        raise ValueError(f"shape {text!r}: every size must be >= 1")
    return shape


def _timer(device: torch.device, dry_run: bool):
    if device.type == "cuda" and not dry_run:
        import triton.testing

        def cuda_time(fn) -> float:
            return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
        return cuda_time

    def host_time(fn) -> float:  # the rehearsal: one warm-up and one host-timed run
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return host_time


def _outputs(impl, x, W, b, A, B, dy, s: float, p: float):
    """(y, dx, dA, dB) of one forward+backward, the dropout key drawn from a fixed torch seed."""
    torch.manual_seed(1234)
    y, saved = impl.forward(x, W, b, A, B, s, p, None, _NEEDS)
    dx, _, _, dA, dB = impl.backward(dy, saved, W, A, B, s, p, _NEEDS)
    return y, dx, dA, dB


def _agrees(got, ref, tol: float) -> bool:
    for g, r in zip(got, ref):
        g, r = g.double(), r.double()
        if not torch.isfinite(g).all() or ((g - r).norm() / r.norm().clamp_min(1e-300)).item() > tol:
            return False
    return True


def _step(impl, x, W, b, A, B, dy, s: float, p: float):
    def run():
        y, saved = impl.forward(x, W, b, A, B, s, p, None, _NEEDS)
        impl.backward(dy, saved, W, A, B, s, p, _NEEDS)
    return run


def tune_case(M: int, K: int, N: int, r: int, x_dtype: torch.dtype, adapter_dtype: torch.dtype, dropout: float,
              device: torch.device, *, dry_run: bool = False, max_candidates: int | None = None,
              log=print) -> tuple[dispatch.Case, dict]:
    """Times the three designs for one case; returns (case, entry) as the dispatch table stores it."""
    import importlib
    ops = importlib.import_module("lorakern.ops.lora_linear")  # the module (the package exports the function)
    from lorakern.ops import lora_linear_triton as kt

    gen = torch.Generator().manual_seed(0)
    def rnd(*shape, scale=1.0, dtype=x_dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
    x, W, b = rnd(M, K), rnd(N, K, scale=K ** -0.5), rnd(N)
    A, B, dy = rnd(r, K, scale=K ** -0.5, dtype=adapter_dtype), rnd(N, r, scale=0.1, dtype=adapter_dtype), rnd(M, N)
    timer = _timer(device, dry_run)
    s = 2.0
    cands = {k: kt.candidates(x_dtype, k)[:max_candidates] for k in ("gemm_fwd", "gemm_bwd", "xa", "dy")}
    need = (True, True, True)
    variants = [kt.variant(x, W, b, A, B, dropout, hybrid=True, need_grads=need)]
    for kernel, cfgs in cands.items():
        variants += [kt.variant(x, W, b, A, B, dropout, configs={kernel: c}, need_grads=need) for c in cfgs]
    t0 = time.perf_counter()
    failed = kt.precompile(variants)
    bad = {repr(v["cfgs"]) for v, _ in failed}
    log(f"  compiled {len(variants)} variants in {time.perf_counter() - t0:.1f} s ({len(failed)} failed)")
    # What every candidate must reproduce before it is timed: the cuBLAS path's outputs (with dropout, whose
    # masks differ between paths, the default-config kernels' outputs under the same key; `check` tests those).
    tol = 1e-4 if x_dtype == torch.float32 and dispatch.fp32_matmul_is_exact() else 3e-2
    ref_impl = ops._TORCH if dropout == 0.0 else ops._TritonImpl("fused")
    ref = _outputs(ref_impl, x, W, b, A, B, dy, s, dropout)

    def accepted(impl) -> bool:
        if _agrees(_outputs(impl, x, W, b, A, B, dy, s, dropout), ref, tol):
            return True
        log(f"  rejected: {impl.name} with {impl.configs or 'default configs'}: outputs differ from the reference")
        return False
    ms = {"cublas": timer(_step(ops._TORCH, x, W, b, A, B, dy, s, dropout))}
    if repr(variants[0]["cfgs"]) not in bad and accepted(ops._TritonImpl("hybrid")):
        ms["hybrid"] = timer(_step(ops._TritonImpl("hybrid"), x, W, b, A, B, dy, s, dropout))
    best = dict(kt.default_configs(x_dtype))
    best_ms = None
    for kernel, cfgs in cands.items():  # one kernel at a time, the others at their best so far
        for cfg in cfgs:
            trial = dict(best, **{kernel: cfg})
            if repr(kt._configs(x_dtype, {kernel: cfg})) in bad or not accepted(ops._TritonImpl("fused", trial)):
                continue
            t = timer(_step(ops._TritonImpl("fused", trial), x, W, b, A, B, dy, s, dropout))
            if best_ms is None or t < best_ms:
                best, best_ms = trial, t
    if best_ms is not None:
        ms["fused"] = best_ms
    arch = "cpu" if device.type != "cuda" else gpu_arch(device)
    case = dispatch.make_case(arch, x_dtype, adapter_dtype, M, K, N, r, dropout > 0,
                              tf32=not dispatch.fp32_matmul_is_exact())
    def plain(cfgs):
        return {k: {n: int(v) for n, v in c.items()} for k, c in cfgs.items()}
    entry = {"ms": ms, "configs": {"hybrid": plain(kt.default_configs(x_dtype)), "fused": plain(best)},
             "measured": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    return case, entry


def tune(model=None, tokens: int = 8192, *, shapes=None, dtype=None, adapter_dtype=None, dropout=None,
         device=None, cache=None, dry_run: bool = False, budget_s: float | None = None,
         max_candidates: int | None = None, log=print) -> dict[str, dict]:
    """Measure the designs for the LoRA layers of `model` (each distinct in x out x rank at `tokens` tokens,
    with the model's dtypes and dropout) or for `shapes` [(tokens, in, out, r), ...]; write the results into
    the dispatch cache (`cache`, default ~/.cache/lorakern/dispatch.json; none in a dry run unless given) and
    return {case key: entry}."""
    import lorakern as lk
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() and not dry_run else torch.device("cpu"))
    if device.type != "cuda" and not dry_run:
        raise RuntimeError("tune measures a GPU and there is none here (torch.cuda.is_available() is False); "
                           "`--dry-run` rehearses it on the CPU")
    work = []
    if model is not None:
        for layer in lk.lora_modules(model).values():
            work.append(((tokens, layer.in_features, layer.out_features, layer.r), layer.weight.dtype,
                         layer.lora_A.dtype, layer.dropout))
    for shape in shapes or ():
        for xd in (dtype if isinstance(dtype, (list, tuple)) else [dtype or torch.bfloat16]):
            for ad in (adapter_dtype if isinstance(adapter_dtype, (list, tuple)) else [adapter_dtype or xd]):
                for p in (dropout if isinstance(dropout, (list, tuple)) else [dropout or 0.0]):
                    work.append((tuple(shape), xd, ad, p))
    if not work:
        raise ValueError("tune: nothing to measure: pass a model with LoRALinear layers or shapes")
    work = list(dict.fromkeys(work))
    results, t_start = {}, time.perf_counter()
    for (M, K, N, r), xd, ad, p in work:
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            log(f"tune: budget of {budget_s:.0f} s spent; {len(work) - len(results)} cases left unmeasured")
            break
        log(f"tune {M}x{K}->{N} r={r} {dispatch.dtype_name(xd)} adapters {dispatch.dtype_name(ad)} dropout {p:g}")
        case, entry = tune_case(M, K, N, r, xd, ad, p, device, dry_run=dry_run, max_candidates=max_candidates,
                                log=log)
        results[case.key()] = entry
        ms = entry["ms"]
        log("  " + "  ".join(f"{d} {t:.3f} ms" for d, t in ms.items()) + f"  -> {dispatch.choose(case, results)}")
    if results and (cache is not None or not dry_run):
        arch = next(iter(results)).split("|")[0]
        path = dispatch.write_entries(arch, results, cache)
        log(f"tune: {len(results)} cases written to {path}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorakern tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", required=True, help="TOKENSxINxOUT:RANK, e.g. 8192x4096x4096:16")
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(_DT), help="activation dtypes")
    ap.add_argument("--adapter-dtype", nargs="+", default=None, choices=sorted(_DT),
                    help="adapter dtypes (default: the activation dtype)")
    ap.add_argument("--dropout", nargs="+", type=float, default=[0.0])
    ap.add_argument("--cache", default=None, help="the dispatch cache to update (default: the user cache; "
                                                  "none in a dry run)")
    ap.add_argument("--json", help="also write the measurements here")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    ap.add_argument("--max-candidates", type=int, default=None, help="time at most this many tiles per kernel")
    ap.add_argument("--dry-run", action="store_true", help="rehearse on the CPU (interpreter, tiny shapes)")
    args = ap.parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in args.shapes]
    except ValueError as exc:
        ap.error(str(exc))
    if not torch.cuda.is_available() and not args.dry_run:
        print("tune: no CUDA GPU here (torch.cuda.is_available() is False): nothing to measure. "
              "`python -m lorakern tune --dry-run ...` rehearses the procedure on the CPU.", file=sys.stderr)
        return 1
    dts = [_DT[d] for d in args.dtype]
    ads = [_DT[d] for d in args.adapter_dtype] if args.adapter_dtype else None
    results = {}
    for xd in dts:
        results.update(tune(shapes=shapes, dtype=[xd], adapter_dtype=ads or [xd], dropout=args.dropout,
                            cache=args.cache, dry_run=args.dry_run, budget_s=args.budget_s,
                            max_candidates=args.max_candidates))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"entries": results, "chosen": {k: dispatch.choose(dispatch.Case.from_key(k), results)
                                                      for k in results}}, f, indent=1)
    return 0 if results else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

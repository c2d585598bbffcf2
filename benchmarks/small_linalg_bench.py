"""Batched small linear algebra (lorakern.small_linalg): the compiled ops against torch.linalg, one run, ratios.

    python benchmarks/small_linalg_bench.py --device cpu                 # the CPU table in BENCHMARKS.md
    python benchmarks/small_linalg_bench.py --device cuda --ks 8 16 32 64 128 256 --json small_linalg.json
                                                                         # the GPU session's stage
    python benchmarks/small_linalg_bench.py --quick                      # a few cases (CI / rehearsal)

Cases: the sizes lorakern solves. The optimizers' damped r x r inverses (r = 16: 224 pairs x 2 Grams; other
ranks 8..64) and the rSVD cores (CholeskyQR of a sketch's Gram, eigh of a small core: k ~ 2r+1..4r+1):
n in {36, 224} matrices of order k in {8, 16, 32, 64}, float32 and float64, for
  cholesky     small_linalg.cholesky_ex                (torch.linalg.cholesky_ex)
  chol_inv     cholesky_inverse: A^-1 by potrf + potri  (torch.linalg.cholesky_ex + torch.cholesky_inverse)
  solve        solve_triangular, m = k right-hand sides (an explicit inverse; torch.linalg.solve_triangular)
  solve_tall   solve_triangular, m = 1024 (CholeskyQR's Q L^-T, n = 36 only)
  eigh         eigh                                     (torch.linalg.eigh)
  psd_inverse  psd_inverse(damping=1e-3): chol_inv + the finiteness check (the optimizer's P)
and heterogeneous batches ("het": 224 matrices, k cycling through 8, 16, 32, 64, kmax = 64): one call of the
extension against torch on identity-padded matrices (cholesky, chol_inv, psd_inverse) or one torch call per
size (eigh).
Each variant is the public wrapper with impl="ext" / impl="torch", so both pay the same argument checks.
Times: medians over --repeats calls after one warm-up (CUDA events on a GPU, perf_counter on the CPU), one
thread by default on the CPU (--threads: two threads on a shared 2-core machine measure the neighbour).
speedup = torch ms / ext ms (> 1: the extension is faster). err: relative Frobenius error against the float64
torch result (eigh: of the eigenvalues). The last line is the EXT_FASTER table this run supports: per (op,
dtype), the widest range of k in which the extension was >= 1.1x faster in every measured case (None: never).
An ext err above tests/conftest.py's bound (1e-5 fp32, 1e-12 fp64) prints FAIL and makes the exit status 1.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from _report import print_table, save_json  # benchmarks/ is the script folder, on sys.path
from _timing import elapsed_ms
from lorakern import small_linalg as sl

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
TOL = {"fp32": 1e-5, "fp64": 1e-12}  # tests/conftest.py's bounds: a larger ext err fails the run (exit status 1)
KS = (8, 16, 32, 64)
NS = (36, 224)
OPS = ("cholesky", "chol_inv", "solve", "solve_tall", "eigh", "psd_inverse")
HET_OPS = ("cholesky", "chol_inv", "eigh", "psd_inverse")
MARGIN = 1.1  # a decision needs a clear win, not noise
DECIDES = {"cholesky": "cholesky", "chol_inv": "cholesky_inverse", "solve": "solve_triangular",
           "solve_tall": "solve_triangular", "eigh": "eigh", "psd_inverse": "cholesky_inverse"}


def spd(n: int, k: int, dtype: torch.dtype, device: torch.device, g: torch.Generator) -> torch.Tensor:
    X = torch.randn(n, k, k + 4, generator=g, dtype=torch.float64, device=device)
    return (X @ X.mT / (k + 4) + 0.1 * torch.eye(k, dtype=torch.float64, device=device)).to(dtype)


def sym(n: int, k: int, dtype: torch.dtype, device: torch.device, g: torch.Generator) -> torch.Tensor:
    X = torch.randn(n, k, k, generator=g, dtype=torch.float64, device=device)
    return (X + X.mT).to(dtype)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_case(op: str, n: int, k: int, sizes, dtype, device, g):
    """(call(impl) -> result, reference float64 result, extract(result) -> tensor compared)."""
    if op == "cholesky":
        A = spd(n, k, dtype, device, g)
        ref = sl.cholesky_ex(A.double(), sizes, impl="torch")[0]
        return (lambda impl: sl.cholesky_ex(A, sizes, impl=impl)), ref, (lambda r: r[0])
    if op == "chol_inv":
        A = spd(n, k, dtype, device, g)
        ref = sl.cholesky_inverse(A.double(), sizes, impl="torch")[0]
        return (lambda impl: sl.cholesky_inverse(A, sizes, impl=impl)), ref, (lambda r: r[0])
    if op in ("solve", "solve_tall"):
        L = torch.linalg.cholesky(spd(n, k, dtype, device, g).double()).to(dtype).contiguous()
        m = k if op == "solve" else 1024
        B = torch.randn(n, k, m, generator=g, dtype=torch.float64, device=device).to(dtype)
        ref = torch.linalg.solve_triangular(L.double(), B.double(), upper=False)
        return (lambda impl: sl.solve_triangular(L, B, sizes, impl=impl)), ref, (lambda r: r)
    if op == "eigh":
        A = sym(n, k, dtype, device, g)
        ref = sl.eigh(A.double(), sizes, impl="torch")[0]
        return (lambda impl: sl.eigh(A, sizes, impl=impl)), ref, (lambda r: r[0])
    if op == "psd_inverse":
        A = spd(n, k, dtype, device, g)
        ref = sl.psd_inverse(A.double(), 1e-3, sizes, impl="torch")[0]
        return (lambda impl: sl.psd_inverse(A, 1e-3, sizes, impl=impl)), ref, (lambda r: r[0])
    raise ValueError(op)


def median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(elapsed_ms(fn, device) for _ in range(repeats))


def run_case(op, n, k, het, dtype_name, device, repeats, g) -> dict:
    dtype = DTYPES[dtype_name]
    sizes = [KS[i % len(KS)] for i in range(n)] if het else None
    call, ref, pick = make_case(op, n, k, sizes, dtype, device, g)
    row = {"op": op, "dtype": dtype_name, "n": n, "k": "het" if het else k, "kmax": k}
    for impl in ("torch", "ext"):
        if impl == "ext" and not sl.ext_available(DECIDES[op], device):
            continue
        row[f"{impl}_ms"] = median_ms(lambda: call(impl), device, repeats)
        row[f"{impl}_err"] = rel_err(pick(call(impl)), ref)
    if "ext_ms" in row:
        row["speedup"] = row["torch_ms"] / row["ext_ms"]
    return row


def cases(quick: bool, ks=KS, ns=NS):
    dtypes, ks, ns = (("fp32", "fp64"), (16, 64), (36,)) if quick else (tuple(DTYPES), ks, ns)
    for dt in dtypes:
        for op in OPS:
            for n in ((36,) if op == "solve_tall" else ns):
                for k in ks:
                    if op == "solve_tall" and k == 8:
                        continue
                    yield op, n, k, False, dt
        for op in HET_OPS:
            yield op, 224 if not quick else 36, max(KS), True, dt


def decision(rows: list[dict], device: torch.device) -> dict[str, tuple[int, int] | None]:
    """Per (op, dtype): the widest range [lo, hi] of measured k in which the extension won by MARGIN in every
    measured case (every n), or None."""
    out = {}
    for op in ("cholesky", "cholesky_inverse", "solve_triangular", "eigh"):
        for dt in DTYPES:
            mine = [r for r in rows if DECIDES.get(r["op"]) == op and r["op"] != "psd_inverse" and r["dtype"] == dt
                    and r["k"] != "het" and "speedup" in r]
            ks = sorted({r["k"] for r in mine})
            best, run = [], []
            for k in ks:
                win = all(r["speedup"] >= MARGIN for r in mine if r["k"] == k)
                run = run + [k] if win else []
                best = run if len(run) > len(best) else best
            out[f"{device.type}/{op}/{dt}"] = (best[0], best[-1]) if best else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--quick", action="store_true", help="k in {16, 64}, n = 36 only")
    ap.add_argument("--ks", type=int, nargs="+", default=list(KS), help="matrix orders (<= 256)")
    ap.add_argument("--ns", type=int, nargs="+", default=list(NS), help="batch sizes")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    g = torch.Generator(device=device).manual_seed(0)
    rows = [run_case(*c, device, args.repeats, g) for c in cases(args.quick, tuple(args.ks), tuple(args.ns))]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, medians of {args.repeats}")
    print_table(rows, [("op", "op", "", 11), ("dtype", "dtype", "", 5), ("n", "n", "d", 4), ("k", "k", "", 4),
                       ("torch ms", "torch_ms", ".3f", 9), ("ext ms", "ext_ms", ".3f", 9),
                       ("speedup", "speedup", ".2f", 7), ("torch err", "torch_err", ".1e", 9),
                       ("ext err", "ext_err", ".1e", 9)])
    chosen = decision(rows, device)
    print("EXT_FASTER (kmax ranges where the extension wins by >= %.1fx in every case):" % MARGIN, chosen)
    bad = [r for r in rows if r.get("ext_err", 0.0) > TOL[r["dtype"]] or r.get("ext_err") != r.get("ext_err")]
    for r in bad:
        print(f"FAIL {r['op']} {r['dtype']} n={r['n']} k={r['k']}: ext err {r['ext_err']:.1e} > {TOL[r['dtype']]:.0e}")
    save_json(args.json, {"device": str(device), "threads": torch.get_num_threads(), "rows": rows,
                          "ext_faster": chosen, "failed": len(bad), "torch": torch.__version__})
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

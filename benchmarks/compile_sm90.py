"""Compile the Triton kernels (LoRA layer and optimizer) for an H100 (sm_90a) without a GPU: compile errors, shared
memory, wgmma, registers and spills of every launch configuration -- what a session without a lent GPU can check.

    python benchmarks/compile_sm90.py            # every candidate and default config x mode x dtypes x BLOCK_R
    python benchmarks/compile_sm90.py --quick    # one config per kernel, mode and dtype family (what CI runs)
    python benchmarks/compile_sm90.py --match 'gemm_bwd .*drop'   # only the lines whose label matches

The LoRA kernels are compiled with exactly the arguments their launchers pass (lora_linear_triton.launch_*,
called with storage-less stand-ins of a contiguous problem M=8192, K=4096, N=4096 and their `_run` captured),
specialized by Triton's own binder as a real launch would be (unit strides constant, pointers and ints divisible
by 16 except the do_not_specialize ones, K=0 in the hybrid GEMMs), and ptxas is the one Triton runs, with its
flags. Covered:
  gemm_fwd  fwd (HAS_BIAS), fwd-hybrid (ACC_OUT: cuBLAS wrote x W^T + b, K=0)
  gemm_bwd  bwd (dX + dA part), bwd+drop, bwd-hybrid (ACC_OUT), bwd-hybrid+drop, dA-only (HAS_GEMM=False),
            dA-only+drop
  xa        x (no dropout), x+drop;  dy  dxa+dB, dB (dB only);  reduce  dA+dB to fp32/bf16/fp16
  dtypes    fp16 and bf16 activations with adapters in that dtype or fp32 ("half" family); fp32 activations
            and adapters with tf32 dots ("tf32" family); BLOCK_R 16/32 in the GEMM, 16/32/64 in the skinny
            passes (what ranks 16, 32, 64 give); in the full run also one exact fp32 ("ieee") config per GEMM
            direction, reported only.
Each line: kernel, mode, x/adapter dtypes, BLOCK_R, tile (BLOCK_M x BLOCK_N x BLOCK_K, GROUP_M, warps, stages;
xa: BLOCK_M x BLOCK_K; dy: BLOCK_M x BLOCK_N), then shared bytes, whether Triton emitted Hopper wgmma, registers
per thread, ptxas spill stores (bytes) and the config's role: `default` and/or `cand` (a default or a candidate
`tune` times: checked) or `report` (printed only). Exit status 1 when a checked config needs more than 232448
bytes of shared memory or spills, or when any kernel fails to compile. A summary table (min-max over the dtypes
and BLOCK_R of each family) ends the output.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from itertools import chain

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
# A private cache (unless one is set): every kernel really goes through ptxas (its log is the report), and
# hundreds of sm_90a binaries do not land in ~/.triton.
_CACHE = None
if "TRITON_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.TemporaryDirectory(prefix="compile_sm90_")
    os.environ["TRITON_CACHE_DIR"] = _CACHE.name

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lorakern._util import cdiv  # noqa: E402
from lorakern.ops import lora_linear_triton as kt  # noqa: E402
from lorakern.optim import precond_triton as pt  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory per block on an H100 (227 KB)
M, K, N = 8192, 4096, 4096  # a large contiguous problem: every size and leading stride a multiple of 16
NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
HALF_PAIRS = [(x, a) for x in (torch.float16, torch.bfloat16) for a in (x, torch.float32)]
FAMILIES = (("half", HALF_PAIRS, ("tf32", "tf32")),
            ("tf32", [(torch.float32, torch.float32)], ("tf32", "tf32")))
RANKS = {"gemm": (16, 32), "skinny": (16, 32, 64)}  # BLOCK_R = min(next_pow2(r, 16), 32 GEMM / 64 skinny)
MODES = {"gemm_fwd": ("fwd", "fwd-hybrid"),
         "gemm_bwd": ("bwd", "bwd+drop", "bwd-hybrid", "bwd-hybrid+drop", "dA-only", "dA-only+drop"),
         "xa": ("x", "x+drop"),
         "dy": ("dxa+dB", "dB")}


# ----------------------------------------------------------------------------------------------------------
# Compiling and the ptxas report
# ----------------------------------------------------------------------------------------------------------
def _ptxas_exe() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(TARGET.arch).path  # the ptxas Triton itself runs for sm_90a
    except Exception:  # noqa: BLE001 - another Triton layout: the bundled binaries
        bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        exe = os.path.join(bindir, "ptxas-blackwell")  # the newer ptxas reads the PTX version triton emits
        return exe if os.path.exists(exe) else os.path.join(bindir, "ptxas")


def _ptxas(ptx: str) -> str:
    """ptxas -v on the PTX with the flags Triton's make_cubin uses (for a cache hit, when Triton ran no ptxas)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        return subprocess.run([_ptxas_exe(), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", f.name,
                               "-o", os.devnull], capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)


def _compile(src: ASTSource, options: dict) -> dict:
    """Compile for sm_90a; Triton's own ptxas log gives registers and spills."""
    knobs = getattr(triton, "knobs", None)
    log = io.StringIO()
    if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
        with knobs.nvidia.scope():
            knobs.nvidia.dump_ptxas_log = True
            with contextlib.redirect_stdout(log):
                k = triton.compile(src, target=TARGET, options=options)
    else:
        k = triton.compile(src, target=TARGET, options=options)
    out = log.getvalue()
    if "Used" not in out:
        out = _ptxas(k.asm["ptx"])
    regs = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    return {"shared": k.metadata.shared, "wgmma": "warp_group_dot" in k.asm["ttgir"],
            "regs": int(regs[-1]) if regs else -1, "spills": int(spills[-1]) if spills else -1}


def compile_one(fn, types: dict, const: dict, warps: int, stages: int, ones=(), div=()) -> dict:
    """Compile fn with `types` for runtime args and `const` constexprs; returns the resource report."""
    const = dict(const, **{n: 1 for n in ones})
    sig = dict(types, **{k: "constexpr" for k in const})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div if n not in const}
    return _compile(ASTSource(fn, sig, const, attrs), dict(num_warps=warps, num_stages=stages))


_BACKEND, _BINDERS = None, {}


def compile_launch(fn, kwargs: dict) -> dict:
    """Compile fn for the keyword arguments of a launch (config included), specialized as Triton's launcher
    specializes them."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = make_backend(TARGET)
    binder = _BINDERS.get(fn)
    if binder is None:
        binder = _BINDERS[fn] = create_function_from_signature(fn.signature, fn.params, _BACKEND)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(_BACKEND, kwargs, bound, specialization, options)
    return _compile(ASTSource(fn, signature, constexprs, attrs), options.__dict__)


# ----------------------------------------------------------------------------------------------------------
# The LoRA kernels, launched as lora_linear_triton launches them
# ----------------------------------------------------------------------------------------------------------
def _capture(launch, **kwargs):
    """(kernel, keyword arguments with the config) that `launch` would run."""
    got = []
    saved = kt._run
    kt._run = lambda name, kernel, grid, cfg, compile_only, **kw: got.append((kernel, dict(kw, **cfg)))
    try:
        launch(**kwargs)
    finally:
        kt._run = saved
    (kernel, kw), = got
    return kernel, kw


def _launch(kernel: str, mode: str, x_dt, a_dt, r: int, precs: tuple[str, str], cfg: dict):
    """(kernel fn, launch kwargs) of one kernel/mode, with the stand-ins forward()/backward() would pass."""
    S, f32 = kt._Stand, torch.float32
    rng = S(torch.int64, (2,))  # the call's dropout key, or the int64 placeholder of an unread RNG argument
    drop = mode.endswith("+drop")
    if kernel == "gemm_fwd":  # forward(): with a bias (the hybrid's bias is in cuBLAS's addmm)
        return _capture(kt.launch_gemm_forward, x=S(x_dt, (M, K)), weight=S(x_dt, (N, K)), bias=S(x_dt, (N,)),
                        xa=S(f32, (M, r)), lora_B=S(a_dt, (N, r)), y=S(x_dt, (M, N)), no_rng=rng, scaling=2.0,
                        hybrid=mode == "fwd-hybrid", precisions=precs, cfg=cfg)
    if kernel == "gemm_bwd":  # backward(): dY (M, N) -> dX (M, K)
        need_dx = not mode.startswith("dA-only")
        return _capture(kt.launch_gemm_backward, grad_y=S(x_dt, (M, N)), weight=S(x_dt, (N, K)), dxa=S(f32, (M, r)),
                        lora_A=S(a_dt, (r, K)), x=S(x_dt, (M, K)), dx=S(x_dt, (M, K)) if need_dx else None,
                        da_part=S(f32, (cdiv(M, cfg["BLOCK_M"]), r, K)), rng=rng, scaling=2.0,
                        dropout_p=0.1 if drop else 0.0, hybrid=mode.startswith("bwd-hybrid"), precisions=precs,
                        cfg=cfg)
    if kernel == "xa":
        return _capture(kt.launch_xa, x=S(x_dt, (M, K)), lora_A=S(a_dt, (r, K)), xa=S(f32, (M, r)), rng=rng,
                        dropout_p=0.1 if drop else 0.0, lora_fp32=kt._lora_fp32(x_dt, a_dt), precision=precs[1],
                        cfg=cfg)
    if kernel == "dy":  # backward(): dY (M, N); dB only: dxa is xa
        xa = S(f32, (M, r))
        need_dxa = mode == "dxa+dB"
        return _capture(kt.launch_dy_pass, grad_y=S(x_dt, (M, N)), lora_B=S(a_dt, (N, r)), xa=xa,
                        dxa=S(f32, (M, r)) if need_dxa else xa, db_part=S(f32, (cdiv(M, cfg["BLOCK_M"]), N, r)),
                        need_dxa=need_dxa, need_db=True, lora_fp32=kt._lora_fp32(x_dt, a_dt), precision=precs[1],
                        cfg=cfg)
    raise ValueError(kernel)


def _tile(kernel: str, cfg: dict) -> str:
    w, s = cfg.get("num_warps", 4), cfg.get("num_stages", 3)
    if kernel.startswith("gemm"):
        return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} g{cfg['GROUP_M']} w{w} s{s}"
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_K' if kernel == 'xa' else 'BLOCK_N']} w{w} s{s}"


def _configs(kernel: str, x_dt) -> list[tuple[dict, str]]:
    """The default and the candidates of `kernel` for activations of x_dt, each once, with its role."""
    default = kt.default_configs(x_dt)[kernel]
    cands = kt.candidates(x_dt, kernel)
    out = [] if any(c == default for c in cands) else [(default, "default")]
    for c in cands:
        if all(c != seen for seen, _ in out):
            out.append((c, "default+cand" if c == default else "cand"))
    return out


def jobs(quick: bool):
    """(label, summary key, role, fn, kwargs) of every LoRA kernel, mode, dtype pair, BLOCK_R and config; --quick:
    each kernel/mode/family once, at the family's default config, the dtype pair and rank rotating over the
    modes (so the quick run still sees fp16, bf16, fp32 adapters and every BLOCK_R)."""
    turn = 0
    for kernel, modes in MODES.items():
        ranks = RANKS["gemm" if kernel.startswith("gemm") else "skinny"]
        for mode in modes:
            for family, pairs, precs in FAMILIES:
                combos = [(x, a, r) for x, a in pairs for r in ranks]
                if quick:
                    combos = [combos[turn % len(combos)]]
                for x_dt, a_dt, r in combos:
                    configs = _configs(kernel, x_dt)
                    if quick:
                        configs = [(kt.default_configs(x_dt)[kernel], "default")]
                    for cfg, role in configs:
                        fn, kw = _launch(kernel, mode, x_dt, a_dt, r, precs, cfg)
                        tile = _tile(kernel, cfg)
                        label = f"{kernel:<8} {mode:<15} {NAMES[x_dt]}/{NAMES[a_dt]} br{kw['BLOCK_R']:<2} {tile}"
                        yield label, (kernel, mode, family, tile), role, fn, kw
            turn += 1
    if not quick:  # exact fp32 (torch.backends.cuda.matmul.allow_tf32 off): FMA dots, reported, not checked
        f32 = torch.float32
        for kernel, mode in (("gemm_fwd", "fwd"), ("gemm_bwd", "bwd")):
            cfg = kt.default_configs(f32)[kernel]
            fn, kw = _launch(kernel, mode, f32, f32, 16, ("ieee", "ieee"), cfg)
            tile = _tile(kernel, cfg)
            yield (f"{kernel:<8} {mode:<15} fp32/fp32 br{kw['BLOCK_R']:<2} {tile} ieee",
                   (kernel, mode, "fp32 ieee", tile), "report", fn, kw)
    S, f32, r = kt._Stand, torch.float32, 32
    for dt in (torch.float32, torch.bfloat16, torch.float16):  # dA and dB (one launch) in the adapter dtype
        fn, kw = _capture(kt.launch_reduce, part_a=S(f32, (cdiv(M, 128), r, K)), out_a=S(dt, (r * K,)),
                          part_b=S(f32, (cdiv(M, 64), N, r)), out_b=S(dt, (N * r,)), scaling=2.0)
        tile = f"{kw['BLOCK']} w{kw['num_warps']}"
        yield (f"{'reduce':<8} {'dA+dB':<15} fp32->{NAMES[dt]} {tile}", ("reduce", "dA+dB", f"fp32->{NAMES[dt]}", tile),
               "default", fn, kw)


# ----------------------------------------------------------------------------------------------------------
# The optimizer's kernels
# ----------------------------------------------------------------------------------------------------------
def optimizer_jobs(quick: bool):
    """The fused optimizer's Gram and update kernels at the launch parameters TritonEngine uses, per rank."""
    import triton.language as tl
    ranks = (16, 64) if quick else (8, 16, 32, 64, 128)
    for r in ranks:
        for name, dt in (("bf16", tl.bfloat16), ("fp32", tl.float32)):
            for kind in ("A", "B"):
                const = dict(R=r, R_PAD=pt.padded_rank(r), BLOCK_L=pt.gram_block_rows(r), IS_A=kind == "A",
                             DTYPE=dt)
                yield (f"gram   {kind} r={r:<3} {name}", pt._gram_kernel, {"table_ptr": "*i64", "out_ptr": "*fp64"},
                       const, pt.gram_num_warps(r), 3, (), ["table_ptr", "out_ptr"])
                types = {"tile_ptr": "*i64", "table_ptr": "*i64", "precond_ptr": "*fp64",
                         **{n: "fp32" for n in ("lr", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "lr_wd",
                                                "step_size", "bc2_sqrt")}}
                const = dict(R=r, R_PAD=pt.padded_rank(r), BLOCK_L=pt.block_rows(r), IS_A=kind == "A", ADAM=True,
                             PER_FACTOR=False, DTYPE=dt, ROUND_BF16=False)
                yield (f"update {kind} r={r:<3} {name}", pt._update_kernel, types, const, pt.num_warps(r), 3, (),
                       ["tile_ptr", "table_ptr", "precond_ptr"])


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def _range(values) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def summary(rows: list[tuple[tuple, str, dict]]) -> list[str]:
    """A markdown table: one row per kernel/mode/family/tile, min-max over its dtype pairs and BLOCK_R."""
    groups: dict[tuple, list] = {}
    for key, role, r in rows:
        groups.setdefault(key, []).append((role, r))
    out = ["| kernel | mode | dtypes | tile | role | shared (B) | wgmma | regs | spills (B) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (kernel, mode, family, tile), items in groups.items():
        rs = [r for _, r in items]
        roles = sorted({role for role, _ in items})
        out.append(f"| {kernel} | {mode} | {family} | {tile} | {','.join(roles)} | "
                   f"{_range([r['shared'] for r in rs])} | {'/'.join(sorted({str(r['wgmma']) for r in rs}))} | "
                   f"{_range([r['regs'] for r in rs])} | {_range([r['spills'] for r in rs])} |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one config per kernel, mode and dtype family")
    p.add_argument("--match", default=None, help="only the lines whose label matches this regular expression")
    p.add_argument("--no-optimizer", action="store_true", help="skip the optimizer's kernels")
    a = p.parse_args(argv)
    keep = re.compile(a.match).search if a.match else (lambda _: True)
    t0 = time.perf_counter()
    failures, violations, rows = 0, [], []
    lora = ((label, key, role, lambda fn=fn, kw=kw: compile_launch(fn, kw))
            for label, key, role, fn, kw in jobs(a.quick))
    optim = () if a.no_optimizer else (  # checked by tests/test_compile_sm90.py (spills=0), not here
        (label, None, "report", lambda fn=fn, t=t, c=c, w=w, s=s, o=o, d=d: compile_one(fn, t, c, w, s, o, d))
        for label, fn, t, c, w, s, o, d in optimizer_jobs(a.quick))
    for label, key, role, build in chain(lora, optim):
        if not keep(label):
            continue
        try:
            r = build()
        except Exception as exc:  # noqa: BLE001 - report every config, fail at the end
            failures += 1
            print(f"{label}: FAIL {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]} role={role}",
                  flush=True)
            continue
        bad = r["shared"] > SMEM_LIMIT or r["spills"] != 0 or r["regs"] < 0
        note = ""
        if role != "report" and bad:
            violations.append(label)
            note = "  <-- VIOLATION (shared > 232448 or spills)"
        print(f"{label}: shared={r['shared']} wgmma={r['wgmma']} regs={r['regs']} spills={r['spills']} "
              f"role={role}{note}", flush=True)
        if key is not None:
            rows.append((key, role, r))
    if rows:
        print("\n" + "\n".join(summary(rows)))
    print(f"\n{len(rows)} LoRA kernel configs; {failures} failed to compile; {len(violations)} checked configs over "
          f"the shared-memory limit or spilling; {time.perf_counter() - t0:.0f} s", flush=True)
    for label in violations:
        print(f"  violation: {label}")
    return 1 if failures or violations else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        if _CACHE is not None:
            _CACHE.cleanup()

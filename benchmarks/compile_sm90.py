"""Compile the Triton kernels (LoRA layer and optimizer) for an H100 (sm_90a) without a GPU: compile errors, shared memory, wgmma,
registers and spills for every autotune config -- what a session without a lent GPU can still check.

    python benchmarks/compile_sm90.py            # all configs of lora_linear_triton.py and precond_triton.py
    python benchmarks/compile_sm90.py --quick    # one config per kernel and mode (what the test runs)

Each line: kernel, mode, dtypes, tile, then shared bytes (the autotuner skips configs over 232448),
whether the GEMM got Hopper wgmma, registers per thread and ptxas spill stores (bytes). Specialization is
the one a contiguous large problem gets: unit strides constant, pointers and other ints divisible by 16.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from itertools import chain

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lorakern.ops import lora_linear_triton as kt  # noqa: E402
from lorakern.optim import precond_triton as pt  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory per block on an H100


def _ptxas(ptx: str) -> tuple[int, int]:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    exe = os.path.join(bindir, "ptxas-blackwell")  # the newer ptxas reads the PTX version triton emits
    if not os.path.exists(exe):
        exe = os.path.join(bindir, "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([exe, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    return int(regs[-1]) if regs else -1, int(spills[-1]) if spills else -1


def compile_one(fn, types: dict, const: dict, warps: int, stages: int, ones=(), div=()) -> dict:
    """Compile fn with `types` for runtime args and `const` constexprs; returns the resource report."""
    const = dict(const, **{n: 1 for n in ones})
    sig = dict(types, **{k: "constexpr" for k in const})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div if n not in const}
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=TARGET,
                       options=dict(num_warps=warps, num_stages=stages))
    regs, spills = _ptxas(k.asm["ptx"])
    return {"shared": k.metadata.shared, "wgmma": "warp_group_dot" in k.asm["ttgir"], "regs": regs, "spills": spills}


def _ints(names):
    return {n: "i32" for n in names}


def jobs(quick: bool):
    """(label, fn, types, const, warps, stages, ones, div) for every kernel, mode and config."""
    gemm_cfgs = [(c.kwargs, c.num_warps, c.num_stages) for c in kt.GEMM_CONFIGS]
    xa_cfgs = [(c.kwargs, c.num_warps, c.num_stages) for c in kt.XA_CONFIGS]
    dy_cfgs = [(c.kwargs, c.num_warps, c.num_stages) for c in kt.DY_CONFIGS]
    if quick:
        gemm_cfgs, xa_cfgs, dy_cfgs = gemm_cfgs[:1], xa_cfgs[:1], dy_cfgs[:1]
    gemm_ints = ["M", "N", "K", "R", "M_BUCKET", "stride_xm", "stride_xk", "stride_wk", "stride_wn", "stride_pm",
                 "stride_pr", "stride_qr", "stride_qn", "stride_om", "stride_on", "stride_dm", "stride_dn",
                 "stride_gr", "stride_gn", "stride_bias"]
    modes = {"fwd": dict(HAS_GEMM=True, ACC_OUT=False, HAS_BIAS=True, DROP_EPILOGUE=False, GRAD_Q=False),
             "bwd": dict(HAS_GEMM=True, ACC_OUT=False, HAS_BIAS=False, DROP_EPILOGUE=False, GRAD_Q=True),
             "bwd+dropout": dict(HAS_GEMM=True, ACC_OUT=False, HAS_BIAS=False, DROP_EPILOGUE=True, GRAD_Q=True),
             # LORAKERN_BASE_GEMM=cublas: cuBLAS made OUT, the kernel adds the rank-r term (K = 0 at run time)
             "bwd-cublas": dict(HAS_GEMM=True, ACC_OUT=True, HAS_BIAS=False, DROP_EPILOGUE=False, GRAD_Q=True)}
    for mode, flags in modes.items():
        for xdt, adt in (("bf16", "bf16"), ("bf16", "fp32")):
            types = {"X": f"*{xdt}", "W": f"*{xdt}", "BIAS": f"*{xdt}", "P": "*fp32", "Q": f"*{adt}",
                     "OUT": f"*{xdt}", "XD": f"*{xdt}", "DQ": "*fp32", **_ints(gemm_ints),
                     "scaling": "fp32", "p_drop": "fp32", "seed": "i64"}
            ones = (["stride_xk", "stride_wk", "stride_pr", "stride_qr", "stride_on", "stride_bias"] if mode == "fwd"
                    else ["stride_xk", "stride_wn", "stride_pr", "stride_qn", "stride_on", "stride_dn", "stride_gn"])
            div = ["X", "W", "BIAS", "P", "Q", "OUT", "XD", "DQ", "M", "N", "K", "R", "M_BUCKET"] + \
                [n for n in gemm_ints if n.startswith("stride")]
            for meta, w, st in gemm_cfgs:
                const = dict(flags, UPCAST=False, PRECISION="tf32", LORA_PRECISION="tf32", BLOCK_R=16, **meta)
                tile = f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']} w{w} s{st}"
                yield (f"gemm {mode:<11} {xdt}/{adt} {tile}", kt._gemm_lowrank_kernel, types, const, w, st, ones, div)
    for xdt, lora_fp32 in (("bf16", False), ("bf16", True)):
        for drop in (False, True):
            types = {"X": f"*{xdt}", "A": f"*{xdt}", "XA": "*fp32", "p_drop": "fp32", "seed": "i64",
                     **_ints(["M", "K", "R", "M_BUCKET", "stride_xm", "stride_xk", "stride_ar", "stride_ak",
                              "stride_om", "stride_or"])}
            for meta, w, st in xa_cfgs:
                const = dict(HAS_DROPOUT=drop, LORA_FP32=lora_fp32, PRECISION="tf32", BLOCK_R=16, **meta)
                yield (f"xa   drop={drop!s:<5} {xdt} fp32={lora_fp32} {meta['BLOCK_M']}x{meta['BLOCK_K']} w{w} s{st}",
                       kt._xa_kernel, types, const, w, st, ["stride_xk", "stride_ak", "stride_or"],
                       ["X", "A", "XA", "M", "K", "R", "stride_xm", "stride_ar", "stride_om"])
    for xdt, lora_fp32 in (("bf16", False), ("bf16", True)):
        types = {"G": f"*{xdt}", "B": f"*{xdt}", "XA": "*fp32", "DXA": "*fp32", "DB": "*fp32", "scaling": "fp32",
                 **_ints(["M", "N", "R", "M_BUCKET", "stride_gm", "stride_gn", "stride_bn", "stride_br", "stride_am",
                          "stride_ar", "stride_dm", "stride_dr", "stride_dbn", "stride_dbr"])}
        for meta, w, st in dy_cfgs:
            const = dict(NEED_DXA=True, NEED_DB=True, LORA_FP32=lora_fp32, PRECISION="tf32", BLOCK_R=16, **meta)
            yield (f"dy   {xdt} fp32={lora_fp32} {meta['BLOCK_M']}x{meta['BLOCK_N']} w{w} s{st}", kt._dy_pass_kernel,
                   types, const, w, st, ["stride_gn", "stride_br", "stride_ar", "stride_dr", "stride_dbr"],
                   ["G", "B", "XA", "DXA", "DB", "M", "N", "R", "stride_gm", "stride_bn", "stride_am", "stride_dm",
                    "stride_dbn"])


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    failures = 0
    for label, fn, types, const, w, st, ones, div in chain(jobs(a.quick), optimizer_jobs(a.quick)):
        try:
            r = compile_one(fn, types, const, w, st, ones, div)
        except Exception as exc:  # noqa: BLE001 - report every config, fail at the end
            failures += 1
            print(f"{label}: FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            continue
        note = " (over the smem limit: the autotuner skips it)" if r["shared"] > SMEM_LIMIT else ""
        print(f"{label}: shared={r['shared']} wgmma={r['wgmma']} regs={r['regs']} spills={r['spills']}{note}",
              flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

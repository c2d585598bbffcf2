"""Triton kernels for y = x W^T + b + s * (drop(x) A^T) B^T and its backward (W, b frozen).

Forward, two launches:
- `_xa_kernel`:  xa = drop(x) A^T, (M, r) in fp32. One read of x; the dropout mask comes from a 2-element
  int64 key drawn on the device from torch's generator for each call (`draw_rng`) and the element's index in
  x, so nothing but that key is stored for backward and no host ever reads it: no sync, a fresh mask per call
  and per replay of a captured CUDA graph (torch's graph-safe RNG), and torch.manual_seed, get/set_rng_state
  and activation checkpointing reproduce it.
- `_gemm_lowrank_kernel`: y = x W^T + b + s * xa B^T, the base GEMM whose accumulator starts from the rank-r
  product, so y is written once ("fused"); or, after cuBLAS wrote x W^T + b into y, only the rank-r term added
  in place ("hybrid").
Backward, three launches:
- `_dy_pass_kernel`: one read of dY gives dxa = dY B (M, r) and, per row block, dY^T xa (a partial of dB).
- `_gemm_lowrank_kernel` again: dX = dY W + s * (dxa A) * keep / (1 - p) and, from the x tile that lines up
  with each dX tile, a partial of dA (x read once, while the compute-bound GEMM runs).
- `_reduce_kernel`: dA, dB = s * the sum of their partials in a fixed order, cast to the adapter dtype, both
  in one launch. No atomics: two runs give bitwise equal gradients, and no memset or cast launch is needed.
Precision: accumulation is always fp32, and xa, dxa and the partials are fp32. With fp32 adapters the skinny
passes and the dA product upcast their tiles (tf32 unless the base is fp32 with tf32 disabled), so fp32
adapters train on a bf16 base without an fp32 copy of x. The rank-r term inside a GEMM runs in the GEMM's
own dtype: it shares the accumulator, and rounding xa to bf16 there adds less error than rounding y to bf16.

Launch configurations are explicit (no triton.autotune at run time, so a first call compiles one config per
kernel): defaults below, or those `python -m lorakern tune` measured (lorakern.ops.dispatch). Every kernel of
a new variant is compiled before the first launch; a compile failure raises `KernelFailure` naming the
kernel and its config, and the caller falls back to the cuBLAS path.

The kernels work on CUDA and, with TRITON_INTERPRET=1 set before this module is imported, on CPU tensors
(how CI tests them). On the interpreter (triton 3.9) tl.dot on bfloat16 operands returns garbage, so
`UPCAST` makes every dot fp32 there.

Each entry point is a torch.library custom op with a fake implementation, so torch.compile treats it as one
opaque node (no graph break, no tracing into Triton's launcher).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakern import _backend
from lorakern._util import cdiv, device_guard, gpu_arch, next_pow2
from lorakern.ops import dispatch

_INTERPRET = _backend.interpreting()
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _keep(seed, ctr, rows, col0, ncols, p_drop, BLOCK: tl.constexpr):
    """The dropout keep-mask of x[rows, col0:col0+BLOCK] (x has ncols columns) for the call's key (seed, ctr):
    the same bits in every kernel. Philox counters: (element group lo, hi, ctr lo, hi), key = seed.

    One Philox call gives 4 numbers, used for 4 adjacent columns (col0 and BLOCK are multiples of 4): a
    quarter of the Philox work and of its live registers (the per-element form spilled ~9 KB/thread on the
    backward GEMM's 128x256 tile, benchmarks/compile_sm90.py)."""
    groups = col0 // 4 + tl.arange(0, BLOCK // 4)
    offs = rows.to(tl.int64)[:, None] * ((ncols + 3) // 4) + groups.to(tl.int64)[None, :]
    lo = (offs & 0xFFFFFFFF).to(tl.uint32)
    zero = lo * 0
    hi = zero + (offs >> 32).to(tl.uint32)
    c_lo = zero + (ctr & 0xFFFFFFFF).to(tl.uint32)
    c_hi = zero + (ctr >> 32).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, c_lo, c_hi)
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (rows.shape[0], BLOCK))
    # uniform in [0, 1) from the top 24 bits, exact in fp32
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p_drop


@triton.jit
def _lowrank_dot(acc, P, Q, rm, rn, m_ok, n_ok, R, stride_pm, stride_pr, stride_qr, stride_qn, scale,
                 DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + scale * P[rm, :R] @ Q[:R, rn], over rank chunks of BLOCK_R (r up to 256 without big tiles)."""
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        p = tl.load(P + rm[:, None] * stride_pm + rr[None, :] * stride_pr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32) * scale
        q = tl.load(Q + rr[:, None] * stride_qr + rn[None, :] * stride_qn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["M"])  # the token count varies per batch: one binary for all of them
def _xa_kernel(
        # tensors
        X, A, XA, RNG,
        # sizes
        M, K, R,
        # strides
        stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
        # scalars
        p_drop,
        # meta
        HAS_DROPOUT: tl.constexpr, LORA_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """XA[M, R] = drop(X)[M, K] @ A[R, K]^T, grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)); the dropout mask from
    the call's key RNG = (seed, ctr)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    # int64 offsets: M x K passes 2^31 at ~150k tokens x 14336 (and M x N for a 128k-vocabulary head)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        ctr = tl.load(RNG + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, ctr, rm, k0, K, p_drop, BLOCK_K), x, 0.0)
        a = tl.load(A + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                    mask=(rr[None, :] < R) & (kk[:, None] < K), other=0.0)
        if LORA_FP32:
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, a.to(x.dtype), acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc = acc / (1.0 - p_drop)
    tl.store(XA + rm[:, None] * stride_om + rr[None, :] * stride_or, acc,
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit(do_not_specialize=["M"])
def _dy_pass_kernel(
        # tensors
        G, B, XA, DXA, DB_PART,
        # sizes
        M, N, R,
        # strides
        stride_gm, stride_gn, stride_bn, stride_br, stride_am, stride_ar, stride_dm, stride_dr,
        stride_ps, stride_pn, stride_pr,
        # meta
        NEED_DXA: tl.constexpr, NEED_DB: tl.constexpr, LORA_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One read of G = dY (M, N): DXA[M, R] = G @ B[N, R] and DB_PART[pid_m] = G[rows]^T @ XA[rows] (N, R).

    grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)); each program owns BLOCK_M rows, sweeps all N columns and writes
    its whole slice of the partials (no atomics, no memset)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64 offsets, as in _xa_kernel
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    r_ok = rr < R
    xa = tl.load(XA + rm[:, None] * stride_am + rr[None, :] * stride_ar,
                 mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    part = DB_PART + pid_m.to(tl.int64) * stride_ps
    dxa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + rn
        n_ok = nn < N
        g = tl.load(G + rm[:, None] * stride_gm + nn[None, :] * stride_gn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if LORA_FP32:
            g = g.to(tl.float32)
        if NEED_DXA:
            b = tl.load(B + nn[:, None] * stride_bn + rr[None, :] * stride_br,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            dxa = tl.dot(g, b.to(g.dtype), dxa, input_precision=PRECISION)
        if NEED_DB:
            db = tl.dot(tl.trans(g), xa.to(g.dtype), input_precision=PRECISION)
            tl.store(part + nn[:, None] * stride_pn + rr[None, :] * stride_pr, db,
                     mask=n_ok[:, None] & r_ok[None, :])
    if NEED_DXA:
        tl.store(DXA + rm[:, None] * stride_dm + rr[None, :] * stride_dr, dxa,
                 mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _gemm_lowrank_kernel(
        # tensors
        X, W, BIAS, P, Q, OUT, XD, DQ_PART, RNG,
        # sizes
        M, N, K, R,
        # strides
        stride_xm, stride_xk, stride_wk, stride_wn, stride_pm, stride_pr, stride_qr, stride_qn,
        stride_om, stride_on, stride_dm, stride_dn, stride_gs, stride_gr, stride_gn, stride_bias,
        # scalars
        scaling, p_drop,
        # meta
        HAS_GEMM: tl.constexpr, ACC_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, DROP_EPILOGUE: tl.constexpr,
        GRAD_Q: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        LORA_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr):
    """OUT[M, N] = X[M, K] @ W[K, N] (+ BIAS[N]) + scaling * (P[M, R] @ Q[R, N]) (* keep / (1 - p)).

    With ACC_OUT the product X @ W is already in OUT (cuBLAS computed it; K = 0 here) and is added to.
    With GRAD_Q also DQ_PART[pid_m] = P[rows]^T @ drop(XD)[rows, cols] (R, N), XD tiled like OUT; with
    HAS_GEMM=False only that. RNG is the call's dropout key (seed, ctr). Forward: X = x, W = weight^T, P = xa, Q = B^T. Backward: X = dY,
    W = weight, P = dxa, Q = A, XD = x, DQ_PART = dA's partials. P is fp32.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-blocks share each W column-block while it is in L2.
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64 offsets, as in _xa_kernel
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N

    if DROP_EPILOGUE:
        seed = tl.load(RNG)
        ctr = tl.load(RNG + 1)

    if GRAD_Q:  # first: with dropout its mask and the GEMM's are one computation, not held across the K loop
        xd = tl.load(XD + rm[:, None] * stride_dm + rn[None, :] * stride_dn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        if DROP_EPILOGUE:
            xd = tl.where(_keep(seed, ctr, rm, pid_n * BLOCK_N, N, p_drop, BLOCK_N), xd / (1.0 - p_drop), 0.0)
        part = DQ_PART + pid_m.to(tl.int64) * stride_gs
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            p = tl.load(P + rm[:, None] * stride_pm + rr[None, :] * stride_pr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            dq = tl.dot(tl.trans(p), xd, input_precision=LORA_PRECISION)
            tl.store(part + rr[:, None] * stride_gr + rn[None, :] * stride_gn, dq,
                     mask=r_ok[:, None] & n_ok[None, :])

    if HAS_GEMM:
        # The rank-r term first, as the accumulator's starting value: only one (BLOCK_M, BLOCK_N) fp32 tile is
        # live through the K loop (a separate masked LoRA tile held across it, and the dropout mask shared
        # with a dA part placed after the loop, spilled 7-10 KB/thread on the 128x256 tiles; now ~2 KB, in
        # this prologue only: benchmarks/compile_sm90.py). It runs in the main loop's dtype (one MMA layout);
        # rounding xa to bf16 here adds less error than rounding y to bf16.
        dot_dtype = tl.float32 if UPCAST else X.dtype.element_ty
        if DROP_EPILOGUE:
            lora = _lowrank_dot(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), P, Q, rm, rn, m_ok, n_ok, R,
                                stride_pm, stride_pr, stride_qr, stride_qn, 1.0, dot_dtype, PRECISION, BLOCK_R)
            keep = _keep(seed, ctr, rm, pid_n * BLOCK_N, N, p_drop, BLOCK_N)
            acc = tl.where(keep, lora * (scaling / (1.0 - p_drop)), 0.0)
        else:
            acc = _lowrank_dot(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), P, Q, rm, rn, m_ok, n_ok, R,
                               stride_pm, stride_pr, stride_qr, stride_qn, scaling, dot_dtype, PRECISION, BLOCK_R)
        rk = tl.arange(0, BLOCK_K)
        # Wrapped row/column indices keep the loads in bounds without masks on M and N (the tutorial trick);
        # those rows/columns are never stored.
        rm_w = rm % M
        rn_w = rn % N
        x_ptr = X + rm_w[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptr = W + rk[:, None] * stride_wk + rn_w[None, :] * stride_wn
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            x = tl.load(x_ptr, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptr, mask=k_ok[:, None], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            x_ptr += BLOCK_K * stride_xk
            w_ptr += BLOCK_K * stride_wk
        if ACC_OUT:  # the hybrid design: OUT already holds x W^T (+ b) from cuBLAS and K is 0
            acc += tl.load(OUT + rm[:, None] * stride_om + rn[None, :] * stride_on,
                           mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(OUT.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _reduce_block(PART, OUT, S, NUMEL, stride_ps, scaling, block, BLOCK: tl.constexpr):
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    ptr = PART + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, S):
        acc += tl.load(ptr, mask=ok, other=0.0)
        ptr += stride_ps
    tl.store(OUT + offs, (acc * scaling).to(OUT.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["S_A", "NUMEL_A", "S_B", "NUMEL_B"])
def _reduce_kernel(
        # tensors
        PART_A, OUT_A, PART_B, OUT_B,
        # sizes
        S_A, NUMEL_A, S_B, NUMEL_B,
        # strides
        stride_a, stride_b,
        # scalars
        scaling,
        # meta
        BLOCK: tl.constexpr):
    """OUT_A[i] = scaling * sum over s = 0, 1, ..., S_A-1 of PART_A[s, i], in that order (bitwise reproducible),
    cast to OUT_A's dtype; the same for B. One launch for both adapter gradients: the first cdiv(NUMEL_A, BLOCK)
    programs reduce A, the others B (NUMEL = 0: nothing to do). PART (S, NUMEL) and OUT (NUMEL,) contiguous."""
    pid = tl.program_id(0)
    blocks_a = tl.cdiv(NUMEL_A, BLOCK)
    if pid < blocks_a:
        _reduce_block(PART_A, OUT_A, S_A, NUMEL_A, stride_a, scaling, pid, BLOCK)
    else:
        _reduce_block(PART_B, OUT_B, S_B, NUMEL_B, stride_b, scaling, pid - blocks_a, BLOCK)


# ----------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------
KERNELS = ("xa", "dy", "gemm_fwd", "gemm_bwd")


def _cfg(warps=4, stages=3, **meta) -> dict:
    return dict(meta, num_warps=warps, num_stages=stages)


if _INTERPRET:  # small tiles: CI stays fast and odd shapes cross block edges
    DEFAULT_CONFIGS = {"xa": _cfg(BLOCK_M=16, BLOCK_K=32), "dy": _cfg(BLOCK_M=16, BLOCK_N=32),
                       "gemm_fwd": _cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
                       "gemm_bwd": _cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)}
    HALF_CONFIGS = TF32_CONFIGS = DEFAULT_CONFIGS
    _REDUCE_BLOCK = 256
else:  # Hopper-sized starting points; `tune` measures the candidates
    HALF_CONFIGS = {"xa": _cfg(BLOCK_M=64, BLOCK_K=128, warps=8), "dy": _cfg(BLOCK_M=64, BLOCK_N=128, warps=8),
                    "gemm_fwd": _cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, warps=8),
                    "gemm_bwd": _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, warps=8, stages=4)}
    TF32_CONFIGS = dict(HALF_CONFIGS, gemm_fwd=_cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, warps=8),
                        gemm_bwd=_cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, warps=8))
    DEFAULT_CONFIGS = HALF_CONFIGS
    _REDUCE_BLOCK = 1024

# What `tune` times per kernel and dtype family ("half": fp16/bf16 activations; "tf32": fp32). Defaults and
# candidates are pruned by `benchmarks/compile_sm90.py` (full run): each compiles for sm_90a in every mode its
# kernel runs (gemm_bwd: with/without dropout, hybrid, dA only), for adapters in the activation dtype or fp32 and
# every BLOCK_R, in <= 227 KB of shared memory without spills. Dropped by that (triton 3.9, 2026-12-06), each
# replaced in place: gemm_bwd 128x256x64/256x128x64 w8 (2-3.7 KB/thread spilled with dropout), 128x128x64 w4 and
# 64x128x64 w4 (dropout, BLOCK_R 32); gemm_fwd 128x128x64 w4 (fp32 adapters, BLOCK_R 32); tf32 gemm_bwd 128x64x32
# w4 (dropout, BLOCK_R 32); xa 64x128 w4 (dropout with fp32 adapters or x) and 32x128 w4 s3; dy 64x128 w4 (fp32
# adapters or x, BLOCK_R 32/64). The 8-warp tiles hold the same work in fewer registers.
CANDIDATES = {
    "half": {"xa": [_cfg(BLOCK_M=bm, BLOCK_K=bk, warps=w, stages=s) for bm, bk, w, s in
                    ((32, 64, 4, 4), (64, 128, 8, 3), (64, 64, 4, 4))],
             "dy": [_cfg(BLOCK_M=bm, BLOCK_N=bn, warps=w, stages=s) for bm, bn, w, s in
                    ((64, 128, 8, 3), (64, 64, 4, 4), (128, 64, 8, 3))],
             "gemm_fwd": [_cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, warps=w, stages=s)
                          for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                                                   (128, 64, 64, 4, 4), (64, 128, 64, 4, 4))],
             "gemm_bwd": [_cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, warps=w, stages=s)
                          for bm, bn, bk, w, s in ((64, 256, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                                                   (128, 64, 64, 8, 4), (64, 128, 64, 8, 4))]},
    "tf32": {"xa": [_cfg(BLOCK_M=bm, BLOCK_K=bk, warps=w, stages=s) for bm, bk, w, s in
                    ((32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 4))],
             "gemm_fwd": [_cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, warps=w, stages=s)
                          for bm, bn, bk, w, s in ((128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4))],
             "gemm_bwd": [_cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, warps=w, stages=s)
                          for bm, bn, bk, w, s in ((128, 128, 32, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 4, 4))]},
}
CANDIDATES["tf32"]["dy"] = CANDIDATES["half"]["dy"]


def default_configs(x_dtype: torch.dtype) -> dict:
    return TF32_CONFIGS if x_dtype == torch.float32 else HALF_CONFIGS


def candidates(x_dtype: torch.dtype, kernel: str) -> list[dict]:
    """The configs `tune` times for `kernel` ("xa", "dy", "gemm_fwd", "gemm_bwd") with x of `x_dtype`."""
    if _INTERPRET:  # two tiny configs: enough for the dry run to exercise the search
        return [DEFAULT_CONFIGS[kernel], dict(DEFAULT_CONFIGS[kernel], BLOCK_M=16)]
    return CANDIDATES["tf32" if x_dtype == torch.float32 else "half"][kernel]


# ----------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------
def _precisions(x_dtype: torch.dtype) -> tuple[str, str]:
    """(base GEMM, rank-r products) input precision for fp32 dots.

    An fp32 base follows torch's matmul precision ("highest" -> exact fp32, else tf32), as F.linear does.
    With a half base the rank-r products use tf32: x is exact in tf32 and the adapters round to 10 mantissa
    bits, far below the bf16/fp16 output's own rounding, at tensor-core speed.
    """
    if x_dtype == torch.float32:
        prec = "ieee" if dispatch.fp32_matmul_is_exact() else "tf32"
        return prec, prec
    return "tf32", "tf32"


def _lora_fp32(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    return _INTERPRET or adapter_dtype != x_dtype or x_dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------
# Dropout RNG state: (seed, counter) on the device, read only by kernels
# ----------------------------------------------------------------------------------------------------------
def draw_rng(device: torch.device, generator=None) -> torch.Tensor:
    """The dropout key of one call: two int64 drawn on `device` from torch's generator (or `generator`), read
    only by the kernels. One tiny launch and no host sync; CUDA graphs replay it with fresh values (torch's
    graph-safe Philox offsets), and whatever restores torch's RNG state (manual_seed, set_rng_state,
    activation checkpointing's recomputation) restores the mask."""
    if generator is None:
        return torch.randint(0, 2**62, (2,), device=device, dtype=torch.int64)
    key = torch.randint(0, 2**62, (2,), device=generator.device, dtype=torch.int64, generator=generator)
    return key if key.device == device else key.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------
# Launchers (keyword arguments, grouped by role as in the kernels)
# ----------------------------------------------------------------------------------------------------------
class KernelFailure(RuntimeError):
    """A kernel did not compile or launch: names the kernel and its config."""

    def __init__(self, kernel: str, config: dict, cause: BaseException):
        super().__init__(f"Triton kernel {kernel} with config {config} failed: {type(cause).__name__}: {cause}")
        self.kernel, self.config, self.cause = kernel, config, cause


def _compile(name: str, kernel, grid, kwargs: dict) -> None:
    """Compile `kernel` for these arguments without launching it (a no-op under the interpreter, where there
    is nothing to compile); loading the binary surfaces out-of-resource errors here, not at launch. Inside
    `precompile`'s parallel phase the compile is only queued."""
    if _INTERPRET:
        return
    compiled = kernel.warmup(grid=grid, **kwargs)
    if _queueing:
        return
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()


_queueing = False


def precompile(variants: list[dict], workers: int | None = None) -> list[tuple[dict, "KernelFailure"]]:
    """Compile the kernels of many variants (keyword arguments of `_ensure_compiled`), in parallel where
    Triton can (its AsyncCompileMode, triton >= 3.4, on a thread pool), then load each in turn. Returns the
    variants that failed, with their KernelFailure; the others are ready to launch without compiling."""
    global _queueing
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # an older Triton: the second loop compiles one at a time
        AsyncCompileMode = None
    if AsyncCompileMode is not None and not _INTERPRET and len(variants) > 1:
        import concurrent.futures
        import os
        with concurrent.futures.ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
            _queueing = True
            try:
                with AsyncCompileMode(pool, ignore_errors=True):
                    for v in variants:
                        try:
                            _ensure_compiled(**v, remember=False)
                        except KernelFailure:
                            pass  # reported by the loop below
            finally:
                _queueing = False
    failures = []
    for v in variants:
        try:
            _ensure_compiled(**v)
        except KernelFailure as failure:
            failures.append((v, failure))
    return failures


def _run(name: str, kernel, grid, cfg: dict, compile_only: bool, **kwargs) -> None:
    kwargs.update(cfg)
    try:
        if compile_only:
            _compile(name, kernel, grid, kwargs)
        else:
            kernel[grid](**kwargs)
    except Exception as exc:
        raise KernelFailure(name, cfg, exc) from exc


def launch_xa(*, x, lora_A, xa, rng, dropout_p: float, lora_fp32: bool, precision: str, cfg: dict,
              compile_only: bool = False) -> None:
    M, K = x.shape
    R = lora_A.shape[0]
    br = min(next_pow2(R, 16), 64)
    (sxm, sxk), (sar, sak), (som, sor) = x.stride(), lora_A.stride(), xa.stride()
    _run("xa", _xa_kernel, (cdiv(M, cfg["BLOCK_M"]), cdiv(R, br)), cfg, compile_only,
         X=x, A=lora_A, XA=xa, RNG=rng,
         M=M, K=K, R=R,
         stride_xm=sxm, stride_xk=sxk, stride_ar=sar, stride_ak=sak, stride_om=som, stride_or=sor,
         p_drop=dropout_p,
         HAS_DROPOUT=dropout_p > 0.0, LORA_FP32=lora_fp32, PRECISION=precision, BLOCK_R=br)


def launch_dy_pass(*, grad_y, lora_B, xa, dxa, db_part, need_dxa: bool, need_db: bool, lora_fp32: bool,
                   precision: str, cfg: dict, compile_only: bool = False) -> None:
    M, N = grad_y.shape
    R = lora_B.shape[1]
    br = min(next_pow2(R, 16), 64)
    (sgm, sgn), (sbn, sbr), (sam, sar), (sdm, sdr) = grad_y.stride(), lora_B.stride(), xa.stride(), dxa.stride()
    sps, spn, spr = db_part.stride() if need_db else (0, 0, 0)
    _run("dy", _dy_pass_kernel, (cdiv(M, cfg["BLOCK_M"]), cdiv(R, br)), cfg, compile_only,
         G=grad_y, B=lora_B, XA=xa, DXA=dxa, DB_PART=db_part,
         M=M, N=N, R=R,
         stride_gm=sgm, stride_gn=sgn, stride_bn=sbn, stride_br=sbr, stride_am=sam, stride_ar=sar,
         stride_dm=sdm, stride_dr=sdr, stride_ps=sps, stride_pn=spn, stride_pr=spr,
         NEED_DXA=need_dxa, NEED_DB=need_db, LORA_FP32=lora_fp32, PRECISION=precision, BLOCK_R=br)


def _gemm_grid(M: int, N: int, cfg: dict) -> tuple[int]:
    return (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)


def launch_gemm_forward(*, x, weight, bias, xa, lora_B, y, no_rng, scaling: float, hybrid: bool,
                        precisions: tuple[str, str], cfg: dict, compile_only: bool = False) -> None:
    """y = x W^T + b + scaling * xa B^T (hybrid: y already holds x W^T + b); no_rng: an int64 placeholder."""
    M, K = x.shape
    N, R = weight.shape[0], lora_B.shape[1]
    (sxm, sxk), (swn, swk), (sbn, sbr), (sym, syn), (sqm, sqr) = (x.stride(), weight.stride(), lora_B.stride(),
                                                                 y.stride(), xa.stride())
    _run("gemm_fwd", _gemm_lowrank_kernel, _gemm_grid(M, N, cfg), cfg, compile_only,
         X=x, W=weight, BIAS=bias if bias is not None else y, P=xa, Q=lora_B, OUT=y, XD=y, DQ_PART=xa, RNG=no_rng,
         M=M, N=N, K=0 if hybrid else K, R=R,
         stride_xm=sxm, stride_xk=sxk, stride_wk=swk, stride_wn=swn, stride_pm=sqm, stride_pr=sqr,
         stride_qr=sbr, stride_qn=sbn, stride_om=sym, stride_on=syn, stride_dm=0, stride_dn=0,
         stride_gs=0, stride_gr=0, stride_gn=0, stride_bias=bias.stride(0) if bias is not None else 0,
         scaling=scaling, p_drop=0.0,
         HAS_GEMM=True, ACC_OUT=hybrid, HAS_BIAS=bias is not None and not hybrid, DROP_EPILOGUE=False,
         GRAD_Q=False, UPCAST=_INTERPRET, PRECISION=precisions[0],
         LORA_PRECISION=precisions[1], BLOCK_R=min(next_pow2(R, 16), 32))


def launch_gemm_backward(*, grad_y, weight, dxa, lora_A, x, dx, da_part, rng, scaling: float, dropout_p: float,
                         hybrid: bool, precisions: tuple[str, str], cfg: dict, compile_only: bool = False) -> None:
    """dx = dY W + scaling * (dxa A) * keep / (1 - p) (hybrid: dx already holds dY W; dx None: not needed)
    and da_part[pid_m] = dxa[rows]^T drop(x)[rows] (da_part None: not needed)."""
    M, N = grad_y.shape
    K, R = weight.shape[1], lora_A.shape[0]
    out = dx if dx is not None else dxa  # placeholders are never read or written (the flags say so)
    part = da_part if da_part is not None else dxa
    (sgm, sgn), (swn, swk), (sdm, sdr), (sar, sak) = grad_y.stride(), weight.stride(), dxa.stride(), lora_A.stride()
    (som, son), (sxm, sxk) = out.stride(), x.stride()
    sps, spr, spk = da_part.stride() if da_part is not None else (0, 0, 0)
    _run("gemm_bwd", _gemm_lowrank_kernel, _gemm_grid(M, K, cfg), cfg, compile_only,
         X=grad_y, W=weight, BIAS=dxa, P=dxa, Q=lora_A, OUT=out, XD=x, DQ_PART=part, RNG=rng,
         M=M, N=K, K=0 if hybrid else N, R=R,
         stride_xm=sgm, stride_xk=sgn, stride_wk=swn, stride_wn=swk, stride_pm=sdm, stride_pr=sdr,
         stride_qr=sar, stride_qn=sak, stride_om=som, stride_on=son, stride_dm=sxm, stride_dn=sxk,
         stride_gs=sps, stride_gr=spr, stride_gn=spk, stride_bias=0,
         scaling=scaling, p_drop=dropout_p,
         HAS_GEMM=dx is not None, ACC_OUT=hybrid, HAS_BIAS=False, DROP_EPILOGUE=dropout_p > 0.0,
         GRAD_Q=da_part is not None, UPCAST=_INTERPRET, PRECISION=precisions[0],
         LORA_PRECISION=precisions[1], BLOCK_R=min(next_pow2(R, 16), 32))


def launch_reduce(*, part_a=None, out_a=None, part_b=None, out_b=None, scaling: float,
                  compile_only: bool = False) -> None:
    """out = scaling * part.sum(0) in a fixed order, cast to out's dtype, for (part_a, out_a) and (part_b, out_b)
    in one launch; either pair may be None. part (S, ...) and out contiguous."""
    def numel(t):
        return 0 if t is None else (t.shape[0] if isinstance(t, _Stand) else t.numel())
    na, nb = numel(out_a), numel(out_b)
    any_part, any_out = (part_a if part_a is not None else part_b), (out_a if out_a is not None else out_b)
    pa, oa = (part_a, out_a) if na else (any_part, any_out)
    pb, ob = (part_b, out_b) if nb else (any_part, any_out)
    cfg = dict(BLOCK=_REDUCE_BLOCK, num_warps=4)
    _run("reduce", _reduce_kernel, (cdiv(na, _REDUCE_BLOCK) + cdiv(nb, _REDUCE_BLOCK),), cfg, compile_only,
         PART_A=pa, OUT_A=oa, PART_B=pb, OUT_B=ob,
         S_A=pa.shape[0] if na else 0, NUMEL_A=na, S_B=pb.shape[0] if nb else 0, NUMEL_B=nb,
         stride_a=pa.stride(0), stride_b=pb.stride(0),
         scaling=scaling)


# ----------------------------------------------------------------------------------------------------------
# The operation: forward and backward
# ----------------------------------------------------------------------------------------------------------
_empty = torch.empty  # one name for every buffer the kernels overwrite (tests fill them with NaN)
_no_rngs: dict = {}


def _no_rng(device: torch.device) -> torch.Tensor:
    """The empty int64 tensor a forward without dropout returns as its RNG snapshot (one per device)."""
    t = _no_rngs.get(device)
    if t is None:
        t = _no_rngs[device] = torch.empty((0,), device=device, dtype=torch.int64)
    return t
_compiled: set = set()  # variants whose kernels all compiled (forward and the backward the caller needs)


_config_keys: dict[int, tuple] = {}


def _config_key(cfgs: dict) -> tuple:
    """A hashable form of a configs dict, computed once per dict object (the defaults, or a measured entry's)."""
    hit = _config_keys.get(id(cfgs))
    if hit is None or hit[0] is not cfgs:
        hit = _config_keys[id(cfgs)] = (cfgs, tuple(sorted((k, tuple(sorted(v.items()))) for k, v in cfgs.items())))
    return hit[1]


_merged: dict[tuple, tuple] = {}


def _configs(x_dtype: torch.dtype, configs: dict | None) -> dict:
    """`configs` (a measured entry's, possibly partial) over the defaults; one merged dict per entry object."""
    base = default_configs(x_dtype)
    if not configs:
        return base
    hit = _merged.get((id(configs), x_dtype))
    if hit is None or hit[0] is not configs:
        hit = _merged[(id(configs), x_dtype)] = (configs, {k: configs.get(k, base[k]) for k in KERNELS})
    return hit[1]


def partial_bytes(M: int, K: int, N: int, R: int, x_dtype: torch.dtype, configs: dict | None = None) -> int:
    """Bytes of the backward's fixed-order partial sums for dB (per dY row block) and dA (per GEMM row block)."""
    cfgs = _configs(x_dtype, configs)
    return 4 * R * (cdiv(M, cfgs["dy"]["BLOCK_M"]) * N + cdiv(M, cfgs["gemm_bwd"]["BLOCK_M"]) * K)


def variant(x, weight, bias, lora_A, lora_B, dropout_p: float, *, hybrid: bool = False, configs: dict | None = None,
            need_grads: tuple[bool, bool, bool] = (True, True, True)) -> dict:
    """What `precompile` takes for one call of forward (and of the backward need_grads asks for)."""
    return dict(x=x if x.stride(1) == 1 else x.contiguous(), weight=weight, bias=bias, lora_A=lora_A,
                lora_B=lora_B, dropout_p=float(dropout_p), hybrid=hybrid, cfgs=_configs(x.dtype, configs),
                precs=_precisions(x.dtype), lora_fp32=_lora_fp32(x.dtype, lora_A.dtype), need_grads=tuple(need_grads))


def prepare(x, weight, bias, lora_A, lora_B, dropout_p: float, *, hybrid: bool = False, configs: dict | None = None,
            need_grads: tuple[bool, bool, bool] = (True, True, True)) -> None:
    """Compile this call's kernels if they are not yet (KernelFailure if they do not compile)."""
    with device_guard(x.device):
        _ensure_compiled(**variant(x, weight, bias, lora_A, lora_B, dropout_p, hybrid=hybrid, configs=configs,
                                   need_grads=need_grads))


def forward(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, rng, *, hybrid: bool = False,
            configs: dict | None = None, need_grads: tuple[bool, bool, bool] = (False, False, False),
            prepared: bool = False):
    """(y, xa); rng is the call's dropout key (draw_rng) or None. Compiles, on the first call of each variant,
    the forward kernels and the backward ones `need_grads` = (dx, dA, dB) asks for, so that a compile failure
    surfaces here (KernelFailure); `prepared`: the caller has just done that (`prepare`)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if x.stride(1) != 1:  # coalesced loads along K; a transposed view would read one element per row
        x = x.contiguous()
    cfgs = _configs(x.dtype, configs)
    precs = _precisions(x.dtype)
    lora_fp32 = _lora_fp32(x.dtype, lora_A.dtype)
    xa = _empty((M, R), device=x.device, dtype=torch.float32)
    y = _empty((M, N), device=x.device, dtype=x.dtype)
    no_rng = _no_rng(x.device)  # the int64 placeholder of every RNG argument that is not read
    with device_guard(x.device):
        if not prepared:
            _ensure_compiled(x, weight, bias, lora_A, lora_B, dropout_p, hybrid, cfgs, precs, lora_fp32, need_grads)
        launch_xa(x=x, lora_A=lora_A, xa=xa, rng=rng if dropout_p > 0.0 else no_rng, dropout_p=dropout_p,
                  lora_fp32=lora_fp32, precision=precs[1], cfg=cfgs["xa"])
        if hybrid:
            torch.addmm(bias, x, weight.t(), out=y) if bias is not None else torch.mm(x, weight.t(), out=y)
        launch_gemm_forward(x=x, weight=weight, bias=bias, xa=xa, lora_B=lora_B, y=y, no_rng=no_rng, scaling=scaling,
                            hybrid=hybrid, precisions=precs, cfg=cfgs["gemm_fwd"])
    return y, xa


def _spec(v: int) -> int:
    """How Triton specializes an int argument: 1, divisible by 16, or neither (M and the partial counts are
    do_not_specialize: they vary per batch)."""
    return 1 if v == 1 else (16 if v % 16 == 0 else 0)


def _tensor_spec(t) -> tuple | None:
    """A tensor argument's specialization: its address's 16-byte alignment and its strides'."""
    if t is None:
        return None
    return (t.data_ptr() % 16 == 0, *(_spec(st) for st in t.stride()))


class _Stand:
    """What compiling needs of a tensor argument (dtype, strides, an aligned address), without storage."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...]):
        self.dtype, self.shape = dtype, tuple(shape)
        strides, step = [], 1
        for n in reversed(self.shape):
            strides.append(step)
            step *= max(n, 1)
        self._strides = tuple(reversed(strides))

    def stride(self, dim: int | None = None):
        return self._strides if dim is None else self._strides[dim]

    @staticmethod
    def data_ptr() -> int:
        return 0


def _ensure_compiled(x, weight, bias, lora_A, lora_B, dropout_p, hybrid, cfgs, precs, lora_fp32, need_grads,
                     remember: bool = True):
    """Compile every kernel of this variant (forward, and the backward `need_grads` asks for) before the first
    launch, with the arguments the launches will have, so that a failure raises here, in the forward."""
    need_dx, need_dA, need_dB = need_grads
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    key = (x.device, x.dtype, lora_A.dtype, dropout_p > 0.0, hybrid, _spec(K), _spec(N), R, need_grads, precs,
           _config_key(cfgs), *(_tensor_spec(t) for t in (x, weight, bias, lora_A, lora_B)))
    if key in _compiled:
        return
    cfgs = {k: dict(v) for k, v in cfgs.items()}
    f32, act = torch.float32, x.dtype
    xa, y, rng = _Stand(f32, (M, R)), _Stand(act, (M, N)), _Stand(torch.int64, (2,))
    launch_xa(x=x, lora_A=lora_A, xa=xa, rng=rng, dropout_p=dropout_p, lora_fp32=lora_fp32,
              precision=precs[1], cfg=cfgs["xa"], compile_only=True)
    launch_gemm_forward(x=x, weight=weight, bias=bias, xa=xa, lora_B=lora_B, y=y, no_rng=rng,
                        scaling=1.0, hybrid=hybrid, precisions=precs, cfg=cfgs["gemm_fwd"], compile_only=True)
    if need_dx or need_dA or need_dB:
        s_dy, s_gemm = cdiv(M, cfgs["dy"]["BLOCK_M"]), cdiv(M, cfgs["gemm_bwd"]["BLOCK_M"])
        launch_dy_pass(grad_y=y, lora_B=lora_B, xa=xa, dxa=xa, db_part=_Stand(f32, (s_dy, N, R)),
                       need_dxa=need_dx or need_dA, need_db=need_dB, lora_fp32=lora_fp32, precision=precs[1],
                       cfg=cfgs["dy"], compile_only=True)
        if need_dx or need_dA:
            launch_gemm_backward(grad_y=y, weight=weight, dxa=xa, lora_A=lora_A, x=x,
                                 dx=_Stand(act, (M, K)) if need_dx else None,
                                 da_part=_Stand(f32, (s_gemm, R, K)) if need_dA else None, rng=rng, scaling=1.0,
                                 dropout_p=dropout_p, hybrid=hybrid and need_dx, precisions=precs,
                                 cfg=cfgs["gemm_bwd"], compile_only=True)
        if need_dA or need_dB:
            launch_reduce(part_a=_Stand(f32, (s_gemm, R, K)) if need_dA else None,
                          out_a=_Stand(lora_A.dtype, (R * K,)) if need_dA else None,
                          part_b=_Stand(f32, (s_dy, N, R)) if need_dB else None,
                          out_b=_Stand(lora_B.dtype, (N * R,)) if need_dB else None, scaling=1.0, compile_only=True)
    if remember:
        _compiled.add(key)


def backward(grad_y, x, xa, weight, lora_A, lora_B, scaling: float, dropout_p: float, rng,
             need_dx: bool, need_dA: bool, need_dB: bool, *, hybrid: bool = False, configs: dict | None = None):
    """(dx, dA, dB), each None where not needed; dA and dB in the adapter dtype, reduced in a fixed order."""
    M, N = grad_y.shape  # N = out_features
    K, R = weight.shape[1], lora_A.shape[0]  # K = in_features
    if grad_y.stride(1) != 1:
        grad_y = grad_y.contiguous()
    cfgs = _configs(grad_y.dtype, configs)
    precs = _precisions(grad_y.dtype)
    lora_fp32 = _lora_fp32(grad_y.dtype, lora_A.dtype)
    need_dxa = need_dx or need_dA
    dev = grad_y.device
    dxa = _empty((M, R), device=dev, dtype=torch.float32) if need_dxa else xa
    dx = _empty((M, K), device=dev, dtype=grad_y.dtype) if need_dx else None
    db_part = (_empty((cdiv(M, cfgs["dy"]["BLOCK_M"]), N, R), device=dev, dtype=torch.float32)
               if need_dB else None)
    da_part = (_empty((cdiv(M, cfgs["gemm_bwd"]["BLOCK_M"]), R, K), device=dev, dtype=torch.float32)
               if need_dA else None)
    dA = _empty((R, K), device=dev, dtype=lora_A.dtype) if need_dA else None
    dB = _empty((N, R), device=dev, dtype=lora_B.dtype) if need_dB else None
    with device_guard(dev):
        if need_dxa or need_dB:
            launch_dy_pass(grad_y=grad_y, lora_B=lora_B, xa=xa, dxa=dxa, db_part=db_part if need_dB else xa,
                           need_dxa=need_dxa, need_db=need_dB, lora_fp32=lora_fp32, precision=precs[1],
                           cfg=cfgs["dy"])
        if need_dxa:
            hyb = hybrid and need_dx
            if hyb:
                torch.mm(grad_y, weight, out=dx)
            launch_gemm_backward(grad_y=grad_y, weight=weight, dxa=dxa, lora_A=lora_A, x=x, dx=dx, da_part=da_part,
                                 rng=rng if dropout_p > 0.0 else _no_rng(dev), scaling=scaling, dropout_p=dropout_p,
                                 hybrid=hyb, precisions=precs, cfg=cfgs["gemm_bwd"])
        if need_dA or need_dB:
            launch_reduce(part_a=da_part, out_a=dA, part_b=db_part, out_b=dB, scaling=scaling)
    return dx, dA, dB


# ----------------------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees opaque nodes; eager calls go straight to forward/backward above)
# ----------------------------------------------------------------------------------------------------------
def _op_configs(x, weight, lora_A, dropout_p: float, hybrid: bool) -> dict | None:
    """The measured configs for a call through the custom op (what the eager path gets from _choose)."""
    if x.device.type != "cuda":
        return None
    return dispatch.design_for(gpu_arch(x.device), x.dtype, lora_A.dtype, x.shape[0], weight.shape[1],
                               weight.shape[0], lora_A.shape[0], dropout_p > 0.0,
                               not dispatch.fp32_matmul_is_exact())[2].get("hybrid" if hybrid else "fused")


@torch.library.custom_op("lorakern::triton_lora_forward", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
                                "float dropout_p, Tensor? rng, bool hybrid, bool need_dx, bool need_dA, bool need_dB)"
                                " -> (Tensor, Tensor)")
def forward_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng, hybrid, need_dx, need_dA, need_dB):
    return forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng, hybrid=hybrid,
                   configs=_op_configs(x, weight, lora_A, dropout_p, hybrid), need_grads=(need_dx, need_dA, need_dB))


@forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng, hybrid, need_dx, need_dA, need_dB):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("lorakern::triton_lora_backward", mutates_args=(),
                         schema="(Tensor grad_y, Tensor x, Tensor xa, Tensor weight, Tensor lora_A, Tensor lora_B, "
                                "float scaling, float dropout_p, Tensor? rng, bool need_dx, bool need_dA, "
                                "bool need_dB, bool hybrid) -> (Tensor?, Tensor?, Tensor?)")
def backward_op(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, rng, need_dx, need_dA, need_dB, hybrid):
    return backward(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, rng, need_dx, need_dA, need_dB,
                    hybrid=hybrid, configs=_op_configs(x, weight, lora_A, dropout_p, hybrid))


@backward_op.register_fake
def _(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, rng, need_dx, need_dA, need_dB, hybrid):
    return (grad_y.new_empty((grad_y.shape[0], weight.shape[1])) if need_dx else None,
            lora_A.new_empty(lora_A.shape) if need_dA else None,
            lora_B.new_empty(lora_B.shape) if need_dB else None)

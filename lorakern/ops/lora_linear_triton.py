"""Triton kernels for y = x W^T + b + s * (drop(x) A^T) B^T and its backward (W, b frozen).

Forward, two launches:
- `_xa_kernel`:  xa = drop(x) A^T, (M, r) in fp32. One read of x; the dropout mask comes from a Philox
  seed and the element's index in x, so nothing but the seed is stored for backward.
- `_gemm_lowrank_kernel`: y = x W^T + b + s * xa B^T, the base GEMM whose accumulator starts from the
  rank-r product (a K=r MMA before the main loop), so y is written once (an unfused y.addmm_(xa, B^T) reads and writes y again: 2 x 64 MB at
  M=8192, out=4096 bf16, ~40 us on an H100 against a ~380 us base GEMM).
Backward, two launches (+ two memsets for the atomically reduced adapter gradients):
- `_dy_pass_kernel`: one read of dY gives dxa = dY B (M, r) and dB += s * dY^T xa.
- `_gemm_lowrank_kernel` again: dX = dY W + s * (dxa A) * keep / (1 - p), and in its epilogue
  dA += s * dxa^T drop(x), from the x tile that lines up with the dX output tile: x is read once, while the
  compute-bound GEMM runs (a separate dA pass would read x again: another ~20 us at M=8192, in=4096).
Precision: accumulation is always fp32, and xa, dxa, dA, dB are kept in fp32. With fp32 adapters the
skinny passes and the dA product upcast their tiles (tf32 unless the base is fp32 with tf32 disabled), so
fp32 adapters train on a bf16 base without an fp32 copy of x; with adapters in the activation dtype they use
that dtype's tensor cores. The rank-r term inside a GEMM epilogue runs in the GEMM's own dtype: it shares
the accumulator, and rounding xa to bf16 there adds less error than rounding y to bf16.

The kernels work on CUDA and, with TRITON_INTERPRET=1 set before this module is imported, on CPU tensors
(how CI tests them). On the interpreter (triton 3.9) tl.dot on bfloat16 operands returns garbage, so
`UPCAST` makes every dot fp32 there.

Each entry point is a torch.library custom op with a fake implementation, so torch.compile treats it as
one opaque node (no graph break, no tracing into Triton's launcher).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from lorakern import _backend

_INTERPRET = _backend.interpreting()
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _keep(seed, rows, col0, ncols, p_drop, BLOCK: tl.constexpr):
    """The dropout keep-mask of x[rows, col0:col0+BLOCK] (x has ncols columns): the same bits in every kernel.

    One Philox call gives 4 numbers, used for 4 adjacent columns (col0 and BLOCK are multiples of 4): a
    quarter of the Philox work and of its live registers (the per-element form spilled ~9 KB/thread on the
    backward GEMM's 128x256 tile, benchmarks/compile_sm90.py)."""
    groups = col0 // 4 + tl.arange(0, BLOCK // 4)
    offs = rows.to(tl.int64)[:, None] * ((ncols + 3) // 4) + groups.to(tl.int64)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, offs)
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


@triton.jit
def _xa_kernel(X, A, XA, M, K, R, M_BUCKET,
               stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
               p_drop, seed,
               HAS_DROPOUT: tl.constexpr, LORA_FP32: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """XA[M, R] = drop(X)[M, K] @ A[R, K]^T, grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R))."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    # int64 offsets: M x K passes 2^31 at ~150k tokens x 14336 (and M x N for a 128k-vocabulary head)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, rm, k0, K, p_drop, BLOCK_K), x, 0.0)
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


@triton.jit
def _dy_pass_kernel(G, B, XA, DXA, DB, M, N, R, M_BUCKET,
                    stride_gm, stride_gn, stride_bn, stride_br, stride_am, stride_ar,
                    stride_dm, stride_dr, stride_dbn, stride_dbr, scaling,
                    NEED_DXA: tl.constexpr, NEED_DB: tl.constexpr,
                    LORA_FP32: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One read of G = dY (M, N): DXA[M, R] = G @ B[N, R] (stored), DB[N, R] += scaling * G^T @ XA (atomic).

    grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)); each program owns BLOCK_M rows and sweeps all N columns.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64 offsets, as in _xa_kernel
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    r_ok = rr < R
    xa = tl.load(XA + rm[:, None] * stride_am + rr[None, :] * stride_ar,
                 mask=m_ok[:, None] & r_ok[None, :], other=0.0)
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
            tl.atomic_add(DB + nn[:, None] * stride_dbn + rr[None, :] * stride_dbr, db * scaling,
                          mask=n_ok[:, None] & r_ok[None, :])
    if NEED_DXA:
        tl.store(DXA + rm[:, None] * stride_dm + rr[None, :] * stride_dr, dxa,
                 mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _gemm_lowrank_kernel(X, W, BIAS, P, Q, OUT, XD, DQ, M, N, K, R, M_BUCKET,
                         stride_xm, stride_xk, stride_wk, stride_wn, stride_pm, stride_pr,
                         stride_qr, stride_qn, stride_om, stride_on, stride_dm, stride_dn,
                         stride_gr, stride_gn, stride_bias, scaling, p_drop, seed,
                         HAS_GEMM: tl.constexpr, ACC_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         DROP_EPILOGUE: tl.constexpr,
                         GRAD_Q: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         LORA_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """OUT[M, N] = X[M, K] @ W[K, N] (+ BIAS[N]) + scaling * (P[M, R] @ Q[R, N]) (* keep / (1 - p)).

    With ACC_OUT the product X @ W is already in OUT (cuBLAS computed it; K = 0 here) and is added to.
    With GRAD_Q also DQ[R, N] += scaling * P^T @ drop(XD)[M, N] (atomic, fp32), XD tiled like OUT; with
    HAS_GEMM=False only that. Forward: X = x, W = weight^T, P = xa, Q = B^T. Backward: X = dY, W = weight,
    P = dxa, Q = A, XD = x, DQ = dA. P is fp32.
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

    if GRAD_Q:  # first: with dropout its mask and the GEMM's are one computation, not held across the K loop
        xd = tl.load(XD + rm[:, None] * stride_dm + rn[None, :] * stride_dn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        if DROP_EPILOGUE:
            xd = tl.where(_keep(seed, rm, pid_n * BLOCK_N, N, p_drop, BLOCK_N), xd / (1.0 - p_drop), 0.0)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            p = tl.load(P + rm[:, None] * stride_pm + rr[None, :] * stride_pr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            dq = tl.dot(tl.trans(p), xd, input_precision=LORA_PRECISION)
            tl.atomic_add(DQ + rr[:, None] * stride_gr + rn[None, :] * stride_gn, dq * scaling,
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
            keep = _keep(seed, rm, pid_n * BLOCK_N, N, p_drop, BLOCK_N)
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
        if ACC_OUT:  # the "cublas" base: OUT already holds x W^T (+ b) from cuBLAS and K is 0
            acc += tl.load(OUT + rm[:, None] * stride_om + rn[None, :] * stride_on,
                           mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(OUT.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------
def _cfg(warps=4, stages=3, **meta):
    return triton.Config(meta, num_warps=warps, num_stages=stages)


class _TrialHooks:
    """Autotune hooks that keep every trial run of a launch from changing live tensors.

    - `zero`: (flag, buffer) pairs: `buffer` is accumulated atomically when `flag` is set, so it is zeroed
      before each trial and once after tuning. Only when the flag is set: otherwise the argument is a
      placeholder aliasing a live tensor (triton's reset_to_zero wiped xa or dxa: first review).
    - `restore`: (flag, buffer) pairs: `buffer` is read-modify-written when `flag` is set (ACC_OUT adds the
      rank-r term into cuBLAS's x W^T), so it is saved before each trial and restored after it; without this
      the first call of each shape added the LoRA term once per trial (second review)."""

    def __init__(self, zero=(), restore=()):
        self.zero, self.restore, self.saved = tuple(zero), tuple(restore), {}

    def pre(self, nargs, reset_only=False):
        for flag, buf in self.zero:
            if nargs[flag]:
                nargs[buf].zero_()
        if not reset_only:  # reset_only: the call after tuning, before the real launch
            self.saved = {buf: nargs[buf].clone() for flag, buf in self.restore if nargs[flag]}

    def post(self, nargs, exception=None):
        for buf, value in self.saved.items():
            nargs[buf].copy_(value)
        self.saved = {}


# Hopper-sized starting points, still to be measured on an H100 (BENCHMARKS.md). Skinny, memory-bound passes
# want many programs (16-64 rows each); the base GEMM the usual tiles (128x256x64 with 8 warps at large M).
XA_CONFIGS = [_cfg(BLOCK_M=bm, BLOCK_K=bk, warps=w, stages=st) for bm, bk, w, st in
              ((16, 256, 4, 3), (32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3))]
DY_CONFIGS = [_cfg(BLOCK_M=bm, BLOCK_N=bn, warps=w, stages=st) for bm, bn, w, st in
              ((16, 256, 4, 3), (32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3))]
GEMM_CONFIGS = [_cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, warps=w, stages=st) for bm, bn, bk, w, st in
                ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                 (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4))]


def autotuned(xa_configs, dy_configs, gemm_configs, **autotune_kw):
    """The three kernels wrapped in triton.autotune (keyed on the shape, M bucketed to a power of two so that
    varying sequence lengths do not re-tune). Tests build it with interpreter-sized configs."""
    xa = triton.autotune(xa_configs, key=["K", "R", "M_BUCKET"], **autotune_kw)(_xa_kernel)
    dy_hooks = _TrialHooks(zero=[("NEED_DB", "DB")])
    dy = triton.autotune(dy_configs, key=["N", "R", "M_BUCKET", "NEED_DXA", "NEED_DB"],
                         pre_hook=dy_hooks.pre, post_hook=dy_hooks.post, **autotune_kw)(_dy_pass_kernel)
    gemm_hooks = _TrialHooks(zero=[("GRAD_Q", "DQ")], restore=[("ACC_OUT", "OUT")])
    gemm = triton.autotune(gemm_configs, key=["N", "K", "R", "M_BUCKET", "HAS_GEMM", "ACC_OUT", "GRAD_Q",
                                              "DROP_EPILOGUE"],
                           pre_hook=gemm_hooks.pre, post_hook=gemm_hooks.post, **autotune_kw)(_gemm_lowrank_kernel)
    return xa, dy, gemm


if _INTERPRET:  # one small config: CI stays fast and odd shapes cross block edges
    _xa_launch, _dy_pass_launch, _gemm_launch = _xa_kernel, _dy_pass_kernel, _gemm_lowrank_kernel
    _XA_META = dict(BLOCK_M=16, BLOCK_K=32)
    _DY_META = dict(BLOCK_M=16, BLOCK_N=32)
    _GEMM_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
else:  # pragma: no cover - needs a GPU
    _XA_META = _DY_META = _GEMM_META = {}
    _xa_launch, _dy_pass_launch, _gemm_launch = autotuned(XA_CONFIGS, DY_CONFIGS, GEMM_CONFIGS)


BASE_GEMMS = ("triton", "cublas")


def base_gemm() -> str:
    """Who runs the frozen GEMM: "triton" (one kernel with the rank-r term fused, y written once) or "cublas"
    (torch's GEMM, then one Triton pass adds the rank-r term in place: y read and written once more).
    Which wins is an H100 measurement (benchmarks/lora_linear_bench.py, variants lorakern / lk-hybrid);
    until then the fused design is the default. Environment variable LORAKERN_BASE_GEMM."""
    name = os.environ.get("LORAKERN_BASE_GEMM", "triton").lower()
    if name not in BASE_GEMMS:
        raise ValueError(f"LORAKERN_BASE_GEMM must be one of {BASE_GEMMS}, got {name!r}")
    return name


def _bucket(m: int) -> int:
    return 1 << max(int(m) - 1, 0).bit_length()


def _block_r(r: int, cap: int) -> int:
    # plain ints: triton.next_power_of_2 is a jit-callable costing ~5 us per host call (4 calls a step)
    return min(max(16, 1 << max(r - 1, 0).bit_length()), cap)


def _precisions(x_dtype: torch.dtype) -> tuple[str, str]:
    """(base GEMM, rank-r products) input precision for fp32 dots.

    An fp32 base follows torch's matmul precision ("highest" -> exact fp32, else tf32), as F.linear does.
    With a half base the rank-r products use tf32: x is exact in tf32 and the adapters round to 10 mantissa
    bits, far below the bf16/fp16 output's own rounding, at tensor-core speed.
    """
    if x_dtype == torch.float32:
        prec = "ieee" if _fp32_matmul_is_exact() else "tf32"
        return prec, prec
    return "tf32", "tf32"


def _fp32_matmul_is_exact() -> bool:
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", None)  # torch >= 2.9
    if setting is not None and setting != "none":
        return setting == "ieee"
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # mixed use of the old and new precision APIs
        return not torch.backends.cuda.matmul.allow_tf32


def _lora_fp32(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    return _INTERPRET or adapter_dtype != x_dtype or x_dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------
# Entry points (custom ops). Inputs are validated by the caller (lorakern.ops.lora_linear); x is 2-D.
# ----------------------------------------------------------------------------------------------------------
_empty = torch.empty  # one name for every buffer the kernels overwrite (tests fill them with NaN)


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (cuda:1 inputs on cuda:0 fail)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _seed_value(seed, dropout_p: float) -> int:
    if dropout_p <= 0.0:
        return 0
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor")
    return int(seed.item())


def _forward_impl(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if x.stride(1) != 1:  # coalesced loads along K; a transposed view would read one element per row
        x = x.contiguous()
    prec, lora_prec = _precisions(x.dtype)
    xa = _empty((M, R), device=x.device, dtype=torch.float32)
    y = _empty((M, N), device=x.device, dtype=x.dtype)
    seed_v = _seed_value(seed, dropout_p)
    br = _block_r(R, 64)
    # stride tuples read once: each Tensor.stride(i) call is ~0.25 us and a step made ~44 of them
    (sxm, sxk), (sam, sak), (sbn, sbr), (sym, syn), (sqm, sqr) = (x.stride(), lora_A.stride(), lora_B.stride(),
                                                                 y.stride(), xa.stride())
    with _device_guard(x.device):
        _xa_launch[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, br))](
            x, lora_A, xa, M, K, R, _bucket(M),
            sxm, sxk, sam, sak, sqm, sqr,
            float(dropout_p), seed_v,
            HAS_DROPOUT=dropout_p > 0.0, LORA_FP32=_lora_fp32(x.dtype, lora_A.dtype), PRECISION=lora_prec,
            BLOCK_R=br, **_XA_META)
        cublas = base_gemm() == "cublas"
        if cublas:
            torch.addmm(bias, x, weight.t(), out=y) if bias is not None else torch.mm(x, weight.t(), out=y)
        _gemm_launch[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](
            x, weight, bias if bias is not None else y, xa, lora_B, y, y, xa, M, N, 0 if cublas else K, R,
            _bucket(M), sxm, sxk, weight.stride(1), weight.stride(0), sqm, sqr,
            sbr, sbn, sym, syn, 0, 0, 0, 0,
            bias.stride(0) if bias is not None else 0, float(scaling), 0.0, 0,
            HAS_GEMM=True, ACC_OUT=cublas, HAS_BIAS=bias is not None and not cublas, DROP_EPILOGUE=False,
            GRAD_Q=False, UPCAST=_INTERPRET,
            PRECISION=prec, LORA_PRECISION=lora_prec, BLOCK_R=_block_r(R, 32), **_GEMM_META)
    return y, xa


def _backward_impl(grad_y, x, xa, weight, lora_A, lora_B, scaling: float, dropout_p: float, seed,
                   need_dx: bool, need_dA: bool, need_dB: bool):
    M, N = grad_y.shape  # N = out_features
    K, R = weight.shape[1], lora_A.shape[0]  # K = in_features
    if grad_y.stride(1) != 1:
        grad_y = grad_y.contiguous()
    prec, lora_prec = _precisions(grad_y.dtype)
    need_dxa = need_dx or need_dA
    dev = grad_y.device
    # Placeholders for unused pointer arguments are never read or written (the flags say so).
    dxa = _empty((M, R), device=dev, dtype=torch.float32) if need_dxa else xa
    dB = torch.zeros((N, R), device=dev, dtype=torch.float32) if need_dB else xa
    dx = _empty((M, K), device=dev, dtype=grad_y.dtype) if need_dx else None
    dA = torch.zeros((R, K), device=dev, dtype=torch.float32) if need_dA else None
    sg, sb, sq, sd, sdb = grad_y.stride(), lora_B.stride(), xa.stride(), dxa.stride(), dB.stride()
    with _device_guard(dev):
        if need_dxa or need_dB:
            br = _block_r(R, 64)
            _dy_pass_launch[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, br))](
                grad_y, lora_B, xa, dxa, dB, M, N, R, _bucket(M),
                sg[0], sg[1], sb[0], sb[1], sq[0], sq[1], sd[0], sd[1], sdb[0], sdb[1], float(scaling),
                NEED_DXA=need_dxa, NEED_DB=need_dB, LORA_FP32=_lora_fp32(grad_y.dtype, lora_A.dtype),
                PRECISION=lora_prec, BLOCK_R=br, **_DY_META)
        if need_dxa:
            out, dq = (dx if need_dx else dxa), (dA if need_dA else dxa)
            cublas = need_dx and base_gemm() == "cublas"
            if cublas:
                torch.mm(grad_y, weight, out=dx)
            sw, sa, so, sx, sdq = weight.stride(), lora_A.stride(), out.stride(), x.stride(), dq.stride()
            _gemm_launch[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)](
                grad_y, weight, dxa, dxa, lora_A, out, x, dq, M, K, 0 if cublas else N, R, _bucket(M),
                sg[0], sg[1], sw[0], sw[1], sd[0], sd[1], sa[0], sa[1], so[0], so[1], sx[0], sx[1], sdq[0], sdq[1], 0,
                float(scaling), float(dropout_p), _seed_value(seed, dropout_p),
                HAS_GEMM=need_dx, ACC_OUT=cublas, HAS_BIAS=False, DROP_EPILOGUE=dropout_p > 0.0, GRAD_Q=need_dA,
                UPCAST=_INTERPRET, PRECISION=prec, LORA_PRECISION=lora_prec, BLOCK_R=_block_r(R, 32),
                **_GEMM_META)
    dA = dA.to(lora_A.dtype) if dA is not None else None
    dB = dB.to(lora_B.dtype) if need_dB else None
    return dx, dA, dB


# torch.compile sees these custom ops as opaque nodes; eager calls go straight to the _impl functions
# (lorakern.ops.lora_linear picks), skipping the dispatcher's few microseconds per call.
forward = torch.library.custom_op(
    "lorakern::triton_lora_forward", _forward_impl, mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
           "float dropout_p, Tensor? seed) -> (Tensor, Tensor)")
backward = torch.library.custom_op(
    "lorakern::triton_lora_backward", _backward_impl, mutates_args=(),
    schema="(Tensor grad_y, Tensor x, Tensor xa, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, "
           "float dropout_p, Tensor? seed, bool need_dx, bool need_dA, bool need_dB) -> (Tensor?, Tensor?, Tensor?)")


@forward.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


@backward.register_fake
def _(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    return (grad_y.new_empty((grad_y.shape[0], weight.shape[1])) if need_dx else None,
            lora_A.new_empty(lora_A.shape) if need_dA else None,
            lora_B.new_empty(lora_B.shape) if need_dB else None)

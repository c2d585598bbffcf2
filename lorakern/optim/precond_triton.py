"""Fused multi-tensor Triton kernels of the preconditioned optimizers (imported lazily, on first fused step).

Design (the target is an H100 and all LoRA pairs of a model in a handful of launches, whatever their number):

  per bucket of pairs with the same (device, dtype, r):
  1. _gram_kernel, one launch per factor kind: one program per factor walks the factor's long dimension in
     (BLOCK_L x r) tiles and accumulates its r x r Gram in fp32 registers (tl.dot), then writes it into one
     (n, r, r) buffer. No atomics, so the Grams are deterministic.
  2. preconditioner.damped_inverse: batched Cholesky + two batched triangular solves over all pairs
     (torch/cuSOLVER; a few launches), the pseudo-inverse fallback only for pairs whose Cholesky failed.
  3. _update_kernel, one launch per factor kind: one program per (factor, tile of BLOCK_L rows); it loads the
     factor's r x r P, the gradient tile, multiplies them with tl.dot, and does the AdamW moments, bias
     correction, decoupled decay and parameter write for that tile, all in registers (one read of
     p, g, m, v and one write of p, m, v: the same traffic as a fused AdamW, plus the Gram pass's read of p).
  order="jacobi": Grams of all B's and A's, one batched solve, update A's, update B's (2+solve+2 launches).
  order="gauss-seidel": the same split in two halves, so B's Grams read the updated A's.

The tensors are reached through a table of raw addresses (int64, cast to pointers in the kernel), built on
the host each step because .grad tensors are usually new every step; this keeps the user's tensors where
they are (no flattening of parameters into a buffer the optimizer owns). The kernels require contiguous
parameters and optimizer state (gradients are made contiguous if needed); the caller falls back to the
torch engine otherwise.

Numerics: every tl.dot takes fp32 operands with input_precision="ieee" (P is fp32 and needs its digits;
a bf16 gradient tile is upcast). That costs O(r) fp32 FLOPs per element, far below the memory time for
r <= 128, and it also sidesteps the Triton 3.9 interpreter bug that makes tl.dot on bfloat16 operands
return garbage under TRITON_INTERPRET=1 (so a future bf16 tensor-core Gram must keep UPCAST=True whenever
lorakern._backend.interpreting()). The interpreter also truncates fp32 -> bf16 casts where the GPU rounds
to nearest even; ROUND_BF16 (set only when interpreting) rounds explicitly so both agree.

To tune on an H100 (not measurable on the CPU): BLOCK_L / num_warps per rank (autotune on r in
{8, 16, 32, 64, 128}), tf32x3 instead of ieee for r >= 64, a persistent grid over the tile table, merging
the A and B launches, keeping the tables in pinned memory, and replacing the failed-Cholesky host check
(the step's one synchronisation) by an in-kernel batched r x r Cholesky.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakern import _backend
from lorakern.optim.torch_engine import FactorBatch, Hyper

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RANK = 128
TILE_ELEMS = 4096  # elements per program tile (BLOCK_L x R_PAD): 16 KiB of fp32 per operand

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def padded_rank(r: int) -> int:
    """tl.dot needs every dimension >= 16 and a power of two: r is padded with zeros (masked loads)."""
    return max(16, triton.next_power_of_2(r))


def block_rows(r: int) -> int:
    return max(16, TILE_ELEMS // padded_rank(r))


def num_warps(r: int) -> int:
    """More warps for the large padded ranks, whose r x r fp32 P (64 KiB at r = 128) would spill from 4."""
    return 8 if padded_rank(r) >= 64 else 4


@triton.jit
def _gram_kernel(table_ptr, out_ptr, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
                 IS_A: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    # table row f: (address of the factor, its long dimension L). A is (R, L), B is (L, R), both contiguous.
    f = tl.program_id(0).to(tl.int64)
    base = tl.load(table_ptr + 2 * f).to(tl.pointer_type(DTYPE))
    L = tl.load(table_ptr + 2 * f + 1)
    j = tl.arange(0, R_PAD)
    rows = tl.arange(0, BLOCK_L)
    acc = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + rows
        if IS_A:  # tile (R_PAD, BLOCK_L) of A; Gram = X X^T
            mask = (j[:, None] < R) & (ls[None, :] < L)
            x = tl.load(base + j[:, None] * L + ls[None, :], mask=mask, other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            acc += tl.dot(x, tl.trans(x), input_precision="ieee")
        else:  # tile (BLOCK_L, R_PAD) of B; Gram = Y^T Y
            mask = (ls[:, None] < L) & (j[None, :] < R)
            y = tl.load(base + ls[:, None] * R + j[None, :], mask=mask, other=0.0)
            if UPCAST:
                y = y.to(tl.float32)
            acc += tl.dot(tl.trans(y), y, input_precision="ieee")
    out = out_ptr + f * (R * R) + j[:, None] * R + j[None, :]
    tl.store(out, acc, mask=(j[:, None] < R) & (j[None, :] < R))


@triton.jit
def _round_to_bf16_grid(x):
    # fp32 -> nearest bf16 value (ties to even), still as fp32, so that the truncating cast that follows is
    # exact. Needed only under TRITON_INTERPRET=1 (Triton 3.9's interpreter truncates, rtne requested or not).
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _update_kernel(tile_ptr, factor_ptr, scalar_ptr, precond_ptr, lr, beta1, beta2, eps, decay,
                   R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_L: tl.constexpr, IS_A: tl.constexpr,
                   ADAM: tl.constexpr, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    # tile row t: (factor f, first row l0). factor row f: addresses of p, grad, exp_avg, exp_avg_sq, and L.
    # scalar row f: (lr / (1 - beta1^t), sqrt(1 - beta2^t)). precond: (n, R, R) fp32, P_f for factor f.
    t = tl.program_id(0).to(tl.int64)
    f = tl.load(tile_ptr + 2 * t)
    l0 = tl.load(tile_ptr + 2 * t + 1)
    p_ptr = tl.load(factor_ptr + 5 * f).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(factor_ptr + 5 * f + 1).to(tl.pointer_type(DTYPE))
    L = tl.load(factor_ptr + 5 * f + 4)
    j = tl.arange(0, R_PAD)
    ls = l0 + tl.arange(0, BLOCK_L)
    P = tl.load(precond_ptr + f * (R * R) + j[:, None] * R + j[None, :],
                mask=(j[:, None] < R) & (j[None, :] < R), other=0.0)
    if IS_A:  # A (R, L): preconditioned tile = P @ G[:, l0:l0+BLOCK_L]
        offs = j[:, None] * L + ls[None, :]
        mask = (j[:, None] < R) & (ls[None, :] < L)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.dot(P, g, input_precision="ieee")
    else:  # B (L, R): preconditioned tile = G[l0:l0+BLOCK_L, :] @ P
        offs = ls[:, None] * R + j[None, :]
        mask = (ls[:, None] < L) & (j[None, :] < R)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.dot(g, P, input_precision="ieee")
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay
    if ADAM:
        m_ptr = tl.load(factor_ptr + 5 * f + 2).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(factor_ptr + 5 * f + 3).to(tl.pointer_type(tl.float32))
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        m = m + (1.0 - beta1) * (g - m)  # the lerp form of torch._foreach_lerp_ in the reference
        v = beta2 * v + (1.0 - beta2) * g * g
        step_size = tl.load(scalar_ptr + 2 * f)
        bc2_sqrt = tl.load(scalar_ptr + 2 * f + 1)
        p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    else:
        p = p - lr * g
    if ROUND_BF16:  # the interpreter truncates fp32 -> bf16; the GPU rounds to nearest even
        p = _round_to_bf16_grid(p)
    tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)


def long_dim(kind: str, t: torch.Tensor) -> int:
    return t.shape[1] if kind == "A" else t.shape[0]


class TritonEngine:
    """The engine interface of torch_engine.TorchEngine on the fused kernels (see the module docstring)."""
    name = "triton"

    def __init__(self):
        self._tile_tables: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def supports(dtype: torch.dtype, r: int) -> bool:
        return dtype in SUPPORTED_DTYPES and r <= MAX_RANK

    def grams(self, b_factors: list[torch.Tensor], a_factors: list[torch.Tensor], r: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
        first = (b_factors or a_factors)[0]
        n = len(b_factors) + len(a_factors)
        if out is None:
            out = torch.empty((n, r, r), dtype=torch.float32, device=first.device)
        for kind, factors, dst in (("B", b_factors, out[:len(b_factors)]), ("A", a_factors, out[len(b_factors):])):
            if not factors:
                continue
            table = torch.tensor([[t.data_ptr(), long_dim(kind, t)] for t in factors], dtype=torch.int64)
            _gram_kernel[(len(factors),)](
                table.to(first.device), dst, R=r, R_PAD=padded_rank(r), BLOCK_L=block_rows(r), IS_A=kind == "A",
                DTYPE=_TL_DTYPES[first.dtype], UPCAST=first.dtype != torch.float32, num_warps=num_warps(r))
        return out

    def _tiles(self, kind: str, lengths: tuple[int, ...], block: int, device: torch.device) -> torch.Tensor:
        """(n_tiles, 2) int64 table of (factor index, first row); cached, it depends on the shapes only."""
        key = (kind, lengths, block, device)
        table = self._tile_tables.get(key)
        if table is None:
            Ls = torch.tensor(lengths, dtype=torch.int64)
            counts = (Ls + block - 1) // block
            factor = torch.repeat_interleave(torch.arange(len(lengths)), counts)
            first = torch.cumsum(counts, 0) - counts
            start = (torch.arange(int(counts.sum())) - first[factor]) * block
            table = torch.stack([factor, start], dim=1).contiguous().to(device)
            if len(self._tile_tables) > 64:
                self._tile_tables.clear()
            self._tile_tables[key] = table
        return table

    def update(self, batch: FactorBatch, P: torch.Tensor, hyper: Hyper) -> None:
        if not len(batch):
            return
        if batch.kind not in ("A", "B"):
            raise ValueError(f"the fused engine updates LoRA factors only, got kind {batch.kind!r}")
        first = batch.params[0]
        r = first.shape[0] if batch.kind == "A" else first.shape[1]
        grads = [g if g.dtype == first.dtype and g.is_contiguous() else g.to(first.dtype).contiguous()
                 for g in batch.grads]  # kept alive until the launch below has been queued
        lengths = tuple(long_dim(batch.kind, p) for p in batch.params)
        if hyper.adam:
            rows = [[p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), n]
                    for p, g, m, v, n in zip(batch.params, grads, batch.exp_avgs, batch.exp_avg_sqs, lengths)]
            scalars = torch.tensor(list(zip(batch.step_sizes, batch.bc2_sqrts)), dtype=torch.float32)
        else:
            rows = [[p.data_ptr(), g.data_ptr(), 0, 0, n] for p, g, n in zip(batch.params, grads, lengths)]
            scalars = torch.zeros((len(rows), 2), dtype=torch.float32)
        block = block_rows(r)
        tiles = self._tiles(batch.kind, lengths, block, first.device)
        P = P.to(torch.float32).contiguous()
        _update_kernel[(tiles.shape[0],)](
            tiles, torch.tensor(rows, dtype=torch.int64).to(first.device), scalars.to(first.device), P,
            float(hyper.lr), float(hyper.beta1), float(hyper.beta2), float(hyper.eps), float(hyper.decay),
            R=r, R_PAD=padded_rank(r), BLOCK_L=block, IS_A=batch.kind == "A", ADAM=hyper.adam,
            DTYPE=_TL_DTYPES[first.dtype], ROUND_BF16=first.dtype == torch.bfloat16 and _backend.interpreting(),
            num_warps=num_warps(r))

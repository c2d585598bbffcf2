"""Fused multi-tensor Triton kernels of the preconditioned optimizers (imported lazily, on first fused step).

Design (the target is an H100 and all LoRA pairs of a model in a handful of launches, whatever their number):

  per bucket of pairs with the same (device, dtype, r):
  1. _gram_kernel, one launch per factor kind: one program per factor walks the factor's long dimension in
     (BLOCK_L x r) tiles and accumulates its r x r Gram in float64 registers (tl.dot on fp64 operands: DMMA
     on sm_80+), then writes it into one (n, r, r) float64 buffer. No atomics, so the Grams are deterministic.
  2. preconditioner.damped_inverses: batched Cholesky + two batched triangular solves over all pairs of all
     buckets of the device in float64 (torch/cuSOLVER; a few launches, no host synchronisation for damping > 0;
     damping == 0 uses torch.linalg.eigh, which synchronises once).
  3. _update_kernel, one launch per factor kind: one program per (factor, tile of BLOCK_L rows); it loads the
     factor's float64 r x r P and the gradient tile, multiplies them with an fp64 tl.dot, rounds the result
     to fp32 and does the AdamW moments, bias correction, decoupled decay and parameter write for that tile,
     all in registers (one read of p, g, m, v and one write of p, m, v: the same traffic as a fused AdamW,
     plus the Gram pass's read of p).
  order="jacobi": Grams of all B's and A's, one batched solve, update A's, update B's (2+solve+2 launches).
  order="gauss-seidel": the same split in two halves, so B's Grams read the updated A's.

The tensors are reached through tables of raw addresses (int64, cast to pointers in the kernel); this keeps
the user's tensors where they are (no flattening of parameters into a buffer the optimizer owns). The tables
are cached on the device, keyed on the tuple of data_ptrs (and lengths): the parameters and the optimizer
state never move, and the caching allocator usually hands .grad the same addresses each step, so a steady
training loop uploads nothing. A table that must be rebuilt is built as one int64 tensor and uploaded once,
from pinned memory with non_blocking=True (a pageable upload would synchronise the stream). The per-factor
bias corrections are kernel arguments when all factors of the launch are at the same step (the usual case)
and two float64 columns of that same table otherwise. Every launch runs under `torch.cuda.device(device)`, so
tensors on cuda:1 work whatever the current device. The kernels require contiguous parameters and
optimizer state (gradients are made contiguous if needed); the caller falls back to the torch engine
otherwise.

Numerics: the Grams, P and the product P grad are float64 (see preconditioner.py for why; O(r) fp64 FLOPs
per element on the tensor cores, below the memory time for r <= 128 on an H100). The hyperparameters arrive
as final coefficients computed on the host in float64 (1 - beta1, 1 - beta2, lr * weight_decay, the bias
corrections): the GPU launcher passes Python floats as fp32, and 1 - beta2 formed in the kernel from an
fp32 beta2 would be off by 0.6% at beta2 = 0.99999. Gradient tiles are upcast before the dot, which also
sidesteps the Triton 3.9 interpreter bug that makes tl.dot on bfloat16 operands return garbage under
TRITON_INTERPRET=1. The interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest even;
ROUND_BF16 (set only when interpreting) rounds explicitly so both agree.

To tune on an H100 (not measurable on the CPU): BLOCK_L / num_warps per rank (autotune on r in
{8, 16, 32, 64, 128}), a persistent grid over the tile table, merging the A and B launches.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from lorakern import _backend
from lorakern._util import device_guard, next_pow2
from lorakern.optim.preconditioner import GRAM_DTYPE
from lorakern.optim.torch_engine import FactorBatch, Hyper

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RANK = 128
TILE_ELEMS = 2048  # elements per program tile (BLOCK_L x R_PAD): fp64 products, so half the fp32 budget
ROW = 7  # factor table row: addresses of p, grad, exp_avg, exp_avg_sq; L; step size and bc2 (float64 bits);
#           the kernel's `7 * f` must match
_CACHE_LIMIT = 64

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def padded_rank(r: int) -> int:
    """tl.dot needs every dimension >= 16 and a power of two: r is padded with zeros (masked loads)."""
    return next_pow2(r, 16)


def block_rows(r: int) -> int:
    return max(16, TILE_ELEMS // padded_rank(r))


def gram_block_rows(r: int) -> int:
    """Rows per Gram tile (sm_90, ptxas -v: no spills at any r <= 128 with gram_num_warps; 64 rows at
    R_PAD = 32 spill 8 bytes)."""
    return {16: 128, 32: 32, 64: 32, 128: 16}[padded_rank(r)]


def num_warps(r: int) -> int:
    """Warps of the update kernel: 8 at every rank. Compiled for sm_90 (ptxas -v, Triton 3.9), the fp64 dot
    leaves 4 warps at 190-220 registers for r <= 32 (spilling at r = 32 with 128-row tiles); 8 give
    64-128 registers and no spills for every r <= 128, dtype and kind."""
    return 8


def gram_num_warps(r: int) -> int:
    """Warps of the Gram kernel: its (R_PAD x R_PAD) float64 accumulator needs 8 from R_PAD = 32 on (4 spill
    at 32, and fall to 32 registers with ~10 KB of spills at 128); 56 registers or fewer at R_PAD = 16."""
    return 4 if padded_rank(r) <= 16 else 8


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table on `device`: from pinned memory and non_blocking on CUDA (no stream synchronisation;
    the caching host allocator keeps the pinned block until the copy is done)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@triton.jit
def _gram_kernel(table_ptr, out_ptr, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
                 IS_A: tl.constexpr, DTYPE: tl.constexpr):
    # table row f: (address of the factor, its long dimension L). A is (R, L), B is (L, R), both contiguous.
    f = tl.program_id(0).to(tl.int64)
    base = tl.load(table_ptr + 2 * f).to(tl.pointer_type(DTYPE))
    L = tl.load(table_ptr + 2 * f + 1)
    j = tl.arange(0, R_PAD)
    rows = tl.arange(0, BLOCK_L)
    acc = tl.zeros((R_PAD, R_PAD), dtype=tl.float64)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + rows
        if IS_A:  # tile (R_PAD, BLOCK_L) of A; Gram = X X^T
            mask = (j[:, None] < R) & (ls[None, :] < L)
            x = tl.load(base + j[:, None] * L + ls[None, :], mask=mask, other=0.0).to(tl.float64)
            acc += tl.dot(x, tl.trans(x))
        else:  # tile (BLOCK_L, R_PAD) of B; Gram = Y^T Y
            mask = (ls[:, None] < L) & (j[None, :] < R)
            y = tl.load(base + ls[:, None] * R + j[None, :], mask=mask, other=0.0).to(tl.float64)
            acc += tl.dot(tl.trans(y), y)
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
def _update_kernel(tile_ptr, table_ptr, precond_ptr, lr, one_minus_beta1, beta2, one_minus_beta2, eps, lr_wd,
                   step_size, bc2_sqrt, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
                   IS_A: tl.constexpr, ADAM: tl.constexpr, PER_FACTOR: tl.constexpr, DTYPE: tl.constexpr,
                   ROUND_BF16: tl.constexpr):
    # tile row t: (factor f, first row l0). table row f (ROW = 7 int64): addresses of p, grad, exp_avg,
    # exp_avg_sq, L, and with PER_FACTOR the factor's lr / (1 - beta1^t) and sqrt(1 - beta2^t) as float64
    # bits (else the step_size / bc2_sqrt arguments). precond: (n, R, R) float64, P_f for factor f.
    t = tl.program_id(0).to(tl.int64)
    f = tl.load(tile_ptr + 2 * t)
    l0 = tl.load(tile_ptr + 2 * t + 1)
    row = table_ptr + 7 * f
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    L = tl.load(row + 4)
    j = tl.arange(0, R_PAD)
    ls = l0 + tl.arange(0, BLOCK_L)
    P = tl.load(precond_ptr + f * (R * R) + j[:, None] * R + j[None, :],
                mask=(j[:, None] < R) & (j[None, :] < R), other=0.0)
    if IS_A:  # A (R, L): preconditioned tile = P @ G[:, l0:l0+BLOCK_L]
        offs = j[:, None] * L + ls[None, :]
        mask = (j[:, None] < R) & (ls[None, :] < L)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        g = tl.dot(P, g).to(tl.float32)
    else:  # B (L, R): preconditioned tile = G[l0:l0+BLOCK_L, :] @ P
        offs = ls[:, None] * R + j[None, :]
        mask = (ls[:, None] < L) & (j[None, :] < R)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        g = tl.dot(g, P).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p - lr_wd * p
    if ADAM:
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        m = m + one_minus_beta1 * (g - m)  # the lerp form of torch._foreach_lerp_ in the reference
        v = beta2 * v + one_minus_beta2 * g * g
        if PER_FACTOR:
            step = tl.load(row + 5).to(tl.float64, bitcast=True).to(tl.float32)
            bc2 = tl.load(row + 6).to(tl.float64, bitcast=True).to(tl.float32)
        else:
            step = step_size
            bc2 = bc2_sqrt
        p = p - step * (m / (tl.sqrt(v) / bc2 + eps))
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    else:
        p = p - lr * g
    if ROUND_BF16:  # the interpreter truncates fp32 -> bf16; the GPU rounds to nearest even
        p = _round_to_bf16_grid(p)
    tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)


def long_dim(kind: str, t: torch.Tensor) -> int:
    return t.shape[1] if kind == "A" else t.shape[0]


class _TableCache:
    """Device tables keyed on what they hold (addresses, lengths, ...): built and uploaded on a miss only."""

    def __init__(self):
        self._tables: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, build, device: torch.device) -> torch.Tensor:
        table = self._tables.get(key)
        if table is None:
            table = upload(build(), device)
            if len(self._tables) >= _CACHE_LIMIT:
                self._tables.clear()
            self._tables[key] = table
        return table

    def clear(self) -> None:
        self._tables.clear()


def _tile_table(lengths: tuple[int, ...], block: int) -> torch.Tensor:
    """(n_tiles, 2) int64 host table of (factor index, first row)."""
    Ls = torch.tensor(lengths, dtype=torch.int64)
    counts = (Ls + block - 1) // block
    factor = torch.repeat_interleave(torch.arange(len(lengths)), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(int(counts.sum())) - first[factor]) * block
    return torch.stack([factor, start], dim=1).contiguous()


class TritonEngine:
    """The engine interface of torch_engine.TorchEngine on the fused kernels (see the module docstring)."""
    name = "triton"

    def __init__(self):
        self.tables = _TableCache()

    @staticmethod
    def supports(dtype: torch.dtype, r: int) -> bool:
        return dtype in SUPPORTED_DTYPES and r <= MAX_RANK

    def grams(self, b_factors: list[torch.Tensor], a_factors: list[torch.Tensor], r: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
        first = (b_factors or a_factors)[0]
        device = first.device
        n = len(b_factors) + len(a_factors)
        if out is None:
            out = torch.empty((n, r, r), dtype=GRAM_DTYPE, device=device)
        for kind, factors, dst in (("B", b_factors, out[:len(b_factors)]), ("A", a_factors, out[len(b_factors):])):
            if not factors:
                continue
            rows = tuple((t.data_ptr(), long_dim(kind, t)) for t in factors)
            table = self.tables.get(("gram", device, rows), lambda: torch.tensor(rows, dtype=torch.int64), device)
            with device_guard(device):
                _gram_kernel[(len(factors),)](
                    table, dst, R=r, R_PAD=padded_rank(r), BLOCK_L=gram_block_rows(r), IS_A=kind == "A",
                    DTYPE=_TL_DTYPES[first.dtype], num_warps=gram_num_warps(r))
        return out

    def update(self, batch: FactorBatch, P: torch.Tensor, hyper: Hyper) -> None:
        if not len(batch):
            return
        if batch.kind not in ("A", "B"):
            raise ValueError(f"the fused engine updates LoRA factors only, got kind {batch.kind!r}")
        first = batch.params[0]
        device = first.device
        r = first.shape[0] if batch.kind == "A" else first.shape[1]
        grads = [g if g.dtype == first.dtype and g.is_contiguous() else g.to(first.dtype).contiguous()
                 for g in batch.grads]  # kept alive until the launch below has been queued
        lengths = tuple(long_dim(batch.kind, p) for p in batch.params)
        block = block_rows(r)
        tiles = self.tables.get(("tiles", device, batch.kind, lengths, block),
                                lambda: _tile_table(lengths, block), device)
        if hyper.adam:
            addrs = tuple((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr())
                          for p, g, m, v in zip(batch.params, grads, batch.exp_avgs, batch.exp_avg_sqs))
            scalars = tuple(zip(batch.step_sizes, batch.bc2_sqrts))
            per_factor = len(set(scalars)) > 1
            step_size, bc2_sqrt = scalars[0]
        else:
            addrs = tuple((p.data_ptr(), g.data_ptr(), 0, 0) for p, g in zip(batch.params, grads))
            scalars, per_factor, step_size, bc2_sqrt = (), False, 0.0, 1.0
        key_scalars = scalars if per_factor else None

        def build() -> torch.Tensor:
            ints = torch.tensor([a + (n,) for a, n in zip(addrs, lengths)], dtype=torch.int64)
            floats = (torch.tensor(scalars, dtype=torch.float64) if per_factor
                      else torch.zeros((len(addrs), 2), dtype=torch.float64))
            table = torch.cat([ints, floats.view(torch.int64)], dim=1).contiguous()
            assert table.shape[1] == ROW
            return table

        table = self.tables.get(("update", device, batch.kind, addrs, lengths, key_scalars), build, device)
        P = P.to(GRAM_DTYPE).contiguous()
        with device_guard(device):
            _update_kernel[(tiles.shape[0],)](
                tiles, table, P, hyper.lr, hyper.one_minus_beta1, hyper.beta2, hyper.one_minus_beta2, hyper.eps,
                hyper.lr_wd, step_size, bc2_sqrt,
                R=r, R_PAD=padded_rank(r), BLOCK_L=block, IS_A=batch.kind == "A", ADAM=hyper.adam,
                PER_FACTOR=per_factor, DTYPE=_TL_DTYPES[first.dtype],
                ROUND_BF16=first.dtype == torch.bfloat16 and _backend.interpreting(), num_warps=num_warps(r))

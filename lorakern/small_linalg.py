"""Batched small dense linear algebra (k <= 256) on heterogeneous batches: Cholesky, triangular solves, the
symmetric eigendecomposition, and the damped inverse / pseudo-inverse of PSD matrices built from them.

Layout (the "padded heterogeneous batch"): mats (n, kmax, kmax), float32 or float64; matrix i is its leading
k_i x k_i block, k_i = sizes[i] (a sequence of ints or an integer tensor; None: every k_i = kmax). Entries
outside a matrix's block are ignored; the results are zero there (the solves leave rows >= k_i of the
right-hand sides unchanged). Only the lower triangle of symmetric inputs is read.

    L, info = cholesky_ex(mats, sizes)                   lower factor; info[i] = 0, or j+1 at a non-positive pivot
    P, info = cholesky_inverse(mats, sizes)              A^-1 from the Cholesky factor (LAPACK potrf + potri)
    X = solve_triangular(tri, rhs, sizes, upper=False, transpose=False)   op(T)^-1 rhs, rhs (n, kmax, m)
    w, V, info = eigh(mats, sizes)                       ascending w, eigenvectors as columns (Jacobi, float64)
    P, info = psd_inverse(mats, damping, sizes)          (A + damping I)^-1; the pseudo-inverse where singular

Implementations (`impl`): "ext" = the compiled ops torch.ops.lorakern.batched_cholesky_ /
batched_cholesky_inverse_ / batched_triangular_solve_ / batched_eigh_ (CPU: csrc/small_linalg.cpp, AVX-512 /
AVX2 / baseline clones picked at load time; CUDA: csrc/cuda/small_linalg.cu, one thread block per matrix, the
whole heterogeneous batch in one launch); "torch" = torch.linalg (cholesky_ex, cholesky_inverse,
solve_triangular on identity-padded matrices; eigh one call per distinct size); "auto" = the extension only
where a measurement on that device type found it faster than torch: EXT_FASTER below, the decision printed by
benchmarks/small_linalg_bench.py (BENCHMARKS.md, "2026-12-06 — csrc/cuda small linear algebra (issue 14 item
3)"). On the CPU (one thread) that is the Cholesky (fp32 k 16..64, fp64 k 32..64: 1.14-1.69x), the Cholesky
inverse (fp32 k 8..64, fp64 k 8..32: 1.35-2.78x; 3.3-3.5x on a heterogeneous batch) and the float32 solves
(k 8..64: 1.23-2.52x); not eigh (cyclic Jacobi does several times LAPACK's flops: 0.15-0.62x from k = 16,
1.02-1.36x at k = 8) nor the float64 solves (0.76-2.04x, mixed).
The CUDA kernels have not been measured yet (no GPU was lent): CI compiles them for sm_90a
(tests/test_cuda_ext.py), the GPU tests (tests/test_small_linalg.py, marker gpu) check them against float64,
`python benchmarks/small_linalg_bench.py --device cuda` times them against torch, and "auto" does not use
them until such a measurement is recorded here.

Numerics: the Cholesky and the solves are LAPACK's algorithms in the input dtype (backward stable); eigh runs
Jacobi in float64 whatever the input dtype (Jacobi's ~2k rounded updates per entry and sweep cost float32
eigenvectors ~1e-4 orthogonality at k = 64). Errors are never raised for a failed matrix: Cholesky flags it in
info (as torch.linalg.cholesky_ex), eigh flags non-convergence (1) or a non-finite input (2, NaN results).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lorakern import _backend

IMPLS = ("auto", "ext", "torch")
KMAX_LIMIT = 256  # the compiled ops' limit (one thread block / one cache-resident matrix each)
FLOAT_DTYPES = (torch.float32, torch.float64)

# (device type, op, dtype) -> the range (lo, hi) of kmax in which the extension measured >= 1.1x faster than torch
# in every case on that device type; absent: never (torch). The CPU entries are the decision printed by
# `benchmarks/small_linalg_bench.py --device cpu` (BENCHMARKS.md, 2026-12-06: k in {8, 16, 32, 64}, so nothing
# outside 8..64 uses the extension); a CUDA entry is added only from a GPU run of the same script.
EXT_FASTER: dict[tuple[str, str, torch.dtype], tuple[int, int]] = {
    ("cpu", "cholesky", torch.float32): (16, 64),
    ("cpu", "cholesky", torch.float64): (32, 64),
    ("cpu", "cholesky_inverse", torch.float32): (8, 64),
    ("cpu", "cholesky_inverse", torch.float64): (8, 32),
    ("cpu", "solve_triangular", torch.float32): (8, 64),
}
_OP_NAMES = {"cholesky": "batched_cholesky_", "cholesky_inverse": "batched_cholesky_inverse_",
             "solve_triangular": "batched_triangular_solve_", "eigh": "batched_eigh_"}


# ---------------------------------------------------------------------------------------------------------------
# Which implementation
# ---------------------------------------------------------------------------------------------------------------
def ext_available(op: str, device: torch.device | str) -> bool:
    """Whether the compiled op `op` ("cholesky", "cholesky_inverse", "solve_triangular", "eigh") runs on `device`
    here."""
    device = torch.device(device)
    built = _backend.backends()["cuda_ext" if device.type == "cuda" else "cpp"]
    return device.type in ("cpu", "cuda") and built and hasattr(torch.ops.lorakern, _OP_NAMES[op])


def use_ext(op: str, device: torch.device, dtype: torch.dtype, kmax: int, impl: str = "auto") -> bool:
    """True when `op` runs on the extension: impl "ext" (an error if it cannot), or "auto" where EXT_FASTER says
    the extension measured faster on this device type at this kmax (the padded order of the batch)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    available = ext_available(op, device) and kmax <= KMAX_LIMIT
    if impl == "ext":
        if not available:
            raise RuntimeError(f"impl='ext': lorakern's compiled {op} cannot run on {device} with kmax={kmax} "
                               f"(built: {_backend.backends()}; kmax limit {KMAX_LIMIT})")
        return True
    lo, hi = EXT_FASTER.get((device.type, op, dtype), (1, 0))
    return available and lo <= kmax <= hi


# ---------------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------------
def _check_batch(mats: object, name: str) -> torch.Tensor:
    if not isinstance(mats, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mats).__name__}")
    if mats.dim() != 3 or mats.shape[1] != mats.shape[2]:
        raise ValueError(f"{name} must have shape (n, kmax, kmax) (one matrix: unsqueeze(0)), got {tuple(mats.shape)}")
    if mats.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {mats.dtype}")
    return mats


def _check_sizes(sizes: object, n: int, kmax: int) -> list[int] | None:
    """sizes as a list of ints in [0, kmax], or None when every matrix has order kmax (also when all sizes are)."""
    if sizes is None:
        return None
    if isinstance(sizes, torch.Tensor):
        if sizes.dim() != 1 or sizes.dtype.is_floating_point or sizes.dtype.is_complex or sizes.dtype == torch.bool:
            raise TypeError(f"sizes must be a 1-D integer tensor or a sequence of ints, got {sizes.dtype} "
                            f"of shape {tuple(sizes.shape)}")
        sizes = sizes.tolist()  # one host synchronisation for a GPU tensor
    if not isinstance(sizes, Sequence) or not all(isinstance(k, int) and not isinstance(k, bool) for k in sizes):
        raise TypeError(f"sizes must be a sequence of ints or a 1-D integer tensor, got {sizes!r}")
    if len(sizes) != n:
        raise ValueError(f"sizes has {len(sizes)} entries for a batch of {n} matrices")
    bad = [(i, k) for i, k in enumerate(sizes) if not 0 <= k <= kmax]
    if bad:
        raise ValueError(f"sizes must lie in [0, kmax={kmax}]; (index, size) outside: {bad[:5]}")
    return None if all(k == kmax for k in sizes) else list(sizes)


def _check_impl(impl: object) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


# ---------------------------------------------------------------------------------------------------------------
# Padding helpers
# ---------------------------------------------------------------------------------------------------------------
def _row_mask(sizes: list[int], kmax: int, device: torch.device) -> torch.Tensor:
    """(n, kmax) bool: True at the rows (and columns) inside each matrix's block."""
    k = torch.tensor(sizes, dtype=torch.int64, device=device)
    return torch.arange(kmax, device=device)[None, :] < k[:, None]


def _block_mask(rows: torch.Tensor) -> torch.Tensor:
    return rows[:, :, None] & rows[:, None, :]


def _identity_padded(mats: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
    """A contiguous copy with each matrix's padding replaced by the identity (what torch.linalg gets)."""
    if sizes is None:
        return mats.contiguous() if mats.is_contiguous() else mats.clone(memory_format=torch.contiguous_format)
    rows = _row_mask(sizes, mats.shape[-1], mats.device)
    out = torch.where(_block_mask(rows), mats, torch.zeros((), dtype=mats.dtype, device=mats.device))
    out.diagonal(dim1=-2, dim2=-1).add_((~rows).to(mats.dtype))
    return out


def _zero_padded(mats: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
    """A new contiguous tensor: mats inside each block, zero outside."""
    if sizes is None:
        return mats.clone(memory_format=torch.contiguous_format)
    mask = _block_mask(_row_mask(sizes, mats.shape[-1], mats.device))
    return torch.where(mask, mats, torch.zeros((), dtype=mats.dtype, device=mats.device)).contiguous()


def _sizes_tensor(sizes: list[int] | None, device: torch.device) -> torch.Tensor | None:
    return None if sizes is None else torch.tensor(sizes, dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------------------------
# The routines
# ---------------------------------------------------------------------------------------------------------------
def cholesky_ex(mats: torch.Tensor, sizes=None, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factors L (n, kmax, kmax) of the lower triangles of mats, and info (n,) int32: 0, or j+1
    when pivot j is not positive (that L is then partial, as torch.linalg.cholesky_ex's). Never raises for a
    failed matrix. Zero outside each k_i x k_i block."""
    mats = _check_batch(mats, "mats")
    n, kmax = mats.shape[0], mats.shape[-1]
    sizes = _check_sizes(sizes, n, kmax)
    if use_ext("cholesky", mats.device, mats.dtype, kmax, _check_impl(impl)):
        L = _zero_padded(mats, sizes)
        info = torch.empty(n, dtype=torch.int32, device=mats.device)
        torch.ops.lorakern.batched_cholesky_(L, _sizes_tensor(sizes, mats.device), info)
        return L, info
    L, info = torch.linalg.cholesky_ex(_identity_padded(mats, sizes))
    return (L if sizes is None else _zero_padded(L, sizes)), info


def cholesky_inverse(mats: torch.Tensor, sizes=None, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """P = A^-1 of symmetric positive definite matrices (lower triangles read) from their Cholesky factors, both
    triangles of P written, and the Cholesky info (n,) int32 as cholesky_ex's: P[i] is unspecified where info[i]
    != 0 (psd_inverse replaces those). Zero outside each k_i x k_i block."""
    mats = _check_batch(mats, "mats")
    n, kmax = mats.shape[0], mats.shape[-1]
    sizes = _check_sizes(sizes, n, kmax)
    if use_ext("cholesky_inverse", mats.device, mats.dtype, kmax, _check_impl(impl)):
        P = _zero_padded(mats, sizes)
        info = torch.empty(n, dtype=torch.int32, device=mats.device)
        torch.ops.lorakern.batched_cholesky_inverse_(P, _sizes_tensor(sizes, mats.device), info)
        return P, info
    L, info = torch.linalg.cholesky_ex(_identity_padded(mats, sizes))
    eye = torch.eye(kmax, dtype=mats.dtype, device=mats.device)
    P = torch.cholesky_inverse(torch.where((info == 0)[:, None, None], L, eye))  # potri raises on a zero pivot
    return (P if sizes is None else _zero_padded(P, sizes)), info


def solve_triangular(tri: torch.Tensor, rhs: torch.Tensor, sizes=None, *, upper: bool = False,
                     transpose: bool = False, impl: str = "auto") -> torch.Tensor:
    """X = op(T)^-1 rhs for each matrix: T the lower (upper=False) or upper triangle of tri (n, kmax, kmax), op(T)
    = T^T when transpose (so L^-T B from a lower factor L: upper=False, transpose=True); rhs (n, kmax, m).
    Rows >= k_i of X are those of rhs. A zero pivot gives Inf/NaN, as LAPACK's trsm."""
    tri = _check_batch(tri, "tri")
    n, kmax = tri.shape[0], tri.shape[-1]
    if not isinstance(rhs, torch.Tensor) or rhs.dim() != 3 or rhs.shape[:2] != tri.shape[:2]:
        raise ValueError(f"rhs must have shape (n, kmax, m) = ({n}, {kmax}, m), got "
                         f"{tuple(getattr(rhs, 'shape', ())) or type(rhs).__name__}")
    if rhs.dtype != tri.dtype or rhs.device != tri.device:
        raise TypeError(f"rhs ({rhs.dtype}, {rhs.device}) must have tri's dtype and device ({tri.dtype}, {tri.device})")
    sizes = _check_sizes(sizes, n, kmax)
    if use_ext("solve_triangular", tri.device, tri.dtype, kmax, _check_impl(impl)):
        X = rhs.clone(memory_format=torch.contiguous_format)
        T = tri if tri.is_contiguous() else tri.contiguous()
        torch.ops.lorakern.batched_triangular_solve_(T, X, _sizes_tensor(sizes, tri.device), bool(upper),
                                                     bool(transpose))
        return X
    T = _identity_padded(tri, sizes)
    return torch.linalg.solve_triangular(T.mT if transpose else T, rhs, upper=bool(upper) != bool(transpose))


def _eigh_torch(mats: torch.Tensor, sizes: list[int] | None):
    """torch.linalg.eigh, one call per distinct size; non-finite matrices give NaN and info 2."""
    n, kmax = mats.shape[0], mats.shape[-1]
    finite = torch.isfinite(mats.tril()).flatten(1).all(1) if sizes is None else \
        torch.isfinite(_zero_padded(mats, sizes).tril()).flatten(1).all(1)
    safe = torch.where(finite[:, None, None], mats, torch.zeros((), dtype=mats.dtype, device=mats.device))
    if sizes is None:
        w, V = torch.linalg.eigh(safe)
    else:
        w = mats.new_zeros(n, kmax)
        V = mats.new_zeros(n, kmax, kmax)
        for k in sorted(set(sizes)):
            if k == 0:
                continue
            idx = torch.tensor([i for i, s in enumerate(sizes) if s == k], device=mats.device)
            wk, Vk = torch.linalg.eigh(safe[idx, :k, :k])
            w[idx, :k] = wk
            V[idx, :k, :k] = Vk
    info = torch.where(finite, 0, 2).to(torch.int32)
    bad = ~finite
    w = torch.where(bad[:, None], torch.full_like(w, math.nan), w)
    V = torch.where(bad[:, None, None], torch.full_like(V, math.nan), V)
    if sizes is not None:  # NaN only inside the block
        rows = _row_mask(sizes, kmax, mats.device)
        w = torch.where(rows, w, 0)
        V = torch.where(_block_mask(rows), V, 0)
    return w, V, info


def eigh(mats: torch.Tensor, sizes=None, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues w (n, kmax), ascending, and eigenvectors V (n, kmax, kmax) as columns of the symmetric matrices
    given by the lower triangles of mats; info (n,) int32: 0, 1 (Jacobi did not converge within its sweep limit)
    or 2 (a non-finite input: w and V are NaN). Zero outside each block."""
    mats = _check_batch(mats, "mats")
    n, kmax = mats.shape[0], mats.shape[-1]
    sizes = _check_sizes(sizes, n, kmax)
    if not use_ext("eigh", mats.device, mats.dtype, kmax, _check_impl(impl)):
        return _eigh_torch(mats, sizes)
    w = mats.new_empty(n, kmax)
    V = mats.new_empty(n, kmax, kmax)
    info = torch.empty(n, dtype=torch.int32, device=mats.device)
    A = mats if mats.is_contiguous() else mats.contiguous()
    torch.ops.lorakern.batched_eigh_(A, _sizes_tensor(sizes, mats.device), w, V, info)
    return w, V, info


def default_rtol(k: int, dtype: torch.dtype) -> float:
    """The pseudo-inverse's relative cut-off: 32 k eps(dtype), the rounding level of a k x k Gram."""
    return 32.0 * max(k, 1) * torch.finfo(dtype).eps


def psd_inverse(mats: torch.Tensor, damping: float = 0.0, sizes=None, *, rtol: float | None = None,
                impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """P = (A + damping I)^-1 of symmetric PSD matrices (e.g. Grams; lower triangles read) by Cholesky, and the
    Cholesky info (n,) int32. Where the factorization fails (info != 0: singular or indefinite to working
    precision) or its inverse is not finite, P is the pseudo-inverse of A + damping I from eigh, eigenvalues at
    or below rtol * max|w| (default: default_rtol(k_i, dtype)) treated as zero, negative ones (the rounding of
    a PSD input) too: finite inputs never give NaN or Inf. Non-finite inputs give NaN. Zero outside each block.
    One host synchronisation (whether any matrix needs the fallback)."""
    mats = _check_batch(mats, "mats")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    n, kmax = mats.shape[0], mats.shape[-1]
    sizes = _check_sizes(sizes, n, kmax)
    impl = _check_impl(impl)
    rows = _row_mask(sizes if sizes is not None else [kmax] * n, kmax, mats.device)
    A = _zero_padded(mats, sizes)
    if damping:
        A.diagonal(dim1=-2, dim2=-1).add_(rows.to(A.dtype) * damping)
    P, info = cholesky_inverse(A, sizes, impl=impl)
    bad = (info != 0) | ~torch.isfinite(P).flatten(1).all(1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        sub_sizes = None if sizes is None else [sizes[i] for i in idx.tolist()]
        P[idx] = _pseudo_inverse(A[idx], sub_sizes, rtol, impl)
    return P, info


def _pseudo_inverse(A: torch.Tensor, sizes: list[int] | None, rtol: float | None, impl: str) -> torch.Tensor:
    w, V, info = eigh(A, sizes, impl=impl)
    kmax = A.shape[-1]
    ks = sizes if sizes is not None else [kmax] * A.shape[0]
    rel = torch.tensor([default_rtol(k, A.dtype) if rtol is None else rtol for k in ks], dtype=A.dtype, device=A.device)
    cut = (rel * w.abs().amax(dim=-1)).clamp_min(torch.finfo(A.dtype).tiny)[:, None]
    inv_w = torch.where(w > cut, 1.0 / torch.where(w > cut, w, torch.ones_like(w)), torch.zeros_like(w))
    P = (V * inv_w[:, None, :]) @ V.mT
    return torch.where((info == 2)[:, None, None], torch.full_like(P, math.nan), P)

"""The r x r preconditioners of a batch of LoRA pairs: damped Gram inverses, batched across pairs.

For a pair (A (r, in), B (out, r)) in the layout of API.md the optimizers precondition
    grad_A <- P_A grad_A   with P_A = (B^T B + damping I_r)^-1
    grad_B <- grad_B P_B   with P_B = (A A^T + damping I_r)^-1
`damped_inverse` turns a stack of Gram matrices into the P's in a few batched launches, whatever the number
of pairs, so the CPU reference and the fused Triton path share it; `damped_inverses` does several stacks of
different ranks in one batched solve (zero-padded to the largest rank).

Numerics (why each choice; measured, BENCHMARKS.md 2026-12-06):
- The Grams and the solves are float64 whatever the adapter dtype (GRAM_DTYPE; r <= 128 keeps this cheap).
  The condition number of a Gram is the square of the factor's: in fp32 a factor with condition 1e3 already
  leaves ~1e-1 relative error in P (fp32 Grams miss test_optim's one-step recovery by 63x its tolerance).
- The product P grad: never with P rounded to fp32 (226x the recovery tolerance: P is as ill-conditioned as
  the Gram). Either float64 (the fused Triton kernel, which takes P), or, with factor=True, through a
  factor W with P = W W^T: W (W^T grad) in the adapters' work dtype (the torch engine), as accurate as the
  float64 product (recovery at 0.20-0.25 of the tolerance, float64: 0.16-0.22) because W's columns carry
  each eigen-direction at its own scale (W = L^-T, or V diag(w^-1/2)), so the rounding errors stay in the
  directions they belong to. In fp64 the error of a step is the factor's own rounding level (~ cond(factor) u).
- damping > 0: batched Cholesky; W = L^-T from one batched triangular solve, P = W W^T (an explicit r x r
  inverse, because the fused kernel multiplies gradient tiles by it). A pair whose Cholesky fails (info != 0)
  or whose inverse is not finite (damping below the rounding level of its Gram) is refactored with the
  damping raised to sqrt(eps) trace(Gram) (`cholesky_shift`); both are computed for every pair and selected
  with torch.where on the device, so this path never synchronises with the host.
- damping == 0: the Moore-Penrose pseudo-inverse from a symmetric eigendecomposition, with eigenvalues at or
  below `pinv_rtol * largest` treated as zero (W = V diag(w^-1/2), zero columns for those). A zero Gram
  (B = 0 at the standard LoRA init) gives P = 0, so the other factor simply does not move; never Inf or NaN. torch.linalg.eigh synchronises a CUDA device
  with the host (its error check), which is why the optimizers batch all of a step's solves into one call.
- Non-finite Grams (a NaN parameter) give NaN P's: the NaN shows up in the parameters instead of being hidden.
- normalize="fro" (NoRA+, nystrom-init-nora.txt Alg. 2): P <- P / ||P||_F (W <- W / sqrt(||P||_F)), so
  ||P||_2 <= 1 and the preconditioned gradient is never larger than the raw one. A zero P stays zero.
- Non-finite tests are on sums (of P's entries, of W's squares: trace(W W^T)), one reduction per matrix.
"""
from __future__ import annotations

import torch

NORMALIZE_CHOICES = (None, "fro")
GRAM_DTYPE = torch.float64


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the optimizer state and of the element-wise update for adapters of `dtype` (fp32 at least)."""
    return torch.promote_types(dtype, torch.float32)


def pinv_rtol(r: int, dtype: torch.dtype, factor_dtype: torch.dtype | None = None) -> float:
    """Relative cut-off of the pseudo-inverse: the rounding level of an r x r Gram of `factor_dtype` factors
    accumulated in `dtype`.

    32 r eps(dtype) is the accumulation's rounding (fp64: about 7e-15 r, so the tests' exact algebra survives).
    A factor stored in a lower precision carries its own rounding, |dX| <= eps(factor) |X| entry-wise, which
    gives a singular (e.g. rank-1) factor spurious singular values around eps(factor) sigma_max: Gram
    eigenvalues below eps(factor)^2 lambda_max are that noise (fp32: 1.4e-14, bf16: 6.1e-5), and inverting
    them would amplify it.
    """
    rtol = 32.0 * r * torch.finfo(dtype).eps
    if factor_dtype is not None and torch.finfo(factor_dtype).eps > torch.finfo(dtype).eps:
        rtol += torch.finfo(factor_dtype).eps ** 2
    return rtol


def cholesky_shift(dtype: torch.dtype) -> float:
    """Damping (relative to trace(Gram)) of the fallback for pairs whose Cholesky failed: sqrt(eps).

    A failure means damping < ~r eps lambda_max (Cholesky succeeds when lambda_min > 20 r^1.5 u lambda_max,
    Higham Thm 10.7): the user's damping is below the Gram's rounding. Raised to sqrt(eps) trace >= sqrt(eps)
    lambda_max, the factorization always succeeds and the explicit inverse keeps about half the digits
    along the Gram's range (the cond of the shifted matrix is <= 1/sqrt(eps)), while the response along its
    null space stays bounded (<= 1/(sqrt(eps) trace)), like the huge-but-finite one of a damping just above
    the failure level."""
    return torch.finfo(dtype).eps ** 0.5


def _all_finite(mats: torch.Tensor) -> torch.Tensor:
    """(n,) bool: matrix i has no NaN / Inf entry. Tested on the sums (a NaN or Inf entry makes its matrix's
    sum non-finite; a sum of finite entries overflows only beyond ~1e305 a matrix, where the result would be
    useless anyway): one reduction instead of an element-wise test, 10x cheaper for a batch of small P's."""
    return torch.isfinite(mats.sum(dim=(-2, -1)))


def pseudo_inverse(mats: torch.Tensor, rtol: float | torch.Tensor | None = None) -> torch.Tensor:
    """Batched pseudo-inverse of symmetric PSD matrices (n, r, r); non-finite inputs give NaN matrices.

    rtol: the relative cut-off, a float or one per matrix ((n,) tensor); pinv_rtol(r, dtype) by default.
    Negative eigenvalues can only be rounding (the inputs are Grams plus a non-negative damping), so they are
    treated as zero like the tiny positive ones.
    """
    W = pseudo_inverse_factor(mats, rtol)
    return W @ W.mT


def pseudo_inverse_factor(mats: torch.Tensor, rtol: float | torch.Tensor | None = None) -> torch.Tensor:
    """W (n, r, r) with pseudo_inverse(mats) = W W^T: V diag(w^-1/2) over the eigenvalues above the cut-off,
    columns in descending eigenvalue order (zero columns for the cut ones, last); NaN for non-finite inputs."""
    finite = _all_finite(mats)
    safe = torch.where(finite[:, None, None], mats, torch.zeros((), dtype=mats.dtype, device=mats.device))
    safe = 0.5 * (safe + safe.mT)  # eigh reads one triangle; symmetrize so both agree
    w, V = torch.linalg.eigh(safe)
    if rtol is None:
        rtol = pinv_rtol(mats.shape[-1], mats.dtype)
    if isinstance(rtol, torch.Tensor):
        rtol = rtol.to(device=w.device, dtype=w.dtype)[:, None]
    cut = (rtol * w.amax(dim=-1, keepdim=True)).clamp_min(torch.finfo(mats.dtype).tiny)
    inv_sqrt = torch.where(w > cut, torch.where(w > cut, w, torch.ones_like(w)).rsqrt(), torch.zeros_like(w))
    W = (V * inv_sqrt[:, None, :]).flip(-1)  # descending: a zero-padded block's own columns come first
    return torch.where(finite[:, None, None], W, torch.full_like(W, float("nan")))


def _check_grams(grams: torch.Tensor) -> None:
    if grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"grams must have shape (n, r, r), got {tuple(grams.shape)}")
    if grams.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"grams must be float32 or float64 (compute the Grams in GRAM_DTYPE), got {grams.dtype}")


def _inverse_factor(grams: torch.Tensor, damping: float, rtol: float | torch.Tensor) -> torch.Tensor:
    """W with W W^T = (grams + damping I)^-1 (the pseudo-inverse of grams when damping is 0): L^-T from the
    Cholesky factor L, or V diag(w^-1/2) from eigh. No host synchronisation for damping > 0 (about 20 small
    batched launches, whatever the number of pairs)."""
    if damping == 0:
        return pseudo_inverse_factor(grams, rtol)
    n = grams.shape[0]
    eye = torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device)
    mats = grams + damping * eye
    # the fallback for pairs whose damping is below the Gram's rounding level, factored in the same batched
    # call for every pair, so that no host check is needed to decide which pairs need it
    shift = cholesky_shift(grams.dtype) * torch.diagonal(grams, dim1=-2, dim2=-1).sum(-1)
    both = torch.cat([mats, mats + shift[:, None, None] * eye])
    L, info = torch.linalg.cholesky_ex(both)
    W = torch.linalg.solve_triangular(L, eye, upper=False).mT  # L^-T: (L L^T)^-1 = L^-T L^-1
    # trace(W W^T) = ||W||_F^2 bounds every entry of the inverse: finite iff the inverse is
    ok = ((info == 0) & torch.isfinite((W * W).sum(dim=(-2, -1))))[:, None, None]
    nan = torch.full((), float("nan"), dtype=W.dtype, device=W.device)  # non-finite Grams fail both
    return torch.where(ok[:n], W[:n], torch.where(ok[n:], W[n:], nan))


def _normalize_factor(W: torch.Tensor, normalize: str | None) -> torch.Tensor:
    """W / sqrt(||W W^T||_F) for normalize="fro" (so that W W^T is P / ||P||_F); a zero W stays zero."""
    if normalize == "fro":
        norms = torch.linalg.matrix_norm(W.mT @ W, ord="fro", keepdim=True)  # ||W^T W||_F = ||W W^T||_F
        W = W / torch.where(norms > 0, norms, torch.ones_like(norms)).sqrt()
    return W


def _finish(W: torch.Tensor, normalize: str | None, factor: bool) -> torch.Tensor:
    W = _normalize_factor(W, normalize)
    return (W if factor else W @ W.mT).contiguous()


def damped_inverse(grams: torch.Tensor, damping: float, normalize: str | None = None,
                   factor_dtype: torch.dtype | None = None, factor: bool = False) -> torch.Tensor:
    """P = (grams + damping I)^-1 (pseudo-inverse when damping is 0), optionally divided by ||P||_F; with
    factor=True a W such that P = W W^T instead (see the module docstring: what the torch engine multiplies by).

    grams: (n, r, r) symmetric PSD, fp32 or fp64 (the optimizers pass fp64). factor_dtype: the dtype of the
    factors the Grams come from (sets the pseudo-inverse's cut-off, see pinv_rtol). Returns a new contiguous
    (n, r, r) tensor of the same dtype. Host synchronisations: none for damping > 0; one (torch.linalg.eigh's)
    for damping == 0 on CUDA.
    """
    _check_grams(grams)
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, got {normalize!r}")
    if grams.shape[0] == 0:
        return grams.clone()
    W = _inverse_factor(grams, damping, pinv_rtol(grams.shape[-1], grams.dtype, factor_dtype))
    return _finish(W, normalize, factor)


def damped_inverses(grams_list: list[torch.Tensor], damping: float, normalize: str | None = None,
                    factor_dtypes: list[torch.dtype | None] | None = None,
                    factors: list[bool] | None = None) -> list[torch.Tensor]:
    """damped_inverse of several stacks on one device (their ranks may differ) in one batched solve;
    factors[i] (default False): return stack i's W (P = W W^T) rather than its P.

    The stacks are zero-padded to the largest rank: a block-diagonal [[G, 0], [0, 0]] + damping I factors and
    inverts block by block (its L^-T is block-diagonal), and its pseudo-inverse is [[pinv(G), 0], [0, 0]] with
    the same cut-off (the padding adds no eigenvalue above zero; W's columns are in descending eigenvalue
    order, so the leading r x r block of W holds all of G's), so each result is the stack's own. One call is
    one host synchronisation at most (damping == 0 on CUDA), whatever the number of ranks.
    """
    if factor_dtypes is None:
        factor_dtypes = [None] * len(grams_list)
    if factors is None:
        factors = [False] * len(grams_list)
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, got {normalize!r}")
    for g in grams_list:
        _check_grams(g)
    if len(grams_list) == 1:
        return [damped_inverse(grams_list[0], damping, normalize, factor_dtypes[0], factors[0])]
    dtype = grams_list[0].dtype
    for g in grams_list[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    counts = [g.shape[0] for g in grams_list]
    ranks = [g.shape[-1] for g in grams_list]
    r_max, n = max(ranks), sum(counts)
    if n == 0:
        return [g.clone() for g in grams_list]
    device = grams_list[0].device
    if len(set(ranks)) == 1:
        padded = torch.cat([g.to(dtype) for g in grams_list])
    else:
        padded = torch.zeros((n, r_max, r_max), dtype=dtype, device=device)
        off = 0
        for g, c, r in zip(grams_list, counts, ranks):
            padded[off:off + c, :r, :r] = g
            off += c
    rtols = [pinv_rtol(r, dtype, fd) for r, fd in zip(ranks, factor_dtypes)]
    if len(set(rtols)) == 1:
        rtol = rtols[0]
    else:
        rtol = torch.cat([torch.full((c,), rt, dtype=dtype, device=device) for c, rt in zip(counts, rtols)])
    W = _inverse_factor(padded, damping, rtol)
    out, off = [], 0
    for g, c, r, factor in zip(grams_list, counts, ranks, factors):
        out.append(_finish(W[off:off + c, :r, :r], normalize, factor).to(g.dtype))
        off += c
    return out

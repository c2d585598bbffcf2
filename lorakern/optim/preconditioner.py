"""The r x r preconditioners of a batch of LoRA pairs: damped Gram inverses, batched across pairs.

For a pair (A (r, in), B (out, r)) in the layout of API.md the optimizers precondition
    grad_A <- P_A grad_A   with P_A = (B^T B + damping I_r)^-1
    grad_B <- grad_B P_B   with P_B = (A A^T + damping I_r)^-1
`damped_inverse` turns a stack of Gram matrices into the P's in a few batched launches, whatever the number
of pairs, so the CPU reference and the fused Triton path share it.

Numerics (why each choice):
- Computed in fp32 at least (fp64 stays fp64): bf16 Grams lose three digits of an already squared condition.
- damping > 0: batched Cholesky; P = L^-T L^-1 from two batched triangular solves (an explicit r x r inverse,
  because the fused kernel multiplies gradient tiles by it). A pair whose Cholesky fails (info != 0) or
  whose inverse is not finite falls back to the pseudo-inverse of (Gram + damping I) below.
- damping == 0: the Moore-Penrose pseudo-inverse from a symmetric eigendecomposition, with eigenvalues at or
  below `rtol * largest` (and below the dtype's smallest normal) treated as zero. A zero Gram (B = 0 at the
  standard LoRA init) gives P = 0, so the other factor simply does not move; never Inf or NaN.
- normalize="fro" (NoRA+, nystrom-init-nora.txt Alg. 2): P <- P / ||P||_F, so ||P||_2 <= 1 and the
  preconditioned gradient is never larger than the raw one. A zero P stays zero.
"""
from __future__ import annotations

import torch

NORMALIZE_CHOICES = (None, "fro")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the Grams, the solves and the optimizer state use for adapters of `dtype`."""
    return torch.promote_types(dtype, torch.float32)


def pinv_rtol(r: int, dtype: torch.dtype) -> float:
    """Relative cut-off of the pseudo-inverse: the rounding level of an accumulated r x r Gram.

    32 r eps: for fp64 about 7e-15 r (the tests' exact algebra survives); for fp32 about 4e-6 r, below which
    a Gram eigenvalue is rounding noise of the accumulation and inverting it would amplify noise.
    """
    return 32.0 * r * torch.finfo(dtype).eps


def _eye_like(mats: torch.Tensor) -> torch.Tensor:
    r = mats.shape[-1]
    return torch.eye(r, dtype=mats.dtype, device=mats.device).expand_as(mats)


def pseudo_inverse(mats: torch.Tensor) -> torch.Tensor:
    """Batched pseudo-inverse of symmetric PSD matrices (n, r, r); non-finite inputs give NaN matrices.

    Negative eigenvalues can only be rounding (the inputs are Grams plus a non-negative damping), so they are
    treated as zero like the tiny positive ones.
    """
    finite = torch.isfinite(mats).flatten(1).all(dim=1)
    safe = torch.where(finite[:, None, None], mats, torch.zeros((), dtype=mats.dtype, device=mats.device))
    safe = 0.5 * (safe + safe.mT)  # eigh reads one triangle; symmetrize so both agree
    w, V = torch.linalg.eigh(safe)
    r = mats.shape[-1]
    cut = (pinv_rtol(r, mats.dtype) * w.amax(dim=-1, keepdim=True)).clamp_min(torch.finfo(mats.dtype).tiny)
    inv_w = torch.where(w > cut, 1.0 / torch.where(w > cut, w, torch.ones_like(w)), torch.zeros_like(w))
    P = (V * inv_w[:, None, :]) @ V.mT
    return torch.where(finite[:, None, None], P, torch.full_like(P, float("nan")))


def damped_inverse(grams: torch.Tensor, damping: float, normalize: str | None = None) -> torch.Tensor:
    """P = (grams + damping I)^-1 (pseudo-inverse when damping is 0), optionally divided by ||P||_F.

    grams: (n, r, r) symmetric PSD, fp32 or fp64. Returns a new contiguous (n, r, r) tensor of the same dtype.
    A batched Cholesky for damping > 0 (the one host synchronisation is the check for failed pairs).
    """
    if grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"grams must have shape (n, r, r), got {tuple(grams.shape)}")
    if grams.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"grams must be float32 or float64 (compute the Grams in work_dtype), got {grams.dtype}")
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, got {normalize!r}")
    if grams.shape[0] == 0:
        return grams.clone()
    if damping > 0:
        mats = grams + damping * _eye_like(grams)
        L, info = torch.linalg.cholesky_ex(mats)
        L_inv = torch.linalg.solve_triangular(L, _eye_like(mats).contiguous(), upper=False)
        P = L_inv.mT @ L_inv
        failed = (info != 0) | ~torch.isfinite(P).flatten(1).all(dim=1)
        if bool(failed.any()):
            P[failed] = pseudo_inverse(mats[failed])
    else:
        P = pseudo_inverse(grams)
    if normalize == "fro":
        norms = torch.linalg.matrix_norm(P, ord="fro", keepdim=True)
        P = P / torch.where(norms > 0, norms, torch.ones_like(norms))
    return P.contiguous()

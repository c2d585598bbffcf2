"""Randomized truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) and its building blocks.

The sketch-based spectral init (lorakern.spectral) never forms the gradient G: it gets G @ Omega and Q^T G
from streaming passes and finishes with `svd_from_projection`. `randomized_svd` is the same algorithm on an
explicit matrix; it accepts a batch (..., m, n), so layers of one shape are decomposed together.
Work is done in fp32 at least (fp64 stays fp64). The orthonormalization is CholeskyQR2 (two Gram + Cholesky
rounds: matmul-bound, fast on GPUs and accurate to O(eps) after the second round when the first Cholesky
succeeds) with a Householder QR fallback for ill-conditioned sketches.
"""
from __future__ import annotations

import torch


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def orthonormalize(Y: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """An orthonormal basis of the columns of Y (..., m, q), q <= m.

    method "auto": Householder QR on the CPU (LAPACK is as fast there and never fails), CholeskyQR2 on other
    devices; "cholqr2" forces CholeskyQR2 (still falling back to Householder when a Cholesky fails, i.e.
    for rank-deficient or very ill-conditioned Y); "householder" forces torch.linalg.qr.
    """
    if method not in ("auto", "cholqr2", "householder"):
        raise ValueError(f"method must be 'auto', 'cholqr2' or 'householder', got {method!r}")
    if method == "householder" or (method == "auto" and Y.device.type == "cpu"):
        return torch.linalg.qr(Y, mode="reduced").Q
    Q = Y
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Q.mT @ Q)
        if bool((info != 0).any()):
            return torch.linalg.qr(Y, mode="reduced").Q
        Q = torch.linalg.solve_triangular(L, Q.mT, upper=False).mT  # Q L^{-T}
    return Q


def svd_from_projection(Q: torch.Tensor, Z: torch.Tensor, rank: int):
    """Truncated SVD of M ~= Q Z from an orthonormal range basis Q (..., m, q) and Z = Q^T M (..., q, n)."""
    Ub, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    return (Q @ Ub[..., :rank]), S[..., :rank], Vh[..., :rank, :]


def _check(M: torch.Tensor, rank: object, oversample: object, n_iter: object):
    if not isinstance(M, torch.Tensor) or M.dim() < 2:
        raise ValueError(f"M must be a tensor of shape (..., m, n), got {getattr(M, 'shape', type(M).__name__)}")
    if not M.is_floating_point():
        raise TypeError(f"M must be floating point, got {M.dtype}")
    for name, v, low in (("rank", rank, 1), ("oversample", oversample, 0), ("n_iter", n_iter, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    m, n = M.shape[-2:]
    if rank > min(m, n):
        raise ValueError(f"rank={rank} exceeds min(m, n) = {min(m, n)} for M of shape {tuple(M.shape)}")


def randomized_svd(M: torch.Tensor, rank: int, oversample: int = 8, n_iter: int = 2,
                   generator: torch.Generator | None = None):
    """Rank-`rank` SVD of M (..., m, n): returns U (..., m, rank), S (..., rank) descending, Vh (..., rank, n).

    Range finder with q = rank + oversample Gaussian probes (capped at min(m, n)) and `n_iter` power
    iterations, re-orthonormalized at every step (Halko et al. Alg. 4.4). Results in M's dtype.
    """
    _check(M, rank, oversample, n_iter)
    work = _work_dtype(M.dtype)
    A = M.to(work)
    m, n = A.shape[-2:]
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, dtype=work, device="cpu" if generator is None else generator.device,
                        generator=generator).to(A.device)
    Q = orthonormalize(A @ omega)
    for _ in range(n_iter):
        P = orthonormalize(A.mT @ Q)
        Q = orthonormalize(A @ P)
    U, S, Vh = svd_from_projection(Q, Q.mT @ A, rank)
    return U.to(M.dtype), S.to(M.dtype), Vh.to(M.dtype)

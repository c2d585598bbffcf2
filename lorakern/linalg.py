"""Truncated SVDs for lorakern.spectral, every function batched over a leading dimension (..., m, n), so
that the layers of one shape are decomposed together: no Python loop over layers, no host sync per step.

- `top_svd`: the exact top singular triplets of explicit matrices (Gram matrix + eigh in fp64 for fp32
  input, a full SVD for fp64 input or where the Gram route loses accuracy).
- `randomized_svd` (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) on explicit matrices, and
  `svd_from_projection`, its last step, for the multi-pass sketch that streams G @ Omega and Q^T G.
- `onepass_svd`: the one-pass reconstruction of Tropp, Yurtsever, Udell & Cevher (2019, "Streaming low-rank
  matrix approximation with an application to scientific simulation", Alg. 2 + 3 with the core sketch) from
  the range sketch Y = G Omega, the co-range sketch W = Psi^T G and the core sketch Z = Phi^T G Theta.
- `perturbation_error`: a posteriori error estimates of a truncated SVD from held-out probes G p and q^T G.
Work is done in fp32 at least (fp64 stays fp64). The orthonormalization is CholeskyQR2 (two Gram + Cholesky
rounds: matmul-bound, fast on GPUs and accurate to O(eps) after the second round when the first Cholesky
succeeds) with a Householder QR fallback for the matrices whose Cholesky failed, found with one host sync.
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
    flat = Y.reshape(-1, *Y.shape[-2:])
    Q, failed = flat, torch.zeros(flat.shape[0], dtype=torch.bool, device=Y.device)
    for _ in range(2):  # a failed Cholesky leaves NaN/Inf in its matrix; `failed` (on the device) marks it
        L, info = torch.linalg.cholesky_ex(Q.mT @ Q)
        failed |= info != 0
        Q = torch.linalg.solve_triangular(L, Q.mT, upper=False).mT  # Q L^{-T}
    if bool(failed.any()):  # the one host sync: Householder for the flagged matrices only
        Q = Q.clone()
        Q[failed] = torch.linalg.qr(flat[failed], mode="reduced").Q
    return Q.reshape(Y.shape)


def svd_from_projection(Q: torch.Tensor, Z: torch.Tensor, rank: int):
    """Truncated SVD of M ~= Q Z from an orthonormal range basis Q (..., m, q) and Z = Q^T M (..., q, n)."""
    Ub, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    return (Q @ Ub[..., :rank]), S[..., :rank], Vh[..., :rank, :]


def _qr_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Least-squares solution X of A X = B for tall full-column-rank A (..., m, k), through Householder QR."""
    Q, R = torch.linalg.qr(A, mode="reduced")
    return torch.linalg.solve_triangular(R, Q.mT @ B, upper=True)


def onepass_svd(Y: torch.Tensor, W: torch.Tensor, Z: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor):
    """SVD of the one-pass reconstruction G_hat = Q C P^T of G (..., m, n) from its sketches (Tropp et al. 2019):
    Y = G Omega (..., m, k), W = Psi^T G (..., l, n), Z = Phi^T G Theta (..., s, s), with Theta (..., n, s) and
    Phi (..., m, s) the core probes (s >= k, l). Q = orth(Y), P = orth(W^T) and C (k, l) solves
    (Phi^T Q) C (P^T Theta) = Z in the least-squares sense. Returns U (..., m, k'), S (..., k') descending,
    Vh (..., k', n) with k' = min(k, l), in fp64 (the reconstruction is small: its cost is the QRs of Y and W).
    G_hat = G whenever rank(G) <= min(k, l) (a.s. for Gaussian probes)."""
    Y, W, Z, theta, phi = (t.to(torch.float64) for t in (Y, W, Z, theta, phi))
    Q = orthonormalize(Y)
    P = orthonormalize(W.mT)
    C = _qr_solve(phi.mT @ Q, Z)                   # (k, s): C (P^T Theta) = (Phi^T Q)^+ Z
    C = _qr_solve(theta.mT @ P, C.mT).mT           # (k, l)
    Uc, S, Vhc = torch.linalg.svd(C, full_matrices=False)
    return Q @ Uc, S, Vhc @ P.mT


def top_svd(G: torch.Tensor, rank: int, chunk_bytes: int = 16 * 2 ** 20):
    """The exact top-`rank` singular triplets of G (..., m, n): U (..., m, rank), S (..., rank), Vh (..., rank, n),
    in G's dtype (fp32 at least).

    fp32 input: eigendecomposition of the fp64 Gram matrix of the shorter side (formed from fp64 copies of
    column blocks of about `chunk_bytes`, so the fp64 copy of G is never whole), then the other side's vectors
    as G^T u / sigma in fp64. That is exact to well below G's own fp32 rounding while sigma_rank >= 1e-4
    sigma_1; matrices below that (rank-deficient gradients) get a full SVD instead, found with one host sync.
    fp64 input: a full SVD (fp64 accuracy throughout)."""
    work = _work_dtype(G.dtype)
    if work == torch.float64:
        U, S, Vh = torch.linalg.svd(G.to(work), full_matrices=False)
        return U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    wide = G.shape[-2] > G.shape[-1]
    A = G.mT if wide else G                       # (..., a, b), a <= b: the Gram matrix is a x a
    a, b = A.shape[-2:]
    step = max(1, chunk_bytes // max(1, 8 * A.numel() // max(1, b)))  # columns per fp64 block
    blocks = range(0, b, step)
    gram = 0
    for j in blocks:
        block = _f64(A, j, step)
        gram = gram + block @ block.mT
    evals, evecs = torch.linalg.eigh(gram)        # ascending
    Ua = evecs[..., -rank:].flip(-1)              # (..., a, rank)
    S = evals[..., -rank:].flip(-1).clamp_min(0).sqrt()
    Vb = torch.cat([_f64(A, j, step).mT @ Ua for j in blocks], dim=-2) / S.clamp_min(1e-300)[..., None, :]
    U, V = (Vb, Ua) if wide else (Ua, Vb)
    U, S, Vh = U.to(work), S.to(work), V.mT.to(work)
    weak = (S[..., -1] < 1e-4 * S[..., 0]).reshape(-1)
    if bool(weak.any()):  # the one host sync
        return _replace_weak(G, rank, weak, U, S, Vh)
    return U, S, Vh


def _replace_weak(G, rank, weak, U, S, Vh):
    """(U, S, Vh) with the `weak` matrices of the flattened batch replaced by their full fp64 SVD."""
    U, S, Vh = (t.reshape(-1, *t.shape[-2:]).clone() for t in (U, S[..., None], Vh))
    u, s, vh = torch.linalg.svd(G.reshape(-1, *G.shape[-2:])[weak].to(torch.float64), full_matrices=False)
    U[weak], S[weak], Vh[weak] = (t.to(U.dtype) for t in (u[..., :rank], s[..., :rank, None], vh[..., :rank, :]))
    return U.reshape(*G.shape[:-2], *U.shape[-2:]), S.reshape(*G.shape[:-2], rank), \
        Vh.reshape(*G.shape[:-2], *Vh.shape[-2:])


def _f64(A: torch.Tensor, start: int, step: int) -> torch.Tensor:
    return A[..., start:start + step].to(torch.float64)


def perturbation_error(U: torch.Tensor, Vh: torch.Tensor, Ep: torch.Tensor, qE: torch.Tensor):
    """Estimates of ||u_i^T E||^2 and ||E v_i||^2 for the columns u_i of U (..., m, r) and the rows v_i^T of
    Vh (..., r, n), where E = G - G_hat, from t held-out Gaussian probes drawn independently of the sketch:
    Ep = E p (..., m, t) and qE = q^T E (..., t, n) for p ~ N(0, I_n), q ~ N(0, I_m). Since
    E ||u^T E p||^2 = ||u^T E||^2, each estimate is a mean over the probes. Returns (alpha2, beta2), (..., r) each."""
    t_in, t_out = Ep.shape[-1], qE.shape[-2]
    alpha2 = (U.mT @ Ep).square().sum(-1) / t_in
    beta2 = (qE @ Vh.mT).square().sum(-2) / t_out
    return alpha2, beta2


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

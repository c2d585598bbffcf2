"""randomized_svd on matrices with known spectra, against the optimum and torch.svd_lowrank; top_svd, onepass_svd
and orthonormalize batched over layers against per-matrix calls and float64."""
import pytest
import torch

import lorakern as lk
from lorakern.linalg import orthonormalize
from conftest import rel_err


def known(m, n, spectrum, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g, dtype=torch.float64))
    return ((U * spectrum) @ V.T).to(dtype)


@pytest.mark.parametrize("n_iter", [0, 1, 2])
def test_accuracy_equals_svd_lowrank(n_iter):
    s = 0.7 ** torch.arange(150, dtype=torch.float64)
    M = known(203, 150, s)
    rank, over = 10, 8
    U, S, Vh = lk.linalg.randomized_svd(M, rank, oversample=over, n_iter=n_iter,
                                        generator=torch.Generator().manual_seed(1))
    assert U.shape == (203, rank) and S.shape == (rank,) and Vh.shape == (rank, 150)
    assert torch.all(S[:-1] >= S[1:])
    err = ((U * S) @ Vh - M).norm()
    best = s[rank:].norm()  # Eckart-Young
    torch.manual_seed(1)
    u, ss, v = torch.svd_lowrank(M, q=rank + over, niter=n_iter)
    err_torch = ((u[:, :rank] * ss[:rank]) @ v[:, :rank].T - M).norm()
    assert err <= 1.05 * err_torch + 1e-12 and err <= 1.2 * best
    assert torch.allclose(U.T @ U, torch.eye(rank, dtype=M.dtype), atol=1e-10)
    if n_iter == 2:
        assert (S - s[:rank]).abs().max() < 1e-10


def test_exact_low_rank_and_batch_and_dtype():
    M = torch.stack([known(40, 31, torch.tensor([5.0, 2.0, 1.0]), seed=i) for i in range(3)]).float()
    U, S, Vh = lk.linalg.randomized_svd(M, 3, n_iter=1)
    assert U.shape == (3, 40, 3) and U.dtype == torch.float32
    assert torch.allclose(S, torch.tensor([5.0, 2.0, 1.0]).expand(3, 3), atol=1e-4)
    assert ((U * S[..., None, :]) @ Vh - M).norm() / M.norm() < 1e-5
    bf = lk.linalg.randomized_svd(M[0].bfloat16(), 2)
    assert bf[0].dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["cholqr2", "householder", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthonormalize_keeps_the_range(method, dtype):
    Y = torch.randn(3, 50, 7, dtype=dtype) @ torch.diag(torch.logspace(0, 2, 7, dtype=dtype))  # cond ~ 100
    Q = orthonormalize(Y, method)
    eye = torch.eye(7, dtype=dtype).expand(3, 7, 7)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (Q.mT @ Q - eye).abs().max() < tol
    assert ((Q @ (Q.mT @ Y)) - Y).norm() / Y.norm() < tol


def test_cholqr2_falls_back_on_rank_deficient_input():
    Y = torch.randn(30, 4)
    Y[:, 3] = Y[:, 0]  # singular Gram matrix: the Cholesky fails, Householder takes over
    Q = orthonormalize(Y, "cholqr2")
    assert torch.isfinite(Q).all() and (Q.T @ Q - torch.eye(4)).abs().max() < 1e-5
    assert ((Q @ (Q.T @ Y)) - Y).norm() / Y.norm() < 1e-5
    with pytest.raises(ValueError, match="method"):
        orthonormalize(Y, "gram-schmidt")


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank"), (dict(rank=40), "exceeds"), (dict(rank=2, n_iter=-1), "n_iter"),
    (dict(rank=2, oversample=1.5), "oversample"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lk.linalg.randomized_svd(torch.randn(30, 20), **kwargs)
    with pytest.raises(TypeError, match="floating"):
        lk.linalg.randomized_svd(torch.ones(5, 5, dtype=torch.int32), 2)


# -- batched over layers (lorakern.spectral decomposes each group of same-shape layers at once) ----------------
def stack(m, n, count, rank=None, dtype=torch.float32):
    spectra = [torch.logspace(0, -3, rank or min(m, n), dtype=torch.float64) * (i + 1) for i in range(count)]
    return torch.stack([known(m, n, s, seed=i) for i, s in enumerate(spectra)]).to(dtype)


@pytest.mark.parametrize("shape", [(40, 31), (31, 40)])
def test_top_svd_batched_equals_per_matrix_and_float64_svd(shape):
    G = stack(*shape, 3)
    U, S, Vh = lk.linalg.top_svd(G, 5, chunk_bytes=4096)  # several fp64 column blocks
    assert U.shape == (3, shape[0], 5) and S.shape == (3, 5) and Vh.shape == (3, 5, shape[1])
    for i in range(3):
        u, s, vh = lk.linalg.top_svd(G[i], 5)
        ref_u, ref_s, ref_vh = torch.linalg.svd(G[i].double(), full_matrices=False)
        assert torch.allclose(S[i], s) and rel_err(S[i], ref_s[:5]) < 1e-6
        best = (ref_u[:, :5] * ref_s[:5]) @ ref_vh[:5]
        assert rel_err((U[i] * S[i]) @ Vh[i], best) < 1e-6 and rel_err((u * s) @ vh, best) < 1e-6


def test_top_svd_of_a_rank_deficient_matrix_falls_back_to_the_full_svd():
    G = torch.cat([stack(30, 20, 1), stack(30, 20, 1, rank=2)])  # the second has rank 2 < 4
    U, S, Vh = lk.linalg.top_svd(G, 4)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    for i in range(2):  # orthonormal singular vectors, also for the zero singular values
        assert (U[i].T @ U[i] - torch.eye(4)).abs().max() < 1e-5 and (Vh[i] @ Vh[i].T - torch.eye(4)).abs().max() < 1e-5
    assert rel_err((U[1] * S[1]) @ Vh[1], G[1]) < 1e-5  # rank 2: the top 4 triplets hold all of it


def test_onepass_svd_batched_equals_per_matrix_and_is_exact_within_the_sketch_rank():
    G = stack(40, 31, 3, rank=6, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    k, s = 7, 15
    f64 = dict(generator=g, dtype=torch.float64)
    om, ps = torch.randn(3, 31, k, **f64), torch.randn(3, 40, k, **f64)
    th, ph = torch.randn(3, 31, s, **f64), torch.randn(3, 40, s, **f64)
    Y, W, Z = G @ om, ps.mT @ G, ph.mT @ G @ th
    U, S, Vh = lk.linalg.onepass_svd(Y, W, Z, th, ph)
    for i in range(3):
        u, sv, vh = lk.linalg.onepass_svd(Y[i], W[i], Z[i], th[i], ph[i])
        assert rel_err(S[i], sv) < 1e-12 and rel_err((u * sv) @ vh, (U[i] * S[i]) @ Vh[i]) < 1e-12
        assert rel_err((U[i] * S[i]) @ Vh[i], G[i]) < 1e-10  # rank 6 <= k = 7: G itself


def test_cholqr2_falls_back_only_for_the_failing_matrices_of_a_batch():
    Y = torch.randn(3, 30, 4, dtype=torch.float64)
    Y[1, :, 3] = Y[1, :, 0]  # singular Gram matrix in batch entry 1 only
    Q = orthonormalize(Y, "cholqr2")
    ref = torch.linalg.qr(Y).Q
    eye = torch.eye(4, dtype=torch.float64)
    assert (Q.mT @ Q - eye).abs().max() < 1e-10 and torch.equal(Q[1], ref[1])  # Householder for entry 1
    assert all(rel_err(Q[i] @ (Q[i].T @ Y[i]), Y[i]) < 1e-10 for i in range(3))

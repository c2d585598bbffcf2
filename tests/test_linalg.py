"""randomized_svd on matrices with known spectra, against the optimum and torch.svd_lowrank."""
import pytest
import torch

import lorakern as lk
from lorakern.linalg import orthonormalize


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

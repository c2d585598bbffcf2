"""PiSSA, NoRA (Nystrom), LoRA-One and LoRA-GA initializations against float64 reimplementations written in
the papers' own layout (lora-one.txt: W is in x out, A is d x r, B is r x k), converted once here."""
import pytest
import torch

import lorakern as lk
from conftest import rel_err


def paper_algorithm1(grad_pt, r, s, normalize=True, gamma=None):
    """lora-one.txt Algorithm 1 in the paper's layout; returns the PyTorch-layout product lora_B @ lora_A."""
    G = grad_pt.double().T                       # paper's dL/dW, d x k
    U, S, Vt = torch.linalg.svd(-G, full_matrices=False)
    if normalize:
        S = S / S[0]
    g = 1.0 / s if gamma is None else gamma
    A0 = g ** 0.5 * U[:, :r] * S[:r].sqrt()      # d x r
    B0 = g ** 0.5 * S[:r].sqrt()[:, None] * Vt[:r]  # r x k
    return (A0 @ B0).T                            # PyTorch (out, in)


@pytest.mark.parametrize("s, normalize", [(1.0, True), (16.0, True), (1.0, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_one_matches_algorithm1(s, normalize, dtype):
    grad = torch.randn(23, 17, dtype=torch.float64).to(dtype)
    A, B = lk.init.lora_one(grad, 5, s=s, normalize=normalize)
    assert A.shape == (5, 17) and B.shape == (23, 5) and A.dtype == dtype
    ref = paper_algorithm1(grad, 5, s, normalize)
    assert rel_err(B @ A, ref) < (1e-5 if dtype == torch.float32 else 1e-12)
    # balanced factors: A A^T = B^T B = diag(S_r / S_1) / s
    S = torch.linalg.svdvals(grad.double())[:5]
    target = (S / S[0] if normalize else S) / s
    assert rel_err(torch.diag(A.double() @ A.double().T), target) < 1e-5
    assert rel_err(torch.diag(B.double().T @ B.double()), target) < 1e-5
    if normalize:  # top singular value of B A is 1/s
        assert torch.linalg.matrix_norm(B.double() @ A.double(), ord=2).item() == pytest.approx(1 / s, rel=1e-5)


def test_lora_one_unnormalized_recovers_minus_grad():
    """Thm 3.3 setting: gamma = 1, no normalization: B A is the best rank-r approximation of -G, and -G itself
    when r >= rank(G)."""
    g = torch.Generator().manual_seed(0)
    low = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g, dtype=torch.float64)
    A, B = lk.init.lora_one(low, 5, normalize=False, gamma=1.0)
    assert rel_err(B @ A, -low) < 1e-12
    full = torch.randn(30, 20, generator=g, dtype=torch.float64)
    A, B = lk.init.lora_one(full, 4, normalize=False, gamma=1.0)
    U, S, Vh = torch.linalg.svd(-full, full_matrices=False)
    assert rel_err(B @ A, (U[:, :4] * S[:4]) @ Vh[:4]) < 1e-12
    A, B = lk.init.lora_one(full, 4, normalize=False, gamma=1.0, n_iter=4)  # randomized SVD path
    assert rel_err(B @ A, (U[:, :4] * S[:4]) @ Vh[:4]) < 1e-3


def test_lora_ga_matches_eq91():
    grad = torch.randn(26, 19, dtype=torch.float64)
    r, c, scaling = 4, 16.0, 2.5
    A, B, off = lk.init.lora_ga(grad, r, c=c, scaling=scaling)
    G = -grad.T                                   # paper G = -dL/dW, d x k
    Ut, _, Vt = torch.linalg.svd(G, full_matrices=False)  # Ut: d (input side), Vt.T: k (output side)
    k = grad.shape[0]
    A0 = -(k ** 0.25 / c) * Ut[:, :r]            # d x r
    B0 = (k ** 0.25 / c) * Vt[r:2 * r]           # r x k
    # singular vectors are defined up to sign and (91) pairs U_i with V_{r+i}: compare each factor up to the
    # sign of each vector, and the offset through the returned factors
    for got, want in ((A, A0.T), (B.T, B0)):
        flip = torch.sign((got * want).sum(1, keepdim=True))
        assert rel_err(got * flip, want) < 1e-12
    assert rel_err(off, scaling * B @ A) < 1e-12
    # the paper's point: B lies in singular directions r+1..2r, orthogonal to the top-r output subspace
    U, _, _ = torch.linalg.svd(-grad, full_matrices=False)
    assert (U[:, :r].T @ B).abs().max() < 1e-12
    with pytest.raises(ValueError, match="2\\*r"):
        lk.init.lora_ga(grad, 10)


@pytest.mark.parametrize("scaling", [1.0, 3.0])
def test_pissa_residual_and_principal_directions(scaling):
    W = torch.randn(21, 34, dtype=torch.float64)
    A, B, res = lk.init.pissa(W, 6, scaling=scaling)
    assert rel_err(res + scaling * B @ A, W) < 1e-12
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert rel_err(scaling * B @ A, (U[:, :6] * S[:6]) @ Vh[:6]) < 1e-12
    assert rel_err(torch.linalg.svdvals(res)[:3], S[6:9]) < 1e-12
    A2, B2, _ = lk.init.pissa(W, 6, scaling=scaling, n_iter=8)
    assert rel_err(B2 @ A2, B @ A) < 1e-3


def test_nystrom_sketches_the_weight():
    g = torch.Generator().manual_seed(3)
    low = torch.randn(40, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 25, generator=g, dtype=torch.float64)
    A, B = lk.init.nystrom(low, 2, xi=0.5, generator=torch.Generator().manual_seed(9))
    assert torch.count_nonzero(A) == 0 and B.shape == (40, 2)
    omega = torch.randn(25, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 0.5
    assert rel_err(B, low @ omega) < 1e-12
    U = torch.linalg.svd(low)[0][:, :2]
    assert rel_err(U @ (U.T @ B), B) < 1e-12  # col(B) inside col(W)


@pytest.mark.parametrize("init", ["pissa", "nystrom"])
@pytest.mark.parametrize("dtype, adt", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_layer_inits_leave_the_output_unchanged(init, dtype, adt):
    torch.manual_seed(0)
    ref = torch.nn.Linear(30, 22, dtype=dtype)
    x = torch.randn(5, 30, dtype=dtype)
    y_ref = ref(x)
    layer = lk.LoRALinear.from_linear(torch.nn.Linear(30, 22, dtype=dtype), r=4, alpha=8, init="lora",
                                      adapter_dtype=adt)
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
        layer.bias.copy_(ref.bias)
    layer.reset_lora_parameters(init)
    assert layer.lora_B.abs().sum() > 0
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(layer(x), y_ref) < tol
    if init == "pissa":
        assert rel_err(layer.weight + layer.delta_weight().to(dtype), ref.weight) < tol
    else:
        assert torch.equal(layer.weight, ref.weight)


def test_apply_lora_with_pissa_and_nystrom():
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    x = torch.randn(3, 12)
    y = model(x)
    lk.apply_lora(model, r=3, init="pissa", exclude=())
    assert rel_err(model(x), y) < 1e-5
    with pytest.raises(ValueError, match="merged"):
        lk.merge_lora(model)
        model[0].reset_lora_parameters("nystrom")


@pytest.mark.parametrize("wdt, adt, tol", [(torch.float32, torch.bfloat16, 1e-6), (torch.float32, None, 1e-6),
                                           (torch.bfloat16, torch.float32, 1e-2), (torch.float64, None, 1e-14)])
def test_pissa_residual_uses_the_stored_factors(wdt, adt, tol):
    """residual + scaling B A = W with the factors as stored: bf16 adapters on an fp32 base used to leave
    ~2e-3 of bf16 error in the base weight (review 2 of the spectral stack)."""
    lin = torch.nn.Linear(40, 30).to(wdt)
    W0 = lin.weight.detach().double().clone()
    layer = lk.LoRALinear.from_linear(lin, r=4, init="pissa", adapter_dtype=adt)
    assert layer.lora_A.dtype == (adt or wdt) and layer.weight.dtype == wdt
    total = layer.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    assert rel_err(total, W0) < tol

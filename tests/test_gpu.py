"""GPU checks (skipped without CUDA): the same float64-referenced checks as the CPU tests, on the device."""
import copy

import pytest
import torch

import lorakern as lk
from conftest import randomize_adapter, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype, adt, tol", [(torch.float32, None, 1e-5), (torch.bfloat16, None, 1e-2),
                                             (torch.bfloat16, torch.float32, 1e-2)])
def test_layer_on_cuda_matches_float64(dtype, adt, tol):
    layer = randomize_adapter(lk.LoRALinear(1000, 333, r=17, dtype=dtype, adapter_dtype=adt)).cuda()
    x = torch.randn(3, 129, 1000, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    X, W, b = x.detach().double(), layer.weight.double(), layer.bias.double()
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    X.requires_grad_(True)
    ref = X @ W.T + b + layer.scaling * (X @ A.T) @ B.T
    gx, gA, gB = torch.autograd.grad(ref, (X, A, B), dy.double())
    assert rel_err(y, ref) < tol and rel_err(x.grad, gx) < tol
    assert rel_err(layer.lora_A.grad, gA) < tol and rel_err(layer.lora_B.grad, gB) < tol


def test_randomized_svd_cholqr2_on_cuda():
    s = 0.8 ** torch.arange(64, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(300, 64, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(200, 64, dtype=torch.float64))
    M = ((U * s) @ V.T).float().cuda()
    u, S, vh = lk.linalg.randomized_svd(M, 8, n_iter=2)
    assert rel_err(S.cpu(), s[:8]) < 1e-4


def test_spectral_init_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 60), torch.nn.Tanh(), torch.nn.Linear(60, 9))
    lk.apply_lora(model, r=4, exclude=())
    batches = [(torch.randn(16, 40), torch.randn(16, 9)) for _ in range(3)]
    loss = lambda m, b: (m(b[0]) - b[1]).square().mean()  # noqa: E731
    gpu = copy.deepcopy(model).cuda()
    lk.spectral_init(model, batches, loss, mode="exact", progress=False)
    lk.spectral_init(gpu, [(x.cuda(), y.cuda()) for x, y in batches], loss, mode="exact", progress=False)
    for n, m in lk.lora_modules(model).items():
        g = lk.lora_modules(gpu)[n]
        assert rel_err(g.delta_weight().cpu(), m.delta_weight()) < 1e-4

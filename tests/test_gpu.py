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


@pytest.mark.parametrize("dtype, adt, r, tol", [
    (torch.bfloat16, torch.bfloat16, 1, 1e-2), (torch.bfloat16, torch.bfloat16, 64, 1e-2),
    (torch.bfloat16, torch.float32, 16, 1e-2), (torch.float16, torch.float16, 256, 5e-3),
    (torch.float32, torch.float32, 33, 1e-5)])
@pytest.mark.parametrize("base", ["triton", "cublas"])
def test_triton_kernels_on_cuda_match_float64(monkeypatch, dtype, adt, r, tol, base):
    """The Triton path itself (forced), at a size where the autotuned Hopper tiles and the atomics engage;
    each call is the first of its autotune key, so trial runs must leave y / dx / dA / dB as one run would."""
    from test_lora_linear_triton import _reference, ops
    monkeypatch.setenv("LORAKERN_BASE_GEMM", base)
    lk.set_backend("triton")
    M, n_in, n_out = 1031, 1000, 777
    x = torch.randn(M, n_in, device="cuda").to(dtype).requires_grad_(True)
    W = (torch.randn(n_out, n_in, device="cuda") / n_in ** 0.5).to(dtype)
    b = torch.randn(n_out, device="cuda").to(dtype)
    A = (torch.randn(r, n_in, device="cuda") / n_in ** 0.5).to(adt).requires_grad_(True)
    B = torch.randn(n_out, r, device="cuda").to(adt).requires_grad_(True)
    y = ops.lora_linear(x, W, b, A, B, 0.7)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = _reference(x, W, b, A, B, 0.7, dy)
    for got, want in zip((y, x.grad, A.grad, B.grad), ref):
        assert torch.isfinite(got).all() and rel_err(got, want) < tol


def test_triton_dropout_on_cuda_uses_one_mask():
    from test_lora_linear_triton import _check, _reference, ops
    lk.set_backend("triton")
    eye = torch.eye(257, device="cuda")
    gen = lambda: torch.Generator(device="cuda").manual_seed(7)  # noqa: E731
    y = ops.lora_linear(torch.ones(300, 257, device="cuda"), torch.zeros(257, 257, device="cuda"), None,
                        eye, eye, 1.0, 0.25, gen())
    keep = y != 0
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    x = torch.randn(300, 257, device="cuda", requires_grad=True)
    W, b = torch.randn(100, 257, device="cuda"), torch.randn(100, device="cuda")
    A = torch.randn(8, 257, device="cuda", requires_grad=True)
    B = torch.randn(100, 8, device="cuda", requires_grad=True)
    y = ops.lora_linear(x, W, b, A, B, 0.9, 0.25, gen())
    dy = torch.randn_like(y)
    y.backward(dy)
    _check(y, (x.grad, A.grad, B.grad), _reference(x, W, b, A, B, 0.9, dy, keep, 0.25), 1e-5)

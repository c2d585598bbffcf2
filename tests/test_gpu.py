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
@pytest.mark.parametrize("design", ["fused", "hybrid"])
def test_triton_kernels_on_cuda_match_float64(dtype, adt, r, tol, design):
    """The Triton path itself (forced), at a size where the Hopper tiles and the partial reductions engage."""
    from test_lora_linear_triton import _reference, ops
    if dtype == torch.float32 and design == "fused":
        pytest.skip("exact fp32 runs the hybrid design (the fused 'ieee' GEMM is not a shipped path)")
    lk.set_backend("triton")
    lk.set_design(design)
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


def test_without_a_measurement_cuda_takes_the_cublas_path(tmp_path, monkeypatch):
    from lorakern.ops import dispatch
    from test_lora_linear_triton import ops
    monkeypatch.setenv("LORAKERN_CACHE_DIR", str(tmp_path))
    dispatch.reload()
    x = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(80, 96, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(8, 96, device="cuda", dtype=torch.bfloat16)
    assert ops._choose(x, W, A, 0.0) is ops._TORCH
    dispatch.reload()


def _dropout_layer():
    layer = lk.LoRALinear(256, 128, r=8, dropout=0.3, dtype=torch.bfloat16).cuda()
    torch.nn.init.normal_(layer.lora_B)
    return layer


def test_dropout_in_a_cuda_graph_draws_a_fresh_mask_each_replay():
    lk.set_backend("triton")
    layer = _dropout_layer()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compiles the kernels and creates the device RNG state
            layer(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    outs = []
    for _ in range(3):
        graph.replay()
        outs.append(y.clone())
    torch.cuda.synchronize()
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_dropout_masks_follow_torch_manual_seed_on_cuda():
    lk.set_backend("triton")
    layer = _dropout_layer()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(3)
    first = [layer(x) for _ in range(2)]
    torch.manual_seed(3)
    again = [layer(x) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(*first)


@pytest.mark.parametrize("design", ["fused", "hybrid"])
def test_adapter_gradients_are_bitwise_reproducible_on_cuda(design):
    lk.set_backend("triton")
    lk.set_design(design)
    layer = randomize_adapter(lk.LoRALinear(1000, 777, r=16, dtype=torch.bfloat16)).cuda()
    x = torch.randn(2053, 1000, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(2053, 777, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        layer.zero_grad()
        layer(x).backward(dy)
        grads.append((layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])

"""The fused Triton path of lk.optim against the torch engine (under TRITON_INTERPRET=1 on the CPU)."""
import pytest
import torch

import lorakern as lk
from lorakern.optim import optimizers
from lorakern.optim.torch_engine import TorchEngine
from conftest import TOL, rel_err

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (in, out, r): odd sizes; r = 1, 3, 16 and 40 (padded to 16, 16, 16, 64); 300/270 rows span several tiles
SHAPES = [(45, 37, 16), (23, 19, 3), (50, 33, 1), (300, 270, 3), (70, 90, 40)]


def make_layers(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, o, r in SHAPES:
        layer = lk.LoRALinear(i, o, r=r, device=DEVICE, dtype=torch.float32, adapter_dtype=dtype)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(r, i, generator=g) / i ** 0.5)
            layer.lora_B.copy_(torch.randn(o, r, generator=g) * 0.5)
        layers.append(layer)
    return layers


def run(backend, dtype, cls, steps=3, **kw):
    """Parameters after `steps` steps with fixed random gradients; on step 2 one A and one B have no grad."""
    lk.set_backend(backend)
    layers = make_layers(dtype)
    opt = cls(layers, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, l in enumerate(layers):
            gA = torch.randn(l.lora_A.shape, generator=g).to(DEVICE, dtype)
            gB = torch.randn(l.lora_B.shape, generator=g).to(DEVICE, dtype)
            l.lora_A.grad = None if (step == 1 and i == 0) else gA
            l.lora_B.grad = None if (step == 1 and i == 1) else gB
        opt.step()
    return [t.detach().clone() for l in layers for t in (l.lora_A, l.lora_B)]


@pytest.fixture
def count_fused_updates(monkeypatch):
    """Counts the fused engine's non-empty updates and fails if the torch engine updates a LoRA factor instead."""
    calls = {"fused": 0}
    engine = optimizers._fused_engine()
    real = type(engine).update

    def fused(self, batch, P, hyper):
        calls["fused"] += len(batch) > 0
        return real(self, batch, P, hyper)

    def torch_update(self, batch, P, hyper):
        if batch.kind != "plain" and lk.get_backend() == "triton":
            raise AssertionError("the torch engine ran although the fused path was selected")
        return TorchEngine.__dict__["update"](self, batch, P, hyper)

    monkeypatch.setattr(type(engine), "update", fused)
    monkeypatch.setattr(optimizers._TORCH_ENGINE, "update", torch_update.__get__(optimizers._TORCH_ENGINE))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("order", ["jacobi", "gauss-seidel"])
@pytest.mark.parametrize("normalize", [None, "fro"])
@pytest.mark.parametrize("method", ["adamw", "scaledgd"])
def test_fused_matches_torch_engine(dtype, order, normalize, method, count_fused_updates):
    if method == "adamw":
        cls, kw = lk.optim.PreconditionedAdamW, dict(lr=1e-2, damping=1e-3, weight_decay=0.05)
    else:
        cls, kw = lk.optim.ScaledGD, dict(lr=0.05, damping=0.0, weight_decay=0.1)
    kw.update(order=order, normalize=normalize)
    expected = run("torch", dtype, cls, **kw)
    start = [t.detach().clone() for l in make_layers(dtype) for t in (l.lora_A, l.lora_B)]
    got = run("triton", dtype, cls, **kw)
    n_buckets = len({r for _, _, r in SHAPES})  # one bucket per rank
    # steps x (A factors, B factors) x buckets, less step 2's A update of the r=16 bucket (its one A has no grad)
    assert count_fused_updates["fused"] == 3 * 2 * n_buckets - 1
    for e, g, s in zip(expected, got, start):
        assert torch.isfinite(g).all()
        assert rel_err(g, e) < TOL[dtype] * rel_err(e, s)  # relative to how far the step moved the factor


def test_fused_fp16_adapters(count_fused_updates):
    kw = dict(lr=1e-2, damping=1e-3, order="gauss-seidel")
    expected = run("torch", torch.float16, lk.optim.PreconditionedAdamW, **kw)
    start = [t.detach().clone() for l in make_layers(torch.float16) for t in (l.lora_A, l.lora_B)]
    got = run("triton", torch.float16, lk.optim.PreconditionedAdamW, **kw)
    assert count_fused_updates["fused"] > 0
    for e, g, s in zip(expected, got, start):
        assert rel_err(g, e) < TOL[torch.float16] * rel_err(e, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gram_kernel_writes_every_entry(dtype):
    engine = optimizers._fused_engine()
    layers = make_layers(dtype)
    Bs, As = [l.lora_B.detach() for l in layers if l.r == 3], [l.lora_A.detach() for l in layers if l.r == 3]
    out = torch.full((len(Bs) + len(As), 3, 3), float("nan"), device=DEVICE)
    engine.grams(Bs, As, 3, out=out)
    assert rel_err(out, TorchEngine().grams(Bs, As, 3)) < 1e-6


@pytest.mark.parametrize("damping", [0.0, 1e-6])
def test_fused_standard_init_b_zero_is_finite(damping, count_fused_updates):
    lk.set_backend("triton")
    torch.manual_seed(0)
    layer = lk.LoRALinear(29, 23, r=3, device=DEVICE, adapter_dtype=torch.bfloat16)  # B = 0
    x = torch.randn(8, 29, device=DEVICE)
    opt = lk.optim.PreconditionedAdamW([layer], lr=1e-2, damping=damping, normalize="fro")
    A0 = layer.lora_A.detach().clone()
    layer(x).float().pow(2).mean().backward()
    layer.lora_B.grad.normal_()  # the loss above has zero grad_B too (B = 0 and y ~ x W^T): make it non-zero
    opt.step()
    assert count_fused_updates["fused"] == 2
    assert torch.equal(layer.lora_A.detach(), A0)  # its gradient was zero
    assert torch.isfinite(layer.lora_B).all() and layer.lora_B.detach().abs().max() > 0


def test_non_contiguous_factors_fall_back_to_the_torch_engine():
    lk.set_backend("triton")
    layer = make_layers(torch.float32)[1]
    layer.lora_A = torch.nn.Parameter(layer.lora_A.detach().t().contiguous().t())  # (r, in) with transposed strides
    assert not layer.lora_A.is_contiguous()
    twin_A, twin_B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    gA, gB = torch.randn_like(twin_A), torch.randn_like(twin_B)
    layer.lora_A.grad, layer.lora_B.grad = gA, gB
    lk.optim.ScaledGD([layer], lr=0.1, damping=1e-3).step()
    P_A = torch.linalg.inv(twin_B.T @ twin_B + 1e-3 * torch.eye(3))
    P_B = torch.linalg.inv(twin_A @ twin_A.T + 1e-3 * torch.eye(3))
    assert rel_err(layer.lora_A, twin_A - 0.1 * P_A @ gA) < 1e-5
    assert rel_err(layer.lora_B, twin_B - 0.1 * gB @ P_B) < 1e-5

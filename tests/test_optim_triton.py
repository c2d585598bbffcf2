"""The fused Triton path of lk.optim against the torch engine (under TRITON_INTERPRET=1 on the CPU)."""
import math

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


def _transposed_layout(t):
    """The same values with column-major strides: a non-contiguous gradient (e.g. from a transposed matmul)."""
    out = t.t().contiguous().t()
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def run(backend, dtype, cls, steps=3, noncontiguous_grads=False, **kw):
    """Parameters after `steps` steps with fixed random gradients; on step 2 one A and one B have no grad."""
    lk.set_backend(backend)
    layers = make_layers(dtype)
    opt = cls(layers, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, l in enumerate(layers):
            gA = torch.randn(l.lora_A.shape, generator=g).to(DEVICE, dtype)
            gB = torch.randn(l.lora_B.shape, generator=g).to(DEVICE, dtype)
            if noncontiguous_grads and l.r > 1:  # (r=1 factors stay contiguous whatever the strides)
                gA, gB = _transposed_layout(gA), _transposed_layout(gB)
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


@pytest.mark.parametrize("method", ["adamw", "scaledgd"])
def test_non_contiguous_gradients_are_made_contiguous_for_the_kernel(method, count_fused_updates):
    if method == "adamw":
        cls, kw = lk.optim.PreconditionedAdamW, dict(lr=1e-2, damping=1e-3, weight_decay=0.05)
    else:
        cls, kw = lk.optim.ScaledGD, dict(lr=0.05, damping=0.0)
    expected = run("torch", torch.float32, cls, **kw)
    start = [t.detach().clone() for l in make_layers(torch.float32) for t in (l.lora_A, l.lora_B)]
    got = run("triton", torch.float32, cls, noncontiguous_grads=True, **kw)
    assert count_fused_updates["fused"] > 0
    for e, g, s in zip(expected, got, start):
        assert rel_err(g, e) < TOL[torch.float32] * rel_err(e, s)


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_non_contiguous_factors_fall_back_to_the_torch_engine(factor):
    lk.set_backend("triton")
    layer = make_layers(torch.float32)[1]
    setattr(layer, factor, torch.nn.Parameter(_transposed_layout(getattr(layer, factor).detach())))
    twin_A, twin_B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    gA, gB = torch.randn_like(twin_A), torch.randn_like(twin_B)
    layer.lora_A.grad, layer.lora_B.grad = gA, gB
    lk.optim.ScaledGD([layer], lr=0.1, damping=1e-3).step()
    P_A = torch.linalg.inv(twin_B.T @ twin_B + 1e-3 * torch.eye(3))
    P_B = torch.linalg.inv(twin_A @ twin_A.T + 1e-3 * torch.eye(3))
    assert rel_err(layer.lora_A, twin_A - 0.1 * P_A @ gA) < 1e-5
    assert rel_err(layer.lora_B, twin_B - 0.1 * gB @ P_B) < 1e-5


def _fp64_first_step(A, B, gA, gB, lr, damping, weight_decay, adam):
    """One Jacobi step from (A, B) in float64: P = (Gram + damping I)^-1, then AdamW's first step (bias
    corrected: m_hat = P g, sqrt(v_hat) = |P g|) or SGD."""
    A, B, gA, gB = (t.detach().double().cpu() for t in (A, B, gA, gB))
    eye = torch.eye(A.shape[0], dtype=torch.float64)
    pgA = torch.linalg.solve(B.T @ B + damping * eye, gA)
    pgB = torch.linalg.solve(A @ A.T + damping * eye, gB.T).T
    return [X * (1 - lr * weight_decay) - lr * (g / (g.abs() + 1e-8) if adam else g)
            for X, g in ((A, pgA), (B, pgB))]


@pytest.mark.parametrize("method", ["adamw", "scaledgd"])
def test_fused_fp32_step_agrees_with_the_float64_step(method, count_fused_updates):
    """One fused step on fp32 factors at four ranks (four buckets, r up to 40 padded to 64): within 1e-6 of
    the same step in float64 (the kernels' Grams and P grad products are float64, the update fp32)."""
    lk.set_backend("triton")
    layers = make_layers(torch.float32)
    lr, damping, wd = (1e-2, 1e-4, 0.05) if method == "adamw" else (0.2, 1e-4, 0.05)
    cls = lk.optim.PreconditionedAdamW if method == "adamw" else lk.optim.ScaledGD
    opt = cls(layers, lr=lr, damping=damping, weight_decay=wd)
    g = torch.Generator().manual_seed(7)
    expected = []
    for l in layers:
        gA, gB = torch.randn(l.lora_A.shape, generator=g), torch.randn(l.lora_B.shape, generator=g)
        expected.append(_fp64_first_step(l.lora_A, l.lora_B, gA, gB, lr, damping, wd, method == "adamw"))
        l.lora_A.grad, l.lora_B.grad = gA.to(DEVICE), gB.to(DEVICE)
    opt.step()
    assert count_fused_updates["fused"] == 2 * len({r for _, _, r in SHAPES})
    for l, (A, B) in zip(layers, expected):
        assert rel_err(l.lora_A.cpu(), A) < 1e-6 and rel_err(l.lora_B.cpu(), B) < 1e-6


def _target(m, n, r, cond, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)) @ V.T


def test_fused_nystrom_unit_step_recovers_the_target_at_fp32_rounding(count_fused_updates):
    """test_optim's one-step recovery on the fused path: float64 Grams (fp64 tl.dot) and a float64 P grad
    product in the update kernel. With fp32 Grams or an fp32 P grad product, seeds miss by up to 0.4."""
    lk.set_backend("triton")
    u = torch.finfo(torch.float32).eps / 2
    for seed in range(20):
        M = _target(40, 33, 5, 10.0, seed)
        layer = lk.LoRALinear(33, 40, r=5, alpha=5, device=DEVICE)
        A, B = lk.init.nystrom(M.float(), 5, xi=1.0, generator=torch.Generator().manual_seed(seed + 3))
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        cond_B = torch.linalg.cond(B.double()).item()
        opt = lk.optim.ScaledGD([layer], lr=1.0, damping=0.0)
        (0.5 * ((layer.lora_B @ layer.lora_A - M.float().to(DEVICE)) ** 2).sum()).backward()
        opt.step()
        assert rel_err(layer.delta_weight().cpu(), M) < 4 * u * cond_B, (seed, cond_B)  # see test_optim's
    assert count_fused_updates["fused"] == 2 * 20  # A's and B's (a zero step: A = 0 gives P_B = 0) updates


def _fp32_scalar_launches(monkeypatch):
    """Emulates the GPU launcher under the interpreter: Python float kernel arguments become fp32."""
    import numpy as np
    from lorakern.optim import precond_triton

    class Fp32Args:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def call(*args, **kw):
                args = [float(np.float32(a)) if type(a) is float else a for a in args]
                return launch(*args, **kw)
            return call

    monkeypatch.setattr(precond_triton, "_update_kernel", Fp32Args(precond_triton._update_kernel))


@pytest.mark.parametrize("beta2", [0.999, 0.99999])
def test_fused_coefficients_survive_fp32_kernel_arguments(beta2, monkeypatch):
    """1 - beta2 must come from the host in float64: formed in the kernel from an fp32 beta2 = 0.99999 it is
    off by 0.6%, and the fused step leaves the reference by 7e-4 of its movement."""
    kw = dict(lr=1e-3, betas=(0.9, beta2), damping=1e-3, weight_decay=1e-4)
    expected = run("torch", torch.float32, lk.optim.PreconditionedAdamW, **kw)
    start = [t.detach().clone() for l in make_layers(torch.float32) for t in (l.lora_A, l.lora_B)]
    _fp32_scalar_launches(monkeypatch)
    got = run("triton", torch.float32, lk.optim.PreconditionedAdamW, **kw)
    for e, g, s in zip(expected, got, start):
        assert rel_err(g, e) < TOL[torch.float32] * rel_err(e, s)


def test_launches_run_under_the_tensors_cuda_device(monkeypatch):
    from lorakern.optim import precond_triton
    guard = precond_triton.device_guard(torch.device("cuda", 1))  # no CUDA call until entered
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(precond_triton.device_guard(torch.device("cpu")), torch.cuda.device)
    seen = []
    real = precond_triton.device_guard

    def recording(device):
        seen.append(device)
        return real(device)

    launches = {"n": 0}
    for name in ("_gram_kernel", "_update_kernel"):
        kernel = getattr(precond_triton, name)

        class Checked:
            def __init__(self, k):
                self.k = k

            def __getitem__(self, grid):
                launch = self.k[grid]

                def call(*a, **kw):
                    launches["n"] += 1
                    assert len(seen) == launches["n"]  # entered right before this launch
                    return launch(*a, **kw)
                return call
        monkeypatch.setattr(precond_triton, name, Checked(kernel))
    monkeypatch.setattr(precond_triton, "device_guard", recording)
    run("triton", torch.float32, lk.optim.PreconditionedAdamW, steps=1, lr=1e-2)
    assert launches["n"] == 4 * len({r for _, _, r in SHAPES}) and set(seen) == {DEVICE}


def test_address_tables_are_cached_and_uploaded_once(monkeypatch):
    """Steady state (same parameters, state and gradient tensors): no table is built or uploaded; a new
    gradient address rebuilds one table, in one upload; per-factor bias corrections only when steps differ."""
    from lorakern.optim import precond_triton
    lk.set_backend("triton")
    layers = make_layers(torch.float32)
    opt = lk.optim.PreconditionedAdamW(layers, lr=1e-2, damping=1e-3)
    grads = [(torch.randn_like(l.lora_A), torch.randn_like(l.lora_B)) for l in layers]
    for l, (gA, gB) in zip(layers, grads):
        l.lora_A.grad, l.lora_B.grad = gA, gB
    optimizers._fused_engine().tables.clear()  # other tests' tensors may have held these addresses
    uploads = []
    real = precond_triton.upload
    monkeypatch.setattr(precond_triton, "upload", lambda host, device: uploads.append(host) or real(host, device))
    opt.step()
    n_buckets = len({r for _, _, r in SHAPES})
    assert len(uploads) == 2 * 3 * n_buckets  # per bucket: 2 Gram tables, 2 tile tables, 2 factor tables
    uploads.clear()
    opt.step()
    opt.step()
    assert uploads == []  # the bias corrections changed, but they are kernel arguments
    layers[0].lora_A.grad = grads[0][0].clone()  # a new address in the r = 16 bucket
    opt.step()
    assert len(uploads) == 1 and uploads[0].shape == (1, precond_triton.ROW)
    uploads.clear()
    layers[1].lora_B.grad = None  # r = 3 bucket: this B falls one step behind its partner in the bucket
    opt.step()
    layers[1].lora_B.grad = grads[1][1]
    opt.step()
    per_factor = [t for t in uploads if t.shape[0] == 2 and t[:, 5:].ne(0).any()]
    assert len(per_factor) == 1  # the B table of the r = 3 bucket now carries its two factors' own steps

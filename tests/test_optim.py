"""lk.optim on the CPU (torch engine): float64 references, the papers' claims, robustness, Optimizer semantics.

The references below are written independently of lorakern.optim, per pair and per step, in float64 and in
the textbook form (torch.linalg.solve / pinv, Adam with bias-corrected moments), so that a wrong Gauss-Seidel
order, a missing normalization or an off-by-one step count shows up as a mismatch.
"""
import copy
import io
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import lorakern as lk
from lorakern.optim import preconditioner
from conftest import TOL, rel_err

SHAPES = [(45, 37, 16), (23, 19, 3), (50, 33, 1)]  # (in, out, r): odd sizes, r in {1, 3, 16}


@pytest.fixture(autouse=True)
def _torch_backend():
    lk.set_backend("torch")


def make_layers(dtype=torch.float64, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, o, r in shapes:
        layer = lk.LoRALinear(i, o, r=r, alpha=r, dtype=dtype)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(r, i, generator=g, dtype=torch.float64) / math.sqrt(i))
            layer.lora_B.copy_(torch.randn(o, r, generator=g, dtype=torch.float64) * 0.5)
        layers.append(layer)
    return layers


def random_grads(layers, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(l.lora_A.shape, generator=g, dtype=torch.float64),
              torch.randn(l.lora_B.shape, generator=g, dtype=torch.float64)) for l in layers] for _ in range(steps)]


def set_grads(layers, grads):
    for l, (gA, gB) in zip(layers, grads):
        l.lora_A.grad = gA.to(l.lora_A.dtype).clone()
        l.lora_B.grad = gB.to(l.lora_B.dtype).clone()


class RefPreconditioned:
    """Per pair, float64: P = (Gram + damping I)^-1 (pinv if damping = 0), / ||P||_F for "fro"; AdamW or SGD."""

    def __init__(self, pairs, lr, damping, normalize=None, order="jacobi", weight_decay=0.0, adam=True,
                 betas=(0.9, 0.999), eps=1e-8, bias_correction=True):
        self.pairs = [[A.detach().double().clone(), B.detach().double().clone()] for A, B in pairs]
        self.lr, self.damping, self.normalize, self.order, self.wd = lr, damping, normalize, order, weight_decay
        self.adam, self.betas, self.eps, self.bc = adam, betas, eps, bias_correction
        self.state = {}

    def precond(self, gram):
        M = gram + self.damping * torch.eye(gram.shape[0], dtype=gram.dtype)
        eye = torch.eye(len(M), dtype=M.dtype)
        P = torch.linalg.pinv(M, hermitian=True) if self.damping == 0 else torch.linalg.solve(M, eye)
        if self.normalize == "fro" and P.norm() > 0:
            P = P / P.norm()
        return P

    def update(self, key, p, g):
        if not self.adam:
            return p * (1 - self.lr * self.wd) - self.lr * g
        st = self.state.setdefault(key, {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        b1, b2 = self.betas
        st["t"] += 1
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        m_hat, v_hat = st["m"], st["v"]
        if self.bc:
            m_hat, v_hat = m_hat / (1 - b1 ** st["t"]), v_hat / (1 - b2 ** st["t"])
        return p * (1 - self.lr * self.wd) - self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def step(self, grads):
        for i, (gA, gB) in enumerate(grads):
            A, B = self.pairs[i]
            if gA is not None:
                A_new = self.update((i, "A"), A, self.precond(B.T @ B) @ gA.double())
            else:
                A_new = A
            A_for_B = A_new if self.order == "gauss-seidel" else A
            if gB is not None:
                self.pairs[i][1] = self.update((i, "B"), B, gB.double() @ self.precond(A_for_B @ A_for_B.T))
            self.pairs[i][0] = A_new


def max_pair_err(layers, ref):
    return max(max(rel_err(l.lora_A, A), rel_err(l.lora_B, B)) for l, (A, B) in zip(layers, ref.pairs))


# -- step-for-step agreement with the float64 reference ------------------------------------------------------
@pytest.mark.parametrize("order", ["jacobi", "gauss-seidel"])
@pytest.mark.parametrize("normalize", [None, "fro"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_adamw_matches_float64_reference(order, normalize, bias_correction):
    layers = make_layers()
    kw = dict(lr=2e-2, damping=1e-3, normalize=normalize, order=order, weight_decay=0.05,
              bias_correction=bias_correction)
    opt = lk.optim.PreconditionedAdamW(layers, **kw)
    ref = RefPreconditioned([(l.lora_A, l.lora_B) for l in layers], **kw)
    start = [l.lora_B.detach().clone() for l in layers]
    for grads in random_grads(layers, 4):
        set_grads(layers, grads)
        opt.step()
        ref.step(grads)
        assert max_pair_err(layers, ref) < 1e-12
    assert all(rel_err(l.lora_B, b0) > 1e-2 for l, b0 in zip(layers, start))  # the step did move the factors


@pytest.mark.parametrize("order", ["jacobi", "gauss-seidel"])
@pytest.mark.parametrize("normalize", [None, "fro"])
def test_scaled_gd_matches_float64_reference_with_zero_damping(order, normalize):
    layers = make_layers()
    kw = dict(lr=0.3, damping=0.0, normalize=normalize, order=order, weight_decay=0.1)
    opt = lk.optim.ScaledGD(layers, **kw)
    ref = RefPreconditioned([(l.lora_A, l.lora_B) for l in layers], adam=False, **kw)
    for grads in random_grads(layers, 3):
        set_grads(layers, grads)
        opt.step()
        ref.step(grads)
        assert max_pair_err(layers, ref) < 1e-10


def test_jacobi_and_gauss_seidel_differ():
    """The two orders are different algorithms; if both ran Jacobi the reference tests could not tell."""
    out = {}
    for order in ("jacobi", "gauss-seidel"):
        layers = make_layers()
        opt = lk.optim.ScaledGD(layers, lr=0.3, order=order)
        set_grads(layers, random_grads(layers, 1)[0])
        opt.step()
        out[order] = layers[0].lora_B.detach().clone()
    assert rel_err(out["jacobi"], out["gauss-seidel"]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_adapters_track_the_float64_reference(dtype):
    layers = make_layers(torch.float32)
    for l in layers:
        l.lora_A.data = l.lora_A.data.to(dtype)
        l.lora_B.data = l.lora_B.data.to(dtype)
    kw = dict(lr=1e-2, damping=1e-3, order="gauss-seidel", weight_decay=0.05)
    opt = lk.optim.PreconditionedAdamW(layers, **kw)
    ref = RefPreconditioned([(l.lora_A, l.lora_B) for l in layers], **kw)
    for grads in random_grads(layers, 3):
        set_grads(layers, grads)
        opt.step()
        ref.step(grads)
    tol = TOL[dtype]
    assert max_pair_err(layers, ref) < tol
    for l in layers:  # state in fp32 whatever the adapter dtype
        assert opt.state[l.lora_A]["exp_avg"].dtype == torch.float32
        assert l.lora_A.dtype == dtype


def test_module_input_gives_other_params_plain_adamw():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(make_layers())
            self.gain = nn.Parameter(torch.randn(7, dtype=torch.float64))
            self.frozen = nn.Parameter(torch.randn(3, dtype=torch.float64), requires_grad=False)

    net = Net()
    twin = nn.Parameter(net.gain.detach().clone())
    opt = lk.optim.PreconditionedAdamW(net, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW([twin], lr=1e-2, weight_decay=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [6, 1]
    assert opt.param_groups[0]["lora_pairs"] and not opt.param_groups[1]["lora_pairs"]
    for _ in range(3):
        net.gain.grad = torch.randn(7, dtype=torch.float64)
        twin.grad = net.gain.grad.clone()
        opt.step()
        plain.step()
    assert rel_err(net.gain, twin) < 1e-12 and rel_err(net.gain, torch.zeros(7)) > 0


class _NetWithGain(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.blocks = nn.ModuleList(make_layers(dtype))
        self.gain = nn.Parameter(torch.randn(7, dtype=dtype))


@pytest.mark.parametrize("bias_correction", [True, False])
def test_plain_group_follows_bias_correction(bias_correction):
    """bias_correction applies to the plain group too (the reference code's AdamWr corrects neither)."""
    net = _NetWithGain()
    lr, (b1, b2), eps = 1e-2, (0.9, 0.99), 1e-8
    opt = lk.optim.PreconditionedAdamW(net, lr=lr, betas=(b1, b2), eps=eps, bias_correction=bias_correction)
    p = net.gain.detach().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    g = torch.Generator().manual_seed(3)
    for t in range(1, 4):
        grad = torch.randn(7, generator=g, dtype=torch.float64)
        net.gain.grad = grad.clone()
        opt.step()
        m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad * grad
        m_hat, v_hat = (m / (1 - b1 ** t), v / (1 - b2 ** t)) if bias_correction else (m, v)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
        assert rel_err(net.gain, p) < 1e-12, t


@pytest.mark.parametrize("cls", ["adamw", "sgd"])
def test_plain_group_of_mixed_dtypes_and_layouts(cls):
    """Other trainable parameters of fp32, fp64, a non-contiguous fp32 and bf16 in one plain group: each is
    updated as torch.optim.AdamW / SGD would (fused AdamW runs once per device and dtype)."""
    g = torch.Generator().manual_seed(0)
    net = nn.Module()
    net.blocks = nn.ModuleList(make_layers(torch.float32, shapes=[(23, 19, 3)]))
    values = {"w32": torch.randn(5, 7, generator=g), "w64": torch.randn(6, generator=g, dtype=torch.float64),
              "wt": torch.randn(7, 5, generator=g).t(), "w16": torch.randn(9, generator=g).bfloat16()}
    for name, v in values.items():
        setattr(net, name, nn.Parameter(v.clone()))
    assert not net.wt.is_contiguous()
    kw = dict(lr=1e-2, weight_decay=0.1)
    opt = (lk.optim.PreconditionedAdamW if cls == "adamw" else lk.optim.ScaledGD)(net, **kw)
    twins = {n: nn.Parameter(v.double()) for n, v in values.items()}  # float64 references
    ref = (torch.optim.AdamW(twins.values(), foreach=False, **kw) if cls == "adamw"
           else torch.optim.SGD(twins.values(), **kw))
    for _ in range(3):
        for n, twin in twins.items():
            grad = torch.randn(twin.shape, generator=g, dtype=torch.float64)
            getattr(net, n).grad = grad.to(values[n].dtype)
            twin.grad = grad.to(values[n].dtype).double()
        opt.step()
        ref.step()
    for n, twin in twins.items():
        p = getattr(net, n)
        assert p.dtype == values[n].dtype
        tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: TOL[torch.bfloat16]}[p.dtype]
        assert rel_err(p, twin) < tol, n


@pytest.mark.parametrize("cls", ["adamw", "sgd"])
def test_plain_group_reads_fp32_gradients_without_copying(cls, monkeypatch):
    from lorakern.optim import torch_engine
    net = _NetWithGain(torch.float32)
    opt = (lk.optim.PreconditionedAdamW if cls == "adamw" else lk.optim.ScaledGD)(net, lr=1e-2)
    seen = []
    for name in ("adamw_update_", "sgd_update_"):
        real = getattr(torch_engine, name)

        def spy(first, grads, hyper, *rest, _real=real):
            seen.append(grads)
            return _real(first, grads, hyper, *rest)
        monkeypatch.setattr(torch_engine, name, spy)
    net.gain.grad = torch.randn(7)
    grad = net.gain.grad.clone()
    opt.step()
    assert len(seen) == 1 and seen[0][0] is net.gain.grad  # the caller's tensor itself, no fp32 -> fp32 copy
    assert torch.equal(net.gain.grad, grad)  # and it is only read


@pytest.mark.parametrize("as_module", [True, False])
def test_frozen_lora_a_still_preconditions_lora_b(as_module):
    """LoRA-FA-style pairs (lora_A frozen): B is still optimized, preconditioned by A's Gram."""
    layers = make_layers()
    for l in layers:
        l.lora_A.requires_grad_(False)
    model = nn.Sequential(*layers) if as_module else layers
    damping = 1e-3
    opt = lk.optim.ScaledGD(model, lr=0.3, damping=damping)
    grads = random_grads(layers, 1)[0]
    before = [(l.lora_A.detach().clone(), l.lora_B.detach().clone()) for l in layers]
    for l, (_, gB) in zip(layers, grads):
        l.lora_B.grad = gB.clone()
    opt.step()
    for l, (A0, B0), (_, gB) in zip(layers, before, grads):
        eye = torch.eye(A0.shape[0], dtype=A0.dtype)
        assert torch.equal(l.lora_A.detach(), A0)
        assert rel_err(l.lora_B, B0 - 0.3 * gB @ torch.linalg.inv(A0 @ A0.T + damping * eye)) < 1e-12


@pytest.mark.parametrize("order", ["jacobi", "gauss-seidel"])
def test_host_synchronisations_per_step(order, monkeypatch):
    """damping > 0: none (no tensor is read on the host); damping = 0: one eigh per solve, and all ranks of
    the step share it (SHAPES has three ranks): one per step for Jacobi, two for Gauss-Seidel."""
    def no_host_read(self, *a, **kw):
        raise AssertionError("a tensor was read on the host during the step (a CUDA synchronisation)")

    calls = {"eigh": 0}
    real_eigh = torch.linalg.eigh

    def eigh(*a, **kw):
        calls["eigh"] += 1
        return real_eigh(*a, **kw)

    for damping in (1e-3, 0.0):
        layers = make_layers(torch.float32)
        opt = lk.optim.PreconditionedAdamW(layers, lr=1e-2, damping=damping, order=order)
        set_grads(layers, random_grads(layers, 1)[0])
        with monkeypatch.context() as mp:
            mp.setattr(torch.linalg, "eigh", eigh)
            if damping > 0:
                for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
                    mp.setattr(torch.Tensor, name, no_host_read)
            calls["eigh"] = 0
            opt.step()
        assert calls["eigh"] == (0 if damping > 0 else (1 if order == "jacobi" else 2))


def test_reference_code_order_and_no_bias_correction():
    """order="gauss-seidel", bias_correction=False, no decay: the reference code's AdamWr update exactly."""
    layers = make_layers()
    lr, b1, b2, eps, reg = 1e-2, 0.9, 0.98, 1e-6, 1e-6
    opt = lk.optim.PreconditionedAdamW(layers, lr=lr, betas=(b1, b2), eps=eps, damping=reg,
                                       order="gauss-seidel", bias_correction=False)
    A = layers[0].lora_A.detach().clone()
    B = layers[0].lora_B.detach().clone()
    m = {k: 0.0 for k in "AB"}
    v = {k: 0.0 for k in "AB"}
    for grads in random_grads(layers, 3):
        set_grads(layers, grads)
        opt.step()
        gA, gB = grads[0]
        gA = torch.inverse(B.T @ B + reg * torch.eye(B.shape[1], dtype=B.dtype)) @ gA
        m["A"], v["A"] = b1 * m["A"] + (1 - b1) * gA, b2 * v["A"] + (1 - b2) * gA * gA
        A = A - lr * m["A"] / (v["A"].sqrt() + eps)
        gB = gB @ torch.inverse(A @ A.T + reg * torch.eye(A.shape[0], dtype=A.dtype))  # the updated A
        m["B"], v["B"] = b1 * m["B"] + (1 - b1) * gB, b2 * v["B"] + (1 - b2) * gB * gB
        B = B - lr * m["B"] / (v["B"].sqrt() + eps)
    assert rel_err(layers[0].lora_A, A) < 1e-10 and rel_err(layers[0].lora_B, B) < 1e-10


# -- ScaledGD and the papers ------------------------------------------------------------------------------------
def _target(m, n, r, cond, seed):
    """An m x n matrix of exact rank r with singular values geometric from 1 to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T


def _nystrom_layer(M, r, dtype=torch.float64, seed=3):
    out_f, in_f = M.shape
    layer = lk.LoRALinear(in_f, out_f, r=r, alpha=r, dtype=dtype)  # scaling 1
    A, B = lk.init.nystrom(M.to(dtype), r, xi=1.0, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    return layer


def _factorization_loss_backward(layer, M):
    layer.zero_grad(set_to_none=True)
    loss = 0.5 * ((layer.lora_B @ layer.lora_A - M.to(layer.lora_A.dtype)) ** 2).sum()
    loss.backward()
    return loss


def test_scaled_gd_reproduces_eq5_iterate_for_iterate():
    """nystrom-init-nora.txt eq. (5), with X = lora_B (out, r) and Y = lora_A^T (in, r): X_1 = X_0 (skip)."""
    M = _target(31, 27, 4, cond=10.0, seed=0)
    layer = _nystrom_layer(M, 4)
    X, Y = layer.lora_B.detach().clone(), layer.lora_A.detach().T.clone()
    opt = lk.optim.ScaledGD([layer], lr=0.5, damping=0.0)
    for t in range(6):
        _factorization_loss_backward(layer, M)
        opt.step()
        R = X @ Y.T - M
        Y_next = Y - 0.5 * torch.linalg.solve(X.T @ X, (R.T @ X).T).T
        X_next = X if t == 0 else X - 0.5 * torch.linalg.solve(Y.T @ Y, (R @ Y).T).T
        X, Y = X_next, Y_next
        assert rel_err(layer.lora_B, X) < 1e-10 and rel_err(layer.lora_A, Y.T) < 1e-10, t
    assert rel_err(X @ Y.T, M) < 0.1  # and it is converging (quadratically from a Nystrom start)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nystrom_init_and_unit_step_recover_an_exact_rank_target_in_one_step(dtype):
    """20 seeds at cond(M) = 10. Nystrom's B = M Omega is itself ill-conditioned on some seeds (cond(B) up to
    8e3 here), and the step solves B^T B A = B^T M: its error is bounded per seed by the factors' rounding.
    fp32 factors: the Gram is float64 of fp32 numbers (exact products), so the step is as accurate as a
    backward-stable least-squares solve, c cond(B) u32 (measured c <= 0.8; with an fp32 Gram cond(B)^2 u32 is
    up to 4, and seeds miss by 0.27). fp64 factors: the fp64 Gram rounds, c cond(B)^2 u64 (measured c <= 0.5)."""
    u = torch.finfo(dtype).eps / 2
    for seed in range(20):
        M = _target(40, 33, 5, cond=10.0, seed=seed)
        layer = _nystrom_layer(M, 5, dtype, seed=seed + 3)
        assert layer.delta_weight().abs().max() == 0  # B A = 0 at init
        cond_B = torch.linalg.cond(layer.lora_B.detach().double()).item()
        opt = lk.optim.ScaledGD([layer], lr=1.0, damping=0.0)
        _factorization_loss_backward(layer, M)
        opt.step()
        tol = 4 * u * (cond_B if dtype == torch.float32 else cond_B ** 2)
        assert rel_err(layer.delta_weight(), M) < tol, (seed, cond_B)


def _iterations_to(cond, preconditioned, max_iter):
    """lora-one.txt linear model (NOTES claim 8), paper layout W (d, k) = our weight^T: d=60, k=50, N=6000,
    r = r* = 3, spectral init from G = Sigma_hat Delta, loss 1/2 tr((AB - Delta)^T Sigma_hat (AB - Delta))."""
    d, k, N, r = 60, 50, 6000, 3
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    Sigma = X.T @ X / N
    Delta = _target(d, k, r, cond, seed=2)
    U, S, Vh = torch.linalg.svd(Sigma @ Delta)
    layer = lk.LoRALinear(d, k, r=r, alpha=r, dtype=torch.float64)
    with torch.no_grad():  # paper A0 = U_r S^1/2 (d, r) -> lora_A = A0^T; B0 = S^1/2 V_r^T (r, k) -> lora_B = B0^T
        layer.lora_A.copy_((U[:, :r] * S[:r].sqrt()).T)
        layer.lora_B.copy_((S[:r].sqrt()[:, None] * Vh[:r]).T)
    eta = 0.4 if preconditioned else 0.2 / S[0].item()
    if preconditioned:
        opt = lk.optim.ScaledGD([layer], lr=eta)
    else:
        opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=eta)
    for t in range(max_iter):
        E = (layer.lora_B @ layer.lora_A).T - Delta  # paper AB - Delta
        if (E.norm() / Delta.norm()).item() < 1e-6:
            return t
        opt.zero_grad()
        (0.5 * (E * (Sigma @ E)).sum()).backward()
        opt.step()
    return max_iter


def test_preconditioned_iterations_are_flat_in_the_condition_number():
    prec = [_iterations_to(c, True, 400) for c in (1, 10, 100)]
    gd = [_iterations_to(c, False, 6000) for c in (1, 10, 100)]
    assert max(prec) <= 40 and max(prec) - min(prec) <= 3, prec  # NOTES: 26, 26, 26
    assert gd[0] < gd[1] < gd[2] < 6000 and gd[2] > 20 * gd[0], gd  # NOTES: 59, 486, 3642


def test_fro_normalization_never_enlarges_the_gradient():
    layers = make_layers()
    with torch.no_grad():
        layers[0].lora_B.mul_(1e-3)  # a tiny B: the raw preconditioner would amplify grad_A by ~1e6
    before = [l.lora_A.detach().clone() for l in layers]
    opt = lk.optim.ScaledGD(layers, lr=1.0, damping=1e-6, normalize="fro")
    grads = random_grads(layers, 1)[0]
    set_grads(layers, grads)
    opt.step()
    for l, a0, (gA, _) in zip(layers, before, grads):
        assert (l.lora_A.detach() - a0).norm() <= gA.norm() * (1 + 1e-12)


# -- robustness ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damping", [0.0, 1e-6])
@pytest.mark.parametrize("normalize", [None, "fro"])
@pytest.mark.parametrize("opt_cls", ["adamw", "sgd"])
def test_standard_init_b_zero_gives_finite_steps(damping, normalize, opt_cls):
    torch.manual_seed(0)
    layer = lk.LoRALinear(29, 23, r=3, dtype=torch.float32)  # kaiming A, B = 0
    x, y = torch.randn(16, 29), torch.randn(16, 23)
    cls = lk.optim.PreconditionedAdamW if opt_cls == "adamw" else lk.optim.ScaledGD
    opt = cls([layer], lr=1e-2, damping=damping, normalize=normalize)
    A0 = layer.lora_A.detach().clone()
    for step in range(3):
        opt.zero_grad()
        ((layer(x) - y) ** 2).mean().backward()
        if step == 0:
            assert layer.lora_A.grad.abs().max() == 0 and layer.lora_B.grad.abs().max() > 0
            opt.step()
            assert torch.equal(layer.lora_A.detach(), A0)  # zero gradient: unchanged
            assert layer.lora_B.detach().abs().max() > 0
        else:
            opt.step()
        assert torch.isfinite(layer.lora_A).all() and torch.isfinite(layer.lora_B).all()


def test_singular_gram_uses_the_pseudo_inverse():
    layer = make_layers(shapes=[(23, 19, 3)])[0]
    with torch.no_grad():
        layer.lora_B.zero_()
    gA = torch.randn(3, 23, dtype=torch.float64)
    layer.lora_A.grad = gA.clone()
    A0 = layer.lora_A.detach().clone()
    lk.optim.ScaledGD([layer], lr=0.1, damping=0.0).step()
    assert torch.equal(layer.lora_A.detach(), A0)  # pinv(0) = 0: nothing along directions B does not span
    layer.lora_A.grad = gA.clone()
    lk.optim.ScaledGD([layer], lr=0.1, damping=0.5).step()
    assert rel_err(layer.lora_A, A0 - 0.1 * gA / 0.5) < 1e-12  # damped: (0 + 0.5 I)^-1


def test_rank_deficient_gram_matches_pinv():
    layer = make_layers(shapes=[(23, 19, 3)])[0]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # rank-1 B: B^T B has rank 1 of 3
        u = torch.randn(19, 1, generator=g, dtype=torch.float64)
        layer.lora_B.copy_(u @ torch.randn(1, 3, generator=g, dtype=torch.float64))
    B = layer.lora_B.detach().clone()
    A0 = layer.lora_A.detach().clone()
    gA = torch.randn(3, 23, generator=g, dtype=torch.float64)
    layer.lora_A.grad = gA.clone()
    lk.optim.ScaledGD([layer], lr=0.1).step()
    assert rel_err(layer.lora_A, A0 - 0.1 * torch.linalg.pinv(B.T @ B) @ gA) < 1e-10


def test_damped_inverse_cholesky_fallback(monkeypatch):
    G = torch.randn(4, 5, 3, dtype=torch.float64)
    grams = G.mT @ G
    grams[2] = 0.0
    expected = torch.linalg.inv(grams + 1e-3 * torch.eye(3, dtype=torch.float64))
    assert rel_err(preconditioner.damped_inverse(grams, 1e-3), expected) < 1e-12
    real = torch.linalg.cholesky_ex
    calls = []

    def failing(M, **kw):  # pretend the (first) factorization of matrix 1 broke down
        L, info = real(M, **kw)
        if not calls:
            info = info.clone()
            info[1] = 2
        calls.append(1)
        return L, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    P = preconditioner.damped_inverse(grams, 1e-3)
    assert rel_err(P[[0, 2, 3]], expected[[0, 2, 3]]) < 1e-12  # the others keep their own factorization
    shifted = grams[1] + (1e-3 + 2.0 ** -26 * grams[1].trace()) * torch.eye(3, dtype=torch.float64)
    assert rel_err(P[1], torch.linalg.inv(shifted)) < 1e-12  # refactored with damping + sqrt(eps) trace
    assert rel_err(P[1], expected[1]) < 1e-5
    monkeypatch.undo()
    bad = grams.clone()
    bad[3, 0, 0] = float("nan")
    P = preconditioner.damped_inverse(bad, 1e-3)
    assert torch.isnan(P[3]).all() and torch.isfinite(P[:3]).all()
    P0 = preconditioner.damped_inverse(grams, 0.0, normalize="fro")
    assert torch.equal(P0[2], torch.zeros(3, 3, dtype=torch.float64)) and torch.isfinite(P0).all()
    assert torch.allclose(torch.linalg.matrix_norm(P0[[0, 1, 3]]), torch.ones(3, dtype=torch.float64))


def test_damping_below_the_rounding_level_stays_finite():
    """A rank-1 Gram of size 1e8 with damping 1e-300: the Cholesky breaks down (info != 0); the
    refactorization with the damping raised to sqrt(eps) trace is finite, bounded by 1/(sqrt(eps) trace) and
    still inverts the Gram along its range."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 1, generator=g, dtype=torch.float64) * 1e4
    grams = (u @ u.T)[None]
    assert torch.linalg.cholesky_ex(grams + 1e-300 * torch.eye(3, dtype=torch.float64)).info.item() != 0
    P = preconditioner.damped_inverse(grams, 1e-300)
    trace = grams[0].trace().item()
    assert torch.isfinite(P).all() and torch.linalg.matrix_norm(P[0], 2) <= 1.01 / (1.49e-8 * trace)
    direction = u / u.norm()
    assert (P[0] @ grams[0] @ direction - direction).norm() < 1e-6


def test_damped_inverses_batches_several_ranks_into_one_solve(monkeypatch):
    """Zero-padding to the largest rank changes nothing, and the stacks cost one eigh (one CUDA sync)."""
    g = torch.Generator().manual_seed(0)
    stacks = []
    for n, r in ((2, 3), (1, 16), (3, 1), (2, 5)):
        X = torch.randn(n, 20, r, generator=g, dtype=torch.float64)
        stacks.append(X.mT @ X)
    D = torch.diag(torch.tensor([1.0, 1, 1, 0, 0], dtype=torch.float64))
    stacks[3][0] = D @ stacks[3][0] @ D  # singular
    calls = {"eigh": 0}
    real = torch.linalg.eigh

    def eigh(*a, **kw):
        calls["eigh"] += 1
        return real(*a, **kw)

    for damping in (0.0, 1e-3):
        for normalize in (None, "fro"):
            expected = [preconditioner.damped_inverse(G, damping, normalize) for G in stacks]
            monkeypatch.setattr(torch.linalg, "eigh", eigh)
            calls["eigh"] = 0
            got = preconditioner.damped_inverses(stacks, damping, normalize)
            monkeypatch.undo()
            assert calls["eigh"] == (1 if damping == 0 else 0)
            for e, P in zip(expected, got):
                assert P.shape == e.shape and P.is_contiguous()
                assert rel_err(P, e) < 1e-10


def test_a_factor_without_grad_is_skipped():
    layers = make_layers()
    opt = lk.optim.PreconditionedAdamW(layers, lr=1e-2, order="gauss-seidel")
    ref = RefPreconditioned([(l.lora_A, l.lora_B) for l in layers], lr=1e-2, damping=1e-6, order="gauss-seidel")
    grads = random_grads(layers, 2)
    for step in grads:
        step[0] = (step[0][0], None)  # layer 0: B has no gradient
        step[1] = (None, step[1][1])  # layer 1: A has no gradient
        for l, (gA, gB) in zip(layers, step):
            l.lora_A.grad = None if gA is None else gA.clone()
            l.lora_B.grad = None if gB is None else gB.clone()
        opt.step()
        ref.step(step)
    assert max_pair_err(layers, ref) < 1e-12
    assert layers[0].lora_B not in opt.state and opt.state[layers[0].lora_A]["step"] == 2


def test_user_gradients_are_not_modified():
    layers = make_layers()
    set_grads(layers, random_grads(layers, 1)[0])
    before = [l.lora_A.grad.clone() for l in layers] + [l.lora_B.grad.clone() for l in layers]
    lk.optim.PreconditionedAdamW(layers, lr=1e-2).step()
    after = [l.lora_A.grad for l in layers] + [l.lora_B.grad for l in layers]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# -- the torch engine's layout: stacked chunks, factored products, fused AdamW ----------------------------------
# (in, out, r): four ranks (four buckets), repeated shapes (stacks of several factors), odd sizes
BUCKET_SHAPES = [(45, 37, 16), (45, 37, 16), (23, 19, 3), (37, 45, 16), (23, 19, 3), (50, 33, 1), (70, 90, 40),
                 (45, 37, 16), (23, 29, 3)]


@pytest.mark.parametrize("chunk_elems", [1 << 17, 700], ids=["one-stack-per-shape", "several-stacks"])
@pytest.mark.parametrize("order", ["jacobi", "gauss-seidel"])
@pytest.mark.parametrize("method", ["adamw", "scaledgd"])
def test_fp32_steps_agree_with_the_float64_reference(chunk_elems, order, method, monkeypatch):
    """fp32 adapters (Grams and solves in float64, products P grad in fp32 through P's factor W): within 1e-6
    of the float64 steps at four ranks, with one stack per shape or several (700 elements: some factors are a
    stack by themselves, others share one)."""
    from lorakern.optim import torch_engine
    monkeypatch.setattr(torch_engine, "CHUNK_ELEMS", chunk_elems)
    layers = make_layers(torch.float32, shapes=BUCKET_SHAPES, seed=4)
    if method == "adamw":
        cls, kw = lk.optim.PreconditionedAdamW, dict(lr=1e-2, damping=1e-4, weight_decay=0.05)
    else:
        cls, kw = lk.optim.ScaledGD, dict(lr=0.2, damping=0.0, weight_decay=0.05)
    kw["order"] = order
    opt = cls(layers, **kw)
    ref = RefPreconditioned([(l.lora_A, l.lora_B) for l in layers], adam=method == "adamw", **kw)
    for grads in random_grads(layers, 3, seed=2):
        grads = [(gA.float().double(), gB.float().double()) for gA, gB in grads]  # what the fp32 factors see
        set_grads(layers, grads)
        opt.step()
        ref.step(grads)
        assert max_pair_err(layers, ref) < 1e-6


@pytest.mark.parametrize("method", ["adamw", "scaledgd"])
def test_bf16_step_is_the_float64_step_rounded_once(method, monkeypatch):
    """bf16 adapters are updated in fp32 and rounded once: each entry is within one bf16 ulp of the float64
    step from the same (bf16) values, several stacks and buckets included."""
    from lorakern.optim import torch_engine
    monkeypatch.setattr(torch_engine, "CHUNK_ELEMS", 700)
    layers = make_layers(torch.float32, shapes=BUCKET_SHAPES, seed=5)
    for l in layers:
        l.lora_A.data, l.lora_B.data = l.lora_A.data.bfloat16(), l.lora_B.data.bfloat16()
    kw = dict(lr=1e-2, damping=1e-4, weight_decay=0.05) if method == "adamw" else dict(lr=0.2, damping=1e-4)
    opt = (lk.optim.PreconditionedAdamW if method == "adamw" else lk.optim.ScaledGD)(layers, **kw)
    ref = RefPreconditioned([(l.lora_A, l.lora_B) for l in layers], adam=method == "adamw", **kw)
    grads = [(gA.bfloat16().double(), gB.bfloat16().double()) for gA, gB in random_grads(layers, 1, seed=6)[0]]
    set_grads(layers, grads)
    opt.step()
    ref.step(grads)
    for l, (A, B) in zip(layers, ref.pairs):
        for got, want in ((l.lora_A, A), (l.lora_B, B)):
            assert got.dtype == torch.bfloat16
            ulp = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
            assert ((got.double() - want).abs() <= ulp).all()


@pytest.mark.parametrize("method", ["adamw", "scaledgd"])
def test_non_contiguous_factors_follow_the_float64_reference(method):
    """Column-major factors (e.g. a transposed checkpoint) are updated through contiguous copies for the fused
    kernel and written back in place."""
    layers = make_layers(seed=7)
    for l, name in zip(layers, ("lora_A", "lora_B", "lora_A")):
        t = getattr(l, name).detach()
        setattr(l, name, nn.Parameter(t.t().contiguous().t()))
        assert not getattr(l, name).is_contiguous() or min(t.shape) == 1
    kw = dict(lr=1e-2, damping=1e-3, weight_decay=0.05) if method == "adamw" else dict(lr=0.2, damping=1e-3)
    opt = (lk.optim.PreconditionedAdamW if method == "adamw" else lk.optim.ScaledGD)(layers, **kw)
    ref = RefPreconditioned([(l.lora_A, l.lora_B) for l in layers], adam=method == "adamw", **kw)
    for grads in random_grads(layers, 2, seed=8):
        set_grads(layers, grads)
        opt.step()
        ref.step(grads)
        assert max_pair_err(layers, ref) < 1e-12


def test_plan_chunks_groups_shapes_into_near_equal_stacks():
    from lorakern.optim.torch_engine import plan_chunks
    shapes = [(3, 10)] * 7 + [(5, 4)] + [(3, 10)] * 2 + [(200, 3)]
    chunks = plan_chunks(tuple(shapes), torch.device("cpu"), limit=100)
    covered = sorted(i for c in chunks for i in c.positions)
    assert covered == list(range(len(shapes)))  # every factor once
    by_shape = {}
    for c in chunks:
        assert all(shapes[i] == c.shape for i in c.positions)
        assert torch.equal(c.index, torch.tensor(c.positions))
        assert list(c.pick(list(range(100, 100 + len(shapes))))) == [100 + i for i in c.positions]
        by_shape.setdefault(c.shape, []).append(len(c.positions))
    assert by_shape == {(3, 10): [3, 3, 3], (5, 4): [1], (200, 3): [1]}  # 9 of 30 elements: 3 stacks of 3


def test_scratch_buffers_survive_growth_and_interleaved_optimizers(monkeypatch):
    """Two optimizers of different sizes share the engine's scratch: the larger one grows the buffers (the
    smaller one's cached stacks are dropped), and both still follow their float64 references."""
    from lorakern.optim import torch_engine
    monkeypatch.setattr(torch_engine, "CHUNK_ELEMS", 64)  # the scratch starts small and must grow
    small = make_layers(shapes=[(23, 19, 3)] * 2, seed=1)
    large = make_layers(shapes=[(70, 90, 40), (45, 37, 16)], seed=2)
    kw = dict(lr=1e-2, damping=1e-3)
    opts = [lk.optim.PreconditionedAdamW(small, **kw), lk.optim.PreconditionedAdamW(large, **kw)]
    refs = [RefPreconditioned([(l.lora_A, l.lora_B) for l in ls], **kw) for ls in (small, large)]
    steps = [random_grads(small, 2, seed=3), random_grads(large, 2, seed=4)]
    for t in range(2):
        for layers, opt, ref, grads in zip((small, large), opts, refs, steps):
            set_grads(layers, grads[t])
            opt.step()
            ref.step(grads[t])
            assert max_pair_err(layers, ref) < 1e-12


@pytest.mark.parametrize("damping", [0.0, 1e-3])
@pytest.mark.parametrize("normalize", [None, "fro"])
def test_damped_inverses_factor_form(damping, normalize):
    """factors=True gives W with W W^T = P for every stack (ranks padded together, a singular Gram included);
    the fp32 products the torch engine does with it are as accurate as float64 ones (test above)."""
    g = torch.Generator().manual_seed(1)
    stacks = []
    for n, r in ((2, 3), (1, 16), (3, 1), (2, 5)):
        X = torch.randn(n, 20, r, generator=g, dtype=torch.float64)
        stacks.append(X.mT @ X)
    D = torch.diag(torch.tensor([1.0, 1, 1, 0, 0], dtype=torch.float64))
    stacks[3][0] = D @ stacks[3][0] @ D
    Ps = preconditioner.damped_inverses(stacks, damping, normalize)
    Ws = preconditioner.damped_inverses(stacks, damping, normalize, factors=[True, True, False, True])
    for i, (P, W) in enumerate(zip(Ps, Ws)):
        assert W.shape == P.shape and W.is_contiguous()
        assert rel_err(W if i == 2 else W @ W.mT, P) < 1e-10
    single = preconditioner.damped_inverse(stacks[1], damping, normalize, factor=True)
    assert rel_err(single @ single.mT, Ps[1]) < 1e-10


# -- torch.optim.Optimizer semantics ----------------------------------------------------------------------------
def test_state_dict_round_trip_keeps_pairing_and_fp32_state():
    layers = make_layers(torch.float32)
    for l in layers:
        l.lora_A.data, l.lora_B.data = l.lora_A.data.bfloat16(), l.lora_B.data.bfloat16()
    opt = lk.optim.PreconditionedAdamW(layers, lr=1e-2, order="gauss-seidel", normalize="fro")
    grads = random_grads(layers, 4)
    for g in grads[:2]:
        set_grads(layers, g)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twins = copy.deepcopy(layers)
    opt2 = lk.optim.PreconditionedAdamW(twins, lr=5.0)  # hyperparameters come from the state dict
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.param_groups[0]["order"] == "gauss-seidel" and opt2.param_groups[0]["lr"] == 1e-2
    assert opt2.state[twins[0].lora_A]["exp_avg"].dtype == torch.float32
    for g in grads[2:]:
        set_grads(layers, g)
        set_grads(twins, g)
        opt.step()
        opt2.step()
    for a, b in zip(layers, twins):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


def test_load_state_dict_rejects_another_structure():
    layers = make_layers()
    src = lk.optim.PreconditionedAdamW(layers, lr=1e-2)
    set_grads(layers, random_grads(layers, 1)[0])
    src.step()
    permuted = lk.optim.PreconditionedAdamW(make_layers(shapes=[SHAPES[1], SHAPES[0], SHAPES[2]]), lr=1e-2)
    with pytest.raises(ValueError, match="shape"):  # same counts, but the pairs are in another order
        permuted.load_state_dict(src.state_dict())
    sd = src.state_dict()
    sd["param_groups"][0]["lora_pairs"] = False
    with pytest.raises(ValueError, match="lora_pairs"):
        lk.optim.PreconditionedAdamW(make_layers(), lr=1e-2).load_state_dict(sd)


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _same_state_dict(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state_dict(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state_dict(x, y) for x, y in zip(a, b))
    return a == b


def test_load_state_dict_checks_everything_before_modifying_anything():
    adamw_layers, sgd_layers, target_layers = make_layers(), make_layers(), make_layers()
    adamw = lk.optim.PreconditionedAdamW(adamw_layers, lr=1e-2)
    sgd = lk.optim.ScaledGD(sgd_layers, lr=0.3)
    target = lk.optim.PreconditionedAdamW(target_layers, lr=5e-3, order="gauss-seidel")
    for opt, ls in ((adamw, adamw_layers), (sgd, sgd_layers), (target, target_layers)):  # every one has state
        set_grads(ls, random_grads(ls, 1)[0])
        opt.step()
    target_sgd = lk.optim.ScaledGD(make_layers(), lr=0.7)
    bad_order = adamw.state_dict()
    bad_order["param_groups"][0]["order"] = "gs"
    no_order = adamw.state_dict()
    del no_order["param_groups"][0]["order"]
    cases = [
        (target, sgd.state_dict(), "not saved by a PreconditionedAdamW"),  # ScaledGD's: lacks betas, eps...
        (target_sgd, adamw.state_dict(), "not saved by a ScaledGD"),  # AdamW's: has betas and moments
        (target, bad_order, "order"),  # an invalid value: raised before the groups are replaced
        (target, no_order, "lacks"),
    ]
    for opt, sd, match in cases:
        before = _snapshot(opt)
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        assert _same_state_dict(_snapshot(opt), before)
    target.load_state_dict(adamw.state_dict())  # a compatible one still loads
    assert target.param_groups[0]["order"] == "jacobi" and target.param_groups[0]["lr"] == 1e-2


def test_lr_scheduler_drives_the_step():
    layers = make_layers(shapes=[(23, 19, 3)])
    opt = lk.optim.ScaledGD(layers, lr=0.2, damping=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    moves = []
    for grads in random_grads(layers, 1) * 2:  # the same gradient twice
        set_grads(layers, grads)
        a0 = layers[0].lora_A.detach().clone()
        opt.step()
        sched.step()
        moves.append((layers[0].lora_A.detach() - a0).norm().item())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)
    assert moves[1] / moves[0] == pytest.approx(0.1, rel=0.05)


def test_zero_grad_closure_and_clipping():
    torch.manual_seed(0)
    layer = lk.LoRALinear(29, 23, r=3, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()
    twin = copy.deepcopy(layer)
    x = torch.randn(8, 29, dtype=torch.float64)
    opt = lk.optim.PreconditionedAdamW([layer], lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = layer(x).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([layer.lora_A, layer.lora_B], 1e-3)
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    # the same step by hand on the twin: clipped gradients, then a step
    ref = lk.optim.PreconditionedAdamW([twin], lr=1e-2)
    twin(x).pow(2).mean().backward()
    torch.nn.utils.clip_grad_norm_([twin.lora_A, twin.lora_B], 1e-3)
    ref.step()
    assert torch.equal(layer.lora_A, twin.lora_A) and torch.equal(layer.lora_B, twin.lora_B)
    opt.zero_grad()
    assert layer.lora_A.grad is None
    a0 = layer.lora_A.detach().clone()
    opt.step()  # no gradients: nothing moves
    assert torch.equal(layer.lora_A, a0)


# -- bad input --------------------------------------------------------------------------------------------------
def test_bad_model_argument():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lk.optim.PreconditionedAdamW(3)
    with pytest.raises(TypeError, match="not parameters"):
        lk.optim.PreconditionedAdamW(make_layers()[0].parameters())
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        lk.optim.ScaledGD(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(ValueError, match="empty"):
        lk.optim.ScaledGD([])
    frozen = make_layers()[0]
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        lk.optim.ScaledGD([frozen])


@pytest.mark.parametrize("kw,exc,match", [
    (dict(damping=-1.0), ValueError, "damping"),
    (dict(damping=float("inf")), ValueError, "damping"),
    (dict(betas=(1.0, 0.9)), ValueError, r"betas\[0\]"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(order="gs"), ValueError, "order"),
    (dict(normalize="l2"), ValueError, "normalize"),
    (dict(lr="fast"), TypeError, "lr"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(eps=0.0), ValueError, "eps"),  # 0 / 0 where a preconditioned gradient is 0 (B = 0 at init)
    (dict(bias_correction="yes"), TypeError, "bias_correction"),
])
def test_bad_hyperparameters(kw, exc, match):
    with pytest.raises(exc, match=match):
        lk.optim.PreconditionedAdamW(make_layers(), **kw)


@pytest.mark.parametrize("cls,key,value,exc", [
    ("sgd", "order", "gs", ValueError),
    ("sgd", "normalize", "l2", ValueError),
    ("sgd", "damping", -1.0, ValueError),
    ("sgd", "lr", "fast", TypeError),
    ("adamw", "betas", (1.0, 0.9), ValueError),
    ("adamw", "eps", 0.0, ValueError),
    ("adamw", "bias_correction", 1, TypeError),
])
def test_invalid_value_set_after_construction_raises_at_step(cls, key, value, exc):
    """A value edited into param_groups later must not silently run another variant (order="gs" used to run
    Jacobi); step() validates every group before it modifies anything."""
    layers = make_layers()
    opt = (lk.optim.ScaledGD if cls == "sgd" else lk.optim.PreconditionedAdamW)(layers, lr=1e-2)
    set_grads(layers, random_grads(layers, 1)[0])
    before = [t.detach().clone() for l in layers for t in (l.lora_A, l.lora_B)]
    opt.param_groups[0][key] = value
    with pytest.raises(exc, match=key):
        opt.step()
    assert all(torch.equal(a, t) for a, t in zip(before, (t for l in layers for t in (l.lora_A, l.lora_B))))
    assert not opt.state


def test_bad_added_param_group_is_rejected():
    opt = lk.optim.ScaledGD(make_layers()[:1])
    extra = make_layers()[1]
    with pytest.raises(ValueError, match="pairs"):
        opt.add_param_group({"params": [extra.lora_A], "lora_pairs": True})
    with pytest.raises(ValueError, match=r"lora_A \(r, in\)"):
        opt.add_param_group({"params": [extra.lora_B, extra.lora_A], "lora_pairs": True})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [extra.lora_A, extra.lora_B], "lora_pairs": True, "lr": 0.1})
    assert len(opt.param_groups) == 2


def test_import_lorakern_does_not_import_the_triton_kernels():
    code = "import sys, lorakern; print('lorakern.optim.precond_triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

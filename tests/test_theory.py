"""lk.theory (rank-accuracy-gradient-flow.txt, lora-gd-convergence-rate.txt) and the two paper reproductions."""
import math
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

import lorakern as lk
from lorakern import theory

F64 = torch.float64
PAPERS = Path(__file__).resolve().parents[1] / "examples" / "papers"


# -- validation --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, exc, match", [
    (lambda: theory.eym_tail(torch.ones(3, 3), 1), ValueError, r"singular_values must be 1-D.*svdvals"),
    (lambda: theory.eym_tail([3.0, -1.0], 1), ValueError, "singular_values must be non-negative"),
    (lambda: theory.eym_tail([3.0, float("nan")], 1), ValueError, "singular_values must be finite"),
    (lambda: theory.eym_tail([], 0), ValueError, "singular_values must not be empty"),
    (lambda: theory.eym_tail("abc", 1), TypeError, "singular_values"),
    (lambda: theory.eym_tail([3.0, 1.0], 3), ValueError, r"r=3 must satisfy 0 <= r <= len\(singular_values\) = 2"),
    (lambda: theory.eym_tail([3.0, 1.0], -1), ValueError, "r=-1"),
    (lambda: theory.eym_tail([3.0, 1.0], 1.0), TypeError, "r must be an int"),
    (lambda: theory.eym_tail([3.0, 1.0], True), TypeError, "r must be an int"),
    (lambda: theory.eym_tail([3.0, 1.0], [1, 5]), ValueError, r"r\[1\]=5"),
    (lambda: theory.select_rank([3.0, 1.0], energy=0.0), ValueError, "energy must satisfy energy > 0"),
    (lambda: theory.select_rank([3.0, 1.0], energy=1.5), ValueError, "energy must satisfy .*<= 1"),
    (lambda: theory.select_rank([3.0, 1.0], energy="0.9"), TypeError, "energy must be a real number"),
    (lambda: theory.select_rank([3.0, 1.0], max_rank=0), ValueError, "max_rank=0"),
    (lambda: theory.expected_trace_sq_rel_err(8, 9), ValueError, r"r=9 must satisfy 1 <= r <= n = 8"),
    (lambda: theory.expected_trace_sq_rel_err(8, 0), ValueError, "r=0"),
    (lambda: theory.expected_trace_sq_rel_err(8.0, 2), TypeError, "n must be an int"),
    (lambda: theory.safe_step_size(0.5, 1.0, 1.0), ValueError, r"L must satisfy L >= 1.*Assumption 1"),
    (lambda: theory.safe_step_size(2.0, -1.0, 1.0), ValueError, "adapter_sq_norm must satisfy"),
    (lambda: theory.safe_step_size(2.0, 1.0, float("inf")), ValueError, "full_grad_norm must be finite"),
    (lambda: theory.safe_step_size(2.0, 1.0, 1.0, scaling=0.0), ValueError, "scaling must satisfy scaling > 0"),
    (lambda: theory.safe_step_size(torch.ones(2), 1.0, 1.0), TypeError, "L must be a real number"),
    (lambda: theory.convergence_bounds(10, 2.0, 1.0, 1.0, loss_lower_bound=2.0), ValueError, "loss_lower_bound"),
    (lambda: theory.convergence_bounds(0, 2.0, 1.0, 1.0), ValueError, "T=0"),
    (lambda: theory.trace_sq_coeffs(1.0, 0.0, 1.0), ValueError, r"x0_sq_norm must satisfy.*Assumption 2.5"),
    (lambda: theory.trace_sq_coeffs(-1.0, 1.0, 1.0), ValueError, "t must satisfy t >= 0"),
    (lambda: theory.trace_sq_coeffs(1.0, 1.0, 1.0, form="naive"), ValueError, "form must be"),
    (lambda: theory.trace_sq_coeffs(1.0, 1.0, 0.0, form="paper"), ValueError, "trace_w0 must be non-zero"),
    (lambda: theory.trace_sq_flow(torch.ones(3, 4), torch.ones(1, 3), 1.0), ValueError, "W0 must be a square"),
    (lambda: theory.trace_sq_flow(torch.eye(3), torch.ones(1, 4), 1.0), ValueError, r"X0 must be a 2-D \(r, 3\)"),
    (lambda: theory.trace_sq_flow(torch.eye(3), torch.zeros(1, 3), 1.0), ValueError, "Assumption 2.5"),
    (lambda: theory.trace_sq_rel_err(torch.zeros(2, 5)), ValueError, "X0 must be non-zero"),
    (lambda: theory.frobenius_spectral_flow([2.0, 1.0], [0.1], 1.0), ValueError, "x0 must be 1-D with"),
    (lambda: theory.DescentMonitor(warn="sometimes"), ValueError, "warn must be one of"),
    (lambda: theory.DescentMonitor().update(1.0, -0.1, 1.0), ValueError, "step_size must satisfy"),
    (lambda: theory.DescentMonitor().update(1.0, 0.1, -1.0), ValueError, "grad_sq_norm must be >= 0"),
    (lambda: theory.adapter_sq_norm([torch.nn.Linear(2, 2)]), TypeError, r"layers\[0\] must be a LoRALinear"),
    (lambda: theory.adapter_grad_sq_norm(lk.LoRALinear(4, 4, r=2)), ValueError, "backward"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_exported():
    assert "theory" in lk.__all__ and lk.theory is theory
    for name in ("eym_tail", "select_rank", "expected_trace_sq_rel_err", "safe_step_size", "DescentMonitor"):
        assert name in theory.__all__


# -- Eckart-Young-Mirsky ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, rank", [((12, 7), None), ((6, 15), None), ((10, 10), 4)])
def test_eym_tail_matches_truncated_svd(shape, rank):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, dtype=F64, generator=g)
    if rank is not None:  # rank-deficient: the tail beyond `rank` is zero
        W = torch.randn(shape[0], rank, dtype=F64, generator=g) @ torch.randn(rank, shape[1], dtype=F64, generator=g)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    ranks = list(range(len(S) + 1))
    curve = theory.eym_tail(S[torch.randperm(len(S), generator=g)], ranks)  # order does not matter
    for r in ranks:
        Wr = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        err2 = float((W - Wr).pow(2).sum())
        one = theory.eym_tail(S, r)
        assert isinstance(one.loss, float)
        assert one.residual_sq == pytest.approx(err2, rel=1e-10, abs=1e-20 * float(W.pow(2).sum()))
        assert one.loss == pytest.approx(err2 / 2, rel=1e-10, abs=1e-20 * float(W.pow(2).sum()))
        assert one.rel_err == pytest.approx(math.sqrt(err2) / float(W.norm()), rel=1e-10, abs=1e-9)
        assert float(curve.residual_sq[r]) == pytest.approx(one.residual_sq, rel=1e-12, abs=1e-300)
        # optimality: no other rank-r matrix does better (random rank-r competitors near W_r)
        if 0 < r < len(S):
            for _ in range(3):
                M = (U[:, :r] + 0.1 * torch.randn(shape[0], r, dtype=F64, generator=g)) @ torch.diag(S[:r]) @ Vh[:r]
                assert float((W - M).pow(2).sum()) >= one.residual_sq * (1 - 1e-12)
    assert float(curve.rel_err[0]) == pytest.approx(1.0) and float(curve.rel_err[-1]) == 0.0


def test_eym_tail_keeps_tiny_tails_and_zero_spectrum():
    tail = theory.eym_tail(torch.tensor([1e5, 1e-6]), 1)
    assert tail.residual_sq == pytest.approx(1e-12, rel=1e-12)  # total - head would cancel to 0
    assert tail.rel_err == pytest.approx(1e-11, rel=1e-10)
    assert theory.eym_tail([0.0, 0.0], 1) == (0.0, 0.0, 0.0)
    assert theory.eym_tail([5.0, 3.0], 0).rel_err == pytest.approx(1.0)


def test_select_rank_edge_cases():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0])
    assert theory.select_rank(s, 1.0) == 4  # the number of non-zero singular values
    assert theory.select_rank(s, 1e-9) == 1
    assert theory.select_rank(s, 16 / 30) == 1 and theory.select_rank(s, 16 / 30 + 1e-9) == 2  # boundary inclusive
    assert theory.select_rank(s[torch.randperm(6)], 0.9) == theory.select_rank(s, 0.9) == 3  # order-free
    assert theory.select_rank([1.0, 1.0, 1.0, 1.0], 0.5) == 2  # ties
    assert theory.select_rank([0.0, 0.0], 0.9) == 0  # zero target: no adapter needed
    assert theory.select_rank(s, 1.0, max_rank=2) == 2
    assert theory.select_rank([7.0], 0.3) == 1


def test_select_rank_agrees_with_eym_tail():
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        s = torch.rand(9, dtype=F64, generator=g) ** 3
        tol = float(torch.rand(1, generator=g)) * 0.9 + 0.05
        r = theory.select_rank(s, energy=1 - tol ** 2)
        rel = theory.eym_tail(s, list(range(10))).rel_err
        assert float(rel[r]) <= tol * (1 + 1e-12) and (r == 0 or float(rel[r - 1]) > tol)


# -- trace-squared closed forms ----------------------------------------------------------------------------------

def _rk4_trace_sq(W0, X0, t_end, h):
    """RK4 on (26)-(27): dY/dt = a X^T, dX/dt = a Y^T, a = Tr(W0 - Y X), from Y0 = 0."""
    def f(Y, X):
        a = torch.trace(W0) - torch.sum(Y * X.T)
        return a * X.T, a * Y.T
    Y, X = torch.zeros(X0.shape[1], X0.shape[0], dtype=F64), X0.clone()
    for _ in range(round(t_end / h)):
        k1 = f(Y, X)
        k2 = f(Y + h / 2 * k1[0], X + h / 2 * k1[1])
        k3 = f(Y + h / 2 * k2[0], X + h / 2 * k2[1])
        k4 = f(Y + h * k3[0], X + h * k3[1])
        Y = Y + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        X = X + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return Y, X


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_trace_sq_closed_form_solves_the_ode(sign):
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(8, 8, dtype=F64, generator=g)
    W0 = sign * W0 * torch.sign(torch.trace(W0))  # Tr(W0) has the sign under test
    X0 = 0.4 * torch.randn(2, 8, dtype=F64, generator=g)
    Y, X = theory.trace_sq_flow(W0, X0, 1.0)
    errs = []
    for h in (4e-3, 2e-3):
        Yn, Xn = _rk4_trace_sq(W0, X0, 1.0, h)
        errs.append(max(float((Yn - Y).abs().max()), float((Xn - X).abs().max())))
    assert errs[1] < 1e-9
    assert 10 < errs[0] / errs[1] < 22  # RK4's 4th order: the closed form is the exact solution
    c, z = float(torch.trace(W0)), float(X0.pow(2).sum())
    assert theory.trace_sq_residual(1.0, z, c) == pytest.approx(float(torch.trace(W0 - Y @ X)), rel=1e-12)
    assert theory.trace_sq_residual(0.0, z, c) == pytest.approx(c, rel=1e-15)


def test_trace_sq_stable_form_equals_printed_form_and_survives_overflow():
    z, c = 2.5, -1.7
    root = math.hypot(z, 2 * c)
    t = torch.linspace(0, 600 / root, 301, dtype=F64)  # sqrt(k1) t <= 600: sinh(sqrt(k1)(t + k2)) stays finite
    for fn in (theory.trace_sq_coeffs, lambda *a, **k: (theory.trace_sq_residual(*a, **k),)):
        stable, printed = fn(t, z, c), fn(t, z, c, form="paper")
        for s_, p_ in zip(stable, printed):
            assert torch.isfinite(p_).all()
            assert torch.allclose(s_, p_, rtol=1e-10, atol=1e-300)
    far = torch.tensor([800 / root, 2000 / root, 1e6, math.inf], dtype=F64)
    p_p, q_p = theory.trace_sq_coeffs(far, z, c, form="paper")
    assert not (torch.isfinite(p_p) & (p_p > 0)).any()  # the printed form is 0 or NaN out there
    p_s, q_s = theory.trace_sq_coeffs(far, z, c)
    p_inf = math.sqrt(z + root) / (math.sqrt(2) * math.sqrt(z))  # the corrected limits (NOTES A1.3)
    q_inf = math.sqrt(2) / (math.sqrt(z) * math.sqrt(z + root))
    assert torch.allclose(p_s, torch.full_like(p_s, p_inf), rtol=1e-14)
    assert torch.allclose(q_s, torch.full_like(q_s, q_inf), rtol=1e-14)
    assert p_inf * q_inf == pytest.approx(1 / z, rel=1e-14)
    assert theory.trace_sq_residual(math.inf, z, c) == 0.0
    # float32-scale overflow (sqrt(k1) t ~ 89) and extreme scales stay finite too
    p_big, q_big = theory.trace_sq_coeffs(1e3, 1e150, 1e150)
    assert math.isfinite(p_big) and math.isfinite(q_big) and p_big > 0


def test_trace_sq_limit_and_relative_error():
    g = torch.Generator().manual_seed(4)
    n, r = 9, 3
    W0 = torch.randn(n, n, dtype=F64, generator=g)
    X0 = torch.randn(r, n, dtype=F64, generator=g)
    Y, X = theory.trace_sq_flow(W0, X0, math.inf)
    lim = theory.trace_sq_limit(W0, X0)
    assert torch.allclose(Y @ X, lim, rtol=1e-13, atol=1e-13)
    assert float(torch.trace(W0 - lim)) == pytest.approx(0.0, abs=1e-12)  # zero final loss (Thm 2.7)
    U = theory.trace_sq_full_rank(W0, math.inf)
    R_direct = float((lim - U).norm() / U.norm())
    G = X0.T @ X0
    R_33 = math.sqrt(n * float(G.pow(2).sum()) - float(X0.pow(2).sum()) ** 2) / float(X0.pow(2).sum())
    assert theory.trace_sq_rel_err(X0) == pytest.approx(R_direct, rel=1e-12)
    assert theory.trace_sq_rel_err(X0) == pytest.approx(R_33, rel=1e-10)
    assert theory.trace_sq_rel_err(1e-3 * X0) == pytest.approx(R_33, rel=1e-12)  # independent of sigma
    # r = 1: R^2 = n - 1 exactly (NOTES A3.4)
    R1 = theory.trace_sq_rel_err(torch.randn(50, 1, n, dtype=F64, generator=g))
    assert torch.allclose(R1 ** 2, torch.full_like(R1, n - 1.0), rtol=1e-12)


@pytest.mark.parametrize("n, r", [(16, 2), (16, 5), (10, 10)])
def test_expected_rel_err_monte_carlo(n, r):
    """Mean of R^2 over N draws vs eq. (34): the CLT puts it within 4 standard errors except with probability
    ~6e-5 (the seed is fixed, so this is deterministic, and the margin is the statistically justified one)."""
    g = torch.Generator().manual_seed(5)
    draws = 4000
    R2 = theory.trace_sq_rel_err(torch.randn(draws, r, n, dtype=F64, generator=g)) ** 2
    se = float(R2.std()) / math.sqrt(draws)
    want = theory.expected_trace_sq_rel_err(n, r, squared=True)
    assert abs(float(R2.mean()) - want) < 4 * se
    assert float(R2.sqrt().mean()) <= theory.expected_trace_sq_rel_err(n, r) + 4 * se  # Jensen bound (35)
    assert want == pytest.approx((n * n + n - 2) / (n * r + 2))


def test_expected_rel_err_formula_values():
    assert theory.expected_trace_sq_rel_err(64, 8, squared=True) == pytest.approx(8.0895, abs=1e-4)  # NOTES table
    assert theory.expected_trace_sq_rel_err(64, 8) == pytest.approx(2.8442, abs=1e-4)
    vals = [theory.expected_trace_sq_rel_err(64, r) for r in range(1, 65)]
    assert all(a > b for a, b in zip(vals, vals[1:]))  # decreasing in r, and still ~1 at r = n
    assert vals[-1] == pytest.approx(1.0073, abs=1e-4)


def test_frobenius_spectral_flow_matches_rk4_and_eym():
    s = torch.tensor([3.0, 1.5, 0.2], dtype=F64)
    x0 = torch.tensor([0.1, -0.3, 0.05], dtype=F64)
    y, x = x0 * 0, x0.clone()  # scalar ODEs (46)-(47), RK4

    def f(y, x):
        return (s - y * x) * x, (s - y * x) * y
    h = 1e-3
    for _ in range(2000):
        k1 = f(y, x)
        k2 = f(y + h / 2 * k1[0], x + h / 2 * k1[1])
        k3 = f(y + h / 2 * k2[0], x + h / 2 * k2[1])
        k4 = f(y + h * k3[0], x + h * k3[1])
        y, x = y + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0]), x + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    y_c, x_c = theory.frobenius_spectral_flow(s, x0, 2.0)
    assert torch.allclose(y_c, y, atol=1e-10) and torch.allclose(x_c, x, atol=1e-10)
    y_inf, x_inf = theory.frobenius_spectral_flow(s, x0, math.inf)
    assert torch.allclose(y_inf * x_inf, s, rtol=1e-14)  # (51): y x -> s_i
    # many times at once; a zero x0 (Assumption 2.10 violated) stays at the saddle
    y_t, x_t = theory.frobenius_spectral_flow([2.0, 1.0], [0.0, 0.5], torch.tensor([0.0, 1.0, math.inf]))
    assert y_t.shape == (3, 2) and (y_t[:, 0] == 0).all() and (x_t[:, 0] == 0).all()
    assert torch.isfinite(y_t).all() and float(y_t[2, 1] * x_t[2, 1]) == pytest.approx(1.0)


# -- Mu & Klabjan ----------------------------------------------------------------------------------------------

def _lsq(gen, out_f=12, in_f=9, N=80):
    X = torch.randn(N, in_f, dtype=F64, generator=gen)
    W0 = torch.randn(out_f, in_f, dtype=F64, generator=gen) / 3
    Y = X @ (W0 + torch.randn(out_f, in_f, dtype=F64, generator=gen)).T
    L = max(1.0, float(torch.linalg.eigvalsh(X.T @ X / N).max()))
    return X, Y, W0, L


def _gd(layer, X, Y, L, steps, monitor, fixed_step=None):
    for _ in range(steps):
        out = layer(X)
        loss = (out - Y).pow(2).sum() / (2 * len(X))
        dY, gA, gB = torch.autograd.grad(loss, (out, layer.lora_A, layer.lora_B))
        eta = fixed_step or theory.safe_step_size(L, theory.adapter_sq_norm(layer), float((dY.T @ X).norm()),
                                                 scaling=layer.scaling)
        monitor.update(loss.detach(), eta, float(gA.pow(2).sum() + gB.pow(2).sum()))
        with torch.no_grad():
            layer.lora_A.sub_(eta * gA)
            layer.lora_B.sub_(eta * gB)
    with torch.no_grad():
        monitor.finish(float((layer(X) - Y).pow(2).sum() / (2 * len(X))))


@pytest.mark.parametrize("r, alpha, init_scale", [(3, 3, 0.0), (1, 1, 0.0), (3, 12, 0.0), (3, 3, 2.0)])
def test_descent_inequality_never_violated_under_rule_8(r, alpha, init_scale):
    g = torch.Generator().manual_seed(6)
    X, Y, W0, L = _lsq(g)
    layer = lk.LoRALinear(9, 12, r=r, alpha=alpha, bias=False, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(W0)
        if init_scale:  # large ||V0||, both factors non-zero
            layer.lora_A.normal_(0, init_scale, generator=g)
            layer.lora_B.normal_(0, init_scale, generator=g)
    v0 = theory.adapter_sq_norm(layer)
    mon = theory.DescentMonitor(rtol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", theory.DescentViolationWarning)
        _gd(layer, X, Y, L, 250, mon)
    assert mon.ok and mon.n_steps == 250 and min(mon.margins) >= 0
    assert mon.losses[-1] < mon.losses[0]
    # the bounds of Theorem 3 along the run
    T = mon.n_steps
    g2 = torch.tensor(mon.grad_sq_norms[:T], dtype=F64).cummin(0).values
    assert float(g2[-1]) <= mon.certificate()  # (10)
    b = theory.convergence_bounds(T, L, v0, mon.losses[0], scaling=layer.scaling)
    assert (g2 <= b.stationarity).all()  # (11)
    assert (torch.tensor(mon.step_sizes[:T], dtype=F64) >= b.step_size_floor * (1 - 1e-12)).all()


def test_monitor_warns_when_the_step_is_too_large():
    g = torch.Generator().manual_seed(6)
    X, Y, W0, L = _lsq(g)
    layer = lk.LoRALinear(9, 12, r=3, alpha=3, bias=False, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(W0)
    G = (layer(X) - Y).T.detach() @ X / len(X)  # gradient with respect to the full weight at init
    rule = theory.safe_step_size(L, theory.adapter_sq_norm(layer), float(G.norm()))
    mon = theory.DescentMonitor(rtol=1e-10)
    with pytest.warns(theory.DescentViolationWarning, match=r"violates the descent inequality \(9\)"):
        _gd(layer, X, Y, L, 60, mon, fixed_step=0.3)
    assert not mon.ok and len(mon.violations) > 0 and min(mon.margins) < 0
    assert 0.3 > 20 * rule  # deliberately far beyond rule (8)


def test_monitor_bookkeeping_and_warn_modes():
    # losses J_t, steps eta_t = 1, ||grad||^2 = 5 -> (9) demands J_{t+1} <= J_t - 1
    losses = [10.0, 9.0, 8.5, 8.2, 7.0, 6.5, float("nan")]  # steps 1, 2 violate; 3 ok; 4 violates; 5 (NaN) violates
    expected_warnings = {"streak": 2, "always": 4, "once": 1, "never": 0}
    for mode, n_warn in expected_warnings.items():
        mon = theory.DescentMonitor(warn=mode, rtol=0.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            margins = [mon.update(j, 1.0, 5.0) for j in losses[:-1]]
            margins.append(mon.finish(losses[-1]))
        assert sum(issubclass(w.category, theory.DescentViolationWarning) for w in caught) == n_warn, mode
        assert margins[0] is None and margins[1:] == pytest.approx([0.0, -0.5, -0.7, 0.2, -0.5, -math.inf])
        assert mon.violations == [1, 2, 4, 5] and mon.n_steps == 6 and not mon.ok
    assert mon.summary()["violations"] == 4
    with pytest.raises(RuntimeError):
        mon.update(1.0, 1.0, 1.0)
    # rtol absorbs rounding: a violation of 1e-9 J is tolerated with rtol 1e-8
    mon = theory.DescentMonitor(rtol=1e-8)
    mon.update(1.0, 0.0, 1.0)
    mon.finish(1.0 + 1e-9)
    assert mon.ok


def test_safe_step_size_rule_and_scaling_frame():
    L, v2, g = 2.0, 3.0, 4.0
    assert theory.safe_step_size(L, v2, g) == pytest.approx(1 / (5 * math.sqrt(2) * L * (v2 + g)))
    assert theory.safe_step_size(1.0, 0.0, 0.01) == 1.0  # the cap "min{.., 1}" of (8)
    assert theory.safe_step_size(1.0, 0.0, 0.0) == 1.0
    # GD with scaling s on factors (B, A) / sqrt(s) follows the scaling-1 trajectory of (B, A) exactly
    gen = torch.Generator().manual_seed(7)
    X, Y, W0, L = _lsq(gen)
    A0, B0 = torch.randn(3, 9, dtype=F64, generator=gen), torch.randn(12, 3, dtype=F64, generator=gen)
    layers = []
    for alpha, shrink in ((3, 1.0), (12, 2.0)):  # scaling 1 and 4
        layer = lk.LoRALinear(9, 12, r=3, alpha=alpha, bias=False, dtype=F64)
        with torch.no_grad():
            layer.weight.copy_(W0)
            layer.lora_A.copy_(A0 / shrink)
            layer.lora_B.copy_(B0 / shrink)
        _gd(layer, X, Y, L, 20, theory.DescentMonitor(rtol=1e-10))
        layers.append(layer)
    assert torch.allclose(layers[0].delta_weight(), layers[1].delta_weight(), rtol=1e-11, atol=1e-12)


def test_adapter_norm_helpers():
    model = torch.nn.Sequential(lk.LoRALinear(4, 5, r=2), torch.nn.ReLU(), lk.LoRALinear(5, 3, r=1))
    for m in model:
        if isinstance(m, lk.LoRALinear):
            torch.nn.init.normal_(m.lora_B)
    want = sum(float(p.detach().pow(2).sum()) for n_, p in model.named_parameters() if "lora_" in n_)
    assert theory.adapter_sq_norm(model) == pytest.approx(want)
    model(torch.randn(7, 4)).pow(2).sum().backward()
    want_g = sum(float(p.grad.pow(2).sum()) for n_, p in model.named_parameters() if "lora_" in n_)
    assert theory.adapter_grad_sq_norm(model) == pytest.approx(want_g)
    assert theory.adapter_grad_sq_norm([model[0], model[2]]) == pytest.approx(want_g)


# -- the reproduction scripts --------------------------------------------------------------------------------------

@pytest.fixture
def papers(monkeypatch):
    """examples/papers importable; a stand-in matplotlib when it is missing, so the plotting code still runs."""
    monkeypatch.syspath_prepend(str(PAPERS))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plt = mock.MagicMock(name="pyplot")
        plt.subplots.side_effect = lambda rows, cols, **kw: (
            mock.MagicMock(name="fig"),
            [[mock.MagicMock() for _ in range(cols)] for _ in range(rows)] if rows > 1
            else [mock.MagicMock() for _ in range(cols)])
        mpl = mock.MagicMock(name="matplotlib", pyplot=plt)
        monkeypatch.setitem(sys.modules, "matplotlib", mpl)
        monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    import importlib
    return importlib


def test_rank_accuracy_reproduction_quick(papers, tmp_path):
    res = papers.import_module("rank_accuracy_gradient_flow").main(quick=True, out=tmp_path)
    assert res["a1"]["max_err"] < 1e-6 and res["a1"]["max_err_a"] < 1e-6  # closed form = ODE solution
    for row in res["a1"]["far"][2:]:  # printed form broken beyond sqrt(k1) t ~ 710, stable form at the limit
        assert not (row[3] > 0) and row[2] == pytest.approx(res["a1"]["far"][0][2], rel=1e-6)
    for st in res["a2"]["stats"]:  # Monte Carlo within 4 standard errors of eq. (34)
        assert abs(st["mean_sq"] - st["theory"]) <= 4 * st["se"] + 1e-9 * st["theory"]
    theo = [st["theory"] for st in res["a2"]["stats"]]
    assert theo == sorted(theo, reverse=True)
    assert res["a2b"]["max_R_diff"] < 1e-8  # GD reaches (33)
    for d in res["a3"]["sweep"]:  # EYM limit (53) under spectral init
        assert d["spectral"] == pytest.approx(d["eym"], rel=1e-8) and d["sv_err"] < 1e-8
    eym = [d["eym"] for d in res["a3"]["sweep"]]
    assert eym == sorted(eym, reverse=True)
    for errs in list(res["a4"]["errs"].values()) + [res["a4"]["gaps"]]:  # O(alpha): halving alpha halves it
        assert 1.7 < errs[0] / errs[1] < 2.4
    assert res["a4"]["gaps"][0] < 0.5 * min(e[0] for e in res["a4"]["errs"].values())
    assert res["seconds"] > 0  # timed (a benchmark matter), never bounded here: CI machines are loaded


def test_convergence_rate_reproduction_quick(papers, tmp_path):
    res = papers.import_module("lora_gd_convergence_rate").main(quick=True, out=tmp_path)
    for name, rec in res["b1"]["runs"].items():
        assert rec["monitor"].ok and rec["monitor"].n_steps > 0, name
    assert all(res["b2"]["holds"].values()), res["b2"]["holds"]
    for bad in res["too_large"]:  # the monitor catches steps beyond rule (8)
        assert bad["monitor"].violations and bad["warnings"] >= 1
    assert res["seconds"] > 0  # timed (a benchmark matter), never bounded here: CI machines are loaded


def test_run_all_discovers_every_script(papers):
    run_all = papers.import_module("run_all")
    names = run_all.scripts()
    assert {"rank_accuracy_gradient_flow", "lora_gd_convergence_rate"} <= set(names)
    assert "run_all" not in names and not any(n.startswith("_") for n in names)
    for name in names:
        assert callable(getattr(papers.import_module(name), "main")), name

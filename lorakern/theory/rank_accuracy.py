"""Rank-accuracy trade-off of LoRA (rank-accuracy-gradient-flow.txt, Rushka & Klabjan).

Layouts: the paper's Y (n x r) and X (r x n or r x m) are lora_B and lora_A; its W0 is (n x m) = (out, in),
so Y X is the adapter product lora_B @ lora_A with scaling 1 (alpha = r). ||.|| is the Frobenius norm.

* Eckart-Young-Mirsky (Thm 2.11, eq. (53)-(54)): the best rank-r approximation of W keeps its top r singular
  values; `eym_tail` gives the remaining loss, `select_rank` the smallest rank reaching an energy fraction.
* Trace-squared objective (Sec. 2.2, App. C): the gradient flow of min 1/2 Tr^2(W0 - Y X) from Y0 = 0 has a
  closed form Y = q(t) c X0^T, X = p(t) X0 with c = Tr(W0) (eq. (28)-(29), (373)-(374)); the residual
  a(t) = Tr(W0 - Y X) is (313). The printed form overflows: sinh(sqrt(k1) (t + k2)) is inf once its argument
  passes ~710 in float64 (and 89 in float32), so p, q come out 0 or NaN. `form="stable"` (the default)
  rewrites everything in w = exp(-sqrt(k1) t) in [0, 1], which never overflows and tends to the exact limits
  p(inf), q(inf) (the NOTES' corrected forms of the paper's (394)-(402)).
* The limit relative error against the full-rank minimizer (33) and its expectation (34)-(35).
* Frobenius low-rank approximation under spectral init (Sec. 2.3, App. I): r decoupled scalar flows (46)-(49).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lorakern.theory._checks import as_float64, as_times, check_int, check_real, check_singular_values


# -- Eckart-Young-Mirsky ---------------------------------------------------------------------------------------

class EYMTail(NamedTuple):
    """What the best rank-r approximation W_r of W leaves out (floats for an int r, tensors for a list of r)."""
    loss: float | torch.Tensor         # 1/2 sum_{i>r} s_i^2: the optimal value of objective (36)
    residual_sq: float | torch.Tensor  # sum_{i>r} s_i^2 = min ||W - W_r||^2, eq. (53) (which has no 1/2)
    rel_err: float | torch.Tensor      # sqrt(sum_{i>r} s_i^2 / sum_i s_i^2) = ||W - W_r|| / ||W||


def _sorted_desc(s: torch.Tensor) -> torch.Tensor:
    return torch.sort(s, descending=True).values


def _ranks(r: object, n: int, name: str = "r") -> tuple[torch.Tensor, bool]:
    """r as an int64 tensor of ranks in [0, n]; also says whether r was a single int."""
    # a list, tuple, range, numpy array or 1-D tensor of ranks (but not a 0-d tensor/array)
    many = (isinstance(r, torch.Tensor) and r.dim() > 0) or (
        not isinstance(r, (torch.Tensor, str, bytes)) and hasattr(r, "__len__") and getattr(r, "ndim", 1) > 0)
    if many:
        items = r.tolist() if isinstance(r, torch.Tensor) else list(r)
        if len(items) == 0:
            raise ValueError(f"{name} must not be empty")
        ranks = [check_int(v, f"{name}[{i}]", 0, n, f"len(singular_values) = {n}") for i, v in enumerate(items)]
        return torch.tensor(ranks, dtype=torch.int64), False
    return torch.tensor([check_int(r, name, 0, n, f"len(singular_values) = {n}")]), True


def eym_tail(singular_values, r) -> EYMTail:
    """Loss and relative error of the best rank-r approximation (Eckart-Young-Mirsky; Thm 2.11, eq. (53)).

    singular_values: the singular values of the target matrix (1-D, non-negative, any order: they are sorted),
    e.g. torch.linalg.svdvals(W) of a full fine-tuning update W. r: an int with 0 <= r <= len(singular_values),
    or a list/1-D tensor of them (a whole accuracy-vs-rank curve in one call; then the fields are tensors).
    Sums run from the smallest value up and in units of the largest one, so tiny tails keep full accuracy.
    An all-zero spectrum has rel_err 0 at every rank.
    """
    s = _sorted_desc(check_singular_values(singular_values))
    ranks, scalar = _ranks(r, s.numel())
    top = s[0]
    if top == 0:
        zero = torch.zeros(ranks.shape, dtype=torch.float64)
        fields = (zero, zero, zero)
    else:
        u = (s / top) ** 2
        tail = torch.cat([u.flip(0).cumsum(0).flip(0), u.new_zeros(1)])  # tail[k] = sum_{i >= k} u_i
        picked = tail[ranks]
        residual_sq = picked * top ** 2
        fields = (0.5 * residual_sq, residual_sq, (picked / tail[0]).sqrt())
    if scalar:
        return EYMTail(*(float(f[0]) for f in fields))
    return EYMTail(*fields)


def select_rank(singular_values, energy: float = 0.9, max_rank: int | None = None) -> int:
    """The smallest r with sum(s[:r]**2) >= energy * sum(s**2) (s sorted descending), capped at max_rank.

    energy in (0, 1]; energy = 1 - tol**2 gives the smallest rank whose EYM relative error (eym_tail) is
    <= tol. energy = 1 returns the number of non-zero singular values; an all-zero spectrum returns 0 (a zero
    target needs no adapter). The comparison is exact in float64 (no tolerance is added).
    """
    s = _sorted_desc(check_singular_values(singular_values))
    energy = check_real(energy, "energy", low=0.0, high=1.0, low_open=True)
    if max_rank is not None:
        max_rank = check_int(max_rank, "max_rank", low=1)
    if s[0] == 0:
        return 0
    head = ((s / s[0]) ** 2).cumsum(0)  # non-decreasing, head[-1] is the total
    r = int(torch.searchsorted(head, energy * head[-1], side="left")) + 1
    r = min(r, s.numel())
    return r if max_rank is None else min(r, max_rank)


# -- trace-squared objective: closed-form gradient flow ---------------------------------------------------------

def _flow_coeffs_stable(t: torch.Tensor, z: torch.Tensor, c: torch.Tensor):
    """p, q and a = Tr(W0 - Y X) of (373)-(374), (313) in terms of w = exp(-sqrt(k1) t) (no overflow).

    With k1 = z^2 + 4c^2, zeta = z/sqrt(k1) and gamma^2 = 4c^2/k1 (zeta^2 + gamma^2 = 1), multiplying the
    numerators and the denominator sqrt(s(t)) by exp(-sqrt(k1) t / 2) turns the printed forms into
        d = zeta (1 + zeta) / 2 - zeta gamma^2 w^2 / (2 (1 + zeta)) + gamma^2 w          (= s(t) |c| w / k1)
        p = (zeta (1 - w) + 1 + w) / (2 sqrt(d)),  q = (1 - w) / (sqrt(k1) sqrt(d)),  a = c w / d.
    d >= zeta (1 + zeta) / 2 > 0 for all w in [0, 1], 1 - w is taken from expm1, and 1 - zeta is written as
    gamma^2 / (1 + zeta) to avoid cancellation; at w = 0 this is exactly the limit p(inf), q(inf), a = 0.
    It needs no 1/sqrt|c| either, so c = 0 (Assumption 2.6 violated) gives the stationary p = 1, a = 0.
    """
    root = torch.hypot(z, 2 * c)  # sqrt(k1)
    zeta, gamma2 = z / root, (2 * c / root) ** 2
    x = root * t
    w = torch.exp(-x)
    one_minus_w = -torch.expm1(-x)
    d = zeta * (1 + zeta) / 2 - zeta * gamma2 * w * w / (2 * (1 + zeta)) + gamma2 * w
    sd = d.sqrt()
    p = (zeta * one_minus_w + 1 + w) / (2 * sd)
    q = one_minus_w / (root * sd)
    return p, q, c * w / d


def _flow_coeffs_paper(t: torch.Tensor, z: torch.Tensor, c: torch.Tensor):
    """p, q (373)-(374) and a (313) exactly as printed (overflows for large sqrt(k1) t: for comparison only)."""
    k1 = z * z + 4 * c * c
    root = k1.sqrt()
    k2 = torch.asinh(z / (2 * c.abs())) / root
    s = 2 * z * torch.sinh(root * (t + k2)) + 4 * c.abs()
    rc = c.abs().sqrt()
    half = root * t / 2
    p = (z / rc * torch.sinh(half) + root / rc * torch.cosh(half)) / s.sqrt()
    q = 2 / rc * torch.sinh(half) / s.sqrt()
    return p, q, torch.sign(c) * k1 / s


def _coeffs(t, x0_sq_norm, trace_w0, form: str):
    if form not in ("stable", "paper"):
        raise ValueError(f"form must be 'stable' or 'paper', got {form!r}")
    tt, scalar = as_times(t)
    z = check_real(x0_sq_norm, "x0_sq_norm", low=0.0, low_open=True,
                   why=" (Assumption 2.5: with X0 = 0 the flow stays at the saddle (0, 0))")
    c = check_real(trace_w0, "trace_w0")
    if form == "paper" and c == 0:
        raise ValueError("trace_w0 must be non-zero for form='paper' (its k2 = arsinh(||X0||^2 / 2|c|) / "
                         "sqrt(k1) is undefined; Assumption 2.6); form='stable' handles c = 0")
    fn = _flow_coeffs_stable if form == "stable" else _flow_coeffs_paper
    out = fn(tt, torch.tensor(z, dtype=torch.float64), torch.tensor(c, dtype=torch.float64))
    return tuple(float(v) for v in out) if scalar else out


def trace_sq_coeffs(t, x0_sq_norm: float, trace_w0: float, form: str = "stable"):
    """(p(t), q(t)) of the trace-squared LoRA gradient flow from Y0 = 0 (eq. (28)-(29), (373)-(374)).

    Y(t) = q(t) Tr(W0) X0^T and X(t) = p(t) X0. t >= 0 (a float, or a tensor for many times; inf gives the
    limits), x0_sq_norm = ||X0||^2 > 0 (Assumption 2.5), trace_w0 = c = Tr(W0). form="stable" (default)
    never overflows; form="paper" evaluates the printed sinh/cosh expressions, which return 0 or NaN once
    sqrt(||X0||^4 + 4 c^2) t passes ~700 (kept to show the difference). p(inf) q(inf) = 1 / ||X0||^2.
    """
    p, q, _ = _coeffs(t, x0_sq_norm, trace_w0, form)
    return p, q


def trace_sq_residual(t, x0_sq_norm: float, trace_w0: float, form: str = "stable"):
    """The trace residual a(t) = Tr(W0 - Y(t) X(t)) along the flow (eq. (313)): sgn(c) k1 / s(t).

    It decays like exp(-sqrt(k1) t), k1 = ||X0||^4 + 4 c^2, and the loss is a(t)^2 / 2. Arguments as in
    trace_sq_coeffs.
    """
    return _coeffs(t, x0_sq_norm, trace_w0, form)[2]


def _square(W0: torch.Tensor, name: str = "W0") -> torch.Tensor:
    if not isinstance(W0, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W0).__name__}")
    if W0.dim() != 2 or W0.shape[0] != W0.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) matrix (the trace-squared problem (17)), "
                         f"got shape {tuple(W0.shape)}")
    return as_float64(W0, name)


def _factor(X0: torch.Tensor, n: int | None, name: str = "X0") -> torch.Tensor:
    if not isinstance(X0, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(X0).__name__}")
    if X0.dim() != 2 or (n is not None and X0.shape[1] != n):
        want = f"(r, {n})" if n is not None else "(r, n)"
        raise ValueError(f"{name} must be a 2-D {want} matrix (lora_A's layout), got shape {tuple(X0.shape)}")
    X0 = as_float64(X0, name)
    if not torch.isfinite(X0).all():
        raise ValueError(f"{name} must be finite")
    if not X0.any():
        raise ValueError(f"{name} must be non-zero (Assumption 2.5: with X0 = 0 the flow stays at (0, 0))")
    return X0


def trace_sq_flow(W0: torch.Tensor, X0: torch.Tensor, t):
    """The closed-form flow (Y(t), X(t)) of min 1/2 Tr^2(W0 - Y X) from Y0 = 0, X(0) = X0 (eq. (28)-(29)).

    W0 (n, n); X0 (r, n) (lora_A at init; Y is lora_B (n, r), which starts at 0 as with init="lora" or
    "gaussian"). t: a float (returns Y (n, r), X (r, n)) or a 1-D tensor of times (returns (T, n, r),
    (T, r, n)). float64, numerically stable for any t >= 0, including inf.
    """
    W0 = _square(W0)
    X0 = _factor(X0, W0.shape[0])
    c = float(torch.trace(W0))
    p, q = trace_sq_coeffs(t, float((X0 * X0).sum()), c)
    if isinstance(p, float):
        return q * c * X0.T, p * X0
    return (q * c)[:, None, None] * X0.T, p[:, None, None] * X0


def trace_sq_limit(W0: torch.Tensor, X0: torch.Tensor) -> torch.Tensor:
    """lim_{t -> inf} Y(t) X(t) = Tr(W0) / ||X0||^2 * X0^T X0 (eq. (32)), float64 (n, n)."""
    W0 = _square(W0)
    X0 = _factor(X0, W0.shape[0])
    return torch.trace(W0) / (X0 * X0).sum() * (X0.T @ X0)


def trace_sq_full_rank(W0: torch.Tensor, t, U0: torch.Tensor | None = None) -> torch.Tensor:
    """Full-rank flow of (17): U(t) = (1 - e^{-nt}) / n Tr(W0 - U0) I + U0 (eq. (20)); U0 = 0 by default."""
    W0 = _square(W0)
    n = W0.shape[0]
    U0 = torch.zeros_like(W0) if U0 is None else as_float64(U0, "U0")
    if U0.shape != W0.shape:
        raise ValueError(f"U0 must have W0's shape {tuple(W0.shape)}, got {tuple(U0.shape)}")
    tt, scalar = as_times(t)
    gain = -torch.expm1(-n * tt) / n * torch.trace(W0 - U0)
    eye = torch.eye(n, dtype=torch.float64)
    return gain * eye + U0 if scalar else gain[:, None, None] * eye + U0


def trace_sq_rel_err(X0: torch.Tensor):
    """R = lim ||Y X - U|| / ||U|| between the LoRA and full-rank minimizers of (17)-(18) (eq. (33)).

    R = sqrt(n ||X0^T X0||^2 - ||X0||^4) / ||X0||^2 for X0 (r, n), or a batch (..., r, n) (returns a tensor).
    Written as sqrt(n) ||X0^T X0 / ||X0||^2 - I / n|| over the eigenvalues of X0^T X0, a sum of squares, so
    there is no cancellation (r = 1 gives R^2 = n - 1 to rounding). Independent of Tr(W0) and of X0's scale.
    """
    if not isinstance(X0, torch.Tensor):
        raise TypeError(f"X0 must be a torch.Tensor, got {type(X0).__name__}")
    if X0.dim() < 2:
        raise ValueError(f"X0 must be (r, n) or a batch (..., r, n), got shape {tuple(X0.shape)}")
    X0 = as_float64(X0, "X0")
    if not torch.isfinite(X0).all():
        raise ValueError("X0 must be finite")
    n = X0.shape[-1]
    lam = torch.linalg.svdvals(X0) ** 2  # the non-zero eigenvalues of X0^T X0 (k = min(r, n) of them)
    z = lam.sum(-1, keepdim=True)
    if (z == 0).any():
        raise ValueError("X0 must be non-zero (Assumption 2.5)")
    mu = lam / z
    k = lam.shape[-1]
    r2 = n * (((mu - 1.0 / n) ** 2).sum(-1) + (n - k) / n ** 2)
    R = r2.sqrt()
    return float(R) if X0.dim() == 2 else R


def expected_trace_sq_rel_err(n: int, r: int, squared: bool = False) -> float:
    """Expected limit relative error of LoRA vs full-rank GF on the trace-squared problem (eq. (34)-(35)).

    For X0 (r, n) with i.i.d. N(0, sigma^2) entries (LoRA's Gaussian init, Y0 = 0):
    squared=True returns E[R^2] = (n^2 + n - 2) / (n r + 2) (34); the default returns its square root, which
    by Jensen bounds E[R] from above (35) (the bound is nearly tight: E[R] is within ~0.1% of it at n = 64).
    R measures the distance between two *different zero-loss minimizers*, not a loss: both reach loss 0 for
    every r (Thm 2.7), and R stays ~1 even at r = n. 1 <= r <= n (the paper takes r < n; r = n is allowed).
    """
    n = check_int(n, "n", low=1)
    r = check_int(r, "r", low=1, high=n, high_desc=f"n = {n}")
    mean_sq = (n * n + n - 2) / (n * r + 2)
    return mean_sq if squared else math.sqrt(mean_sq)


# -- Frobenius low-rank approximation under spectral init --------------------------------------------------------

def frobenius_spectral_flow(singular_values, x0, t):
    """Per-direction flow (y_i(t), x_i(t)) of min 1/2 ||W0 - Y X||^2 under spectral init (eq. (46)-(49)).

    Spectral init (45): Y0 = 0, X0 = diag(x0) V_r^T for W0 = U diag(s) V^T; the flow stays diagonal and
    Y X = U_r diag(y x) V_r^T with y = q_s(t) s_i x0_i, x = p_s(t) x0_i, where p_s, q_s are p, q of the
    trace-squared flow with ||X0||^2 -> x0_i^2 and |c| -> s_i (App. I). y x -> s_i (eq. (51)), so the loss tends
    to the EYM optimum (53). singular_values (the s_i paired with x0, length r, non-negative, order kept),
    x0 (length r; x0_i = 0 violates Assumption 2.10 and that direction stays at 0), t >= 0 (float or 1-D
    tensor; inf gives the limit). Returns float64 tensors of shape (r,) or (T, r). Stable for any t.
    """
    s = check_singular_values(singular_values)
    x = as_float64(x0, "x0")
    if x.dim() != 1 or x.shape != s.shape:
        raise ValueError(f"x0 must be 1-D with len(singular_values) = {s.numel()} entries, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x0 must be finite")
    tt, scalar = as_times(t)
    tt = tt.reshape(()) if scalar else tt.reshape(-1, 1)
    live = x != 0
    z = torch.where(live, x * x, torch.ones_like(x))  # placeholder 1 where x0 = 0 (masked below)
    p, q, _ = _flow_coeffs_stable(tt, z, s)
    y_t = torch.where(live, q * s * x, torch.zeros_like(q))
    x_t = torch.where(live, p * x, torch.zeros_like(p))
    return y_t, x_t

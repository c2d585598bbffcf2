"""Convergence of LoRA gradient descent (lora-gd-convergence-rate.txt, Mu & Klabjan).

The paper stacks the factors into V = [B; A^T] and writes LoRA GD (3) as GD on J(V) = L(B A) (6), with L
the loss as a function of the full weight, assumed L-smooth with L >= 1 (Assumption 1) and bounded below
by L* (Assumption 2). Its step-size rule (8)
    eta_t = min{ 1 / (5 sqrt(2) L (||V_t||^2 + ||grad L(B_t A_t)||)), 1 },   ||V_t||^2 = ||B_t||^2 + ||A_t||^2,
guarantees the descent inequality (9)
    J(V_{t+1}) <= J(V_t) - (eta_t / 5) ||grad J(V_t)||^2,   ||grad J||^2 = ||grad_B||^2 + ||grad_A||^2,
and from it min_{t<T} ||grad J(V_t)||^2 = O(1 / log T) (11), or O(1 / T) when ||V_t|| stays bounded (12).

Layouts: the paper's W (m x n), B (m x r), A (r x n) are a Linear weight (out, in), lora_B and lora_A. A
LoRALinear multiplies B A by `scaling`; GD with step eta on (B, A) is GD with step scaling * eta on the
paper's factors (sqrt(scaling) B, sqrt(scaling) A), so the functions below take `scaling` and work on the raw
factors (scaling = 1, i.e. alpha = r, is the paper's setting). The descent inequality (9) reads the same in
both frames (eta ||grad J||^2 is invariant), so DescentMonitor needs no scaling. Several layers sharing one
scaling stack into one block-diagonal V: ||V||^2 and ||grad L||^2 are sums over the layers (L is then the
smoothness constant of the loss in all the weights together).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from lorakern.theory._checks import check_int, check_real

_RULE = 5.0 * math.sqrt(2.0)  # the constant 5 sqrt(2) of rule (8)
_L_WHY = (" (Assumption 1 of lora-gd-convergence-rate.txt takes L >= 1; any upper bound on the smoothness "
          "constant is valid, so pass max(L, 1))")


def safe_step_size(L: float, adapter_sq_norm: float, full_grad_norm: float, scaling: float = 1.0) -> float:
    """Mu & Klabjan's provably descending step size, rule (8), for plain (simultaneous) LoRA GD.

    L: the smoothness constant of the loss as a function of the full weight W (Assumption 1), L >= 1.
    adapter_sq_norm: ||V_t||^2 = ||lora_B||^2 + ||lora_A||^2 at the current step (summed over layers).
    full_grad_norm: ||grad L(W)||, the Frobenius norm of the gradient with respect to the full weight
        W = W0 + scaling * B A at the current step (not the adapters' gradients), e.g. ||dY^T X|| for a
        layer with input X and output gradient dY (root of the sum of squares over layers).
    scaling: the layer's scaling (alpha / r); rule (8) is applied to the paper's factors sqrt(scaling) B,
        sqrt(scaling) A and the step converted back, eta = eta_paper / scaling.
    Returns eta_t for `param -= eta_t * param.grad`. Conservative by design (about 1e-3 for L ~ 1.4 and
    ||V||^2 ~ 50): a safety cap or a certificate, not a tuned learning rate.
    """
    L = check_real(L, "L", low=1.0, why=_L_WHY)
    v2 = check_real(adapter_sq_norm, "adapter_sq_norm", low=0.0)
    g = check_real(full_grad_norm, "full_grad_norm", low=0.0)
    s = check_real(scaling, "scaling", low=0.0, low_open=True)
    denom = _RULE * L * (s * v2 + g)
    eta_paper = 1.0 if denom <= 1.0 else 1.0 / denom  # min{1 / denom, 1}; denom = 0 only at V = 0, grad = 0
    return eta_paper / s


class ConvergenceBounds(NamedTuple):
    """A-priori bounds of Theorem 3 (App. A.4) for steps t = 0..T-1 (float64 tensors of length T)."""
    K: float                         # 5 sqrt(2) L (||V0||^2 + 10 (J0 - L*) + sqrt(2 L (J0 - L*))), paper frame
    step_size_floor: torch.Tensor    # [t] <= eta_t of rule (8): min{1, 1 / (t + K)} (paper frame)
    stationarity: torch.Tensor       # [t] >= min_{s<=t} ||grad J(V_s)||^2: 5 (J0 - L*) / sum_{s<=t} floor_s (11)
    adapter_sq_norm: torch.Tensor    # [t] >= ||V_t||^2: ||V0||^2 + t / (5 sqrt(2) L) + 10 (J0 - L*)
    stationarity_bounded: torch.Tensor | None  # (12) if max_adapter_sq_norm was given: 5 (J0 - L*) / (eta (t+1))


def convergence_bounds(T: int, L: float, adapter_sq_norm0: float, loss0: float, loss_lower_bound: float = 0.0,
                       scaling: float = 1.0, max_adapter_sq_norm: float | None = None) -> ConvergenceBounds:
    """The explicit bounds behind Theorem 3 (eq. (10)-(12), App. A.4) for T steps of GD with rule (8).

    adapter_sq_norm0 = ||V_0||^2 and loss0 = J(V_0) at the start; loss_lower_bound = L* (0 for a
    least-squares loss). max_adapter_sq_norm = C^2 (a bound on ||V_t||^2 along the run) adds the O(1/T)
    bound (12). All bounds are converted to the raw factors of a layer with the given scaling (see the
    module docstring); K is reported in the paper's frame. The O(1/log T) bound (11) is very loose (K is
    ~1e4 in a 20 x 15 least-squares problem): it certifies convergence, it does not predict the rate.
    """
    T = check_int(T, "T", low=1)
    L = check_real(L, "L", low=1.0, why=_L_WHY)
    s = check_real(scaling, "scaling", low=0.0, low_open=True)
    v0 = s * check_real(adapter_sq_norm0, "adapter_sq_norm0", low=0.0)
    loss0 = check_real(loss0, "loss0")
    lstar = check_real(loss_lower_bound, "loss_lower_bound", high=loss0,
                       why=" (L* bounds the loss from below, so it cannot exceed loss0)")
    gap = loss0 - lstar
    K = _RULE * L * (v0 + 10 * gap + math.sqrt(2 * L * gap))
    t = torch.arange(T, dtype=torch.float64)
    floor = torch.clamp(1.0 / (t + K), max=1.0)  # t + K = 0 (t = 0, K = 0) gives inf -> 1
    stationarity = 5 * gap / floor.cumsum(0)
    norm_bound = v0 + t / (_RULE * L) + 10 * gap
    bounded = None
    if max_adapter_sq_norm is not None:
        c2 = s * check_real(max_adapter_sq_norm, "max_adapter_sq_norm", low=0.0)
        eta = min(1.0, 1.0 / (_RULE * L * (c2 + math.sqrt(2 * L * gap)))) if c2 + gap > 0 else 1.0
        bounded = s * 5 * gap / (eta * (t + 1))
    return ConvergenceBounds(K, floor / s, s * stationarity, norm_bound / s, bounded)


# -- adapter norms of LoRALinear layers ---------------------------------------------------------------------

def _lora_layers(layers) -> list:
    from lorakern.layer import LoRALinear  # here, so that importing lorakern.theory alone stays light
    if isinstance(layers, LoRALinear):
        return [layers]
    if isinstance(layers, torch.nn.Module):
        found = [m for m in layers.modules() if isinstance(m, LoRALinear)]
    else:
        found = list(layers)
        for i, m in enumerate(found):
            if not isinstance(m, LoRALinear):
                raise TypeError(f"layers[{i}] must be a LoRALinear, got {type(m).__name__}")
    if not found:
        raise ValueError("layers holds no LoRALinear")
    return found


def adapter_sq_norm(layers) -> float:
    """||V||^2 = sum of ||lora_B||^2 + ||lora_A||^2 over a LoRALinear, a model or an iterable of layers."""
    return sum(float(p.detach().double().pow(2).sum()) for m in _lora_layers(layers) for p in (m.lora_A, m.lora_B))


def adapter_grad_sq_norm(layers) -> float:
    """||grad J(V)||^2 = sum of ||lora_B.grad||^2 + ||lora_A.grad||^2 (after backward); missing grads count 0."""
    mods = _lora_layers(layers)
    grads = [p.grad for m in mods for p in (m.lora_A, m.lora_B) if p.grad is not None]
    if not grads:
        raise ValueError("no adapter has a .grad: call loss.backward() first")
    return sum(float(g.detach().double().pow(2).sum()) for g in grads)


# -- monitor ---------------------------------------------------------------------------------------------------

class DescentViolationWarning(RuntimeWarning):
    """A LoRA GD step broke the descent inequality (9): the step size is too large for the loss's smoothness."""


_WARN_MODES = ("streak", "always", "once", "never")


def _loose_float(value, name: str) -> float:
    """A real scalar that may be inf or NaN (a diverging run must be recorded, not rejected)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise TypeError(f"{name} must be a real scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


class DescentMonitor:
    """Checks Mu & Klabjan's descent inequality (9) at every step of LoRA gradient descent and warns on violation.

        J(V_{t+1}) <= J(V_t) - (eta_t / 5) ||grad J(V_t)||^2

    Call `update(loss, step_size, grad_sq_norm)` once per step, before the parameter update, with the loss
    J(V_t), the step eta_t about to be taken and ||grad J(V_t)||^2 (adapter_grad_sq_norm); it checks the
    previous step against this loss and returns that step's margin. After the last step call
    `finish(final_loss)`. margin_t = J(V_t) - eta_t / 5 ||grad J(V_t)||^2 - J(V_{t+1}) (>= 0 when (9) holds);
    a step violates (9) when margin_t < -(atol + rtol * max(|J(V_t)|, |J(V_{t+1})|)): rtol absorbs the
    rounding of the loss itself (about 1e-7 in float32; use ~1e-10 in float64). A NaN/Inf loss is a violation.

    warn: "streak" (default: one DescentViolationWarning per run of consecutive violations), "always",
    "once" (the first violation only) or "never". The record: margins, violations (step indices), losses,
    step_sizes, grad_sq_norms; certificate() gives the right side of (10).
    Under rule (8) with a correct L >= 1 the paper proves no step can violate (9); a violation means L (or
    the full-gradient norm fed to safe_step_size) was underestimated, or the step was not rule (8)'s.
    """

    def __init__(self, rtol: float = 1e-6, atol: float = 0.0, warn: str = "streak"):
        self.rtol = check_real(rtol, "rtol", low=0.0)
        self.atol = check_real(atol, "atol", low=0.0)
        if warn not in _WARN_MODES:
            raise ValueError(f"warn must be one of {_WARN_MODES}, got {warn!r}")
        self.warn = warn
        self.losses: list[float] = []
        self.step_sizes: list[float] = []
        self.grad_sq_norms: list[float] = []
        self.margins: list[float] = []
        self.violations: list[int] = []
        self.warnings_issued = 0
        self._finished = False

    # recording --------------------------------------------------------------------------------------------
    def update(self, loss, step_size, grad_sq_norm) -> float | None:
        """Record step t (J(V_t), eta_t, ||grad J(V_t)||^2); returns the margin of step t-1 (None at t = 0)."""
        if self._finished:
            raise RuntimeError("DescentMonitor.update after finish(): create a new monitor for a new run")
        loss = _loose_float(loss, "loss")
        eta = check_real(step_size, "step_size", low=0.0)
        g2 = _loose_float(grad_sq_norm, "grad_sq_norm")
        if g2 < 0:
            raise ValueError(f"grad_sq_norm must be >= 0 (a squared norm), got {g2}")
        margin = self._close_step(loss)
        self.losses.append(loss)
        self.step_sizes.append(eta)
        self.grad_sq_norms.append(g2)
        return margin

    def finish(self, loss) -> float | None:
        """Record the loss after the last update and check that step; returns its margin."""
        if self._finished:
            raise RuntimeError("DescentMonitor.finish called twice")
        margin = self._close_step(_loose_float(loss, "loss"))
        self.losses.append(_loose_float(loss, "loss"))
        self._finished = True
        return margin

    def _close_step(self, new_loss: float) -> float | None:
        if not self.step_sizes:  # t = 0: nothing to close yet
            return None
        t = len(self.margins)
        old, eta, g2 = self.losses[-1], self.step_sizes[-1], self.grad_sq_norms[-1]
        margin = old - eta / 5.0 * g2 - new_loss
        if math.isnan(margin):
            margin = -math.inf
        self.margins.append(margin)
        slack = self.atol + self.rtol * max(abs(old), abs(new_loss))
        if not margin >= -slack:
            streak_start = not self.violations or self.violations[-1] != t - 1
            self.violations.append(t)
            self._maybe_warn(t, old, new_loss, eta, g2, margin, streak_start)
        return margin

    def _maybe_warn(self, t, old, new, eta, g2, margin, streak_start) -> None:
        if self.warn == "never" or (self.warn == "once" and self.warnings_issued) or (
                self.warn == "streak" and not streak_start):
            return
        self.warnings_issued += 1
        warnings.warn(
            f"LoRA GD step {t} violates the descent inequality (9) of lora-gd-convergence-rate.txt: "
            f"J(V_t+1) = {new:.6g} > J(V_t) - eta_t/5 ||grad J||^2 = {old - eta / 5 * g2:.6g} "
            f"(eta_t = {eta:.3g}, margin {margin:.3g}). The step is too large for the loss's smoothness: "
            f"use lorakern.theory.safe_step_size with a smoothness constant L that is not underestimated.",
            DescentViolationWarning, stacklevel=3)

    # summaries --------------------------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        """Steps whose inequality has been checked."""
        return len(self.margins)

    @property
    def ok(self) -> bool:
        """True when no checked step violated (9)."""
        return not self.violations

    def relative_margins(self) -> list[float]:
        """margin_t / max(|J(V_t)|, tiny): the slack of (9) in units of the loss."""
        return [m / max(abs(j), 1e-300) for m, j in zip(self.margins, self.losses)]

    def certificate(self, loss_lower_bound: float = 0.0) -> float:
        """5 (J(V_0) - L*) / sum_t eta_t, the right side of (10): an upper bound on min_t ||grad J(V_t)||^2
        over the checked steps, valid when none of them violated (9)."""
        if not self.margins:
            raise ValueError("no step has been checked yet")
        lstar = check_real(loss_lower_bound, "loss_lower_bound", high=self.losses[0],
                           why=" (L* bounds the loss from below, so it cannot exceed J(V_0))")
        total = sum(self.step_sizes[:self.n_steps])
        return math.inf if total == 0 else 5.0 * (self.losses[0] - lstar) / total

    def summary(self) -> dict:
        """Counts and extremes of the record, for a printed table."""
        rel = self.relative_margins()
        return {"steps": self.n_steps, "violations": len(self.violations),
                "min_margin": min(self.margins) if self.margins else None,
                "min_rel_margin": min(rel) if rel else None,
                "min_grad_sq_norm": min(self.grad_sq_norms[:self.n_steps]) if self.margins else None}

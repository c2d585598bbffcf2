"""The pure-PyTorch engine of the preconditioned optimizers: the CPU path and the oracle of the fused kernels.

An engine does the two bandwidth-heavy parts of a step for one bucket of pairs (same device, dtype, rank):
  grams(b_factors, a_factors)  -> (len(b) + len(a), r, r) Gram matrices B^T B, then A A^T, in float64;
  update(batch, P, hyper)      -> precondition each factor's gradient by its r x r P (in float64) and apply
                                  AdamW or SGD in work_dtype.
The r x r solves between the two are shared (preconditioner.damped_inverses). Here the per-pair products are a
Python loop of small matmuls (they differ in shape), and the element-wise optimizer math is one set of
torch._foreach_* calls over all factors, which is what makes this path fast on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakern.optim.preconditioner import GRAM_DTYPE, work_dtype


@dataclass
class Hyper:
    """One param group's element-wise hyperparameters, as plain (float64) Python floats.

    The derived coefficients are computed here, on the host in float64, and handed to the engines as they are:
    a GPU kernel receives Python floats as fp32 arguments, and 1 - beta2 computed from an fp32 beta2 = 0.99999
    is off by 0.6% (the moments then drift from the reference)."""
    lr: float
    weight_decay: float = 0.0
    adam: bool = True
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @property
    def one_minus_beta1(self) -> float:
        return 1.0 - self.beta1

    @property
    def one_minus_beta2(self) -> float:
        return 1.0 - self.beta2

    @property
    def lr_wd(self) -> float:
        """Decoupled weight decay (AdamW: p <- p - lr wd p before the step), passed as lr * wd rather than as
        the factor 1 - lr wd, whose fp32 rounding would lose the digits of a small lr * wd."""
        return self.lr * self.weight_decay


@dataclass
class FactorBatch:
    """The factors of one kind ("A": (r, in), "B": (out, r), or "plain") updated together.

    step_sizes[i] = lr / (1 - beta1^t) and bc2_sqrts[i] = sqrt(1 - beta2^t) for factor i at its step t
    (lr and 1.0 without bias correction), Python floats; the exp_avg lists are empty for SGD.
    """
    kind: str
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    step_sizes: list[float] = field(default_factory=list)
    bc2_sqrts: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.params)


class TorchEngine:
    name = "torch"

    def grams(self, b_factors: list[torch.Tensor], a_factors: list[torch.Tensor], r: int) -> torch.Tensor:
        first = (b_factors or a_factors)[0]
        out = torch.empty((len(b_factors) + len(a_factors), r, r), dtype=GRAM_DTYPE, device=first.device)
        for i, B in enumerate(b_factors):
            Bw = B.detach().to(GRAM_DTYPE)
            torch.mm(Bw.t(), Bw, out=out[i])
        off = len(b_factors)
        for i, A in enumerate(a_factors):
            Aw = A.detach().to(GRAM_DTYPE)
            torch.mm(Aw, Aw.t(), out=out[off + i])
        return out

    def update(self, batch: FactorBatch, P: torch.Tensor | None, hyper: Hyper) -> None:
        if not len(batch):
            return
        grads = precondition(batch.kind, batch.grads, P)
        if hyper.adam:
            adamw_update_(batch, grads, hyper)
        else:
            sgd_update_(batch.params, grads, hyper)


def precondition(kind: str, grads: list[torch.Tensor], P: torch.Tensor | None) -> list[torch.Tensor]:
    """P_i grad_i for A factors, grad_i P_i for B factors (computed in P's dtype, float64, and rounded once to
    work_dtype); for "plain" the gradients themselves when already in work_dtype (no copy), else fp32 copies.

    The caller's .grad tensors are only ever read by the updates below."""
    if kind == "plain" or P is None:
        return [g if g.dtype == work_dtype(g.dtype) else g.to(work_dtype(g.dtype)) for g in grads]
    if kind == "A":
        return [torch.mm(P[i], g.to(P.dtype)).to(work_dtype(g.dtype)) for i, g in enumerate(grads)]
    if kind == "B":
        return [torch.mm(g.to(P.dtype), P[i]).to(work_dtype(g.dtype)) for i, g in enumerate(grads)]
    raise ValueError(f"kind must be 'A', 'B' or 'plain', got {kind!r}")


def _masters(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters in work_dtype: themselves when already fp32/fp64, else fp32 copies (bf16 adapters)."""
    return [p if p.dtype == work_dtype(p.dtype) else p.to(work_dtype(p.dtype)) for p in params]


def _write_back(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    for p, m in zip(params, masters):
        if m is not p:
            p.copy_(m)  # one rounding to the adapter dtype per step


def _decay_(masters: list[torch.Tensor], hyper: Hyper) -> None:
    if hyper.weight_decay != 0.0:
        torch._foreach_add_(masters, masters, alpha=-hyper.lr_wd)  # p <- p - (lr wd) p


def adamw_update_(batch: FactorBatch, grads: list[torch.Tensor], hyper: Hyper) -> None:
    """AdamW on (preconditioned) grads: moments in fp32/fp64, decoupled decay, per-factor bias correction.
    `grads` are only read (they may be the caller's .grad tensors)."""
    m, v = batch.exp_avgs, batch.exp_avg_sqs
    torch._foreach_lerp_(m, grads, hyper.one_minus_beta1)
    torch._foreach_mul_(v, hyper.beta2)
    torch._foreach_addcmul_(v, grads, grads, value=hyper.one_minus_beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, batch.bc2_sqrts)
    torch._foreach_add_(denom, hyper.eps)
    masters = _masters(batch.params)
    _decay_(masters, hyper)
    torch._foreach_addcdiv_(masters, m, denom, [-s for s in batch.step_sizes])
    _write_back(batch.params, masters)


def sgd_update_(params: list[torch.Tensor], grads: list[torch.Tensor], hyper: Hyper) -> None:
    """p <- p - lr wd p - lr g; `grads` are only read."""
    masters = _masters(params)
    _decay_(masters, hyper)
    torch._foreach_add_(masters, grads, alpha=-hyper.lr)
    _write_back(params, masters)

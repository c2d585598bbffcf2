"""The pure-PyTorch engine of the preconditioned optimizers: the CPU path and the oracle of the fused kernels.

An engine does the two bandwidth-heavy parts of a step for one bucket of pairs (same device, dtype, rank):
  grams(b_factors, a_factors)  -> (len(b) + len(a), r, r) Gram matrices B^T B, then A A^T, in work_dtype;
  update(batch, P, hyper)      -> precondition each factor's gradient by its r x r P and apply AdamW or SGD.
The r x r solves between the two are shared (preconditioner.damped_inverse). Here the per-pair products are a
Python loop of small matmuls (they differ in shape), and the element-wise optimizer math is one set of
torch._foreach_* calls over all factors, which is what makes this path fast on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakern.optim.preconditioner import work_dtype


@dataclass
class Hyper:
    """One param group's element-wise hyperparameters, as plain floats."""
    lr: float
    weight_decay: float = 0.0
    adam: bool = True
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @property
    def decay(self) -> float:
        """Decoupled weight decay as a factor on the parameter (AdamW: p <- p (1 - lr wd) before the step)."""
        return 1.0 - self.lr * self.weight_decay


@dataclass
class FactorBatch:
    """The factors of one kind ("A": (r, in), "B": (out, r), or "plain") updated together.

    step_sizes[i] = lr / (1 - beta1^t) and bc2_sqrts[i] = sqrt(1 - beta2^t) for factor i at its step t
    (lr and 1.0 without bias correction); the exp_avg lists are empty for SGD.
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
        wdt = work_dtype(first.dtype)
        out = torch.empty((len(b_factors) + len(a_factors), r, r), dtype=wdt, device=first.device)
        for i, B in enumerate(b_factors):
            Bw = B.detach().to(wdt)
            torch.mm(Bw.t(), Bw, out=out[i])
        off = len(b_factors)
        for i, A in enumerate(a_factors):
            Aw = A.detach().to(wdt)
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
    """P_i grad_i for A factors, grad_i P_i for B factors, the gradient itself (in work_dtype) for "plain".

    Always new tensors: the caller's .grad is never modified."""
    if kind == "plain" or P is None:
        return [g.to(work_dtype(g.dtype), copy=True) for g in grads]
    if kind == "A":
        return [torch.mm(P[i], g.to(P.dtype)) for i, g in enumerate(grads)]
    if kind == "B":
        return [torch.mm(g.to(P.dtype), P[i]) for i, g in enumerate(grads)]
    raise ValueError(f"kind must be 'A', 'B' or 'plain', got {kind!r}")


def _masters(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters in work_dtype: themselves when already fp32/fp64, else fp32 copies (bf16 adapters)."""
    return [p if p.dtype == work_dtype(p.dtype) else p.to(work_dtype(p.dtype)) for p in params]


def _write_back(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    for p, m in zip(params, masters):
        if m is not p:
            p.copy_(m)  # one rounding to the adapter dtype per step


def adamw_update_(batch: FactorBatch, grads: list[torch.Tensor], hyper: Hyper) -> None:
    """AdamW on (preconditioned) grads: moments in fp32/fp64, decoupled decay, per-factor bias correction."""
    m, v = batch.exp_avgs, batch.exp_avg_sqs
    torch._foreach_lerp_(m, grads, 1.0 - hyper.beta1)
    torch._foreach_mul_(v, hyper.beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1.0 - hyper.beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, batch.bc2_sqrts)
    torch._foreach_add_(denom, hyper.eps)
    masters = _masters(batch.params)
    if hyper.weight_decay != 0.0:
        torch._foreach_mul_(masters, hyper.decay)
    torch._foreach_addcdiv_(masters, m, denom, [-s for s in batch.step_sizes])
    _write_back(batch.params, masters)


def sgd_update_(params: list[torch.Tensor], grads: list[torch.Tensor], hyper: Hyper) -> None:
    masters = _masters(params)
    if hyper.weight_decay != 0.0:
        torch._foreach_mul_(masters, hyper.decay)
    torch._foreach_add_(masters, grads, alpha=-hyper.lr)
    _write_back(params, masters)

"""Preconditioned optimizers for LoRA pairs (API.md "Optimizers").

PreconditionedAdamW: LoRA-One-P / Riemannian preconditioned AdamW; normalize="fro" gives NoRA+.
ScaledGD: scaled gradient descent (nystrom-init-nora.txt eq. (5)).
Modules: optimizers (the classes), preconditioner (batched damped r x r inverses), torch_engine (the CPU path
and reference), precond_triton (the fused multi-tensor kernels, imported on first use), pairs (pair discovery).
"""
from lorakern.optim.optimizers import PreconditionedAdamW, ScaledGD

__all__ = ["PreconditionedAdamW", "ScaledGD"]

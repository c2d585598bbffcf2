"""The LoRA linear operation y = x W^T + b + s * (drop(x) A^T) B^T and its autograd.Function.

Two implementations of the same pair of functions (forward -> (y, xa), backward -> (dx, dA, dB)):
- torch: plain PyTorch (the reference, and the CUDA path until the Triton kernels land);
- cpp:   torch.ops.lorakern.lora_forward/lora_backward from csrc/lora_cpu.cpp (the CPU path).

The backward saves what it needs and nothing more: x_l = drop(x) (for dA) and xa = x_l A^T (for dB),
never the (M, out) output. With dropout it also keeps the mask as bool (1 byte/element); the weight
gradient (and so x itself) is only computed when the caller has unfrozen the base weight.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from lorakern import _backend


def _forward_torch(x, weight, bias, x_lora, lora_A, lora_B, scaling: float):
    adt = lora_A.dtype
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    xa = x_lora.to(adt) @ lora_A.t()
    if adt == x.dtype:
        y.addmm_(xa, lora_B.t(), alpha=scaling)
    else:  # fp32 adapters on a bf16/fp16 base: rank-r products in fp32, one rounding of the LoRA term
        y.add_((xa @ lora_B.t()).mul_(scaling).to(x.dtype))
    return y, xa


def _backward_torch(grad_y, x_lora, xa, weight, lora_A, lora_B, scaling: float, mask,
                    need_dx: bool, need_dA: bool, need_dB: bool):
    adt = lora_A.dtype
    gy = grad_y.to(adt)
    dx = dA = dB = None
    if need_dB:
        dB = (gy.t() @ xa).mul_(scaling)
    if need_dx or need_dA:
        dxa = (gy @ lora_B).mul_(scaling)
        if need_dA:
            dA = dxa.t() @ x_lora.to(adt)
        if need_dx:
            dx = grad_y @ weight
            if mask is None and adt == grad_y.dtype:
                dx.addmm_(dxa, lora_A)
            else:
                dxl = dxa @ lora_A
                if mask is not None:
                    dxl.mul_(mask)
                dx.add_(dxl.to(dx.dtype))
    return dx, dA, dB


def _impls(device: torch.device):
    if _backend.resolve(device) == "cpp":
        return torch.ops.lorakern.lora_forward, torch.ops.lorakern.lora_backward
    return _forward_torch, _backward_torch


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for the 2-D LoRA linear; `lora_linear` below handles leading dimensions.

    forward(x (M, in), weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r),
            scaling, dropout_p, generator) -> y (M, out)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, generator):
        fwd, _ = _impls(x.device)
        keep = None
        if dropout_p > 0.0:
            keep = torch.empty_like(x).bernoulli_(1.0 - dropout_p, generator=generator).bool()
            x_lora = x * keep / (1.0 - dropout_p)
        else:
            x_lora = x
        y, xa = fwd(x, weight, bias, x_lora, lora_A, lora_B, float(scaling))
        ctx.scaling = float(scaling)
        ctx.dropout_p = dropout_p
        ctx.has_bias = bias is not None
        # x itself only when the (normally frozen) base weight wants a gradient.
        x_saved = x if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(x_lora, xa, weight, lora_A, lora_B, keep, x_saved)
        return y

    @staticmethod
    @once_differentiable  # double backward through dA/dB is not implemented: fail loudly, never silently wrong
    def backward(ctx, grad_y):
        x_lora, xa, weight, lora_A, lora_B, keep, x = ctx.saved_tensors
        _, bwd = _impls(grad_y.device)
        need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
        grad_y = grad_y.contiguous()
        mask = None
        if keep is not None and need_dx:
            mask = keep.to(lora_A.dtype) / (1.0 - ctx.dropout_p)
        dx, dA, dB = bwd(grad_y, x_lora, xa, weight, lora_A, lora_B, ctx.scaling, mask,
                         need_dx, need_dA, need_dB)
        dW = grad_y.t() @ x if need_dW else None
        db = grad_y.sum(0) if (need_db and ctx.has_bias) else None
        return dx, dW, db, dA, dB, None, None, None


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, generator=None):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T for x of any leading shape (..., in_features)."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    y = LoRALinearFunction.apply(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, generator)
    return y.reshape(*lead, y.shape[-1])


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile can trace through the C++ ops."""
    if _backend._C is None:
        return

    @torch.library.register_fake("lorakern::lora_forward")
    def _(x, weight, bias, x_lora, lora_A, lora_B, scaling):
        y = x.new_empty((x.shape[0], weight.shape[0]))
        return y, x.new_empty((x.shape[0], lora_A.shape[0]), dtype=lora_A.dtype)

    @torch.library.register_fake("lorakern::lora_backward")
    def _(grad_y, x_lora, xa, weight, lora_A, lora_B, scaling, mask, need_dx, need_dA, need_dB):
        dx = grad_y.new_empty((grad_y.shape[0], weight.shape[1])) if need_dx else None
        dA = lora_A.new_empty(lora_A.shape) if need_dA else None
        dB = lora_B.new_empty(lora_B.shape) if need_dB else None
        return dx, dA, dB


_register_fakes()

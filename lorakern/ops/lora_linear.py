"""The LoRA linear operation y = x W^T + b + s * (drop(x) A^T) B^T and its autograd.Function.

Three implementations of the same pair of functions (forward -> (y, xa), backward -> (dx, dA, dB)):
- triton: the fused kernels of lora_linear_triton.py (the CUDA path; the CPU interpreter in tests);
- cpp:    torch.ops.lorakern.lora_forward/lora_backward from csrc/lora_cpu.cpp (the CPU path);
- torch:  plain PyTorch (the reference, and the fallback for dtypes the kernels do not take, e.g. float64).

The backward saves what it needs and nothing more: x_l = drop(x) (for dA) and xa = x_l A^T (for dB),
never the (M, out) output. With dropout the torch/cpp paths also keep the mask as bool (1 byte/element);
the Triton path regenerates it from a Philox seed and saves x itself. The weight gradient (and so x
itself) is only computed when the caller has unfrozen the base weight.
"""
from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lorakern import _backend

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned_fallback = False
_MAX_DROPOUT_P = 1.0 - 2.0 ** -24


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


def _impls(impl: str):
    if impl == "cpp":
        return torch.ops.lorakern.lora_forward, torch.ops.lorakern.lora_backward
    return _forward_torch, _backward_torch


def _triton_ops():
    """The kernel module, imported on first use so that TRITON_INTERPRET set after `import lorakern` counts."""
    from lorakern.ops import lora_linear_triton
    return lora_linear_triton


def _choose(x, lora_A) -> str:
    impl = _backend.resolve(x.device)
    if impl == "triton" and (x.dtype not in _TRITON_DTYPES or lora_A.dtype not in _TRITON_DTYPES):
        global _warned_fallback
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"lorakern: the Triton kernels take float16/bfloat16/float32; x is {x.dtype} and the "
                          f"adapters {lora_A.dtype}, so this layer runs the plain torch implementation "
                          f"(warned once)", stacklevel=4)
        impl = "torch"
    if impl == "triton" and x.shape[0] == 0:
        impl = "torch"  # nothing to launch
    return impl


def _direct_call(*tensors) -> bool:
    """Whether the Triton launchers may be called directly, skipping the custom op's dispatcher (a few us a
    call): only in plain eager mode on plain tensors. Under torch.compile, a dispatch mode (FakeTensorMode,
    make_fx, FlopCounterMode...) or a tensor subclass (DTensor, FakeTensor) the custom op must run, so
    that its fake runs instead of a kernel launch on tensors without storage."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


def _dropout_seed(generator) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64, generator=generator)


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for the 2-D LoRA linear; `lora_linear` below handles leading dimensions.

    forward(x (M, in), weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r),
            scaling, dropout_p, generator) -> y (M, out)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, generator):
        ctx.impl = impl = _choose(x, lora_A)
        ctx.scaling = float(scaling)
        ctx.dropout_p = dropout_p
        ctx.has_bias = bias is not None
        if impl == "triton":
            seed = _dropout_seed(generator) if dropout_p > 0.0 else None
            x = x if x.stride(-1) == 1 else x.contiguous()
            kt = _triton_ops()
            fwd = kt._forward_impl if _direct_call(x, weight, bias, lora_A, lora_B) else kt.forward
            y, xa = fwd(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)
            # x is saved once, for dA (with the seed's mask) and, if the base is unfrozen, for dW.
            ctx.save_for_backward(x, xa, weight, lora_A, lora_B, seed)
            return y
        fwd, _ = _impls(impl)
        keep = None
        if dropout_p > 0.0:
            keep = torch.empty_like(x).bernoulli_(1.0 - dropout_p, generator=generator).bool()
            x_lora = x * keep / (1.0 - dropout_p)
        else:
            x_lora = x
        y, xa = fwd(x, weight, bias, x_lora, lora_A, lora_B, float(scaling))
        # x itself only when the (normally frozen) base weight wants a gradient.
        x_saved = x if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(x_lora, xa, weight, lora_A, lora_B, keep, x_saved)
        return y

    @staticmethod
    @once_differentiable  # double backward through dA/dB is not implemented: fail loudly, never silently wrong
    def backward(ctx, grad_y):
        need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
        grad_y = grad_y.contiguous()
        if ctx.impl == "triton":
            x, xa, weight, lora_A, lora_B, seed = ctx.saved_tensors
            kt = _triton_ops()
            bwd = kt._backward_impl if _direct_call(grad_y, x, weight, lora_A, lora_B) else kt.backward
            dx, dA, dB = bwd(grad_y, x, xa, weight, lora_A, lora_B, ctx.scaling, float(ctx.dropout_p), seed,
                             need_dx, need_dA, need_dB)
            return (dx, grad_y.t() @ x if need_dW else None, grad_y.sum(0) if (need_db and ctx.has_bias) else None,
                    dA, dB, None, None, None)
        x_lora, xa, weight, lora_A, lora_B, keep, x = ctx.saved_tensors
        _, bwd = _impls(ctx.impl)
        mask = None
        if keep is not None and need_dx:
            mask = keep.to(lora_A.dtype) / (1.0 - ctx.dropout_p)
        dx, dA, dB = bwd(grad_y, x_lora, xa, weight, lora_A, lora_B, ctx.scaling, mask,
                         need_dx, need_dA, need_dB)
        dW = grad_y.t() @ x if need_dW else None
        db = grad_y.sum(0) if (need_db and ctx.has_bias) else None
        return dx, dW, db, dA, dB, None, None, None


def _check_inputs(x, weight, bias, lora_A, lora_B) -> None:
    """Clear errors here instead of a wrong answer or a crash inside a kernel."""
    named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    for name, t in named.items():
        if (t is not None or name != "bias") and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1 or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"expected x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r); got shapes "
                         f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, "
                         f"lora_B {tuple(lora_B.shape)}")
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    if (x.shape[-1] != in_f or lora_A.shape[1] != in_f or lora_B.shape != (out_f, r)
            or (bias is not None and tuple(bias.shape) != (out_f,))):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}, lora_A {tuple(lora_A.shape)}, "
                         f"lora_B {tuple(lora_B.shape)} (expected x (..., in), weight (out, in), bias (out,), "
                         f"lora_A (r, in), lora_B (out, r))")
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if not x.is_floating_point() or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x, weight and bias must share one floating dtype, got x {x.dtype}, weight {weight.dtype}"
                        f", bias {None if bias is None else bias.dtype}")
    if not lora_A.is_floating_point() or lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_A and lora_B must share one floating dtype, got {lora_A.dtype} and {lora_B.dtype}")


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, generator=None):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T for x of any leading shape (..., in_features)."""
    _check_inputs(x, weight, bias, lora_A, lora_B)
    # The kernels take p in float32 and scale by 1 / (1 - p): p above 1 - 2^-24 would round to 1 there (NaN).
    if (isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float))
            or not 0.0 <= dropout_p <= _MAX_DROPOUT_P):
        raise ValueError(f"dropout_p must be a number in [0, 1) (at most 1 - 2**-24), got {dropout_p!r}")
    return apply_checked(x, weight, bias, lora_A, lora_B, scaling, float(dropout_p), generator)


def apply_checked(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, generator=None):
    """lora_linear without the argument checks, for callers that have made them (LoRALinear checks x, and
    its own parameters are consistent by construction): ~10 us less host time per call."""
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vmap, jacrev: per-sample gradients) cannot see through the autograd.Function and
        # its kernels; the same formula in differentiable torch ops can
        return _lora_linear_functional(x, weight, bias, lora_A, lora_B, float(scaling), dropout_p, generator)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    y = LoRALinearFunction.apply(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, generator)
    if x.dim() == 2:
        return y
    # A fresh tensor, not a view of y (as F.linear / matmul do): FSDP2 and in-place users expect no view.
    return torch.ops.aten._unsafe_view(y, (*lead, y.shape[-1]))


def _lora_linear_functional(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, generator):
    x_lora = x
    if dropout_p > 0.0:  # rand_like: what vmap(randomness="different") supports (bernoulli_ in place does not)
        u = (torch.rand_like(x) if generator is None else
             torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator))
        x_lora = torch.where(u >= dropout_p, x / (1.0 - dropout_p), torch.zeros_like(x))
    lora = (x_lora.to(lora_A.dtype) @ lora_A.t()) @ lora_B.t()
    return torch.nn.functional.linear(x, weight, bias) + (scaling * lora).to(x.dtype)


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

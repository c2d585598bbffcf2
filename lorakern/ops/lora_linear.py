"""The LoRA linear operation y = x W^T + b + s * (drop(x) A^T) B^T and its autograd.Function.

Implementations with one interface (`_TorchImpl` documents it), each owning its dropout:
- triton: the kernels of lora_linear_triton.py in the "hybrid" or "fused" design (CUDA; the CPU interpreter
  in tests), chosen per case by measured dispatch (lorakern.ops.dispatch);
- cpp:    torch.ops.lorakern.lora_forward/lora_backward from csrc/lora_cpu.cpp (the CPU path);
- torch:  plain PyTorch: the reference, the "cublas" design on CUDA (what runs without a measurement), and
  the fallback for dtypes the kernels do not take (e.g. float64) or kernels that failed to compile.

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
from lorakern._util import gpu_arch
from lorakern.ops import dispatch

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


class _TorchImpl:
    """The plain-torch implementation ("cublas" on CUDA: torch GEMMs and the LoRA terms as small GEMMs).

    Every implementation has this interface, and each owns its dropout: forward(x, weight, bias, lora_A,
    lora_B, scaling, dropout_p, generator, needs) -> (y, saved tensors); backward(grad_y, saved, weight,
    lora_A, lora_B, scaling, dropout_p, needs) -> (dx, dW, db, dA, dB), with needs = the autograd Function's
    needs_input_grad for (x, weight, bias, lora_A, lora_B)."""
    name = "torch"
    case = None

    @staticmethod
    def _ops():
        return _forward_torch, _backward_torch

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator, needs):
        keep, x_lora = None, x
        if dropout_p > 0.0:  # a 1-byte mask kept for backward
            # nn.Dropout's CPU arithmetic, bit for bit: a mask of 0 / 1 divided by 1 - p, times x
            scaled = torch.empty_like(x).bernoulli_(1.0 - dropout_p, generator=generator).div_(1.0 - dropout_p)
            keep, x_lora = scaled.bool(), x * scaled
        y, xa = self._ops()[0](x, weight, bias, x_lora, lora_A, lora_B, scaling)
        # x itself only when the (normally frozen) base weight wants a gradient.
        return y, (x_lora, xa, keep, x if needs[1] else None)

    def backward(self, grad_y, saved, weight, lora_A, lora_B, scaling, dropout_p, needs):
        x_lora, xa, keep, x = saved
        need_dx, need_dW, need_db, need_dA, need_dB = needs
        mask = keep.to(lora_A.dtype).div_(1.0 - dropout_p) if keep is not None and need_dx else None
        dx, dA, dB = self._ops()[1](grad_y, x_lora, xa, weight, lora_A, lora_B, scaling, mask,
                                    need_dx, need_dA, need_dB)
        return dx, _base_grad(grad_y, x, need_dW), _bias_grad(grad_y, need_db), dA, dB


class _CppImpl(_TorchImpl):
    """The C++ operators of csrc/lora_cpu.cpp (the CPU path), dropout as in the torch implementation."""
    name = "cpp"

    @staticmethod
    def _ops():
        return torch.ops.lorakern.lora_forward, torch.ops.lorakern.lora_backward


class _TritonImpl:
    """The Triton kernels, in the hybrid or the fused design, with the configs `tune` measured (or defaults).
    Dropout from a 2-element key drawn on the device per call (lora_linear_triton.draw_rng): x and the key are
    saved, never a mask."""

    def __init__(self, design: str, configs: dict | None = None, case=None):
        self.name, self.hybrid, self.configs, self.case = design, design == "hybrid", configs, case

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, generator, needs):
        kt = _triton_ops()
        x = x if x.stride(-1) == 1 else x.contiguous()
        grads = (needs[0], needs[3], needs[4])
        direct = _direct_call(x, weight, bias, lora_A, lora_B)
        if direct:  # compile first: a failure then falls back before torch's RNG was drawn from
            kt.prepare(x, weight, bias, lora_A, lora_B, dropout_p, hybrid=self.hybrid, configs=self.configs,
                       need_grads=grads)
        rng = kt.draw_rng(x.device, generator) if dropout_p > 0.0 else None
        if direct:
            y, xa = kt.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng, hybrid=self.hybrid,
                               configs=self.configs, need_grads=grads, prepared=True)
        else:
            y, xa = kt.forward_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng, self.hybrid, *grads)
        # x is saved once, for dA (with the call's mask) and, if the base is unfrozen, for dW.
        return y, (x, xa, rng)

    def backward(self, grad_y, saved, weight, lora_A, lora_B, scaling, dropout_p, needs):
        x, xa, rng = saved
        need_dx, need_dW, need_db, need_dA, need_dB = needs
        kt = _triton_ops()
        try:
            dx, dA, dB = self._backward(kt, grad_y, x, xa, rng, weight, lora_A, lora_B, scaling, dropout_p, needs)
        except Exception as exc:
            failure = _kernel_failure(exc)
            if failure is None or dropout_p > 0.0:  # with dropout the mask exists only inside the kernels
                raise
            _fall_back(self, failure)  # the forward compiled these kernels; a launch failed: x and xa suffice
            return _TORCH.backward(grad_y, (x, xa.to(lora_A.dtype), None, x), weight, lora_A, lora_B, scaling,
                                   0.0, needs)
        return dx, _base_grad(grad_y, x, need_dW), _bias_grad(grad_y, need_db), dA, dB

    def _backward(self, kt, grad_y, x, xa, rng, weight, lora_A, lora_B, scaling, dropout_p, needs):
        need_dx, need_dW, need_db, need_dA, need_dB = needs
        if _direct_call(grad_y, x, weight, lora_A, lora_B):
            return kt.backward(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, rng,
                               need_dx, need_dA, need_dB, hybrid=self.hybrid, configs=self.configs)
        return kt.backward_op(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, rng,
                              need_dx, need_dA, need_dB, self.hybrid)


def _base_grad(grad_y, x, need_dW: bool):
    return grad_y.t() @ x if need_dW else None


def _bias_grad(grad_y, need_db: bool):
    return grad_y.sum(0) if need_db else None


_TORCH, _CPP = _TorchImpl(), _CppImpl()
_arch_cache: dict = {}
_warned_failures: set = set()


def _triton_ops():
    """The kernel module, imported on first use so that TRITON_INTERPRET set after `import lorakern` counts."""
    from lorakern.ops import lora_linear_triton
    return lora_linear_triton


def _arch(device: torch.device) -> str:
    arch = _arch_cache.get(device)
    if arch is None:
        arch = _arch_cache[device] = gpu_arch(device)
    return arch


def _choose(x, weight, lora_A, dropout_p: float):
    """The implementation for this call: the backend in force, then on CUDA ("auto") the measured design."""
    impl = _backend.resolve(x.device)
    if impl == "triton" and (x.dtype not in _TRITON_DTYPES or lora_A.dtype not in _TRITON_DTYPES):
        global _warned_fallback
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"lorakern: the Triton kernels take float16/bfloat16/float32; x is {x.dtype} and the "
                          f"adapters {lora_A.dtype}, so this layer runs the plain torch implementation "
                          f"(warned once)", stacklevel=6)
        return _TORCH
    if impl == "cpp":
        return _CPP
    if impl != "triton" or x.shape[0] == 0:  # nothing to launch for an empty batch
        return _TORCH
    settings = _backend.settings()
    design, case = settings.design, None
    if x.device.type == "cuda":
        case, measured, measured_configs = dispatch.design_for(
            _arch(x.device), x.dtype, lora_A.dtype, x.shape[0], weight.shape[1], weight.shape[0], lora_A.shape[0],
            dropout_p > 0.0, not dispatch.fp32_matmul_is_exact())
        if dispatch.has_failed(case):
            return _TORCH
        if design == "auto" and settings.backend == "auto":
            design = measured
    if design == "cublas" and settings.backend == "auto":
        return _TORCH
    if design not in dispatch.TRITON_DESIGNS:  # the "triton" backend forces the kernels
        # exact fp32 on a GPU: not the Triton GEMM (its "ieee" dots spill and trail cuBLAS) unless asked for
        exact_fp32 = x.device.type == "cuda" and case.x_dtype == "fp32"
        design = "hybrid" if exact_fp32 else "fused"
    configs = measured_configs.get(design) if case is not None else None
    need = _triton_ops().partial_bytes(x.shape[0], weight.shape[1], weight.shape[0], lora_A.shape[0], x.dtype,
                                       configs)
    if need > PARTIAL_BUDGET_BYTES:  # the fixed-order reduction's buffers would not be worth their memory
        if settings.backend == "triton" and not _warned_partials:
            _warn_partials(need)
        return _TORCH
    return _TritonImpl(design, configs, case)


# The Triton backward reduces dA and dB from per-row-block partials (no atomics): (cdiv(M, 64) x out +
# cdiv(M, 128) x in) x r fp32, transient. Above this the layer takes the cuBLAS/torch path instead.
PARTIAL_BUDGET_BYTES = 1 << 30
_warned_partials = False


def _warn_partials(need: int) -> None:
    global _warned_partials
    _warned_partials = True
    warnings.warn(f"lorakern: this layer's Triton backward would need {need / 2**30:.1f} GiB of partial sums for "
                  f"its deterministic dA/dB reduction (more than {PARTIAL_BUDGET_BYTES / 2**30:.0f} GiB): it runs "
                  f"the torch path (warned once)", stacklevel=7)


def _fall_back(impl, failure) -> None:
    """A Triton kernel failed to compile: warn once per kernel and config, and run the cuBLAS path for that
    case from now on."""
    key = (failure.kernel, repr(sorted(failure.config.items())))
    if key not in _warned_failures:
        _warned_failures.add(key)
        warnings.warn(f"lorakern: {failure}; the layer runs the cuBLAS/torch path instead (design {impl.name}; "
                      f"`python -m lorakern check` tests every kernel)", stacklevel=6)
    if impl.case is not None:
        dispatch.mark_failed(impl.case)


def _kernel_failure(exc: BaseException | None):
    """The KernelFailure inside `exc` (the custom op may wrap it), or None."""
    while exc is not None:
        if type(exc).__name__ == "KernelFailure":
            return exc
        exc = exc.__cause__ or exc.__context__
    return None



def _direct_call(*tensors) -> bool:
    """Whether the Triton launchers may be called directly, skipping the custom op's dispatcher (a few us a
    call): only in plain eager mode on plain tensors. Under torch.compile, a dispatch mode (FakeTensorMode,
    make_fx, FlopCounterMode...) or a tensor subclass (DTensor, FakeTensor) the custom op must run, so
    that its fake runs instead of a kernel launch on tensors without storage."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for the 2-D LoRA linear; `lora_linear` below handles leading dimensions. No per-backend
    branches: the implementation chosen for the call (`_choose`) runs both directions.

    forward(x (M, in), weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r),
            scaling, dropout_p, generator) -> y (M, out)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, generator):
        impl = _choose(x, weight, lora_A, dropout_p)
        needs = tuple(ctx.needs_input_grad[:5])
        needs = needs[:2] + (needs[2] and bias is not None,) + needs[3:]
        args = (x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), generator, needs)
        try:
            y, saved = impl.forward(*args)
        except Exception as exc:
            failure = _kernel_failure(exc)
            if failure is None:
                raise
            _fall_back(impl, failure)
            impl = _TORCH
            y, saved = impl.forward(*args)
        ctx.impl, ctx.scaling, ctx.dropout_p, ctx.needs = impl, float(scaling), float(dropout_p), needs
        ctx.save_for_backward(weight, lora_A, lora_B, *saved)
        return y

    @staticmethod
    @once_differentiable  # double backward through dA/dB is not implemented: fail loudly, never silently wrong
    def backward(ctx, grad_y):
        weight, lora_A, lora_B, *saved = ctx.saved_tensors
        grads = ctx.impl.backward(grad_y.contiguous(), saved, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p,
                                  ctx.needs)
        return (*grads, None, None, None)



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

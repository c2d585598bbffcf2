"""Existing peft code gets lorakern in one line: `model = lk.accelerate(get_peft_model(base, config))`.

    import lorakern as lk
    from peft import LoraConfig, get_peft_model

    model = lk.accelerate(get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=[...])))
    ...                                  # train, save_pretrained, merge_and_unload: peft as before
    lk.restore(model)                    # peft's own forward again (optional)

`accelerate` routes the forward of every peft LoRA `Linear` whose base layer is a plain `nn.Linear` through
lorakern's fused op `lorakern.ops.lora_linear` (the C++ path on the CPU, the measured Triton/cuBLAS dispatch on
CUDA). It changes nothing else: the module is the same object of the same class, with the same parameters,
names and state-dict keys, so every peft method (save_pretrained / from_pretrained, merge_adapter /
unmerge_adapter, merge_and_unload, disable_adapter(), set_adapter, add_adapter, several adapters,
print_trainable_parameters) works as before. The forward is installed per instance (an instance attribute
`forward`, a functools.partial of a module-level function, so deepcopy and pickling keep it), and reads the
layer's state at every call, so set_adapter, disable_adapter and merging change its behaviour live.

The fused op runs when the call is plain vanilla LoRA; otherwise the call goes to peft's own
`Linear.forward`, unchanged. lorakern's op runs when:
  - the layer is not merged and its adapters are not disabled;
  - the call has no extra arguments (peft's mixed-batch `adapter_names=`, variant kwargs...);
  - exactly one active adapter is present in the layer, and it has no LoRA variant (DoRA, aLoRA, ...);
  - its dropout is nn.Identity or nn.Dropout (p applies in the dropout module's training mode, as in peft);
  - base layer, lora_A, lora_B and dropout are plain modules without hooks (an offloading hook must run);
  - dtypes are ones the op takes: adapters in the base dtype, or fp32 adapters on an fp16/bf16 base (x is
    not cast to fp32: the rank-r products run in fp32 and the LoRA term is rounded once). Under
    torch.autocast the base runs in the autocast dtype and the adapters keep their own, as lorakern's
    LoRALinear does (peft would run the adapters in the autocast dtype too).
lora_bias (a bias on lora_B) is added exactly (+ scaling * lora_B.bias); rsLoRA needs nothing (peft's
scaling already holds alpha / sqrt(r)). With dropout, lorakern's CPU path draws its mask exactly as
nn.Dropout does on the CPU (bernoulli_ on a tensor like x, from the default generator; the mask does not
depend on the dtype), so a seeded CPU training run draws the same masks as plain peft. On CUDA the masks
differ from nn.Dropout's (the Triton kernels draw their own; same distribution).
"""
from __future__ import annotations

import functools
import warnings
from collections import defaultdict

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from lorakern import _backend
from lorakern.ops.lora_linear import _MAX_DROPOUT_P, apply_checked

__all__ = ["accelerate", "restore"]

_LOW = (torch.float16, torch.bfloat16)
_MAX_LISTED = 20  # names listed per kind in the warning


def _peft_lora_layer():
    """peft.tuners.lora.layer, imported on first use (`import lorakern` never imports peft)."""
    try:
        from peft.tuners.lora import layer
    except ImportError as exc:  # pragma: no cover - peft is a test dependency
        raise ImportError("lorakern.accelerate works on peft models, and peft is not installed "
                          "(pip install peft)") from exc
    return layer


def _hooked(m: nn.Module) -> bool:
    """Whether calling m runs anything besides its class's forward (hooks, or a forward replaced on the
    instance, e.g. accelerate's offloading hooks): then peft must call it as a module."""
    return bool(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__)


def _global_hooks() -> bool:
    return bool(_nn_module._global_forward_pre_hooks or _nn_module._global_forward_hooks
                or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks)


def _fast(module: nn.Module, x) -> torch.Tensor | None:
    """lorakern's op on this call, or None when the call is not plain vanilla LoRA (then peft's forward runs)."""
    if (not isinstance(x, torch.Tensor) or module.disable_adapters or module.merged or module.fan_in_fan_out
            or _global_hooks()):
        return None
    lora_A = module.lora_A
    present = [name for name in module.active_adapters if name in lora_A]
    if len(present) != 1:
        return None
    name = present[0]
    if name in getattr(module, "lora_variant", ()) or module.use_dora.get(name, False):
        return None
    base, mod_A, mod_B, drop = module.base_layer, lora_A[name], module.lora_B[name], module.lora_dropout[name]
    if (type(base) is not nn.Linear or type(mod_A) is not nn.Linear or type(mod_B) is not nn.Linear
            or mod_A.bias is not None or _hooked(base) or _hooked(mod_A) or _hooked(mod_B) or _hooked(drop)):
        return None
    if type(drop) is nn.Dropout:
        p = drop.p if drop.training else 0.0
    elif type(drop) is nn.Identity:
        p = 0.0
    else:
        return None
    scaling = module.scaling[name]
    if (isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or isinstance(p, bool)
            or not isinstance(p, (int, float)) or not 0.0 <= p <= _MAX_DROPOUT_P):
        return None
    w, b, A, B = base.weight, base.bias, mod_A.weight, mod_B.weight
    if not x.is_floating_point() or x.dim() == 0 or x.shape[-1] != w.shape[1] or x.device != w.device:
        return None
    adt = A.dtype
    if (B.dtype != adt or A.device != w.device or B.device != w.device or A.shape[1] != w.shape[1]
            or B.shape[0] != w.shape[0] or B.shape[1] != A.shape[0]):
        return None  # everything lora_linear's checks would refuse: apply_checked below skips them
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype != torch.float64 and w.dtype != torch.float64:
        cdt = torch.get_autocast_dtype(dev)  # the base in the autocast dtype, the adapters in their own
        if not (adt == cdt or (adt == torch.float32 and cdt in _LOW)):
            return None
        with torch.autocast(dev, enabled=False):
            y = apply_checked(x.to(cdt), w.to(cdt), None if b is None else b.to(cdt), A, B, scaling, float(p))
    else:
        xdt = x.dtype
        if (w.dtype != xdt or (b is not None and b.dtype != xdt)
                or not (adt == xdt or (adt == torch.float32 and xdt in _LOW
                                       and getattr(module, "cast_input_dtype_enabled", True)))):
            return None  # peft's forward handles (or reports) what the op does not take
        y = apply_checked(x, w, b, A, B, scaling, float(p))
    if mod_B.bias is not None:  # lora_bias=True: peft's lora_B(...) * scaling adds scaling * bias
        y = y + (mod_B.bias * scaling).to(y.dtype)
    return y


def _accelerated_forward(module: nn.Module, x, *args, **kwargs):
    """The forward `accelerate` installs on a peft LoRA Linear: lorakern's op for a plain call, else peft's."""
    if not args and not kwargs:
        y = _fast(module, x)
        if y is not None:
            return y
    return type(module).forward(module, x, *args, **kwargs)


def _is_accelerated(m: nn.Module) -> bool:
    f = m.__dict__.get("forward")
    return isinstance(f, functools.partial) and f.func is _accelerated_forward


def _install(m: nn.Module) -> None:
    m.forward = functools.partial(_accelerated_forward, m)


def _check_module(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"lorakern.{fn}: model must be a torch.nn.Module (a peft.PeftModel or a model holding peft "
                        f"LoRA layers), got {type(model).__name__}")


def _no_lora_error(model: nn.Module) -> ValueError:
    from lorakern.layer import LoRALinear
    ours = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    msg = (f"lorakern.accelerate: the {type(model).__name__} has no peft LoRA layers (no module is a "
           f"peft.tuners.lora.LoraLayer), so there is nothing to accelerate")
    if ours:
        return ValueError(f"{msg}; it has {len(ours)} lorakern LoRALinear layer(s) (e.g. {ours[0]!r}), which are "
                          f"lorakern's own and already accelerated: no accelerate call is needed")
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        other = sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseTunerLayer)})
    except ImportError:  # pragma: no cover
        other = []
    if other:
        return ValueError(f"{msg}; its peft adapter layers are {', '.join(other)} (not LoRA)")
    return ValueError(f"{msg}; wrap it first: peft.get_peft_model(model, LoraConfig(...))")


def _unsupported_kind(m: nn.Module, linear_cls) -> str | None:
    """Why this peft LoRA layer keeps peft's forward for every call, or None if it can be accelerated."""
    if type(m) is not linear_cls:
        return f"lora.{type(m).__name__}"
    if type(m.base_layer) is not nn.Linear:
        return f"lora.Linear on a {type(m.base_layer).__name__} base"
    if m.fan_in_fan_out:
        return "lora.Linear with fan_in_fan_out"
    if "forward" in m.__dict__ and not _is_accelerated(m):
        return "lora.Linear whose forward is already replaced on the instance"
    return None


def _adapter_kinds(m: nn.Module) -> list[str]:
    """Adapters of an accelerated layer for which peft's forward still runs (while they are active)."""
    kinds = []
    for name in m.lora_A:
        variant = m.lora_variant.get(name)
        if variant is not None:
            kinds.append(f"adapter {name!r} with the LoRA variant {type(variant).__name__} "
                         f"(peft's forward while it is active)")
        drop = m.lora_dropout[name] if name in m.lora_dropout else None
        if drop is not None and type(drop) not in (nn.Dropout, nn.Identity):
            kinds.append(f"adapter {name!r} with dropout {type(drop).__name__} (peft's forward while it is active)")
    return kinds


def accelerate(model: nn.Module) -> nn.Module:
    """Run the peft LoRA layers of `model` on lorakern's fused LoRA op; returns `model` itself (the same object,
    changed in place), so `model = lk.accelerate(get_peft_model(base, config))` works.

    model: a peft.PeftModel, or any nn.Module holding peft LoRA layers. Every peft LoRA `Linear` whose base
    layer is a plain nn.Linear gets an instance-level forward that calls `lorakern.ops.lora_linear` for plain
    vanilla-LoRA calls and peft's own `Linear.forward` for everything else (merged or disabled adapters,
    several active adapters, DoRA and other variants, `adapter_names=` mixed batches, hooks: see the module
    docstring). Parameters, names, state-dict keys and all peft methods are unchanged.

    Layers that keep peft's forward for every call (Embedding, Conv, MultiheadAttention, ParamWrapper, quantized
    or other non-nn.Linear bases) and adapters that do while active (DoRA...) are listed in one warning.
    Idempotent: a second call changes nothing (already accelerated layers are left as they are). Undo with
    `lorakern.restore(model)`.

    Raises TypeError if `model` is not an nn.Module, ValueError if it has no peft LoRA layer at all.
    """
    _check_module(model, "accelerate")
    lora = _peft_lora_layer()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, lora.LoraLayer)]
    if not found:
        raise _no_lora_error(model)
    skipped: dict[str, list[str]] = defaultdict(list)
    for name, m in found:
        kind = _unsupported_kind(m, lora.Linear)
        if kind is not None:
            skipped[kind].append(name or "<model>")
            continue
        if not _is_accelerated(m):
            _install(m)
        for kind in _adapter_kinds(m):
            skipped[kind].append(name or "<model>")
    # lorakern's settings are read from the environment at first use: do it now, not inside the first
    # torch.compile trace (whose guard on the unset settings would fail at the next call: one recompile)
    _backend.settings()
    if skipped:
        total = len({n for names in skipped.values() for n in names})
        parts = []
        for kind, names in skipped.items():
            more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
            parts.append(f"{kind}: {', '.join(names[:_MAX_LISTED])}{more}")
        warnings.warn(f"lorakern.accelerate: {total} of {len(found)} peft LoRA layer(s) keep peft's own forward "
                      f"(lorakern's op takes vanilla LoRA on a plain nn.Linear): " + "; ".join(parts), stacklevel=2)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo `accelerate`: every layer it accelerated runs peft's own forward again (the instance attribute is
    removed; nothing is left behind). Returns `model` itself. A model that is not accelerated is left as it is."""
    _check_module(model, "restore")
    for m in model.modules():
        if _is_accelerated(m):
            del m.forward
    return model

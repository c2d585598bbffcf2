"""LoRALinear: an nn.Linear with a frozen base and a trainable low-rank adapter (API.md "Layer")."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakern import init as lora_init
from lorakern._util import check_number
from lorakern.ops.lora_linear import _MAX_DROPOUT_P, apply_checked, lora_linear


def resolve_init(init) -> Callable:
    """The init function for `init=`: a name from lorakern.init.WEIGHT_INITS or a callable."""
    if callable(init):
        return init
    if isinstance(init, str) and init in lora_init.WEIGHT_INITS:
        return lora_init.WEIGHT_INITS[init]
    raise ValueError(f"init must be one of {sorted(lora_init.WEIGHT_INITS)} or a callable, got {init!r}")


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def share_hooks(src: nn.Module, dst: nn.Module) -> None:
    """dst uses src's module hooks, the same dicts (peft keeps them on the wrapped base_layer): a hook that
    scales or records the layer's output still sees it, and the handles the user holds still remove it."""
    for name in _HOOK_DICTS:
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))
    if getattr(src, "_is_full_backward_hook", None) is not None:
        dst._is_full_backward_hook = src._is_full_backward_hook


def _recompress(A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """B @ A with the fewest columns (None if it is zero): thin QRs of B and A^T, the SVD of the small core,
    directions below the rounding level of the summed parts dropped (PiSSA then LoRA-GA on one layer
    recorded 3r columns of a rank-r offset). scale: the sum over the concatenated parts of |B_i| |A_i|,
    the size of what may have cancelled (not |B| |A|, whose cross terms can be far larger)."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.mT)
    k = int((S > A.shape[0] * torch.finfo(S.dtype).eps * scale).sum())
    if k == 0:
        return None
    return (S[:k, None] * Vh[:k]) @ Qa.mT, Qb @ U[:, :k]


class LoRALinear(nn.Linear):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T with W, b frozen and A (r, in), B (out, r) trainable.

    `weight`/`bias` keep nn.Linear's names, so base state dicts load and code looking for nn.Linear works.
    The state dict does not record `merged`: save adapters unmerged (or with save_adapter).
    scaling = alpha / r, or alpha / sqrt(r) with rslora=True. `adapter_dtype` (default: the base dtype)
    lets fp32 adapters train on a bf16 base, as the papers do.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16, bias: bool = True,
                 dropout: float = 0.0, rslora: bool = False, init: str | Callable = "lora",
                 device=None, dtype=None, adapter_dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_adapter(r, alpha, dropout, rslora, init, adapter_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, **kw) -> "LoRALinear":
        """Wrap an existing nn.Linear: its weight and bias Parameters are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, LoRALinear):
            raise TypeError("linear is already a LoRALinear; merge or remove its adapter first")
        if torch.nn.utils.parametrize.is_parametrized(linear):
            raise TypeError("linear has a parametrized weight (e.g. weight_norm): its weight is computed, not a "
                            "Parameter to share; remove the parametrization first")
        unknown = set(kw) - {"dropout", "rslora", "init", "adapter_dtype"}
        if unknown:
            raise TypeError(f"from_linear got unexpected keyword arguments {sorted(unknown)}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._setup_adapter(r, alpha, kw.get("dropout", 0.0), kw.get("rslora", False), kw.get("init", "lora"),
                             kw.get("adapter_dtype"))
        layer.train(linear.training)  # an eval-mode model stays in eval mode (no dropout at inference)
        share_hooks(linear, layer)
        if getattr(linear, "_is_hf_initialized", False):  # transformers' init_weights() must not re-draw W
            layer._is_hf_initialized = True
        return layer

    def _setup_adapter(self, r, alpha, dropout, rslora, init, adapter_dtype) -> None:
        resolve_init(init)  # validate everything before the base is frozen
        self.r = lora_init.check_rank(r, self.in_features, self.out_features, bounded=False)
        self.alpha = check_number(alpha, "alpha", 0.0)
        self.dropout = check_number(dropout, "dropout", 0.0, _MAX_DROPOUT_P)  # [0, 1): the kernels' fp32 bound
        self.rslora = bool(rslora)
        self.scaling = self.alpha / (math.sqrt(self.r) if self.rslora else self.r)
        if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
            raise TypeError(f"adapter_dtype must be a floating torch.dtype, got {adapter_dtype!r}")
        adt = adapter_dtype or self.weight.dtype
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=dev, dtype=adt))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, device=dev, dtype=adt))
        self.merged = False
        # Low-rank record of what an init subtracted from the base weight (PiSSA's principal part, LoRA-GA's
        # offset): original weight = weight + base_offset_B @ base_offset_A (scaling included, so a later
        # change of alpha does not change it). save_adapter uses it to write an adapter that applies to the
        # original (pretrained) base; remove_lora(merge=False) to restore it. In the state dict when set.
        self.register_buffer("base_offset_A", None)
        self.register_buffer("base_offset_B", None)
        self.reset_lora_parameters(init)

    def reset_parameters(self) -> None:
        """nn.Linear's reset of weight and bias, then the adapter's init (the one the layer was built with):
        what meta-device initialization runs after to_empty() (FSDP, accelerate, torchtitan)."""
        super().reset_parameters()
        if hasattr(self, "lora_A"):  # nn.Linear.__init__ calls this before the adapter exists
            self.merged = False
            self.base_offset_A = self.base_offset_B = None  # a new weight: no init has touched it yet
            init, kw = getattr(self, "_init", ("lora", {}))  # (a layer pickled by an older version has none)
            self.reset_lora_parameters(init, **kw)

    def reset_lora_parameters(self, init: str | Callable = "lora", **kw) -> None:
        """(Re)initialize the adapter: a name from lorakern.init.WEIGHT_INITS or fn(weight, r, **kw) -> (A, B).

        "pissa" also replaces the base weight by its residual W - scaling * B A (API.md), so the layer's
        output is unchanged; the other weight-only inits leave the weight alone.
        """
        fn = resolve_init(init)
        if self.weight.device.type == "meta":  # no values yet: reset_parameters() runs it after to_empty()
            self._init = (init, dict(kw))
            return
        if self.merged:
            raise ValueError("reset_lora_parameters: the layer is merged; unmerge() it first")
        if fn is lora_init.pissa and getattr(self, "weight_tied", False):
            raise ValueError("reset_lora_parameters: PiSSA replaces the base weight by its residual, but this "
                             "layer's weight is tied to another module (apply_lora found it), which would change too")
        pissa = fn is lora_init.pissa
        if pissa:
            kw.setdefault("scaling", self.scaling)
        # The init sees the weight in the adapter dtype (a no-op when they agree), so fp32 adapters on a
        # bf16 base are computed and kept in fp32; PiSSA sees it in the wider of the two (it writes the base).
        work = torch.promote_types(self.weight.dtype, self.lora_A.dtype) if pissa else self.lora_A.dtype
        out = fn(self.weight.detach().to(work), self.r, **kw)
        A, B = out[0], out[1]
        if A.shape != self.lora_A.shape or B.shape != self.lora_B.shape:
            raise ValueError(f"init returned A {tuple(A.shape)}, B {tuple(B.shape)}; expected "
                             f"{tuple(self.lora_A.shape)}, {tuple(self.lora_B.shape)}")
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
            if pissa:  # the residual of the factors as stored (bf16 adapters on an fp32 base: no bf16 error in W)
                wide = torch.promote_types(work, torch.float32)
                stored = self.lora_B.to(wide) @ self.lora_A.to(wide)
                self.weight.copy_(self.weight.to(wide) - self.scaling * stored)
                self.record_base_offset(self.lora_A, self.lora_B)
        self._init = (init, dict(kw))  # what reset_parameters() re-runs (set once the init has succeeded)

    @torch.no_grad()
    def record_base_offset(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Note that scaling * B @ A (A (k, in), B (out, k), the layer's current scaling) was subtracted from
        the base weight by an init; offsets add up (factors concatenated). Zero factors are skipped."""
        if not (A.any() and B.any()) or self.scaling == 0:  # nothing was subtracted
            return
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise FloatingPointError("record_base_offset: the init's factors are not finite")
        wide = torch.promote_types(torch.promote_types(A.dtype, self.weight.dtype), torch.float32)
        A, B = A.detach().to(wide), B.detach().to(wide) * self.scaling
        if self.base_offset_A is not None:
            A0, B0 = self.base_offset_A.to(wide), self.base_offset_B.to(wide)
            scale = float(A0.norm() * B0.norm() + A.norm() * B.norm())
            both = _recompress(torch.cat([A0, A], dim=0), torch.cat([B0, B], dim=1), scale)
            if both is None:  # the new offset undid the old one exactly
                self.base_offset_A = self.base_offset_B = None
                return
            A, B = both
        self.base_offset_A, self.base_offset_B = A.clone(), B.clone()

    @torch.no_grad()
    def restore_base(self) -> None:
        """Add the recorded init offset back into the base weight (the original weight again) and forget it."""
        if self.base_offset_A is None:
            return
        if self.merged:
            raise ValueError("restore_base: the layer is merged; unmerge() it first")
        wide = self.base_offset_A.dtype
        self.weight.copy_(self.weight.to(wide) + self.base_offset_B @ self.base_offset_A)
        self.base_offset_A = self.base_offset_B = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A merged layer's weight holds W + ΔW: a loaded weight or adapter would be unmerged wrongly later.
        if self.merged and any(k.startswith(prefix) and "." not in k[len(prefix):] for k in state_dict):
            raise ValueError(f"load_state_dict: the LoRALinear {prefix.rstrip('.') or '(root)'} is merged; unmerge() "
                             f"it (or lorakern.unmerge_lora(model)) before loading a state dict into it")
        if prefix + "weight" in state_dict:
            # The record of an init's offset belongs to the weight it comes with: taken from the state dict
            # (any rank), or dropped when the state dict has none (a plain or older checkpoint).
            for name in ("base_offset_A", "base_offset_B"):
                value = state_dict.get(prefix + name)
                setattr(self, name, None if value is None else
                        value.detach().to(self.weight.device, torch.promote_types(value.dtype, torch.float32)).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in ("base_offset_A", "base_offset_B"):  # load_state_dict(assign=True) takes the dict's tensor
            value = getattr(self, name)
            if value is not None and value.dtype not in (torch.float32, torch.float64):
                setattr(self, name, value.float())

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Linear's argument name, so input= works
        x, w, b = input, self.weight, self.bias
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension in_features={self.in_features}, got shape {tuple(x.shape)}")
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the layer's weight is on {w.device}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if (torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64
                and w.dtype != torch.float64):  # autocast leaves float64 alone, as for nn.Linear
            # Autocast: run the base in the autocast dtype; the adapters keep their own dtype.
            cdt = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(cdt), w.to(cdt)
            b = b.to(cdt) if b is not None else None
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x, w, b)
        if x.dtype != w.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the layer's weight has dtype {w.dtype}; "
                            f"cast x or the layer (or use torch.autocast)")
        return self._forward(x, w, b)

    def _forward(self, x, w, b):
        if self.merged:
            return F.linear(x, w, b)
        p = self.dropout if self.training else 0.0
        A, B = self.lora_A, self.lora_B
        if (A.device != w.device or B.dtype != A.dtype or not A.is_floating_point() or A.shape[0] != B.shape[1]
                or A.shape[1] != w.shape[1] or B.shape[0] != w.shape[0] or w.shape[1] != x.shape[-1]
                or (b is not None and (b.shape != (w.shape[0],) or b.dtype != x.dtype))
                or not 0.0 <= p <= _MAX_DROPOUT_P):  # a parameter or attribute changed after construction
            return lora_linear(x, w, b, A, B, self.scaling, p)  # the full checks and their messages
        return apply_checked(x, w, b, A, B, self.scaling, p)  # forward() has checked x against the weight

    # -- merging ---------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """scaling * lora_B @ lora_A, shape (out, in), in the adapter dtype (computed in at least fp32).

        Differentiable, so it can enter a regularizer."""
        work = torch.promote_types(self.lora_A.dtype, torch.float32)
        return ((self.lora_B.to(work) @ self.lora_A.to(work)) * self.scaling).to(self.lora_A.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight; forward becomes a plain linear until unmerge()."""
        if self.merged:
            raise ValueError("merge: this LoRALinear is already merged; call unmerge() first")
        self._add_delta(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again (exact up to the base dtype's rounding)."""
        if not self.merged:
            raise ValueError("unmerge: this LoRALinear is not merged")
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        work = torch.promote_types(self.weight.dtype, torch.float32)
        delta = (self.lora_B.to(work) @ self.lora_A.to(work)).mul_(sign * self.scaling)
        self.weight.copy_(self.weight.to(work).add_(delta))  # one rounding to the base dtype

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new plain nn.Linear holding the merged weight (this layer is left as it is)."""
        lin = torch.nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias is not None,
                                       device=self.weight.device, dtype=self.weight.dtype)  # no RNG draws
        weight = self.weight.detach().clone()
        if not self.merged:
            work = torch.promote_types(weight.dtype, torch.float32)
            weight = (weight.to(work) + self.delta_weight().to(work)).to(weight.dtype)
        lin.weight.copy_(weight)
        lin.weight.requires_grad_(self.weight.requires_grad)
        lin.train(self.training)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
            lin.bias.requires_grad_(self.bias.requires_grad)
        return lin

    def extra_repr(self) -> str:
        adt = "" if self.lora_A.dtype == self.weight.dtype else f", adapter_dtype={self.lora_A.dtype}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"rslora={self.rslora}{adt}, merged={self.merged}")

"""Weight-only initializations of the LoRA factors (API.md "Initialization").

Each returns tensors in the layout lora_A (r, in), lora_B (out, r), in `weight`'s dtype and device,
sampled in at least fp32 (fp64 weights sample in fp64). The gradient-based inits (LoRA-One, LoRA-GA) and
the SVD/Nystrom ones go through `lorakern.spectral_init` and live beside these once implemented.
"""
from __future__ import annotations

import math

import torch


def check_rank(r: object, in_features: int, out_features: int, name: str = "r") -> int:
    """Validate a LoRA rank: an int with 1 <= r <= min(in_features, out_features)."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{name} must be an int, got {type(r).__name__} {r!r}")
    if not 1 <= r <= min(in_features, out_features):
        raise ValueError(f"{name}={r} must satisfy 1 <= {name} <= min(in_features, out_features) = "
                         f"min({in_features}, {out_features}) = {min(in_features, out_features)}")
    return r


def _check_weight(weight: torch.Tensor, r: object) -> tuple[int, int, torch.dtype]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    out_f, in_f = weight.shape
    check_rank(r, in_f, out_f)
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return out_f, in_f, work


def lora(weight: torch.Tensor, r: int, generator: torch.Generator | None = None):
    """peft's default: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0. Returns (A, B)."""
    out_f, in_f, work = _check_weight(weight, r)
    bound = 1.0 / math.sqrt(in_f)
    A = torch.empty(r, in_f, dtype=work, device=weight.device).uniform_(-bound, bound, generator=generator)
    B = torch.zeros(out_f, r, dtype=weight.dtype, device=weight.device)
    return A.to(weight.dtype), B


def gaussian(weight: torch.Tensor, r: int, std: float | None = None, generator: torch.Generator | None = None):
    """A ~ N(0, std^2) with std = 1/r by default (peft's init_lora_weights="gaussian"), B = 0. Returns (A, B)."""
    out_f, in_f, work = _check_weight(weight, r)
    std = 1.0 / r if std is None else float(std)
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    A = torch.empty(r, in_f, dtype=work, device=weight.device).normal_(0.0, std, generator=generator)
    B = torch.zeros(out_f, r, dtype=weight.dtype, device=weight.device)
    return A.to(weight.dtype), B


# Names accepted by `init=` in LoRALinear / apply_lora.
WEIGHT_INITS = {"lora": lora, "gaussian": gaussian}

"""Finding and checking the (lora_A, lora_B) pairs an optimizer preconditions."""
from __future__ import annotations

import torch
from torch import nn

from lorakern.layer import LoRALinear
from lorakern.model import lora_modules


def collect_pairs(model, arg: str = "model") -> tuple[list[tuple[nn.Parameter, nn.Parameter]], list[nn.Parameter]]:
    """([(lora_A, lora_B), ...], other trainable parameters) of a module or an iterable of LoRALinear.

    For a module, the other parameters are its trainable ones (requires_grad) that are not an adapter
    factor; for an iterable of LoRALinear there are none. A pair whose two factors are both frozen is left out.
    """
    if isinstance(model, nn.Module):
        layers = list(lora_modules(model).values())
        if not layers:
            raise ValueError(f"{arg} ({type(model).__name__}) has no LoRALinear layers; call "
                             f"lorakern.apply_lora(model, ...) first or pass the LoRALinear modules")
        factor_ids = {id(t) for layer in layers for t in (layer.lora_A, layer.lora_B)}
        others = [p for _, p in model.named_parameters() if p.requires_grad and id(p) not in factor_ids]
    elif isinstance(model, (torch.Tensor, str, bytes, dict)) or not hasattr(model, "__iter__"):
        raise TypeError(f"{arg} must be a torch.nn.Module or an iterable of LoRALinear modules, "
                        f"got {type(model).__name__}")
    else:
        layers = list(model)
        for item in layers:
            if not isinstance(item, LoRALinear):
                hint = (" (pass the model or its LoRALinear modules, not parameters: the optimizer needs to know "
                        "which lora_A belongs to which lora_B)" if isinstance(item, torch.Tensor) else "")
                raise TypeError(f"{arg} must be a torch.nn.Module or an iterable of LoRALinear modules, "
                                f"got an iterable containing {type(item).__name__}{hint}")
        if not layers:
            raise ValueError(f"{arg} is an empty iterable; it must hold at least one LoRALinear")
        others = []
    pairs, seen = [], set()
    for layer in layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if layer.lora_A.requires_grad or layer.lora_B.requires_grad:
            pairs.append((layer.lora_A, layer.lora_B))
    if not pairs and not others:
        raise ValueError(f"{arg} has nothing to train: every lora_A/lora_B has requires_grad=False")
    return pairs, others


def check_pairs(params: list[torch.Tensor]) -> None:
    """A LoRA param group holds [A_0, B_0, A_1, B_1, ...] with A_i (r_i, in_i) and B_i (out_i, r_i)."""
    if len(params) % 2:
        raise ValueError(f"a param group with lora_pairs=True must hold (lora_A, lora_B) pairs, got "
                         f"{len(params)} tensors")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a LoRA factor appears twice among the optimizer's pairs")
    for i in range(0, len(params), 2):
        A, B = params[i], params[i + 1]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"pair {i // 2}: expected lora_A (r, in) and lora_B (out, r), got shapes "
                             f"{tuple(A.shape)} and {tuple(B.shape)}")
        if A.dtype != B.dtype or not A.is_floating_point():
            raise TypeError(f"pair {i // 2}: lora_A and lora_B must share one floating dtype, got {A.dtype} "
                            f"and {B.dtype}")
        if A.device != B.device:
            raise ValueError(f"pair {i // 2}: lora_A is on {A.device} but lora_B is on {B.device}")

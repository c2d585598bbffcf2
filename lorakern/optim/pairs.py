"""Finding and checking the (lora_A, lora_B) pairs an optimizer preconditions.

Pairs come from lorakern's LoRALinear layers and from peft's LoRA layers (a peft.PeftModel, or any module
holding them): for every peft LoRA layer whose update is scaling * lora_B @ lora_A with both factors nn.Linear
modules (lora.Linear, on any base layer, quantized ones included; lora.MultiheadAttention), each adapter with a
trainable factor gives the pair (lora_A[name].weight (r, in), lora_B[name].weight (out, r)), the layout of
LoRALinear's (plain adapters and DoRA, whose direction is B @ A). peft's other trainable parameters
(modules_to_save copies, DoRA magnitudes, lora_B biases, the factors of Embedding / Conv / ParamWrapper adapters,
whose update is not a plain B @ A, and of other LoRA variants) are "other" parameters.
peft is never imported here: a module can hold peft layers only once peft has been imported.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from lorakern.layer import LoRALinear

_NOT_MATRIX_LORA = ("Embedding", "_ConvNd", "ParamWrapper")  # peft LoRA layers whose update is not B @ A


def peft_lora_layer_classes() -> tuple[type | None, tuple[type, ...]]:
    """(peft.tuners.lora.LoraLayer, the LoraLayer classes whose update is not B @ A), or (None, ()) while
    peft is not imported (then no module can be a peft layer)."""
    mod = sys.modules.get("peft.tuners.lora.layer")
    if mod is None or not hasattr(mod, "LoraLayer"):
        return None, ()
    return mod.LoraLayer, tuple(c for c in (getattr(mod, n, None) for n in _NOT_MATRIX_LORA) if isinstance(c, type))


def peft_adapter_pairs(module: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """[(adapter name, lora_A weight, lora_B weight), ...] of a peft LoRA layer whose update is
    scaling * B @ A (empty for any other module), in the layer's adapter order."""
    lora_layer, excluded = peft_lora_layer_classes()
    if lora_layer is None or not isinstance(module, lora_layer) or isinstance(module, excluded):
        return []
    out = []
    mods_A, mods_B = getattr(module, "lora_A", {}), getattr(module, "lora_B", {})
    for name in mods_A:
        if name not in mods_B:
            continue
        a, b = mods_A[name], mods_B[name]
        if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)):
            continue
        variant = getattr(module, "lora_variant", {}).get(name)
        if variant is not None and not getattr(module, "use_dora", {}).get(name, False):
            continue  # structured factors (block-diagonal, ...): a dense r x r preconditioner would break them
        A, B = a.weight, b.weight
        if A.dim() == 2 and B.dim() == 2 and A.shape[0] == B.shape[1]:
            out.append((name, A, B))
    return out


def _is_peft_lora_layer(m) -> bool:
    lora_layer, _ = peft_lora_layer_classes()
    return lora_layer is not None and isinstance(m, lora_layer)


def collect_pairs(model, arg: str = "model") -> tuple[list[tuple[nn.Parameter, nn.Parameter]], list[nn.Parameter]]:
    """([(lora_A, lora_B), ...], other trainable parameters) of a module or an iterable of LoRA layers.

    A module's pairs come from its LoRALinear layers and its peft LoRA layers (see the module docstring), in
    the order of named_modules(); its other parameters are its trainable ones (requires_grad) that are not a
    factor of a pair. An iterable may hold LoRALinear modules and peft LoRA layers (it has no other
    parameters). A pair whose two factors are both frozen is left out.
    """
    if isinstance(model, nn.Module):
        layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear) or peft_adapter_pairs(m)]
        if not layers:
            peft_note = ("; its peft LoRA layers are all ones whose update is not a plain lora_B @ lora_A (Embedding, "
                         "Conv, ParamWrapper, LoRA variants other than DoRA)"
                         if any(_is_peft_lora_layer(m) for m in model.modules()) else "")
            raise ValueError(f"{arg} ({type(model).__name__}) has no LoRALinear layers and no peft LoRA Linear "
                             f"layers{peft_note}; call lorakern.apply_lora(model, ...) (or peft.get_peft_model) "
                             f"first or pass the LoRALinear modules")
        all_pairs = _layer_pairs(layers)
        factor_ids = {id(t) for pair in all_pairs for t in pair}
        others = [p for _, p in model.named_parameters() if p.requires_grad and id(p) not in factor_ids]
    elif isinstance(model, (torch.Tensor, str, bytes, dict)) or not hasattr(model, "__iter__"):
        raise TypeError(f"{arg} must be a torch.nn.Module or an iterable of LoRALinear modules, "
                        f"got {type(model).__name__}")
    else:
        layers = list(model)
        for item in layers:
            if not (isinstance(item, LoRALinear) or peft_adapter_pairs(item)):
                hint = (" (pass the model or its LoRALinear modules, not parameters: the optimizer needs to know "
                        "which lora_A belongs to which lora_B)" if isinstance(item, torch.Tensor) else "")
                raise TypeError(f"{arg} must be a torch.nn.Module or an iterable of LoRALinear modules, "
                                f"got an iterable containing {type(item).__name__}{hint}")
        if not layers:
            raise ValueError(f"{arg} is an empty iterable; it must hold at least one LoRALinear")
        all_pairs = _layer_pairs(layers)
        others = []
    pairs = [(A, B) for A, B in all_pairs if A.requires_grad or B.requires_grad]
    if not pairs and not others:
        raise ValueError(f"{arg} has nothing to train: every lora_A/lora_B has requires_grad=False")
    return pairs, others


def _layer_pairs(layers) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Every (lora_A, lora_B) of the layers (LoRALinear or peft), each layer once."""
    pairs, seen = [], set()
    for layer in layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, LoRALinear):
            found = [(layer.lora_A, layer.lora_B)]
        else:
            found = [(A, B) for _, A, B in peft_adapter_pairs(layer)]
        pairs.extend(found)
    return pairs


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

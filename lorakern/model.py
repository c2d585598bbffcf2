"""Model-level API (API.md "Model"): put LoRALinear layers into a model and take them out again."""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from lorakern import init as lora_init
from lorakern.layer import LoRALinear


def _matches_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _as_suffixes(value, arg: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{arg} must be a string or a list of strings, got {type(value).__name__}") from None
    if not all(isinstance(s, str) and s for s in items):
        raise TypeError(f"{arg} must contain non-empty strings, got {items!r}")
    return items


def _select_targets(model: nn.Module, target_modules, exclude) -> list[str]:
    """Names of the modules to adapt; raises if a target is not an nn.Linear or nothing matches."""
    excluded = _as_suffixes(exclude, "exclude")
    named = [(n, m) for n, m in model.named_modules() if n]
    if target_modules == "all-linear":
        hits = [(n, m) for n, m in named if isinstance(m, nn.Linear)]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {exc}") from None
        hits = [(n, m) for n, m in named if pattern.fullmatch(n)]
        # A regex filters the module tree: containers, norms and activations it also matches are skipped,
        # unless nothing it matches is a Linear (then the error below names what it did match).
        linear_hits = [(n, m) for n, m in hits if isinstance(m, nn.Linear)]
        hits = linear_hits or hits
    else:
        suffixes = _as_suffixes(target_modules, "target_modules")
        if not suffixes:
            raise ValueError("target_modules is empty")
        hits = [(n, m) for n, m in named if any(_matches_suffix(n, s) for s in suffixes)]
    hits = [(n, m) for n, m in hits if not any(_matches_suffix(n, s) for s in excluded)]
    if not hits:
        linears = [n for n, m in named if isinstance(m, nn.Linear)]
        raise ValueError(f"target_modules={target_modules!r} (exclude={excluded!r}) matches no module; "
                         f"the model's Linear layers are e.g. {linears[:8]}")
    for n, m in hits:
        if isinstance(m, LoRALinear):
            raise ValueError(f"module {n!r} is already a LoRALinear; apply_lora was called twice on it")
        if not isinstance(m, nn.Linear):
            raise TypeError(f"target module {n!r} is a {type(m).__name__}, not a torch.nn.Linear; "
                            f"only Linear layers can be adapted")
    return [n for n, _ in hits]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, target_modules="all-linear", r: int = 8, alpha: float = 16,
               dropout: float = 0.0, rslora: bool = False, init="lora", exclude=("lm_head",),
               adapter_dtype=None) -> list[str]:
    """Replace the targeted nn.Linear layers of `model` by LoRALinear, in place; freeze everything else.

    target_modules: "all-linear", a list of name suffixes (["q_proj", "v_proj"]), each of which must name
    Linear layers only, or a regex matched against full module names, which adapts the Linear layers
    among its matches. `exclude` lists name suffixes left alone. Returns the replaced names.
    Everything is validated before the model is touched, so a failure leaves it unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = _select_targets(model, target_modules, exclude)
    for n in names:  # validate every rank before modifying anything
        m = model.get_submodule(n)
        lora_init.check_rank(r, m.in_features, m.out_features, name=f"r (for {n!r})")
    new = {n: LoRALinear.from_linear(model.get_submodule(n), r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                                     init=init, adapter_dtype=adapter_dtype) for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for n, layer in new.items():
        _set_submodule(model, n, layer)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{name: LoRALinear} for every adapted layer of `model` (the model itself has the name "")."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _layers(model: nn.Module) -> Iterable[LoRALinear]:
    layers = lora_modules(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers (call lorakern.apply_lora first)")
    return layers.values()


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (LoRALinear.merge); raises if any layer is already merged."""
    layers = list(_layers(model))
    done = [n for n, m in lora_modules(model).items() if m.merged]
    if done:
        raise ValueError(f"merge_lora: layers already merged: {done[:5]}")
    for m in layers:
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora on every merged layer."""
    for m in _layers(model):
        if m.merged:
            m.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear: merged weights (merge=True) or the original base."""
    for n, m in lora_modules(model).items():
        if merge:
            lin = m.to_linear()
        else:
            if m.merged:
                m.unmerge()
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight, lin.bias = m.weight, m.bias  # the original Parameters, no copy
        _set_submodule(model, n, lin)
    return model

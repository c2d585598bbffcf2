"""Model-level API (API.md "Model"): put LoRALinear layers into a model and take them out again."""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn
from torch.nn.utils import parametrize

from lorakern import init as lora_init
from lorakern.layer import LoRALinear, resolve_init, share_hooks


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


def _why_not_adaptable(model: nn.Module, name: str, m: nn.Module) -> str | None:
    """None when `m` can become a LoRALinear, else the reason it cannot."""
    if not isinstance(m, nn.Linear):
        return f"is a {type(m).__name__}, not a torch.nn.Linear"
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention):
        return ("is nn.MultiheadAttention's output projection, whose weight the attention reads directly "
                "without calling its forward")
    if parametrize.is_parametrized(m):
        return "has a parametrized weight (e.g. weight_norm); remove the parametrization first"
    if type(m).forward is not nn.Linear.forward:
        return f"is a {type(m).__name__} with its own forward, which LoRALinear would replace"
    return None


def _select_targets(model: nn.Module, target_modules, exclude) -> list[str]:
    """Names of the modules to adapt (one name per module object; aliases are handled by the caller).

    "all-linear" and a regex adapt the Linear layers among their matches (skipping the ones that cannot
    be adapted); every suffix of a list must match something, and everything it matches must be adaptable.
    """
    excluded = _as_suffixes(exclude, "exclude")
    named = [(n, m) for n, m in model.named_modules() if n]
    if not named:
        raise ValueError("model has no submodules; wrap a single Linear with LoRALinear.from_linear instead")
    explicit = not isinstance(target_modules, str)
    if target_modules == "all-linear":
        # as peft: not the output layer (a Hugging Face model's get_output_embeddings, often tied to the input
        # embeddings), whatever its name (BERT's is cls.predictions.decoder, not lm_head)
        get_out = getattr(model, "get_output_embeddings", None)
        out_layer = get_out() if callable(get_out) else None
        hits = [(n, m) for n, m in named if isinstance(m, nn.Linear) and m is not out_layer]
    elif not explicit:
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {exc}") from None
        hits = [(n, m) for n, m in named if pattern.fullmatch(n)]
    else:
        suffixes = _as_suffixes(target_modules, "target_modules")
        if not suffixes:
            raise ValueError("target_modules is empty")
        unmatched = [s for s in suffixes if not any(_matches_suffix(n, s) for n, _ in named)]
        if unmatched:
            linears = [n for n, m in named if isinstance(m, nn.Linear)]
            raise ValueError(f"target_modules entries {unmatched} match no module of the model; its Linear layers "
                             f"are e.g. {linears[:8]}")
        hits = [(n, m) for n, m in named if any(_matches_suffix(n, s) for s in suffixes)]
    hits = [(n, m) for n, m in hits if not any(_matches_suffix(n, s) for s in excluded)]
    for n, m in hits:
        if isinstance(m, LoRALinear):
            raise ValueError(f"module {n!r} is already a LoRALinear; apply_lora was called twice on it")
    if not explicit:
        ok = [(n, m) for n, m in hits if _why_not_adaptable(model, n, m) is None]
        if hits and not ok:
            n, m = hits[0]
            raise TypeError(f"target_modules={target_modules!r} matches no adaptable Linear layer: "
                            f"{n!r} {_why_not_adaptable(model, n, m)}")
        hits = ok
    if not hits:
        linears = [n for n, m in named if isinstance(m, nn.Linear)]
        raise ValueError(f"target_modules={target_modules!r} (exclude={excluded!r}) matches no module; "
                         f"the model's Linear layers are e.g. {linears[:8]}")
    for n, m in hits:
        why = _why_not_adaptable(model, n, m)
        if why:
            raise TypeError(f"target module {n!r} {why}; only plain Linear layers can be adapted")
    return [n for n, _ in hits]


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each module object appears (a shared module has several)."""
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ValueError("the model itself cannot be replaced in place; use LoRALinear.to_linear() on it")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _fast_path_off(module, args):
    """A forward pre-hook that does nothing: its presence turns off nn.TransformerEncoderLayer's inference
    fast path, which reads linear1 / linear2's weights directly and would ignore their adapters."""
    return None


def _replace(model: nn.Module, old: nn.Module, new: nn.Module, aliases: dict[int, list[str]]) -> None:
    for alias in aliases[id(old)]:  # a shared module stays shared: every alias gets the same new layer
        _set_submodule(model, alias, new)
        parent_name = alias.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if (isinstance(new, LoRALinear) and isinstance(parent, nn.TransformerEncoderLayer)
                and _fast_path_off not in new._forward_pre_hooks.values()):
            new.register_forward_pre_hook(_fast_path_off)


def _freeze_all_but_adapters(model: nn.Module) -> None:
    keep = {id(p) for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def apply_lora(model: nn.Module, target_modules="all-linear", r: int = 8, alpha: float = 16,
               dropout: float = 0.0, rslora: bool = False, init="lora", exclude=("lm_head",),
               adapter_dtype=None) -> list[str]:
    """Replace the targeted nn.Linear layers of `model` by LoRALinear, in place; freeze everything else.

    target_modules: "all-linear", a list of name suffixes (["q_proj", "v_proj"]), each of which must match,
    or a regex matched against full module names, which adapts the Linear layers among its matches.
    `exclude` lists name suffixes left alone. A module shared under several names becomes one LoRALinear
    under all of them. The new adapters train; every other parameter except existing adapters is frozen.
    Returns the replaced names. Arguments are validated before the model is touched, so a failure
    leaves it unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = _select_targets(model, target_modules, exclude)
    svd_init = resolve_init(init) is lora_init.pissa  # r singular directions: r <= min(in, out)
    for n in names:  # validate every rank before modifying anything
        m = model.get_submodule(n)
        lora_init.check_rank(r, m.in_features, m.out_features, name=f"r (for {n!r})", bounded=svd_init)
    if svd_init:
        tied = tied_elsewhere(model, {n: model.get_submodule(n) for n in names})
        if tied:
            raise ValueError(f"apply_lora(init='pissa') replaces each base weight by its residual, but these "
                             f"weights are tied to other modules, which would change too: {tied[:5]}; exclude "
                             f"them (exclude=...)")
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:  # from_linear freezes each wrapped base: undo that if a later layer fails
        new = {n: LoRALinear.from_linear(model.get_submodule(n), r=r, alpha=alpha, dropout=dropout,
                                         rslora=rslora, init=init, adapter_dtype=adapter_dtype) for n in names}
    except Exception:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        raise
    tied = {t.split(" ")[0] for t in tied_elsewhere(model, {n: model.get_submodule(n) for n in names})}
    aliases = _aliases(model)
    for n, layer in new.items():
        _replace(model, model.get_submodule(n), layer, aliases)
        layer.weight_tied = n in tied  # reset_lora_parameters("pissa") would write into the other module too
    _freeze_all_but_adapters(model)
    for layer in new.values():
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


def tied_elsewhere(model: nn.Module, layers: dict[str, nn.Module] | None = None) -> list[str]:
    """Layers (default: the LoRA layers) whose weight is also a parameter of another module (e.g. a tied
    lm_head): merging, PiSSA's residual or LoRA-GA's offset would change that module too."""
    owners: dict[int, set[int]] = {}
    names: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(m))
                names.setdefault(id(m), n)
    out = []
    for n, m in (lora_modules(model) if layers is None else layers).items():
        others = owners.get(id(m.weight), set()) - {id(m)}
        if others:
            out.append(f"{n} (tied to {sorted(names[o] for o in others)})")
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (LoRALinear.merge); raises if any layer is already merged or
    its weight is tied to another module's parameter (merging would change that module too)."""
    layers = list(_layers(model))
    done = [n for n, m in lora_modules(model).items() if m.merged]
    if done:
        raise ValueError(f"merge_lora: layers already merged: {done[:5]}")
    tied = tied_elsewhere(model)
    if tied:
        raise ValueError(f"merge_lora: these layers' weights are tied to other modules, which merging would "
                         f"change as well: {tied[:5]}")
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
    """Replace every LoRALinear by a plain nn.Linear: merged weights (merge=True) or the original base
    (merge=False; with PiSSA / LoRA-GA inits the weight they modified is restored)."""
    if isinstance(model, LoRALinear):
        raise ValueError("remove_lora: the model is itself a LoRALinear; use model.to_linear()")
    if merge:
        tied = tied_elsewhere(model)
        if tied:
            raise ValueError(f"remove_lora(merge=True): weights tied to other modules: {tied[:5]}")
    aliases = _aliases(model)
    for n, m in lora_modules(model).items():
        if merge:
            lin = m.to_linear()
        else:
            if m.merged:
                m.unmerge()
            m.restore_base()  # undo what PiSSA / LoRA-GA subtracted from the base weight
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight, lin.bias = m.weight, m.bias  # the original Parameters, no copy
            lin.train(m.training)
        hooks = m._forward_pre_hooks
        for key in [k for k, fn in hooks.items() if fn is _fast_path_off]:
            del hooks[key]
        share_hooks(m, lin)  # the user's hooks (shared with the Linear apply_lora replaced) stay
        _replace(model, m, lin, aliases)
    return model

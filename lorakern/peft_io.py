r"""Adapters in peft's on-disk format: adapter_config.json + adapter_model.safetensors.

Keys are peft's, `base_model.model.<module name>.lora_A.weight` / `.lora_B.weight`, with the module names of
the model given to save_adapter; peft's PeftModel.from_pretrained(base, path) on the same base architecture
loads the file, and load_adapter reads what peft saved. Layers whose rank or alpha differ from the most
common ones go into peft's rank_pattern / alpha_pattern, keyed by "^" + the escaped full name: peft matches
a key K against a module name with (.*\.)?(K)$, so an unanchored "fc" would also claim "a.fc".
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter

import torch
from torch import nn

from lorakern.layer import LoRALinear
from lorakern.model import _aliases, _freeze_all_but_adapters, _replace, _why_not_adaptable, lora_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def _adapters_to_save(m: LoRALinear, original_base: bool) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(lora_A, lora_B, r, alpha) as written. A layer whose init changed its base weight (PiSSA, LoRA-GA)
    adds its recorded offset, [A; A0] and [B, -B0] at rank r + k with alpha such that the scaling is kept,
    so that the file applies to the original base weight (peft's conversion for PiSSA / OLoRA)."""
    A, B = m.lora_A.detach(), m.lora_B.detach()
    if not original_base or m.base_offset_A is None:
        return A, B, m.r, m.alpha
    if m.scaling == 0:
        raise ValueError("save_adapter: a layer whose init changed its base weight has scaling 0 (alpha = 0), so "
                         "no adapter can carry that change for the original base; use original_base=False")
    A = torch.cat([A, m.base_offset_A.to(A.dtype)], dim=0)
    B = torch.cat([B, (-m.base_offset_B / m.scaling).to(B.dtype)], dim=1)  # the offset holds its scaling
    r = A.shape[0]
    return A, B, r, m.scaling * (r ** 0.5 if m.rslora else r)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under torch.compile's OptimizedModule and DDP/FSDP1 wrappers, whose prefixes (_orig_mod.,
    module.) peft's names do not have."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            getattr(model, "module", None) if type(model).__name__ in ("DistributedDataParallel",
                                                                     "FullyShardedDataParallel", "DataParallel")
            else None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None,
                 task_type: str | None = None, original_base: bool = True) -> None:
    """Write every LoRALinear adapter of `model` to directory `path` in peft's format.

    original_base=True (default): layers initialized with PiSSA or LoRA-GA, which changed their base weight,
    are written so that they apply to the original base weight (rank r + k, see _adapters_to_save): loading
    the file onto the pretrained model, with lorakern or peft, gives this model. False writes the factors
    as they are, for the modified base (which the caller must then save too).
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    layers = lora_modules(model)
    if not layers:
        raise ValueError("save_adapter: model has no LoRALinear layers")
    if "" in layers:
        raise ValueError("save_adapter: the model is itself a LoRALinear; wrap it in a parent module so its "
                         "adapter has a name")
    rslora = {m.rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("save_adapter: peft stores one use_rslora flag, but the model mixes rslora and "
                         "standard scaling layers")
    saved = {n: _adapters_to_save(m, original_base) for n, m in layers.items()}
    r = Counter(v[2] for v in saved.values()).most_common(1)[0][0]
    alpha = Counter(v[3] for v in saved.values()).most_common(1)[0][0]
    dropout = Counter(m.dropout for m in layers.values()).most_common(1)[0][0]
    if len({m.dropout for m in layers.values()}) > 1:
        warnings.warn(f"save_adapter: peft stores one lora_dropout; the layers' dropouts differ, saving {dropout}",
                      stacklevel=2)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _num(alpha),
        "lora_dropout": dropout,
        "use_rslora": rslora.pop(),
        "target_modules": sorted(layers),
        "rank_pattern": {"^" + re.escape(n): v[2] for n, v in saved.items() if v[2] != r},
        "alpha_pattern": {"^" + re.escape(n): _num(v[3]) for n, v in saved.items() if v[3] != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    tensors = {}
    for n, (A, B, _, _) in saved.items():
        tensors[f"{_PREFIX}{n}.lora_A.weight"] = A.to("cpu").contiguous()
        tensors[f"{_PREFIX}{n}.lora_B.weight"] = B.to("cpu").contiguous()
    to_save, skipped = _trained_modules(model)
    if skipped:
        warnings.warn(f"save_adapter: these trainable parameters are not saved (they belong to LoRA layers or to "
                      f"modules that contain them, which peft's modules_to_save cannot hold): {skipped[:5]}",
                      stacklevel=2)
    names = sorted(to_save) + [n for n in _TASK_MODULES.get(task_type or "", ()) if n not in to_save]
    claimed = _claimed_by_peft(model, names)
    for name, module in claimed.items():  # whole modules, keys without the wrapper
        for pname, t in module.state_dict().items():  # clone: a tied head shares memory with the embeddings
            tensors[f"{_PREFIX}{name}.{pname}"] = t.detach().to("cpu").clone()
    # the outermost modules: peft nests no wrapper in another (RoBERTa's head is classifier.{dense,out_proj})
    config["modules_to_save"] = sorted(claimed) or None
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# What peft's PeftModelFor<task> adds to modules_to_save by itself (peft/peft_model.py), so the file must
# hold those modules too, trained or not.
_TASK_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                 "QUESTION_ANS": ("qa_outputs",)}


def _claimed_by_peft(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The modules peft wraps for modules_to_save = names: those whose full name ends with one of them
    (peft's test is a plain endswith: "classifier" also claims "pre_classifier"), outermost only. A LoRA
    layer among them cannot be both: a clear error instead of a file peft cannot load."""
    hits = {n: m for n, m in model.named_modules() if n and any(n.endswith(s) for s in names)}
    hits = {n: m for n, m in hits.items() if not any(n.startswith(o + ".") for o in hits)}
    for n, m in hits.items():
        if any(isinstance(x, LoRALinear) for x in m.modules()):
            raise ValueError(f"save_adapter: peft would treat {n!r} as a module to save (its name ends with one of "
                             f"{names}: the trained modules and the task type's), but it holds LoRA layers; "
                             f"freeze that module, leave it out of apply_lora (exclude=...) or change task_type")
    return hits


def _trained_modules(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """Modules (not LoRA layers) holding a trainable parameter, e.g. a classification head trained from
    scratch: what peft calls modules_to_save. Returns them and the names of trainable non-adapter parameters
    that live in LoRA layers (an unfrozen base bias), which peft's format cannot hold."""
    lora = lora_modules(model)
    out, skipped = {}, []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            skipped += [f"{name}.{p}" for p, t in module.named_parameters(recurse=False)
                        if t.requires_grad and p not in ("lora_A", "lora_B")]
            continue
        if not any(t.requires_grad for t in module.parameters(recurse=False)) or any(
                name.startswith(l + ".") for l in lora if l):
            continue
        if not name or any(isinstance(m, LoRALinear) for m in module.modules()):  # cannot be saved whole
            skipped += [f"{name}.{p}".lstrip(".") for p, t in module.named_parameters(recurse=False) if t.requires_grad]
        else:
            out[name] = module
    # a module inside another one that is saved whole is saved with it
    return {n: m for n, m in out.items() if not any(n.startswith(o + ".") for o in out if o)}, skipped


def _num(x: float):
    return int(x) if float(x).is_integer() else x


def _pattern_value(pattern: dict, name: str, default):
    """peft's rule (peft.utils.other.get_pattern_key): a key matches a name that ends with it after a dot."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"load_adapter: {cfg_file} not found")
    with open(cfg_file) as f:
        config = json.load(f)
    weights = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(weights):
        from safetensors.torch import load_file
        tensors = load_file(weights)
    elif os.path.isfile(os.path.join(path, "adapter_model.bin")):
        tensors = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} (or adapter_model.bin) in {path}")
    return config, tensors


def _shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> its names, for parameters held under several names (tied weights)."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {k: v for k, v in names.items() if len(v) > 1}


def _check_saved_module_key(model: nn.Module, key: str, t: torch.Tensor, own_state: dict, tied: dict) -> None:
    """A modules_to_save tensor may go into a plain module only: checked before anything is modified."""
    target = own_state[key]
    if tuple(target.shape) != tuple(t.shape):
        raise ValueError(f"load_adapter: {key!r} has shape {tuple(t.shape)} in the file but "
                         f"{tuple(target.shape)} in the model")
    module = key.rpartition(".")[0]
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if isinstance(model.get_submodule(".".join(parts[:i])), LoRALinear):
            raise ValueError(f"load_adapter: the file's modules_to_save tensor {key!r} would go into the LoRA "
                             f"layer {'.'.join(parts[:i])!r}, whose base weight is frozen")
    if id(target) in tied:
        raise ValueError(f"load_adapter: {key!r} is tied to {[n for n in tied[id(target)] if n != key]}; loading "
                         f"it as a module to save would change those too (untie the weights first)")


def _as_list(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _check_config(config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: peft_type={config.get('peft_type')!r} is not a LoRA adapter")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none"}
    for key, ok in unsupported.items():
        if config.get(key, ok) != ok:
            raise ValueError(f"load_adapter: adapter_config.json has {key}={config[key]!r}; lorakern supports "
                             f"only {key}={ok!r}")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_dtype: torch.dtype | None = None) -> list[str]:
    """Load a peft-format LoRA adapter (saved by peft or by lorakern) into `model`; returns the module names.

    Linear layers named in the file become LoRALinear (every other non-adapter parameter is frozen, as
    after apply_lora); existing LoRALinear layers get the new weights and the file's scaling and dropout.
    `adapter_dtype` defaults to the wider of the stored dtype and the base dtype (fp32 adapters stay fp32
    on a bf16 base; bf16 adapters on an fp32 base are computed in fp32, as peft does). Everything is checked
    first: when loading fails the model is unchanged.
    """
    config, tensors = _read(path)
    _check_config(config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    saved_modules = _as_list(config.get("modules_to_save"))
    extra: dict[str, torch.Tensor] = {}  # modules_to_save entries: state-dict key in the model -> tensor
    own_state = model.state_dict(keep_vars=True)
    tied = _shared_parameters(model) if saved_modules else {}
    for key, t in tensors.items():
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _KEY.match(k)
        if m is not None and ".modules_to_save." not in k:
            pairs.setdefault(m["module"], {})[m["which"]] = t
            continue
        k = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", k)  # peft's in-memory form, if present
        parts = k.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]  # peft: a plain endswith on module names
        if saved_modules and k in own_state and any(a.endswith(s) for a in ancestors for s in saved_modules):
            _check_saved_module_key(model, k, t, own_state, tied)
            extra[k] = t
        else:
            bad.append(key)
    if bad:
        raise ValueError(f"load_adapter: unsupported keys in {path}: {bad[:5]}")
    both = sorted({k.rpartition(".")[0] for k in extra} & set(pairs))
    if both:  # peft ignores such a pair; loading both would add the adapter to a replaced base
        raise ValueError(f"load_adapter: {path} has both LoRA weights and saved-module weights for {both[:5]}")
    if not pairs:
        raise ValueError(f"load_adapter: {path} holds no LoRA weights")

    modules = dict(model.named_modules())
    plan = []
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"load_adapter: module {name!r} has {sorted(pair)} but needs lora_A and lora_B")
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"load_adapter: the adapter targets {name!r}, which the model does not have")
        why = None if isinstance(mod, LoRALinear) else _why_not_adaptable(model, name, mod)
        if why:
            raise TypeError(f"load_adapter: the adapter targets {name!r}, which {why}")
        A, B = pair["lora_A"], pair["lora_B"]
        r = A.shape[0]
        want_A, want_B = (r, mod.in_features), (mod.out_features, r)
        if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != want_A or tuple(B.shape) != want_B:
            raise ValueError(f"load_adapter: {name!r} (in={mod.in_features}, out={mod.out_features}) got lora_A "
                             f"{tuple(A.shape)} and lora_B {tuple(B.shape)}; expected {want_A} and {want_B}")
        r_cfg = _pattern_value(config.get("rank_pattern"), name, config.get("r", r))
        if r_cfg != r:
            raise ValueError(f"load_adapter: {name!r} has rank {r} in the weights but {r_cfg} in the config")
        if isinstance(mod, LoRALinear):
            if mod.r != r:
                raise ValueError(f"load_adapter: {name!r} is a LoRALinear of rank {mod.r}; the adapter has rank {r}")
            if mod.merged:
                raise ValueError(f"load_adapter: {name!r} is merged; unmerge it before loading an adapter")
        alpha = float(_pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
        plan.append((name, mod, A, B, r, alpha))

    rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    new_layers = {}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:  # build new layers before touching the model; from_linear freezes each base: undone on failure
        for name, mod, A, B, r, alpha in plan:
            if not isinstance(mod, LoRALinear):
                adt = adapter_dtype or torch.promote_types(A.dtype, mod.weight.dtype)
                new_layers[name] = LoRALinear.from_linear(mod, r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                                                          adapter_dtype=adt)
    except (TypeError, ValueError) as exc:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        raise type(exc)(f"load_adapter: module {name!r}: {exc}") from exc
    aliases = _aliases(model)
    for name, mod, A, B, r, alpha in plan:
        if name in new_layers:
            layer = new_layers[name]
            _replace(model, mod, layer, aliases)
        else:
            layer = mod
            layer.alpha, layer.rslora, layer.dropout = alpha, rslora, dropout
            layer.scaling = alpha / (r ** 0.5 if rslora else r)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    if new_layers:
        _freeze_all_but_adapters(model)
    if extra:  # the saved modules' weights, trainable again (as in peft)
        model.load_state_dict(extra, strict=False)
        params = dict(model.named_parameters())
        for k in extra:
            if k in params:
                params[k].requires_grad_(True)
    return [name for name, *_ in plan]

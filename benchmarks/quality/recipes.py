"""Recipes of the quality benchmark: each one is (init, optimizer) applied to a fresh copy of the seed's base.

peft recipes wrap a deep copy of the base with peft.get_peft_model and run peft's own forward (no
lk.accelerate: they are the reference). lorakern recipes put lk.apply_lora's LoRALinear layers on a deep copy
of the base (lorakern's C++ CPU op). Every recipe uses the task's r and alpha with rsLoRA scaling alpha/sqrt(r)
(lora-one.txt Algorithm 1's forward scale), no dropout, weight decay 0.

  init(task, data, seed) -> the adapted body (initialized); the random draws are seeded with `seed`, and the
      gradient inits use data.grad (the same batches for LoRA-One, lorakern's LoRA-GA and peft's LoRA-GA),
      through the seed's initial head
  optimizer(body, lr) -> a torch optimizer over the body's adapter parameters (the head has its own AdamW)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import lorakern as lk

from .tasks import SeedData, Task, build_net, loss_fn

LORA_ONE_S = 16.0   # LoRA-One's s (gamma = 1/s): the paper's SST-2 value, as in examples/demo.py
LORA_PLUS_RATIO = 16.0
PEFT_RIEMANNIAN_REG = 1e-2  # peft's default damping


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str          # "peft" or "lorakern"
    label: str
    init: Callable
    optimizer: Callable
    init_key: str        # recipes with the same init_key share the (deterministic) init of one seed


def _trainable(body: nn.Module):
    return [p for p in body.parameters() if p.requires_grad]


def _probe_net(task: Task, data: SeedData, body: nn.Module):
    """The Net the gradient inits differentiate: the body and a frozen copy of the seed's initial head."""
    net = build_net(task, data, body)
    if net.head is not None:
        for p in net.head.parameters():
            p.requires_grad_(False)
    return net


# --------------------------------------------------------------------------------------------------- peft

def _peft_config(task: Task, **kw):
    from peft import LoraConfig
    return LoraConfig(r=task.r, lora_alpha=task.alpha, target_modules=list(task.peft_targets), lora_dropout=0.0,
                      use_rslora=True, **kw)


def _peft_wrap(body, config):
    import warnings
    from peft import get_peft_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(body, config)


def peft_lora_init(task, data, seed):
    torch.manual_seed(seed)
    return _peft_wrap(copy.deepcopy(data.body), _peft_config(task))  # kaiming-uniform A, B = 0


def peft_pissa_init(task, data, seed):
    torch.manual_seed(seed)
    return _peft_wrap(copy.deepcopy(data.body), _peft_config(task, init_lora_weights="pissa"))


def peft_lora_ga_init(task, data, seed):
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga
    torch.manual_seed(seed)
    body = copy.deepcopy(data.body)
    config = _peft_config(task, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    net = _probe_net(task, data, body)

    def train_step():
        for batch in data.grad:
            loss_fn(net, batch).backward()

    preprocess_loraga(net, config, train_step)  # gradient of the base weights, mean over data.grad
    return _peft_wrap(body, config)


def adamw(body, lr):
    return torch.optim.AdamW(_trainable(body), lr=lr, weight_decay=0.0)


def peft_riemannian(body, lr):
    from peft.optimizers import create_riemannian_optimizer
    return create_riemannian_optimizer(body, torch.optim.AdamW, lr=lr, reg=PEFT_RIEMANNIAN_REG, weight_decay=0.0)


def peft_loraplus(body, lr):
    from peft.optimizers import create_loraplus_optimizer
    return create_loraplus_optimizer(body, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=LORA_PLUS_RATIO,
                                     weight_decay=0.0)


# ----------------------------------------------------------------------------------------------- lorakern

def _lk_body(task, data, seed, init="lora"):
    torch.manual_seed(seed)
    body = copy.deepcopy(data.body)
    lk.apply_lora(body, target_modules=task.lk_targets, r=task.r, alpha=task.alpha, rslora=True, init=init)
    return body


def lk_lora_one_init(task, data, seed):
    body = _lk_body(task, data, seed)
    lk.spectral_init(_probe_net(task, data, body), data.grad, loss_fn, method="lora-one", mode="exact",
                     s=LORA_ONE_S, progress=False)
    return body


def lk_lora_ga_init(task, data, seed):
    body = _lk_body(task, data, seed)
    lk.spectral_init(_probe_net(task, data, body), data.grad, loss_fn, method="lora-ga", mode="exact",
                     progress=False)
    return body


def lk_pissa_init(task, data, seed):
    return _lk_body(task, data, seed, init="pissa")


def lk_nora_init(task, data, seed):
    return _lk_body(task, data, seed, init="nystrom")


def lk_precond(body, lr):
    return lk.optim.PreconditionedAdamW(body, lr=lr, weight_decay=0.0)


def lk_precond_fro(body, lr):
    return lk.optim.PreconditionedAdamW(body, lr=lr, weight_decay=0.0, normalize="fro")


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("peft-lora", "peft", "LoRA (kaiming A, B=0) + AdamW [baseline]", peft_lora_init, adamw, "peft-lora"),
    Recipe("peft-pissa", "peft", "PiSSA + AdamW", peft_pissa_init, adamw, "peft-pissa"),
    Recipe("peft-lora-ga", "peft", "LoRA-GA (peft, ArB2r, stable 16) + AdamW", peft_lora_ga_init, adamw,
           "peft-lora-ga"),
    Recipe("peft-riemannian", "peft", "LoRA + peft Riemannian AdamW (reg 1e-2)", peft_lora_init, peft_riemannian,
           "peft-lora"),
    Recipe("peft-loraplus", "peft", "LoRA+ (ratio 16) + AdamW", peft_lora_init, peft_loraplus, "peft-lora"),
    Recipe("lk-lora-one", "lorakern", f"LoRA-One (s={LORA_ONE_S:g}) + AdamW", lk_lora_one_init, adamw,
           "lk-lora-one"),
    Recipe("lk-lora-one-p", "lorakern", "LoRA-One + PreconditionedAdamW (LoRA-One-P)", lk_lora_one_init,
           lk_precond, "lk-lora-one"),
    Recipe("lk-lora-ga", "lorakern", "LoRA-GA (lora-one.txt eq. 91, c=16) + AdamW", lk_lora_ga_init, adamw,
           "lk-lora-ga"),
    Recipe("lk-pissa", "lorakern", "PiSSA + AdamW", lk_pissa_init, adamw, "lk-pissa"),
    Recipe("lk-nora", "lorakern", "NoRA (Nystrom init) + AdamW", lk_nora_init, adamw, "lk-nora"),
    Recipe("lk-nora-plus", "lorakern", "NoRA+ (Nystrom + PreconditionedAdamW fro)", lk_nora_init, lk_precond_fro,
           "lk-nora"),
)}

BASELINE = "peft-lora"
QUICK_RECIPES = list(RECIPES)  # --quick runs every recipe (few steps, one seed, one lr)


def get_recipes(names) -> list[Recipe]:
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; valid recipes: {', '.join(RECIPES)}")
    return [RECIPES[n] for n in names]

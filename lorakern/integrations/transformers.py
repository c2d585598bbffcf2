"""lorakern with `transformers.Trainer` in two lines: LoRA-One initialization and the preconditioned optimizer.

    import lorakern as lk
    from lorakern.integrations.transformers import SpectralInitCallback, preconditioned_adamw

    lk.apply_lora(model, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=16, alpha=32)
    # or, with peft: model = lk.accelerate(get_peft_model(model, LoraConfig(r=16, lora_alpha=32, ...)))
    trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                      callbacks=[SpectralInitCallback()],                     # LoRA-One init before step 1
                      optimizer_cls_and_kwargs=preconditioned_adamw(lr=2e-4))  # LoRA-One-P
    trainer.train()

SpectralInitCallback: at `on_train_begin` it draws `num_batches` batches from the Trainer's train dataloader
(this rank's share under DDP, already on the model's device), and runs `lk.spectral_init` on them with the
model's own loss (`model(**batch).loss`, so the batches need labels) in train mode. It runs when training
starts from step 0 and is skipped when resuming from a checkpoint (the adapters come from the checkpoint).
The Trainer builds its optimizer before `on_train_begin`; that is harmless, because spectral_init writes the
adapters in place and the optimizer has no state yet.

preconditioned_adamw(**kw) -> (factory, kw) for `Trainer(optimizer_cls_and_kwargs=...)`: the Trainer calls the
factory with the model (transformers >= 5's optimizer-factory protocol), so the optimizer sees the LoRALinear
pairs rather than flat parameter groups. Its lr and weight_decay are the ones given here (TrainingArguments'
learning_rate and weight_decay do not reach it); the Trainer's lr scheduler still applies. With an older
transformers pass `optimizers=(lk.optim.PreconditionedAdamW(model, ...), None)` instead.

`spectral_init_from_dataloader` and `model_loss` are the same pieces for a hand-written training loop.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping

import torch
from transformers import TrainerCallback

import lorakern as lk


def model_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """The model's own training loss on `batch`: `model(**batch).loss` (a dict batch) or `model(*batch).loss`."""
    outputs = model(**batch) if isinstance(batch, Mapping) else model(*batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        keys = sorted(batch) if isinstance(batch, Mapping) else f"{len(batch)} positional inputs"
        raise ValueError(f"the model returned no loss for the gradient batch (batch holds {keys}); the batch must "
                         f"carry labels (e.g. a data collator that sets 'labels') so that outputs.loss exists")
    return loss


def _tensors(batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _tensors(v)]
    return []


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def gradient_batches(dataloader: Iterable | None, num_batches: int, device: torch.device) -> list:
    """The first `num_batches` batches of `dataloader`, on `device`, as a list (spectral_init's sketch passes
    over it several times and needs the same data each time, which a shuffling dataloader would not give)."""
    if dataloader is None:
        raise ValueError("no train dataloader to draw the gradient batch from: give the Trainer a train_dataset")
    batches = []
    for batch in dataloader:
        tensors = _tensors(batch)
        if not tensors:
            raise TypeError(f"batch {len(batches)} of the train dataloader holds no tensor ({type(batch).__name__}); "
                            f"the gradient batch must be model inputs (a dict of tensors from a data collator)")
        batched = [t for t in tensors if t.dim() > 0]  # a 0-d tensor (e.g. a num_items count) is no batch axis
        if not batched or any(t.shape[0] == 0 for t in batched):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"the gradient batch is empty (batch {len(batches)} holds tensors of shapes {shapes}); "
                             f"spectral_init needs at least one example")
        batches.append(_to_device(batch, device))
        if len(batches) == num_batches:
            break
    if not batches:
        raise ValueError("the gradient batch is empty: the train dataloader yielded no batch "
                         "(an empty train_dataset?); spectral_init needs at least one example")
    return batches


def _has_lora(model: torch.nn.Module) -> bool:
    """lorakern LoRALinear layers, or peft LoRA layers whose update is lora_B @ lora_A (a PeftModel)."""
    from lorakern.optim.pairs import peft_adapter_pairs
    return any(isinstance(m, lk.LoRALinear) or peft_adapter_pairs(m) for m in model.modules())


def _check_has_lora(model: torch.nn.Module | None, who: str) -> None:
    if model is None or not _has_lora(model):
        kind = ("no model" if model is None else
                f"the model ({type(model).__name__}) has no LoRALinear layers and no peft LoRA Linear layers")
        raise ValueError(f"{who}: {kind}; call lorakern.apply_lora(model, ...) (or peft.get_peft_model) before "
                         f"building the Trainer")


def spectral_init_from_dataloader(model: torch.nn.Module, dataloader: Iterable, num_batches: int = 1,
                                  **spectral_kwargs) -> dict[str, torch.Tensor]:
    """lk.spectral_init on the first `num_batches` batches of `dataloader` with the model's own loss, in train
    mode (the loss training minimizes); the model's mode is restored afterwards. Returns spectral_init's
    {layer name: top singular values}. spectral_kwargs: method, mode, s, oversample, n_iter, seed, progress, ...
    """
    _check_has_lora(model, "spectral_init_from_dataloader")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    device = next(model.parameters()).device
    batches = gradient_batches(dataloader, num_batches, device)
    was_training = model.training
    model.train()
    try:
        return lk.spectral_init(model, batches, model_loss, **spectral_kwargs)
    finally:
        model.train(was_training)


class SpectralInitCallback(TrainerCallback):
    """Initializes every LoRALinear of the Trainer's model with lk.spectral_init (LoRA-One by default) on a
    gradient batch drawn from the train dataloader, when training starts (see the module docstring).

    num_batches: how many dataloader batches form the gradient batch. spectral_kwargs go to lk.spectral_init
    (method="lora-one" | "lora-ga", mode="sketch" | "exact", s, oversample, n_iter, seed, ...); progress bars
    follow TrainingArguments.disable_tqdm unless `progress` is given. After training starts, `spectra` holds
    spectral_init's {layer name: top singular values of the gradient}.
    """

    def __init__(self, num_batches: int = 1, **spectral_kwargs):
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
        allowed = set(inspect.signature(lk.spectral_init).parameters) - {"model", "batches", "loss_fn"}
        unknown = sorted(set(spectral_kwargs) - allowed)
        if unknown:
            raise TypeError(f"SpectralInitCallback got unexpected keyword arguments {unknown}; "
                            f"lk.spectral_init takes {sorted(allowed)}")
        self.num_batches = num_batches
        self.spectral_kwargs = spectral_kwargs
        self.spectra: dict[str, torch.Tensor] | None = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        _check_has_lora(model, "SpectralInitCallback")  # fail when the Trainer is built, not after loading data

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if state.global_step > 0:  # resumed from a checkpoint: its adapters are the ones to keep
            return
        _check_has_lora(model, "SpectralInitCallback")
        spectral_kwargs = {"progress": not args.disable_tqdm, **self.spectral_kwargs}
        self.spectra = spectral_init_from_dataloader(model, train_dataloader, self.num_batches, **spectral_kwargs)


class PreconditionedAdamWFactory:
    """transformers' optimizer-factory protocol: the Trainer instantiates this class with no arguments and calls
    the instance with (model, **kwargs)."""

    def __call__(self, model: torch.nn.Module, **kwargs) -> lk.optim.PreconditionedAdamW:
        return lk.optim.PreconditionedAdamW(model, **kwargs)


def preconditioned_adamw(**kwargs) -> tuple[type, dict]:
    """(factory, kwargs) for `Trainer(optimizer_cls_and_kwargs=...)`: lk.optim.PreconditionedAdamW(model, **kwargs)
    on the Trainer's model. kwargs: lr, betas, eps, weight_decay, damping, normalize, order, bias_correction."""
    from transformers import trainer_optimizer
    if not hasattr(trainer_optimizer, "is_optimizer_factory"):
        raise RuntimeError("this transformers version does not call optimizer factories with the model; pass "
                           "optimizers=(lorakern.optim.PreconditionedAdamW(model, ...), None) to the Trainer instead")
    allowed = set(inspect.signature(lk.optim.PreconditionedAdamW).parameters) - {"model"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"preconditioned_adamw got unexpected keyword arguments {unknown}; "
                        f"PreconditionedAdamW takes {sorted(allowed)}")
    return PreconditionedAdamWFactory, dict(kwargs)

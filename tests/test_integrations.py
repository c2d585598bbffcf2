"""lorakern.integrations.transformers with a real transformers.Trainer on a tiny LLaMA built from a config
(offline, CPU): the callback's LoRA-One init equals spectral_init on the same batch, PreconditionedAdamW through
the optimizer factory lowers the loss, and bad input fails clearly."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import lorakern as lk
from conftest import rel_err

transformers = pytest.importorskip("transformers")
from lorakern.integrations.transformers import (  # noqa: E402
    PreconditionedAdamWFactory, SpectralInitCallback, model_loss, preconditioned_adamw, spectral_init_from_dataloader)

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_EXAMPLES, SEQ = 8, 16


def tiny_llama(lora: bool = True):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                      initializer_range=0.2)  # the frozen lm_head must be able to express a fit
    model = transformers.LlamaForCausalLM(config)
    if lora:
        lk.apply_lora(model, target_modules=TARGETS, r=4, alpha=8)
    return model


class TokenDataset(torch.utils.data.Dataset):
    """Counting sequences (next token = token + 1 mod 100) from random starts, something a few LoRA steps can
    learn; labels = input_ids (the causal LM loss shifts them itself)."""

    def __init__(self, n=N_EXAMPLES, seq=SEQ, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = (torch.randint(0, 100, (n, 1), generator=g) + torch.arange(seq)) % 100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class AdapterSnapshot(transformers.TrainerCallback):
    """Copies the adapters at on_train_begin; placed after SpectralInitCallback, it sees the init's result."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.adapters = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone())
                         for n, m in lk.lora_modules(model).items()}


def training_args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=N_EXAMPLES, logging_steps=1, seed=0, **kw)


def test_importing_lorakern_does_not_import_transformers():
    code = "import sys, lorakern; assert 'transformers' not in sys.modules, 'transformers was imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_trainer_two_lines_lora_one_init_then_loss_decreases(tmp_path):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    init, snapshot = SpectralInitCallback(mode="exact"), AdapterSnapshot()
    trainer = transformers.Trainer(
        model=model, args=training_args(tmp_path, max_steps=12), train_dataset=TokenDataset(),
        callbacks=[init, snapshot],
        optimizer_cls_and_kwargs=preconditioned_adamw(lr=2e-2))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, lk.optim.PreconditionedAdamW)  # inside accelerate's wrapper

    # The gradient batch is the whole dataset (batch size = dataset size; the sampler only permutes the rows),
    # so spectral_init on all examples in train mode must give the same LoRA-One adapters.
    reference.train()
    batch = {"input_ids": TokenDataset().ids, "labels": TokenDataset().ids}
    lk.spectral_init(reference, [batch], model_loss, mode="exact", progress=False)
    for name, ref in lk.lora_modules(reference).items():
        A, B = snapshot.adapters[name]
        assert B.abs().max() > 0  # B = 0 before the init
        # rows permuted: fp32 sums in another order; the product is the init's sign-free content
        assert rel_err(B @ A, ref.lora_B @ ref.lora_A) < 1e-4, name
    assert sorted(init.spectra) == sorted(lk.lora_modules(model))

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses
    for name, m in lk.lora_modules(model).items():  # training moved the adapters away from the init
        assert not torch.equal(m.lora_B.detach(), snapshot.adapters[name][1]), name


def test_factory_follows_the_trainer_protocol():
    factory, kw = preconditioned_adamw(lr=1e-3, damping=1e-4, order="gauss-seidel")
    opt = factory()(tiny_llama(), **kw)  # what Trainer.create_optimizer does with a non-Optimizer class
    assert factory is PreconditionedAdamWFactory and isinstance(opt, lk.optim.PreconditionedAdamW)
    assert opt.param_groups[0]["lora_pairs"] and opt.param_groups[0]["order"] == "gauss-seidel"
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['momentum'\\]"):
        preconditioned_adamw(lr=1e-3, momentum=0.9)
    with pytest.raises(ValueError, match="no LoRALinear"):
        factory()(tiny_llama(lora=False), **kw)


def test_trainer_without_lora_layers_fails_when_built(tmp_path):
    with pytest.raises(ValueError, match="has no LoRALinear layers.*apply_lora"):
        transformers.Trainer(model=tiny_llama(lora=False), args=training_args(tmp_path, max_steps=1),
                             train_dataset=TokenDataset(), callbacks=[SpectralInitCallback()])


def _begin(callback, tmp_path, model, dataloader, global_step=0):
    state = transformers.TrainerState()
    state.global_step = global_step
    return callback.on_train_begin(training_args(tmp_path, max_steps=1), state, transformers.TrainerControl(),
                                   model=model, train_dataloader=dataloader)


def test_empty_gradient_batch_fails_clearly(tmp_path):
    model = tiny_llama()
    cb = SpectralInitCallback()
    with pytest.raises(ValueError, match="gradient batch is empty.*yielded no batch"):
        _begin(cb, tmp_path, model, torch.utils.data.DataLoader(TokenDataset(n=0), batch_size=4))
    no_rows = [{"input_ids": torch.zeros(0, SEQ, dtype=torch.long), "labels": torch.zeros(0, SEQ, dtype=torch.long)}]
    with pytest.raises(ValueError, match="gradient batch is empty.*shapes \\[\\(0, 16\\)"):
        _begin(cb, tmp_path, model, no_rows)
    with pytest.raises(ValueError, match="no train dataloader"):
        _begin(cb, tmp_path, model, None)
    with pytest.raises(TypeError, match="holds no tensor"):
        _begin(cb, tmp_path, model, [["some text"]])
    assert all(not m.lora_B.any() for m in lk.lora_modules(model).values())  # nothing was touched


def test_gradient_batch_with_a_scalar_entry_is_not_empty():
    from lorakern.integrations.transformers import gradient_batches
    batch = {"input_ids": torch.zeros(2, SEQ, dtype=torch.long), "num_items_in_batch": torch.tensor(32)}
    assert len(gradient_batches([batch], 1, torch.device("cpu"))) == 1


def test_batch_without_labels_and_bad_options_fail_clearly(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="no loss.*labels"):
        spectral_init_from_dataloader(model, [{"input_ids": TokenDataset().ids}], progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        SpectralInitCallback(num_batches=0)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['rank'\\]"):
        SpectralInitCallback(rank=4)


def test_callback_draws_num_batches_and_skips_a_resumed_run(tmp_path):
    model = tiny_llama()
    loader = torch.utils.data.DataLoader(TokenDataset(), batch_size=2)
    cb = SpectralInitCallback(num_batches=3, mode="exact")
    _begin(cb, tmp_path, model, loader, global_step=5)  # resuming: the checkpoint's adapters stay
    assert cb.spectra is None and all(not m.lora_B.any() for m in lk.lora_modules(model).values())
    model.eval()
    _begin(cb, tmp_path, model, loader)
    assert not model.training  # the init ran in train mode and restored the mode
    reference = tiny_llama()
    batches = [b for _, b in zip(range(3), loader)]
    lk.spectral_init(reference.train(), batches, model_loss, mode="exact", progress=False)
    for name, ref in lk.lora_modules(reference).items():
        m = lk.lora_modules(model)[name]
        assert torch.equal(m.lora_A, ref.lora_A) and torch.equal(m.lora_B, ref.lora_B), name


def test_trainer_with_an_accelerated_peft_model(tmp_path):
    """peft code + lorakern: get_peft_model, lk.accelerate, the same two Trainer lines; LoRA-One init on peft's
    adapters (equal to spectral_init on the same PeftModel outside the Trainer), training lowers the loss, and
    peft's save_pretrained writes an adapter peft loads."""
    peft = pytest.importorskip("peft")
    base = tiny_llama(lora=False)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model = lk.accelerate(peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    init = SpectralInitCallback(mode="exact")
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=12),
                                   train_dataset=TokenDataset(), callbacks=[init],
                                   optimizer_cls_and_kwargs=preconditioned_adamw(lr=2e-2))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, lk.optim.PreconditionedAdamW)
    n_layers = 2 * len(TARGETS)
    assert len(init.spectra) == n_layers and len(trainer.optimizer.optimizer.param_groups[0]["params"]) == 2 * n_layers
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses
    reference.train()
    batch = {"input_ids": TokenDataset().ids, "labels": TokenDataset().ids}
    spectra = lk.spectral_init(reference, [batch], model_loss, mode="exact", progress=False)
    assert sorted(spectra) == sorted(init.spectra)
    for name in spectra:
        assert rel_err(init.spectra[name], spectra[name]) < 1e-4, name
    model.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(lora=False), tmp_path / "adapter")
    ids = TokenDataset().ids[:2]
    model.eval()
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-5


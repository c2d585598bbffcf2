"""TRL's SFTTrainer with lorakern, end to end on the CPU (issue 16 item 3): a tiny LLaMA from a config, a
word-level tokenizer built in memory, a few steps.

- `peft_config=`: SFTTrainer wraps the model itself; `lk.accelerate(trainer.model)` is the one added line, and
  the run equals plain peft's (losses and final adapters, fp32, SGD, dropout 0 and 0.1: lorakern's CPU path
  draws the dropout mask as nn.Dropout does) with SFTConfig's gradient checkpointing on.
- SFTConfig's default bf16=True autocasts on the CPU: peft then runs the adapters in bf16, lorakern keeps them
  in fp32 (see lorakern.integrations.peft_accel), so the runs agree to bf16 rounding, not bitwise.
- a pre-wrapped PeftModel + lorakern's two Trainer lines (LoRA-One init callback, PreconditionedAdamW) trains,
  and peft's save_pretrained writes an adapter PeftModel.from_pretrained loads.
"""
import copy

import pytest
import torch

import lorakern as lk
from conftest import rel_err

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from lorakern.integrations.transformers import SpectralInitCallback, preconditioned_adamw  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = 97  # w0 .. w96, after <pad>, <eos>, <unk>
STEPS = 4


def word_tokenizer():
    """A whitespace word-level tokenizer over w0..w96 (ids 3..99), built in memory: nothing to download."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                      initializer_range=0.2, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return transformers.LlamaForCausalLM(config)


def counting_texts(n: int = 8, length: int = 12, seed: int = 1):
    """Counting sequences "w5 w6 w7 ..." from random starts: a few LoRA steps can learn the next word."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, WORDS, (n,), generator=g).tolist()
    return datasets.Dataset.from_dict({"text": [" ".join(f"w{(s + j) % WORDS}" for j in range(length))
                                                for s in starts]})


def lora_config(dropout: float = 0.0):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout)


def sft_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                per_device_train_batch_size=8, max_steps=STEPS, logging_steps=1, seed=0, max_length=16)
    return trl.SFTConfig(**{**base, **kw})


def losses(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def run_sft(tmp_path, one_line: bool, dropout: float = 0.0, **args):
    trainer = trl.SFTTrainer(model=tiny_llama(), args=sft_args(tmp_path, **args), train_dataset=counting_texts(),
                             processing_class=word_tokenizer(), peft_config=lora_config(dropout))
    if one_line:
        lk.accelerate(trainer.model)
    assert isinstance(trainer.model, peft.PeftModel)
    trainer.train()
    return trainer


@pytest.fixture
def op_calls(monkeypatch) -> list:
    """Counts the calls of lorakern's op from accelerated peft layers (the test must see lorakern run)."""
    from lorakern.integrations import peft_accel
    calls, op = [], peft_accel.apply_checked

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return op(*args, **kwargs)
    monkeypatch.setattr(peft_accel, "apply_checked", counted)
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sft_trainer_with_peft_config_equals_plain_peft(tmp_path, dropout, op_calls):
    """fp32, SGD, gradient checkpointing (SFTConfig's default): the accelerated run's losses and final
    adapters equal plain peft's."""
    args = dict(bf16=False, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant")
    plain = run_sft(tmp_path / "peft", one_line=False, dropout=dropout, **args)
    assert not op_calls
    fast = run_sft(tmp_path / "lk", one_line=True, dropout=dropout, **args)
    assert len(op_calls) >= STEPS * 2 * len(TARGETS)  # every layer, every step, through lorakern
    assert fast.args.gradient_checkpointing
    assert len(losses(fast)) == STEPS and losses(fast)[-1] < 0.9 * losses(fast)[0], losses(fast)
    assert rel_err(torch.tensor(losses(fast)), torch.tensor(losses(plain))) < 1e-6
    want, got = adapters(plain.model), adapters(fast.model)
    assert sorted(got) == sorted(want) and len(got) == 4 * len(TARGETS)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name
    assert all(want[n].abs().sum() > 0 for n in want if "lora_B" in n)  # training moved every B from 0


def test_sft_trainer_default_bf16_autocast_agrees_to_bf16_rounding(tmp_path, op_calls):
    """SFTConfig's default bf16=True (autocast on the CPU): the adapters stay fp32 under lorakern and run in
    bf16 under peft; with SGD (Adam's first steps are sign-like and would turn a rounding difference into a
    full step) the trained adapters agree to bf16 rounding."""
    args = dict(optim="sgd", learning_rate=0.5, lr_scheduler_type="constant")
    plain = run_sft(tmp_path / "peft", one_line=False, **args)
    fast = run_sft(tmp_path / "lk", one_line=True, **args)
    assert fast.args.bf16 and len(losses(fast)) == STEPS and torch.bfloat16 in op_calls
    errors = [rel_err(got, want) for got, want in zip(adapters(fast.model).values(), adapters(plain.model).values())]
    assert rel_err(torch.tensor(losses(fast)), torch.tensor(losses(plain))) < 1e-2
    assert 0 < max(errors) < 2e-2, max(errors)  # not bitwise (the adapters' precision differs), bf16-close


@pytest.mark.parametrize("wrap", ["prewrapped", "peft_config"])
def test_sft_trainer_with_lorakern_init_and_optimizer(tmp_path, wrap, op_calls):
    """peft code + lorakern in TRL, the model wrapped by get_peft_model before or by SFTTrainer's peft_config:
    lk.accelerate, LoRA-One init callback and PreconditionedAdamW (README's example); the loss falls and peft's
    save_pretrained writes an adapter peft loads."""
    init = SpectralInitCallback(mode="exact")
    kw = dict(args=sft_args(tmp_path, bf16=False, max_steps=8), train_dataset=counting_texts(),
              processing_class=word_tokenizer(), callbacks=[init],
              optimizer_cls_and_kwargs=preconditioned_adamw(lr=2e-2))
    if wrap == "prewrapped":
        trainer = trl.SFTTrainer(model=lk.accelerate(peft.get_peft_model(tiny_llama(), lora_config())), **kw)
    else:
        trainer = trl.SFTTrainer(model=tiny_llama(), peft_config=lora_config(), **kw)
        lk.accelerate(trainer.model)
    model = trainer.model
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, lk.optim.PreconditionedAdamW)
    assert len(init.spectra) == 2 * len(TARGETS)
    loss = losses(trainer)
    assert len(loss) == 8 and loss[-1] < 0.8 * loss[0], loss
    assert len(op_calls) >= 8 * 2 * len(TARGETS)
    model.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    ids = torch.tensor([[3 + (5 + j) % WORDS for j in range(10)]])
    model.eval()
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-5
    reference = copy.deepcopy(model)
    lk.restore(reference)
    with torch.no_grad():
        assert rel_err(reference(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-6

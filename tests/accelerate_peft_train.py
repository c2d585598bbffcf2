"""Trains a tiny float64 LLaMA's peft LoRA adapters with lorakern (lk.accelerate, LoRA-One init, PreconditionedAdamW)
through Hugging Face accelerate, in one process or under `accelerate launch` (tests/test_trl.py runs both).

    python tests/accelerate_peft_train.py OUT                                   # one process, global batch
    accelerate launch --cpu --num_processes 2 tests/accelerate_peft_train.py OUT  # 2 processes, gloo

Each step sees the same global batch of GLOBAL_BATCH sequences (in one process, or split evenly across the
processes by accelerate's dataloader); the LoRA-One init's gradient batch is that global batch too (each rank
its share; spectral_init all-reduces). Rank 0 writes OUT/adapters.pt (every lora_A / lora_B after training)
and OUT/losses.pt (the global mean loss of every step).
"""
import os
import sys

import peft
import torch
import transformers
from accelerate import Accelerator

import lorakern as lk
from lorakern.integrations.transformers import model_loss

GLOBAL_BATCH, SEQ, STEPS = 8, 12, 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_peft_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                      initializer_range=0.2)
    base = transformers.LlamaForCausalLM(config).to(torch.float64)
    return lk.accelerate(peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))


def counting_batches() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 100, (GLOBAL_BATCH, 1), generator=g) + torch.arange(SEQ)) % 100


def main(out: str) -> None:
    acc = Accelerator(cpu=True)
    model = tiny_peft_llama()
    ids = counting_batches()
    loader = torch.utils.data.DataLoader([{"input_ids": s, "labels": s} for s in ids], shuffle=False,
                                         batch_size=GLOBAL_BATCH // acc.num_processes)
    share = ids.chunk(acc.num_processes)[acc.process_index]
    lk.spectral_init(model, [{"input_ids": share, "labels": share}], model_loss, mode="exact", progress=False)
    opt = lk.optim.PreconditionedAdamW(model, lr=1e-2)
    model, opt, loader = acc.prepare(model, opt, loader)
    losses = []
    for step in range(STEPS):
        for batch in loader:  # one batch per process: the global batch, once per step
            loss = model(**batch).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(acc.reduce(loss.detach(), reduction="mean"))
    if acc.is_main_process:
        os.makedirs(out, exist_ok=True)
        unwrapped = acc.unwrap_model(model)
        torch.save({n: p.detach().clone() for n, p in unwrapped.named_parameters() if "lora_" in n},
                   os.path.join(out, "adapters.pt"))
        torch.save({"losses": torch.stack(losses), "processes": acc.num_processes,
                    "distributed": acc.distributed_type.value}, os.path.join(out, "losses.pt"))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1])

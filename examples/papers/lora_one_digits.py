"""Reproduction of lora-one.txt Fig. 1(c) on real data: fine-tuning a pre-trained two-layer network on new
classes with Full FT, LoRA, LoRA-One, LoRA-One-P and NoRA.

The paper (App. G.1, after PiSSA) pre-trains on 10000 odd-labelled MNIST images and fine-tunes on 1000
even-labelled ones, lr 5e-4 for every method, and plots the training loss. Here MNIST is replaced by
scikit-learn's bundled 8 x 8 digits (no download): a 64-64-10 ReLU network is pre-trained on the odd digits,
then fine-tuned (full batch) on two thirds of the even digits; the last third measures test accuracy.

  Full FT     torch.optim.AdamW on every weight and bias
  LoRA        lk.apply_lora(init="lora") on both layers, AdamW on the adapters
  LoRA-One    the same adapters, lk.spectral_init(method="lora-one", mode="exact") on the fine-tuning set
              (Algorithm 1: normalised by S_1, gamma = 1/s), then AdamW
  LoRA-One-P  the LoRA-One init, then lk.optim.PreconditionedAdamW (Algorithm 2, damping 1e-6)
  NoRA        lk.apply_lora(init="nystrom") (lora_B = W Omega, lora_A = 0), AdamW

The figure's caption says "under gradient descent": every method also runs with plain full-batch GD
(torch.optim.SGD without momentum; LoRA-One-P: lk.optim.ScaledGD, the preconditioned GD of Algorithm 2 with
damping 1e-6), on its own learning-rate grid (GD's steps are not Adam's: 5e-4 barely moves it).

Adapters: r = 4, alpha = 16 with rsLoRA scaling alpha/sqrt(r) (Algorithm 1's output W + (alpha/sqrt(r)) A B),
s = 16 (the paper's SST-2 value). Every method gets the same learning rate; we report three of them per
optimizer (AdamW: the paper's 5e-4 included) over three seeds (data split, pre-training, adapter draws).

    python examples/papers/lora_one_digits.py [--quick]
"""
from __future__ import annotations

import copy
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lorakern as lk  # noqa: E402
from _common import begin, finish, print_table, pyplot, save_figure, torch_threads, run_cli  # noqa: E402

METHODS = ("Full FT", "LoRA", "LoRA-One", "LoRA-One-P", "NoRA")
OPTIMIZERS = ("adamw", "gd")
RANK, ALPHA, S = 4, 16.0, 16.0


def digits_split(seed: int) -> dict:
    """Odd digits for pre-training; even digits split 2/3 fine-tuning, 1/3 test. Pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32) / 16.0, torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    odd, even = y % 2 == 1, y % 2 == 0
    Xe, ye = X[even], y[even]
    n = 2 * len(ye) // 3
    return {"pre": (X[odd], y[odd]), "train": (Xe[:n], ye[:n]), "test": (Xe[n:], ye[n:])}


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def accuracy(model: nn.Module, batch) -> float:
    with torch.no_grad():
        return float((model(batch[0]).argmax(1) == batch[1]).float().mean())


def pretrain(data: dict, seed: int, hidden: int = 64, steps: int = 300) -> nn.Module:
    """The "pre-trained model": a two-layer ReLU network fitted to the odd digits (full-batch Adam)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(net, data["pre"]).backward()
        opt.step()
    return net


def prepare(method: str, base: nn.Module, train, lr: float, seed: int, optimizer: str = "adamw"):
    """A copy of the pre-trained network set up for `method`, and its optimizer ("adamw" or "gd")."""
    torch.manual_seed(seed)  # the random adapter draws (LoRA's A, NoRA's Omega)
    model = copy.deepcopy(base)
    if method == "Full FT":
        return model, (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0) if optimizer == "adamw"
                       else torch.optim.SGD(model.parameters(), lr=lr))
    lk.apply_lora(model, r=RANK, alpha=ALPHA, rslora=True, init="nystrom" if method == "NoRA" else "lora")
    if method in ("LoRA-One", "LoRA-One-P"):
        # Algorithm 1 lines 1-6: the one-step full gradient of the fine-tuning loss at the pre-trained weights
        lk.spectral_init(model, [train], loss_fn, method="lora-one", mode="exact", s=S, progress=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "gd":
        return model, (lk.optim.ScaledGD(model, lr=lr, damping=1e-6) if method == "LoRA-One-P"
                       else torch.optim.SGD(trainable, lr=lr))
    if method == "LoRA-One-P":
        return model, lk.optim.PreconditionedAdamW(model, lr=lr, weight_decay=0.0)
    return model, torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)


def finetune(method: str, base: nn.Module, data: dict, lr: float, steps: int, seed: int,
             optimizer: str = "adamw") -> dict:
    model, opt = prepare(method, base, data["train"], lr, seed, optimizer)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, data["train"])
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(float(loss_fn(model, data["train"])))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"losses": losses, "test_acc": accuracy(model, data["test"]), "trainable": trainable}


def experiment(seeds: list[int], lrs: dict[str, list[float]], steps: int) -> dict:
    """lrs: {optimizer: its learning rates}. runs[(seed, optimizer, lr, method)]."""
    runs = {}
    pre = {}
    for seed in seeds:
        data = digits_split(seed)
        base = pretrain(data, seed)
        pre[seed] = {"odd_acc": accuracy(base, data["pre"]), "even_acc": accuracy(base, data["test"]),
                     "n": {k: len(v[1]) for k, v in data.items()}}
        for optimizer, grid in lrs.items():
            for lr in grid:
                for method in METHODS:
                    runs[(seed, optimizer, lr, method)] = finetune(method, base, data, lr, steps, seed, optimizer)
    return {"runs": runs, "pre": pre, "seeds": seeds, "lrs": lrs, "steps": steps}


def summary(res: dict, optimizer: str, lr: float, method: str) -> dict:
    runs = [res["runs"][(s, optimizer, lr, method)] for s in res["seeds"]]
    final = [r["losses"][-1] for r in runs]
    diverged = sum(not math.isfinite(f) for f in final)
    mid = [r["losses"][len(r["losses"]) // 4] for r in runs]
    return {"final": statistics.mean(final), "final_max": max(final), "final_min": min(final),
            "quarter": statistics.mean(mid), "acc": statistics.mean(r["test_acc"] for r in runs),
            "loss0": statistics.mean(r["losses"][0] for r in runs), "trainable": runs[0]["trainable"],
            "diverged": diverged}


def plot(res: dict, main_lr: dict[str, float], out=None):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(19, 4.8))
    seed = res["seeds"][0]
    for k, optimizer in enumerate(OPTIMIZERS):
        for method in METHODS:
            ax[k].semilogy(res["runs"][(seed, optimizer, main_lr[optimizer], method)]["losses"], label=method)
        ax[k].set(title=f"Fig. 1(c) on digits, {optimizer}: loss on even digits (lr {main_lr[optimizer]:g}, "
                        f"seed {seed})", xlabel="full-batch step", ylabel="cross-entropy (train)")
        ax[k].legend(fontsize=8)
    for optimizer, style in zip(OPTIMIZERS, ("o-", "s--")):
        grid = res["lrs"][optimizer]
        for method in METHODS:
            ax[2].loglog(grid, [summary(res, optimizer, lr, method)["final"] for lr in grid], style,
                         label=f"{method} ({optimizer})")
    ax[2].set(title=f"final training loss after {res['steps']} steps vs lr (mean of {len(res['seeds'])} seeds)",
              xlabel="learning rate (the same for every method)", ylabel="final loss (NaN: diverged, not drawn)")
    ax[2].legend(fontsize=6, ncol=2)
    return save_figure(plt, fig, "lora_one_digits.png", out)


def main(quick: bool = False, out=None) -> dict:
    start = begin("lora-one.txt Fig. 1(c) on scikit-learn digits: pre-train on odd, fine-tune on even", quick)
    seeds, steps = ([0], 60) if quick else ([0, 1, 2], 200)
    lrs = ({"adamw": [5e-3], "gd": [1e-2]} if quick else
           {"adamw": [5e-4, 2e-3, 5e-3], "gd": [1e-3, 3e-3, 1e-2, 3e-2]})
    main_lr = {"adamw": 5e-3, "gd": 1e-2}
    with torch_threads(1):
        res = experiment(seeds, lrs, steps)
    p = res["pre"][seeds[0]]
    print(f"\nsplit: {p['n']}; pre-trained net: odd-digit accuracy {p['odd_acc']:.3f}, even-digit test accuracy "
          f"{p['even_acc']:.3f} (it has never seen an even label)")
    for optimizer, grid in lrs.items():
        for lr in grid:
            rows = []
            for method in METHODS:
                sm = summary(res, optimizer, lr, method)
                rows.append([method, sm["trainable"], f"{sm['loss0']:.3g}", f"{sm['quarter']:.3g}",
                             (f"{sm['final']:.3g} [{sm['final_min']:.3g}, {sm['final_max']:.3g}]" if not sm["diverged"]
                              else f"diverged in {sm['diverged']} of {len(seeds)} seeds"), f"{sm['acc']:.3f}"])
            print_table(f"{optimizer}, lr = {lr:g}, {steps} full-batch steps, mean over seeds {seeds} (paper: LoRA-One "
                        f"tracks Full FT and reaches a lower loss than LoRA; caption: under gradient descent)",
                        ["method", "trainable params", "loss at init", f"loss at step {steps // 4}",
                         "final loss [min, max]", "test accuracy"], rows)
    res["main_lr"] = main_lr
    return finish(res, plot(res, main_lr, out), start, "lora_one_digits")


if __name__ == "__main__":
    run_cli(main, __doc__)

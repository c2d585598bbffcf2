"""Quality benchmark (issue 15): peft's and lorakern's LoRA recipes on real pretrained weights and real data.

    python -m benchmarks.quality.run [--quick] [--tasks T ...] [--recipes R ...] [--seeds N] [--digits-seeds N]
                                     [--lrs LR ...] [--steps N] [--out DIR]

For every task, seed, recipe and learning rate: a fresh copy of the seed's frozen base gets the recipe's
adapters and init, the seed's initial head, and trains on the seed's batches in the seed's order (identical
across recipes) with a linear warm-up (5%) and linear decay, gradient clipping at 1.0 over the trainable
parameters, and the head's own AdamW. Validation and test accuracy / loss are measured at `--evals` evenly
spaced points of the step budget (test), validation accuracy / loss at the end. The best lr of a recipe is the one with the highest mean final *validation*
accuracy (a diverged run counts as 0); the reported numbers are *test* numbers at that lr. A run whose loss
becomes NaN/Inf stops there and is recorded as diverged (for that lr and seed).

Writes to --out (default benchmarks/quality/results/, benchmarks/quality/results/quick/ under --quick):
results.json (every run, every curve), results.md (the tables), curves_<task>.png (test accuracy vs step at
each recipe's best lr, mean and a +-1 std band over seeds) and lr_<task>.png (final accuracy vs lr per
recipe, lora-one.txt Fig. 6's view).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/quality/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.quality"

import torch  # noqa: E402

from .recipes import BASELINE, RECIPES, get_recipes  # noqa: E402
from .tasks import TASKS, build_net, evaluate, get_tasks, loss_fn  # noqa: E402

HERE = Path(__file__).resolve().parent
COLUMNS = ["recipe", "best lr", "acc@25%", "acc@50%", "final acc (mean ± std)", "final loss", "steps to baseline",
           "≤ ½ baseline steps", "diverged"]
FRACTIONS = (0.25, 0.5)


def schedule(total: int, warmup_frac: float = 0.05):
    warm = max(1, int(total * warmup_frac))

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))
    return f


def eval_points(steps: int, evals: int) -> list[int]:
    return sorted({round(k * steps / evals) for k in range(evals + 1)})


def train_one(task, data, init_body, recipe, lr, steps, evals):
    """Train one (recipe, lr) from a copy of the initialized body. Returns the run record."""
    body = copy.deepcopy(init_body)
    net = build_net(task, data, body)
    opt = recipe.optimizer(body, lr)
    opts = [opt]
    if net.head is not None:
        opts.append(torch.optim.AdamW(net.head.parameters(), lr=task.head_lr, weight_decay=0.0))
    f = schedule(steps)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, f) for o in opts]
    params = [p for p in net.parameters() if p.requires_grad]
    points = eval_points(steps, evals)
    rec = {"lr": lr, "points": [], "val_acc": None, "val_loss": None, "test_acc": [], "test_loss": [],
           "train_loss": [], "diverged": False, "diverged_at": None}

    def checkpoint(step):
        # test at every point (the curves); val at the end only (it selects the lr)
        ta, tl = evaluate(net, data.test)
        va, vl = evaluate(net, data.val) if step == steps else (None, 0.0)
        if not (math.isfinite(vl) and math.isfinite(tl)):
            return False
        rec["points"].append(step)
        rec["test_acc"].append(ta)
        rec["test_loss"].append(tl)
        if step == steps:
            rec["val_acc"], rec["val_loss"] = va, vl
        return True

    t0 = time.perf_counter()
    net.train()
    ok = checkpoint(0)
    step = 0
    while ok and step < steps:
        x, y = data.train[step]
        loss = loss_fn(net, (x, y))
        if not torch.isfinite(loss):
            ok = False
            break
        rec["train_loss"].append(loss.item())
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for o in opts:
            o.step()
        for s in scheds:
            s.step()
        step += 1
        if step in points:
            ok = checkpoint(step)
    if not ok:
        rec["diverged"], rec["diverged_at"] = True, step
    rec["train_s"] = time.perf_counter() - t0
    return rec


def run(args) -> dict:
    tasks = get_tasks(args.tasks)
    recipes = get_recipes(args.recipes)
    skipped = {}
    for t in list(tasks):
        why = t.available()
        if why:
            if args.tasks_given:
                raise SystemExit(f"task {t.name!r} cannot run here: {why}")
            skipped[t.name] = why
            print(f"[skip] {t.name}: {why}")
            tasks.remove(t)
    result = {"meta": {"date": datetime.date.today().isoformat(), "argv": sys.argv, "quick": args.quick,
                       "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                                  f"{torch.get_num_threads()} threads",
                       "baseline": BASELINE, "skipped_tasks": skipped},
              "tasks": {}}
    t_all = time.perf_counter()
    for task in tasks:
        steps = args.steps or (task.quick_steps if args.quick else task.steps)
        lrs = (args.digits_lrs if task.name == "digits" else args.lrs) or \
            list(task.quick_lrs if args.quick else task.default_lrs)
        n_seeds = args.digits_seeds if task.name == "digits" else args.seeds
        evals = args.evals or (1 if args.quick else task.evals)
        tr = {"description": task.description, "steps": steps, "lrs": lrs, "seeds": list(range(n_seeds)),
              "points": eval_points(steps, evals), "r": task.r, "alpha": task.alpha, "batch_size": task.batch_size,
              "head_lr": task.head_lr, "recipes": {r.name: {"label": r.label, "family": r.family, "runs": []}
                                                    for r in recipes},
              "seed_info": {}}
        result["tasks"][task.name] = tr
        t_task = time.perf_counter()
        threads_before = torch.get_num_threads()
        if task.threads or args.threads:
            torch.set_num_threads(task.threads or args.threads)
        try:
            run_task(task, tr, recipes, lrs, steps, evals, n_seeds, args)
        finally:
            torch.set_num_threads(threads_before)
        tr["wall_s"] = time.perf_counter() - t_task
        summarize(tr)
        if args.partial_write:  # each finished task is on disk before the next one starts
            args.partial_write(result)
    result["meta"]["wall_s"] = time.perf_counter() - t_all
    return result


def run_task(task, tr, recipes, lrs, steps, evals, n_seeds, args):
    """Every seed, recipe and lr of one task; the runs go into tr['recipes'][name]['runs']."""
    for seed in range(n_seeds):
        t0 = time.perf_counter()
        data = task.setup(seed, steps, head=args.head, quick=args.quick, eval_size=args.eval_size)
        tr["seed_info"][seed] = data.info
        print(f"[{task.name}] seed {seed}: data and head ready in {time.perf_counter() - t0:.1f}s {data.info}",
              flush=True)
        inits = {}
        for recipe in recipes:
            if recipe.init_key not in inits:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    inits[recipe.init_key] = (recipe.init(task, data, seed), time.perf_counter() - t0)
            body, init_s = inits[recipe.init_key]
            for lr in lrs:
                rec = train_one(task, data, body, recipe, lr, steps, evals)
                rec.update(seed=seed, init_s=init_s)
                tr["recipes"][recipe.name]["runs"].append(rec)
                final = "DIVERGED at step %d" % rec["diverged_at"] if rec["diverged"] else \
                    f"val {rec['val_acc']:.3f} test {rec['test_acc'][-1]:.3f} loss {rec['test_loss'][-1]:.3f}"
                print(f"[{task.name}] seed {seed} {recipe.name:<16} lr {lr:<8g} {final}  "
                      f"(init {init_s:.1f}s, train {rec['train_s']:.1f}s)", flush=True)
        del inits


# ------------------------------------------------------------------------------------------------ summary

def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _at(rec, key, step):
    """The value of curve `key` at eval point `step` (None if the run diverged before it)."""
    return rec[key][rec["points"].index(step)] if step in rec["points"] else None


def summarize(tr: dict) -> None:
    """Adds per-lr and best-lr summaries to a task's record (in place)."""
    points, last = tr["points"], tr["points"][-1]
    for name, rr in tr["recipes"].items():
        by_lr = {}
        for lr in tr["lrs"]:
            runs = [r for r in rr["runs"] if r["lr"] == lr]
            if not runs:
                continue
            val = [0.0 if r["diverged"] else r["val_acc"] for r in runs]
            vloss = [r["val_loss"] for r in runs]
            test = [_at(r, "test_acc", last) for r in runs]
            by_lr[str(lr)] = {"val_acc": _ms(val), "val_loss": _ms(vloss), "test_acc": _ms(test),
                              "diverged": sum(r["diverged"] for r in runs), "n": len(runs)}
        rr["by_lr"] = by_lr
        if not by_lr:
            continue
        best = max(by_lr, key=lambda k: (by_lr[k]["val_acc"][0],
                                         -(by_lr[k]["val_loss"][0] if by_lr[k]["val_loss"][0] is not None
                                           else math.inf)))
        runs = [r for r in rr["runs"] if r["lr"] == float(best)]
        curve = []
        for p in points:
            vals = [_at(r, "test_acc", p) for r in runs]
            curve.append(_ms(vals)[0] if all(v is not None for v in vals) else None)
        rr["best"] = {"lr": float(best), "curve_points": points, "test_acc_curve": curve,
                      "test_acc": {f: _ms([_at(r, "test_acc", _frac_point(points, f)) for r in runs])
                                   for f in (*FRACTIONS, 1.0)},
                      "test_loss": {f: _ms([_at(r, "test_loss", _frac_point(points, f)) for r in runs])
                                    for f in (*FRACTIONS, 1.0)},
                      "diverged": sum(r["diverged"] for r in runs), "n": len(runs)}
    base = tr["recipes"].get(BASELINE, {}).get("best")
    target = base["test_acc"][1.0][0] if base else None
    tr["baseline_final_acc"] = target
    base_steps = None
    for name, rr in tr["recipes"].items():
        if "best" not in rr:
            continue
        b = rr["best"]
        reached = None
        if target is not None:
            for p, v in zip(points, b["test_acc_curve"]):
                if v is not None and v >= target - 1e-12:
                    reached = p
                    break
        b["steps_to_baseline"] = reached
        if name == BASELINE:
            base_steps = reached
    tr["baseline_steps"] = base_steps
    tr["hypothesis"] = hypothesis(tr)


def _frac_point(points, f):
    target = f * points[-1]
    return min(points, key=lambda p: abs(p - target))


def hypothesis(tr: dict) -> dict:
    """LoRA-One(-P) vs the tuned baseline, peft's LoRA-GA and peft's PiSSA on this task (mean over seeds)."""
    rec = tr["recipes"]
    out = {}

    def final(n):
        return rec[n]["best"]["test_acc"][1.0][0] if n in rec and "best" in rec[n] else None
    for n in ("lk-lora-one", "lk-lora-one-p"):
        if final(n) is None or final(BASELINE) is None:
            continue
        st, bs = rec[n]["best"]["steps_to_baseline"], tr["baseline_steps"]
        h = {"final_acc": final(n), "baseline_final_acc": final(BASELINE),
             "final_minus_baseline": final(n) - final(BASELINE),
             "steps_to_baseline": st, "baseline_steps": bs,
             "half_steps": bool(st is not None and bs is not None and st <= bs / 2),
             "ends_ge_baseline": final(n) >= final(BASELINE)}
        for other in ("peft-lora-ga", "peft-pissa"):
            if final(other) is not None:
                h[f"minus_{other}"] = final(n) - final(other)
                h[f"ge_{other}"] = final(n) >= final(other)
        h["holds"] = h["half_steps"] and h["ends_ge_baseline"] and all(
            v for k, v in h.items() if k.startswith("ge_"))
        out[n] = h
    return out


def _pm(ms, scale=100.0, digits=1):
    m, s = ms
    if m is None:
        return "—"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [f"Quality benchmark, {result['meta']['date']}, {result['meta']['machine']}; "
             f"`{' '.join(result['meta']['argv'])}`; baseline `{result['meta']['baseline']}` "
             f"(its tuned final test accuracy is the target of \"steps to baseline\"). Accuracies in %, "
             f"test split, mean ± std over seeds at each recipe's best lr (chosen on the validation split).", ""]
    for tname, tr in result["tasks"].items():
        lines += [f"### {tname}: {tr['description']}", "",
                  f"{len(tr['seeds'])} seeds, {tr['steps']} steps of batch {tr['batch_size']}, r={tr['r']}, "
                  f"alpha={tr['alpha']:g} (rsLoRA), lr grid {tr['lrs']}, evaluated at steps {tr['points']}; "
                  f"baseline final accuracy {_pm((tr['baseline_final_acc'], 0.0)).split(' ±')[0]}, reached at "
                  f"step {tr['baseline_steps']}; wall {tr.get('wall_s', 0):.0f}s.", ""]
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for name, rr in tr["recipes"].items():
            if "best" not in rr:
                lines.append(f"| {name} | " + " | ".join(["—"] * (len(COLUMNS) - 1)) + " |")
                continue
            b = rr["best"]
            st, bs = b["steps_to_baseline"], tr["baseline_steps"]
            half = "—" if st is None or bs is None else ("yes" if st <= bs / 2 else "no")
            lines.append("| " + " | ".join([
                name, f"{b['lr']:g}", _pm(b["test_acc"][0.25]), _pm(b["test_acc"][0.5]), _pm(b["test_acc"][1.0]),
                _pm(b["test_loss"][1.0], 1.0, 3), "not reached" if st is None else str(st), half,
                f"{b['diverged']}/{b['n']}"]) + " |")
        lines += ["", "Final test accuracy (%) by lr, mean ± std over seeds (diverged runs: n/N):", "",
                  "| recipe | " + " | ".join(f"lr {lr:g}" for lr in tr["lrs"]) + " |",
                  "|---|" + "---|" * len(tr["lrs"])]
        for name, rr in tr["recipes"].items():
            cells = []
            for lr in tr["lrs"]:
                d = rr.get("by_lr", {}).get(str(lr))
                if d is None:
                    cells.append("—")
                    continue
                cell = _pm(d["test_acc"])
                if d["diverged"]:
                    cell += f" (diverged {d['diverged']}/{d['n']})"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if tr["hypothesis"]:
            lines += ["", "Hypothesis (LoRA-One(-P) reaches the baseline's final accuracy in ≤ half its steps, ends "
                          "≥ it and ≥ peft's LoRA-GA and PiSSA):", ""]
            for n, h in tr["hypothesis"].items():
                extra = ", ".join(f"{k[6:]} {v * 100:+.1f} pts" for k, v in h.items() if k.startswith("minus_"))
                lines.append(f"- {n}: {'HOLDS' if h['holds'] else 'does not hold'}: final "
                             f"{h['final_acc'] * 100:.1f} vs baseline {h['baseline_final_acc'] * 100:.1f} "
                             f"({h['final_minus_baseline'] * 100:+.1f} pts); steps to baseline "
                             f"{h['steps_to_baseline']} vs {h['baseline_steps']}; vs {extra}")
        lines.append("")
    return "\n".join(lines)


def _save(plt, fig, ax, path: Path) -> Path:
    """Legend, layout, the PNG at `path`, the figure closed; returns path."""
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figures(result: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for tname, tr in result["tasks"].items():
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, (name, rr) in enumerate(tr["recipes"].items()):
            if "best" not in rr:
                continue
            runs = [r for r in rr["runs"] if r["lr"] == rr["best"]["lr"] and not r["diverged"]]
            if not runs:
                continue
            pts = tr["points"]
            acc = torch.tensor([r["test_acc"] for r in runs]) * 100
            m = acc.mean(0)
            s = acc.std(0) if len(runs) > 1 else torch.zeros_like(m)
            style = "-" if rr["family"] == "lorakern" else "--"
            line, = ax.plot(pts, m, style, label=f"{name} (lr {rr['best']['lr']:g})", color=f"C{i % 10}")
            ax.fill_between(pts, m - s, m + s, alpha=0.15, color=line.get_color())
        if tr["baseline_final_acc"] is not None:
            ax.axhline(tr["baseline_final_acc"] * 100, color="k", lw=0.8, ls=":", label="baseline final")
        ax.set(xlabel="optimizer step", ylabel="test accuracy (%)",
               title=f"{tname}: test accuracy at each recipe's best lr (mean ± std, {len(tr['seeds'])} seeds)")
        paths.append(_save(plt, fig, ax, out / f"curves_{tname}.png"))

        fig, ax = plt.subplots(figsize=(8, 5))
        for i, (name, rr) in enumerate(tr["recipes"].items()):
            xs, ms, ss = [], [], []
            for lr in tr["lrs"]:
                d = rr.get("by_lr", {}).get(str(lr))
                if d and d["test_acc"][0] is not None:
                    xs.append(lr)
                    ms.append(d["test_acc"][0] * 100)
                    ss.append(d["test_acc"][1] * 100)
            if xs:
                style = "o-" if rr["family"] == "lorakern" else "s--"
                ax.errorbar(xs, ms, yerr=ss, fmt=style, capsize=3, label=name, color=f"C{i % 10}")
        ax.set_xscale("log")
        ax.set(xlabel="learning rate (adapters)", ylabel="final test accuracy (%)",
               title=f"{tname}: final accuracy vs lr (mean ± std over seeds)")
        paths.append(_save(plt, fig, ax, out / f"lr_{tname}.png"))
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI mode: every recipe, 1 seed (2 on digits), 1 lr, few steps")
    p.add_argument("--tasks", nargs="+", default=None, help=f"default: all of {list(TASKS)} that can run here")
    p.add_argument("--recipes", nargs="+", default=None, help=f"default: all of {list(RECIPES)}")
    p.add_argument("--seeds", type=int, default=None, help="seeds of the MiniLM tasks (default 3; quick 1)")
    p.add_argument("--digits-seeds", type=int, default=None, help="seeds of digits (default 10; quick 2)")
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="lr grid of the MiniLM tasks (default: per task); with --tasks digits alone, of digits too")
    p.add_argument("--digits-lrs", nargs="+", type=float, default=None, help="lr grid of digits (default: per task)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="cap on the validation and the test set of the MiniLM tasks (default 200 / 300)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: per task)")
    p.add_argument("--evals", type=int, default=None, help="evaluation points after step 0 (default: per task, 4 MiniLM / 10 digits; quick 1)")
    p.add_argument("--head", choices=["probe", "random"], default="random", help="initial head of the MiniLM tasks")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the MiniLM tasks (default: torch's; 1 is robust on a shared machine, "
                        "where a starved OpenMP thread stalls every parallel region)")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="combine the results.json of earlier runs (one task each) into --out, then exit")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/quality/results, quick: .../quick)")
    args = p.parse_args(argv)
    args.tasks_given = args.tasks is not None
    args.tasks = args.tasks or list(TASKS)
    args.recipes = args.recipes or list(RECIPES)
    try:
        get_tasks(args.tasks)
        get_recipes(args.recipes)
    except ValueError as e:
        p.error(str(e))
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.digits_seeds is None:
        args.digits_seeds = 2 if args.quick else 10
    if min(args.seeds, args.digits_seeds, args.evals or 1) < 1 or (args.steps is not None and args.steps < 1):
        p.error("--seeds, --digits-seeds, --evals and --steps must be >= 1")
    if args.quick and args.threads is None:
        args.threads = 1  # CI shares the machine: a starved second OpenMP thread stalls every parallel region
    if args.digits_lrs is None and args.tasks == ["digits"]:
        args.digits_lrs = args.lrs
    args.out = Path(args.out) if args.out else HERE / "results" / ("quick" if args.quick else "")
    args.partial_write = None
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def write(result):
        (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
        md = markdown(result)
        (args.out / "results.md").write_text(md)
        return md
    args.partial_write = write
    if args.merge:
        result = {"meta": None, "tasks": {}}
        for d in args.merge:
            part = json.loads((Path(d) / "results.json").read_text())
            result["meta"] = result["meta"] or part["meta"]
            result["meta"].setdefault("merged", []).append({"dir": str(d), "argv": part["meta"]["argv"]})
            result["tasks"].update(part["tasks"])
        for tr in result["tasks"].values():
            summarize(tr)
        result["meta"]["argv"] = sys.argv
    else:
        result = run(args)
    md = write(result)
    paths = figures(result, args.out)
    print("\n" + md)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, " + ", ".join(p.name for p in paths))
    print(f"total wall time {time.perf_counter() - t0:.1f}s")
    return result


if __name__ == "__main__":
    main()

"""Reproduction of lora-gd-convergence-rate.txt (Mu & Klabjan, "On the Convergence Rate of LoRA Gradient Descent").

The paper is purely theoretical (no experiments). Its checkable claims, on a least-squares fine-tuning problem
L(W) = 1/(2N) ||X (W0 + W)^T - Y||^2 (L-smooth with L = lambda_max(X^T X / N), clamped to >= 1 as the paper
assumes; L* = 0), trained with the library's LoRALinear (float64) by plain simultaneous GD (3):

  B1  with the step size of rule (8) (lk.theory.safe_step_size) the descent inequality (9) holds at every
      step (checked by lk.theory.DescentMonitor), over ranks, inits (B0 = 0 or large ||V0||) and scalings;
      constant steps beyond the rule (0.1, 0.2) violate it and the monitor warns (0.1 still lowers the loss,
      but by less than (9) demands; 0.2 diverges);
  B2  min_{t<T} ||grad J||^2 stays below the certificate (10) and the a-priori O(1/log T) bound (11) (and the
      O(1/T) bound (12) with C = max ||V_t||); ||V_T||^2 and eta_t stay within their bounds from App. A.4.

    python examples/papers/lora_gd_convergence_rate.py [--quick]
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lorakern as lk  # noqa: E402
from lorakern import theory  # noqa: E402
from _common import begin, finish, print_table, pyplot, save_figure, run_cli  # noqa: E402

F64 = torch.float64


def least_squares_problem(out_f: int, in_f: int, N: int, gen: torch.Generator) -> dict:
    """A 'pre-trained' W0, a target W0 + Delta* with a full-rank Delta* ~ N(0, 1), inputs X ~ N(0, 1)."""
    X = torch.randn(N, in_f, dtype=F64, generator=gen)
    W0 = torch.randn(out_f, in_f, dtype=F64, generator=gen) / math.sqrt(in_f)
    delta = torch.randn(out_f, in_f, dtype=F64, generator=gen)
    Y = X @ (W0 + delta).T
    L = max(1.0, float(torch.linalg.eigvalsh(X.T @ X / N).max()))  # Assumption 1: L >= 1
    return {"X": X, "Y": Y, "W0": W0, "L": L, "N": N}


def make_layer(prob: dict, r: int, alpha: float, init_scale: float, gen: torch.Generator) -> lk.LoRALinear:
    """LoRALinear on W0; lora_A from lk.init.gaussian with std 1/sqrt(in) (B0 = 0), or, with init_scale > 0,
    both factors ~ N(0, init_scale^2) (a large ||V0||, which rule (8) must also handle)."""
    W0 = prob["W0"]
    out_f, in_f = W0.shape
    layer = lk.LoRALinear(in_f, out_f, r=r, alpha=alpha, bias=False, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(W0)
        if init_scale > 0:
            layer.lora_A.copy_(lk.init.gaussian(W0, r, std=init_scale, generator=gen)[0])
            layer.lora_B.normal_(0.0, init_scale, generator=gen)
        else:
            A, B = lk.init.gaussian(W0, r, std=1.0 / math.sqrt(in_f), generator=gen)
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
    return layer


def train(prob: dict, layer: lk.LoRALinear, steps: int, fixed_step: float | None = None, warn: str = "streak",
          rtol: float = 1e-10) -> dict:
    """Plain LoRA GD (3) with rule (8) (or a fixed step) under a DescentMonitor; returns the record."""
    X, Y, N, L = prob["X"], prob["Y"], prob["N"], prob["L"]
    monitor = theory.DescentMonitor(rtol=rtol, warn=warn)
    sq_norms, grad_norms = [], []
    for _ in range(steps):
        out = layer(X)
        loss = (out - Y).pow(2).sum() / (2 * N)
        dY, gA, gB = torch.autograd.grad(loss, (out, layer.lora_A, layer.lora_B))
        full_grad = dY.T @ X  # grad of L with respect to the full weight W = W0 + scaling B A
        v2 = theory.adapter_sq_norm(layer)
        eta = fixed_step if fixed_step is not None else theory.safe_step_size(
            L, v2, float(full_grad.norm()), scaling=layer.scaling)
        monitor.update(loss.detach(), eta, float(gA.pow(2).sum() + gB.pow(2).sum()))
        sq_norms.append(v2)
        grad_norms.append(float(full_grad.norm()))
        with torch.no_grad():
            layer.lora_A.sub_(eta * gA)
            layer.lora_B.sub_(eta * gB)
    with torch.no_grad():
        monitor.finish(float((layer(X) - Y).pow(2).sum() / (2 * N)))
    sq_norms.append(theory.adapter_sq_norm(layer))
    return {"monitor": monitor, "sq_norms": sq_norms, "grad_norms": grad_norms}


# -- B1: inequality (9) at every step ----------------------------------------------------------------------------

def descent_checks(prob: dict, configs: list[tuple], gen: torch.Generator) -> dict:
    rows, runs = [], {}
    for name, r, alpha, init_scale, steps in configs:
        layer = make_layer(prob, r, alpha, init_scale, gen)
        rec = train(prob, layer, steps)
        mon = rec["monitor"]
        summ = mon.summary()
        rows.append([name, r, f"{layer.scaling:g}", steps, "0 violations", summ["violations"],
                     f"{summ['min_rel_margin']:.2e}", f"{mon.losses[0]:.4g}", f"{mon.losses[-1]:.4g}",
                     f"{min(mon.step_sizes):.2e}"])
        runs[name] = rec
    return {"rows": rows, "runs": runs}


def too_large_step(prob: dict, step: float, steps: int) -> dict:
    """A constant step beyond rule (8): GD may still lower the loss, but not by the margin (9) demands."""
    layer = make_layer(prob, 4, 4, 0.0, torch.Generator().manual_seed(1))  # same init in quick and full runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", theory.DescentViolationWarning)
        rec = train(prob, layer, steps, fixed_step=step)
    n_warn = sum(issubclass(w.category, theory.DescentViolationWarning) for w in caught)
    mon = rec["monitor"]
    first = mon.violations[0] if mon.violations else None
    return {"monitor": mon, "warnings": n_warn, "first_violation": first,
            "row": [f"constant eta = {step:g}", 4, "1", steps, "not covered", len(mon.violations),
                    f"{min(mon.relative_margins()):.2e}", f"{mon.losses[0]:.4g}", f"{mon.losses[-1]:.4g}",
                    f"{step:.2e}"]}


# -- B2: bounds (10)-(12) ----------------------------------------------------------------------------------------

def rate_bounds(prob: dict, rec: dict, checkpoints: list[int]) -> dict:
    mon = rec["monitor"]
    T = mon.n_steps
    g2 = torch.tensor(mon.grad_sq_norms[:T], dtype=F64)
    running_min = torch.cummin(g2, 0).values
    eta = torch.tensor(mon.step_sizes[:T], dtype=F64)
    certificate = 5 * mon.losses[0] / eta.cumsum(0)  # (10) with the actual step sizes, L* = 0
    bounds = theory.convergence_bounds(T, prob["L"], rec["sq_norms"][0], mon.losses[0],
                                       max_adapter_sq_norm=max(rec["sq_norms"]))
    norms = torch.tensor(rec["sq_norms"][:T], dtype=F64)
    rows = []
    for c in checkpoints:
        t = c - 1  # after c steps: min over t < c
        rows.append([c, f"{mon.losses[c]:.5g}", f"{running_min[t]:.4g}", f"{certificate[t]:.4g}",
                     f"{bounds.stationarity[t]:.4g}", f"{bounds.stationarity_bounded[t]:.4g}",
                     f"{eta[t]:.3e}", f"{bounds.step_size_floor[t]:.3e}", f"{norms[t]:.4g}",
                     f"{bounds.adapter_sq_norm[t]:.4g}"])
    holds = {
        "(10)": bool((running_min <= certificate * (1 + 1e-9)).all()),
        "(11)": bool((running_min <= bounds.stationarity).all()),
        "(12)": bool((running_min <= bounds.stationarity_bounded).all()),
        "eta floor": bool((eta >= bounds.step_size_floor * (1 - 1e-12)).all()),
        "||V||^2": bool((norms <= bounds.adapter_sq_norm * (1 + 1e-12)).all()),
    }
    return {"rows": rows, "holds": holds, "K": bounds.K, "running_min": running_min, "certificate": certificate,
            "bound11": bounds.stationarity, "bound12": bounds.stationarity_bounded, "eta": eta,
            "floor": bounds.step_size_floor}


# -- plot ----------------------------------------------------------------------------------------------------------

def plot(res: dict, out=None):
    plt = pyplot()
    if plt is None:
        return None
    b2 = res["b2"]
    T = len(b2["eta"])
    t = list(range(1, T + 1))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    a = ax[0]
    a.loglog(t, b2["running_min"].numpy(), label="min_{s<t} ||grad J(V_s)||^2 (measured)")
    a.loglog(t, b2["certificate"].numpy(), label="certificate (10): 5 J0 / sum eta_s")
    a.loglog(t, b2["bound11"].numpy(), label=f"a-priori bound (11), K = {b2['K']:.3g}")
    a.loglog(t, b2["bound12"].numpy(), label="bound (12) with C^2 = max ||V_t||^2")
    a.set(title="B2: stationarity vs the bounds", xlabel="T", ylabel="||grad J||^2")
    a.legend(fontsize=7)
    b = ax[1]
    b.loglog(t, b2["eta"].numpy(), label="eta_t of rule (8)")
    b.loglog(t, b2["floor"].numpy(), label="floor min{1, 1/(t+K)}")
    b.set(title="B2: step sizes", xlabel="t", ylabel="eta_t")
    b.legend(fontsize=7)
    c = ax[2]
    main_mon = res["b1"]["runs"][res["main"]]["monitor"]
    c.semilogx(range(1, main_mon.n_steps + 1), main_mon.relative_margins(), label="rule (8): margin of (9) / J_t")
    for b in res["too_large"]:
        mon = b["monitor"]
        c.semilogx(range(1, mon.n_steps + 1), [max(m, -0.01) for m in mon.relative_margins()],
                   label=f"constant eta = {mon.step_sizes[0]:g} (clipped at -0.01)")
    c.axhline(0.0, color="k", lw=0.8)
    c.set(title="B1: slack of the descent inequality (9)", xlabel="step", ylabel="relative margin")
    c.legend(fontsize=7)
    return save_figure(plt, fig, "lora_gd_convergence_rate.png", out)


# -- main ----------------------------------------------------------------------------------------------------------

def main(quick: bool = False, out=None) -> dict:
    start = begin("lora-gd-convergence-rate.txt (Mu & Klabjan): synthetic reproductions", quick)
    gen = torch.Generator().manual_seed(0)
    prob = least_squares_problem(20, 15, 200, gen)
    T = 300 if quick else 3000
    short = 100 if quick else 1000
    main_name = "B0 = 0, A0 ~ N(0, 1/in)"
    configs = [(main_name, 4, 4, 0.0, T),
               ("rank 1", 1, 1, 0.0, short),
               ("rank 8", 8, 8, 0.0, short),
               ("large ||V0|| (A0, B0 ~ N(0, 4))", 4, 4, 2.0, short),
               ("scaling 4 (alpha = 16)", 4, 16, 0.0, short)]
    b1 = descent_checks(prob, configs, gen)
    bad = [too_large_step(prob, step, 60 if quick else 200) for step in (0.1, 0.2)]
    print(f"\nleast squares: W (20 x 15), N = 200, L = max(1, lambda_max(X^T X / N)) = {prob['L']:.4f}, L* = 0")
    print_table("B1  descent inequality (9) under rule (8) (lk.theory.safe_step_size + DescentMonitor, rtol 1e-10)",
                ["run", "r", "scaling", "steps", "paper", "violations", "min margin / J_t", "J_0", "J_T",
                 "min eta_t"], b1["rows"] + [b["row"] for b in bad])
    for b in bad:
        print(f"constant eta = {b['monitor'].step_sizes[0]:g}: first violation at step {b['first_violation']}, "
              f"{b['warnings']} DescentViolationWarning(s) (one per streak of violations)")

    checkpoints = [c for c in (1, 10, 100, 1000, 3000) if c <= T]
    b2 = rate_bounds(prob, b1["runs"][main_name], checkpoints)
    print_table(f"B2  bounds of Theorem 3 along the main run (K = {b2['K']:.4g}; L* = 0)",
                ["T", "J(V_T)", "min ||grad J||^2", "(10) 5J0/sum eta", "(11) bound", "(12) bound",
                 "eta_T-1", "floor 1/(t+K)", "||V_T-1||^2", "||V||^2 bound"], b2["rows"])
    print("bounds hold at every T: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in b2["holds"].items()))

    res = {"b1": b1, "b2": b2, "too_large": bad, "main": main_name, "L": prob["L"]}
    return finish(res, plot(res, out), start, "lora_gd_convergence_rate")


if __name__ == "__main__":
    run_cli(main, __doc__)

"""Reproduction of nystrom-init-nora.txt (Li, Zhang, Mokhtari, He, "On the Crucial Role of Initialization for
Matrix Factorization"): Fig. 1a/1b/1c, ScaledGD with Nystrom initialization.

The paper's Fig. 1 is the symmetric problem min_X ||X X^T - A||_F^2 with ScaledGD (2). We run it on the
library's float64 LoRALinear (scaling 1, so delta_weight() = lora_B @ lora_A) with the *tied* start
lora_B = X_0, lora_A = X_0^T: for a symmetric target, lk.optim.ScaledGD (order "jacobi", damping 0) applied to
L = 1/2 ||B A - A_target||_F^2 gives B' = B - eta (X X^T - A) X (X^T X)^-1 and A' = B'^T, i.e. exactly (2)
(the residual x factor scaling of the paper's updates, see NOTES-nystrom-nora.md 1.1); the drift from
A = B^T is measured. X_0 comes from the library's inits: lk.init.nystrom(A_target, r, xi) (X_0 = A Omega,
eq. (3)) and lk.init.gaussian (small init). GD is torch.optim.SGD at the paper's step 0.01.

  Fig. 1a  EP (m = 1000, r = r_A = 20, kappa = 100): GD, ScaledGD from small init, ScaledGD from Nystrom init
           (quadratic convergence);
  Fig. 1b  Nystrom init with xi from 1e-3 to 1e2 (insensitive), and X_0 = A Omega + N (only linear);
  Fig. 1c  UP (r_A = 40, r = 20): GD and ScaledGD with several eta; weak optimality ||X^T A^+ X - I||_F;
  Thm 5    the asymmetric eq. (5) in NoRA's own layout (lora_B = A Omega, lora_A = 0, untied): eta = 1 recovers
           A in one step whatever xi; the first B-step is skipped by the optimizer itself (A = 0).

    python examples/papers/nystrom_nora.py [--quick]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lorakern as lk  # noqa: E402
from _common import begin, finish, print_table, pyplot, save_figure, torch_threads, run_cli  # noqa: E402

F64 = torch.float64
EP_SPECTRUM = [1.0 - 0.01 * i for i in range(19)] + [0.01]        # {1.0, 0.99, ..., 0.82, 0.01}, App. 10.1
# App. 10.1 lists {1.0, 0.99, ..., 0.45, 0.44, 0.05, 0.025, 0.01} (60 values) but says r_A = 40: we keep
# r_A = 40 and the three small values, i.e. 1.0 ... 0.64 (37 values) then 0.05, 0.025, 0.01.
UP_SPECTRUM = [1.0 - 0.01 * i for i in range(37)] + [0.05, 0.025, 0.01]


# -- the problem ---------------------------------------------------------------------------------------------------

class Target:
    """A PSD target A = Q diag(sigma) Q^T (m x m), or an asymmetric one U diag(sigma) V^T, kept factored."""

    def __init__(self, m: int, spectrum: list[float], gen: torch.Generator, n: int | None = None):
        self.sigma = torch.tensor(spectrum, dtype=F64)
        self.U = torch.linalg.qr(torch.randn(m, len(spectrum), dtype=F64, generator=gen))[0]
        self.V = self.U if n is None else torch.linalg.qr(torch.randn(n, len(spectrum), dtype=F64, generator=gen))[0]
        self.dense = (self.U * self.sigma) @ self.V.T

    @property
    def rank(self) -> int:
        return len(self.sigma)


def layer_for(target: Target, r: int) -> lk.LoRALinear:
    """LoRALinear (in = n, out = m), scaling 1, base weight 0: delta_weight() = lora_B @ lora_A = X Y^T."""
    m, n = target.dense.shape
    layer = lk.LoRALinear(n, m, r=r, alpha=r, bias=False, dtype=F64)
    with torch.no_grad():
        layer.weight.zero_()
    return layer


def factored_loss(layer: lk.LoRALinear, target: Target):
    """1/2 ||B A - U S V^T||_F^2 from the factors: 1/2 <B^T B, A A^T> - <B^T U S, A V> + 1/2 ||S||^2, an
    O((m + n) r r_A) step instead of the O(m n r) of forming B A (1000 x 1000); the error curves themselves
    are measured densely (error())."""
    US = target.U * target.sigma
    const = 0.5 * float(target.sigma.pow(2).sum())

    def loss():
        A, B = layer.lora_A, layer.lora_B
        return 0.5 * ((B.T @ B) * (A @ A.T)).sum() - ((B.T @ US) * (A @ target.V)).sum() + const
    return loss


def error(layer: lk.LoRALinear, target: Target) -> float:
    """||X_t Y_t^T - A||_F, the paper's optimality error, on the dense product."""
    with torch.no_grad():
        return float((layer.delta_weight() - target.dense).norm())


def weak_optimality(layer: lk.LoRALinear, target: Target) -> float:
    """||X^T A^+ X - I_r||_F (Sec. 2.3; for the tied start X = lora_B = lora_A^T)."""
    with torch.no_grad():
        X = layer.lora_B
        Z = (target.U.T @ X) / target.sigma.sqrt()[:, None]  # A^+ = U S^-1 U^T
        return float((Z.T @ Z - torch.eye(X.shape[1], dtype=F64)).norm())


# -- starts ----------------------------------------------------------------------------------------------------------

def tied_start(layer: lk.LoRALinear, X0: torch.Tensor) -> lk.LoRALinear:
    """lora_B = X_0, lora_A = X_0^T: the symmetric problem (1a) on an asymmetric pair."""
    with torch.no_grad():
        layer.lora_B.copy_(X0)
        layer.lora_A.copy_(X0.T)
    return layer


def nystrom_X0(target: Target, r: int, xi: float, gen: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """X_0 = A Omega (eq. (3)) from lk.init.nystrom, plus N with N_ij ~ N(0, noise^2) for Fig. 1b's dotted lines."""
    _, X0 = lk.init.nystrom(target.dense, r, xi=xi, generator=gen)
    if noise > 0:
        X0 = X0 + noise * torch.randn(X0.shape, dtype=F64, generator=gen)
    return X0


def small_X0(target: Target, r: int, zeta: float, gen: torch.Generator) -> torch.Tensor:
    """Small random init [X_0]_ij ~ N(0, zeta^2), drawn by lk.init.gaussian (its lora_A, transposed)."""
    return lk.init.gaussian(target.dense, r, std=zeta, generator=gen)[0].T.contiguous()


# -- training --------------------------------------------------------------------------------------------------------

def run(layer: lk.LoRALinear, target: Target, steps: int, opt, every: int = 1, metric=error) -> dict:
    loss = factored_loss(layer, target)
    errs, drift = [metric(layer, target)], 0.0
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        if t % every == 0:
            errs.append(metric(layer, target))
            if layer.lora_B.shape == layer.lora_A.T.shape:  # tied runs: how far (2) and (5) drift apart
                with torch.no_grad():
                    drift = max(drift, float((layer.lora_B - layer.lora_A.T).norm() / layer.lora_B.norm()))
            if not math.isfinite(errs[-1]):
                break
    return {"errs": errs, "every": every, "drift": drift}


def scaled_gd(layer, lr: float):
    return lk.optim.ScaledGD(layer, lr=lr, damping=0.0)


def plain_gd(layer, lr: float):
    return torch.optim.SGD([layer.lora_A, layer.lora_B], lr=lr)


def first_below(errs: list[float], tol: float, every: int = 1) -> int | None:
    return next((i * every for i, e in enumerate(errs) if e < tol), None)


def worst_ratio(errs: list[float], hi: float = 1e-3, lo: float = 1e-10) -> float | None:
    """max e_{t+1} / e_t over the steps with lo < e_t < hi: about 1 - eta for a linear rate, ever smaller
    (down to the round-off floor) for a quadratic one; None if no step falls in the window."""
    ratios = [errs[t + 1] / errs[t] for t in range(len(errs) - 1) if lo < errs[t] < hi]
    return max(ratios) if ratios else None


# -- experiments -----------------------------------------------------------------------------------------------------

def fig1a(target: Target, gen, steps: int, gd_steps: int, zeta: float = 1e-3) -> dict:
    r = target.rank
    gd_layer = tied_start(layer_for(target, r), small_X0(target, r, zeta, gen))
    small = tied_start(layer_for(target, r), small_X0(target, r, zeta, gen))
    nys = tied_start(layer_for(target, r), nystrom_X0(target, r, 1.0, gen))
    return {"GD (small init, eta 0.01)": run(gd_layer, target, gd_steps, plain_gd(gd_layer, 0.01), every=10),
            "ScaledGD, small init": run(small, target, steps, scaled_gd(small, 0.5)),
            "ScaledGD, Nystrom init": run(nys, target, steps, scaled_gd(nys, 0.5))}


def fig1b(target: Target, gen, steps: int, xis: list[float], noises: list[float]) -> dict:
    r = target.rank
    out = {}
    for xi in xis:
        layer = tied_start(layer_for(target, r), nystrom_X0(target, r, xi, gen))
        out[("xi", xi)] = run(layer, target, steps, scaled_gd(layer, 0.5))
    for noise in noises:
        layer = tied_start(layer_for(target, r), nystrom_X0(target, r, 1.0, gen, noise=noise))
        out[("noise", noise)] = run(layer, target, steps, scaled_gd(layer, 0.5))
    return out


def fig1c(target: Target, r: int, gen, steps: int, etas: list[float], gd_steps: int) -> dict:
    out = {}
    X0 = nystrom_X0(target, r, 1.0, gen)
    for eta in etas:
        layer = tied_start(layer_for(target, r), X0)
        out[f"ScaledGD eta {eta:g}"] = run(layer, target, steps, scaled_gd(layer, eta), metric=weak_optimality)
    layer = tied_start(layer_for(target, r), X0)
    out["GD eta 0.01"] = run(layer, target, gd_steps, plain_gd(layer, 0.01), every=10, metric=weak_optimality)
    # the error that matters for fine-tuning: ||X X^T - A||_F against the best rank-r one (Eckart-Young)
    best = lk.theory.eym_tail(target.sigma, r).rel_err * float(target.sigma.norm())
    finals = {}
    for eta in etas:
        layer = tied_start(layer_for(target, r), X0)
        finals[eta] = run(layer, target, steps, scaled_gd(layer, eta))["errs"][-1]
    return {"runs": out, "best": best, "final_err": finals}


def asymmetric_one_step(m: int, n: int, gen, xis: list[float], steps: int) -> list[dict]:
    """Thm 5 in NoRA's layout: lora_B = A Omega, lora_A = 0 (lk.init.nystrom on the target), ScaledGD (5)."""
    target = Target(m, EP_SPECTRUM, gen, n=n)
    rows = []
    for eta in (1.0, 0.5):
        for xi in xis:
            layer = layer_for(target, target.rank)
            A0, B0 = lk.init.nystrom(target.dense, target.rank, xi=xi, generator=gen)
            with torch.no_grad():
                layer.lora_A.copy_(A0)
                layer.lora_B.copy_(B0)
            cond = float(torch.linalg.cond(B0))  # the one-step error grows with it (see REPRODUCTIONS.md)
            res = run(layer, target, steps, scaled_gd(layer, eta))
            rows.append({"eta": eta, "xi": xi, "errs": res["errs"], "cond": cond})
    return rows


# -- plot ----------------------------------------------------------------------------------------------------------------

def _curve(axis, res: dict, label: str, style: str = "-"):
    axis.semilogy([i * res["every"] for i in range(len(res["errs"]))], res["errs"], style, label=label)


def plot(res: dict, out=None):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(1, 4, figsize=(21, 4.8))
    for name, run_ in res["fig1a"].items():  # log-x: GD needs thousands of steps, ScaledGD a few
        e = run_["errs"]
        ax[0].loglog([1 + i * run_["every"] for i in range(len(e))], e, label=name)
    ax[0].set(title=f"Fig. 1a: EP (m = {res['m']}, r = 20, kappa = 100)", xlabel="iteration + 1", ylabel="||X X^T - A||_F",
              ylim=(1e-13, 1e3))
    ax[0].legend(fontsize=8)
    for (kind, v), run_ in res["fig1b"].items():
        _curve(ax[1], run_, f"Nystrom, xi = {v:g}" if kind == "xi" else f"A Omega + N, xi_n = {v:g}",
               "-" if kind == "xi" else ":")
    ax[1].set(title="Fig. 1b: init scale (solid) and perturbed init (dotted), ScaledGD eta 0.5",
              xlabel="iteration", ylabel="||X X^T - A||_F", ylim=(1e-13, 1e8))
    ax[1].legend(fontsize=7)
    for name, run_ in res["fig1c"]["runs"].items():
        _curve(ax[2], run_, name)
    ax[2].set(title="Fig. 1c: UP (r_A = 40, r = 20), Nystrom init", xlabel="iteration",
              ylabel="||X^T A^+ X - I_r||_F", xlim=(0, 100))
    ax[2].legend(fontsize=8)
    for row in res["asym"]:
        ax[3].semilogy(range(len(row["errs"])), row["errs"], "-" if row["eta"] == 1 else "--",
                       label=f"eta = {row['eta']:g}, xi = {row['xi']:g}")
    ax[3].set(title="Thm 5: eq. (5), NoRA layout (B = A Omega, A = 0)", xlabel="iteration",
              ylabel="||X Y^T - A||_F", ylim=(1e-16, 1e2))
    ax[3].legend(fontsize=7)
    return save_figure(plt, fig, "nystrom_nora.png", out)


# -- main ----------------------------------------------------------------------------------------------------------------

def main(quick: bool = False, out=None) -> dict:
    start = begin("nystrom-init-nora.txt (Li et al.): Fig. 1 with lk.init.nystrom + lk.optim.ScaledGD", quick)
    gen = torch.Generator().manual_seed(0)
    m = 200 if quick else 1000
    with torch_threads(1):
        ep = Target(m, EP_SPECTRUM, gen)
        f1a = fig1a(ep, gen, steps=60, gd_steps=500 if quick else 3000)
        f1b = fig1b(ep, gen, steps=40, xis=[1e-3, 1e-1, 1.0, 1e2], noises=[1e-3, 1e-6])
        up = Target(m, UP_SPECTRUM, gen)
        f1c = fig1c(up, 20, gen, steps=100, etas=[0.1, 0.3, 0.5, 0.9], gd_steps=500 if quick else 2000)
        asym = asymmetric_one_step(m, (4 * m) // 5, gen, xis=[1e-3, 1.0, 1e2], steps=8)

    tol = 1e-9
    rows = []
    for name, res_ in f1a.items():
        e = res_["errs"]
        ratio = worst_ratio(e) if res_["every"] == 1 else None
        rows.append([name, f"{e[0]:.3g}", " ".join(f"{x:.1e}" for x in e[1:7]), f"{e[-1]:.2e}",
                     first_below(e, tol, res_["every"]), "-" if ratio is None else f"{ratio:.3g}",
                     f"{res_['drift']:.1e}"])
    print_table(f"Fig. 1a  EP, m = {m}, r = r_A = 20, kappa = 100: ||X_t X_t^T - A||_F (paper: Nystrom + ScaledGD "
                f"quadratic, small init linear, GD slow)",
                ["method", "t = 0", "t = 1..6", "final", f"first t < {tol:g}", "max e_t+1/e_t, 1e-10 < e_t < 1e-3",
                 "max |B - A^T|/|B|"], rows)
    rows = []
    for (kind, v), res_ in f1b.items():
        e = res_["errs"]
        ratio = worst_ratio(e)
        rows.append(["Nystrom xi" if kind == "xi" else "A Omega + N, xi_n", v, f"{e[0]:.3g}", f"{e[1]:.3g}",
                     first_below(e, tol), f"{e[-1]:.2e}", "-" if ratio is None else f"{ratio:.3g}"])
    print_table("Fig. 1b  ScaledGD eta 0.5 (paper: insensitive to xi; the perturbed init loses the quadratic rate, "
                "linear factor 1 - eta = 0.5)",
                ["init", "value", "t = 0", "t = 1", f"first t < {tol:g}", "final", "max e_t+1/e_t, 1e-10 < e_t < 1e-3"],
                rows)
    rows = []
    for name, res_ in f1c["runs"].items():
        e = res_["errs"]
        eta = float(name.split()[-1])
        rows.append([name, f"{e[0]:.3g}", f"{e[len(e) // 4]:.3g}", f"{e[-1]:.3g}", f"{(e[-1] / e[-2]) ** (1 / res_['every']):.4f}",
                     f"{f1c['final_err'][eta]:.4g}" if name.startswith("Scaled") else "-"])
    print_table(f"Fig. 1c  UP, r_A = 40, r = 20, Nystrom init: weak optimality ||X^T A^+ X - I||_F (paper: linear "
                f"convergence to an O(eta r) plateau); best rank-20 ||XX^T - A||_F = {f1c['best']:.4g}",
                ["method", "t = 0", "t = T/4", "final", "last e_t+1/e_t (per step)", "final ||XX^T - A||_F"], rows)
    print_table(f"Thm 5  asymmetric (5), A {m} x {(4 * m) // 5} of rank 20, NoRA init (lora_B = A Omega, lora_A = 0), "
                f"ScaledGD damping 0: ||X_t Y_t^T - A||_F (paper: eta = 1 -> exact after one step, any xi)",
                ["eta", "xi", "cond(X_0)", "t = 0", "t = 1", "t = 2", "t = 3", "t = 8"],
                [[row["eta"], row["xi"], f"{row['cond']:.2e}"] + [f"{row['errs'][t]:.2e}" for t in (0, 1, 2, 3, 8)]
                 for row in asym])
    res = {"fig1a": f1a, "fig1b": f1b, "fig1c": f1c, "asym": asym, "tol": tol, "m": m}
    return finish(res, plot(res, out), start, "nystrom_nora")


if __name__ == "__main__":
    run_cli(main, __doc__)

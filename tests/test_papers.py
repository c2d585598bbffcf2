"""The reproductions of lora-one.txt and nystrom-init-nora.txt (examples/papers): their robust claims at small
sizes (orderings and invariants, not single noisy numbers), and each script's main(quick=True).

The three quick runs are shared (module-scoped fixtures), so each script runs once; the direct tests below them
use the scripts' building blocks on smaller problems."""
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

import lorakern as lk

PAPERS = Path(__file__).resolve().parents[1] / "examples" / "papers"
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As in the scripts (_common.torch_threads): the r x d products are too small for a second thread, which
    only adds fork/join stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def papers():
    sys.path.insert(0, str(PAPERS))
    try:
        yield importlib
    finally:
        sys.path.remove(str(PAPERS))


@pytest.fixture(scope="module")
def lin(papers):
    return papers.import_module("_lora_one_linear")


@pytest.fixture(scope="module")
def lora_one(papers, tmp_path_factory):
    return papers.import_module("lora_one").main(quick=True, out=tmp_path_factory.mktemp("lora_one"))


@pytest.fixture(scope="module")
def digits(papers, tmp_path_factory):
    return papers.import_module("lora_one_digits").main(quick=True, out=tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def nystrom(papers, tmp_path_factory):
    return papers.import_module("nystrom_nora").main(quick=True, out=tmp_path_factory.mktemp("nystrom"))


# -- the linear task's plumbing ----------------------------------------------------------------------------------

def test_sufficient_statistic_objective_equals_the_data_loss(lin):
    """The scripts train on L(Sigma_hat); it must be the paper's 1/(2N) ||X W^T - Y||^2 through the layer's
    forward, with the same gradients, for every adapter kind (LoRA-GA shifts the base, LoRA-SB parametrizes A)."""
    gen = torch.Generator().manual_seed(0)
    task = lin.make_task(20, 16, 400, [5.0, 2.0, 1.0], gen)
    layers = {"one": lin.spectral_layer(task, 4), "ga": lin.spectral_layer(task, 4, method="lora-ga", c=4.0),
              "sb": lin.lora_sb_layer(task, 4), "init": lin.lora_init_layer(task, 4, 0.3, gen)}
    for name, layer in layers.items():
        with torch.no_grad():  # move off the init so that every gradient term is non-trivial
            for p in lin.trainable(layer):
                p.add_(0.05 * torch.randn(p.shape, dtype=F64, generator=gen))
        params = lin.trainable(layer)
        fast = lin.objective(task, layer)()
        slow = lin.data_loss(layer, task.X, task.target)
        assert float(fast.detach()) == pytest.approx(float(slow.detach()), rel=1e-9), name
        for g_fast, g_slow in zip(torch.autograd.grad(fast, params), torch.autograd.grad(slow, params)):
            assert torch.allclose(g_fast, g_slow, rtol=1e-9, atol=1e-12 * float(g_slow.abs().max())), name
        assert lin.risk(task, layer) == pytest.approx(0.5 * float(lin.error(task, layer).pow(2).sum()))


def test_spectral_init_is_the_one_step_gradient(lin):
    """gamma = 1 spectral init with r >= r*: A_0 B_0 = G exactly (NOTES-lora-one.md claim 3), captured by the
    library from the data; LoRA-GA's B_0 is orthogonal to G's output space (its point of criticism)."""
    gen = torch.Generator().manual_seed(1)
    task = lin.make_task(30, 24, 600, [4.0, 2.0], gen)
    one = lin.spectral_layer(task, 4)
    assert torch.allclose(one.delta_weight(), task.neg_grad, atol=1e-10 * float(task.neg_grad.norm()))
    ga = lin.spectral_layer(task, 3, method="lora-ga", c=16.0)
    V_G = lin.top_left(task.neg_grad, 2)
    B0 = ga.lora_B.detach()
    assert float((V_G.T @ B0).norm()) < 1e-8 * float(B0.norm())


# -- lora-one.txt: Fig. 4 ---------------------------------------------------------------------------------------

def test_fig4_over_ranked_one_reaches_zero_ga_plateaus_sb_stalls(lora_one):
    case = lora_one["fig4"]["over-ranked"]
    gd = case["gd"]
    assert gd["LoRA-One"][-1] < 1e-8
    assert gd["LoRA-SB"][-1] > 1.0                        # a frozen subspace: no rotation (Sec. 5)
    assert gd["LoRA-GA"][-1] > 1e3 * max(gd["LoRA-One"][-1], 1e-12)
    half = len(gd["LoRA-GA"]) // 2                        # a plateau, not slow progress: < 2x over the last half
    assert gd["LoRA-GA"][half] / gd["LoRA-GA"][-1] < 2.0
    assert gd["LoRA-GA"][-1] >= 0.5 * case["ga_floor"]    # it sits at the rank-r tail of Delta + offset
    assert gd["LoRA-init"][-1] < 1e-8                     # LoRA-init gets there too, only later
    assert gd["LoRA-init"][10] > 1e3 * gd["LoRA-One"][10]
    for method in ("LoRA-One", "LoRA-GA", "LoRA-init"):  # Prec-GD reaches the same end points
        prec = case["prec"][method][-1]
        assert (prec < 1e-8) == (gd[method][-1] < 1e-8), method


def test_fig4_under_ranked_sb_far_above_the_rank_r_optimum(lora_one):
    case = lora_one["fig4"]["under-ranked"]
    assert case["eym"] == pytest.approx(1.625)
    for method in ("LoRA-One", "LoRA-init"):  # the best rank-4 risk, up to the Sigma_hat weighting
        assert case["gd"][method][-1] == pytest.approx(1.625, rel=0.01), method
    assert case["gd"]["LoRA-SB"][-1] > 5 * case["gd"]["LoRA-One"][-1]
    # GA's Delta W_eff = B A - offset has rank up to 2r: it may end *below* the rank-r optimum (NOTES claim 11)
    assert case["gd"]["LoRA-GA"][-1] <= case["gd"]["LoRA-One"][-1] * (1 + 1e-3)


def test_fig4_printed_step_diverges(lora_one):
    scan = {row[0]: row[2] for row in lora_one["fig4_scan"]}
    assert scan[0.5] == "diverges"          # the paper's eta = 0.5 for plain GD
    assert scan[0.005] != "diverges"        # the step the reproduction uses


def test_b_stays_in_the_output_subspace_of_g(lora_one):
    """Lemma C.12 / C.18 (spectral init, GD and Prec-GD) and Thm 3.1 (LoRA-init): lora_B keeps its columns in the
    top-r* output-side singular space of G for all t; LoRA-GA's B_0 starts outside it."""
    leak = lora_one["fig4"]["over-ranked"]["b_leak"]
    assert leak[("GD", "LoRA-One")] < 1e-6 and leak[("Prec-GD", "LoRA-One")] < 1e-6  # spare columns ~ sqrt(eps)
    assert leak[("GD", "LoRA-init")] < 1e-12 and leak[("Prec-GD", "LoRA-init")] < 1e-12
    assert leak[("GD", "LoRA-GA")] > 0.5
    for opt_method, value in lora_one["fig4"]["under-ranked"]["b_leak"].items():
        if opt_method[1] != "LoRA-GA":
            assert value < 1e-12, opt_method


def test_b_subspace_invariant_direct(lin):
    """The same invariant on a fresh problem, step by step, with the library's ScaledGD and plain GD."""
    gen = torch.Generator().manual_seed(2)
    task = lin.make_task(40, 30, 2000, [6.0, 3.0, 1.0], gen)
    V_G = lin.top_left(task.neg_grad, 3)
    for use_prec in (False, True):
        layer = lin.spectral_layer(task, 5)
        leaks = []
        opt = lk.optim.ScaledGD(layer, lr=0.4) if use_prec else None
        risks = lin.gd(task, layer, 0.05, 300, optimizer=opt,
                       callback=lambda t, lay: leaks.append(lin.out_of_subspace(lay.lora_B.detach(), V_G)))
        assert max(leaks) < 1e-6 and risks[-1] < 1e-12 * risks[0]


# -- lora-one.txt: Thm C.21, Fig. 2, Fig. 3 --------------------------------------------------------------------------

def test_prec_gd_iterations_independent_of_kappa(lora_one):
    rows = {row["kappa"]: row for row in lora_one["kappa"]["rows"]}
    prec = [row["prec"] for row in rows.values()]
    assert all(p is not None for p in prec) and max(prec) - min(prec) <= 3 and max(prec) <= 40
    assert [row["prec_over"] for row in rows.values()] == pytest.approx(prec, abs=3)  # pseudo-inverse, r = 2 r*
    gd = [rows[k]["gd"] for k in (1.0, 10.0, 100.0)]
    assert all(g is not None for g in gd) and gd[0] < gd[1] < gd[2] and gd[2] > 20 * gd[0]


def test_fig2_smaller_init_aligns_better_larger_d_later(lora_one):
    rows = {(row["d"], row["alpha_sq"]): row for row in lora_one["fig2"]["rows"]}
    dims = sorted({d for d, _ in rows})
    for d in dims:
        big, small = rows[(d, 1.0)], rows[(d, 1e-4)]
        assert small["angle"] < 0.5 < big["angle"]                       # aligned vs never aligned
        assert big["diverged"] or small["risk"] < 1e-2 * big["risk"]
    assert rows[(dims[1], 1e-2)]["angle"] > rows[(dims[0], 1e-2)]["angle"]  # larger d: worse alignment
    assert rows[(dims[1], 1e-4)]["t_best"] >= rows[(dims[0], 1e-4)]["t_best"]  # ... and later


def test_fig3_spectral_init_starts_closer(lora_one):
    f3 = lora_one["fig3"]
    assert f3["closer"] >= 0.8 * f3["extra_seeds"]
    for (seed, init), run in f3["runs"].items():
        assert run["losses"][-1] < 1e-3 * run["losses"][0], (seed, init)
    for seed in (0, 1):  # spectral init: b_0 a_0 is the one-step gradient, |b_0| = ||a_0|| (balanced)
        a1, a2, b = f3["runs"][(seed, "spectral")]["path"][0]
        assert math.hypot(a1, a2) == pytest.approx(abs(b), rel=1e-9)


# -- lora-one.txt: Fig. 1(c) on digits ----------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "gd"])  # the caption says gradient descent; AdamW beside it
def test_digits_lora_one_beats_lora(digits, optimizer):
    lr, seed = digits["lrs"][optimizer][0], digits["seeds"][0]
    run = {m: digits["runs"][(seed, optimizer, lr, m)] for m in ("Full FT", "LoRA", "LoRA-One", "LoRA-One-P", "NoRA")}
    for name, r in run.items():
        assert all(math.isfinite(v) for v in r["losses"]) and r["losses"][-1] < r["losses"][0], name
    assert run["LoRA-One"]["losses"][-1] < run["LoRA"]["losses"][-1]
    assert run["LoRA-One"]["losses"][0] < run["LoRA"]["losses"][0]  # the one-step init already lowers the loss
    assert run["LoRA-One"]["losses"][0] == pytest.approx(run["LoRA-One-P"]["losses"][0])  # same init
    assert run["LoRA"]["losses"][0] == pytest.approx(run["Full FT"]["losses"][0])      # B = 0: the base model
    assert run["NoRA"]["losses"][0] == pytest.approx(run["Full FT"]["losses"][0])      # A = 0: the base model
    assert run["LoRA"]["trainable"] < run["Full FT"]["trainable"]
    assert digits["pre"][seed]["odd_acc"] > 0.95


# -- nystrom-init-nora.txt ----------------------------------------------------------------------------------------

def test_nystrom_scaled_gd_below_1e9_within_20_iterations(papers):
    """Fig. 1a/1b (EP): ScaledGD eta = 0.5 from X_0 = A Omega reaches 1e-9 within 20 iterations for xi over five
    decades (the paper: insensitive to xi); the perturbed start A Omega + N only converges linearly (1 - eta)."""
    nys = papers.import_module("nystrom_nora")
    gen = torch.Generator().manual_seed(3)
    target = nys.Target(120, nys.EP_SPECTRUM, gen)
    for xi in (1e-3, 1.0, 1e2):
        layer = nys.tied_start(nys.layer_for(target, 20), nys.nystrom_X0(target, 20, xi, gen))
        errs = nys.run(layer, target, 20, nys.scaled_gd(layer, 0.5))["errs"]
        assert min(errs) < 1e-9, xi
        assert nys.worst_ratio(errs) < 0.05, xi  # quadratic: the ratio collapses
    layer = nys.tied_start(nys.layer_for(target, 20), nys.nystrom_X0(target, 20, 1.0, gen, noise=1e-3))
    errs = nys.run(layer, target, 20, nys.scaled_gd(layer, 0.5))["errs"]
    assert min(errs) > 1e-9 and 0.4 < nys.worst_ratio(errs, lo=1e-8) < 0.6


def test_nystrom_quick_run_claims(nystrom):
    f1a = nystrom["fig1a"]
    assert nys_first(f1a["ScaledGD, Nystrom init"]) <= 12
    assert nys_first(f1a["ScaledGD, Nystrom init"]) < nys_first(f1a["ScaledGD, small init"])
    assert min(f1a["GD (small init, eta 0.01)"]["errs"]) > 1e-3  # GD: slow (kappa = 100)
    assert max(r["drift"] for r in f1a.values()) < 1e-6         # the tied pair stays symmetric: this is (2)
    for (kind, v), run in nystrom["fig1b"].items():
        if kind == "xi":
            assert nys_first(run) <= 20, v
        elif v >= 1e-3:
            assert nys_first(run) is None or nys_first(run) > 20, v
    f1c = nystrom["fig1c"]
    for eta, err in f1c["final_err"].items():  # UP: never below Eckart-Young, close to it for eta >= 0.3
        assert err >= f1c["best"] * (1 - 1e-9)
        if eta >= 0.3:
            assert err <= 1.01 * f1c["best"], eta
    for name, run in f1c["runs"].items():  # weak optimality falls by orders of magnitude
        assert run["errs"][-1] < 1e-3 * run["errs"][0], name
    for row in nystrom["asym"]:  # Thm 5: eta = 1 -> exact after one step (up to cond(X_0)^2 u), any xi
        rel = [e / row["errs"][0] for e in row["errs"]]
        if row["eta"] == 1.0:
            assert rel[1] < 1e-6, row["xi"]
        else:
            assert rel[1] == pytest.approx(0.5, rel=1e-6) and rel[-1] < 1e-9, row["xi"]


def nys_first(run, tol=1e-9):
    return next((i * run["every"] for i, e in enumerate(run["errs"]) if e < tol), None)


def test_nora_first_step_skips_b(papers):
    """Eq. (5)'s X_1 = X_0: at NoRA's init (A = 0) grad_B = 0 and the optimizer leaves lora_B unchanged."""
    nys = papers.import_module("nystrom_nora")
    gen = torch.Generator().manual_seed(4)
    target = nys.Target(60, nys.EP_SPECTRUM, gen, n=50)
    layer = nys.layer_for(target, 20)
    A0, B0 = lk.init.nystrom(target.dense, 20, xi=0.5, generator=gen)
    with torch.no_grad():
        layer.lora_A.copy_(A0)
        layer.lora_B.copy_(B0)
    errs = nys.run(layer, target, 1, nys.scaled_gd(layer, 1.0))["errs"]
    assert torch.equal(layer.lora_B.detach(), B0)
    assert errs[1] < 1e-8 * errs[0]


# -- the scripts ----------------------------------------------------------------------------------------------------

def test_quick_runs_finish_and_plot(lora_one, digits, nystrom):
    for res in (lora_one, digits, nystrom):
        assert res["seconds"] > 0  # timed, never bounded in a test: CI machines are loaded
        assert res["plot"] is None or Path(res["plot"]).is_file()


def test_run_all_discovers_the_new_scripts(papers):
    names = papers.import_module("run_all").scripts()
    assert {"lora_one", "lora_one_digits", "nystrom_nora"} <= set(names)
    assert "_lora_one_linear" not in names

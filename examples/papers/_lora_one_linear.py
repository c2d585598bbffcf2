"""The linear fine-tuning task of lora-one.txt Sec. 2 (task (3)) on the library's LoRALinear, shared by the
synthetic LoRA-One reproductions (lora_one.py) and tests/test_papers.py.

Layouts. The paper writes a weight as W (d x k, in x out), the adapter as A (d x r) B (r x k) and the shift as
Delta (d x k). A LoRALinear stores weight (k, d) = W^T, lora_A (r, d) = A^T and lora_B (k, r) = B^T, so that
scaling * lora_B @ lora_A = (A B)^T. Everything below is in the LoRALinear layout, converted once here:
  delta (k, d)     = Delta^T
  neg_grad (k, d)  = G^natural^T = (Sigma_hat Delta)^T = delta @ Sigma_hat   (-dL/dW at W^natural, eq. (5))
The paper's "left" singular space of G (the input side, where A_t aligns) is the row space of neg_grad and its
"right" one (the output side, where B_t stays) is the column space of neg_grad.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

import lorakern as lk

F64 = torch.float64


@dataclass
class LinearTask:
    """Noiseless labels y = (W^natural + Delta) x (eq. (3)) on N Gaussian inputs, all float64."""
    X: torch.Tensor          # (N, d) inputs x~ ~ N(0, I_d)
    W_nat: torch.Tensor      # (k, d) pre-trained weight
    delta: torch.Tensor      # (k, d) the low-rank shift Delta^T
    sigma_hat: torch.Tensor  # (d, d) X^T X / N

    @property
    def target(self) -> torch.Tensor:
        return self.W_nat + self.delta

    @property
    def neg_grad(self) -> torch.Tensor:
        """G^natural in the LoRALinear layout: -dL/dW at W^natural = delta @ Sigma_hat (rank r*)."""
        return self.delta @ self.sigma_hat


def random_orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """n x k orthonormal columns from the SVD of a Gaussian matrix (the paper's construction of U and V)."""
    U, _, _ = torch.linalg.svd(torch.randn(n, k, dtype=F64, generator=gen), full_matrices=False)
    return U


def make_task(d: int, k: int, N: int, spectrum: list[float], gen: torch.Generator, w_nat_std: float = 1.0
              ) -> LinearTask:
    """Delta = U diag(spectrum) V^T with U, V from SVDs of Gaussian matrices, W^natural ~ N(0, w_nat_std^2)."""
    r_star = len(spectrum)
    U, V = random_orthonormal(d, r_star, gen), random_orthonormal(k, r_star, gen)
    delta = (U * torch.tensor(spectrum, dtype=F64)) @ V.T          # paper layout (d, k)
    X = torch.randn(N, d, dtype=F64, generator=gen)
    W_nat = torch.randn(k, d, dtype=F64, generator=gen) * w_nat_std
    sigma_hat = X.T @ X / N
    return LinearTask(X=X, W_nat=W_nat, delta=delta.T.contiguous(), sigma_hat=0.5 * (sigma_hat + sigma_hat.T))


def data_loss(model: nn.Module, X: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L = 1/(2N) ||X~ W^T - Y~||_F^2 through the layer's forward (what spectral_init differentiates)."""
    return (model(X) - X @ target.T).pow(2).sum() / (2 * X.shape[0])


def task_loss_fn(task: LinearTask) -> Callable:
    """loss_fn(model, batch) for lk.spectral_init / lk.capture_gradients: the batch is the whole X~."""
    return lambda model, X: data_loss(model, X, task.target)


def low_rank_factors(D: torch.Tensor, gen: torch.Generator, extra: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """D = P @ (P^T D) with P (k, q) orthonormal, exact to rounding when rank(D) < q; q grows until it is
    (a Gaussian range finder: D is W~ - W_base, of rank r* for LoRA-One / LoRA-init, r* + r for LoRA-GA)."""
    q = extra
    while True:
        q = min(q, *D.shape)
        P = torch.linalg.qr(D @ torch.randn(D.shape[1], q, dtype=D.dtype, generator=gen))[0]
        PtD = P.T @ D
        if q == min(D.shape) or float((D - P @ PtD).norm()) <= 1e-13 * float(D.norm()):
            return P, PtD
        q *= 2


def objective(task: LinearTask, layer: lk.LoRALinear) -> Callable[[], torch.Tensor]:
    """The same L as data_loss, evaluated from the sufficient statistic Sigma_hat instead of the N data rows.

    With E = W_eff - W~ = s B A - D (k, d), D = W~ - W_base: L = 1/2 <E Sigma_hat, E> (noiseless labels)
      = 1/2 s^2 <B^T B, A Sigma_hat A^T> - s <B^T P, (P^T D Sigma_hat) A^T> + 1/2 <D, D Sigma_hat>,
    with D = P P^T D low rank. A step then costs O(r d^2 + (k + d) r q) instead of O(N d k) through the forward
    (or O(k d r) with E formed densely): this is what makes d = k = 1000 (Fig. 2) affordable on a CPU. Autograd
    gives the paper's gradients grad_A = Sigma_hat (AB - Delta) B^T, grad_B = A^T Sigma_hat (AB - Delta)
    (Sec. 2); tests/test_papers.py checks them against data_loss. The base weight is read once, at the call
    (LoRA-GA replaces it at init).
    """
    D = (task.target - layer.weight.detach()).to(F64)
    P, PtD = low_rank_factors(D, torch.Generator().manual_seed(0))
    PtD_sigma = PtD @ task.sigma_hat
    const = 0.5 * float((PtD * PtD_sigma).sum())

    def loss() -> torch.Tensor:
        A, B, s = layer.lora_A, layer.lora_B, layer.scaling
        A_sigma_At = (A @ task.sigma_hat) @ A.T
        cross = ((B.T @ P) * (PtD_sigma @ A.T).T).sum()
        return 0.5 * s * s * ((B.T @ B) * A_sigma_At).sum() - s * cross + const
    return loss


def error(task: LinearTask, layer: lk.LoRALinear) -> torch.Tensor:
    """W_eff - W~ = (W_base + scaling B A) - (W^natural + Delta): A_t B_t - Delta for LoRA-One / LoRA-init, and
    A_t B_t - (Delta + offset) for LoRA-GA, whose base weight was shifted (App. F)."""
    with torch.no_grad():
        return layer.weight + layer.delta_weight() - task.target


def risk(task: LinearTask, layer: lk.LoRALinear) -> float:
    """The paper's risk 1/2 ||A_t B_t - Delta||_F^2 (measured on the effective weight)."""
    return 0.5 * float(error(task, layer).pow(2).sum())


def rel_error(task: LinearTask, layer: lk.LoRALinear) -> float:
    """||A_t B_t - Delta||_F / ||Delta||_F (Thm C.21's quantity, normalised)."""
    return float(error(task, layer).norm() / task.delta.norm())


# -- subspaces ---------------------------------------------------------------------------------------------------

def subspace_distance(P: torch.Tensor, Q: torch.Tensor) -> float:
    """||P_perp^T Q||_op = sin(largest principal angle) for orthonormal bases P, Q (n x k each)."""
    return float(torch.linalg.matrix_norm(Q - P @ (P.T @ Q), ord=2))


def top_left(M: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal basis of the top-k left singular space (columns) of M."""
    return torch.linalg.svd(M, full_matrices=False)[0][:, :k]


def top_right(M: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal basis of the top-k right singular space (rows, as columns) of M."""
    return torch.linalg.svd(M, full_matrices=False)[2][:k].T


def out_of_subspace(M: torch.Tensor, basis: torch.Tensor) -> float:
    """||(I - P P^T) M||_F / ||M||_F: the part of M's columns outside span(basis) (0 for M = 0)."""
    norm = float(M.norm())
    return float((M - basis @ (basis.T @ M)).norm()) / norm if norm > 0 else 0.0


# -- the adapters compared in Fig. 4 -------------------------------------------------------------------------------

def base_layer(task: LinearTask, r: int) -> lk.LoRALinear:
    """A float64 LoRALinear on W^natural with scaling 1 (alpha = r): lora_B @ lora_A is the paper's (A B)^T."""
    k, d = task.W_nat.shape
    layer = lk.LoRALinear(d, k, r=r, alpha=r, bias=False, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(task.W_nat)
    return layer


def lora_init_layer(task: LinearTask, r: int, std: float, gen: torch.Generator) -> lk.LoRALinear:
    """(LoRA-init): [A_0]_ij ~ N(0, std^2), B_0 = 0, through lk.init.gaussian."""
    layer = base_layer(task, r)
    with torch.no_grad():
        A, B = lk.init.gaussian(layer.weight, r, std=std, generator=gen)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    return layer


def spectral_layer(task: LinearTask, r: int, method: str = "lora-one", **kw) -> lk.LoRALinear:
    """LoRA-One (spectral init with the theory's gamma = 1, no normalisation: A_0 B_0 = P_r(G), Sec. 3.2) or
    LoRA-GA (eq. (91), `c` = the "stable parameter"), both through lk.spectral_init on the data itself."""
    layer = base_layer(task, r)
    if method == "lora-one":
        kw = {"s": 1.0, "normalize": False, **kw}
    lk.spectral_init(layer, [task.X], task_loss_fn(task), method=method, mode="exact", progress=False, **kw)
    return layer


class _CoreTimesFrozen(nn.Module):
    """lora_A := R @ A_frozen with only the r x r core R trainable (LoRA-SB's B R A, the B and A frozen)."""

    def __init__(self, A_frozen: torch.Tensor, R0: torch.Tensor):
        super().__init__()
        self.R = nn.Parameter(R0.clone())
        self.register_buffer("A_frozen", A_frozen.clone())

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.R @ self.A_frozen


def lora_sb_layer(task: LinearTask, r: int) -> lk.LoRALinear:
    """LoRA-SB (Ponkshe et al., as recovered in NOTES-lora-one.md): W + B R A with B = U_r(G), A = V_r(G)^T
    frozen and only R trained, R_0 = diag(S_r), so B R_0 A = P_r(G) = LoRA-One's A_0 B_0; only the frozen
    subspace differs. Built as a LoRALinear whose lora_B is frozen and whose lora_A is parametrized
    (torch.nn.utils.parametrize) as R @ Vh_r: the layer's own forward and delta_weight see B R A."""
    layer = base_layer(task, r)
    G = lk.capture_gradients(layer, [task.X], task_loss_fn(task))[""]  # dL/dW at W^natural (B = 0 after init)
    U, S, Vh = torch.linalg.svd(-G, full_matrices=False)
    with torch.no_grad():
        layer.lora_B.copy_(U[:, :r])
    layer.lora_B.requires_grad_(False)
    parametrize.register_parametrization(layer, "lora_A", _CoreTimesFrozen(Vh[:r], torch.diag(S[:r])), unsafe=True)
    layer.parametrizations.lora_A.original.requires_grad_(False)
    return layer


def trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


def gd(task: LinearTask, layer: lk.LoRALinear, lr: float, steps: int, every: int = 1,
       optimizer: torch.optim.Optimizer | None = None, callback: Callable | None = None) -> list[float]:
    """Full-batch GD (eq. (4)) on the layer's trainable parameters, or `optimizer` (e.g. lk.optim.ScaledGD for
    Prec-GD); returns the risk every `every` steps (index 0 = init). Stops early once the risk is not finite."""
    loss = objective(task, layer)
    opt = optimizer or torch.optim.SGD(trainable(layer), lr=lr)
    risks = [risk(task, layer)]
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        if callback is not None:
            callback(t, layer)
        if t % every == 0:
            risks.append(risk(task, layer))
            if not math.isfinite(risks[-1]):
                break
    return risks

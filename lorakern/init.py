"""Initializations of the LoRA factors (API.md "Initialization").

Each returns tensors in the layout lora_A (r, in), lora_B (out, r), in the input's dtype and device,
computed in at least fp32 (fp64 inputs in fp64); where A and B are returned they come in that order.
Weight-only: lora, gaussian, pissa, nystrom (usable as `init=` names). Gradient-based: lora_one, lora_ga,
which take the (out, in) full fine-tuning gradient dL/dW; lorakern.spectral_init captures it from data.

Layout conversion (lora-one.txt writes W as in x out, A as d x r, B as r x k): with PyTorch's grad (out, in)
= (paper gradient)^T, the SVD -grad = U S Vh gives U = the paper's V~ (output side) and Vh = U~^T (input
side), so the paper's A0 = U~ ... becomes lora_A = ... Vh and its B0 = ... V~^T becomes lora_B = U ....
"""
from __future__ import annotations

import math

import torch


def check_rank(r: object, in_features: int, out_features: int, name: str = "r", bounded: bool = True) -> int:
    """Validate a LoRA rank: an int >= 1, and <= min(in_features, out_features) when `bounded` (what an init
    from singular vectors needs). An adapter itself may be wider than its layer, as in peft (a Linear(h, 1)
    head under "all-linear"; a PiSSA adapter converted for the original base has rank 2r)."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{name} must be an int, got {type(r).__name__} {r!r}")
    if r < 1:
        raise ValueError(f"{name}={r} must be >= 1")
    if bounded and not r <= min(in_features, out_features):
        raise ValueError(f"{name}={r} must satisfy 1 <= {name} <= min(in_features, out_features) = "
                         f"min({in_features}, {out_features}) = {min(in_features, out_features)}")
    return r


def _check_weight(weight: torch.Tensor, r: object, name: str = "weight",
                  bounded: bool = False) -> tuple[int, int, torch.dtype]:
    """Validate a 2-D (out, in) float matrix and the rank; returns (out, in, work dtype)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (out_features, in_features) tensor, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {weight.dtype}")
    out_f, in_f = weight.shape
    check_rank(r, in_f, out_f, bounded=bounded)
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return out_f, in_f, work


def lora(weight: torch.Tensor, r: int, generator: torch.Generator | None = None):
    """peft's default: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0. Returns (A, B)."""
    out_f, in_f, work = _check_weight(weight, r)
    bound = 1.0 / math.sqrt(in_f)
    A = torch.empty(r, in_f, dtype=work, device=weight.device).uniform_(-bound, bound, generator=generator)
    B = torch.zeros(out_f, r, dtype=weight.dtype, device=weight.device)
    return A.to(weight.dtype), B


def gaussian(weight: torch.Tensor, r: int, std: float | None = None, generator: torch.Generator | None = None):
    """A ~ N(0, std^2) with std = 1/r by default (peft's init_lora_weights="gaussian"), B = 0. Returns (A, B)."""
    out_f, in_f, work = _check_weight(weight, r)
    std = 1.0 / r if std is None else float(std)
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    A = torch.empty(r, in_f, dtype=work, device=weight.device).normal_(0.0, std, generator=generator)
    B = torch.zeros(out_f, r, dtype=weight.dtype, device=weight.device)
    return A.to(weight.dtype), B


def _svd(M: torch.Tensor, k: int, n_iter: int | None, generator=None):
    """Top-k SVD of M (work dtype): exact (n_iter=None) or randomized with n_iter power iterations."""
    if n_iter is None:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]
    from lorakern.linalg import randomized_svd
    return randomized_svd(M, k, oversample=min(8, max(0, min(M.shape) - k)), n_iter=n_iter, generator=generator)


def pissa(weight: torch.Tensor, r: int, scaling: float = 1.0, n_iter: int | None = None, generator=None):
    """PiSSA: the principal singular directions of W. Returns (A, B, residual_weight).

    W = U S Vh; A = sqrt(S_r) Vh_r / sqrt(scaling), B = U_r sqrt(S_r) / sqrt(scaling), and
    residual_weight = W - scaling * B @ A, so residual + scaling * B A == W (the layer's output is unchanged).
    n_iter=None uses the exact SVD; an int uses randomized_svd with that many power iterations (peft's
    "pissa_niter_k").
    """
    out_f, in_f, work = _check_weight(weight, r, bounded=True)  # r singular directions
    scaling = float(scaling)
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    W = weight.detach().to(work)
    U, S, Vh = _svd(W, r, n_iter, generator)
    root = (S / scaling).sqrt()
    A = root[:, None] * Vh
    B = U * root[None, :]
    residual = W - scaling * (B @ A)
    return A.to(weight.dtype), B.to(weight.dtype), residual.to(weight.dtype)


def nystrom(weight: torch.Tensor, r: int, xi: float | None = None, generator: torch.Generator | None = None):
    """NoRA (nystrom-init-nora.txt Alg. 1): lora_B = W @ Omega, Omega (in, r) ~ N(0, xi^2); lora_A = 0.

    xi defaults to 1/sqrt(in_features), so each column of B is W applied to a random vector of unit expected
    norm (the paper leaves xi free and reports insensitivity to it). W is not modified and B A = 0.
    """
    out_f, in_f, work = _check_weight(weight, r)
    xi = 1.0 / math.sqrt(in_f) if xi is None else float(xi)
    if not xi > 0:
        raise ValueError(f"xi must be > 0, got {xi}")
    omega = torch.randn(in_f, r, dtype=work, device="cpu" if generator is None else generator.device,
                        generator=generator).to(weight.device).mul_(xi)
    B = weight.detach().to(work) @ omega
    A = torch.zeros(r, in_f, dtype=weight.dtype, device=weight.device)
    return A, B.to(weight.dtype)


def _check_grad(grad: torch.Tensor, r: object, k: int = 1) -> torch.dtype:
    out_f, in_f, work = _check_weight(grad, r, name="grad", bounded=True)
    if k * r > min(out_f, in_f):
        raise ValueError(f"r={r}: this init needs {k}*r <= min(out_features, in_features) = {min(out_f, in_f)}")
    if not torch.isfinite(grad).all():
        raise ValueError("grad contains NaN or Inf")
    if not grad.any():
        raise ValueError("grad is all zeros: there is no direction to initialize from (A = B = 0 would never train)")
    return work


def lora_one_from_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int, s: float = 1.0,
                      normalize: bool = True, gamma: float | None = None):
    """Algorithm 1 from the SVD -grad = U S Vh (descending S): B @ A = gamma U_r diag(S_r / S_1) Vh_r.

    gamma defaults to 1/s; normalize=False drops "/ S_1" (the theory's unnormalized spectral init, where
    gamma = 1 in the linear model and 2 in the ReLU model of lora-one.txt). Returns (A, B).
    """
    s = float(s)
    if not s > 0:
        raise ValueError(f"s must be > 0, got {s}")
    gamma = 1.0 / s if gamma is None else float(gamma)
    if not gamma > 0:  # gamma <= 0 would give A = B = 0: an adapter that never trains
        raise ValueError(f"gamma must be > 0, got {gamma}")
    Sr = S[:r]
    if normalize:
        top = S[0]
        Sr = Sr / top if top > 0 else torch.zeros_like(Sr)
    root = (gamma * Sr).clamp_min(0).sqrt()
    A = root[:, None] * Vh[:r]
    B = U[:, :r] * root[None, :]
    return A, B


def lora_one(grad: torch.Tensor, r: int, s: float = 1.0, normalize: bool = True, gamma: float | None = None,
             n_iter: int | None = None, generator=None):
    """LoRA-One (lora-one.txt Algorithm 1) from the (out, in) full fine-tuning gradient grad = dL/dW.

    With -grad = U S Vh: A = sqrt(gamma S_r/S_1) Vh_r, B = U_r sqrt(gamma S_r/S_1), gamma = 1/s, so
    B @ A = (1/s) U_r diag(S_r/S_1) Vh_r. The base weight is not modified; the layer's own scaling (the
    paper uses rsLoRA's alpha/sqrt(r)) multiplies B A in the forward. Returns (A, B) in grad's dtype.
    """
    work = _check_grad(grad, r)
    U, S, Vh = _svd(-grad.detach().to(work), r, n_iter, generator)
    A, B = lora_one_from_svd(U, S, Vh, r, s=s, normalize=normalize, gamma=gamma)
    return A.to(grad.dtype), B.to(grad.dtype)


def lora_ga_from_svd(U: torch.Tensor, Vh: torch.Tensor, r: int, c: float = 16.0, scaling: float = 1.0):
    """lora-one.txt eq. (91) from the SVD -grad = U S Vh (at least 2r components). Returns (A, B, weight_offset)."""
    c = float(c)
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}")
    factor = U.shape[0] ** 0.25 / c  # k^{1/4} / c, k = out_features
    A = -factor * Vh[:r]              # paper A0 = -(k^1/4/c) U~[:, 1:r]   (input side)
    B = factor * U[:, r:2 * r]        # paper B0 = (k^1/4/c) V~[:, r+1:2r]^T (output side)
    return A, B, float(scaling) * (B @ A)


def lora_ga(grad: torch.Tensor, r: int, c: float = 16.0, scaling: float = 1.0, n_iter: int | None = None,
            generator=None):
    """LoRA-GA as written in lora-one.txt App. F eq. (91), from the (out, in) gradient grad = dL/dW.

    With -grad = U S Vh and k = out_features: A = -(k^{1/4}/c) Vh[:r], B = (k^{1/4}/c) U[:, r:2r] (note B
    uses singular vectors r+1..2r, the paper's point of criticism). Returns (A, B, weight_offset) with
    weight_offset = scaling * B @ A: the method replaces the base weight W by W - weight_offset so that the
    adapted layer's output is unchanged at init (pass the layer's scaling). Needs 2r <= min(out, in).
    """
    work = _check_grad(grad, r, k=2)
    U, _, Vh = _svd(-grad.detach().to(work), 2 * r, n_iter, generator)
    A, B, off = lora_ga_from_svd(U, Vh, r, c=c, scaling=scaling)
    return A.to(grad.dtype), B.to(grad.dtype), off.to(grad.dtype)


# Names accepted by `init=` in LoRALinear / apply_lora (the weight-only methods; pissa also replaces the
# base weight by its residual, which LoRALinear does when init="pissa").
WEIGHT_INITS = {"lora": lora, "gaussian": gaussian, "pissa": pissa, "nystrom": nystrom}

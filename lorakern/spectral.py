"""lk.spectral_init: data-driven initialization of every LoRALinear from the one-step full gradient.

method="lora-one" (lora-one.txt Algorithm 1): -G = U S Vh, B A = (1/s) U_r diag(S_r/S_1) Vh_r; the base
  weight is not modified.
method="lora-ga" (lora-one.txt App. F eq. (91)): A from Vh[:r], B from U[:, r:2r]; the base weight becomes
  W - scaling * B A, so the model's output is unchanged at init.
mode="exact" accumulates G (out x in, fp32; fp64 for fp64 layers) per layer in one pass: small models and tests.
mode="sketch" never forms G: a randomized range finder over 2 + 2 * n_iter passes over `batches`
  (pass 1: Y = G Omega; pass 2: Z = Q^T G with Q = orth(Y); each power iteration adds Y = G orth(Z^T) and
  Z = Q^T G), memory (out + in) * q per layer with q = k + oversample (k = r, or 2r for LoRA-GA).
Every pass must see the same batches in the same order (checked through the losses). The sketch probes are
seeded by `seed` and the layer's position, so every data-parallel rank draws the same
ones and the per-rank sums are all-reduced after each pass.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lorakern import init as lora_init
from lorakern.capture import (GradientCapture, accumulator_dtype, check_reiterable, check_same_layout_across_ranks,
                              no_autocast)
from lorakern.linalg import orthonormalize, svd_from_projection
from lorakern.model import lora_modules, tied_elsewhere

METHODS = ("lora-one", "lora-ga")
MODES = ("exact", "sketch")


def _progress(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return lambda it, desc: tqdm(it, desc=desc, leave=False)


@torch.no_grad()
def _svd_of_capture(cap: GradientCapture, layers, need: dict[str, int], mode: str, n_iter: int,
                    oversample: int, seed: int):
    """Runs the passes; returns {name: (U, S, Vh)} of the mean gradient G for layers that got a gradient."""
    if mode == "exact":
        cap.prepare_exact()
        nb = cap.run_pass("capture G")
        missing = cap.check_results()
        out = {}
        for n, s in cap.states.items():
            if n in missing:
                continue
            U, S, Vh = torch.linalg.svd(s.acc / nb, full_matrices=False)
            k = need[n]
            out[n] = (U[:, :k], S[:k], Vh[:k])
            s.acc = None
        return out

    qs = {n: min(need[n] + oversample, m.out_features, m.in_features) for n, m in layers.items()}
    Q = {}
    for i, (n, m) in enumerate(layers.items()):  # range pass probes: Omega (in, q), identical on every rank
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        cap.states[n].probe_in = torch.randn(m.in_features, qs[n], generator=gen,
                                             dtype=accumulator_dtype(m)).to(m.weight.device)
    for it in range(n_iter + 1):
        for n, m in layers.items():
            st = cap.states[n]
            st.acc = torch.zeros(m.out_features, qs[n], dtype=accumulator_dtype(m), device=m.weight.device)
            st.probe_out = None
        cap.run_pass(f"sketch G·Ω ({it + 1}/{n_iter + 1})")
        for n, st in cap.states.items():
            with no_autocast(st.acc.device):
                Q[n] = orthonormalize(st.acc)
            st.acc = torch.zeros(qs[n], layers[n].in_features, dtype=Q[n].dtype, device=Q[n].device)
            st.probe_in, st.probe_out = None, Q[n]
        nb = cap.run_pass(f"sketch Qᵀ·G ({it + 1}/{n_iter + 1})")
        if it < n_iter:
            for n, st in cap.states.items():
                with no_autocast(st.acc.device):
                    st.probe_in, st.probe_out = orthonormalize(st.acc.mT), None
    missing = cap.check_results()
    out = {}
    for n, st in cap.states.items():
        if n not in missing:
            with no_autocast(st.acc.device):
                out[n] = svd_from_projection(Q[n], st.acc / nb, need[n])
        st.acc = st.probe_in = st.probe_out = None
    return out


def spectral_init(model: torch.nn.Module, batches: Iterable, loss_fn: Callable, method: str = "lora-one",
                  mode: str = "sketch", s: float = 1.0, oversample: int = 8, n_iter: int = 1,
                  normalize: bool = True, gamma: float | None = None, c: float = 16.0, seed: int = 0,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Initialize every LoRALinear of `model` from the one-step full fine-tuning gradient over `batches`.

    loss_fn(model, batch) returns a scalar loss; its backward is run over the re-iterable `batches` (as many
    passes as `mode` needs) and the gradient is the mean over batches of the model as it stands. Options:
    s, normalize, gamma (lora-one; see lorakern.init.lora_one), c (lora-ga's constant), oversample and
    n_iter (sketch). Returns {layer name: top singular values of G} for the layers it initialized.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, v in (("oversample", oversample), ("n_iter", n_iter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> scalar loss")
    # the numbers that only the init uses, checked before the passes run
    for name, v in (("s", s), ("c", c)) + ((("gamma", gamma),) if gamma is not None else ()):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a number > 0, got {v!r}")
    layers = lora_modules(model)
    # Before any check that could fail on one rank only (no layers, merged layers): all ranks raise together.
    check_same_layout_across_ranks(layers)
    if not layers:
        raise ValueError("spectral_init: model has no LoRALinear layers (call lorakern.apply_lora first)")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"spectral_init: unmerge the layers first: {merged[:5]}")
    if method == "lora-ga":
        tied = tied_elsewhere(model)
        if tied:
            raise ValueError(f"spectral_init: lora-ga subtracts its offset from the base weight, but these layers' "
                             f"weights are tied to other modules, which would change too: {tied[:5]}; leave them "
                             f"out of apply_lora (exclude=...) or use method='lora-one'")
    k = 2 if method == "lora-ga" else 1
    need = {}
    for n, m in layers.items():
        if k * m.r > min(m.in_features, m.out_features):
            raise ValueError(f"spectral_init: {method} needs {k}*r <= min(in, out) but layer {n!r} has r={m.r}, "
                             f"shape ({m.out_features}, {m.in_features})")
        need[n] = k * m.r
    check_reiterable(batches, 1 if mode == "exact" else 2 + 2 * n_iter)

    cap = GradientCapture(model, layers, batches, loss_fn, seed=seed, progress=_progress(progress))
    svds = _svd_of_capture(cap, layers, need, mode, n_iter, oversample, seed)

    spectra = {}
    with torch.no_grad():
        for n, (U, S, Vh) in svds.items():
            m = layers[n]
            with no_autocast(m.weight.device):
                _write_init(m, method, U, S, Vh, s, normalize, gamma, c)
            spectra[n] = S.detach().cpu()
    return spectra


def _write_init(m, method: str, U, S, Vh, s, normalize, gamma, c) -> None:
    # svds holds G = U S Vh; the methods use -G = (-U) S Vh.
    if method == "lora-one":
        A, B = lora_init.lora_one_from_svd(-U, S, Vh, m.r, s=s, normalize=normalize, gamma=gamma)
        m.lora_A.copy_(A)
        m.lora_B.copy_(B)
        return
    A, B, _ = lora_init.lora_ga_from_svd(-U, Vh, m.r, c=c, scaling=m.scaling)
    # W <- W + (old adapter product) - (new one), both from the factors as stored (rounded to the adapter
    # dtype) and formed in the wider of the two dtypes: the output is unchanged even when the adapters were
    # not zero (PiSSA, a loaded adapter, a second call) and bf16 adapters leave no bf16 error in an fp32 base.
    work = torch.promote_types(torch.promote_types(m.weight.dtype, m.lora_A.dtype), torch.float32)
    old_A, old_B = m.lora_A.to(work).clone(), m.lora_B.to(work).clone()
    old = old_B @ old_A
    m.lora_A.copy_(A)
    m.lora_B.copy_(B)
    new = m.lora_B.to(work) @ m.lora_A.to(work)
    m.weight.copy_(m.weight.to(work) + m.scaling * (old - new))
    # original = current + scaling * (new - old): recorded for save_adapter / remove_lora(merge=False)
    m.record_base_offset(m.lora_A, m.lora_B)
    m.record_base_offset(old_A, -old_B)

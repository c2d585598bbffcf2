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

peft models (a peft.PeftModel, or any module holding peft LoRA layers, alone or next to LoRALinear layers):
every peft LoRA `Linear` (base layer nn.Linear, or transformers' Conv1D with fan_in_fan_out) is initialized for
its active adapter exactly as a LoRALinear would be: the capture taps the layer's input and output gradient
(the gradient of base_layer.weight), lora_A[name].weight / lora_B[name].weight get the factors and scaling[name]
plays the part of LoRALinear.scaling. Other peft LoRA layers (Embedding, Conv, quantized bases...) keep their
init, with a warning; an active adapter with a LoRA variant (DoRA...), several active adapters in one layer,
disabled adapters or merged layers raise. peft's save_pretrained / PeftModel.from_pretrained then work as usual.

LoRA-GA on a peft layer subtracts its offset scaling * B0 A0 from base_layer.weight, as peft's own LoRA-GA and
PiSSA inits do (the adapter must be at peft's zero init, B A = 0, before the call; the layer's other adapters,
if any, see the changed base weight too, as with peft's inits). peft has no record of that
offset, so an adapter saved plainly applies to the modified base only; for one that applies to the original
pretrained base use peft's own conversion (the recipe of its PiSSA / LoRA-GA docs):
    lk.spectral_init(model, batches, loss_fn, method="lora-ga")
    model.save_pretrained("ga-init")          # the initial adapter, before any training step
    ...                                        # train
    model.save_pretrained("out", path_initial_model_for_weight_conversion="ga-init")
"out" then holds the rank-2r adapter [A; A0], [B, -B0] (alpha doubled) that PeftModel.from_pretrained loads
onto the original base. LoRALinear layers record the offset themselves (lorakern.save_adapter writes the
converted adapter directly).
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lorakern import init as lora_init
from lorakern.capture import (GradientCapture, accumulator_dtype, check_reiterable, check_same_layout_across_ranks,
                              no_autocast)
from lorakern.linalg import orthonormalize, svd_from_projection
from lorakern.layer import LoRALinear
from lorakern.model import tied_elsewhere
from lorakern.optim.pairs import peft_lora_layer_classes

METHODS = ("lora-one", "lora-ga")
MODES = ("exact", "sketch")


class PeftLinearAdapter:
    """One adapter of a peft LoRA `Linear`, seen as a LoRALinear by the capture and the init.

    weight is the base weight as (out, in) (a transposed view for fan_in_fan_out, writes go through),
    lora_A / lora_B / scaling / r are the adapter's, and the forward hooks go on the peft layer itself, whose
    output gradient is that of its base layer's output. peft keeps no record of a base change, so
    record_base_offset does nothing (see the module docstring for saving after LoRA-GA).
    """

    def __init__(self, module: nn.Module, adapter: str):
        self.module, self.adapter = module, adapter
        self.base_layer = module.get_base_layer()
        self.fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
        self.in_features, self.out_features = int(module.in_features), int(module.out_features)
        self.r = int(module.r[adapter])

    @property
    def weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    @property
    def lora_A(self) -> nn.Parameter:
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> nn.Parameter:
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def merged(self) -> bool:
        return bool(self.module.merged)

    def register_forward_hook(self, *args, **kwargs):
        return self.module.register_forward_hook(*args, **kwargs)

    def record_base_offset(self, A: torch.Tensor, B: torch.Tensor) -> None:
        pass


def _peft_adapter(name: str, m: nn.Module, linear_cls) -> tuple[PeftLinearAdapter | None, str | None]:
    """(the active adapter of a peft LoRA layer as a PeftLinearAdapter, None), or (None, why it keeps its
    init) for a layer spectral_init does not initialize, or (None, None) for one without an active adapter
    here; raises ValueError for what it cannot initialize correctly."""
    present = [a for a in m.active_adapters if a in getattr(m, "r", {})]  # r: every adapter of the layer
    if not present:
        return None, None  # the active adapter does not target this layer
    if m.disable_adapters:
        raise ValueError(f"spectral_init: the adapters of peft layer {name!r} are disabled (disable_adapter() "
                         f"context or enable_adapters(False)); enable them first")
    if len(present) > 1:
        raise ValueError(f"spectral_init: peft layer {name!r} has several active adapters {present}; make one "
                         f"active (model.set_adapter(name)) and call spectral_init once per adapter")
    adapter = present[0]
    if not isinstance(m, linear_cls) or adapter not in m.lora_A or adapter not in m.lora_B:
        return None, f"{name} (lora.{type(m).__name__})"
    if m.use_dora.get(adapter, False) or getattr(m, "lora_variant", {}).get(adapter) is not None:
        raise ValueError(f"spectral_init: adapter {adapter!r} of peft layer {name!r} is a LoRA variant (DoRA, ...): "
                         f"its output is not base(x) + scaling * B A x, so the captured gradient would not be the "
                         f"one the init needs; use plain LoRA adapters")
    base = m.get_base_layer()
    w = getattr(base, "weight", None)
    fan = bool(getattr(m, "fan_in_fan_out", False))
    shape = (m.in_features, m.out_features) if fan else (m.out_features, m.in_features)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or tuple(w.shape) != tuple(shape):
        return None, f"{name} (lora.Linear on a {type(base).__name__} base)"
    if w.device.type == "meta":
        return None, f"{name} (base weight on the meta device)"
    return PeftLinearAdapter(m, adapter), None


def init_layers(model: nn.Module) -> dict[str, object]:
    """{name: layer} for spectral_init, in named_modules() order: every LoRALinear and, for every peft LoRA
    Linear with an active adapter, a PeftLinearAdapter. Other peft LoRA layers are named in a warning."""
    lora_layer, _ = peft_lora_layer_classes()
    linear_cls = None if lora_layer is None else sys.modules["peft.tuners.lora.layer"].Linear
    layers, skipped = {}, []
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            layers[n] = m
        elif lora_layer is not None and isinstance(m, lora_layer):
            view, why = _peft_adapter(n, m, linear_cls)
            if view is not None:
                layers[n] = view
            elif why is not None:
                skipped.append(why)
    if skipped:
        warnings.warn(f"spectral_init: {len(skipped)} peft LoRA layer(s) are not LoRA Linear layers on a plain "
                      f"weight and keep their init: {', '.join(skipped[:10])}", RuntimeWarning, stacklevel=3)
    return layers


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
    """Initialize every LoRALinear of `model`, and the active adapter of every peft LoRA Linear of it (see the
    module docstring: a peft.PeftModel works as it is), from the one-step full fine-tuning gradient over `batches`.

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
    layers = init_layers(model)
    # Before any check that could fail on one rank only (no layers, merged layers): all ranks raise together.
    check_same_layout_across_ranks(layers)
    if not layers:
        raise ValueError("spectral_init: model has no LoRALinear layers and no peft LoRA Linear layers with an "
                         "active adapter (call lorakern.apply_lora first, or wrap it with peft.get_peft_model)")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"spectral_init: unmerge the layers first: {merged[:5]}")
    if method == "lora-ga":
        # a peft layer's weight belongs to its base layer; tied_elsewhere names the other owners
        tied = tied_elsewhere(model, {n: m.base_layer if isinstance(m, PeftLinearAdapter) else m
                                      for n, m in layers.items()})
        if tied:
            raise ValueError(f"spectral_init: lora-ga subtracts its offset from the base weight, but these layers' "
                             f"weights are tied to other modules, which would change too: {tied[:5]}; leave them "
                             f"out of apply_lora (exclude=...) or use method='lora-one'")
        nonzero = [n for n, m in layers.items() if isinstance(m, PeftLinearAdapter) and _product_nonzero(m)]
        if nonzero:
            raise ValueError(f"spectral_init: lora-ga on peft layers needs their adapters at peft's zero init "
                             f"(lora_B @ lora_A = 0): peft's save_pretrained(..., "
                             f"path_initial_model_for_weight_conversion=...) can only carry the base change "
                             f"scaling * B0 A0 of the new factors, not the old adapter that the init would fold "
                             f"into the base; these are not zero: {nonzero[:5]}")
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


@torch.no_grad()
def _product_nonzero(m) -> bool:
    A, B = m.lora_A, m.lora_B
    if not (A.any() and B.any()):
        return False
    wide = torch.promote_types(A.dtype, torch.float32)
    return bool((B.to(wide) @ A.to(wide)).any())


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

"""lk.spectral_init: data-driven initialization of every LoRALinear from the one-step full gradient.

method="lora-one" (lora-one.txt Algorithm 1): -G = U S Vh, B A = (1/s) U_r diag(S_r/S_1) Vh_r; the base
  weight is not modified.
method="lora-ga" (lora-one.txt App. F eq. (91)): A from Vh[:r], B from U[:, r:2r]; the base weight becomes
  W - scaling * B A, so the model's output is unchanged at init.
Modes (d = r directions of G for lora-one, 2r for lora-ga; every mode is one pass over `batches` except
"sketch"):
mode="exact" accumulates G itself (out x in, fp32; fp64 for fp64 layers) and takes its top d singular
  triplets exactly (lorakern.linalg.top_svd: fp64 Gram matrix + eigh, a full SVD for fp64 or rank-deficient
  G), all layers of one shape at once.
mode="onepass" never forms G: one pass accumulates the range sketch G Omega (out x k), the co-range sketch
  Psi^T G (k x in) and the core sketch Phi^T G Theta (s x s) of Tropp, Yurtsever, Udell & Cevher (2019),
  k = sketch_size (default 4d + 1), s = 2k + 1, memory O((out + in) (k + s)) per layer; the reconstruction
  (lorakern.linalg.onepass_svd) is exact when rank(G) <= k and otherwise leaves an error that depends on
  the spectrum's decay (no power iteration is possible in one pass): on flat gradient spectra, and for
  lora-ga's singular vectors r+1..2r, it can be large.
mode="sketch" is the multi-pass randomized range finder: 2 + 2 * n_iter passes (pass 1: Y = G Omega; pass 2:
  Z = Q^T G with Q = orth(Y); each power iteration adds Y = G orth(Z^T) and Z = Q^T G), memory
  (out + in) * q per layer with q = d + oversample.
mode="auto" (default) captures G itself for the layers whose fp32 G fits `memory_budget` (default a quarter
  of the free memory of the model's device) and one-pass sketches the rest, in the same single pass. A
  captured G is decomposed by a randomized SVD (q = 2d probes, RSVD_ITERS power iterations on the explicit
  G: GEMMs, several times faster than the exact SVD) whose error is estimated with held-out probes; layers
  whose estimate exceeds RSVD_TOL get the exact SVD instead (per-layer mode "rsvd" in the result). The
  budget bounds the capture buffers (accumulators and probes); one too small for the mode raises ValueError
  before any pass.
Error estimate: the sketched modes also sketch ERROR_PROBES held-out Gaussian probes p, q per layer in the
  same pass (G p and q^T G). With E = G - G_hat, means over the probes estimate ||u_i^T E|| and ||E v_i|| for
  the d singular vectors the init uses, and a first-order perturbation bound turns them into the estimated
  relative error of B A against the exact init (_init_error): close (within 2x in the tests) for lora-one,
  rougher for lora-ga, whose single singular vectors depend on the gaps of the spectrum. The estimates are
  returned (SpectralInitResult.errors); layers above `error_tol` are named in a RuntimeWarning.
The layers of one mode, shape and dtype are decomposed together on stacked buffers (no per-layer loop of
linear algebra; one host sync per group for the fallbacks). Every pass must see the same batches in the same
order (checked through the losses). The probes are seeded by `seed` and the layer's position, so every
data-parallel rank draws the same ones; the per-rank sums are all-reduced after each pass, and the memory
budget is the smallest over the ranks.

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

import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lorakern import init as lora_init
from lorakern.capture import (GradientCapture, accumulator_dtype, check_reiterable, check_same_layout_across_ranks,
                              distributed_world, no_autocast)
from lorakern.linalg import (onepass_svd, orthonormalize, perturbation_error, randomized_svd, svd_from_projection,
                             top_svd)
from lorakern.layer import LoRALinear
from lorakern.model import tied_elsewhere
from lorakern.optim.pairs import peft_lora_layer_classes

METHODS = ("lora-one", "lora-ga")
MODES = ("auto", "exact", "onepass", "sketch")


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


ERROR_PROBES = 10  # held-out Gaussian probes per side for the a posteriori error estimate
RSVD_ITERS = 6     # power iterations of auto's randomized SVD of a captured G (q = 2d probes)
RSVD_TOL = 5e-3    # auto redoes a layer with the exact SVD where the randomized one's estimate exceeds this


class SpectralInitResult(dict):
    """What spectral_init returns: {layer name: top singular values of G} (a dict, as always), and
    modes: {name: "exact" | "rsvd" | "onepass" | "sketch"}, how each layer's G was captured and decomposed
      (module docstring; "rsvd": G captured, randomized SVD checked by probes);
    errors: {name: estimated relative error of the layer's init B A against the exact init (0.0 where the
      exact SVD was used)}, from held-out probes (module docstring);
    passes: the passes over `batches`; buffer_bytes: the capture buffers' size (what memory_budget bounds)."""

    def __init__(self, spectra, modes, errors, passes, buffer_bytes):
        super().__init__(spectra)
        self.modes, self.errors, self.passes, self.buffer_bytes = modes, errors, passes, buffer_bytes


@dataclass(frozen=True)
class _Plan:
    """How one layer's G is captured and decomposed: "exact" (G itself, exact SVD), "rsvd" (G itself, a
    randomized SVD with k probes, checked with t held-out probes), "onepass" (range / co-range sketches of
    size k, core sketch s x s) or "sketch" (k range probes, power iterations); t held-out probes per side."""
    mode: str
    need: int
    k: int = 0
    s: int = 0
    t: int = 0

    def elements(self, out_f: int, in_f: int) -> int:
        k, s, t = self.k, self.s, self.t
        if self.mode == "exact":
            return out_f * in_f
        if self.mode == "rsvd":
            return out_f * in_f + (out_f + in_f) * t
        if self.mode == "onepass":  # Y, W, Z and the probes [Omega | P | Theta], [Psi | Q | Phi]
            return (out_f + in_f) * (k + t) + s * s + (in_f + out_f) * (k + t + s)
        # sketch: Omega, G Omega, Q, [Q | Q_test], [Q | Q_test]^T G
        return in_f * k + 2 * out_f * k + (out_f + in_f) * (k + t)


def _plan_for(mode: str, need: int, out_f: int, in_f: int, sketch_size: int | None, oversample: int) -> _Plan:
    n = min(out_f, in_f)
    if mode == "exact":
        return _Plan("exact", need)
    if mode == "rsvd":
        return _Plan("rsvd", need, k=min(2 * need, n), t=ERROR_PROBES)
    if mode == "sketch":
        return _Plan("sketch", need, k=min(need + oversample, n), t=ERROR_PROBES)
    k = min(max(sketch_size or 4 * need + 1, need), n)
    return _Plan("onepass", need, k=k, s=min(2 * k + 1, n), t=ERROR_PROBES)


def _default_budget(device: torch.device) -> int:
    """A quarter of the memory free on `device` now (CUDA: mem_get_info; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return avail // 4


def _agreed_budget(budget: int, device: torch.device) -> int:
    """The smallest budget over the ranks: every rank must choose the same modes (the sums are all-reduced).
    The collective runs on the layers' device, as the capture's own (NCCL needs device tensors)."""
    if distributed_world() == 1:
        return budget
    t = torch.tensor([budget], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _plan(layers, need, mode, budget, sketch_size, oversample) -> dict[str, _Plan]:
    """Each layer's plan; raises ValueError, before any pass, when the buffers exceed `budget` bytes.
    auto: per layer the smaller of the captured G ("rsvd") and its one-pass sketch, then G for more layers
    while the budget allows, cheapest extra bytes first."""
    size = {n: accumulator_dtype(m).itemsize for n, m in layers.items()}
    shape = {n: (need[n], m.out_features, m.in_features) for n, m in layers.items()}
    plans = {n: _plan_for("onepass" if mode == "auto" else mode, *shape[n], sketch_size, oversample)
             for n in layers}
    full = {n: _plan_for("rsvd", *shape[n], sketch_size, oversample) for n in layers}

    def nbytes(n, plan):
        return plan.elements(*shape[n][1:]) * size[n]

    if mode == "auto":
        plans = {n: min(plans[n], full[n], key=lambda p: nbytes(n, p)) for n in layers}
    total = sum(nbytes(n, p) for n, p in plans.items())
    if total > budget:
        raise ValueError(f"spectral_init: memory_budget={budget} bytes is too small: mode={mode!r} needs {total} "
                         f"bytes of capture buffers for {len(layers)} layers; raise memory_budget"
                         + (", or pass a smaller sketch_size" if mode in ("auto", "onepass") else
                            ", or choose mode='auto' or 'onepass'"))
    if mode == "auto":
        extra = {n: nbytes(n, full[n]) - nbytes(n, plans[n]) for n in layers}
        for n in sorted(layers, key=lambda n: extra[n]):  # stable: ties in layer order
            if plans[n].mode == "onepass" and total + extra[n] <= budget:
                total += extra[n]
                plans[n] = full[n]
    return plans


class _Group:
    """Layers with one plan, shape, accumulator dtype and device. Their buffers are stacked (L, ...) and each
    layer's capture state holds views of them, so the linear algebra after the passes runs once per group and
    the all-reduce sums one tensor per buffer."""

    def __init__(self, plan: _Plan, names: list[str], layers, index: dict[str, int], seed: int):
        m = layers[names[0]]
        self.plan, self.names = plan, names
        self.out_f, self.in_f = m.out_features, m.in_features
        self.dtype, self.device = accumulator_dtype(m), m.weight.device
        self.seed = seed * 1_000_003 + index[names[0]]
        self.probes = self._draw(len(names), [seed * 1_000_003 + index[n] for n in names])

    def _draw(self, count: int, seeds: list[int]):
        """Gaussian probes, identical on every rank: (L, in, w_in), (L, out, w_out), one generator per layer."""
        p = self.plan
        widths = {"exact": (0, 0), "rsvd": (p.t, p.t), "onepass": (p.k + p.t + p.s, p.k + p.t + p.s),
                  "sketch": (p.k, p.t)}[p.mode]
        if widths == (0, 0):
            return None
        pin = torch.empty(count, self.in_f, widths[0], dtype=self.dtype)
        pout = torch.empty(count, self.out_f, widths[1], dtype=self.dtype)
        for j, sd in enumerate(seeds):
            gen = torch.Generator().manual_seed(sd)
            pin[j].normal_(generator=gen)
            pout[j].normal_(generator=gen)
        return pin.to(self.device), pout.to(self.device)

    def zeros(self, *shape) -> torch.Tensor:
        return torch.zeros(len(self.names), *shape, dtype=self.dtype, device=self.device)

    def attach(self, states) -> list[torch.Tensor]:
        """Single-pass plans: allocate the buffers, point the layers' states at them; returns the buffers."""
        p = self.plan
        if p.mode in ("exact", "rsvd"):
            self.bufs = [self.zeros(self.out_f, self.in_f)]
            for j, n in enumerate(self.names):
                states[n].acc = self.bufs[0][j]
            return self.bufs
        w = p.k + p.t
        self.bufs = [self.zeros(self.out_f, w), self.zeros(w, self.in_f), self.zeros(p.s, p.s)]
        pin, pout = self.probes
        for j, n in enumerate(self.names):
            Y, W, Z = (b[j] for b in self.bufs)
            states[n].sketch = (Y, W, Z, pin[j, :, :w], pin[j, :, w:], pout[j, :, :w], pout[j, :, w:])
        return self.bufs

    def finish(self, nb: int, method: str, r: int):
        """(U, S, Vh) of G's top `need` triplets, and the estimated relative error of each layer's init."""
        p = self.plan
        if p.mode == "exact":
            U, S, Vh = top_svd(self.bufs[0].div_(nb), p.need)
            return U, S, Vh, torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        if p.mode == "rsvd":
            return self._finish_rsvd(self.bufs[0].div_(nb), method, r)
        if p.mode == "sketch":
            return self._finish_sketch(nb, method, r)
        Y, W, Z = (b.div_(nb) for b in self.bufs)
        pin, pout = self.probes
        k, t = p.k, p.t
        U, S, Vh = onepass_svd(Y[..., :k], W[..., :k, :], Z, pin[..., k + t:], pout[..., k + t:])
        probe_p, probe_q = pin[..., k:k + t].double(), pout[..., k:k + t].double()
        Ep = Y[..., k:].double() - U @ (S[..., None] * (Vh @ probe_p))           # E p
        qE = W[..., k:, :].double() - (probe_q.mT @ U * S[..., None, :]) @ Vh    # q^T E
        return self._truncate(U, S, Vh, Ep, qE, method, r)

    def _finish_rsvd(self, G: torch.Tensor, method: str, r: int):
        """Randomized SVD of the captured G (Halko et al.: q = 2d probes, RSVD_ITERS power iterations, G_hat =
        Q Q^T G), its error estimated with the held-out probes; the layers above RSVD_TOL get the exact SVD
        (one host sync)."""
        p = self.plan
        gen = torch.Generator().manual_seed(self.seed)
        U, S, Vh = (t.double() for t in randomized_svd(G, p.k, oversample=0, n_iter=RSVD_ITERS, generator=gen))
        probe_p, probe_q = (t.double() for t in self.probes)
        Ep = (G @ self.probes[0]).double() - U @ (S[..., None] * (Vh @ probe_p))
        qE = (self.probes[1].mT @ G).double() - (probe_q.mT @ U * S[..., None, :]) @ Vh
        U, S, Vh, err = self._truncate(U, S, Vh, Ep, qE, method, r)
        redo = err > RSVD_TOL
        if bool(redo.any()):
            U, S, Vh, err = U.clone(), S.clone(), Vh.clone(), err.clone()
            U[redo], S[redo], Vh[redo] = top_svd(G[redo], p.need)
            err[redo] = 0.0
        return U, S, Vh, err

    def _truncate(self, U, S, Vh, Ep, qE, method, r):
        need = self.plan.need
        alpha2, beta2 = perturbation_error(U[..., :need], Vh[..., :need, :], Ep, qE)
        err = _init_error(method, r, S, alpha2, beta2, projected=self.plan.mode in ("sketch", "rsvd"))
        return U[..., :need].to(self.dtype), S[..., :need].to(self.dtype), Vh[..., :need, :].to(self.dtype), err

    # -- the multi-pass sketch (plan "sketch"): a range pass and a co-range pass per iteration --
    def range_pass(self, states, first: bool) -> list[torch.Tensor]:
        if first:
            self.omega = self.probes[0]
        self.bufs = [self.zeros(self.out_f, self.plan.k)]
        for j, n in enumerate(self.names):
            states[n].acc, states[n].probe_in, states[n].probe_out = self.bufs[0][j], self.omega[j], None
        return self.bufs

    def corange_pass(self, states, last: bool) -> list[torch.Tensor]:
        self.Q = orthonormalize(self.bufs[0])
        probe = torch.cat([self.Q, self.probes[1]], dim=-1) if last else self.Q  # held-out rows on the last
        self.bufs = [self.zeros(probe.shape[-1], self.in_f)]
        for j, n in enumerate(self.names):
            states[n].acc, states[n].probe_in, states[n].probe_out = self.bufs[0][j], None, probe[j]
        return self.bufs

    def next_probes(self) -> None:
        self.omega = orthonormalize(self.bufs[0].mT)

    def _finish_sketch(self, nb: int, method: str, r: int):
        q = self.plan.k
        acc = self.bufs[0].div_(nb).double()
        Q, Z, qG = self.Q.double(), acc[..., :q, :], acc[..., q:, :]
        U, S, Vh = svd_from_projection(Q, Z, q)
        qE = qG - (self.probes[1].double().mT @ Q) @ Z   # G_hat = Q Q^T G: u_i^T E = 0, only E v_i remains
        Ep = torch.zeros(*U.shape[:-1], 1, dtype=U.dtype, device=U.device)
        return self._truncate(U, S, Vh, Ep, qE, method, r)


def _init_error(method: str, r: int, S: torch.Tensor, alpha2: torch.Tensor, beta2: torch.Tensor,
                projected: bool) -> torch.Tensor:
    """First-order estimate of the relative error of the init B A from the reconstruction's singular values
    S (..., k) and the probe estimates alpha2 = ||u_i^T E||^2, beta2 = ||E v_i||^2 (..., need).

    lora-one (B A ~ the rank-r truncation): ||P_U E + E P_V - P_U E P_V||_F / ||S_r|| <= sqrt(sum alpha2 +
    beta2) / ||S_r|| (within sqrt 2). lora-ga pairs single singular vectors (u_{r+i} with v_i); a triplet
    moves by e_i = sqrt(alpha2_i + beta2_i) * s_i * rms_j 1 / |s_i^2 - s_j^2| (first-order perturbation with
    the error spread evenly over the other directions j of the sketch), or, for a projection G_hat = Q Q^T G
    (`projected`: E lies outside span(Q), whose values are all above the rest), beta_i s_i / (s_i^2 - s_k^2).
    Capped at sqrt 2 each; the estimate is sqrt(sum_i e_i^2 / r)."""
    per = alpha2 + beta2
    if method == "lora-one":
        return per.sum(-1).sqrt() / S[..., :r].square().sum(-1).sqrt().clamp_min(1e-300)
    need = per.shape[-1]
    top = S[..., :need]
    if projected:
        gap = top.square() - S[..., -1:].square()
    else:
        inv = 1 / (top[..., :, None].square() - S[..., None, :].square()).abs().clamp_min(1e-300)
        inv[..., torch.arange(need), torch.arange(need)] = 0
        gap = 1 / inv.square().mean(-1).sqrt()  # the error's mass spread evenly over the other directions
    e = (per.sqrt() * top / gap.clamp_min(1e-300)).clamp_max(2 ** 0.5)
    return (e.square().sum(-1) / r).sqrt()


def _groups(layers, plans, seed) -> list[_Group]:
    index = {n: i for i, n in enumerate(layers)}  # probe seeds follow the layer order, as on every rank
    keyed: dict[tuple, list[str]] = {}
    for n, m in layers.items():
        keyed.setdefault((plans[n], m.out_features, m.in_features, accumulator_dtype(m), m.weight.device),
                         []).append(n)
    return [_Group(key[0], names, layers, index, seed) for key, names in keyed.items()]


@torch.no_grad()
def _decompose(cap: GradientCapture, groups: list[_Group], method: str, r: dict[str, int], n_iter: int):
    """Runs the passes; returns {name: (U, S, Vh, estimated error)} for the layers that got a gradient."""
    states = cap.states
    if groups[0].plan.mode == "sketch":  # mode="sketch" holds every layer
        for it in range(n_iter + 1):
            cap.reduce_tensors = [b for g in groups for b in g.range_pass(states, first=it == 0)]
            cap.run_pass(f"sketch G·Ω ({it + 1}/{n_iter + 1})")
            with no_autocast(cap.device):
                cap.reduce_tensors = [b for g in groups for b in g.corange_pass(states, last=it == n_iter)]
            nb = cap.run_pass(f"sketch Qᵀ·G ({it + 1}/{n_iter + 1})")
            if it < n_iter:
                with no_autocast(cap.device):
                    for g in groups:
                        g.next_probes()
    else:
        cap.reduce_tensors = [b for g in groups for b in g.attach(states)]
        nb = cap.run_pass("one-pass capture")
    missing = set(cap.check_results())
    out = {}
    with no_autocast(cap.device):
        for g in groups:
            rank = r[g.names[0]]
            U, S, Vh, err = g.finish(nb, method, rank)
            for j, n in enumerate(g.names):
                if n not in missing:
                    out[n] = (U[j], S[j], Vh[j], err[j])
    for st in states.values():
        st.acc = st.probe_in = st.probe_out = st.sketch = None
    return out


def _check_options(method, mode, oversample, n_iter, memory_budget, sketch_size, error_tol) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, v, low in (("oversample", oversample, 0), ("n_iter", n_iter, 0)) + \
            ((("sketch_size", sketch_size, 1),) if sketch_size is not None else ()) + \
            ((("memory_budget", memory_budget, 1),) if memory_budget is not None else ()):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if isinstance(error_tol, bool) or not isinstance(error_tol, (int, float)) or not error_tol >= 0:
        raise ValueError(f"error_tol must be a number >= 0, got {error_tol!r}")


def spectral_init(model: torch.nn.Module, batches: Iterable, loss_fn: Callable, method: str = "lora-one",
                  mode: str = "auto", s: float = 1.0, oversample: int = 8, n_iter: int = 1,
                  normalize: bool = True, gamma: float | None = None, c: float = 16.0, seed: int = 0,
                  progress: bool = True, memory_budget: int | None = None, sketch_size: int | None = None,
                  error_tol: float = 0.1) -> SpectralInitResult:
    """Initialize every LoRALinear of `model`, and the active adapter of every peft LoRA Linear of it (see the
    module docstring: a peft.PeftModel works as it is), from the one-step full fine-tuning gradient over `batches`.

    loss_fn(model, batch) returns a scalar loss; its backward is run over the re-iterable `batches` (one pass,
    or 2 + 2 * n_iter for mode="sketch") and the gradient is the mean over batches of the model as it stands.
    mode: "auto" (default), "exact", "onepass" or "sketch" (module docstring). memory_budget: bytes the capture
    buffers may take (default: a quarter of the memory free on the model's device; the smallest over the ranks
    under torch.distributed); "auto" captures G for as many layers as fit (randomized SVD checked by probes,
    the exact SVD where that is not within RSVD_TOL) and sketches the rest in the same pass; a budget too
    small for the mode raises ValueError before any pass. sketch_size: k of
    mode "onepass" (default 4 * d + 1 for the d = r (lora-one) or 2r (lora-ga) directions the init needs).
    error_tol: a RuntimeWarning names the sketched layers whose estimated init error exceeds it. Options of
    the init: s, normalize, gamma (lora-one; see lorakern.init.lora_one), c (lora-ga's constant); oversample
    and n_iter (mode "sketch").
    Returns a SpectralInitResult: {layer name: top singular values of G} for the layers it initialized, with
    .modes, .errors (estimated relative error of each layer's B A against the exact init), .passes and
    .buffer_bytes.
    """
    _check_options(method, mode, oversample, n_iter, memory_budget, sketch_size, error_tol)
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
        _check_lora_ga(model, layers)
    k = 2 if method == "lora-ga" else 1
    need = {}
    for n, m in layers.items():
        if k * m.r > min(m.in_features, m.out_features):
            raise ValueError(f"spectral_init: {method} needs {k}*r <= min(in, out) but layer {n!r} has r={m.r}, "
                             f"shape ({m.out_features}, {m.in_features})")
        need[n] = k * m.r
    device = next(iter(layers.values())).weight.device
    budget = _agreed_budget(_default_budget(device) if memory_budget is None else memory_budget, device)
    plans = _plan(layers, need, mode, budget, sketch_size, oversample)
    passes = 2 + 2 * n_iter if mode == "sketch" else 1
    check_reiterable(batches, passes)

    groups = _groups(layers, plans, seed)
    cap = GradientCapture(model, layers, batches, loss_fn, seed=seed, progress=_progress(progress))
    svds = _decompose(cap, groups, method, {n: m.r for n, m in layers.items()}, n_iter)

    spectra, errors = {}, {}
    with torch.no_grad():
        for n, (U, S, Vh, err) in svds.items():
            m = layers[n]
            with no_autocast(m.weight.device):
                _write_init(m, method, U, S, Vh, s, normalize, gamma, c)
            spectra[n] = S.detach().cpu()
            errors[n] = err
    errors = dict(zip(errors, torch.stack(list(errors.values())).tolist())) if errors else {}
    _warn_inaccurate(errors, plans, error_tol)
    nbytes = sum(p.elements(layers[n].out_features, layers[n].in_features) * accumulator_dtype(layers[n]).itemsize
                 for n, p in plans.items())
    return SpectralInitResult(spectra, {n: plans[n].mode for n in spectra}, errors, passes, nbytes)


def _warn_inaccurate(errors: dict[str, float], plans: dict[str, _Plan], tol: float) -> None:
    bad = sorted(((e, n) for n, e in errors.items() if e > tol), reverse=True)
    if bad:
        worst = ", ".join(f"{n} ({e:.2g}, {plans[n].mode})" for e, n in bad[:8])
        warnings.warn(f"spectral_init: the estimated relative error of the init exceeds error_tol={tol} on "
                      f"{len(bad)} sketched layer(s): {worst}{', ...' if len(bad) > 8 else ''}; use mode='exact' "
                      f"or 'auto' with a larger memory_budget, a larger sketch_size (onepass) or more n_iter "
                      f"(sketch)", RuntimeWarning, stacklevel=3)


def _check_lora_ga(model, layers) -> None:
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

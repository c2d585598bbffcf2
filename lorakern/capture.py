"""Streaming capture of the one-step full fine-tuning gradient G = dL/dW of every LoRALinear base weight.

A forward hook routes each layer's output through an identity autograd.Function (_Tap) that saves the
layer's input x; its backward receives dY during the ordinary backward pass and adds a product of the two
to the layer's accumulators: G itself, G @ Omega (range pass) or Q^T G (co-range pass) through
torch.ops.lorakern.capture_accumulate_, or the three sketches of the one-pass method (G Omega, Psi^T G,
Phi^T G Theta) through torch.ops.lorakern.sketch_accumulate_ (csrc/capture.cpp). The base weights never
require grad and no weight gradient is materialized; the model's own .grad fields and requires_grad flags
are restored afterwards. Under torch.distributed the accumulators are summed across ranks after each pass.
"""
from __future__ import annotations

import collections.abc
import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from lorakern import _backend
from lorakern.layer import LoRALinear


def no_autocast(device: torch.device):
    """The capture's products and the linear algebra after it run in the accumulators' dtype even when the
    caller wrapped spectral_init in torch.autocast (its matmuls would otherwise come back in bf16)."""
    return torch.autocast(device.type, enabled=False)


def accumulate(acc: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, probe_in=None, probe_out=None,
               block: int = 4096) -> None:
    """acc += dy^T x, dy^T (x probe_in) or (dy probe_out)^T x, computed in acc's dtype (x and dy converted a
    block of rows at a time)."""
    with no_autocast(acc.device):
        if _backend._C is not None and _backend.get_backend() != "torch":
            torch.ops.lorakern.capture_accumulate_(acc, x, dy, probe_in, probe_out)
            return
        for start in range(0, x.shape[0], block):
            xb, db = x[start:start + block].to(acc.dtype), dy[start:start + block].to(acc.dtype)
            if probe_in is not None:
                acc.addmm_(db.t(), xb @ probe_in.to(acc.dtype))
            elif probe_out is not None:
                acc.addmm_((db @ probe_out.to(acc.dtype)).t(), xb)
            else:
                acc.addmm_(db.t(), xb)


def _sketch_accumulate_torch(Y, W, Z, x, dy, omega, theta, psi, phi, block: int = 4096) -> None:
    dt = Y.dtype
    omega, theta, psi, phi = (t.to(dt) for t in (omega, theta, psi, phi))
    for start in range(0, x.shape[0], block):
        xb, db = x[start:start + block].to(dt), dy[start:start + block].to(dt)
        x_th = xb @ theta
        Y.addmm_(db.t(), xb @ omega)
        W.addmm_((db @ psi).t(), xb)
        Z.addmm_((db @ phi).t(), x_th)


def sketch_accumulate(Y, W, Z, x, dy, omega, theta, psi, phi) -> None:
    """Y += dy^T (x omega), W += (dy psi)^T x, Z += (dy phi)^T (x theta): the one-pass sketches of
    G = dy^T x (Tropp et al. 2019), computed in Y's dtype without forming G."""
    with no_autocast(Y.device):
        if _backend._C is not None and _backend.get_backend() != "torch":
            torch.ops.lorakern.sketch_accumulate_(Y, W, Z, x, dy, omega, theta, psi, phi)
        else:
            _sketch_accumulate_torch(Y, W, Z, x, dy, omega, theta, psi, phi)


class _Switch:
    """On only while the capture's own loss.backward() runs: a backward that loss_fn runs itself (input
    gradients, an adversarial step) must not add to G."""
    __slots__ = ("on",)

    def __init__(self):
        self.on = False


class _LayerState:
    """What a layer's tap adds to: `acc` (with an optional probe), or `sketch` = (Y, W, Z, omega, theta,
    psi, phi) for the one-pass sketch. Neither set: the layer is not captured in this pass."""
    __slots__ = ("acc", "probe_in", "probe_out", "sketch", "hits", "switch")

    def __init__(self, switch: _Switch):
        self.acc = self.probe_in = self.probe_out = self.sketch = None
        self.hits = 0
        self.switch = switch

    @property
    def active(self) -> bool:
        return self.acc is not None or self.sketch is not None

    def sums(self) -> list[torch.Tensor]:
        """The accumulators the pass adds to."""
        if self.sketch is not None:
            return list(self.sketch[:3])
        return [] if self.acc is None else [self.acc]


class _Tap(torch.autograd.Function):
    """Identity on the layer output whose backward accumulates (x, dY) into the layer's capture state.

    x goes through save_for_backward, so autograd's version check catches an in-place change of x after
    the forward, and activation checkpointing can drop and recompute it like any saved activation. The
    output is y itself, marked as modified in place (no copy of the activation; a y that is a view, as
    F.linear's output for 3-D input is, gets its history rebased like any in-place op on a view), so in-place
    ops after the layer (ReLU(inplace=True)) are fine.
    """

    @staticmethod
    def forward(ctx, y, x, state, anchor):
        ctx.state = state
        ctx.save_for_backward(x)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        st = ctx.state
        if st.active and st.switch.on:
            x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
            if st.sketch is not None:
                Y, W, Z, *probes = st.sketch
                sketch_accumulate(Y, W, Z, x2, dy2, *probes)
            else:
                accumulate(st.acc, x2, dy2, st.probe_in, st.probe_out)
            st.hits += 1
        return dy, None, None, None


ONE_SHOT = "pass a list or a DataLoader"


def check_reiterable(batches, passes: int) -> None:
    # isinstance, not iter(batches) is batches: iter() on a DataLoader draws a seed from the caller's RNG
    # (and starts its workers)
    if passes > 1 and isinstance(batches, collections.abc.Iterator):
        raise ValueError(f"batches is a one-shot iterator but {passes} passes over it are needed; {ONE_SHOT}")


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_same_layout_across_ranks(layers: dict[str, LoRALinear]) -> None:
    """Raises the same ValueError on every rank unless all ranks hold the same LoRA layers.

    Call it before any check that could raise on one rank only (no layers, merged layers): a rank that
    raised alone would leave the others waiting in the capture's first collective. The accumulator dtype is
    part of the layout because the per-layer sums are all-reduced.
    """
    if distributed_world() == 1:
        return
    mine = sorted((n, m.out_features, m.in_features, m.r, m.merged, str(accumulator_dtype(m)))
                  for n, m in layers.items())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    differing = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
    if differing:
        other = differing[0]
        first = next((a, b) for a, b in itertools.zip_longest(everyone[0], everyone[other]) if a != b)
        raise ValueError(f"rank {dist.get_rank()}: the ranks disagree on the model's LoRA layers (names, shapes, "
                         f"ranks r, merged state, dtypes): rank 0 has {len(everyone[0])} layers, rank {other} "
                         f"{len(everyone[other])}; first difference (name, out, in, r, merged, dtype): "
                         f"rank 0 {first[0]} vs rank {other} {first[1]}; every rank must hold the same model")


def accumulator_dtype(layer: LoRALinear) -> torch.dtype:
    return torch.float64 if layer.weight.dtype == torch.float64 else torch.float32


class GradientCapture:
    """Runs passes of loss_fn(model, batch).backward() over `batches`, accumulating per-layer products.

    Usage: give each entry of `states` an accumulator (and a probe), call `run_pass`, read `states`.
    Every pass must see the same function of the same data: the RNG is re-seeded at the start of each pass
    (dropout masks repeat) and the losses of later passes are checked against the first pass's.
    """

    def __init__(self, model: torch.nn.Module, layers: dict[str, LoRALinear], batches: Iterable,
                 loss_fn: Callable, seed: int = 0, progress=None):
        self.model, self.layers, self.batches, self.loss_fn = model, layers, batches, loss_fn
        self.seed, self.progress = seed, progress
        self.switch = _Switch()
        self._own: set[int] | None = None
        self.states = {n: _LayerState(self.switch) for n in layers}
        # what the all-reduce sums after a pass: None = every state's accumulators; spectral_init sets the
        # stacked buffers its states are views of (one collective per buffer, not per layer)
        self.reduce_tensors: list[torch.Tensor] | None = None
        self.n_batches = 0
        self.max_abs: dict[str, float] = {}
        self.first_losses: list[float] | None = None
        self.device = next(iter(layers.values())).weight.device
        self._anchor = torch.zeros((), device=self.device, requires_grad=True)  # see _session

    def prepare_exact(self, dtype=None) -> None:
        """Give every layer an (out, in) accumulator of G itself (fp32, or fp64 for fp64 layers)."""
        for n, m in self.layers.items():
            self.states[n].acc = torch.zeros(m.out_features, m.in_features, dtype=dtype or accumulator_dtype(m),
                                             device=m.weight.device)

    def _hook(self, name: str):
        state = self.states[name]

        def on_forward(module, args, kwargs, output):
            if not state.active or not torch.is_grad_enabled():
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            return _Tap.apply(output, x.detach(), state, self._anchor)

        return on_forward

    @contextlib.contextmanager
    def _session(self):
        """Hooks on, no parameter gradients; afterwards the user's grads, requires_grad flags, buffers (e.g.
        BatchNorm running statistics), RNG states and the layers' merged flags are as they were.

        Every parameter is frozen for the passes: the taps' outputs require grad through `_anchor` (a leaf
        that gets no gradient), so the backward reaches every tapped layer while autograd forms no weight or
        adapter gradient. A LoRALinear whose adapter is exactly zero (A or B all zeros) and draws no dropout
        mask runs as merged (its base alone: the same output, without the adapter's products)."""
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        grads = [p.grad for p in params]
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        bypassed = [m for m in self.layers.values() if isinstance(m, LoRALinear) and not m.merged
                    and not (m.dropout and m.training) and not (m.lora_A.any() and m.lora_B.any())]
        # prepend: the tap must see the layer's own output, before any user hook changes it
        handles = [m.register_forward_hook(self._hook(n), with_kwargs=True, prepend=True)
                   for n, m in self.layers.items()]
        try:
            with torch.random.fork_rng(devices=cuda), torch.enable_grad():
                for p in params:
                    p.grad = None
                    p.requires_grad_(False)
                for m in bypassed:
                    m.merged = True
                yield
        finally:
            for m in bypassed:
                m.merged = False
            for h in handles:
                h.remove()
            for p, flag, g in zip(params, flags, grads):
                p.requires_grad_(flag)
                p.grad = g
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)

    def _leaves_outside_model(self, loss: torch.Tensor) -> list[tuple]:
        """(leaf, its .grad, a copy of the .grad's values) for every leaf of loss's graph that is not a
        parameter of the model (leaves inside a reentrant checkpoint are not visible here)."""
        if self._own is None:  # the model's parameters do not change during a capture
            self._own = {id(p) for p in self.model.parameters()} | {id(self._anchor)}
        own = self._own
        out, seen = [], set()
        todo = [loss.grad_fn] if loss.grad_fn is not None else []
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            leaf = getattr(node, "variable", None)  # AccumulateGrad
            if leaf is not None and id(leaf) not in own:
                out.append((leaf, leaf.grad, None if leaf.grad is None else leaf.grad.clone()))
            todo.extend(fn for fn, _ in node.next_functions)
        return out

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL needs device tensors
        dist.all_reduce(t)
        return t.tolist()

    def run_pass(self, desc: str = "capture") -> int:
        """One pass over the batches. Returns the number of batches, summed over ranks."""
        for s in self.states.values():
            s.hits = 0
        losses = []
        rank = dist.get_rank() if distributed_world() > 1 else 0
        with self._session():
            torch.manual_seed(self.seed + rank)  # same stream every pass; ranks get streams of their own
            for batch in self.progress(self.batches, desc) if self.progress else self.batches:
                loss = self.loss_fn(self.model, batch)
                if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                    raise TypeError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', loss)!r}")
                # tensors outside the model that the loss reaches (a head kept elsewhere, an input with
                # requires_grad) get their .grad back after the backward; backward(inputs=model params) would
                # do it too but skips reentrant checkpoints, whose parameters its graph cannot see
                outside = self._leaves_outside_model(loss)
                self.switch.on = True
                try:
                    loss.backward()
                finally:
                    self.switch.on = False
                    for leaf, grad, value in outside:  # the same .grad tensor, with its values back
                        if grad is not None:
                            grad.copy_(value)
                        leaf.grad = grad
                for p in self.model.parameters():  # adapter grads are a by-product: drop them as we go
                    p.grad = None
                losses.append(loss.detach())
        losses = torch.stack(losses).tolist() if losses else []  # one sync per pass, not per batch
        n = len(losses)
        same = self._same_data(losses)
        differing_ranks = 0 if same else 1
        if distributed_world() > 1:  # reduce before raising: every rank raises together or none does (no hang)
            names = list(self.states)
            reduced = self._all_reduce([n, differing_ranks] + [self.states[k].hits for k in names])
            n, differing_ranks = int(reduced[0]), int(reduced[1])
            for k, h in zip(names, reduced[2:]):
                self.states[k].hits = int(h)
            sums = self.reduce_tensors
            if sums is None:
                sums = [t for st in self.states.values() for t in st.sums()]
            for t in sums:
                dist.all_reduce(t)
        if n == 0 and self.first_losses:
            raise ValueError(f"batches gave no batch on a second pass after {len(self.first_losses)} on the first: "
                             f"it can be iterated only once, but the sketch needs several passes; {ONE_SHOT}")
        if n == 0:
            raise ValueError("batches is empty: the gradient capture needs at least one batch")
        self._check_finite()  # fail on the first pass that sees NaN/Inf, naming the layer
        if differing_ranks:
            ref = self.first_losses
            where = "" if distributed_world() == 1 else f" on {differing_ranks} rank(s); this rank's"
            raise ValueError("spectral_init: the passes over `batches` did not see the same data" + where +
                             f" losses {ref[:3]}... then {losses[:3]}..., {len(ref)} vs {len(losses)} batches; the "
                             "sketch needs the same batches in the same order every pass: pass a list, a "
                             "DataLoader without shuffling or random augmentation, or use mode='exact'")
        if self.first_losses is None:
            self.first_losses = losses
        self.n_batches = n
        return n

    def _same_data(self, losses: list[float]) -> bool:
        """Whether this pass saw what the first did (judged by the per-batch losses; True on the first)."""
        ref = self.first_losses
        if ref is None:
            return True
        return len(ref) == len(losses) and all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) or a == b
                                               or (math.isnan(a) and math.isnan(b)) for a, b in zip(ref, losses))

    def _check_finite(self) -> None:
        """Records each captured layer's largest |accumulator| (one reduction and one host sync for all
        layers) and raises on the first layer holding NaN or Inf."""
        names = [n for n, st in self.states.items() if st.active]
        if not names:
            self.max_abs = {}
            return
        peaks = torch.stack([torch.stack([torch.linalg.vector_norm(t, float("inf")).to(torch.float64)
                                          for t in self.states[n].sums()]).max() for n in names])
        self.max_abs = dict(zip(names, peaks.tolist()))
        bad = [n for n, v in self.max_abs.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"spectral_init: the gradient of layer {bad[0]!r} contains NaN or Inf")

    def check_results(self) -> list[str]:
        """Names of layers that got no gradient, or an exactly zero one, in the last pass (with a warning;
        they keep their init). run_pass has already raised on NaN/Inf."""
        missing = [n for n, peak in self.max_abs.items() if self.states[n].hits == 0 or peak == 0]
        if missing:
            warnings.warn(f"spectral_init: {len(missing)} LoRA layer(s) received no (or an exactly zero) gradient "
                          f"from loss_fn and keep their previous init: {missing[:5]}", RuntimeWarning, stacklevel=3)
        return missing


def capture_gradients(model: torch.nn.Module, batches: Iterable, loss_fn: Callable,
                      layers: dict[str, LoRALinear] | None = None, dtype=None) -> dict[str, torch.Tensor]:
    """The mean over `batches` of dL/dW (out, in) for every LoRALinear base weight (exact mode), in `dtype`
    (default fp32, fp64 for fp64 layers).

    Layers that receive no gradient are left out (with a warning).
    """
    from lorakern.model import lora_modules
    layers = lora_modules(model) if layers is None else layers
    check_same_layout_across_ranks(layers)  # first: every rank must raise together, or none
    if not layers:
        raise ValueError("model has no LoRALinear layers")
    cap = GradientCapture(model, layers, batches, loss_fn)
    cap.prepare_exact(dtype)
    n = cap.run_pass()
    missing = cap.check_results()
    return {name: s.acc / n for name, s in cap.states.items() if name not in missing}

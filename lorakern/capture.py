"""Streaming capture of the one-step full fine-tuning gradient G = dL/dW of every LoRALinear base weight.

Forward hooks keep each layer's input x; a hook on the layer's output receives dY during the ordinary
backward pass, and torch.ops.lorakern.capture_accumulate_ (csrc/capture.cpp) adds the product to an fp32
accumulator: G itself (exact mode), G @ Omega (range pass) or Q^T G (co-range pass). The base weights never
require grad and no weight gradient is materialized; the model's own .grad fields and requires_grad flags
are restored afterwards. Under torch.distributed the accumulators are summed across ranks after each pass.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from lorakern import _backend
from lorakern.layer import LoRALinear


def accumulate(acc: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, probe_in=None, probe_out=None) -> None:
    """acc += dy^T x, dy^T (x probe_in) or (dy probe_out)^T x, computed in acc's dtype."""
    if _backend._C is not None and _backend.get_backend() != "torch":
        torch.ops.lorakern.capture_accumulate_(acc, x, dy, probe_in, probe_out)
        return
    x, dy = x.to(acc.dtype), dy.to(acc.dtype)
    if probe_in is not None:
        acc.addmm_(dy.t(), x @ probe_in)
    elif probe_out is not None:
        acc.addmm_((dy @ probe_out).t(), x)
    else:
        acc.addmm_(dy.t(), x)


class _LayerState:
    __slots__ = ("acc", "probe_in", "probe_out", "hits")

    def __init__(self):
        self.acc = self.probe_in = self.probe_out = None
        self.hits = 0


def check_reiterable(batches, passes: int) -> None:
    if passes > 1 and iter(batches) is batches:
        raise ValueError(f"batches is a one-shot iterator but {passes} passes over it are needed; "
                         f"pass a list or a DataLoader")


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_same_layout_across_ranks(layers: dict[str, LoRALinear]) -> None:
    if distributed_world() == 1:
        return
    mine = sorted((n, m.out_features, m.in_features, m.r) for n, m in layers.items())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(other != mine for other in everyone):
        raise ValueError(f"rank {dist.get_rank()}: the ranks disagree on the model's LoRA layers "
                         f"(names, shapes, ranks); every rank must hold the same model")


class GradientCapture:
    """Runs passes of loss_fn(model, batch).backward() over `batches`, accumulating per-layer products.

    Usage: set each layer's state (accumulator + probe) with `prepare`, call `run_pass`, read `states`.
    """

    def __init__(self, model: torch.nn.Module, layers: dict[str, LoRALinear], batches: Iterable,
                 loss_fn: Callable, seed: int = 0, progress=None):
        self.model, self.layers, self.batches, self.loss_fn = model, layers, batches, loss_fn
        self.seed, self.progress = seed, progress
        self.states = {n: _LayerState() for n in layers}
        self.n_batches = 0

    def _hook(self, name: str):
        state = self.states[name]

        def on_forward(module, inputs, output):
            if state.acc is None or not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = inputs[0].detach()

            def on_grad(dy):
                accumulate(state.acc, x.reshape(-1, x.shape[-1]), dy.detach().reshape(-1, dy.shape[-1]),
                           state.probe_in, state.probe_out)
                state.hits += 1

            output.register_hook(on_grad)

        return on_forward

    @contextlib.contextmanager
    def _session(self):
        """Hooks on; gradients flow through the adapters; the user's grads and flags come back afterwards."""
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        grads = [p.grad for p in params]
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        try:
            for p in params:
                p.grad = None
            for m in self.layers.values():  # the backward must reach every layer's output
                m.lora_A.requires_grad_(True)
                m.lora_B.requires_grad_(True)
            yield
        finally:
            for h in handles:
                h.remove()
            for p, flag, g in zip(params, flags, grads):
                p.requires_grad_(flag)
                p.grad = g

    def run_pass(self, desc: str = "capture") -> int:
        """One pass over the batches with the same RNG stream every pass (dropout masks repeat, so every pass
        sees the same G; ranks get streams of their own). Returns the number of batches, summed over ranks."""
        for s in self.states.values():
            s.hits = 0
        devices = sorted({p.device.index for p in self.model.parameters() if p.device.type == "cuda"})
        n = 0
        with self._session(), torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(self.seed + (dist.get_rank() if distributed_world() > 1 else 0))
            for batch in self.progress(self.batches, desc) if self.progress else self.batches:
                loss = self.loss_fn(self.model, batch)
                if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                    raise TypeError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', loss)!r}")
                loss.backward()
                for p in self.model.parameters():  # adapter grads are a by-product: drop them as we go
                    p.grad = None
                n += 1
        if n == 0:
            raise ValueError("batches is empty: the gradient capture needs at least one batch")
        if distributed_world() > 1:
            count = torch.tensor([n], dtype=torch.float64)
            dist.all_reduce(count)
            n = int(count.item())
            for s in self.states.values():
                if s.acc is not None:
                    dist.all_reduce(s.acc)
                hits = torch.tensor([s.hits], dtype=torch.float64)
                dist.all_reduce(hits)
                s.hits = int(hits.item())
        self.n_batches = n
        return n

    def check_results(self) -> list[str]:
        """Names of layers that got no gradient (with a warning); raises on NaN/Inf accumulators."""
        missing = [n for n, s in self.states.items() if s.acc is not None and s.hits == 0]
        if missing:
            warnings.warn(f"spectral_init: {len(missing)} LoRA layer(s) received no gradient from loss_fn and keep "
                          f"their previous init: {missing[:5]}", RuntimeWarning, stacklevel=3)
        for n, s in self.states.items():
            if s.acc is not None and not bool(torch.isfinite(s.acc).all()):
                raise FloatingPointError(f"spectral_init: the gradient of layer {n!r} contains NaN or Inf")
        return missing


def capture_gradients(model: torch.nn.Module, batches: Iterable, loss_fn: Callable,
                      layers: dict[str, LoRALinear] | None = None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The mean over `batches` of dL/dW (out, in) for every LoRALinear base weight (exact mode), in `dtype`.

    Layers that receive no gradient are left out (with a warning).
    """
    from lorakern.model import lora_modules
    layers = lora_modules(model) if layers is None else layers
    if not layers:
        raise ValueError("model has no LoRALinear layers")
    cap = GradientCapture(model, layers, batches, loss_fn)
    for n, m in layers.items():
        cap.states[n].acc = torch.zeros(m.out_features, m.in_features, dtype=dtype, device=m.weight.device)
    n = cap.run_pass()
    missing = cap.check_results()
    return {name: s.acc / n for name, s in cap.states.items() if name not in missing}

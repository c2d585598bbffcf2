"""The pure-PyTorch engine of the preconditioned optimizers: the CPU path and the oracle of the fused kernels.

An engine does the two bandwidth-heavy parts of a step for one bucket of pairs (same device, dtype, rank):
  grams(b_factors, a_factors)  -> (len(b) + len(a), r, r) Gram matrices B^T B, then A A^T, in float64;
  update(batch, W, hyper)      -> precondition each factor's gradient by its r x r P = W W^T (this engine
                                  has wants_factor: it is handed W) and apply AdamW or SGD in work_dtype.
The r x r solves between the two are shared (preconditioner.damped_inverses).

Layout (what makes this path fast; measured on a 2-core CPU, BENCHMARKS.md 2026-12-06): the factors of a
bucket are grouped by shape and cut into stacks of at most CHUNK_ELEMS elements; each stack is gathered into
a reused scratch buffer by one torch._foreach_copy_ (cast to float64 for the Grams, to work_dtype for the
gradients) and multiplied by one or two torch.bmm, so a step costs a few launches per stack whatever the
number of pairs, and a stack's intermediates stay in cache. A stack's preconditioned gradients go to
torch._fused_adamw_ (one read of p, g, m, v and one write of p, m, v: torch.optim.AdamW's own fused kernel)
before the next stack reuses the scratch. Decoupled decay is a separate p <- p - (lr wd) p (the fused
kernel's factor 1 - lr wd, rounded to fp32, would lose the digits of a small lr wd); bias_correction=False
hands the kernel a step count of 2^62 (beta^t underflows to 0: both corrections are exactly 1).

What stays float64, by measurement (BENCHMARKS.md 2026-12-06; tests/test_optim.py's one-step recovery):
the Grams (fp32 Grams: 63x the recovery tolerance) and the r x r solves. The products are work_dtype (fp32),
but never with P rounded to fp32 (226x the tolerance): W (W^T grad) with P's factor W is as accurate as a
float64 product (preconditioner.py) at a third of its cost (no casts of the gradients, fp32 FLOPs). The
element-wise Adam / SGD math is work_dtype (fp32 for fp32/bf16/fp16 adapters, fp64 for fp64).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Callable

import torch

from lorakern.optim.preconditioner import GRAM_DTYPE, work_dtype

CHUNK_ELEMS = 1 << 17  # elements per stacked chunk (1 MiB of float64); a larger factor is a chunk by itself
NO_CORRECTION_STEP = float(2 ** 62)  # beta ** 2^62 == 0.0 for every beta < 1 (and exact in float32)
_CACHE_LIMIT = 64
_WIDE = (torch.float32, torch.float64)  # the dtypes that are their own work_dtype


@dataclass
class Hyper:
    """One param group's element-wise hyperparameters, as plain (float64) Python floats.

    The derived coefficients are computed here, on the host in float64, and handed to the engines as they are:
    a GPU kernel receives Python floats as fp32 arguments, and 1 - beta2 computed from an fp32 beta2 = 0.99999
    is off by 0.6% (the moments then drift from the reference)."""
    lr: float
    weight_decay: float = 0.0
    adam: bool = True
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @property
    def one_minus_beta1(self) -> float:
        return 1.0 - self.beta1

    @property
    def one_minus_beta2(self) -> float:
        return 1.0 - self.beta2

    @property
    def lr_wd(self) -> float:
        """Decoupled weight decay (AdamW: p <- p - lr wd p before the step), passed as lr * wd rather than as
        the factor 1 - lr wd, whose fp32 rounding would lose the digits of a small lr * wd."""
        return self.lr * self.weight_decay


@dataclass
class FactorBatch:
    """The factors of one kind ("A": (r, in), "B": (out, r), or "plain") updated together.

    step_sizes[i] = lr / (1 - beta1^t) and bc2_sqrts[i] = sqrt(1 - beta2^t) for factor i at its step t
    (lr and 1.0 without bias correction), Python floats, for the fused kernels; steps[i] = t and
    bias_correction, for torch's fused AdamW. The exp_avg lists are empty for SGD.
    """
    kind: str
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    step_sizes: list[float] = field(default_factory=list)
    bc2_sqrts: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    bias_correction: bool = True

    def __len__(self) -> int:
        return len(self.params)


@dataclass(frozen=True)
class Chunk:
    """Factors of one shape processed as one stack: their positions in the batch (a tuple, an int64 index
    tensor on the factors' device, and `pick`, which takes those items from a list)."""
    shape: tuple[int, ...]
    positions: tuple[int, ...]
    index: torch.Tensor
    pick: Callable[[list], tuple]


def plan_chunks(shapes: tuple, device: torch.device, limit: int | None = None) -> list[Chunk]:
    """Positions grouped by shape (first-seen order), each group cut into the fewest stacks of <= `limit`
    elements (CHUNK_ELEMS by default; a single larger factor is a stack by itself), of near-equal sizes."""
    limit = CHUNK_ELEMS if limit is None else limit
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    chunks = []
    for shape, positions in groups.items():
        per = max(1, limit // max(1, _numel(shape)))
        n_stacks = -(-len(positions) // per)
        per = -(-len(positions) // n_stacks)
        for j in range(0, len(positions), per):
            part = tuple(positions[j:j + per])
            pick = itemgetter(*part) if len(part) > 1 else (lambda values, i=part[0]: (values[i],))
            chunks.append(Chunk(shape, part, torch.tensor(part, dtype=torch.int64, device=device), pick))
    return chunks


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _Scratch:
    """One thread's reused buffers: a flat buffer per (slot, dtype, device), grown on demand (never shrunk),
    and the (k, *shape) stacks carved from its start, cached with their per-factor views. No allocation and
    no page faults in a steady loop; a stack is valid until the next use of its slot."""

    def __init__(self):
        self.flat: dict[tuple, torch.Tensor] = {}
        self.stacks: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def stack(self, slot: str, dtype: torch.dtype, device: torch.device, k: int,
              shape: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
        key = (slot, dtype, device, k, shape)
        hit = self.stacks.get(key)
        if hit is None:
            if len(self.stacks) >= _CACHE_LIMIT:
                self.stacks.clear()
            hit = self.stacks[key] = self._carve(key)
        return hit

    def _carve(self, key: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
        slot, dtype, device, k, shape = key
        n = k * _numel(shape)
        flat = self.flat.get(key[:3])
        if flat is None or flat.numel() < n:
            flat = self.flat[key[:3]] = torch.empty(max(n, CHUNK_ELEMS), dtype=dtype, device=device)
            self.stacks = {kk: v for kk, v in self.stacks.items() if kk[:3] != key[:3]}  # the old buffer's
        out = flat[:n].view((k,) + tuple(shape))
        return out, list(out.unbind(0))


class TorchEngine:
    name = "torch"
    wants_factor = True  # update() takes W (P = W W^T): products in work_dtype, as accurate as float64 ones

    def __init__(self):
        self._local = threading.local()  # scratch buffers and caches, per thread (the engine is shared)

    # -- per-thread caches ---------------------------------------------------------------------------------
    def _cache(self, name: str) -> dict:
        cache = getattr(self._local, name, None)
        if cache is None or len(cache) >= _CACHE_LIMIT:
            cache = {}
            setattr(self._local, name, cache)
        return cache

    def _scratch(self) -> _Scratch:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = _Scratch()
        return scratch

    def _plan(self, tensors: list[torch.Tensor]) -> list[Chunk]:
        device = tensors[0].device
        key = (device, CHUNK_ELEMS, tuple(t.shape for t in tensors))
        plans = self._cache("plans")
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = plan_chunks(key[2], device)
        return plan

    def _stack(self, tensors: list[torch.Tensor], chunk: Chunk, dtype: torch.dtype, slot: str) -> torch.Tensor:
        """tensors[chunk.positions] cast into one (k, *shape) scratch stack of `dtype` (one launch)."""
        picked = chunk.pick(tensors)
        out, views = self._scratch().stack(slot, dtype, picked[0].device, len(picked), chunk.shape)
        torch._foreach_copy_(views, picked)
        return out

    def _step_tensors(self, steps: tuple, bias_correction: bool, device: torch.device) -> list[torch.Tensor]:
        """The 0-d float32 step counts torch's fused AdamW reads (one tensor per distinct value, reused;
        made by a fill on the device, never uploaded: no host synchronisation)."""
        cache = self._cache("steps")
        out = []
        for t in steps:
            value = float(t) if bias_correction else NO_CORRECTION_STEP
            tensor = cache.get((device, value))
            if tensor is None:
                tensor = cache[(device, value)] = torch.full((), value, dtype=torch.float32, device=device)
            out.append(tensor)
        return out

    # -- the engine interface ------------------------------------------------------------------------------
    @torch.no_grad()
    def grams(self, b_factors: list[torch.Tensor], a_factors: list[torch.Tensor], r: int) -> torch.Tensor:
        first = (b_factors or a_factors)[0]
        out = torch.empty((len(b_factors) + len(a_factors), r, r), dtype=GRAM_DTYPE, device=first.device)
        self._grams_into(out[:len(b_factors)], b_factors, "B")
        self._grams_into(out[len(b_factors):], a_factors, "A")
        return out

    def _grams_into(self, out: torch.Tensor, factors: list[torch.Tensor], kind: str) -> None:
        if not factors:
            return
        for chunk in self._plan(factors):
            X = self._stack(factors, chunk, GRAM_DTYPE, "in")
            out.index_copy_(0, chunk.index, torch.bmm(X, X.mT) if kind == "A" else torch.bmm(X.mT, X))

    @torch.no_grad()
    def update(self, batch: FactorBatch, W: torch.Tensor | None, hyper: Hyper) -> None:
        """W: (len(batch), r, r), P_i = W_i W_i^T (damped_inverses(..., factors=...)); None for "plain"."""
        if not len(batch):
            return
        if batch.kind == "plain" or W is None:
            for positions in _device_dtype_groups(batch.params):  # one fused call per device and dtype
                sub = batch if len(positions) == len(batch) else _select(batch, positions)
                self._apply(sub, plain_grads(sub.grads), hyper)
            return
        if batch.kind not in ("A", "B"):
            raise ValueError(f"kind must be 'A', 'B' or 'plain', got {batch.kind!r}")
        dtype = work_dtype(batch.params[0].dtype)
        for chunk in self._plan(batch.params):  # each stack is updated before the next one reuses the scratch
            grads = self._precondition_chunk(batch.kind, batch.grads, W, chunk, dtype)
            self._apply(_pick(batch, chunk), grads, hyper)

    def _precondition_chunk(self, kind: str, grads: list[torch.Tensor], W: torch.Tensor, chunk: Chunk,
                            dtype: torch.dtype) -> list[torch.Tensor]:
        """P_i grad_i = W_i (W_i^T grad_i) (A) or grad_i P_i = (grad_i W_i) W_i^T (B) for the chunk's factors:
        two batched products in `dtype` (work_dtype). Contiguous scratch views, valid until the next chunk."""
        G = self._stack(grads, chunk, dtype, "in")
        Wc = W.index_select(0, chunk.index).to(dtype)
        scratch = self._scratch()
        T, _ = scratch.stack("tmp", dtype, G.device, G.shape[0], chunk.shape)
        out, views = scratch.stack("out", dtype, G.device, G.shape[0], chunk.shape)
        if kind == "A":  # G (k, r, L)
            torch.bmm(Wc, torch.bmm(Wc.mT, G, out=T), out=out)
        else:  # G (k, L, r)
            torch.bmm(torch.bmm(G, Wc, out=T), Wc.mT, out=out)
        return views

    def _apply(self, batch: FactorBatch, grads: list[torch.Tensor], hyper: Hyper) -> None:
        if hyper.adam:
            steps = self._step_tensors(batch.steps, batch.bias_correction, grads[0].device)
            adamw_update_(batch, grads, hyper, steps)
        else:
            sgd_update_(batch.params, grads, hyper)


def _pick(batch: FactorBatch, chunk: Chunk) -> FactorBatch:
    """The chunk's share of the batch (what the torch updates read: params, state, step counts)."""
    def pick(values: list) -> list:
        return list(chunk.pick(values)) if values else []
    return FactorBatch(batch.kind, pick(batch.params), pick(batch.grads), pick(batch.exp_avgs),
                       pick(batch.exp_avg_sqs), steps=pick(batch.steps), bias_correction=batch.bias_correction)


def _select(batch: FactorBatch, positions: list[int]) -> FactorBatch:
    def pick(values: list) -> list:
        return [values[i] for i in positions] if values else []
    return FactorBatch(batch.kind, pick(batch.params), pick(batch.grads), pick(batch.exp_avgs),
                       pick(batch.exp_avg_sqs), steps=pick(batch.steps), bias_correction=batch.bias_correction)


def _device_dtype_groups(params: list[torch.Tensor]) -> list[list[int]]:
    """Positions of the params by (device, work_dtype): a fused kernel call takes one of each."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, work_dtype(p.dtype)), []).append(i)
    return list(groups.values())


def plain_grads(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of the plain group as the updates read them: the caller's tensors themselves when already
    contiguous and in work_dtype (no copy; they are only ever read), else contiguous work_dtype copies."""
    return [_contiguous_work(g) for g in grads]


def _contiguous_work(t: torch.Tensor) -> torch.Tensor:
    """t itself when contiguous and in work_dtype, else a contiguous work_dtype copy."""
    if t.dtype in _WIDE and t.is_contiguous():
        return t
    # (t.to(dtype, memory_format=torch.contiguous_format) returns a non-contiguous t itself when the dtype
    # already matches)
    return torch.empty(t.shape, dtype=work_dtype(t.dtype), device=t.device).copy_(t)


def _masters(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters as contiguous work_dtype tensors: themselves when they are (fp32/fp64), else copies
    (bf16/fp16 adapters, non-contiguous parameters) that _write_back copies back."""
    return [_contiguous_work(p) for p in params]


def _write_back(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    for p, m in zip(params, masters):
        if m is not p:
            p.copy_(m)  # one rounding to the adapter dtype per step


def _decay_(masters: list[torch.Tensor], hyper: Hyper) -> None:
    if hyper.weight_decay != 0.0:
        torch._foreach_add_(masters, masters, alpha=-hyper.lr_wd)  # p <- p - (lr wd) p


def adamw_update_(batch: FactorBatch, grads: list[torch.Tensor], hyper: Hyper,
                  steps: list[torch.Tensor]) -> None:
    """AdamW on (preconditioned) grads with torch's fused kernel: moments in fp32/fp64, decoupled decay,
    per-factor bias correction from `steps` (0-d float32 tensors, the batch's step counts).
    `grads` (contiguous, work_dtype) are only read (they may be the caller's .grad tensors)."""
    masters = _masters(batch.params)
    _decay_(masters, hyper)
    torch._fused_adamw_(masters, grads, batch.exp_avgs, batch.exp_avg_sqs, [], steps, lr=hyper.lr,
                        beta1=hyper.beta1, beta2=hyper.beta2, weight_decay=0.0, eps=hyper.eps, amsgrad=False,
                        maximize=False)
    _write_back(batch.params, masters)


def sgd_update_(params: list[torch.Tensor], grads: list[torch.Tensor], hyper: Hyper) -> None:
    """p <- p - lr wd p - lr g; `grads` are only read."""
    masters = _masters(params)
    _decay_(masters, hyper)
    torch._foreach_add_(masters, grads, alpha=-hyper.lr)
    _write_back(params, masters)

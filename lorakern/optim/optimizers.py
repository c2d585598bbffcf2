"""PreconditionedAdamW (LoRA-One-P / Riemannian AdamW / NoRA+) and ScaledGD (API.md "Optimizers").

Per pair, with P_A = (B^T B + damping I)^-1 and P_B = (A A^T + damping I)^-1 on the raw factors (the layer's
`scaling` is not folded in; with damping 0 they are pseudo-inverses, see preconditioner.py):
    g_A = P_A grad_A,  g_B = grad_B P_B      (each P divided by ||P||_F with normalize="fro", NoRA+)
PreconditionedAdamW feeds g to AdamW: m <- lerp(m, g, 1 - beta1), v <- beta2 v + (1 - beta2) g^2,
    p <- p (1 - lr weight_decay) - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
(torch.optim.AdamW's formula; bias_correction=False drops both corrections, as the reference code's AdamWr
does; that code also applies the decay after the step, which differs from this by lr^2 wd |update|).
ScaledGD does p <- p (1 - lr weight_decay) - lr g; with damping 0, no normalization and SGD this is
nystrom-init-nora.txt eq. (5), first-step skip included: at A = 0 (Nystrom/NoRA init) grad_B = 0 and P_B = 0.

order="jacobi": both P's come from the factors before the step. order="gauss-seidel": A is updated first
and P_B is computed from the updated A (the reference code's order).

The first argument is a module (the pairs of its LoRALinear and peft LoRA layers are found by pairs.py; its
other trainable parameters join the same optimizer in a second param group, updated by plain AdamW / SGD with
the same hyperparameters) or an iterable of LoRA layers. Param group 0 holds the pairs as [A_0, B_0, A_1, ...]
with "lora_pairs": True, which state_dict saves, so the pairing survives a save/load round trip.

Gradients: a factor whose .grad is None is skipped for that step (no moment update, no decay, its step count
does not advance), as torch.optim does; its partner is still preconditioned by the skipped factor's current
value (so a frozen lora_A, LoRA-FA style, still preconditions lora_B). The caller's .grad tensors are read,
never modified (nor copied when they are already fp32/fp64, for the plain group). Optimizer state (exp_avg,
exp_avg_sq) is fp32 for fp32/bf16/fp16 adapters (fp64 for fp64); "step" is a Python int per factor. The Grams
and the r x r solves are float64; the products P grad are float64 in the fused kernel and, in the torch engine,
two fp32 products with a factor W of P (P = W W^T), as accurate (preconditioner.py); the element-wise update is
fp32 (fp64 for fp64 adapters): torch's fused AdamW kernel in the torch engine. bf16 adapters are updated in
fp32 and rounded once per step (no fp32 master copy: updates below half a bf16 ulp are lost, as with any bf16
param).

Hyperparameters are validated at construction, in add_param_group and load_state_dict, and again (cheaply,
before anything is modified) at every step(), so a value set in param_groups later (e.g. order="gs") raises
instead of silently running another variant. eps must be > 0.

FSDP2 (DTensor factors, e.g. fully_shard without ignored_params): the Grams and the r x r solves need whole
factors (a Shard(0) lora_A holds only some of its r rows), so each step all-gathers every sharded factor and its
gradient into a persistent full-size plain tensor (the same on every rank), updates those as above, and writes
each rank's shard back. The moments of such a factor are full-size on every rank (adapters are ~1% of a model)
and state_dict() holds them as plain tensors. Two all-gathers per factor per step: sharding the base with
the adapters in ignored_params (replicated, grads all-reduced) avoids them.
Backend: where lorakern._backend.resolve(device) is "triton" (CUDA in "auto" mode; the CPU interpreter when
forced) the pairs go through the fused kernels of precond_triton (imported on first use); elsewhere, and for
fp64, r > 128 or non-contiguous factors, through torch_engine (stacked per shape: a few launches per stack of
factors, see its docstring; on the CPU a step costs 0.7-1.3x a torch.optim.AdamW(foreach=True) step,
BENCHMARKS.md 2026-12-06). All solves of a step on one device are one
batched call (damped_inverses), whatever the number of ranks. Host synchronisations per step and device: none
with damping > 0; with damping == 0 one per solve (torch.linalg.eigh's error check): one per step for
order="jacobi", two for "gauss-seidel" (B's solve needs the updated A's). The fused path's address tables are
cached (no upload in a steady loop) and otherwise uploaded from pinned memory without synchronising.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import torch

from lorakern import _backend
from lorakern._util import check_number
from lorakern.optim.pairs import check_pairs, collect_pairs
from lorakern.optim.preconditioner import NORMALIZE_CHOICES, damped_inverses, work_dtype
from lorakern.optim.torch_engine import FactorBatch, Hyper, TorchEngine

ORDER_CHOICES = ("jacobi", "gauss-seidel")
_ADAM_ONLY_KEYS = {"betas", "eps", "bias_correction"}
_TORCH_ENGINE = TorchEngine()
_triton_engine = None


def _fused_engine():
    """The Triton engine, imported on first use so that `import lorakern` never imports triton (the
    interpreter decides at @triton.jit time whether it is on)."""
    global _triton_engine
    if _triton_engine is None:
        from lorakern.optim.precond_triton import TritonEngine
        _triton_engine = TritonEngine()
    return _triton_engine


def _number(value, name: str, low: float = 0.0, high: float | None = None, positive: bool = False) -> float:
    """value as a finite float in [low, high) ((low, high) with positive=True); TypeError / ValueError otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return check_number(value, name, low, high, high_open=True, low_open=positive)


class _PairOptimizer(torch.optim.Optimizer):
    """Shared machinery: param groups of pairs, buckets by (device, dtype, r), engine dispatch, state."""
    _adam = True

    def __init__(self, model, defaults: dict):
        pairs, others = collect_pairs(model, "model")
        groups = []
        if pairs:
            groups.append({"params": [t for pair in pairs for t in pair], "lora_pairs": True})
        if others:
            groups.append({"params": others, "lora_pairs": False})
        self._buckets_cache: dict[int, tuple[tuple[int, ...], list]] = {}
        self._full: dict[torch.Tensor, torch.Tensor] = {}  # DTensor factor -> its whole value (plain tensor)
        self._owner: dict[torch.Tensor, torch.Tensor] = {}  # and back: the state stays keyed on the parameter
        self._hyper_keys = tuple(defaults)  # this variant's hyperparameters (torch adds keys to defaults)
        super().__init__(groups, defaults)

    # -- param groups ------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim.Optimizer's; a group with "lora_pairs": True must hold [A_0, B_0, A_1, B_1, ...]."""
        param_group.setdefault("lora_pairs", False)
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_hyper(self, group: dict) -> None:
        """Validates (and normalizes to floats) a group's hyperparameters; cheap enough for every step."""
        for key in self._hyper_keys:
            if key not in group:
                raise ValueError(f"param group is missing {key!r}, a hyperparameter of {type(self).__name__}")
        group["lr"] = _number(group["lr"], "lr")
        group["weight_decay"] = _number(group["weight_decay"], "weight_decay")
        group["damping"] = _number(group["damping"], "damping")
        if group["normalize"] not in NORMALIZE_CHOICES:
            raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, got {group['normalize']!r}")
        if group["order"] not in ORDER_CHOICES:
            raise ValueError(f"order must be one of {ORDER_CHOICES}, got {group['order']!r}")
        if self._adam:
            betas = group["betas"]
            if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
                raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
            group["betas"] = (_number(betas[0], "betas[0]", 0.0, 1.0), _number(betas[1], "betas[1]", 0.0, 1.0))
            group["eps"] = _number(group["eps"], "eps", positive=True)
            if not isinstance(group["bias_correction"], bool):
                raise TypeError(f"bias_correction must be True or False, got {group['bias_correction']!r}")
        if not isinstance(group.get("lora_pairs"), bool):
            raise TypeError(f"lora_pairs must be True or False, got {group.get('lora_pairs')!r}")

    def _check_group(self, group: dict) -> None:
        self._check_hyper(group)
        if group["lora_pairs"]:
            check_pairs(group["params"])
        for p in group["params"]:
            if not p.is_floating_point():
                raise TypeError(f"the optimizer needs floating-point parameters, got one of dtype {p.dtype}")

    def _hyper(self, group: dict) -> Hyper:
        if self._adam:
            return Hyper(lr=float(group["lr"]), weight_decay=group["weight_decay"], adam=True,
                         beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])
        return Hyper(lr=float(group["lr"]), weight_decay=group["weight_decay"], adam=False)

    # -- state ---------------------------------------------------------------------------------------------
    def _batch(self, kind: str, params: list[torch.Tensor], group: dict) -> FactorBatch:
        """The factors' grads and state for one update; advances each factor's step count."""
        batch = FactorBatch(kind, params, [])
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            batch.grads.append(p.grad)
        if not self._adam:
            return batch
        beta1, beta2 = group["betas"]
        batch.bias_correction = group["bias_correction"]
        for p in params:
            st = self.state[self._owner.get(p, p)]
            if "exp_avg" not in st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, dtype=work_dtype(p.dtype), memory_format=torch.contiguous_format)
                st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
            st["step"] += 1
            t = st["step"]
            batch.steps.append(t)
            batch.exp_avgs.append(st["exp_avg"])
            batch.exp_avg_sqs.append(st["exp_avg_sq"])
            if group["bias_correction"]:
                batch.step_sizes.append(float(group["lr"]) / (1.0 - beta1 ** t))
                batch.bc2_sqrts.append(math.sqrt(1.0 - beta2 ** t))
            else:
                batch.step_sizes.append(float(group["lr"]))
                batch.bc2_sqrts.append(1.0)
        return batch

    def _check_loadable(self, state_dict: dict) -> None:
        """Raises ValueError unless `state_dict` is this optimizer's kind of state for the same pairing; it
        modifies nothing (load_state_dict calls it before touching any group or state)."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"expected an optimizer state dict with 'state' and 'param_groups', got "
                             f"{type(state_dict).__name__}")
        saved_groups, state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(saved_groups)} param groups but this {name} has "
                             f"{len(self.param_groups)}")
        variant_keys = set(self._hyper_keys) | {"lora_pairs"}
        foreign = _ADAM_ONLY_KEYS - variant_keys
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            missing = sorted(variant_keys - saved.keys())
            extra = sorted(foreign & saved.keys())
            if missing or extra:
                what = f"lacks {missing}" if missing else f"has {extra}"
                raise ValueError(f"param group {i}: the saved group {what}: it was not saved by a {name} "
                                 f"(PreconditionedAdamW and ScaledGD states are not interchangeable)")
            if bool(saved["lora_pairs"]) != group["lora_pairs"]:
                raise ValueError(f"param group {i}: the saved state has lora_pairs={saved['lora_pairs']} "
                                 f"but this optimizer has lora_pairs={group['lora_pairs']}")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i}: the saved group holds {len(saved['params'])} tensors, this "
                                 f"one {len(group['params'])}; the state belongs to another model")
            candidate = {**saved, "params": group["params"]}
            try:
                self._check_group(candidate)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"param group {i} of the state dict: {exc}") from exc
            for sid, p in zip(saved["params"], group["params"]):
                saved_state = state.get(sid, {})
                if not self._adam and {"exp_avg", "exp_avg_sq"} & saved_state.keys():
                    raise ValueError(f"param group {i}: the saved state holds Adam moments; it was saved by "
                                     f"PreconditionedAdamW, not {name}")
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in saved_state and tuple(saved_state[key].shape) != tuple(p.shape):
                        raise ValueError(f"param group {i}: saved {key} of shape "
                                         f"{tuple(saved_state[key].shape)} for a parameter of shape "
                                         f"{tuple(p.shape)}; the state belongs to another model")

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer's, keeping the state fp32 (torch would cast it to a bf16 parameter's dtype),
        after checking, before anything changes, that the state was saved by the same optimizer class
        (its hyperparameter keys, no Adam moments for ScaledGD), with valid values, for the same pairing
        (group count, lora_pairs flags, tensor counts, moment shapes). Raises ValueError otherwise."""
        self._check_loadable(state_dict)
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in saved_groups)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for sid, p in zip(saved_ids, params):
            saved_state = state_dict["state"].get(sid, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved_state:
                    self.state[p][key] = saved_state[key].to(device=p.device, dtype=work_dtype(p.dtype),
                                                             copy=True).contiguous()
        for group in self.param_groups:
            self._check_group(group)
        self._buckets_cache.clear()

    # -- step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # all groups first: an invalid value raises before anything moves
            self._check_hyper(group)
        for group in self.param_groups:
            if group["lora_pairs"]:
                self._step_pairs(group)
            else:
                self._step_plain(group)
        return loss

    def _step_plain(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if params:
            _TORCH_ENGINE.update(self._batch("plain", params, group), None, self._hyper(group))

    def _buckets(self, group: dict, params: list) -> list:
        """[((device, dtype, r), [(A, B), ...]), ...]; cached while the group holds the same tensors."""
        ids = tuple(map(id, params))
        cached = self._buckets_cache.get(id(group))
        if cached is None or cached[0] != ids:
            check_pairs(params)  # the list was edited in place since the last check
            buckets: dict[tuple, list] = {}
            for i in range(0, len(params), 2):
                A, B = params[i], params[i + 1]
                buckets.setdefault((A.device, A.dtype, A.shape[0]), []).append((A, B))
            cached = (ids, list(buckets.items()))
            self._buckets_cache[id(group)] = cached
        return cached[1]

    @staticmethod
    def _engine(device: torch.device, dtype: torch.dtype, r: int, pairs: list):
        if _backend.resolve(device) == "triton":
            engine = _fused_engine()
            if engine.supports(dtype, r) and all(A.is_contiguous() and B.is_contiguous() for A, B in pairs):
                return engine
        return _TORCH_ENGINE

    def _gather_dtensors(self, params: list) -> list:
        """params with every DTensor replaced by its persistent whole copy, refreshed (value and .grad) by
        all-gathers: every rank calls them in the same order, the group's."""
        if not any(_is_dtensor(p) for p in params):
            return params
        out = []
        for p in params:
            if not _is_dtensor(p):
                out.append(p)
                continue
            whole = p.detach().full_tensor()
            proxy = self._full.get(p)
            if proxy is None or proxy.shape != whole.shape or proxy.dtype != whole.dtype:
                proxy = whole.contiguous()
                self._full[p] = proxy
                self._owner[proxy] = p
            else:
                proxy.copy_(whole)
            proxy.grad = None if p.grad is None else p.grad.full_tensor()
            out.append(proxy)
        return out

    def _scatter_dtensors(self, params: list) -> None:
        """Each rank's shard of the updated whole copies back into its DTensor factors (no communication:
        every rank holds the same whole copy)."""
        from torch.distributed.tensor import distribute_tensor
        for p in params:
            if _is_dtensor(p) and p.grad is not None:
                shard = distribute_tensor(self._full[p], p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(shard.to_local())
                self._full[p].grad = None  # the gathered gradient is not kept between steps

    def _step_pairs(self, group: dict) -> None:
        params = self._gather_dtensors(group["params"])
        self._step_gathered_pairs(group, params)
        if params is not group["params"]:
            self._scatter_dtensors(group["params"])

    def _step_gathered_pairs(self, group: dict, params: list) -> None:
        hyper, damping, normalize = self._hyper(group), group["damping"], group["normalize"]
        by_device: dict[torch.device, list] = {}
        for (device, dtype, r), pairs in self._buckets(group, params):
            a_pairs = [(A, B) for A, B in pairs if A.grad is not None]
            b_pairs = [(A, B) for A, B in pairs if B.grad is not None]
            if not a_pairs and not b_pairs:
                continue
            by_device.setdefault(device, []).append(_Work(
                self._engine(device, dtype, r, pairs), dtype, r, a_pairs, b_pairs,
                self._batch("A", [A for A, _ in a_pairs], group), self._batch("B", [B for _, B in b_pairs], group)))
        for works in by_device.values():  # one batched solve per device and phase, whatever the ranks
            if group["order"] == "jacobi":  # both preconditioners from the factors before the step
                grams = [w.engine.grams([B for _, B in w.a_pairs], [A for A, _ in w.b_pairs], w.r) for w in works]
                Ps = _solve(grams, damping, normalize, works)
                for w, P in zip(works, Ps):
                    w.engine.update(w.a_batch, P[:len(w.a_pairs)], hyper)
                    w.engine.update(w.b_batch, P[len(w.a_pairs):], hyper)
            else:  # gauss-seidel: A first, then B's preconditioner from the updated A
                for kind in ("A", "B"):
                    todo = [w for w in works if (w.a_pairs if kind == "A" else w.b_pairs)]
                    if not todo:
                        continue
                    grams = [w.engine.grams([B for _, B in w.a_pairs], [], w.r) if kind == "A"
                             else w.engine.grams([], [A for A, _ in w.b_pairs], w.r) for w in todo]
                    Ps = _solve(grams, damping, normalize, todo)
                    for w, P in zip(todo, Ps):
                        w.engine.update(w.a_batch if kind == "A" else w.b_batch, P, hyper)


def _solve(grams: list[torch.Tensor], damping: float, normalize: str | None, works: list) -> list[torch.Tensor]:
    """One batched solve for the buckets of a device: each in its engine's form (P, or W with P = W W^T where
    the engine has wants_factor)."""
    return damped_inverses(grams, damping, normalize, [w.dtype for w in works],
                           [getattr(w.engine, "wants_factor", False) for w in works])


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


@dataclass
class _Work:
    """One bucket's share of a step: its engine, the pairs whose A / B have a gradient, and their batches."""
    engine: object
    dtype: torch.dtype
    r: int
    a_pairs: list
    b_pairs: list
    a_batch: FactorBatch
    b_batch: FactorBatch


class PreconditionedAdamW(_PairOptimizer):
    """AdamW on r x r preconditioned LoRA gradients: LoRA-One-P (lora-one.txt Alg. 2), the Riemannian
    preconditioned AdamW of Zhang & Pilanci, and NoRA+ with normalize="fro" (nystrom-init-nora.txt Alg. 2).

    model: a module (its LoRALinear / peft LoRA pairs are preconditioned; its other trainable parameters get
    plain AdamW in param group 1) or an iterable of LoRA layers. damping: lambda >= 0 (0: pseudo-inverse).
    eps > 0 (eps = 0 divides 0 by 0 where a preconditioned gradient is 0, e.g. at the standard init).
    normalize: None or "fro". order: "jacobi" or "gauss-seidel". bias_correction=False reproduces the
    reference code (it applies to every param group). See the module docstring for the exact update.
    """
    _adam = True

    def __init__(self, model, lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 damping: float = 1e-6, normalize: str | None = None, order: str = "jacobi",
                 bias_correction: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, damping=damping,
                        normalize=normalize, order=order, bias_correction=bias_correction)
        super().__init__(model, defaults)


class ScaledGD(_PairOptimizer):
    """Scaled gradient descent on LoRA pairs (nystrom-init-nora.txt eq. (5); "LoRA-P" with SGD).

    p <- p (1 - lr weight_decay) - lr * (preconditioned gradient); other trainable parameters of a module get
    plain SGD with the same lr and decay. With damping=0, normalize=None and lr=eta this is eq. (5) iterate for
    iterate (first-step skip included), and after Nystrom init lr=1 recovers an exactly-parametrized target
    in one step (the loss being 1/2 ||scaling B A - M||_F^2 with scaling 1), up to the factors' rounding
    (about cond(B) u: the solve is float64).

    There is no momentum: schedulers that cycle it need it switched off, e.g.
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr, total_steps, cycle_momentum=False) (CyclicLR likewise).
    """
    _adam = False

    def __init__(self, model, lr: float = 0.5, damping: float = 0.0, normalize: str | None = None,
                 order: str = "jacobi", weight_decay: float = 0.0):
        defaults = dict(lr=lr, damping=damping, normalize=normalize, order=order, weight_decay=weight_decay)
        super().__init__(model, defaults)

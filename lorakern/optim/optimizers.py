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

The first argument is a module (its LoRALinear pairs are found with lora_modules; its other trainable
parameters join the same optimizer in a second param group, updated by plain AdamW / SGD with the same
hyperparameters) or an iterable of LoRALinear modules. Param group 0 holds the pairs as [A_0, B_0, A_1, ...]
with "lora_pairs": True, which state_dict saves, so the pairing survives a save/load round trip.

Gradients: a factor whose .grad is None is skipped for that step (no moment update, no decay, its step count
does not advance), as torch.optim does; its partner is still preconditioned by the skipped factor's current
value. The caller's .grad tensors are read, never modified. Optimizer state (exp_avg, exp_avg_sq) is fp32 for
fp32/bf16/fp16 adapters (fp64 for fp64); "step" is a Python int per factor. bf16 adapters are updated in fp32
and rounded once per step (no fp32 master copy: updates below half a bf16 ulp are lost, as with any bf16 param).

Backend: where lorakern._backend.resolve(device) is "triton" (CUDA in "auto" mode; the CPU interpreter when
forced) the pairs go through the fused kernels of precond_triton (imported on first use); elsewhere, and for
fp64, r > 128 or non-contiguous factors, through torch_engine.
"""
from __future__ import annotations

import math
from itertools import chain

import torch

from lorakern import _backend
from lorakern.optim.pairs import check_pairs, collect_pairs
from lorakern.optim.preconditioner import NORMALIZE_CHOICES, damped_inverse, work_dtype
from lorakern.optim.torch_engine import FactorBatch, Hyper, TorchEngine

ORDER_CHOICES = ("jacobi", "gauss-seidel")
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


def _number(value, name: str, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or (high is not None and value >= high):
        upper = "" if high is None else f" and < {high}"
        raise ValueError(f"{name} must be a finite number >= {low}{upper}, got {value}")
    return value


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

    def _check_group(self, group: dict) -> None:
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
            group["eps"] = _number(group["eps"], "eps")
            if not isinstance(group["bias_correction"], bool):
                raise TypeError(f"bias_correction must be True or False, got {group['bias_correction']!r}")
        if not isinstance(group["lora_pairs"], bool):
            raise TypeError(f"lora_pairs must be True or False, got {group['lora_pairs']!r}")
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
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, dtype=work_dtype(p.dtype), memory_format=torch.contiguous_format)
                st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
            st["step"] += 1
            t = st["step"]
            batch.exp_avgs.append(st["exp_avg"])
            batch.exp_avg_sqs.append(st["exp_avg_sq"])
            if group["bias_correction"]:
                batch.step_sizes.append(float(group["lr"]) / (1.0 - beta1 ** t))
                batch.bc2_sqrts.append(math.sqrt(1.0 - beta2 ** t))
            else:
                batch.step_sizes.append(float(group["lr"]))
                batch.bc2_sqrts.append(1.0)
        return batch

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer's, keeping the state fp32 (torch would cast it to a bf16 parameter's dtype)
        and checking that the saved groups pair the same factors the same way."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
                if bool(saved.get("lora_pairs", False)) != group["lora_pairs"]:
                    raise ValueError(f"param group {i}: the saved state has lora_pairs={saved.get('lora_pairs')} "
                                     f"but this optimizer has lora_pairs={group['lora_pairs']}")
                if len(saved["params"]) == len(group["params"]):
                    for sid, p in zip(saved["params"], group["params"]):
                        saved_state = state_dict["state"].get(sid, {})
                        for key in ("exp_avg", "exp_avg_sq"):
                            if key in saved_state and tuple(saved_state[key].shape) != tuple(p.shape):
                                raise ValueError(f"param group {i}: saved {key} of shape "
                                                 f"{tuple(saved_state[key].shape)} for a parameter of shape "
                                                 f"{tuple(p.shape)}; the state belongs to another model")
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

    def _buckets(self, group: dict) -> list:
        """[((device, dtype, r), [(A, B), ...]), ...]; cached while the group holds the same tensors."""
        params = group["params"]
        ids = tuple(map(id, params))
        cached = self._buckets_cache.get(id(group))
        if cached is None or cached[0] != ids:
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

    def _step_pairs(self, group: dict) -> None:
        hyper, damping, normalize = self._hyper(group), group["damping"], group["normalize"]
        for (device, dtype, r), pairs in self._buckets(group):
            a_pairs = [(A, B) for A, B in pairs if A.grad is not None]
            b_pairs = [(A, B) for A, B in pairs if B.grad is not None]
            if not a_pairs and not b_pairs:
                continue
            engine = self._engine(device, dtype, r, pairs)
            a_batch = self._batch("A", [A for A, _ in a_pairs], group)
            b_batch = self._batch("B", [B for _, B in b_pairs], group)
            if group["order"] == "jacobi":  # both preconditioners from the factors before the step
                grams = engine.grams([B for _, B in a_pairs], [A for A, _ in b_pairs], r)
                P = damped_inverse(grams, damping, normalize)
                engine.update(a_batch, P[:len(a_pairs)], hyper)
                engine.update(b_batch, P[len(a_pairs):], hyper)
            else:  # gauss-seidel: A first, then B's preconditioner from the updated A
                if a_pairs:
                    P_A = damped_inverse(engine.grams([B for _, B in a_pairs], [], r), damping, normalize)
                    engine.update(a_batch, P_A, hyper)
                if b_pairs:
                    P_B = damped_inverse(engine.grams([], [A for A, _ in b_pairs], r), damping, normalize)
                    engine.update(b_batch, P_B, hyper)


class PreconditionedAdamW(_PairOptimizer):
    """AdamW on r x r preconditioned LoRA gradients: LoRA-One-P (lora-one.txt Alg. 2), the Riemannian
    preconditioned AdamW of Zhang & Pilanci, and NoRA+ with normalize="fro" (nystrom-init-nora.txt Alg. 2).

    model: a module (its LoRALinear pairs are preconditioned; its other trainable parameters get plain AdamW
    in param group 1) or an iterable of LoRALinear modules. damping: lambda >= 0 (0: pseudo-inverse).
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
    in one step (the loss being 1/2 ||scaling B A - M||_F^2 with scaling 1).
    """
    _adam = False

    def __init__(self, model, lr: float = 0.5, damping: float = 0.0, normalize: str | None = None,
                 order: str = "jacobi", weight_decay: float = 0.0):
        defaults = dict(lr=lr, damping=damping, normalize=normalize, order=order, weight_decay=weight_decay)
        super().__init__(model, defaults)

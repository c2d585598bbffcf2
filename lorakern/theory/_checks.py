"""Argument validation shared by lorakern.theory: every error names the argument and the range it must lie in."""
from __future__ import annotations

import math
import numbers
import operator

import torch


def check_int(value: object, name: str, low: int | None = None, high: int | None = None,
              high_desc: str | None = None) -> int:
    """An integer (Python int, numpy integer or 0-d integer tensor; not bool) with low <= value <= high."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "" if low is None else f"{low} <= "
        hi = "" if high is None else f" <= {high_desc or high}"
        raise ValueError(f"{name}={value} must satisfy {lo}{name}{hi}")
    return value


def check_real(value: object, name: str, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, allow_inf: bool = False, why: str = "") -> float:
    """A real number (int, float, numpy scalar or 0-d tensor; not bool) in the given interval."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{name} {'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{name} {'<' if high_open else '<='} {high}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise ValueError(f"{name} must satisfy {rng}, got {value}{why}")
    return value


def as_float64(values: object, name: str) -> torch.Tensor:
    """Any real array-like (tensor, numpy array, list) as a float64 CPU tensor; TypeError for anything else."""
    if isinstance(values, torch.Tensor):
        if values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {values.dtype}")
        return values.detach().to(device="cpu", dtype=torch.float64)
    if isinstance(values, (str, bytes)) or isinstance(values, bool):
        raise TypeError(f"{name} must be a tensor or a sequence of real numbers, got {type(values).__name__}")
    try:
        out = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor or a sequence of real numbers, got "
                        f"{type(values).__name__}: {err}") from None
    return out


def check_singular_values(values: object, name: str = "singular_values") -> torch.Tensor:
    """A non-empty 1-D vector of finite, non-negative numbers, as float64 (order kept)."""
    s = as_float64(values, name)
    if s.dim() != 1:
        hint = " (for a matrix W pass torch.linalg.svdvals(W))" if s.dim() == 2 else ""
        raise ValueError(f"{name} must be 1-D, got shape {tuple(s.shape)}{hint}")
    if s.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} must be finite, got NaN or Inf")
    if (s < 0).any():
        raise ValueError(f"{name} must be non-negative, got min {s.min().item():g}")
    return s


def as_times(t: object, name: str = "t") -> tuple[torch.Tensor, bool]:
    """Times t >= 0 (t = inf allowed: the limit) as float64; also says whether t was a scalar."""
    scalar = not isinstance(t, torch.Tensor) and isinstance(t, numbers.Real) and not isinstance(t, bool)
    if scalar:
        return torch.tensor(check_real(t, name, low=0.0, allow_inf=True), dtype=torch.float64), True
    tt = as_float64(t, name)
    if torch.isnan(tt).any() or (tt < 0).any():
        raise ValueError(f"{name} must be >= 0 (inf allowed), got min {tt.min().item():g} or NaN")
    return tt, False

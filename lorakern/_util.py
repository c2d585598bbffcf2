"""Small helpers shared by the ops, the optimizers and the CLI: one copy of each."""
from __future__ import annotations

import contextlib
import math

import torch


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (cuda:1 tensors on cuda:0 fail)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum), in plain ints (triton.next_power_of_2 is a jit-callable
    that costs ~5 us per host call)."""
    return max(int(minimum), 1 << max(int(n) - 1, 0).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv is a jit-callable: microseconds per host call)."""
    return -(-a // b)


def check_number(value: object, name: str, low: float, high: float | None = None, *, high_open: bool = False,
                 low_open: bool = False) -> float:
    """value as a finite float in the given range; TypeError (not a number) or ValueError (out of range)
    naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    bad = (not math.isfinite(value) or value < low or (low_open and value == low)
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
        lower = f"> {low}" if low_open else f">= {low}"
        upper = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"{name} must be a finite number {lower}{upper}, got {value}")
    return value


def gpu_arch(device: torch.device) -> str:
    """'sm_90' for an H100, 'cpu' for the CPU (the interpreter): the dispatch table's architecture key."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"

"""Which implementations exist on this machine, and which one the LoRA ops use.

"auto" picks the fastest correct path for the device: the C++ extension on the CPU (plain torch when it is
not built), torch/cuBLAS on CUDA until the Triton kernels land. "torch" forces the pure-PyTorch reference.
The choice comes from `set_backend` or, at first use, the environment variable LORAKERN_BACKEND.
"""
from __future__ import annotations

import os

import torch

BACKEND_NAMES = ("auto", "torch", "triton")

try:  # the compiled extension; importing it registers torch.ops.lorakern.*
    from lorakern import _C  # type: ignore[attr-defined]
except ImportError as _exc:  # a source checkout that was never built: the torch path still works
    _C = None
    _C_IMPORT_ERROR: ImportError | None = _exc
else:
    _C_IMPORT_ERROR = None

_backend: str | None = None  # resolved lazily so LORAKERN_BACKEND can be set after import


def backends() -> dict[str, bool]:
    """Availability of each implementation, e.g. {"torch": True, "triton": False, "cpp": True, "cuda_ext": False}.

    "triton" is True only where lorakern's Triton kernels can run (they are not part of this release yet).
    """
    return {
        "torch": True,
        "triton": False,
        "cpp": _C is not None,
        "cuda_ext": bool(_C is not None and getattr(_C, "with_cuda", False)),
    }


def _validate(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")
    name = name.lower()
    if name == "triton" and not backends()["triton"]:
        raise RuntimeError(f"{source}='triton': lorakern's Triton kernels are not available in this build; "
                           f"available backends: {backends()}")
    return name


def set_backend(name: str) -> None:
    """Select "auto", "torch" or "triton" for every LoRA op that runs afterwards."""
    global _backend
    _backend = _validate(name, "backend")


def get_backend() -> str:
    global _backend
    if _backend is None:
        _backend = _validate(os.environ.get("LORAKERN_BACKEND", "auto"), "LORAKERN_BACKEND")
    return _backend


def resolve(device: torch.device) -> str:
    """The implementation the ops use on `device`: "cpp" or "torch"."""
    if get_backend() == "auto" and device.type == "cpu" and _C is not None:
        return "cpp"
    return "torch"

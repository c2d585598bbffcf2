"""Which implementations exist on this machine, and which one the LoRA ops use.

"auto" picks the fastest correct path for the device: the C++ extension on the CPU (plain torch when it is
not built), the Triton kernels on CUDA. "torch" forces the pure-PyTorch reference; "triton" forces the
kernels, which on the CPU needs TRITON_INTERPRET=1 in the environment before triton is first imported
(that is how CI tests them; tests/conftest.py sets it). The choice comes from `set_backend` or, at first
use, the environment variable LORAKERN_BACKEND.
"""
from __future__ import annotations

import functools
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

_backend: str | None = None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def _check_triton() -> str | None:
    """Why the Triton kernels cannot run here, or None when they can."""
    if _triton_import_error() is not None:
        return _triton_import_error()
    if not torch.cuda.is_available() and not interpreting():
        return ("no CUDA device; on the CPU the kernels run only under the interpreter: "
                "set TRITON_INTERPRET=1 before triton is first imported")
    return None  # resolved lazily so LORAKERN_BACKEND can be set after import


def backends() -> dict[str, bool]:
    """Availability of each implementation, e.g. {"torch": True, "triton": False, "cpp": True, "cuda_ext": False}.

    "triton" is True where lorakern's Triton kernels can run: a CUDA device, or the CPU interpreter.
    """
    return {
        "torch": True,
        "triton": _check_triton() is None,
        "cpp": _C is not None,
        "cuda_ext": bool(_C is not None and getattr(_C, "with_cuda", False)),
    }


def _validate(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")
    name = name.lower()
    if name == "triton" and not backends()["triton"]:
        raise RuntimeError(f"{source}='triton': lorakern's Triton kernels cannot run here: {_check_triton()}; "
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
    """The implementation the ops use on `device`: "triton", "cpp" or "torch"."""
    name = get_backend()
    if name == "torch":
        return "torch"
    if name == "triton":
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return "triton"
        return "torch"  # e.g. MPS: no Triton there
    if device.type == "cpu":
        return "cpp" if _C is not None else "torch"
    if device.type == "cuda" and _check_triton() is None:
        return "triton"
    return "torch"

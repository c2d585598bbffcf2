"""Which implementations exist on this machine, and which one the LoRA ops use.

"auto" picks the fastest correct path for the device: the C++ extension on the CPU (plain torch when it is
not built); on CUDA the design measured fastest for the layer's case (lorakern.ops.dispatch: the cuBLAS
path unless a measurement says otherwise). "torch" forces the pure-PyTorch reference; "triton" forces the
kernels, which on the CPU needs TRITON_INTERPRET=1 in the environment before triton is first imported
(that is how CI tests them; tests/conftest.py sets it).

Settings are resolved once into one object (`settings()`): the backend (`set_backend` or, at first use,
LORAKERN_BACKEND) and the design (`set_design` or LORAKERN_DESIGN; the older LORAKERN_BASE_GEMM=cublas|triton
still means hybrid|fused). Nothing reads the environment on the hot path.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch

BACKEND_NAMES = ("auto", "torch", "triton")
# How a CUDA layer runs (lorakern.ops.dispatch): "cublas" = torch GEMMs + the LoRA terms as small GEMMs,
# "hybrid" = cuBLAS base GEMM + Triton rank-r passes, "fused" = the Triton GEMM with the rank-r term fused;
# "auto" = the measured choice.
DESIGN_NAMES = ("auto", "cublas", "hybrid", "fused")
_LEGACY_BASE_GEMM = {"cublas": "hybrid", "triton": "fused"}

try:  # the compiled extension; importing it registers torch.ops.lorakern.*
    from lorakern import _C  # type: ignore[attr-defined]
except ImportError as _exc:  # a source checkout that was never built: the torch path still works
    _C = None
    _C_IMPORT_ERROR: ImportError | None = _exc
else:
    _C_IMPORT_ERROR = None

@dataclasses.dataclass(frozen=True)
class Settings:
    backend: str  # one of BACKEND_NAMES
    design: str   # one of DESIGN_NAMES


_settings: Settings | None = None


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


def _validate_design(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in DESIGN_NAMES:
        raise ValueError(f"{source} must be one of {DESIGN_NAMES}, got {name!r}")
    return name.lower()


def _from_environment() -> Settings:
    backend = _validate(os.environ.get("LORAKERN_BACKEND", "auto"), "LORAKERN_BACKEND")
    design = os.environ.get("LORAKERN_DESIGN")
    if design is None and "LORAKERN_BASE_GEMM" in os.environ:
        legacy = os.environ["LORAKERN_BASE_GEMM"].lower()
        if legacy not in _LEGACY_BASE_GEMM:
            raise ValueError(f"LORAKERN_BASE_GEMM must be one of {tuple(_LEGACY_BASE_GEMM)}, got {legacy!r} "
                             f"(prefer LORAKERN_DESIGN, one of {DESIGN_NAMES})")
        design = _LEGACY_BASE_GEMM[legacy]
    return Settings(backend, _validate_design(design or "auto", "LORAKERN_DESIGN"))


def settings() -> Settings:
    """The settings in force, resolved from the environment at first use."""
    global _settings
    if _settings is None:
        _settings = _from_environment()
    return _settings


def set_backend(name: str) -> None:
    """Select "auto", "torch" or "triton" for every LoRA op that runs afterwards."""
    global _settings
    _settings = dataclasses.replace(settings(), backend=_validate(name, "backend"))


def get_backend() -> str:
    return settings().backend


def set_design(name: str) -> None:
    """Select how CUDA layers run: "auto" (measured dispatch), "cublas", "hybrid" or "fused". With the "triton"
    backend, "auto" and "cublas" mean "fused" (the kernels are what was asked for)."""
    global _settings
    _settings = dataclasses.replace(settings(), design=_validate_design(name, "design"))


def get_design() -> str:
    return settings().design


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

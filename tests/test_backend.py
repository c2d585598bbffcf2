import pytest
import torch

import lorakern as lk
from lorakern import _backend


def test_backends_report():
    info = lk.backends()
    assert set(info) == {"torch", "triton", "cpp", "cuda_ext"}
    assert info["torch"] is True and info["cpp"] is True
    if torch.version.cuda is None:  # a CPU torch never builds the CUDA sources
        assert info["cuda_ext"] is False
    assert info["cuda_ext"] is bool(getattr(_backend._C, "with_cuda", False))


def test_set_backend_selects_the_cpu_path():
    lk.set_backend("torch")
    assert lk.get_backend() == "torch" and _backend.resolve(torch.device("cpu")) == "torch"
    lk.set_backend("AUTO")
    assert lk.get_backend() == "auto" and _backend.resolve(torch.device("cpu")) == "cpp"


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.set_backend("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's rule for forcing triton")
def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert lk.backends()["triton"] is False
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lk.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lk.set_backend("triton")
    assert _backend.resolve(torch.device("cpu")) == "triton"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", "torch")
    _backend._settings = None
    assert lk.get_backend() == "torch"
    monkeypatch.setenv("LORAKERN_BACKEND", "fast")
    _backend._settings = None
    with pytest.raises(ValueError, match="LORAKERN_BACKEND must be one of"):
        lk.get_backend()

"""Every real launch reuses what the compile-before-first-launch step compiled: the same Triton
specialization (argument dtypes, int arguments == 1 / divisible by 16, 16-byte alignment), for any token
count. Otherwise a GPU compiles twice, and a compile at launch time (in backward, or inside a CUDA-graph
capture) escapes the fallback. Checked on the CPU with Triton's own specialization function for CUDA."""
import importlib

import pytest
import torch

import lorakern as lk

ops = importlib.import_module("lorakern.ops.lora_linear")
native = pytest.importorskip("triton._C.libtriton")
if not hasattr(native, "native_specialize_impl") or not lk.backends()["triton"]:
    pytest.skip("needs the interpreter and triton's native_specialize_impl (triton >= 3.4)", allow_module_level=True)
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402


def _spec(value):
    try:
        return native.native_specialize_impl(CUDABackend, value, False, True, True)
    except TypeError:  # a constexpr (str, bool) or a dtype
        return ("const", value)


@pytest.fixture
def recorder(monkeypatch):
    """Records, per kernel, the specialization of every compile-only call and of every real launch."""
    from lorakern.ops import lora_linear_triton as kt
    log = []
    real = kt._run

    def run(name, kernel, grid, cfg, compile_only, **kwargs):
        skip = set(getattr(kernel, "do_not_specialize", ()) or ()) | set(
            getattr(getattr(kernel, "rewriter", None), "kwargs", {}).get("do_not_specialize") or ())
        names = [kernel.arg_names[i] if isinstance(i, int) else i for i in skip]
        full = dict(kwargs, **cfg)
        log.append((name, compile_only, tuple(sorted((k, "any" if k in names else _spec(v))
                                                    for k, v in full.items()))))
        return real(name, kernel, grid, cfg, compile_only, **kwargs)
    monkeypatch.setattr(kt, "_run", run)
    monkeypatch.setattr(kt, "_compiled", set())
    return log


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("design", ["fused", "hybrid"])
def test_launches_match_the_precompiled_variants_across_token_counts(recorder, p, design):
    lk.set_backend("triton")
    lk.set_design(design)
    K, N, r = 48, 32, 4
    W, b = torch.randn(N, K), torch.randn(N)
    A = torch.randn(r, K, requires_grad=True)
    B = torch.randn(N, r, requires_grad=True)
    for M in (16, 32, 48, 1, 17, 272):  # S = 1, 16 | S, S == 1 via M == 1 ...: one binary each kernel
        x = torch.randn(M, K, requires_grad=True)
        y = ops.lora_linear(x, W, b, A, B, 0.5, p)
        y.backward(torch.randn_like(y))
    compiled = {(n, s) for n, c, s in recorder if c}
    launched = {(n, s) for n, c, s in recorder if not c}
    assert launched and launched <= compiled, sorted(launched - compiled)[:2]
    assert {n for n, _ in launched} == {"xa", "gemm_fwd", "dy", "gemm_bwd", "reduce"}
    assert len(compiled) == len({n for n, _ in compiled})  # one variant per kernel for every M

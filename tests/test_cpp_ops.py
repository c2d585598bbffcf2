"""The C++ operators torch.ops.lorakern.* (csrc/lora_cpu.cpp) against torch and float64; the CMake build."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import lorakern as lk
from lorakern.ops.lora_linear import _backward_torch, _forward_torch
from conftest import TOL, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def operands(M, in_f, out_f, r, dtype, adt=None, bias=True):
    adt = adt or dtype
    x = torch.randn(M, in_f, dtype=dtype)
    return (x, torch.randn(out_f, in_f, dtype=dtype) / in_f ** 0.5,
            torch.randn(out_f, dtype=dtype) if bias else None, x,
            torch.randn(r, in_f, dtype=adt), torch.randn(out_f, r, dtype=adt))


def test_extension_is_built():
    assert lk.backends()["cpp"], "lorakern._C failed to import"
    assert hasattr(torch.ops.lorakern, "lora_forward")


@pytest.mark.parametrize("dtype, adt", [(torch.float32, None), (torch.bfloat16, None),
                                        (torch.bfloat16, torch.float32), (torch.float64, None)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_torch_and_float64(dtype, adt, bias):
    x, W, b, xl, A, B = operands(29, 53, 37, 5, dtype, adt, bias)
    y, xa = torch.ops.lorakern.lora_forward(x, W, b, xl, A, B, 0.7)
    y_t, xa_t = _forward_torch(x, W, b, xl, A, B, 0.7)
    d = [t.double() if t is not None else None for t in (x, W, b, A, B)]
    ref = d[0] @ d[1].T + 0.7 * (d[0] @ d[3].T) @ d[4].T + (d[2] if bias else 0)
    assert y.dtype == dtype and xa.dtype == A.dtype
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(y, y_t) < TOL[dtype]
    assert rel_err(xa, d[0] @ d[3].T) < TOL[A.dtype]


@pytest.mark.parametrize("dtype, adt", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_backward_matches_torch_with_mask(dtype, adt):
    M, in_f, out_f, r = 17, 23, 31, 4
    x, W, _, _, A, B = operands(M, in_f, out_f, r, dtype, adt)
    keep = torch.rand(M, in_f) > 0.3
    mask = keep.to(A.dtype) / 0.7
    xl = (x * mask).to(dtype)
    xa = xl.to(A.dtype) @ A.T
    gy = torch.randn(M, out_f, dtype=dtype)
    got = torch.ops.lorakern.lora_backward(gy, xl, xa, W, A, B, 1.5, mask, True, True, True)
    want = _backward_torch(gy, xl, xa, W, A, B, 1.5, mask, True, True, True)
    G, X, XL, WW, AA, BB = (t.double() for t in (gy, x, xl, W, A, B))
    ref_dx = G @ WW + (1.5 * G @ BB @ AA) * mask.double()
    ref_dA = 1.5 * (G @ BB).T @ XL
    ref_dB = 1.5 * G.T @ (XL @ AA.T)
    for g, w, ref in zip(got, want, (ref_dx, ref_dA, ref_dB)):
        assert rel_err(g, ref) < TOL[g.dtype]
        assert rel_err(g, w) < TOL[g.dtype]


def test_backward_skips_unneeded_gradients():
    x, W, _, xl, A, B = operands(5, 8, 6, 2, torch.float32)
    gy = torch.randn(5, 6)
    dx, dA, dB = torch.ops.lorakern.lora_backward(gy, xl, xl @ A.T, W, A, B, 1.0, None, False, True, False)
    assert dx is None and dB is None and dA.shape == A.shape


@pytest.mark.parametrize("change, exc, match", [
    (dict(x=torch.randn(5, 9)), ValueError, "x has 9 features"),
    (dict(A=torch.randn(2, 9)), ValueError, "lora_A shape"),
    (dict(B=torch.randn(6, 3)), ValueError, "lora_B shape"),
    (dict(b=torch.randn(7)), ValueError, "bias shape"),
    (dict(W=torch.randn(6, 8, dtype=torch.float64)), TypeError, "dtype"),
])
def test_forward_rejects_bad_shapes_and_dtypes(change, exc, match):
    x, W, b, _, A, B = operands(5, 8, 6, 2, torch.float32)
    args = dict(x=x, W=W, b=b, A=A, B=B) | change
    with pytest.raises(exc, match=match):
        torch.ops.lorakern.lora_forward(args["x"], args["W"], args["b"], args["x"], args["A"], args["B"], 1.0)


def test_cmake_builds_the_same_extension(tmp_path):
    """CMakeLists.txt configures against this torch, builds _C, and the built module computes lora_forward."""
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    cmake = shutil.which("cmake", path=env["PATH"])
    assert cmake, "cmake not found (requirements-dev.txt installs it)"
    gen = ["-G", "Ninja"] if shutil.which("ninja", path=env["PATH"]) else []
    build = tmp_path / "build"
    for cmd in ([cmake, "-S", ROOT, "-B", str(build), *gen, f"-DPython3_EXECUTABLE={sys.executable}"],
                [cmake, "--build", str(build), "-j", "2"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [so] = [p for p in build.iterdir() if p.name.startswith("_C") and p.suffix == ".so"]
    # A fresh interpreter: the ops must not be registered twice (lorakern._C is not imported there).
    check = textwrap.dedent(f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location("_C", {str(so)!r})
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        x, W, b = torch.randn(6, 10), torch.randn(4, 10), torch.randn(4)
        A, B = torch.randn(3, 10), torch.randn(4, 3)
        y, xa = torch.ops.lorakern.lora_forward(x, W, b, x, A, B, 0.5)
        ref = x @ W.T + b + 0.5 * (x @ A.T) @ B.T
        assert (y - ref).norm() / ref.norm() < 1e-5, (y - ref).norm()
        print("ok", mod.with_cuda)
    """)
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok False" in proc.stdout, proc.stderr[-3000:]

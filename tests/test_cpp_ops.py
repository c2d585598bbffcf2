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


# -- sketch_accumulate_ (csrc/capture.cpp): the one-pass sketches of G = dy^T x ---------------------------------
def sketch_operands(M, in_f, out_f, k, s, l, dtype, adjacent=True, transposed=False):
    g = torch.Generator().manual_seed(M + in_f)
    if transposed:  # non-contiguous x and dy: transposes of (in, M), (out, M) tensors
        x = torch.randn(in_f, M, generator=g).to(dtype).T
        dy = torch.randn(out_f, M, generator=g).to(dtype).T
    else:
        x, dy = torch.randn(M, in_f, generator=g).to(dtype), torch.randn(M, out_f, generator=g).to(dtype)
    if adjacent:  # [omega | theta] and [psi | phi] in one buffer each, as lorakern.spectral lays them out
        pin, pout = torch.randn(in_f, k + s, generator=g), torch.randn(out_f, l + s, generator=g)
        probes = (pin[:, :k], pin[:, k:], pout[:, :l], pout[:, l:])
    else:
        probes = (torch.randn(in_f, k, generator=g), torch.randn(s, in_f, generator=g).T,
                  torch.randn(out_f, l, generator=g), torch.randn(out_f, s, generator=g))
    return x, dy, probes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("adjacent, transposed", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_sketch_accumulate_matches_float64(dtype, adjacent, transposed, acc_dtype):
    M, in_f, out_f, k, s, l = 37, 23, 19, 5, 11, 6
    x, dy, (om, th, ps, ph) = sketch_operands(M, in_f, out_f, k, s, l, dtype, adjacent, transposed)
    Y, W, Z = (torch.full(shape, 0.25, dtype=acc_dtype) for shape in ((out_f, k), (l, in_f), (s, s)))
    torch.ops.lorakern.sketch_accumulate_(Y, W, Z, x, dy, om, th, ps, ph)
    G = dy.double().T @ x.double()  # the operands as given (bf16 values exactly), products in fp64
    tol = 1e-12 if acc_dtype == torch.float64 else 1e-6
    assert rel_err(Y, G @ om.double() + 0.25) < tol
    assert rel_err(W, ps.double().T @ G + 0.25) < tol
    assert rel_err(Z, ph.double().T @ G @ th.double() + 0.25) < tol


def test_sketch_accumulate_torch_fallback_and_row_blocks_agree():
    from lorakern.capture import _sketch_accumulate_torch
    x, dy, probes = sketch_operands(300, 17, 13, 4, 9, 5, torch.bfloat16)
    cpp = [torch.zeros(13, 4), torch.zeros(5, 17), torch.zeros(9, 9)]
    ref = [t.clone() for t in cpp]
    torch.ops.lorakern.sketch_accumulate_(*cpp, x, dy, *probes)
    _sketch_accumulate_torch(*ref, x, dy, *probes, block=64)  # 300 rows in 5 blocks
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(cpp, ref))


@pytest.mark.parametrize("change, exc, match", [
    (dict(dy=torch.randn(8, 6)), ValueError, r"x \[7, 5\] and dy \[8, 6\] must have the same number of rows"),
    (dict(omega=torch.randn(4, 3)), ValueError, r"omega \[4, 3\] and theta \[5, 4\] must have in = 5 rows"),
    (dict(phi=torch.randn(6, 2)), ValueError, r"theta \[5, 4\] and phi \[6, 2\] must have the same number"),
    (dict(Y=torch.zeros(6, 2)), ValueError, r"Y \[6, 2\] must be \(out, k\) = \(6, 3\)"),
    (dict(W=torch.zeros(2, 5)), ValueError, r"W \[2, 5\] must be \(l, in\) = \(3, 5\)"),
    (dict(Z=torch.zeros(3, 3)), ValueError, r"Z \[3, 3\] must be \(s, s\) = \(4, 4\)"),
    (dict(x=torch.randn(7)), ValueError, "must be 2-D"),
    (dict(Y=torch.zeros(6, 3, dtype=torch.bfloat16)), TypeError, "float32 or float64"),
])
def test_sketch_accumulate_rejects_bad_shapes(change, exc, match):
    args = dict(Y=torch.zeros(6, 3), W=torch.zeros(3, 5), Z=torch.zeros(4, 4), x=torch.randn(7, 5),
                dy=torch.randn(7, 6), omega=torch.randn(5, 3), theta=torch.randn(5, 4), psi=torch.randn(6, 3),
                phi=torch.randn(6, 4)) | change
    with pytest.raises(exc, match=match):
        torch.ops.lorakern.sketch_accumulate_(*args.values())

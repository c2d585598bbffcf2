"""lorakern.small_linalg and the ops behind it (csrc/small_linalg.cpp; csrc/cuda/small_linalg.cu on a GPU) against
float64: Cholesky, Cholesky inverse, triangular solves, Jacobi eigh, psd_inverse.

Bounds (relative Frobenius errors against a float64 reference computed from the same rounded input, so only the
algorithm's error is measured): float64 1e-12; float32 1e-5 (conftest.TOL) for the factor, the solves and eigh
(Jacobi runs in float64: fp32 results are rounded float64 ones, ~1e-7), and for the inverses at condition
numbers <= ~10 (an inverse's error is ~cond(A) eps k). Ill-conditioned and singular inputs are checked by
backward errors (residuals), which do not grow with the condition number. Sizes sample 1..256."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import lorakern as lk
from lorakern import small_linalg as sl
from conftest import TOL, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (1, 2, 3, 7, 16, 31, 64, 129, 256)
EIGH_SIZES = (1, 2, 3, 7, 16, 31, 64, 129)  # Jacobi at 256 costs ~0.5 s per matrix on the CPU: one case below
DTYPES = (torch.float32, torch.float64)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _needs_extension():
    if not lk.backends()["cpp"] or not hasattr(torch.ops.lorakern, "batched_cholesky_"):
        pytest.fail("the C++ extension lorakern._C (with the small_linalg ops) is not built")


def spd(n, k, shift=0.1, device="cpu", dtype=torch.float64):
    X = torch.randn(n, k, k + 4, dtype=torch.float64)
    return (X @ X.mT / (k + 4) + shift * torch.eye(k, dtype=torch.float64)).to(device, dtype)


def sym(n, k, device="cpu", dtype=torch.float64):
    X = torch.randn(n, k, k, dtype=torch.float64)
    return (X + X.mT).to(device, dtype)


def with_spectrum(k, eigenvalues):
    Q, _ = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64))
    return ((Q * eigenvalues) @ Q.T)[None]


def poison(mats, sizes):
    """A copy whose strict upper triangle and padding are NaN: the ops must read neither."""
    out = mats.clone()
    k = mats.shape[-1]
    upper = torch.ones(k, k, dtype=torch.bool).triu(1).to(mats.device)
    out[:, upper] = math.nan
    for i, s in enumerate(sizes):
        out[i, s:, :] = math.nan
        out[i, :, s:] = math.nan
    return out


def eigh_errors(A, w, V):
    """(eigenvalue error, reconstruction error, orthogonality / sqrt(k)) of one k x k matrix in float64."""
    A, w, V = A.double(), w.double(), V.double()
    ref = torch.linalg.eigvalsh(A)
    k = A.shape[-1]
    return (rel_err(w, ref), rel_err(V @ torch.diag(w) @ V.T, A),
            (V.T @ V - torch.eye(k, dtype=torch.float64)).norm().item() / math.sqrt(k))


# ---------------------------------------------------------------------------------------------------------------
# Against float64, CPU extension and torch fallback
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ext", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", SIZES)
def test_cholesky_and_solves_match_float64(k, dtype, impl):
    A = spd(2, k, dtype=dtype)
    L, info = sl.cholesky_ex(A, impl=impl)
    L64 = torch.linalg.cholesky(A.double())
    assert info.tolist() == [0, 0] and L.dtype == dtype
    assert rel_err(L, L64) < TOL[dtype] and bool((L.triu(1) == 0).all())
    B = torch.randn(2, k, 5, dtype=torch.float64).to(dtype)
    for upper, transpose in [(False, False), (False, True), (True, False), (True, True)]:
        T = L.mT.contiguous() if upper else L  # the same triangle seen as upper
        X = sl.solve_triangular(T, B, upper=upper, transpose=transpose, impl=impl)
        op = T.double().mT if transpose else T.double()
        ref = torch.linalg.solve_triangular(op, B.double(), upper=upper != transpose)
        assert rel_err(X, ref) < TOL[dtype], (upper, transpose)


@pytest.mark.parametrize("impl", ["ext", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", SIZES)
def test_cholesky_inverse_matches_float64(k, dtype, impl):
    A = spd(2, k, shift=1.0, dtype=dtype)  # cond <= ~10
    P, info = sl.cholesky_inverse(A, impl=impl)
    assert info.tolist() == [0, 0]
    assert rel_err(P, torch.linalg.inv(A.double())) < TOL[dtype]
    assert torch.equal(P, P.mT)


@pytest.mark.parametrize("impl", ["ext", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", EIGH_SIZES)
def test_eigh_matches_float64(k, dtype, impl):
    A = sym(2, k, dtype=dtype)
    w, V, info = sl.eigh(A, impl=impl)
    assert info.tolist() == [0, 0] and w.dtype == V.dtype == dtype
    assert bool((w[:, 1:] >= w[:, :-1]).all())  # ascending
    for i in range(2):
        assert max(eigh_errors(A[i], w[i], V[i])) < TOL[dtype]


def test_eigh_order_256_float64():
    A = sym(1, 256)
    w, V, info = sl.eigh(A, impl="ext")
    assert info.item() == 0 and max(eigh_errors(A[0], w[0], V[0])) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Ill-conditioned, singular, non-finite
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_ill_conditioned_backward_errors(dtype):
    k = 48
    cond = 1e5 if dtype == torch.float32 else 1e12
    A = with_spectrum(k, torch.logspace(-math.log10(cond), 0, k, dtype=torch.float64)).to(dtype)
    L, info = sl.cholesky_ex(A, impl="ext")
    assert info.item() == 0
    assert rel_err(L.double() @ L.double().mT, A.double()) < TOL[dtype]  # backward stable whatever cond(A)
    w, V, info = sl.eigh(A, impl="ext")
    assert info.item() == 0
    _, recon, orth = eigh_errors(A[0], w[0], V[0])
    assert recon < TOL[dtype] and orth < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_failed_cholesky_is_flagged_per_matrix(dtype):
    k = 6
    good = spd(1, k)[0]
    zero_pivot = good.clone()
    zero_pivot[3, :] = 0
    zero_pivot[:, 3] = 0  # exactly singular: pivot 3 is 0
    indefinite = -torch.eye(k, dtype=torch.float64)
    nan = good.clone()
    nan[0, 0] = math.nan
    A = torch.stack([good, zero_pivot, indefinite, nan]).to(dtype)
    for impl in ("ext", "torch"):
        _, info = sl.cholesky_ex(A, impl=impl)
        assert info.tolist() == [0, 4, 1, 1], impl
        _, info = sl.cholesky_inverse(A, impl=impl)
        assert info.tolist() == [0, 4, 1, 1], impl


@pytest.mark.parametrize("impl", ["ext", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_psd_inverse_singular_grams_give_the_pseudo_inverse(dtype, impl):
    k = 16
    X = torch.randn(k, 3, dtype=torch.float64)
    rank3 = X @ X.T
    grams = torch.stack([spd(1, k)[0], rank3, torch.zeros(k, k, dtype=torch.float64)]).to(dtype)
    P, info = sl.psd_inverse(grams, impl=impl)
    assert info[0].item() == 0 and info[2].item() != 0  # the zero Gram fails at pivot 1
    assert bool(torch.isfinite(P).all())
    assert rel_err(P[0], torch.linalg.inv(grams[0].double())) < TOL[dtype] * 10
    ref = torch.linalg.pinv(grams[1].double(), hermitian=True, rtol=1e-6)
    assert rel_err(P[1], ref) < (1e-3 if dtype == torch.float32 else 1e-8)  # pinv of a rounded rank-3 Gram
    assert bool((P[2] == 0).all())
    damped, info = sl.psd_inverse(grams, damping=0.5, impl=impl)
    assert info.tolist() == [0, 0, 0]
    eye = torch.eye(k, dtype=torch.float64)
    assert rel_err(damped, torch.linalg.inv(grams.double() + 0.5 * eye)) < TOL[dtype]


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_non_finite_inputs_give_nan_and_info(impl):
    A = sym(3, 5)
    A[1, 2, 1] = math.inf
    w, V, info = sl.eigh(A, impl=impl)
    assert info.tolist() == [0, 2, 0]
    assert bool(torch.isnan(w[1]).all() and torch.isnan(V[1]).all())
    assert bool(torch.isfinite(w[[0, 2]]).all())
    G = spd(2, 4)
    G[1, 3, 0] = math.nan
    P, _ = sl.psd_inverse(G, impl=impl)
    assert bool(torch.isnan(P[1]).all()) and bool(torch.isfinite(P[0]).all())


# ---------------------------------------------------------------------------------------------------------------
# Heterogeneous batches, layout, validation
# ---------------------------------------------------------------------------------------------------------------
HET = [1, 5, 16, 0, 3, 33, 7, 40]


@pytest.mark.parametrize("impl", ["ext", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_heterogeneous_batch_matches_per_matrix(dtype, impl):
    kmax = 40
    A = poison(spd(len(HET), kmax, shift=1.0, dtype=dtype), HET)
    S = poison(sym(len(HET), kmax, dtype=dtype), HET)
    L, info = sl.cholesky_ex(A, HET, impl=impl)
    P, info_inv = sl.cholesky_inverse(A, torch.tensor(HET), impl=impl)
    B = torch.randn(len(HET), kmax, 3, dtype=dtype)
    X = sl.solve_triangular(L, B, HET, transpose=True, impl=impl)
    w, V, info_eig = sl.eigh(S, HET, impl=impl)
    assert info.tolist() == info_inv.tolist() == info_eig.tolist() == [0] * len(HET)
    for i, k in enumerate(HET):
        Ai = A[i, :k, :k].double().tril()
        Ai = Ai + Ai.tril(-1).mT
        outside = torch.ones(kmax, kmax, dtype=torch.bool)
        outside[:k, :k] = False
        assert bool((L[i][outside] == 0).all() and (P[i][outside] == 0).all() and (V[i][outside] == 0).all())
        assert bool((w[i, k:] == 0).all()) and torch.equal(X[i, k:], B[i, k:])
        if k == 0:
            continue
        assert rel_err(L[i, :k, :k], torch.linalg.cholesky(Ai)) < TOL[dtype]
        assert rel_err(P[i, :k, :k], torch.linalg.inv(Ai)) < TOL[dtype]
        ref = torch.linalg.solve_triangular(L[i, :k, :k].double().mT, B[i, :k].double(), upper=True)
        assert rel_err(X[i, :k], ref) < TOL[dtype]
        Si = S[i, :k, :k].double().tril()
        Si = Si + Si.tril(-1).mT
        assert max(eigh_errors(Si, w[i, :k], V[i, :k, :k])) < TOL[dtype]


def test_non_contiguous_inputs():
    A = spd(3, 9)
    At = A.mT  # a transposed view: same matrices (symmetric), not contiguous
    info = torch.empty(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.lorakern.batched_cholesky_(At, None, info)
    L, _ = sl.cholesky_ex(At, impl="ext")  # the wrappers copy
    assert rel_err(L, torch.linalg.cholesky(A)) < 1e-12
    w, _, _ = sl.eigh(A[:, ::1, :].transpose(1, 2), impl="ext")
    assert rel_err(w, torch.linalg.eigvalsh(A)) < 1e-12
    X = sl.solve_triangular(L.mT, torch.randn(3, 2, 9).double().mT, upper=True, impl="ext")
    assert X.shape == (3, 9, 2)


def test_inputs_are_not_modified():
    A = spd(2, 7)
    before = A.clone()
    sl.cholesky_ex(A, impl="ext")
    sl.cholesky_inverse(A, impl="ext")
    sl.eigh(A, impl="ext")
    sl.psd_inverse(A, 1e-3, impl="ext")
    assert torch.equal(A, before)


def test_validation_errors_name_the_argument():
    A = spd(2, 4)
    with pytest.raises(ValueError, match="mats must have shape"):
        sl.cholesky_ex(A[0])
    with pytest.raises(TypeError, match="mats must be float32 or float64"):
        sl.eigh(A.to(torch.bfloat16))
    with pytest.raises(TypeError, match="mats must be a torch.Tensor"):
        sl.cholesky_inverse([[1.0]])
    with pytest.raises(ValueError, match="sizes has 3 entries"):
        sl.cholesky_ex(A, [1, 2, 3])
    with pytest.raises(ValueError, match="sizes must lie in"):
        sl.eigh(A, [1, 5])
    with pytest.raises(TypeError, match="sizes must be"):
        sl.eigh(A, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="rhs must have shape"):
        sl.solve_triangular(A, torch.randn(2, 3, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="rhs"):
        sl.solve_triangular(A, torch.randn(2, 4, 1))
    with pytest.raises(ValueError, match="impl must be one of"):
        sl.cholesky_ex(A, impl="cuda")
    with pytest.raises(ValueError, match="damping"):
        sl.psd_inverse(A, damping=-1.0)
    with pytest.raises(RuntimeError, match="kmax limit 256"):
        sl.cholesky_ex(spd(1, 257), impl="ext")


def test_op_checks():
    A = spd(2, 4)
    info = torch.empty(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="sizes\\[1\\] = 5"):
        torch.ops.lorakern.batched_cholesky_(A.clone(), torch.tensor([1, 5]), info)
    with pytest.raises(TypeError, match="info must be Int"):
        torch.ops.lorakern.batched_cholesky_(A.clone(), None, info.long())
    with pytest.raises(ValueError, match="exceeds 256"):
        torch.ops.lorakern.batched_cholesky_(torch.zeros(1, 257, 257), None, info[:1])
    with pytest.raises(ValueError, match="rhs must have shape"):
        torch.ops.lorakern.batched_triangular_solve_(A, torch.zeros(2, 3, 1, dtype=torch.float64), None, False, False)


def test_empty_batches():
    for impl in ("ext", "torch"):
        L, info = sl.cholesky_ex(torch.zeros(0, 5, 5), impl=impl)
        assert L.shape == (0, 5, 5) and info.shape == (0,)
        w, V, info = sl.eigh(torch.zeros(0, 5, 5), impl=impl)
        assert w.shape == (0, 5) and V.shape == (0, 5, 5)
        P, _ = sl.psd_inverse(torch.zeros(0, 5, 5), impl=impl)
        assert P.shape == (0, 5, 5)


# ---------------------------------------------------------------------------------------------------------------
# The per-device choice
# ---------------------------------------------------------------------------------------------------------------
def test_auto_uses_the_extension_only_where_measured(monkeypatch):
    monkeypatch.setattr(sl, "EXT_FASTER", {("cpu", "cholesky", torch.float64): (8, 32)})
    cpu = torch.device("cpu")
    assert sl.use_ext("cholesky", cpu, torch.float64, 32) and sl.use_ext("cholesky", cpu, torch.float64, 8)
    assert not sl.use_ext("cholesky", cpu, torch.float64, 33)
    assert not sl.use_ext("cholesky", cpu, torch.float64, 7)
    assert not sl.use_ext("cholesky", cpu, torch.float32, 8)
    assert not sl.use_ext("eigh", cpu, torch.float64, 8)
    assert sl.use_ext("eigh", cpu, torch.float64, 8, impl="ext")
    assert not sl.use_ext("cholesky", cpu, torch.float64, 8, impl="torch")


def test_cuda_kernels_are_not_used_before_a_gpu_measurement():
    # a ("cuda", op, dtype) entry comes only with a GPU run of benchmarks/small_linalg_bench.py (BENCHMARKS.md)
    assert all(device == "cpu" for device, _, _ in sl.EXT_FASTER)
    assert not sl.use_ext("cholesky", torch.device("cuda"), torch.float64, 16)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA kernels (a GPU and a CUDA build of the extension)
# ---------------------------------------------------------------------------------------------------------------
def _cuda_ext_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not sl.ext_available("cholesky", "cuda"):
        pytest.fail("CUDA is available but lorakern._C was built without csrc/cuda (LORAKERN_CUDA, setup.py)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_float64(dtype):
    _cuda_ext_or_skip()
    for k in SIZES:  # fp64 k >= 129 and fp32 k = 256 take the global-memory paths
        A = spd(3, k, shift=1.0, dtype=dtype, device="cuda")
        L, info = sl.cholesky_ex(A, impl="ext")
        assert info.tolist() == [0, 0, 0] and rel_err(L.cpu(), torch.linalg.cholesky(A.double().cpu())) < TOL[dtype]
        P, info = sl.cholesky_inverse(A, impl="ext")
        assert info.tolist() == [0, 0, 0] and rel_err(P.cpu(), torch.linalg.inv(A.double().cpu())) < TOL[dtype]
        B = torch.randn(3, k, 300, dtype=dtype, device="cuda")
        for upper, transpose in [(False, False), (False, True)]:
            X = sl.solve_triangular(L, B, upper=upper, transpose=transpose, impl="ext")
            op = L.double().mT if transpose else L.double()
            ref = torch.linalg.solve_triangular(op, B.double(), upper=transpose)
            assert rel_err(X, ref) < TOL[dtype], (k, transpose)
        S = sym(2, k, dtype=dtype, device="cuda")
        w, V, info = sl.eigh(S, impl="ext")
        assert info.tolist() == [0, 0], k
        for i in range(2):
            assert max(eigh_errors(S[i].cpu(), w[i].cpu(), V[i].cpu())) < TOL[dtype], k


@pytest.mark.gpu
def test_cuda_heterogeneous_batch_and_flags():
    _cuda_ext_or_skip()
    kmax = 40
    A = poison(spd(len(HET), kmax, shift=1.0), HET).cuda()
    S = poison(sym(len(HET), kmax), HET).cuda()
    for name, fn in (("cholesky_inverse", lambda impl: sl.cholesky_inverse(A, HET, impl=impl)[0]),
                     ("cholesky", lambda impl: sl.cholesky_ex(A, HET, impl=impl)[0]),
                     ("eigh", lambda impl: sl.eigh(S, HET, impl=impl)[0])):
        assert rel_err(fn("ext").cpu(), fn("torch").cpu()) < 1e-12, name
    bad = torch.stack([-torch.eye(4), torch.full((4, 4), math.nan)]).double().cuda()
    assert sl.cholesky_ex(bad, impl="ext")[1].tolist() == [1, 1]
    assert sl.eigh(bad, impl="ext")[2].tolist() == [0, 2]
    assert bool(torch.isfinite(sl.psd_inverse(torch.zeros(2, 8, 8, device="cuda"), impl="ext")[0]).all())


def test_benchmark_script_runs_and_writes_the_decision(tmp_path):
    """benchmarks/small_linalg_bench.py (the GPU session's command with --device cuda) end to end on the CPU."""
    out = tmp_path / "sl.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "small_linalg_bench.py"), "--quick", "--repeats", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["failed"] == 0 and {r["op"] for r in data["rows"]} == {
        "cholesky", "chol_inv", "solve", "solve_tall", "eigh", "psd_inverse"}
    assert all(r["ext_ms"] > 0 and r["torch_ms"] > 0 for r in data["rows"])
    assert set(data["ext_faster"]) == {f"cpu/{op}/{dt}" for op in ("cholesky", "cholesky_inverse",
                                                                   "solve_triangular", "eigh")
                                       for dt in ("fp32", "fp64")}

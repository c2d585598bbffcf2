"""The Triton kernels of lorakern/ops/lora_linear_triton.py against float64 (the interpreter on the CPU).

Shapes are odd and cross the interpreter's block edges (32x32x32 GEMM tiles, 16-row skinny passes, rank
chunks of 32 in the GEMM epilogue and 64 in the skinny passes).
"""
import copy
import importlib
import warnings

import pytest
import torch

import lorakern as lk
from conftest import TOL, randomize_adapter, rel_err
ops = importlib.import_module("lorakern.ops.lora_linear")  # the module (lorakern.ops.lora_linear is the function)

pytestmark = [pytest.mark.skipif(not lk.backends()["triton"], reason="Triton kernels cannot run here"),
              # a kernel that fails here would pass silently through the torch fallback: make it an error
              pytest.mark.filterwarnings("error:lorakern. Triton kernel")]


@pytest.fixture(autouse=True)
def _triton_backend():
    lk.set_backend("triton")


@pytest.fixture
def poison(monkeypatch):
    """Every tensor the kernels are meant to overwrite starts as NaN, so a skipped element shows."""
    from lorakern.ops import lora_linear_triton as kt

    def nan_empty(shape, **kw):
        dtype = kw.get("dtype", torch.get_default_dtype())
        return torch.full(shape, float("nan") if dtype.is_floating_point else -7, **kw)
    monkeypatch.setattr(kt, "_empty", nan_empty)


def _reference(x, W, b, A, B, s, dy, keep=None, p=0.0):
    """float64 y and (dx, dA, dB); keep is the dropout mask (1 keeps) or None."""
    X, Ad, Bd = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    xl = X if keep is None else X * keep.double() / (1 - p)
    y = X @ W.double().T + (0 if b is None else b.double()) + s * (xl @ Ad.T) @ Bd.T
    return (y.detach(), *torch.autograd.grad(y, (X, Ad, Bd), dy.double()))


def _check(y, grads, ref, tol):
    assert rel_err(y, ref[0]) < tol
    for g, r in zip(grads, ref[1:]):
        assert g is not None and torch.isfinite(g).all() and rel_err(g, r) < tol


CASES = [  # (x dtype, adapter dtype, M, in, out, r)
    (torch.float32, torch.float32, 37, 45, 29, 5),
    (torch.float32, torch.float32, 50, 70, 33, 40),    # two rank chunks in the GEMM epilogue
    (torch.bfloat16, torch.bfloat16, 37, 45, 29, 1),
    (torch.bfloat16, torch.float32, 33, 67, 70, 66),   # two rank chunks in the skinny passes too
    (torch.float16, torch.float16, 19, 33, 47, 7),
    (torch.float16, torch.float32, 19, 33, 47, 16),
    (torch.float32, torch.bfloat16, 21, 35, 18, 3),
]


@pytest.mark.parametrize("dtype, adt, M, n_in, n_out, r", CASES)
def test_matches_float64(poison, dtype, adt, M, n_in, n_out, r):
    x = torch.randn(M, n_in).to(dtype).requires_grad_(True)
    W, b = torch.randn(n_out, n_in).to(dtype), torch.randn(n_out).to(dtype)
    A = (torch.randn(r, n_in) * 0.3).to(adt).requires_grad_(True)
    B = (torch.randn(n_out, r) * 0.3).to(adt).requires_grad_(True)
    y = ops.lora_linear(x, W, b, A, B, 0.7)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert y.dtype == dtype and A.grad.dtype == adt and B.grad.dtype == adt
    tol = max(TOL[dtype], TOL[adt])
    _check(y, (x.grad, A.grad, B.grad), _reference(x, W, b, A, B, 0.7, dy), tol)


def test_3d_noncontiguous_inputs_no_bias(poison):
    base = torch.randn(45, 3, 11)  # x = base.transpose: (3, 11, 45) with last stride != 1
    x = base.permute(1, 2, 0).requires_grad_(True)
    Wt = torch.randn(45, 23)
    W = Wt.t()  # non-contiguous weight (23, 45)
    A = torch.randn(6, 45, requires_grad=True)
    Bt = torch.randn(6, 23)
    B = Bt.t().requires_grad_(True)  # non-contiguous leaf
    y = ops.lora_linear(x, W, None, A, B, 0.5)
    assert y.shape == (3, 11, 23)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = _reference(x.reshape(-1, 45), W, None, A, B, 0.5, dy.reshape(-1, 23))
    _check(y.reshape(-1, 23), (x.grad.reshape(-1, 45), A.grad, B.grad), ref, 1e-5)


@pytest.mark.parametrize("which", ["x", "A", "B"])
def test_only_the_needed_gradients(poison, which):
    """x without grad skips the dX GEMM (the dA-only launch); frozen A or B skip their own work."""
    x = torch.randn(29, 40, requires_grad=which != "x")
    W, b = torch.randn(17, 40), torch.randn(17)
    A = torch.randn(4, 40, requires_grad=which != "A")
    B = torch.randn(17, 4, requires_grad=which != "B")
    y = ops.lora_linear(x, W, b, A, B, 2.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = _reference(x, W, b, A, B, 2.0, dy)
    for t, r, name in zip((x, A, B), ref[1:], "xAB"):
        assert (t.grad is None) == (name == which)
        if t.grad is not None:
            assert rel_err(t.grad, r) < 1e-5


def test_unfrozen_base_weight_and_bias():
    layer = randomize_adapter(lk.LoRALinear(30, 21, r=3))
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 9, 30)
    dy = torch.randn(2, 9, 21)
    layer(x).backward(dy)
    lk.set_backend("torch")
    ref(x).backward(dy)
    for p, q in zip(layer.parameters(), ref.parameters()):
        assert p.grad is not None and rel_err(p.grad, q.grad) < 1e-5


def _dropout_mask(n_rows, n_in, p, seed):
    """The kernels' mask, read off a layer that passes drop(x) through: W = 0, A = B = I, s = 1, x = 1."""
    eye = torch.eye(n_in)
    y = ops.lora_linear(torch.ones(n_rows, n_in), torch.zeros(n_in, n_in), None, eye, eye, 1.0, p,
                        torch.Generator().manual_seed(seed))
    keep = y != 0
    assert torch.allclose(y[keep], torch.full_like(y[keep], 1 / (1 - p)))
    return keep


def test_dropout_same_mask_forward_and_backward(poison):
    p, seed = 0.3, 1234
    keep = _dropout_mask(41, 37, p, seed)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03  # 1517 Bernoulli draws: sd 0.012
    x = torch.randn(41, 37, requires_grad=True)
    W, b = torch.randn(26, 37), torch.randn(26)
    A = torch.randn(5, 37, requires_grad=True)
    B = torch.randn(26, 5, requires_grad=True)
    y = ops.lora_linear(x, W, b, A, B, 0.9, p, torch.Generator().manual_seed(seed))
    dy = torch.randn_like(y)
    y.backward(dy)
    _check(y, (x.grad, A.grad, B.grad), _reference(x, W, b, A, B, 0.9, dy, keep, p), 1e-5)


@pytest.mark.parametrize("xa_k, gemm_n", [(16, 256), (256, 16), (64, 128)])
def test_dropout_mask_independent_of_tiles(monkeypatch, xa_k, gemm_n):
    """Autotuning picks the x pass's BLOCK_K and the backward GEMM's BLOCK_N separately; the mask must be a
    function of (row, column) alone, or dA and dx would use another mask than the forward did."""
    from lorakern.ops import lora_linear_triton as kt
    p, seed, n_in = 0.4, 99, 300
    monkeypatch.setitem(kt.DEFAULT_CONFIGS, "xa", dict(kt.DEFAULT_CONFIGS["xa"], BLOCK_M=16, BLOCK_K=xa_k))
    keep = _dropout_mask(19, n_in, p, seed)
    monkeypatch.setitem(kt.DEFAULT_CONFIGS, "xa", dict(kt.DEFAULT_CONFIGS["xa"], BLOCK_M=16, BLOCK_K=32))
    monkeypatch.setitem(kt.DEFAULT_CONFIGS, "gemm_bwd", dict(BLOCK_M=16, BLOCK_N=gemm_n, BLOCK_K=32, GROUP_M=1,
                                                             num_warps=4, num_stages=3))
    x = torch.randn(19, n_in, requires_grad=True)
    W = torch.randn(21, n_in)
    A = torch.randn(3, n_in, requires_grad=True)
    B = torch.randn(21, 3, requires_grad=True)
    y = ops.lora_linear(x, W, None, A, B, 1.3, p, torch.Generator().manual_seed(seed))
    dy = torch.randn_like(y)
    y.backward(dy)
    _check(y, (x.grad, A.grad, B.grad), _reference(x, W, None, A, B, 1.3, dy, keep, p), 1e-5)


def test_fake_tensor_mode_runs_no_kernel():
    """Shape propagation (FakeTensorMode, make_fx) must reach the custom op's fake, not launch a kernel on
    tensors without storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    layer = randomize_adapter(lk.LoRALinear(30, 17, r=4))
    x = torch.randn(2, 9, 30)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx, fw, fb = mode.from_tensor(x), mode.from_tensor(layer.weight), mode.from_tensor(layer.bias)
        fa, fbb = mode.from_tensor(layer.lora_A), mode.from_tensor(layer.lora_B)
        y = ops.lora_linear(fx, fw, fb, fa, fbb, 0.5)
        assert y.shape == (2, 9, 17) and y.dtype == torch.float32
    x2, W, A, B = torch.randn(9, 30), torch.randn(17, 30), torch.randn(4, 30), torch.randn(17, 4)
    gm = make_fx(lambda a, w, la, lb: ops.lora_linear(a, w, None, la, lb, 0.5))(x2, W, A, B)
    assert any("triton_lora_forward" in str(n.target) for n in gm.graph.nodes)
    assert rel_err(gm(x2, W, A, B), _reference(x2, W, None, A, B, 0.5, torch.ones(9, 17))[0]) < 1e-5


def test_dropout_seeds_and_expectation():
    a = _dropout_mask(16, 40, 0.5, 1)
    assert torch.equal(a, _dropout_mask(16, 40, 0.5, 1))
    assert not torch.equal(a, _dropout_mask(16, 40, 0.5, 2))
    # E[drop(x)] = x: every row has its own mask, so the mean over 4000 copies of one row approaches the
    # no-dropout output (each LoRA output is a sum of 24 terms; the standard error here is ~1.5%).
    layer = randomize_adapter(lk.LoRALinear(24, 8, r=4, dropout=0.5))
    x = torch.randn(1, 24).expand(4000, 24)
    with torch.no_grad():
        lora = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
        exact = x[:1] @ layer.delta_weight().T
        assert rel_err(lora.mean(0, keepdim=True), exact) < 0.06
        assert lora.std(0).min() > 0.1 * exact.abs().max()  # and the rows really differ


def test_layer_matches_torch_backend_and_merged_mode():
    layer = randomize_adapter(lk.LoRALinear(33, 19, r=6, alpha=12, dtype=torch.bfloat16,
                                            adapter_dtype=torch.float32))
    x = torch.randn(4, 7, 33, dtype=torch.bfloat16)
    y = layer(x)
    lk.set_backend("torch")
    assert rel_err(y, layer(x)) < 1e-2
    lk.set_backend("triton")
    layer.merge()
    assert rel_err(layer(x), y) < 1e-2


def test_float64_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_warned_fallback", False)
    layer = randomize_adapter(lk.LoRALinear(10, 6, r=2, dtype=torch.float64))
    x = torch.randn(5, 10, dtype=torch.float64)
    with pytest.warns(UserWarning, match="float64"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
    assert rel_err(y, x @ (layer.weight + layer.delta_weight()).T + layer.bias) < 1e-12


def test_empty_batch():
    layer = randomize_adapter(lk.LoRALinear(10, 6, r=2))
    x = torch.randn(0, 10, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 6) and layer.lora_A.grad.abs().sum() == 0


def test_torch_compile_fullgraph():
    layer = randomize_adapter(lk.LoRALinear(20, 12, r=3))
    x = torch.randn(2, 5, 20, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    ref = copy.deepcopy(layer)
    x2 = x.detach().requires_grad_(True)
    lk.set_backend("torch")
    ref(x2).sum().backward()
    assert rel_err(y, ref(x2)) < 1e-5 and rel_err(x.grad, x2.grad) < 1e-5
    assert rel_err(layer.lora_A.grad, ref.lora_A.grad) < 1e-5


@pytest.mark.parametrize("args, err, match", [
    (dict(x=torch.randn(3, 9)), ValueError, "shape mismatch"),
    (dict(bias=torch.randn(5)), ValueError, "shape mismatch"),
    (dict(lora_B=torch.randn(6, 3)), ValueError, "shape mismatch"),
    (dict(x=torch.randn(3, 10).half()), TypeError, "share one floating dtype"),
    (dict(lora_B=torch.randn(6, 2).double()), TypeError, "lora_A and lora_B"),
    (dict(x=torch.randn(3, 10, device="meta")), ValueError, "one device"),
    (dict(weight=[[1.0]]), TypeError, "weight must be a torch.Tensor"),
])
def test_bad_input(args, err, match):
    kw = dict(x=torch.randn(3, 10), weight=torch.randn(6, 10), bias=torch.randn(6), lora_A=torch.randn(2, 10),
              lora_B=torch.randn(6, 2))
    kw.update(args)
    with pytest.raises(err, match=match):
        ops.lora_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_A"], kw["lora_B"], 1.0)


@pytest.mark.parametrize("kind", ["strided", "expanded"])
def test_bias_views(kind):
    b = torch.randn(46)[::2] if kind == "strided" else torch.randn(1).expand(23)
    x, W = torch.randn(9, 30), torch.randn(23, 30)
    A, B = torch.randn(3, 30), torch.randn(23, 3)
    y = ops.lora_linear(x, W, b, A, B, 0.5)
    assert rel_err(y, _reference(x, W, b, A, B, 0.5, torch.ones(9, 23))[0]) < 1e-5


def test_new_fp32_precision_api():
    """torch >= 2.9's fp32_precision makes get_float32_matmul_precision raise; the kernels must not."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without fp32_precision")
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        x, W, A, B = torch.randn(5, 20), torch.randn(7, 20), torch.randn(2, 20), torch.randn(7, 2)
        assert rel_err(ops.lora_linear(x, W, None, A, B, 1.0), x @ W.T + (x @ A.T) @ B.T) < 1e-5
    finally:
        matmul.fp32_precision = saved


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.0 - 2.0 ** -26, "0.5", True])
def test_bad_dropout_p(p):
    x, W, A, B = torch.randn(5, 20), torch.randn(7, 20), torch.randn(2, 20), torch.randn(7, 2)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.lora_linear(x, W, None, A, B, 1.0, p)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("frozen", ["none", "A", "x"])
def test_hybrid_design(poison, dropout, frozen):
    """The hybrid design: torch's GEMM for x W^T and dY W, the rank-r terms added by the Triton pass."""
    lk.set_design("hybrid")
    x = torch.randn(37, 45, requires_grad=frozen != "x")
    W, b = torch.randn(29, 45), torch.randn(29)
    A = torch.randn(5, 45, requires_grad=frozen != "A")
    B = torch.randn(29, 5, requires_grad=True)
    keep = _dropout_mask(37, 45, dropout, 11) if dropout else None
    y = ops.lora_linear(x, W, b, A, B, 0.7, dropout, torch.Generator().manual_seed(11))
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = _reference(x, W, b, A, B, 0.7, dy, keep, dropout)
    assert rel_err(y, ref[0]) < 1e-5
    for t, r in zip((x, A, B), ref[1:]):
        assert (t.grad is None) == (not t.requires_grad)
        assert t.grad is None or rel_err(t.grad, r) < 1e-5


@pytest.mark.parametrize("var, value", [("LORAKERN_BASE_GEMM", "cutlass"), ("LORAKERN_DESIGN", "fastest")])
def test_bad_design_names(monkeypatch, var, value):
    from lorakern import _backend
    monkeypatch.setenv(var, value)
    monkeypatch.setattr(_backend, "_settings", None)
    with pytest.raises(ValueError, match=var):
        ops.lora_linear(torch.randn(3, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0)
    monkeypatch.delenv(var)
    with pytest.raises(ValueError, match="design must be one of"):
        lk.set_design("cutlass")


def test_legacy_base_gemm_variable_still_selects_hybrid(monkeypatch):
    from lorakern import _backend
    monkeypatch.setenv("LORAKERN_BASE_GEMM", "cublas")
    monkeypatch.delenv("LORAKERN_DESIGN", raising=False)
    monkeypatch.setattr(_backend, "_settings", None)
    assert lk.get_design() == "hybrid"

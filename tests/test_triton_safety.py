"""The GPU path's safety properties, checked under Triton's interpreter: deterministic adapter gradients,
a dropout key drawn on the device from torch's generator (fresh mask per call, the same one in forward and
backward, no host read, reproduced by torch's RNG state and by activation checkpointing), and a fallback to
the cuBLAS/torch path with one warning when a kernel fails to compile."""
import importlib
import warnings

import pytest
import torch

import lorakern as lk
from conftest import rel_err

ops = importlib.import_module("lorakern.ops.lora_linear")

pytestmark = pytest.mark.skipif(not lk.backends()["triton"], reason="Triton kernels cannot run here")


@pytest.fixture(autouse=True)
def _triton_backend():
    lk.set_backend("triton")


@pytest.fixture
def kt():
    from lorakern.ops import lora_linear_triton
    return lora_linear_triton


@pytest.fixture
def reversed_programs(monkeypatch):
    """Run every launch's programs in reverse order (the interpreter otherwise runs them in grid order): a
    reduction whose result depends on the order programs run in (atomics) changes its bits under this."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = type(builder).set_grid_idx

    def set_grid_idx(self, x, y, z):
        gx, gy, gz = self.grid_dim
        original(self, gx - 1 - x, gy - 1 - y, gz - 1 - z)
    monkeypatch.setattr(type(builder), "set_grid_idx", set_grid_idx)


def _grads(x, W, b, A, B, dy, s=0.7, p=0.0, gen_seed=None):
    x, A, B = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    gen = torch.Generator().manual_seed(gen_seed) if gen_seed is not None else None
    ops.lora_linear(x, W, b, A, B, s, p, gen).backward(dy)
    return x.grad, A.grad, B.grad


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("design", ["fused", "hybrid"])
def test_adapter_gradients_bitwise_equal_in_any_program_order(request, p, design):
    """dA and dB are sums over the row blocks of x and dY: reduced from per-block partials in a fixed order,
    they are bitwise equal whatever order the programs run in (with atomics they were not)."""
    lk.set_design(design)
    M, n_in, n_out, r = 150, 70, 45, 6  # 10 row blocks of the x pass, 5 of the backward GEMM
    x, W, b = torch.randn(M, n_in), torch.randn(n_out, n_in), torch.randn(n_out)
    A, B, dy = torch.randn(r, n_in), torch.randn(n_out, r), torch.randn(M, n_out)
    first = _grads(x, W, b, A, B, dy, p=p, gen_seed=3)
    again = _grads(x, W, b, A, B, dy, p=p, gen_seed=3)
    request.getfixturevalue("reversed_programs")
    reordered = _grads(x, W, b, A, B, dy, p=p, gen_seed=3)
    for g1, g2, g3 in zip(first, again, reordered):
        assert torch.equal(g1, g2) and torch.equal(g1, g3)


def test_reversed_program_order_changes_an_order_dependent_sum(reversed_programs):
    """The fixture above can tell: the same sum formed in program order with fp32 atomics differs in its bits."""
    import triton
    import triton.language as tl

    @triton.jit
    def atomic_sum(X, OUT, BLOCK: tl.constexpr):
        tl.atomic_add(OUT, tl.sum(tl.load(X + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK))))

    x = torch.randn(64 * 16) * torch.logspace(-6, 6, 64 * 16)
    ref = torch.zeros(1)
    for i in range(64):  # grid order, one block after the other
        ref += x[i * 16:(i + 1) * 16].sum()
    out = torch.zeros(1)
    atomic_sum[(64,)](x, out, BLOCK=16)
    assert not torch.equal(out, ref)


def _identity_layer_mask(n_rows, n_in, p):
    """y = drop(x) for W = 0, A = B = I, s = 1, x = 1 + U: the mask of this call is y != 0."""
    x = (1 + torch.rand(n_rows, n_in)).requires_grad_(True)
    A = torch.eye(n_in, requires_grad=True)
    B = torch.eye(n_in, requires_grad=True)
    y = ops.lora_linear(x, torch.zeros(n_in, n_in), None, A, B, 1.0, p)
    return x, A, B, y


def test_dropout_fresh_mask_each_call_same_mask_forward_and_backward():
    p = 0.3
    torch.manual_seed(1)
    x, A, B, y = _identity_layer_mask(23, 37, p)
    keep = y != 0
    assert torch.allclose(y[keep], (x / (1 - p))[keep])
    dy = torch.randn_like(y)
    y.backward(dy)
    # backward used the forward's mask: dx = dy * keep / (1 - p); dA = dB = dy^T drop(x)
    assert rel_err(x.grad, dy * keep / (1 - p)) < 1e-6
    assert rel_err(A.grad, dy.T @ y.detach()) < 1e-5 and rel_err(B.grad, dy.T @ y.detach()) < 1e-5
    _, _, _, y2 = _identity_layer_mask(23, 37, p)
    assert not torch.equal(y2 != 0, keep)  # the next call draws another mask
    assert abs(keep.float().mean().item() - (1 - p)) < 0.04  # 851 draws: sd 0.016


def test_torch_rng_state_reproduces_the_masks():
    """The key is drawn from torch's generator: manual_seed and get/set_rng_state reproduce the masks."""
    torch.manual_seed(7)
    masks = [_identity_layer_mask(9, 20, 0.5)[3] != 0 for _ in range(2)]
    torch.manual_seed(7)
    again = [_identity_layer_mask(9, 20, 0.5)[3] != 0 for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(masks, again)) and not torch.equal(*masks)
    state = torch.get_rng_state()
    first = _identity_layer_mask(9, 20, 0.5)[3] != 0
    torch.set_rng_state(state)
    assert torch.equal(first, _identity_layer_mask(9, 20, 0.5)[3] != 0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_with_dropout_gives_the_plain_gradients(reentrant):
    """checkpoint() recomputes the forward after restoring torch's RNG state: the recomputation must draw the
    mask the loss was computed with (a counter outside torch's RNG state broke this)."""
    from torch.utils.checkpoint import checkpoint
    layer = lk.LoRALinear(40, 24, r=4, dropout=0.3)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 15, 40, requires_grad=True)
    grads = []
    for use_ckpt in (False, True):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        y = checkpoint(layer, x, use_reentrant=reentrant) if use_ckpt else layer(x)
        y.pow(2).sum().backward()
        grads.append((y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for plain, ckpt in zip(*grads):
        assert rel_err(ckpt, plain) < 1e-6


def test_fake_tensor_tracing_with_dropout_leaves_the_real_path_intact():
    """A FakeTensorMode pass with dropout reaches the custom op's fake and leaves nothing behind that a later
    real call would trip on (no fallback warning)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    layer = lk.LoRALinear(30, 17, r=4, dropout=0.2)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = ops.lora_linear(mode.from_tensor(torch.randn(5, 30)), mode.from_tensor(layer.weight), None,
                            mode.from_tensor(layer.lora_A), mode.from_tensor(layer.lora_B), 0.5, 0.2)
        assert y.shape == (5, 17)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(5, 30)).sum().backward()


def test_no_host_read_of_the_seed(monkeypatch):
    """Forward and backward with dropout never read a device value on the host (no .item(), int(), tolist():
    each is a host sync on CUDA and breaks graph capture)."""
    layer = lk.LoRALinear(30, 17, r=4, dropout=0.2)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 7, 30, requires_grad=True)
    layer(x).sum().backward()  # compiled and warm before the guarded call, as before a graph capture
    for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"host read: Tensor.{_n}"))
    layer(x).sum().backward()


KERNELS = ["xa", "gemm_fwd", "dy", "gemm_bwd", "reduce"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compile_failure_falls_back_with_one_warning(kt, monkeypatch, kernel, p):
    """A kernel that fails to compile (forced here) is reported once, naming the kernel and its config; the
    layer's outputs and gradients are those of the torch path."""
    import triton

    def failing(name, fn, grid, kwargs):
        if name == kernel:
            raise triton.compiler.errors.CompilationError("<forced>", None, "forced failure for the test")
    monkeypatch.setattr(kt, "_compile", failing)
    monkeypatch.setattr(kt, "_compiled", set())
    monkeypatch.setattr(ops, "_warned_failures", set())
    layer = lk.LoRALinear(33, 21, r=5, dropout=p)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 9, 33, requires_grad=True)
    with pytest.warns(UserWarning, match=f"Triton kernel {kernel} with config .*BLOCK") as record:
        torch.manual_seed(0)
        y = layer(x)
        y.sum().backward()
    assert len([w for w in record if "Triton kernel" in str(w.message)]) == 1
    grads = (x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    lk.set_backend("torch")
    torch.manual_seed(0)
    ref = layer(x)
    ref.sum().backward()
    assert rel_err(y, ref) < 1e-6
    for g, r in zip(grads, (x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        assert rel_err(g, r) < 1e-6
    lk.set_backend("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same failure is not reported twice
        layer(x)


def test_failure_is_remembered_per_case_on_cuda_dispatch(monkeypatch):
    """On CUDA a failed case is marked, and the dispatcher sends it to the cuBLAS path afterwards."""
    from lorakern.ops import dispatch
    monkeypatch.setattr(dispatch, "_failed", set())
    case = dispatch.make_case("sm_90", torch.bfloat16, torch.bfloat16, 100, 64, 32, 8, False, True)
    assert not dispatch.has_failed(case)
    dispatch.mark_failed(case)
    assert dispatch.has_failed(case)


def test_torch_compile_with_dropout_draws_fresh_masks():
    """Through torch.compile the kernels are custom ops; the RNG state they advance is a declared mutation,
    so a compiled layer with dropout still draws a new mask per call and trains (fullgraph, no graph break)."""
    layer = lk.LoRALinear(20, 12, r=3, dropout=0.4)
    torch.nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 20, requires_grad=True)
    y1, y2 = compiled(x), compiled(x)
    assert not torch.equal(y1, y2)
    y1.sum().backward()
    assert layer.lora_A.grad is not None and torch.isfinite(layer.lora_A.grad).all()


def test_partial_buffers_beyond_the_budget_take_the_torch_path(monkeypatch):
    """The deterministic reduction's partial sums grow with the tokens: past the budget the layer runs the
    torch path (with one warning when the Triton backend was forced), never an out-of-memory surprise."""
    from lorakern.ops import lora_linear_triton as kt
    x, W, A, B = torch.randn(64, 40), torch.randn(30, 40), torch.randn(3, 40), torch.randn(30, 3)
    need = kt.partial_bytes(64, 40, 30, 3, torch.float32)
    assert need == 4 * 3 * (-(-64 // 16) * 30 + -(-64 // 32) * 40)  # interpreter tiles: dy 16 rows, GEMM 32
    monkeypatch.setattr(ops, "PARTIAL_BUDGET_BYTES", need - 1)
    monkeypatch.setattr(ops, "_warned_partials", False)
    with pytest.warns(UserWarning, match="partial sums"):
        assert ops._choose(x, W, A, 0.0) is ops._TORCH
    monkeypatch.setattr(ops, "PARTIAL_BUDGET_BYTES", need)
    assert isinstance(ops._choose(x, W, A, 0.0), ops._TritonImpl)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_backward_launch_failure(kt, monkeypatch, p):
    """Without dropout a backward kernel that fails at launch falls back (x and xa are enough) with a
    warning; with dropout the mask exists only in the kernels, so the failure is raised, naming the kernel."""
    monkeypatch.setattr(ops, "_warned_failures", set())
    layer = lk.LoRALinear(33, 21, r=5, dropout=p)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 9, 33, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)

    def broken(*args, **kwargs):
        raise kt.KernelFailure("gemm_bwd", {"BLOCK_M": 32}, RuntimeError("launch failed"))
    monkeypatch.setattr(kt, "backward", broken)
    if p > 0:
        with pytest.raises(kt.KernelFailure, match="gemm_bwd"):
            y.sum().backward()
        return
    with pytest.warns(UserWarning, match="Triton kernel gemm_bwd"):
        y.sum().backward()
    grads = (x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    lk.set_backend("torch")
    layer(x).sum().backward()
    for g, r in zip(grads, (x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        assert rel_err(g, r) < 1e-6

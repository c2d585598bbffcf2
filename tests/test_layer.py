"""LoRALinear against a float64 reference of x W^T + b + s (x A^T) B^T: values, gradients, API behaviour."""
import math

import pytest
import torch
from torch import nn

import lorakern as lk
from lorakern.ops.lora_linear import lora_linear
from conftest import TOL, randomize_adapter, rel_err


def reference(x, layer, dy):
    """Float64 output and gradients (x, A, B) of the unmerged layer, without dropout."""
    x64 = x.detach().double().requires_grad_(True)
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    W = layer.weight.detach().double()
    y = x64 @ W.T + layer.scaling * (x64 @ A.T) @ B.T
    if layer.bias is not None:
        y = y + layer.bias.detach().double()
    gx, gA, gB = torch.autograd.grad(y, (x64, A, B), dy.double())
    return y, gx, gA, gB


def make_input(kind: str, in_f: int, dtype):
    if kind == "2d":
        return torch.randn(13, in_f, dtype=dtype)
    if kind == "3d":
        return torch.randn(2, 7, in_f, dtype=dtype)
    # non-contiguous 3-D view: every other token of a transposed buffer
    base = torch.randn(in_f, 9, 3, dtype=dtype).permute(2, 1, 0)
    x = base[:, ::2]
    assert not x.is_contiguous()
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["2d", "3d", "noncontig"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(backend, dtype, kind, bias):
    in_f, out_f, r = 45, 19, 7
    layer = randomize_adapter(lk.LoRALinear(in_f, out_f, r=r, alpha=5, bias=bias, dtype=dtype))
    x = make_input(kind, in_f, dtype).requires_grad_(True)
    y = layer(x)
    assert y.shape == (*x.shape[:-1], out_f) and y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, gx, gA, gB = reference(x, layer, dy)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(x.grad, gx) < tol
    assert rel_err(layer.lora_A.grad, gA) < tol
    assert rel_err(layer.lora_B.grad, gB) < tol
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


def test_fp32_adapters_on_bf16_base(backend):
    """The papers' setting: the rank-r products and the adapter gradients stay fp32-accurate."""
    layer = randomize_adapter(lk.LoRALinear(33, 21, r=6, dtype=torch.bfloat16, adapter_dtype=torch.float32))
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    x = torch.randn(3, 5, 33, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, gx, gA, gB = reference(x, layer, dy)
    assert rel_err(y, y_ref) < 1e-2 and rel_err(x.grad, gx) < 1e-2
    # x and dy are exact in fp32, so the fp32 adapter gradients carry only fp32 rounding
    assert layer.lora_A.grad.dtype == torch.float32
    assert rel_err(layer.lora_A.grad, gA) < 1e-5 and rel_err(layer.lora_B.grad, gB) < 1e-5


def test_gradcheck_float64(backend):
    layer = randomize_adapter(lk.LoRALinear(11, 9, r=3, dtype=torch.float64))
    x = torch.randn(2, 4, 11, dtype=torch.float64, requires_grad=True)
    W, b = layer.weight.detach().requires_grad_(True), layer.bias.detach().requires_grad_(True)
    fn = lambda x, W, b, A, B: lora_linear(x, W, b, A, B, layer.scaling)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, W, b, layer.lora_A, layer.lora_B))


def test_dropout_gradcheck_uses_the_forward_mask(backend):
    """With a fixed generator the mask is the same in every call, so finite differences check the backward."""
    layer = randomize_adapter(lk.LoRALinear(12, 10, r=4, dtype=torch.float64))
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)

    def fn(x, A, B):
        gen = torch.Generator().manual_seed(1234)
        return lora_linear(x, layer.weight, layer.bias, A, B, layer.scaling, 0.4, gen)

    assert torch.autograd.gradcheck(fn, (x, layer.lora_A, layer.lora_B))
    # and dropout did something: the output differs from the no-dropout output
    assert not torch.allclose(fn(x, layer.lora_A, layer.lora_B),
                              lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling))


def test_dropout_expectation_and_eval(backend):
    layer = randomize_adapter(lk.LoRALinear(16, 8, r=4, dropout=0.5, dtype=torch.float64))
    x = torch.randn(4, 16, dtype=torch.float64)
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x))  # eval: no dropout
    layer.train()
    with torch.no_grad():
        samples = torch.stack([layer(x) for _ in range(4000)])
    assert not torch.allclose(samples[0], samples[1])
    lora_eval = y_eval - x @ layer.weight.T - layer.bias
    lora_mean = samples.mean(0) - x @ layer.weight.T - layer.bias
    assert rel_err(lora_mean, lora_eval) < 0.05  # Monte-Carlo error ~ 1/sqrt(4000) of the spread


def test_dropout_in_train_mode_is_seeded(backend):
    layer = randomize_adapter(lk.LoRALinear(16, 8, r=4, dropout=0.3))
    x = torch.randn(5, 16)
    torch.manual_seed(7)
    y1 = layer(x)
    torch.manual_seed(7)
    assert torch.equal(y1, layer(x))


def test_backward_saves_only_inputs_and_xa(backend):
    """Saved activations are x (as the LoRA input) and x A^T: never the (M, out) output."""
    M, in_f, out_f, r = 10, 24, 40, 3
    layer = randomize_adapter(lk.LoRALinear(in_f, out_f, r=r))
    x = torch.randn(M, in_f, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    shapes = sorted(tuple(t.shape) for t in saved)
    params = sorted([(out_f, in_f), (r, in_f), (out_f, r)])
    activations = [s for s in shapes if s not in params]
    assert sorted(activations) == sorted([(M, in_f), (M, r)]), shapes
    assert all(s != tuple(y.shape) for s in activations)


def test_backward_with_dropout_saves_a_bool_mask(backend):
    M, in_f, out_f, r = 10, 24, 40, 3
    layer = randomize_adapter(lk.LoRALinear(in_f, out_f, r=r, dropout=0.2))
    x = torch.randn(M, in_f, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    acts = sorted((tuple(t.shape), str(t.dtype)) for t in saved if t.data_ptr() not in
                  {p.data_ptr() for p in layer.parameters()})
    want = [((M, in_f), "torch.float32"), ((M, r), "torch.float32"), ((M, in_f), "torch.bool")]
    assert acts == sorted(want), acts


def test_double_backward_fails_loudly(backend):
    layer = randomize_adapter(lk.LoRALinear(6, 5, r=2))
    x = torch.randn(3, 6, requires_grad=True)
    (gA,) = torch.autograd.grad(layer(x).square().sum(), (layer.lora_A,), create_graph=True)
    with pytest.raises(RuntimeError):
        gA.square().sum().backward()


def test_delta_weight_is_differentiable():
    layer = randomize_adapter(lk.LoRALinear(6, 5, r=2))
    layer.delta_weight().square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_autocast_leaves_float64_and_rejects_integers():
    layer = lk.LoRALinear(6, 5, r=2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64
        with pytest.raises(TypeError, match="floating"):
            lk.LoRALinear(6, 5, r=2)(torch.ones(2, 6, dtype=torch.long))


def test_to_linear_draws_no_random_numbers():
    layer = lk.LoRALinear(6, 5, r=2)
    state = torch.get_rng_state()
    layer.to_linear()
    assert torch.equal(torch.get_rng_state(), state)


def test_unfrozen_base_gets_its_gradients(backend):
    layer = randomize_adapter(lk.LoRALinear(9, 7, r=2, dtype=torch.float64))
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 9, dtype=torch.float64)
    dy = torch.randn(5, 7, dtype=torch.float64)
    layer(x).backward(dy)
    assert torch.allclose(layer.weight.grad, dy.T @ x)
    assert torch.allclose(layer.bias.grad, dy.sum(0))


def test_init_equals_nn_linear():
    torch.manual_seed(3)
    lin = nn.Linear(23, 17)
    torch.manual_seed(3)
    layer = lk.LoRALinear(23, 17, r=4)
    assert torch.equal(layer.weight, lin.weight) and torch.equal(layer.bias, lin.bias)
    x = torch.randn(6, 23)
    assert torch.equal(layer(x), lin(x))  # B = 0 at init
    wrapped = lk.LoRALinear.from_linear(lin, r=4)
    assert wrapped.weight is lin.weight and not lin.weight.requires_grad
    assert torch.equal(wrapped(x), nn.functional.linear(x, lin.weight, lin.bias))


def test_from_linear_keeps_device_dtype_and_options():
    lin = nn.Linear(20, 30, bias=False, dtype=torch.float64)
    layer = lk.LoRALinear.from_linear(lin, r=5, alpha=10, dropout=0.1, rslora=True, init="gaussian",
                                      adapter_dtype=torch.float32)
    assert layer.bias is None and layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.float64
    assert layer.dropout == 0.1 and layer.rslora and math.isclose(layer.scaling, 10 / math.sqrt(5))
    assert layer.lora_A.std().item() == pytest.approx(1 / 5, rel=0.2)  # gaussian: std 1/r
    assert torch.count_nonzero(layer.lora_B) == 0


def test_scaling_and_init_distribution():
    layer = lk.LoRALinear(400, 50, r=8, alpha=16)
    assert layer.scaling == 2.0
    assert lk.LoRALinear(400, 50, r=16, alpha=16, rslora=True).scaling == 4.0
    bound = 1 / math.sqrt(400)  # kaiming-uniform(a=sqrt(5)), as peft
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad and not layer.weight.requires_grad


def test_delta_weight_merge_unmerge_roundtrip(backend):
    layer = randomize_adapter(lk.LoRALinear(31, 26, r=5, alpha=7))
    x = torch.randn(2, 3, 31)
    y = layer(x)
    delta = layer.delta_weight()
    assert delta.shape == (26, 31)
    assert rel_err(delta, layer.scaling * layer.lora_B.double() @ layer.lora_A.double()) < 1e-6
    w0 = layer.weight.clone()
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    assert rel_err(layer(x), y) < 1e-6
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged and rel_err(layer.weight, w0) < 1e-6
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    assert rel_err(layer(x), y) < 1e-6


def test_to_linear_is_a_plain_merged_copy():
    layer = randomize_adapter(lk.LoRALinear(14, 9, r=3))
    w0 = layer.weight.clone()
    lin = layer.to_linear()
    assert type(lin) is nn.Linear and not layer.merged and torch.equal(layer.weight, w0)
    x = torch.randn(4, 14)
    assert rel_err(lin(x), layer(x)) < 1e-6
    layer.merge()
    assert rel_err(layer.to_linear()(x), lin(x)) < 1e-6


def test_state_dict_roundtrip_and_base_state_dict_loads():
    layer = randomize_adapter(lk.LoRALinear(12, 8, r=2))
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "lora_A", "lora_B"}
    other = lk.LoRALinear(12, 8, r=2)
    other.load_state_dict(sd)
    x = torch.randn(3, 12)
    assert torch.equal(other(x), layer(x))
    base = nn.Linear(12, 8)
    res = other.load_state_dict(base.state_dict(), strict=False)
    assert set(res.missing_keys) == {"lora_A", "lora_B"} and not res.unexpected_keys
    assert torch.equal(other.weight, base.weight)


def test_isinstance_linear_and_repr():
    layer = lk.LoRALinear(10, 6, r=2, alpha=4, dropout=0.1, adapter_dtype=torch.float64)
    assert isinstance(layer, nn.Linear)
    text = repr(layer)
    for part in ("in_features=10", "out_features=6", "r=2", "alpha=4", "scaling=2", "dropout=0.1",
                 "adapter_dtype=torch.float64"):
        assert part in text, text


def test_autocast_runs_base_in_bf16_and_keeps_adapters():
    layer = randomize_adapter(lk.LoRALinear(18, 10, r=3))
    x = torch.randn(4, 18, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y_ref, *_ = reference(x, layer, torch.zeros(4, 10))
    assert rel_err(y, y_ref) < 1e-2
    y.float().sum().backward()
    assert x.grad is not None and layer.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(r=0), ValueError, "r=0"),
    (dict(r=11, init="pissa"), ValueError, r"min\(in_features, out_features\)"),  # r singular directions
    (dict(alpha=float("inf")), ValueError, "alpha must be a finite number"),
    (dict(r=2.5), TypeError, "r must be an int"),
    (dict(r=True), TypeError, "r must be an int"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(alpha="big"), TypeError, "alpha"),
    (dict(adapter_dtype=torch.int32), TypeError, "adapter_dtype"),
    (dict(init="pissa-typo"), ValueError, "init must be one of"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    args = dict(r=2) | kwargs
    with pytest.raises(exc, match=match):
        lk.LoRALinear(12, 10, **args)


def test_bad_inputs_raise_clear_errors():
    layer = lk.LoRALinear(12, 10, r=2)
    with pytest.raises(ValueError, match=r"in_features=12.*\(4, 13\)"):
        layer(torch.randn(4, 13))
    with pytest.raises(ValueError, match="last dimension"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="float64.*float32"):
        layer(torch.randn(4, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta"):
        layer(torch.randn(4, 12, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[1.0] * 12])
    with pytest.raises(TypeError, match="nn.Linear"):
        lk.LoRALinear.from_linear(nn.Conv1d(3, 4, 1))
    with pytest.raises(TypeError, match="already a LoRALinear"):
        lk.LoRALinear.from_linear(layer)
    with pytest.raises(TypeError, match="unexpected keyword"):
        lk.LoRALinear.from_linear(nn.Linear(4, 4), r=2, bias=False)


def test_torch_compile_fullgraph_matches_eager(backend):
    """No graph break at the LoRA layers (the C++ ops have fake implementations), same values and grads."""
    model = nn.Sequential(lk.LoRALinear(32, 48, r=4), nn.GELU(), lk.LoRALinear(48, 17, r=3))
    for m in model:
        if isinstance(m, lk.LoRALinear):
            randomize_adapter(m)
    x = torch.randn(2, 5, 32)
    y_ref = model(x)
    y_ref.square().sum().backward()
    g_ref = [m.lora_A.grad.clone() for m in (model[0], model[2])] + [model[0].lora_B.grad.clone()]
    model.zero_grad()
    torch._dynamo.reset()
    y = torch.compile(model, fullgraph=True)(x)
    y.square().sum().backward()
    g = [m.lora_A.grad for m in (model[0], model[2])] + [model[0].lora_B.grad]
    assert rel_err(y, y_ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(g, g_ref))


@pytest.mark.parametrize("shape", [(5, 12), (2, 5, 12), (12,)])
def test_output_is_not_a_view(shape):
    """As nn.Linear: the output owns its storage (FSDP2 warns about views; in-place ops on it just work)."""
    layer = randomize_adapter(lk.LoRALinear(12, 7, r=3))
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert not y._is_view() and y.shape == (*shape[:-1], 7)
    y.mul_(2.0).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (2.0 * layer(x2)).sum().backward()
    assert torch.allclose(x.grad, x2.grad)


def test_rank_above_the_layer_width_as_in_peft():
    """peft adapts a Linear(h, 1) head at r = 8 under "all-linear"; so does lorakern (weight-only inits)."""
    layer = randomize_adapter(lk.LoRALinear(12, 1, r=8))
    x = torch.randn(5, 12, dtype=torch.float64)
    ref = x @ layer.weight.double().T + layer.bias.double() + layer.scaling * (x @ layer.lora_A.double().T) @ layer.lora_B.double().T
    assert layer.lora_A.shape == (8, 12) and rel_err(layer(x.float()), ref) < 1e-5


def test_from_linear_keeps_the_linears_hooks():
    lin = nn.Linear(6, 4)
    seen = []
    lin.register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    handle = lin.register_forward_hook(lambda mod, args, out: 2 * out)
    layer = lk.LoRALinear.from_linear(lin, r=2)
    x = torch.randn(3, 6)
    assert torch.allclose(layer(x), lin(x)) and seen == ["pre", "pre"]  # B = 0: the same output, doubled
    handle.remove()  # the user's handle still removes it from the LoRA layer
    assert torch.allclose(layer(x), nn.functional.linear(x, lin.weight, lin.bias))


def test_meta_init_then_reset_parameters_initializes_the_adapter():
    """FSDP / accelerate style: build on the meta device, to_empty(), then reset_parameters() per module."""
    with torch.device("meta"):
        model = nn.Sequential(lk.LoRALinear(16, 8, r=2), lk.LoRALinear(8, 4, r=2, init="gaussian"))
    model.to_empty(device="cpu")
    for m in model:
        m.reset_parameters()
    for m in model:
        assert torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) and 0.0 < m.lora_A.std() < 1.0


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_keeps_its_adapters_in_eval(batch_first):
    """Its inference fast path (eval, batch_first) reads linear1/linear2's weights directly; a no-op pre-hook
    on the adapted layers turns it off, so eval sees the adapters (review: off by 3.0 before)."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first))
    names = lk.apply_lora(enc, r=2, exclude=())
    assert names == ["0.linear1", "0.linear2"]  # (out_proj: MHA reads its weight directly)
    for m in lk.lora_modules(enc).values():
        randomize_adapter(m)
    x = torch.randn(3, 5, 8)
    train_out = enc.train()(x)
    with torch.no_grad():
        assert rel_err(enc.eval()(x), train_out) < 1e-5
    lk.remove_lora(enc, merge=True)
    assert not enc[0].linear1._forward_pre_hooks  # the guard leaves with the adapter
    with torch.no_grad():
        assert rel_err(enc(x), train_out) < 1e-5


def test_parametrized_linear_is_refused_clearly():
    lin = torch.nn.utils.parametrizations.weight_norm(nn.Linear(6, 4))
    with pytest.raises(TypeError, match="parametrized"):
        lk.LoRALinear.from_linear(lin, r=2)


def test_torch_func_per_sample_gradients():
    from torch.func import functional_call, grad, vmap
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    lk.apply_lora(model, r=2, exclude=())
    for m in lk.lora_modules(model).values():
        randomize_adapter(m)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    X, Y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)

    def loss(p, x, y):
        return (functional_call(model, p, (x[None],)) - y[None]).square().sum()
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, Y)
    for i in range(4):
        model.zero_grad()
        (model(X[i:i + 1]) - Y[i:i + 1]).square().sum().backward()
        for k, v in model.named_parameters():
            if v.requires_grad:
                assert rel_err(per_sample[k][i], v.grad) < 1e-12, k


def test_loading_a_state_dict_into_a_merged_layer_is_refused():
    """The merged weight holds W + ΔW: a base loaded into it and then unmerged would lose ΔW's worth."""
    model = nn.Sequential(randomize_adapter(lk.LoRALinear(6, 4, r=2)))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model[0].merge()
    with pytest.raises(ValueError, match="merged; unmerge"):
        model.load_state_dict(sd)
    model[0].unmerge()
    model.load_state_dict(sd)


def test_reset_parameters_forgets_the_old_weights_offset():
    layer = lk.LoRALinear(10, 8, r=2, init="pissa")
    assert layer.base_offset_A is not None
    layer.reset_parameters()  # a new random weight, then PiSSA of it: the record is of the new weight only
    original = layer.weight.double() + layer.base_offset_B.double() @ layer.base_offset_A.double()
    assert layer.base_offset_A.shape[0] == 2
    assert rel_err(layer.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double(), original) < 1e-6


def test_init_offset_travels_with_the_state_dict_and_survives_an_alpha_change(tmp_path):
    lin = nn.Linear(10, 8)
    W0 = lin.weight.detach().clone()
    model = nn.Sequential(lk.LoRALinear.from_linear(lin, r=2, init="pissa"))
    sd = model.state_dict()
    assert {"0.base_offset_A", "0.base_offset_B"} <= set(sd)
    fresh = nn.Sequential(lk.LoRALinear(10, 8, r=2))
    assert "0.base_offset_A" not in fresh.state_dict()  # None until an init sets it
    fresh.load_state_dict(sd)  # strict
    fresh[0].alpha, fresh[0].scaling = 4.0, 2.0  # e.g. load_adapter with another alpha
    fresh[0].restore_base()
    assert rel_err(fresh[0].weight, W0) < 1e-6
    plain = nn.Sequential(lk.LoRALinear(10, 8, r=2))
    model.load_state_dict(plain.state_dict())  # a checkpoint without a record drops it
    assert model[0].base_offset_A is None


def test_dropout_just_below_one_is_refused_at_construction():
    with pytest.raises(ValueError, match="dropout"):
        lk.LoRALinear(6, 4, r=2, dropout=1.0 - 2.0 ** -26)


def test_failed_reset_keeps_what_reset_parameters_reruns():
    layer = lk.LoRALinear(6, 4, r=2, init="gaussian")
    with pytest.raises(ValueError):
        layer.reset_lora_parameters(lambda w, r: (torch.zeros(1), torch.zeros(1)))
    layer.reset_parameters()  # still the gaussian init


def test_torch_func_vmap_with_dropout_draws_per_sample_masks():
    from torch.func import functional_call, grad, vmap
    layer = randomize_adapter(lk.LoRALinear(6, 3, r=2, dropout=0.5)).train()
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    X = torch.ones(4, 6)

    def loss(p, x):
        return functional_call(layer, p, (x[None],)).sum()
    g = vmap(grad(loss), in_dims=(None, 0), randomness="different")(params, X)
    assert g["lora_A"].shape == (4, 2, 6) and torch.isfinite(g["lora_A"]).all()
    assert not torch.equal(g["lora_A"][0], g["lora_A"][1]) or not torch.equal(g["lora_A"][1], g["lora_A"][2])


def test_offsets_stay_wide_under_assign_loading():
    src = nn.Sequential(lk.LoRALinear(10, 8, r=2, init="pissa"))
    sd = {k: (v.to(torch.bfloat16) if "base_offset" in k else v) for k, v in src.state_dict().items()}
    dst = nn.Sequential(lk.LoRALinear(10, 8, r=2))
    dst.load_state_dict(sd, assign=True)
    assert dst[0].base_offset_A.dtype == torch.float32 and dst[0].base_offset_B.dtype == torch.float32


def test_parameters_replaced_after_construction_get_the_full_checks():
    layer = lk.LoRALinear(12, 10, r=2)
    layer.lora_A = nn.Parameter(torch.randn(3, 12))  # rank no longer matches lora_B
    with pytest.raises(ValueError, match="shape mismatch"):
        layer(torch.randn(4, 12))
    layer = lk.LoRALinear(12, 10, r=2)
    layer.weight = nn.Parameter(torch.randn(10, 11), requires_grad=False)
    with pytest.raises(ValueError, match="shape mismatch"):
        layer(torch.randn(4, 12))

"""Gradient capture and lk.spectral_init on small models: exact capture against autograd's weight gradients
(fp64), sketch against exact, the methods' invariants, bad input, and data-parallel capture on gloo."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lorakern as lk
from lorakern import spectral
from lorakern.capture import accumulate
from conftest import rel_err


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 31), nn.Tanh(), nn.Dropout(0.1), nn.Linear(31, 12), nn.Tanh(),
                          nn.Linear(12, 7)).to(dtype)
    lk.apply_lora(model, r=3, exclude=())
    return model


def make_batches(n=4, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(9, 20, generator=g, dtype=dtype), torch.randn(9, 7, generator=g, dtype=dtype))
            for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    return (model(x) - y).square().mean()


def autograd_weight_grads(model, batches):
    """Mean over batches of dL/dW with the base weights unfrozen: the reference the capture must match."""
    ref = copy.deepcopy(model)
    for m in lk.lora_modules(ref).values():
        m.weight.requires_grad_(True)
    torch.manual_seed(0)  # the capture replays this RNG stream (dropout)
    grads = {}
    for b in batches:
        ref.zero_grad()
        loss_fn(ref, b).backward()
        for n, m in lk.lora_modules(ref).items():
            grads[n] = grads.get(n, 0) + m.weight.grad / len(batches)
    return grads


@pytest.mark.parametrize("probe", ["none", "in", "out"])
def test_accumulate_cpp_matches_torch(backend, probe):
    x, dy = torch.randn(11, 7, dtype=torch.bfloat16), torch.randn(11, 5, dtype=torch.bfloat16)
    kw, shape = {"none": ({}, (5, 7)), "in": ({"probe_in": torch.randn(7, 3)}, (5, 3)),
                 "out": ({"probe_out": torch.randn(5, 3)}, (3, 7))}[probe]
    acc = torch.full(shape, 0.5)
    accumulate(acc, x, dy, **kw)
    X, D = x.double(), dy.double()
    ref = {"none": lambda: D.T @ X, "in": lambda: D.T @ (X @ kw["probe_in"].double()),
           "out": lambda: (D @ kw["probe_out"].double()).T @ X}[probe]() + 0.5
    assert rel_err(acc, ref) < 1e-6


def test_exact_capture_equals_autograd_weight_gradients():
    model = make_model(torch.float64)
    batches = make_batches(dtype=torch.float64)
    G = lk.capture_gradients(model, batches, loss_fn, dtype=torch.float64)
    ref = autograd_weight_grads(model, batches)
    assert sorted(G) == sorted(ref)
    for n in G:
        assert G[n].dtype == torch.float64 and rel_err(G[n], ref[n]) < 1e-12, n
    assert all(m.weight.grad is None for m in lk.lora_modules(model).values())


def test_capture_restores_the_users_grads_and_flags():
    model = make_model()
    head = model[5]
    head.lora_A.requires_grad_(False)
    sentinel = torch.ones_like(head.lora_B)
    head.lora_B.grad = sentinel
    lk.spectral_init(model, make_batches(), loss_fn, mode="exact", progress=False)
    assert head.lora_B.grad is sentinel and not head.lora_A.requires_grad
    assert not any(m.weight.requires_grad for m in lk.lora_modules(model).values())


@pytest.mark.parametrize("kw", [dict(s=1.0), dict(s=4.0, normalize=False), dict(gamma=2.0)])
def test_lora_one_exact_mode_is_algorithm1_on_the_captured_gradient(kw):
    model = make_model(torch.float64)
    batches = make_batches(dtype=torch.float64)
    ref = autograd_weight_grads(model, batches)
    base = {n: m.weight.clone() for n, m in lk.lora_modules(model).items()}
    spectra = lk.spectral_init(model, batches, loss_fn, method="lora-one", mode="exact", progress=False, **kw)
    for n, m in lk.lora_modules(model).items():
        A, B = lk.init.lora_one(ref[n], m.r, **kw)
        assert rel_err(m.lora_B @ m.lora_A, B @ A) < 1e-10, n  # fp64 model: fp64 capture and SVD
        assert torch.equal(m.weight, base[n])  # LoRA-One leaves the base weight alone
        assert rel_err(spectra[n], torch.linalg.svdvals(ref[n])[:m.r]) < 1e-5


@pytest.mark.parametrize("n_iter", [1, 2])
def test_sketch_matches_exact(n_iter):
    model = make_model()
    batches = make_batches(8)
    exact = copy.deepcopy(model)
    lk.spectral_init(exact, batches, loss_fn, mode="exact", progress=False)
    lk.spectral_init(model, batches, loss_fn, mode="sketch", n_iter=n_iter, oversample=8, progress=False)
    for n, m in lk.lora_modules(model).items():
        e = lk.lora_modules(exact)[n]
        assert rel_err(m.delta_weight(), e.delta_weight()) < 1e-2, n


def test_lora_ga_keeps_the_output_and_moves_the_weight():
    model = make_model()
    batches = make_batches()
    x = batches[0][0]
    model.eval()
    y = model(x)
    w0 = {n: m.weight.clone() for n, m in lk.lora_modules(model).items()}
    lk.spectral_init(model, batches, loss_fn, method="lora-ga", mode="sketch", progress=False)
    assert rel_err(model(x), y) < 1e-5
    for n, m in lk.lora_modules(model).items():
        assert rel_err(m.weight + m.delta_weight(), w0[n]) < 1e-5
        assert not torch.allclose(m.weight, w0[n])


def test_layers_without_gradient_warn_and_keep_their_init():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = make_model(), lk.LoRALinear(5, 5, r=2)

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    before = model.unused.lora_A.clone()
    with pytest.warns(RuntimeWarning, match="received no.*gradient.*unused"):
        lk.spectral_init(model, make_batches(), loss_fn, mode="sketch", progress=False)
    assert torch.equal(model.unused.lora_A, before)


def test_bad_input():
    model = make_model()
    with pytest.raises(ValueError, match="empty"):
        lk.spectral_init(model, [], loss_fn, mode="exact", progress=False)
    with pytest.raises(ValueError, match="one-shot iterator.*list or a DataLoader"):
        lk.spectral_init(model, iter(make_batches()), loss_fn, mode="sketch", progress=False)
    lk.spectral_init(model, iter(make_batches()), loss_fn, mode="exact", progress=False)  # one pass: fine
    nan = [(torch.full((9, 20), float("nan")), torch.zeros(9, 7))]
    for mode in ("exact", "sketch"):
        with pytest.raises(FloatingPointError, match="layer '0'"):
            lk.spectral_init(model, nan, loss_fn, mode=mode, progress=False)
    with pytest.raises(ValueError, match="no LoRALinear"):
        lk.spectral_init(nn.Sequential(nn.Linear(3, 3)), make_batches(), loss_fn)
    with pytest.raises(ValueError, match="method"):
        lk.spectral_init(model, make_batches(), loss_fn, method="lora-two")
    with pytest.raises(ValueError, match="2\\*r"):
        lk.spectral_init(nn.Sequential(lk.LoRALinear(4, 10, r=3)), make_batches(), loss_fn, method="lora-ga")
    with pytest.raises(TypeError, match="scalar"):
        lk.spectral_init(model, make_batches(), lambda m, b: m(b[0]), mode="exact", progress=False)


def _ddp_worker(rank, world, init_file, out_dir, mode):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model().eval()  # no dropout: ranks and the single process see the same function
        batches = make_batches(8)[rank::world]  # each rank sees its share of the gradient batch
        lk.spectral_init(model, batches, loss_fn, mode=mode, progress=False)
        torch.save({n: (m.lora_A, m.lora_B) for n, m in lk.lora_modules(model).items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["sketch", "exact"])
def test_data_parallel_capture_equals_single_process(tmp_path, mode):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), mode), nprocs=2, join=True)
    single = make_model().eval()
    lk.spectral_init(single, make_batches(8), loss_fn, mode=mode, progress=False)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for n, m in lk.lora_modules(single).items():
        for a, b, ref in zip(r0[n], r1[n], (m.lora_A, m.lora_B)):
            assert torch.equal(a, b)  # every rank ends with the same adapters
        assert rel_err(r0[n][1] @ r0[n][0], m.lora_B @ m.lora_A) < 1e-4, n


def _mismatch_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 31), nn.Tanh(), nn.Linear(31, 7))
        lk.apply_lora(model, r=2 + rank, exclude=())  # rank 1 holds a different LoRA layout
        try:
            lk.spectral_init(model, make_batches(2), loss_fn, mode="exact", progress=False)
            msg = "no error"
        except ValueError as exc:
            msg = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(msg)
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_must_agree_on_the_layout(tmp_path):
    mp.spawn(_mismatch_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert "ranks disagree" in (tmp_path / f"rank{rank}.txt").read_text()


def test_in_place_ops_after_a_layer_do_not_hide_its_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(inplace=True), nn.Linear(16, 7)).double()
    lk.apply_lora(model, r=2, exclude=())
    batches = make_batches(dtype=torch.float64)
    G = lk.capture_gradients(model, batches, loss_fn)
    ref = autograd_weight_grads(model, batches)
    assert sorted(G) == ["0", "2"] and all(rel_err(G[n], ref[n]) < 1e-12 for n in G)


def test_in_place_change_of_a_layer_input_is_an_error_not_a_wrong_gradient():
    class Mutates(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = lk.LoRALinear(20, 7, r=2, dropout=0.3)  # with dropout autograd itself saves only x_lora

        def forward(self, x):
            x = x.clone()
            y = self.a(x)
            x.mul_(3)
            return y

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lk.capture_gradients(Mutates(), make_batches(), loss_fn)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing(reentrant):
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_model(torch.float64)

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=reentrant)

    model = Ckpt().eval()
    batches = [(x.requires_grad_(reentrant), y) for x, y in make_batches(dtype=torch.float64)]
    G = lk.capture_gradients(model, batches, loss_fn)
    ref = autograd_weight_grads(model, batches)
    assert len(G) == 3 and all(rel_err(G[n], ref[n]) < 1e-12 for n in G)


def test_zero_gradient_layers_warn_and_keep_their_init():
    class Zeroed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.z = lk.LoRALinear(20, 7, r=2), lk.LoRALinear(20, 7, r=2)

        def forward(self, x):
            return self.a(x) + 0 * self.z(x)

    model = Zeroed()
    before = model.z.lora_A.clone()
    for mode in ("exact", "sketch"):
        with pytest.warns(RuntimeWarning, match="exactly zero.*'z'"):
            lk.spectral_init(model, make_batches(), loss_fn, mode=mode, progress=False)
        assert torch.equal(model.z.lora_A, before)
    with pytest.raises(ValueError, match="all zeros"):
        lk.init.lora_one(torch.zeros(5, 4), 2)


def test_lora_ga_keeps_the_output_over_non_zero_adapters():
    model = make_model()
    for m in lk.lora_modules(model).values():
        m.reset_lora_parameters("pissa")  # non-zero adapters, residual base
    model.eval()
    x = make_batches()[0][0]
    y = model(x)
    lk.spectral_init(model, make_batches(), loss_fn, method="lora-ga", mode="exact", progress=False)
    assert rel_err(model(x), y) < 1e-5


def test_lora_ga_sketch_matches_exact():
    model = make_model()
    exact = copy.deepcopy(model)
    batches = make_batches(8)
    lk.spectral_init(exact, batches, loss_fn, method="lora-ga", mode="exact", progress=False)
    lk.spectral_init(model, batches, loss_fn, method="lora-ga", mode="sketch", n_iter=3, progress=False)
    def projector(M):  # onto the row space of M: independent of the singular vectors' signs
        return M.T @ torch.linalg.pinv(M @ M.T) @ M

    # (91) pairs U_i with V_{r+i}, so B A itself depends on the SVD's sign choices: compare the subspaces
    for n, m in lk.lora_modules(model).items():
        e = lk.lora_modules(exact)[n]
        assert rel_err(projector(m.lora_A), projector(e.lora_A)) < 5e-2, n
        assert rel_err(projector(m.lora_B.T), projector(e.lora_B.T)) < 5e-2, n
        assert rel_err(m.lora_A.norm(), e.lora_A.norm()) < 1e-5


def test_passes_must_see_the_same_data():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(50, 20), torch.randn(50, 7))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=g)
    with pytest.raises(ValueError, match="did not see the same data"):
        lk.spectral_init(make_model(), loader, loss_fn, mode="sketch", progress=False)
    fixed = torch.utils.data.DataLoader(data, batch_size=8)  # a plain DataLoader is fine
    lk.spectral_init(make_model(), fixed, loss_fn, mode="sketch", progress=False)


def test_buffers_and_rng_are_restored():
    model = nn.Sequential(nn.Linear(20, 12), nn.BatchNorm1d(12), nn.Linear(12, 7))
    lk.apply_lora(model, r=2, exclude=())
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    rng = torch.get_rng_state()
    lk.spectral_init(model, make_batches(), loss_fn, mode="sketch", progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_keyword_input():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = lk.LoRALinear(20, 7, r=2)

        def forward(self, x):
            return self.a(input=x)

    assert "a" in lk.capture_gradients(Kw(), make_batches(), loss_fn)


# -- second review of the spectral stack -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_spectral_init_under_autocast(mode):
    """Wrapped in torch.autocast, the capture's products and the linear algebra stay in fp32 (the sketch's
    fp32 accumulator met a bf16 product and raised; lora-ga's offset was formed in bf16)."""
    plain, auto = make_model(), make_model()
    lk.spectral_init(plain, make_batches(), loss_fn, method="lora-ga", mode=mode, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lk.spectral_init(auto, make_batches(), loss_fn, method="lora-ga", mode=mode, progress=False)
    x = make_batches()[0][0]
    base = make_model()
    with torch.no_grad():  # eval: the model has an nn.Dropout
        assert rel_err(auto.eval()(x), base.eval()(x)) < 1e-5  # output unchanged at init: offset formed in fp32


def test_user_forward_hook_does_not_change_the_captured_gradient():
    model = make_model(torch.float64)
    model[3].register_forward_hook(lambda mod, args, out: 3 * out)
    batches = make_batches(dtype=torch.float64)
    G = lk.capture_gradients(model, batches, loss_fn, dtype=torch.float64)
    ref = autograd_weight_grads(model, batches)
    assert all(rel_err(G[n], ref[n]) < 1e-12 for n in G)


def test_backward_run_inside_loss_fn_is_not_captured():
    """An adversarial / input-gradient step inside loss_fn runs its own backward through the layers."""
    def fgsm_loss(model, batch):
        x, y = batch
        x = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(loss_fn(model, (x, y)), x)
        return loss_fn(model, ((x + 0.1 * gx.sign()).detach(), y))

    model = make_model(torch.float64)
    batches = make_batches(dtype=torch.float64)
    G = lk.capture_gradients(model, batches, fgsm_loss, dtype=torch.float64)
    ref = copy.deepcopy(model)
    for m in lk.lora_modules(ref).values():
        m.weight.requires_grad_(True)
    torch.manual_seed(0)
    for b in batches:
        fgsm_loss(ref, b).backward()
    for n, m in lk.lora_modules(ref).items():
        assert rel_err(G[n], m.weight.grad / len(batches)) < 1e-12, n


def test_grads_outside_the_model_are_left_alone():
    model = make_model()
    head = nn.Linear(7, 3)
    sentinel = torch.full_like(head.weight, 0.25)
    head.weight.grad = users = sentinel.clone()
    x_in = torch.randn(9, 20, requires_grad=True)
    batches = [(x_in, torch.randn(9, 3)) for _ in range(2)]
    lk.spectral_init(model, batches, lambda m, b: (head(m(b[0])) - b[1]).square().mean(), progress=False)
    assert head.weight.grad is users and torch.equal(users, sentinel)  # the user's tensor, values unchanged
    assert head.bias.grad is None and x_in.grad is None


def test_one_shot_iterable_that_looks_reiterable():
    class Once:
        def __init__(self, batches):
            self.it = iter(batches)

        def __iter__(self):
            return self.it

    with pytest.raises(ValueError, match="iterated only once.*pass a list or a DataLoader"):
        lk.spectral_init(make_model(), Once(make_batches()), loss_fn, mode="sketch", progress=False)


def test_nan_loss_with_finite_gradient_is_the_same_data():
    """A batch whose loss is NaN (e.g. every label ignored) but whose gradient is finite."""
    batches = make_batches()
    nan_loss = lambda m, b: loss_fn(m, b) + (torch.tensor(float("nan")) if b is batches[1] else 0.0)  # noqa: E731
    lk.spectral_init(make_model(), batches, nan_loss, mode="sketch", progress=False)


def test_dataloader_leaves_the_callers_rng_alone():
    loader = torch.utils.data.DataLoader(list(zip(*[torch.randn(12, 20), torch.randn(12, 7)])), batch_size=4,
                                         shuffle=False)
    model = make_model()  # (it seeds the global RNG itself)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lk.spectral_init(model, loader, loss_fn, mode="sketch", progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("kw", [{"gamma": -1.0}, {"gamma": 0.0}, {"s": 0.0}, {"c": -2.0, "method": "lora-ga"}])
def test_init_numbers_checked_before_any_pass(kw):
    calls = []
    counting = lambda m, b: (calls.append(1), loss_fn(m, b))[1]  # noqa: E731
    with pytest.raises(ValueError, match=next(k for k in kw if k != "method")):
        lk.spectral_init(make_model(), make_batches(), counting, progress=False, **kw)
    assert not calls


def test_lora_ga_refuses_weights_tied_to_another_module():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    model = TiedLM()
    lk.apply_lora(model, r=2, exclude=())
    before = model.emb.weight.detach().clone()
    batches = [(torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5))) for _ in range(2)]
    ce = lambda m, b: nn.functional.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten())  # noqa: E731
    with pytest.raises(ValueError, match="tied.*head"):
        lk.spectral_init(model, batches, ce, method="lora-ga", progress=False)
    assert torch.equal(model.emb.weight, before)
    lk.spectral_init(model, batches, ce, method="lora-one", progress=False)  # the base is not modified: fine
    assert torch.equal(model.emb.weight, before)


def test_lora_ga_with_bf16_adapters_keeps_the_fp32_base_exact():
    model = nn.Sequential(nn.Linear(20, 31), nn.Tanh(), nn.Linear(31, 7))
    W0 = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    lk.apply_lora(model, r=3, exclude=(), adapter_dtype=torch.bfloat16)
    lk.spectral_init(model, make_batches(), loss_fn, method="lora-ga", mode="exact", progress=False)
    for m, w0 in zip((model[0], model[2]), W0):
        total = m.weight.double() + m.scaling * m.lora_B.double() @ m.lora_A.double()
        assert rel_err(total, w0) < 1e-6  # was ~1e-4: the offset came from the unrounded factors


@pytest.mark.parametrize("weight_scale", [1.0, 1000.0])
def test_pissa_then_lora_ga_records_the_net_offset_only(weight_scale):
    """LoRA-GA after PiSSA undoes PiSSA's offset and adds its own: the record is rank r, not 3r, and still
    gives back the original weight (save_adapter writes rank r + r, not r + 3r). A large weight makes the
    cancelled PiSSA part 1000x the LoRA-GA part: its rounding must not hide the LoRA-GA directions."""
    torch.manual_seed(0)
    lin = nn.Linear(20, 16)
    with torch.no_grad():
        lin.weight.mul_(weight_scale)
    W0 = lin.weight.detach().clone()
    model = nn.Sequential(lk.LoRALinear.from_linear(lin, r=4, init="pissa"), nn.Tanh())
    batches = [(torch.randn(5, 20), torch.randn(5, 16)) for _ in range(2)]
    lk.spectral_init(model, batches, lambda m, b: (m(b[0]) - b[1]).square().mean(), method="lora-ga",
                     mode="exact", progress=False)
    layer = model[0]
    assert layer.base_offset_A.shape == (4, 20) and layer.base_offset_B.shape == (16, 4)
    assert rel_err(layer.weight + layer.base_offset_B @ layer.base_offset_A, W0) < 1e-6


def test_an_offset_undone_exactly_leaves_no_record():
    layer = lk.LoRALinear(10, 8, r=2, init="pissa")
    layer.record_base_offset(layer.lora_A, -layer.lora_B)
    assert layer.base_offset_A is None and layer.base_offset_B is None


# -- issue 14: modes auto / onepass, the memory budget, the error estimate ----------------------------------------
def known_gradient_layer(spectrum, out_f=50, in_f=60, r=3, seed=0):
    """A LoRALinear whose loss has the gradient G (out, in) = U diag(spectrum) V^T exactly: the batch is the
    identity, the loss sum(y * G^T)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out_f, len(spectrum), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_f, len(spectrum), generator=g, dtype=torch.float64))
    G = (U * torch.as_tensor(spectrum, dtype=torch.float64)) @ V.T
    torch.manual_seed(seed)
    layer = nn.Sequential(lk.LoRALinear(in_f, out_f, r=r).double())
    batches = [(torch.eye(in_f, dtype=torch.float64), G.T.contiguous())]
    return layer, batches, lambda m, b: (m(b[0]) * b[1]).sum()


def ga_delta_error(m, e):
    """LoRA-GA's B A pairs single singular vectors: compare with each row of A / column of B sign-matched."""
    A = m.lora_A * torch.sign((m.lora_A * e.lora_A).sum(1, keepdim=True))
    B = m.lora_B * torch.sign((m.lora_B * e.lora_B).sum(0, keepdim=True))
    return rel_err(B @ A, e.lora_B @ e.lora_A)


@pytest.mark.parametrize("method", ["lora-one", "lora-ga"])
def test_onepass_equals_exact_when_the_gradient_fits_the_sketch(method):
    model, exact = make_model(torch.float64), make_model(torch.float64)
    batches = [make_batches(1, dtype=torch.float64)[0]]  # 9 rows: rank(G) <= 9 <= every sketch size k
    lk.spectral_init(exact, batches, loss_fn, method=method, mode="exact", progress=False)
    res = lk.spectral_init(model, batches, loss_fn, method=method, mode="onepass", sketch_size=9, progress=False)
    assert set(res.modes.values()) == {"onepass"} and res.passes == 1
    for n, m in lk.lora_modules(model).items():
        e = lk.lora_modules(exact)[n]
        err = rel_err(m.delta_weight(), e.delta_weight()) if method == "lora-one" else ga_delta_error(m, e)
        assert err < 1e-8, (n, err)
        assert res.errors[n] < 1e-8


@pytest.mark.parametrize("method, spectrum", [
    ("lora-one", [10 * 0.8 ** i for i in range(40)]),
    ("lora-one", [5.0, 4.0, 3.0] + [0.5] * 30),
    ("lora-ga", [10 * 0.7 ** i for i in range(40)]),
])
@pytest.mark.parametrize("mode", ["onepass", "sketch"])
def test_error_estimate_is_within_2x_of_the_true_error(method, spectrum, mode):
    ratios = []
    for seed in range(3):
        layer, batches, loss = known_gradient_layer(spectrum, seed=seed)
        exact = copy.deepcopy(layer)
        lk.spectral_init(exact, batches, loss, method=method, mode="exact", progress=False)
        kw = dict(sketch_size=10) if mode == "onepass" else dict(oversample=3, n_iter=0)
        res = lk.spectral_init(layer, batches, loss, method=method, mode=mode, progress=False, seed=seed,
                               error_tol=float("inf"), **kw)
        m, e = layer[0], exact[0]
        true = rel_err(m.delta_weight(), e.delta_weight()) if method == "lora-one" else ga_delta_error(m, e)
        assert true > 1e-3  # a real sketch error, not rounding
        ratios.append(res.errors["0"] / true)
    assert all(0.5 <= x <= 2.0 for x in ratios), ratios


def test_auto_captures_g_within_the_budget_and_sketches_the_rest():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(lk.LoRALinear(200, 150, r=2), nn.Tanh(), lk.LoRALinear(150, 10, r=2))

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(30, 200, generator=g), torch.randn(30, 10, generator=g)) for _ in range(2)]
    exact = model()
    lk.spectral_init(exact, batches, loss_fn, mode="exact", progress=False)
    auto = model()
    res = lk.spectral_init(auto, batches, loss_fn, progress=False)  # default: auto, ample budget
    assert res.modes == {"0": "rsvd", "2": "rsvd"} and res.passes == 1
    assert res.buffer_bytes == (150 * 200 + 10 * 150 + (350 + 160) * spectral.ERROR_PROBES) * 4
    for n, m in lk.lora_modules(auto).items():  # G captured: randomized SVD within RSVD_TOL, or the exact one
        assert res.errors[n] <= spectral.RSVD_TOL
        assert rel_err(m.delta_weight(), lk.lora_modules(exact)[n].delta_weight()) < 2 * spectral.RSVD_TOL + 1e-5
    # 100 kB: G of layer 0 (120 kB) does not fit, its one-pass sketch (81 kB) does; layer 2's G (6 kB) is
    # smaller than its sketch, so it stays captured
    tight = lk.spectral_init(model(), batches, loss_fn, memory_budget=100_000, progress=False,
                             error_tol=float("inf"))
    assert tight.modes == {"0": "onepass", "2": "rsvd"} and tight.buffer_bytes <= 100_000 and tight.passes == 1
    assert tight.errors["0"] > 0


def test_auto_falls_back_to_the_exact_svd_where_the_randomized_one_is_not_accurate():
    """lora-ga on a (4, 8) layer with r = 2 needs all 4 singular vectors: the randomized SVD has no
    oversampling room (q = 4), its estimate is not within RSVD_TOL and the exact SVD takes over."""
    torch.manual_seed(0)
    model, exact = nn.Sequential(lk.LoRALinear(8, 4, r=2)), nn.Sequential(lk.LoRALinear(8, 4, r=2))
    exact.load_state_dict(model.state_dict())
    batches = [(torch.randn(6, 8), torch.randn(6, 4))]
    res = lk.spectral_init(model, batches, loss_fn, method="lora-ga", progress=False)
    lk.spectral_init(exact, batches, loss_fn, method="lora-ga", mode="exact", progress=False)
    assert res.modes == {"0": "rsvd"} and res.errors == {"0": 0.0}
    assert ga_delta_error(model[0], exact[0]) < 1e-6


def test_a_budget_too_small_for_any_mode_raises_before_any_pass():
    calls = []
    counting = lambda m, b: (calls.append(1), loss_fn(m, b))[1]  # noqa: E731
    for mode in ("auto", "exact", "onepass", "sketch"):
        with pytest.raises(ValueError, match=r"memory_budget=100 bytes is too small: mode='%s' needs \d+ bytes" % mode):
            lk.spectral_init(make_model(), make_batches(), counting, mode=mode, memory_budget=100, progress=False)
    assert not calls


def test_sketch_error_above_tolerance_warns_naming_layers_and_error():
    layer, batches, loss = known_gradient_layer([10 * 0.9 ** i for i in range(40)])
    with pytest.warns(RuntimeWarning, match=r"exceeds error_tol=0.01 on 1 sketched layer\(s\): 0 \([\d.]+, onepass\)"):
        res = lk.spectral_init(layer, batches, loss, mode="onepass", sketch_size=4, error_tol=0.01, progress=False)
    assert res.errors["0"] > 0.01


def test_bad_mode_and_options_name_the_valid_values():
    with pytest.raises(ValueError, match=r"mode must be one of \('auto', 'exact', 'onepass', 'sketch'\), got 'fast'"):
        lk.spectral_init(make_model(), make_batches(), loss_fn, mode="fast")
    for kw, name in ((dict(memory_budget=0), "memory_budget"), (dict(sketch_size=1.5), "sketch_size"),
                     (dict(error_tol=-1), "error_tol")):
        with pytest.raises(ValueError, match=name):
            lk.spectral_init(make_model(), make_batches(), loss_fn, **kw)


def test_onepass_on_a_bf16_model_matches_fp64_sketch_products():
    """bf16 activations go through the sketch without an fp32 copy of x or dY and still give the init of
    the bf16 model's gradient (to bf16 accuracy of the model itself)."""
    model = make_model(torch.bfloat16).eval()
    twin = copy.deepcopy(model)
    batches = make_batches(dtype=torch.bfloat16)
    lk.spectral_init(twin, batches, loss_fn, mode="exact", progress=False)
    lk.spectral_init(model, batches, loss_fn, mode="onepass", sketch_size=20, progress=False, error_tol=1.0)
    for n, m in lk.lora_modules(model).items():
        assert rel_err(m.delta_weight(), lk.lora_modules(twin)[n].delta_weight()) < 5e-2, n


def test_in_place_ops_after_a_layer_on_3d_input():
    """F.linear's output for a 3-D input is a view; the tap hands it on without a copy, and an in-place op
    after the layer still leaves the captured gradient exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(inplace=True), nn.Linear(16, 7)).double()
    lk.apply_lora(model, r=2, exclude=())
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 5, 20, generator=g, dtype=torch.float64),
                torch.randn(3, 5, 7, generator=g, dtype=torch.float64)) for _ in range(2)]
    G = lk.capture_gradients(model, batches, loss_fn)
    ref = autograd_weight_grads(model, batches)
    assert sorted(G) == ["0", "2"] and all(rel_err(G[n], ref[n]) < 1e-12 for n in G)

"""lk.optim.PreconditionedAdamW / ScaledGD and lk.spectral_init on peft models (issue 16 item 2).

A 2-layer LLaMA from a config wrapped by peft.get_peft_model(LoraConfig(r=4, lora_alpha=8, q/v/gate_proj)) is
compared with the same base converted to lorakern layers (lk.apply_lora with the same targets, r and alpha,
the same adapter values): the optimizers step for step, and against a float64 reference of the preconditioned
update; spectral_init (LoRA-One exact and sketch, LoRA-GA) in delta weights, base weights and outputs; the
results saved with peft's save_pretrained and loaded with PeftModel.from_pretrained onto the original base
(LoRA-GA through peft's path_initial_model_for_weight_conversion); fan_in_fan_out (GPT-2 Conv1D) against
autograd's weight gradient; mixed models; bad input.
~12 s on the 2-core CPU machine (pytest reports ~7 s; the rest is importing torch, transformers and peft)."""
import copy
import warnings

import pytest
import torch

import lorakern as lk
from conftest import rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from test_peft_accel import tiny_llama  # noqa: E402  the same 2-layer LLaMA (vocab 300, hidden 64)

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "gate_proj"]
PREFIX = "base_model.model."
FP32_STEP_TOL = 1e-6  # measured: ~5e-8 after 4 steps (peft's forward vs lorakern's op, fp32)
INIT_TOL = 1e-5




@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (2, 12), generator=g) for _ in range(3)]


def loss_fn(model, ids):
    return model(input_ids=ids, labels=ids).loss


def peft_model(base, random_b=False, **config):
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **config))
    if random_b:  # a non-zero adapter, so that lora_A gets a gradient from the first step
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def peft_layers(model):
    return {n[len(PREFIX):]: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.layer.Linear)}


def lorakern_twin(base, pm, head=False):
    """The base converted to lorakern layers with the peft model's adapter values (and a trainable lm_head
    for a peft model with modules_to_save=["lm_head"])."""
    model = copy.deepcopy(base)
    lk.apply_lora(model, target_modules=TARGETS, r=4, alpha=8)
    layers = peft_layers(pm)
    assert set(lk.lora_modules(model)) == set(layers) and len(layers) == 6
    with torch.no_grad():
        for n, m in lk.lora_modules(model).items():
            assert m.scaling == layers[n].scaling["default"] == 2.0
            m.lora_A.copy_(layers[n].lora_A["default"].weight)
            m.lora_B.copy_(layers[n].lora_B["default"].weight)
    if head:
        model.lm_head.weight.requires_grad_(True)
    return model


def factor_pairs(pm, twin):
    """[(peft factor, lorakern factor), ...] for every A and B of every layer."""
    layers = lk.lora_modules(twin)
    return [(getattr(p, f"lora_{w}")["default"].weight, getattr(layers[n], f"lora_{w}"))
            for n, p in peft_layers(pm).items() for w in "AB"]


def delta(m):
    """scaling * B A of a LoRALinear or of a peft layer's default adapter, float64."""
    if isinstance(m, lk.LoRALinear):
        return m.scaling * (m.lora_B.double() @ m.lora_A.double())
    return m.scaling["default"] * (m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double())


# -- optimizers ---------------------------------------------------------------------------------------------

def test_pairs_found_in_peft_layers(base):
    pm = peft_model(base, modules_to_save=["lm_head"])
    opt = lk.optim.PreconditionedAdamW(pm)
    pairs, plain = opt.param_groups
    expected = [t for m in peft_layers(pm).values()
                for t in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    assert pairs["lora_pairs"] and [id(p) for p in pairs["params"]] == [id(p) for p in expected]
    head = pm.base_model.model.lm_head
    assert not plain["lora_pairs"] and [id(p) for p in plain["params"]] == [id(head.modules_to_save["default"].weight)]
    assert not head.original_module.weight.requires_grad
    layers = list(peft_layers(pm).values())  # an iterable of peft layers, as of LoRALinear modules
    assert [id(p) for p in lk.optim.ScaledGD(layers + layers[:1]).param_groups[0]["params"]] == [id(p) for p in expected]
    dora = peft_model(base, use_dora=True)  # DoRA: (A, B) paired, the magnitudes in the plain group
    pairs, plain = lk.optim.ScaledGD(dora).param_groups
    assert len(pairs["params"]) == 12 and len(plain["params"]) == 6
    assert all("lora_magnitude_vector" in n for n, p in dora.named_parameters()
               if id(p) in {id(q) for q in plain["params"]})


def test_frozen_adapter_left_out_and_trainable_second_adapter_paired(base):
    pm = peft_model(base)
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    layers = peft_layers(pm)
    frozen = {id(p) for m in layers.values() if "other" in m.lora_A
              for p in (m.lora_A["other"].weight, m.lora_B["other"].weight)}
    assert len(frozen) == 4 and not any(p.requires_grad for m in layers.values() if "other" in m.lora_A
                                        for p in (m.lora_A["other"].weight, m.lora_B["other"].weight))
    opt = lk.optim.ScaledGD(pm, lr=0.1)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 12
    assert not frozen & {id(p) for p in opt.param_groups[0]["params"]}
    for m in layers.values():  # the second adapter made trainable: its pairs join, rank 2 next to rank 4
        if "other" in m.lora_A:
            m.lora_A["other"].weight.requires_grad_(True)
            m.lora_B["other"].weight.requires_grad_(True)
    params = lk.optim.ScaledGD(pm, lr=0.1).param_groups[0]["params"]
    assert len(params) == 16 and frozen <= {id(p) for p in params}


@pytest.mark.parametrize("cls, kw", [
    (lk.optim.PreconditionedAdamW, dict(lr=1e-3, damping=1e-4, weight_decay=0.01)),
    (lk.optim.PreconditionedAdamW, dict(lr=1e-3, damping=1e-4, normalize="fro", order="gauss-seidel")),
    (lk.optim.ScaledGD, dict(lr=0.05, damping=1e-4, weight_decay=0.01)),
])
def test_optimizer_steps_match_lorakern_model(base, batches, cls, kw):
    """Each model computes its own loss and gradients (peft's forward vs lorakern's op) and steps its own
    optimizer; factors and the modules_to_save head agree after 4 steps."""
    pm = peft_model(base, random_b=True, modules_to_save=["lm_head"])
    twin = lorakern_twin(base, pm, head=True)
    opts = [cls(pm, **kw), cls(twin, **kw)]
    assert [len(g["params"]) for g in opts[0].param_groups] == [len(g["params"]) for g in opts[1].param_groups] == [12, 1]
    for step in range(4):
        for model, opt in zip((pm, twin), opts):
            opt.zero_grad()
            loss_fn(model, batches[step % len(batches)]).backward()
            opt.step()
    worst = max(rel_err(p, q) for p, q in factor_pairs(pm, twin))
    head = rel_err(pm.base_model.model.lm_head.modules_to_save["default"].weight, twin.lm_head.weight)
    assert worst < FP32_STEP_TOL and head < FP32_STEP_TOL, (worst, head)
    moved = rel_err(peft_layers(pm)["model.layers.0.self_attn.q_proj"].lora_A["default"].weight,
                    peft_layers(peft_model(base))["model.layers.0.self_attn.q_proj"].lora_A["default"].weight)
    assert moved > 1e-4  # the factors did move


def reference_step(A, B, gA, gB, damping, adam_state=None, lr=1e-3, wd=0.0, betas=(0.9, 0.999), eps=1e-8):
    """float64: gA <- (B^T B + damping I)^-1 gA, gB <- gB (A A^T + damping I)^-1, then AdamW (adam_state a
    dict it keeps) or SGD (adam_state None) with decoupled weight decay; returns the new (A, B)."""
    A, B, gA, gB = (t.double() for t in (A, B, gA, gB))
    eye = torch.eye(A.shape[0], dtype=torch.float64)
    pA = torch.linalg.solve(B.T @ B + damping * eye, gA)
    pB = torch.linalg.solve(A @ A.T + damping * eye, gB.T).T
    out = []
    for name, p, g in (("A", A, pA), ("B", B, pB)):
        p = p * (1 - lr * wd)
        if adam_state is None:
            out.append(p - lr * g)
            continue
        m, v, t = adam_state.get(name, (torch.zeros_like(g), torch.zeros_like(g), 0))
        t += 1
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        adam_state[name] = (m, v, t)
        out.append(p - lr / (1 - betas[0] ** t) * m / ((v / (1 - betas[1] ** t)).sqrt() + eps))
    return out


@pytest.mark.parametrize("adam", [True, False])
def test_optimizer_matches_float64_reference(base, batches, adam):
    """Two steps with fixed gradients (the peft model's first ones) against the float64 reference."""
    pm = peft_model(base, random_b=True)
    damping, lr, wd = 1e-3, (1e-3 if adam else 0.05), 0.01
    opt = (lk.optim.PreconditionedAdamW(pm, lr=lr, damping=damping, weight_decay=wd) if adam
           else lk.optim.ScaledGD(pm, lr=lr, damping=damping, weight_decay=wd))
    loss_fn(pm, batches[0]).backward()
    layers = peft_layers(pm)
    start = {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
                 m.lora_A["default"].weight.grad.clone(), m.lora_B["default"].weight.grad.clone())
             for n, m in layers.items()}
    ref = {n: (A, B) for n, (A, B, _, _) in start.items()}
    states = {n: ({} if adam else None) for n in layers}
    for _ in range(2):
        opt.step()  # the same .grad both steps
        for n, (_, _, gA, gB) in start.items():
            ref[n] = reference_step(*ref[n], gA, gB, damping, states[n], lr=lr, wd=wd)
    worst = max(rel_err(w, r) for n, m in layers.items()
                for w, r in zip((m.lora_A["default"].weight, m.lora_B["default"].weight), ref[n]))
    moved = min(rel_err(m.lora_A["default"].weight, start[n][0]) for n, m in layers.items())
    assert worst < FP32_STEP_TOL and moved > 1e-5, (worst, moved)


def test_mixed_lorakern_and_peft_layers(base, batches):
    """LoRALinear on k_proj, then peft on q/v/gate: one optimizer holds both kinds of pairs, spectral_init
    initializes both."""
    model = copy.deepcopy(base)
    lk.apply_lora(model, target_modules=["k_proj"], r=2, alpha=4)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    ours = lk.lora_modules(model)
    assert len(ours) == 2 and len(peft_layers(model)) == 6
    for m in ours.values():  # peft froze what it does not know; train both kinds
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    params = lk.optim.PreconditionedAdamW(model).param_groups[0]["params"]
    ids = {id(p) for p in params}
    assert len(params) == 16 and all(id(m.lora_A) in ids and id(m.lora_B) in ids for m in ours.values())
    spectra = lk.spectral_init(model, batches, loss_fn, method="lora-one", mode="exact", progress=False)
    assert len(spectra) == 8
    for m in list(ours.values()) + list(peft_layers(model).values()):
        assert delta(m).norm() > 0


# -- spectral_init --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["exact", "sketch"])
@pytest.mark.parametrize("accelerated", [False, True])
def test_lora_one_matches_lorakern_model(base, batches, mode, accelerated):
    pm = peft_model(base)
    twin = lorakern_twin(base, pm)
    if accelerated:
        lk.accelerate(pm)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in peft_layers(pm).items()}
    got = lk.spectral_init(pm, batches, loss_fn, method="lora-one", mode=mode, progress=False)
    want = lk.spectral_init(twin, batches, loss_fn, method="lora-one", mode=mode, progress=False)
    assert {n[len(PREFIX):] for n in got} == set(want)
    ours = lk.lora_modules(twin)
    worst = max(rel_err(delta(m), delta(ours[n])) for n, m in peft_layers(pm).items())
    spec = max(rel_err(got[PREFIX + n], want[n]) for n in want)
    assert worst < INIT_TOL and spec < INIT_TOL, (worst, spec)
    for n, m in peft_layers(pm).items():
        assert torch.equal(m.base_layer.weight, weights[n])  # lora-one leaves the base alone
        assert delta(m).norm() > 0
        assert m.lora_A["default"].weight.requires_grad and m.lora_B["default"].weight.requires_grad
        assert m.lora_A["default"].weight.grad is None


def test_lora_one_saves_and_loads_with_peft(base, batches, tmp_path):
    pm = peft_model(base)
    lk.spectral_init(pm, batches, loss_fn, method="lora-one", mode="exact", progress=False)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        for ids in batches:
            err = rel_err(loaded(input_ids=ids).logits, pm(input_ids=ids).logits)
            assert err < INIT_TOL, err
            assert rel_err(base(input_ids=ids).logits, pm(input_ids=ids).logits) > 1e-4  # the init shows


def test_lora_ga_matches_lorakern_model_and_round_trips_through_peft(base, batches, tmp_path):
    """LoRA-GA: the same factors and modified base weights as on lorakern layers, outputs unchanged at init;
    after training, peft's path_initial_model_for_weight_conversion gives an adapter for the original base."""
    pm = peft_model(base)
    twin = lorakern_twin(base, pm)
    with torch.no_grad():
        before = [pm(input_ids=ids).logits for ids in batches]
    lk.spectral_init(pm, batches, loss_fn, method="lora-ga", mode="exact", progress=False)
    lk.spectral_init(twin, batches, loss_fn, method="lora-ga", mode="exact", progress=False)
    ours = lk.lora_modules(twin)
    worst = max(max(rel_err(m.lora_A["default"].weight, ours[n].lora_A), rel_err(m.lora_B["default"].weight,
                                                                             ours[n].lora_B),
                    rel_err(m.base_layer.weight, ours[n].weight)) for n, m in peft_layers(pm).items())
    assert worst < INIT_TOL, worst
    with torch.no_grad():
        for ids, ref in zip(batches, before):
            assert rel_err(pm(input_ids=ids).logits, ref) < INIT_TOL  # the offset keeps the output
        assert any(rel_err(m.base_layer.weight, base.get_submodule(n).weight) > 1e-6
                   for n, m in peft_layers(pm).items())

    init_dir, out_dir, plain_dir = tmp_path / "ga-init", tmp_path / "out", tmp_path / "plain"
    pm.save_pretrained(init_dir)
    opt = lk.optim.PreconditionedAdamW(pm, lr=1e-2, damping=1e-4)
    for ids in batches:
        opt.zero_grad()
        loss_fn(pm, ids).backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(out_dir, path_initial_model_for_weight_conversion=str(init_dir))
        pm.save_pretrained(plain_dir)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out_dir).eval()
    assert loaded.peft_config["default"].r == 8
    plain = PeftModel.from_pretrained(copy.deepcopy(base), plain_dir).eval()
    pm.eval()
    with torch.no_grad():
        for ids in batches:
            want = pm(input_ids=ids).logits
            assert rel_err(loaded(input_ids=ids).logits, want) < INIT_TOL
            assert rel_err(plain(input_ids=ids).logits, want) > 1e-4  # why the conversion is needed


def test_lora_ga_on_nonzero_peft_adapter_raises(base, batches):
    pm = peft_model(base, random_b=True)
    weights = [p.detach().clone() for p in pm.parameters()]
    with pytest.raises(ValueError, match="zero init.*path_initial_model_for_weight_conversion"):
        lk.spectral_init(pm, batches, loss_fn, method="lora-ga", mode="exact", progress=False)
    assert all(torch.equal(p, w) for p, w in zip(pm.parameters(), weights))  # nothing changed


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


@pytest.mark.parametrize("method", ["lora-one", "lora-ga"])
def test_fan_in_fan_out_conv1d(batches, method):
    """GPT-2's Conv1D stores W as (in, out): the init matches LoRA-One / LoRA-GA of autograd's dL/dW^T (fp64
    model: the capture accumulates in fp64, so the singular vectors r+1..2r LoRA-GA uses are compared tightly)."""
    tol = 1e-9
    gpt = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(gpt), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                            fan_in_fan_out=True))
    ref = copy.deepcopy(gpt)
    ref.requires_grad_(False)
    names = [n for n, _ in ref.named_modules() if n.endswith(("c_attn", "c_fc"))]
    for n in names:
        ref.get_submodule(n).weight.requires_grad_(True)
    for ids in batches:  # unscaled: transformers computes the loss in fp32, a scaled one rounds differently
        loss_fn(ref, ids).backward()
    with torch.no_grad():
        before = pm(input_ids=batches[0]).logits
    lk.spectral_init(pm, batches, loss_fn, method=method, mode="exact", progress=False)
    for n in names:
        m = pm.get_submodule(PREFIX + n)
        G = ref.get_submodule(n).weight.grad.T / len(batches)  # (out, in), the mean over batches
        if method == "lora-one":
            A, B = lk.init.lora_one(G, 2)
            assert rel_err(delta(m), 2.0 * (B @ A)) < tol
        else:
            A, B, _ = lk.init.lora_ga(G, 2, scaling=2.0)
            gotA, gotB = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
            # singular vectors are defined up to sign: align each row of A and column of B with the reference
            sa = torch.sign((gotA * A).sum(1, keepdim=True))
            sb = torch.sign((gotB * B).sum(0, keepdim=True))
            assert rel_err(gotA * sa, A) < tol and rel_err(gotB * sb, B) < tol
            W0 = ref.get_submodule(n).weight.detach().double()
            # the (in, out) weight got the offset scaling * (B A)^T of the factors it holds
            assert rel_err(m.base_layer.weight, W0 - delta(m).T) < tol < 1e-6 < rel_err(m.base_layer.weight, W0)
    if method == "lora-ga":
        with torch.no_grad():
            assert rel_err(pm(input_ids=batches[0]).logits, before) < tol


def test_peft_layer_checks(base, batches):
    pm = peft_model(base)
    with pm.disable_adapter():
        with pytest.raises(ValueError, match="disabled"):
            lk.spectral_init(pm, batches, loss_fn, mode="exact", progress=False)
    dora = peft_model(base, use_dora=True)
    with pytest.raises(ValueError, match="LoRA variant"):
        lk.spectral_init(dora, batches, loss_fn, mode="exact", progress=False)
    pm.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        lk.spectral_init(pm, batches, loss_fn, mode="exact", progress=False)
    pm.unmerge_adapter()
    emb = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    with pytest.warns(RuntimeWarning, match="keep their init.*embed_tokens"):
        spectra = lk.spectral_init(emb, batches, loss_fn, mode="exact", progress=False)
    assert len(spectra) == 2


def test_models_without_lora_layers_raise(base, batches):
    plain = copy.deepcopy(base)
    for cls in (lk.optim.PreconditionedAdamW, lk.optim.ScaledGD):
        with pytest.raises(ValueError, match="has no LoRALinear layers and no peft LoRA Linear layers.*apply_lora"):
            cls(plain)
    with pytest.raises(ValueError, match="no LoRALinear layers and no peft LoRA Linear layers"):
        lk.spectral_init(plain, batches, loss_fn, mode="exact", progress=False)
    emb = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="not a plain lora_B @ lora_A \\(Embedding"):
        lk.optim.ScaledGD(emb)


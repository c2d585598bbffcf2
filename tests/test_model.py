"""apply_lora and the model-level helpers on a small transformer-shaped model."""
import pytest
import torch
from torch import nn

import lorakern as lk
from conftest import randomize_adapter, rel_err


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d + 3), nn.GELU(), nn.Linear(2 * d + 3, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, h):
        return h + self.mlp(self.norm(h + self.v_proj(torch.tanh(self.q_proj(h)))))


class Toy(nn.Module):
    def __init__(self, vocab=37, d=20, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.lm_head(h)


ALL = ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.0.mlp.0", "blocks.0.mlp.2",
       "blocks.1.q_proj", "blocks.1.v_proj", "blocks.1.mlp.0", "blocks.1.mlp.2"]


@pytest.fixture
def model():
    return Toy()


def ids():
    return torch.randint(0, 37, (3, 5))


def test_all_linear_excludes_lm_head_and_freezes_the_rest(model):
    x = ids()
    before = model(x)
    names = lk.apply_lora(model, r=4, alpha=8)
    assert sorted(names) == sorted(ALL)
    assert sorted(lk.lora_modules(model)) == sorted(ALL)
    assert type(model.lm_head) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{w}" for n in ALL for w in "AB"}
    assert torch.equal(model(x), before)  # B = 0: unchanged at init


@pytest.mark.parametrize("target, exclude, expected", [
    (["q_proj", "v_proj"], (), [n for n in ALL if n.endswith("_proj")]),
    (r"blocks\.1\..*", ("lm_head",), [n for n in ALL if n.startswith("blocks.1")]),
    ("all-linear", ("q_proj", "mlp.2", "lm_head"), [n for n in ALL if n.endswith(("v_proj", "mlp.0"))]),
    ("all-linear", (), ALL + ["lm_head"]),
    ("lm_head", (), ["lm_head"]),
])
def test_targeting(model, target, exclude, expected):
    assert sorted(lk.apply_lora(model, target_modules=target, exclude=exclude, r=2)) == sorted(expected)
    assert all(isinstance(model.get_submodule(n), lk.LoRALinear) for n in expected)


def test_options_reach_every_layer(model):
    lk.apply_lora(model, r=4, alpha=16, dropout=0.1, rslora=True, init="gaussian", adapter_dtype=torch.float64)
    for m in lk.lora_modules(model).values():
        assert (m.r, m.alpha, m.dropout, m.rslora, m.scaling) == (4, 16, 0.1, True, 8.0)
        assert m.lora_A.dtype == torch.float64 and m.lora_A.abs().sum() > 0


def test_errors_leave_the_model_unchanged(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"entries \['k_proj'\] match no module"):
        lk.apply_lora(model, target_modules=["k_proj"])
    with pytest.raises(ValueError, match=r"entries \['q_porj'\] match no module"):  # one typo is enough
        lk.apply_lora(model, target_modules=["v_proj", "q_porj"])
    with pytest.raises(ValueError, match="init must be one of"):
        lk.apply_lora(model, init="bogus")

    def bad_second(weight, r, calls=[]):  # fails on the second layer, after the first was wrapped
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("init failed")
        return lk.init.lora(weight, r)

    with pytest.raises(RuntimeError, match="init failed"):
        lk.apply_lora(model, init=bad_second)
    with pytest.raises(ValueError, match="matches no module"):
        lk.apply_lora(model, target_modules=r"blocks\.9\..*")
    with pytest.raises(TypeError, match="'embed' is a Embedding, not a torch.nn.Linear"):
        lk.apply_lora(model, target_modules=["embed", "q_proj"])
    with pytest.raises(ValueError, match=r"r \(for 'blocks.0.q_proj'\)=21.*min"):  # PiSSA: r <= min(in, out) = 20
        lk.apply_lora(model, r=21, init="pissa")
    with pytest.raises(ValueError, match=r"r \(for 'blocks.0.q_proj'\)=0 must be >= 1"):
        lk.apply_lora(model, r=0)
    with pytest.raises(TypeError, match="'blocks.0.mlp' is a Sequential"):
        lk.apply_lora(model, target_modules=["mlp"])
    with pytest.raises(TypeError, match="'embed' is a Embedding"):
        lk.apply_lora(model, target_modules="emb.*")
    with pytest.raises(ValueError, match="alpha"):
        lk.apply_lora(model, alpha=-1.0)
    with pytest.raises(ValueError, match="valid regex"):
        lk.apply_lora(model, target_modules="blocks.(")
    with pytest.raises(TypeError, match="model must be"):
        lk.apply_lora("model")
    assert not lk.lora_modules(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_apply_twice_is_an_error_but_other_targets_can_be_added(model):
    lk.apply_lora(model, target_modules=["q_proj"], r=2)
    with pytest.raises(ValueError, match="already a LoRALinear"):
        lk.apply_lora(model, target_modules=["q_proj"], r=2)
    lk.apply_lora(model, target_modules=["v_proj"], r=3)
    assert {m.r for m in lk.lora_modules(model).values()} == {2, 3}
    # the first call's adapters still train
    assert all(m.lora_A.requires_grad and m.lora_B.requires_grad for m in lk.lora_modules(model).values())


def test_merge_unmerge_remove(model):
    lk.apply_lora(model, r=3)
    for m in lk.lora_modules(model).values():
        randomize_adapter(m, 0.2)
    x = ids()
    y = model(x)
    lk.merge_lora(model)
    assert all(m.merged for m in lk.lora_modules(model).values())
    assert rel_err(model(x), y) < 1e-5
    with pytest.raises(ValueError, match="already merged"):
        lk.merge_lora(model)
    lk.unmerge_lora(model)
    assert rel_err(model(x), y) < 1e-5
    lk.remove_lora(model, merge=True)
    assert not lk.lora_modules(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in ALL)
    assert rel_err(model(x), y) < 1e-5
    with pytest.raises(ValueError, match="no LoRALinear"):
        lk.merge_lora(model)


def test_remove_without_merge_restores_the_base(model):
    x = ids()
    base = model(x)
    lk.apply_lora(model, r=3)
    for m in lk.lora_modules(model).values():
        randomize_adapter(m)
    assert not torch.allclose(model(x), base)
    lk.merge_lora(model)
    lk.remove_lora(model, merge=False)
    assert rel_err(model(x), base) < 1e-5 and not lk.lora_modules(model)


def test_training_moves_only_the_adapters(model):
    lk.apply_lora(model, r=4, alpha=8)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    target = torch.randint(0, 37, (3, 5))
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if k in frozen)


def test_eval_mode_is_kept():
    model = Toy().eval()
    lk.apply_lora(model, r=2, dropout=0.5)
    assert not any(m.training for m in lk.lora_modules(model).values())
    for m in lk.lora_modules(model).values():
        randomize_adapter(m)
    x = ids()
    assert torch.equal(model(x), model(x))  # no dropout at inference
    lk.remove_lora(model, merge=True)
    assert not any(m.training for m in model.modules())


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a  # the same module under two names
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight  # tied weights

    def forward(self, ids):
        return self.head(self.b(self.a(self.emb(ids))))


def test_shared_module_becomes_one_lora_layer_under_all_names():
    model = Shared()
    names = lk.apply_lora(model, target_modules=["a"], r=2)
    assert names == ["a"] and model.a is model.b and isinstance(model.b, lk.LoRALinear)
    randomize_adapter(model.a)
    x = torch.randint(0, 10, (2, 3))
    y = model(x)
    lk.merge_lora(model)
    assert rel_err(model(x), y) < 1e-5


def test_tied_weights_refuse_to_merge():
    model = Shared()
    lk.apply_lora(model, target_modules=["head"], r=2, exclude=())
    randomize_adapter(model.head)
    with pytest.raises(ValueError, match=r"tied to other modules.*head.*emb"):
        lk.merge_lora(model)
    with pytest.raises(ValueError, match="tied"):
        lk.remove_lora(model, merge=True)
    assert not model.head.merged


def test_pissa_refuses_tied_weights_and_leaves_the_model_unchanged():
    """PiSSA writes the residual into the base weight: into a tied embedding too (review 2: BERT's
    decoder changed the word embeddings by 53%)."""
    model = Shared()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"pissa.*tied.*head.*emb"):
        lk.apply_lora(model, r=2, exclude=(), init="pissa")
    assert not lk.lora_modules(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert lk.apply_lora(model, r=2, exclude=("head",), init="pissa") == ["a"]
    tied = Shared()
    lk.apply_lora(tied, target_modules=["head"], r=2, exclude=())
    with pytest.raises(ValueError, match="tied"):
        tied.head.reset_lora_parameters("pissa")
    with pytest.raises(ValueError, match="tied"):
        lk.apply_lora(Shared(), target_modules=["head"], r=2, exclude=(), init=lk.init.pissa)  # the function too


class WithOutputEmbeddings(Shared):
    """A Hugging Face-style model: get_output_embeddings names its output layer (not called lm_head)."""

    def get_output_embeddings(self):
        return self.head


def test_all_linear_leaves_out_the_output_embeddings_as_peft_does():
    model = WithOutputEmbeddings()
    assert lk.apply_lora(model, r=2, exclude=()) == ["a"]
    assert lk.apply_lora(WithOutputEmbeddings(), target_modules=["head"], r=2, exclude=()) == ["head"]  # explicit


class Doubling(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.up = Doubling(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, h):
        return self.out(self.up(self.attn(h, h, h)[0]))


def test_linears_whose_forward_is_bypassed_or_overridden_are_not_adapted():
    model = WithAttention()
    assert lk.apply_lora(model, r=2, exclude=()) == ["out"]
    with pytest.raises(TypeError, match="MultiheadAttention's output projection"):
        lk.apply_lora(WithAttention(), target_modules=["out_proj"], r=2)
    with pytest.raises(TypeError, match="Doubling with its own forward"):
        lk.apply_lora(WithAttention(), target_modules=["up"], r=2)
    with pytest.raises(TypeError, match="no adaptable Linear"):
        lk.apply_lora(WithAttention(), target_modules=r"attn\..*", r=2)


def test_root_module_cases():
    with pytest.raises(ValueError, match="no submodules"):
        lk.apply_lora(nn.Linear(4, 4))
    layer = lk.LoRALinear(4, 4, r=2)
    lk.merge_lora(layer)  # works on a bare layer
    with pytest.raises(ValueError, match="to_linear"):
        lk.remove_lora(layer)
    with pytest.raises(ValueError, match="itself a LoRALinear"):
        lk.save_adapter(layer, "/nonexistent/dir")

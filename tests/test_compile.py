"""torch.compile(model) of a tiny Hugging Face LLaMA with LoRALinear layers: one graph for the whole model
(fullgraph=True, so no break at the LoRA layers), and the same loss, logits and adapter gradients as eager,
with inductor (the default torch.compile backend; on the CPU it generates and compiles C++, ~15-30 s on a
cold cache for both backends together) on the "auto" backend (the C++ custom ops, which must stay in the compiled
graph as extern calls) and the "torch" backend (plain aten ops that inductor fuses). The Triton backend has its
own compile test (test_lora_linear_triton.py)."""
import pytest
import torch
from torch._inductor.utils import run_and_get_code

import lorakern as lk
from conftest import randomize_adapter, rel_err

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# fp32; inductor fuses and reorders the reductions of RMSNorm, softmax and the cross-entropy, which moves
# results by a few fp32 ulps (measured <= 1e-6 relative here); 1e-4 is far below any real error.
TOL = 1e-4


def tiny_lora_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    model = transformers.LlamaForCausalLM(config)
    lk.apply_lora(model, target_modules=TARGETS, r=4, alpha=8)
    for layer in lk.lora_modules(model).values():
        randomize_adapter(layer, std=0.1)  # B != 0, so the adapters shape the output and get both gradients
    return model


def loss_logits_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    layers = lk.lora_modules(getattr(model, "_orig_mod", model))  # the compiled wrapper shares the layers
    grads = {n: (m.lora_A.grad.clone(), m.lora_B.grad.clone()) for n, m in layers.items()}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compiled_hf_model_matches_eager(backend):
    lk.set_backend(backend)
    model = tiny_lora_llama()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    loss_ref, logits_ref, grads_ref = loss_logits_grads(model, ids)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    # the first call compiles the forward and (at .backward()) the backward graph: keep their generated code
    (loss, logits, grads), code = run_and_get_code(loss_logits_grads, compiled, ids)
    code = "\n".join(code)
    calls_cpp_ops = all(f"torch.ops.lorakern.lora_{f}" in code for f in ("forward", "backward"))
    assert calls_cpp_ops == (backend == "auto")

    assert rel_err(loss, loss_ref) < TOL and rel_err(logits, logits_ref) < TOL
    for name, (gA_ref, gB_ref) in grads_ref.items():
        gA, gB = grads[name]
        assert rel_err(gA, gA_ref) < TOL and rel_err(gB, gB_ref) < TOL, name


"""pytest-benchmark suite for one optimizer step: `pytest benchmarks/test_optim.py --benchmark-only`.
LLaMA-7B adapter shapes on CUDA (4 of the 32 blocks, r=16), small ones on the CPU; the full comparison with
ratios is benchmarks/optim_bench.py."""
import pytest
import torch

import lorakern as lk
from optim_bench import adapter_shapes, build_grads, build_pairs, build_variant

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = dict(layers=4, hidden=4096, intermediate=11008) if DEVICE.type == "cuda" else \
    dict(layers=2, hidden=512, intermediate=1376)


@pytest.mark.parametrize("variant", ["adamw", "lorakern", "lk-torch", "eager", "peft"])
def test_optimizer_step(benchmark, variant):
    pairs = build_pairs(adapter_shapes(**SIZE), 16, torch.float32, DEVICE)
    built = build_variant(variant, pairs, build_grads(pairs), 16, DEVICE, lr=1e-4, damping=1e-6, order="jacobi")
    if built is None:
        pytest.skip(f"{variant} is not installed")
    step, setup, _ = built

    def run():
        setup()
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"optimizer step {SIZE}"
    benchmark(run)
    lk.set_backend("auto")

"""pytest-benchmark suite: `pytest benchmarks/ --benchmark-only` (make bench). Small CPU-sized shapes unless
CUDA is present; the comparison table with ratios is benchmarks/lora_linear_bench.py."""
import pytest
import torch

from lora_linear_bench import build_variants, design

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(8192, 4096, 4096), (2048, 4096, 4096)] if DEVICE.type == "cuda" else [(512, 1024, 1024)]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["frozen", "lk-auto", "lk-cublas", "lk-hybrid", "lk-fused", "eager", "peft"])
def test_forward_backward(benchmark, shape, variant):
    M, k, n = shape
    mods = build_variants(M, k, n, 16, DTYPE, DEVICE)
    if variant not in mods:
        pytest.skip(f"{variant} is not installed or does not run on {DEVICE.type}")
    mod = mods[variant]
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, n, device=DEVICE, dtype=DTYPE)

    def step():
        x.grad = None
        mod(x).backward(dy)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"fwd+bwd {'x'.join(map(str, shape))}"
    with design(variant, DEVICE):
        benchmark(step)

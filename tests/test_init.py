import math

import pytest
import torch

import lorakern as lk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lora_init(dtype):
    W = torch.randn(70, 300, dtype=dtype)
    A, B = lk.init.lora(W, 6, generator=torch.Generator().manual_seed(0))
    assert A.shape == (6, 300) and B.shape == (70, 6) and A.dtype == B.dtype == dtype
    assert torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(300)
    assert A.abs().max() <= bound * (1 + 1e-2) and A.float().std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    A2, _ = lk.init.lora(W, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(A, A2)


def test_gaussian_init():
    W = torch.randn(50, 400)
    A, B = lk.init.gaussian(W, 4)
    assert A.std().item() == pytest.approx(0.25, rel=0.1) and torch.count_nonzero(B) == 0
    A, _ = lk.init.gaussian(W, 4, std=0.01)
    assert A.std().item() == pytest.approx(0.01, rel=0.1)
    with pytest.raises(ValueError, match="std"):
        lk.init.gaussian(W, 4, std=0.0)


def test_init_validates_arguments():
    with pytest.raises(ValueError, match="2-D"):
        lk.init.lora(torch.randn(5), 2)
    with pytest.raises(TypeError, match="floating"):
        lk.init.lora(torch.ones(5, 5, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="r=6 must satisfy"):  # r singular directions of a 5 x 8 matrix
        lk.init.pissa(torch.randn(5, 8), 6)
    with pytest.raises(ValueError, match="r=0"):
        lk.init.lora(torch.randn(5, 8), 0)
    A, B = lk.init.lora(torch.randn(5, 8), 6)  # an adapter wider than its layer, as in peft
    assert A.shape == (6, 8) and B.shape == (5, 6)


def test_callable_init_in_layer():
    def ones(weight, r):
        return torch.ones(r, weight.shape[1]), torch.full((weight.shape[0], r), 2.0)

    layer = lk.LoRALinear(5, 4, r=2, init=ones)
    assert torch.equal(layer.lora_B, torch.full((4, 2), 2.0))
    with pytest.raises(ValueError, match="expected"):
        layer.reset_lora_parameters(lambda w, r: (torch.ones(1, 5), torch.ones(4, 1)))

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be on before triton is imported.
if os.environ.get("LORAKERN_TEST_NO_INTERPRET") != "1":
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lorakern as lk  # noqa: E402
from lorakern import _backend  # noqa: E402

# Tolerances on the relative Frobenius error against a float64 reference (DEVELOPERS' correctness standard).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float64: 1e-12}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    torch.manual_seed(0)
    saved = _backend._settings
    yield
    _backend._settings = saved


@pytest.fixture(params=["cpp", "torch"])
def backend(request):
    """Runs a test on both CPU implementations: the C++ extension ("auto" on the CPU) and plain torch."""
    if request.param == "cpp":
        if not lk.backends()["cpp"]:
            pytest.fail("the C++ extension lorakern._C is not built")
        lk.set_backend("auto")
        assert _backend.resolve(torch.device("cpu")) == "cpp"
    else:
        lk.set_backend("torch")
    return request.param


def randomize_adapter(layer, std: float = 0.3):
    """Non-zero lora_B (its init is 0), so that tests see the adapter's contribution."""
    with torch.no_grad():
        layer.lora_A.normal_(0, std)
        layer.lora_B.normal_(0, std)
    return layer


@pytest.fixture
def one_thread():
    """Small models: one thread. Two OpenMP threads on a 2-core machine that another process keeps busy spin
    against each other and make such tests ~10x slower for nothing. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

"""`accelerate launch` with 2 CPU processes (gloo) equals one process on the global batch (issue 16 item 3):
tests/accelerate_peft_train.py trains a float64 tiny LLaMA's peft adapters with lorakern (lk.accelerate,
LoRA-One init through spectral_init's all-reduce, PreconditionedAdamW) under Hugging Face accelerate.

accelerate launches CPU processes with mpirun only (`--cpu --num_processes 2` without a hostfile runs one
process); `--multi_gpu` on a machine without a GPU starts them through torchrun instead, and the script's
Accelerator(cpu=True) then runs MULTI_CPU on gloo. The only difference between the runs is the order of the
float64 sums (per-rank means averaged vs one mean), ~1e-16 per gradient; TOL = 1e-10 catches a missing
all-reduce in the init (~1e-1) or an unsynchronized step."""
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import rel_err

pytest.importorskip("accelerate")
pytest.importorskip("peft")
pytest.importorskip("transformers")

SCRIPT = os.path.join(os.path.dirname(__file__), "accelerate_peft_train.py")
TOL = 1e-10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], out) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd + [str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a rank stuck in a collective: kill the launcher and every worker
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in 300 s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return {**torch.load(out / "losses.pt"), "adapters": torch.load(out / "adapters.pt")}


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_accelerate_launch_two_cpu_processes_equal_one(tmp_path):
    one = run([sys.executable, SCRIPT], tmp_path / "one")
    two = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), SCRIPT], tmp_path / "two")
    assert (one["processes"], one["distributed"]) == (1, "NO")
    assert (two["processes"], two["distributed"]) == (2, "MULTI_CPU")
    assert rel_err(two["losses"], one["losses"]) < 1e-6  # transformers computes the LM loss in fp32
    assert two["losses"][-1] < 0.95 * two["losses"][0]
    assert sorted(two["adapters"]) == sorted(one["adapters"]) and len(one["adapters"]) == 28
    for name, want in one["adapters"].items():
        assert rel_err(two["adapters"][name], want) < TOL, name

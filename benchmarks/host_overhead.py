"""Host (Python + dispatcher) time of one LoRA layer forward+backward, the part a GPU cannot hide at small M.

    python benchmarks/host_overhead.py [--json out.json]             # CPU: dispatch without launches
    python benchmarks/host_overhead.py --device cuda [--json out.json]  # GPU: with the real launches

On the CPU the Triton path runs with its kernels' launches replaced by no-ops (TRITON_INTERPRET=1 so the module
imports without a GPU), on tiny tensors: what lorakern's dispatch costs per layer besides Triton's own
launches (2 per forward, 4 per backward). On a GPU the tensors are as tiny and the launches real: the time per call
is the host's (the GPU idles between kernels), Triton's launch cost included. Peers on the same tensors in the same run: nn.Linear, peft's LoRA layer,
lorakern's torch and C++ paths. At M=2048, 4096->4096 the frozen layer's GPU time is 0.195 ms (issue 4):
host time above that makes the layer CPU-bound.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import sys  # noqa: E402

if "--device" not in sys.argv or sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernel module imports without a GPU

import torch  # noqa: E402

import lorakern as lk  # noqa: E402
from _report import print_table, save_json  # noqa: E402  benchmarks/ is the script folder, on sys.path


class _NoLaunch:
    """Stands for a Triton kernel: kernel[grid](**args) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _median_us(fn, n: int, device: torch.device, reps: int = 7) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(n // 10):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    x = torch.randn(8, 64, device=device, requires_grad=True)
    layers = {"nn.Linear": torch.nn.Linear(64, 64, device=device)}
    try:
        import peft
        layers["peft"] = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64, device=device)),
                                             peft.LoraConfig(r=16, target_modules=["0"]))
    except ImportError:
        pass
    ours = lk.LoRALinear.from_linear(torch.nn.Linear(64, 64, device=device), r=16)
    rows = []
    for name, module in layers.items():
        rows.append({"variant": name, "host_us": _median_us(lambda: module(x).sum().backward(), args.iters, device)})
    if device.type == "cpu":
        from lorakern.ops import lora_linear_triton as kt
        kt._xa_kernel = kt._dy_pass_kernel = kt._gemm_lowrank_kernel = kt._reduce_kernel = _NoLaunch()
        variants = (("torch", "auto", "lk torch"), ("auto", "auto", "lk C++"), ("triton", "fused", "lk fused*"),
                    ("triton", "hybrid", "lk hybrid*"))
    else:  # auto: the measured dispatch (the cuBLAS path where nothing was measured)
        variants = (("torch", "auto", "lk torch"), ("auto", "auto", "lk auto"), ("triton", "fused", "lk fused"),
                    ("triton", "hybrid", "lk hybrid"))
    for backend, design, name in variants:
        lk.set_backend(backend)
        lk.set_design(design)
        rows.append({"variant": name,
                     "host_us": _median_us(lambda: ours(x).sum().backward(), args.iters, device)})
    base = rows[0]["host_us"]
    for row in rows:
        row["x_linear"] = row["host_us"] / base
    print(f"host time per forward+backward on {device} (x (8, 64), r=16, 1 thread); * = Triton launches replaced "
          f"by no-ops")
    print_table(rows, [("variant", "variant", "", 12), ("host us", "host_us", ".1f", 9), ("x Linear", "x_linear", ".2f", 9)])
    return save_json(args.json, {"torch": torch.__version__, "device": str(device), "results": rows})


if __name__ == "__main__":
    main()

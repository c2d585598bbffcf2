"""The benchmark script runs end to end on a tiny odd shape and writes a JSON with every variant."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lora_linear_bench_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "lora_linear_bench.py"), "--device", "cpu",
           "--dtype", "fp32", "--shapes", "37x45x29", "--r", "3", "--warmup", "1", "--iters", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    variants = {row["variant"] for row in data["results"]}
    # stable names; on the CPU the designs that only exist on CUDA (lk-hybrid, lk-fused, compile) are left out
    assert {"frozen", "lk-auto", "lk-cublas", "eager", "peft"} == variants
    assert all(row["adapter_dtype"] == "fp32" for row in data["results"]) and data["complete"]
    frozen = next(r for r in data["results"] if r["variant"] == "frozen")
    assert frozen["fwd_bwd_ratio"] == 1.0 and all(r["fwd_bwd_ms"] > 0 for r in data["results"])


def test_spectral_init_bench_runs_and_agrees_with_exact(tmp_path):
    out = tmp_path / "si.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "spectral_init_bench.py"), "--device", "cpu",
           "--hidden", "64", "--intermediate", "96", "--layers", "2", "--heads", "4", "--vocab", "300",
           "--seq", "32", "--micro", "2", "--r", "4", "--ref-q", "16", "--n-iter", "6", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["lorakern"]["host_gib"] == 0.0 and data["reference"]["host_gib"] > 0
    # with enough power iterations the sketch reaches the exact LoRA-One init on this flat-spectrum toy
    assert data["lorakern"]["max_rel_err"] < 2e-2 and data["reference"]["max_rel_err"] < 1e-3


def test_optim_bench_small_writes_json(tmp_path):
    out = tmp_path / "optim.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "optim_bench.py"), "--device", "cpu", "--small",
           "--layers", "1", "--r", "3", "--warmup", "1", "--iters", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {row["variant"]: row for row in data["results"]}
    assert {"adamw", "lorakern", "eager", "peft"} <= set(rows)
    assert data["config"]["pairs"] == 7 and rows["adamw"]["ratio_vs_adamw"] == 1.0
    assert all(row["step_ms"] > 0 for row in rows.values())
    # the same preconditioned step as the eager per-pair form (fp32; step 1 of Adam is sign-like)
    assert rows["lorakern"]["max_rel_err_vs_eager"] < 1e-4 and rows["peft"]["max_rel_err_vs_eager"] < 1e-4


def test_e2e_step_small_writes_json_for_every_variant(tmp_path):
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "e2e_step.py"), "--device", "cpu", "--small",
           "--warmup", "1", "--iters", "2", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {row["variant"]: row for row in data["results"]}
    assert {"frozen", "lk-padamw", "lk-adamw", "peft", "peft-bf16", "peft-riemannian"} <= set(rows)
    assert rows["frozen"]["x_floor"] == 1.0 and rows["frozen"]["trainable_params"] == 0
    assert all(row["step_ms"] > 0 and row["tokens_per_s"] > 0 for row in rows.values())
    # the same LoRA layout in lorakern and peft; B = 0 at init, so every variant starts from the base's loss
    assert rows["lk-padamw"]["trainable_params"] == rows["peft"]["trainable_params"] > 0
    first = rows["frozen"]["first_loss"]
    assert all(abs(row["first_loss"] - first) <= 1e-3 * abs(first) for row in rows.values())


def test_host_overhead_script_runs(tmp_path):
    out = tmp_path / "host.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"), "--iters", "20", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert {"nn.Linear", "lk torch", "lk C++", "lk fused*", "lk hybrid*"} <= set(rows)  # host_overhead.py names
    assert all(r["host_us"] > 0 for r in rows.values())



def test_lora_linear_bench_selects_each_design_and_restores_the_settings():
    """lk-* variants run under lorakern.set_design on CUDA (selecting a design needs no GPU) and the torch path
    for lk-cublas on the CPU; the previous backend and design come back afterwards."""
    sys.path.append(os.path.join(ROOT, "benchmarks"))
    import torch
    import lorakern as lk
    from lora_linear_bench import DESIGNS, design
    saved = (lk.get_backend(), lk.get_design())
    try:
        lk.set_backend("auto")
        lk.set_design("auto")
        for variant, name in DESIGNS.items():
            with design(variant, torch.device("cuda")):
                assert (lk.get_backend(), lk.get_design()) == ("auto", name)
            assert (lk.get_backend(), lk.get_design()) == ("auto", "auto")
        with design("lk-cublas", torch.device("cpu")):
            assert lk.get_backend() == "torch"
        with design("peft", torch.device("cuda")):
            assert (lk.get_backend(), lk.get_design()) == ("auto", "auto")
        assert lk.get_backend() == "auto"
    finally:
        lk.set_backend(saved[0])
        lk.set_design(saved[1])


def test_peft_accel_bench_small_writes_json(tmp_path):
    out = tmp_path / "peft_accel.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "peft_accel_bench.py"), "--models", "llama", "--small",
           "--iters", "1", "--warmup", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["peft", "peft+lk"]
    assert all(r["step_ms"] > 0 and r["saved_mib"] > 0 for r in rows) and rows[0]["x_peft"] == 1.0

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
    assert {"frozen", "lorakern", "lk-torch", "eager", "peft"} <= variants
    frozen = next(r for r in data["results"] if r["variant"] == "frozen")
    assert frozen["fwd_bwd_ratio"] == 1.0 and all(r["fwd_bwd_ms"] > 0 for r in data["results"])

"""`python -m lorakern tune` / `lk.tune`: rehearsed on the CPU (--dry-run), refused without a GPU otherwise."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lorakern as lk
from lorakern import tuner
from lorakern.ops import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_interpreter = pytest.mark.skipif(not lk.backends()["triton"], reason="Triton kernels cannot run here")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lorakern", "tune", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@needs_interpreter
def test_dry_run_writes_a_table_the_dispatcher_reads(tmp_path, monkeypatch):
    cache, out = tmp_path / "dispatch.json", tmp_path / "tune.json"
    proc = _run("--dry-run", "--shapes", "37x45x29:3", "--dtype", "fp32", "--json", str(out), "--cache", str(cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (key, entry), = data["entries"].items()
    assert set(entry["ms"]) == {"cublas", "hybrid", "fused"} and all(t > 0 for t in entry["ms"].values())
    assert set(entry["configs"]) == {"hybrid", "fused"}
    assert all(set(c) == {"xa", "dy", "gemm_fwd", "gemm_bwd"} for c in entry["configs"].values())
    assert data["chosen"][key] in dispatch.DESIGNS
    monkeypatch.setenv("LORAKERN_CACHE_DIR", str(tmp_path))
    dispatch.reload()
    try:
        table = dispatch.entries("cpu")
        assert set(table) == {key} and dispatch._valid_entry(key, table[key])
        case, design, configs = dispatch.design_for("cpu", torch.float32, torch.float32, 37, 45, 29, 3, False,
                                                    tf32=False)
        assert case.key() == key and design == data["chosen"][key]
        assert configs == entry["configs"]
        assert dispatch.configs_for(case, table, "fused") == entry["configs"]["fused"]
    finally:
        dispatch.reload()


def test_without_a_gpu_tune_says_so_and_fails():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run("--shapes", "37x45x29:3")
    assert proc.returncode == 1 and "no CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
    with pytest.raises(RuntimeError, match="there is none here"):
        lk.tune(shapes=[(8, 8, 8, 2)])


@pytest.mark.parametrize("text", ["37x45:3", "37x45x29", "0x45x29:3", "axbxc:1"])
def test_bad_shapes_are_named(text):
    with pytest.raises(ValueError, match=f"shape {text!r}"):
        tuner.parse_shape(text)
    proc = _run("--dry-run", "--shapes", text)
    assert proc.returncode == 2 and text in proc.stderr


@needs_interpreter
def test_tune_a_model_measures_each_distinct_layer_once(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.Linear(24, 24), torch.nn.Linear(24, 8))
    lk.apply_lora(model, r=2, dropout=0.1)
    lines = []
    results = lk.tune(model, tokens=20, dry_run=True, cache=tmp_path / "d.json", log=lines.append)
    assert sorted(k.split("|")[4] for k in results) == ["24x24", "24x8"]
    assert all(k.endswith("|drop") for k in results) and (tmp_path / "d.json").exists()
    with pytest.raises(ValueError, match="nothing to measure"):
        lk.tune(torch.nn.Linear(3, 3), dry_run=True)


@needs_interpreter
def test_a_candidate_with_wrong_results_is_rejected(monkeypatch):
    """tune compares each candidate's outputs with the cuBLAS path's before timing it: a miscompiled tile
    (simulated: the GEMM's BLOCK_M=16 candidate made wrong) never enters the table."""
    from lorakern.ops import lora_linear_triton as kt
    real = kt.launch_gemm_forward

    def wrong_for_small_tiles(*, scaling, cfg, **kw):
        real(scaling=scaling * (1.5 if cfg["BLOCK_M"] == 16 else 1.0), cfg=cfg, **kw)
    monkeypatch.setattr(kt, "launch_gemm_forward", wrong_for_small_tiles)
    lines = []
    case, entry = tuner.tune_case(37, 45, 29, 3, torch.float32, torch.float32, 0.0, torch.device("cpu"),
                                  dry_run=True, log=lines.append)
    assert any("rejected: fused" in ln for ln in lines)
    assert entry["configs"]["fused"]["gemm_fwd"]["BLOCK_M"] != 16

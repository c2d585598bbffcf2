"""`python -m lorakern check` passes on this machine (the kernels under the interpreter on the CPU) and fails,
naming the case, when a kernel is made wrong."""
import json
import os
import subprocess
import sys

import pytest

import lorakern as lk
from lorakern import check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not lk.backends()["triton"], reason="Triton kernels cannot run here")


def test_check_command_passes(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "lorakern", "check", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for word in ("torch", "triton", "backends", "dispatch", "checks passed", "dropout key"):
        assert word in proc.stdout
    data = json.loads(out.read_text())
    assert data["failed"] == 0 and len(data["cases"]) == len(check.cases(gpu=False)) and data["dropout_key"] == "ok"
    designs = {c["case"]["design"] for c in data["cases"]}
    dtypes = {(c["case"]["x"], c["case"]["adapter"]) for c in data["cases"]}
    assert designs == {"fused", "hybrid"} and len(dtypes) >= 6
    assert {c["case"]["r"] for c in data["cases"]} >= {1, 16, 256}
    assert {c["case"]["layout"] for c in data["cases"]} == {"2d", "3d", "strided"}
    assert any(c["case"]["dropout"] for c in data["cases"]) and any(not c["case"]["bias"] for c in data["cases"])


def test_a_wrong_kernel_fails_the_check(monkeypatch, capsys):
    """Fault injection: the adapter-gradient reduction off by 1% must turn the check red, naming the cases."""
    from lorakern.ops import lora_linear_triton as kt
    real = kt.launch_reduce

    def off_by_one_percent(*, scaling, **kw):
        real(scaling=scaling * 1.01, **kw)
    monkeypatch.setattr(kt, "launch_reduce", off_by_one_percent)
    assert check.main([]) == 1
    out = capsys.readouterr().out
    assert "FAILED: dA, dB above tolerance" in out and "fused fp32/fp32 37x45->29 r=16" in out


def test_a_kernel_that_does_not_compile_fails_the_check(monkeypatch, capsys):
    from lorakern.ops import lora_linear_triton as kt

    def failing(name, fn, grid, kwargs):
        if name == "dy" and kwargs["NEED_DB"]:
            raise RuntimeError("forced compile failure")
    monkeypatch.setattr(kt, "_compile", failing)
    monkeypatch.setattr(kt, "_compiled", set())
    assert check.main([]) == 1
    out = capsys.readouterr().out
    assert "FAILED: Triton kernel dy with config" in out and "forced compile failure" in out


def test_a_dropout_key_that_does_not_change_fails_the_check(monkeypatch, capsys):
    """The same mask on every call (a key that is not drawn afresh) must turn the check red."""
    from lorakern.ops import lora_linear_triton as kt
    import torch
    monkeypatch.setattr(kt, "draw_rng", lambda device, generator=None: torch.tensor([5, 6], device=device))
    assert check.main([]) == 1
    assert "FAILED: two calls drew the same dropout mask" in capsys.readouterr().out


def test_tuned_configs_in_the_table_are_checked(tmp_path, monkeypatch, capsys):
    """What `tune` wrote for this machine is run too: a wrong tuned config fails the check."""
    import json
    from lorakern.ops import dispatch
    from lorakern.ops import lora_linear_triton as kt
    monkeypatch.setenv("LORAKERN_CACHE_DIR", str(tmp_path))
    dispatch.reload()
    cfgs = {k: dict(v) for k, v in kt.default_configs(__import__("torch").float32).items()}
    cfgs["gemm_fwd"]["BLOCK_M"] = 16
    key = "cpu|fp32|fp32|m64|45x29|r16|nodrop"
    dispatch.write_entries("cpu", {key: {"ms": {"cublas": 1.0, "fused": 0.5}, "configs": {"fused": cfgs}}})
    try:
        assert check.main(["--json", str(tmp_path / "c.json")]) == 0
        rows = json.loads((tmp_path / "c.json").read_text())["cases"]
        assert [r["tuned_for"] for r in rows if r["tuned_for"]] == [key]
        real = kt.launch_gemm_forward

        def wrong_for_small_tiles(*, scaling, cfg, **kw):
            real(scaling=scaling * (1.5 if cfg["BLOCK_M"] == 16 else 1.0), cfg=cfg, **kw)
        monkeypatch.setattr(kt, "launch_gemm_forward", wrong_for_small_tiles)
        capsys.readouterr()
        assert check.main([]) == 1
        failed = [ln for ln in capsys.readouterr().out.splitlines() if "FAILED" in ln]
        assert "tuned" in failed[0] and "FAILED: y above tolerance" in failed[0] and len(failed) == 2  # + the legend
    finally:
        dispatch.reload()

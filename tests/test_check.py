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
    for word in ("torch", "triton", "backends", "dispatch", "cases passed"):
        assert word in proc.stdout
    data = json.loads(out.read_text())
    assert data["failed"] == 0 and len(data["cases"]) == len(check.cases(gpu=False))
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

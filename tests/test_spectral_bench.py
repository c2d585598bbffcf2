"""benchmarks/spectral_vs_peft.py --quick (the CI smoke test of issue 14's spectral benchmark): every variant
runs and reports its time, memory, passes and ΔW error against the exact init."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("peft")
pytest.importorskip("transformers")


def test_spectral_vs_peft_quick_writes_every_variant(tmp_path):
    out = tmp_path / "spectral.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "spectral_vs_peft.py"), "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    modes = ("auto", "exact", "onepass", "sketch")
    assert set(rows) == {f"lk-{m}-{mode}" for m in ("one", "ga") for mode in modes} | {"peft-ga", "ref-one"}
    assert rows["peft-ga"]["x_peft"] == 1.0 and all(r["seconds"] > 0 and r["layers"] == 7 for r in rows.values())
    for m in ("one", "ga"):
        assert rows[f"lk-{m}-sketch"]["passes"] == 4  # 2 + 2 * n_iter
        assert all(rows[f"lk-{m}-{mode}"]["passes"] == 1 for mode in ("auto", "exact", "onepass"))
        exact, auto, onepass = (rows[f"lk-{m}-{mode}"] for mode in ("exact", "auto", "onepass"))
        assert exact["err_max"] < 1e-4 and exact["est_err_max"] == 0.0 and exact["g_layers"] == 7
        assert auto["err_max"] < 3e-2 and auto["g_layers"] == 7  # the tiny model's G fits any budget
        assert onepass["est_err_max"] > 0 and onepass["g_layers"] == 0
    assert rows["ref-one"]["err_max"] < 1e-3 and rows["peft-ga"]["err_max"] < 0.5

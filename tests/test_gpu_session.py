"""benchmarks/gpu_session.py: the CPU rehearsal (--dry-run) of the whole GPU session, and its bookkeeping when a
stage fails, hangs, or the session itself is killed. Behaviour only; no assertion on wall times."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.py")
sys.path.append(os.path.join(ROOT, "benchmarks"))

import gpu_session  # noqa: E402
import lora_linear_bench  # noqa: E402


def session(out, *args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=timeout)


def read_summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def by_stage(summary) -> dict:
    return {st["stage"]: st for st in summary["stages"]}


def alive(pid: int) -> bool:
    """False once the process is gone or a zombie (its parent was killed; init may not reap it at once)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_dead(pid: int, polls: int = 100) -> bool:
    for _ in range(polls):
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def child_pid(log_path) -> int:
    for line in open(log_path).read().splitlines():
        if line.startswith("child "):
            return int(line.split()[1])
    raise AssertionError(f"no child pid in {log_path}")


def test_dry_run_runs_every_stage_and_writes_every_output(tmp_path):
    proc = session(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = read_summary(tmp_path)
    stages = by_stage(summary)
    assert list(stages) == gpu_session.STAGE_NAMES and summary["ok"] and summary["mode"] == "dry-run"
    assert [n for n, st in stages.items() if st["status"] == "skipped"] == list(gpu_session.OPTIONAL)
    for name, st in stages.items():
        if name in gpu_session.OPTIONAL:
            continue
        assert st["status"] == "ok" and st["exit_code"] == 0 and not st["timed_out"], (name, st["log_tail"])
        assert os.path.getsize(tmp_path / f"{name}.log") > 0
        if st["json"]:
            assert os.path.getsize(st["json"]) > 0, name
            json.loads(open(st["json"]).read())
    assert (tmp_path / "summary.md").read_text().strip()
    assert json.loads((tmp_path / "env.json").read_text())["torch"]
    # the layer stage: both adapter dtypes, the stable variant names, condensed into the summary
    layer = json.loads((tmp_path / "layer.json").read_text())
    assert layer["complete"] and layer["adapter_dtypes"] == ["bf16", "fp32"]
    assert {r["variant"] for r in layer["results"]} == {"frozen", "lk-auto", "lk-cublas", "eager", "peft"}
    table = summary["layer"]
    assert [(c["shape"], c["r"], c["adapter_dtype"]) for c in table["cases"]] == [("37x45x29", 3, "bf16"),
                                                                                 ("37x45x29", 3, "fp32")]
    assert all(c["ratios"]["lk-auto"][1] > 0 for c in table["cases"])
    assert "lk-cublas" in (tmp_path / "summary.md").read_text()
    spectral = json.loads((tmp_path / "spectral.json").read_text())
    assert spectral["reference"] is None and spectral["lorakern"]["max_rel_err"] >= 0


def test_failing_stage_fails_the_session_and_later_stages_still_run(tmp_path):
    proc = session(tmp_path, "--skip", "check", "tune", "layer", "spectral", "e2e", "--fail-stage", "build")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = read_summary(tmp_path)
    stages = by_stage(summary)
    assert not summary["ok"]
    assert stages["build"]["status"] == "failed" and stages["build"]["exit_code"] == 3
    assert stages["optim"]["status"] == "ok" and stages["optim"]["exit_code"] == 0
    assert os.path.getsize(tmp_path / "optim.json") > 0
    assert all(stages[n]["status"] == "skipped" for n in ("check", "tune", "layer", "spectral", "e2e"))
    assert "failed" in (tmp_path / "summary.md").read_text()


def test_stage_past_its_limit_is_killed_with_its_children(tmp_path):
    proc = session(tmp_path, "--only", "build", "--hang-stage", "build", "--budget", "build=3", timeout=120)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    build = by_stage(read_summary(tmp_path))["build"]
    assert build["status"] == "timed_out" and build["timed_out"] and build["budget_s"] == 3
    assert wait_dead(child_pid(tmp_path / "build.log"))


def test_killed_session_records_the_running_stage_and_kills_it(tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--dry-run", "--out", str(tmp_path), "--only", "build",
                             "--hang-stage", "build"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):  # until the stage's own child is up
            log = tmp_path / "build.log"
            if log.exists() and "child " in log.read_text():
                break
            time.sleep(0.1)
        pid = child_pid(tmp_path / "build.log")
        assert by_stage(read_summary(tmp_path))["build"]["status"] == "running"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    summary = read_summary(tmp_path)
    assert not summary["ok"] and by_stage(summary)["build"]["status"] == "interrupted"
    assert wait_dead(pid)


def test_shell_entry_point_passes_options_through(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    proc = subprocess.run(["bash", script, "--only", "nope"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_gpu_stage_commands_are_well_formed(tmp_path):
    """What the rehearsal cannot run: the GPU sizes. The layer cases parse, the budgets fit the 400 s."""
    default = [n for n in gpu_session.STAGE_NAMES if n not in gpu_session.OPTIONAL]
    assert gpu_session.ENV_BUDGET_S + sum(gpu_session.BUDGET_S[n] for n in default) <= 400
    args = gpu_session.parse_args([])
    commands = {s.name: s.argv(False, "python", tmp_path, args.limits[s.name]) for s in gpu_session.STAGES}
    assert commands["build"][-4:] == ["--no-build-isolation", "--no-deps", "-e", "."]
    tune = commands["tune"]
    assert float(tune[tune.index("--budget-s") + 1]) < args.limits["tune"]
    tuned = tune[tune.index("--shapes") + 1:tune.index("--dtype")]
    assert tuned[:len(gpu_session.LAYER_SHAPES)] == gpu_session.LAYER_SHAPES  # the layer cases first
    assert set(gpu_session.E2E_SHAPES) <= set(tuned)
    for name in ("layer", "optim", "spectral", "e2e"):
        assert commands[name][commands[name].index("--device") + 1] == "cuda"
    layer = commands["layer"]
    specs = layer[layer.index("--shapes") + 1:layer.index("--warmup")]
    cases = [c for spec in specs for c in lora_linear_bench.parse_shape(spec, [16])]
    assert cases == [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 16),
                     (8192, 4096, 4096, 64), (2048, 4096, 4096, 16)]
    variants = lora_linear_bench.available_variants(gpu_session.LAYER_VARIANTS.split(","), torch.device("cuda"))
    assert {"lk-auto", "lk-cublas", "lk-hybrid", "lk-fused", "peft", "eager"} <= set(variants)
    assert "compile" not in variants  # its compile time would not fit the layer stage's limit
    assert all(args.limits[s] == gpu_session.BUDGET_S[s] for s in gpu_session.STAGE_NAMES)


def test_optional_gpu_tests_stage_rehearses(tmp_path):
    proc = session(tmp_path, "--only", "gpu_tests")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    stages = by_stage(read_summary(tmp_path))
    assert stages["gpu_tests"]["status"] == "ok" and "passed" in (tmp_path / "gpu_tests.log").read_text()


@pytest.mark.parametrize("bad", [["--budget", "nope=3"], ["--budget", "layer=x"], ["--skip", "nope"]])
def test_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_session.parse_args(bad)
    assert exc.value.code == 2

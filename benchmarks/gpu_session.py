"""The lent-GPU session as one command: every stage in one call of the device tool, <= 6 minutes on a fresh H100.

    bash benchmarks/gpu_session.sh                     # = python benchmarks/gpu_session.py: all stages, OUT=./gpu-out
    python benchmarks/gpu_session.py --only layer e2e  # a rerun of some stages (--skip STAGE... leaves some out)
    python benchmarks/gpu_session.py --dry-run --out /tmp/rehearsal   # the CPU rehearsal (tests/test_gpu_session.py)

Stages, in order; each is one subprocess (its own process group) with a wall-clock limit, killed at it:

    stage     limit  what runs on the GPU (its JSON under $OUT)         why it fits
    (env)      15 s  versions, GPU name, nvidia-smi (env.json)          one import of torch
    build      75 s  pip install --no-build-isolation --no-deps -e .    5 C++ files, 1 .cu (sm_80 + sm_90a,
                                                                        ~4 s) and its torch glue (~30 s),
                                                                        compiled in parallel (16 cores)
    check      45 s  python -m lorakern check (check.json)              small shapes vs float64, one launch
                                                                        config per kernel, all compiled first,
                                                                        in parallel (12 cases)
    tune       60 s  python -m lorakern tune: 5 cases x {bf16, fp32}    pruned candidate lists compiled in
                     adapters on a bf16 base (tune.json)                parallel, each timed briefly
    layer      75 s  lora_linear_bench.py: the same 5 cases x 2         70 variant-cases x (3 + 12) fwd and
                     adapter dtypes x 7 variants (frozen, lk-auto,      fwd+bwd of <= 5 ms, float64 check
                     lk-cublas, lk-hybrid, lk-fused, eager, peft),      ~0.1 s each; no torch.compile
                     --check (layer.json)                               variant (minutes of compiles)
    optim      30 s  optim_bench.py: 40M adapter params, r=16, vs       5 variants x 24 steps of < 50 ms
                     fused AdamW (optim.json)
    spectral   35 s  spectral_init_bench.py: 0.95B LLaMA, 8 x 1024      model built on the GPU; 4 sketch
                     tokens, lorakern only, error against the exact     passes + 1 exact-gradient pass,
                     init on one block's 7 layers (spectral.json)       7 full SVDs on the GPU
    e2e        45 s  e2e_step.py: 0.95B, 4 x 2048 tokens, r=16 on 7     6 variants x (build + 13 steps of
                     projections, peak memory (e2e.json)                ~0.1-0.2 s)
    linalg     20 s  small_linalg_bench.py: csrc/cuda's batched         6 orders x 2 batch sizes x 5 ops x
                     Cholesky / inverse / solve / eigh vs torch,        2 dtypes, 7 calls of < 1 ms each;
                     k 8..256, float64-checked (small_linalg.json):     exit 1 on an error above 1e-5 / 1e-12
                     its EXT_FASTER line decides what CUDA uses
    total     400 s  + 1-2 min machine start: one device call of <= 9 min, 6 of the 15 min left for a rerun

The 5 layer / tune cases (tokens x in x out : rank): 8192x4096x4096:16, 8192x4096x14336:16,
8192x14336x4096:16, 8192x4096x4096:64, 2048x4096x4096:16; tune also measures e2e's three projection shapes
(8192x2048x2048, 8192x2048x5632, 8192x5632x2048 at r=16) if its budget allows.
Optional stage gpu_tests (150 s, not in the default run: `--only gpu_tests`, a second device call):
tests/test_gpu.py and the gpu-marked tests/test_small_linalg.py, float64-referenced (graph replay with dropout,
reseeding, bitwise gradients; every csrc/cuda kernel).
The limits are estimates made without a GPU (none was lent so far): summary.json records each stage's
measured seconds; set BUDGET_S from the first session's. The reference procedure of the spectral benchmark
(host copies of every gradient, q=512 SVDs: ~35 s on an H100 per issue 5, plus a full SVD per compared
layer) does not fit: run it in its own call when needed (spectral_init_bench.py --err-layers 7).
Autotuning is bounded: tune measures a pruned candidate list; the kernels have no run-time autotuning (one
launch config per kernel: tune's or the default), so the benchmarks only load what check and tune compiled
from Triton's on-disk cache. Every stage gets LORAKERN_CACHE_DIR=$OUT/lorakern-cache: the dispatch table tune
measures is what layer and e2e use (lk-auto), and it comes back with the results.

After every stage $OUT/summary.json and $OUT/summary.md are rewritten (status, command, exit code, seconds,
limit, the log's tail, and the layer table: each case's ratios to the frozen layer), so a kill of the whole
session keeps what ran; $OUT/env.json is written first; each stage's output goes to $OUT/<stage>.log.
Exit status: 0 when every selected stage passed, 1 when one failed or was killed at its limit, 2 for a
usage error, 128 + N when the session itself got signal N (the running stage is killed and recorded as
"interrupted"; a SIGKILL leaves it "running" in the summary).

--dry-run rehearses every stage on the CPU with tiny shapes (same scripts, same flags but sizes and device;
TRITON_INTERPRET=1, CUDA hidden): CI runs it, so a Python error cannot waste a device call. Its build stage
only imports lorakern._C.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# The wall-clock limit of each stage on a fresh H100, seconds (the docstring's table says why each fits).
ENV_BUDGET_S = 15
BUDGET_S = {"build": 75, "check": 45, "tune": 60, "layer": 75, "optim": 30, "spectral": 35, "e2e": 45,
            "linalg": 20, "gpu_tests": 150}
OPTIONAL = ("gpu_tests",)  # run only when named (--only gpu_tests): a second device call
DRY_BUDGET_S = 180  # each stage of the CPU rehearsal (TRITON_INTERPRET=1 on a 2-core machine)
SOFT_MARGIN_S = 15  # a stage that can stop early ({soft_limit}) is told its limit less this
TAIL_LINES = 20

ROOT = Path(__file__).resolve().parent.parent
LAYER_SHAPES = ["8192x4096x4096:16", "8192x4096x14336:16", "8192x14336x4096:16", "8192x4096x4096:64",
                "2048x4096x4096:16"]
LAYER_VARIANTS = "frozen,lk-auto,lk-cublas,lk-hybrid,lk-fused,eager,peft"
E2E_SHAPES = ["8192x2048x2048:16", "8192x2048x5632:16", "8192x5632x2048:16"]  # e2e_step.py's 0.95B projections
TUNE_SHAPES = LAYER_SHAPES + E2E_SHAPES  # in this order: tune's --budget-s drops the last ones first
TINY_LLAMA = ["--hidden", "64", "--intermediate", "96", "--layers", "2", "--heads", "4", "--vocab", "300",
              "--seq", "32", "--micro", "2", "--r", "4"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: argv = common + gpu (or + dry in a rehearsal); {py} is this interpreter, {out} the output
    folder, {json} = {out}/<json>, {soft_limit} the stage's limit less a margin (for a script that can stop
    early). Sharing `common` means the rehearsal passes the GPU run's flags: only sizes and the device differ."""
    name: str
    common: tuple[str, ...]
    gpu: tuple[str, ...] = ()
    dry: tuple[str, ...] = ()
    json: str | None = None  # the file the stage's own script writes under {out}
    dry_common: tuple[str, ...] | None = None  # replaces `common` in a rehearsal (the build stage)

    def argv(self, dry_run: bool, py: str, out: Path, limit_s: float) -> list[str]:
        common = self.dry_common if dry_run and self.dry_common is not None else self.common
        fields = dict(py=py, out=out, json=out / self.json if self.json else None,
                      soft_limit=f"{max(limit_s - SOFT_MARGIN_S, limit_s / 2):g}")
        return [a.format(**fields) for a in (*common, *(self.dry if dry_run else self.gpu))]


STAGES = [
    Stage("build", ("{py}", "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."),
          dry_common=("{py}", "-c", "import lorakern._C")),
    Stage("check", ("{py}", "-m", "lorakern", "check", "--json", "{json}"), json="check.json"),
    # --budget-s: tune starts no new case after it, so it ends (and writes what it measured) before its limit
    Stage("tune", ("{py}", "-m", "lorakern", "tune", "--budget-s", "{soft_limit}", "--json", "{json}"),
          gpu=("--shapes", *TUNE_SHAPES, "--dtype", "bf16", "--adapter-dtype", "bf16", "fp32"),
          dry=("--dry-run", "--shapes", "37x45x29:3", "--dtype", "fp32", "--adapter-dtype", "fp32"),
          json="tune.json"),
    Stage("layer", ("{py}", "benchmarks/lora_linear_bench.py", "--dtype", "bf16", "--adapter-dtype", "bf16", "fp32",
                    "--variants", LAYER_VARIANTS, "--check", "--json", "{json}"),
          gpu=("--device", "cuda", "--shapes", *LAYER_SHAPES, "--warmup", "3", "--iters", "12"),
          dry=("--device", "cpu", "--shapes", "37x45x29:3", "--warmup", "1", "--iters", "2"), json="layer.json"),
    Stage("optim", ("{py}", "benchmarks/optim_bench.py", "--json", "{json}"),
          gpu=("--device", "cuda"),
          dry=("--device", "cpu", "--small", "--layers", "1", "--r", "3", "--warmup", "1", "--iters", "2"),
          json="optim.json"),
    Stage("spectral", ("{py}", "benchmarks/spectral_init_bench.py", "--no-reference", "--err-layers", "7",
                       "--json", "{json}"),
          gpu=("--device", "cuda"), dry=("--device", "cpu", *TINY_LLAMA, "--n-iter", "2"), json="spectral.json"),
    Stage("e2e", ("{py}", "benchmarks/e2e_step.py", "--json", "{json}"),
          gpu=("--device", "cuda"),
          dry=("--device", "cpu", "--small", "--layers", "1", "--seq", "32", "--warmup", "1", "--iters", "2",
               "--threads", "1"), json="e2e.json"),
    Stage("linalg", ("{py}", "benchmarks/small_linalg_bench.py", "--json", "{json}"),
          gpu=("--device", "cuda", "--ks", "8", "16", "32", "64", "128", "256"),
          dry=("--device", "cpu", "--quick", "--repeats", "2"), json="small_linalg.json"),
    # optional: the float64-referenced GPU tests (CUDA-graph replay with dropout, reseeding, bitwise gradients)
    Stage("gpu_tests", ("{py}", "-m", "pytest", "-q", "-x", "--junitxml", "{json}"),
          gpu=("tests/test_gpu.py", "tests/test_small_linalg.py"),
          dry=("tests/test_gpu.py", "tests/test_dispatch.py"), json="gpu_tests.xml"),
]
STAGE_NAMES = [s.name for s in STAGES]
assert set(STAGE_NAMES) == set(BUDGET_S), "every stage needs a budget"

# Hidden test hooks (tests/test_gpu_session.py): a stage that fails, and one that hangs with a child process.
FAIL_ARGV = ["{py}", "-c", "raise SystemExit(3)"]
HANG_ARGV = ["{py}", "-c", "import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
             "print('child', p.pid, flush=True); time.sleep(600)"]

ENV_PROBE = r"""
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                cpu_threads=torch.get_num_threads())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                    gpu_mem_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
except Exception as exc:
    info["torch_error"] = repr(exc)
from importlib import metadata  # versions without importing the packages (a cold import takes seconds)
for name in ("triton", "transformers", "peft"):
    try:
        info[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        info[name] = None
print(json.dumps(info))
"""
NVIDIA_SMI_QUERY = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit," \
                   "temperature.gpu,persistence_mode"


class Interrupted(Exception):
    """The session itself got SIGTERM / SIGINT / SIGHUP (e.g. the device tool's limit)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def stage_env(dry_run: bool, out: Path) -> dict:
    """The environment of every stage: the checkout importable, unbuffered output, offline Hugging Face, and
    lorakern's measurement cache under $OUT (what tune measures, the later stages use; it comes back with the
    results, and no stale cache of the machine is read); a rehearsal also runs Triton's interpreter with CUDA
    hidden."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               LORAKERN_CACHE_DIR=str(out / "lorakern-cache"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    if dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL to what is left 3 s later (or once the leader is gone)."""
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def run_logged(argv: list[str], log_path: Path, env: dict, limit_s: float) -> tuple[int | None, bool]:
    """Runs argv in its own process group, output to log_path; (exit code, timed out). Killed at limit_s."""
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.write(f"cannot start: {exc}\n")
            return None, False
        try:
            return proc.wait(timeout=limit_s), False
        except subprocess.TimeoutExpired:
            kill_group(proc)
            log.write(f"\n[gpu_session] killed at its {limit_s:g} s limit\n")
            return proc.returncode, True
        finally:  # an interrupted session takes its stage down with it
            if proc.returncode is None:
                kill_group(proc)


def tail(path: Path, lines: int = TAIL_LINES, width: int = 300) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line[:width] for line in text.splitlines()[-lines:]]


def write_env(out: Path, env: dict, dry_run: bool) -> dict:
    """$OUT/env.json: versions and the GPU as torch and nvidia-smi see them (errors recorded, never raised)."""
    info: dict = {"mode": "dry-run" if dry_run else "gpu", "cpu_count": os.cpu_count(), "argv": sys.argv}
    try:
        proc = subprocess.run([sys.executable, "-c", ENV_PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=ENV_BUDGET_S)
        info.update(json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                    else {"probe_error": proc.stderr[-2000:]})
    except (subprocess.TimeoutExpired, IndexError, ValueError) as exc:
        info["probe_error"] = repr(exc)
    if shutil.which("nvidia-smi") and not dry_run:
        try:
            smi = subprocess.run(["nvidia-smi", f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv"],
                                 capture_output=True, text=True, timeout=10)
            info["nvidia_smi"] = (smi.stdout or smi.stderr).strip().splitlines()
        except subprocess.TimeoutExpired:
            info["nvidia_smi"] = ["timed out"]
    info["git"] = _git_head()
    (out / "env.json").write_text(json.dumps(info, indent=1))
    return info


def _git_head() -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def layer_table(path: Path) -> dict | None:
    """The layer JSON condensed: per case (shape, r, adapter dtype) the frozen layer's ms and every variant's
    [fwd, fwd+bwd] ratio to it (and its float64 error with --check). None when the JSON is missing or broken."""
    try:
        data = json.loads(path.read_text())
        cases: dict[tuple, dict] = {}
        for row in data["results"]:
            key = (row["shape"], row["r"], row.get("adapter_dtype") or data.get("dtype"))
            case = cases.setdefault(key, {"shape": key[0], "r": key[1], "adapter_dtype": key[2], "ratios": {},
                                          "err": {}})
            if row["variant"] == "frozen":
                case.update(frozen_fwd_ms=row["fwd_ms"], frozen_fwd_bwd_ms=row["fwd_bwd_ms"])
            case["ratios"][row["variant"]] = [round(row["fwd_ratio"], 3), round(row["fwd_bwd_ratio"], 3)]
            if "err" in row:
                case["err"][row["variant"]] = row["err"]
        variants = [v for v in dict.fromkeys(row["variant"] for row in data["results"]) if v != "frozen"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"complete": data.get("complete", True), "variants": variants, "cases": list(cases.values())}


def summary_markdown(summary: dict, tails: str = "all") -> str:
    """summary.md: the stage table, the layer table, the logs' tails (tails="failed": only failed stages')."""
    lines = [f"# GPU session ({summary['mode']}): {'ok' if summary['ok'] else 'FAILED'}", "",
             *([f"**{summary['warning']}**", ""] if summary.get("warning") else []),
             f"started {summary['started']}, {summary['elapsed_s']:.0f} s of the {summary['budget_total_s']:g} s "
             f"budget; output {summary['out']}", "", *_stage_rows(summary["stages"])]
    if summary.get("layer"):
        lines += ["", *_layer_rows(summary["layer"])]
    for st in summary["stages"]:
        if st["log_tail"] and (tails == "all" or st["status"] in ("failed", "timed_out", "interrupted")):
            lines += ["", f"## {st['stage']}: {st['status']}, last lines of {st['log']}", "", "```",
                      *st["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def _stage_rows(stages: list[dict]) -> list[str]:
    rows = ["| stage | status | exit | seconds | limit | command |", "|---|---|---|---|---|---|"]
    for st in stages:
        seconds = "" if st["seconds"] is None else f"{st['seconds']:.1f}"
        exit_code = "" if st["exit_code"] is None else st["exit_code"]
        rows.append(f"| {st['stage']} | {st['status']} | {exit_code} | {seconds} | {st['budget_s']:g} | "
                    f"`{st['command']}` |")
    return rows


def _layer_rows(layer: dict) -> list[str]:
    """The layer table: per case the frozen layer's ms, then each variant's fwd / fwd+bwd ratio to it."""
    names = layer["variants"]
    rows = [f"## layer: fwd / fwd+bwd time as a multiple of the frozen layer's"
            f"{'' if layer['complete'] else ' (incomplete run)'}", "",
            "| case | frozen ms (fwd / fwd+bwd) | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for case in layer["cases"]:
        cells = [" / ".join(f"{v:.2f}" for v in case["ratios"][n]) if n in case["ratios"] else "" for n in names]
        frozen = " / ".join(f"{case.get(k, float('nan')):.3f}" for k in ("frozen_fwd_ms", "frozen_fwd_bwd_ms"))
        rows.append(f"| {case['shape']}:{case['r']} {case['adapter_dtype']} | {frozen} | " + " | ".join(cells) + " |")
    errs = [e for case in layer["cases"] for e in case["err"].values()]
    if errs:
        rows += ["", f"largest float64 error over all cases and variants (--check): {max(errs):.1e}"]
    return rows


def write_summary(out: Path, summary: dict, t0: float) -> None:
    """Rewrites summary.json and summary.md (through a temporary file each: a kill never leaves half a file)."""
    summary["elapsed_s"] = round(time.monotonic() - t0, 1)
    for name, text in (("summary.json", json.dumps(summary, indent=1)), ("summary.md", summary_markdown(summary))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def stage_record(stage: Stage, argv: list[str], out: Path, limit_s: float, selected: bool) -> dict:
    return {"stage": stage.name, "status": "pending" if selected else "skipped", "command": shlex.join(argv),
            "exit_code": None, "seconds": None, "budget_s": limit_s, "timed_out": False,
            "log": str(out / f"{stage.name}.log"), "json": str(out / stage.json) if stage.json else None,
            "log_tail": []}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=STAGE_NAMES, metavar="STAGE", help=f"run these of {STAGE_NAMES}")
    ap.add_argument("--skip", nargs="+", choices=STAGE_NAMES, metavar="STAGE", default=[], help="leave these out")
    ap.add_argument("--dry-run", action="store_true", help="rehearse every stage on the CPU with tiny shapes")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"), help="output folder (default $OUT or ./gpu-out)")
    ap.add_argument("--budget", nargs="+", default=[], metavar="STAGE=SECONDS", help="override stage limits")
    ap.add_argument("--fail-stage", nargs="+", choices=STAGE_NAMES, default=[], help=argparse.SUPPRESS)
    ap.add_argument("--hang-stage", nargs="+", choices=STAGE_NAMES, default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.limits = dict.fromkeys(STAGE_NAMES, DRY_BUDGET_S) if args.dry_run else dict(BUDGET_S)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        try:
            if name not in STAGE_NAMES:
                raise ValueError
            args.limits[name] = float(seconds)
        except ValueError:
            ap.error(f"--budget {item!r}: expected STAGE=SECONDS with STAGE one of {STAGE_NAMES}")
    return args


def stage_argv(stage: Stage, args, py: str, out: Path) -> list[str]:
    if stage.name in args.hang_stage:
        return [a.format(py=py) for a in HANG_ARGV]
    if stage.name in args.fail_stage:
        return [a.format(py=py) for a in FAIL_ARGV]
    return stage.argv(args.dry_run, py, out, args.limits[stage.name])


def run_stage(record: dict, argv: list[str], env: dict, out: Path) -> None:
    name = record["stage"]
    print(f"== {name} (limit {record['budget_s']:g} s): {record['command']}", flush=True)
    t0 = time.monotonic()
    code, timed_out = run_logged(argv, out / f"{name}.log", env, record["budget_s"])
    record.update(exit_code=code, seconds=round(time.monotonic() - t0, 1), timed_out=timed_out,
                  status="timed_out" if timed_out else "ok" if code == 0 else "failed",
                  log_tail=tail(out / f"{name}.log"))
    print(f"   {record['status']} (exit {code}) in {record['seconds']:.1f} s", flush=True)


def new_summary(args, out: Path, commands: dict[str, list[str]]) -> dict:
    selected = [n for n in (args.only or [n for n in STAGE_NAMES if n not in OPTIONAL]) if n not in args.skip]
    records = [stage_record(s, commands[s.name], out, args.limits[s.name], s.name in selected) for s in STAGES]
    return {"mode": "dry-run" if args.dry_run else "gpu", "ok": True, "out": str(out),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "elapsed_s": 0.0,
            "budget_total_s": ENV_BUDGET_S + sum(args.limits[n] for n in selected), "stages": records,
            "layer": None}


def run_stages(summary: dict, commands: dict[str, list[str]], env: dict, out: Path, t0: float) -> None:
    """Every selected stage in order; the summary is rewritten before (status "running") and after each."""
    for record in summary["stages"]:
        if record["status"] == "skipped":
            continue
        record["status"] = "running"
        if record["json"]:  # an earlier session's file must not pass for this one's
            Path(record["json"]).unlink(missing_ok=True)
        write_summary(out, summary, t0)
        run_stage(record, commands[record["stage"]], env, out)
        if record["stage"] == "layer":
            summary["layer"] = layer_table(Path(record["json"]))
        summary["ok"] = all(r["status"] in ("ok", "skipped", "pending") for r in summary["stages"])
        write_summary(out, summary, t0)


def record_interruption(summary: dict) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # let the summary be written
    for record in summary["stages"]:
        if record["status"] == "running":
            record.update(status="interrupted", log_tail=tail(Path(record["log"])))
    summary["ok"] = False


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py, env, t0 = sys.executable, stage_env(args.dry_run, out), time.monotonic()
    commands = {s.name: stage_argv(s, args, py, out) for s in STAGES}
    summary = new_summary(args, out, commands)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    status = 0
    try:
        info = write_env(out, env, args.dry_run)
        if not args.dry_run and not info.get("cuda_available"):
            summary["warning"] = "no CUDA device visible (env.json): the GPU stages will fail; --dry-run rehearses"
            print(f"warning: {summary['warning']}", file=sys.stderr, flush=True)
        run_stages(summary, commands, env, out, t0)
    except Interrupted as exc:
        record_interruption(summary)
        status = 128 + exc.signum
    write_summary(out, summary, t0)
    print(summary_markdown(summary, tails="failed"), flush=True)
    return status or (0 if summary["ok"] else 1)


if __name__ == "__main__":
    sys.exit(main())

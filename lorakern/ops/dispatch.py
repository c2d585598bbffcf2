"""Measured dispatch: which design runs a CUDA LoRA layer, from measurements only.

Designs: "cublas" (torch GEMMs, the LoRA terms as small GEMMs / addmm), "hybrid" (cuBLAS base GEMM + the
Triton rank-r passes), "fused" (the Triton GEMM with the rank-r term in its accumulator).

A case is (GPU architecture, activation dtype, adapter dtype, tokens bucket, in, out, rank bucket, dropout).
Its design comes from measurements: a table shipped in the package (`dispatch_table.json`, written by
`python -m lorakern tune` in a GPU session and committed) and the user's cache (`tune` writes
`$LORAKERN_CACHE_DIR/dispatch.json`, default `~/.cache/lorakern/`). **Without a measurement for a case the
cuBLAS path runs.** fp32 activations without TF32 ("fp32" here; "tf32" when TF32 is allowed) never take a
Triton GEMM. A file that is corrupt, of another format, or measured with another Triton release is ignored
with a warning; entries for other architectures are never used.

`choose` is a pure function of the case and a table; `design_for` is what the op calls (decisions cached).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, NamedTuple

import torch

DESIGNS = ("cublas", "hybrid", "fused")
TRITON_DESIGNS = ("hybrid", "fused")
FORMAT = 1
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
PACKAGE_TABLE = Path(__file__).with_name("dispatch_table.json")


class Case(NamedTuple):
    """One dispatch case; `key()` is its name in a table."""
    arch: str        # "sm_90"
    x_dtype: str     # "bf16" | "fp16" | "tf32" (fp32 with TF32 allowed) | "fp32" (exact fp32)
    adapter_dtype: str
    m_bucket: int    # tokens rounded up to a power of two
    k: int           # in_features
    n: int           # out_features
    r_bucket: int    # rank rounded up to a power of two (>= 16)
    dropout: bool

    def key(self) -> str:
        return (f"{self.arch}|{self.x_dtype}|{self.adapter_dtype}|m{self.m_bucket}|{self.k}x{self.n}"
                f"|r{self.r_bucket}|{'drop' if self.dropout else 'nodrop'}")

    @classmethod
    def from_key(cls, key: str) -> "Case":
        arch, xd, ad, m, kn, r, drop = key.split("|")
        k, n = kn.split("x")
        if not (m.startswith("m") and r.startswith("r") and drop in ("drop", "nodrop")):
            raise ValueError(f"malformed dispatch key {key!r}")
        return cls(arch, xd, ad, int(m[1:]), int(k), int(n), int(r[1:]), drop == "drop")


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(int(n) - 1, 0).bit_length())


def dtype_name(dtype: torch.dtype, tf32: bool = False) -> str:
    if dtype == torch.float32 and tf32:
        return "tf32"
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def make_case(arch: str, x_dtype: torch.dtype, adapter_dtype: torch.dtype, M: int, K: int, N: int, r: int,
              dropout: bool, tf32: bool) -> Case:
    return Case(arch, dtype_name(x_dtype, tf32), dtype_name(adapter_dtype), _pow2(M), int(K), int(N),
                _pow2(r, 16), bool(dropout))


def allowed(case: Case) -> tuple[str, ...]:
    """The designs that may run this case: exact fp32 never takes a Triton GEMM (the fused design)."""
    if case.x_dtype == "fp32":
        return ("cublas", "hybrid")
    return DESIGNS


def lookup(case: Case, entries: Mapping[str, dict]) -> dict | None:
    """The entry measured for this case, or for the same case at the nearest tokens bucket (within 4x)."""
    hit = entries.get(case.key())
    if hit is not None:
        return hit
    best, best_dist = None, 2.0 + 1e-9  # at most two powers of two away
    for m in (case.m_bucket // 4, case.m_bucket // 2, case.m_bucket * 2, case.m_bucket * 4):
        if m < 1:
            continue
        entry = entries.get(case._replace(m_bucket=m).key())
        dist = abs(math.log2(m) - math.log2(case.m_bucket))
        if entry is not None and dist < best_dist:
            best, best_dist = entry, dist
    return best


def choose(case: Case, entries: Mapping[str, dict]) -> str:
    """The design for `case` given measured `entries` (key -> {"ms": {design: ms}, ...}): the fastest measured
    design this case allows; "cublas" when nothing allowed was measured. Pure: no I/O, no globals."""
    entry = lookup(case, entries)
    if entry is None:
        return "cublas"
    times = {d: t for d, t in entry.get("ms", {}).items() if d in allowed(case) and _finite_positive(t)}
    if not times:
        return "cublas"
    return min(times, key=times.get)


def configs_for(case: Case, entries: Mapping[str, dict], design: str) -> dict | None:
    """The kernel configs `tune` timed `design` with for this case (None: the kernels' defaults)."""
    entry = lookup(case, entries)
    return None if entry is None else (entry.get("configs") or {}).get(design)


def fp32_matmul_is_exact() -> bool:
    """Whether torch runs fp32 matmuls in exact fp32 (no TF32), as F.linear would on CUDA."""
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", None)  # torch >= 2.9
    if setting is not None and setting != "none":
        return setting == "ieee"
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # mixed use of the old and new precision APIs
        return not torch.backends.cuda.matmul.allow_tf32


def _finite_positive(t) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0


# ----------------------------------------------------------------------------------------------------------
# Tables on disk
# ----------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("LORAKERN_CACHE_DIR") or Path.home() / ".cache" / "lorakern")


def cache_path() -> Path:
    return cache_dir() / "dispatch.json"


def _triton_release() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return ".".join(triton.__version__.split(".")[:2])


# The launch parameters each kernel's config holds: exactly these, powers of two within these bounds (a
# table can only choose tiles, never a derived value such as BLOCK_R, or sizes the kernels cannot take).
CONFIG_SCHEMA = {
    "xa": {"BLOCK_M": (16, 256), "BLOCK_K": (16, 512)},
    "dy": {"BLOCK_M": (16, 256), "BLOCK_N": (16, 512)},
    "gemm_fwd": {"BLOCK_M": (16, 256), "BLOCK_N": (16, 256), "BLOCK_K": (16, 256), "GROUP_M": (1, 64)},
    "gemm_bwd": {"BLOCK_M": (16, 256), "BLOCK_N": (16, 256), "BLOCK_K": (16, 256), "GROUP_M": (1, 64)},
}
_LAUNCH = {"num_warps": (1, 16), "num_stages": (1, 8)}


def valid_config(kernel: str, config) -> bool:
    """Whether `config` is a complete, sane launch config for `kernel` ("xa", "dy", "gemm_fwd", "gemm_bwd")."""
    schema = CONFIG_SCHEMA.get(kernel)
    if schema is None or not isinstance(config, dict) or set(config) != set(schema) | set(_LAUNCH):
        return False
    for name, (lo, hi) in {**schema, **_LAUNCH}.items():
        v = config[name]
        if name == "num_stages":
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        else:
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi and v & (v - 1) == 0
        if not ok:
            return False
    return True


def _valid_entry(key: str, entry) -> bool:
    try:
        Case.from_key(key)
    except (ValueError, TypeError):
        return False
    if not isinstance(entry, dict) or not isinstance(entry.get("ms"), dict):
        return False
    if not all(d in DESIGNS and _finite_positive(t) for d, t in entry["ms"].items()):
        return False
    configs = entry.get("configs")
    return configs is None or (isinstance(configs, dict) and all(
        design in TRITON_DESIGNS and isinstance(per_kernel, dict)
        and all(valid_config(k, c) for k, c in per_kernel.items())
        for design, per_kernel in configs.items()))


def read_table(path: Path, arch: str) -> dict[str, dict]:
    """This architecture's entries from one file; {} (with a warning saying why) when the file cannot be
    trusted. A missing file is silent."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"lorakern: ignoring the dispatch table {path}: not readable JSON ({exc})", stacklevel=2)
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("tables"), dict):
        warnings.warn(f"lorakern: ignoring the dispatch table {path}: not format {FORMAT} "
                      f"({{'format': {FORMAT}, 'tables': {{arch: {{...}}}}}})", stacklevel=2)
        return {}
    table = data["tables"].get(arch)
    if table is None:
        if data["tables"]:
            warnings.warn(f"lorakern: the dispatch table {path} holds measurements for {sorted(data['tables'])} "
                          f"only, not this GPU ({arch}): ignored (run `python -m lorakern tune` here)",
                          stacklevel=2)
        return {}
    if not isinstance(table, dict) or table.get("triton") != _triton_release():
        warnings.warn(f"lorakern: ignoring the {arch} measurements in {path}: made with Triton "
                      f"{table.get('triton') if isinstance(table, dict) else '?'}, this is {_triton_release()} "
                      f"(run `python -m lorakern tune` again)", stacklevel=2)
        return {}
    entries = table.get("entries")
    if not isinstance(entries, dict):
        warnings.warn(f"lorakern: ignoring the {arch} measurements in {path}: no 'entries' mapping", stacklevel=2)
        return {}
    good = {k: v for k, v in entries.items() if _valid_entry(k, v) and k.startswith(arch + "|")}
    if len(good) != len(entries):
        bad = sorted(set(entries) - set(good))
        warnings.warn(f"lorakern: ignoring {len(bad)} malformed entries of {path} (e.g. {bad[0]!r})", stacklevel=2)
    return good


def write_entries(arch: str, entries: Mapping[str, dict], path: Path | None = None) -> Path:
    """Merge `entries` into the cache file for `arch`: under an exclusive lock (two `tune` processes keep both
    their entries) and atomically (a crash leaves the old file)."""
    path = Path(path) if path is not None else cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock
            pass
        _merge_into(path, arch, entries)
    reload()
    return path


def _merge_into(path: Path, arch: str, entries: Mapping[str, dict]) -> Path:
    data = {"format": FORMAT, "tables": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict) and old.get("format") == FORMAT and isinstance(old.get("tables"), dict):
                data = old
        except (OSError, ValueError):
            pass  # a corrupt cache is replaced
    table = data["tables"].get(arch)
    if not isinstance(table, dict) or table.get("triton") != _triton_release():
        table = {"triton": _triton_release(), "torch": torch.__version__, "entries": {}}
    table["entries"].update(entries)
    data["tables"][arch] = table
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dispatch-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# What the op calls
# ----------------------------------------------------------------------------------------------------------
_tables: dict[str, dict] = {}
_decisions: dict[tuple, tuple[str, dict | None]] = {}
_failed: set[str] = set()


def entries(arch: str) -> dict[str, dict]:
    """The measurements in force for `arch`: the package's table, then the user's cache over it."""
    if arch not in _tables:
        merged = read_table(PACKAGE_TABLE, arch)
        merged.update(read_table(cache_path(), arch))
        _tables[arch] = merged
    return _tables[arch]


def reload() -> None:
    """Forget loaded tables and cached decisions (after `tune` wrote, or LORAKERN_CACHE_DIR changed)."""
    _tables.clear()
    _decisions.clear()


def has_failed(case: Case) -> bool:
    return case.key() in _failed


def mark_failed(case: Case) -> None:
    """A Triton kernel of this case failed to compile or launch: the cuBLAS path from now on."""
    _failed.add(case.key())
    _decisions.clear()


def design_for(arch: str, x_dtype, adapter_dtype, M: int, K: int, N: int, r: int, dropout: bool,
               tf32: bool) -> tuple[Case, str, dict]:
    """(case, measured design, {design: kernel configs} as tune timed them) for a layer call; cached per call
    signature."""
    sig = (arch, x_dtype, adapter_dtype, max(int(M) - 1, 0).bit_length(), K, N, r, dropout, tf32)
    hit = _decisions.get(sig)
    if hit is None:
        case = make_case(arch, x_dtype, adapter_dtype, M, K, N, r, dropout, tf32)
        table = entries(arch)
        design = "cublas" if case.key() in _failed else choose(case, table)
        entry = lookup(case, table)
        hit = _decisions[sig] = (case, design, (entry or {}).get("configs") or {})
    return hit

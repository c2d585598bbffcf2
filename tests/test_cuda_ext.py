"""The CUDA sources compile without a GPU (what CI can check of csrc/cuda/), and the build names only files that exist.

- every csrc/cuda/*.cu compiles with nvcc for an H100 (-arch=sm_90a, -c), and ptxas -v reports 0 spill bytes for
  every kernel: a few seconds each, as the .cu files include no torch header (the rule: raw pointers, the caller's
  stream; torch/extension.h alone took 4 min under nvcc here);
- the torch glue csrc/cuda/*.cpp passes the C++ front end (-fsyntax-only: declarations, templates, overloads)
  against this torch's headers and the toolkit's: ~7 s. The CPU wheel ships c10/cuda/ but not the generated
  c10/cuda/impl/cuda_cmake_macros.h, so C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for it (it only defines the
  shared-library export switch). Linking needs a CUDA torch (libc10_cuda): not checked here;
- setup.py adds csrc/cuda/ exactly when building with CUDA (LORAKERN_CUDA forces either way) and every source it
  names exists.
Skipped, with the reason, where nvcc or a C++ compiler is missing.
"""
import glob
import os
import re
import runpy
import shutil
import subprocess

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CU_FILES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
GLUE_FILES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cpp")))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = cpp_extension.CUDA_HOME or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else None


def _cuda_home() -> str | None:
    """The toolkit's root: CUDA_HOME / CUDA_PATH, torch's guess, nvcc's parent, /usr/local/cuda (nvcc on PATH may
    be a wrapper script elsewhere)."""
    nvcc = _nvcc()
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def _cuda_include() -> str | None:
    home = _cuda_home()
    return None if home is None else os.path.join(home, "include")


def test_there_are_cuda_sources_and_they_include_no_torch_header():
    assert CU_FILES and GLUE_FILES
    for path in CU_FILES + sorted(glob.glob(os.path.join(CUDA_DIR, "*.h"))):
        text = open(path).read()
        assert not re.search(r'#include\s*[<"](torch|ATen|c10)/', text), path
    for path in GLUE_FILES:  # needs cusparse.h, which a minimal toolkit lacks
        assert not re.search(r'#include\s*[<"]ATen/cuda/CUDAContext.h', open(path).read()), path


@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cu_compiles_for_sm90a_without_spills(path, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): the CUDA sources cannot be compiled here")
    proc = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90a", "-c", "-Xptxas", "-v", path,
                           "-o", str(tmp_path / "out.o")], capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "warning" not in log.lower(), log[-4000:]
    kernels = re.findall(r"Compiling entry function '(\w+)'", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert kernels and len(spills) == len(kernels), log[-4000:]
    assert all(s == ("0", "0") for s in spills), log[-4000:]


@pytest.mark.parametrize("path", GLUE_FILES, ids=os.path.basename)
def test_glue_compiles_against_torch_and_toolkit_headers(path):
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip(f"needs a C++ compiler ({cxx}) and the CUDA toolkit's headers ({inc})")
    torch_inc = cpp_extension.include_paths()
    if not os.path.exists(os.path.join(torch_inc[0], "c10", "cuda", "CUDAStream.h")):
        pytest.skip("this torch ships no c10/cuda headers")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DLORAKERN_WITH_CUDA",
           *[f"-I{p}" for p in torch_inc], f"-I{inc}", path]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 0 and not errors, "\n".join(errors[:20]) or proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# setup.py: which sources, when
# ---------------------------------------------------------------------------------------------------------------
def _setup_extensions(monkeypatch, env: str | None, cuda_version: str | None):
    import setuptools
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    if env is None:
        monkeypatch.delenv("LORAKERN_CUDA", raising=False)
    else:
        monkeypatch.setenv("LORAKERN_CUDA", env)
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    (ext,) = captured["ext_modules"]
    return ext


@pytest.mark.parametrize("env", [None, "0"])
def test_setup_builds_cpu_sources_only_without_cuda(monkeypatch, env):
    ext = _setup_extensions(monkeypatch, env, cuda_version=None)
    assert ext.sources and all(os.path.exists(os.path.join(ROOT, s)) for s in ext.sources)
    assert "csrc/small_linalg.cpp" in ext.sources
    assert not any("cuda" in s for s in ext.sources)


def test_setup_adds_the_cuda_sources_with_a_cuda_torch(monkeypatch):
    home = _cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit: CUDAExtension needs CUDA_HOME")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", home)
    ext = _setup_extensions(monkeypatch, "1", cuda_version="12.8")
    assert all(os.path.exists(os.path.join(ROOT, s)) for s in ext.sources)
    assert {os.path.relpath(p, ROOT) for p in CU_FILES + GLUE_FILES} <= set(ext.sources)
    nvcc_flags = ext.extra_compile_args["nvcc"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in nvcc_flags and "--use_fast_math" not in nvcc_flags
    assert ("LORAKERN_WITH_CUDA", None) in ext.define_macros


def test_setup_refuses_forced_cuda_on_a_cpu_torch(monkeypatch):
    with pytest.raises(SystemExit, match="LORAKERN_CUDA=1 needs a CUDA build of torch"):
        _setup_extensions(monkeypatch, "1", cuda_version=None)

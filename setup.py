"""Builds lorakern and its extension lorakern._C from csrc/.

The C++ sources (csrc/*.cpp) are always built. The CUDA sources (csrc/cuda/*.cu, and their torch glue
csrc/cuda/*.cpp) are added when torch has CUDA and a CUDA toolkit is found, or when LORAKERN_CUDA=1 forces it
(LORAKERN_CUDA=0 turns it off); the module then reports `_C.with_cuda = True`. The .cu files are compiled for
sm_80 and sm_90a (TORCH_CUDA_ARCH_LIST, when set, replaces that list) without --use_fast_math: the small
linear algebra needs IEEE division and square roots. Install with `pip install --no-build-isolation -e .` so
that the build uses the environment's torch instead of downloading another one.
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # build isolation would pull a multi-GB torch: refuse clearly instead
    raise SystemExit("lorakern: install torch first, then `pip install --no-build-isolation -e .`") from exc


# -gencode flags for the .cu files unless TORCH_CUDA_ARCH_LIST chooses (A100, and H100 with its sm_90a features)
CUDA_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]


def want_cuda() -> bool:
    flag = os.environ.get("LORAKERN_CUDA")
    if flag is not None and flag not in ("0", "1"):
        raise SystemExit(f"lorakern: LORAKERN_CUDA must be 0 or 1, got {flag!r}")
    if flag == "1" and torch.version.cuda is None:
        raise SystemExit("lorakern: LORAKERN_CUDA=1 needs a CUDA build of torch (the glue links c10_cuda); this "
                         f"torch {torch.__version__} is CPU-only. tests/test_cuda_ext.py compiles the CUDA sources "
                         "without one.")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def sources(root: str, pattern: str) -> list[str]:
    return sorted(glob.glob(pattern, root_dir=root))


def extensions():
    root = os.path.dirname(os.path.abspath(__file__))
    cpp = sources(root, os.path.join("csrc", "*.cpp"))
    cuda = sources(root, os.path.join("csrc", "cuda", "*.cu")) + sources(root, os.path.join("csrc", "cuda", "*.cpp"))
    cxx = ["-O3", "-std=c++17", "-ffp-contract=fast"]  # FMAs in csrc/small_linalg.cpp's loops (ISO mode disables them)
    if want_cuda() and cuda:
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += CUDA_ARCH_FLAGS
        return [cpp_extension.CUDAExtension(
            "lorakern._C", cpp + cuda, define_macros=[("LORAKERN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc})]
    return [cpp_extension.CppExtension("lorakern._C", cpp, extra_compile_args={"cxx": cxx})]


setup(
    name="lorakern",
    version="0.1.0",
    description="Triton/CUDA-accelerated LoRA for PyTorch: fused kernels, LoRA-One init, preconditioned optimizers",
    packages=find_packages(include=["lorakern", "lorakern.*"]),
    package_data={"lorakern.ops": ["dispatch_table.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "safetensors>=0.4"],
    extras_require={"hf": ["transformers>=4.45", "peft>=0.13"], "triton": ["triton>=3.0"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)

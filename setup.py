"""Builds lorakern and its extension lorakern._C from csrc/.

The C++ sources are always built. The .cu sources (csrc/cuda/) are added when torch has CUDA and a CUDA
toolkit is found, or when LORAKERN_CUDA=1 forces it (LORAKERN_CUDA=0 turns it off). Install with
`pip install --no-build-isolation -e .` so that the build uses the environment's torch instead of
downloading another one.
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # build isolation would pull a multi-GB torch: refuse clearly instead
    raise SystemExit("lorakern: install torch first, then `pip install --no-build-isolation -e .`") from exc


def want_cuda() -> bool:
    flag = os.environ.get("LORAKERN_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extensions():
    root = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp"), root_dir=root))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"), root_dir=root))
    cxx = ["-O3", "-std=c++17"]
    if want_cuda() and cu:
        return [cpp_extension.CUDAExtension(
            "lorakern._C", cpp + cu, define_macros=[("LORAKERN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]})]
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

"""Build fastattn._C.

CPU kernels and bindings always; CUDA kernels too when torch has CUDA and nvcc is found.

Environment:
  FASTATTN_CUDA_ARCHS  ';'-separated arch list, e.g. "8.0;9.0a" (default: the visible GPU's
                       arch, else "8.0;9.0a"). "9.0a" enables the sm_90a-specific features.
  FASTATTN_FORCE_CPU=1 build the CPU kernels only, even with a CUDA toolchain.
  FASTATTN_CPU_MARCH   -march for the CPU kernels (default: native, since the package is
                       built on the machine that runs it).
  MAX_JOBS             parallel compile jobs (honoured by torch's ninja build).
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_archs():
    env = os.environ.get("FASTATTN_CUDA_ARCHS")
    if env:
        return [a.strip() for a in env.replace(",", ";").split(";") if a.strip()]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return [f"{major}.{minor}a" if major >= 9 else f"{major}.{minor}"]
    return ["8.0", "9.0a"]


def _gencode(arch):
    # "9.0a" -> arch=compute_90a,code=sm_90a
    num = arch.replace(".", "")
    return f"-gencode=arch=compute_{num},code=sm_{num}"


with_cuda = (
    torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.environ.get("FASTATTN_FORCE_CPU", "0") != "1"
)

march = os.environ.get("FASTATTN_CPU_MARCH", "native")
# -fopenmp: ATen's at::parallel_for is an inline OpenMP region in torch's headers; without
# it the region compiles to a serial loop and every CPU kernel runs on one thread. The
# libgomp.so.1 linked here is the one libtorch_cpu has already loaded (same soname), so
# torch.set_num_threads governs our kernels too.
cxx_flags = ["-O3", f"-march={march}", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
include_dirs = [os.path.join(ROOT, "csrc", "include")]
sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
bindings = _rel(glob.glob(os.path.join(ROOT, "csrc", "bindings", "*.cpp")))
if not with_cuda:
    bindings = [b for b in bindings if not b.endswith("register_cuda.cpp")]
sources += bindings

if with_cuda:
    archs = _cuda_archs()
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    defines = ["-DFASTATTN_WITH_CUDA", f'-DFASTATTN_CUDA_ARCHS="{";".join(archs)}"']
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-DFASTATTN_WITH_CUDA",
    ] + [_gencode(a) for a in archs]
    ext = CUDAExtension(
        "fastattn._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "fastattn._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    name="fastattn",
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

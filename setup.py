"""Builds fusedvae._C: the CPU kernels always, the CUDA kernels whenever torch
was built with CUDA and nvcc is found (a GPU need not be present).

Environment:
  FUSEDVAE_CPU_ONLY=1     build without CUDA even where it could be built.
  TORCH_CUDA_ARCH_LIST    CUDA architectures; defaults to "8.0;9.0" when no GPU
                          is visible (torch otherwise picks the visible GPU's).
  MAX_JOBS                parallel compile jobs (ninja).
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("FUSEDVAE_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    cxx_flags = ["-O3"]
    if platform.machine() in ("x86_64", "AMD64"):
        # at::vec picks its AVX2 implementation (and the Sleef AVX2 math that
        # libtorch_cpu exports) only when these are defined; without them every
        # Vectorized op is a scalar loop.
        cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        cxx_flags += ["-DCPU_CAPABILITY=DEFAULT"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc")]
    if not _want_cuda():
        return cpp_extension.CppExtension(
            "fusedvae._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    # torch's CUDA headers include cusparse.h, which the pip-installed CUDA
    # runtime ships inside site-packages rather than under CUDA_HOME.
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            for sub in ("cu13/include", "cusparse/include"):
                path = os.path.join(root, sub)
                if os.path.isdir(path):
                    include_dirs.append(path)
    sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    return cpp_extension.CUDAExtension(
        "fusedvae._C", sources, include_dirs=include_dirs,
        define_macros=[("FUSEDVAE_WITH_CUDA", "1")],
        # No fast-math: the formulas rely on IEEE exp/log1p/tanh/sinh accuracy.
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
    )


def _write_build_info(with_cuda: bool) -> None:
    # Lets the tests assert that an installation meant to have CUDA kernels has them.
    with open(os.path.join(HERE, "fusedvae", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py: how this copy of fusedvae._C was built."""\n')
        f.write(f"WITH_CUDA = {with_cuda}\n")


_write_build_info(_want_cuda())

setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)

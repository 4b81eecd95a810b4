"""Builds fusedvae's compiled modules:

* ``fusedvae._C``: op registration, the baseline CPU kernels (no instruction set
  beyond the platform's baseline) and, where a CUDA toolkit is found, the CUDA
  kernels (a GPU need not be present);
* on x86-64, ``fusedvae._cpu_avx2`` and ``fusedvae._cpu_avx512``: the same CPU
  kernels compiled with each instruction set's flags, each a module of its own
  that ``fusedvae._C`` imports only where torch runs that instruction set.

Environment (all optional):
  CUDA_HOME               the CUDA toolkit to build with; found by itself otherwise.
  FUSEDVAE_CPU_ONLY=1     build without CUDA even where it could be built.
  TORCH_CUDA_ARCH_LIST    CUDA architectures; defaults to "8.0;9.0" when no GPU
                          is visible (torch otherwise picks the visible GPU's).
  CXX, MAX_JOBS           the C++ compiler (g++ or clang++) and parallel jobs
                          of each module's ninja run.

The modules are built side by side (``build_ext --parallel``, by default one
worker per module), each by its own ninja run in its own build folder.
"""
import glob
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading

import torch
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
X86_64 = platform.machine().lower() in ("x86_64", "amd64")

# The instruction sets with a kernel module of their own, as torch names them
# (at::get_cpu_capability()), with the flags torch compiles its own kernels of
# that set with. at::vec picks its implementation by CPU_CAPABILITY_<SET>.
CPU_BUILDS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def _say(message: str) -> None:
    print(f"fusedvae: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ CUDA --


def _is_toolkit(root) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and (
        os.path.isfile(os.path.join(root, "bin", "nvcc"))
    )


def _nvcc_targets(path: str):
    """Toolkit roots an ``nvcc`` on PATH leads to: through symbolic links, and
    through a wrapper script that execs the real nvcc by its full path."""
    real = os.path.realpath(path)
    yield os.path.dirname(os.path.dirname(real))
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return
    if head.startswith(b"#!"):
        for found in re.findall(rb"(/[^\s'\"]+)/bin/nvcc\b", head):
            yield os.fsdecode(found)


# Where a toolkit is looked for when neither CUDA_HOME nor nvcc on PATH names one.
DEFAULT_TOOLKITS = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)


def _find_cuda_home():
    """The CUDA toolkit root to build with, or None. CUDA_HOME (or CUDA_PATH) wins
    when set; otherwise the toolkit behind ``nvcc`` on PATH, then DEFAULT_TOOLKITS."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if not _is_toolkit(root):
                sys.exit(f"fusedvae: {var}={root} is not a CUDA toolkit (no include/cuda_runtime.h "
                         f"and bin/nvcc there); point it at one, or unset it")
            return root
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += list(_nvcc_targets(nvcc))
    return next((root for root in candidates + DEFAULT_TOOLKITS if _is_toolkit(root)), None)


def _nvcc_version(root: str):
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _cuda_home_for_build():
    """The toolkit to build the CUDA kernels with, or None with one line saying why not."""
    how = "set CUDA_HOME to a CUDA toolkit to build the CUDA kernels"
    if os.environ.get("FUSEDVAE_CPU_ONLY", "0") == "1":
        _say("FUSEDVAE_CPU_ONLY=1: building the CPU kernels only")
        return None
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} has no CUDA: building the CPU kernels only")
        return None
    root = _find_cuda_home()
    if root is None:
        _say(f"no CUDA toolkit found (nvcc, /usr/local/cuda): building the CPU kernels only; {how}")
        return None
    version = _nvcc_version(root)
    wanted = int(torch.version.cuda.split(".")[0])
    if version is None or version[0] != wanted:
        found = "an unreadable version" if version is None else f"CUDA {version[0]}.{version[1]}"
        _say(f"the toolkit at {root} is {found} but torch was built with CUDA {torch.version.cuda}: "
             f"building the CPU kernels only; {how} {wanted}.x")
        return None
    return root


# ---------------------------------------------------------------- OpenMP --


def _compiler():
    return shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")


def _openmp_flags():
    """-fopenmp where torch parallelises with OpenMP and the compiler can build
    OpenMP code; without it the kernels' parallel loops run on one thread."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return []
    probe = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(probe)
        try:
            ok = subprocess.run(_compiler() + ["-fopenmp", src, "-o", os.path.join(tmp, "probe")],
                                capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    if ok:
        return ["-fopenmp"]
    _say(f"{' '.join(_compiler())} cannot build OpenMP code: the CPU kernels will run on one "
         f"thread (for clang, install its OpenMP runtime, e.g. libomp-dev)")
    return []


# ------------------------------------------------------------- modules --


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extensions(cpp_extension, cuda_home):
    openmp = _openmp_flags()
    include_dirs = [os.path.join(HERE, "csrc")]
    # No fast-math anywhere: the formulas rely on IEEE exp/log1p/tanh/sinh accuracy.
    # No implicit contraction of a product into an add (g++ contracts across
    # statements by default, clang within one): a result then depends neither on
    # what the compiler inlines nor on which compiler built it, so two kernels
    # that compute the same value give the same bits. The code fuses where it
    # says so (at::vec::fmadd, the ops policies' fma).
    base_flags = ["-O3", "-ffp-contract=off"] + openmp

    # A kernel module exports its PyInit function and nothing else, so that no
    # copy of an inline function compiled for its instruction set can stand in
    # for another library's. (A version script is an ELF linker feature.)
    hide = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    exports = os.path.join(HERE, "csrc", "cpu", "kernel_module.map")
    hide_link = [f"-Wl,--version-script={exports}"] if sys.platform.startswith("linux") else []
    kernel_modules = [
        cpp_extension.CppExtension(
            f"fusedvae._cpu_{isa.lower()}", [f"csrc/cpu/kernels_{isa.lower()}.cpp"],
            include_dirs=include_dirs,
            extra_compile_args=base_flags + hide + flags
            + [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"],
            extra_link_args=openmp + hide_link,
        )
        for isa, flags in (CPU_BUILDS.items() if X86_64 else ())
    ]

    # fusedvae._C: baseline code only, so it loads on any CPU of the platform.
    sources = _sources("csrc/*.cpp") + ["csrc/cpu/kernels.cpp", "csrc/cpu/kernels_default.cpp",
                                        "csrc/cpu/register.cpp", "csrc/cpu/objective.cpp"]
    cxx = base_flags + ["-DCPU_CAPABILITY=DEFAULT"]
    if cuda_home is None:
        main = cpp_extension.CppExtension(
            "fusedvae._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=openmp,
        )
        return [main] + kernel_modules
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
    main = cpp_extension.CUDAExtension(
        "fusedvae._C", sources, include_dirs=include_dirs,
        define_macros=[("FUSEDVAE_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=openmp,
    )
    return [main] + kernel_modules


def _write_build_info(with_cuda: bool) -> None:
    # Lets the tests assert that an installation meant to have CUDA kernels has them.
    with open(os.path.join(HERE, "fusedvae", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py: how this copy of fusedvae\'s modules was built."""\n')
        f.write(f"WITH_CUDA = {with_cuda}\n")
        f.write(f"CPU_BUILDS = {sorted(CPU_BUILDS) if X86_64 else []!r}\n")


def _side_by_side(build_extension_cls):
    """``build_extension_cls`` (torch's BuildExtension) building the modules in parallel.

    torch writes each module's build.ninja into ``build_temp``; two modules
    built at once need two folders, so each worker thread sees a
    ``build_temp`` of its own (``<build_temp>/<module name>``). Without
    ``--parallel``, one worker per module.
    """

    class BuildSideBySide(build_extension_cls):
        _module = threading.local()

        @property
        def build_temp(self):
            base = self.__dict__.get("_build_temp")
            name = getattr(self._module, "name", None)
            return os.path.join(base, name) if base is not None and name else base

        @build_temp.setter
        def build_temp(self, value):
            self.__dict__["_build_temp"] = value

        def finalize_options(self):
            super().finalize_options()
            if self.parallel is None:
                self.parallel = max(1, len(self.extensions or ()))

        def build_extension(self, ext):
            self._module.name = ext.name
            try:
                super().build_extension(ext)
            finally:
                self._module.name = None

    return BuildSideBySide


def main() -> None:
    cuda_home = _cuda_home_for_build()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported; its own
        # guess from `nvcc` on PATH is wrong where nvcc is a wrapper script.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home
    extensions = _extensions(cpp_extension, cuda_home)
    _write_build_info(cuda_home is not None)
    setup(ext_modules=extensions, cmdclass={"build_ext": _side_by_side(cpp_extension.BuildExtension)})


# pip's build backend runs this file as __main__ too; tests load its functions
# under another name (tests/test_build.py).
if __name__ == "__main__":
    main()

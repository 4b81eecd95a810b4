"""What the build produced and how it runs: a CPU kernel build per instruction
set, each loaded only where torch runs that set; baseline code in fusedvae._C;
kernels spread over torch's threads; CUDA kernels wherever the build had CUDA
(CI compiles them on machines without a GPU)."""
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import fusedvae
from fusedvae import _build_info, _C
from helpers import CUDA_KERNEL_SWITCHES

OPS = (
    "vae_loss",
    "vae_loss_backward",
    "vae_loss_and_grad",
    "gaussian_kl_per_dim",
    "gaussian_kl_per_dim_backward",
    "gaussian_kl",
    "gaussian_kl_backward",
    "cb_log_normalizer",
    "cb_log_normalizer_backward",
    "dmol_nll",
    "dmol_nll_and_grad",
    "dmol_nll_and_pixel_nll",
    "dmol_nll_backward",
)
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
PACKAGE_DIR = os.path.dirname(os.path.abspath(fusedvae.__file__))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedvae::{op}", key)


def _module_file(name: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(f"fusedvae.{name}")
    assert spec is not None and spec.origin, f"fusedvae.{name} was not built"
    return spec.origin


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cpu_kernel(op):
    assert _has_kernel(op, "CPU")


@pytest.mark.parametrize("name", CUDA_KERNEL_SWITCHES)
def test_cuda_kernel_switches_have_their_defaults_and_round_trip(name):
    # KernelOptions: a kernel that has not yet run on a GPU stays off by default;
    # the mixture's approximate logarithm and exponential are on since a GPU run
    # proved them.
    setter, default = getattr(_C, f"_set_cuda_{name}"), CUDA_KERNEL_SWITCHES[name]
    assert setter(not default) is default
    assert setter(default) is (not default)
    assert setter(default) is default


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel_when_built_with_cuda(op):
    assert _has_kernel(op, "CUDA") == _build_info.WITH_CUDA
    assert fusedvae.has_cuda_kernels() == _build_info.WITH_CUDA


# ------------------------------------------------- instruction-set builds --

# Which builds exist: on x86-64 an AVX2 and an AVX-512 module beside the
# baseline kernels inside fusedvae._C.
def _nvcc():
    found = shutil.which("nvcc")
    if found is None and os.path.isfile("/usr/local/cuda/bin/nvcc"):
        found = "/usr/local/cuda/bin/nvcc"
    return found


# The float32 kernels' sources (kernels.cu: the KL, normaliser and final
# stages), compiled to PTX once per module.
CUDA_SOURCES = ["dmol.cu", "objective_float.cu", "kernels.cu"]


@pytest.fixture(scope="module")
def kernels_ptx(tmp_path_factory):
    """`source -> {kernel name: its PTX}`, compiled by nvcc for sm_90 on first use."""
    if _nvcc() is None:
        pytest.skip("needs nvcc (a CUDA toolkit) to compile the CUDA kernels")
    tmp = tmp_path_factory.mktemp("ptx")
    compiled = {}

    def get(source):
        if source not in compiled:
            ptx = tmp / (source + ".ptx")
            subprocess.run([_nvcc(), "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-arch=sm_90", "-ptx",
                            "-I", os.path.join(REPO_ROOT, "csrc"),
                            os.path.join(REPO_ROOT, "csrc", "cuda", source), "-o", str(ptx)],
                           check=True, capture_output=True)
            entries = ptx.read_text().split(".entry ")[1:]  # each kernel's PTX, up to the next one
            compiled[source] = {entry.split("(", 1)[0]: entry for entry in entries}
        return compiled[source]

    return get


@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_kernels_use_no_local_memory(source, kernels_ptx):
    # An array indexed by a run-time value (a loop over a run-time channel count,
    # over a weight's dimensions) is placed in local memory, a thread's stack in
    # L1 and DRAM: on an H200 such loads took half of the discretized mixture's
    # cycles. The kernels index every array by constants; the PTX nvcc
    # generates declares no local memory.
    kernels = kernels_ptx(source)
    assert kernels
    with_local = [name for name, body in kernels.items() if ".local" in body]
    assert not with_local, f"kernels with local memory: {with_local}"


@pytest.mark.parametrize("source", ["objective_float.cu", "kernels.cu"])
def test_cuda_vector_kernels_store_16_bytes_per_instruction(source, kernels_ptx):
    # A kernel instantiated for VEC > 1 elements per access stores each pack of
    # 16 bytes with one instruction (kernels.cuh's store). Assigning the pack
    # compiled to one 4-byte store per element in every backward kernel of the
    # objective: four times the store instructions for the same bytes.
    def vector_width(name):
        found = re.search(r"(?:objective_backward_kernel|map_chunks_kernel)ILi(\d+)E", name)
        return int(found.group(1)) if found else 0

    vector_kernels = {name: body for name, body in kernels_ptx(source).items() if vector_width(name) > 1}
    assert vector_kernels
    scalar_only = [name for name, body in vector_kernels.items() if "st.global.v4" not in body]
    assert not scalar_only, f"vector kernels without a 16-byte store: {scalar_only}"


def test_an_instruction_set_build_for_each_of_torchs_x86_capabilities():
    assert _build_info.CPU_BUILDS == (["AVX2", "AVX512"] if X86_64 else [])
    for isa in _build_info.CPU_BUILDS:
        _module_file(f"_cpu_{isa.lower()}")


def _capabilities_of_this_cpu():
    """torch's CPU capabilities this machine can be run at, lowest first."""
    best = torch.backends.cpu.get_cpu_capability()
    if not X86_64:
        return [best]
    order = ["DEFAULT", "AVX2", "AVX512"]
    return order[: order.index(best) + 1] if best in order else ["DEFAULT"]


_BUILD_SCRIPT = """
import sys, torch, fusedvae
from fusedvae import _C
g = torch.Generator().manual_seed(0)
x = torch.randn(3, 3, 33, 35, generator=g)
t = torch.rand(3, 3, 33, 35, generator=g)
mu, lv = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
rows = []
for lik in ("bernoulli", "cbernoulli", "gaussian"):
    xx = x.clone().requires_grad_()
    out = fusedvae.vae_loss(xx, t, mu, lv, likelihood=lik)
    out.loss.backward()
    rows.append(torch.cat([out.rec, xx.grad.flatten()]))
loaded = sorted(m for m in sys.modules if m.startswith("fusedvae._cpu_"))
torch.save({"build": _C.cpu_kernels, "loaded": loaded, "values": torch.stack(rows)}, sys.argv[1])
"""


def _run_at_capability(capability: str, path) -> dict:
    # at::get_cpu_capability() honours ATEN_CPU_CAPABILITY, so a fresh process
    # with it set runs the build of that instruction set.
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, str(path)], env=env, check=True,
                   cwd=REPO_ROOT)
    return torch.load(path)


@pytest.fixture(scope="module")
def runs_at_each_capability(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capabilities")
    return {cap: _run_at_capability(cap, tmp / f"{cap}.pt") for cap in _capabilities_of_this_cpu()}


def test_the_build_torch_runs_is_the_build_that_runs(runs_at_each_capability):
    # ... and only that build's module is loaded: an AVX-512 module is never
    # even imported where torch does not run AVX-512 code.
    for capability, run in runs_at_each_capability.items():
        assert run["build"] == capability
        expected = [] if capability == "DEFAULT" else [f"fusedvae._cpu_{capability.lower()}"]
        assert run["loaded"] == expected, capability


def test_this_process_runs_torchs_build():
    assert _C.cpu_kernels == torch.backends.cpu.get_cpu_capability() or not X86_64


def test_every_cpu_build_computes_the_same(runs_at_each_capability):
    # Each build sums its vector lanes in its own order: a few float32 ulps.
    runs = list(runs_at_each_capability.values())
    for run in runs[1:]:
        torch.testing.assert_close(run["values"], runs[0]["values"], rtol=2e-6, atol=1e-6)


_MISSING_BUILDS_SCRIPT = """
import sys, warnings
for isa in ("avx2", "avx512"):
    sys.modules["fusedvae._cpu_" + isa] = None  # importing it raises ModuleNotFoundError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from fusedvae import _C
print(_C.cpu_kernels)
for w in caught:
    print(w.category.__name__, w.message)
"""


@pytest.mark.skipif(not X86_64, reason="instruction-set builds exist on x86-64 only")
def test_a_missing_build_is_a_warning_and_the_baseline_runs():
    out = subprocess.run([sys.executable, "-c", _MISSING_BUILDS_SCRIPT], check=True, cwd=REPO_ROOT,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0] == "DEFAULT"
    tried = [isa for isa in ("AVX512", "AVX2") if isa in _capabilities_of_this_cpu()]
    assert len(out) == 1 + len(tried), out
    for isa, line in zip(tried, out[1:]):
        assert line.startswith(f"RuntimeWarning fusedvae: could not load the {isa} CPU kernels"), line
        assert "ModuleNotFoundError" in line and "using a slower build" in line, line


def _disassembly(path: str) -> str:
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to inspect the built modules"
    return subprocess.run([objdump, "-d", "--no-show-raw-insn", path], check=True,
                          capture_output=True, text=True).stdout


@pytest.mark.skipif(not X86_64, reason="instruction-set builds exist on x86-64 only")
def test_fusedvae_C_is_baseline_code():
    # It is loaded on every CPU: no AVX (ymm) or AVX-512 (zmm) instruction.
    code = _disassembly(_C.__file__)
    assert "%ymm" not in code and "%zmm" not in code


@pytest.mark.skipif(not X86_64, reason="instruction-set builds exist on x86-64 only")
def test_each_build_uses_its_instruction_set_and_no_wider_one():
    avx2 = _disassembly(_module_file("_cpu_avx2"))
    avx512 = _disassembly(_module_file("_cpu_avx512"))
    assert "%ymm" in avx2 and "%zmm" not in avx2
    assert "%zmm" in avx512
    # at::vec calls Sleef's vector functions of the build's width; without the
    # CPU_CAPABILITY_<set> macros it would fall back to scalar loops.
    with open(_module_file("_cpu_avx2"), "rb") as f:
        assert b"Sleef_expf8_u10" in f.read()
    with open(_module_file("_cpu_avx512"), "rb") as f:
        assert b"Sleef_expf16_u10" in f.read()


@pytest.mark.skipif(not (X86_64 and sys.platform.startswith("linux")),
                    reason="instruction-set builds exist on x86-64 only; the export list is an ELF linker script")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_kernel_modules_export_nothing_but_their_init(isa):
    # So no function compiled for the instruction set (an inline std:: or c10
    # function, say) can be bound by another library in the process.
    out = subprocess.run(["nm", "-D", "--defined-only", _module_file(f"_cpu_{isa}")], check=True,
                         capture_output=True, text=True).stdout
    assert [line.split()[-1] for line in out.splitlines()] == [f"PyInit__cpu_{isa}"]


# --------------------------------------------------------------- threads --

def _cpu_seconds_per_thread() -> dict:
    """CPU time (user + system) of each thread of this process, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    times = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        times[tid] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return times


def threads_that_worked(work, seconds: float = 0.3, settle: float = 0.25) -> int:
    """How many threads of this process spent at least a fifth of the busiest
    thread's CPU time while `work()` was called repeatedly for `seconds`.

    The calls first run for `settle` seconds unmeasured: an OpenMP runtime's
    idle workers spin for a while after their last parallel region (LLVM's
    libomp for 200 ms), which must not count as work."""
    start = time.perf_counter()
    while time.perf_counter() - start < settle:
        work()
    before = _cpu_seconds_per_thread()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()
    after = _cpu_seconds_per_thread()
    spent = [after[t] - before.get(t, 0.0) for t in after]
    return sum(s >= 0.2 * max(spent) for s in spent if s > 0)


def _kernel_calls():
    # Every op's CPU kernel on inputs big enough that each of two threads gets
    # work: a sample of 3*64*64 elements is several kChunk (16384) chunks, and
    # the latent of 8 x 32768 is 16 of them. vae_loss and its backward spread
    # only their per-element reconstruction and KL kernels over the threads
    # (the [B]- and [J]-sized finalisation runs on the calling thread), so the
    # reconstruction is the large part of each call.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 64, 64, generator=g)
    t = torch.rand(8, 3, 64, 64, generator=g)
    s = 0.1 * torch.randn(8, 3, 64, 64, generator=g)
    mu, lv = torch.randn(8, 32768, generator=g), torch.randn(8, 32768, generator=g)
    per_dim = torch.randn(8, 32768, generator=g)
    eta = torch.randn(8 * 12288, generator=g)
    ops = torch.ops.fusedvae
    calls = {
        "gaussian_kl_per_dim": lambda: ops.gaussian_kl_per_dim(mu, lv),
        "gaussian_kl_per_dim_backward": lambda: ops.gaussian_kl_per_dim_backward(per_dim, mu, lv),
        "cb_log_normalizer": lambda: ops.cb_log_normalizer(eta),
        "cb_log_normalizer_backward": lambda: ops.cb_log_normalizer_backward(eta, eta),
    }
    grad_loss = torch.ones(())
    # (name, likelihood, logits, per-element log_scale, log_scale_value)
    for name, lik, logits, scale, scale_value in (
        ("bernoulli-logits", "bernoulli", True, None, 0.0),
        ("bernoulli-probs", "bernoulli", False, None, 0.0),
        ("cbernoulli-logits", "cbernoulli", True, None, 0.0),
        ("gaussian-log_scale_tensor", "gaussian", True, s, 0.0),
        ("gaussian-log_scale_value", "gaussian", True, None, -0.3),
    ):
        xx = x if logits else torch.sigmoid(x)
        # (recon, target, mu, logvar, log_scale, beta, likelihood, logits,
        #  reduction, log_scale_value, optimal_scale, beta_value, free_bits)
        args = (xx, t, mu, lv, scale, None, lik, logits, "batchmean", scale_value, False, 0.7, 0.0)
        aux = ops.vae_loss(*args)[3]
        mask = [True, True, scale is not None, False]
        calls[f"vae_loss-{name}"] = lambda args=args: ops.vae_loss(*args)
        calls[f"vae_loss_backward-{name}"] = (
            lambda args=args, aux=aux, mask=mask:
            ops.vae_loss_backward(grad_loss, None, None, *args[:6], aux, *args[6:], mask))
    return calls


KERNEL_CALLS = _kernel_calls()


def test_thread_measurement_tells_one_thread_from_two(restore_threads):
    work = KERNEL_CALLS["vae_loss-bernoulli-logits"]
    torch.set_num_threads(1)
    assert threads_that_worked(work) == 1
    torch.set_num_threads(2)
    assert threads_that_worked(work) == 2


@pytest.mark.parametrize("kernel", sorted(KERNEL_CALLS))
def test_cpu_kernels_run_on_every_thread_torch_allows(kernel, restore_threads):
    torch.set_num_threads(2)
    assert threads_that_worked(KERNEL_CALLS[kernel]) == 2


# ------------------------------------------------- finding the CUDA toolkit --

@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's functions, loaded without building anything, with no CUDA
    variables set and no default toolkit locations."""
    import runpy

    functions = runpy.run_path(os.path.join(REPO_ROOT, "setup.py"), run_name="fusedvae_setup")
    for var in ("CUDA_HOME", "CUDA_PATH", "FUSEDVAE_CPU_ONLY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(functions["_find_cuda_home"].__globals__, "DEFAULT_TOOLKITS", [])
    return functions


def _fake_toolkit(root, release: str):
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    nvcc.chmod(0o755)
    return root


def _torch_cuda_major():
    return int((torch.version.cuda or "13.0").split(".")[0])


@pytest.mark.parametrize("how", ["wrapper script", "symbolic link"])
def test_setup_finds_the_toolkit_behind_nvcc_on_path(setup_py, tmp_path, monkeypatch, how):
    # As on machines where /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc:
    # torch's own guess (the directory above nvcc's) would be /usr/local.
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0", f"{_torch_cuda_major()}.0")
    bin_dir = tmp_path / "local" / "bin"
    bin_dir.mkdir(parents=True)
    if how == "wrapper script":
        (bin_dir / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
        (bin_dir / "nvcc").chmod(0o755)
    else:
        (bin_dir / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert setup_py["_find_cuda_home"]() == str(toolkit)


def test_setup_prefers_cuda_home_and_names_a_wrong_one(setup_py, tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert setup_py["_find_cuda_home"]() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="CUDA_HOME=.*nowhere is not a CUDA toolkit"):
        setup_py["_find_cuda_home"]()


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusedvae: "), lines
    return lines[0]


def test_setup_without_a_toolkit_builds_the_cpu_kernels_and_says_so(setup_py, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # as the CUDA build of torch
    monkeypatch.setenv("PATH", str(tmp_path))
    assert setup_py["_cuda_home_for_build"]() is None
    assert "CPU kernels only" in _one_line(capsys)


def test_setup_skips_a_toolkit_of_another_major_version(setup_py, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    _fake_toolkit(tmp_path / "cuda", "12.4")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert setup_py["_cuda_home_for_build"]() is None
    line = _one_line(capsys)
    assert "CUDA 12.4" in line and "CUDA 13.0" in line and "CPU kernels only" in line


def test_setup_cpu_only_switch(setup_py, monkeypatch, capsys):
    monkeypatch.setenv("FUSEDVAE_CPU_ONLY", "1")
    assert setup_py["_cuda_home_for_build"]() is None
    assert "CPU kernels only" in _one_line(capsys)


# ------------------------------------------------- modules built side by side --

def test_setup_builds_the_modules_side_by_side_each_in_its_own_folder(setup_py, tmp_path):
    """Each worker sees build_temp/<module>; unset --parallel means one worker per module."""
    import threading

    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    seen = {}
    barrier = threading.Barrier(2, timeout=30)  # both modules in flight at once, or this fails

    class Recording(build_ext):
        def build_extension(self, ext):
            barrier.wait()
            seen[ext.name] = (self.build_temp, threading.get_ident())

    from setuptools import Extension

    dist = Distribution({"ext_modules": [Extension("pkg.a", ["a.cpp"]), Extension("pkg.b", ["b.cpp"])]})
    cmd = setup_py["_side_by_side"](Recording)(dist)
    cmd.initialize_options()
    cmd.build_temp = str(tmp_path)
    cmd.finalize_options()
    assert cmd.parallel == 2
    cmd.build_extensions()
    assert seen["pkg.a"][0] == str(tmp_path / "pkg.a") and seen["pkg.b"][0] == str(tmp_path / "pkg.b")
    assert seen["pkg.a"][1] != seen["pkg.b"][1]
    assert cmd.build_temp == str(tmp_path)  # outside a worker, the folder given

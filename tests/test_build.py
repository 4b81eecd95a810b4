"""What the build produced: vectorised CPU kernels, and CUDA kernels wherever
the build had CUDA (CI compiles them on machines without a GPU)."""
import os
import platform

import pytest
import torch

import fusedvae
from fusedvae import _build_info, _C

OPS = (
    "recon_loss",
    "recon_loss_backward",
    "gaussian_kl",
    "gaussian_kl_per_dim",
    "gaussian_kl_backward",
    "cb_log_normalizer",
    "cb_log_normalizer_backward",
)


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedvae::{op}", key)


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cpu_kernel(op):
    assert _has_kernel(op, "CPU")


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel_when_built_with_cuda(op):
    assert _has_kernel(op, "CUDA") == _build_info.WITH_CUDA
    assert fusedvae.has_cuda_kernels() == _build_info.WITH_CUDA


def test_cuda_build_when_expected():
    # .ci/run sets this where nvcc exists: the CUDA sources must then have compiled.
    if os.environ.get("FUSEDVAE_EXPECT_CUDA_BUILD") != "1":
        pytest.skip("no CUDA toolchain announced (FUSEDVAE_EXPECT_CUDA_BUILD unset)")
    assert _build_info.WITH_CUDA


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AVX2 kernels are built on x86_64 only")
def test_cpu_kernels_use_avx2_vector_math():
    # Without the CPU_CAPABILITY_AVX2 build flags at::vec falls back to scalar
    # loops and never calls Sleef's 8-wide functions.
    with open(_C.__file__, "rb") as f:
        binary = f.read()
    assert b"Sleef_expf8_u10" in binary
    assert b"Sleef_logf8_u10" in binary


_ISA_SCRIPT = """
import sys, torch, fusedvae
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
torch.save(torch.stack(rows), sys.argv[1])
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="two kernel builds exist on x86_64 only")
def test_avx2_and_default_kernels_agree(tmp_path):
    # kernels.cpp follows at::get_cpu_capability(); ATEN_CPU_CAPABILITY=avx2
    # forces the AVX2 build where the default may be the AVX-512 one.
    import subprocess
    import sys

    results = {}
    for isa in ("default", "avx2"):
        env = dict(os.environ)
        env.pop("ATEN_CPU_CAPABILITY", None)
        if isa != "default":
            env["ATEN_CPU_CAPABILITY"] = isa
        path = tmp_path / f"{isa}.pt"
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(fusedvae.__file__))))
        results[isa] = torch.load(path)
    torch.testing.assert_close(results["avx2"], results["default"], rtol=2e-6, atol=1e-6)

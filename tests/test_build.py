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

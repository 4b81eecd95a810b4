"""pytest-benchmark: forward+backward of the VAE loss, eager vs torch.compile vs fusedvae.

Run ``pytest benchmarks/ --benchmark-group-by=group``: one group per case
(shape, latent size, target dtype) holding the three methods, timed on the same
tensors. ``pytest benchmarks/ --benchmark-disable`` runs every benchmark once,
untimed, as a smoke test. See benchmarks/README.md.

Environment:
    FUSEDVAE_BENCH_QUICK=1    the small --quick cases instead of the default ones.
    FUSEDVAE_BENCH_ROUNDS=N   timed rounds per benchmark (default 20).
    FUSEDVAE_BENCH_WARMUP=N   untimed rounds first, including compilation (default 3).
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fusedvae import bench  # noqa: E402

QUICK = os.environ.get("FUSEDVAE_BENCH_QUICK", "0") not in ("", "0")
ROUNDS = int(os.environ.get("FUSEDVAE_BENCH_ROUNDS", "20"))
WARMUP = int(os.environ.get("FUSEDVAE_BENCH_WARMUP", "3"))
BETA = 1.0

CASES = bench.QUICK_CASES if QUICK else bench.DEFAULT_CASES
CASE_IDS = [bench.case_name(*c) for c in CASES]


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request):
    """(name, inputs) for one case; module-scoped, so every method sees the same tensors."""
    shape, latent_dim, target_dtype = request.param
    inputs = bench.make_inputs(shape, latent_dim, target_dtype, seed=0)
    yield bench.case_name(shape, latent_dim, target_dtype), inputs
    bench.clear_grads(inputs)


def test_methods_agree(case):
    """Correctness guard: eager, compiled and fused give the same loss and gradients."""
    _, inputs = case
    losses = bench.check_agreement(inputs, BETA)
    assert set(losses) == set(bench.METHODS)


@pytest.mark.parametrize("method", list(bench.METHODS))
def test_loss_forward_backward(benchmark, case, method):
    name, inputs = case
    fn = bench.METHODS[method]
    benchmark.group = name
    benchmark.extra_info.update(
        method=method,
        case=name,
        input_bytes=sum(t.numel() * t.element_size() for t in inputs),
        torch_threads=torch.get_num_threads(),
    )

    def setup():
        bench.clear_grads(inputs)
        return (fn, *inputs, BETA), {}

    loss = benchmark.pedantic(bench.step, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    assert torch.isfinite(loss)
    assert inputs[0].grad is not None and inputs[0].grad.shape == inputs[0].shape
    # One profiled step after the timing (compilation is done by now).
    peak = bench.peak_memory_bytes(fn, inputs, BETA)
    benchmark.extra_info["peak_extra_mb"] = round(peak / 2**20, 3)
    benchmark.extra_info["peak_x_input"] = round(peak / benchmark.extra_info["input_bytes"], 3)
    bench.clear_grads(inputs)


def test_peak_memory_sees_known_allocations():
    """The profiler-based measure counts a step whose allocations are known.

    ``(x * 2).sum()`` forward holds one temporary of x's size; its backward
    makes one gradient of x's size, left in ``x.grad``: the peak is between
    one and two times x's bytes.
    """
    x = torch.randn(1 << 18, requires_grad=True)
    inputs = (x, torch.empty(0), torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True))

    def fn(recon, target, mu, logvar, beta):
        return (recon * 2).sum() + 0 * (mu.sum() + logvar.sum())

    peak = bench.peak_memory_bytes(fn, inputs)
    assert x.nbytes <= peak <= 2 * x.nbytes + 4096

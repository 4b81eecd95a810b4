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


def test_methods_match_float64_truth(case):
    """Correctness guard: each method's loss and gradients against fusedvae.reference in float64."""
    _, inputs = case
    report = bench.check_against_truth(inputs, BETA)
    assert set(report) == set(bench.METHODS)


def _eager_over_256(recon, target, mu, logvar, beta=1.0):
    # A plausible mistake: pixels scaled by 1/256 instead of 1/255.
    return bench.eager_loss(recon, target.to(recon.dtype) / 256, mu, logvar, beta)


def test_truth_check_catches_a_wrong_pixel_scale():
    inputs = bench.make_inputs((4, 3, 16, 16), 8, "uint8")
    report = bench.accuracy(inputs, BETA, {"eager": bench.eager_loss, "over256": _eager_over_256})
    assert report["eager"]["ok"], report["eager"]["problems"]
    assert not report["over256"]["ok"]
    with pytest.raises(AssertionError, match="over256"):
        bench.check_against_truth(inputs, BETA, {"over256": _eager_over_256})


def test_truth_check_bf16_tolerance_follows_each_method():
    # bfloat16 recon, uint8 target (the GPU benchmark's third case, on the CPU):
    # eager computes in bfloat16 and is held to bfloat16's tolerance, fused
    # accumulates in float32 and its loss is held to float32's.
    recon, target, mu, logvar = bench.make_inputs((8, 3, 32, 32), 16, "uint8")
    inputs = (recon.detach().bfloat16().requires_grad_(), target, mu, logvar)
    methods = {"eager": bench.eager_loss, "fused": bench.fused_loss}
    report = bench.check_against_truth(inputs, BETA, methods)
    assert report["eager"]["loss_tol"] == bench.tolerance(torch.bfloat16)
    assert report["fused"]["loss_tol"] == bench.tolerance(torch.float32)
    assert report["fused"]["grad_tol"] == bench.tolerance(torch.bfloat16)  # recon.grad is bfloat16
    assert report["fused"]["loss_err"] < report["eager"]["loss_err"]
    row = bench.format_accuracy([("bf16", report)]).splitlines()[-1]
    assert row.startswith("| bf16 |") and "FAIL" not in row


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

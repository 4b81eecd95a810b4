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


def test_exp_log1p_reference_computes_exp_and_log1p_in_place():
    run, buffers = bench.exp_log1p_reference(1000, seed=3)
    x, exp_out, u, log1p_out = (buffers[k] for k in ("x", "exp_out", "u", "log1p_out"))
    tensors = (x, exp_out, u, log1p_out)
    assert all(t.numel() == 1000 and t.dtype == torch.float32 for t in tensors)
    # the ranges the loss's softplus sees: exp of arguments <= 0, log1p of values in (0, 1]
    assert float(x.max()) <= 0 and float(u.min()) > 0 and float(u.max()) <= 1
    pointers = [t.data_ptr() for t in tensors]
    run()
    assert [t.data_ptr() for t in tensors] == pointers  # written into, not replaced
    assert torch.equal(exp_out, torch.exp(x)) and torch.equal(log1p_out, torch.log1p(u))
    with pytest.raises(ValueError):
        bench.exp_log1p_reference(0)


def test_run_case_times_exp_log1p_over_recon_numel(monkeypatch):
    """The exp+log1p yardstick runs, interleaved, on as many elements as recon has, and is reported."""
    shape, latent_dim, target_dtype = bench.QUICK_CASES[0]
    numel = torch.Size(shape).numel()
    made, calls = [], []
    original = bench.exp_log1p_reference

    def counting(n, seed=0):
        run, buffers = original(n, seed)
        made.append(n)

        def counted():
            calls.append(n)
            run()

        return counted, buffers

    monkeypatch.setattr(bench, "exp_log1p_reference", counting)
    r = bench.run_case(shape, latent_dim, target_dtype, repeats=3, warmup=1, memory=False)
    assert made == [numel] and calls == [numel] * (1 + 3)  # one warm-up call, three timed
    assert r["reference_numel"] == numel
    ref = bench.REFERENCE
    assert ref == "exp+log1p"
    assert set(r["ms"]) == set(bench.METHODS) | {ref}
    assert len(r["times_ms"][ref]) == 3 and all(t > 0 for t in r["times_ms"][ref])
    assert r["ms"][ref] > 0
    assert r["ratio"]["fused/(exp+log1p)"] == pytest.approx(r["ms"]["fused"] / r["ms"][ref])
    assert r["ratio"]["eager/fused"] == pytest.approx(r["ms"]["eager"] / r["ms"]["fused"])
    assert set(r["accuracy"]) == set(bench.METHODS) and r["memory"] is None

    table = bench.format_results([r]).splitlines()
    header = next(line for line in table if line.startswith("| case |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols == ["case", "eager ms", "compile ms", "fused ms", "exp+log1p ms", "eager/fused",
                    "compile/fused", "fused/(exp+log1p)"]
    row = next(line for line in table if line.startswith(f"| {r['case']} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(cols)
    assert float(cells[4]) == pytest.approx(r["ms"][ref], abs=5e-4)
    assert cells[7] == f"{r['ratio']['fused/(exp+log1p)']:.2f}x"


def test_each_cpu_capability_gets_its_own_inductor_cache(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    capability = torch.backends.cpu.get_cpu_capability().lower()
    path = bench.isolate_inductor_cache()
    assert path is not None and path.endswith(f"fusedvae-bench-inductor-{capability}")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == path
    # a folder already chosen (by the caller, or by inductor itself) is kept
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    assert bench.isolate_inductor_cache() is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"

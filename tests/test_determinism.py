"""Bitwise determinism of the fused loss and its gradients.

For every reconstruction path (each likelihood, logits and probabilities, every
kind of log_scale) in float32 and bfloat16, with float and uint8 targets and free
bits, on samples of 18 432 elements (> 16 384: each sample is split into
several chunks) and a latent that is chunked too: the loss, per-sample terms and
every gradient are bitwise identical across repeated runs and across
``torch.set_num_threads(1)``, ``2`` and ``3``, all under
``torch.use_deterministic_algorithms(True)``. Thread count and the deterministic
flag are restored afterwards. The values are also checked against the float64
reference, so "identical" cannot mean "identically wrong".

Without the deterministic flag too, the results do not depend on the thread count.

On each device (``device`` fixture): repeated runs are bitwise identical, and a
step replayed from a captured CUDA graph gives the numbers of the eager step, β
changed in place between replays included (on the CPU, which has no graphs, a
repeated call stands for the replay).
"""
from __future__ import annotations

import pytest
import torch

import fusedvae
from fusedvae import reference
from helpers import (
    F32,
    VARIANT_IDS,
    VARIANTS,
    Inputs,
    make_inputs,
    make_log_scale,
    on_cpu,
    on_cpu_float64,
    run_loss,
    synchronize,
    weighted_upstream,
)

SAMPLE = (3, 96, 64)  # 18432 elements per sample: two chunks
LATENT = (4, 64, 70)  # 17920 latent elements per sample: two chunks for the KL sum too
THREADS = (1, 2, 3, 2, 1)


def _run(inp, ls, likelihood, logits, free_bits):
    upstream = torch.tensor([1.0, -2.0, 0.5])
    out, grads = run_loss(
        fusedvae.vae_loss, inp, log_scale=ls, likelihood=likelihood, logits=logits, reduction="none",
        free_bits=free_bits, beta=0.7, upstream=lambda o: (o.loss * upstream.to(o.loss.dtype)).sum(),
    )
    return out, grads


@pytest.mark.parametrize("target_dtype", [None, torch.uint8], ids=["float-target", "uint8-target"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_bitwise_across_runs_and_threads(likelihood, logits, ls_kind, dtype, target_dtype, deterministic_algorithms):
    assert torch.are_deterministic_algorithms_enabled()
    latent = LATENT if ls_kind in (None, "full_tensor") else (16,)
    inp = make_inputs(likelihood, logits, dtype, latent, batch=3, sample_shape=SAMPLE,
                      target_dtype=target_dtype, seed=7)
    assert inp.recon[0].numel() > 16384
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=dtype)
    free_bits = 0.3 if ls_kind in (None, "optimal") else 0.0

    results = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        out, grads = _run(inp, ls, likelihood, logits, free_bits)
        results.append([out.loss, out.rec, out.kl] + [grads[k] for k in sorted(grads)])
    first = results[0]
    for threads, other in zip(THREADS[1:], results[1:]):
        for name, a, b in zip(["loss", "rec", "kl"] + sorted(grads), first, other):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs with {threads} threads"

    # and the values are right
    up = Inputs(*(a.double() if a.dtype.is_floating_point else a for a in inp))
    ls64 = ls.detach().double() if isinstance(ls, torch.Tensor) else ls
    exp, _ = run_loss(reference.vae_loss, up, log_scale=ls64, likelihood=likelihood, logits=logits,
                      reduction="none", free_bits=free_bits, beta=0.7, grad=False)
    n = inp.recon[0].numel()
    torch.testing.assert_close(first[1].double(), exp.rec, rtol=2e-5, atol=1e-5 * n)
    torch.testing.assert_close(first[2].double(), exp.kl, rtol=2e-5, atol=1e-5 * inp.mu[0].numel())


@pytest.mark.parametrize("op", ["cb_log_normalizer", "gaussian_kl_per_dim"])
def test_elementwise_ops_bitwise_across_threads(op, deterministic_algorithms):
    g = torch.Generator().manual_seed(0)
    x = 5 * torch.randn(3, 40000, generator=g)
    y = torch.randn(3, 40000, generator=g)
    results = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        leaf = x.clone().requires_grad_()
        out = torch.ops.fusedvae.cb_log_normalizer(leaf) if op == "cb_log_normalizer" else \
            torch.ops.fusedvae.gaussian_kl_per_dim(leaf, y)
        (out * y).sum().backward()
        results.append((out.detach(), leaf.grad))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])
    if op == "cb_log_normalizer":
        exp = reference.continuous_bernoulli_log_normalizer(x.double())
    else:
        exp = 0.5 * (x.double() ** 2 + y.double().exp() - 1 - y.double())
    torch.testing.assert_close(results[0][0].double(), exp, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------- across threads ---

@pytest.mark.parametrize(
    "likelihood,logits,ls_kind",
    [("bernoulli", True, None), ("cbernoulli", True, None), ("gaussian", True, "full_tensor"), ("gaussian", True, "optimal")],
)
def test_deterministic_across_runs_and_threads(likelihood, logits, ls_kind, restore_threads):
    inp = make_inputs(likelihood, logits, F32, (16,), batch=4, sample_shape=(3, 128, 128))
    assert inp.recon[0].numel() > 16384  # several chunks per sample
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=F32)

    def once():
        out, grads = run_loss(fusedvae.vae_loss, inp, log_scale=ls, likelihood=likelihood, logits=logits,
                              reduction="none", upstream=lambda o: (o.loss * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum())
        return [out.loss, out.rec, out.kl] + [grads[k] for k in sorted(grads)]

    results = []
    for threads in (2, 1, 2, 2):
        torch.set_num_threads(threads)
        results.append(once())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    # (and they are right)
    exp, _ = run_loss(reference.vae_loss, Inputs(*(a.double() for a in inp)),
                      log_scale=ls.double() if isinstance(ls, torch.Tensor) else ls,
                      likelihood=likelihood, logits=logits, reduction="none", grad=False)
    torch.testing.assert_close(results[0][1].double(), exp.rec, rtol=2e-5, atol=1e-3)


# ---------------------------------------------------------- on each device --


def test_bitwise_across_repeated_runs_on_device(device):
    inp = make_inputs("cbernoulli", True, F32, (8,), batch=16, sample_shape=(3, 128, 128), device=device)
    runs = []
    for _ in range(3):
        out, grads = run_loss(fusedvae.vae_loss, inp, upstream=weighted_upstream, likelihood="cbernoulli")
        runs.append([out.loss, out.rec, out.kl] + [grads[k] for k in sorted(grads)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    # and the values are right
    exp, _ = run_loss(reference.vae_loss, on_cpu_float64(inp), likelihood="cbernoulli", grad=False)
    n = inp.recon[0].numel()
    torch.testing.assert_close(on_cpu(runs[0][1]).double(), exp.rec, rtol=2e-5, atol=1e-5 * n)
    torch.testing.assert_close(on_cpu(runs[0][2]).double(), exp.kl, rtol=2e-5, atol=1e-5 * inp.mu[0].numel())


def test_graph_replay_gives_the_eager_numbers(device):
    inp = make_inputs("bernoulli", True, F32, (8,), batch=8, sample_shape=(3, 32, 32), device=device)
    x, mu, lv = (a.detach().clone().requires_grad_() for a in (inp.recon, inp.mu, inp.logvar))
    beta = torch.tensor(0.5, device=device)  # a schedule fills it in place

    def step():
        out = fusedvae.vae_loss(x, inp.target, mu, lv, beta=beta, free_bits=0.01)
        return (out.loss,) + torch.autograd.grad(out.loss, (x, mu, lv))

    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()

        def replay():
            graph.replay()
            return captured
    else:
        replay = step

    for new_beta in (0.5, 2.0):
        beta.fill_(new_beta)
        replayed = replay()
        synchronize(device)
        eager = step()
        for a, b in zip(replayed, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # and they are the numbers for this beta
        ref = [a.detach().double().cpu().requires_grad_() for a in (inp.recon, inp.mu, inp.logvar)]
        out = reference.vae_loss(ref[0], inp.target.double().cpu(), ref[1], ref[2], beta=new_beta, free_bits=0.01)
        expected = (out.loss,) + torch.autograd.grad(out.loss, ref)
        for a, b in zip(replayed, expected):
            torch.testing.assert_close(on_cpu(a).double(), b, rtol=1e-5, atol=1e-6)

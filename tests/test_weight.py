"""The ``weight`` argument: a tensor broadcastable to ``recon`` that multiplies
each element's ℓ in ``rec``, read by the kernels where it lies.

Checked against the float64 reference for every likelihood and scale form,
every broadcast shape (per sample, per channel, per pixel, full, a transposed
view, trailing dimensions only), contiguous and channels_last ``recon``, each
reduction and upstream gradients other than 1; the weighted maximum-likelihood
scale of ``log_scale="optimal"``; gradcheck and opcheck; that no copy of the
weight's size of ``recon`` is made; and its argument errors.
"""
from __future__ import annotations

import pytest
import torch

import fusedvae
from fusedvae import bench, reference
from helpers import ATOL64, F64, RTOL64, make_inputs, make_log_scale, peak_step_bytes

B, SAMPLE = 3, (3, 4, 5)


def _weights(device="cpu"):
    g = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.rand(*shape, generator=g, dtype=F64).to(device)  # noqa: E731
    return {
        "per_sample": r(B, 1, 1, 1),
        "per_channel": r(1, 3, 1, 1),
        "per_pixel": r(1, 1, 4, 5),
        "per_sample_pixel": r(B, 1, 4, 5),
        "full": r(B, *SAMPLE),
        "trailing": r(5),
        "transposed_view": r(5, 4).t(),
        "with_zeros": r(1, 3, 1, 1) * torch.tensor([0.0, 1.0, 2.0], dtype=F64, device=device).view(1, 3, 1, 1),
    }


WEIGHT_IDS = list(_weights())
SCALED_CASES = [
    ("bernoulli", True, None),
    ("bernoulli", False, None),
    ("cbernoulli", True, None),
    ("gaussian", True, None),
    ("gaussian", True, "optimal"),
    ("gaussian", True, "scalar_tensor"),
    ("gaussian", True, "broadcast_tensor"),
    ("laplace", True, "optimal"),
    ("laplace", True, "full_tensor"),
]
CASE_IDS = [f"{lik}-{'logits' if lg else 'probs'}-{ls}" for lik, lg, ls in SCALED_CASES]


def _run(fn, inp, likelihood, logits, weight, ls, layout, reduction, device):
    recon = inp.recon.clone()
    if layout == "channels_last":
        recon = recon.contiguous(memory_format=torch.channels_last)
    leaves = [recon.requires_grad_(), inp.mu.clone().requires_grad_(), inp.logvar.clone().requires_grad_()]
    if isinstance(ls, torch.Tensor):
        ls = ls.detach().clone().requires_grad_()
        leaves.append(ls)
    out = fn(leaves[0], inp.target, leaves[1], leaves[2], likelihood=likelihood, logits=logits,
             log_scale=ls, reduction=reduction, free_bits=0.1, beta=0.7, weight=weight)
    g = torch.Generator().manual_seed(3)
    up = lambda t: (0.5 + torch.rand(t.shape, generator=g, dtype=F64)).to(device)  # noqa: E731
    total = (out.loss * up(out.loss)).sum() + (out.rec * up(out.rec)).sum() - (out.kl * up(out.kl)).sum()
    return out, torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("weight_id", WEIGHT_IDS)
@pytest.mark.parametrize("likelihood,logits,ls_kind", SCALED_CASES, ids=CASE_IDS)
def test_weight_matches_reference(device, likelihood, logits, ls_kind, weight_id, layout):
    inp = make_inputs(likelihood, logits, F64, (2, 3), batch=B, sample_shape=SAMPLE, device=device)
    weight = _weights(device)[weight_id]
    ls = make_log_scale(ls_kind, inp.recon.shape, device=device)
    for reduction in ("batchmean", "mean", "none"):
        got, got_g = _run(fusedvae.vae_loss, inp, likelihood, logits, weight, ls, layout, reduction, device)
        exp, exp_g = _run(reference.vae_loss, inp, likelihood, logits, weight, ls, layout, reduction, device)
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b, rtol=RTOL64, atol=ATOL64)
        for a, b in zip(got_g, exp_g):
            torch.testing.assert_close(a, b, rtol=RTOL64, atol=ATOL64)


def test_weight_scales_rec_and_ones_change_nothing():
    inp = make_inputs("cbernoulli", True, F64, (4,), batch=B, sample_shape=SAMPLE)
    plain = fusedvae.vae_loss(inp.recon, inp.target, inp.mu, inp.logvar, likelihood="cbernoulli")
    ones = fusedvae.vae_loss(inp.recon, inp.target, inp.mu, inp.logvar, likelihood="cbernoulli",
                             weight=torch.ones(1, dtype=F64))
    twice = fusedvae.vae_loss(inp.recon, inp.target, inp.mu, inp.logvar, likelihood="cbernoulli",
                              weight=torch.full((B, 1, 1, 1), 2.0, dtype=F64))
    torch.testing.assert_close(ones.rec, plain.rec, rtol=0, atol=0)
    torch.testing.assert_close(twice.rec, 2 * plain.rec, rtol=1e-14, atol=0)
    torch.testing.assert_close(twice.kl, plain.kl, rtol=0, atol=0)


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_optimal_scale_is_the_weighted_maximum_likelihood_one(likelihood):
    # With log_scale="optimal" the loss is minimal over s at the weighted scale:
    # the gradient of the weighted rec with respect to a learned s vanishes there.
    inp = make_inputs(likelihood, True, F64, (4,), batch=B, sample_shape=SAMPLE)
    w = _weights()["per_channel"]
    r = inp.target - inp.recon
    residual = r.abs() if likelihood == "laplace" else r**2
    mean = (w * residual).sum() / w.expand_as(residual).sum()
    s_star = torch.log(mean) if likelihood == "laplace" else 0.5 * torch.log(mean)
    opt = fusedvae.vae_loss(inp.recon, inp.target, inp.mu, inp.logvar, likelihood=likelihood, log_scale="optimal",
                            weight=w, reduction="sum")
    s = s_star.clone().requires_grad_()
    learned = fusedvae.vae_loss(inp.recon, inp.target, inp.mu, inp.logvar, likelihood=likelihood, log_scale=s,
                                weight=w, reduction="sum")
    (grad_s,) = torch.autograd.grad(learned.rec.sum(), s)
    assert abs(grad_s.item()) < 1e-9 * learned.rec.sum().abs().item()
    # "optimal" is s* through the soft clip below: s_min + softplus(s* - s_min)
    s_min = -6.0
    clipped = fusedvae.vae_loss(inp.recon, inp.target, inp.mu, inp.logvar, likelihood=likelihood,
                                log_scale=float(s_min + torch.nn.functional.softplus(s_star - s_min)),
                                weight=w, reduction="sum")
    torch.testing.assert_close(opt.rec, clipped.rec, rtol=1e-12, atol=0)


def test_gradcheck_with_weight():
    inp = make_inputs("laplace", True, F64, (2,), batch=2, sample_shape=(2, 3, 2))
    w = torch.rand(1, 2, 1, 2, dtype=F64)

    def f(recon, mu, logvar, s):
        return fusedvae.vae_loss(recon, inp.target, mu, logvar, likelihood="laplace", log_scale=s, weight=w,
                                 reduction="none").loss

    args = (inp.recon.clone().requires_grad_(), inp.mu.clone().requires_grad_(),
            inp.logvar.clone().requires_grad_(), torch.tensor(0.2, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("weight_id", ["per_channel", "full", "transposed_view"])
def test_opcheck_with_weight(weight_id):
    inp = make_inputs("gaussian", True, torch.float32, (4,), batch=B, sample_shape=SAMPLE)
    w = _weights()[weight_id].float()
    ops = torch.ops.fusedvae
    args = (inp.recon.requires_grad_(), inp.target, inp.mu.requires_grad_(), inp.logvar.requires_grad_(), None, None,
            "gaussian", True, "batchmean", 0.0, True, 0.7, 0.0, w)
    torch.library.opcheck(ops.vae_loss.default, args)
    aux = ops.vae_loss(*args)[3]
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:6])
    bargs = (torch.tensor(1.0), None, None, *plain, aux, "gaussian", True, "batchmean", 0.0, True, 0.7, 0.0,
             [True, True, False, False], w)
    torch.library.opcheck(ops.vae_loss_backward.default, bargs)


def test_weight_is_not_expanded(device):
    # A per-channel weight costs no recon-sized buffer: one forward+backward
    # allocates what it does without a weight (the gradient and [B] vectors).
    recon, target, mu, logvar = bench.make_inputs((16, 3, 64, 64), 32, "float32")
    inputs = [recon.to(device).requires_grad_(), target.to(device), mu.to(device).requires_grad_(),
              logvar.to(device).requires_grad_()]
    w = torch.tensor([0.5, 1.0, 2.0], device=device).view(1, 3, 1, 1)

    def measure(**kw):
        return peak_step_bytes(lambda r, t, m, lv, beta: fusedvae.vae_loss(r, t, m, lv, beta=beta, **kw).loss, inputs)

    plain, weighted = measure(), measure(weight=w)
    assert weighted <= plain + 64 * 1024, (plain, weighted)
    # Control: the measurement sees a recon-sized buffer made inside the step
    # (a full-size float16 weight is converted to float32 before the kernels).
    full_half = w.expand(inputs[0].shape).half().contiguous()
    assert measure(weight=full_half) - plain >= 0.9 * inputs[0].nbytes


@pytest.mark.parametrize("bad,error,message", [
    (lambda r: torch.ones(2, 3), ValueError, "weight must be broadcastable to the shape of recon"),
    (lambda r: torch.ones(1, dtype=torch.long), TypeError, "weight must be a floating-point tensor"),
    (lambda r: torch.ones(1, requires_grad=True), ValueError, "weight must not require grad"),
    (lambda r: [1.0], TypeError, "weight must be a torch.Tensor"),
    (lambda r: torch.ones(1, device="meta"), ValueError, "weight must be on the device of recon"),
])
def test_weight_bad_argument(bad, error, message):
    inp = make_inputs("bernoulli", True, torch.float32, (4,), batch=B, sample_shape=SAMPLE)
    for fn in (fusedvae.vae_loss, reference.vae_loss):
        with pytest.raises(error, match=message):
            fn(inp.recon, inp.target, inp.mu, inp.logvar, weight=bad(inp.recon))

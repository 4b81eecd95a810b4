"""Each likelihood's values and gradients: closed forms, PyTorch's own losses,
an mpmath oracle at extreme logits, probabilities of exactly 0 and 1, extreme
log-variances, NaN propagation and wide-range float32 logits.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fusedvae
from fusedvae import reference
from helpers import (
    ATOL64,
    F32,
    F64,
    RTOL64,
    VARIANT_IDS,
    VARIANTS,
    Inputs,
    assert_grads_close,
    assert_outputs_close,
    loss_kw,
    make_inputs,
    make_log_scale,
    run_loss,
)


def test_gaussian_closed_form_value():
    # sigma = 1: rec_b = sum((x - t)^2)/2 + N/2 log(2 pi), independent of the reference code.
    inp = make_inputs("gaussian", True, F64, (5,))
    out = fusedvae.vae_loss(*inp, likelihood="gaussian", reduction="none", beta=0.0)
    n = inp.recon[0].numel()
    expected = 0.5 * ((inp.recon - inp.target) ** 2).flatten(1).sum(1) + 0.5 * n * math.log(2 * math.pi)
    torch.testing.assert_close(out.rec, expected, rtol=RTOL64, atol=ATOL64)
    kl = 0.5 * (inp.mu**2 + inp.logvar.exp() - 1 - inp.logvar).sum(1)
    torch.testing.assert_close(out.kl, kl, rtol=RTOL64, atol=ATOL64)
    torch.testing.assert_close(out.loss, expected, rtol=RTOL64, atol=ATOL64)


def test_bernoulli_matches_torch_bce_with_logits():
    inp = make_inputs("bernoulli", True, F64, (5,))
    out = fusedvae.vae_loss(*inp, reduction="sum", beta=1.0)
    bce = F.binary_cross_entropy_with_logits(inp.recon, inp.target, reduction="sum")
    kl = 0.5 * (inp.mu**2 + inp.logvar.exp() - 1 - inp.logvar).sum()
    torch.testing.assert_close(out.loss, bce + kl, rtol=RTOL64, atol=ATOL64)


def test_cbernoulli_matches_torch_distributions():
    # ContinuousBernoulli.log_prob is accurate in float64 away from its unstable
    # region [0.499, 0.501] of probs, which randn logits avoid.
    inp = make_inputs("cbernoulli", True, F64, (5,))
    out = fusedvae.vae_loss(*inp, likelihood="cbernoulli", reduction="none", beta=0.0)
    dist = torch.distributions.ContinuousBernoulli(logits=inp.recon)
    expected = -dist.log_prob(inp.target).flatten(1).sum(1)
    torch.testing.assert_close(out.rec, expected, rtol=1e-8, atol=1e-8)


EXTREME_LOGITS = [100.0, -100.0, 30.0, -30.0, 1e-8, -1e-8, 0.0, 1e-3, -0.7, 0.35, 0.999, 1.0, 1.001, 17.0]
EXTREME_TARGETS = [0.0, 0.5, 1.0]


def _elementwise_batch(values, targets, dtype):
    """One element per sample, so rec_b is exactly one element's loss."""
    x = torch.tensor([v for v in values for _ in targets], dtype=F64)
    t = torch.tensor([u for _ in values for u in targets], dtype=F64)
    b = x.numel()
    mu = torch.linspace(-1, 1, b, dtype=F64)[:, None]
    lv = torch.linspace(-2, 2, b, dtype=F64)[:, None]
    return Inputs(x[:, None].to(dtype), t[:, None].to(dtype), mu.to(dtype), lv.to(dtype))


def _mp_elementwise(likelihood, x, t):
    """High-precision loss and d loss/dx for one element (an independent oracle)."""
    import mpmath

    with mpmath.workdps(50):
        x, t = mpmath.mpf(x), mpmath.mpf(t)
        loss = max(x, 0) - t * x + mpmath.log1p(mpmath.exp(-abs(x)))
        grad = 1 / (1 + mpmath.exp(-x)) - t
        if likelihood == "cbernoulli":
            if x == 0:
                loss -= mpmath.log(2)
            else:
                loss -= mpmath.log(x / mpmath.tanh(x / 2))
                grad -= 1 / x - 1 / mpmath.sinh(x)
        return float(loss), float(grad)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("likelihood", ["bernoulli", "cbernoulli"])
def test_extreme_logits(likelihood, dtype):
    inputs = _elementwise_batch(EXTREME_LOGITS, EXTREME_TARGETS, dtype)
    up = Inputs(*(a.to(F64) for a in inputs))
    kw = loss_kw(likelihood, True, "sum")
    got, got_g = run_loss(fusedvae.vae_loss, inputs, upstream=lambda o: o.rec.sum(), **kw)
    exp = reference.vae_loss(*up, **kw)
    oracle = [_mp_elementwise(likelihood, x, t) for x, t in zip(up.recon[:, 0].tolist(), up.target[:, 0].tolist())]
    mp_loss = torch.tensor([o[0] for o in oracle], dtype=F64)
    mp_grad = torch.tensor([o[1] for o in oracle], dtype=F64)
    assert torch.isfinite(exp.rec).all()
    for name in ("rec", "kl", "loss"):
        assert torch.isfinite(getattr(got, name)).all(), (name, getattr(got, name))
    assert torch.isfinite(got_g["recon"]).all()
    if dtype == F64:
        rtol, atol = RTOL64, 1e-14
    else:
        # float32 kernels vs float64 values on the same (exact) inputs: a few
        # float32 ulps per element (DESIGN.md: CB normaliser within 1e-6 relative,
        # its gradient within 1e-5); absolute slack for losses/gradients near 0.
        rtol, atol = 2e-6, 2e-7
    # values: the reference (1 element per sample, so rec_b is one element's loss) ...
    torch.testing.assert_close(got.rec, exp.rec.to(got.rec.dtype), rtol=rtol, atol=atol)
    # ... and the mpmath oracle
    torch.testing.assert_close(got.rec.double(), mp_loss, rtol=rtol, atol=atol)
    # gradients: the mpmath oracle (sigmoid(x) - t - d log C/dx). The reference's
    # autograd is not used here: at x == 0 exactly it returns a subgradient
    # (see test_reference_logits_gradient_at_zero).
    torch.testing.assert_close(got_g["recon"][:, 0].double(), mp_grad, rtol=rtol * 5, atol=atol)


@pytest.mark.parametrize("likelihood", ["bernoulli", "cbernoulli"])
def test_reference_logits_gradient_at_zero(likelihood):
    # The loss is smooth at logit 0 with derivative sigmoid(0) - t = 0.5 - t
    # (d log C/d eta = 0 there). F.binary_cross_entropy_with_logits and the fused
    # op both give 0.5 - t; this checks that the reference does too.
    t = torch.tensor([[0.0], [0.5], [1.0]], dtype=F64)
    mu = torch.zeros(3, 1, dtype=F64)
    expected = 0.5 - t
    for fn in (fusedvae.vae_loss, reference.vae_loss):
        x = torch.zeros(3, 1, dtype=F64, requires_grad=True)
        fn(x, t, mu, mu, likelihood=likelihood, reduction="sum").loss.backward()
        torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-15, msg=lambda m: f"{fn.__module__}: {m}")


def test_cb_log_normalizer_closed_form_values():
    # log C(eta) = log(eta / tanh(eta / 2)), C(0) = 2, at points where the closed
    # form is exact in float64 (no cancellation), plus eta = 0.
    eta = torch.tensor([0.0, 1.0, -2.0, 5.0, 30.0, -100.0], dtype=F64)
    expected = torch.tensor([math.log(2.0)] + [math.log(e / math.tanh(e / 2)) for e in eta.tolist()[1:]], dtype=F64)
    torch.testing.assert_close(fusedvae.continuous_bernoulli_log_normalizer(eta), expected, rtol=1e-14, atol=0)
    # d log C / d eta = 1/eta - 1/sinh(eta)
    e = eta[1:].clone().requires_grad_()
    fusedvae.continuous_bernoulli_log_normalizer(e).sum().backward()
    grad = torch.tensor([1 / v - 1 / math.sinh(v) for v in eta.tolist()[1:]], dtype=F64)
    torch.testing.assert_close(e.grad, grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("likelihood", ["bernoulli", "cbernoulli"])
def test_probabilities_exactly_zero_and_one_values(likelihood):
    inputs = _elementwise_batch([0.0, 1.0, 1e-30, 1 - 1e-16], EXTREME_TARGETS, F64)
    got = fusedvae.vae_loss(*inputs, likelihood=likelihood, logits=False, reduction="none")
    exp = reference.vae_loss(*inputs, likelihood=likelihood, logits=False, reduction="none")
    assert torch.isfinite(exp.rec).all()
    assert torch.isfinite(got.rec).all()
    assert_outputs_close(got, exp, RTOL64, 1e-12)
    if likelihood == "bernoulli":
        # And PyTorch's own BCE (the -100 log clamp): 0, 50, 100 at p = 0 and 1.
        bce = F.binary_cross_entropy(inputs.recon, inputs.target, reduction="none")[:, 0]
        torch.testing.assert_close(got.rec, bce, rtol=RTOL64, atol=1e-12)


def test_bernoulli_probs_gradient_at_zero_and_one_follows_torch_bce():
    # The reference's autograd gives NaN at p in {0, 1} (0 * inf through the log
    # clamp); the fused op follows F.binary_cross_entropy: (p - t) / max(p(1-p), 1e-12).
    inputs = _elementwise_batch([0.0, 1.0, 0.3, 1e-30], EXTREME_TARGETS, F64)
    p = inputs.recon.clone().requires_grad_()
    out = fusedvae.vae_loss(p, inputs.target, inputs.mu, inputs.logvar, logits=False, reduction="sum")
    (2.5 * out.loss).backward()
    q = inputs.recon.clone().requires_grad_()
    (2.5 * F.binary_cross_entropy(q, inputs.target, reduction="sum")).backward()
    # PyTorch's EPSILON is the float 1e-12 (9.9999998e-13 as a double), the fused
    # op's is the double 1e-12: 4e-9 relative apart where the clamp is active.
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=0)
    # Spot values: p=0, t=1 -> -1e12; p=1, t=0 -> +1e12; p=t -> 0.
    grad = p.grad[:, 0].view(4, 3) / 2.5
    assert grad[0, 2].item() == pytest.approx(-1e12) and grad[0, 0].item() == 0.0
    assert grad[1, 0].item() == pytest.approx(1e12) and grad[1, 2].item() == 0.0


def test_cbernoulli_probs_gradient_at_zero_and_one_is_finite_closed_form():
    # eta = clamp(log p, -100) - clamp(log(1-p), -100): at p=0, eta=-100 and only
    # the 1/(1-p) = 1 term of d eta/dp survives; at p=1, eta=+100 and only 1/p = 1.
    # d log C/d eta at +-100 is 1/eta - 1/sinh(eta) = +-0.01 (1/sinh underflows).
    # The BCE part follows torch's (p - t)/max(p(1-p), 1e-12).
    inputs = _elementwise_batch([0.0, 1.0], EXTREME_TARGETS, F64)
    p = inputs.recon.clone().requires_grad_()
    out = fusedvae.vae_loss(p, inputs.target, inputs.mu, inputs.logvar, likelihood="cbernoulli", logits=False, reduction="sum")
    out.loss.backward()
    t = inputs.target[:, 0]
    pv = inputs.recon[:, 0]
    bce = (pv - t) / 1e-12
    dlogc = torch.where(pv == 0, torch.full_like(pv, -0.01), torch.full_like(pv, 0.01))
    expected = bce - dlogc * 1.0
    assert torch.isfinite(p.grad).all()
    torch.testing.assert_close(p.grad[:, 0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_extreme_logvar(dtype):
    mu = torch.tensor([[0.0, 1.0, -3.0], [2.0, 0.0, 0.5], [0.0, 0.0, 0.0], [1e3, -1e3, 7.0]], dtype=F64)
    lv = torch.tensor([[30.0, -30.0, 0.0], [-30.0, 30.0, 1e-9], [30.0, 30.0, -30.0], [0.0, -30.0, 30.0]], dtype=F64)
    inp = make_inputs("bernoulli", True, F64, (3,), batch=4)
    inp = Inputs(inp.recon.to(dtype), inp.target.to(dtype), mu.to(dtype), lv.to(dtype))
    up = Inputs(*(a.to(F64) for a in inp))
    for free_bits in (0.0, 2.0):
        kw = loss_kw("bernoulli", True, "none", free_bits)
        got, got_g = run_loss(fusedvae.vae_loss, inp, **kw)
        exp, exp_g = run_loss(reference.vae_loss, up, **kw)
        assert torch.isfinite(got.kl).all() and torch.isfinite(got_g["logvar"]).all()
        # float32: exp(30) and the sums carry float32 rounding only.
        rtol = RTOL64 if dtype == F64 else 2e-6
        torch.testing.assert_close(got.kl, exp.kl.to(got.kl.dtype), rtol=rtol, atol=1e-12)
        torch.testing.assert_close(got.loss, exp.loss.to(got.kl.dtype), rtol=rtol, atol=1e-6)
        for name in ("mu", "logvar"):
            torch.testing.assert_close(got_g[name], exp_g[name].to(dtype), rtol=rtol, atol=1e-12)
    # Closed form at lv = 30, mu = 0: 0.5 (e^30 - 1 - 30).
    out = fusedvae.vae_loss(*inp, reduction="none")
    assert out.kl[2].item() == pytest.approx(0.5 * (2 * (math.exp(30) - 31) + (math.exp(-30) - 1 + 30)), rel=1e-6)


@pytest.mark.parametrize("position", ["first", "last"])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_nan_in_recon_propagates(likelihood, logits, ls_kind, position):
    # sample_shape (3, 7) = 21 elements: the last one is in the vector tail.
    inputs = make_inputs(likelihood, logits, F64, (5,), batch=3, sample_shape=(3, 7))
    recon = inputs.recon.clone()
    idx = (1, 0, 0) if position == "first" else (1, 2, 6)
    recon[idx] = float("nan")
    inputs = inputs._replace(recon=recon)
    ls = make_log_scale(ls_kind, recon.shape)
    for reduction in ("none", "batchmean"):
        kw = loss_kw(likelihood, logits, reduction)
        got, got_g = run_loss(fusedvae.vae_loss, inputs, log_scale=ls, **kw)
        exp, exp_g = run_loss(reference.vae_loss, inputs, log_scale=ls, **kw)
        assert torch.isnan(got.rec[1]), got.rec
        assert torch.isnan(got.loss).any()
        if reduction == "none":
            assert torch.isnan(got.loss[1])
        assert_outputs_close(got, exp, RTOL64, ATOL64, equal_nan=True)
        assert_grads_close(got_g, exp_g, RTOL64, ATOL64, equal_nan=True)


@pytest.mark.parametrize("likelihood", ["bernoulli", "cbernoulli", "gaussian", "laplace"])
def test_large_random_logits_float32_finite(likelihood):
    # Wide-range logits: wherever the reference is finite the fused result is too.
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 3, 50, generator=g, dtype=F64) * 40).to(F32)
    t = torch.rand(4, 3, 50, generator=g, dtype=F64).to(F32)
    mu = torch.randn(4, 8, generator=g).mul(10)
    lv = torch.randn(4, 8, generator=g).mul(15)
    inp = Inputs(x, t, mu, lv)
    got, got_g = run_loss(fusedvae.vae_loss, inp, likelihood=likelihood)
    exp, exp_g = run_loss(reference.vae_loss, Inputs(*(a.double() for a in inp)), likelihood=likelihood)
    for name in ("loss", "rec", "kl"):
        assert torch.isfinite(getattr(exp, name)).all()
        assert torch.isfinite(getattr(got, name)).all()
    for name in got_g:
        assert torch.isfinite(got_g[name]).all()
    torch.testing.assert_close(got.rec, exp.rec.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_g["recon"], exp_g["recon"].float(), rtol=1e-5, atol=1e-7)



def test_laplace_is_the_latent_diffusion_nll():
    # latent diffusion's autoencoder loss without its perceptual and GAN terms
    # (docs/weighting.md): Σ|x - x̂|·e^{-v} + v per pixel, batch mean, plus
    # kl_weight times the batch-mean KL, equals the Laplace objective less N·log 2,
    # with the same gradients (v a learned scalar).
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g, dtype=F64) * 2 - 1
    leaves = [torch.randn(3, 3, 8, 8, generator=g, dtype=F64).requires_grad_(),
              torch.randn(3, 4, 2, 2, generator=g, dtype=F64).requires_grad_(),
              torch.randn(3, 4, 2, 2, generator=g, dtype=F64).requires_grad_(),
              torch.tensor(0.3, dtype=F64, requires_grad=True)]
    x_hat, mu, lv, v = leaves
    out = fusedvae.vae_loss(x_hat, x, mu, lv, likelihood="laplace", log_scale=v, beta=1e-6)
    nll = (torch.abs(x - x_hat) / torch.exp(v) + v).sum() / 3
    kl = (0.5 * (mu**2 + torch.exp(lv) - 1 - lv)).sum() / 3
    ldm = nll + 1e-6 * kl
    n = x[0].numel()
    torch.testing.assert_close(out.loss, ldm + n * math.log(2), rtol=1e-12, atol=1e-12)
    for got, exp in zip(torch.autograd.grad(out.loss, leaves), torch.autograd.grad(ldm, leaves)):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)

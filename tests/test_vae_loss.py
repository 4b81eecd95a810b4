"""fusedvae.vae_loss against the pure-PyTorch reference (fusedvae.reference).

Sections follow the test plan: (1) float64 values and gradients over the whole
option matrix, (2) gradcheck, (3) upstream gradients other than 1, (4) extreme
inputs, (5) reduced precision, (6) uint8 targets, (7) memory layouts, (8) mixed
dtypes, (9) opcheck, (10) torch.compile, (11) bad input, (12) the module and the
β-normalisation helpers, (13) determinism, (14) batch and sample sizes that hit
the kernels' tail and multi-chunk paths.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedvae
from fusedvae import reference
from helpers import (
    HALF_DTYPES,
    REDUCTIONS,
    VARIANT_IDS,
    VARIANTS,
    Inputs,
    assert_grads_close,
    assert_outputs_close,
    fresh,
    make_inputs,
    make_log_scale,
    run_loss,
)

ops = torch.ops.fusedvae
F64 = torch.float64
F32 = torch.float32

# float64 against float64: the fused kernels and the reference evaluate the same
# formulas in a different order (vector lanes, chunk sums, expm1 vs exp - 1, the
# continuous-Bernoulli series/closed-form switch at 0.35 vs 1e-3), so a few ulps
# of each element and of each sum may differ. 1e-10 relative is ~1e6 ulps of
# headroom and still catches any formula or scaling error.
RTOL64, ATOL64 = 1e-10, 1e-12

LAT_SHAPES = [(5,), (4, 4, 4)]
LAT_IDS = ["flat", "spatial"]


def _kw(likelihood, logits, reduction="batchmean", free_bits=0.0, beta=0.7):
    return dict(likelihood=likelihood, logits=logits, reduction=reduction, free_bits=free_bits, beta=beta)


def _compare_to_reference(inputs, ls_kind, rtol=RTOL64, atol=ATOL64, upstream=None, log_scale=None, **kw):
    if log_scale is None:
        log_scale = make_log_scale(ls_kind, inputs.recon.shape, dtype=inputs.recon.dtype)
    got, got_g = run_loss(fusedvae.vae_loss, inputs, upstream=upstream, log_scale=log_scale, **kw)
    exp, exp_g = run_loss(reference.vae_loss, inputs, upstream=upstream, log_scale=log_scale, **kw)
    assert got.loss.shape == exp.loss.shape
    assert got.rec.shape == got.kl.shape == (inputs.recon.shape[0],)
    assert_outputs_close(got, exp, rtol=rtol, atol=atol)
    assert_grads_close(got_g, exp_g, rtol=rtol, atol=atol)
    return got, got_g, exp, exp_g


# ------------------------------------------------------ 1. float64 matrix --


@pytest.mark.parametrize("free_bits", [0.0, 0.6], ids=["fb0", "fb0.6"])
@pytest.mark.parametrize("latent_shape", LAT_SHAPES, ids=LAT_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_matches_reference_float64(likelihood, logits, ls_kind, reduction, latent_shape, free_bits):
    inputs = make_inputs(likelihood, logits, F64, latent_shape, batch=3, sample_shape=(3, 4, 5))
    got, got_g, _, _ = _compare_to_reference(
        inputs, ls_kind, **_kw(likelihood, logits, reduction, free_bits)
    )
    assert got.loss.dtype == got.rec.dtype == got.kl.dtype == F64
    assert got.loss.shape == ((3,) if reduction == "none" else ())
    assert got_g["recon"].shape == inputs.recon.shape
    if ls_kind is not None and ls_kind not in ("float", "optimal"):
        assert "log_scale" in got_g


def test_free_bits_matrix_exercises_both_sides_of_the_clamp():
    # The free_bits=0.6 cases above are only meaningful if some latent dims are
    # below 0.6 nats (clamped, no gradient) and some above.
    inp = make_inputs("bernoulli", True, F64, (5,), batch=3, sample_shape=(3, 4, 5))
    kl_dim = 0.5 * (inp.mu**2 + inp.logvar.exp() - 1 - inp.logvar)
    mean = kl_dim.mean(0)
    assert (mean < 0.6).any() and (mean > 0.6).any()


@pytest.mark.parametrize("likelihood,logits", [("bernoulli", True), ("cbernoulli", False), ("gaussian", True)])
def test_beta_tensor_matches_reference_and_gets_gradient(likelihood, logits):
    inputs = make_inputs(likelihood, logits, F64, (5,))
    beta = torch.tensor(2.5, dtype=F64, requires_grad=True)
    results = []
    for fn in (fusedvae.vae_loss, reference.vae_loss):
        b = fresh(beta)
        out, grads = run_loss(fn, inputs, likelihood=likelihood, logits=logits, beta=b)
        results.append((out, grads, b.grad))
    (got, got_g, got_b), (exp, exp_g, exp_b) = results
    assert_outputs_close(got, exp, RTOL64, ATOL64)
    assert_grads_close(got_g, exp_g, RTOL64, ATOL64)
    torch.testing.assert_close(got_b, exp_b, rtol=RTOL64, atol=ATOL64)
    # d loss / d beta = mean_b kl_b (closed form)
    torch.testing.assert_close(got_b, exp.kl.mean(), rtol=RTOL64, atol=ATOL64)


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


# ------------------------------------------------------------ 2. gradcheck --


def _gradcheck_case(likelihood, logits, ls_kind, reduction, free_bits, latent_shape):
    inp = make_inputs(likelihood, logits, F64, latent_shape, batch=3, sample_shape=(2, 3, 4))
    ls = make_log_scale(ls_kind, inp.recon.shape)
    tensors = [inp.recon.clone().requires_grad_(), inp.mu.clone().requires_grad_(), inp.logvar.clone().requires_grad_()]
    ls_is_tensor = isinstance(ls, torch.Tensor)
    if ls_is_tensor:
        tensors.append(ls.detach().clone().requires_grad_())

    def f(recon, mu, logvar, *rest):
        out = fusedvae.vae_loss(
            recon,
            inp.target,
            mu,
            logvar,
            log_scale=rest[0] if ls_is_tensor else ls,
            **_kw(likelihood, logits, reduction, free_bits),
        )
        return out.loss, out.rec, out.kl

    assert torch.autograd.gradcheck(f, tuple(tensors), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_gradcheck(likelihood, logits, ls_kind, reduction):
    _gradcheck_case(likelihood, logits, ls_kind, reduction, 0.0, (5,))


@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_gradcheck_free_bits_spatial_latent(likelihood, logits, ls_kind):
    _gradcheck_case(likelihood, logits, ls_kind, "batchmean", 0.6, (2, 2, 2))


# ----------------------------------------------- 3. upstream gradients != 1 --


@pytest.mark.parametrize("free_bits", [0.0, 0.6], ids=["fb0", "fb0.6"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_scalar_upstream_gradient(likelihood, logits, ls_kind, reduction, free_bits):
    inputs = make_inputs(likelihood, logits, F64, (5,))
    _compare_to_reference(
        inputs, ls_kind, upstream=lambda o: 3.7 * o.loss, **_kw(likelihood, logits, reduction, free_bits)
    )


@pytest.mark.parametrize("free_bits", [0.0, 0.6], ids=["fb0", "fb0.6"])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_per_sample_upstream_gradients(likelihood, logits, ls_kind, reduction, free_bits):
    inputs = make_inputs(likelihood, logits, F64, (4, 2, 2))
    g = torch.Generator().manual_seed(7)
    w1, w2, w3 = (torch.randn(3, generator=g, dtype=F64) for _ in range(3))

    def upstream(out):
        # A GECO-like objective: separate random weights on rec, kl and the loss.
        return (w1 * out.rec).sum() + (w2 * out.kl).sum() + (w3 * out.loss).sum()

    _compare_to_reference(inputs, ls_kind, upstream=upstream, **_kw(likelihood, logits, reduction, free_bits))


@pytest.mark.parametrize("likelihood,logits", [("bernoulli", True), ("cbernoulli", True), ("gaussian", True)])
def test_gradient_of_rec_only_and_kl_only(likelihood, logits):
    # Only one of the two per-sample outputs feeds the objective: the other
    # op gets no (or a zero) upstream gradient.
    inputs = make_inputs(likelihood, logits, F64, (5,))
    for pick in (lambda o: (2.0 * o.rec).sum(), lambda o: (-1.5 * o.kl).sum()):
        _compare_to_reference(inputs, None, upstream=pick, **_kw(likelihood, logits, "none"))


# ------------------------------------------------------------ 4. extremes --

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
    kw = _kw(likelihood, True, "sum")
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
        kw = _kw("bernoulli", True, "none", free_bits)
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
        kw = _kw(likelihood, logits, reduction)
        got, got_g = run_loss(fusedvae.vae_loss, inputs, log_scale=ls, **kw)
        exp, exp_g = run_loss(reference.vae_loss, inputs, log_scale=ls, **kw)
        assert torch.isnan(got.rec[1]), got.rec
        assert torch.isnan(got.loss).any()
        if reduction == "none":
            assert torch.isnan(got.loss[1])
        assert_outputs_close(got, exp, RTOL64, ATOL64, equal_nan=True)
        assert_grads_close(got_g, exp_g, RTOL64, ATOL64, equal_nan=True)


@pytest.mark.parametrize("likelihood", ["bernoulli", "cbernoulli", "gaussian"])
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


# ---------------------------------------------------------------- 5. dtypes --

# Tolerances against the float64 reference evaluated on the upcast inputs (so input
# rounding is not part of the error):
# * loss/rec/kl: every dtype accumulates in float32; per-element libm error of a
#   few float32 ulps plus summation over <= 60 elements -> 1e-5 relative (about 80
#   float32 ulps), 1e-5 absolute for values near 0.
# * gradients are computed in float32 and rounded once to the input dtype:
#   float32 -> 1e-5; float16 -> half an ulp is 2^-11 = 4.9e-4, allow 1e-3;
#   bfloat16 -> half an ulp is 2^-8 = 3.9e-3, allow 8e-3. Absolute slack covers
#   gradients in the subnormal range of float16 (spacing 6e-8) and tiny values.
# * the gradient of a broadcast log_scale is a sum, done by autograd in the
#   input dtype: float16 2e-3, bfloat16 2e-2. For a shared log σ it is
#   Σ_b (N - Σ_i z_bi²), a difference of terms of size N·B = 180 that nearly
#   cancel, so float32 rounding of those terms (and a different summation
#   order, AVX2 vs AVX-512) leaves errors of order 180 · 6e-8 per rounding:
#   1e-4 absolute.
DTYPE_TOLS = {
    F32: dict(value=(1e-5, 1e-5), grad=(1e-5, 1e-6), summed_grad=(1e-5, 1e-4)),
    torch.float16: dict(value=(1e-5, 1e-5), grad=(1e-3, 1e-5), summed_grad=(2e-3, 1e-3)),
    torch.bfloat16: dict(value=(1e-5, 1e-5), grad=(8e-3, 1e-4), summed_grad=(2e-2, 1e-2)),
}


@pytest.mark.parametrize("dtype", [F32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_low_precision_against_float64_reference(likelihood, logits, ls_kind, reduction, dtype):
    inputs = make_inputs(likelihood, logits, dtype, (5,), batch=3, sample_shape=(3, 4, 5))
    up = Inputs(*(a.to(F64) for a in inputs))
    # log_scale in the dtype of recon (a decoder head emits it in its own dtype).
    ls = make_log_scale(ls_kind, inputs.recon.shape, dtype=dtype)
    ls_up = fresh(ls.detach().to(F64).requires_grad_()) if isinstance(ls, torch.Tensor) else ls
    kw = _kw(likelihood, logits, reduction, 0.6)
    got, got_g = run_loss(fusedvae.vae_loss, inputs, log_scale=ls, **kw)
    exp, exp_g = run_loss(reference.vae_loss, up, log_scale=ls_up, **kw)
    for name in ("loss", "rec", "kl"):
        assert getattr(got, name).dtype == F32, name
    tol = DTYPE_TOLS[dtype]
    for name in ("loss", "rec", "kl"):
        torch.testing.assert_close(getattr(got, name), getattr(exp, name).float(), rtol=tol["value"][0], atol=tol["value"][1])
    for name in got_g:
        assert got_g[name].dtype == dtype, name
        summed = name == "log_scale" and ls_kind in ("scalar_tensor", "broadcast_tensor", "per_sample_tensor")
        rtol, atol = tol["summed_grad" if summed else "grad"]
        torch.testing.assert_close(got_g[name], exp_g[name].to(dtype), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [F32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_low_precision_cb_log_normalizer(dtype):
    eta = torch.tensor([0.0, 1e-4, -0.01, 0.5, -0.99, 1.0, 3.0, -16.0, 30.0, 88.0, -100.0], dtype=F64).to(dtype)
    got = fusedvae.continuous_bernoulli_log_normalizer(eta)
    assert got.dtype == dtype
    exp = reference.continuous_bernoulli_log_normalizer(eta.to(F64))
    # float32: DESIGN.md promises <= 1e-6 relative; 16-bit outputs are rounded once.
    rtol = {F32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got, exp.to(dtype), rtol=rtol, atol=0)


# ------------------------------------------------------------- 6. uint8 ----


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(
    "likelihood,logits,ls_kind",
    [
        ("bernoulli", True, None),
        ("bernoulli", False, None),
        ("cbernoulli", True, None),
        ("cbernoulli", False, None),
        ("gaussian", True, None),
        ("gaussian", True, "full_tensor"),
        ("gaussian", True, "optimal"),
    ],
)
def test_uint8_target_equals_scaled_float(likelihood, logits, ls_kind, dtype):
    inp = make_inputs(likelihood, logits, dtype, (5,), target_dtype=torch.uint8, sample_shape=(3, 7, 5))
    as_float = inp._replace(target=inp.target.to(dtype) / 255)
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=dtype)
    kw = _kw(likelihood, logits, "none")
    got, got_g = run_loss(fusedvae.vae_loss, inp, log_scale=ls, **kw)
    exp, exp_g = run_loss(fusedvae.vae_loss, as_float, log_scale=ls, **kw)
    # The kernel computes t = float(u8) / 255 exactly as torch does: bitwise for
    # the elementwise gradients, identical sums for the values.
    assert_outputs_close(got, exp, rtol=0, atol=0)
    assert_grads_close(got_g, exp_g, rtol=0, atol=0)
    # And the float64 reference (which also takes uint8 targets) on the same values.
    up = inp._replace(recon=inp.recon.double(), mu=inp.mu.double(), logvar=inp.logvar.double())
    ls_up = fresh(ls.detach().double().requires_grad_()) if isinstance(ls, torch.Tensor) else ls
    ref_out, ref_g = run_loss(reference.vae_loss, up, log_scale=ls_up, **kw)
    rtol, atol = (RTOL64, ATOL64) if dtype == F64 else (1e-5, 1e-5)
    assert_outputs_close(got, ref_out, rtol=rtol, atol=atol, check_dtype=False)
    for name in got_g:
        torch.testing.assert_close(got_g[name].double(), ref_g[name], rtol=rtol, atol=atol / 10)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["f16", "bf16"])
def test_uint8_target_half_precision_recon(dtype):
    # 16-bit recon with uint8 pixels: the kernel scales in float32, like the
    # reference (t_u8.to(float32)/255), not t_u8.to(float16)/255.
    inp = make_inputs("bernoulli", True, dtype, (5,), target_dtype=torch.uint8, sample_shape=(3, 7, 5))
    got, got_g = run_loss(fusedvae.vae_loss, inp, reduction="none")
    exp, exp_g = run_loss(reference.vae_loss, inp._replace(recon=inp.recon.float(), mu=inp.mu.float(), logvar=inp.logvar.float()), reduction="none")
    torch.testing.assert_close(got.rec, exp.rec, rtol=1e-5, atol=1e-5)
    tol = DTYPE_TOLS[dtype]["grad"]
    torch.testing.assert_close(got_g["recon"], exp_g["recon"].to(dtype), rtol=tol[0], atol=tol[1])


# -------------------------------------------------------------- 7. layouts --


def _layout_cases():
    # (name, recon transform, target transform); each transform keeps the values
    # of the [B, C, H, W] tensor it gets, changing only the strides.
    cl = lambda a: a.contiguous(memory_format=torch.channels_last)  # noqa: E731
    ident = lambda a: a  # noqa: E731
    # dense, batch outermost, permuted inner dims (runs without a copy)
    inner_perm = lambda a: a.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)  # noqa: E731
    # dense, batch NOT outermost (copied by the op)
    batch_inner = lambda a: a.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)  # noqa: E731
    transposed = lambda a: a.transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731
    return [
        ("cl-cl", cl, cl),
        ("cl-contig", cl, ident),
        ("contig-cl", ident, cl),
        ("perm-contig", inner_perm, ident),
        ("contig-perm", ident, inner_perm),
        ("batchinner-cl", batch_inner, cl),
        ("cl-batchinner", cl, batch_inner),
        ("transposed-transposed", transposed, transposed),
    ]


LAYOUTS = _layout_cases()


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[c[0] for c in LAYOUTS])
@pytest.mark.parametrize(
    "likelihood,logits,ls_kind",
    [("bernoulli", True, None), ("cbernoulli", False, None), ("gaussian", True, "full_tensor"), ("gaussian", True, "optimal")],
)
def test_layouts_match_contiguous(likelihood, logits, ls_kind, layout, dtype):
    _, rt, tt = layout
    inp = make_inputs(likelihood, logits, dtype, (5,), batch=3, sample_shape=(3, 5, 6))
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=dtype)
    kw = _kw(likelihood, logits, "none")
    base, base_g = run_loss(fusedvae.vae_loss, inp, log_scale=ls, **kw)
    up = Inputs(*(a.double() for a in inp))
    ref_out, ref_g = run_loss(reference.vae_loss, up, log_scale=ls.double() if isinstance(ls, torch.Tensor) else ls, **kw)

    recon = rt(inp.recon.clone()).requires_grad_()
    target = tt(inp.target.clone())
    ls2 = rt(ls.detach().clone()).requires_grad_() if isinstance(ls, torch.Tensor) else ls
    mu, lv = inp.mu.clone().requires_grad_(), inp.logvar.clone().requires_grad_()
    out = fusedvae.vae_loss(recon, target, mu, lv, log_scale=ls2, **kw)
    out.loss.sum().backward()
    assert recon.grad.shape == recon.shape
    # Sums may run in another order (channels_last walks memory order): a few ulps.
    rtol = 1e-12 if dtype == F64 else 2e-6
    assert_outputs_close(out, base, rtol=rtol, atol=rtol)
    # Elementwise gradients: exact (for "optimal", sigma comes from a sum: a few ulps).
    gtol = rtol if ls_kind == "optimal" else 0
    torch.testing.assert_close(recon.grad, base_g["recon"], rtol=gtol, atol=gtol)
    torch.testing.assert_close(mu.grad, base_g["mu"], rtol=0, atol=0)
    if isinstance(ls2, torch.Tensor):
        assert ls2.grad.shape == ls2.shape
        torch.testing.assert_close(ls2.grad, base_g["log_scale"], rtol=0, atol=0)
    # and the float64 reference
    rtol = RTOL64 if dtype == F64 else 1e-5
    assert_outputs_close(out, ref_out, rtol=rtol, atol=rtol, check_dtype=False)
    torch.testing.assert_close(recon.grad.double(), ref_g["recon"], rtol=rtol, atol=rtol / 10)


@pytest.mark.parametrize("likelihood,logits", [("bernoulli", True), ("cbernoulli", True), ("gaussian", True)])
def test_sliced_batch_and_expanded_target(likelihood, logits):
    inp = make_inputs(likelihood, logits, F64, (5,), batch=6, sample_shape=(2, 5, 3))
    kw = _kw(likelihood, logits, "none")
    # x[::2]: non-contiguous batch, for every tensor.
    sliced = Inputs(inp.recon[::2], inp.target[::2], inp.mu[::2], inp.logvar[::2])
    assert not sliced.recon.is_contiguous()
    for case in (sliced, Inputs(inp.recon[:, :, ::2], inp.target[:, :, ::2], inp.mu[:, 1:], inp.logvar[:, 1:])):
        base = Inputs(*(a.contiguous() for a in case))
        got, got_g = run_loss_views(case, kw)
        exp, exp_g = run_loss(reference.vae_loss, base, **kw)
        assert_outputs_close(got, exp, RTOL64, ATOL64)
        assert_grads_close(got_g, exp_g, RTOL64, ATOL64)
    # Expanded (stride 0) target: one image broadcast over the batch.
    t = inp.target[:1].expand_as(inp.recon)
    assert t.stride(0) == 0
    exp_in = inp._replace(target=t)
    got, got_g = run_loss(fusedvae.vae_loss, exp_in, **kw)
    exp, exp_g = run_loss(reference.vae_loss, inp._replace(target=t.contiguous()), **kw)
    assert_outputs_close(got, exp, RTOL64, ATOL64)
    assert_grads_close(got_g, exp_g, RTOL64, ATOL64)


def run_loss_views(inputs, kw):
    """Like run_loss, but the leaves keep the given (strided) layout."""
    leaves = [a.detach() for a in (inputs.recon, inputs.mu, inputs.logvar)]
    views = []
    for a in leaves:
        # a strided leaf: allocate the full base and take the same view of it
        base = torch.empty_strided(a.size(), a.stride(), dtype=a.dtype)
        base.copy_(a)
        views.append(base.requires_grad_())
    recon, mu, lv = views
    assert recon.stride() == inputs.recon.stride() and recon.is_leaf
    out = fusedvae.vae_loss(recon, inputs.target, mu, lv, **kw)
    out.loss.sum().backward()
    assert recon.grad.shape == recon.shape
    return out, {"recon": recon.grad, "mu": mu.grad, "logvar": lv.grad}


def test_gradient_flows_through_noncontiguous_view_of_leaf():
    inp = make_inputs("bernoulli", True, F64, (5,), batch=6, sample_shape=(2, 5, 3))
    x = inp.recon.clone().requires_grad_()
    out = fusedvae.vae_loss(x[::2].transpose(2, 3), inp.target[::2].transpose(2, 3), inp.mu[::2], inp.logvar[::2])
    out.loss.backward()
    x2 = inp.recon.clone().requires_grad_()
    ref_out = reference.vae_loss(x2[::2], inp.target[::2], inp.mu[::2], inp.logvar[::2])
    ref_out.loss.backward()
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=RTOL64, atol=ATOL64)
    torch.testing.assert_close(x.grad, x2.grad, rtol=RTOL64, atol=ATOL64)
    assert (x.grad[1::2] == 0).all()


@pytest.mark.parametrize("kind", ["broadcast_tensor", "per_sample_tensor", "channels_last_full"])
def test_log_scale_layouts(kind):
    inp = make_inputs("gaussian", True, F64, (5,), batch=3, sample_shape=(3, 4, 5))
    if kind == "channels_last_full":
        ls = (0.3 * torch.randn(inp.recon.shape, dtype=F64)).contiguous(memory_format=torch.channels_last)
        ls.requires_grad_()
    else:
        ls = make_log_scale(kind, inp.recon.shape)
    recon_cl = inp._replace(recon=inp.recon.contiguous(memory_format=torch.channels_last))
    got, got_g = run_loss(fusedvae.vae_loss, recon_cl, log_scale=ls, likelihood="gaussian", reduction="none")
    exp, exp_g = run_loss(reference.vae_loss, inp, log_scale=ls, likelihood="gaussian", reduction="none")
    assert_outputs_close(got, exp, RTOL64, ATOL64)
    assert_grads_close(got_g, exp_g, RTOL64, ATOL64)
    assert got_g["log_scale"].shape == ls.shape


def test_noncontiguous_latents():
    inp = make_inputs("bernoulli", True, F64, (4, 3, 3))
    mu_t = inp.mu.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels_last latent
    lv_t = inp.logvar.transpose(2, 3).contiguous().transpose(2, 3)
    for free_bits in (0.0, 0.6):
        kw = _kw("bernoulli", True, "none", free_bits)
        got, got_g = run_loss(fusedvae.vae_loss, inp._replace(mu=mu_t, logvar=lv_t), **kw)
        exp, exp_g = run_loss(reference.vae_loss, inp, **kw)
        assert_outputs_close(got, exp, RTOL64, ATOL64)
        assert_grads_close(got_g, exp_g, RTOL64, ATOL64)


# ------------------------------------------------------- 8. mixed dtypes ---


@pytest.mark.parametrize(
    "recon_dtype,target_dtype,latent_dtypes,out_dtype",
    [
        (F32, F64, (F32, F32), F64),
        (F64, F32, (F64, F64), F64),
        (torch.float16, F32, (torch.float16, F32), F32),
        (torch.bfloat16, torch.float16, (F32, F64), F32),
    ],
)
@pytest.mark.parametrize("likelihood,logits", [("bernoulli", True), ("cbernoulli", False), ("gaussian", True)])
def test_mixed_dtypes_promote(likelihood, logits, recon_dtype, target_dtype, latent_dtypes, out_dtype):
    inp = make_inputs(likelihood, logits, F64, (5,))
    mixed = Inputs(inp.recon.to(recon_dtype), inp.target.to(target_dtype), inp.mu.to(latent_dtypes[0]), inp.logvar.to(latent_dtypes[1]))
    kw = _kw(likelihood, logits, "none")
    got, got_g = run_loss(fusedvae.vae_loss, mixed, **kw)
    exp, exp_g = run_loss(reference.vae_loss, mixed, **kw)
    # rec is computed in the promoted dtype of recon and target, kl in that of mu and logvar.
    assert got.rec.dtype == exp.rec.dtype == out_dtype
    assert got.kl.dtype == exp.kl.dtype
    for name in got_g:
        assert got_g[name].dtype == getattr(mixed, name).dtype, name
    # Same promoted values on both sides: float64 -> RTOL64; float32 -> a few ulps
    # of each element and sum (1e-5); 16-bit gradients rounded once (see DTYPE_TOLS).
    tol = {F64: RTOL64, F32: 1e-5}
    torch.testing.assert_close(got.rec, exp.rec, rtol=tol[out_dtype], atol=tol[out_dtype])
    torch.testing.assert_close(got.kl, exp.kl, rtol=tol[got.kl.dtype], atol=tol[got.kl.dtype])
    loss_tol = max(tol[out_dtype], tol[got.kl.dtype])
    torch.testing.assert_close(got.loss, exp.loss, rtol=loss_tol, atol=loss_tol, check_dtype=False)
    grad_tol = {F32: 1e-5, F64: RTOL64, torch.float16: 1e-3, torch.bfloat16: 8e-3}
    for name in got_g:
        t = grad_tol[got_g[name].dtype]
        torch.testing.assert_close(got_g[name], exp_g[name], rtol=t, atol=t / 10)


def test_float32_recon_float64_target_uses_float64_values():
    # The promoted computation sees the float64 target's full precision.
    inp = make_inputs("gaussian", True, F64, (5,))
    target = inp.target + 1e-12  # not representable in float32
    got = fusedvae.vae_loss(inp.recon.float(), target, inp.mu, inp.logvar, likelihood="gaussian", reduction="none")
    exp = reference.vae_loss(inp.recon.float().double(), target, inp.mu, inp.logvar, likelihood="gaussian", reduction="none")
    assert got.rec.dtype == F64
    torch.testing.assert_close(got.rec, exp.rec, rtol=RTOL64, atol=ATOL64)


# ------------------------------------------------------------- 9. opcheck --


def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(
    "likelihood,logits",
    [("bernoulli", True), ("bernoulli", False), ("cbernoulli", True), ("cbernoulli", False), ("squared_error", True), ("gaussian", True)],
)
def test_opcheck_recon_loss(likelihood, logits, dtype):
    lik = "gaussian" if likelihood in ("gaussian", "squared_error") else likelihood
    inp = make_inputs(lik, logits, dtype, (5,), batch=3, sample_shape=(2, 3, 4))
    scale = (0.3 * torch.randn(inp.recon.shape, dtype=dtype)) if likelihood == "gaussian" else None
    # forward op, inputs requiring grad
    recon = inp.recon.clone().requires_grad_()
    s = scale.clone().requires_grad_() if scale is not None else None
    _opcheck(ops.recon_loss.default, (recon, inp.target, s, likelihood, logits))
    # uint8 target
    t8 = torch.randint(0, 256, inp.recon.shape, dtype=torch.uint8)
    _opcheck(ops.recon_loss.default, (recon, t8, s, likelihood, logits))
    # backward op, plain inputs
    grad = torch.randn(3, dtype=dtype)
    _opcheck(ops.recon_loss_backward.default, (grad, inp.recon, inp.target, scale, likelihood, logits))
    # and a channels_last recon
    rc = inp.recon.contiguous(memory_format=torch.channels_last)
    _opcheck(ops.recon_loss_backward.default, (grad, rc, inp.target, scale, likelihood, logits))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_opcheck_kl_and_cb_ops(dtype):
    mu = torch.randn(3, 4, 2, dtype=dtype)
    lv = torch.randn(3, 4, 2, dtype=dtype)
    _opcheck(ops.gaussian_kl.default, (mu.clone().requires_grad_(), lv.clone().requires_grad_()))
    _opcheck(ops.gaussian_kl_per_dim.default, (mu.clone().requires_grad_(), lv.clone().requires_grad_()))
    _opcheck(ops.gaussian_kl_backward.default, (torch.randn(3, dtype=dtype), mu, lv))
    _opcheck(ops.gaussian_kl_backward.default, (torch.randn(3, 4, 2, dtype=dtype), mu, lv))
    eta = torch.tensor([[0.0, 1e-3, -0.5, 2.0], [30.0, -30.0, 0.9, 1.1]], dtype=dtype)
    _opcheck(ops.cb_log_normalizer.default, (eta.clone().requires_grad_(),))
    _opcheck(ops.cb_log_normalizer_backward.default, (torch.randn_like(eta), eta))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_op_outputs_against_reference(dtype):
    # The raw ops (not only vae_loss) compute the reference's quantities.
    inp = make_inputs("cbernoulli", True, dtype, (4, 2))
    rec = ops.recon_loss(inp.recon, inp.target, None, "cbernoulli", True)
    exp = reference.vae_loss(*inp, likelihood="cbernoulli", reduction="none")
    tol = RTOL64 if dtype == F64 else 1e-5
    torch.testing.assert_close(rec, exp.rec, rtol=tol, atol=tol)
    torch.testing.assert_close(ops.gaussian_kl(inp.mu, inp.logvar), exp.kl, rtol=tol, atol=tol)
    per_dim = ops.gaussian_kl_per_dim(inp.mu, inp.logvar)
    assert per_dim.shape == inp.mu.shape
    torch.testing.assert_close(per_dim, 0.5 * (inp.mu**2 + inp.logvar.exp() - 1 - inp.logvar), rtol=tol, atol=tol)
    se = ops.recon_loss(inp.recon, inp.target, None, "squared_error", True)
    torch.testing.assert_close(se, ((inp.recon - inp.target) ** 2).flatten(1).sum(1), rtol=tol, atol=tol)


# ----------------------------------------------------------- 10. compile ---


def _compile_case(backend, likelihood, logits, ls_kind, reduction, free_bits):
    torch._dynamo.reset()
    inp = make_inputs(likelihood, logits, F32, (5,), batch=3, sample_shape=(2, 3, 4))
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=F32)
    beta = torch.tensor(0.8)

    def f(recon, target, mu, logvar, log_scale):
        out = fusedvae.vae_loss(recon, target, mu, logvar, likelihood=likelihood, logits=logits,
                                beta=beta, reduction=reduction, log_scale=log_scale, free_bits=free_bits)
        return out.loss.sum() + 0.3 * out.rec.sum() - 0.2 * out.kl.sum(), out

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    results = []
    for fn in (f, compiled, None):
        leaves = [inp.recon.clone().requires_grad_(), inp.mu.clone().requires_grad_(), inp.logvar.clone().requires_grad_()]
        l2 = fresh(ls)
        if fn is None:  # the reference, in float64
            out = reference.vae_loss(leaves[0].double(), inp.target.double(), leaves[1].double(), leaves[2].double(),
                                     likelihood=likelihood, logits=logits, beta=beta.double(), reduction=reduction,
                                     log_scale=l2.double() if isinstance(l2, torch.Tensor) else l2, free_bits=free_bits)
            scalar = out.loss.sum() + 0.3 * out.rec.sum() - 0.2 * out.kl.sum()
        else:
            scalar, out = fn(leaves[0], inp.target, leaves[1], leaves[2], l2)
        scalar.backward()
        grads = [a.grad for a in leaves] + ([l2.grad] if isinstance(l2, torch.Tensor) else [])
        results.append((scalar, out, grads))
    (s0, o0, g0), (s1, o1, g1), (s2, o2, g2) = results
    # compiled == eager: same kernels, same order -> float32 rounding only.
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-6)
    assert_outputs_close(o1, o0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # and against the float64 reference
    torch.testing.assert_close(s1.double(), s2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "likelihood,logits,ls_kind,reduction,free_bits",
    [
        ("bernoulli", True, None, "batchmean", 0.0),
        ("cbernoulli", False, None, "none", 0.6),
        ("gaussian", True, "full_tensor", "mean", 0.0),
        ("gaussian", True, "optimal", "sum", 0.0),
        ("gaussian", True, "scalar_tensor", "batchmean", 0.6),
    ],
)
def test_compile_aot_eager(likelihood, logits, ls_kind, reduction, free_bits):
    _compile_case("aot_eager", likelihood, logits, ls_kind, reduction, free_bits)


def test_compile_eager_backend():
    _compile_case("eager", "bernoulli", False, None, "batchmean", 0.0)


@pytest.mark.slow
def test_compile_inductor():
    _compile_case("inductor", "gaussian", True, "broadcast_tensor", "batchmean", 0.6)


# -------------------------------------------------------- 11. bad input ----


def _good():
    inp = make_inputs("bernoulli", True, F32, (5,), batch=3, sample_shape=(2, 3, 4))
    return inp.recon, inp.target, inp.mu, inp.logvar


def _bad_cases():
    r, t, m, lv = _good()
    meta = torch.device("meta")
    return [
        ("mu batch", ValueError, "mu", (r, t, m[:2], lv[:2]), {}),
        ("target shape", ValueError, "target", (r, t[:, :1], m, lv), {}),
        ("logvar shape", ValueError, "logvar", (r, t, m, lv[:, :4]), {}),
        ("likelihood", ValueError, "likelihood", (r, t, m, lv), {"likelihood": "poisson"}),
        ("reduction", ValueError, "reduction", (r, t, m, lv), {"reduction": "avg"}),
        ("int recon", TypeError, "recon", (r.long(), t, m, lv), {}),
        ("recon not tensor", TypeError, "recon", (r.tolist(), t, m, lv), {}),
        ("recon numpy", TypeError, "recon", (r.numpy(), t, m, lv), {}),
        ("int mu", TypeError, "mu", (r, t, m.int(), lv), {}),
        ("int target", TypeError, "target", (r, t.int(), m, lv), {}),
        ("negative beta", ValueError, "beta", (r, t, m, lv), {"beta": -0.1}),
        ("nan beta", ValueError, "beta", (r, t, m, lv), {"beta": float("nan")}),
        ("beta not 0-d", ValueError, "beta", (r, t, m, lv), {"beta": torch.ones(3)}),
        ("negative free_bits", ValueError, "free_bits", (r, t, m, lv), {"free_bits": -1.0}),
        ("log_scale bernoulli", ValueError, "log_scale", (r, t, m, lv), {"log_scale": 0.5}),
        ("log_scale cbernoulli", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "cbernoulli", "log_scale": torch.zeros(())}),
        ("log_scale shape", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "gaussian", "log_scale": torch.zeros(5, 1)}),
        ("log_scale bigger", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "gaussian", "log_scale": torch.zeros(2, 3, 2, 3, 4)}),
        ("log_scale bogus", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "gaussian", "log_scale": "bogus"}),
        ("log_scale inf", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "gaussian", "log_scale": float("inf")}),
        ("target requires grad", ValueError, "target", (r, t.clone().requires_grad_(), m, lv), {}),
        ("validate target", ValueError, "target", (r, t + 1.5, m, lv), {"validate": True}),
        ("validate target cb", ValueError, "target", (r, t - 1.0, m, lv), {"likelihood": "cbernoulli", "validate": True}),
        ("validate probs", ValueError, "recon", (r, t, m, lv), {"logits": False, "validate": True}),
        ("meta mu", ValueError, "mu", (r, t, m.to(meta), lv), {}),
        ("meta logvar", ValueError, "logvar", (r, t, m, lv.to(meta)), {}),
        ("meta target", ValueError, "target", (r, t.to(meta), m, lv), {}),
        ("meta log_scale", ValueError, "log_scale", (r, t, m, lv), {"likelihood": "gaussian", "log_scale": torch.zeros(r.shape, device=meta)}),
        ("meta beta", ValueError, "beta", (r, t, m, lv), {"beta": torch.tensor(1.0, device=meta)}),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("fn", [fusedvae.vae_loss, reference.vae_loss], ids=["fused", "reference"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises(case, fn):
    _, exc, name, args, kwargs = case
    with pytest.raises(exc, match=name):
        fn(*args, **kwargs)


def test_bad_input_module_raises():
    r, t, m, lv = _good()
    with pytest.raises(ValueError, match="reduction"):
        fusedvae.VAELoss(reduction="avg")(r, t, m, lv)


def test_validate_accepts_valid_input():
    r, t, m, lv = _good()
    exp = reference.vae_loss(r, t, m, lv)
    torch.testing.assert_close(fusedvae.vae_loss(r, t, m, lv, validate=True).loss, exp.loss, rtol=1e-5, atol=1e-5)
    p = torch.sigmoid(r)
    p[0, 0, 0, 0] = 0.0
    p[1, 0, 0, 0] = 1.0
    out = fusedvae.vae_loss(p, t, m, lv, logits=False, validate=True)
    torch.testing.assert_close(out.loss, reference.vae_loss(p, t, m, lv, logits=False).loss, rtol=1e-5, atol=1e-5)
    t8 = torch.randint(0, 256, r.shape, dtype=torch.uint8)
    fusedvae.vae_loss(r, t8, m, lv, likelihood="cbernoulli", validate=True)
    # Gaussian targets are not range-checked.
    fusedvae.vae_loss(r, t * 10 - 5, m, lv, likelihood="gaussian", validate=True)


def test_beta_zero_int_accepted():
    r, t, m, lv = _good()
    out = fusedvae.vae_loss(r, t, m, lv, beta=0, reduction="none")
    torch.testing.assert_close(out.loss, reference.vae_loss(r, t, m, lv, reduction="none").rec, rtol=1e-6, atol=1e-6)


def _direct_bad_calls():
    x = torch.randn(3, 4)
    t = torch.rand(3, 4)
    s = torch.zeros(3, 4)
    g = torch.ones(3)
    return [
        ("int recon", lambda: ops.recon_loss(x.long(), t, None, "bernoulli", True)),
        ("int target", lambda: ops.recon_loss(x, t.int(), None, "bernoulli", True)),
        ("target dtype", lambda: ops.recon_loss(x, t.double(), None, "bernoulli", True)),
        ("target shape", lambda: ops.recon_loss(x, t[:, :3], None, "bernoulli", True)),
        ("target numel same, shape differs", lambda: ops.recon_loss(x, t.reshape(4, 3), None, "bernoulli", True)),
        ("0-d recon", lambda: ops.recon_loss(x[0, 0], t[0, 0], None, "bernoulli", True)),
        ("likelihood", lambda: ops.recon_loss(x, t, None, "poisson", True)),
        ("gaussian without log_scale", lambda: ops.recon_loss(x, t, None, "gaussian", True)),
        ("bernoulli with log_scale", lambda: ops.recon_loss(x, t, s, "bernoulli", True)),
        ("log_scale shape", lambda: ops.recon_loss(x, t, s[:, :1], "gaussian", True)),
        ("log_scale dtype", lambda: ops.recon_loss(x, t, s.double(), "gaussian", True)),
        ("bwd grad shape", lambda: ops.recon_loss_backward(torch.ones(2), x, t, None, "bernoulli", True)),
        ("bwd grad 2-d", lambda: ops.recon_loss_backward(torch.ones(3, 1), x, t, None, "bernoulli", True)),
        ("bwd target shape", lambda: ops.recon_loss_backward(g, x, t[:2], None, "bernoulli", True)),
        ("kl shape", lambda: ops.gaussian_kl(x, t[:, :2])),
        ("kl dtype", lambda: ops.gaussian_kl(x, t.double())),
        ("kl int", lambda: ops.gaussian_kl(x.int(), t.int())),
        ("kl 0-d", lambda: ops.gaussian_kl(x[0, 0], t[0, 0])),
        ("kl bwd grad shape", lambda: ops.gaussian_kl_backward(torch.ones(4), x, t)),
        ("cb int", lambda: ops.cb_log_normalizer(x.long())),
        ("cb bwd grad shape", lambda: ops.cb_log_normalizer_backward(torch.ones(3), x)),
    ]


DIRECT_BAD = _direct_bad_calls()


@pytest.mark.parametrize("call", DIRECT_BAD, ids=[c[0] for c in DIRECT_BAD])
def test_direct_op_bad_input_raises(call):
    # TORCH_CHECK_VALUE/TYPE surface as ValueError/TypeError, TORCH_CHECK as RuntimeError.
    with pytest.raises((RuntimeError, ValueError, TypeError), match="fusedvae"):
        call[1]()


@pytest.mark.parametrize(
    "op_call",
    [
        ("recon_loss target on meta", lambda x, m: ops.recon_loss(x, m, None, "bernoulli", True)),
        ("gaussian_kl logvar on meta", lambda x, m: ops.gaussian_kl(x, m)),
    ],
    ids=lambda c: c[0],
)
def test_direct_op_mixed_devices_raises(op_call):
    # recon on the CPU, one other tensor on 'meta': like every aten op
    # ("Tensor on device meta is not on the expected device cpu!") this must
    # raise, not hand back an uninitialised CPU tensor.
    x = torch.randn(3, 4)
    m = torch.rand(3, 4, device="meta")
    with pytest.raises((RuntimeError, ValueError)):
        out = op_call[1](x, m)
        pytest.fail(f"no error; returned a {out.device} tensor {out}")


# ----------------------------------------------------- 12. module, beta ---


@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_module_matches_functional_and_reference(likelihood, logits, ls_kind):
    inp = make_inputs(likelihood, logits, F64, (5,))
    ls = make_log_scale(ls_kind, inp.recon.shape)
    kw = _kw(likelihood, logits, "sum", 0.3)
    module = fusedvae.VAELoss(log_scale=fresh(ls), **kw)
    recon = inp.recon.clone().requires_grad_()
    out = module(recon, inp.target, inp.mu, inp.logvar)
    out.loss.backward()
    fun = fusedvae.vae_loss(inp.recon, inp.target, inp.mu, inp.logvar, log_scale=fresh(ls), **kw)
    exp, exp_g = run_loss(reference.vae_loss, inp, log_scale=ls, **kw)
    assert_outputs_close(out, fun, 0, 0)
    assert_outputs_close(out, exp, RTOL64, ATOL64)
    torch.testing.assert_close(recon.grad, exp_g["recon"], rtol=RTOL64, atol=ATOL64)


def test_module_tensor_beta_is_buffer_and_schedulable():
    inp = make_inputs("bernoulli", True, F64, (5,))
    module = fusedvae.VAELoss(beta=torch.tensor(1.0, dtype=F64))
    assert "beta" in dict(module.named_buffers())
    assert "beta" in module.state_dict()
    first = module(*inp).loss
    torch.testing.assert_close(first, reference.vae_loss(*inp, beta=1.0).loss, rtol=RTOL64, atol=ATOL64)
    module.beta.fill_(4.0)  # a schedule changes it in place
    second = module(*inp).loss
    torch.testing.assert_close(second, reference.vae_loss(*inp, beta=4.0).loss, rtol=RTOL64, atol=ATOL64)
    floaty = fusedvae.VAELoss(beta=1.0)
    floaty.beta = 0.5  # a float beta is a plain attribute a schedule may set
    torch.testing.assert_close(floaty(*inp).loss, reference.vae_loss(*inp, beta=0.5).loss, rtol=RTOL64, atol=ATOL64)
    m32 = fusedvae.VAELoss(beta=torch.tensor(2.0, dtype=F64)).to(F32)
    assert m32.beta.dtype == F32


@pytest.mark.parametrize("shape", [(), (3, 1, 1), "full"])
def test_module_parameter_log_scale_gets_gradient(shape):
    inp = make_inputs("gaussian", True, F64, (5,), batch=3, sample_shape=(3, 4, 5))
    shape = inp.recon.shape if shape == "full" else shape
    init = 0.2 * torch.randn(shape, dtype=F64)
    module = fusedvae.VAELoss(likelihood="gaussian", log_scale=nn.Parameter(init.clone()))
    params = dict(module.named_parameters())
    assert "log_scale" in params
    module(*inp).loss.backward()
    assert params["log_scale"].grad is not None
    exp_ls = init.clone().requires_grad_()
    reference.vae_loss(*inp, likelihood="gaussian", log_scale=exp_ls).loss.backward()
    torch.testing.assert_close(params["log_scale"].grad, exp_ls.grad, rtol=RTOL64, atol=ATOL64)
    # a buffer log_scale: no parameter, same value
    buf = fusedvae.VAELoss(likelihood="gaussian", log_scale=init.clone())
    assert "log_scale" in dict(buf.named_buffers()) and not list(buf.parameters())


def test_normalized_beta_closed_form_and_inverse():
    assert fusedvae.normalized_beta(4.0, 32, 64 * 64 * 3) == pytest.approx(4.0 * 32 / 12288)
    assert fusedvae.unnormalized_beta(1.0, 10, 784) == pytest.approx(78.4)
    for beta, j, n in [(1.0, 10, 784), (4.0, 32, 12288), (0.25, 4096, 3 * 256 * 256), (0.0, 1, 1)]:
        assert fusedvae.unnormalized_beta(fusedvae.normalized_beta(beta, j, n), j, n) == pytest.approx(beta, rel=1e-15, abs=0)
        assert fusedvae.normalized_beta(fusedvae.unnormalized_beta(beta, j, n), j, n) == pytest.approx(beta, rel=1e-15, abs=0)
    for bad in [(1.0, 0, 10), (1.0, 10, -1), (1.0, 2.5, 10), (1.0, True, 10)]:
        with pytest.raises(ValueError):
            fusedvae.normalized_beta(*bad)
        with pytest.raises(ValueError):
            fusedvae.unnormalized_beta(*bad)


@pytest.mark.parametrize("free_bits", [0.0, 0.6])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_mean_reduction_with_normalized_beta_is_scaled_batchmean(likelihood, logits, ls_kind, free_bits):
    # Documented identity: 'mean' with beta = normalized_beta(b, J, N) has the
    # gradients of 'batchmean' with beta = b, scaled by 1/N (and so the loss).
    inp = make_inputs(likelihood, logits, F64, (4, 2, 2), batch=3, sample_shape=(3, 4, 5))
    n, j = inp.recon[0].numel(), inp.mu[0].numel()
    ls = make_log_scale(ls_kind, inp.recon.shape)
    b = 3.0
    mean_out, mean_g = run_loss(fusedvae.vae_loss, inp, log_scale=ls, reduction="mean",
                                beta=fusedvae.normalized_beta(b, j, n), likelihood=likelihood, logits=logits, free_bits=free_bits)
    bm_out, bm_g = run_loss(fusedvae.vae_loss, inp, log_scale=ls, reduction="batchmean", beta=b,
                            likelihood=likelihood, logits=logits, free_bits=free_bits)
    torch.testing.assert_close(mean_out.loss, bm_out.loss / n, rtol=1e-12, atol=0)
    for name in mean_g:
        torch.testing.assert_close(mean_g[name], bm_g[name] / n, rtol=1e-12, atol=1e-15)


# -------------------------------------------------------- 13. determinism --


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


# ------------------------------------------------------------- 14. sizes ---


@pytest.mark.parametrize(
    "batch,sample_shape,latent_shape",
    [
        (1, (3, 4, 5), (5,)),  # B = 1
        (2, (3, 7, 11), (7,)),  # odd per-sample size: vector tail
        (3, (1,), (1,)),  # one element per sample: only the tail
        (2, (3, 100, 70), (3,)),  # 21000 > 16384: two chunks per sample
        (2, (2, 128, 128), (4, 64, 70)),  # exactly two chunks; multi-chunk latent too
        (1, (5, 3300, 1), (13,)),  # B = 1 and 16500 elements
    ],
    ids=["B1", "odd", "scalar-sample", "two-chunks", "exact-chunks", "B1-chunks"],
)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize(
    "likelihood,logits,ls_kind",
    [("bernoulli", True, None), ("bernoulli", False, None), ("cbernoulli", True, None), ("cbernoulli", False, None),
     ("gaussian", True, "full_tensor"), ("gaussian", True, "optimal")],
)
def test_sizes(likelihood, logits, ls_kind, dtype, batch, sample_shape, latent_shape):
    inp = make_inputs(likelihood, logits, dtype, latent_shape, batch=batch, sample_shape=sample_shape)
    up = Inputs(*(a.to(F64) for a in inp))
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=dtype)
    ls_up = fresh(ls.detach().double().requires_grad_()) if isinstance(ls, torch.Tensor) else ls
    kw = _kw(likelihood, logits, "none", 0.5)
    got, got_g = run_loss(fusedvae.vae_loss, inp, log_scale=ls, **kw)
    exp, exp_g = run_loss(reference.vae_loss, up, log_scale=ls_up, **kw)
    # float32: sums of up to 33k elements accumulated in float32 lanes -> 2e-5.
    rtol, atol = (RTOL64, 1e-11) if dtype == F64 else (2e-5, 1e-4)
    for name in ("loss", "rec", "kl"):
        torch.testing.assert_close(getattr(got, name), getattr(exp, name).to(dtype), rtol=rtol, atol=atol)
    grtol, gatol = (RTOL64, 1e-13) if dtype == F64 else (1e-5, 1e-6)
    for name in got_g:
        torch.testing.assert_close(got_g[name], exp_g[name].to(dtype), rtol=grtol, atol=gatol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["f16", "bf16"])
@pytest.mark.parametrize("ls_kind", ["full_tensor", "broadcast_tensor"])
def test_low_precision_recon_with_float32_log_scale(dtype, ls_kind):
    # A 16-bit decoder mean with a float32 log-scale (e.g. a learned nn.Parameter
    # kept in float32). The reference evaluates the loss in float32 with the
    # float32 log_scale as given; like every other 16-bit path (accumulated in
    # float32, see DTYPE_TOLS) the fused values should agree to ~1e-5, and the
    # float32 log_scale gradient to float32 precision (it is a float32 tensor).
    inputs = make_inputs("gaussian", True, dtype, (5,), batch=3, sample_shape=(3, 4, 5))
    up = Inputs(*(a.to(F64) for a in inputs))
    ls = make_log_scale(ls_kind, inputs.recon.shape, dtype=F32)
    ls_up = fresh(ls.detach().double().requires_grad_())
    kw = _kw("gaussian", True, "none")
    got, got_g = run_loss(fusedvae.vae_loss, inputs, log_scale=ls, **kw)
    exp, exp_g = run_loss(reference.vae_loss, up, log_scale=ls_up, **kw)
    torch.testing.assert_close(got.rec, exp.rec.float(), rtol=1e-5, atol=1e-5)
    assert got_g["log_scale"].dtype == F32
    torch.testing.assert_close(got_g["log_scale"], exp_g["log_scale"].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("likelihood,logits,ls_kind", [("bernoulli", True, None), ("cbernoulli", False, None), ("gaussian", True, "full_tensor")])
def test_one_dimensional_recon_and_latent(likelihood, logits, ls_kind):
    # recon [B] (N = 1) and mu [B] (J = 1): every dim after the batch is absent.
    inp = make_inputs(likelihood, logits, F64, (), batch=5, sample_shape=())
    assert inp.recon.shape == inp.mu.shape == (5,)
    for free_bits in (0.0, 0.6):
        for reduction in REDUCTIONS:
            _compare_to_reference(inp, ls_kind, **_kw(likelihood, logits, reduction, free_bits))


@pytest.mark.parametrize("which", ["recon", "mu", "logvar", "log_scale"])
def test_gradient_for_a_subset_of_inputs(which):
    # Only one input requires grad; the others are plain tensors.
    inp = make_inputs("gaussian", True, F64, (5,))
    ls = make_log_scale("full_tensor", inp.recon.shape).detach()
    results = []
    for fn in (fusedvae.vae_loss, reference.vae_loss):
        args = {"recon": inp.recon.clone(), "mu": inp.mu.clone(), "logvar": inp.logvar.clone(), "log_scale": ls.clone()}
        args[which].requires_grad_()
        out = fn(args["recon"], inp.target, args["mu"], args["logvar"], likelihood="gaussian", log_scale=args["log_scale"])
        out.loss.backward()
        results.append((out.loss, args[which].grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=RTOL64, atol=ATOL64)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=RTOL64, atol=ATOL64)
    # and nothing requires grad at all
    out = fusedvae.vae_loss(inp.recon, inp.target, inp.mu, inp.logvar, likelihood="gaussian", log_scale=ls)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, results[1][0].detach(), rtol=RTOL64, atol=ATOL64)

"""Reductions, β and free bits: the fused loss against the float64 reference.

The whole option matrix (every reconstruction path x reduction x latent shape x
free bits) in float64, values and gradients; a 0-d tensor β (and its gradient);
the normalised β of Higgins et al. and the 'mean' reduction it goes with; the
``VAELoss`` module (β as a schedulable buffer, a learned log σ as a parameter).
Every reduction also runs on each device (``device`` fixture).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fusedvae
from fusedvae import reference
from helpers import (
    ATOL64,
    F32,
    F64,
    REDUCTIONS,
    DEVICE_VARIANT_IDS,
    DEVICE_VARIANTS,
    RTOL64,
    VARIANT_IDS,
    VARIANTS,
    assert_grads_close,
    assert_outputs_close,
    compare_to_reference,
    fresh,
    loss_kw,
    make_inputs,
    make_log_scale,
    on_cpu,
    on_cpu_float64,
    run_loss,
    weighted_upstream,
)


LAT_SHAPES = [(5,), (4, 4, 4)]
LAT_IDS = ["flat", "spatial"]


@pytest.mark.parametrize("free_bits", [0.0, 0.6], ids=["fb0", "fb0.6"])
@pytest.mark.parametrize("latent_shape", LAT_SHAPES, ids=LAT_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_matches_reference_float64(likelihood, logits, ls_kind, reduction, latent_shape, free_bits):
    inputs = make_inputs(likelihood, logits, F64, latent_shape, batch=3, sample_shape=(3, 4, 5))
    got, got_g, _, _ = compare_to_reference(
        inputs, ls_kind, **loss_kw(likelihood, logits, reduction, free_bits)
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


@pytest.mark.parametrize("likelihood,logits", [("bernoulli", True), ("cbernoulli", False), ("gaussian", True), ("laplace", True)])
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


@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_module_matches_functional_and_reference(likelihood, logits, ls_kind):
    inp = make_inputs(likelihood, logits, F64, (5,))
    ls = make_log_scale(ls_kind, inp.recon.shape)
    kw = loss_kw(likelihood, logits, "sum", 0.3)
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


# ---------------------------------------------------------- on each device --


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood,logits,ls_kind", DEVICE_VARIANTS, ids=DEVICE_VARIANT_IDS)
def test_matches_reference_float64_on_device(device, likelihood, logits, ls_kind, reduction):
    # Every reduction with β and free bits, an upstream gradient that weights rec,
    # kl and the loss differently per sample, and 3x17x19 samples (a vector tail in
    # each): the device's kernels against the reference on the CPU, in float64.
    kw = loss_kw(likelihood, logits, reduction, free_bits=0.05, beta=0.7)
    inputs = make_inputs(likelihood, logits, F64, (8,), batch=4, sample_shape=(3, 17, 19), device=device)
    ls = make_log_scale(ls_kind, inputs.recon.shape, device=device)
    got, got_g = run_loss(fusedvae.vae_loss, inputs, upstream=weighted_upstream, log_scale=ls, **kw)
    assert got.loss.device == inputs.recon.device and got_g["recon"].device == inputs.recon.device
    got, got_g = on_cpu(got), on_cpu(got_g)
    cpu_inputs, cpu_ls = on_cpu_float64(inputs), on_cpu_float64(ls)
    exp, exp_g = run_loss(reference.vae_loss, cpu_inputs, upstream=weighted_upstream, log_scale=cpu_ls, **kw)
    assert_outputs_close(got, exp, rtol=1e-10, atol=1e-10)
    assert_grads_close(got_g, exp_g, rtol=1e-10, atol=1e-10)
    # and the CPU kernels on the same numbers: equal up to the order of the sums
    cpu, cpu_g = run_loss(fusedvae.vae_loss, cpu_inputs, upstream=weighted_upstream, log_scale=cpu_ls, **kw)
    assert_outputs_close(got, cpu, rtol=1e-12, atol=1e-12)
    assert_grads_close(got_g, cpu_g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shapes", [((0, 3, 4), (0, 5)), ((2, 0), (2, 5)), ((2, 3), (2, 0))],
                         ids=["no_samples", "empty_sample", "empty_latent"])
@pytest.mark.parametrize("likelihood,log_scale,reduction,free_bits", [
    ("bernoulli", None, "batchmean", 0.0),
    ("bernoulli", None, "none", 0.0),
    ("cbernoulli", None, "mean", 0.5),
    ("gaussian", "optimal", "sum", 0.0),
    ("laplace", "optimal", "batchmean", 0.3),
    ("gaussian", 0.2, "none", 0.0),
])
def test_empty_dimensions_match_reference(shapes, likelihood, log_scale, reduction, free_bits):
    # Empty sums are 0 and means of nothing are NaN, exactly where PyTorch's are.
    (x_shape, m_shape) = shapes
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(x_shape, generator=g, dtype=torch.float64).requires_grad_(),
              torch.randn(m_shape, generator=g, dtype=torch.float64).requires_grad_(),
              torch.randn(m_shape, generator=g, dtype=torch.float64).requires_grad_()]
    target = torch.rand(x_shape, generator=g, dtype=torch.float64)
    kw = dict(likelihood=likelihood, log_scale=log_scale, reduction=reduction, free_bits=free_bits)
    outs = [fn(leaves[0], target, leaves[1], leaves[2], **kw) for fn in (fusedvae.vae_loss, reference.vae_loss)]
    for got, exp in zip(*outs):
        torch.testing.assert_close(got, exp, equal_nan=True)
    grads = [torch.autograd.grad(o.loss.sum(), leaves, allow_unused=True) for o in outs]
    for got, exp in zip(*grads):
        exp = torch.zeros_like(got) if exp is None else exp
        torch.testing.assert_close(got, exp, equal_nan=True)

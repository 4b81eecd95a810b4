"""The torch.ops.fusedvae ops called directly: torch.library.opcheck (schemas,
fake kernels, autograd registration) and their outputs against the reference.
The opcheck of every op also runs on each device (``device`` fixture).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fusedvae import reference
from helpers import F32, F64, RTOL64, make_inputs

ops = torch.ops.fusedvae


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


def test_opcheck_on_device(device):
    inp = make_inputs("bernoulli", True, F32, (8,), batch=4, sample_shape=(3, 17, 19), device=device)
    x = inp.recon.clone().requires_grad_()
    scale = (0.3 * torch.randn(x.shape, dtype=F32)).to(device).requires_grad_()
    for likelihood, logits in itertools.product(["bernoulli", "cbernoulli"], [True, False]):
        xx = x if logits else torch.sigmoid(x.detach()).requires_grad_()
        torch.library.opcheck(ops.recon_loss, (xx, inp.target, None, likelihood, logits))
    torch.library.opcheck(ops.recon_loss, (x, inp.target, scale, "gaussian", True))
    torch.library.opcheck(ops.recon_loss, (x, inp.target, None, "squared_error", True))
    mu, lv = inp.mu.clone().requires_grad_(), inp.logvar.clone().requires_grad_()
    torch.library.opcheck(ops.gaussian_kl, (mu, lv))
    torch.library.opcheck(ops.gaussian_kl_per_dim, (mu, lv))
    torch.library.opcheck(ops.cb_log_normalizer, (x,))

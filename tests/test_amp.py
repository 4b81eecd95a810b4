"""Mixed precision: torch.autocast and torch.amp.GradScaler around the fused loss.

Under autocast the decoder output and the latents come out in the low-precision
dtype; the fused loss reads them as they are (no cast for a uint8 target) and
returns float32. Checked against two references:

- the *same* low-precision tensors upcast and evaluated by ``fusedvae.reference``
  (the loss itself adds only float32 accumulation error: rtol 1e-5);
- the float32 model: the stated tolerance is
  ``|loss_lp - loss_fp32| <= 1e-2 * |loss_fp32| + 2e-3 * (N + J)`` nats — 1 % plus
  bf16's unit roundoff 2^-9 for each of the N data and J latent elements of a
  sample — and parameter gradients within 5 % in norm.

Every test runs on each device (``device`` fixture): CPU and CUDA autocast, in
bfloat16 and float16, and the float16 GradScaler.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fusedvae
from fusedvae import reference
from helpers import TINY_LATENT, TinyConvVAE, on_cpu_float64, tiny_batch

N, J = 64, TINY_LATENT
LIKELIHOODS = [("bernoulli", None), ("cbernoulli", None), ("gaussian", None), ("gaussian", "optimal")]
LIK_IDS = ["bernoulli", "cbernoulli", "gaussian", "gaussian-optimal"]


def _model(device="cpu", scale=1.0):
    torch.manual_seed(0)
    model = TinyConvVAE()
    if scale != 1.0:  # large logits: the last layer's weights scaled up
        with torch.no_grad():
            model.dec[-1].weight.mul_(scale)
            model.dec[-1].bias.fill_(scale / 4)
    return model.to(device)


def _forward(model, x, target, eps, lik, log_scale, autocast_dtype=None, device="cpu"):
    if autocast_dtype is None:
        recon, mu, logvar = model(x, eps)
        return recon, mu, logvar, fusedvae.vae_loss(recon, target, mu, logvar, likelihood=lik, log_scale=log_scale)
    with torch.autocast(device, dtype=autocast_dtype):
        recon, mu, logvar = model(x, eps)
        out = fusedvae.vae_loss(recon, target, mu, logvar, likelihood=lik, log_scale=log_scale)
    return recon, mu, logvar, out


def _tolerance(loss32):
    return 1e-2 * loss32.abs() + 2e-3 * (N + J)


def _check_against_fp32_and_reference(model, batch, lik, log_scale, dtype, device):
    x, target, eps = batch
    recon, mu, logvar, out = _forward(model, x, target, eps, lik, log_scale, dtype, device)
    assert recon.dtype == dtype and mu.dtype == dtype and logvar.dtype == dtype
    assert out.loss.dtype == out.rec.dtype == out.kl.dtype == torch.float32
    _, _, _, out32 = _forward(model, x, target, eps, lik, log_scale, device=device)
    assert bool(torch.isfinite(out32.loss))
    assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(out.rec).all())
    # the loss of exactly these low-precision tensors
    exp = reference.vae_loss(*(on_cpu_float64(v.detach()) for v in (recon, target, mu, logvar)),
                             likelihood=lik, log_scale=log_scale)
    torch.testing.assert_close(out.loss.double().cpu(), exp.loss, rtol=1e-5, atol=1e-5 * (N + J))
    torch.testing.assert_close(out.rec.double().cpu(), exp.rec, rtol=1e-5, atol=1e-5 * N)
    # and close to the float32 model
    err = (out.loss - out32.loss).abs()
    assert err <= _tolerance(out32.loss), f"{dtype} loss {out.loss.item()} vs float32 {out32.loss.item()}"
    return out, out32


@pytest.mark.parametrize("uint8", [True, False], ids=["uint8-target", "float-target"])
@pytest.mark.parametrize("lik,log_scale", LIKELIHOODS, ids=LIK_IDS)
def test_bf16_autocast_loss(device, lik, log_scale, uint8):
    model = _model(device)
    batch = [t.to(device) for t in tiny_batch(16, uint8, seed=1)]
    _check_against_fp32_and_reference(model, batch, lik, log_scale, torch.bfloat16, device)


@pytest.mark.parametrize("lik", ["bernoulli", "cbernoulli"])
def test_bf16_autocast_large_logits_stay_finite(device, lik):
    # logits in the hundreds: float32 is finite, so bf16 (same exponent range) must be too
    model = _model(device, scale=200.0)
    x, target, eps = (t.to(device) for t in tiny_batch(16, True, seed=2))
    recon, _, _, out = _forward(model, x, target, eps, lik, None, torch.bfloat16, device)
    assert recon.abs().max() > 50
    _check_against_fp32_and_reference(model, (x, target, eps), lik, None, torch.bfloat16, device)


@pytest.mark.parametrize("lik,log_scale", LIKELIHOODS, ids=LIK_IDS)
def test_bf16_autocast_gradients(device, lik, log_scale):
    model = _model(device)
    model32 = copy.deepcopy(model)
    x, target, eps = (t.to(device) for t in tiny_batch(16, True, seed=3))
    recon, _, _, out = _forward(model, x, target, eps, lik, log_scale, torch.bfloat16, device)
    recon.retain_grad()
    out.loss.backward()
    assert recon.grad.dtype == torch.bfloat16
    _, _, _, out32 = _forward(model32, x, target, eps, lik, log_scale, device=device)
    out32.loss.backward()
    for (name, p), p32 in zip(model.named_parameters(), model32.parameters()):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        rel = (p.grad - p32.grad).norm() / p32.grad.norm().clamp_min(1e-12)
        assert rel < 5e-2, f"{name}: bf16 gradient off by {rel:.3g} in norm"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_autocast_low_precision(device, dtype):
    model = _model(device)
    x, target, eps = (t.to(device) for t in tiny_batch(16, True, seed=4))
    for lik, log_scale in LIKELIHOODS:
        _check_against_fp32_and_reference(model, (x, target, eps), lik, log_scale, dtype, device)


def test_grad_scaler_fp16(device):
    """float16 autocast + GradScaler: unscaled gradients match float32, steps happen,
    and an overflowing scale gives inf gradients that the scaler detects and skips."""
    model = _model(device)
    model32 = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt32 = torch.optim.SGD(model32.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=1000)
    for step in range(3):
        x, target, eps = (t.to(device) for t in tiny_batch(32, True, seed=10 + step))
        opt.zero_grad(set_to_none=True)
        opt32.zero_grad(set_to_none=True)
        _, _, _, out = _forward(model, x, target, eps, "bernoulli", None, torch.float16, device)
        assert out.loss.dtype == torch.float32
        scaler.scale(out.loss).backward()
        scaler.unscale_(opt)
        _, _, _, out32 = _forward(model32, x, target, eps, "bernoulli", None, device=device)
        out32.loss.backward()
        for (name, p), p32 in zip(model.named_parameters(), model32.parameters()):
            rel = (p.grad - p32.grad).norm() / p32.grad.norm().clamp_min(1e-12)
            assert rel < 2e-2, f"step {step} {name}: fp16 gradient off by {rel:.3g} in norm"
        scaler.step(opt)
        scaler.update()
        opt32.step()
        assert scaler.get_scale() == 2.0**12, "a finite step must not back off the scale"

    # A scale that overflows float16: the fused backward writes inf into the
    # float16 decoder gradient (not garbage, not a silent clamp), the scaler finds
    # it, skips the step and halves the scale.
    before = [p.detach().clone() for p in model.parameters()]
    huge = torch.amp.GradScaler(device, init_scale=2.0**40)
    x, target, eps = (t.to(device) for t in tiny_batch(32, True, seed=99))
    opt.zero_grad(set_to_none=True)
    recon, _, _, out = _forward(model, x, target, eps, "bernoulli", None, torch.float16, device)
    recon.retain_grad()
    huge.scale(out.loss).backward()
    assert recon.grad.dtype == torch.float16
    assert not bool(torch.isfinite(recon.grad).all())
    huge.step(opt)
    huge.update()
    assert huge.get_scale() == 2.0**39
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b), "the overflowing step must be skipped"

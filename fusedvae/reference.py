"""The pure-PyTorch reference: the definition of what every fused path computes.

Written for reading, not for speed: each formula appears as in the papers it
cites, on whole tensors, in the accumulation dtype (float32 for float16,
bfloat16 and float32 inputs, float64 for float64). Its gradients are
PyTorch's autograd of these formulas. The fused ops are tested against it.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from ._checks import Beta, LogScale


class VAELossOutput(NamedTuple):
    """What :func:`fusedvae.vae_loss` returns.

    Attributes:
        loss: the objective, reduced as asked (shape ``[]``, or ``[B]`` for
            ``reduction="none"``).
        rec: per-sample reconstruction negative log-likelihood Σ_i ℓ(x_i, t_i), shape ``[B]``.
        kl: per-sample KL(q(z|x) || N(0, I)), shape ``[B]``, without free bits or β.
    """

    loss: Tensor
    rec: Tensor
    kl: Tensor


def continuous_bernoulli_log_normalizer(logits: Tensor) -> Tensor:
    """log C(η) = log(η / tanh(η/2)), C(0) = 2 (Loaiza-Ganem & Cunningham, 2019).

    Stable form with a = |η|: log a − log(1 − e^{−a}) + log(1 + e^{−a}); for
    a < 1e-3 the series log 2 + η²/12 − 7η⁴/1440.
    """
    eta2 = logits * logits
    series = math.log(2.0) + eta2 / 12 - 7 * eta2 * eta2 / 1440
    small = logits.abs() < 1e-3
    # The closed form is evaluated on a safe value where the series is used,
    # so that its gradient there is finite and torch.where can discard it.
    a = torch.where(small, torch.ones_like(logits), logits.abs())
    closed = torch.log(a) - torch.log(-torch.expm1(-a)) + torch.log1p(torch.exp(-a))
    return torch.where(small, series, closed)


def _bernoulli_probs_nll(p: Tensor, t: Tensor) -> Tensor:
    # Each log clamped at -100, as torch.nn.functional.binary_cross_entropy does.
    log_p = torch.clamp(torch.log(p), min=-100)
    log_1mp = torch.clamp(torch.log1p(-p), min=-100)
    return -(t * log_p + (1 - t) * log_1mp)


def _bernoulli_logits_nll(x: Tensor, t: Tensor) -> Tensor:
    # -(t·log σ(x) + (1-t)·log(1-σ(x))) = (1-t)·x - log σ(x); its autograd is σ(x) - t everywhere.
    return (1 - t) * x - F.logsigmoid(x)


def _elementwise_nll(x: Tensor, t: Tensor, likelihood: str, logits: bool, log_scale) -> Tensor:
    if likelihood == "bernoulli":
        if logits:
            return _bernoulli_logits_nll(x, t)
        return _bernoulli_probs_nll(x, t)
    if likelihood == "cbernoulli":
        if logits:
            eta = x
            bce = _bernoulli_logits_nll(x, t)
        else:
            eta = torch.clamp(torch.log(x), min=-100) - torch.clamp(torch.log1p(-x), min=-100)
            bce = _bernoulli_probs_nll(x, t)
        return bce - continuous_bernoulli_log_normalizer(eta)
    # Gaussian N(t; x, σ²) with σ = exp(s).
    s = log_scale
    return 0.5 * ((t - x) / torch.exp(s)) ** 2 + s + 0.5 * math.log(2 * math.pi)


def _optimal_log_scale(x: Tensor, t: Tensor) -> Tensor:
    # σ-VAE (Rybkin et al. 2021): σ² = MSE over the whole batch, log σ softly
    # clipped from below: s = s_min + softplus(s_raw - s_min).
    s_raw = 0.5 * torch.log(((t - x) ** 2).mean())
    s_min = _checks.OPTIMAL_LOG_SCALE_MIN
    return s_min + F.softplus(s_raw - s_min)


def vae_loss(
    recon: Tensor,
    target: Tensor,
    mu: Tensor,
    logvar: Tensor,
    *,
    likelihood: str = "bernoulli",
    logits: bool = True,
    beta: Beta = 1.0,
    reduction: str = "batchmean",
    log_scale: LogScale = None,
    free_bits: float = 0.0,
    validate: bool = False,
) -> VAELossOutput:
    """Reference implementation of :func:`fusedvae.vae_loss` (same arguments, same result)."""
    _checks.check_vae_loss_args(
        recon, target, mu, logvar, likelihood, logits, beta, reduction, log_scale, free_bits, validate
    )
    # Computed in the accumulation dtype of the promoted floating inputs.
    dtype = recon.dtype
    for other in (target, log_scale):
        if isinstance(other, Tensor) and other.dtype.is_floating_point and other.dim() > 0:
            dtype = torch.promote_types(dtype, other.dtype)
    dtype = _checks.accumulate_dtype(dtype)
    x = recon.to(dtype)
    t = target.to(dtype) / 255 if target.dtype == torch.uint8 else target.to(dtype)
    batch = x.shape[0]

    s = None
    if likelihood == "gaussian":
        if log_scale is None:
            s = torch.zeros((), dtype=dtype, device=x.device)
        elif isinstance(log_scale, str):
            s = _optimal_log_scale(x, t)
        elif isinstance(log_scale, Tensor):
            s = log_scale.to(device=x.device, dtype=dtype)
        else:
            s = torch.tensor(float(log_scale), dtype=dtype, device=x.device)

    nll = _elementwise_nll(x, t, likelihood, logits, s)
    rec = nll.reshape(batch, _checks.per_sample_size(recon)).sum(dim=1)

    # Diagonal Gaussian posterior against N(0, I) (Kingma & Welling 2014, App. B).
    m = mu.to(_checks.accumulate_dtype(torch.promote_types(mu.dtype, logvar.dtype)))
    lv = logvar.to(m.dtype)
    kl_per_dim = 0.5 * (m**2 + torch.exp(lv) - 1 - lv)
    kl_per_dim = kl_per_dim.reshape(batch, _checks.per_sample_size(mu))
    kl = kl_per_dim.sum(dim=1)

    if free_bits > 0:
        # Free bits (Kingma et al. 2016): each dimension's batch-mean KL counts
        # as at least free_bits nats; the same batch-level term for every sample.
        kl_term = torch.clamp(kl_per_dim.mean(dim=0), min=free_bits).sum().expand(batch)
    else:
        kl_term = kl

    if reduction == "mean":
        per_sample = rec / _checks.per_sample_size(recon) + beta * kl_term / _checks.per_sample_size(mu)
    else:
        per_sample = rec + beta * kl_term
    if reduction == "none":
        loss = per_sample
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample.mean()
    return VAELossOutput(loss, rec, kl)

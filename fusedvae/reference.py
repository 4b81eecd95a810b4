"""The pure-PyTorch reference: the definition of what every fused path computes.

Written for reading, not for speed: each formula appears as in the papers it
cites, on whole tensors, in the accumulation dtype (float32 for float16,
bfloat16 and float32 inputs, float64 for float64). Its gradients are
PyTorch's autograd of these formulas. The fused ops are tested against it.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from ._checks import Beta, FreeBits, Latent, LogScale, OptionalLatent


class VAELossOutput(NamedTuple):
    """What :func:`fusedvae.vae_loss` returns.

    Attributes:
        loss: the objective, reduced as asked (shape ``[]``, or ``[B]`` for
            ``reduction="none"``).
        rec: per-sample reconstruction negative log-likelihood Σ_i ℓ(x_i, t_i), shape ``[B]``.
        kl: per-sample KL(q(z|x) || p(z)), shape ``[B]``, summed over latent groups,
            without free bits or β; p(z) = N(0, I) unless a prior is given.
    """

    loss: Tensor
    rec: Tensor
    kl: Tensor


class AutoencoderKLLossOutput(NamedTuple):
    """What :func:`fusedvae.autoencoder_kl_loss` returns: four 0-d tensors.

    Attributes:
        loss: ``weighted_nll + kl_weight * kl``.
        nll: Σ nll / B, without ``weights`` (the term latent diffusion's adaptive
            GAN weight is computed from).
        weighted_nll: Σ weights·nll / B (``nll`` itself when ``weights`` is None).
        kl: Σ KL / B, the posterior's KL to N(0, I) per sample, averaged.
    """

    loss: Tensor
    nll: Tensor
    weighted_nll: Tensor
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
    s = log_scale
    if likelihood == "laplace":
        # Laplace(t; x, b) with b = exp(s): |t - x|/b + log(2b).
        return torch.abs(t - x) * torch.exp(-s) + s + math.log(2)
    # Gaussian N(t; x, σ²) with σ = exp(s).
    return 0.5 * ((t - x) / torch.exp(s)) ** 2 + s + 0.5 * math.log(2 * math.pi)


def _optimal_log_scale(x: Tensor, t: Tensor, likelihood: str, weight: Optional[Tensor]) -> Tensor:
    # The batch's (weighted) maximum-likelihood scale (σ-VAE, Rybkin et al.
    # 2021): σ² = MSE for the Gaussian, b = mean |t - x| for the Laplace, means
    # weighted by `weight`; its log softly clipped from below:
    # s = s_min + softplus(s_raw - s_min).
    residual = torch.abs(t - x) if likelihood == "laplace" else (t - x) ** 2
    if weight is None:
        mean = residual.mean()
    else:
        mean = (weight * residual).sum() / weight.expand_as(residual).sum()
    s_raw = torch.log(mean) if likelihood == "laplace" else 0.5 * torch.log(mean)
    s_min = _checks.OPTIMAL_LOG_SCALE_MIN
    return s_min + F.softplus(s_raw - s_min)


def gaussian_kl(
    mu: Latent,
    logvar: Latent,
    prior_mu: OptionalLatent = None,
    prior_logvar: OptionalLatent = None,
    *,
    free_bits: FreeBits = 0.0,
) -> Tensor:
    """Reference implementation of :func:`fusedvae.gaussian_kl` (same arguments, same result)."""
    latents = _checks.check_latents(mu, logvar, prior_mu, prior_logvar, free_bits)
    return _kl_terms(latents)[1]


def _kl_terms(latents: _checks.LatentGroups):
    """(kl, kl_term), each ``[B]``: the KL summed over the groups, and the term the
    loss uses, where free bits replace a group's KL by Σ_j max(λ, mean_b kl_bj)."""
    tensors = [t for group in zip(latents.mu, latents.logvar, latents.prior_mu, latents.prior_logvar)
               for t in group if t is not None]
    dtype = _checks.accumulate_dtype(functools.reduce(torch.promote_types, [t.dtype for t in tensors]))
    batch = latents.mu[0].shape[0]
    kl = kl_term = 0
    for m, lv, pm, plv, lam in zip(*latents[:5]):
        m, lv = m.to(dtype), lv.to(dtype)
        if pm is None:
            # KL(N(μ, e^lv) || N(0, I)) (Kingma & Welling 2014, App. B).
            per_dim = 0.5 * (m**2 + torch.exp(lv) - 1 - lv)
        else:
            # KL(N(μ, e^lv) || N(μp, e^lvp)) between diagonal Gaussians.
            pm, plv = pm.to(dtype), plv.to(dtype)
            per_dim = 0.5 * (plv - lv + (torch.exp(lv) + (m - pm) ** 2) / torch.exp(plv) - 1)
        per_dim = per_dim.reshape(batch, _checks.per_sample_size(m))
        group_kl = per_dim.sum(dim=1)
        kl = kl + group_kl
        if lam > 0:
            # Free bits (Kingma et al. 2016): each dimension's batch-mean KL counts
            # as at least λ nats; the same batch-level term for every sample.
            kl_term = kl_term + torch.clamp(per_dim.mean(dim=0), min=lam).sum().expand(batch)
        else:
            kl_term = kl_term + group_kl
    return kl, kl_term


def vae_loss(
    recon: Tensor,
    target: Tensor,
    mu: Latent,
    logvar: Latent,
    *,
    likelihood: str = "bernoulli",
    logits: bool = True,
    beta: Beta = 1.0,
    reduction: str = "batchmean",
    log_scale: LogScale = None,
    free_bits: FreeBits = 0.0,
    weight: Optional[Tensor] = None,
    validate: bool = False,
    prior_mu: OptionalLatent = None,
    prior_logvar: OptionalLatent = None,
    bits: int = 8,
) -> VAELossOutput:
    """Reference implementation of :func:`fusedvae.vae_loss` (same arguments, same result)."""
    latents = _checks.check_vae_loss_args(
        recon, target, mu, logvar, likelihood, logits, beta, reduction, log_scale, free_bits, validate,
        weight, prior_mu, prior_logvar, bits,
    )
    kl, kl_term = _kl_terms(latents)
    if likelihood == "dmol":
        rec = discretized_mix_logistic_nll(recon, target, bits=bits, log_scale_min=_checks.DMOL_LOG_SCALE_MIN)
        loss = objective_from_terms(rec, kl_term, beta, reduction, _checks.per_sample_size(target), latents.size)
        return VAELossOutput(loss, rec, kl)
    # Computed in the accumulation dtype of the promoted floating inputs.
    dtype = recon.dtype
    for other in (target, log_scale, weight):
        if isinstance(other, Tensor) and other.dtype.is_floating_point and other.dim() > 0:
            dtype = torch.promote_types(dtype, other.dtype)
    dtype = _checks.accumulate_dtype(dtype)
    x = recon.to(dtype)
    t = target.to(dtype) / 255 if target.dtype == torch.uint8 else target.to(dtype)
    batch = x.shape[0]

    s = None
    if likelihood in _checks.SCALED_LIKELIHOODS:
        if log_scale is None:
            s = torch.zeros((), dtype=dtype, device=x.device)
        elif isinstance(log_scale, str):
            s = _optimal_log_scale(x, t, likelihood, None if weight is None else weight.to(dtype))
        elif isinstance(log_scale, Tensor):
            s = log_scale.to(device=x.device, dtype=dtype)
        else:
            s = torch.tensor(float(log_scale), dtype=dtype, device=x.device)

    nll = _elementwise_nll(x, t, likelihood, logits, s)
    if weight is not None:
        nll = nll * weight.to(dtype)
    rec = nll.reshape(batch, _checks.per_sample_size(recon)).sum(dim=1)

    loss = objective_from_terms(rec, kl_term, beta, reduction, _checks.per_sample_size(recon), latents.size)
    return VAELossOutput(loss, rec, kl)


def objective_from_terms(rec: Tensor, kl_term: Tensor, beta: Beta, reduction: str, n: int, j: int) -> Tensor:
    """The loss from the per-sample terms (``n`` data and ``j`` latent elements per
    sample): ``reduce_b(rec_b + β·kl_term_b)``, or with ``reduction="mean"``
    ``mean_b(rec_b/n + β·kl_term_b/j)``."""
    if reduction == "mean":
        per_sample = rec / n + beta * kl_term / j
    else:
        per_sample = rec + beta * kl_term
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()


def autoencoder_kl_loss(
    inputs: Tensor,
    reconstructions: Tensor,
    posterior_mean: Tensor,
    posterior_logvar: Tensor,
    logvar,
    *,
    kl_weight: Beta = 1e-6,
    perceptual: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
) -> AutoencoderKLLossOutput:
    """Reference implementation of :func:`fusedvae.autoencoder_kl_loss`: the
    objective of latent diffusion's autoencoder (Rombach et al. 2022; CompVis
    ``LPIPSWithDiscriminator``) without its GAN term, written out term by term."""
    _checks.check_autoencoder_kl_args(
        inputs, reconstructions, posterior_mean, posterior_logvar, logvar, kl_weight, perceptual, weights
    )
    dtype = _checks.accumulate_dtype(torch.promote_types(inputs.dtype, reconstructions.dtype))
    x, t = reconstructions.to(dtype), inputs.to(dtype)
    batch = x.shape[0]
    rec = torch.abs(t - x)
    if perceptual is not None:
        rec = rec + perceptual.to(dtype).reshape((batch,) + (1,) * (x.dim() - 1))
    lv = logvar.to(device=x.device, dtype=dtype) if isinstance(logvar, Tensor) else float(logvar)
    nll = rec / (torch.exp(lv) if isinstance(lv, Tensor) else math.exp(lv)) + lv
    weighted = nll if weights is None else weights.to(dtype) * nll
    weighted_nll = weighted.sum() / batch
    nll_sum = nll.sum() / batch
    # The posterior's log-variance clamped to [-30, 20], as latent diffusion's
    # DiagonalGaussianDistribution does; the KL of N(μ, e^lv) to N(0, I).
    m = posterior_mean.to(_checks.accumulate_dtype(torch.promote_types(posterior_mean.dtype, posterior_logvar.dtype)))
    lv_z = torch.clamp(posterior_logvar.to(m.dtype), -30.0, 20.0)
    kl = (0.5 * (m**2 + torch.exp(lv_z) - 1 - lv_z)).sum() / batch
    return AutoencoderKLLossOutput(weighted_nll + kl_weight * kl, nll_sum, weighted_nll, kl)


def discretized_mix_logistic_nll(
    params: Tensor, target: Tensor, *, bits: int = 8, log_scale_min: float = -7.0
) -> Tensor:
    r"""Per-sample negative log-likelihood, in nats, of images under a discretized
    mixture of K logistics (PixelCNN++, Salimans et al. 2017), with exact bin
    probabilities.

    For a pixel with colour channels c and mixture components k, with
    ``s = exp(-log_scale)`` and bin half-width ``h = 1 / (2**bits - 1)``:

    .. math::
        P_{kc} = \sigma(s (x_c - m_{kc} + h)) - \sigma(s (x_c - m_{kc} - h))

    in the interior, ``σ(s (x_c - m + h))`` below ``x_c < -0.999`` and
    ``1 - σ(s (x_c - m - h))`` above ``x_c > 0.999``; the pixel's likelihood is
    ``Σ_k softmax(π)_k Π_c P_kc``. Where PixelCNN++ replaces a bin probability
    below 1e-5 by the mid-bin density, this computes the difference of sigmoids
    exactly: log(σ(a) - σ(b)) = -softplus(-a) - softplus(b) + log(1 - e^{b-a})
    (the identity σ(a) - σ(b) = σ(a)·(1 - σ(b))·(1 - e^{b-a})).

    Args:
        params (Tensor): ``[B, 10K, H, W]`` for an RGB target (``[B, 3K, H, W]`` for
            one channel), in any layout (a channels-last view of a ``[B, H, W, 10K]``
            decoder output included): ``params[:, :K]`` are the mixture logits π;
            ``params[:, K:].view(B, C, 3K, H, W)`` (``2K`` for one channel) holds for
            channel c the means ``[:, c, :K]``, the log-scales ``[:, c, K:2K]``
            (clamped below at ``log_scale_min``, with a zero gradient at and below it)
            and, for RGB, the raw coupling
            coefficients ``[:, c, 2K:3K]``, ``tanh`` applied, in PixelCNN++'s order:
            green-on-red, blue-on-red, blue-on-green.
        target (Tensor): ``[B, C, H, W]`` images with C = 3 or 1: floating point in
            [-1, 1], or uint8 pixels read as ``v / 127.5 - 1``.
        bits (int): bits per subpixel; the bin half-width is ``1 / (2**bits - 1)``.
        log_scale_min (float): the clamp of the log-scales.

    Returns:
        Tensor: the ``[B]`` per-sample negative log-likelihoods, in the accumulation
        dtype of ``params`` (float32, float64 for float64).
    """
    k = _checks.check_dmol_args(params, target, bits, log_scale_min)
    channels = target.shape[1]
    per_k = 10 if channels == 3 else 3
    batch, _, height, width = target.shape
    dtype = _checks.accumulate_dtype(params.dtype)
    p = params.to(dtype)
    x = target.to(dtype) / 127.5 - 1 if target.dtype == torch.uint8 else target.to(dtype)

    logit_probs = p[:, :k]                                            # [B, K, H, W]
    rest = p[:, k:].reshape(batch, channels, (per_k - 1) // channels, k, height, width)
    means = rest[:, :, 0]                                             # [B, C, K, H, W]
    # torch.clamp(min=)'s value, with a gradient of zero at the bound itself as well as
    # below it; torch.clamp's own gradient at the bound is 1 up to torch 2.13 and 0
    # from 2.14, and the answer must not depend on the release. NaN stays NaN.
    raw_log_scales = rest[:, :, 1]
    log_scales = torch.where(raw_log_scales <= log_scale_min, log_scale_min, raw_log_scales)
    xc = x.unsqueeze(2)                                               # [B, C, 1, H, W]
    if channels == 3:
        coeffs = torch.tanh(rest[:, :, 2])  # rows: green-on-red, blue-on-red, blue-on-green
        red, green = xc[:, 0], xc[:, 1]
        means = torch.stack(
            (
                means[:, 0],
                means[:, 1] + coeffs[:, 0] * red,
                means[:, 2] + coeffs[:, 1] * red + coeffs[:, 2] * green,
            ),
            dim=1,
        )
    half_width = 1.0 / (2**bits - 1)
    inv_scale = torch.exp(-log_scales)
    upper = inv_scale * (xc - means + half_width)
    lower = inv_scale * (xc - means - half_width)
    # softplus as logaddexp(v, 0): exact for every v, where F.softplus returns v
    # itself above its threshold of 20 (an error of e^-20 ≈ 2e-9).
    zero = torch.zeros((), dtype=dtype, device=p.device)
    log_cdf_upper = -torch.logaddexp(-upper, zero)                    # log σ(upper)
    log_sf_lower = -torch.logaddexp(lower, zero)                      # log(1 - σ(lower))
    # log(σ(a) - σ(b)) with a - b = 2·h·s > 0, without cancellation.
    log_bin = log_cdf_upper + log_sf_lower + torch.log(-torch.expm1(lower - upper))
    log_prob = torch.where(xc < -0.999, log_cdf_upper, torch.where(xc > 0.999, log_sf_lower, log_bin))
    log_mix = log_prob.sum(dim=1) + torch.log_softmax(logit_probs, dim=1)  # [B, K, H, W]
    return -torch.logsumexp(log_mix, dim=1).flatten(1).sum(dim=1)

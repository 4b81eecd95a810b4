"""The fused VAE objective: :func:`vae_loss` and its helpers."""
from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import _checks
from ._checks import Beta, FreeBits, Latent, LatentGroups, LogScale, OptionalLatent
from ._ops import ops
from .reference import AutoencoderKLLossOutput, VAELossOutput, objective_from_terms

__all__ = [
    "AutoencoderKLLossOutput",
    "VAELossOutput",
    "autoencoder_kl_loss",
    "vae_loss",
    "continuous_bernoulli_log_normalizer",
    "continuous_bernoulli_mean",
    "discretized_mix_logistic_nll",
    "gaussian_kl",
    "normalized_beta",
    "unnormalized_beta",
]


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
    r"""The VAE objective -ELBO = reconstruction NLL + β·KL, fused.

    For each sample ``b`` (``N`` elements of ``recon[b]``, ``J`` of ``mu[b]``):

    .. math::
        \text{rec}_b = \sum_{i=1}^{N} \ell(x_{bi}, t_{bi}), \qquad
        \text{kl}_b = \sum_{j=1}^{J} \tfrac12\left(\mu_{bj}^2 + e^{\text{lv}_{bj}} - 1 - \text{lv}_{bj}\right)

    and the loss is ``reduce_b(rec_b + beta * kl_b)``. The reconstruction term
    reads ``recon`` and ``target`` once in the forward pass and once in the
    backward pass, which writes the gradient once; β, the reduction and any
    upstream gradient act on the ``[B]`` vectors. On the CPU, when a float32 or
    float64 ``recon`` requires grad and no log-scale is shared by the batch, the
    forward computes ``recon``'s gradient for ``loss.backward()`` in the same
    pass (allocating it then, and holding it until the backward). That backward
    returns it as it is, bitwise the two-pass result; any other upstream
    gradients scale it in place per sample (within 2 float ulps of the two-pass
    result, bitwise where the scale factors are powers of two).

    Hierarchical VAEs (VDVAE, NVAE) pass their latent groups as sequences
    (``mu=[mu_1, mu_2, ...]``, shapes free) and each group's learned prior as
    ``prior_mu``/``prior_logvar``; ``kl_b`` is then the sum over groups of
    :func:`gaussian_kl`'s terms and ``J`` the latent elements of all groups.
    With ``likelihood="dmol"`` the reconstruction term is
    :func:`discretized_mix_logistic_nll` of ``recon`` (the mixture's parameters)
    and ``target`` (the image), and ``N`` is the target's elements per sample.

    Args:
        recon (Tensor): decoder output of shape ``[B, ...]``; logits (``logits=True``),
            probabilities, or the Gaussian mean / Laplace median. float32, float64, float16 or bfloat16,
            in any layout (channels_last and other batch-outermost dense layouts run
            without a copy; other strides are copied first).
        target (Tensor): data of the shape of ``recon``: floating point, uint8 pixels
            that are read as ``value / 255``, or bool. It receives no gradient. The kernels
            read ``target`` (and a per-element ``log_scale``) in its own dtype, with no
            promoted copy: a bfloat16 ``recon`` against float32 images costs no more
            memory than matched dtypes. A float64 tensor anywhere (``target``, ``log_scale``,
            ``mu`` or ``logvar``) makes the whole computation float64; ``rec`` and ``kl``
            come back in the dtypes PyTorch's type promotion gives their own inputs.
        mu (Tensor or sequence of Tensors): posterior mean, ``[B, ...]`` (a flat ``[B, J]``
            code or a spatial latent), or one such tensor per latent group.
        logvar (Tensor or sequence of Tensors): posterior log-variance, shaped like ``mu``.
        likelihood (str, optional): ``'bernoulli'`` | ``'cbernoulli'`` (continuous
            Bernoulli, Loaiza-Ganem & Cunningham 2019) | ``'gaussian'``:
            ``ℓ = ((t - x)/σ)²/2 + log σ + log(2π)/2`` | ``'laplace'``:
            ``ℓ = |t - x|/b + log b + log 2`` (the L1 loss with a learned scale, as the
            autoencoders of latent diffusion train; the gradient of ``|t - x|`` at
            ``t = x`` is 0, as :func:`torch.abs`'s) | ``'dmol'``: the discretized
            mixture of logistics of PixelCNN++ (:func:`discretized_mix_logistic_nll`, with
            ``recon`` its ``[B, 10K, H, W]`` parameters, ``target`` the ``[B, 3, H, W]``
            image, ``bits`` and a log-scale clamp of -7; ``logits`` is ignored, ``log_scale``
            and ``weight`` are not taken). Default: ``'bernoulli'``.
        logits (bool, optional): for the Bernoulli likelihoods, whether ``recon`` holds
            logits (stable for every finite value) or probabilities (each log clamped at
            -100 and the gradient divided by ``max(p(1-p), 1e-12)``, as
            :func:`torch.nn.functional.binary_cross_entropy`). Default: ``True``.
        beta (float or Tensor, optional): weight of the KL term; a 0-d tensor can be changed
            in place by a schedule with no recompilation or host sync. Default: ``1.0``.
        reduction (str, optional): ``'batchmean'``: mean over the batch of per-sample sums
            (the negative ELBO per sample) | ``'sum'`` | ``'mean'``: mean over the batch of
            ``rec_b / N + beta * kl_b / J``, so ``beta`` is the normalised β of Higgins et al.
            (see :func:`normalized_beta`) | ``'none'``: the ``[B]`` per-sample losses.
            Default: ``'batchmean'``.
        log_scale (float, Tensor or str, optional): Gaussian and Laplace only: the log-scale
            s = log σ (Gaussian) or log b (Laplace). A float; a 0-d tensor (learnable); a
            tensor broadcastable to ``recon`` (heteroscedastic decoder, or per channel as
            ``[1, C, 1, 1]``); or ``'optimal'``: the batch's maximum-likelihood scale, σ² the
            batch MSE (σ-VAE, Rybkin et al. 2021) or b the batch's mean ``|t - x|``, with s
            softly clipped below at -6. Default: ``None``, meaning a scale of 1.
        free_bits (float or sequence of floats, optional): free bits λ in nats per latent
            dimension (Kingma et al. 2016): the KL term becomes ``Σ_j max(λ, mean_b kl_bj)``,
            the same for every sample; with latent groups, one λ for all or one per group,
            each applied to its group's dimensions. Default: ``0.0``.
        weight (Tensor, optional): a floating-point tensor broadcastable to ``recon``
            (per sample ``[B, 1, 1, 1]``, per channel ``[1, C, 1, 1]``, per pixel) that
            multiplies each element's ℓ in ``rec``, as ``weight`` does in
            :func:`torch.nn.functional.binary_cross_entropy`. The kernels read it where it
            lies, without expanding it to ``recon``'s size. It receives no gradient. With
            ``reduction="mean"`` the per-sample sums are still divided by N; with
            ``log_scale="optimal"`` the scale is the weighted maximum-likelihood one
            (σ² = Σ w·r²/Σ w, b = Σ w·|r|/Σ w). Default: ``None``.
        validate (bool, optional): check that Bernoulli targets (and probabilities) lie in
            ``[0, 1]``; this syncs with the device. Default: ``False``.
        prior_mu (Tensor, sequence of Tensors or None, optional): the mean of each group's
            prior N(prior_mu, exp(prior_logvar)), broadcastable to its ``mu`` (a top-down
            prior ``[B, ...]``, or a learned ``[1, ...]``) and differentiable; ``None`` (for
            all groups, or in place of one group's) means N(0, I). Default: ``None``.
        prior_logvar (Tensor, sequence of Tensors or None, optional): the prior's
            log-variance, given with ``prior_mu``. Default: ``None``.
        bits (int, optional): ``likelihood="dmol"`` only: bits per subpixel. Default: ``8``.

    Returns:
        VAELossOutput: ``(loss, rec, kl)``; ``rec`` and ``kl`` are the per-sample ``[B]``
        terms (``kl`` summed over groups, without β or free bits), all differentiable. Results are float32
        (float64 for float64 inputs), whatever the input precision.

    Example::

        >>> recon_logits = decoder(z)            # [B, 3, 64, 64]
        >>> out = fusedvae.vae_loss(recon_logits, images, mu, logvar, beta=4.0)
        >>> out.loss.backward()
    """
    latents = _checks.check_vae_loss_args(
        recon, target, mu, logvar, likelihood, logits, beta, reduction, log_scale, free_bits, validate,
        weight, prior_mu, prior_logvar, bits,
    )
    if latents.grouped or latents.has_prior or likelihood == "dmol":
        return _grouped_vae_loss(recon, target, latents, likelihood, logits, beta, reduction, log_scale, weight,
                                 bits)
    free_bits = latents.free_bits[0]
    in_dtypes = (recon.dtype, target.dtype, mu.dtype, logvar.dtype)
    recon, target, log_scale, mu, logvar, weight = _as_read(recon, target, log_scale, mu, logvar, weight)
    scale_tensor = log_scale if isinstance(log_scale, Tensor) else None
    optimal = isinstance(log_scale, str)
    scale_value = float(log_scale) if not (optimal or scale_tensor is not None or log_scale is None) else 0.0
    beta_tensor = beta if isinstance(beta, Tensor) else None
    beta_value = 0.0 if beta_tensor is not None else float(beta)
    loss, rec, kl, _ = _vae_loss_op(
        recon, target, mu, logvar, scale_tensor, beta_tensor, likelihood, logits, reduction,
        scale_value, optimal, beta_value, float(free_bits), weight,
    )
    if recon.dtype == torch.float64 and torch.float64 not in in_dtypes[:2]:
        rec = rec.float()  # computed in float64 for the latents' sake; rec's own inputs are narrower
    if recon.dtype == torch.float64 and torch.float64 not in in_dtypes[2:]:
        kl = kl.float()
    return VAELossOutput(loss, rec, kl)


_vae_loss_op = ops.vae_loss.default
_gaussian_kl_op = ops.gaussian_kl.default
_dmol_nll_op = ops.dmol_nll.default


def _kl_terms(latents: LatentGroups):
    """The fused KL over the groups: (kl, kl_term), each ``[B]``."""
    prior_mu, prior_logvar = [], []
    if latents.has_prior:
        for m, pm, plv in zip(latents.mu, latents.prior_mu, latents.prior_logvar):
            # A group without a prior compares with N(0, I); a broadcast prior is
            # expanded here, so autograd sums its gradient over the broadcast.
            prior_mu.append(_shaped_like(pm, m))
            prior_logvar.append(_shaped_like(plv, m))
    kl, kl_term, _ = _gaussian_kl_op(latents.mu, latents.logvar, prior_mu, prior_logvar, latents.free_bits)
    return kl, kl_term


def _shaped_like(prior: Optional[Tensor], mu: Tensor) -> Tensor:
    if prior is None:
        return mu.new_zeros(mu.shape)
    return prior if prior.shape == mu.shape else prior.expand(mu.shape)


def _grouped_vae_loss(recon, target, latents, likelihood, logits, beta, reduction, log_scale, weight, bits):
    """vae_loss over latent groups, learned priors or a per-pixel likelihood: the
    reconstruction's and the KL's fused ops, combined on the ``[B]`` vectors."""
    if likelihood == "dmol":
        rec = _dmol_nll_op(recon, target, bits, _checks.DMOL_LOG_SCALE_MIN)
        n = _checks.per_sample_size(target)
    else:
        # The objective op with an empty latent gives rec alone.
        empty = recon.new_empty((recon.shape[0], 0), dtype=_checks.accumulate_dtype(recon.dtype))
        in_dtypes = (recon.dtype, target.dtype)
        recon, target, log_scale, empty, _, weight = _as_read(recon, target, log_scale, empty, empty, weight)
        scale_tensor = log_scale if isinstance(log_scale, Tensor) else None
        optimal = isinstance(log_scale, str)
        scale_value = float(log_scale) if not (optimal or scale_tensor is not None or log_scale is None) else 0.0
        _, rec, _, _ = _vae_loss_op(
            recon, target, empty, empty, scale_tensor, None, likelihood, logits, "sum", scale_value, optimal,
            0.0, 0.0, weight,
        )
        if rec.dtype == torch.float64 and torch.float64 not in in_dtypes:
            rec = rec.float()  # computed in float64 for a float64 log_scale or weight; rec's data are narrower
        n = _checks.per_sample_size(recon)
    kl, kl_term = _kl_terms(latents)
    return VAELossOutput(objective_from_terms(rec, kl_term, beta, reduction, n, latents.size), rec, kl)


def gaussian_kl(
    mu: Latent,
    logvar: Latent,
    prior_mu: OptionalLatent = None,
    prior_logvar: OptionalLatent = None,
    *,
    free_bits: FreeBits = 0.0,
) -> Tensor:
    r"""Per-sample KL divergence between diagonal Gaussians, summed over latent groups, fused.

    For each group, a posterior :math:`N(\mu, e^{v})` and a prior
    :math:`N(\mu_p, e^{v_p})` (N(0, I) where none is given):

    .. math::
        \text{kl}_{bj} = \tfrac12\left(v_{p} - v + \frac{e^{v} + (\mu - \mu_p)^2}{e^{v_p}} - 1\right)

    summed over the group's dimensions and over the groups: the KL term of
    hierarchical VAEs with learned top-down priors (Sønderby et al. 2016,
    "Ladder variational autoencoders"; Vahdat & Kautz 2020, NVAE; Child 2021,
    VDVAE). Every group goes through one fused op, forward and backward, and
    one autograd node; a broadcast prior is expanded to its group's shape (a
    copy) and a group without a prior compares with zeros of its shape.

    Args:
        mu (Tensor or sequence of Tensors): posterior mean of each group, ``[B, ...]``;
            the groups' shapes may differ beyond the batch dimension.
        logvar (Tensor or sequence of Tensors): posterior log-variance, shaped like ``mu``.
        prior_mu (Tensor, sequence of Tensors or None, optional): the prior's mean per group,
            broadcastable to that group's ``mu``; ``None`` (for all groups, or one group's
            entry) means N(0, I). Default: ``None``.
        prior_logvar (Tensor, sequence of Tensors or None, optional): the prior's
            log-variance, given with ``prior_mu``. Default: ``None``.
        free_bits (float or sequence of floats, optional): free bits λ in nats per latent
            dimension (Kingma et al. 2016), one for all groups or one per group. A group with
            λ > 0 contributes ``Σ_j max(λ, mean_b kl_bj)`` over its dimensions, the same for
            every sample, in place of its KL: the term a loss should use. Default: ``0.0``.

    Returns:
        Tensor: the ``[B]`` per-sample KL (with free bits, the KL term), float32 (float64
        where any input is float64).

    Example::

        >>> # q_i = N(mu_i, e^{logvar_i}), p_i = N(pmu_i, e^{plogvar_i}): one group per resolution
        >>> kl = fusedvae.gaussian_kl([mu_1, mu_2], [logvar_1, logvar_2], [pmu_1, pmu_2], [plogvar_1, plogvar_2])
        >>> loss = (nll + kl).mean()
    """
    latents = _checks.check_latents(mu, logvar, prior_mu, prior_logvar, free_bits)
    return _kl_terms(latents)[1]


def _as_read(recon: Tensor, target: Tensor, log_scale, mu: Tensor, logvar: Tensor, weight: Optional[Tensor]):
    """The tensors in the dtypes the op reads them in (``ObjectiveProblem`` in
    csrc/kernels.h): each as it is, with float32 sums, and no copy; but float64
    anywhere makes every floating one float64 (float64 sums, as PyTorch's type
    promotion gives); mu and logvar share a dtype; and a per-element log σ of a
    dtype other than recon's or float32 is read as float32.
    """
    full_scale = log_scale if isinstance(log_scale, Tensor) and log_scale.dim() > 0 else None
    wide = (
        torch.float64 in (recon.dtype, target.dtype, mu.dtype, logvar.dtype)
        or (full_scale is not None and full_scale.dtype == torch.float64)
        or (weight is not None and weight.dtype == torch.float64)
    )
    if wide:
        recon, target, full_scale, mu, logvar = (
            t.double() if t is not None and t.dtype.is_floating_point else t
            for t in (recon, target, full_scale, mu, logvar)
        )
    elif mu.dtype != logvar.dtype:
        mu, logvar = _promote(mu, logvar)
    if full_scale is not None:
        if full_scale.dtype not in (recon.dtype, torch.float32):
            full_scale = full_scale.float()
        log_scale = full_scale
    return recon, target, log_scale, mu, logvar, weight


def _promote(*tensors):
    """Cast the floating tensors among ``tensors`` to their common dtype.

    PyTorch's type promotion; uint8 targets and ``None`` pass through unchanged.
    """
    dtypes = [t.dtype for t in tensors if t is not None and t.dtype.is_floating_point]
    common = functools.reduce(torch.promote_types, dtypes)
    return tuple(
        t.to(common) if t is not None and t.dtype.is_floating_point else t for t in tensors
    )


def autoencoder_kl_loss(
    inputs: Tensor,
    reconstructions: Tensor,
    posterior_mean: Tensor,
    posterior_logvar: Tensor,
    logvar: Union[float, Tensor],
    *,
    kl_weight: Beta = 1e-6,
    perceptual: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
) -> AutoencoderKLLossOutput:
    r"""The objective latent diffusion's autoencoder trains with, less its GAN term, fused.

    For inputs :math:`x` and reconstructions :math:`\hat x` of shape ``[B, ...]``
    (``N`` elements per sample), a posterior :math:`N(\mu, e^{v_z})` over a latent
    of ``J`` elements per sample, and one scalar log-variance :math:`v` (``logvar``):

    .. math::
        \text{nll}_{bi} = \frac{|x_{bi} - \hat x_{bi}| + p_b}{e^{v}} + v, \qquad
        \text{kl}_b = \sum_j \tfrac12\left(\mu_{bj}^2 + e^{c_{bj}} - 1 - c_{bj}\right),
        \quad c = \operatorname{clamp}(v_z, -30, 20)

    ``weighted_nll = Σ w·nll / B``, ``nll = Σ nll / B``, ``kl = Σ_b kl_b / B`` and
    ``loss = weighted_nll + kl_weight * kl``: ``LPIPSWithDiscriminator`` of latent
    diffusion (Rombach et al. 2022; CompVis ``ldm/modules/losses/contperceptual.py``)
    before its GAN term, with the posterior of its ``DiagonalGaussianDistribution``.
    Without ``perceptual`` the nll is a Laplace likelihood with scale :math:`e^{v}`
    less its constant ``log 2``, and the pixels' work is one call of
    :func:`vae_loss` (``likelihood="laplace"``, ``log_scale=logvar``,
    ``beta=kl_weight``): one read of ``inputs`` and ``reconstructions`` forward, one
    backward, and the gradient written once. The perceptual term, the constant and
    the weights' sums act on ``[B]`` vectors. With ``weights`` the unweighted ``nll``
    takes a second pass over the pixels (its own value and gradient).

    How latent diffusion's configs map onto the arguments:

    - ``kl_weight``: the config's ``kl_weight`` (``1e-6`` in the released
      autoencoders: β on per-sample sums; see docs/weighting.md for what it means
      per latent element against per-pixel L1).
    - ``logvar``: the loss's ``logvar`` parameter, initialised to the config's
      ``logvar_init`` (0). :class:`fusedvae.AutoencoderKLLoss` holds it as a parameter.
      The gradient drives :math:`e^{v}` to the batch's mean ``|x - x̂| + p``; note that
      CompVis's ``AutoencoderKL.configure_optimizers`` does not give it to the
      optimizer, so there it stays at ``logvar_init``.
    - ``perceptual``: ``perceptual_weight * LPIPS(inputs, reconstructions)`` per sample,
      computed by the caller (no network is bundled).
    - The GAN term, ``disc_factor`` and the adaptive weight stay with the caller:
      ``loss + d_weight * disc_factor * g_loss``, where latent diffusion computes
      ``d_weight`` from the gradient norms of ``nll`` and ``g_loss`` at the decoder's
      last layer, so ``nll`` is returned differentiable.

    Args:
        inputs (Tensor): the images, ``[B, ...]``, floating point (latent diffusion
            scales them to ``[-1, 1]``). It receives no gradient.
        reconstructions (Tensor): the decoder's output, of the shape of ``inputs``,
            floating point, any layout ``vae_loss`` takes.
        posterior_mean (Tensor): the posterior's mean, ``[B, ...]`` (e.g. ``[B, 4, h, w]``).
        posterior_logvar (Tensor): its log-variance before the clamp, of the shape of
            ``posterior_mean``. The gradient is zero outside ``[-30, 20]``, as
            :func:`torch.clamp`'s.
        logvar (float or Tensor): :math:`v`, a float or a 0-d tensor (learnable).
        kl_weight (float or Tensor, optional): a float ``>= 0`` or a 0-d tensor.
            Default: ``1e-6``.
        perceptual (Tensor, optional): a per-sample term added to ``|x - x̂|`` before
            the scaling, shape ``[B]`` or ``[B, 1, ..., 1]``; differentiable.
            Default: ``None``.
        weights (Tensor, optional): broadcastable to ``inputs``, multiplying each
            element's nll in ``weighted_nll``; no gradient. Default: ``None``.

    Returns:
        AutoencoderKLLossOutput: ``(loss, nll, weighted_nll, kl)``, 0-d tensors, all
        differentiable; float32 (float64 for float64 inputs).

    Example::

        >>> posterior = vae.encode(images).latent_dist        # diffusers.AutoencoderKL
        >>> recon = vae.decode(posterior.sample()).sample
        >>> out = fusedvae.autoencoder_kl_loss(images, recon, posterior.mean, posterior.logvar,
        ...                                    logvar_param, perceptual=0.5 * lpips(images, recon))
        >>> out.loss.backward()
    """
    _checks.check_autoencoder_kl_args(
        inputs, reconstructions, posterior_mean, posterior_logvar, logvar, kl_weight, perceptual, weights
    )
    batch = reconstructions.shape[0]
    n = _checks.per_sample_size(reconstructions)
    clamped_logvar = torch.clamp(posterior_logvar, -30.0, 20.0)
    loss, rec, kl = vae_loss(
        reconstructions, inputs, posterior_mean, clamped_logvar, likelihood="laplace",
        log_scale=logvar, beta=kl_weight, weight=weights,
    )
    # vae_loss's Laplace ℓ is latent diffusion's nll + log 2 per (weighted) element;
    # p_b/e^v is summed over the sample's (weighted) elements.
    if isinstance(logvar, Tensor):
        inv_scale = torch.exp(-logvar.to(device=rec.device, dtype=rec.dtype))
    else:
        inv_scale = math.exp(-logvar)
    if weights is None:
        correction = -math.log(2.0) * n
        if perceptual is not None:
            correction = correction + n * inv_scale * perceptual.reshape(batch).mean()
        weighted_nll = rec.mean() + correction
        return AutoencoderKLLossOutput(loss + correction, weighted_nll, weighted_nll, kl.mean())

    weight_sums = _per_sample_sums(weights, reconstructions.shape, rec.dtype)
    correction = -math.log(2.0) * weight_sums.mean()
    plain_correction = -math.log(2.0) * n
    if perceptual is not None:
        p = perceptual.reshape(batch)
        correction = correction + inv_scale * (p * weight_sums).mean()
        plain_correction = plain_correction + n * inv_scale * p.mean()
    # The unweighted nll: the same pixels without weights; the latent gets its
    # gradient from the call above only.
    plain_rec = vae_loss(
        reconstructions, inputs, posterior_mean.detach(), clamped_logvar.detach(),
        likelihood="laplace", log_scale=logvar, beta=0.0,
    ).rec
    return AutoencoderKLLossOutput(
        loss + correction, plain_rec.mean() + plain_correction, rec.mean() + correction, kl.mean()
    )


def _per_sample_sums(weights: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Σ_i w_bi over each sample of ``weights`` broadcast to ``shape``, as a ``[B]``
    vector, without expanding ``weights``: each of its elements stands for
    ``N / (its per-sample element count)`` elements of a sample."""
    batch = shape[0]
    n = math.prod(shape[1:])
    w = weights.reshape((1,) * (len(shape) - weights.dim()) + tuple(weights.shape))
    per_sample = math.prod(w.shape[1:])
    if n == 0:
        return torch.zeros(batch, dtype=dtype, device=weights.device)
    copies = n // per_sample
    if w.shape[0] == batch:
        return w.reshape(batch, per_sample).sum(dim=1, dtype=dtype) * copies
    return (w.sum(dtype=dtype) * copies).expand(batch)


def discretized_mix_logistic_nll(
    params: Tensor, target: Tensor, *, bits: int = 8, log_scale_min: float = -7.0
) -> Tensor:
    r"""Per-sample negative log-likelihood, in nats, of images under a discretized
    mixture of K logistics (PixelCNN++, Salimans et al. 2017), fused.

    The likelihood of VDVAE's, NVAE's and PixelCNN++'s decoders. For a pixel with
    colour channels c and mixture components k, with ``s = exp(-log_scale)`` and
    bin half-width ``h = 1 / (2**bits - 1)``, each channel's bin probability is

    .. math::
        P_{kc} = \sigma(s (x_c - m_{kc} + h)) - \sigma(s (x_c - m_{kc} - h))

    (``σ(s (x_c - m + h))`` for ``x_c < -0.999``, ``1 - σ(s (x_c - m - h))`` for
    ``x_c > 0.999``), the means of green and blue coupled to the pixel's red (and
    green) values, and the pixel's likelihood ``Σ_k softmax(π)_k Π_c P_kc``. Where
    PixelCNN++ replaces a bin probability below 1e-5 by the mid-bin density, the
    difference of sigmoids is computed exactly in log space. One kernel reads each
    pixel's parameters once forward, once backward, and writes the gradient once
    (the only full-size allocation). On the CPU, when float32 or float64
    ``params`` require grad, the forward computes the gradient in the same pass
    (allocating it then, and holding it until the backward) and the backward
    scales it in place by the output's gradient (not where that is 1
    everywhere, as for ``nll.sum()``), with bitwise the same result: one pass
    over the pixels per step instead of two. On CUDA the forward keeps each
    pixel's NLL (``[B, H, W]``), and the backward, given it, evaluates each
    component once and writes the scaled gradient.
    :func:`fusedvae.reference.discretized_mix_logistic_nll` is the same function in
    plain PyTorch.

    Args:
        params (Tensor): ``[B, 10K, H, W]`` for an RGB target (``[B, 3K, H, W]`` for one
            channel): ``params[:, :K]`` are the mixture logits;
            ``params[:, K:].view(B, C, 3K, H, W)`` (``2K`` for one channel) holds for
            channel c the means ``[:, c, :K]``, the log-scales ``[:, c, K:2K]`` (clamped
            below at ``log_scale_min``, with a zero gradient at and below it)
            and, for RGB, the raw coupling coefficients ``[:, c, 2K:3K]`` (``tanh``
            applied) in PixelCNN++'s order: green-on-red, blue-on-red, blue-on-green.
            float32, float64, float16 or bfloat16. Read where it lies when dense
            NCHW or channels-last (a VDVAE-style ``[B, H, W, 10K]`` output permuted to
            ``[B, 10K, H, W]``), otherwise copied first.
        target (Tensor): ``[B, C, H, W]`` images, C = 3 or 1: floating point in
            ``[-1, 1]``, or uint8 pixels read as ``v / 127.5 - 1``. No gradient.
        bits (int, optional): bits per subpixel. Default: ``8``.
        log_scale_min (float, optional): the lower clamp of the log-scales.
            Default: ``-7.0``.

    Returns:
        Tensor: the ``[B]`` per-sample negative log-likelihoods, float32 (float64
        for float64 ``params``), differentiable with respect to ``params``.

    Example::

        >>> params = decoder(z)                          # [B, 100, 32, 32], K = 10
        >>> nll = fusedvae.discretized_mix_logistic_nll(params, images_uint8)
        >>> (nll.mean() + kl.mean()).backward()
    """
    _checks.check_dmol_args(params, target, bits, log_scale_min)
    return ops.dmol_nll(params, target, bits, float(log_scale_min))


def continuous_bernoulli_log_normalizer(logits: Tensor) -> Tensor:
    r"""Log-normaliser of the continuous Bernoulli, elementwise and differentiable.

    .. math::
        \log C(\eta) = \log\frac{\eta}{\tanh(\eta/2)}, \qquad C(0) = 2

    (Loaiza-Ganem & Cunningham, 2019), with ``eta`` the logits. Accurate to a few
    ulps over every finite input, including the region around 0 where the closed
    form cancels (a Taylor series is used for ``|eta| < 1``) and large ``|eta|``
    where ``torch.distributions.ContinuousBernoulli`` saturates in float32.

    Args:
        logits (Tensor): η, any shape, a floating dtype.

    Returns:
        Tensor: log C(η), of the shape and dtype of ``logits``.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    return ops.cb_log_normalizer(logits)


def continuous_bernoulli_mean(logits: Tensor) -> Tensor:
    r"""Mean of the continuous Bernoulli with logits η (λ = sigmoid(η)), computed stably.

    The textbook form is :math:`\frac{\lambda}{2\lambda - 1} + \frac{1}{2\,\mathrm{atanh}(1 - 2\lambda)}`
    (Loaiza-Ganem & Cunningham, 2019), which is 0/0 at λ = 1/2. With
    :math:`2\lambda - 1 = \tanh(\eta/2)` and :math:`\mathrm{atanh}(1 - 2\lambda) = -\eta/2`
    it is :math:`\frac{1}{1 - e^{-\eta}} - \frac{1}{\eta}`; we evaluate that with
    ``expm1`` in float64, and for :math:`|\eta| < 10^{-3}` the series
    :math:`\tfrac12 + \eta/12 - \eta^3/720` (next term :math:`\eta^5/30240`). The mean
    is 1/2 at η = 0, tends to :math:`-1/\eta` as η → −∞ and to :math:`1 - 1/\eta` as η → +∞.

    The decoder's λ = sigmoid(η) is *not* the mean of the distribution: it is pushed
    towards 0 and 1 (a CB with λ = 0.3 has mean 0.43, one with λ = 0.9 has mean 0.67), so showing λ as the
    reconstruction makes images look too contrasted -- a known mistake.

    Args:
        logits (Tensor): η, any shape, a floating dtype.

    Returns:
        Tensor: the mean, of the shape and dtype of ``logits``. Differentiable (plain
        PyTorch operations).
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    eta = logits.double()
    small = eta.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(eta), eta)
    direct = 1.0 / (-torch.expm1(-safe)) - 1.0 / safe
    series = 0.5 + eta / 12.0 - eta.pow(3) / 720.0
    return torch.where(small, series, direct).to(logits.dtype)


def normalized_beta(beta: float, latent_dim: int, input_dim: int) -> float:
    r"""β_norm = β·J/N (Higgins et al., 2017): the KL weight to use with per-element means.

    ``reduction="mean"`` with ``beta=normalized_beta(β, J, N)`` has the gradients
    of ``reduction="batchmean"`` with ``beta=β``, scaled by ``1/N``.

    Args:
        beta: the KL weight of the per-sample-sum objective.
        latent_dim: J, elements of one sample's latent code.
        input_dim: N, elements of one sample's data.
    """
    _check_dims(latent_dim, input_dim)
    return beta * latent_dim / input_dim


def unnormalized_beta(beta_norm: float, latent_dim: int, input_dim: int) -> float:
    r"""The inverse of :func:`normalized_beta`: β = β_norm·N/J."""
    _check_dims(latent_dim, input_dim)
    return beta_norm * input_dim / latent_dim


def _check_dims(latent_dim: int, input_dim: int) -> None:
    for name, value in (("latent_dim", latent_dim), ("input_dim", input_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")

"""nn.Module form of the fused loss, in the style of torch.nn's losses."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._args import check_finite
from ._checks import Beta, FreeBits, Latent, LogScale, OptionalLatent
from .functional import AutoencoderKLLossOutput, VAELossOutput, autoencoder_kl_loss, vae_loss


class VAELoss(nn.Module):
    r"""The VAE objective as a module: ``VAELoss(**options)(recon, target, mu, logvar)``.

    Takes the keyword options of :func:`fusedvae.vae_loss` and stores them as
    attributes. A float ``beta`` may be reassigned between steps
    (``loss_fn.beta = 0.5``); a tensor ``beta`` is a buffer, which follows
    :meth:`~torch.nn.Module.to` and is updated in place (``loss_fn.beta.fill_(0.5)``,
    or a schedule's ``write_``), so compiled code sees the new value without
    recompiling. A tensor ``log_scale`` is kept as given: an ``nn.Parameter``
    (a learned decoder variance) is a parameter of this module, any other
    tensor a buffer.

    Shape:
        - recon, target: ``[B, ...]`` (for ``likelihood="dmol"``, ``[B, 10K, H, W]`` and ``[B, 3, H, W]``)
        - mu, logvar: ``[B, ...]``, or one such tensor per latent group; ``prior_mu`` and
          ``prior_logvar`` (optional) likewise, as :func:`fusedvae.vae_loss` takes them
        - Output: :class:`fusedvae.VAELossOutput` ``(loss, rec, kl)``; ``rec`` and ``kl``
          are ``[B]``, ``loss`` is ``[]`` or ``[B]`` for ``reduction='none'``.

    Example::

        >>> loss_fn = fusedvae.VAELoss(beta=4.0, reduction="batchmean")
        >>> loss, rec, kl = loss_fn(recon_logits, images, mu, logvar)
    """

    def __init__(
        self,
        *,
        likelihood: str = "bernoulli",
        logits: bool = True,
        beta: Beta = 1.0,
        reduction: str = "batchmean",
        log_scale: LogScale = None,
        free_bits: FreeBits = 0.0,
        validate: bool = False,
        bits: int = 8,
    ) -> None:
        super().__init__()
        self.likelihood = likelihood
        self.logits = logits
        self.reduction = reduction
        self.free_bits = free_bits
        self.validate = validate
        self.bits = bits
        if isinstance(beta, Tensor):
            self.register_buffer("beta", beta)
        else:
            self.beta = beta
        if isinstance(log_scale, Tensor) and not isinstance(log_scale, nn.Parameter):
            self.register_buffer("log_scale", log_scale)
        else:
            self.log_scale = log_scale

    def forward(
        self,
        recon: Tensor,
        target: Tensor,
        mu: Latent,
        logvar: Latent,
        weight: Optional[Tensor] = None,
        prior_mu: OptionalLatent = None,
        prior_logvar: OptionalLatent = None,
    ) -> VAELossOutput:
        return vae_loss(
            recon,
            target,
            mu,
            logvar,
            weight=weight,
            likelihood=self.likelihood,
            logits=self.logits,
            beta=self.beta,
            reduction=self.reduction,
            log_scale=self.log_scale,
            free_bits=self.free_bits,
            validate=self.validate,
            prior_mu=prior_mu,
            prior_logvar=prior_logvar,
            bits=self.bits,
        )

    def extra_repr(self) -> str:
        return (
            f"likelihood={self.likelihood!r}, logits={self.logits}, reduction={self.reduction!r}, "
            f"free_bits={self.free_bits}"
        )


class AutoencoderKLLoss(nn.Module):
    r"""Latent diffusion's autoencoder objective as a module, holding its ``logvar``.

    ``AutoencoderKLLoss(kl_weight=1e-6, logvar_init=0.0)(inputs, reconstructions,
    posterior_mean, posterior_logvar, perceptual=None, weights=None)`` calls
    :func:`fusedvae.autoencoder_kl_loss` with ``logvar`` a 0-d ``nn.Parameter``
    initialised to ``logvar_init``, as ``LPIPSWithDiscriminator`` holds it (give
    ``loss_fn.parameters()`` to the optimizer to learn it). A float ``kl_weight``
    may be reassigned between steps; a tensor ``kl_weight`` is a buffer, updated in
    place by a schedule.

    Args:
        kl_weight (float or Tensor, optional): weight of the KL term. Default: ``1e-6``.
        logvar_init (float, optional): the initial ``logvar``. Default: ``0.0``.

    Shape:
        - inputs, reconstructions: ``[B, ...]``
        - posterior_mean, posterior_logvar: ``[B, ...]``
        - perceptual: ``[B]`` or ``[B, 1, ..., 1]``; weights: broadcastable to ``inputs``
        - Output: :class:`fusedvae.AutoencoderKLLossOutput` ``(loss, nll, weighted_nll, kl)``,
          0-d tensors.

    Example::

        >>> loss_fn = fusedvae.AutoencoderKLLoss(kl_weight=1e-6)
        >>> opt = torch.optim.Adam([*vae.parameters(), *loss_fn.parameters()], lr=1e-4)
        >>> posterior = vae.encode(images).latent_dist
        >>> out = loss_fn(images, vae.decode(posterior.sample()).sample, posterior.mean, posterior.logvar)
        >>> out.loss.backward()
    """

    def __init__(self, *, kl_weight: Beta = 1e-6, logvar_init: float = 0.0) -> None:
        super().__init__()
        self.logvar = nn.Parameter(torch.tensor(check_finite(logvar_init, "logvar_init")))
        if isinstance(kl_weight, Tensor):
            self.register_buffer("kl_weight", kl_weight)
        else:
            self.kl_weight = kl_weight

    def forward(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior_mean: Tensor,
        posterior_logvar: Tensor,
        perceptual: Optional[Tensor] = None,
        weights: Optional[Tensor] = None,
    ) -> AutoencoderKLLossOutput:
        return autoencoder_kl_loss(
            inputs,
            reconstructions,
            posterior_mean,
            posterior_logvar,
            self.logvar,
            kl_weight=self.kl_weight,
            perceptual=perceptual,
            weights=weights,
        )

    def extra_repr(self) -> str:
        kl_weight = self.kl_weight if not isinstance(self.kl_weight, Tensor) else "tensor"
        return f"kl_weight={kl_weight}"

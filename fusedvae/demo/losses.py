"""The per-element-mean loss users often write, and the β's it amounts to in ``fusedvae.vae_loss``."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["classic_mistake_loss", "mistake_equivalent_beta"]


def classic_mistake_loss(recon_logits: Tensor, target: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """What users often write: per-element mean BCE plus the KL summed over latent dims.

    ``F.binary_cross_entropy_with_logits(x, t, reduction="mean") + kl.sum(1).mean()``.
    Equals ``fusedvae.vae_loss(..., reduction="mean", beta=J)`` (see
    :func:`mistake_equivalent_beta`), i.e. ``1/N`` times the per-sample-sum objective
    with β = N.
    """
    if target.dtype == torch.uint8:
        target = target.to(recon_logits.dtype) / 255
    bce = F.binary_cross_entropy_with_logits(recon_logits, target, reduction="mean")
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    return bce + kl.mean()


def mistake_equivalent_beta(latent_dim: int, input_dim: int) -> Tuple[float, float]:
    r"""The β's that the per-element-mean mistake amounts to.

    The mistake is :math:`\frac1B\sum_b(\text{rec}_b/N + \text{kl}_b)`. ``reduction="mean"``
    computes :math:`\frac1B\sum_b(\text{rec}_b/N + \beta\,\text{kl}_b/J)`, so the
    mistake is ``reduction="mean"`` with β = J; multiplied by N it is the
    per-sample-sum objective (``"batchmean"``) with β = N.

    Returns:
        ``(beta_for_mean_reduction, beta_for_batchmean) = (J, N)``.
    """
    return float(latent_dim), float(input_dim)

"""Test-set evaluation of a trained VAE: rate, distortion, per-dim KL, reconstructions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import vae_loss
from ..diagnostics import kl_per_dim
from .data import _as_float
from .models import ConvVAE, display_mean

__all__ = ["Evaluation", "decoder_mse", "evaluate"]


@dataclass
class Evaluation:
    """What :func:`evaluate` measures on a data set."""

    rec: float  # mean over the data of E_q[-log p(x|z)], nats per sample
    kl: float  # mean KL, nats per sample
    kl_dims: Tensor  # [J] mean KL of each latent dim
    mu: Tensor  # [B, J] posterior means
    recon: Tensor  # [B, C, H, W] mean of p(x | z = mu), in [0, 1]
    recon_lambda: Optional[Tensor] = None  # cbernoulli only: sigmoid(logits) (NOT the mean)
    mse: float = 0.0  # per-element MSE of ``recon`` against the data

    @property
    def neg_elbo(self) -> float:
        return self.rec + self.kl


@torch.no_grad()
def evaluate(model: ConvVAE, data: Tensor, likelihood: str, log_scale=None, samples: int = 4,
             seed: int = 1234, target: Optional[Tensor] = None) -> Evaluation:
    """Test-set rate and distortion: E_q[-log p(x|z)] estimated with ``samples`` draws of z.

    ``target`` (default: ``data``) is what the likelihood is evaluated on; the encoder
    always sees ``data``.
    """
    model.eval()
    target = data if target is None else target
    g = torch.Generator().manual_seed(seed)
    mu, logvar = model.encode(data)
    rec = torch.zeros(data.shape[0], dtype=torch.float64)
    for _ in range(samples):
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
        out = model.decode(z)
        rec += vae_loss(out, target, mu, logvar, likelihood=likelihood, reduction="none",
                                 log_scale=log_scale).rec.double()
    rec /= samples
    kl = kl_per_dim(mu, logvar)
    out_mu = model.decode(mu)
    recon = display_mean(out_mu, likelihood).float()
    model.train()
    return Evaluation(
        rec=rec.mean().item(), kl=kl.sum(1).double().mean().item(), kl_dims=kl.double().mean(0),
        mu=mu, recon=recon,
        recon_lambda=torch.sigmoid(out_mu) if likelihood == "cbernoulli" else None,
        mse=(recon - _as_float(data)).pow(2).mean().item(),
    )


@torch.no_grad()
def decoder_mse(model: ConvVAE, data: Tensor, seed: int = 4321) -> float:
    """Per-element MSE of the decoder mean at one posterior sample per image (the σ-VAE σ²)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    mu, logvar = model.encode(data)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
    mse = (model.decode(z) - _as_float(data)).pow(2).mean().item()
    model.train()
    return mse

"""The demo's model: a small convolutional VAE, and what to show as its reconstruction."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..functional import continuous_bernoulli_mean
from .data import _as_float

__all__ = ["ConvVAE", "display_mean"]


class ConvVAE(nn.Module):
    """A small convolutional VAE for ``[B, C, 16, 16]`` images.

    Encoder: two stride-2 convolutions (16 → 8 → 4) and a linear layer to (μ, log σ²).
    Decoder: a linear layer and two stride-2 transposed convolutions back to
    ``[B, C, 16, 16]``: logits for the Bernoulli likelihoods, the mean for the Gaussian.
    """

    def __init__(self, channels: int, latent_dim: int = 16, width: int = 32):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * 16, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * 16), nn.ReLU(),
            nn.Unflatten(1, (2 * width, 4, 4)),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
        )

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(_as_float(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, noise: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mu, logvar


def display_mean(out: Tensor, likelihood: str) -> Tensor:
    """What to show as the reconstruction: the mean of p(x|z) (clamped to [0, 1] for the Gaussian)."""
    if likelihood == "bernoulli":
        return torch.sigmoid(out)
    if likelihood == "cbernoulli":
        return continuous_bernoulli_mean(out)
    return out.clamp(0, 1)

"""Training a :class:`~fusedvae.demo.models.ConvVAE` with ``fusedvae.vae_loss`` and Adam."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import List

import torch
from torch import Tensor

from .. import vae_loss
from .models import ConvVAE

__all__ = ["RunConfig", "TrainResult", "train_vae"]


@dataclass
class RunConfig:
    """One training run: the loss's arguments, the model's latent size, the optimiser and the seed."""

    likelihood: str = "bernoulli"
    beta: float = 1.0
    reduction: str = "batchmean"
    log_scale: object = None
    latent_dim: int = 16
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    adam_eps: float = 1e-8
    seed: int = 0


@dataclass
class TrainResult:
    """The trained model, the loss at every step and the training time in seconds."""

    config: RunConfig
    model: ConvVAE
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0


def train_vae(train: Tensor, cfg: RunConfig, desc: str, progress: bool = True) -> TrainResult:
    """Train a :class:`ConvVAE` with ``fusedvae.vae_loss`` and Adam.

    The model's initial weights, the mini-batches and the reparameterisation noise
    all come from ``cfg.seed``, so two runs with the same seed see the same
    sequence of batches and noise.
    """
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    model = ConvVAE(train.shape[1], cfg.latent_dim)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    result = TrainResult(cfg, model)
    order = torch.randperm(train.shape[0], generator=g)
    pos = 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, leave=False, disable=not progress, mininterval=0.5,
               file=sys.stderr, dynamic_ncols=True)
    for _ in bar:
        if pos + cfg.batch_size > order.numel():
            order = torch.randperm(train.shape[0], generator=g)
            pos = 0
        x = train[order[pos:pos + cfg.batch_size]]
        pos += cfg.batch_size
        noise = torch.randn(x.shape[0], cfg.latent_dim, generator=g)
        out, mu, logvar = model(x, noise)
        loss = vae_loss(out, x, mu, logvar, likelihood=cfg.likelihood, beta=cfg.beta,
                                 reduction=cfg.reduction, log_scale=cfg.log_scale).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.losses.append(loss.item())
        if progress and len(result.losses) % 50 == 0:
            bar.set_postfix(loss=f"{result.losses[-1]:.4g}", refresh=False)
    bar.close()
    result.seconds = time.perf_counter() - t0
    return result

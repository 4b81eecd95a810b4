"""fusedvae: the VAE training objective in one fused forward and one fused backward.

Public API:
    vae_loss, VAELoss, VAELossOutput; autoencoder_kl_loss, AutoencoderKLLoss,
    AutoencoderKLLossOutput (latent diffusion's autoencoder objective);
    continuous_bernoulli_log_normalizer, continuous_bernoulli_mean,
    discretized_mix_logistic_nll (PixelCNN++'s likelihood), gaussian_kl (the KL
    to learned priors over latent groups), normalized_beta,
    unnormalized_beta; ``fusedvae.reference`` holds the
    pure-PyTorch definition every fused path is tested against.

Loss balancing and diagnostics, as submodules:
    ``fusedvae.schedules`` (LinearWarmup, SigmoidAnneal, CyclicalAnneal,
    CapacitySchedule), ``fusedvae.controllers`` (GECO, ControlVAE) and
    ``fusedvae.diagnostics`` (rate, distortion, elbo, bits_per_dim, kl_per_dim,
    active_units).
"""
from . import controllers, diagnostics, reference, schedules
from ._ops import has_cuda_kernels
from .functional import (
    AutoencoderKLLossOutput,
    VAELossOutput,
    autoencoder_kl_loss,
    continuous_bernoulli_log_normalizer,
    continuous_bernoulli_mean,
    discretized_mix_logistic_nll,
    gaussian_kl,
    normalized_beta,
    unnormalized_beta,
    vae_loss,
)
from .modules import AutoencoderKLLoss, VAELoss

__all__ = [
    "AutoencoderKLLoss",
    "AutoencoderKLLossOutput",
    "VAELoss",
    "VAELossOutput",
    "autoencoder_kl_loss",
    "continuous_bernoulli_log_normalizer",
    "continuous_bernoulli_mean",
    "controllers",
    "diagnostics",
    "discretized_mix_logistic_nll",
    "gaussian_kl",
    "has_cuda_kernels",
    "normalized_beta",
    "reference",
    "schedules",
    "unnormalized_beta",
    "vae_loss",
]

__version__ = "0.1.0"

"""Argument checks shared by :func:`fusedvae.vae_loss` and the reference.

Every error names the argument and says what was expected. Nothing here syncs
with the device unless ``validate=True`` asked for the range checks.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _C
from ._args import is_real

# The likelihood table of csrc/vae_math.h (math::Likelihoods): (name, form of
# recon, whether it takes a log-scale) per row; a name may have a logits and a
# probabilities row.
LIKELIHOOD_ROWS = _C.likelihoods
LIKELIHOODS = tuple(dict.fromkeys(name for name, _, _ in LIKELIHOOD_ROWS))
SCALED_LIKELIHOODS = tuple(dict.fromkeys(name for name, _, scaled in LIKELIHOOD_ROWS if scaled))
# The per-pixel likelihoods beside the per-element table: the discretized
# mixture of logistics (csrc/dmol.h), whose recon is the mixture's parameters.
PIXEL_LIKELIHOODS = ("dmol",)
REDUCTIONS = ("batchmean", "sum", "mean", "none")
# PixelCNN++'s clamp of the mixture's log-scales, the default of
# discretized_mix_logistic_nll and what vae_loss(likelihood="dmol") uses.
DMOL_LOG_SCALE_MIN = -7.0
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Lower soft clip on the log-scale for log_scale="optimal" (σ-VAE, Rybkin et al. 2021).
OPTIMAL_LOG_SCALE_MIN = -6.0

Beta = Union[float, Tensor]
LogScale = Union[None, float, str, Tensor]
Latent = Union[Tensor, Sequence[Tensor]]
OptionalLatent = Union[None, Tensor, Sequence[Optional[Tensor]]]
FreeBits = Union[float, Sequence[float]]


class LatentGroups(NamedTuple):
    """The latents of a KL, checked: one entry per group; a prior entry is None
    where that group's prior is N(0, I). ``grouped``: given as sequences."""

    mu: List[Tensor]
    logvar: List[Tensor]
    prior_mu: List[Optional[Tensor]]
    prior_logvar: List[Optional[Tensor]]
    free_bits: List[float]
    grouped: bool

    @property
    def has_prior(self) -> bool:
        for p in self.prior_mu:
            if p is not None:
                return True
        return False

    @property
    def size(self) -> int:
        """J, the latent elements per sample over every group."""
        return sum(per_sample_size(m) for m in self.mu)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32/float16/bfloat16 accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_finite(value) -> bool:
    # Not math.isfinite: under torch.compile(dynamic=True) a Python float argument
    # is traced as a symbolic float, and Dynamo cannot put math.isfinite of one in
    # the graph (a graph break; an error with fullgraph=True). Comparisons guard
    # instead. NaN fails both.
    return -math.inf < value < math.inf


def _check_tensor(value, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_float_tensor(value, name: str) -> None:
    _check_tensor(value, name)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float64, float16 or bfloat16), "
            f"got dtype {value.dtype}"
        )
    if value.dim() < 1:
        raise ValueError(f"{name} must have shape [batch, ...], got a 0-d tensor")


def _check_no_grad(value: Tensor, name: str) -> None:
    if value.requires_grad:
        raise ValueError(
            f"{name} must not require grad: the loss has no gradient with respect to {name} "
            f"(call {name}.detach())"
        )


def _check_device(value: Tensor, name: str, recon: Tensor, recon_name: str = "recon") -> None:
    if value.device != recon.device:
        raise ValueError(f"{name} must be on the device of {recon_name} ({recon.device}), got {value.device}")


def _check_scalar_tensor(value: Tensor, name: str, recon: Tensor, recon_name: str = "recon") -> None:
    if value.dim() != 0:
        raise ValueError(f"{name} must be a float or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != recon.device and value.device.type != "cpu":
        raise ValueError(
            f"{name} must be on the device of {recon_name} ({recon.device}) or the CPU, got {value.device}"
        )


def check_vae_loss_args(
    recon: Tensor,
    target: Tensor,
    mu: Latent,
    logvar: Latent,
    likelihood: str,
    logits: bool,
    beta: Beta,
    reduction: str,
    log_scale: LogScale,
    free_bits: FreeBits,
    validate: bool,
    weight: Optional[Tensor] = None,
    prior_mu: OptionalLatent = None,
    prior_logvar: OptionalLatent = None,
    bits: int = 8,
) -> LatentGroups:
    """Raise TypeError/ValueError for any argument vae_loss cannot take; return its latents."""
    if likelihood not in LIKELIHOODS + PIXEL_LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS + PIXEL_LIKELIHOODS}, got {likelihood!r}")
    if likelihood == "dmol":
        check_dmol_args(recon, target, bits, DMOL_LOG_SCALE_MIN, params_name="recon")
        if weight is not None:
            raise ValueError("weight is not supported with likelihood='dmol'")
    else:
        _check_float_tensor(recon, "recon")
        _check_tensor(target, "target")
        if not (target.dtype.is_floating_point or target.dtype in (torch.uint8, torch.bool)):
            raise TypeError(f"target must be a floating-point, uint8 or bool tensor, got dtype {target.dtype}")
        if target.shape != recon.shape:
            raise ValueError(
                f"target must have the shape of recon {tuple(recon.shape)}, got {tuple(target.shape)}"
            )
        _check_device(target, "target", recon)
        _check_no_grad(target, "target")
        if bits != 8:
            raise ValueError(f"bits is only used with likelihood='dmol', got bits={bits!r}")
    latents = check_latents(mu, logvar, prior_mu, prior_logvar, free_bits, recon)

    if not isinstance(logits, bool):
        raise TypeError(f"logits must be a bool, got {type(logits).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")

    if isinstance(beta, Tensor):
        _check_scalar_tensor(beta, "beta", recon)
    elif is_real(beta):
        if not (_is_finite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    else:
        raise TypeError(f"beta must be a float or a 0-d tensor, got {type(beta).__name__}")

    _check_log_scale(log_scale, likelihood, recon)
    _check_weight(weight, recon)

    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    if validate:
        _check_ranges(recon, target, likelihood, logits)
    return latents


def _as_list(value, name: str, allow_none: bool = False):
    """A tensor (one group) or a sequence of them, as (list, whether a sequence)."""
    if isinstance(value, Tensor) or (allow_none and value is None):
        return [value], False
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name} must hold at least one latent group, got an empty {type(value).__name__}")
        return list(value), True
    kinds = "a tensor, a sequence of tensors or None" if allow_none else "a tensor or a sequence of tensors"
    raise TypeError(f"{name} must be {kinds}, got {type(value).__name__}")


def check_latents(
    mu: Latent,
    logvar: Latent,
    prior_mu: OptionalLatent,
    prior_logvar: OptionalLatent,
    free_bits: FreeBits,
    recon: Optional[Tensor] = None,
) -> LatentGroups:
    """The posterior's (and prior's) latent groups, checked against each other
    and, where given, against recon's batch size and device."""
    if (isinstance(mu, Tensor) and isinstance(logvar, Tensor) and prior_mu is None and prior_logvar is None
            and not isinstance(free_bits, (list, tuple))):
        # One group against N(0, I), the common call: the same checks without the
        # bookkeeping of sequences.
        _check_free_bits(free_bits)
        _check_group(mu, logvar, None, None, "", recon, mu)
        return LatentGroups([mu], [logvar], [None], [None], [float(free_bits)], False)

    mus, grouped = _as_list(mu, "mu")
    logvars, _ = _as_list(logvar, "logvar")
    if len(logvars) != len(mus) or isinstance(logvar, Tensor) != isinstance(mu, Tensor):
        raise ValueError(f"logvar must hold one tensor per group of mu ({len(mus)}), got {_describe(logvar)}")
    prior_mus, _ = _as_list(prior_mu, "prior_mu", allow_none=True)
    prior_logvars, _ = _as_list(prior_logvar, "prior_logvar", allow_none=True)
    for name, value, values in (("prior_mu", prior_mu, prior_mus), ("prior_logvar", prior_logvar, prior_logvars)):
        if value is None:
            values[:] = [None] * len(mus)
        elif len(values) != len(mus) or isinstance(value, Tensor) != isinstance(mu, Tensor):
            raise ValueError(f"{name} must hold one entry per group of mu ({len(mus)}), got {_describe(value)}")

    if isinstance(free_bits, (list, tuple)):
        if len(free_bits) != len(mus):
            raise ValueError(f"free_bits must be a float or hold one value per group of mu ({len(mus)}), "
                             f"got {len(free_bits)} values")
        free_bits_list = list(free_bits)
    else:
        free_bits_list = [free_bits] * len(mus)
    for value in free_bits_list:
        _check_free_bits(value)

    for g in range(len(mus)):
        _check_group(mus[g], logvars[g], prior_mus[g], prior_logvars[g], f"[{g}]" if grouped else "", recon, mus[0])
    return LatentGroups(mus, logvars, prior_mus, prior_logvars, [float(v) for v in free_bits_list], grouped)


def _check_free_bits(value) -> None:
    if not is_real(value):
        raise TypeError(f"free_bits must be a float or a sequence of floats, got {type(value).__name__}")
    if not (_is_finite(value) and value >= 0):
        raise ValueError(f"free_bits must be a finite number >= 0 (nats per latent dimension), got {value}")


def _check_group(mu: Tensor, logvar: Tensor, prior_mu: Optional[Tensor], prior_logvar: Optional[Tensor], at: str,
                 recon: Optional[Tensor], first_mu: Tensor) -> None:
    """One latent group (``at``: its index as ``[g]``, or empty for a single group),
    against recon's batch size and device or, without recon, the first group's."""
    _check_float_tensor(mu, f"mu{at}")
    _check_float_tensor(logvar, f"logvar{at}")
    batch = recon.shape[0] if recon is not None else first_mu.shape[0]
    if mu.shape[0] != batch:
        of = "recon" if recon is not None else "mu[0]"
        raise ValueError(f"mu{at} must have the batch size of {of} ({batch}), got shape {tuple(mu.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar{at} must have the shape of mu{at} {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    device_ref, device_name = (recon, "recon") if recon is not None else (first_mu, "mu[0]")
    _check_device(mu, f"mu{at}", device_ref, device_name)
    _check_device(logvar, f"logvar{at}", device_ref, device_name)
    if (prior_mu is None) != (prior_logvar is None):
        given, missing = ("prior_mu", "prior_logvar") if prior_mu is not None else ("prior_logvar", "prior_mu")
        raise ValueError(f"{missing}{at} must be given with {given}{at} (None for both means N(0, I))")
    for name, prior in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if prior is None:
            continue
        _check_tensor(prior, f"{name}{at}")
        if prior.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}{at} must be a floating-point tensor (float32, float64, float16 or "
                            f"bfloat16), got dtype {prior.dtype}")
        _check_device(prior, f"{name}{at}", device_ref, device_name)
        if not _broadcasts_to(prior, mu):
            raise ValueError(f"{name}{at} must be broadcastable to the shape of mu{at} "
                             f"{tuple(mu.shape)}, got shape {tuple(prior.shape)}")


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return "a tensor"
    if isinstance(value, (list, tuple)):
        return f"{len(value)} entries"
    return type(value).__name__


def _check_log_scale(log_scale: LogScale, likelihood: str, recon: Tensor) -> None:
    if likelihood not in SCALED_LIKELIHOODS:
        if log_scale is not None:
            raise ValueError(
                f"log_scale is only used with a likelihood that has a scale {SCALED_LIKELIHOODS}, "
                f"got likelihood={likelihood!r}"
            )
        return
    if log_scale is None or isinstance(log_scale, str):
        if isinstance(log_scale, str) and log_scale != "optimal":
            raise ValueError(f"log_scale must be a float, a tensor or 'optimal', got {log_scale!r}")
        return
    if is_real(log_scale):
        if not _is_finite(log_scale):
            raise ValueError(f"log_scale must be finite, got {log_scale}")
        return
    if not isinstance(log_scale, Tensor):
        raise TypeError(f"log_scale must be a float, a tensor or 'optimal', got {type(log_scale).__name__}")
    if not log_scale.dtype.is_floating_point:
        raise TypeError(f"log_scale must be a floating-point tensor, got dtype {log_scale.dtype}")
    if log_scale.dim() == 0:
        _check_scalar_tensor(log_scale, "log_scale", recon)
        return
    _check_device(log_scale, "log_scale", recon)
    if not _broadcasts_to(log_scale, recon):
        raise ValueError(
            f"log_scale must be a 0-d tensor or broadcastable to the shape of recon "
            f"{tuple(recon.shape)}, got shape {tuple(log_scale.shape)}"
        )


def _broadcasts_to(value: Tensor, recon: Tensor) -> bool:
    """Whether ``value`` broadcasts to exactly ``recon``'s shape."""
    try:
        return torch.broadcast_shapes(value.shape, recon.shape) == recon.shape
    except RuntimeError:
        return False


def _check_weight(weight, recon: Tensor, name: str = "weight", recon_name: str = "recon") -> None:
    if weight is None:
        return
    _check_tensor(weight, name)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {weight.dtype}")
    _check_device(weight, name, recon, recon_name)
    _check_no_grad(weight, name)
    if not _broadcasts_to(weight, recon):
        raise ValueError(
            f"{name} must be broadcastable to the shape of {recon_name} {tuple(recon.shape)}, "
            f"got shape {tuple(weight.shape)}"
        )


def _check_ranges(recon: Tensor, target: Tensor, likelihood: str, logits: bool) -> None:
    """validate=True: the Bernoulli likelihoods need data (and probabilities) in [0, 1]."""
    if likelihood not in ("bernoulli", "cbernoulli"):
        return
    if target.dtype != torch.uint8 and not bool(((target >= 0) & (target <= 1)).all()):
        raise ValueError(f"target must lie in [0, 1] for likelihood={likelihood!r} (found values outside, or NaN)")
    if not logits and not bool(((recon >= 0) & (recon <= 1)).all()):
        raise ValueError("recon must hold probabilities in [0, 1] when logits=False (found values outside, or NaN)")


def per_sample_size(t: Tensor) -> int:
    """Elements of one sample: the product of every dimension after the first."""
    return math.prod(t.shape[1:])


def check_autoencoder_kl_args(
    inputs: Tensor,
    reconstructions: Tensor,
    posterior_mean: Tensor,
    posterior_logvar: Tensor,
    logvar,
    kl_weight: Beta,
    perceptual: Optional[Tensor],
    weights: Optional[Tensor],
) -> None:
    """Raise TypeError/ValueError for any argument autoencoder_kl_loss cannot take,
    named as that function names it."""
    _check_float_tensor(reconstructions, "reconstructions")
    _check_float_tensor(inputs, "inputs")
    if inputs.shape != reconstructions.shape:
        raise ValueError(
            f"inputs must have the shape of reconstructions {tuple(reconstructions.shape)}, "
            f"got {tuple(inputs.shape)}"
        )
    _check_device(inputs, "inputs", reconstructions, "reconstructions")
    _check_no_grad(inputs, "inputs")
    batch = reconstructions.shape[0]
    _check_float_tensor(posterior_mean, "posterior_mean")
    _check_float_tensor(posterior_logvar, "posterior_logvar")
    if posterior_mean.shape[0] != batch:
        raise ValueError(
            f"posterior_mean must have the batch size of reconstructions ({batch}), "
            f"got shape {tuple(posterior_mean.shape)}"
        )
    if posterior_logvar.shape != posterior_mean.shape:
        raise ValueError(
            f"posterior_logvar must have the shape of posterior_mean {tuple(posterior_mean.shape)}, "
            f"got {tuple(posterior_logvar.shape)}"
        )
    _check_device(posterior_mean, "posterior_mean", reconstructions, "reconstructions")
    _check_device(posterior_logvar, "posterior_logvar", reconstructions, "reconstructions")

    if isinstance(logvar, Tensor):
        _check_scalar_tensor(logvar, "logvar", reconstructions, "reconstructions")
    elif is_real(logvar):
        if not _is_finite(logvar):
            raise ValueError(f"logvar must be finite, got {logvar}")
    else:
        raise TypeError(f"logvar must be a float or a 0-d tensor, got {type(logvar).__name__}")

    if isinstance(kl_weight, Tensor):
        _check_scalar_tensor(kl_weight, "kl_weight", reconstructions, "reconstructions")
    elif is_real(kl_weight):
        if not (_is_finite(kl_weight) and kl_weight >= 0):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight}")
    else:
        raise TypeError(f"kl_weight must be a float or a 0-d tensor, got {type(kl_weight).__name__}")

    if perceptual is not None:
        _check_tensor(perceptual, "perceptual")
        if not perceptual.dtype.is_floating_point:
            raise TypeError(f"perceptual must be a floating-point tensor, got dtype {perceptual.dtype}")
        if perceptual.dim() < 1 or perceptual.shape[0] != batch or perceptual.numel() != batch:
            raise ValueError(
                f"perceptual must hold one value per sample, of shape [{batch}] or [{batch}, 1, ...], "
                f"got shape {tuple(perceptual.shape)}"
            )
        _check_device(perceptual, "perceptual", reconstructions, "reconstructions")
    _check_weight(weights, reconstructions, "weights", "reconstructions")


def check_dmol_args(params, target, bits, log_scale_min, params_name: str = "params") -> int:
    """Raise TypeError/ValueError for any argument discretized_mix_logistic_nll
    cannot take (its params named ``params_name``); return K, the number of
    mixture components."""
    _check_float_tensor(params, params_name)
    _check_tensor(target, "target")
    if not (target.dtype.is_floating_point or target.dtype == torch.uint8):
        raise TypeError(f"target must be a floating-point or uint8 tensor, got dtype {target.dtype}")
    if target.dim() != 4 or target.shape[1] not in (1, 3):
        raise ValueError(f"target must have shape [B, 3, H, W] or [B, 1, H, W], got {tuple(target.shape)}")
    per_k = 10 if target.shape[1] == 3 else 3  # logit, then per channel: mean, log-scale (and coefficient)
    if (params.dim() != 4 or params.shape[0] != target.shape[0] or params.shape[2:] != target.shape[2:]
            or params.shape[1] % per_k != 0 or params.shape[1] == 0):
        raise ValueError(
            f"{params_name} must have shape [B, {per_k}K, H, W] for a target of shape {tuple(target.shape)}, "
            f"got {tuple(params.shape)}"
        )
    _check_device(target, "target", params, params_name)
    _check_no_grad(target, "target")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
    if not is_real(log_scale_min) or not _is_finite(log_scale_min):
        raise ValueError(f"log_scale_min must be a finite number, got {log_scale_min!r}")
    return params.shape[1] // per_k

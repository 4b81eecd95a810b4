"""The C++/CUDA ops (``torch.ops.fusedvae.*``): fake kernels and autograd.

Loading ``fusedvae._C`` registers the schemas and the CPU (and, when built, the
CUDA) kernels. Here each forward op gets a fake kernel, so torch.compile and
torch.library.opcheck can trace it, and an autograd formula that calls the
matching fused backward op with whatever per-sample upstream gradient arrives.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.fusedvae)
from ._checks import accumulate_dtype

ops = torch.ops.fusedvae


def has_cuda_kernels() -> bool:
    """Whether this build registered CUDA kernels for the fusedvae ops."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fusedvae::recon_loss", "CUDA")


# ------------------------------------------------------------ fake kernels --
# They also serve the Meta key, which wins dispatch when any argument is a meta
# tensor, so they repeat the C++ kernels' shape and device checks.


def _check_like(tensor, name, ref, ref_name):
    torch._check(
        tensor.device == ref.device,
        lambda: f"fusedvae: expected {name} on the device of {ref_name} ({ref.device}), got {tensor.device}",
    )
    torch._check(
        tensor.shape == ref.shape,
        lambda: f"fusedvae: expected {name} of shape {tuple(ref.shape)} (the shape of {ref_name}), "
        f"got {tuple(tensor.shape)}",
    )


def _check_recon_args(recon, target, log_scale):
    torch._check(recon.dim() >= 1, lambda: "fusedvae: expected recon of shape [batch, ...]")
    _check_like(target, "target", recon, "recon")
    if log_scale is not None:
        _check_like(log_scale, "log_scale", recon, "recon")


def _check_kl_args(mu, logvar):
    torch._check(mu.dim() >= 1, lambda: "fusedvae: expected mu of shape [batch, ...]")
    _check_like(logvar, "logvar", mu, "mu")


@torch.library.register_fake("fusedvae::recon_loss")
def _recon_loss_fake(recon, target, log_scale, likelihood, logits):
    _check_recon_args(recon, target, log_scale)
    return recon.new_empty((recon.shape[0],), dtype=accumulate_dtype(recon.dtype))


@torch.library.register_fake("fusedvae::recon_loss_backward")
def _recon_loss_backward_fake(grad, recon, target, log_scale, likelihood, logits):
    _check_recon_args(recon, target, log_scale)
    grad_scale = torch.empty_like(log_scale) if log_scale is not None else recon.new_empty((0,))
    return torch.empty_like(recon), grad_scale


@torch.library.register_fake("fusedvae::gaussian_kl")
def _gaussian_kl_fake(mu, logvar):
    _check_kl_args(mu, logvar)
    return mu.new_empty((mu.shape[0],), dtype=accumulate_dtype(mu.dtype))


@torch.library.register_fake("fusedvae::gaussian_kl_per_dim")
def _gaussian_kl_per_dim_fake(mu, logvar):
    _check_kl_args(mu, logvar)
    return mu.new_empty(mu.shape, dtype=accumulate_dtype(mu.dtype))


@torch.library.register_fake("fusedvae::gaussian_kl_backward")
def _gaussian_kl_backward_fake(grad, mu, logvar):
    _check_kl_args(mu, logvar)
    torch._check(grad.device == mu.device, lambda: "fusedvae: expected grad on the device of mu")
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape)


@torch.library.register_fake("fusedvae::cb_log_normalizer")
def _cb_log_normalizer_fake(logits):
    return torch.empty_like(logits)


@torch.library.register_fake("fusedvae::cb_log_normalizer_backward")
def _cb_log_normalizer_backward_fake(grad, logits):
    _check_like(grad, "grad", logits, "logits")
    return torch.empty_like(logits)


# ----------------------------------------------------------------- autograd --


def _recon_loss_setup(ctx, inputs, output):
    recon, target, log_scale, likelihood, logits = inputs
    ctx.save_for_backward(recon, target, log_scale)
    ctx.likelihood = likelihood
    ctx.logits = logits


def _recon_loss_backward(ctx, grad):
    if ctx.needs_input_grad[1]:
        raise RuntimeError("fusedvae::recon_loss has no gradient with respect to target")
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        return None, None, None, None, None
    recon, target, log_scale = ctx.saved_tensors
    grad_recon, grad_scale = ops.recon_loss_backward(
        grad, recon, target, log_scale, ctx.likelihood, ctx.logits
    )
    return grad_recon, None, (grad_scale if log_scale is not None else None), None, None


torch.library.register_autograd(
    "fusedvae::recon_loss", _recon_loss_backward, setup_context=_recon_loss_setup
)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _kl_backward(ctx, grad):
    mu, logvar = ctx.saved_tensors
    return tuple(ops.gaussian_kl_backward(grad, mu, logvar))


torch.library.register_autograd("fusedvae::gaussian_kl", _kl_backward, setup_context=_save_inputs)
torch.library.register_autograd(
    "fusedvae::gaussian_kl_per_dim", _kl_backward, setup_context=_save_inputs
)


def _cb_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return ops.cb_log_normalizer_backward(grad, logits)


torch.library.register_autograd(
    "fusedvae::cb_log_normalizer", _cb_backward, setup_context=_save_inputs
)

"""The C++/CUDA ops (``torch.ops.fusedvae.*``): fake kernels and vmap rules.

Loading ``fusedvae._C`` registers the schemas, the CPU (and, when built, the
CUDA) kernels and the autograd of every op (C++ ``torch::autograd::Function``
nodes, csrc/autograd.cpp). Here each op gets a fake kernel, so torch.compile
and torch.library.opcheck can trace it, and a torch.func.vmap rule.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.fusedvae)
from ._build_info import WITH_CUDA
from ._checks import FLOAT_DTYPES, LIKELIHOODS, REDUCTIONS, SCALED_LIKELIHOODS, accumulate_dtype

ops = torch.ops.fusedvae


def has_cuda_kernels() -> bool:
    """Whether this build registered CUDA kernels for the fusedvae ops."""
    return WITH_CUDA


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


def _check_objective_args(recon, target, mu, logvar):
    torch._check(recon.dim() >= 1, lambda: "fusedvae: expected recon of shape [batch, ...], got a 0-d tensor")
    _check_like(target, "target", recon, "recon")
    torch._check(
        mu.dim() >= 1 and mu.shape[0] == recon.shape[0],
        lambda: f"fusedvae: expected mu of shape [{recon.shape[0]}, ...] (the batch size of recon), "
        f"got {list(mu.shape)}",
    )
    _check_like(logvar, "logvar", mu, "mu")
    torch._check(
        mu.device == recon.device,
        lambda: f"fusedvae: expected mu on the device of recon ({recon.device}), got {mu.device}",
    )


def _aux_size(batch, latent):
    # csrc/objective.h, AuxLayout: [s, K, SSE (batch), kl (batch), mean kl per dimension (latent)].
    return 2 + 2 * batch + latent


def _check_objective_options(recon, log_scale, beta, likelihood, reduction, optimal_scale, free_bits, weight):
    # As ObjectiveInputs in csrc/ops.cpp, for what a meta call must not slip past.
    torch._check(recon.dtype in FLOAT_DTYPES, lambda: f"fusedvae: expected recon to be float32, float64, float16 or bfloat16, got {recon.dtype}")
    torch._check(likelihood in LIKELIHOODS, lambda: f"fusedvae: expected likelihood to be one of {LIKELIHOODS}, got {likelihood!r}")
    torch._check(reduction in REDUCTIONS, lambda: f"fusedvae: expected reduction to be one of {REDUCTIONS}, got {reduction!r}")
    torch._check(free_bits >= 0, lambda: f"fusedvae: expected free_bits to be a finite number >= 0, got {free_bits}")
    torch._check(
        likelihood in SCALED_LIKELIHOODS or (log_scale is None and not optimal_scale),
        lambda: f"fusedvae: likelihood '{likelihood}' takes no log_scale",
    )
    if weight is not None:
        torch._check(
            weight.device == recon.device,
            lambda: f"fusedvae: expected weight on the device of recon ({recon.device}), got {weight.device}",
        )
        torch._check(
            weight.dtype.is_floating_point,
            lambda: f"fusedvae: expected weight to be a floating-point tensor, got {weight.dtype}",
        )
    for value, name in ((log_scale, "log_scale"), (beta, "beta")):
        if value is not None:
            # a 0-d log_scale or beta may also live on the CPU
            torch._check(
                value.device == recon.device or (value.dim() == 0 and value.device.type == "cpu"),
                lambda: f"fusedvae: expected {name} on the device of recon ({recon.device}), got {value.device}",
            )


@torch.library.register_fake("fusedvae::vae_loss")
def _vae_loss_fake(recon, target, mu, logvar, log_scale, beta, likelihood, logits, reduction,
                   log_scale_value, optimal_scale, beta_value, free_bits, weight=None):
    _check_objective_args(recon, target, mu, logvar)
    _check_objective_options(recon, log_scale, beta, likelihood, reduction, optimal_scale, free_bits, weight)
    acc = accumulate_dtype(recon.dtype)
    batch = recon.shape[0]
    latent = mu.numel() // batch if batch else 0
    loss = recon.new_empty((batch,) if reduction == "none" else (), dtype=acc)
    return (
        loss,
        recon.new_empty((batch,), dtype=acc),
        recon.new_empty((batch,), dtype=acc),
        recon.new_empty((_aux_size(batch, latent),), dtype=acc),
    )


@torch.library.register_fake("fusedvae::vae_loss_and_grad")
def _vae_loss_and_grad_fake(recon, target, mu, logvar, log_scale, beta, likelihood, logits, reduction,
                            log_scale_value, optimal_scale, beta_value, free_bits, weight=None):
    outputs = _vae_loss_fake(recon, target, mu, logvar, log_scale, beta, likelihood, logits, reduction,
                             log_scale_value, optimal_scale, beta_value, free_bits, weight)
    return (*outputs, torch.empty_like(recon))


@torch.library.register_fake("fusedvae::vae_loss_backward")
def _vae_loss_backward_fake(grad_loss, grad_rec, grad_kl, recon, target, mu, logvar, log_scale,
                            beta, aux, likelihood, logits, reduction, log_scale_value,
                            optimal_scale, beta_value, free_bits, output_mask, weight=None,
                            recon_coefficients=False):
    _check_objective_args(recon, target, mu, logvar)
    _check_objective_options(recon, log_scale, beta, likelihood, reduction, optimal_scale, free_bits, weight)
    batch = recon.shape[0]
    _check_like(aux, "aux", recon.new_empty((_aux_size(batch, mu.numel() // batch if batch else 0),)), "vae_loss's aux")
    for grad, name in ((grad_loss, "grad_loss"), (grad_rec, "grad_rec"), (grad_kl, "grad_kl")):
        if grad is not None:
            torch._check(
                grad.device == recon.device,
                lambda: f"fusedvae: expected {name} on the device of recon ({recon.device}), got {grad.device}",
            )
        if grad is not None and name != "grad_loss":
            torch._check(
                grad.dim() == 1 and grad.shape[0] == recon.shape[0],
                lambda: f"fusedvae: expected {name} of shape [{recon.shape[0]}], got {list(grad.shape)}",
            )
    def none():  # a fresh empty tensor per unwanted gradient, as the C++ kernel returns
        return recon.new_empty((0,))

    want_recon, want_latent, want_scale, want_beta = output_mask
    if recon_coefficients:
        per_element_scale = log_scale is not None and log_scale.dim() > 0
        torch._check(
            not (want_scale and per_element_scale),
            lambda: "fusedvae: expected output_mask[2] to be False with recon_coefficients=True and "
            "a per-element log_scale, whose gradient comes from recon's gradient",
        )
        recon_out = recon.new_empty((recon.shape[0],), dtype=accumulate_dtype(recon.dtype)) if want_recon else none()
    else:
        recon_out = torch.empty_like(recon) if want_recon else none()
    # grad_mu and grad_logvar are contiguous: the kernels write the latent in that order.
    return (
        recon_out,
        mu.new_empty(mu.shape) if want_latent else none(),
        mu.new_empty(mu.shape) if want_latent else none(),
        torch.empty_like(log_scale) if want_scale and log_scale is not None else none(),
        torch.empty_like(beta) if want_beta and beta is not None else none(),
    )


def _check_kl_args(mu, logvar):
    torch._check(mu.dim() >= 1, lambda: "fusedvae: expected mu of shape [batch, ...]")
    _check_like(logvar, "logvar", mu, "mu")


@torch.library.register_fake("fusedvae::gaussian_kl_per_dim")
def _gaussian_kl_per_dim_fake(mu, logvar):
    _check_kl_args(mu, logvar)
    return mu.new_empty(mu.shape, dtype=accumulate_dtype(mu.dtype))


@torch.library.register_fake("fusedvae::gaussian_kl_per_dim_backward")
def _gaussian_kl_per_dim_backward_fake(grad, mu, logvar):
    _check_kl_args(mu, logvar)
    _check_like(grad, "grad", mu, "mu")
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape)


def _check_kl_groups(mu, logvar, prior_mu, prior_logvar, free_bits):
    """csrc/ops.cpp's KlGroups checks; returns (batch, accumulation dtype, dim_mean's size)."""
    torch._check(len(mu) >= 1, lambda: "fusedvae: expected mu to hold at least one latent group")
    torch._check(len(logvar) == len(mu) and len(free_bits) == len(mu),
                 lambda: "fusedvae: expected logvar and free_bits to hold one entry per group of mu")
    torch._check(len(prior_mu) == len(prior_logvar) and len(prior_mu) in (0, len(mu)),
                 lambda: "fusedvae: expected prior_mu and prior_logvar to be empty or to hold one group per group of mu")
    torch._check(mu[0].dim() >= 1, lambda: "fusedvae: expected mu[0] of shape [batch, ...]")
    batch = mu[0].shape[0]
    dtype = mu[0].dtype
    free_bits_dims = 0
    for g, m in enumerate(mu):
        torch._check(m.dim() >= 1 and m.shape[0] == batch,
                     lambda: f"fusedvae: expected mu[{g}] of shape [{batch}, ...] (the batch size of mu[0])")
        others = [logvar[g]] + ([prior_mu[g], prior_logvar[g]] if prior_mu else [])
        for t in [m] + others:
            torch._check(t.dtype in FLOAT_DTYPES, lambda: f"fusedvae: expected float tensors, got {t.dtype}")
            torch._check(t.device == mu[0].device, lambda: "fusedvae: expected every group on the device of mu[0]")
            dtype = torch.promote_types(dtype, t.dtype)
        for t in others:
            torch._check(t.shape == m.shape, lambda: f"fusedvae: expected the shape of mu[{g}] {tuple(m.shape)}")
        if free_bits[g] > 0:
            free_bits_dims += m[0].numel() if batch != 0 else 0
    return batch, accumulate_dtype(dtype), free_bits_dims


@torch.library.register_fake("fusedvae::gaussian_kl")
def _gaussian_kl_fake(mu, logvar, prior_mu, prior_logvar, free_bits):
    batch, acc, free_bits_dims = _check_kl_groups(mu, logvar, prior_mu, prior_logvar, free_bits)
    new = mu[0].new_empty
    return new((batch,), dtype=acc), new((batch,), dtype=acc), new((free_bits_dims,), dtype=acc)


@torch.library.register_fake("fusedvae::gaussian_kl_backward")
def _gaussian_kl_backward_fake(grad_kl, grad_kl_term, mu, logvar, prior_mu, prior_logvar, dim_mean, free_bits):
    _check_kl_groups(mu, logvar, prior_mu, prior_logvar, free_bits)

    def like(tensors):  # contiguous, in each input's dtype, as the C++ kernel returns
        return [t.new_empty(t.shape) for t in tensors]

    return like(mu), like(logvar), like(prior_mu), like(prior_logvar)


@torch.library.register_fake("fusedvae::cb_log_normalizer")
def _cb_log_normalizer_fake(logits):
    return torch.empty_like(logits)


@torch.library.register_fake("fusedvae::cb_log_normalizer_backward")
def _cb_log_normalizer_backward_fake(grad, logits):
    _check_like(grad, "grad", logits, "logits")
    return torch.empty_like(logits)


def _check_dmol_args(params, target):
    torch._check(params.dtype in FLOAT_DTYPES, lambda: f"fusedvae: expected params to be float32, float64, "
                 f"float16 or bfloat16, got {params.dtype}")
    torch._check(target.dim() == 4 and target.shape[1] in (1, 3),
                 lambda: f"fusedvae: expected target of shape [B, 3, H, W] or [B, 1, H, W], got {tuple(target.shape)}")
    per_k = 10 if target.shape[1] == 3 else 3
    torch._check(
        params.dim() == 4 and params.shape[0] == target.shape[0] and params.shape[2:] == target.shape[2:]
        and params.shape[1] > 0 and params.shape[1] % per_k == 0,
        lambda: f"fusedvae: expected params of shape [B, {per_k}K, H, W] for a target of shape "
        f"{tuple(target.shape)}, got {tuple(params.shape)}",
    )
    torch._check(target.device == params.device,
                 lambda: f"fusedvae: expected target on the device of params ({params.device}), got {target.device}")


@torch.library.register_fake("fusedvae::dmol_nll")
def _dmol_nll_fake(params, target, bits, log_scale_min):
    _check_dmol_args(params, target)
    return params.new_empty((params.shape[0],), dtype=accumulate_dtype(params.dtype))


def _pixel_indexable(t):
    # csrc/ops.cpp's with_pixel_index: H and W merge into one pixel index.
    return t.shape[2] <= 1 or t.shape[3] <= 1 or t.stride(2) == t.stride(3) * t.shape[3]


@torch.library.register_fake("fusedvae::dmol_nll_and_grad")
def _dmol_nll_and_grad_fake(params, target, bits, log_scale_min):
    _check_dmol_args(params, target)
    nll = params.new_empty((params.shape[0],), dtype=accumulate_dtype(params.dtype))
    return nll, torch.empty_like(params if _pixel_indexable(params) else params.contiguous())


def _pixel_nll_shape(params):
    return (params.shape[0], params.shape[2], params.shape[3])


@torch.library.register_fake("fusedvae::dmol_nll_and_pixel_nll")
def _dmol_nll_and_pixel_nll_fake(params, target, bits, log_scale_min):
    _check_dmol_args(params, target)
    acc = accumulate_dtype(params.dtype)
    return params.new_empty((params.shape[0],), dtype=acc), params.new_empty(_pixel_nll_shape(params), dtype=acc)


@torch.library.register_fake("fusedvae::dmol_nll_backward")
def _dmol_nll_backward_fake(grad, params, target, bits, log_scale_min, pixel_nll=None):
    _check_dmol_args(params, target)
    torch._check(grad.device == params.device,
                 lambda: f"fusedvae: expected grad on the device of params ({params.device}), got {grad.device}")
    torch._check(grad.dim() == 1 and grad.shape[0] == params.shape[0],
                 lambda: f"fusedvae: expected grad of shape [{params.shape[0]}], got {tuple(grad.shape)}")
    if pixel_nll is not None:
        torch._check(pixel_nll.device == params.device,
                     lambda: f"fusedvae: expected pixel_nll on the device of params ({params.device}), "
                     f"got {pixel_nll.device}")
        torch._check(tuple(pixel_nll.shape) == _pixel_nll_shape(params),
                     lambda: f"fusedvae: expected pixel_nll of shape {list(_pixel_nll_shape(params))} "
                     f"(dmol_nll_and_pixel_nll's), got {list(pixel_nll.shape)}")
        acc = accumulate_dtype(params.dtype)
        torch._check(pixel_nll.dtype == acc,
                     lambda: f"fusedvae: expected pixel_nll of dtype {acc} (dmol_nll_and_pixel_nll's), "
                     f"got {pixel_nll.dtype}")
    return torch.empty_like(params if _pixel_indexable(params) else params.contiguous())


# --------------------------------------------------------------------- vmap --
# torch.func.vmap. The objective mixes the samples of a batch (its reductions,
# free bits and the optimal scale are batch-wide), so a vmapped call runs the
# op once per vmapped slice, exactly as a Python loop would. The per-dimension
# KL and the normaliser work sample by sample, so there a vmapped dimension is
# folded into the batch and the op runs once.


def _slice(value, bdim, index):
    if not isinstance(value, torch.Tensor) or bdim is None:
        return value
    return value.select(bdim, index)


def _per_slice(op):
    def rule(info, in_dims, *args):
        results = [
            op(*(_slice(a, d, v) for a, d in zip(args, in_dims))) for v in range(info.batch_size)
        ]
        return tuple(torch.stack(outs) for outs in zip(*results)), (0,) * len(results[0])

    return rule


torch.library.register_vmap("fusedvae::vae_loss", _per_slice(ops.vae_loss.default))
torch.library.register_vmap("fusedvae::vae_loss_backward", _per_slice(ops.vae_loss_backward.default))
torch.library.register_vmap("fusedvae::vae_loss_and_grad", _per_slice(ops.vae_loss_and_grad.default))


def _fold(value, bdim, size):
    """[V, B, ...] (V at ``bdim``, or broadcast when ``bdim`` is None) -> [V*B, ...]."""
    value = value.movedim(bdim, 0) if bdim is not None else value.expand(size, *value.shape)
    return value.reshape(size * value.shape[1], *value.shape[2:])


def _unfold(value, size):
    return value.reshape(size, value.shape[0] // size, *value.shape[1:])


@torch.library.register_vmap("fusedvae::gaussian_kl_per_dim")
def _gaussian_kl_per_dim_vmap(info, in_dims, mu, logvar):
    v = info.batch_size
    return _unfold(ops.gaussian_kl_per_dim(_fold(mu, in_dims[0], v), _fold(logvar, in_dims[1], v)), v), 0


@torch.library.register_vmap("fusedvae::gaussian_kl_per_dim_backward")
def _gaussian_kl_per_dim_backward_vmap(info, in_dims, grad, mu, logvar):
    v = info.batch_size
    grad_mu, grad_logvar = ops.gaussian_kl_per_dim_backward(
        _fold(grad, in_dims[0], v), _fold(mu, in_dims[1], v), _fold(logvar, in_dims[2], v)
    )
    return (_unfold(grad_mu, v), _unfold(grad_logvar, v)), (0, 0)


@torch.library.register_vmap("fusedvae::cb_log_normalizer")
def _cb_log_normalizer_vmap(info, in_dims, logits):
    # Elementwise: the op takes the batched tensor as it is.
    return ops.cb_log_normalizer(logits), in_dims[0]


@torch.library.register_vmap("fusedvae::cb_log_normalizer_backward")
def _cb_log_normalizer_backward_vmap(info, in_dims, grad, logits):
    v = info.batch_size
    grad = grad.movedim(in_dims[0], 0) if in_dims[0] is not None else grad.expand(v, *grad.shape)
    logits = logits.movedim(in_dims[1], 0) if in_dims[1] is not None else logits.expand(v, *logits.shape)
    return ops.cb_log_normalizer_backward(grad, logits), 0

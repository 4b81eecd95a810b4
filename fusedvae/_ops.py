"""The C++/CUDA ops (``torch.ops.fusedvae.*``): fake kernels, autograd and vmap.

Loading ``fusedvae._C`` registers the schemas and the CPU (and, when built, the
CUDA) kernels. Here each op gets a fake kernel, so torch.compile and
torch.library.opcheck can trace it; each forward op an autograd formula that
calls the matching fused backward op with whatever per-sample upstream gradient
arrives, and a forward-mode (jvp) formula; the backward ops an autograd kernel
that refuses second derivatives; and every op a torch.func.vmap batching rule.
"""
from __future__ import annotations

import contextlib

import torch

try:  # private PyTorch internals the hand-registered kernels below rely on
    from torch.autograd.forward_ad import _set_fwd_grad_enabled

    _HAVE_INTERNALS = all(
        (
            hasattr(torch.autograd.function, "_SingleLevelFunction"),
            hasattr(torch._C, "_AutoDispatchBelowAutograd"),
            hasattr(torch._C, "_are_functorch_transforms_active"),
            hasattr(torch._C._functorch, "set_single_level_autograd_function_allowed"),
        )
    )
except ImportError:  # pragma: no cover - depends on the torch version
    _HAVE_INTERNALS = False

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


def _check_per_sample_grad(grad, ref, ref_name):
    # As the C++ kernel: grad on the device of the input, of shape [batch]. (Without
    # the device check a grad on 'meta' with a CPU recon dispatched here and got
    # back an uninitialised CPU tensor.)
    torch._check(
        grad.device == ref.device,
        lambda: f"fusedvae: expected grad on the device of {ref_name} ({ref.device}), got {grad.device}",
    )
    torch._check(
        grad.dim() == 1 and grad.shape[0] == ref.shape[0],
        lambda: f"fusedvae: expected grad of shape [{ref.shape[0]}], got {list(grad.shape)}",
    )


@torch.library.register_fake("fusedvae::recon_loss")
def _recon_loss_fake(recon, target, log_scale, likelihood, logits):
    _check_recon_args(recon, target, log_scale)
    return recon.new_empty((recon.shape[0],), dtype=accumulate_dtype(recon.dtype))


@torch.library.register_fake("fusedvae::recon_loss_backward")
def _recon_loss_backward_fake(grad, recon, target, log_scale, likelihood, logits):
    _check_recon_args(recon, target, log_scale)
    _check_per_sample_grad(grad, recon, "recon")
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
    torch._check(
        grad.shape == mu.shape or (grad.dim() == 1 and grad.shape[0] == mu.shape[0]),
        lambda: f"fusedvae: expected grad of shape [{mu.shape[0]}] or {list(mu.shape)}, got {list(grad.shape)}",
    )
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape)


@torch.library.register_fake("fusedvae::cb_log_normalizer")
def _cb_log_normalizer_fake(logits):
    return torch.empty_like(logits)


@torch.library.register_fake("fusedvae::cb_log_normalizer_backward")
def _cb_log_normalizer_backward_fake(grad, logits):
    _check_like(grad, "grad", logits, "logits")
    return torch.empty_like(logits)


# ----------------------------------------------------------------- autograd --
# torch.library.register_autograd (torch <= 2.14 at least) wraps the formula in an
# old-style autograd.Function, which torch.func transforms reject ("it must
# override the setup_context staticmethod", pytorch/pytorch#170834); a
# new-style autograd.Function cannot be applied from inside a dispatcher kernel
# under torch.func either (its HOP finds no kernel at the Autograd key); and the
# generated kernel ignores forward-mode tangents (jvp, jacfwd and forward_ad got
# a zero tangent). So the Autograd kernels are registered by hand and record
# their node the way a C++ autograd kernel does: a single-level
# autograd.Function (the mechanism functorch itself uses for transform-local
# nodes) whose forward redispatches below Autograd with grad mode left on, so
# that enclosing torch.func levels still record the op. Plain autograd,
# torch.compile and opcheck see the same thing as with register_autograd;
# torch.func.grad / vjp / jacrev / jvp / jacfwd work as well. Each forward op
# has a jvp (first derivatives, from the fused backward op); the backward ops
# raise on any differentiation, so second derivatives (double backward,
# hessian, forward-over-reverse) are a clear error, never wrong numbers.

_lib = torch.library.Library("fusedvae", "FRAGMENT")

DOUBLE_BACKWARD_MESSAGE = (
    "fusedvae: second-order gradients (double backward, hessian, jvp of a gradient) through "
    "fusedvae::{name} are not supported: the fused kernels compute first derivatives only. "
    "Differentiate fusedvae.reference.vae_loss instead where higher-order gradients are needed."
)


def _any_requires_grad(args):
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _forward_ad_active():
    # A torch.autograd.forward_ad dual level, or any torch.func transform (jvp,
    # jacfwd): tangents may be attached, so the node must see the inputs.
    return (
        torch.autograd.forward_ad._current_level >= 0
        or torch._C._are_functorch_transforms_active()
    )


@contextlib.contextmanager
def _single_level_functions():
    allowed = torch._C._functorch.get_single_level_autograd_function_allowed()
    torch._C._functorch.set_single_level_autograd_function_allowed(True)
    try:
        yield
    finally:
        torch._C._functorch.set_single_level_autograd_function_allowed(allowed)


def _register_autograd(name, setup_context, backward, jvp):
    """Register the Autograd kernel of ``fusedvae::name``.

    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` as for
    :func:`torch.library.register_autograd`; ``jvp(ctx, *tangents)`` returns the
    output tangent (tangents are ``None`` for inputs without one).

    On a torch without the internals this relies on, falls back to
    :func:`torch.library.register_autograd` (plain autograd and torch.compile
    work; torch.func transforms and second-order errors may not).
    """
    if not _HAVE_INTERNALS:
        if not name.endswith("_backward"):
            torch.library.register_autograd(f"fusedvae::{name}", backward, setup_context=setup_context)
        return None
    op = getattr(ops, name).default

    def forward(*args):
        # _SingleLevelFunction.apply turned grad mode and forward grad off; an
        # enclosing torch.func level below this one (grad, or jvp as in
        # jvp(grad(f))) must still see and record the op. This level does not:
        # its Autograd keys are excluded.
        with torch.enable_grad(), _set_fwd_grad_enabled(True), torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    function = type(
        f"FusedVAE_{name}",
        (torch.autograd.function._SingleLevelFunction,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
        },
    )

    def autograd_kernel(*args):
        if (torch.is_grad_enabled() and _any_requires_grad(args)) or _forward_ad_active():
            with _single_level_functions():
                return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _lib.impl(name, autograd_kernel, "Autograd")
    return function


def _per_sample_sum(x, batch):
    return x.reshape(batch, x.numel() // batch if batch else 0).sum(dim=1)


def _recon_loss_setup(ctx, inputs, output):
    recon, target, log_scale, likelihood, logits = inputs
    ctx.save_for_backward(recon, target, log_scale)
    ctx.save_for_forward(recon, target, log_scale)
    ctx.set_materialize_grads(False)  # no zero tangent for an input without one
    ctx.likelihood = likelihood
    ctx.logits = logits


def _recon_loss_backward(ctx, grad):
    if ctx.needs_input_grad[1]:
        raise RuntimeError("fusedvae::recon_loss has no gradient with respect to target")
    if grad is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        return None, None, None, None, None  # (grad is None: the output got no gradient)
    recon, target, log_scale = ctx.saved_tensors
    grad_recon, grad_scale = ops.recon_loss_backward(
        grad, recon, target, log_scale, ctx.likelihood, ctx.logits
    )
    return grad_recon, None, (grad_scale if log_scale is not None else None), None, None


def _recon_loss_jvp(ctx, recon_t, target_t, log_scale_t, *_):
    if target_t is not None:
        raise RuntimeError("fusedvae::recon_loss has no derivative with respect to target")
    recon, target, log_scale = ctx.saved_tensors
    batch = recon.shape[0]
    acc = accumulate_dtype(recon.dtype)
    ones = torch.ones(batch, dtype=acc, device=recon.device)
    # d rec_b = Σ_i ∂ℓ/∂x_bi · ẋ_bi + ∂ℓ/∂s_bi · ṡ_bi, with the fused first derivatives.
    grad_recon, grad_scale = ops.recon_loss_backward(
        ones, recon, target, log_scale, ctx.likelihood, ctx.logits
    )
    out = torch.zeros(batch, dtype=acc, device=recon.device)
    if recon_t is not None:
        out = out + _per_sample_sum(grad_recon.to(acc) * recon_t.to(acc), batch)
    if log_scale_t is not None:
        out = out + _per_sample_sum(grad_scale.to(acc) * log_scale_t.to(acc), batch)
    return out


_register_autograd("recon_loss", _recon_loss_setup, _recon_loss_backward, _recon_loss_jvp)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.save_for_forward(*inputs)


def _kl_backward(ctx, grad):
    mu, logvar = ctx.saved_tensors
    return tuple(ops.gaussian_kl_backward(grad, mu, logvar))


def _kl_jvp_terms(ctx, mu_t, logvar_t, per_dim):
    mu, logvar = ctx.saved_tensors
    acc = accumulate_dtype(mu.dtype)
    shape = mu.shape if per_dim else mu.shape[:1]
    grad_mu, grad_logvar = ops.gaussian_kl_backward(
        torch.ones(shape, dtype=acc, device=mu.device), mu, logvar
    )
    out = torch.zeros(mu.shape, dtype=acc, device=mu.device)
    if mu_t is not None:
        out = out + grad_mu.to(acc) * mu_t.to(acc)
    if logvar_t is not None:
        out = out + grad_logvar.to(acc) * logvar_t.to(acc)
    return out if per_dim else _per_sample_sum(out, mu.shape[0])


def _kl_jvp(ctx, mu_t, logvar_t):
    return _kl_jvp_terms(ctx, mu_t, logvar_t, per_dim=False)


def _kl_per_dim_jvp(ctx, mu_t, logvar_t):
    return _kl_jvp_terms(ctx, mu_t, logvar_t, per_dim=True)


_register_autograd("gaussian_kl", _save_inputs, _kl_backward, _kl_jvp)
_register_autograd("gaussian_kl_per_dim", _save_inputs, _kl_backward, _kl_per_dim_jvp)


def _cb_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return ops.cb_log_normalizer_backward(grad, logits)


def _cb_jvp(ctx, logits_t):
    (logits,) = ctx.saved_tensors
    return ops.cb_log_normalizer_backward(logits_t, logits)


_register_autograd("cb_log_normalizer", _save_inputs, _cb_backward, _cb_jvp)


# The backward ops compute first derivatives only. Without an Autograd kernel,
# PyTorch's fallback lets a second differentiation through them go on with a
# zero contribution and only a warning (wrong Hessian-vector products); these
# kernels make it an error instead. create_graph=True itself still works, as
# long as nothing differentiates through these ops.


def _second_order_error(name):
    def fail(ctx, *args):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE.format(name=name))

    return fail


def _nothing_to_save(ctx, inputs, output):
    pass


for _name in ("recon_loss_backward", "gaussian_kl_backward", "cb_log_normalizer_backward"):
    _register_autograd(_name, _nothing_to_save, _second_order_error(_name), _second_order_error(_name))


# --------------------------------------------------------------------- vmap --
# torch.func.vmap: the ops work on a batch of independent samples, so a
# vmapped dimension V is folded into the batch dimension ([V, B, ...] ->
# [V*B, ...]), the op runs once, and its per-sample outputs are unfolded. Each
# sample is reduced exactly as without vmap (the same chunks in the same
# order), so vmap gives bitwise the result of a Python loop. Arguments that are
# not vmapped are broadcast over V first.


def _fold(value, bdim, size):
    """[V, B, ...] (V at ``bdim``, or broadcast when ``bdim`` is None) -> [V*B, ...]."""
    if value is None:
        return None
    value = value.movedim(bdim, 0) if bdim is not None else value.expand(size, *value.shape)
    return value.reshape(size * value.shape[1], *value.shape[2:])


def _unfold(value, size):
    return value.reshape(size, value.shape[0] // size, *value.shape[1:])


@torch.library.register_vmap("fusedvae::recon_loss")
def _recon_loss_vmap(info, in_dims, recon, target, log_scale, likelihood, logits):
    v = info.batch_size
    rec = ops.recon_loss(
        _fold(recon, in_dims[0], v), _fold(target, in_dims[1], v), _fold(log_scale, in_dims[2], v),
        likelihood, logits,
    )
    return _unfold(rec, v), 0


@torch.library.register_vmap("fusedvae::recon_loss_backward")
def _recon_loss_backward_vmap(info, in_dims, grad, recon, target, log_scale, likelihood, logits):
    v = info.batch_size
    grad_recon, grad_scale = ops.recon_loss_backward(
        _fold(grad, in_dims[0], v), _fold(recon, in_dims[1], v), _fold(target, in_dims[2], v),
        _fold(log_scale, in_dims[3], v), likelihood, logits,
    )
    if log_scale is None:  # an empty placeholder, the same for every vmapped slice
        return (_unfold(grad_recon, v), grad_scale), (0, None)
    return (_unfold(grad_recon, v), _unfold(grad_scale, v)), (0, 0)


def _kl_vmap(op):
    def rule(info, in_dims, mu, logvar):
        v = info.batch_size
        return _unfold(op(_fold(mu, in_dims[0], v), _fold(logvar, in_dims[1], v)), v), 0

    return rule


torch.library.register_vmap("fusedvae::gaussian_kl", _kl_vmap(ops.gaussian_kl))
torch.library.register_vmap("fusedvae::gaussian_kl_per_dim", _kl_vmap(ops.gaussian_kl_per_dim))


@torch.library.register_vmap("fusedvae::gaussian_kl_backward")
def _gaussian_kl_backward_vmap(info, in_dims, grad, mu, logvar):
    v = info.batch_size
    grad_mu, grad_logvar = ops.gaussian_kl_backward(
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

"""The torch.ops.fusedvae ops called directly: torch.library.opcheck (schemas,
fake kernels, autograd registration) and their outputs against the reference.
The opcheck of every op also runs on each device (``device`` fixture).

vae_loss's arguments, in the schema's order:
``(recon, target, mu, logvar, log_scale, beta, likelihood, logits, reduction,
log_scale_value, optimal_scale, beta_value, free_bits)``; vae_loss_backward takes
``(grad_loss, grad_rec, grad_kl, recon, target, mu, logvar, log_scale, beta, aux,
likelihood, logits, reduction, log_scale_value, optimal_scale, beta_value,
free_bits, output_mask)``.
"""
from __future__ import annotations

import pytest
import torch

from fusedvae import reference
from helpers import ATOL64, F32, F64, RTOL64, REDUCTIONS, SCALED, make_inputs, make_log_scale

ops = torch.ops.fusedvae

# (likelihood, logits, log_scale kind as helpers.make_log_scale makes it): every
# reconstruction path of the op and every form of a Gaussian's scale: a
# per-element tensor (full, or broadcast from [C, 1, 1]), a 0-d tensor, a float
# (log_scale_value) and the batch optimum (optimal_scale).
OP_VARIANTS = [
    ("bernoulli", True, None),
    ("bernoulli", False, None),
    ("cbernoulli", True, None),
    ("cbernoulli", False, None),
    ("gaussian", True, "full_tensor"),
    ("gaussian", True, "broadcast_tensor"),
    ("gaussian", True, "scalar_tensor"),
    ("gaussian", True, "float"),
    ("gaussian", True, "optimal"),
    ("laplace", True, "full_tensor"),
    ("laplace", True, "scalar_tensor"),
    ("laplace", True, "float"),
    ("laplace", True, "optimal"),
]
OP_VARIANT_IDS = [f"{lik}-{'logits' if lg else 'probs'}-{ls}" for lik, lg, ls in OP_VARIANTS]
BETAS = ["float", "tensor"]  # beta_value, or a 0-d tensor (requiring grad where grads are asked for)
FREE_BITS = ["off", "on"]  # 0, or a λ between the dimensions' batch-mean KLs
BETA = 0.7
LATENT = (4, 2)  # J = 8 elements per sample, a spatial-style latent

# The upstream gradients given to vae_loss_backward, and the gradients asked for.
GRADS = {
    "loss": ("loss",),
    "rec": ("rec",),
    "kl": ("kl",),
    "all": ("loss", "rec", "kl"),
}
MASKS = {  # output_mask: (recon, mu and logvar, log_scale, beta)
    "all": (True, True, True, True),
    "recon": (True, False, False, False),
    "latent": (False, True, False, False),
    "scale_and_beta": (False, False, True, True),
    "no_recon": (False, True, True, True),
}


# ------------------------------------------------------------------ helpers --


def _kl_per_dim(inp):
    return 0.5 * (inp.mu.double() ** 2 + inp.logvar.double().exp() - 1 - inp.logvar.double())


def _free_bits(inp, kind) -> float:
    """0, or a λ halfway between the 2nd and 3rd smallest batch-mean KL of a
    latent dimension: some dimensions are clamped at λ, the others pass, and
    none lies at λ (where the fused and reference means could round apart)."""
    if kind == "off":
        return 0.0
    m = _kl_per_dim(inp).reshape(inp.mu.shape[0], -1).mean(0).sort().values.cpu()
    return float((m[1] + m[2]) / 2)


def _inputs(likelihood, logits, dtype, device="cpu", batch=3, sample_shape=(2, 3, 4), latent=LATENT):
    return make_inputs(likelihood, logits, dtype, latent, batch=batch, sample_shape=sample_shape,
                       device=device)


def _vae_args(inp, likelihood, logits, ls_kind, beta_kind, reduction, free_bits, requires_grad):
    """vae_loss's arguments for the inputs; recon, mu, logvar and any log_scale
    or beta tensor are fresh leaves, requiring grad where ``requires_grad``."""
    dtype, device = inp.recon.dtype, inp.recon.device
    log_scale = make_log_scale(ls_kind, inp.recon.shape, dtype=dtype, device=device)
    scale_tensor = log_scale.detach().requires_grad_(requires_grad) if isinstance(log_scale, torch.Tensor) else None
    scale_value = log_scale if isinstance(log_scale, float) else 0.0
    if beta_kind == "tensor":
        beta = torch.tensor(BETA, dtype=dtype, device=device, requires_grad=requires_grad)
        beta_value = 0.0
    else:
        beta, beta_value = None, BETA
    recon, mu, logvar = (t.detach().clone().requires_grad_(requires_grad) for t in (inp.recon, inp.mu, inp.logvar))
    return (recon, inp.target, mu, logvar, scale_tensor, beta, likelihood, logits, reduction,
            scale_value, ls_kind == "optimal", beta_value, free_bits)


def _reference_call(args):
    """fusedvae.reference.vae_loss on the same arguments (the Python API's form)."""
    recon, target, mu, logvar, scale, beta, likelihood, logits, reduction, scale_value, optimal, beta_value, fb = args
    if scale is not None:
        log_scale = scale
    elif optimal:
        log_scale = "optimal"
    else:
        log_scale = scale_value if likelihood in SCALED else None
    return reference.vae_loss(recon, target, mu, logvar, likelihood=likelihood, logits=logits,
                              beta=beta if beta is not None else beta_value, reduction=reduction,
                              log_scale=log_scale, free_bits=fb)


def _detached(args):
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def _backward_args(args, aux, grads, mask, loss_shape, seed=0):
    """vae_loss_backward's arguments: upstream gradients of the outputs named in
    ``grads`` (others None), each different per sample and other than 1."""
    recon = args[0]
    batch = recon.shape[0]
    acc = aux.dtype
    g = torch.Generator().manual_seed(seed)

    def upstream(shape):
        return (0.5 + 1.5 * torch.rand(shape, generator=g, dtype=F64)).to(acc).to(recon.device)

    grad_loss = upstream(loss_shape) if "loss" in grads else None
    grad_rec = upstream((batch,)) if "rec" in grads else None
    grad_kl = -upstream((batch,)) if "kl" in grads else None
    return (grad_loss, grad_rec, grad_kl, *args[:6], aux, *args[6:], list(mask))


def _opcheck(op, args):
    torch.library.opcheck(op, args)


# ---------------------------------------------------------- opcheck: vae_loss --


# opcheck compiles each call (test_aot_dispatch_dynamic, ~0.1 s): rather than
# every combination of (free bits, beta, dtype) with every reduction, each
# reduction meets two of the four combinations of free bits and beta, and
# together the reductions meet all four with both dtypes. (The values of every
# combination are checked against the reference below.)
OPCHECK_COMBOS = {  # reduction: ((free_bits, beta_kind, dtype), ...)
    "batchmean": (("off", "float", F32), ("on", "tensor", F64)),
    "sum": (("on", "float", F32), ("off", "tensor", F64)),
    "mean": (("off", "tensor", F32), ("on", "float", F64)),
    "none": (("on", "tensor", F32), ("off", "float", F64)),
}
OPCHECK_CASES = [(r, *combo) for r, combos in OPCHECK_COMBOS.items() for combo in combos]
OPCHECK_CASE_IDS = [f"{r}-freebits_{fb}-beta_{b}-{str(d)[6:]}" for r, fb, b, d in OPCHECK_CASES]


@pytest.mark.parametrize("reduction,free_bits,beta_kind,dtype", OPCHECK_CASES, ids=OPCHECK_CASE_IDS)
@pytest.mark.parametrize("likelihood,logits,ls_kind", OP_VARIANTS, ids=OP_VARIANT_IDS)
def test_opcheck_vae_loss(likelihood, logits, ls_kind, reduction, free_bits, beta_kind, dtype):
    # Every input that can require grad does (recon, mu, logvar, a log_scale
    # tensor, a beta tensor): the autograd registration and the compiled
    # backward (test_aot_dispatch_dynamic) see every gradient.
    inp = _inputs(likelihood, logits, dtype)
    fb = _free_bits(inp, free_bits)
    _opcheck(ops.vae_loss.default, _vae_args(inp, likelihood, logits, ls_kind, beta_kind, reduction, fb, True))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("likelihood,logits,ls_kind", OP_VARIANTS, ids=OP_VARIANT_IDS)
def test_opcheck_vae_loss_targets_and_layouts(likelihood, logits, ls_kind, dtype):
    inp = _inputs(likelihood, logits, dtype)
    args = _vae_args(inp, likelihood, logits, ls_kind, "tensor", "batchmean", _free_bits(inp, "on"), True)
    # uint8 and bool targets
    t8 = torch.randint(0, 256, inp.recon.shape, dtype=torch.uint8)
    _opcheck(ops.vae_loss.default, (args[0], t8, *args[2:]))
    _opcheck(ops.vae_loss.default, (args[0], t8 > 127, *args[2:]))
    # a channels_last recon (and target), and a channels_last spatial latent
    rc = args[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    tc = inp.target.contiguous(memory_format=torch.channels_last)
    _opcheck(ops.vae_loss.default, (rc, tc, *args[2:]))
    mu4, lv4 = (t.detach().reshape(3, 2, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
                for t in args[2:4])
    _opcheck(ops.vae_loss.default, (*args[:2], mu4, lv4, *args[4:]))
    # a beta tensor that is a buffer (a schedule's), not a parameter
    _opcheck(ops.vae_loss.default, (*args[:5], args[5].detach(), *args[6:]))
    # nothing requiring grad: no autograd node is recorded
    _opcheck(ops.vae_loss.default, _detached(args))


# ------------------------------------------------- opcheck: vae_loss_backward --

# (upstream gradients, output_mask): each upstream gradient alone, all three
# together, and gradients of every subset of the inputs.
BACKWARD_CASES = [
    ("loss", "all"),
    ("rec", "recon"),
    ("kl", "latent"),
    ("all", "all"),
    ("loss", "scale_and_beta"),
    ("all", "no_recon"),
]


@pytest.mark.parametrize("reduction,free_bits,beta_kind,dtype", OPCHECK_CASES, ids=OPCHECK_CASE_IDS)
@pytest.mark.parametrize("likelihood,logits,ls_kind", OP_VARIANTS, ids=OP_VARIANT_IDS)
def test_opcheck_vae_loss_backward(likelihood, logits, ls_kind, reduction, free_bits, beta_kind, dtype):
    inp = _inputs(likelihood, logits, dtype)
    args = _vae_args(inp, likelihood, logits, ls_kind, beta_kind, reduction, _free_bits(inp, free_bits), False)
    loss, _, _, aux = ops.vae_loss(*args)
    # Half the cases with each of a reduction's two combinations: so each case
    # meets every reduction, and both dtypes, beta kinds and free-bits settings.
    first_half = (dtype == F32) == (reduction in ("batchmean", "none"))
    for grads, mask in BACKWARD_CASES[0 if first_half else 1::2]:
        bargs = _backward_args(args, aux, GRADS[grads], MASKS[mask], loss.shape)
        _opcheck(ops.vae_loss_backward.default, bargs)


@pytest.mark.parametrize("likelihood,logits,ls_kind", OP_VARIANTS, ids=OP_VARIANT_IDS)
def test_opcheck_vae_loss_backward_layouts(likelihood, logits, ls_kind):
    inp = _inputs(likelihood, logits, F32)
    args = _vae_args(inp, likelihood, logits, ls_kind, "tensor", "none", _free_bits(inp, "on"), False)
    variants = [
        # a channels_last recon and target
        (args[0].contiguous(memory_format=torch.channels_last),
         inp.target.contiguous(memory_format=torch.channels_last), *args[2:]),
        # a uint8 target
        (args[0], torch.randint(0, 256, inp.recon.shape, dtype=torch.uint8), *args[2:]),
        # a channels_last spatial latent
        (*args[:2], *(t.reshape(3, 2, 2, 2).contiguous(memory_format=torch.channels_last) for t in args[2:4]),
         *args[4:]),
    ]
    for vargs in variants:
        loss, _, _, aux = ops.vae_loss(*vargs)
        for grads, mask in (("all", "all"), ("loss", "recon")):
            bargs = _backward_args(vargs, aux, GRADS[grads], MASKS[mask], loss.shape)
            _opcheck(ops.vae_loss_backward.default, bargs)


# ---------------------------------------------------- opcheck: KL and normaliser --


@pytest.mark.parametrize("dtype", [F32, F64])
def test_opcheck_kl_and_cb_ops(dtype):
    mu = torch.randn(3, 4, 2, dtype=dtype)
    lv = torch.randn(3, 4, 2, dtype=dtype)
    _opcheck(ops.gaussian_kl_per_dim.default, (mu.clone().requires_grad_(), lv.clone().requires_grad_()))
    _opcheck(ops.gaussian_kl_per_dim.default, (mu, lv))
    _opcheck(ops.gaussian_kl_per_dim_backward.default, (torch.randn(3, 4, 2, dtype=dtype), mu, lv))
    # a float32 upstream gradient beside float64 inputs, and the other way round
    other = F32 if dtype == F64 else F64
    _opcheck(ops.gaussian_kl_per_dim_backward.default, (torch.randn(3, 4, 2, dtype=other), mu, lv))
    # a channels_last latent
    mu4, lv4 = (torch.randn(3, 2, 4, 4, dtype=dtype).contiguous(memory_format=torch.channels_last) for _ in range(2))
    _opcheck(ops.gaussian_kl_per_dim.default, (mu4.requires_grad_(), lv4.requires_grad_()))
    _opcheck(ops.gaussian_kl_per_dim_backward.default, (torch.randn(3, 2, 4, 4, dtype=dtype), mu4.detach(), lv4.detach()))
    eta = torch.tensor([[0.0, 1e-3, -0.5, 2.0], [30.0, -30.0, 0.9, 1.1]], dtype=dtype)
    _opcheck(ops.cb_log_normalizer.default, (eta.clone().requires_grad_(),))
    _opcheck(ops.cb_log_normalizer_backward.default, (torch.randn_like(eta), eta))
    _opcheck(ops.cb_log_normalizer.default, (eta.t().requires_grad_(),))  # transposed: dense, not contiguous
    _opcheck(ops.cb_log_normalizer_backward.default, (torch.randn_like(eta).t(), eta.t()))


# ------------------------------------------------ op outputs against reference --


def _tolerance(dtype):
    return (RTOL64, ATOL64) if dtype == F64 else (1e-5, 1e-5)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("beta_kind", BETAS)
@pytest.mark.parametrize("free_bits", FREE_BITS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood,logits,ls_kind", OP_VARIANTS, ids=OP_VARIANT_IDS)
def test_vae_loss_op_against_reference(likelihood, logits, ls_kind, reduction, free_bits, beta_kind, dtype):
    # The raw op (not only fusedvae.vae_loss) computes the reference's loss,
    # rec and kl. float32 inputs are compared with the float64 reference of
    # exactly the same numbers.
    inp = _inputs(likelihood, logits, dtype)
    args = _vae_args(inp, likelihood, logits, ls_kind, beta_kind, reduction, _free_bits(inp, free_bits), False)
    loss, rec, kl, aux = ops.vae_loss(*args)
    wide = tuple(a.double() if isinstance(a, torch.Tensor) and a.dtype.is_floating_point else a for a in args)
    exp = _reference_call(wide)
    rtol, atol = _tolerance(dtype)
    acc = F64 if dtype == F64 else F32
    batch, latent = inp.recon.shape[0], inp.mu[0].numel()
    assert loss.shape == (() if reduction != "none" else (batch,))
    assert rec.shape == kl.shape == (batch,)
    assert aux.shape == (2 + 2 * batch + latent,)
    for name, got, expected in (("loss", loss, exp.loss), ("rec", rec, exp.rec), ("kl", kl, exp.kl)):
        assert got.dtype == acc, name
        torch.testing.assert_close(got, expected.to(acc), rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _reference_grads(args, grads):
    """The reference's gradients of Σ grad_loss·loss + Σ grad_rec·rec + Σ grad_kl·kl
    with respect to recon, mu, logvar, log_scale and beta (None where not a tensor)."""
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else None
              for a in (args[0], args[2], args[3], args[4], args[5])]
    ref_args = (leaves[0], args[1], leaves[1], leaves[2], leaves[3], leaves[4], *args[6:])
    out = _reference_call(ref_args)
    total = sum((g * o).sum() for g, o in zip(grads, out) if g is not None)
    wrt = [leaf for leaf in leaves if leaf is not None]
    values = iter(torch.autograd.grad(total, wrt, allow_unused=True))
    return [next(values) if leaf is not None else None for leaf in leaves]


@pytest.mark.parametrize("beta_kind", BETAS)
@pytest.mark.parametrize("free_bits", FREE_BITS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood,logits,ls_kind", OP_VARIANTS, ids=OP_VARIANT_IDS)
def test_vae_loss_backward_op_against_reference(likelihood, logits, ls_kind, reduction, free_bits, beta_kind):
    # float64: the backward op's gradients from any subset of upstream
    # gradients, for any output_mask, are the reference's; unwanted ones are
    # empty tensors of shape [0].
    inp = _inputs(likelihood, logits, F64)
    args = _vae_args(inp, likelihood, logits, ls_kind, beta_kind, reduction, _free_bits(inp, free_bits), False)
    loss, _, _, aux = ops.vae_loss(*args)
    names = ("recon", "mu", "logvar", "log_scale", "beta")
    for grads in GRADS.values():
        for mask_name, mask in MASKS.items():
            bargs = _backward_args(args, aux, grads, mask, loss.shape)
            got = ops.vae_loss_backward(*bargs)
            expected = _reference_grads(args, bargs[:3])
            wanted = (mask[0], mask[1], mask[1], mask[2] and args[4] is not None, mask[3] and args[5] is not None)
            for name, g, e, want in zip(names, got, expected, wanted):
                where = f"grads={grads} mask={mask_name}: grad {name}"
                if not want:
                    assert g.shape == (0,), where
                    continue
                if e is None:  # the inputs' value does not reach the outputs given a gradient
                    e = torch.zeros_like(g)
                assert g.shape == e.shape and g.dtype == e.dtype, where
                torch.testing.assert_close(g, e, rtol=RTOL64, atol=ATOL64, msg=lambda m, w=where: f"{w}: {m}")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_kl_and_cb_op_outputs_against_reference(dtype):
    inp = _inputs("bernoulli", True, dtype)
    rtol, atol = _tolerance(dtype)
    acc = F64 if dtype == F64 else F32
    per_dim = ops.gaussian_kl_per_dim(inp.mu, inp.logvar)
    assert per_dim.shape == inp.mu.shape and per_dim.dtype == acc
    torch.testing.assert_close(per_dim, _kl_per_dim(inp).to(acc), rtol=rtol, atol=atol)
    # summed over a sample, it is the reference's kl
    exp = reference.vae_loss(*(t.double() for t in inp), reduction="none")
    torch.testing.assert_close(per_dim.flatten(1).sum(1), exp.kl.to(acc), rtol=rtol, atol=atol)
    # the backward against autograd of the formula, for an upstream gradient per element
    g = torch.randn(inp.mu.shape, dtype=F64)
    mu, lv = (t.double().requires_grad_() for t in (inp.mu, inp.logvar))
    expected = torch.autograd.grad((g * 0.5 * (mu**2 + lv.exp() - 1 - lv)).sum(), (mu, lv))
    got = ops.gaussian_kl_per_dim_backward(g.to(acc), inp.mu, inp.logvar)
    for name, a, e in zip(("mu", "logvar"), got, expected):
        assert a.shape == inp.mu.shape and a.dtype == dtype, name
        torch.testing.assert_close(a, e.to(dtype), rtol=rtol, atol=atol)
    # the continuous-Bernoulli normaliser, near 0 (series), moderate and large
    eta = torch.tensor([[0.0, 1e-4, -1e-3, 0.3, -0.5], [0.9, 2.0, -7.5, 30.0, -80.0]], dtype=dtype)
    eta64 = eta.double().requires_grad_()
    ref = reference.continuous_bernoulli_log_normalizer(eta64)
    got = ops.cb_log_normalizer(eta)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref.detach().to(dtype), rtol=rtol, atol=atol)
    up = torch.linspace(-1.5, 2.0, eta.numel(), dtype=F64).reshape(eta.shape)
    (ref_grad,) = torch.autograd.grad((up * ref).sum(), eta64)
    got_grad = ops.cb_log_normalizer_backward(up.to(dtype), eta)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_grad, ref_grad.to(dtype), rtol=rtol, atol=atol)


# ------------------------------------------------------------- on each device --

DEVICE_OP_VARIANTS = [
    ("bernoulli", True, None),
    ("bernoulli", False, None),
    ("cbernoulli", True, None),
    ("cbernoulli", False, None),
    ("gaussian", True, "full_tensor"),
    ("gaussian", True, "scalar_tensor"),
    ("gaussian", True, "float"),
    ("gaussian", True, "optimal"),
    ("laplace", True, "full_tensor"),
    ("laplace", True, "optimal"),
]


def test_opcheck_on_device(device):
    # Samples of 3*17*19 elements: the kernels' vector tails and several
    # blocks per sample on a GPU.
    for (likelihood, logits, ls_kind), beta_kind in zip(DEVICE_OP_VARIANTS, BETAS * len(DEVICE_OP_VARIANTS)):
        inp = make_inputs(likelihood, logits, F32, (8,), batch=4, sample_shape=(3, 17, 19), device=device)
        for reduction, free_bits in (("batchmean", "on"), ("none", "off")):
            args = _vae_args(inp, likelihood, logits, ls_kind, beta_kind, reduction, _free_bits(inp, free_bits), True)
            _opcheck(ops.vae_loss.default, args)
            plain = _detached(args)
            loss, _, _, aux = ops.vae_loss(*plain)
            for grads, mask in (("all", "all"), ("rec", "recon")):
                bargs = _backward_args(plain, aux, GRADS[grads], MASKS[mask], loss.shape)
                _opcheck(ops.vae_loss_backward.default, bargs)
    mu, lv = (t.clone().requires_grad_() for t in make_inputs("bernoulli", True, F32, (8,), batch=4, device=device)[2:])
    _opcheck(ops.gaussian_kl_per_dim.default, (mu, lv))
    _opcheck(ops.gaussian_kl_per_dim_backward.default, (torch.randn_like(mu), mu.detach(), lv.detach()))
    eta = torch.randn(4, 3, 17, 19, device=device)
    _opcheck(ops.cb_log_normalizer.default, (eta.clone().requires_grad_(),))
    _opcheck(ops.cb_log_normalizer_backward.default, (torch.randn_like(eta), eta))

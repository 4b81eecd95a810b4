"""The objective's step in one pass over the data.

On the CPU, with float32 or float64 ``recon`` that requires grad and no
log-scale shared by the batch, ``fusedvae.vae_loss``'s forward runs
``fusedvae::vae_loss_and_grad``: the objective's outputs and, in the same pass,
recon's gradient for ``loss.backward()`` (a loss gradient of 1). A backward
with those upstream gradients returns that tensor as it is, bitwise the
two-pass result. Any other backward asks ``fusedvae::vae_loss_backward`` for
the per-sample factors c_b / c1 (``recon_coefficients=True``: c_b the
coefficients of recon's gradient, c1 those of ``loss.backward()``) and
multiplies the tensor in place by them: within 4 units of roundoff of the
two-pass result (2 float ulps), and bitwise it where the factors are powers of
two. Both ops
run on every device (on CUDA ``vae_loss_and_grad`` is a forward and a backward).
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

import fusedvae
from helpers import F32, F64, SCALED, VARIANT_IDS, VARIANTS, make_inputs, make_log_scale

ops = torch.ops.fusedvae

IDS = VARIANT_IDS


def _shared(likelihood, ls_kind):
    """Whether the batch shares one log-scale (a float, the default, a 0-d tensor, the optimum)."""
    return likelihood in SCALED and (ls_kind is None or ls_kind in ("float", "scalar_tensor", "optimal"))


PER_SAMPLE = [v for v in VARIANTS if not _shared(v[0], v[2])]
PER_SAMPLE_IDS = [i for i, v in zip(IDS, VARIANTS) if not _shared(v[0], v[2])]
MASK_ALL = [True, True, True, True]


def _inputs(likelihood, logits, dtype, device):
    # 3 x 105 elements: vector tails, and several chunks per sample on a GPU
    return make_inputs(likelihood, logits, dtype, (4, 2), batch=3, sample_shape=(3, 5, 7), device=device)


def _args(inp, likelihood, logits, ls_kind, reduction="batchmean", weight=None):
    """vae_loss's arguments (no tensor requires grad)."""
    log_scale = make_log_scale(ls_kind, inp.recon.shape, dtype=inp.recon.dtype, device=inp.recon.device)
    scale_tensor = log_scale.detach() if isinstance(log_scale, torch.Tensor) else None
    scale_value = log_scale if isinstance(log_scale, float) else 0.0
    return (inp.recon, inp.target, inp.mu, inp.logvar, scale_tensor, None, likelihood, logits, reduction,
            scale_value, ls_kind == "optimal", 0.7, 0.0, weight)


def _backward_args(args, aux, grad_loss, grad_rec, grad_kl, mask):
    return (grad_loss, grad_rec, grad_kl, *args[:6], aux, *args[6:13], mask, args[13])


def _weight(weighted, inp):
    if not weighted:
        return None
    g = torch.Generator().manual_seed(5)
    return torch.rand(1, 3, 5, 1, generator=g, dtype=F64).to(inp.recon.dtype).to(inp.recon.device)


def _per_sample(coef, like):
    return coef.view(-1, *([1] * (like.dim() - 1)))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=IDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_vae_loss_and_grad_is_vae_loss_and_the_gradient_of_the_loss(device, likelihood, logits, ls_kind, dtype,
                                                                     weighted, reduction):
    inp = _inputs(likelihood, logits, dtype, device)
    args = _args(inp, likelihood, logits, ls_kind, reduction, weight=_weight(weighted, inp))
    *outputs, grad = ops.vae_loss_and_grad(*args)
    expected = ops.vae_loss(*args)
    for got, exp in zip(outputs, expected):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    ones = torch.ones_like(outputs[0])
    (exp_grad, *_) = ops.vae_loss_backward(*_backward_args(args, outputs[3], ones, None, None,
                                                           [True, False, False, False]))
    assert grad.shape == inp.recon.shape and grad.dtype == inp.recon.dtype
    torch.testing.assert_close(grad, exp_grad, rtol=0, atol=0)


def test_vae_loss_and_grad_keeps_recons_layout(device):
    inp = _inputs("bernoulli", True, F32, device)
    recon = inp.recon.reshape(3, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    args = _args(inp, "bernoulli", True, None)
    *_, grad = ops.vae_loss_and_grad(recon, inp.target, *args[2:])
    *_, dense = ops.vae_loss_and_grad(*args)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad, dense, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("likelihood,logits,ls_kind", PER_SAMPLE, ids=PER_SAMPLE_IDS)
def test_recon_coefficients_turn_vae_loss_and_grads_gradient_into_recons_gradient(device, likelihood, logits,
                                                                                   ls_kind, reduction):
    inp = _inputs(likelihood, logits, F32, device)
    args = _args(inp, likelihood, logits, ls_kind, reduction, weight=_weight(True, inp))
    loss, rec, kl, aux, computed = ops.vae_loss_and_grad(*args)
    g = torch.Generator().manual_seed(3)

    def upstream(shape):
        return (0.5 + torch.rand(shape, generator=g, dtype=F64)).to(rec.dtype).to(device)

    # The per-element log_scale's gradient comes from recon's kernel: not asked for with coefficients.
    mask = [True, True, ls_kind is None, True]
    for grads in ((upstream(loss.shape), None, None), (None, upstream(rec.shape), None),
                  (upstream(loss.shape), upstream(rec.shape), -upstream(kl.shape))):
        bargs = _backward_args(args, aux, *grads, mask)
        full = ops.vae_loss_backward(*bargs)
        coef = ops.vae_loss_backward(*bargs, True)
        assert coef[0].shape == (3,) and coef[0].dtype == rec.dtype
        for got, exp in zip(coef[1:], full[1:]):  # the other gradients are the same
            torch.testing.assert_close(got, exp, rtol=0, atol=0)
        # The factors are c_b / c1: vae_loss_and_grad's gradient (c1·v) times them rounds
        # three times (c1·v, the factor, the product) where the two-pass kernel rounds c_b·v
        # once: 4 units of roundoff apart at most, and bitwise on the CPU where c1 is 1.
        scaled = computed * _per_sample(coef[0], computed)
        if device == "cpu" and reduction in ("sum", "none"):
            torch.testing.assert_close(scaled, full[0], rtol=0, atol=0)
        else:
            tol = 4 * 2.0**-24 if device == "cpu" else 2e-6
            torch.testing.assert_close(scaled, full[0], rtol=tol, atol=1e-30 if device == "cpu" else 1e-7)


@pytest.mark.parametrize("ls_kind", ["float", "scalar_tensor", "optimal"])
def test_recon_coefficients_refuse_a_shared_scale(device, ls_kind):
    inp = _inputs("gaussian", True, F32, device)
    args = _args(inp, "gaussian", True, ls_kind)
    _, rec, _, aux = ops.vae_loss(*args)
    bargs = _backward_args(args, aux, None, torch.ones_like(rec), None, [True, True, False, False])
    with pytest.raises(ValueError, match="expected recon_coefficients=False with one log-scale for the whole batch"):
        ops.vae_loss_backward(*bargs, True)


def test_recon_coefficients_refuse_a_per_element_scales_gradient(device):
    inp = _inputs("gaussian", True, F32, device)
    args = _args(inp, "gaussian", True, "full_tensor")
    _, rec, _, aux, _ = ops.vae_loss_and_grad(*args)
    bargs = _backward_args(args, aux, None, torch.ones_like(rec), None, MASK_ALL)
    with pytest.raises(ValueError, match=r"expected output_mask\[2\] to be False with recon_coefficients=True and "
                                         r"a per-element log_scale"):
        ops.vae_loss_backward(*bargs, True)


def _step(inp, ls, likelihood, logits, scale_grad=False, retain_graph=False):
    """fusedvae.vae_loss with reduction="none" and per-sample upstream gradients of
    loss and rec; returns (the ops the forward ran, grads, upstreams, leaves, out)."""
    recon, mu, logvar = (t.detach().clone().requires_grad_() for t in (inp.recon, inp.mu, inp.logvar))
    if isinstance(ls, torch.Tensor):
        ls = ls.detach().clone().requires_grad_(scale_grad)
    with profile() as prof:
        out = fusedvae.vae_loss(recon, inp.target, mu, logvar, likelihood=likelihood, logits=logits,
                                reduction="none", beta=0.7, log_scale=ls)
    ran = {e.name for e in prof.events() if e.name.startswith("fusedvae::")}
    u_loss = torch.linspace(0.5, 2.0, 3, dtype=out.loss.dtype, device=recon.device)
    u_rec = torch.linspace(-1.0, 0.3, 3, dtype=out.rec.dtype, device=recon.device)
    leaves = [recon, mu, logvar] + ([ls] if scale_grad else [])
    grads = torch.autograd.grad((out.loss, out.rec), leaves, (u_loss, u_rec), retain_graph=retain_graph)
    return ran, grads, (u_loss, u_rec), leaves, out


@pytest.mark.parametrize("dtype", [F32, F64, torch.float16])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=IDS)
def test_the_step_runs_one_pass_where_it_can_and_gives_the_two_pass_result(device, likelihood, logits, ls_kind,
                                                                          dtype):
    inp = _inputs(likelihood, logits, dtype, device)
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=dtype, device=device)
    tensors = ("full_tensor", "broadcast_tensor", "per_sample_tensor")
    for scale_grad in ([False, True] if ls_kind in tensors else [False]):
        ran, grads, (u_loss, u_rec), leaves, _ = _step(inp, ls, likelihood, logits, scale_grad)
        one_pass = device == "cpu" and dtype in (F32, F64) and not _shared(likelihood, ls_kind) and not scale_grad
        assert ("fusedvae::vae_loss_and_grad" in ran) == one_pass, ran
        # the two passes, the ops called directly
        args = _args(inp, likelihood, logits, ls_kind, "none")
        if scale_grad:
            args = (*args[:4], leaves[3].detach(), *args[5:])
        _, _, _, aux = ops.vae_loss(*args)
        expected = ops.vae_loss_backward(*_backward_args(args, aux, u_loss, u_rec, None,
                                                         [True, True, scale_grad, False]))
        for got, exp in zip(grads, expected[:3] + ((expected[3],) if scale_grad else ())):
            torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_loss_backward_returns_the_forwards_gradient_as_it_is(device, reduction):
    """loss.backward() (a loss gradient of 1, nothing else) gets the forward's
    gradient with no pass over it: no multiplication in the backward, and
    bitwise the two-pass result. A scaled loss multiplies it in place: bitwise
    for a power of two, within 4 units of roundoff otherwise."""
    inp = _inputs("bernoulli", True, F32, device)
    args = _args(inp, "bernoulli", True, None, reduction)
    _, _, _, aux = ops.vae_loss(*args)
    for factor in (1.0, 2.0, 3.0):
        recon, mu, logvar = (t.detach().clone().requires_grad_() for t in (inp.recon, inp.mu, inp.logvar))
        out = fusedvae.vae_loss(recon, inp.target, mu, logvar, reduction=reduction, beta=0.7)
        upstream = torch.full_like(out.loss, factor)
        with profile() as prof:
            grads = torch.autograd.grad(out.loss, (recon, mu, logvar), upstream)
        expected = ops.vae_loss_backward(*_backward_args(args, aux, upstream, None, None, [True, True, False, False]))
        scaled = "aten::mul_" in {e.name for e in prof.events()}
        assert scaled == (device == "cpu" and factor != 1.0)
        recon_exact = device != "cpu" or factor != 3.0
        torch.testing.assert_close(grads[0], expected[0], rtol=0 if recon_exact else 4 * 2.0**-24, atol=0)
        for got, exp in zip(grads[1:], expected[1:3]):  # mu and logvar: the same op call
            torch.testing.assert_close(got, exp, rtol=0, atol=0)


def test_a_retained_graph_gives_the_gradient_every_time(device):
    """The gradient computed in the forward is used once; a second backward
    through the retained graph computes it again (and may see another upstream)."""
    inp = _inputs("bernoulli", True, F32, device)
    ran, first, (u_loss, u_rec), (recon, mu, logvar), out = _step(inp, None, "bernoulli", True, retain_graph=True)
    second = torch.autograd.grad((out.loss, out.rec), (recon, mu, logvar), (u_loss, u_rec), retain_graph=True)
    third = torch.autograd.grad((out.loss, out.rec), (recon, mu, logvar), (2 * u_loss, 2 * u_rec))
    for a, b, c in zip(first, second, third):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, 2 * a, rtol=1e-6, atol=0)


def _allocated_bytes(prof):
    return sum(e.cpu_memory_usage for e in prof.events() if e.name in ("aten::empty", "aten::empty_strided")
               and e.cpu_memory_usage > 0)


def test_the_forward_allocates_the_gradient_and_the_backward_reuses_it():
    """The one-pass forward allocates recon's gradient (the backward's only
    full-size allocation, made earlier and held by the graph until the
    backward), and the backward scales and returns that tensor."""
    inp = make_inputs("bernoulli", True, F32, (8,), batch=4, sample_shape=(3, 64, 64))
    recon = inp.recon.detach().clone().requires_grad_()
    full = recon.numel() * recon.element_size()
    with profile(profile_memory=True) as forward:
        out = fusedvae.vae_loss(recon, inp.target, inp.mu, inp.logvar)
    with profile(profile_memory=True) as backward:
        (grad,) = torch.autograd.grad(out.loss, recon)
    assert _allocated_bytes(forward) >= full
    assert _allocated_bytes(backward) < full // 8
    assert grad.shape == recon.shape
    # a 16-bit recon takes the two passes: the backward allocates the gradient
    recon16 = recon.detach().half().requires_grad_()
    out16 = fusedvae.vae_loss(recon16, inp.target, inp.mu, inp.logvar)
    with profile(profile_memory=True) as backward16:
        torch.autograd.grad(out16.loss, recon16)
    assert _allocated_bytes(backward16) >= full // 2


def test_opcheck(device):
    for likelihood, logits, ls_kind in [("bernoulli", True, None), ("gaussian", True, "full_tensor"),
                                        ("laplace", True, "optimal")]:
        inp = _inputs(likelihood, logits, F32, device)
        args = _args(inp, likelihood, logits, ls_kind, "none", weight=_weight(True, inp))
        torch.library.opcheck(ops.vae_loss_and_grad.default, args)
        _, rec, _, aux, _ = ops.vae_loss_and_grad(*args)
        mask = [True, True, ls_kind != "full_tensor", False]
        bargs = _backward_args(args, aux, torch.rand_like(rec), torch.rand_like(rec), None, mask)
        torch.library.opcheck(ops.vae_loss_backward.default, (*bargs, ls_kind != "optimal"))

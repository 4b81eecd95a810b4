"""Gradients of the fused loss: autograd, and what torch.func can and cannot do.

First derivatives by autograd: ``torch.autograd.gradcheck`` over every
reconstruction path and reduction (and on each device), upstream gradients other than 1 (a scalar
factor, per-sample weights on rec, kl and the loss, one of rec/kl only), and a
gradient for a subset of the inputs, all against the float64 reference.

The autograd of every op is a C++ ``torch::autograd::Function`` (csrc/autograd.cpp).
What works besides plain autograd: ``torch.func.vmap`` over ``vae_loss`` and
over each op (batching rules, no per-slice fallback), also with inputs that
require grad and a backward through the vmapped result.

What raises, never a wrong number:

- torch.func's reverse-mode transforms (``grad``, ``vjp``, ``jacrev``,
  ``hessian``, ``vmap(grad(...))``, ``grad(vmap(...))``): PyTorch refuses C++
  autograd Functions under them;
- forward mode (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``):
  a ``RuntimeError`` from fusedvae (a dropped tangent would be a silent zero);
- second derivatives: ``create_graph=True`` followed by a second
  differentiation through a fused backward op. ``create_graph=True`` on its own
  still gives the right first derivatives.

``fusedvae.reference`` computes the same objective in plain PyTorch for all of these.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fusedvae
from fusedvae import reference
from helpers import (
    ATOL64,
    DEVICE_VARIANT_IDS,
    DEVICE_VARIANTS,
    REDUCTIONS,
    RTOL64,
    VARIANT_IDS,
    VARIANTS,
    compare_to_reference,
    loss_kw,
    make_inputs,
    make_log_scale,
)

F64 = torch.float64
ops = torch.ops.fusedvae
SECOND_ORDER = "second-order gradients"
RTOL, ATOL = 1e-10, 1e-12


@contextlib.contextmanager
def no_vmap_fallback():
    """Make vmap fail instead of looping over slices where an op has no batching rule."""
    was = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(was)


def _case(likelihood, logits, ls_kind, batch=3, seed=0):
    inp = make_inputs(likelihood, logits, F64, (2, 3), batch=batch, sample_shape=(2, 3, 4), seed=seed)
    ls = make_log_scale(ls_kind, inp.recon.shape)
    ls = ls.detach() if isinstance(ls, torch.Tensor) else ls
    return inp, ls


def _loss_fn(fn, target, ls, **kw):
    if isinstance(ls, torch.Tensor):
        return lambda r, m, lv, s: fn(r, target, m, lv, log_scale=s, **kw).loss
    return lambda r, m, lv: fn(r, target, m, lv, log_scale=ls, **kw).loss


def _primals(inp, ls):
    return (inp.recon, inp.mu, inp.logvar) + ((ls,) if isinstance(ls, torch.Tensor) else ())


def _close(got, exp, rtol=RTOL, atol=ATOL):
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(exp)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------- torch.func, reverse ---


def _reverse_transforms(fn, inp):
    f = lambda r: fn(r, inp.target, inp.mu, inp.logvar, likelihood="cbernoulli").loss  # noqa: E731

    def one(r, t, m, lv):  # one sample: add the batch dimension back
        return fn(r[None], t[None], m[None], lv[None], likelihood="cbernoulli").loss

    per = lambda r, t, m, lv: fn(r, t, m, lv, reduction="none").loss.sum()  # noqa: E731
    stacked = inp.recon[None].expand(2, *inp.recon.shape)
    return {
        "grad": lambda: grad(f)(inp.recon),
        "vjp": lambda: vjp(f, inp.recon)[1](torch.tensor(1.0, dtype=F64)),
        "jacrev": lambda: jacrev(f)(inp.recon),
        "hessian": lambda: hessian(f)(inp.recon),
        "vmap_of_grad": lambda: vmap(grad(one))(inp.recon, inp.target, inp.mu, inp.logvar),
        "grad_of_vmap": lambda: grad(lambda r: vmap(per, in_dims=(0, None, None, None))(r, inp.target, inp.mu, inp.logvar).sum())(stacked),
    }


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "hessian", "vmap_of_grad", "grad_of_vmap"])
def test_func_reverse_transforms_raise_and_the_reference_works(transform):
    inp, _ = _case("cbernoulli", True, None)
    with pytest.raises(RuntimeError, match="torch::autograd::Function with functorch transforms"):
        _reverse_transforms(fusedvae.vae_loss, inp)[transform]()
    # the documented way out: the reference under the transform, checked on grad
    if transform == "grad":
        leaf = inp.recon.clone().requires_grad_()
        (exp,) = torch.autograd.grad(fusedvae.vae_loss(leaf, inp.target, inp.mu, inp.logvar, likelihood="cbernoulli").loss, leaf)
        _close(_reverse_transforms(reference.vae_loss, inp)[transform](), exp)


# ----------------------------------------------------------------- vmap ---


@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_vmap_matches_python_loop(likelihood, logits, ls_kind):
    v = 4
    slices = [_case(likelihood, logits, ls_kind, seed=s) for s in range(v)]
    stack = lambda k: torch.stack([getattr(inp, k) for inp, _ in slices])  # noqa: E731
    ls_stack = torch.stack([ls for _, ls in slices]) if isinstance(slices[0][1], torch.Tensor) else slices[0][1]
    kw = dict(likelihood=likelihood, logits=logits, reduction="none", free_bits=0.3, beta=0.7)

    def f(r, t, m, lv, s):
        return tuple(fusedvae.vae_loss(r, t, m, lv, log_scale=s, **kw))

    in_dims = (0, 0, 0, 0, 0 if isinstance(ls_stack, torch.Tensor) else None)
    with no_vmap_fallback():
        got = vmap(f, in_dims=in_dims)(stack("recon"), stack("target"), stack("mu"), stack("logvar"), ls_stack)
    loop = [f(*inp, ls) for inp, ls in slices]
    for i, name in enumerate(("loss", "rec", "kl")):
        expected = torch.stack([out[i] for out in loop])
        # each sample is reduced exactly as without vmap
        assert torch.equal(got[i], expected), name


def test_vmap_in_dims_other_than_zero_and_unbatched_arguments():
    inp, _ = _case("gaussian", True, None, batch=3)
    g = torch.Generator().manual_seed(5)
    recon_v = torch.randn(3, 5, 2, 3, 4, generator=g, dtype=F64)  # vmapped dim 1, size 5
    ls_v = 0.3 * torch.randn(5, 3, 2, 3, 4, generator=g, dtype=F64)

    def f(r, t, m, lv, s):
        return fusedvae.vae_loss(r, t, m, lv, likelihood="gaussian", log_scale=s, reduction="none").loss

    with no_vmap_fallback():
        # recon batched at dim 1, target/mu/logvar shared (not batched), log_scale batched at 0
        got = vmap(f, in_dims=(1, None, None, None, 0))(recon_v, inp.target, inp.mu, inp.logvar, ls_v)
    expected = torch.stack([f(recon_v[:, i], inp.target, inp.mu, inp.logvar, ls_v[i]) for i in range(5)])
    assert torch.equal(got, expected)
    # only the target batched
    t_v = torch.rand(5, *inp.target.shape, generator=g, dtype=F64)
    with no_vmap_fallback():
        got = vmap(lambda t: fusedvae.vae_loss(inp.recon, t, inp.mu, inp.logvar, reduction="none").rec)(t_v)
    expected = torch.stack([fusedvae.vae_loss(inp.recon, t, inp.mu, inp.logvar, reduction="none").rec for t in t_v])
    assert torch.equal(got, expected)


def test_vmap_of_each_op_including_the_backward_ops():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, generator=g, dtype=F64)
    t = torch.rand(4, 3, 5, generator=g, dtype=F64)
    s = 0.2 * torch.randn(4, 3, 5, generator=g, dtype=F64)
    gb = torch.randn(4, 3, generator=g, dtype=F64)
    m = torch.randn(4, 3, 2, generator=g, dtype=F64)

    def loss(lik, scale=None, **kw):
        def f(x, t, s, gb):
            mu, lv = m[0] + 0 * gb[..., None], 0.5 * m[0]
            sc = s if scale == "tensor" else None
            return ops.vae_loss(x, t, mu, lv, sc, None, lik, True, kw.get("reduction", "batchmean"), 0.0,
                                scale == "optimal", 0.7, kw.get("free_bits", 0.0))[:3]
        return f

    def backward(lik, scale=None):
        def f(x, t, s, gb):
            mu, lv = m[0] + 0 * gb[..., None], 0.5 * m[0]
            sc = s if scale == "tensor" else None
            args = (x, t, mu, lv, sc, None, lik, True, "none", 0.0, scale == "optimal", 0.7, 0.2)
            aux = ops.vae_loss(*args)[3]
            return ops.vae_loss_backward(gb, None, 2 * gb, x, t, mu, lv, sc, None, aux, *args[6:],
                                         [True, True, scale == "tensor", False])
        return f

    cases = [
        (loss("cbernoulli"), (0, 0, None, None)),
        (loss("gaussian", "tensor", reduction="none"), (0, None, 0, None)),
        (loss("gaussian", "optimal", free_bits=0.3), (0, 0, None, 0)),
        (backward("bernoulli"), (0, 0, None, 0)),
        (backward("gaussian", "tensor"), (0, 0, 0, 0)),
        (backward("gaussian", "optimal"), (None, 0, None, 0)),
        (lambda x, t, s, gb: ops.gaussian_kl_per_dim(x, s), (None, None, 0, None)),
        (lambda x, t, s, gb: ops.gaussian_kl_per_dim_backward(t, x, s), (0, 0, None, None)),
        (lambda x, t, s, gb: ops.cb_log_normalizer(x), (0, None, None, None)),
        (lambda x, t, s, gb: ops.cb_log_normalizer_backward(t, x), (0, 0, None, None)),
        (lambda x, t, s, gb: ops.cb_log_normalizer_backward(t, x), (None, 0, None, None)),
    ]
    args = (x, t, s, gb)
    for i, (f, in_dims) in enumerate(cases):
        with no_vmap_fallback():
            got = vmap(f, in_dims=in_dims)(*(a if d is not None else a[0] for a, d in zip(args, in_dims)))
        loop = [f(*(a[k] if d is not None else a[0] for a, d in zip(args, in_dims))) for k in range(4)]
        got = got if isinstance(got, tuple) else (got,)
        loop = [o if isinstance(o, tuple) else (o,) for o in loop]
        assert len(got) == len(loop[0])
        for j, out in enumerate(got):
            torch.testing.assert_close(out, torch.stack([o[j] for o in loop]), rtol=0, atol=0, msg=f"case {i}")


def test_vmap_inside_autograd_backward():
    slices = [_case("bernoulli", False, None, seed=s)[0] for s in range(3)]
    recon = torch.stack([s.recon for s in slices]).requires_grad_()
    rest = [torch.stack([getattr(s, k) for s in slices]) for k in ("target", "mu", "logvar")]
    with no_vmap_fallback():
        out = vmap(lambda r, t, m, lv: fusedvae.vae_loss(r, t, m, lv, logits=False).loss)(recon, *rest)
    (g,) = torch.autograd.grad((out * torch.tensor([1.0, 2.0, -1.0], dtype=F64)).sum(), recon)
    for i, s in enumerate(slices):
        leaf = s.recon.clone().requires_grad_()
        (e,) = torch.autograd.grad(reference.vae_loss(leaf, s.target, s.mu, s.logvar, logits=False).loss * [1.0, 2.0, -1.0][i], leaf)
        torch.testing.assert_close(g[i], e, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------- forward mode ---

FORWARD_MODE = "forward-mode derivatives"


@pytest.mark.parametrize("which", ["recon", "target", "mu", "logvar", "log_scale", "beta"])
@pytest.mark.parametrize("how", ["jvp", "jacfwd", "forward_ad", "forward_ad_no_grad"])
def test_forward_mode_raises_instead_of_dropping_the_tangent(how, which):
    inp, ls = _case("gaussian", True, "full_tensor")
    args = {"recon": inp.recon, "target": inp.target, "mu": inp.mu, "logvar": inp.logvar, "log_scale": ls,
            "beta": torch.tensor(0.5, dtype=F64)}

    def f(x):
        kw = dict(args, **{which: x})
        return fusedvae.vae_loss(kw["recon"], kw["target"], kw["mu"], kw["logvar"], likelihood="gaussian",
                                 log_scale=kw["log_scale"], beta=kw["beta"]).loss

    x = args[which]
    calls = {
        "jvp": lambda: jvp(f, (x,), (torch.ones_like(x),)),
        "jacfwd": lambda: jacfwd(f)(x),
    }
    with pytest.raises(RuntimeError, match=f"{FORWARD_MODE}.*fusedvae::vae_loss"):
        if how in calls:
            calls[how]()
        else:
            with torch.set_grad_enabled(how == "forward_ad"), fwAD.dual_level():
                f(fwAD.make_dual(x, torch.ones_like(x)))


@pytest.mark.parametrize("op", ["cb_log_normalizer", "gaussian_kl_per_dim"])
def test_forward_mode_raises_for_the_other_ops(op):
    x = torch.linspace(-4, 4, 12, dtype=F64).reshape(3, 4)
    fn = {
        "cb_log_normalizer": fusedvae.continuous_bernoulli_log_normalizer,
        "gaussian_kl_per_dim": lambda m: ops.gaussian_kl_per_dim(m, torch.zeros_like(m)),
    }[op]
    with pytest.raises(RuntimeError, match=f"{FORWARD_MODE}.*fusedvae::{op}"):
        jvp(fn, (x,), (torch.ones_like(x),))


# --------------------------------------------------------- second order ---


def _first_order(likelihood="bernoulli", which="recon"):
    inp, _ = _case(likelihood, True, None)
    leaves = {k: getattr(inp, k).clone().requires_grad_() for k in ("recon", "mu", "logvar")}
    out = fusedvae.vae_loss(leaves["recon"], inp.target, leaves["mu"], leaves["logvar"], likelihood=likelihood)
    (g,) = torch.autograd.grad(out.loss, leaves[which], create_graph=True)
    return leaves, g, inp


@pytest.mark.parametrize("likelihood,which,op", [
    ("bernoulli", "recon", "vae_loss_backward"),
    ("gaussian", "recon", "vae_loss_backward"),
    ("cbernoulli", "mu", "vae_loss_backward"),
    ("bernoulli", "logvar", "vae_loss_backward"),
])
def test_double_backward_raises_clearly(likelihood, which, op):
    leaves, g, _ = _first_order(likelihood, which)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered" fallback
        with pytest.raises(RuntimeError, match=f"{SECOND_ORDER}.*fusedvae::{op}") as info:
            # + leaf.sum(): the leaf is used, so a silently dropped term would not raise by itself
            torch.autograd.grad((g**2).sum() + leaves[which].sum(), leaves[which])
    assert "first derivatives only" in str(info.value)


def test_create_graph_alone_gives_the_right_first_derivatives():
    leaves, g, inp = _first_order("cbernoulli", "recon")
    leaf = inp.recon.clone().requires_grad_()
    (exp,) = torch.autograd.grad(reference.vae_loss(leaf, inp.target, inp.mu, inp.logvar, likelihood="cbernoulli").loss, leaf)
    _close(g, exp)
    assert g.requires_grad  # part of a graph; only differentiating through it raises


def test_cb_log_normalizer_double_backward_raises():
    x = torch.linspace(-3, 3, 7, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(fusedvae.continuous_bernoulli_log_normalizer(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{SECOND_ORDER}.*fusedvae::cb_log_normalizer_backward"):
        torch.autograd.grad(g.sum(), x)


def test_kl_per_dim_double_backward_raises():
    mu = torch.randn(3, 4, dtype=F64, requires_grad=True)
    lv = torch.randn(3, 4, dtype=F64)
    (g,) = torch.autograd.grad(ops.gaussian_kl_per_dim(mu, lv).sum(), mu, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{SECOND_ORDER}.*fusedvae::gaussian_kl_per_dim_backward"):
        torch.autograd.grad(g.sum(), mu)


# ------------------------------------------- gradcheck, upstream gradients ---

def _gradcheck_case(likelihood, logits, ls_kind, reduction, free_bits, latent_shape, batch=3, sample_shape=(2, 3, 4),
                    device="cpu"):
    inp = make_inputs(likelihood, logits, F64, latent_shape, batch=batch, sample_shape=sample_shape, device=device)
    ls = make_log_scale(ls_kind, inp.recon.shape, device=device)
    tensors = [inp.recon.clone().requires_grad_(), inp.mu.clone().requires_grad_(), inp.logvar.clone().requires_grad_()]
    ls_is_tensor = isinstance(ls, torch.Tensor)
    if ls_is_tensor:
        tensors.append(ls.detach().clone().requires_grad_())

    def f(recon, mu, logvar, *rest):
        out = fusedvae.vae_loss(
            recon,
            inp.target,
            mu,
            logvar,
            log_scale=rest[0] if ls_is_tensor else ls,
            **loss_kw(likelihood, logits, reduction, free_bits),
        )
        return out.loss, out.rec, out.kl

    assert torch.autograd.gradcheck(f, tuple(tensors), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_gradcheck(likelihood, logits, ls_kind, reduction):
    _gradcheck_case(likelihood, logits, ls_kind, reduction, 0.0, (5,))


@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_gradcheck_free_bits_spatial_latent(likelihood, logits, ls_kind):
    _gradcheck_case(likelihood, logits, ls_kind, "batchmean", 0.6, (2, 2, 2))


@pytest.mark.parametrize("likelihood,logits,ls_kind", DEVICE_VARIANTS, ids=DEVICE_VARIANT_IDS)
def test_gradcheck_on_device(device, likelihood, logits, ls_kind):
    _gradcheck_case(likelihood, logits, ls_kind, "none", 0.0, (8,), batch=2, sample_shape=(2, 3, 5), device=device)


@pytest.mark.parametrize("free_bits", [0.0, 0.6], ids=["fb0", "fb0.6"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_scalar_upstream_gradient(likelihood, logits, ls_kind, reduction, free_bits):
    inputs = make_inputs(likelihood, logits, F64, (5,))
    compare_to_reference(
        inputs, ls_kind, upstream=lambda o: 3.7 * o.loss, **loss_kw(likelihood, logits, reduction, free_bits)
    )


@pytest.mark.parametrize("free_bits", [0.0, 0.6], ids=["fb0", "fb0.6"])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_per_sample_upstream_gradients(likelihood, logits, ls_kind, reduction, free_bits):
    inputs = make_inputs(likelihood, logits, F64, (4, 2, 2))
    g = torch.Generator().manual_seed(7)
    w1, w2, w3 = (torch.randn(3, generator=g, dtype=F64) for _ in range(3))

    def upstream(out):
        # A GECO-like objective: separate random weights on rec, kl and the loss.
        return (w1 * out.rec).sum() + (w2 * out.kl).sum() + (w3 * out.loss).sum()

    compare_to_reference(inputs, ls_kind, upstream=upstream, **loss_kw(likelihood, logits, reduction, free_bits))


@pytest.mark.parametrize("likelihood,logits", [("bernoulli", True), ("cbernoulli", True), ("gaussian", True), ("laplace", True)])
def test_gradient_of_rec_only_and_kl_only(likelihood, logits):
    # Only one of the two per-sample outputs feeds the objective: the other
    # op gets no (or a zero) upstream gradient.
    inputs = make_inputs(likelihood, logits, F64, (5,))
    for pick in (lambda o: (2.0 * o.rec).sum(), lambda o: (-1.5 * o.kl).sum()):
        compare_to_reference(inputs, None, upstream=pick, **loss_kw(likelihood, logits, "none"))


@pytest.mark.parametrize("which", ["recon", "mu", "logvar", "log_scale"])
def test_gradient_for_a_subset_of_inputs(which):
    # Only one input requires grad; the others are plain tensors.
    inp = make_inputs("gaussian", True, F64, (5,))
    ls = make_log_scale("full_tensor", inp.recon.shape).detach()
    results = []
    for fn in (fusedvae.vae_loss, reference.vae_loss):
        args = {"recon": inp.recon.clone(), "mu": inp.mu.clone(), "logvar": inp.logvar.clone(), "log_scale": ls.clone()}
        args[which].requires_grad_()
        out = fn(args["recon"], inp.target, args["mu"], args["logvar"], likelihood="gaussian", log_scale=args["log_scale"])
        out.loss.backward()
        results.append((out.loss, args[which].grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=RTOL64, atol=ATOL64)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=RTOL64, atol=ATOL64)
    # and nothing requires grad at all
    out = fusedvae.vae_loss(inp.recon, inp.target, inp.mu, inp.logvar, likelihood="gaussian", log_scale=ls)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, results[1][0].detach(), rtol=RTOL64, atol=ATOL64)



# ------------------------------------------- outputs alone, saved tensors ---


def test_each_output_backpropagates_alone_or_together():
    # One node, any subset of (loss, rec, kl) gradients: backward through each
    # output alone (retain_graph) sums to backward through all of them at once,
    # and each matches the reference.
    inp, ls = _case("gaussian", True, "scalar_tensor")
    kw = dict(likelihood="gaussian", reduction="none", free_bits=0.2, beta=torch.tensor(0.7, dtype=F64, requires_grad=True))
    weights = [torch.tensor([1.0, -2.0, 0.5], dtype=F64), torch.tensor([0.3, 1.0, 2.0], dtype=F64),
               torch.tensor([-1.0, 0.5, 1.5], dtype=F64)]
    leaves = [inp.recon.clone().requires_grad_(), inp.mu.clone().requires_grad_(),
              inp.logvar.clone().requires_grad_(), ls.clone().requires_grad_(), kw["beta"]]

    def outputs(fn):
        return fn(leaves[0], inp.target, leaves[1], leaves[2], log_scale=leaves[3], **kw)

    out = outputs(fusedvae.vae_loss)
    alone = [torch.autograd.grad((o * w).sum(), leaves, retain_graph=True, allow_unused=True)
             for o, w in zip(out, weights)]
    together = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), leaves)
    ref = outputs(reference.vae_loss)
    for i, (o, w) in enumerate(zip(ref, weights)):
        exp = torch.autograd.grad((o * w).sum(), leaves, retain_graph=True, allow_unused=True)
        for got, e in zip(alone[i], exp):
            if e is None:
                assert got is None or torch.count_nonzero(got) == 0
            else:
                _close(got, e)
    for j, total in enumerate(together):
        parts = [a[j] for a in alone if a[j] is not None]
        _close(total, sum(parts))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_input_requires_grad"])
def test_nothing_is_saved_without_a_graph(mode):
    inp, _ = _case("bernoulli", True, None)
    recon = inp.recon.clone().requires_grad_(mode != "no_input_requires_grad")
    packed = []
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "no_input_requires_grad": contextlib.nullcontext}[mode]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t), ctx():
        out = fusedvae.vae_loss(recon, inp.target, inp.mu, inp.logvar, free_bits=0.1)
    assert packed == [] and out.loss.grad_fn is None


def test_what_a_graph_saves_is_the_inputs_and_a_small_aux():
    # No full-size intermediate is kept for the backward: the inputs themselves
    # and aux, 2 + 2B + J numbers.
    inp, ls = _case("gaussian", True, "full_tensor")
    leaves = [inp.recon.clone().requires_grad_(), inp.mu.clone().requires_grad_(), inp.logvar.clone().requires_grad_()]
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        fusedvae.vae_loss(leaves[0], inp.target, leaves[1], leaves[2], likelihood="gaussian", log_scale=ls)
    inputs = [leaves[0], inp.target, leaves[1], leaves[2], ls]
    batch, latent = inp.mu.shape[0], inp.mu[0].numel()
    extra = [t for t in packed if not any(t is i for i in inputs)]
    assert len(extra) == 1 and extra[0].numel() == 2 + 2 * batch + latent

"""Gradients of the fused loss: autograd, torch.func and higher-order autograd.

First derivatives by autograd: ``torch.autograd.gradcheck`` over every
reconstruction path and reduction (and on each device), upstream gradients other than 1 (a scalar
factor, per-sample weights on rec, kl and the loss, one of rec/kl only), and a
gradient for a subset of the inputs, all against the float64 reference.

torch.func; what works (each against the reference or a Python loop):

- ``torch.func.grad`` / ``vjp`` / ``jacrev`` over ``vae_loss(...).loss``;
- ``torch.func.vmap`` over ``vae_loss`` and over each op, through batching rules
  that fold the vmapped dimension into the batch (no per-slice fallback: the
  fallback is switched off while these tests run), including ``vmap(grad(...))``
  for per-sample gradients and ``grad(vmap(...))``;
- forward mode: ``torch.func.jvp`` / ``jacfwd`` and ``torch.autograd.forward_ad``
  (also under ``torch.no_grad``).

What raises: anything that needs second derivatives of the fused terms —
``create_graph=True`` followed by a second differentiation, ``torch.func.hessian``,
``grad(grad(...))``, ``jacfwd(jacrev(...))`` — raises a ``RuntimeError`` saying so
(the kernels compute first derivatives only). Before, PyTorch's autograd
fallback let the second differentiation through with a zero contribution and
only a warning: silently wrong Hessian-vector products. ``create_graph=True`` on
its own still gives the right first derivatives.
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


# ------------------------------------------------------------ func.grad ---


@pytest.mark.parametrize("reduction,free_bits", [("batchmean", 0.0), ("sum", 0.4), ("mean", 0.0)])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_func_grad_matches_autograd_and_reference(likelihood, logits, ls_kind, reduction, free_bits):
    inp, ls = _case(likelihood, logits, ls_kind)
    kw = dict(likelihood=likelihood, logits=logits, reduction=reduction, free_bits=free_bits, beta=0.7)
    primals = _primals(inp, ls)
    argnums = tuple(range(len(primals)))
    got = grad(_loss_fn(fusedvae.vae_loss, inp.target, ls, **kw), argnums=argnums)(*primals)
    leaves = [p.clone().requires_grad_() for p in primals]
    loss = _loss_fn(fusedvae.vae_loss, inp.target, ls, **kw)(*leaves)
    autograd = torch.autograd.grad(loss, leaves)
    _close(got, autograd, rtol=0, atol=0)  # the same kernels, the same order
    exp = grad(_loss_fn(reference.vae_loss, inp.target, ls, **kw), argnums=argnums)(*primals)
    _close(got, exp)


def test_vjp_and_jacrev_match_reference():
    inp, _ = _case("cbernoulli", True, None)
    kw = dict(likelihood="cbernoulli", reduction="none", free_bits=0.2)
    f = lambda fn: (lambda r, m: fn(r, inp.target, m, inp.logvar, **kw).loss)  # noqa: E731
    out, pull = vjp(f(fusedvae.vae_loss), inp.recon, inp.mu)
    out_r, pull_r = vjp(f(reference.vae_loss), inp.recon, inp.mu)
    cot = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    _close((out, pull(cot)), (out_r, pull_r(cot)))
    _close(jacrev(f(fusedvae.vae_loss), argnums=(0, 1))(inp.recon, inp.mu),
           jacrev(f(reference.vae_loss), argnums=(0, 1))(inp.recon, inp.mu))


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
    cases = [
        (lambda x, t, s, gb: ops.recon_loss(x, t, None, "cbernoulli", True), (0, 0, None, None)),
        (lambda x, t, s, gb: ops.recon_loss(x, t, s, "gaussian", True), (0, None, 0, None)),
        (lambda x, t, s, gb: ops.recon_loss_backward(gb, x, t, None, "bernoulli", False)[0], (0, 0, None, 0)),
        (lambda x, t, s, gb: ops.recon_loss_backward(gb, x, t, s, "gaussian", True), (0, 0, 0, 0)),
        (lambda x, t, s, gb: ops.recon_loss_backward(gb, x, t, s, "gaussian", True), (None, None, 0, 0)),
        (lambda x, t, s, gb: ops.gaussian_kl(x, s), (0, None, 0, None)),
        (lambda x, t, s, gb: ops.gaussian_kl_per_dim(x, s), (None, None, 0, None)),
        (lambda x, t, s, gb: ops.gaussian_kl_backward(gb, x, s), (0, None, 0, 0)),
        (lambda x, t, s, gb: ops.gaussian_kl_backward(t, x, s), (0, 0, None, None)),
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
        for j, out in enumerate(got):
            if out.numel() == 0:  # recon_loss_backward's empty grad_log_scale placeholder
                continue
            torch.testing.assert_close(out, torch.stack([o[j] for o in loop]), rtol=0, atol=0, msg=f"case {i}")


def test_per_sample_gradients_vmap_of_grad():
    inp, _ = _case("cbernoulli", True, None, batch=5)

    def loss(r, t, m, lv):  # one sample: add the batch dimension back
        return fusedvae.vae_loss(r[None], t[None], m[None], lv[None], likelihood="cbernoulli").loss

    with no_vmap_fallback():
        per_sample = vmap(grad(loss, argnums=(0, 2, 3)))(inp.recon, inp.target, inp.mu, inp.logvar)
    for b in range(5):
        leaves = [a[b : b + 1].clone().requires_grad_() for a in (inp.recon, inp.mu, inp.logvar)]
        exp = torch.autograd.grad(
            reference.vae_loss(leaves[0], inp.target[b : b + 1], leaves[1], leaves[2], likelihood="cbernoulli").loss, leaves
        )
        for got, e in zip(per_sample, exp):
            torch.testing.assert_close(got[b], e[0], rtol=RTOL, atol=ATOL)


def test_grad_of_vmap():
    slices = [_case("gaussian", True, "optimal", seed=s)[0] for s in range(3)]
    recon = torch.stack([s.recon for s in slices])
    rest = [torch.stack([getattr(s, k) for s in slices]) for k in ("target", "mu", "logvar")]

    def total(fn):
        per = lambda r, t, m, lv: fn(r, t, m, lv, likelihood="gaussian", log_scale="optimal", free_bits=0.1).loss  # noqa: E731
        return lambda r: vmap(per)(r, *rest).sum()

    with no_vmap_fallback():
        got = grad(total(fusedvae.vae_loss))(recon)
    _close(got, grad(total(reference.vae_loss))(recon))


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


@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_jvp_and_jacfwd_match_reference(likelihood, logits, ls_kind):
    inp, ls = _case(likelihood, logits, ls_kind)
    kw = dict(likelihood=likelihood, logits=logits, reduction="none", free_bits=0.3, beta=0.7)
    primals = _primals(inp, ls)
    g = torch.Generator().manual_seed(9)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=F64) for p in primals)
    got = jvp(_loss_fn(fusedvae.vae_loss, inp.target, ls, **kw), primals, tangents)
    exp = jvp(_loss_fn(reference.vae_loss, inp.target, ls, **kw), primals, tangents)
    _close(got, exp)
    assert got[1].abs().max() > 0
    argnums = tuple(range(len(primals)))
    _close(jacfwd(_loss_fn(fusedvae.vae_loss, inp.target, ls, **kw), argnums=argnums)(*primals),
           jacrev(_loss_fn(reference.vae_loss, inp.target, ls, **kw), argnums=argnums)(*primals))


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_forward_ad_dual_tensors(grad_mode):
    inp, ls = _case("cbernoulli", False, None)
    tangents = [0.1 * torch.ones_like(inp.recon), torch.randn_like(inp.mu), torch.randn_like(inp.logvar)]
    results = []
    for fn in (fusedvae.vae_loss, reference.vae_loss):
        with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip((inp.recon, inp.mu, inp.logvar), tangents)]
            out = fn(duals[0], inp.target, duals[1], duals[2], likelihood="cbernoulli", logits=False, reduction="none")
            results.append([fwAD.unpack_dual(v) for v in out])
    for (p1, t1), (p2, t2) in zip(*results):
        assert t1 is not None, "the tangent was dropped"
        _close((p1, t1), (p2, t2))


def test_cb_log_normalizer_forward_mode():
    x = torch.linspace(-40, 40, 101, dtype=F64)
    t = torch.randn(101, dtype=F64)
    got = jvp(fusedvae.continuous_bernoulli_log_normalizer, (x,), (t,))
    exp = jvp(reference.continuous_bernoulli_log_normalizer, (x,), (t,))
    _close(got, exp, rtol=1e-9, atol=1e-12)


def test_tangent_on_target_raises():
    inp, _ = _case("bernoulli", True, None)
    with pytest.raises(RuntimeError, match="no derivative with respect to target"):
        jvp(lambda t: fusedvae.vae_loss(inp.recon, t, inp.mu, inp.logvar).loss, (inp.target,), (torch.ones_like(inp.target),))


# --------------------------------------------------------- second order ---


def _first_order(likelihood="bernoulli", which="recon"):
    inp, _ = _case(likelihood, True, None)
    leaves = {k: getattr(inp, k).clone().requires_grad_() for k in ("recon", "mu", "logvar")}
    out = fusedvae.vae_loss(leaves["recon"], inp.target, leaves["mu"], leaves["logvar"], likelihood=likelihood)
    (g,) = torch.autograd.grad(out.loss, leaves[which], create_graph=True)
    return leaves, g, inp


@pytest.mark.parametrize("likelihood,which,op", [
    ("bernoulli", "recon", "recon_loss_backward"),
    ("gaussian", "recon", "recon_loss_backward"),
    ("cbernoulli", "mu", "gaussian_kl_backward"),
    ("bernoulli", "logvar", "gaussian_kl_backward"),
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


@pytest.mark.parametrize("transform", ["hessian", "grad_of_grad", "jacfwd_of_jacrev", "jvp_of_grad"])
def test_func_second_order_raises_clearly(transform):
    inp, _ = _case("bernoulli", True, None)
    f = lambda r: fusedvae.vae_loss(r, inp.target, inp.mu, inp.logvar).loss  # noqa: E731
    calls = {
        "hessian": lambda: hessian(f)(inp.recon),
        "grad_of_grad": lambda: grad(lambda r: grad(f)(r).sum())(inp.recon),
        "jacfwd_of_jacrev": lambda: jacfwd(jacrev(f))(inp.recon),
        "jvp_of_grad": lambda: jvp(grad(f), (inp.recon,), (torch.ones_like(inp.recon),)),
    }
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        calls[transform]()


def test_nested_first_order_transforms():
    # Each transform level differentiates the fused ops once: jvp over vmap, vmap
    # over jvp, grad over a jvp primal and over a vjp primal all match the reference.
    g = torch.Generator().manual_seed(0)
    R, T = torch.randn(3, 2, 3, generator=g, dtype=F64), torch.rand(3, 2, 3, generator=g, dtype=F64)
    M, L = torch.randn(3, 2, 2, generator=g, dtype=F64), torch.randn(3, 2, 2, generator=g, dtype=F64)
    tR = torch.randn(R.shape, generator=g, dtype=F64)

    def per(fn):
        return lambda r, t, m, lv: fn(r, t, m, lv, likelihood="cbernoulli", reduction="none", free_bits=0.1).loss

    def all_of(fn):
        f = per(fn)
        return (
            jvp(lambda r: vmap(f)(r, T, M, L), (R,), (tR,)),
            vmap(lambda r, tr, t, m, lv: jvp(lambda x: f(x, t, m, lv), (r,), (tr,)))(R, tR, T, M, L),
            grad(lambda r: jvp(lambda x: f(x, T[0], M[0], L[0]), (r,), (tR[0],))[0].sum())(R[0]),
            grad(lambda r: vjp(lambda x: f(x, T[0], M[0], L[0]), r)[0].sum())(R[0]),
        )

    with no_vmap_fallback():
        got = all_of(fusedvae.vae_loss)
    _close(got, all_of(reference.vae_loss))
    # and the second-order one of them raises
    f = per(fusedvae.vae_loss)
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        grad(lambda r: jvp(lambda x: f(x, T[0], M[0], L[0]), (r,), (tR[0],))[1].sum())(R[0])


def test_fallback_without_private_torch_internals():
    # On a torch lacking the internals the hand-registered autograd kernels use,
    # _ops falls back to torch.library.register_autograd: first derivatives stay exact.
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        # one internal that only fusedvae uses (torch 2.11's own autograd.Function
        # calls _are_functorch_transforms_active, so that one cannot go)
        "del torch._C._functorch.set_single_level_autograd_function_allowed\n"
        "import fusedvae\n"
        "assert not fusedvae._ops._HAVE_INTERNALS\n"
        "d = dict(dtype=torch.float64)\n"
        "x = torch.randn(3, 2, 4, 5, **d, requires_grad=True); t = torch.rand(3, 2, 4, 5, **d)\n"
        "mu = torch.randn(3, 4, **d, requires_grad=True); lv = torch.randn(3, 4, **d, requires_grad=True)\n"
        "f = lambda x, m, l: fusedvae.vae_loss(x, t, m, l, likelihood='cbernoulli', free_bits=0.1).loss\n"
        "assert torch.autograd.gradcheck(f, (x, mu, lv))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


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


@pytest.mark.parametrize("likelihood,logits", [("bernoulli", True), ("cbernoulli", True), ("gaussian", True)])
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


"""torch.compile(fullgraph=True) over a whole training step of a tiny conv VAE.

The step is encoder -> reparameterisation (the noise is an input, so eager and
compiled see the same numbers) -> decoder -> fused loss -> gradients of every
parameter, either with ``torch.autograd.grad`` inside the compiled function or
with ``loss.backward()`` outside it. Checked: no graph break (fullgraph=True,
Dynamo's graph-break counter and ``torch._dynamo.explain``), the eager values
and gradients, and that a second and a third batch size reuse the dynamic graph
(a counting backend sees exactly one compilation).

Then ``vae_loss`` alone, compiled with ``fullgraph=True`` over reductions, free
bits and each kind of log_scale, against eager and the float64 reference.

aot_eager keeps these fast; the inductor runs are marked slow.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import fusedvae
from fusedvae import reference
from helpers import F32, TinyConvVAE, assert_outputs_close, fresh, make_inputs, make_log_scale, tiny_batch

# (likelihood, loss kwargs, uint8 target?)
CONFIGS = [
    ("cbernoulli", dict(likelihood="cbernoulli", beta="tensor"), False),
    ("bernoulli-uint8-freebits", dict(likelihood="bernoulli", free_bits=0.05, beta=0.5), True),
    ("gaussian-optimal-sum", dict(likelihood="gaussian", log_scale="optimal", reduction="sum"), False),
]
CONFIG_IDS = [c[0] for c in CONFIGS]


def _model():
    torch.manual_seed(0)
    return TinyConvVAE()


def _loss_kwargs(kw):
    kw = dict(kw)
    if kw.get("beta") == "tensor":
        kw["beta"] = torch.tensor(0.8)  # a schedule would fill_() it in place
    return kw


def _make_step_grad_inside(model, kw):
    params = tuple(model.parameters())

    def step(x, target, eps):
        recon, mu, logvar = model(x, eps)
        out = fusedvae.vae_loss(recon, target, mu, logvar, **kw)
        grads = torch.autograd.grad(out.loss, params)
        # detached: autograd.grad consumed the graph the loss belongs to
        return out.loss.detach(), out.rec.detach(), grads

    return step


def _make_loss(model, kw):
    def loss_fn(x, target, eps):
        recon, mu, logvar = model(x, eps)
        out = fusedvae.vae_loss(recon, target, mu, logvar, **kw)
        return out.loss, out.rec

    return loss_fn


def _eager_reference(model, kw, x, target, eps):
    loss, rec = _make_loss(model, kw)(x, target, eps)
    grads = torch.autograd.grad(loss, tuple(model.parameters()))
    return loss.detach(), rec.detach(), grads


def _assert_same(got, exp):
    (l1, r1, g1), (l0, r0, g0) = got, exp
    # The same kernels on the same values: only the compiled graph's own
    # float32 reorderings may differ.
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-6)
    assert len(g1) == len(g0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kw,uint8", CONFIGS, ids=CONFIG_IDS)
def test_step_with_autograd_grad_inside_fullgraph_dynamic(name, kw, uint8, fresh_dynamo):
    model = _model()
    kw = _loss_kwargs(kw)
    backend = CompileCounterWithBackend("aot_eager")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(_make_step_grad_inside(model, kw), fullgraph=True, dynamic=True, backend=backend)
        compilations = None
        for i, b in enumerate((6, 3, 11)):
            x, target, eps = tiny_batch(b, uint8, seed=i)
            got = compiled(x, target, eps)
            _assert_same(got, _eager_reference(model, kw, x, target, eps))
            if compilations is None:
                compilations = backend.frame_count
                assert compilations >= 1
            # the second and third batch sizes reuse the dynamic graph
            assert backend.frame_count == compilations, f"recompiled for batch {b}"
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("name,kw,uint8", CONFIGS, ids=CONFIG_IDS)
def test_step_with_backward_outside_mark_dynamic(name, kw, uint8, fresh_dynamo):
    model = _model()
    kw = _loss_kwargs(kw)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_make_loss(model, kw), fullgraph=True, backend=backend)
    for i, b in enumerate((6, 3, 11)):
        x, target, eps = tiny_batch(b, uint8, seed=10 + i)
        for t in {id(x): x, id(target): target, id(eps): eps}.values():
            torch._dynamo.mark_dynamic(t, 0)
        model.zero_grad(set_to_none=True)
        loss, rec = compiled(x, target, eps)
        loss.backward()
        got = (loss.detach(), rec.detach(), tuple(p.grad.clone() for p in model.parameters()))
        _assert_same(got, _eager_reference(model, kw, x, target, eps))
        assert backend.frame_count == 1, f"recompiled for batch {b}"
    assert dict(counters["graph_break"]) == {}


def test_explain_reports_no_graph_breaks(fresh_dynamo):
    model = _model()
    x, target, eps = tiny_batch(5, True, seed=0)
    kw = dict(likelihood="cbernoulli", beta=torch.tensor(0.3), free_bits=0.1)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explained = torch._dynamo.explain(_make_step_grad_inside(model, kw))(x, target, eps)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_python_float_arguments_under_dynamic_shapes(fresh_dynamo):
    # dynamic=True traces Python floats (beta, free_bits, a float log_scale) as
    # symbolic floats; the argument checks must not graph-break on them (they
    # used math.isfinite, which Dynamo cannot trace for a symbolic float).
    def f(recon, target, mu, logvar, beta, free_bits, log_scale):
        return fusedvae.vae_loss(recon, target, mu, logvar, likelihood="gaussian", beta=beta,
                                 free_bits=free_bits, log_scale=log_scale).loss

    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=backend)
    g = torch.Generator().manual_seed(0)
    for b, beta, fb, ls in ((4, 0.5, 0.1, -0.2), (7, 2.0, 0.0, 0.3)):
        args = (torch.randn(b, 3, 5, generator=g), torch.randn(b, 3, 5, generator=g),
                torch.randn(b, 2, generator=g), torch.randn(b, 2, generator=g))
        torch.testing.assert_close(compiled(*args, beta, fb, ls), f(*args, beta, fb, ls), rtol=1e-6, atol=1e-6)
    # and the checks still reject bad floats inside the compiled function
    with pytest.raises(Exception, match="beta"):
        compiled(*args, float("nan"), 0.0, 0.0)


@pytest.mark.slow
def test_step_inductor(fresh_dynamo):
    model = _model()
    kw = dict(likelihood="cbernoulli", beta=torch.tensor(0.8), free_bits=0.05)
    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_make_loss(model, kw), fullgraph=True, dynamic=True, backend=backend)
    for i, b in enumerate((6, 3, 11)):
        x, target, eps = tiny_batch(b, True, seed=20 + i)
        model.zero_grad(set_to_none=True)
        loss, rec = compiled(x, target, eps)
        loss.backward()
        got = (loss.detach(), rec.detach(), tuple(p.grad.clone() for p in model.parameters()))
        exp = _eager_reference(model, kw, x, target, eps)
        # inductor fuses and reorders the model's float32 math: looser than aot_eager
        (l1, r1, g1), (l0, r0, g0) = got, exp
        torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r1, r0, rtol=1e-4, atol=1e-5)
        for a, c in zip(g1, g0):
            torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-5)
        assert backend.frame_count == 1
    assert dict(counters["graph_break"]) == {}


def test_compiled_vmap(fresh_dynamo):
    # torch.func.vmap over the fused loss inside a fullgraph compile (the
    # reverse-mode torch.func transforms refuse C++ autograd Functions; see
    # test_autograd.py).
    g = torch.Generator().manual_seed(0)
    r, t = torch.randn(2, 4, 3, 5, generator=g), torch.rand(2, 4, 3, 5, generator=g)
    mu, lv = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)

    def per_slice_losses(r, t, mu, lv):
        return torch.func.vmap(lambda x, y, m, l: fusedvae.vae_loss(x, y, m, l, likelihood="cbernoulli").loss)(r, t, mu, lv)

    backend = CompileCounterWithBackend("aot_eager")
    got = torch.compile(per_slice_losses, fullgraph=True, backend=backend)(r, t, mu, lv)
    assert backend.frame_count == 1
    exp = torch.stack([fusedvae.vae_loss(r[v], t[v], mu[v], lv[v], likelihood="cbernoulli").loss for v in range(2)])
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)
    assert dict(counters["graph_break"]) == {}


# ------------------------------------------------ vae_loss alone, compiled ---

def _compile_case(backend, likelihood, logits, ls_kind, reduction, free_bits):
    torch._dynamo.reset()
    inp = make_inputs(likelihood, logits, F32, (5,), batch=3, sample_shape=(2, 3, 4))
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=F32)
    beta = torch.tensor(0.8)

    def f(recon, target, mu, logvar, log_scale):
        out = fusedvae.vae_loss(recon, target, mu, logvar, likelihood=likelihood, logits=logits,
                                beta=beta, reduction=reduction, log_scale=log_scale, free_bits=free_bits)
        return out.loss.sum() + 0.3 * out.rec.sum() - 0.2 * out.kl.sum(), out

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    results = []
    for fn in (f, compiled, None):
        leaves = [inp.recon.clone().requires_grad_(), inp.mu.clone().requires_grad_(), inp.logvar.clone().requires_grad_()]
        l2 = fresh(ls)
        if fn is None:  # the reference, in float64
            out = reference.vae_loss(leaves[0].double(), inp.target.double(), leaves[1].double(), leaves[2].double(),
                                     likelihood=likelihood, logits=logits, beta=beta.double(), reduction=reduction,
                                     log_scale=l2.double() if isinstance(l2, torch.Tensor) else l2, free_bits=free_bits)
            scalar = out.loss.sum() + 0.3 * out.rec.sum() - 0.2 * out.kl.sum()
        else:
            scalar, out = fn(leaves[0], inp.target, leaves[1], leaves[2], l2)
        scalar.backward()
        grads = [a.grad for a in leaves] + ([l2.grad] if isinstance(l2, torch.Tensor) else [])
        results.append((scalar, out, grads))
    (s0, o0, g0), (s1, o1, g1), (s2, o2, g2) = results
    # compiled == eager: same kernels, same order -> float32 rounding only.
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-6)
    assert_outputs_close(o1, o0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # and against the float64 reference
    torch.testing.assert_close(s1.double(), s2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "likelihood,logits,ls_kind,reduction,free_bits",
    [
        ("bernoulli", True, None, "batchmean", 0.0),
        ("cbernoulli", False, None, "none", 0.6),
        ("gaussian", True, "full_tensor", "mean", 0.0),
        ("gaussian", True, "optimal", "sum", 0.0),
        ("gaussian", True, "scalar_tensor", "batchmean", 0.6),
    ],
)
def test_compile_aot_eager(likelihood, logits, ls_kind, reduction, free_bits):
    _compile_case("aot_eager", likelihood, logits, ls_kind, reduction, free_bits)


def test_compile_eager_backend():
    _compile_case("eager", "bernoulli", False, None, "batchmean", 0.0)


@pytest.mark.slow
def test_compile_inductor():
    _compile_case("inductor", "gaussian", True, "broadcast_tensor", "batchmean", 0.6)


"""The KL to learned priors over latent groups (fusedvae.gaussian_kl, the
fusedvae::gaussian_kl op) and vae_loss with latent groups, priors and the
discretized-mixture likelihood, against fusedvae.reference in float64: values,
gradients with per-sample upstream gradients, gradcheck, free bits per group,
broadcast priors, extreme and NaN inputs, narrow dtypes, opcheck, compile and
no host sync, on every device."""
from __future__ import annotations

import pytest
import torch

import fusedvae
from fusedvae import reference
from helpers import ATOL64, F64, RTOL64, REDUCTIONS, no_host_sync, synchronize
from test_dmol import _random_case

ops = torch.ops.fusedvae

# Latent groups of different shapes, as a hierarchical VAE's resolutions give.
SHAPES = [(5,), (2, 3, 3), (1, 4, 4)]
# Which groups have a prior: none, all, some (None in the others' place), and a
# prior broadcast over the batch (a learned [1, ...] parameter).
PRIORS = ["none", "all", "some", "broadcast"]
FREE_BITS = [0.0, 0.05, [0.0, 0.3, 0.02]]


def _latents(device, batch=4, dtype=F64, prior="all", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(device=device, dtype=dtype)

    mu = [rand(batch, *s) for s in SHAPES]
    logvar = [rand(batch, *s, scale=0.7) for s in SHAPES]
    prior_mu = prior_logvar = None
    if prior == "all":
        prior_mu = [rand(batch, *s) for s in SHAPES]
        prior_logvar = [rand(batch, *s, scale=0.7) for s in SHAPES]
    elif prior == "some":
        prior_mu = [None, rand(batch, *SHAPES[1]), rand(batch, *SHAPES[2])]
        prior_logvar = [None, rand(batch, *SHAPES[1], scale=0.7), rand(batch, *SHAPES[2], scale=0.7)]
    elif prior == "broadcast":
        prior_mu = [rand(1, *s) for s in SHAPES]
        prior_logvar = [rand(1, *s[:1], *([1] * (len(s) - 1)), scale=0.7) for s in SHAPES]
    return mu, logvar, prior_mu, prior_logvar


def _leaves(*groups):
    out = []
    for group in groups:
        for t in group or []:
            if t is not None:
                out.append(t.requires_grad_())
    return out


def _assert_close(got, expected, rtol=RTOL64, atol=ATOL64):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def _assert_outputs_and_grads_close(got, expected, leaves):
    """Each output of two VAELossOutputs, and the gradients of every leaf from
    random upstream gradients on all three outputs."""
    for a, b in zip(got, expected):
        _assert_close(a, b)
    upstream = [torch.randn_like(t) for t in got]
    total = sum((t * u).sum() for t, u in zip(got, upstream))
    expected_total = sum((t * u).sum() for t, u in zip(expected, upstream))
    for a, b in zip(torch.autograd.grad(total, leaves), torch.autograd.grad(expected_total, leaves)):
        _assert_close(a, b)


@pytest.mark.parametrize("free_bits", FREE_BITS, ids=["no-free-bits", "free-bits", "per-group"])
@pytest.mark.parametrize("prior", PRIORS)
def test_gaussian_kl_matches_reference_float64(device, prior, free_bits):
    mu, logvar, prior_mu, prior_logvar = _latents(device, prior=prior)
    leaves = _leaves(mu, logvar, prior_mu, prior_logvar)
    got = fusedvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar, free_bits=free_bits)
    expected = reference.gaussian_kl(mu, logvar, prior_mu, prior_logvar, free_bits=free_bits)
    _assert_close(got, expected)
    upstream = torch.randn(got.shape, dtype=F64, device=device)  # per-sample, not 1
    grads = torch.autograd.grad((got * upstream).sum(), leaves)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), leaves)
    for a, b in zip(grads, expected_grads):
        _assert_close(a, b)


def test_one_group_without_prior_is_the_standard_kl(device):
    mu, logvar, _, _ = _latents(device, prior="none")
    expected = 0.5 * (mu[1] ** 2 + logvar[1].exp() - 1 - logvar[1]).flatten(1).sum(1)
    _assert_close(fusedvae.gaussian_kl(mu[1], logvar[1]), expected)
    # a prior equal to N(0, I), given explicitly, changes nothing
    zeros = torch.zeros_like(mu[1])
    _assert_close(fusedvae.gaussian_kl(mu[1], logvar[1], zeros, zeros), expected)
    # and the KL of a posterior equal to its prior is 0
    _assert_close(fusedvae.gaussian_kl(mu[1], logvar[1], mu[1], logvar[1]), torch.zeros_like(expected))


@pytest.mark.parametrize("prior", ["all", "some"])
def test_gradcheck(device, prior):
    mu, logvar, prior_mu, prior_logvar = _latents(device, batch=2, prior=prior)
    leaves = _leaves(mu, logvar, prior_mu, prior_logvar)
    present = [i for i, p in enumerate(prior_mu) if p is not None]

    def fn(*tensors):
        m, lv = list(tensors[:3]), list(tensors[3:6])
        pm, plv = [None] * 3, [None] * 3
        for k, i in enumerate(present):
            pm[i], plv[i] = tensors[6 + k], tensors[6 + len(present) + k]
        return fusedvae.gaussian_kl(m, lv, pm, plv, free_bits=[0.0, 0.2, 0.0])

    assert torch.autograd.gradcheck(fn, leaves)


def test_extreme_inputs_float64(device):
    # Prior and posterior log-variances far apart, far-off means: finite in float64.
    mu, logvar, prior_mu, prior_logvar = _latents(device, prior="all")
    logvar[0][0] = 300.0
    prior_logvar[0][1] = -300.0
    prior_logvar[1][2] = 250.0
    mu[2][3] = 1e100
    leaves = _leaves(mu, logvar, prior_mu, prior_logvar)
    got = fusedvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    expected = reference.gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    assert torch.isfinite(got).all()
    _assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), leaves)
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    for a, b in zip(grads, expected_grads):
        _assert_close(a, b)


def test_large_prior_precision_stays_finite_in_float32(device):
    # e^{-lvp} alone overflows float32 below lvp = -88.7; the KL itself does not.
    mu = torch.full((2, 3), 1e-20, device=device)
    logvar = torch.full((2, 3), -100.0, device=device)
    prior_logvar = torch.full((2, 3), -100.0, device=device)
    got = fusedvae.gaussian_kl(mu, logvar, torch.zeros_like(mu), prior_logvar)
    expected = reference.gaussian_kl(mu.double(), logvar.double(), torch.zeros_like(mu).double(),
                                     prior_logvar.double())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_nan_in_gives_nan_out_in_that_sample(device):
    mu, logvar, prior_mu, prior_logvar = _latents(device, prior="all")
    prior_mu[1][2, 0, 1, 1] = float("nan")
    got = fusedvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    assert torch.isnan(got[2]) and torch.isfinite(got[[0, 1, 3]]).all()
    # with free bits on that group the term is batch-wide, so every sample is NaN
    got = fusedvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar, free_bits=[0.0, 0.1, 0.0])
    assert torch.isnan(got).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_narrow_dtypes_against_float64(device, dtype):
    mu, logvar, prior_mu, prior_logvar = _latents(device, dtype=dtype, prior="some")
    leaves = _leaves(mu, logvar, prior_mu, prior_logvar)
    got = fusedvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar, free_bits=[0.0, 0.0, 0.1])
    assert got.dtype == torch.float32
    wide = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(wide)
    m, lv = [next(it) for _ in mu], [next(it) for _ in logvar]
    pm = [None if p is None else next(it) for p in prior_mu]
    plv = [None if p is None else next(it) for p in prior_logvar]
    expected = reference.gaussian_kl(m, lv, pm, plv, free_bits=[0.0, 0.0, 0.1])
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-5)
    grads = torch.autograd.grad(got.sum(), leaves)
    expected_grads = torch.autograd.grad(expected.sum(), wide)
    for a, b, t in zip(grads, expected_grads, leaves):
        assert a.dtype == t.dtype and a.shape == t.shape
        # each element rounded to the input's precision
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(a.double(), b, rtol=2 * eps, atol=2 * eps * b.abs().max().item())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", ["none", "some", "broadcast"])
def test_vae_loss_with_groups_matches_reference(device, prior, reduction):
    mu, logvar, prior_mu, prior_logvar = _latents(device, prior=prior)
    recon = torch.randn(4, 3, 5, device=device, dtype=F64)
    target = torch.rand(4, 3, 5, device=device, dtype=F64)
    beta = torch.tensor(0.7, dtype=F64, device=device, requires_grad=True)
    leaves = [recon.requires_grad_(), beta] + _leaves(mu, logvar, prior_mu, prior_logvar)
    kwargs = dict(prior_mu=prior_mu, prior_logvar=prior_logvar, beta=beta, reduction=reduction,
                  free_bits=[0.0, 0.2, 0.0], likelihood="gaussian", log_scale="optimal")
    got = fusedvae.vae_loss(recon, target, mu, logvar, **kwargs)
    expected = reference.vae_loss(recon, target, mu, logvar, **kwargs)
    _assert_outputs_and_grads_close(got, expected, leaves)


def test_vae_loss_one_group_in_a_list_equals_the_tensor_form(device):
    mu, logvar, _, _ = _latents(device, prior="none")
    recon = torch.randn(4, 6, device=device, dtype=F64)
    target = torch.rand(4, 6, device=device, dtype=F64)
    for reduction in REDUCTIONS:
        listed = fusedvae.vae_loss(recon, target, [mu[1]], [logvar[1]], reduction=reduction, free_bits=0.1)
        plain = fusedvae.vae_loss(recon, target, mu[1], logvar[1], reduction=reduction, free_bits=0.1)
        for a, b in zip(listed, plain):
            _assert_close(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_kind", ["float", "uint8"])
def test_vae_loss_dmol_matches_reference(device, target_kind, reduction):
    params, target = _random_case(3, 4, batch=4)
    params = params.to(device)
    target = target.to(device)
    if target_kind == "uint8":
        target = torch.round((target + 1) * 127.5).to(torch.uint8)
    mu, logvar, prior_mu, prior_logvar = _latents(device, prior="some")
    leaves = [params.requires_grad_()] + _leaves(mu, logvar, prior_mu, prior_logvar)
    kwargs = dict(likelihood="dmol", prior_mu=prior_mu, prior_logvar=prior_logvar, beta=0.3,
                  reduction=reduction, free_bits=0.05)
    got = fusedvae.vae_loss(params, target, mu, logvar, **kwargs)
    expected = reference.vae_loss(params, target, mu, logvar, **kwargs)
    _assert_outputs_and_grads_close(got, expected, leaves)
    # rec is the standalone function's NLL
    _assert_close(got.rec, reference.discretized_mix_logistic_nll(params, target))


def test_vae_loss_dmol_bits(device):
    params, target = _random_case(1, 3, batch=2)
    params, target = params.to(device), target.to(device)
    mu = torch.randn(2, 3, dtype=F64, device=device)
    got = fusedvae.vae_loss(params, target, mu, mu, likelihood="dmol", bits=5)
    expected = reference.vae_loss(params, target, mu, mu, likelihood="dmol", bits=5)
    _assert_close(got.rec, expected.rec)
    assert not torch.allclose(got.rec, fusedvae.vae_loss(params, target, mu, mu, likelihood="dmol").rec)


def test_module_takes_groups_and_priors(device):
    mu, logvar, prior_mu, prior_logvar = _latents(device, prior="some")
    params, target = _random_case(3, 2, batch=4)
    params, target = params.to(device), target.to(device)
    loss_fn = fusedvae.VAELoss(likelihood="dmol", bits=8, free_bits=[0.0, 0.1, 0.0])
    got = loss_fn(params, target, mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
    expected = reference.vae_loss(params, target, mu, logvar, likelihood="dmol", free_bits=[0.0, 0.1, 0.0],
                                  prior_mu=prior_mu, prior_logvar=prior_logvar)
    for a, b in zip(got, expected):
        _assert_close(a, b)


def test_no_host_sync(device):
    mu, logvar, prior_mu, prior_logvar = _latents(device, dtype=torch.float32, prior="some")
    leaves = _leaves(mu, logvar, prior_mu, prior_logvar)
    recon = torch.randn(4, 8, device=device, requires_grad=True)
    target = torch.rand(4, 8, device=device)
    synchronize(device)
    with no_host_sync(device):
        out = fusedvae.vae_loss(recon, target, mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                free_bits=[0.1, 0.0, 0.0])
        out.loss.backward()
    synchronize(device)
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_every_group_goes_through_one_autograd_node():
    mu, logvar, prior_mu, prior_logvar = _latents("cpu", prior="all")
    leaves = _leaves(mu, logvar, prior_mu, prior_logvar)
    kl = fusedvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar, free_bits=[0.0, 0.1, 0.0])
    reached = {id(fn.variable) for fn, _ in kl.grad_fn.next_functions if hasattr(fn, "variable")}
    assert reached == {id(t) for t in leaves}


def test_second_order_raises():
    mu, logvar, prior_mu, prior_logvar = _latents("cpu", prior="all")
    leaves = _leaves(mu, logvar, prior_mu, prior_logvar)
    grads = torch.autograd.grad(fusedvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar).sum(), leaves,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="gaussian_kl_backward"):
        sum(g.sum() for g in grads).backward()


def test_no_grad_saves_nothing():
    mu, logvar, prior_mu, prior_logvar = _latents("cpu", prior="all")
    _leaves(mu, logvar, prior_mu, prior_logvar)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            fusedvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar)
        assert saved == []
        fusedvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    assert len(saved) == 4 * len(SHAPES) + 1  # the inputs and the free-bits means, nothing else


@pytest.mark.parametrize("free_bits", [[0.0, 0.0, 0.0], [0.0, 0.2, 0.1]], ids=["no-free-bits", "free-bits"])
def test_opcheck(device, free_bits):
    mu, logvar, prior_mu, prior_logvar = _latents(device, dtype=torch.float32, prior="all")
    leaves = _leaves(mu, logvar, prior_mu, prior_logvar)
    torch.library.opcheck(ops.gaussian_kl.default, (mu, logvar, prior_mu, prior_logvar, free_bits))
    torch.library.opcheck(ops.gaussian_kl.default, (mu, logvar, [], [], free_bits))
    kl, term, dim_mean = ops.gaussian_kl(mu, logvar, prior_mu, prior_logvar, free_bits)
    detached = [t.detach() for t in leaves]
    args = (torch.randn(4, device=device), torch.randn(4, device=device), detached[0:3], detached[3:6],
            detached[6:9], detached[9:12], dim_mean, free_bits)
    torch.library.opcheck(ops.gaussian_kl_backward.default, args)
    torch.library.opcheck(ops.gaussian_kl_backward.default, (None,) + args[1:])


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_fullgraph():
    mu, logvar, prior_mu, prior_logvar = _latents("cpu", dtype=torch.float32, prior="some")
    recon = torch.randn(4, 8)
    target = torch.rand(4, 8)

    def loss(recon, target, mu, logvar, prior_mu, prior_logvar):
        return fusedvae.vae_loss(recon, target, mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                 free_bits=[0.0, 0.1, 0.0]).loss

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in [recon] + mu + logvar + prior_mu[1:] + prior_logvar[1:]]
        m, lv = leaves[1:4], leaves[4:7]
        value = fn(leaves[0], target, m, lv, [None] + leaves[7:9], [None] + leaves[9:11])
        return [value] + list(torch.autograd.grad(value, leaves))

    compiled = torch.compile(loss, fullgraph=True)
    for a, b in zip(grads(compiled), grads(loss)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(mu=[]), ValueError, "mu must hold at least one latent group"),
        (dict(logvar=[torch.zeros(2, 3)]), ValueError, r"logvar must hold one tensor per group of mu \(2\)"),
        (dict(prior_mu=[torch.zeros(2, 3), None]), ValueError, r"prior_logvar\[0\] must be given with prior_mu\[0\]"),
        (dict(prior_mu=[torch.zeros(2, 4), None], prior_logvar=[torch.zeros(2, 4), None]), ValueError,
         r"prior_mu\[0\] must be broadcastable to the shape of mu\[0\]"),
        (dict(free_bits=[0.1]), ValueError, r"free_bits must be a float or hold one value per group of mu \(2\)"),
        (dict(free_bits=[0.1, "x"]), TypeError, "free_bits must be a float or a sequence of floats"),
        (dict(mu=[torch.zeros(2, 3), torch.zeros(3, 5)]), ValueError, r"mu\[1\] must have the batch size of mu\[0\]"),
    ],
)
@pytest.mark.parametrize("fn", [fusedvae.gaussian_kl, reference.gaussian_kl], ids=["fused", "reference"])
def test_bad_arguments_name_the_argument(fn, change, exc, match):
    args = dict(mu=[torch.zeros(2, 3), torch.zeros(2, 5)], logvar=[torch.zeros(2, 3), torch.zeros(2, 5)],
                prior_mu=None, prior_logvar=None, free_bits=0.0)
    args.update(change)
    free_bits = args.pop("free_bits")
    with pytest.raises(exc, match=match):
        fn(**args, free_bits=free_bits)

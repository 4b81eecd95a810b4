"""Property-based tests: fused vae_loss against the reference on random inputs.

Hypothesis draws the *structure* of a case (variant, dtype, batch and sample
shape, memory layout, target dtype, reduction, free bits, β, value scale and
where NaN/±inf are planted) and a seed for the values. Every example compares
the fused result with ``fusedvae.reference`` evaluated in float64 on exactly the
same (cast) values:

- NaN positions match: a per-sample ``rec``/``kl``/``loss`` is NaN in the fused
  result exactly where it is NaN in the reference (and so is a scalar loss);
- ±inf match exactly, finite values are close (tolerance by dtype below);
- with all-finite inputs, the gradients are close as well.

B = 0 has its own documented semantics (see
``test_empty_batch_semantics``): ``rec``/``kl`` have shape ``[0]``; the loss is
NaN for ``batchmean`` and ``mean`` (the mean of nothing, like ``torch.mean`` of an
empty tensor), ``0`` for ``sum`` and an empty ``[0]`` tensor for ``none``; every
gradient is an empty tensor shaped like its input.

Infinite logits are checked by ``test_infinite_logits_follow_reference``
(which limits are inf and which NaN follows torch's binary_cross_entropy_with_logits).

The default run is derandomised (the same examples every time, so the suite is
stable); ``test_fused_matches_reference_random`` (marked slow) draws fresh ones.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedvae
from fusedvae import reference
from helpers import VARIANTS

F64 = torch.float64
F32 = torch.float32
DTYPES = [F32, F64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced_batch", "sliced_last", "expanded_target"]
SPECIALS = ["none", "nan", "inf", "nan_and_inf", "nan_latent", "inf_latent"]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


@st.composite
def cases(draw, allow_empty_batch=False):
    likelihood, logits, ls_kind = draw(st.sampled_from(VARIANTS))
    batch = draw(st.sampled_from([0, 1, 2, 3, 5] if allow_empty_batch else [1, 2, 3, 5]))
    ndim = draw(st.integers(1, 3))
    sample_shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    latent_shape = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 2))))
    return dict(
        likelihood=likelihood,
        logits=logits,
        ls_kind=ls_kind,
        batch=batch,
        sample_shape=sample_shape,
        latent_shape=latent_shape,
        dtype=draw(st.sampled_from(DTYPES)),
        target_kind=draw(st.sampled_from(["same", "uint8", "float64"])),
        layout=draw(st.sampled_from(LAYOUTS)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        free_bits=draw(st.sampled_from([0.0, 0.4])),
        beta=draw(st.sampled_from([0.0, 0.7, "tensor"])),
        scale=draw(st.sampled_from([1.0, 8.0, 300.0])),
        special=draw(st.sampled_from(SPECIALS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _plant(x, g, values, fraction=0.2):
    """Set a random ~fraction of the elements of float64 ``x`` to random picks of ``values``."""
    if x.numel() == 0:
        return x
    mask = torch.rand(x.shape, generator=g, dtype=F64) < fraction
    picks = torch.tensor(values, dtype=F64)[torch.randint(0, len(values), x.shape, generator=g)]
    return torch.where(mask, picks, x)


def _layout(x, layout, batch_dim=True):
    """The values of ``x`` in another memory layout (same logical tensor)."""
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed" and x.dim() >= 3:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced_batch" and batch_dim:
        big = torch.empty((2 * x.shape[0], *x.shape[1:]), dtype=x.dtype)
        big[::2] = x
        return big[::2]
    if layout == "sliced_last" and x.dim() >= 2:
        big = torch.empty((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        big[..., 1::2] = x
        return big[..., 1::2]
    return x


def build(case):
    """(fused_args, reference_args, kwargs, finite): the same values for both."""
    g = torch.Generator().manual_seed(case["seed"])
    lik, logits, dtype = case["likelihood"], case["logits"], case["dtype"]
    shape = (case["batch"], *case["sample_shape"])
    lat = (case["batch"], *case["latent_shape"])
    s = case["scale"]
    if lik == "gaussian":
        recon = s * torch.randn(shape, generator=g, dtype=F64)
        target = s * torch.randn(shape, generator=g, dtype=F64)
    elif logits:
        recon = s * torch.randn(shape, generator=g, dtype=F64)
        target = torch.rand(shape, generator=g, dtype=F64)
    else:
        recon = torch.rand(shape, generator=g, dtype=F64)
        target = torch.rand(shape, generator=g, dtype=F64)
    if lik != "gaussian":  # Bernoulli data is often exactly 0 or 1
        target = torch.where(torch.rand(shape, generator=g, dtype=F64) < 0.3, target.round(), target)
    mu = s ** 0.5 * torch.randn(lat, generator=g, dtype=F64)
    logvar = torch.randn(lat, generator=g, dtype=F64)

    special = case["special"]
    inf = math.inf
    recon_inf_ok = lik == "gaussian" or not logits  # see the module docstring
    if special in ("nan", "nan_and_inf"):
        recon = _plant(recon, g, [math.nan], 0.1)
    if special in ("inf", "nan_and_inf"):
        if recon_inf_ok:
            recon = _plant(recon, g, [inf, -inf], 0.1)
        target = _plant(target, g, [inf, -inf], 0.1)
    if special == "nan" and case["target_kind"] != "uint8":
        target = _plant(target, g, [math.nan], 0.1)
    if special == "nan_latent":
        mu = _plant(mu, g, [math.nan], 0.2)
        logvar = _plant(logvar, g, [math.nan], 0.2)
    if special == "inf_latent":
        mu = _plant(mu, g, [inf, -inf], 0.2)
        logvar = _plant(logvar, g, [inf, -inf], 0.2)

    # Cast to the test dtype, then hand the reference exactly those values.
    recon = recon.to(dtype)
    mu, logvar = mu.to(dtype), logvar.to(dtype)
    if case["target_kind"] == "uint8":
        target = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    elif case["target_kind"] == "float64":
        target = target.to(F64)  # promoted with recon
    else:
        target = target.to(dtype)

    ls_kind = case["ls_kind"]
    log_scale = ls_kind
    if ls_kind == "float":
        log_scale = -0.4
    elif ls_kind in ("scalar_tensor", "full_tensor", "broadcast_tensor", "per_sample_tensor"):
        ls_shape = {
            "scalar_tensor": (),
            "full_tensor": shape,
            "broadcast_tensor": (shape[1],) + (1,) * (len(shape) - 2),
            "per_sample_tensor": (shape[0],) + (1,) * (len(shape) - 1),
        }[ls_kind]
        log_scale = (0.3 * torch.randn(ls_shape, generator=g, dtype=F64)).to(dtype)

    layout = case["layout"]
    f_recon = _layout(recon, layout)
    if layout == "expanded_target" and shape[0] > 0:
        f_target = target[:1].expand(shape)  # stride 0 over the batch
        target = f_target.clone()
    else:
        f_target = _layout(target, layout)
    f_mu, f_logvar = _layout(mu, layout), _layout(logvar, "transposed" if layout == "sliced_last" else layout)

    beta = torch.tensor(0.6, dtype=dtype) if case["beta"] == "tensor" else case["beta"]
    kw = dict(likelihood=lik, logits=logits, reduction=case["reduction"], free_bits=case["free_bits"])
    up = lambda v: v.to(F64) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v  # noqa: E731
    fused_args = (f_recon, f_target, f_mu, f_logvar, log_scale, beta)
    ref_args = (up(recon), up(target), up(mu), up(logvar), up(log_scale), up(beta))
    finite = all(
        bool(torch.isfinite(v).all())
        for v in (recon, target, mu, logvar, log_scale)
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point
    )
    return fused_args, ref_args, kw, finite


def _tolerances(case, fused_dtype):
    if fused_dtype == F64:
        return 1e-9, 1e-9
    # float32 accumulation of up to 216 terms of magnitude up to scale²·N.
    return 2e-5, 2e-5 * (1 + case["scale"] ** 2)


def _assert_same_nans_and_close(got, exp, rtol, atol, what):
    got = got.detach().to(F64)
    exp = exp.detach().to(F64)
    assert got.shape == exp.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
    got_nan, exp_nan = torch.isnan(got), torch.isnan(exp)
    assert torch.equal(got_nan, exp_nan), (
        f"{what}: NaN positions differ\n fused     {got.tolist()}\n reference {exp.tolist()}"
    )
    torch.testing.assert_close(
        got, exp, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def check_case(case):
    fused_args, ref_args, kw, finite = build(case)
    recon, target, mu, logvar, log_scale, beta = fused_args
    grad = finite and case["batch"] > 0
    leaves = [v.detach().requires_grad_(grad) for v in (recon, mu, logvar)]
    if grad:  # keep the drawn layout on the leaves the gradients land in
        leaves = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).copy_(v).requires_grad_() for v in (recon, mu, logvar)]
    got = fusedvae.vae_loss(leaves[0], target, leaves[1], leaves[2], log_scale=log_scale, beta=beta, **kw)

    r_recon, r_target, r_mu, r_logvar, r_log_scale, r_beta = ref_args
    r_leaves = [v.detach().clone().requires_grad_(grad) for v in (r_recon, r_mu, r_logvar)]
    exp = reference.vae_loss(r_leaves[0], r_target, r_leaves[1], r_leaves[2], log_scale=r_log_scale, beta=r_beta, **kw)

    # Results: float64 where a float64 input takes part, float32 otherwise.
    full_scale = log_scale if isinstance(log_scale, torch.Tensor) and log_scale.dim() > 0 else None
    rec_acc = F64 if F64 in (recon.dtype, target.dtype, getattr(full_scale, "dtype", None)) else F32
    kl_acc = F64 if mu.dtype == F64 else F32
    assert got.rec.dtype == rec_acc and got.kl.dtype == kl_acc
    assert got.loss.dtype == torch.promote_types(rec_acc, kl_acc)
    acc = rec_acc
    rtol, atol = _tolerances(case, F32 if F32 in (rec_acc, kl_acc) else F64)
    n = max(1, math.prod(case["sample_shape"]))
    for name in ("rec", "kl", "loss"):
        _assert_same_nans_and_close(getattr(got, name), getattr(exp, name), rtol, atol * n, name)

    if grad:
        weights = torch.linspace(0.5, 1.5, case["batch"], dtype=F64)
        (got.loss.sum() + (weights.to(rec_acc) * got.rec).sum()).backward()
        (exp.loss.sum() + (weights * exp.rec).sum()).backward()
        half = case["dtype"] in (torch.float16, torch.bfloat16)
        for name, a, b in zip(("recon", "mu", "logvar"), leaves, r_leaves):
            assert a.grad is not None and a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
            # Compared where the reference gradient is finite: at probabilities of
            # exactly 0 or 1 the reference's autograd gives NaN (0·inf through the
            # log clamp) while the fused gradient follows F.binary_cross_entropy;
            # tests/test_likelihoods.py checks those points against torch itself.
            mask = torch.isfinite(b.grad)
            ref_g = b.grad[mask]
            scale = float(ref_g.abs().max()) if ref_g.numel() else 1.0
            g_rtol = 1e-2 if half else (1e-9 if a.dtype == F64 and F32 not in (rec_acc, kl_acc) else 1e-4)
            torch.testing.assert_close(
                # atol relative to max(|grad|, 1): σ(x) - t cancels in float32 (as in
                # torch's own float32 math), an absolute error of ~1 ulp of 1.
                a.grad.to(F64)[mask], ref_g, rtol=g_rtol, atol=g_rtol * max(scale, 1.0),
                msg=lambda m, name=name: f"grad {name}: {m}",
            )


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fused_matches_reference(case):
    check_case(case)


@pytest.mark.slow
@settings(max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fused_matches_reference_random(case):
    check_case(case)


# ------------------------------------------------------------------ B = 0 --


@settings(max_examples=25, deadline=None, derandomize=True)
@given(cases(allow_empty_batch=True).filter(lambda c: c["batch"] == 0))
def test_empty_batch_semantics(case):
    """B = 0: a defined result."""
    fused_args, _, kw, _ = build(case)
    recon, target, mu, logvar, log_scale, beta = fused_args
    leaves = [v.detach().clone().requires_grad_() for v in (recon, mu, logvar)]
    out = fusedvae.vae_loss(leaves[0], target, leaves[1], leaves[2], log_scale=log_scale, beta=beta, **kw)
    assert out.rec.shape == out.kl.shape == (0,)
    assert out.rec.dtype == (F64 if F64 in (recon.dtype, target.dtype) else F32)
    reduction = kw["reduction"]
    if reduction == "none":
        assert out.loss.shape == (0,)
    else:
        assert out.loss.shape == ()
        if reduction == "sum":
            assert out.loss.item() == 0.0
        else:  # batchmean, mean: the mean of nothing
            assert math.isnan(out.loss.item())
    grads = torch.autograd.grad(out.loss.sum(), leaves, allow_unused=True)
    for leaf, g in zip(leaves, grads):
        assert g is not None and g.shape == leaf.shape and g.numel() == 0


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_empty_batch_matches_reference(reduction):
    r = torch.zeros(0, 3)
    m = torch.zeros(0, 2)
    got = fusedvae.vae_loss(r, r, m, m, reduction=reduction)
    want = reference.vae_loss(r, r, m, m, reduction=reduction)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("likelihood", ["bernoulli", "cbernoulli"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_one_element_samples(likelihood, dtype):
    # [B, 1] data and [B, 1] latents: only the kernels' scalar tail runs.
    g = torch.Generator().manual_seed(3)
    recon = (3 * torch.randn(7, 1, generator=g, dtype=F64)).to(dtype)
    target = torch.rand(7, 1, generator=g, dtype=F64).to(dtype)
    mu, logvar = torch.randn(7, 1, generator=g, dtype=F64).to(dtype), torch.randn(7, 1, generator=g, dtype=F64).to(dtype)
    got = fusedvae.vae_loss(recon, target, mu, logvar, likelihood=likelihood, reduction="none")
    exp = reference.vae_loss(*(v.double() for v in (recon, target, mu, logvar)), likelihood=likelihood, reduction="none")
    tol = 1e-12 if dtype == F64 else 1e-6
    torch.testing.assert_close(got.loss.double(), exp.loss, rtol=tol, atol=tol)


# ------------------------------------------------- infinite logits (a bug) --


def _inf_cases():
    inf = math.inf
    # (logit, target): the per-element reference value, which follows
    # torch.nn.functional.binary_cross_entropy_with_logits.
    return [(inf, 0.3), (inf, 0.0), (-inf, 0.3), (-inf, 1.0)]


def test_infinite_logits_follow_reference():
    _compare_infinite_logits("bernoulli")


def test_infinite_logits_cbernoulli_follow_reference():
    # The continuous Bernoulli agrees with the reference at ±inf for targets in
    # [0, 1] (it differs only for out-of-range targets such as 2 or ±inf).
    _compare_infinite_logits("cbernoulli")


def _compare_infinite_logits(likelihood):
    x = torch.tensor([[c[0]] for c in _inf_cases()], dtype=F64)
    t = torch.tensor([[c[1]] for c in _inf_cases()], dtype=F64)
    z = torch.zeros(len(x), 1, dtype=F64)
    for dtype in (F64, F32):
        got = fusedvae.vae_loss(x.to(dtype), t.to(dtype), z, z, likelihood=likelihood, reduction="none").rec
        exp = reference.vae_loss(x, t, z, z, likelihood=likelihood, reduction="none").rec
        _assert_same_nans_and_close(got, exp, 1e-6, 1e-6, f"rec {dtype}")


def test_reference_infinite_logits_follow_torch_bce():
    # The reference's values at ±inf are PyTorch's own (so the reference is the side to follow).
    x = torch.tensor([c[0] for c in _inf_cases()], dtype=F64)
    t = torch.tensor([c[1] for c in _inf_cases()], dtype=F64)
    z = torch.zeros(len(x), 1, dtype=F64)
    exp = reference.vae_loss(x[:, None], t[:, None], z, z, reduction="none").rec
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    _assert_same_nans_and_close(exp, bce, 0, 0, "rec")

"""Input dtypes, memory layouts and sizes: the fused loss against the float64 reference.

Low precision (float32, float16, bfloat16, accumulated in float32), uint8 targets
read as pixels, every pair of recon and target dtypes read as it is (float64
promoted as the reference does), every dense and strided layout of recon,
target, log_scale and the latents, and batch and sample sizes
that hit the kernels' vector tail and multi-chunk paths. The last section runs
each dtype, layouts and unaligned storage on each device (``device`` fixture).
"""
from __future__ import annotations

import pytest
import torch

import fusedvae
from fusedvae import reference
from helpers import (
    ATOL64,
    DEVICE_VARIANT_IDS,
    DEVICE_VARIANTS,
    F32,
    F64,
    HALF_DTYPES,
    REDUCTIONS,
    RTOL64,
    Inputs,
    VARIANT_IDS,
    VARIANTS,
    assert_grads_close,
    assert_outputs_close,
    cuda_kernel_switches,
    compare_to_reference,
    fresh,
    loss_kw,
    make_inputs,
    make_log_scale,
    on_cpu,
    on_cpu_float64,
    run_loss,
    weighted_upstream,
)

# ------------------------------------------------------ reduced precision --

# Tolerances against the float64 reference evaluated on the upcast inputs (so input
# rounding is not part of the error):
# * loss/rec/kl: every dtype accumulates in float32; per-element libm error of a
#   few float32 ulps plus summation over <= 60 elements -> 1e-5 relative (about 80
#   float32 ulps), 1e-5 absolute for values near 0.
# * gradients are computed in float32 and rounded once to the input dtype:
#   float32 -> 1e-5; float16 -> half an ulp is 2^-11 = 4.9e-4, allow 1e-3;
#   bfloat16 -> half an ulp is 2^-8 = 3.9e-3, allow 8e-3. Absolute slack covers
#   gradients in the subnormal range of float16 (spacing 6e-8) and tiny values.
# * the gradient of a broadcast log_scale is a sum, done by autograd in the
#   input dtype: float16 2e-3, bfloat16 2e-2. For a shared log σ it is
#   Σ_b (N - Σ_i z_bi²), a difference of terms of size N·B = 180 that nearly
#   cancel, so float32 rounding of those terms (and a different summation
#   order, AVX2 vs AVX-512) leaves errors of order 180 · 6e-8 per rounding:
#   1e-4 absolute.
DTYPE_TOLS = {
    F32: dict(value=(1e-5, 1e-5), grad=(1e-5, 1e-6), summed_grad=(1e-5, 1e-4)),
    torch.float16: dict(value=(1e-5, 1e-5), grad=(1e-3, 1e-5), summed_grad=(2e-3, 1e-3)),
    torch.bfloat16: dict(value=(1e-5, 1e-5), grad=(8e-3, 1e-4), summed_grad=(2e-2, 1e-2)),
}


@pytest.mark.parametrize("dtype", [F32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("likelihood,logits,ls_kind", VARIANTS, ids=VARIANT_IDS)
def test_low_precision_against_float64_reference(likelihood, logits, ls_kind, reduction, dtype):
    inputs = make_inputs(likelihood, logits, dtype, (5,), batch=3, sample_shape=(3, 4, 5))
    up = Inputs(*(a.to(F64) for a in inputs))
    # log_scale in the dtype of recon (a decoder head emits it in its own dtype).
    ls = make_log_scale(ls_kind, inputs.recon.shape, dtype=dtype)
    ls_up = fresh(ls.detach().to(F64).requires_grad_()) if isinstance(ls, torch.Tensor) else ls
    kw = loss_kw(likelihood, logits, reduction, 0.6)
    got, got_g = run_loss(fusedvae.vae_loss, inputs, log_scale=ls, **kw)
    exp, exp_g = run_loss(reference.vae_loss, up, log_scale=ls_up, **kw)
    for name in ("loss", "rec", "kl"):
        assert getattr(got, name).dtype == F32, name
    tol = DTYPE_TOLS[dtype]
    for name in ("loss", "rec", "kl"):
        torch.testing.assert_close(getattr(got, name), getattr(exp, name).float(), rtol=tol["value"][0], atol=tol["value"][1])
    for name in got_g:
        assert got_g[name].dtype == dtype, name
        summed = name == "log_scale" and ls_kind in ("scalar_tensor", "broadcast_tensor", "per_sample_tensor")
        rtol, atol = tol["summed_grad" if summed else "grad"]
        torch.testing.assert_close(got_g[name], exp_g[name].to(dtype), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [F32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_low_precision_cb_log_normalizer(dtype):
    eta = torch.tensor([0.0, 1e-4, -0.01, 0.5, -0.99, 1.0, 3.0, -16.0, 30.0, 88.0, -100.0], dtype=F64).to(dtype)
    got = fusedvae.continuous_bernoulli_log_normalizer(eta)
    assert got.dtype == dtype
    exp = reference.continuous_bernoulli_log_normalizer(eta.to(F64))
    # float32: DESIGN.md promises <= 1e-6 relative; 16-bit outputs are rounded once.
    rtol = {F32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got, exp.to(dtype), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["f16", "bf16"])
@pytest.mark.parametrize("ls_kind", ["full_tensor", "broadcast_tensor"])
def test_low_precision_recon_with_float32_log_scale(dtype, ls_kind):
    # A 16-bit decoder mean with a float32 log-scale (e.g. a learned nn.Parameter
    # kept in float32). The reference evaluates the loss in float32 with the
    # float32 log_scale as given; like every other 16-bit path (accumulated in
    # float32, see DTYPE_TOLS) the fused values should agree to ~1e-5, and the
    # float32 log_scale gradient to float32 precision (it is a float32 tensor).
    inputs = make_inputs("gaussian", True, dtype, (5,), batch=3, sample_shape=(3, 4, 5))
    up = Inputs(*(a.to(F64) for a in inputs))
    ls = make_log_scale(ls_kind, inputs.recon.shape, dtype=F32)
    ls_up = fresh(ls.detach().double().requires_grad_())
    kw = loss_kw("gaussian", True, "none")
    got, got_g = run_loss(fusedvae.vae_loss, inputs, log_scale=ls, **kw)
    exp, exp_g = run_loss(reference.vae_loss, up, log_scale=ls_up, **kw)
    torch.testing.assert_close(got.rec, exp.rec.float(), rtol=1e-5, atol=1e-5)
    assert got_g["log_scale"].dtype == F32
    torch.testing.assert_close(got_g["log_scale"], exp_g["log_scale"].float(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------- uint8 target --


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(
    "likelihood,logits,ls_kind",
    [
        ("bernoulli", True, None),
        ("bernoulli", False, None),
        ("cbernoulli", True, None),
        ("cbernoulli", False, None),
        ("gaussian", True, None),
        ("gaussian", True, "full_tensor"),
        ("gaussian", True, "optimal"),
    ],
)
def test_uint8_target_equals_scaled_float(likelihood, logits, ls_kind, dtype):
    inp = make_inputs(likelihood, logits, dtype, (5,), target_dtype=torch.uint8, sample_shape=(3, 7, 5))
    as_float = inp._replace(target=inp.target.to(dtype) / 255)
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=dtype)
    kw = loss_kw(likelihood, logits, "none")
    got, got_g = run_loss(fusedvae.vae_loss, inp, log_scale=ls, **kw)
    exp, exp_g = run_loss(fusedvae.vae_loss, as_float, log_scale=ls, **kw)
    # The kernel reads t = float(u8) / 255 exactly as torch computes it: the
    # elementwise gradients are bitwise equal. The per-sample sums agree to the
    # last bit or so: the two instantiations are separate code, in which the
    # compiler may fuse a different multiply-add of the summation; so do the
    # gradients that depend on a sum (the optimal scale's).
    sum_rtol = 0 if dtype == F64 else 4 * torch.finfo(torch.float32).eps
    assert_grads_close(got_g, exp_g, rtol=sum_rtol if ls_kind == "optimal" else 0, atol=0)
    assert_outputs_close(got, exp, rtol=sum_rtol, atol=0)
    # And the float64 reference (which also takes uint8 targets) on the same values.
    up = inp._replace(recon=inp.recon.double(), mu=inp.mu.double(), logvar=inp.logvar.double())
    ls_up = fresh(ls.detach().double().requires_grad_()) if isinstance(ls, torch.Tensor) else ls
    ref_out, ref_g = run_loss(reference.vae_loss, up, log_scale=ls_up, **kw)
    rtol, atol = (RTOL64, ATOL64) if dtype == F64 else (1e-5, 1e-5)
    assert_outputs_close(got, ref_out, rtol=rtol, atol=atol, check_dtype=False)
    for name in got_g:
        torch.testing.assert_close(got_g[name].double(), ref_g[name], rtol=rtol, atol=atol / 10)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_every_pixel_value_is_read_as_its_quotient(device, dtype):
    # Each of the 256 pixel values, in every vector lane and in a partial last
    # vector, is read as exactly float(k) / 255 (the CPU's vector kernels and the
    # CUDA kernels multiply by 1/255 and correct the rounding instead of dividing:
    # math::pixel_quotient).
    pixels = torch.arange(256, dtype=torch.uint8, device=device).repeat(3)[:-5].reshape(-1, 1)
    recon = torch.zeros(pixels.shape, dtype=dtype, device=device, requires_grad=True)
    mu = torch.zeros(pixels.shape[0], 2, dtype=dtype, device=device)
    kw = dict(likelihood="gaussian", reduction="none")
    got = fusedvae.vae_loss(recon, pixels, mu, mu, **kw)
    expected_recon = recon.detach().clone().requires_grad_()
    # The quotients on the CPU, whose division rounds correctly (CUDA's division
    # by a scalar multiplies by its reciprocal).
    quotients = (pixels.cpu().to(dtype) / 255).to(device)
    expected = fusedvae.vae_loss(expected_recon, quotients, mu, mu, **kw)
    assert torch.equal(got.rec, expected.rec)  # ½t² + const: equal iff each t is
    (grad,) = torch.autograd.grad(got.rec.sum(), recon)
    (expected_grad,) = torch.autograd.grad(expected.rec.sum(), expected_recon)
    assert torch.equal(grad, expected_grad)  # x - t: bitwise


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["f16", "bf16"])
def test_uint8_target_half_precision_recon(dtype):
    # 16-bit recon with uint8 pixels: the kernel scales in float32, like the
    # reference (t_u8.to(float32)/255), not t_u8.to(float16)/255.
    inp = make_inputs("bernoulli", True, dtype, (5,), target_dtype=torch.uint8, sample_shape=(3, 7, 5))
    got, got_g = run_loss(fusedvae.vae_loss, inp, reduction="none")
    exp, exp_g = run_loss(reference.vae_loss, inp._replace(recon=inp.recon.float(), mu=inp.mu.float(), logvar=inp.logvar.float()), reduction="none")
    torch.testing.assert_close(got.rec, exp.rec, rtol=1e-5, atol=1e-5)
    tol = DTYPE_TOLS[dtype]["grad"]
    torch.testing.assert_close(got_g["recon"], exp_g["recon"].to(dtype), rtol=tol[0], atol=tol[1])


# ----------------------------------------------------------- mixed dtypes --


@pytest.mark.parametrize(
    "recon_dtype,target_dtype,latent_dtypes,out_dtype",
    [
        (F32, F64, (F32, F32), F64),
        (F64, F32, (F64, F64), F64),
        (torch.float16, F32, (torch.float16, F32), F32),
        (torch.bfloat16, torch.float16, (F32, F64), F32),
    ],
)
@pytest.mark.parametrize("likelihood,logits", [("bernoulli", True), ("cbernoulli", False), ("gaussian", True), ("laplace", True)])
def test_mixed_dtypes_promote(likelihood, logits, recon_dtype, target_dtype, latent_dtypes, out_dtype):
    inp = make_inputs(likelihood, logits, F64, (5,))
    mixed = Inputs(inp.recon.to(recon_dtype), inp.target.to(target_dtype), inp.mu.to(latent_dtypes[0]), inp.logvar.to(latent_dtypes[1]))
    kw = loss_kw(likelihood, logits, "none")
    got, got_g = run_loss(fusedvae.vae_loss, mixed, **kw)
    exp, exp_g = run_loss(reference.vae_loss, mixed, **kw)
    # rec is computed in the promoted dtype of recon and target, kl in that of mu and logvar.
    assert got.rec.dtype == exp.rec.dtype == out_dtype
    assert got.kl.dtype == exp.kl.dtype
    for name in got_g:
        assert got_g[name].dtype == getattr(mixed, name).dtype, name
    # Same promoted values on both sides: float64 -> RTOL64; float32 -> a few ulps
    # of each element and sum (1e-5); 16-bit gradients rounded once (see DTYPE_TOLS).
    tol = {F64: RTOL64, F32: 1e-5}
    torch.testing.assert_close(got.rec, exp.rec, rtol=tol[out_dtype], atol=tol[out_dtype])
    torch.testing.assert_close(got.kl, exp.kl, rtol=tol[got.kl.dtype], atol=tol[got.kl.dtype])
    loss_tol = max(tol[out_dtype], tol[got.kl.dtype])
    torch.testing.assert_close(got.loss, exp.loss, rtol=loss_tol, atol=loss_tol, check_dtype=False)
    grad_tol = {F32: 1e-5, F64: RTOL64, torch.float16: 1e-3, torch.bfloat16: 8e-3}
    for name in got_g:
        t = grad_tol[got_g[name].dtype]
        torch.testing.assert_close(got_g[name], exp_g[name], rtol=t, atol=t / 10)


NARROW_DTYPES = [F32, torch.float16, torch.bfloat16]
TARGET_DTYPES = [F32, torch.float16, torch.bfloat16, torch.uint8, torch.bool]
_DTYPE_IDS = {F32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.uint8: "u8", torch.bool: "bool"}
# A gradient is computed in float32 and rounded once to its dtype (DTYPE_TOLS).
_GRAD_TOL = {F32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-4)}


_PAIR_LIKELIHOODS = [
    ("bernoulli-logits", "bernoulli", True, None), ("bernoulli-probs", "bernoulli", False, None),
    ("cbernoulli-logits", "cbernoulli", True, None), ("gaussian-optimal", "gaussian", True, "optimal"),
    ("gaussian-full", "gaussian", True, "full_tensor"),
]
# Every likelihood with every (recon, target) dtype pair; a per-element log σ
# also in float32 beside a 16-bit recon.
DTYPE_PAIR_CASES = [
    pytest.param(lik, lg, ls, rd, td, sd, id=f"{name}-recon-{_DTYPE_IDS[rd]}-target-{_DTYPE_IDS[td]}-scale-{sd}")
    for name, lik, lg, ls in _PAIR_LIKELIHOODS
    for rd in NARROW_DTYPES
    for td in TARGET_DTYPES
    for sd in (["recon", "f32"] if ls == "full_tensor" and rd != F32 else ["recon"])
]


@pytest.mark.parametrize("likelihood,logits,ls_kind,recon_dtype,target_dtype,scale_dtype", DTYPE_PAIR_CASES)
def test_every_dtype_pair_read_as_it_is(device, likelihood, logits, ls_kind, recon_dtype, target_dtype,
                                        scale_dtype):
    # recon, target and a per-element log σ each in its own dtype, with no
    # promoted copy (test_memory.py bounds the bytes): float32 sums, the
    # gradient in recon's dtype (log σ's in its own), as exact as matched dtypes.
    inp = make_inputs(likelihood, logits, recon_dtype, (5,), sample_shape=(3, 7, 5),
                      target_dtype=torch.uint8 if target_dtype == torch.uint8 else None, device=device)
    target = inp.target
    if target_dtype == torch.bool:
        target = make_inputs(likelihood, logits, F64, (5,), sample_shape=(3, 7, 5), device=device).target > 0.5
    elif target_dtype != torch.uint8:
        target = make_inputs(likelihood, logits, F64, (5,), sample_shape=(3, 7, 5), device=device).target.to(target_dtype)
    inp = inp._replace(target=target)
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=recon_dtype if scale_dtype == "recon" else F32, device=device)
    kw = loss_kw(likelihood, logits, "none")
    got, got_g = run_loss(fusedvae.vae_loss, inp, log_scale=ls, upstream=weighted_upstream, **kw)
    exp, exp_g = run_loss(reference.vae_loss, on_cpu_float64(inp), log_scale=on_cpu_float64(ls),
                          upstream=weighted_upstream, **kw)
    assert got.rec.dtype == F32
    torch.testing.assert_close(on_cpu(got.rec).double(), exp.rec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on_cpu(got.loss).double(), exp.loss, rtol=1e-5, atol=1e-5)
    for name, g in got_g.items():
        dtype = (ls if name == "log_scale" else getattr(inp, name)).dtype
        assert g.dtype == dtype, name
        rtol, atol = _GRAD_TOL[dtype]
        torch.testing.assert_close(on_cpu(g).double(), exp_g[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.bool], ids=["u8", "bool"])
def test_float64_recon_reads_pixel_and_bool_targets(target_dtype):
    inp = make_inputs("bernoulli", True, F64, (5,), target_dtype=target_dtype if target_dtype == torch.uint8 else None)
    if target_dtype == torch.bool:
        inp = inp._replace(target=inp.target > 0.5)
    got, got_g = run_loss(fusedvae.vae_loss, inp, reduction="none")
    exp, exp_g = run_loss(reference.vae_loss, inp, reduction="none")
    assert got.rec.dtype == F64
    assert_outputs_close(got, exp, RTOL64, ATOL64)
    assert_grads_close(got_g, exp_g, RTOL64, ATOL64)


def test_float32_recon_float64_target_uses_float64_values():
    # The promoted computation sees the float64 target's full precision.
    inp = make_inputs("gaussian", True, F64, (5,))
    target = inp.target + 1e-12  # not representable in float32
    got = fusedvae.vae_loss(inp.recon.float(), target, inp.mu, inp.logvar, likelihood="gaussian", reduction="none")
    exp = reference.vae_loss(inp.recon.float().double(), target, inp.mu, inp.logvar, likelihood="gaussian", reduction="none")
    assert got.rec.dtype == F64
    torch.testing.assert_close(got.rec, exp.rec, rtol=RTOL64, atol=ATOL64)


# ---------------------------------------------------------------- layouts --


def _layout_cases():
    # (name, recon transform, target transform); each transform keeps the values
    # of the [B, C, H, W] tensor it gets, changing only the strides.
    cl = lambda a: a.contiguous(memory_format=torch.channels_last)  # noqa: E731
    ident = lambda a: a  # noqa: E731
    # dense, batch outermost, permuted inner dims (runs without a copy)
    inner_perm = lambda a: a.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)  # noqa: E731
    # dense, batch NOT outermost (copied by the op)
    batch_inner = lambda a: a.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)  # noqa: E731
    transposed = lambda a: a.transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731
    return [
        ("cl-cl", cl, cl),
        ("cl-contig", cl, ident),
        ("contig-cl", ident, cl),
        ("perm-contig", inner_perm, ident),
        ("contig-perm", ident, inner_perm),
        ("batchinner-cl", batch_inner, cl),
        ("cl-batchinner", cl, batch_inner),
        ("transposed-transposed", transposed, transposed),
    ]


LAYOUTS = _layout_cases()


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[c[0] for c in LAYOUTS])
@pytest.mark.parametrize(
    "likelihood,logits,ls_kind",
    [("bernoulli", True, None), ("cbernoulli", False, None), ("gaussian", True, "full_tensor"), ("gaussian", True, "optimal")],
)
def test_layouts_match_contiguous(likelihood, logits, ls_kind, layout, dtype):
    _, rt, tt = layout
    inp = make_inputs(likelihood, logits, dtype, (5,), batch=3, sample_shape=(3, 5, 6))
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=dtype)
    kw = loss_kw(likelihood, logits, "none")
    base, base_g = run_loss(fusedvae.vae_loss, inp, log_scale=ls, **kw)
    up = Inputs(*(a.double() for a in inp))
    ref_out, ref_g = run_loss(reference.vae_loss, up, log_scale=ls.double() if isinstance(ls, torch.Tensor) else ls, **kw)

    recon = rt(inp.recon.clone()).requires_grad_()
    target = tt(inp.target.clone())
    ls2 = rt(ls.detach().clone()).requires_grad_() if isinstance(ls, torch.Tensor) else ls
    mu, lv = inp.mu.clone().requires_grad_(), inp.logvar.clone().requires_grad_()
    out = fusedvae.vae_loss(recon, target, mu, lv, log_scale=ls2, **kw)
    out.loss.sum().backward()
    assert recon.grad.shape == recon.shape
    # Sums may run in another order (channels_last walks memory order): a few ulps.
    rtol = 1e-12 if dtype == F64 else 2e-6
    assert_outputs_close(out, base, rtol=rtol, atol=rtol)
    # Elementwise gradients: exact (for "optimal", sigma comes from a sum: a few ulps).
    gtol = rtol if ls_kind == "optimal" else 0
    torch.testing.assert_close(recon.grad, base_g["recon"], rtol=gtol, atol=gtol)
    torch.testing.assert_close(mu.grad, base_g["mu"], rtol=0, atol=0)
    if isinstance(ls2, torch.Tensor):
        assert ls2.grad.shape == ls2.shape
        torch.testing.assert_close(ls2.grad, base_g["log_scale"], rtol=0, atol=0)
    # and the float64 reference
    rtol = RTOL64 if dtype == F64 else 1e-5
    assert_outputs_close(out, ref_out, rtol=rtol, atol=rtol, check_dtype=False)
    torch.testing.assert_close(recon.grad.double(), ref_g["recon"], rtol=rtol, atol=rtol / 10)


@pytest.mark.parametrize("likelihood,logits", [("bernoulli", True), ("cbernoulli", True), ("gaussian", True), ("laplace", True)])
def test_sliced_batch_and_expanded_target(likelihood, logits):
    inp = make_inputs(likelihood, logits, F64, (5,), batch=6, sample_shape=(2, 5, 3))
    kw = loss_kw(likelihood, logits, "none")
    # x[::2]: non-contiguous batch, for every tensor.
    sliced = Inputs(inp.recon[::2], inp.target[::2], inp.mu[::2], inp.logvar[::2])
    assert not sliced.recon.is_contiguous()
    for case in (sliced, Inputs(inp.recon[:, :, ::2], inp.target[:, :, ::2], inp.mu[:, 1:], inp.logvar[:, 1:])):
        base = Inputs(*(a.contiguous() for a in case))
        got, got_g = run_loss_views(case, **kw)
        exp, exp_g = run_loss(reference.vae_loss, base, **kw)
        assert_outputs_close(got, exp, RTOL64, ATOL64)
        assert_grads_close(got_g, exp_g, RTOL64, ATOL64)
    # Expanded (stride 0) target: one image broadcast over the batch.
    t = inp.target[:1].expand_as(inp.recon)
    assert t.stride(0) == 0
    exp_in = inp._replace(target=t)
    got, got_g = run_loss(fusedvae.vae_loss, exp_in, **kw)
    exp, exp_g = run_loss(reference.vae_loss, inp._replace(target=t.contiguous()), **kw)
    assert_outputs_close(got, exp, RTOL64, ATOL64)
    assert_grads_close(got_g, exp_g, RTOL64, ATOL64)


def run_loss_views(inputs, upstream=None, keep_storage=False, **kw):
    """Like run_loss, but the leaves keep the given (strided) layout; with
    ``keep_storage`` they are the given tensors' own storage (and offset)."""
    leaves = [a.detach() for a in (inputs.recon, inputs.mu, inputs.logvar)]
    views = []
    for a in leaves:
        if keep_storage:
            views.append(a.requires_grad_())
            continue
        # a strided leaf: allocate the full base and take the same view of it
        base = torch.empty_strided(a.size(), a.stride(), dtype=a.dtype, device=a.device)
        base.copy_(a)
        views.append(base.requires_grad_())
    recon, mu, lv = views
    assert recon.stride() == inputs.recon.stride() and recon.is_leaf
    out = fusedvae.vae_loss(recon, inputs.target, mu, lv, **kw)
    (upstream(out) if upstream is not None else out.loss.sum()).backward()
    assert recon.grad.shape == recon.shape
    return out, {"recon": recon.grad, "mu": mu.grad, "logvar": lv.grad}


def test_gradient_flows_through_noncontiguous_view_of_leaf():
    inp = make_inputs("bernoulli", True, F64, (5,), batch=6, sample_shape=(2, 5, 3))
    x = inp.recon.clone().requires_grad_()
    out = fusedvae.vae_loss(x[::2].transpose(2, 3), inp.target[::2].transpose(2, 3), inp.mu[::2], inp.logvar[::2])
    out.loss.backward()
    x2 = inp.recon.clone().requires_grad_()
    ref_out = reference.vae_loss(x2[::2], inp.target[::2], inp.mu[::2], inp.logvar[::2])
    ref_out.loss.backward()
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=RTOL64, atol=ATOL64)
    torch.testing.assert_close(x.grad, x2.grad, rtol=RTOL64, atol=ATOL64)
    assert (x.grad[1::2] == 0).all()


@pytest.mark.parametrize("kind", ["broadcast_tensor", "per_sample_tensor", "channels_last_full"])
def test_log_scale_layouts(kind):
    inp = make_inputs("gaussian", True, F64, (5,), batch=3, sample_shape=(3, 4, 5))
    if kind == "channels_last_full":
        ls = (0.3 * torch.randn(inp.recon.shape, dtype=F64)).contiguous(memory_format=torch.channels_last)
        ls.requires_grad_()
    else:
        ls = make_log_scale(kind, inp.recon.shape)
    recon_cl = inp._replace(recon=inp.recon.contiguous(memory_format=torch.channels_last))
    got, got_g = run_loss(fusedvae.vae_loss, recon_cl, log_scale=ls, likelihood="gaussian", reduction="none")
    exp, exp_g = run_loss(reference.vae_loss, inp, log_scale=ls, likelihood="gaussian", reduction="none")
    assert_outputs_close(got, exp, RTOL64, ATOL64)
    assert_grads_close(got_g, exp_g, RTOL64, ATOL64)
    assert got_g["log_scale"].shape == ls.shape


def test_noncontiguous_latents():
    inp = make_inputs("bernoulli", True, F64, (4, 3, 3))
    mu_t = inp.mu.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels_last latent
    lv_t = inp.logvar.transpose(2, 3).contiguous().transpose(2, 3)
    for free_bits in (0.0, 0.6):
        kw = loss_kw("bernoulli", True, "none", free_bits)
        got, got_g = run_loss(fusedvae.vae_loss, inp._replace(mu=mu_t, logvar=lv_t), **kw)
        exp, exp_g = run_loss(reference.vae_loss, inp, **kw)
        assert_outputs_close(got, exp, RTOL64, ATOL64)
        assert_grads_close(got_g, exp_g, RTOL64, ATOL64)


# ------------------------------------------------------------------ sizes --


@pytest.mark.parametrize(
    "batch,sample_shape,latent_shape",
    [
        (1, (3, 4, 5), (5,)),  # B = 1
        (2, (3, 7, 11), (7,)),  # odd per-sample size: vector tail
        (3, (1,), (1,)),  # one element per sample: only the tail
        (2, (3, 100, 70), (3,)),  # 21000 > 16384: two chunks per sample
        (2, (2, 128, 128), (4, 64, 70)),  # exactly two chunks; multi-chunk latent too
        (1, (5, 3300, 1), (13,)),  # B = 1 and 16500 elements
    ],
    ids=["B1", "odd", "scalar-sample", "two-chunks", "exact-chunks", "B1-chunks"],
)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize(
    "likelihood,logits,ls_kind",
    [("bernoulli", True, None), ("bernoulli", False, None), ("cbernoulli", True, None), ("cbernoulli", False, None),
     ("gaussian", True, "full_tensor"), ("gaussian", True, "optimal")],
)
def test_sizes(likelihood, logits, ls_kind, dtype, batch, sample_shape, latent_shape):
    inp = make_inputs(likelihood, logits, dtype, latent_shape, batch=batch, sample_shape=sample_shape)
    up = Inputs(*(a.to(F64) for a in inp))
    ls = make_log_scale(ls_kind, inp.recon.shape, dtype=dtype)
    ls_up = fresh(ls.detach().double().requires_grad_()) if isinstance(ls, torch.Tensor) else ls
    kw = loss_kw(likelihood, logits, "none", 0.5)
    got, got_g = run_loss(fusedvae.vae_loss, inp, log_scale=ls, **kw)
    exp, exp_g = run_loss(reference.vae_loss, up, log_scale=ls_up, **kw)
    # float32: sums of up to 33k elements accumulated in float32 lanes -> 2e-5.
    rtol, atol = (RTOL64, 1e-11) if dtype == F64 else (2e-5, 1e-4)
    for name in ("loss", "rec", "kl"):
        torch.testing.assert_close(getattr(got, name), getattr(exp, name).to(dtype), rtol=rtol, atol=atol)
    grtol, gatol = (RTOL64, 1e-13) if dtype == F64 else (1e-5, 1e-6)
    for name in got_g:
        torch.testing.assert_close(got_g[name], exp_g[name].to(dtype), rtol=grtol, atol=gatol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("likelihood,logits,ls_kind", [("bernoulli", True, None), ("cbernoulli", False, None), ("gaussian", True, "full_tensor")])
def test_one_dimensional_recon_and_latent(likelihood, logits, ls_kind):
    # recon [B] (N = 1) and mu [B] (J = 1): every dim after the batch is absent.
    inp = make_inputs(likelihood, logits, F64, (), batch=5, sample_shape=())
    assert inp.recon.shape == inp.mu.shape == (5,)
    for free_bits in (0.0, 0.6):
        for reduction in REDUCTIONS:
            compare_to_reference(inp, ls_kind, **loss_kw(likelihood, logits, reduction, free_bits))


# ---------------------------------------------------------- on each device --


def _assert_close_as(got, exp, to, rtol, atol):
    """Outputs and gradients of two ``run_loss`` results, both on the CPU and cast to ``to``."""
    outs = [type(out)(*(v.to(to) for v in on_cpu(out))) for out, _ in (got, exp)]
    grads = [{k: v.to(to) for k, v in on_cpu(g).items()} for _, g in (got, exp)]
    assert_outputs_close(*outs, rtol=rtol, atol=atol)
    assert_grads_close(*grads, rtol=rtol, atol=atol)


@pytest.mark.parametrize("target_dtype", [None, torch.uint8], ids=["float-target", "uint8-target"])
@pytest.mark.parametrize("likelihood,logits,ls_kind", DEVICE_VARIANTS, ids=DEVICE_VARIANT_IDS)
@pytest.mark.parametrize(
    "dtype,tol", [(F32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)], ids=["f32", "f16", "bf16"]
)
def test_dtypes_match_reference_on_device(device, dtype, tol, likelihood, logits, ls_kind, target_dtype):
    # Each dtype with float and uint8 targets on 3x32x33 samples (a vector tail in
    # each), against the float64 reference on exactly the same (upcast) values.
    # Values accumulate in float32; gradients are rounded once to the input dtype:
    # 2e-3 covers float16's half ulp (4.9e-4), 2e-2 bfloat16's (3.9e-3).
    inputs = make_inputs(likelihood, logits, dtype, (8,), batch=3, sample_shape=(3, 32, 33),
                         target_dtype=target_dtype, device=device)
    ls = make_log_scale(ls_kind, inputs.recon.shape, dtype=dtype, device=device)
    kw = dict(likelihood=likelihood, logits=logits)
    got = run_loss(fusedvae.vae_loss, inputs, upstream=weighted_upstream, log_scale=ls, **kw)
    for name in ("loss", "rec", "kl"):
        assert getattr(got[0], name).dtype == F32, name
    for name, g in got[1].items():
        assert g.dtype == dtype and g.device == inputs.recon.device, name
    exp = run_loss(reference.vae_loss, on_cpu_float64(inputs), upstream=weighted_upstream,
                   log_scale=on_cpu_float64(ls), **kw)
    _assert_close_as(got, exp, F64, rtol=tol, atol=tol)
    # and the CPU kernels on the same inputs (both accumulate in float32, in another order)
    cpu_ls = on_cpu(ls).requires_grad_() if isinstance(ls, torch.Tensor) else ls
    cpu = run_loss(fusedvae.vae_loss, on_cpu(inputs), upstream=weighted_upstream, log_scale=cpu_ls, **kw)
    _assert_close_as(got, cpu, F32, rtol=tol, atol=tol)


def test_layouts_match_contiguous_on_device(device):
    inputs = make_inputs("bernoulli", True, F32, (8,), batch=4, sample_shape=(3, 16, 16), device=device)
    want = run_loss(fusedvae.vae_loss, inputs, upstream=weighted_upstream)
    _assert_close_as(want, run_loss(reference.vae_loss, on_cpu_float64(inputs), upstream=weighted_upstream),
                     F64, rtol=1e-5, atol=1e-5)
    x, t = inputs.recon, inputs.target
    cl = dict(memory_format=torch.channels_last)
    for xx, tt in [(x.contiguous(**cl), t.contiguous(**cl)), (x.contiguous(**cl), t),
                   (x.transpose(2, 3).contiguous().transpose(2, 3), t)]:
        got = run_loss_views(inputs._replace(recon=xx, target=tt), upstream=weighted_upstream)
        _assert_close_as(got, want, F32, rtol=1e-5, atol=1e-5)
    # A sliced batch runs on a contiguous copy.
    sliced = Inputs(*(a.repeat_interleave(2, dim=0)[::2] for a in inputs))
    assert not sliced.recon.is_contiguous()
    got = run_loss_views(sliced, upstream=weighted_upstream)
    assert got[1]["recon"].shape == x.shape
    _assert_close_as(got, want, F32, rtol=1e-5, atol=1e-5)


def test_unaligned_and_odd_sizes_use_the_scalar_path(device):
    # A storage offset of one element breaks 16-byte alignment; 7*11 per channel
    # leaves a tail in every sample.
    inputs = make_inputs("cbernoulli", True, F32, (8,), batch=3, sample_shape=(3, 7, 11), device=device)
    shifted = torch.empty(inputs.recon.numel() + 1, device=device)[1:].view_as(inputs.recon).copy_(inputs.recon)
    assert shifted.data_ptr() % 16 != 0
    got = run_loss_views(inputs._replace(recon=shifted), upstream=weighted_upstream, likelihood="cbernoulli",
                         keep_storage=True)
    exp = run_loss(reference.vae_loss, on_cpu_float64(inputs), upstream=weighted_upstream, likelihood="cbernoulli")
    _assert_close_as(got, exp, F64, rtol=1e-5, atol=1e-5)


@pytest.fixture
def cuda_wide_loads():
    """The opt-in CUDA kernels that load 16 bytes of the narrower operand per access
    (csrc/kernels.h, KernelOptions), switched on for one test."""
    with cuda_kernel_switches(wide_loads=True):
        yield


@pytest.fixture(params=[{}, dict(fast_exp=True)], ids=["expf", "fast_exp"])
def cuda_exp(request):
    """The CUDA objective's exponential for the logits likelihoods, for one test:
    expf, the default, then the opt-in approximate one
    (fusedvae._C._set_cuda_fast_exp)."""
    with cuda_kernel_switches(**request.param):
        yield


_FAST_EXP_PAIRS = [(F32, F32), (F32, torch.uint8), (torch.bfloat16, torch.uint8), (torch.float16, torch.float16)]


@pytest.mark.parametrize("likelihood", ["bernoulli", "cbernoulli"])
@pytest.mark.parametrize("recon_dtype,target_dtype", _FAST_EXP_PAIRS,
                         ids=[f"{_DTYPE_IDS.get(r)}-{_DTYPE_IDS[t]}" for r, t in _FAST_EXP_PAIRS])
@pytest.mark.parametrize("sample_shape", [(3, 32, 33), (3, 5, 7)], ids=["aligned", "tail"])
@pytest.mark.parametrize("logit_scale", [1.0, 30.0], ids=["logits", "large-logits"])
def test_logits_likelihoods_match_reference_under_either_cuda_exponential(
        device, cuda_exp, likelihood, recon_dtype, target_dtype, sample_shape, logit_scale):
    # Under fast_exp the CUDA kernels with float32 accumulation take exp(-|x|)
    # from the hardware's base-2 exponential (math::FastExpOps): the same bars as
    # expf. Logits 30 times the usual spread reach past |x| = 87.3, where it
    # flushes e^-|x| to 0; the vector packs ("aligned") and the scalar path
    # ("tail") each run.
    inputs = make_inputs(likelihood, True, recon_dtype, (8,), batch=3, sample_shape=sample_shape,
                         target_dtype=torch.uint8 if target_dtype == torch.uint8 else None, device=device)
    inputs = inputs._replace(recon=(inputs.recon.double() * logit_scale).to(recon_dtype))
    if target_dtype != torch.uint8:
        inputs = inputs._replace(target=inputs.target.to(target_dtype))
    kw = dict(likelihood=likelihood, reduction="none")
    got = run_loss(fusedvae.vae_loss, inputs, upstream=weighted_upstream, **kw)
    exp = run_loss(reference.vae_loss, on_cpu_float64(inputs), upstream=weighted_upstream, **kw)
    tol = {F32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[recon_dtype]
    _assert_close_as(got, exp, F64, rtol=tol, atol=tol)


# Each pair whose wide vector width differs from the default one (16 bytes of recon).
_WIDE_PAIRS = [(F64, torch.uint8), (F32, torch.uint8), (torch.bfloat16, torch.uint8), (torch.float16, torch.uint8),
               (F32, torch.float16), (F32, torch.bool)]


@pytest.mark.usefixtures("cuda_wide_loads")
@pytest.mark.parametrize("likelihood,logits,ls_kind", [("bernoulli", True, None), ("gaussian", True, "full_tensor"),
                                                       ("laplace", True, "optimal")],
                         ids=["bernoulli", "gaussian-full", "laplace-optimal"])
@pytest.mark.parametrize("recon_dtype,target_dtype", _WIDE_PAIRS,
                         ids=[f"{_DTYPE_IDS.get(r, 'f64')}-{_DTYPE_IDS[t]}" for r, t in _WIDE_PAIRS])
@pytest.mark.parametrize("sample_shape", [(3, 32, 33), (3, 5, 7)], ids=["aligned", "tail"])
def test_wide_loads_match_reference(device, recon_dtype, target_dtype, likelihood, logits, ls_kind, sample_shape):
    # With the switch on, the CUDA objective reads 16 pixels per access beside a
    # float32 recon; 3x32x33 samples take that path (3168 = 198·16), 3x5x7 ones
    # the scalar one. The CPU kernels ignore the switch.
    inputs = make_inputs(likelihood, logits, recon_dtype, (8,), batch=3, sample_shape=sample_shape,
                         target_dtype=torch.uint8 if target_dtype == torch.uint8 else None, device=device)
    if target_dtype == torch.bool:
        inputs = inputs._replace(target=inputs.target > 0.5)
    elif target_dtype != torch.uint8:
        inputs = inputs._replace(target=inputs.target.to(target_dtype))
    ls = make_log_scale(ls_kind, inputs.recon.shape, dtype=recon_dtype, device=device)
    kw = dict(likelihood=likelihood, logits=logits, reduction="none")
    got = run_loss(fusedvae.vae_loss, inputs, upstream=weighted_upstream, log_scale=ls, **kw)
    exp = run_loss(reference.vae_loss, on_cpu_float64(inputs), upstream=weighted_upstream,
                   log_scale=on_cpu_float64(ls), **kw)
    tol = {F64: 1e-10, F32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[recon_dtype]
    _assert_close_as(got, exp, F64, rtol=tol, atol=tol)

"""``fusedvae.autoencoder_kl_loss`` and ``fusedvae.AutoencoderKLLoss``: latent
diffusion's autoencoder objective (without its GAN term) against the formula
written out in plain PyTorch as latent diffusion writes it, values and every
gradient; and, with diffusers installed (the ``examples`` extra), on
``diffusers.AutoencoderKL``'s own outputs, and the example that trains one.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fusedvae
from fusedvae import reference
from helpers import no_host_sync, synchronize

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64
SHAPE = (3, 2, 5, 4)  # [B, C, H, W]
LATENT = (3, 4, 2, 2)


def latent_diffusion_formula(inputs, reconstructions, mean, logvar_z, logvar, kl_weight=1e-6,
                             perceptual=None, weights=None):
    """CompVis LPIPSWithDiscriminator's generator loss before the GAN term, with the
    KL of its DiagonalGaussianDistribution, term by term (perceptual already
    multiplied by perceptual_weight)."""
    rec_loss = torch.abs(inputs - reconstructions)
    if perceptual is not None:
        rec_loss = rec_loss + perceptual.reshape((-1,) + (1,) * (inputs.dim() - 1))
    nll_loss = rec_loss / torch.exp(torch.as_tensor(logvar, dtype=rec_loss.dtype)) + logvar
    weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
    weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    logvar_z = torch.clamp(logvar_z, -30.0, 20.0)
    kl = 0.5 * torch.sum(torch.pow(mean, 2) + torch.exp(logvar_z) - 1.0 - logvar_z,
                         dim=list(range(1, mean.dim())))
    kl_loss = torch.sum(kl) / kl.shape[0]
    return weighted_nll_loss + kl_weight * kl_loss, nll_loss, weighted_nll_loss, kl_loss


def _inputs(device, dtype=F64, seed=0, outside_clamp=True):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.rand(SHAPE, generator=g, dtype=F64) * 2 - 1
    reconstructions = inputs + 0.3 * torch.randn(SHAPE, generator=g, dtype=F64)
    mean = torch.randn(LATENT, generator=g, dtype=F64)
    logvar_z = 2 * torch.randn(LATENT, generator=g, dtype=F64)
    if outside_clamp:  # a few posterior log-variances outside [-30, 20]
        logvar_z.view(-1)[:4] = torch.tensor([-45.0, -30.5, 20.5, 27.0], dtype=F64)
    return [t.to(device=device, dtype=dtype) for t in (inputs, reconstructions, mean, logvar_z)]


def _perceptual(kind, device, dtype=F64):
    if kind is None:
        return None
    p = torch.tensor([0.3, 1.1, 0.05], dtype=dtype, device=device)
    return p if kind == "[B]" else p.reshape(3, 1, 1, 1)


def _weights(kind, device, dtype=F64):
    g = torch.Generator().manual_seed(7)
    shapes = {"per-sample": (3, 1, 1, 1), "per-channel": (1, 2, 1, 1), "per-pixel": SHAPE, "per-row": (5, 1)}
    if kind is None:
        return None
    return (0.2 + 2 * torch.rand(shapes[kind], generator=g, dtype=F64)).to(device=device, dtype=dtype)


def _leaves(device, perceptual, logvar, kl_weight, dtype=F64, **kw):
    """Fresh leaves: (inputs, leaves dict); the dict holds every differentiable argument."""
    inputs, reconstructions, mean, logvar_z = _inputs(device, dtype, **kw)
    leaves = dict(reconstructions=reconstructions, posterior_mean=mean, posterior_logvar=logvar_z)
    leaves["logvar"] = torch.tensor(logvar, dtype=dtype, device=device) if logvar is not None else 0.4
    leaves["kl_weight"] = torch.tensor(kl_weight, dtype=dtype, device=device) if kl_weight is not None else 1e-6
    p = _perceptual(perceptual, device, dtype)
    if p is not None:
        leaves["perceptual"] = p
    for v in leaves.values():
        if isinstance(v, torch.Tensor):
            v.requires_grad_()
    return inputs, leaves


def _differentiable(leaves):
    return {k: v for k, v in leaves.items() if isinstance(v, torch.Tensor)}


def _call(fn, inputs, leaves, weights):
    kw = dict(kl_weight=leaves["kl_weight"], perceptual=leaves.get("perceptual"), weights=weights)
    return fn(inputs, leaves["reconstructions"], leaves["posterior_mean"], leaves["posterior_logvar"],
              leaves["logvar"], **kw)


# Coefficients on (loss, nll, weighted_nll, kl): an upstream gradient other than 1 on each.
UPSTREAM = (1.7, 0.6, -1.3, 0.9)


@pytest.mark.parametrize("kl_weight", [None, 0.5], ids=["kl_weight-float", "kl_weight-tensor"])
@pytest.mark.parametrize("logvar", [None, -0.3], ids=["logvar-float", "logvar-tensor"])
@pytest.mark.parametrize("weights", [None, "per-sample", "per-channel", "per-pixel", "per-row"])
@pytest.mark.parametrize("perceptual", [None, "[B]", "[B,1,1,1]"])
def test_equals_the_latent_diffusion_formula_float64(device, perceptual, weights, logvar, kl_weight):
    inputs, leaves = _leaves(device, perceptual, logvar, kl_weight)
    w = _weights(weights, device)
    got = _call(fusedvae.autoencoder_kl_loss, inputs, leaves, w)
    expected = latent_diffusion_formula(
        inputs, leaves["reconstructions"], leaves["posterior_mean"], leaves["posterior_logvar"],
        leaves["logvar"], leaves["kl_weight"], leaves.get("perceptual"), w,
    )
    assert isinstance(got, fusedvae.AutoencoderKLLossOutput)
    assert got._fields == ("loss", "nll", "weighted_nll", "kl")
    for name, a, b in zip(got._fields, got, expected):
        assert a.shape == () and a.dtype == F64, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
    if weights is None:
        assert got.nll.item() == got.weighted_nll.item()
    else:
        assert abs(got.nll.item() - got.weighted_nll.item()) > 1e-3  # the weights matter here
    # Every gradient: of the four outputs together (upstream gradients other than 1),
    # then of each output alone.
    wrt = _differentiable(leaves)
    combos = [UPSTREAM] + [tuple(float(i == k) for i in range(4)) for k in range(4)]
    for coeffs in combos:
        fused = torch.autograd.grad(sum(c * o for c, o in zip(coeffs, got)), list(wrt.values()),
                                    retain_graph=True, allow_unused=True)
        plain = torch.autograd.grad(sum(c * o for c, o in zip(coeffs, expected)), list(wrt.values()),
                                    retain_graph=True, allow_unused=True)
        for name, a, b in zip(wrt, fused, plain):
            a = torch.zeros_like(wrt[name]) if a is None else a
            b = torch.zeros_like(wrt[name]) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9,
                                       msg=lambda m, name=name, c=coeffs: f"d/d{name} of {c}: {m}")


@pytest.mark.parametrize("weights", [None, "per-channel"])
def test_reference_is_the_latent_diffusion_formula(weights):
    inputs, leaves = _leaves("cpu", "[B]", -0.3, 0.5)
    w = _weights(weights, "cpu")
    ref = _call(reference.autoencoder_kl_loss, inputs, leaves, w)
    expected = latent_diffusion_formula(
        inputs, leaves["reconstructions"], leaves["posterior_mean"], leaves["posterior_logvar"],
        leaves["logvar"], leaves["kl_weight"], leaves["perceptual"], w,
    )
    for a, b in zip(ref, expected):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("weights", [None, "per-pixel"])
def test_gradcheck(device, weights):
    # Away from the kinks of |x - x̂| and of the clamp, where finite differences mislead.
    inputs, leaves = _leaves(device, "[B]", -0.3, 0.5, outside_clamp=False)
    w = _weights(weights, device)
    names = list(_differentiable(leaves))

    def fn(*values):
        return _call(fusedvae.autoencoder_kl_loss, inputs, {**leaves, **dict(zip(names, values))}, w)

    assert torch.autograd.gradcheck(fn, tuple(leaves[n] for n in names), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_posterior_logvar_gradient_is_zero_outside_the_clamp(device):
    inputs, leaves = _leaves(device, None, None, 0.5, outside_clamp=False)
    lv = leaves["posterior_logvar"].detach().clone()
    lv.view(-1)[:6] = torch.tensor([-45.0, -30.5, -30.0, 20.0, 20.5, 27.0], dtype=F64)
    lv.requires_grad_()
    out = fusedvae.autoencoder_kl_loss(inputs, leaves["reconstructions"], leaves["posterior_mean"], lv, 0.0,
                                       kl_weight=leaves["kl_weight"])
    (g,) = torch.autograd.grad(out.loss, lv)
    expected = latent_diffusion_formula(inputs, leaves["reconstructions"], leaves["posterior_mean"], lv, 0.0,
                                        kl_weight=leaves["kl_weight"])[0]
    (g_expected,) = torch.autograd.grad(expected, lv)
    torch.testing.assert_close(g, g_expected, rtol=1e-12, atol=0)
    g = g.reshape(-1).cpu()
    # outside [-30, 20] torch.clamp(x, min, max)'s gradient is 0 (at the ends themselves
    # it is 1 up to torch 2.13 and 0 from 2.14: the assert_close above covers them)
    assert (g[[0, 1, 4, 5]] == 0).all(), g[:6]
    assert (g[6:] != 0).all()  # inside: the KL's gradient


@pytest.mark.parametrize("recon_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_narrow_dtypes_are_the_formula_to_rounding(device, recon_dtype):
    # float32 images, a narrower decoder output: the fused loss reads each as it is;
    # the formula runs in float64 on the same values.
    inputs64, recon64, mean64, lv64 = _inputs(device)
    inputs = inputs64.float()
    recon = recon64.to(recon_dtype).requires_grad_()
    mean, lv_z = mean64.float().requires_grad_(), lv64.float().requires_grad_()
    logvar = torch.tensor(0.25, device=device, requires_grad=True)
    p = _perceptual("[B,1,1,1]", device, torch.float32).requires_grad_()
    w = _weights("per-channel", device, torch.float32)
    got = fusedvae.autoencoder_kl_loss(inputs, recon, mean, lv_z, logvar, kl_weight=1e-6, perceptual=p, weights=w)
    leaves64 = [t.detach().double().requires_grad_() for t in (recon, mean, lv_z, logvar, p)]
    expected = latent_diffusion_formula(inputs.double(), leaves64[0], leaves64[1], leaves64[2], leaves64[3],
                                        1e-6, leaves64[4], w.double())
    # float32 rounding, relative to the size of the summed terms
    scale = float((torch.abs(inputs.double() - leaves64[0].detach()).sum() + 1) * math.exp(-0.25) / 3 + 1)
    for name, a, b in zip(got._fields, got, expected):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b.detach(), rtol=2e-5, atol=2e-5 * scale if name != "kl" else 1e-3,
                                   msg=lambda m, name=name: f"{name}: {m}")
    fused = torch.autograd.grad(sum(c * o for c, o in zip(UPSTREAM, got)), [recon, mean, lv_z, logvar, p])
    plain = torch.autograd.grad(sum(c * o for c, o in zip(UPSTREAM, expected)), leaves64)
    for name, a, b in zip(("reconstructions", "mean", "posterior_logvar", "logvar", "perceptual"), fused, plain):
        assert a.dtype == (recon_dtype if name == "reconstructions" else torch.float32), name
        tol = dict(rtol=1e-2, atol=1e-2) if (name == "reconstructions" and recon_dtype != torch.float32) else dict(
            rtol=1e-5, atol=1e-5 * float(b.abs().max() + 1) if name in ("logvar", "posterior_logvar") else 1e-6)
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_nan_in_gives_nan_out(device):
    inputs, leaves = _leaves(device, "[B]", -0.3, None)
    recon = leaves["reconstructions"].detach().clone()
    recon.view(-1)[5] = float("nan")
    out = fusedvae.autoencoder_kl_loss(inputs, recon, leaves["posterior_mean"], leaves["posterior_logvar"],
                                       leaves["logvar"], perceptual=leaves["perceptual"])
    assert torch.isnan(out.loss) and torch.isnan(out.nll) and torch.isnan(out.weighted_nll)
    assert torch.isfinite(out.kl)


def test_no_host_sync(device):
    inputs, leaves = _leaves(device, "[B]", -0.3, 0.5, dtype=torch.float32)
    w = _weights("per-sample", device, torch.float32)
    synchronize(device)
    with no_host_sync(device):
        out = _call(fusedvae.autoencoder_kl_loss, inputs, leaves, w)
        sum(c * o for c, o in zip(UPSTREAM, out)).backward()
    synchronize(device)
    assert all(torch.isfinite(v.grad).all() for v in _differentiable(leaves).values())


def test_module_holds_a_learnable_logvar(device):
    inputs, leaves = _leaves(device, "[B]", None, None, dtype=torch.float32)
    loss_fn = fusedvae.AutoencoderKLLoss(kl_weight=1e-3, logvar_init=0.5).to(device)
    assert isinstance(loss_fn.logvar, torch.nn.Parameter) and loss_fn.logvar.shape == ()
    assert loss_fn.logvar.item() == 0.5
    assert [n for n, _ in loss_fn.named_parameters()] == ["logvar"]
    assert "logvar" in loss_fn.state_dict()
    assert "kl_weight=0.001" in repr(loss_fn)
    args = (inputs, leaves["reconstructions"], leaves["posterior_mean"], leaves["posterior_logvar"])
    out = loss_fn(*args, perceptual=leaves["perceptual"])
    expected = fusedvae.autoencoder_kl_loss(*args, loss_fn.logvar, kl_weight=1e-3, perceptual=leaves["perceptual"])
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out.loss.backward()
    assert loss_fn.logvar.grad is not None and loss_fn.logvar.grad != 0
    # a gradient step moves e^logvar towards the batch's mean |x - x̂| + p
    target = (torch.abs(inputs - leaves["reconstructions"]).mean(dim=(1, 2, 3)) + leaves["perceptual"]).mean().item()
    assert (float(loss_fn.logvar.grad) > 0) == (math.exp(0.5) > target)


def test_module_tensor_kl_weight_is_a_buffer():
    kl_weight = torch.tensor(1e-6)
    loss_fn = fusedvae.AutoencoderKLLoss(kl_weight=kl_weight)
    assert "kl_weight" in dict(loss_fn.named_buffers())
    loss_fn.to(F64)
    assert loss_fn.kl_weight.dtype == F64 and loss_fn.logvar.dtype == F64
    inputs, leaves = _leaves("cpu", None, None, None)
    args = (inputs, leaves["reconstructions"], leaves["posterior_mean"], leaves["posterior_logvar"])
    before = loss_fn(*args).loss
    loss_fn.kl_weight.fill_(1.0)
    after = loss_fn(*args)
    torch.testing.assert_close(after.loss, after.weighted_nll + after.kl, rtol=1e-12, atol=0)
    assert after.loss.item() != before.item()


def test_module_rejects_a_bad_logvar_init():
    with pytest.raises(ValueError, match="logvar_init must be a finite number"):
        fusedvae.AutoencoderKLLoss(logvar_init=float("nan"))


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiles_without_graph_breaks():
    inputs, leaves = _leaves("cpu", "[B,1,1,1]", -0.3, None, dtype=torch.float32)
    w = _weights("per-channel", "cpu", torch.float32)
    compiled = torch.compile(fusedvae.autoencoder_kl_loss, fullgraph=True)
    args = (inputs, leaves["reconstructions"], leaves["posterior_mean"], leaves["posterior_logvar"], leaves["logvar"])
    kw = dict(perceptual=leaves["perceptual"], weights=w)
    got = compiled(*args, **kw)
    expected = fusedvae.autoencoder_kl_loss(*args, **kw)
    wrt = list(_differentiable(leaves).values())[:4] + [leaves["perceptual"]]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    ga = torch.autograd.grad(sum(c * o for c, o in zip(UPSTREAM, got)), wrt)
    gb = torch.autograd.grad(sum(c * o for c, o in zip(UPSTREAM, expected)), wrt)
    for a, b in zip(ga, gb):  # float32: Inductor orders the [B]-vector sums its own way
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)


# ------------------------------------------------------- diffusers.AutoencoderKL --


def _small_autoencoder_kl(diffusers):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16,
    )


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_on_diffusers_autoencoder_kl_outputs(weighted):
    diffusers = pytest.importorskip("diffusers", reason="the examples extra: pip install -e '.[examples]'")
    vae = _small_autoencoder_kl(diffusers)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    perceptual_net = torch.nn.Conv2d(3, 1, 3)  # stands in for LPIPS: a differentiable per-sample term
    weights = torch.tensor([0.5, 2.0]).reshape(2, 1, 1, 1) if weighted else None
    logvar = torch.nn.Parameter(torch.tensor(0.2))
    params = [logvar, *vae.parameters(), *perceptual_net.parameters()]

    def step(loss_fn):
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=torch.Generator().manual_seed(2))).sample
        p = 0.5 * perceptual_net(recon - images).abs().mean(dim=(1, 2, 3))
        out = loss_fn(posterior, recon, p)
        grads = torch.autograd.grad(sum(c * o for c, o in zip(UPSTREAM, out)), params)
        return [o.detach() for o in out], grads

    def fused(posterior, recon, p):
        return fusedvae.autoencoder_kl_loss(images, recon, posterior.mean, posterior.logvar, logvar,
                                            kl_weight=1e-3, perceptual=p, weights=weights)

    def plain(posterior, recon, p):
        # as latent diffusion writes it, with diffusers' own posterior.kl()
        rec_loss = torch.abs(images - recon) + p.reshape(-1, 1, 1, 1)
        nll_loss = rec_loss / torch.exp(logvar) + logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posterior.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        return weighted_nll_loss + 1e-3 * kl_loss, nll_loss, weighted_nll_loss, kl_loss

    got, got_grads = step(fused)
    expected, expected_grads = step(plain)
    scale = float(expected[1].abs() + 1)
    for name, a, b in zip(fusedvae.AutoencoderKLLossOutput._fields, got, expected):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * scale, msg=lambda m, name=name: f"{name}: {m}")
    largest = max(float(b.abs().max()) for b in expected_grads)
    for a, b in zip(got_grads, expected_grads):
        # float32 through the network's backward; some gradients (biases feeding a
        # GroupNorm) are zero up to cancellation, hence an absolute part on the
        # scale of the largest gradient
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * largest)


def test_example_trains_a_few_steps(tmp_path):
    pytest.importorskip("diffusers", reason="the examples extra: pip install -e '.[examples]'")
    out = tmp_path / "autoencoder_kl"
    proc = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "examples", "train_autoencoder_kl.py"),
         "--steps", "3", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    png = out / "reconstructions.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "step 3/3" in proc.stdout

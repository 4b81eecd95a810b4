"""CUDA kernels against the CPU kernels and the reference (needs a CUDA device)."""
import itertools
import math

import pytest
import torch

import fusedvae
from fusedvae import reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and fusedvae.has_cuda_kernels()),
    reason="needs a CUDA device and a build with CUDA kernels",
)

LIKELIHOODS = [
    ("bernoulli", True, None),
    ("bernoulli", False, None),
    ("cbernoulli", True, None),
    ("cbernoulli", False, None),
    ("gaussian", True, 0.3),
    ("gaussian", True, "optimal"),
    ("gaussian", True, "full"),
]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def _inputs(likelihood, logits, log_scale, dtype, device, shape=(4, 3, 17, 19), latent=(4, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    if not logits:
        x = torch.rand(shape, generator=g, dtype=torch.float64) * 0.98 + 0.01
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    mu = torch.randn(latent, generator=g, dtype=torch.float64)
    lv = torch.randn(latent, generator=g, dtype=torch.float64)
    scale = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3 if log_scale == "full" else log_scale
    move = lambda v: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return move(x), move(t), move(mu), move(lv), move(scale)


def _loss_and_grads(fn, x, t, mu, lv, scale, **kw):
    x = x.detach().requires_grad_()
    mu = mu.detach().requires_grad_()
    lv = lv.detach().requires_grad_()
    out = fn(x, t, mu, lv, log_scale=scale, **kw)
    weights = torch.linspace(0.5, 2.0, x.shape[0], device=x.device, dtype=out.rec.dtype)
    total = out.loss.sum() * 1.7 + (weights * out.rec).sum() - (weights * out.kl).sum()
    grads = torch.autograd.grad(total, (x, mu, lv))
    return [v.detach() for v in out] + [gr for gr in grads]


@pytest.mark.parametrize("likelihood,logits,log_scale", LIKELIHOODS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_matches_cpu_and_reference_float64(likelihood, logits, log_scale, reduction):
    kw = dict(likelihood=likelihood, logits=logits, reduction=reduction, beta=0.7, free_bits=0.05)
    cuda = _inputs(likelihood, logits, log_scale, torch.float64, "cuda")
    cpu = _inputs(likelihood, logits, log_scale, torch.float64, "cpu")
    got = _loss_and_grads(fusedvae.vae_loss, *cuda, **kw)
    want_cpu = _loss_and_grads(fusedvae.vae_loss, *cpu, **kw)
    want_ref = _loss_and_grads(reference.vae_loss, *cpu, **kw)
    for a, b, c in zip(got, want_cpu, want_ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.cpu(), c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("likelihood,logits,log_scale", LIKELIHOODS)
@pytest.mark.parametrize("uint8_target", [False, True])
def test_cuda_dtypes_match_cpu(dtype, tol, likelihood, logits, log_scale, uint8_target):
    x, t, mu, lv, scale = _inputs(likelihood, logits, log_scale, dtype, "cpu", shape=(3, 3, 32, 33))
    if uint8_target:
        t = (t.float() * 255).round().to(torch.uint8)
    kw = dict(likelihood=likelihood, logits=logits)
    on_cpu = _loss_and_grads(fusedvae.vae_loss, x, t, mu, lv, scale, **kw)
    on_gpu = _loss_and_grads(
        fusedvae.vae_loss, x.cuda(), t.cuda(), mu.cuda(), lv.cuda(),
        scale.cuda() if isinstance(scale, torch.Tensor) else scale, **kw,
    )
    for a, b in zip(on_gpu, on_cpu):
        # Both accumulate in float32 but in different orders; half-precision
        # gradients round to the same grid but may land one ulp apart.
        torch.testing.assert_close(a.cpu().float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("likelihood,logits,log_scale", LIKELIHOODS)
def test_cuda_gradcheck(likelihood, logits, log_scale):
    x, t, mu, lv, scale = _inputs(likelihood, logits, log_scale, torch.float64, "cuda", shape=(2, 2, 3, 5))
    x.requires_grad_()
    mu.requires_grad_()
    lv.requires_grad_()

    def fn(x, mu, lv):
        out = fusedvae.vae_loss(x, t, mu, lv, likelihood=likelihood, logits=logits,
                                log_scale=scale, reduction="none")
        return out.loss, out.rec, out.kl

    assert torch.autograd.gradcheck(fn, (x, mu, lv))


def test_cuda_layouts_match_contiguous():
    x, t, mu, lv, _ = _inputs("bernoulli", True, None, torch.float32, "cuda", shape=(4, 3, 16, 16))
    want = _loss_and_grads(fusedvae.vae_loss, x, t, mu, lv, None)
    cl = dict(memory_format=torch.channels_last)
    for xx, tt in [(x.contiguous(**cl), t.contiguous(**cl)), (x.contiguous(**cl), t),
                   (x.transpose(2, 3).contiguous().transpose(2, 3), t)]:
        got = _loss_and_grads(fusedvae.vae_loss, xx, tt, mu, lv, None)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # A sliced batch runs on a contiguous copy.
    big_x = torch.cat([x, x]).contiguous()
    big_t = torch.cat([t, t]).contiguous()
    got = _loss_and_grads(fusedvae.vae_loss, big_x[::2], big_t[::2], mu, lv, None)
    assert got[3].shape == x.shape


def test_cuda_unaligned_and_odd_sizes_use_the_scalar_path():
    # A storage offset of one element breaks 16-byte alignment; 7*11 per channel
    # leaves a tail in every sample.
    x, t, mu, lv, _ = _inputs("cbernoulli", True, None, torch.float32, "cuda", shape=(3, 3, 7, 11))
    shifted_x = torch.empty(x.numel() + 1, device="cuda")[1:].view_as(x).copy_(x)
    want = _loss_and_grads(fusedvae.vae_loss, *(v.cpu() for v in (x, t, mu, lv)), None,
                           likelihood="cbernoulli")
    got = _loss_and_grads(fusedvae.vae_loss, shifted_x, t, mu, lv, None, likelihood="cbernoulli")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


def test_cuda_graph_capture_replays_the_same_numbers():
    x, t, mu, lv, _ = _inputs("bernoulli", True, None, torch.float32, "cuda", shape=(8, 3, 32, 32))
    x.requires_grad_()
    mu.requires_grad_()
    lv.requires_grad_()
    beta = torch.tensor(0.5, device="cuda")

    def step():
        out = fusedvae.vae_loss(x, t, mu, lv, beta=beta, free_bits=0.01)
        return (out.loss,) + torch.autograd.grad(out.loss, (x, mu, lv))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for new_beta in (0.5, 2.0):
        beta.fill_(new_beta)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for a, b in zip(captured, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_bitwise_deterministic():
    x, t, mu, lv, _ = _inputs("cbernoulli", True, None, torch.float32, "cuda", shape=(16, 3, 128, 128))
    runs = [_loss_and_grads(fusedvae.vae_loss, x, t, mu, lv, None, likelihood="cbernoulli") for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_cuda_opcheck():
    x, t, mu, lv, scale = _inputs("gaussian", True, "full", torch.float32, "cuda")
    ops = torch.ops.fusedvae
    x.requires_grad_()
    for likelihood, logits in itertools.product(["bernoulli", "cbernoulli"], [True, False]):
        xx = torch.sigmoid(x.detach()).requires_grad_() if not logits else x
        torch.library.opcheck(ops.recon_loss, (xx, t, None, likelihood, logits))
    torch.library.opcheck(ops.recon_loss, (x, t, scale.requires_grad_(), "gaussian", True))
    torch.library.opcheck(ops.recon_loss, (x, t, None, "squared_error", True))
    torch.library.opcheck(ops.gaussian_kl, (mu.requires_grad_(), lv.requires_grad_()))
    torch.library.opcheck(ops.gaussian_kl_per_dim, (mu, lv))
    torch.library.opcheck(ops.cb_log_normalizer, (x,))


@pytest.mark.slow
def test_cuda_more_than_2_31_elements_bf16_uint8():
    # 5 samples of 2^29 elements: offsets past 2^31 in the last samples.
    # Logits 0 make every element's loss log 2 and its gradient 0.5 - t/255.
    batch, n = 5, 1 << 29
    x = torch.zeros(batch, n, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    t = (torch.arange(batch * n, device="cuda") % 251).to(torch.uint8).view(batch, n)
    mu = torch.zeros(batch, 4, device="cuda")
    out = fusedvae.vae_loss(x, t, mu, mu, reduction="sum")
    torch.testing.assert_close(out.rec, torch.full((batch,), n * math.log(2), device="cuda"), rtol=1e-5, atol=0)
    out.loss.backward()
    tail = slice(n - 1000, n)
    expected = (0.5 - t[-1, tail].float() / 255).to(torch.bfloat16)
    assert torch.equal(x.grad[-1, tail], expected)
    del x, t

"""``fusedvae.discretized_mix_logistic_nll``: the fused discretized mixture of
logistics against ``fusedvae.reference.discretized_mix_logistic_nll`` (which
tests/test_dmol.py checks against exact bin probabilities): float64 values and
gradients with per-sample upstream gradients, gradcheck, the edge bins, extreme
parameters, every dtype and layout, NaN, determinism, opcheck and compile."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

import fusedvae
from fusedvae import reference
from helpers import cuda_kernel_switches, no_host_sync, synchronize
from test_dmol import _random_case

F64 = torch.float64
ops = torch.ops.fusedvae


def _case(channels, k, device, batch=3, height=5, width=6, seed=0, edges=True, **kw):
    params, target = _random_case(channels, k, batch=batch, height=height, width=width, seed=seed, **kw)
    if edges:  # the first and last bins
        target[0, :, 0, 0] = -1.0
        target[0, :, 0, 1] = 1.0
        target[-1, 0, 1, 1] = 1.0
    return params.to(device), target.to(device)


@pytest.fixture(params=[dict(mixture_fast_math=False), {}, dict(mixture_fast_scale=True)],
                ids=["logf-expf", "fast_math", "fast_scale"])
def cuda_math(request):
    """The CUDA kernels' logarithm and exponential for one test: logf and expf,
    then the hardware's approximate ones, the default
    (fusedvae._C._set_cuda_mixture_fast_math), then with the opt-in approximate
    inverse scales and bin widths as well (_set_cuda_mixture_fast_scale)."""
    with cuda_kernel_switches(**request.param):
        yield


def _nll_and_grad(fn, params, target, upstream, **kw):
    leaf = params.detach().clone().requires_grad_()
    nll = fn(leaf, target, **kw)
    (grad,) = torch.autograd.grad((nll * upstream).sum(), leaf)
    return nll, grad


def _extreme_case(device):
    """Huge logits, log-scales at the clamp with means far from most pixels (tiny
    bins), saturated coupling coefficients: float64 parameters and targets."""
    params, target = _case(3, 4, device)
    params[0, :4] = torch.tensor([1e4, -1e4, 30.0, -30.0], dtype=F64, device=device).view(4, 1, 1)  # huge logits
    rest = params[:, 4:].view(params.shape[0], 3, 3, 4, *params.shape[2:])
    rest[1, :, 1] = -7.0  # log-scales at the clamp: sharp components
    rest[1, :, 0, 0] = 0.9  # their means far from most pixels: tiny bins
    rest[2, :, 2] = 40.0  # saturated coupling coefficients
    return params, target


def _assert_within_bars(got, got_grad, exp, exp_grad, dtype, nll_rtol=2e-5, grad_rtol=1e-4):
    """The issue's bars against float64: per-sample NLL nll_rtol relative, the
    gradient grad_rtol relative to its largest element, beyond its own rounding
    to dtype on the way out (half an ulp)."""
    torch.testing.assert_close(got.double(), exp, rtol=nll_rtol, atol=0)
    ulp = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    scale = float(exp_grad.abs().max())
    err = (got_grad.double() - exp_grad).abs() - ulp * exp_grad.abs()
    assert float(err.max()) <= grad_rtol * scale, float(err.max()) / scale


def _upstream(batch, device, dtype=F64):
    return torch.linspace(-1.5, 2.0, batch, dtype=dtype, device=device)  # per sample, not 1


@pytest.mark.parametrize("channels,k", [(3, 1), (3, 4), (3, 10), (3, 20), (1, 1), (1, 5)])
@pytest.mark.parametrize("target_kind", ["float", "uint8"])
def test_matches_reference_float64(device, channels, k, target_kind):
    params, target = _case(channels, k, device)
    if target_kind == "uint8":
        target = ((target + 1) * 127.5).round().to(torch.uint8)
    upstream = _upstream(params.shape[0], device)
    got, got_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, params, target, upstream)
    exp, exp_grad = _nll_and_grad(reference.discretized_mix_logistic_nll, params, target, upstream)
    assert got.shape == (params.shape[0],) and got.dtype == F64
    torch.testing.assert_close(got, exp, rtol=1e-11, atol=0)
    torch.testing.assert_close(got_grad, exp_grad, rtol=1e-9, atol=1e-11 * float(exp_grad.abs().max()))


def test_large_image_matches_reference_float64(device):
    # On CUDA a pixel takes 4 threads in the small cases above and 1 here (90000
    # pixels: 4 or 2 threads each would exceed what a GPU of up to 175
    # multiprocessors holds at once), so both ways are checked.
    params, target = _case(3, 10, device, batch=1, height=300, width=300, edges=False)
    upstream = torch.full((1,), 0.7, dtype=F64, device=device)
    got, got_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, params, target, upstream)
    exp, exp_grad = _nll_and_grad(reference.discretized_mix_logistic_nll, params, target, upstream)
    torch.testing.assert_close(got, exp, rtol=1e-11, atol=0)
    torch.testing.assert_close(got_grad, exp_grad, rtol=1e-9, atol=1e-11 * float(exp_grad.abs().max()))


@pytest.mark.parametrize("bits,log_scale_min", [(5, -7.0), (8, -3.0), (16, -9.0)])
def test_bits_and_clamp_match_reference(device, bits, log_scale_min):
    params, target = _case(3, 3, device)
    params[:, 3 + 3:3 + 6] = -20.0  # channel 0's log-scales below any clamp
    upstream = _upstream(params.shape[0], device)
    kw = dict(bits=bits, log_scale_min=log_scale_min)
    got, got_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, params, target, upstream, **kw)
    exp, exp_grad = _nll_and_grad(reference.discretized_mix_logistic_nll, params, target, upstream, **kw)
    torch.testing.assert_close(got, exp, rtol=1e-11, atol=0)
    torch.testing.assert_close(got_grad, exp_grad, rtol=1e-9, atol=1e-11 * float(exp_grad.abs().max()))
    assert (got_grad[:, 6:9] == 0).all()  # torch.clamp's zero gradient below the clamp


def test_extreme_parameters_match_reference(device):
    params, target = _extreme_case(device)
    upstream = _upstream(params.shape[0], device)
    got, got_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, params, target, upstream)
    exp, exp_grad = _nll_and_grad(reference.discretized_mix_logistic_nll, params, target, upstream)
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, exp, rtol=1e-11, atol=0)
    torch.testing.assert_close(got_grad, exp_grad, rtol=1e-8, atol=1e-10 * float(exp_grad.abs().max()))


@pytest.mark.usefixtures("cuda_math")
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_bins_around_the_mean_match_reference(device, dtype):
    # A component's mean inside the pixel's bin (u > 0 > l: the interior's
    # σ(u) - σ(l) from both sides of 0) beside bins wholly on one side, in the
    # same vectors: every third pixel has two components centred on it. The
    # mixture's bars in float32.
    params, target = _case(3, 4, device, height=6, width=8)
    rest = params[:, 4:].view(params.shape[0], 3, 3, 4, *params.shape[2:])
    rest[:, :, 2] = 0.0  # no coupling: the means are the raw means
    centred = torch.arange(48, device=device).view(6, 8) % 3 == 0
    for component in (0, 2):
        rest[:, :, 0, component] = torch.where(centred, target, rest[:, :, 0, component])
    upstream = _upstream(params.shape[0], device)
    got, got_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, params.to(dtype), target.to(dtype),
                                  upstream.to(dtype))
    exp, exp_grad = _nll_and_grad(reference.discretized_mix_logistic_nll, params, target, upstream)
    rtol, grad_rtol = (1e-11, 1e-9) if dtype == F64 else (2e-5, 1e-4)
    torch.testing.assert_close(got.double(), exp, rtol=rtol, atol=0)
    torch.testing.assert_close(got_grad.double(), exp_grad, rtol=0, atol=grad_rtol * float(exp_grad.abs().max()))


@pytest.mark.usefixtures("cuda_math")
def test_extreme_parameters_in_float32(device):
    # test_extreme_parameters_match_reference's cases in float32 (one pass) and
    # bfloat16 (two passes: the backward kernel), within the mixture's bars.
    params, target = _extreme_case(device)
    upstream = _upstream(params.shape[0], device)
    for dtype in (torch.float32, torch.bfloat16):
        narrow = params.to(dtype)
        got, got_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, narrow, target.float(),
                                      upstream.float())
        exp, exp_grad = _nll_and_grad(reference.discretized_mix_logistic_nll, narrow.double(), target, upstream)
        assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
        _assert_within_bars(got, got_grad, exp, exp_grad, dtype)



@pytest.mark.usefixtures("cuda_math")
@pytest.mark.parametrize("log_scale", [85.0, 88.0])
def test_bins_below_the_smallest_normal_float_keep_a_finite_log(device, log_scale):
    # With a raw log-scale above about 82 a bin's probability (about its width
    # times e^-s / 4) is a subnormal float32: its log must stay finite and
    # right, under logf and under the hardware's logarithm alike (which is given
    # such an argument scaled into the normal range). At 88, e^-s is itself
    # subnormal.
    params, target = _case(3, 4, device)
    rest = params[:, 4:].view(params.shape[0], 3, 3, 4, *params.shape[2:])
    rest[:, :, 1] = log_scale
    upstream = _upstream(params.shape[0], device)
    got, got_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, params.float(), target.float(),
                                  upstream.float())
    exp, exp_grad = _nll_and_grad(reference.discretized_mix_logistic_nll, params, target, upstream)
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    _assert_within_bars(got, got_grad, exp, exp_grad, torch.float32)

def test_gradcheck(device):
    params, target = _case(3, 2, device, batch=2, height=2, width=3)
    upstream = torch.tensor([1.7, -0.6], dtype=F64, device=device)
    params.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: fusedvae.discretized_mix_logistic_nll(p, target) * upstream, (params,)
    )


@pytest.mark.usefixtures("cuda_math")
@pytest.mark.parametrize("dtype,nll_rtol,grad_rtol", [
    (torch.float32, 2e-5, 1e-4),
    (torch.bfloat16, 2e-5, 1e-4),
    (torch.float16, 2e-5, 1e-4),
])
def test_narrow_dtypes_against_float64(device, dtype, nll_rtol, grad_rtol):
    # The bars: per-sample NLL 2e-5 relative, gradient 1e-4 relative to its
    # largest element, against the float64 reference on the same (rounded) values.
    params, target = _case(3, 10, device, batch=4, height=8, width=8)
    narrow = params.to(dtype)
    upstream = _upstream(params.shape[0], device, torch.float32)
    got, got_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, narrow, target.float(), upstream)
    exp, exp_grad = _nll_and_grad(reference.discretized_mix_logistic_nll, narrow.double(), target,
                                  upstream.double())
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    _assert_within_bars(got, got_grad, exp, exp_grad, dtype, nll_rtol, grad_rtol)


def test_channels_last_params_are_read_in_place(device):
    params, target = _case(3, 3, device)
    upstream = _upstream(params.shape[0], device)
    decoder_output = params.permute(0, 2, 3, 1).contiguous()  # VDVAE-style [B, H, W, 10K]
    channels_last = decoder_output.permute(0, 3, 1, 2)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    got, got_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, channels_last, target, upstream)
    exp, exp_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, params, target, upstream)
    torch.testing.assert_close(got, exp, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, exp_grad, rtol=0, atol=0)
    # the gradient comes back in the parameters' layout: no copy either way
    assert got_grad.stride() == channels_last.stride()


def test_other_layouts(device):
    params, target = _case(3, 2, device, height=6, width=8)
    upstream = _upstream(params.shape[0], device)
    exp, exp_grad = _nll_and_grad(reference.discretized_mix_logistic_nll, params, target, upstream)
    wide = torch.zeros(params.shape[:3] + (16,), dtype=F64, device=device)
    wide[..., ::2] = params
    strided = wide[..., ::2]  # a pixel index that does not merge: copied first
    target_t = target.transpose(2, 3).contiguous().transpose(2, 3)  # a transposed image
    got, got_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, strided, target_t, upstream)
    torch.testing.assert_close(got, exp, rtol=1e-11, atol=0)
    torch.testing.assert_close(got_grad, exp_grad, rtol=1e-9, atol=1e-12)


def test_every_pixel_value_is_read_as_its_quotient(device):
    # A uint8 target is read as v / 127.5 - 1, correctly rounded: the loss and
    # the gradient equal those of that float target bit for bit, for all 256
    # values in every channel (the kernels form 2·(v / 255) - 1 without a division).
    g = torch.Generator().manual_seed(5)
    pixels = torch.stack([torch.randperm(256, generator=g) for _ in range(3)]).view(1, 3, 16, 16)
    params = torch.randn(1, 30, 16, 16, generator=g).to(device)
    pixels = pixels.to(torch.uint8).to(device)
    # On the CPU, whose division rounds correctly (CUDA's division by a scalar
    # multiplies by its reciprocal).
    as_float = (pixels.cpu().float() / 127.5 - 1).to(device)
    got = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, params, pixels, 1.0)
    expected = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, params, as_float, 1.0)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_nan_in_gives_nan_out_in_that_sample(device):
    params, target = _case(3, 2, device)
    params[1, 0, 1, 1] = float("nan")
    got = fusedvae.discretized_mix_logistic_nll(params, target)
    assert torch.isfinite(got[0]) and torch.isnan(got[1]) and torch.isfinite(got[2])


def test_deterministic_and_thread_count_independent(restore_threads):
    params, target = _case(3, 10, "cpu", batch=2, height=40, width=40)
    params = params.float()
    target = target.float()
    torch.set_num_threads(1)
    one = fusedvae.discretized_mix_logistic_nll(params, target)
    torch.set_num_threads(2)
    two = fusedvae.discretized_mix_logistic_nll(params, target)
    again = fusedvae.discretized_mix_logistic_nll(params, target)
    assert torch.equal(one, two) and torch.equal(two, again)


def test_no_host_sync(device):
    params, target = _case(3, 4, device)
    params = params.float().requires_grad_()
    synchronize(device)
    with no_host_sync(device):
        nll = fusedvae.discretized_mix_logistic_nll(params, target.float())
        nll.sum().backward()
    synchronize(device)
    assert torch.isfinite(params.grad).all()


def test_no_grad_saves_nothing(device):
    params, target = _case(3, 2, device)
    params.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            fusedvae.discretized_mix_logistic_nll(params, target)
        assert saved == []
        fusedvae.discretized_mix_logistic_nll(params, target)
    # params and target, and on CUDA each pixel's NLL [B, H, W]; nothing else
    # (on the CPU the node also holds the gradient its forward computed:
    # test_one_pass_forward_gives_the_two_pass_results)
    assert [tuple(t.shape) for t in saved[2:]] == ([] if device == "cpu" else [(3, 5, 6)])
    assert saved[0] is params and saved[1] is target


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_one_pass_forward_gives_the_two_pass_results(device, dtype):
    """On the CPU float32 and float64 params get their gradient computed in the
    forward's pass (dmol_nll_and_grad) and scaled by the first backward; on CUDA
    the backward takes the forward's per-pixel NLL (dmol_nll_and_pixel_nll). The
    same NLL and gradient as the separate ops either way, in either layout."""
    params, target = _case(3, 4, device)
    upstream = _upstream(params.shape[0], device, dtype)
    for p in (params.to(dtype), params.to(dtype).contiguous(memory_format=torch.channels_last)):
        p = p.detach().requires_grad_()
        nll = fusedvae.discretized_mix_logistic_nll(p, target)
        (grad,) = torch.autograd.grad(nll, p, upstream)
        with torch.no_grad():
            nll_alone = fusedvae.discretized_mix_logistic_nll(p, target)
        grad_alone = ops.dmol_nll_backward(upstream, p.detach(), target, 8, -7.0)
        both = ops.dmol_nll_and_grad(p.detach(), target, 8, -7.0)
        torch.testing.assert_close(nll, nll_alone, rtol=0, atol=0)
        torch.testing.assert_close(both[0], nll_alone, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad_alone, rtol=0, atol=0)
        ones = torch.ones_like(upstream)
        torch.testing.assert_close(both[1], ops.dmol_nll_backward(ones, p.detach(), target, 8, -7.0),
                                   rtol=0, atol=0)


def test_backward_of_the_sum_returns_the_forwards_gradient_unscaled(device):
    """On the CPU nll.sum().backward() (upstream 1 everywhere) takes the forward's
    gradient as it is, with no pass over it, where the upstream values are read
    in place; nll.mean() scales it in place. On CUDA the backward writes the
    scaled gradient itself: no pass over it either way."""
    params, target = _case(3, 4, device)
    p = params.float().requires_grad_()
    expected = ops.dmol_nll_backward(torch.ones(3, device=device), p.detach(), target, 8, -7.0)
    for reduce, scale in ((torch.sum, 1.0), (torch.mean, 1 / 3)):
        nll = fusedvae.discretized_mix_logistic_nll(p, target)
        with profile() as prof:
            (grad,) = torch.autograd.grad(reduce(nll), p)
        scaled = "aten::mul_" in {e.name for e in prof.events()}
        assert scaled == (device == "cpu" and reduce is torch.mean)
        torch.testing.assert_close(grad, expected * scale, rtol=2e-7, atol=0)
        if reduce is torch.sum:
            torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def _pixels_as_samples(t):
    """[B, P, H, W] -> [B·H·W, P, 1, 1]: each pixel a sample of its own."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1], 1, 1)


@pytest.mark.parametrize("channels,k", [(3, 4), (3, 20), (1, 3)])
def test_pixel_nll_is_each_pixels_nll(device, channels, k):
    """dmol_nll_and_pixel_nll: dmol_nll's NLL (the same bits) and each pixel's,
    against the reference on each pixel alone, in float64."""
    params, target = _case(channels, k, device)
    nll, pixel_nll = ops.dmol_nll_and_pixel_nll(params, target, 8, -7.0)
    assert pixel_nll.shape == (3, 5, 6) and pixel_nll.dtype == F64
    torch.testing.assert_close(nll, ops.dmol_nll(params, target, 8, -7.0), rtol=0, atol=0)
    expected = reference.discretized_mix_logistic_nll(_pixels_as_samples(params), _pixels_as_samples(target))
    torch.testing.assert_close(pixel_nll, expected.view(3, 5, 6), rtol=1e-12, atol=0)
    torch.testing.assert_close(pixel_nll.sum((1, 2)), nll, rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [4, 20])
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16, torch.bfloat16])
def test_backward_given_the_pixel_nll_gives_the_same_bits(device, dtype, k):
    """dmol_nll_backward with the forward's per-pixel NLL skips the pass that
    forms it (on CUDA always, on the CPU above 16 components) and writes the
    same bits as without, in either layout."""
    params, target = _case(3, k, device)
    upstream = _upstream(params.shape[0], device, dtype)
    for p in (params.to(dtype), params.to(dtype).contiguous(memory_format=torch.channels_last)):
        nll, pixel_nll = ops.dmol_nll_and_pixel_nll(p, target, 8, -7.0)
        torch.testing.assert_close(nll, ops.dmol_nll(p, target, 8, -7.0), rtol=0, atol=0)
        given = ops.dmol_nll_backward(upstream, p, target, 8, -7.0, pixel_nll)
        torch.testing.assert_close(given, ops.dmol_nll_backward(upstream, p, target, 8, -7.0), rtol=0, atol=0)
        assert given.stride() == p.stride()
        # The values are read where the pass is skipped: another likelihood,
        # another gradient.
        other = ops.dmol_nll_backward(upstream, p, target, 8, -7.0, pixel_nll + 1)
        assert torch.equal(other, given) == (device == "cpu" and k <= 16)


def _fusedvae_ops_run(fn):
    with profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("fusedvae::") or e.name == "aten::mul_"}


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_autograd_runs_the_devices_passes(device, dtype):
    """What a training step runs: on the CPU, float32 and float64 params get
    their gradient in the forward's one pass and the backward scales it (16-bit:
    a forward, then a backward of its own); on CUDA the forward keeps each
    pixel's NLL and the backward, given it, writes the scaled gradient."""
    params, target = _case(3, 4, device)
    p = params.to(dtype).requires_grad_()
    nll = None

    def forward():
        nonlocal nll
        nll = fusedvae.discretized_mix_logistic_nll(p, target)

    one_pass = device == "cpu" and dtype in (torch.float32, F64)
    expected_forward = {"cpu": "fusedvae::dmol_nll_and_grad" if one_pass else "fusedvae::dmol_nll",
                        "cuda": "fusedvae::dmol_nll_and_pixel_nll"}[torch.device(device).type]
    assert _fusedvae_ops_run(forward) == {"fusedvae::dmol_nll", expected_forward}
    upstream = _upstream(params.shape[0], device, nll.dtype)
    backward = _fusedvae_ops_run(lambda: torch.autograd.grad(nll, p, upstream))
    assert backward == ({"aten::mul_"} if one_pass else {"fusedvae::dmol_nll_backward"})


def test_retained_graph_gives_the_gradient_every_time(device):
    """The gradient computed in the forward is used once; a second backward
    through the retained graph recomputes it (and may see another upstream)."""
    params, target = _case(3, 4, device)
    params = params.float().requires_grad_()
    nll = fusedvae.discretized_mix_logistic_nll(params, target)
    first_up = _upstream(params.shape[0], device, torch.float32)
    (first,) = torch.autograd.grad(nll, params, first_up, retain_graph=True)
    (second,) = torch.autograd.grad(nll, params, 2 * first_up, retain_graph=True)
    (third,) = torch.autograd.grad(nll, params, first_up)
    torch.testing.assert_close(second, 2 * first, rtol=1e-6, atol=0)
    torch.testing.assert_close(third, first, rtol=0, atol=0)


def test_second_order_raises():
    params, target = _case(3, 2, "cpu")
    params.requires_grad_()
    (g,) = torch.autograd.grad(fusedvae.discretized_mix_logistic_nll(params, target).sum(), params,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="dmol_nll_backward"):
        g.sum().backward()


def test_opcheck(device):
    params, target = _case(3, 2, device, batch=2, height=3, width=4)
    params = params.float().requires_grad_()
    target = target.float()
    torch.library.opcheck(ops.dmol_nll.default, (params, target, 8, -7.0))
    grad = torch.randn(2, device=device)
    torch.library.opcheck(ops.dmol_nll_backward.default, (grad, params.detach(), target, 8, -7.0))
    torch.library.opcheck(ops.dmol_nll_and_grad.default, (params.detach(), target, 8, -7.0))
    torch.library.opcheck(ops.dmol_nll_and_pixel_nll.default, (params.detach(), target, 8, -7.0))
    _, pixel_nll = ops.dmol_nll_and_pixel_nll(params.detach(), target, 8, -7.0)
    torch.library.opcheck(ops.dmol_nll_backward.default, (grad, params.detach(), target, 8, -7.0, pixel_nll))


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_fullgraph():
    params, target = _case(3, 3, "cpu")
    params = params.float()
    target = target.float()
    upstream = _upstream(params.shape[0], "cpu", torch.float32)
    compiled = torch.compile(fusedvae.discretized_mix_logistic_nll, fullgraph=True)
    got, got_grad = _nll_and_grad(compiled, params, target, upstream)
    exp, exp_grad = _nll_and_grad(fusedvae.discretized_mix_logistic_nll, params, target, upstream)
    torch.testing.assert_close(got, exp, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, exp_grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(params=torch.zeros(2, 25, 3, 4)), ValueError, r"params must have shape \[B, 10K, H, W\]"),
        (dict(params=torch.zeros(2, 30, 3, 4, dtype=torch.long)), TypeError, "params must be a floating-point"),
        (dict(target=torch.zeros(2, 2, 3, 4)), ValueError, r"target must have shape \[B, 3, H, W\]"),
        (dict(target=torch.zeros(2, 3, 3, 4, dtype=torch.int32)), TypeError, "target must be a floating-point or uint8"),
        (dict(target=torch.zeros(2, 3, 3, 4, requires_grad=True)), ValueError, "target must not require grad"),
        (dict(bits=0), ValueError, r"bits must be an int in \[1, 16\]"),
        (dict(bits=8.0), ValueError, r"bits must be an int in \[1, 16\]"),
        (dict(log_scale_min=float("nan")), ValueError, "log_scale_min must be a finite number"),
        (dict(target=torch.zeros(2, 3, 3, 4, device="meta")), ValueError, "target must be on the device of params"),
    ],
)
@pytest.mark.parametrize("fn", [fusedvae.discretized_mix_logistic_nll, reference.discretized_mix_logistic_nll],
                         ids=["fused", "reference"])
def test_bad_arguments_name_the_argument(fn, change, exc, match):
    args = dict(params=torch.zeros(2, 30, 3, 4), target=torch.zeros(2, 3, 3, 4))
    args.update(change)
    params, target = args.pop("params"), args.pop("target")
    with pytest.raises(exc, match=match):
        fn(params, target, **args)

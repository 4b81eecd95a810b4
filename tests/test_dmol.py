"""The discretized mixture of logistics (PixelCNN++, Salimans et al. 2017):
``fusedvae.reference.discretized_mix_logistic_nll`` against exact bin
probabilities computed with mpmath, and against PixelCNN++'s published formula
where that formula is exact."""
from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

from fusedvae import reference

F64 = torch.float64


def _random_case(channels, k, batch=2, height=3, width=4, seed=0, scale_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    per_k = 10 if channels == 3 else 3
    params = torch.randn(batch, per_k * k, height, width, generator=g, dtype=F64)
    # log-scales around -2 (bins of a few scale units), means in [-1, 1]
    rest = params[:, k:].view(batch, channels, per_k // channels if channels == 3 else 2, k, height, width)
    rest[:, :, 1] = rest[:, :, 1] * 0.5 - 2.0 + scale_shift
    rest[:, :, 0] = torch.tanh(rest[:, :, 0])
    target = torch.randint(0, 256, (batch, channels, height, width), generator=g).to(F64) / 127.5 - 1
    return params, target


@mpmath.workdps(60)  # mpmath's precision is global: 60 digits here, not whatever a test left
def _exact_nll(params, target, bits=8, log_scale_min=-7.0):
    """The definition, pixel by pixel, in 60-digit arithmetic."""
    batch, channels, height, width = target.shape
    per_k = 10 if channels == 3 else 3
    k = params.shape[1] // per_k
    rows = 3 if channels == 3 else 2
    h = mpmath.mpf(1) / (2**bits - 1)
    sig = lambda v: 1 / (1 + mpmath.exp(-v))  # noqa: E731
    out = []
    for b in range(batch):
        total = mpmath.mpf(0)
        for i in range(height):
            for j in range(width):
                x = [mpmath.mpf(float(target[b, c, i, j])) for c in range(channels)]
                logits = [mpmath.mpf(float(params[b, m, i, j])) for m in range(k)]
                norm = mpmath.fsum(mpmath.exp(v) for v in logits)
                like = mpmath.mpf(0)
                for m in range(k):
                    def row(c, r):
                        return mpmath.mpf(float(params[b, k + (c * rows + r) * k + m, i, j]))
                    prob = mpmath.exp(logits[m]) / norm
                    for c in range(channels):
                        mean = row(c, 0)
                        if channels == 3 and c == 1:
                            mean += mpmath.tanh(row(0, 2)) * x[0]
                        if channels == 3 and c == 2:
                            mean += mpmath.tanh(row(1, 2)) * x[0] + mpmath.tanh(row(2, 2)) * x[1]
                        s = mpmath.exp(-max(row(c, 1), mpmath.mpf(log_scale_min)))
                        up, lo = sig(s * (x[c] - mean + h)), sig(s * (x[c] - mean - h))
                        prob *= up if x[c] < -0.999 else (1 - lo if x[c] > 0.999 else up - lo)
                    like += prob
                total -= mpmath.log(like)
        out.append(float(total))
    return torch.tensor(out, dtype=F64)


def _pixelcnn_nll(params, target, bits=8, log_scale_min=-7.0):
    """PixelCNN++'s published loss (its discretized_mix_logistic_loss), channels
    first: the difference of sigmoids in the interior, and the mid-bin density
    where that difference is below 1e-5."""
    batch, channels, height, width = target.shape
    per_k = 10 if channels == 3 else 3
    k = params.shape[1] // per_k
    rows = 3 if channels == 3 else 2
    logit_probs = params[:, :k]
    rest = params[:, k:].reshape(batch, channels, rows, k, height, width)
    means, log_scales = rest[:, :, 0], torch.clamp(rest[:, :, 1], min=log_scale_min)
    x = target.unsqueeze(2)
    if channels == 3:
        coeffs = torch.tanh(rest[:, :, 2])
        m2 = means[:, 1] + coeffs[:, 0] * x[:, 0]
        m3 = means[:, 2] + coeffs[:, 1] * x[:, 0] + coeffs[:, 2] * x[:, 1]
        means = torch.stack((means[:, 0], m2, m3), dim=1)
    half = 1.0 / (2**bits - 1)
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + half)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered - half)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    inner = torch.where(
        cdf_delta > 1e-5,
        torch.log(torch.clamp(cdf_delta, min=1e-12)),
        log_pdf_mid - math.log((2**bits - 1) / 2),
    )
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, inner))
    log_mix = log_probs.sum(dim=1) + torch.log_softmax(logit_probs, dim=1)
    return -torch.logsumexp(log_mix, dim=1).flatten(1).sum(dim=1)


@pytest.mark.parametrize("channels,k", [(3, 1), (3, 3), (1, 2)])
def test_matches_exact_bin_probabilities(channels, k):
    params, target = _random_case(channels, k)
    target[0, :, 0, 0] = -1.0  # the edge bins
    target[0, :, 0, 1] = 1.0
    got = reference.discretized_mix_logistic_nll(params, target)
    torch.testing.assert_close(got, _exact_nll(params, target), rtol=1e-12, atol=0)


def test_matches_pixelcnn_where_its_bins_are_exact():
    # Bins wide against the scales' spread: every interior probability is above
    # PixelCNN++'s 1e-5 switch, where its formula is the exact one.
    params, target = _random_case(3, 3, scale_shift=1.5)
    got = reference.discretized_mix_logistic_nll(params, target)
    torch.testing.assert_close(got, _pixelcnn_nll(params, target), rtol=1e-10, atol=0)


def test_tiny_bins_are_exact_where_the_difference_of_sigmoids_cancels():
    # A pixel far above a sharp component (σ(a) and σ(b) both within 1e-8 of 1)
    # and one far below it (both below 1e-30): the bin probability is exact, where
    # the difference of sigmoids loses digits and PixelCNN++'s mid-bin density
    # is off by a few percent. One component, so the bin is the whole likelihood.
    params = torch.zeros(1, 10, 1, 2, dtype=F64)
    rest = params[:, 1:].view(1, 3, 3, 1, 1, 2)
    rest[:, :, 1] = -4.0                                    # scale e^-4
    rest[:, :, 0, :, :, 0] = -0.7                           # means well below x = 0.2
    rest[:, :, 0, :, :, 1] = 0.9                            # means well above x = -0.4
    target = torch.tensor([0.2, -0.4], dtype=F64).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()
    exact = _exact_nll(params, target)
    got = reference.discretized_mix_logistic_nll(params, target)
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=0)
    # The test can fail: both shortcuts are off here. In float64 the two sigmoids
    # above the sharp component are both 1.0, so their difference is 0; the
    # mid-bin density misses the exact bin by about 1e-4 relative.
    s, h = math.exp(4.0), 1 / 255
    a, b = torch.tensor([s * (0.9 + h), s * (0.9 - h)], dtype=F64)
    assert torch.log(torch.sigmoid(a) - torch.sigmoid(b)) == -math.inf
    assert abs(float(_pixelcnn_nll(params, target)[0] - exact[0])) > 1e-5 * abs(float(exact[0]))


def test_uint8_target_is_v_over_127_5_minus_1():
    params, _ = _random_case(3, 2)
    pixels = torch.randint(0, 256, (2, 3, 3, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    torch.testing.assert_close(
        reference.discretized_mix_logistic_nll(params, pixels),
        reference.discretized_mix_logistic_nll(params, pixels.to(F64) / 127.5 - 1),
        rtol=0, atol=0,
    )


def test_channels_last_params_give_the_same_result():
    params, target = _random_case(3, 2)
    decoder_output = params.permute(0, 2, 3, 1).contiguous()  # VDVAE-style [B, H, W, 10K]
    as_channels_first = decoder_output.permute(0, 3, 1, 2)
    torch.testing.assert_close(
        reference.discretized_mix_logistic_nll(as_channels_first, target),
        reference.discretized_mix_logistic_nll(params, target),
        rtol=0, atol=0,
    )


def test_log_scales_are_clamped_below():
    params, target = _random_case(1, 2)
    low = params.clone()
    low[:, 4:6] = -50.0  # log-scales of the one channel
    at_clamp = params.clone()
    at_clamp[:, 4:6] = -7.0
    torch.testing.assert_close(
        reference.discretized_mix_logistic_nll(low, target),
        reference.discretized_mix_logistic_nll(at_clamp, target),
        rtol=0, atol=0,
    )


def test_gradcheck():
    params, target = _random_case(3, 2, batch=1, height=2, width=2)
    target[0, :, 0, 0] = 1.0
    params.requires_grad_()
    upstream = torch.tensor([1.7], dtype=F64)
    assert torch.autograd.gradcheck(
        lambda p: (reference.discretized_mix_logistic_nll(p, target) * upstream).sum(), (params,)
    )


def test_nan_in_gives_nan_out_in_that_sample():
    params, target = _random_case(3, 2)
    params[1, 0, 1, 1] = float("nan")
    got = reference.discretized_mix_logistic_nll(params, target)
    assert torch.isfinite(got[0]) and torch.isnan(got[1])


@pytest.mark.parametrize(
    "params_shape,target_shape,match",
    [
        ((2, 25, 3, 4), (2, 3, 3, 4), r"params must have shape \[B, 10K, H, W\]"),
        ((2, 30, 3, 5), (2, 3, 3, 4), r"params must have shape \[B, 10K, H, W\]"),
        ((1, 30, 3, 4), (2, 3, 3, 4), r"params must have shape \[B, 10K, H, W\]"),
        ((2, 10, 3, 4), (2, 1, 3, 4), r"params must have shape \[B, 3K, H, W\]"),
        ((2, 30, 3, 4), (2, 2, 3, 4), r"target must have shape \[B, 3, H, W\] or \[B, 1, H, W\]"),
    ],
)
def test_bad_shapes_name_the_argument(params_shape, target_shape, match):
    with pytest.raises(ValueError, match=match):
        reference.discretized_mix_logistic_nll(torch.zeros(params_shape), torch.zeros(target_shape))

"""fusedvae.diagnostics on constructed cases whose answers are known in closed form."""
from __future__ import annotations

import math

import pytest
import torch

import fusedvae
from fusedvae import VAELossOutput
from fusedvae.diagnostics import ActiveUnits, active_units, bits_per_dim, distortion, elbo, kl_per_dim, rate

F64 = torch.float64


# --------------------------------------------- rate, distortion, elbo ---


def test_rate_distortion_elbo_values_and_gradients():
    rec = torch.tensor([1.0, 2.0, 6.0], dtype=F64, requires_grad=True)
    kl = torch.tensor([0.5, 1.5, 4.0], dtype=F64, requires_grad=True)
    out = VAELossOutput(loss=torch.zeros(()), rec=rec, kl=kl)
    assert rate(out).item() == 2.0
    assert distortion(out).item() == 3.0
    assert elbo(out).item() == -5.0
    elbo(out).backward()
    torch.testing.assert_close(rec.grad, torch.full((3,), -1 / 3, dtype=F64))
    torch.testing.assert_close(kl.grad, torch.full((3,), -1 / 3, dtype=F64))
    rec.grad = kl.grad = None
    (rate(out) + 2 * distortion(out)).backward()
    torch.testing.assert_close(rec.grad, torch.full((3,), 2 / 3, dtype=F64))
    torch.testing.assert_close(kl.grad, torch.full((3,), 1 / 3, dtype=F64))


def test_elbo_of_vae_loss_is_the_negative_batchmean_loss_at_beta_one():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 7, generator=g, dtype=F64), torch.rand(4, 7, generator=g, dtype=F64)
    mu, lv = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    out = fusedvae.vae_loss(x, t, mu, lv, beta=0.25)  # elbo ignores the β of the loss
    ref = fusedvae.reference.vae_loss(x, t, mu, lv, beta=1.0)
    torch.testing.assert_close(elbo(out), -ref.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(rate(out), ref.kl.mean(), rtol=1e-12, atol=0)


def test_rejects_non_output():
    for fn in (rate, distortion, elbo):
        with pytest.raises(TypeError, match="VAELossOutput"):
            fn(torch.zeros(3))


# -------------------------------------------------------- bits per dim ---


def test_bits_per_dim_uniform_over_256_levels_is_8():
    d = 3 * 8 * 8
    # Discrete uniform over 256 levels: NLL = D ln 256 nats, already a code length.
    nll_discrete = torch.full((5,), d * math.log(256), dtype=F64)
    torch.testing.assert_close(
        bits_per_dim(nll_discrete, d, data_scaled_to_unit=False), torch.full((5,), 8.0, dtype=F64), rtol=1e-15, atol=0
    )
    # The same model as a continuous density on [0, 1]^D: density 1, NLL 0, plus log2(256) = 8.
    torch.testing.assert_close(bits_per_dim(torch.zeros(5, dtype=F64), d), torch.full((5,), 8.0, dtype=F64))
    assert bits_per_dim(0.0, d) == 8.0 and isinstance(bits_per_dim(0.0, d), float)
    # 16 levels: 4 bits.
    assert bits_per_dim(d * math.log(16), d, pixel_levels=16, data_scaled_to_unit=False) == pytest.approx(4.0)
    assert bits_per_dim(0.0, d, pixel_levels=16) == pytest.approx(4.0, rel=1e-15)


def test_bits_per_dim_of_a_fair_bernoulli_is_one_bit():
    # Logits 0 on binarised data: each element costs ln 2 nats = 1 bit, no correction.
    d = 2 * 5 * 5
    target = (torch.rand(3, 2, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    out = fusedvae.vae_loss(torch.zeros(3, 2, 5, 5, dtype=F64), target, torch.zeros(3, 4, dtype=F64),
                            torch.zeros(3, 4, dtype=F64))
    torch.testing.assert_close(
        bits_per_dim(out.rec + out.kl, d, data_scaled_to_unit=False), torch.ones(3, dtype=F64), rtol=1e-13, atol=0
    )


def _dmol_zero_params(batch, k=2, side=4):
    # Every logit, mean, log-scale and coupling coefficient 0 (tanh 0 = 0: no
    # coupling): K equal components, each subpixel under one logistic of mean 0, scale 1.
    return torch.zeros(batch, 10 * k, side, side, dtype=F64)


@pytest.mark.parametrize("nll_fn", [fusedvae.discretized_mix_logistic_nll,
                                    fusedvae.reference.discretized_mix_logistic_nll], ids=["fused", "reference"])
def test_bits_per_dim_of_the_discretized_mixture_is_nll_over_d_ln2(nll_fn):
    d = 3 * 4 * 4
    # One bit per subpixel: 2 levels (x = -1, 1), both edge bins of a logistic
    # centred between them, probability sigma(0) = 1/2 each.
    target = (torch.randint(0, 2, (3, 3, 4, 4), generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    nll = nll_fn(_dmol_zero_params(3), target, bits=1)
    torch.testing.assert_close(nll, torch.full((3,), d * math.log(2), dtype=F64), rtol=1e-13, atol=0)
    torch.testing.assert_close(bits_per_dim(nll, d, discrete=True), torch.ones(3, dtype=F64), rtol=1e-13, atol=0)

    # 8 bits, every pixel of a sample at one level v, read as x = v/127.5 - 1, h = 1/255:
    # v = 0 is the lower edge bin sigma(x + h), v = 255 the upper 1 - sigma(x - h)
    # (the same by symmetry), v = 128 (x = h) the bin sigma(2h) - sigma(0).
    def sigmoid(u):
        return 1 / (1 + math.exp(-u))

    h = 1 / 255
    p = [sigmoid(-1 + h), sigmoid(2 * h) - 0.5, sigmoid(-1 + h)]
    target = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 4, 4).contiguous()
    nll = nll_fn(_dmol_zero_params(3), target)
    expected_nll = torch.tensor([-d * math.log(q) for q in p], dtype=F64)
    torch.testing.assert_close(nll, expected_nll, rtol=1e-12, atol=0)
    bpd = bits_per_dim(nll, d, discrete=True)
    expected_bpd = torch.tensor([-math.log2(q) for q in p], dtype=F64)  # 1.890, 8.994, 1.890 bits
    torch.testing.assert_close(bpd, expected_bpd, rtol=1e-12, atol=0)
    torch.testing.assert_close(bpd, nll / (d * math.log(2)), rtol=1e-15, atol=0)
    # discrete ignores the data scaling, which describes a density's data; the
    # old spelling of the same (data_scaled_to_unit=False) gives the same
    torch.testing.assert_close(bits_per_dim(nll, d, discrete=True, data_scaled_to_unit=True), bpd, rtol=0, atol=0)
    torch.testing.assert_close(bits_per_dim(nll, d, data_scaled_to_unit=False), bpd, rtol=0, atol=0)
    # the default treats the NLL as a density's on [0, 1] data: 8 bits/dim too many here
    torch.testing.assert_close(bits_per_dim(nll, d), bpd + 8, rtol=1e-15, atol=0)


@pytest.mark.parametrize("kwargs", [{}, {"discrete": False}, {"discrete": False, "data_scaled_to_unit": True}])
def test_bits_per_dim_continuous_default_is_unchanged(kwargs):
    # A continuous density on [0, 1] data: NLL / (D ln 2) + log2 L, for tensors and floats.
    nll = torch.tensor([-2000.0, 0.0, 1500.0], dtype=F64)
    torch.testing.assert_close(bits_per_dim(nll, 3 * 16 * 16, **kwargs), nll / (768 * math.log(2)) + 8.0,
                               rtol=1e-15, atol=0)
    assert bits_per_dim(768 * math.log(2), 768, pixel_levels=32, **kwargs) == pytest.approx(1.0 + 5.0, rel=1e-15)


def test_bits_per_dim_formula_and_gradient():
    nll = torch.tensor([100.0, 2500.0], dtype=F64, requires_grad=True)
    bpd = bits_per_dim(nll, 784)
    torch.testing.assert_close(bpd, nll.detach() / (784 * math.log(2)) + 8.0)
    bpd.sum().backward()
    torch.testing.assert_close(nll.grad, torch.full((2,), 1 / (784 * math.log(2)), dtype=F64))


@pytest.mark.parametrize(
    "args, kwargs, error, name",
    [
        ((1.0, 0), {}, ValueError, "num_dims"),
        ((1.0, 3.0), {}, ValueError, "num_dims"),
        ((1.0, 3), {"pixel_levels": 1}, ValueError, "pixel_levels"),
        ((1.0, 3), {"data_scaled_to_unit": 1}, TypeError, "data_scaled_to_unit"),
        ((1.0, 3), {"discrete": None}, TypeError, "discrete"),
        ((torch.tensor([1, 2]), 3), {}, TypeError, "nll_nats_per_sample"),
        (("1.0", 3), {}, TypeError, "nll_nats_per_sample"),
    ],
)
def test_bits_per_dim_bad_arguments(args, kwargs, error, name):
    with pytest.raises(error, match=rf"^{name} must"):
        bits_per_dim(*args, **kwargs)


# ---------------------------------------------------------- kl per dim ---


@pytest.mark.parametrize("latent_shape", [(6,), (2, 3, 4)], ids=["flat", "spatial"])
def test_kl_per_dim_closed_form_and_gradient(latent_shape):
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(5, *latent_shape, generator=g, dtype=F64, requires_grad=True)
    lv = (0.7 * torch.randn(5, *latent_shape, generator=g, dtype=F64)).requires_grad_()
    got = kl_per_dim(mu, lv)
    j = math.prod(latent_shape)
    assert got.shape == (5, j) and got.dtype == F64
    m, v = mu.detach().reshape(5, j), lv.detach().reshape(5, j)
    expected = 0.5 * (m**2 + torch.exp(v) - 1 - v)  # KL(N(m, e^v) || N(0, 1)) per dimension
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.sum(1), fusedvae.reference.vae_loss(
        torch.zeros(5, 2, dtype=F64), torch.zeros(5, 2, dtype=F64), mu.detach(), lv.detach()).kl, rtol=1e-12, atol=0)
    w = torch.randn(5, j, generator=g, dtype=F64)
    (got * w).sum().backward()
    torch.testing.assert_close(mu.grad, (w * m).reshape(mu.shape), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lv.grad, (w * 0.5 * (torch.exp(v) - 1)).reshape(lv.shape), rtol=1e-12, atol=1e-14)


def test_kl_per_dim_dtypes_and_errors():
    mu = torch.tensor([[0.0, 1.0]], dtype=torch.float16)
    lv = torch.tensor([[0.0, math.log(2.0)]], dtype=F64)
    got = kl_per_dim(mu, lv)  # promoted to float64
    assert got.dtype == F64
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.5 * (1 + 2 - 1 - math.log(2.0))]], dtype=F64))
    assert kl_per_dim(mu, lv.half()).dtype == torch.float32  # half accumulates in float32
    with pytest.raises(ValueError, match="logvar"):
        kl_per_dim(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="mu"):
        kl_per_dim(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3))


# -------------------------------------------------------- active units ---


def _means(n=400, j=10, active=(1, 4, 7), seed=3):
    g = torch.Generator().manual_seed(seed)
    mu = torch.full((n, j), 0.25, dtype=F64) + 1e-3 * torch.randn(n, j, generator=g, dtype=F64)  # var ~1e-6
    for u in active:
        mu[:, u] = 2.0 + 0.5 * torch.randn(n, generator=g, dtype=F64)  # var ~0.25
    return mu


def test_active_units_counts_exactly_the_varying_dimensions():
    for active in [(), (0,), (1, 4, 7), tuple(range(10))]:
        mu = _means(active=active)
        count, var = active_units(mu)
        assert count == len(active), active
        assert isinstance(count, int)
        torch.testing.assert_close(var, mu.var(dim=0), rtol=1e-12, atol=1e-18)
        assert torch.equal(var > 0.01, torch.isin(torch.arange(10), torch.tensor(active, dtype=torch.long)))
    # The threshold decides: a dimension of variance ~0.25 is inactive at 0.5.
    assert active_units(_means(), threshold=0.5).count == 0
    assert active_units(_means(), threshold=0.0).count == 10


def test_active_units_exact_threshold_is_strict():
    mu = torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=F64)  # variances 0.125, 0 (exact in binary)
    assert active_units(mu, threshold=0.125).count == 0
    assert active_units(mu, threshold=0.1249).count == 1


def test_active_units_streaming_equals_var_of_concatenation():
    g = torch.Generator().manual_seed(4)
    # A large common offset: the naive sum-of-squares formula would cancel here.
    full = 1e4 + torch.randn(500, 3, 2, generator=g, dtype=F64) * torch.tensor([[1e-2, 1.0]], dtype=F64)
    sizes = [1, 7, 0, 100, 2, 390]
    batches = list(torch.split(full, sizes))
    expected = full.reshape(500, -1).var(dim=0)
    count, var = active_units(b for b in batches)  # a generator
    torch.testing.assert_close(var, expected, rtol=1e-9, atol=0)
    assert count == 3  # the three dimensions of std 1
    # float32 batches: variances in float32, close to the float64 answer.
    result = active_units([b.float() for b in batches])
    assert isinstance(result, ActiveUnits) and result.variances.dtype == torch.float32
    torch.testing.assert_close(result.variances, full.float().double().reshape(500, -1).var(0).float(), rtol=1e-5, atol=0)


def test_active_units_errors():
    with pytest.raises(ValueError, match="at least 2"):
        active_units(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        active_units([])
    with pytest.raises(ValueError, match="elements per sample"):
        active_units([torch.zeros(3, 4), torch.zeros(3, 5)])
    with pytest.raises(TypeError, match="mu"):
        active_units(3.0)
    with pytest.raises(TypeError, match="mu"):
        active_units([torch.zeros(3, 4), "x"])
    with pytest.raises(ValueError, match="mu"):
        active_units(torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="threshold"):
        active_units(torch.zeros(4, 2), threshold=-1.0)


def test_exported():
    assert fusedvae.diagnostics.active_units is active_units
    assert {"controllers", "diagnostics", "schedules"} <= set(fusedvae.__all__)
    assert fusedvae.controllers.GECO.__module__ == "fusedvae.controllers"
